//! The main example: an end-to-end QLoRA / QDoRA fine-tune of a small transformer-like
//! model with the crate's kernels, ending in a peft adapter.
//!
//! ```text
//! cargo run --release --example finetune -- [--dora] [--cpu] [--steps N] [--lr LR]
//!     [--loraplus-ratio R] [--rank R] [--alpha A] [--dropout P] [--neftune-alpha A]
//!     [--vocab V] [--dim D] [--hidden F] [--layers L] [--batch B] [--seq S]
//!     [--seed S] [--out DIR]
//! ```
//! (`--help` gives each option's meaning, range and default). Every argument is checked
//! before any work: ranges by the parser, the sizes against an estimate of the memory
//! they need (refused above 16 GiB), and `--out` by writing a probe file there.
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

use std::path::PathBuf;
use std::time::Instant;

use clap::builder::RangedU64ValueParser;
use clap::Parser;
use cudarc::driver::CudaSlice;
use indicatif::{ProgressBar, ProgressStyle};
use lora_kernels::cuda::nf4::Nf4Device;
use lora_kernels::cuda::Gpu;
use lora_kernels::loraplus::{LoraPlus, Role};
use lora_kernels::peft::{Adapter, AdapterConfig, AdapterModule};
use lora_kernels::{
    bf16, cpu, cuda, lora, DoraGrads, DoraOutputs, DoraSaved, DoraWeights, Dropout, EmbedShape,
    LoraGrads, LoraOptions, LoraShape, Nf4Weight, Noise, QloraWeights, SeqLen,
};

type Res<T> = std::result::Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The options as given (clap); the sizes left out get the device's default in
/// [`Cli::resolve`].
#[derive(Parser, Debug)]
#[command(
    name = "finetune",
    about = "An end-to-end QLoRA / QDoRA fine-tune of a small model with the crate's kernels, ending in a peft adapter",
    after_help = AFTER_HELP,
    // As the hand-written parser did: a repeated option takes its last value, and a
    // negative number is a value (so that its range check names it).
    args_override_self = true,
    allow_negative_numbers = true
)]
struct Cli {
    /// Train a DoRA adapter (QDoRA over the NF4 base) instead of LoRA
    #[arg(long)]
    dora: bool,
    /// Run on the CPU oracle (f32) even when a GPU is present
    #[arg(long)]
    cpu: bool,
    /// Training steps, 1..=10^9 [default: 300 on a GPU, 150 on the CPU]
    #[arg(long, value_name = "N", value_parser = RangedU64ValueParser::<usize>::new().range(1..=1_000_000_000))]
    steps: Option<usize>,
    /// AdamW learning rate (finite, > 0)
    #[arg(long, value_name = "LR", default_value_t = 5e-3, value_parser = positive_f32)]
    lr: f32,
    /// LoRA+: B's learning rate is this times A's (finite, > 0; 1 = plain LoRA)
    #[arg(long, value_name = "R", default_value_t = 1.0, value_parser = positive_f32)]
    loraplus_ratio: f32,
    /// Adapter rank, 1..=256
    #[arg(long, value_name = "R", default_value_t = 16, value_parser = RangedU64ValueParser::<usize>::new().range(1..=lora::MAX_RANK as u64))]
    rank: usize,
    /// LoRA alpha: the scale is alpha / rank (finite, > 0)
    #[arg(long, value_name = "A", default_value_t = 32.0, value_parser = positive_f32)]
    alpha: f32,
    /// Dropout probability on the adapters' input, in [0, 1)
    #[arg(long, value_name = "P", default_value_t = 0.05, value_parser = probability)]
    dropout: f32,
    /// NEFTune noise alpha on the embeddings while training (finite, >= 0; 0 = off)
    #[arg(long, value_name = "A", default_value_t = 5.0, value_parser = non_negative_f32)]
    neftune_alpha: f32,
    /// Vocabulary size, 2..=2^24 [default: 256 on a GPU, 64 on the CPU]
    #[arg(long, value_name = "V", value_parser = RangedU64ValueParser::<usize>::new().range(2..=1 << 24))]
    vocab: Option<usize>,
    /// Model width, 1..=2^20 [default: 512 on a GPU, 128 on the CPU]
    #[arg(long, value_name = "D", value_parser = RangedU64ValueParser::<usize>::new().range(1..=1 << 20))]
    dim: Option<usize>,
    /// Hidden width of each layer's up/down pair, 1..=2^20 [default: 1024 on a GPU, 256 on the CPU]
    #[arg(long, value_name = "F", value_parser = RangedU64ValueParser::<usize>::new().range(1..=1 << 20))]
    hidden: Option<usize>,
    /// Number of layers, 0..=256
    #[arg(long, value_name = "L", default_value_t = 2, value_parser = RangedU64ValueParser::<usize>::new().range(0..=256))]
    layers: usize,
    /// Sequences per step, 1..=2^24 [default: 32 on a GPU, 8 on the CPU]
    #[arg(long, value_name = "B", value_parser = RangedU64ValueParser::<usize>::new().range(1..=1 << 24))]
    batch: Option<usize>,
    /// Tokens per sequence, 2..=2^24 [default: 128 on a GPU, 32 on the CPU]
    #[arg(long, value_name = "S", value_parser = RangedU64ValueParser::<usize>::new().range(2..=1 << 24))]
    seq: Option<usize>,
    /// Seed of the weights, the task and the noise
    #[arg(long, value_name = "S", default_value_t = 1)]
    seed: u64,
    /// Output folder (created; checked writable before training)
    #[arg(long, value_name = "DIR", default_value_os_t = default_out())]
    out: PathBuf,
}

const AFTER_HELP: &str = "\
Before any work the sizes are checked against a memory estimate (the f32 weights and \
their copies, the adapters with their AdamW state and one training step's activations, \
with the CPU oracle's f64 temporaries): above 16 GiB the run is refused. The output \
folder is created and a probe file written to it and removed before training.";

/// The largest estimated peak memory a run may need.
const MEMORY_LIMIT: u64 = 16 << 30;

fn default_out() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/finetune")
}

fn parse_f32(s: &str) -> Res<f32> {
    let v: f32 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{s} is not finite"))
    }
}

fn positive_f32(s: &str) -> Res<f32> {
    let v = parse_f32(s)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err(format!("{s} is not > 0"))
    }
}

fn non_negative_f32(s: &str) -> Res<f32> {
    let v = parse_f32(s)?;
    if v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("{s} is negative"))
    }
}

fn probability(s: &str) -> Res<f32> {
    let v = parse_f32(s)?;
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} is not in [0, 1)"))
    }
}

/// The run's settings, every size resolved.
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

impl Cli {
    /// The settings, with the defaults of a GPU-sized model or of one that finishes in a
    /// few seconds on 2 cores, checked against [`MEMORY_LIMIT`].
    fn resolve(&self, gpu: bool) -> Res<Args> {
        let pick = |v: Option<usize>, on_gpu: usize, on_cpu: usize| {
            v.unwrap_or(if gpu { on_gpu } else { on_cpu })
        };
        let a = Args {
            dora: self.dora,
            steps: pick(self.steps, 300, 150),
            lr: self.lr,
            loraplus_ratio: self.loraplus_ratio,
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            neftune_alpha: self.neftune_alpha,
            vocab: pick(self.vocab, 256, 64),
            dim: pick(self.dim, 512, 128),
            hidden: pick(self.hidden, 1024, 256),
            layers: self.layers,
            batch: pick(self.batch, 32, 8),
            seq: pick(self.seq, 128, 32),
            seed: self.seed,
            out: self.out.clone(),
        };
        match a.memory_estimate() {
            Some(bytes) if bytes <= MEMORY_LIMIT => Ok(a),
            est => Err(format!(
                "the model is too large: about {} needed (vocab {}, dim {}, hidden {}, {} layers, \
                 rank {}, batch {} × seq {}); the limit is {} GiB",
                est.map_or("more than 2^64 bytes".into(), |b| format!(
                    "{:.1} GiB",
                    b as f64 / (1u64 << 30) as f64
                )),
                a.vocab,
                a.dim,
                a.hidden,
                a.layers,
                a.rank,
                a.batch,
                a.seq,
                MEMORY_LIMIT >> 30
            )),
        }
    }
}

impl Args {
    /// An upper estimate of the run's peak memory in bytes (`None`: it overflows u64).
    /// Elements are counted with checked arithmetic: the frozen weights (f32 at
    /// construction, NF4, and the three f32 copies written into base_model.safetensors),
    /// the adapters (parameters, gradients, AdamW's two moments and the saved copies),
    /// and one training step's activations (logits and their gradient, each layer's
    /// saved inputs and outputs, and the CPU oracle's f64 copies of one layer's operands).
    fn memory_estimate(&self) -> Option<u64> {
        let u = |v: usize| v as u64;
        let (v, d, h, l, r) = (
            u(self.vocab),
            u(self.dim),
            u(self.hidden),
            u(self.layers),
            u(self.rank),
        );
        let t = u(self.batch).checked_mul(u(self.seq))?;
        // Every linear layer as (n, k): per layer up [H, D] and down [D, H]; head [V, D].
        let hd = h.checked_mul(d)?;
        let vd = v.checked_mul(d)?;
        let w_sum = l.checked_mul(hd)?.checked_mul(2)?.checked_add(vd)?;
        let w_max = hd.max(vd);
        // Adapter elements: A [r, k], B [n, r], m [n].
        let per_pair = r.checked_mul(d.checked_add(h)?)?.checked_mul(2)?;
        let pairs = l.checked_mul(per_pair.checked_add(d)?.checked_add(h)?)?;
        let head = r.checked_mul(d.checked_add(v)?)?.checked_add(v)?;
        let adapter = pairs.checked_add(head)?;
        // Per token: logits, their gradient and f64 copies; per layer the saved
        // activations; the widest layer's f64 temporaries.
        let widest = d.max(h).max(v);
        let per_layer = d
            .checked_mul(24)?
            .checked_add(h.checked_mul(16)?)?
            .checked_add(r.checked_mul(8)?)?;
        let per_token = v
            .checked_mul(28)?
            .checked_add(l.checked_mul(per_layer)?)?
            .checked_add(widest.checked_mul(24)?)?
            .checked_add(d.checked_mul(16)?)?;
        let weights = vd
            .checked_mul(4)?
            .checked_add(w_sum.checked_mul(14)?)?
            .checked_add(w_max.checked_mul(16)?)?;
        weights
            .checked_add(adapter.checked_mul(28)?)?
            .checked_add(t.checked_mul(per_token)?)
    }
}

/// Creates `dir` and checks that a file can be written there (written, then removed).
fn check_writable(dir: &std::path::Path) -> Res<()> {
    let fail = |e: std::io::Error| format!("--out {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(format!(".finetune-probe-{}", std::process::id()));
    std::fs::write(&probe, b"probe").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)
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

    /// AdamW on A, B and m at LoRA+'s rates (`lora_kernels::loraplus`: B and m at
    /// `ratio` times A's, as peft's LoRA+ optimizer).
    fn update(&mut self, rates: &LoraPlus, t: i32) {
        let [ga, gb, gm] = &self.grads;
        let [oa, ob, om] = &mut self.opt;
        oa.step(&mut self.a, ga, rates.lr(Role::A), t);
        ob.step(&mut self.b, gb, rates.lr(Role::B), t);
        if let Some(m) = &mut self.m {
            om.step(m, gm, rates.lr(Role::Magnitude), t);
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

fn run(cli: Cli) -> Res<()> {
    let gpu = if cli.cpu {
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
    let args = cli.resolve(gpu.is_some())?;
    check_writable(&args.out)?;
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
        "model: vocab {} · dim {} · hidden {} · {} layers, NF4 base (bs 64, double-quantized); {} r={} alpha={} dropout={} LoRA+ ratio {}; NEFTune alpha {}; batch {}×{} tokens, {} steps, lr {}; memory estimate {:.0} MiB",
        a.vocab, a.dim, a.hidden, a.layers, if a.dora { "DoRA" } else { "LoRA" }, a.rank, a.alpha, a.dropout,
        a.loraplus_ratio, a.neftune_alpha, a.batch, a.seq, a.steps, a.lr,
        a.memory_estimate().unwrap_or(u64::MAX) as f64 / (1u64 << 20) as f64
    );
    let mut model = Model::new(&dev, &args)?;
    let rates = LoraPlus::new(args.lr, args.loraplus_ratio).map_err(|e| e.to_string())?;
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
    let bar = ProgressBar::new(args.steps as u64).with_style(
        ProgressStyle::with_template("[{bar:30}] {pos:>5}/{len} {msg} [{elapsed_precise}]")
            .map_err(err)?
            .progress_chars("#>-"),
    );
    let mut ema = None;
    for step in 1..=args.steps {
        let ids = batch_ids(&perm, args.batch, args.seq, &mut rng);
        let (logits, tape) = model.forward(&dev, &ids, args.batch, Some(step as u64))?;
        let (loss, dlogits) = cross_entropy(&logits, &ids, args.batch, args.seq, args.vocab);
        if !loss.is_finite() {
            bar.abandon();
            return Err(format!("the loss is {loss} at step {step}"));
        }
        model.backward(&dev, &dlogits, tape, args.batch, step as u64)?;
        for l in model.linears_mut() {
            l.update(&rates, step as i32);
        }
        let e = ema.map_or(loss, |m: f32| 0.9 * m + 0.1 * loss);
        ema = Some(e);
        let tok_s = step as f64 * tokens / start.elapsed().as_secs_f64();
        let msg = format!("loss {e:7.4} | {tok_s:>8.0} tok/s");
        bar.set_position(step as u64);
        // A log line every tenth of the run, also where the bar is hidden (no terminal).
        if step % log_every == 0 {
            let line = format!("{step:>5}/{} {msg}", args.steps);
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        }
        bar.set_message(msg);
    }
    bar.finish_and_clear();
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
    // Bad arguments: clap prints what is wrong and exits with status 2.
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("\nfinetune: {e}");
        std::process::exit(1);
    }
}

// Run by `cargo test` (Cargo.toml sets `test = true` for this example).
#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("finetune").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_fit_the_memory_limit() {
        for gpu in [false, true] {
            for dora in [&[][..], &["--dora"][..]] {
                let a = parse(dora).unwrap().resolve(gpu).unwrap();
                assert!(a.memory_estimate().unwrap() < 1 << 30, "{a:?}");
            }
        }
        let a = parse(&[]).unwrap().resolve(false).unwrap();
        assert_eq!(
            (a.steps, a.vocab, a.dim, a.hidden, a.batch, a.seq),
            (150, 64, 128, 256, 8, 32)
        );
        assert_eq!(
            (a.rank, a.layers, a.seed, a.out.clone()),
            (16, 2, 1, default_out())
        );
        assert_eq!(
            (a.lr, a.alpha, a.dropout, a.neftune_alpha, a.loraplus_ratio),
            (5e-3, 32.0, 0.05, 5.0, 1.0)
        );
    }

    #[test]
    fn out_of_range_values_are_refused_by_the_parser() {
        let bad: &[&[&str]] = &[
            &["--batch", "1000000000"],
            &["--vocab", "100000000000"],
            &["--vocab", "1"],
            &["--dropout", "-0.1"],
            &["--dropout", "1"],
            &["--dropout", "NaN"],
            &["--lr", "0"],
            &["--lr", "-1e-3"],
            &["--lr", "inf"],
            &["--alpha", "0"],
            &["--loraplus-ratio", "-2"],
            &["--neftune-alpha", "-1"],
            &["--rank", "0"],
            &["--rank", "257"],
            &["--seq", "1"],
            &["--steps", "0"],
            &["--steps", "-5"],
            &["--layers", "257"],
            &["--dim", "x"],
            &["--steps"],
            &["--no-such-option"],
        ];
        for args in bad {
            let e = parse(args).expect_err(&format!("{args:?} was accepted"));
            assert_ne!(e.exit_code(), 0, "{args:?}");
        }
        // Repeats take the last value, as before.
        let a = parse(&["--cpu", "--cpu", "--steps", "3", "--steps", "4"]).unwrap();
        assert_eq!((a.cpu, a.steps), (true, Some(4)));
    }

    #[test]
    fn oversized_models_are_refused_before_any_work() {
        for args in [
            &["--batch", "16777216", "--seq", "16777216"][..],
            &["--batch", "4096", "--seq", "4096"],
            &["--vocab", "16777216", "--dim", "1048576"],
            &["--dim", "1048576", "--hidden", "1048576", "--layers", "256"],
        ] {
            let e = parse(args).unwrap().resolve(false).expect_err("accepted");
            assert!(e.contains("too large") && e.contains("16 GiB"), "{e}");
        }
    }

    #[test]
    fn an_unwritable_out_is_refused() {
        let file = std::env::temp_dir().join(format!("finetune-args-test-{}", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        assert!(check_writable(&file).is_err());
        assert!(check_writable(&file.join("sub")).is_err());
        std::fs::remove_file(&file).unwrap();
        let dir = std::env::temp_dir().join(format!("finetune-args-dir-{}", std::process::id()));
        check_writable(&dir.join("a/b")).unwrap();
        assert_eq!(std::fs::read_dir(dir.join("a/b")).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
