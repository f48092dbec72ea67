/* Launch-parameter structs shared by the CUDA kernels (kernels/*.cu) and the Rust
 * launch layer (src/cuda/bindings.rs is generated from this file by bindgen).
 *
 * Plain C only: fixed-width integers, floats and untyped device pointers. Every
 * pointer is a device address; shapes are in elements; all tensors are row-major and
 * contiguous unless a stride field says otherwise. Element types are chosen by the
 * entry point's suffix (_f32, _f16, _bf16), never stored here. */
#ifndef LK_PARAMS_H
#define LK_PARAMS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Inverted dropout on the LoRA branch's input: element e = t * cols + c of an
 * [rows, cols] tensor is dropped iff (philox4x32_10(seed, offset, e) >> 8) < threshold,
 * where threshold = ceil(p * 2^24); kept elements are multiplied by keep_scale =
 * 1 / (1 - p). threshold == 0 means no dropout. */
typedef struct LkDropout {
  uint64_t seed;
  uint64_t offset;
  uint32_t threshold;
  float keep_scale;
} LkDropout;

/* Small-T fused forward (cooperative launch):
 *   h[t, j] = sum_k drop(x)[t, k] * A[j, k]                   (f32, workspace)
 *   y[t, n] = sum_k x[t, k] * W[n, k] + scale * sum_j h[t, j] * B[n, j] + bias[n] */
typedef struct LkSmallFwdParams {
  const void *x;    /* [t, k] */
  const void *w;    /* [n, k] */
  const void *a;    /* [r, k] */
  const void *b;    /* [n, r] */
  const void *bias; /* [n] or NULL */
  void *y;          /* [t, n] */
  void *h_out;      /* [t, r] in the activation type, or NULL */
  float *h_ws;      /* [t, r] f32 scratch */
  uint32_t *sync;   /* [2] counters: zero on entry, left zero on exit */
  int32_t t, k, n, r;
  float scale;
  LkDropout dropout;
  /* DoRA (lk_lora_dora_small_*; NULL for LoRA): y = (mag[n] / norm[n]) * z + bias[n]
   * with z the LoRA sum above before the bias; norm[n] = ||W_n + scale * (B A)_n||. */
  const void *mag; /* [n] */
  float *norm;     /* [n] f32 out */
  void *z;         /* [t, n] out, or NULL */
} LkSmallFwdParams;

/* Skinny "down" product, contraction over cols, split in chunks of c_chunk columns:
 *   part[s][t * r + j] = sum_{c in chunk s} drop(x)[t, c] * V[j * v_sj + c * v_sc]
 * x is [t, cols] with row stride ldx; part is f32 [splits, t * r] (reduced by
 * LkReduceParams' kernel). With one split and out != NULL, out[t * r + j] =
 * alpha * sum is written directly in the activation type instead (part unused), and
 * out2[t * r + j] = alpha2 * sum as well when out2 != NULL. */
typedef struct LkDownParams {
  const void *x;
  const void *v;
  float *part;
  void *out;
  void *out2;
  float alpha;
  float alpha2;
  int64_t ldx;
  int64_t v_sj, v_sc;
  int32_t t, cols, r, c_chunk;
  LkDropout dropout;
} LkDownParams;

/* Skinny transposed product, contraction over the token axis, split in `splits` chunks:
 *   part[s][c * o_sc + j * o_sj] = sum_{t in chunk s} drop(m)[t, c] * g[t, j]
 * m is [t, cols]; g is [t, r] in the activation type. part is f32 [splits, cols * r]. */
typedef struct LkTnParams {
  const void *m;
  const void *g;
  float *part;
  int64_t o_sc, o_sj;
  int32_t t, cols, r, splits, t_chunk;
  LkDropout dropout;
} LkTnParams;

/* out[i] = alpha * sum_s part[s][i] (cast to the activation type), i < count; also
 * out2[i] = alpha2 * sum when out2 != NULL. */
typedef struct LkReduceParams {
  const float *part;
  void *out;
  void *out2;
  int64_t count;
  int32_t splits;
  float alpha;
  float alpha2;
} LkReduceParams;

/* In place over W [n, k], with P[n, k] = sum_j B[n, j] * A[j, k]:
 *   mode 0 (LoRA merge; unmerge negates scale): W += scale * P
 *   mode 1 (DoRA merge):   W = (mag[n] / norm[n]) * (W + scale * P)
 *   mode 2 (DoRA unmerge): W = W * (norm[n] / mag[n]) - scale * P
 * mag ([n], W's type) and norm ([n], f32) are read in modes 1 and 2 only.
 * Grid (n, ceil(k / 256)), 256 threads, dynamic shared memory r floats. */
typedef struct LkMergeParams {
  void *w;
  const void *a;
  const void *b;
  const void *mag;
  const float *norm;
  int32_t n, k, r;
  float scale;
  int32_t mode;
} LkMergeParams;

/* y[t, n] = bias[n] for every row t. */
typedef struct LkBiasFillParams {
  void *y;
  const void *bias;
  int32_t t, n;
} LkBiasFillParams;

/* In place: data[t, c] = 0 where the dropout mask drops element (t, c). */
typedef struct LkMaskParams {
  void *data;
  int32_t t, cols;
  LkDropout dropout;
} LkMaskParams;

/* ---- NEFTune (kernels/neftune.cu) -------------------------------------------------
 * Integer tensors (ids, attention mask, lengths) are read through an index kind:
 * 0 = u8, 1 = i32, 2 = u32, 3 = i64. Out-of-range values are never used to address
 * memory; they are recorded in `status` (u32 [8], zero when clean):
 *   [0] bad ids count, [1] first recorded position, [2..3] its value (lo, hi as i64);
 *   [4] bad lengths count, [5] first recorded sequence, [6..7] its value. */
#define LK_INDEX_U8 0
#define LK_INDEX_I32 1
#define LK_INDEX_U32 2
#define LK_INDEX_I64 3

/* Sequence length source of the noise magnitude alpha / sqrt(L_b * dim). */
#define LK_LEN_PADDED 0  /* L_b = seq, every position gets noise */
#define LK_LEN_MASK 1    /* L_b = count of nonzero mask[b, :]; noise where mask != 0 */
#define LK_LEN_LENGTHS 2 /* L_b = lengths[b] (0..=seq); noise where t < L_b */

/* out[p, :] = src(p) + noise(p, :) for p = b * seq + t:
 *   src(p) = table[ids[p], :] (gather) or out[p, :] itself (table == NULL: in place);
 *   noise[p, j] = eps(p * dim + j) * alpha / sqrt(L_b * dim) where position p is real,
 *   eps(e) in (-1, 1) from Philox(seed, offset) as src/neftune.rs documents.
 * An out-of-range id writes a zero row. `noise` == 0: plain gather. Each block handles
 * `rows_per_block` (<= 64) positions of one sequence. */
typedef struct LkNeftParams {
  const void *table; /* [vocab, dim] or NULL */
  const void *ids;   /* [batch * seq] of id_kind (unused when table == NULL) */
  void *out;         /* [batch * seq, dim] */
  const void *len;   /* mask [batch, seq] or lengths [batch] of len_kind, or NULL */
  uint32_t *status;  /* [8] */
  int64_t vocab;
  int32_t dim, batch, seq, rows_per_block;
  int32_t id_kind, len_kind, len_mode, noise;
  float alpha;
  uint64_t seed, offset;
} LkNeftParams;

/* Embedding backward, unordered: d_table[ids[p], :] += d_out[p, :] with f32 atomics,
 * positions whose id equals padding_idx (>= 0) skipped. */
typedef struct LkNeftScatterParams {
  const void *ids;   /* [tokens] of id_kind */
  const void *d_out; /* [tokens, dim] */
  float *d_table;    /* [vocab, dim] */
  uint32_t *status;  /* [8] */
  int64_t vocab, padding_idx;
  int32_t tokens, dim, id_kind;
} LkNeftScatterParams;

/* Deterministic embedding backward, step 1: keys[p] = id << 32 | p for valid positions,
 * all ones otherwise (also for the padding p in tokens .. n2). */
typedef struct LkNeftKeysParams {
  const void *ids;
  uint64_t *keys; /* [n2], n2 a power of two >= tokens */
  uint32_t *status;
  int64_t vocab, padding_idx;
  int32_t tokens, n2, id_kind;
} LkNeftKeysParams;

/* Step 2: bitonic sort of keys ascending. k: the merge size of this launch; j: the
 * compare distance of a global step, or 0 for a shared-memory launch that does every
 * step j < 2048 of merge sizes k_lo ..= k (powers of two). */
typedef struct LkNeftSortParams {
  uint64_t *keys;
  int32_t n2, k_lo, k, j;
} LkNeftSortParams;

/* Step 3: for each run of equal ids in the sorted keys, in position order,
 * d_table[id, c] += sum_p d_out[p, c] (f32 sum in position order, added once). */
typedef struct LkNeftSegsumParams {
  const uint64_t *keys;
  const void *d_out;
  float *d_table;
  int32_t n2, dim;
} LkNeftSegsumParams;

/* ---- NF4 (kernels/nf4.cu) --------------------------------------------------------
 * An NF4 weight [rows, cols] in bitsandbytes' layout (src/nf4.rs): packed codes, two per
 * byte, first element in the high nibble, flat over rows * cols; one scale per
 * `blocksize` elements: absmax (f32) or, double-quantized (absmax == NULL),
 * code2[q[b]] * absmax2[b / 256] + offset. */
typedef struct LkNf4 {
  const uint8_t *packed; /* [ceil(rows * cols / 2)] */
  const float *absmax;   /* [blocks] or NULL */
  const uint8_t *q;      /* [blocks] (double quantization) */
  const float *absmax2;  /* [ceil(blocks / 256)] */
  const float *code2;    /* [256] */
  float offset;
  int32_t log2_blocksize;
  int32_t rows, cols;
} LkNf4;

/* out[i] = NF4_CODE[code(e)] * absmax(e / blocksize) for i < count, in out's type, with
 * e = start + i (pcols == 0: a range of the row-major [rows, cols] elements, such as a
 * panel of rows), or e = start + (i / pcols) * cols + i % pcols (pcols > 0: a panel of
 * pcols columns, out [count / pcols, pcols]; count % pcols == 0 and count < 2^32).
 * streaming != 0: the output is stored with st.global.cs (evict-first: the standalone
 * dequantize, whose output is not read back soon); 0: plain stores (a panel the next
 * GEMM reads, which may still find it in L2). */
typedef struct LkNf4DequantParams {
  LkNf4 w;
  void *out;
  int64_t start, count;
  int32_t streaming;
  int32_t pcols;
} LkNf4DequantParams;

/* Small-T NF4 matmul: y[t, n] = sum_k x[t, k] * deq(W)[n, k] (+ bias[n])
 * (+ scale * sum_j h[t, j] * b[n, j], the QLoRA term, when h != NULL), the weight read
 * once and dequantized in registers. Needs cols % 32 == 0 and x 16-byte aligned. */
typedef struct LkNf4MmParams {
  LkNf4 w;
  const void *x;    /* [t, cols] */
  const void *bias; /* [rows] or NULL */
  void *y;          /* [t, rows] */
  const void *h;    /* [t, r] or NULL */
  const void *b;    /* [rows, r] */
  float scale;
  int32_t t, r;
} LkNf4MmParams;

/* NF4 quantize, one warp per NF4 block (grid-stride): absmax[b] = max |w| over the block
 * (NaN ignored), and the codes of its elements (code = the number of midpoints
 * w * (1 / absmax) is strictly greater than; IEEE f32, no flush of subnormals), two per
 * byte, first element in the high nibble; the nibble past an odd numel is 0. */
typedef struct LkNf4QuantParams {
  const void *w;    /* [numel] */
  uint8_t *packed;  /* [ceil(numel / 2)] */
  float *absmax;    /* [blocks] */
  float mid[15];    /* NF4 code midpoints, ascending */
  int64_t numel, blocks;
  int32_t log2_blocksize;
} LkNf4QuantParams;

/* NF4 double quantization of absmax [blocks], in three launches with these params:
 * lk_nf4_dq_sum (one thread per group of 256 blocks: part[g] = the f64 sum of its absmax
 * in order), lk_nf4_dq_offset (one thread: offset = f32(sum of part in order / blocks)),
 * lk_nf4_dq_quant (one block of 256 threads per group: absmax2[g] = max |absmax - offset|,
 * q = bitsandbytes' 8-bit blockwise code of (absmax - offset) * (1 / absmax2[g])). */
typedef struct LkNf4DoubleQuantParams {
  const float *absmax; /* [blocks] */
  const float *code;   /* [256] ascending */
  double *part;        /* [groups] */
  float *offset;       /* [1] */
  uint8_t *q;          /* [blocks] */
  float *absmax2;      /* [groups] */
  int64_t blocks, groups;
} LkNf4DoubleQuantParams;


/* ---- DoRA (kernels/dora.cu) -------------------------------------------------------
 * The DoRA scale of output row n is f[n] = mag[n] / norm[n] - minus_one (minus_one is
 * 0 or 1: the dropout form of peft's formula uses g - 1). */

/* norm[n] = sqrt(sum_k (W[n, k] + scale * sum_j B[n, j] * A[j, k])^2) in f32, from the
 * elements (no expanded square); m_out[n] = norm[n] in W's type when m_out != NULL;
 * g_out[n] = mag[n] / norm[n] (f32, the DoRA scale) when g_out != NULL.
 * Grid ceil(n / 8), 256 threads, dynamic shared memory 8 * r floats. */
typedef struct LkDoraNormParams {
  const void *w;   /* [n, k] */
  const void *a;   /* [r, k] */
  const void *b;   /* [n, r] */
  float *norm;     /* [n] */
  void *m_out;     /* [n] or NULL */
  const void *mag; /* [n] in W's type, read when g_out != NULL */
  float *g_out;    /* [n] or NULL */
  int32_t n, k, r;
  float scale;
} LkDoraNormParams;

/* On a [t, n] tensor y: z_out = y (when z_out != NULL), then y = f[n] * y + bias[n]
 * (bias optional). */
typedef struct LkDoraScaleParams {
  void *y;
  void *z_out;
  const void *bias;
  const void *mag;
  const float *norm;
  int64_t t;
  int32_t n;
  float minus_one;
} LkDoraScaleParams;

/* out[n, j] = f[n] * b[n, j] over [n, r] (minus_one = 0); out may be b. */
typedef struct LkDoraRowScaleParams {
  const void *b;
  void *out;
  const void *mag;
  const float *norm;
  int32_t n, r;
} LkDoraRowScaleParams;

/* Backward over one chunk of t token rows (dy, z and dyf point at the chunk):
 *   dyf[i, n] = dy[i, n] * f[n];   part[blockIdx.y][n] = sum of dy * z over the
 * block's rows (rows_per_block of them). Grid (ceil(n / 256), ceil(t / rows_per_block)). */
typedef struct LkDoraDyzParams {
  const void *dy;
  const void *z;
  void *dyf;
  float *part;
  const void *mag;
  const float *norm;
  int32_t t, n, rows_per_block;
  float minus_one;
} LkDoraDyzParams;

/* dm[n] = (sum_{s < splits} part[s][n]) / norm[n], cast to the activation type. */
typedef struct LkDoraDmParams {
  const float *part;
  const float *norm;
  void *dm;
  int32_t splits, n;
} LkDoraDmParams;

/* Rows t0 .. t0 + t of a dropout-masked [*, cols] tensor: out[i, c] = in[i, c], or 0
 * where element (t0 + i) * cols + c is dropped (in and out point at row t0; in may be
 * out). */
typedef struct LkDoraDropParams {
  const void *in;
  void *out;
  int64_t t0;
  int32_t t, cols;
  LkDropout dropout;
} LkDoraDropParams;


/* Hopper (sm_90a) tensor-core GEMM core, kernels/gemm.cu (lk_gemm_nt_*):
 *   y[t, n] = col_scale[n] * (sum_k x[t, k] * W[n, k] + sum_j u[t, j] * bl[n, j]) + bias[n]
 * x [t, k], W [n, k], u [t, r], bl [n, r] are read through TMA tensor maps passed as
 * separate kernel parameters (not here); this struct holds the epilogue and the tiling.
 * The low-rank sum is present iff low_rank != 0; col_scale and bias are optional (NULL). */
typedef struct LkGemmParams {
  void *y;                /* [t, n] out, the operand type */
  const void *bias;       /* [n] in the operand type, or NULL: added after the scale */
  const float *col_scale; /* [n] f32, or NULL: multiplies the accumulator */
  int32_t t, n;           /* rows of x and y; rows of W = columns of y */
  int32_t k_tiles;        /* ceil(k / 64): K-slices of the mainloop */
  int32_t low_rank;       /* 1: one extra K-slice from the u / bl tensor maps */
  int32_t tiles_m;        /* ceil(t / 128) */
  int32_t tiles_n;        /* ceil(n / tile width), the width 256 or 128 by the kernel */
  void *z;                /* [t, n] in the operand type, or NULL: the accumulator before
                           * the scale and the bias (DoRA's z), written beside y */
  int32_t tma_store;      /* 1: y (and z) written by TMA stores through the y_map / z_map
                           * tensor maps (n % 8 == 0, 16-byte aligned); 0: direct stores */
  /* The lk_gemm_nf4_* entry points (unused, zeroed, by lk_gemm_nt_*): W as NF4 [n, k]
   * (k % 32 == 0), its packed codes read through the w_map tensor map (bytes, box 32 ×
   * tile width / 2 rows) and its block scales through nf4_scales, both dequantized into
   * shared memory by the producer warpgroup. */
  LkNf4 wq;
  const float *nf4_scales; /* [k_tiles][nf4_n_pad][2] f32: the absmax of the block holding
                            * element (n, 64 s + 32 h) at [s][n][h] (lk_nf4_core_scales),
                            * 0 past n or k */
  int32_t nf4_n_pad;        /* n rounded up to a multiple of 256 */
  /* The fused down product (lk_gemm_nt_* only; u_out NULL: off, as in every NF4 launch).
   * Before its tiles, a cluster runs its down-product jobs (the clusters with the fewest
   * tiles take them): job j loads the x tiles of tile rows 2j and 2j + 1 (one per CTA)
   * and A [rank, k] (through the a_map tensor map, box 64 × u_rn, into the stage's W
   * area), accumulates h = x · Aᵀ with m64n{u_rn} wgmmas, writes u_out = u_scale · h and
   * h_out = h, then publishes u_flags[tile row] = u_epoch. Every tile's producer waits
   * for its tile row's flag before it loads the low-rank K-slice (U) through u_map. */
  void *u_out;        /* [t, u_ld] in the operand type: U = u_scale · h, columns < rank */
  void *h_out;        /* [t, rank] in the operand type, or NULL */
  uint32_t *u_flags;  /* [2 · ceil(tiles_m / 2)] words; a word equal to u_epoch means
                       * that tile row's U is written (stale words hold older epochs) */
  float u_scale;      /* s */
  uint32_t u_epoch;   /* this launch's nonzero tag, distinct from the last 2^32 - 1 */
  int32_t u_ld;       /* U's row stride: rank rounded up to 8 */
  int32_t u_rn;       /* 16 or 32: rank rounded up (ranks > 32 keep the down kernel) */
  int32_t rank;       /* 1 ..= u_rn */
} LkGemmParams;

/* The GEMM core's mma.sync kernels for sm_80 .. sm_89 (kernels/gemm.cu, lk_gemm_mma_nt_*),
 * the same product as LkGemmParams' (y = col_scale * (x Wᵀ + u blᵀ) + bias, z = the
 * accumulator) through plain pointers: x [t, k], W [n, k], k % 8 == 0, x and W 16-byte
 * aligned; u [t, ldu] and bl [n, ldb] with columns rank .. round_up(rank, 8) zero, ldu and
 * ldb multiples of 8, both 16-byte aligned (u NULL: no low-rank term); y [t, ldy] and z
 * [t, n], 4-byte aligned. 128 × 128 tiles, grid (ceil(n / 128), ceil(t / 128)). */
typedef struct LkGemmMmaParams {
  const void *x;
  const void *w;
  const void *u;
  const void *bl;
  void *y;
  void *z;
  const void *bias;
  const float *col_scale;
  int32_t t, n, k;
  int32_t rank, ldu, ldb;
  int32_t ldy; /* y's row stride (≥ n; z, when set, has rows of n) */
} LkGemmMmaParams;

/* lk_nf4_core_scales: the GEMM core's NF4 scale table (LkGemmParams.nf4_scales) of w,
 * out [k_steps][n_pad][2] f32, in one grid-stride pass (w.cols % 32 == 0). */
typedef struct LkNf4CoreScalesParams {
  LkNf4 w;
  float *out;
  int32_t k_steps, n_pad;
} LkNf4CoreScalesParams;

/* Column padding of a 16-bit [rows, r] matrix to [rows, rp] (rp = r rounded up to 8,
 * zeros in columns r .. rp), so its rows meet TMA's 16-byte stride rule. */
typedef struct LkGemmPadParams {
  const uint16_t *in; /* [rows, r] */
  uint16_t *out;      /* [rows, rp] */
  int32_t rows, r, rp;
} LkGemmPadParams;

/* Transpose of a 16-bit [rows, cols] matrix into [cols, rows] (the LoRA backward's
 * B [N, r] as Bᵀ [r, N], the K-major operand of the dX core's fused G = s·dY B). */
typedef struct LkTransposeParams {
  const uint16_t *in; /* [rows, cols] */
  uint16_t *out;      /* [cols, rows] */
  int32_t rows, cols;
} LkTransposeParams;

/* ---- AdamW (kernels/adamw.cu) ----------------------------------------------------
 * One launch updates a list of tensors (src/adamw.rs has the math). Each tensor's
 * elements are cut into chunks of LK_ADAMW_CHUNK; the chunks of all tensors are numbered
 * in list order, and work[c] names the tensor of chunk c. Per element, f32, each
 * operation rounded to nearest even (no fused multiply-add but the one of the lerp, no
 * flush of subnormals):
 *   p = p * decay
 *   m = fma(lerp_coeff, g - m, lerp_base_m ? m : g)
 *   v = v * beta2 + (c2 * g) * g
 *   p = p + (neg_step * m) / (sqrt(v) / bc2_sqrt + eps)
 *   copy = p rounded to copy_kind's type (when copy != NULL). */
#define LK_ADAMW_CHUNK 4096
#define LK_ADAMW_COPY_NONE 0
#define LK_ADAMW_COPY_F32 1
#define LK_ADAMW_COPY_F16 2
#define LK_ADAMW_COPY_BF16 3

/* One tensor of the list (a device table, uploaded per launch). */
typedef struct LkAdamwTensor {
  float *param;      /* [len] f32 master weights, updated in place */
  float *m;          /* [len] first moment */
  float *v;          /* [len] second moment */
  const void *grad;  /* [len] in the entry point's type */
  void *copy;        /* [len] in copy_kind's type, or NULL */
  int64_t len;       /* >= 1 */
  int64_t chunk0;    /* the tensor's first chunk */
  float decay;       /* 1 - lr_i * weight_decay, or 1 (no decay) */
  float neg_step;    /* -lr_i / (1 - beta1^t) */
  int32_t copy_kind; /* LK_ADAMW_COPY_* */
  int32_t vec;       /* 1: param, m, v, grad and copy aligned to 4 elements (vector path) */
} LkAdamwTensor;

/* The launch: constants shared by every tensor, and the tables. */
typedef struct LkAdamwParams {
  const LkAdamwTensor *tensors; /* [count] */
  const uint32_t *work;         /* [chunks]: index of chunk c's tensor in tensors */
  int64_t chunks;
  float lerp_coeff;    /* w = 1 - beta1 if w < 0.5, else w - 1 */
  int32_t lerp_base_m; /* 1 if w < 0.5 (m + w (g - m)), else 0 (g + (w - 1) (g - m)) */
  float beta2;
  float c2;            /* 1 - beta2 */
  float bc2_sqrt;      /* sqrt(1 - beta2^t) */
  float eps;
} LkAdamwParams;

#ifdef __cplusplus
}
#endif

#endif /* LK_PARAMS_H */
