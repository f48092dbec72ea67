//! A trainable Llama (RoPE attention with grouped KV heads, RMSNorm, SwiGLU MLP) built
//! from candle-nn pieces, with the crate's adapter layers in its linear projections.
//!
//! candle-transformers' Llama cannot be fine-tuned: its projections are private
//! concrete `Linear`s, its RoPE, softmax and RMSNorm kernels have no backward, and it
//! returns only the last position's logits. This one uses only differentiable ops
//! (`rope_slow`, `softmax`, `rms_norm_slow`) and returns every position's logits.
//!
//! Weights load from a Hugging Face checkpoint directory (`config.json` and
//! `model.safetensors` or sharded `model-*.safetensors` with
//! `model.safetensors.index.json`), stored dense (f32, f16, bf16; cast to the compute
//! dtype) or as bitsandbytes 4-bit (`Linear4bit`'s NF4 keys, read without
//! dequantizing). [`write_checkpoint`] writes a model in the same format, which
//! transformers' `LlamaForCausalLM.from_pretrained` loads.
//!
//! Each linear layer named in [`AdapterSpec::targets`] becomes a [`Proj`]: the crate's
//! [`LoraLinear`] / [`DoraLinear`] over a dense or NF4 base ([`Impl::Fused`]), or the
//! same math written with plain candle ops ([`Impl::Plain`]: matmuls and adds; NF4
//! dequantized each call, then a matmul), the baseline of the step bench. Everything
//! else is frozen.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType as CDType, Device, Module, Result, Tensor, Var, D};
use serde_json::{json, Value};

use super::layers::{DoraLinear, FrozenWeight, LayerOptions, LoraLinear, NeftuneEmbedding};
use super::to_candle;
use crate::peft::{Adapter, AdapterConfig, AdapterModule};
use crate::philox::SplitMix;
use crate::Nf4Weight;

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

// ---------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------

/// Llama 3's RoPE frequency scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The fields of a Hugging Face Llama `config.json` this model uses.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub rope_scaling: Option<Llama3Scaling>,
}

fn field_usize(v: &Value, k: &str) -> Result<usize> {
    v.get(k)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| msg(format!("config.json: `{k}` missing or not an integer")))
}

impl LlamaConfig {
    /// Parses `config.json`; an unsupported `model_type`, `rope_scaling` or a missing
    /// field is an error naming it.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| msg(format!("config.json: {e}")))?;
        if let Some(t) = v.get("model_type").and_then(Value::as_str) {
            if t != "llama" {
                return Err(msg(format!("config.json: model_type `{t}` is not `llama`")));
            }
        }
        let heads = field_usize(&v, "num_attention_heads")?;
        let hidden = field_usize(&v, "hidden_size")?;
        let rope_scaling = match v.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(s) => {
                let ty = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if ty != "llama3" {
                    return Err(msg(format!(
                        "config.json: rope_scaling type `{ty}` is not supported (llama3)"
                    )));
                }
                let f = |k: &str| {
                    s.get(k)
                        .and_then(Value::as_f64)
                        .ok_or_else(|| msg(format!("config.json: rope_scaling.{k} missing")))
                };
                Some(Llama3Scaling {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: field_usize(
                        s,
                        "original_max_position_embeddings",
                    )?,
                })
            }
        };
        let c = LlamaConfig {
            vocab_size: field_usize(&v, "vocab_size")?,
            hidden_size: hidden,
            intermediate_size: field_usize(&v, "intermediate_size")?,
            num_hidden_layers: field_usize(&v, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: v
                .get("num_key_value_heads")
                .and_then(Value::as_u64)
                .map_or(heads, |x| x as usize),
            head_dim: v
                .get("head_dim")
                .and_then(Value::as_u64)
                .map_or(hidden / heads.max(1), |x| x as usize),
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta: v
                .get("rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or(10000.0),
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map_or(2048, |x| x as usize),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            rope_scaling,
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the sizes agree (heads divide, head_dim even, nothing zero).
    pub fn validate(&self) -> Result<()> {
        let z = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        if let Some((k, _)) = z.iter().find(|(_, v)| *v == 0) {
            return Err(msg(format!("llama config: {k} is 0")));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(msg(format!(
                "llama config: {} attention heads are not a multiple of {} KV heads",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(msg(format!(
                "llama config: head_dim {} is odd",
                self.head_dim
            )));
        }
        Ok(())
    }

    /// The `config.json` transformers reads for this config (`dtype` as its
    /// `torch_dtype`).
    pub fn to_json(&self, dtype: CDType) -> String {
        let mut v = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "torch_dtype": match dtype { CDType::BF16 => "bfloat16", CDType::F16 => "float16", _ => "float32" },
        });
        if let Some(s) = &self.rope_scaling {
            v["rope_scaling"] = json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
        }
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    /// Parameters of the whole model (embeddings, projections, norms, head).
    pub fn num_params(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }

    /// (out, in) of projection `name` (`q_proj`, ..., `down_proj`).
    pub fn proj_dims(&self, name: &str) -> Option<(usize, usize)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        match name {
            "q_proj" => Some((q, h)),
            "k_proj" | "v_proj" => Some((kv, h)),
            "o_proj" => Some((h, q)),
            "gate_proj" | "up_proj" => Some((i, h)),
            "down_proj" => Some((h, i)),
            _ => None,
        }
    }
}

/// The seven linear projections of a Llama block, in peft's naming.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The module path of projection `name` in block `layer`, as transformers and peft name
/// it (`model.layers.0.self_attn.q_proj`, `model.layers.0.mlp.up_proj`).
pub fn proj_path(layer: usize, name: &str) -> String {
    let block = if matches!(name, "gate_proj" | "up_proj" | "down_proj") {
        "mlp"
    } else {
        "self_attn"
    };
    format!("model.layers.{layer}.{block}.{name}")
}

// ---------------------------------------------------------------------------------------
// Adapters
// ---------------------------------------------------------------------------------------

/// LoRA or DoRA, over a dense or an NF4 base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Lora,
    QLora,
    Dora,
    QDora,
}

impl Method {
    /// DoRA or QDoRA.
    pub fn is_dora(self) -> bool {
        matches!(self, Method::Dora | Method::QDora)
    }

    /// QLoRA or QDoRA: the targeted projections' bases in NF4.
    pub fn is_quantized(self) -> bool {
        matches!(self, Method::QLora | Method::QDora)
    }
}

/// The crate's fused layers, or the same math in plain candle ops (the baseline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    Fused,
    Plain,
}

/// What to adapt and how.
#[derive(Debug, Clone)]
pub struct AdapterSpec {
    pub method: Method,
    pub implementation: Impl,
    /// Rank, alpha, rsLoRA, dropout, seed (each layer's seed is derived from it).
    pub layer: LayerOptions,
    /// Projection names adapted (from [`PROJECTIONS`]).
    pub targets: Vec<String>,
    /// NF4 block size and double quantization for bases quantized at load.
    pub nf4_blocksize: usize,
    pub nf4_double_quant: bool,
    /// NEFTune's alpha (0: off).
    pub neftune_alpha: f32,
}

/// One linear projection of the model.
pub enum Proj {
    /// Frozen, no adapter.
    Frozen(FrozenWeight),
    Lora(LoraLinear),
    Dora(DoraLinear),
    /// LoRA / DoRA in plain candle ops.
    Plain(PlainAdapter),
}

impl Proj {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Proj::Frozen(w) => {
                let w = w.to_dense(x.dtype(), x.device())?;
                x.broadcast_matmul(&w.t()?)
            }
            Proj::Lora(l) => l.forward_t(x, train),
            Proj::Dora(l) => l.forward_t(x, train),
            Proj::Plain(p) => p.forward_t(x, train),
        }
    }

    /// The trainable parameters.
    pub fn vars(&self) -> Vec<Var> {
        match self {
            Proj::Frozen(_) => vec![],
            Proj::Lora(l) => l.vars(),
            Proj::Dora(l) => l.vars(),
            Proj::Plain(p) => p.vars(),
        }
    }

    fn adapter_module(&self, name: &str) -> Result<Option<AdapterModule<f32>>> {
        match self {
            Proj::Frozen(_) => Ok(None),
            Proj::Lora(l) => l.adapter_module(name).map(Some),
            Proj::Dora(l) => l.adapter_module(name).map(Some),
            Proj::Plain(p) => p.adapter_module(name).map(Some),
        }
    }
}

/// LoRA / DoRA with candle's own ops, as a user would write it without this crate:
/// `y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ`, DoRA's norm and scale composed as in peft, an NF4
/// base dequantized at every call.
pub struct PlainAdapter {
    base: FrozenWeight,
    a: Var,
    b: Var,
    m: Option<Var>,
    scale: f64,
    dropout: f32,
}

impl PlainAdapter {
    fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.a.clone(), self.b.clone()];
        v.extend(self.m.clone());
        v
    }

    fn adapter_module(&self, name: &str) -> Result<AdapterModule<f32>> {
        let host = |t: &Tensor| t.flatten_all()?.to_dtype(CDType::F32)?.to_vec1::<f32>();
        let (r, k) = self.a.dims2()?;
        Ok(AdapterModule {
            name: name.into(),
            rank: r,
            in_features: k,
            out_features: self.b.dims()[0],
            scale: self.scale as f32,
            a: host(self.a.as_tensor())?,
            b: host(self.b.as_tensor())?,
            magnitude: match &self.m {
                Some(m) => Some(host(m.as_tensor())?),
                None => None,
            },
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dt = x.dtype();
        let w = self.base.to_dense(dt, x.device())?;
        let a = self.a.as_tensor().to_dtype(dt)?;
        let b = self.b.as_tensor().to_dtype(dt)?;
        let xd = if train && self.dropout > 0.0 {
            candle_nn::ops::dropout(x, self.dropout)?
        } else {
            x.clone()
        };
        let base = x.broadcast_matmul(&w.t()?)?;
        let lora = (xd.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * self.scale)?;
        match &self.m {
            None => base + lora,
            Some(m) => {
                // peft: ‖W + s·BA‖ per row (detached), g = m / norm,
                // y = base + (g − 1) ⊙ drop(x) Wᵀ + g ⊙ lora.
                let ba = (b.matmul(&a)? * self.scale)?;
                let norm = (w.to_dtype(CDType::F32)? + ba.to_dtype(CDType::F32)?)?
                    .sqr()?
                    .sum(1)?
                    .sqrt()?
                    .detach();
                let g = m.as_tensor().div(&norm)?.to_dtype(dt)?;
                let base_d = if train && self.dropout > 0.0 {
                    xd.broadcast_matmul(&w.t()?)?
                } else {
                    base.clone()
                };
                let g1 = (&g - 1.0)?;
                base.add(&base_d.broadcast_mul(&g1)?)?
                    .add(&lora.broadcast_mul(&g)?)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------------------

/// The tensors of a checkpoint directory, read into memory.
pub struct Checkpoint {
    files: Vec<(PathBuf, Vec<u8>)>,
    /// tensor name → index into `files`.
    index: HashMap<String, usize>,
    pub config: LlamaConfig,
}

fn io(p: &Path, e: std::io::Error) -> candle_core::Error {
    msg(format!("{}: {e}", p.display()))
}

fn st_dtype(d: safetensors::Dtype) -> Option<CDType> {
    match d {
        safetensors::Dtype::F32 => Some(CDType::F32),
        safetensors::Dtype::F16 => Some(CDType::F16),
        safetensors::Dtype::BF16 => Some(CDType::BF16),
        safetensors::Dtype::U8 => Some(CDType::U8),
        safetensors::Dtype::I64 => Some(CDType::I64),
        safetensors::Dtype::U32 => Some(CDType::U32),
        _ => None,
    }
}

impl Checkpoint {
    /// Reads `config.json` and every safetensors file of `dir` (the index's shards, or
    /// `model.safetensors`).
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| io(&cfg_path, e))?;
        let config = LlamaConfig::from_json(&text)?;
        let idx_path = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if idx_path.exists() {
            let t = std::fs::read_to_string(&idx_path).map_err(|e| io(&idx_path, e))?;
            let v: Value = serde_json::from_str(&t)
                .map_err(|e| msg(format!("{}: {e}", idx_path.display())))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| msg(format!("{}: no weight_map", idx_path.display())))?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for p in names {
            let bytes = std::fs::read(&p).map_err(|e| io(&p, e))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| msg(format!("{}: {e}", p.display())))?;
            for name in st.names() {
                index.insert(name.to_string(), files.len());
            }
            files.push((p, bytes));
        }
        Ok(Checkpoint {
            files,
            index,
            config,
        })
    }

    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Tensor `name` as stored, cast to `dtype`, on `device`.
    pub fn tensor(&self, name: &str, dtype: CDType, device: &Device) -> Result<Tensor> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| msg(format!("checkpoint: tensor `{name}` not found")))?;
        let (p, bytes) = &self.files[i];
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| msg(format!("{}: {e}", p.display())))?;
        let v = st
            .tensor(name)
            .map_err(|e| msg(format!("{}: {name}: {e}", p.display())))?;
        let dt = st_dtype(v.dtype()).ok_or_else(|| {
            msg(format!(
                "{}: {name}: dtype {:?} not supported",
                p.display(),
                v.dtype()
            ))
        })?;
        Tensor::from_raw_buffer(v.data(), dt, v.shape(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    /// Linear layer `path` (without `.weight`) as a frozen base: NF4 as stored when the
    /// checkpoint is bitsandbytes 4-bit, else dense (quantized to NF4 here when
    /// `quantize` is given as (blocksize, double_quant)).
    fn linear(
        &self,
        path: &str,
        dtype: CDType,
        device: &Device,
        quantize: Option<(usize, bool)>,
    ) -> Result<FrozenWeight> {
        let wname = format!("{path}.weight");
        let q4 = format!("{wname}.quant_state.bitsandbytes__nf4");
        if self.has(&q4) {
            let &i = self
                .index
                .get(&wname)
                .ok_or_else(|| msg(format!("checkpoint: `{wname}` not found")))?;
            let w = Nf4Weight::load_linear4bit(&self.files[i].1, &format!("{path}."))
                .map_err(to_candle)?;
            return FrozenWeight::nf4(w, device);
        }
        match quantize {
            None => FrozenWeight::dense(
                self.tensor(&wname, dtype, &Device::Cpu)?
                    .to_device(device)?,
            ),
            // Quantized where the model lives (on the GPU by the crate's kernel).
            Some((bs, dq)) => FrozenWeight::quantize(&self.tensor(&wname, dtype, device)?, bs, dq),
        }
    }
}

/// Writes `config.json` and `model.safetensors` for a Llama of `config` with weights
/// drawn from `seed` (uniform; std 0.02, transformers' initializer range, for the
/// projections, 1/√hidden for the embeddings and the head; norms 1), stored
/// in `dtype`. transformers' `LlamaForCausalLM.from_pretrained(dir)` loads it.
pub fn write_checkpoint(dir: &Path, config: &LlamaConfig, seed: u64, dtype: CDType) -> Result<()> {
    config.validate()?;
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut rng = SplitMix(seed);
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut normal = |rows: usize, cols: usize, std: f64| -> Result<Tensor> {
        // Uniform with the given std: as good a random start as the normal and ~10×
        // cheaper to draw for a billion weights.
        let half_width = std * 3f64.sqrt();
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| (rng.symmetric() * half_width) as f32)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu)?.to_dtype(dtype)
    };
    let (h, v) = (config.hidden_size, config.vocab_size);
    // Embeddings and head: std 1/√hidden (transformers' 0.02 at hidden 2500; larger in
    // small models, where 0.02 would cap every logit near 0.02·hidden and no adapter
    // on the projections could make the next token likely). Projections: 0.02.
    let outer = 1.0 / (h as f64).sqrt();
    tensors.insert("model.embed_tokens.weight".into(), normal(v, h, outer)?);
    for l in 0..config.num_hidden_layers {
        for p in PROJECTIONS {
            let (o, i) = config.proj_dims(p).expect("a projection");
            tensors.insert(format!("{}.weight", proj_path(l, p)), normal(o, i, 0.02)?);
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            tensors.insert(
                format!("model.layers.{l}.{n}.weight"),
                Tensor::ones(h, dtype, &Device::Cpu)?,
            );
        }
    }
    tensors.insert(
        "model.norm.weight".into(),
        Tensor::ones(h, dtype, &Device::Cpu)?,
    );
    if !config.tie_word_embeddings {
        tensors.insert("lm_head.weight".into(), normal(v, h, outer)?);
    }
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, config.to_json(dtype)).map_err(|e| io(&cfg, e))?;
    let st = dir.join("model.safetensors");
    let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&tensors, &st)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------

struct Block {
    proj: Vec<Proj>, // in PROJECTIONS order
    ln1: Tensor,
    ln2: Tensor,
}

/// The model: frozen embeddings (with NEFTune), blocks with adapted projections,
/// final norm and LM head.
pub struct Llama {
    pub config: LlamaConfig,
    spec: AdapterSpec,
    embed: NeftuneEmbedding,
    blocks: Vec<Block>,
    norm: Tensor,
    head: Tensor,
    cos: Tensor,
    sin: Tensor,
    dtype: CDType,
}

fn rope_tables(c: &LlamaConfig, dtype: CDType, device: &Device) -> Result<(Tensor, Tensor)> {
    let d = c.head_dim;
    let mut inv: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    if let Some(s) = &c.rope_scaling {
        let old = s.original_max_position_embeddings as f64;
        let low_wl = old / s.low_freq_factor;
        let high_wl = old / s.high_freq_factor;
        for f in inv.iter_mut() {
            let wl = 2.0 * std::f64::consts::PI / *f;
            if wl > low_wl {
                *f /= s.factor;
            } else if wl >= high_wl {
                let smooth =
                    (old / wl - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
            }
        }
    }
    let t = c.max_position_embeddings;
    let mut cos = Vec::with_capacity(t * d / 2);
    let mut sin = Vec::with_capacity(t * d / 2);
    for p in 0..t {
        for f in &inv {
            let a = p as f64 * *f as f32 as f64;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    let cos = Tensor::from_vec(cos, (t, d / 2), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (t, d / 2), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

impl Llama {
    /// Builds the model from `ckpt` on `device` in `dtype` (f32, f16 or bf16), adapters
    /// per `spec`.
    pub fn new(
        ckpt: &Checkpoint,
        spec: &AdapterSpec,
        dtype: CDType,
        device: &Device,
    ) -> Result<Self> {
        let c = ckpt.config.clone();
        for t in &spec.targets {
            if !PROJECTIONS.contains(&t.as_str()) {
                return Err(msg(format!(
                    "target module `{t}` is not a Llama projection ({PROJECTIONS:?})"
                )));
            }
        }
        let embed_w = ckpt.tensor("model.embed_tokens.weight", dtype, device)?;
        let embed = NeftuneEmbedding::new(embed_w.clone(), spec.neftune_alpha, spec.layer.seed)?;
        let quant = spec
            .method
            .is_quantized()
            .then_some((spec.nf4_blocksize, spec.nf4_double_quant));
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let mut proj = Vec::with_capacity(7);
            for (pi, p) in PROJECTIONS.iter().enumerate() {
                let path = proj_path(l, p);
                let target = spec.targets.iter().any(|t| t == p);
                let base = ckpt.linear(&path, dtype, device, if target { quant } else { None })?;
                if !target {
                    proj.push(Proj::Frozen(base));
                    continue;
                }
                let mut lo = spec.layer.clone();
                lo.seed = spec
                    .layer
                    .seed
                    .wrapping_add((l * 7 + pi) as u64 * 0x9E37_79B9);
                let pr = match (spec.implementation, spec.method.is_dora()) {
                    (Impl::Fused, false) => {
                        Proj::Lora(LoraLinear::new(base, None, lo, Some(device))?)
                    }
                    (Impl::Fused, true) => {
                        Proj::Dora(DoraLinear::new(base, None, lo, Some(device))?)
                    }
                    (Impl::Plain, dora) => {
                        // Same start as the fused layer (same seed).
                        let l = LoraLinear::new(base.clone(), None, lo.clone(), Some(device))?;
                        let m = if dora {
                            let w = base.to_dense(CDType::F32, device)?;
                            Some(Var::from_tensor(&w.sqr()?.sum(1)?.sqrt()?)?)
                        } else {
                            None
                        };
                        Proj::Plain(PlainAdapter {
                            base,
                            a: l.a().clone(),
                            b: l.b().clone(),
                            m,
                            scale: l.scale() as f64,
                            dropout: lo.dropout,
                        })
                    }
                };
                proj.push(pr);
            }
            blocks.push(Block {
                proj,
                ln1: ckpt.tensor(
                    &format!("model.layers.{l}.input_layernorm.weight"),
                    dtype,
                    device,
                )?,
                ln2: ckpt.tensor(
                    &format!("model.layers.{l}.post_attention_layernorm.weight"),
                    dtype,
                    device,
                )?,
            });
        }
        let norm = ckpt.tensor("model.norm.weight", dtype, device)?;
        let head = if c.tie_word_embeddings || !ckpt.has("lm_head.weight") {
            embed_w
        } else {
            ckpt.tensor("lm_head.weight", dtype, device)?
        };
        let (cos, sin) = rope_tables(&c, dtype, device)?;
        Ok(Llama {
            config: c,
            spec: spec.clone(),
            embed,
            blocks,
            norm,
            head,
            cos,
            sin,
            dtype,
        })
    }

    /// Every trainable parameter, in a fixed order (layer, projection, A/B/m).
    pub fn vars(&self) -> Vec<Var> {
        self.blocks
            .iter()
            .flat_map(|b| b.proj.iter().flat_map(Proj::vars))
            .collect()
    }

    /// The trainable parameters with their peft roles, for LoRA+ (`lora_B` / other).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (l, b) in self.blocks.iter().enumerate() {
            for (p, pr) in PROJECTIONS.iter().zip(&b.proj) {
                let names = ["lora_A.weight", "lora_B.weight", "lora_magnitude_vector"];
                for (v, n) in pr.vars().into_iter().zip(names) {
                    out.push((format!("{}.{n}", proj_path(l, p)), v));
                }
            }
        }
        out
    }

    /// Logits [batch, seq, vocab] (compute dtype) for ids [batch, seq] (u32).
    pub fn forward_t(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let c = &self.config;
        let (bsz, seq) = ids.dims2()?;
        if seq > c.max_position_embeddings {
            return Err(msg(format!(
                "sequence {seq} longer than max_position_embeddings {}",
                c.max_position_embeddings
            )));
        }
        let _ = bsz;
        let x = self.embed(ids, train)?;
        self.forward_hidden(&x, train)
    }

    /// The embeddings [batch, seq, hidden] of ids [batch, seq] (NEFTune noise in
    /// training).
    pub fn embed(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        self.embed.forward_t(ids, train)
    }

    /// Logits from embeddings `x` [batch, seq, hidden] (e.g. a `Var`, so that the
    /// backward reaches the first layer's input even without adapters).
    pub fn forward_hidden(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = &self.config;
        let (bsz, seq, _) = x.dims3()?;
        if seq > c.max_position_embeddings {
            return Err(msg(format!(
                "sequence {seq} longer than max_position_embeddings {}",
                c.max_position_embeddings
            )));
        }
        let dev = x.device();
        let mut x = x.clone();
        let cos = self.cos.narrow(0, 0, seq)?;
        let sin = self.sin.narrow(0, 0, seq)?;
        let mask: Vec<f32> = (0..seq)
            .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (seq, seq), dev)?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let eps = c.rms_norm_eps as f32;
        for b in &self.blocks {
            let h = candle_nn::ops::rms_norm_slow(&x, &b.ln1, eps)?;
            let q = b.proj[0].forward_t(&h, train)?;
            let k = b.proj[1].forward_t(&h, train)?;
            let v = b.proj[2].forward_t(&h, train)?;
            let q = q
                .reshape((bsz, seq, nh, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let k = k
                .reshape((bsz, seq, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = v
                .reshape((bsz, seq, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let q = candle_nn::rotary_emb::rope_slow(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_slow(&k, &cos, &sin)?;
            let k = repeat_kv(k, nh / nkv)?;
            let v = repeat_kv(v, nh / nkv)?;
            let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
            let att = att.to_dtype(CDType::F32)?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?.to_dtype(self.dtype)?;
            let y = att
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((bsz, seq, nh * hd))?;
            let y = b.proj[3].forward_t(&y, train)?;
            x = (x + y)?;
            let h = candle_nn::ops::rms_norm_slow(&x, &b.ln2, eps)?;
            let g = b.proj[4].forward_t(&h, train)?;
            let u = b.proj[5].forward_t(&h, train)?;
            let m = (g.silu()? * u)?;
            let y = b.proj[6].forward_t(&m, train)?;
            x = (x + y)?;
        }
        let x = candle_nn::ops::rms_norm_slow(&x, &self.norm, eps)?;
        x.broadcast_matmul(&self.head.t()?)
    }

    /// Mean next-token cross-entropy (f32) of `logits` [b, s, v] against `ids` [b, s]
    /// (position t predicts t + 1).
    pub fn loss(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let (b, s, v) = logits.dims3()?;
        if s < 2 {
            return Err(msg("loss: sequences need at least 2 tokens".into()));
        }
        let lg = logits
            .narrow(1, 0, s - 1)?
            .to_dtype(CDType::F32)?
            .reshape((b * (s - 1), v))?;
        let tg = ids
            .narrow(1, 1, s - 1)?
            .contiguous()?
            .reshape(b * (s - 1))?;
        candle_nn::loss::cross_entropy(&lg, &tg)
    }

    /// The adapter in peft's format (config + modules, f32).
    pub fn adapter(&self, base_model: Option<&str>) -> Result<Adapter<f32>> {
        let s = &self.spec;
        let targets: Vec<&str> = s.targets.iter().map(String::as_str).collect();
        let mut config = AdapterConfig::lora(s.layer.rank, s.layer.alpha, &targets);
        config.use_rslora = s.layer.rslora;
        config.use_dora = s.method.is_dora();
        config.lora_dropout = s.layer.dropout;
        config.base_model_name_or_path = base_model.map(String::from);
        let mut modules = Vec::new();
        for (l, b) in self.blocks.iter().enumerate() {
            for (p, pr) in PROJECTIONS.iter().zip(&b.proj) {
                if let Some(m) = pr.adapter_module(&proj_path(l, p))? {
                    modules.push(m);
                }
            }
        }
        modules.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Adapter { config, modules })
    }

    /// Sets every adapted layer from a peft adapter (same targets, ranks and scales).
    pub fn load_adapter(&self, adapter: &Adapter<f32>) -> Result<()> {
        for (l, b) in self.blocks.iter().enumerate() {
            for (p, pr) in PROJECTIONS.iter().zip(&b.proj) {
                let name = proj_path(l, p);
                let m = match pr {
                    Proj::Frozen(_) => continue,
                    _ => adapter
                        .module(&name)
                        .ok_or_else(|| msg(format!("adapter: no module `{name}`")))?,
                };
                match pr {
                    Proj::Lora(x) => x.load_adapter_module(m)?,
                    Proj::Dora(x) => x.load_adapter_module(m)?,
                    Proj::Plain(_) => {
                        return Err(msg(
                            "load_adapter: the plain baseline does not load adapters".into(),
                        ))
                    }
                    Proj::Frozen(_) => {}
                }
            }
        }
        Ok(())
    }
}

impl Module for Llama {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_t(ids, false)
    }
}

/// GQA: each KV head repeated for its `n_rep` query heads ([b, kv, s, d] →
/// [b, kv·n_rep, s, d]).
fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, n_rep, s, d))?
        .contiguous()?
        .reshape((b, kv * n_rep, s, d))
}
