//! The Hopper (sm_90a) tensor-core GEMM core, v2 (kernels/gemm.cu): one kernel for
//!
//! ```text
//! y[T, N] = col_scale ⊙ (x[T, K] · W[N, K]ᵀ + U[T, r] · Bl[N, r]ᵀ) + bias
//! ```
//!
//! with x, W, U, Bl, bias and y in f16 or bf16 (all the same type), col_scale in f32,
//! f32 accumulation, every matrix row-major (PyTorch's layout: `y = x Wᵀ`). The
//! low-rank term is one extra K-slice of the mainloop (r ≤ 64, padded to 64 by TMA's
//! zero fill), so `y = x Wᵀ + U Blᵀ` is written once; with `U = s · h` that is the LoRA
//! forward. `col_scale` is applied to the accumulator before the bias (DoRA's
//! `m / ‖·‖`): `y = scale ⊙ acc + bias`.
//!
//! Kernel: warp-specialized, one producer warp issuing TMA loads (128-byte swizzle) into
//! a shared-memory ring, two consumer warpgroups issuing `wgmma`; a persistent grid of
//! clusters of 2 CTAs (at most one CTA per SM, as many clusters as fit at once) walks
//! pairs of 128 × [`TILE_N`] tiles of y in a grouped order for L2 reuse, each CTA of a
//! pair loading half of the shared W tile and multicasting it into both; the producer
//! loads the next tile while the consumers store the last, through TMA stores when
//! N % 8 == 0 and y is 16-byte aligned (direct stores otherwise). The tile width is
//! chosen per call ([`tile_n_for`]): 256 columns (4-stage ring), or 128 (6-stage ring)
//! when that fills the GPU's SMs in fewer tile rounds, as at T = 512. See
//! kernels/gemm.cu and docs/PERF_NOTES_GEMM.md.
//!
//! For the LoRA forward (`cuda::lora`), the same launch can also compute the down
//! product `U = s · x Aᵀ` (r ≤ 32, see [`fused_down_fits`]): before their tiles, the
//! clusters with the fewest tiles run one job per pair of tile rows (TMA-staged x and A
//! tiles, m64n16 or m64n32 wgmmas), write U and h and set the tile row's flag; each
//! tile's producer waits for its row's flag before it loads U for the low-rank slice.
//!
//! [`matmul_nt_nf4`] is the same kernel with W in NF4 (bitsandbytes' format): its
//! producer warpgroup dequantizes each W tile into shared memory (TMA brings the packed
//! codes and a per-32-weight scale table into a raw ring; each CTA of a cluster
//! dequantizes half the tile and bulk-copies it into the other), so no dense W exists in
//! device memory. See docs/PERF_NOTES_NF4.md for its speed (about 2× cuBLAS's dense time
//! at T = 4096 on an H100 today).
//!
//! [`matmul_nn`] is the same kernel with W stored [K, N] (the B operand MN-major: wgmma's
//! transposed-B descriptor over 64 × 64 TMA boxes), for the LoRA backward's
//! `dX = dY W + G A`; its launch can compute `G = s · dY B` with the same jobs (A = Bᵀ).
//!
//! On sm_80 .. sm_89 (no wgmma, no TMA) [`matmul_nt`] runs the `lk_gemm_mma_nt_*`
//! kernels instead, chosen at run time: 128 × 128 tiles of mma.sync m16n8k16 fed by
//! ldmatrix from a 3-stage cp.async ring, the low-rank term as extra K-steps and the same
//! epilogue; dense W [N, K] only (NF4, [`matmul_nn`] and the fused down product are
//! sm_90 only). Their speed on an A100 is not measured (on an H100 they take 2.5–3.5×
//! cuBLAS's time, without wgmma).
//!
//! Limits: sm_90 ([`supported`]) or sm_80 .. sm_89 as above; other GPUs get
//! [`Error::Unsupported`]. f16/bf16 only, K % 8 == 0 and x, W (and U, Bl when r % 8 ==
//! 0) 16-byte aligned (TMA's rules, kept on every arch), y 4-byte aligned. Any T, N ≥ 1.
//! When r % 8 != 0, U and Bl are first copied into column-padded scratch buffers (rows of
//! a multiple of 8 elements) by a small kernel.

use cudarc::driver::sys as dsys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

use super::kernel::*;
use super::nf4::Nf4Device;
use super::{
    dptr, dptr_mut, Gpu, LkGemmMmaParams, LkGemmPadParams, LkGemmParams, LkNf4,
    LkNf4CoreScalesParams, LkTransposeParams,
};
use crate::lora::check_len;
use crate::tuning::{FusedDown, Tuning};
use crate::{DType, Element, Error, Result};

/// Rows of y per CTA tile.
pub const TILE_M: usize = 128;
/// Columns of y (rows of W) per CTA tile, the wide variant (ring of 4 stages).
pub const TILE_N: usize = 256;
/// Columns of y per CTA tile, the narrow variant (ring of 6 stages).
pub const TILE_N_NARROW: usize = 128;
/// K per pipeline stage (one 128-byte swizzle row of 16-bit elements).
pub const TILE_K: usize = 64;
/// The largest rank of the low-rank K-slice.
pub const MAX_RANK: usize = TILE_K;
/// [`matmul_nt_nf4`] needs K to be a multiple of this (whole 32-element pieces per
/// absmax block).
pub const NF4_K_MULTIPLE: usize = 32;

const THREADS: u32 = 384;
/// Ring bytes (4 × (16 + 32) KB or 6 × (16 + 16) KB), the epilogue's staging buffers
/// (8 warps × 2 × 2 KB) and 1 KB so the kernel can align the ring to 1024 bytes.
const DYN_SMEM: u32 = (192 * 1024 + 32 * 1024 + 1024) as u32;
/// The NF4 kernels: the same ring, one staging buffer per warp (16 KB) and 3 raw slots
/// of a W half-tile's codes and scales (128 × 32 B + 128 × 8 B each at the wide tile).
const DYN_SMEM_NF4: u32 = (192 * 1024 + 16 * 1024 + 3 * 5 * 1024 + 1024) as u32;

/// The tile width the core uses for a [T, N] output on a GPU of `sms` SMs: the width
/// with the smaller estimated time, counting whole rounds of tiles over the persistent
/// grid (`ceil(tiles / sms)`, each CTA runs that many tiles back to back) times the
/// tile's work, the narrow tile charged 10% more per column (its wgmmas read more
/// shared memory per flop). 4096 × 4096: 4 rounds of 256 wide against 8 of 128, wide;
/// 512 × 4096: 1 round either way, narrow (half the work per CTA). A call's
/// [`Tuning::tile_n`] overrides it.
pub fn tile_n_for(tokens: usize, n: usize, sms: usize) -> usize {
    let sms = sms.max(1);
    let rounds = |w: usize| (tokens.div_ceil(TILE_M) * n.div_ceil(w)).div_ceil(sms);
    let wide = rounds(TILE_N) * 10 * TILE_N;
    let narrow = rounds(TILE_N_NARROW) * 11 * TILE_N_NARROW;
    if narrow < wide {
        TILE_N_NARROW
    } else {
        TILE_N
    }
}

/// The tile width of one call: its tuning's, else [`tile_n_for`].
pub(crate) fn tile_n(tuning: &Tuning, tokens: usize, n: usize, sms: usize) -> usize {
    tuning.tile_n.unwrap_or_else(|| tile_n_for(tokens, n, sms))
}

/// The low-rank K-slice `U Blᵀ`: `u` [T, rank], `b` [N, rank] (LoRA's B), same type as x.
#[derive(Debug)]
pub struct LowRank<'a, I: ?Sized> {
    pub u: &'a I,
    pub b: &'a I,
    pub rank: usize,
}

impl<I: ?Sized> Clone for LowRank<'_, I> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I: ?Sized> Copy for LowRank<'_, I> {}

/// What [`matmul_nt`] adds to `x Wᵀ`: an optional low-rank K-slice, an optional f32
/// per-column scale of the accumulator and an optional bias (after the scale).
///
/// ```ignore
/// let epi = GemmEpilogue::new().with_bias(&bias).with_low_rank(&u, &b, 16);
/// let epi = GemmEpilogue::new().with_col_scale(&scale); // S = the scale's buffer type
/// ```
#[derive(Debug)]
pub struct GemmEpilogue<'a, I: ?Sized, S: ?Sized = CudaSlice<f32>> {
    /// \[N\], x's type: added unscaled.
    pub bias: Option<&'a I>,
    /// \[N\], f32: `y = col_scale ⊙ acc + bias`.
    pub col_scale: Option<&'a S>,
    /// `acc += U Blᵀ` in the same accumulator.
    pub low_rank: Option<LowRank<'a, I>>,
    /// Overrides of the call's path choices (tile width, the mma.sync kernels on
    /// sm_90); [`Tuning::AUTO`] by default.
    pub tuning: Tuning,
}

impl<I: ?Sized> GemmEpilogue<'_, I> {
    /// No low-rank term, no scale, no bias: `y = x Wᵀ`.
    pub fn new() -> Self {
        GemmEpilogue {
            bias: None,
            col_scale: None,
            low_rank: None,
            tuning: Tuning::AUTO,
        }
    }
}

impl<I: ?Sized> Default for GemmEpilogue<'_, I> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a, I: ?Sized, S: ?Sized> GemmEpilogue<'a, I, S> {
    /// Adds `bias` \[N\] after the scale.
    pub fn with_bias(mut self, bias: &'a I) -> Self {
        self.bias = Some(bias);
        self
    }

    /// Scales column n of the accumulator by `scale[n]` (f32, \[N\]) before the bias.
    pub fn with_col_scale<S2: ?Sized>(self, scale: &'a S2) -> GemmEpilogue<'a, I, S2> {
        GemmEpilogue {
            bias: self.bias,
            col_scale: Some(scale),
            low_rank: self.low_rank,
            tuning: self.tuning,
        }
    }

    /// The call's path tuning (see [`Tuning`]).
    pub fn with_tuning(mut self, tuning: Tuning) -> Self {
        self.tuning = tuning;
        self
    }

    /// Adds `u [T, rank] · b [N, rank]ᵀ` to the accumulator (1 ≤ rank ≤ [`MAX_RANK`]).
    pub fn with_low_rank(mut self, u: &'a I, b: &'a I, rank: usize) -> Self {
        self.low_rank = Some(LowRank { u, b, rank });
        self
    }
}

/// Whether the Hopper (wgmma) kernels run on this GPU: compute capability 9.0 and a build
/// that holds sm_90a code (their other targets are stubs). [`matmul_nn`],
/// [`matmul_nt_nf4`] and the fused down product need it; [`matmul_nt`] also runs on
/// sm_80 .. sm_89 (the mma.sync kernels).
pub fn supported(gpu: &Gpu) -> bool {
    gpu.compute_capability() == (9, 0) && super::built_archs().split(',').any(|a| a == "90")
}

/// `y = col_scale ⊙ (x Wᵀ + U Blᵀ) + bias` on the GPU's stream (see the module docs):
/// x [T, K], w [N, K], y [T, N], f16 or bf16; sm_90 (wgmma) or sm_80 .. sm_89 (mma.sync).
///
/// Errors, before anything is launched: [`Error::Dim`] for a zero or too large T, N or
/// K, K % 8 != 0 or a rank outside 1..=64; [`Error::Length`] for a buffer that does not
/// match the shape; [`Error::Misaligned`] for x or w (or u, b when rank % 8 == 0) not
/// 16-byte aligned, y not 4-byte aligned; [`Error::Unsupported`] for f32 or a GPU older
/// than sm_80 or newer than sm_90 (checked last, so argument errors show on any GPU).
#[allow(clippy::too_many_arguments)]
pub fn matmul_nt<T, I, S, O>(
    gpu: &Gpu,
    x: &I,
    w: &I,
    y: &mut O,
    epi: &GemmEpilogue<'_, I, S>,
    tokens: usize,
    n: usize,
    k: usize,
) -> Result<()>
where
    T: Element,
    I: DevicePtr<T> + ?Sized,
    S: DevicePtr<f32> + ?Sized,
    O: DevicePtrMut<T> + ?Sized,
{
    matmul_impl(gpu, x, BaseRef::Dense(w), y, epi, tokens, n, k)
}

/// [`matmul_nt`] with W in NF4 (bitsandbytes' format, [N = `w.rows`, K = `w.cols`]):
/// `y = col_scale ⊙ (x deq(W)ᵀ + U Blᵀ) + bias`. The producer warpgroup dequantizes each
/// W tile into shared memory (each CTA of a cluster half of it, copied into the other), so
/// no dense W ever exists in device memory; the values are the standalone dequantize's
/// (`code · absmax` in f32, rounded once to T).
///
/// Errors as [`matmul_nt`]'s, plus [`Error::Dim`] for K % 32 != 0 and
/// [`Error::Misaligned`] for packed codes not 16-byte aligned (and the NF4 weight's own
/// errors from its descriptor: blocksize, lengths); [`Error::Unsupported`] off sm_90.
pub fn matmul_nt_nf4<T, I, S, O>(
    gpu: &Gpu,
    tokens: usize,
    x: &I,
    w: &Nf4Device,
    y: &mut O,
    epi: &GemmEpilogue<'_, I, S>,
) -> Result<()>
where
    T: Element,
    I: DevicePtr<T> + ?Sized,
    S: DevicePtr<f32> + ?Sized,
    O: DevicePtrMut<T> + ?Sized,
{
    matmul_nf4(gpu, tokens, x, BaseRef::Nf4(w), y, epi)
}

/// `y = col_scale ⊙ (x W + U Bl) + bias` on the GPU's stream: [`matmul_nt`] with W
/// stored [K, N] (row-major, N contiguous) and the low-rank term's Bl stored [r, N]; for
/// a LoRA layer's `dX = dY W + s·(dY B) A` pass x = dY [T, N_out], w = W [N_out, K_in]
/// (K = N_out, N = K_in), U = s·dY B and Bl = A. The same kernel with the B operand read
/// MN-major (`wgmma` with a transposed B descriptor; TMA boxes of 64 × 64).
///
/// Errors as [`matmul_nt`]'s, plus [`Error::Dim`] for N % 8 != 0 (W's rows are TMA's
/// 16-byte multiples) and [`Error::Misaligned`] for Bl not 16-byte aligned (it is never
/// copied); [`Error::Unsupported`] off sm_90.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nn<T, I, S, O>(
    gpu: &Gpu,
    x: &I,
    w: &I,
    y: &mut O,
    epi: &GemmEpilogue<'_, I, S>,
    tokens: usize,
    n: usize,
    k: usize,
) -> Result<()>
where
    T: Element,
    I: DevicePtr<T> + ?Sized,
    S: DevicePtr<f32> + ?Sized,
    O: DevicePtrMut<T> + ?Sized,
{
    if !n.is_multiple_of(8) {
        return Err(Error::Dim {
            name: "n",
            value: n,
            reason: "matmul_nn needs N % 8 == 0 (W [K, N] rows are TMA's 16-byte multiples)",
        });
    }
    matmul_impl(gpu, x, BaseRef::DenseKn(w), y, epi, tokens, n, k)
}

/// [`matmul_nn`] with W in NF4 ([N_w = `w.rows`, K_w = `w.cols`], bitsandbytes' format):
/// `y [T, K_w] = col_scale ⊙ (x [T, N_w] · deq(W) + U Bl) + bias` with Bl [r, K_w], the
/// QLoRA backward's `dX = dY deq(W) + G A`. The producer warpgroup dequantizes each
/// [64 rows × tile] piece of W into the MN-major B layout in shared memory (each CTA of a
/// cluster half of it, copied into the other), so no dense W ever exists in device
/// memory; the values are the standalone dequantize's.
///
/// Errors as [`matmul_nn`]'s (its N is K_w, its K is N_w), plus [`Error::Dim`] for
/// K_w % 32 != 0 and [`Error::Misaligned`] for packed codes not 16-byte aligned (and the
/// NF4 weight's own errors from its descriptor); [`Error::Unsupported`] off sm_90.
pub fn matmul_nn_nf4<T, I, S, O>(
    gpu: &Gpu,
    tokens: usize,
    x: &I,
    w: &Nf4Device,
    y: &mut O,
    epi: &GemmEpilogue<'_, I, S>,
) -> Result<()>
where
    T: Element,
    I: DevicePtr<T> + ?Sized,
    S: DevicePtr<f32> + ?Sized,
    O: DevicePtrMut<T> + ?Sized,
{
    matmul_nf4(gpu, tokens, x, BaseRef::Nf4Kn(w), y, epi)
}

/// [`matmul_nt_nf4`] and [`matmul_nn_nf4`]: W's row length checked (whole 32-element
/// pieces), then [`matmul_impl`] with the GEMM's N and K of the layout.
fn matmul_nf4<T, I, S, O>(
    gpu: &Gpu,
    tokens: usize,
    x: &I,
    base: BaseRef<'_, I>,
    y: &mut O,
    epi: &GemmEpilogue<'_, I, S>,
) -> Result<()>
where
    T: Element,
    I: DevicePtr<T> + ?Sized,
    S: DevicePtr<f32> + ?Sized,
    O: DevicePtrMut<T> + ?Sized,
{
    let (w, kn) = match base {
        BaseRef::Nf4(w) => (w, false),
        BaseRef::Nf4Kn(w) => (w, true),
        _ => unreachable!("matmul_nf4 takes an NF4 base"),
    };
    if w.cols % NF4_K_MULTIPLE != 0 {
        return Err(Error::Dim {
            name: if kn { "cols (K_w)" } else { "cols (K)" },
            value: w.cols,
            reason: "the NF4 GEMM core needs W's row length % 32 == 0",
        });
    }
    let (n, k) = if kn {
        (w.cols, w.rows)
    } else {
        (w.rows, w.cols)
    };
    matmul_impl(gpu, x, base, y, epi, tokens, n, k)
}

/// The base weight of one core call.
enum BaseRef<'a, I: ?Sized> {
    /// W [N, K] ([`matmul_nt`]).
    Dense(&'a I),
    /// W [K, N] ([`matmul_nn`]).
    DenseKn(&'a I),
    /// W [N, K] in NF4 ([`matmul_nt_nf4`]).
    Nf4(&'a Nf4Device),
    /// W [K, N] in NF4 ([`matmul_nn_nf4`]: the layer's W [N_w, K_w] read as B [K, N]).
    Nf4Kn(&'a Nf4Device),
}

/// [`matmul_nt`], [`matmul_nn`] and their NF4 forms: the argument checks, then
/// [`launch_core`].
#[allow(clippy::too_many_arguments)]
fn matmul_impl<T, I, S, O>(
    gpu: &Gpu,
    x: &I,
    base: BaseRef<'_, I>,
    y: &mut O,
    epi: &GemmEpilogue<'_, I, S>,
    tokens: usize,
    n: usize,
    k: usize,
) -> Result<()>
where
    T: Element,
    I: DevicePtr<T> + ?Sized,
    S: DevicePtr<f32> + ?Sized,
    O: DevicePtrMut<T> + ?Sized,
{
    for (name, v) in [("tokens", tokens), ("n", n), ("k", k)] {
        if v == 0 || v > i32::MAX as usize {
            return Err(Error::Dim {
                name,
                value: v,
                reason: "must be in 1..2^31",
            });
        }
    }
    if !k.is_multiple_of(8) {
        return Err(Error::Dim {
            name: "k",
            value: k,
            reason: "the GEMM core needs K % 8 == 0 (TMA's 16-byte row stride)",
        });
    }
    let (tiles_m, tiles_n) = (tokens.div_ceil(TILE_M), n.div_ceil(TILE_N_NARROW));
    if tiles_m * tiles_n > i32::MAX as usize {
        return Err(Error::Dim {
            name: "tokens * n",
            value: tokens * n,
            reason: "too many output tiles for one grid",
        });
    }
    epi.tuning.validate()?;
    check_len("x", x.len(), tokens * k)?;
    if let BaseRef::Dense(w) | BaseRef::DenseKn(w) = base {
        check_len("w", w.len(), n * k)?;
    }
    check_len("y", y.len(), tokens * n)?;
    if let Some(b) = epi.bias {
        check_len("bias", b.len(), n)?;
    }
    if let Some(s) = epi.col_scale {
        check_len("col_scale", s.len(), n)?;
    }
    if let Some(lr) = &epi.low_rank {
        if lr.rank == 0 || lr.rank > MAX_RANK {
            return Err(Error::Dim {
                name: "rank",
                value: lr.rank,
                reason: "the GEMM core's low-rank K-slice takes 1..=64",
            });
        }
        check_len("u", lr.u.len(), tokens * lr.rank)?;
        check_len("b", lr.b.len(), n * lr.rank)?;
    }

    let (xp, _gx) = dptr(gpu, "x", x)?;
    let w_kn = matches!(base, BaseRef::DenseKn(_) | BaseRef::Nf4Kn(_));
    let (wp, nf4, _gw, _gq) = match base {
        BaseRef::Dense(w) | BaseRef::DenseKn(w) => {
            let (wp, g) = dptr(gpu, "w", w)?;
            (wp, None, Some(g), Vec::new())
        }
        BaseRef::Nf4(q) | BaseRef::Nf4Kn(q) => {
            let (desc, guards) = q.desc(gpu)?;
            (0, Some(desc), None, guards)
        }
    };
    let (yp, _gy) = dptr_mut(gpu, "y", y)?;
    let bias = match epi.bias {
        Some(b) => Some(dptr(gpu, "bias", b)?),
        None => None,
    };
    let scale = match epi.col_scale {
        Some(s) => Some(dptr(gpu, "col_scale", s)?),
        None => None,
    };
    let low_rank = match &epi.low_rank {
        Some(lr) => Some((dptr(gpu, "u", lr.u)?, dptr(gpu, "b", lr.b)?, lr.rank)),
        None => None,
    };
    let ptrs = CorePtrs {
        x: xp,
        w: wp,
        y: yp,
        bias: bias.as_ref().map_or(0, |b| b.0),
        col_scale: scale.as_ref().map_or(0, |s| s.0),
        z: 0,
        low_rank: low_rank.as_ref().map(|(u, b, r)| (u.0, b.0, *r)),
        nf4,
        ldy: 0,
        ldu: 0,
        down: None,
        w_kn,
        ldbl: 0,
        tuning: epi.tuning,
    };
    launch_core::<T>(gpu, &ptrs, tokens, n, k)
}

/// Device addresses of one [`matmul_nt`] call (0 = absent), lengths already checked.
#[derive(Clone, Copy)]
pub(crate) struct CorePtrs {
    pub x: u64,
    pub w: u64,
    pub y: u64,
    pub bias: u64,
    pub col_scale: u64,
    /// [T, N] in the operand type: the unscaled accumulator (DoRA's z), or 0.
    pub z: u64,
    /// (U, Bl, rank), rank in 1..=64.
    pub low_rank: Option<(u64, u64, usize)>,
    /// W as NF4 (validated by [`Nf4Device::desc`]; [N, K] with K % 32 == 0, or with
    /// `w_kn` [K, N] with N % 32 == 0): the `lk_gemm_nf4_*` (`lk_gemm_nf4nn_*`) kernels
    /// dequantize it into shared memory and `w` is unused.
    pub nf4: Option<LkNf4>,
    /// y's row stride in elements, or 0 for N (a contiguous y). Another stride (y being
    /// columns of a wider matrix) needs the TMA-store epilogue: stride % 8 == 0, y
    /// 16-byte aligned and no z.
    pub ldy: usize,
    /// U's row stride in elements, or 0 for r (then U is copied into a padded scratch
    /// when r % 8 != 0). Another stride must be a multiple of 8 and ≥ r, U 16-byte
    /// aligned; the fused down product's U ([`CoreDown`]) has one.
    pub ldu: usize,
    /// The fused down product (dense W only, rank ≤ [`FUSED_DOWN_MAX_RANK`], and
    /// [`fused_down_fits`]): the kernel computes `h = x Aᵀ` itself and writes `U = s·h`
    /// into `low_rank`'s U, which is then an output.
    pub down: Option<CoreDown>,
    /// W stored [K, N] and Bl [r, N] (the `lk_gemm_nn_*` kernels, [`matmul_nn`]; in NF4
    /// the `lk_gemm_nf4nn_*` ones, [`matmul_nn_nf4`]): N % 8 == 0, Bl 16-byte aligned. A
    /// fused down product's A is still [r, K] (K-major; for the LoRA backward, Bᵀ).
    pub w_kn: bool,
    /// With `w_kn`: Bl's row stride in elements (a multiple of 8, ≥ N), or 0 for N (Bl
    /// being columns of a wider matrix, as A's columns for a column panel of W).
    pub ldbl: usize,
    /// The call's tuning: tile width, mma.sync kernels on sm_90.
    pub tuning: Tuning,
}

/// The fused down product of one core launch: jobs (one per pair of tile rows, run
/// before the tiles by the clusters with the fewest tiles) compute `h = x Aᵀ`, write
/// `U = scale · h` (row stride [`CorePtrs::ldu`]) into the low-rank term's U buffer and
/// `h` into `h` (if not 0), and flag each tile row; every tile waits for its row's flag
/// before it loads U.
#[derive(Clone, Copy)]
pub(crate) struct CoreDown {
    /// A [r, K], 16-byte aligned.
    pub a: u64,
    /// h [T, r] out, or 0.
    pub h: u64,
    pub scale: f32,
}

/// The largest rank the fused down product takes (its extra wgmma is m64n16 or m64n32;
/// m64n64 would cost the wide tile's wgmma pipeline its registers).
pub(crate) const FUSED_DOWN_MAX_RANK: usize = 32;

/// Whether a core launch of this shape can fuse the down product: sm_90, f16/bf16,
/// 1 ≤ r ≤ [`FUSED_DOWN_MAX_RANK`], T within the flag buffer (524 288 rows), and (unless
/// the tuning says [`FusedDown::Force`]; [`FusedDown::Never`]: false) cheap: the jobs (one per pair of tile rows) go to the clusters
/// with one tile fewer than the rest, or none, and each of those takes at most
/// [`FUSED_DOWN_MAX_JOBS`] of them (1 with 128-wide tiles), so they fill the time those
/// clusters would idle at the end. (Public, hidden, for tests that must know which path
/// a LoRA forward takes.)
#[doc(hidden)]
pub fn fused_down_fits<T: Element>(
    gpu: &Gpu,
    tuning: &Tuning,
    tokens: usize,
    n: usize,
    r: usize,
) -> Result<bool> {
    fused_down_fits_for::<T>(gpu, tuning, tokens, n, r, false)
}

/// [`fused_down_fits`] for the NT kernels (`w_kn` false) or the NN kernels (true: the
/// LoRA backward's dX launch, whose jobs compute `G = s · dY B`).
pub(crate) fn fused_down_fits_for<T: Element>(
    gpu: &Gpu,
    tuning: &Tuning,
    tokens: usize,
    n: usize,
    r: usize,
    w_kn: bool,
) -> Result<bool> {
    let pairs_m = tokens.div_ceil(TILE_M).div_ceil(2);
    if T::DTYPE == DType::F32
        || tuning.fused_down == FusedDown::Never
        || !supported(gpu)
        || mma_path(gpu, tuning)
        || !(1..=FUSED_DOWN_MAX_RANK).contains(&r)
        || 2 * pairs_m > gpu.core_flags.len()
    {
        return Ok(false);
    }
    if tuning.fused_down == FusedDown::Force {
        return Ok(true);
    }
    let tile_n = tile_n(tuning, tokens, n, gpu.sm_count() as usize);
    let kernel = core_kernel::<T>(false, w_kn, tile_n)?;
    let max_clusters = prepare(gpu, kernel, &gpu.function(kernel)?, DYN_SMEM)?;
    // As the kernel's jobs_of: the grid's clusters, and those with the fewest tiles.
    let pairs = pairs_m * n.div_ceil(tile_n);
    let clusters = (pairs + pairs_m).min(max_clusters);
    let light0 = if clusters > pairs {
        pairs
    } else if pairs.is_multiple_of(clusters) {
        0
    } else {
        pairs % clusters
    };
    let max_jobs = if tile_n == TILE_N {
        FUSED_DOWN_MAX_JOBS
    } else {
        1
    };
    Ok(pairs_m.div_ceil(clusters - light0) <= max_jobs)
}

/// The most down-product jobs [`fused_down_fits`] gives one cluster with 128 × 256 tiles
/// (a job reads the pair's 256 rows of x once, with little math; a light cluster has one
/// tile's time to spare): 2, and 1 with 128 × 128 tiles, which leave half the slack (a
/// rule of thumb, not measured separately). Measured on an H100: 16 jobs on the light
/// clusters at T = N = 4096 cost ~4 µs against the down kernel's ~25.
pub const FUSED_DOWN_MAX_JOBS: usize = 2;

/// The entry point for an operand type, W's format and layout and a tile width.
fn core_kernel<T: Element>(nf4: bool, w_kn: bool, tile_n: usize) -> Result<Kernel> {
    let wide = tile_n == TILE_N;
    let family = match (nf4, w_kn, wide) {
        (true, false, true) => LK_GEMM_NF4,
        (true, false, false) => LK_GEMM_NF4_N128,
        (true, true, true) => LK_GEMM_NF4NN,
        (true, true, false) => LK_GEMM_NF4NN_N128,
        (false, true, true) => LK_GEMM_NN,
        (false, true, false) => LK_GEMM_NN_N128,
        (false, false, true) => LK_GEMM_NT,
        (false, false, false) => LK_GEMM_NT_N128,
    };
    family.of::<T>()
}

/// [`matmul_nt`] after the length checks: alignment, dtype and GPU checks, then the
/// launch. Callers keep the buffers' guards alive until it returns.
pub(crate) fn launch_core<T: Element>(
    gpu: &Gpu,
    p: &CorePtrs,
    tokens: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    let tile_n = tile_n(&p.tuning, tokens, n, gpu.sm_count() as usize);
    let (tiles_m, tiles_n) = (tokens.div_ceil(TILE_M), n.div_ceil(tile_n));
    let (xp, wp, yp) = (p.x, p.w, p.y);
    check_align_to("x", xp, 16)?;
    match &p.nf4 {
        None => check_align_to("w", wp, 16)?,
        Some(q) => {
            check_align_to("packed", q.packed as u64, 16)?;
            // W's rows and row length: [N, K] (NT) or [K, N] (NN); the row length a
            // multiple of 32 (whole 32-element pieces, 16-byte rows of codes).
            let (rows, cols) = if p.w_kn { (k, n) } else { (n, k) };
            if cols % NF4_K_MULTIPLE != 0 || q.cols as usize != cols || q.rows as usize != rows {
                return Err(Error::Dim {
                    name: if p.w_kn { "n" } else { "k" },
                    value: cols,
                    reason: "the NF4 GEMM core needs W's shape and a row length % 32 == 0",
                });
            }
        }
    }
    check_align_to("y", yp, 4)?;
    if p.z != 0 {
        check_align_to("z", p.z, 4)?;
    }
    if let Some((up, bp, r)) = p.low_rank {
        if r % 8 == 0 {
            check_align_to("u", up, 16)?;
        }
        if r % 8 == 0 || p.w_kn {
            check_align_to("b", bp, 16)?;
        }
    }
    if p.w_kn && !n.is_multiple_of(8) {
        return Err(Error::Unsupported {
            op: "gemm core",
            reason: format!("W stored [K, N] needs N % 8 == 0 (N = {n})"),
        });
    }
    let low_rank = p.low_rank;

    if T::DTYPE == DType::F32 {
        return Err(Error::Unsupported {
            op: "gemm::matmul_nt",
            reason: "f32 operands (the GEMM core takes f16 and bf16)".into(),
        });
    }
    if mma_path(gpu, &p.tuning) {
        return launch_mma::<T>(gpu, p, tokens, n, k);
    }
    if !supported(gpu) {
        let (major, minor) = gpu.compute_capability();
        return Err(Error::Unsupported {
            op: "gemm::matmul_nt",
            reason: format!(
                "{} is sm_{major}{minor}; the GEMM core needs sm_80..sm_89 (the mma.sync \
                 kernels, dense W [N, K] only) or sm_90 (H100/H200) with a build holding \
                 sm_90a code (built: sm_{})",
                gpu.name(),
                super::built_archs()
            ),
        });
    }

    let dt = match T::DTYPE {
        DType::BF16 => dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    gpu.context().bind_to_thread()?;
    let x_map = tensor_map(dt, xp, k, tokens, k, TILE_M)?;
    // Each CTA of a cluster loads half of the W tile (multicast to both). The NF4
    // kernels read their half's packed codes through this map instead (bytes [N, K/2],
    // boxes of 32 bytes = 64 codes × tile_n/2 rows, no swizzle) and dequantize them.
    // W stored [K, N] (the NN kernels): boxes of 64 columns × 64 rows (K), each CTA
    // loading its tile_n/2 columns as tile_n/128 of them; in NF4 (bytes [K, N/2]) one box
    // of tile_n/4 bytes × 64 rows per K-slice.
    let w_map = match &p.nf4 {
        None if p.w_kn => tensor_map(dt, wp, n, k, n, TILE_K)?,
        None => tensor_map(dt, wp, k, n, k, tile_n / 2)?,
        Some(q) if p.w_kn => encode_map(
            dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            1,
            q.packed as u64,
            [n / 2, k],
            n / 2,
            [tile_n / 4, TILE_K],
            dsys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
        )?,
        Some(q) => encode_map(
            dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            1,
            q.packed as u64,
            [k / 2, n],
            k / 2,
            [TILE_K / 2, tile_n / 2],
            dsys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
        )?,
    };
    // The NF4 kernels' scale table, [steps][rows_pad][2] f32 over W's 64-column steps
    // and its rows (padded to 256), written in full by lk_nf4_core_scales before the
    // GEMM (stream order) and freed after it is queued. NT: W's rows are the tiles' N
    // (steps: the K-slices); NN: W's rows are the K-slices and its columns the tiles' N
    // (steps up to the last tile's end).
    let n_pad = if p.w_kn { k } else { n }.next_multiple_of(TILE_N);
    let scales = match &p.nf4 {
        None => None,
        Some(q) => {
            let steps = if p.w_kn {
                n.next_multiple_of(TILE_N) / TILE_K
            } else {
                k.div_ceil(TILE_K)
            };
            Some(core_scales(gpu, q, steps, n_pad)?)
        }
    };

    // The low-rank operands (see low_rank_operands).
    let mut _pads: Vec<CudaSlice<T>> = Vec::new();
    let (u_map, bl_map) = match low_rank_operands::<T>(gpu, p, tokens, n, &mut _pads)? {
        Some(lr) => {
            let bl_map = if p.w_kn {
                // Bl [r, N] (row stride ldb): boxes of 64 columns × 64 rows, rows ≥ r
                // zero-filled.
                tensor_map(dt, lr.b, n, lr.r, lr.ldb, TILE_K)?
            } else {
                tensor_map(dt, lr.b, lr.r, n, lr.ldb, tile_n / 2)?
            };
            (tensor_map(dt, lr.u, lr.r, tokens, lr.ldu, TILE_M)?, bl_map)
        }
        // Unused by the kernel without the low-rank slice.
        None => (x_map, w_map),
    };
    // The fused down product: A [r, K] in boxes of 64 columns × u_rn rows (rows ≥ r
    // zero-filled), u_rn = 16 or 32.
    let (a_map, u_rn) = match (&p.down, low_rank) {
        (Some(d), Some((_, _, r))) => {
            let ok = p.nf4.is_none() && (1..=FUSED_DOWN_MAX_RANK).contains(&r) && p.ldu != 0;
            if !ok {
                return Err(Error::Unsupported {
                    op: "gemm core",
                    reason: format!(
                        "the fused down product needs a dense W, rank 1..={FUSED_DOWN_MAX_RANK} \
                         (got {r}) and U with its own row stride (CorePtrs::ldu)"
                    ),
                });
            }
            check_align_to("a", d.a, 16)?;
            let u_rn = if r <= 16 { 16 } else { 32 };
            (tensor_map(dt, d.a, k, r, k, u_rn)?, u_rn)
        }
        (Some(_), None) => {
            return Err(Error::Unsupported {
                op: "gemm core",
                reason: "the fused down product needs the low-rank term".into(),
            })
        }
        (None, _) => (x_map, 0), // unused
    };

    // The TMA-store epilogue: rows of y (and z) must be 16-byte multiples and the bases
    // 16-byte aligned; else the kernel stores directly. Boxes of 64 columns × 16 rows.
    let ldy = if p.ldy == 0 { n } else { p.ldy };
    let tma_store =
        ldy % 8 == 0 && yp % 16 == 0 && (p.z == 0 || (p.z.is_multiple_of(16) && ldy == n));
    if ldy != n && !tma_store {
        return Err(Error::Unsupported {
            op: "gemm core",
            reason: format!(
                "y with row stride {ldy} ≠ N = {n} needs the TMA-store epilogue (stride % 8 \
                 == 0, y 16-byte aligned, no z)"
            ),
        });
    }
    let (y_map, z_map) = if tma_store {
        let y_map = tensor_map(dt, yp, n, tokens, ldy, 16)?;
        let z_map = if p.z != 0 {
            tensor_map(dt, p.z, n, tokens, n, 16)?
        } else {
            y_map
        };
        (y_map, z_map)
    } else {
        (x_map, x_map) // unused
    };
    let params = LkGemmParams {
        y: yp as *mut _,
        bias: p.bias as *const _,
        col_scale: p.col_scale as *const f32,
        t: tokens as i32,
        n: n as i32,
        k_tiles: k.div_ceil(TILE_K) as i32,
        low_rank: low_rank.is_some() as i32,
        tiles_m: tiles_m as i32,
        tiles_n: tiles_n as i32,
        z: p.z as *mut _,
        tma_store: tma_store as i32,
        wq: p.nf4.unwrap_or_else(no_nf4),
        nf4_scales: scales.as_ref().map_or(0, |sc| raw_addr(gpu, sc)) as *const f32,
        nf4_n_pad: n_pad as i32,
        u_out: match &p.down {
            Some(_) => low_rank.map_or(0, |(up, _, _)| up) as *mut _,
            None => std::ptr::null_mut(),
        },
        h_out: p.down.as_ref().map_or(0, |d| d.h) as *mut _,
        u_flags: raw_addr(gpu, &gpu.core_flags) as *mut u32,
        u_scale: p.down.as_ref().map_or(0.0, |d| d.scale),
        u_epoch: if p.down.is_some() {
            gpu.next_core_epoch()
        } else {
            0
        },
        u_ld: p.ldu as i32,
        u_rn: u_rn as i32,
        rank: low_rank.map_or(0, |(_, _, r)| r) as i32,
    };
    let kernel = core_kernel::<T>(p.nf4.is_some(), p.w_kn, tile_n)?;
    let func = gpu.function(kernel)?;
    let smem = if p.nf4.is_some() {
        DYN_SMEM_NF4
    } else {
        DYN_SMEM
    };
    let max_clusters = prepare(gpu, kernel, &func, smem)?;
    // Persistent clusters of 2 CTAs (compiled in), each pair of CTAs walking pairs of
    // tile rows; no more clusters than fit on the GPU at once (one CTA per SM).
    let pairs = tiles_m.div_ceil(2) * tiles_n;
    // The fused down product: one job per pair of tile rows, run by the clusters with
    // the fewest tiles before their tiles (with more clusters than tiles, the spare
    // clusters up to one per job run only jobs). A job never waits; a tile waits only
    // for its row's job, which runs on a co-resident cluster, so all of them finish.
    let pairs_m = tiles_m.div_ceil(2);
    if p.down.is_some() && 2 * pairs_m > gpu.core_flags.len() {
        return Err(Error::Unsupported {
            op: "gemm core",
            reason: format!(
                "the fused down product takes at most {} rows (T = {tokens})",
                gpu.core_flags.len() * TILE_M
            ),
        });
    }
    if p.down.is_some() {
        gpu.reset_core_flags_if_capturing(2 * pairs_m)?;
    }
    let work = pairs + if p.down.is_some() { pairs_m } else { 0 };
    let cfg = LaunchConfig {
        grid_dim: ((2 * work.min(max_clusters)) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem,
    };
    let mut b = gpu.stream().launch_builder(&func);
    b.arg(&x_map)
        .arg(&w_map)
        .arg(&u_map)
        .arg(&bl_map)
        .arg(&y_map)
        .arg(&z_map)
        .arg(&a_map)
        .arg(&params);
    // SAFETY: the tensor maps describe x [T, K], W [N, K] (or [K, N]), U [T, r] and Bl
    // [N, r] (or [r, N]) exactly as validated above (lengths, 16-byte alignment, K % 8 == 0; U and Bl possibly
    // padded copies that live until the launch is queued and are freed in stream order);
    // TMA never reads outside them (out-of-bounds boxes are zero-filled). For NF4 the W
    // map describes the packed codes as bytes [N, K/2] (NN: [K, N/2]; lengths checked by
    // the weight's descriptor, 16-byte aligned, row length % 32 == 0), and the kernel's
    // bulk copies of the scale table read [s][n_base .. n_base + tile_n/2][2] with
    // n_base + tile_n/2 ≤ n_pad and s < k_tiles (NN: [n_base/64 + j][64 it .. 64 it + 64]
    // with n_base/64 + j < tiles_n · tile_n / 64 ≤ steps and 64 · k_tiles ≤ n_pad):
    // inside the steps × n_pad × 2 scratch written just before, which lives until the
    // launch is queued. The kernel writes y (and z, when set: a [T, N]
    // buffer whose length the caller checked) only at rows < T and columns < N, reads
    // bias / col_scale only at columns < N, and needs `smem` bytes of dynamic shared
    // memory, set by prepare(). With the fused down product the A map describes A [r, K]
    // (16-byte aligned, K % 8 == 0), the kernel writes U only at rows < T and columns
    // < r of the [T, u_ld] buffer the U map reads (the caller's scratch of T · u_ld
    // elements) and h at [T, r] (the caller checked h's length), and its flags at tile
    // rows < 2 · ceil(T/128 / 2) ≤ core_flags.len() (checked above); the grid is no more
    // clusters than run at once, so every job (which never waits) runs, and every tile
    // (which waits only for its row's job) finishes. The guards keep every buffer's stream
    // order until the launch is queued.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Whether core launches take the mma.sync kernels here: an sm_80 .. sm_89 GPU (the
/// build always holds compute_80 PTX), or the call's [`Tuning::mma_path`].
pub(crate) fn mma_path(gpu: &Gpu, tuning: &Tuning) -> bool {
    tuning.mma_path || gpu.compute_capability().0 == 8
}

/// Whether a core launch runs on this GPU: the wgmma kernels on sm_90 ([`supported`]),
/// or the mma.sync kernels on sm_80 .. sm_89 for a dense W [N, K] (`w_nt_dense`; NF4, W
/// [K, N] and the fused down product are sm_90 only).
pub(crate) fn core_runs(gpu: &Gpu, tuning: &Tuning, w_nt_dense: bool) -> bool {
    if mma_path(gpu, tuning) {
        w_nt_dense
    } else {
        supported(gpu)
    }
}

/// [`launch_core`] on the mma.sync kernels (`lk_gemm_mma_nt_*`, any GPU from sm_80 on):
/// dense W [N, K] without the fused down product, U (if any) without its own row
/// stride, z only beside a contiguous y.
fn launch_mma<T: Element>(
    gpu: &Gpu,
    p: &CorePtrs,
    tokens: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    let ldy = if p.ldy == 0 { n } else { p.ldy };
    if p.nf4.is_some() || p.w_kn || p.down.is_some() || p.ldu != 0 || (ldy != n && p.z != 0) {
        let (major, minor) = gpu.compute_capability();
        return Err(Error::Unsupported {
            op: "gemm core",
            reason: format!(
                "the mma.sync core (this GPU: sm_{major}{minor}) takes a dense W [N, K] only: \
                 NF4, W [K, N], the fused down product, U with its own row stride and z \
                 beside a strided y need sm_90"
            ),
        });
    }
    gpu.context().bind_to_thread()?;
    let mut _pads: Vec<CudaSlice<T>> = Vec::new();
    let lr = low_rank_operands::<T>(gpu, p, tokens, n, &mut _pads)?;
    let params = LkGemmMmaParams {
        x: p.x as *const _,
        w: p.w as *const _,
        u: lr.as_ref().map_or(0, |l| l.u) as *const _,
        bl: lr.as_ref().map_or(0, |l| l.b) as *const _,
        y: p.y as *mut _,
        z: p.z as *mut _,
        bias: p.bias as *const _,
        col_scale: p.col_scale as *const f32,
        t: tokens as i32,
        n: n as i32,
        k: k as i32,
        rank: lr.as_ref().map_or(0, |l| l.r) as i32,
        ldu: lr.as_ref().map_or(0, |l| l.ldu) as i32,
        ldb: lr.as_ref().map_or(0, |l| l.ldb) as i32,
        ldy: ldy as i32,
    };
    let cfg = LaunchConfig {
        grid_dim: (
            n.div_ceil(MMA_TILE) as u32,
            tokens.div_ceil(MMA_TILE) as u32,
            1,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // The kernel reads x [T, K] and W [N, K] (16-byte aligned, K % 8 == 0, lengths
    // checked by the callers) and U / Bl (rows of ldu / ldb ≥ round_up(r, 8) elements,
    // padded copies with zero columns when r % 8 != 0, alive until the launch is queued)
    // only inside those bounds, and writes y ([T, ldy], ldy ≥ N: a caller's strided
    // view) and z (when set, [T, N]), 4-byte aligned, at rows < T and columns < N.
    gpu.launch(LK_GEMM_MMA_NT.of::<T>()?, cfg, &params)
}

/// The mma.sync kernels' square tile (rows of y and columns of y per CTA).
const MMA_TILE: usize = 128;

/// The low-rank operands of one launch as the kernels read them.
struct LowRankOps {
    /// U's address and row stride (elements, a multiple of 8).
    u: u64,
    ldu: usize,
    /// Bl's address and row stride ([N, r] rows of ldb ≥ r, or [r, N] rows of N).
    b: u64,
    ldb: usize,
    r: usize,
}

/// `p.low_rank` as given when its rows are 16-byte multiples, else copied into [rows,
/// rp] scratch (rp = r rounded up to 8, zeros in columns r .. rp) that `pads` keeps
/// alive until the launch is queued (freed in stream order after it). U with its own row
/// stride (`p.ldu`, the fused down product's output) is never padded; Bl [r, N] (NN)
/// needs none.
fn low_rank_operands<T: Element>(
    gpu: &Gpu,
    p: &CorePtrs,
    tokens: usize,
    n: usize,
    pads: &mut Vec<CudaSlice<T>>,
) -> Result<Option<LowRankOps>> {
    let Some((up, bp, r)) = p.low_rank else {
        return Ok(None);
    };
    let rp = r.next_multiple_of(8);
    let (u, ldu) = match p.ldu {
        0 if r == rp => (up, rp),
        0 => {
            let u_pad = pad_cols::<T>(gpu, up, tokens, r, rp)?;
            let addr = raw_addr(gpu, &u_pad); // still owned by pads
            pads.push(u_pad);
            (addr, rp)
        }
        ldu if ldu % 8 == 0 && ldu >= r && up % 16 == 0 => (up, ldu),
        ldu => {
            return Err(Error::Unsupported {
                op: "gemm core",
                reason: format!(
                    "U's row stride {ldu} (rank {r}) must be a multiple of 8 and ≥ the rank, \
                     U 16-byte aligned"
                ),
            })
        }
    };
    let (b, ldb) = if p.w_kn {
        match p.ldbl {
            0 => (bp, n),
            ld if ld % 8 == 0 && ld >= n => (bp, ld),
            ld => {
                return Err(Error::Unsupported {
                    op: "gemm core",
                    reason: format!("Bl's row stride {ld} must be a multiple of 8 and ≥ N = {n}"),
                })
            }
        }
    } else if r == rp {
        (bp, rp)
    } else {
        let b_pad = pad_cols::<T>(gpu, bp, n, r, rp)?;
        let addr = raw_addr(gpu, &b_pad);
        pads.push(b_pad);
        (addr, rp)
    };
    Ok(Some(LowRankOps { u, ldu, b, ldb, r }))
}

/// The `wq` of a dense launch: no NF4 weight (the dense kernels never read it).
fn no_nf4() -> LkNf4 {
    LkNf4 {
        packed: std::ptr::null(),
        absmax: std::ptr::null(),
        q: std::ptr::null(),
        absmax2: std::ptr::null(),
        code2: std::ptr::null(),
        offset: 0.0,
        log2_blocksize: 0,
        rows: 0,
        cols: 0,
    }
}

/// Per loaded kernel: its dynamic shared memory limit raised to `smem` (once), and
/// how many of its 2-CTA clusters fit on the GPU at once (asked once, then cached).
fn prepare(
    gpu: &Gpu,
    kernel: Kernel,
    func: &cudarc::driver::CudaFunction,
    smem: u32,
) -> Result<usize> {
    if let Some(&c) = gpu.cluster_grid().lock().unwrap().get(&kernel) {
        return Ok(c);
    }
    func.set_attribute(
        dsys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        DYN_SMEM as i32,
    )?;
    let fallback = (gpu.sm_count() as usize / 2).max(1);
    let config = dsys::CUlaunchConfig {
        gridDimX: 2 * fallback as u32,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: THREADS,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: gpu.stream().cu_stream(),
        attrs: std::ptr::null_mut(),
        numAttrs: 0,
    };
    let mut n: std::ffi::c_int = 0;
    // SAFETY: `func` is a loaded kernel with compile-time cluster dimensions, `config` a
    // fully initialized launch description without attributes, `n` a valid out pointer;
    // the call only reads them and writes `n`.
    let r = unsafe { dsys::cuOccupancyMaxActiveClusters(&mut n, func.cu_function(), &config) };
    // A driver that cannot answer leaves the grid at one CTA per SM.
    let clusters = if r == dsys::CUresult::CUDA_SUCCESS && n > 0 {
        n as usize
    } else {
        fallback
    };
    gpu.cluster_grid().lock().unwrap().insert(kernel, clusters);
    Ok(clusters)
}

/// A TMA descriptor (`CUtensorMap`), built by [`tensor_map`] or [`encode_map`].
#[derive(Clone, Copy)]
#[repr(transparent)]
struct TensorMap(dsys::CUtensorMap);

// SAFETY: CUtensorMap is the driver's plain 128-byte, 128-byte aligned struct, passed by
// value to the kernels' `const __grid_constant__ LkTmap` parameters (the same 128 bytes).
unsafe impl DeviceRepr for TensorMap {}

/// A TMA descriptor for a row-major [rows, cols] matrix of 16-bit elements with a row
/// stride of `stride` elements, read in boxes of 64 columns × `box_rows` rows with the
/// 128-byte swizzle, out-of-bounds elements read as zero.
fn tensor_map(
    dt: dsys::CUtensorMapDataType,
    addr: u64,
    cols: usize,
    rows: usize,
    stride: usize,
    box_rows: usize,
) -> Result<TensorMap> {
    encode_map(
        dt,
        2,
        addr,
        [cols, rows],
        stride,
        [TILE_K, box_rows],
        dsys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
    )
}

/// A TMA descriptor for a row-major [dims[1], dims[0]] matrix of `elem` -byte elements
/// with a row stride of `stride` elements, read in boxes of box[0] × box[1] elements,
/// out-of-bounds elements read as zero.
fn encode_map(
    dt: dsys::CUtensorMapDataType,
    elem: usize,
    addr: u64,
    dims: [usize; 2],
    stride: usize,
    boxes: [usize; 2],
    swizzle: dsys::CUtensorMapSwizzle,
) -> Result<TensorMap> {
    let mut map = dsys::CUtensorMap { opaque: [0; 16] };
    let dims_u: [u64; 2] = [dims[0] as u64, dims[1] as u64];
    let strides: [u64; 1] = [(stride * elem) as u64]; // bytes, dims 1.. only
    let boxes_u: [u32; 2] = [boxes[0] as u32, boxes[1] as u32];
    let elem_strides: [u32; 2] = [1, 1];
    // SAFETY: a pure encoding call: every pointer is to a live local array of the
    // length the rank (2) implies; `addr` is a validated, 16-byte aligned device address
    // of at least dims[1] × stride elements and the stride is a multiple of 16 bytes.
    unsafe {
        dsys::cuTensorMapEncodeTiled(
            &mut map,
            dt,
            2,
            addr as *mut std::ffi::c_void,
            dims_u.as_ptr(),
            strides.as_ptr(),
            boxes_u.as_ptr(),
            elem_strides.as_ptr(),
            dsys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            dsys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            dsys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
        .map_err(|e| {
            Error::Driver(format!(
                "cuTensorMapEncodeTiled ({} × {}): {e}",
                dims[1], dims[0]
            ))
        })?;
    }
    Ok(TensorMap(map))
}

/// The NF4 kernels' scale table of `w` ([k_steps][n_pad][2] f32, see LkGemmParams), in
/// a scratch buffer that lk_nf4_core_scales writes in full.
fn core_scales(gpu: &Gpu, w: &LkNf4, k_steps: usize, n_pad: usize) -> Result<CudaSlice<f32>> {
    let len = k_steps * n_pad * 2;
    let out = gpu.scratch::<f32>(len)?;
    let params = LkNf4CoreScalesParams {
        w: *w,
        out: raw_addr(gpu, &out) as *mut f32,
        k_steps: k_steps as i32,
        n_pad: n_pad as i32,
    };
    let cfg = super::grid_1d(len, 256, 8 * gpu.sm_count());
    gpu.launch(LK_NF4_CORE_SCALES, cfg, &params)?;
    Ok(out)
}

/// The [rows, cols] 16-bit matrix at `src` transposed into a new [cols, rows] scratch
/// buffer (every element written by lk_gemm_transpose).
pub(crate) fn transpose<T: Element>(
    gpu: &Gpu,
    src: u64,
    rows: usize,
    cols: usize,
) -> Result<CudaSlice<T>> {
    let out = gpu.scratch::<T>(rows * cols)?;
    let params = LkTransposeParams {
        in_: src as *const u16,
        out: raw_addr(gpu, &out) as *mut u16,
        rows: rows as i32,
        cols: cols as i32,
    };
    let cfg = super::grid_1d(rows * cols, 256, 8 * gpu.sm_count());
    gpu.launch(LK_GEMM_TRANSPOSE, cfg, &params)?;
    Ok(out)
}

/// A copy of the [rows, r] matrix at `src` as [rows, rp] (zeros in columns r .. rp).
fn pad_cols<T: Element>(
    gpu: &Gpu,
    src: u64,
    rows: usize,
    r: usize,
    rp: usize,
) -> Result<CudaSlice<T>> {
    // lk_gemm_pad_cols writes every element of the scratch buffer.
    let out = gpu.scratch::<T>(rows * rp)?;
    let params = LkGemmPadParams {
        in_: src as *const u16,
        out: raw_addr(gpu, &out) as *mut u16,
        rows: rows as i32,
        r: r as i32,
        rp: rp as i32,
    };
    let cfg = super::grid_1d(rows * rp, 256, 8 * gpu.sm_count());
    gpu.launch(LK_GEMM_PAD_COLS, cfg, &params)?;
    Ok(out)
}

/// The device address of a buffer this module owns (its guard dropped at once: the
/// buffer is only used on the GPU's own stream).
fn raw_addr<T>(gpu: &Gpu, s: &CudaSlice<T>) -> u64 {
    let (p, _g) = s.device_ptr(gpu.stream());
    p
}

fn check_align_to(name: &'static str, ptr: u64, align: usize) -> Result<()> {
    if !ptr.is_multiple_of(align as u64) {
        return Err(Error::Misaligned {
            name,
            address: ptr,
            align,
        });
    }
    Ok(())
}
