// AdamW over a list of tensors in one launch (torch.optim.AdamW, non-amsgrad): f32
// parameters and moments, gradients in the entry point's type, an optional rounded copy
// of the updated parameters. Table layout and the per-element formula:
// kernels/lk_params.h (LkAdamwParams); the math and the host constants: src/adamw.rs.
//
// Exactness: every operation is an IEEE f32 operation rounded to nearest even, written
// out in PTX (add.rn, mul.rn, fma.rn, div.rn, sqrt.rn without .ftz), so --use_fast_math
// can neither contract, approximate nor flush subnormals. The CPU oracle
// (src/cpu/adamw.rs) does the same operations in the same order: the outputs are equal
// bit for bit.
//
// Work: the chunks of all tensors (LK_ADAMW_CHUNK elements each, a tensor's last chunk
// shorter) are spread over the grid, each block taking chunks blockIdx.x, + gridDim.x,
// ... . A chunk's tensor comes from the work list (one u32 per chunk), its entry from the
// table. Tensors whose pointers are all aligned to 4 elements take the vector path: each
// thread loads 4 groups of 4 elements of p, m, v and g (16-byte loads for f32, 8-byte for
// 16-bit types) before it computes, then stores them; the rest of a chunk shorter than a
// whole number of groups, and unaligned tensors, go element by element.

#include <type_traits>

#include "lk_common.cuh"

namespace {

constexpr int ADAMW_BLOCK = 256;
constexpr int ADAMW_GROUPS = 4;  // groups of 4 elements per thread per pass
constexpr int ADAMW_MIN_BLOCKS = 2;  // resident blocks per SM the registers must allow
static_assert(LK_ADAMW_CHUNK == ADAMW_BLOCK * 4 * ADAMW_GROUPS, "one pass per chunk");

__device__ __forceinline__ float add_rn(float a, float b) {
  float d;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
__device__ __forceinline__ float sub_rn(float a, float b) {
  float d;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
__device__ __forceinline__ float mul_rn(float a, float b) {
  float d;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
__device__ __forceinline__ float fma_rn(float a, float b, float c) {
  float d;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c));
  return d;
}
__device__ __forceinline__ float div_rn(float a, float b) {
  float d;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
__device__ __forceinline__ float sqrt_rn(float a) {
  float d;
  asm("sqrt.rn.f32 %0, %1;" : "=f"(d) : "f"(a));
  return d;
}

// The update of one element (the formula of lk_params.h; src/cpu/adamw.rs `update`).
__device__ __forceinline__ void update(const LkAdamwParams &k, float decay, float neg_step,
                                       float g, float &p, float &m, float &v) {
  p = mul_rn(p, decay);
  const float d = sub_rn(g, m);
  m = fma_rn(k.lerp_coeff, d, k.lerp_base_m ? m : g);
  v = add_rn(mul_rn(v, k.beta2), mul_rn(mul_rn(k.c2, g), g));
  const float den = add_rn(div_rn(sqrt_rn(v), k.bc2_sqrt), k.eps);
  p = add_rn(p, div_rn(mul_rn(neg_step, m), den));
}

// Four consecutive elements at q (aligned to 4 elements), as f32.
__device__ __forceinline__ void load4(const float *q, float (&x)[4]) {
  const float4 r = __ldg(reinterpret_cast<const float4 *>(q));
  x[0] = r.x; x[1] = r.y; x[2] = r.z; x[3] = r.w;
}
template <typename T> __device__ __forceinline__ void load4(const T *q, float (&x)[4]) {
  const uint2 r = __ldg(reinterpret_cast<const uint2 *>(q));
  x[0] = lk::bits16_to_f32<T>(r.x & 0xffffu);
  x[1] = lk::bits16_to_f32<T>(r.x >> 16);
  x[2] = lk::bits16_to_f32<T>(r.y & 0xffffu);
  x[3] = lk::bits16_to_f32<T>(r.y >> 16);
}
// Plain (coherent) loads and stores for the f32 state that the kernel rewrites.
__device__ __forceinline__ void ld4(const float *q, float (&x)[4]) {
  const float4 r = *reinterpret_cast<const float4 *>(q);
  x[0] = r.x; x[1] = r.y; x[2] = r.z; x[3] = r.w;
}
__device__ __forceinline__ void st4(float *q, const float (&x)[4]) {
  *reinterpret_cast<float4 *>(q) = make_float4(x[0], x[1], x[2], x[3]);
}
template <typename T> __device__ __forceinline__ void st4(T *q, const float (&x)[4]) {
  uint2 r;
  r.x = lk::f32_to_bits16<T>(x[0]) | (lk::f32_to_bits16<T>(x[1]) << 16);
  r.y = lk::f32_to_bits16<T>(x[2]) | (lk::f32_to_bits16<T>(x[3]) << 16);
  *reinterpret_cast<uint2 *>(q) = r;
}

// Elements [start, end) of tensor t. C: the copy's type, or void for none. VEC: the
// vector path (every pointer aligned to 4 elements, start a multiple of 4).
template <typename G, typename C, bool VEC>
__device__ __forceinline__ void chunk(const LkAdamwParams &k, const LkAdamwTensor &t,
                                      int64_t start, int64_t end) {
  float *const param = t.param;
  float *const mom1 = t.m;
  float *const mom2 = t.v;
  const G *const grad = reinterpret_cast<const G *>(t.grad);
  C *const copy = reinterpret_cast<C *>(t.copy);
  const float decay = t.decay, neg_step = t.neg_step;
  int64_t tail = start;
  if constexpr (VEC) {
    // Whole groups of 4: one pass (a chunk is ADAMW_BLOCK * ADAMW_GROUPS groups).
    const int64_t groups = (end - start) >> 2;
    float p[ADAMW_GROUPS][4], m[ADAMW_GROUPS][4], v[ADAMW_GROUPS][4], g[ADAMW_GROUPS][4];
#pragma unroll
    for (int u = 0; u < ADAMW_GROUPS; ++u) {
      const int64_t j = threadIdx.x + (int64_t)u * ADAMW_BLOCK;
      if (j < groups) {
        const int64_t i = start + 4 * j;
        ld4(param + i, p[u]);
        ld4(mom1 + i, m[u]);
        ld4(mom2 + i, v[u]);
        load4(grad + i, g[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < ADAMW_GROUPS; ++u) {
      const int64_t j = threadIdx.x + (int64_t)u * ADAMW_BLOCK;
      if (j < groups) {
        const int64_t i = start + 4 * j;
#pragma unroll
        for (int e = 0; e < 4; ++e) update(k, decay, neg_step, g[u][e], p[u][e], m[u][e], v[u][e]);
        st4(param + i, p[u]);
        st4(mom1 + i, m[u]);
        st4(mom2 + i, v[u]);
        if constexpr (!std::is_void<C>::value) st4(copy + i, p[u]);
      }
    }
    tail = start + 4 * groups;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += ADAMW_BLOCK) {
    float p = param[i], m = mom1[i], v = mom2[i];
    update(k, decay, neg_step, lk::to_f32(grad[i]), p, m, v);
    param[i] = p;
    mom1[i] = m;
    mom2[i] = v;
    if constexpr (!std::is_void<C>::value) copy[i] = lk::from_f32<C>(p);
  }
}

template <typename G, typename C>
__device__ __forceinline__ void chunk_any(const LkAdamwParams &k, const LkAdamwTensor &t,
                                          int64_t start, int64_t end) {
  if (t.vec) {
    chunk<G, C, true>(k, t, start, end);
  } else {
    chunk<G, C, false>(k, t, start, end);
  }
}

template <typename G> __device__ void adamw(const LkAdamwParams &k) {
  for (int64_t c = blockIdx.x; c < k.chunks; c += gridDim.x) {
    const LkAdamwTensor t = k.tensors[__ldg(k.work + c)];
    const int64_t start = (c - t.chunk0) * LK_ADAMW_CHUNK;
    const int64_t end = min(start + (int64_t)LK_ADAMW_CHUNK, t.len);
    switch (t.copy_kind) {
      case LK_ADAMW_COPY_F32: chunk_any<G, float>(k, t, start, end); break;
      case LK_ADAMW_COPY_F16: chunk_any<G, __half>(k, t, start, end); break;
      case LK_ADAMW_COPY_BF16: chunk_any<G, __nv_bfloat16>(k, t, start, end); break;
      default: chunk_any<G, void>(k, t, start, end); break;
    }
  }
}

}  // namespace

// At least two resident blocks per SM (at most 128 registers): on an H200, a build of
// this kernel that took 134 registers (one block per SM) needed 110 µs for the bench's
// 12 M elements, against 89 µs with two.
#define LK_ADAMW_ENTRY(DT, T)                                                        \
  extern "C" __global__ void __launch_bounds__(ADAMW_BLOCK, ADAMW_MIN_BLOCKS)        \
      lk_adamw_##DT(LkAdamwParams p) {                                               \
    adamw<T>(p);                                                                     \
  }
LK_FOR_EACH_DTYPE(LK_ADAMW_ENTRY)
