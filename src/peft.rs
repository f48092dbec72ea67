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
//! `"." + p` (plain names only; regular-expression keys are refused, and so is a module
//! that two keys with different values match, since peft takes the first in file
//! order).
//!
//! ## `adapter_config.json`
//! Every key peft 0.21 writes ([`PEFT_KEYS`]) is in one of four classes.
//! - The fields of [`AdapterConfig`]: `peft_type` (required, and `"LORA"`: peft reads
//!   it to pick the config class), `r` (an integer ≥ 1), `lora_alpha` (finite and > 0
//!   as an f32), `lora_dropout` (in [0, 1)), `use_rslora`, `use_dora`, `target_modules`
//!   (required), `rank_pattern`, `alpha_pattern`, `base_model_name_or_path`.
//! - Keys that do not change what a trained adapter computes, kept as read in
//!   [`AdapterConfig::other`] when they differ from peft's default and written back:
//!   `task_type`, `peft_version`, `auto_mapping`, `revision`, `inference_mode`,
//!   `megatron_core`, `qalora_group_size`, `ensure_weight_tying`, the initialisation
//!   configs (`loftq_config`, `eva_config`, `corda_config`, `lora_ga_config`: peft
//!   ignores them unless `init_lora_weights` names their method), `exclude_modules`
//!   (a list is checked: no module may be excluded), and `init_lora_weights` when it is
//!   `true`, `false`, `"gaussian"`, `"orthogonal"` or `"eva"` (these only choose the
//!   initial A and B, which the saved tensors replace; the base weights stay as they
//!   are).
//! - Keys whose non-default value changes the math: an [`Error::Checkpoint`] naming the
//!   key and the value. `init_lora_weights` `"pissa"`, `"pissa_niter_*"`, `"olora"`,
//!   `"corda"`, `"loftq"`, `"lora_ga"` (they rewrite the base weights, so the adapter
//!   belongs to a modified base model), `"mica"` and any other method; `bias` other
//!   than `"none"`; `fan_in_fan_out`, `lora_bias`, `use_qalora` true; a non-empty
//!   `modules_to_save`, `layers_to_transform`, `layers_pattern`, `layer_replication`,
//!   `trainable_token_indices`, `target_parameters`, `alora_invocation_tokens`,
//!   `megatron_config`, `use_bdlora`, `arrow_config`, `kasa_config`, `velora_config`,
//!   `monteclora_config` (empty means `null`, `false`, `[]` or `{}`).
//! - Keys peft 0.21 does not write (a newer peft's, or a typo): not an error but a
//!   warning. They are kept with their values in [`AdapterConfig::unknown_keys`],
//!   written back by [`AdapterConfig::to_json`] (peft 0.21 ignores unknown keys with a
//!   warning of its own), and [`AdapterConfig::warnings`] gives one line per key. The
//!   crate prints nothing itself: show `warnings()` to the user.
//!
//! ## Tensors
//! Every tensor must be a `lora_A.weight`, `lora_B.weight` or `lora_magnitude_vector` of
//! a linear module, in F32, F16 or BF16, with every dimension ≥ 1, ranks that agree with
//! each other and with the config, a magnitude exactly when `use_dora`, and a module
//! name that `target_modules` matches (when it is a list) and `exclude_modules` does
//! not; anything else is an [`Error::Checkpoint`] naming the tensor or module. No bytes
//! make the loader panic.
//!
//! ## Saving
//! [`Adapter::save_dir`], [`Adapter::to_safetensors`] and [`AdapterConfig::try_to_json`]
//! check everything first ([`Adapter::validate`]) and write only what
//! [`Adapter::load_dir`] accepts, with every key of [`PEFT_KEYS`]; loading what they
//! write gives the same [`Adapter`] back (modules sorted by name).
//!
//! ```no_run
//! use lora_kernels::peft::Adapter;
//! # fn main() -> lora_kernels::Result<()> {
//! let adapter = Adapter::<f32>::load_dir("my_adapter".as_ref())?;
//! for w in adapter.config.warnings() {
//!     eprintln!("warning: {w}");
//! }
//! for m in &adapter.modules {
//!     println!("{}: r = {}, scale = {}, dora = {}", m.name, m.rank, m.scale, m.magnitude.is_some());
//! }
//! adapter.save_dir("copy_of_my_adapter".as_ref())?;
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet};
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
/// The peft release whose `adapter_config.json` this module writes; the value of
/// `peft_version` unless the config carries another.
pub const PEFT_VERSION: &str = "0.21.0";

/// Every key of `adapter_config.json` as peft 0.21 writes it for a LoRA adapter
/// (`LoraConfig.to_dict()`), sorted. [`AdapterConfig::to_json`] writes all of them.
pub const PEFT_KEYS: [&str; 41] = [
    "alora_invocation_tokens",
    "alpha_pattern",
    "arrow_config",
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "corda_config",
    "ensure_weight_tying",
    "eva_config",
    "exclude_modules",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "kasa_config",
    "layer_replication",
    "layers_pattern",
    "layers_to_transform",
    "loftq_config",
    "lora_alpha",
    "lora_bias",
    "lora_dropout",
    "lora_ga_config",
    "megatron_config",
    "megatron_core",
    "modules_to_save",
    "monteclora_config",
    "peft_type",
    "peft_version",
    "qalora_group_size",
    "r",
    "rank_pattern",
    "revision",
    "target_modules",
    "target_parameters",
    "task_type",
    "trainable_token_indices",
    "use_bdlora",
    "use_dora",
    "use_qalora",
    "use_rslora",
    "velora_config",
];

fn ckpt(msg: impl Into<String>) -> Error {
    Error::Checkpoint(msg.into())
}

fn field_err(field: &str, why: &str) -> Error {
    ckpt(format!("adapter_config.{field}: {why}"))
}

/// How a key of [`PEFT_KEYS`] is handled.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// A field of [`AdapterConfig`].
    Field,
    /// Does not change what a trained adapter computes; any value is kept.
    Inert,
    /// `init_lora_weights`.
    Init,
    /// `exclude_modules`: `null`, a regular expression or a list of names.
    Exclude,
    /// `bias`: `"none"` only.
    Bias,
    /// A flag whose `true` changes the math; the reason.
    Flag(&'static str),
    /// An option whose non-empty value changes the math; the reason.
    Off(&'static str),
}

/// The rule of a key of [`PEFT_KEYS`]; `None` for any other key.
fn rule(key: &str) -> Option<Rule> {
    use Rule::*;
    Some(match key {
        "alpha_pattern"
        | "base_model_name_or_path"
        | "lora_alpha"
        | "lora_dropout"
        | "peft_type"
        | "r"
        | "rank_pattern"
        | "target_modules"
        | "use_dora"
        | "use_rslora" => Field,
        "auto_mapping"
        | "corda_config"
        | "ensure_weight_tying"
        | "eva_config"
        | "inference_mode"
        | "loftq_config"
        | "lora_ga_config"
        | "megatron_core"
        | "peft_version"
        | "qalora_group_size"
        | "revision"
        | "task_type" => Inert,
        "init_lora_weights" => Init,
        "exclude_modules" => Exclude,
        "bias" => Bias,
        "fan_in_fan_out" => Flag("the base weight would be stored transposed (Conv1D)"),
        "lora_bias" => Flag("lora_B would carry a trained bias"),
        "use_qalora" => Flag("QALoRA pools the input in groups before lora_A"),
        "alora_invocation_tokens" => {
            Off("Activated LoRA applies the adapter only after the invocation tokens")
        }
        "arrow_config" => Off("Arrow routes between several adapters"),
        "kasa_config" => Off("KaSA truncates the base weight and adds a trained diagonal"),
        "layer_replication" => Off("layer replication changes the base model's layers"),
        "layers_pattern" | "layers_to_transform" => {
            Off("restricting adapters to some layer indices is not supported")
        }
        "megatron_config" => Off("Megatron parallel layers are not supported"),
        "modules_to_save" => Off("these modules would be trained and saved in full"),
        "monteclora_config" => Off("MonteCLoRA samples the adapter"),
        "target_parameters" => Off("adapters on parameters (not modules) are not supported"),
        "trainable_token_indices" => Off("embedding rows would be trained"),
        "use_bdlora" => Off("block-diagonal LoRA is not supported"),
        "velora_config" => Off("VeLoRA replaces the backward pass"),
        _ => return None,
    })
}

/// What peft 0.21 writes for a key that is not a field of [`AdapterConfig`], by default.
fn default_value(key: &str) -> Value {
    match key {
        "bias" => json!("none"),
        "ensure_weight_tying" | "fan_in_fan_out" | "lora_bias" | "use_qalora" => json!(false),
        "inference_mode" | "init_lora_weights" => json!(true),
        "loftq_config" => json!({}),
        "megatron_core" => json!("megatron.core"),
        "peft_version" => json!(PEFT_VERSION),
        "qalora_group_size" => json!(16),
        _ => Value::Null,
    }
}

/// `null`, `false`, `[]` or `{}`: an option left off.
fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Checks the value of a key of [`PEFT_KEYS`] that is not a field of [`AdapterConfig`].
fn check_option(key: &str, v: &Value) -> Result<()> {
    let Some(rule) = rule(key) else {
        return Err(field_err(key, "is not a key of peft 0.21's LoraConfig"));
    };
    match rule {
        Rule::Field => Err(field_err(
            key,
            "is a field of AdapterConfig, not an entry of `other`",
        )),
        Rule::Inert => Ok(()),
        Rule::Init => match v {
            Value::Null | Value::Bool(_) => Ok(()),
            Value::String(s) if matches!(s.as_str(), "gaussian" | "orthogonal" | "eva") => Ok(()),
            Value::String(s) => {
                let why = if s.starts_with("pissa")
                    || matches!(s.as_str(), "olora" | "corda" | "loftq" | "lora_ga")
                {
                    "this initialisation rewrites the base weights, so the adapter applies to \
                     a modified base model, not the original one"
                } else if s == "mica" {
                    "MiCA is a LoRA variant this crate does not implement"
                } else {
                    "an initialisation this crate does not know"
                };
                Err(field_err(key, &format!("{v} is not supported: {why}")))
            }
            _ => Err(field_err(
                key,
                &format!("{v} is not supported (expected true, false or a method name)"),
            )),
        },
        Rule::Exclude => match v {
            Value::Null | Value::String(_) => Ok(()),
            Value::Array(a) if a.iter().all(Value::is_string) => Ok(()),
            _ => Err(field_err(
                key,
                &format!("{v} is not a list of names or a string"),
            )),
        },
        // peft raises on any other value, `null` included.
        Rule::Bias => match v {
            Value::String(s) if s == "none" => Ok(()),
            _ => Err(field_err(
                key,
                &format!("{v} is not supported (only \"none\": biases are not trained)"),
            )),
        },
        Rule::Flag(why) => match v {
            Value::Null | Value::Bool(false) => Ok(()),
            Value::Bool(true) => Err(field_err(key, &format!("true is not supported: {why}"))),
            _ => Err(field_err(key, &format!("{v}: expected true or false"))),
        },
        Rule::Off(why) => {
            if is_off(v) {
                Ok(())
            } else {
                Err(field_err(key, &format!("{v} is not supported: {why}")))
            }
        }
    }
}

/// Which modules an adapter targets, as in `LoraConfig.target_modules`.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Module names (or name suffixes). Every module of an [`Adapter`] must match one
    /// (peft would not load its tensors otherwise).
    List(Vec<String>),
    /// One regular expression matched against the full module name (kept as text, not
    /// checked against the modules).
    Regex(String),
}

/// peft's `LoraConfig`: the fields that decide what an adapter computes, the other keys
/// peft 0.21 writes that were read with non-default values, and unknown keys.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// Default rank `r` (≥ 1).
    pub r: usize,
    /// `lora_alpha` (finite and > 0).
    pub lora_alpha: f32,
    /// rsLoRA: scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// DoRA: the modules carry a magnitude vector.
    pub use_dora: bool,
    /// `lora_dropout` (used in training only), in [0, 1).
    pub lora_dropout: f32,
    /// `target_modules`.
    pub target_modules: TargetModules,
    /// Per-module ranks (`rank_pattern`).
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas (`alpha_pattern`).
    pub alpha_pattern: BTreeMap<String, f32>,
    /// `base_model_name_or_path`, if any.
    pub base_model_name_or_path: Option<String>,
    /// The other keys of [`PEFT_KEYS`] that were read with a value other than peft's
    /// default (`task_type`, `peft_version`, `auto_mapping`, `init_lora_weights`
    /// `"gaussian"`, ...; see the [module docs](self)). [`AdapterConfig::to_json`]
    /// writes these values in place of the defaults, so a loaded config round-trips.
    /// An entry whose value changes the math (`"fan_in_fan_out": true`) or whose key is
    /// a field above or not in [`PEFT_KEYS`] makes [`AdapterConfig::validate`] fail.
    /// Entries equal to peft's default are dropped on loading.
    pub other: BTreeMap<String, Value>,
    /// Keys that are not in [`PEFT_KEYS`] (written by a newer peft, or misspelt), with
    /// their values: a warning, not an error ([`AdapterConfig::warnings`]). They are
    /// written back by [`AdapterConfig::to_json`]. A key of [`PEFT_KEYS`] here makes
    /// [`AdapterConfig::validate`] fail.
    pub unknown_keys: BTreeMap<String, Value>,
}

/// `true` when pattern key `pattern` applies to module `name` (exact name, or a suffix
/// after a dot), as peft matches `target_modules`, `exclude_modules` and pattern keys.
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
        Err(field_err(
            field,
            &format!("key `{key}` is a regular expression; only plain module names are supported"),
        ))
    }
}

/// `alpha` as peft needs it: finite and > 0.
fn check_alpha(field: &str, what: &str, alpha: f32) -> Result<()> {
    if alpha.is_finite() && alpha > 0.0 {
        Ok(())
    } else {
        Err(field_err(
            field,
            &format!("{what}{alpha} is not supported (must be finite and > 0 as an f32)"),
        ))
    }
}

/// A number of JSON as f32, for `lora_alpha` and `alpha_pattern`.
fn alpha_value(field: &str, what: &str, v: &Value) -> Result<f32> {
    let a = v
        .as_f64()
        .ok_or_else(|| field_err(field, &format!("{what}{v} is not a number")))?;
    let a32 = a as f32;
    if a32.is_finite() && a32 > 0.0 {
        Ok(a32)
    } else {
        Err(field_err(
            field,
            &format!("{what}{v} is not supported (must be finite and > 0 as an f32; it is {a32})"),
        ))
    }
}

/// A positive integer of JSON, for `r` and `rank_pattern`.
fn rank_value(field: &str, what: &str, v: &Value) -> Result<usize> {
    v.as_u64()
        .filter(|&x| x > 0)
        .and_then(|x| usize::try_from(x).ok())
        .ok_or_else(|| field_err(field, &format!("{what}{v} is not an integer >= 1")))
}

impl AdapterConfig {
    /// A plain LoRA config: rank `r`, `lora_alpha`, the listed target modules, every
    /// other key at peft's default.
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
            other: BTreeMap::new(),
            unknown_keys: BTreeMap::new(),
        }
    }

    /// One line per key of [`AdapterConfig::unknown_keys`]: a key peft 0.21 does not
    /// write, kept (and written back) but not understood by this crate, so whatever it
    /// asks for is not applied. Empty when every key is known.
    pub fn warnings(&self) -> Vec<String> {
        self.unknown_keys
            .iter()
            .map(|(k, v)| {
                format!(
                    "adapter_config.{k} = {v}: not a key of peft {PEFT_VERSION}'s LoraConfig; \
                     kept but not applied"
                )
            })
            .collect()
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

    /// Checks every field as [`AdapterConfig::from_json`] does: `r` ≥ 1, `lora_alpha`
    /// finite and > 0, `lora_dropout` in [0, 1), plain pattern keys with ranks ≥ 1 and
    /// alphas finite and > 0, a non-empty `target_modules`, the entries of
    /// [`AdapterConfig::other`] (keys of [`PEFT_KEYS`] that are not fields, values that
    /// do not change the math) and [`AdapterConfig::unknown_keys`] (none of
    /// [`PEFT_KEYS`]). An [`Error::Checkpoint`] naming the field otherwise.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(field_err("r", "0 is not an integer >= 1"));
        }
        check_alpha("lora_alpha", "", self.lora_alpha)?;
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(field_err(
                "lora_dropout",
                &format!("{} is not a number in [0, 1)", self.lora_dropout),
            ));
        }
        match &self.target_modules {
            TargetModules::List(l) => {
                if l.is_empty() {
                    return Err(field_err(
                        "target_modules",
                        "is empty: peft would adapt no module",
                    ));
                }
                if l.iter().any(String::is_empty) {
                    return Err(field_err("target_modules", "holds an empty name"));
                }
            }
            TargetModules::Regex(s) => {
                if s.is_empty() {
                    return Err(field_err("target_modules", "is an empty string"));
                }
            }
        }
        for (k, &r) in &self.rank_pattern {
            check_plain_pattern("rank_pattern", k)?;
            if r == 0 {
                return Err(field_err(
                    "rank_pattern",
                    &format!("`{k}`: 0 is not an integer >= 1"),
                ));
            }
        }
        for (k, &a) in &self.alpha_pattern {
            check_plain_pattern("alpha_pattern", k)?;
            check_alpha("alpha_pattern", &format!("`{k}`: "), a)?;
        }
        for (k, v) in &self.other {
            check_option(k, v)?;
        }
        if let Some(k) = self.unknown_keys.keys().find(|k| rule(k).is_some()) {
            return Err(field_err(
                k,
                "is a key of peft 0.21's LoraConfig, not an unknown key",
            ));
        }
        Ok(())
    }

    /// Parses `adapter_config.json`. Errors ([`Error::Checkpoint`]) name the field that
    /// is missing, malformed or asks for something this crate does not compute (see the
    /// [module docs](self)); keys outside [`PEFT_KEYS`] are kept in
    /// [`AdapterConfig::unknown_keys`] and reported by [`AdapterConfig::warnings`].
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| ckpt(format!("adapter_config.json: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| ckpt("adapter_config.json is not a JSON object"))?;
        let get = |f: &str| obj.get(f).filter(|v| !v.is_null());
        let bool_field = |f: &str| -> Result<bool> {
            match get(f) {
                None => Ok(false),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| field_err(f, &format!("{v}: expected true or false"))),
            }
        };
        match get("peft_type") {
            None => {
                return Err(field_err(
                    "peft_type",
                    "missing (peft reads it to pick the config class; a LoRA adapter has \
                     \"LORA\")",
                ))
            }
            Some(Value::String(s)) if s == "LORA" => {}
            Some(t) => {
                return Err(field_err(
                    "peft_type",
                    &format!("{t} is not supported (only \"LORA\", incl. rsLoRA and DoRA)"),
                ))
            }
        }
        let r = rank_value(
            "r",
            "",
            get("r").ok_or_else(|| field_err("r", "missing (the default rank)"))?,
        )?;
        let lora_alpha = alpha_value(
            "lora_alpha",
            "",
            get("lora_alpha").ok_or_else(|| field_err("lora_alpha", "missing"))?,
        )?;
        let lora_dropout = match get("lora_dropout") {
            None => 0.0,
            Some(v) => v
                .as_f64()
                .map(|p| p as f32)
                .filter(|p| (0.0..1.0).contains(p))
                .ok_or_else(|| {
                    field_err("lora_dropout", &format!("{v} is not a number in [0, 1)"))
                })?,
        };
        let target_modules = match get("target_modules") {
            None => {
                return Err(field_err(
                    "target_modules",
                    "missing (peft needs it to know which modules to adapt)",
                ))
            }
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(Value::Array(a)) => TargetModules::List(
                a.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| field_err("target_modules", "holds a non-string"))?,
            ),
            Some(v) => {
                return Err(field_err(
                    "target_modules",
                    &format!("{v} is not a list or a string"),
                ))
            }
        };
        let pattern = |f: &str| -> Result<Vec<(&String, &Value)>> {
            match get(f) {
                None => Ok(Vec::new()),
                Some(Value::Object(p)) => p
                    .iter()
                    .map(|(k, v)| check_plain_pattern(f, k).map(|()| (k, v)))
                    .collect(),
                Some(v) => Err(field_err(f, &format!("{v} is not an object"))),
            }
        };
        let mut rank_pattern = BTreeMap::new();
        for (k, v) in pattern("rank_pattern")? {
            rank_pattern.insert(
                k.clone(),
                rank_value("rank_pattern", &format!("`{k}`: "), v)?,
            );
        }
        let mut alpha_pattern = BTreeMap::new();
        for (k, v) in pattern("alpha_pattern")? {
            alpha_pattern.insert(
                k.clone(),
                alpha_value("alpha_pattern", &format!("`{k}`: "), v)?,
            );
        }
        let base_model_name_or_path = match get("base_model_name_or_path") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                return Err(field_err(
                    "base_model_name_or_path",
                    &format!("{v} is not a string"),
                ))
            }
        };
        let mut other = BTreeMap::new();
        let mut unknown_keys = BTreeMap::new();
        for (k, v) in obj {
            match rule(k) {
                Some(Rule::Field) => {}
                Some(_) => {
                    check_option(k, v)?;
                    if *v != default_value(k) {
                        other.insert(k.clone(), v.clone());
                    }
                }
                None => {
                    unknown_keys.insert(k.clone(), v.clone());
                }
            }
        }
        let config = AdapterConfig {
            r,
            lora_alpha,
            use_rslora: bool_field("use_rslora")?,
            use_dora: bool_field("use_dora")?,
            lora_dropout,
            target_modules,
            rank_pattern,
            alpha_pattern,
            base_model_name_or_path,
            other,
            unknown_keys,
        };
        config.validate()?;
        Ok(config)
    }

    /// [`AdapterConfig::try_to_json`] without the check: `adapter_config.json` for this
    /// config as it is. For a config that fails [`AdapterConfig::validate`] the text is
    /// one [`AdapterConfig::from_json`] refuses (a NaN alpha is written as `null`, for
    /// instance); [`Adapter::save_dir`] never writes it.
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
        let mut out: BTreeMap<String, Value> = BTreeMap::new();
        for key in PEFT_KEYS {
            let v = match key {
                "alpha_pattern" => Value::Object(
                    self.alpha_pattern
                        .iter()
                        .map(|(k, &a)| (k.clone(), num(a)))
                        .collect(),
                ),
                "base_model_name_or_path" => json!(self.base_model_name_or_path),
                "lora_alpha" => num(self.lora_alpha),
                "lora_dropout" => json!(f(self.lora_dropout)),
                "peft_type" => json!("LORA"),
                "r" => json!(self.r),
                "rank_pattern" => json!(self.rank_pattern),
                "target_modules" => match &self.target_modules {
                    TargetModules::List(l) => json!(l),
                    TargetModules::Regex(s) => json!(s),
                },
                "use_dora" => json!(self.use_dora),
                "use_rslora" => json!(self.use_rslora),
                _ => self
                    .other
                    .get(key)
                    .cloned()
                    .unwrap_or_else(|| default_value(key)),
            };
            out.insert(key.to_string(), v);
        }
        for (k, v) in &self.unknown_keys {
            out.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let v = Value::Object(out.into_iter().collect());
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    /// `adapter_config.json` as peft 0.21 writes it for this config: every key of
    /// [`PEFT_KEYS`] (the values of [`AdapterConfig::other`], else peft's defaults) and
    /// the [`AdapterConfig::unknown_keys`]. Checks the config first
    /// ([`AdapterConfig::validate`]), so [`AdapterConfig::from_json`] accepts the text
    /// and gives this config back.
    pub fn try_to_json(&self) -> Result<String> {
        self.validate()?;
        Ok(self.to_json())
    }
}

/// One adapted module: `A` [r, K], `B` [N, r] and, for DoRA, the magnitude \[N\], with
/// the scale its config gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterModule<T> {
    /// The module's name in the model (`model.layers.0.mlp.up_proj`), without
    /// [`KEY_PREFIX`].
    pub name: String,
    /// r (≥ 1).
    pub rank: usize,
    /// K (≥ 1).
    pub in_features: usize,
    /// N (≥ 1).
    pub out_features: usize,
    /// `alpha / r` or `alpha / sqrt(r)`: must equal [`AdapterConfig::scale_for`] (the
    /// files store only the config).
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

/// Which tensor of a module a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    A,
    B,
    Magnitude,
}

/// The tensor-name suffixes this module reads, first match wins.
const SUFFIXES: [(&str, Part); 4] = [
    (".lora_A.weight", Part::A),
    (".lora_B.weight", Part::B),
    (".lora_magnitude_vector", Part::Magnitude),
    (".lora_magnitude_vector.weight", Part::Magnitude),
];

/// Splits a key (after [`KEY_PREFIX`]) into its module name and part.
fn split_key(rest: &str) -> Option<(&str, Part)> {
    SUFFIXES
        .iter()
        .find_map(|(suffix, w)| rest.strip_suffix(suffix).map(|m| (m, *w)))
}

/// The key a module's part is saved under.
fn key_of(name: &str, part: Part) -> String {
    let s = match part {
        Part::A => "lora_A.weight",
        Part::B => "lora_B.weight",
        Part::Magnitude => "lora_magnitude_vector",
    };
    format!("{KEY_PREFIX}{name}.{s}")
}

/// The product of `shape` times `size`, `None` on overflow.
fn byte_len(shape: &[usize], size: usize) -> Option<usize> {
    shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d))
}

fn to_elements<T: Element>(key: &str, t: &TensorView<'_>) -> Result<Vec<T>> {
    let size = match t.dtype() {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => {
            return Err(ckpt(format!(
                "tensor `{key}` is {other:?}; only F32, F16 and BF16 are supported"
            )))
        }
    };
    let d = t.data();
    if byte_len(t.shape(), size) != Some(d.len()) {
        return Err(ckpt(format!(
            "tensor `{key}` has {} bytes, which does not match its shape {:?} and dtype {:?}",
            d.len(),
            t.shape(),
            t.dtype()
        )));
    }
    Ok(match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| T::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| T::from_f32(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
        _ => d
            .chunks_exact(2)
            .map(|c| T::from_f32(half::bf16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
    })
}

fn to_bytes<T: Element>(v: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len().saturating_mul(T::DTYPE.size()));
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

/// Checks a module's name: one [`Adapter::load_dir`] reads back from the keys it is
/// saved under, matched by `target_modules` (a list) and not by `exclude_modules`.
fn check_module_name(config: &AdapterConfig, name: &str) -> Result<()> {
    let parts = [Part::A, Part::B, Part::Magnitude];
    let reads_back = !name.is_empty()
        && parts.iter().all(|&p| {
            key_of(name, p).strip_prefix(KEY_PREFIX).and_then(split_key) == Some((name, p))
        });
    if !reads_back {
        return Err(ckpt(format!(
            "module name `{name}` cannot be saved: its tensor keys would not read back as it"
        )));
    }
    if let TargetModules::List(targets) = &config.target_modules {
        if !targets.iter().any(|t| pattern_matches(t, name)) {
            return Err(ckpt(format!(
                "module `{name}` is not matched by adapter_config.target_modules {targets:?}: \
                 peft would not load its tensors"
            )));
        }
    }
    if let Some(Value::Array(excluded)) = config.other.get("exclude_modules") {
        if let Some(e) = excluded
            .iter()
            .filter_map(Value::as_str)
            .find(|e| pattern_matches(e, name))
        {
            return Err(ckpt(format!(
                "module `{name}` is excluded by adapter_config.exclude_modules (`{e}`): peft \
                 would not load its tensors"
            )));
        }
    }
    // peft takes the first matching pattern key in file order, which a BTreeMap does not
    // keep: refuse a module that keys with different values match.
    fn ambiguous<V: PartialEq + std::fmt::Debug>(
        field: &str,
        pattern: &BTreeMap<String, V>,
        name: &str,
    ) -> Result<()> {
        let mut hits = pattern.iter().filter(|(p, _)| pattern_matches(p, name));
        if let Some((k0, v0)) = hits.next() {
            if let Some((k1, v1)) = hits.find(|(_, v)| *v != v0) {
                return Err(field_err(
                    field,
                    &format!(
                        "keys `{k0}` ({v0:?}) and `{k1}` ({v1:?}) both match module `{name}`; \
                         peft would pick the first in file order"
                    ),
                ));
            }
        }
        Ok(())
    }
    ambiguous("rank_pattern", &config.rank_pattern, name)?;
    ambiguous("alpha_pattern", &config.alpha_pattern, name)
}

impl<T: Element> Adapter<T> {
    /// Loads `dir/adapter_config.json` and `dir/adapter_model.safetensors`, converting
    /// the tensors (F32, F16 or BF16) to `T`. See [`Adapter::from_bytes`].
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let cpath = dir.join(CONFIG_FILE);
        let wpath = dir.join(WEIGHTS_FILE);
        let config = std::fs::read_to_string(&cpath).map_err(|e| io_err(&cpath, e))?;
        let weights = std::fs::read(&wpath).map_err(|e| io_err(&wpath, e))?;
        Self::from_bytes(&config, &weights)
    }

    /// Builds an adapter from the text of `adapter_config.json` and the bytes of
    /// `adapter_model.safetensors`. The config is read by [`AdapterConfig::from_json`];
    /// every tensor must be one this crate computes with, every dimension ≥ 1, shapes
    /// must agree with each other and with the config's rank, and the result must pass
    /// [`Adapter::validate`]. Any other input, including truncated or corrupt bytes, is
    /// an [`Error::Checkpoint`] naming the field, tensor or module.
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
            let (module, which) = split_key(rest).ok_or_else(|| {
                ckpt(format!(
                    "tensor `{key}` is not supported (only lora_A.weight, lora_B.weight and \
                     lora_magnitude_vector of linear layers)"
                ))
            })?;
            if module.is_empty() {
                return Err(ckpt(format!("tensor `{key}` names no module")));
            }
            if let Some(z) = t.shape().iter().position(|&d| d == 0) {
                return Err(ckpt(format!(
                    "tensor `{key}` has shape {:?}: dimension {z} is 0 (every dimension must \
                     be >= 1)",
                    t.shape()
                )));
            }
            let value = (t.shape().to_vec(), to_elements::<T>(key, &t)?);
            let p = parts.entry(module.to_string()).or_default();
            let slot = match which {
                Part::A => &mut p.a,
                Part::B => &mut p.b,
                Part::Magnitude => &mut p.m,
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
            let key = |part| key_of(&name, part);
            let (ashape, a) =
                p.a.ok_or_else(|| ckpt(format!("tensor `{}` is missing", key(Part::A))))?;
            let (bshape, b) =
                p.b.ok_or_else(|| ckpt(format!("tensor `{}` is missing", key(Part::B))))?;
            let [rank, k] = ashape[..] else {
                return Err(ckpt(format!(
                    "tensor `{}` has shape {ashape:?}; only 2-D (linear) adapters are supported",
                    key(Part::A)
                )));
            };
            let [n, rb] = bshape[..] else {
                return Err(ckpt(format!(
                    "tensor `{}` has shape {bshape:?}; only 2-D (linear) adapters are supported",
                    key(Part::B)
                )));
            };
            if rb != rank {
                return Err(ckpt(format!(
                    "`{}` is [{n}, {rb}] but `{}` is [{rank}, {k}]: the ranks differ",
                    key(Part::B),
                    key(Part::A)
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
                            key(Part::Magnitude)
                        )));
                    }
                    Some(m)
                }
                (None, true) => {
                    return Err(ckpt(format!(
                        "adapter_config.use_dora is true but `{}` is missing",
                        key(Part::Magnitude)
                    )))
                }
                (Some(_), false) => {
                    return Err(ckpt(format!(
                        "`{}` is present but adapter_config.use_dora is false",
                        key(Part::Magnitude)
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
        let adapter = Adapter { config, modules };
        adapter.validate()?;
        Ok(adapter)
    }

    /// The module called `name`, if the adapter has one.
    pub fn module(&self, name: &str) -> Option<&AdapterModule<T>> {
        self.modules.iter().find(|m| m.name == name)
    }

    /// Checks that the adapter can be saved and loaded back unchanged: the config
    /// ([`AdapterConfig::validate`]); at least one module; unique module names that
    /// read back from their tensor keys, are matched by `target_modules` (a list) and
    /// not excluded by `exclude_modules`; rank (as the config gives it), K and N ≥ 1;
    /// buffer lengths (sizes computed without overflow); a magnitude exactly when
    /// `use_dora`; and `scale` equal to [`AdapterConfig::scale_for`]. An
    /// [`Error::Checkpoint`] naming the field, module or tensor otherwise.
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        if self.modules.is_empty() {
            return Err(ckpt("the adapter has no modules"));
        }
        let mut seen = BTreeSet::new();
        for m in &self.modules {
            let name = &m.name;
            if !seen.insert(name.as_str()) {
                return Err(ckpt(format!("module `{name}` appears twice")));
            }
            check_module_name(&self.config, name)?;
            let want = self.config.rank_for(name);
            if m.rank != want {
                return Err(ckpt(format!(
                    "module `{name}` has rank {} but the config gives it r = {want}",
                    m.rank
                )));
            }
            for (what, v) in [
                ("in_features (K)", m.in_features),
                ("out_features (N)", m.out_features),
            ] {
                if v == 0 {
                    return Err(ckpt(format!(
                        "module `{name}` has {what} = 0 (must be >= 1)"
                    )));
                }
            }
            let check = |part: Part, actual: usize, dims: &[usize]| -> Result<()> {
                let key = key_of(name, part);
                let expected = byte_len(dims, 1).ok_or_else(|| {
                    ckpt(format!("tensor `{key}`: shape {dims:?} overflows usize"))
                })?;
                if actual != expected {
                    return Err(ckpt(format!(
                        "tensor `{key}` has {actual} elements but its shape {dims:?} needs \
                         {expected}"
                    )));
                }
                Ok(())
            };
            check(Part::A, m.a.len(), &[m.rank, m.in_features])?;
            check(Part::B, m.b.len(), &[m.out_features, m.rank])?;
            match (&m.magnitude, self.config.use_dora) {
                (Some(mag), true) => check(Part::Magnitude, mag.len(), &[m.out_features])?,
                (None, false) => {}
                (Some(_), false) => {
                    return Err(ckpt(format!(
                        "module `{name}` has a magnitude but adapter_config.use_dora is false"
                    )))
                }
                (None, true) => {
                    return Err(ckpt(format!(
                        "module `{name}` has no magnitude but adapter_config.use_dora is true"
                    )))
                }
            }
            let scale = self.config.scale_for(name);
            if m.scale != scale {
                return Err(ckpt(format!(
                    "module `{name}` has scale {} but its config gives {scale} (alpha {} / \
                     r {}{}); the files store only the config",
                    m.scale,
                    self.config.alpha_for(name),
                    want,
                    if self.config.use_rslora {
                        ", rsLoRA"
                    } else {
                        ""
                    }
                )));
            }
        }
        Ok(())
    }

    /// `adapter_model.safetensors` for this adapter, tensors in `T`'s dtype. Checks the
    /// adapter first ([`Adapter::validate`]).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let dtype = match T::DTYPE {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
        };
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for m in &self.modules {
            tensors.push((
                key_of(&m.name, Part::A),
                vec![m.rank, m.in_features],
                to_bytes(&m.a),
            ));
            tensors.push((
                key_of(&m.name, Part::B),
                vec![m.out_features, m.rank],
                to_bytes(&m.b),
            ));
            if let Some(mag) = &m.magnitude {
                tensors.push((
                    key_of(&m.name, Part::Magnitude),
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
    /// `dir`), the files `PeftModel.from_pretrained(model, dir)` loads. Everything is
    /// checked before the first write ([`Adapter::validate`]): on error nothing is
    /// written, and what is written [`Adapter::load_dir`] loads back unchanged.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        let weights = self.to_safetensors()?;
        let config = self.config.try_to_json()?;
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let cpath = dir.join(CONFIG_FILE);
        std::fs::write(&cpath, config).map_err(|e| io_err(&cpath, e))?;
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

    #[test]
    fn every_peft_key_has_a_rule_and_defaults_pass_it() {
        for k in PEFT_KEYS {
            match rule(k) {
                None => panic!("{k} has no rule"),
                Some(Rule::Field) => {}
                Some(_) => check_option(k, &default_value(k)).unwrap(),
            }
        }
        assert!(PEFT_KEYS.windows(2).all(|w| w[0] < w[1]));
    }
}
