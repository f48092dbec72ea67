//! QLoRA benches: the LoRA linear over an NF4 base (blocksize 64, double quantization),
//! bf16, K = 4096, N ∈ {4096, 11008}, r = 16, T ∈ {1, 16, 4096}; and the GPU NF4
//! quantizer. In one process, on one device:
//!
//! - `cublas_base`: cuBLAS `y = x Wᵀ` with a dense bf16 W (the baseline);
//! - `lora_bf16`: our LoRA linear forward over the dense bf16 W;
//! - `qlora`: our QLoRA forward over the NF4 W;
//! - at T = 4096 also forward + backward: `cublas_base_fb` (`x Wᵀ` then `dY W`),
//!   `lora_bf16_fb` and `qlora_fb`;
//! - at T = 4096 `qlora_core` and `qlora_core_fb`: the same QLoRA calls with
//!   `Tuning { nf4_core: true, .. }` (the base products on the GEMM core's NF4 kernels, W
//!   dequantized in shared memory, no dense panel);
//! - `quantize`: our GPU quantizer (bf16 W to NF4 with double quantization), against
//!   `copy`, a device-to-device copy of W (read + write bytes / time).
//!
//! Weights (dense, NF4 and adapters) are random and rotated over enough copies to
//! exceed L2. Each figure is the median of CUDA-event-timed batches; a table is printed
//! (and written to `$LORA_KERNELS_BENCH_OUT`); criterion records each op too.
//! `LORA_KERNELS_BENCH_QUICK=1`: fewer samples.

use std::fmt::Write as _;
use std::time::Duration;

mod common;

use cudarc::driver::CudaSlice;
use lora_kernels::cuda::nf4::{self as nf4, DeviceAbsmax, Nf4Device};
use lora_kernels::cuda::{gemm, lora, qlora, Gpu};
use lora_kernels::{bf16, LoraGrads, LoraOptions, LoraShape, LoraWeights, QloraWeights, Tuning};

struct Weights {
    w: CudaSlice<bf16>,
    q: Nf4Device,
    a: CudaSlice<bf16>,
    b: CudaSlice<bf16>,
}

struct Acts {
    x: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    h: CudaSlice<bf16>,
    dy: CudaSlice<bf16>,
    dx: CudaSlice<bf16>,
    da: CudaSlice<bf16>,
    db: CudaSlice<bf16>,
}

const OPS: [&str; 8] = [
    "cublas_base",
    "lora_bf16",
    "qlora",
    "cublas_base_fb",
    "lora_bf16_fb",
    "qlora_fb",
    "qlora_core",
    "qlora_core_fb",
];

fn run(gpu: &Gpu, s: &LoraShape, op: &str, w: &Weights, z: &mut Acts) {
    let (t, k, n) = (s.tokens, s.in_features, s.out_features);
    let opts = LoraOptions::new(2.0);
    let lw = LoraWeights {
        w: &w.w,
        a: &w.a,
        b: &w.b,
        bias: None,
    };
    let qw = QloraWeights {
        w: &w.q,
        a: &w.a,
        b: &w.b,
        bias: None,
    };
    let fb = op.ends_with("_fb");
    match op.trim_end_matches("_fb") {
        "cublas_base" => {
            gemm(gpu, t, n, k, 1.0, &z.x, false, &w.w, true, 0.0, &mut z.y).unwrap();
            if fb {
                gemm(gpu, t, k, n, 1.0, &z.dy, false, &w.w, false, 0.0, &mut z.dx).unwrap();
            }
        }
        "lora_bf16" => {
            lora::forward(gpu, s, &opts, &z.x, lw, &mut z.y, Some(&mut z.h)).unwrap();
            if fb {
                let grads = LoraGrads {
                    dx: &mut z.dx,
                    da: &mut z.da,
                    db: &mut z.db,
                };
                lora::backward(gpu, s, &opts, &z.x, lw, &z.h, &z.dy, grads).unwrap();
            }
        }
        "qlora" | "qlora_core" => {
            let opts = opts.with_tuning(Tuning {
                nf4_core: op.starts_with("qlora_core"),
                ..Tuning::AUTO
            });
            qlora::forward(gpu, s, &opts, &z.x, qw, &mut z.y, Some(&mut z.h)).unwrap();
            if fb {
                let grads = LoraGrads {
                    dx: &mut z.dx,
                    da: &mut z.da,
                    db: &mut z.db,
                };
                qlora::backward(gpu, s, &opts, &z.x, qw, &z.h, &z.dy, grads).unwrap();
            }
        }
        _ => unreachable!(),
    }
}

/// Bytes an NF4 weight occupies on the device: codes and block scales.
fn stored_bytes(q: &Nf4Device) -> f64 {
    let scales = match &q.absmax {
        DeviceAbsmax::F32(a) => 4 * a.len(),
        DeviceAbsmax::Double {
            q, absmax2, code, ..
        } => q.len() + 4 * (absmax2.len() + code.len()),
    };
    (q.packed.len() + scales) as f64
}

/// The JSON records of one shape and pass (`us`: cuBLAS dense, our LoRA over the dense
/// W, our QLoRA, and at T = 4096 our QLoRA on the NF4 core): our QLoRA against cuBLAS's
/// base product with a dense bf16 W, and against our own LoRA linear over that dense W;
/// the NF4-core form against cuBLAS.
fn record(rec: &common::Recorder, s: &LoraShape, fb: bool, w_bytes: f64, us: &[f64]) {
    let (t, k, n, r) = (s.tokens, s.in_features, s.out_features, s.rank);
    let e = |v: usize| v as f64;
    // Fewest bytes: the NF4 W, A, B, x read; y and h written; backward reads them again
    // with h and dY and writes dX, dA, dB. Flops as the LoRA linear's.
    let weights = w_bytes + 2.0 * e(r * k + n * r);
    let mut bytes = weights + 2.0 * e(t * k + t * n + t * r);
    let mut flops = 2.0 * e(t) * e(n * k + r * k + r * n);
    if fb {
        bytes += weights + 2.0 * e(t * k + t * r + t * n) + 2.0 * e(t * k + r * k + n * r);
        flops += 2.0 * e(t) * e(n * k + 2 * n * r + 2 * r * k);
    }
    let (kernel, cublas) = if fb {
        (
            "qlora forward + backward",
            "cuBLAS x·Wᵀ and dY·W, dense bf16 W",
        )
    } else {
        ("qlora forward", "cuBLAS x·Wᵀ, dense bf16 W")
    };
    let mut rows = vec![
        (kernel, us[2], cublas, us[0]),
        (kernel, us[2], "our LoRA linear, dense bf16 W", us[1]),
    ];
    if let Some(&core_us) = us.get(3) {
        let core_kernel = if fb {
            "qlora forward + backward, NF4 core"
        } else {
            "qlora forward, NF4 core"
        };
        rows.push((core_kernel, core_us, cublas, us[0]));
    }
    for (kernel, ours_us, name, base_us) in rows {
        rec.row(common::Row {
            kernel,
            shape: format!("T={t} K={k} N={n} r={r}"),
            dtype: "bf16, NF4 W (bs 64, dq)",
            ours_us,
            baseline: Some((name, base_us)),
            bytes: Some(bytes),
            flops: Some(flops),
        });
    }
}

fn main() {
    let Some(gpu) = common::gpu_or_skip("qlora") else {
        return;
    };
    let rec = common::Recorder::new(&gpu, "qlora");
    let samples = common::samples();
    let mut criterion = common::criterion();
    let mut table = String::new();
    writeln!(table, "{}", common::device_line(&gpu)).unwrap();
    writeln!(
        table,
        "QLoRA: NF4 blocksize 64 + double quant, bf16, K = 4096, r = 16; median µs of \
         {samples} CUDA-event batches; weights rotated past L2"
    )
    .unwrap();
    writeln!(
        table,
        "{:>5} {:>6} {:>5} | {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9}",
        "T",
        "N",
        "pass",
        "cublas",
        "lora bf16",
        "qlora",
        "q core",
        "q/cublas",
        "q/lora",
        "qc/cublas"
    )
    .unwrap();
    let (k, r) = (4096usize, 16usize);
    for n in [4096usize, 11008] {
        // Enough sets that the 4-bit weights alone (and so the dense ones too) exceed L2.
        let nsets = (128usize << 20)
            .div_ceil(n * k / 2 + n * k / 64)
            .clamp(2, 16);
        let sets: Vec<Weights> = (0..nsets)
            .map(|i| {
                let host = common::random_bf16(n * k, 7 + i as u64, 0.02);
                let w = gpu.upload(&host).unwrap();
                Weights {
                    q: nf4::quantize(&gpu, &w, n, k, 64, true).unwrap(),
                    w,
                    a: gpu
                        .upload(&common::random_bf16(r * k, 50 + i as u64, 0.02))
                        .unwrap(),
                    b: gpu
                        .upload(&common::random_bf16(n * r, 60 + i as u64, 0.02))
                        .unwrap(),
                }
            })
            .collect();
        for t in [1usize, 16, 4096] {
            let s = LoraShape::new(t, k, n, r);
            let mut z = Acts {
                x: gpu.upload(&common::random_bf16(t * k, 100, 1.0)).unwrap(),
                y: gpu.zeros(t * n).unwrap(),
                h: gpu.zeros(t * r).unwrap(),
                dy: gpu.upload(&common::random_bf16(t * n, 101, 1.0)).unwrap(),
                dx: gpu.zeros(t * k).unwrap(),
                da: gpu.zeros(r * k).unwrap(),
                db: gpu.zeros(n * r).unwrap(),
            };
            let passes: &[usize] = if t == 4096 { &[0, 3] } else { &[0] };
            for &p in passes {
                // cuBLAS, LoRA, QLoRA; at T = 4096 also QLoRA on the NF4 core.
                let mut ops: Vec<usize> = (p..p + 3).collect();
                if t == 4096 {
                    ops.push(if p == 0 { 6 } else { 7 });
                }
                let us: Vec<f64> = ops
                    .iter()
                    .map(|&op| {
                        common::median_us(&gpu, samples, |i| {
                            run(&gpu, &s, OPS[op], &sets[i % nsets], &mut z)
                        })
                    })
                    .collect();
                let (core, core_ratio) = match us.get(3) {
                    Some(c) => (format!("{c:.1}"), format!("{:.3}x", c / us[0])),
                    None => ("—".to_string(), "—".to_string()),
                };
                writeln!(
                    table,
                    "{:>5} {:>6} {:>5} | {:>9.1} {:>9.1} {:>9.1} {:>9} | {:>8.3}x {:>8.3}x {:>9}",
                    t,
                    n,
                    if p == 0 { "fwd" } else { "f+b" },
                    us[0],
                    us[1],
                    us[2],
                    core,
                    us[2] / us[0],
                    us[2] / us[1],
                    core_ratio
                )
                .unwrap();
                record(&rec, &s, p == 3, stored_bytes(&sets[0].q), &us);
                eprintln!("{}", table.lines().last().unwrap());
                let mut group = criterion.benchmark_group(format!("qlora_bf16/T{t}_N{n}"));
                for op in ops.iter().map(|&i| OPS[i]) {
                    group.bench_function(op, |b| {
                        b.iter_custom(|iters| {
                            Duration::from_secs_f64(common::time_iters(&gpu, iters, |i| {
                                run(&gpu, &s, op, &sets[i % nsets], &mut z)
                            }))
                        })
                    });
                }
                group.finish();
            }
        }
        // The GPU quantizer against a copy of W.
        let mut out: CudaSlice<bf16> = gpu.zeros(n * k).unwrap();
        let q_us = common::median_us(&gpu, samples, |i| {
            let _ = nf4::quantize(&gpu, &sets[i % nsets].w, n, k, 64, true).unwrap();
        });
        let c_us = common::median_us(&gpu, samples, |i| {
            gpu.stream()
                .memcpy_dtod(&sets[i % nsets].w, &mut out)
                .unwrap();
        });
        let bytes = (n * k * 2) as f64;
        rec.row(common::Row {
            kernel: "nf4 quantize on the GPU",
            shape: format!("K={k} N={n}"),
            dtype: "bf16 -> NF4 (bs 64, dq)",
            ours_us: q_us,
            baseline: Some(("copy of W's bytes", c_us)),
            bytes: Some(bytes + stored_bytes(&sets[0].q)),
            flops: None,
        });
        writeln!(
            table,
            "quantize {n}x{k} bf16 -> NF4 (dq): {q_us:.1} µs ({:.0} GB/s of W read); copy of W \
             {c_us:.1} µs ({:.0} GB/s read + write)",
            bytes / q_us * 1e-3,
            2.0 * bytes / c_us * 1e-3
        )
        .unwrap();
        eprintln!("{}", table.lines().last().unwrap());
    }
    common::finish(&table);
}
