// Tensor-core helpers shared by the kernel files: mma.sync m16n8k16 (f16 / bf16, f32
// accumulators), operand packing, and the double-buffered chunk walk.
#pragma once

#include "lk_common.cuh"

namespace lk {

// A warp's walk over its chunks ch0, ch0 + stride, ... (< chunks), double-buffered in
// registers: the loads of the next chunk batch are issued before the compute of this
// one, so a warp always has a batch in flight. load(buf, c) and compute(buf, c) are
// always called with a literal buf (0 or 1), so the buffers stay in registers.
template <class Load, class Compute>
__device__ __forceinline__ void double_buffered(int ch0, int stride, int chunks, Load &&load, Compute &&compute) {
  if (ch0 >= chunks) return;
  load(0, ch0);
  for (;;) {
    const int next = ch0 + stride;
    if (next >= chunks) {
      compute(0, ch0);
      break;
    }
    load(1, next);
    compute(0, ch0);
    const int next2 = next + stride;
    if (next2 >= chunks) {
      compute(1, next);
      break;
    }
    load(0, next2);
    compute(1, next);
    ch0 = next2;
  }
}

template <typename T> struct MmaOp;
template <> struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct MmaOp<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Two floats rounded to the 16-bit type, packed as one mma operand word.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t *>(&v);
}

}  // namespace lk
