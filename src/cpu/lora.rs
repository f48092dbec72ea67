//! CPU oracle of the LoRA linear layer (see [`crate::lora`] for the math and layouts).

use crate::cpu::par_rows;
use crate::lora::{check_backward_lens, check_forward_lens, check_merge_lens, BackwardLens};
use crate::{Element, LoraGrads, LoraOptions, LoraShape, LoraWeights, Result};

fn f64s<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|e| e.to_f64()).collect()
}

/// `drop(x)` in f64: x times its dropout multiplier (x itself without dropout).
fn dropped_x<T: Element>(shape: &LoraShape, opts: &LoraOptions, x: &[T]) -> Vec<f64> {
    let mut out = f64s(x);
    if let Some(d) = opts.active_dropout() {
        for (e, v) in out.iter_mut().enumerate() {
            *v *= d.multiplier(e as u64) as f64;
        }
    }
    debug_assert_eq!(out.len(), shape.x_len());
    out
}

/// `h = drop(x) Aᵀ` in f64, [T, r].
fn h_f64<T: Element>(shape: &LoraShape, opts: &LoraOptions, x: &[T], a: &[T]) -> Vec<f64> {
    let (k, r) = (shape.in_features, shape.rank);
    let xd = dropped_x(shape, opts, x);
    let a = f64s(a);
    let mut h = vec![0.0f64; shape.h_len()];
    par_rows(&mut h, r, |t, row| {
        for (j, out) in row.iter_mut().enumerate() {
            *out = (0..k).map(|c| xd[t * k + c] * a[j * k + c]).sum();
        }
    });
    h
}

/// Forward: `y = x Wᵀ + bias + s · h Bᵀ`, `h = drop(x) Aᵀ`; writes `y` [T, N] and, if
/// given, `h` [T, r] (what [`backward`] takes).
pub fn forward<T: Element>(
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &[T],
    weights: LoraWeights<'_, [T]>,
    y: &mut [T],
    h: Option<&mut [T]>,
) -> Result<()> {
    check_forward_lens(
        shape,
        x.len(),
        weights.w.len(),
        weights.a.len(),
        weights.b.len(),
        weights.bias.map(|b| b.len()),
        y.len(),
        h.as_ref().map(|h| h.len()),
    )?;
    opts.validate()?;
    let (k, n, r) = (shape.in_features, shape.out_features, shape.rank);
    let s = opts.scale as f64;
    let hf = h_f64(shape, opts, x, weights.a);
    let xf = f64s(x);
    let w = f64s(weights.w);
    let b = f64s(weights.b);
    let bias = weights.bias.map(f64s);
    par_rows(y, n, |t, row| {
        for (o, out) in row.iter_mut().enumerate() {
            let base: f64 = (0..k).map(|c| xf[t * k + c] * w[o * k + c]).sum();
            let low: f64 = (0..r).map(|j| hf[t * r + j] * b[o * r + j]).sum();
            let bias = bias.as_ref().map_or(0.0, |bv| bv[o]);
            *out = T::from_f64(base + bias + s * low);
        }
    });
    if let Some(h) = h {
        for (dst, &src) in h.iter_mut().zip(&hf) {
            *dst = T::from_f64(src);
        }
    }
    Ok(())
}

/// Backward from `dy` [T, N]: dX, dA and dB (W and bias are frozen). `h` is what
/// [`forward`] returned; the dropout mask is regenerated from `opts`.
pub fn backward<T: Element>(
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &[T],
    weights: LoraWeights<'_, [T]>,
    h: &[T],
    dy: &[T],
    grads: LoraGrads<'_, [T]>,
) -> Result<()> {
    check_backward_lens(
        shape,
        &BackwardLens {
            x: x.len(),
            w: weights.w.len(),
            a: weights.a.len(),
            b: weights.b.len(),
            h: h.len(),
            dy: dy.len(),
            dx: grads.dx.len(),
            da: grads.da.len(),
            db: grads.db.len(),
        },
    )?;
    opts.validate()?;
    let (t_len, k, n, r) = shape.dims();
    let s = opts.scale as f64;
    let dropout = opts.active_dropout();
    let w = f64s(weights.w);
    let a = f64s(weights.a);
    let b = f64s(weights.b);
    let dyf = f64s(dy);
    let hf = f64s(h);
    let xd = dropped_x(shape, opts, x);

    // g = dY B, [T, r]
    let mut g = vec![0.0f64; shape.h_len()];
    par_rows(&mut g, r, |t, row| {
        for (j, out) in row.iter_mut().enumerate() {
            *out = (0..n).map(|o| dyf[t * n + o] * b[o * r + j]).sum();
        }
    });
    // dX = dY W + s · (g A) ⊙ mask / (1 − p); rows accumulated as sums of W's rows.
    par_rows(grads.dx, k, |t, row| {
        let mut acc = vec![0.0f64; k];
        for o in 0..n {
            let d = dyf[t * n + o];
            for (c, v) in acc.iter_mut().enumerate() {
                *v += d * w[o * k + c];
            }
        }
        let mut low = vec![0.0f64; k];
        for j in 0..r {
            for (c, v) in low.iter_mut().enumerate() {
                *v += g[t * r + j] * a[j * k + c];
            }
        }
        for (c, out) in row.iter_mut().enumerate() {
            let mul = dropout.map_or(1.0, |d| d.multiplier((t * k + c) as u64) as f64);
            *out = T::from_f64(acc[c] + s * low[c] * mul);
        }
    });
    // dA = s · gᵀ drop(x), [r, K]
    par_rows(grads.da, k, |j, row| {
        let mut acc = vec![0.0f64; k];
        for t in 0..t_len {
            let gv = g[t * r + j];
            for (c, v) in acc.iter_mut().enumerate() {
                *v += gv * xd[t * k + c];
            }
        }
        for (out, v) in row.iter_mut().zip(acc) {
            *out = T::from_f64(s * v);
        }
    });
    // dB = s · dYᵀ h, [N, r]
    let mut dyt = vec![0.0f64; dyf.len()];
    for t in 0..t_len {
        for o in 0..n {
            dyt[o * t_len + t] = dyf[t * n + o];
        }
    }
    par_rows(grads.db, r, |o, row| {
        for (j, out) in row.iter_mut().enumerate() {
            let v: f64 = (0..t_len).map(|t| dyt[o * t_len + t] * hf[t * r + j]).sum();
            *out = T::from_f64(s * v);
        }
    });
    Ok(())
}

/// Merge in place: `W += s · B A`, rounded once to W's type. `shape.tokens` is unused.
pub fn merge<T: Element>(
    shape: &LoraShape,
    scale: f32,
    w: &mut [T],
    a: &[T],
    b: &[T],
) -> Result<()> {
    check_merge_lens(shape, w.len(), a.len(), b.len())?;
    crate::lora::LoraOptions::new(scale).validate()?;
    let s = scale as f64;
    map_with_ba(shape, w, a, b, |_, w, ba| w + s * ba);
    Ok(())
}

/// `W[o, c] = f(o, W[o, c], (B A)[o, c])` in f64 over all of W, rounded once: the
/// element-wise step of every merge and unmerge (LoRA's and DoRA's).
pub(crate) fn map_with_ba<T: Element>(
    shape: &LoraShape,
    w: &mut [T],
    a: &[T],
    b: &[T],
    f: impl Fn(usize, f64, f64) -> f64 + Sync,
) {
    let (k, r) = (shape.in_features, shape.rank);
    let (a, b) = (f64s(a), f64s(b));
    par_rows(w, k, |o, row| {
        for (c, out) in row.iter_mut().enumerate() {
            let ba: f64 = (0..r).map(|j| b[o * r + j] * a[j * k + c]).sum();
            *out = T::from_f64(f(o, out.to_f64(), ba));
        }
    });
}

/// Unmerge in place: `W -= s · B A` (exact inverse of [`merge`] only up to rounding in
/// W's type).
pub fn unmerge<T: Element>(
    shape: &LoraShape,
    scale: f32,
    w: &mut [T],
    a: &[T],
    b: &[T],
) -> Result<()> {
    merge(shape, -scale, w, a, b)
}
