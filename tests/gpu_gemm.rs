//! The Hopper GEMM core (`cuda::gemm::matmul_nt`) against an f64 oracle of the rounded
//! operands, over odd shapes (T, N and K not multiples of any tile), bf16 and f16, with
//! and without bias, column scale and the low-rank K-slice; plus the argument errors.
//! Outputs are poisoned (NaN) before each run, so an unwritten element fails.
//!
//! Without a GPU these tests print a loud SKIPPED note and return
//! (`LORA_KERNELS_REQUIRE_GPU=1` makes them fail instead). The kernel is sm_90 only: on
//! another GPU the numeric tests check that the op refuses with `Error::Unsupported`
//! and say loudly that they were skipped.

mod common;

use std::io::Write;

use common::{assert_close, gpu, poison, Rng};
use cudarc::driver::CudaSlice;
use lora_kernels::cuda::gemm::{self, GemmEpilogue};
use lora_kernels::cuda::nf4::Nf4Device;
use lora_kernels::cuda::{Gpu, Path, Plan};
use lora_kernels::tuning::{CorePolicy, FusedDown};
use lora_kernels::{bf16, f16, Element, Error, Nf4Weight, Tuning};

const TS: [usize; 5] = [1, 3, 17, 129, 1000];
const NS: [usize; 4] = [8, 24, 200, 1000];
const KS: [usize; 4] = [8, 64, 72, 1000];
const RS: [usize; 4] = [1, 8, 16, 64];

#[derive(Debug, Clone, Copy)]
struct Case {
    t: usize,
    n: usize,
    k: usize,
    bias: bool,
    scale: bool,
    /// The low-rank K-slice's rank, or 0 for none.
    r: usize,
}

/// Every T with four (N, K) pairs cycling so each value meets several others, and the
/// epilogue options cycling through none, bias, scale, all three, low-rank alone.
fn odd_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for (ti, &t) in TS.iter().enumerate() {
        for i in 0..4 {
            let e = (i + ti) % 5;
            let n = NS[(i + ti) % 4];
            let k = KS[(i + 2 * ti) % 4];
            // Keep the oracle's work bounded: at most one T = N = K = 1000 case.
            let k = if t == 1000 && n == 1000 && k == 1000 && i != 0 {
                72
            } else {
                k
            };
            v.push(Case {
                t,
                n,
                k,
                bias: e == 1 || e == 3,
                scale: e == 2 || e == 3,
                r: if e >= 3 { RS[(i + ti) % 4] } else { 0 },
            });
        }
    }
    v
}

/// Cases from (T, N, K, r) tuples, with a bias for even T and a column scale for T a
/// multiple of 3.
fn cases_of(list: &[(usize, usize, usize, usize)]) -> Vec<Case> {
    list.iter()
        .map(|&(t, n, k, r)| Case {
            t,
            n,
            k,
            bias: t % 2 == 0,
            scale: t % 3 == 0,
            r,
        })
        .collect()
}

/// The shared GPU if the GEMM core runs on it. On another GPU, checks that the op
/// refuses with `Error::Unsupported` and prints a loud note naming `test`.
fn gpu90(test: &str) -> Option<&'static Gpu> {
    let g = gpu()?;
    if gemm::supported(g) {
        return Some(g);
    }
    let x: CudaSlice<bf16> = g.zeros(64).unwrap();
    let w: CudaSlice<bf16> = g.zeros(64).unwrap();
    let mut y: CudaSlice<bf16> = g.zeros(64).unwrap();
    let e = gemm::matmul_nt(g, &x, &w, &mut y, &GemmEpilogue::new(), 8, 8, 8).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let (major, minor) = g.compute_capability();
    let _ = writeln!(
        std::io::stderr(),
        "\n*** {test} SKIPPED: the GEMM core needs sm_90, this GPU is sm_{major}{minor} \
         (it refused with: {e}) ***\n"
    );
    None
}

struct Host<T> {
    x: Vec<T>,
    w: Vec<T>,
    bias: Option<Vec<T>>,
    scale: Option<Vec<f32>>,
    u: Option<Vec<T>>,
    bl: Option<Vec<T>>,
}

fn host_data<T: Element>(rng: &mut Rng, c: &Case) -> Host<T> {
    Host {
        x: rng.vec(c.t * c.k, 1.0),
        w: rng.vec(c.n * c.k, 1.0),
        bias: c.bias.then(|| rng.vec(c.n, 1.0)),
        scale: c.scale.then(|| {
            (0..c.n)
                .map(|_| (1.0 + 0.5 * rng.uniform()) as f32)
                .collect()
        }),
        u: (c.r > 0).then(|| rng.vec(c.t * c.r, 1.0)),
        bl: (c.r > 0).then(|| rng.vec(c.n * c.r, 1.0)),
    }
}

/// `y = scale ⊙ (x Wᵀ + U Blᵀ) + bias` in f64 over the rounded operands, rounded to T
/// once; with `abs`, the same over absolute values (the tolerance's magnitude).
fn oracle<T: Element>(c: &Case, d: &Host<T>, abs: bool) -> Vec<T> {
    let f = |v: &[T]| -> Vec<f64> {
        v.iter()
            .map(|e| if abs { e.to_f64().abs() } else { e.to_f64() })
            .collect()
    };
    let (x, w) = (f(&d.x), f(&d.w));
    let u = d.u.as_deref().map(f);
    let bl = d.bl.as_deref().map(f);
    let bias = d.bias.as_deref().map(f);
    let mut y = vec![T::default(); c.t * c.n];
    for t in 0..c.t {
        let xr = &x[t * c.k..][..c.k];
        for n in 0..c.n {
            let wr = &w[n * c.k..][..c.k];
            let mut acc: f64 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
            if let (Some(u), Some(bl)) = (&u, &bl) {
                acc += (0..c.r)
                    .map(|j| u[t * c.r + j] * bl[n * c.r + j])
                    .sum::<f64>();
            }
            if let Some(s) = &d.scale {
                let s = s[n] as f64;
                acc *= if abs { s.abs() } else { s };
            }
            if let Some(b) = &bias {
                acc += b[n];
            }
            y[t * c.n + n] = T::from_f64(acc);
        }
    }
    y
}

/// How the product takes W: [N, K] (`matmul_nt`), [K, N] with Bl [r, N] (`matmul_nn`),
/// or NF4 (blocksize, double quantization) as [N, K] (`matmul_nt_nf4`) or as [K, N]
/// with Bl [r, N] (`matmul_nn_nf4`); for NF4 the oracle takes the host dequantize of
/// the same weight (the values the kernel must produce in shared memory).
#[derive(Debug, Clone, Copy)]
enum Layout {
    Nt,
    Nn,
    Nf4(usize, bool),
    Nf4Nn(usize, bool),
}

fn check_case<T: Element>(gpu: &Gpu, c: &Case, seed: u64) {
    run_case::<T>(gpu, c, seed, Layout::Nt);
}

/// [`check_case`] with a path tuning (tile width, mma.sync kernels) in the epilogue.
fn check_case_with<T: Element>(gpu: &Gpu, c: &Case, seed: u64, tuning: Tuning) {
    run_case_with::<T>(gpu, c, seed, Layout::Nt, tuning);
}

fn run_case<T: Element>(gpu: &Gpu, c: &Case, seed: u64, layout: Layout) {
    run_case_with::<T>(gpu, c, seed, layout, Tuning::AUTO);
}

/// The tuning of a forced tile width (`None`: the per-call choice).
fn tile(tile_n: Option<usize>) -> Tuning {
    Tuning {
        tile_n,
        ..Tuning::AUTO
    }
}

fn run_case_with<T: Element>(gpu: &Gpu, c: &Case, seed: u64, layout: Layout, tuning: Tuning) {
    let what = format!("{} {c:?} {layout:?} {tuning:?}", common::dtype_name::<T>());
    let mut rng = Rng::new(seed);
    let mut d = host_data::<T>(&mut rng, c);
    let q = match layout {
        Layout::Nf4(bs, dq) => {
            let q = Nf4Weight::quantize(&d.w, c.n, c.k, bs, dq).unwrap();
            d.w = q.dequantize::<T>().unwrap();
            Some(q)
        }
        Layout::Nf4Nn(bs, dq) => {
            // The weight stored [K, N] is quantized (its blocks run along N).
            let q = Nf4Weight::quantize(&transpose(&d.w, c.n, c.k), c.k, c.n, bs, dq).unwrap();
            d.w = transpose(&q.dequantize::<T>().unwrap(), c.k, c.n);
            Some(q)
        }
        _ => None,
    };
    let want = oracle(c, &d, false);
    let mag = oracle(c, &d, true);

    let nn = matches!(layout, Layout::Nn | Layout::Nf4Nn(..));
    let x = gpu.upload(&d.x).unwrap();
    let w = if nn {
        gpu.upload(&transpose(&d.w, c.n, c.k)).unwrap()
    } else {
        gpu.upload(&d.w).unwrap()
    };
    let bias = d.bias.as_ref().map(|b| gpu.upload(b).unwrap());
    let scale = d.scale.as_ref().map(|s| gpu.upload(s).unwrap());
    let u = d.u.as_ref().map(|u| gpu.upload(u).unwrap());
    let bl = d.bl.as_ref().map(|b| {
        if nn {
            gpu.upload(&transpose(b, c.n, c.r)).unwrap()
        } else {
            gpu.upload(b).unwrap()
        }
    });
    let mut y = gpu.upload(&poison::<T>(c.t * c.n)).unwrap();

    let mut epi = GemmEpilogue::new().with_tuning(tuning);
    if let Some(b) = &bias {
        epi = epi.with_bias(b);
    }
    if let (Some(u), Some(bl)) = (&u, &bl) {
        epi = epi.with_low_rank(u, bl, c.r);
    }
    if let Some(s) = &scale {
        epi = epi.with_col_scale(s);
    }
    match (&q, nn) {
        (Some(q), false) => {
            let wq = Nf4Device::upload(gpu, q).unwrap();
            gemm::matmul_nt_nf4(gpu, c.t, &x, &wq, &mut y, &epi)
        }
        (Some(q), true) => {
            let wq = Nf4Device::upload(gpu, q).unwrap();
            gemm::matmul_nn_nf4(gpu, c.t, &x, &wq, &mut y, &epi)
        }
        (None, true) => gemm::matmul_nn(gpu, &x, &w, &mut y, &epi, c.t, c.n, c.k),
        (None, false) => gemm::matmul_nt(gpu, &x, &w, &mut y, &epi, c.t, c.n, c.k),
    }
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = gpu.download(&y).unwrap();
    assert_close(&what, &got, &want, &mag, c.k + c.r);
}

/// The rows × cols row-major matrix `m` transposed.
fn transpose<T: Copy>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..cols * rows)
        .map(|i| m[(i % rows) * cols + i / rows])
        .collect()
}

/// `gemm::matmul_nn` (W stored [K, N], Bl [r, N]: the MN-major B operand) on the same
/// data and oracle as [`check_case`]: W and Bl are uploaded transposed.
fn check_case_nn<T: Element>(gpu: &Gpu, c: &Case, seed: u64, tuning: Tuning) {
    run_case_with::<T>(gpu, c, seed, Layout::Nn, tuning);
}

/// `matmul_nn` over the odd shapes (every N there is a multiple of 8, as it needs),
/// every rank kind, both tile widths forced and the per-call choice, K = 4096, many
/// tiles per persistent cluster, bf16 and f16.
#[test]
fn gemm_nn_shapes() {
    let Some(gpu) = gpu90("gemm_nn_shapes") else {
        return;
    };
    for (i, c) in odd_cases().iter().enumerate() {
        assert_eq!(c.n % 8, 0);
        check_case_nn::<bf16>(gpu, c, 1100 + i as u64, Tuning::AUTO);
        check_case_nn::<f16>(gpu, c, 1200 + i as u64, Tuning::AUTO);
    }
    let extra = cases_of(&[
        (129, 200, 4096, 16),
        (1100, 520, 64, 16),
        (1030, 776, 136, 3),
        (700, 1000, 88, 12),
        (300, 2056, 40, 1),
        (257, 1024, 520, 64),
    ]);
    for (i, c) in extra.iter().enumerate() {
        for width in [None, Some(gemm::TILE_N), Some(gemm::TILE_N_NARROW)] {
            check_case_nn::<bf16>(gpu, c, 1300 + i as u64, tile(width));
            check_case_nn::<f16>(gpu, c, 1400 + i as u64, tile(width));
        }
    }
}

/// `matmul_nn`'s own argument errors: N % 8 != 0, Bl misaligned with a rank that is not a
/// multiple of 8 (it is never copied), lengths.
#[test]
fn gemm_nn_errors() {
    let Some(g) = gpu() else {
        return;
    };
    let (t, n, k) = (17usize, 24usize, 64usize);
    let x: CudaSlice<bf16> = g.zeros(t * k).unwrap();
    let w: CudaSlice<bf16> = g.zeros(n * k + 8).unwrap();
    let u: CudaSlice<bf16> = g.zeros(t * 8).unwrap();
    let bl: CudaSlice<bf16> = g.zeros(n * 8 + 8).unwrap();
    let mut y: CudaSlice<bf16> = g.zeros(t * n).unwrap();
    let none = GemmEpilogue::new();
    let x = x.slice(..);
    let wv = w.slice(0..n * k);
    let e = gemm::matmul_nn(
        g,
        &x,
        &w.slice(0..20 * k),
        &mut y.slice_mut(0..t * 20),
        &none,
        t,
        20,
        k,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Dim {
                name: "n",
                value: 20,
                ..
            }
        ),
        "{e}"
    );
    let e = gemm::matmul_nn(g, &x, &wv, &mut y, &none, t, n, k + 8).unwrap_err();
    assert!(matches!(e, Error::Length { .. }), "{e}");
    if gemm::supported(g) {
        let uv = u.slice(0..t * 3);
        let bl_off = bl.slice(1..1 + n * 3);
        let epi = GemmEpilogue::new().with_low_rank(&uv, &bl_off, 3);
        let e = gemm::matmul_nn(g, &x, &wv, &mut y, &epi, t, n, k).unwrap_err();
        assert!(matches!(e, Error::Misaligned { name: "b", .. }), "{e}");
        let w_off = w.slice(1..1 + n * k);
        let e = gemm::matmul_nn(g, &x, &w_off, &mut y, &none, t, n, k).unwrap_err();
        assert!(matches!(e, Error::Misaligned { name: "w", .. }), "{e}");
    }
}

#[test]
fn gemm_odd_shapes_bf16() {
    let Some(gpu) = gpu90("gemm_odd_shapes_bf16") else {
        return;
    };
    for (i, c) in odd_cases().iter().enumerate() {
        check_case::<bf16>(gpu, c, 100 + i as u64);
    }
}

#[test]
fn gemm_odd_shapes_f16() {
    let Some(gpu) = gpu90("gemm_odd_shapes_f16") else {
        return;
    };
    for (i, c) in odd_cases().iter().enumerate() {
        check_case::<f16>(gpu, c, 200 + i as u64);
    }
}

/// K = 4096 (64 K-slices: the ring wraps 16 times), with every epilogue option.
#[test]
fn gemm_k4096() {
    let Some(gpu) = gpu90("gemm_k4096") else {
        return;
    };
    let c = Case {
        t: 129,
        n: 200,
        k: 4096,
        bias: true,
        scale: true,
        r: 16,
    };
    check_case::<bf16>(gpu, &c, 301);
    check_case::<f16>(gpu, &c, 302);
    let plain = Case {
        bias: false,
        scale: false,
        r: 0,
        ..c
    };
    check_case::<bf16>(gpu, &plain, 303);
}

/// The mma.sync kernels (the sm_80 .. sm_89 path; forced on sm_90) over the odd shapes,
/// every rank kind, K = 4096, many tiles and odd N; then their refusals (NF4, W [K, N]).
/// Skipped loudly on a GPU older than sm_80 (none is supported).
#[test]
fn gemm_mma_path_shapes() {
    let Some(gpu) = gpu() else { return };
    if !gemm::supported(gpu) && gpu.compute_capability().0 != 8 {
        eprintln!("\n*** gemm_mma_path_shapes SKIPPED: neither sm_8x nor sm_90 ***\n");
        return;
    }
    let mma = Tuning {
        mma_path: true,
        ..Tuning::AUTO
    };
    let mut cases = odd_cases();
    cases.extend(cases_of(&[
        (129, 200, 4096, 16),
        (1100, 520, 64, 16),
        (1030, 777, 136, 0),
        (300, 1000, 88, 3),
        (257, 1024, 520, 64),
        (130, 260, 64, 17),
    ]));
    for (i, c) in cases.iter().enumerate() {
        check_case_with::<bf16>(gpu, c, 1500 + i as u64, mma);
        check_case_with::<f16>(gpu, c, 1600 + i as u64, mma);
    }
    // NF4 and W [K, N] are wgmma-only.
    let (t, n, k) = (17usize, 24usize, 64usize);
    let x: CudaSlice<bf16> = gpu.zeros(t * k).unwrap();
    let w: CudaSlice<bf16> = gpu.zeros(n * k).unwrap();
    let mut y: CudaSlice<bf16> = gpu.zeros(t * n).unwrap();
    let on_mma = GemmEpilogue::new().with_tuning(mma);
    let e = gemm::matmul_nn(gpu, &x, &w, &mut y, &on_mma, t, n, k).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let q = Nf4Weight::quantize(&vec![bf16::ONE; n * k], n, k, 64, false).unwrap();
    let wq = Nf4Device::upload(gpu, &q).unwrap();
    let e = gemm::matmul_nt_nf4(gpu, t, &x, &wq, &mut y, &on_mma).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
}

/// Every rank the low-rank slice takes, including ranks that are not multiples of 8
/// (padded copies of U and Bl), against small and odd shapes.
#[test]
fn gemm_low_rank_ranks() {
    let Some(gpu) = gpu90("gemm_low_rank_ranks") else {
        return;
    };
    for (i, &r) in [1usize, 3, 8, 16, 17, 64].iter().enumerate() {
        for (j, &(t, n, k)) in [(3usize, 24usize, 72usize), (130, 260, 64)]
            .iter()
            .enumerate()
        {
            let c = Case {
                t,
                n,
                k,
                bias: j == 1,
                scale: i % 2 == 1,
                r,
            };
            check_case::<bf16>(gpu, &c, 400 + 10 * i as u64 + j as u64);
            check_case::<f16>(gpu, &c, 500 + 10 * i as u64 + j as u64);
        }
    }
}

/// Many tiles in both directions, the last L2 group partial (9 tile rows: 8 + 1) and
/// odd N (scalar stores).
#[test]
fn gemm_many_tiles() {
    let Some(gpu) = gpu90("gemm_many_tiles") else {
        return;
    };
    for (i, &(t, n, k, r)) in [(1100usize, 520usize, 64usize, 16usize), (1030, 777, 136, 0)]
        .iter()
        .enumerate()
    {
        let c = Case {
            t,
            n,
            k,
            bias: true,
            scale: i == 0,
            r,
        };
        check_case::<bf16>(gpu, &c, 600 + i as u64);
    }
}

/// Both tile widths (128 × 256 and 128 × 128), forced, on a grid of more tiles than SMs
/// so each persistent cluster runs several tiles and the ring's phases carry from one tile to
/// the next (3 K-slices a tile: not a multiple of either ring depth, 4 or 6), and on a
/// small odd shape with every epilogue option; then the per-call choice again.
#[test]
fn gemm_tile_widths_persistent() {
    let Some(gpu) = gpu90("gemm_tile_widths_persistent") else {
        return;
    };
    let sms = gpu.sm_count() as usize;
    // Rows and columns of tiles enough for more than one round of each width, an odd
    // number of tile rows (the last pairs of the 2-CTA clusters have a tile past T).
    let t = (sms.isqrt() + 1) * gemm::TILE_M + 5;
    let n = (sms.div_ceil(t.div_ceil(gemm::TILE_M)) + 1) * gemm::TILE_N - 3;
    assert!(t.div_ceil(gemm::TILE_M) * n.div_ceil(gemm::TILE_N) > sms);
    for (i, &w) in [gemm::TILE_N, gemm::TILE_N_NARROW].iter().enumerate() {
        let forced = tile(Some(w));
        // N odd: the direct-store epilogue; N + 3 (a multiple of 8): the TMA-store one.
        for (j, n) in [n, n + 3].into_iter().enumerate() {
            let big = Case {
                t,
                n,
                k: 136,
                bias: true,
                scale: j == 1,
                r: 0,
            };
            check_case_with::<bf16>(gpu, &big, 800 + 2 * i as u64 + j as u64, forced);
        }
        let small = Case {
            t: 37,
            n: 301,
            k: 200,
            bias: true,
            scale: true,
            r: 17,
        };
        check_case_with::<bf16>(gpu, &small, 810 + i as u64, forced);
        check_case_with::<f16>(gpu, &small, 820 + i as u64, forced);
    }
    assert!(tile(Some(64)).validate().is_err());
    // The per-call choice: the narrow tile where it halves a single round's work, the
    // wide one on the large shapes.
    assert_eq!(gemm::tile_n_for(512, 4096, 132), gemm::TILE_N_NARROW);
    assert_eq!(gemm::tile_n_for(4096, 4096, 132), gemm::TILE_N);
    assert_eq!(gemm::tile_n_for(4096, 11008, 132), gemm::TILE_N);
}

/// The NF4 kernels (W dequantized into shared memory by the producer warpgroup): every
/// blocksize class (32 .. 4096, blocks crossing rows where K % blocksize != 0), plain and
/// double-quantized scales, K not a multiple of 64 (a half-empty last K-slice), odd N
/// (direct stores) and N % 8 == 0 (TMA stores), odd tile-row counts (a dead CTA that
/// still dequantizes its half for the peer), every epilogue option, both tile widths
/// forced on a grid of more tiles than clusters (several tiles per cluster), then the
/// per-call choice.
#[test]
fn gemm_nf4_shapes() {
    let Some(gpu) = gpu90("gemm_nf4_shapes") else {
        return;
    };
    let cases = [
        (1usize, 8usize, 64usize, 0usize, 32usize, false),
        (3, 200, 96, 16, 64, true),
        (129, 301, 160, 0, 128, false),
        (257, 1000, 4096, 8, 256, true),
        (1000, 520, 224, 64, 4096, false),
        (37, 24, 32, 3, 64, true),
    ];
    nf4_grid(gpu, &cases, Layout::Nf4, (-3, 3), 160, 900);
}

/// `matmul_nn_nf4` (W [K, N] in NF4, dequantized into the MN-major B layout; Bl
/// [r, N]): every blocksize kind (blocks within a row, across rows, 4096), with and
/// without double quantization, N a multiple of 32 but not of the tile widths, K not a
/// multiple of 64 (zero-filled rows past K), every epilogue option and rank kind, both
/// tile widths forced on a grid of more tiles than clusters, then the per-call choice.
#[test]
fn gemm_nf4nn_shapes() {
    let Some(gpu) = gpu90("gemm_nf4nn_shapes") else {
        return;
    };
    let cases = [
        (1usize, 32usize, 64usize, 0usize, 32usize, false),
        (3, 224, 96, 16, 64, true),
        (129, 288, 168, 0, 128, false),
        (257, 1024, 4096, 8, 256, true),
        (1000, 544, 200, 64, 4096, false),
        (37, 96, 8, 3, 64, true),
        (300, 4096, 520, 12, 64, true),
    ];
    nf4_grid(gpu, &cases, Layout::Nf4Nn, (-32, 64), 232, 1500);
}

/// The NF4 shape tests' runs: each case (T, N, K, rank, blocksize, double quantization)
/// in bf16 and f16 with the epilogue options in turn, then a grid of more tiles than
/// clusters at both forced tile widths: N = a few tile columns + `dn.0`, then `dn.1` more
/// (one with the low-rank slice and double quantization), K = `k`.
fn nf4_grid(
    gpu: &Gpu,
    cases: &[(usize, usize, usize, usize, usize, bool)],
    layout: fn(usize, bool) -> Layout,
    dn: (isize, usize),
    k: usize,
    seed: u64,
) {
    for (i, &(t, n, k, r, bs, dq)) in cases.iter().enumerate() {
        let c = Case {
            t,
            n,
            k,
            bias: i % 2 == 0,
            scale: i % 3 == 1,
            r,
        };
        run_case::<bf16>(gpu, &c, seed + i as u64, layout(bs, dq));
        run_case::<f16>(gpu, &c, seed + 50 + i as u64, layout(bs, dq));
    }
    let sms = gpu.sm_count() as usize;
    let t = (sms.isqrt() + 1) * gemm::TILE_M + 5;
    let n = (sms.div_ceil(t.div_ceil(gemm::TILE_M)) + 1) * gemm::TILE_N;
    let n = n.checked_add_signed(dn.0).unwrap();
    for (i, &w) in [gemm::TILE_N, gemm::TILE_N_NARROW].iter().enumerate() {
        for (j, n) in [n, n + dn.1].into_iter().enumerate() {
            let c = Case {
                t,
                n,
                k,
                bias: true,
                scale: j == 0,
                r: if j == 1 { 16 } else { 0 },
            };
            let s = seed + 70 + 2 * i as u64 + j as u64;
            run_case_with::<bf16>(gpu, &c, s, layout(64, j == 1), tile(Some(w)));
        }
    }
}

/// The NF4 entry's own argument errors: K % 32 != 0, a misaligned or short buffer.
#[test]
fn gemm_nf4_errors() {
    let Some(g) = gpu() else {
        return;
    };
    let (t, n) = (5usize, 16usize);
    let q = Nf4Weight::quantize(&vec![bf16::ONE; n * 40], n, 40, 64, false).unwrap();
    let wq = Nf4Device::upload(g, &q).unwrap();
    let x: CudaSlice<bf16> = g.zeros(t * 64).unwrap();
    let mut y: CudaSlice<bf16> = g.zeros(t * n).unwrap();
    let epi = GemmEpilogue::new();
    let e = gemm::matmul_nt_nf4(g, t, &x, &wq, &mut y, &epi).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Dim {
                name: "cols (K)",
                ..
            }
        ),
        "{e}"
    );
    let q = Nf4Weight::quantize(&vec![bf16::ONE; n * 64], n, 64, 64, true).unwrap();
    let wq = Nf4Device::upload(g, &q).unwrap();
    let e = gemm::matmul_nt_nf4(g, t + 1, &x, &wq, &mut y, &epi).unwrap_err();
    assert!(matches!(e, Error::Length { .. }), "{e}");
    // x one element (2 bytes) off 16-byte alignment.
    let x_off = x.slice(1..1 + (t - 1) * 64);
    let mut y_short = y.slice_mut(0..(t - 1) * n);
    let e = gemm::matmul_nt_nf4(g, t - 1, &x_off, &wq, &mut y_short, &GemmEpilogue::new());
    let e = e.unwrap_err();
    assert!(matches!(e, Error::Misaligned { name: "x", .. }), "{e}");
    // matmul_nn_nf4: W [K = 16, N = 40] has a row length that is not a multiple of 32;
    // then W [16, 64] against an x of the wrong length.
    let q = Nf4Weight::quantize(&vec![bf16::ONE; n * 40], n, 40, 64, false).unwrap();
    let wq = Nf4Device::upload(g, &q).unwrap();
    let mut y: CudaSlice<bf16> = g.zeros(t * 40).unwrap();
    let e = gemm::matmul_nn_nf4(g, t, &x, &wq, &mut y, &epi).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Dim {
                name: "cols (K_w)",
                ..
            }
        ),
        "{e}"
    );
    let q = Nf4Weight::quantize(&vec![bf16::ONE; n * 64], n, 64, 64, true).unwrap();
    let wq = Nf4Device::upload(g, &q).unwrap();
    let mut y: CudaSlice<bf16> = g.zeros(t * 64).unwrap();
    let e = gemm::matmul_nn_nf4(g, t, &x, &wq, &mut y, &epi).unwrap_err();
    assert!(matches!(e, Error::Length { name: "x", .. }), "{e}");
}

/// Argument errors come before the architecture check, so they show on any GPU.
#[test]
fn gemm_errors() {
    let Some(g) = gpu() else {
        return;
    };
    let (t, n, k) = (17usize, 24usize, 64usize);
    let x: CudaSlice<bf16> = g.zeros(t * k + 8).unwrap();
    let w: CudaSlice<bf16> = g.zeros(n * k).unwrap();
    let u: CudaSlice<bf16> = g.zeros(t * 64).unwrap();
    let bl: CudaSlice<bf16> = g.zeros(n * 64).unwrap();
    let mut y: CudaSlice<bf16> = g.zeros(t * n).unwrap();
    let xv = x.slice(0..t * k);
    let wv = w.slice(..);
    let none = GemmEpilogue::new();

    // K % 8 != 0.
    let x12 = x.slice(0..t * 12);
    let w12: CudaSlice<bf16> = g.zeros(n * 12).unwrap();
    let e = gemm::matmul_nt(g, &x12, &w12.slice(..), &mut y, &none, t, n, 12).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Dim {
                name: "k",
                value: 12,
                ..
            }
        ),
        "{e}"
    );
    // x misaligned to 16 bytes (one element in).
    let x_off = x.slice(1..1 + t * k);
    let e = gemm::matmul_nt(g, &x_off, &wv, &mut y, &none, t, n, k).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Misaligned {
                name: "x",
                align: 16,
                ..
            }
        ),
        "{e}"
    );
    // Wrong lengths.
    let e = gemm::matmul_nt(g, &xv, &wv, &mut y, &none, t, n + 1, k).unwrap_err();
    assert!(matches!(e, Error::Length { name: "w", .. }), "{e}");
    // Rank 0 and 65.
    for r in [0usize, 65] {
        let uv = u.slice(..);
        let bv = bl.slice(..);
        let epi = GemmEpilogue::new().with_low_rank(&uv, &bv, r);
        let e = gemm::matmul_nt(g, &xv, &wv, &mut y, &epi, t, n, k).unwrap_err();
        assert!(
            matches!(e, Error::Dim { name: "rank", value, .. } if value == r),
            "{e}"
        );
    }
    // U misaligned with r % 8 == 0 (TMA reads it in place).
    let u_off = u.slice(1..1 + t * 8);
    let bv = bl.slice(0..n * 8);
    let epi = GemmEpilogue::new().with_low_rank(&u_off, &bv, 8);
    let e = gemm::matmul_nt(g, &xv, &wv, &mut y, &epi, t, n, k).unwrap_err();
    assert!(matches!(e, Error::Misaligned { name: "u", .. }), "{e}");
    // Zero sizes.
    let e = gemm::matmul_nt(g, &xv, &wv, &mut y, &none, 0, n, k).unwrap_err();
    assert!(matches!(e, Error::Dim { name: "tokens", .. }), "{e}");
    // A tile width the core does not have.
    let bad_tile = GemmEpilogue::new().with_tuning(tile(Some(64)));
    let e = gemm::matmul_nt(g, &xv, &wv, &mut y, &bad_tile, t, n, k).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Dim {
                name: "tuning.tile_n",
                value: 64,
                ..
            }
        ),
        "{e}"
    );
    // f32 operands: unsupported on every GPU.
    let xf: CudaSlice<f32> = g.zeros(t * k).unwrap();
    let wf: CudaSlice<f32> = g.zeros(n * k).unwrap();
    let mut yf: CudaSlice<f32> = g.zeros(t * n).unwrap();
    let e = gemm::matmul_nt(g, &xf, &wf, &mut yf, &GemmEpilogue::new(), t, n, k).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
}

/// Runs only on sm_90 (and says so when skipped): a bench-sized bf16 product with the
/// r = 16 slice and a bias, so the lead's first GPU run exercises the full grid.
#[test]
fn gemm_sm90_bench_shape() {
    let Some(gpu) = gpu90("gemm_sm90_bench_shape") else {
        return;
    };
    let c = Case {
        t: 512,
        n: 1024,
        k: 4096,
        bias: true,
        scale: false,
        r: 16,
    };
    check_case::<bf16>(gpu, &c, 700);
}

/// `cuda::lora::forward` with the GEMM core required (`CorePolicy::Require` added to
/// `tuning`: U by the down kernel or inside the core launch, then one core GEMM with the
/// low-rank slice and the bias) against the LoRA oracle, as tests/gpu_lora.rs checks
/// `forward`; returns its plan, which must be the core's.
fn check_lora_core<T: Element>(
    gpu: &Gpu,
    shape: (usize, usize, usize, usize),
    bias: bool,
    dropout: bool,
    tuning: Tuning,
    seed: u64,
) -> Plan {
    check_lora_core_h::<T>(gpu, shape, bias, dropout, true, tuning, seed)
}

/// [`check_lora_core`], with or without the `h` output.
#[allow(clippy::too_many_arguments)]
fn check_lora_core_h<T: Element>(
    gpu: &Gpu,
    (t, k, n, r): (usize, usize, usize, usize),
    bias: bool,
    dropout: bool,
    with_h: bool,
    tuning: Tuning,
    seed: u64,
) -> Plan {
    use lora_kernels::cpu::lora as cpu;
    use lora_kernels::cuda::lora as cuda;
    use lora_kernels::{Dropout, LoraOptions, LoraShape, LoraWeights};
    let s = LoraShape::new(t, k, n, r);
    let what = format!(
        "{} core forward {s:?} bias={bias} dropout={dropout} h={with_h} {tuning:?}",
        common::dtype_name::<T>()
    );
    let mut rng = Rng::new(seed);
    let (x, w, a, b) = (
        rng.vec::<T>(s.x_len(), 1.0),
        rng.vec::<T>(s.w_len(), 1.0),
        rng.vec::<T>(s.a_len(), 1.0),
        rng.vec::<T>(s.b_len(), 1.0),
    );
    let bv = bias.then(|| rng.vec::<T>(n, 1.0));
    let mut opts = LoraOptions::new(1.75);
    if dropout {
        opts = opts.with_dropout(Dropout::new(0.25, seed, 12));
    }
    let abs_opts = LoraOptions {
        scale: opts.scale.abs(),
        ..opts
    };
    fn wts<'a, T>(
        w: &'a [T],
        a: &'a [T],
        b: &'a [T],
        bias: Option<&'a [T]>,
    ) -> LoraWeights<'a, [T]> {
        LoraWeights { w, a, b, bias }
    }
    let (mut y_ref, mut h_ref) = (vec![T::default(); s.y_len()], vec![T::default(); s.h_len()]);
    cpu::forward(
        &s,
        &opts,
        &x,
        wts(&w, &a, &b, bv.as_deref()),
        &mut y_ref,
        Some(&mut h_ref),
    )
    .unwrap();
    let ab = |v: &[T]| common::abs(v);
    let abias = bv.as_ref().map(|v| ab(v));
    let (mut y_mag, mut h_mag) = (vec![T::default(); s.y_len()], vec![T::default(); s.h_len()]);
    cpu::forward(
        &s,
        &abs_opts,
        &ab(&x),
        wts(&ab(&w), &ab(&a), &ab(&b), abias.as_deref()),
        &mut y_mag,
        Some(&mut h_mag),
    )
    .unwrap();

    let up = |v: &[T]| gpu.upload(v).unwrap();
    let (xd, wd, ad, bd) = (up(&x), up(&w), up(&a), up(&b));
    let biasd = bv.as_ref().map(|v| up(v));
    let mut y = up(&poison::<T>(s.y_len()));
    let mut h = up(&poison::<T>(s.h_len()));
    let weights = LoraWeights {
        w: &wd,
        a: &ad,
        b: &bd,
        bias: biasd.as_ref(),
    };
    let required = Tuning {
        core: CorePolicy::Require,
        ..tuning
    };
    let plan = cuda::forward(
        gpu,
        &s,
        &opts.with_tuning(required),
        &xd,
        weights,
        &mut y,
        with_h.then_some(&mut h),
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        plan.path == Path::Core && !plan.mma && !plan.nf4_in_core,
        "{what}: {plan:?}"
    );
    if dropout {
        assert!(!plan.fused_down, "{what}: {plan:?}");
    }
    if with_h {
        assert_close(
            &format!("{what}: h"),
            &gpu.download(&h).unwrap(),
            &h_ref,
            &h_mag,
            k,
        );
    } else {
        assert!(
            gpu.download(&h)
                .unwrap()
                .iter()
                .all(|v| v.to_f32().is_nan()),
            "{what}: h was written though not asked for"
        );
    }
    assert_close(
        &format!("{what}: y"),
        &gpu.download(&y).unwrap(),
        &y_ref,
        &y_mag,
        k + r + 1,
    );
    plan
}

#[test]
fn lora_forward_core() {
    let Some(gpu) = gpu90("lora_forward_core") else {
        return;
    };
    let cases = [
        ((1000usize, 200usize, 264usize, 16usize), true, true),
        ((129, 64, 1000, 3), false, false),
        ((33, 4096, 520, 64), true, true),
        ((512, 1024, 768, 8), true, false),
    ];
    for (i, &(shape, bias, dropout)) in cases.iter().enumerate() {
        check_lora_core::<bf16>(gpu, shape, bias, dropout, Tuning::AUTO, 800 + i as u64);
        check_lora_core::<f16>(gpu, shape, bias, dropout, Tuning::AUTO, 900 + i as u64);
    }
}

/// The forward with `x Aᵀ` inside the core launch (jobs on the clusters with the fewest
/// tiles, or on spare clusters, compute U and h; the tiles wait on their rows' flags):
/// ranks 1 ..= 32 (m64n16 and m64n32), odd T (a dead second CTA), K not a multiple of
/// 64, odd N (direct stores) and N % 8 == 0 (TMA stores), both tile widths, with and
/// without h, against the oracle; each shape also with the fused path switched off. T
/// grows and shrinks from call to call, so stale flags of earlier launches are there.
/// Then more pairs of tile rows than clusters (several jobs per cluster), and a rank
/// above 32, which takes the down kernel. Each plan says whether the down product was
/// fused.
#[test]
fn lora_forward_core_fused_down() {
    let Some(gpu) = gpu90("lora_forward_core_fused_down") else {
        return;
    };
    let cases = [
        (1000usize, 200usize, 264usize, 16usize, true),
        (129, 64, 1000, 3, false),
        (300, 72, 2900, 12, true),
        (512, 1024, 768, 32, true),
        (515, 64, 1800, 24, false),
        (2000, 256, 520, 17, true),
        (8000, 64, 512, 1, true),
        (257, 128, 136, 8, false),
        (600, 320, 1000, 20, true),
    ];
    // Every schedule the kernel can run, however many jobs a cluster takes (the default
    // rule keeps those with more than FUSED_DOWN_MAX_JOBS on the down kernel).
    let fused_down = |fused_down, tile_n| Tuning {
        fused_down,
        tile_n,
        ..Tuning::AUTO
    };
    for width in [None, Some(gemm::TILE_N_NARROW), Some(gemm::TILE_N)] {
        let (forced, off) = (
            fused_down(FusedDown::Force, width),
            fused_down(FusedDown::Never, width),
        );
        for (i, &(t, k, n, r, bias)) in cases.iter().enumerate() {
            assert!(
                gemm::fused_down_fits::<bf16>(gpu, &forced, t, n, r).unwrap(),
                "the fused down product should take T = {t}, N = {n}, r = {r}"
            );
            assert!(!gemm::fused_down_fits::<bf16>(gpu, &off, t, n, r).unwrap());
            let seed = 1000 + 10 * i as u64;
            let with_h = i % 3 != 1;
            let shape = (t, k, n, r);
            for plan in [
                check_lora_core_h::<bf16>(gpu, shape, bias, false, with_h, forced, seed),
                check_lora_core_h::<f16>(gpu, shape, bias, false, with_h, forced, seed + 1),
            ] {
                assert!(plan.fused_down, "{shape:?} {forced:?}: {plan:?}");
            }
            let plan = check_lora_core_h::<bf16>(gpu, shape, bias, false, with_h, off, seed + 2);
            assert!(!plan.fused_down, "{shape:?} {off:?}: {plan:?}");
        }
    }
    // More pairs of tile rows than clusters (several jobs per cluster), still fused; ranks
    // above 32: the down kernel, forced or not.
    let forced = fused_down(FusedDown::Force, None);
    let t_big = 256 * (gpu.sm_count() as usize / 2) + 300;
    assert!(gemm::fused_down_fits::<bf16>(gpu, &forced, t_big, 256, 8).unwrap());
    for plan in [
        check_lora_core::<bf16>(gpu, (t_big, 64, 256, 8), false, false, forced, 1201),
        check_lora_core::<f16>(gpu, (t_big, 128, 1000, 30), true, false, forced, 1202),
    ] {
        assert!(plan.fused_down, "T = {t_big}: {plan:?}");
    }
    assert!(!gemm::fused_down_fits::<bf16>(gpu, &forced, 1000, 264, 33).unwrap());
    let plan = check_lora_core::<bf16>(gpu, (1000, 200, 264, 40), true, false, forced, 1200);
    assert!(!plan.fused_down, "r = 40: {plan:?}");
    // The default rule takes the bench shape (16 jobs on at least 8 light clusters when
    // 60 to 66 clusters of 2 fit on 132 SMs).
    if gpu.sm_count() == 132 {
        assert!(gemm::fused_down_fits::<bf16>(gpu, &Tuning::AUTO, 4096, 4096, 16).unwrap());
    }
}
