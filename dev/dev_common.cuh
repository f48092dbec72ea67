// Shared pieces of the development harnesses in dev/ (not part of the crate's build):
// error checks, the NF4 code table and bf16 rounding for the host references, and the
// CUDA-event timer.
#ifndef LK_DEV_COMMON_CUH
#define LK_DEV_COMMON_CUH

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#define CK(x)                                                                            \
  do {                                                                                   \
    cudaError_t e_ = (x);                                                                \
    if (e_ != cudaSuccess) {                                                             \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      exit(1);                                                                           \
    }                                                                                    \
  } while (0)

static const float CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// Round to nearest even bf16, as a float.
static float bf16_round(float v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  memcpy(&v, &u, 4);
  return v;
}
static uint16_t bf16_bits(float v) {
  uint32_t u;
  float r = bf16_round(v);
  memcpy(&u, &r, 4);
  return (uint16_t)(u >> 16);
}

// A random blocksize-64, double-quantized NF4 weight of numel elements on the host:
// random codes and nested codes, a linear nested map, absmax2 in [0.005, 0.015).
struct HostNf4 {
  std::vector<uint8_t> packed, q;
  std::vector<float> code2, absmax2;
  float offset = 0.02f;
  explicit HostNf4(int64_t numel, std::mt19937_64 &rng)
      : packed(numel / 2), q(numel / 64), code2(256), absmax2((numel / 64 + 255) / 256) {
    for (auto &b : packed) b = (uint8_t)rng();
    for (auto &b : q) b = (uint8_t)rng();
    for (int i = 0; i < 256; ++i) code2[i] = -1.0f + 2.0f * i / 255.0f;
    std::uniform_real_distribution<float> u(0.5f, 1.5f);
    for (auto &a : absmax2) a = 0.01f * u(rng);
  }
  // Element e dequantized in f32, as the kernels compute it (before rounding to T).
  float value(int64_t e) const {
    const int64_t b = e / 64;
    const float am = code2[q[b]] * absmax2[b / 256] + offset;
    const uint8_t byte = packed[e / 2];
    const int c = (e & 1) ? (byte & 15) : (byte >> 4);
    return CODE[c] * am;
  }
};

// A blocksize-64, double-quantized NF4 weight [n, k] on the device (LkNf4, from
// lk_params.h, which the including harness brings in with the kernels).
static LkNf4 nf4_weight_dq64(const uint8_t *packed, const uint8_t *q, const float *absmax2,
                             const float *code2, float offset, int n, int k) {
  LkNf4 w;
  memset(&w, 0, sizeof w);
  w.packed = packed;
  w.absmax = nullptr;
  w.q = q;
  w.absmax2 = absmax2;
  w.code2 = code2;
  w.offset = offset;
  w.log2_blocksize = 6;
  w.rows = n;
  w.cols = k;
  return w;
}

// The median µs per launch of `samples` CUDA-event-timed batches of `batch` launches
// (after 10 warm-up launches); launch(i) gets a running index (for rotating inputs).
template <typename F>
float time_us(F &&launch, int batch, int samples) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int i = 0; i < 10; ++i) launch(i);
  CK(cudaDeviceSynchronize());
  std::vector<float> v;
  for (int s = 0; s < samples; ++s) {
    CK(cudaEventRecord(e0));
    for (int i = 0; i < batch; ++i) launch(s * batch + i);
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    v.push_back(ms * 1000.0f / batch);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

#endif  // LK_DEV_COMMON_CUH
