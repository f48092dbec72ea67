//! CPU oracle of DoRA (see [`crate::dora`] for the math and layouts). Every
//! intermediate is f64; each output is rounded once.

use crate::cpu::lora::map_with_ba;
use crate::cpu::par_rows;
use crate::dora::{
    check_backward, check_forward, check_weight_op, BackwardLens, DoraGrads, DoraOutputs,
    DoraSaved, DoraWeights, ForwardLens,
};
use crate::{Element, LoraOptions, LoraShape, Result};

fn f64s<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|e| e.to_f64()).collect()
}

/// Row norms of `W + s·BA` in f64, each from the elements of the row (no expansion).
fn norms_f64<T: Element>(shape: &LoraShape, scale: f32, w: &[T], a: &[T], b: &[T]) -> Vec<f64> {
    let (k, r) = (shape.in_features, shape.rank);
    let (a, b, s) = (f64s(a), f64s(b), scale as f64);
    let mut out = vec![0.0f64; shape.out_features];
    par_rows(&mut out, 1, |o, slot| {
        let mut sq = 0.0f64;
        for c in 0..k {
            let ba: f64 = (0..r).map(|j| b[o * r + j] * a[j * k + c]).sum();
            let v = w[o * k + c].to_f64() + s * ba;
            sq += v * v;
        }
        slot[0] = sq.sqrt();
    });
    out
}

/// The row norms `‖W_o + s·(BA)_o‖` \[N\], in f32.
pub fn weight_norm<T: Element>(
    shape: &LoraShape,
    scale: f32,
    w: &[T],
    a: &[T],
    b: &[T],
    norm: &mut [f32],
) -> Result<()> {
    check_weight_op(
        shape,
        scale,
        w.len(),
        a.len(),
        b.len(),
        ("norm", norm.len()),
    )?;
    write_norms(shape, scale, w, a, b, norm);
    Ok(())
}

/// The norms rounded once into `out` (f32 norms, or a magnitude in W's type).
fn write_norms<T: Element, O: Element>(
    shape: &LoraShape,
    scale: f32,
    w: &[T],
    a: &[T],
    b: &[T],
    out: &mut [O],
) {
    for (dst, v) in out.iter_mut().zip(norms_f64(shape, scale, w, a, b)) {
        *dst = O::from_f64(v);
    }
}

/// peft's magnitude initialisation: `m = ‖W + s·BA‖` per row (`‖W‖` while B is zero,
/// as it is at init), in W's type.
pub fn magnitude_init<T: Element>(
    shape: &LoraShape,
    scale: f32,
    w: &[T],
    a: &[T],
    b: &[T],
    m: &mut [T],
) -> Result<()> {
    check_weight_op(
        shape,
        scale,
        w.len(),
        a.len(),
        b.len(),
        ("magnitude", m.len()),
    )?;
    write_norms(shape, scale, w, a, b, m);
    Ok(())
}

/// `drop(x)` in f64 and the multipliers (all 1 without dropout).
fn dropped<T: Element>(shape: &LoraShape, opts: &LoraOptions, x: &[T]) -> (Vec<f64>, Vec<f64>) {
    let mult: Vec<f64> = match opts.active_dropout() {
        Some(d) => (0..shape.x_len())
            .map(|e| d.multiplier(e as u64) as f64)
            .collect(),
        None => vec![1.0; shape.x_len()],
    };
    let xd = x.iter().zip(&mult).map(|(v, m)| v.to_f64() * m).collect();
    (xd, mult)
}

/// `rows [T, cols]` times `mᵀ` for `m` [N, cols]: [T, N] in f64.
fn times_t(t: usize, cols: usize, rows: &[f64], m: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; t * n];
    par_rows(&mut out, n, |i, row| {
        for (o, v) in row.iter_mut().enumerate() {
            *v = (0..cols)
                .map(|c| rows[i * cols + c] * m[o * cols + c])
                .sum();
        }
    });
    out
}

/// Forward: writes `y` and, where asked, `h`, the norms and `z` (see [`crate::dora`]).
pub fn forward<T: Element>(
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &[T],
    weights: DoraWeights<'_, [T]>,
    out: DoraOutputs<'_, [T], [f32]>,
) -> Result<()> {
    check_forward(
        shape,
        opts,
        &ForwardLens {
            x: x.len(),
            w: weights.w.len(),
            a: weights.a.len(),
            b: weights.b.len(),
            bias: weights.bias.map(|b| b.len()),
            m: weights.magnitude.len(),
            y: out.y.len(),
            h: out.h.as_ref().map(|h| h.len()),
            norm: out.norm.as_ref().map(|n| n.len()),
            z: out.z.as_ref().map(|z| z.len()),
        },
    )?;
    let (t, k, n, r) = shape.dims();
    let s = opts.scale as f64;
    let norm = norms_f64(shape, opts.scale, weights.w, weights.a, weights.b);
    let m = f64s(weights.magnitude);
    let gsc: Vec<f64> = m.iter().zip(&norm).map(|(m, nrm)| m / nrm).collect();
    let (xd, _) = dropped(shape, opts, x);
    let xf = f64s(x);
    let w = f64s(weights.w);
    let h = times_t(t, k, &xd, &f64s(weights.a), r);
    let low = times_t(t, r, &h, &f64s(weights.b), n);
    let base_d = times_t(t, k, &xd, &w, n);
    let base = if opts.active_dropout().is_some() {
        times_t(t, k, &xf, &w, n)
    } else {
        base_d.clone()
    };
    let bias = weights.bias.map(f64s);
    par_rows(out.y, n, |i, row| {
        for (o, v) in row.iter_mut().enumerate() {
            let e = i * n + o;
            let b = bias.as_ref().map_or(0.0, |b| b[o]);
            *v = T::from_f64(base[e] + b + (gsc[o] - 1.0) * base_d[e] + gsc[o] * s * low[e]);
        }
    });
    if let Some(hout) = out.h {
        for (dst, v) in hout.iter_mut().zip(&h) {
            *dst = T::from_f64(*v);
        }
    }
    if let Some(nout) = out.norm {
        for (dst, v) in nout.iter_mut().zip(&norm) {
            *dst = *v as f32;
        }
    }
    if let Some(zout) = out.z {
        for (e, dst) in zout.iter_mut().enumerate() {
            *dst = T::from_f64(base_d[e] + s * low[e]);
        }
    }
    Ok(())
}

/// Backward from `dy` [T, N]: dX, dA, dB and dm, from what forward saved (`h`, the
/// norms, and `z` if given; else `z` is recomputed from x and `h`).
pub fn backward<T: Element>(
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &[T],
    weights: DoraWeights<'_, [T]>,
    saved: DoraSaved<'_, [T], [f32]>,
    dy: &[T],
    grads: DoraGrads<'_, [T]>,
) -> Result<()> {
    check_backward(
        shape,
        opts,
        &BackwardLens {
            x: x.len(),
            w: weights.w.len(),
            a: weights.a.len(),
            b: weights.b.len(),
            m: weights.magnitude.len(),
            h: saved.h.len(),
            norm: saved.norm.len(),
            z: saved.z.map(|z| z.len()),
            dy: dy.len(),
            dx: grads.dx.len(),
            da: grads.da.len(),
            db: grads.db.len(),
            dm: grads.dm.len(),
        },
    )?;
    let (t, k, n, r) = shape.dims();
    let s = opts.scale as f64;
    let norm: Vec<f64> = saved.norm.iter().map(|&v| v as f64).collect();
    let m = f64s(weights.magnitude);
    let gsc: Vec<f64> = m.iter().zip(&norm).map(|(m, nrm)| m / nrm).collect();
    let (xd, mult) = dropped(shape, opts, x);
    let w = f64s(weights.w);
    let a = f64s(weights.a);
    let b = f64s(weights.b);
    let h = f64s(saved.h);
    let dyf = f64s(dy);

    // z: given, or x_d Wᵀ + s · h Bᵀ.
    let z = match saved.z {
        Some(z) => f64s(z),
        None => {
            let base_d = times_t(t, k, &xd, &w, n);
            let low = times_t(t, r, &h, &b, n);
            base_d.iter().zip(&low).map(|(p, l)| p + s * l).collect()
        }
    };
    // dm = Σ_t dy ⊙ z / norm.
    let mut dm = vec![0.0f64; n];
    for i in 0..t {
        for o in 0..n {
            dm[o] += dyf[i * n + o] * z[i * n + o];
        }
    }
    for (o, dst) in grads.dm.iter_mut().enumerate() {
        *dst = T::from_f64(dm[o] / norm[o]);
    }
    // gl = dy (g ⊙ B), [T, r].
    let bg: Vec<f64> = (0..n * r).map(|e| gsc[e / r] * b[e]).collect();
    let mut gl = vec![0.0f64; t * r];
    par_rows(&mut gl, r, |i, row| {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (0..n).map(|o| dyf[i * n + o] * bg[o * r + j]).sum();
        }
    });
    // dX = dy W + ((dy ⊙ (g − 1)) W + s · gl A) ⊙ mult.
    par_rows(grads.dx, k, |i, row| {
        let mut plain = vec![0.0f64; k];
        let mut through = vec![0.0f64; k];
        for o in 0..n {
            let d = dyf[i * n + o];
            let dg = d * (gsc[o] - 1.0);
            for c in 0..k {
                plain[c] += d * w[o * k + c];
                through[c] += dg * w[o * k + c];
            }
        }
        for j in 0..r {
            for c in 0..k {
                through[c] += s * gl[i * r + j] * a[j * k + c];
            }
        }
        for (c, v) in row.iter_mut().enumerate() {
            *v = T::from_f64(plain[c] + through[c] * mult[i * k + c]);
        }
    });
    // dA = s · glᵀ drop(x), [r, K].
    par_rows(grads.da, k, |j, row| {
        for (c, v) in row.iter_mut().enumerate() {
            let acc: f64 = (0..t).map(|i| gl[i * r + j] * xd[i * k + c]).sum();
            *v = T::from_f64(s * acc);
        }
    });
    // dB = s · g ⊙ (dyᵀ h), [N, r].
    par_rows(grads.db, r, |o, row| {
        for (j, v) in row.iter_mut().enumerate() {
            let acc: f64 = (0..t).map(|i| dyf[i * n + o] * h[i * r + j]).sum();
            *v = T::from_f64(s * gsc[o] * acc);
        }
    });
    Ok(())
}

/// Merge in place: `W' = (m / ‖W + s·BA‖) ⊙ (W + s·BA)`, rounded once to W's type.
/// Writes the norms \[N\] (of the unmerged W), which [`unmerge`] needs.
pub fn merge<T: Element>(
    shape: &LoraShape,
    scale: f32,
    w: &mut [T],
    a: &[T],
    b: &[T],
    magnitude: &[T],
    norm: &mut [f32],
) -> Result<()> {
    check_weight_op(
        shape,
        scale,
        w.len(),
        a.len(),
        b.len(),
        ("norm", norm.len()),
    )?;
    crate::lora::check_len("magnitude", magnitude.len(), shape.out_features)?;
    let nrm = norms_f64(shape, scale, w, a, b);
    for (dst, v) in norm.iter_mut().zip(&nrm) {
        *dst = *v as f32;
    }
    let (s, m) = (scale as f64, f64s(magnitude));
    map_with_ba(shape, w, a, b, |o, w, ba| m[o] / nrm[o] * (w + s * ba));
    Ok(())
}

/// Unmerge in place: `W = W' · (‖·‖ / m) − s·BA`, with the norms [`merge`] wrote (peft
/// caches them the same way). A row whose magnitude is 0 was zeroed by the merge and
/// cannot be recovered: it comes back non-finite.
pub fn unmerge<T: Element>(
    shape: &LoraShape,
    scale: f32,
    w: &mut [T],
    a: &[T],
    b: &[T],
    magnitude: &[T],
    norm: &[f32],
) -> Result<()> {
    check_weight_op(
        shape,
        scale,
        w.len(),
        a.len(),
        b.len(),
        ("norm", norm.len()),
    )?;
    crate::lora::check_len("magnitude", magnitude.len(), shape.out_features)?;
    let (s, m) = (scale as f64, f64s(magnitude));
    map_with_ba(shape, w, a, b, |o, w, ba| {
        w * (norm[o] as f64 / m[o]) - s * ba
    });
    Ok(())
}
