//! The crate's one error type.

use std::fmt;

/// Everything that can go wrong in this crate. Every public op validates its arguments
/// and returns one of these before anything reaches a kernel.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// The crate was built without nvcc, so it holds no GPU code.
    KernelsNotBuilt,
    /// The CUDA driver library (libcuda) could not be loaded.
    NoDriver,
    /// cuBLAS (libcublas) could not be loaded; the large-T paths need it.
    NoCublas,
    /// No CUDA device with this ordinal.
    NoDevice { ordinal: usize, count: usize },
    /// The GPU's compute capability is below what the kernels need (8.0).
    UnsupportedGpu {
        name: String,
        major: i32,
        minor: i32,
    },
    /// The embedded kernels could not be loaded on this GPU (no matching SASS and a
    /// PTX newer than the driver, for instance).
    ModuleLoad {
        module: String,
        archs: String,
        detail: String,
    },
    /// A buffer's length does not match the shape.
    Length {
        name: &'static str,
        expected: usize,
        actual: usize,
    },
    /// A dimension is out of range.
    Dim {
        name: &'static str,
        value: usize,
        reason: &'static str,
    },
    /// A scalar argument is out of range.
    Value {
        name: &'static str,
        value: f64,
        reason: &'static str,
    },
    /// A device buffer's address is not aligned to its element type.
    Misaligned {
        name: &'static str,
        address: u64,
        align: usize,
    },
    /// An index tensor held a value out of range (a token id outside the vocabulary, a
    /// length outside `0..=seq`): the first one found, at `position`, and how many.
    Index {
        name: &'static str,
        position: usize,
        value: i64,
        count: usize,
    },
    /// A file could not be read or written; the message names the path.
    Io(String),
    /// A checkpoint (safetensors, quant state) is malformed or uses an unsupported
    /// format; the message names the tensor or field.
    Checkpoint(String),
    /// The op cannot run on this GPU or with these element types (e.g. the sm_90-only
    /// GEMM core on another GPU, or f32 operands); `reason` says which and why.
    Unsupported { op: &'static str, reason: String },
    /// An error from the CUDA driver.
    Driver(String),
    /// An error from cuBLAS.
    Cublas(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::KernelsNotBuilt => write!(
                f,
                "lora-kernels was built without CUDA kernels because nvcc was not found; \
                 install the pinned toolchain with `bash scripts/install-toolchain.sh` (or set \
                 NVCC=/path/to/nvcc) and rebuild"
            ),
            Error::NoDriver => write!(
                f,
                "the CUDA driver library (libcuda.so) could not be loaded: no NVIDIA driver \
                 is installed on this machine"
            ),
            Error::NoCublas => write!(f, "cuBLAS (libcublas.so) could not be loaded"),
            Error::NoDevice { ordinal, count } => {
                write!(f, "no CUDA device {ordinal}: this machine has {count}")
            }
            Error::UnsupportedGpu { name, major, minor } => write!(
                f,
                "{name} has compute capability {major}.{minor}; lora-kernels needs 8.0 or newer"
            ),
            Error::ModuleLoad {
                module,
                archs,
                detail,
            } => write!(
                f,
                "could not load the `{module}` kernels (built for sm_{archs} + PTX): {detail}"
            ),
            Error::Length {
                name,
                expected,
                actual,
            } => write!(
                f,
                "`{name}` has {actual} elements but the shape needs {expected}"
            ),
            Error::Dim {
                name,
                value,
                reason,
            } => write!(f, "`{name}` = {value}: {reason}"),
            Error::Value {
                name,
                value,
                reason,
            } => write!(f, "`{name}` = {value}: {reason}"),
            Error::Misaligned {
                name,
                address,
                align,
            } => write!(
                f,
                "`{name}` at {address:#x} is not aligned to {align} bytes"
            ),
            Error::Index {
                name,
                position,
                value,
                count,
            } => write!(
                f,
                "`{name}` holds {count} out-of-range value(s); the first found is {value} at \
                 position {position}"
            ),
            Error::Unsupported { op, reason } => write!(f, "`{op}` is not supported: {reason}"),
            Error::Checkpoint(e) => write!(f, "checkpoint: {e}"),
            Error::Io(e) => write!(f, "I/O error: {e}"),
            Error::Driver(e) => write!(f, "CUDA driver error: {e}"),
            Error::Cublas(e) => write!(f, "cuBLAS error: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Driver(e.to_string())
    }
}

impl From<cudarc::cublas::result::CublasError> for Error {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        Error::Cublas(format!("{e:?}"))
    }
}

/// This crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
