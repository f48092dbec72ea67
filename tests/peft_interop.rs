//! peft adapters: peft's own saved adapters load into the crate, give peft's outputs
//! through the oracle, and round-trip; unsupported configs and tensors are errors that
//! name the field.

mod common;

use std::path::PathBuf;

use common::{fixtures_dir, rel_err, Fixture};
use lora_kernels::cpu::{dora as cpu_dora, lora as cpu_lora};
use lora_kernels::peft::{Adapter, AdapterConfig, CONFIG_FILE, WEIGHTS_FILE};
use lora_kernels::{bf16, DoraOutputs, DoraWeights, Error, LoraOptions, LoraShape, LoraWeights};

fn adapter_dir(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

fn read(name: &str) -> (String, Vec<u8>) {
    let d = adapter_dir(name);
    (
        std::fs::read_to_string(d.join(CONFIG_FILE)).unwrap(),
        std::fs::read(d.join(WEIGHTS_FILE)).unwrap(),
    )
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lora-kernels-peft-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn peft_lora_adapter_loads_and_gives_peft_output() {
    let ad = Adapter::<f32>::load_dir(&adapter_dir("peft_lora_48x80_r8_adapter")).unwrap();
    let fx = Fixture::open("peft_lora_48x80_r8.safetensors");
    assert_eq!(ad.modules.len(), 1);
    let m = &ad.modules[0];
    assert_eq!(m.name, "lin");
    assert_eq!((m.rank, m.in_features, m.out_features), (8, 80, 48));
    assert!(m.magnitude.is_none() && !ad.config.use_dora && !ad.config.use_rslora);
    assert_eq!(m.scale, fx.meta_f32("scaling"));
    assert_eq!(m.a, fx.f32("A"));
    assert_eq!(m.b, fx.f32("B"));
    // The adapter through the oracle gives peft's forward output.
    let shape = LoraShape::new(fx.meta_usize("T"), 80, 48, m.rank);
    let (x, w, bias) = (fx.f32("x"), fx.f32("W"), fx.f32("bias"));
    let weights = LoraWeights {
        w: &w[..],
        a: &m.a[..],
        b: &m.b[..],
        bias: Some(&bias[..]),
    };
    let mut y = vec![0.0f32; shape.y_len()];
    cpu_lora::forward(
        &shape,
        &LoraOptions::new(m.scale),
        &x,
        weights,
        &mut y,
        None,
    )
    .unwrap();
    let e = rel_err(&y, &fx.f32("y"));
    assert!(e < 1e-6, "y rel err {e}");
}

#[test]
fn peft_dora_adapter_loads_and_gives_peft_output() {
    let ad = Adapter::<f32>::load_dir(&adapter_dir("peft_dora_48x80_r8_adapter")).unwrap();
    let fx = Fixture::open("peft_dora_48x80_r8.safetensors");
    let m = &ad.modules[0];
    assert!(ad.config.use_dora);
    assert_eq!(m.magnitude.as_deref(), Some(&fx.f32("magnitude")[..]));
    assert_eq!(m.a, fx.f32("A"));
    assert_eq!(m.b, fx.f32("B"));
    let shape = LoraShape::new(fx.meta_usize("T"), 80, 48, m.rank);
    let (x, w) = (fx.f32("x"), fx.f32("W"));
    let mag = m.magnitude.as_ref().unwrap();
    let weights = DoraWeights {
        w: &w[..],
        a: &m.a[..],
        b: &m.b[..],
        bias: None,
        magnitude: &mag[..],
    };
    let mut y = vec![0.0f32; shape.y_len()];
    cpu_dora::forward(
        &shape,
        &LoraOptions::new(m.scale),
        &x,
        weights,
        DoraOutputs::y(&mut y[..]),
    )
    .unwrap();
    let e = rel_err(&y, &fx.f32("y"));
    assert!(e < 1e-6, "y rel err {e}");
}

#[test]
fn adapters_round_trip_through_files() {
    for name in ["peft_lora_48x80_r8_adapter", "peft_dora_48x80_r8_adapter"] {
        let ad = Adapter::<f32>::load_dir(&adapter_dir(name)).unwrap();
        let dir = tmp_dir(name);
        ad.save_dir(&dir).unwrap();
        let back = Adapter::<f32>::load_dir(&dir).unwrap();
        assert_eq!(back, ad, "{name}");
        // The config we write parses to the same fields peft's did.
        let (cfg, _) = read(name);
        assert_eq!(back.config, AdapterConfig::from_json(&cfg).unwrap());
        // bf16: saved as BF16, loaded back bit for bit.
        let adb = Adapter::<bf16>::load_dir(&adapter_dir(name)).unwrap();
        let bytes = adb.to_safetensors().unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (k, t) in st.tensors() {
            assert_eq!(t.dtype(), safetensors::Dtype::BF16, "{k}");
        }
        let back = Adapter::<bf16>::from_bytes(&adb.config.to_json(), &bytes).unwrap();
        assert_eq!(back, adb);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn rslora_and_patterns_set_the_scale() {
    let (cfg, st) = read("peft_lora_48x80_r8_adapter");
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["use_rslora"] = true.into();
    let ad = Adapter::<f32>::from_bytes(&v.to_string(), &st).unwrap();
    assert_eq!(ad.modules[0].scale, 16.0 / 8f32.sqrt());
    v["use_rslora"] = false.into();
    v["alpha_pattern"] = serde_json::json!({ "lin": 4 });
    let ad = Adapter::<f32>::from_bytes(&v.to_string(), &st).unwrap();
    assert_eq!(ad.modules[0].scale, 0.5);
    // A rank pattern that disagrees with the tensors is an error naming the module.
    v["rank_pattern"] = serde_json::json!({ "lin": 4 });
    let e = Adapter::<f32>::from_bytes(&v.to_string(), &st).unwrap_err();
    assert!(e.to_string().contains("`lin` has rank 8"), "{e}");
    v["rank_pattern"] = serde_json::json!({ "^model.*lin$": 8 });
    let e = Adapter::<f32>::from_bytes(&v.to_string(), &st).unwrap_err();
    assert!(e.to_string().contains("rank_pattern"), "{e}");
}

/// An edit of a parsed adapter_config.json.
type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;

fn config_error(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let (cfg, st) = read("peft_lora_48x80_r8_adapter");
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    edit(&mut v);
    match Adapter::<f32>::from_bytes(&v.to_string(), &st) {
        Err(e @ Error::Checkpoint(_)) => e.to_string(),
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

#[test]
fn unsupported_configs_are_errors_naming_the_field() {
    let cases: Vec<(&str, Edit)> = vec![
        ("peft_type", Box::new(|v| v["peft_type"] = "LOHA".into())),
        (
            "fan_in_fan_out",
            Box::new(|v| v["fan_in_fan_out"] = true.into()),
        ),
        ("lora_bias", Box::new(|v| v["lora_bias"] = true.into())),
        ("bias", Box::new(|v| v["bias"] = "all".into())),
        ("use_qalora", Box::new(|v| v["use_qalora"] = true.into())),
        (
            "modules_to_save",
            Box::new(|v| v["modules_to_save"] = serde_json::json!(["head"])),
        ),
        (
            "layer_replication",
            Box::new(|v| v["layer_replication"] = serde_json::json!([[0, 2]])),
        ),
        ("r", Box::new(|v| v["r"] = 0.into())),
        ("r", Box::new(|v| v["r"] = "eight".into())),
        (
            "lora_alpha",
            Box::new(|v| {
                v.as_object_mut()
                    .unwrap()
                    .remove("lora_alpha")
                    .map(drop)
                    .unwrap()
            }),
        ),
        ("lora_dropout", Box::new(|v| v["lora_dropout"] = 1.5.into())),
        (
            "target_modules",
            Box::new(|v| v["target_modules"] = 3.into()),
        ),
        ("use_dora", Box::new(|v| v["use_dora"] = true.into())),
    ];
    for (field, edit) in cases {
        let e = config_error(edit);
        assert!(e.contains(field), "{field}: {e}");
    }
    let e = Adapter::<f32>::from_bytes("[1, 2]", &read("peft_lora_48x80_r8_adapter").1);
    assert!(matches!(e, Err(Error::Checkpoint(_))));
}

/// A tensor to write: key, dtype, shape.
type Spec<'a> = (&'a str, safetensors::Dtype, Vec<usize>);

fn tensors_error(tensors: Vec<Spec<'_>>, dora: bool) -> String {
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
    let mut cfg = AdapterConfig::lora(8, 16.0, &["lin"]);
    cfg.use_dora = dora;
    match Adapter::<f32>::from_bytes(&cfg.to_json(), &bytes) {
        Err(e @ Error::Checkpoint(_)) => e.to_string(),
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

#[test]
fn unsupported_tensors_are_errors_naming_the_tensor() {
    use safetensors::Dtype::{F32, I64};
    let a = "base_model.model.lin.lora_A.weight";
    let b = "base_model.model.lin.lora_B.weight";
    let m = "base_model.model.lin.lora_magnitude_vector";
    let cases: Vec<(Vec<Spec>, bool, &str)> = vec![
        (
            vec![(a, F32, vec![8, 80])],
            false,
            "lora_B.weight` is missing",
        ),
        (
            vec![(b, F32, vec![48, 8])],
            false,
            "lora_A.weight` is missing",
        ),
        (
            vec![(a, F32, vec![8, 80]), (b, F32, vec![48, 4])],
            false,
            "ranks differ",
        ),
        (
            vec![(a, I64, vec![8, 80]), (b, F32, vec![48, 8])],
            false,
            "only F32, F16 and BF16",
        ),
        (
            vec![(a, F32, vec![8, 80, 1, 1]), (b, F32, vec![48, 8, 1, 1])],
            false,
            "only 2-D",
        ),
        (
            vec![
                (a, F32, vec![8, 80]),
                (b, F32, vec![48, 8]),
                ("base_model.model.emb.lora_embedding_A", F32, vec![8, 10]),
            ],
            false,
            "lora_embedding_A` is not supported",
        ),
        (
            vec![
                (a, F32, vec![8, 80]),
                (b, F32, vec![48, 8]),
                ("lin.lora_A.weight", F32, vec![8, 80]),
            ],
            false,
            "does not start with",
        ),
        (
            vec![(a, F32, vec![8, 80]), (b, F32, vec![48, 8])],
            true,
            "lora_magnitude_vector` is missing",
        ),
        (
            vec![
                (a, F32, vec![8, 80]),
                (b, F32, vec![48, 8]),
                (m, F32, vec![48]),
            ],
            false,
            "use_dora is false",
        ),
        (
            vec![
                (a, F32, vec![8, 80]),
                (b, F32, vec![48, 8]),
                (m, F32, vec![47]),
            ],
            true,
            "expected [48]",
        ),
        (vec![], false, "no LoRA tensors"),
    ];
    for (tensors, dora, want) in cases {
        let e = tensors_error(tensors, dora);
        assert!(e.contains(want), "want `{want}`: {e}");
    }
}

#[test]
fn missing_files_are_io_errors_naming_the_path() {
    let e = Adapter::<f32>::load_dir(&tmp_dir("missing")).unwrap_err();
    assert!(matches!(&e, Error::Io(s) if s.contains(CONFIG_FILE)), "{e}");
}
