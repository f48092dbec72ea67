//! NEFTune on the CPU, bad input: every entry reports a named error and leaves its
//! output buffer untouched (all checks come before the first write); shapes whose
//! element counts overflow are errors, not panics; a bad `alpha` is an error at
//! validation. Runs everywhere (no GPU needed).

mod common;

use common::Rng;
use lora_kernels::cpu::neftune as cpu;
use lora_kernels::neftune::BackwardOptions;
use lora_kernels::{EmbedShape, Error, Noise, SeqLen};

const PAD: SeqLen<'static, [u8]> = SeqLen::Padded;

/// A recognisable output: any element an op writes changes these bits.
fn sentinel(n: usize) -> Vec<f32> {
    (0..n).map(|i| -1000.0 - i as f32).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

struct Case {
    shape: EmbedShape,
    table: Vec<f32>,
    ids: Vec<u32>,
}

fn case() -> Case {
    let shape = EmbedShape::new(2, 4, 10, 8);
    let mut r = Rng::new(7);
    let table = r.vec(shape.table_len(), 1.0);
    let ids = (0..shape.tokens())
        .map(|_| (r.next_u64() % shape.vocab as u64) as u32)
        .collect();
    Case { shape, table, ids }
}

/// Runs `embed` into a sentinel output; returns the result and whether `out` kept its
/// bits.
fn embed_untouched<M: lora_kernels::neftune::Index>(
    c: &Case,
    ids: &[u32],
    noise: &Noise,
    len: SeqLen<'_, [M]>,
) -> (lora_kernels::Result<()>, bool) {
    let mut out = sentinel(c.shape.out_len());
    let before = bits(&out);
    let r = cpu::embed(&c.shape, &c.table, ids, noise, len, &mut out);
    (r, bits(&out) == before)
}

#[test]
fn embed_with_a_length_above_seq_writes_nothing() {
    // The tester's case: lengths [2, 5] for seq 4.
    let c = case();
    let noise = Noise::new(5.0, 1, 2);
    let (r, untouched) = embed_untouched(&c, &c.ids, &noise, SeqLen::Lengths(&[2u32, 5][..]));
    match r {
        Err(Error::Index {
            name: "lengths",
            position: 1,
            value: 5,
            count: 1,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(untouched, "embed wrote `out` before reporting bad lengths");
    // The same arguments with valid lengths do write it (the check above can fail).
    let (r, untouched) = embed_untouched(&c, &c.ids, &noise, SeqLen::Lengths(&[2u32, 4][..]));
    r.unwrap();
    assert!(!untouched);
}

#[test]
fn embed_with_a_negative_length_writes_nothing() {
    let c = case();
    let noise = Noise::new(5.0, 1, 2);
    let (r, untouched) = embed_untouched(&c, &c.ids, &noise, SeqLen::Lengths(&[-1i64, 9][..]));
    match r {
        Err(Error::Index {
            name: "lengths",
            position: 0,
            value: -1,
            count: 2,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(untouched);
}

#[test]
fn embed_with_a_bad_id_writes_nothing() {
    let c = case();
    let mut ids = c.ids.clone();
    ids[6] = 10;
    let noise = Noise::new(5.0, 1, 2);
    let (r, untouched) = embed_untouched(&c, &ids, &noise, SeqLen::Lengths(&[4u32, 4][..]));
    match r {
        Err(Error::Index {
            name: "ids",
            position: 6,
            value: 10,
            count: 1,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(untouched);
    let mut out = sentinel(c.shape.out_len());
    let before = bits(&out);
    assert!(matches!(
        cpu::gather(&c.shape, &c.table, &ids, &mut out),
        Err(Error::Index { name: "ids", .. })
    ));
    assert_eq!(bits(&out), before);
}

#[test]
fn embed_with_a_bad_mask_or_buffer_writes_nothing() {
    let c = case();
    let noise = Noise::new(5.0, 1, 2);
    let (r, untouched) = embed_untouched(&c, &c.ids, &noise, SeqLen::Mask(&[1u8; 7][..]));
    assert!(
        matches!(
            r,
            Err(Error::Length {
                name: "mask",
                expected: 8,
                actual: 7
            })
        ),
        "{r:?}"
    );
    assert!(untouched);
    let (r, untouched) = embed_untouched(&c, &c.ids[1..], &noise, PAD);
    assert!(matches!(r, Err(Error::Length { name: "ids", .. })), "{r:?}");
    assert!(untouched);
    let (r, untouched) = embed_untouched(&c, &c.ids, &noise, SeqLen::Lengths(&[1u8][..]));
    assert!(
        matches!(
            r,
            Err(Error::Length {
                name: "lengths",
                ..
            })
        ),
        "{r:?}"
    );
    assert!(untouched);
    // A short table.
    let mut out = sentinel(c.shape.out_len());
    let before = bits(&out);
    let r = cpu::embed(&c.shape, &c.table[1..], &c.ids, &noise, PAD, &mut out);
    assert!(
        matches!(r, Err(Error::Length { name: "table", .. })),
        "{r:?}"
    );
    assert_eq!(bits(&out), before);
}

#[test]
fn a_bad_alpha_is_a_value_error_at_validation() {
    let c = case();
    for alpha in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1.0, -1e-30] {
        // `Noise::new` does not check; `try_new` and `validate` do.
        match Noise::try_new(alpha, 0, 0) {
            Err(Error::Value {
                name: "noise.alpha",
                ..
            }) => {}
            other => panic!("alpha {alpha}: {other:?}"),
        }
        let noise = Noise::new(alpha, 0, 0);
        assert!(matches!(
            noise.validate(),
            Err(Error::Value {
                name: "noise.alpha",
                ..
            })
        ));
        let (r, untouched) = embed_untouched(&c, &c.ids, &noise, PAD);
        assert!(
            matches!(
                r,
                Err(Error::Value {
                    name: "noise.alpha",
                    ..
                })
            ),
            "alpha {alpha}: {r:?}"
        );
        assert!(untouched);
        let mut emb = sentinel(c.shape.out_len());
        let before = bits(&emb);
        let r = cpu::add_noise(&c.shape, &noise, PAD, &mut emb);
        assert!(matches!(r, Err(Error::Value { .. })), "{r:?}");
        assert_eq!(bits(&emb), before);
    }
    for alpha in [0.0, 5.0, 15.0] {
        assert_eq!(
            Noise::try_new(alpha, 3, 4).unwrap(),
            Noise::new(alpha, 3, 4)
        );
    }
}

#[test]
fn add_noise_with_bad_lengths_writes_nothing() {
    let c = case();
    let noise = Noise::new(5.0, 1, 2);
    let mut emb = sentinel(c.shape.out_len());
    let before = bits(&emb);
    let r = cpu::add_noise(&c.shape, &noise, SeqLen::Lengths(&[3i32, 5][..]), &mut emb);
    assert!(
        matches!(
            r,
            Err(Error::Index {
                name: "lengths",
                position: 1,
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(bits(&emb), before);
}

#[test]
fn backward_with_bad_input_writes_nothing() {
    let c = case();
    let d_out = Rng::new(3).vec::<f32>(c.shape.out_len(), 1.0);
    let mut ids = c.ids.clone();
    ids[3] = 99;
    let mut d_table = sentinel(c.shape.table_len());
    let before = bits(&d_table);
    let opts = BackwardOptions::default();
    let r = cpu::embedding_backward(&c.shape, &ids, &d_out, &mut d_table, &opts);
    assert!(
        matches!(
            r,
            Err(Error::Index {
                name: "ids",
                position: 3,
                value: 99,
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(bits(&d_table), before);
    let r = cpu::embedding_backward(&c.shape, &c.ids, &d_out[1..], &mut d_table, &opts);
    assert!(
        matches!(r, Err(Error::Length { name: "d_out", .. })),
        "{r:?}"
    );
    assert_eq!(bits(&d_table), before);
}

#[test]
fn huge_shapes_are_dim_errors_not_panics() {
    // The accessors saturate instead of overflowing.
    let huge = EmbedShape::new(usize::MAX, 3, usize::MAX, 5);
    assert_eq!(huge.tokens(), usize::MAX);
    assert_eq!(huge.table_len(), usize::MAX);
    assert_eq!(huge.out_len(), usize::MAX);
    assert_eq!(EmbedShape::new(3, 4, 5, 6).out_len(), 72);
    let noise = Noise::new(5.0, 0, 0);
    let cases = [
        (EmbedShape::new(usize::MAX, 3, 10, 8), "batch"),
        (EmbedShape::new(2, usize::MAX, 10, 8), "seq"),
        (EmbedShape::new(2, 3, 10, usize::MAX), "dim"),
        (EmbedShape::new(2, 3, usize::MAX, 8), "vocab"),
        (EmbedShape::new(1 << 20, 1 << 20, 10, 8), "batch * seq"),
        (
            EmbedShape::new(i32::MAX as usize, i32::MAX as usize, 10, 8),
            "batch * seq",
        ),
    ];
    for (shape, want) in cases {
        let mut out = sentinel(16);
        let before = bits(&out);
        let ids = [0u32; 4];
        let table = [0f32; 16];
        match cpu::embed(&shape, &table, &ids, &noise, PAD, &mut out) {
            Err(Error::Dim { name, .. }) => assert_eq!(name, want, "{shape:?}"),
            other => panic!("{shape:?}: {other:?}"),
        }
        match cpu::gather(&shape, &table, &ids, &mut out) {
            Err(Error::Dim { name, .. }) => assert_eq!(name, want, "{shape:?}"),
            other => panic!("{shape:?}: {other:?}"),
        }
        let mut d_table = [0f32; 16];
        match cpu::embedding_backward(
            &shape,
            &ids,
            &table,
            &mut d_table,
            &BackwardOptions::default(),
        ) {
            Err(Error::Dim { name, .. }) => assert_eq!(name, want, "{shape:?}"),
            other => panic!("{shape:?}: {other:?}"),
        }
        assert_eq!(bits(&out), before);
    }
    // In range but with a table of 2^62 elements: a length error, not an overflow.
    let big = EmbedShape::new(1, 1, i32::MAX as usize, i32::MAX as usize);
    let mut out = [0f32; 4];
    let r = cpu::gather(&big, &[0f32; 4], &[0u32], &mut out);
    assert!(
        matches!(r, Err(Error::Length { name: "table", .. })),
        "{r:?}"
    );
}
