// NF4 (bitsandbytes' format, src/nf4.rs) device helpers shared by the NF4 kernels
// (nf4.cu) and the GEMM core's NF4 B-operand producer (gemm.cu).
//
// Exactness: every dequantized value is NF4_CODE[c] * absmax as one f32 product
// (__fmul_rn: never contracted into an FMA), and a double-quantized absmax is
// code2[q] * absmax2 + offset as a product then a sum, as bitsandbytes computes them.

#ifndef LK_NF4_CUH
#define LK_NF4_CUH

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

// A block's scale as loaded: plain (a) or double-quantized (q, a2; resolved later).
struct RawScale {
  float a;
  uint32_t q;
};

__device__ __forceinline__ RawScale load_scale(const LkNf4 &w, int64_t b) {
  if (w.absmax != nullptr) return {__ldg(w.absmax + b), 0u};
  return {__ldg(w.absmax2 + (b >> 8)), (uint32_t)__ldg(w.q + b)};
}

__device__ __forceinline__ float resolve_scale(const LkNf4 &w, const float *code2, RawScale s) {
  if (w.absmax != nullptr) return s.a;
  return __fadd_rn(__fmul_rn(code2[s.q], s.a), w.offset);
}

}  // namespace

#endif  // LK_NF4_CUH
