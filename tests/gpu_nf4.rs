//! GPU NF4 ops against the CPU oracle and bitsandbytes' fixtures: dequantize bit for bit
//! (every dtype, every blocksize, plain and double-quantized absmax, odd sizes), and the
//! small-T fused matmul within a tolerance derived from the dtype and K. Outputs are
//! poisoned (NaN) first. Without a GPU these tests print a loud SKIPPED note and return;
//! `LORA_KERNELS_REQUIRE_GPU=1` makes them fail instead.

mod common;

use common::{abs, assert_close, fixtures_dir, gpu, poison, Rng};
use lora_kernels::cpu::nf4 as cpu;
use lora_kernels::cuda::nf4::{self as cuda, Nf4Device};
use lora_kernels::cuda::Gpu;
use lora_kernels::{bf16, f16, Element, Error, Nf4Weight};

fn bits<T: Element>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

/// A weight with an all-zero first block and a few repeated values.
fn weight<T: Element>(n: usize, k: usize, seed: u64) -> Vec<T> {
    let mut w: Vec<T> = Rng::new(seed).vec(n * k, 0.05);
    for v in w.iter_mut().take(32.min(n * k)) {
        *v = T::from_f64(0.0);
    }
    w
}

fn dequant_case<T: Element>(gpu: &Gpu, n: usize, k: usize, bs: usize, dq: bool, seed: u64) {
    let w = weight::<T>(n, k, seed);
    let q = Nf4Weight::quantize(&w, n, k, bs, dq).unwrap();
    let want: Vec<T> = q.dequantize().unwrap();
    let dev = Nf4Device::upload(gpu, &q).unwrap();
    let mut out = gpu.upload(&poison::<T>(n * k)).unwrap();
    cuda::dequantize(gpu, &dev, &mut out).unwrap();
    let got = gpu.download(&out).unwrap();
    assert_eq!(
        bits(&got),
        bits(&want),
        "dequantize {n}x{k} bs {bs} dq {dq} {:?}",
        T::DTYPE
    );
}

fn dequant_all<T: Element>() {
    let Some(gpu) = gpu() else { return };
    let mut seed = 1;
    for (n, k) in [(1, 1), (3, 7), (64, 128), (37, 96), (300, 4096)] {
        for bs in [32, 64, 128, 256, 512, 1024, 2048, 4096] {
            for dq in [false, true] {
                dequant_case::<T>(gpu, n, k, bs, dq, seed);
                seed += 1;
            }
        }
    }
}

#[test]
fn dequantize_f32() {
    dequant_all::<f32>();
}
#[test]
fn dequantize_f16() {
    dequant_all::<f16>();
}
#[test]
fn dequantize_bf16() {
    dequant_all::<bf16>();
}

fn matmul_case<T: Element>(
    gpu: &Gpu,
    t: usize,
    n: usize,
    k: usize,
    bs: usize,
    dq: bool,
    bias: bool,
) {
    let seed = (t * 1000 + n + k) as u64;
    let w = weight::<T>(n, k, seed);
    let q = Nf4Weight::quantize(&w, n, k, bs, dq).unwrap();
    let x: Vec<T> = Rng::new(seed + 1).vec(t * k, 1.0);
    let b: Vec<T> = Rng::new(seed + 2).vec(n, 1.0);
    let bias_h = bias.then_some(&b[..]);
    let mut want = vec![T::default(); t * n];
    cpu::matmul(t, &x, &q, bias_h, &mut want).unwrap();
    // Σ|terms|: the same product on absolute values.
    let qa = Nf4Weight::quantize(&abs(&w), n, k, bs, dq).unwrap();
    let mut mag = vec![T::default(); t * n];
    cpu::matmul(t, &abs(&x), &qa, bias.then_some(&abs(&b)[..]), &mut mag).unwrap();
    let dev = Nf4Device::upload(gpu, &q).unwrap();
    let (dx, db) = (gpu.upload(&x).unwrap(), gpu.upload(&b).unwrap());
    let mut y = gpu.upload(&poison::<T>(t * n)).unwrap();
    cuda::matmul(gpu, t, &dx, &dev, bias.then_some(&db), &mut y).unwrap();
    let got = gpu.download(&y).unwrap();
    assert_close(
        &format!("nf4 matmul T{t} {n}x{k} bs {bs} dq {dq} bias {bias}"),
        &got,
        &want,
        &mag,
        k,
    );
}

fn matmul_all<T: Element>() {
    let Some(gpu) = gpu() else { return };
    let ts = [1, 2, 3, 5, 8, 13, 16, 17, 32];
    let shapes = [
        (1, 32),
        (7, 64),
        (200, 96),
        (37, 320),
        (64, 4096),
        (4096, 4096),
        (11008, 4096),
    ];
    let bss = [32, 64, 256, 4096];
    for (i, &t) in ts.iter().enumerate() {
        for (j, &(n, k)) in shapes.iter().enumerate() {
            if n * k > 4096 * 4096 && t > 1 {
                continue; // the large shape once
            }
            let bs = bss[(i + j) % 4];
            matmul_case::<T>(gpu, t, n, k, bs, (i + j) % 2 == 0, (i + 2 * j) % 3 == 0);
        }
    }
}

#[test]
fn matmul_f32() {
    matmul_all::<f32>();
}
#[test]
fn matmul_f16() {
    matmul_all::<f16>();
}
#[test]
fn matmul_bf16() {
    matmul_all::<bf16>();
}

/// bitsandbytes' own quantized weights (from its Linear4bit checkpoints): our GPU
/// dequantize gives its dequant_bf16 bit for bit, and our matmul its y within tolerance.
#[test]
fn bitsandbytes_fixtures_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    for (ck, fx) in [
        (
            "nf4_64x128_bs64_linear4bit_checkpoint.safetensors",
            "nf4_64x128_bs64.safetensors",
        ),
        (
            "nf4_64x128_bs64_dq_linear4bit_checkpoint.safetensors",
            "nf4_64x128_bs64_dq.safetensors",
        ),
    ] {
        let bytes = std::fs::read(fixtures_dir().join(ck)).unwrap();
        let q = Nf4Weight::load_linear4bit(&bytes, "layer.").unwrap();
        let fxb = std::fs::read(fixtures_dir().join(fx)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&fxb).unwrap();
        let bf = |name: &str| -> Vec<bf16> {
            st.tensor(name)
                .unwrap()
                .data()
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect()
        };
        let dev = Nf4Device::upload(gpu, &q).unwrap();
        let mut out = gpu.upload(&poison::<bf16>(64 * 128)).unwrap();
        cuda::dequantize(gpu, &dev, &mut out).unwrap();
        assert_eq!(
            bits(&gpu.download(&out).unwrap()),
            bits(&bf("dequant_bf16")),
            "{fx}"
        );
        for t in [1usize, 5] {
            let x = bf(&format!("x_T{t}"));
            let want = bf(&format!("y_T{t}"));
            let dx = gpu.upload(&x).unwrap();
            let mut y = gpu.upload(&poison::<bf16>(t * 64)).unwrap();
            cuda::matmul(gpu, t, &dx, &dev, None, &mut y).unwrap();
            let got = gpu.download(&y).unwrap();
            let mut mag = vec![bf16::ZERO; t * 64];
            let qa = Nf4Weight::quantize(&abs(&bf("weight_bf16")), 64, 128, 64, false).unwrap();
            cpu::matmul(t, &abs(&x), &qa, None, &mut mag).unwrap();
            // Both are bf16 roundings of f32-accumulated sums: two output roundings apart.
            let two_ulps: Vec<bf16> = mag
                .iter()
                .map(|m| bf16::from_f64(2.0 * m.to_f64()))
                .collect();
            assert_close(&format!("{fx} y_T{t}"), &got, &want, &two_ulps, 128);
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let Some(gpu) = gpu() else { return };
    let w = weight::<bf16>(8, 48, 3);
    let q = Nf4Weight::quantize(&w, 8, 48, 32, false).unwrap();
    let dev = Nf4Device::upload(gpu, &q).unwrap();
    let x = gpu.upload(&[bf16::ONE; 48]).unwrap();
    let mut y = gpu.zeros::<bf16>(8).unwrap();
    assert!(matches!(
        cuda::matmul(gpu, 1, &x, &dev, None, &mut y),
        Err(Error::Dim {
            name: "cols (K)",
            ..
        })
    ));
    let q = Nf4Weight::quantize(&weight::<bf16>(8, 64, 4), 8, 64, 64, true).unwrap();
    let dev = Nf4Device::upload(gpu, &q).unwrap();
    let x = gpu.upload(&vec![bf16::ONE; 33 * 64]).unwrap();
    let mut y = gpu.zeros::<bf16>(33 * 8).unwrap();
    assert!(matches!(
        cuda::matmul(gpu, 33, &x, &dev, None, &mut y),
        Err(Error::Dim { name: "tokens", .. })
    ));
    let mut short = gpu.zeros::<bf16>(8 * 64 - 1).unwrap();
    assert!(matches!(
        cuda::dequantize(gpu, &dev, &mut short),
        Err(Error::Length { name: "out", .. })
    ));
    let x = gpu.upload(&vec![bf16::ONE; 2 * 64 + 1]).unwrap();
    let xv = x.slice(1..);
    let mut y = gpu.zeros::<bf16>(2 * 8).unwrap();
    assert!(matches!(
        cuda::matmul(gpu, 2, &xv, &dev, None, &mut y),
        Err(Error::Misaligned { name: "x", .. })
    ));
}

/// GPU quantize gives the host quantizer's bytes, scales, nested scales and offset (the
/// host one is bitsandbytes-exact, see nf4_oracle), every dtype, blocksize and odd size,
/// with an all-zero block, a NaN, an infinity-free block of subnormal-scaled values
/// (f32: nothing may be flushed to zero) and repeated values.
fn quant_all<T: Element>() {
    let Some(gpu) = gpu() else { return };
    let mut seed = 100;
    for (n, k) in [(1, 1), (3, 7), (1, 33), (37, 96), (64, 128), (300, 4096)] {
        for bs in [32, 64, 128, 256, 512, 1024, 2048, 4096] {
            for dq in [false, true] {
                let mut w = weight::<T>(n, k, seed);
                let numel = n * k;
                if numel > 100 {
                    w[70] = T::from_f64(f64::NAN);
                }
                if T::DTYPE == lora_kernels::DType::F32 && numel > 300 {
                    for (i, v) in w.iter_mut().enumerate().skip(256).take(32) {
                        *v = T::from_f64(1e-39 * (i as f64 - 270.0));
                    }
                }
                let want = Nf4Weight::quantize_allow_nonfinite(&w, n, k, bs, dq).unwrap();
                let dw = gpu.upload(&w).unwrap();
                let got = cuda::quantize(gpu, &dw, n, k, bs, dq)
                    .unwrap()
                    .download(gpu)
                    .unwrap();
                assert_eq!(got.packed, want.packed, "packed {n}x{k} bs {bs} dq {dq}");
                assert_eq!(got, want, "quantize {n}x{k} bs {bs} dq {dq} {:?}", T::DTYPE);
                seed += 1;
            }
        }
    }
}

#[test]
fn quantize_f32() {
    quant_all::<f32>();
}
#[test]
fn quantize_f16() {
    quant_all::<f16>();
}
#[test]
fn quantize_bf16() {
    quant_all::<bf16>();
}

/// GPU quantize of bitsandbytes' own input weight gives its packed codes and scales.
#[test]
fn gpu_quantize_matches_bitsandbytes() {
    let Some(gpu) = gpu() else { return };
    for (fx, dq) in [
        ("nf4_64x128_bs64.safetensors", false),
        ("nf4_64x128_bs64_dq.safetensors", true),
    ] {
        let fxb = std::fs::read(fixtures_dir().join(fx)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&fxb).unwrap();
        let raw = |name: &str| st.tensor(name).unwrap().data().to_vec();
        let f32s = |name: &str| -> Vec<f32> {
            raw(name)
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let w: Vec<bf16> = raw("weight_bf16")
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
            .collect();
        let dw = gpu.upload(&w).unwrap();
        let got = cuda::quantize(gpu, &dw, 64, 128, 64, dq)
            .unwrap()
            .download(gpu)
            .unwrap();
        assert_eq!(got.packed, raw("packed"), "{fx}: packed");
        match &got.absmax {
            lora_kernels::nf4::Absmax::F32(a) => assert_eq!(a, &f32s("absmax_f32"), "{fx}"),
            lora_kernels::nf4::Absmax::Double(d) => {
                assert_eq!(d.q, raw("absmax_u8"), "{fx}: absmax_u8");
                assert_eq!(d.absmax2, f32s("nested_absmax"), "{fx}: nested_absmax");
                assert_eq!(d.code, f32s("nested_code"), "{fx}: nested_code");
                assert_eq!(d.offset, f32s("nested_offset")[0], "{fx}: nested_offset");
            }
        }
    }
}

#[test]
fn quantize_bad_arguments_are_errors() {
    let Some(gpu) = gpu() else { return };
    let w = gpu.upload(&[bf16::ONE; 64]).unwrap();
    assert!(matches!(
        cuda::quantize(gpu, &w, 8, 8, 48, false),
        Err(Error::Dim {
            name: "blocksize",
            ..
        })
    ));
    assert!(matches!(
        cuda::quantize(gpu, &w, 8, 9, 64, false),
        Err(Error::Length { name: "w", .. })
    ));
    assert!(matches!(
        cuda::quantize(gpu, &w, 0, 64, 64, true),
        Err(Error::Dim { name: "rows", .. })
    ));
}
