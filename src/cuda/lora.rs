//! CUDA ops of the LoRA linear layer. Same arguments as [`crate::cpu::lora`]; see
//! [`crate::lora`] for the math and layouts.
//!
//! Paths:
//! - T ≤ [`SMALL_T_MAX`]: one cooperative kernel reads W once and computes the base
//!   product, the low-rank term (h in f32, never rounded) and the bias together.
//! - larger T: `h = drop(x) Aᵀ` by a skinny kernel (tensor cores for f16/bf16, split
//!   over K only when the tiles cannot fill the GPU; rounded to the activation type),
//!   `y = s · h Bᵀ` by cuBLAS (onto a bias-filled y with beta = 1 when there is a
//!   bias), then `y += x Wᵀ` by cuBLAS with beta = 1.
//! - backward: where the core can take dX (sm_90, f16/bf16, no active dropout, K and N
//!   multiples of 8, see [`backward`]): `G = s · dY B` by cuBLAS, `dX = dY W + G A`
//!   by one GEMM-core launch (dX written once), `dA = Gᵀ x` and `dB = s · dYᵀ h` by
//!   cuBLAS. Otherwise `g = dY B`, `dX = dY W + s · g A`, `dA = s · gᵀ x` and
//!   `dB = s · dYᵀ h` by cuBLAS. Under dropout, `s/(1−p) · g A` is zeroed in place where x was dropped
//!   before `dY W` is added, and `dA` comes from a token-split kernel that regenerates
//!   the mask, with a deterministic reduction (no atomics).
//!
//! f32 inputs use full-precision f32 arithmetic (cuBLAS without TF32).

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

pub(crate) use super::base::DxWeight;
use super::base::{col_panels_fit, for_each_col_panel, panel_limit};
use super::grid_1d;
use super::kernel::*;
use super::plan::{Path, Plan};
use super::{dptr, dptr_mut, gemm_rm, gemm_rm_ld, lk_dropout, Gpu};
use super::{
    LkBiasFillParams, LkDownParams, LkMaskParams, LkMergeParams, LkReduceParams, LkSmallFwdParams,
    LkTnParams,
};
use crate::lora::{check_backward_lens, check_forward_lens, check_merge_lens, BackwardLens};
use crate::tuning::{CorePolicy, Tuning};
use crate::{Element, LoraGrads, LoraOptions, LoraShape, LoraWeights, Result};

/// The largest T the fused single-pass forward handles; larger T uses the GEMM path.
pub const SMALL_T_MAX: usize = 32;

const SMALL_BLOCK: u32 = 256;

/// Token bucket (the kernel's compile-time token count) and rows per warp for T.
fn small_variant(tokens: usize) -> (usize, usize) {
    let tb = tokens.next_power_of_two().max(1);
    let rows = if tb <= 4 { 2 } else { 4 };
    (tb, rows)
}

/// Forward: `y = x Wᵀ + bias + s · drop(x) Aᵀ Bᵀ`. Writes `y` [T, N] and, if given,
/// `h = drop(x) Aᵀ` [T, r] for [`backward`]. Queued on the GPU's stream; returns the
/// [`Plan`] it took.
///
/// Paths ([`super::plan`] has the rules): T ≤ [`SMALL_T_MAX`], one fused pass over W;
/// larger T where the GEMM core runs and fills the GPU (sm_90 or sm_80 .. sm_89,
/// f16/bf16, r ≤ 64, K % 8 == 0, x, W (and B when r % 8 == 0) 16-byte aligned, y 4-byte
/// aligned, T ≥ 129 and ceil(T/128) · ceil(N/128) ≥ SMs/2): one GEMM-core launch
/// `y = x Wᵀ + U Bᵀ + bias` that writes y once, with `U = s · drop(x) Aᵀ` (and h)
/// computed inside it when r ≤ 32, dropout is off and A is 16-byte aligned (jobs on the
/// clusters with the fewest tiles, each tile waiting for its row's flag), else by the
/// down kernel first; otherwise the down kernel, a skinny cuBLAS product into y and a
/// beta = 1 cuBLAS base GEMM.
///
/// With `opts.tuning.core` = [`CorePolicy::Require`] the core path is taken at any T or
/// an error names why it cannot be (`Error::Unsupported` off sm_80+ or for f32,
/// `Error::Dim`, `Error::Misaligned`), before anything is launched;
/// [`CorePolicy::Never`] keeps the cuBLAS path.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &I,
    weights: LoraWeights<'_, I>,
    y: &mut O,
    h: Option<&mut O>,
) -> Result<Plan> {
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
    let core_only = opts.tuning.core == CorePolicy::Require;
    if core_only {
        check_core_args::<T>(gpu, &opts.tuning, shape, "lora::forward", true)?;
    }
    let (xp, _gx) = dptr(gpu, "x", x)?;
    let (wp, _gw) = dptr(gpu, "w", weights.w)?;
    let (ap, _ga) = dptr(gpu, "a", weights.a)?;
    let (bp, _gb) = dptr(gpu, "b", weights.b)?;
    let bias = match weights.bias {
        Some(bias) => Some(dptr(gpu, "bias", bias)?),
        None => None,
    };
    let (yp, _gy) = dptr_mut(gpu, "y", y)?;
    let h = match h {
        Some(h) => Some(dptr_mut(gpu, "h", h)?),
        None => None,
    };
    let ptrs = FwdPtrs {
        x: xp,
        w: wp,
        a: ap,
        b: bp,
        bias: bias.as_ref().map_or(0, |b| b.0),
        y: yp,
        h: h.as_ref().map_or(0, |h| h.0),
        dora: None,
        nf4: None,
    };
    if core_only {
        check_core_alignment(shape, &ptrs)?;
        forward_core_launch::<T>(gpu, shape, opts, &ptrs, 0, 0)
    } else if shape.tokens <= SMALL_T_MAX {
        forward_small::<T>(gpu, shape, opts, &ptrs)?;
        Ok(Plan::of(Path::SmallFused))
    } else if core_takes::<T>(gpu, &opts.tuning, shape, &ptrs) {
        forward_core_launch::<T>(gpu, shape, opts, &ptrs, 0, 0)
    } else {
        let (t, k, n) = (shape.tokens, shape.in_features, shape.out_features);
        forward_large::<T>(gpu, shape, opts, &ptrs, || {
            gemm_rm::<T>(gpu, t, n, k, 1.0, xp, false, wp, true, 1.0, yp)
        })?;
        Ok(Plan::of(Path::Cublas))
    }
}

/// The core path's shape, dtype and GPU requirements as errors, for
/// [`CorePolicy::Require`]: the forward's (`w_nt_dense`: the mma.sync kernels of
/// sm_80 .. sm_89 can take it) or the backward's (sm_90 only).
fn check_core_args<T: Element>(
    gpu: &Gpu,
    tuning: &Tuning,
    shape: &LoraShape,
    op: &'static str,
    w_nt_dense: bool,
) -> Result<()> {
    use super::gemm;
    let (k, r) = (shape.in_features, shape.rank);
    if r > gemm::MAX_RANK {
        return Err(crate::Error::Dim {
            name: "rank",
            value: r,
            reason: "the GEMM core's low-rank K-slice takes 1..=64",
        });
    }
    if k % 8 != 0 {
        return Err(crate::Error::Dim {
            name: "in_features",
            value: k,
            reason: "the GEMM core needs K % 8 == 0 (TMA's 16-byte row stride)",
        });
    }
    if T::DTYPE == crate::DType::F32 || !gemm::core_runs(gpu, tuning, w_nt_dense) {
        let (major, minor) = gpu.compute_capability();
        let needs = if w_nt_dense {
            "sm_80 or newer (sm_90 with sm_90a code for the wgmma kernels)"
        } else {
            "sm_90 with sm_90a code (the NN kernels are wgmma-only)"
        };
        return Err(crate::Error::Unsupported {
            op,
            reason: format!(
                "needs f16/bf16 on {needs}; got {:?} on {} (sm_{major}{minor})",
                T::DTYPE,
                gpu.name()
            ),
        });
    }
    Ok(())
}

/// The forward core path's alignment requirements (TMA's), as errors, so that a misaligned
/// buffer is refused before the down kernel launches.
fn check_core_alignment(shape: &LoraShape, p: &FwdPtrs) -> Result<()> {
    for (name, addr, align) in [("x", p.x, 16), ("w", p.w, 16), ("y", p.y, 4)] {
        if addr % align != 0 {
            return Err(crate::Error::Misaligned {
                name,
                address: addr,
                align: align as usize,
            });
        }
    }
    if shape.rank.is_multiple_of(8) && !p.b.is_multiple_of(16) {
        return Err(crate::Error::Misaligned {
            name: "b",
            address: p.b,
            align: 16,
        });
    }
    Ok(())
}

/// Whether the GEMM core path can take this large-T forward (see [`forward`]'s paths),
/// and the tuning lets it ([`CorePolicy::Never`] does not; [`CorePolicy::Require`] waives
/// the rule that the tiles fill the GPU, as for every op).
pub(crate) fn core_takes<T: Element>(
    gpu: &Gpu,
    tuning: &Tuning,
    shape: &LoraShape,
    p: &FwdPtrs,
) -> bool {
    tuning.core != CorePolicy::Never
        && (tuning.core == CorePolicy::Require
            || core_fills_gpu(shape.tokens, shape.out_features, gpu.sm_count() as usize))
        && T::DTYPE != crate::DType::F32
        && shape.rank <= super::gemm::MAX_RANK
        && shape.in_features.is_multiple_of(8)
        && p.x.is_multiple_of(16)
        && match &p.nf4 {
            None => p.w.is_multiple_of(16),
            Some(q) => {
                shape
                    .in_features
                    .is_multiple_of(super::gemm::NF4_K_MULTIPLE)
                    && (q.packed as u64).is_multiple_of(16)
            }
        }
        && p.y.is_multiple_of(4)
        && (!shape.rank.is_multiple_of(8) || p.b.is_multiple_of(16))
        && super::gemm::core_runs(gpu, tuning, p.nf4.is_none())
}

/// Whether a [T, N] output has enough 128 × 128 tiles for the core's clusters of 2 CTAs
/// to occupy at least half the SMs, with at least two tile rows (one tile row leaves the
/// second CTA of every cluster idle): T ≥ 129 and ceil(T/128) · ceil(N/128) ≥ SMs / 2.
/// Below that (T ≤ 128, or T ≤ 256 at N = 4096 on 132 SMs) the forward stays on cuBLAS,
/// which spreads a W-bound product over every SM.
fn core_fills_gpu(tokens: usize, n: usize, sms: usize) -> bool {
    let tiles_m = tokens.div_ceil(super::gemm::TILE_M);
    tiles_m >= 2 && 2 * tiles_m * n.div_ceil(super::gemm::TILE_N_NARROW) >= sms
}

/// The core path's launches, arguments checked: `U = s · drop(x) Aᵀ` (and `h` from the
/// same sums when `p.h` is set) inside the core launch or by the down kernel before it
/// (see [`forward`]), and `y = x Wᵀ + U Bᵀ + bias` by one GEMM-core launch; with `col_scale` (f32 [N], DoRA's m/‖·‖) `y = col_scale ⊙ (…)
/// + bias`, and with `z` the unscaled sum is also written there.
pub(crate) fn forward_core_launch<T: Element>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    p: &FwdPtrs,
    col_scale: u64,
    z: u64,
) -> Result<Plan> {
    use super::gemm::{self, CorePtrs};
    let (t, k, n, r) = shape.dims();
    // The down product inside the core launch (jobs run before the tiles) when it can
    // be: no active dropout (the core stages x as it is), a dense W, A 16-byte aligned
    // and r ≤ 32; else the down kernel first.
    let fused = opts.active_dropout().is_none()
        && p.nf4.is_none()
        && p.a.is_multiple_of(16)
        && gemm::fused_down_fits::<T>(gpu, &opts.tuning, t, n, r)?;
    // Fused: U is the core launch's own output ([T, r rounded up to 8], columns < r of
    // every row written before any tile reads them, the only ones its tensor map reads).
    let (u, ldu) = if fused {
        let u_ld = r.next_multiple_of(8);
        (gpu.scratch::<T>(t * u_ld)?, u_ld)
    } else {
        (launch_u::<T>(gpu, shape, opts, p)?, 0)
    };
    let (up, _gu) = dptr(gpu, "u", &u)?;
    let core = CorePtrs {
        x: p.x,
        w: p.w,
        y: p.y,
        bias: p.bias,
        col_scale,
        z,
        low_rank: Some((up, p.b, r)),
        nf4: p.nf4,
        ldy: 0,
        ldu,
        down: fused.then_some(gemm::CoreDown {
            a: p.a,
            h: p.h,
            scale: opts.scale,
        }),
        w_kn: false,
        ldbl: 0,
        tuning: opts.tuning,
    };
    gemm::launch_core::<T>(gpu, &core, t, n, k)?;
    Ok(Plan {
        path: Path::Core,
        fused_down: fused,
        mma: gemm::mma_path(gpu, &opts.tuning),
        nf4_in_core: p.nf4.is_some(),
    })
}

/// The core path's first launch: `U = s · drop(x) Aᵀ` [T, r] into a scratch buffer it
/// returns (written in full by the down kernel, before any later launch on the stream
/// reads it), and `h = drop(x) Aᵀ` from the same sums when `p.h` is set.
pub(crate) fn launch_u<T: Element>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    p: &FwdPtrs,
) -> Result<cudarc::driver::CudaSlice<T>> {
    let (t, k, r) = (shape.tokens, shape.in_features, shape.rank);
    let u = gpu.scratch::<T>(t * r)?;
    {
        let (up, _gu) = dptr(gpu, "u", &u)?;
        launch_down2::<T>(
            gpu,
            p.x,
            k as i64,
            p.a,
            k as i64,
            1,
            t,
            k,
            r,
            opts.scale,
            up,
            (p.h != 0).then_some((1.0, p.h)),
            opts.active_dropout(),
        )?;
    }
    Ok(u)
}

/// Validated device addresses of one forward call (0 = absent).
pub(crate) struct FwdPtrs {
    pub x: u64,
    pub w: u64,
    pub a: u64,
    pub b: u64,
    pub bias: u64,
    pub y: u64,
    pub h: u64,
    /// The fused DoRA forward's extras.
    pub dora: Option<DoraPtrs>,
    /// The base as NF4 (QLoRA; `w` is then 0): the core path dequantizes it in the
    /// GEMM core's shared memory.
    pub nf4: Option<super::LkNf4>,
}

/// DoRA's additions to the small-T fused forward: magnitude, norm out, z out (or 0),
/// and the rank steps (r ≤ 16: 1, r ≤ 32: 2).
pub(crate) struct DoraPtrs {
    pub mag: u64,
    pub norm: u64,
    pub z: u64,
    pub rank_steps: usize,
}

/// Whether DoRA's fused small-T forward takes this call: f16/bf16, T ≤ 32, K % 8 == 0,
/// r % 8 == 0 and r ≤ 32, x, W, A and B 16-byte aligned (dropout is checked by the
/// caller).
pub(crate) fn dora_fused_small<T: Element>(shape: &LoraShape, p: &FwdPtrs) -> bool {
    T::DTYPE != crate::DType::F32
        && shape.tokens <= SMALL_T_MAX
        && shape.in_features.is_multiple_of(8)
        && shape.rank.is_multiple_of(8)
        && shape.rank <= 32
        && [p.x, p.w, p.a, p.b].iter().all(|&a| a % 16 == 0)
}

pub(crate) fn forward_small<T: Element>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    p: &FwdPtrs,
) -> Result<()> {
    let aligned = [p.x, p.w, p.a].iter().all(|&a| a % 16 == 0);
    let vec = shape.in_features.is_multiple_of(8) && aligned;
    let mma = vec && T::DTYPE != crate::DType::F32;
    let (kernel, tasks, smem) = if mma {
        // Tensor-core kernel: one block per 16 rows of A or W.
        let nt = match shape.tokens {
            0..=8 => 1,
            9..=16 => 2,
            _ => 4,
        };
        let family = match (&p.dora, nt) {
            (None, 1) => LK_LORA_SMALL_MMA_N1,
            (None, 2) => LK_LORA_SMALL_MMA_N2,
            (None, _) => LK_LORA_SMALL_MMA_N4,
            (Some(d), _) => match (nt, d.rank_steps) {
                (1, 1) => LK_DORA_SMALL_N1_K1,
                (2, 1) => LK_DORA_SMALL_N2_K1,
                (_, 1) => LK_DORA_SMALL_N4_K1,
                (1, 2) => LK_DORA_SMALL_N1_K2,
                (2, 2) => LK_DORA_SMALL_N2_K2,
                (_, 2) => LK_DORA_SMALL_N4_K2,
                (_, k) => return Err(no_variant("lk_dora_small_*", "rank steps", k)),
            },
        };
        let tasks = shape.rank.div_ceil(16) + shape.out_features.div_ceil(16);
        (family.of::<T>()?, tasks, 0)
    } else {
        // SIMT kernel (f32, or inputs not 16-byte aligned): one warp per `rows` rows.
        let (tb, rows) = small_variant(shape.tokens);
        let family = match (tb, vec) {
            (1, true) => LK_LORA_SMALL_FWD_T1_V,
            (2, true) => LK_LORA_SMALL_FWD_T2_V,
            (4, true) => LK_LORA_SMALL_FWD_T4_V,
            (8, true) => LK_LORA_SMALL_FWD_T8_V,
            (16, true) => LK_LORA_SMALL_FWD_T16_V,
            (32, true) => LK_LORA_SMALL_FWD_T32_V,
            (1, false) => LK_LORA_SMALL_FWD_T1_S,
            (2, false) => LK_LORA_SMALL_FWD_T2_S,
            (4, false) => LK_LORA_SMALL_FWD_T4_S,
            (8, false) => LK_LORA_SMALL_FWD_T8_S,
            (16, false) => LK_LORA_SMALL_FWD_T16_S,
            (32, false) => LK_LORA_SMALL_FWD_T32_S,
            (tb, _) => return Err(no_variant("lk_lora_small_fwd_*", "token block", tb)),
        };
        let warps = shape.rank.div_ceil(rows) + shape.out_features.div_ceil(rows);
        (
            family.of::<T>()?,
            warps.div_ceil((SMALL_BLOCK / 32) as usize),
            0,
        )
    };
    // SAFETY of the scratch: the kernel's A-tasks write all T·r entries of h_ws before
    // any W-task reads them (the counter in `gpu.sync` orders the two).
    let h_ws = gpu.scratch::<f32>(shape.h_len())?;
    let (h_ws_p, _gh) = dptr(gpu, "h_ws", &h_ws)?;
    let (sync_p, _gs) = dptr(gpu, "sync", &gpu.sync)?;
    let params = LkSmallFwdParams {
        x: p.x as *const _,
        w: p.w as *const _,
        a: p.a as *const _,
        b: p.b as *const _,
        bias: p.bias as *const _,
        y: p.y as *mut _,
        h_out: p.h as *mut _,
        h_ws: h_ws_p as *mut f32,
        sync: sync_p as *mut u32,
        t: shape.tokens as i32,
        k: shape.in_features as i32,
        n: shape.out_features as i32,
        r: shape.rank as i32,
        scale: opts.scale,
        dropout: lk_dropout(opts.active_dropout()),
        mag: p.dora.as_ref().map_or(0, |d| d.mag) as *const _,
        norm: p.dora.as_ref().map_or(0, |d| d.norm) as *mut f32,
        z: p.dora.as_ref().map_or(0, |d| d.z) as *mut _,
    };
    let func = gpu.function(kernel)?;
    let max_grid = gpu.cooperative_grid(kernel, &func, SMALL_BLOCK, smem)?;
    let mut cfg = grid_1d(tasks * SMALL_BLOCK as usize, SMALL_BLOCK, max_grid);
    cfg.shared_mem_bytes = smem;
    gpu.launch_cooperative(&func, cfg, &params)
}

/// The large-T forward: h, then `y = s · h Bᵀ (+ bias)`, then `base()`, which must add
/// `x Wᵀ` onto y (beta = 1). `p.w` is not read here.
pub(crate) fn forward_large<T: Element>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    p: &FwdPtrs,
    base: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let (t, k, n, r) = shape.dims();
    // h in the activation type: the caller's buffer, or scratch (written in full by
    // the down kernel before the GEMM reads it).
    let h_scratch;
    let hp = if p.h != 0 {
        p.h
    } else {
        h_scratch = gpu.scratch::<T>(shape.h_len())?;
        dptr(gpu, "h", &h_scratch)?.0
    };
    launch_down::<T>(
        gpu,
        p.x,
        k as i64,
        p.a,
        k as i64,
        1,
        t,
        k,
        r,
        1.0,
        hp,
        opts.active_dropout(),
    )?;
    // y = s · h Bᵀ (onto the bias with beta = 1 when there is one), then y += x Wᵀ with
    // beta = 1: the skinny product writes y once, and the base GEMM's read of y hides
    // under its arithmetic. Measured faster than the composed order (base first, then
    // a beta = 1 skinny product that must read and write y): docs/PERF_NOTES.md.
    let beta = if p.bias != 0 {
        let params = LkBiasFillParams {
            y: p.y as *mut _,
            bias: p.bias as *const _,
            t: t as i32,
            n: n as i32,
        };
        gpu.launch(
            LK_BIAS_FILL.of::<T>()?,
            grid_1d(t * n, 256, gpu.sm_count() * 8),
            &params,
        )?;
        1.0
    } else {
        0.0
    };
    gemm_rm::<T>(gpu, t, n, r, opts.scale, hp, false, p.b, true, beta, p.y)?;
    base()
}

/// `out[t, j] = alpha · Σ_c drop(x)[t, c] · V[j·v_sj + c·v_sc]` for j < r: split over
/// the columns into f32 partials, then a deterministic reduction into `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_down<T: Element>(
    gpu: &Gpu,
    x: u64,
    ldx: i64,
    v: u64,
    v_sj: i64,
    v_sc: i64,
    t: usize,
    cols: usize,
    r: usize,
    alpha: f32,
    out: u64,
    dropout: Option<crate::Dropout>,
) -> Result<()> {
    launch_down2::<T>(
        gpu, x, ldx, v, v_sj, v_sc, t, cols, r, alpha, out, None, dropout,
    )
}

/// [`launch_down`], and with `second = Some((alpha2, out2))` also
/// `out2[t, j] = alpha2 · Σ_c …` from the same sums (each output rounded once).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_down2<T: Element>(
    gpu: &Gpu,
    x: u64,
    ldx: i64,
    v: u64,
    v_sj: i64,
    v_sc: i64,
    t: usize,
    cols: usize,
    r: usize,
    alpha: f32,
    out: u64,
    second: Option<(f32, u64)>,
    dropout: Option<crate::Dropout>,
) -> Result<()> {
    let (alpha2, out2) = second.unwrap_or((0.0, 0));
    // Tensor cores for f16/bf16 when rows are 16-byte aligned and V is contiguous in c.
    let mma = T::DTYPE != crate::DType::F32
        && cols.is_multiple_of(8)
        && ldx % 8 == 0
        && v_sc == 1
        && v_sj % 8 == 0
        && x.is_multiple_of(16)
        && v.is_multiple_of(16);
    let (family, tile_t, tile_r) = if mma {
        let (family, nt) = match r {
            0..=8 => (LK_DOWN_MMA_N1, 1),
            9..=16 => (LK_DOWN_MMA_N2, 2),
            17..=32 => (LK_DOWN_MMA_N4, 4),
            _ => (LK_DOWN_MMA_N8, 8),
        };
        (family, 16, 8 * nt)
    } else if r <= 16 {
        (LK_DOWN_R16, 64, 16)
    } else {
        (LK_DOWN_R64, 64, 64)
    };
    let tiles = t.div_ceil(tile_t) * r.div_ceil(tile_r);
    // Split the columns only when the tiles alone cannot fill the GPU; one split writes
    // `out` directly (no partials, no reduction launch).
    let want = if tiles >= gpu.sm_count() as usize {
        1
    } else {
        (2 * gpu.sm_count() as usize).div_ceil(tiles)
    };
    let c_chunk = cols.div_ceil(want).div_ceil(256).max(1) * 256;
    let splits = cols.div_ceil(c_chunk);
    // SAFETY of the scratch: every (split, t, j) with t < T, j < r is written by exactly
    // one thread of the down kernel before the reduction reads it.
    let part = gpu.scratch::<f32>(if splits > 1 { splits * t * r } else { 1 })?;
    let (part_p, _gp) = dptr(gpu, "partials", &part)?;
    let params = LkDownParams {
        x: x as *const _,
        v: v as *const _,
        part: part_p as *mut f32,
        out: if splits == 1 {
            out as *mut _
        } else {
            std::ptr::null_mut()
        },
        out2: if splits == 1 {
            out2 as *mut _
        } else {
            std::ptr::null_mut()
        },
        alpha,
        alpha2,
        ldx,
        v_sj,
        v_sc,
        t: t as i32,
        cols: cols as i32,
        r: r as i32,
        c_chunk: c_chunk as i32,
        dropout: lk_dropout(dropout),
    };
    let cfg = LaunchConfig {
        grid_dim: (
            t.div_ceil(tile_t) as u32,
            r.div_ceil(tile_r) as u32,
            splits as u32,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.launch(family.of::<T>()?, cfg, &params)?;
    if splits > 1 {
        launch_reduce::<T>(gpu, part_p, splits, t * r, alpha, out, (alpha2, out2))?;
    }
    Ok(())
}

/// `out[i] = alpha · Σ_s part[s][i]`, cast to T; also `out2[i] = alpha2 · Σ` when
/// `second.1` (out2) is not 0.
fn launch_reduce<T: Element>(
    gpu: &Gpu,
    part: u64,
    splits: usize,
    count: usize,
    alpha: f32,
    out: u64,
    second: (f32, u64),
) -> Result<()> {
    let reduce = LkReduceParams {
        part: part as *const f32,
        out: out as *mut _,
        out2: second.1 as *mut _,
        count: count as i64,
        splits: splits as i32,
        alpha,
        alpha2: second.0,
    };
    gpu.launch(
        LK_REDUCE.of::<T>()?,
        grid_1d(count, 256, gpu.sm_count() * 8),
        &reduce,
    )
}

/// `out[c·o_sc + j·o_sj] = alpha · Σ_t drop(m)[t, c] · g[t, j]`: token-split partial
/// sums into f32 scratch, then a deterministic reduction into `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_tn<T: Element>(
    gpu: &Gpu,
    m: u64,
    g: u64,
    t: usize,
    cols: usize,
    r: usize,
    o_sc: i64,
    o_sj: i64,
    alpha: f32,
    out: u64,
    dropout: Option<crate::Dropout>,
) -> Result<()> {
    let (family, br) = if r <= 16 {
        (LK_TN_R16, 16)
    } else {
        (LK_TN_R64, 64)
    };
    let tiles = cols.div_ceil(64) * r.div_ceil(br);
    let want = (2 * gpu.sm_count() as usize).div_ceil(tiles).max(1);
    let t_chunk = t.div_ceil(want).div_ceil(32) * 32;
    let splits = t.div_ceil(t_chunk);
    // SAFETY of the scratch: every (split, c, j) with c < cols, j < r is written by
    // exactly one thread of the tn kernel before the reduction reads it.
    let part = gpu.scratch::<f32>(splits * cols * r)?;
    let (part_p, _gp) = dptr(gpu, "partials", &part)?;
    let params = LkTnParams {
        m: m as *const _,
        g: g as *const _,
        part: part_p as *mut f32,
        o_sc,
        o_sj,
        t: t as i32,
        cols: cols as i32,
        r: r as i32,
        splits: splits as i32,
        t_chunk: t_chunk as i32,
        dropout: lk_dropout(dropout),
    };
    let cfg = LaunchConfig {
        grid_dim: (
            cols.div_ceil(64) as u32,
            r.div_ceil(br) as u32,
            splits as u32,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.launch(family.of::<T>()?, cfg, &params)?;
    launch_reduce::<T>(gpu, part_p, splits, cols * r, alpha, out, (0.0, 0))
}

/// Backward from `dy` [T, N]: writes dX [T, K], dA [r, K] and dB [N, r]. `h` is what
/// [`forward`] returned; `weights.bias` is ignored (the base layer is frozen); the
/// dropout mask is regenerated from `opts`, never stored. Returns the [`Plan`] taken.
///
/// Where the core can take dX (sm_90, f16/bf16, no active dropout, rank ≤ 64, K and N
/// multiples of 8, dy, W and A 16-byte aligned, dX 4-byte aligned, enough [T, K] tiles):
/// one NN core launch `dX = dY W + G A` (W read as [K, N] = MN-major, the low-rank term
/// as its extra K-slice, so dX is written once and never read back) with `G = s · dY B`
/// computed inside it when r ≤ 32 and the fused rule allows, else by cuBLAS before it;
/// then `dA = Gᵀ x` and `dB = s · dYᵀ h` by cuBLAS. Otherwise cuBLAS (see the module
/// docs). [`CorePolicy::Require`] makes a failed core condition an error before any
/// launch; [`CorePolicy::Never`] keeps cuBLAS.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &I,
    weights: LoraWeights<'_, I>,
    h: &I,
    dy: &I,
    grads: LoraGrads<'_, O>,
) -> Result<Plan> {
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
    let core_only = opts.tuning.core == CorePolicy::Require;
    if core_only {
        check_core_args::<T>(gpu, &opts.tuning, shape, "lora::backward", false)?;
        if !shape.out_features.is_multiple_of(8) {
            return Err(crate::Error::Dim {
                name: "out_features",
                value: shape.out_features,
                reason: "the core backward needs N % 8 == 0 (dY's rows are TMA's 16-byte \
                         multiples)",
            });
        }
        if opts.active_dropout().is_some() {
            return Err(crate::Error::Unsupported {
                op: "lora::backward",
                reason: "active dropout (the core stages dY W without the mask)".into(),
            });
        }
    }
    let (t, k, n) = (shape.tokens, shape.in_features, shape.out_features);
    let (xp, _gx) = dptr(gpu, "x", x)?;
    let (wp, _gw) = dptr(gpu, "w", weights.w)?;
    let (ap, _ga) = dptr(gpu, "a", weights.a)?;
    let (bp, _gb) = dptr(gpu, "b", weights.b)?;
    let (hp, _gh) = dptr(gpu, "h", h)?;
    let (dyp, _gdy) = dptr(gpu, "dy", dy)?;
    let (dxp, _gdx) = dptr_mut(gpu, "dx", grads.dx)?;
    let (dap, _gda) = dptr_mut(gpu, "da", grads.da)?;
    let (dbp, _gdb) = dptr_mut(gpu, "db", grads.db)?;
    let p = BwdPtrs {
        x: xp,
        a: ap,
        b: bp,
        h: hp,
        dy: dyp,
        dx: dxp,
        da: dap,
        db: dbp,
    };
    if core_only {
        for (name, addr, align) in [
            ("dy", dyp, 16),
            ("w", wp, 16),
            ("a", ap, 16),
            ("dx", dxp, 4),
        ] {
            if addr % align != 0 {
                return Err(crate::Error::Misaligned {
                    name,
                    address: addr,
                    align: align as usize,
                });
            }
        }
        return backward_core_launch::<T>(gpu, shape, opts, &p, DxWeight::Dense(wp));
    }
    if backward_core_takes::<T>(gpu, shape, opts, &p, wp) {
        return backward_core_launch::<T>(gpu, shape, opts, &p, DxWeight::Dense(wp));
    }
    backward_with::<T>(gpu, shape, opts, &p, |beta| {
        gemm_rm::<T>(gpu, t, k, n, 1.0, dyp, false, wp, false, beta, dxp)
    })?;
    Ok(Plan::of(Path::Cublas))
}

/// Whether [`backward`] takes the core path for these arguments: as the forward's core
/// path (sm_90, f16/bf16, enough [T, K] output tiles, the tuning's core policy not
/// [`CorePolicy::Never`]), no active dropout, rank ≤ 64, K and N multiples of 8, dy, W
/// and A 16-byte aligned, dX 4-byte aligned.
fn backward_core_takes<T: Element>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    p: &BwdPtrs,
    w: u64,
) -> bool {
    opts.active_dropout().is_none()
        && dx_core_takes::<T>(
            gpu,
            &opts.tuning,
            shape,
            shape.tokens,
            p.dy,
            DxWeight::Dense(w),
            p.a,
            p.dx,
        )
}

/// Whether `dX = d W + G A` for `tokens` rows of d ([tokens, N] at `d`) into dX at `dx`
/// can run on the NN core (see [`launch_dx_core`]): the tuning's core policy not
/// [`CorePolicy::Never`],
/// enough [tokens, K] output tiles, sm_90 (not the forced mma path), f16/bf16, rank ≤ 64,
/// K and N multiples of 8, d and A 16-byte aligned; and the weight's own rule: a dense W
/// 16-byte aligned, dX 4-byte aligned; NF4 in the core: K % 32 == 0, the codes 16-byte
/// aligned, dX 4-byte aligned; NF4 column panels: panels wide enough
/// ([`col_panels_fit`]), dX 16-byte aligned (TMA stores into its columns;
/// the panel scratch is aligned).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dx_core_takes<T: Element>(
    gpu: &Gpu,
    tuning: &Tuning,
    shape: &LoraShape,
    tokens: usize,
    d: u64,
    w: DxWeight,
    a: u64,
    dx: u64,
) -> bool {
    let (k, n) = (shape.in_features, shape.out_features);
    let weight_ok = match w {
        DxWeight::Dense(wp) => wp % 16 == 0 && dx.is_multiple_of(4),
        DxWeight::Nf4(q) => {
            (q.packed as u64).is_multiple_of(16) && k % 32 == 0 && dx.is_multiple_of(4)
        }
        DxWeight::Nf4ColPanels(_) => {
            col_panels_fit(panel_limit(tuning), n, k) && dx.is_multiple_of(16)
        }
    };
    weight_ok
        && tuning.core != CorePolicy::Never
        && (tuning.core == CorePolicy::Require
            || core_fills_gpu(tokens, shape.in_features, gpu.sm_count() as usize))
        && T::DTYPE != crate::DType::F32
        && shape.rank <= super::gemm::MAX_RANK
        && shape.in_features.is_multiple_of(8)
        && shape.out_features.is_multiple_of(8)
        && d.is_multiple_of(16)
        && a.is_multiple_of(16)
        && super::gemm::core_runs(gpu, tuning, false)
}

/// `dX [tokens, K] = d [tokens, N] · W [N, K] + G [tokens, r] · A [r, K]` by one NN core
/// launch (W read MN-major, dense or dequantized from NF4 in shared memory, G A as the
/// extra K-slice, dX written once), or one per column panel of an NF4 W (each writing
/// its columns of dX once), with `G = scale · d B` (B [N, r]) written into `(g, ldg)`
/// (rows of a multiple of 8 ≥ r elements, 16-byte aligned; columns < r written, the only
/// ones read): with a dense W by the launch's own jobs where the fused rule allows
/// (their A operand is Bᵀ [r, N], a copy made once into `bt` and reused by later calls),
/// else by cuBLAS just before it. Returns whether G came from the launch's jobs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_dx_core<T: Element>(
    gpu: &Gpu,
    tuning: &Tuning,
    shape: &LoraShape,
    tokens: usize,
    d: u64,
    w: DxWeight,
    (b, scale): (u64, f32),
    (g, ldg): (u64, usize),
    a: u64,
    dx: u64,
    bt: &mut Option<cudarc::driver::CudaSlice<T>>,
) -> Result<bool> {
    use super::gemm::{self, CoreDown, CorePtrs};
    let (k, n, r) = (shape.in_features, shape.out_features, shape.rank);
    let (wp, nf4) = match w {
        DxWeight::Dense(wp) => (wp, None),
        DxWeight::Nf4(q) => (0, Some(q)),
        DxWeight::Nf4ColPanels(_) => (0, None),
    };
    let fused = matches!(w, DxWeight::Dense(_))
        && gemm::fused_down_fits_for::<T>(gpu, tuning, tokens, k, r, true)?;
    if fused && bt.is_none() {
        *bt = Some(gemm::transpose::<T>(gpu, b, n, r)?);
    }
    let bt_ptr = match bt.as_ref().filter(|_| fused) {
        Some(bt) => Some(dptr(gpu, "bt", bt)?),
        None => {
            launch_g::<T>(gpu, tokens, n, r, scale, d, b, (g, ldg))?;
            None
        }
    };
    let core = CorePtrs {
        x: d,
        w: wp,
        y: dx,
        bias: 0,
        col_scale: 0,
        z: 0,
        low_rank: Some((g, a, r)),
        nf4,
        ldy: 0,
        ldu: ldg,
        down: bt_ptr.as_ref().map(|(btp, _)| CoreDown {
            a: *btp,
            h: 0,
            scale,
        }),
        w_kn: true,
        ldbl: 0,
        tuning: *tuning,
    };
    if let DxWeight::Nf4ColPanels(q) = w {
        // dX[:, c0 .. c0 + pc] = d · deq(W[:, c0 .. c0 + pc]) + G · A[:, c0 .. c0 + pc]:
        // the panel as W [N, pc], A's columns as Bl (row stride K), TMA stores into dX's
        // columns (row stride K).
        let size = std::mem::size_of::<T>() as u64;
        for_each_col_panel::<T>(gpu, tuning, &q, |c0, pc, pp| {
            let panel = CorePtrs {
                w: pp,
                y: dx + c0 as u64 * size,
                low_rank: Some((g, a + c0 as u64 * size, r)),
                ldy: k,
                ldbl: k,
                ..core
            };
            gemm::launch_core::<T>(gpu, &panel, tokens, pc, n)
        })?;
        return Ok(false);
    }
    gemm::launch_core::<T>(gpu, &core, tokens, k, n)?;
    Ok(fused)
}

/// `G = scale · d B` [tokens, r] by cuBLAS into rows of `ldg` elements: d [tokens, N],
/// B [N, r].
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_g<T: Element>(
    gpu: &Gpu,
    tokens: usize,
    n: usize,
    r: usize,
    scale: f32,
    d: u64,
    b: u64,
    (g, ldg): (u64, usize),
) -> Result<()> {
    gemm_rm_ld::<T>(
        gpu,
        tokens,
        r,
        n,
        scale,
        (d, n),
        false,
        (b, r),
        false,
        0.0,
        (g, ldg),
    )
}

/// The backward core path's launches, arguments checked (also the QLoRA backward's core
/// path, with W in NF4); returns its plan.
pub(crate) fn backward_core_launch<T: Element>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    p: &BwdPtrs,
    w: DxWeight,
) -> Result<Plan> {
    let (t, k, n, r) = shape.dims();
    // dX [T, K] = dY [T, N] · W [N, K] + G [T, r] · A [r, K] (the NN core, its "K" is N),
    // G = s · dY B [T, r] in rows of rp = r rounded up to 8 (TMA's 16-byte rows).
    let rp = r.next_multiple_of(8);
    let g = gpu.scratch::<T>(t * rp)?;
    let (gp, _gg) = dptr(gpu, "g", &g)?;
    let mut bt = None;
    let fused = launch_dx_core::<T>(
        gpu,
        &opts.tuning,
        shape,
        t,
        p.dy,
        w,
        (p.b, opts.scale),
        (gp, rp),
        p.a,
        p.dx,
        &mut bt,
    )?;
    // dA = Gᵀ x (G already holds s);  dB = s · dYᵀ h.
    gemm_rm_ld::<T>(
        gpu,
        r,
        k,
        t,
        1.0,
        (gp, rp),
        true,
        (p.x, k),
        false,
        0.0,
        (p.da, k),
    )?;
    gemm_rm::<T>(gpu, n, r, t, opts.scale, p.dy, true, p.h, false, 0.0, p.db)?;
    Ok(Plan {
        path: match w {
            DxWeight::Nf4ColPanels(_) => Path::CorePanels,
            _ => Path::Core,
        },
        fused_down: fused,
        mma: false,
        nf4_in_core: matches!(w, DxWeight::Nf4(_)),
    })
}

/// Validated device addresses of one backward call.
pub(crate) struct BwdPtrs {
    pub x: u64,
    pub a: u64,
    pub b: u64,
    pub h: u64,
    pub dy: u64,
    pub dx: u64,
    pub da: u64,
    pub db: u64,
}

/// The backward with the base layer's part of dX supplied: `base_dx(beta)` must write
/// `dX = dY W + beta · dX`.
pub(crate) fn backward_with<T: Element>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    p: &BwdPtrs,
    base_dx: impl FnOnce(f32) -> Result<()>,
) -> Result<()> {
    let (t, k, n, r) = shape.dims();
    let dropout = opts.active_dropout();
    let (xp, ap, bp, hp, dyp, dxp, dap, dbp) = (p.x, p.a, p.b, p.h, p.dy, p.dx, p.da, p.db);

    // g = dY B [T, r] (scratch, written in full by cuBLAS).
    let g = gpu.scratch::<T>(shape.h_len())?;
    let (gp, _gg) = dptr(gpu, "g", &g)?;
    gemm_rm::<T>(gpu, t, r, n, 1.0, dyp, false, bp, false, 0.0, gp)?;

    match dropout {
        None => {
            // dX = dY W + s · g A;  dA = s · gᵀ x;  dB = s · dYᵀ h.
            base_dx(0.0)?;
            gemm_rm::<T>(gpu, t, k, r, opts.scale, gp, false, ap, false, 1.0, dxp)?;
            gemm_rm::<T>(gpu, r, k, t, opts.scale, gp, true, xp, false, 0.0, dap)?;
        }
        Some(d) => {
            // dX = s/(1-p) · g A, zeroed where x was dropped, then += dY W.
            gemm_rm::<T>(
                gpu,
                t,
                k,
                r,
                opts.scale * d.keep_scale(),
                gp,
                false,
                ap,
                false,
                0.0,
                dxp,
            )?;
            let params = LkMaskParams {
                data: dxp as *mut _,
                t: t as i32,
                cols: k as i32,
                dropout: lk_dropout(Some(d)),
            };
            gpu.launch(
                LK_DROPOUT_ZERO.of::<T>()?,
                grid_1d((t * k).div_ceil(4), 256, gpu.sm_count() * 8),
                &params,
            )?;
            base_dx(1.0)?;
            // dA[j, c] = s · Σ_t g[t, j] drop(x)[t, c], the mask regenerated in-kernel.
            launch_tn::<T>(gpu, xp, gp, t, k, r, 1, k as i64, opts.scale, dap, Some(d))?;
        }
    }
    gemm_rm::<T>(gpu, n, r, t, opts.scale, dyp, true, hp, false, 0.0, dbp)?;
    Ok(())
}

/// Merge in place: `W += s · B A`, in W's type (`shape.tokens` is unused).
pub fn merge<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
    gpu: &Gpu,
    shape: &LoraShape,
    scale: f32,
    w: &mut O,
    a: &I,
    b: &I,
) -> Result<()> {
    check_merge_lens(shape, w.len(), a.len(), b.len())?;
    LoraOptions::new(scale).validate()?;
    let (wp, _gw) = dptr_mut(gpu, "w", w)?;
    let (ap, _ga) = dptr(gpu, "a", a)?;
    let (bp, _gb) = dptr(gpu, "b", b)?;
    launch_merge::<T>(gpu, shape, scale, wp, ap, bp, MergeMode::Lora)
}

/// What [`launch_merge`] does to each element of W (P = B A, row n).
pub(crate) enum MergeMode {
    /// `W += s·P`.
    Lora,
    /// `W = (mag/norm)[n] · (W + s·P)` (device addresses of mag and norm).
    DoraMerge { mag: u64, norm: u64 },
    /// `W = W · (norm/mag)[n] − s·P`.
    DoraUnmerge { mag: u64, norm: u64 },
}

/// The merge kernel of LoRA and DoRA over validated device addresses.
pub(crate) fn launch_merge<T: Element>(
    gpu: &Gpu,
    shape: &LoraShape,
    scale: f32,
    w: u64,
    a: u64,
    b: u64,
    mode: MergeMode,
) -> Result<()> {
    let (mode, mag, norm) = match mode {
        MergeMode::Lora => (0, 0, 0),
        MergeMode::DoraMerge { mag, norm } => (1, mag, norm),
        MergeMode::DoraUnmerge { mag, norm } => (2, mag, norm),
    };
    let params = LkMergeParams {
        w: w as *mut _,
        a: a as *const _,
        b: b as *const _,
        mag: mag as *const _,
        norm: norm as *const f32,
        n: shape.out_features as i32,
        k: shape.in_features as i32,
        r: shape.rank as i32,
        scale,
        mode,
    };
    let cfg = LaunchConfig {
        grid_dim: (
            shape.out_features as u32,
            shape.in_features.div_ceil(256) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: (shape.rank * 4) as u32,
    };
    gpu.launch(LK_MERGE.of::<T>()?, cfg, &params)
}

/// Unmerge in place: `W -= s · B A` (the inverse of [`merge`] up to rounding in W's type).
pub fn unmerge<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
    gpu: &Gpu,
    shape: &LoraShape,
    scale: f32,
    w: &mut O,
    a: &I,
    b: &I,
) -> Result<()> {
    merge(gpu, shape, -scale, w, a, b)
}
