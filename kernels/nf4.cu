// NF4 (bitsandbytes' format, src/nf4.rs): standalone dequantize, and the small-T fused
// matmul that reads the 4-bit weight once and dequantizes it in registers.
//
// Exactness: every dequantized value is NF4_CODE[c] * absmax as one f32 product
// (__fmul_rn: never contracted into an FMA), and a double-quantized absmax is
// code2[q] * absmax2 + offset as a product then a sum, as bitsandbytes computes them.

#include "lk_common.cuh"
#include "lk_mma.cuh"
#include "lk_nf4.cuh"

namespace {

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

// One 16-byte store, plain or streaming (st.global.cs: evict-first in L2).
__device__ __forceinline__ void store16(void *dst, uint32_t a, uint32_t b, uint32_t c, uint32_t d,
                                        bool streaming) {
  if (streaming) {
    asm volatile("st.global.cs.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(dst), "r"(a), "r"(b), "r"(c),
                 "r"(d)
                 : "memory");
  } else {
    *reinterpret_cast<uint4 *>(dst) = make_uint4(a, b, c, d);
  }
}

template <typename T>
__device__ __forceinline__ void store8(T *out, const float (&v)[8], bool streaming);
template <>
__device__ __forceinline__ void store8<float>(float *out, const float (&v)[8], bool streaming) {
  store16(out, __float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
          __float_as_uint(v[3]), streaming);
  store16(out + 4, __float_as_uint(v[4]), __float_as_uint(v[5]), __float_as_uint(v[6]),
          __float_as_uint(v[7]), streaming);
}
template <typename T>
__device__ __forceinline__ void store8(T *out, const float (&v)[8], bool streaming) {
  auto pair = [&](int i) {
    return lk::f32_to_bits16<T>(v[2 * i]) | (lk::f32_to_bits16<T>(v[2 * i + 1]) << 16);
  };
  store16(out, pair(0), pair(1), pair(2), pair(3), streaming);
}

template <typename T> __device__ void nf4_dequant(const LkNf4DequantParams &p) {
  __shared__ float lut[16];
  load_lut(lut);
  const LkNf4 &w = p.w;
  const int64_t start = p.start, count = p.count;
  T *out = reinterpret_cast<T *>(p.out);
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t pcols = p.pcols;
  // Element i of the output: W's element start + i, or in a column panel the element at
  // panel row i / pcols, column i % pcols (W's row length w.cols).
  // (The host keeps a column panel's count below 2^32, so 32-bit division serves.)
  auto elem = [&](int64_t i) {
    if (pcols == 0) return start + i;
    const uint32_t r = static_cast<uint32_t>(i) / static_cast<uint32_t>(pcols);
    const uint32_t c = static_cast<uint32_t>(i) - r * static_cast<uint32_t>(pcols);
    return start + static_cast<int64_t>(r) * w.cols + c;
  };
  const bool vec = start % 8 == 0 && count % 8 == 0 && (uintptr_t)w.packed % 4 == 0 &&
                   (uintptr_t)p.out % 16 == 0 && (pcols == 0 || (pcols % 8 == 0 && w.cols % 8 == 0));
  const bool streaming = p.streaming != 0;
  if (vec) {
    // 8 elements (one 32-bit word of codes) per thread and step: a warp reads 128
    // consecutive bytes and writes 32 consecutive 8-element groups. A group never
    // crosses an NF4 block (blocksize >= 32, groups start at multiples of 8). With
    // streaming stores and a grid of one group per thread this measured 90–94% of the
    // copy bandwidth on an H100 (dev/nf4_dequant.cu), against 79–82% with plain stores.
    // In a column panel the 8 elements of a group lie in one row (pcols % 8 == 0) and
    // start at a multiple of 8 (start, cols and the column offset are).
    const uint32_t *words = reinterpret_cast<const uint32_t *>(w.packed);
    for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < count / 8; g += stride) {
      const int64_t e = elem(8 * g);
      uint32_t word;
      asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(word) : "l"(words + e / 8));
      float v[8];
      dequant8(lut, word, nf4_absmax(w, e >> w.log2_blocksize), v);
      store8<T>(out + 8 * g, v, streaming);
    }
  } else {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride) {
      const int64_t e = elem(i);
      const uint32_t byte = __ldg(w.packed + (e >> 1));
      const uint32_t c = (e & 1) ? (byte & 15u) : (byte >> 4);
      out[i] = lk::from_f32<T>(__fmul_rn(lut[c], nf4_absmax(w, e >> w.log2_blocksize)));
    }
  }
}

// ---- quantize (bit-exact with bitsandbytes; see src/nf4.rs) -------------------------
// IEEE f32 arithmetic without flushing subnormals, whatever -ftz the file is built
// with: the host oracle (and bitsandbytes) round every step the same way.
__device__ __forceinline__ float mul_ieee(float a, float b) {
  float d;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
__device__ __forceinline__ float add_ieee(float a, float b) {
  float d;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
__device__ __forceinline__ float sub_ieee(float a, float b) {
  float d;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
__device__ __forceinline__ float rcp_ieee(float a) {
  float d;
  asm("rcp.rn.f32 %0, %1;" : "=f"(d) : "f"(a));
  return d;
}
// a > b, IEEE (false when either is NaN; subnormals compared as they are).
__device__ __forceinline__ bool gt_ieee(float a, float b) {
  uint32_t r;
  asm("{ .reg .pred p; setp.gt.f32 p, %1, %2; selp.u32 %0, 1, 0, p; }" : "=r"(r) : "f"(a), "f"(b));
  return r != 0;
}
__device__ __forceinline__ bool lt_ieee(float a, float b) { return gt_ieee(b, a); }
// |v| as bits, or 0 for NaN: the max of these is Rust's fold of f32::max over |v|
// (which skips NaN), and bit order is value order for non-negative floats.
__device__ __forceinline__ uint32_t abs_bits(float v) {
  const uint32_t a = __float_as_uint(v) & 0x7fffffffu;
  return a > 0x7f800000u ? 0u : a;
}

__device__ __forceinline__ uint32_t nf4_code_of(const float (&mid)[15], float x) {
  uint32_t c = 0;
#pragma unroll
  for (int i = 0; i < 15; ++i) c += gt_ieee(x, mid[i]) ? 1u : 0u;
  return c;
}

template <typename T> __device__ void nf4_quant(const LkNf4QuantParams &p) {
  const T *w = reinterpret_cast<const T *>(p.w);
  const int lane = threadIdx.x % 32;
  const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
  const int64_t bs = int64_t(1) << p.log2_blocksize;
  float mid[15];
#pragma unroll
  for (int i = 0; i < 15; ++i) mid[i] = p.mid[i];
  for (int64_t b = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; b < p.blocks; b += warps) {
    const int64_t e0 = b * bs, e1 = min(e0 + bs, p.numel);
    uint32_t m = 0;
    for (int64_t e = e0 + lane; e < e1; e += 32) m = max(m, abs_bits(lk::ldg(w + e)));
    m = __reduce_max_sync(0xffffffffu, m);
    const float am = __uint_as_float(m);
    if (lane == 0) p.absmax[b] = am;
    const float inv = rcp_ieee(am);
    // Lane i writes byte e/2 of elements e = e0 + 2i (high nibble) and e + 1 (low).
    for (int64_t e = e0 + 2 * lane; e < e1; e += 64) {
      const uint32_t hi = nf4_code_of(mid, mul_ieee(lk::ldg(w + e), inv));
      const uint32_t lo = e + 1 < e1 ? nf4_code_of(mid, mul_ieee(lk::ldg(w + e + 1), inv)) : 0u;
      p.packed[e >> 1] = (uint8_t)((hi << 4) | lo);
    }
  }
}

// bitsandbytes' 8-bit blockwise code of x: a 7-step binary search of the 256 ascending
// values from the middle, then the nearer neighbour (see nf4::dynamic_code).
__device__ __forceinline__ uint32_t dynamic_code(const float *code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f, val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (gt_ieee(x, val)) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (gt_ieee(x, val)) {
    const float midv = mul_ieee(add_ieee(upper, val), 0.5f);
    return gt_ieee(x, midv) ? upper_pivot : pivot;
  }
  const float midv = mul_ieee(add_ieee(lower, val), 0.5f);
  return lt_ieee(x, midv) ? lower_pivot : pivot;
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
  // Lane t finishes token t of each row: the bias and (QLoRA) s * sum_j h[t, j] b[n, j].
  const T *h = reinterpret_cast<const T *>(p.h);
  const T *lb = reinterpret_cast<const T *>(p.b);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float mine = 0.0f;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const float v = lk::warp_sum(acc[r][t]);
      if (lane == t) mine = v;
    }
    const int row = row0 + r;
    if (lane < p.t && row < w.rows) {
      if (p.bias) mine += lk::ldg(reinterpret_cast<const T *>(p.bias) + row);
      if (h) {
        float low = 0.0f;
        for (int j = 0; j < p.r; ++j)
          low = fmaf(lk::ldg(h + (int64_t)lane * p.r + j), lk::ldg(lb + (int64_t)row * p.r + j), low);
        mine = fmaf(p.scale, low, mine);
      }
      reinterpret_cast<T *>(p.y)[(int64_t)lane * w.rows + row] = lk::from_f32<T>(mine);
    }
  }
}


// =====================================================================================
// Small-T NF4 matmul on tensor cores (f16 / bf16; K % 32 == 0, x 16-byte aligned, packed
// 8-byte aligned), mma.sync m16n8k16 with W as the A operand.
//
// A block of 8 warps owns 16 rows of W and splits K between its warps in 64-column
// chunks. For a chunk at column c0, lane (g = lane / 4, q = lane % 4) loads 8 bytes of
// codes (16 elements) of row g and of row g + 8 at columns c0 + 16q .. + 15, their block
// scales (one each: 16 aligned elements never cross a block), and 2 x 16 bytes of token
// g (+ 8 per n-tile) of x at the same columns. Byte j of the codes is the element pair
// (2j, 2j + 1), dequantized (code * absmax in f32, as the standalone dequantize) and
// rounded into one operand word; pairs 2s, 2s + 1 of rows g, g + 8 and of x feed mma
// k-step s, the column permutation of the dense small-T kernel (lora.cu), the same for
// both operands, so the dot product is unchanged. The NF4 table (and, with double
// quantization, the nested code table) sits in shared memory; the q and absmax2 loads are
// issued with the codes and resolved at compute time. Partial sums of the 8 warps are
// reduced in shared memory; the bias and the QLoRA term are added by the epilogue.
// =====================================================================================
constexpr int NMMA_WARPS = 8;

__device__ __forceinline__ uint2 ld_stream8(const void *p) {
  uint2 r;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
  return r;
}

// The 8 operand words of 16 codes (bytes 0..7 of c): word j = elements (2j, 2j + 1).
template <typename T>
__device__ __forceinline__ void dequant16(const float *lut, uint2 c, float am, uint32_t (&o)[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t byte = ((j < 4 ? c.x : c.y) >> (8 * (j & 3))) & 0xffu;
    o[j] = lk::pack2<T>(__fmul_rn(lut[byte >> 4], am), __fmul_rn(lut[byte & 15u], am));
  }
}

// The end of a tile of the tensor-core kernels: the 8 warps' partial sums (acc, in the
// m16n8k16 accumulator layout) are reduced through red[], and each thread finishes
// values (slot, l) of the 16 x (8 NT) output tile: bias, the QLoRA term, the store.
template <typename T, int NT>
__device__ __forceinline__ void mm_mma_finish(const LkNf4MmParams &p, float (*red)[NT * 4][32],
                                              const float (&acc)[NT][4], int row0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int N = p.w.rows;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[warp][nt * 4 + c][lane] = acc[nt][c];
  __syncthreads();
  const T *h = reinterpret_cast<const T *>(p.h);
  const T *lb = reinterpret_cast<const T *>(p.b);
  for (int v = threadIdx.x; v < NT * 4 * 32; v += NMMA_WARPS * 32) {
    const int slot = v >> 5, l = v & 31;
    float sum = 0.0f;
#pragma unroll
    for (int wi = 0; wi < NMMA_WARPS; ++wi) sum += red[wi][slot][l];
    const int nt = slot >> 2, c = slot & 3;
    const int row = row0 + (l >> 2) + (c >= 2 ? 8 : 0);
    const int tok = nt * 8 + 2 * (l & 3) + (c & 1);
    if (row >= N || tok >= p.t) continue;
    if (p.bias != nullptr) sum += lk::ldg(reinterpret_cast<const T *>(p.bias) + row);
    if (h != nullptr) {
      float low = 0.0f;
      for (int j = 0; j < p.r; ++j)
        low = fmaf(lk::ldg(h + (int64_t)tok * p.r + j), lk::ldg(lb + (int64_t)row * p.r + j), low);
      sum = fmaf(p.scale, low, sum);
    }
    reinterpret_cast<T *>(p.y)[(int64_t)tok * N + row] = lk::from_f32<T>(sum);
  }
}

// 64-column chunks per register buffer (two buffers): 2, or 1 at NT = 4 (registers).
template <int NT> __host__ __device__ constexpr int nmma_batch() { return NT >= 4 ? 1 : 2; }

template <typename T, int NT> __device__ void nf4_mm_mma(const LkNf4MmParams &p) {
  constexpr int NMMA_BATCH = nmma_batch<NT>();
  __shared__ float lut[16];
  __shared__ float code2[256];
  __shared__ float red[NMMA_WARPS][NT * 4][32];
  const LkNf4 &w = p.w;
  if (threadIdx.x < 16) lut[threadIdx.x] = NF4_CODE[threadIdx.x];
  if (w.absmax == nullptr) code2[threadIdx.x] = __ldg(w.code2 + threadIdx.x);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int K = w.cols, N = w.rows;
  const T *x = reinterpret_cast<const T *>(p.x);
  const T *xrow[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) xrow[nt] = x + (size_t)min(nt * 8 + g, p.t - 1) * K;
  const int chunks = (K + 63) >> 6;
  constexpr int STRIDE = NMMA_WARPS * NMMA_BATCH;

  for (int tile = blockIdx.x; tile < (N + 15) / 16; tile += gridDim.x) {
    const int row0 = tile * 16;
    // Rows past N read row N - 1 (results discarded at the store): no branches.
    const int64_t e_lo = (int64_t)min(row0 + g, N - 1) * K, e_hi = (int64_t)min(row0 + g + 8, N - 1) * K;
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[nt][c] = 0.0f;
    uint2 cl[2][NMMA_BATCH], ch[2][NMMA_BATCH];
    RawScale sl[2][NMMA_BATCH], sh[2][NMMA_BATCH];
    uint4 xv[2][NMMA_BATCH][NT][2];
    auto load = [&](int buf, int ch0) {
#pragma unroll
      for (int u = 0; u < NMMA_BATCH; ++u) {
        const int col = (ch0 + u) * 64 + 16 * q;
        const int c = col < K ? col : 0;  // K % 16 == 0: a lane's 16 columns are all in or out
        cl[buf][u] = ld_stream8(w.packed + ((e_lo + c) >> 1));
        ch[buf][u] = ld_stream8(w.packed + ((e_hi + c) >> 1));
        sl[buf][u] = load_scale(w, (e_lo + c) >> w.log2_blocksize);
        sh[buf][u] = load_scale(w, (e_hi + c) >> w.log2_blocksize);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint4 *xp = reinterpret_cast<const uint4 *>(xrow[nt] + c);
          xv[buf][u][nt][0] = __ldg(xp);
          xv[buf][u][nt][1] = __ldg(xp + 1);
        }
      }
    };
    auto compute = [&](int buf, int ch0) {
#pragma unroll
      for (int u = 0; u < NMMA_BATCH; ++u) {
        const bool in = (ch0 + u) * 64 + 16 * q < K;
        uint32_t wl[8], wh[8];
        dequant16<T>(lut, cl[buf][u], resolve_scale(w, code2, sl[buf][u]), wl);
        dequant16<T>(lut, ch[buf][u], resolve_scale(w, code2, sh[buf][u]), wh);
        if (!in) {
#pragma unroll
          for (int j = 0; j < 8; ++j) wl[j] = wh[j] = 0u;
        }
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          const uint32_t a[4] = {wl[2 * s], wh[2 * s], wl[2 * s + 1], wh[2 * s + 1]};
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const uint4 &v = xv[buf][u][nt][s >> 1];
            const uint32_t b0 = (s & 1) ? v.z : v.x, b1 = (s & 1) ? v.w : v.y;
            lk::MmaOp<T>::run(acc[nt], a, b0, b1);
          }
        }
      }
    };
    lk::double_buffered(warp * NMMA_BATCH, STRIDE, chunks, load, compute);

    mm_mma_finish<T, NT>(p, red, acc, row0);
    __syncthreads();  // red[] is reused by the next tile
  }
}

// =====================================================================================
// Small-T NF4 matmul on tensor cores, the block scale applied after the product
// (f16 / bf16; K % 64 == 0 and blocksize >= 64, so a 64-column chunk of a row lies in one
// NF4 block; x 16-byte aligned, packed 8-byte aligned).
//
// The tiling, loads and operand permutation are those of nf4_mm_mma above. What
// changes is the dequantization: a chunk's codes go into the mma as the code values
// themselves (NF4_CODE rounded to T), so one shared-memory load per byte gives both
// elements' operand word, and the chunk's f32 product is multiplied by the row's block
// scale afterwards (acc += absmax * part). The 256-entry byte table is replicated once
// per lane ([256 bytes][32 lanes] words, 32 KB): lane l reads bank l whatever the byte,
// so a warp's lookups are one conflict-free wavefront. One tile (16 rows) per block;
// the table's memory holds the 8 warps' partial sums at the end.
//
// Rounding: each weight enters the product as round_T(code) * absmax (the block scale in
// f32 after the product) instead of round_T(code * absmax): the same relative error
// bound (half an ulp of T) per element, in a different place.
// =====================================================================================
constexpr int SA_TAB_WORDS = 256 * 32;

template <typename T, int NT> __device__ void nf4_mm_sa(const LkNf4MmParams &p) {
  static_assert(NMMA_WARPS * NT * 4 * 32 <= SA_TAB_WORDS, "red[] must fit in the table");
  constexpr int NMMA_BATCH = nmma_batch<NT>();
  __shared__ uint32_t tab[SA_TAB_WORDS];
  __shared__ float code2[256];
  const LkNf4 &w = p.w;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int K = w.cols, N = w.rows;
  const int row0 = blockIdx.x * 16;
  const T *x = reinterpret_cast<const T *>(p.x);
  const T *xrow[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) xrow[nt] = x + (size_t)min(nt * 8 + g, p.t - 1) * K;
  const int chunks = K >> 6;
  constexpr int STRIDE = NMMA_WARPS * NMMA_BATCH;
  // Rows past N read row N - 1 (results discarded at the store): no branches.
  const int64_t e_lo = (int64_t)min(row0 + g, N - 1) * K, e_hi = (int64_t)min(row0 + g + 8, N - 1) * K;

  uint2 cl[2][NMMA_BATCH], ch[2][NMMA_BATCH];
  RawScale sl[2][NMMA_BATCH], sh[2][NMMA_BATCH];
  uint4 xv[2][NMMA_BATCH][NT][2];
  // x's two 16-byte pieces of token row nt at column c (zero for lanes of no token:
  // their columns of the product are never stored).
  auto load_x = [&](uint4 (&xo)[NT][2], int c) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint4 *xp = reinterpret_cast<const uint4 *>(xrow[nt] + c);
      const bool real = nt * 8 + g < p.t;
      xo[nt][0] = real ? __ldg(xp) : make_uint4(0, 0, 0, 0);
      xo[nt][1] = real ? __ldg(xp + 1) : make_uint4(0, 0, 0, 0);
    }
  };
  auto load = [&](int buf, int ch0) {
#pragma unroll
    for (int u = 0; u < NMMA_BATCH; ++u) {
      const int col = (ch0 + u) * 64 + 16 * q;
      const int c = col < K ? col : 0;  // a chunk is all in or all out (K % 64 == 0)
      cl[buf][u] = ld_stream8(w.packed + ((e_lo + c) >> 1));
      ch[buf][u] = ld_stream8(w.packed + ((e_hi + c) >> 1));
      sl[buf][u] = load_scale(w, (e_lo + c) >> w.log2_blocksize);
      sh[buf][u] = load_scale(w, (e_hi + c) >> w.log2_blocksize);
      load_x(xv[buf][u], c);
    }
  };
  // The first batch is in flight while the tables are built.
  if (warp * NMMA_BATCH < chunks) load(0, warp * NMMA_BATCH);
#pragma unroll 8
  for (int j = 0; j < 32; ++j) {
    const int b = warp + NMMA_WARPS * j;  // uniform in the warp: constant-cache broadcasts
    tab[b * 32 + lane] = lk::pack2<T>(NF4_CODE[b >> 4], NF4_CODE[b & 15]);
  }
  if (w.absmax == nullptr) code2[threadIdx.x] = __ldg(w.code2 + threadIdx.x);
  __syncthreads();

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[nt][c] = 0.0f;
  // Byte j of a lane's 8 code bytes -> its operand word (elements 2j, 2j + 1).
  auto word = [&](uint2 c, int j) {
    const uint32_t byte = ((j < 4 ? c.x : c.y) >> (8 * (j & 3))) & 0xffu;
    return tab[(byte << 5) | lane];
  };
  auto compute = [&](int buf, int ch0) {
#pragma unroll
    for (int u = 0; u < NMMA_BATCH; ++u) {
      if ((ch0 + u) >= chunks) continue;  // uniform in the warp
      float part[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) part[nt][c] = 0.0f;
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const uint32_t a[4] = {word(cl[buf][u], 2 * s), word(ch[buf][u], 2 * s), word(cl[buf][u], 2 * s + 1),
                               word(ch[buf][u], 2 * s + 1)};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint4 &v = xv[buf][u][nt][s >> 1];
          const uint32_t b0 = (s & 1) ? v.z : v.x, b1 = (s & 1) ? v.w : v.y;
          lk::MmaOp<T>::run(part[nt], a, b0, b1);
        }
      }
      const float am_lo = resolve_scale(w, code2, sl[buf][u]);
      const float am_hi = resolve_scale(w, code2, sh[buf][u]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        acc[nt][0] = fmaf(am_lo, part[nt][0], acc[nt][0]);
        acc[nt][1] = fmaf(am_lo, part[nt][1], acc[nt][1]);
        acc[nt][2] = fmaf(am_hi, part[nt][2], acc[nt][2]);
        acc[nt][3] = fmaf(am_hi, part[nt][3], acc[nt][3]);
      }
    }
  };
  // The walk of lk::double_buffered, its first load already issued above.
  int c0 = warp * NMMA_BATCH;
  if (c0 < chunks) {
    for (;;) {
      const int next = c0 + STRIDE;
      if (next >= chunks) {
        compute(0, c0);
        break;
      }
      load(1, next);
      compute(0, c0);
      const int next2 = next + STRIDE;
      if (next2 >= chunks) {
        compute(1, next);
        break;
      }
      load(0, next2);
      compute(1, next);
      c0 = next2;
    }
  }
  __syncthreads();  // every lookup is done: the table's memory takes the partial sums
  mm_mma_finish<T, NT>(p, reinterpret_cast<float(*)[NT * 4][32]>(tab), acc, row0);
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

#define LK_NF4_Q(DT, T)                                                                        \
  extern "C" __global__ void __launch_bounds__(256) lk_nf4_quant_##DT(LkNf4QuantParams p) {     \
    nf4_quant<T>(p);                                                                           \
  }
LK_FOR_EACH_DTYPE(LK_NF4_Q)

extern "C" __global__ void __launch_bounds__(256) lk_nf4_dq_sum(LkNf4DoubleQuantParams p) {
  const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= p.groups) return;
  double s = 0.0;
  for (int64_t i = 256 * g; i < min(256 * g + 256, p.blocks); ++i) s += (double)p.absmax[i];
  p.part[g] = s;
}

extern "C" __global__ void lk_nf4_dq_offset(LkNf4DoubleQuantParams p) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double s = 0.0;
  for (int64_t g = 0; g < p.groups; ++g) s += p.part[g];
  *p.offset = __double2float_rn(__ddiv_rn(s, (double)p.blocks));
}

extern "C" __global__ void __launch_bounds__(256) lk_nf4_dq_quant(LkNf4DoubleQuantParams p) {
  __shared__ float code[256];
  __shared__ uint32_t wmax[8];
  code[threadIdx.x] = p.code[threadIdx.x];
  const int64_t g = blockIdx.x, i = 256 * g + threadIdx.x;
  const float offset = *p.offset;
  const float c = i < p.blocks ? sub_ieee(p.absmax[i], offset) : 0.0f;
  uint32_t m = __reduce_max_sync(0xffffffffu, i < p.blocks ? abs_bits(c) : 0u);
  if (threadIdx.x % 32 == 0) wmax[threadIdx.x / 32] = m;
  __syncthreads();
  m = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) m = max(m, wmax[j]);
  const float am2 = __uint_as_float(m);
  if (threadIdx.x == 0) p.absmax2[g] = am2;
  if (i < p.blocks) p.q[i] = (uint8_t)dynamic_code(code, mul_ieee(c, rcp_ieee(am2)));
}

#define LK_NF4_MMA(DT, T, NT)                                                                  \
  extern "C" __global__ void __launch_bounds__(NMMA_WARPS * 32, 2)                             \
      lk_nf4_mm_mma_##DT##_n##NT(LkNf4MmParams p) {                                            \
    nf4_mm_mma<T, NT>(p);                                                                      \
  }
LK_NF4_MMA(f16, __half, 1)
LK_NF4_MMA(f16, __half, 2)
LK_NF4_MMA(f16, __half, 4)
LK_NF4_MMA(bf16, __nv_bfloat16, 1)
LK_NF4_MMA(bf16, __nv_bfloat16, 2)
LK_NF4_MMA(bf16, __nv_bfloat16, 4)

#define LK_NF4_SA(DT, T, NT)                                                                   \
  extern "C" __global__ void __launch_bounds__(NMMA_WARPS * 32, 2)                             \
      lk_nf4_mm_sa_##DT##_n##NT(LkNf4MmParams p) {                                             \
    nf4_mm_sa<T, NT>(p);                                                                       \
  }
LK_NF4_SA(f16, __half, 1)
LK_NF4_SA(f16, __half, 2)
LK_NF4_SA(f16, __half, 4)
LK_NF4_SA(bf16, __nv_bfloat16, 1)
LK_NF4_SA(bf16, __nv_bfloat16, 2)
LK_NF4_SA(bf16, __nv_bfloat16, 4)

// The GEMM core's NF4 scale table (LkNf4CoreScalesParams): entry (s, n, h) is the
// resolved absmax (double quantization applied, as the dequantize computes it) of the
// block holding element (n, 64 s + 32 h), or 0 past the rows or columns. With
// cols % 32 == 0 and blocksize ≥ 32, each 32-element piece lies in one block, so the core's
// producer needs one scale per piece, here laid out so that a tile's half (consecutive
// rows) of one K-slice is one contiguous bulk copy.
extern "C" __global__ void __launch_bounds__(256) lk_nf4_core_scales(const LkNf4CoreScalesParams p) {
  const int64_t total = static_cast<int64_t>(p.k_steps) * p.n_pad * 2;
  for (int64_t e = blockIdx.x * 256ll + threadIdx.x; e < total; e += gridDim.x * 256ll) {
    const int h = static_cast<int>(e & 1);
    const int64_t rest = e >> 1;
    const int n = static_cast<int>(rest % p.n_pad);
    const int s = static_cast<int>(rest / p.n_pad);
    const int k = 64 * s + 32 * h;
    float v = 0.0f;
    if (n < p.w.rows && k < p.w.cols) {
      v = nf4_absmax(p.w, (static_cast<int64_t>(n) * p.w.cols + k) >> p.w.log2_blocksize);
    }
    p.out[e] = v;
  }
}
