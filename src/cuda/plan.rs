//! The path an op took: every LoRA, DoRA, QLoRA and QDoRA forward and backward returns
//! the [`Plan`] it chose for that call, so a test can assert which path ran and a user
//! can log it.
//!
//! The choice is made once per call, from the device, the shapes, the dtype, the
//! buffers' alignment and the call's options ([`crate::LoraOptions`], including its
//! [`crate::Tuning`]); nothing global takes part. The rules, in order:
//!
//! 1. **Small T** (T ≤ 32, [`crate::cuda::lora::SMALL_T_MAX`]) and the tuning's core
//!    policy not [`CorePolicy::Require`]: one fused pass over W ([`Path::SmallFused`]):
//!    dense LoRA, DoRA (f16/bf16, K % 8 == 0, r % 8 == 0, r ≤ 32, 16-byte aligned
//!    operands, no dropout), QLoRA (K % 32 == 0, x 16-byte aligned).
//! 2. **The GEMM core** ([`Path::Core`]) where it runs and pays: f16/bf16, sm_90 (wgmma)
//!    or, for the NT forward only, sm_80 .. sm_89 (mma.sync); rank ≤ 64, K % 8 == 0,
//!    x and W 16-byte aligned, y 4-byte aligned; enough output tiles for half the SMs
//!    (T ≥ 129 and ceil(T/128)·ceil(N/128) ≥ SMs/2); the backward also needs N % 8 == 0
//!    and no active dropout. [`CorePolicy::Never`] skips it; [`CorePolicy::Require`]
//!    turns every failed condition into an error before any launch. Inside, the down
//!    product (`x Aᵀ`, or the backward's `G = s·dY B`) runs in the same launch
//!    ([`Plan::fused_down`]) when r ≤ 32, dropout is off and the jobs fit the idle
//!    clusters ([`crate::cuda::gemm::fused_down_fits`], or [`FusedDown`]).
//! 3. **NF4 bases at large T**: the dense core over dequantized panels
//!    ([`Path::CorePanels`]: row panels of ≤
//!    [`PANEL_ELEMS`](crate::cuda::qlora::PANEL_ELEMS) elements in the forward,
//!    column panels of ≥ 1024 columns in the backward) where the core's rule holds and
//!    y (dX) is 16-byte aligned with N % 8 == 0; with [`Tuning::nf4_core`] the NF4 core
//!    kernels instead ([`Plan::nf4_in_core`]); else cuBLAS over row panels
//!    ([`Path::CublasPanels`]).
//! 4. Otherwise **cuBLAS** and the crate's skinny kernels ([`Path::Cublas`]).
//!
//! [`CorePolicy::Require`]: crate::tuning::CorePolicy::Require
//! [`CorePolicy::Never`]: crate::tuning::CorePolicy::Never
//! [`FusedDown`]: crate::tuning::FusedDown
//! [`Tuning::nf4_core`]: crate::Tuning::nf4_core

/// Which family of kernels computed an op's large products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// One fused kernel that reads W (dense or NF4) once: small T.
    SmallFused,
    /// The GEMM core: one launch writes y (or dX) once, the low-rank term in its
    /// mainloop.
    Core,
    /// The GEMM core over dequantized NF4 panels of W, one launch per panel.
    CorePanels,
    /// cuBLAS and the crate's skinny and element-wise kernels.
    Cublas,
    /// cuBLAS over dequantized NF4 row panels of W.
    CublasPanels,
}

/// The path one op call took (see the [module docs](self) for the rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Plan {
    /// The kernels of the large products.
    pub path: Path,
    /// The core launch computed the down product (or the backward's G) itself.
    pub fused_down: bool,
    /// The core ran its mma.sync kernels (sm_80 .. sm_89, or [`crate::Tuning::mma_path`]).
    pub mma: bool,
    /// The NF4 W was dequantized inside the core launch (no dense panel).
    pub nf4_in_core: bool,
}

impl Plan {
    /// A plan of `path` with no core details.
    pub(crate) const fn of(path: Path) -> Plan {
        Plan {
            path,
            fused_down: false,
            mma: false,
            nf4_in_core: false,
        }
    }
}

/// The error of an op whose tuning says [`crate::tuning::CorePolicy::Require`] where the
/// core's rule fails for the call (`op` names the op): the dtype, GPU, shape and dropout
/// it was given, so the caller can see which condition of the rules above it missed.
pub(crate) fn core_required_error<T: crate::Element>(
    op: &'static str,
    gpu: &super::Gpu,
    shape: &crate::LoraShape,
    opts: &crate::LoraOptions,
) -> crate::Error {
    let (t, k, n, r) = shape.dims();
    crate::Error::Unsupported {
        op,
        reason: format!(
            "the tuning requires the GEMM core, whose rule this call fails ({:?} on {}, \
             T = {t}, K = {k}, N = {n}, r = {r}, dropout {}; see cuda::plan)",
            T::DTYPE,
            gpu.name(),
            if opts.active_dropout().is_some() {
                "on"
            } else {
                "off"
            }
        ),
    }
}
