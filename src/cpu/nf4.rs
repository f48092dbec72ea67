//! NF4 on the CPU: the oracle of [`crate::cuda::nf4`]. Dequantization is
//! [`Nf4Weight::dequantize`]; the matmul uses the dequantized f32 values with f64
//! accumulation, rounded once.

use crate::lora::check_len;
use crate::{Element, Error, Nf4Weight, Result};

/// `y[t, n] = Σ_k x[t, k] · W[n, k] (+ bias[n])`, W [N, K] in NF4, any number of tokens.
/// `y` is [tokens, N]. Everything is checked before `y` is written: the weight
/// ([`Nf4Weight::validate`]), `tokens` ≥ 1 and `tokens · K`, `tokens · N` without
/// overflow ([`Error::Dim`] `tokens`), and the lengths of `x`, `y` and `bias`.
pub fn matmul<T: Element>(
    tokens: usize,
    x: &[T],
    w: &Nf4Weight,
    bias: Option<&[T]>,
    y: &mut [T],
) -> Result<()> {
    w.validate()?;
    if tokens == 0 {
        return Err(Error::Dim {
            name: "tokens",
            value: 0,
            reason: "must be at least 1",
        });
    }
    let (n, k) = (w.rows, w.cols);
    let times = |d: usize, reason: &'static str| {
        tokens.checked_mul(d).ok_or(Error::Dim {
            name: "tokens",
            value: tokens,
            reason,
        })
    };
    check_len(
        "x",
        x.len(),
        times(k, "tokens · K (w.cols) overflows usize")?,
    )?;
    check_len(
        "y",
        y.len(),
        times(n, "tokens · N (w.rows) overflows usize")?,
    )?;
    if let Some(b) = bias {
        check_len("bias", b.len(), n)?;
    }
    let wd: Vec<f32> = w.dequantize()?;
    super::par_rows(y, n, |t, row| {
        let xr = &x[t * k..(t + 1) * k];
        for (j, out) in row.iter_mut().enumerate() {
            let wr = &wd[j * k..(j + 1) * k];
            let mut acc: f64 = bias.map_or(0.0, |b| b[j].to_f64());
            for (a, b) in xr.iter().zip(wr) {
                acc += a.to_f64() * *b as f64;
            }
            *out = T::from_f64(acc);
        }
    });
    Ok(())
}
