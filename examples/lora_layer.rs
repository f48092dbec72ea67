//! The main example: one LoRA linear layer, forward and backward, in bf16.
//!
//! On a GPU it runs the CUDA kernels, checks every output against the CPU oracle and
//! prints timings; without one it runs the CPU oracle alone (and says why).
//!
//! ```text
//! cargo run --release --example lora_layer -- [--tokens T] [--in K] [--out N] [--rank R] [--dropout P] [--cpu]
//! ```

use std::time::Instant;

use lora_kernels::cpu::lora as cpu;
use lora_kernels::cuda::{lora as cuda, Gpu};
use lora_kernels::{bf16, lora, Dropout, LoraGrads, LoraOptions, LoraShape, LoraWeights};

struct Args {
    shape: LoraShape,
    dropout: f32,
    force_cpu: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        shape: LoraShape::new(128, 1024, 1024, 16),
        dropout: 0.1,
        force_cpu: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<String, String> {
            it.next().ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--tokens" => {
                a.shape.tokens = value("--tokens")?
                    .parse()
                    .map_err(|e| format!("--tokens: {e}"))?
            }
            "--in" => {
                a.shape.in_features = value("--in")?.parse().map_err(|e| format!("--in: {e}"))?
            }
            "--out" => {
                a.shape.out_features = value("--out")?.parse().map_err(|e| format!("--out: {e}"))?
            }
            "--rank" => {
                a.shape.rank = value("--rank")?
                    .parse()
                    .map_err(|e| format!("--rank: {e}"))?
            }
            "--dropout" => {
                a.dropout = value("--dropout")?
                    .parse()
                    .map_err(|e| format!("--dropout: {e}"))?
            }
            "--cpu" => a.force_cpu = true,
            "-h" | "--help" => {
                println!("usage: lora_layer [--tokens T] [--in K] [--out N] [--rank R] [--dropout P] [--cpu]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(a)
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

/// ‖got − want‖ / ‖want‖.
fn rel_err(got: &[bf16], want: &[bf16]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        num += (g.to_f64() - w.to_f64()).powi(2);
        den += w.to_f64().powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let s = args.shape;
    if let Err(e) = s.validate() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let (alpha, seed) = (32.0, 7);
    let mut opts = LoraOptions::new(lora::scale(alpha, s.rank));
    if args.dropout > 0.0 {
        opts = opts.with_dropout(Dropout::new(args.dropout, seed, 0));
    }
    println!(
        "LoRA linear, bf16: T = {}, K = {}, N = {}, r = {}, scale = alpha/r = {}, dropout p = {}",
        s.tokens, s.in_features, s.out_features, s.rank, opts.scale, args.dropout
    );
    let k = s.in_features as f32;
    let x = random(s.x_len(), 1, 1.0);
    let w = random(s.w_len(), 2, 1.0 / k.sqrt());
    let a = random(s.a_len(), 3, 1.0 / k.sqrt());
    let b = random(s.b_len(), 4, 0.05);
    let bias = random(s.out_features, 5, 0.1);
    let dy = random(s.y_len(), 6, 1.0);

    // The CPU oracle: f64 accumulation, rounded once.
    let t0 = Instant::now();
    let weights = LoraWeights {
        w: &w[..],
        a: &a[..],
        b: &b[..],
        bias: Some(&bias[..]),
    };
    let (mut y, mut h) = (vec![bf16::ZERO; s.y_len()], vec![bf16::ZERO; s.h_len()]);
    cpu::forward(&s, &opts, &x, weights, &mut y, Some(&mut h)).expect("oracle forward");
    let (mut dx, mut da, mut db) = (
        vec![bf16::ZERO; s.x_len()],
        vec![bf16::ZERO; s.a_len()],
        vec![bf16::ZERO; s.b_len()],
    );
    let grads = LoraGrads {
        dx: &mut dx[..],
        da: &mut da[..],
        db: &mut db[..],
    };
    cpu::backward(&s, &opts, &x, weights, &h, &dy, grads).expect("oracle backward");
    println!(
        "CPU oracle: forward + backward in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );

    let gpu = if args.force_cpu {
        println!("--cpu given: the GPU is not used.");
        None
    } else {
        match Gpu::new(0) {
            Ok(g) => Some(g),
            Err(e) => {
                println!("No GPU ({e}): ran the CPU oracle only.");
                None
            }
        }
    };
    let Some(gpu) = gpu else {
        println!("y[0, 0..4] = {:?}", &y[..4.min(y.len())]);
        return;
    };
    println!(
        "GPU: {} (sm_{}{}, {} SMs)",
        gpu.name(),
        gpu.compute_capability().0,
        gpu.compute_capability().1,
        gpu.sm_count()
    );

    let up = |v: &[bf16]| gpu.upload(v).expect("upload");
    let (xd, wd, ad, bd, biasd, dyd) = (up(&x), up(&w), up(&a), up(&b), up(&bias), up(&dy));
    let mut yd = gpu.zeros::<bf16>(s.y_len()).unwrap();
    let mut hd = gpu.zeros::<bf16>(s.h_len()).unwrap();
    let mut dxd = gpu.zeros::<bf16>(s.x_len()).unwrap();
    let mut dad = gpu.zeros::<bf16>(s.a_len()).unwrap();
    let mut dbd = gpu.zeros::<bf16>(s.b_len()).unwrap();
    let wts = LoraWeights {
        w: &wd,
        a: &ad,
        b: &bd,
        bias: Some(&biasd),
    };
    let step = |yd: &mut _, hd: &mut _, dxd: &mut _, dad: &mut _, dbd: &mut _| {
        cuda::forward(&gpu, &s, &opts, &xd, wts, yd, Some(hd)).expect("forward");
        let grads = LoraGrads {
            dx: dxd,
            da: dad,
            db: dbd,
        };
        cuda::backward(&gpu, &s, &opts, &xd, wts, &*hd, &dyd, grads).expect("backward");
    };
    step(&mut yd, &mut hd, &mut dxd, &mut dad, &mut dbd);
    gpu.synchronize().unwrap();

    // Check against the oracle. The oracle's backward uses the GPU's h, as training does.
    let h_gpu = gpu.download(&hd).unwrap();
    let (mut dx2, mut da2, mut db2) = (
        vec![bf16::ZERO; s.x_len()],
        vec![bf16::ZERO; s.a_len()],
        vec![bf16::ZERO; s.b_len()],
    );
    let grads = LoraGrads {
        dx: &mut dx2[..],
        da: &mut da2[..],
        db: &mut db2[..],
    };
    cpu::backward(&s, &opts, &x, weights, &h_gpu, &dy, grads).expect("oracle backward");
    let mut ok = true;
    for (name, got, want) in [
        ("y", gpu.download(&yd).unwrap(), &y),
        ("h", h_gpu.clone(), &h),
        ("dX", gpu.download(&dxd).unwrap(), &dx2),
        ("dA", gpu.download(&dad).unwrap(), &da2),
        ("dB", gpu.download(&dbd).unwrap(), &db2),
    ] {
        let e = rel_err(&got, want);
        let pass = e < 1e-2;
        ok &= pass;
        println!(
            "  {name:>2}: relative error vs oracle {e:.2e} {}",
            if pass { "ok" } else { "MISMATCH" }
        );
    }

    // Timings: CUDA events around repeated steps.
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let iters = 50;
    let start = gpu.stream().record_event(flags).unwrap();
    for _ in 0..iters {
        cuda::forward(&gpu, &s, &opts, &xd, wts, &mut yd, Some(&mut hd)).unwrap();
    }
    let mid = gpu.stream().record_event(flags).unwrap();
    for _ in 0..iters {
        step(&mut yd, &mut hd, &mut dxd, &mut dad, &mut dbd);
    }
    let end = gpu.stream().record_event(flags).unwrap();
    end.synchronize().unwrap();
    let fwd = start.elapsed_ms(&mid).unwrap() as f64 * 1e3 / iters as f64;
    let both = mid.elapsed_ms(&end).unwrap() as f64 * 1e3 / iters as f64;
    println!("GPU: forward {fwd:.1} µs, forward + backward {both:.1} µs (mean of {iters})");
    if !ok {
        eprintln!("GPU results disagree with the oracle");
        std::process::exit(1);
    }
}
