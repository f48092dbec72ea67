//! [`FusedAdamW`]: torch's AdamW ([`crate::adamw`]) over candle `Var`s, every
//! parameter of a model updated by one launch a step on a CUDA device.
//!
//! candle hands out a tensor's storage mutably only inside an in-place op
//! (`Tensor::inplace_op1`), one tensor at a time. The step nests one such op per
//! parameter: each borrows its `Var`'s buffer and calls the next, and the innermost one
//! holds every parameter's buffer at once and queues the crate's multi-tensor kernel
//! ([`crate::cuda::adamw::step`]) on the device's stream. Nothing is copied and the
//! host is not synchronized; the moments live in the optimizer.

use candle_core::backprop::GradStore;
#[cfg(feature = "candle-cuda")]
use candle_core::{CpuStorage, InplaceOp1, Layout};
use candle_core::{DType as CDType, Device, Result, Tensor, Var};

use super::to_candle;
use crate::adamw::{AdamW, TensorOptions};

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

enum State {
    Cpu(Vec<(Vec<f32>, Vec<f32>)>),
    #[cfg(feature = "candle-cuda")]
    Cuda(
        std::sync::Arc<crate::cuda::Gpu>,
        Vec<(
            cudarc::driver::CudaSlice<f32>,
            cudarc::driver::CudaSlice<f32>,
        )>,
    ),
}

/// AdamW over f32 `Var`s (the adapters' master weights), each with its own learning-rate
/// multiplier and weight-decay switch ([`TensorOptions`]; LoRA+ gives B's tensors
/// `lr_scale = ratio`). A parameter without a gradient in a step is left alone (its
/// moments too); the step count is the optimizer's (as candle-nn's AdamW; torch counts
/// per parameter, which differs only for parameters that miss steps). On a CUDA device one step is one kernel launch for all
/// parameters; on the CPU it runs the oracle ([`crate::cpu::adamw`]), the same bits.
pub struct FusedAdamW {
    params: Vec<(Var, TensorOptions)>,
    hyper: AdamW,
    t: u64,
    state: State,
}

impl std::fmt::Debug for FusedAdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedAdamW")
            .field("params", &self.params.len())
            .field("hyper", &self.hyper)
            .field("t", &self.t)
            .finish()
    }
}

impl FusedAdamW {
    /// An optimizer over `params` (f32, contiguous, all on one device), moments zero.
    pub fn new(params: Vec<(Var, TensorOptions)>, hyper: AdamW) -> Result<Self> {
        hyper.validate().map_err(to_candle)?;
        let device = match params.first() {
            Some((v, _)) => v.device().clone(),
            None => Device::Cpu,
        };
        for (i, (v, _)) in params.iter().enumerate() {
            if v.dtype() != CDType::F32 {
                return Err(msg(format!(
                    "FusedAdamW: parameter {i} is {:?}; keep f32 master weights",
                    v.dtype()
                )));
            }
            if !v.device().same_device(&device) {
                return Err(msg(format!(
                    "FusedAdamW: parameter {i} is on another device"
                )));
            }
            if !v.is_contiguous() {
                return Err(msg(format!("FusedAdamW: parameter {i} is not contiguous")));
            }
        }
        let state = match &device {
            Device::Cpu => State::Cpu(
                params
                    .iter()
                    .map(|(v, _)| (vec![0f32; v.elem_count()], vec![0f32; v.elem_count()]))
                    .collect(),
            ),
            #[cfg(feature = "candle-cuda")]
            Device::Cuda(d) => {
                let gpu = super::gpu_cache::gpu(d)?;
                let mut mv = Vec::with_capacity(params.len());
                for (v, _) in &params {
                    mv.push((
                        d.alloc_zeros::<f32>(v.elem_count())?,
                        d.alloc_zeros::<f32>(v.elem_count())?,
                    ));
                }
                State::Cuda(gpu, mv)
            }
            other => {
                return Err(msg(format!(
                    "FusedAdamW: device {other:?} is not supported"
                )))
            }
        };
        Ok(FusedAdamW {
            params,
            hyper,
            t: 0,
            state,
        })
    }

    /// The base learning rate.
    pub fn learning_rate(&self) -> f64 {
        self.hyper.lr
    }

    /// Sets the base learning rate (a schedule); checked as [`AdamW::validate`].
    pub fn set_learning_rate(&mut self, lr: f64) -> Result<()> {
        let h = AdamW { lr, ..self.hyper };
        h.validate().map_err(to_candle)?;
        self.hyper = h;
        Ok(())
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// One step from `grads` (f32 gradients of the parameters, as candle's backward
    /// gives them for f32 `Var`s). Checks everything before any write.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let mut live = Vec::new();
        for (i, (v, _)) in self.params.iter().enumerate() {
            if let Some(g) = grads.get(v) {
                if g.dims() != v.dims() {
                    return Err(msg(format!(
                        "FusedAdamW: gradient {i} is {:?}, its parameter {:?}",
                        g.dims(),
                        v.dims()
                    )));
                }
                live.push((i, g.to_dtype(CDType::F32)?.contiguous()?));
            }
        }
        if live.is_empty() {
            return Ok(());
        }
        let t = self.t + 1;
        match &mut self.state {
            State::Cpu(mv) => {
                let mut params: Vec<Vec<f32>> = live
                    .iter()
                    .map(|(i, _)| self.params[*i].0.flatten_all()?.to_vec1::<f32>())
                    .collect::<Result<_>>()?;
                let gs: Vec<Vec<f32>> = live
                    .iter()
                    .map(|(_, g)| g.flatten_all()?.to_vec1::<f32>())
                    .collect::<Result<_>>()?;
                let mut moments: Vec<&mut (Vec<f32>, Vec<f32>)> = Vec::new();
                let mut k = 0;
                for (j, m) in mv.iter_mut().enumerate() {
                    if k < live.len() && live[k].0 == j {
                        moments.push(m);
                        k += 1;
                    }
                }
                let mut ts: Vec<crate::cpu::adamw::Tensor<'_, f32>> = params
                    .iter_mut()
                    .zip(moments)
                    .zip(&gs)
                    .zip(&live)
                    .map(|(((p, (m, v)), g), (i, _))| {
                        crate::cpu::adamw::Tensor::new(p, m, v, g).with_options(self.params[*i].1)
                    })
                    .collect();
                crate::cpu::adamw::step(&self.hyper, t, &mut ts).map_err(to_candle)?;
                drop(ts);
                for ((i, _), p) in live.iter().zip(params) {
                    let v = &self.params[*i].0;
                    v.set(&Tensor::from_vec(p, v.dims(), &Device::Cpu)?)?;
                }
            }
            #[cfg(feature = "candle-cuda")]
            State::Cuda(gpu, mv) => {
                cuda_step(gpu, &self.hyper, t, &self.params, mv, &live)?;
            }
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(feature = "candle-cuda")]
fn cuda_step(
    gpu: &crate::cuda::Gpu,
    hyper: &AdamW,
    t: u64,
    params: &[(Var, TensorOptions)],
    mv: &mut [(
        cudarc::driver::CudaSlice<f32>,
        cudarc::driver::CudaSlice<f32>,
    )],
    live: &[(usize, Tensor)],
) -> Result<()> {
    use candle_core::Storage;
    use std::cell::RefCell;

    // The gradients, read-locked for the whole step.
    let guards: Vec<_> = live.iter().map(|(_, g)| g.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(live.len());
    for (s, l) in &guards {
        let Storage::Cuda(cs) = &**s else {
            return Err(msg(
                "FusedAdamW: a gradient is not on the CUDA device".into()
            ));
        };
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| msg("FusedAdamW: a gradient is not contiguous".into()))?;
        views.push(cs.as_cuda_slice::<f32>()?.slice(a..b));
    }
    let mut picked: Vec<&mut (
        cudarc::driver::CudaSlice<f32>,
        cudarc::driver::CudaSlice<f32>,
    )> = Vec::with_capacity(live.len());
    let mut k = 0;
    for (j, m) in mv.iter_mut().enumerate() {
        if k < live.len() && live[k].0 == j {
            picked.push(m);
            k += 1;
        }
    }
    let vars: Vec<Var> = live.iter().map(|(i, _)| params[*i].0.clone()).collect();
    let opts: Vec<TensorOptions> = live.iter().map(|(i, _)| params[*i].1).collect();
    let mut finish = |ps: Vec<&mut cudarc::driver::CudaSlice<f32>>| -> Result<()> {
        let mut ts: Vec<crate::cuda::adamw::Tensor<'_, f32>> = Vec::with_capacity(ps.len());
        for (((p, mvi), g), o) in ps.into_iter().zip(picked.iter_mut()).zip(&views).zip(&opts) {
            let (m, v) = &mut **mvi;
            ts.push(crate::cuda::adamw::Tensor::new(p, m, v, g).with_options(*o));
        }
        crate::cuda::adamw::step(gpu, hyper, t, &mut ts).map_err(to_candle)
    };
    let finish: RefCell<&mut Finish<'_>> = RefCell::new(&mut finish);
    let (first, rest) = vars.split_first().expect("live is not empty");
    first.inplace_op1(&Collect {
        rest,
        acc: RefCell::new(Some(Vec::new())),
        finish: &finish,
    })
}

#[cfg(feature = "candle-cuda")]
type Finish<'s> = dyn for<'x> FnMut(Vec<&'x mut cudarc::driver::CudaSlice<f32>>) -> Result<()> + 's;

/// Borrows one parameter's buffer and recurses into the next; the last one runs the
/// step with all of them.
#[cfg(feature = "candle-cuda")]
struct Collect<'s, 'a, 'f> {
    rest: &'s [Var],
    acc: std::cell::RefCell<Option<Vec<&'a mut cudarc::driver::CudaSlice<f32>>>>,
    finish: &'s std::cell::RefCell<&'s mut Finish<'f>>,
}

#[cfg(feature = "candle-cuda")]
impl InplaceOp1 for Collect<'_, '_, '_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        Err(msg(
            "FusedAdamW: a parameter is on the CPU while the others are on CUDA".into(),
        ))
    }

    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        let n = l.shape().elem_count();
        if l.contiguous_offsets() != Some((0, n)) {
            return Err(msg(
                "FusedAdamW: a parameter is a view, not a whole buffer".into()
            ));
        }
        let mine = s.as_cuda_slice_mut::<f32>()?;
        if mine.len() != n {
            return Err(msg(
                "FusedAdamW: a parameter does not own its whole buffer".into()
            ));
        }
        let prev = self
            .acc
            .borrow_mut()
            .take()
            .ok_or_else(|| msg("FusedAdamW: re-entered".into()))?;
        // Covariance: the earlier borrows outlive this one, so they fit a Vec of the
        // shorter lifetime.
        let mut acc: Vec<&mut cudarc::driver::CudaSlice<f32>> = prev;
        acc.push(mine);
        match self.rest.split_first() {
            None => (self.finish.borrow_mut())(acc),
            Some((next, rest)) => next.inplace_op1(&Collect {
                rest,
                acc: std::cell::RefCell::new(Some(acc)),
                finish: self.finish,
            }),
        }
    }
}
