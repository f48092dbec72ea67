// The small-T fused forward on tensor cores, shared by LoRA's kernels (lora.cu:
// lk_lora_small_mma_*) and DoRA's fused forward (dora.cu: lk_dora_small_*, the RK > 0
// instantiations), and the pieces of it that lora.cu's tensor-core down product uses
// (MMA_WARPS, dropout_zero8).
//
// The DoRA row-norm steps that the RK > 0 path calls (dora_load_a, dora_stage_b,
// dora_chunk, dora_norm_reduce) are declared here and defined in dora.cu, the one file
// that instantiates that path; a file that instantiated it without them would not build
// (ptxas: unresolved extern function).
#pragma once

#include "lk_common.cuh"
#include "lk_mma.cuh"

namespace lk {

// =====================================================================================
// Small-T fused forward on tensor cores (f16 / bf16), mma.sync m16n8k16.
//
// A block of 8 warps owns 16 rows (of A for h, or of W for y) and splits K between its
// warps in 32-column chunks. For a chunk at column c0, lane (g = lane / 4, q = lane % 4)
// loads 16 bytes of row g and of row g + 8 at c0 + 8q, and 16 bytes of token g (+ 8 per
// n-tile) of x at the same columns. Those 8 elements feed two mma k-steps directly:
// words 0, 1 are (k = 2q..2q+1, 2q+8..2q+9) of step one, words 2, 3 the same of step two.
// Both operands use this same permutation of the 32 columns, so the dot product is
// unchanged and no shared-memory staging is needed. Partial sums of the 8 warps are
// reduced in shared memory; the low-rank term, bias and h follow as in the SIMT kernel
// (lora.cu's small_fwd), with the same task order and counters.
// =====================================================================================
constexpr int MMA_WARPS = 8;
constexpr int MMA_BATCH = 2;  // 32-column chunks per register buffer (two buffers)

// The low-rank term as one extra K-slice of the same accumulators: rows of B (the A
// operand) against s·h (the B operand, f32 workspace rounded to T), 32 ranks per chunk
// with the fragment mapping of mma_rows_dot. Needs r % 8 == 0 and B 16-byte aligned.
template <typename T, int NT>
__device__ __forceinline__ void mma_lowrank(const LkSmallFwdParams &p, int row0, float (&acc)[NT][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const T *b = static_cast<const T *>(p.b);
  const T *b_lo = b + (size_t)min(row0 + g, p.n - 1) * p.r;
  const T *b_hi = b + (size_t)min(row0 + g + 8, p.n - 1) * p.r;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const int chunks = (p.r + 31) >> 5;
  for (int ch = warp; ch < chunks; ch += MMA_WARPS) {
    const int col = ch * 32 + 8 * q;
    const bool in = col < p.r;
    const int cl = in ? col : 0;
    uint4 l = __ldg(reinterpret_cast<const uint4 *>(b_lo + cl));
    uint4 h = __ldg(reinterpret_cast<const uint4 *>(b_hi + cl));
    if (!in) l = h = zero;
    const uint32_t a0[4] = {l.x, h.x, l.y, h.y};
    const uint32_t a1[4] = {l.z, h.z, l.w, h.w};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const float *hs = p.h_ws + (size_t)min(nt * 8 + g, p.t - 1) * p.r + cl;
      const float4 f0 = __ldcg(reinterpret_cast<const float4 *>(hs));
      const float4 f1 = __ldcg(reinterpret_cast<const float4 *>(hs + 4));
      const float sc = in ? p.scale : 0.0f;
      const uint32_t w0 = pack2<T>(sc * f0.x, sc * f0.y), w1 = pack2<T>(sc * f0.z, sc * f0.w);
      const uint32_t w2 = pack2<T>(sc * f1.x, sc * f1.y), w3 = pack2<T>(sc * f1.z, sc * f1.w);
      MmaOp<T>::run(acc[nt], a0, w0, w1);
      MmaOp<T>::run(acc[nt], a1, w2, w3);
    }
  }
}

// Zero the 16-bit elements of `v` whose dropout multiplier is 0 (kept ones stay exact;
// the 1/(1-p) factor is applied to the f32 result).
__device__ __forceinline__ uint4 dropout_zero8(const LkDropout &d, uint64_t e0, uint4 v) {
  float mul[8];
  dropout_mul8(d, e0, mul);
  uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (mul[2 * i] == 0.0f) w[i] &= 0xFFFF0000u;
    if (mul[2 * i + 1] == 0.0f) w[i] &= 0x0000FFFFu;
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// ---- the DoRA hook (RK > 0): its steps are defined in dora.cu -------------------------
template <typename T>
__device__ __forceinline__ void dora_load_a(const T *a, int r, int K, int c0, int ks, uint4 (&v)[2]);
template <typename T, int RK>
__device__ __forceinline__ void dora_stage_b(const T *b, int row0, int n, int r, T *bs);
template <typename T, int RK, bool PF>
__device__ __forceinline__ void dora_chunk(T (*ast)[16][8], const T *bs, const T *a, int r, int K, int c0, uint4 l,
                                           uint4 h, const uint4 (*av)[2], float scale, float &lo, float &hi);
template <int NWARPS>
__device__ __forceinline__ void dora_norm_reduce(float lo, float hi, float (*red)[16]);

// What the fused DoRA forward adds to a W-task's pass: the staging buffers, A, and the
// running sums of squares of rows g and g + 8.
template <typename T> struct DoraHook {
  T (*ast)[16][8];
  const T *bs;
  const T *a;
  int r;
  float scale;
  float lo, hi;
};

// acc[nt][.] += rows (row0, row0 + 8) x tokens (8 nt + g) over this warp's chunks.
// With RK > 0 (DoRA), each chunk also adds its elements of W + s·BA squared to dh.
template <typename T, int NT, bool DROP, int RK = 0, bool DPF = true>
__device__ __forceinline__ void mma_rows_dot(const T *__restrict__ x, const T *row_lo, const T *row_hi,
                                             int tokens, int K, const LkDropout &drop,
                                             float (&acc)[NT][4], DoraHook<T> *dh = nullptr) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int chunks = (K + 31) >> 5;
  // Token rows past T read token T-1 (results discarded at the store): no branches.
  const T *xrow[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) xrow[nt] = x + (size_t)min(nt * 8 + g, tokens - 1) * K;
  // Each warp takes MMA_BATCH consecutive chunks at a time, double-buffered in
  // registers: the loads of the next batch are issued before the mmas of this one, so a
  // warp always has a batch in flight. K % 8 == 0: a lane's 8 columns are all in or all
  // out; out-of-range lanes load a valid address and zero the value.
  constexpr int STRIDE = MMA_WARPS * MMA_BATCH;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4 wl[2][MMA_BATCH], wh[2][MMA_BATCH], xv[2][MMA_BATCH][NT];
  uint4 av[2][MMA_BATCH][(RK > 0 && DPF) ? RK : 1][2];
  auto load = [&](int buf, int ch0) {
#pragma unroll
    for (int u = 0; u < MMA_BATCH; ++u) {
      const int col = (ch0 + u) * 32 + 8 * q;
      const int cl = col < K ? col : 0;
      wl[buf][u] = ld_stream16(row_lo + cl);
      wh[buf][u] = ld_stream16(row_hi + cl);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) xv[buf][u][nt] = __ldg(reinterpret_cast<const uint4 *>(xrow[nt] + cl));
      if constexpr (RK > 0 && DPF) {
#pragma unroll
        for (int ks = 0; ks < RK; ++ks) dora_load_a(dh->a, dh->r, K, (ch0 + u) * 32, ks, av[buf][u][ks]);
      }
    }
  };
  auto compute = [&](int buf, int ch0) {
#pragma unroll
    for (int u = 0; u < MMA_BATCH; ++u) {
      const int col = (ch0 + u) * 32 + 8 * q;
      const bool in = col < K;
      const uint4 l = in ? wl[buf][u] : zero, h = in ? wh[buf][u] : zero;
      const uint32_t a0[4] = {l.x, h.x, l.y, h.y};
      const uint32_t a1[4] = {l.z, h.z, l.w, h.w};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint4 v = in ? xv[buf][u][nt] : zero;
        if constexpr (DROP) {
          const int tok = min(nt * 8 + g, tokens - 1);
          v = dropout_zero8(drop, (uint64_t)tok * K + (in ? col : 0), v);
        }
        MmaOp<T>::run(acc[nt], a0, v.x, v.y);
        MmaOp<T>::run(acc[nt], a1, v.z, v.w);
      }
      if constexpr (RK > 0)
        dora_chunk<T, RK, DPF>(dh->ast, dh->bs, dh->a, dh->r, K, (ch0 + u) * 32, l, h, av[buf][u], dh->scale,
                                dh->lo, dh->hi);
    }
  };
  double_buffered(warp * MMA_BATCH, STRIDE, chunks, load, compute);
}

// RK > 0: the fused DoRA forward. W-tasks also sum the squares of W + s·BA per row (the
// B rows staged in shared memory per task), and the output is y = (mag / norm) · z +
// bias, z = x Wᵀ + s·h Bᵀ (saved when p.z != NULL), norm written to p.norm. Needs the
// tensor-core low-rank slice (r % 8 == 0, B aligned), checked by the launcher.
template <typename T, int NT, int RK = 0, bool DPF = true>
__device__ __forceinline__ void small_fwd_mma(const LkSmallFwdParams &p) {
  __shared__ float red[MMA_WARPS][NT * 4][32];
  __shared__ alignas(16) T ast[RK > 0 ? MMA_WARPS : 1][4][16][8];
  __shared__ alignas(16) T bs[RK > 0 ? 16 * 16 * RK : 8];
  __shared__ float nred[RK > 0 ? MMA_WARPS : 1][16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int a_tasks = (p.r + 15) / 16;
  const int w_tasks = (p.n + 15) / 16;
  const T *x = static_cast<const T *>(p.x);
  const bool drop = dropout_on(p.dropout);
  bool h_ready = false;

  for (int task = blockIdx.x; task < a_tasks + w_tasks; task += gridDim.x) {
    const bool is_a = task < a_tasks;
    const int row0 = (is_a ? task : task - a_tasks) * 16;
    const int rows = is_a ? p.r : p.n;
    const T *m = static_cast<const T *>(is_a ? p.a : p.w);
    const T *row_lo = m + (size_t)min(row0 + (lane >> 2), rows - 1) * p.k;
    const T *row_hi = m + (size_t)min(row0 + (lane >> 2) + 8, rows - 1) * p.k;
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[nt][c] = 0.0f;
    if (is_a && drop) {
      mma_rows_dot<T, NT, true>(x, row_lo, row_hi, p.t, p.k, p.dropout, acc);
    } else if constexpr (RK > 0) {
      if (is_a) {
        mma_rows_dot<T, NT, false>(x, row_lo, row_hi, p.t, p.k, p.dropout, acc);
      } else {
        dora_stage_b<T, RK>(static_cast<const T *>(p.b), row0, p.n, p.r, bs);
        __syncthreads();
        DoraHook<T> dh{ast[warp], bs, static_cast<const T *>(p.a), p.r, p.scale, 0.0f, 0.0f};
        mma_rows_dot<T, NT, false, RK, DPF>(x, row_lo, row_hi, p.t, p.k, p.dropout, acc, &dh);
        dora_norm_reduce<MMA_WARPS>(dh.lo, dh.hi, nred);
      }
    } else {
      mma_rows_dot<T, NT, false>(x, row_lo, row_hi, p.t, p.k, p.dropout, acc);
    }
    // W rows: wait for h (each warp, once), then the low-rank K-slice into acc.
    const bool lowrank_mma = (p.r % 8 == 0) && ((reinterpret_cast<uintptr_t>(p.b) & 15) == 0);
    if (!is_a) {
      if (!h_ready) {
        if (lane == 0) {
          while (ld_acquire_gpu(&p.sync[0]) < (uint32_t)a_tasks) __nanosleep(32);
        }
        __syncwarp();
        h_ready = true;
      }
      if (lowrank_mma) mma_lowrank<T, NT>(p, row0, acc);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) red[warp][nt * 4 + c][lane] = acc[nt][c];
    __syncthreads();
    // Each thread finishes values (slot, lane) of the 16 x (8 NT) output tile.
    for (int v = threadIdx.x; v < NT * 4 * 32; v += MMA_WARPS * 32) {
      const int slot = v >> 5, l = v & 31;
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < MMA_WARPS; ++w) sum += red[w][slot][l];
      const int nt = slot >> 2, c = slot & 3;
      const int row = row0 + (l >> 2) + (c >= 2 ? 8 : 0);
      const int tok = nt * 8 + 2 * (l & 3) + (c & 1);
      if (row >= rows || tok >= p.t) continue;
      if (is_a) {
        if (drop) sum *= p.dropout.keep_scale;
        p.h_ws[(size_t)tok * p.r + row] = sum;
        if (p.h_out != nullptr) static_cast<T *>(p.h_out)[(size_t)tok * p.r + row] = from_f32<T>(sum);
      } else if (RK > 0) {
        float nsq = 0.0f;
#pragma unroll
        for (int wi = 0; wi < MMA_WARPS; ++wi) nsq += nred[wi][row - row0];
        const float nrm = sqrtf(nsq);
        if (p.z != nullptr) static_cast<T *>(p.z)[(size_t)tok * p.n + row] = from_f32<T>(sum);
        sum *= __fdiv_rn(ldg(static_cast<const T *>(p.mag) + row), nrm);
        if (p.bias != nullptr) sum += ldg(static_cast<const T *>(p.bias) + row);
        static_cast<T *>(p.y)[(size_t)tok * p.n + row] = from_f32<T>(sum);
      } else if (lowrank_mma) {
        if (p.bias != nullptr) sum += ldg(static_cast<const T *>(p.bias) + min(row, rows - 1));
        static_cast<T *>(p.y)[(size_t)tok * p.n + row] = from_f32<T>(sum);
      } else {
        const T *brow = static_cast<const T *>(p.b) + (size_t)min(row, rows - 1) * p.r;
        const float *hrow = p.h_ws + (size_t)min(tok, p.t - 1) * p.r;
        const int rlast = p.r - 1;
        // Four independent partial sums, unrolled, so the h and B loads overlap.
        float low[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        int j = 0;
#pragma unroll 2
        for (; j + 4 <= p.r; j += 4) {
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int jj = min(j + u, rlast);
            low[u] = fmaf(__ldcg(hrow + jj), ldg(brow + jj), low[u]);
          }
        }
        for (; j < p.r; ++j) low[0] = fmaf(__ldcg(hrow + min(j, rlast)), ldg(brow + min(j, rlast)), low[0]);
        sum = fmaf(p.scale, (low[0] + low[1]) + (low[2] + low[3]), sum);
        if (p.bias != nullptr) sum += ldg(static_cast<const T *>(p.bias) + min(row, rows - 1));
        static_cast<T *>(p.y)[(size_t)tok * p.n + row] = from_f32<T>(sum);
      }
    }
    if constexpr (RK > 0) {
      // The norms, computed as the output loop does (same order, same values).
      if (!is_a && threadIdx.x < 16 && row0 + threadIdx.x < p.n) {
        float nsq = 0.0f;
#pragma unroll
        for (int wi = 0; wi < MMA_WARPS; ++wi) nsq += nred[wi][threadIdx.x];
        p.norm[row0 + threadIdx.x] = sqrtf(nsq);
      }
    }
    if (is_a) __threadfence();
    __syncthreads();  // red[] is reused by the next task; h writes are complete
    if (is_a && threadIdx.x == 0) atomicAdd(&p.sync[0], 1u);
  }

  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const uint32_t done = atomicAdd(&p.sync[1], 1u);
    if (done == gridDim.x - 1) {
      atomicExch(&p.sync[0], 0u);
      atomicExch(&p.sync[1], 0u);
    }
  }
}

}  // namespace lk
