//! `lora_kernels._lib`: the Python extension module behind the `lora_kernels` package.
//!
//! A private, low-level layer: every function takes raw buffers as `(address, elements)`
//! pairs (a torch tensor's `data_ptr()` and `numel()`), the element type by name, the
//! device ordinal (`-1`: host memory, run the CPU oracle) and, on a GPU, the raw CUDA
//! stream to queue on (torch's current stream). The Python package
//! (`lora_kernels/ops.py`) checks dtype, device, layout and shape of every tensor before it
//! calls in, and allocates every output with torch; this module re-checks every length
//! against the shape (through the crate's own checks) before anything is launched.
//!
//! Nothing here decides a path: the crate's planner does, from the call's options.
//! The one piece of state is a cache of loaded [`Gpu`]s, one per (device, stream), so
//! that the kernels are loaded and the cuBLAS handle made once, not on every call.
//! Scratch buffers of the ops come from CUDA's stream-ordered allocator (the device's
//! default memory pool) on the same stream, freed in stream order; [`pool_usage`] reads it.

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{sys::CUstream, CudaContext, CudaSlice};
use half::{bf16, f16};
use lora_kernels::cuda::{self, nf4::DeviceAbsmax, nf4::Nf4Device, Gpu};
use lora_kernels::neftune::BackwardOptions;
use lora_kernels::nf4::{Absmax, DoubleQuant};
use lora_kernels::{cpu, DType, Dropout, Element, Error, LoraOptions, LoraShape, Nf4Weight};
use lora_kernels::{DoraGrads, DoraOutputs, DoraSaved, DoraWeights};
use lora_kernels::{EmbedShape, LoraGrads, LoraWeights, Noise, QloraWeights, SeqLen};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

/// A buffer as Python passes it: (address, number of elements).
type Buf = (u64, usize);

/// An NF4 base as Python passes it: (blocksize, packed, absmax, absmax2, code2, offset).
type Nf4Tuple = (usize, Buf, Buf, Option<Buf>, Option<Buf>, f32);

fn to_py(e: Error) -> PyErr {
    match e {
        Error::KernelsNotBuilt
        | Error::NoDriver
        | Error::NoCublas
        | Error::NoDevice { .. }
        | Error::UnsupportedGpu { .. }
        | Error::ModuleLoad { .. }
        | Error::Driver(_)
        | Error::Cublas(_)
        | Error::Io(_) => PyRuntimeError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

fn res<T>(r: lora_kernels::Result<T>) -> PyResult<T> {
    r.map_err(to_py)
}

// ---------------------------------------------------------------------------------------
// GPUs and borrowed device buffers
// ---------------------------------------------------------------------------------------

type GpuCache = Mutex<HashMap<(usize, u64), Arc<Gpu>>>;

fn gpu_cache() -> &'static GpuCache {
    static CACHE: OnceLock<GpuCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The [`Gpu`] of device `ordinal` queued on the raw stream `stream` (0: the legacy
/// default stream), made once and cached. The context is the device's primary context,
/// the one the CUDA runtime (and so torch) uses.
fn gpu_for(ordinal: usize, stream: u64) -> PyResult<Arc<Gpu>> {
    let mut cache = gpu_cache().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(g) = cache.get(&(ordinal, stream)) {
        return Ok(g.clone());
    }
    let base = cache
        .iter()
        .find(|((o, _), _)| *o == ordinal)
        .map(|(_, g)| g.clone());
    let gpu = match base {
        Some(base) => {
            let raw = base.context().clone();
            // SAFETY: `stream` is torch's stream of this device (ops.py passes
            // `torch.cuda.current_stream(device).cuda_stream`), a stream of the primary
            // context; torch keeps its streams alive for the life of the process.
            let s = unsafe { raw.wrap_borrowed_stream(stream as CUstream) };
            res(base.with_stream(s))?
        }
        None => {
            let count = res(CudaContext::device_count().map_err(Error::from))? as usize;
            if ordinal >= count {
                return Err(to_py(Error::NoDevice { ordinal, count }));
            }
            let ctx = res(CudaContext::new(ordinal).map_err(Error::from))?;
            // SAFETY: buffers here are torch's, borrowed for one call and used on this
            // one stream; cudarc's cross-stream events are not wanted (torch orders its
            // own streams), and with them off capture in a CUDA graph works.
            unsafe { ctx.disable_event_tracking() };
            // SAFETY: as above: torch's stream of this device's primary context.
            let s = unsafe { ctx.wrap_borrowed_stream(stream as CUstream) };
            res(Gpu::from_stream(s))?
        }
    };
    let gpu = Arc::new(gpu);
    cache.insert((ordinal, stream), gpu.clone());
    Ok(gpu)
}

/// A torch tensor's memory seen as a cudarc buffer for one call; never freed by us.
struct Borrowed<T>(ManuallyDrop<CudaSlice<T>>);

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; `leak` hands the address back without freeing it
        // (torch owns the memory).
        let s = unsafe { ManuallyDrop::take(&mut self.0) };
        let _ = s.leak();
    }
}

impl<T> std::ops::Deref for Borrowed<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Borrowed<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.0
    }
}

fn dev<T>(gpu: &Gpu, (ptr, len): Buf) -> Borrowed<T> {
    // SAFETY: `ptr` is the data pointer of a contiguous torch tensor of `len` elements
    // of T on this GPU's device (ops.py checks dtype, device, contiguity and numel);
    // `Borrowed` never frees it.
    Borrowed(ManuallyDrop::new(unsafe {
        gpu.stream().upgrade_device_ptr::<T>(ptr, len)
    }))
}

fn host<'a, T>((ptr, len): Buf) -> &'a [T] {
    if len == 0 {
        return &[];
    }
    // SAFETY: `ptr` is the data pointer of a contiguous CPU torch tensor of `len`
    // elements of T (checked by ops.py), alive and unaliased by writers for the call.
    unsafe { std::slice::from_raw_parts(ptr as *const T, len) }
}

fn host_mut<'a, T>((ptr, len): Buf) -> &'a mut [T] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: as `host`, for an output tensor that no other argument aliases (ops.py
    // allocates outputs fresh).
    unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, len) }
}

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------

fn shape(t: usize, k: usize, n: usize, r: usize) -> LoraShape {
    LoraShape {
        tokens: t,
        in_features: k,
        out_features: n,
        rank: r,
    }
}

fn options(scale: f32, p: f32, seed: u64, offset: u64) -> LoraOptions {
    let o = LoraOptions::new(scale);
    if p > 0.0 {
        o.with_dropout(Dropout::new(p, seed, offset))
    } else {
        o
    }
}

/// An NF4 base as bitsandbytes keeps it: 4-bit codes, and either f32 block scales or
/// (double quantization) their 8-bit codes, the nested f32 scales, the nested code
/// table and the offset.
struct Nf4Args {
    rows: usize,
    cols: usize,
    blocksize: usize,
    packed: Buf,
    absmax: Buf,
    nested: Option<(Buf, Buf, f32)>,
}

#[allow(clippy::too_many_arguments)]
fn nf4_args(
    rows: usize,
    cols: usize,
    blocksize: usize,
    packed: Buf,
    absmax: Buf,
    absmax2: Option<Buf>,
    code2: Option<Buf>,
    offset: f32,
) -> PyResult<Nf4Args> {
    let nested = match (absmax2, code2) {
        (Some(a2), Some(c2)) => Some((a2, c2, offset)),
        (None, None) => None,
        _ => {
            return Err(PyValueError::new_err(
                "nf4: absmax2 and code2 are given together (double quantization) or not at all",
            ))
        }
    };
    Ok(Nf4Args {
        rows,
        cols,
        blocksize,
        packed,
        absmax,
        nested,
    })
}

/// A DoRA base given as exactly one of a dense `w` (`w_given`) or an NF4 tuple: `None`
/// for the dense one, else the NF4 arguments.
fn dense_or_nf4(
    op: &str,
    n: usize,
    k: usize,
    w_given: bool,
    nf4: Option<Nf4Tuple>,
) -> PyResult<Option<Nf4Args>> {
    match (w_given, nf4) {
        (true, None) => Ok(None),
        (false, Some((bs, pk, am, a2, c2, off))) => {
            Ok(Some(nf4_args(n, k, bs, pk, am, a2, c2, off)?))
        }
        _ => Err(PyValueError::new_err(format!(
            "{op}: exactly one of w and nf4"
        ))),
    }
}

/// The NF4 base over torch's device memory (nothing copied). The buffers must be
/// leaked, not freed: `BorrowedNf4` does it.
struct BorrowedNf4(ManuallyDrop<Nf4Device>);

impl Drop for BorrowedNf4 {
    fn drop(&mut self) {
        // SAFETY: taken once, here; every buffer is leaked (torch owns them).
        let w = unsafe { ManuallyDrop::take(&mut self.0) };
        let _ = w.packed.leak();
        match w.absmax {
            DeviceAbsmax::F32(a) => {
                let _ = a.leak();
            }
            DeviceAbsmax::Double {
                q, absmax2, code, ..
            } => {
                let _ = q.leak();
                let _ = absmax2.leak();
                let _ = code.leak();
            }
        }
    }
}

fn nf4_dev<T: Element>(gpu: &Gpu, a: &Nf4Args) -> BorrowedNf4 {
    let s = gpu.stream();
    // SAFETY: each address is a tensor of bitsandbytes' QuantState (or the packed
    // weight) on this device, of these lengths and element types (ops.py checks them);
    // `BorrowedNf4` leaks every buffer, so none is freed here.
    let up = |b: Buf| -> CudaSlice<u8> { unsafe { s.upgrade_device_ptr(b.0, b.1) } };
    // SAFETY: as above, for the f32 tensors.
    let upf = |b: Buf| -> CudaSlice<f32> { unsafe { s.upgrade_device_ptr(b.0, b.1) } };
    let absmax = match a.nested {
        None => DeviceAbsmax::F32(upf(a.absmax)),
        Some((a2, c2, offset)) => DeviceAbsmax::Double {
            q: up(a.absmax),
            absmax2: upf(a2),
            code: upf(c2),
            offset,
        },
    };
    BorrowedNf4(ManuallyDrop::new(Nf4Device {
        rows: a.rows,
        cols: a.cols,
        blocksize: a.blocksize,
        packed: up(a.packed),
        absmax,
        dtype: T::DTYPE,
    }))
}

fn nf4_host(a: &Nf4Args, dtype: DType) -> PyResult<Nf4Weight> {
    let absmax = match a.nested {
        None => Absmax::F32(host::<f32>(a.absmax).to_vec()),
        Some((a2, c2, offset)) => Absmax::Double(DoubleQuant {
            q: host::<u8>(a.absmax).to_vec(),
            absmax2: host::<f32>(a2).to_vec(),
            code: host::<f32>(c2).to_vec(),
            offset,
        }),
    };
    let w = Nf4Weight {
        rows: a.rows,
        cols: a.cols,
        blocksize: a.blocksize,
        packed: host::<u8>(a.packed).to_vec(),
        absmax,
        dtype,
    };
    res(w.validate())?;
    Ok(w)
}

/// Runs `$body` with `$T` bound to the element type named by `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            "bfloat16" => {
                type $T = bf16;
                $body
            }
            "float16" => {
                type $T = f16;
                $body
            }
            "float32" => {
                type $T = f32;
                $body
            }
            other => Err(PyTypeError::new_err(format!(
                "dtype {other} is not supported (bfloat16, float16 or float32)"
            ))),
        }
    };
}

// ---------------------------------------------------------------------------------------
// LoRA
// ---------------------------------------------------------------------------------------

/// LoRA forward `y = x Wᵀ + bias + s·drop(x)Aᵀ Bᵀ`, `h = drop(x)Aᵀ`. Returns the plan
/// taken (`Debug` text; "cpu" for the oracle).
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, t, k, n, r, scale, p, seed, offset, x, w, a, b, bias, y, h))]
#[allow(clippy::too_many_arguments)]
fn lora_forward(
    py: Python<'_>,
    device: i64,
    stream: u64,
    dtype: &str,
    t: usize,
    k: usize,
    n: usize,
    r: usize,
    scale: f32,
    p: f32,
    seed: u64,
    offset: u64,
    x: Buf,
    w: Buf,
    a: Buf,
    b: Buf,
    bias: Option<Buf>,
    y: Buf,
    h: Option<Buf>,
) -> PyResult<String> {
    let sh = shape(t, k, n, r);
    let o = options(scale, p, seed, offset);
    by_dtype!(dtype, T => {
        if device < 0 {
            py.detach(|| {
                let (bias_s, h_s) = (bias.map(host::<T>), h.map(host_mut::<T>));
                let wts = LoraWeights { w: host::<T>(w), a: host::<T>(a), b: host::<T>(b), bias: bias_s };
                res(cpu::lora::forward::<T>(&sh, &o, host::<T>(x), wts, host_mut::<T>(y), h_s))
                    .map(|_| "cpu".to_string())
            })
        } else {
            let gpu = gpu_for(device as usize, stream)?;
            let (x, w, a, b) = (dev::<T>(&gpu, x), dev::<T>(&gpu, w), dev::<T>(&gpu, a), dev::<T>(&gpu, b));
            let bias = bias.map(|v| dev::<T>(&gpu, v));
            let mut y = dev::<T>(&gpu, y);
            let mut h = h.map(|v| dev::<T>(&gpu, v));
            let wts = LoraWeights { w: &*w, a: &*a, b: &*b, bias: bias.as_deref() };
            let plan = res(cuda::lora::forward::<T, _, _>(&gpu, &sh, &o, &*x, wts, &mut *y, h.as_deref_mut()))?;
            Ok(format!("{plan:?}"))
        }
    })
}

/// LoRA backward: dX, dA, dB from dY (W and bias frozen).
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, t, k, n, r, scale, p, seed, offset, x, w, a, b, h, dy, dx, da, db))]
#[allow(clippy::too_many_arguments)]
fn lora_backward(
    py: Python<'_>,
    device: i64,
    stream: u64,
    dtype: &str,
    t: usize,
    k: usize,
    n: usize,
    r: usize,
    scale: f32,
    p: f32,
    seed: u64,
    offset: u64,
    x: Buf,
    w: Buf,
    a: Buf,
    b: Buf,
    h: Buf,
    dy: Buf,
    dx: Buf,
    da: Buf,
    db: Buf,
) -> PyResult<String> {
    let sh = shape(t, k, n, r);
    let o = options(scale, p, seed, offset);
    by_dtype!(dtype, T => {
        if device < 0 {
            py.detach(|| {
                let wts = LoraWeights { w: host::<T>(w), a: host::<T>(a), b: host::<T>(b), bias: None };
                let g = LoraGrads { dx: host_mut::<T>(dx), da: host_mut::<T>(da), db: host_mut::<T>(db) };
                res(cpu::lora::backward::<T>(&sh, &o, host::<T>(x), wts, host::<T>(h), host::<T>(dy), g))
                    .map(|_| "cpu".to_string())
            })
        } else {
            let gpu = gpu_for(device as usize, stream)?;
            let (x, w, a, b) = (dev::<T>(&gpu, x), dev::<T>(&gpu, w), dev::<T>(&gpu, a), dev::<T>(&gpu, b));
            let (h, dy) = (dev::<T>(&gpu, h), dev::<T>(&gpu, dy));
            let (mut dx, mut da, mut db) = (dev::<T>(&gpu, dx), dev::<T>(&gpu, da), dev::<T>(&gpu, db));
            let wts = LoraWeights { w: &*w, a: &*a, b: &*b, bias: None };
            let g = LoraGrads { dx: &mut *dx, da: &mut *da, db: &mut *db };
            let plan = res(cuda::lora::backward::<T, _, _>(&gpu, &sh, &o, &*x, wts, &*h, &*dy, g))?;
            Ok(format!("{plan:?}"))
        }
    })
}

/// `W ± s·B A` in place (merge: +, unmerge: −).
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, k, n, r, scale, unmerge, w, a, b))]
#[allow(clippy::too_many_arguments)]
fn lora_merge(
    py: Python<'_>,
    device: i64,
    stream: u64,
    dtype: &str,
    k: usize,
    n: usize,
    r: usize,
    scale: f32,
    unmerge: bool,
    w: Buf,
    a: Buf,
    b: Buf,
) -> PyResult<()> {
    let sh = shape(0, k, n, r);
    by_dtype!(dtype, T => {
        if device < 0 {
            py.detach(|| {
                let (wm, a, b) = (host_mut::<T>(w), host::<T>(a), host::<T>(b));
                res(if unmerge {
                    cpu::lora::unmerge::<T>(&sh, scale, wm, a, b)
                } else {
                    cpu::lora::merge::<T>(&sh, scale, wm, a, b)
                })
            })
        } else {
            let gpu = gpu_for(device as usize, stream)?;
            let (mut wd, a, b) = (dev::<T>(&gpu, w), dev::<T>(&gpu, a), dev::<T>(&gpu, b));
            res(if unmerge {
                cuda::lora::unmerge::<T, _, _>(&gpu, &sh, scale, &mut *wd, &*a, &*b)
            } else {
                cuda::lora::merge::<T, _, _>(&gpu, &sh, scale, &mut *wd, &*a, &*b)
            })
        }
    })
}

/// DoRA merge in place, `W ← m/‖W + s·B A‖ ⊙ (W + s·B A)`, writing the norms (f32 [N],
/// what unmerge needs); unmerge: `W ← W ⊙ norm/m − s·B A`.
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, k, n, r, scale, unmerge, w, a, b, m, norm))]
#[allow(clippy::too_many_arguments)]
fn dora_merge(
    py: Python<'_>,
    device: i64,
    stream: u64,
    dtype: &str,
    k: usize,
    n: usize,
    r: usize,
    scale: f32,
    unmerge: bool,
    w: Buf,
    a: Buf,
    b: Buf,
    m: Buf,
    norm: Buf,
) -> PyResult<()> {
    let sh = shape(0, k, n, r);
    by_dtype!(dtype, T => {
        if device < 0 {
            py.detach(|| {
                let (wm, a, b, m) = (host_mut::<T>(w), host::<T>(a), host::<T>(b), host::<T>(m));
                res(if unmerge {
                    cpu::dora::unmerge::<T>(&sh, scale, wm, a, b, m, host::<f32>(norm))
                } else {
                    cpu::dora::merge::<T>(&sh, scale, wm, a, b, m, host_mut::<f32>(norm))
                })
            })
        } else {
            let gpu = gpu_for(device as usize, stream)?;
            let (mut wd, a, b, m) = (dev::<T>(&gpu, w), dev::<T>(&gpu, a), dev::<T>(&gpu, b), dev::<T>(&gpu, m));
            let mut nd = dev::<f32>(&gpu, norm);
            res(if unmerge {
                cuda::dora::unmerge::<T, _, _, _>(&gpu, &sh, scale, &mut *wd, &*a, &*b, &*m, &*nd)
            } else {
                cuda::dora::merge::<T, _, _, _>(&gpu, &sh, scale, &mut *wd, &*a, &*b, &*m, &mut *nd)
            })
        }
    })
}

// ---------------------------------------------------------------------------------------
// QLoRA (NF4 base)
// ---------------------------------------------------------------------------------------

/// QLoRA forward over an NF4 base in bitsandbytes' layout.
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, t, k, n, r, scale, p, seed, offset, x, blocksize, packed, absmax, absmax2, code2, nf4_offset, a, b, bias, y, h))]
#[allow(clippy::too_many_arguments)]
fn qlora_forward(
    py: Python<'_>,
    device: i64,
    stream: u64,
    dtype: &str,
    t: usize,
    k: usize,
    n: usize,
    r: usize,
    scale: f32,
    p: f32,
    seed: u64,
    offset: u64,
    x: Buf,
    blocksize: usize,
    packed: Buf,
    absmax: Buf,
    absmax2: Option<Buf>,
    code2: Option<Buf>,
    nf4_offset: f32,
    a: Buf,
    b: Buf,
    bias: Option<Buf>,
    y: Buf,
    h: Option<Buf>,
) -> PyResult<String> {
    let sh = shape(t, k, n, r);
    let o = options(scale, p, seed, offset);
    let nf = nf4_args(n, k, blocksize, packed, absmax, absmax2, code2, nf4_offset)?;
    by_dtype!(dtype, T => {
        if device < 0 {
            py.detach(|| {
                let wq = nf4_host(&nf, T::DTYPE)?;
                let (bias_s, h_s) = (bias.map(host::<T>), h.map(host_mut::<T>));
                let wts = QloraWeights { w: &wq, a: host::<T>(a), b: host::<T>(b), bias: bias_s };
                res(cpu::qlora::forward::<T>(&sh, &o, host::<T>(x), wts, host_mut::<T>(y), h_s))
                    .map(|_| "cpu".to_string())
            })
        } else {
            let gpu = gpu_for(device as usize, stream)?;
            let wq = nf4_dev::<T>(&gpu, &nf);
            let (x, a, b) = (dev::<T>(&gpu, x), dev::<T>(&gpu, a), dev::<T>(&gpu, b));
            let bias = bias.map(|v| dev::<T>(&gpu, v));
            let mut y = dev::<T>(&gpu, y);
            let mut h = h.map(|v| dev::<T>(&gpu, v));
            let wts = QloraWeights { w: &*wq.0, a: &*a, b: &*b, bias: bias.as_deref() };
            let plan = res(cuda::qlora::forward::<T, _, _>(&gpu, &sh, &o, &*x, wts, &mut *y, h.as_deref_mut()))?;
            Ok(format!("{plan:?}"))
        }
    })
}

/// QLoRA backward: dX through deq(W), dA, dB.
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, t, k, n, r, scale, p, seed, offset, x, blocksize, packed, absmax, absmax2, code2, nf4_offset, a, b, h, dy, dx, da, db))]
#[allow(clippy::too_many_arguments)]
fn qlora_backward(
    py: Python<'_>,
    device: i64,
    stream: u64,
    dtype: &str,
    t: usize,
    k: usize,
    n: usize,
    r: usize,
    scale: f32,
    p: f32,
    seed: u64,
    offset: u64,
    x: Buf,
    blocksize: usize,
    packed: Buf,
    absmax: Buf,
    absmax2: Option<Buf>,
    code2: Option<Buf>,
    nf4_offset: f32,
    a: Buf,
    b: Buf,
    h: Buf,
    dy: Buf,
    dx: Buf,
    da: Buf,
    db: Buf,
) -> PyResult<String> {
    let sh = shape(t, k, n, r);
    let o = options(scale, p, seed, offset);
    let nf = nf4_args(n, k, blocksize, packed, absmax, absmax2, code2, nf4_offset)?;
    by_dtype!(dtype, T => {
        if device < 0 {
            py.detach(|| {
                let wq = nf4_host(&nf, T::DTYPE)?;
                let wts = QloraWeights { w: &wq, a: host::<T>(a), b: host::<T>(b), bias: None };
                let g = LoraGrads { dx: host_mut::<T>(dx), da: host_mut::<T>(da), db: host_mut::<T>(db) };
                res(cpu::qlora::backward::<T>(&sh, &o, host::<T>(x), wts, host::<T>(h), host::<T>(dy), g))
                    .map(|_| "cpu".to_string())
            })
        } else {
            let gpu = gpu_for(device as usize, stream)?;
            let wq = nf4_dev::<T>(&gpu, &nf);
            let (x, a, b) = (dev::<T>(&gpu, x), dev::<T>(&gpu, a), dev::<T>(&gpu, b));
            let (h, dy) = (dev::<T>(&gpu, h), dev::<T>(&gpu, dy));
            let (mut dx, mut da, mut db) = (dev::<T>(&gpu, dx), dev::<T>(&gpu, da), dev::<T>(&gpu, db));
            let wts = QloraWeights { w: &*wq.0, a: &*a, b: &*b, bias: None };
            let g = LoraGrads { dx: &mut *dx, da: &mut *da, db: &mut *db };
            let plan = res(cuda::qlora::backward::<T, _, _>(&gpu, &sh, &o, &*x, wts, &*h, &*dy, g))?;
            Ok(format!("{plan:?}"))
        }
    })
}

// ---------------------------------------------------------------------------------------
// DoRA and QDoRA (`w` dense, or `nf4` given)
// ---------------------------------------------------------------------------------------

/// DoRA forward; the base is dense `w`, or NF4 when `nf4` = (blocksize, packed, absmax,
/// absmax2, code2, offset) is given (QDoRA). Writes y, h, the f32 norms and z.
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, t, k, n, r, scale, p, seed, offset, x, w, nf4, a, b, bias, m, y, h, norm, z))]
#[allow(clippy::too_many_arguments)]
fn dora_forward(
    py: Python<'_>,
    device: i64,
    stream: u64,
    dtype: &str,
    t: usize,
    k: usize,
    n: usize,
    r: usize,
    scale: f32,
    p: f32,
    seed: u64,
    offset: u64,
    x: Buf,
    w: Option<Buf>,
    nf4: Option<Nf4Tuple>,
    a: Buf,
    b: Buf,
    bias: Option<Buf>,
    m: Buf,
    y: Buf,
    h: Buf,
    norm: Buf,
    z: Option<Buf>,
) -> PyResult<String> {
    let sh = shape(t, k, n, r);
    let o = options(scale, p, seed, offset);
    let nf = dense_or_nf4("dora_forward", n, k, w.is_some(), nf4)?;
    by_dtype!(dtype, T => {
        if device < 0 {
            py.detach(|| {
                let out = DoraOutputs {
                    y: host_mut::<T>(y),
                    h: Some(host_mut::<T>(h)),
                    norm: Some(host_mut::<f32>(norm)),
                    z: z.map(host_mut::<T>),
                };
                let (x, a, b, m) = (host::<T>(x), host::<T>(a), host::<T>(b), host::<T>(m));
                let bias = bias.map(host::<T>);
                match (&nf, w) {
                    (Some(nf), _) => {
                        let wq = nf4_host(nf, T::DTYPE)?;
                        let wts = DoraWeights { w: &wq, a, b, bias, magnitude: m };
                        res(cpu::qdora::forward::<T>(&sh, &o, x, wts, out))
                    }
                    (None, Some(w)) => {
                        let wts = DoraWeights { w: host::<T>(w), a, b, bias, magnitude: m };
                        res(cpu::dora::forward::<T>(&sh, &o, x, wts, out))
                    }
                    (None, None) => unreachable!("checked above"),
                }
                .map(|_| "cpu".to_string())
            })
        } else {
            let gpu = gpu_for(device as usize, stream)?;
            let (x, a, b, m) = (dev::<T>(&gpu, x), dev::<T>(&gpu, a), dev::<T>(&gpu, b), dev::<T>(&gpu, m));
            let bias = bias.map(|v| dev::<T>(&gpu, v));
            let (mut y, mut h, mut norm) = (dev::<T>(&gpu, y), dev::<T>(&gpu, h), dev::<f32>(&gpu, norm));
            let mut z = z.map(|v| dev::<T>(&gpu, v));
            let out = DoraOutputs { y: &mut *y, h: Some(&mut *h), norm: Some(&mut *norm), z: z.as_deref_mut() };
            let plan = match (&nf, w) {
                (Some(nf), _) => {
                    let wq = nf4_dev::<T>(&gpu, nf);
                    let wts = DoraWeights { w: &*wq.0, a: &*a, b: &*b, bias: bias.as_deref(), magnitude: &*m };
                    res(cuda::qdora::forward::<T, _, _, _>(&gpu, &sh, &o, &*x, wts, out))?
                }
                (None, Some(w)) => {
                    let w = dev::<T>(&gpu, w);
                    let wts = DoraWeights { w: &*w, a: &*a, b: &*b, bias: bias.as_deref(), magnitude: &*m };
                    res(cuda::dora::forward::<T, _, _, _>(&gpu, &sh, &o, &*x, wts, out))?
                }
                (None, None) => unreachable!("checked above"),
            };
            Ok(format!("{plan:?}"))
        }
    })
}

/// DoRA / QDoRA backward: dX, dA, dB, dm from what the forward saved.
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, t, k, n, r, scale, p, seed, offset, x, w, nf4, a, b, m, h, norm, z, dy, dx, da, db, dm))]
#[allow(clippy::too_many_arguments)]
fn dora_backward(
    py: Python<'_>,
    device: i64,
    stream: u64,
    dtype: &str,
    t: usize,
    k: usize,
    n: usize,
    r: usize,
    scale: f32,
    p: f32,
    seed: u64,
    offset: u64,
    x: Buf,
    w: Option<Buf>,
    nf4: Option<Nf4Tuple>,
    a: Buf,
    b: Buf,
    m: Buf,
    h: Buf,
    norm: Buf,
    z: Option<Buf>,
    dy: Buf,
    dx: Buf,
    da: Buf,
    db: Buf,
    dm: Buf,
) -> PyResult<String> {
    let sh = shape(t, k, n, r);
    let o = options(scale, p, seed, offset);
    let nf = dense_or_nf4("dora_backward", n, k, w.is_some(), nf4)?;
    by_dtype!(dtype, T => {
        if device < 0 {
            py.detach(|| {
                let saved = DoraSaved { h: host::<T>(h), norm: host::<f32>(norm), z: z.map(host::<T>) };
                let g = DoraGrads {
                    dx: host_mut::<T>(dx),
                    da: host_mut::<T>(da),
                    db: host_mut::<T>(db),
                    dm: host_mut::<T>(dm),
                };
                let (x, a, b, m, dy) = (host::<T>(x), host::<T>(a), host::<T>(b), host::<T>(m), host::<T>(dy));
                match (&nf, w) {
                    (Some(nf), _) => {
                        let wq = nf4_host(nf, T::DTYPE)?;
                        let wts = DoraWeights { w: &wq, a, b, bias: None, magnitude: m };
                        res(cpu::qdora::backward::<T>(&sh, &o, x, wts, saved, dy, g))
                    }
                    (None, Some(w)) => {
                        let wts = DoraWeights { w: host::<T>(w), a, b, bias: None, magnitude: m };
                        res(cpu::dora::backward::<T>(&sh, &o, x, wts, saved, dy, g))
                    }
                    (None, None) => unreachable!("checked above"),
                }
                .map(|_| "cpu".to_string())
            })
        } else {
            let gpu = gpu_for(device as usize, stream)?;
            let (x, a, b, m) = (dev::<T>(&gpu, x), dev::<T>(&gpu, a), dev::<T>(&gpu, b), dev::<T>(&gpu, m));
            let (h, norm, dy) = (dev::<T>(&gpu, h), dev::<f32>(&gpu, norm), dev::<T>(&gpu, dy));
            let z = z.map(|v| dev::<T>(&gpu, v));
            let (mut dx, mut da, mut db, mut dm) =
                (dev::<T>(&gpu, dx), dev::<T>(&gpu, da), dev::<T>(&gpu, db), dev::<T>(&gpu, dm));
            let saved = DoraSaved { h: &*h, norm: &*norm, z: z.as_deref() };
            let g = DoraGrads { dx: &mut *dx, da: &mut *da, db: &mut *db, dm: &mut *dm };
            let plan = match (&nf, w) {
                (Some(nf), _) => {
                    let wq = nf4_dev::<T>(&gpu, nf);
                    let wts = DoraWeights { w: &*wq.0, a: &*a, b: &*b, bias: None, magnitude: &*m };
                    res(cuda::qdora::backward::<T, _, _, _>(&gpu, &sh, &o, &*x, wts, saved, &*dy, g))?
                }
                (None, Some(w)) => {
                    let w = dev::<T>(&gpu, w);
                    let wts = DoraWeights { w: &*w, a: &*a, b: &*b, bias: None, magnitude: &*m };
                    res(cuda::dora::backward::<T, _, _, _>(&gpu, &sh, &o, &*x, wts, saved, &*dy, g))?
                }
                (None, None) => unreachable!("checked above"),
            };
            Ok(format!("{plan:?}"))
        }
    })
}

// ---------------------------------------------------------------------------------------
// NEFTune
// ---------------------------------------------------------------------------------------

/// Runs `$body` with `$I` bound to the id type named by `$ids`.
macro_rules! by_id_type {
    ($ids:expr, $I:ident => $body:expr) => {
        match $ids {
            "int64" => {
                type $I = i64;
                $body
            }
            "int32" => {
                type $I = i32;
                $body
            }
            other => Err(PyTypeError::new_err(format!(
                "ids dtype {other} is not supported (int64 or int32)"
            ))),
        }
    };
}

/// The embedding rows of `ids` [batch, seq], plus NEFTune's uniform noise of strength
/// `alpha / sqrt(seq · dim)` when `alpha` > 0 (the padded length, as transformers'
/// NEFTune hook): one pass. Out-of-range ids give zero rows on the GPU (reported by
/// `take_index_errors`) and an error on the CPU.
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, id_dtype, batch, seq, vocab, dim, alpha, seed, offset, table, ids, out))]
#[allow(clippy::too_many_arguments)]
fn neftune_embed(
    py: Python<'_>,
    device: i64,
    stream: u64,
    dtype: &str,
    id_dtype: &str,
    batch: usize,
    seq: usize,
    vocab: usize,
    dim: usize,
    alpha: f32,
    seed: u64,
    offset: u64,
    table: Buf,
    ids: Buf,
    out: Buf,
) -> PyResult<()> {
    let shape = EmbedShape::new(batch, seq, vocab, dim);
    let noise = Noise::new(alpha, seed, offset);
    by_dtype!(dtype, T => by_id_type!(id_dtype, I => {
        if device < 0 {
            py.detach(|| {
                let (table, ids, out) = (host::<T>(table), host::<I>(ids), host_mut::<T>(out));
                res(if alpha > 0.0 {
                    cpu::neftune::embed::<T, I, u8>(&shape, table, ids, &noise, SeqLen::Padded, out)
                } else {
                    cpu::neftune::gather::<T, I>(&shape, table, ids, out)
                })
            })
        } else {
            let gpu = gpu_for(device as usize, stream)?;
            let (table, ids) = (dev::<T>(&gpu, table), dev::<I>(&gpu, ids));
            let mut out = dev::<T>(&gpu, out);
            res(if alpha > 0.0 {
                cuda::neftune::embed::<T, I, u8, _, _, CudaSlice<u8>, _>(
                    &gpu, &shape, &*table, &*ids, &noise, SeqLen::Padded, &mut *out,
                )
            } else {
                cuda::neftune::gather::<T, I, _, _, _>(&gpu, &shape, &*table, &*ids, &mut *out)
            })
        }
    }))
}

/// The table's gradient added into `d_table` (f32 [vocab, dim]) from the output's gradient,
/// summed in position order (deterministic, as the CPU oracle).
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, id_dtype, batch, seq, vocab, dim, padding_idx, ids, d_out, d_table))]
#[allow(clippy::too_many_arguments)]
fn neftune_embedding_backward(
    py: Python<'_>,
    device: i64,
    stream: u64,
    dtype: &str,
    id_dtype: &str,
    batch: usize,
    seq: usize,
    vocab: usize,
    dim: usize,
    padding_idx: Option<usize>,
    ids: Buf,
    d_out: Buf,
    d_table: Buf,
) -> PyResult<()> {
    let shape = EmbedShape::new(batch, seq, vocab, dim);
    let opts = BackwardOptions {
        deterministic: true,
        padding_idx,
    };
    by_dtype!(dtype, T => by_id_type!(id_dtype, I => {
        if device < 0 {
            py.detach(|| {
                res(cpu::neftune::embedding_backward::<T, I>(
                    &shape, host::<I>(ids), host::<T>(d_out), host_mut::<f32>(d_table), &opts,
                ))
            })
        } else {
            let gpu = gpu_for(device as usize, stream)?;
            let (ids, d_out) = (dev::<I>(&gpu, ids), dev::<T>(&gpu, d_out));
            let mut d_table = dev::<f32>(&gpu, d_table);
            res(cuda::neftune::embedding_backward::<T, I, _, _, _>(
                &gpu, &shape, &*ids, &*d_out, &mut *d_table, &opts,
            ))
        }
    }))
}

/// Reports (and clears) the out-of-range ids or lengths the NEFTune kernels met on this
/// device and stream since the last call, as an error. Synchronizes the stream.
#[pyfunction]
fn take_index_errors(device: usize, stream: u64) -> PyResult<()> {
    let gpu = gpu_for(device, stream)?;
    res(gpu.take_index_errors())
}

// ---------------------------------------------------------------------------------------
// NF4 on the host (bitsandbytes' bytes)
// ---------------------------------------------------------------------------------------

/// The parts of an NF4 weight as Python gets them: (packed codes, absmax bytes, nested
/// absmax bytes or None, nested code table bytes or None, offset). f32 parts are
/// little-endian bytes (`torch.frombuffer` reads them).
type Nf4Parts = (Vec<u8>, Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>, f32);

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// Quantizes a host weight [rows, cols] to NF4 exactly as bitsandbytes'
/// `quantize_4bit(quant_type="nf4")` does (NaN/Inf refused).
#[pyfunction]
#[pyo3(signature = (dtype, rows, cols, blocksize, double_quant, w))]
fn nf4_quantize(
    py: Python<'_>,
    dtype: &str,
    rows: usize,
    cols: usize,
    blocksize: usize,
    double_quant: bool,
    w: Buf,
) -> PyResult<Nf4Parts> {
    by_dtype!(dtype, T => {
        py.detach(|| {
            let q = res(Nf4Weight::quantize::<T>(host::<T>(w), rows, cols, blocksize, double_quant))?;
            Ok(match q.absmax {
                Absmax::F32(a) => (q.packed, f32_bytes(&a), None, None, 0.0),
                Absmax::Double(d) => (
                    q.packed,
                    d.q,
                    Some(f32_bytes(&d.absmax2)),
                    Some(f32_bytes(&d.code)),
                    d.offset,
                ),
            })
        })
    })
}

/// Dequantizes a host NF4 weight (bitsandbytes' layout) into `out` [rows·cols] of
/// `dtype`, as `dequantize_4bit` does.
#[pyfunction]
#[pyo3(signature = (dtype, rows, cols, blocksize, packed, absmax, absmax2, code2, offset, out))]
#[allow(clippy::too_many_arguments)]
fn nf4_dequantize(
    py: Python<'_>,
    dtype: &str,
    rows: usize,
    cols: usize,
    blocksize: usize,
    packed: Buf,
    absmax: Buf,
    absmax2: Option<Buf>,
    code2: Option<Buf>,
    offset: f32,
    out: Buf,
) -> PyResult<()> {
    let nf = nf4_args(
        rows, cols, blocksize, packed, absmax, absmax2, code2, offset,
    )?;
    by_dtype!(dtype, T => {
        py.detach(|| {
            let w = nf4_host(&nf, T::DTYPE)?;
            let d = res(w.dequantize::<T>())?;
            let o = host_mut::<T>(out);
            if o.len() != d.len() {
                return Err(PyValueError::new_err(format!(
                    "nf4_dequantize: out has {} elements, the weight {}", o.len(), d.len()
                )));
            }
            o.copy_from_slice(&d);
            Ok(())
        })
    })
}

// ---------------------------------------------------------------------------------------
// Module
// ---------------------------------------------------------------------------------------

/// (bytes in use, high-water mark) of the device's default memory pool, where the ops'
/// scratch buffers live; `reset` first sets the mark to the current use.
#[pyfunction]
fn pool_usage(device: usize, stream: u64, reset: bool) -> PyResult<(u64, u64)> {
    let gpu = gpu_for(device, stream)?;
    res(gpu.pool_usage(reset))
}

/// Whether the CUDA kernels were compiled into this build, and for which archs.
#[pyfunction]
fn build_info() -> (bool, String, String) {
    (
        cuda::kernels_built(),
        cuda::built_archs().to_string(),
        cuda::nvcc_version().to_string(),
    )
}

#[pymodule]
fn _lib(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(lora_forward, m)?)?;
    m.add_function(wrap_pyfunction!(lora_backward, m)?)?;
    m.add_function(wrap_pyfunction!(lora_merge, m)?)?;
    m.add_function(wrap_pyfunction!(dora_merge, m)?)?;
    m.add_function(wrap_pyfunction!(qlora_forward, m)?)?;
    m.add_function(wrap_pyfunction!(qlora_backward, m)?)?;
    m.add_function(wrap_pyfunction!(dora_forward, m)?)?;
    m.add_function(wrap_pyfunction!(dora_backward, m)?)?;
    m.add_function(wrap_pyfunction!(neftune_embed, m)?)?;
    m.add_function(wrap_pyfunction!(neftune_embedding_backward, m)?)?;
    m.add_function(wrap_pyfunction!(take_index_errors, m)?)?;
    m.add_function(wrap_pyfunction!(nf4_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(nf4_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(pool_usage, m)?)?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    Ok(())
}
