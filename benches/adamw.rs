//! AdamW over the LoRA adapters of a Llama-1B-sized model: 16 layers × 7 target modules
//! (q, k, v, o: 2048 → 2048; gate, up: 2048 → 8192; down: 8192 → 2048), rank 16, A [r, K]
//! and B [N, r]: 224 tensors, 12.06 M parameters (f32 parameters and moments), B at 16 ×
//! A's learning rate (LoRA+). In one process, on one device:
//!
//! - `copy`: a device-to-device copy of as many bytes as the f32-gradient step must move
//!   (the copy bandwidth: read + write bytes / time);
//! - `fused_f32`, `fused_bf16`: our step, one launch for all 224 tensors, with f32 or
//!   bf16 gradients; `fused_bf16_copy`: bf16 gradients and a bf16 copy of the updated
//!   parameters written too;
//! - `per_tensor_f32`: the same kernel launched once per tensor (224 launches, each with
//!   its own table upload);
//! - `candle_f32` (with the crate feature `candle-cuda` only): `candle_nn::AdamW` (f32,
//!   one learning rate; about a dozen tensor ops per tensor) on the same tensors;
//! - `fused_f32_untracked`: `fused_f32` on buffers allocated with cudarc's event tracking
//!   off. With tracking on (cudarc's default once a context has a second stream, as
//!   `Gpu::new` and candle's device make), every buffer an op touches costs the host a
//!   `cuStreamWaitEvent` and a `cuEventRecord`: 900 of each for these 224 tensors.
//!
//! GB/s counts the fewest bytes each op must move: `param`, `m`, `v` read and written
//! (24 B per element), the gradient read (4 or 2 B) and the copy written (2 B). Each
//! figure is the median of CUDA-event-timed batches on the stream every op runs on
//! (candle's when `candle-cuda` is on), so host work that leaves the GPU idle counts;
//! "host µs" is the time one call takes to return (its submission alone, measured over
//! 50 calls without waiting for the GPU). The table is printed at the end (and written to
//! `$LORA_KERNELS_BENCH_OUT`); criterion records each op too.
//! `LORA_KERNELS_BENCH_QUICK=1`: fewer samples.

use std::fmt::Write as _;
use std::time::Duration;

mod common;

use cudarc::driver::CudaSlice;
use lora_kernels::adamw::{AdamW, TensorOptions};
use lora_kernels::bf16;
use lora_kernels::cuda::{adamw, Gpu};

const OPS: [&str; 8] = [
    "copy",
    "fused_f32",
    "fused_bf16",
    "fused_bf16_copy",
    "per_tensor_f32",
    "candle_f32",
    "fused_f32_untracked",
    "candle_fused_f32",
];
/// Fewest bytes per element of each op (same order as `OPS`).
const BYTES: [f64; 8] = [28.0, 28.0, 26.0, 28.0, 28.0, 28.0, 28.0, 28.0];
const LAYERS: usize = 16;
const RANK: usize = 16;
/// (module, K, N) of one layer.
const MODULES: [(&str, usize, usize); 7] = [
    ("q", 2048, 2048),
    ("k", 2048, 2048),
    ("v", 2048, 2048),
    ("o", 2048, 2048),
    ("gate", 2048, 8192),
    ("up", 2048, 8192),
    ("down", 8192, 2048),
];
const RATIO: f64 = 16.0;

/// The adapter tensors: (length, LoRA+ options) of each A and B.
fn tensors() -> Vec<(usize, TensorOptions)> {
    let mut v = vec![];
    for _ in 0..LAYERS {
        for (_, k, n) in MODULES {
            v.push((RANK * k, TensorOptions::new(1.0)));
            v.push((n * RANK, TensorOptions::new(RATIO)));
        }
    }
    v
}

fn random_f32(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    common::random_bf16(n, seed, scale)
        .iter()
        .map(|x| x.to_f32())
        .collect()
}

/// Parameters, moments and f32 gradients of every tensor: `[p, m, v, g]`.
type Set = [Vec<CudaSlice<f32>>; 4];

struct Data {
    opt: AdamW,
    options: Vec<TensorOptions>,
    /// Made as cudarc makes buffers by default (event tracking on).
    tracked: Set,
    /// The same, allocated with cudarc's event tracking off.
    untracked: Set,
    g16: Vec<CudaSlice<bf16>>,
    copy: Vec<CudaSlice<bf16>>,
    copy_src: CudaSlice<bf16>,
    copy_dst: CudaSlice<bf16>,
    #[cfg(feature = "candle-cuda")]
    candle: Option<candle_side::Candle>,
}

fn fused_f32(gpu: &Gpu, d: &mut Data, t: u64, untracked: bool) {
    let [p, m, v, g] = if untracked {
        &mut d.untracked
    } else {
        &mut d.tracked
    };
    let mut list: Vec<adamw::Tensor<'_, f32>> = p
        .iter_mut()
        .zip(m.iter_mut())
        .zip(v.iter_mut())
        .zip(g.iter())
        .zip(&d.options)
        .map(|((((p, m), v), g), o)| adamw::Tensor::new(p, m, v, g).with_options(*o))
        .collect();
    adamw::step(gpu, &d.opt, t, &mut list).unwrap();
}

fn fused_bf16(gpu: &Gpu, d: &mut Data, t: u64, with_copy: bool) {
    let [p, m, v, _] = &mut d.tracked;
    let mut list: Vec<adamw::Tensor<'_, bf16>> = p
        .iter_mut()
        .zip(m.iter_mut())
        .zip(v.iter_mut())
        .zip(&d.g16)
        .zip(&d.options)
        .zip(&mut d.copy)
        .map(|(((((p, m), v), g), o), c)| {
            let x = adamw::Tensor::new(p, m, v, g).with_options(*o);
            if with_copy {
                x.with_copy(adamw::ParamCopy::Bf16(c))
            } else {
                x
            }
        })
        .collect();
    adamw::step(gpu, &d.opt, t, &mut list).unwrap();
}

fn per_tensor_f32(gpu: &Gpu, d: &mut Data, t: u64) {
    let [p, m, v, g] = &mut d.tracked;
    for i in 0..p.len() {
        let x =
            adamw::Tensor::new(&mut p[i], &mut m[i], &mut v[i], &g[i]).with_options(d.options[i]);
        adamw::step(gpu, &d.opt, t, &mut [x]).unwrap();
    }
}

fn run(gpu: &Gpu, d: &mut Data, op: usize, i: usize) {
    let t = i as u64 + 1;
    match OPS[op] {
        "copy" => gpu
            .stream()
            .memcpy_dtod(&d.copy_src, &mut d.copy_dst)
            .unwrap(),
        "fused_f32" => fused_f32(gpu, d, t, false),
        "fused_f32_untracked" => fused_f32(gpu, d, t, true),
        "fused_bf16" => fused_bf16(gpu, d, t, false),
        "fused_bf16_copy" => fused_bf16(gpu, d, t, true),
        "per_tensor_f32" => per_tensor_f32(gpu, d, t),
        "candle_f32" => candle_step(d, false),
        "candle_fused_f32" => candle_step(d, true),
        _ => unreachable!(),
    }
}

fn available(d: &Data, op: usize) -> bool {
    common::op_selected(OPS[op]) && (!OPS[op].starts_with("candle") || has_candle(d))
}

#[cfg(feature = "candle-cuda")]
fn has_candle(d: &Data) -> bool {
    d.candle.is_some()
}

#[cfg(not(feature = "candle-cuda"))]
fn has_candle(_: &Data) -> bool {
    false
}

#[cfg(feature = "candle-cuda")]
fn candle_step(d: &mut Data, fused: bool) {
    if let Some(c) = &mut d.candle {
        if fused {
            c.step_fused();
        } else {
            c.step();
        }
    }
}

#[cfg(not(feature = "candle-cuda"))]
fn candle_step(_: &mut Data, _: bool) {}

/// Host µs for one call of `op` to return: 50 calls without waiting for the GPU (after
/// 3 of warm-up), then a synchronize outside the timing.
fn host_us(gpu: &Gpu, d: &mut Data, op: usize) -> f64 {
    for i in 0..3 {
        run(gpu, d, op, i);
    }
    gpu.synchronize().unwrap();
    let n = 50;
    let t0 = std::time::Instant::now();
    for i in 0..n {
        run(gpu, d, op, i);
    }
    let us = t0.elapsed().as_secs_f64() * 1e6 / n as f64;
    gpu.synchronize().unwrap();
    us
}

/// candle-nn's AdamW on candle's CUDA device, whose stream our ops share.
#[cfg(feature = "candle-cuda")]
mod candle_side {
    use candle_core::backprop::GradStore;
    use candle_core::{Device, Tensor, Var};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};

    pub struct Candle {
        opt: AdamW,
        grads: GradStore,
        /// The crate's `candle::FusedAdamW` over a second set of the same Vars.
        fused: lora_kernels::candle::FusedAdamW,
        fused_grads: GradStore,
    }

    impl Candle {
        pub fn new(dev: &Device, sizes: &[usize]) -> candle_core::Result<Candle> {
            let mut grads = GradStore::default();
            let mut vars = vec![];
            for (i, &n) in sizes.iter().enumerate() {
                let var = Var::from_slice(&super::random_f32(n, 100 + i as u64, 0.02), n, dev)?;
                let g = Tensor::from_slice(&super::random_f32(n, 900 + i as u64, 1e-3), n, dev)?;
                grads.insert(var.as_tensor(), g);
                vars.push(var);
            }
            let opt = AdamW::new(vars, ParamsAdamW::default())?;
            let mut fused_grads = GradStore::default();
            let mut fvars = vec![];
            for (i, &n) in sizes.iter().enumerate() {
                let var = Var::from_slice(&super::random_f32(n, 100 + i as u64, 0.02), n, dev)?;
                let g = Tensor::from_slice(&super::random_f32(n, 900 + i as u64, 1e-3), n, dev)?;
                fused_grads.insert(var.as_tensor(), g);
                fvars.push((var, lora_kernels::adamw::TensorOptions::new(1.0)));
            }
            let fused = lora_kernels::candle::FusedAdamW::new(
                fvars,
                lora_kernels::adamw::AdamW::default(),
            )?;
            Ok(Candle {
                opt,
                grads,
                fused,
                fused_grads,
            })
        }

        pub fn step(&mut self) {
            self.opt.step(&self.grads).unwrap();
        }

        pub fn step_fused(&mut self) {
            self.fused.step(&self.fused_grads).unwrap();
        }
    }

    /// candle's CUDA device and a `Gpu` on its stream, or `None` after a note.
    pub fn device() -> Option<(Device, super::Gpu)> {
        let dev = match Device::new_cuda(0) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("\n*** adamw bench: candle's CUDA device is unavailable ({e}) ***\n");
                return None;
            }
        };
        let stream = dev.as_cuda_device().ok()?.cuda_stream();
        match super::Gpu::from_stream(stream) {
            Ok(g) => Some((dev, g)),
            Err(e) => {
                eprintln!("\n*** adamw bench SKIPPED: no usable GPU ({e}) ***\n");
                None
            }
        }
    }
}

fn main() {
    #[cfg(feature = "candle-cuda")]
    let Some((candle_dev, gpu)) = candle_side::device() else {
        return;
    };
    #[cfg(not(feature = "candle-cuda"))]
    let Some(gpu) = common::gpu_or_skip("adamw") else {
        return;
    };
    let rec = common::Recorder::new(&gpu, "adamw");
    let samples = common::samples();
    let mut criterion = common::criterion();

    let list = tensors();
    let sizes: Vec<usize> = list.iter().map(|t| t.0).collect();
    let total: usize = sizes.iter().sum();
    let up = |v: Vec<f32>| gpu.upload(&v).unwrap();
    let set = || -> Set {
        [
            (0..sizes.len())
                .map(|i| up(random_f32(sizes[i], 100 + i as u64, 0.02)))
                .collect(),
            sizes.iter().map(|&n| gpu.zeros(n).unwrap()).collect(),
            sizes.iter().map(|&n| gpu.zeros(n).unwrap()).collect(),
            (0..sizes.len())
                .map(|i| up(random_f32(sizes[i], 900 + i as u64, 1e-3)))
                .collect(),
        ]
    };
    let tracked = set();
    // SAFETY: the buffers made while tracking is off are used on `gpu.stream()` alone,
    // the stream they are allocated on, and freed at the end after a synchronize.
    unsafe { gpu.context().disable_event_tracking() };
    let untracked = set();
    // SAFETY: turns tracking back on for later buffers (the tables of each call, candle's).
    unsafe { gpu.context().enable_event_tracking() };
    let mut d = Data {
        opt: AdamW::default(),
        options: list.iter().map(|t| t.1).collect(),
        tracked,
        untracked,
        g16: (0..list.len())
            .map(|i| {
                gpu.upload(&common::random_bf16(sizes[i], 900 + i as u64, 1e-3))
                    .unwrap()
            })
            .collect(),
        copy: sizes.iter().map(|&n| gpu.zeros(n).unwrap()).collect(),
        // 28 bytes per element read and written: 14 B of bf16 each way.
        copy_src: gpu.zeros(7 * total).unwrap(),
        copy_dst: gpu.zeros(7 * total).unwrap(),
        #[cfg(feature = "candle-cuda")]
        candle: candle_side::Candle::new(&candle_dev, &sizes)
            .map_err(|e| eprintln!("adamw bench: candle's AdamW unavailable: {e}"))
            .ok(),
    };

    let us: Vec<f64> = (0..OPS.len())
        .map(|op| {
            if available(&d, op) {
                common::median_us(&gpu, samples, |i| run(&gpu, &mut d, op, i))
            } else {
                f64::NAN
            }
        })
        .collect();
    let host: Vec<f64> = (0..OPS.len())
        .map(|op| {
            if available(&d, op) && OPS[op] != "copy" {
                host_us(&gpu, &mut d, op)
            } else {
                f64::NAN
            }
        })
        .collect();
    gpu.synchronize().unwrap();

    let e = total as f64;
    let bytes = BYTES.map(|b| b * e);
    let mut table = String::new();
    writeln!(table, "{}", common::device_line(&gpu)).unwrap();
    writeln!(
        table,
        "AdamW, {} tensors ({LAYERS} layers x {} modules, r = {RANK}), {:.2} M f32 parameters; \
         median µs of {samples} CUDA-event batches; GB/s = fewest bytes / time",
        sizes.len(),
        MODULES.len(),
        e * 1e-6
    )
    .unwrap();
    writeln!(
        table,
        "{:<20} {:>9} {:>8} {:>10} {:>8} {:>10}",
        "op", "µs", "GB/s", "/fused_f32", "% copy", "host µs"
    )
    .unwrap();
    for (i, op) in OPS.iter().enumerate() {
        let t = us[i];
        writeln!(
            table,
            "{:<20} {:>9.1} {:>8.0} {:>10.2} {:>7.1}% {:>10.1}",
            op,
            t,
            bytes[i] / t * 1e-3,
            t / us[1],
            100.0 * us[0] / t * bytes[i] / bytes[0],
            host[i]
        )
        .unwrap();
    }
    eprint!("{table}");

    let shape = format!(
        "{} tensors, {LAYERS} layers x {} modules, r={RANK}, {total} params",
        sizes.len(),
        MODULES.len()
    );
    let f32_grads = "f32 params/moments, f32 grads";
    let bf16_grads = "f32 params/moments, bf16 grads";
    // (kernel, index of our figure, dtype, baseline)
    type Record<'a> = (&'a str, usize, &'a str, Option<(&'a str, f64)>);
    let mut rows: Vec<Record<'_>> = vec![
        (
            "adamw, one launch",
            1,
            f32_grads,
            Some(("a launch per tensor (ours)", us[4])).filter(|b| b.1.is_finite()),
        ),
        ("adamw, one launch", 2, bf16_grads, None),
        ("adamw, one launch, bf16 copy", 3, bf16_grads, None),
    ];
    if us[6].is_finite() {
        rows.push((
            "adamw, one launch, untracked buffers",
            6,
            f32_grads,
            Some(("the same on tracked buffers (ours)", us[1])),
        ));
    }
    if us[5].is_finite() {
        rows.push((
            "adamw, one launch (vs candle-nn)",
            1,
            f32_grads,
            Some(("candle_nn::AdamW", us[5])),
        ));
    }
    for (kernel, i, dtype, baseline) in rows {
        if !us[i].is_finite() {
            continue;
        }
        rec.row(common::Row {
            kernel,
            shape: shape.clone(),
            dtype,
            ours_us: us[i],
            baseline,
            bytes: Some(bytes[i]),
            flops: None,
        });
    }

    let mut group = criterion.benchmark_group("adamw/llama1b_lora_r16");
    group.throughput(criterion::Throughput::Bytes(bytes[1] as u64));
    for (op, name) in OPS.iter().enumerate() {
        if !available(&d, op) {
            continue;
        }
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                Duration::from_secs_f64(common::time_iters(&gpu, iters, |i| {
                    run(&gpu, &mut d, op, i)
                }))
            })
        });
    }
    group.finish();
    common::finish(&table);
}
