//! peft adapters: load and save LoRA, rsLoRA and DoRA adapters in the files peft's
//! `save_pretrained` writes and `PeftModel.from_pretrained` reads:
//! `adapter_config.json` and `adapter_model.safetensors`.
//!
//! ```text
//! base_model.model.<module>.lora_A.weight          [r, K]
//! base_model.model.<module>.lora_B.weight          [N, r]
//! base_model.model.<module>.lora_magnitude_vector  \[N\]      (DoRA only)
//! ```
//!
//! The scale of a module is `lora_alpha / r` (`lora_alpha / sqrt(r)` with
//! `use_rslora`), with `rank_pattern` / `alpha_pattern` overrides matched as peft
//! matches them: a pattern key `p` applies to module `m` when `m == p` or `m` ends with
//! `"." + p` (plain names only; regular-expression keys are refused).
//!
//! What this crate cannot reproduce is an error naming the field or tensor: another
//! `peft_type`, `fan_in_fan_out`, trained biases (`bias` other than `"none"`,
//! `lora_bias`), `modules_to_save`, embedding or convolution adapters, and the other
//! variants' options (`use_qalora`, `use_bdlora`, aLoRA, layer replication, trainable
//! tokens, target parameters, Megatron). Fields this module does not know are ignored.
//!
//! ```no_run
//! use lora_kernels::peft::Adapter;
//! # fn main() -> lora_kernels::Result<()> {
//! let adapter = Adapter::<f32>::load_dir("my_adapter".as_ref())?;
//! for m in &adapter.modules {
//!     println!("{}: r = {}, scale = {}, dora = {}", m.name, m.rank, m.scale, m.magnitude.is_some());
//! }
//! adapter.save_dir("copy_of_my_adapter".as_ref())?;
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde_json::{json, Value};

use crate::{DType, Element, Error, Result};

/// The file names peft uses.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The file names peft uses.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix of every tensor key in a saved peft adapter.
pub const KEY_PREFIX: &str = "base_model.model.";

fn ckpt(msg: impl Into<String>) -> Error {
    Error::Checkpoint(msg.into())
}

/// Which modules an adapter targets, as in `LoraConfig.target_modules`.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Module names (or name suffixes).
    List(Vec<String>),
    /// One regular expression matched against the full module name (kept as text).
    Regex(String),
}

/// The parts of peft's `LoraConfig` that decide what an adapter computes.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// Default rank `r`.
    pub r: usize,
    /// `lora_alpha`.
    pub lora_alpha: f32,
    /// rsLoRA: scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// DoRA: the modules carry a magnitude vector.
    pub use_dora: bool,
    /// `lora_dropout` (used in training only).
    pub lora_dropout: f32,
    /// `target_modules`.
    pub target_modules: TargetModules,
    /// Per-module ranks (`rank_pattern`).
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas (`alpha_pattern`).
    pub alpha_pattern: BTreeMap<String, f32>,
    /// `base_model_name_or_path`, if any.
    pub base_model_name_or_path: Option<String>,
}

/// `true` when pattern key `pattern` applies to module `name` (exact name, or a suffix
/// after a dot).
fn pattern_matches(pattern: &str, name: &str) -> bool {
    name == pattern
        || name
            .strip_suffix(pattern)
            .is_some_and(|head| head.ends_with('.'))
}

fn check_plain_pattern(field: &str, key: &str) -> Result<()> {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-');
    if plain {
        Ok(())
    } else {
        Err(ckpt(format!(
            "adapter_config.{field}: key `{key}` is a regular expression; only plain module \
             names are supported"
        )))
    }
}

impl AdapterConfig {
    /// A plain LoRA config: rank `r`, `lora_alpha`, the listed target modules.
    pub fn lora(r: usize, lora_alpha: f32, target_modules: &[&str]) -> Self {
        AdapterConfig {
            r,
            lora_alpha,
            use_rslora: false,
            use_dora: false,
            lora_dropout: 0.0,
            target_modules: TargetModules::List(
                target_modules.iter().map(|s| s.to_string()).collect(),
            ),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            base_model_name_or_path: None,
        }
    }

    /// The rank of module `name` (`rank_pattern`, else `r`).
    pub fn rank_for(&self, name: &str) -> usize {
        self.rank_pattern
            .iter()
            .find(|(p, _)| pattern_matches(p, name))
            .map_or(self.r, |(_, &r)| r)
    }

    /// The alpha of module `name` (`alpha_pattern`, else `lora_alpha`).
    pub fn alpha_for(&self, name: &str) -> f32 {
        self.alpha_pattern
            .iter()
            .find(|(p, _)| pattern_matches(p, name))
            .map_or(self.lora_alpha, |(_, &a)| a)
    }

    /// The scale peft applies to module `name`: `alpha / r`, or `alpha / sqrt(r)` with
    /// rsLoRA.
    pub fn scale_for(&self, name: &str) -> f32 {
        let (alpha, r) = (self.alpha_for(name), self.rank_for(name));
        if self.use_rslora {
            crate::lora::rslora_scale(alpha, r)
        } else {
            crate::lora::scale(alpha, r)
        }
    }

    /// Parses `adapter_config.json`. Errors name the field that is missing, malformed
    /// or asks for something this crate does not compute.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| ckpt(format!("adapter_config.json: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| ckpt("adapter_config.json is not a JSON object"))?;
        let get = |f: &str| obj.get(f).filter(|v| !v.is_null());
        let field_err = |f: &str, why: &str| ckpt(format!("adapter_config.{f}: {why}"));
        let bool_field = |f: &str| -> Result<bool> {
            match get(f) {
                None => Ok(false),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| field_err(f, "expected true or false")),
            }
        };
        let peft_type = get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(field_err(
                "peft_type",
                &format!("`{peft_type}` is not supported (only LORA, incl. rsLoRA and DoRA)"),
            ));
        }
        let r = get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| field_err("r", "missing or not a positive integer"))?
            as usize;
        if r == 0 {
            return Err(field_err("r", "rank 0"));
        }
        let lora_alpha = get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| field_err("lora_alpha", "missing or not a number"))?
            as f32;
        let lora_dropout = match get("lora_dropout") {
            None => 0.0,
            Some(v) => v
                .as_f64()
                .filter(|p| (0.0..1.0).contains(p))
                .ok_or_else(|| field_err("lora_dropout", "not a number in [0, 1)"))?
                as f32,
        };
        // What the crate does not compute: refuse, naming the field.
        for f in ["fan_in_fan_out", "lora_bias", "use_qalora"] {
            if bool_field(f)? {
                return Err(field_err(f, "true is not supported"));
            }
        }
        if let Some(b) = get("bias") {
            if b.as_str() != Some("none") {
                return Err(field_err(
                    "bias",
                    &format!("{b} is not supported (only \"none\": biases are not trained)"),
                ));
            }
        }
        let empty = |v: &Value| {
            v.as_array().is_some_and(|a| a.is_empty())
                || v.as_object().is_some_and(|o| o.is_empty())
                || v.as_bool() == Some(false)
        };
        for f in [
            "modules_to_save",
            "layer_replication",
            "alora_invocation_tokens",
            "trainable_token_indices",
            "target_parameters",
            "use_bdlora",
            "megatron_config",
            "arrow_config",
        ] {
            if let Some(v) = get(f) {
                if !empty(v) {
                    return Err(field_err(f, &format!("{v} is not supported")));
                }
            }
        }
        let target_modules = match get("target_modules") {
            None => TargetModules::List(Vec::new()),
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(Value::Array(a)) => TargetModules::List(
                a.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| field_err("target_modules", "holds a non-string"))?,
            ),
            Some(_) => return Err(field_err("target_modules", "not a list or a string")),
        };
        let mut rank_pattern = BTreeMap::new();
        if let Some(p) = get("rank_pattern") {
            let p = p
                .as_object()
                .ok_or_else(|| field_err("rank_pattern", "not an object"))?;
            for (k, v) in p {
                check_plain_pattern("rank_pattern", k)?;
                let rk = v
                    .as_u64()
                    .filter(|&x| x > 0)
                    .ok_or_else(|| field_err("rank_pattern", &format!("`{k}`: {v}")))?;
                rank_pattern.insert(k.clone(), rk as usize);
            }
        }
        let mut alpha_pattern = BTreeMap::new();
        if let Some(p) = get("alpha_pattern") {
            let p = p
                .as_object()
                .ok_or_else(|| field_err("alpha_pattern", "not an object"))?;
            for (k, v) in p {
                check_plain_pattern("alpha_pattern", k)?;
                let a = v
                    .as_f64()
                    .ok_or_else(|| field_err("alpha_pattern", &format!("`{k}`: {v}")))?;
                alpha_pattern.insert(k.clone(), a as f32);
            }
        }
        Ok(AdapterConfig {
            r,
            lora_alpha,
            use_rslora: bool_field("use_rslora")?,
            use_dora: bool_field("use_dora")?,
            lora_dropout,
            target_modules,
            rank_pattern,
            alpha_pattern,
            base_model_name_or_path: get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// `adapter_config.json` as peft 0.21 writes it for this config (every field peft
    /// reads, at peft's defaults where this config has no say).
    pub fn to_json(&self) -> String {
        // f32 values written as their shortest decimal (0.05, not 0.0500000007...).
        let f = |x: f32| x.to_string().parse::<f64>().unwrap_or(x as f64);
        let num = |x: f32| {
            if x.fract() == 0.0 && x.abs() < 1e9 {
                json!(x as i64)
            } else {
                json!(f(x))
            }
        };
        let target = match &self.target_modules {
            TargetModules::List(l) => json!(l),
            TargetModules::Regex(s) => json!(s),
        };
        let alpha_pattern: serde_json::Map<String, Value> = self
            .alpha_pattern
            .iter()
            .map(|(k, &a)| (k.clone(), num(a)))
            .collect();
        let v = json!({
            "alpha_pattern": alpha_pattern,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "loftq_config": {},
            "lora_alpha": num(self.lora_alpha),
            "lora_bias": false,
            "lora_dropout": f(self.lora_dropout),
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": self.rank_pattern,
            "revision": null,
            "target_modules": target,
            "task_type": null,
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
        });
        serde_json::to_string_pretty(&v).expect("a JSON value always serializes")
    }
}

/// One adapted module: `A` [r, K], `B` [N, r] and, for DoRA, the magnitude \[N\], with
/// the scale its config gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterModule<T> {
    /// The module's name in the model (`model.layers.0.mlp.up_proj`), without
    /// [`KEY_PREFIX`].
    pub name: String,
    pub rank: usize,
    /// K.
    pub in_features: usize,
    /// N.
    pub out_features: usize,
    /// `alpha / r` or `alpha / sqrt(r)`.
    pub scale: f32,
    /// `lora_A.weight` [r, K].
    pub a: Vec<T>,
    /// `lora_B.weight` [N, r].
    pub b: Vec<T>,
    /// `lora_magnitude_vector` \[N\] (DoRA), else `None`.
    pub magnitude: Option<Vec<T>>,
}

/// A whole peft adapter: its config and its modules, sorted by name.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter<T> {
    pub config: AdapterConfig,
    pub modules: Vec<AdapterModule<T>>,
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io(format!("{}: {e}", path.display()))
}

fn to_elements<T: Element>(key: &str, t: &TensorView<'_>) -> Result<Vec<T>> {
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| T::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| T::from_f32(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| T::from_f32(half::bf16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
        other => {
            return Err(ckpt(format!(
                "tensor `{key}` is {other:?}; only F32, F16 and BF16 are supported"
            )))
        }
    })
}

fn to_bytes<T: Element>(v: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * T::DTYPE.size());
    for &x in v {
        match T::DTYPE {
            DType::F32 => out.extend_from_slice(&x.to_f32().to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(x.to_f32()).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(x.to_f32()).to_le_bytes()),
        }
    }
    out
}

#[derive(Default)]
struct Parts<T> {
    a: Option<(Vec<usize>, Vec<T>)>,
    b: Option<(Vec<usize>, Vec<T>)>,
    m: Option<(Vec<usize>, Vec<T>)>,
}

impl<T: Element> Adapter<T> {
    /// Loads `dir/adapter_config.json` and `dir/adapter_model.safetensors`, converting
    /// the tensors (F32, F16 or BF16) to `T`.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let cpath = dir.join(CONFIG_FILE);
        let wpath = dir.join(WEIGHTS_FILE);
        let config = std::fs::read_to_string(&cpath).map_err(|e| io_err(&cpath, e))?;
        let weights = std::fs::read(&wpath).map_err(|e| io_err(&wpath, e))?;
        Self::from_bytes(&config, &weights)
    }

    /// Builds an adapter from the text of `adapter_config.json` and the bytes of
    /// `adapter_model.safetensors`. Every tensor must be one this crate computes with;
    /// shapes must agree with each other and with the config's rank.
    pub fn from_bytes(config_json: &str, safetensors: &[u8]) -> Result<Self> {
        let config = AdapterConfig::from_json(config_json)?;
        let st = SafeTensors::deserialize(safetensors)
            .map_err(|e| ckpt(format!("adapter_model.safetensors: {e}")))?;
        let mut parts: BTreeMap<String, Parts<T>> = BTreeMap::new();
        let mut names = st.names();
        names.sort();
        for key in names {
            let t = st.tensor(key).map_err(|e| ckpt(format!("`{key}`: {e}")))?;
            let rest = key.strip_prefix(KEY_PREFIX).ok_or_else(|| {
                ckpt(format!(
                    "tensor `{key}` does not start with `{KEY_PREFIX}` (not a peft adapter key)"
                ))
            })?;
            let (module, which) = [
                (".lora_A.weight", 0),
                (".lora_B.weight", 1),
                (".lora_magnitude_vector", 2),
                (".lora_magnitude_vector.weight", 2),
            ]
            .iter()
            .find_map(|(suffix, w)| rest.strip_suffix(suffix).map(|m| (m, *w)))
            .ok_or_else(|| {
                ckpt(format!(
                    "tensor `{key}` is not supported (only lora_A.weight, lora_B.weight and \
                     lora_magnitude_vector of linear layers)"
                ))
            })?;
            if module.is_empty() {
                return Err(ckpt(format!("tensor `{key}` names no module")));
            }
            let value = (t.shape().to_vec(), to_elements::<T>(key, &t)?);
            let p = parts.entry(module.to_string()).or_default();
            let slot = match which {
                0 => &mut p.a,
                1 => &mut p.b,
                _ => &mut p.m,
            };
            if slot.replace(value).is_some() {
                return Err(ckpt(format!("tensor `{key}` appears twice")));
            }
        }
        if parts.is_empty() {
            return Err(ckpt("adapter_model.safetensors holds no LoRA tensors"));
        }
        let mut modules = Vec::with_capacity(parts.len());
        for (name, p) in parts {
            let key = |s: &str| format!("{KEY_PREFIX}{name}.{s}");
            let (ashape, a) =
                p.a.ok_or_else(|| ckpt(format!("tensor `{}` is missing", key("lora_A.weight"))))?;
            let (bshape, b) =
                p.b.ok_or_else(|| ckpt(format!("tensor `{}` is missing", key("lora_B.weight"))))?;
            let [rank, k] = ashape[..] else {
                return Err(ckpt(format!(
                    "tensor `{}` has shape {ashape:?}; only 2-D (linear) adapters are supported",
                    key("lora_A.weight")
                )));
            };
            let [n, rb] = bshape[..] else {
                return Err(ckpt(format!(
                    "tensor `{}` has shape {bshape:?}; only 2-D (linear) adapters are supported",
                    key("lora_B.weight")
                )));
            };
            if rb != rank || rank == 0 {
                return Err(ckpt(format!(
                    "`{}` is [{n}, {rb}] but `{}` is [{rank}, {k}]: the ranks differ",
                    key("lora_B.weight"),
                    key("lora_A.weight")
                )));
            }
            let want = config.rank_for(&name);
            if rank != want {
                return Err(ckpt(format!(
                    "module `{name}` has rank {rank} but adapter_config gives it r = {want}"
                )));
            }
            let magnitude = match (p.m, config.use_dora) {
                (Some((mshape, m)), true) => {
                    if mshape[..] != [n] {
                        return Err(ckpt(format!(
                            "tensor `{}` has shape {mshape:?}, expected [{n}]",
                            key("lora_magnitude_vector")
                        )));
                    }
                    Some(m)
                }
                (None, true) => {
                    return Err(ckpt(format!(
                        "adapter_config.use_dora is true but `{}` is missing",
                        key("lora_magnitude_vector")
                    )))
                }
                (Some(_), false) => {
                    return Err(ckpt(format!(
                        "`{}` is present but adapter_config.use_dora is false",
                        key("lora_magnitude_vector")
                    )))
                }
                (None, false) => None,
            };
            modules.push(AdapterModule {
                scale: config.scale_for(&name),
                name,
                rank,
                in_features: k,
                out_features: n,
                a,
                b,
                magnitude,
            });
        }
        Ok(Adapter { config, modules })
    }

    /// The module called `name`, if the adapter has one.
    pub fn module(&self, name: &str) -> Option<&AdapterModule<T>> {
        self.modules.iter().find(|m| m.name == name)
    }

    /// Checks every module against the config (rank, magnitude iff DoRA, lengths).
    pub fn validate(&self) -> Result<()> {
        if self.modules.is_empty() {
            return Err(ckpt("the adapter has no modules"));
        }
        for m in &self.modules {
            let want = self.config.rank_for(&m.name);
            if m.rank != want || m.rank == 0 {
                return Err(ckpt(format!(
                    "module `{}` has rank {} but the config gives it r = {want}",
                    m.name, m.rank
                )));
            }
            crate::lora::check_len("a", m.a.len(), m.rank * m.in_features)?;
            crate::lora::check_len("b", m.b.len(), m.out_features * m.rank)?;
            match (&m.magnitude, self.config.use_dora) {
                (Some(mag), true) => {
                    crate::lora::check_len("magnitude", mag.len(), m.out_features)?
                }
                (None, false) => {}
                _ => {
                    return Err(ckpt(format!(
                        "module `{}`: a magnitude must be present exactly when use_dora is true",
                        m.name
                    )))
                }
            }
        }
        Ok(())
    }

    /// `adapter_model.safetensors` for this adapter, tensors in `T`'s dtype.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let dtype = match T::DTYPE {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
        };
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for m in &self.modules {
            let key = |s: &str| format!("{KEY_PREFIX}{}.{s}", m.name);
            tensors.push((
                key("lora_A.weight"),
                vec![m.rank, m.in_features],
                to_bytes(&m.a),
            ));
            tensors.push((
                key("lora_B.weight"),
                vec![m.out_features, m.rank],
                to_bytes(&m.b),
            ));
            if let Some(mag) = &m.magnitude {
                tensors.push((
                    key("lora_magnitude_vector"),
                    vec![m.out_features],
                    to_bytes(mag),
                ));
            }
        }
        let views = tensors
            .iter()
            .map(|(k, shape, data)| {
                TensorView::new(dtype, shape.clone(), data)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| ckpt(format!("`{k}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = Some([("format".to_string(), "pt".to_string())].into());
        safetensors::serialize(views, meta).map_err(|e| ckpt(format!("serialize: {e}")))
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (creating
    /// `dir`), the files `PeftModel.from_pretrained(model, dir)` loads.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        let weights = self.to_safetensors()?;
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let cpath = dir.join(CONFIG_FILE);
        std::fs::write(&cpath, self.config.to_json()).map_err(|e| io_err(&cpath, e))?;
        let wpath = dir.join(WEIGHTS_FILE);
        std::fs::write(&wpath, weights).map_err(|e| io_err(&wpath, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_peft() {
        assert!(pattern_matches("q_proj", "model.layers.0.q_proj"));
        assert!(pattern_matches("layers.0.q_proj", "model.layers.0.q_proj"));
        assert!(pattern_matches("q_proj", "q_proj"));
        assert!(!pattern_matches("proj", "model.layers.0.q_proj"));
        assert!(!pattern_matches("q_proj", "model.layers.0.q_proj2"));
    }
}
