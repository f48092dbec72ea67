// NF4 (bitsandbytes' format, src/nf4.rs): standalone dequantize, and the small-T fused
// matmul that reads the 4-bit weight once and dequantizes it in registers.
//
// Exactness: every dequantized value is NF4_CODE[c] * absmax as one f32 product
// (__fmul_rn: never contracted into an FMA), and a double-quantized absmax is
// code2[q] * absmax2 + offset as a product then a sum, as bitsandbytes computes them.

#include "lk_common.cuh"

namespace {

__constant__ float NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// Block scale b of weight w.
__device__ __forceinline__ float nf4_absmax(const LkNf4 &w, int64_t b) {
  if (w.absmax != nullptr) return __ldg(w.absmax + b);
  const float c = __ldg(w.code2 + __ldg(w.q + b));
  return __fadd_rn(__fmul_rn(c, __ldg(w.absmax2 + (b >> 8))), w.offset);
}

// The NF4 code table in shared memory: 16 floats in 16 banks, so any lookup pattern of
// a warp is one wavefront.
__device__ __forceinline__ void load_lut(float *lut) {
  if (threadIdx.x < 16) lut[threadIdx.x] = NF4_CODE[threadIdx.x];
  __syncthreads();
}

// Eight dequantized values of one 32-bit word of packed codes (4 bytes, 8 elements):
// byte b holds elements 2b (high nibble) and 2b + 1 (low nibble).
__device__ __forceinline__ void dequant8(const float *lut, uint32_t word, float am, float (&v)[8]) {
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const uint32_t byte = (word >> (8 * b)) & 0xffu;
    v[2 * b] = __fmul_rn(lut[byte >> 4], am);
    v[2 * b + 1] = __fmul_rn(lut[byte & 15u], am);
  }
}

template <typename T> __device__ __forceinline__ void store8(T *out, const float (&v)[8]);
template <> __device__ __forceinline__ void store8<float>(float *out, const float (&v)[8]) {
  reinterpret_cast<float4 *>(out)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4 *>(out)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <typename T> __device__ __forceinline__ void store8(T *out, const float (&v)[8]) {
  auto pair = [&](int i) {
    return lk::f32_to_bits16<T>(v[2 * i]) | (lk::f32_to_bits16<T>(v[2 * i + 1]) << 16);
  };
  *reinterpret_cast<uint4 *>(out) = make_uint4(pair(0), pair(1), pair(2), pair(3));
}

template <typename T> __device__ void nf4_dequant(const LkNf4DequantParams &p) {
  __shared__ float lut[16];
  load_lut(lut);
  const LkNf4 &w = p.w;
  const int64_t numel = (int64_t)w.rows * w.cols;
  T *out = reinterpret_cast<T *>(p.out);
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const bool vec = numel % 8 == 0 && (uintptr_t)w.packed % 4 == 0 && (uintptr_t)p.out % 16 == 0;
  if (vec) {
    // 8 elements (one 32-bit word of codes) per thread and step: a warp reads 128
    // consecutive bytes and writes 32 consecutive 8-element groups.
    const uint32_t *words = reinterpret_cast<const uint32_t *>(w.packed);
    for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < numel / 8; g += stride) {
      uint32_t word;
      asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(word) : "l"(words + g));
      float v[8];
      dequant8(lut, word, nf4_absmax(w, (8 * g) >> w.log2_blocksize), v);
      store8<T>(out + 8 * g, v);
    }
  } else {
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < numel; e += stride) {
      const uint32_t byte = __ldg(w.packed + (e >> 1));
      const uint32_t c = (e & 1) ? (byte & 15u) : (byte >> 4);
      out[e] = lk::from_f32<T>(__fmul_rn(lut[c], nf4_absmax(w, e >> w.log2_blocksize)));
    }
  }
}

constexpr int MM_WARPS = 4;

// y[t, n] for NT >= t tokens: each warp owns R rows of W; each lane takes 32-element
// chunks of those rows (16 packed bytes, one 16-byte streaming load per row), dequantizes
// them in registers, and multiplies them with the same 32 elements of every x row (read
// through L1, shared by the R rows). A warp reduction finishes each dot product.
template <typename T, int NT, int R> __device__ void nf4_mm(const LkNf4MmParams &p) {
  __shared__ float lut[16];
  load_lut(lut);
  const LkNf4 &w = p.w;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = (blockIdx.x * MM_WARPS + warp) * R;
  if (row0 >= w.rows) return;
  const T *x = reinterpret_cast<const T *>(p.x);
  float acc[R][NT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[r][t] = 0.0f;

  const int chunks = w.cols / 32;
  // U chunks per lane at a time: all their loads (weights and scales) are issued before
  // any is used, so each lane keeps U * R * 16 bytes in flight.
  constexpr int U = NT <= 4 ? 4 : 2;
  for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
    uint4 wr[U][R];
    float am[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = min(c0 + 32 * u, chunks - 1);  // in bounds; a clamped chunk is skipped
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = min(row0 + r, w.rows - 1);  // in bounds; results of clamped rows unused
        const int64_t e = (int64_t)row * w.cols + 32 * c;
        wr[u][r] = lk::ld_stream16(w.packed + e / 2);
        am[u][r] = nf4_absmax(w, e >> w.log2_blocksize);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
      if (c >= chunks) break;
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        float wv[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) dequant8(lut, lk::word_of(wr[u][r], s), am[u][r], wv[r]);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          if (t < p.t) {
            float xv[8];
            lk::load8(x + (int64_t)t * w.cols + 32 * c + 8 * s, xv);
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
              for (int j = 0; j < 8; ++j) acc[r][t] = fmaf(xv[j], wv[r][j], acc[r][t]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const float v = lk::warp_sum(acc[r][t]);
      const int row = row0 + r;
      if (lane == 0 && t < p.t && row < w.rows) {
        const float b = p.bias ? lk::ldg(reinterpret_cast<const T *>(p.bias) + row) : 0.0f;
        reinterpret_cast<T *>(p.y)[(int64_t)t * w.rows + row] = lk::from_f32<T>(v + b);
      }
    }
  }
}

}  // namespace

#define LK_NF4_DQ(DT, T)                                                                       \
  extern "C" __global__ void __launch_bounds__(256) lk_nf4_dequant_##DT(LkNf4DequantParams p) { \
    nf4_dequant<T>(p);                                                                         \
  }
LK_FOR_EACH_DTYPE(LK_NF4_DQ)

#define LK_NF4_MM(DT, T, NT, R)                                                                \
  extern "C" __global__ void __launch_bounds__(MM_WARPS * 32)                                  \
      lk_nf4_mm_##DT##_t##NT(LkNf4MmParams p) {                                                \
    nf4_mm<T, NT, R>(p);                                                                       \
  }
#define LK_NF4_MM_ALL(DT, T)                                                                   \
  LK_NF4_MM(DT, T, 1, 2) LK_NF4_MM(DT, T, 2, 2) LK_NF4_MM(DT, T, 4, 2) LK_NF4_MM(DT, T, 8, 2) \
  LK_NF4_MM(DT, T, 16, 2) LK_NF4_MM(DT, T, 32, 1)
LK_FOR_EACH_DTYPE(LK_NF4_MM_ALL)
