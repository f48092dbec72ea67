//! PiSSA (Meng et al., "Principal Singular values and Singular vectors Adaptation";
//! peft's `init_lora_weights="pissa"`): the adapter starts on W's principal subspace and
//! the frozen weight becomes the residual.
//!
//! For W [N, K] with the singular value decomposition `W = V diag(S) Uh`, rank r and the
//! LoRA scale s (peft's `scaling`, `alpha / r` or rsLoRA's `alpha / √r`):
//!
//! - `A = diag(√(S_r / s)) Uh_r` [r, K] and `B = V_r diag(√(S_r / s))` [N, r], so that
//!   `s · B A` is W's best rank-r approximation;
//! - `W_res = W − s · B A`, which replaces the frozen weight (QPiSSA: quantize `W_res`).
//!
//! [`init`] is the exact variant (peft's `"pissa"`), a full SVD in f64 on the host: the
//! CPU oracle, meant for tests and small layers (a 4096 × 11008 weight takes minutes).
//! Singular vectors are defined up to sign: `A`'s row j and `B`'s column j may both be
//! negated against another implementation's, and `B A` and `W_res` do not change.
//!
//! A trained PiSSA adapter belongs to the residual base. [`to_lora`] turns it into a
//! plain LoRA adapter over the *original* W, as peft's
//! `save_pretrained(path_initial_model_for_weight_conversion=...)` does:
//! `ΔW = s (B A − B₀ A₀) = s [B | −B₀] [A ; A₀]`, rank 2r with the same scale;
//! [`to_lora_adapter`] does it for a whole [`Adapter`] (r and alpha doubled, alpha by √2
//! under rsLoRA, as peft writes the config).

use nalgebra::DMatrix;

use crate::check::check_len;
use crate::peft::{Adapter, AdapterModule};
use crate::{Element, Error, Result};

/// PiSSA's initial adapter and residual weight (row-major, in W's type).
#[derive(Debug, Clone, PartialEq)]
pub struct PissaInit<T> {
    /// `lora_A.weight` [r, K].
    pub a: Vec<T>,
    /// `lora_B.weight` [N, r].
    pub b: Vec<T>,
    /// The residual `W − s · B A` [N, K] that replaces the frozen weight.
    pub w_res: Vec<T>,
    /// W's r largest singular values, descending.
    pub singular_values: Vec<f64>,
}

/// PiSSA's exact initialisation of a weight `w` [out_features, in_features] at `rank`
/// with LoRA scale `scale` (see the module docs). Errors, before any work: a length that
/// is not N·K (or N·K overflowing), rank 0 or above min(N, K), a scale that is not
/// finite and > 0, a NaN or infinite weight (its index).
pub fn init<T: Element>(
    w: &[T],
    out_features: usize,
    in_features: usize,
    rank: usize,
    scale: f32,
) -> Result<PissaInit<T>> {
    let (n, k) = (out_features, in_features);
    let numel = n.checked_mul(k).ok_or(Error::Dim {
        name: "out_features · in_features",
        value: n,
        reason: "overflows usize",
    })?;
    check_len("w", w.len(), numel)?;
    if rank == 0 || rank > n.min(k) {
        return Err(Error::Dim {
            name: "rank",
            value: rank,
            reason: "must be in 1..=min(out_features, in_features)",
        });
    }
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::Value {
            name: "scale",
            value: scale as f64,
            reason: "must be finite and > 0",
        });
    }
    if let Some(i) = w.iter().position(|v| !v.to_f64().is_finite()) {
        return Err(Error::Value {
            name: "w",
            value: i as f64,
            reason: "holds a NaN or infinite value at this index",
        });
    }
    let wf: Vec<f64> = w.iter().map(|v| v.to_f64()).collect();
    let svd = DMatrix::from_row_slice(n, k, &wf).svd(true, true);
    let (u, v_t) = match (svd.u, svd.v_t) {
        (Some(u), Some(v_t)) => (u, v_t),
        _ => unreachable!("both factors were asked for"),
    };
    let s = &svd.singular_values;
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
    let top = &order[..rank];
    let sc = scale as f64;
    let mut a = vec![T::from_f64(0.0); rank * k];
    let mut b = vec![T::from_f64(0.0); n * rank];
    for (j, &idx) in top.iter().enumerate() {
        let root = (s[idx] / sc).sqrt();
        for c in 0..k {
            a[j * k + c] = T::from_f64(root * v_t[(idx, c)]);
        }
        for row in 0..n {
            b[row * rank + j] = T::from_f64(u[(row, idx)] * root);
        }
    }
    // W_res from the rounded A and B, as the model will see them: W_res + s·B A ≈ W.
    let mut w_res = Vec::with_capacity(numel);
    for row in 0..n {
        for c in 0..k {
            let ba: f64 = (0..rank)
                .map(|j| b[row * rank + j].to_f64() * a[j * k + c].to_f64())
                .sum();
            w_res.push(T::from_f64(wf[row * k + c] - sc * ba));
        }
    }
    Ok(PissaInit {
        a,
        b,
        w_res,
        singular_values: top.iter().map(|&i| s[i]).collect(),
    })
}

/// A trained PiSSA module `(a, b)` and its initial `(a0, b0)` (each [r, K] and [N, r])
/// as plain LoRA over the original W: `A' = [a ; a0]` [2r, K], `B' = [b | −b0]` [N, 2r],
/// the same scale.
pub fn to_lora<T: Element>(
    rank: usize,
    in_features: usize,
    out_features: usize,
    (a, b): (&[T], &[T]),
    (a0, b0): (&[T], &[T]),
) -> Result<(Vec<T>, Vec<T>)> {
    let (r, k, n) = (rank, in_features, out_features);
    let a_len = r.checked_mul(k).ok_or(Error::Dim {
        name: "rank · in_features",
        value: r,
        reason: "overflows usize",
    })?;
    let b_len = n.checked_mul(r).ok_or(Error::Dim {
        name: "out_features · rank",
        value: n,
        reason: "overflows usize",
    })?;
    check_len("a", a.len(), a_len)?;
    check_len("a0", a0.len(), a_len)?;
    check_len("b", b.len(), b_len)?;
    check_len("b0", b0.len(), b_len)?;
    let mut a2 = Vec::with_capacity(2 * a_len);
    a2.extend_from_slice(a);
    a2.extend_from_slice(a0);
    let mut b2 = Vec::with_capacity(2 * b_len);
    for row in 0..n {
        b2.extend_from_slice(&b[row * r..(row + 1) * r]);
        b2.extend(
            b0[row * r..(row + 1) * r]
                .iter()
                .map(|v| T::from_f64(-v.to_f64())),
        );
    }
    Ok((a2, b2))
}

/// [`to_lora`] for every module of a trained PiSSA adapter and its initial state
/// (the same modules, ranks and shapes; no DoRA): a LoRA adapter over the original
/// weights, with `r` and the rank pattern doubled and `lora_alpha` and the alpha pattern
/// scaled to keep each module's scale: ×2, or ×√2 under rsLoRA. (peft scales
/// `lora_alpha` the same way but doubles an alpha pattern's values under rsLoRA too,
/// which changes those modules' scale by √2; here they keep it.)
pub fn to_lora_adapter<T: Element>(
    trained: &Adapter<T>,
    initial: &Adapter<T>,
) -> Result<Adapter<T>> {
    if trained.modules.len() != initial.modules.len() {
        return Err(Error::Checkpoint(format!(
            "PiSSA conversion: the trained adapter has {} modules, the initial one {}",
            trained.modules.len(),
            initial.modules.len()
        )));
    }
    let mut modules = Vec::with_capacity(trained.modules.len());
    for m in &trained.modules {
        let m0 = initial.module(&m.name).ok_or_else(|| {
            Error::Checkpoint(format!(
                "PiSSA conversion: module {} is not in the initial adapter",
                m.name
            ))
        })?;
        if (m0.rank, m0.in_features, m0.out_features) != (m.rank, m.in_features, m.out_features)
            || m.magnitude.is_some()
            || m0.magnitude.is_some()
        {
            return Err(Error::Checkpoint(format!(
                "PiSSA conversion: module {} differs in shape from its initial state, or is DoRA",
                m.name
            )));
        }
        let (a, b) = to_lora(
            m.rank,
            m.in_features,
            m.out_features,
            (&m.a, &m.b),
            (&m0.a, &m0.b),
        )?;
        modules.push(AdapterModule {
            name: m.name.clone(),
            rank: 2 * m.rank,
            in_features: m.in_features,
            out_features: m.out_features,
            scale: m.scale,
            a,
            b,
            magnitude: None,
        });
    }
    let mut config = trained.config.clone();
    // alpha / r (or alpha / √r) unchanged at twice the rank.
    let alpha_factor = if config.use_rslora {
        std::f32::consts::SQRT_2
    } else {
        2.0
    };
    config.r *= 2;
    config.lora_alpha *= alpha_factor;
    for v in config.rank_pattern.values_mut() {
        *v *= 2;
    }
    for v in config.alpha_pattern.values_mut() {
        *v *= alpha_factor;
    }
    // The converted adapter is plain LoRA over the original weights.
    config.other.remove("init_lora_weights");
    let out = Adapter { config, modules };
    out.validate()?;
    Ok(out)
}
