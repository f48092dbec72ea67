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
} LkSmallFwdParams;

/* Skinny "down" product, contraction over cols, split in chunks of c_chunk columns:
 *   part[s][t * r + j] = sum_{c in chunk s} drop(x)[t, c] * V[j * v_sj + c * v_sc]
 * x is [t, cols] with row stride ldx; part is f32 [splits, t * r] (reduced by
 * LkReduceParams' kernel). With one split and out != NULL, out[t * r + j] =
 * alpha * sum is written directly in the activation type instead (part unused). */
typedef struct LkDownParams {
  const void *x;
  const void *v;
  float *part;
  void *out;
  float alpha;
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

/* out[i] = alpha * sum_s part[s][i] (cast to the activation type), i < count. */
typedef struct LkReduceParams {
  const float *part;
  void *out;
  int64_t count;
  int32_t splits;
  float alpha;
} LkReduceParams;

/* W[n, k] += scale * sum_j B[n, j] * A[j, k], in place (unmerge: scale negated). */
typedef struct LkMergeParams {
  void *w;
  const void *a;
  const void *b;
  int32_t n, k, r;
  float scale;
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

#ifdef __cplusplus
}
#endif

#endif /* LK_PARAMS_H */
