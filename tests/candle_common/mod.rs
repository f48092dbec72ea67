//! Inputs shared by the candle layer tests (CPU and GPU).

use candle_core::{Device, Tensor};

/// Deterministic values in [-1, 1) (xorshift from `seed`).
pub fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// An f32 host tensor of `dims` with values `scale · vals(..)`.
pub fn tensor(dims: &[usize], seed: u64, scale: f32) -> Tensor {
    let v: Vec<f32> = vals(dims.iter().product(), seed)
        .iter()
        .map(|x| x * scale)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}
