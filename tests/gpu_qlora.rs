//! GPU QLoRA linear (LoRA over an NF4 base) against the CPU oracle: every dtype, odd
//! shapes, T on both sides of the fused small-T path, every blocksize class, plain and
//! double-quantized scales, bias and dropout alternating, the GEMM core's NF4 kernel on
//! core-sized shapes, and the panel path with many (and ragged) panels. Outputs are poisoned (NaN) first. Without a GPU these tests
//! print a loud SKIPPED note and return; `LORA_KERNELS_REQUIRE_GPU=1` makes them fail.

mod common;

use common::{abs, assert_close, core_fills, gpu, poison, Rng};
use lora_kernels::cpu::{lora as cpu_lora, qlora as cpu};
use lora_kernels::cuda::nf4::Nf4Device;
use lora_kernels::cuda::{gemm, qlora as cuda, Gpu, Path, Plan};
use lora_kernels::{
    bf16, f16, Dropout, Element, Error, LoraGrads, LoraOptions, LoraShape, LoraWeights, Nf4Weight,
    QloraWeights, Tuning,
};

#[derive(Debug, Clone, Copy)]
struct Case {
    shape: LoraShape,
    bs: usize,
    dq: bool,
    bias: bool,
    dropout: bool,
    /// The path tuning of both calls.
    tuning: Tuning,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let shapes = [
        (1, 64, 7, 8),
        (3, 96, 200, 16),
        (5, 200, 64, 8), // K % 32 != 0: the panel path at small T
        (17, 4096, 64, 1),
        (32, 128, 333, 64),
        (33, 96, 80, 8),
        (128, 200, 64, 16),
        (1000, 64, 200, 8),
        (1, 4096, 4096, 16),
        (16, 4096, 1000, 16),
        (300, 4096, 1000, 16),
    ];
    let bss = [32, 64, 128, 256, 4096];
    for (i, &(t, k, n, r)) in shapes.iter().enumerate() {
        v.push(Case {
            shape: LoraShape::new(t, k, n, r),
            bs: bss[i % bss.len()],
            dq: i % 2 == 0,
            bias: i % 3 != 1,
            dropout: i % 3 == 2,
            tuning: Tuning::AUTO,
        });
    }
    v
}

fn opts_for(c: &Case, seed: u64) -> LoraOptions {
    let o = LoraOptions::new(1.75).with_tuning(c.tuning);
    if c.dropout {
        o.with_dropout(Dropout::new(0.25, seed, 12))
    } else {
        o
    }
}

fn lw<'a, S: ?Sized>(w: &'a S, a: &'a S, b: &'a S, bias: Option<&'a S>) -> LoraWeights<'a, S> {
    LoraWeights { w, a, b, bias }
}

/// The forward and the backward against the oracle; returns their plans.
fn check_case<T: Element>(gpu: &Gpu, c: &Case, seed: u64) -> (Plan, Plan) {
    let s = c.shape;
    let (t, k, n) = (s.tokens, s.in_features, s.out_features);
    let what = format!(
        "{} {:?} bs={} dq={} bias={} dropout={}",
        common::dtype_name::<T>(),
        s,
        c.bs,
        c.dq,
        c.bias,
        c.dropout
    );
    let mut rng = Rng::new(seed);
    let w_dense: Vec<T> = rng.vec(s.w_len(), 0.05);
    let q = Nf4Weight::quantize(&w_dense, n, k, c.bs, c.dq).unwrap();
    let x: Vec<T> = rng.vec(s.x_len(), 1.0);
    let a: Vec<T> = rng.vec(s.a_len(), 1.0);
    let b: Vec<T> = rng.vec(s.b_len(), 1.0);
    let bias: Option<Vec<T>> = c.bias.then(|| rng.vec(n, 1.0));
    let dy: Vec<T> = rng.vec(s.y_len(), 1.0);
    let opts = opts_for(c, seed);
    let abs_opts = LoraOptions {
        scale: opts.scale.abs(),
        ..opts
    };
    let qw = |bias| QloraWeights {
        w: &q,
        a: &a[..],
        b: &b[..],
        bias,
    };

    // Oracle, and the LoRA oracle on absolute values (|deq(W)|) for the tolerance.
    let mut y_ref = vec![T::default(); s.y_len()];
    let mut h_ref = vec![T::default(); s.h_len()];
    cpu::forward(
        &s,
        &opts,
        &x,
        qw(bias.as_deref()),
        &mut y_ref,
        Some(&mut h_ref),
    )
    .unwrap();
    let wd_abs = abs(&q.dequantize::<T>().unwrap());
    let (ax, aa, ab) = (abs(&x), abs(&a), abs(&b));
    let abias = bias.as_ref().map(|v| abs(v));
    let mut y_mag = vec![T::default(); s.y_len()];
    let mut h_mag = vec![T::default(); s.h_len()];
    cpu_lora::forward(
        &s,
        &abs_opts,
        &ax,
        lw(&wd_abs[..], &aa[..], &ab[..], abias.as_deref()),
        &mut y_mag,
        Some(&mut h_mag),
    )
    .unwrap();

    let up = |v: &[T]| gpu.upload(v).unwrap();
    let dev = Nf4Device::upload(gpu, &q).unwrap();
    let (xd, ad, bd) = (up(&x), up(&a), up(&b));
    let biasd = bias.as_ref().map(|v| up(v));
    let mut y = up(&poison::<T>(s.y_len()));
    let mut h = up(&poison::<T>(s.h_len()));
    let dw = |bias| QloraWeights {
        w: &dev,
        a: &ad,
        b: &bd,
        bias,
    };
    let fwd_plan = cuda::forward(
        gpu,
        &s,
        &opts,
        &xd,
        dw(biasd.as_ref()),
        &mut y,
        Some(&mut h),
    )
    .unwrap_or_else(|e| panic!("{what}: forward: {e}"));
    let h_gpu = gpu.download(&h).unwrap();
    assert_close(&format!("{what}: h"), &h_gpu, &h_ref, &h_mag, k);
    assert_close(
        &format!("{what}: y"),
        &gpu.download(&y).unwrap(),
        &y_ref,
        &y_mag,
        k + s.rank + 1,
    );

    // Backward from the GPU's h on both sides.
    let zeros = |len: usize| vec![T::default(); len];
    let (mut dx_ref, mut da_ref, mut db_ref) =
        (zeros(s.x_len()), zeros(s.a_len()), zeros(s.b_len()));
    cpu::backward(
        &s,
        &opts,
        &x,
        qw(None),
        &h_gpu,
        &dy,
        LoraGrads {
            dx: &mut dx_ref[..],
            da: &mut da_ref[..],
            db: &mut db_ref[..],
        },
    )
    .unwrap();
    let (mut dx_mag, mut da_mag, mut db_mag) =
        (zeros(s.x_len()), zeros(s.a_len()), zeros(s.b_len()));
    cpu_lora::backward(
        &s,
        &abs_opts,
        &ax,
        lw(&wd_abs[..], &aa[..], &ab[..], None),
        &abs(&h_gpu),
        &abs(&dy),
        LoraGrads {
            dx: &mut dx_mag[..],
            da: &mut da_mag[..],
            db: &mut db_mag[..],
        },
    )
    .unwrap();
    let (hd, dyd) = (up(&h_gpu), up(&dy));
    let mut dx = up(&poison::<T>(s.x_len()));
    let mut da = up(&poison::<T>(s.a_len()));
    let mut db = up(&poison::<T>(s.b_len()));
    let bwd_plan = cuda::backward(
        gpu,
        &s,
        &opts,
        &xd,
        dw(None),
        &hd,
        &dyd,
        LoraGrads {
            dx: &mut dx,
            da: &mut da,
            db: &mut db,
        },
    )
    .unwrap_or_else(|e| panic!("{what}: backward: {e}"));
    let dl = |d| gpu.download(d).unwrap();
    assert_close(
        &format!("{what}: dx"),
        &dl(&dx),
        &dx_ref,
        &dx_mag,
        n + s.rank,
    );
    assert_close(&format!("{what}: dA"), &dl(&da), &da_ref, &da_mag, t + n);
    assert_close(&format!("{what}: dB"), &dl(&db), &db_ref, &db_mag, t);
    (fwd_plan, bwd_plan)
}

/// Every case with the default tuning: the fused small-T pass where it applies (T ≤ 32,
/// K % 32 == 0), the NF4 core never (it is off by default).
fn run_all<T: Element>(seed0: u64) {
    let Some(gpu) = gpu() else { return };
    for (i, c) in cases().iter().enumerate() {
        let (fwd, bwd) = check_case::<T>(gpu, c, seed0 + i as u64);
        let s = c.shape;
        let small = s.tokens <= lora_kernels::cuda::nf4::SMALL_T_MAX && s.in_features % 32 == 0;
        assert_eq!(fwd.path == Path::SmallFused, small, "{c:?}: {fwd:?}");
        assert!(
            !fwd.nf4_in_core && !bwd.nf4_in_core,
            "{c:?}: {fwd:?} {bwd:?}"
        );
    }
}

#[test]
fn gpu_qlora_f32() {
    run_all::<f32>(7000);
}
#[test]
fn gpu_qlora_f16() {
    run_all::<f16>(8000);
}
#[test]
fn gpu_qlora_bf16() {
    run_all::<bf16>(9000);
}

/// Shapes the GEMM core's NF4 kernel takes on an H100 (T ≥ 129 and enough 128 × 128
/// output tiles for the SMs; f16/bf16, K % 32 == 0), with `Tuning::nf4_core`: the
/// forward's y comes from the producer warpgroup's shared-memory dequantize, with the
/// low-rank K-slice, bias and dropout (U from the down kernel on the dropped x); then the
/// same cases on the default panel path. Blocks cross rows (K % blocksize != 0), K is not
/// a multiple of 64, tile-row counts are odd, N both not a multiple of 8 (direct stores)
/// and a multiple of 8 (TMA stores). The last three shapes (enough [T, K] tiles, N % 8
/// == 0, no dropout) take the backward's NF4 NN core with `Tuning::nf4_core`: dX from
/// W's [64-row × tile] pieces dequantized in shared memory, N not a multiple of 64
/// (zero-filled rows), blocks crossing rows, ranks 12, 16, 64. The plans must say so
/// wherever the tiles fill the GPU (`common::core_fills`: the first three forwards and
/// the last three backwards with 132 SMs). On other GPUs both runs take the panel path.
#[test]
fn gpu_qlora_core_sized() {
    let Some(gpu) = gpu() else { return };
    let sm90 = gemm::supported(gpu);
    let (mut fwd_core, mut bwd_core) = (0, 0);
    let cases = [
        (LoraShape::new(300, 96, 2900, 8), 32, false, true, true),
        (LoraShape::new(257, 320, 2816, 64), 128, true, false, false),
        (LoraShape::new(515, 160, 1800, 16), 4096, true, true, false),
        (LoraShape::new(300, 2848, 328, 16), 64, true, true, false),
        (
            LoraShape::new(257, 2880, 1000, 64),
            4096,
            false,
            false,
            false,
        ),
        (LoraShape::new(520, 1792, 776, 12), 256, true, true, false),
    ];
    for (i, &(shape, bs, dq, bias, dropout)) in cases.iter().enumerate() {
        for nf4_core in [true, false] {
            let c = Case {
                shape,
                bs,
                dq,
                bias,
                dropout,
                tuning: Tuning {
                    nf4_core,
                    ..Tuning::AUTO
                },
            };
            for (fwd, bwd) in [
                check_case::<bf16>(gpu, &c, 700 + i as u64),
                check_case::<f16>(gpu, &c, 710 + i as u64),
            ] {
                let what = format!("{c:?}: {fwd:?} {bwd:?}");
                let (t, k, n) = (shape.tokens, shape.in_features, shape.out_features);
                // The NF4 core where the tiles fill the GPU (the rest of its rule holds
                // for every case here), else dense panels (into the core or cuBLAS).
                let fwd_nf4 = nf4_core && sm90 && core_fills(gpu, t, n);
                let bwd_nf4 = nf4_core && sm90 && core_fills(gpu, t, k) && !dropout && n % 8 == 0;
                assert_eq!(fwd.nf4_in_core, fwd_nf4, "{what}");
                assert_eq!(fwd.path == Path::Core, fwd_nf4, "{what}");
                assert_eq!(bwd.nf4_in_core, bwd_nf4, "{what}");
                assert_eq!(bwd.path == Path::Core, bwd_nf4, "{what}");
                fwd_core += fwd_nf4 as usize;
                bwd_core += bwd_nf4 as usize;
            }
        }
    }
    if sm90 {
        assert!(
            fwd_core > 0 && bwd_core > 0,
            "the NF4 core ran {fwd_core} forwards and {bwd_core} backwards"
        );
    }
}

/// The core-sized cases on the mma.sync kernels (the sm_80 .. sm_89 path, forced on
/// sm_90 by `Tuning::mma_path`): the panel path's dense core over each dequantized
/// panel, storing into y's columns (row stride N), with 1000-row panels and one panel
/// (N = 2904); N = 2900 (not a multiple of 8: no TMA stores into y's columns) takes
/// cuBLAS over the panel instead. The backward on cuBLAS (the NN core is wgmma-only).
#[test]
fn gpu_qlora_mma_path() {
    let Some(gpu) = gpu() else { return };
    let mut on_core = 0;
    for (i, (cap_rows, shape)) in [
        (1000, LoraShape::new(257, 320, 2816, 16)),
        (0, LoraShape::new(300, 96, 2900, 8)),
        (0, LoraShape::new(300, 96, 2904, 8)),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = panel_case(cap_rows, shape, i == 0, i == 1);
        c.tuning.mma_path = true;
        for (fwd, bwd) in [
            check_case::<bf16>(gpu, &c, 800 + i as u64),
            check_case::<f16>(gpu, &c, 810 + i as u64),
        ] {
            let what = format!("{c:?}: {fwd:?} {bwd:?}");
            let core =
                shape.out_features % 8 == 0 && core_fills(gpu, shape.tokens, shape.out_features);
            if core {
                assert!(fwd.path == Path::CorePanels && fwd.mma, "{what}");
                on_core += 1;
            } else {
                assert_eq!(fwd.path, Path::CublasPanels, "{what}");
            }
            assert_eq!(bwd.path, Path::CublasPanels, "{what}");
        }
    }
    assert!(
        on_core > 0,
        "no forward took the mma.sync core over the panels"
    );
}

/// Many panels: 8-row panels, a 13-row cap (8-row panels, the last ragged), 3-row
/// panels (fewer than 8 rows fit) and 1000-row panels of a core-sized layer, on the
/// large-T path and the backward; and a layer whose backward takes the column panels
/// on an H100 (N % 8 == 0, enough [T, K] tiles, no dropout): a cap of 118 rows is
/// 336 064 elements, so 1024-column panels of W [328, 2848] (the narrowest the path
/// takes), the last 800 wide, each dequantized (a strided read of W) for one NN core
/// launch into dX's columns.
#[test]
fn gpu_qlora_many_panels() {
    let Some(gpu) = gpu() else { return };
    for (i, (cap_rows, shape)) in [
        (8, LoraShape::new(40, 96, 61, 8)),
        (13, LoraShape::new(70, 64, 45, 4)),
        (3, LoraShape::new(33, 200, 20, 16)),
        // Core-sized (on an H100 the dense GEMM core runs once per panel, storing into
        // y's columns): 1000-row panels, the last one 816 rows.
        (1000, LoraShape::new(257, 320, 2816, 16)),
        (118, LoraShape::new(300, 2848, 328, 16)),
    ]
    .into_iter()
    .enumerate()
    {
        let c = panel_case(cap_rows, shape, i % 2 == 0, i == 1);
        let mut plans = vec![check_case::<bf16>(gpu, &c, 500 + i as u64)];
        if i >= 3 {
            plans.push(check_case::<f16>(gpu, &c, 650 + i as u64));
        } else {
            plans.push(check_case::<f32>(gpu, &c, 600 + i as u64));
        }
        for (j, (fwd, bwd)) in plans.into_iter().enumerate() {
            let what = format!("{c:?}: {fwd:?} {bwd:?}");
            // Dense panels everywhere: into the core where it takes them (bf16 and f16 on
            // sm_90, the tiles filling the GPU: the forward's 1000-row panels of the fourth
            // layer, the backward's column panels of the fifth), else cuBLAS.
            let core = (j == 0 || i >= 3) && gemm::supported(gpu);
            let (t, k, n) = (shape.tokens, shape.in_features, shape.out_features);
            let fwd_core = core && i == 3 && core_fills(gpu, t, n);
            let bwd_core = core && i == 4 && core_fills(gpu, t, k);
            let panels = |core| {
                if core {
                    Path::CorePanels
                } else {
                    Path::CublasPanels
                }
            };
            assert_eq!(fwd.path, panels(fwd_core), "{what}");
            assert_eq!(bwd.path, panels(bwd_core), "{what}");
        }
    }
}

/// The blocksize-64 case with bias over `shape`, its panels capped at `cap_rows` rows of
/// W (0: the default cap).
fn panel_case(cap_rows: usize, shape: LoraShape, dq: bool, dropout: bool) -> Case {
    Case {
        shape,
        bs: 64,
        dq,
        bias: true,
        dropout,
        tuning: Tuning {
            panel_elems: (cap_rows > 0).then_some(cap_rows * shape.in_features),
            ..Tuning::AUTO
        },
    }
}

#[test]
fn qlora_bad_arguments_are_errors() {
    let Some(gpu) = gpu() else { return };
    let s = LoraShape::new(2, 64, 8, 4);
    let q = Nf4Weight::quantize(&vec![bf16::ONE; 64 * 9], 9, 64, 64, false).unwrap();
    let dev = Nf4Device::upload(gpu, &q).unwrap();
    let x = gpu.upload(&vec![bf16::ONE; s.x_len()]).unwrap();
    let a = gpu.upload(&vec![bf16::ONE; s.a_len()]).unwrap();
    let b = gpu.upload(&vec![bf16::ONE; s.b_len()]).unwrap();
    let mut y = gpu.zeros::<bf16>(s.y_len()).unwrap();
    let w = QloraWeights {
        w: &dev,
        a: &a,
        b: &b,
        bias: None,
    };
    let opts = LoraOptions::new(1.0);
    assert!(matches!(
        cuda::forward(gpu, &s, &opts, &x, w, &mut y, None),
        Err(Error::Dim { name: "w.rows", .. })
    ));
    let q = Nf4Weight::quantize(&vec![bf16::ONE; 64 * 8], 8, 64, 64, false).unwrap();
    let dev = Nf4Device::upload(gpu, &q).unwrap();
    let w = QloraWeights { w: &dev, ..w };
    let mut short = gpu.zeros::<bf16>(s.y_len() - 1).unwrap();
    assert!(matches!(
        cuda::forward(gpu, &s, &opts, &x, w, &mut short, None),
        Err(Error::Length { name: "y", .. })
    ));
    let bad = LoraShape::new(2, 64, 8, 0);
    assert!(matches!(
        cuda::forward(gpu, &bad, &opts, &x, w, &mut y, None),
        Err(Error::Dim { .. })
    ));
}
