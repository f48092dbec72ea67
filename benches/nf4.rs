//! NF4 benches, bf16 activations, K = 4096, N ∈ {4096, 11008}, T ∈ {1, 16, 4096},
//! blocksize 64 with double quantization (bitsandbytes' QLoRA default). In one process,
//! on one device:
//!
//! - `cublas_bf16`: cuBLAS `y = x Wᵀ` with a dense bf16 W (the baseline);
//! - `nf4_mm`: at T ≤ 16 our fused NF4 matmul (4-bit W read once, dequantized in
//!   registers); at T = 4096 the GEMM core's NF4 kernel (`gemm::matmul_nt_nf4`: W tiles
//!   dequantized into shared memory), beside `core_bf16`, the same core over the dense
//!   bf16 W (`gemm::matmul_nt`, sm_90 only), so the dequantize's own cost shows;
//! - at T = 4096 also the backward's product `dX = dY · W` [4096, K]: `cublas_nn` (cuBLAS,
//!   dense bf16 W), `core_nn` (`gemm::matmul_nn` over the dense W) and `nf4_nn`
//!   (`gemm::matmul_nn_nf4`: W's pieces dequantized into the MN-major B layout);
//! - `dequant`: our standalone dequantize to bf16, against `copy`, a device-to-device
//!   copy of the same output bytes (the copy bandwidth: read + write bytes / time).
//!
//! Weights are random and rotated over enough copies to exceed L2. Each figure is the
//! median of CUDA-event-timed batches; a table is printed (and written to
//! `$LORA_KERNELS_BENCH_OUT`); criterion records each op too.
//! `LORA_KERNELS_BENCH_QUICK=1`: fewer samples.

use std::fmt::Write as _;
use std::time::Duration;

mod common;

use cudarc::driver::CudaSlice;
use lora_kernels::cuda::nf4::{self as cuda, Nf4Device};
use lora_kernels::cuda::{gemm, Gpu};
use lora_kernels::{bf16, Nf4Weight};

struct Set {
    w: CudaSlice<bf16>,
    q: Nf4Device,
    /// x [T, K] and y [T, N] for T = 1, 16 and 4096.
    x: [CudaSlice<bf16>; 3],
    y: [CudaSlice<bf16>; 3],
    out: CudaSlice<bf16>,
    /// dX [4096, K] of the NN products (their dY is `y` at T = 4096).
    dx: CudaSlice<bf16>,
}

const TS: [usize; 3] = [1, 16, 4096];
const OPS: [&str; 8] = [
    "cublas_bf16",
    "nf4_mm",
    "dequant",
    "copy",
    "core_bf16",
    "cublas_nn",
    "core_nn",
    "nf4_nn",
];

fn run(gpu: &Gpu, t: usize, n: usize, k: usize, op: usize, s: &mut Set) {
    let i = TS.iter().position(|&v| v == t).unwrap();
    match OPS[op] {
        "nf4_mm" if t > cuda::SMALL_T_MAX => gemm::matmul_nt_nf4(
            gpu,
            t,
            &s.x[i],
            &s.q,
            &mut s.y[i],
            &gemm::GemmEpilogue::new(),
        )
        .unwrap(),
        "core_bf16" => gemm::matmul_nt(
            gpu,
            &s.x[i],
            &s.w,
            &mut s.y[i],
            &gemm::GemmEpilogue::new(),
            t,
            n,
            k,
        )
        .unwrap(),
        "cublas_bf16" => gemm(
            gpu,
            t,
            n,
            k,
            1.0,
            &s.x[i],
            false,
            &s.w,
            true,
            0.0,
            &mut s.y[i],
        )
        .unwrap(),
        "nf4_mm" => cuda::matmul(gpu, t, &s.x[i], &s.q, None, &mut s.y[i]).unwrap(),
        "dequant" => cuda::dequantize(gpu, &s.q, &mut s.out).unwrap(),
        "copy" => gpu.stream().memcpy_dtod(&s.w, &mut s.out).unwrap(),
        // dX [T, K] = dY [T, N] · W [N, K]: the GEMMs' N is K and their K is N.
        "cublas_nn" => gemm(
            gpu, t, k, n, 1.0, &s.y[i], false, &s.w, false, 0.0, &mut s.dx,
        )
        .unwrap(),
        "core_nn" => gemm::matmul_nn(
            gpu,
            &s.y[i],
            &s.w,
            &mut s.dx,
            &gemm::GemmEpilogue::new(),
            t,
            k,
            n,
        )
        .unwrap(),
        "nf4_nn" => {
            gemm::matmul_nn_nf4(gpu, t, &s.y[i], &s.q, &mut s.dx, &gemm::GemmEpilogue::new())
                .unwrap()
        }
        _ => unreachable!(),
    }
}

fn time_iters(
    gpu: &Gpu,
    t: usize,
    n: usize,
    k: usize,
    op: usize,
    sets: &mut [Set],
    iters: u64,
) -> f64 {
    let len = sets.len();
    common::time_iters(gpu, iters, |i| run(gpu, t, n, k, op, &mut sets[i % len]))
}

fn main() {
    let Some(gpu) = common::gpu_or_skip("nf4") else {
        return;
    };
    let rec = common::Recorder::new(&gpu, "nf4");
    let samples = common::samples();
    let mut criterion = common::criterion();
    let mut table = String::new();
    writeln!(table, "{}", common::device_line(&gpu)).unwrap();
    writeln!(
        table,
        "NF4 (blocksize 64, double quant), bf16 activations, K = 4096; median µs of {samples} \
         CUDA-event batches; weights rotated past L2"
    )
    .unwrap();
    writeln!(
        table,
        "{:>6} {:>6} | {:>9} {:>9} {:>8} | {:>9} {:>9} {:>8} {:>7} | {:>6}",
        "T", "N", "cublas", "nf4_mm", "speedup", "dequant", "copy", "deq GB/s", "% copy", "bits/p"
    )
    .unwrap();
    let k = 4096;
    let mut large = Vec::new();
    for n in [4096usize, 11008] {
        let host = common::random_bf16(n * k, n as u64, 0.02);
        let q = Nf4Weight::quantize(&host, n, k, 64, true).unwrap();
        let bpp = q.bits_per_param();
        // Enough sets that the 4-bit weights alone (and so the dense ones too) exceed L2.
        let nsets = (128usize << 20)
            .div_ceil(n * k / 2 + n * k / 64)
            .clamp(2, 16);
        let mut sets: Vec<Set> = (0..nsets)
            .map(|i| Set {
                w: gpu
                    .upload(&common::random_bf16(n * k, 7 + i as u64, 0.02))
                    .unwrap(),
                q: Nf4Device::upload(&gpu, &q).unwrap(),
                x: TS.map(|t| {
                    gpu.upload(&common::random_bf16(t * k, 100 + i as u64, 1.0))
                        .unwrap()
                }),
                y: TS.map(|t| {
                    gpu.upload(&common::random_bf16(t * n, 200 + i as u64, 1.0))
                        .unwrap()
                }),
                out: gpu.zeros(n * k).unwrap(),
                dx: gpu.zeros(4096 * k).unwrap(),
            })
            .collect();
        for t in [1usize, 16] {
            let us: Vec<f64> = (0..4)
                .map(|op| {
                    let len = sets.len();
                    common::median_us(&gpu, samples, |i| {
                        run(&gpu, t, n, k, op, &mut sets[i % len])
                    })
                })
                .collect();
            let bytes = 2.0 * (n * k * 2) as f64; // read + write of the bf16 output size
            let deq_gbs =
                (n * k * 2) as f64 / us[2] * 1e-3 + (q.packed.len() as f64) / us[2] * 1e-3;
            writeln!(
                table,
                "{:>6} {:>6} | {:>9.1} {:>9.1} {:>7.2}x | {:>9.1} {:>9.1} {:>8.0} {:>6.1}% | {:>6.3}",
                t,
                n,
                us[0],
                us[1],
                us[0] / us[1],
                us[2],
                us[3],
                deq_gbs,
                100.0 * (deq_gbs * 1e3) / (bytes / us[3]),
                bpp
            )
            .unwrap();
            let nf4_bytes = bpp * (n * k) as f64 / 8.0; // codes + double-quantized absmax
            let shape = format!("T={t} K={k} N={n}");
            rec.row(common::Row {
                kernel: "nf4 matmul",
                shape: shape.clone(),
                dtype: "bf16 x, NF4 W (bs 64, dq)",
                ours_us: us[1],
                baseline: Some(("cuBLAS bf16 x·Wᵀ, dense W", us[0])),
                bytes: Some(nf4_bytes + 2.0 * (t * k + t * n) as f64),
                flops: Some(2.0 * (t * n * k) as f64),
            });
            // The dequantize does not depend on T: one record, from the first T.
            if t == 1 {
                rec.row(common::Row {
                    kernel: "nf4 dequantize",
                    shape: format!("K={k} N={n}"),
                    dtype: "NF4 (bs 64, dq) -> bf16",
                    ours_us: us[2],
                    baseline: Some(("copy of the bf16 output's bytes", us[3])),
                    bytes: Some(nf4_bytes + (n * k * 2) as f64),
                    flops: None,
                });
            }
            eprint!(
                "{}",
                table
                    .lines()
                    .last()
                    .map(|l| format!("{l}\n"))
                    .unwrap_or_default()
            );
            let mut group = criterion.benchmark_group(format!("nf4_bf16/T{t}_N{n}"));
            for (op, name) in OPS.iter().enumerate().take(4) {
                group.bench_function(*name, |b| {
                    b.iter_custom(|iters| {
                        Duration::from_secs_f64(time_iters(&gpu, t, n, k, op, &mut sets, iters))
                    })
                });
            }
            group.finish();
        }
        large.push(large_t(
            &gpu,
            &rec,
            &mut criterion,
            samples,
            n,
            k,
            bpp,
            &mut sets,
        ));
    }
    writeln!(
        table,
        "\nT = 4096: the GEMM core's NF4 kernel (W tiles dequantized in shared memory) \
         against cuBLAS and the same core over the dense bf16 W; median µs"
    )
    .unwrap();
    writeln!(
        table,
        "{:>6} {:>6} {:>4} | {:>9} {:>9} {:>9} | {:>11} {:>11} | {:>8}",
        "T", "N", "op", "cublas", "core_bf16", "core_nf4", "nf4/cublas", "nf4/core", "TFLOP/s"
    )
    .unwrap();
    for l in large {
        writeln!(table, "{l}").unwrap();
    }
    common::finish(&table);
}

/// The T = 4096 rows, `y = x Wᵀ` and `dX = dY W`: cuBLAS, the dense core and the NF4
/// core (the last two need sm_90; elsewhere the row says so).
#[allow(clippy::too_many_arguments)]
fn large_t(
    gpu: &Gpu,
    rec: &common::Recorder,
    criterion: &mut criterion::Criterion,
    samples: usize,
    n: usize,
    k: usize,
    bpp: f64,
    sets: &mut [Set],
) -> String {
    let t = 4096;
    if !gemm::supported(gpu) {
        return format!("{t:>6} {n:>6} | the GEMM core needs sm_90: not measured");
    }
    let flops = 2.0 * (t * n * k) as f64;
    let shape = format!("T={t} K={k} N={n}");
    let mut lines = Vec::new();
    // cublas, the dense core, the NF4 core: forward (x Wᵀ), then backward (dY W).
    for (ops, kernel, base, label) in [
        (
            [0usize, 4, 1],
            "nf4 GEMM core",
            "cuBLAS bf16 x·Wᵀ, dense W",
            "xWᵀ",
        ),
        (
            [5, 6, 7],
            "nf4 GEMM core, NN (dX = dY·deq(W))",
            "cuBLAS bf16 dY·W, dense W",
            "dYW",
        ),
    ] {
        let us: Vec<f64> = ops
            .iter()
            .map(|&op| {
                let len = sets.len();
                common::median_us(gpu, samples, |i| run(gpu, t, n, k, op, &mut sets[i % len]))
            })
            .collect();
        rec.row(common::Row {
            kernel,
            shape: shape.clone(),
            dtype: "bf16 x, NF4 W (bs 64, dq)",
            ours_us: us[2],
            baseline: Some((base, us[0])),
            bytes: Some(bpp * (n * k) as f64 / 8.0 + 2.0 * (t * k + t * n) as f64),
            flops: Some(flops),
        });
        let mut group = criterion.benchmark_group(format!("nf4_bf16/T{t}_N{n}"));
        for &op in &ops {
            group.bench_function(OPS[op], |b| {
                b.iter_custom(|iters| {
                    Duration::from_secs_f64(time_iters(gpu, t, n, k, op, sets, iters))
                })
            });
        }
        group.finish();
        let line = format!(
            "{:>6} {:>6} {:>4} | {:>9.1} {:>9.1} {:>9.1} | {:>10.3}x {:>10.3}x | {:>8.0}",
            t,
            n,
            label,
            us[0],
            us[1],
            us[2],
            us[2] / us[0],
            us[2] / us[1],
            flops / us[2] * 1e-6
        );
        eprintln!("{line}");
        lines.push(line);
    }
    lines.join("\n")
}
