//! AdamW on the CPU: the oracle of [`crate::cuda::adamw`], bit for bit (the math, the
//! constants and the order of operations: [`crate::adamw`]). Unlike the other oracles it
//! computes in f32, not f64: torch's AdamW is defined by its sequence of f32 tensor
//! operations, and the oracle performs that sequence, each operation rounded once.
//!
//! [`step`] checks every argument (the hyper-parameters, `t`, each tensor's options and
//! the lengths of its buffers) before its first write: on any error no buffer has
//! changed.

use half::{bf16, f16};

use crate::adamw::{per_tensor, shared, AdamW, PerTensor, Shared, TensorOptions};
use crate::lora::check_len;
use crate::{Element, Result};

/// Where a tensor's updated parameters also go, rounded to nearest (even): the weights of
/// a model that computes in a lower precision than its f32 master weights.
#[derive(Debug, Default)]
pub enum ParamCopy<'a> {
    /// No copy.
    #[default]
    None,
    /// An f32 copy.
    F32(&'a mut [f32]),
    /// An f16 copy.
    F16(&'a mut [f16]),
    /// A bf16 copy.
    Bf16(&'a mut [bf16]),
}

impl ParamCopy<'_> {
    /// The copy's length, if there is one.
    pub(crate) fn len(&self) -> Option<usize> {
        match self {
            ParamCopy::None => None,
            ParamCopy::F32(c) => Some(c.len()),
            ParamCopy::F16(c) => Some(c.len()),
            ParamCopy::Bf16(c) => Some(c.len()),
        }
    }
}

/// One tensor of a step: `param`, `m` and `v` (f32) updated in place from `grad`, all
/// of one length; see [`crate::adamw`] for the layouts.
#[derive(Debug)]
pub struct Tensor<'a, G: Element> {
    /// The parameters (f32 master weights).
    pub param: &'a mut [f32],
    /// The first moment (zeros before step 1).
    pub m: &'a mut [f32],
    /// The second moment (zeros before step 1).
    pub v: &'a mut [f32],
    /// The gradient.
    pub grad: &'a [G],
    /// An optional rounded copy of the updated parameters.
    pub copy: ParamCopy<'a>,
    /// Learning-rate multiplier and weight-decay switch.
    pub options: TensorOptions,
}

impl<'a, G: Element> Tensor<'a, G> {
    /// A tensor with default options (`lr_scale` 1, weight decay on) and no copy.
    pub fn new(param: &'a mut [f32], m: &'a mut [f32], v: &'a mut [f32], grad: &'a [G]) -> Self {
        Tensor {
            param,
            m,
            v,
            grad,
            copy: ParamCopy::None,
            options: TensorOptions::default(),
        }
    }

    /// The same tensor with these options.
    pub fn with_options(self, options: TensorOptions) -> Self {
        Tensor { options, ..self }
    }

    /// The same tensor, also writing its updated parameters to `copy`.
    pub fn with_copy(self, copy: ParamCopy<'a>) -> Self {
        Tensor { copy, ..self }
    }
}

/// The update of one element: the formula of [`crate::adamw`], each operation an IEEE
/// f32 operation rounded to nearest (as the kernel's PTX).
#[inline]
pub(crate) fn update(k: &Shared, c: PerTensor, g: f32, p: &mut f32, m: &mut f32, v: &mut f32) {
    let pd = *p * c.decay;
    let d = g - *m;
    *m = k.lerp_coeff.mul_add(d, if k.lerp_base_m { *m } else { g });
    *v = *v * k.beta2 + (k.c2 * g) * g;
    let den = v.sqrt() / k.bc2_sqrt + k.eps;
    *p = pd + (c.neg_step * *m) / den;
}

/// Checks one tensor's lengths (every buffer as long as `param`).
pub(crate) fn check_lengths<G: Element>(t: &Tensor<'_, G>) -> Result<()> {
    let n = t.param.len();
    check_len("m", t.m.len(), n)?;
    check_len("v", t.v.len(), n)?;
    check_len("grad", t.grad.len(), n)?;
    if let Some(c) = t.copy.len() {
        check_len("copy", c, n)?;
    }
    Ok(())
}

/// One AdamW step `t` (1-based) over `tensors`, in place: the oracle of
/// [`crate::cuda::adamw::step`]. Errors (before any write): a bad hyper-parameter
/// ([`AdamW::validate`]), `t` = 0, a tensor's `lr_scale` not finite or negative, step
/// constants beyond f32, or a buffer whose length differs from its `param`'s
/// ([`crate::Error::Length`] naming `m`, `v`, `grad` or `copy`).
pub fn step<G: Element>(opt: &AdamW, t: u64, tensors: &mut [Tensor<'_, G>]) -> Result<()> {
    let k = shared(opt, t)?;
    let consts = tensors
        .iter()
        .map(|x| {
            check_lengths(x)?;
            per_tensor(opt, t, &x.options)
        })
        .collect::<Result<Vec<_>>>()?;
    for (x, c) in tensors.iter_mut().zip(consts) {
        let n = x.param.len();
        for i in 0..n {
            update(
                &k,
                c,
                x.grad[i].to_f32(),
                &mut x.param[i],
                &mut x.m[i],
                &mut x.v[i],
            );
        }
        match &mut x.copy {
            ParamCopy::None => {}
            ParamCopy::F32(o) => o.copy_from_slice(x.param),
            ParamCopy::F16(o) => round_into(x.param, o),
            ParamCopy::Bf16(o) => round_into(x.param, o),
        }
    }
    Ok(())
}

fn round_into<L: Element>(p: &[f32], out: &mut [L]) {
    for (o, &x) in out.iter_mut().zip(p) {
        *o = L::from_f32(x);
    }
}
