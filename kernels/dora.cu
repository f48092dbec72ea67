// DoRA (src/dora.rs): the row norm of W + s·BA taken from its elements (SIMT, and on
// tensor cores), the small-T fused forward (the tensor-core small-T kernel of
// lk_small.cuh with the row norm folded into its pass over W), the DoRA scale applied to
// a product, and the element-wise and reduction steps of backward. Merge and unmerge are
// modes of the LoRA merge kernel (lora.cu). The other products are the LoRA kernels' and
// cuBLAS's.
//
// Shapes (row-major): x [T, K], W [N, K], A [r, K], B [N, r], mag [N], y [T, N]; norms
// are f32 [N]; accumulation is f32.

#include "lk_common.cuh"
#include "lk_small.cuh"

// In namespace lk: these define the DoRA hook that lk_small.cuh declares for its fused
// forward (dora_load_a, dora_stage_b, dora_chunk, dora_norm_reduce).
namespace lk {

// =====================================================================================
// DoRA row norms on tensor cores (f16 / bf16; K % 8 == 0; W and A 16-byte aligned):
// norm[n] = ‖W_n + s·(BA)_n‖ from the elements, never a dense W + s·BA in memory.
//
// A block owns 16 rows of W (B's 16 rows staged once in shared memory, zero-padded to
// 16·RK ranks); its 8 warps split K in 32-column chunks, as the small-T kernel does. Per
// chunk, P = B_rows · A[:, chunk] (16 x 32) is RK·4 mma: A's chunk goes through a
// per-warp shared buffer (4 tiles of 8 columns x 16 ranks; ldmatrix.trans gives the
// B-operand fragments), B's rows are the A operand. P's accumulator layout gives lane
// (g, q) columns 8j + 2q, 8j + 2q + 1 of tile j; the lane's W registers (one 16-byte
// load of rows g, g + 8 at columns 8q .. 8q + 7) are transposed within the quad by
// shuffles to match, then v = W + s·P and v² is summed in f32.
// =====================================================================================
__device__ __forceinline__ void ldsm_x4_trans(uint32_t *d, const void *smem) {
  const uint32_t addr = smem_u32(smem);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(addr)
               : "memory");
}

// Lane's two staging items of rank step ks for the chunk at column c0: item i = lane +
// 32 u is rank 16 ks + i / 4, tile i % 4 (columns c0 + 8 (i % 4) .. + 7); zero outside A.
template <typename T>
__device__ __forceinline__ void dora_load_a(const T *a, int r, int K, int c0, int ks, uint4 (&v)[2]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int i = lane + 32 * u;
    const int rank = 16 * ks + (i >> 2), col = c0 + 8 * (i & 3);
    const bool ok = rank < r && col < K;
    const uint4 x = __ldg(reinterpret_cast<const uint4 *>(a + (size_t)min(rank, r - 1) * K + (ok ? col : 0)));
    v[u] = ok ? x : make_uint4(0, 0, 0, 0);
  }
}

// p[j][.] += (B rows) x (A ranks 16 ks .., columns of tile j) for one rank step.
// ast: this warp's staging [4][16][8]; bs: the block's B rows [16][rs2 * 2] as T.
template <typename T>
__device__ __forceinline__ void dora_p_step(T (*ast)[16][8], const T *bs, int rs2, int ks, const uint4 (&v)[2],
                                            float (&p)[4][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int i = lane + 32 * u;
    *reinterpret_cast<uint4 *>(&ast[i & 3][i >> 2][0]) = v[u];
  }
  __syncwarp();
  uint32_t b[8];
  const int mi = lane >> 3, rr = lane & 7;
  ldsm_x4_trans(b, &ast[mi >> 1][8 * (mi & 1) + rr][0]);
  ldsm_x4_trans(b + 4, &ast[2 + (mi >> 1)][8 * (mi & 1) + rr][0]);
  const uint32_t *bw = reinterpret_cast<const uint32_t *>(bs);
  const int base = ks * 8 + q;
  const uint32_t af[4] = {bw[g * rs2 + base], bw[(g + 8) * rs2 + base], bw[g * rs2 + base + 4],
                          bw[(g + 8) * rs2 + base + 4]};
#pragma unroll
  for (int j = 0; j < 4; ++j) MmaOp<T>::run(p[j], af, b[2 * j], b[2 * j + 1]);
  __syncwarp();  // the staging is rewritten by the next step
}

// t[j] = word q of lane (g, j)'s w: columns 8j + 2q, 8j + 2q + 1 of the lane's row.
__device__ __forceinline__ void quad_transpose(uint4 w4, uint32_t (&t)[4]) {
  const int q = threadIdx.x & 3;
  const uint32_t w[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) t[j] = w[j];  // t[q] = w[q] survives below
#pragma unroll
  for (int i = 1; i < 4; ++i) {
    const int d = q ^ i;
    const uint32_t send = d == 0 ? w[0] : d == 1 ? w[1] : d == 2 ? w[2] : w[3];
    const uint32_t recv = __shfl_xor_sync(0xffffffffu, send, i);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (j == d) t[j] = recv;
  }
}

// lo/hi += Σ (W + s·P)² over this lane's 8 elements of rows g and g + 8.
template <typename T>
__device__ __forceinline__ void dora_norm_acc(uint4 wl, uint4 wh, const float (&p)[4][4], float scale, float &lo,
                                              float &hi) {
  uint32_t tl[4], th[4];
  quad_transpose(wl, tl);
  quad_transpose(wh, th);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float v = fmaf(scale, p[j][0], bits16_to_f32<T>(tl[j] & 0xFFFFu));
    lo = fmaf(v, v, lo);
    v = fmaf(scale, p[j][1], bits16_to_f32<T>(tl[j] >> 16));
    lo = fmaf(v, v, lo);
    v = fmaf(scale, p[j][2], bits16_to_f32<T>(th[j] & 0xFFFFu));
    hi = fmaf(v, v, hi);
    v = fmaf(scale, p[j][3], bits16_to_f32<T>(th[j] >> 16));
    hi = fmaf(v, v, hi);
  }
}

// Stage the block's 16 rows of B (rows row0 .., ranks padded with zeros to 16 RK).
template <typename T, int RK>
__device__ __forceinline__ void dora_stage_b(const T *b, int row0, int n, int r, T *bs) {
  for (int i = threadIdx.x; i < 16 * 16 * RK; i += blockDim.x) {
    const int rr = i / (16 * RK), j = i - rr * 16 * RK;
    bs[i] = (row0 + rr < n && j < r) ? b[(size_t)(row0 + rr) * r + j] : from_f32<T>(0.0f);
  }
}

// The norm of one chunk of W held in (l, h), A loaded here or given in av.
template <typename T, int RK, bool PF>
__device__ __forceinline__ void dora_chunk(T (*ast)[16][8], const T *bs, const T *a, int r, int K, int c0, uint4 l,
                                           uint4 h, const uint4 (*av)[2], float scale, float &lo, float &hi) {
  float p[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) p[j][c] = 0.0f;
#pragma unroll
  for (int ks = 0; ks < RK; ++ks) {
    uint4 v[2];
    if constexpr (PF) {
      v[0] = av[ks][0];
      v[1] = av[ks][1];
    } else {
      dora_load_a(a, r, K, c0, ks, v);
    }
    dora_p_step(ast, bs, 8 * RK, ks, v, p);
  }
  dora_norm_acc<T>(l, h, p, scale, lo, hi);
}

// Quad, then block reduction of the per-lane sums into norm[row0 .. row0 + 15].
template <int NWARPS>
__device__ __forceinline__ void dora_norm_reduce(float lo, float hi, float (*red)[16]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  lo += __shfl_xor_sync(0xffffffffu, lo, 1);
  lo += __shfl_xor_sync(0xffffffffu, lo, 2);
  hi += __shfl_xor_sync(0xffffffffu, hi, 1);
  hi += __shfl_xor_sync(0xffffffffu, hi, 2);
  if ((lane & 3) == 0) {
    red[warp][lane >> 2] = lo;
    red[warp][(lane >> 2) + 8] = hi;
  }
}

}  // namespace lk

namespace {
using namespace lk;


// f[n] = mag[n] / norm[n] - minus_one.
template <typename T>
__device__ __forceinline__ float row_factor(const void *mag, const float *norm, int n, float minus_one) {
  return __fdiv_rn(ldg(static_cast<const T *>(mag) + n), __ldg(norm + n)) - minus_one;
}

// =====================================================================================
// Row norms. A block of 256 threads owns NORM_ROWS rows; B's rows sit in shared memory
// (f32); each thread walks its columns c, forms P_i = sum_j B[i, j] A[j, c] for the
// block's rows (A[j, c] is read once for all of them, coalesced across the block), then
// v = W[i, c] + s * P_i and accumulates v^2. Warp sums, then one shared-memory step.
// =====================================================================================
constexpr int NORM_ROWS = 8;

template <typename T>
__device__ __forceinline__ void norm_kernel(const LkDoraNormParams &p) {
  extern __shared__ float bs[];  // [NORM_ROWS][r]
  __shared__ float red[NORM_ROWS][8];
  const int row0 = blockIdx.x * NORM_ROWS;
  const T *w = static_cast<const T *>(p.w);
  const T *a = static_cast<const T *>(p.a);
  const T *b = static_cast<const T *>(p.b);
  for (int i = threadIdx.x; i < NORM_ROWS * p.r; i += blockDim.x) {
    const int rr = i / p.r, j = i - rr * p.r;
    bs[i] = ldg(b + (size_t)min(row0 + rr, p.n - 1) * p.r + j);
  }
  __syncthreads();
  const T *wrow[NORM_ROWS];
#pragma unroll
  for (int i = 0; i < NORM_ROWS; ++i) wrow[i] = w + (size_t)min(row0 + i, p.n - 1) * p.k;
  float nsq[NORM_ROWS];
#pragma unroll
  for (int i = 0; i < NORM_ROWS; ++i) nsq[i] = 0.0f;
  for (int c = threadIdx.x; c < p.k; c += blockDim.x) {
    float acc[NORM_ROWS];
#pragma unroll
    for (int i = 0; i < NORM_ROWS; ++i) acc[i] = 0.0f;
    for (int j = 0; j < p.r; ++j) {
      const float av = ldg(a + (size_t)j * p.k + c);
#pragma unroll
      for (int i = 0; i < NORM_ROWS; ++i) acc[i] = fmaf(bs[i * p.r + j], av, acc[i]);
    }
#pragma unroll
    for (int i = 0; i < NORM_ROWS; ++i) {
      const float v = fmaf(p.scale, acc[i], ldg(wrow[i] + c));
      nsq[i] = fmaf(v, v, nsq[i]);
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < NORM_ROWS; ++i) {
    const float v = warp_sum(nsq[i]);
    if (lane == 0) red[i][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < NORM_ROWS) {
    const int row = row0 + threadIdx.x;
    if (row < p.n) {
      float s = 0.0f;
#pragma unroll
      for (int wi = 0; wi < 8; ++wi) s += red[threadIdx.x][wi];
      const float nrm = sqrtf(s);
      p.norm[row] = nrm;
      if (p.m_out != nullptr) static_cast<T *>(p.m_out)[row] = from_f32<T>(nrm);
      if (p.g_out != nullptr)
        p.g_out[row] = __fdiv_rn(ldg(static_cast<const T *>(p.mag) + row), nrm);
    }
  }
}

// A is prefetched with W (registers) for r ≤ 32; a 4-chunk batch, with or without that
// prefetch, measured slower (docs/PERF_NOTES_DORA.md, v3b).
template <typename T, int RK>
__device__ __forceinline__ void dora_norm_mma(const LkDoraNormParams &p) {
  constexpr bool PF = RK <= 2;
  __shared__ alignas(16) T ast[MMA_WARPS][4][16][8];
  __shared__ alignas(16) T bs[16 * 16 * RK];
  __shared__ float red[MMA_WARPS][16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, q = lane & 3;
  const int row0 = blockIdx.x * 16;
  const T *w = static_cast<const T *>(p.w);
  const T *a = static_cast<const T *>(p.a);
  dora_stage_b<T, RK>(static_cast<const T *>(p.b), row0, p.n, p.r, bs);
  __syncthreads();
  const T *row_lo = w + (size_t)min(row0 + (lane >> 2), p.n - 1) * p.k;
  const T *row_hi = w + (size_t)min(row0 + (lane >> 2) + 8, p.n - 1) * p.k;
  const int chunks = (p.k + 31) >> 5;
  constexpr int STRIDE = MMA_WARPS * MMA_BATCH;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4 wl[2][MMA_BATCH], wh[2][MMA_BATCH];
  uint4 av[2][MMA_BATCH][PF ? RK : 1][2];
  float lo = 0.0f, hi = 0.0f;
  auto load = [&](int buf, int ch0) {
#pragma unroll
    for (int u = 0; u < MMA_BATCH; ++u) {
      const int col = (ch0 + u) * 32 + 8 * q;
      const int cl = col < p.k ? col : 0;
      wl[buf][u] = ld_stream16(row_lo + cl);
      wh[buf][u] = ld_stream16(row_hi + cl);
      if constexpr (PF) {
#pragma unroll
        for (int ks = 0; ks < RK; ++ks) dora_load_a(a, p.r, p.k, (ch0 + u) * 32, ks, av[buf][u][ks]);
      }
    }
  };
  auto compute = [&](int buf, int ch0) {
#pragma unroll
    for (int u = 0; u < MMA_BATCH; ++u) {
      const int c0 = (ch0 + u) * 32;
      if (c0 >= p.k) continue;  // warp-uniform
      const bool in = c0 + 8 * q < p.k;
      dora_chunk<T, RK, PF>(ast[warp], bs, a, p.r, p.k, c0, in ? wl[buf][u] : zero, in ? wh[buf][u] : zero,
                            av[buf][u], p.scale, lo, hi);
    }
  };
  double_buffered(warp * MMA_BATCH, STRIDE, chunks, load, compute);
  dora_norm_reduce<MMA_WARPS>(lo, hi, red);
  __syncthreads();
  if (threadIdx.x < 16) {
    const int row = row0 + threadIdx.x;
    if (row < p.n) {
      float s = 0.0f;
#pragma unroll
      for (int wi = 0; wi < MMA_WARPS; ++wi) s += red[wi][threadIdx.x];
      const float nrm = sqrtf(s);
      p.norm[row] = nrm;
      if (p.m_out != nullptr) static_cast<T *>(p.m_out)[row] = from_f32<T>(nrm);
      if (p.g_out != nullptr)
        p.g_out[row] = __fdiv_rn(ldg(static_cast<const T *>(p.mag) + row), nrm);
    }
  }
}

// y = f[n] * y + bias[n] over [t, n], saving y first into z_out when asked.
template <typename T>
__device__ __forceinline__ void scale_kernel(const LkDoraScaleParams &p) {
  const int64_t total = p.t * p.n;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  T *y = static_cast<T *>(p.y);
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int n = (int)(e % p.n);
    const T v = y[e];
    if (p.z_out != nullptr) static_cast<T *>(p.z_out)[e] = v;
    float out = row_factor<T>(p.mag, p.norm, n, p.minus_one) * to_f32(v);
    if (p.bias != nullptr) out += ldg(static_cast<const T *>(p.bias) + n);
    y[e] = from_f32<T>(out);
  }
}

template <typename T>
__device__ __forceinline__ void rowscale_kernel(const LkDoraRowScaleParams &p) {
  const int64_t total = (int64_t)p.n * p.r;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int n = (int)(e / p.r);
    const float f = row_factor<T>(p.mag, p.norm, n, 0.0f);
    static_cast<T *>(p.out)[e] = from_f32<T>(f * to_f32(static_cast<const T *>(p.b)[e]));
  }
}

// One thread per column n, rows_per_block rows: dyf = dy * f, and the partial dy . z.
template <typename T>
__device__ __forceinline__ void dyz_kernel(const LkDoraDyzParams &p) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= p.n) return;
  const int i0 = blockIdx.y * p.rows_per_block;
  const int i1 = min(i0 + p.rows_per_block, p.t);
  const float f = row_factor<T>(p.mag, p.norm, n, p.minus_one);
  const T *dy = static_cast<const T *>(p.dy);
  const T *z = static_cast<const T *>(p.z);
  T *dyf = static_cast<T *>(p.dyf);
  float acc = 0.0f;
  for (int i = i0; i < i1; ++i) {
    const size_t e = (size_t)i * p.n + n;
    const float d = ldg(dy + e);
    acc = fmaf(d, ldg(z + e), acc);
    dyf[e] = from_f32<T>(d * f);
  }
  p.part[(size_t)blockIdx.y * p.n + n] = acc;
}

template <typename T>
__device__ __forceinline__ void dm_kernel(const LkDoraDmParams &p) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= p.n) return;
  float s = 0.0f;
  for (int i = 0; i < p.splits; ++i) s += p.part[(size_t)i * p.n + n];
  static_cast<T *>(p.dm)[n] = from_f32<T>(__fdiv_rn(s, __ldg(p.norm + n)));
}

template <typename T>
__device__ __forceinline__ void drop_kernel(const LkDoraDropParams &p) {
  const int64_t total = (int64_t)p.t * p.cols;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const uint64_t base = (uint64_t)p.t0 * (uint64_t)p.cols;
  const T *in = static_cast<const T *>(p.in);
  T *out = static_cast<T *>(p.out);
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
    const T v = in[e];
    out[e] = dropout_mul(p.dropout, base + (uint64_t)e) == 0.0f ? from_f32<T>(0.0f) : v;
  }
}

}  // namespace

#define LK_DORA(DT, TYPE)                                                                       \
  extern "C" __global__ void __launch_bounds__(256) lk_dora_norm_##DT(LkDoraNormParams p) {     \
    norm_kernel<TYPE>(p);                                                                       \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(256) lk_dora_scale_##DT(LkDoraScaleParams p) {   \
    scale_kernel<TYPE>(p);                                                                      \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(256)                                             \
      lk_dora_rowscale_##DT(LkDoraRowScaleParams p) {                                           \
    rowscale_kernel<TYPE>(p);                                                                   \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(256) lk_dora_dyz_##DT(LkDoraDyzParams p) {       \
    dyz_kernel<TYPE>(p);                                                                        \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(256) lk_dora_dm_##DT(LkDoraDmParams p) {         \
    dm_kernel<TYPE>(p);                                                                         \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(256) lk_dora_drop_##DT(LkDoraDropParams p) {     \
    drop_kernel<TYPE>(p);                                                                       \
  }
LK_FOR_EACH_DTYPE(LK_DORA)

#define LK_DORA_NORM_MMA(DT, TYPE, RK)                                                          \
  extern "C" __global__ void __launch_bounds__(lk::MMA_WARPS * 32)                              \
      lk_dora_norm_mma_##DT##_k##RK(LkDoraNormParams p) { dora_norm_mma<TYPE, RK>(p); }
#define LK_DORA_NORM_MMA_ALL(DT, TYPE)                                                          \
  LK_DORA_NORM_MMA(DT, TYPE, 1)                                                                 \
  LK_DORA_NORM_MMA(DT, TYPE, 2)                                                                 \
  LK_DORA_NORM_MMA(DT, TYPE, 4)                                                                 \
  LK_DORA_NORM_MMA(DT, TYPE, 16)
LK_DORA_NORM_MMA_ALL(f16, __half)
LK_DORA_NORM_MMA_ALL(bf16, __nv_bfloat16)

// A is not prefetched with W here (measured: 26 µs against 30 µs with it at T = 1,
// N = K = 4096, H100: the registers it takes halve the blocks per SM); n1 and n2 are
// held to 128 registers for two blocks per SM, n4 would spill.
#define LK_DORA_SMALL(DT, TYPE, NT, RK, MINB)                                                   \
  extern "C" __global__ void __launch_bounds__(lk::MMA_WARPS * 32, MINB)                        \
      lk_dora_small_##DT##_n##NT##_k##RK(LkSmallFwdParams p) { lk::small_fwd_mma<TYPE, NT, RK, false>(p); }
#define LK_DORA_SMALL_ALL(DT, TYPE)                                                             \
  LK_DORA_SMALL(DT, TYPE, 1, 1, 2)                                                              \
  LK_DORA_SMALL(DT, TYPE, 2, 1, 2)                                                              \
  LK_DORA_SMALL(DT, TYPE, 4, 1, 1)                                                              \
  LK_DORA_SMALL(DT, TYPE, 1, 2, 2)                                                              \
  LK_DORA_SMALL(DT, TYPE, 2, 2, 2)                                                              \
  LK_DORA_SMALL(DT, TYPE, 4, 2, 1)
LK_DORA_SMALL_ALL(f16, __half)
LK_DORA_SMALL_ALL(bf16, __nv_bfloat16)
