// Device code shared by the two GEMM cores: the sm_90a wgmma core (gemm.cu) and the
// sm_80..89 mma.sync core (gemm_mma.cu).
#pragma once

#include "lk_common.cuh"
#include "lk_mma.cuh"

// ---- the direct-store epilogue's column pairs (the wgmma and the mma.sync kernels) -------
namespace {

// (v0, v1) into dst[0], dst[1]: one 4-byte store where column pairs are 4-byte aligned
// (even), else element by element, dst[1] only when has1.
template <typename T>
__device__ __forceinline__ void store_col_pair(T *dst, float v0, float v1, bool even, bool has1) {
  if (even) {
    *reinterpret_cast<uint32_t *>(dst) = lk::pack2<T>(v0, v1);
  } else {
    dst[0] = lk::from_f32<T>(v0);
    if (has1) dst[1] = lk::from_f32<T>(v1);
  }
}

}  // namespace
