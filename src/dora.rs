//! DoRA (weight-decomposed low-rank adaptation), exactly as peft's
//! `tuners/lora/dora.py`: shapes, buffers and validation shared by the CPU oracle
//! ([`crate::cpu::dora`]) and the CUDA ops ([`crate::cuda::dora`]), which take the same
//! arguments.
//!
//! ```text
//! ‖·‖_o = ‖W_o + s·(B A)_o‖₂           one L2 norm per output row o, over K
//! g_o   = m_o / ‖·‖_o                   the DoRA scale (the norm is a constant in
//!                                       backward: DoRA paper §4.3, as peft detaches it)
//! h     = drop(x) Aᵀ                    [T, r]
//! z     = drop(x) Wᵀ + s · h Bᵀ         [T, N], before the scale
//! y     = x Wᵀ + bias + (g − 1) ⊙ drop(x) Wᵀ + g ⊙ (s · h Bᵀ)
//! ```
//!
//! Without dropout (p = 0, or evaluation) `drop(x) = x` and this is
//! `y = g ⊙ (x Wᵀ + s · h Bᵀ) + bias`: the bias is not rescaled. With dropout it is the
//! formula peft uses (peft's `lora_magnitude_vector(dropout(x), ...)` added to the base
//! layer's output on the undropped x); the dropout mask is the crate's counter-based
//! [`crate::Dropout`] on the elements of x, as in the LoRA linear.
//!
//! Backward from dy [T, N] (W and the bias frozen; the norm a constant):
//! ```text
//! gl  = dy (g ⊙ B)                                         [T, r]
//! dX  = dy W + ((dy ⊙ (g − 1)) W + s · gl A) ⊙ mask/(1−p)  (= (dy ⊙ g) W + s · gl A without dropout)
//! dA  = s · glᵀ drop(x)
//! dB  = s · g ⊙ (dyᵀ h)
//! dm  = Σ_t dy ⊙ z / ‖·‖
//! ```
//! A row whose `W_o + s·(BA)_o` is exactly zero has no direction: its scale is
//! `m_o / 0`, non-finite, as in peft (which adds no epsilon either).
//!
//! The norm is always computed directly from the elements of `W + s·BA` (never by
//! expanding the square into `‖W‖² + 2s⟨W, BA⟩ + s²‖BA‖²`, which cancels when
//! `s·BA ≈ −W`), and is returned in f32 so a training step can hand it to backward.

use crate::lora::{check_len, LoraOptions, LoraShape};
use crate::Result;

/// The frozen and trainable weights of one DoRA linear layer: the LoRA weights plus
/// the magnitude `m` \[N\] (peft's `lora_magnitude_vector`). `S` is a host slice for the
/// CPU oracle or a device buffer for the CUDA ops; the base `W` has the same type, or
/// for QDoRA ([`crate::cpu::qdora`], [`crate::cuda::qdora`]) is an NF4 weight
/// ([`crate::Nf4Weight`], [`crate::cuda::nf4::Nf4Device`]).
#[derive(Debug)]
pub struct DoraWeights<'a, S: ?Sized, W: ?Sized = S> {
    /// W [N, K], frozen (dense, or NF4 for QDoRA).
    pub w: &'a W,
    /// A [r, K] (`lora_A.weight`).
    pub a: &'a S,
    /// B [N, r] (`lora_B.weight`).
    pub b: &'a S,
    /// bias \[N\], frozen and not rescaled, or `None`.
    pub bias: Option<&'a S>,
    /// m \[N\] (`lora_magnitude_vector`).
    pub magnitude: &'a S,
}

impl<S: ?Sized, W: ?Sized> Clone for DoraWeights<'_, S, W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<S: ?Sized, W: ?Sized> Copy for DoraWeights<'_, S, W> {}

/// What forward writes: `y` [T, N] always; optionally `h` [T, r], the row norms \[N\]
/// (f32) and `z` [T, N] (the product before the DoRA scale), which [`DoraSaved`] hands
/// to backward. `F` is the f32 buffer type (`[f32]` on the CPU).
#[derive(Debug)]
pub struct DoraOutputs<'a, O: ?Sized, F: ?Sized> {
    pub y: &'a mut O,
    pub h: Option<&'a mut O>,
    pub norm: Option<&'a mut F>,
    pub z: Option<&'a mut O>,
}

impl<'a, O: ?Sized, F: ?Sized> DoraOutputs<'a, O, F> {
    /// Only `y`.
    pub fn y(y: &'a mut O) -> Self {
        DoraOutputs {
            y,
            h: None,
            norm: None,
            z: None,
        }
    }
}

/// What backward takes from forward: `h` [T, r] and the norms \[N\] (f32), both
/// required; `z` [T, N] is optional. Without it backward recomputes `z` (one more base
/// product, in token chunks of bounded scratch); with it, dm costs one read.
#[derive(Debug)]
pub struct DoraSaved<'a, S: ?Sized, F: ?Sized> {
    pub h: &'a S,
    pub norm: &'a F,
    pub z: Option<&'a S>,
}

/// The gradients backward writes: `dx` [T, K], `da` [r, K], `db` [N, r], `dm` \[N\].
#[derive(Debug)]
pub struct DoraGrads<'a, S: ?Sized> {
    pub dx: &'a mut S,
    pub da: &'a mut S,
    pub db: &'a mut S,
    pub dm: &'a mut S,
}

/// Buffer lengths of a forward call.
pub(crate) struct ForwardLens {
    pub x: usize,
    pub w: usize,
    pub a: usize,
    pub b: usize,
    pub bias: Option<usize>,
    pub m: usize,
    pub y: usize,
    pub h: Option<usize>,
    pub norm: Option<usize>,
    pub z: Option<usize>,
}

pub(crate) fn check_forward(shape: &LoraShape, opts: &LoraOptions, l: &ForwardLens) -> Result<()> {
    shape.validate()?;
    opts.validate()?;
    check_len("x", l.x, shape.x_len())?;
    check_weights(shape, l.w, l.a, l.b, l.m)?;
    if let Some(bias) = l.bias {
        check_len("bias", bias, shape.out_features)?;
    }
    check_len("y", l.y, shape.y_len())?;
    if let Some(h) = l.h {
        check_len("h", h, shape.h_len())?;
    }
    if let Some(norm) = l.norm {
        check_len("norm", norm, shape.out_features)?;
    }
    if let Some(z) = l.z {
        check_len("z", z, shape.y_len())?;
    }
    Ok(())
}

fn check_weights(shape: &LoraShape, w: usize, a: usize, b: usize, m: usize) -> Result<()> {
    check_len("w", w, shape.w_len())?;
    check_len("a", a, shape.a_len())?;
    check_len("b", b, shape.b_len())?;
    check_len("magnitude", m, shape.out_features)
}

/// Buffer lengths of a backward call.
pub(crate) struct BackwardLens {
    pub x: usize,
    pub w: usize,
    pub a: usize,
    pub b: usize,
    pub m: usize,
    pub h: usize,
    pub norm: usize,
    pub z: Option<usize>,
    pub dy: usize,
    pub dx: usize,
    pub da: usize,
    pub db: usize,
    pub dm: usize,
}

pub(crate) fn check_backward(
    shape: &LoraShape,
    opts: &LoraOptions,
    l: &BackwardLens,
) -> Result<()> {
    shape.validate()?;
    opts.validate()?;
    check_len("x", l.x, shape.x_len())?;
    check_weights(shape, l.w, l.a, l.b, l.m)?;
    check_len("h", l.h, shape.h_len())?;
    check_len("norm", l.norm, shape.out_features)?;
    if let Some(z) = l.z {
        check_len("z", z, shape.y_len())?;
    }
    check_len("dy", l.dy, shape.y_len())?;
    check_len("dx", l.dx, shape.x_len())?;
    check_len("da", l.da, shape.a_len())?;
    check_len("db", l.db, shape.b_len())?;
    check_len("dm", l.dm, shape.out_features)
}

/// Checks the buffers of a norm, magnitude init, merge or unmerge: `w` [N, K], `a`
/// [r, K], `b` [N, r] and an \[N\] vector (`shape.tokens` is unused).
pub(crate) fn check_weight_op(
    shape: &LoraShape,
    scale: f32,
    w: usize,
    a: usize,
    b: usize,
    vec: (&'static str, usize),
) -> Result<()> {
    LoraShape {
        tokens: 1,
        ..*shape
    }
    .validate()?;
    LoraOptions::new(scale).validate()?;
    check_len("w", w, shape.w_len())?;
    check_len("a", a, shape.a_len())?;
    check_len("b", b, shape.b_len())?;
    check_len(vec.0, vec.1, shape.out_features)
}
