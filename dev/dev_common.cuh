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
