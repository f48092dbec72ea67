//! NF4 on the CPU against bitsandbytes' own outputs (tests/fixtures/peer/nf4_*):
//! packed bytes, absmax (plain and double-quantized), the dequantized weight, the
//! matmul, and Linear4bit checkpoints (load, save, round trip, bad input).

mod common;

use common::fixtures_dir;
use lora_kernels::nf4::{dynamic_code, dynamic_map, nf4_code, Absmax, NF4_CODE, NF4_MIDPOINTS};
use lora_kernels::{bf16, Error, Nf4Weight};
use safetensors::SafeTensors;

struct Raw {
    bytes: Vec<u8>,
}

impl Raw {
    fn open(name: &str) -> Raw {
        let path = fixtures_dir().join(name);
        Raw {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }
    fn data(&self, name: &str) -> Vec<u8> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        st.tensor(name).unwrap().data().to_vec()
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        self.data(name)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn bf16(&self, name: &str) -> Vec<bf16> {
        self.data(name)
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes(c.try_into().unwrap())))
            .collect()
    }
}

fn bits(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn code_table_and_thresholds() {
    for i in 0..15 {
        assert!(NF4_CODE[i] < NF4_MIDPOINTS[i] && NF4_MIDPOINTS[i] < NF4_CODE[i + 1]);
        let mid = (NF4_CODE[i] as f64 + NF4_CODE[i + 1] as f64) / 2.0;
        assert!((NF4_MIDPOINTS[i] as f64 - mid).abs() < 1e-7, "midpoint {i}");
        // A value on a midpoint takes the lower code.
        assert_eq!(nf4_code(NF4_MIDPOINTS[i]), i as u8);
        assert_eq!(nf4_code(NF4_CODE[i]), i as u8);
    }
    assert_eq!(nf4_code(f32::NAN), 0);
    assert_eq!(nf4_code(1.0), 15);
}

#[test]
fn dynamic_map_is_bitsandbytes() {
    let fx = Raw::open("nf4_64x128_bs64_dq.safetensors");
    let want = fx.f32("nested_code");
    let got = dynamic_map();
    for i in 0..256 {
        assert_eq!(
            got[i].to_bits(),
            want[i].to_bits(),
            "code {i}: {} vs {}",
            got[i],
            want[i]
        );
    }
    // Every code maps to itself.
    for (i, &c) in got.iter().enumerate() {
        assert_eq!(got[dynamic_code(&got, c) as usize], c, "code {i}");
    }
}

fn check_case(name: &str, double: bool) {
    let fx = Raw::open(name);
    let w = fx.bf16("weight_bf16");
    let q = Nf4Weight::quantize(&w, 64, 128, 64, double).unwrap();
    assert_eq!(q.packed, fx.data("packed"), "{name}: packed bytes");
    match &q.absmax {
        Absmax::F32(a) => assert_eq!(a, &fx.f32("absmax_f32"), "{name}: absmax"),
        Absmax::Double(d) => {
            assert_eq!(d.offset, fx.f32("nested_offset")[0], "{name}: offset");
            assert_eq!(d.absmax2, fx.f32("nested_absmax"), "{name}: nested absmax");
            assert_eq!(d.q, fx.data("absmax_u8"), "{name}: absmax codes");
            assert_eq!(
                q.absmax_f32().unwrap(),
                fx.f32("absmax_dequant_f32"),
                "{name}: absmax"
            );
        }
    }
    // The first block is all zero: code 0 and absmax 0, dequantized to -0 as bitsandbytes.
    assert!(
        q.packed[..32].iter().all(|&b| b == 0),
        "{name}: zero block codes"
    );
    let deq: Vec<bf16> = q.dequantize().unwrap();
    assert_eq!(
        bits(&deq),
        bits(&fx.bf16("dequant_bf16")),
        "{name}: dequantized"
    );
    // The matmul through the dequantized weight, within bf16 tolerance of bitsandbytes'.
    for t in [1usize, 5] {
        let x = fx.bf16(&format!("x_T{t}"));
        let y = fx.bf16(&format!("y_T{t}"));
        for i in 0..t {
            for n in 0..64 {
                let (mut acc, mut mag) = (0f64, 0f64);
                for k in 0..128 {
                    let p = x[i * 128 + k].to_f64() * deq[n * 128 + k].to_f64();
                    acc += p;
                    mag += p.abs();
                }
                let got = y[i * 64 + n].to_f64();
                let tol =
                    2f64.powi(-8) * acc.abs() + (2f64.powi(-7) + 128.0 * 2f64.powi(-24)) * mag;
                assert!(
                    (got - acc).abs() <= tol,
                    "{name}: y_T{t}[{i}, {n}] {got} vs {acc}"
                );
            }
        }
    }
}

#[test]
fn quantize_matches_bitsandbytes_plain() {
    check_case("nf4_64x128_bs64.safetensors", false);
}

#[test]
fn quantize_matches_bitsandbytes_double_quant() {
    check_case("nf4_64x128_bs64_dq.safetensors", true);
}

#[test]
fn linear4bit_checkpoints_load_and_round_trip() {
    for (ck, fx, double) in [
        (
            "nf4_64x128_bs64_linear4bit_checkpoint.safetensors",
            "nf4_64x128_bs64.safetensors",
            false,
        ),
        (
            "nf4_64x128_bs64_dq_linear4bit_checkpoint.safetensors",
            "nf4_64x128_bs64_dq.safetensors",
            true,
        ),
    ] {
        let raw = Raw::open(ck);
        let loaded = Nf4Weight::load_linear4bit(&raw.bytes, "layer.").unwrap();
        let w = Raw::open(fx).bf16("weight_bf16");
        let want = Nf4Weight::quantize(&w, 64, 128, 64, double).unwrap();
        assert_eq!(loaded, want, "{ck}: loaded == quantized");
        // Saved back: the same tensors, bit for bit, and it loads again.
        let saved = loaded.save_linear4bit("layer.").unwrap();
        let st = SafeTensors::deserialize(&saved).unwrap();
        for name in st.names() {
            if name.contains("quant_state") {
                let a: serde_json::Value =
                    serde_json::from_slice(st.tensor(name).unwrap().data()).unwrap();
                let b: serde_json::Value = serde_json::from_slice(&raw.data(name)).unwrap();
                assert_eq!(a, b, "{ck}: {name}");
            } else {
                assert_eq!(
                    st.tensor(name).unwrap().data(),
                    &raw.data(name)[..],
                    "{ck}: {name}"
                );
                assert_eq!(
                    st.tensor(name).unwrap().shape(),
                    SafeTensors::deserialize(&raw.bytes)
                        .unwrap()
                        .tensor(name)
                        .unwrap()
                        .shape(),
                    "{ck}: {name} shape"
                );
            }
        }
        assert_eq!(
            st.names().len(),
            SafeTensors::deserialize(&raw.bytes).unwrap().names().len()
        );
        assert_eq!(
            Nf4Weight::load_linear4bit(&saved, "layer.").unwrap(),
            loaded
        );
        let bpp = loaded.bits_per_param();
        if double {
            // 4 + 8/64 + 32/(64·256) + 32/(64·128): one nested block and the offset here.
            assert!(
                (bpp - (4.0 + 8.0 / 64.0 + 64.0 / 8192.0)).abs() < 1e-9,
                "{bpp}"
            );
        } else {
            assert_eq!(bpp, 4.5);
        }
    }
}

#[test]
fn bad_checkpoints_are_clear_errors() {
    let good = loaded_plain();
    let msg = |r: lora_kernels::Result<Nf4Weight>| match r {
        Err(Error::Checkpoint(m)) => m,
        other => panic!("{other:?}"),
    };
    // A wrong prefix: the missing tensor is named.
    let bytes = good.save_linear4bit("layer.").unwrap();
    assert!(msg(Nf4Weight::load_linear4bit(&bytes, "other.")).contains("other.weight"));
    // FP4 is refused by name.
    let fp4 = good.save_linear4bit("layer.").unwrap();
    let fp4 = rename(&fp4, "bitsandbytes__nf4", "bitsandbytes__fp4");
    assert!(msg(Nf4Weight::load_linear4bit(&fp4, "layer.")).contains("fp4"));
    // Inconsistent lengths: the packed tensor is too short.
    let mut short = good.clone();
    short.rows = 65;
    assert!(matches!(
        short.save_linear4bit("l."),
        Err(Error::Length { name: "packed", .. })
    ));
    // Unknown blocksize.
    let mut bs = good.clone();
    bs.blocksize = 48;
    assert!(matches!(
        bs.save_linear4bit("l."),
        Err(Error::Dim {
            name: "blocksize",
            ..
        })
    ));
    assert!(matches!(
        Nf4Weight::quantize(&[bf16::ONE; 8], 2, 4, 8192, false),
        Err(Error::Dim {
            name: "blocksize",
            ..
        })
    ));
    assert!(matches!(
        Nf4Weight::load_linear4bit(b"not a safetensors file", ""),
        Err(Error::Checkpoint(_))
    ));
}

fn loaded_plain() -> Nf4Weight {
    Nf4Weight::load_linear4bit(
        &Raw::open("nf4_64x128_bs64_linear4bit_checkpoint.safetensors").bytes,
        "layer.",
    )
    .unwrap()
}

/// A copy of a safetensors file with one tensor name's substring replaced.
fn rename(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    use safetensors::tensor::TensorView;
    let st = SafeTensors::deserialize(bytes).unwrap();
    let views: std::collections::HashMap<String, TensorView<'_>> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n.replace(from, to), v))
        .collect();
    safetensors::serialize(&views, None).unwrap()
}

/// The QLoRA oracle with B = 0 is bitsandbytes' `matmul_4bit` (its fixture y within two
/// bf16 output roundings), and a base whose dims differ from the shape is an error.
#[test]
fn qlora_oracle_base_is_bitsandbytes_matmul() {
    use lora_kernels::cpu::qlora;
    use lora_kernels::{LoraOptions, LoraShape, QloraWeights};
    for name in [
        "nf4_64x128_bs64.safetensors",
        "nf4_64x128_bs64_dq.safetensors",
    ] {
        let fx = Raw::open(name);
        let w: Vec<bf16> = fx.bf16("weight_bf16");
        let dq = name.contains("_dq");
        let q = Nf4Weight::quantize(&w, 64, 128, 64, dq).unwrap();
        for t in [1usize, 5] {
            let s = LoraShape::new(t, 128, 64, 4);
            let x = fx.bf16(&format!("x_T{t}"));
            let want = fx.bf16(&format!("y_T{t}"));
            let a = vec![bf16::ONE; s.a_len()];
            let b = vec![bf16::ZERO; s.b_len()];
            let mut y = vec![bf16::ZERO; s.y_len()];
            let qw = QloraWeights {
                w: &q,
                a: &a[..],
                b: &b[..],
                bias: None,
            };
            qlora::forward(&s, &LoraOptions::new(2.0), &x, qw, &mut y, None).unwrap();
            // Both are bf16 roundings of sums over the same bf16 products (f64 here, f32
            // there): within two roundings of Σ |x| |deq(W)|.
            let wd: Vec<bf16> = q.dequantize().unwrap();
            for (i, (g, e)) in y.iter().zip(&want).enumerate() {
                let (tt, n) = (i / 64, i % 64);
                let mag: f64 = (0..128)
                    .map(|c| (x[tt * 128 + c].to_f64() * wd[n * 128 + c].to_f64()).abs())
                    .sum();
                let (g, e) = (g.to_f64(), e.to_f64());
                assert!(
                    (g - e).abs() <= 2.0 * 2f64.powi(-8) * mag,
                    "{name} T{t} y[{i}]: {g} vs bitsandbytes {e}"
                );
            }
            let s_bad = LoraShape::new(t, 128, 63, 4);
            let mut y_bad = vec![bf16::ZERO; s_bad.y_len()];
            let b_bad = vec![bf16::ZERO; s_bad.b_len()];
            let qw = QloraWeights {
                w: &q,
                a: &a[..],
                b: &b_bad[..],
                bias: None,
            };
            assert!(matches!(
                qlora::forward(&s_bad, &LoraOptions::new(2.0), &x, qw, &mut y_bad, None),
                Err(Error::Dim { name: "w.rows", .. })
            ));
        }
    }
}
