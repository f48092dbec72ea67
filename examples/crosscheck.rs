//! The crate's half of the peft cross-check: fresh random LoRA, rsLoRA, DoRA and QLoRA
//! layers, forward and backward through the crate, written as one safetensors file per
//! case for `scripts/crosscheck.py`, which rebuilds each layer with peft (and
//! bitsandbytes for the NF4 base, where installed) and compares.
//!
//! ```text
//! cargo run --release --example crosscheck -- --out DIR [--seed N] [--cpu]
//! python3 scripts/crosscheck.py DIR        # on a machine with torch and peft
//! ```
//!
//! It runs the CUDA ops when `Gpu::new(0)` works, else (or with `--cpu`) the CPU oracle,
//! and says so; the device used is in each file's metadata. Dropout is 0 in every case:
//! peft draws its dropout mask from torch's RNG, which the crate's Philox mask does not
//! reproduce, so a dropout case could not be compared element by element.
//!
//! Each file holds the inputs (`x`, `W` or the NF4 weight as a bitsandbytes
//! `Linear4bit` state dict under `base.`, `bias`, `A`, `B`, `magnitude`), `dy`, and the
//! crate's outputs (`y`, `dx`, `dA`, `dB`; DoRA: `dm` and the f32 row norms `norm`;
//! QLoRA: `W_deq`, the NF4 weight dequantized by the crate), in the case's dtype (f32 or
//! bf16), and the case's parameters as JSON under the metadata key `meta`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lora_kernels::cpu::{
    dora as cpu_dora, lora as cpu_lora, qdora as cpu_qdora, qlora as cpu_qlora,
};
use lora_kernels::cuda::nf4::{self as cuda_nf4, Nf4Device};
use lora_kernels::cuda::{
    dora as cuda_dora, lora as cuda_lora, qdora as cuda_qdora, qlora as cuda_qlora, Gpu,
};
use lora_kernels::{
    bf16, lora, DType, DoraGrads, DoraOutputs, DoraSaved, DoraWeights, Element, LoraGrads,
    LoraOptions, LoraShape, LoraWeights, Nf4Weight, QloraWeights,
};
use safetensors::{tensor::TensorView, Dtype};

/// NF4 blocksize of the QLoRA cases (bitsandbytes' default for QLoRA).
const BLOCKSIZE: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Lora,
    Dora,
    Qlora {
        double_quant: bool,
    },
    /// QDoRA: DoRA over the NF4 base.
    Qdora {
        double_quant: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    kind: Kind,
    dtype: DType,
    /// T, K, N, r.
    dims: (usize, usize, usize, usize),
    alpha: f32,
    rslora: bool,
    bias: bool,
    /// DoRA: hand `z` to backward (else backward recomputes it).
    save_z: bool,
}

const fn case(
    name: &'static str,
    kind: Kind,
    dtype: DType,
    dims: (usize, usize, usize, usize),
    alpha: f32,
    rslora: bool,
    bias: bool,
) -> Case {
    Case {
        name,
        kind,
        dtype,
        dims,
        alpha,
        rslora,
        bias,
        save_z: bias,
    }
}

const DQ: Kind = Kind::Qlora { double_quant: true };
const PLAIN: Kind = Kind::Qlora {
    double_quant: false,
};

/// The cases: odd shapes, both the small-T (T ≤ 32) and the large-T paths, f32 and bf16.
/// Columns: name, kind, dtype, (T, K, N, r), alpha, rslora, bias.
#[rustfmt::skip]
const CASES: &[Case] = &[
    case("lora_bias_f32", Kind::Lora, DType::F32, (7, 80, 48, 8), 16.0, false, true),
    case("lora_bias_bf16", Kind::Lora, DType::BF16, (33, 96, 200, 16), 32.0, false, true),
    case("lora_bf16_t7", Kind::Lora, DType::BF16, (7, 96, 48, 16), 16.0, false, false),
    case("rslora_f32", Kind::Lora, DType::F32, (33, 96, 200, 16), 16.0, true, false),
    case("rslora_bias_bf16", Kind::Lora, DType::BF16, (7, 80, 48, 8), 16.0, true, true),
    case("dora_bias_f32", Kind::Dora, DType::F32, (7, 80, 48, 8), 16.0, false, true),
    case("dora_nobias_f32", Kind::Dora, DType::F32, (33, 96, 200, 16), 32.0, false, false),
    case("dora_bias_bf16", Kind::Dora, DType::BF16, (7, 96, 200, 16), 16.0, false, true),
    case("dora_nobias_bf16", Kind::Dora, DType::BF16, (33, 80, 48, 8), 16.0, false, false),
    case("dora_rslora_bias_bf16", Kind::Dora, DType::BF16, (33, 96, 48, 16), 16.0, true, true),
    case("qlora_dq_bias_f32", DQ, DType::F32, (7, 96, 200, 8), 16.0, false, true),
    case("qlora_dq_f32_t33", DQ, DType::F32, (33, 80, 48, 16), 16.0, false, false),
    case("qlora_dq_bias_bf16", DQ, DType::BF16, (7, 96, 48, 16), 32.0, false, true),
    case("qlora_dq_bf16_t33", DQ, DType::BF16, (33, 80, 200, 8), 16.0, false, false),
    case("qlora_plain_rslora_bf16", PLAIN, DType::BF16, (33, 96, 48, 16), 16.0, true, true),
    case("qdora_dq_bias_f32", Kind::Qdora { double_quant: true }, DType::F32, (7, 96, 200, 8), 16.0, false, true),
    case("qdora_dq_bf16_t33", Kind::Qdora { double_quant: true }, DType::BF16, (33, 80, 48, 16), 16.0, false, false),
    case("qdora_plain_bias_bf16", Kind::Qdora { double_quant: false }, DType::BF16, (7, 96, 48, 8), 32.0, false, true),
];

struct Args {
    out: PathBuf,
    seed: u64,
    force_cpu: bool,
}

fn parse_args() -> Result<Args, String> {
    let usage = "usage: crosscheck --out DIR [--seed N] [--cpu]";
    let (mut out, mut seed, mut force_cpu) = (None, 1u64, false);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--out" => out = Some(PathBuf::from(it.next().ok_or("--out needs a value")?)),
            "--seed" => {
                seed = it
                    .next()
                    .ok_or("--seed needs a value")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--cpu" => force_cpu = true,
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} ({usage})")),
        }
    }
    let out = out.ok_or_else(|| format!("--out is required ({usage})"))?;
    Ok(Args {
        out,
        seed,
        force_cpu,
    })
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// `n` values uniform in [-scale, scale), rounded to T.
    fn uniform<T: Element>(&mut self, n: usize, scale: f64) -> Vec<T> {
        (0..n)
            .map(|_| T::from_f64((2.0 * self.unit() - 1.0) * scale))
            .collect()
    }
    /// `n` values of random sign and magnitude uniform in [lo, hi): never zero.
    fn away_from_zero<T: Element>(&mut self, n: usize, lo: f64, hi: f64) -> Vec<T> {
        (0..n)
            .map(|_| {
                let sign = if self.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
                T::from_f64(sign * (lo + (hi - lo) * self.unit()))
            })
            .collect()
    }
    /// `n` values uniform in [lo, hi) (positive for lo > 0).
    fn range<T: Element>(&mut self, n: usize, lo: f64, hi: f64) -> Vec<T> {
        (0..n)
            .map(|_| T::from_f64(lo + (hi - lo) * self.unit()))
            .collect()
    }
}

/// One tensor of the output file.
struct Tensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn tensor<T: Element>(name: &str, shape: &[usize], v: &[T]) -> Tensor {
    assert_eq!(shape.iter().product::<usize>(), v.len(), "{name}: shape");
    let (dtype, data) = match T::DTYPE {
        DType::F32 => (
            Dtype::F32,
            v.iter().flat_map(|e| e.to_f32().to_le_bytes()).collect(),
        ),
        // Exact: the values already are bf16 / f16.
        DType::BF16 => (
            Dtype::BF16,
            v.iter()
                .flat_map(|e| bf16::from_f32(e.to_f32()).to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            Dtype::F16,
            v.iter()
                .flat_map(|e| half::f16::from_f32(e.to_f32()).to_le_bytes())
                .collect(),
        ),
    };
    Tensor {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
    }
}

fn write_file(path: &Path, tensors: &[Tensor], meta: &serde_json::Value) -> Result<(), String> {
    let views = tensors
        .iter()
        .map(|t| {
            TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| format!("{}: {e}", t.name))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let info = HashMap::from([("meta".to_string(), meta.to_string())]);
    let bytes = safetensors::serialize(views, Some(info)).map_err(|e| e.to_string())?;
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The NF4 weight as the tensors of a bitsandbytes `Linear4bit` state dict, keys under
/// `base.` (`base.weight`, `base.weight.absmax`, ..., the quant state JSON as u8).
fn nf4_tensors(q: &Nf4Weight) -> Result<Vec<Tensor>, String> {
    let bytes = q.save_linear4bit("base.").map_err(|e| e.to_string())?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
    let mut out: Vec<Tensor> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| Tensor {
            name,
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Where the crate's ops run.
enum Device<'a> {
    Gpu(&'a Gpu),
    Cpu,
}

type Res<T> = Result<T, String>;

fn err(what: &str) -> impl Fn(lora_kernels::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// The inputs of one case, in T.
struct Inputs<T> {
    shape: LoraShape,
    x: Vec<T>,
    w: Vec<T>,
    a: Vec<T>,
    b: Vec<T>,
    bias: Option<Vec<T>>,
    m: Vec<T>,
    dy: Vec<T>,
}

impl<T: Element> Inputs<T> {
    fn random(c: &Case, seed: u64) -> Self {
        let (t, k, n, r) = c.dims;
        let shape = LoraShape::new(t, k, n, r);
        let mut rng = Rng(seed);
        let ks = 1.0 / (k as f64).sqrt();
        Inputs {
            shape,
            x: rng.uniform(shape.x_len(), 1.0),
            w: rng.uniform(shape.w_len(), ks),
            a: rng.uniform(shape.a_len(), ks),
            // Non-zero (peft initializes B to zero; here the low-rank term must matter).
            b: rng.away_from_zero(shape.b_len(), 0.05, 0.5),
            bias: c.bias.then(|| rng.uniform(n, 0.5)),
            // Positive, around the rows' norms (≈ 0.58), so the DoRA scale is 1 ± O(1).
            m: rng.range(n, 0.3, 1.5),
            dy: rng.uniform(shape.y_len(), 1.0),
        }
    }
}

/// Runs one case; returns the tensors to write (inputs and the crate's outputs).
fn run_case<T: Element>(c: &Case, seed: u64, dev: &Device) -> Res<Vec<Tensor>> {
    let inp = Inputs::<T>::random(c, seed);
    let s = inp.shape;
    let (t, k, n, r) = (s.tokens, s.in_features, s.out_features, s.rank);
    let scale = if c.rslora {
        lora::rslora_scale(c.alpha, r)
    } else {
        lora::scale(c.alpha, r)
    };
    let opts = LoraOptions::new(scale);
    let mut out = vec![
        tensor("x", &[t, k], &inp.x),
        tensor("A", &[r, k], &inp.a),
        tensor("B", &[n, r], &inp.b),
        tensor("dy", &[t, n], &inp.dy),
    ];
    if let Some(bias) = &inp.bias {
        out.push(tensor("bias", &[n], bias));
    }
    let zero = |len: usize| vec![T::default(); len];
    let (mut y, mut h) = (zero(s.y_len()), zero(s.h_len()));
    let (mut dx, mut da, mut db) = (zero(s.x_len()), zero(s.a_len()), zero(s.b_len()));
    match c.kind {
        Kind::Lora => {
            out.push(tensor("W", &[n, k], &inp.w));
            match dev {
                Device::Cpu => {
                    let wts = LoraWeights {
                        w: &inp.w[..],
                        a: &inp.a[..],
                        b: &inp.b[..],
                        bias: inp.bias.as_deref(),
                    };
                    cpu_lora::forward(&s, &opts, &inp.x, wts, &mut y, Some(&mut h))
                        .map_err(err("forward"))?;
                    let grads = LoraGrads {
                        dx: &mut dx[..],
                        da: &mut da[..],
                        db: &mut db[..],
                    };
                    cpu_lora::backward(&s, &opts, &inp.x, wts, &h, &inp.dy, grads)
                        .map_err(err("backward"))?;
                }
                Device::Gpu(gpu) => {
                    let up = |v: &[T]| gpu.upload(v).map_err(err("upload"));
                    let (xd, wd, ad, bd, dyd) = (
                        up(&inp.x)?,
                        up(&inp.w)?,
                        up(&inp.a)?,
                        up(&inp.b)?,
                        up(&inp.dy)?,
                    );
                    let biasd = inp.bias.as_deref().map(up).transpose()?;
                    let wts = LoraWeights {
                        w: &wd,
                        a: &ad,
                        b: &bd,
                        bias: biasd.as_ref(),
                    };
                    let (mut yd, mut hd) = (up(&y)?, up(&h)?);
                    cuda_lora::forward(gpu, &s, &opts, &xd, wts, &mut yd, Some(&mut hd))
                        .map_err(err("forward"))?;
                    let (mut dxd, mut dad, mut dbd) = (up(&dx)?, up(&da)?, up(&db)?);
                    let grads = LoraGrads {
                        dx: &mut dxd,
                        da: &mut dad,
                        db: &mut dbd,
                    };
                    cuda_lora::backward(gpu, &s, &opts, &xd, wts, &hd, &dyd, grads)
                        .map_err(err("backward"))?;
                    let down = |d| gpu.download(d).map_err(err("download"));
                    (y, dx, da, db) = (down(&yd)?, down(&dxd)?, down(&dad)?, down(&dbd)?);
                }
            }
        }
        Kind::Qlora { double_quant } => {
            let q = Nf4Weight::quantize(&inp.w, n, k, BLOCKSIZE, double_quant)
                .map_err(err("quantize"))?;
            out.extend(nf4_tensors(&q)?);
            let w_deq: Vec<T> = match dev {
                Device::Cpu => {
                    let wts = QloraWeights {
                        w: &q,
                        a: &inp.a[..],
                        b: &inp.b[..],
                        bias: inp.bias.as_deref(),
                    };
                    cpu_qlora::forward(&s, &opts, &inp.x, wts, &mut y, Some(&mut h))
                        .map_err(err("forward"))?;
                    let grads = LoraGrads {
                        dx: &mut dx[..],
                        da: &mut da[..],
                        db: &mut db[..],
                    };
                    cpu_qlora::backward(&s, &opts, &inp.x, wts, &h, &inp.dy, grads)
                        .map_err(err("backward"))?;
                    q.dequantize::<T>().map_err(err("dequantize"))?
                }
                Device::Gpu(gpu) => {
                    let up = |v: &[T]| gpu.upload(v).map_err(err("upload"));
                    let wq = Nf4Device::upload(gpu, &q).map_err(err("upload NF4"))?;
                    let (xd, ad, bd, dyd) = (up(&inp.x)?, up(&inp.a)?, up(&inp.b)?, up(&inp.dy)?);
                    let biasd = inp.bias.as_deref().map(up).transpose()?;
                    let wts = QloraWeights {
                        w: &wq,
                        a: &ad,
                        b: &bd,
                        bias: biasd.as_ref(),
                    };
                    let (mut yd, mut hd) = (up(&y)?, up(&h)?);
                    cuda_qlora::forward(gpu, &s, &opts, &xd, wts, &mut yd, Some(&mut hd))
                        .map_err(err("forward"))?;
                    let (mut dxd, mut dad, mut dbd) = (up(&dx)?, up(&da)?, up(&db)?);
                    let grads = LoraGrads {
                        dx: &mut dxd,
                        da: &mut dad,
                        db: &mut dbd,
                    };
                    cuda_qlora::backward(gpu, &s, &opts, &xd, wts, &hd, &dyd, grads)
                        .map_err(err("backward"))?;
                    let mut wdd = up(&zero(s.w_len()))?;
                    cuda_nf4::dequantize(gpu, &wq, &mut wdd).map_err(err("dequantize"))?;
                    let down = |d| gpu.download(d).map_err(err("download"));
                    (y, dx, da, db) = (down(&yd)?, down(&dxd)?, down(&dad)?, down(&dbd)?);
                    down(&wdd)?
                }
            };
            out.push(tensor("W_deq", &[n, k], &w_deq));
        }
        Kind::Qdora { double_quant } => {
            let q = Nf4Weight::quantize(&inp.w, n, k, BLOCKSIZE, double_quant)
                .map_err(err("quantize"))?;
            out.extend(nf4_tensors(&q)?);
            out.push(tensor("magnitude", &[n], &inp.m));
            let mut dm = zero(n);
            let mut norm = vec![0f32; n];
            let mut z = zero(s.y_len());
            match dev {
                Device::Cpu => {
                    let wts = DoraWeights {
                        w: &q,
                        a: &inp.a[..],
                        b: &inp.b[..],
                        bias: inp.bias.as_deref(),
                        magnitude: &inp.m[..],
                    };
                    let outs = DoraOutputs {
                        y: &mut y[..],
                        h: Some(&mut h[..]),
                        norm: Some(&mut norm[..]),
                        z: Some(&mut z[..]),
                    };
                    cpu_qdora::forward(&s, &opts, &inp.x, wts, outs).map_err(err("forward"))?;
                    let saved = DoraSaved {
                        h: &h[..],
                        norm: &norm[..],
                        z: c.save_z.then_some(&z[..]),
                    };
                    let grads = DoraGrads {
                        dx: &mut dx[..],
                        da: &mut da[..],
                        db: &mut db[..],
                        dm: &mut dm[..],
                    };
                    cpu_qdora::backward(&s, &opts, &inp.x, wts, saved, &inp.dy, grads)
                        .map_err(err("backward"))?;
                    out.push(tensor(
                        "W_deq",
                        &[n, k],
                        &q.dequantize::<T>().map_err(err("dequantize"))?,
                    ));
                }
                Device::Gpu(gpu) => {
                    let up = |v: &[T]| gpu.upload(v).map_err(err("upload"));
                    let wq = Nf4Device::upload(gpu, &q).map_err(err("upload NF4"))?;
                    let (xd, ad, bd, md, dyd) = (
                        up(&inp.x)?,
                        up(&inp.a)?,
                        up(&inp.b)?,
                        up(&inp.m)?,
                        up(&inp.dy)?,
                    );
                    let biasd = inp.bias.as_deref().map(up).transpose()?;
                    let wts = DoraWeights {
                        w: &wq,
                        a: &ad,
                        b: &bd,
                        bias: biasd.as_ref(),
                        magnitude: &md,
                    };
                    let (mut yd, mut hd, mut zd) = (up(&y)?, up(&h)?, up(&z)?);
                    let mut normd = gpu.upload(&norm).map_err(err("upload"))?;
                    let outs = DoraOutputs {
                        y: &mut yd,
                        h: Some(&mut hd),
                        norm: Some(&mut normd),
                        z: if c.save_z { Some(&mut zd) } else { None },
                    };
                    cuda_qdora::forward(gpu, &s, &opts, &xd, wts, outs).map_err(err("forward"))?;
                    let (mut dxd, mut dad, mut dbd, mut dmd) =
                        (up(&dx)?, up(&da)?, up(&db)?, up(&dm)?);
                    let saved = DoraSaved {
                        h: &hd,
                        norm: &normd,
                        z: c.save_z.then_some(&zd),
                    };
                    let grads = DoraGrads {
                        dx: &mut dxd,
                        da: &mut dad,
                        db: &mut dbd,
                        dm: &mut dmd,
                    };
                    cuda_qdora::backward(gpu, &s, &opts, &xd, wts, saved, &dyd, grads)
                        .map_err(err("backward"))?;
                    let mut wdd = up(&zero(s.w_len()))?;
                    cuda_nf4::dequantize(gpu, &wq, &mut wdd).map_err(err("dequantize"))?;
                    let down = |d| gpu.download(d).map_err(err("download"));
                    (y, dx, da, db, dm) = (
                        down(&yd)?,
                        down(&dxd)?,
                        down(&dad)?,
                        down(&dbd)?,
                        down(&dmd)?,
                    );
                    norm = gpu.download(&normd).map_err(err("download"))?;
                    out.push(tensor("W_deq", &[n, k], &down(&wdd)?));
                }
            }
            out.push(tensor("dm", &[n], &dm));
            out.push(tensor("norm", &[n], &norm));
        }
        Kind::Dora => {
            out.push(tensor("W", &[n, k], &inp.w));
            out.push(tensor("magnitude", &[n], &inp.m));
            let mut dm = zero(n);
            let mut norm = vec![0f32; n];
            let mut z = zero(s.y_len());
            match dev {
                Device::Cpu => {
                    let wts = DoraWeights {
                        w: &inp.w[..],
                        a: &inp.a[..],
                        b: &inp.b[..],
                        bias: inp.bias.as_deref(),
                        magnitude: &inp.m[..],
                    };
                    let outs = DoraOutputs {
                        y: &mut y[..],
                        h: Some(&mut h[..]),
                        norm: Some(&mut norm[..]),
                        z: Some(&mut z[..]),
                    };
                    cpu_dora::forward(&s, &opts, &inp.x, wts, outs).map_err(err("forward"))?;
                    let saved = DoraSaved {
                        h: &h[..],
                        norm: &norm[..],
                        z: c.save_z.then_some(&z[..]),
                    };
                    let grads = DoraGrads {
                        dx: &mut dx[..],
                        da: &mut da[..],
                        db: &mut db[..],
                        dm: &mut dm[..],
                    };
                    cpu_dora::backward(&s, &opts, &inp.x, wts, saved, &inp.dy, grads)
                        .map_err(err("backward"))?;
                }
                Device::Gpu(gpu) => {
                    let up = |v: &[T]| gpu.upload(v).map_err(err("upload"));
                    let (xd, wd, ad, bd, md, dyd) = (
                        up(&inp.x)?,
                        up(&inp.w)?,
                        up(&inp.a)?,
                        up(&inp.b)?,
                        up(&inp.m)?,
                        up(&inp.dy)?,
                    );
                    let biasd = inp.bias.as_deref().map(up).transpose()?;
                    let wts = DoraWeights {
                        w: &wd,
                        a: &ad,
                        b: &bd,
                        bias: biasd.as_ref(),
                        magnitude: &md,
                    };
                    let (mut yd, mut hd, mut zd) = (up(&y)?, up(&h)?, up(&z)?);
                    let mut normd = gpu.upload(&norm).map_err(err("upload"))?;
                    let outs = DoraOutputs {
                        y: &mut yd,
                        h: Some(&mut hd),
                        norm: Some(&mut normd),
                        z: if c.save_z { Some(&mut zd) } else { None },
                    };
                    cuda_dora::forward(gpu, &s, &opts, &xd, wts, outs).map_err(err("forward"))?;
                    let (mut dxd, mut dad, mut dbd, mut dmd) =
                        (up(&dx)?, up(&da)?, up(&db)?, up(&dm)?);
                    let saved = DoraSaved {
                        h: &hd,
                        norm: &normd,
                        z: c.save_z.then_some(&zd),
                    };
                    let grads = DoraGrads {
                        dx: &mut dxd,
                        da: &mut dad,
                        db: &mut dbd,
                        dm: &mut dmd,
                    };
                    cuda_dora::backward(gpu, &s, &opts, &xd, wts, saved, &dyd, grads)
                        .map_err(err("backward"))?;
                    let down = |d| gpu.download(d).map_err(err("download"));
                    (y, dx, da, db, dm) = (
                        down(&yd)?,
                        down(&dxd)?,
                        down(&dad)?,
                        down(&dbd)?,
                        down(&dmd)?,
                    );
                    norm = gpu.download(&normd).map_err(err("download"))?;
                }
            }
            out.push(tensor("dm", &[n], &dm));
            out.push(tensor("norm", &[n], &norm));
        }
    }
    out.push(tensor("y", &[t, n], &y));
    out.push(tensor("dx", &[t, k], &dx));
    out.push(tensor("dA", &[r, k], &da));
    out.push(tensor("dB", &[n, r], &db));
    Ok(out)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let gpu = if args.force_cpu {
        None
    } else {
        match Gpu::new(0) {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("\n*** crosscheck: no usable GPU ({e}) ***");
                None
            }
        }
    };
    let (dev, device_name) = match &gpu {
        Some(g) => {
            let (maj, min) = g.compute_capability();
            println!(
                "crosscheck: the crate's CUDA ops on {} (sm_{maj}{min})",
                g.name()
            );
            (
                Device::Gpu(g),
                format!("cuda: {} (sm_{maj}{min})", g.name()),
            )
        }
        None => {
            eprintln!(
                "*** crosscheck: running the CPU ORACLE, not the CUDA kernels{} ***\n",
                if args.force_cpu { " (--cpu)" } else { "" }
            );
            (Device::Cpu, "cpu-oracle".to_string())
        }
    };
    println!("dropout is 0 in every case: peft's dropout mask comes from torch's RNG, not the crate's Philox stream");
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        eprintln!("error: {}: {e}", args.out.display());
        std::process::exit(2);
    }
    let mut failed = false;
    for (i, c) in CASES.iter().enumerate() {
        let (t, k, n, r) = c.dims;
        let case_seed = args
            .seed
            .wrapping_mul(0x2545_F491_4F6C_DD1D)
            .wrapping_add(i as u64 + 1);
        let scale = if c.rslora {
            lora::rslora_scale(c.alpha, r)
        } else {
            lora::scale(c.alpha, r)
        };
        let result = match c.dtype {
            DType::F32 => run_case::<f32>(c, case_seed, &dev),
            DType::BF16 => run_case::<bf16>(c, case_seed, &dev),
            DType::F16 => run_case::<half::f16>(c, case_seed, &dev),
        };
        let (qlora, double_quant) = match c.kind {
            Kind::Qlora { double_quant } | Kind::Qdora { double_quant } => (true, double_quant),
            _ => (false, false),
        };
        let dora = matches!(c.kind, Kind::Dora | Kind::Qdora { .. });
        let meta = serde_json::json!({
            "case": c.name,
            "dtype": dtype_name(c.dtype),
            "T": t, "K": k, "N": n, "r": r,
            "alpha": c.alpha,
            "scale": scale,
            "rslora": c.rslora,
            "dora": dora,
            "qlora": qlora,
            "bias": c.bias,
            "blocksize": if qlora { Some(BLOCKSIZE) } else { None },
            "double_quant": double_quant,
            "dora_z_saved": dora && c.save_z,
            "dropout": 0.0,
            "seed": case_seed,
            "device": device_name,
            "crate": concat!("lora-kernels ", env!("CARGO_PKG_VERSION")),
        });
        let path = args.out.join(format!("{}.safetensors", c.name));
        match result.and_then(|tensors| write_file(&path, &tensors, &meta)) {
            Ok(()) => println!(
                "  {:<26} {:>8}  T={t:<3} K={k:<3} N={n:<3} r={r:<2} scale={scale:<8} -> {}",
                c.name,
                dtype_name(c.dtype),
                path.display()
            ),
            Err(e) => {
                eprintln!("  {}: FAILED: {e}", c.name);
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
    println!(
        "wrote {} cases; compare them with: python3 scripts/crosscheck.py {}",
        CASES.len(),
        args.out.display()
    );
}
