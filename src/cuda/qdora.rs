//! CUDA ops of QDoRA: DoRA ([`crate::dora`]) over an NF4 base weight ([`Nf4Device`]).
//! Same arguments as [`crate::cpu::qdora`], the oracle: DoRA over W dequantized to the
//! activation type, as peft computes DoRA over a bitsandbytes `Linear4bit`.
//!
//! Paths (every product with W goes through the NF4 weight; the dense W exists in device
//! memory only as a bounded panel of scratch):
//! - the row norms: W dequantized one row panel at a time (at most
//!   [`crate::cuda::qlora::PANEL_ELEMS`] elements of scratch), each panel's norms by the
//!   DoRA norm kernel (`‖W + s·BA‖` from the elements, no expansion of the square);
//! - forward without dropout, T > 32, where all of W fits one panel and the dense DoRA
//!   forward's core rule holds: W dequantized once into the panel, the norms and
//!   `g = m/‖·‖` from it in one launch, then one GEMM-core launch whose epilogue writes
//!   `y = g ⊙ acc + bias` (and `z`): no scale pass, no second dequantization;
//! - other forwards without dropout: the norms, the QLoRA linear's forward without bias
//!   (T ≤ 32: one pass over the 4-bit weight; else its row panels), then the DoRA
//!   scale-and-bias pass;
//! - forward under dropout and backward: the dense DoRA composition
//!   ([`crate::cuda::dora`]) with every `x Wᵀ` and `dy W` done over dequantized row
//!   panels (backward dequantizes W again in each token chunk); except that on sm_90
//!   without dropout, where the QLoRA backward takes its column panels (f16/bf16,
//!   r ≤ 64, N and K multiples of 8, enough tiles, panels of all of W or ≥ 1024
//!   columns, dX 16-byte aligned), each chunk's `dX = (dy ⊙ g) deq(W) + G A` is one
//!   dense NN core launch per column panel, writing dX's columns once.
//!
//! Extra device memory: as DoRA, plus one panel.

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::base::{panel_limit, PANEL_ELEMS};
use super::dora::{backward_over, forward_dropout, launch_norm_g, launch_scale, Base, DropFwdPtrs};
use super::lora::{core_takes, forward_core_launch, FwdPtrs};
use super::nf4::{launch_dequant, Nf4Device, SMALL_T_MAX};
use super::plan::{Path, Plan};
use super::{dptr, dptr_mut, Gpu, LkNf4};
use crate::dora::{
    check_forward, check_weight_op, DoraGrads, DoraOutputs, DoraSaved, DoraWeights, ForwardLens,
};
use crate::qlora::{check_base, QloraWeights};
use crate::tuning::CorePolicy;
use crate::{Element, LoraOptions, LoraShape, Result};

/// The row norms `‖deq(W) + s·BA‖` \[N\] into an f32 buffer.
pub fn weight_norm<T: Element, I: DevicePtr<T>, F: DevicePtrMut<f32>>(
    gpu: &Gpu,
    shape: &LoraShape,
    scale: f32,
    w: &Nf4Device,
    a: &I,
    b: &I,
    norm: &mut F,
) -> Result<()> {
    check_weight_op(
        shape,
        scale,
        shape.w_len(),
        a.len(),
        b.len(),
        ("norm", norm.len()),
    )?;
    check_base(shape, w.rows, w.cols)?;
    let (desc, _gw) = w.desc(gpu)?;
    let (ap, _ga) = dptr(gpu, "a", a)?;
    let (bp, _gb) = dptr(gpu, "b", b)?;
    let (np, _gn) = dptr_mut(gpu, "norm", norm)?;
    Base::Nf4(desc, PANEL_ELEMS).norm::<T>(gpu, shape, scale, ap, bp, np, 0)
}

/// peft's magnitude initialisation over the NF4 weight: `m = ‖deq(W) + s·BA‖` per row.
pub fn magnitude_init<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
    gpu: &Gpu,
    shape: &LoraShape,
    scale: f32,
    w: &Nf4Device,
    a: &I,
    b: &I,
    magnitude: &mut O,
) -> Result<()> {
    check_weight_op(
        shape,
        scale,
        shape.w_len(),
        a.len(),
        b.len(),
        ("magnitude", magnitude.len()),
    )?;
    check_base(shape, w.rows, w.cols)?;
    let (desc, _gw) = w.desc(gpu)?;
    let (ap, _ga) = dptr(gpu, "a", a)?;
    let (bp, _gb) = dptr(gpu, "b", b)?;
    let (mp, _gm) = dptr_mut(gpu, "magnitude", magnitude)?;
    // SAFETY of the scratch: the norm kernels write all N entries.
    let norm = gpu.scratch::<f32>(shape.out_features)?;
    let (np, _gn) = dptr(gpu, "norm", &norm)?;
    Base::Nf4(desc, PANEL_ELEMS).norm::<T>(gpu, shape, scale, ap, bp, np, mp)
}

/// Forward: writes `y` and, where asked, `h`, the norms and `z` (see [`crate::dora`]).
/// Queued on the GPU's stream; returns the [`Plan`] of its QLoRA linear (no dropout) or
/// [`Path::CublasPanels`] (dropout). [`CorePolicy::Require`] errors before any launch
/// under dropout or where the QLoRA forward's core path cannot run.
pub fn forward<T, I, O, F>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &I,
    weights: DoraWeights<'_, I, Nf4Device>,
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
            w: shape.w_len(),
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
    check_base(shape, weights.w.rows, weights.w.cols)?;
    let (t, n) = (shape.tokens, shape.out_features);
    if opts.tuning.core == CorePolicy::Require && opts.active_dropout().is_some() {
        return Err(crate::Error::Unsupported {
            op: "qdora::forward",
            reason: "the tuning requires the GEMM core, which takes no dropout here".into(),
        });
    }
    let (desc, _gw) = weights.w.desc(gpu)?;
    let base = Base::Nf4(desc, panel_limit(&opts.tuning));
    let (xp, _gx) = dptr(gpu, "x", x)?;
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
        mut h,
        norm,
        z: z_out,
    } = out;
    // SAFETY of the scratch: the norm kernels write all N entries before any read.
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
    match opts.active_dropout() {
        None => {
            {
                let (yp, _gy) = dptr_mut(gpu, "y", &mut *y)?;
                let hd = match h.as_mut() {
                    Some(hb) => Some(dptr_mut(gpu, "h", &mut **hb)?),
                    None => None,
                };
                let p = FwdPtrs {
                    x: xp,
                    w: 0,
                    a: ap,
                    b: bp,
                    bias: biasp,
                    y: yp,
                    h: hd.as_ref().map_or(0, |h| h.0),
                    dora: None,
                    nf4: None,
                };
                if let Some(plan) =
                    forward_one_panel::<T>(gpu, shape, opts, &desc, &p, mp, np, zptr)?
                {
                    return Ok(plan);
                }
            }
            // y = z = x deq(W)ᵀ + s·h Bᵀ by the QLoRA linear (no bias), then the scale.
            let qw = QloraWeights {
                w: weights.w,
                a: weights.a,
                b: weights.b,
                bias: None,
            };
            // The linear first: with a required core it errors before any launch.
            let plan = super::qlora::forward(gpu, shape, opts, x, qw, y, h)?;
            base.norm::<T>(gpu, shape, opts.scale, ap, bp, np, 0)?;
            let (yp, _gy) = dptr_mut(gpu, "y", y)?;
            launch_scale::<T>(gpu, t, n, yp, zptr, biasp, mp, np, 0.0)?;
            Ok(plan)
        }
        Some(d) => {
            base.norm::<T>(gpu, shape, opts.scale, ap, bp, np, 0)?;
            let (yp, _gy) = dptr_mut(gpu, "y", y)?;
            let hd = match h {
                Some(h) => Some(dptr_mut(gpu, "h", h)?),
                None => None,
            };
            let p = DropFwdPtrs {
                x: xp,
                a: ap,
                b: bp,
                m: mp,
                norm: np,
                bias: biasp,
                y: yp,
                h: hd.as_ref().map_or(0, |h| h.0),
                z: zptr,
            };
            forward_dropout::<T>(gpu, shape, opts, d, &p, &base)?;
            Ok(Plan::of(Path::CublasPanels))
        }
    }
}

/// The forward without dropout where all of W fits one panel (N·K ≤ the panel bound),
/// T > [`SMALL_T_MAX`] and the dense DoRA forward's core rule holds: W dequantized once
/// into the panel, the norms and `g = m/‖·‖` from it in one launch, then one GEMM-core
/// launch whose epilogue writes `y = g ⊙ acc + bias` and `z = acc` (as the dense DoRA
/// forward). `None`, with nothing launched, where it does not apply.
#[allow(clippy::too_many_arguments)]
fn forward_one_panel<T: Element>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    desc: &LkNf4,
    p: &FwdPtrs,
    mp: u64,
    np: u64,
    zptr: u64,
) -> Result<Option<Plan>> {
    let (t, k, n) = (shape.tokens, shape.in_features, shape.out_features);
    let fits = n
        .checked_mul(k)
        .is_some_and(|e| e <= panel_limit(&opts.tuning));
    // The panel scratch is 16-byte aligned: 16 stands in for its address.
    let dense = FwdPtrs {
        w: 16,
        dora: None,
        nf4: None,
        ..*p
    };
    if t <= SMALL_T_MAX
        || !fits
        || !zptr.is_multiple_of(4)
        || !core_takes::<T>(gpu, &opts.tuning, shape, &dense)
    {
        return Ok(None);
    }
    // SAFETY of the scratch: the dequantize kernel writes all N·K elements before the
    // norm and GEMM launches (stream order) read them; g is written in full by the norm
    // kernel before the GEMM reads it.
    let panel = gpu.scratch::<T>(n * k)?;
    let (wp, _gw) = dptr(gpu, "panel", &panel)?;
    launch_dequant::<T>(gpu, desc, (0, 0), n * k, wp, false)?;
    let g = gpu.scratch::<f32>(n)?;
    let (gp, _gg) = dptr(gpu, "g", &g)?;
    launch_norm_g::<T>(gpu, shape, opts.scale, wp, p.a, p.b, np, 0, Some((mp, gp)))?;
    let plan = forward_core_launch::<T>(gpu, shape, opts, &FwdPtrs { w: wp, ..dense }, gp, zptr)?;
    Ok(Some(Plan {
        path: Path::CorePanels,
        ..plan
    }))
}

/// Backward from `dy` [T, N]: dX (through deq(W)), dA, dB and dm, from what forward
/// saved (`h`, the norms, and `z` if given; else `z` is recomputed chunk by chunk).
/// Returns the [`Plan`] taken ([`Path::CorePanels`] where each chunk's dX ran on the NN
/// core over column panels, else [`Path::CublasPanels`]).
#[allow(clippy::too_many_arguments)]
pub fn backward<T, I, O, F>(
    gpu: &Gpu,
    shape: &LoraShape,
    opts: &LoraOptions,
    x: &I,
    weights: DoraWeights<'_, I, Nf4Device>,
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
    backward_over(
        gpu,
        shape,
        opts,
        x,
        weights,
        shape.w_len(),
        saved,
        dy,
        grads,
        || {
            check_base(shape, weights.w.rows, weights.w.cols)?;
            let (desc, guards) = weights.w.desc(gpu)?;
            Ok((Base::Nf4(desc, panel_limit(&opts.tuning)), guards))
        },
    )
}
