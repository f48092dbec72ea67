//! What every bench shares: random inputs, CUDA-event timing of a batch of runs, the
//! median over batches, the device line, criterion's settings and the JSON records
//! (with the copy and matrix references) that `scripts/bench_report.py` reads.

#![allow(dead_code)]

use std::time::Duration;

use criterion::Criterion;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use lora_kernels::bf16;
use lora_kernels::cuda::{gemm, Gpu};

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

/// Whether the op named `name` runs: `LORA_KERNELS_BENCH_OPS` (comma-separated op names)
/// keeps only those (for profiling one op's launches under ncu); unset, every op runs.
/// A skipped op's figures read NaN.
pub fn op_selected(name: &str) -> bool {
    match std::env::var("LORA_KERNELS_BENCH_OPS") {
        Ok(list) => list.split(',').any(|o| o.trim() == name),
        Err(_) => true,
    }
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

/// Machine-readable records for `scripts/bench_report.py`.
///
/// When `$LORA_KERNELS_BENCH_JSON` names a file, every bench appends one JSON object per
/// line to it (the file is never truncated here: `scripts/bench-report.sh` starts it
/// fresh). Two kinds of line, told apart by `"record"`:
///
/// - `"run"`, one per bench process, written by [`Recorder::new`]: `bench`, `device`
///   (the [`device_line`]), `gpu` (the name alone), `sm`, `sms`, `samples`, `quick`,
///   `unix_time`, and the two references measured in the same process:
///   `copy_gbs` (a device-to-device copy of a 256 MiB buffer, read + write bytes / time,
///   GB/s = 1e9 B/s; also `copy_bytes`, `copy_us`) and `matrix_tflops` (cuBLAS bf16
///   `x·Wᵀ`, M = N = K = 4096, f32 accumulation, 2·M·N·K / time; also `matrix_flops`,
///   `matrix_us`, `matrix_op`);
/// - `"row"`, one per row of a bench's table, written by [`Recorder::row`]: `bench`,
///   `kernel`, `shape`, `dtype`, `ours_us`, `baseline` (its name, or null), `baseline_us`
///   (or null), `speedup` (= `baseline_us / ours_us`: above 1 means ours is faster; null
///   without a baseline), `bytes` (the fewest bytes the op must move to or from device
///   memory: each input read once, each output written once; or null) and `flops` (the
///   arithmetic the op must do, 2 per multiply-add; or null).
///
/// All times are medians in µs from [`median_us`]. Without the variable nothing is
/// measured or written, so a plain `cargo bench` is unchanged.
pub struct Recorder {
    bench: &'static str,
    path: Option<String>,
}

/// One row for [`Recorder::row`].
pub struct Row<'a> {
    /// The op, e.g. "lora forward".
    pub kernel: &'a str,
    /// The shape, e.g. "T=16 K=4096 N=4096 r=16".
    pub shape: String,
    /// The element types, e.g. "bf16".
    pub dtype: &'a str,
    /// Our median µs.
    pub ours_us: f64,
    /// The baseline's name and median µs, measured in the same process.
    pub baseline: Option<(&'a str, f64)>,
    /// Fewest bytes the op must move (inputs read once, outputs written once).
    pub bytes: Option<f64>,
    /// Flops the op must do (2 per multiply-add).
    pub flops: Option<f64>,
}

impl Recorder {
    /// For the bench `bench` (its file name): if `$LORA_KERNELS_BENCH_JSON` is set,
    /// measures the copy and matrix references on `gpu` and appends the run record.
    pub fn new(gpu: &Gpu, bench: &'static str) -> Recorder {
        let path = std::env::var("LORA_KERNELS_BENCH_JSON")
            .ok()
            .filter(|p| !p.is_empty());
        let rec = Recorder { bench, path };
        if rec.path.is_some() {
            let (copy_bytes, copy_us) = copy_reference(gpu);
            let (matrix_flops, matrix_us) = matrix_reference(gpu);
            let (major, minor) = gpu.compute_capability();
            let unix_time = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            eprintln!(
                "{bench}: references: copy {:.0} GB/s, cuBLAS bf16 4096³ {:.1} TFLOP/s",
                copy_bytes / copy_us * 1e-3,
                matrix_flops / matrix_us * 1e-6
            );
            rec.write(serde_json::json!({
                "record": "run",
                "bench": bench,
                "device": device_line(gpu),
                "gpu": gpu.name(),
                "sm": format!("sm_{major}{minor}"),
                "sms": gpu.sm_count(),
                "samples": samples(),
                "quick": quick(),
                "unix_time": unix_time,
                "copy_bytes": copy_bytes,
                "copy_us": copy_us,
                "copy_gbs": copy_bytes / copy_us * 1e-3,
                "matrix_op": "cuBLAS bf16 x·Wᵀ, M = N = K = 4096, f32 accumulation",
                "matrix_flops": matrix_flops,
                "matrix_us": matrix_us,
                "matrix_tflops": matrix_flops / matrix_us * 1e-6,
            }));
        }
        rec
    }

    /// Appends one row record (nothing without `$LORA_KERNELS_BENCH_JSON`).
    pub fn row(&self, row: Row) {
        if self.path.is_none() {
            return;
        }
        let (baseline, baseline_us) = match row.baseline {
            Some((name, us)) => (Some(name), Some(us)),
            None => (None, None),
        };
        self.write(serde_json::json!({
            "record": "row",
            "bench": self.bench,
            "kernel": row.kernel,
            "shape": row.shape,
            "dtype": row.dtype,
            "ours_us": row.ours_us,
            "baseline": baseline,
            "baseline_us": baseline_us,
            "speedup": baseline_us.map(|b| b / row.ours_us),
            "bytes": row.bytes,
            "flops": row.flops,
        }));
    }

    fn write(&self, value: serde_json::Value) {
        use std::io::Write as _;
        let Some(path) = &self.path else { return };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("LORA_KERNELS_BENCH_JSON={path}: {e}"));
        writeln!(f, "{value}").unwrap();
    }
}

/// (bytes, median µs) of a device-to-device copy of a 256 MiB buffer; bytes count the
/// read and the write, as the benches' own copy columns do. Far larger than L2.
fn copy_reference(gpu: &Gpu) -> (f64, f64) {
    let len = 128usize << 20; // bf16 elements: 256 MiB
                              // Zeros, as neftune's copy source: 256 MiB of random host data would take about a
                              // second to make and upload.
    let src: CudaSlice<bf16> = gpu.zeros(len).unwrap();
    let mut dst: CudaSlice<bf16> = gpu.zeros(len).unwrap();
    let us = median_us(gpu, samples(), |_| {
        gpu.stream().memcpy_dtod(&src, &mut dst).unwrap()
    });
    (2.0 * (len * 2) as f64, us)
}

/// (flops, median µs) of cuBLAS bf16 `c = a·bᵀ`, M = N = K = 4096, random inputs.
fn matrix_reference(gpu: &Gpu) -> (f64, f64) {
    let d = 4096usize;
    let a: CudaSlice<bf16> = gpu.upload(&random_bf16(d * d, 12, 1.0)).unwrap();
    let b: CudaSlice<bf16> = gpu.upload(&random_bf16(d * d, 13, 0.02)).unwrap();
    let mut c: CudaSlice<bf16> = gpu.zeros(d * d).unwrap();
    let us = median_us(gpu, samples(), |_| {
        gemm(gpu, d, d, d, 1.0, &a, false, &b, true, 0.0, &mut c).unwrap()
    });
    (2.0 * (d * d * d) as f64, us)
}
