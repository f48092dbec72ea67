//! AdamW for adapter parameters: `torch.optim.AdamW` (non-amsgrad, `maximize=False`) over
//! a list of tensors, each with its own learning-rate multiplier (LoRA+) and weight-decay
//! switch. CPU oracle in [`crate::cpu::adamw`], CUDA in [`crate::cuda::adamw`] (one
//! launch for the whole list), same arguments, same output bits.
//!
//! ## The math
//! At step `t` (1-based), for a tensor with learning rate `lr_i = lr · lr_scale`:
//!
//! ```text
//! θ ← θ − lr_i·wd·θ                      (wd = weight_decay, 0 when the tensor's decay is off)
//! m ← β1·m + (1 − β1)·g
//! v ← β2·v + (1 − β2)·g²
//! m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)
//! θ ← θ − lr_i · m̂ / (√v̂ + eps)
//! ```
//!
//! As torch computes it (`torch/optim/adam.py`, `_single_tensor_adam`), the scalars are
//! worked out once per step on the host in f64 and rounded to f32 once each:
//!
//! | constant | value (f64, then f32) | torch |
//! |---|---|---|
//! | `decay` | `1 − lr_i·wd` (1 when wd = 0 or decay is off) | `param.mul_(1 - lr * weight_decay)` |
//! | `w` | `1 − β1` | `exp_avg.lerp_(grad, 1 - beta1)` |
//! | `β2`, `c2` | `β2`, `1 − β2` | `exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)` |
//! | `b2` | `(1 − β2^t)^0.5` | `bias_correction2 ** 0.5` |
//! | `s` | `lr_i / (1 − β1^t)` | `step_size` |
//! | `eps` | `eps` | `.add_(eps)` |
//!
//! and every element is then updated in f32, each operation rounded to nearest (IEEE,
//! subnormals kept), in torch's order:
//!
//! ```text
//! θ ← θ·decay
//! m ← fma(w, g − m, m)              if w < 0.5, else fma(w − 1, g − m, g)   (torch's lerp)
//! v ← v·β2 + (c2·g)·g
//! θ ← θ + ((−s)·m) / (√v / b2 + eps)
//! ```
//!
//! This is torch's CPU arithmetic operation for operation (its vectorized lerp is the
//! fma above; only its scalar tails and compiler contractions can round differently), so
//! the oracle matches torch within a few f32 roundings per step; `tests/adamw.rs` derives
//! the bound and checks it on a fixture made by torch. The GPU kernel performs the same
//! operations and matches the oracle bit for bit.
//!
//! ## Layouts
//! Each tensor is four (or five) buffers of one length `n`, contiguous, in any shape
//! (the update is elementwise): the parameter `param` (f32 master weights), the moments
//! `m` and `v` (f32, zero before step 1, as torch's state), the gradient `grad` (f32, f16
//! or bf16: one type per call) and optionally `copy`, the updated parameter rounded to
//! nearest in f32, f16 or bf16 (the weights a bf16 model computes with). A call updates
//! `param`, `m`, `v` (and `copy`) of every tensor in place. Every argument (the
//! hyper-parameters, `t`, each tensor's options and lengths) is checked before the first
//! write: on error nothing has changed.
//!
//! ## LoRA+
//! [`crate::loraplus::LoraPlus::lr_scale`] gives each role's multiplier: `lr` is A's rate
//! and B's tensors take `lr_scale = ratio`.
//!
//! ```
//! use lora_kernels::adamw::{AdamW, TensorOptions};
//! use lora_kernels::cpu::adamw::{step, Tensor};
//! use lora_kernels::loraplus::{LoraPlus, Role};
//!
//! # fn main() -> lora_kernels::Result<()> {
//! let lp = LoraPlus::new(2e-4, 16.0)?;
//! let opt = AdamW { lr: 2e-4, ..AdamW::default() };
//! let (mut a, mut b) = (vec![0.1f32; 8 * 64], vec![0f32; 64 * 8]); // A [r, K], B [N, r]
//! let (mut ma, mut va) = (vec![0f32; a.len()], vec![0f32; a.len()]);
//! let (mut mb, mut vb) = (vec![0f32; b.len()], vec![0f32; b.len()]);
//! let (ga, gb) = (vec![0.01f32; a.len()], vec![-0.02f32; b.len()]);
//! let mut list = [
//!     Tensor::new(&mut a, &mut ma, &mut va, &ga),
//!     Tensor::new(&mut b, &mut mb, &mut vb, &gb)
//!         .with_options(TensorOptions::new(lp.lr_scale(Role::B))),
//! ];
//! step(&opt, 1, &mut list)?; // t = 1
//! // At t = 1, m̂ = g and v̂ = g²: each element moves by about lr_i · sign(g).
//! assert!((b[0] - 16.0 * 2e-4).abs() < 1e-6);
//! # Ok(())
//! # }
//! ```

use crate::{Error, Result};

/// AdamW's hyper-parameters, with torch's defaults ([`AdamW::default`]): `lr` 1e-3,
/// betas (0.9, 0.999), `eps` 1e-8, `weight_decay` 0.01. f64, as torch keeps them (Python
/// floats); the per-step constants are computed from them in f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// The learning rate (of tensors with `lr_scale` 1): finite, `>= 0`.
    pub lr: f64,
    /// The first moment's decay: in `[0, 1)`.
    pub beta1: f64,
    /// The second moment's decay: in `[0, 1)`.
    pub beta2: f64,
    /// Added to `√v̂`: finite and `> 0` as an f32.
    pub eps: f64,
    /// Decoupled weight decay (`θ ← θ − lr·wd·θ`): finite, `>= 0`.
    pub weight_decay: f64,
}

impl Default for AdamW {
    /// torch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01.
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamW {
    /// torch's defaults with learning rate `lr`, validated.
    pub fn new(lr: f64) -> Result<Self> {
        let opt = AdamW {
            lr,
            ..AdamW::default()
        };
        opt.validate()?;
        Ok(opt)
    }

    /// [`Error::Value`] naming the first bad hyper-parameter: `lr` or `weight_decay`
    /// not finite or negative, `beta1` or `beta2` outside `[0, 1)` (or NaN), `eps` not
    /// finite or not `> 0` once rounded to f32 (an `eps` below f32's smallest subnormal
    /// would divide by zero where `v` is 0). Every step calls this first.
    pub fn validate(&self) -> Result<()> {
        let bad = |name, value: f64, reason| {
            Err(Error::Value {
                name,
                value,
                reason,
            })
        };
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", self.lr, "must be finite and >= 0");
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !((0.0..1.0).contains(&b)) {
                return bad(name, b, "must be in [0, 1)");
            }
        }
        let eps32 = self.eps as f32;
        if !(eps32.is_finite() && eps32 > 0.0) {
            return bad(
                "eps",
                self.eps,
                "must be finite and > 0 (as an f32: at least 1.4e-45)",
            );
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay, "must be finite and >= 0");
        }
        Ok(())
    }
}

/// One tensor's options: its learning-rate multiplier and whether weight decay applies.
/// The default is `lr_scale` 1 with decay (a tensor of torch's single param group).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorOptions {
    /// This tensor's learning rate over [`AdamW::lr`] (LoRA+: `ratio` for B, 1 for A):
    /// finite, `>= 0`.
    pub lr_scale: f64,
    /// Whether [`AdamW::weight_decay`] applies to this tensor (torch: a param group with
    /// `weight_decay=0` when false).
    pub weight_decay: bool,
}

impl Default for TensorOptions {
    fn default() -> Self {
        TensorOptions {
            lr_scale: 1.0,
            weight_decay: true,
        }
    }
}

impl TensorOptions {
    /// Learning rate `lr_scale · lr`, with weight decay.
    pub fn new(lr_scale: f64) -> Self {
        TensorOptions {
            lr_scale,
            weight_decay: true,
        }
    }

    /// The same options without weight decay.
    pub fn no_weight_decay(self) -> Self {
        TensorOptions {
            weight_decay: false,
            ..self
        }
    }
}

/// The f32 constants of one step shared by every tensor (the module doc's table).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Shared {
    /// `w = 1 − β1` if `w < 0.5`, else `w − 1`.
    pub lerp_coeff: f32,
    /// `w < 0.5`: the lerp starts from `m` (else from `g`).
    pub lerp_base_m: bool,
    pub beta2: f32,
    pub c2: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
}

/// The f32 constants of one tensor at one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PerTensor {
    /// `1 − lr_i·wd`, or 1.
    pub decay: f32,
    /// `−lr_i / (1 − β1^t)`.
    pub neg_step: f32,
}

/// Checks `opt` and `t` and computes the shared constants of step `t`.
pub(crate) fn shared(opt: &AdamW, t: u64) -> Result<Shared> {
    opt.validate()?;
    if t == 0 {
        return Err(Error::Value {
            name: "t",
            value: 0.0,
            reason: "must be >= 1 (the step counter is 1-based)",
        });
    }
    // torch: `1 - beta1` in f64, rounded to f32 by lerp; lerp's `1 - weight` in f32
    // (exact here: w in [0.5, 1]).
    let w = (1.0 - opt.beta1) as f32;
    let lerp_base_m = w.abs() < 0.5;
    Ok(Shared {
        lerp_coeff: if lerp_base_m { w } else { w - 1.0 },
        lerp_base_m,
        beta2: opt.beta2 as f32,
        c2: (1.0 - opt.beta2) as f32,
        // > 0: beta2 < 1 and t >= 1 give 1 - beta2^t >= 1 - beta2 >= 2^-53.
        bc2_sqrt: (1.0 - opt.beta2.powf(t as f64)).powf(0.5) as f32,
        eps: opt.eps as f32,
    })
}

/// Checks one tensor's options and computes its constants at step `t` (`opt` and `t`
/// already checked by [`shared`]).
pub(crate) fn per_tensor(opt: &AdamW, t: u64, o: &TensorOptions) -> Result<PerTensor> {
    if !(o.lr_scale.is_finite() && o.lr_scale >= 0.0) {
        return Err(Error::Value {
            name: "lr_scale",
            value: o.lr_scale,
            reason: "must be finite and >= 0",
        });
    }
    let lr = opt.lr * o.lr_scale;
    let wd = if o.weight_decay {
        opt.weight_decay
    } else {
        0.0
    };
    let decay = if wd != 0.0 {
        (1.0 - lr * wd) as f32
    } else {
        1.0
    };
    if !decay.is_finite() {
        return Err(Error::Value {
            name: "1 - lr * lr_scale * weight_decay",
            value: 1.0 - lr * wd,
            reason: "must be finite as an f32",
        });
    }
    // > 0: as for bc2_sqrt.
    let step = lr / (1.0 - opt.beta1.powf(t as f64));
    let neg_step = (-step) as f32;
    if !neg_step.is_finite() {
        return Err(Error::Value {
            name: "lr * lr_scale / (1 - beta1^t)",
            value: step,
            reason: "must be finite as an f32",
        });
    }
    Ok(PerTensor { decay, neg_step })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_torch_s() {
        let o = AdamW::default();
        assert_eq!(
            (o.lr, o.beta1, o.beta2, o.eps, o.weight_decay),
            (1e-3, 0.9, 0.999, 1e-8, 0.01)
        );
        assert!(o.validate().is_ok());
        assert_eq!(AdamW::new(5e-4).unwrap().lr, 5e-4);
    }

    #[test]
    fn bad_hyper_parameters_are_named() {
        let d = AdamW::default();
        let cases = [
            (AdamW { lr: f64::NAN, ..d }, "lr"),
            (AdamW { lr: -1e-3, ..d }, "lr"),
            (
                AdamW {
                    lr: f64::INFINITY,
                    ..d
                },
                "lr",
            ),
            (AdamW { beta1: 1.0, ..d }, "beta1"),
            (AdamW { beta1: -0.1, ..d }, "beta1"),
            (
                AdamW {
                    beta1: f64::NAN,
                    ..d
                },
                "beta1",
            ),
            (AdamW { beta2: 1.0, ..d }, "beta2"),
            (AdamW { beta2: 1.5, ..d }, "beta2"),
            (AdamW { eps: 0.0, ..d }, "eps"),
            (AdamW { eps: -1e-8, ..d }, "eps"),
            (AdamW { eps: 1e-50, ..d }, "eps"),
            (AdamW { eps: f64::NAN, ..d }, "eps"),
            (AdamW { eps: 1e39, ..d }, "eps"),
            (
                AdamW {
                    weight_decay: -0.01,
                    ..d
                },
                "weight_decay",
            ),
            (
                AdamW {
                    weight_decay: f64::INFINITY,
                    ..d
                },
                "weight_decay",
            ),
        ];
        for (opt, want) in cases {
            match opt.validate() {
                Err(Error::Value { name, .. }) => assert_eq!(name, want, "{opt:?}"),
                other => panic!("{opt:?}: {other:?}"),
            }
            assert!(shared(&opt, 1).is_err());
        }
        // Edge values that are fine.
        for opt in [
            AdamW { lr: 0.0, ..d },
            AdamW {
                beta1: 0.0,
                beta2: 0.0,
                ..d
            },
            AdamW {
                weight_decay: 0.0,
                ..d
            },
        ] {
            assert!(opt.validate().is_ok(), "{opt:?}");
        }
    }

    #[test]
    fn step_zero_and_bad_tensor_options_are_errors() {
        let d = AdamW::default();
        assert!(matches!(shared(&d, 0), Err(Error::Value { name: "t", .. })));
        for s in [f64::NAN, -1.0, f64::INFINITY] {
            assert!(matches!(
                per_tensor(&d, 1, &TensorOptions::new(s)),
                Err(Error::Value {
                    name: "lr_scale",
                    ..
                })
            ));
        }
        // lr_i / (1 - beta1^t) beyond f32.
        let big = AdamW { lr: 1e30, ..d };
        assert!(per_tensor(&big, 1, &TensorOptions::new(1e10)).is_err());
        // 1 - lr_i * wd beyond f32.
        let big = AdamW {
            lr: 1e20,
            weight_decay: 1e20,
            ..d
        };
        assert!(per_tensor(&big, 1_000_000, &TensorOptions::default()).is_err());
        // ... but not when the tensor's decay is off (and the step size fits).
        let ok = AdamW {
            lr: 1e10,
            weight_decay: 1e30,
            ..d
        };
        let c = per_tensor(&ok, 1_000_000, &TensorOptions::default().no_weight_decay()).unwrap();
        assert_eq!(c.decay, 1.0);
        // Any step count, however large, is fine.
        assert!(shared(&d, u64::MAX).is_ok());
        assert!(per_tensor(&d, u64::MAX, &TensorOptions::default()).is_ok());
    }

    #[test]
    fn constants_follow_torch() {
        let opt = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let s = shared(&opt, 3).unwrap();
        assert!(s.lerp_base_m);
        assert_eq!(s.lerp_coeff, (1.0f64 - 0.9) as f32);
        assert_eq!(s.c2, (1.0f64 - 0.999) as f32);
        assert_eq!(s.bc2_sqrt, (1.0 - 0.999f64.powi(3)).sqrt() as f32);
        let p = per_tensor(&opt, 3, &TensorOptions::new(16.0)).unwrap();
        assert_eq!(p.decay, (1.0 - 16e-3 * 0.1) as f32);
        assert_eq!(p.neg_step, (-16e-3 / (1.0 - 0.9f64.powi(3))) as f32);
        // beta1 < 0.5: lerp from g with coefficient w - 1 (exact).
        let s = shared(&AdamW { beta1: 0.3, ..opt }, 1).unwrap();
        assert!(!s.lerp_base_m);
        assert_eq!(s.lerp_coeff, (1.0f64 - 0.3) as f32 - 1.0);
        let p = per_tensor(&opt, 1, &TensorOptions::new(2.0).no_weight_decay()).unwrap();
        assert_eq!(p.decay, 1.0);
    }
}
