//! The CPU oracle: plain loops with f64 accumulation, obviously right, used to test the
//! GPU kernels and to run where there is no GPU. Inputs and outputs are in the same
//! element types as the CUDA ops; every intermediate is f64, rounded once at the end.

pub mod adamw;
pub mod dora;
pub mod lora;
pub mod neftune;
pub mod nf4;
pub mod qdora;
pub mod qlora;

/// Runs `f(row, out_row)` over the rows of `out` (each `row_len` long), on all cores.
pub(crate) fn par_rows<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if out.is_empty() || row_len == 0 {
        return;
    }
    let rows = out.len() / row_len;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(rows)
        .max(1);
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (ci, chunk) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, row) in chunk.chunks_mut(row_len).enumerate() {
                    f(ci * per + i, row);
                }
            });
        }
    });
}
