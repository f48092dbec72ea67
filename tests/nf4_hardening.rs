//! No input makes a public NF4 function panic: shapes whose products overflow, weights
//! whose public fields disagree, checkpoints with non-finite or negative scales, and
//! non-finite values to quantize each give an error that names the problem, before
//! anything is written. One test per case the tester found, then a quick randomized loop
//! (no proptest) over mutated weights and checkpoints.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use lora_kernels::cpu::nf4::matmul;
use lora_kernels::nf4::{Absmax, DoubleQuant, NESTED_BLOCKSIZE, NF4_CODE, NON_FINITE_INDEX};
use lora_kernels::{bf16, f16, Element, Error, Nf4Weight, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

// ---- helpers ------------------------------------------------------------------------

/// A deterministic pseudo-random generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

fn dense<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let mut r = Rng(seed);
    (0..n).map(|_| T::from_f64(r.unit() * 0.05)).collect()
}

/// A valid weight [rows, cols].
fn weight(rows: usize, cols: usize, blocksize: usize, double: bool) -> Nf4Weight {
    Nf4Weight::quantize(
        &dense::<bf16>(rows * cols, 7),
        rows,
        cols,
        blocksize,
        double,
    )
    .unwrap()
}

/// The message of an `Error::Checkpoint`, or a panic naming what came instead.
fn checkpoint_msg<T: std::fmt::Debug>(r: Result<T>) -> String {
    match r {
        Err(Error::Checkpoint(m)) => m,
        other => panic!("expected Error::Checkpoint, got {other:?}"),
    }
}

/// A tensor of a safetensors file: dtype, shape, bytes.
type Tensor = (Dtype, Vec<usize>, Vec<u8>);

fn tensors(bytes: &[u8]) -> HashMap<String, Tensor> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn serialize(t: &HashMap<String, Tensor>) -> Vec<u8> {
    let views: HashMap<String, TensorView<'_>> = t
        .iter()
        .map(|(n, (dt, shape, data))| {
            (
                n.clone(),
                TensorView::new(*dt, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(&views, None).unwrap()
}

const STATE: &str = "layer.weight.quant_state.bitsandbytes__nf4";

/// `w` saved under `layer.`, its quant state JSON edited by `edit`.
fn with_state(w: &Nf4Weight, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut t = tensors(&w.save_linear4bit("layer.").unwrap());
    let entry = t.get_mut(STATE).unwrap();
    let mut state: serde_json::Value = serde_json::from_slice(&entry.2).unwrap();
    edit(&mut state);
    entry.2 = serde_json::to_vec(&state).unwrap();
    entry.1 = vec![entry.2.len()];
    serialize(&t)
}

/// `w` saved under `layer.`, element `i` of the f32 tensor `layer.weight{suffix}` set to
/// `v`.
fn with_f32(w: &Nf4Weight, suffix: &str, i: usize, v: f32) -> Vec<u8> {
    let mut t = tensors(&w.save_linear4bit("layer.").unwrap());
    let entry = t.get_mut(&format!("layer.weight{suffix}")).unwrap();
    assert_eq!(entry.0, Dtype::F32);
    entry.2[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    serialize(&t)
}

/// The double-quantization part of a weight.
fn dq(w: &mut Nf4Weight) -> &mut DoubleQuant {
    match &mut w.absmax {
        Absmax::Double(d) => d,
        Absmax::F32(_) => panic!("not double-quantized"),
    }
}

// ---- shapes whose products overflow ---------------------------------------------------

/// quant_state.shape [2^40, 2^40], [2^32, 2^32] (products overflow usize: formerly
/// "attempt to multiply with overflow") and [2^63 + 1, 8192] (wraps to 8192, the
/// packed tensor's element count: formerly loaded in release), and one that fits usize
/// but no memory: each an `Error::Checkpoint` naming the shape and the dimension.
#[test]
fn load_rejects_shapes_whose_product_overflows() {
    // 8192 elements, 4096 packed bytes: what [2^63 + 1, 8192] wraps to.
    let w = weight(64, 128, 64, false);
    for (shape, what) in [
        ([1u64 << 40, 1 << 40], "rows · cols overflows usize"),
        ([1 << 32, 1 << 32], "rows · cols overflows usize"),
        ([(1 << 63) + 1, 8192], "rows · cols overflows usize"),
        ([1 << 31, 1 << 31], "too large"),
    ] {
        let bytes = with_state(&w, |s| s["shape"] = serde_json::json!(shape));
        let m = checkpoint_msg(Nf4Weight::load_linear4bit(&bytes, "layer."));
        assert!(m.contains("layer.weight"), "{shape:?}: {m}");
        assert!(m.contains(&format!("shape {shape:?}")), "{shape:?}: {m}");
        assert!(m.contains(what), "{shape:?}: {m}");
    }
    // A shape entry that is not a non-negative integer.
    let bytes = with_state(&w, |s| s["shape"] = serde_json::json!([-1, 8192]));
    assert!(
        checkpoint_msg(Nf4Weight::load_linear4bit(&bytes, "layer.")).contains("quant_state.shape")
    );
    // A blocksize of 2^64 - 1.
    let bytes = with_state(&w, |s| s["blocksize"] = serde_json::json!(u64::MAX));
    assert!(checkpoint_msg(Nf4Weight::load_linear4bit(&bytes, "layer.")).contains("blocksize"));
}

/// `validate` (and everything that calls it) on rows = cols = 2^33: `Error::Dim` naming
/// `rows`, not an overflow panic.
#[test]
fn validate_rejects_overflowing_dims() {
    let mut w = weight(64, 128, 64, true);
    w.rows = 1 << 33;
    w.cols = 1 << 33;
    let is_rows_overflow = |e: Error| {
        matches!(
            e,
            Error::Dim {
                name: "rows",
                value,
                reason,
            } if value == 1 << 33 && reason.contains("overflows")
        )
    };
    assert!(is_rows_overflow(w.validate().unwrap_err()));
    assert!(is_rows_overflow(w.numel().unwrap_err()));
    assert!(is_rows_overflow(w.blocks().unwrap_err()));
    assert!(is_rows_overflow(w.dequantize::<f32>().unwrap_err()));
    assert!(is_rows_overflow(w.absmax_f32().unwrap_err()));
    assert!(is_rows_overflow(w.save_linear4bit("l.").unwrap_err()));
    assert!(w.bits_per_param().is_finite());
    let mut y = vec![bf16::ZERO; 64];
    assert!(is_rows_overflow(
        matmul(1, &[bf16::ONE; 128], &w, None, &mut y).unwrap_err()
    ));
    // A product that fits usize but exceeds what a dense f32 copy could address.
    w.rows = 1 << 31;
    w.cols = 1 << 31;
    assert!(matches!(
        w.validate(),
        Err(Error::Dim {
            name: "rows * cols",
            ..
        })
    ));
    // Zero rows or cols.
    w.rows = 0;
    assert!(matches!(
        w.validate(),
        Err(Error::Dim {
            name: "rows",
            value: 0,
            ..
        })
    ));
    w.rows = 64;
    w.cols = 0;
    assert!(matches!(
        w.validate(),
        Err(Error::Dim {
            name: "cols",
            value: 0,
            ..
        })
    ));
    assert!(!w.bits_per_param().is_finite());
}

/// `cpu::nf4::matmul` with T = usize::MAX, 3 + 2^57 and 3 + 2^58 (T·K and T·N formerly
/// overflowed, or wrapped to exactly the buffers' lengths and passed in release): an
/// `Error::Dim` naming `tokens`, and `y` untouched.
#[test]
fn matmul_rejects_overflowing_token_counts() {
    // N = K = 64: with T = 3 + 2^58, T·K and T·N both wrap to 192 = 3·64.
    let w = weight(64, 64, 64, false);
    let x = vec![bf16::ONE; 3 * 64];
    for t in [usize::MAX, 3 + (1 << 58), 1 << 63] {
        let mut y = vec![bf16::from_f32(7.0); 3 * 64];
        match matmul(t, &x, &w, None, &mut y) {
            Err(Error::Dim {
                name: "tokens",
                value,
                reason,
            }) => {
                assert_eq!(value, t);
                assert!(reason.contains("overflows"), "{reason}");
            }
            other => panic!("T = {t}: {other:?}"),
        }
        assert!(
            y.iter().all(|&v| v == bf16::from_f32(7.0)),
            "T = {t}: y written"
        );
    }
    // T = 2^57 + 3 with K = 128 (N = 64): T·K wraps to 384 = 3·128.
    let w = weight(64, 128, 64, true);
    let mut y = vec![bf16::ZERO; 3 * 64];
    assert!(matches!(
        matmul(3 + (1 << 57), &[bf16::ONE; 384], &w, None, &mut y),
        Err(Error::Dim { name: "tokens", .. })
    ));
    // The honest T = 3 still works.
    matmul(3, &[bf16::ONE; 384], &w, None, &mut y).unwrap();
}

// ---- inconsistent public fields -----------------------------------------------------

/// Every public function on a weight whose public fields disagree: the length error
/// naming the field, never an index out of bounds; `bits_per_param` (no validation)
/// returns a number.
#[test]
fn inconsistent_fields_are_errors_not_panics() {
    let good = weight(64, 128, 64, true);
    let mut cases: Vec<(&str, Nf4Weight)> = Vec::new();
    let mut w = good.clone();
    w.packed.truncate(100);
    cases.push(("packed", w));
    let mut w = good.clone();
    dq(&mut w).q.pop();
    cases.push(("absmax", w));
    let mut w = good.clone();
    dq(&mut w).absmax2.clear();
    cases.push(("nested_absmax", w));
    let mut w = good.clone();
    dq(&mut w).code.truncate(16);
    cases.push(("nested_quant_map", w));
    let mut w = weight(64, 128, 64, false);
    if let Absmax::F32(a) = &mut w.absmax {
        a.truncate(3);
    }
    cases.push(("absmax", w));
    // More rows than the buffers hold.
    let mut w = good.clone();
    w.rows = 65;
    cases.push(("packed", w));
    for (field, w) in cases {
        let is_len = |e: Error| matches!(e, Error::Length { name, .. } if name == field);
        assert!(is_len(w.validate().unwrap_err()), "{field}");
        assert!(is_len(w.dequantize::<bf16>().unwrap_err()), "{field}");
        assert!(is_len(w.dequantize::<f32>().unwrap_err()), "{field}");
        assert!(is_len(w.absmax_f32().unwrap_err()), "{field}");
        assert!(is_len(w.save_linear4bit("l.").unwrap_err()), "{field}");
        let mut y = vec![f16::from_f32(3.0); 64];
        assert!(is_len(
            matmul(1, &[f16::ONE; 128], &w, None, &mut y).unwrap_err()
        ));
        assert!(
            y.iter().all(|&v| v == f16::from_f32(3.0)),
            "{field}: y written"
        );
        assert!(w.bits_per_param().is_finite(), "{field}");
    }
    // A bad blocksize: `blocks` and `dequantize` name it (formerly a division by zero).
    let mut w = good.clone();
    w.blocksize = 0;
    assert!(matches!(
        w.blocks(),
        Err(Error::Dim {
            name: "blocksize",
            ..
        })
    ));
    assert!(matches!(
        w.dequantize::<f32>(),
        Err(Error::Dim {
            name: "blocksize",
            ..
        })
    ));
}

// ---- non-finite and negative scales -------------------------------------------------

/// A double-quantized weight with 16 nested blocks (4096 NF4 blocks).
fn big_double() -> Nf4Weight {
    let w = weight(64, 4096, 64, true);
    assert_eq!(dq(&mut w.clone()).absmax2.len(), 16);
    w
}

/// Checkpoints with `nested_offset` 1e39 (inf in f32), an infinite or negative
/// `nested_absmax`, a NaN in `nested_quant_map`, a NaN or negative `absmax`: each an
/// `Error::Checkpoint` naming the tensor (with its prefix) and index; formerly they loaded
/// and dequantized to inf/NaN or sign-flipped weights.
#[test]
fn load_rejects_non_finite_and_negative_scales() {
    let d = big_double();
    let p = weight(64, 128, 64, false);
    let bytes = with_state(&d, |s| s["nested_offset"] = serde_json::json!(1e39));
    let m = checkpoint_msg(Nf4Weight::load_linear4bit(&bytes, "layer."));
    assert!(
        m.contains("nested_offset") && m.contains("layer.weight"),
        "{m}"
    );
    for (w, suffix, i, v, want) in [
        (
            &d,
            ".nested_absmax",
            3,
            f32::INFINITY,
            "layer.weight.nested_absmax[3] is inf",
        ),
        (
            &d,
            ".nested_absmax",
            15,
            f32::NEG_INFINITY,
            "layer.weight.nested_absmax[15] is -inf",
        ),
        (
            &d,
            ".nested_absmax",
            0,
            -0.5,
            "layer.weight.nested_absmax[0] is -0.5",
        ),
        (
            &d,
            ".nested_absmax",
            7,
            f32::NAN,
            "layer.weight.nested_absmax[7] is NaN",
        ),
        (
            &d,
            ".nested_quant_map",
            5,
            f32::NAN,
            "layer.weight.nested_quant_map[5] is NaN",
        ),
        (
            &d,
            ".nested_quant_map",
            255,
            f32::INFINITY,
            "layer.weight.nested_quant_map[255] is inf",
        ),
        (&p, ".absmax", 2, f32::NAN, "layer.weight.absmax[2] is NaN"),
        (&p, ".absmax", 9, -1.0, "layer.weight.absmax[9] is -1"),
        (
            &p,
            ".absmax",
            127,
            f32::INFINITY,
            "layer.weight.absmax[127] is inf",
        ),
    ] {
        let bytes = with_f32(w, suffix, i, v);
        let m = checkpoint_msg(Nf4Weight::load_linear4bit(&bytes, "layer."));
        assert!(m.starts_with(want), "{want}: {m}");
    }
    // Finite parts whose reconstruction overflows f32: nested_absmax[1] = 3e38 with an
    // offset of 3e38 and the code table's 1.0 somewhere in that group.
    let mut w = d.clone();
    let dd = dq(&mut w);
    dd.offset = 3e38;
    dd.absmax2[1] = 3e38;
    // code[127] = 0 (every other block of the group reconstructs to the offset),
    // code[255] = 1.
    dd.q[NESTED_BLOCKSIZE..2 * NESTED_BLOCKSIZE].fill(127);
    dd.q[NESTED_BLOCKSIZE + 10] = 255;
    let m = checkpoint_msg(w.validate());
    assert!(
        m.starts_with("weight.absmax (reconstructed)[266] is inf")
            && m.contains("nested_absmax[1]"),
        "{m}"
    );
    // The quant_map must be NF4's.
    let mut t = tensors(&p.save_linear4bit("layer.").unwrap());
    t.get_mut("layer.weight.quant_map").unwrap().2[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let m = checkpoint_msg(Nf4Weight::load_linear4bit(&serialize(&t), "layer."));
    assert!(m.contains("layer.weight.quant_map"), "{m}");
}

/// The same checks on hand-built weights (`validate`, so `dequantize`, `absmax_f32`,
/// `save_linear4bit` and the matmul too), the tensors named as in a checkpoint.
#[test]
fn validate_rejects_non_finite_and_negative_scales() {
    let d = big_double();
    let p = weight(64, 128, 64, false);
    let mut cases: Vec<(Nf4Weight, &str)> = Vec::new();
    let mut w = d.clone();
    dq(&mut w).offset = f32::INFINITY;
    cases.push((w, "weight quant_state.nested_offset is inf"));
    let mut w = d.clone();
    dq(&mut w).offset = f32::NAN;
    cases.push((w, "weight quant_state.nested_offset is NaN"));
    let mut w = d.clone();
    dq(&mut w).absmax2[3] = f32::INFINITY;
    cases.push((w, "weight.nested_absmax[3] is inf"));
    let mut w = d.clone();
    dq(&mut w).absmax2[4] = -2.0;
    cases.push((w, "weight.nested_absmax[4] is -2"));
    let mut w = d.clone();
    dq(&mut w).code[17] = f32::NAN;
    cases.push((w, "weight.nested_quant_map[17] is NaN"));
    let mut w = p.clone();
    if let Absmax::F32(a) = &mut w.absmax {
        a[5] = -0.25;
    }
    cases.push((w, "weight.absmax[5] is -0.25"));
    let mut w = p.clone();
    if let Absmax::F32(a) = &mut w.absmax {
        a[6] = f32::NAN;
    }
    cases.push((w, "weight.absmax[6] is NaN"));
    for (w, want) in cases {
        assert!(checkpoint_msg(w.validate()).starts_with(want), "{want}");
        assert!(
            checkpoint_msg(w.dequantize::<bf16>()).starts_with(want),
            "{want}"
        );
        assert!(checkpoint_msg(w.absmax_f32()).starts_with(want), "{want}");
        assert!(
            checkpoint_msg(w.save_linear4bit("l.")).starts_with(want),
            "{want}"
        );
        let mut y = vec![0f32; 2 * w.rows];
        let x = vec![1f32; 2 * w.cols];
        assert!(checkpoint_msg(matmul(2, &x, &w, None, &mut y)).starts_with(want));
        assert!(y.iter().all(|&v| v == 0.0), "{want}: y written");
    }
    // -0.0 is a valid (zero) scale, and a slightly negative reconstructed scale (what
    // bitsandbytes' double quantization gives an all-zero block) is accepted.
    let mut w = p.clone();
    if let Absmax::F32(a) = &mut w.absmax {
        a[0] = -0.0;
    }
    w.validate().unwrap();
    let mut w = d.clone();
    let dd = dq(&mut w);
    dd.q[0] = 0;
    dd.offset = 0.001;
    dd.absmax2[0] = 0.002;
    assert!(w.absmax_f32().unwrap()[0] < 0.0);
}

// ---- quantize and non-finite input -------------------------------------------------

fn quantize_non_finite<T: Element>() {
    let n = 37 * 96;
    for (at, v, word) in [
        (0usize, f64::NAN, "NaN"),
        (5, f64::INFINITY, "+inf"),
        (n - 1, f64::NEG_INFINITY, "-inf"),
        (1000, f64::NAN, "NaN"),
    ] {
        for double in [false, true] {
            let mut w = dense::<T>(n, 3);
            w[at] = T::from_f64(v);
            // A later non-finite value: the first one is named.
            if at + 1 < n {
                w[n - 1] = T::from_f64(f64::NAN);
            }
            match Nf4Weight::quantize(&w, 37, 96, 64, double) {
                Err(Error::Value {
                    name,
                    value,
                    reason,
                }) => {
                    assert_eq!(name, NON_FINITE_INDEX);
                    assert_eq!(value, at as f64, "{:?}", T::DTYPE);
                    assert!(reason.contains(word), "{reason}");
                }
                other => panic!("{:?} w[{at}] = {v}: {other:?}", T::DTYPE),
            }
        }
    }
}

/// `quantize` rejects NaN, +Inf and −Inf with `Error::Value` whose value is the index
/// of the first one (formerly: one +Inf made its whole double-quantized weight NaN, a
/// NaN became a finite code silently), for every element type.
#[test]
fn quantize_rejects_non_finite_input() {
    quantize_non_finite::<f32>();
    quantize_non_finite::<f16>();
    quantize_non_finite::<bf16>();
}

/// `quantize_allow_nonfinite` is bitsandbytes' behaviour as the rustdoc states it: a NaN
/// takes code 0 and dequantizes to −absmax; an Inf makes its block's scale inf (every
/// other value code 7, the Inf code 0), which `validate` rejects; with double
/// quantization every block's reconstructed scale is non-finite.
#[test]
fn quantize_allow_nonfinite_is_bitsandbytes() {
    let n = 64 * 256;
    let mut w = dense::<f32>(n, 11);
    w[70] = f32::NAN;
    let q = Nf4Weight::quantize_allow_nonfinite(&w, 64, 256, 64, false).unwrap();
    assert_eq!(q.packed[35] >> 4, 0, "NaN: code 0");
    let deq = q.dequantize::<f32>().unwrap();
    let absmax = q.absmax_f32().unwrap();
    assert_eq!(deq[70], -absmax[1]);
    assert!(absmax[1] > 0.0 && absmax[1].is_finite());
    // The strict quantize rejects it.
    assert!(Nf4Weight::quantize(&w, 64, 256, 64, false).is_err());

    let mut w = dense::<f32>(n, 12);
    w[129] = f32::INFINITY;
    let q = Nf4Weight::quantize_allow_nonfinite(&w, 64, 256, 64, false).unwrap();
    let Absmax::F32(a) = &q.absmax else { panic!() };
    assert_eq!(a[2], f32::INFINITY);
    assert!(a.iter().enumerate().all(|(b, v)| b == 2 || v.is_finite()));
    for e in 128..192 {
        let byte = q.packed[e / 2];
        let c = if e % 2 == 0 { byte >> 4 } else { byte & 15 };
        assert_eq!(c, if e == 129 { 0 } else { 7 }, "element {e}");
    }
    assert_eq!(NF4_CODE[7], 0.0);
    assert_eq!(
        checkpoint_msg(q.validate()),
        checkpoint_msg(q.dequantize::<f32>())
    );
    assert!(checkpoint_msg(q.validate()).starts_with("weight.absmax[2] is inf"));

    let q = Nf4Weight::quantize_allow_nonfinite(&w, 64, 256, 64, true).unwrap();
    let Absmax::Double(d) = &q.absmax else {
        panic!()
    };
    assert_eq!(d.offset, f32::INFINITY);
    assert!(d.absmax2.iter().all(|&v| v == f32::INFINITY));
    for b in 0..d.q.len() {
        let s = d.code[d.q[b] as usize] * d.absmax2[b / NESTED_BLOCKSIZE] + d.offset;
        assert!(!s.is_finite(), "block {b}: {s}");
    }
    assert!(matches!(q.validate(), Err(Error::Checkpoint(_))));
}

/// Finite values near f32::MAX whose double-quantized scales overflow f32 on
/// reconstruction: `quantize` gives `Error::Value` naming `w` (or, if this input happens
/// not to overflow, a weight that dequantizes to finite values); plain quantization of
/// the same values is fine.
#[test]
fn quantize_rejects_double_quant_overflow() {
    let mut overflowed = 0;
    for big in 1..=4usize {
        for zeros in 0..=3usize {
            let blocks = big + zeros;
            let w: Vec<f32> = (0..blocks * 32)
                .map(|e| if e < big * 32 { f32::MAX } else { 0.0 })
                .collect();
            match Nf4Weight::quantize(&w, 1, blocks * 32, 32, true) {
                Err(Error::Value {
                    name: "w", value, ..
                }) => {
                    assert_eq!(value, f32::MAX as f64);
                    overflowed += 1;
                }
                Ok(q) => assert!(q.dequantize::<f32>().unwrap().iter().all(|v| v.is_finite())),
                other => panic!("{other:?}"),
            }
            let q = Nf4Weight::quantize(&w, 1, blocks * 32, 32, false).unwrap();
            assert!(q.dequantize::<f32>().unwrap().iter().all(|v| v.is_finite()));
        }
    }
    assert!(
        overflowed > 0,
        "no input overflowed: the test lost its case"
    );
}

// ---- a quick randomized loop ----------------------------------------------------------

/// Every public function, on weights mutated at random (dims, blocksize, lengths,
/// scales, code tables): no panic, and `y` is written only on success.
#[test]
fn random_mutations_never_panic() {
    let mut r = Rng(2024);
    // The last: 300 blocks, two nested groups.
    let bases = [
        weight(3, 40, 32, false),
        weight(5, 64, 64, true),
        weight(3, 6400, 64, true),
    ];
    let specials = [
        0usize,
        1,
        2,
        31,
        63,
        64,
        65,
        1 << 20,
        1 << 31,
        1 << 32,
        (1 << 63) + 1,
        usize::MAX,
    ];
    let floats = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -1.0,
        0.0,
        -0.0,
        3e38,
        1e-45,
    ];
    for iter in 0..3000 {
        let mut w = bases[r.below(bases.len())].clone();
        for _ in 0..1 + r.below(3) {
            match r.below(9) {
                0 => w.rows = specials[r.below(specials.len())],
                1 => w.cols = specials[r.below(specials.len())],
                2 => w.blocksize = specials[r.below(specials.len())],
                3 => w.packed.truncate(r.below(w.packed.len() + 1)),
                4 => w.packed.push(0xab),
                5 => match &mut w.absmax {
                    Absmax::F32(a) if !a.is_empty() => {
                        let i = r.below(a.len());
                        a[i] = floats[r.below(floats.len())];
                    }
                    Absmax::Double(d) if !d.absmax2.is_empty() => {
                        let i = r.below(d.absmax2.len());
                        d.absmax2[i] = floats[r.below(floats.len())];
                    }
                    _ => {}
                },
                6 => {
                    if let Absmax::Double(d) = &mut w.absmax {
                        match r.below(4) {
                            0 => d.offset = floats[r.below(floats.len())],
                            1 => d.code.truncate(r.below(257)),
                            2 => d.q.truncate(r.below(d.q.len() + 1)),
                            _ => {
                                let i = r.below(256);
                                if let Some(c) = d.code.get_mut(i) {
                                    *c = floats[r.below(floats.len())];
                                }
                            }
                        }
                    }
                }
                7 => match &mut w.absmax {
                    Absmax::F32(a) => a.truncate(r.below(a.len() + 1)),
                    Absmax::Double(d) => d.absmax2.truncate(r.below(d.absmax2.len() + 1)),
                },
                _ => w.rows = w.rows.wrapping_add(1),
            }
        }
        let tokens = [1usize, 2, 3 + (1 << 58), usize::MAX][r.below(4)];
        let result = catch_unwind(AssertUnwindSafe(|| {
            let valid = w.validate().is_ok();
            assert_eq!(w.dequantize::<bf16>().is_ok(), valid);
            assert_eq!(w.absmax_f32().is_ok(), valid);
            let _ = w.bits_per_param();
            let _ = w.numel();
            let _ = w.blocks();
            match w.save_linear4bit("m.") {
                Ok(bytes) => {
                    assert!(valid);
                    assert_eq!(Nf4Weight::load_linear4bit(&bytes, "m.").unwrap(), w);
                }
                Err(_) => assert!(!valid),
            }
            let (xl, yl) = (w.cols.min(1 << 12) * 2, w.rows.min(1 << 12) * 2);
            let x = vec![1f32; xl];
            let mut y = vec![-9f32; yl];
            if matmul(tokens, &x, &w, None, &mut y).is_err() {
                assert!(y.iter().all(|&v| v == -9.0));
            }
        }));
        assert!(result.is_ok(), "iteration {iter}: {w:?}");
    }
}

/// Checkpoints with random bytes flipped, and with quant states edited at random: load
/// gives a weight or an error, never a panic; a weight it gives is valid.
#[test]
fn random_checkpoints_never_panic() {
    let mut r = Rng(77);
    let sources = [
        weight(3, 40, 32, false).save_linear4bit("p.").unwrap(),
        weight(5, 64, 64, true).save_linear4bit("p.").unwrap(),
    ];
    let values = [
        serde_json::json!(null),
        serde_json::json!(-1),
        serde_json::json!(0),
        serde_json::json!(1e39),
        serde_json::json!(u64::MAX),
        serde_json::json!("nf4"),
        serde_json::json!([1u64 << 40, 1u64 << 40]),
        serde_json::json!([3, 40, 1]),
        serde_json::json!([5, 64]),
        serde_json::json!(256),
    ];
    let fields = [
        "shape",
        "blocksize",
        "nested_offset",
        "nested_blocksize",
        "nested_dtype",
        "dtype",
        "quant_type",
    ];
    for iter in 0..2000 {
        let mut bytes = sources[r.below(2)].clone();
        if r.below(2) == 0 {
            for _ in 0..1 + r.below(4) {
                let i = r.below(bytes.len());
                bytes[i] ^= 1 << r.below(8);
            }
        } else {
            let mut t = tensors(&bytes);
            let entry = t.get_mut("p.weight.quant_state.bitsandbytes__nf4").unwrap();
            let mut state: serde_json::Value = serde_json::from_slice(&entry.2).unwrap();
            state[fields[r.below(fields.len())]] = values[r.below(values.len())].clone();
            entry.2 = serde_json::to_vec(&state).unwrap();
            entry.1 = vec![entry.2.len()];
            bytes = serialize(&t);
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            if let Ok(w) = Nf4Weight::load_linear4bit(&bytes, "p.") {
                w.validate().unwrap();
                w.dequantize::<f16>().unwrap();
            }
        }));
        assert!(result.is_ok(), "iteration {iter}");
    }
}
