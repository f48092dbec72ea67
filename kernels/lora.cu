// LoRA linear kernels: the small-T fused forward (SIMT here; the tensor-core one is
// lk_small.cuh's, shared with DoRA's fused forward in dora.cu), the skinny low-rank
// products used by the large-T path and by backward, merge/unmerge, and small
// element-wise helpers.
//
// Shapes (row-major): x [T, K], W [N, K], A [r, K], B [N, r], bias [N], y [T, N].
// Accumulation is always f32; inputs and outputs are f32, f16 or bf16.
#include "lk_common.cuh"
#include "lk_mma.cuh"
#include "lk_small.cuh"

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
          while (ld_acquire_gpu(&p.sync[0]) < (uint32_t)a_tasks) __nanosleep(64);
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

// The tensor-core small-T forward (f16 / bf16; lk_small.cuh), one entry per n-tile count.
#define LK_SMALL_MMA(DT, TYPE)                                                                  \
  extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                  \
      lk_lora_small_mma_##DT##_n1(LkSmallFwdParams p) { small_fwd_mma<TYPE, 1>(p); }            \
  extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                  \
      lk_lora_small_mma_##DT##_n2(LkSmallFwdParams p) { small_fwd_mma<TYPE, 2>(p); }            \
  extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                  \
      lk_lora_small_mma_##DT##_n4(LkSmallFwdParams p) { small_fwd_mma<TYPE, 4>(p); }
LK_SMALL_MMA(f16, __half)
LK_SMALL_MMA(bf16, __nv_bfloat16)

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
