//! CUDA ops on NF4 weights (bitsandbytes' format, see [`crate::nf4`]).
//!
//! - [`Nf4Device`]: an [`Nf4Weight`] uploaded as is (4-bit codes, block scales, nested
//!   scales): the dense weight never exists in device memory.
//! - [`dequantize`]: the dense weight in f32/f16/bf16, bit-equal to
//!   [`Nf4Weight::dequantize`] (for callers that want it; the matmul does not use it).
//! - [`matmul`]: `y = x Wᵀ (+ bias)` for T ≤ [`SMALL_T_MAX`] tokens, the 4-bit weight
//!   read once and dequantized in registers, f32 accumulation: on tensor cores for
//!   f16/bf16 (each dequantized value rounded to the activation type, as
//!   `dequantize_4bit` does), SIMT f32 FMAs for f32.
//! - [`quantize`]: a dense weight on the GPU to NF4, the same bytes as
//!   [`Nf4Weight::quantize`] (and bitsandbytes' `quantize_4bit`).
//!
//! The QLoRA linear layer (LoRA over an NF4 W) is [`crate::cuda::qlora`].

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};

use super::kernel::*;
use super::{dptr, dptr_mut, Gpu, LkNf4, LkNf4DequantParams, LkNf4MmParams};
use super::{LkNf4DoubleQuantParams, LkNf4QuantParams};
use crate::lora::check_len;
use crate::nf4::{check_quantize_args, dynamic_map, Absmax, DoubleQuant, Nf4Weight};
use crate::nf4::{NESTED_BLOCKSIZE, NF4_MIDPOINTS};
use crate::{DType, Element, Error, Result};

/// The largest T [`matmul`] takes.
pub const SMALL_T_MAX: usize = 32;

/// An NF4 weight on the GPU (same layout as [`Nf4Weight`]).
#[derive(Debug)]
pub struct Nf4Device {
    pub rows: usize,
    pub cols: usize,
    pub blocksize: usize,
    pub packed: CudaSlice<u8>,
    /// Plain f32 scales, or (double quantization) the 8-bit codes, nested scales,
    /// nested code table and offset.
    pub absmax: DeviceAbsmax,
    /// The type the weight had before quantization (kept for [`Nf4Device::download`]).
    pub dtype: DType,
}

/// Block scales on the GPU.
#[derive(Debug)]
pub enum DeviceAbsmax {
    F32(CudaSlice<f32>),
    Double {
        q: CudaSlice<u8>,
        absmax2: CudaSlice<f32>,
        code: CudaSlice<f32>,
        offset: f32,
    },
}

impl Nf4Device {
    /// Uploads a host NF4 weight (validated first).
    pub fn upload(gpu: &Gpu, w: &Nf4Weight) -> Result<Self> {
        w.validate()?;
        let s = gpu.stream();
        let absmax = match &w.absmax {
            Absmax::F32(a) => DeviceAbsmax::F32(s.clone_htod(a)?),
            Absmax::Double(d) => DeviceAbsmax::Double {
                q: s.clone_htod(&d.q)?,
                absmax2: s.clone_htod(&d.absmax2)?,
                code: s.clone_htod(&d.code)?,
                offset: d.offset,
            },
        };
        Ok(Nf4Device {
            rows: w.rows,
            cols: w.cols,
            blocksize: w.blocksize,
            packed: s.clone_htod(&w.packed)?,
            absmax,
            dtype: w.dtype,
        })
    }

    /// Copies the weight back to the host (to save a checkpoint, or compare).
    pub fn download(&self, gpu: &Gpu) -> Result<Nf4Weight> {
        let s = gpu.stream();
        let absmax = match &self.absmax {
            DeviceAbsmax::F32(a) => Absmax::F32(s.clone_dtoh(a)?),
            DeviceAbsmax::Double {
                q,
                absmax2,
                code,
                offset,
            } => Absmax::Double(DoubleQuant {
                q: s.clone_dtoh(q)?,
                absmax2: s.clone_dtoh(absmax2)?,
                code: s.clone_dtoh(code)?,
                offset: *offset,
            }),
        };
        let w = Nf4Weight {
            rows: self.rows,
            cols: self.cols,
            blocksize: self.blocksize,
            packed: s.clone_dtoh(&self.packed)?,
            absmax,
            dtype: self.dtype,
        };
        w.validate()?;
        Ok(w)
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// The kernels' descriptor, with the guards that keep the buffers' stream order.
    pub(crate) fn desc<'a>(
        &'a self,
        gpu: &'a Gpu,
    ) -> Result<(LkNf4, Vec<cudarc::driver::SyncOnDrop<'a>>)> {
        crate::nf4::check_blocksize(self.blocksize)?;
        if self.rows == 0 || self.cols == 0 || self.numel() > i32::MAX as usize * 2 {
            return Err(Error::Dim {
                name: "rows * cols",
                value: self.numel(),
                reason: "must be nonzero and fit the kernels' indexing",
            });
        }
        let blocks = self.numel().div_ceil(self.blocksize);
        check_len("packed", self.packed.len(), self.numel().div_ceil(2))?;
        let mut guards = Vec::new();
        let (pp, g) = self.packed.device_ptr(gpu.stream());
        guards.push(g);
        let mut d = LkNf4 {
            packed: pp as *const u8,
            absmax: std::ptr::null(),
            q: std::ptr::null(),
            absmax2: std::ptr::null(),
            code2: std::ptr::null(),
            offset: 0.0,
            log2_blocksize: self.blocksize.trailing_zeros() as i32,
            rows: self.rows as i32,
            cols: self.cols as i32,
        };
        match &self.absmax {
            DeviceAbsmax::F32(a) => {
                check_len("absmax", a.len(), blocks)?;
                let (p, g) = a.device_ptr(gpu.stream());
                guards.push(g);
                d.absmax = p as *const f32;
            }
            DeviceAbsmax::Double {
                q,
                absmax2,
                code,
                offset,
            } => {
                check_len("absmax", q.len(), blocks)?;
                check_len("nested_absmax", absmax2.len(), blocks.div_ceil(256))?;
                check_len("nested_quant_map", code.len(), 256)?;
                let (p, g) = q.device_ptr(gpu.stream());
                guards.push(g);
                d.q = p as *const u8;
                let (p, g) = absmax2.device_ptr(gpu.stream());
                guards.push(g);
                d.absmax2 = p as *const f32;
                let (p, g) = code.device_ptr(gpu.stream());
                guards.push(g);
                d.code2 = p as *const f32;
                d.offset = *offset;
            }
        }
        Ok((d, guards))
    }
}

/// The dense weight [rows, cols] in `out`'s type, as `dequantize_4bit`.
pub fn dequantize<T: Element, O: DevicePtrMut<T>>(
    gpu: &Gpu,
    w: &Nf4Device,
    out: &mut O,
) -> Result<()> {
    check_len("out", out.len(), w.numel())?;
    let (desc, _guards) = w.desc(gpu)?;
    let (op, _go) = dptr_mut(gpu, "out", out)?;
    launch_dequant::<T>(gpu, &desc, (0, 0), w.numel(), op, true)
}

/// Dequantizes `count` elements of the row-major weight into `out` (`count` elements of
/// T; the caller validated `desc` and `out`): with `(start, 0)` the elements
/// `start..start + count` (a panel of rows); with `(start, pcols)`, pcols > 0, the
/// column panel of `count / pcols` rows and `pcols` columns whose first element is
/// `start` (count a multiple of pcols and below 2³²). `streaming`: the
/// standalone dequantize (evict-first stores, one 8-element group per thread: 90–94% of
/// the copy bandwidth on an H100); else a panel for the next GEMM (plain stores, which
/// leave it in L2, and a grid of at most 8 blocks per SM).
pub(crate) fn launch_dequant<T: Element>(
    gpu: &Gpu,
    desc: &LkNf4,
    (start, pcols): (usize, usize),
    count: usize,
    out: u64,
    streaming: bool,
) -> Result<()> {
    if pcols > 0 && (!count.is_multiple_of(pcols) || count >= 1 << 32 || pcols > i32::MAX as usize)
    {
        return Err(Error::Dim {
            name: "column panel",
            value: count,
            reason: "a column panel's element count must be a multiple of its width and below 2^32",
        });
    }
    let params = LkNf4DequantParams {
        w: *desc,
        out: out as *mut _,
        start: start as i64,
        count: count as i64,
        streaming: streaming as i32,
        pcols: pcols as i32,
    };
    let blocks = if streaming {
        count.div_ceil(8 * 256).clamp(1, 1 << 20)
    } else {
        count
            .div_ceil(32 * 256)
            .clamp(1, 8 * gpu.sm_count() as usize)
    };
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.launch(LK_NF4_DEQUANT.of::<T>()?, cfg, &params)
}

/// `y[t, n] = Σ_k x[t, k] · W[n, k] (+ bias[n])` for `tokens` ≤ [`SMALL_T_MAX`], W in
/// NF4 ([rows = N, cols = K]), dequantized in registers. Needs K % 32 == 0 and x aligned
/// to 16 bytes.
pub fn matmul<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
    gpu: &Gpu,
    tokens: usize,
    x: &I,
    w: &Nf4Device,
    bias: Option<&I>,
    y: &mut O,
) -> Result<()> {
    if tokens == 0 || tokens > SMALL_T_MAX {
        return Err(Error::Dim {
            name: "tokens",
            value: tokens,
            reason: "the NF4 matmul takes 1..=32 tokens",
        });
    }
    if !w.cols.is_multiple_of(32) {
        return Err(Error::Dim {
            name: "cols (K)",
            value: w.cols,
            reason: "the NF4 matmul needs K % 32 == 0",
        });
    }
    check_len("x", x.len(), tokens * w.cols)?;
    check_len("y", y.len(), tokens * w.rows)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), w.rows)?;
    }
    let (desc, _guards) = w.desc(gpu)?;
    let (xp, _gx) = dptr(gpu, "x", x)?;
    if xp % 16 != 0 {
        return Err(Error::Misaligned {
            name: "x",
            address: xp,
            align: 16,
        });
    }
    let bias = match bias {
        Some(b) => Some(dptr(gpu, "bias", b)?),
        None => None,
    };
    let (yp, _gy) = dptr_mut(gpu, "y", y)?;
    launch_mm::<T>(
        gpu,
        &desc,
        tokens,
        xp,
        bias.as_ref().map_or(0, |b| b.0),
        yp,
        None,
    )
}

/// The QLoRA term the small-T matmul adds: `scale · h Bᵀ`, h [T, r] and B [N, r] in T.
pub(crate) struct MmLora {
    pub h: u64,
    pub b: u64,
    pub r: usize,
    pub scale: f32,
}

/// Launches the small-T matmul on validated addresses (x 16-byte aligned, K % 32 == 0,
/// 1 ≤ tokens ≤ 32).
pub(crate) fn launch_mm<T: Element>(
    gpu: &Gpu,
    desc: &LkNf4,
    tokens: usize,
    x: u64,
    bias: u64,
    y: u64,
    lora: Option<MmLora>,
) -> Result<()> {
    let params = LkNf4MmParams {
        w: *desc,
        x: x as *const _,
        bias: bias as *const _,
        y: y as *mut _,
        h: lora.as_ref().map_or(0, |l| l.h) as *const _,
        b: lora.as_ref().map_or(0, |l| l.b) as *const _,
        scale: lora.as_ref().map_or(0.0, |l| l.scale),
        t: tokens as i32,
        r: lora.as_ref().map_or(0, |l| l.r) as i32,
    };
    if T::DTYPE != DType::F32 && (desc.packed as u64).is_multiple_of(8) {
        // Tensor cores: one block of 8 warps per 16 rows of W. Where every 64-column
        // chunk of a row lies in one NF4 block (K % 64 == 0, blocksize ≥ 64), the codes
        // enter the product as table values and the block scale multiplies each chunk's
        // product (`sa`); otherwise each element is dequantized first (`mma`).
        let nt = match tokens {
            0..=8 => 1,
            9..=16 => 2,
            _ => 4,
        };
        let sa = desc.cols % 64 == 0 && desc.log2_blocksize >= 6;
        let family = match (sa, nt) {
            (true, 1) => LK_NF4_MM_SA_N1,
            (true, 2) => LK_NF4_MM_SA_N2,
            (true, _) => LK_NF4_MM_SA_N4,
            (false, 1) => LK_NF4_MM_MMA_N1,
            (false, 2) => LK_NF4_MM_MMA_N2,
            (false, _) => LK_NF4_MM_MMA_N4,
        };
        let cfg = LaunchConfig {
            grid_dim: ((desc.rows as usize).div_ceil(16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        return gpu.launch(family.of::<T>()?, cfg, &params);
    }
    // SIMT (f32): one warp per 2 rows (1 at T > 16).
    let nt = tokens.next_power_of_two();
    let rows_per_warp = if nt <= 16 { 2 } else { 1 };
    let cfg = LaunchConfig {
        grid_dim: (
            (desc.rows as usize).div_ceil(4 * rows_per_warp) as u32,
            1,
            1,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let family = match nt {
        1 => LK_NF4_MM_T1,
        2 => LK_NF4_MM_T2,
        4 => LK_NF4_MM_T4,
        8 => LK_NF4_MM_T8,
        16 => LK_NF4_MM_T16,
        32 => LK_NF4_MM_T32,
        nt => return Err(no_variant("lk_nf4_mm_*", "token block", nt)),
    };
    gpu.launch(family.of::<T>()?, cfg, &params)
}

/// Quantizes `w` [rows, cols] on the GPU to NF4, as
/// `quantize_4bit(w, blocksize, quant_type="nf4", compress_statistics=double_quant)`: the
/// same bytes, scales, nested scales and offset as [`Nf4Weight::quantize`] on the host,
/// for finite input.
///
/// Non-finite input: the weight is on the device, so this does not scan it (that would
/// cost a read of W and a host synchronization); it behaves as bitsandbytes does (a NaN
/// is skipped by the block's absmax and gets code 0; a ±Inf makes its block's scale
/// infinite, and with double quantization every nested scale), where
/// [`Nf4Weight::quantize`] refuses such input. The result then fails
/// [`Nf4Weight::validate`], so [`Nf4Device::download`] reports it. Double quantization
/// synchronizes the stream once (the absmax mean is read back for the offset).
pub fn quantize<T: Element, I: DevicePtr<T>>(
    gpu: &Gpu,
    w: &I,
    rows: usize,
    cols: usize,
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Device> {
    check_quantize_args(rows, cols, blocksize, w.len())?;
    let numel = rows * cols;
    if numel > i32::MAX as usize * 2 {
        return Err(Error::Dim {
            name: "rows * cols",
            value: numel,
            reason: "must fit the kernels' indexing (< 2^32)",
        });
    }
    let blocks = numel.div_ceil(blocksize);
    let s = gpu.stream();
    let (wp, _gw) = dptr(gpu, "w", w)?;
    // SAFETY of the allocations: the quantize kernel writes every byte of `packed` and
    // every absmax; the double-quantization kernels write every part, q, absmax2 and the
    // offset before they are read.
    let mut packed = gpu.scratch::<u8>(numel.div_ceil(2))?;
    let mut absmax = gpu.scratch::<f32>(blocks)?;
    {
        let (pp, _gp) = dptr_mut(gpu, "packed", &mut packed)?;
        let (ap, _ga) = dptr_mut(gpu, "absmax", &mut absmax)?;
        let params = LkNf4QuantParams {
            w: wp as *const _,
            packed: pp as *mut u8,
            absmax: ap as *mut f32,
            mid: NF4_MIDPOINTS,
            numel: numel as i64,
            blocks: blocks as i64,
            log2_blocksize: blocksize.trailing_zeros() as i32,
        };
        // One warp per block.
        let cfg = LaunchConfig {
            grid_dim: (
                blocks.div_ceil(8).clamp(1, 16 * gpu.sm_count() as usize) as u32,
                1,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        gpu.launch(LK_NF4_QUANT.of::<T>()?, cfg, &params)?;
    }
    let absmax = if double_quant {
        let groups = blocks.div_ceil(NESTED_BLOCKSIZE);
        let code = s.clone_htod(&dynamic_map())?;
        let mut part = gpu.scratch::<f64>(groups)?;
        let mut offset = gpu.scratch::<f32>(1)?;
        let mut q = gpu.scratch::<u8>(blocks)?;
        let mut absmax2 = gpu.scratch::<f32>(groups)?;
        {
            let (ap, _ga) = dptr(gpu, "absmax", &absmax)?;
            let (cp, _gc) = dptr(gpu, "code", &code)?;
            let (pp, _gp) = dptr_mut(gpu, "part", &mut part)?;
            let (op, _go) = dptr_mut(gpu, "offset", &mut offset)?;
            let (qp, _gq) = dptr_mut(gpu, "q", &mut q)?;
            let (a2p, _ga2) = dptr_mut(gpu, "absmax2", &mut absmax2)?;
            let params = LkNf4DoubleQuantParams {
                absmax: ap as *const f32,
                code: cp as *const f32,
                part: pp as *mut f64,
                offset: op as *mut f32,
                q: qp as *mut u8,
                absmax2: a2p as *mut f32,
                blocks: blocks as i64,
                groups: groups as i64,
            };
            let one = |grid: usize, block: u32| LaunchConfig {
                grid_dim: (grid as u32, 1, 1),
                block_dim: (block, 1, 1),
                shared_mem_bytes: 0,
            };
            gpu.launch(LK_NF4_DQ_SUM, one(groups.div_ceil(256), 256), &params)?;
            gpu.launch(LK_NF4_DQ_OFFSET, one(1, 32), &params)?;
            gpu.launch(LK_NF4_DQ_QUANT, one(groups, 256), &params)?;
        }
        let offset = s.clone_dtoh(&offset)?[0];
        DeviceAbsmax::Double {
            q,
            absmax2,
            code,
            offset,
        }
    } else {
        DeviceAbsmax::F32(absmax)
    };
    Ok(Nf4Device {
        rows,
        cols,
        blocksize,
        packed,
        absmax,
        dtype: T::DTYPE,
    })
}
