//! peft adapters, bad input: every config field that is out of range or asks for math
//! this crate does not do is an error naming it; unknown keys are warnings; tensors
//! with a zero dimension, the wrong dtype or corrupt bytes are errors naming the
//! tensor, never panics; saving checks first, writes only what loading accepts and
//! every key peft 0.21 writes.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{fixtures_dir, Rng};
use lora_kernels::peft::{
    Adapter, AdapterConfig, AdapterModule, TargetModules, CONFIG_FILE, PEFT_KEYS, WEIGHTS_FILE,
};
use lora_kernels::{bf16, f16, Element, Error};
use safetensors::Dtype;
use serde_json::{json, Value};

const LORA: &str = "peft_lora_48x80_r8_adapter";
const DORA: &str = "peft_dora_48x80_r8_adapter";

fn read(name: &str) -> (Value, Vec<u8>) {
    let d = fixtures_dir().join(name);
    let cfg = std::fs::read_to_string(d.join(CONFIG_FILE)).unwrap();
    (
        serde_json::from_str(&cfg).unwrap(),
        std::fs::read(d.join(WEIGHTS_FILE)).unwrap(),
    )
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "lora-kernels-peft-hardening-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The Checkpoint error's text, or a panic naming what came instead.
fn checkpoint<T: std::fmt::Debug>(r: lora_kernels::Result<T>, what: &str) -> String {
    match r {
        Err(e @ Error::Checkpoint(_)) => e.to_string(),
        other => panic!("{what}: expected a checkpoint error, got {other:?}"),
    }
}

/// The lora fixture's config with `edit` applied, loaded with the fixture's tensors.
fn load_edited(
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> lora_kernels::Result<Adapter<f32>> {
    let (mut v, st) = read(LORA);
    edit(v.as_object_mut().unwrap());
    Adapter::<f32>::from_bytes(&v.to_string(), &st)
}

/// Sets `key` to `value` in the lora fixture's config and expects an error whose text
/// names the key and every string of `also`.
fn expect_config_error(key: &str, value: Value, also: &[&str]) {
    let shown = value.to_string();
    let e = checkpoint(
        load_edited(|o| {
            o.insert(key.to_string(), value);
        }),
        &format!("{key} = {shown}"),
    );
    assert!(
        e.contains(&format!("adapter_config.{key}")),
        "{key} = {shown}: {e}"
    );
    for s in also {
        assert!(e.contains(s), "{key} = {shown}: `{s}` not in: {e}");
    }
}

#[test]
fn lora_alpha_must_be_finite_and_positive() {
    // 1e39 is finite in JSON but infinite as f32: the scale would be inf.
    expect_config_error("lora_alpha", json!(1e39), &["e+39", "finite", "inf"]);
    expect_config_error("lora_alpha", json!(-16), &["-16"]);
    expect_config_error("lora_alpha", json!(0), &["0"]);
    // Positive but 0 as f32.
    expect_config_error("lora_alpha", json!(1e-50), &["e-51", "it is 0"]);
    expect_config_error("lora_alpha", json!("16"), &["not a number"]);
    expect_config_error("lora_alpha", Value::Null, &["missing"]);
    // The fixture's own 16 loads, and a fractional alpha gives its scale.
    let ad = load_edited(|o| {
        o.insert("lora_alpha".into(), json!(12.5));
    })
    .unwrap();
    assert_eq!(ad.modules[0].scale, 12.5 / 8.0);
}

#[test]
fn peft_type_must_be_lora_and_present() {
    expect_config_error("peft_type", json!(42), &["42"]);
    expect_config_error("peft_type", json!("LOHA"), &["LOHA"]);
    expect_config_error("peft_type", json!("lora"), &["lora"]);
    let e = checkpoint(
        load_edited(|o| {
            o.remove("peft_type");
        }),
        "no peft_type",
    );
    assert!(e.contains("adapter_config.peft_type: missing"), "{e}");
}

#[test]
fn rank_and_dropout_are_checked() {
    expect_config_error("r", json!(0), &["0"]);
    expect_config_error("r", json!(-8), &["-8"]);
    expect_config_error("r", json!(8.5), &["8.5"]);
    let e = checkpoint(
        load_edited(|o| {
            o.remove("r");
        }),
        "no r",
    );
    assert!(e.contains("adapter_config.r: missing"), "{e}");
    expect_config_error("lora_dropout", json!(-0.1), &["-0.1"]);
    expect_config_error("lora_dropout", json!(1.0), &["1.0"]);
    expect_config_error("lora_dropout", json!("0.1"), &["0.1"]);
    assert_eq!(
        load_edited(|o| {
            o.insert("lora_dropout".into(), json!(0.05));
        })
        .unwrap()
        .config
        .lora_dropout,
        0.05
    );
}

#[test]
fn init_methods_that_rewrite_the_base_weights_are_errors() {
    for method in [
        "pissa",
        "pissa_niter_4",
        "olora",
        "corda",
        "loftq",
        "lora_ga",
        "mica",
        "made_up",
    ] {
        expect_config_error("init_lora_weights", json!(method), &[method]);
    }
    expect_config_error("init_lora_weights", json!(3), &["3"]);
    // The ones that only choose the initial A and B load, and are kept.
    for ok in [
        json!(true),
        json!(false),
        json!("gaussian"),
        json!("orthogonal"),
        json!("eva"),
    ] {
        let ad = load_edited(|o| {
            o.insert("init_lora_weights".into(), ok.clone());
        })
        .unwrap_or_else(|e| panic!("{ok}: {e}"));
        let written: Value = serde_json::from_str(&ad.config.to_json()).unwrap();
        assert_eq!(written["init_lora_weights"], ok);
    }
}

#[test]
fn options_that_change_the_math_are_errors_naming_them() {
    let cases: Vec<(&str, Value)> = vec![
        ("layers_to_transform", json!([0, 1])),
        ("layers_to_transform", json!(0)),
        ("layers_pattern", json!("layers")),
        ("fan_in_fan_out", json!(true)),
        ("fan_in_fan_out", json!("yes")),
        ("bias", json!("all")),
        ("bias", json!("lora_only")),
        ("bias", Value::Null),
        ("modules_to_save", json!(["head"])),
        ("target_parameters", json!(["experts.gate_up_proj"])),
        ("lora_bias", json!(true)),
        ("use_qalora", json!(true)),
        ("trainable_token_indices", json!([1, 2])),
        ("alora_invocation_tokens", json!([5, 6])),
        ("layer_replication", json!([[0, 2]])),
        ("megatron_config", json!({ "tp": 2 })),
        ("use_bdlora", json!({ "nblocks": 2 })),
        ("arrow_config", json!({ "top_k": 2 })),
        ("kasa_config", json!({ "beta": 1 })),
        ("velora_config", json!({ "num_groups": 4 })),
        ("monteclora_config", json!({ "num_samples": 4 })),
        ("exclude_modules", json!(3)),
        ("base_model_name_or_path", json!(5)),
        ("target_modules", json!(3)),
        ("rank_pattern", json!({ "lin": 0 })),
        ("rank_pattern", json!({ "^.*lin$": 8 })),
        ("alpha_pattern", json!({ "lin": -4 })),
        ("alpha_pattern", json!({ "lin": 1e39 })),
        ("alpha_pattern", json!([4])),
        ("use_dora", json!("yes")),
        ("use_rslora", json!(1)),
    ];
    for (key, value) in cases {
        expect_config_error(key, value, &[]);
    }
    // Their off values load.
    for (key, off) in [
        ("layers_to_transform", Value::Null),
        ("layers_to_transform", json!([])),
        ("layers_pattern", Value::Null),
        ("modules_to_save", json!([])),
        ("target_parameters", json!([])),
        ("use_bdlora", json!(false)),
        ("bias", json!("none")),
        ("megatron_config", json!({})),
    ] {
        load_edited(|o| {
            o.insert(key.into(), off.clone());
        })
        .unwrap_or_else(|e| panic!("{key} = {off}: {e}"));
    }
}

#[test]
fn target_and_exclude_modules_must_cover_every_module() {
    let e = checkpoint(
        load_edited(|o| {
            o.remove("target_modules");
        }),
        "no target_modules",
    );
    assert!(e.contains("adapter_config.target_modules: missing"), "{e}");
    let e = checkpoint(
        load_edited(|o| {
            o.insert("target_modules".into(), json!(["q_proj"]));
        }),
        "lin not targeted",
    );
    assert!(
        e.contains("module `lin`") && e.contains("target_modules"),
        "{e}"
    );
    let e = checkpoint(
        load_edited(|o| {
            o.insert("exclude_modules".into(), json!(["lin"]));
        }),
        "lin excluded",
    );
    assert!(
        e.contains("module `lin`") && e.contains("exclude_modules"),
        "{e}"
    );
    // Excluding another module is fine, and kept.
    let ad = load_edited(|o| {
        o.insert("exclude_modules".into(), json!(["head"]));
    })
    .unwrap();
    assert_eq!(ad.config.other["exclude_modules"], json!(["head"]));
}

#[test]
fn unknown_keys_are_kept_as_warnings() {
    let ad = load_edited(|o| {
        o.insert("some_future_option".into(), json!({ "x": 1 }));
        o.insert(
            "runtime_config".into(),
            json!({ "ephemeral_gpu_offload": false }),
        );
    })
    .unwrap();
    let keys: Vec<&str> = ad.config.unknown_keys.keys().map(String::as_str).collect();
    assert_eq!(keys, ["runtime_config", "some_future_option"]);
    let w = ad.config.warnings();
    assert_eq!(w.len(), 2);
    assert!(
        w[0].contains("runtime_config") && w[1].contains("some_future_option"),
        "{w:?}"
    );
    // None for peft's own files.
    let (v, st) = read(LORA);
    let clean = Adapter::<f32>::from_bytes(&v.to_string(), &st).unwrap();
    assert!(clean.config.warnings().is_empty() && clean.config.unknown_keys.is_empty());
    // Written back, and loaded back the same.
    let text = ad.config.try_to_json().unwrap();
    let written: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(written["some_future_option"], json!({ "x": 1 }));
    assert_eq!(AdapterConfig::from_json(&text).unwrap(), ad.config);
    // A key of peft's set may not hide among the unknown ones.
    let mut bad = ad.config.clone();
    bad.unknown_keys.insert("bias".into(), json!("all"));
    let e = checkpoint(bad.validate(), "bias as an unknown key");
    assert!(e.contains("adapter_config.bias"), "{e}");
}

/// A tensor to write: key, dtype, shape.
type Spec<'a> = (&'a str, Dtype, Vec<usize>);

/// Writes one module's tensors as given and loads them with a plain LoRA config.
fn load_tensors(tensors: &[Spec<'_>]) -> lora_kernels::Result<Adapter<f32>> {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, d, s)| vec![0u8; s.iter().product::<usize>() * d.bitsize() / 8])
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&data)
        .map(|((k, d, s), b)| {
            (
                k.to_string(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    let cfg = AdapterConfig::lora(8, 16.0, &["lin"]);
    Adapter::<f32>::from_bytes(&cfg.try_to_json().unwrap(), &bytes)
}

const A: &str = "base_model.model.lin.lora_A.weight";
const B: &str = "base_model.model.lin.lora_B.weight";

#[test]
fn zero_dimensions_are_errors_naming_the_tensor() {
    use Dtype::F32;
    let cases: Vec<(Vec<Spec<'_>>, &str)> = vec![
        // K = 0
        (vec![(A, F32, vec![8, 0]), (B, F32, vec![48, 8])], A),
        // N = 0
        (vec![(A, F32, vec![8, 80]), (B, F32, vec![0, 8])], B),
        // r = 0
        (vec![(A, F32, vec![0, 80]), (B, F32, vec![48, 0])], A),
        // K = N = 0
        (vec![(A, F32, vec![8, 0]), (B, F32, vec![0, 8])], A),
    ];
    for (tensors, tensor) in cases {
        let e = checkpoint(load_tensors(&tensors), tensor);
        assert!(e.contains(tensor) && e.contains("is 0"), "{e}");
    }
    // The same shapes without the zero load.
    load_tensors(&[(A, F32, vec![8, 80]), (B, F32, vec![48, 8])]).unwrap();
}

#[test]
fn wrong_dtypes_and_shapes_are_errors_naming_the_tensor() {
    use Dtype::{F32, F64, I32, U8};
    for dt in [F64, I32, U8] {
        let e = checkpoint(
            load_tensors(&[(A, dt, vec![8, 80]), (B, F32, vec![48, 8])]),
            "dtype",
        );
        assert!(e.contains(A) && e.contains("only F32, F16 and BF16"), "{e}");
    }
    let e = checkpoint(
        load_tensors(&[(A, F32, vec![8, 80]), (B, F32, vec![48, 7])]),
        "ranks",
    );
    assert!(
        e.contains(A) && e.contains(B) && e.contains("ranks differ"),
        "{e}"
    );
    let e = checkpoint(
        load_tensors(&[(A, F32, vec![4, 80]), (B, F32, vec![48, 4])]),
        "rank vs r",
    );
    assert!(e.contains("`lin` has rank 4"), "{e}");
    let e = checkpoint(
        load_tensors(&[(A, F32, vec![640]), (B, F32, vec![48, 8])]),
        "1-D",
    );
    assert!(e.contains(A) && e.contains("2-D"), "{e}");
}

#[test]
fn corrupt_or_truncated_bytes_are_errors_not_panics() {
    let (v, st) = read(DORA);
    let cfg = v.to_string();
    // Every truncation.
    for n in 0..st.len() {
        let r = Adapter::<f32>::from_bytes(&cfg, &st[..n]);
        checkpoint(r, &format!("truncated to {n} bytes"));
    }
    // Random bytes written over the header and the data: Ok or an error, never a panic.
    let header = 8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let mut rng = Rng::new(11);
    let mut errors = 0;
    for i in 0..3000 {
        let mut b = st.clone();
        let hits = 1 + rng.next_u64() % 4;
        for _ in 0..hits {
            let limit = if i % 2 == 0 { header } else { b.len() };
            let at = (rng.next_u64() % limit as u64) as usize;
            b[at] = rng.next_u64() as u8;
        }
        match Adapter::<f32>::from_bytes(&cfg, &b) {
            Ok(ad) => ad.validate().unwrap(),
            Err(Error::Checkpoint(_)) => errors += 1,
            Err(e) => panic!("unexpected error kind: {e:?}"),
        }
    }
    assert!(errors > 0);
    // A header that claims an enormous tensor.
    let header = json!({
        A: { "dtype": "F32", "shape": [1u64 << 40, 1u64 << 40], "data_offsets": [0, 16] },
    })
    .to_string();
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(&[0u8; 16]);
    checkpoint(Adapter::<f32>::from_bytes(&cfg, &b), "huge shape");
    // A header length past the end, and the largest one.
    for len in [1u64 << 20, u64::MAX] {
        let mut b = len.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        checkpoint(Adapter::<f32>::from_bytes(&cfg, &b), "header length");
    }
    // Not JSON, and not an object.
    for text in ["", "{", "[1, 2]", "null", "\"LORA\""] {
        checkpoint(Adapter::<f32>::from_bytes(text, &st), text);
    }
}

/// A small in-memory adapter, values from `seed`, scale as its config gives it.
fn adapter<T: Element>(names: &[&str], dora: bool, seed: u64) -> Adapter<T> {
    let mut config = AdapterConfig::lora(4, 8.0, &["q_proj", "v_proj"]);
    config.use_dora = dora;
    config.lora_dropout = 0.05;
    let mut rng = Rng::new(seed);
    let (k, n) = (12, 20);
    let modules = names
        .iter()
        .map(|name| AdapterModule {
            name: name.to_string(),
            rank: 4,
            in_features: k,
            out_features: n,
            scale: config.scale_for(name),
            a: rng.vec(4 * k, 1.0),
            b: rng.vec(n * 4, 1.0),
            magnitude: dora.then(|| rng.vec(n, 1.0)),
        })
        .collect();
    Adapter { config, modules }
}

const NAMES: [&str; 2] = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
];

fn key_set(path: &Path) -> BTreeSet<String> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v.as_object().unwrap().keys().cloned().collect()
}

fn round_trip<T: Element + PartialEq + std::fmt::Debug>(tag: &str) {
    let fixture_keys = key_set(&fixtures_dir().join(LORA).join(CONFIG_FILE));
    assert_eq!(
        fixture_keys,
        key_set(&fixtures_dir().join(DORA).join(CONFIG_FILE))
    );
    assert_eq!(
        fixture_keys,
        PEFT_KEYS.iter().map(|k| k.to_string()).collect()
    );
    for dora in [false, true] {
        let ad = adapter::<T>(&NAMES, dora, 5);
        let dir = tmp_dir(&format!("{tag}-{dora}"));
        ad.save_dir(&dir).unwrap();
        let back = Adapter::<T>::load_dir(&dir).unwrap();
        assert_eq!(back, ad, "{tag} dora {dora}");
        let written = key_set(&dir.join(CONFIG_FILE));
        let missing: Vec<_> = fixture_keys.difference(&written).collect();
        assert!(
            missing.is_empty(),
            "keys peft 0.21 writes but we do not: {missing:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn save_then_load_gives_the_same_adapter_with_every_peft_key() {
    round_trip::<f32>("f32");
    round_trip::<bf16>("bf16");
    round_trip::<f16>("f16");
}

#[test]
fn a_loaded_config_keeps_its_values_through_save() {
    let ad = load_edited(|o| {
        o.insert("task_type".into(), json!("CAUSAL_LM"));
        o.insert("peft_version".into(), json!("0.17.1"));
        o.insert("revision".into(), json!("main"));
        o.insert("init_lora_weights".into(), json!("gaussian"));
        o.insert("qalora_group_size".into(), json!(32));
        o.insert("base_model_name_or_path".into(), json!("org/model"));
        o.insert("newer_peft_key".into(), json!([1, 2]));
    })
    .unwrap();
    let dir = tmp_dir("keeps");
    ad.save_dir(&dir).unwrap();
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
    let (fixture, _) = read(LORA);
    for (k, want) in [
        ("task_type", json!("CAUSAL_LM")),
        ("peft_version", json!("0.17.1")),
        ("revision", json!("main")),
        ("init_lora_weights", json!("gaussian")),
        ("qalora_group_size", json!(32)),
        ("base_model_name_or_path", json!("org/model")),
        ("newer_peft_key", json!([1, 2])),
        // The fixture's own non-default value.
        ("auto_mapping", fixture["auto_mapping"].clone()),
    ] {
        assert_eq!(written[k], want, "{k}");
    }
    assert_eq!(Adapter::<f32>::load_dir(&dir).unwrap(), ad);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Saves `ad` into a fresh folder and expects an error naming every string of `want`,
/// with nothing written.
fn expect_save_error(ad: &Adapter<f32>, tag: &str, want: &[&str]) {
    let dir = tmp_dir(tag);
    let e = checkpoint(ad.save_dir(&dir), tag);
    for w in want {
        assert!(e.contains(w), "{tag}: `{w}` not in: {e}");
    }
    assert!(
        !dir.exists(),
        "{tag}: save_dir wrote {} before failing",
        dir.display()
    );
    checkpoint(ad.to_safetensors(), tag);
}

#[test]
fn save_refuses_what_load_would_refuse_and_writes_nothing() {
    let good = adapter::<f32>(&NAMES, false, 9);
    good.validate().unwrap();
    type Edit = Box<dyn Fn(&mut Adapter<f32>)>;
    let cases: Vec<(&str, Edit, Vec<&str>)> = vec![
        (
            "dropout",
            Box::new(|a| a.config.lora_dropout = -0.1),
            vec!["adapter_config.lora_dropout", "-0.1"],
        ),
        (
            "dropout_nan",
            Box::new(|a| a.config.lora_dropout = f32::NAN),
            vec!["adapter_config.lora_dropout"],
        ),
        (
            "alpha_nan",
            Box::new(|a| a.config.lora_alpha = f32::NAN),
            vec!["adapter_config.lora_alpha", "NaN"],
        ),
        (
            "alpha_inf",
            Box::new(|a| a.config.lora_alpha = f32::INFINITY),
            vec!["adapter_config.lora_alpha", "inf"],
        ),
        (
            "alpha_negative",
            Box::new(|a| a.config.lora_alpha = -2.0),
            vec!["adapter_config.lora_alpha", "-2"],
        ),
        (
            "alpha_zero",
            Box::new(|a| a.config.lora_alpha = 0.0),
            vec!["adapter_config.lora_alpha"],
        ),
        (
            "r_zero",
            Box::new(|a| a.config.r = 0),
            vec!["adapter_config.r"],
        ),
        (
            "alpha_pattern",
            Box::new(|a| {
                a.config.alpha_pattern.insert("q_proj".into(), f32::NAN);
            }),
            vec!["adapter_config.alpha_pattern", "q_proj"],
        ),
        (
            "other_math",
            Box::new(|a| {
                a.config.other.insert("fan_in_fan_out".into(), json!(true));
            }),
            vec!["adapter_config.fan_in_fan_out"],
        ),
        (
            "other_init",
            Box::new(|a| {
                a.config
                    .other
                    .insert("init_lora_weights".into(), json!("pissa"));
            }),
            vec!["adapter_config.init_lora_weights", "pissa"],
        ),
        (
            "other_unknown",
            Box::new(|a| {
                a.config.other.insert("not_a_peft_key".into(), json!(1));
            }),
            vec!["adapter_config.not_a_peft_key"],
        ),
        (
            "other_field",
            Box::new(|a| {
                a.config.other.insert("lora_alpha".into(), json!(3));
            }),
            vec!["adapter_config.lora_alpha"],
        ),
        (
            "empty_targets",
            Box::new(|a| a.config.target_modules = TargetModules::List(vec![])),
            vec!["adapter_config.target_modules"],
        ),
        (
            "untargeted",
            Box::new(|a| a.modules[1].name = "model.layers.0.mlp.up_proj".into()),
            vec!["`model.layers.0.mlp.up_proj`", "target_modules"],
        ),
        (
            "k_zero",
            Box::new(|a| {
                a.modules[0].in_features = 0;
                a.modules[0].a.clear();
            }),
            vec![NAMES[0], "in_features"],
        ),
        (
            "n_zero",
            Box::new(|a| {
                a.modules[0].out_features = 0;
                a.modules[0].b.clear();
            }),
            vec![NAMES[0], "out_features"],
        ),
        (
            "rank",
            Box::new(|a| a.modules[0].rank = 3),
            vec![NAMES[0], "rank 3"],
        ),
        (
            "a_len",
            Box::new(|a| {
                a.modules[1].a.pop();
            }),
            vec![
                "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
                "47",
            ],
        ),
        (
            "b_len",
            Box::new(|a| a.modules[0].b.push(0.0)),
            vec!["q_proj.lora_B.weight", "81"],
        ),
        (
            "magnitude_without_dora",
            Box::new(|a| a.modules[0].magnitude = Some(vec![1.0; 20])),
            vec![NAMES[0], "use_dora"],
        ),
        (
            "dora_without_magnitude",
            Box::new(|a| a.config.use_dora = true),
            vec![NAMES[0], "use_dora"],
        ),
        (
            "scale",
            Box::new(|a| a.modules[0].scale = 3.0),
            vec![NAMES[0], "scale 3"],
        ),
        (
            "duplicate",
            Box::new(|a| a.modules[1] = a.modules[0].clone()),
            vec![NAMES[0], "twice"],
        ),
        (
            "empty_name",
            Box::new(|a| {
                a.config.target_modules = TargetModules::Regex(".*".into());
                a.modules[0].name = String::new();
            }),
            vec!["module name ``"],
        ),
        (
            "no_modules",
            Box::new(|a| a.modules.clear()),
            vec!["no modules"],
        ),
    ];
    for (tag, edit, want) in cases {
        let mut ad = good.clone();
        edit(&mut ad);
        expect_save_error(&ad, tag, &want);
    }
    // A size that overflows is an error, not a panic.
    let mut huge = good.clone();
    huge.config.r = usize::MAX / 2 + 1;
    for m in &mut huge.modules {
        m.rank = huge.config.r;
        m.scale = huge.config.scale_for(&m.name);
    }
    expect_save_error(&huge, "overflow", &["overflows"]);
}

#[test]
fn pattern_keys_that_disagree_on_a_module_are_refused() {
    let mut ad = adapter::<f32>(&NAMES, false, 3);
    ad.config.alpha_pattern.insert("q_proj".into(), 4.0);
    ad.config
        .alpha_pattern
        .insert("self_attn.q_proj".into(), 2.0);
    for m in &mut ad.modules {
        m.scale = ad.config.scale_for(&m.name);
    }
    expect_save_error(
        &ad,
        "ambiguous",
        &["alpha_pattern", "q_proj", "self_attn.q_proj"],
    );
    // Keys that agree are fine.
    ad.config
        .alpha_pattern
        .insert("self_attn.q_proj".into(), 4.0);
    for m in &mut ad.modules {
        m.scale = ad.config.scale_for(&m.name);
    }
    ad.validate().unwrap();
    assert_eq!(ad.modules[0].scale, 1.0);
}

#[test]
fn to_json_of_a_bad_config_is_refused_by_from_json() {
    let mut c = AdapterConfig::lora(8, f32::NAN, &["lin"]);
    assert!(matches!(c.try_to_json(), Err(Error::Checkpoint(_))));
    // What to_json writes unchecked, from_json does not accept.
    checkpoint(AdapterConfig::from_json(&c.to_json()), "NaN alpha");
    c.lora_alpha = 16.0;
    assert_eq!(
        AdapterConfig::from_json(&c.try_to_json().unwrap()).unwrap(),
        c
    );
}
