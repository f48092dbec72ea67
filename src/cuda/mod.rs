//! The CUDA side: a [`Gpu`] context that owns the driver context, one stream, a cuBLAS
//! handle and the kernels loaded once for the device, plus the launchers of each family.
//!
//! All `unsafe` of the crate lives in this module's launch code, each block with a
//! `// SAFETY:` note.

pub mod adamw;
mod base;
pub mod dora;
pub mod gemm;
pub mod lora;
pub mod neftune;
pub mod nf4;
pub mod plan;
pub mod qdora;
pub mod qlora;

pub use plan::{Path, Plan};

#[allow(clippy::all)]
#[rustfmt::skip]
mod bindings;
mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
#[allow(dead_code)]
pub(crate) mod kernel;

pub(crate) use bindings::*;
pub(crate) use kernel::{Kernel, Module};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{sys as cublas_sys, CudaBlas};
use cudarc::driver::{
    sys::CUdevice_attribute, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream,
    DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use cudarc::nvrtc::Ptx;

use crate::{DType, Element, Error, Result};

/// Whether this build holds GPU code (false when nvcc was missing at build time).
pub fn kernels_built() -> bool {
    kernels::KERNELS_BUILT
}

/// The compute capabilities the kernels were built for (SASS), e.g. `"80,86,89,90"`.
pub fn built_archs() -> &'static str {
    kernels::ARCHS
}

/// The nvcc that built the kernels, as `nvcc --version` printed it.
pub fn nvcc_version() -> &'static str {
    kernels::NVCC_VERSION
}

// SAFETY: the parameter structs are plain C structs (bindgen, #[repr(C)]) of integers,
// floats and device addresses, passed to kernels by value exactly as declared in
// kernels/lk_params.h.
unsafe impl DeviceRepr for LkSmallFwdParams {}
unsafe impl DeviceRepr for LkDownParams {}
unsafe impl DeviceRepr for LkTnParams {}
unsafe impl DeviceRepr for LkReduceParams {}
unsafe impl DeviceRepr for LkMergeParams {}
unsafe impl DeviceRepr for LkBiasFillParams {}
unsafe impl DeviceRepr for LkMaskParams {}
unsafe impl DeviceRepr for LkNeftParams {}
unsafe impl DeviceRepr for LkNeftScatterParams {}
unsafe impl DeviceRepr for LkNeftKeysParams {}
unsafe impl DeviceRepr for LkNeftSortParams {}
unsafe impl DeviceRepr for LkNeftSegsumParams {}
unsafe impl DeviceRepr for LkNf4DequantParams {}
unsafe impl DeviceRepr for LkNf4MmParams {}
unsafe impl DeviceRepr for LkNf4QuantParams {}
unsafe impl DeviceRepr for LkNf4DoubleQuantParams {}
unsafe impl DeviceRepr for LkDoraNormParams {}
unsafe impl DeviceRepr for LkDoraScaleParams {}
unsafe impl DeviceRepr for LkDoraRowScaleParams {}
unsafe impl DeviceRepr for LkDoraDyzParams {}
unsafe impl DeviceRepr for LkDoraDmParams {}
unsafe impl DeviceRepr for LkDoraDropParams {}
unsafe impl DeviceRepr for LkGemmParams {}
unsafe impl DeviceRepr for LkGemmPadParams {}
unsafe impl DeviceRepr for LkTransposeParams {}
unsafe impl DeviceRepr for LkGemmMmaParams {}
unsafe impl DeviceRepr for LkNf4CoreScalesParams {}

/// Words of [`Gpu`]'s index-error status buffer (layout in kernels/lk_params.h).
const STATUS_WORDS: usize = 8;

/// What a [`Gpu`] shares with every other `Gpu` of the same device made from it
/// ([`Gpu::with_stream`]): the context, the kernels loaded once, and the launch
/// configurations found once per kernel (cooperative grid sizes, cluster counts).
struct Device {
    ctx: Arc<CudaContext>,
    modules: Vec<(Module, Arc<CudaModule>)>,
    functions: Mutex<HashMap<Kernel, CudaFunction>>,
    coop_grid: Mutex<HashMap<Kernel, u32>>,
    /// Per GEMM-core kernel: its co-resident 2-CTA clusters (set up once).
    cluster_grid: Mutex<HashMap<Kernel, usize>>,
    name: String,
    compute_capability: (i32, i32),
    sm_count: u32,
}

/// One GPU as seen from one stream: the device's shared state (context, kernels), the
/// stream every op of this `Gpu` is queued on, a cuBLAS handle bound to that stream and
/// the small scratch buffers the kernels of one stream use between launches.
///
/// - [`Gpu::new`] opens a device with a stream of its own;
/// - [`Gpu::from_stream`] wraps a stream the caller already has (a framework's: candle's
///   `CudaDevice::cuda_stream()`, PyTorch's current stream wrapped by cudarc), so every op
///   is queued there, in that stream's order and inside that stream's CUDA-graph
///   captures;
/// - [`Gpu::with_stream`] gives another stream of the same device, sharing the loaded
///   kernels.
///
/// Ops are asynchronous on [`Gpu::stream`] and never synchronize the host, except the
/// functions whose docs say so ([`Gpu::download`], [`Gpu::synchronize`],
/// [`Gpu::take_index_errors`], the NF4 quantize with double quantization and
/// [`nf4::Nf4Device::download`]). Every path of the LoRA, DoRA, QLoRA and QDoRA ops can be
/// captured in a CUDA graph on that stream (capture mode global or thread-local; with
/// cudarc's event tracking off or every buffer used on this one stream, as for any
/// capture through cudarc) and replayed.
///
/// A `Gpu` can be shared between threads; ops from several threads are queued on its
/// one stream in call order. Ops on different `Gpu`s of one device run concurrently
/// without sharing scratch.
pub struct Gpu {
    dev: Arc<Device>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// Counters of the cooperative small-T kernels: zero between launches.
    pub(crate) sync: CudaSlice<u32>,
    /// Out-of-range index reports of the NEFTune kernels (see [`Gpu::take_index_errors`]).
    pub(crate) status: CudaSlice<u32>,
    /// The GEMM core's fused down product: one flag word per 128-row tile row (up to
    /// [`CORE_FLAG_WORDS`], T ≤ 524 288), holding the epoch of the launch that last wrote
    /// that row's U.
    pub(crate) core_flags: CudaSlice<u32>,
    /// The last epoch handed out by [`Gpu::next_core_epoch`] (0: none yet).
    core_epoch: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("name", &self.dev.name)
            .field("compute_capability", &self.dev.compute_capability)
            .field("sm_count", &self.dev.sm_count)
            .finish()
    }
}

/// Words of [`Gpu::core_flags`]: tile rows of 128 tokens the fused down product serves.
pub(crate) const CORE_FLAG_WORDS: usize = 4096;

impl Gpu {
    /// Opens GPU `ordinal` with a new stream of its own: checks that the kernels were
    /// built, that the driver and cuBLAS load, that the device exists and is sm_80 or
    /// newer, and loads the kernels.
    pub fn new(ordinal: usize) -> Result<Self> {
        check_runtime()?;
        let count = CudaContext::device_count()? as usize;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.new_stream()?;
        Self::from_stream(stream)
    }

    /// A `Gpu` whose ops run on `stream`, a stream the caller made (of any cudarc
    /// context: its device is the one used). Loads the kernels into the stream's
    /// context; checks as [`Gpu::new`]. Nothing is synchronized; the few small scratch
    /// buffers it allocates are zeroed on `stream`.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        check_runtime()?;
        let ctx = stream.context().clone();
        let name = ctx.name()?;
        let (major, minor) = ctx.compute_capability()?;
        if major < 8 {
            return Err(Error::UnsupportedGpu { name, major, minor });
        }
        let sm_count =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let modules = Module::ALL
            .iter()
            .map(|&m| Ok((m, load_module(&ctx, m.name())?)))
            .collect::<Result<Vec<_>>>()?;
        let dev = Arc::new(Device {
            ctx,
            modules,
            functions: Mutex::new(HashMap::new()),
            coop_grid: Mutex::new(HashMap::new()),
            cluster_grid: Mutex::new(HashMap::new()),
            name,
            compute_capability: (major, minor),
            sm_count,
        });
        Self::on(dev, stream)
    }

    /// A `Gpu` of the same device whose ops run on `stream` (a stream of this `Gpu`'s
    /// context), sharing the loaded kernels; its own cuBLAS handle and scratch buffers,
    /// so both can be used at once from different threads.
    pub fn with_stream(&self, stream: Arc<CudaStream>) -> Result<Self> {
        if stream.context().cu_ctx() != self.dev.ctx.cu_ctx() {
            return Err(Error::Unsupported {
                op: "Gpu::with_stream",
                reason: "the stream belongs to another CUDA context (use Gpu::from_stream)".into(),
            });
        }
        Self::on(self.dev.clone(), stream)
    }

    fn on(dev: Arc<Device>, stream: Arc<CudaStream>) -> Result<Self> {
        let blas = CudaBlas::new(stream.clone())?;
        let sync = stream.alloc_zeros::<u32>(2)?;
        let status = stream.alloc_zeros::<u32>(STATUS_WORDS)?;
        let core_flags = stream.alloc_zeros::<u32>(CORE_FLAG_WORDS)?;
        Ok(Gpu {
            dev,
            stream,
            blas,
            sync,
            status,
            core_flags,
            core_epoch: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.dev.name
    }

    /// The device's compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.dev.compute_capability
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.dev.sm_count
    }

    /// The cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.dev.ctx
    }

    /// The stream every op of this `Gpu` runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The cuBLAS handle bound to [`Gpu::stream`].
    pub fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    /// Copies a host slice to a new device buffer.
    pub fn upload<T: Element>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(data)?)
    }

    /// Copies a device buffer back to the host (synchronizes the stream).
    pub fn download<T: Element, S: DevicePtr<T>>(&self, data: &S) -> Result<Vec<T>> {
        Ok(self.stream.clone_dtoh(data)?)
    }

    /// A zero-filled device buffer of `len` elements.
    pub fn zeros<T: Element>(&self, len: usize) -> Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros::<T>(len)?)
    }

    /// Waits for everything queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Bytes in use in the device's default memory pool (which every buffer of this
    /// crate comes from), and the most in use since the last reset; `reset` sets the
    /// high-water mark to the current use first. Benches measure an op's peak extra
    /// memory with it: reset, run, synchronize, read `high − current_before`.
    pub fn pool_usage(&self, reset: bool) -> Result<(u64, u64)> {
        use cudarc::driver::sys::{self as dsys, CUmemPool_attribute as A};
        self.dev.ctx.bind_to_thread()?;
        let mut pool: dsys::CUmemoryPool = std::ptr::null_mut();
        let mut current = 0u64;
        let mut high = 0u64;
        // SAFETY: plain driver queries on this context's device with valid out-pointers
        // (the attributes are u64 values, as the driver API documents).
        unsafe {
            dsys::cuDeviceGetDefaultMemPool(&mut pool, self.dev.ctx.cu_device()).result()?;
            dsys::cuMemPoolGetAttribute(
                pool,
                A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
                (&mut current) as *mut u64 as *mut _,
            )
            .result()?;
            if reset {
                let mut zero = 0u64;
                dsys::cuMemPoolSetAttribute(
                    pool,
                    A::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut zero) as *mut u64 as *mut _,
                )
                .result()?;
            }
            dsys::cuMemPoolGetAttribute(
                pool,
                A::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut high) as *mut u64 as *mut _,
            )
            .result()?;
        }
        Ok((current, high))
    }

    /// A nonzero tag for one GEMM-core launch with the fused down product, different from
    /// the previous 2^32 − 2 tags: the launch's flags in [`Gpu::core_flags`] count as set
    /// only when equal to it, so stale words of earlier launches never do.
    pub(crate) fn next_core_epoch(&self) -> u32 {
        use std::sync::atomic::Ordering;
        loop {
            let e = self
                .core_epoch
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if e != 0 {
                return e;
            }
        }
    }

    /// The per-kernel cluster counts of the GEMM core, shared by the device's `Gpu`s.
    pub(crate) fn cluster_grid(&self) -> &Mutex<HashMap<Kernel, usize>> {
        &self.dev.cluster_grid
    }

    /// Zeroes the first `words` flags of [`Gpu::core_flags`] on the stream when the
    /// stream is being captured into a CUDA graph: a replay repeats the captured epochs,
    /// so without this a replay's tiles would take the flags that the previous replay
    /// left as already set. Eager launches need no reset (each has a new epoch).
    pub(crate) fn reset_core_flags_if_capturing(&self, words: usize) -> Result<()> {
        use cudarc::driver::sys::CUstreamCaptureStatus as S;
        if self.stream.capture_status()? == S::CU_STREAM_CAPTURE_STATUS_NONE {
            return Ok(());
        }
        let words = words.min(self.core_flags.len());
        let (ptr, _guard) = self.core_flags.device_ptr(&self.stream);
        // SAFETY: zeroes the first `words` (≤ its length) u32 words of the flag buffer
        // this Gpu owns, on its own stream, ordered before the launch that reads them.
        unsafe {
            cudarc::driver::result::memset_d8_async(ptr, 0, words * 4, self.stream.cu_stream())
        }?;
        Ok(())
    }

    /// An uninitialized device buffer for kernel outputs or scratch.
    pub(crate) fn scratch<T: cudarc::driver::DeviceRepr>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        // SAFETY: the buffer is only handed to kernels that write every element before
        // any element is read (each caller says which kernel does).
        Ok(unsafe { self.stream.alloc::<T>(len.max(1)) }?)
    }

    /// The loaded function of `kernel` (looked up in its module once, then cached).
    pub(crate) fn function(&self, kernel: Kernel) -> Result<CudaFunction> {
        let mut map = self.dev.functions.lock().unwrap();
        if let Some(f) = map.get(&kernel) {
            return Ok(f.clone());
        }
        let module = kernel.module();
        let (_, m) = self.dev.modules.iter().find(|(n, _)| *n == module).unwrap();
        let f = m
            .load_function(kernel.name())
            .map_err(|e| Error::ModuleLoad {
                module: module.name().into(),
                archs: kernels::ARCHS.into(),
                detail: format!("kernel {}: {e}", kernel.name()),
            })?;
        map.insert(kernel, f.clone());
        Ok(f)
    }

    /// Reports (and clears) the out-of-range values that kernels found in index tensors
    /// since the last call: token ids outside the vocabulary, or sequence lengths outside
    /// `0..=seq`. Kernels never read memory through such a value (see
    /// [`crate::cuda::neftune`]); they record the first one they meet and a count, and
    /// this returns them as [`Error::Index`]. Synchronizes the stream.
    pub fn take_index_errors(&self) -> Result<()> {
        let s = self.stream.clone_dtoh(&self.status)?;
        if s.iter().all(|&w| w == 0) {
            return Ok(());
        }
        let (ptr, _guard) = self.status.device_ptr(&self.stream);
        // SAFETY: zeroes exactly the status buffer this Gpu owns, on its own stream.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                ptr,
                0,
                STATUS_WORDS * 4,
                self.stream.cu_stream(),
            )
        }?;
        let value = |lo: u32, hi: u32| ((hi as u64) << 32 | lo as u64) as i64;
        if s[0] != 0 {
            return Err(Error::Index {
                name: "ids",
                position: s[1] as usize,
                value: value(s[2], s[3]),
                count: s[0] as usize,
            });
        }
        Err(Error::Index {
            name: "lengths",
            position: s[5] as usize,
            value: value(s[6], s[7]),
            count: s[4] as usize,
        })
    }

    /// The largest grid of `block` threads with `smem` bytes of dynamic shared memory
    /// each that a cooperative launch keeps resident. Raises the kernel's dynamic
    /// shared-memory limit first when `smem` is above the default 48 KiB.
    pub(crate) fn cooperative_grid(
        &self,
        kernel: Kernel,
        func: &CudaFunction,
        block: u32,
        smem: u32,
    ) -> Result<u32> {
        let mut map = self.dev.coop_grid.lock().unwrap();
        if let Some(&g) = map.get(&kernel) {
            return Ok(g);
        }
        if smem > 48 * 1024 {
            func.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )?;
        }
        let per_sm =
            func.occupancy_max_active_blocks_per_multiprocessor(block, smem as usize, None)?;
        if per_sm == 0 {
            return Err(Error::Driver(format!(
                "kernel {} cannot be resident on this GPU",
                kernel.name()
            )));
        }
        let g = per_sm * self.dev.sm_count;
        map.insert(kernel, g);
        Ok(g)
    }

    /// Launches `kernel` with one parameter struct.
    pub(crate) fn launch<P: DeviceRepr>(
        &self,
        kernel: Kernel,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        let func = self.function(kernel)?;
        let mut b = self.stream.launch_builder(&func);
        b.arg(params);
        // SAFETY: every launcher validates shapes, lengths and alignment of all buffers
        // named in `params` before calling this, and keeps their borrows alive until the
        // launch has been queued; the kernel reads and writes only inside those shapes.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Launches `func` cooperatively (all blocks co-resident), grid given by the caller
    /// (at most [`Gpu::cooperative_grid`]).
    pub(crate) fn launch_cooperative<P: DeviceRepr>(
        &self,
        func: &CudaFunction,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        let mut b = self.stream.launch_builder(func);
        b.arg(params);
        // SAFETY: as in `launch`; the grid is at most the co-resident maximum, which the
        // driver checks again for cooperative launches.
        unsafe { b.launch_cooperative(cfg) }?;
        Ok(())
    }
}

/// A 1-D launch of `total` threads in blocks of `block`, at most `cap` blocks.
pub(crate) fn grid_1d(total: usize, block: u32, cap: u32) -> LaunchConfig {
    let blocks = total.div_ceil(block as usize).clamp(1, cap as usize) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The checks every constructor makes before any CUDA call: kernels built, the driver
/// and cuBLAS present.
fn check_runtime() -> Result<()> {
    if !kernels::KERNELS_BUILT {
        return Err(Error::KernelsNotBuilt);
    }
    // With `candle-cuda`, candle links the CUDA libraries at build time (cudarc's
    // `dynamic-linking`): a binary that started has them, and cudarc has no probe.
    #[cfg(not(feature = "candle-cuda"))]
    {
        // SAFETY: only tries to dlopen libcuda; no CUDA call is made.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoDriver);
        }
        // SAFETY: as above, for libcublas.
        if !unsafe { cublas_sys::is_culib_present() } {
            return Err(Error::NoCublas);
        }
    }
    Ok(())
}

fn load_module(ctx: &Arc<CudaContext>, name: &str) -> Result<Arc<CudaModule>> {
    let image = kernels::MODULES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| *bytes)
        .ok_or(Error::KernelsNotBuilt)?;
    ctx.load_module(Ptx::from_binary(image.to_vec()))
        .map_err(|e| Error::ModuleLoad {
            module: name.into(),
            archs: kernels::ARCHS.into(),
            detail: format!(
                "{e} (built with {}; a PTX newer than the driver cannot be JIT-compiled: \
                 rebuild with CUDA_COMPUTE_CAP set to this GPU's capability)",
                kernels::NVCC_VERSION
            ),
        })
}

/// A device buffer's address, checked to be aligned to its element type. The guard
/// keeps cudarc's cross-stream ordering of the buffer; hold it until the launch is queued.
pub(crate) fn dptr<'a, T, S: DevicePtr<T> + ?Sized>(
    gpu: &'a Gpu,
    name: &'static str,
    s: &'a S,
) -> Result<(u64, SyncOnDrop<'a>)> {
    let (ptr, guard) = s.device_ptr(&gpu.stream);
    check_align::<T>(name, ptr)?;
    Ok((ptr, guard))
}

/// As [`dptr`], for a buffer the op writes.
pub(crate) fn dptr_mut<'a, T, S: DevicePtrMut<T> + ?Sized>(
    gpu: &'a Gpu,
    name: &'static str,
    s: &'a mut S,
) -> Result<(u64, SyncOnDrop<'a>)> {
    let (ptr, guard) = s.device_ptr_mut(&gpu.stream);
    check_align::<T>(name, ptr)?;
    Ok((ptr, guard))
}

fn check_align<T>(name: &'static str, ptr: u64) -> Result<()> {
    let align = std::mem::size_of::<T>();
    if !ptr.is_multiple_of(align as u64) {
        return Err(Error::Misaligned {
            name,
            address: ptr,
            align,
        });
    }
    Ok(())
}

/// cuBLAS's data type for `T`.
pub(crate) fn cublas_dtype(d: DType) -> cublas_sys::cudaDataType {
    match d {
        DType::F32 => cublas_sys::cudaDataType::CUDA_R_32F,
        DType::F16 => cublas_sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => cublas_sys::cudaDataType::CUDA_R_16BF,
    }
}

/// A row-major GEMM through cuBLAS, f32 accumulation (no TF32 for f32):
/// `C[m, n] = alpha · op(A) op(B) + beta · C`, where `op(A)` is [m, k] (stored [m, k],
/// or [k, m] when `a_t`) and `op(B)` is [k, n] (stored [k, n], or [n, k] when `b_t`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rm<T: Element>(
    gpu: &Gpu,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: u64,
    a_t: bool,
    b: u64,
    b_t: bool,
    beta: f32,
    c: u64,
) -> Result<()> {
    let lda = if a_t { m } else { k };
    let ldb = if b_t { k } else { n };
    gemm_rm_ld::<T>(
        gpu,
        m,
        n,
        k,
        alpha,
        (a, lda),
        a_t,
        (b, ldb),
        b_t,
        beta,
        (c, n),
    )
}

/// [`gemm_rm`] on strided views: each matrix is (address, row stride in elements), so
/// C can be a column panel of a wider matrix.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rm_ld<T: Element>(
    gpu: &Gpu,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    (a, lda): (u64, usize),
    a_t: bool,
    (b, ldb): (u64, usize),
    b_t: bool,
    beta: f32,
    (c, ldc): (u64, usize),
) -> Result<()> {
    use cublas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let dt = cublas_dtype(T::DTYPE);
    gpu.dev.ctx.bind_to_thread()?;
    // Column-major view: Cᵀ [n, m] = op(B)ᵀ op(A)ᵀ.
    let op_first = if b_t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    let op_second = if a_t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    // SAFETY: callers pass addresses of buffers validated to hold op(A), op(B) and C of
    // these shapes and strides; alpha and beta are f32 as CUBLAS_COMPUTE_32F requires.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *gpu.blas.handle(),
            op_first,
            op_second,
            n as i32,
            m as i32,
            k as i32,
            (&alpha) as *const f32 as *const _,
            b as *const _,
            dt,
            ldb as i32,
            a as *const _,
            dt,
            lda as i32,
            (&beta) as *const f32 as *const _,
            c as *mut _,
            dt,
            ldc as i32,
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )?;
    }
    Ok(())
}

/// A row-major matrix product through cuBLAS on the GPU's stream, f32 accumulation
/// (full f32 precision for f32, no TF32): `c[m, n] = alpha · op(a) op(b) + beta · c`,
/// where `op(a)` is [m, k] (stored [m, k], or [k, m] when `a_t`) and `op(b)` is [k, n]
/// (stored [k, n], or [n, k] when `b_t`). The crate's baselines use it; so can callers.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
    gpu: &Gpu,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &I,
    a_t: bool,
    b: &I,
    b_t: bool,
    beta: f32,
    c: &mut O,
) -> Result<()> {
    for (name, v) in [("m", m), ("n", n), ("k", k)] {
        if v == 0 || v > i32::MAX as usize {
            return Err(Error::Dim {
                name,
                value: v,
                reason: "must be in 1..2^31",
            });
        }
    }
    crate::lora::check_len("a", a.len(), m * k)?;
    crate::lora::check_len("b", b.len(), k * n)?;
    crate::lora::check_len("c", c.len(), m * n)?;
    let (ap, _ga) = dptr(gpu, "a", a)?;
    let (bp, _gb) = dptr(gpu, "b", b)?;
    let (cp, _gc) = dptr_mut(gpu, "c", c)?;
    gemm_rm::<T>(gpu, m, n, k, alpha, ap, a_t, bp, b_t, beta, cp)
}

/// The `LkDropout` of optional dropout (threshold 0 = off).
pub(crate) fn lk_dropout(d: Option<crate::Dropout>) -> LkDropout {
    match d {
        Some(d) => LkDropout {
            seed: d.seed,
            offset: d.offset,
            threshold: d.threshold(),
            keep_scale: d.keep_scale(),
        },
        None => LkDropout::default(),
    }
}
