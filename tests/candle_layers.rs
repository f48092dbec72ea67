//! The candle layers (feature `candle`) on candle's CPU backend: forward and every
//! gradient against the same math written with plain candle ops and candle's autograd
//! (f32, odd shapes), peft round trips, NEFTune, and the Llama built from them. The
//! CUDA side (feature `candle-cuda`) is in `tests/candle_gpu.rs`.
#![cfg(feature = "candle")]

use candle_core::{DType, Device, Module, Tensor, Var};
use lora_kernels::candle::llama::{
    self, AdapterSpec, Checkpoint, Impl, Llama, LlamaConfig, Method, PROJECTIONS,
};
use lora_kernels::candle::{DoraLinear, FrozenWeight, LayerOptions, LoraLinear, NeftuneEmbedding};
use lora_kernels::Nf4Weight;

mod candle_common;
use candle_common::tensor;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// f32 tolerance for sums of `k` products of O(1) terms: a few ulps per term
/// (`k · 2⁻²⁴` relative), times the size of the values compared.
fn tol(k: usize, size: f32) -> f32 {
    8.0 * k as f32 * f32::EPSILON * size.max(1.0)
}

fn set_b(v: &Var, seed: u64) {
    let d = v.dims().to_vec();
    v.set(&tensor(&d, seed, 0.5)).unwrap();
}

/// The plain composition: y = x Wᵀ + s (x Aᵀ) Bᵀ (+ peft's DoRA scale).
fn plain(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, s: f64, m: Option<&Tensor>) -> Tensor {
    let base = x.matmul(&w.t().unwrap()).unwrap();
    let lora = (x
        .matmul(&a.t().unwrap())
        .unwrap()
        .matmul(&b.t().unwrap())
        .unwrap()
        * s)
        .unwrap();
    match m {
        None => (base + lora).unwrap(),
        Some(m) => {
            let wd = (w + (b.matmul(a).unwrap() * s).unwrap()).unwrap();
            let norm = wd.sqr().unwrap().sum(1).unwrap().sqrt().unwrap().detach();
            let g = m.div(&norm).unwrap();
            (base + lora).unwrap().broadcast_mul(&g).unwrap()
        }
    }
}

struct Case {
    t: usize,
    k: usize,
    n: usize,
    r: usize,
}

const CASES: [Case; 3] = [
    Case {
        t: 1,
        k: 64,
        n: 48,
        r: 4,
    },
    Case {
        t: 7,
        k: 128,
        n: 65,
        r: 8,
    },
    Case {
        t: 33,
        k: 192,
        n: 130,
        r: 16,
    },
];

/// LoRA / DoRA over a dense or NF4 base: y and dx, dA, dB (dm) equal candle's autograd
/// through the plain composition, the NF4 base dequantized for it.
fn check_layer(dora: bool, nf4: bool) {
    for (ci, c) in CASES.iter().enumerate() {
        let seed = 100 * ci as u64 + dora as u64 * 10 + nf4 as u64;
        let w = tensor(&[c.n, c.k], seed, 0.1);
        let (base, w_ref) = if nf4 {
            let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let q = Nf4Weight::quantize::<f32>(&wv, c.n, c.k, 64, true).unwrap();
            let fw = FrozenWeight::nf4(q, &Device::Cpu).unwrap();
            let wd = fw.to_dense(DType::F32, &Device::Cpu).unwrap();
            (fw, wd)
        } else {
            (FrozenWeight::dense(w.clone()).unwrap(), w.clone())
        };
        let mut o = LayerOptions::new(c.r, 2.0 * c.r as f32);
        o.seed = seed;
        let x = Var::from_tensor(&tensor(&[c.t, c.k], seed + 1, 1.0)).unwrap();
        let (y, vars, m0) = if dora {
            let l = DoraLinear::new(base, None, o.clone(), None).unwrap();
            set_b(l.b(), seed + 2);
            let y = l.forward(x.as_tensor()).unwrap();
            let m0 = l.magnitude().as_tensor().clone();
            (y, l.vars(), Some(m0))
        } else {
            let l = LoraLinear::new(base, None, o.clone(), None).unwrap();
            set_b(l.b(), seed + 2);
            (l.forward(x.as_tensor()).unwrap(), l.vars(), None)
        };
        // The reference on copies of the same parameters.
        let a_r = Var::from_tensor(&vars[0].as_tensor().copy().unwrap()).unwrap();
        let b_r = Var::from_tensor(&vars[1].as_tensor().copy().unwrap()).unwrap();
        let m_r = m0.map(|m| Var::from_tensor(&m.copy().unwrap()).unwrap());
        let x_r = Var::from_tensor(&x.as_tensor().copy().unwrap()).unwrap();
        let s = o.scale() as f64;
        let y_r = plain(
            x_r.as_tensor(),
            &w_ref,
            a_r.as_tensor(),
            b_r.as_tensor(),
            s,
            m_r.as_ref().map(|m| m.as_tensor()),
        );
        let size = max_abs(&y_r);
        let d = max_abs_diff(&y, &y_r);
        assert!(
            d <= tol(c.k, size),
            "y: case {ci} dora {dora} nf4 {nf4}: {d}"
        );

        // Gradients of a weighted sum, so every output element matters differently.
        let wts = tensor(&[c.t, c.n], seed + 3, 1.0);
        let g = (y * &wts).unwrap().sum_all().unwrap().backward().unwrap();
        let g_r = (y_r * &wts).unwrap().sum_all().unwrap().backward().unwrap();
        let mut pairs = vec![
            ("dx", x.as_tensor(), x_r.as_tensor(), c.n),
            ("dA", vars[0].as_tensor(), a_r.as_tensor(), c.t * c.n),
            ("dB", vars[1].as_tensor(), b_r.as_tensor(), c.t * c.k),
        ];
        if let Some(m_r) = &m_r {
            pairs.push(("dm", vars[2].as_tensor(), m_r.as_tensor(), c.t * c.k));
        }
        for (name, ours, theirs, k) in pairs {
            let go = g.get(ours).unwrap_or_else(|| panic!("no grad for {name}"));
            let gr = g_r.get(theirs).unwrap();
            assert_eq!(go.dims(), gr.dims(), "{name}");
            let d = max_abs_diff(go, gr);
            let size = max_abs(gr);
            assert!(
                d <= tol(k, size),
                "{name}: case {ci} dora {dora} nf4 {nf4}: {d} (size {size})"
            );
        }
    }
}

#[test]
fn lora_matches_candle_autograd() {
    check_layer(false, false);
}

#[test]
fn qlora_matches_candle_autograd_on_the_dequantized_base() {
    check_layer(false, true);
}

#[test]
fn dora_matches_candle_autograd() {
    check_layer(true, false);
}

#[test]
fn qdora_matches_candle_autograd_on_the_dequantized_base() {
    check_layer(true, true);
}

#[test]
fn leading_dims_bias_and_dropout() {
    let (k, n, r) = (40, 24, 4);
    let w = tensor(&[n, k], 1, 0.1);
    let bias = tensor(&[n], 2, 1.0);
    let mut o = LayerOptions::new(r, 8.0);
    o.dropout = 0.25;
    o.seed = 9;
    let l = LoraLinear::new(
        FrozenWeight::dense(w.clone()).unwrap(),
        Some(bias.clone()),
        o,
        None,
    )
    .unwrap();
    set_b(l.b(), 3);
    let x = tensor(&[2, 3, k], 4, 1.0);
    let y = l.forward(&x).unwrap();
    assert_eq!(y.dims(), &[2, 3, n]);
    let y2 = plain(
        &x.reshape((6, k)).unwrap(),
        &w,
        l.a().as_tensor(),
        l.b().as_tensor(),
        l.scale() as f64,
        None,
    )
    .broadcast_add(&bias)
    .unwrap()
    .reshape((2, 3, n))
    .unwrap();
    assert!(max_abs_diff(&y, &y2) <= tol(k, max_abs(&y2)));
    // Training: dropout changes the output, each call draws a new mask.
    let t1 = l.forward_t(&x, true).unwrap();
    let t2 = l.forward_t(&x, true).unwrap();
    assert!(max_abs_diff(&t1, &y) > 1e-3);
    assert!(max_abs_diff(&t1, &t2) > 1e-3);
    // Bad input: the wrong width, the wrong dtype.
    assert!(l.forward(&tensor(&[3, k + 1], 5, 1.0)).is_err());
    let e = l
        .forward(&x.to_dtype(DType::BF16).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("BF16") || e.contains("bf16"), "{e}");
}

#[test]
fn peft_round_trip_restores_the_layer() {
    let (k, n, r) = (32, 20, 4);
    let w = FrozenWeight::dense(tensor(&[n, k], 7, 0.1)).unwrap();
    let o = LayerOptions::new(r, 16.0);
    let l = DoraLinear::new(w.clone(), None, o.clone(), None).unwrap();
    set_b(l.b(), 8);
    l.magnitude()
        .set(&tensor(&[n], 9, 1.0).abs().unwrap())
        .unwrap();
    let md = l.adapter_module("model.layers.0.self_attn.q_proj").unwrap();
    let mut o2 = o.clone();
    o2.seed = 1234;
    let l2 = DoraLinear::new(w.clone(), None, o2, None).unwrap();
    let x = tensor(&[5, k], 10, 1.0);
    assert!(max_abs_diff(&l.forward(&x).unwrap(), &l2.forward(&x).unwrap()) > 1e-3);
    l2.load_adapter_module(&md).unwrap();
    assert_eq!(
        max_abs_diff(&l.forward(&x).unwrap(), &l2.forward(&x).unwrap()),
        0.0
    );
    // A LoRA layer refuses a DoRA module, and a different rank.
    let l3 = LoraLinear::new(w.clone(), None, o.clone(), None).unwrap();
    assert!(l3.load_adapter_module(&md).is_err());
    let l4 = DoraLinear::new(w, None, LayerOptions::new(8, 16.0), None).unwrap();
    assert!(l4.load_adapter_module(&md).is_err());
}

#[test]
fn neftune_embedding_gathers_and_adds_bounded_noise_in_training() {
    let (v, d) = (50, 16);
    let table = tensor(&[v, d], 11, 1.0);
    let e = NeftuneEmbedding::new(table.clone(), 5.0, 3).unwrap();
    let ids = Tensor::from_vec(vec![0u32, 5, 49, 7, 7, 1], (2, 3), &Device::Cpu).unwrap();
    let y = e.forward(&ids).unwrap();
    let want = table
        .index_select(&ids.flatten_all().unwrap(), 0)
        .unwrap()
        .reshape((2, 3, d))
        .unwrap();
    assert_eq!(max_abs_diff(&y, &want), 0.0);
    let yt = e.forward_t(&ids, true).unwrap();
    let dev = max_abs_diff(&yt, &want);
    let bound = 5.0 / ((3 * d) as f32).sqrt();
    assert!(dev > 0.0 && dev <= bound * 1.0001, "{dev} vs {bound}");
    let bad = Tensor::from_vec(vec![50u32], (1, 1), &Device::Cpu).unwrap();
    assert!(e.forward(&bad).is_err());
}

fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 40,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 16,
        tie_word_embeddings: false,
        rope_scaling: None,
    }
}

fn spec(method: Method, imp: Impl) -> AdapterSpec {
    let mut layer = LayerOptions::new(4, 8.0);
    layer.seed = 5;
    AdapterSpec {
        method,
        implementation: imp,
        layer,
        targets: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        nf4_blocksize: 64,
        nf4_double_quant: true,
        neftune_alpha: 0.0,
    }
}

/// The Llama with the crate's layers equals the plain-candle baseline (logits and every
/// adapter gradient), and its adapter round-trips through peft's files.
#[test]
fn llama_fused_equals_plain_and_round_trips_peft() {
    let dir = std::env::temp_dir().join(format!("lk-candle-llama-{}", std::process::id()));
    llama::write_checkpoint(&dir, &tiny_config(), 3, DType::F32).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.config, tiny_config());
    let ids = Tensor::from_vec(
        (0..24u32).map(|i| (i * 7) % 40).collect(),
        (2, 12),
        &Device::Cpu,
    )
    .unwrap();
    for method in [Method::Lora, Method::QLora, Method::Dora, Method::QDora] {
        let f = Llama::new(&ck, &spec(method, Impl::Fused), DType::F32, &Device::Cpu).unwrap();
        let p = Llama::new(&ck, &spec(method, Impl::Plain), DType::F32, &Device::Cpu).unwrap();
        // B away from zero so the adapters matter.
        for (i, (vf, vp)) in f.vars().iter().zip(p.vars()).enumerate() {
            if i % if method.is_dora() { 3 } else { 2 } == 1 {
                let t = tensor(vf.dims(), 50 + i as u64, 0.3);
                vf.set(&t).unwrap();
                vp.set(&t).unwrap();
            }
        }
        let lf = f.forward(&ids).unwrap();
        let lp = p.forward(&ids).unwrap();
        let d = max_abs_diff(&lf, &lp);
        assert!(
            d < 1e-4 * max_abs(&lp).max(1.0),
            "{method:?}: logits differ by {d}"
        );
        let gf = Llama::loss(&lf, &ids).unwrap().backward().unwrap();
        let gp = Llama::loss(&lp, &ids).unwrap().backward().unwrap();
        for (vf, vp) in f.vars().iter().zip(p.vars()) {
            let (a, b) = (gf.get(vf).unwrap(), gp.get(&vp).unwrap());
            let d = max_abs_diff(a, b);
            assert!(
                d <= 1e-4 * max_abs(b).max(1e-3),
                "{method:?}: grad differs by {d}"
            );
        }
        // peft's files: save, load into a fresh model, same logits.
        let adir = dir.join(format!("adapter-{method:?}"));
        f.adapter(None).unwrap().save_dir(&adir).unwrap();
        let back = lora_kernels::peft::Adapter::<f32>::load_dir(&adir).unwrap();
        assert_eq!(back.config.use_dora, method.is_dora());
        assert_eq!(back.modules.len(), 2 * PROJECTIONS.len());
        let g = Llama::new(&ck, &spec(method, Impl::Fused), DType::F32, &Device::Cpu).unwrap();
        g.load_adapter(&back).unwrap();
        assert_eq!(
            max_abs_diff(&g.forward(&ids).unwrap(), &lf),
            0.0,
            "{method:?}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checkpoint_errors_name_the_problem() {
    let dir = std::env::temp_dir().join(format!("lk-candle-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let e = Checkpoint::open(&dir).err().unwrap().to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::write(dir.join("config.json"), r#"{"model_type":"mistral"}"#).unwrap();
    let e = Checkpoint::open(&dir).err().unwrap().to_string();
    assert!(e.contains("mistral"), "{e}");
    let mut c = tiny_config();
    c.num_key_value_heads = 3;
    assert!(llama::write_checkpoint(&dir, &c, 1, DType::F32).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The fused AdamW over candle Vars equals candle-nn's AdamW (same torch math, different
/// rounding order: a few f32 ulps per step) with a per-tensor LoRA+ multiplier, and
/// skips a parameter without a gradient.
#[test]
fn fused_adamw_matches_candle_nn_adamw() {
    use candle_nn::Optimizer;
    use lora_kernels::adamw::{AdamW, TensorOptions};
    use lora_kernels::candle::FusedAdamW;
    let shapes: [&[usize]; 3] = [&[7], &[13, 10], &[3, 33]];
    let make = || -> Vec<Var> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| Var::from_tensor(&tensor(s, 200 + i as u64, 1.0)).unwrap())
            .collect()
    };
    let (ours, theirs) = (make(), make());
    let scales = [1.0, 4.0, 1.0];
    let hyper = AdamW {
        lr: 1e-2,
        weight_decay: 0.1,
        ..AdamW::default()
    };
    let mut fused = FusedAdamW::new(
        ours.iter()
            .zip(scales)
            .map(|(v, s)| (v.clone(), TensorOptions::new(s)))
            .collect(),
        hyper,
    )
    .unwrap();
    let mut refs: Vec<candle_nn::AdamW> = theirs
        .iter()
        .zip(scales)
        .map(|(v, s)| {
            let p = candle_nn::ParamsAdamW {
                lr: 1e-2 * s,
                weight_decay: 0.1,
                ..Default::default()
            };
            candle_nn::AdamW::new(vec![v.clone()], p).unwrap()
        })
        .collect();
    for step in 0..4u64 {
        // Loss Σ w ⊙ p² with fixed weights: the gradient 2 w ⊙ p.
        let loss = |vs: &[Var], skip_last: bool| {
            let mut l = Tensor::new(0f32, &Device::Cpu).unwrap();
            for (i, v) in vs.iter().enumerate() {
                if skip_last && i == 2 {
                    continue;
                }
                let w = tensor(v.dims(), 300 + i as u64 + step, 1.0);
                l = (l
                    + (v.as_tensor().sqr().unwrap() * w)
                        .unwrap()
                        .sum_all()
                        .unwrap())
                .unwrap();
            }
            l.backward().unwrap()
        };
        // The last step has no gradient for the third tensor: it must stay as it was.
        let skip = step == 3;
        let before = ours[2].as_tensor().copy().unwrap();
        fused.step(&loss(&ours, skip)).unwrap();
        if skip {
            assert_eq!(max_abs_diff(ours[2].as_tensor(), &before), 0.0);
        }
        let g = loss(&theirs, skip);
        for (i, o) in refs.iter_mut().enumerate() {
            if !(skip && i == 2) {
                o.step(&g).unwrap();
            }
        }
        for (a, b) in ours.iter().zip(&theirs) {
            let d = max_abs_diff(a.as_tensor(), b.as_tensor());
            assert!(
                d <= 1e-5 * max_abs(b.as_tensor()).max(1.0),
                "step {step}: {d}"
            );
        }
    }
    assert_eq!(fused.steps(), 4);
    // A bf16 parameter is refused.
    let bad = Var::from_tensor(&tensor(&[4], 1, 1.0).to_dtype(DType::BF16).unwrap()).unwrap();
    assert!(FusedAdamW::new(vec![(bad, TensorOptions::new(1.0))], hyper).is_err());
}

/// A bitsandbytes 4-bit checkpoint (every projection stored as `Linear4bit`'s NF4 keys,
/// sharded with an index, as transformers saves one) loads without dequantizing, and
/// gives the same model as the dense checkpoint quantized at load.
#[test]
fn llama_loads_a_bitsandbytes_4bit_checkpoint() {
    use std::collections::{BTreeMap, HashMap};
    let root = std::env::temp_dir().join(format!("lk-candle-q4-{}", std::process::id()));
    let (dense, q4) = (root.join("dense"), root.join("q4"));
    llama::write_checkpoint(&dense, &tiny_config(), 8, DType::F32).unwrap();
    let ck = Checkpoint::open(&dense).unwrap();
    std::fs::create_dir_all(&q4).unwrap();
    std::fs::copy(dense.join("config.json"), q4.join("config.json")).unwrap();
    let mut weight_map = BTreeMap::new();
    let mut plain: HashMap<String, Tensor> = HashMap::new();
    let c = tiny_config();
    for name in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        plain.insert(
            name.into(),
            ck.tensor(name, DType::F32, &Device::Cpu).unwrap(),
        );
    }
    for l in 0..c.num_hidden_layers {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            let name = format!("model.layers.{l}.{n}.weight");
            plain.insert(
                name.clone(),
                ck.tensor(&name, DType::F32, &Device::Cpu).unwrap(),
            );
        }
        for p in PROJECTIONS {
            let prefix = format!("{}.", llama::proj_path(l, p));
            let w = ck
                .tensor(&format!("{prefix}weight"), DType::F32, &Device::Cpu)
                .unwrap();
            let (n, k) = w.dims2().unwrap();
            let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let q = Nf4Weight::quantize::<f32>(&v, n, k, 64, true).unwrap();
            let bytes = q.save_linear4bit(&prefix).unwrap();
            let file = format!("l{l}-{p}.safetensors");
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for key in st.names() {
                weight_map.insert(key.to_string(), file.clone());
            }
            std::fs::write(q4.join(&file), &bytes).unwrap();
        }
    }
    for k in plain.keys() {
        weight_map.insert(k.clone(), "model-plain.safetensors".into());
    }
    candle_core::safetensors::save(&plain, q4.join("model-plain.safetensors")).unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(q4.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let ck4 = Checkpoint::open(&q4).unwrap();
    let ids = Tensor::from_vec(
        (0..16u32).map(|i| (i * 5) % 40).collect(),
        (2, 8),
        &Device::Cpu,
    )
    .unwrap();
    for method in [Method::QLora, Method::QDora] {
        let a = Llama::new(&ck4, &spec(method, Impl::Fused), DType::F32, &Device::Cpu).unwrap();
        let b = Llama::new(&ck, &spec(method, Impl::Fused), DType::F32, &Device::Cpu).unwrap();
        for (va, vb) in a.vars().iter().zip(b.vars()) {
            let t = tensor(va.dims(), 77, 0.2);
            va.set(&t).unwrap();
            vb.set(&t).unwrap();
        }
        let (la, lb) = (a.forward(&ids).unwrap(), b.forward(&ids).unwrap());
        assert_eq!(max_abs_diff(&la, &lb), 0.0, "{method:?}");
    }
    // The shards are bitsandbytes' layout (its nf4 quant_state key is there).
    let shard = std::fs::read(q4.join("l0-q_proj.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&shard).unwrap();
    assert!(st.names().iter().any(|n| n.ends_with("bitsandbytes__nf4")));
    std::fs::remove_dir_all(&root).unwrap();
}
