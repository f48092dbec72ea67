// DoRA (src/dora.rs): the row norm of W + s·BA taken from its elements, the DoRA scale
// applied to a product, and the element-wise and reduction steps of backward. Merge and
// unmerge are modes of the LoRA merge kernel (lora.cu). The products themselves are the
// LoRA kernels' and cuBLAS's.
//
// Shapes (row-major): x [T, K], W [N, K], A [r, K], B [N, r], mag [N], y [T, N]; norms
// are f32 [N]; accumulation is f32.

#include "lk_common.cuh"

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
