//! CUDA ops of the QLoRA linear layer (LoRA over an NF4 base; see [`crate::qlora`] for
//! the math). Same arguments as [`crate::cpu::qlora`], with the base an [`Nf4Device`].
//!
//! Paths:
//! - forward, T ≤ 32 (K % 32 == 0, x 16-byte aligned): `h = drop(x) Aᵀ` by the LoRA down
//!   kernel, then one pass over the 4-bit weight ([`crate::cuda::nf4::matmul`]'s kernel)
//!   that dequantizes it in registers and adds the bias and `s · h Bᵀ` in its epilogue.
//! - forward, other T (the default): W dequantized one panel of rows at a time into a
//!   scratch buffer of at most [`PANEL_ELEMS`] elements. On sm_90 where the dense LoRA
//!   linear's core rule holds and N % 8 == 0, y 16-byte aligned: `U = s · drop(x) Aᵀ`
//!   once by the down kernel, then per panel one launch of the dense GEMM core with the
//!   panel's rows of B as the low-rank slice and its bias, storing into y's columns
//!   (y written once). Otherwise as the dense LoRA linear's cuBLAS path, with
//!   `y += x deq(W)ᵀ` by cuBLAS into y's columns per panel.
//! - forward, larger T with [`Tuning::nf4_core`] set, on sm_90 (f16/bf16, r ≤ 64,
//!   K % 32 == 0, aligned buffers, enough output tiles: the dense LoRA linear's core
//!   rule): `U = s · drop(x) Aᵀ` by the down kernel, then one launch of the GEMM core's
//!   NF4 kernel ([`crate::cuda::gemm::matmul_nt_nf4`]), whose producer warpgroup
//!   dequantizes each W tile into shared memory, with the low-rank K-slice and the bias
//!   in the same pass. No dense W at all; on an H100 it is slower than the panels today
//!   (docs/PERF_NOTES_NF4.md), so it is opt-in.
//! - backward on sm_90, no active dropout, where the dense LoRA backward's core rule
//!   holds (f16/bf16, r ≤ 64, K and N multiples of 8, enough [T, K] output tiles, dY and
//!   A 16-byte aligned), dX is 16-byte aligned and a column panel of at most
//!   [`PANEL_ELEMS`] elements holds all of W or at least 1024 columns (N ≤ 32768 at the
//!   default cap): `G = s · dY B` by cuBLAS, then W dequantized one column panel at a
//!   time (a multiple of 64 columns) and per panel one launch of the dense NN GEMM core,
//!   `dX[:, panel] = dY deq(W[:, panel]) + G A[:, panel]`, storing into dX's columns
//!   (dX written once); then `dA = Gᵀ x` and `dB = s · dYᵀ h` by cuBLAS.
//! - backward with [`Tuning::nf4_core`] set, tried before the column panels (sm_90, no
//!   active dropout, f16/bf16, r ≤ 64, K % 32 == 0, N % 8 == 0, dY, A and the codes
//!   16-byte aligned, dX 4-byte aligned, enough [T, K] output tiles): `G = s · dY B` by
//!   cuBLAS, then one launch of
//!   the NF4 NN core ([`crate::cuda::gemm::matmul_nn_nf4`]'s kernel) for
//!   `dX = dY deq(W) + G A`, W's [64-row × tile] pieces dequantized into shared memory
//!   in the MN-major layout; then `dA = Gᵀ x` and `dB = s · dYᵀ h` by cuBLAS.
//! - backward otherwise: as the dense LoRA backward, with `dY deq(W)` accumulated over
//!   row panels (`dX += dY[:, panel] · deq(W[panel])`) by cuBLAS.
//!
//! The whole dense W never exists in device memory: the panel paths hold one panel (at
//! most 64 MiB in bf16) plus the LoRA path's O(T·r) buffers; the core paths hold no
//! dense W at all (their extra memory is U or G, O(T·r), and the core's scale table, one
//! f32 per 32 weights: N·K/8 bytes).
//!
//! [`Tuning::nf4_core`]: crate::Tuning::nf4_core

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::base::{for_each_panel, panel_limit, panel_rows};
use super::gemm::{self, CorePtrs};
use super::lora::{
    backward_core_launch, backward_with, core_takes, dx_core_takes, forward_core_launch,
    forward_large, launch_down, launch_u, BwdPtrs, DxWeight, FwdPtrs,
};
use super::nf4::{launch_mm, MmLora, Nf4Device};
use super::plan::{Path, Plan};
use super::{dptr, dptr_mut, gemm_rm_ld, Gpu};
use crate::lora::{check_backward_lens, check_forward_lens, BackwardLens};
use crate::qlora::{check_base, QloraWeights};
use crate::tuning::CorePolicy;
use crate::{Element, LoraGrads, LoraOptions, LoraShape, Result};

pub use super::base::PANEL_ELEMS;

/// Forward: `y = x deq(W)ᵀ + bias + s · drop(x) Aᵀ Bᵀ`; writes `y` [T, N] and, if given,
/// `h = drop(x) Aᵀ` [T, r] for [`backward`]. Queued on the GPU's stream; returns the
/// [`Plan`] taken (see the module docs and [`super::plan`]).
pub fn forward<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &I,
    weights: QloraWeights<'_, Nf4Device, I>,
    y: &mut O,
    h: Option<&mut O>,
) -> Result<Plan> {
    check_base(shape, weights.w.rows, weights.w.cols)?;
    check_forward_lens(
        shape,
        x.len(),
        shape.w_len(),
        weights.a.len(),
        weights.b.len(),
        weights.bias.map(|b| b.len()),
        y.len(),
        h.as_ref().map(|h| h.len()),
    )?;
    opts.validate()?;
    let (t, k, n, r) = shape.dims();
    let tuning = &opts.tuning;
    let limit = panel_limit(tuning);
    let (desc, _gw) = weights.w.desc(gpu)?;
    let (xp, _gx) = dptr(gpu, "x", x)?;
    let (ap, _ga) = dptr(gpu, "a", weights.a)?;
    let (bp, _gb) = dptr(gpu, "b", weights.b)?;
    let bias = match weights.bias {
        Some(bias) => Some(dptr(gpu, "bias", bias)?),
        None => None,
    };
    let biasp = bias.as_ref().map_or(0, |b| b.0);
    let (yp, _gy) = dptr_mut(gpu, "y", y)?;
    let h = match h {
        Some(h) => Some(dptr_mut(gpu, "h", h)?),
        None => None,
    };
    let hp = h.as_ref().map_or(0, |h| h.0);
    let size = std::mem::size_of::<T>() as u64;

    if tuning.core != CorePolicy::Require
        && t <= super::nf4::SMALL_T_MAX
        && k % 32 == 0
        && xp % 16 == 0
    {
        // h in T (the caller's buffer or scratch, written in full by the down kernel),
        // then the fused pass over the 4-bit weight.
        let h_scratch;
        let hp = if hp != 0 {
            hp
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
            opts.active_dropout(),
        )?;
        let lora = MmLora {
            h: hp,
            b: bp,
            r,
            scale: opts.scale,
        };
        launch_mm::<T>(gpu, &desc, t, xp, biasp, yp, Some(lora))?;
        return Ok(Plan::of(Path::SmallFused));
    }

    let ptrs = FwdPtrs {
        x: xp,
        w: 0,
        a: ap,
        b: bp,
        bias: biasp,
        y: yp,
        h: hp,
        dora: None,
        nf4: Some(desc),
    };
    if tuning.nf4_core && core_takes::<T>(gpu, tuning, shape, &ptrs) {
        // U = s · drop(x) Aᵀ (and h) by the down kernel, then one GEMM-core launch whose
        // producer dequantizes the NF4 tiles into shared memory: y written once.
        return forward_core_launch::<T>(gpu, shape, opts, &ptrs, 0, 0);
    }
    // The dense GEMM core over each dequantized panel, with the panel's rows of B as the
    // low-rank slice and its bias: y[:, panel] written once, by TMA stores into y's
    // columns (row stride N), so N % 8 == 0, y 16-byte aligned and panels of a multiple
    // of 8 rows (or one panel); the rest of the core's rule as the dense LoRA linear (the
    // panel scratch is 16-byte aligned).
    let panel_core = FwdPtrs {
        w: 16, // a stand-in for the panel scratch's address, which is 16-byte aligned
        dora: None,
        nf4: None,
        ..ptrs
    };
    let pr = panel_rows(limit, n, k);
    let aligned_panels = pr >= n || pr.is_multiple_of(8); // every panel's y columns 16-byte aligned
    if n % 8 == 0
        && yp % 16 == 0
        && aligned_panels
        && core_takes::<T>(gpu, tuning, shape, &panel_core)
    {
        // U = s · drop(x) Aᵀ (and h) by the down kernel before the panels. (Computing it
        // in the first panel's core launch measured faster at N = 4096 but slower at
        // N = 11008 on an H100, unexplained; see docs/PERF_NOTES_GEMM.md.)
        let u = launch_u::<T>(gpu, shape, opts, &ptrs)?;
        let (up, _gu) = dptr(gpu, "u", &u)?;
        let r_bytes = (r as u64) * size;
        for_each_panel::<T>(gpu, limit, &desc, |_, n0, nc, pp| {
            let core = CorePtrs {
                x: xp,
                w: pp,
                y: yp + n0 as u64 * size,
                bias: if biasp != 0 {
                    biasp + n0 as u64 * size
                } else {
                    0
                },
                col_scale: 0,
                z: 0,
                low_rank: Some((up, bp + n0 as u64 * r_bytes, r)),
                nf4: None,
                ldy: n,
                ldu: 0,
                down: None,
                w_kn: false,
                ldbl: 0,
                tuning: *tuning,
            };
            gemm::launch_core::<T>(gpu, &core, t, nc, k)
        })?;
        return Ok(Plan {
            path: Path::CorePanels,
            fused_down: false,
            mma: gemm::mma_path(gpu, tuning),
            nf4_in_core: false,
        });
    }
    if tuning.core == CorePolicy::Require {
        return Err(super::plan::core_required_error::<T>(
            "qlora::forward",
            gpu,
            shape,
            opts,
        ));
    }
    forward_large::<T>(gpu, shape, opts, &ptrs, || {
        // y[:, panel] += x · deq(W[panel])ᵀ
        for_each_panel::<T>(gpu, limit, &desc, |_, n0, nc, pp| {
            gemm_rm_ld::<T>(
                gpu,
                t,
                nc,
                k,
                1.0,
                (xp, k),
                false,
                (pp, k),
                true,
                1.0,
                (yp + n0 as u64 * size, n),
            )
        })
    })?;
    Ok(Plan::of(Path::CublasPanels))
}

/// Backward from `dy` [T, N]: writes dX [T, K] (through deq(W)), dA [r, K] and dB [N, r].
/// `h` is what [`forward`] wrote; `weights.bias` is ignored (the base is frozen); the
/// dropout mask is regenerated from `opts`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &I,
    weights: QloraWeights<'_, Nf4Device, I>,
    h: &I,
    dy: &I,
    grads: LoraGrads<'_, O>,
) -> Result<Plan> {
    check_base(shape, weights.w.rows, weights.w.cols)?;
    check_backward_lens(
        shape,
        &BackwardLens {
            x: x.len(),
            w: shape.w_len(),
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
    let (t, k, n) = (shape.tokens, shape.in_features, shape.out_features);
    let tuning = &opts.tuning;
    let (desc, _gw) = weights.w.desc(gpu)?;
    let (xp, _gx) = dptr(gpu, "x", x)?;
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
    if opts.active_dropout().is_none() {
        if tuning.nf4_core
            && dx_core_takes::<T>(gpu, tuning, shape, t, dyp, DxWeight::Nf4(desc), ap, dxp)
        {
            // dX = dY deq(W) + G A in one launch of the NF4 NN core (G = s · dY B by
            // cuBLAS just before it), then dA = Gᵀ x and dB = s · dYᵀ h: no dense W.
            return backward_core_launch::<T>(gpu, shape, opts, &p, DxWeight::Nf4(desc));
        }
        // Panels narrower than COL_PANEL_MIN columns leave the core's clusters idle in
        // their one round of tiles (measured slower than the row panels at N = 11008 with
        // 16 MiB panels, 704 columns), so those take the row panels.
        let w = DxWeight::Nf4ColPanels(desc);
        if dx_core_takes::<T>(gpu, tuning, shape, t, dyp, w, ap, dxp) {
            // G = s · dY B by cuBLAS, then per column panel of W one dense NN core launch
            // writing dX's columns once (G A's columns as its extra K-slice); then dA
            // and dB.
            return backward_core_launch::<T>(gpu, shape, opts, &p, w);
        }
    }
    if tuning.core == CorePolicy::Require {
        return Err(super::plan::core_required_error::<T>(
            "qlora::backward",
            gpu,
            shape,
            opts,
        ));
    }
    let size = std::mem::size_of::<T>() as u64;
    backward_with::<T>(gpu, shape, opts, &p, |beta| {
        // dX = Σ_panels dY[:, panel] · deq(W[panel]) (+ beta · dX on the first panel).
        for_each_panel::<T>(gpu, panel_limit(tuning), &desc, |i, n0, nc, pp| {
            gemm_rm_ld::<T>(
                gpu,
                t,
                k,
                nc,
                1.0,
                (dyp + n0 as u64 * size, n),
                false,
                (pp, k),
                false,
                if i == 0 { beta } else { 1.0 },
                (dxp, k),
            )
        })
    })?;
    Ok(Plan::of(Path::CublasPanels))
}
