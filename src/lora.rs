//! The LoRA linear layer: shapes, options and validation shared by the CPU oracle
//! ([`crate::cpu::lora`]) and the CUDA ops ([`crate::cuda::lora`]), which take the same
//! arguments.
//!
//! ```text
//! y  = x Wᵀ + bias + s · h Bᵀ,   h = drop(x) Aᵀ
//! g  = dY B                                          [T, r]
//! dX = dY W + s · (g A) ⊙ mask / (1 − p)
//! dA = s · gᵀ drop(x)
//! dB = s · dYᵀ h
//! ```
//! with `x` [T, K], `W` [N, K], `A` [r, K], `B` [N, r], `bias` \[N\], `y` [T, N], all
//! row-major (PyTorch's `nn.Linear` and peft's `lora_A` / `lora_B` layouts). `W` and
//! the bias are frozen: backward gives dX, dA and dB.

use crate::{Dropout, Error, Result, Tuning};

/// The largest LoRA rank the kernels support.
pub const MAX_RANK: usize = 256;

/// The sizes of one LoRA linear call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraShape {
    /// T: tokens (batch × sequence).
    pub tokens: usize,
    /// K: input features.
    pub in_features: usize,
    /// N: output features.
    pub out_features: usize,
    /// r: the adapter's rank, 1..=256.
    pub rank: usize,
}

impl LoraShape {
    /// A shape from (T, K, N, r).
    pub fn new(tokens: usize, in_features: usize, out_features: usize, rank: usize) -> Self {
        LoraShape {
            tokens,
            in_features,
            out_features,
            rank,
        }
    }

    /// (tokens, in_features, out_features, rank): T, K, N, r.
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        (self.tokens, self.in_features, self.out_features, self.rank)
    }

    /// Checks every dimension: all ≥ 1, rank ≤ 256, each < 2^31 and every tensor's
    /// element count representable.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("tokens", self.tokens),
            ("in_features", self.in_features),
            ("out_features", self.out_features),
            ("rank", self.rank),
        ];
        for (name, value) in dims {
            if value == 0 {
                return Err(Error::Dim {
                    name,
                    value,
                    reason: "must be at least 1",
                });
            }
            if value > i32::MAX as usize {
                return Err(Error::Dim {
                    name,
                    value,
                    reason: "must be below 2^31",
                });
            }
        }
        if self.rank > MAX_RANK {
            return Err(Error::Dim {
                name: "rank",
                value: self.rank,
                reason: "must be at most 256",
            });
        }
        for (a, b) in [
            (self.tokens, self.in_features),
            (self.out_features, self.in_features),
            (self.tokens, self.out_features),
        ] {
            if a.checked_mul(b).is_none_or(|n| n > isize::MAX as usize / 4) {
                return Err(Error::Dim {
                    name: "tokens × features",
                    value: a.saturating_mul(b),
                    reason: "tensor too large",
                });
            }
        }
        Ok(())
    }

    // The element counts saturate instead of overflowing: a shape whose counts would
    // overflow fails `validate`, which every op runs before it uses them.

    /// Elements of x: T·K.
    pub fn x_len(&self) -> usize {
        self.tokens.saturating_mul(self.in_features)
    }
    /// Elements of W: N·K.
    pub fn w_len(&self) -> usize {
        self.out_features.saturating_mul(self.in_features)
    }
    /// Elements of A: r·K.
    pub fn a_len(&self) -> usize {
        self.rank.saturating_mul(self.in_features)
    }
    /// Elements of B: N·r.
    pub fn b_len(&self) -> usize {
        self.out_features.saturating_mul(self.rank)
    }
    /// Elements of y: T·N.
    pub fn y_len(&self) -> usize {
        self.tokens.saturating_mul(self.out_features)
    }
    /// Elements of h: T·r.
    pub fn h_len(&self) -> usize {
        self.tokens.saturating_mul(self.rank)
    }
}

/// The LoRA scale `s`, dropout and path tuning of one call (the LoRA, DoRA, QLoRA and
/// QDoRA ops all take it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraOptions {
    /// The scale `s` applied to the low-rank term (see [`scale`] and [`rslora_scale`]).
    pub scale: f32,
    /// Dropout on the LoRA branch's input, or `None`.
    pub dropout: Option<Dropout>,
    /// Overrides of the CUDA path planner for this call ([`Tuning::AUTO`] by default;
    /// the CPU oracle ignores it).
    pub tuning: Tuning,
}

impl LoraOptions {
    /// Options with scale `s` and no dropout.
    pub fn new(scale: f32) -> Self {
        LoraOptions {
            scale,
            dropout: None,
            tuning: Tuning::AUTO,
        }
    }

    /// The same options with a path tuning (see [`Tuning`]).
    pub fn with_tuning(mut self, tuning: Tuning) -> Self {
        self.tuning = tuning;
        self
    }

    /// The same options with dropout.
    pub fn with_dropout(mut self, dropout: Dropout) -> Self {
        self.dropout = Some(dropout);
        self
    }

    /// The dropout that is actually active (`None` for p = 0).
    pub fn active_dropout(&self) -> Option<Dropout> {
        self.dropout.filter(|d| d.threshold() > 0)
    }

    /// Checks the scale and dropout probability.
    pub fn validate(&self) -> Result<()> {
        if !self.scale.is_finite() {
            return Err(Error::Value {
                name: "scale",
                value: self.scale as f64,
                reason: "must be finite",
            });
        }
        if let Some(d) = &self.dropout {
            d.validate()?;
        }
        self.tuning.validate()
    }
}

/// peft's default scale, `alpha / r`.
pub fn scale(alpha: f32, rank: usize) -> f32 {
    alpha / rank as f32
}

/// rsLoRA's scale, `alpha / sqrt(r)`.
pub fn rslora_scale(alpha: f32, rank: usize) -> f32 {
    alpha / (rank as f32).sqrt()
}

/// The frozen and trainable weights of one LoRA linear layer: `W` [N, K], `A` [r, K],
/// `B` [N, r] and an optional `bias` \[N\]. `S` is a host slice for the CPU oracle or a
/// device buffer for the CUDA ops.
#[derive(Debug)]
pub struct LoraWeights<'a, S: ?Sized> {
    pub w: &'a S,
    pub a: &'a S,
    pub b: &'a S,
    pub bias: Option<&'a S>,
}

// Manual impls: the derives would needlessly require `S: Clone`.
impl<S: ?Sized> Clone for LoraWeights<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<S: ?Sized> Copy for LoraWeights<'_, S> {}

/// The gradients backward writes: `dx` [T, K], `da` [r, K], `db` [N, r].
#[derive(Debug)]
pub struct LoraGrads<'a, S: ?Sized> {
    pub dx: &'a mut S,
    pub da: &'a mut S,
    pub db: &'a mut S,
}

pub(crate) use crate::check::check_len;

/// Checks every buffer length of a forward call.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_forward_lens(
    shape: &LoraShape,
    x: usize,
    w: usize,
    a: usize,
    b: usize,
    bias: Option<usize>,
    y: usize,
    h: Option<usize>,
) -> Result<()> {
    shape.validate()?;
    check_len("x", x, shape.x_len())?;
    check_len("w", w, shape.w_len())?;
    check_len("a", a, shape.a_len())?;
    check_len("b", b, shape.b_len())?;
    if let Some(bias) = bias {
        check_len("bias", bias, shape.out_features)?;
    }
    check_len("y", y, shape.y_len())?;
    if let Some(h) = h {
        check_len("h", h, shape.h_len())?;
    }
    Ok(())
}

/// Lengths of the buffers of a backward call.
pub(crate) struct BackwardLens {
    pub x: usize,
    pub w: usize,
    pub a: usize,
    pub b: usize,
    pub h: usize,
    pub dy: usize,
    pub dx: usize,
    pub da: usize,
    pub db: usize,
}

pub(crate) fn check_backward_lens(shape: &LoraShape, l: &BackwardLens) -> Result<()> {
    shape.validate()?;
    check_len("x", l.x, shape.x_len())?;
    check_len("w", l.w, shape.w_len())?;
    check_len("a", l.a, shape.a_len())?;
    check_len("b", l.b, shape.b_len())?;
    check_len("h", l.h, shape.h_len())?;
    check_len("dy", l.dy, shape.y_len())?;
    check_len("dx", l.dx, shape.x_len())?;
    check_len("da", l.da, shape.a_len())?;
    check_len("db", l.db, shape.b_len())?;
    Ok(())
}

/// Checks the buffers of a merge: `w` [N, K], `a` [r, K], `b` [N, r] (tokens unused).
pub(crate) fn check_merge_lens(shape: &LoraShape, w: usize, a: usize, b: usize) -> Result<()> {
    LoraShape {
        tokens: 1,
        ..*shape
    }
    .validate()?;
    check_len("w", w, shape.w_len())?;
    check_len("a", a, shape.a_len())?;
    check_len("b", b, shape.b_len())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shapes whose element counts overflow are refused by `validate` (naming the
    /// dimension), and their length accessors saturate instead of panicking.
    #[test]
    fn overflowing_shapes_are_errors_not_panics() {
        for s in [
            LoraShape::new(usize::MAX, 8, 8, 4),
            LoraShape::new(3 + (1 << 57), 64, 64, 8),
            LoraShape::new((1 << 31) - 1, (1 << 31) - 1, 8, 4),
            LoraShape::new(8, 8, 8, 257),
            LoraShape::new(0, 8, 8, 4),
        ] {
            let e = s.validate().unwrap_err();
            assert!(matches!(e, Error::Dim { .. }), "{s:?}: {e}");
            let _ = (
                s.x_len(),
                s.w_len(),
                s.a_len(),
                s.b_len(),
                s.y_len(),
                s.h_len(),
            );
        }
        let big = LoraShape::new(usize::MAX, usize::MAX, 2, 2);
        assert_eq!(big.x_len(), usize::MAX);
        assert!(LoraShape::new(4096, 4096, 4096, 16).validate().is_ok());
    }

    /// Options: non-finite scale and bad tunings are named errors.
    #[test]
    fn bad_options_are_named() {
        let e = LoraOptions::new(f32::INFINITY).validate().unwrap_err();
        assert!(matches!(e, Error::Value { name: "scale", .. }), "{e}");
        let t = Tuning {
            tile_n: Some(64),
            ..Tuning::AUTO
        };
        let e = LoraOptions::new(1.0).with_tuning(t).validate().unwrap_err();
        assert!(
            matches!(
                e,
                Error::Dim {
                    name: "tuning.tile_n",
                    ..
                }
            ),
            "{e}"
        );
        let t = Tuning {
            panel_elems: Some(0),
            ..Tuning::AUTO
        };
        let e = LoraOptions::new(1.0).with_tuning(t).validate().unwrap_err();
        assert!(
            matches!(
                e,
                Error::Dim {
                    name: "tuning.panel_elems",
                    ..
                }
            ),
            "{e}"
        );
    }
}
