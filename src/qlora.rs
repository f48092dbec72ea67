//! The QLoRA linear layer: the LoRA linear of [`crate::lora`] over a frozen NF4 base
//! weight ([`crate::nf4`], bitsandbytes' format).
//!
//! Semantics, as peft's `lora.Linear4bit`: the base product uses `W` dequantized to the
//! activation type (bitsandbytes' `dequantize_4bit(W).to(x.dtype)`), so
//!
//! ```text
//! y  = x deq(W)ᵀ + bias + s · drop(x) Aᵀ Bᵀ,       h = drop(x) Aᵀ
//! dX = dY deq(W) + s · ((dY B) A) ⊙ mask / (1 − p)
//! dA = s · (dY B)ᵀ drop(x),   dB = s · dYᵀ h
//! ```
//!
//! which is exactly the LoRA linear with `w = Nf4Weight::dequantize::<T>()`: the CPU
//! oracle [`crate::cpu::qlora`] computes it that way. The CUDA ops
//! ([`crate::cuda::qlora`]) never hold the whole dense W in device memory: small T
//! dequantizes in registers, larger T one bounded panel of rows at a time.
//!
//! Shapes and buffers are those of [`LoraShape`]; `W` [N, K] is an NF4 weight whose
//! `rows` must be N and `cols` K.

use crate::{Error, LoraShape, Result};

/// The weights of one QLoRA linear layer: the frozen NF4 base `w` ([`crate::Nf4Weight`]
/// on the host, [`crate::cuda::nf4::Nf4Device`] on the GPU), the adapters `a` [r, K] and
/// `b` [N, r], and an optional `bias` \[N\].
#[derive(Debug)]
pub struct QloraWeights<'a, W: ?Sized, S: ?Sized> {
    pub w: &'a W,
    pub a: &'a S,
    pub b: &'a S,
    pub bias: Option<&'a S>,
}

impl<W: ?Sized, S: ?Sized> Clone for QloraWeights<'_, W, S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W: ?Sized, S: ?Sized> Copy for QloraWeights<'_, W, S> {}

/// Checks that an NF4 weight of `rows` × `cols` is the base of `shape` ([N, K]).
pub(crate) fn check_base(shape: &LoraShape, rows: usize, cols: usize) -> Result<()> {
    shape.validate()?;
    if rows != shape.out_features {
        return Err(Error::Dim {
            name: "w.rows",
            value: rows,
            reason: "the NF4 weight's rows must equal out_features (N)",
        });
    }
    if cols != shape.in_features {
        return Err(Error::Dim {
            name: "w.cols",
            value: cols,
            reason: "the NF4 weight's cols must equal in_features (K)",
        });
    }
    Ok(())
}
