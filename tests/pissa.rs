//! PiSSA against peft's own numbers (tests/fixtures/peer/peft_pissa_*: peft 0.21's
//! `init_lora_weights="pissa"` and its conversion to LoRA on save), and its argument
//! checks.

mod common;

use common::{rel_err, Fixture};
use lora_kernels::peft::{Adapter, AdapterConfig, AdapterModule};
use lora_kernels::{bf16, pissa, Error};

/// `s · B A` [N, K] in f64.
fn product(s: f64, a: &[f32], b: &[f32], n: usize, k: usize, r: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * k];
    for row in 0..n {
        for c in 0..k {
            let v: f64 = (0..r)
                .map(|j| b[row * r + j] as f64 * a[j * k + c] as f64)
                .sum();
            out[row * k + c] = (s * v) as f32;
        }
    }
    out
}

fn check_init(name: &str) {
    let f = Fixture::open(name);
    let (n, k, r) = (f.meta_usize("n"), f.meta_usize("k"), f.meta_usize("r"));
    let s = f.meta_f32("scaling");
    let w = f.f32("W");
    let got = pissa::init(&w, n, k, r, s).unwrap();
    let (a0, b0, w_res) = (f.f32("A0"), f.f32("B0"), f.f32("W_res"));
    // Each component equals peft's up to one sign shared by A's row and B's column.
    for j in 0..r {
        let row = |v: &[f32]| v[j * k..(j + 1) * k].to_vec();
        let col = |v: &[f32]| (0..n).map(|i| v[i * r + j]).collect::<Vec<f32>>();
        let (ga, pa, gb, pb) = (row(&got.a), row(&a0), col(&got.b), col(&b0));
        let sign = if ga.iter().zip(&pa).map(|(x, y)| x * y).sum::<f32>() < 0.0 {
            -1.0
        } else {
            1.0
        };
        let ga: Vec<f32> = ga.iter().map(|v| sign * v).collect();
        let gb: Vec<f32> = gb.iter().map(|v| sign * v).collect();
        assert!(
            rel_err(&ga, &pa) < 1e-4,
            "{name}: A row {j}: {}",
            rel_err(&ga, &pa)
        );
        assert!(
            rel_err(&gb, &pb) < 1e-4,
            "{name}: B column {j}: {}",
            rel_err(&gb, &pb)
        );
    }
    // Sign-free: the principal part and the residual.
    let ours = product(s as f64, &got.a, &got.b, n, k, r);
    let peft = product(s as f64, &a0, &b0, n, k, r);
    assert!(
        rel_err(&ours, &peft) < 1e-5,
        "{name}: s·BA {}",
        rel_err(&ours, &peft)
    );
    assert!(
        rel_err(&got.w_res, &w_res) < 1e-5,
        "{name}: W_res {}",
        rel_err(&got.w_res, &w_res)
    );
    // W_res + s·B A gives W back, and the singular values come in descending order.
    let back: Vec<f32> = got.w_res.iter().zip(&ours).map(|(x, y)| x + y).collect();
    assert!(rel_err(&back, &w) < 1e-6, "{name}: W_res + s·BA");
    assert!(got.singular_values.windows(2).all(|p| p[0] >= p[1]));
}

#[test]
fn init_matches_peft() {
    check_init("peft_pissa_48x80_r8.safetensors");
}

#[test]
fn init_matches_peft_rslora() {
    check_init("peft_pissa_48x80_r8_rslora.safetensors");
}

#[test]
fn init_in_bf16_is_the_f64_result_rounded() {
    let f = Fixture::open("peft_pissa_48x80_r8.safetensors");
    let (n, k, r, s) = (48, 80, 8, f.meta_f32("scaling"));
    let w: Vec<bf16> = f.f32("W").iter().map(|&v| bf16::from_f32(v)).collect();
    let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    let lo = pissa::init(&w, n, k, r, s).unwrap();
    let hi = pissa::init(&wf, n, k, r, s).unwrap();
    let a: Vec<f32> = lo.a.iter().map(|v| v.to_f32()).collect();
    let want: Vec<f32> = hi.a.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    assert!(rel_err(&a, &want) < 1e-2, "bf16 A {}", rel_err(&a, &want));
}

fn module(name: &str, r: usize, a: Vec<f32>, b: Vec<f32>, scale: f32) -> AdapterModule<f32> {
    AdapterModule {
        name: name.into(),
        rank: r,
        in_features: a.len() / r,
        out_features: b.len() / r,
        scale,
        a,
        b,
        magnitude: None,
    }
}

fn check_conversion(name: &str, rslora: bool) {
    let f = Fixture::open(name);
    let (r, s) = (f.meta_usize("r"), f.meta_f32("scaling"));
    let (a_conv, b_conv) = pissa::to_lora(
        r,
        f.meta_usize("k"),
        f.meta_usize("n"),
        (&f.f32("A"), &f.f32("B")),
        (&f.f32("A0"), &f.f32("B0")),
    )
    .unwrap();
    assert_eq!(a_conv, f.f32("A_conv"), "{name}: A'");
    assert_eq!(b_conv, f.f32("B_conv"), "{name}: B'");

    // The whole adapter: the config as peft writes it, the scale kept.
    let mut config = AdapterConfig::lora(r, f.meta_f32("alpha"), &["proj"]);
    config.use_rslora = rslora;
    let trained = Adapter {
        config: config.clone(),
        modules: vec![module("proj", r, f.f32("A"), f.f32("B"), s)],
    };
    let initial = Adapter {
        config,
        modules: vec![module("proj", r, f.f32("A0"), f.f32("B0"), s)],
    };
    let conv = pissa::to_lora_adapter(&trained, &initial).unwrap();
    assert_eq!(conv.config.r, f.meta_usize("conv_r"));
    assert!((conv.config.lora_alpha - f.meta_f32("conv_alpha")).abs() < 1e-5);
    assert_eq!(conv.modules[0].rank, 2 * r);
    assert!((conv.config.scale_for("proj") - s).abs() < 1e-5 * s);
    assert_eq!(conv.modules[0].a, a_conv);
    assert_eq!(conv.modules[0].b, b_conv);
}

#[test]
fn conversion_to_lora_matches_peft() {
    check_conversion("peft_pissa_48x80_r8.safetensors", false);
    check_conversion("peft_pissa_48x80_r8_rslora.safetensors", true);
}

#[test]
fn bad_arguments_are_errors() {
    let w = vec![1.0f32; 6 * 4];
    assert!(matches!(
        pissa::init(&w, 6, 4, 0, 1.0),
        Err(Error::Dim { name: "rank", .. })
    ));
    assert!(matches!(
        pissa::init(&w, 6, 4, 5, 1.0),
        Err(Error::Dim { name: "rank", .. })
    ));
    assert!(matches!(
        pissa::init(&w, 6, 5, 2, 1.0),
        Err(Error::Length { name: "w", .. })
    ));
    assert!(matches!(
        pissa::init(&w, usize::MAX, 2, 1, 1.0),
        Err(Error::Dim { .. })
    ));
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            pissa::init(&w, 6, 4, 2, bad),
            Err(Error::Value { name: "scale", .. })
        ));
    }
    let mut nan = w.clone();
    nan[7] = f32::NAN;
    match pissa::init(&nan, 6, 4, 2, 1.0) {
        Err(Error::Value {
            name: "w", value, ..
        }) => assert_eq!(value, 7.0),
        other => panic!("{other:?}"),
    }
    let a = vec![0f32; 2 * 4];
    let b = vec![0f32; 6 * 2];
    assert!(matches!(
        pissa::to_lora(2, 4, 6, (&a, &b), (&a[..7], &b)),
        Err(Error::Length { name: "a0", .. })
    ));
    assert!(matches!(
        pissa::to_lora(2, usize::MAX, 6, (&a, &b), (&a, &b)),
        Err(Error::Dim { .. })
    ));
}

#[test]
fn adapter_conversion_refuses_mismatched_modules() {
    let config = AdapterConfig::lora(2, 4.0, &["proj"]);
    let m = module("proj", 2, vec![0.0; 8], vec![0.0; 12], 2.0);
    let trained = Adapter {
        config: config.clone(),
        modules: vec![m.clone()],
    };
    let other = Adapter {
        config,
        modules: vec![module("other", 2, vec![0.0; 8], vec![0.0; 12], 2.0)],
    };
    assert!(matches!(
        pissa::to_lora_adapter(&trained, &other),
        Err(Error::Checkpoint(msg)) if msg.contains("proj")
    ));
}

/// W = X Yᵀ (rank 8, strong) + small noise: a clear gap after the 8th singular value.
fn gapped(n: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut rng = common::Rng::new(seed);
    let x: Vec<f32> = rng.vec(n * 8, 1.0);
    let y: Vec<f32> = rng.vec(k * 8, 1.0);
    let noise: Vec<f32> = rng.vec(n * k, 1e-3);
    (0..n * k)
        .map(|i| {
            let (row, c) = (i / k, i % k);
            (0..8).map(|j| x[row * 8 + j] * y[c * 8 + j]).sum::<f32>() + noise[i]
        })
        .collect()
}

fn frob(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn randomized_init_finds_the_principal_subspace() {
    let (n, k, r, s) = (60, 90, 8, 2.0);
    let w = gapped(n, k, 7);
    let exact = pissa::init(&w, n, k, r, s).unwrap();
    let fast = pissa::init_randomized(&w, n, k, r, s, 2, 42).unwrap();
    let p_exact = product(s as f64, &exact.a, &exact.b, n, k, r);
    let p_fast = product(s as f64, &fast.a, &fast.b, n, k, r);
    assert!(
        rel_err(&p_fast, &p_exact) < 1e-5,
        "s·BA {}",
        rel_err(&p_fast, &p_exact)
    );
    for (a, b) in fast.singular_values.iter().zip(&exact.singular_values) {
        assert!((a - b).abs() < 1e-6 * b, "singular values {a} vs {b}");
    }
    // Seeded: the same seed gives the same bits; another seed other bits, the same subspace.
    assert_eq!(pissa::init_randomized(&w, n, k, r, s, 2, 42).unwrap(), fast);
    let other = pissa::init_randomized(&w, n, k, r, s, 2, 43).unwrap();
    assert_ne!(other.a, fast.a);
    let p_other = product(s as f64, &other.a, &other.b, n, k, r);
    assert!(rel_err(&p_other, &p_exact) < 1e-5);
}

#[test]
fn randomized_init_on_a_flat_spectrum_nears_the_optimal_residual() {
    // peft's random nn.Linear weight: no gap, so more iterations are needed; the residual
    // can be no smaller than the exact one (Eckart–Young).
    let f = Fixture::open("peft_pissa_48x80_r8.safetensors");
    let (n, k, r, s) = (48, 80, 8, f.meta_f32("scaling"));
    let w = f.f32("W");
    let best = frob(&pissa::init(&w, n, k, r, s).unwrap().w_res);
    let few = frob(&pissa::init_randomized(&w, n, k, r, s, 1, 5).unwrap().w_res);
    let many = frob(&pissa::init_randomized(&w, n, k, r, s, 16, 5).unwrap().w_res);
    assert!(
        best <= many * (1.0 + 1e-6) && many <= few * (1.0 + 1e-6),
        "{best} {many} {few}"
    );
    assert!(
        many < best * 1.01,
        "16 iterations: {many} against the optimum {best}"
    );
}

#[test]
fn qpissa_quantizes_the_residual_with_less_error_than_qlora() {
    for (name, w, n, k, factor) in [
        ("gapped", gapped(64, 128, 9), 64, 128, 0.2),
        (
            "peft's random weight",
            Fixture::open("peft_pissa_48x80_r8.safetensors").f32("W"),
            48,
            80,
            1.0,
        ),
    ] {
        let (r, s) = (8, 2.0);
        let init = pissa::init(&w, n, k, r, s).unwrap();
        let q = pissa::quantize_residual(&w, n, k, s, init.clone(), 64, true).unwrap();
        eprintln!(
            "{name}: relative NF4 error, QLoRA {:.5}, QPiSSA {:.5}",
            q.qlora_error, q.qpissa_error
        );
        assert!(
            q.qpissa_error < factor * q.qlora_error,
            "{name}: QPiSSA {} vs QLoRA {}",
            q.qpissa_error,
            q.qlora_error
        );
        // The reported error is the reconstruction's: deq(W_res) + s·B A against W.
        let deq = q.w_res_nf4.dequantize::<f32>().unwrap();
        let ba = product(s as f64, &init.a, &init.b, n, k, r);
        let recon: Vec<f32> = deq.iter().zip(&ba).map(|(d, p)| d + p).collect();
        let err = rel_err(&recon, &w);
        assert!(
            (err - q.qpissa_error).abs() < 1e-4 * q.qpissa_error.max(1e-12) + 1e-7,
            "{name}: {err} vs {}",
            q.qpissa_error
        );
        assert_eq!(q.init, init);
    }
}
