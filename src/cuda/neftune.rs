//! CUDA ops of NEFTune (see [`crate::neftune`] for the math and the exact noise). Same
//! arguments as [`crate::cpu::neftune`], same output bits.
//!
//! - [`gather`], [`embed`], [`add_noise`]: one kernel, one pass over the rows: each
//!   block handles a few positions of one sequence, reads the table rows with 16-byte
//!   streaming loads, adds the noise in registers and writes the output once. In mask
//!   mode the block also counts its sequence's mask row (from L2).
//! - [`embedding_backward`]: the table's gradient, by f32 atomics, or deterministic:
//!   keys `id << 32 | position` sorted (bitonic, shared memory for the inner steps),
//!   then one block per run of equal ids sums its rows in position order.
//!
//! ## Index checks, on the device
//! Ids and lengths live on the GPU, so they are checked there, without a sync: an id
//! outside `0..vocab` produces a zero output row (forward) or no contribution
//! (backward), a length outside `0..=seq` gives its sequence no noise; nothing is ever
//! read through a bad index. The kernels record the first bad value and a count, which
//! [`Gpu::take_index_errors`] returns as an error (call it once per step, or after each
//! op while debugging). Callers holding ids on the host can check them before upload
//! with [`crate::neftune::check_ids`].

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use super::kernel::*;
use super::{dptr, dptr_mut, Gpu};
use super::{
    LkNeftKeysParams, LkNeftParams, LkNeftScatterParams, LkNeftSegsumParams, LkNeftSortParams,
};
use crate::lora::check_len;
use crate::neftune::{check_seq_len, BackwardOptions, EmbedShape, Index, Noise, SeqLen};
use crate::{Element, Error, Result};

const BLOCK: u32 = 256;

/// Positions per block: about 2048 16-byte chunks of output per block, at most 64.
fn rows_per_block<T: Element>(dim: usize) -> usize {
    let chunks = (dim * T::DTYPE.size()).div_ceil(16).max(1);
    (2048 / chunks).clamp(1, 64)
}

#[allow(clippy::too_many_arguments)]
fn launch_embed<T: Element, M: Index, L: DevicePtr<M>>(
    gpu: &Gpu,
    shape: &EmbedShape,
    table: u64,
    ids: u64,
    id_kind: i32,
    noise: Option<(&Noise, SeqLen<'_, L>)>,
    out: u64,
) -> Result<()> {
    let (len_mode, len_ptr, _guard) = match noise.map(|n| n.1) {
        None | Some(SeqLen::Padded) => (0, 0, None),
        Some(SeqLen::Mask(m)) => {
            let (p, g) = dptr(gpu, "mask", m)?;
            (1, p, Some(g))
        }
        Some(SeqLen::Lengths(l)) => {
            let (p, g) = dptr(gpu, "lengths", l)?;
            (2, p, Some(g))
        }
    };
    let (stp, _gs) = gpu.status.device_ptr(gpu.stream());
    let kernel = LK_NEFT_EMBED.of::<T>()?;
    let rows = rows_per_block::<T>(shape.dim);
    let blocks = shape.batch * shape.seq.div_ceil(rows);
    if blocks > i32::MAX as usize {
        return Err(Error::Dim {
            name: "batch * seq",
            value: shape.tokens(),
            reason: "too many positions for one launch",
        });
    }
    let params = LkNeftParams {
        table: table as *const _,
        ids: ids as *const _,
        out: out as *mut _,
        len: len_ptr as *const _,
        status: stp as *mut _,
        vocab: shape.vocab as i64,
        dim: shape.dim as i32,
        batch: shape.batch as i32,
        seq: shape.seq as i32,
        rows_per_block: rows as i32,
        id_kind,
        len_kind: M::KIND,
        len_mode,
        noise: noise.is_some() as i32,
        alpha: noise.map_or(0.0, |n| n.0.alpha),
        seed: noise.map_or(0, |n| n.0.seed),
        offset: noise.map_or(0, |n| n.0.offset),
    };
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.launch(kernel, cfg, &params)
}

/// Plain gather: `out[p, :] = table[ids[p], :]` (an out-of-range id gives a zero row and
/// is reported by [`Gpu::take_index_errors`]).
pub fn gather<T, I, Tb, Ib, O>(
    gpu: &Gpu,
    shape: &EmbedShape,
    table: &Tb,
    ids: &Ib,
    out: &mut O,
) -> Result<()>
where
    T: Element,
    I: Index,
    Tb: DevicePtr<T>,
    Ib: DevicePtr<I>,
    O: DevicePtrMut<T>,
{
    shape.validate(true)?;
    check_len("table", table.len(), shape.table_len())?;
    check_len("ids", ids.len(), shape.tokens())?;
    check_len("out", out.len(), shape.out_len())?;
    let (tp, _gt) = dptr(gpu, "table", table)?;
    let (ip, _gi) = dptr(gpu, "ids", ids)?;
    let (op, _go) = dptr_mut(gpu, "out", out)?;
    launch_embed::<T, I, Ib>(gpu, shape, tp, ip, I::KIND, None, op)
}

/// Gather and NEFTune noise in one pass: `out[p, :] = table[ids[p], :] + noise`.
#[allow(clippy::too_many_arguments)]
pub fn embed<T, I, M, Tb, Ib, L, O>(
    gpu: &Gpu,
    shape: &EmbedShape,
    table: &Tb,
    ids: &Ib,
    noise: &Noise,
    len: SeqLen<'_, L>,
    out: &mut O,
) -> Result<()>
where
    T: Element,
    I: Index,
    M: Index,
    Tb: DevicePtr<T>,
    Ib: DevicePtr<I>,
    L: DevicePtr<M>,
    O: DevicePtrMut<T>,
{
    shape.validate(true)?;
    noise.validate()?;
    check_len("table", table.len(), shape.table_len())?;
    check_len("ids", ids.len(), shape.tokens())?;
    check_len("out", out.len(), shape.out_len())?;
    check_seq_len(shape, &len, |b: &L| b.len())?;
    let (tp, _gt) = dptr(gpu, "table", table)?;
    let (ip, _gi) = dptr(gpu, "ids", ids)?;
    let (op, _go) = dptr_mut(gpu, "out", out)?;
    launch_embed::<T, M, L>(gpu, shape, tp, ip, I::KIND, Some((noise, len)), op)
}

/// The noise alone, in place on `emb` [batch · seq, dim] (`shape.vocab` is not used):
/// the same values [`embed`] adds.
pub fn add_noise<T, M, L, O>(
    gpu: &Gpu,
    shape: &EmbedShape,
    noise: &Noise,
    len: SeqLen<'_, L>,
    emb: &mut O,
) -> Result<()>
where
    T: Element,
    M: Index,
    L: DevicePtr<M>,
    O: DevicePtrMut<T>,
{
    shape.validate(false)?;
    noise.validate()?;
    check_len("emb", emb.len(), shape.out_len())?;
    check_seq_len(shape, &len, |b: &L| b.len())?;
    let (op, _go) = dptr_mut(gpu, "emb", emb)?;
    launch_embed::<T, M, L>(gpu, shape, 0, 0, 0, Some((noise, len)), op)
}

/// The table's gradient, accumulated: `d_table[ids[p], :] += d_out[p, :]` in f32,
/// positions with id `padding_idx` skipped. `opts.deterministic` sums each row's
/// contributions in position order (bit-equal to [`crate::cpu::neftune`]); otherwise
/// f32 atomics (faster; the order of additions varies from run to run). Ids out of
/// range contribute nothing and are reported by [`Gpu::take_index_errors`].
pub fn embedding_backward<T, I, Ib, D, G>(
    gpu: &Gpu,
    shape: &EmbedShape,
    ids: &Ib,
    d_out: &D,
    d_table: &mut G,
    opts: &BackwardOptions,
) -> Result<()>
where
    T: Element,
    I: Index,
    Ib: DevicePtr<I>,
    D: DevicePtr<T>,
    G: DevicePtrMut<f32>,
{
    shape.validate(true)?;
    check_len("ids", ids.len(), shape.tokens())?;
    check_len("d_out", d_out.len(), shape.out_len())?;
    check_len("d_table", d_table.len(), shape.table_len())?;
    let padding_idx = match opts.padding_idx {
        None => -1,
        Some(p) if p < shape.vocab => p as i64,
        Some(p) => {
            return Err(Error::Dim {
                name: "padding_idx",
                value: p,
                reason: "must be below vocab",
            })
        }
    };
    let (ip, _gi) = dptr(gpu, "ids", ids)?;
    let (dp, _gd) = dptr(gpu, "d_out", d_out)?;
    let (tp, _gt) = dptr_mut(gpu, "d_table", d_table)?;
    let (stp, _gs) = gpu.status.device_ptr(gpu.stream());
    let (tokens, dim) = (shape.tokens(), shape.dim);
    if !opts.deterministic {
        let params = LkNeftScatterParams {
            ids: ip as *const _,
            d_out: dp as *const _,
            d_table: tp as *mut f32,
            status: stp as *mut _,
            vocab: shape.vocab as i64,
            padding_idx,
            tokens: tokens as i32,
            dim: dim as i32,
            id_kind: I::KIND,
        };
        let cfg = LaunchConfig {
            grid_dim: (tokens as u32, dim.div_ceil(BLOCK as usize * 4) as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        return gpu.launch(LK_NEFT_SCATTER.of::<T>()?, cfg, &params);
    }
    if dim.div_ceil(BLOCK as usize) > 65535 {
        // The deterministic path's grid is [positions, dim / 256].
        return Err(Error::Dim {
            name: "dim",
            value: dim,
            reason: "deterministic backward supports dim < 2^24",
        });
    }
    let n2 = tokens.next_power_of_two();
    if n2 > i32::MAX as usize {
        return Err(Error::Dim {
            name: "batch * seq",
            value: tokens,
            reason: "deterministic backward supports fewer than 2^30 positions",
        });
    }
    let keys = gpu.scratch::<u64>(n2)?;
    let (kp, _gk) = keys.device_ptr(gpu.stream());
    let grid = |n: usize, b: u32| LaunchConfig {
        grid_dim: (n.div_ceil(b as usize) as u32, 1, 1),
        block_dim: (b, 1, 1),
        shared_mem_bytes: 0,
    };
    // Every key is written by lk_neft_keys before the sort reads it.
    let kparams = LkNeftKeysParams {
        ids: ip as *const _,
        keys: kp as *mut u64,
        status: stp as *mut _,
        vocab: shape.vocab as i64,
        padding_idx,
        tokens: tokens as i32,
        n2: n2 as i32,
        id_kind: I::KIND,
    };
    gpu.launch(LK_NEFT_KEYS, grid(n2, BLOCK), &kparams)?;
    const LOCAL: usize = 2048;
    let sort = |k_lo: usize, k: usize, j: usize| LkNeftSortParams {
        keys: kp as *mut u64,
        n2: n2 as i32,
        k_lo: k_lo as i32,
        k: k as i32,
        j: j as i32,
    };
    // Merge sizes up to 2048 entirely in shared memory, then for each larger merge size
    // the steps at distances >= 2048 in global memory and the rest in shared memory.
    let local = LaunchConfig {
        grid_dim: (n2.div_ceil(LOCAL) as u32, 1, 1),
        block_dim: (LOCAL as u32 / 2, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.launch(LK_NEFT_SORT_LOCAL, local, &sort(2, n2.min(LOCAL), 0))?;
    let mut k = LOCAL * 2;
    while k <= n2 {
        let mut j = k / 2;
        while j >= LOCAL {
            gpu.launch(LK_NEFT_SORT_GLOBAL, grid(n2, BLOCK), &sort(k, k, j))?;
            j /= 2;
        }
        gpu.launch(LK_NEFT_SORT_LOCAL, local, &sort(k, k, 0))?;
        k *= 2;
    }
    let sparams = LkNeftSegsumParams {
        keys: kp as *const u64,
        d_out: dp as *const _,
        d_table: tp as *mut f32,
        n2: n2 as i32,
        dim: dim as i32,
    };
    let cfg = LaunchConfig {
        grid_dim: (n2 as u32, dim.div_ceil(BLOCK as usize) as u32, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.launch(LK_NEFT_SEGSUM.of::<T>()?, cfg, &sparams)
}
