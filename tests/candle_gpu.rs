//! The candle layers on candle's CUDA backend (feature `candle-cuda`): each layer in
//! bf16 (and f32) on the GPU against the same layer in f32 on candle's CPU backend (the
//! crate's oracle), forward and every gradient, on odd and large shapes; NEFTune
//! bit-identical; the Llama with the crate's layers against the plain-candle baseline
//! on the GPU. Skips loudly without a CUDA device (fails with
//! `LORA_KERNELS_REQUIRE_GPU=1`).
#![cfg(feature = "candle-cuda")]

use candle_core::{DType, Device, Module, Tensor, Var};
use lora_kernels::candle::llama::{
    self, AdapterSpec, Checkpoint, Impl, Llama, LlamaConfig, Method, PROJECTIONS,
};
use lora_kernels::candle::{DoraLinear, FrozenWeight, LayerOptions, LoraLinear, NeftuneEmbedding};
use lora_kernels::Nf4Weight;

mod candle_common;
use candle_common::tensor as host;

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var("LORA_KERNELS_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("LORA_KERNELS_REQUIRE_GPU=1 but no CUDA device: {e}");
            }
            eprintln!("\n*** lora-kernels candle GPU tests SKIPPED: no CUDA device ({e}) ***\n");
            None
        }
    }
}

/// ‖a − b‖₂ / ‖b‖₂ over all elements, in f64 on the host.
fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let a = a
        .to_dtype(DType::F64)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let b = b
        .to_dtype(DType::F64)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let num = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let den = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// bf16 against an f32 reference: inputs and outputs rounded to bf16 (unit roundoff
/// 2⁻⁹) with f32 accumulation inside the kernels; a handful of roundings stack up
/// along the chain (x, W, A, B, h, y), so a relative L2 error of 8 · 2⁻⁹ bounds it
/// independently of K (the errors are random, not accumulated in bf16).
const BF16_TOL: f64 = 8.0 / 512.0;
/// f32 on both sides: different summation orders over K terms.
fn f32_tol(k: usize) -> f64 {
    16.0 * k as f64 * f32::EPSILON as f64
}

struct Case {
    t: usize,
    k: usize,
    n: usize,
    r: usize,
}

const CASES: [Case; 4] = [
    Case {
        t: 1,
        k: 256,
        n: 200,
        r: 8,
    },
    Case {
        t: 37,
        k: 200,
        n: 130,
        r: 8,
    },
    Case {
        t: 515,
        k: 1024,
        n: 768,
        r: 16,
    },
    // Enough 128-wide tiles for the GEMM core's paths on a 132-SM GPU, small enough for
    // the CPU reference.
    Case {
        t: 1024,
        k: 512,
        n: 1152,
        r: 16,
    },
];

fn layer(
    dora: bool,
    base: FrozenWeight,
    o: &LayerOptions,
    dev: &Device,
) -> (Box<dyn Fn(&Tensor) -> Tensor>, Vec<Var>) {
    if dora {
        let l = DoraLinear::new(base, None, o.clone(), Some(dev)).unwrap();
        let vars = l.vars();
        (Box::new(move |x| l.forward(x).unwrap()), vars)
    } else {
        let l = LoraLinear::new(base, None, o.clone(), Some(dev)).unwrap();
        let vars = l.vars();
        (Box::new(move |x| l.forward(x).unwrap()), vars)
    }
}

fn check(dora: bool, nf4: bool, dtype: DType) {
    let Some(gpu) = cuda() else { return };
    for (ci, c) in CASES.iter().enumerate() {
        let seed = 1000 + 10 * ci as u64 + 2 * dora as u64 + nf4 as u64;
        let w = host(&[c.n, c.k], seed, 0.05);
        let (base_g, base_c) = if nf4 {
            let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let q = Nf4Weight::quantize::<f32>(&wv, c.n, c.k, 64, true).unwrap();
            (
                FrozenWeight::nf4(q.clone(), &gpu).unwrap(),
                FrozenWeight::nf4(q, &Device::Cpu).unwrap(),
            )
        } else {
            (
                FrozenWeight::dense(w.to_dtype(dtype).unwrap().to_device(&gpu).unwrap()).unwrap(),
                FrozenWeight::dense(w.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap())
                    .unwrap(),
            )
        };
        let mut o = LayerOptions::new(c.r, 2.0 * c.r as f32);
        o.seed = seed;
        let (fg, vg) = layer(dora, base_g, &o, &gpu);
        let (fc, vc) = layer(dora, base_c, &o, &Device::Cpu);
        // Same parameters on both sides (B away from zero; m perturbed).
        for (i, (a, b)) in vg.iter().zip(&vc).enumerate() {
            let t = match i {
                0 => continue, // A: the same seed gives the same start on both sides
                1 => host(b.dims(), seed + 7, 0.2),
                _ => (b.as_tensor() + host(b.dims(), seed + 8, 0.1)).unwrap(),
            };
            b.set(&t).unwrap();
            a.set(&t.to_device(&gpu).unwrap()).unwrap();
        }
        let xh = host(&[c.t, c.k], seed + 1, 1.0)
            .to_dtype(dtype)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let xg = Var::from_tensor(&xh.to_dtype(dtype).unwrap().to_device(&gpu).unwrap()).unwrap();
        let xc = Var::from_tensor(&xh).unwrap();
        let yg = fg(xg.as_tensor());
        let yc = fc(xc.as_tensor());
        let tol = if dtype == DType::BF16 {
            BF16_TOL
        } else {
            f32_tol(c.k)
        };
        let e = rel_l2(&yg, &yc);
        assert!(
            e <= tol,
            "y: case {ci} dora {dora} nf4 {nf4} {dtype:?}: {e}"
        );
        let wts = host(&[c.t, c.n], seed + 3, 1.0);
        let gg = (yg.to_dtype(DType::F32).unwrap() * wts.to_device(&gpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (yc * &wts).unwrap().sum_all().unwrap().backward().unwrap();
        let mut pairs = vec![("dx", xg.as_tensor().clone(), xc.as_tensor().clone())];
        let names = ["dA", "dB", "dm"];
        for (i, (a, b)) in vg.iter().zip(&vc).enumerate() {
            pairs.push((names[i], a.as_tensor().clone(), b.as_tensor().clone()));
        }
        for (name, a, b) in pairs {
            let (ga, gb) = (gg.get(&a).unwrap(), gc.get(&b).unwrap());
            let e = rel_l2(ga, gb);
            assert!(
                e <= tol,
                "{name}: case {ci} dora {dora} nf4 {nf4} {dtype:?}: {e}"
            );
        }
    }
}

#[test]
fn gpu_lora_bf16_and_f32_match_the_cpu_layer() {
    check(false, false, DType::BF16);
    check(false, false, DType::F32);
}

#[test]
fn gpu_qlora_bf16_matches_the_cpu_layer() {
    check(false, true, DType::BF16);
}

#[test]
fn gpu_dora_bf16_and_f32_match_the_cpu_layer() {
    check(true, false, DType::BF16);
    check(true, false, DType::F32);
}

#[test]
fn gpu_qdora_bf16_matches_the_cpu_layer() {
    check(true, true, DType::BF16);
}

#[test]
fn gpu_neftune_is_bit_identical_to_the_cpu() {
    let Some(gpu) = cuda() else { return };
    let (v, d) = (1000, 96);
    let table = host(&[v, d], 5, 1.0);
    let ids: Vec<u32> = (0..3 * 77).map(|i| (i * 37 % v) as u32).collect();
    let idc = Tensor::from_vec(ids, (3, 77), &Device::Cpu).unwrap();
    let ec = NeftuneEmbedding::new(table.clone(), 5.0, 11).unwrap();
    let eg = NeftuneEmbedding::new(table.to_device(&gpu).unwrap(), 5.0, 11).unwrap();
    for train in [false, true] {
        let a = eg.forward_t(&idc.to_device(&gpu).unwrap(), train).unwrap();
        let b = ec.forward_t(&idc, train).unwrap();
        assert_eq!(rel_l2(&a, &b), 0.0, "train {train}");
    }
}

#[test]
fn gpu_llama_fused_matches_plain_candle() {
    let Some(gpu) = cuda() else { return };
    let c = LlamaConfig {
        vocab_size: 300,
        hidden_size: 256,
        intermediate_size: 704,
        num_hidden_layers: 2,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        head_dim: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: false,
        rope_scaling: None,
    };
    let dir = std::env::temp_dir().join(format!("lk-candle-gpu-{}", std::process::id()));
    llama::write_checkpoint(&dir, &c, 4, DType::F32).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    let ids: Vec<u32> = (0..4 * 128).map(|i| (i * 13 % 300) as u32).collect();
    let ids = Tensor::from_vec(ids, (4, 128), &gpu).unwrap();
    for method in [Method::Lora, Method::QLora, Method::Dora, Method::QDora] {
        let mut layer = LayerOptions::new(8, 16.0);
        layer.seed = 3;
        let spec = |imp| AdapterSpec {
            method,
            implementation: imp,
            layer: layer.clone(),
            targets: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
            nf4_blocksize: 64,
            nf4_double_quant: true,
            neftune_alpha: 0.0,
        };
        let f = Llama::new(&ck, &spec(Impl::Fused), DType::BF16, &gpu).unwrap();
        let p = Llama::new(&ck, &spec(Impl::Plain), DType::BF16, &gpu).unwrap();
        let per = if method.is_dora() { 3 } else { 2 };
        for (i, (vf, vp)) in f.vars().iter().zip(p.vars()).enumerate() {
            if i % per == 1 {
                let t = host(vf.dims(), 70 + i as u64, 0.2).to_device(&gpu).unwrap();
                vf.set(&t).unwrap();
                vp.set(&t).unwrap();
            }
        }
        let lf = f.forward(&ids).unwrap();
        let lp = p.forward(&ids).unwrap();
        let e = rel_l2(&lf, &lp);
        assert!(e <= BF16_TOL, "{method:?} logits: {e}");
        let gf = Llama::loss(&lf, &ids).unwrap().backward().unwrap();
        let gp = Llama::loss(&lp, &ids).unwrap().backward().unwrap();
        for (vf, vp) in f.vars().iter().zip(p.vars()) {
            // bf16 through two layers and the loss: a looser, still bf16-scale bound.
            let e = rel_l2(gf.get(vf).unwrap(), gp.get(&vp).unwrap());
            assert!(e <= 4.0 * BF16_TOL, "{method:?} grad: {e}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The fused AdamW over CUDA Vars (one launch for all, through nested in-place ops)
/// gives the CPU oracle's bits, on 400 tensors (deeper than any model's adapter list
/// here) of odd sizes with LoRA+ multipliers.
#[test]
fn gpu_fused_adamw_is_bit_identical_to_the_cpu() {
    use lora_kernels::adamw::{AdamW, TensorOptions};
    use lora_kernels::candle::FusedAdamW;
    let Some(gpu) = cuda() else { return };
    let sizes: Vec<usize> = (0..400).map(|i| 1 + (i * 37) % 1500).collect();
    let hyper = AdamW {
        lr: 2e-3,
        weight_decay: 0.01,
        ..AdamW::default()
    };
    let make = |d: &Device| -> Vec<Var> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                Var::from_tensor(&host(&[n], i as u64, 1.0).to_device(d).unwrap()).unwrap()
            })
            .collect()
    };
    let (vg, vc) = (make(&gpu), make(&Device::Cpu));
    let opts = |vs: &[Var]| -> Vec<(Var, TensorOptions)> {
        vs.iter()
            .enumerate()
            .map(|(i, v)| {
                (
                    v.clone(),
                    TensorOptions::new(if i % 2 == 1 { 16.0 } else { 1.0 }),
                )
            })
            .collect()
    };
    let mut og = FusedAdamW::new(opts(&vg), hyper).unwrap();
    let mut oc = FusedAdamW::new(opts(&vc), hyper).unwrap();
    for step in 0..3u64 {
        let grads = |vs: &[Var]| {
            let mut l = Tensor::new(0f32, vs[0].device()).unwrap();
            for (i, v) in vs.iter().enumerate() {
                let w = host(v.dims(), 5000 + i as u64 + step, 1.0)
                    .to_device(v.device())
                    .unwrap();
                l = (l + (v.as_tensor() * w).unwrap().sum_all().unwrap()).unwrap();
            }
            l.backward().unwrap()
        };
        og.step(&grads(&vg)).unwrap();
        oc.step(&grads(&vc)).unwrap();
        for (a, b) in vg.iter().zip(&vc) {
            assert_eq!(rel_l2(a.as_tensor(), b.as_tensor()), 0.0, "step {step}");
        }
    }
}
