//! GPU NEFTune ops against the CPU oracle, bit for bit: every dtype, odd widths (the
//! scalar path) and 16-byte-aligned ones (the vector path), misaligned views, every
//! length mode and index type, the table gradient in both modes, and the device-side
//! index checks. Outputs are poisoned (NaN) first. Without a GPU these tests print a loud
//! SKIPPED note and return; `LORA_KERNELS_REQUIRE_GPU=1` makes them fail instead.

mod common;

use common::{gpu, poison, Rng};
use cudarc::driver::CudaSlice;
use lora_kernels::cpu::neftune as cpu;
use lora_kernels::cuda::{neftune as cuda, Gpu};
use lora_kernels::neftune::{BackwardOptions, Index};
use lora_kernels::{bf16, f16, Element, EmbedShape, Error, Noise, SeqLen};

/// The GPU's index-error status is one per `Gpu`, and the tests share one `Gpu` from
/// parallel threads: a test that provokes index errors must not have them taken by
/// another test's `take_index_errors`. Every test here holds this lock throughout.
static STATUS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn status_lock() -> std::sync::MutexGuard<'static, ()> {
    STATUS.lock().unwrap_or_else(|e| e.into_inner())
}

fn up<I: Index>(gpu: &Gpu, v: &[I]) -> CudaSlice<I> {
    gpu.stream().clone_htod(v).unwrap()
}

fn bits<T: Element>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn assert_bits<T: Element>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if bits(got) != bits(want) {
        let i = (0..got.len())
            .find(|&i| got[i].to_f64().to_bits() != want[i].to_f64().to_bits())
            .unwrap();
        panic!(
            "{what} ({:?}): element {i} of {}: got {:?}, want {:?}",
            T::DTYPE,
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// A table with a few f32/bf16 subnormals and signed zeros among uniform values.
fn table<T: Element>(shape: &EmbedShape, seed: u64) -> Vec<T> {
    let mut v: Vec<T> = Rng::new(seed).vec(shape.table_len(), 1.0);
    for (i, x) in v.iter_mut().enumerate().take(64) {
        *x = T::from_f64(match i % 4 {
            0 => 1e-39,
            1 => -0.0,
            2 => -3e-40,
            _ => x.to_f64(),
        });
    }
    v
}

fn ids<I: Index + TryFrom<u64>>(shape: &EmbedShape, seed: u64) -> Vec<I>
where
    <I as TryFrom<u64>>::Error: std::fmt::Debug,
{
    let mut r = Rng::new(seed);
    (0..shape.tokens())
        .map(|_| I::try_from(r.next_u64() % shape.vocab as u64).unwrap())
        .collect()
}

/// A mask with right padding, left padding and one empty sequence.
fn mask<M: Index + From<u8>>(shape: &EmbedShape) -> Vec<M> {
    let mut m = Vec::with_capacity(shape.tokens());
    for b in 0..shape.batch {
        for t in 0..shape.seq {
            let real = match b % 4 {
                0 => true,
                1 => t < shape.seq.div_ceil(2),
                2 => t >= shape.seq / 3,
                _ => false,
            };
            m.push(M::from(real as u8));
        }
    }
    m
}

fn lengths(shape: &EmbedShape) -> Vec<u32> {
    (0..shape.batch)
        .map(|b| [shape.seq, 1, 0, shape.seq / 2][b % 4] as u32)
        .collect()
}

const SHAPES: [(usize, usize, usize, usize); 7] = [
    (1, 1, 1, 1),
    (3, 17, 50, 7),
    (2, 33, 1000, 64),
    (5, 9, 77, 12),
    (4, 100, 300, 4104),
    (1, 700, 5, 200),
    (8, 512, 5000, 4096),
];

fn forward_case<T: Element>(gpu: &Gpu, shape: EmbedShape, seed: u64) {
    let t = table::<T>(&shape, seed);
    let id32: Vec<u32> = ids(&shape, seed + 1);
    let id64: Vec<i64> = id32.iter().map(|&v| v as i64).collect();
    let mask_u8: Vec<u8> = mask(&shape);
    let mask_i64: Vec<i64> = mask(&shape);
    let lens = lengths(&shape);
    let noise = Noise::new(5.0 + seed as f32, seed, 3 * seed + 1);
    let (dt, di32, di64) = (gpu.upload(&t).unwrap(), up(gpu, &id32), up(gpu, &id64));
    let (dmu8, dmi64, dlen) = (up(gpu, &mask_u8), up(gpu, &mask_i64), up(gpu, &lens));
    let n = shape.out_len();
    let tag = format!("{shape:?}");

    let mut want = vec![T::default(); n];
    cpu::gather(&shape, &t, &id32, &mut want).unwrap();
    let mut out = gpu.upload(&poison::<T>(n)).unwrap();
    cuda::gather(gpu, &shape, &dt, &di64, &mut out).unwrap();
    assert_bits(
        &format!("gather {tag}"),
        &gpu.download(&out).unwrap(),
        &want,
    );

    type L<'a> = SeqLen<'a, [u8]>;
    let modes: [(&str, L, SeqLen<CudaSlice<u8>>); 2] = [
        ("padded", SeqLen::Padded, SeqLen::Padded),
        ("mask u8", SeqLen::Mask(&mask_u8[..]), SeqLen::Mask(&dmu8)),
    ];
    for (name, host, dev) in modes {
        cpu::embed(&shape, &t, &id32, &noise, host, &mut want).unwrap();
        let mut out = gpu.upload(&poison::<T>(n)).unwrap();
        cuda::embed(gpu, &shape, &dt, &di32, &noise, dev, &mut out).unwrap();
        assert_bits(
            &format!("embed {name} {tag}"),
            &gpu.download(&out).unwrap(),
            &want,
        );
    }
    // Mask as i64 (PyTorch's attention_mask), ids as i64.
    cpu::embed(
        &shape,
        &t,
        &id64,
        &noise,
        SeqLen::Mask(&mask_i64[..]),
        &mut want,
    )
    .unwrap();
    let mut out = gpu.upload(&poison::<T>(n)).unwrap();
    cuda::embed(
        gpu,
        &shape,
        &dt,
        &di64,
        &noise,
        SeqLen::Mask(&dmi64),
        &mut out,
    )
    .unwrap();
    assert_bits(
        &format!("embed mask i64 {tag}"),
        &gpu.download(&out).unwrap(),
        &want,
    );
    // Lengths, fused and as the noise alone on the gathered rows.
    cpu::embed(
        &shape,
        &t,
        &id32,
        &noise,
        SeqLen::Lengths(&lens[..]),
        &mut want,
    )
    .unwrap();
    let mut out = gpu.upload(&poison::<T>(n)).unwrap();
    cuda::embed(
        gpu,
        &shape,
        &dt,
        &di32,
        &noise,
        SeqLen::Lengths(&dlen),
        &mut out,
    )
    .unwrap();
    assert_bits(
        &format!("embed lengths {tag}"),
        &gpu.download(&out).unwrap(),
        &want,
    );
    let mut emb = gpu.upload(&poison::<T>(n)).unwrap();
    cuda::gather(gpu, &shape, &dt, &di32, &mut emb).unwrap();
    cuda::add_noise(gpu, &shape, &noise, SeqLen::Lengths(&dlen), &mut emb).unwrap();
    assert_bits(
        &format!("add_noise lengths {tag}"),
        &gpu.download(&emb).unwrap(),
        &want,
    );
    gpu.take_index_errors().unwrap();
}

fn forward_all<T: Element>() {
    let Some(gpu) = gpu() else { return };
    for (i, &(b, s, v, d)) in SHAPES.iter().enumerate() {
        if i == SHAPES.len() - 1 && T::DTYPE != lora_kernels::DType::BF16 {
            continue; // the bench shape, once
        }
        forward_case::<T>(gpu, EmbedShape::new(b, s, v, d), 10 + i as u64);
    }
}

#[test]
fn forward_f32() {
    let _status = status_lock();
    forward_all::<f32>();
}
#[test]
fn forward_f16() {
    let _status = status_lock();
    forward_all::<f16>();
}
#[test]
fn forward_bf16() {
    let _status = status_lock();
    forward_all::<bf16>();
}

/// Views starting one element into their buffers: 16-byte loads are impossible, so the
/// scalar path runs; the results are the same bits.
#[test]
fn misaligned_views_take_the_scalar_path() {
    let _status = status_lock();
    let Some(gpu) = gpu() else { return };
    let shape = EmbedShape::new(2, 7, 9, 64);
    let t = table::<bf16>(&shape, 3);
    let id: Vec<u32> = ids(&shape, 4);
    let noise = Noise::new(10.0, 77, 5);
    let mut want = vec![bf16::ZERO; shape.out_len()];
    cpu::embed(&shape, &t, &id, &noise, SeqLen::<[u8]>::Padded, &mut want).unwrap();
    let mut padded_t = vec![bf16::ONE];
    padded_t.extend_from_slice(&t);
    let dt = gpu.upload(&padded_t).unwrap();
    let di = up(gpu, &id);
    let mut out = gpu.upload(&poison::<bf16>(shape.out_len() + 1)).unwrap();
    {
        let tv = dt.slice(1..);
        let mut ov = out.slice_mut(1..);
        cuda::embed(
            gpu,
            &shape,
            &tv,
            &di,
            &noise,
            SeqLen::<CudaSlice<u8>>::Padded,
            &mut ov,
        )
        .unwrap();
    }
    let got = gpu.download(&out).unwrap();
    assert!(got[0].is_nan(), "the element before the view was written");
    assert_bits("misaligned embed", &got[1..], &want);
}

#[test]
fn out_of_range_ids_and_lengths_are_reported_and_never_read() {
    let _status = status_lock();
    let Some(gpu) = gpu() else { return };
    let shape = EmbedShape::new(2, 5, 10, 16);
    let t = table::<f32>(&shape, 5);
    let mut id: Vec<i64> = ids(&shape, 6);
    id[3] = 10;
    id[7] = -4;
    let (dt, di) = (gpu.upload(&t).unwrap(), up(gpu, &id));
    let mut out = gpu.upload(&poison::<f32>(shape.out_len())).unwrap();
    cuda::gather(gpu, &shape, &dt, &di, &mut out).unwrap();
    let got = gpu.download(&out).unwrap();
    assert!(
        got[3 * 16..4 * 16].iter().all(|&v| v == 0.0),
        "bad id row not zeroed"
    );
    assert!(
        got[7 * 16..8 * 16].iter().all(|&v| v == 0.0),
        "bad id row not zeroed"
    );
    match gpu.take_index_errors() {
        Err(Error::Index {
            name: "ids",
            position,
            value,
            count: 2,
        }) => assert!(
            (position, value) == (3, 10) || (position, value) == (7, -4),
            "{position} {value}"
        ),
        other => panic!("{other:?}"),
    }
    gpu.take_index_errors().expect("the report is cleared");
    // A length above seq: that sequence gets no noise, the error is reported.
    id[3] = 1;
    id[7] = 2;
    let di = up(gpu, &id);
    let dl = up(gpu, &[5u32, 6]);
    let noise = Noise::new(5.0, 1, 1);
    cuda::embed(
        gpu,
        &shape,
        &dt,
        &di,
        &noise,
        SeqLen::Lengths(&dl),
        &mut out,
    )
    .unwrap();
    match gpu.take_index_errors() {
        Err(Error::Index {
            name: "lengths",
            position: 1,
            value: 6,
            count: 1,
        }) => {}
        other => panic!("{other:?}"),
    }
    let got = gpu.download(&out).unwrap();
    let mut plain = vec![0f32; shape.out_len()];
    cpu::gather(&shape, &t, &id, &mut plain).unwrap();
    assert_eq!(got[5 * 16..], plain[5 * 16..]);
    assert_ne!(got[..5 * 16], plain[..5 * 16]);
    // Backward skips bad ids and reports them.
    id[0] = 99;
    let di = up(gpu, &id);
    let dy = gpu.upload(&vec![1f32; shape.out_len()]).unwrap();
    for deterministic in [false, true] {
        let mut dtab = gpu.zeros::<f32>(shape.table_len()).unwrap();
        let opts = BackwardOptions {
            deterministic,
            padding_idx: None,
        };
        cuda::embedding_backward(gpu, &shape, &di, &dy, &mut dtab, &opts).unwrap();
        let total: f32 = gpu.download(&dtab).unwrap().iter().sum();
        assert_eq!(total, (9 * 16) as f32, "deterministic {deterministic}");
        match gpu.take_index_errors() {
            Err(Error::Index {
                name: "ids",
                position: 0,
                value: 99,
                count: 1,
            }) => {}
            other => panic!("{other:?}"),
        }
    }
}

fn backward_case<T: Element>(gpu: &Gpu, shape: EmbedShape, seed: u64, padding: Option<usize>) {
    let mut id: Vec<u32> = ids(&shape, seed);
    // A long run of one id (longer than the segment kernel's unroll) and the padding id.
    for v in id.iter_mut().take(shape.tokens() / 3) {
        *v = (shape.vocab - 1) as u32;
    }
    if let Some(p) = padding {
        id[shape.tokens() / 2] = p as u32;
    }
    let d_out: Vec<T> = Rng::new(seed + 1).vec(shape.out_len(), 1.0);
    let init: Vec<f32> = Rng::new(seed + 2).vec(shape.table_len(), 1.0);
    let (di, dd) = (up(gpu, &id), gpu.upload(&d_out).unwrap());
    let tag = format!("{shape:?} {:?} padding {padding:?}", T::DTYPE);
    let opts = BackwardOptions {
        deterministic: true,
        padding_idx: padding,
    };
    let mut want = init.clone();
    cpu::embedding_backward(&shape, &id, &d_out, &mut want, &opts).unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut dt = gpu.upload(&init).unwrap();
        cuda::embedding_backward(gpu, &shape, &di, &dd, &mut dt, &opts).unwrap();
        runs.push(gpu.download(&dt).unwrap());
    }
    assert_bits(&format!("deterministic backward {tag}"), &runs[0], &want);
    assert_bits(&format!("deterministic rerun {tag}"), &runs[1], &runs[0]);
    // Atomics: the same sum in another order. Each row's sum has at most `tokens`
    // terms of magnitude <= 1, added to |init| <= 1.
    let mut dt = gpu.upload(&init).unwrap();
    let opts = BackwardOptions {
        deterministic: false,
        ..opts
    };
    cuda::embedding_backward(gpu, &shape, &di, &dd, &mut dt, &opts).unwrap();
    let got = gpu.download(&dt).unwrap();
    let mut count = vec![0usize; shape.vocab];
    for &v in &id {
        count[v as usize] += 1;
    }
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let k = count[i / shape.dim] as f64 + 1.0;
        let tol = 2.0 * k * k * f32::EPSILON as f64;
        assert!(
            ((g - w) as f64).abs() <= tol,
            "atomic backward {tag}: element {i}: {g} vs {w} (tol {tol:e})"
        );
    }
    gpu.take_index_errors().unwrap();
}

#[test]
fn table_gradient_every_dtype() {
    let _status = status_lock();
    let Some(gpu) = gpu() else { return };
    for (i, &(b, s, v, d)) in [
        (1, 1, 1, 1),
        (3, 17, 50, 7),
        (2, 700, 300, 257),
        (5, 1000, 40, 64),
    ]
    .iter()
    .enumerate()
    {
        let shape = EmbedShape::new(b, s, v, d);
        let pad = (i % 2 == 1).then_some(v / 2);
        backward_case::<f32>(gpu, shape, 100 + i as u64, pad);
        backward_case::<f16>(gpu, shape, 200 + i as u64, pad);
        backward_case::<bf16>(gpu, shape, 300 + i as u64, pad);
    }
}

#[test]
fn bad_arguments_are_errors_before_launch() {
    let _status = status_lock();
    let Some(gpu) = gpu() else { return };
    let shape = EmbedShape::new(2, 3, 4, 8);
    let dt = gpu.zeros::<f32>(shape.table_len()).unwrap();
    let di = up(gpu, &[0u32; 6]);
    let mut out = gpu.zeros::<f32>(shape.out_len()).unwrap();
    let short = up(gpu, &[1u8; 5]);
    let noise = Noise::new(5.0, 0, 0);
    assert!(matches!(
        cuda::embed(
            gpu,
            &shape,
            &dt,
            &di,
            &noise,
            SeqLen::Mask(&short),
            &mut out
        ),
        Err(Error::Length { name: "mask", .. })
    ));
    assert!(matches!(
        cuda::embed(
            gpu,
            &shape,
            &dt,
            &di,
            &Noise::new(f32::NAN, 0, 0),
            SeqLen::<CudaSlice<u8>>::Padded,
            &mut out
        ),
        Err(Error::Value {
            name: "noise.alpha",
            ..
        })
    ));
    let mut short_out = gpu.zeros::<f32>(shape.out_len() - 1).unwrap();
    assert!(matches!(
        cuda::gather(gpu, &shape, &dt, &di, &mut short_out),
        Err(Error::Length { name: "out", .. })
    ));
    let mut dtab = gpu.zeros::<f32>(shape.table_len()).unwrap();
    let opts = BackwardOptions {
        deterministic: true,
        padding_idx: Some(4),
    };
    assert!(matches!(
        cuda::embedding_backward(gpu, &shape, &di, &out, &mut dtab, &opts),
        Err(Error::Dim {
            name: "padding_idx",
            ..
        })
    ));
    let empty = EmbedShape::new(0, 3, 4, 8);
    assert!(matches!(
        cuda::gather(gpu, &empty, &dt, &di, &mut out),
        Err(Error::Dim { name: "batch", .. })
    ));
}
