// LoRA linear kernels: the small-T fused forward, the skinny low-rank products used by
// the large-T path and by backward, merge/unmerge, and small element-wise helpers.
//
// Shapes (row-major): x [T, K], W [N, K], A [r, K], B [N, r], bias [N], y [T, N].
// Accumulation is always f32; inputs and outputs are f32, f16 or bf16.
#include "lk_common.cuh"
#include "lk_mma.cuh"

using namespace lk;

// =====================================================================================
// Small-T fused forward: one pass over W computes x Wᵀ, the LoRA term and the bias.
//
// Work items ("tasks") are handed to warps in order: first ceil(r / ROWS) tasks over the
// rows of A (h = drop(x) Aᵀ, into an f32 workspace), then ceil(N / ROWS) tasks over the
// rows of W. A W-task streams its ROWS rows of W against all T tokens, and only then
// waits for h (a counter the A-tasks bump), adds scale * h Bᵀ and the bias, and writes y.
// Because A-tasks have the lowest indices, every warp finishes its A-tasks before any
// W-task, and the cooperative launch keeps all blocks resident, so the wait always ends.
// The last block to finish resets the two counters to zero for the next launch.
// =====================================================================================
constexpr int SMALL_WARPS = 8;

// acc[i][t] += dot(row i of M, token t of x) over this lane's share of the K axis.
// Every m_rows[i] is a valid row (callers clamp rows past the end to a real one and
// discard those results), so the loads are unconditional and can be batched.
// M is streamed past L1 (read once); x stays in L1 for the other warps.
template <typename T, int TB, int ROWS, bool VEC, bool DROP>
__device__ __forceinline__ void warp_rows_dot(const T *__restrict__ x, const T *const (&m_rows)[ROWS],
                                              int tokens, int K, const LkDropout &drop,
                                              float (&acc)[ROWS][TB]) {
  const int lane = threadIdx.x & 31;
  if constexpr (VEC) {
    const int chunks = K >> 3;
#pragma unroll 4
    for (int c = lane; c < chunks; c += 32) {
      const int cc = min(c, chunks - 1);  // in-bounds address even if hoisted
      float wv[ROWS][8];
#pragma unroll
      for (int i = 0; i < ROWS; ++i) load8_stream(m_rows[i] + 8 * cc, wv[i]);
#pragma unroll
      for (int t = 0; t < TB; ++t) {
        if (t < tokens) {
          float xv[8];
          load8(x + (size_t)min(t, tokens - 1) * K + 8 * cc, xv);
          if constexpr (DROP) {
            float mul[8];
            dropout_mul8(drop, (uint64_t)t * K + 8 * c, mul);
#pragma unroll
            for (int e = 0; e < 8; ++e) xv[e] *= mul[e];
          }
#pragma unroll
          for (int i = 0; i < ROWS; ++i) {
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[i][t] = fmaf(wv[i][e], xv[e], acc[i][t]);
          }
        }
      }
    }
  } else {
#pragma unroll 2
    for (int k = lane; k < K; k += 32) {
      // Addresses clamped in bounds: the compiler may issue read-only loads ahead of
      // the loop and branch conditions.
      const int kc = min(k, K - 1);
      float wv[ROWS];
#pragma unroll
      for (int i = 0; i < ROWS; ++i) wv[i] = ldg(m_rows[i] + kc);
#pragma unroll
      for (int t = 0; t < TB; ++t) {
        if (t < tokens) {
          float xv = ldg(x + (size_t)min(t, tokens - 1) * K + kc);
          if constexpr (DROP) xv *= dropout_mul(drop, (uint64_t)t * K + k);
#pragma unroll
          for (int i = 0; i < ROWS; ++i) acc[i][t] = fmaf(wv[i], xv, acc[i][t]);
        }
      }
    }
  }
}

template <int TB, int ROWS>
__device__ __forceinline__ void warp_reduce_all(float (&acc)[ROWS][TB]) {
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
#pragma unroll
    for (int t = 0; t < TB; ++t) acc[i][t] = warp_sum(acc[i][t]);
  }
}

__device__ __forceinline__ uint32_t ld_acquire(const uint32_t *p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

template <typename T, int TB, int ROWS, bool VEC>
__device__ __forceinline__ void small_fwd(const LkSmallFwdParams &p) {
  const int lane = threadIdx.x & 31;
  const int warp = blockIdx.x * SMALL_WARPS + (threadIdx.x >> 5);
  const int nwarps = gridDim.x * SMALL_WARPS;
  const int a_tasks = (p.r + ROWS - 1) / ROWS;
  const int w_tasks = (p.n + ROWS - 1) / ROWS;
  const T *x = static_cast<const T *>(p.x);
  const bool drop = dropout_on(p.dropout);
  bool h_ready = false;

  for (int task = warp; task < a_tasks + w_tasks; task += nwarps) {
    float acc[ROWS][TB];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
#pragma unroll
      for (int t = 0; t < TB; ++t) acc[i][t] = 0.0f;
    }
    if (task < a_tasks) {
      // ---- h rows j0 .. j0 + ROWS - 1 ----
      const int j0 = task * ROWS;
      const T *rows[ROWS];
#pragma unroll
      for (int i = 0; i < ROWS; ++i)
        rows[i] = static_cast<const T *>(p.a) + (size_t)min(j0 + i, p.r - 1) * p.k;
      if (drop)
        warp_rows_dot<T, TB, ROWS, VEC, true>(x, rows, p.t, p.k, p.dropout, acc);
      else
        warp_rows_dot<T, TB, ROWS, VEC, false>(x, rows, p.t, p.k, p.dropout, acc);
      warp_reduce_all<TB, ROWS>(acc);
      if (lane == 0) {
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
#pragma unroll
          for (int t = 0; t < TB; ++t) {
            if (t < p.t && j0 + i < p.r) {
              p.h_ws[(size_t)t * p.r + j0 + i] = acc[i][t];
              if (p.h_out != nullptr)
                static_cast<T *>(p.h_out)[(size_t)t * p.r + j0 + i] = from_f32<T>(acc[i][t]);
            }
          }
        }
        __threadfence();
        atomicAdd(&p.sync[0], 1u);
      }
      __syncwarp();
    } else {
      // ---- y columns n0 .. n0 + ROWS - 1 ----
      const int n0 = (task - a_tasks) * ROWS;
      const T *rows[ROWS];
#pragma unroll
      for (int i = 0; i < ROWS; ++i)
        rows[i] = static_cast<const T *>(p.w) + (size_t)min(n0 + i, p.n - 1) * p.k;
      warp_rows_dot<T, TB, ROWS, VEC, false>(x, rows, p.t, p.k, p.dropout, acc);

      if (!h_ready) {
        if (lane == 0) {
          while (ld_acquire(&p.sync[0]) < (uint32_t)a_tasks) __nanosleep(64);
        }
        __syncwarp();
        h_ready = true;
      }
      // Low-rank term: lanes split the rank axis; h comes from L2 (__ldcg), never L1.
      const T *bm = static_cast<const T *>(p.b);
      for (int j = lane; j < p.r; j += 32) {
        float bv[ROWS];
#pragma unroll
        for (int i = 0; i < ROWS; ++i) bv[i] = n0 + i < p.n ? ldg(bm + (size_t)min(n0 + i, p.n - 1) * p.r + min(j, p.r - 1)) : 0.0f;
#pragma unroll
        for (int t = 0; t < TB; ++t) {
          if (t < p.t) {
            const float hv = p.scale * __ldcg(p.h_ws + (size_t)min(t, p.t - 1) * p.r + min(j, p.r - 1));
#pragma unroll
            for (int i = 0; i < ROWS; ++i) acc[i][t] = fmaf(hv, bv[i], acc[i][t]);
          }
        }
      }
      warp_reduce_all<TB, ROWS>(acc);
      // Lane i*TB + t (mod 32) stores element (t, n0 + i): spread the stores over lanes.
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
#pragma unroll
        for (int t = 0; t < TB; ++t) {
          if (((i * TB + t) & 31) == lane && t < p.t && n0 + i < p.n) {
            float v = acc[i][t];
            if (p.bias != nullptr) v += ldg(static_cast<const T *>(p.bias) + min(n0 + i, p.n - 1));
            static_cast<T *>(p.y)[(size_t)t * p.n + n0 + i] = from_f32<T>(v);
          }
        }
      }
    }
  }

  // Last block out resets the counters (every waiter has passed its wait by then).
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

// f32 gets the vectorized (v: K % 8 == 0, 16-byte aligned) and scalar (s) variants;
// f16 and bf16 take the tensor-core kernel below when aligned, so only need (s).
#define LK_SMALL_FWD_V(DT, TYPE, TB, ROWS)                                                      \
  extern "C" __global__ void __launch_bounds__(SMALL_WARPS * 32)                                \
      lk_lora_small_fwd_##DT##_t##TB##_v(LkSmallFwdParams p) {                                  \
    small_fwd<TYPE, TB, ROWS, true>(p);                                                         \
  }
#define LK_SMALL_FWD_S(DT, TYPE, TB, ROWS)                                                      \
  extern "C" __global__ void __launch_bounds__(SMALL_WARPS * 32)                                \
      lk_lora_small_fwd_##DT##_t##TB##_s(LkSmallFwdParams p) {                                  \
    small_fwd<TYPE, TB, ROWS, false>(p);                                                        \
  }
#define LK_SMALL_FWD_TBS(X, DT, TYPE)                                                           \
  X(DT, TYPE, 1, 2) X(DT, TYPE, 2, 2) X(DT, TYPE, 4, 2) X(DT, TYPE, 8, 4) X(DT, TYPE, 16, 4)    \
  X(DT, TYPE, 32, 4)
LK_SMALL_FWD_TBS(LK_SMALL_FWD_V, f32, float)
LK_SMALL_FWD_TBS(LK_SMALL_FWD_S, f32, float)
LK_SMALL_FWD_TBS(LK_SMALL_FWD_S, f16, __half)
LK_SMALL_FWD_TBS(LK_SMALL_FWD_S, bf16, __nv_bfloat16)

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
// reduced in shared memory; the low-rank term, bias and h follow as in the SIMT kernel.
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
  const uint32_t addr = (uint32_t)__cvta_generic_to_shared(smem);
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
          while (ld_acquire(&p.sync[0]) < (uint32_t)a_tasks) __nanosleep(32);
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

#define LK_DORA_NORM_MMA(DT, TYPE, RK)                                                          \
  extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                  \
      lk_lora_dora_norm_mma_##DT##_k##RK(LkDoraNormParams p) { dora_norm_mma<TYPE, RK>(p); }
#define LK_DORA_NORM_MMA_ALL(DT, TYPE)                                                          \
  LK_DORA_NORM_MMA(DT, TYPE, 1)                                                                 \
  LK_DORA_NORM_MMA(DT, TYPE, 2)                                                                 \
  LK_DORA_NORM_MMA(DT, TYPE, 4)                                                                 \
  LK_DORA_NORM_MMA(DT, TYPE, 16)
LK_DORA_NORM_MMA_ALL(f16, __half)
LK_DORA_NORM_MMA_ALL(bf16, __nv_bfloat16)

#define LK_SMALL_MMA(DT, TYPE)                                                                  \
  extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                  \
      lk_lora_small_mma_##DT##_n1(LkSmallFwdParams p) { small_fwd_mma<TYPE, 1>(p); }            \
  extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                  \
      lk_lora_small_mma_##DT##_n2(LkSmallFwdParams p) { small_fwd_mma<TYPE, 2>(p); }            \
  extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                  \
      lk_lora_small_mma_##DT##_n4(LkSmallFwdParams p) { small_fwd_mma<TYPE, 4>(p); }
LK_SMALL_MMA(f16, __half)
LK_SMALL_MMA(bf16, __nv_bfloat16)

// A is not prefetched with W here (measured: 26 µs against 30 µs with it at T = 1,
// N = K = 4096, H100: the registers it takes halve the blocks per SM); n1 and n2 are
// held to 128 registers for two blocks per SM, n4 would spill.
#define LK_DORA_SMALL(DT, TYPE, NT, RK, MINB)                                                   \
  extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32, MINB)                            \
      lk_lora_dora_small_##DT##_n##NT##_k##RK(LkSmallFwdParams p) { small_fwd_mma<TYPE, NT, RK, false>(p); }
#define LK_DORA_SMALL_ALL(DT, TYPE)                                                             \
  LK_DORA_SMALL(DT, TYPE, 1, 1, 2)                                                              \
  LK_DORA_SMALL(DT, TYPE, 2, 1, 2)                                                              \
  LK_DORA_SMALL(DT, TYPE, 4, 1, 1)                                                              \
  LK_DORA_SMALL(DT, TYPE, 1, 2, 2)                                                              \
  LK_DORA_SMALL(DT, TYPE, 2, 2, 2)                                                              \
  LK_DORA_SMALL(DT, TYPE, 4, 2, 1)
LK_DORA_SMALL_ALL(f16, __half)
LK_DORA_SMALL_ALL(bf16, __nv_bfloat16)

// =====================================================================================
// Skinny down product, split over the contraction axis (grid z = chunks):
//   part[s][t * r + j] = sum_{c in chunk s} drop(x)[t, c] * V(j, c)
// Block tile: 64 tokens x BR ranks, column step 32; 256 threads, each 4 tokens x BR/16.
// =====================================================================================
constexpr int DN_BM = 64, DN_BK = 32;

template <typename T, int BR>
__device__ __forceinline__ void down_kernel(const LkDownParams &p) {
  __shared__ float xs[DN_BK][DN_BM + 1];
  __shared__ float vs[DN_BK][BR + 1];
  constexpr int RPT = BR / 16;  // ranks per thread
  const int tid = threadIdx.x;
  const int ty = tid >> 4, tx = tid & 15;  // tokens ty*4.., ranks tx*RPT..
  const int t0 = blockIdx.x * DN_BM, j0 = blockIdx.y * BR;
  const int c_begin = blockIdx.z * p.c_chunk;
  const int c_end = min(p.cols, c_begin + p.c_chunk);
  const T *x = static_cast<const T *>(p.x);
  const T *v = static_cast<const T *>(p.v);
  const bool drop = dropout_on(p.dropout);
  float acc[4][RPT];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < RPT; ++b) acc[a][b] = 0.0f;

  for (int c0 = c_begin; c0 < c_end; c0 += DN_BK) {
    // x tile: 64 x 32 elements, 8 per thread (consecutive c for coalescing).
#pragma unroll
    for (int l = 0; l < (DN_BM * DN_BK) / 256; ++l) {
      const int idx = l * 256 + tid;
      const int tt = idx / DN_BK, cc = idx % DN_BK;
      const int t = t0 + tt, c = c0 + cc;
      float val = ldg(x + (size_t)min(t, p.t - 1) * p.ldx + min(c, p.cols - 1));
      if (t < p.t && c < c_end) {
        if (drop) val *= dropout_mul(p.dropout, (uint64_t)t * p.cols + c);
      } else {
        val = 0.0f;
      }
      xs[cc][tt] = val;
    }
    for (int idx = tid; idx < BR * DN_BK; idx += 256) {
      const int jj = idx / DN_BK, cc = idx % DN_BK;
      const int j = j0 + jj, c = c0 + cc;
      const float vv = ldg(v + (size_t)min(j, p.r - 1) * p.v_sj + (size_t)min(c, p.cols - 1) * p.v_sc);
      vs[cc][jj] = (j < p.r && c < c_end) ? vv : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int cc = 0; cc < DN_BK; ++cc) {
      float xr[4], vr[RPT];
#pragma unroll
      for (int a = 0; a < 4; ++a) xr[a] = xs[cc][ty * 4 + a];
#pragma unroll
      for (int b = 0; b < RPT; ++b) vr[b] = vs[cc][tx * RPT + b];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < RPT; ++b) acc[a][b] = fmaf(xr[a], vr[b], acc[a][b]);
    }
    __syncthreads();
  }
  float *part = p.part + (size_t)blockIdx.z * p.t * p.r;
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int t = t0 + ty * 4 + a;
    if (t >= p.t) continue;
#pragma unroll
    for (int b = 0; b < RPT; ++b) {
      const int j = j0 + tx * RPT + b;
      if (j >= p.r) continue;
      if (p.out != nullptr) {
        static_cast<T *>(p.out)[(size_t)t * p.r + j] = from_f32<T>(p.alpha * acc[a][b]);
        if (p.out2 != nullptr)
          static_cast<T *>(p.out2)[(size_t)t * p.r + j] = from_f32<T>(p.alpha2 * acc[a][b]);
      } else {
        part[(size_t)t * p.r + j] = acc[a][b];
      }
    }
  }
}

// Tensor-core variant (f16 / bf16; cols % 8 == 0, rows of x and V 16-byte aligned, V
// contiguous along c): a block of 8 warps owns 16 tokens x 8 NT ranks and splits its
// column chunk between the warps, with the fragment mapping of mma_rows_dot (x rows as
// the A operand, V rows as the B operand). Dropped x elements are zeroed and the
// 1/(1-p) factor is applied to the sums.
template <typename T, int NT>
__device__ __forceinline__ void down_mma_kernel(const LkDownParams &p) {
  __shared__ float red[MMA_WARPS][NT * 4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int t0 = blockIdx.x * 16, j0 = blockIdx.y * (8 * NT);
  const int c_begin = blockIdx.z * p.c_chunk;
  const int c_end = min(p.cols, c_begin + p.c_chunk);
  const T *x = static_cast<const T *>(p.x);
  const T *v = static_cast<const T *>(p.v);
  const bool drop = dropout_on(p.dropout);
  const int t_lo = min(t0 + g, p.t - 1), t_hi = min(t0 + g + 8, p.t - 1);
  const T *x_lo = x + (size_t)t_lo * p.ldx, *x_hi = x + (size_t)t_hi * p.ldx;
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[nt][c] = 0.0f;
  const int chunks = (c_end - c_begin + 31) >> 5;
#pragma unroll 4
  for (int ch = warp; ch < chunks; ch += MMA_WARPS) {
    const int col = c_begin + ch * 32 + 8 * q;
    const bool in = col < c_end;
    const int cl = in ? col : c_begin;  // a valid address for lanes past the end
    uint4 xl = __ldg(reinterpret_cast<const uint4 *>(x_lo + cl));
    uint4 xh = __ldg(reinterpret_cast<const uint4 *>(x_hi + cl));
    if (!in) xl = xh = make_uint4(0, 0, 0, 0);
    if (drop && in) {
      xl = dropout_zero8(p.dropout, (uint64_t)t_lo * p.cols + col, xl);
      xh = dropout_zero8(p.dropout, (uint64_t)t_hi * p.cols + col, xh);
    }
    const uint32_t a0[4] = {xl.x, xh.x, xl.y, xh.y};
    const uint32_t a1[4] = {xl.z, xh.z, xl.w, xh.w};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int j = min(j0 + nt * 8 + g, p.r - 1);
      uint4 vv = __ldg(reinterpret_cast<const uint4 *>(v + (size_t)j * p.v_sj + cl));
      if (!in) vv = make_uint4(0, 0, 0, 0);
      MmaOp<T>::run(acc[nt], a0, vv.x, vv.y);
      MmaOp<T>::run(acc[nt], a1, vv.z, vv.w);
    }
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[warp][nt * 4 + c][lane] = acc[nt][c];
  __syncthreads();
  float *part = p.part + (size_t)blockIdx.z * p.t * p.r;
  for (int e = threadIdx.x; e < NT * 4 * 32; e += MMA_WARPS * 32) {
    const int slot = e >> 5, l = e & 31;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < MMA_WARPS; ++w) sum += red[w][slot][l];
    const int nt = slot >> 2, c = slot & 3;
    const int t = t0 + (l >> 2) + (c >= 2 ? 8 : 0);
    const int j = j0 + nt * 8 + 2 * (l & 3) + (c & 1);
    if (t < p.t && j < p.r) {
      const float val = drop ? sum * p.dropout.keep_scale : sum;
      if (p.out != nullptr) {
        static_cast<T *>(p.out)[(size_t)t * p.r + j] = from_f32<T>(p.alpha * val);
        if (p.out2 != nullptr)
          static_cast<T *>(p.out2)[(size_t)t * p.r + j] = from_f32<T>(p.alpha2 * val);
      } else {
        part[(size_t)t * p.r + j] = val;
      }
    }
  }
}

#define LK_DOWN_MMA(DT, TYPE)                                                                   \
  extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                  \
      lk_down_mma_##DT##_n1(LkDownParams p) { down_mma_kernel<TYPE, 1>(p); }                    \
  extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                  \
      lk_down_mma_##DT##_n2(LkDownParams p) { down_mma_kernel<TYPE, 2>(p); }                    \
  extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                  \
      lk_down_mma_##DT##_n4(LkDownParams p) { down_mma_kernel<TYPE, 4>(p); }                    \
  extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                  \
      lk_down_mma_##DT##_n8(LkDownParams p) { down_mma_kernel<TYPE, 8>(p); }
LK_DOWN_MMA(f16, __half)
LK_DOWN_MMA(bf16, __nv_bfloat16)

#define LK_DOWN(DT, TYPE)                                                                       \
  extern "C" __global__ void __launch_bounds__(256) lk_down_r16_##DT(LkDownParams p) {          \
    down_kernel<TYPE, 16>(p);                                                                   \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(256) lk_down_r64_##DT(LkDownParams p) {          \
    down_kernel<TYPE, 64>(p);                                                                   \
  }
LK_FOR_EACH_DTYPE(LK_DOWN)

// =====================================================================================
// Skinny transposed product over tokens, split into chunks:
//   part[s][c * o_sc + j * o_sj] = sum_{t in chunk s} drop(m)[t, c] * g[t, j]
// Block tile: 64 columns x BR ranks, token step 32; grid (cols/64, r/BR, splits).
// =====================================================================================
constexpr int TN_BC = 64, TN_BT = 32;

template <typename T, int BR>
__device__ __forceinline__ void tn_kernel(const LkTnParams &p) {
  __shared__ float ms[TN_BT][TN_BC + 1];
  __shared__ float gs[TN_BT][BR + 1];
  constexpr int RPT = BR / 16;
  const int tid = threadIdx.x;
  const int ty = tid >> 4, tx = tid & 15;  // columns ty*4.., ranks tx*RPT..
  const int c0 = blockIdx.x * TN_BC, j0 = blockIdx.y * BR;
  const int s = blockIdx.z;
  const int t_begin = s * p.t_chunk;
  const int t_end = min(p.t, t_begin + p.t_chunk);
  const T *m = static_cast<const T *>(p.m);
  const T *g = static_cast<const T *>(p.g);
  const bool drop = dropout_on(p.dropout);
  float acc[4][RPT];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < RPT; ++b) acc[a][b] = 0.0f;

  for (int tb = t_begin; tb < t_end; tb += TN_BT) {
#pragma unroll
    for (int l = 0; l < (TN_BC * TN_BT) / 256; ++l) {
      const int idx = l * 256 + tid;
      const int tt = idx / TN_BC, cc = idx % TN_BC;
      const int t = tb + tt, c = c0 + cc;
      float val = ldg(m + (size_t)min(t, p.t - 1) * p.cols + min(c, p.cols - 1));
      if (t < t_end && c < p.cols) {
        if (drop) val *= dropout_mul(p.dropout, (uint64_t)t * p.cols + c);
      } else {
        val = 0.0f;
      }
      ms[tt][cc] = val;
    }
    for (int idx = tid; idx < TN_BT * BR; idx += 256) {
      const int tt = idx / BR, jj = idx % BR;
      const int t = tb + tt, j = j0 + jj;
      const float gv = ldg(g + (size_t)min(t, p.t - 1) * p.r + min(j, p.r - 1));
      gs[tt][jj] = (t < t_end && j < p.r) ? gv : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int tt = 0; tt < TN_BT; ++tt) {
      float mr[4], gr[RPT];
#pragma unroll
      for (int a = 0; a < 4; ++a) mr[a] = ms[tt][ty * 4 + a];
#pragma unroll
      for (int b = 0; b < RPT; ++b) gr[b] = gs[tt][tx * RPT + b];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < RPT; ++b) acc[a][b] = fmaf(mr[a], gr[b], acc[a][b]);
    }
    __syncthreads();
  }
  float *part = p.part + (size_t)s * p.cols * p.r;
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int c = c0 + ty * 4 + a;
    if (c >= p.cols) continue;
#pragma unroll
    for (int b = 0; b < RPT; ++b) {
      const int j = j0 + tx * RPT + b;
      if (j < p.r) part[(size_t)c * p.o_sc + (size_t)j * p.o_sj] = acc[a][b];
    }
  }
}

#define LK_TN(DT, TYPE)                                                                         \
  extern "C" __global__ void __launch_bounds__(256) lk_tn_r16_##DT(LkTnParams p) {              \
    tn_kernel<TYPE, 16>(p);                                                                     \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(256) lk_tn_r64_##DT(LkTnParams p) {              \
    tn_kernel<TYPE, 64>(p);                                                                     \
  }
LK_FOR_EACH_DTYPE(LK_TN)

template <typename T>
__device__ __forceinline__ void reduce_kernel(const LkReduceParams &p) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.count; i += stride) {
    float acc = 0.0f;
    for (int s = 0; s < p.splits; ++s) acc += p.part[(size_t)s * p.count + i];
    static_cast<T *>(p.out)[i] = from_f32<T>(p.alpha * acc);
    if (p.out2 != nullptr) static_cast<T *>(p.out2)[i] = from_f32<T>(p.alpha2 * acc);
  }
}
#define LK_REDUCE(DT, TYPE)                                                                     \
  extern "C" __global__ void __launch_bounds__(256) lk_reduce_##DT(LkReduceParams p) {          \
    reduce_kernel<TYPE>(p);                                                                     \
  }
LK_FOR_EACH_DTYPE(LK_REDUCE)

// =====================================================================================
// Merge / unmerge of LoRA and DoRA (the modes of LkMergeParams). Grid (N, ceil(K/256)).
// =====================================================================================
template <typename T>
__device__ __forceinline__ void merge_kernel(const LkMergeParams &p) {
  extern __shared__ float bs[];  // [r]
  const int n = blockIdx.x;
  const T *b = static_cast<const T *>(p.b);
  const T *a = static_cast<const T *>(p.a);
  for (int j = threadIdx.x; j < p.r; j += blockDim.x) bs[j] = ldg(b + (size_t)n * p.r + min(j, p.r - 1));
  __syncthreads();
  const int k = blockIdx.y * blockDim.x + threadIdx.x;
  if (k >= p.k) return;
  const int kc = min(k, p.k - 1);
  float acc = 0.0f;
  for (int j = 0; j < p.r; ++j) acc = fmaf(bs[j], ldg(a + (size_t)j * p.k + kc), acc);
  T *w = static_cast<T *>(p.w) + (size_t)n * p.k + k;
  if (p.mode == 0) {
    *w = from_f32<T>(to_f32(*w) + p.scale * acc);
    return;
  }
  const float mag = ldg(static_cast<const T *>(p.mag) + n), nrm = __ldg(p.norm + n);
  if (p.mode == 2)
    *w = from_f32<T>(to_f32(*w) * __fdiv_rn(nrm, mag) - p.scale * acc);
  else
    *w = from_f32<T>(__fdiv_rn(mag, nrm) * fmaf(p.scale, acc, to_f32(*w)));
}
#define LK_MERGE(DT, TYPE)                                                                      \
  extern "C" __global__ void __launch_bounds__(256) lk_merge_##DT(LkMergeParams p) {            \
    merge_kernel<TYPE>(p);                                                                      \
  }
LK_FOR_EACH_DTYPE(LK_MERGE)

// =====================================================================================
// Element-wise helpers.
// =====================================================================================
template <typename T>
__device__ __forceinline__ void bias_fill_kernel(const LkBiasFillParams &p) {
  const int64_t total = (int64_t)p.t * p.n;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const T *bias = static_cast<const T *>(p.bias);
  T *y = static_cast<T *>(p.y);
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride)
    y[i] = bias[i % p.n];
}
#define LK_BIAS_FILL(DT, TYPE)                                                                  \
  extern "C" __global__ void __launch_bounds__(256) lk_bias_fill_##DT(LkBiasFillParams p) {     \
    bias_fill_kernel<TYPE>(p);                                                                  \
  }
LK_FOR_EACH_DTYPE(LK_BIAS_FILL)

template <typename T>
__device__ __forceinline__ void mask_kernel(const LkMaskParams &p) {
  // Each thread handles one group of four elements (one Philox call).
  const int64_t total = (int64_t)p.t * p.cols;
  const int64_t groups = (total + 3) >> 2;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  T *data = static_cast<T *>(p.data);
  for (int64_t gi = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; gi < groups; gi += stride) {
    const U32x4 r = philox_group(p.dropout, (uint64_t)gi);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t e = gi * 4 + i;
      if (e < total && (r.v[i] >> 8) < p.dropout.threshold) data[e] = from_f32<T>(0.0f);
    }
  }
}
#define LK_MASK(DT, TYPE)                                                                       \
  extern "C" __global__ void __launch_bounds__(256) lk_dropout_zero_##DT(LkMaskParams p) {      \
    mask_kernel<TYPE>(p);                                                                       \
  }
LK_FOR_EACH_DTYPE(LK_MASK)
