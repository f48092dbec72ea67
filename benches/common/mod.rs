//! What every bench shares: random inputs, CUDA-event timing of a batch of runs, the
//! median over batches, the device line and criterion's settings.

#![allow(dead_code)]

use std::time::Duration;

use criterion::Criterion;
use cudarc::driver::sys::CUevent_flags;
use lora_kernels::bf16;
use lora_kernels::cuda::Gpu;

/// One xorshift64 step.
pub fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// `n` bf16 values uniform in [-scale, scale), from `seed`.
pub fn random_bf16(n: usize, seed: u64, scale: f32) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            let u = (xorshift(&mut s) >> 40) as f32 / (1u64 << 24) as f32;
            bf16::from_f32((u * 2.0 - 1.0) * scale)
        })
        .collect()
}

/// Seconds for `iters` runs of `run(i)` (i = 0, 1, ...), timed with CUDA events on the
/// GPU's stream.
pub fn time_iters(gpu: &Gpu, iters: u64, mut run: impl FnMut(usize)) -> f64 {
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let start = gpu.stream().record_event(flags).unwrap();
    for i in 0..iters as usize {
        run(i);
    }
    let end = gpu.stream().record_event(flags).unwrap();
    end.synchronize().unwrap();
    start.elapsed_ms(&end).unwrap() as f64 * 1e-3
}

/// Median µs per run over `samples` batches of about 300 µs each, after a warm-up.
pub fn median_us(gpu: &Gpu, samples: usize, mut run: impl FnMut(usize)) -> f64 {
    time_iters(gpu, 3, &mut run);
    let once = time_iters(gpu, 5, &mut run) / 5.0;
    let batch = ((300e-6 / once).ceil() as u64).clamp(1, 200);
    let mut v: Vec<f64> = (0..samples)
        .map(|_| time_iters(gpu, batch, &mut run) / batch as f64 * 1e6)
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The GPU, or `None` after a loud note that the bench `name` is skipped.
pub fn gpu_or_skip(name: &str) -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("\n*** {name} bench SKIPPED: no usable GPU ({e}) ***\n");
            None
        }
    }
}

/// `LORA_KERNELS_BENCH_QUICK=1`: fewer samples.
pub fn quick() -> bool {
    std::env::var("LORA_KERNELS_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// Samples per median.
pub fn samples() -> usize {
    if quick() {
        9
    } else {
        31
    }
}

/// Criterion with the benches' settings (command-line options still apply).
pub fn criterion() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(if quick() { 300 } else { 800 }))
        .sample_size(10)
        .configure_from_args()
}

/// "device: NAME (sm_XY, N SMs)".
pub fn device_line(gpu: &Gpu) -> String {
    let (major, minor) = gpu.compute_capability();
    format!(
        "device: {} (sm_{major}{minor}, {} SMs)",
        gpu.name(),
        gpu.sm_count()
    )
}

/// Prints `table` and writes it to `$LORA_KERNELS_BENCH_OUT` if set.
pub fn finish(table: &str) {
    println!("\n{table}");
    if let Ok(path) = std::env::var("LORA_KERNELS_BENCH_OUT") {
        std::fs::write(path, table).unwrap();
    }
}
