//! The main example: an end-to-end QLoRA / QDoRA fine-tune of a small transformer-like
//! model with the crate's kernels, ending in a peft adapter.
//!
//! ```text
//! cargo run --release --example finetune -- [--dora] [--cpu] [--steps N] [--lr LR]
//!     [--loraplus-ratio R] [--rank R] [--alpha A] [--dropout P] [--neftune-alpha A]
//!     [--vocab V] [--dim D] [--hidden F] [--layers L] [--batch B] [--seq S]
//!     [--seed S] [--out DIR]
//! ```
//!
//! The model (every linear layer frozen in NF4, double-quantized, blocksize 64, with a
//! LoRA or DoRA adapter that is the only thing trained):
//! ```text
//! x  = embed[ids] + NEFTune noise (training only)             frozen table, [V, D]
//! per layer i:  a = x + causal_mean(x)                         token mixing, no weights
//!               x = a + layers.i.down(relu(layers.i.up(rmsnorm(a))))
//! logits = head(rmsnorm(x))                                   [T, V]
//! loss   = cross-entropy of the next token
//! ```
//! The task, generated from the seed: sequences that follow a fixed random permutation
//! of the vocabulary (`next = perm[current]`), so the loss can fall from ln V towards 0.
//!
//! On a GPU the linear layers (QLoRA: [`lora_kernels::cuda::qlora`], QDoRA:
//! [`lora_kernels::cuda::qdora`]) and the embedding with NEFTune noise
//! ([`lora_kernels::cuda::neftune`]) run in bf16 on the device; the parameter-free
//! parts (token mixing, RMS norm, ReLU, softmax cross-entropy) and AdamW (f32 master
//! weights) run on the host, with the activations copied between them. Without a GPU
//! (or with `--cpu`) the same model runs on the CPU oracle in f32, smaller by default.
//!
//! It ends by writing, under `--out` (default `target/finetune`):
//! - `adapter/`: the adapter in peft's format (`adapter_config.json`,
//!   `adapter_model.safetensors`), which `PeftModel.from_pretrained` loads;
//! - `base_model.safetensors`: the frozen weights (the NF4 layers dequantized to f32,
//!   and the embedding) and the model's sizes, for `scripts/check_finetune.py`, which
//!   rebuilds the model in torch, loads the adapter with peft and compares its logits
//!   with `eval.safetensors` (an evaluation batch and this program's logits for it).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use cudarc::driver::CudaSlice;
use lora_kernels::cuda::nf4::Nf4Device;
use lora_kernels::cuda::Gpu;
use lora_kernels::peft::{Adapter, AdapterConfig, AdapterModule};
use lora_kernels::{
    bf16, cpu, cuda, lora, DoraGrads, DoraOutputs, DoraSaved, DoraWeights, Dropout, EmbedShape,
    LoraGrads, LoraOptions, LoraShape, Nf4Weight, Noise, QloraWeights, SeqLen,
};

type Res<T> = std::result::Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

#[derive(Clone, Debug)]
struct Args {
    dora: bool,
    steps: usize,
    lr: f32,
    loraplus_ratio: f32,
    rank: usize,
    alpha: f32,
    dropout: f32,
    neftune_alpha: f32,
    vocab: usize,
    dim: usize,
    hidden: usize,
    layers: usize,
    batch: usize,
    seq: usize,
    seed: u64,
    out: PathBuf,
}

const USAGE: &str = "usage: finetune [--dora] [--cpu] [--steps N] [--lr LR] [--loraplus-ratio R] \
[--rank R] [--alpha A] [--dropout P] [--neftune-alpha A] [--vocab V] [--dim D] [--hidden F] \
[--layers L] [--batch B] [--seq S] [--seed S] [--out DIR]";

fn parse_args(gpu: bool) -> Res<Args> {
    // Defaults: a GPU-sized model, or one that finishes in a few minutes on 2 cores.
    let mut a = Args {
        dora: false,
        steps: if gpu { 300 } else { 150 },
        lr: 5e-3,
        loraplus_ratio: 1.0,
        rank: 16,
        alpha: 32.0,
        dropout: 0.05,
        neftune_alpha: 5.0,
        vocab: if gpu { 256 } else { 64 },
        dim: if gpu { 512 } else { 128 },
        hidden: if gpu { 1024 } else { 256 },
        layers: 2,
        batch: if gpu { 32 } else { 8 },
        seq: if gpu { 128 } else { 32 },
        seed: 1,
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/finetune"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        macro_rules! num {
            ($field:ident) => {
                a.$field = value()?.parse().map_err(|e| format!("{flag}: {e}"))?
            };
        }
        match flag.as_str() {
            "--dora" => a.dora = true,
            // Read before the device is chosen (see `run`).
            "--cpu" => {}
            "--steps" => num!(steps),
            "--lr" => num!(lr),
            "--loraplus-ratio" => num!(loraplus_ratio),
            "--rank" => num!(rank),
            "--alpha" => num!(alpha),
            "--dropout" => num!(dropout),
            "--neftune-alpha" => num!(neftune_alpha),
            "--vocab" => num!(vocab),
            "--dim" => num!(dim),
            "--hidden" => num!(hidden),
            "--layers" => num!(layers),
            "--batch" => num!(batch),
            "--seq" => num!(seq),
            "--seed" => num!(seed),
            "--out" => a.out = PathBuf::from(value()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if a.vocab < 2 || a.dim == 0 || a.hidden == 0 || a.batch == 0 || a.seq < 2 || a.steps == 0 {
        return Err("vocab ≥ 2, seq ≥ 2 and every size ≥ 1 are needed".into());
    }
    if !(a.lr > 0.0 && a.loraplus_ratio > 0.0) {
        return Err("--lr and --loraplus-ratio must be positive".into());
    }
    Ok(a)
}

/// SplitMix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// AdamW state of one parameter tensor.
struct AdamW {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl AdamW {
    fn new(n: usize) -> Self {
        AdamW {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
    /// One AdamW step (β = 0.9, 0.999, ε = 1e-8, decoupled weight decay 0.01).
    fn step(&mut self, p: &mut [f32], g: &[f32], lr: f32, t: i32) {
        let (b1, b2, eps, wd) = (0.9f32, 0.999f32, 1e-8f32, 0.01f32);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for i in 0..p.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            p[i] -= lr * (self.m[i] / c1 / ((self.v[i] / c2).sqrt() + eps) + wd * p[i]);
        }
    }
}

enum Dev {
    Cpu,
    Gpu(Box<Gpu>),
}

/// What a layer's forward keeps for its backward.
#[allow(clippy::large_enum_variant)]
enum Saved {
    Cpu {
        x: Vec<f32>,
        h: Vec<f32>,
        norm: Vec<f32>,
    },
    Gpu {
        x: CudaSlice<bf16>,
        h: CudaSlice<bf16>,
        norm: CudaSlice<f32>,
        a: CudaSlice<bf16>,
        b: CudaSlice<bf16>,
        m: Option<CudaSlice<bf16>>,
    },
}

/// One frozen NF4 linear layer with its trainable adapter (f32 master weights).
struct Linear {
    name: String,
    n: usize,
    k: usize,
    rank: usize,
    scale: f32,
    /// Dropout stream of this layer (its own Philox key; the step is the offset).
    seed: u64,
    w: Nf4Weight,
    w_dev: Option<Nf4Device>,
    a: Vec<f32>,
    b: Vec<f32>,
    m: Option<Vec<f32>>,
    grads: [Vec<f32>; 3],
    opt: [AdamW; 3],
    saved: Option<(usize, Saved)>,
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}
fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

impl Linear {
    fn new(dev: &Dev, name: &str, n: usize, k: usize, args: &Args, rng: &mut Rng) -> Res<Self> {
        // Base weight like nn.Linear's init (U(±1/sqrt(K))), then frozen in NF4.
        let bound = 1.0 / (k as f32).sqrt();
        let wd: Vec<f32> = (0..n * k).map(|_| rng.sym() * bound).collect();
        let w = Nf4Weight::quantize(&wd, n, k, 64, true).map_err(err)?;
        // peft's init: A ~ kaiming-uniform(a = sqrt(5)) = U(±1/sqrt(K)), B = 0.
        let a: Vec<f32> = (0..args.rank * k).map(|_| rng.sym() * bound).collect();
        let b = vec![0.0f32; n * args.rank];
        let scale = lora::scale(args.alpha, args.rank);
        let shape = LoraShape::new(1, k, n, args.rank);
        let w_dev = match dev {
            Dev::Gpu(g) => Some(Nf4Device::upload(g, &w).map_err(err)?),
            Dev::Cpu => None,
        };
        // DoRA: m = ‖W + s·BA‖ = ‖deq(W)‖ per row at init, as peft.
        let m = if args.dora {
            let mut m = vec![0.0f32; n];
            match (dev, &w_dev) {
                (Dev::Gpu(g), Some(wq)) => {
                    let (ad, bd) = (
                        g.upload(&to_bf16(&a)).map_err(err)?,
                        g.upload(&to_bf16(&b)).map_err(err)?,
                    );
                    let mut md = g.zeros::<bf16>(n).map_err(err)?;
                    cuda::qdora::magnitude_init(g, &shape, scale, wq, &ad, &bd, &mut md)
                        .map_err(err)?;
                    m = to_f32(&g.download(&md).map_err(err)?);
                }
                _ => cpu::qdora::magnitude_init(&shape, scale, &w, &a, &b, &mut m).map_err(err)?,
            }
            Some(m)
        } else {
            None
        };
        let sizes = [a.len(), b.len(), m.as_ref().map_or(0, |m| m.len())];
        Ok(Linear {
            name: name.to_string(),
            n,
            k,
            rank: args.rank,
            scale,
            seed: rng.next(),
            w,
            w_dev,
            a,
            b,
            m,
            grads: sizes.map(|s| vec![0.0; s]),
            opt: sizes.map(AdamW::new),
            saved: None,
        })
    }

    fn opts(&self, dropout: f32, step: u64) -> LoraOptions {
        let o = LoraOptions::new(self.scale);
        if dropout > 0.0 {
            o.with_dropout(Dropout::new(dropout, self.seed, step))
        } else {
            o
        }
    }

    /// `y = layer(x)` for `t` tokens; keeps what backward needs when `train`.
    fn forward(
        &mut self,
        dev: &Dev,
        x: &[f32],
        t: usize,
        opts: &LoraOptions,
        train: bool,
    ) -> Res<Vec<f32>> {
        let shape = LoraShape::new(t, self.k, self.n, self.rank);
        match dev {
            Dev::Cpu => {
                let mut y = vec![0.0f32; t * self.n];
                let mut h = vec![0.0f32; shape.h_len()];
                let mut norm = vec![0.0f32; self.n];
                match &self.m {
                    None => {
                        let qw = QloraWeights {
                            w: &self.w,
                            a: &self.a[..],
                            b: &self.b[..],
                            bias: None,
                        };
                        cpu::qlora::forward(&shape, opts, x, qw, &mut y, Some(&mut h))
                            .map_err(err)?;
                    }
                    Some(m) => {
                        let dw = DoraWeights {
                            w: &self.w,
                            a: &self.a[..],
                            b: &self.b[..],
                            bias: None,
                            magnitude: &m[..],
                        };
                        let out = DoraOutputs {
                            y: &mut y[..],
                            h: Some(&mut h[..]),
                            norm: Some(&mut norm[..]),
                            z: None,
                        };
                        cpu::qdora::forward(&shape, opts, x, dw, out).map_err(err)?;
                    }
                }
                if train {
                    self.saved = Some((
                        t,
                        Saved::Cpu {
                            x: x.to_vec(),
                            h,
                            norm,
                        },
                    ));
                }
                Ok(y)
            }
            Dev::Gpu(g) => {
                let wq = self.w_dev.as_ref().expect("uploaded at construction");
                let up = |v: &[f32]| g.upload(&to_bf16(v)).map_err(err);
                let (xd, ad, bd) = (up(x)?, up(&self.a)?, up(&self.b)?);
                let md = self.m.as_ref().map(|m| up(m)).transpose()?;
                let mut y = g.zeros::<bf16>(t * self.n).map_err(err)?;
                let mut h = g.zeros::<bf16>(shape.h_len()).map_err(err)?;
                let mut norm = g.zeros::<f32>(self.n).map_err(err)?;
                match &md {
                    None => {
                        let qw = QloraWeights {
                            w: wq,
                            a: &ad,
                            b: &bd,
                            bias: None,
                        };
                        cuda::qlora::forward(g, &shape, opts, &xd, qw, &mut y, Some(&mut h))
                            .map_err(err)?;
                    }
                    Some(m) => {
                        let dw = DoraWeights {
                            w: wq,
                            a: &ad,
                            b: &bd,
                            bias: None,
                            magnitude: m,
                        };
                        let out = DoraOutputs {
                            y: &mut y,
                            h: Some(&mut h),
                            norm: Some(&mut norm),
                            z: None,
                        };
                        cuda::qdora::forward(g, &shape, opts, &xd, dw, out).map_err(err)?;
                    }
                }
                let yh = to_f32(&g.download(&y).map_err(err)?);
                if train {
                    self.saved = Some((
                        t,
                        Saved::Gpu {
                            x: xd,
                            h,
                            norm,
                            a: ad,
                            b: bd,
                            m: md,
                        },
                    ));
                }
                Ok(yh)
            }
        }
    }

    /// dX from dY; the adapter's gradients into `self.grads`.
    fn backward(&mut self, dev: &Dev, dy: &[f32], opts: &LoraOptions) -> Res<Vec<f32>> {
        let (t, saved) = self.saved.take().ok_or("backward before forward")?;
        let shape = LoraShape::new(t, self.k, self.n, self.rank);
        let [ga, gb, gm] = &mut self.grads;
        match (dev, saved) {
            (Dev::Cpu, Saved::Cpu { x, h, norm }) => {
                let mut dx = vec![0.0f32; shape.x_len()];
                match &self.m {
                    None => {
                        let qw = QloraWeights {
                            w: &self.w,
                            a: &self.a[..],
                            b: &self.b[..],
                            bias: None,
                        };
                        let grads = LoraGrads {
                            dx: &mut dx[..],
                            da: &mut ga[..],
                            db: &mut gb[..],
                        };
                        cpu::qlora::backward(&shape, opts, &x, qw, &h, dy, grads).map_err(err)?;
                    }
                    Some(m) => {
                        let dw = DoraWeights {
                            w: &self.w,
                            a: &self.a[..],
                            b: &self.b[..],
                            bias: None,
                            magnitude: &m[..],
                        };
                        let saved = DoraSaved {
                            h: &h[..],
                            norm: &norm[..],
                            z: None,
                        };
                        let grads = DoraGrads {
                            dx: &mut dx[..],
                            da: &mut ga[..],
                            db: &mut gb[..],
                            dm: &mut gm[..],
                        };
                        cpu::qdora::backward(&shape, opts, &x, dw, saved, dy, grads)
                            .map_err(err)?;
                    }
                }
                Ok(dx)
            }
            (
                Dev::Gpu(g),
                Saved::Gpu {
                    x,
                    h,
                    norm,
                    a,
                    b,
                    m,
                },
            ) => {
                let wq = self.w_dev.as_ref().expect("uploaded at construction");
                let dyd = g.upload(&to_bf16(dy)).map_err(err)?;
                let z = |l: usize| g.zeros::<bf16>(l).map_err(err);
                let (mut dx, mut da, mut db) =
                    (z(shape.x_len())?, z(shape.a_len())?, z(shape.b_len())?);
                match &m {
                    None => {
                        let qw = QloraWeights {
                            w: wq,
                            a: &a,
                            b: &b,
                            bias: None,
                        };
                        let grads = LoraGrads {
                            dx: &mut dx,
                            da: &mut da,
                            db: &mut db,
                        };
                        cuda::qlora::backward(g, &shape, opts, &x, qw, &h, &dyd, grads)
                            .map_err(err)?;
                    }
                    Some(m) => {
                        let mut dm = z(self.n)?;
                        let dw = DoraWeights {
                            w: wq,
                            a: &a,
                            b: &b,
                            bias: None,
                            magnitude: m,
                        };
                        let saved = DoraSaved {
                            h: &h,
                            norm: &norm,
                            z: None,
                        };
                        let grads = DoraGrads {
                            dx: &mut dx,
                            da: &mut da,
                            db: &mut db,
                            dm: &mut dm,
                        };
                        cuda::qdora::backward(g, &shape, opts, &x, dw, saved, &dyd, grads)
                            .map_err(err)?;
                        *gm = to_f32(&g.download(&dm).map_err(err)?);
                    }
                }
                *ga = to_f32(&g.download(&da).map_err(err)?);
                *gb = to_f32(&g.download(&db).map_err(err)?);
                Ok(to_f32(&g.download(&dx).map_err(err)?))
            }
            _ => Err("saved state from another device".into()),
        }
    }

    /// AdamW on A, B (LoRA+: B's rate times `ratio`) and m.
    fn update(&mut self, lr: f32, ratio: f32, t: i32) {
        let [ga, gb, gm] = &self.grads;
        let [oa, ob, om] = &mut self.opt;
        oa.step(&mut self.a, ga, lr, t);
        ob.step(&mut self.b, gb, lr * ratio, t);
        if let Some(m) = &mut self.m {
            om.step(m, gm, lr, t);
        }
    }

    fn adapter_module(&self) -> AdapterModule<f32> {
        AdapterModule {
            name: self.name.clone(),
            rank: self.rank,
            in_features: self.k,
            out_features: self.n,
            scale: self.scale,
            a: self.a.clone(),
            b: self.b.clone(),
            magnitude: self.m.clone(),
        }
    }
}

/// Row-wise RMS norm: returns (y, 1/rms per row).
fn rmsnorm(x: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0.0f32; x.len()];
    let mut inv = Vec::with_capacity(x.len() / d);
    for (xr, yr) in x.chunks(d).zip(y.chunks_mut(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ms + 1e-6).sqrt();
        yr.iter_mut().zip(xr).for_each(|(o, v)| *o = v * r);
        inv.push(r);
    }
    (y, inv)
}

/// dx of the RMS norm from dy, its output y and 1/rms.
fn rmsnorm_back(dy: &[f32], y: &[f32], inv: &[f32], d: usize) -> Vec<f32> {
    let mut dx = vec![0.0f32; dy.len()];
    for (i, ((dyr, yr), dxr)) in dy
        .chunks(d)
        .zip(y.chunks(d))
        .zip(dx.chunks_mut(d))
        .enumerate()
    {
        let dot = dyr.iter().zip(yr).map(|(a, b)| a * b).sum::<f32>() / d as f32;
        for j in 0..d {
            dxr[j] = (dyr[j] - yr[j] * dot) * inv[i];
        }
    }
    dx
}

/// `x + causal_mean(x)` per sequence: position t gets the mean of positions 0..=t.
fn mix(x: &[f32], batch: usize, seq: usize, d: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    let mut acc = vec![0.0f32; d];
    for b in 0..batch {
        acc.iter_mut().for_each(|v| *v = 0.0);
        for t in 0..seq {
            let row = (b * seq + t) * d;
            for j in 0..d {
                acc[j] += x[row + j];
                out[row + j] += acc[j] / (t + 1) as f32;
            }
        }
    }
    out
}

/// The gradient of [`mix`]: `dx_s = da_s + Σ_{t ≥ s} da_t / (t + 1)`.
fn mix_back(da: &[f32], batch: usize, seq: usize, d: usize) -> Vec<f32> {
    let mut dx = da.to_vec();
    let mut acc = vec![0.0f32; d];
    for b in 0..batch {
        acc.iter_mut().for_each(|v| *v = 0.0);
        for t in (0..seq).rev() {
            let row = (b * seq + t) * d;
            for j in 0..d {
                acc[j] += da[row + j] / (t + 1) as f32;
                dx[row + j] += acc[j];
            }
        }
    }
    dx
}

/// Mean cross-entropy of the next token and its gradient on the logits (the last
/// position of each sequence has no target).
fn cross_entropy(
    logits: &[f32],
    ids: &[u32],
    batch: usize,
    seq: usize,
    v: usize,
) -> (f32, Vec<f32>) {
    let count = (batch * (seq - 1)) as f32;
    let mut grad = vec![0.0f32; logits.len()];
    let mut loss = 0.0f64;
    for b in 0..batch {
        for t in 0..seq - 1 {
            let p = b * seq + t;
            let row = &logits[p * v..(p + 1) * v];
            let target = ids[p + 1] as usize;
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|l| (l - max).exp()).sum();
            loss += (sum.ln() + max - row[target]) as f64;
            for j in 0..v {
                grad[p * v + j] = (row[j] - max).exp() / sum / count;
            }
            grad[p * v + target] -= 1.0 / count;
        }
    }
    ((loss / count as f64) as f32, grad)
}

struct Model {
    args: Args,
    embed: Vec<f32>,
    embed_dev: Option<CudaSlice<bf16>>,
    blocks: Vec<(Linear, Linear)>,
    head: Linear,
}

/// Activations a training step keeps on the host for backward.
struct Tape {
    /// Per block: the RMS norm's output and 1/rms, and the up projection's output.
    blocks: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)>,
    final_norm: (Vec<f32>, Vec<f32>),
}

impl Model {
    fn new(dev: &Dev, args: &Args) -> Res<Self> {
        let mut rng = Rng(args.seed ^ 0x5EED);
        let embed: Vec<f32> = (0..args.vocab * args.dim).map(|_| rng.sym()).collect();
        let embed_dev = match dev {
            Dev::Gpu(g) => Some(g.upload(&to_bf16(&embed)).map_err(err)?),
            Dev::Cpu => None,
        };
        let mut blocks = Vec::new();
        for i in 0..args.layers {
            let up = Linear::new(
                dev,
                &format!("layers.{i}.up"),
                args.hidden,
                args.dim,
                args,
                &mut rng,
            )?;
            let down = Linear::new(
                dev,
                &format!("layers.{i}.down"),
                args.dim,
                args.hidden,
                args,
                &mut rng,
            )?;
            blocks.push((up, down));
        }
        let head = Linear::new(dev, "head", args.vocab, args.dim, args, &mut rng)?;
        Ok(Model {
            args: args.clone(),
            embed,
            embed_dev,
            blocks,
            head,
        })
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.blocks
            .iter_mut()
            .flat_map(|(u, d)| [u, d])
            .chain(std::iter::once(&mut self.head))
    }

    /// The embeddings of `ids` (with NEFTune noise for training step `step`, if given).
    fn embed(
        &self,
        dev: &Dev,
        ids: &[u32],
        batch: usize,
        noise_step: Option<u64>,
    ) -> Res<Vec<f32>> {
        let a = &self.args;
        let shape = EmbedShape::new(batch, a.seq, a.vocab, a.dim);
        let noise = Noise::new(
            if noise_step.is_some() {
                a.neftune_alpha
            } else {
                0.0
            },
            a.seed,
            noise_step.unwrap_or(0),
        );
        match (dev, &self.embed_dev) {
            (Dev::Gpu(g), Some(table)) => {
                let idd = g.stream().clone_htod(ids).map_err(err)?;
                let mut out = g.zeros::<bf16>(shape.out_len()).map_err(err)?;
                cuda::neftune::embed(
                    g,
                    &shape,
                    table,
                    &idd,
                    &noise,
                    SeqLen::<CudaSlice<u32>>::Padded,
                    &mut out,
                )
                .map_err(err)?;
                Ok(to_f32(&g.download(&out).map_err(err)?))
            }
            _ => {
                let mut out = vec![0.0f32; shape.out_len()];
                cpu::neftune::embed(
                    &shape,
                    &self.embed,
                    ids,
                    &noise,
                    SeqLen::<[u32]>::Padded,
                    &mut out,
                )
                .map_err(err)?;
                Ok(out)
            }
        }
    }

    /// Logits [batch·seq, V]; with `step`, a training forward (dropout, NEFTune, tape).
    fn forward(
        &mut self,
        dev: &Dev,
        ids: &[u32],
        batch: usize,
        step: Option<u64>,
    ) -> Res<(Vec<f32>, Tape)> {
        let (d, seq, p) = (self.args.dim, self.args.seq, self.args.dropout);
        let t = batch * seq;
        let train = step.is_some();
        let mut x = self.embed(dev, ids, batch, step)?;
        let mut tape = Tape {
            blocks: Vec::new(),
            final_norm: (Vec::new(), Vec::new()),
        };
        for (up, down) in &mut self.blocks {
            let a = mix(&x, batch, seq, d);
            let (hn, inv) = rmsnorm(&a, d);
            let o_up = up.opts(if train { p } else { 0.0 }, step.unwrap_or(0));
            let u = up.forward(dev, &hn, t, &o_up, train)?;
            let g: Vec<f32> = u.iter().map(|v| v.max(0.0)).collect();
            let o_down = down.opts(if train { p } else { 0.0 }, step.unwrap_or(0));
            let o = down.forward(dev, &g, t, &o_down, train)?;
            x = a.iter().zip(&o).map(|(a, o)| a + o).collect();
            tape.blocks.push((hn, inv, u));
        }
        let (hf, inv) = rmsnorm(&x, d);
        let o_head = self
            .head
            .opts(if train { p } else { 0.0 }, step.unwrap_or(0));
        let logits = self.head.forward(dev, &hf, t, &o_head, train)?;
        tape.final_norm = (hf, inv);
        Ok((logits, tape))
    }

    fn backward(
        &mut self,
        dev: &Dev,
        dlogits: &[f32],
        tape: Tape,
        batch: usize,
        step: u64,
    ) -> Res<()> {
        let (d, seq, p) = (self.args.dim, self.args.seq, self.args.dropout);
        let o_head = self.head.opts(p, step);
        let dhf = self.head.backward(dev, dlogits, &o_head)?;
        let (hf, inv) = &tape.final_norm;
        let mut dx = rmsnorm_back(&dhf, hf, inv, d);
        for ((up, down), (hn, inv, u)) in self.blocks.iter_mut().zip(tape.blocks).rev() {
            // x = a + down(relu(up(rmsnorm(a)))), a = mix(x_in).
            let o_down = down.opts(p, step);
            let dg = down.backward(dev, &dx, &o_down)?;
            let du: Vec<f32> = dg
                .iter()
                .zip(&u)
                .map(|(g, u)| if *u > 0.0 { *g } else { 0.0 })
                .collect();
            let o_up = up.opts(p, step);
            let dhn = up.backward(dev, &du, &o_up)?;
            let da: Vec<f32> = dx
                .iter()
                .zip(rmsnorm_back(&dhn, &hn, &inv, d))
                .map(|(a, b)| a + b)
                .collect();
            dx = mix_back(&da, batch, seq, d);
        }
        Ok(())
    }

    fn adapter(&self) -> Adapter<f32> {
        let a = &self.args;
        let mut config = AdapterConfig::lora(a.rank, a.alpha, &["up", "down", "head"]);
        config.use_dora = a.dora;
        config.lora_dropout = a.dropout;
        let mut modules: Vec<AdapterModule<f32>> = self
            .blocks
            .iter()
            .flat_map(|(u, d)| [u.adapter_module(), d.adapter_module()])
            .chain(std::iter::once(self.head.adapter_module()))
            .collect();
        modules.sort_by(|x, y| x.name.cmp(&y.name));
        Adapter { config, modules }
    }
}

/// A batch of sequences that follow `perm` from random starts.
fn batch_ids(perm: &[u32], batch: usize, seq: usize, rng: &mut Rng) -> Vec<u32> {
    let mut ids = Vec::with_capacity(batch * seq);
    for _ in 0..batch {
        let mut cur = rng.below(perm.len()) as u32;
        for _ in 0..seq {
            ids.push(cur);
            cur = perm[cur as usize];
        }
    }
    ids
}

fn progress(step: usize, total: usize, loss: f32, tok_s: f64) {
    let width = 30;
    let filled = step * width / total;
    eprint!(
        "\r[{}{}] {step:>5}/{total} loss {loss:7.4} | {:>8.0} tok/s ",
        "#".repeat(filled),
        "-".repeat(width - filled),
        tok_s
    );
    let _ = std::io::stderr().flush();
}

/// safetensors with f32 and u32 tensors and a JSON metadata entry.
fn write_tensors(
    path: &std::path::Path,
    tensors: &[(&str, Vec<usize>, Vec<u8>, safetensors::Dtype)],
    meta: serde_json::Value,
) -> Res<()> {
    use safetensors::tensor::TensorView;
    let views = tensors
        .iter()
        .map(|(k, s, d, t)| TensorView::new(*t, s.clone(), d).map(|v| (k.to_string(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(err)?;
    let meta = Some([("meta".to_string(), meta.to_string())].into());
    let bytes = safetensors::serialize(views, meta).map_err(err)?;
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn run() -> Res<()> {
    let force_cpu = std::env::args().any(|a| a == "--cpu");
    let gpu = if force_cpu {
        None
    } else {
        match Gpu::new(0) {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!(
                    "no GPU ({e}): running on the CPU oracle (f32) with the smaller default size"
                );
                None
            }
        }
    };
    let args = parse_args(gpu.is_some())?;
    let dev = match gpu {
        Some(g) => {
            let (ma, mi) = g.compute_capability();
            println!("device: {} (sm_{ma}{mi}), bf16 kernels", g.name());
            Dev::Gpu(Box::new(g))
        }
        None => {
            println!("device: CPU oracle (f32)");
            Dev::Cpu
        }
    };
    let a = args.clone();
    println!(
        "model: vocab {} · dim {} · hidden {} · {} layers, NF4 base (bs 64, double-quantized); {} r={} alpha={} dropout={} LoRA+ ratio {}; NEFTune alpha {}; batch {}×{} tokens, {} steps, lr {}",
        a.vocab, a.dim, a.hidden, a.layers, if a.dora { "DoRA" } else { "LoRA" }, a.rank, a.alpha, a.dropout,
        a.loraplus_ratio, a.neftune_alpha, a.batch, a.seq, a.steps, a.lr
    );
    let mut model = Model::new(&dev, &args)?;
    let mut rng = Rng(args.seed);
    // The task: a random permutation of the vocabulary.
    let mut perm: Vec<u32> = (0..args.vocab as u32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.below(i + 1));
    }
    let mut eval_rng = Rng(args.seed ^ 0xE7A1);
    let eval_batch = args.batch.min(8);
    let eval_ids = batch_ids(&perm, eval_batch, args.seq, &mut eval_rng);
    let eval = |model: &mut Model| -> Res<f32> {
        let (logits, _) = model.forward(&dev, &eval_ids, eval_batch, None)?;
        Ok(cross_entropy(&logits, &eval_ids, eval_batch, args.seq, args.vocab).0)
    };
    let loss0 = eval(&mut model)?;
    println!(
        "eval loss before: {loss0:.4} (ln V = {:.4})",
        (args.vocab as f32).ln()
    );

    let tokens = (args.batch * args.seq) as f64;
    let start = Instant::now();
    let log_every = (args.steps / 10).max(1);
    let mut ema = None;
    for step in 1..=args.steps {
        let ids = batch_ids(&perm, args.batch, args.seq, &mut rng);
        let (logits, tape) = model.forward(&dev, &ids, args.batch, Some(step as u64))?;
        let (loss, dlogits) = cross_entropy(&logits, &ids, args.batch, args.seq, args.vocab);
        if !loss.is_finite() {
            return Err(format!("the loss is {loss} at step {step}"));
        }
        model.backward(&dev, &dlogits, tape, args.batch, step as u64)?;
        for l in model.linears_mut() {
            l.update(args.lr, args.loraplus_ratio, step as i32);
        }
        let e = ema.map_or(loss, |m: f32| 0.9 * m + 0.1 * loss);
        ema = Some(e);
        let tok_s = step as f64 * tokens / start.elapsed().as_secs_f64();
        progress(step, args.steps, e, tok_s);
        if step % log_every == 0 {
            eprintln!();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let loss1 = eval(&mut model)?;
    println!(
        "eval loss after: {loss1:.4} (before {loss0:.4}); {:.1} s, {:.0} tokens/s",
        secs,
        args.steps as f64 * tokens / secs
    );

    // The adapter in peft's format, the frozen base for the peft check, and an eval batch
    // with its logits from the CPU oracle in f32 (the reference the check compares).
    let adapter = model.adapter();
    let adir = args.out.join("adapter");
    adapter.save_dir(&adir).map_err(err)?;
    let mut base: Vec<(String, Vec<usize>, Vec<u8>)> = vec![(
        "embed".into(),
        vec![args.vocab, args.dim],
        f32_bytes(&model.embed),
    )];
    for l in model.linears_mut() {
        base.push((
            format!("{}.weight", l.name),
            vec![l.n, l.k],
            f32_bytes(&l.w.dequantize::<f32>().map_err(err)?),
        ));
    }
    let meta = serde_json::json!({
        "vocab": args.vocab, "dim": args.dim, "hidden": args.hidden, "layers": args.layers,
        "seq": args.seq, "rms_eps": 1e-6, "dora": args.dora,
    });
    let base_refs: Vec<_> = base
        .iter()
        .map(|(k, s, d)| (k.as_str(), s.clone(), d.clone(), safetensors::Dtype::F32))
        .collect();
    write_tensors(&args.out.join("base_model.safetensors"), &base_refs, meta)?;
    let mut cpu_model = Model {
        args: args.clone(),
        embed: model.embed.clone(),
        embed_dev: None,
        blocks: (model.blocks.iter())
            .map(|(u, d)| (clone_linear(u), clone_linear(d)))
            .collect(),
        head: clone_linear(&model.head),
    };
    let (logits, _) = cpu_model.forward(&Dev::Cpu, &eval_ids, eval_batch, None)?;
    let ref_loss = cross_entropy(&logits, &eval_ids, eval_batch, args.seq, args.vocab).0;
    let ids_bytes: Vec<u8> = eval_ids.iter().flat_map(|x| x.to_le_bytes()).collect();
    write_tensors(
        &args.out.join("eval.safetensors"),
        &[
            (
                "ids",
                vec![eval_batch, args.seq],
                ids_bytes,
                safetensors::Dtype::U32,
            ),
            (
                "logits",
                vec![eval_batch * args.seq, args.vocab],
                f32_bytes(&logits),
                safetensors::Dtype::F32,
            ),
        ],
        serde_json::json!({ "loss": ref_loss, "batch": eval_batch }),
    )?;
    println!(
        "wrote {} (peft adapter), base_model.safetensors and eval.safetensors",
        adir.display()
    );
    // (NaN fails this test too.)
    if !loss0.is_finite() || loss1.is_nan() || loss1 >= 0.7 * loss0 {
        return Err(format!(
            "the loss did not fall clearly: {loss0:.4} -> {loss1:.4}"
        ));
    }
    Ok(())
}

/// The same layer on the CPU (host copies of the frozen and trained weights).
fn clone_linear(l: &Linear) -> Linear {
    Linear {
        name: l.name.clone(),
        n: l.n,
        k: l.k,
        rank: l.rank,
        scale: l.scale,
        seed: l.seed,
        w: l.w.clone(),
        w_dev: None,
        a: l.a.clone(),
        b: l.b.clone(),
        m: l.m.clone(),
        grads: [Vec::new(), Vec::new(), Vec::new()],
        opt: [AdamW::new(0), AdamW::new(0), AdamW::new(0)],
        saved: None,
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("\nfinetune: {e}");
        std::process::exit(1);
    }
}
