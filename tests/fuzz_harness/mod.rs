//! The fuzz targets' bodies, shared by the cargo-fuzz crate (`fuzz/fuzz_targets/*.rs`
//! include this file) and by `tests/fuzz_regressions.rs`, which replays every saved
//! crash input and a bounded sweep of pseudo-random inputs under `cargo test`.
//!
//! Every function takes arbitrary bytes and must return without panicking, aborting or
//! allocating without bound: a bad input is an `Err` from the crate, never a crash.
//! Where an input is accepted, the invariants below are asserted (a failed assertion is
//! a bug too): a loaded or quantized weight validates and survives a save/load round
//! trip, a loaded adapter saves and loads again.
#![allow(dead_code)]

use lora_kernels::neftune::{BackwardOptions, Index};
use lora_kernels::nf4::{Absmax, DoubleQuant};
use lora_kernels::peft::{Adapter, AdapterConfig};
use lora_kernels::{
    bf16, cpu, f16, DType, DoraGrads, DoraOutputs, DoraSaved, DoraWeights, Dropout, Element,
    EmbedShape, LoraGrads, LoraOptions, LoraShape, LoraWeights, Nf4Weight, Noise, QloraWeights,
    SeqLen,
};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The targets, by name (the cargo-fuzz binaries and the folders under
/// `fuzz/regressions/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("peft_adapter", peft_adapter),
    ("linear4bit", linear4bit),
    ("nf4_quantize", nf4_quantize),
    ("cpu_ops", cpu_ops),
    ("neftune_ops", neftune_ops),
];

/// The most elements any one buffer gets (the oracle's work stays small per input).
const MAX_BUF: usize = 4096;

/// Reads values from the fuzzer's bytes; past the end every read is 0.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// Mostly small, sometimes a value at or past a limit.
    pub fn dim(&mut self) -> usize {
        let sel = self.u8();
        match sel {
            0..=199 => (sel % 40) as usize,
            200..=209 => self.u16() as usize,
            210 => i32::MAX as usize,
            211 => i32::MAX as usize + 1,
            212 => u32::MAX as usize,
            213 => (u32::MAX as usize) + 2,
            214 => 1 << 40,
            215 => usize::MAX,
            216 => usize::MAX / 2,
            217 => usize::MAX / 4 + 1,
            218 => 257,
            219 => 256,
            _ => self.u64() as usize,
        }
    }

    /// A float: ordinary values mostly, sometimes NaN, ±inf, 0, −0, tiny or huge ones.
    pub fn f32(&mut self) -> f32 {
        let sel = self.u8();
        match sel {
            0..=179 => (self.u16() as i16) as f32 / 4096.0,
            180 => f32::NAN,
            181 => f32::INFINITY,
            182 => f32::NEG_INFINITY,
            183 => 0.0,
            184 => -0.0,
            185 => f32::MIN_POSITIVE / 8.0,
            186 => f32::MAX,
            187 => f32::MIN,
            188 => 1.0,
            189 => -1.0,
            _ => f32::from_bits(self.u32()),
        }
    }

    /// A probability-like value: valid ones mostly, sometimes out of range.
    pub fn prob(&mut self) -> f32 {
        match self.u8() % 10 {
            0 => 0.0,
            1 => 0.5,
            2 => 0.05,
            3 => 0.999_999,
            4 => 1.0,
            5 => -0.1,
            6 => f32::NAN,
            7 => f32::INFINITY,
            _ => self.u8() as f32 / 256.0,
        }
    }

    /// A buffer length for a tensor of `expected` elements (`None`: the count overflows):
    /// exact, one off, empty or random, never above [`MAX_BUF`].
    pub fn len(&mut self, expected: Option<usize>) -> usize {
        let sel = self.u8();
        let len = match (sel % 8, expected) {
            (0..=4, Some(e)) => e,
            (5, Some(e)) => e.saturating_add(1),
            (6, Some(e)) => e.saturating_sub(1),
            (7, _) => 0,
            _ => self.u16() as usize,
        };
        len.min(MAX_BUF)
    }

    pub fn vec<T: Element>(&mut self, len: usize) -> Vec<T> {
        (0..len).map(|_| T::from_f32(self.f32())).collect()
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

fn mul(a: usize, b: usize) -> Option<usize> {
    a.checked_mul(b)
}

// --- peft adapters --------------------------------------------------------------------

/// `adapter_config.json`, a NUL byte, then `adapter_model.safetensors`; without a NUL,
/// the whole input is the config and the tensors are empty.
pub fn peft_adapter(data: &[u8]) {
    let (config, tensors) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let config = String::from_utf8_lossy(config);
    if let Ok(c) = AdapterConfig::from_json(&config) {
        // Anything from_json accepts can be written back out and read again.
        if let Ok(json) = c.try_to_json() {
            AdapterConfig::from_json(&json).expect("a saved config loads again");
        }
    }
    adapter_round_trip::<f32>(&config, tensors);
    adapter_round_trip::<bf16>(&config, tensors);
    adapter_round_trip::<f16>(&config, tensors);
}

fn adapter_round_trip<T: Element>(config: &str, tensors: &[u8]) {
    let Ok(a) = Adapter::<T>::from_bytes(config, tensors) else {
        return;
    };
    a.validate().expect("a loaded adapter validates");
    for m in &a.modules {
        let _ = a.module(&m.name);
    }
    let (Ok(json), Ok(st)) = (a.config.try_to_json(), a.to_safetensors()) else {
        return;
    };
    let b = Adapter::<T>::from_bytes(&json, &st).expect("a saved adapter loads again");
    assert_eq!(a.modules.len(), b.modules.len());
}

// --- NF4: the Linear4bit loader, quantize / dequantize ---------------------------------

const PREFIXES: &[&str] = &["layer.", "", "model.layers.0.mlp.up_proj.", "."];

/// One byte picks the key prefix; the rest is the safetensors file.
pub fn linear4bit(data: &[u8]) {
    let mut inp = Input::new(data);
    let prefix = PREFIXES[inp.u8() as usize % PREFIXES.len()];
    let bytes = inp.rest();
    if let Ok(w) = Nf4Weight::load_linear4bit(bytes, prefix) {
        weight_invariants(&w, prefix);
    }
}

/// What holds for every weight the crate accepts.
fn weight_invariants(w: &Nf4Weight, prefix: &str) {
    w.validate()
        .expect("a loaded or quantized weight validates");
    let numel = w.numel().expect("numel of a valid weight");
    let d: Vec<f32> = w.dequantize().expect("a valid weight dequantizes");
    assert_eq!(d.len(), numel);
    let _ = w.bits_per_param();
    let saved = w.save_linear4bit(prefix).expect("a valid weight saves");
    let back = Nf4Weight::load_linear4bit(&saved, prefix).expect("a saved weight loads");
    let again = back
        .save_linear4bit(prefix)
        .expect("a reloaded weight saves");
    assert!(saved == again, "save → load → save changed the bytes");
}

/// Quantizes fuzzed values (any rows, cols, blocksize, lengths, non-finite values) and
/// checks what comes back; then an NF4 weight built field by field, maybe inconsistent,
/// through `validate`, `dequantize` and the NF4 matmul.
pub fn nf4_quantize(data: &[u8]) {
    let mut inp = Input::new(data);
    let rows = inp.dim();
    let cols = inp.dim();
    let blocksize = match inp.u8() % 8 {
        0 => 32,
        1 => 64,
        2 => 128,
        3 => 4096,
        4 => 8192,
        5 => 48,
        6 => 0,
        _ => inp.dim(),
    };
    let double = inp.bool();
    let allow_nonfinite = inp.bool();
    let len = inp.len(mul(rows, cols));
    let code = inp.f32();
    let _ = lora_kernels::nf4::nf4_code(code);
    let map = lora_kernels::nf4::dynamic_map();
    let _ = lora_kernels::nf4::dynamic_code(&map, code);
    let q = match inp.u8() % 3 {
        0 => quantize::<f32>(
            &mut inp,
            len,
            rows,
            cols,
            blocksize,
            double,
            allow_nonfinite,
        ),
        1 => quantize::<bf16>(
            &mut inp,
            len,
            rows,
            cols,
            blocksize,
            double,
            allow_nonfinite,
        ),
        _ => quantize::<f16>(
            &mut inp,
            len,
            rows,
            cols,
            blocksize,
            double,
            allow_nonfinite,
        ),
    };
    if let Ok(w) = q {
        assert_eq!((w.rows, w.cols, w.blocksize), (rows, cols, blocksize));
        if allow_nonfinite && w.validate().is_err() {
            // Documented: an infinite input gives a non-finite block scale, which
            // validate rejects; such a weight neither dequantizes nor saves.
            assert!(w.dequantize::<f32>().is_err() && w.save_linear4bit("layer.").is_err());
        } else {
            weight_invariants(&w, "layer.");
        }
    }
    let w = any_nf4(&mut inp);
    if w.validate().is_ok() {
        let _ = w.dequantize::<f32>().expect("a valid weight dequantizes");
    } else {
        assert!(
            w.dequantize::<f32>().is_err(),
            "an invalid weight dequantized"
        );
    }
    let tokens = inp.dim();
    let x_len = inp.len(w.numel().ok().and(mul(tokens, w.cols)));
    let y_len = inp.len(mul(tokens, w.rows));
    let bias = inp.bool().then(|| inp.len(Some(w.rows)));
    let x: Vec<f32> = inp.vec(x_len);
    let bias: Option<Vec<f32>> = bias.map(|l| inp.vec(l));
    let mut y = vec![0f32; y_len];
    let _ = cpu::nf4::matmul(tokens, &x, &w, bias.as_deref(), &mut y);
}

fn quantize<T: Element>(
    inp: &mut Input,
    len: usize,
    rows: usize,
    cols: usize,
    blocksize: usize,
    double: bool,
    allow_nonfinite: bool,
) -> lora_kernels::Result<Nf4Weight> {
    let w: Vec<T> = inp.vec(len);
    if allow_nonfinite {
        Nf4Weight::quantize_allow_nonfinite(&w, rows, cols, blocksize, double)
    } else {
        Nf4Weight::quantize(&w, rows, cols, blocksize, double)
    }
}

/// An NF4 weight: quantized from fuzzed values (valid), or built field by field with
/// fuzzed sizes and lengths (usually invalid).
fn any_nf4(inp: &mut Input) -> Nf4Weight {
    if inp.bool() {
        let (rows, cols) = (inp.dim() % 48 + 1, inp.dim() % 48 + 1);
        let w: Vec<f32> = inp.vec(rows * cols);
        let bs = [32, 64, 128][inp.u8() as usize % 3];
        if let Ok(w) = Nf4Weight::quantize(&w, rows, cols, bs, inp.bool()) {
            return w;
        }
    }
    let (rows, cols) = (inp.dim(), inp.dim());
    let blocksize = [64, 32, 0, 48, 1 << 20][inp.u8() as usize % 5];
    let numel = mul(rows, cols);
    let packed_len = inp.len(numel.map(|n| n.div_ceil(2)));
    let packed: Vec<u8> = (0..packed_len).map(|_| inp.u8()).collect();
    let blocks = numel.map(|n| n.div_ceil(blocksize.max(1)));
    let absmax = if inp.bool() {
        let l = inp.len(blocks);
        Absmax::F32(inp.vec(l))
    } else {
        let l = inp.len(blocks);
        let q: Vec<u8> = (0..l).map(|_| inp.u8()).collect();
        let l2 = inp.len(blocks.map(|b| b.div_ceil(256)));
        let absmax2 = inp.vec(l2);
        let lc = if inp.bool() { 256 } else { inp.u8() as usize };
        let code = inp.vec(lc);
        let offset = inp.f32();
        Absmax::Double(DoubleQuant {
            q,
            absmax2,
            code,
            offset,
        })
    };
    let dtype = [DType::F32, DType::F16, DType::BF16][inp.u8() as usize % 3];
    Nf4Weight {
        rows,
        cols,
        blocksize,
        packed,
        absmax,
        dtype,
    }
}

// --- the CPU ops' argument checks ------------------------------------------------------

/// One CPU op (LoRA, DoRA, QLoRA, QDoRA: forward, backward, norms, merge) on a fuzzed
/// shape, options and buffers of fuzzed lengths, in f32, bf16 or f16.
pub fn cpu_ops(data: &[u8]) {
    let mut inp = Input::new(data);
    match inp.u8() % 3 {
        0 => cpu_op::<f32>(&mut inp),
        1 => cpu_op::<bf16>(&mut inp),
        _ => cpu_op::<f16>(&mut inp),
    }
}

struct Lens {
    x: usize,
    w: usize,
    a: usize,
    b: usize,
    y: usize,
    h: usize,
    n: usize,
}

fn cpu_op<T: Element>(inp: &mut Input) {
    let op = inp.u8() % 16;
    let shape = LoraShape::new(inp.dim(), inp.dim(), inp.dim(), inp.dim());
    let (t, k, n, r) = (
        shape.tokens,
        shape.in_features,
        shape.out_features,
        shape.rank,
    );
    let scale = inp.f32();
    let mut opts = LoraOptions::new(scale);
    if inp.bool() {
        opts = opts.with_dropout(Dropout::new(inp.prob(), inp.u64(), inp.u64()));
    }
    let l = Lens {
        x: inp.len(mul(t, k)),
        w: inp.len(mul(n, k)),
        a: inp.len(mul(r, k)),
        b: inp.len(mul(n, r)),
        y: inp.len(mul(t, n)),
        h: inp.len(mul(t, r)),
        n: inp.len(Some(n)),
    };
    let x: Vec<T> = inp.vec(l.x);
    let mut w: Vec<T> = inp.vec(l.w);
    let a: Vec<T> = inp.vec(l.a);
    let b: Vec<T> = inp.vec(l.b);
    let bias: Option<Vec<T>> = inp.bool().then(|| inp.vec(l.n));
    let mag: Vec<T> = inp.vec(l.n);
    let h_in: Vec<T> = inp.vec(l.h);
    let dy: Vec<T> = inp.vec(l.y);
    let norm_in: Vec<f32> = inp.vec(l.n);
    let z_in: Vec<T> = inp.vec(l.y);
    let (with_h, with_norm, with_z) = (inp.bool(), inp.bool(), inp.bool());
    let mut y = vec![T::from_f32(0.0); l.y];
    let mut h = vec![T::from_f32(0.0); l.h];
    let mut norm = vec![0f32; l.n];
    let mut z = vec![T::from_f32(0.0); l.y];
    let mut dx = vec![T::from_f32(0.0); l.x];
    let mut da = vec![T::from_f32(0.0); l.a];
    let mut db = vec![T::from_f32(0.0); l.b];
    let mut dm = vec![T::from_f32(0.0); l.n];
    let q = any_nf4(inp);
    let _ = match op {
        0 => {
            let wts = LoraWeights {
                w: &w[..],
                a: &a[..],
                b: &b[..],
                bias: bias.as_deref(),
            };
            cpu::lora::forward(&shape, &opts, &x, wts, &mut y, with_h.then_some(&mut h[..]))
        }
        1 => {
            let wts = LoraWeights {
                w: &w[..],
                a: &a[..],
                b: &b[..],
                bias: bias.as_deref(),
            };
            let grads = LoraGrads {
                dx: &mut dx[..],
                da: &mut da[..],
                db: &mut db[..],
            };
            cpu::lora::backward(&shape, &opts, &x, wts, &h_in, &dy, grads)
        }
        2 => cpu::lora::merge(&shape, scale, &mut w, &a, &b),
        3 => cpu::lora::unmerge(&shape, scale, &mut w, &a, &b),
        4 => cpu::dora::weight_norm(&shape, scale, &w, &a, &b, &mut norm),
        5 => cpu::dora::magnitude_init(&shape, scale, &w, &a, &b, &mut dm),
        6 | 7 => {
            let wts = DoraWeights {
                w: &w[..],
                a: &a[..],
                b: &b[..],
                bias: bias.as_deref(),
                magnitude: &mag[..],
            };
            if op == 6 {
                let out = DoraOutputs {
                    y: &mut y[..],
                    h: with_h.then_some(&mut h[..]),
                    norm: with_norm.then_some(&mut norm[..]),
                    z: with_z.then_some(&mut z[..]),
                };
                cpu::dora::forward(&shape, &opts, &x, wts, out)
            } else {
                let saved = DoraSaved {
                    h: &h_in[..],
                    norm: &norm_in[..],
                    z: with_z.then_some(&z_in[..]),
                };
                let grads = DoraGrads {
                    dx: &mut dx[..],
                    da: &mut da[..],
                    db: &mut db[..],
                    dm: &mut dm[..],
                };
                cpu::dora::backward(&shape, &opts, &x, wts, saved, &dy, grads)
            }
        }
        8 => cpu::dora::merge(&shape, scale, &mut w, &a, &b, &mag, &mut norm),
        9 => cpu::dora::unmerge(&shape, scale, &mut w, &a, &b, &mag, &norm_in),
        10 => {
            let wts = QloraWeights {
                w: &q,
                a: &a[..],
                b: &b[..],
                bias: bias.as_deref(),
            };
            cpu::qlora::forward(&shape, &opts, &x, wts, &mut y, with_h.then_some(&mut h[..]))
        }
        11 => {
            let wts = QloraWeights {
                w: &q,
                a: &a[..],
                b: &b[..],
                bias: bias.as_deref(),
            };
            let grads = LoraGrads {
                dx: &mut dx[..],
                da: &mut da[..],
                db: &mut db[..],
            };
            cpu::qlora::backward(&shape, &opts, &x, wts, &h_in, &dy, grads)
        }
        12 => cpu::qdora::weight_norm(&shape, scale, &q, &a, &b, &mut norm),
        13 => cpu::qdora::magnitude_init(&shape, scale, &q, &a, &b, &mut dm),
        _ => {
            let wts = DoraWeights {
                w: &q,
                a: &a[..],
                b: &b[..],
                bias: bias.as_deref(),
                magnitude: &mag[..],
            };
            if op == 14 {
                let out = DoraOutputs {
                    y: &mut y[..],
                    h: with_h.then_some(&mut h[..]),
                    norm: with_norm.then_some(&mut norm[..]),
                    z: with_z.then_some(&mut z[..]),
                };
                cpu::qdora::forward(&shape, &opts, &x, wts, out)
            } else {
                let saved = DoraSaved {
                    h: &h_in[..],
                    norm: &norm_in[..],
                    z: with_z.then_some(&z_in[..]),
                };
                let grads = DoraGrads {
                    dx: &mut dx[..],
                    da: &mut da[..],
                    db: &mut db[..],
                    dm: &mut dm[..],
                };
                cpu::qdora::backward(&shape, &opts, &x, wts, saved, &dy, grads)
            }
        }
    };
}

// --- NEFTune ---------------------------------------------------------------------------

/// gather / embed / add_noise / embedding_backward on a fuzzed shape, ids of each index
/// type (any values), a fuzzed noise, mask or lengths, and buffers of fuzzed lengths.
pub fn neftune_ops(data: &[u8]) {
    let mut inp = Input::new(data);
    match inp.u8() % 6 {
        0 => neftune_op::<f32, u32>(&mut inp),
        1 => neftune_op::<bf16, i64>(&mut inp),
        2 => neftune_op::<f16, i32>(&mut inp),
        3 => neftune_op::<f32, i64>(&mut inp),
        4 => neftune_op::<bf16, u8>(&mut inp),
        _ => neftune_op::<f32, i32>(&mut inp),
    }
}

fn index<I: Index + Copy + TryFrom<i64>>(inp: &mut Input, vocab: usize) -> I {
    let v: i64 = match inp.u8() % 8 {
        0..=4 => (inp.u16() as usize % vocab.clamp(1, 1 << 16)) as i64,
        5 => -1,
        6 => vocab as i64,
        _ => inp.u64() as i64,
    };
    I::try_from(v)
        .ok()
        .or_else(|| I::try_from(0).ok())
        .expect("0 fits every index type")
}

fn neftune_op<T: Element, I: Index + Copy + TryFrom<i64>>(inp: &mut Input) {
    let op = inp.u8() % 4;
    let shape = EmbedShape::new(inp.dim(), inp.dim(), inp.dim(), inp.dim());
    let tokens = mul(shape.batch, shape.seq);
    let table_len = inp.len(mul(shape.vocab, shape.dim));
    let ids_len = inp.len(tokens);
    let out_len = inp.len(tokens.and_then(|t| mul(t, shape.dim)));
    let table: Vec<T> = inp.vec(table_len);
    let ids: Vec<I> = (0..ids_len).map(|_| index(inp, shape.vocab)).collect();
    let noise = Noise::new(inp.f32(), inp.u64(), inp.u64());
    let len_kind = inp.u8() % 3;
    let mask_len = inp.len(tokens);
    let mask: Vec<I> = (0..mask_len).map(|_| index(inp, 2)).collect();
    let lengths_len = inp.len(Some(shape.batch));
    let lengths: Vec<I> = (0..lengths_len)
        .map(|_| index(inp, shape.seq.saturating_add(1)))
        .collect();
    let len = match len_kind {
        0 => SeqLen::Padded,
        1 => SeqLen::Mask(&mask[..]),
        _ => SeqLen::Lengths(&lengths[..]),
    };
    let mut out = vec![T::from_f32(0.0); out_len];
    let _ = match op {
        0 => cpu::neftune::gather(&shape, &table, &ids, &mut out),
        1 => cpu::neftune::embed(&shape, &table, &ids, &noise, len, &mut out),
        2 => {
            let mut emb: Vec<T> = inp.vec(out_len);
            cpu::neftune::add_noise(&shape, &noise, len, &mut emb)
        }
        _ => {
            let d_out: Vec<T> = inp.vec(out_len);
            let mut d_table = vec![0f32; table_len];
            let opts = BackwardOptions {
                deterministic: inp.bool(),
                padding_idx: inp.bool().then(|| inp.dim()),
            };
            cpu::neftune::embedding_backward(&shape, &ids, &d_out, &mut d_table, &opts)
        }
    };
    let _ = lora_kernels::neftune::check_ids(&ids, shape.vocab);
}
