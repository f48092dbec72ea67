//! CUDA ops on NF4 weights (bitsandbytes' format, see [`crate::nf4`]).
//!
//! - [`Nf4Device`]: an [`Nf4Weight`] uploaded as is (4-bit codes, block scales, nested
//!   scales): the dense weight never exists in device memory.
//! - [`dequantize`]: the dense weight in f32/f16/bf16, bit-equal to
//!   [`Nf4Weight::dequantize`] (for callers that want it; the matmul does not use it).
//! - [`matmul`]: `y = x Wᵀ (+ bias)` for T ≤ [`SMALL_T_MAX`] tokens, the 4-bit weight
//!   read once and dequantized in registers, f32 accumulation.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};

use super::{dptr, dptr_mut, Gpu, LkNf4, LkNf4DequantParams, LkNf4MmParams};
use crate::lora::check_len;
use crate::nf4::{Absmax, Nf4Weight};
use crate::{Element, Error, Result};

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
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// The kernels' descriptor, with the guards that keep the buffers' stream order.
    fn desc<'a>(&'a self, gpu: &'a Gpu) -> Result<(LkNf4, Vec<cudarc::driver::SyncOnDrop<'a>>)> {
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
    let params = LkNf4DequantParams {
        w: desc,
        out: op as *mut _,
    };
    let groups = w.numel().div_ceil(32);
    let cfg = LaunchConfig {
        grid_dim: (
            groups.div_ceil(256).clamp(1, 8 * gpu.sm_count() as usize) as u32,
            1,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.launch(
        &format!("lk_nf4_dequant_{}", T::DTYPE.suffix()),
        cfg,
        &params,
    )
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
    if w.cols % 32 != 0 {
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
    let nt = tokens.next_power_of_two();
    let rows_per_warp = if nt <= 16 { 2 } else { 1 };
    let params = LkNf4MmParams {
        w: desc,
        x: xp as *const _,
        bias: bias.as_ref().map_or(0, |b| b.0) as *const _,
        y: yp as *mut _,
        t: tokens as i32,
    };
    let cfg = LaunchConfig {
        grid_dim: (w.rows.div_ceil(4 * rows_per_warp) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.launch(
        &format!("lk_nf4_mm_{}_t{nt}", T::DTYPE.suffix()),
        cfg,
        &params,
    )
}
