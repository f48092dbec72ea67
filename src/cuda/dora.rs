//! CUDA ops of DoRA. Same arguments as [`crate::cpu::dora`]; see [`crate::dora`] for
//! the math and layouts.
//!
//! Paths:
//! - the row norms: one kernel reads W once and forms each element of `W + s·BA` in f32,
//!   summing squares: for f16/bf16 (K % 8 == 0, W and A 16-byte aligned) `BA` comes from
//!   tensor cores 16 rows × 32 columns at a time; otherwise B's rows sit in shared
//!   memory and A is read once per block of 8 rows (SIMT);
//! - forward without dropout, T ≤ 32, f16/bf16 (K % 8 == 0, r % 8 == 0, r ≤ 32, aligned):
//!   the LoRA linear's fused small-T tensor-core kernel, extended: one pass over W gives
//!   the base product, the low-rank term, each row's norm (the same tensor-core norm
//!   as above, on W's registers) and the scale, and writes y (and z, the norms) once;
//! - forward without dropout, T > 32, where the LoRA linear takes the GEMM core (sm_90,
//!   f16/bf16, r ≤ 64, K % 8 == 0, aligned, enough tiles): the norms and `g = m/‖·‖`
//!   in one launch, the down kernel, then one core GEMM with the low-rank K-slice whose epilogue writes
//!   `y = g ⊙ acc + bias` (and `z = acc` when asked): y is written once;
//! - other forwards without dropout: the norms, the LoRA linear's forward without bias
//!   (its small-T kernels or its large-T cuBLAS path), then one pass over y applying the
//!   scale and the bias (saving `z` on the way when asked);
//! - forward under dropout (peft's formula, two base products): `h` from the LoRA
//!   down kernel, `z = (1/(1−p))·x_m Wᵀ + s·h Bᵀ` with `x_m` the masked x (scratch
//!   [T, K]), `y = (g − 1)⊙z + bias + s·h Bᵀ + x Wᵀ`;
//! - backward: `dB = s·g⊙(dyᵀh)` on [N, r] scratch and `gl = dy (g⊙B)` [T, r], then
//!   token chunks of at most [`BACKWARD_CHUNK_ELEMS`] / max(N, K) rows: `z` (given, or
//!   recomputed), one pass writing `dy⊙g` (or `dy⊙(g−1)` under dropout) and the chunk's
//!   deterministic partial sums of `dy⊙z`, and the chunk's dX by cuBLAS. Where the NN
//!   GEMM core can take dX (sm_90, f16/bf16, dense W, no dropout, K and N multiples of 8,
//!   enough tiles; see `lora::backward`), each chunk's `dX = (dy⊙g) W + G A` is one
//!   core launch instead, with `G = s·gl = s·(dy⊙g) B` for the chunk computed inside it
//!   (or by cuBLAS just before), and `dA = Gᵀ x` after the chunks. dm is the sum of the
//!   partials over the norm. No [N, K] temporary is ever formed.
//!
//! Extra device memory: forward O(N + T·r) (plus [T, K] under dropout); backward
//! O(N·r + T·r) plus the chunk buffers, at most 2 × [`BACKWARD_CHUNK_ELEMS`] elements
//! (3 × under dropout when `z` is not given).

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, SyncOnDrop};

use super::base::for_each_panel;
use super::kernel::*;
use super::lora::{
    core_takes, dora_fused_small, dx_core_takes, forward_core_launch, forward_large, forward_small,
    launch_down, launch_dx_core, launch_g, launch_merge, launch_tn, DoraPtrs, DxWeight, FwdPtrs,
    MergeMode,
};
use super::plan::{Path, Plan};
use super::{dptr, dptr_mut, gemm_rm, gemm_rm_ld, grid_1d, lk_dropout, Gpu, LkNf4};
use super::{
    LkDoraDmParams, LkDoraDropParams, LkDoraDyzParams, LkDoraNormParams, LkDoraRowScaleParams,
    LkDoraScaleParams,
};
use crate::dora::{
    check_backward, check_forward, check_weight_op, BackwardLens, DoraGrads, DoraOutputs,
    DoraSaved, DoraWeights, ForwardLens,
};
use crate::lora::check_len;
use crate::tuning::CorePolicy;
use crate::{Element, LoraOptions, LoraShape, Result};

/// The most elements of one backward chunk buffer ([chunk, N] or [chunk, K]): 2²⁵, 64 MiB
/// in bf16 (8192 tokens of a 4096-wide layer in one chunk). Smaller chunks give each
/// chunk's dX launch too few tiles to fill the GPU.
pub const BACKWARD_CHUNK_ELEMS: usize = 1 << 25;

const NORM_ROWS: usize = 8;
const DYZ_ROWS: usize = 32;

/// `norm[n] = ‖W_n + s·(BA)_n‖` (f32), and `m_out = norm` in W's type when given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_norm<T: Element>(
    gpu: &Gpu,
    shape: &LoraShape,
    scale: f32,
    w: u64,
    a: u64,
    b: u64,
    norm: u64,
    m_out: u64,
) -> Result<()> {
    launch_norm_g::<T>(gpu, shape, scale, w, a, b, norm, m_out, None)
}

/// [`launch_norm`], and with `g = Some((mag, g_out))` also the DoRA scale
/// `g_out[n] = mag[n] / norm[n]` (f32) from the same launch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_norm_g<T: Element>(
    gpu: &Gpu,
    shape: &LoraShape,
    scale: f32,
    w: u64,
    a: u64,
    b: u64,
    norm: u64,
    m_out: u64,
    g: Option<(u64, u64)>,
) -> Result<()> {
    let (mag, g_out) = g.unwrap_or((0, 0));
    let params = LkDoraNormParams {
        w: w as *const _,
        a: a as *const _,
        b: b as *const _,
        norm: norm as *mut f32,
        m_out: m_out as *mut _,
        mag: mag as *const _,
        g_out: g_out as *mut f32,
        n: shape.out_features as i32,
        k: shape.in_features as i32,
        r: shape.rank as i32,
        scale,
    };
    // Tensor cores for f16/bf16 when W's and A's rows are 16-byte aligned.
    let mma = T::DTYPE != crate::DType::F32
        && shape.in_features.is_multiple_of(8)
        && w.is_multiple_of(16)
        && a.is_multiple_of(16);
    if mma {
        // Rank steps of 16: k1, k2, k4 or k16.
        let kernel = match shape.rank {
            0..=16 => LK_DORA_NORM_MMA_K1,
            17..=32 => LK_DORA_NORM_MMA_K2,
            33..=64 => LK_DORA_NORM_MMA_K4,
            _ => LK_DORA_NORM_MMA_K16,
        };
        let cfg = LaunchConfig {
            grid_dim: (shape.out_features.div_ceil(16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        return gpu.launch(kernel.of::<T>()?, cfg, &params);
    }
    let cfg = LaunchConfig {
        grid_dim: (shape.out_features.div_ceil(NORM_ROWS) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: (NORM_ROWS * shape.rank * 4) as u32,
    };
    gpu.launch(LK_DORA_NORM.of::<T>()?, cfg, &params)
}

/// `y = (m/norm − minus_one) ⊙ y + bias` over [t, n], saving y into `z` first if given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_scale<T: Element>(
    gpu: &Gpu,
    t: usize,
    n: usize,
    y: u64,
    z: u64,
    bias: u64,
    mag: u64,
    norm: u64,
    minus_one: f32,
) -> Result<()> {
    let params = LkDoraScaleParams {
        y: y as *mut _,
        z_out: z as *mut _,
        bias: bias as *const _,
        mag: mag as *const _,
        norm: norm as *const f32,
        t: t as i64,
        n: n as i32,
        minus_one,
    };
    gpu.launch(
        LK_DORA_SCALE.of::<T>()?,
        grid_1d(t * n, 256, gpu.sm_count() * 8),
        &params,
    )
}

/// `out[n, j] = (m/norm)[n] · b[n, j]` over [n, r] (`out` may be `b`).
fn launch_rowscale<T: Element>(
    gpu: &Gpu,
    shape: &LoraShape,
    b: u64,
    out: u64,
    mag: u64,
    norm: u64,
) -> Result<()> {
    let params = LkDoraRowScaleParams {
        b: b as *const _,
        out: out as *mut _,
        mag: mag as *const _,
        norm: norm as *const f32,
        n: shape.out_features as i32,
        r: shape.rank as i32,
    };
    gpu.launch(
        LK_DORA_ROWSCALE.of::<T>()?,
        grid_1d(shape.b_len(), 256, gpu.sm_count() * 8),
        &params,
    )
}

/// Rows t0 .. t0 + t of x (or of dX, in place) with the dropped elements zeroed.
#[allow(clippy::too_many_arguments)]
fn launch_drop<T: Element>(
    gpu: &Gpu,
    input: u64,
    out: u64,
    t0: usize,
    t: usize,
    cols: usize,
    dropout: crate::Dropout,
) -> Result<()> {
    let params = LkDoraDropParams {
        in_: input as *const _,
        out: out as *mut _,
        t0: t0 as i64,
        t: t as i32,
        cols: cols as i32,
        dropout: lk_dropout(Some(dropout)),
    };
    gpu.launch(
        LK_DORA_DROP.of::<T>()?,
        grid_1d(t * cols, 256, gpu.sm_count() * 8),
        &params,
    )
}

fn offset<T>(base: u64, elems: usize) -> u64 {
    base + (elems * std::mem::size_of::<T>()) as u64
}

/// The frozen base weight of a DoRA layer, as the ops that read it see it: dense W, or
/// NF4 read through row panels dequantized into bounded scratch (QDoRA; see
/// [`crate::cuda::qdora`]).
pub(crate) enum Base {
    /// Address of W [N, K] in T.
    Dense(u64),
    /// The NF4 weight's device descriptor and the call's panel bound (elements).
    Nf4(LkNf4, usize),
}

impl Base {
    /// `c[t, n] = alpha · x[t, k] Wᵀ + beta · c` (x row stride k, c row stride n).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn xwt<T: Element>(
        &self,
        gpu: &Gpu,
        t: usize,
        n: usize,
        k: usize,
        alpha: f32,
        x: u64,
        beta: f32,
        c: u64,
    ) -> Result<()> {
        match self {
            Base::Dense(w) => gemm_rm::<T>(gpu, t, n, k, alpha, x, false, *w, true, beta, c),
            // Each panel owns its columns of c: beta applies to every panel.
            Base::Nf4(desc, limit) => for_each_panel::<T>(gpu, *limit, desc, |_, n0, nc, pp| {
                gemm_rm_ld::<T>(
                    gpu,
                    t,
                    nc,
                    k,
                    alpha,
                    (x, k),
                    false,
                    (pp, k),
                    true,
                    beta,
                    (offset::<T>(c, n0), n),
                )
            }),
        }
    }

    /// `c[t, k] = alpha · d[t, n] W + beta · c` (d row stride n, c row stride k).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dw<T: Element>(
        &self,
        gpu: &Gpu,
        t: usize,
        k: usize,
        n: usize,
        alpha: f32,
        d: u64,
        beta: f32,
        c: u64,
    ) -> Result<()> {
        match self {
            Base::Dense(w) => gemm_rm::<T>(gpu, t, k, n, alpha, d, false, *w, false, beta, c),
            // The panels' products are summed into c: beta on the first only.
            Base::Nf4(desc, limit) => for_each_panel::<T>(gpu, *limit, desc, |i, n0, nc, pp| {
                gemm_rm_ld::<T>(
                    gpu,
                    t,
                    k,
                    nc,
                    alpha,
                    (offset::<T>(d, n0), n),
                    false,
                    (pp, k),
                    false,
                    if i == 0 { beta } else { 1.0 },
                    (c, k),
                )
            }),
        }
    }

    /// The row norms `‖W + s·BA‖` into `norm` \[N\] (f32), and into `m_out` in T if
    /// nonzero.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn norm<T: Element>(
        &self,
        gpu: &Gpu,
        shape: &LoraShape,
        scale: f32,
        a: u64,
        b: u64,
        norm: u64,
        m_out: u64,
    ) -> Result<()> {
        match self {
            Base::Dense(w) => launch_norm::<T>(gpu, shape, scale, *w, a, b, norm, m_out),
            Base::Nf4(desc, limit) => for_each_panel::<T>(gpu, *limit, desc, |_, n0, nc, pp| {
                let sub = LoraShape {
                    out_features: nc,
                    ..*shape
                };
                let m_sub = if m_out == 0 {
                    0
                } else {
                    offset::<T>(m_out, n0)
                };
                launch_norm::<T>(
                    gpu,
                    &sub,
                    scale,
                    pp,
                    a,
                    offset::<T>(b, n0 * shape.rank),
                    offset::<f32>(norm, n0),
                    m_sub,
                )
            }),
        }
    }
}

/// The row norms `‖W + s·BA‖` \[N\] into an f32 buffer.
pub fn weight_norm<T: Element, I: DevicePtr<T>, F: DevicePtrMut<f32>>(
    gpu: &Gpu,
    shape: &LoraShape,
    scale: f32,
    w: &I,
    a: &I,
    b: &I,
    norm: &mut F,
) -> Result<()> {
    check_weight_op(
        shape,
        scale,
        w.len(),
        a.len(),
        b.len(),
        ("norm", norm.len()),
    )?;
    let (wp, _gw) = dptr(gpu, "w", w)?;
    let (ap, _ga) = dptr(gpu, "a", a)?;
    let (bp, _gb) = dptr(gpu, "b", b)?;
    let (np, _gn) = dptr_mut(gpu, "norm", norm)?;
    launch_norm::<T>(gpu, shape, scale, wp, ap, bp, np, 0)
}

/// peft's magnitude initialisation: `m = ‖W + s·BA‖` per row, in W's type.
pub fn magnitude_init<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
    gpu: &Gpu,
    shape: &LoraShape,
    scale: f32,
    w: &I,
    a: &I,
    b: &I,
    magnitude: &mut O,
) -> Result<()> {
    check_weight_op(
        shape,
        scale,
        w.len(),
        a.len(),
        b.len(),
        ("magnitude", magnitude.len()),
    )?;
    let (wp, _gw) = dptr(gpu, "w", w)?;
    let (ap, _ga) = dptr(gpu, "a", a)?;
    let (bp, _gb) = dptr(gpu, "b", b)?;
    let (mp, _gm) = dptr_mut(gpu, "magnitude", magnitude)?;
    // SAFETY of the scratch: the norm kernel writes all N entries.
    let norm = gpu.scratch::<f32>(shape.out_features)?;
    let (np, _gn) = dptr(gpu, "norm", &norm)?;
    launch_norm::<T>(gpu, shape, scale, wp, ap, bp, np, mp)
}

/// Forward: writes `y` and, where asked, `h`, the norms and `z` (see [`crate::dora`]).
/// Queued on the GPU's stream; returns the [`Plan`] taken ([`Path::SmallFused`] for the
/// one-pass kernel, [`Path::Core`], or [`Path::Cublas`] for the composition).
/// [`CorePolicy::Require`] errors (before any launch) where the core cannot take the
/// call: under dropout, or where the LoRA linear's core rule fails.
pub fn forward<T, I, O, F>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &I,
    weights: DoraWeights<'_, I>,
    out: DoraOutputs<'_, O, F>,
) -> Result<Plan>
where
    T: Element,
    I: DevicePtr<T>,
    O: DevicePtrMut<T>,
    F: DevicePtrMut<f32>,
{
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
    let (t, n, r) = (shape.tokens, shape.out_features, shape.rank);
    let (xp, _gx) = dptr(gpu, "x", x)?;
    let (wp, _gw) = dptr(gpu, "w", weights.w)?;
    let (ap, _ga) = dptr(gpu, "a", weights.a)?;
    let (bp, _gb) = dptr(gpu, "b", weights.b)?;
    let (mp, _gm) = dptr(gpu, "magnitude", weights.magnitude)?;
    let bias = match weights.bias {
        Some(bias) => Some(dptr(gpu, "bias", bias)?),
        None => None,
    };
    let biasp = bias.as_ref().map_or(0, |b| b.0);
    let DoraOutputs {
        y,
        h,
        norm,
        z: z_out,
    } = out;
    // SAFETY of the scratch: the norm kernel writes all N entries before any read.
    let norm_scratch;
    let norm_dev = match norm {
        Some(nb) => Some(dptr_mut(gpu, "norm", nb)?),
        None => None,
    };
    let np = match &norm_dev {
        Some(d) => d.0,
        None => {
            norm_scratch = gpu.scratch::<f32>(n)?;
            dptr(gpu, "norm", &norm_scratch)?.0
        }
    };
    let zp = match z_out {
        Some(z) => Some(dptr_mut(gpu, "z", z)?),
        None => None,
    };
    let zptr = zp.as_ref().map_or(0, |z| z.0);
    let (yp, _gy) = dptr_mut(gpu, "y", y)?;
    let hd = match h {
        Some(h) => Some(dptr_mut(gpu, "h", h)?),
        None => None,
    };
    let hp = hd.as_ref().map_or(0, |h| h.0);
    // The LoRA linear's view of the call (the paths without dropout start from it).
    let lora_ptrs = FwdPtrs {
        x: xp,
        w: wp,
        a: ap,
        b: bp,
        bias: biasp,
        y: yp,
        h: hp,
        dora: None,
        nf4: None,
    };
    let tuning = &opts.tuning;
    let core_ok = core_takes::<T>(gpu, tuning, shape, &lora_ptrs) && (zptr == 0 || zptr % 4 == 0);
    if tuning.core == CorePolicy::Require && (!core_ok || opts.active_dropout().is_some()) {
        return Err(super::plan::core_required_error::<T>(
            "dora::forward",
            gpu,
            shape,
            opts,
        ));
    }
    match opts.active_dropout() {
        None if shape.tokens <= super::lora::SMALL_T_MAX && tuning.core != CorePolicy::Require => {
            // One pass over W: base product, low-rank term, norm and scale together,
            // when the tensor-core kernel takes the shape; else the composition below.
            let mut ptrs = FwdPtrs {
                dora: Some(DoraPtrs {
                    mag: mp,
                    norm: np,
                    z: zptr,
                    rank_steps: r.div_ceil(16),
                }),
                ..lora_ptrs
            };
            if dora_fused_small::<T>(shape, &ptrs) {
                forward_small::<T>(gpu, shape, opts, &ptrs)?;
                return Ok(Plan::of(Path::SmallFused));
            }
            // The composition: norms, then the LoRA small-T kernel, then the scale.
            launch_norm::<T>(gpu, shape, opts.scale, wp, ap, bp, np, 0)?;
            ptrs.dora = None;
            ptrs.bias = 0;
            forward_small::<T>(gpu, shape, opts, &ptrs)?;
            launch_scale::<T>(gpu, t, n, yp, zptr, biasp, mp, np, 0.0)?;
            Ok(Plan::of(Path::SmallFused))
        }
        None => {
            if core_ok {
                // The GEMM core: norms and g = m/‖·‖ in one launch, then one GEMM with
                // the low-rank slice whose epilogue writes y = g ⊙ acc + bias (and
                // z = acc when asked): y is written once, no scale pass over it.
                // SAFETY of the scratch: the norm kernel writes all N entries of g.
                let g = gpu.scratch::<f32>(n)?;
                let (gp, _gg) = dptr(gpu, "g", &g)?;
                launch_norm_g::<T>(gpu, shape, opts.scale, wp, ap, bp, np, 0, Some((mp, gp)))?;
                return forward_core_launch::<T>(gpu, shape, opts, &lora_ptrs, gp, zptr);
            }
            launch_norm::<T>(gpu, shape, opts.scale, wp, ap, bp, np, 0)?;
            // y = z = x Wᵀ + s·h Bᵀ by the LoRA linear's large-T cuBLAS path (no bias),
            // then the scale.
            let k = shape.in_features;
            let no_bias = FwdPtrs {
                bias: 0,
                ..lora_ptrs
            };
            forward_large::<T>(gpu, shape, opts, &no_bias, || {
                gemm_rm::<T>(gpu, t, n, k, 1.0, xp, false, wp, true, 1.0, yp)
            })?;
            launch_scale::<T>(gpu, t, n, yp, zptr, biasp, mp, np, 0.0)?;
            Ok(Plan::of(Path::Cublas))
        }
        Some(d) => {
            launch_norm::<T>(gpu, shape, opts.scale, wp, ap, bp, np, 0)?;
            let p = DropFwdPtrs {
                x: xp,
                a: ap,
                b: bp,
                m: mp,
                norm: np,
                bias: biasp,
                y: yp,
                h: hp,
                z: zptr,
            };
            forward_dropout::<T>(gpu, shape, opts, d, &p, &Base::Dense(wp))?;
            Ok(Plan::of(Path::Cublas))
        }
    }
}

/// Device addresses of a forward under dropout (`h`, `z`, `bias`: 0 when absent).
pub(crate) struct DropFwdPtrs {
    pub x: u64,
    pub a: u64,
    pub b: u64,
    pub m: u64,
    pub norm: u64,
    pub bias: u64,
    pub y: u64,
    pub h: u64,
    pub z: u64,
}

/// Forward under dropout, peft's formula with two base products, over any base; the
/// norms are already in `p.norm`.
pub(crate) fn forward_dropout<T: Element>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    d: crate::Dropout,
    p: &DropFwdPtrs,
    base: &Base,
) -> Result<()> {
    let (t, k, n, r) = shape.dims();
    let (xp, ap, bp, mp, np, biasp, yp, zptr) = (p.x, p.a, p.b, p.m, p.norm, p.bias, p.y, p.z);
    // SAFETY of the scratch: `down` writes all T·r entries of h.
    let h_scratch;
    let hp = if p.h != 0 {
        p.h
    } else {
        h_scratch = gpu.scratch::<T>(shape.h_len())?;
        dptr(gpu, "h", &h_scratch)?.0
    };
    launch_down::<T>(
        gpu,
        xp,
        k as i64,
        ap,
        k as i64,
        1,
        t,
        k,
        r,
        1.0,
        hp,
        Some(d),
    )?;
    // SAFETY of the scratch: the drop kernel writes all T·K entries of x_m.
    let xm = gpu.scratch::<T>(shape.x_len())?;
    let (xmp, _gxm) = dptr(gpu, "x_m", &xm)?;
    launch_drop::<T>(gpu, xp, xmp, 0, t, k, d)?;
    // y = z = s·h Bᵀ + (1/(1−p))·x_m Wᵀ.
    gemm_rm::<T>(gpu, t, n, r, opts.scale, hp, false, bp, true, 0.0, yp)?;
    base.xwt::<T>(gpu, t, n, k, d.keep_scale(), xmp, 1.0, yp)?;
    // y = (g − 1)⊙z + bias, then + s·h Bᵀ + x Wᵀ.
    launch_scale::<T>(gpu, t, n, yp, zptr, biasp, mp, np, 1.0)?;
    gemm_rm::<T>(gpu, t, n, r, opts.scale, hp, false, bp, true, 1.0, yp)?;
    base.xwt::<T>(gpu, t, n, k, 1.0, xp, 1.0, yp)
}

/// Backward from `dy` [T, N]: dX, dA, dB and dm, from what forward saved (`h`, the
/// norms, and `z` if given; else `z` is recomputed chunk by chunk). Returns the
/// [`Plan`] taken: [`Path::Core`] when each chunk's dX ran on the NN core (no dropout,
/// the LoRA backward's core rule; [`Plan::fused_down`] if any chunk computed its G
/// inside the launch), else [`Path::Cublas`]. [`CorePolicy::Require`] errors (before any
/// launch) where the core cannot take dX.
#[allow(clippy::too_many_arguments)]
pub fn backward<T, I, O, F>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &I,
    weights: DoraWeights<'_, I>,
    saved: DoraSaved<'_, I, F>,
    dy: &I,
    grads: DoraGrads<'_, O>,
) -> Result<Plan>
where
    T: Element,
    I: DevicePtr<T>,
    O: DevicePtrMut<T>,
    F: DevicePtr<f32>,
{
    let w_len = weights.w.len();
    backward_over(
        gpu,
        shape,
        opts,
        x,
        weights,
        w_len,
        saved,
        dy,
        grads,
        || {
            let (wp, gw) = dptr(gpu, "w", weights.w)?;
            Ok((Base::Dense(wp), vec![gw]))
        },
    )
}

/// Backward over either base: the argument checks (W's length given as `w_len`), then
/// `base()` (which may check the base further and pins it for the call), the device
/// pointers, and [`backward_impl`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_over<'a, T, I, O, F, W: ?Sized>(
    gpu: &'a Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &'a I,
    weights: DoraWeights<'a, I, W>,
    w_len: usize,
    saved: DoraSaved<'a, I, F>,
    dy: &'a I,
    grads: DoraGrads<'a, O>,
    base: impl FnOnce() -> Result<(Base, Vec<SyncOnDrop<'a>>)>,
) -> Result<Plan>
where
    T: Element,
    I: DevicePtr<T>,
    O: DevicePtrMut<T>,
    F: DevicePtr<f32>,
{
    check_backward(
        shape,
        opts,
        &BackwardLens {
            x: x.len(),
            w: w_len,
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
    let (base, _gw) = base()?;
    let (xp, _gx) = dptr(gpu, "x", x)?;
    let (ap, _ga) = dptr(gpu, "a", weights.a)?;
    let (bp, _gb) = dptr(gpu, "b", weights.b)?;
    let (mp, _gm) = dptr(gpu, "magnitude", weights.magnitude)?;
    let (hp, _gh) = dptr(gpu, "h", saved.h)?;
    let (np, _gn) = dptr(gpu, "norm", saved.norm)?;
    let zs = match saved.z {
        Some(z) => Some(dptr(gpu, "z", z)?),
        None => None,
    };
    let (dyp, _gdy) = dptr(gpu, "dy", dy)?;
    let (dxp, _gdx) = dptr_mut(gpu, "dx", grads.dx)?;
    let (dap, _gda) = dptr_mut(gpu, "da", grads.da)?;
    let (dbp, _gdb) = dptr_mut(gpu, "db", grads.db)?;
    let (dmp, _gdm) = dptr_mut(gpu, "dm", grads.dm)?;

    let p = BwdPtrs {
        x: xp,
        a: ap,
        b: bp,
        m: mp,
        h: hp,
        norm: np,
        z: zs.as_ref().map(|z| z.0),
        dy: dyp,
        dx: dxp,
        da: dap,
        db: dbp,
        dm: dmp,
    };
    backward_impl::<T>(gpu, shape, opts, &p, &base)
}

/// Device addresses of a backward call.
pub(crate) struct BwdPtrs {
    pub x: u64,
    pub a: u64,
    pub b: u64,
    pub m: u64,
    pub h: u64,
    pub norm: u64,
    pub z: Option<u64>,
    pub dy: u64,
    pub dx: u64,
    pub da: u64,
    pub db: u64,
    pub dm: u64,
}

/// Backward over any base (dense W, or NF4 through dequantized row panels).
pub(crate) fn backward_impl<T: Element>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    p: &BwdPtrs,
    base: &Base,
) -> Result<Plan> {
    let (t, k, n, r) = shape.dims();
    let tuning = &opts.tuning;
    let s = opts.scale;
    let dropout = opts.active_dropout();
    let kp = dropout.map_or(1.0, |d| d.keep_scale());
    let (xp, ap, bp, mp, hp, np) = (p.x, p.a, p.b, p.m, p.h, p.norm);
    let (dyp, dxp, dap, dbp, dmp) = (p.dy, p.dx, p.da, p.db, p.dm);
    let zs = p.z;
    // dX on the NN GEMM core (no dropout, see lora::dx_core_takes): each chunk's
    // `dX = (dy ⊙ g) W + G A` in one launch (dense W), or one per column panel of an NF4
    // W (QDoRA, where the panels are wide enough and dX is 16-byte aligned), with
    // G = s · gl = s · (dy ⊙ g) B computed per chunk from the chunk's dy ⊙ g (with a
    // dense W by the launch's own jobs where the fused rule allows, else by cuBLAS first)
    // into rows of rp = r rounded up to 8 (TMA's 16-byte rows; columns < r written, the
    // only ones read); dA = Gᵀ x after the chunks.
    let dx_w = match base {
        Base::Dense(w) => DxWeight::Dense(*w),
        Base::Nf4(desc, _) => DxWeight::Nf4ColPanels(*desc),
    };
    let core_dx = dropout.is_none() && dx_core_takes::<T>(gpu, tuning, shape, t, 0, dx_w, ap, dxp);
    if tuning.core == CorePolicy::Require && !core_dx {
        return Err(super::plan::core_required_error::<T>(
            "dora::backward",
            gpu,
            shape,
            opts,
        ));
    }
    let mut any_fused = false;
    let ldg = if core_dx { r.next_multiple_of(8) } else { r };
    let gl = gpu.scratch::<T>(t * ldg)?;
    let (glp, _ggl) = dptr(gpu, "gl", &gl)?;
    // Bᵀ [r, N], the jobs' K-major operand: copied by the first chunk that fuses G.
    let mut bt = None;
    if !core_dx {
        // g ⊙ B [N, r] and gl = dy (g ⊙ B) [T, r] (scratch, written in full before reads).
        let bg = gpu.scratch::<T>(shape.b_len())?;
        let (bgp, _gbg) = dptr(gpu, "g_b", &bg)?;
        launch_rowscale::<T>(gpu, shape, bp, bgp, mp, np)?;
        gemm_rm::<T>(gpu, t, r, n, 1.0, dyp, false, bgp, false, 0.0, glp)?;
    }
    // dB = s · g ⊙ (dyᵀ h): the product, then its rows scaled in place.
    gemm_rm::<T>(gpu, n, r, t, s, dyp, true, hp, false, 0.0, dbp)?;
    launch_rowscale::<T>(gpu, shape, dbp, dbp, mp, np)?;
    // dA = s · glᵀ drop(x) (on the core path: after the chunks, from G).
    match dropout {
        None if core_dx => {}
        None => gemm_rm::<T>(gpu, r, k, t, s, glp, true, xp, false, 0.0, dap)?,
        Some(d) => launch_tn::<T>(gpu, xp, glp, t, k, r, 1, k as i64, s, dap, Some(d))?,
    }

    // Token chunks: z, dy ⊙ f with the partial sums of dy ⊙ z, and dX.
    let chunk_elems = tuning.chunk_elems.unwrap_or(BACKWARD_CHUNK_ELEMS).max(1);
    let chunk = (chunk_elems / n.max(k)).max(DYZ_ROWS).min(t);
    let chunk = if chunk < t {
        chunk / DYZ_ROWS * DYZ_ROWS
    } else {
        t
    };
    let total_splits: usize = (0..t)
        .step_by(chunk)
        .map(|t0| chunk.min(t - t0).div_ceil(DYZ_ROWS))
        .sum();
    // SAFETY of the scratch: every (split, n) is written by exactly one dyz thread
    // before the dm kernel reads it; the chunk buffers are written in full (by cuBLAS,
    // the drop kernel or the dyz kernel) before they are read.
    let part = gpu.scratch::<f32>(total_splits * n)?;
    let (partp, _gp) = dptr(gpu, "partials", &part)?;
    let dyf = gpu.scratch::<T>(chunk * n)?;
    let (dyfp, _gdyf) = dptr(gpu, "dy_f", &dyf)?;
    let zbuf = if zs.is_none() {
        Some(gpu.scratch::<T>(chunk * n)?)
    } else {
        None
    };
    let zb = match &zbuf {
        Some(zb) => Some(dptr(gpu, "z", zb)?),
        None => None,
    };
    let xmbuf = if zs.is_none() && dropout.is_some() {
        Some(gpu.scratch::<T>(chunk * k)?)
    } else {
        None
    };
    let xmb = match &xmbuf {
        Some(b) => Some(dptr(gpu, "x_m", b)?),
        None => None,
    };
    let mut split0 = 0usize;
    for t0 in (0..t).step_by(chunk) {
        let tn = chunk.min(t - t0);
        let xc = offset::<T>(xp, t0 * k);
        let dyc = offset::<T>(dyp, t0 * n);
        let dxc = offset::<T>(dxp, t0 * k);
        let zc = match (&zs, &zb) {
            (Some(z), _) => offset::<T>(*z, t0 * n),
            (None, Some(zb)) => {
                // z = s·h Bᵀ + drop(x) Wᵀ for this chunk.
                let hc = offset::<T>(hp, t0 * r);
                gemm_rm::<T>(gpu, tn, n, r, s, hc, false, bp, true, 0.0, zb.0)?;
                match (dropout, &xmb) {
                    (Some(d), Some(xm)) => {
                        launch_drop::<T>(gpu, xc, xm.0, t0, tn, k, d)?;
                        base.xwt::<T>(gpu, tn, n, k, kp, xm.0, 1.0, zb.0)?;
                    }
                    _ => base.xwt::<T>(gpu, tn, n, k, 1.0, xc, 1.0, zb.0)?,
                }
                zb.0
            }
            (None, None) => unreachable!("z scratch exists when z is not given"),
        };
        let splits = tn.div_ceil(DYZ_ROWS);
        let params = LkDoraDyzParams {
            dy: dyc as *const _,
            z: zc as *const _,
            dyf: dyfp as *mut _,
            part: offset::<f32>(partp, split0 * n) as *mut f32,
            mag: mp as *const _,
            norm: np as *const f32,
            t: tn as i32,
            n: n as i32,
            rows_per_block: DYZ_ROWS as i32,
            minus_one: if dropout.is_some() { 1.0 } else { 0.0 },
        };
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256) as u32, splits as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        gpu.launch(LK_DORA_DYZ.of::<T>()?, cfg, &params)?;
        split0 += splits;
        let glc = offset::<T>(glp, t0 * ldg);
        match dropout {
            None if core_dx && dx_core_takes::<T>(gpu, tuning, shape, tn, dyfp, dx_w, ap, dxc) => {
                // dX = (dy ⊙ g) W + G A, G = s · (dy ⊙ g) B: one NN core launch (or one
                // per column panel of an NF4 W).
                any_fused |= launch_dx_core::<T>(
                    gpu,
                    tuning,
                    shape,
                    tn,
                    dyfp,
                    dx_w,
                    (bp, s),
                    (glc, ldg),
                    ap,
                    dxc,
                    &mut bt,
                )?;
            }
            None if core_dx => {
                // This chunk too small for the core: G by cuBLAS, then dX.
                launch_g::<T>(gpu, tn, n, r, s, dyfp, bp, (glc, ldg))?;
                base.dw::<T>(gpu, tn, k, n, 1.0, dyfp, 0.0, dxc)?;
                gemm_rm_ld::<T>(
                    gpu,
                    tn,
                    k,
                    r,
                    1.0,
                    (glc, ldg),
                    false,
                    (ap, k),
                    false,
                    1.0,
                    (dxc, k),
                )?;
            }
            None => {
                // dX = (dy ⊙ g) W + s · gl A.
                base.dw::<T>(gpu, tn, k, n, 1.0, dyfp, 0.0, dxc)?;
                gemm_rm::<T>(gpu, tn, k, r, s, glc, false, ap, false, 1.0, dxc)?;
            }
            Some(d) => {
                // dX = dy W + ((dy ⊙ (g − 1)) W + s · gl A) ⊙ mask / (1 − p).
                base.dw::<T>(gpu, tn, k, n, kp, dyfp, 0.0, dxc)?;
                gemm_rm::<T>(gpu, tn, k, r, s * kp, glc, false, ap, false, 1.0, dxc)?;
                launch_drop::<T>(gpu, dxc, dxc, t0, tn, k, d)?;
                base.dw::<T>(gpu, tn, k, n, 1.0, dyc, 1.0, dxc)?;
            }
        }
    }
    if core_dx {
        // dA = Gᵀ x (G holds s).
        gemm_rm_ld::<T>(
            gpu,
            r,
            k,
            t,
            1.0,
            (glp, ldg),
            true,
            (xp, k),
            false,
            0.0,
            (dap, k),
        )?;
    }
    let params = LkDoraDmParams {
        part: partp as *const f32,
        norm: np as *const f32,
        dm: dmp as *mut _,
        splits: total_splits as i32,
        n: n as i32,
    };
    gpu.launch(LK_DORA_DM.of::<T>()?, grid_1d(n, 256, u32::MAX), &params)?;
    let nf4 = matches!(base, Base::Nf4(..));
    Ok(Plan {
        path: match (core_dx, nf4) {
            (true, false) => Path::Core,
            (true, true) => Path::CorePanels,
            (false, false) => Path::Cublas,
            (false, true) => Path::CublasPanels,
        },
        fused_down: any_fused,
        mma: false,
        nf4_in_core: false,
    })
}

/// Merge in place: `W' = (m / ‖W + s·BA‖) ⊙ (W + s·BA)`. Writes the norms (of the
/// unmerged W), which [`unmerge`] needs.
#[allow(clippy::too_many_arguments)]
pub fn merge<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>, F: DevicePtrMut<f32>>(
    gpu: &Gpu,
    shape: &LoraShape,
    scale: f32,
    w: &mut O,
    a: &I,
    b: &I,
    magnitude: &I,
    norm: &mut F,
) -> Result<()> {
    check_weight_op(
        shape,
        scale,
        w.len(),
        a.len(),
        b.len(),
        ("norm", norm.len()),
    )?;
    check_len("magnitude", magnitude.len(), shape.out_features)?;
    let (wp, _gw) = dptr_mut(gpu, "w", w)?;
    let (ap, _ga) = dptr(gpu, "a", a)?;
    let (bp, _gb) = dptr(gpu, "b", b)?;
    let (mp, _gm) = dptr(gpu, "magnitude", magnitude)?;
    let (np, _gn) = dptr_mut(gpu, "norm", norm)?;
    launch_norm::<T>(gpu, shape, scale, wp, ap, bp, np, 0)?;
    launch_merge::<T>(
        gpu,
        shape,
        scale,
        wp,
        ap,
        bp,
        MergeMode::DoraMerge { mag: mp, norm: np },
    )
}

/// Unmerge in place: `W = W' · (‖·‖ / m) − s·BA` with the norms [`merge`] wrote. A row
/// whose magnitude is 0 cannot be recovered and comes back non-finite.
#[allow(clippy::too_many_arguments)]
pub fn unmerge<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>, F: DevicePtr<f32>>(
    gpu: &Gpu,
    shape: &LoraShape,
    scale: f32,
    w: &mut O,
    a: &I,
    b: &I,
    magnitude: &I,
    norm: &F,
) -> Result<()> {
    check_weight_op(
        shape,
        scale,
        w.len(),
        a.len(),
        b.len(),
        ("norm", norm.len()),
    )?;
    check_len("magnitude", magnitude.len(), shape.out_features)?;
    let (wp, _gw) = dptr_mut(gpu, "w", w)?;
    let (ap, _ga) = dptr(gpu, "a", a)?;
    let (bp, _gb) = dptr(gpu, "b", b)?;
    let (mp, _gm) = dptr(gpu, "magnitude", magnitude)?;
    let (np, _gn) = dptr(gpu, "norm", norm)?;
    launch_merge::<T>(
        gpu,
        shape,
        scale,
        wp,
        ap,
        bp,
        MergeMode::DoraUnmerge { mag: mp, norm: np },
    )
}
