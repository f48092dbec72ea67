//! The CPU oracle against peft's outputs and against identities it must satisfy.

mod common;

use common::{assert_close, rel_err, Fixture, Rng};
use lora_kernels::cpu::lora as cpu;
use lora_kernels::{
    bf16, lora, Dropout, Element, Error, LoraGrads, LoraOptions, LoraShape, LoraWeights,
};

#[test]
fn oracle_matches_peft_lora_fixture() {
    let fx = Fixture::open("peft_lora_48x80_r8.safetensors");
    let shape = LoraShape::new(
        fx.meta_usize("T"),
        fx.meta_usize("k"),
        fx.meta_usize("n"),
        fx.meta_usize("r"),
    );
    let scale = fx.meta_f32("scaling");
    assert_eq!(scale, lora::scale(fx.meta_f32("alpha"), shape.rank));
    let opts = LoraOptions::new(scale);
    let (x, w, a, b, bias) = (
        fx.f32("x"),
        fx.f32("W"),
        fx.f32("A"),
        fx.f32("B"),
        fx.f32("bias"),
    );
    let weights = LoraWeights {
        w: &w[..],
        a: &a[..],
        b: &b[..],
        bias: Some(&bias[..]),
    };
    let mut y = vec![0.0f32; shape.y_len()];
    let mut h = vec![0.0f32; shape.h_len()];
    cpu::forward(&shape, &opts, &x, weights, &mut y, Some(&mut h)).unwrap();
    let e = rel_err(&y, &fx.f32("y"));
    assert!(e < 1e-6, "y rel err {e}");

    let dy = fx.f32("dy");
    let (mut dx, mut da, mut db) = (
        vec![0.0f32; shape.x_len()],
        vec![0.0f32; shape.a_len()],
        vec![0.0f32; shape.b_len()],
    );
    let grads = LoraGrads {
        dx: &mut dx[..],
        da: &mut da[..],
        db: &mut db[..],
    };
    cpu::backward(&shape, &opts, &x, weights, &h, &dy, grads).unwrap();
    for (name, got) in [("dx", &dx), ("dA", &da), ("dB", &db)] {
        let e = rel_err(got, &fx.f32(name));
        assert!(e < 1e-6, "{name} rel err {e}");
    }
}

/// Forward with the adapter merged into W equals forward with it separate.
#[test]
fn merged_forward_equals_unmerged_forward() {
    let mut rng = Rng::new(11);
    let shape = LoraShape::new(9, 37, 23, 5);
    let opts = LoraOptions::new(lora::rslora_scale(8.0, 5));
    let x: Vec<f32> = rng.vec(shape.x_len(), 1.0);
    let mut w: Vec<f32> = rng.vec(shape.w_len(), 1.0);
    let a: Vec<f32> = rng.vec(shape.a_len(), 1.0);
    let b: Vec<f32> = rng.vec(shape.b_len(), 1.0);
    let bias: Vec<f32> = rng.vec(shape.out_features, 1.0);
    let mut y = vec![0.0f32; shape.y_len()];
    let weights = LoraWeights {
        w: &w[..],
        a: &a[..],
        b: &b[..],
        bias: Some(&bias[..]),
    };
    cpu::forward(&shape, &opts, &x, weights, &mut y, None).unwrap();

    let w0 = w.clone();
    cpu::merge(&shape, opts.scale, &mut w, &a, &b).unwrap();
    let zero_b = vec![0.0f32; shape.b_len()];
    let mut y_merged = vec![0.0f32; shape.y_len()];
    let merged = LoraWeights {
        w: &w[..],
        a: &a[..],
        b: &zero_b[..],
        bias: Some(&bias[..]),
    };
    cpu::forward(&shape, &opts, &x, merged, &mut y_merged, None).unwrap();
    let e = rel_err(&y_merged, &y);
    assert!(e < 1e-6, "merged vs unmerged rel err {e}");

    cpu::unmerge(&shape, opts.scale, &mut w, &a, &b).unwrap();
    let e = rel_err(&w, &w0);
    assert!(e < 1e-6, "unmerge did not restore W: rel err {e}");
    assert_ne!(w, vec![0.0; w.len()]);
}

/// Under dropout, dropped inputs contribute nothing to the LoRA term and kept ones are
/// scaled by 1/(1-p): the oracle's forward equals a forward on an explicitly masked x.
#[test]
fn dropout_equals_explicit_mask() {
    let mut rng = Rng::new(5);
    let shape = LoraShape::new(6, 40, 12, 4);
    let d = Dropout::new(0.3, 77, 3);
    let opts = LoraOptions::new(2.0).with_dropout(d);
    let x: Vec<f32> = rng.vec(shape.x_len(), 1.0);
    let w: Vec<f32> = rng.vec(shape.w_len(), 1.0);
    let a: Vec<f32> = rng.vec(shape.a_len(), 1.0);
    let b: Vec<f32> = rng.vec(shape.b_len(), 1.0);
    let mut h = vec![0.0f32; shape.h_len()];
    let mut y = vec![0.0f32; shape.y_len()];
    cpu::forward(
        &shape,
        &opts,
        &x,
        LoraWeights {
            w: &w[..],
            a: &a[..],
            b: &b[..],
            bias: None,
        },
        &mut y,
        Some(&mut h),
    )
    .unwrap();

    let xm: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(e, v)| v * d.multiplier(e as u64))
        .collect();
    let dropped = (0..x.len()).filter(|&e| !d.keeps(e as u64)).count();
    assert!(dropped > 0 && dropped < x.len());
    let mut h2 = vec![0.0f32; shape.h_len()];
    let mut y2 = vec![0.0f32; shape.y_len()];
    let zero_w = vec![0.0f32; shape.w_len()];
    cpu::forward(
        &shape,
        &LoraOptions::new(2.0),
        &xm,
        LoraWeights {
            w: &zero_w[..],
            a: &a[..],
            b: &b[..],
            bias: None,
        },
        &mut y2,
        Some(&mut h2),
    )
    .unwrap();
    assert!(rel_err(&h, &h2) < 1e-6);
}

/// The tolerance really bites: a single wrong element is caught.
#[test]
#[should_panic(expected = "element 3")]
fn tolerance_catches_a_wrong_element() {
    let want = vec![bf16::from_f32(1.0); 8];
    let mag = want.clone();
    let mut got = want.clone();
    got[3] = bf16::from_f32(1.05);
    assert_close("probe", &got, &want, &mag, 64);
}

#[test]
fn bad_arguments_are_errors() {
    let shape = LoraShape::new(2, 8, 4, 2);
    let opts = LoraOptions::new(1.0);
    let v = |n: usize| vec![0.5f32; n];
    let (x, w, a, b) = (v(16), v(32), v(16), v(8));
    let mut y = v(8);
    let ok = LoraWeights {
        w: &w[..],
        a: &a[..],
        b: &b[..],
        bias: None,
    };
    assert!(cpu::forward(&shape, &opts, &x, ok, &mut y, None).is_ok());

    let err =
        |s: &LoraShape, o: &LoraOptions, x: &[f32], wts: LoraWeights<'_, [f32]>, y: &mut [f32]| {
            cpu::forward(s, o, x, wts, y, None).unwrap_err()
        };
    assert!(matches!(
        err(&LoraShape::new(2, 8, 4, 0), &opts, &x, ok, &mut y),
        Error::Dim { name: "rank", .. }
    ));
    assert!(matches!(
        err(&LoraShape::new(2, 8, 4, 257), &opts, &x, ok, &mut y),
        Error::Dim { name: "rank", .. }
    ));
    assert!(matches!(
        err(&LoraShape::new(0, 8, 4, 2), &opts, &x, ok, &mut y),
        Error::Dim { name: "tokens", .. }
    ));
    assert!(matches!(
        err(&shape, &opts, &x[..15], ok, &mut y),
        Error::Length {
            name: "x",
            expected: 16,
            actual: 15
        }
    ));
    let short_b = v(7);
    assert!(matches!(
        err(
            &shape,
            &opts,
            &x,
            LoraWeights {
                b: &short_b[..],
                ..ok
            },
            &mut y
        ),
        Error::Length { name: "b", .. }
    ));
    let bias = v(3);
    assert!(matches!(
        err(
            &shape,
            &opts,
            &x,
            LoraWeights {
                bias: Some(&bias[..]),
                ..ok
            },
            &mut y
        ),
        Error::Length { name: "bias", .. }
    ));
    assert!(matches!(
        err(&shape, &opts, &x, ok, &mut y[..7]),
        Error::Length { name: "y", .. }
    ));
    assert!(matches!(
        err(&shape, &LoraOptions::new(f32::NAN), &x, ok, &mut y),
        Error::Value { name: "scale", .. }
    ));
    let p1 = LoraOptions::new(1.0).with_dropout(Dropout::new(1.0, 0, 0));
    assert!(matches!(
        err(&shape, &p1, &x, ok, &mut y),
        Error::Value {
            name: "dropout.p",
            ..
        }
    ));
    let pneg = LoraOptions::new(1.0).with_dropout(Dropout::new(-0.1, 0, 0));
    assert!(matches!(
        err(&shape, &pneg, &x, ok, &mut y),
        Error::Value {
            name: "dropout.p",
            ..
        }
    ));
    // Messages name the problem.
    let msg = err(&shape, &opts, &x[..15], ok, &mut y).to_string();
    assert!(
        msg.contains("`x`") && msg.contains("16") && msg.contains("15"),
        "{msg}"
    );
}

#[test]
fn scale_helpers() {
    assert_eq!(lora::scale(16.0, 8), 2.0);
    assert_eq!(lora::rslora_scale(16.0, 16), 4.0);
}

#[test]
fn element_round_trips() {
    assert_eq!(bf16::from_f64(1.5).to_f64(), 1.5);
    assert_eq!(<f32 as Element>::from_f64(0.25), 0.25);
}
