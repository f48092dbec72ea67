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

use criterion::Criterion;
use cudarc::driver::{sys::CUevent_flags, CudaSlice};
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

fn random(n: usize, seed: u64, scale: f32) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
        })
        .collect()
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
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let start = gpu.stream().record_event(flags).unwrap();
    let len = sets.len();
    for i in 0..iters as usize {
        run(gpu, t, n, k, op, &mut sets[i % len]);
    }
    let end = gpu.stream().record_event(flags).unwrap();
    end.synchronize().unwrap();
    start.elapsed_ms(&end).unwrap() as f64 * 1e-3
}

fn median_us(
    gpu: &Gpu,
    t: usize,
    n: usize,
    k: usize,
    op: usize,
    sets: &mut [Set],
    samples: usize,
) -> f64 {
    time_iters(gpu, t, n, k, op, sets, 3);
    let once = time_iters(gpu, t, n, k, op, sets, 5) / 5.0;
    let batch = ((300e-6 / once).ceil() as u64).clamp(1, 200);
    let mut v: Vec<f64> = (0..samples)
        .map(|_| time_iters(gpu, t, n, k, op, sets, batch) / batch as f64 * 1e6)
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("\n*** nf4 bench SKIPPED: no usable GPU ({e}) ***\n");
            return;
        }
    };
    let quick = std::env::var("LORA_KERNELS_BENCH_QUICK").is_ok_and(|v| v == "1");
    let samples = if quick { 9 } else { 31 };
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(if quick { 300 } else { 800 }))
        .sample_size(10)
        .configure_from_args();
    let mut table = String::new();
    writeln!(
        table,
        "device: {} (sm_{}{}, {} SMs)",
        gpu.name(),
        gpu.compute_capability().0,
        gpu.compute_capability().1,
        gpu.sm_count()
    )
    .unwrap();
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
        let host = random(n * k, n as u64, 0.02);
        let q = Nf4Weight::quantize(&host, n, k, 64, true).unwrap();
        let bpp = q.bits_per_param();
        let nsets = (128usize << 20).div_ceil(n * k * 2).clamp(2, 8);
        let mut sets: Vec<Set> = (0..nsets)
            .map(|i| Set {
                w: gpu.upload(&random(n * k, 7 + i as u64, 0.02)).unwrap(),
                q: Nf4Device::upload(&gpu, &q).unwrap(),
                x: [1, 16].map(|t| gpu.upload(&random(t * k, 100 + i as u64, 1.0)).unwrap()),
                y: [1, 16].map(|t| gpu.zeros(t * n).unwrap()),
                out: gpu.zeros(n * k).unwrap(),
            })
            .collect();
        for t in [1usize, 16] {
            let us: Vec<f64> = (0..OPS.len())
                .map(|op| median_us(&gpu, t, n, k, op, &mut sets, samples))
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
    println!("\n{table}");
    if let Ok(path) = std::env::var("LORA_KERNELS_BENCH_OUT") {
        std::fs::write(path, &table).unwrap();
    }
}
