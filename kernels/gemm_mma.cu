// The GEMM core for sm_80 .. sm_89 (mma.sync; it runs on sm_90 too), for the GPUs
// without the wgmma / TMA core of gemm.cu. Built for every target architecture.

#include <stdint.h>

#include "lk_common.cuh"
#include "lk_gemm.cuh"
#include "lk_mma.cuh"

// ---- the mma.sync core (sm_80 .. sm_89; runs on sm_90 too) --------------------------------
// y[T, N] = col_scale ⊙ (x[T, K] · W[N, K]ᵀ + U[T, r] · Bl[N, r]ᵀ) + bias, z = the sum,
// for GPUs without wgmma/TMA. CTA tile 128 × 128, K-step 32, 4 warps in 2 × 2, each warp
// 64 × 64 of y as 4 × 8 mma.sync.m16n8k16 tiles (f32 accumulators, 128 per thread). A
// 3-stage cp.async ring in static shared memory (3 × 16 KB): per stage the x tile
// [128][32] and the W tile [128][32], rows of 64 bytes whose 16-byte chunk c sits at
// c ^ ((row / 2) % 4), so the 8 row addresses of each ldmatrix phase hit 8 distinct
// 16-byte bank groups. Loads past T, N or K are zero-filled (cp.async src-size 0); the
// low-rank term is ceil(round_up(r, 8) / 32) more K-steps reading U and Bl instead (their
// padding columns are zeros), so y is written once. Epilogue as the wgmma kernels' direct
// stores: predicated at T and N, pairs when N and y's row stride are even.
namespace lk_mma80 {

constexpr int BM = 128, BN = 128, BK = 32, STAGES = 3, THREADS = 128;
constexpr int TILE_BYTES = BM * BK * 2;        // 8 KB: [128][32] 16-bit
constexpr int STAGE_BYTES = 2 * TILE_BYTES;   // x tile, then W tile

// The swizzled byte offset of 16-byte chunk c (0..3) of row `row` in a [128][32] tile.
__device__ __forceinline__ uint32_t swz(int row, int c) {
  return static_cast<uint32_t>(row * 64 + ((c ^ ((row >> 1) & 3)) << 4));
}
// 16 bytes from global src into shared dst, or 16 zero bytes when !pred (src-size 0: no
// bytes read; src is then any valid address).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(n)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void gemm_mma_nt(const LkGemmMmaParams &p) {
  __shared__ __align__(128) uint8_t smem[STAGES * STAGE_BYTES];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;  // this warp's 64 × 64 block of the tile
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const T *x = static_cast<const T *>(p.x);
  const T *w = static_cast<const T *>(p.w);
  const T *u = static_cast<const T *>(p.u);
  const T *bl = static_cast<const T *>(p.bl);
  const int k_main = (p.k + BK - 1) / BK;
  const int rp = (p.rank + 7) / 8 * 8;  // U's and Bl's columns read (the rest padding)
  const int k_steps = k_main + (u != nullptr ? (rp + BK - 1) / BK : 0);
  const uint32_t base = lk::smem_u32(smem);

  // Stage s ← K-step ks: 512 16-byte chunks of x (or U) and 512 of W (or Bl), 4 + 4 per
  // thread; chunk q = tid + 128 i is row q / 4, column chunk q % 4.
  auto load = [&](int s, int ks) {
    const uint32_t a_dst = base + s * STAGE_BYTES, b_dst = a_dst + TILE_BYTES;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int q = tid + THREADS * i, row = q / 4, c = q % 4;
      const T *a_src, *b_src;
      bool a_in, b_in;
      if (ks < k_main) {
        const int col = ks * BK + 8 * c;
        a_in = m0 + row < p.t && col < p.k;
        b_in = n0 + row < p.n && col < p.k;
        a_src = x + static_cast<size_t>(a_in ? m0 + row : 0) * p.k + (a_in ? col : 0);
        b_src = w + static_cast<size_t>(b_in ? n0 + row : 0) * p.k + (b_in ? col : 0);
      } else {
        const int col = (ks - k_main) * BK + 8 * c;
        a_in = m0 + row < p.t && col < rp;
        b_in = n0 + row < p.n && col < rp;
        a_src = u + static_cast<size_t>(a_in ? m0 + row : 0) * p.ldu + (a_in ? col : 0);
        b_src = bl + static_cast<size_t>(b_in ? n0 + row : 0) * p.ldb + (b_in ? col : 0);
      }
      cp_async16(a_dst + swz(row, c), a_src, a_in);
      cp_async16(b_dst + swz(row, c), b_src, b_in);
    }
  };

  float acc[4][8][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_steps) load(s, s);
    cp_async_commit();
  }
  for (int ks = 0; ks < k_steps; ++ks) {
    cp_async_wait<STAGES - 2>();  // step ks's group has landed (this thread's part)
    __syncthreads();              // everyone's part; and step ks - 1's stage is free
    if (ks + STAGES - 1 < k_steps) load((ks + STAGES - 1) % STAGES, ks + STAGES - 1);
    cp_async_commit();
    const uint32_t a_t = base + (ks % STAGES) * STAGE_BYTES, b_t = a_t + TILE_BYTES;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t af[4][4], bf[4][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        // Matrices: rows 0-7 / 8-15 of k 0-7, then of k 8-15 (mma's a0..a3).
        const int row = 64 * wm + 16 * mt + lane % 16;
        ldmatrix_x4(a_t + swz(row, 2 * kk + lane / 16), af[mt]);
      }
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        // Matrices: n 0-7 of k 0-7 and k 8-15 (n-tile 2np's b0, b1), then n 8-15.
        const int row = 64 * wn + 16 * np + lane % 8 + 8 * (lane / 16);
        ldmatrix_x4(b_t + swz(row, 2 * kk + (lane / 8) % 2), bf[np]);
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          lk::MmaOp<T>::run(acc[mt][nt], af[mt], bf[nt / 2][2 * (nt % 2)],
                            bf[nt / 2][2 * (nt % 2) + 1]);
    }
  }
  cp_async_wait<0>();

  // Epilogue: acc[mt][nt][e] = D[row, col], row = 64 wm + 16 mt + lane / 4 + 8 (e / 2),
  // col = 64 wn + 8 nt + 2 (lane % 4) + e % 2.
  T *y = static_cast<T *>(p.y);
  T *z = static_cast<T *>(p.z);
  const T *bias = static_cast<const T *>(p.bias);
  const bool even_n = ((p.n | p.ldy) & 1) == 0;  // pairs of columns are 4-byte aligned
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const int col = n0 + 64 * wn + 8 * nt + 2 * (lane % 4);
    if (col >= p.n) continue;
    const bool has1 = col + 1 < p.n;
    float s0 = 1.0f, s1 = 1.0f, b0 = 0.0f, b1 = 0.0f;
    if (p.col_scale != nullptr) {
      s0 = __ldg(p.col_scale + col);
      if (has1) s1 = __ldg(p.col_scale + col + 1);
    }
    if (bias != nullptr) {
      b0 = lk::ldg(bias + col);
      if (has1) b1 = lk::ldg(bias + col + 1);
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + 64 * wm + 16 * mt + lane / 4 + 8 * h;
        if (row >= p.t) continue;
        const float a0 = acc[mt][nt][2 * h], a1 = acc[mt][nt][2 * h + 1];
        const float v0 = fmaf(s0, a0, b0), v1 = fmaf(s1, a1, b1);
        const size_t off = static_cast<size_t>(row) * p.ldy + col;
        const size_t zoff = static_cast<size_t>(row) * p.n + col;
        store_col_pair(y + off, v0, v1, even_n, has1);
        if (z != nullptr) store_col_pair(z + zoff, a0, a1, even_n, has1);
      }
    }
  }
}

}  // namespace lk_mma80

// Entry points lk_gemm_mma_nt_{bf16,f16}: 128 threads, 48 KB static shared memory, grid
// (ceil(N / 128), ceil(T / 128)); every arch (mma.sync, ldmatrix and cp.async exist from
// sm_80 on).
extern "C" __global__ void __launch_bounds__(128) lk_gemm_mma_nt_bf16(const LkGemmMmaParams p) {
  lk_mma80::gemm_mma_nt<__nv_bfloat16>(p);
}
extern "C" __global__ void __launch_bounds__(128) lk_gemm_mma_nt_f16(const LkGemmMmaParams p) {
  lk_mma80::gemm_mma_nt<__half>(p);
}
