//! The candle custom ops behind the layers: `LinearOp` (LoRA / DoRA over a dense or
//! NF4 base, forward and backward) and `EmbedOp` (gather + NEFTune noise, no backward).
//!
//! A `LinearOp` is built per forward call; it holds the frozen operands (base, bias),
//! the options and, after its forward, what backward needs (h, and DoRA's norms and
//! z). candle keeps it in the output's graph node and hands it back to `bwd`.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType as CDType, Layout, Shape, Storage};
use candle_core::{Result, Tensor, WithDType};

use super::layers::FrozenWeight;
use super::to_candle;
use crate::neftune::{EmbedShape, Noise, SeqLen};
use crate::{cpu, DoraGrads, DoraOutputs, DoraSaved, DoraWeights, Element};
use crate::{LoraGrads, LoraOptions, LoraShape, LoraWeights, QloraWeights};

/// Runs `$body` with `$T` bound to the element type of candle dtype `$d`.
macro_rules! by_dtype {
    ($d:expr, $what:expr, $T:ident => $body:expr) => {
        match $d {
            CDType::F32 => {
                type $T = f32;
                $body
            }
            CDType::F16 => {
                type $T = half::f16;
                $body
            }
            CDType::BF16 => {
                type $T = half::bf16;
                $body
            }
            other => Err(candle_core::Error::Msg(format!(
                "{}: dtype {other:?} is not supported (f32, f16 or bf16)",
                $what
            ))),
        }
    };
}

/// LoRA or DoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// args (x, A, B).
    Lora,
    /// args (x, A, [B flattened; m]): candle's custom ops take three tensors, so B and
    /// the magnitude travel as one (the layer concatenates them; `cat`'s backward splits
    /// the gradient again).
    Dora,
}

/// What the forward keeps for backward.
pub(crate) struct Saved {
    h: Storage,
    norm: Option<Storage>,
    z: Option<Storage>,
}

/// One LoRA / DoRA linear call.
pub(crate) struct LinearOp {
    pub kind: Kind,
    pub base: FrozenWeight,
    pub bias: Option<Tensor>,
    pub k: usize,
    pub n: usize,
    pub r: usize,
    pub opts: LoraOptions,
    pub saved: Mutex<Option<Arc<Saved>>>,
}

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

/// The contiguous element range of a layout.
fn range(l: &Layout, name: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| msg(format!("lora-kernels: `{name}` is not contiguous")))
}

fn cpu_slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<&'a [T]> {
    let (a, b) = range(l, name)?;
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

fn cpu_of<'a>(s: &'a Storage, name: &str) -> Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => Err(msg(format!(
            "lora-kernels: `{name}` is not on the CPU while the input is"
        ))),
    }
}

fn cpu_tensor<T: WithDType>(v: Vec<T>, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(
        Storage::Cpu(T::to_cpu_storage_owned(v)),
        shape,
        BackpropOp::none(),
        false,
    )
}

fn zeros<T: WithDType>(n: usize) -> Vec<T> {
    vec![T::from_f64(0.0); n]
}

impl LinearOp {
    fn shape(&self, x: &Layout) -> Result<LoraShape> {
        let numel = x.shape().elem_count();
        if self.k == 0 || !numel.is_multiple_of(self.k) {
            return Err(msg(format!(
                "lora-kernels: x has {numel} elements, not a multiple of in_features {}",
                self.k
            )));
        }
        Ok(LoraShape::new(numel / self.k, self.k, self.n, self.r))
    }

    fn name(&self) -> &'static str {
        match (self.kind, &self.base) {
            (Kind::Lora, FrozenWeight::Dense(_)) => "lora-linear",
            (Kind::Lora, FrozenWeight::Nf4(_)) => "qlora-linear",
            (Kind::Dora, FrozenWeight::Dense(_)) => "dora-linear",
            (Kind::Dora, FrozenWeight::Nf4(_)) => "qdora-linear",
        }
    }

    fn save(&self, s: Saved) {
        if let Ok(mut g) = self.saved.lock() {
            *g = Some(Arc::new(s));
        }
    }

    fn saved(&self) -> Result<Arc<Saved>> {
        self.saved
            .lock()
            .map_err(|_| msg("lora-kernels: saved state poisoned".into()))?
            .clone()
            .ok_or_else(|| msg(format!("{}: backward before forward", self.name())))
    }

    // -- CPU ------------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn fwd_cpu<T: Element + WithDType>(
        &self,
        sh: &LoraShape,
        x: &[T],
        a: &[T],
        b3: &[T],
    ) -> Result<(CpuStorage, Saved)> {
        let (t, n, r) = (sh.tokens, sh.out_features, sh.rank);
        let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bias_guard {
            Some((s, l)) => Some(cpu_slice::<T>(cpu_of(s, "bias")?, l, "bias")?),
            None => None,
        };
        let mut y = zeros::<T>(t * n);
        let mut h = zeros::<T>(t * r);
        let o = &self.opts;
        let saved = match self.kind {
            Kind::Lora => {
                match &self.base {
                    FrozenWeight::Dense(w) => {
                        let (ws, wl) = w.storage_and_layout();
                        let w = cpu_slice::<T>(cpu_of(&ws, "w")?, wl, "w")?;
                        let wts = LoraWeights { w, a, b: b3, bias };
                        cpu::lora::forward::<T>(sh, o, x, wts, &mut y, Some(&mut h))
                    }
                    FrozenWeight::Nf4(q) => {
                        let w = q.host()?;
                        let wts = QloraWeights { w, a, b: b3, bias };
                        cpu::qlora::forward::<T>(sh, o, x, wts, &mut y, Some(&mut h))
                    }
                }
                .map_err(to_candle)?;
                Saved {
                    h: Storage::Cpu(T::to_cpu_storage_owned(h)),
                    norm: None,
                    z: None,
                }
            }
            Kind::Dora => {
                let (b, m) = b3.split_at(n * r);
                let mut norm = zeros::<f32>(n);
                let mut z = zeros::<T>(t * n);
                let out = DoraOutputs {
                    y: &mut y[..],
                    h: Some(&mut h[..]),
                    norm: Some(&mut norm[..]),
                    z: Some(&mut z[..]),
                };
                match &self.base {
                    FrozenWeight::Dense(w) => {
                        let (ws, wl) = w.storage_and_layout();
                        let w = cpu_slice::<T>(cpu_of(&ws, "w")?, wl, "w")?;
                        let wts = DoraWeights {
                            w,
                            a,
                            b,
                            bias,
                            magnitude: m,
                        };
                        cpu::dora::forward::<T>(sh, o, x, wts, out)
                    }
                    FrozenWeight::Nf4(q) => {
                        let w = q.host()?;
                        let wts = DoraWeights {
                            w,
                            a,
                            b,
                            bias,
                            magnitude: m,
                        };
                        cpu::qdora::forward::<T>(sh, o, x, wts, out)
                    }
                }
                .map_err(to_candle)?;
                Saved {
                    h: Storage::Cpu(T::to_cpu_storage_owned(h)),
                    norm: Some(Storage::Cpu(f32::to_cpu_storage_owned(norm))),
                    z: Some(Storage::Cpu(T::to_cpu_storage_owned(z))),
                }
            }
        };
        Ok((T::to_cpu_storage_owned(y), saved))
    }

    #[allow(clippy::too_many_arguments)]
    fn bwd_cpu<T: Element + WithDType>(
        &self,
        sh: &LoraShape,
        saved: &Saved,
        x: &Tensor,
        a: &Tensor,
        b3: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (t, k, n, r) = (sh.tokens, sh.in_features, sh.out_features, sh.rank);
        let (xs, xl) = x.storage_and_layout();
        let (as_, al) = a.storage_and_layout();
        let (bs, bl) = b3.storage_and_layout();
        let (ds, dl) = dy.storage_and_layout();
        let x = cpu_slice::<T>(cpu_of(&xs, "x")?, xl, "x")?;
        let a = cpu_slice::<T>(cpu_of(&as_, "a")?, al, "a")?;
        let b3 = cpu_slice::<T>(cpu_of(&bs, "b")?, bl, "b")?;
        let dy = cpu_slice::<T>(cpu_of(&ds, "dy")?, dl, "dy")?;
        let h = T::cpu_storage_as_slice(cpu_of(&saved.h, "h")?)?;
        let o = &self.opts;
        let mut dx = zeros::<T>(t * k);
        let mut da = zeros::<T>(r * k);
        match self.kind {
            Kind::Lora => {
                let mut db = zeros::<T>(n * r);
                let g = LoraGrads {
                    dx: &mut dx[..],
                    da: &mut da[..],
                    db: &mut db[..],
                };
                match &self.base {
                    FrozenWeight::Dense(w) => {
                        let (ws, wl) = w.storage_and_layout();
                        let w = cpu_slice::<T>(cpu_of(&ws, "w")?, wl, "w")?;
                        let wts = LoraWeights {
                            w,
                            a,
                            b: b3,
                            bias: None,
                        };
                        cpu::lora::backward::<T>(sh, o, x, wts, h, dy, g)
                    }
                    FrozenWeight::Nf4(q) => {
                        let wts = QloraWeights {
                            w: q.host()?,
                            a,
                            b: b3,
                            bias: None,
                        };
                        cpu::qlora::backward::<T>(sh, o, x, wts, h, dy, g)
                    }
                }
                .map_err(to_candle)?;
                Ok((
                    cpu_tensor(dx, (t, k)),
                    cpu_tensor(da, (r, k)),
                    cpu_tensor(db, (n, r)),
                ))
            }
            Kind::Dora => {
                let (b, m) = b3.split_at(n * r);
                let norm = match &saved.norm {
                    Some(s) => f32::cpu_storage_as_slice(cpu_of(s, "norm")?)?,
                    None => return Err(msg("dora: the forward saved no norms".into())),
                };
                let z = match &saved.z {
                    Some(s) => Some(T::cpu_storage_as_slice(cpu_of(s, "z")?)?),
                    None => None,
                };
                let mut dbm = zeros::<T>(n * r + n);
                let (db, dm) = dbm.split_at_mut(n * r);
                let g = DoraGrads {
                    dx: &mut dx[..],
                    da: &mut da[..],
                    db,
                    dm,
                };
                let sv = DoraSaved { h, norm, z };
                match &self.base {
                    FrozenWeight::Dense(w) => {
                        let (ws, wl) = w.storage_and_layout();
                        let w = cpu_slice::<T>(cpu_of(&ws, "w")?, wl, "w")?;
                        let wts = DoraWeights {
                            w,
                            a,
                            b,
                            bias: None,
                            magnitude: m,
                        };
                        cpu::dora::backward::<T>(sh, o, x, wts, sv, dy, g)
                    }
                    FrozenWeight::Nf4(q) => {
                        let wts = DoraWeights {
                            w: q.host()?,
                            a,
                            b,
                            bias: None,
                            magnitude: m,
                        };
                        cpu::qdora::backward::<T>(sh, o, x, wts, sv, dy, g)
                    }
                }
                .map_err(to_candle)?;
                Ok((
                    cpu_tensor(dx, (t, k)),
                    cpu_tensor(da, (r, k)),
                    cpu_tensor(dbm, (n * r + n,)),
                ))
            }
        }
    }
}

#[cfg(feature = "candle-cuda")]
mod gpu {
    //! The CUDA side of `LinearOp` and `EmbedOp`.
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};

    use super::*;
    use crate::cuda::{self, Gpu};

    pub(super) trait GpuElement:
        Element + WithDType + CudaDType + cudarc::driver::ValidAsZeroBits
    {
    }
    impl<T: Element + WithDType + CudaDType + cudarc::driver::ValidAsZeroBits> GpuElement for T {}

    pub(super) fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        name: &str,
    ) -> Result<CudaView<'a, T>> {
        let (a, b) = range(l, name)?;
        Ok(s.as_cuda_slice::<T>()?.slice(a..b))
    }

    pub(super) fn cuda_of<'a>(s: &'a Storage, name: &str) -> Result<&'a CudaStorage> {
        match s {
            Storage::Cuda(c) => Ok(c),
            _ => Err(msg(format!(
                "lora-kernels: `{name}` is not on the CUDA device of the input"
            ))),
        }
    }

    fn all<T: CudaDType>(s: &CudaStorage) -> Result<CudaView<'_, T>> {
        let v = s.as_cuda_slice::<T>()?;
        Ok(v.slice(0..v.len()))
    }

    pub(super) fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice) -> Storage {
        Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()))
    }

    fn tensor<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
        Tensor::from_storage(wrap(s, dev), shape, BackpropOp::none(), false)
    }

    impl LinearOp {
        pub(super) fn fwd_cuda<T: GpuElement>(
            &self,
            gpu: &Gpu,
            dev: &CudaDevice,
            sh: &LoraShape,
            x: &CudaView<'_, T>,
            a: &CudaView<'_, T>,
            b3: &CudaView<'_, T>,
        ) -> Result<(CudaStorage, Saved)> {
            let (t, n, r) = (sh.tokens, sh.out_features, sh.rank);
            let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
            let bias = match &bias_guard {
                Some((s, l)) => Some(view::<T>(cuda_of(s, "bias")?, l, "bias")?),
                None => None,
            };
            let mut y = dev.alloc_zeros::<T>(t * n)?;
            let mut h = dev.alloc_zeros::<T>(t * r)?;
            let o = &self.opts;
            let saved = match self.kind {
                Kind::Lora => {
                    match &self.base {
                        FrozenWeight::Dense(w) => {
                            let (ws, wl) = w.storage_and_layout();
                            let w = view::<T>(cuda_of(&ws, "w")?, wl, "w")?;
                            let wts = LoraWeights {
                                w: &w,
                                a,
                                b: b3,
                                bias: bias.as_ref(),
                            };
                            cuda::lora::forward::<T, _, _>(gpu, sh, o, x, wts, &mut y, Some(&mut h))
                        }
                        FrozenWeight::Nf4(q) => {
                            let wts = QloraWeights {
                                w: q.device()?,
                                a,
                                b: b3,
                                bias: bias.as_ref(),
                            };
                            cuda::qlora::forward::<T, _, _>(
                                gpu,
                                sh,
                                o,
                                x,
                                wts,
                                &mut y,
                                Some(&mut h),
                            )
                        }
                    }
                    .map_err(to_candle)?;
                    Saved {
                        h: wrap(h, dev),
                        norm: None,
                        z: None,
                    }
                }
                Kind::Dora => {
                    let b = b3.slice(0..n * r);
                    let m = b3.slice(n * r..n * r + n);
                    let mut norm = dev.alloc_zeros::<f32>(n)?;
                    let mut z = dev.alloc_zeros::<T>(t * n)?;
                    let out = DoraOutputs {
                        y: &mut y,
                        h: Some(&mut h),
                        norm: Some(&mut norm),
                        z: Some(&mut z),
                    };
                    match &self.base {
                        FrozenWeight::Dense(w) => {
                            let (ws, wl) = w.storage_and_layout();
                            let w = view::<T>(cuda_of(&ws, "w")?, wl, "w")?;
                            let wts = DoraWeights {
                                w: &w,
                                a,
                                b: &b,
                                bias: bias.as_ref(),
                                magnitude: &m,
                            };
                            cuda::dora::forward::<T, _, _, _>(gpu, sh, o, x, wts, out)
                        }
                        FrozenWeight::Nf4(q) => {
                            let wts = DoraWeights {
                                w: q.device()?,
                                a,
                                b: &b,
                                bias: bias.as_ref(),
                                magnitude: &m,
                            };
                            cuda::qdora::forward::<T, _, _, _>(gpu, sh, o, x, wts, out)
                        }
                    }
                    .map_err(to_candle)?;
                    Saved {
                        h: wrap(h, dev),
                        norm: Some(wrap(norm, dev)),
                        z: Some(wrap(z, dev)),
                    }
                }
            };
            Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), saved))
        }

        #[allow(clippy::too_many_arguments)]
        pub(super) fn bwd_cuda<T: GpuElement>(
            &self,
            gpu: &Gpu,
            dev: &CudaDevice,
            sh: &LoraShape,
            saved: &Saved,
            x: &Tensor,
            a: &Tensor,
            b3: &Tensor,
            dy: &Tensor,
        ) -> Result<(Tensor, Tensor, Tensor)> {
            let (t, k, n, r) = (sh.tokens, sh.in_features, sh.out_features, sh.rank);
            let (xs, xl) = x.storage_and_layout();
            let (as_, al) = a.storage_and_layout();
            let (bs, bl) = b3.storage_and_layout();
            let (ds, dl) = dy.storage_and_layout();
            let x = view::<T>(cuda_of(&xs, "x")?, xl, "x")?;
            let a = view::<T>(cuda_of(&as_, "a")?, al, "a")?;
            let b3 = view::<T>(cuda_of(&bs, "b")?, bl, "b")?;
            let dy = view::<T>(cuda_of(&ds, "dy")?, dl, "dy")?;
            let h = all::<T>(cuda_of(&saved.h, "h")?)?;
            let o = &self.opts;
            let mut dx = dev.alloc_zeros::<T>(t * k)?;
            let mut da = dev.alloc_zeros::<T>(r * k)?;
            match self.kind {
                Kind::Lora => {
                    let mut db = dev.alloc_zeros::<T>(n * r)?;
                    let g = LoraGrads {
                        dx: &mut dx,
                        da: &mut da,
                        db: &mut db,
                    };
                    match &self.base {
                        FrozenWeight::Dense(w) => {
                            let (ws, wl) = w.storage_and_layout();
                            let w = view::<T>(cuda_of(&ws, "w")?, wl, "w")?;
                            let wts = LoraWeights {
                                w: &w,
                                a: &a,
                                b: &b3,
                                bias: None,
                            };
                            cuda::lora::backward::<T, _, _>(gpu, sh, o, &x, wts, &h, &dy, g)
                        }
                        FrozenWeight::Nf4(q) => {
                            let wts = QloraWeights {
                                w: q.device()?,
                                a: &a,
                                b: &b3,
                                bias: None,
                            };
                            cuda::qlora::backward::<T, _, _>(gpu, sh, o, &x, wts, &h, &dy, g)
                        }
                    }
                    .map_err(to_candle)?;
                    Ok((
                        tensor(dx, dev, (t, k)),
                        tensor(da, dev, (r, k)),
                        tensor(db, dev, (n, r)),
                    ))
                }
                Kind::Dora => {
                    let b = b3.slice(0..n * r);
                    let m = b3.slice(n * r..n * r + n);
                    let norm = match &saved.norm {
                        Some(s) => all::<f32>(cuda_of(s, "norm")?)?,
                        None => return Err(msg("dora: the forward saved no norms".into())),
                    };
                    let z = match &saved.z {
                        Some(s) => Some(all::<T>(cuda_of(s, "z")?)?),
                        None => None,
                    };
                    let mut db = dev.alloc_zeros::<T>(n * r)?;
                    let mut dm = dev.alloc_zeros::<T>(n)?;
                    let g = DoraGrads {
                        dx: &mut dx,
                        da: &mut da,
                        db: &mut db,
                        dm: &mut dm,
                    };
                    let sv = DoraSaved {
                        h: &h,
                        norm: &norm,
                        z: z.as_ref(),
                    };
                    let res = match &self.base {
                        FrozenWeight::Dense(w) => {
                            let (ws, wl) = w.storage_and_layout();
                            let w = view::<T>(cuda_of(&ws, "w")?, wl, "w")?;
                            let wts = DoraWeights {
                                w: &w,
                                a: &a,
                                b: &b,
                                bias: None,
                                magnitude: &m,
                            };
                            cuda::dora::backward::<T, _, _, _>(gpu, sh, o, &x, wts, sv, &dy, g)
                        }
                        FrozenWeight::Nf4(q) => {
                            let wts = DoraWeights {
                                w: q.device()?,
                                a: &a,
                                b: &b,
                                bias: None,
                                magnitude: &m,
                            };
                            cuda::qdora::backward::<T, _, _, _>(gpu, sh, o, &x, wts, sv, &dy, g)
                        }
                    };
                    res.map_err(to_candle)?;
                    // The grad of the packed [B; m] argument.
                    let dbm = Tensor::cat(&[tensor(db, dev, (n * r,)), tensor(dm, dev, (n,))], 0)?;
                    Ok((tensor(dx, dev, (t, k)), tensor(da, dev, (r, k)), dbm))
                }
            }
        }
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        LinearOp::name(self)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let sh = self.shape(l1)?;
        by_dtype!(s1.dtype(), self.name(), T => {
            let x = cpu_slice::<T>(s1, l1, "x")?;
            let a = cpu_slice::<T>(s2, l2, "a")?;
            let b = cpu_slice::<T>(s3, l3, "b")?;
            let (y, saved) = self.fwd_cpu::<T>(&sh, x, a, b)?;
            self.save(saved);
            Ok((y, Shape::from((sh.tokens, sh.out_features))))
        })
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let sh = self.shape(l1)?;
        let dev = s1.device().clone();
        let g = super::gpu_cache::gpu(&dev)?;
        by_dtype!(s1.dtype(), self.name(), T => {
            let x = gpu::view::<T>(s1, l1, "x")?;
            let a = gpu::view::<T>(s2, l2, "a")?;
            let b = gpu::view::<T>(s3, l3, "b")?;
            let (y, saved) = self.fwd_cuda::<T>(&g, &dev, &sh, &x, &a, &b)?;
            self.save(saved);
            Ok((y, Shape::from((sh.tokens, sh.out_features))))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved()?;
        let dy = grad.contiguous()?;
        let sh = self.shape(x.layout())?;
        let (dx, da, db) = match x.device() {
            candle_core::Device::Cpu => by_dtype!(x.dtype(), self.name(), T => {
                self.bwd_cpu::<T>(&sh, &saved, x, a, b, &dy)
            })?,
            #[cfg(feature = "candle-cuda")]
            candle_core::Device::Cuda(dev) => {
                let g = super::gpu_cache::gpu(dev)?;
                by_dtype!(x.dtype(), self.name(), T => {
                    self.bwd_cuda::<T>(&g, dev, &sh, &saved, x, a, b, &dy)
                })?
            }
            other => {
                return Err(msg(format!(
                    "{}: device {other:?} is not supported",
                    self.name()
                )))
            }
        };
        let keep = |t: &Tensor, g: Tensor| if t.track_op() { Some(g) } else { None };
        Ok((keep(x, dx), keep(a, da), keep(b, db)))
    }
}

// ---------------------------------------------------------------------------------------
// Embedding + NEFTune
// ---------------------------------------------------------------------------------------

/// Rows of a frozen table for ids `[batch, seq]`, plus NEFTune's noise when `noise` is
/// set. No backward: the table is frozen and the ids are integers.
pub(crate) struct EmbedOp {
    pub table: Tensor,
    pub vocab: usize,
    pub dim: usize,
    pub noise: Option<Noise>,
}

macro_rules! by_id {
    ($d:expr, $I:ident => $body:expr) => {
        match $d {
            CDType::U32 => {
                type $I = u32;
                $body
            }
            CDType::I64 => {
                type $I = i64;
                $body
            }
            CDType::U8 => {
                type $I = u8;
                $body
            }
            other => Err(msg(format!(
                "neftune-embedding: ids of dtype {other:?} (u32, i64 or u8)"
            ))),
        }
    };
}

impl EmbedOp {
    fn shape(&self, l: &Layout) -> Result<EmbedShape> {
        let dims = l.shape().dims();
        let (batch, seq) = match dims {
            [s] => (1, *s),
            [b, s] => (*b, *s),
            _ => {
                return Err(msg(format!(
                    "neftune-embedding: ids must be [batch, seq] or [seq], got {dims:?}"
                )))
            }
        };
        Ok(EmbedShape::new(batch, seq, self.vocab, self.dim))
    }
}

impl CustomOp1 for EmbedOp {
    fn name(&self) -> &'static str {
        "neftune-embedding"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let sh = self.shape(l)?;
        let (ts, tl) = self.table.storage_and_layout();
        let ts = cpu_of(&ts, "table")?;
        by_id!(s.dtype(), I => by_dtype!(ts.dtype(), "neftune-embedding", T => {
            let ids = cpu_slice::<I>(s, l, "ids")?;
            let table = cpu_slice::<T>(ts, tl, "table")?;
            let mut out = zeros::<T>(sh.out_len());
            match &self.noise {
                Some(n) => cpu::neftune::embed::<T, I, u8>(&sh, table, ids, n, SeqLen::Padded, &mut out),
                None => cpu::neftune::gather::<T, I>(&sh, table, ids, &mut out),
            }
            .map_err(to_candle)?;
            Ok((T::to_cpu_storage_owned(out), Shape::from((sh.batch, sh.seq, sh.dim))))
        }))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let sh = self.shape(l)?;
        let dev = s.device().clone();
        let g = super::gpu_cache::gpu(&dev)?;
        let (ts, tl) = self.table.storage_and_layout();
        let ts = gpu::cuda_of(&ts, "table")?;
        by_id!(s.dtype(), I => by_dtype!(ts.dtype(), "neftune-embedding", T => {
            let ids = gpu::view::<I>(s, l, "ids")?;
            let table = gpu::view::<T>(ts, tl, "table")?;
            let mut out = dev.alloc_zeros::<T>(sh.out_len())?;
            match &self.noise {
                Some(n) => crate::cuda::neftune::embed::<T, I, u8, _, _, cudarc::driver::CudaSlice<u8>, _>(
                    &g, &sh, &table, &ids, n, SeqLen::Padded, &mut out),
                None => crate::cuda::neftune::gather::<T, I, _, _, _>(&g, &sh, &table, &ids, &mut out),
            }
            .map_err(to_candle)?;
            Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((sh.batch, sh.seq, sh.dim))))
        }))
    }
}
