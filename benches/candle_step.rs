//! One training step (forward, loss, backward; the optimizer excluded) of the main
//! example's Llama on the GPU, with the crate's candle layers and with the same
//! adapters written in plain candle ops (matmuls and adds; an NF4 base dequantized,
//! then a matmul), in one process, back to back; and the frozen-base step (no adapters,
//! the input's gradient on, so the whole backward runs) as the floor.
//!
//! ```text
//! cargo bench --features candle-cuda --bench candle_step [-- --batch B --seq S --layers L]
//! ```
//! Defaults: the 1.1B model of the PyTorch race (hidden 2048, 16 layers, MLP 5632, 32
//! heads, vocab 32000), batch 1 × 2048 tokens, r = 16, alpha 32, every projection
//! adapted, bf16. Prints ms/step (median of `--steps` after 2 warm-up steps), tokens/s,
//! the ratios, the overhead over the floor and the peak memory, and writes the table as
//! JSON to `target/candle_step.json`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use lora_kernels::candle::llama::{
    self, AdapterSpec, Checkpoint, Impl, Llama, LlamaConfig, Method, PROJECTIONS,
};
use lora_kernels::candle::LayerOptions;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Row {
    name: String,
    ms: f64,
    peak: u64,
}

fn main() -> candle_core::Result<()> {
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("*** candle_step bench SKIPPED: no CUDA device ({e}) ***");
            return Ok(());
        }
    };
    let (batch, seq, layers, steps) = (
        arg("--batch", 1),
        arg("--seq", 2048),
        arg("--layers", 16),
        arg("--steps", 6),
    );
    let c = LlamaConfig {
        vocab_size: 32000,
        hidden_size: 2048,
        intermediate_size: 5632,
        num_hidden_layers: layers,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: seq,
        tie_word_embeddings: false,
        rope_scaling: None,
    };
    let dir = std::env::temp_dir().join("lk-candle-step-model");
    let t0 = Instant::now();
    llama::write_checkpoint(&dir, &c, 1, DType::BF16)?;
    let ck = Checkpoint::open(&dir)?;
    println!(
        "model: {:.2} B parameters, batch {batch} × {seq} tokens, bf16; checkpoint in {:.1} s",
        c.num_params() as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );
    let gpu = match &dev {
        Device::Cuda(d) => lora_kernels::candle::gpu(d)?,
        _ => unreachable!(),
    };
    println!(
        "device: {} (sm_{}{})",
        gpu.name(),
        gpu.compute_capability().0,
        gpu.compute_capability().1
    );
    if std::env::args().any(|a| a == "--probe") {
        return probe(&dev, batch, seq);
    }
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 7919) % c.vocab_size) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &dev)?;
    let mut rows: Vec<Row> = Vec::new();
    let mut layer = LayerOptions::new(16, 32.0);
    layer.seed = 1;
    let spec = |method: Method, imp: Impl, targets: &[&str]| AdapterSpec {
        method,
        implementation: imp,
        layer: layer.clone(),
        targets: targets.iter().map(|s| s.to_string()).collect(),
        nf4_blocksize: 64,
        nf4_double_quant: true,
        neftune_alpha: 0.0,
    };
    let time = |m: &Llama, input_grad: bool| -> candle_core::Result<(f64, u64)> {
        let mut t = Vec::new();
        let _ = gpu.pool_usage(true);
        for i in 0..steps + 2 {
            dev.synchronize()?;
            let s = Instant::now();
            let logits = if input_grad {
                let x = Var::from_tensor(&m.embed(&ids, true)?)?;
                m.forward_hidden(x.as_tensor(), true)?
            } else {
                m.forward_t(&ids, true)?
            };
            let loss = Llama::loss(&logits, &ids)?;
            let g = loss.backward()?;
            dev.synchronize()?;
            drop(g);
            if i >= 2 {
                t.push(s.elapsed().as_secs_f64() * 1e3);
            }
        }
        t.sort_by(|a, b| a.total_cmp(b));
        let peak = gpu.pool_usage(false).map(|p| p.1).unwrap_or(0);
        Ok((t[t.len() / 2], peak))
    };
    // The floor: dense frozen base, no adapters, the input's gradient on.
    {
        let m = Llama::new(
            &ck,
            &spec(Method::Lora, Impl::Fused, &[]),
            DType::BF16,
            &dev,
        )?;
        let (ms, peak) = time(&m, true)?;
        rows.push(Row {
            name: "floor (dense base, no adapter)".into(),
            ms,
            peak,
        });
    }
    for method in [Method::Lora, Method::QLora, Method::Dora, Method::QDora] {
        for imp in [Impl::Fused, Impl::Plain] {
            let m = Llama::new(&ck, &spec(method, imp, &PROJECTIONS), DType::BF16, &dev)?;
            let (ms, peak) = time(&m, false)?;
            rows.push(Row {
                name: format!(
                    "{method:?} {}",
                    if imp == Impl::Fused {
                        "lora-kernels"
                    } else {
                        "plain candle"
                    }
                ),
                ms,
                peak,
            });
            println!("  {:<28} {:>9.2} ms", rows.last().unwrap().name, ms);
        }
    }
    let tokens = (batch * seq) as f64;
    let floor = rows[0].ms;
    println!("\n| step | ms | tokens/s | vs plain candle | over floor | peak MiB |");
    println!("|---|---|---|---|---|---|");
    let mut json = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let vs = if i > 0 && i % 2 == 1 {
            format!("{:.2}×", rows[i + 1].ms / r.ms)
        } else {
            "—".into()
        };
        println!(
            "| {} | {:.2} | {:.0} | {} | {:+.1}% | {:.0} |",
            r.name,
            r.ms,
            tokens / r.ms * 1e3,
            vs,
            (r.ms / floor - 1.0) * 100.0,
            r.peak as f64 / 1048576.0
        );
        json.push(serde_json::json!({"step": r.name, "ms": r.ms, "tokens_per_s": tokens / r.ms * 1e3, "peak_bytes": r.peak}));
    }
    let out = serde_json::json!({
        "device": gpu.name(), "batch": batch, "seq": seq, "layers": layers, "rank": 16,
        "rows": json,
    });
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/candle_step.json");
    let _ = std::fs::write(&p, serde_json::to_string_pretty(&out).unwrap_or_default());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `--probe`: forward + backward of the pieces of one block in isolation, at the bench's
/// shapes, to show where the floor's time goes (ms per call, median of 5).
fn probe(dev: &Device, batch: usize, seq: usize) -> candle_core::Result<()> {
    let (h, nh, hd, f) = (2048usize, 32usize, 64usize, 5632usize);
    let t = |dims: &[usize]| -> candle_core::Result<Var> {
        Var::from_tensor(&Tensor::randn(0f32, 0.5, dims, dev)?.to_dtype(DType::BF16)?)
    };
    let time =
        |name: &str, f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<()> {
            let mut v = Vec::new();
            for i in 0..7 {
                dev.synchronize()?;
                let s = Instant::now();
                let y = f()?;
                let g = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
                dev.synchronize()?;
                drop(g);
                if i >= 2 {
                    v.push(s.elapsed().as_secs_f64() * 1e3);
                }
            }
            v.sort_by(|a, b| a.total_cmp(b));
            println!("  {name:<40} {:>8.2} ms (fwd + bwd)", v[v.len() / 2]);
            Ok(())
        };
    let x = t(&[batch, seq, h])?;
    let w = t(&[h])?;
    let q = t(&[batch, nh, seq, hd])?;
    let k = t(&[batch, nh, seq, hd])?;
    let vv = t(&[batch, nh, seq, hd])?;
    let wq = t(&[h, h])?;
    let wf = t(&[f, h])?;
    let pos: Vec<f32> = (0..seq * hd / 2).map(|i| (i as f32 * 1e-3).sin()).collect();
    let cos = Tensor::from_vec(pos.clone(), (seq, hd / 2), dev)?.to_dtype(DType::BF16)?;
    let sin = Tensor::from_vec(pos, (seq, hd / 2), dev)?.to_dtype(DType::BF16)?;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (seq, seq), dev)?;
    println!("probe: one block's pieces at batch {batch} × {seq}, bf16");
    // Each row's time includes the sum that seeds its backward (over the piece's
    // output); this row is that cost alone for the largest output, the scores.
    let scores = t(&[batch, nh, seq, seq])?;
    time("(seed: sum over [B, H, S, S] alone)", &|| {
        Ok(scores.as_tensor().clone())
    })?;
    time("rms_norm_slow", &|| {
        candle_nn::ops::rms_norm_slow(x.as_tensor(), w.as_tensor(), 1e-5)
    })?;
    time("rope_slow (q)", &|| {
        candle_nn::rotary_emb::rope_slow(q.as_tensor(), &cos, &sin)
    })?;
    time("scores q kᵀ / √d", &|| {
        q.as_tensor().matmul(&k.as_tensor().t()?)? / 8.0
    })?;
    time("scores + mask + softmax (f32)", &|| {
        let a = (q.as_tensor().matmul(&k.as_tensor().t()?)? / 8.0)?;
        let a = a.to_dtype(DType::F32)?.broadcast_add(&mask)?;
        candle_nn::ops::softmax(&a, candle_core::D::Minus1)?.to_dtype(DType::BF16)
    })?;
    time("attention (scores → softmax → · v)", &|| {
        let a = (q.as_tensor().matmul(&k.as_tensor().t()?)? / 8.0)?;
        let a = a.to_dtype(DType::F32)?.broadcast_add(&mask)?;
        let a = candle_nn::ops::softmax(&a, candle_core::D::Minus1)?.to_dtype(DType::BF16)?;
        a.matmul(vv.as_tensor())
    })?;
    time("projection x Wᵀ (2048 → 2048)", &|| {
        x.as_tensor().broadcast_matmul(&wq.as_tensor().t()?)
    })?;
    time("projection x Wᵀ (2048 → 5632)", &|| {
        x.as_tensor().broadcast_matmul(&wf.as_tensor().t()?)
    })?;
    Ok(())
}
