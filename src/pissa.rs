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
//! [`init_randomized`] is peft's `"pissa_niter_<k>"`: randomized subspace iteration
//! (Halko et al., as `torch.svd_lowrank(W, q=r, niter=k)`) from a seeded Gaussian start,
//! then the small SVD; on the host in f64 too.
//!
//! QPiSSA quantizes the residual instead of W: [`quantize_residual`] gives the NF4
//! residual (bitsandbytes' format) and the quantization error of both schemes,
//! `‖W − deq(Q(W))‖` for plain QLoRA against `‖W − deq(Q(W_res)) − s·B A‖`.
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
use crate::nf4::Nf4Weight;
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
    let wf = check_init(w, out_features, in_features, rank, scale)?;
    let (n, k) = (out_features, in_features);
    let svd = DMatrix::from_row_slice(n, k, &wf).svd(true, true);
    let (u, v_t) = match (svd.u, svd.v_t) {
        (Some(u), Some(v_t)) => (u, v_t),
        _ => unreachable!("both factors were asked for"),
    };
    Ok(assemble(
        &wf,
        n,
        k,
        rank,
        scale,
        &u,
        &svd.singular_values,
        &v_t,
    ))
}

/// peft's `"pissa_niter_<niter>"`: as [`init`], with W's top-r singular triplets from
/// randomized subspace iteration (`torch.svd_lowrank(W, q=r, niter)`'s algorithm: a
/// Gaussian [K, r] start from `seed`, `niter` rounds of `Q ← orth(W orth(Wᵀ Q))`, then
/// the SVD of `Qᵀ W` [r, K]). Close to [`init`] where W's spectrum has a gap after the
/// r-th value; the same checks as [`init`].
pub fn init_randomized<T: Element>(
    w: &[T],
    out_features: usize,
    in_features: usize,
    rank: usize,
    scale: f32,
    niter: usize,
    seed: u64,
) -> Result<PissaInit<T>> {
    let wf = check_init(w, out_features, in_features, rank, scale)?;
    let (n, k) = (out_features, in_features);
    let wm = DMatrix::from_row_slice(n, k, &wf);
    let mut rng = crate::philox::SplitMix(seed);
    let omega = DMatrix::from_fn(k, rank, |_, _| rng.gaussian());
    let orth = |m: DMatrix<f64>| m.qr().q();
    let mut q = orth(&wm * omega);
    for _ in 0..niter {
        q = orth(wm.transpose() * &q);
        q = orth(&wm * &q);
    }
    let small = q.transpose() * &wm; // [r, K]
    let svd = small.svd(true, true);
    let (ub, v_t) = match (svd.u, svd.v_t) {
        (Some(u), Some(v_t)) => (u, v_t),
        _ => unreachable!("both factors were asked for"),
    };
    let u = q * ub;
    Ok(assemble(
        &wf,
        n,
        k,
        rank,
        scale,
        &u,
        &svd.singular_values,
        &v_t,
    ))
}

/// The argument checks of [`init`]; W in f64.
fn check_init<T: Element>(
    w: &[T],
    n: usize,
    k: usize,
    rank: usize,
    scale: f32,
) -> Result<Vec<f64>> {
    let numel = elems("out_features · in_features", n, k)?;
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
    Ok(w.iter().map(|v| v.to_f64()).collect())
}

/// A, B and W_res from singular triplets (`u` [N, m], `s` [m], `v_t` [m, K], any order):
/// the r largest.
#[allow(clippy::too_many_arguments)]
fn assemble<T: Element>(
    wf: &[f64],
    n: usize,
    k: usize,
    rank: usize,
    scale: f32,
    u: &DMatrix<f64>,
    s: &nalgebra::DVector<f64>,
    v_t: &DMatrix<f64>,
) -> PissaInit<T> {
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
    let mut w_res = Vec::with_capacity(n * k);
    for row in 0..n {
        for c in 0..k {
            let ba = ba_at(&a, &b, rank, k, row, c);
            w_res.push(T::from_f64(wf[row * k + c] - sc * ba));
        }
    }
    PissaInit {
        a,
        b,
        w_res,
        singular_values: top.iter().map(|&i| s[i]).collect(),
    }
}

/// QPiSSA: the PiSSA adapter `init` computed for W, its residual quantized to NF4
/// (bitsandbytes' format: `blocksize`, double quantization or not), and the relative
/// quantization errors of both schemes.
#[derive(Debug, Clone)]
pub struct QpissaInit<T> {
    /// The adapter (and the dense residual it was quantized from).
    pub init: PissaInit<T>,
    /// `W_res` in NF4: the frozen base QPiSSA trains over.
    pub w_res_nf4: Nf4Weight,
    /// Plain QLoRA's error, `‖W − deq(Q(W))‖_F / ‖W‖_F`.
    pub qlora_error: f64,
    /// QPiSSA's, `‖W − deq(Q(W_res)) − s·B A‖_F / ‖W‖_F`.
    pub qpissa_error: f64,
}

/// QPiSSA's initialisation from an [`init`] or [`init_randomized`] result `init` of `w`
/// [N, K]: the residual quantized as [`Nf4Weight::quantize`] does, and both schemes'
/// errors (see [`QpissaInit`]). Errors as [`Nf4Weight::quantize`], and if `init` does
/// not belong to an N × K weight.
pub fn quantize_residual<T: Element>(
    w: &[T],
    out_features: usize,
    in_features: usize,
    scale: f32,
    init: PissaInit<T>,
    blocksize: usize,
    double_quant: bool,
) -> Result<QpissaInit<T>> {
    let (n, k) = (out_features, in_features);
    let numel = elems("out_features · in_features", n, k)?;
    check_len("w", w.len(), numel)?;
    check_len("init.w_res", init.w_res.len(), numel)?;
    let r = init.singular_values.len();
    check_len("init.a", init.a.len(), r.saturating_mul(k))?;
    check_len("init.b", init.b.len(), n.saturating_mul(r))?;
    let q_w = Nf4Weight::quantize(w, n, k, blocksize, double_quant)?;
    let q_res = Nf4Weight::quantize(&init.w_res, n, k, blocksize, double_quant)?;
    let (deq_w, deq_res) = (q_w.dequantize::<f32>()?, q_res.dequantize::<f32>()?);
    let sc = scale as f64;
    let (mut norm, mut e_lora, mut e_pissa) = (0f64, 0f64, 0f64);
    for row in 0..n {
        for c in 0..k {
            let i = row * k + c;
            let wv = w[i].to_f64();
            let ba = ba_at(&init.a, &init.b, r, k, row, c);
            norm += wv * wv;
            e_lora += (wv - deq_w[i] as f64).powi(2);
            e_pissa += (wv - deq_res[i] as f64 - sc * ba).powi(2);
        }
    }
    let norm = norm.sqrt().max(f64::MIN_POSITIVE);
    Ok(QpissaInit {
        init,
        w_res_nf4: q_res,
        qlora_error: e_lora.sqrt() / norm,
        qpissa_error: e_pissa.sqrt() / norm,
    })
}

/// `(B A)[row, c]` in f64 for A [r, K] and B [N, r].
fn ba_at<T: Element>(a: &[T], b: &[T], r: usize, k: usize, row: usize, c: usize) -> f64 {
    (0..r)
        .map(|j| b[row * r + j].to_f64() * a[j * k + c].to_f64())
        .sum()
}

/// `a · b`, or an [`Error::Dim`] naming the product when it overflows usize.
fn elems(name: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or(Error::Dim {
        name,
        value: a,
        reason: "overflows usize",
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
    let a_len = elems("rank · in_features", r, k)?;
    let b_len = elems("out_features · rank", n, r)?;
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
