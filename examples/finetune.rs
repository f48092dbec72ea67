//! The main example: a QLoRA (or LoRA, DoRA, QDoRA; LoRA+) fine-tune of a Llama model
//! with the crate's candle layers, every step on the GPU, ending in a peft adapter.
//!
//! ```text
//! cargo run --release --example finetune                        # CPU (candle's CPU backend)
//! cargo run --release --features candle-cuda --example finetune # GPU (needs a CUDA toolkit)
//! cargo run --release --features candle-cuda --example finetune -- --model DIR --method qdora
//! ```
//! (`--help` gives each option's meaning, range and default.) Every argument is checked
//! before any work: ranges by the parser, the sizes of a generated model against an
//! estimate of the memory they need (refused above 16 GiB), and `--out` by writing a
//! probe file there.
//!
//! The model is [`lora_kernels::candle::llama::Llama`] (RoPE attention with grouped KV
//! heads, RMSNorm, SwiGLU), loaded from a Hugging Face checkpoint directory (`--model`:
//! `config.json` + safetensors, dense or bitsandbytes 4-bit). Without `--model` it
//! first writes a small random-init Llama in that format to `<out>/base` and trains
//! that. Every linear projection of every block gets an adapter (the crate's
//! `LoraLinear` / `DoraLinear`; for QLoRA / QDoRA over its NF4 base, blocksize 64,
//! double-quantized, quantized at load when the checkpoint is dense); the embedding
//! adds NEFTune noise in training; the crate's fused AdamW (f32 master weights, LoRA+'s
//! rate for B, one launch a step on the GPU) trains the adapters.
//!
//! The task, generated from the seed: sequences that follow a fixed random permutation
//! of the first `min(vocab, 256)` token ids (`next = perm[current]`), so the loss can
//! fall from ln V towards 0. The run fails unless the evaluation loss falls below 0.7×
//! its starting value.
//!
//! It writes, under `--out` (default `target/finetune`): `adapter/` (peft's
//! `adapter_config.json` + `adapter_model.safetensors`), `base/` (the generated model,
//! when no `--model` was given) and `eval.safetensors` (an evaluation batch `input_ids`
//! and this program's `logits` and `loss` for it), which `scripts/check_finetune.py`
//! compares with transformers' `LlamaForCausalLM` + `PeftModel.from_pretrained`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::builder::RangedU64ValueParser;
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use lora_kernels::adamw::{AdamW, TensorOptions};
use lora_kernels::candle::llama::{
    self, AdapterSpec, Checkpoint, Impl, Llama, LlamaConfig, Method, PROJECTIONS,
};
use lora_kernels::candle::{FusedAdamW, LayerOptions};
use lora_kernels::loraplus::{LoraPlus, Role};

type Res<T> = std::result::Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MethodArg {
    Lora,
    Qlora,
    Dora,
    Qdora,
}

/// The options as given (clap); sizes left out get the device's default in
/// [`Cli::resolve`].
#[derive(Parser, Debug)]
#[command(
    name = "finetune",
    about = "A LoRA / QLoRA / DoRA / QDoRA fine-tune of a Llama model with the crate's candle layers, ending in a peft adapter",
    after_help = AFTER_HELP,
    args_override_self = true,
    allow_negative_numbers = true
)]
struct Cli {
    /// A Hugging Face Llama checkpoint directory (config.json + *.safetensors, dense or
    /// bitsandbytes 4-bit) [default: a small random-init Llama written to <out>/base]
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// The adapter: LoRA or DoRA, over the dense base or its NF4 form (QLoRA, QDoRA)
    #[arg(long, value_enum, default_value_t = MethodArg::Qlora)]
    method: MethodArg,
    /// Run on candle's CPU backend even when a GPU is present
    #[arg(long)]
    cpu: bool,
    /// Training steps, 1..=10^9 [default: 200 on a GPU, 120 on the CPU]
    #[arg(long, value_name = "N", value_parser = RangedU64ValueParser::<usize>::new().range(1..=1_000_000_000))]
    steps: Option<usize>,
    /// AdamW learning rate (finite, > 0)
    #[arg(long, value_name = "LR", default_value_t = 3e-3, value_parser = positive_f32)]
    lr: f32,
    /// AdamW weight decay (finite, >= 0)
    #[arg(long, value_name = "WD", default_value_t = 0.0, value_parser = non_negative_f32)]
    weight_decay: f32,
    /// LoRA+: B's learning rate is this times A's (finite, > 0; 1 = plain LoRA)
    #[arg(long, value_name = "R", default_value_t = 1.0, value_parser = positive_f32)]
    loraplus_ratio: f32,
    /// Adapter rank, 1..=256
    #[arg(long, value_name = "R", default_value_t = 16, value_parser = RangedU64ValueParser::<usize>::new().range(1..=256))]
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
    /// Generated model: vocabulary size, 2..=2^20 [default: 512 on a GPU, 64 on the CPU]
    #[arg(long, value_name = "V", value_parser = RangedU64ValueParser::<usize>::new().range(2..=1 << 20))]
    vocab: Option<usize>,
    /// Generated model: width, 8..=2^16, a multiple of --heads × 2 [default: 1024 / 64]
    #[arg(long, value_name = "D", value_parser = RangedU64ValueParser::<usize>::new().range(8..=1 << 16))]
    dim: Option<usize>,
    /// Generated model: MLP width, 1..=2^18 [default: 2816 / 128]
    #[arg(long, value_name = "F", value_parser = RangedU64ValueParser::<usize>::new().range(1..=1 << 18))]
    hidden: Option<usize>,
    /// Generated model: blocks, 1..=256 [default: 4 / 2]
    #[arg(long, value_name = "L", value_parser = RangedU64ValueParser::<usize>::new().range(1..=256))]
    layers: Option<usize>,
    /// Generated model: attention heads, 1..=256 [default: 16 / 4]
    #[arg(long, value_name = "H", value_parser = RangedU64ValueParser::<usize>::new().range(1..=256))]
    heads: Option<usize>,
    /// Generated model: KV heads (divides --heads) [default: heads / 2]
    #[arg(long, value_name = "H", value_parser = RangedU64ValueParser::<usize>::new().range(1..=256))]
    kv_heads: Option<usize>,
    /// Sequences per step, 1..=2^20 [default: 8 on a GPU, 8 on the CPU]
    #[arg(long, value_name = "B", value_parser = RangedU64ValueParser::<usize>::new().range(1..=1 << 20))]
    batch: Option<usize>,
    /// Tokens per sequence, 2..=2^20 [default: 512 on a GPU, 32 on the CPU]
    #[arg(long, value_name = "S", value_parser = RangedU64ValueParser::<usize>::new().range(2..=1 << 20))]
    seq: Option<usize>,
    /// Seed of the generated weights, the adapters' start, the task and the noise
    #[arg(long, value_name = "S", default_value_t = 1)]
    seed: u64,
    /// Output folder (created; checked writable before training)
    #[arg(long, value_name = "DIR", default_value_os_t = default_out())]
    out: PathBuf,
}

const AFTER_HELP: &str = "\
A generated model's sizes are checked against a memory estimate (weights, adapters with \
their AdamW state, one training step's activations with the attention scores); above \
16 GiB the run is refused. The output folder is created and a probe file written to it \
and removed before training.";

/// The largest estimated peak memory a generated run may need.
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
    method: Method,
    steps: usize,
    batch: usize,
    seq: usize,
    /// The generated model (None with --model).
    generate: Option<LlamaConfig>,
}

impl Cli {
    /// The settings, with the defaults of a GPU-sized run or of one that finishes in
    /// well under a minute on 2 cores; a generated model is checked against
    /// [`MEMORY_LIMIT`].
    fn resolve(&self, gpu: bool) -> Res<Args> {
        let pick = |v: Option<usize>, on_gpu: usize, on_cpu: usize| {
            v.unwrap_or(if gpu { on_gpu } else { on_cpu })
        };
        let method = match self.method {
            MethodArg::Lora => Method::Lora,
            MethodArg::Qlora => Method::QLora,
            MethodArg::Dora => Method::Dora,
            MethodArg::Qdora => Method::QDora,
        };
        let (batch, seq) = (pick(self.batch, 8, 8), pick(self.seq, 512, 32));
        let generate = if self.model.is_some() {
            None
        } else {
            let heads = pick(self.heads, 16, 4);
            let kv = self.kv_heads.unwrap_or((heads / 2).max(1));
            let dim = pick(self.dim, 1024, 64);
            if heads % kv != 0 {
                return Err(format!("--kv-heads {kv} does not divide --heads {heads}"));
            }
            if dim % (2 * heads) != 0 {
                return Err(format!(
                    "--dim {dim} is not a multiple of 2 × --heads ({heads}): head_dim must be even"
                ));
            }
            let c = LlamaConfig {
                vocab_size: pick(self.vocab, 512, 64),
                hidden_size: dim,
                intermediate_size: pick(self.hidden, 2816, 128),
                num_hidden_layers: pick(self.layers, 4, 2),
                num_attention_heads: heads,
                num_key_value_heads: kv,
                head_dim: dim / heads,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                max_position_embeddings: seq.max(2),
                tie_word_embeddings: false,
                rope_scaling: None,
            };
            match memory_estimate(&c, self.rank, batch, seq) {
                Some(b) if b <= MEMORY_LIMIT => {}
                est => {
                    return Err(format!(
                        "the model is too large: about {} needed (vocab {}, dim {}, hidden {}, \
                         {} layers, rank {}, batch {batch} × seq {seq}); the limit is {} GiB",
                        est.map_or("more than 2^64 bytes".into(), |b| format!(
                            "{:.1} GiB",
                            b as f64 / (1u64 << 30) as f64
                        )),
                        c.vocab_size,
                        c.hidden_size,
                        c.intermediate_size,
                        c.num_hidden_layers,
                        self.rank,
                        MEMORY_LIMIT >> 30
                    ))
                }
            }
            Some(c)
        };
        Ok(Args {
            method,
            steps: pick(self.steps, 200, 120),
            batch,
            seq,
            generate,
        })
    }
}

/// An upper estimate of a generated run's peak memory in bytes (`None`: it overflows
/// u64), with checked arithmetic: the weights (f32, twice: the checkpoint read and the
/// model), the adapters with gradients and AdamW's moments, and per token what candle's
/// unfused ops keep for the backward: per block ~96 bytes per hidden unit, ~32 per MLP
/// unit and ~40 per attention score (`seq · heads` of them: the scores, mask, softmax
/// and their f32 copies), plus the logits. Calibrated on the H200: the GPU default
/// (4 blocks, dim 1024, 8 × 512 tokens) peaked at 7.0 GiB; this gives 8.9 GiB.
fn memory_estimate(c: &LlamaConfig, rank: usize, batch: usize, seq: usize) -> Option<u64> {
    let u = |v: usize| v as u64;
    let (v, d, f, l, h) = (
        u(c.vocab_size),
        u(c.hidden_size),
        u(c.intermediate_size),
        u(c.num_hidden_layers),
        u(c.num_attention_heads),
    );
    let r = u(rank);
    let t = u(batch).checked_mul(u(seq))?;
    let per_layer_w = d
        .checked_mul(d)?
        .checked_mul(4)?
        .checked_add(d.checked_mul(f)?.checked_mul(3)?)?;
    let weights = l
        .checked_mul(per_layer_w)?
        .checked_add(v.checked_mul(d)?.checked_mul(2)?)?;
    let adapters =
        l.checked_mul(r.checked_mul(d.checked_mul(11)?.checked_add(f.checked_mul(3)?)?)?)?;
    let scores = u(seq).checked_mul(h)?.checked_mul(40)?;
    let per_token_layer = d
        .checked_mul(96)?
        .checked_add(f.checked_mul(32)?)?
        .checked_add(scores)?;
    let per_token = l
        .checked_mul(per_token_layer)?
        .checked_add(v.checked_mul(16)?)?;
    weights
        .checked_mul(8)?
        .checked_add(adapters.checked_mul(16)?)?
        .checked_add(t.checked_mul(per_token)?)
}

/// Creates `dir` and checks that a file can be written there (written, then removed).
fn check_writable(dir: &Path) -> Res<()> {
    let fail = |e: std::io::Error| format!("--out {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(".finetune-write-probe");
    std::fs::write(&probe, b"probe").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)
}

/// SplitMix64, for the task and the batches.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

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

/// The device: the first CUDA GPU when built with `candle-cuda` and not `--cpu`.
fn pick_device(cpu: bool) -> Device {
    if cpu {
        return Device::Cpu;
    }
    #[cfg(feature = "candle-cuda")]
    {
        match Device::new_cuda(0) {
            Ok(d) => return d,
            Err(e) => eprintln!("no CUDA device ({e}): running on candle's CPU backend"),
        }
    }
    #[cfg(not(feature = "candle-cuda"))]
    eprintln!(
        "built without the `candle-cuda` feature: running on candle's CPU backend \
         (cargo run --release --features candle-cuda --example finetune for the GPU)"
    );
    Device::Cpu
}

/// Peak device memory so far (the CUDA stream-ordered pool's high-water mark, which
/// candle's allocations come from) in bytes, or the process's peak RSS on the CPU.
fn peak_memory(dev: &Device) -> Option<u64> {
    match dev {
        #[cfg(feature = "candle-cuda")]
        Device::Cuda(d) => {
            let g = lora_kernels::candle::gpu(d).ok()?;
            g.pool_usage(false).ok().map(|(_, high)| high)
        }
        _ => {
            let s = std::fs::read_to_string("/proc/self/status").ok()?;
            let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            let kb: u64 = l.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        }
    }
}

fn run(cli: Cli) -> Res<()> {
    let dev = pick_device(cli.cpu);
    let args = cli.resolve(!dev.is_cpu())?;
    check_writable(&cli.out)?;
    let dtype = if dev.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let model_dir = match (&cli.model, &args.generate) {
        (Some(m), _) => m.clone(),
        (None, Some(c)) => {
            let dir = cli.out.join("base");
            llama::write_checkpoint(&dir, c, cli.seed, dtype).map_err(err)?;
            println!(
                "wrote a random-init Llama ({:.1} M parameters) to {}",
                c.num_params() as f64 / 1e6,
                dir.display()
            );
            dir
        }
        (None, None) => unreachable!("resolve sets one"),
    };
    let ckpt = Checkpoint::open(&model_dir).map_err(err)?;
    let c = ckpt.config.clone();
    let mut layer = LayerOptions::new(cli.rank, cli.alpha);
    layer.dropout = cli.dropout;
    layer.seed = cli.seed;
    let spec = AdapterSpec {
        method: args.method,
        implementation: Impl::Fused,
        layer,
        targets: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        nf4_blocksize: 64,
        nf4_double_quant: true,
        neftune_alpha: cli.neftune_alpha,
    };
    let t0 = Instant::now();
    let model = Llama::new(&ckpt, &spec, dtype, &dev).map_err(err)?;
    drop(ckpt);
    println!(
        "model: Llama {} layers · dim {} · MLP {} · {} heads ({} KV) · vocab {}; {:?} r={} alpha={} \
         dropout={} LoRA+ ratio {}; NEFTune alpha {}; {:?} on {}; loaded in {:.1} s",
        c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
        c.num_key_value_heads, c.vocab_size, args.method, cli.rank, cli.alpha, cli.dropout,
        cli.loraplus_ratio, cli.neftune_alpha, dtype,
        if dev.is_cpu() { "the CPU".to_string() } else { "CUDA device 0".to_string() },
        t0.elapsed().as_secs_f64()
    );

    // AdamW over every adapter tensor, one launch a step on the GPU; LoRA+ as each
    // tensor's learning-rate multiplier.
    let rates = LoraPlus::new(cli.lr, cli.loraplus_ratio).map_err(err)?;
    let params = model
        .named_vars()
        .into_iter()
        .map(|(name, v)| {
            let role = Role::of(&name).unwrap_or(Role::A);
            (v, TensorOptions::new(rates.lr_scale(role)))
        })
        .collect();
    let hyper = AdamW {
        lr: cli.lr as f64,
        weight_decay: cli.weight_decay as f64,
        ..AdamW::default()
    };
    let mut opt = FusedAdamW::new(params, hyper).map_err(err)?;

    let mut rng = Rng(cli.seed ^ 0x7a5c);
    let task = c.vocab_size.min(256);
    let mut perm: Vec<u32> = (0..task as u32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.below(i + 1));
    }
    let ids_tensor = |ids: Vec<u32>, b: usize| Tensor::from_vec(ids, (b, args.seq), &dev);
    let eval_b = args.batch.min(4);
    let eval_ids = ids_tensor(
        batch_ids(&perm, eval_b, args.seq, &mut Rng(cli.seed ^ 0xE7A1)),
        eval_b,
    )
    .map_err(err)?;
    let eval = |m: &Llama| -> Res<(Tensor, f32)> {
        let logits = m.forward_t(&eval_ids, false).map_err(err)?;
        let loss = Llama::loss(&logits, &eval_ids)
            .and_then(|l| l.to_scalar::<f32>())
            .map_err(err)?;
        Ok((logits, loss))
    };
    let loss0 = eval(&model)?.1;
    println!(
        "eval loss before: {loss0:.4} (ln {task} = {:.4})",
        (task as f32).ln()
    );

    let tokens = (args.batch * args.seq) as f64;
    let bar = ProgressBar::new(args.steps as u64).with_style(
        ProgressStyle::with_template("[{bar:30}] {pos:>5}/{len} {msg} [{elapsed_precise}]")
            .map_err(err)?
            .progress_chars("#>-"),
    );
    let log_every = (args.steps / 10).max(1);
    let start = Instant::now();
    let mut ema: Option<f32> = None;
    for step in 1..=args.steps {
        let ids = ids_tensor(batch_ids(&perm, args.batch, args.seq, &mut rng), args.batch)
            .map_err(err)?;
        let logits = model.forward_t(&ids, true).map_err(err)?;
        let loss = Llama::loss(&logits, &ids).map_err(err)?;
        let grads = loss.backward().map_err(err)?;
        opt.step(&grads).map_err(err)?;
        let l = loss.to_scalar::<f32>().map_err(err)?;
        if !l.is_finite() {
            bar.abandon();
            return Err(format!("the loss is {l} at step {step}"));
        }
        let e = ema.map_or(l, |m| 0.9 * m + 0.1 * l);
        ema = Some(e);
        let tok_s = step as f64 * tokens / start.elapsed().as_secs_f64();
        let mem =
            peak_memory(&dev).map_or("?".into(), |b| format!("{:.0} MiB", b as f64 / 1048576.0));
        let msg = format!("loss {e:7.4} | {tok_s:>8.0} tok/s | peak {mem}");
        bar.set_position(step as u64);
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
    let (logits, loss1) = eval(&model)?;
    println!(
        "eval loss after: {loss1:.4} (before {loss0:.4}); {:.1} s, {:.0} tokens/s, peak memory {}",
        secs,
        args.steps as f64 * tokens / secs,
        peak_memory(&dev).map_or("?".into(), |b| format!("{:.0} MiB", b as f64 / 1048576.0))
    );

    let adapter = model
        .adapter(Some(&model_dir.display().to_string()))
        .map_err(err)?;
    let adir = cli.out.join("adapter");
    adapter.save_dir(&adir).map_err(err)?;
    let mut eval_out = std::collections::HashMap::new();
    eval_out.insert(
        "input_ids".to_string(),
        eval_ids.to_dtype(DType::I64).map_err(err)?,
    );
    eval_out.insert(
        "logits".to_string(),
        logits.to_dtype(DType::F32).map_err(err)?,
    );
    eval_out.insert(
        "loss".to_string(),
        Tensor::new(&[loss1], &Device::Cpu).map_err(err)?,
    );
    let epath = cli.out.join("eval.safetensors");
    candle_core::safetensors::save(&eval_out, &epath).map_err(err)?;
    let peak = peak_memory(&dev);
    let run = serde_json::json!({
        "method": format!("{:?}", args.method).to_lowercase(),
        "dtype": if dtype == DType::BF16 { "bf16" } else { "f32" },
        "device": if dev.is_cpu() { "cpu" } else { "cuda" },
        "steps": args.steps, "batch": args.batch, "seq": args.seq,
        "eval_loss_before": loss0, "eval_loss_after": loss1,
        "tokens_per_s": args.steps as f64 * tokens / secs,
        "peak_memory_bytes": peak,
        "model": model_dir.display().to_string(),
    });
    let rpath = cli.out.join("run.json");
    std::fs::write(&rpath, serde_json::to_string_pretty(&run).map_err(err)?)
        .map_err(|e| format!("{}: {e}", rpath.display()))?;
    println!(
        "wrote {} (peft adapter), {} and {}",
        adir.display(),
        epath.display(),
        rpath.display()
    );
    if !loss0.is_finite() || loss1.is_nan() || loss1 >= 0.7 * loss0 {
        return Err(format!(
            "the loss did not fall clearly: {loss0:.4} -> {loss1:.4}"
        ));
    }
    Ok(())
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
            for m in ["lora", "qlora", "dora", "qdora"] {
                let a = parse(&["--method", m]).unwrap().resolve(gpu).unwrap();
                let c = a.generate.as_ref().unwrap();
                let est = memory_estimate(c, 16, a.batch, a.seq).unwrap();
                assert!(est <= MEMORY_LIMIT, "{a:?}");
                // An upper estimate: at least what the GPU default measured on an H200
                // (7 333 151 888 bytes, QLoRA; QDoRA 7.65 GB).
                if gpu {
                    assert!(est >= 7_700_000_000, "{est} for {a:?}");
                }
            }
        }
        let a = parse(&[]).unwrap().resolve(false).unwrap();
        let c = a.generate.unwrap();
        assert_eq!(
            (a.steps, a.batch, a.seq, a.method),
            (120, 8, 32, Method::QLora)
        );
        assert_eq!(
            (
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers
            ),
            (64, 64, 128, 2)
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (4, 2, 16)
        );
    }

    #[test]
    fn out_of_range_values_are_refused_by_the_parser() {
        let bad: &[&[&str]] = &[
            &["--batch", "100000000000"],
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
            &["--weight-decay", "-1"],
            &["--rank", "0"],
            &["--rank", "257"],
            &["--seq", "1"],
            &["--steps", "0"],
            &["--steps", "-5"],
            &["--layers", "257"],
            &["--method", "ia3"],
            &["--dim", "x"],
            &["--steps"],
            &["--no-such-option"],
        ];
        for args in bad {
            let e = parse(args).expect_err(&format!("{args:?} was accepted"));
            assert_ne!(e.exit_code(), 0, "{args:?}");
        }
        let a = parse(&["--cpu", "--cpu", "--steps", "3", "--steps", "4"]).unwrap();
        assert_eq!((a.cpu, a.steps), (true, Some(4)));
    }

    #[test]
    fn inconsistent_or_oversized_models_are_refused_before_any_work() {
        for args in [
            &["--batch", "1048576", "--seq", "1048576"][..],
            &["--batch", "4096", "--seq", "4096"],
            &["--vocab", "1048576", "--dim", "65536"],
            &[
                "--dim", "65536", "--hidden", "262144", "--layers", "256", "--heads", "256",
            ],
        ] {
            let e = parse(args).unwrap().resolve(false).expect_err("accepted");
            assert!(e.contains("too large") && e.contains("16 GiB"), "{e}");
        }
        let e = parse(&["--heads", "4", "--kv-heads", "3"])
            .unwrap()
            .resolve(false)
            .unwrap_err();
        assert!(e.contains("--kv-heads"), "{e}");
        let e = parse(&["--dim", "66", "--heads", "4"])
            .unwrap()
            .resolve(false)
            .unwrap_err();
        assert!(e.contains("head_dim"), "{e}");
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
