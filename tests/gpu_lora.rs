//! GPU LoRA ops against the CPU oracle over odd shapes, every dtype, with and without
//! bias and dropout. Outputs are poisoned (NaN) before each run. Without a GPU these
//! tests print a loud SKIPPED note and return; `LORA_KERNELS_REQUIRE_GPU=1` makes them
//! fail instead.

mod common;

use common::{abs, assert_close, gpu, poison, Rng};
use lora_kernels::cpu::lora as cpu;
use lora_kernels::cuda::{lora as cuda, Gpu, Path, Plan};
use lora_kernels::tuning::{CorePolicy, FusedDown};
use lora_kernels::{
    bf16, f16, DType, Dropout, Element, Error, LoraGrads, LoraOptions, LoraShape, LoraWeights,
    Tuning,
};

const TS: [usize; 5] = [1, 3, 17, 128, 1000];
const KS: [usize; 4] = [7, 64, 200, 4096];
const NS: [usize; 4] = [7, 64, 200, 4096];
const RS: [usize; 5] = [1, 8, 16, 64, 256];

#[derive(Debug, Clone, Copy)]
struct Case {
    shape: LoraShape,
    bias: bool,
    dropout: bool,
}

/// Every T with every rank, K and N cycling so each value meets several others, bias
/// and dropout alternating; plus the bench shapes.
fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for (ti, &t) in TS.iter().enumerate() {
        for i in 0..5 {
            v.push(Case {
                shape: LoraShape::new(
                    t,
                    KS[(i + ti) % 4],
                    NS[(i + 2 * ti + 1) % 4],
                    RS[(i + ti) % 5],
                ),
                bias: (i + ti) % 2 == 0,
                dropout: (i + ti) % 3 == 1,
            });
        }
    }
    for (t, k, n, r) in [
        (1, 4096, 4096, 16),
        (16, 4096, 11008, 16),
        (32, 4096, 4096, 64),
        (33, 96, 80, 8),
        (2, 8, 8, 256),
        // Enough tiles for the GEMM core path on an sm_90 GPU (f16/bf16): odd T and N,
        // r not a multiple of 8 (padded copies), N % 8 == 0 (TMA-store epilogue).
        (300, 72, 2900, 12),
        (515, 64, 1800, 64),
        // The backward's dX on the core (K, N multiples of 8, enough [T, K] tiles).
        (700, 1000, 88, 12),
    ] {
        v.push(Case {
            shape: LoraShape::new(t, k, n, r),
            bias: t % 2 == 0,
            dropout: t == 33,
        });
    }
    v
}

struct Host<T> {
    x: Vec<T>,
    w: Vec<T>,
    a: Vec<T>,
    b: Vec<T>,
    bias: Option<Vec<T>>,
    dy: Vec<T>,
}

fn host_data<T: Element>(rng: &mut Rng, c: &Case) -> Host<T> {
    let s = c.shape;
    Host {
        x: rng.vec(s.x_len(), 1.0),
        w: rng.vec(s.w_len(), 1.0),
        a: rng.vec(s.a_len(), 1.0),
        b: rng.vec(s.b_len(), 1.0),
        bias: c.bias.then(|| rng.vec(s.out_features, 1.0)),
        dy: rng.vec(s.y_len(), 1.0),
    }
}

fn opts_for(c: &Case, seed: u64) -> LoraOptions {
    let o = LoraOptions::new(1.75);
    if c.dropout {
        o.with_dropout(Dropout::new(0.25, seed, 12))
    } else {
        o
    }
}

fn weights<'a, S: ?Sized>(w: &'a S, a: &'a S, b: &'a S, bias: Option<&'a S>) -> LoraWeights<'a, S> {
    LoraWeights { w, a, b, bias }
}

/// The forward and the backward against the oracle; returns their plans.
fn check_case<T: Element>(gpu: &Gpu, c: &Case, seed: u64) -> (Plan, Plan) {
    check_case_with::<T>(gpu, c, seed, Tuning::AUTO, Tuning::AUTO)
}

/// [`check_case`] with a path tuning for the forward and one for the backward (with
/// `CorePolicy::Require` the backward's dX must take the GEMM core, or the call fails).
fn check_case_with<T: Element>(
    gpu: &Gpu,
    c: &Case,
    seed: u64,
    fwd_tuning: Tuning,
    bwd_tuning: Tuning,
) -> (Plan, Plan) {
    let s = c.shape;
    let what = format!(
        "{} {:?} bias={} dropout={}",
        common::dtype_name::<T>(),
        s,
        c.bias,
        c.dropout
    );
    let mut rng = Rng::new(seed);
    let d = host_data::<T>(&mut rng, c);
    let opts = opts_for(c, seed);
    let abs_opts = LoraOptions {
        scale: opts.scale.abs(),
        ..opts
    };

    // Oracle forward, and the same on absolute values for the tolerance.
    let mut y_ref = vec![T::default(); s.y_len()];
    let mut h_ref = vec![T::default(); s.h_len()];
    cpu::forward(
        &s,
        &opts,
        &d.x,
        weights(&d.w[..], &d.a[..], &d.b[..], d.bias.as_deref()),
        &mut y_ref,
        Some(&mut h_ref),
    )
    .unwrap();
    let (ax, aw, aa, ab) = (abs(&d.x), abs(&d.w), abs(&d.a), abs(&d.b));
    let abias = d.bias.as_ref().map(|b| abs(b));
    let mut y_mag = vec![T::default(); s.y_len()];
    let mut h_mag = vec![T::default(); s.h_len()];
    cpu::forward(
        &s,
        &abs_opts,
        &ax,
        weights(&aw[..], &aa[..], &ab[..], abias.as_deref()),
        &mut y_mag,
        Some(&mut h_mag),
    )
    .unwrap();

    // GPU forward into poisoned outputs.
    let up = |v: &[T]| gpu.upload(v).unwrap();
    let (x, w, a, b) = (up(&d.x), up(&d.w), up(&d.a), up(&d.b));
    let bias = d.bias.as_ref().map(|v| up(v));
    let mut y = up(&poison::<T>(s.y_len()));
    let mut h = up(&poison::<T>(s.h_len()));
    let fwd_plan = cuda::forward(
        gpu,
        &s,
        &opts.with_tuning(fwd_tuning),
        &x,
        weights(&w, &a, &b, bias.as_ref()),
        &mut y,
        Some(&mut h),
    )
    .unwrap_or_else(|e| panic!("{what}: forward: {e}"));
    let y_gpu = gpu.download(&y).unwrap();
    let h_gpu = gpu.download(&h).unwrap();
    assert_close(&format!("{what}: h"), &h_gpu, &h_ref, &h_mag, s.in_features);
    assert_close(
        &format!("{what}: y"),
        &y_gpu,
        &y_ref,
        &y_mag,
        s.in_features + s.rank + 1,
    );

    // Backward, both sides from the GPU's h.
    let (mut dx_ref, mut da_ref, mut db_ref) = (
        vec![T::default(); s.x_len()],
        vec![T::default(); s.a_len()],
        vec![T::default(); s.b_len()],
    );
    cpu::backward(
        &s,
        &opts,
        &d.x,
        weights(&d.w[..], &d.a[..], &d.b[..], None),
        &h_gpu,
        &d.dy,
        LoraGrads {
            dx: &mut dx_ref[..],
            da: &mut da_ref[..],
            db: &mut db_ref[..],
        },
    )
    .unwrap();
    let (mut dx_mag, mut da_mag, mut db_mag) = (
        vec![T::default(); s.x_len()],
        vec![T::default(); s.a_len()],
        vec![T::default(); s.b_len()],
    );
    cpu::backward(
        &s,
        &abs_opts,
        &ax,
        weights(&aw[..], &aa[..], &ab[..], None),
        &abs(&h_gpu),
        &abs(&d.dy),
        LoraGrads {
            dx: &mut dx_mag[..],
            da: &mut da_mag[..],
            db: &mut db_mag[..],
        },
    )
    .unwrap();

    let h_dev = up(&h_gpu);
    let dy = up(&d.dy);
    let mut dx = up(&poison::<T>(s.x_len()));
    let mut da = up(&poison::<T>(s.a_len()));
    let mut db = up(&poison::<T>(s.b_len()));
    let bwd_plan = cuda::backward(
        gpu,
        &s,
        &opts.with_tuning(bwd_tuning),
        &x,
        weights(&w, &a, &b, None),
        &h_dev,
        &dy,
        LoraGrads {
            dx: &mut dx,
            da: &mut da,
            db: &mut db,
        },
    )
    .unwrap_or_else(|e| panic!("{what}: backward ({bwd_tuning:?}): {e}"));
    let (n, t) = (s.out_features, s.tokens);
    assert_close(
        &format!("{what}: dx"),
        &gpu.download(&dx).unwrap(),
        &dx_ref,
        &dx_mag,
        n + s.rank,
    );
    assert_close(
        &format!("{what}: dA"),
        &gpu.download(&da).unwrap(),
        &da_ref,
        &da_mag,
        t + n,
    );
    assert_close(
        &format!("{what}: dB"),
        &gpu.download(&db).unwrap(),
        &db_ref,
        &db_mag,
        t,
    );
    (fwd_plan, bwd_plan)
}

/// Every case with the default tuning: T ≤ 32 takes the fused small-T forward, and f32
/// never the GEMM core.
fn run_all<T: Element>(seed0: u64) {
    let Some(gpu) = gpu() else { return };
    for (i, c) in cases().iter().enumerate() {
        let (fwd, bwd) = check_case::<T>(gpu, c, seed0 + i as u64);
        let f32 = T::DTYPE == DType::F32;
        if c.shape.tokens <= cuda::SMALL_T_MAX {
            assert_eq!(fwd.path, Path::SmallFused, "{:?}", c.shape);
        } else if f32 {
            assert_eq!(fwd.path, Path::Cublas, "{:?}", c.shape);
        }
        if f32 {
            assert_eq!(bwd.path, Path::Cublas, "{:?}", c.shape);
        }
    }
}

#[test]
fn gpu_lora_f32() {
    run_all::<f32>(1000);
}

#[test]
fn gpu_lora_f16() {
    run_all::<f16>(2000);
}

#[test]
fn gpu_lora_bf16() {
    run_all::<bf16>(3000);
}

/// On an sm_90 GPU the f16/bf16 forward above T = 32 takes the GEMM core path; this runs
/// the large-T cases again with the core switched off for these calls
/// (`CorePolicy::Never`), so the cuBLAS path stays checked on every GPU.
#[test]
fn gpu_lora_cublas_path_f16_bf16() {
    let Some(gpu) = gpu() else { return };
    let never = Tuning {
        core: CorePolicy::Never,
        ..Tuning::AUTO
    };
    for (i, c) in cases().iter().enumerate() {
        if c.shape.tokens > cuda::SMALL_T_MAX {
            for (fwd, bwd) in [
                check_case_with::<bf16>(gpu, c, 4000 + i as u64, never, never),
                check_case_with::<f16>(gpu, c, 5000 + i as u64, never, never),
            ] {
                assert_eq!(fwd.path, Path::Cublas, "{:?}", c.shape);
                assert_eq!(bwd.path, Path::Cublas, "{:?}", c.shape);
            }
        }
    }
}

/// The large-T cases on the GEMM core's mma.sync kernels (the sm_80 .. sm_89 path,
/// forced on sm_90 by `Tuning::mma_path`): the forward's y from the mma core with the
/// low-rank K-slice (U from the down kernel: the fused down product is wgmma-only), the
/// backward on cuBLAS (the NN core is wgmma-only).
#[test]
fn gpu_lora_mma_path_f16_bf16() {
    let Some(gpu) = gpu() else { return };
    let mma = Tuning {
        mma_path: true,
        ..Tuning::AUTO
    };
    let mut on_core = 0;
    for (i, c) in cases().iter().enumerate() {
        if c.shape.tokens > cuda::SMALL_T_MAX {
            for (fwd, bwd) in [
                check_case_with::<bf16>(gpu, c, 8000 + i as u64, mma, mma),
                check_case_with::<f16>(gpu, c, 8100 + i as u64, mma, mma),
            ] {
                let what = format!("{:?}: {fwd:?}", c.shape);
                match fwd.path {
                    Path::Core => {
                        assert!(fwd.mma && !fwd.fused_down, "{what}");
                        on_core += 1;
                    }
                    path => assert_eq!(path, Path::Cublas, "{what}"),
                }
                assert_eq!(bwd.path, Path::Cublas, "{:?}", c.shape);
            }
        }
    }
    assert!(on_core > 0, "no forward took the mma.sync core");
}

fn merge_case<T: Element>(gpu: &Gpu, s: LoraShape, seed: u64) {
    let mut rng = Rng::new(seed);
    let (w0, a, b): (Vec<T>, Vec<T>, Vec<T>) = (
        rng.vec(s.w_len(), 1.0),
        rng.vec(s.a_len(), 1.0),
        rng.vec(s.b_len(), 1.0),
    );
    let scale = 0.6;
    let mut w_ref = w0.clone();
    cpu::merge(&s, scale, &mut w_ref, &a, &b).unwrap();
    let mut mag = abs(&w0);
    cpu::merge(&s, scale, &mut mag, &abs(&a), &abs(&b)).unwrap();
    let mut w = gpu.upload(&w0).unwrap();
    let (ad, bd) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
    cuda::merge(gpu, &s, scale, &mut w, &ad, &bd).unwrap();
    let merged = gpu.download(&w).unwrap();
    assert_close(&format!("merge {s:?}"), &merged, &w_ref, &mag, s.rank + 1);
    assert_ne!(merged, w0);
    // Unmerge: back to W up to rounding in W's type (one rounding each way).
    let mut w_back = merged.clone();
    cpu::unmerge(&s, scale, &mut w_back, &a, &b).unwrap();
    cuda::unmerge(gpu, &s, scale, &mut w, &ad, &bd).unwrap();
    let mut mag2 = abs(&merged);
    cpu::merge(&s, scale, &mut mag2, &abs(&a), &abs(&b)).unwrap();
    assert_close(
        &format!("unmerge {s:?}"),
        &gpu.download(&w).unwrap(),
        &w_back,
        &mag2,
        s.rank + 1,
    );
}

#[test]
fn gpu_merge_unmerge_all_dtypes() {
    let Some(gpu) = gpu() else { return };
    for (i, s) in [
        LoraShape::new(1, 7, 3, 1),
        LoraShape::new(1, 200, 64, 16),
        LoraShape::new(1, 4096, 17, 256),
        LoraShape::new(1, 300, 1000, 8),
    ]
    .into_iter()
    .enumerate()
    {
        merge_case::<f32>(gpu, s, 50 + i as u64);
        merge_case::<f16>(gpu, s, 60 + i as u64);
        merge_case::<bf16>(gpu, s, 70 + i as u64);
    }
}

/// Merged forward on the GPU equals the unmerged forward (the identity, end to end).
#[test]
fn gpu_merged_forward_equals_unmerged() {
    let Some(gpu) = gpu() else { return };
    let s = LoraShape::new(5, 256, 96, 8);
    let mut rng = Rng::new(9);
    let (x, w0, a, b): (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) = (
        rng.vec(s.x_len(), 1.0),
        rng.vec(s.w_len(), 1.0),
        rng.vec(s.a_len(), 1.0),
        rng.vec(s.b_len(), 1.0),
    );
    let opts = LoraOptions::new(2.0);
    let (xd, ad, bd) = (
        gpu.upload(&x).unwrap(),
        gpu.upload(&a).unwrap(),
        gpu.upload(&b).unwrap(),
    );
    let mut wd = gpu.upload(&w0).unwrap();
    let mut y1 = gpu.zeros::<f32>(s.y_len()).unwrap();
    cuda::forward(
        gpu,
        &s,
        &opts,
        &xd,
        weights(&wd, &ad, &bd, None),
        &mut y1,
        None,
    )
    .unwrap();
    cuda::merge(gpu, &s, opts.scale, &mut wd, &ad, &bd).unwrap();
    let zero_b = gpu.zeros::<f32>(s.b_len()).unwrap();
    let mut y2 = gpu.zeros::<f32>(s.y_len()).unwrap();
    cuda::forward(
        gpu,
        &s,
        &opts,
        &xd,
        weights(&wd, &ad, &zero_b, None),
        &mut y2,
        None,
    )
    .unwrap();
    let e = common::rel_err(&gpu.download(&y2).unwrap(), &gpu.download(&y1).unwrap());
    assert!(e < 1e-5, "rel err {e}");
}

/// The cooperative small-T kernel leaves its counters at zero: many launches in a row,
/// alternating shapes, all agree with the first.
#[test]
fn gpu_small_forward_is_repeatable() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(4);
    for &(t, r) in &[(1usize, 16usize), (7, 3), (32, 256)] {
        let s = LoraShape::new(t, 512, 300, r);
        let (x, w, a, b): (Vec<bf16>, Vec<bf16>, Vec<bf16>, Vec<bf16>) = (
            rng.vec(s.x_len(), 1.0),
            rng.vec(s.w_len(), 1.0),
            rng.vec(s.a_len(), 1.0),
            rng.vec(s.b_len(), 1.0),
        );
        let (x, w, a, b) = (
            gpu.upload(&x).unwrap(),
            gpu.upload(&w).unwrap(),
            gpu.upload(&a).unwrap(),
            gpu.upload(&b).unwrap(),
        );
        let opts = LoraOptions::new(0.5).with_dropout(Dropout::new(0.1, 3, 4));
        let mut first = None;
        for _ in 0..20 {
            let mut y = gpu.upload(&poison::<bf16>(s.y_len())).unwrap();
            cuda::forward(gpu, &s, &opts, &x, weights(&w, &a, &b, None), &mut y, None).unwrap();
            let got = gpu.download(&y).unwrap();
            match &first {
                None => first = Some(got),
                Some(f) => assert_eq!(f, &got, "T={t} r={r}: launches disagree"),
            }
        }
    }
}

/// The backward with dX on the GEMM core (`cuda::backward` with `CorePolicy::Require`:
/// dX = dY W + (s·dY B) A by one MN-major core launch, the plan says `Path::Core`) on
/// shapes the per-call choice may not give it: ranks 1, 12 (padded G rows), 17 and 64,
/// N = 40 (one K-slice of the core), T not a multiple of the tile, few tiles; G from the
/// launch's own jobs (where the rule allows, and forced: the plan says `fused_down`
/// exactly for r ≤ 32) and from cuBLAS, and with several jobs per cluster. On a GPU
/// without the core it must refuse with `Error::Unsupported`, and this test says loudly
/// that it skipped.
#[test]
fn gpu_lora_backward_core_f16_bf16() {
    let Some(gpu) = gpu() else { return };
    let shapes = [
        (700, 1000, 88, 12),
        (300, 2056, 40, 1),
        (257, 1024, 520, 64),
        (129, 512, 136, 17),
        (1031, 256, 64, 16),
    ];
    if !lora_kernels::cuda::gemm::supported(gpu) {
        let e =
            backward_core_err::<bf16>(gpu, LoraShape::new(129, 64, 64, 8), &LoraOptions::new(1.0));
        assert!(
            matches!(
                e,
                Error::Unsupported {
                    op: "lora::backward",
                    ..
                }
            ),
            "{e}"
        );
        eprintln!("\n*** gpu_lora_backward_core_f16_bf16 SKIPPED: no sm_90 GEMM core ({e}) ***\n");
        return;
    }
    let require = Tuning {
        core: CorePolicy::Require,
        ..Tuning::AUTO
    };
    // G = s·dY B inside the core launch (jobs: where the rule allows, and forced at every
    // r ≤ 32) and by cuBLAS before it.
    for fused in [FusedDown::Auto, FusedDown::Force, FusedDown::Never] {
        let tuning = Tuning {
            fused_down: fused,
            ..require
        };
        for (i, &(t, k, n, r)) in shapes.iter().enumerate() {
            let c = Case {
                shape: LoraShape::new(t, k, n, r),
                bias: i % 2 == 0,
                dropout: false,
            };
            for (_, bwd) in [
                check_case_with::<bf16>(gpu, &c, 6000 + i as u64, Tuning::AUTO, tuning),
                check_case_with::<f16>(gpu, &c, 6100 + i as u64, Tuning::AUTO, tuning),
            ] {
                let what = format!("{:?} {fused:?}: {bwd:?}", c.shape);
                assert_eq!(bwd.path, Path::Core, "{what}");
                match fused {
                    FusedDown::Auto => assert!(r <= 32 || !bwd.fused_down, "{what}"),
                    FusedDown::Force => assert_eq!(bwd.fused_down, r <= 32, "{what}"),
                    FusedDown::Never => assert!(!bwd.fused_down, "{what}"),
                }
            }
        }
    }
    // dX 2-byte aligned on a shape the core takes: `backward` falls back to cuBLAS (no
    // error), with the same dX as the core's (required, dX aligned) up to rounding; the
    // core required on the misaligned dX is an error.
    {
        let s = LoraShape::new(700, 1000, 88, 12);
        let mut rng = Rng::new(6300);
        let v = |n: usize, rng: &mut Rng| gpu.upload(&rng.vec::<bf16>(n, 1.0)).unwrap();
        let (x, w, a, b, h, dy) = (
            v(s.x_len(), &mut rng),
            v(s.w_len(), &mut rng),
            v(s.a_len(), &mut rng),
            v(s.b_len(), &mut rng),
            v(s.h_len(), &mut rng),
            v(s.y_len(), &mut rng),
        );
        let opts = LoraOptions::new(0.5);
        let mut dx_buf = gpu.zeros::<bf16>(s.x_len() + 1).unwrap();
        let mut da_buf = gpu.zeros::<bf16>(s.a_len()).unwrap();
        let mut db_buf = gpu.zeros::<bf16>(s.b_len()).unwrap();
        let mut got = Vec::new();
        for (off, tuning, path) in [
            (0usize, require, Path::Core),
            (1, Tuning::AUTO, Path::Cublas),
            (1, require, Path::Core),
        ] {
            let (mut dx, mut da, mut db) = (
                dx_buf.slice_mut(off..off + s.x_len()),
                da_buf.slice_mut(..),
                db_buf.slice_mut(..),
            );
            let plan = cuda::backward(
                gpu,
                &s,
                &opts.with_tuning(tuning),
                &x,
                weights(&w, &a, &b, None),
                &h,
                &dy,
                LoraGrads {
                    dx: &mut dx,
                    da: &mut da,
                    db: &mut db,
                },
            );
            if off == 1 && tuning.core == CorePolicy::Require {
                let e = plan.unwrap_err();
                assert!(matches!(e, Error::Misaligned { name: "dx", .. }), "{e}");
                continue;
            }
            assert_eq!(plan.unwrap().path, path, "dX offset {off}, {tuning:?}");
            got.push(gpu.download(&dx_buf.slice(off..off + s.x_len())).unwrap());
        }
        let (aligned, shifted) = (&got[0], &got[1]);
        let scale = aligned.iter().map(|v| v.to_f64().abs()).sum::<f64>() / aligned.len() as f64;
        for (i, (p, q)) in shifted.iter().zip(aligned).enumerate() {
            let (p, q) = (p.to_f64(), q.to_f64());
            assert!(
                (p - q).abs() <= 0.02 * (q.abs() + scale),
                "misaligned dX [{i}]: {p} against {q}"
            );
        }
    }
    // More tile-row pairs (79) than clusters: several G jobs per cluster, forced.
    let c = Case {
        shape: LoraShape::new(20000, 64, 72, 16),
        bias: false,
        dropout: false,
    };
    let forced = Tuning {
        fused_down: FusedDown::Force,
        ..require
    };
    let (_, bwd) = check_case_with::<bf16>(gpu, &c, 6200, Tuning::AUTO, forced);
    assert!(bwd.path == Path::Core && bwd.fused_down, "{bwd:?}");
}

/// `cuda::backward` with the core required (`CorePolicy::Require`) on zeroed buffers of
/// shape `s`; its error (it must fail).
fn backward_core_err<T: Element>(gpu: &Gpu, s: LoraShape, opts: &LoraOptions) -> Error {
    let z = |n: usize| gpu.zeros::<T>(n).unwrap();
    let (x, w, a, b, h, dy) = (
        z(s.x_len()),
        z(s.w_len()),
        z(s.a_len()),
        z(s.b_len()),
        z(s.h_len()),
        z(s.y_len()),
    );
    let (mut dx, mut da, mut db) = (z(s.x_len()), z(s.a_len()), z(s.b_len()));
    let opts = opts.with_tuning(Tuning {
        core: CorePolicy::Require,
        ..opts.tuning
    });
    cuda::backward(
        gpu,
        &s,
        &opts,
        &x,
        weights(&w, &a, &b, None),
        &h,
        &dy,
        LoraGrads {
            dx: &mut dx,
            da: &mut da,
            db: &mut db,
        },
    )
    .unwrap_err()
}

/// The required core backward's refusals: active dropout, N % 8 != 0, f32.
#[test]
fn gpu_lora_backward_core_errors() {
    let Some(gpu) = gpu() else { return };
    let plain = LoraOptions::new(1.0);
    let e = backward_core_err::<f32>(gpu, LoraShape::new(129, 64, 64, 8), &plain);
    assert!(
        matches!(
            e,
            Error::Unsupported {
                op: "lora::backward",
                ..
            }
        ),
        "{e}"
    );
    if !lora_kernels::cuda::gemm::supported(gpu) {
        return;
    }
    let e = backward_core_err::<bf16>(gpu, LoraShape::new(129, 64, 60, 8), &plain);
    assert!(
        matches!(
            e,
            Error::Dim {
                name: "out_features",
                ..
            }
        ),
        "{e}"
    );
    let dropped = plain.with_dropout(Dropout::new(0.25, 1, 2));
    let e = backward_core_err::<bf16>(gpu, LoraShape::new(129, 64, 64, 8), &dropped);
    assert!(
        matches!(
            e,
            Error::Unsupported {
                op: "lora::backward",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn gpu_bad_arguments_are_errors() {
    let Some(gpu) = gpu() else { return };
    let s = LoraShape::new(2, 8, 4, 2);
    let opts = LoraOptions::new(1.0);
    let z = |n: usize| gpu.zeros::<f32>(n).unwrap();
    let (x, w, a, b) = (z(16), z(32), z(16), z(8));
    let mut y = z(8);
    let ok = weights(&w, &a, &b, None);
    cuda::forward(gpu, &s, &opts, &x, ok, &mut y, None).unwrap();
    let short = z(15);
    let e = cuda::forward(gpu, &s, &opts, &short, ok, &mut y, None).unwrap_err();
    assert_eq!(
        e,
        Error::Length {
            name: "x",
            expected: 16,
            actual: 15
        }
    );
    let e = cuda::forward(
        gpu,
        &LoraShape::new(2, 8, 4, 0),
        &opts,
        &x,
        ok,
        &mut y,
        None,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Dim { name: "rank", .. }), "{e}");
    let mut short_h = z(3);
    let e = cuda::forward(gpu, &s, &opts, &x, ok, &mut y, Some(&mut short_h)).unwrap_err();
    assert!(matches!(e, Error::Length { name: "h", .. }), "{e}");
    // A tuning outside what the kernels take: refused before any launch.
    let bad_tile = opts.with_tuning(Tuning {
        tile_n: Some(64),
        ..Tuning::AUTO
    });
    let e = cuda::forward(gpu, &s, &bad_tile, &x, ok, &mut y, None).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Dim {
                name: "tuning.tile_n",
                ..
            }
        ),
        "{e}"
    );
    let (mut dx, mut da, mut db) = (z(16), z(16), z(7));
    let h = z(4);
    let e = cuda::backward(
        gpu,
        &s,
        &opts,
        &x,
        ok,
        &h,
        &y,
        LoraGrads {
            dx: &mut dx,
            da: &mut da,
            db: &mut db,
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::Length { name: "db", .. }), "{e}");
    let mut w2 = z(32);
    let e = cuda::merge(
        gpu,
        &LoraShape::new(1, 8, 4, 2),
        f32::INFINITY,
        &mut w2,
        &a,
        &b,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Value { name: "scale", .. }), "{e}");
}
