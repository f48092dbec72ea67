//! The QLoRA linear on the CPU: the oracle of [`crate::cuda::qlora`]. By definition
//! ([`crate::qlora`]) it is [`crate::cpu::lora`] over the NF4 weight dequantized to the
//! activation type.

use crate::qlora::{check_base, QloraWeights};
use crate::{Element, LoraGrads, LoraOptions, LoraShape, LoraWeights, Nf4Weight, Result};

fn dense<T: Element>(shape: &LoraShape, w: &Nf4Weight) -> Result<Vec<T>> {
    w.validate()?;
    check_base(shape, w.rows, w.cols)?;
    w.dequantize::<T>()
}

/// Forward: `y = x deq(W)ᵀ + bias + s · h Bᵀ`, `h = drop(x) Aᵀ` (written if given).
pub fn forward<T: Element>(
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &[T],
    weights: QloraWeights<'_, Nf4Weight, [T]>,
    y: &mut [T],
    h: Option<&mut [T]>,
) -> Result<()> {
    let w = dense::<T>(shape, weights.w)?;
    let lw = LoraWeights {
        w: &w[..],
        a: weights.a,
        b: weights.b,
        bias: weights.bias,
    };
    super::lora::forward(shape, opts, x, lw, y, h)
}

/// Backward from `dy`: dX (through deq(W)), dA and dB. `h` is what [`forward`] wrote.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element>(
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &[T],
    weights: QloraWeights<'_, Nf4Weight, [T]>,
    h: &[T],
    dy: &[T],
    grads: LoraGrads<'_, [T]>,
) -> Result<()> {
    let w = dense::<T>(shape, weights.w)?;
    let lw = LoraWeights {
        w: &w[..],
        a: weights.a,
        b: weights.b,
        bias: weights.bias,
    };
    super::lora::backward(shape, opts, x, lw, h, dy, grads)
}
