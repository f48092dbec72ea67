//! The public candle layers; see [`super`] for backends, types and training.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType as CDType, Device, Module, Result, Tensor, Var};

use super::ops::{EmbedOp, Kind, LinearOp};
use super::{compute_dtype, to_candle};
use crate::peft::AdapterModule;
use crate::philox::SplitMix;
use crate::{Dropout, LoraOptions, Nf4Weight, Noise, Tuning};

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

// ---------------------------------------------------------------------------------------
// The frozen base
// ---------------------------------------------------------------------------------------

/// The frozen weight `W` [N, K] of a linear layer: a dense tensor, or NF4 in
/// bitsandbytes' format. Cheap to clone (shared).
#[derive(Clone)]
pub enum FrozenWeight {
    /// `W` [N, K] in the compute dtype (f32, f16 or bf16), on the layer's device.
    Dense(Tensor),
    /// `W` in NF4, on the layer's device.
    Nf4(Arc<Nf4Base>),
}

impl std::fmt::Debug for FrozenWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrozenWeight::Dense(w) => write!(f, "Dense({:?}, {:?})", w.dims(), w.dtype()),
            FrozenWeight::Nf4(q) => write!(f, "Nf4([{}, {}])", q.rows, q.cols),
        }
    }
}

/// An NF4 weight where a layer's device can read it: on the host for candle's CPU
/// backend, in device memory (uploaded once) for its CUDA backend.
pub struct Nf4Base {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) inner: Nf4Inner,
}

pub(crate) enum Nf4Inner {
    Cpu(Nf4Weight),
    #[cfg(feature = "candle-cuda")]
    Cuda(crate::cuda::nf4::Nf4Device),
}

impl Nf4Base {
    pub(crate) fn host(&self) -> Result<&Nf4Weight> {
        match &self.inner {
            Nf4Inner::Cpu(w) => Ok(w),
            #[cfg(feature = "candle-cuda")]
            Nf4Inner::Cuda(_) => Err(msg(
                "lora-kernels: the NF4 base is on a CUDA device, the input on the CPU".into(),
            )),
        }
    }

    #[cfg(feature = "candle-cuda")]
    pub(crate) fn device(&self) -> Result<&crate::cuda::nf4::Nf4Device> {
        match &self.inner {
            Nf4Inner::Cuda(w) => Ok(w),
            Nf4Inner::Cpu(_) => Err(msg(
                "lora-kernels: the NF4 base is on the CPU, the input on a CUDA device".into(),
            )),
        }
    }
}

impl FrozenWeight {
    /// A dense `W` [N, K].
    pub fn dense(w: Tensor) -> Result<Self> {
        if w.rank() != 2 {
            return Err(msg(format!(
                "FrozenWeight::dense: W must be [out_features, in_features], got {:?}",
                w.dims()
            )));
        }
        compute_dtype(w.dtype(), "FrozenWeight::dense")?;
        Ok(FrozenWeight::Dense(w.contiguous()?))
    }

    /// An NF4 `W` (validated), placed on `device` (uploaded once for a CUDA device).
    pub fn nf4(w: Nf4Weight, device: &Device) -> Result<Self> {
        w.validate().map_err(to_candle)?;
        let (rows, cols) = (w.rows, w.cols);
        let inner = match device {
            Device::Cpu => Nf4Inner::Cpu(w),
            #[cfg(feature = "candle-cuda")]
            Device::Cuda(dev) => {
                let gpu = super::gpu_cache::gpu(dev)?;
                Nf4Inner::Cuda(crate::cuda::nf4::Nf4Device::upload(&gpu, &w).map_err(to_candle)?)
            }
            other => {
                return Err(msg(format!(
                    "FrozenWeight::nf4: device {other:?} is not supported"
                )))
            }
        };
        Ok(FrozenWeight::Nf4(Arc::new(Nf4Base { rows, cols, inner })))
    }

    /// `w` [N, K] (f32, f16 or bf16) quantized to NF4 in bitsandbytes' format
    /// (`blocksize`, optional double quantization) where it lives: by the crate's
    /// kernel on a CUDA device (nothing copied to the host), by [`Nf4Weight::quantize`]
    /// on the CPU (which refuses non-finite values; the kernel, like bitsandbytes,
    /// does not scan for them).
    pub fn quantize(w: &Tensor, blocksize: usize, double_quant: bool) -> Result<Self> {
        let (n, k) = w.dims2()?;
        compute_dtype(w.dtype(), "FrozenWeight::quantize")?;
        let w = w.contiguous()?;
        match w.device() {
            Device::Cpu => {
                let v = w.flatten_all()?.to_dtype(CDType::F32)?.to_vec1::<f32>()?;
                let q = Nf4Weight::quantize::<f32>(&v, n, k, blocksize, double_quant)
                    .map_err(to_candle)?;
                FrozenWeight::nf4(q, &Device::Cpu)
            }
            #[cfg(feature = "candle-cuda")]
            Device::Cuda(dev) => {
                use candle_core::cuda_backend::CudaStorage;
                let gpu = super::gpu_cache::gpu(dev)?;
                let (st, l) = w.storage_and_layout();
                let candle_core::Storage::Cuda(cs) = &*st else {
                    return Err(msg("FrozenWeight::quantize: storage is not CUDA".into()));
                };
                let (a, b) = l
                    .contiguous_offsets()
                    .ok_or_else(|| msg("FrozenWeight::quantize: w is not contiguous".into()))?;
                fn q<T: crate::Element + candle_core::cuda_backend::CudaDType>(
                    gpu: &crate::cuda::Gpu,
                    cs: &CudaStorage,
                    r: std::ops::Range<usize>,
                    n: usize,
                    k: usize,
                    bs: usize,
                    dq: bool,
                ) -> Result<crate::cuda::nf4::Nf4Device> {
                    let v = cs.as_cuda_slice::<T>()?.slice(r);
                    crate::cuda::nf4::quantize::<T, _>(gpu, &v, n, k, bs, dq).map_err(to_candle)
                }
                let d = match w.dtype() {
                    CDType::F32 => q::<f32>(&gpu, cs, a..b, n, k, blocksize, double_quant)?,
                    CDType::F16 => q::<half::f16>(&gpu, cs, a..b, n, k, blocksize, double_quant)?,
                    _ => q::<half::bf16>(&gpu, cs, a..b, n, k, blocksize, double_quant)?,
                };
                Ok(FrozenWeight::Nf4(Arc::new(Nf4Base {
                    rows: n,
                    cols: k,
                    inner: Nf4Inner::Cuda(d),
                })))
            }
            other => Err(msg(format!(
                "FrozenWeight::quantize: device {other:?} is not supported"
            ))),
        }
    }

    /// N.
    pub fn out_features(&self) -> usize {
        match self {
            FrozenWeight::Dense(w) => w.dims()[0],
            FrozenWeight::Nf4(q) => q.rows,
        }
    }

    /// K.
    pub fn in_features(&self) -> usize {
        match self {
            FrozenWeight::Dense(w) => w.dims()[1],
            FrozenWeight::Nf4(q) => q.cols,
        }
    }

    /// `W` as a dense [N, K] tensor of `dtype` on `device` (the NF4 form dequantized
    /// there, with the crate's kernel on a CUDA device). For a plain-candle layer, a
    /// merge, or DoRA's magnitude.
    pub fn to_dense(&self, dtype: CDType, device: &Device) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => w.to_device(device)?.to_dtype(dtype),
            FrozenWeight::Nf4(q) => match &q.inner {
                Nf4Inner::Cpu(w) => {
                    let v = w.dequantize::<f32>().map_err(to_candle)?;
                    Tensor::from_vec(v, (q.rows, q.cols), &Device::Cpu)?
                        .to_dtype(dtype)?
                        .to_device(device)
                }
                #[cfg(feature = "candle-cuda")]
                Nf4Inner::Cuda(w) => {
                    let Device::Cuda(dev) = device else {
                        return self
                            .to_dense(dtype, &Device::Cpu)
                            .and_then(|t| t.to_device(device));
                    };
                    let gpu = super::gpu_cache::gpu(dev)?;
                    let n = q.rows * q.cols;
                    let mut out = dev.alloc_zeros::<half::bf16>(n)?;
                    crate::cuda::nf4::dequantize::<half::bf16, _>(&gpu, w, &mut out)
                        .map_err(to_candle)?;
                    let s = candle_core::Storage::Cuda(
                        candle_core::cuda_backend::CudaStorage::wrap_cuda_slice(out, dev.clone()),
                    );
                    Tensor::from_storage(
                        s,
                        (q.rows, q.cols),
                        candle_core::op::BackpropOp::none(),
                        false,
                    )
                    .to_dtype(dtype)
                }
            },
        }
    }

    fn check_input(&self, x: &Tensor, what: &str) -> Result<()> {
        compute_dtype(x.dtype(), what)?;
        match self {
            FrozenWeight::Dense(w) => {
                if w.dtype() != x.dtype() {
                    return Err(msg(format!(
                        "{what}: x is {:?} but the frozen W is {:?} (store W in the compute dtype)",
                        x.dtype(),
                        w.dtype()
                    )));
                }
                if !w.device().same_device(x.device()) {
                    return Err(msg(format!("{what}: x and W are on different devices")));
                }
            }
            FrozenWeight::Nf4(q) => {
                let on_cpu = matches!(q.inner, Nf4Inner::Cpu(_));
                if on_cpu != x.device().is_cpu() {
                    return Err(msg(format!(
                        "{what}: x and the NF4 W are on different devices"
                    )));
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------

/// The adapter's hyper-parameters and the kernels' tuning.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerOptions {
    /// r (≥ 1).
    pub rank: usize,
    /// peft's `lora_alpha`.
    pub alpha: f32,
    /// rsLoRA: scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
    /// Dropout probability on the adapter's input in training, in [0, 1).
    pub dropout: f32,
    /// Seed of the layer's Philox streams: A's initial values and the dropout masks.
    pub seed: u64,
    /// Path choices of the kernels (default: automatic), per layer.
    pub tuning: Tuning,
}

impl LayerOptions {
    /// Rank `r`, `alpha`, no dropout, seed 0, automatic tuning.
    pub fn new(rank: usize, alpha: f32) -> Self {
        LayerOptions {
            rank,
            alpha,
            rslora: false,
            dropout: 0.0,
            seed: 0,
            tuning: Tuning::default(),
        }
    }

    /// The scale `s` of the low-rank term.
    pub fn scale(&self) -> f32 {
        if self.rslora {
            crate::lora::rslora_scale(self.alpha, self.rank)
        } else {
            crate::lora::scale(self.alpha, self.rank)
        }
    }

    fn validate(&self, what: &str) -> Result<()> {
        if self.rank == 0 {
            return Err(msg(format!("{what}: rank must be ≥ 1")));
        }
        if !self.alpha.is_finite() {
            return Err(msg(format!("{what}: alpha {} is not finite", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(msg(format!(
                "{what}: dropout {} is outside [0, 1)",
                self.dropout
            )));
        }
        Ok(())
    }
}

/// peft's default start: A ~ U(−1/√K, 1/√K) (kaiming-uniform with a = √5), from the
/// layer's seed on the host, so the CPU and the GPU start from the same A.
fn init_a(r: usize, k: usize, seed: u64, device: &Device) -> Result<Var> {
    let mut rng = SplitMix(seed ^ 0x4c6f_5241_2d41_0001);
    let bound = 1.0 / (k as f64).sqrt();
    let v: Vec<f32> = (0..r * k)
        .map(|_| (rng.symmetric() * bound) as f32)
        .collect();
    Var::from_tensor(&Tensor::from_vec(v, (r, k), device)?)
}

fn device_of(base: &FrozenWeight) -> Result<Device> {
    match base {
        FrozenWeight::Dense(w) => Ok(w.device().clone()),
        FrozenWeight::Nf4(q) => match &q.inner {
            Nf4Inner::Cpu(_) => Ok(Device::Cpu),
            #[cfg(feature = "candle-cuda")]
            Nf4Inner::Cuda(_) => Err(msg(
                "lora-kernels: give the device of an NF4 base on CUDA explicitly".into(),
            )),
        },
    }
}

fn check_bias(bias: &Option<Tensor>, n: usize, what: &str) -> Result<Option<Tensor>> {
    match bias {
        None => Ok(None),
        Some(b) => {
            if b.dims() != [n] {
                return Err(msg(format!(
                    "{what}: bias must be [{n}], got {:?}",
                    b.dims()
                )));
            }
            Ok(Some(b.contiguous()?))
        }
    }
}

/// x `[..., K]` as a contiguous [T, K] matrix, and the output dims `[..., N]`.
fn flatten(x: &Tensor, k: usize, n: usize, what: &str) -> Result<(Tensor, Vec<usize>)> {
    let dims = x.dims();
    if dims.last() != Some(&k) {
        return Err(msg(format!(
            "{what}: x must be [..., {k}] (in_features), got {dims:?}"
        )));
    }
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank ≥ 1") = n;
    let t = x.elem_count() / k;
    Ok((x.reshape((t, k))?.contiguous()?, out))
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(CDType::F32)?.to_vec1::<f32>()
}

fn set_var(v: &Var, data: &[f32], dims: &[usize], what: &str) -> Result<()> {
    if v.dims() != dims {
        return Err(msg(format!(
            "{what}: shape {:?} does not match the layer's {:?}",
            dims,
            v.dims()
        )));
    }
    let t = Tensor::from_slice(data, dims, v.device())?.to_dtype(v.dtype())?;
    v.set(&t)
}

fn check_module(
    m: &AdapterModule<f32>,
    r: usize,
    k: usize,
    n: usize,
    scale: f32,
    dora: bool,
) -> Result<()> {
    if (m.rank, m.in_features, m.out_features) != (r, k, n) {
        return Err(msg(format!(
            "adapter module {}: r, K, N = {}, {}, {} but the layer has {r}, {k}, {n}",
            m.name, m.rank, m.in_features, m.out_features
        )));
    }
    if (m.scale - scale).abs() > 1e-6 * scale.abs().max(1.0) {
        return Err(msg(format!(
            "adapter module {}: scale {} but the layer's is {scale}",
            m.name, m.scale
        )));
    }
    if m.magnitude.is_some() != dora {
        return Err(msg(format!(
            "adapter module {}: {} a DoRA magnitude, the layer {}",
            m.name,
            if m.magnitude.is_some() {
                "has"
            } else {
                "has no"
            },
            if dora { "is DoRA" } else { "is not" }
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// LoRA / QLoRA
// ---------------------------------------------------------------------------------------

/// A LoRA linear layer `y = x Wᵀ + bias + s · drop(x) Aᵀ Bᵀ` over a frozen dense or NF4
/// (QLoRA) base; A [r, K] and B [N, r] are trainable f32 [`Var`]s (B starts at zero).
pub struct LoraLinear {
    base: FrozenWeight,
    bias: Option<Tensor>,
    a: Var,
    b: Var,
    k: usize,
    n: usize,
    opts: LayerOptions,
    scale: f32,
    calls: AtomicU64,
}

/// QLoRA: a [`LoraLinear`] whose base is [`FrozenWeight::Nf4`].
pub type QLoraLinear = LoraLinear;

impl std::fmt::Debug for LoraLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraLinear")
            .field("base", &self.base)
            .field("rank", &self.opts.rank)
            .field("scale", &self.scale)
            .finish()
    }
}

impl LoraLinear {
    /// A LoRA layer over `base` with an optional frozen `bias` \[N\], on the base's device
    /// (`device` must be given for an NF4 base on CUDA: it is where A and B live).
    pub fn new(
        base: FrozenWeight,
        bias: Option<Tensor>,
        opts: LayerOptions,
        device: Option<&Device>,
    ) -> Result<Self> {
        opts.validate("LoraLinear")?;
        let (k, n, r) = (base.in_features(), base.out_features(), opts.rank);
        let device = match device {
            Some(d) => d.clone(),
            None => device_of(&base)?,
        };
        let bias = check_bias(&bias, n, "LoraLinear")?;
        let a = init_a(r, k, opts.seed, &device)?;
        let b = Var::zeros((n, r), CDType::F32, &device)?;
        Ok(LoraLinear {
            scale: opts.scale(),
            base,
            bias,
            a,
            b,
            k,
            n,
            opts,
            calls: AtomicU64::new(0),
        })
    }

    /// A [r, K] (f32, trainable).
    pub fn a(&self) -> &Var {
        &self.a
    }

    /// B [N, r] (f32, trainable).
    pub fn b(&self) -> &Var {
        &self.b
    }

    /// The trainable parameters: `[A, B]`.
    pub fn vars(&self) -> Vec<Var> {
        vec![self.a.clone(), self.b.clone()]
    }

    /// The frozen base.
    pub fn base(&self) -> &FrozenWeight {
        &self.base
    }

    /// The scale `s`.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// The layer's options.
    pub fn options(&self) -> &LayerOptions {
        &self.opts
    }

    fn op(&self, train: bool) -> Result<LinearOp> {
        let mut o = LoraOptions::new(self.scale).with_tuning(self.opts.tuning);
        if train && self.opts.dropout > 0.0 {
            let offset = self.calls.fetch_add(1, Ordering::Relaxed);
            o = o.with_dropout(Dropout::new(self.opts.dropout, self.opts.seed, offset));
        }
        Ok(LinearOp {
            kind: Kind::Lora,
            base: self.base.clone(),
            bias: self.bias.clone(),
            k: self.k,
            n: self.n,
            r: self.opts.rank,
            opts: o,
            saved: Mutex::new(None),
        })
    }

    /// This layer as peft's module `name` (A, B as f32 on the host).
    pub fn adapter_module(&self, name: &str) -> Result<AdapterModule<f32>> {
        Ok(AdapterModule {
            name: name.to_string(),
            rank: self.opts.rank,
            in_features: self.k,
            out_features: self.n,
            scale: self.scale,
            a: host_f32(self.a.as_tensor())?,
            b: host_f32(self.b.as_tensor())?,
            magnitude: None,
        })
    }

    /// Sets A and B from peft's module (its r, K, N and scale must be this layer's).
    pub fn load_adapter_module(&self, m: &AdapterModule<f32>) -> Result<()> {
        check_module(m, self.opts.rank, self.k, self.n, self.scale, false)?;
        set_var(&self.a, &m.a, &[self.opts.rank, self.k], "lora_A")?;
        set_var(&self.b, &m.b, &[self.n, self.opts.rank], "lora_B")
    }
}

impl LoraLinear {
    /// The forward in training (`train`: dropout / noise on, the next Philox offset) or
    /// evaluation mode; [`Module::forward`] is evaluation.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.base.check_input(x, "LoraLinear")?;
        let (x2, out) = flatten(x, self.k, self.n, "LoraLinear")?;
        let dt = x.dtype();
        let a = self.a.as_tensor().to_dtype(dt)?;
        let b = self.b.as_tensor().to_dtype(dt)?;
        let op = self.op(train)?;
        x2.apply_op3(&a, &b, op)?.reshape(out)
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
}

// ---------------------------------------------------------------------------------------
// DoRA / QDoRA
// ---------------------------------------------------------------------------------------

/// A DoRA layer (peft's `use_dora`): LoRA plus a trainable magnitude m \[N\] that
/// rescales each output row of `W + s·BA` to norm m ([`crate::dora`] has the formula).
/// m starts at the row norms of W (B = 0), as in peft.
pub struct DoraLinear {
    lora: LoraLinear,
    m: Var,
}

/// QDoRA: a [`DoraLinear`] whose base is [`FrozenWeight::Nf4`].
pub type QDoraLinear = DoraLinear;

impl std::fmt::Debug for DoraLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoraLinear")
            .field("base", &self.lora.base)
            .field("rank", &self.lora.opts.rank)
            .field("scale", &self.lora.scale)
            .finish()
    }
}

impl DoraLinear {
    /// A DoRA layer over `base`; see [`LoraLinear::new`].
    pub fn new(
        base: FrozenWeight,
        bias: Option<Tensor>,
        opts: LayerOptions,
        device: Option<&Device>,
    ) -> Result<Self> {
        let lora = LoraLinear::new(base, bias, opts, device)?;
        let dev = lora.a.device().clone();
        // ‖W_o‖ in f32 (B = 0 at the start).
        let w = lora.base.to_dense(CDType::F32, &dev)?;
        let m = w.sqr()?.sum(1)?.sqrt()?;
        Ok(DoraLinear {
            lora,
            m: Var::from_tensor(&m)?,
        })
    }

    /// A [r, K].
    pub fn a(&self) -> &Var {
        &self.lora.a
    }

    /// B [N, r].
    pub fn b(&self) -> &Var {
        &self.lora.b
    }

    /// The magnitude m \[N\].
    pub fn magnitude(&self) -> &Var {
        &self.m
    }

    /// The trainable parameters: `[A, B, m]`.
    pub fn vars(&self) -> Vec<Var> {
        vec![self.lora.a.clone(), self.lora.b.clone(), self.m.clone()]
    }

    /// The frozen base.
    pub fn base(&self) -> &FrozenWeight {
        &self.lora.base
    }

    /// The scale `s`.
    pub fn scale(&self) -> f32 {
        self.lora.scale
    }

    /// This layer as peft's module `name` (with `lora_magnitude_vector`).
    pub fn adapter_module(&self, name: &str) -> Result<AdapterModule<f32>> {
        let mut m = self.lora.adapter_module(name)?;
        m.magnitude = Some(host_f32(self.m.as_tensor())?);
        Ok(m)
    }

    /// Sets A, B and m from peft's module.
    pub fn load_adapter_module(&self, md: &AdapterModule<f32>) -> Result<()> {
        let l = &self.lora;
        check_module(md, l.opts.rank, l.k, l.n, l.scale, true)?;
        set_var(&l.a, &md.a, &[l.opts.rank, l.k], "lora_A")?;
        set_var(&l.b, &md.b, &[l.n, l.opts.rank], "lora_B")?;
        let m = md.magnitude.as_deref().unwrap_or_default();
        set_var(&self.m, m, &[l.n], "lora_magnitude_vector")
    }
}

impl DoraLinear {
    /// The forward in training (`train`: dropout / noise on, the next Philox offset) or
    /// evaluation mode; [`Module::forward`] is evaluation.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let l = &self.lora;
        l.base.check_input(x, "DoraLinear")?;
        let (x2, out) = flatten(x, l.k, l.n, "DoraLinear")?;
        let dt = x.dtype();
        let a = l.a.as_tensor().to_dtype(dt)?;
        let bm = Tensor::cat(
            &[
                &l.b.as_tensor().to_dtype(dt)?.flatten_all()?,
                &self.m.as_tensor().to_dtype(dt)?,
            ],
            0,
        )?;
        let mut op = l.op(train)?;
        op.kind = Kind::Dora;
        x2.apply_op3(&a, &bm, op)?.reshape(out)
    }
}

impl Module for DoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
}

// ---------------------------------------------------------------------------------------
// Embedding + NEFTune
// ---------------------------------------------------------------------------------------

/// A frozen embedding table [vocab, dim] looked up by ids `[batch, seq]` (u32, i64 or
/// u8), with NEFTune's uniform noise `alpha / sqrt(seq · dim)` added in training
/// (`forward_t(ids, true)`), each call with the next Philox offset. The output carries
/// no gradient (the table is frozen, as in LoRA fine-tuning). On a CUDA device an
/// out-of-range id gives a zero row (reported by
/// [`crate::cuda::Gpu::take_index_errors`]); on the CPU it is an error.
pub struct NeftuneEmbedding {
    table: Tensor,
    alpha: f32,
    seed: u64,
    calls: AtomicU64,
}

impl std::fmt::Debug for NeftuneEmbedding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NeftuneEmbedding")
            .field("table", &self.table.dims())
            .field("alpha", &self.alpha)
            .finish()
    }
}

impl NeftuneEmbedding {
    /// An embedding over `table` [vocab, dim]; `alpha` = 0 turns NEFTune off.
    pub fn new(table: Tensor, alpha: f32, seed: u64) -> Result<Self> {
        if table.rank() != 2 {
            return Err(msg(format!(
                "NeftuneEmbedding: the table must be [vocab, dim], got {:?}",
                table.dims()
            )));
        }
        compute_dtype(table.dtype(), "NeftuneEmbedding")?;
        Noise::try_new(alpha, seed, 0).map_err(to_candle)?;
        Ok(NeftuneEmbedding {
            table: table.contiguous()?,
            alpha,
            seed,
            calls: AtomicU64::new(0),
        })
    }

    /// The table [vocab, dim].
    pub fn table(&self) -> &Tensor {
        &self.table
    }
}

impl NeftuneEmbedding {
    /// The forward in training (`train`: dropout / noise on, the next Philox offset) or
    /// evaluation mode; [`Module::forward`] is evaluation.
    pub fn forward_t(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let noise = if train && self.alpha > 0.0 {
            let offset = self.calls.fetch_add(1, Ordering::Relaxed);
            Some(Noise::new(self.alpha, self.seed, offset))
        } else {
            None
        };
        let (vocab, dim) = (self.table.dims()[0], self.table.dims()[1]);
        let op = EmbedOp {
            table: self.table.clone(),
            vocab,
            dim,
            noise,
        };
        let ids = ids.contiguous()?;
        let out = ids.apply_op1_no_bwd(&op)?;
        if ids.rank() == 1 {
            out.squeeze(0)
        } else {
            Ok(out)
        }
    }
}

impl Module for NeftuneEmbedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_t(ids, false)
    }
}
