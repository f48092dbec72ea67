//! The GPU AdamW (`lora_kernels::cuda::adamw::step`) against the CPU oracle, bit for bit:
//! f32, f16 and bf16 gradients, odd lengths (the element-by-element tail), lengths
//! around the chunk size, hundreds of tensors in one launch, one tensor larger than a
//! whole grid's pass, views at unaligned offsets (the element-by-element path), every
//! kind of low-precision copy, LoRA+ multipliers and the decay switch, subnormal and
//! signed-zero values. Every buffer is a view into a larger one whose margins are
//! poisoned (NaN): the kernel must leave them alone. Bad input returns an error and
//! leaves every buffer as it was. Without a GPU these tests print a loud SKIPPED note
//! and return; `LORA_KERNELS_REQUIRE_GPU=1` makes them fail instead.

mod common;

use std::sync::Arc;

use common::{gpu, Rng};
use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop,
};
use lora_kernels::adamw::{AdamW, TensorOptions};
use lora_kernels::cpu::adamw as cpu;
use lora_kernels::cuda::{adamw as cuda, Gpu};
use lora_kernels::{bf16, f16, Element, Error};

/// Elements of poison after each buffer's view (and before it, at the offsets: aligned
/// views start at element 4, 16 bytes in f32 and 8 in 16-bit types, so the vector path
/// still applies).
const MARGIN: usize = 5;
const ALIGNED: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq)]
enum CopyKind {
    None,
    F32,
    F16,
    Bf16,
}

/// One tensor of a case: its length, the offsets of its views (param, m, v, grad,
/// copy) into their buffers, its copy and its options.
#[derive(Clone, Copy, Debug)]
struct Spec {
    n: usize,
    off: [usize; 5],
    copy: CopyKind,
    options: TensorOptions,
}

impl Spec {
    fn aligned(n: usize, copy: CopyKind, options: TensorOptions) -> Spec {
        Spec {
            n,
            off: [ALIGNED; 5],
            copy,
            options,
        }
    }
    /// The buffer length around a view at `off`.
    fn buf(&self, k: usize) -> usize {
        self.off[k] + self.n + MARGIN
    }
}

/// Host buffers of one tensor (whole buffers, margins included).
#[derive(Clone)]
struct Host<G> {
    p: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// One gradient buffer per step.
    g: Vec<Vec<G>>,
    c32: Vec<f32>,
    c16: Vec<f16>,
    cb: Vec<bf16>,
}

/// Values in [-scale, scale) with a few subnormals and signed zeros among them.
fn values(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n)
        .map(|i| match i % 29 {
            3 => 1e-40,
            7 => -0.0,
            11 => -2.5e-39,
            _ => (rng.uniform() * scale) as f32,
        })
        .collect()
}

/// `len` elements: `data` at `off`, NaN around it.
fn padded<T: Element>(off: usize, data: &[T], len: usize) -> Vec<T> {
    let mut v = vec![T::from_f64(f64::NAN); len];
    v[off..off + data.len()].copy_from_slice(data);
    v
}

fn host<G: Element>(s: &Spec, steps: u64, rng: &mut Rng) -> Host<G> {
    let n = s.n;
    let p = padded(s.off[0], &values(rng, n, 1.0), s.buf(0));
    let m = padded(s.off[1], &values(rng, n, 1e-2), s.buf(1));
    let v: Vec<f32> = values(rng, n, 1e-4).iter().map(|x| x.abs()).collect();
    let v = padded(s.off[2], &v, s.buf(2));
    let g = (0..steps)
        .map(|_| {
            let g: Vec<G> = values(rng, n, 1e-2)
                .iter()
                .map(|&x| G::from_f32(x))
                .collect();
            padded(s.off[3], &g, s.buf(3))
        })
        .collect();
    let c = |kind| if s.copy == kind { s.buf(4) } else { 0 };
    Host {
        p,
        m,
        v,
        g,
        c32: vec![f32::NAN; c(CopyKind::F32)],
        c16: vec![f16::NAN; c(CopyKind::F16)],
        cb: vec![bf16::NAN; c(CopyKind::Bf16)],
    }
}

/// The oracle's step `t` over the views of `hosts`.
fn oracle_step<G: Element>(opt: &AdamW, t: u64, specs: &[Spec], hosts: &mut [Host<G>]) {
    let mut list: Vec<cpu::Tensor<'_, G>> = specs
        .iter()
        .zip(hosts.iter_mut())
        .map(|(s, h)| {
            let (o, n) = (s.off, s.n);
            let step = (t - 1) as usize;
            let x = cpu::Tensor::new(
                &mut h.p[o[0]..o[0] + n],
                &mut h.m[o[1]..o[1] + n],
                &mut h.v[o[2]..o[2] + n],
                &h.g[step][o[3]..o[3] + n],
            )
            .with_options(s.options);
            match s.copy {
                CopyKind::None => x,
                CopyKind::F32 => x.with_copy(cpu::ParamCopy::F32(&mut h.c32[o[4]..o[4] + n])),
                CopyKind::F16 => x.with_copy(cpu::ParamCopy::F16(&mut h.c16[o[4]..o[4] + n])),
                CopyKind::Bf16 => x.with_copy(cpu::ParamCopy::Bf16(&mut h.cb[o[4]..o[4] + n])),
            }
        })
        .collect();
    cpu::step(opt, t, &mut list).unwrap();
}

/// Device buffers of one tensor (whole buffers).
struct Dev<G> {
    p: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    g: CudaSlice<G>,
    c32: Option<CudaSlice<f32>>,
    c16: Option<CudaSlice<f16>>,
    cb: Option<CudaSlice<bf16>>,
}

fn upload<G: Element>(gpu: &Gpu, h: &Host<G>) -> Dev<G> {
    fn up_opt<T: Element>(gpu: &Gpu, v: &[T]) -> Option<CudaSlice<T>> {
        (!v.is_empty()).then(|| gpu.upload(v).unwrap())
    }
    Dev {
        p: gpu.upload(&h.p).unwrap(),
        m: gpu.upload(&h.m).unwrap(),
        v: gpu.upload(&h.v).unwrap(),
        g: gpu.upload(&h.g[0]).unwrap(),
        c32: up_opt(gpu, &h.c32),
        c16: up_opt(gpu, &h.c16),
        cb: up_opt(gpu, &h.cb),
    }
}

enum CopyView<'a> {
    None,
    F32(CudaViewMut<'a, f32>),
    F16(CudaViewMut<'a, f16>),
    Bf16(CudaViewMut<'a, bf16>),
}

type Views<'a, G> = (
    CudaViewMut<'a, f32>,
    CudaViewMut<'a, f32>,
    CudaViewMut<'a, f32>,
    CudaView<'a, G>,
    CopyView<'a>,
);

/// The GPU's step `t` over the views of `devs` (the gradients of step `t` uploaded
/// first). Returns the step's result.
fn gpu_step<G: Element>(
    gpu: &Gpu,
    opt: &AdamW,
    t: u64,
    specs: &[Spec],
    hosts: &[Host<G>],
    devs: &mut [Dev<G>],
) -> lora_kernels::Result<()> {
    for (d, h) in devs.iter_mut().zip(hosts) {
        gpu.stream()
            .memcpy_htod(&h.g[t.saturating_sub(1) as usize], &mut d.g)
            .unwrap();
    }
    let mut views: Vec<Views<'_, G>> = specs
        .iter()
        .zip(devs.iter_mut())
        .map(|(s, d)| {
            let (o, n) = (s.off, s.n);
            let c = match (&mut d.c32, &mut d.c16, &mut d.cb) {
                (Some(c), _, _) => CopyView::F32(c.slice_mut(o[4]..o[4] + n)),
                (_, Some(c), _) => CopyView::F16(c.slice_mut(o[4]..o[4] + n)),
                (_, _, Some(c)) => CopyView::Bf16(c.slice_mut(o[4]..o[4] + n)),
                _ => CopyView::None,
            };
            (
                d.p.slice_mut(o[0]..o[0] + n),
                d.m.slice_mut(o[1]..o[1] + n),
                d.v.slice_mut(o[2]..o[2] + n),
                d.g.slice(o[3]..o[3] + n),
                c,
            )
        })
        .collect();
    let mut list: Vec<cuda::Tensor<'_, G>> = views
        .iter_mut()
        .zip(specs)
        .map(|((p, m, v, g, c), s)| {
            let x = cuda::Tensor::new(p, m, v, &*g).with_options(s.options);
            match c {
                CopyView::None => x,
                CopyView::F32(c) => x.with_copy(cuda::ParamCopy::F32(c)),
                CopyView::F16(c) => x.with_copy(cuda::ParamCopy::F16(c)),
                CopyView::Bf16(c) => x.with_copy(cuda::ParamCopy::Bf16(c)),
            }
        })
        .collect();
    cuda::step(gpu, opt, t, &mut list)
}

fn assert_bits<T: Element>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for i in 0..got.len() {
        let (g, w) = (got[i].to_f64(), want[i].to_f64());
        // Equal bits, or NaN on both sides (the poisoned margins).
        if g.to_bits() != w.to_bits() && !(g.is_nan() && w.is_nan()) {
            panic!(
                "{what} ({:?}): element {i} of {}: got {:?}, want {:?}",
                T::DTYPE,
                got.len(),
                got[i],
                want[i]
            );
        }
    }
}

fn download_all<G: Element>(gpu: &Gpu, devs: &[Dev<G>], like: &[Host<G>]) -> Vec<Host<G>> {
    devs.iter()
        .zip(like)
        .map(|(d, h)| Host {
            p: gpu.download(&d.p).unwrap(),
            m: gpu.download(&d.m).unwrap(),
            v: gpu.download(&d.v).unwrap(),
            g: h.g.clone(),
            c32: d.c32.as_ref().map_or(vec![], |c| gpu.download(c).unwrap()),
            c16: d.c16.as_ref().map_or(vec![], |c| gpu.download(c).unwrap()),
            cb: d.cb.as_ref().map_or(vec![], |c| gpu.download(c).unwrap()),
        })
        .collect()
}

fn compare<G: Element>(tag: &str, specs: &[Spec], got: &[Host<G>], want: &[Host<G>]) {
    for (i, ((s, g), w)) in specs.iter().zip(got).zip(want).enumerate() {
        let what = |b: &str| format!("{tag}: tensor {i} ({s:?}), {b}");
        assert_bits(&what("param"), &g.p, &w.p);
        assert_bits(&what("m"), &g.m, &w.m);
        assert_bits(&what("v"), &g.v, &w.v);
        assert_bits(&what("f32 copy"), &g.c32, &w.c32);
        assert_bits(&what("f16 copy"), &g.c16, &w.c16);
        assert_bits(&what("bf16 copy"), &g.cb, &w.cb);
    }
}

/// `steps` steps of the GPU and of the oracle on the same data; equal bits throughout
/// (margins included).
fn run_case<G: Element>(gpu: &Gpu, opt: &AdamW, specs: &[Spec], steps: u64, seed: u64, tag: &str) {
    let mut rng = Rng::new(seed);
    let mut want: Vec<Host<G>> = specs.iter().map(|s| host(s, steps, &mut rng)).collect();
    let mut devs: Vec<Dev<G>> = want.iter().map(|h| upload(gpu, h)).collect();
    for t in 1..=steps {
        gpu_step(gpu, opt, t, specs, &want, &mut devs).unwrap();
        oracle_step(opt, t, specs, &mut want);
    }
    let got = download_all(gpu, &devs, &want);
    compare(&format!("{tag} ({:?} grads)", G::DTYPE), specs, &got, &want);
}

fn copy_kind(i: usize) -> CopyKind {
    [CopyKind::None, CopyKind::Bf16, CopyKind::F16, CopyKind::F32][i % 4]
}

fn options(i: usize) -> TensorOptions {
    match i % 3 {
        0 => TensorOptions::new(1.0),
        1 => TensorOptions::new(16.0),
        _ => TensorOptions::new(16.0).no_weight_decay(),
    }
}

/// Lengths around the vector groups (4) and the chunk (4096), odd ones, and several
/// chunks.
const LENGTHS: [usize; 14] = [
    1, 2, 3, 4, 5, 7, 130, 1029, 4095, 4096, 4097, 8192, 12_291, 40_003,
];

fn odd_lengths<G: Element>(gpu: &Gpu) {
    let specs: Vec<Spec> = LENGTHS
        .iter()
        .enumerate()
        .map(|(i, &n)| Spec::aligned(n, copy_kind(i), options(i)))
        .collect();
    let opt = AdamW {
        lr: 3e-3,
        weight_decay: 0.1,
        ..AdamW::default()
    };
    run_case::<G>(gpu, &opt, &specs, 3, 100, "odd lengths");
    // beta1 < 0.5 (the lerp from g) and zero weight decay.
    let odd = AdamW {
        lr: 1e-2,
        beta1: 0.25,
        beta2: 0.5,
        eps: 1e-6,
        weight_decay: 0.0,
    };
    run_case::<G>(gpu, &odd, &specs, 2, 101, "odd lengths, beta1 0.25");
}

#[test]
fn f32_grads_odd_lengths() {
    let Some(gpu) = gpu() else { return };
    odd_lengths::<f32>(gpu);
}

#[test]
fn f16_grads_odd_lengths() {
    let Some(gpu) = gpu() else { return };
    odd_lengths::<f16>(gpu);
}

#[test]
fn bf16_grads_odd_lengths() {
    let Some(gpu) = gpu() else { return };
    odd_lengths::<bf16>(gpu);
}

#[test]
fn three_hundred_tensors_in_one_launch() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(7);
    let specs: Vec<Spec> = (0..300)
        .map(|i| {
            let n = match i % 10 {
                0 => 0,
                1 => 16 * 2048, // a LoRA A of rank 16
                2 => (rng.next_u64() % 100_000) as usize,
                _ => 1 + (rng.next_u64() % 9000) as usize,
            };
            Spec::aligned(n, copy_kind(i / 3), options(i))
        })
        .collect();
    run_case::<bf16>(gpu, &AdamW::default(), &specs, 2, 200, "300 tensors");
}

#[test]
fn a_tensor_larger_than_one_pass_of_the_grid() {
    // More chunks than the grid has blocks (8 per SM): blocks loop over chunks.
    let Some(gpu) = gpu() else { return };
    let n = 8 * gpu.sm_count() as usize * cuda::CHUNK + 3 * cuda::CHUNK + 17;
    let specs = [
        Spec::aligned(5, CopyKind::None, options(0)),
        Spec::aligned(n, CopyKind::Bf16, options(1)),
        Spec::aligned(999, CopyKind::F16, options(2)),
    ];
    run_case::<f32>(gpu, &AdamW::default(), &specs, 2, 300, "large tensor");
}

#[test]
fn unaligned_views_take_the_scalar_path() {
    let Some(gpu) = gpu() else { return };
    // Each tensor misaligns one buffer (by 1 to 3 elements), next to aligned tensors.
    let mut specs = vec![];
    for (i, &n) in [9usize, 4096, 5000, 130].iter().enumerate() {
        for k in 0..5 {
            for off in 1..4 {
                let mut off5 = [ALIGNED; 5];
                off5[k] = ALIGNED + off;
                specs.push(Spec {
                    n: n + k,
                    off: off5,
                    copy: [CopyKind::Bf16, CopyKind::F16, CopyKind::F32][(i + off) % 3],
                    options: options(k + off),
                });
            }
        }
        specs.push(Spec::aligned(n, CopyKind::Bf16, options(i)));
    }
    run_case::<f32>(gpu, &AdamW::default(), &specs, 2, 400, "unaligned views");
    run_case::<bf16>(gpu, &AdamW::default(), &specs, 2, 401, "unaligned views");
    run_case::<f16>(gpu, &AdamW::default(), &specs, 1, 402, "unaligned views");
}

#[test]
fn bad_input_is_an_error_and_writes_nothing() {
    let Some(gpu) = gpu() else { return };
    let specs = [
        Spec::aligned(4100, CopyKind::Bf16, options(0)),
        Spec::aligned(77, CopyKind::F16, options(1)),
    ];
    let mut rng = Rng::new(500);
    let hosts: Vec<Host<bf16>> = specs.iter().map(|s| host(s, 1, &mut rng)).collect();
    let good = AdamW::default();
    let cases: Vec<(&str, AdamW, u64, TensorOptions)> = vec![
        ("lr", AdamW { lr: -1.0, ..good }, 1, options(1)),
        ("beta1", AdamW { beta1: 1.0, ..good }, 1, options(1)),
        (
            "eps",
            AdamW {
                eps: f64::NAN,
                ..good
            },
            1,
            options(1),
        ),
        (
            "weight_decay",
            AdamW {
                weight_decay: -1.0,
                ..good
            },
            1,
            options(1),
        ),
        ("t", good, 0, options(1)),
        ("lr_scale", good, 1, TensorOptions::new(f64::NAN)),
    ];
    for (want, opt, t, o) in cases {
        let mut devs: Vec<Dev<bf16>> = hosts.iter().map(|h| upload(gpu, h)).collect();
        let mut s2 = specs;
        s2[1].options = o;
        match gpu_step(gpu, &opt, t, &s2, &hosts, &mut devs) {
            Err(Error::Value { name, .. }) => assert_eq!(name, want),
            other => panic!("{want}: {other:?}"),
        }
        compare(want, &specs, &download_all(gpu, &devs, &hosts), &hosts);
    }
    // Lengths: the second tensor's m, v, grad or copy one element short.
    for (k, want) in ["m", "v", "grad", "copy"].iter().enumerate() {
        let mut devs: Vec<Dev<bf16>> = hosts.iter().map(|h| upload(gpu, h)).collect();
        let r = {
            let [d0, d1] = &mut devs[..] else {
                unreachable!()
            };
            let n = [specs[0].n, specs[1].n];
            let short = |i: usize, b: usize| n[i] - (i == 1 && b == k) as usize;
            let (mut p0, mut m0, mut v0) = (
                d0.p.slice_mut(..n[0]),
                d0.m.slice_mut(..n[0]),
                d0.v.slice_mut(..n[0]),
            );
            let g0 = d0.g.slice(..n[0]);
            let (mut p1, mut m1, mut v1) = (
                d1.p.slice_mut(..n[1]),
                d1.m.slice_mut(..short(1, 0)),
                d1.v.slice_mut(..short(1, 1)),
            );
            let g1 = d1.g.slice(..short(1, 2));
            let mut c1 = d1.c16.as_mut().unwrap().slice_mut(..short(1, 3));
            let mut list = [
                cuda::Tensor::new(&mut p0, &mut m0, &mut v0, &g0),
                cuda::Tensor::new(&mut p1, &mut m1, &mut v1, &g1)
                    .with_copy(cuda::ParamCopy::F16(&mut c1)),
            ];
            cuda::step(gpu, &good, 1, &mut list)
        };
        match r {
            Err(Error::Length { name, .. }) => assert_eq!(name, *want),
            other => panic!("{want}: {other:?}"),
        }
        compare(want, &specs, &download_all(gpu, &devs, &hosts), &hosts);
    }
}

#[test]
fn empty_lists_queue_nothing() {
    let Some(gpu) = gpu() else { return };
    let opt = AdamW::default();
    cuda::step::<f32>(gpu, &opt, 1, &mut []).unwrap();
    let specs = [Spec::aligned(0, CopyKind::Bf16, options(0))];
    let mut rng = Rng::new(600);
    let hosts: Vec<Host<f32>> = specs.iter().map(|s| host(s, 1, &mut rng)).collect();
    let mut devs: Vec<Dev<f32>> = hosts.iter().map(|h| upload(gpu, h)).collect();
    gpu_step(gpu, &opt, 1, &specs, &hosts, &mut devs).unwrap();
    compare("empty", &specs, &download_all(gpu, &devs, &hosts), &hosts);
    // Still validated.
    assert!(cuda::step::<f32>(gpu, &opt, 0, &mut []).is_err());
}

/// A buffer that claims `len` elements over a real (small) one: the launcher must refuse
/// element counts beyond its limit before it touches any address.
struct Claims<'a, T> {
    inner: &'a mut CudaSlice<T>,
    len: usize,
}

impl<T> DeviceSlice<T> for Claims<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        self.inner.stream()
    }
}

impl<T> DevicePtr<T> for Claims<'_, T> {
    fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        self.inner.device_ptr(stream)
    }
}

impl<T> DevicePtrMut<T> for Claims<'_, T> {
    fn device_ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        self.inner.device_ptr_mut(stream)
    }
}

fn claim<T>(inner: &mut CudaSlice<T>, len: usize) -> Claims<'_, T> {
    Claims { inner, len }
}

#[test]
fn element_counts_beyond_the_limit_are_refused() {
    let Some(gpu) = gpu() else { return };
    let mut bufs: Vec<CudaSlice<f32>> = (0..8).map(|_| gpu.zeros(16).unwrap()).collect();
    let [a, b, c, d, e, f, g, h] = &mut bufs[..] else {
        unreachable!()
    };
    // 2^42 + 2^42 elements are 2^31 chunks of 4096: one past the limit.
    for (len1, len2) in [
        (1usize << 62, 1usize << 62),
        (usize::MAX, 1),
        (1 << 42, 1 << 42),
    ] {
        let mut p1 = claim(a, len1);
        let mut m1 = claim(b, len1);
        let mut v1 = claim(c, len1);
        let g1 = claim(d, len1);
        let mut p2 = claim(e, len2);
        let mut m2 = claim(f, len2);
        let mut v2 = claim(g, len2);
        let g2 = claim(h, len2);
        let mut list = [
            cuda::Tensor::new(&mut p1, &mut m1, &mut v1, &g1),
            cuda::Tensor::new(&mut p2, &mut m2, &mut v2, &g2),
        ];
        match cuda::step(gpu, &AdamW::default(), 1, &mut list) {
            Err(Error::Dim { name, .. }) => assert_eq!(name, "total elements"),
            other => panic!("{len1} + {len2}: {other:?}"),
        }
    }
    for b in &bufs {
        assert!(gpu.download(b).unwrap().iter().all(|&x| x == 0.0));
    }
}
