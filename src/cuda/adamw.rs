//! AdamW on the GPU: one launch updates a whole list of tensors (the math, constants and
//! layouts: [`crate::adamw`]). Same arguments as [`crate::cpu::adamw`] with device
//! buffers, same output bits.
//!
//! ## The launch
//! - The host checks everything first (hyper-parameters, `t`, each tensor's options and
//!   lengths, then the buffers' alignment to their element types) and computes the step's
//!   constants in f64: on any error nothing has been queued or written.
//! - It then builds two small tables and copies them to the device on [`Gpu::stream`]:
//!   one `LkAdamwTensor` entry (kernels/lk_params.h) of 72 bytes per non-empty tensor
//!   (its five device addresses, length, first chunk, `decay`, `−s`, copy type and
//!   whether it can take the vector path) and a work list of one u32 per chunk of
//!   [`CHUNK`] elements, naming the chunk's tensor. A step's addresses change (gradients
//!   are new buffers each step), so the tables are made per call; both are freed
//!   stream-ordered after the launch.
//! - One kernel (`lk_adamw_{f32,f16,bf16}` by gradient type, kernels/adamw.cu) runs over
//!   all chunks of all tensors: a grid of `min(chunks, 8 · SMs)` blocks of 256 threads,
//!   block `b` taking chunks `b, b + grid, ...`. A tensor whose `param`, `m`, `v`, `grad`
//!   and `copy` addresses are all multiples of 4 elements takes the vector path (each
//!   thread loads 4 × 4 consecutive elements of each buffer: 16-byte loads of f32,
//!   8-byte of 16-bit types, then computes and stores); other tensors, and the last
//!   `len % 4` elements of a tensor, go element by element.
//!
//! ## Cost
//! On an H200 (`benches/adamw.rs`: the 224 tensors of a 1B model's r = 16 adapters,
//! 12.06 M elements, f32 gradients) the kernel takes 94 µs for the 28 bytes per element
//! it must move (a device copy of as many bytes: 83 µs). With buffers allocated with
//! cudarc's event tracking off, a call returns in 54 µs of host time and a step takes
//! 107 µs end to end. With tracking on (cudarc's default once a context has a second
//! stream, which [`Gpu::new`] and candle's device make), cudarc adds a
//! `cuStreamWaitEvent` and a `cuEventRecord` for every buffer a call touches, about
//! 0.85 µs per buffer on that host: 0.77 ms per call for these 900 buffers, which the GPU
//! waits for only when the host does not run ahead of it. A launch per tensor: 5.2 ms.
//!
//! Queued on [`Gpu::stream`]; nothing here waits for the stream. The tables (72 bytes
//! per tensor and 4 per chunk: 15 KiB for a 1B model's 224 adapter tensors) are copied
//! from pageable host memory, which CUDA stages before the copy call returns. Not
//! capturable in a CUDA graph: the tables are host data of the call.
//!
//! ```no_run
//! use cudarc::driver::CudaSlice;
//! use lora_kernels::adamw::{AdamW, TensorOptions};
//! use lora_kernels::cuda::{adamw, Gpu};
//! use lora_kernels::bf16;
//!
//! # fn main() -> lora_kernels::Result<()> {
//! let gpu = Gpu::new(0)?;
//! let n = 16 * 4096;
//! let mut p: Vec<CudaSlice<f32>> = (0..2).map(|_| gpu.zeros(n)).collect::<Result<_, _>>()?;
//! let mut m: Vec<CudaSlice<f32>> = (0..2).map(|_| gpu.zeros(n)).collect::<Result<_, _>>()?;
//! let mut v: Vec<CudaSlice<f32>> = (0..2).map(|_| gpu.zeros(n)).collect::<Result<_, _>>()?;
//! let g: Vec<CudaSlice<bf16>> = (0..2).map(|_| gpu.zeros(n)).collect::<Result<_, _>>()?;
//! let mut list: Vec<adamw::Tensor<'_, bf16>> = p
//!     .iter_mut()
//!     .zip(&mut m)
//!     .zip(&mut v)
//!     .zip(&g)
//!     .enumerate()
//!     .map(|(i, (((p, m), v), g))| {
//!         let scale = if i == 1 { 16.0 } else { 1.0 }; // LoRA+: B at 16 × A's rate
//!         adamw::Tensor::new(p, m, v, g).with_options(TensorOptions::new(scale))
//!     })
//!     .collect();
//! adamw::step(&gpu, &AdamW::default(), 1, &mut list)?;
//! # Ok(())
//! # }
//! ```

use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, SyncOnDrop};
use half::{bf16, f16};

use super::kernel::*;
use super::{dptr, dptr_mut, Gpu, LkAdamwParams, LkAdamwTensor};
use crate::adamw::{per_tensor, shared, AdamW, TensorOptions};
use crate::lora::check_len;
use crate::{Element, Error, Result};

// SAFETY: plain C structs (bindgen, #[repr(C)]) of device addresses, integers and floats,
// passed to the kernel (LkAdamwParams, by value) or copied to the device (LkAdamwTensor)
// exactly as declared in kernels/lk_params.h.
unsafe impl DeviceRepr for LkAdamwParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for LkAdamwTensor {}

/// Elements per chunk, the unit of work of a block (`LK_ADAMW_CHUNK`).
pub const CHUNK: usize = 4096;
const BLOCK: u32 = 256;
/// Blocks per SM the grid is sized for (the kernel is built for at least 2 resident
/// blocks of 256 threads; more blocks than resident only queue).
const BLOCKS_PER_SM: usize = 8;
/// The most chunks one launch takes: tensor indices (at most one per chunk) fit the work
/// list's u32, and the work list stays below 8 GiB.
const MAX_CHUNKS: usize = i32::MAX as usize;

// LK_ADAMW_COPY_* of kernels/lk_params.h.
const COPY_NONE: i32 = 0;
const COPY_F32: i32 = 1;
const COPY_F16: i32 = 2;
const COPY_BF16: i32 = 3;

/// Where a tensor's updated parameters also go, rounded to nearest (even).
#[derive(Default)]
pub enum ParamCopy<'a> {
    /// No copy.
    #[default]
    None,
    /// An f32 copy.
    F32(&'a mut dyn DevicePtrMut<f32>),
    /// An f16 copy.
    F16(&'a mut dyn DevicePtrMut<f16>),
    /// A bf16 copy (the weights of a model computing in bf16).
    Bf16(&'a mut dyn DevicePtrMut<bf16>),
}

impl ParamCopy<'_> {
    fn len(&self) -> Option<usize> {
        match self {
            ParamCopy::None => None,
            ParamCopy::F32(c) => Some(c.len()),
            ParamCopy::F16(c) => Some(c.len()),
            ParamCopy::Bf16(c) => Some(c.len()),
        }
    }
}

impl std::fmt::Debug for ParamCopy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            ParamCopy::None => "None",
            ParamCopy::F32(_) => "F32",
            ParamCopy::F16(_) => "F16",
            ParamCopy::Bf16(_) => "Bf16",
        };
        write!(f, "{kind}")?;
        match self.len() {
            Some(n) => write!(f, "({n} elements)"),
            None => Ok(()),
        }
    }
}

/// One tensor of a step: device buffers `param`, `m`, `v` (f32, updated in place) and
/// `grad`, all of one length (any cudarc buffer: [`cudarc::driver::CudaSlice`], a
/// [`cudarc::driver::CudaViewMut`] into a larger one, a framework's storage).
pub struct Tensor<'a, G: Element> {
    /// The parameters (f32 master weights).
    pub param: &'a mut dyn DevicePtrMut<f32>,
    /// The first moment (zeros before step 1).
    pub m: &'a mut dyn DevicePtrMut<f32>,
    /// The second moment (zeros before step 1).
    pub v: &'a mut dyn DevicePtrMut<f32>,
    /// The gradient.
    pub grad: &'a dyn DevicePtr<G>,
    /// An optional rounded copy of the updated parameters.
    pub copy: ParamCopy<'a>,
    /// Learning-rate multiplier and weight-decay switch.
    pub options: TensorOptions,
}

impl<'a, G: Element> Tensor<'a, G> {
    /// A tensor with default options (`lr_scale` 1, weight decay on) and no copy.
    pub fn new<P, M, V, D>(param: &'a mut P, m: &'a mut M, v: &'a mut V, grad: &'a D) -> Self
    where
        P: DevicePtrMut<f32>,
        M: DevicePtrMut<f32>,
        V: DevicePtrMut<f32>,
        D: DevicePtr<G>,
    {
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

impl<G: Element> std::fmt::Debug for Tensor<'_, G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("len", &self.param.len())
            .field("grad", &G::DTYPE)
            .field("copy", &self.copy)
            .field("options", &self.options)
            .finish()
    }
}

/// One AdamW step `t` (1-based) over `tensors`, in place, in one launch on
/// [`Gpu::stream`]; never synchronizes the host. Errors, all before anything is queued:
/// those of [`crate::cpu::adamw::step`] (hyper-parameters, `t`, options, lengths), a
/// buffer not aligned to its element type ([`Error::Misaligned`]), or more than 2^31 − 1
/// chunks of [`CHUNK`] elements in all ([`Error::Dim`]). An empty list, or one of empty
/// tensors, queues nothing.
pub fn step<G: Element>(
    gpu: &Gpu,
    opt: &AdamW,
    t: u64,
    tensors: &mut [Tensor<'_, G>],
) -> Result<()> {
    let k = shared(opt, t)?;
    let kernel = LK_ADAMW.of::<G>()?;

    // Every check that needs no device address.
    let mut consts = Vec::with_capacity(tensors.len());
    let (mut chunks, mut total) = (0usize, 0usize);
    for x in tensors.iter() {
        let n = x.param.len();
        total = total.saturating_add(n);
        check_len("m", x.m.len(), n)?;
        check_len("v", x.v.len(), n)?;
        check_len("grad", x.grad.len(), n)?;
        if let Some(c) = x.copy.len() {
            check_len("copy", c, n)?;
        }
        consts.push(per_tensor(opt, t, &x.options)?);
        chunks = chunks
            .checked_add(n.div_ceil(CHUNK))
            .filter(|&c| c <= MAX_CHUNKS)
            .ok_or(Error::Dim {
                name: "total elements",
                value: total,
                reason: "the tensors hold more than 2^31 - 1 chunks of 4096 elements",
            })?;
    }
    if chunks == 0 {
        return Ok(());
    }

    // The addresses (alignment checked), the table and the work list.
    let mut guards: Vec<SyncOnDrop<'_>> = Vec::with_capacity(5 * tensors.len());
    let mut table: Vec<LkAdamwTensor> = Vec::with_capacity(tensors.len());
    let mut work: Vec<u32> = Vec::with_capacity(chunks);
    for (x, c) in tensors.iter_mut().zip(&consts) {
        let n = x.param.len();
        if n == 0 {
            continue;
        }
        let (pp, gp) = dptr_mut::<f32, _>(gpu, "param", &mut *x.param)?;
        let (mp, gm) = dptr_mut::<f32, _>(gpu, "m", &mut *x.m)?;
        let (vp, gv) = dptr_mut::<f32, _>(gpu, "v", &mut *x.v)?;
        let (dp, gd) = dptr::<G, _>(gpu, "grad", x.grad)?;
        guards.extend([gp, gm, gv, gd]);
        let (cp, copy_kind, copy_size) = match &mut x.copy {
            ParamCopy::None => (0, COPY_NONE, 1),
            ParamCopy::F32(s) => {
                let (p, g) = dptr_mut::<f32, _>(gpu, "copy", &mut **s)?;
                guards.push(g);
                (p, COPY_F32, 4)
            }
            ParamCopy::F16(s) => {
                let (p, g) = dptr_mut::<f16, _>(gpu, "copy", &mut **s)?;
                guards.push(g);
                (p, COPY_F16, 2)
            }
            ParamCopy::Bf16(s) => {
                let (p, g) = dptr_mut::<bf16, _>(gpu, "copy", &mut **s)?;
                guards.push(g);
                (p, COPY_BF16, 2)
            }
        };
        let vec = [pp, mp, vp].iter().all(|a| a % 16 == 0)
            && dp % (4 * G::DTYPE.size()) as u64 == 0
            && cp % (4 * copy_size) == 0;
        let idx = table.len() as u32; // < chunks <= 2^31 - 1
        table.push(LkAdamwTensor {
            param: pp as *mut f32,
            m: mp as *mut f32,
            v: vp as *mut f32,
            grad: dp as *const _,
            copy: cp as *mut _,
            len: n as i64,
            chunk0: work.len() as i64,
            decay: c.decay,
            neg_step: c.neg_step,
            copy_kind,
            vec: vec as i32,
        });
        work.extend(std::iter::repeat_n(idx, n.div_ceil(CHUNK)));
    }

    let s = gpu.stream();
    let dtable = s.clone_htod(&table)?;
    let dwork = s.clone_htod(&work)?;
    let (tp, _gt) = dtable.device_ptr(s);
    let (wp, _gw) = dwork.device_ptr(s);
    let params = LkAdamwParams {
        tensors: tp as *const _,
        work: wp as *const _,
        chunks: chunks as i64,
        lerp_coeff: k.lerp_coeff,
        lerp_base_m: k.lerp_base_m as i32,
        beta2: k.beta2,
        c2: k.c2,
        bc2_sqrt: k.bc2_sqrt,
        eps: k.eps,
    };
    let blocks = chunks.min(gpu.sm_count() as usize * BLOCKS_PER_SM).max(1) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.launch(kernel, cfg, &params)
}
