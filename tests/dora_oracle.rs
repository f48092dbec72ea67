//! The DoRA CPU oracle against peft's outputs and against identities it must satisfy.

mod common;

use common::{rel_err, Fixture, Rng};
use lora_kernels::cpu::{dora as cpu, lora as cpu_lora};
use lora_kernels::{
    lora, DoraGrads, DoraOutputs, DoraSaved, DoraWeights, Dropout, Error, LoraOptions, LoraShape,
    LoraWeights,
};

struct Case {
    shape: LoraShape,
    x: Vec<f32>,
    w: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    bias: Option<Vec<f32>>,
    m: Vec<f32>,
}

impl Case {
    fn random(seed: u64, shape: LoraShape, bias: bool) -> Case {
        let mut rng = Rng::new(seed);
        let w: Vec<f32> = rng.vec(shape.w_len(), 1.0);
        Case {
            x: rng.vec(shape.x_len(), 1.0),
            a: rng.vec(shape.a_len(), 0.5),
            b: rng.vec(shape.b_len(), 0.5),
            bias: bias.then(|| rng.vec(shape.out_features, 1.0)),
            m: rng
                .vec::<f32>(shape.out_features, 1.0)
                .iter()
                .map(|v| 2.0 + v)
                .collect(),
            w,
            shape,
        }
    }
    fn weights(&self) -> DoraWeights<'_, [f32]> {
        DoraWeights {
            w: &self.w[..],
            a: &self.a[..],
            b: &self.b[..],
            bias: self.bias.as_deref(),
            magnitude: &self.m[..],
        }
    }
    /// y, h, norm, z.
    fn forward(&self, opts: &LoraOptions) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let s = &self.shape;
        let mut y = vec![0.0f32; s.y_len()];
        let mut h = vec![0.0f32; s.h_len()];
        let mut norm = vec![0.0f32; s.out_features];
        let mut z = vec![0.0f32; s.y_len()];
        let out = DoraOutputs {
            y: &mut y[..],
            h: Some(&mut h[..]),
            norm: Some(&mut norm[..]),
            z: Some(&mut z[..]),
        };
        cpu::forward(s, opts, &self.x, self.weights(), out).unwrap();
        (y, h, norm, z)
    }
    /// dx, dA, dB, dm (z recomputed when `use_z` is false).
    fn backward(&self, opts: &LoraOptions, dy: &[f32], use_z: bool) -> [Vec<f32>; 4] {
        let s = &self.shape;
        let (_, h, norm, z) = self.forward(opts);
        let mut g = [
            vec![0.0f32; s.x_len()],
            vec![0.0f32; s.a_len()],
            vec![0.0f32; s.b_len()],
            vec![0.0f32; s.out_features],
        ];
        let [dx, da, db, dm] = &mut g;
        let saved = DoraSaved {
            h: &h[..],
            norm: &norm[..],
            z: use_z.then_some(&z[..]),
        };
        let grads = DoraGrads {
            dx: &mut dx[..],
            da: &mut da[..],
            db: &mut db[..],
            dm: &mut dm[..],
        };
        cpu::backward(s, opts, &self.x, self.weights(), saved, dy, grads).unwrap();
        g
    }
}

#[test]
fn oracle_matches_peft_dora_fixture() {
    let fx = Fixture::open("peft_dora_48x80_r8.safetensors");
    let shape = LoraShape::new(
        fx.meta_usize("T"),
        fx.meta_usize("k"),
        fx.meta_usize("n"),
        fx.meta_usize("r"),
    );
    let scale = fx.meta_f32("scaling");
    assert_eq!(scale, lora::scale(fx.meta_f32("alpha"), shape.rank));
    let case = Case {
        shape,
        x: fx.f32("x"),
        w: fx.f32("W"),
        a: fx.f32("A"),
        b: fx.f32("B"),
        bias: None,
        m: fx.f32("magnitude"),
    };
    let opts = LoraOptions::new(scale);
    let (y, _, _, _) = case.forward(&opts);
    let e = rel_err(&y, &fx.f32("y"));
    assert!(e < 1e-6, "y rel err {e}");
    for use_z in [true, false] {
        let g = case.backward(&opts, &fx.f32("dy"), use_z);
        for (name, got) in ["dx", "dA", "dB", "dmagnitude"].iter().zip(&g) {
            let e = rel_err(got, &fx.f32(name));
            assert!(e < 1e-6, "{name} rel err {e} (z saved: {use_z})");
        }
    }
}

/// The fixture's B is nonzero, so its magnitude is not the init; with B = 0, peft's
/// init gives m = ‖W‖ and the layer equals the base layer exactly.
#[test]
fn magnitude_init_makes_the_layer_the_base_layer() {
    let shape = LoraShape::new(5, 33, 19, 4);
    let mut case = Case::random(3, shape, true);
    case.b.iter_mut().for_each(|v| *v = 0.0);
    cpu::magnitude_init(&shape, 2.0, &case.w, &case.a, &case.b, &mut case.m).unwrap();
    for o in 0..shape.out_features {
        let row = &case.w[o * 33..(o + 1) * 33];
        let want = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        assert!((case.m[o] as f64 - want).abs() <= 1e-6 * want);
    }
    let opts = LoraOptions::new(2.0);
    let (y, _, _, _) = case.forward(&opts);
    let mut base = vec![0.0f32; shape.y_len()];
    let lw = LoraWeights {
        w: &case.w[..],
        a: &case.a[..],
        b: &case.b[..],
        bias: case.bias.as_deref(),
    };
    cpu_lora::forward(&shape, &opts, &case.x, lw, &mut base, None).unwrap();
    assert!(rel_err(&y, &base) < 1e-6);
}

/// The norm is taken from the elements of W + s·BA, so it stays right where the
/// expanded square ‖W‖² + 2s⟨W,BA⟩ + s²‖BA‖² would cancel (s·BA ≈ −W).
#[test]
fn norm_is_exact_when_the_adapter_cancels_w() {
    let shape = LoraShape::new(1, 64, 3, 1);
    // W row o = −s · B[o] · A + tiny residual d.
    let a: Vec<f32> = (0..64).map(|c| 1.0 + c as f32 / 64.0).collect();
    let b = vec![1.0f32, 2.0, 4.0];
    let s = 0.5f32;
    let d = 1e-3f32;
    let w: Vec<f32> = (0..3 * 64)
        .map(|e| {
            let (o, c) = (e / 64, e % 64);
            -s * b[o] * a[c] + if c == 0 { d } else { 0.0 }
        })
        .collect();
    let mut norm = vec![0.0f32; 3];
    cpu::weight_norm(&shape, s, &w, &a, &b, &mut norm).unwrap();
    for (o, v) in norm.iter().enumerate() {
        // The representable residual of row o: w[c] + s·b·a[c] in f64.
        let want = (0..64)
            .map(|c| (w[o * 64 + c] as f64 + s as f64 * b[o] as f64 * a[c] as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(want > 0.5e-3 && want < 2e-3, "residual {want}");
        assert!(
            (*v as f64 - want).abs() <= 1e-6 * want,
            "row {o}: {v} vs {want}"
        );
    }
}

/// Merging then running the plain base layer equals the DoRA forward; unmerge restores
/// W.
#[test]
fn merge_equals_forward_and_unmerge_restores() {
    let shape = LoraShape::new(6, 29, 17, 3);
    let case = Case::random(5, shape, true);
    let opts = LoraOptions::new(lora::rslora_scale(6.0, 3));
    let (y, _, _, _) = case.forward(&opts);
    let mut w = case.w.clone();
    let mut norm = vec![0.0f32; 17];
    cpu::merge(
        &shape, opts.scale, &mut w, &case.a, &case.b, &case.m, &mut norm,
    )
    .unwrap();
    let zero_b = vec![0.0f32; shape.b_len()];
    let lw = LoraWeights {
        w: &w[..],
        a: &case.a[..],
        b: &zero_b[..],
        bias: case.bias.as_deref(),
    };
    let mut merged = vec![0.0f32; shape.y_len()];
    cpu_lora::forward(&shape, &opts, &case.x, lw, &mut merged, None).unwrap();
    assert!(rel_err(&merged, &y) < 1e-6);
    cpu::unmerge(&shape, opts.scale, &mut w, &case.a, &case.b, &case.m, &norm).unwrap();
    assert!(rel_err(&w, &case.w) < 1e-6);
}

/// With p = 0 the dropout formula reduces to y = g ⊙ (x Wᵀ + s·h Bᵀ) + b.
#[test]
fn zero_dropout_is_the_plain_formula() {
    let shape = LoraShape::new(4, 21, 11, 3);
    let case = Case::random(8, shape, true);
    let plain = case.forward(&LoraOptions::new(1.5));
    let p0 = case.forward(&LoraOptions::new(1.5).with_dropout(Dropout::new(0.0, 1, 2)));
    assert_eq!(plain.0, p0.0);
}

/// Under dropout, y has peft's form: y = base(x) + (g − 1) ⊙ x_d Wᵀ + g·s·h Bᵀ, and
/// dx and dm match central differences of the forward (the norm does not depend on x
/// or m, so the detached gradient is the full one for them).
#[test]
#[allow(clippy::needless_range_loop)]
fn dropout_gradients_match_finite_differences() {
    let shape = LoraShape::new(3, 10, 7, 2);
    let case = Case::random(21, shape, true);
    let opts = LoraOptions::new(2.0).with_dropout(Dropout::new(0.3, 77, 5));
    let mut rng = Rng::new(4);
    let dy: Vec<f32> = rng.vec(shape.y_len(), 1.0);
    let [dx, _, _, dm] = case.backward(&opts, &dy, false);
    let loss = |c: &Case| -> f64 {
        let (y, _, _, _) = c.forward(&opts);
        y.iter().zip(&dy).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let step = 1e-2f32;
    for i in 0..shape.x_len() {
        let (mut up, mut dn) = (clone(&case), clone(&case));
        up.x[i] += step;
        dn.x[i] -= step;
        let fd = (loss(&up) - loss(&dn)) / (2.0 * step as f64);
        assert!(
            (fd - dx[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
            "dx[{i}]: {fd} vs {}",
            dx[i]
        );
    }
    for o in 0..shape.out_features {
        let (mut up, mut dn) = (clone(&case), clone(&case));
        up.m[o] += step;
        dn.m[o] -= step;
        let fd = (loss(&up) - loss(&dn)) / (2.0 * step as f64);
        assert!(
            (fd - dm[o] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
            "dm[{o}]: {fd} vs {}",
            dm[o]
        );
    }
    // Some element was dropped and some kept (the case exercises both branches).
    let d = opts.active_dropout().unwrap();
    let kept = (0..shape.x_len() as u64).filter(|&e| d.keeps(e)).count();
    assert!(kept > 0 && kept < shape.x_len());
}

fn clone(c: &Case) -> Case {
    Case {
        shape: c.shape,
        x: c.x.clone(),
        w: c.w.clone(),
        a: c.a.clone(),
        b: c.b.clone(),
        bias: c.bias.clone(),
        m: c.m.clone(),
    }
}

#[test]
fn bad_arguments_are_errors() {
    let shape = LoraShape::new(2, 8, 4, 2);
    let case = Case::random(1, shape, false);
    let opts = LoraOptions::new(1.0);
    let mut y = vec![0.0f32; shape.y_len()];
    let short_m = [1.0f32; 3];
    let mut w = case.weights();
    w.magnitude = &short_m[..];
    let err = cpu::forward(&shape, &opts, &case.x, w, DoraOutputs::y(&mut y[..])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Length {
                name: "magnitude",
                ..
            }
        ),
        "{err}"
    );
    let bad_rank = LoraShape::new(2, 8, 4, 0);
    let err = cpu::forward(
        &bad_rank,
        &opts,
        &case.x,
        case.weights(),
        DoraOutputs::y(&mut y[..]),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Dim { name: "rank", .. }), "{err}");
    let mut norm = vec![0.0f32; 5];
    let err = cpu::weight_norm(&shape, 1.0, &case.w, &case.a, &case.b, &mut norm).unwrap_err();
    assert!(matches!(err, Error::Length { name: "norm", .. }), "{err}");
    let err = cpu::forward(
        &shape,
        &LoraOptions::new(f32::NAN),
        &case.x,
        case.weights(),
        DoraOutputs::y(&mut y[..]),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Value { name: "scale", .. }), "{err}");
}

/// QDoRA's oracle: with B = 0 and m from its own magnitude init, the layer is the NF4
/// base layer (`x deq(W)ᵀ + bias`); a base of the wrong size is an error.
#[test]
fn qdora_oracle_at_init_is_the_nf4_base_layer() {
    use lora_kernels::cpu::{nf4 as cpu_nf4, qdora};
    use lora_kernels::Nf4Weight;
    let shape = LoraShape::new(6, 128, 24, 4);
    let mut rng = Rng::new(77);
    let wd: Vec<f32> = rng.vec(shape.w_len(), 1.0);
    let q = Nf4Weight::quantize(&wd, 24, 128, 64, true).unwrap();
    let (x, a): (Vec<f32>, Vec<f32>) = (rng.vec(shape.x_len(), 1.0), rng.vec(shape.a_len(), 1.0));
    let bias: Vec<f32> = rng.vec(24, 1.0);
    let b = vec![0.0f32; shape.b_len()];
    let mut m = vec![0.0f32; 24];
    qdora::magnitude_init(&shape, 2.0, &q, &a, &b, &mut m).unwrap();
    let mut y = vec![0.0f32; shape.y_len()];
    let weights = DoraWeights {
        w: &q,
        a: &a[..],
        b: &b[..],
        bias: Some(&bias[..]),
        magnitude: &m[..],
    };
    qdora::forward(
        &shape,
        &LoraOptions::new(2.0),
        &x,
        weights,
        DoraOutputs::y(&mut y[..]),
    )
    .unwrap();
    let mut base = vec![0.0f32; shape.y_len()];
    cpu_nf4::matmul(6, &x, &q, Some(&bias), &mut base).unwrap();
    let e = rel_err(&y, &base);
    assert!(e < 1e-6, "rel err {e}");
    let q9 = Nf4Weight::quantize(&vec![0.5f32; 25 * 128], 25, 128, 64, false).unwrap();
    let e = qdora::forward(
        &shape,
        &LoraOptions::new(2.0),
        &x,
        DoraWeights { w: &q9, ..weights },
        DoraOutputs::y(&mut y[..]),
    )
    .unwrap_err();
    assert!(
        matches!(e, lora_kernels::Error::Dim { name: "w.rows", .. }),
        "{e}"
    );
}
