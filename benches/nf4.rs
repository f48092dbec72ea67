//! NF4 benches, bf16 activations, K = 4096, N ∈ {4096, 11008}, T ∈ {1, 16}, blocksize 64
//! with double quantization (bitsandbytes' QLoRA default). In one process, on one device:
//!
//! - `cublas_bf16`: cuBLAS `y = x Wᵀ` with a dense bf16 W (the baseline);
//! - `nf4_mm`: our fused NF4 matmul (4-bit W read once, dequantized in registers);
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
    /// x [T, K] and y [T, N] for T = 1 and T = 16.
    x: [CudaSlice<bf16>; 2],
    y: [CudaSlice<bf16>; 2],
    out: CudaSlice<bf16>,
}

const OPS: [&str; 4] = ["cublas_bf16", "nf4_mm", "dequant", "copy"];

fn run(gpu: &Gpu, t: usize, n: usize, k: usize, op: usize, s: &mut Set) {
    let i = (t > 1) as usize;
    match OPS[op] {
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
                x: [1, 16].map(|t| {
                    gpu.upload(&common::random_bf16(t * k, 100 + i as u64, 1.0))
                        .unwrap()
                }),
                y: [1, 16].map(|t| gpu.zeros(t * n).unwrap()),
                out: gpu.zeros(n * k).unwrap(),
            })
            .collect();
        for t in [1usize, 16] {
            let us: Vec<f64> = (0..OPS.len())
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
            for (op, name) in OPS.iter().enumerate() {
                group.bench_function(*name, |b| {
                    b.iter_custom(|iters| {
                        Duration::from_secs_f64(time_iters(&gpu, t, n, k, op, &mut sets, iters))
                    })
                });
            }
            group.finish();
        }
    }
    writeln!(
        table,
        "T = 4096 (large T): not yet implemented for NF4 (needs the GEMM core, issue 3)"
    )
    .unwrap();
    common::finish(&table);
}
