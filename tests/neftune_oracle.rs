//! The NEFTune CPU oracle: the noise's distribution and bounds, the length modes,
//! composition (gather + noise alone == fused), the table gradient, and bad input.
//! Runs everywhere (no GPU needed).

mod common;

use common::Rng;
use lora_kernels::cpu::neftune as cpu;
use lora_kernels::neftune::{check_ids, BackwardOptions};
use lora_kernels::{bf16, f16, philox_word, DType, Element, EmbedShape, Error, Noise, SeqLen};

const PAD: SeqLen<'static, [u8]> = SeqLen::Padded;

fn table(shape: &EmbedShape, seed: u64) -> Vec<f32> {
    Rng::new(seed).vec(shape.table_len(), 1.0)
}

fn ids(shape: &EmbedShape, seed: u64) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..shape.tokens())
        .map(|_| (r.next_u64() % shape.vocab as u64) as u32)
        .collect()
}

fn noise_statistics<T: Element>() {
    // A zero table: the output is the noise itself (rounded to T).
    let shape = EmbedShape::new(4, 96, 8, 512);
    let zeros = vec![T::default(); shape.table_len()];
    let ids = ids(&shape, 1);
    let noise = Noise::new(5.0, 1234, 7);
    let mut out = vec![T::from_f64(f64::NAN); shape.out_len()];
    cpu::embed(&shape, &zeros, &ids, &noise, PAD, &mut out).unwrap();
    let mag = 5.0 / ((96 * 512) as f64).sqrt();
    assert_eq!(noise.magnitude(96, 512), mag as f32);
    // One rounding to T may reach the bound, never pass it by more.
    let bound = mag * (1.0 + T::DTYPE.epsilon());
    let n = out.len() as f64;
    let (mut sum, mut sq) = (0f64, 0f64);
    for v in &out {
        let v = v.to_f64();
        assert!(
            v.abs() <= bound,
            "|noise| {v} above alpha/sqrt(L d) = {mag}"
        );
        sum += v;
        sq += v * v;
    }
    let mean = sum / n;
    let var = sq / n - mean * mean;
    let sigma = mag / 3f64.sqrt();
    // Mean: within 5 standard errors of 0; variance: within 2% of mag^2 / 3 (the
    // standard error of the sample variance of a uniform is ~0.9/sqrt(n) relative).
    assert!(
        mean.abs() < 5.0 * sigma / n.sqrt(),
        "mean {mean} vs sigma {sigma}"
    );
    assert!(
        (var / (sigma * sigma) - 1.0).abs() < 0.02,
        "variance {var} vs {}",
        sigma * sigma
    );
    // Uses the range: the extremes come close to ±mag.
    let max = out.iter().fold(0f64, |m, v| m.max(v.to_f64()));
    let min = out.iter().fold(0f64, |m, v| m.min(v.to_f64()));
    assert!(max > 0.99 * mag && min < -0.99 * mag, "{min} .. {max}");
}

#[test]
fn noise_is_bounded_centred_with_the_uniform_variance() {
    noise_statistics::<f32>();
    noise_statistics::<f16>();
    noise_statistics::<bf16>();
}

#[test]
fn epsilon_is_the_documented_function_of_the_philox_words() {
    let noise = Noise::new(1.0, 99, 3);
    for e in [0u64, 1, 2, 3, 4, 5, 6, 7, 8, 1 << 33, u64::MAX / 3] {
        // f32: 24 bits of the element's own word of the stream.
        let w = philox_word(99, 3, e) as f64;
        let want = (2.0 * (w / 256.0).floor() + 1.0 - 16777216.0) / 16777216.0;
        assert_eq!(noise.epsilon(DType::F32, e) as f64, want);
        assert!(want > -1.0 && want < 1.0);
        // 16-bit types: half e % 2 of word e / 2 of the stream (two elements per word).
        let w = philox_word(99, 3, e / 2);
        let h = ((w >> (16 * (e % 2))) & 0xffff) as f64;
        let want = (2.0 * h + 1.0 - 65536.0) / 65536.0;
        assert_eq!(noise.epsilon(DType::BF16, e) as f64, want);
        assert_eq!(noise.epsilon(DType::F16, e) as f64, want);
    }
}

#[test]
fn the_stream_depends_on_seed_and_offset_only() {
    let shape = EmbedShape::new(2, 5, 11, 24);
    let (t, i) = (table(&shape, 2), ids(&shape, 3));
    let run = |seed, offset| {
        let mut out = vec![0f32; shape.out_len()];
        cpu::embed(
            &shape,
            &t,
            &i,
            &Noise::new(10.0, seed, offset),
            PAD,
            &mut out,
        )
        .unwrap();
        out
    };
    assert_eq!(run(1, 0), run(1, 0));
    assert_ne!(run(1, 0), run(1, 1));
    assert_ne!(run(1, 0), run(2, 0));
}

#[test]
fn mask_mode_uses_real_lengths_and_leaves_padding_untouched() {
    let shape = EmbedShape::new(3, 10, 20, 16);
    let (t, i) = (table(&shape, 4), ids(&shape, 5));
    // Sequence 0: 7 real tokens (right padding), 1: none, 2: a left-padded 4.
    let mut mask = vec![0i64; 30];
    mask[..7].fill(1);
    mask[26..30].fill(1);
    let noise = Noise::new(5.0, 11, 2);
    let mut out = vec![0f32; shape.out_len()];
    cpu::embed(&shape, &t, &i, &noise, SeqLen::Mask(&mask[..]), &mut out).unwrap();
    let mut plain = vec![0f32; shape.out_len()];
    cpu::gather(&shape, &t, &i, &mut plain).unwrap();
    for p in 0..30 {
        let (o, g) = (&out[p * 16..(p + 1) * 16], &plain[p * 16..(p + 1) * 16]);
        if mask[p] == 0 {
            assert_eq!(o, g, "padding position {p} must be the plain gather");
            continue;
        }
        let len = if p < 10 { 7 } else { 4 };
        let mag = noise.magnitude(len, 16);
        for j in 0..16 {
            let e = noise.epsilon(DType::F32, (p * 16 + j) as u64);
            assert_eq!(o[j], e.mul_add(mag, g[j]), "position {p}, element {j}");
        }
    }
    // Lengths mode on the right-padded sequence agrees with the mask bit for bit.
    let shape1 = EmbedShape::new(1, 10, 20, 16);
    let mut by_len = vec![0f32; shape1.out_len()];
    cpu::embed(
        &shape1,
        &t,
        &i[..10],
        &noise,
        SeqLen::Lengths(&[7u32][..]),
        &mut by_len,
    )
    .unwrap();
    assert_eq!(by_len, out[..160]);
}

#[test]
fn noise_alone_equals_the_fused_op() {
    let shape = EmbedShape::new(2, 9, 13, 40);
    let t: Vec<bf16> = Rng::new(6).vec(shape.table_len(), 1.0);
    let i = ids(&shape, 7);
    let noise = Noise::new(15.0, 5, 8);
    let lengths = [9u32, 4];
    let mut fused = vec![bf16::ZERO; shape.out_len()];
    cpu::embed(
        &shape,
        &t,
        &i,
        &noise,
        SeqLen::Lengths(&lengths[..]),
        &mut fused,
    )
    .unwrap();
    let mut two = vec![bf16::ZERO; shape.out_len()];
    cpu::gather(&shape, &t, &i, &mut two).unwrap();
    let plain = two.clone();
    cpu::add_noise(&shape, &noise, SeqLen::Lengths(&lengths[..]), &mut two).unwrap();
    assert_eq!(fused, two);
    // Positions t >= 4 of sequence 1 are untouched; the rest moved.
    assert_eq!(fused[(9 + 4) * 40..], plain[(9 + 4) * 40..]);
    let moved = fused[..9 * 40]
        .iter()
        .zip(&plain)
        .filter(|(a, b)| a != b)
        .count();
    assert!(moved > 9 * 40 / 2, "only {moved} elements changed");
}

#[test]
fn table_gradient_sums_every_position_of_each_id() {
    let shape = EmbedShape::new(2, 50, 7, 33);
    let mut i = ids(&shape, 8);
    i[3] = 6; // padding id below
    let d_out: Vec<f32> = Rng::new(9).vec(shape.out_len(), 1.0);
    let init: Vec<f32> = Rng::new(10).vec(shape.table_len(), 1.0);
    let mut dt = init.clone();
    let opts = BackwardOptions {
        deterministic: true,
        padding_idx: Some(6),
    };
    cpu::embedding_backward(&shape, &i, &d_out, &mut dt, &opts).unwrap();
    for v in 0..7 {
        for c in 0..33 {
            let mut want = init[v * 33 + c] as f64;
            if v != 6 {
                for p in 0..100 {
                    if i[p] as usize == v {
                        want += d_out[p * 33 + c] as f64;
                    }
                }
            }
            let got = dt[v * 33 + c] as f64;
            assert!(
                (got - want).abs() < 1e-5,
                "row {v} col {c}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn bad_input_is_an_error_naming_the_problem() {
    let shape = EmbedShape::new(2, 4, 10, 8);
    let t = table(&shape, 1);
    let mut i = ids(&shape, 2);
    let mut out = vec![0f32; shape.out_len()];
    let noise = Noise::new(5.0, 0, 0);
    i[5] = 10;
    match cpu::gather(&shape, &t, &i, &mut out) {
        Err(Error::Index {
            name: "ids",
            position: 5,
            value: 10,
            count: 1,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(check_ids(&[0i64, -1, 3], 10).is_err());
    assert!(check_ids(&[0i64, 9, 3], 10).is_ok());
    i[5] = 0;
    match cpu::embed(
        &shape,
        &t,
        &i,
        &noise,
        SeqLen::Lengths(&[4u32, 5][..]),
        &mut out,
    ) {
        Err(Error::Index {
            name: "lengths",
            position: 1,
            value: 5,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    match cpu::embed(
        &shape,
        &t,
        &i,
        &noise,
        SeqLen::Mask(&[1u8; 7][..]),
        &mut out,
    ) {
        Err(Error::Length { name: "mask", .. }) => {}
        other => panic!("{other:?}"),
    }
    match cpu::embed(&shape, &t, &i, &Noise::new(-1.0, 0, 0), PAD, &mut out) {
        Err(Error::Value {
            name: "noise.alpha",
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    match cpu::gather(&shape, &t[1..], &i, &mut out) {
        Err(Error::Length { name: "table", .. }) => {}
        other => panic!("{other:?}"),
    }
    let zero = EmbedShape::new(2, 4, 10, 0);
    match cpu::gather(&zero, &t[..0], &i, &mut out[..0]) {
        Err(Error::Dim { name: "dim", .. }) => {}
        other => panic!("{other:?}"),
    }
}
