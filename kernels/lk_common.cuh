// Device helpers shared by every kernel family: element types, vector loads, Philox,
// shared-memory addresses and gpu-scope flags.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "lk_params.h"

namespace lk {

// ---- element types -------------------------------------------------------------
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Read-only scalar load through the non-coherent cache.
template <typename T> __device__ __forceinline__ float ldg(const T *p) { return to_f32(__ldg(p)); }

// Eight 16-bit elements packed in 16 bytes, widened to f32.
__device__ __forceinline__ void unpack8(const uint4 &raw, const __half *, float (&v)[8]) {
  const __half2 *h = reinterpret_cast<const __half2 *>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void unpack8(const uint4 &raw, const __nv_bfloat16 *, float (&v)[8]) {
  const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}
// Eight f32 in 2 x 16 bytes.
__device__ __forceinline__ void unpack8(const uint4 &a, const uint4 &b, float (&v)[8]) {
  v[0] = __uint_as_float(a.x); v[1] = __uint_as_float(a.y);
  v[2] = __uint_as_float(a.z); v[3] = __uint_as_float(a.w);
  v[4] = __uint_as_float(b.x); v[5] = __uint_as_float(b.y);
  v[6] = __uint_as_float(b.z); v[7] = __uint_as_float(b.w);
}

// Streaming 16-byte load: read once, so it skips L1 (keeping it for re-used operands).
// Not volatile: the compiler may batch and hoist it (read-only data).
__device__ __forceinline__ uint4 ld_stream16(const void *p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// Eight consecutive elements starting at p (aligned to 8 elements), as f32: through the
// read-only cache (load8) or streamed past L1 (load8_stream).
__device__ __forceinline__ void load8(const float *p, float (&v)[8]) {
  const uint4 *q = reinterpret_cast<const uint4 *>(p);
  unpack8(__ldg(q), __ldg(q + 1), v);
}
template <typename T> __device__ __forceinline__ void load8(const T *p, float (&v)[8]) {
  unpack8(__ldg(reinterpret_cast<const uint4 *>(p)), p, v);
}
__device__ __forceinline__ void load8_stream(const float *p, float (&v)[8]) {
  unpack8(ld_stream16(p), ld_stream16(p + 4), v);
}
template <typename T> __device__ __forceinline__ void load8_stream(const T *p, float (&v)[8]) {
  unpack8(ld_stream16(p), p, v);
}

// ---- Philox4x32-10 (Salmon et al., SC'11), the same function as src/philox.rs ----
struct U32x4 { uint32_t v[4]; };

__device__ __forceinline__ U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                               uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t lo0 = 0xD2511F53u * c0, hi0 = __umulhi(0xD2511F53u, c0);
    const uint32_t lo1 = 0xCD9E8D57u * c2, hi1 = __umulhi(0xCD9E8D57u, c2);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  U32x4 r;
  r.v[0] = c0; r.v[1] = c1; r.v[2] = c2; r.v[3] = c3;
  return r;
}

// Philox block `group` of stream (seed, offset), as src/philox.rs lays out the counter.
__device__ __forceinline__ U32x4 philox_block(uint64_t seed, uint64_t offset, uint64_t group) {
  return philox4x32_10((uint32_t)group, (uint32_t)(group >> 32), (uint32_t)offset,
                       (uint32_t)(offset >> 32), (uint32_t)seed, (uint32_t)(seed >> 32));
}

// The four Philox words for element group e >> 2 (elements 4*(e>>2) .. +3).
__device__ __forceinline__ U32x4 philox_group(const LkDropout &d, uint64_t group) {
  return philox_block(d.seed, d.offset, group);
}

// Word i (0..3) of a 16-byte vector or a Philox block, without local-memory indexing.
__device__ __forceinline__ uint32_t word_of(const uint4 &r, int i) {
  return i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w;
}
__device__ __forceinline__ uint32_t word_of(const U32x4 &r, int i) {
  return i == 0 ? r.v[0] : i == 1 ? r.v[1] : i == 2 ? r.v[2] : r.v[3];
}

// A 16-bit element's bits <-> f32 (exact widening, round-to-nearest-even narrowing).
template <typename T> __device__ __forceinline__ float bits16_to_f32(uint32_t b);
template <> __device__ __forceinline__ float bits16_to_f32<__nv_bfloat16>(uint32_t b) {
  return __uint_as_float(b << 16);
}
template <> __device__ __forceinline__ float bits16_to_f32<__half>(uint32_t b) {
  return __half2float(__ushort_as_half((unsigned short)b));
}
template <typename T> __device__ __forceinline__ uint32_t f32_to_bits16(float v);
template <> __device__ __forceinline__ uint32_t f32_to_bits16<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
template <> __device__ __forceinline__ uint32_t f32_to_bits16<__half>(float v) {
  return __half_as_ushort(__float2half_rn(v));
}

__device__ __forceinline__ bool dropout_on(const LkDropout &d) { return d.threshold != 0; }

// Multiplier of element e under dropout d: 0 (dropped) or keep_scale (kept).
__device__ __forceinline__ float dropout_mul(const LkDropout &d, uint64_t e) {
  const U32x4 r = philox_group(d, e >> 2);
  return (r.v[e & 3] >> 8) < d.threshold ? 0.0f : d.keep_scale;
}

// Multipliers of the eight elements e0 .. e0 + 7, e0 a multiple of 4.
__device__ __forceinline__ void dropout_mul8(const LkDropout &d, uint64_t e0, float (&m)[8]) {
#pragma unroll
  for (int g = 0; g < 2; ++g) {
    const U32x4 r = philox_group(d, (e0 >> 2) + g);
#pragma unroll
    for (int i = 0; i < 4; ++i) m[4 * g + i] = (r.v[i] >> 8) < d.threshold ? 0.0f : d.keep_scale;
  }
}

// The shared-window address (for ldmatrix, cp.async, mbarriers, TMA) of a generic
// pointer to shared memory.
__device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A flag word that other blocks set, read with acquire semantics at gpu scope: what its
// writer did before its release (a fence then an atomic, or st.release.gpu) is visible
// after this load sees the value.
__device__ __forceinline__ uint32_t ld_acquire_gpu(const uint32_t *p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace lk

// One extern "C" entry point per element type: NAME_f32, NAME_f16, NAME_bf16.
#define LK_FOR_EACH_DTYPE(X) X(f32, float) X(f16, __half) X(bf16, __nv_bfloat16)
