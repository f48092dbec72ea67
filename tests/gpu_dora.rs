//! GPU DoRA ops against the CPU oracle over odd shapes, every dtype, with and without
//! bias, dropout and a saved z, and against peft's fixture; QDoRA (an NF4 W) against
//! its oracle over the same checks, on one and many row panels. Outputs are poisoned (NaN)
//! before each run. Without a GPU these tests print a loud SKIPPED note and return;
//! `LORA_KERNELS_REQUIRE_GPU=1` makes them fail instead.

mod common;

use common::{abs, assert_close, core_fills, gpu, poison, rel_err, Fixture, Rng};
use lora_kernels::cpu::{dora as cpu, lora as cpu_lora, qdora as cpu_q};
use lora_kernels::cuda::nf4::Nf4Device;
use lora_kernels::cuda::{dora as cuda, gemm, qdora as cuda_q, Gpu, Path, Plan};
use lora_kernels::tuning::{CorePolicy, FusedDown};
use lora_kernels::{
    bf16, f16, DType, DoraGrads, DoraOutputs, DoraSaved, DoraWeights, Dropout, Element, Error,
    LoraGrads, LoraOptions, LoraShape, LoraWeights, Nf4Weight, Tuning,
};

#[derive(Debug, Clone, Copy)]
struct Case {
    shape: LoraShape,
    bias: bool,
    dropout: bool,
    save_z: bool,
    /// QDoRA: W quantized to NF4 (blocksize, double quantization); None: dense W.
    nf4: Option<(usize, bool)>,
}

fn cases() -> Vec<Case> {
    const TS: [usize; 5] = [1, 3, 17, 128, 333];
    const KS: [usize; 4] = [7, 64, 200, 1024];
    const NS: [usize; 4] = [5, 64, 200, 1000];
    const RS: [usize; 5] = [1, 8, 16, 64, 256];
    let mut v = Vec::new();
    for (ti, &t) in TS.iter().enumerate() {
        for i in 0..4 {
            v.push(Case {
                shape: LoraShape::new(
                    t,
                    KS[(i + ti) % 4],
                    NS[(i + 2 * ti + 1) % 4],
                    RS[(i + ti) % 5],
                ),
                bias: (i + ti) % 2 == 0,
                dropout: (i + ti) % 3 == 1,
                save_z: (i + 2 * ti) % 2 == 1,
                nf4: None,
            });
        }
    }
    // Bench shapes, the fused small-T kernel's rank steps (r = 24, 32) and edges.
    for (t, k, n, r) in [
        (1, 4096, 4096, 16),
        (16, 4096, 1000, 16),
        (5, 128, 40, 32),
        (32, 200, 77, 24),
        (33, 96, 80, 8),
        // Enough tiles for the GEMM core path on an sm_90 GPU (f16/bf16): DoRA's scale in
        // the core's epilogue, z written beside y (odd N: direct stores; N % 8 == 0: TMA).
        (300, 72, 2901, 16),
        (257, 64, 3072, 8),
    ] {
        for dropout in [false, true] {
            v.push(Case {
                shape: LoraShape::new(t, k, n, r),
                bias: true,
                dropout,
                save_z: dropout,
                nf4: None,
            });
        }
        // Without dropout and with z saved: on the core path, z comes from the core's
        // epilogue (stored beside y).
        if t >= 257 {
            v.push(Case {
                shape: LoraShape::new(t, k, n, r),
                bias: t % 2 == 0,
                dropout: false,
                save_z: true,
                nf4: None,
            });
        }
    }
    v
}

struct Host<T> {
    x: Vec<T>,
    w: Vec<T>,
    a: Vec<T>,
    b: Vec<T>,
    bias: Option<Vec<T>>,
    m: Vec<T>,
    dy: Vec<T>,
}

fn host_data<T: Element>(rng: &mut Rng, c: &Case) -> Host<T> {
    let s = c.shape;
    let m: Vec<f64> = (0..s.out_features).map(|_| rng.uniform()).collect();
    Host {
        x: rng.vec(s.x_len(), 1.0),
        w: rng.vec(s.w_len(), 1.0),
        a: rng.vec(s.a_len(), 0.5),
        b: rng.vec(s.b_len(), 0.5),
        bias: c.bias.then(|| rng.vec(s.out_features, 1.0)),
        // Around the typical row norm sqrt(K/3), both sides of it (g above and below 1).
        m: m.iter()
            .map(|u| T::from_f64((0.5 + *u) * (s.in_features as f64 / 3.0).sqrt()))
            .collect(),
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

fn dw<'a, S: ?Sized>(
    w: &'a S,
    a: &'a S,
    b: &'a S,
    bias: Option<&'a S>,
    m: &'a S,
) -> DoraWeights<'a, S> {
    DoraWeights {
        w,
        a,
        b,
        bias,
        magnitude: m,
    }
}

/// Per-column factor |g| + 1 times a per-element magnitude.
fn scale_cols<T: Element>(v: &[T], n: usize, f: &[f64]) -> Vec<T> {
    v.iter()
        .enumerate()
        .map(|(e, x)| T::from_f64(x.to_f64().abs() * f[e % n]))
        .collect()
}

/// The forward, backward, merge and unmerge against the oracle; returns the forward's
/// and the backward's plans.
fn check_case<T: Element>(gpu: &Gpu, c: &Case, seed: u64) -> (Plan, Plan) {
    check_case_with::<T>(gpu, c, seed, Tuning::AUTO)
}

/// [`check_case`] with a path tuning on the forward and the backward.
fn check_case_with<T: Element>(gpu: &Gpu, c: &Case, seed: u64, tuning: Tuning) -> (Plan, Plan) {
    let s = c.shape;
    let (t, k, n, r) = (s.tokens, s.in_features, s.out_features, s.rank);
    let what = format!(
        "{} {:?} bias={} dropout={} z={} nf4={:?}",
        common::dtype_name::<T>(),
        s,
        c.bias,
        c.dropout,
        c.save_z,
        c.nf4
    );
    let mut rng = Rng::new(seed);
    let mut d = host_data::<T>(&mut rng, c);
    // QDoRA: the oracle's W is the NF4 weight dequantized to T (as cpu::qdora does).
    let q = c
        .nf4
        .map(|(bs, dq)| Nf4Weight::quantize(&d.w, n, k, bs, dq).unwrap());
    if let Some(q) = &q {
        d.w = q.dequantize::<T>().unwrap();
    }
    let opts = opts_for(c, seed).with_tuning(tuning);
    let abs_opts = LoraOptions {
        scale: opts.scale.abs(),
        ..opts
    };
    let hw = || dw(&d.w[..], &d.a[..], &d.b[..], d.bias.as_deref(), &d.m[..]);

    // Oracle forward.
    let mut y_ref = vec![T::default(); s.y_len()];
    let mut h_ref = vec![T::default(); s.h_len()];
    let mut norm_ref = vec![0.0f32; n];
    let mut z_ref = vec![T::default(); s.y_len()];
    cpu::forward(
        &s,
        &opts,
        &d.x,
        hw(),
        DoraOutputs {
            y: &mut y_ref[..],
            h: Some(&mut h_ref[..]),
            norm: Some(&mut norm_ref[..]),
            z: Some(&mut z_ref[..]),
        },
    )
    .unwrap();
    if let Some(q) = &q {
        let mut y_q = vec![T::default(); s.y_len()];
        let qw = DoraWeights {
            w: q,
            a: &d.a[..],
            b: &d.b[..],
            bias: d.bias.as_deref(),
            magnitude: &d.m[..],
        };
        cpu_q::forward(&s, &opts, &d.x, qw, DoraOutputs::y(&mut y_q[..])).unwrap();
        assert!(
            y_q == y_ref,
            "{what}: cpu::qdora differs from cpu::dora over deq(W)"
        );
    }
    // Magnitudes for the tolerances: the LoRA terms on absolute values, times |g| + 1.
    let (ax, aw, aa, ab) = (abs(&d.x), abs(&d.w), abs(&d.a), abs(&d.b));
    let mut norm_mag = vec![0.0f32; n];
    cpu::weight_norm(&s, abs_opts.scale, &aw, &aa, &ab, &mut norm_mag).unwrap();
    let g1: Vec<f64> = (0..n)
        .map(|o| (d.m[o].to_f64() / norm_ref[o] as f64).abs() + 1.0)
        .collect();
    let lw_abs = LoraWeights {
        w: &aw[..],
        a: &aa[..],
        b: &ab[..],
        bias: None,
    };
    let mut zl_mag = vec![T::default(); s.y_len()];
    let mut h_mag = vec![T::default(); s.h_len()];
    cpu_lora::forward(&s, &abs_opts, &ax, lw_abs, &mut zl_mag, Some(&mut h_mag)).unwrap();
    let mut y_mag = scale_cols(&zl_mag, n, &g1.iter().map(|v| 2.0 * v).collect::<Vec<_>>());
    if let Some(bias) = &d.bias {
        for (e, v) in y_mag.iter_mut().enumerate() {
            *v = T::from_f64(v.to_f64() + bias[e % n].to_f64().abs());
        }
    }

    // GPU forward into poisoned outputs.
    let up = |v: &[T]| gpu.upload(v).unwrap();
    let (x, w, a, b, m) = (up(&d.x), up(&d.w), up(&d.a), up(&d.b), up(&d.m));
    let bias = d.bias.as_ref().map(|v| up(v));
    let mut y = up(&poison::<T>(s.y_len()));
    let mut h = up(&poison::<T>(s.h_len()));
    let mut z = up(&poison::<T>(s.y_len()));
    let mut norm = gpu.upload(&vec![f32::NAN; n]).unwrap();
    let wq = q.as_ref().map(|q| Nf4Device::upload(gpu, q).unwrap());
    let outs = DoraOutputs {
        y: &mut y,
        h: Some(&mut h),
        norm: Some(&mut norm),
        z: Some(&mut z),
    };
    let fwd_plan = match &wq {
        None => cuda::forward(gpu, &s, &opts, &x, dw(&w, &a, &b, bias.as_ref(), &m), outs),
        Some(wq) => {
            let qw = DoraWeights {
                w: wq,
                a: &a,
                b: &b,
                bias: bias.as_ref(),
                magnitude: &m,
            };
            cuda_q::forward(gpu, &s, &opts, &x, qw, outs)
        }
    }
    .unwrap_or_else(|e| panic!("{what}: forward: {e}"));
    let norm_gpu = gpu.download(&norm).unwrap();
    for o in 0..n {
        let (gv, wv) = (norm_gpu[o] as f64, norm_ref[o] as f64);
        let tol = 4e-7 * wv + (k + r) as f64 * 2f64.powi(-24) * norm_mag[o] as f64;
        assert!(
            (gv - wv).abs() <= tol,
            "{what}: norm[{o}]: {gv} vs {wv} (tol {tol:.3e})"
        );
    }
    let h_gpu = gpu.download(&h).unwrap();
    assert_close(&format!("{what}: h"), &h_gpu, &h_ref, &h_mag, k);
    let z_gpu = gpu.download(&z).unwrap();
    assert_close(&format!("{what}: z"), &z_gpu, &z_ref, &zl_mag, k + r + 1);
    assert_close(
        &format!("{what}: y"),
        &gpu.download(&y).unwrap(),
        &y_ref,
        &y_mag,
        k + r + 1,
    );

    // Backward, both sides from the GPU's h, norm and (when saved) z.
    let zs = c.save_z.then_some(&z_gpu[..]);
    let mut g_ref = [
        vec![T::default(); s.x_len()],
        vec![T::default(); s.a_len()],
        vec![T::default(); s.b_len()],
        vec![T::default(); n],
    ];
    {
        let [dx, da, db, dm] = &mut g_ref;
        cpu::backward(
            &s,
            &opts,
            &d.x,
            hw(),
            DoraSaved {
                h: &h_gpu[..],
                norm: &norm_gpu[..],
                z: zs,
            },
            &d.dy,
            DoraGrads {
                dx: &mut dx[..],
                da: &mut da[..],
                db: &mut db[..],
                dm: &mut dm[..],
            },
        )
        .unwrap();
    }
    // Magnitudes: LoRA's backward on absolute values with dy scaled by |g| + 1.
    let dy_mag = scale_cols(&d.dy, n, &g1);
    let (mut dx_mag, mut da_mag, mut db_mag) = (
        vec![T::default(); s.x_len()],
        vec![T::default(); s.a_len()],
        vec![T::default(); s.b_len()],
    );
    cpu_lora::backward(
        &s,
        &abs_opts,
        &ax,
        lw_abs,
        &abs(&h_gpu),
        &dy_mag,
        LoraGrads {
            dx: &mut dx_mag[..],
            da: &mut da_mag[..],
            db: &mut db_mag[..],
        },
    )
    .unwrap();
    let dx_mag: Vec<T> = dx_mag
        .iter()
        .map(|v| T::from_f64(2.0 * v.to_f64()))
        .collect();
    let dm_mag: Vec<T> = (0..n)
        .map(|o| {
            let sum: f64 = (0..t)
                .map(|i| d.dy[i * n + o].to_f64().abs() * 2.0 * zl_mag[i * n + o].to_f64())
                .sum();
            T::from_f64(sum / norm_gpu[o] as f64)
        })
        .collect();

    let h_dev = up(&h_gpu);
    let z_dev = up(&z_gpu);
    let dy = up(&d.dy);
    let mut dx = up(&poison::<T>(s.x_len()));
    let mut da = up(&poison::<T>(s.a_len()));
    let mut db = up(&poison::<T>(s.b_len()));
    let mut dm = up(&poison::<T>(n));
    let saved = DoraSaved {
        h: &h_dev,
        norm: &norm,
        z: c.save_z.then_some(&z_dev),
    };
    let grads = DoraGrads {
        dx: &mut dx,
        da: &mut da,
        db: &mut db,
        dm: &mut dm,
    };
    let bwd_plan = match &wq {
        None => cuda::backward(
            gpu,
            &s,
            &opts,
            &x,
            dw(&w, &a, &b, None, &m),
            saved,
            &dy,
            grads,
        ),
        Some(wq) => {
            let qw = DoraWeights {
                w: wq,
                a: &a,
                b: &b,
                bias: None,
                magnitude: &m,
            };
            cuda_q::backward(gpu, &s, &opts, &x, qw, saved, &dy, grads)
        }
    }
    .unwrap_or_else(|e| panic!("{what}: backward: {e}"));
    let [dx_ref, da_ref, db_ref, dm_ref] = &g_ref;
    let acc = n + t + r;
    assert_close(
        &format!("{what}: dx"),
        &gpu.download(&dx).unwrap(),
        dx_ref,
        &dx_mag,
        acc,
    );
    assert_close(
        &format!("{what}: dA"),
        &gpu.download(&da).unwrap(),
        da_ref,
        &da_mag,
        acc,
    );
    assert_close(
        &format!("{what}: dB"),
        &gpu.download(&db).unwrap(),
        db_ref,
        &db_mag,
        acc,
    );
    assert_close(
        &format!("{what}: dm"),
        &gpu.download(&dm).unwrap(),
        dm_ref,
        &dm_mag,
        acc + k,
    );

    if wq.is_some() {
        // An NF4 W is not merged in place (it would need requantizing).
        return (fwd_plan, bwd_plan);
    }
    // Merge then unmerge: the merged W against the oracle's, and the restored W.
    let mut w_ref = d.w.clone();
    let mut mnorm_ref = vec![0.0f32; n];
    cpu::merge(&s, opts.scale, &mut w_ref, &d.a, &d.b, &d.m, &mut mnorm_ref).unwrap();
    let mut wg = up(&d.w);
    let mut mnorm = gpu.upload(&vec![f32::NAN; n]).unwrap();
    cuda::merge(gpu, &s, opts.scale, &mut wg, &a, &b, &m, &mut mnorm)
        .unwrap_or_else(|e| panic!("{what}: merge: {e}"));
    let wm_mag: Vec<T> = (0..s.w_len())
        .map(|e| {
            let o = e / k;
            let low: f64 = (0..r)
                .map(|j| ab[o * r + j].to_f64() * aa[j * k + e % k].to_f64())
                .sum();
            T::from_f64(g1[o] * (aw[e].to_f64() + abs_opts.scale as f64 * low))
        })
        .collect();
    assert_close(
        &format!("{what}: merged W"),
        &gpu.download(&wg).unwrap(),
        &w_ref,
        &wm_mag,
        k + r,
    );
    cuda::unmerge(gpu, &s, opts.scale, &mut wg, &a, &b, &m, &mnorm).unwrap();
    let back = gpu.download(&wg).unwrap();
    // Two roundings of W' (merge) and one of W: a few epsilons of the merged magnitude.
    let eps = T::DTYPE.epsilon();
    for e in 0..s.w_len() {
        let o = e / k;
        let tol = 4.0 * eps * (wm_mag[e].to_f64() / (g1[o] - 1.0).max(1e-3) + aw[e].to_f64())
            + (k + r) as f64 * 2f64.powi(-24) * wm_mag[e].to_f64();
        let err = (back[e].to_f64() - d.w[e].to_f64()).abs();
        assert!(
            err <= tol,
            "{what}: unmerged W[{e}]: {} vs {}",
            back[e].to_f64(),
            d.w[e].to_f64()
        );
    }
    (fwd_plan, bwd_plan)
}

/// Every case with the default tuning: T ≤ 32 without dropout takes the small-T forward
/// (one pass, or the composition around the LoRA small-T kernel), and f32 never the GEMM
/// core.
fn run_all<T: Element>(seed0: u64) {
    let Some(gpu) = gpu() else { return };
    for (i, c) in cases().iter().enumerate() {
        let (fwd, bwd) = check_case::<T>(gpu, c, seed0 + i as u64);
        let what = format!("{c:?}: {fwd:?} {bwd:?}");
        let small = c.shape.tokens <= lora_kernels::cuda::lora::SMALL_T_MAX && !c.dropout;
        if small {
            assert_eq!(fwd.path, Path::SmallFused, "{what}");
        }
        if T::DTYPE == DType::F32 {
            if !small {
                assert_eq!(fwd.path, Path::Cublas, "{what}");
            }
            assert_eq!(bwd.path, Path::Cublas, "{what}");
        }
    }
}

#[test]
fn gpu_dora_f32() {
    run_all::<f32>(5000);
}

#[test]
fn gpu_dora_f16() {
    run_all::<f16>(6000);
}

#[test]
fn gpu_dora_bf16() {
    run_all::<bf16>(7000);
}

/// On an sm_90 GPU the f16/bf16 forward above T = 32 without dropout takes the GEMM core
/// (scale in its epilogue); this runs those cases again with the core switched off for
/// these calls (`CorePolicy::Never`), so the norm-LoRA-scale composition stays checked on
/// every GPU.
#[test]
fn gpu_dora_cublas_path_f16_bf16() {
    let Some(gpu) = gpu() else { return };
    let never = Tuning {
        core: CorePolicy::Never,
        ..Tuning::AUTO
    };
    for (i, c) in cases().iter().enumerate() {
        if c.shape.tokens > lora_kernels::cuda::lora::SMALL_T_MAX && !c.dropout {
            for (fwd, bwd) in [
                check_case_with::<bf16>(gpu, c, 7500 + i as u64, never),
                check_case_with::<f16>(gpu, c, 7700 + i as u64, never),
            ] {
                assert_eq!(fwd.path, Path::Cublas, "{c:?}");
                assert_eq!(bwd.path, Path::Cublas, "{c:?}");
            }
        }
    }
}

/// The large-T cases without dropout on the GEMM core's mma.sync kernels (the sm_80 ..
/// sm_89 path, forced on sm_90 by `Tuning::mma_path`): DoRA's scale (and z) in their
/// epilogue; the backward on cuBLAS (the NN core is wgmma-only).
#[test]
fn gpu_dora_mma_path_f16_bf16() {
    let Some(gpu) = gpu() else { return };
    let mma = Tuning {
        mma_path: true,
        ..Tuning::AUTO
    };
    let mut on_core = 0;
    for (i, c) in cases().iter().enumerate() {
        if c.shape.tokens > lora_kernels::cuda::lora::SMALL_T_MAX && !c.dropout {
            for (fwd, bwd) in [
                check_case_with::<bf16>(gpu, c, 7800 + i as u64, mma),
                check_case_with::<f16>(gpu, c, 7900 + i as u64, mma),
            ] {
                let what = format!("{c:?}: {fwd:?}");
                match fwd.path {
                    Path::Core => {
                        assert!(fwd.mma && !fwd.fused_down, "{what}");
                        on_core += 1;
                    }
                    path => assert_eq!(path, Path::Cublas, "{what}"),
                }
                assert_eq!(bwd.path, Path::Cublas, "{c:?}");
            }
        }
    }
    assert!(on_core > 0, "no forward took the mma.sync core");
}

/// Backward in several token chunks (a small chunk bound) equals the oracle.
#[test]
fn gpu_dora_backward_in_chunks() {
    let Some(gpu) = gpu() else { return };
    let chunks = Tuning {
        chunk_elems: Some(64 * 200),
        ..Tuning::AUTO
    };
    for (i, dropout) in [false, true].into_iter().enumerate() {
        for save_z in [false, true] {
            let c = Case {
                shape: LoraShape::new(150, 200, 96, 8),
                bias: true,
                dropout,
                save_z,
                nf4: None,
            };
            check_case_with::<bf16>(gpu, &c, 9000 + i as u64, chunks);
            check_case_with::<f32>(gpu, &c, 9100 + i as u64, chunks);
        }
    }
}

/// The rows of the DoRA backward's token chunks under a chunk bound of `elems` (as
/// `cuda::dora::backward` splits T: `elems / max(N, K)` rows, a multiple of 32 when
/// that is less than T).
fn chunk_rows(elems: usize, s: &LoraShape) -> usize {
    let rows = (elems / s.out_features.max(s.in_features))
        .max(32)
        .min(s.tokens);
    if rows < s.tokens {
        rows / 32 * 32
    } else {
        rows
    }
}

/// The backward's dX on the NN GEMM core (sm_90, f16/bf16, dense W, no dropout, K and N
/// multiples of 8, enough [T, K] and [chunk, K] tiles): one chunk, then chunks of 576
/// rows and a last one of 124 rows too small for the core (its G and dX by cuBLAS),
/// G = s·(dy⊙g) B from the core launch's jobs (where the fused rule allows, and forced)
/// and (fused down product off) from cuBLAS, with z saved and recomputed. The plan must
/// say the core wherever the [T, K] tiles fill the GPU (`common::core_fills`: the first
/// two shapes on at most 96 and 80 SMs, W [64, 2048] on up to 192, its 576-row chunks on
/// up to 160), and the fused G exactly where it was forced on chunks the core takes. On
/// other GPUs the same cases run the cuBLAS path.
#[test]
fn gpu_dora_backward_core_dx() {
    let Some(gpu) = gpu() else { return };
    let sm90 = gemm::supported(gpu);
    let (mut on_core, mut fused) = (0, 0);
    for (j, (chunked, fused_down)) in [
        (false, FusedDown::Auto),
        (true, FusedDown::Auto),
        (true, FusedDown::Never),
        (true, FusedDown::Force),
    ]
    .into_iter()
    .enumerate()
    {
        // (T, K, N, r, the chunked runs' bound: chunks of 576 rows; T = 520 at K = 1000
        // stays one chunk of 520)
        for (i, &(t, k, n, r, chunk_elems)) in [
            (700usize, 1024usize, 64usize, 12usize, 600 * 1024),
            (520, 1000, 88, 16, 600 * 1024),
            (700, 2048, 64, 12, 600 * 2048),
        ]
        .iter()
        .enumerate()
        {
            let tuning = Tuning {
                chunk_elems: Some(if chunked {
                    chunk_elems
                } else {
                    cuda::BACKWARD_CHUNK_ELEMS
                }),
                fused_down,
                ..Tuning::AUTO
            };
            for save_z in [false, true] {
                let c = Case {
                    shape: LoraShape::new(t, k, n, r),
                    bias: i == 0,
                    dropout: false,
                    save_z,
                    nf4: None,
                };
                let seed = 9200 + 10 * j as u64 + 2 * i as u64 + save_z as u64;
                for (_, bwd) in [
                    check_case_with::<bf16>(gpu, &c, seed, tuning),
                    check_case_with::<f16>(gpu, &c, seed + 100, tuning),
                ] {
                    let what = format!("{c:?} {tuning:?}: {bwd:?}");
                    let core = sm90 && core_fills(gpu, t, k);
                    let chunk_core = core
                        && core_fills(gpu, chunk_rows(tuning.chunk_elems.unwrap(), &c.shape), k);
                    assert_eq!(
                        bwd.path,
                        if core { Path::Core } else { Path::Cublas },
                        "{what}"
                    );
                    match fused_down {
                        FusedDown::Auto => assert!(chunk_core || !bwd.fused_down, "{what}"),
                        FusedDown::Force => assert_eq!(bwd.fused_down, chunk_core, "{what}"),
                        FusedDown::Never => assert!(!bwd.fused_down, "{what}"),
                    }
                    on_core += core as usize;
                    fused += bwd.fused_down as usize;
                }
            }
        }
    }
    if sm90 {
        assert!(
            on_core > 0 && fused > 0,
            "no DoRA backward took the core ({on_core}) or fused G ({fused})"
        );
    }
}

/// QDoRA's backward dX on the dense NN core over column panels of the NF4 W (sm_90,
/// f16/bf16, no dropout, N and K multiples of 8, enough [chunk, K] tiles): a cap of
/// 65 536 elements makes 1024-column panels of W [64, 2112] (1024, 1024, then 64 wide),
/// one NN launch each into dX's columns; one chunk, then chunks of 576 rows (the core)
/// and a last one of 124 rows too small for it (G by cuBLAS, dX over row panels), with z
/// saved and recomputed. The plan must say the column panels wherever the [T, K] tiles
/// fill the GPU (`common::core_fills`; 700 × 2112 does up to 204 SMs). On other GPUs the
/// same cases run the cuBLAS path over row panels.
#[test]
fn gpu_qdora_backward_column_panels() {
    let Some(gpu) = gpu() else { return };
    for (j, chunk_elems) in [cuda::BACKWARD_CHUNK_ELEMS, 600 * 2112]
        .into_iter()
        .enumerate()
    {
        let tuning = Tuning {
            panel_elems: Some(1024 * 64),
            chunk_elems: Some(chunk_elems),
            ..Tuning::AUTO
        };
        for save_z in [false, true] {
            let c = Case {
                shape: LoraShape::new(700, 2112, 64, 12),
                bias: save_z,
                dropout: false,
                save_z,
                nf4: Some((64, true)),
            };
            let seed = 9400 + 10 * j as u64 + save_z as u64;
            for (_, bwd) in [
                check_case_with::<bf16>(gpu, &c, seed, tuning),
                check_case_with::<f16>(gpu, &c, seed + 100, tuning),
            ] {
                let core = gemm::supported(gpu) && core_fills(gpu, 700, 2112);
                assert_eq!(
                    bwd.path,
                    if core {
                        Path::CorePanels
                    } else {
                        Path::CublasPanels
                    },
                    "{c:?} {tuning:?}: {bwd:?}"
                );
                assert!(!bwd.nf4_in_core && !bwd.fused_down, "{bwd:?}");
            }
        }
    }
}

fn qdora_cases() -> Vec<Case> {
    let shapes = [
        (1, 64, 7, 8),
        (3, 96, 200, 16),
        (5, 200, 64, 8),
        (17, 128, 333, 24),
        (32, 4096, 64, 16),
        (33, 96, 80, 8),
        (300, 200, 100, 1),
        (1, 4096, 4096, 16),
    ];
    let bss = [32, 64, 128, 256, 4096];
    shapes
        .iter()
        .enumerate()
        .map(|(i, &(t, k, n, r))| Case {
            shape: LoraShape::new(t, k, n, r),
            bias: i % 2 == 0,
            dropout: i % 3 == 1,
            save_z: i % 4 < 2,
            nf4: Some((bss[i % bss.len()], i % 2 == 1)),
        })
        .collect()
}

fn run_qdora<T: Element>(seed0: u64) {
    let Some(gpu) = gpu() else { return };
    for (i, c) in qdora_cases().iter().enumerate() {
        check_case::<T>(gpu, c, seed0 + i as u64);
    }
}

#[test]
fn gpu_qdora_f32() {
    run_qdora::<f32>(15000);
}

#[test]
fn gpu_qdora_f16() {
    run_qdora::<f16>(16000);
}

#[test]
fn gpu_qdora_bf16() {
    run_qdora::<bf16>(17000);
}

/// QDoRA forward where all of W fits one panel and the core takes the call: W
/// dequantized once, the scale in the core's epilogue (sm_90; cuBLAS panels elsewhere).
#[test]
fn gpu_qdora_one_panel_core() {
    let Some(gpu) = gpu() else { return };
    for (i, (bias, save_z, blocksize)) in [(true, true, 64), (false, false, 128), (true, false, 64)]
        .into_iter()
        .enumerate()
    {
        let c = Case {
            shape: LoraShape::new(600, 256, 2048, 16),
            bias,
            dropout: false,
            save_z,
            nf4: Some((blocksize, i % 2 == 0)),
        };
        let (fwd, _) = if i == 1 {
            check_case::<f16>(gpu, &c, 900 + i as u64)
        } else {
            check_case::<bf16>(gpu, &c, 900 + i as u64)
        };
        if gpu.compute_capability().0 == 9 {
            assert_eq!(fwd.path, Path::CorePanels, "case {i}: {fwd:?}");
        }
    }
}

/// QDoRA over many row panels (8-row, a ragged 13-row cap, 3-row; the forward's norms
/// too) and backward chunks, all on cuBLAS over the panels (T < 129: no core; T = 3 with
/// K % 32 != 0: no fused small-T pass); and its magnitude init and norms (over their
/// default panel bound: those ops take no tuning) against the oracle's.
#[test]
fn gpu_qdora_many_panels() {
    let Some(gpu) = gpu() else { return };
    for (i, (cap_rows, shape)) in [
        (8, LoraShape::new(40, 96, 61, 8)),
        (13, LoraShape::new(70, 64, 45, 4)),
        (3, LoraShape::new(3, 200, 20, 16)),
    ]
    .into_iter()
    .enumerate()
    {
        let panels = Tuning {
            panel_elems: Some(cap_rows * shape.in_features),
            ..Tuning::AUTO
        };
        for dropout in [false, true] {
            let c = Case {
                shape,
                bias: true,
                dropout,
                save_z: i == 1,
                nf4: Some((64, i % 2 == 0)),
            };
            for (fwd, bwd) in [
                check_case_with::<bf16>(gpu, &c, 18000 + i as u64, panels),
                check_case_with::<f32>(gpu, &c, 18100 + i as u64, panels),
            ] {
                assert_eq!(fwd.path, Path::CublasPanels, "{c:?}: {fwd:?}");
                assert_eq!(bwd.path, Path::CublasPanels, "{c:?}: {bwd:?}");
            }
        }
        // Magnitude init and norms, against the oracle.
        let mut rng = Rng::new(18200 + i as u64);
        let (k, n) = (shape.in_features, shape.out_features);
        let wd: Vec<f32> = rng.vec(shape.w_len(), 1.0);
        let a: Vec<f32> = rng.vec(shape.a_len(), 0.5);
        let b: Vec<f32> = rng.vec(shape.b_len(), 0.5);
        let q = Nf4Weight::quantize(&wd, n, k, 64, true).unwrap();
        let mut m_ref = vec![0.0f32; n];
        cpu_q::magnitude_init(&shape, 1.5, &q, &a, &b, &mut m_ref).unwrap();
        let mut norm_ref = vec![0.0f32; n];
        cpu_q::weight_norm(&shape, 1.5, &q, &a, &b, &mut norm_ref).unwrap();
        let wq = Nf4Device::upload(gpu, &q).unwrap();
        let (ad, bd) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
        let mut m = gpu.upload(&vec![f32::NAN; n]).unwrap();
        cuda_q::magnitude_init(gpu, &shape, 1.5, &wq, &ad, &bd, &mut m).unwrap();
        let mut norm = gpu.upload(&vec![f32::NAN; n]).unwrap();
        cuda_q::weight_norm(gpu, &shape, 1.5, &wq, &ad, &bd, &mut norm).unwrap();
        for (what, got) in [
            ("m", gpu.download(&m).unwrap()),
            ("norm", gpu.download(&norm).unwrap()),
        ] {
            let want = if what == "m" { &m_ref } else { &norm_ref };
            for o in 0..n {
                // f32 sums of K + r terms against the oracle's f64.
                let tol = (k + shape.rank) as f64 * 2f64.powi(-23) * want[o] as f64;
                assert!(
                    ((got[o] - want[o]) as f64).abs() <= tol,
                    "panels {cap_rows}: {what}[{o}] {} vs {}",
                    got[o],
                    want[o]
                );
            }
        }
    }
}

#[test]
fn gpu_qdora_bad_arguments_are_errors() {
    let Some(gpu) = gpu() else { return };
    let s = LoraShape::new(2, 64, 8, 4);
    let opts = LoraOptions::new(1.0);
    let v = |l: usize| gpu.zeros::<bf16>(l).unwrap();
    let q = Nf4Weight::quantize(&vec![bf16::ONE; 64 * 9], 9, 64, 64, false).unwrap();
    let wq = Nf4Device::upload(gpu, &q).unwrap();
    let (x, a, b, m) = (v(s.x_len()), v(s.a_len()), v(s.b_len()), v(8));
    let mut y = v(s.y_len());
    let qw = DoraWeights {
        w: &wq,
        a: &a,
        b: &b,
        bias: None,
        magnitude: &m,
    };
    let e = cuda_q::forward::<bf16, _, _, DevF32>(gpu, &s, &opts, &x, qw, DoraOutputs::y(&mut y))
        .unwrap_err();
    assert!(matches!(e, Error::Dim { name: "w.rows", .. }), "{e}");
    let mut norm = gpu.zeros::<f32>(8).unwrap();
    let e = cuda_q::weight_norm(gpu, &s, 1.0, &wq, &a, &b, &mut norm).unwrap_err();
    assert!(matches!(e, Error::Dim { name: "w.rows", .. }), "{e}");
    let q = Nf4Weight::quantize(&vec![bf16::ONE; 64 * 8], 8, 64, 64, false).unwrap();
    let wq = Nf4Device::upload(gpu, &q).unwrap();
    let short = v(7);
    let qw = DoraWeights {
        w: &wq,
        magnitude: &short,
        ..qw
    };
    let e = cuda_q::forward::<bf16, _, _, DevF32>(gpu, &s, &opts, &x, qw, DoraOutputs::y(&mut y))
        .unwrap_err();
    assert!(matches!(e, Error::Length { .. }), "{e}");
}

#[test]
fn gpu_matches_peft_dora_fixture() {
    let Some(gpu) = gpu() else { return };
    let fx = Fixture::open("peft_dora_48x80_r8.safetensors");
    let s = LoraShape::new(
        fx.meta_usize("T"),
        fx.meta_usize("k"),
        fx.meta_usize("n"),
        fx.meta_usize("r"),
    );
    let opts = LoraOptions::new(fx.meta_f32("scaling"));
    let up = |name: &str| gpu.upload(&fx.f32(name)).unwrap();
    let (x, w, a, b, m, dyv) = (
        up("x"),
        up("W"),
        up("A"),
        up("B"),
        up("magnitude"),
        up("dy"),
    );
    let mut y = gpu.zeros::<f32>(s.y_len()).unwrap();
    let mut h = gpu.zeros::<f32>(s.h_len()).unwrap();
    let mut norm = gpu.zeros::<f32>(s.out_features).unwrap();
    cuda::forward(
        gpu,
        &s,
        &opts,
        &x,
        dw(&w, &a, &b, None, &m),
        DoraOutputs {
            y: &mut y,
            h: Some(&mut h),
            norm: Some(&mut norm),
            z: None,
        },
    )
    .unwrap();
    let e = rel_err(&gpu.download(&y).unwrap(), &fx.f32("y"));
    assert!(e < 1e-5, "y rel err {e}");
    let mut g: Vec<_> = [s.x_len(), s.a_len(), s.b_len(), s.out_features]
        .iter()
        .map(|&l| gpu.zeros::<f32>(l).unwrap())
        .collect();
    let [dx, da, db, dm] = &mut g[..] else {
        unreachable!()
    };
    cuda::backward(
        gpu,
        &s,
        &opts,
        &x,
        dw(&w, &a, &b, None, &m),
        DoraSaved {
            h: &h,
            norm: &norm,
            z: None,
        },
        &dyv,
        DoraGrads { dx, da, db, dm },
    )
    .unwrap();
    for (name, got) in ["dx", "dA", "dB", "dmagnitude"].iter().zip(&g) {
        let e = rel_err(&gpu.download(got).unwrap(), &fx.f32(name));
        assert!(e < 1e-5, "{name} rel err {e}");
    }
}

#[test]
fn gpu_bad_arguments_are_errors() {
    let Some(gpu) = gpu() else { return };
    let s = LoraShape::new(2, 8, 4, 2);
    let opts = LoraOptions::new(1.0);
    let v = |l: usize| gpu.zeros::<bf16>(l).unwrap();
    let (x, w, a, b, m) = (v(s.x_len()), v(s.w_len()), v(s.a_len()), v(s.b_len()), v(3));
    let mut y = v(s.y_len());
    let err = cuda::forward::<bf16, _, _, DevF32>(
        gpu,
        &s,
        &opts,
        &x,
        dw(&w, &a, &b, None, &m),
        DoraOutputs::y(&mut y),
    )
    .unwrap_err();
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
    let mut norm = gpu.zeros::<f32>(5).unwrap();
    let err = cuda::weight_norm(gpu, &s, 1.0, &w, &a, &b, &mut norm).unwrap_err();
    assert!(matches!(err, Error::Length { name: "norm", .. }), "{err}");
    let rank0 = LoraShape::new(2, 8, 4, 0);
    let err = cuda::magnitude_init(gpu, &rank0, 1.0, &w, &a, &b, &mut y).unwrap_err();
    assert!(matches!(err, Error::Dim { name: "rank", .. }), "{err}");
}

type DevF32 = cudarc::driver::CudaSlice<f32>;
