//! CUDA ops of QDoRA: DoRA ([`crate::dora`]) over an NF4 base weight ([`Nf4Device`]).
//! Same arguments as [`crate::cpu::qdora`], the oracle: DoRA over W dequantized to the
//! activation type, as peft computes DoRA over a bitsandbytes `Linear4bit`.
//!
//! Paths (every product with W goes through the NF4 weight; the dense W never exists in
//! device memory):
//! - the row norms: W dequantized one row panel at a time (at most
//!   [`crate::cuda::qlora::PANEL_ELEMS`] elements of scratch), each panel's norms by the
//!   DoRA norm kernel (`‖W + s·BA‖` from the elements, no expansion of the square);
//! - forward without dropout: the norms, the QLoRA linear's forward without bias (T ≤
//!   32: one pass over the 4-bit weight; else row panels into cuBLAS), then the DoRA
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
use super::dora::{backward_over, forward_dropout, launch_scale, Base, DropFwdPtrs};
use super::nf4::Nf4Device;
use super::plan::{Path, Plan};
use super::{dptr, dptr_mut, Gpu};
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
        h,
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
