//! NEFTune (Jain et al., 2023): uniform noise on the token embeddings during training.
//!
//! ```text
//! e[b, t, :] = E[ids[b, t], :] + ε · alpha / sqrt(L_b · d),   ε ~ U(−1, 1) per element
//! ```
//!
//! `E` is the embedding table [vocab, d], `ids` [batch, seq], and `L_b` the length of
//! sequence `b`, as the caller picks ([`SeqLen`]):
//! - [`SeqLen::Padded`]: `L_b = seq` and every position gets noise (transformers'
//!   `neftune_noise_alpha` hook);
//! - [`SeqLen::Mask`]: `L_b` = the number of nonzero entries of the attention mask's row
//!   `b`, and only positions whose mask is nonzero get noise (the NEFTune authors'
//!   training code); masked positions are the plain gather, bit for bit;
//! - [`SeqLen::Lengths`]: `L_b = lengths[b]` (in `0..=seq`), noise at `t < L_b`.
//!
//! ## The noise, exactly
//! Element `e = (b · seq + t) · d + j` of the output draws from the Philox4x32-10 block
//! `philox4x32_10([lo(g), hi(g), lo(offset), hi(offset)], [lo(seed), hi(seed)])`
//! ([`crate::philox4x32_10`]) of group `g`, one block per 16 bytes of output:
//! - f32 tables: `g = e / 4`, word `w = e % 4`, `ε = (2 · (w >> 8) + 1 − 2^24) · 2^−24`,
//!   one of 2^24 evenly spaced values in (−1, 1);
//! - f16 and bf16 tables: `g = e / 8`, the 16-bit half `h` (low half first) of word
//!   `(e % 8) / 2`, `ε = (2 · h + 1 − 2^16) · 2^−16`, one of 2^16 evenly spaced values,
//!   still far finer than the output's own precision (8 or 11 bits), at half the
//!   Philox work per element.
//!
//! Either way ε has mean exactly 0 and variance 1/3 − O(2^−2·bits). The magnitude `mag = alpha / sqrt(L_b · d)` is computed in f64
//! and rounded to f32; the output is `round(fma(ε, mag, E[id, j]))` in the table's
//! type (one f32 fused multiply-add, then round-to-nearest-even). The CPU oracle
//! ([`crate::cpu::neftune`]) and the GPU ([`crate::cuda::neftune`]) give the same bits,
//! for any launch shape and GPU. Keep `seed` fixed and advance `offset` by one every
//! training step (and per embedding layer, if several share a seed).
//!
//! ## Backward
//! The noise is a constant, so the gradient of the embeddings' consumer flows through
//! unchanged: `d(activations)` is the identity and needs no kernel. For a trainable
//! table, the table's gradient is the scatter-add `dE[ids[p], :] += d_out[p, :]`
//! ([`crate::cuda::neftune::embedding_backward`]), unordered (f32 atomics) or
//! deterministic (positions sorted by id, summed in position order: the same bits on
//! every run, equal to the CPU oracle's).

use crate::{DType, Error, Result};

/// Shape of an embedding lookup: `batch` sequences of `seq` tokens, a table of `vocab`
/// rows of `dim` elements. The output is [batch · seq, dim].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedShape {
    pub batch: usize,
    pub seq: usize,
    pub vocab: usize,
    pub dim: usize,
}

impl EmbedShape {
    /// `batch` sequences of `seq` tokens, a `vocab` × `dim` table.
    pub fn new(batch: usize, seq: usize, vocab: usize, dim: usize) -> Self {
        EmbedShape {
            batch,
            seq,
            vocab,
            dim,
        }
    }

    /// Number of positions, `batch · seq`. Saturates at `usize::MAX` instead of
    /// overflowing (no panic for any shape); every op rejects such a shape with
    /// [`Error::Dim`] before using it.
    pub fn tokens(&self) -> usize {
        self.batch.saturating_mul(self.seq)
    }

    /// Elements of the table, `vocab · dim` (saturating, as [`EmbedShape::tokens`]).
    pub fn table_len(&self) -> usize {
        self.vocab.saturating_mul(self.dim)
    }

    /// Elements of the output, `batch · seq · dim` (saturating, as
    /// [`EmbedShape::tokens`]).
    pub fn out_len(&self) -> usize {
        self.tokens().saturating_mul(self.dim)
    }

    /// Checks that every dimension is in range and that the element counts
    /// ([`EmbedShape::tokens`], [`EmbedShape::out_len`] and, with `need_vocab`,
    /// [`EmbedShape::table_len`]) fit in `usize` without overflow: [`Error::Dim`]
    /// naming the dimension or product otherwise. `need_vocab`: the op reads the table.
    pub(crate) fn validate(&self, need_vocab: bool) -> Result<()> {
        let dims = [("batch", self.batch), ("seq", self.seq), ("dim", self.dim)];
        for (name, v) in dims {
            if v == 0 || v > i32::MAX as usize {
                return Err(Error::Dim {
                    name,
                    value: v,
                    reason: "must be in 1..2^31",
                });
            }
        }
        if need_vocab && (self.vocab == 0 || self.vocab > i32::MAX as usize) {
            return Err(Error::Dim {
                name: "vocab",
                value: self.vocab,
                reason: "must be in 1..2^31",
            });
        }
        let tokens = self.batch.checked_mul(self.seq).ok_or(Error::Dim {
            name: "batch * seq",
            value: usize::MAX,
            reason: "overflows usize",
        })?;
        if tokens > i32::MAX as usize {
            return Err(Error::Dim {
                name: "batch * seq",
                value: tokens,
                reason: "must be below 2^31",
            });
        }
        if tokens.checked_mul(self.dim).is_none() {
            return Err(Error::Dim {
                name: "batch * seq * dim",
                value: usize::MAX,
                reason: "overflows usize",
            });
        }
        if need_vocab && self.vocab.checked_mul(self.dim).is_none() {
            return Err(Error::Dim {
                name: "vocab * dim",
                value: usize::MAX,
                reason: "overflows usize",
            });
        }
        Ok(())
    }
}

/// Where the noise magnitude's sequence length `L_b` comes from; `B` is the mask's or
/// lengths' buffer type (`[M]` on the CPU, a device buffer on the GPU).
#[derive(Debug)]
pub enum SeqLen<'a, B: ?Sized> {
    /// `L_b = seq`; every position gets noise.
    Padded,
    /// Attention mask [batch, seq]: `L_b` = nonzero entries of row `b`; noise only where
    /// the mask is nonzero.
    Mask(&'a B),
    /// Lengths \[batch\]: `L_b = lengths[b]` (must be in `0..=seq`); noise at `t < L_b`.
    Lengths(&'a B),
}

impl<B: ?Sized> Clone for SeqLen<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: ?Sized> Copy for SeqLen<'_, B> {}

/// NEFTune's noise: `alpha` and the Philox stream `(seed, offset)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Noise {
    /// NEFTune's alpha (the paper uses 5, 10, 15); 0 leaves the embeddings unchanged.
    pub alpha: f32,
    /// Philox key.
    pub seed: u64,
    /// Philox counter offset: advance it every training step.
    pub offset: u64,
}

impl Noise {
    /// Noise of strength `alpha` from stream `(seed, offset)`. Does not check `alpha`:
    /// every op that takes a [`Noise`] first calls [`Noise::validate`], so a NaN,
    /// infinite or negative `alpha` is an [`Error::Value`] there, before anything is
    /// written. [`Noise::try_new`] checks it here instead.
    pub fn new(alpha: f32, seed: u64, offset: u64) -> Self {
        Noise {
            alpha,
            seed,
            offset,
        }
    }

    /// [`Noise::new`], checked: [`Error::Value`] naming `noise.alpha` unless `alpha` is
    /// finite and `>= 0`.
    pub fn try_new(alpha: f32, seed: u64, offset: u64) -> Result<Self> {
        let n = Noise::new(alpha, seed, offset);
        n.validate()?;
        Ok(n)
    }

    /// The magnitude `alpha / sqrt(len · dim)` for a sequence of `len` real tokens, as
    /// the kernels compute it (f64, rounded to f32); 0 when `len` is 0.
    pub fn magnitude(&self, len: usize, dim: usize) -> f32 {
        if len == 0 {
            return 0.0;
        }
        (self.alpha as f64 / (len as f64 * dim as f64).sqrt()) as f32
    }

    /// ε of output element `e` for a table of type `dtype`, in (−1, 1).
    pub fn epsilon(&self, dtype: DType, e: u64) -> f32 {
        let per_block = 16 / dtype.size() as u64;
        let g = e / per_block;
        let r = crate::philox4x32_10(
            [
                g as u32,
                (g >> 32) as u32,
                self.offset as u32,
                (self.offset >> 32) as u32,
            ],
            [self.seed as u32, (self.seed >> 32) as u32],
        );
        let k = (e % per_block) as usize;
        if per_block == 4 {
            (2 * (r[k] >> 8) as i32 + 1 - (1 << 24)) as f32 * 2f32.powi(-24)
        } else {
            let h = (r[k / 2] >> (16 * (k % 2))) & 0xffff;
            (2 * h as i32 + 1 - (1 << 16)) as f32 * 2f32.powi(-16)
        }
    }

    /// [`Error::Value`] naming `noise.alpha` unless `alpha` is finite and `>= 0` (NaN,
    /// ±infinity and negative values are refused; the magnitude would be NaN or flip the
    /// noise's sign). Every op that takes a [`Noise`] calls this first.
    pub fn validate(&self) -> Result<()> {
        if !(self.alpha >= 0.0 && self.alpha.is_finite()) {
            return Err(Error::Value {
                name: "noise.alpha",
                value: self.alpha as f64,
                reason: "must be finite and >= 0",
            });
        }
        Ok(())
    }
}

/// Options of the table-gradient scatter-add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackwardOptions {
    /// Sum each row's contributions in position order (the same bits on every run and
    /// equal to the CPU oracle), at the cost of a sort; otherwise f32 atomics.
    pub deterministic: bool,
    /// Positions holding this id contribute nothing (PyTorch's `padding_idx`).
    pub padding_idx: Option<usize>,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for i32 {}
    impl Sealed for u32 {}
    impl Sealed for i64 {}
}

/// An integer type of token ids, attention masks and lengths: u8, i32, u32 or i64
/// (PyTorch's `input_ids` and `attention_mask` are i64).
pub trait Index:
    sealed::Sealed
    + Copy
    + Send
    + Sync
    + std::fmt::Debug
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + 'static
{
    /// The kernels' index kind (`LK_INDEX_*` in kernels/lk_params.h).
    const KIND: i32;
    /// The value as i64.
    fn to_i64(self) -> i64;
}

impl Index for u8 {
    const KIND: i32 = 0;
    fn to_i64(self) -> i64 {
        self as i64
    }
}
impl Index for i32 {
    const KIND: i32 = 1;
    fn to_i64(self) -> i64 {
        self as i64
    }
}
impl Index for u32 {
    const KIND: i32 = 2;
    fn to_i64(self) -> i64 {
        self as i64
    }
}
impl Index for i64 {
    const KIND: i32 = 3;
    fn to_i64(self) -> i64 {
        self
    }
}

/// Checks the mask's ([batch · seq]) or lengths' (\[batch\]) buffer length; `len_of`
/// reads a buffer's element count (host slice or device buffer).
pub(crate) fn check_seq_len<B: ?Sized>(
    shape: &EmbedShape,
    len: &SeqLen<'_, B>,
    len_of: impl Fn(&B) -> usize,
) -> Result<()> {
    match len {
        SeqLen::Padded => Ok(()),
        SeqLen::Mask(m) => crate::lora::check_len("mask", len_of(m), shape.tokens()),
        SeqLen::Lengths(l) => crate::lora::check_len("lengths", len_of(l), shape.batch),
    }
}

/// Checks every id against the vocabulary on the host: the first bad one as
/// [`Error::Index`]. For callers holding ids on the host before upload.
pub fn check_ids<I: Index>(ids: &[I], vocab: usize) -> Result<()> {
    let mut first = None;
    let mut count = 0;
    for (p, &id) in ids.iter().enumerate() {
        let v = id.to_i64();
        if v < 0 || v as u64 >= vocab as u64 {
            count += 1;
            first.get_or_insert((p, v));
        }
    }
    match first {
        None => Ok(()),
        Some((position, value)) => Err(Error::Index {
            name: "ids",
            position,
            value,
            count,
        }),
    }
}
