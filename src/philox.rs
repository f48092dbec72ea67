//! Counter-based randomness: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC'11), the
//! same function the kernels evaluate, so the CPU oracle reproduces the GPU's dropout
//! masks bit for bit from `(seed, offset)`, whatever the launch shape or GPU.
//!
//! Element `e` of a stream (for dropout: `e = t * cols + c` of an `[rows, cols]`
//! tensor) takes word `e % 4` of `philox4x32_10(counter, key)` with
//! `counter = [lo(e / 4), hi(e / 4), lo(offset), hi(offset)]` and
//! `key = [lo(seed), hi(seed)]`. A training loop keeps `seed` fixed and advances
//! `offset` by one per step (per layer, if layers share a seed): every `(seed, offset)`
//! pair is an independent stream of 2^66 values.

/// One Philox4x32-10 block: four 32-bit words from a 128-bit counter and 64-bit key.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for _ in 0..10 {
        let p0 = 0xD251_1F53u64 * c0 as u64;
        let p1 = 0xCD9E_8D57u64 * c2 as u64;
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        let n0 = hi1 ^ c1 ^ k0;
        let n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
        k0 = k0.wrapping_add(0x9E37_79B9);
        k1 = k1.wrapping_add(0xBB67_AE85);
    }
    [c0, c1, c2, c3]
}

/// The 32-bit word for element `e` of stream `(seed, offset)`.
pub fn philox_word(seed: u64, offset: u64, e: u64) -> u32 {
    let group = e >> 2;
    let r = philox4x32_10(
        [
            group as u32,
            (group >> 32) as u32,
            offset as u32,
            (offset >> 32) as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    );
    r[(e & 3) as usize]
}

/// Inverted dropout with probability `p`, its mask drawn from Philox(`seed`, `offset`).
///
/// Element `e` is dropped iff `(philox_word(seed, offset, e) >> 8) < ceil(p * 2^24)`,
/// so the drop probability is `p` rounded up to a multiple of 2^-24; kept elements are
/// scaled by `1 / (1 - p)`. The mask is never stored: backward regenerates it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Drop probability, in [0, 1).
    pub p: f32,
    /// Philox key.
    pub seed: u64,
    /// Philox counter offset: advance it every training step.
    pub offset: u64,
}

impl Dropout {
    /// A dropout with probability `p`, seed and offset.
    pub fn new(p: f32, seed: u64, offset: u64) -> Self {
        Dropout { p, seed, offset }
    }

    /// The integer threshold on 24-bit uniforms: `ceil(p * 2^24)`.
    pub fn threshold(&self) -> u32 {
        (self.p as f64 * 16_777_216.0).ceil() as u32
    }

    /// The factor kept elements are multiplied by, `1 / (1 - p)`, as the kernels use it.
    pub fn keep_scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    /// Whether element `e` is kept.
    pub fn keeps(&self, e: u64) -> bool {
        (philox_word(self.seed, self.offset, e) >> 8) >= self.threshold()
    }

    /// The multiplier of element `e`: 0 if dropped, `1 / (1 - p)` if kept.
    pub fn multiplier(&self, e: u64) -> f32 {
        if self.keeps(e) {
            self.keep_scale()
        } else {
            0.0
        }
    }

    pub(crate) fn validate(&self) -> crate::Result<()> {
        if !(self.p >= 0.0 && self.p < 1.0) {
            return Err(crate::Error::Value {
                name: "dropout.p",
                value: self.p as f64,
                reason: "must be in [0, 1)",
            });
        }
        Ok(())
    }
}

/// SplitMix64 (Steele, Lea and Flood): a small seeded generator for host-side random
/// starts (PiSSA's randomized subspace iteration), not for the kernels' streams.
pub(crate) struct SplitMix(pub u64);

impl SplitMix {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [−1, 1) (53 random bits). Used by the candle layers.
    #[cfg_attr(not(feature = "candle"), allow(dead_code))]
    pub(crate) fn symmetric(&mut self) -> f64 {
        2.0 * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) - 1.0
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub(crate) fn gaussian(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors of the Random123 distribution (kat_vectors, philox4x32 10).
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn dropout_rate_matches_p() {
        for &p in &[0.0f32, 0.1, 0.5, 0.9] {
            let d = Dropout::new(p, 1234, 7);
            let n = 200_000u64;
            let dropped = (0..n).filter(|&e| !d.keeps(e)).count() as f64 / n as f64;
            assert!(
                (dropped - p as f64).abs() < 0.005,
                "p={p} dropped={dropped}"
            );
        }
    }

    #[test]
    fn offsets_give_independent_masks() {
        let a = Dropout::new(0.5, 9, 0);
        let b = Dropout::new(0.5, 9, 1);
        let same = (0..10_000u64).filter(|&e| a.keeps(e) == b.keeps(e)).count();
        assert!((4_500..5_500).contains(&same), "{same}");
    }
}
