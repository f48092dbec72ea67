//! DoRA benches, bf16, K = N = 4096, r = 16, T ∈ {1, 16, 4096}. In one process, on one
//! device, against cuBLAS's base product measured in the same run:
//!
//! - `base`: cuBLAS `y = x Wᵀ` (fwd+bwd: also `dX = dY W`);
//! - `ours`: `cuda::dora::forward` (y, h and the norms saved), and fwd+bwd with
//!   `backward` either from a saved `z` or recomputing it;
//! - `norm`: the row norms alone, as GB/s of W read;
//! - `qdora`: `cuda::qdora` (DoRA over W in NF4, blocksize 64, double-quantized) forward
//!   and forward + backward with z saved, against the same dense cuBLAS base.
//!
//! Peak extra device memory of each of our ops is measured from the default memory
//! pool's high-water mark (beyond the inputs and outputs, which are allocated before).
//! Inputs are random and rotated past L2 (≥ 128 MB per rotation); each figure is the
//! median of CUDA-event-timed batches. `LORA_KERNELS_BENCH_QUICK=1` takes fewer
//! samples; `LORA_KERNELS_BENCH_FILTER=T4096` runs that T only;
//! `LORA_KERNELS_BENCH_OPS=a,b` runs only the named ops (the others read NaN);
//! without a GPU the bench says so and exits.

use std::fmt::Write as _;
use std::time::Duration;

mod common;

use cudarc::driver::CudaSlice;
use lora_kernels::cuda::nf4::{quantize, Nf4Device};
use lora_kernels::cuda::{dora as cuda, gemm, qdora, Gpu};
use lora_kernels::{bf16, DoraGrads, DoraOutputs, DoraSaved, DoraWeights, LoraOptions, LoraShape};

struct Set {
    x: CudaSlice<bf16>,
    w: CudaSlice<bf16>,
    wq: Nf4Device,
    a: CudaSlice<bf16>,
    b: CudaSlice<bf16>,
    m: CudaSlice<bf16>,
    dy: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    h: CudaSlice<bf16>,
    z: CudaSlice<bf16>,
    norm: CudaSlice<f32>,
    dx: CudaSlice<bf16>,
    da: CudaSlice<bf16>,
    db: CudaSlice<bf16>,
    dm: CudaSlice<bf16>,
}

fn random(gpu: &Gpu, n: usize, seed: u64, scale: f32) -> CudaSlice<bf16> {
    gpu.upload(&common::random_bf16(n, seed, scale)).unwrap()
}

fn make_set(gpu: &Gpu, s: &LoraShape, seed: u64) -> Set {
    let k = s.in_features as f32;
    let w = random(gpu, s.w_len(), seed + 1, 1.0 / k.sqrt());
    let wq = quantize::<bf16, _>(gpu, &w, s.out_features, s.in_features, 64, true).unwrap();
    Set {
        x: random(gpu, s.x_len(), seed, 1.0),
        w,
        wq,
        a: random(gpu, s.a_len(), seed + 2, 1.0 / k.sqrt()),
        b: random(gpu, s.b_len(), seed + 3, 0.1),
        m: gpu
            .upload(&vec![bf16::from_f32(0.6); s.out_features])
            .unwrap(),
        dy: random(gpu, s.y_len(), seed + 4, 1.0),
        y: gpu.zeros(s.y_len()).unwrap(),
        h: gpu.zeros(s.h_len()).unwrap(),
        z: gpu.zeros(s.y_len()).unwrap(),
        norm: gpu.zeros(s.out_features).unwrap(),
        dx: gpu.zeros(s.x_len()).unwrap(),
        da: gpu.zeros(s.a_len()).unwrap(),
        db: gpu.zeros(s.b_len()).unwrap(),
        dm: gpu.zeros(s.out_features).unwrap(),
    }
}

fn set_bytes(s: &LoraShape) -> usize {
    2 * (2 * s.x_len() + s.w_len() + 3 * s.y_len() + s.a_len() + s.b_len())
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    BaseFwd,
    Norm,
    OursFwd,
    BaseFwdBwd,
    OursFwdBwdZ,
    OursFwdBwd,
    QdoraFwd,
    QdoraFwdBwdZ,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::BaseFwd => "base_fwd",
            Op::Norm => "norm",
            Op::OursFwd => "ours_fwd",
            Op::BaseFwdBwd => "base_fwdbwd",
            Op::OursFwdBwdZ => "ours_fwdbwd_saved_z",
            Op::OursFwdBwd => "ours_fwdbwd_recompute_z",
            Op::QdoraFwd => "qdora_fwd",
            Op::QdoraFwdBwdZ => "qdora_fwdbwd_saved_z",
        }
    }
}

fn run(gpu: &Gpu, s: &LoraShape, opts: &LoraOptions, op: Op, set: &mut Set) {
    let (t, k, n) = (s.tokens, s.in_features, s.out_features);
    let wts = DoraWeights {
        w: &set.w,
        a: &set.a,
        b: &set.b,
        bias: None,
        magnitude: &set.m,
    };
    match op {
        Op::BaseFwd | Op::BaseFwdBwd => {
            gemm(
                gpu, t, n, k, 1.0, &set.x, false, &set.w, true, 0.0, &mut set.y,
            )
            .unwrap();
            if op == Op::BaseFwdBwd {
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
                    0.0,
                    &mut set.dx,
                )
                .unwrap();
            }
        }
        Op::Norm => {
            cuda::weight_norm(gpu, s, opts.scale, &set.w, &set.a, &set.b, &mut set.norm).unwrap()
        }
        Op::OursFwd | Op::OursFwdBwd | Op::OursFwdBwdZ => {
            let save_z = op == Op::OursFwdBwdZ;
            let out = DoraOutputs {
                y: &mut set.y,
                h: Some(&mut set.h),
                norm: Some(&mut set.norm),
                z: if save_z { Some(&mut set.z) } else { None },
            };
            cuda::forward(gpu, s, opts, &set.x, wts, out).unwrap();
            if op != Op::OursFwd {
                let saved = DoraSaved {
                    h: &set.h,
                    norm: &set.norm,
                    z: if save_z { Some(&set.z) } else { None },
                };
                let grads = DoraGrads {
                    dx: &mut set.dx,
                    da: &mut set.da,
                    db: &mut set.db,
                    dm: &mut set.dm,
                };
                cuda::backward(gpu, s, opts, &set.x, wts, saved, &set.dy, grads).unwrap();
            }
        }
        Op::QdoraFwd | Op::QdoraFwdBwdZ => {
            let qw = DoraWeights {
                w: &set.wq,
                a: &set.a,
                b: &set.b,
                bias: None,
                magnitude: &set.m,
            };
            let bwd = op == Op::QdoraFwdBwdZ;
            let out = DoraOutputs {
                y: &mut set.y,
                h: Some(&mut set.h),
                norm: Some(&mut set.norm),
                z: if bwd { Some(&mut set.z) } else { None },
            };
            qdora::forward(gpu, s, opts, &set.x, qw, out).unwrap();
            if bwd {
                let saved = DoraSaved {
                    h: &set.h,
                    norm: &set.norm,
                    z: Some(&set.z),
                };
                let grads = DoraGrads {
                    dx: &mut set.dx,
                    da: &mut set.da,
                    db: &mut set.db,
                    dm: &mut set.dm,
                };
                qdora::backward(gpu, s, opts, &set.x, qw, saved, &set.dy, grads).unwrap();
            }
        }
    }
}

/// The JSON records of one shape (`us` in the order of `ops` in `main`): our forward and
/// both forward + backward variants against cuBLAS's base product, and the row norms.
fn record(rec: &common::Recorder, s: &LoraShape, us: &[f64]) {
    let (t, k, n, r) = (s.tokens, s.in_features, s.out_features, s.rank);
    let shape = format!("T={t} K={k} N={n} r={r}");
    let e = |v: usize| v as f64;
    // Fewest bytes: W, A, B, m read; the norms' f32 written. Forward adds x read, y and
    // h written; backward reads W, A, B, m, the norms, x, h, dY and writes dX, dA, dB,
    // dm (a saved z, read or recomputed, is not counted: both variants get the same
    // figure). Flops: the norms need B·A (2NrK); forward 2T(NK + rK + rN); backward as
    // LoRA's, 2T(NK + 2Nr + 2rK).
    let weights = 2.0 * e(n * k + r * k + n * r + n);
    // NF4 W, blocksize 64, double-quantized: 4 bits per weight plus 1 byte per block.
    let q_bytes = e(n * k) / 2.0 + e(n * k) / 64.0;
    let norm_bytes = weights + 4.0 * e(n);
    let norm_flops = 2.0 * e(n * r * k);
    let fwd_bytes = norm_bytes + 2.0 * e(t * k + t * n + t * r);
    let fwd_flops = norm_flops + 2.0 * e(t) * e(n * k + r * k + r * n);
    let fb_bytes = fwd_bytes
        + weights
        + 4.0 * e(n)
        + 2.0 * e(t * k + t * r + t * n)
        + 2.0 * e(t * k + r * k + n * r + n);
    let fb_flops = fwd_flops + 2.0 * e(t) * e(n * k + 2 * n * r + 2 * r * k);
    let rows = [
        (
            "dora forward",
            1,
            Some(("cuBLAS x·Wᵀ alone", us[0])),
            fwd_bytes,
            fwd_flops,
        ),
        (
            "dora forward + backward, z saved",
            3,
            Some(("cuBLAS x·Wᵀ and dY·W alone", us[2])),
            fb_bytes,
            fb_flops,
        ),
        (
            "dora forward + backward, z recomputed",
            4,
            Some(("cuBLAS x·Wᵀ and dY·W alone", us[2])),
            fb_bytes,
            fb_flops,
        ),
        ("dora row norms ‖W + s·BA‖", 5, None, norm_bytes, norm_flops),
        (
            "qdora forward (NF4 W)",
            6,
            Some(("cuBLAS x·Wᵀ alone (dense bf16 W)", us[0])),
            fwd_bytes - 2.0 * e(n * k) + q_bytes,
            fwd_flops,
        ),
        (
            "qdora forward + backward, z saved (NF4 W)",
            7,
            Some(("cuBLAS x·Wᵀ and dY·W alone (dense bf16 W)", us[2])),
            fb_bytes - 4.0 * e(n * k) + 2.0 * q_bytes,
            fb_flops,
        ),
    ];
    for (kernel, ours, baseline, bytes, flops) in rows {
        // The norms do not depend on T: one record, from the first T.
        if baseline.is_none() && t != 1 {
            continue;
        }
        rec.row(common::Row {
            kernel,
            shape: if baseline.is_none() {
                format!("K={k} N={n} r={r}")
            } else {
                shape.clone()
            },
            dtype: "bf16",
            ours_us: us[ours],
            baseline,
            bytes: Some(bytes),
            flops: Some(flops),
        });
    }
}

fn main() {
    let Some(gpu) = common::gpu_or_skip("dora") else {
        return;
    };
    let rec = common::Recorder::new(&gpu, "dora");
    let samples = common::samples();
    let mut criterion = common::criterion();
    let mut table = String::new();
    writeln!(table, "{}", common::device_line(&gpu)).unwrap();
    writeln!(
        table,
        "bf16, K = N = 4096, r = 16; median µs of {samples} CUDA-event batches; inputs rotated past L2; extra = peak extra device memory (MiB)"
    )
    .unwrap();
    writeln!(
        table,
        "{:>5} | {:>8} {:>8} {:>7} | {:>8} {:>8} {:>8} {:>7} {:>7} | {:>7} {:>8} | {:>6} {:>6} {:>6} | {:>8} {:>7} {:>8} {:>7}",
        "T", "base", "ours", "o/b", "base_fb", "ours_z", "ours_rc", "z/b", "rc/b", "norm", "GB/s", "x fwd", "x z", "x rc",
        "qdora", "q/b", "qdora_fb", "qfb/b"
    )
    .unwrap();
    for &t in &[1usize, 16, 4096] {
        let tag = format!("T{t}");
        if std::env::var("LORA_KERNELS_BENCH_FILTER").is_ok_and(|f| tag != f) {
            continue;
        }
        let s = LoraShape::new(t, 4096, 4096, 16);
        let opts = LoraOptions::new(2.0);
        // Enough sets that the whole of each set, and the NF4 weights of QDoRA alone,
        // exceed L2.
        let nsets = (128usize << 20)
            .div_ceil(set_bytes(&s))
            .max((128usize << 20).div_ceil(s.w_len() / 2 + s.w_len() / 64))
            .clamp(1, 16);
        let mut sets: Vec<Set> = (0..nsets)
            .map(|i| make_set(&gpu, &s, 100 * i as u64 + 7))
            .collect();
        let ops = [
            Op::BaseFwd,
            Op::OursFwd,
            Op::BaseFwdBwd,
            Op::OursFwdBwdZ,
            Op::OursFwdBwd,
            Op::Norm,
            Op::QdoraFwd,
            Op::QdoraFwdBwdZ,
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
        // Peak extra memory of our three ops, one run each.
        let extra: Vec<f64> = [Op::OursFwd, Op::OursFwdBwdZ, Op::OursFwdBwd]
            .iter()
            .map(|&op| {
                gpu.synchronize().unwrap();
                let (before, _) = gpu.pool_usage(true).unwrap();
                run(&gpu, &s, &opts, op, &mut sets[0]);
                gpu.synchronize().unwrap();
                let (_, high) = gpu.pool_usage(false).unwrap();
                high.saturating_sub(before) as f64 / (1u64 << 20) as f64
            })
            .collect();
        let w_bytes = 2.0 * (4096 * 4096) as f64;
        writeln!(
            table,
            "{:>5} | {:>8.1} {:>8.1} {:>7.3} | {:>8.1} {:>8.1} {:>8.1} {:>7.3} {:>7.3} | {:>7.1} {:>8.0} | {:>6.2} {:>6.2} {:>6.2} | {:>8.1} {:>7.3} {:>8.1} {:>7.3}",
            t, us[0], us[1], us[1] / us[0], us[2], us[3], us[4], us[3] / us[2], us[4] / us[2],
            us[5], w_bytes / us[5] * 1e-3, extra[0], extra[1], extra[2],
            us[6], us[6] / us[0], us[7], us[7] / us[2]
        )
        .unwrap();
        record(&rec, &s, &us);
        eprintln!("{}", table.lines().last().unwrap_or_default());
        let mut group = criterion.benchmark_group(format!("dora_bf16/T{t}_N4096_r16"));
        group.throughput(criterion::Throughput::Elements((t * 4096 * 4096) as u64));
        for &op in &ops {
            if !common::op_selected(op.name()) {
                continue;
            }
            group.bench_function(op.name(), |bch| {
                bch.iter_custom(|iters| {
                    let n = sets.len();
                    Duration::from_secs_f64(common::time_iters(&gpu, iters, |i| {
                        run(&gpu, &s, &opts, op, &mut sets[i % n])
                    }))
                })
            });
        }
        group.finish();
    }
    common::finish(&table);
}
