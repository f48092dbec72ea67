//! QDoRA on the CPU: DoRA over an NF4 base weight, the oracle of [`crate::cuda::qdora`].
//! As peft computes DoRA over a bitsandbytes `Linear4bit` (its weight dequantized to the
//! activation type), this is [`crate::cpu::dora`] over the NF4 weight dequantized to `T`.

use crate::dora::{DoraGrads, DoraOutputs, DoraSaved, DoraWeights};
use crate::qlora::check_base;
use crate::{Element, LoraOptions, LoraShape, Nf4Weight, Result};

fn dense<T: Element>(shape: &LoraShape, w: &Nf4Weight) -> Result<Vec<T>> {
    w.validate()?;
    check_base(shape, w.rows, w.cols)?;
    w.dequantize::<T>()
}

fn with_dense<'a, T: Element>(
    weights: DoraWeights<'a, [T], Nf4Weight>,
    w: &'a [T],
) -> DoraWeights<'a, [T]> {
    DoraWeights {
        w,
        a: weights.a,
        b: weights.b,
        bias: weights.bias,
        magnitude: weights.magnitude,
    }
}

/// The row norms `‖deq(W)_o + s·(BA)_o‖` \[N\], in f32.
pub fn weight_norm<T: Element>(
    shape: &LoraShape,
    scale: f32,
    w: &Nf4Weight,
    a: &[T],
    b: &[T],
    norm: &mut [f32],
) -> Result<()> {
    let wd = dense::<T>(shape, w)?;
    super::dora::weight_norm(shape, scale, &wd, a, b, norm)
}

/// peft's magnitude initialisation over the dequantized W, in `T`.
pub fn magnitude_init<T: Element>(
    shape: &LoraShape,
    scale: f32,
    w: &Nf4Weight,
    a: &[T],
    b: &[T],
    m: &mut [T],
) -> Result<()> {
    let wd = dense::<T>(shape, w)?;
    super::dora::magnitude_init(shape, scale, &wd, a, b, m)
}

/// Forward (see [`crate::dora`]) with `W = deq(W_nf4)`.
pub fn forward<T: Element>(
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &[T],
    weights: DoraWeights<'_, [T], Nf4Weight>,
    out: DoraOutputs<'_, [T], [f32]>,
) -> Result<()> {
    let wd = dense::<T>(shape, weights.w)?;
    super::dora::forward(shape, opts, x, with_dense(weights, &wd), out)
}

/// Backward (see [`crate::dora`]) with `W = deq(W_nf4)`.
pub fn backward<T: Element>(
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &[T],
    weights: DoraWeights<'_, [T], Nf4Weight>,
    saved: DoraSaved<'_, [T], [f32]>,
    dy: &[T],
    grads: DoraGrads<'_, [T]>,
) -> Result<()> {
    let wd = dense::<T>(shape, weights.w)?;
    super::dora::backward(shape, opts, x, with_dense(weights, &wd), saved, dy, grads)
}
