//! Helpers shared by the integration tests: fixtures, random data, tolerances, and the
//! GPU handle (skipped loudly where there is none).
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use lora_kernels::{cuda::Gpu, DType, Element};

/// The peer fixtures folder: `$LORA_KERNELS_FIXTURES` if set, else the copy in the
/// repository, `tests/fixtures/peer`.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var("LORA_KERNELS_FIXTURES") {
        Ok(d) => PathBuf::from(d),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peer"),
    }
}

/// A safetensors file's tensors as f32 (F32 or BF16 stored), by name.
pub struct Fixture {
    bytes: Vec<u8>,
    pub meta: serde_json::Value,
}

impl Fixture {
    pub fn open(name: &str) -> Fixture {
        let path = fixtures_dir().join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "fixture {} is missing ({e}); the repository ships them in tests/fixtures/peer; LORA_KERNELS_FIXTURES overrides that folder",
                path.display()
            )
        });
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("meta"))
            .map(|m| serde_json::from_str(m).unwrap())
            .unwrap_or(serde_json::Value::Null);
        Fixture { bytes, meta }
    }

    pub fn f32(&self, name: &str) -> Vec<f32> {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|e| panic!("tensor {name}: {e}"));
        match t.dtype() {
            safetensors::Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            safetensors::Dtype::BF16 => t
                .data()
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            d => panic!("tensor {name}: unexpected dtype {d:?}"),
        }
    }

    pub fn meta_usize(&self, key: &str) -> usize {
        self.meta[key]
            .as_u64()
            .unwrap_or_else(|| panic!("meta.{key}")) as usize
    }

    pub fn meta_f32(&self, key: &str) -> f32 {
        self.meta[key]
            .as_f64()
            .unwrap_or_else(|| panic!("meta.{key}")) as f32
    }
}

/// SplitMix64: deterministic test data without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    /// `n` values uniform in [-scale, scale), rounded to T.
    pub fn vec<T: Element>(&mut self, n: usize, scale: f64) -> Vec<T> {
        (0..n)
            .map(|_| T::from_f64(self.uniform() * scale))
            .collect()
    }
}

/// Absolute values, elementwise.
pub fn abs<T: Element>(v: &[T]) -> Vec<T> {
    v.iter().map(|e| T::from_f64(e.to_f64().abs())).collect()
}

/// Checks `got` against the oracle `want` (computed in f64, rounded to T) with a
/// tolerance derived from the type and the reduction length:
///
/// `|got − want| ≤ eps · |want| + (2 · eps + k · 2^-24) · mag`
///
/// where `eps` is T's machine epsilon (one rounding of the output and one of an
/// intermediate the GPU keeps in T, such as h), `k · 2^-24` bounds f32 accumulation over
/// `k` terms, and `mag` is the oracle run on absolute values (Σ |terms|).
pub fn assert_close<T: Element>(what: &str, got: &[T], want: &[T], mag: &[T], k: usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let eps = T::DTYPE.epsilon();
    let acc = k as f64 * 2f64.powi(-24);
    for i in 0..got.len() {
        let (g, w, m) = (got[i].to_f64(), want[i].to_f64(), mag[i].to_f64());
        let tol = eps * w.abs() + (2.0 * eps + acc) * m + f64::MIN_POSITIVE;
        let err = (g - w).abs();
        // NaN (an unwritten, poisoned element) fails too.
        if err.is_nan() || err > tol {
            panic!(
                "{what}: element {i} of {}: got {g}, want {w} (err {err:.3e} > tol {tol:.3e}, \
                 mag {m:.3e}, dtype {:?}, k {k})",
                got.len(),
                T::DTYPE
            );
        }
    }
}

/// Relative Frobenius error ‖got − want‖ / ‖want‖.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - *w as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();

/// The shared GPU, or `None` after a loud note on the real stderr (not captured by the
/// test harness) when there is none. With `LORA_KERNELS_REQUIRE_GPU=1` a missing GPU
/// fails the test instead.
pub fn gpu() -> Option<&'static Gpu> {
    let g = GPU.get_or_init(|| {
        let r = Gpu::new(0).map_err(|e| e.to_string());
        let mut err = std::io::stderr();
        match &r {
            Ok(g) => {
                let _ = writeln!(
                    err,
                    "lora-kernels GPU tests: running on {} (sm_{}{})",
                    g.name(),
                    g.compute_capability().0,
                    g.compute_capability().1
                );
            }
            Err(e) => {
                let _ = writeln!(
                    err,
                    "\n*** lora-kernels GPU tests SKIPPED: no usable GPU ({e}) ***\n"
                );
            }
        }
        r
    });
    match g {
        Ok(g) => Some(g),
        Err(e) => {
            if std::env::var("LORA_KERNELS_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("LORA_KERNELS_REQUIRE_GPU=1 but no GPU: {e}");
            }
            None
        }
    }
}

/// A NaN-filled (poisoned) vector: every element the op fails to write shows up.
pub fn poison<T: Element>(n: usize) -> Vec<T> {
    vec![T::from_f64(f64::NAN); n]
}

/// Whether a [tokens, n] output has enough tiles for the GEMM core's path rule
/// (`lora_kernels::cuda::plan`, rule 2): T ≥ 129 and ceil(T/128) · ceil(n/128) ≥ SMs/2
/// (the forward's n is N, the backward's dX takes K). Tests use it to know which path a
/// call with the default tuning must report on this GPU.
pub fn core_fills(gpu: &Gpu, tokens: usize, n: usize) -> bool {
    use lora_kernels::cuda::gemm::{TILE_M, TILE_N_NARROW};
    let tiles_m = tokens.div_ceil(TILE_M);
    tiles_m >= 2 && 2 * tiles_m * n.div_ceil(TILE_N_NARROW) >= gpu.sm_count() as usize
}

pub fn dtype_name<T: Element>() -> &'static str {
    match T::DTYPE {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
    }
}
