//! NEFTune on the CPU: the oracle of [`crate::cuda::neftune`], bit for bit (see
//! [`crate::neftune`] for the exact noise). Every entry checks all its arguments (the
//! shape and its products, buffer lengths, `noise.alpha`, ids, mask or lengths) before
//! its first write: on any error the output buffer is untouched. Out-of-range ids or
//! lengths are an [`Error::Index`].

use crate::lora::check_len;
use crate::neftune::{check_ids, check_seq_len, BackwardOptions, EmbedShape, Index, Noise, SeqLen};
use crate::{Element, Error, Result};

/// Per position: whether it gets noise, and the magnitude of its sequence.
fn magnitudes<M: Index>(
    shape: &EmbedShape,
    noise: &Noise,
    len: SeqLen<'_, [M]>,
) -> Result<Vec<f32>> {
    let (batch, seq) = (shape.batch, shape.seq);
    let mut mag = vec![0f32; shape.tokens()];
    for b in 0..batch {
        let row = &mut mag[b * seq..(b + 1) * seq];
        match len {
            SeqLen::Padded => row.fill(noise.magnitude(seq, shape.dim)),
            SeqLen::Mask(mask) => {
                let m = &mask[b * seq..(b + 1) * seq];
                let l = m.iter().filter(|v| v.to_i64() != 0).count();
                let g = noise.magnitude(l, shape.dim);
                for (o, v) in row.iter_mut().zip(m) {
                    *o = if v.to_i64() != 0 { g } else { 0.0 };
                }
            }
            SeqLen::Lengths(lengths) => {
                let l = lengths[b].to_i64();
                if l < 0 || l as u64 > seq as u64 {
                    return Err(Error::Index {
                        name: "lengths",
                        position: b,
                        value: l,
                        count: lengths
                            .iter()
                            .filter(|v| v.to_i64() < 0 || v.to_i64() as u64 > seq as u64)
                            .count(),
                    });
                }
                let g = noise.magnitude(l as usize, shape.dim);
                row[..l as usize].fill(g);
            }
        }
    }
    Ok(mag)
}

/// Adds the noise to `emb` [batch · seq, dim] in place, where `mag` (per position) is
/// nonzero.
fn noise_rows<T: Element>(shape: &EmbedShape, noise: &Noise, mag: &[f32], emb: &mut [T]) {
    let d = shape.dim;
    super::par_rows(emb, d, |p, row| {
        let m = mag[p];
        if m == 0.0 {
            return;
        }
        for (j, v) in row.iter_mut().enumerate() {
            let eps = noise.epsilon(T::DTYPE, (p * d + j) as u64);
            *v = T::from_f32(eps.mul_add(m, v.to_f32()));
        }
    });
}

/// Every check of a gather into an output of `out_len` elements: the shape, the
/// buffers' lengths and the ids.
fn check_gather<T: Element, I: Index>(
    shape: &EmbedShape,
    table: &[T],
    ids: &[I],
    out_len: usize,
) -> Result<()> {
    shape.validate(true)?;
    check_len("table", table.len(), shape.table_len())?;
    check_len("ids", ids.len(), shape.tokens())?;
    check_len("out", out_len, shape.out_len())?;
    check_ids(ids, shape.vocab)
}

/// `out[p, :] = table[ids[p], :]`, arguments already checked.
fn gather_rows<T: Element, I: Index>(shape: &EmbedShape, table: &[T], ids: &[I], out: &mut [T]) {
    let d = shape.dim;
    super::par_rows(out, d, |p, row| {
        let id = ids[p].to_i64() as usize;
        row.copy_from_slice(&table[id * d..(id + 1) * d]);
    });
}

/// Plain gather: `out[p, :] = table[ids[p], :]`. On error `out` is untouched.
pub fn gather<T: Element, I: Index>(
    shape: &EmbedShape,
    table: &[T],
    ids: &[I],
    out: &mut [T],
) -> Result<()> {
    check_gather(shape, table, ids, out.len())?;
    gather_rows(shape, table, ids, out);
    Ok(())
}

/// Gather and NEFTune noise: `out[p, :] = table[ids[p], :] + noise`. Every argument
/// (shape, buffer lengths, `noise.alpha`, ids, mask or lengths) is checked before
/// `out` is written: on error `out` is untouched.
pub fn embed<T: Element, I: Index, M: Index>(
    shape: &EmbedShape,
    table: &[T],
    ids: &[I],
    noise: &Noise,
    len: SeqLen<'_, [M]>,
    out: &mut [T],
) -> Result<()> {
    noise.validate()?;
    check_seq_len(shape, &len, |b: &[M]| b.len())?;
    check_gather(shape, table, ids, out.len())?;
    // Checks the lengths' values too, so this comes before the first write.
    let mag = magnitudes(shape, noise, len)?;
    gather_rows(shape, table, ids, out);
    noise_rows(shape, noise, &mag, out);
    Ok(())
}

/// The noise alone, in place on embeddings `emb` [batch · seq, dim] (`shape.vocab` is
/// not used). Equal to the noise of [`embed`] for the same arguments. On error `emb` is
/// untouched.
pub fn add_noise<T: Element, M: Index>(
    shape: &EmbedShape,
    noise: &Noise,
    len: SeqLen<'_, [M]>,
    emb: &mut [T],
) -> Result<()> {
    shape.validate(false)?;
    noise.validate()?;
    check_seq_len(shape, &len, |b: &[M]| b.len())?;
    check_len("emb", emb.len(), shape.out_len())?;
    let mag = magnitudes(shape, noise, len)?;
    noise_rows(shape, noise, &mag, emb);
    Ok(())
}

/// The table's gradient: `d_table[ids[p], :] += d_out[p, :]` (f32), skipping
/// `padding_idx`. Each row's contributions are summed in position order in f32 from 0,
/// then added to `d_table` once: the result of the GPU's deterministic mode, bit for bit.
/// On error `d_table` is untouched.
pub fn embedding_backward<T: Element, I: Index>(
    shape: &EmbedShape,
    ids: &[I],
    d_out: &[T],
    d_table: &mut [f32],
    opts: &BackwardOptions,
) -> Result<()> {
    shape.validate(true)?;
    check_len("ids", ids.len(), shape.tokens())?;
    check_len("d_out", d_out.len(), shape.out_len())?;
    check_len("d_table", d_table.len(), shape.table_len())?;
    check_ids(ids, shape.vocab)?;
    let d = shape.dim;
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&p| (ids[p].to_i64(), p));
    let mut i = 0;
    let mut acc = vec![0f32; d];
    while i < order.len() {
        let id = ids[order[i]].to_i64() as usize;
        let mut j = i;
        acc.fill(0.0);
        while j < order.len() && ids[order[j]].to_i64() as usize == id {
            let p = order[j];
            for (a, v) in acc.iter_mut().zip(&d_out[p * d..(p + 1) * d]) {
                *a += v.to_f32();
            }
            j += 1;
        }
        if opts.padding_idx != Some(id) {
            for (t, a) in d_table[id * d..(id + 1) * d].iter_mut().zip(&acc) {
                *t += *a;
            }
        }
        i = j;
    }
    Ok(())
}
