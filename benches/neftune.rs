//! NEFTune benches, bf16, 8 × 512 tokens, d = 4096, vocabulary 32000. In one process, on
//! one device:
//!
//! - `copy`: a device-to-device copy of the output's size (the copy bandwidth:
//!   read + write bytes / time);
//! - `gather`: our plain gather (`cuda::neftune::gather`);
//! - `fused_padded`, `fused_mask`, `fused_lengths`: our gather + noise in one pass;
//! - `gather_then_noise`: our gather followed by our in-place noise kernel (the
//!   two-pass composition transformers' hook performs);
//! - `bwd_atomic`, `bwd_deterministic`: the table gradient (f32, 32000 × 4096).
//!
//! The table (262 MB) is far larger than L2; ids are random; outputs rotate over
//! enough buffers to exceed L2. Each figure is the median of CUDA-event-timed batches.
//! The ratio table is printed at the end (and written to `$LORA_KERNELS_BENCH_OUT`);
//! criterion records each op too. `LORA_KERNELS_BENCH_QUICK=1`: fewer samples.

use std::fmt::Write as _;
use std::time::Duration;

mod common;

use cudarc::driver::CudaSlice;
use lora_kernels::cuda::{neftune as cuda, Gpu};
use lora_kernels::neftune::BackwardOptions;
use lora_kernels::{bf16, EmbedShape, Noise, SeqLen};

const OPS: [&str; 8] = [
    "copy",
    "gather",
    "fused_padded",
    "fused_mask",
    "fused_lengths",
    "gather_then_noise",
    "bwd_atomic",
    "bwd_deterministic",
];

struct Data {
    shape: EmbedShape,
    table: CudaSlice<bf16>,
    ids: CudaSlice<i64>,
    mask: CudaSlice<i64>,
    lengths: CudaSlice<i64>,
    src: CudaSlice<bf16>,
    outs: Vec<CudaSlice<bf16>>,
    d_table: CudaSlice<f32>,
}

fn run(gpu: &Gpu, d: &mut Data, op: usize, i: usize) {
    let n = d.outs.len();
    let out = &mut d.outs[i % n];
    let noise = Noise::new(5.0, 1, i as u64);
    let s = &d.shape;
    match OPS[op] {
        "copy" => gpu.stream().memcpy_dtod(&d.src, out).unwrap(),
        "gather" => cuda::gather(gpu, s, &d.table, &d.ids, out).unwrap(),
        "fused_padded" => cuda::embed(
            gpu,
            s,
            &d.table,
            &d.ids,
            &noise,
            SeqLen::<CudaSlice<i64>>::Padded,
            out,
        )
        .unwrap(),
        "fused_mask" => {
            cuda::embed(gpu, s, &d.table, &d.ids, &noise, SeqLen::Mask(&d.mask), out).unwrap()
        }
        "fused_lengths" => cuda::embed(
            gpu,
            s,
            &d.table,
            &d.ids,
            &noise,
            SeqLen::Lengths(&d.lengths),
            out,
        )
        .unwrap(),
        "gather_then_noise" => {
            cuda::gather(gpu, s, &d.table, &d.ids, out).unwrap();
            cuda::add_noise(gpu, s, &noise, SeqLen::<CudaSlice<i64>>::Padded, out).unwrap();
        }
        "bwd_atomic" | "bwd_deterministic" => {
            let opts = BackwardOptions {
                deterministic: OPS[op] == "bwd_deterministic",
                padding_idx: None,
            };
            cuda::embedding_backward(gpu, s, &d.ids, &*out, &mut d.d_table, &opts).unwrap()
        }
        _ => unreachable!(),
    }
}

fn time_iters(gpu: &Gpu, d: &mut Data, op: usize, iters: u64) -> f64 {
    common::time_iters(gpu, iters, |i| run(gpu, d, op, i))
}

/// The JSON records (`us` in `OPS` order): the gather against a copy of the output's
/// size, each fused gather + noise against the two-pass composition, and the
/// deterministic table gradient against the atomic one.
fn record(rec: &common::Recorder, s: &EmbedShape, us: &[f64]) {
    let shape = format!("B={} S={} d={} V={}", s.batch, s.seq, s.dim, s.vocab);
    let tokens = s.tokens() as f64;
    // Fewest bytes: the ids (i64) and the gathered table rows read, the output written
    // (plus the mask or the lengths); the gradient reads the ids and d_out and updates
    // one f32 table row per token (read + write).
    let out = 2.0 * s.out_len() as f64;
    let gather = 8.0 * tokens + 2.0 * out;
    let two_pass = "gather, then noise in a second pass (ours)";
    let bwd = 8.0 * tokens + out + 2.0 * 4.0 * tokens * s.dim as f64;
    let rows = [
        (
            "embedding gather",
            1,
            Some(("copy of the output's bytes", us[0])),
            gather,
        ),
        ("gather + noise, padded", 2, Some((two_pass, us[5])), gather),
        (
            "gather + noise, mask",
            3,
            Some((two_pass, us[5])),
            gather + 8.0 * tokens,
        ),
        (
            "gather + noise, lengths",
            4,
            Some((two_pass, us[5])),
            gather + 8.0 * s.batch as f64,
        ),
        ("embedding backward, atomics", 6, None, bwd),
        (
            "embedding backward, deterministic",
            7,
            Some(("embedding backward, atomics (ours)", us[6])),
            bwd,
        ),
    ];
    for (kernel, ours, baseline, bytes) in rows {
        rec.row(common::Row {
            kernel,
            shape: shape.clone(),
            dtype: if kernel.starts_with("embedding backward") {
                "bf16 d_out, f32 gradient"
            } else {
                "bf16"
            },
            ours_us: us[ours],
            baseline,
            bytes: Some(bytes),
            flops: None,
        });
    }
}

fn main() {
    let Some(gpu) = common::gpu_or_skip("neftune") else {
        return;
    };
    let rec = common::Recorder::new(&gpu, "neftune");
    let samples = common::samples();
    let mut criterion = common::criterion();

    let shape = EmbedShape::new(8, 512, 32000, 4096);
    let mut s = 0x1234_5678_9abc_def1u64;
    let table = common::random_bf16(shape.table_len(), 3, 0.5);
    let ids: Vec<i64> = (0..shape.tokens())
        .map(|_| (common::xorshift(&mut s) % shape.vocab as u64) as i64)
        .collect();
    // Right-padded sequences of 512, 400, ..., as a mask and as lengths.
    let lens: Vec<i64> = (0..shape.batch as i64).map(|b| 512 - 40 * b).collect();
    let mask: Vec<i64> = (0..shape.tokens())
        .map(|p| ((p % shape.seq) < lens[p / shape.seq] as usize) as i64)
        .collect();
    let out_bytes = shape.out_len() * 2;
    let n_outs = (128usize << 20).div_ceil(out_bytes).max(2);
    let mut d = Data {
        shape,
        table: gpu.upload(&table).unwrap(),
        ids: gpu.stream().clone_htod(&ids).unwrap(),
        mask: gpu.stream().clone_htod(&mask).unwrap(),
        lengths: gpu.stream().clone_htod(&lens).unwrap(),
        src: gpu.zeros(shape.out_len()).unwrap(),
        outs: (0..n_outs)
            .map(|_| gpu.zeros(shape.out_len()).unwrap())
            .collect(),
        d_table: gpu.zeros(shape.table_len()).unwrap(),
    };
    drop(table);

    let us: Vec<f64> = (0..OPS.len())
        .map(|op| common::median_us(&gpu, samples, |i| run(&gpu, &mut d, op, i)))
        .collect();
    gpu.take_index_errors().unwrap();
    let moved = 2.0 * out_bytes as f64; // read + write
    let gbs = |t: f64| moved / t * 1e-3;
    let mut table = String::new();
    writeln!(table, "{}", common::device_line(&gpu)).unwrap();
    writeln!(
        table,
        "NEFTune, bf16, batch 8 x seq 512, d 4096, vocab 32000; median µs of {samples} \
         CUDA-event batches; GB/s = (read + write bytes of the output) / time"
    )
    .unwrap();
    writeln!(
        table,
        "{:<18} {:>9} {:>9} {:>10} {:>10}",
        "op", "µs", "GB/s", "/gather", "% copy"
    )
    .unwrap();
    for (op, &t) in OPS.iter().zip(&us) {
        writeln!(
            table,
            "{:<18} {:>9.1} {:>9.0} {:>10.3} {:>9.1}%",
            op,
            t,
            gbs(t),
            t / us[1],
            100.0 * us[0] / t
        )
        .unwrap();
    }
    eprint!("{table}");
    record(&rec, &shape, &us);

    let mut group = criterion.benchmark_group("neftune_bf16/B8_S512_d4096");
    group.throughput(criterion::Throughput::Bytes(moved as u64));
    for (op, name) in OPS.iter().enumerate() {
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| Duration::from_secs_f64(time_iters(&gpu, &mut d, op, iters)))
        });
    }
    group.finish();
    common::finish(&table);
}
