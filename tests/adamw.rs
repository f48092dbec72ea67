//! The AdamW oracle (`lora_kernels::cpu::adamw`): against torch.optim.AdamW (the fixture
//! tests/fixtures/adamw_torch.safetensors, made by scripts/make_adamw_fixture.py) and
//! against the exact math, both within an error bound derived below; the options (LoRA+
//! multipliers, the decay switch, gradient types, copies); and the argument checks, which
//! must leave every buffer unchanged.
//!
//! ## The tolerance
//! Both the oracle and torch evaluate the same f32 formula (src/adamw.rs) with the same
//! f32 constants, an operation at a time, each rounding with relative error at most
//! u = 2^-24 (plus an absolute 2^-149 in the subnormal range). They may differ in
//! whether the lerp and `v`'s update are fused into one fma and whether the division by
//! `b2` is a multiplication by its reciprocal, so a bound that holds for every such
//! choice covers both. [`Exact`] runs the recurrence in exact arithmetic (f64, whose own
//! error, ~1e-16 relative, is negligible) from the same f32 inputs and constants, and
//! carries first-order bounds on how far any such f32 evaluation can be from it:
//!
//! - `m`: `m' = m + w (g − m)`: the difference `g − m` and the product (or none, fused)
//!   round, each ≤ u·|g − m| after the factor w ≤ 1, the sum rounds ≤ u·|m'|; an error
//!   δ in m carries over as (1 − w)·δ. So `bm' = (1 − w)·bm + 2u·|g − m| + u·|m'|`.
//! - `v`: every term is ≥ 0, so its error is relative: `β2·v` adds one rounding to v's
//!   own error, `(c2·g)·g` two, the sum one: `ev' = max(ev + u, 2u) + u`.
//! - `d = √v / b2 + eps`: the square root halves v's relative error and rounds, the
//!   division rounds once (twice as a reciprocal product), the sum of two positive terms
//!   once: relative `ed = ev'/2 + 4u`.
//! - `q = (−s·m') / d`: `bq = s·bm'/d + |q|·(ed + 2u)` (the product and the quotient
//!   round once each).
//! - `θ' = θ·decay + q`: `bθ' = decay·bθ + u·|θ·decay| + bq + u·|θ'|`.
//!
//! Each implementation is within `bθ` (`bm`, `ev·v`) of the exact value, so the two are
//! within twice that of each other. Second-order terms (a first-order term times another
//! relative error, at most 3u per step: below 1e-5 of it over these runs' 20 steps or
//! fewer) are covered by a factor 1.001.
//! [`tolerance_catches_a_wrong_step`] shows that the bound is tight enough to catch a
//! wrong step count or a misplaced weight decay.

mod common;

use common::Rng;
use lora_kernels::adamw::{AdamW, TensorOptions};
use lora_kernels::cpu::adamw::{step, ParamCopy, Tensor};
use lora_kernels::{bf16, f16, Element, Error};

/// Unit roundoff of f32.
const U: f64 = 1.0 / 16_777_216.0;
/// f32's smallest subnormal: a rounding in the subnormal range errs by at most half.
const TINY: f64 = 1.401_298_464_324_817e-45;
/// Covers the second-order terms of the first-order bounds.
const SECOND_ORDER: f64 = 1.001;

/// The f32 constants of one tensor at one step, as exact numbers (torch's recipe:
/// computed in f64, rounded to f32 once).
#[derive(Clone, Copy, Debug)]
struct Consts {
    w: f64,
    beta2: f64,
    c2: f64,
    b2: f64,
    eps: f64,
    decay: f64,
    s: f64,
}

impl Consts {
    fn new(opt: &AdamW, t: u64, o: &TensorOptions) -> Consts {
        let f = |x: f64| x as f32 as f64;
        let lr = opt.lr * o.lr_scale;
        let wd = if o.weight_decay {
            opt.weight_decay
        } else {
            0.0
        };
        Consts {
            w: f(1.0 - opt.beta1),
            beta2: f(opt.beta2),
            c2: f(1.0 - opt.beta2),
            b2: f((1.0 - opt.beta2.powf(t as f64)).powf(0.5)),
            eps: f(opt.eps),
            decay: f(1.0 - lr * wd),
            s: f(lr / (1.0 - opt.beta1.powf(t as f64))),
        }
    }
}

/// One element's exact trajectory and the bounds of the module doc.
#[derive(Clone, Copy, Debug, Default)]
struct Exact {
    p: f64,
    m: f64,
    v: f64,
    bp: f64,
    bm: f64,
    ev: f64,
}

impl Exact {
    fn start(p: f32) -> Exact {
        Exact {
            p: p as f64,
            ..Exact::default()
        }
    }

    fn step(&mut self, c: &Consts, g: f64) {
        let pd = self.p * c.decay;
        let d = g - self.m;
        let m = self.m + c.w * d;
        let bm = (1.0 - c.w).abs() * self.bm + 2.0 * U * d.abs() + U * m.abs() + 3.0 * TINY;
        let v = c.beta2 * self.v + c.c2 * g * g;
        let ev = (self.ev + U).max(2.0 * U) + U;
        let den = v.sqrt() / c.b2 + c.eps;
        let ed = ev / 2.0 + 4.0 * U;
        let q = -c.s * m / den;
        let bq = c.s * bm / den + q.abs() * (ed + 2.0 * U) + 2.0 * TINY;
        let p = pd + q;
        let bp = c.decay.abs() * self.bp + U * pd.abs() + bq + U * p.abs() + 2.0 * TINY;
        *self = Exact {
            p,
            m,
            v,
            bp,
            bm,
            ev,
        };
    }

    /// The bounds on |f32 − exact| of θ, m and v (with the second-order factor).
    fn bounds(&self) -> (f64, f64, f64) {
        (
            SECOND_ORDER * self.bp,
            SECOND_ORDER * self.bm,
            SECOND_ORDER * (self.ev * self.v + 3.0 * TINY),
        )
    }
}

/// The largest `|a − b| / bound` over the elements (NaN counts as infinitely far).
fn worst(a: &[f32], b: &[f64], bound: impl Fn(usize) -> f64) -> (f64, usize) {
    let mut w = (0.0f64, 0usize);
    for i in 0..a.len() {
        let e = (a[i] as f64 - b[i]).abs();
        let r = if e.is_nan() {
            f64::INFINITY
        } else if e == 0.0 {
            0.0
        } else {
            e / bound(i)
        };
        if r > w.0 {
            w = (r, i);
        }
    }
    w
}

// ---- the torch fixture -----------------------------------------------------------

struct TorchRun {
    opt: AdamW,
    ratio: f64,
    steps: u64,
    sizes: Vec<usize>,
    tensors: std::collections::HashMap<String, Vec<f32>>,
}

/// The fixture: in `$LORA_KERNELS_FIXTURES` if it is there (the GPU bundle's folder,
/// scripts/gpu-bundle.sh), else in the repository's tests/fixtures.
fn fixture_bytes() -> Vec<u8> {
    const NAME: &str = "adamw_torch.safetensors";
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dirs: Vec<std::path::PathBuf> = std::env::var_os("LORA_KERNELS_FIXTURES")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain([repo])
        .collect();
    for d in &dirs {
        if let Ok(b) = std::fs::read(d.join(NAME)) {
            return b;
        }
    }
    panic!(
        "{NAME} is in none of {dirs:?} (made by scripts/make_adamw_fixture.py; shipped in \
         the repository's tests/fixtures)"
    )
}

fn torch_run() -> TorchRun {
    let bytes = fixture_bytes();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["meta"]).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, v)
        })
        .collect();
    let f = |k: &str| meta[k].as_f64().unwrap_or_else(|| panic!("meta.{k}"));
    let run = TorchRun {
        opt: AdamW {
            lr: f("lr"),
            beta1: f("beta1"),
            beta2: f("beta2"),
            eps: f("eps"),
            weight_decay: f("weight_decay"),
        },
        ratio: f("ratio"),
        steps: meta["steps"].as_u64().unwrap(),
        sizes: meta["sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect(),
        tensors,
    };
    // The fixture's groups are the ones `options` describes.
    let lrs: Vec<f64> = meta["group_lr"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let wds: Vec<f64> = meta["group_weight_decay"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (i, o) in run.options().iter().enumerate() {
        assert_eq!(lrs[i], run.opt.lr * o.lr_scale, "group {i}'s lr");
        let wd = if o.weight_decay {
            run.opt.weight_decay
        } else {
            0.0
        };
        assert_eq!(wds[i], wd, "group {i}'s weight_decay");
    }
    run
}

impl TorchRun {
    /// The fixture's groups: A (lr), B (lr · ratio), B without weight decay.
    fn options(&self) -> [TensorOptions; 3] {
        [
            TensorOptions::new(1.0),
            TensorOptions::new(self.ratio),
            TensorOptions::new(self.ratio).no_weight_decay(),
        ]
    }

    fn get(&self, name: &str) -> &[f32] {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture tensor {name}"))
    }
}

/// The oracle over the fixture's steps, with `options` and the step numbers shifted by
/// `t_shift`: (params after each step, final m, final v) per tensor.
#[allow(clippy::type_complexity)]
fn oracle_run(
    run: &TorchRun,
    options: &[TensorOptions; 3],
    t_shift: u64,
) -> (Vec<Vec<Vec<f32>>>, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let n = run.sizes.len();
    let mut p: Vec<Vec<f32>> = (0..n)
        .map(|i| run.get(&format!("p0_{i}")).to_vec())
        .collect();
    let mut m: Vec<Vec<f32>> = run.sizes.iter().map(|&s| vec![0.0; s]).collect();
    let mut v = m.clone();
    let mut after = vec![];
    for s in 1..=run.steps {
        let grads: Vec<&[f32]> = (0..n).map(|i| run.get(&format!("g{s}_{i}"))).collect();
        let mut list: Vec<Tensor<'_, f32>> = p
            .iter_mut()
            .zip(&mut m)
            .zip(&mut v)
            .zip(&grads)
            .zip(options)
            .map(|((((p, m), v), g), o)| Tensor::new(p, m, v, g).with_options(*o))
            .collect();
        step(&run.opt, s + t_shift, &mut list).unwrap();
        after.push(p.clone());
    }
    (after, m, v)
}

/// The exact trajectories of the fixture's elements, per tensor.
fn exact_run(run: &TorchRun) -> Vec<Vec<Vec<Exact>>> {
    let options = run.options();
    (0..run.sizes.len())
        .map(|i| {
            let mut e: Vec<Exact> = run
                .get(&format!("p0_{i}"))
                .iter()
                .map(|&p| Exact::start(p))
                .collect();
            let mut steps = vec![];
            for s in 1..=run.steps {
                let c = Consts::new(&run.opt, s, &options[i]);
                for (x, &g) in e.iter_mut().zip(run.get(&format!("g{s}_{i}"))) {
                    x.step(&c, g as f64);
                }
                steps.push(e.clone());
            }
            steps
        })
        .collect()
}

#[test]
fn matches_torch_within_derived_bound() {
    let run = torch_run();
    let exact = exact_run(&run);
    let (after, m, v) = oracle_run(&run, &run.options(), 0);
    let (mut same_bits, mut total, mut worst_ratio) = (0usize, 0usize, 0.0f64);
    for (i, &size) in run.sizes.iter().enumerate() {
        for s in 1..=run.steps as usize {
            let e = &exact[i][s - 1];
            let ours = &after[s - 1][i];
            let torch = run.get(&format!("p{s}_{i}"));
            let ex: Vec<f64> = e.iter().map(|x| x.p).collect();
            let bound = |j: usize| e[j].bounds().0;
            let what = format!("tensor {i} ({size} elements), θ after step {s}");
            for (who, got) in [("oracle", &ours[..]), ("torch", torch)] {
                let (r, j) = worst(got, &ex, bound);
                assert!(
                    r <= 1.0,
                    "{what}: {who} {} vs exact {} at element {j}: {r:.2} × the bound {:.3e}",
                    got[j],
                    ex[j],
                    bound(j)
                );
            }
            let torch64: Vec<f64> = torch.iter().map(|&x| x as f64).collect();
            let (r, j) = worst(ours, &torch64, |j| 2.0 * bound(j));
            assert!(
                r <= 1.0,
                "{what}: oracle {} vs torch {} at element {j}: {r:.2} × the bound",
                ours[j],
                torch[j]
            );
            worst_ratio = worst_ratio.max(r);
            same_bits += ours
                .iter()
                .zip(torch)
                .filter(|(a, b)| a.to_bits() == b.to_bits())
                .count();
            total += size;
        }
        let e = &exact[i][run.steps as usize - 1];
        for (name, ours, pick, which) in [
            ("m", &m[i], (|x: &Exact| x.m) as fn(&Exact) -> f64, 1),
            ("v", &v[i], |x: &Exact| x.v, 2),
        ] {
            let torch = run.get(&format!("{name}{}_{i}", run.steps));
            let ex: Vec<f64> = e.iter().map(pick).collect();
            let bound = |j: usize| {
                let b = e[j].bounds();
                [b.0, b.1, b.2][which]
            };
            for (who, got) in [("oracle", &ours[..]), ("torch", torch)] {
                let (r, j) = worst(got, &ex, bound);
                assert!(
                    r <= 1.0,
                    "tensor {i}: {who}'s {name} at element {j}: {r:.2} × the bound"
                );
            }
            let torch64: Vec<f64> = torch.iter().map(|&x| x as f64).collect();
            let (r, j) = worst(ours, &torch64, |j| 2.0 * bound(j));
            assert!(
                r <= 1.0,
                "tensor {i}: {name} at element {j}: oracle {} vs torch {}",
                ours[j],
                torch[j]
            );
        }
    }
    eprintln!(
        "adamw vs torch: {same_bits} of {total} parameter values bit-equal; the largest \
         difference is {worst_ratio:.3} × the derived bound"
    );
}

#[test]
fn tolerance_catches_a_wrong_step() {
    // A misplaced weight decay (tensor 2's group has none) or a step counter off by one
    // must fail the comparison with torch: the bound is not vacuous.
    let run = torch_run();
    let exact = exact_run(&run);
    let mut wrong = run.options();
    wrong[2].weight_decay = true;
    for (what, options, shift) in [
        ("weight decay on tensor 2", wrong, 0),
        ("step counter + 1", run.options(), 1),
    ] {
        let (after, _, _) = oracle_run(&run, &options, shift);
        let last = run.steps as usize;
        let mut caught = false;
        for i in 0..run.sizes.len() {
            let e = &exact[i][last - 1];
            let torch: Vec<f64> = run
                .get(&format!("p{last}_{i}"))
                .iter()
                .map(|&x| x as f64)
                .collect();
            let (r, _) = worst(&after[last - 1][i], &torch, |j| 2.0 * e[j].bounds().0);
            caught |= r > 1.0;
        }
        assert!(caught, "{what}: not caught by the tolerance");
    }
}

// ---- the exact math, any hyper-parameters ------------------------------------------

/// 20 steps on random data with gradients of three scales, against the exact recurrence.
fn against_exact<G: Element>(opt: AdamW, options: TensorOptions, seed: u64) {
    let n = 333;
    let mut rng = Rng::new(seed);
    let mut p: Vec<f32> = rng.vec(n, 1.0);
    let mut e: Vec<Exact> = p.iter().map(|&x| Exact::start(x)).collect();
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    for t in 1..=20u64 {
        let g: Vec<G> = (0..n)
            .map(|i| {
                let scale = [1.0, 1e-3, 1e-8][i % 3];
                G::from_f64(rng.uniform() * scale)
            })
            .collect();
        step(
            &opt,
            t,
            &mut [Tensor::new(&mut p, &mut m, &mut v, &g).with_options(options)],
        )
        .unwrap();
        let c = Consts::new(&opt, t, &options);
        for (x, gi) in e.iter_mut().zip(&g) {
            x.step(&c, gi.to_f64());
        }
        for (name, got, want, which) in [
            ("θ", &p, (|x: &Exact| x.p) as fn(&Exact) -> f64, 0),
            ("m", &m, |x: &Exact| x.m, 1),
            ("v", &v, |x: &Exact| x.v, 2),
        ] {
            let ex: Vec<f64> = e.iter().map(want).collect();
            let (r, j) = worst(got, &ex, |j| {
                let b = e[j].bounds();
                [b.0, b.1, b.2][which]
            });
            assert!(
                r <= 1.0,
                "{opt:?} {options:?} {:?}, step {t}: {name}[{j}] = {} vs exact {}: {r:.2} × the bound",
                G::DTYPE,
                got[j],
                ex[j]
            );
        }
    }
}

#[test]
fn matches_exact_math_within_derived_bound() {
    let d = AdamW::default();
    against_exact::<f32>(d, TensorOptions::default(), 1);
    against_exact::<bf16>(d, TensorOptions::new(16.0), 2);
    against_exact::<f16>(d, TensorOptions::new(0.5).no_weight_decay(), 3);
    // beta1 < 0.5: torch's lerp from the other end; beta1 = 0 (m = g), beta2 = 0 (v = g²).
    let odd = AdamW {
        lr: 3e-2,
        beta1: 0.3,
        beta2: 0.6,
        eps: 1e-6,
        weight_decay: 0.5,
    };
    against_exact::<f32>(odd, TensorOptions::new(2.0), 4);
    let zero = AdamW {
        beta1: 0.0,
        beta2: 0.0,
        ..d
    };
    against_exact::<f32>(zero, TensorOptions::default(), 5);
}

#[test]
fn first_step_moves_by_the_learning_rate() {
    // t = 1 from zero moments: m̂ = g, v̂ = g², so θ moves by lr · g / (|g| + eps).
    let opt = AdamW {
        weight_decay: 0.0,
        ..AdamW::default()
    };
    let mut p = vec![0.5f32, -0.25, 1.0, 0.0];
    let g = vec![0.1f32, -3.0, 1e-8, 0.0];
    let (mut m, mut v) = (vec![0f32; 4], vec![0f32; 4]);
    let p0 = p.clone();
    step(&opt, 1, &mut [Tensor::new(&mut p, &mut m, &mut v, &g)]).unwrap();
    for i in 0..4 {
        let gi = g[i] as f64;
        let want = p0[i] as f64 - 1e-3 * gi / (gi.abs() + 1e-8);
        assert!(
            (p[i] as f64 - want).abs() <= 4.0 * U * (p0[i].abs() as f64 + 1e-3),
            "element {i}: {} vs {want}",
            p[i]
        );
    }
    assert_eq!(p[3], 0.0, "no gradient, no decay: no move");
}

// ---- options, types, copies ---------------------------------------------------------

fn random_state(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let p = rng.vec::<f32>(n, 1.0);
    let m = rng.vec::<f32>(n, 1e-2);
    let v: Vec<f32> = rng.vec::<f32>(n, 1e-4).iter().map(|x| x.abs()).collect();
    let g = rng.vec::<f32>(n, 1e-2);
    (p, m, v, g)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn lr_scale_and_decay_switch_are_their_torch_groups() {
    let base = AdamW {
        lr: 2e-4,
        ..AdamW::default()
    };
    for (options, group) in [
        (
            TensorOptions::new(16.0),
            AdamW {
                lr: 2e-4 * 16.0,
                ..base
            },
        ),
        (
            TensorOptions::new(1.0).no_weight_decay(),
            AdamW {
                weight_decay: 0.0,
                ..base
            },
        ),
    ] {
        let (mut p1, mut m1, mut v1, g) = random_state(101, 7);
        let (mut p2, mut m2, mut v2) = (p1.clone(), m1.clone(), v1.clone());
        for t in 3..6 {
            step(
                &base,
                t,
                &mut [Tensor::new(&mut p1, &mut m1, &mut v1, &g).with_options(options)],
            )
            .unwrap();
            step(&group, t, &mut [Tensor::new(&mut p2, &mut m2, &mut v2, &g)]).unwrap();
        }
        assert_eq!(bits(&p1), bits(&p2), "{options:?}");
        assert_eq!(bits(&m1), bits(&m2), "{options:?}");
        assert_eq!(bits(&v1), bits(&v2), "{options:?}");
    }
    // And they do change the result.
    let (mut p1, mut m1, mut v1, g) = random_state(101, 7);
    let (mut p2, mut m2, mut v2) = (p1.clone(), m1.clone(), v1.clone());
    step(&base, 3, &mut [Tensor::new(&mut p1, &mut m1, &mut v1, &g)]).unwrap();
    step(
        &base,
        3,
        &mut [Tensor::new(&mut p2, &mut m2, &mut v2, &g).with_options(TensorOptions::new(16.0))],
    )
    .unwrap();
    assert_ne!(bits(&p1), bits(&p2));
}

#[test]
fn half_gradients_are_their_f32_values() {
    fn check<G: Element>(seed: u64) {
        let (p, m, v, g) = random_state(257, seed);
        let gh: Vec<G> = g.iter().map(|&x| G::from_f32(x)).collect();
        let gw: Vec<f32> = gh.iter().map(|x| x.to_f32()).collect();
        let (mut p1, mut m1, mut v1) = (p.clone(), m.clone(), v.clone());
        let (mut p2, mut m2, mut v2) = (p, m, v);
        let opt = AdamW::default();
        step(&opt, 4, &mut [Tensor::new(&mut p1, &mut m1, &mut v1, &gh)]).unwrap();
        step(&opt, 4, &mut [Tensor::new(&mut p2, &mut m2, &mut v2, &gw)]).unwrap();
        assert_eq!(bits(&p1), bits(&p2), "{:?}", G::DTYPE);
        assert_eq!(bits(&m1), bits(&m2), "{:?}", G::DTYPE);
        assert_eq!(bits(&v1), bits(&v2), "{:?}", G::DTYPE);
    }
    check::<f16>(11);
    check::<bf16>(12);
}

#[test]
fn copies_are_the_rounded_parameters() {
    let (p, m, v, g) = random_state(515, 21);
    let opt = AdamW::default();
    let (mut c32, mut c16, mut cb) = (vec![0f32; 515], vec![f16::ZERO; 515], vec![bf16::ZERO; 515]);
    let (mut pa, mut ma, mut va) = (p.clone(), m.clone(), v.clone());
    let (mut pb, mut mb, mut vb) = (p.clone(), m.clone(), v.clone());
    let (mut pc, mut mc, mut vc) = (p.clone(), m.clone(), v.clone());
    let (mut pn, mut mn, mut vn) = (p, m, v);
    step(
        &opt,
        2,
        &mut [
            Tensor::new(&mut pa, &mut ma, &mut va, &g).with_copy(ParamCopy::F32(&mut c32)),
            Tensor::new(&mut pb, &mut mb, &mut vb, &g).with_copy(ParamCopy::F16(&mut c16)),
            Tensor::new(&mut pc, &mut mc, &mut vc, &g).with_copy(ParamCopy::Bf16(&mut cb)),
            Tensor::new(&mut pn, &mut mn, &mut vn, &g),
        ],
    )
    .unwrap();
    // A copy changes nothing else.
    for q in [&pa, &pb, &pc] {
        assert_eq!(bits(q), bits(&pn));
    }
    assert_eq!(bits(&c32), bits(&pn));
    for i in 0..515 {
        assert_eq!(c16[i].to_bits(), f16::from_f32(pn[i]).to_bits(), "f16 {i}");
        assert_eq!(cb[i].to_bits(), bf16::from_f32(pn[i]).to_bits(), "bf16 {i}");
    }
    // Rounding to bf16 moved some values: the copy is not a truncation.
    let rounded_up = (0..515)
        .filter(|&i| (cb[i].to_f32() - pn[i]).abs() > 0.0 && cb[i].to_f32().abs() > pn[i].abs())
        .count();
    assert!(rounded_up > 0);
}

#[test]
fn empty_lists_and_tensors_are_fine() {
    let opt = AdamW::default();
    step::<f32>(&opt, 1, &mut []).unwrap();
    let (mut p, mut m, mut v) = (vec![], vec![], vec![]);
    let g: Vec<bf16> = vec![];
    step(&opt, 1, &mut [Tensor::new(&mut p, &mut m, &mut v, &g)]).unwrap();
    // Still validated.
    assert!(step::<f32>(&opt, 0, &mut []).is_err());
}

// ---- bad input: an error and nothing written --------------------------------------

#[test]
fn bad_input_is_an_error_and_writes_nothing() {
    let (p, m, v, g) = random_state(64, 31);
    let good = AdamW::default();
    type Case = (
        &'static str,
        AdamW,
        u64,
        usize,
        usize,
        usize,
        Option<usize>,
        f64,
    );
    // (the name the error must give, opt, t, the second tensor's m, v and grad lengths,
    // its copy's length, its lr_scale); its param has 64 elements.
    let cases: Vec<Case> = vec![
        (
            "lr",
            AdamW {
                lr: f64::NAN,
                ..good
            },
            1,
            64,
            64,
            64,
            None,
            1.0,
        ),
        (
            "beta2",
            AdamW { beta2: 1.0, ..good },
            1,
            64,
            64,
            64,
            None,
            1.0,
        ),
        ("eps", AdamW { eps: 0.0, ..good }, 1, 64, 64, 64, None, 1.0),
        ("t", good, 0, 64, 64, 64, None, 1.0),
        ("m", good, 1, 63, 64, 64, None, 1.0),
        ("v", good, 1, 64, 65, 64, None, 1.0),
        ("grad", good, 1, 64, 64, 0, None, 1.0),
        ("copy", good, 1, 64, 64, 64, Some(32), 1.0),
        ("lr_scale", good, 1, 64, 64, 64, None, -2.0),
        ("lr_scale", good, 1, 64, 64, 64, None, f64::INFINITY),
    ];
    for (want, opt, t, ml, vl, gl, cl, scale) in cases {
        let (mut p1, mut m1, mut v1) = (p.clone(), m.clone(), v.clone());
        let (mut p2, mut m2, mut v2) = (p.clone(), m[..ml].to_vec(), v[..vl.min(64)].to_vec());
        v2.resize(vl, 0.5);
        let g2: Vec<f32> = g.iter().cycle().take(gl).copied().collect();
        let mut c: Vec<bf16> = vec![bf16::from_f32(7.0); cl.unwrap_or(0)];
        let (m2_0, v2_0) = (m2.clone(), v2.clone());
        let mut second =
            Tensor::new(&mut p2, &mut m2, &mut v2, &g2).with_options(TensorOptions::new(scale));
        if cl.is_some() {
            second = second.with_copy(ParamCopy::Bf16(&mut c));
        }
        let r = step(
            &opt,
            t,
            &mut [Tensor::new(&mut p1, &mut m1, &mut v1, &g), second],
        );
        match r {
            Err(Error::Value { name, .. }) | Err(Error::Length { name, .. }) => {
                assert_eq!(name, want)
            }
            other => panic!("{want}: {other:?}"),
        }
        // The first tensor (valid) was not updated either.
        assert_eq!(bits(&p1), bits(&p), "{want}");
        assert_eq!(bits(&m1), bits(&m), "{want}");
        assert_eq!(bits(&v1), bits(&v), "{want}");
        assert_eq!(bits(&p2), bits(&p), "{want}");
        assert_eq!(bits(&m2), bits(&m2_0), "{want}");
        assert_eq!(bits(&v2), bits(&v2_0), "{want}");
        assert!(c.iter().all(|x| x.to_f32() == 7.0), "{want}");
    }
}
