//! LoRA linear benches, bf16, K = 4096, N ∈ {4096, 11008}, r ∈ {16, 64},
//! T ∈ {1, 16, 512, 4096}. In one process, on one device:
//!
//! - `base`: cuBLAS `y = x Wᵀ` alone (fwd+bwd: also `dX = dY W`);
//! - `composed`: the plain cuBLAS LoRA (base, `h = x Aᵀ`, `y += s·h Bᵀ` with beta = 1;
//!   fwd+bwd adds `g = dY B`, `dX = dY W + s·g A`, `dA = s·gᵀ x`, `dB = s·dYᵀ h`);
//! - `ours`: `cuda::lora::forward` (and `backward`); on sm_90 its T > 32 forward is the
//!   GEMM core path;
//! - `ours_cublas_path` (the table's last column, forward only): `forward` with the GEMM
//!   core path switched off (`Tuning { core: CorePolicy::Never, .. }`), the down kernel,
//!   a skinny cuBLAS product and a beta = 1 cuBLAS base GEMM;
//! - `ours_fwd_down_kernel` (the table's `downk/b`, forward only): `forward` with the
//!   down product's fusion into the core switched off
//!   (`Tuning { fused_down: FusedDown::Never, .. }`): the down kernel, then the core
//!   launch;
//! - `ours_fwdbwd_cublas_dx` (the table's `cuBdx/b`, forward + backward): `ours`'s forward,
//!   then `backward` with the core switched off (dX by cuBLAS `dY W` and a beta = 1
//!   `s·g A`), against `base_fwdbwd`.
//!
//! Inputs are random and rotated over enough copies to exceed the L2 cache (≥ 128 MB per
//! rotation). Each figure is the median of many CUDA-event-timed batches. A table of µs,
//! TFLOP/s, GB/s and the ratios is printed at the end (and written to
//! `$LORA_KERNELS_BENCH_OUT` if set); criterion also records each op.
//! `LORA_KERNELS_BENCH_FILTER=T16_N4096` keeps only the shapes whose tag contains it;
//! `LORA_KERNELS_BENCH_QUICK=1` runs r = 16 only, with fewer samples.
//! `LORA_KERNELS_BENCH_OPS=ours_fwdbwd,base_fwd` runs only the named ops (the others read
//! NaN), e.g. to profile one op's launches under ncu.
//! Without a GPU the bench says so and exits.

use std::fmt::Write as _;
use std::time::Duration;

mod common;

use cudarc::driver::CudaSlice;
use lora_kernels::cuda::{gemm, lora as cuda, Gpu};
use lora_kernels::tuning::{CorePolicy, FusedDown};
use lora_kernels::{bf16, LoraGrads, LoraOptions, LoraShape, LoraWeights, Tuning};

struct Set {
    x: CudaSlice<bf16>,
    w: CudaSlice<bf16>,
    a: CudaSlice<bf16>,
    b: CudaSlice<bf16>,
    dy: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    h: CudaSlice<bf16>,
    g: CudaSlice<bf16>,
    dx: CudaSlice<bf16>,
    da: CudaSlice<bf16>,
    db: CudaSlice<bf16>,
}

fn random(gpu: &Gpu, n: usize, seed: u64, scale: f32) -> CudaSlice<bf16> {
    gpu.upload(&common::random_bf16(n, seed, scale)).unwrap()
}

fn make_set(gpu: &Gpu, s: &LoraShape, seed: u64) -> Set {
    let k = s.in_features as f32;
    Set {
        x: random(gpu, s.x_len(), seed, 1.0),
        w: random(gpu, s.w_len(), seed + 1, 1.0 / k.sqrt()),
        a: random(gpu, s.a_len(), seed + 2, 1.0 / k.sqrt()),
        b: random(gpu, s.b_len(), seed + 3, 0.1),
        dy: random(gpu, s.y_len(), seed + 4, 1.0),
        y: gpu.zeros(s.y_len()).unwrap(),
        h: gpu.zeros(s.h_len()).unwrap(),
        g: gpu.zeros(s.h_len()).unwrap(),
        dx: gpu.zeros(s.x_len()).unwrap(),
        da: gpu.zeros(s.a_len()).unwrap(),
        db: gpu.zeros(s.b_len()).unwrap(),
    }
}

fn set_bytes(s: &LoraShape) -> usize {
    2 * (2 * s.x_len() + s.w_len() + 2 * s.y_len() + s.a_len() + s.b_len())
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    BaseFwd,
    ComposedFwd,
    OursFwd,
    BaseFwdBwd,
    ComposedFwdBwd,
    OursFwdBwd,
    OursFwdCublas,
    OursFwdDownKernel,
    OursFwdBwdCublasDx,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::BaseFwd => "base_fwd",
            Op::ComposedFwd => "composed_fwd",
            Op::OursFwd => "ours_fwd",
            Op::BaseFwdBwd => "base_fwdbwd",
            Op::ComposedFwdBwd => "composed_fwdbwd",
            Op::OursFwdBwd => "ours_fwdbwd",
            Op::OursFwdCublas => "ours_fwd_cublas_path",
            Op::OursFwdDownKernel => "ours_fwd_down_kernel",
            Op::OursFwdBwdCublasDx => "ours_fwdbwd_cublas_dx",
        }
    }
}

/// cuBLAS `y = x Wᵀ`: the base forward every variant starts from.
fn base_fwd(gpu: &Gpu, s: &LoraShape, set: &mut Set) {
    let (t, k, n) = (s.tokens, s.in_features, s.out_features);
    gemm(
        gpu, t, n, k, 1.0, &set.x, false, &set.w, true, 0.0, &mut set.y,
    )
    .unwrap();
}

/// cuBLAS `dX = dY W`, plus `beta` times what dX holds.
fn base_dx(gpu: &Gpu, s: &LoraShape, set: &mut Set, beta: f32) {
    let (t, k, n) = (s.tokens, s.in_features, s.out_features);
    gemm(
        gpu,
        t,
        k,
        n,
        1.0,
        &set.dy,
        false,
        &set.w,
        false,
        beta,
        &mut set.dx,
    )
    .unwrap();
}

fn run(gpu: &Gpu, s: &LoraShape, opts: &LoraOptions, op: Op, set: &mut Set) {
    let (t, k, n, r) = (s.tokens, s.in_features, s.out_features, s.rank);
    let sc = opts.scale;
    match op {
        Op::BaseFwd => base_fwd(gpu, s, set),
        Op::BaseFwdBwd => {
            base_fwd(gpu, s, set);
            base_dx(gpu, s, set, 0.0);
        }
        Op::ComposedFwd | Op::ComposedFwdBwd => {
            base_fwd(gpu, s, set);
            gemm(
                gpu, t, r, k, 1.0, &set.x, false, &set.a, true, 0.0, &mut set.h,
            )
            .unwrap();
            gemm(
                gpu, t, n, r, sc, &set.h, false, &set.b, true, 1.0, &mut set.y,
            )
            .unwrap();
            if op == Op::ComposedFwdBwd {
                gemm(
                    gpu, t, r, n, 1.0, &set.dy, false, &set.b, false, 0.0, &mut set.g,
                )
                .unwrap();
                base_dx(gpu, s, set, 0.0);
                gemm(
                    gpu,
                    t,
                    k,
                    r,
                    sc,
                    &set.g,
                    false,
                    &set.a,
                    false,
                    1.0,
                    &mut set.dx,
                )
                .unwrap();
                gemm(
                    gpu,
                    r,
                    k,
                    t,
                    sc,
                    &set.g,
                    true,
                    &set.x,
                    false,
                    0.0,
                    &mut set.da,
                )
                .unwrap();
                gemm(
                    gpu,
                    n,
                    r,
                    t,
                    sc,
                    &set.dy,
                    true,
                    &set.h,
                    false,
                    0.0,
                    &mut set.db,
                )
                .unwrap();
            }
        }
        Op::OursFwd
        | Op::OursFwdBwd
        | Op::OursFwdCublas
        | Op::OursFwdDownKernel
        | Op::OursFwdBwdCublasDx => {
            let wts = LoraWeights {
                w: &set.w,
                a: &set.a,
                b: &set.b,
                bias: None,
            };
            let fwd = opts.with_tuning(Tuning {
                core: if op == Op::OursFwdCublas {
                    CorePolicy::Never
                } else {
                    CorePolicy::Auto
                },
                fused_down: if op == Op::OursFwdDownKernel || no_fused_down() {
                    FusedDown::Never
                } else {
                    FusedDown::Auto
                },
                ..opts.tuning
            });
            cuda::forward(gpu, s, &fwd, &set.x, wts, &mut set.y, Some(&mut set.h)).unwrap();
            if op == Op::OursFwdBwd || op == Op::OursFwdBwdCublasDx {
                let grads = LoraGrads {
                    dx: &mut set.dx,
                    da: &mut set.da,
                    db: &mut set.db,
                };
                let bwd = opts.with_tuning(Tuning {
                    core: if op == Op::OursFwdBwd {
                        CorePolicy::Auto
                    } else {
                        CorePolicy::Never
                    },
                    ..opts.tuning
                });
                cuda::backward(gpu, s, &bwd, &set.x, wts, &set.h, &set.dy, grads).unwrap();
            }
        }
    }
}

/// `LORA_KERNELS_BENCH_NO_FUSED_DOWN=1`: every `ours` forward with the down kernel (for
/// profiling the two core launches under the same op order).
fn no_fused_down() -> bool {
    std::env::var("LORA_KERNELS_BENCH_NO_FUSED_DOWN").is_ok_and(|v| v == "1")
}

/// Seconds for `iters` runs, rotating over the sets, timed with CUDA events.
fn time_iters(
    gpu: &Gpu,
    s: &LoraShape,
    opts: &LoraOptions,
    op: Op,
    sets: &mut [Set],
    iters: u64,
) -> f64 {
    let n = sets.len();
    common::time_iters(gpu, iters, |i| run(gpu, s, opts, op, &mut sets[i % n]))
}

/// The JSON records of one shape: our forward and forward + backward, each against the
/// composed cuBLAS LoRA and against cuBLAS's base product alone (`us` in `ops` order).
fn record(rec: &common::Recorder, s: &LoraShape, us: &[f64]) {
    let (t, k, n, r) = (s.tokens, s.in_features, s.out_features, s.rank);
    let shape = format!("T={t} K={k} N={n} r={r}");
    let e = |v: usize| v as f64;
    // Fewest bytes: W, A, B, x read; y and h written; backward reads W, A, B, x, h, dY
    // and writes dX, dA, dB. Flops: forward 2T(NK + rK + rN); backward dX = dY W,
    // g = dY B, dX += s·g A, dA = s·gᵀ x, dB = s·dYᵀ h.
    let weights = 2.0 * e(n * k + r * k + n * r);
    let fwd_bytes = weights + 2.0 * e(t * k + t * n + t * r);
    let bwd_bytes = weights + 2.0 * e(t * k + t * r + t * n) + 2.0 * e(t * k + r * k + n * r);
    let fwd_flops = 2.0 * e(t) * e(n * k + r * k + r * n);
    let bwd_flops = 2.0 * e(t) * e(n * k + 2 * n * r + 2 * r * k);
    let rows = [
        (
            "lora forward",
            2,
            1,
            "cuBLAS composed LoRA (3 GEMMs)",
            fwd_bytes,
            fwd_flops,
        ),
        (
            "lora forward",
            2,
            0,
            "cuBLAS x·Wᵀ alone",
            fwd_bytes,
            fwd_flops,
        ),
        (
            "lora forward + backward",
            5,
            4,
            "cuBLAS composed LoRA (7 GEMMs)",
            fwd_bytes + bwd_bytes,
            fwd_flops + bwd_flops,
        ),
        (
            "lora forward + backward",
            5,
            3,
            "cuBLAS x·Wᵀ and dY·W alone",
            fwd_bytes + bwd_bytes,
            fwd_flops + bwd_flops,
        ),
    ];
    for (kernel, ours, base, name, bytes, flops) in rows {
        rec.row(common::Row {
            kernel,
            shape: shape.clone(),
            dtype: "bf16",
            ours_us: us[ours],
            baseline: Some((name, us[base])),
            bytes: Some(bytes),
            flops: Some(flops),
        });
    }
}

fn main() {
    let Some(gpu) = common::gpu_or_skip("lora") else {
        return;
    };
    let rec = common::Recorder::new(&gpu, "lora");
    let (quick, samples) = (common::quick(), common::samples());
    let mut criterion = common::criterion();

    let mut table = String::new();
    writeln!(table, "{}", common::device_line(&gpu)).unwrap();
    writeln!(
        table,
        "bf16, K = 4096; median µs of {samples} CUDA-event batches; inputs rotated past L2"
    )
    .unwrap();
    writeln!(table, "{:>6} {:>6} {:>4} | {:>9} {:>9} {:>9} | {:>7} {:>7} {:>7} | {:>9} {:>9} {:>9} | {:>7} {:>7} | {:>8} {:>8} | {:>9} {:>9} {:>9}",
        "T", "N", "r", "base", "composed", "ours", "comp/b", "ours/b", "o/comp", "base_fb", "comp_fb", "ours_fb", "ours/b", "o/comp", "base TF", "ours GB/s", "cuBpath/b", "downk/b", "cuBdx/b").unwrap();

    let ns: &[usize] = &[4096, 11008];
    let rs: &[usize] = if quick { &[16] } else { &[16, 64] };
    for &n in ns {
        for &r in rs {
            for &t in &[1usize, 16, 512, 4096] {
                let s = LoraShape::new(t, 4096, n, r);
                let tag = format!("T{t}_N{n}_r{r}");
                if std::env::var("LORA_KERNELS_BENCH_FILTER").is_ok_and(|f| !tag.contains(&f)) {
                    continue;
                }
                let opts = LoraOptions::new(2.0);
                let nsets = (128usize << 20).div_ceil(set_bytes(&s)).clamp(1, 8);
                let mut sets: Vec<Set> = (0..nsets)
                    .map(|i| make_set(&gpu, &s, 100 * i as u64 + 1))
                    .collect();
                let ops = [
                    Op::BaseFwd,
                    Op::ComposedFwd,
                    Op::OursFwd,
                    Op::BaseFwdBwd,
                    Op::ComposedFwdBwd,
                    Op::OursFwdBwd,
                    Op::OursFwdCublas,
                    Op::OursFwdDownKernel,
                    Op::OursFwdBwdCublasDx,
                ];
                let us: Vec<f64> = ops
                    .iter()
                    .map(|&op| {
                        let n = sets.len();
                        if !common::op_selected(op.name()) {
                            return f64::NAN;
                        }
                        common::median_us(&gpu, samples, |i| {
                            run(&gpu, &s, &opts, op, &mut sets[i % n])
                        })
                    })
                    .collect();
                let flops = 2.0 * (t * n * 4096) as f64;
                let w_bytes = 2.0 * (n * 4096) as f64;
                writeln!(table, "{:>6} {:>6} {:>4} | {:>9.1} {:>9.1} {:>9.1} | {:>7.3} {:>7.3} {:>7.3} | {:>9.1} {:>9.1} {:>9.1} | {:>7.3} {:>7.3} | {:>8.1} {:>8.0} | {:>9.3} {:>9.3} {:>9.3}",
                    t, n, r, us[0], us[1], us[2], us[1] / us[0], us[2] / us[0], us[2] / us[1],
                    us[3], us[4], us[5], us[5] / us[3], us[5] / us[4],
                    flops / us[0] * 1e-6, w_bytes / us[2] * 1e-3, us[6] / us[0], us[7] / us[0], us[8] / us[3]).unwrap();
                record(&rec, &s, &us);
                eprint!(
                    "{}",
                    table
                        .lines()
                        .last()
                        .map(|l| format!("{l}\n"))
                        .unwrap_or_default()
                );

                let mut group = criterion.benchmark_group(format!("lora_bf16/{tag}"));
                group.throughput(criterion::Throughput::Elements((t * n * 4096) as u64));
                for &op in &ops[..6] {
                    if !common::op_selected(op.name()) {
                        continue;
                    }
                    group.bench_function(op.name(), |bch| {
                        bch.iter_custom(|iters| {
                            Duration::from_secs_f64(time_iters(
                                &gpu, &s, &opts, op, &mut sets, iters,
                            ))
                        })
                    });
                }
                group.finish();
            }
        }
    }
    common::finish(&table);
}
