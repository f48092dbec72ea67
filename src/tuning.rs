//! [`Tuning`]: the per-call overrides of the CUDA path planner.
//!
//! Every CUDA op picks its path once per call from the device, the shapes, the dtypes,
//! the buffers' alignment and its options (see [`crate::cuda::plan`] for the rules).
//! A `Tuning` travels inside the call's options ([`crate::LoraOptions::tuning`],
//! [`crate::cuda::gemm::GemmEpilogue::tuning`]) and can narrow or force that choice for
//! that call alone: no process-global or thread-local state decides a path, so two
//! threads (or two streams) may run the same op with different tunings at once.
//!
//! The default, [`Tuning::AUTO`], lets the planner choose; it is what a framework wants.
//! The other settings exist for benches (time the cuBLAS path beside the core on the
//! same GPU), tests (reach a path or a schedule on small shapes) and users who measured
//! their own workload. The CPU oracle ignores the tuning.

use crate::{Error, Result};

/// Whether a large-T op may take (or must take) the GEMM-core path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CorePolicy {
    /// The planner's rule decides (the default).
    #[default]
    Auto,
    /// Never the GEMM core: the cuBLAS (or small-T) path, as on GPUs without the core.
    Never,
    /// The GEMM core or an error that names why it cannot run (before any launch),
    /// whatever T is: the rule that the output tiles fill the GPU is waived, and small T
    /// does not take the fused small-T kernel. The core's other conditions (dtype, GPU,
    /// rank, alignment, no dropout where the core cannot take it) still hold.
    Require,
}

/// Whether the GEMM core computes the down product (`x Aᵀ`, or the backward's
/// `G = s·dY B`) inside its own launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FusedDown {
    /// Where the planner's occupancy rule says the jobs hide under the tiles (default).
    #[default]
    Auto,
    /// Never: a separate launch computes it first.
    Never,
    /// Wherever the kernel can run it, however many jobs a cluster then takes (tests
    /// reach those schedules on small shapes with it).
    Force,
}

/// Per-call overrides of the CUDA path planner; see the [module docs](self).
///
/// ```
/// use lora_kernels::{tuning::CorePolicy, LoraOptions, Tuning};
/// // Time the cuBLAS path of a large-T forward on a GPU where the core would run:
/// let opts = LoraOptions::new(2.0).with_tuning(Tuning { core: CorePolicy::Never, ..Tuning::AUTO });
/// assert_eq!(opts.tuning.core, CorePolicy::Never);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Tuning {
    /// The GEMM-core path of the large-T LoRA, DoRA and QLoRA forwards and backwards.
    pub core: CorePolicy,
    /// The down product inside the core launch.
    pub fused_down: FusedDown,
    /// Run the GEMM core's sm_80 .. sm_89 kernels (mma.sync) on an sm_90 GPU too, so a
    /// Hopper machine can test that path. Off by default.
    pub mma_path: bool,
    /// The core's tile width, [`crate::cuda::gemm::TILE_N`] (256) or
    /// [`crate::cuda::gemm::TILE_N_NARROW`] (128); `None`: chosen per call
    /// ([`crate::cuda::gemm::tile_n_for`]).
    pub tile_n: Option<usize>,
    /// QLoRA / QDoRA at large T: the base products on the GEMM core's NF4 kernels (W's
    /// tiles dequantized in shared memory, no dense panel) instead of dequantized panels.
    /// Off by default (the panels measured faster; see docs/PERF_NOTES_NF4.md).
    pub nf4_core: bool,
    /// The most elements of one dequantized NF4 panel; `None`:
    /// [`crate::cuda::qlora::PANEL_ELEMS`]. Smaller values make small shapes take
    /// several panels (tests).
    pub panel_elems: Option<usize>,
    /// The most elements of one DoRA backward chunk buffer; `None`:
    /// [`crate::cuda::dora::BACKWARD_CHUNK_ELEMS`]. Smaller values make small shapes
    /// take several chunks (tests).
    pub chunk_elems: Option<usize>,
}

impl Tuning {
    /// Everything automatic: the planner's own choices.
    pub const AUTO: Tuning = Tuning {
        core: CorePolicy::Auto,
        fused_down: FusedDown::Auto,
        mma_path: false,
        tile_n: None,
        nf4_core: false,
        panel_elems: None,
        chunk_elems: None,
    };

    /// Checks the values: a tile width of 128 or 256, panel and chunk bounds ≥ 1.
    pub fn validate(&self) -> Result<()> {
        if let Some(w) = self.tile_n {
            if w != 128 && w != 256 {
                return Err(Error::Dim {
                    name: "tuning.tile_n",
                    value: w,
                    reason: "the GEMM core has tiles of 256 or 128 columns",
                });
            }
        }
        for (name, v) in [
            ("tuning.panel_elems", self.panel_elems),
            ("tuning.chunk_elems", self.chunk_elems),
        ] {
            if v == Some(0) {
                return Err(Error::Dim {
                    name,
                    value: 0,
                    reason: "must be at least 1 (None: the default bound)",
                });
            }
        }
        Ok(())
    }
}
