//! The Hopper GEMM core (`cuda::gemm::matmul_nt`) against cuBLAS, bf16, in one process:
//!
//! - `cublas`: cuBLAS `y = x Wᵀ` (f32 accumulation);
//! - `ours`: the GEMM core, `y = x Wᵀ`;
//! - `ours_lr16`: the GEMM core with the r = 16 low-rank K-slice, `y = x Wᵀ + U Blᵀ`
//!   (compared with cuBLAS's base product alone: the fused LoRA forward's target);
//! - `w256`, `w128`: the core with its tile width forced to 256 or 128 columns (the
//!   table's `w256/cuB`, `w128/cuB`; `ours` is the per-call choice,
//!   `cuda::gemm::tile_n_for`);
//! - `cublas_nn`, `ours_nn` (the table's last columns): `y = x W` with W stored [K, N]
//!   (the LoRA backward's `dX = dY W`), cuBLAS and `cuda::gemm::matmul_nn` (the core with
//!   an MN-major B), the same W buffer read as [K, N];
//! - `ours_mma` (the table's `mma/cuB`): `y = x Wᵀ` on the mma.sync kernels (the sm_80 ..
//!   sm_89 path, forced here), for reference: on Hopper they lack wgmma and TMA.
//!
//! Shapes: K = 4096, (T, N) ∈ {(4096, 4096), (4096, 11008), (512, 4096)}, plus 4096³
//! (the same as the first, kept as the reference row). Inputs are random and rotated over
//! enough copies to exceed L2 (≥ 128 MB per rotation); each figure is the median of
//! CUDA-event-timed batches. The table (µs, TFLOP/s, ours / cuBLAS) is printed at the
//! end and written to `$LORA_KERNELS_BENCH_OUT` if set; JSON records go to
//! `$LORA_KERNELS_BENCH_JSON`. Off sm_90 or without a GPU the bench says so and exits.

use std::fmt::Write as _;
use std::time::Duration;

mod common;

use cudarc::driver::CudaSlice;
use lora_kernels::cuda::gemm::{self as core, GemmEpilogue};
use lora_kernels::cuda::{gemm, Gpu};
use lora_kernels::{bf16, Tuning};

const RANK: usize = 16;

struct Set {
    x: CudaSlice<bf16>,
    w: CudaSlice<bf16>,
    u: CudaSlice<bf16>,
    bl: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
}

fn random(gpu: &Gpu, n: usize, seed: u64, scale: f32) -> CudaSlice<bf16> {
    gpu.upload(&common::random_bf16(n, seed, scale)).unwrap()
}

fn make_set(gpu: &Gpu, t: usize, n: usize, k: usize, seed: u64) -> Set {
    Set {
        x: random(gpu, t * k, seed, 1.0),
        w: random(gpu, n * k, seed + 1, 1.0 / (k as f32).sqrt()),
        u: random(gpu, t * RANK, seed + 2, 0.1),
        bl: random(gpu, n * RANK, seed + 3, 0.1),
        y: gpu.zeros(t * n).unwrap(),
    }
}

#[derive(Clone, Copy)]
enum Op {
    Cublas,
    Ours,
    OursLr16,
    Wide,
    Narrow,
    CublasNn,
    OursNn,
    OursMma,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Cublas => "cublas",
            Op::Ours => "ours",
            Op::OursLr16 => "ours_lr16",
            Op::Wide => "w256",
            Op::Narrow => "w128",
            Op::CublasNn => "cublas_nn",
            Op::OursNn => "ours_nn",
            Op::OursMma => "ours_mma",
        }
    }
}

fn run(gpu: &Gpu, (t, n, k): (usize, usize, usize), op: Op, s: &mut Set) {
    match op {
        Op::Cublas => gemm(gpu, t, n, k, 1.0, &s.x, false, &s.w, true, 0.0, &mut s.y).unwrap(),
        Op::Ours => {
            core::matmul_nt(gpu, &s.x, &s.w, &mut s.y, &GemmEpilogue::new(), t, n, k).unwrap()
        }
        Op::OursLr16 => {
            let epi = GemmEpilogue::new().with_low_rank(&s.u, &s.bl, RANK);
            core::matmul_nt(gpu, &s.x, &s.w, &mut s.y, &epi, t, n, k).unwrap()
        }
        Op::Wide | Op::Narrow => {
            let w = if matches!(op, Op::Wide) {
                core::TILE_N
            } else {
                core::TILE_N_NARROW
            };
            let epi = GemmEpilogue::new().with_tuning(Tuning {
                tile_n: Some(w),
                ..Tuning::AUTO
            });
            core::matmul_nt(gpu, &s.x, &s.w, &mut s.y, &epi, t, n, k).unwrap();
        }
        Op::CublasNn => gemm(gpu, t, n, k, 1.0, &s.x, false, &s.w, false, 0.0, &mut s.y).unwrap(),
        Op::OursNn => {
            core::matmul_nn(gpu, &s.x, &s.w, &mut s.y, &GemmEpilogue::new(), t, n, k).unwrap()
        }
        Op::OursMma => {
            let epi = GemmEpilogue::new().with_tuning(Tuning {
                mma_path: true,
                ..Tuning::AUTO
            });
            core::matmul_nt(gpu, &s.x, &s.w, &mut s.y, &epi, t, n, k).unwrap();
        }
    }
}

fn main() {
    let Some(gpu) = common::gpu_or_skip("gemm") else {
        return;
    };
    if !core::supported(&gpu) {
        let (major, minor) = gpu.compute_capability();
        eprintln!("\n*** gemm bench SKIPPED: the GEMM core needs sm_90, this GPU is sm_{major}{minor} ***\n");
        return;
    }
    let rec = common::Recorder::new(&gpu, "gemm");
    let samples = common::samples();
    let mut criterion = common::criterion();

    let mut table = String::new();
    writeln!(table, "{}", common::device_line(&gpu)).unwrap();
    writeln!(
        table,
        "bf16, y = x Wᵀ (K = 4096); median µs of {samples} CUDA-event batches; inputs rotated past L2"
    )
    .unwrap();
    writeln!(
        table,
        "{:>6} {:>6} {:>6} | {:>9} {:>9} {:>9} | {:>8} {:>8} {:>8} | {:>8} {:>9} | {:>9} {:>9} | {:>9} {:>9} {:>8} | {:>8}",
        "T",
        "N",
        "K",
        "cuBLAS",
        "ours",
        "ours+r16",
        "cuB TF",
        "ours TF",
        "o+r TF",
        "ours/cuB",
        "o+r/cuB",
        "w256/cuB",
        "w128/cuB",
        "cuB nn",
        "ours nn",
        "nn/cuBnn",
        "mma/cuB"
    )
    .unwrap();

    let shapes = [
        (4096usize, 4096usize, 4096usize),
        (4096, 11008, 4096),
        (512, 4096, 4096),
    ];
    for &(t, n, k) in &shapes {
        let tag = format!("T{t}_N{n}_K{k}");
        if std::env::var("LORA_KERNELS_BENCH_FILTER").is_ok_and(|f| !tag.contains(&f)) {
            continue;
        }
        let bytes = 2 * (t * k + n * k + t * n + (t + n) * RANK);
        let nsets = (128usize << 20).div_ceil(bytes).clamp(1, 8);
        let mut sets: Vec<Set> = (0..nsets)
            .map(|i| make_set(&gpu, t, n, k, 100 * i as u64 + 1))
            .collect();
        let ops = [
            Op::Cublas,
            Op::Ours,
            Op::OursLr16,
            Op::Wide,
            Op::Narrow,
            Op::CublasNn,
            Op::OursNn,
            Op::OursMma,
        ];
        let us: Vec<f64> = ops
            .iter()
            .map(|&op| {
                let m = sets.len();
                common::median_us(&gpu, samples, |i| {
                    run(&gpu, (t, n, k), op, &mut sets[i % m])
                })
            })
            .collect();
        let flops = 2.0 * (t * n * k) as f64;
        let flops_lr = 2.0 * (t * n * (k + RANK)) as f64;
        writeln!(
            table,
            "{:>6} {:>6} {:>6} | {:>9.1} {:>9.1} {:>9.1} | {:>8.1} {:>8.1} {:>8.1} | {:>8.3} {:>9.3} | {:>9.3} {:>9.3} | {:>9.1} {:>9.1} {:>8.3} | {:>8.3}",
            t,
            n,
            k,
            us[0],
            us[1],
            us[2],
            flops / us[0] * 1e-6,
            flops / us[1] * 1e-6,
            flops_lr / us[2] * 1e-6,
            us[1] / us[0],
            us[2] / us[0],
            us[3] / us[0],
            us[4] / us[0],
            us[5],
            us[6],
            us[6] / us[5],
            us[7] / us[0]
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
        let shape = format!("T={t} K={k} N={n}");
        let e = |v: usize| v as f64;
        rec.row(common::Row {
            kernel: "gemm core x·Wᵀ",
            shape: shape.clone(),
            dtype: "bf16",
            ours_us: us[1],
            baseline: Some(("cuBLAS x·Wᵀ", us[0])),
            bytes: Some(2.0 * e(t * k + n * k + t * n)),
            flops: Some(flops),
        });
        rec.row(common::Row {
            kernel: "gemm core x·Wᵀ + U·Blᵀ (r = 16)",
            shape: format!("{shape} r={RANK}"),
            dtype: "bf16",
            ours_us: us[2],
            baseline: Some(("cuBLAS x·Wᵀ alone", us[0])),
            bytes: Some(2.0 * e(t * k + n * k + t * n + (t + n) * RANK)),
            flops: Some(flops_lr),
        });
        rec.row(common::Row {
            kernel: "gemm core x·W (W [K, N])",
            shape: shape.clone(),
            dtype: "bf16",
            ours_us: us[6],
            baseline: Some(("cuBLAS x·W", us[5])),
            bytes: Some(2.0 * e(t * k + n * k + t * n)),
            flops: Some(flops),
        });

        let mut group = criterion.benchmark_group(format!("gemm_bf16/{tag}"));
        group.throughput(criterion::Throughput::Elements((t * n * k) as u64));
        for &op in &ops[..3] {
            group.bench_function(op.name(), |bch| {
                bch.iter_custom(|iters| {
                    let m = sets.len();
                    Duration::from_secs_f64(common::time_iters(&gpu, iters, |i| {
                        run(&gpu, (t, n, k), op, &mut sets[i % m])
                    }))
                })
            });
        }
        group.finish();
    }
    common::finish(&table);
}
