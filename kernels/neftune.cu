// NEFTune: embedding gather and uniform noise in one pass, the noise alone in place, and
// the embedding backward (scatter-add into the table's gradient, unordered or
// deterministic). Shapes and the noise formula: kernels/lk_params.h, src/neftune.rs.
//
// Exactness: the CPU oracle (src/cpu/neftune.rs) reproduces every output bit. The
// magnitude alpha / sqrt(L * dim) is computed in f64 (IEEE, unaffected by fast-math),
// eps is an exact f32, and the sum uses fma.rn.f32 written out in PTX so that
// --use_fast_math cannot flush denormal inputs.

#include "lk_common.cuh"

namespace {

constexpr int NEFT_BLOCK = 256;

__device__ __forceinline__ int64_t load_index(const void *p, int kind, int64_t i) {
  switch (kind) {
    case LK_INDEX_U8: return (int64_t)__ldg(reinterpret_cast<const uint8_t *>(p) + i);
    case LK_INDEX_I32: return (int64_t)__ldg(reinterpret_cast<const int32_t *>(p) + i);
    case LK_INDEX_U32: return (int64_t)__ldg(reinterpret_cast<const uint32_t *>(p) + i);
    default: return (int64_t)__ldg(reinterpret_cast<const long long *>(p) + i);
  }
}

// Records a bad value in status[slot .. slot + 4) (slot 0: ids, slot 4: lengths).
__device__ __forceinline__ void record_bad(uint32_t *status, int slot, int64_t where, int64_t v) {
  if (atomicAdd(status + slot, 1u) == 0) {
    status[slot + 1] = (uint32_t)where;
    status[slot + 2] = (uint32_t)(uint64_t)v;
    status[slot + 3] = (uint32_t)((uint64_t)v >> 32);
  }
}

__device__ __forceinline__ float fma_exact(float a, float b, float c) {
  float d;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c));
  return d;
}

// ---- the noise of one element ----------------------------------------------------
// f32 tables: element e takes 24 bits of word e & 3 of Philox group e >> 2:
//   eps = (2 * (w >> 8) + 1 - 2^24) * 2^-24.
// f16/bf16 tables: element e takes 16-bit half e & 1 (low half first) of word
//   (e >> 1) & 3 of group e >> 3: eps = (2 * h + 1 - 2^16) * 2^-16, still finer than the
//   output's own precision. Either way 16 bytes of output use exactly one Philox block.
__device__ __forceinline__ float eps24(uint32_t w) {
  return (float)((int32_t)(2u * (w >> 8) + 1u) - (1 << 24)) * 5.9604644775390625e-8f;
}
__device__ __forceinline__ float eps16(uint32_t h) {
  return (float)((int32_t)(2u * (h & 0xffffu) + 1u) - (1 << 16)) * 1.52587890625e-5f;
}

// Elements per Philox block: 4 (f32) or 8 (16-bit types), i.e. 16 bytes either way.
template <typename T> struct PerGroup {
  static constexpr int N = 16 / sizeof(T);
};

__device__ __forceinline__ void set_word(uint4 &r, int i, uint32_t v) {
  if (i == 0) r.x = v; else if (i == 1) r.y = v; else if (i == 2) r.z = v; else r.w = v;
}

// eps of element e (any alignment).
template <typename T> __device__ __forceinline__ float eps_of(uint64_t seed, uint64_t offset,
                                                             uint64_t e) {
  constexpr int N = PerGroup<T>::N;
  const lk::U32x4 r = lk::philox_block(seed, offset, e / N);
  const int k = (int)(e % N);
  if constexpr (N == 4) {
    return eps24(lk::word_of(r, k));
  } else {
    const uint32_t w = lk::word_of(r, k >> 1);
    return eps16((k & 1) ? (w >> 16) : w);
  }
}

// Adds the noise to 16 bytes of elements: Philox group `group` covers exactly them.
template <typename T>
__device__ __forceinline__ uint4 add_noise16(uint4 raw, float mag, uint64_t seed, uint64_t offset,
                                             uint64_t group) {
  const lk::U32x4 r = lk::philox_block(seed, offset, group);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t w = lk::word_of(raw, i);
    if constexpr (PerGroup<T>::N == 4) {
      set_word(raw, i, __float_as_uint(fma_exact(eps24(r.v[i]), mag, __uint_as_float(w))));
    } else {
      const float lo = fma_exact(eps16(r.v[i]), mag, lk::bits16_to_f32<T>(w & 0xffffu));
      const float hi = fma_exact(eps16(r.v[i] >> 16), mag, lk::bits16_to_f32<T>(w >> 16));
      set_word(raw, i, lk::f32_to_bits16<T>(lo) | (lk::f32_to_bits16<T>(hi) << 16));
    }
  }
  return raw;
}

__device__ __forceinline__ float magnitude(float alpha, int64_t len, int dim) {
  return len > 0 ? (float)((double)alpha / sqrt((double)len * (double)dim)) : 0.0f;
}

// Writes this warp's part of L_b for the block's sequence b to s_part[warp] (summed
// after a barrier): the mask row's nonzero count, lengths[b] (-1 if out of range,
// reported once), or seq.
__device__ __forceinline__ void seq_len_part(const LkNeftParams &p, int b, int t0, int *s_part) {
  if (p.len_mode == LK_LEN_MASK) {
    int count = 0;
    for (int t = threadIdx.x; t < p.seq; t += NEFT_BLOCK)
      count += load_index(p.len, p.len_kind, (int64_t)b * p.seq + t) != 0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) count += __shfl_xor_sync(0xffffffffu, count, o);
    if ((threadIdx.x & 31) == 0) s_part[threadIdx.x / 32] = count;
  } else if ((threadIdx.x & 31) == 0) {
    int64_t len = 0;
    if (threadIdx.x == 0) {
      len = p.seq;
      if (p.len_mode == LK_LEN_LENGTHS) {
        len = load_index(p.len, p.len_kind, b);
        if (len < 0 || len > p.seq) {
          if (t0 == 0) record_bad(p.status, 4, b, len);
          len = -1;  // invalid: no noise for this sequence
        }
      }
    }
    s_part[threadIdx.x / 32] = (int)len;
  }
}

// Each block handles `rows_per_block` positions of one sequence. In one round trip it
// stages the rows' sources (ids) and mask flags in shared memory and finds L_b (counting
// the mask row in mask mode); then the rows stream through registers with 16-byte loads,
// the noise added there. Rows that are not 16-byte aligned take the per-element path.
template <typename T> __device__ void neft_embed(const LkNeftParams &p) {
  __shared__ int64_t s_src[64];  // source row (table row, or -1: zero row), per position
  __shared__ bool s_flag[64];    // position may get noise (mask != 0), per position
  __shared__ int s_part[NEFT_BLOCK / 32];  // parts of L_b, one per warp

  const int blocks_per_seq = (p.seq + p.rows_per_block - 1) / p.rows_per_block;
  const int b = blockIdx.x / blocks_per_seq;
  const int t0 = (blockIdx.x % blocks_per_seq) * p.rows_per_block;
  const int rows = min(p.rows_per_block, p.seq - t0);
  const int64_t row0 = (int64_t)b * p.seq + t0;
  const bool gather = p.table != nullptr;
  const bool noise = p.noise != 0;

  if (noise) seq_len_part(p, b, t0, s_part);
  for (int i = threadIdx.x; i < rows; i += NEFT_BLOCK) {
    const int64_t pos = row0 + i;
    int64_t src = pos;
    if (gather) {
      const int64_t id = load_index(p.ids, p.id_kind, pos);
      if (id < 0 || id >= p.vocab) {
        record_bad(p.status, 0, pos, id);
        src = -1;
      } else {
        src = id;
      }
    }
    s_src[i] = src;
    s_flag[i] = !(noise && p.len_mode == LK_LEN_MASK) || load_index(p.len, p.len_kind, pos) != 0;
  }
  __syncthreads();

  const char *base = reinterpret_cast<const char *>(gather ? p.table : p.out);
  char *out = reinterpret_cast<char *>(p.out);
  const int64_t row_bytes = (int64_t)p.dim * sizeof(T);
  constexpr int VEC = PerGroup<T>::N;
  const bool vec = (row_bytes % 16 == 0) && ((uintptr_t)base % 16 == 0) && ((uintptr_t)p.out % 16 == 0);
  int len = 0;
  if (noise) {
#pragma unroll
    for (int w = 0; w < NEFT_BLOCK / 32; ++w) len += s_part[w];
  }
  const float mag = noise ? magnitude(p.alpha, len, p.dim) : 0.0f;
  // Magnitude of position t0 + r.
  auto mag_of = [&](int r, int len, float mag) {
    if (!s_flag[r] || s_src[r] < 0) return 0.0f;
    if (p.len_mode == LK_LEN_LENGTHS && t0 + r >= len) return 0.0f;
    return mag;
  };

  if (vec) {
    const int per_row = p.dim / VEC;
    const int total = rows * per_row;
    // i / per_row as a multiply-high by ceil(2^32 / per_row), corrected by at most one
    // (per_row == 1, whose magic would not fit, is the identity).
    const uint32_t magic = per_row == 1 ? 0u : (uint32_t)((0x100000000ull + per_row - 1) / per_row);
    auto row_of = [&](int i) {
      if (per_row == 1) return i;
      const int r = (int)__umulhi((uint32_t)i, magic);
      return r * per_row > i ? r - 1 : r;
    };
    constexpr int U = 4;
    uint4 v[U];
    auto load = [&](int i0) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = i0 + u * NEFT_BLOCK;
        v[u] = make_uint4(0, 0, 0, 0);
        if (i < total) {
          const int r = row_of(i), c = i - r * per_row;
          const int64_t src = s_src[r];
          if (src >= 0) {
            const uint4 *q = reinterpret_cast<const uint4 *>(base + src * row_bytes) + c;
            v[u] = gather ? lk::ld_stream16(q) : *q;
          }
        }
      }
    };
    for (int i0 = threadIdx.x; i0 < total; i0 += NEFT_BLOCK * U) {
      load(i0);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = i0 + u * NEFT_BLOCK;
        if (i < total) {
          const int r = row_of(i), c = i - r * per_row;
          const float m = mag_of(r, len, mag);
          uint4 o = v[u];
          if (m != 0.0f)
            o = add_noise16<T>(o, m, p.seed, p.offset, ((uint64_t)(row0 + r) * p.dim) / VEC + c);
          reinterpret_cast<uint4 *>(out + (row0 + r) * row_bytes)[c] = o;
        }
      }
    }
  } else {
    const int64_t total = (int64_t)rows * p.dim;
    for (int64_t i = threadIdx.x; i < total; i += NEFT_BLOCK) {
      const int r = (int)(i / p.dim);
      const int c = (int)(i - (int64_t)r * p.dim);
      const int64_t src = s_src[r];
      T v = lk::from_f32<T>(0.0f);
      if (src >= 0) {
        v = reinterpret_cast<const T *>(base + src * row_bytes)[c];
        const float m = mag_of(r, len, mag);
        if (m != 0.0f) {
          const uint64_t e = (uint64_t)(row0 + r) * p.dim + c;
          v = lk::from_f32<T>(fma_exact(eps_of<T>(p.seed, p.offset, e), m, lk::to_f32(v)));
        }
      }
      reinterpret_cast<T *>(out + (row0 + r) * row_bytes)[c] = v;
    }
  }
}

template <typename T> __device__ void neft_scatter(const LkNeftScatterParams &p) {
  // grid: (tokens, ceil(dim / (NEFT_BLOCK * 4)))
  const int64_t pos = blockIdx.x;
  const int64_t id = load_index(p.ids, p.id_kind, pos);
  if (id < 0 || id >= p.vocab) {
    if (blockIdx.y == 0 && threadIdx.x == 0) record_bad(p.status, 0, pos, id);
    return;
  }
  if (id == p.padding_idx) return;
  const T *src = reinterpret_cast<const T *>(p.d_out) + pos * p.dim;
  float *dst = p.d_table + id * p.dim;
  const int c0 = blockIdx.y * NEFT_BLOCK * 4 + threadIdx.x;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int c = c0 + u * NEFT_BLOCK;
    if (c < p.dim) atomicAdd(dst + c, lk::to_f32(src[c]));
  }
}

template <typename T> __device__ void neft_segsum(const LkNeftSegsumParams &p) {
  // grid: (n2, ceil(dim / NEFT_BLOCK)); block i is active iff it heads a run of ids.
  const int i = blockIdx.x;
  const uint64_t key = p.keys[i];
  if (key == ~0ull) return;
  const uint64_t id = key >> 32;
  if (i > 0 && (p.keys[i - 1] >> 32) == id) return;
  const int c = blockIdx.y * NEFT_BLOCK + threadIdx.x;
  if (c >= p.dim) return;
  const T *d_out = reinterpret_cast<const T *>(p.d_out);
  float acc = 0.0f;
  int j = i;
  constexpr int U = 8;
  while (true) {
    // Load up to U rows of the run, then add them in order.
    float v[U];
    int n = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      v[u] = 0.0f;
      if (j + u < p.n2) {
        const uint64_t k = p.keys[j + u];
        if (k != ~0ull && (k >> 32) == id) {
          v[u] = lk::to_f32(d_out[(int64_t)(uint32_t)k * p.dim + c]);
          n = u + 1;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (u < n) acc = __fadd_rn(acc, v[u]);
    j += n;
    if (n < U) break;
  }
  float *dst = p.d_table + id * (uint64_t)p.dim + c;
  *dst = __fadd_rn(*dst, acc);
}

}  // namespace

#define LK_NEFT_ENTRY(NAME, DT, T)                                                             \
  extern "C" __global__ void __launch_bounds__(NEFT_BLOCK) lk_neft_embed_##DT(LkNeftParams p) { \
    neft_embed<T>(p);                                                                          \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(NEFT_BLOCK)                                     \
      lk_neft_scatter_##DT(LkNeftScatterParams p) {                                            \
    neft_scatter<T>(p);                                                                        \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(NEFT_BLOCK)                                     \
      lk_neft_segsum_##DT(LkNeftSegsumParams p) {                                              \
    neft_segsum<T>(p);                                                                         \
  }
#define LK_NEFT_DT(DT, T) LK_NEFT_ENTRY(, DT, T)
LK_FOR_EACH_DTYPE(LK_NEFT_DT)

extern "C" __global__ void __launch_bounds__(NEFT_BLOCK) lk_neft_keys(LkNeftKeysParams p) {
  const int64_t i = (int64_t)blockIdx.x * NEFT_BLOCK + threadIdx.x;
  if (i >= p.n2) return;
  uint64_t key = ~0ull;
  if (i < p.tokens) {
    const int64_t id = load_index(p.ids, p.id_kind, i);
    if (id < 0 || id >= p.vocab) {
      record_bad(p.status, 0, i, id);
    } else if (id != p.padding_idx) {
      key = ((uint64_t)id << 32) | (uint64_t)i;
    }
  }
  p.keys[i] = key;
}

// Global bitonic step: compare-exchange at distance j within merges of size k.
extern "C" __global__ void __launch_bounds__(NEFT_BLOCK) lk_neft_sort_global(LkNeftSortParams p) {
  const int i = blockIdx.x * NEFT_BLOCK + threadIdx.x;
  if (i >= p.n2) return;
  const int l = i ^ p.j;
  if (l <= i) return;
  const uint64_t a = p.keys[i], b = p.keys[l];
  const bool up = (i & p.k) == 0;
  if ((a > b) == up) {
    p.keys[i] = b;
    p.keys[l] = a;
  }
}

// Shared-memory bitonic steps: each block of 1024 threads owns 2048 consecutive keys and
// runs every step j <= 1024 of the merge sizes k_lo ..= k.
extern "C" __global__ void __launch_bounds__(1024) lk_neft_sort_local(LkNeftSortParams p) {
  __shared__ uint64_t s[2048];
  const int base = blockIdx.x * 2048;
  const int n = min(2048, p.n2);
  for (int i = threadIdx.x; i < n; i += 1024) s[i] = p.keys[base + i];
  __syncthreads();
  for (int k = p.k_lo; k <= p.k; k <<= 1) {
    for (int j = min(k >> 1, 1024); j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < n; i += 1024) {
        const int l = i ^ j;
        if (l > i) {
          const uint64_t a = s[i], b = s[l];
          const bool up = ((base + i) & k) == 0;
          if ((a > b) == up) {
            s[i] = b;
            s[l] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < n; i += 1024) p.keys[base + i] = s[i];
}
