// Development harness for the small-T NF4 matmul (in the manner of llm.c's dev/cuda):
// a host reference, every kernel version checked against it, then timed on weights
// rotated past L2, beside two floors measured in the same process: an empty kernel
// (launch cost) and a plain read of the same 4-bit bytes.
//
//   nvcc -std=c++17 -O3 --use_fast_math -gencode=arch=compute_90a,code=sm_90a \
//        -I kernels -o dev/bin/nf4_mm dev/nf4_mm.cu
//   dev/bin/nf4_mm [N] [K]
//
// Not part of the crate's build; the crate's benches (benches/nf4.rs) give the figures
// against cuBLAS.
#include "../kernels/nf4.cu"
#include "dev_common.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

__global__ void empty_kernel(int) {}

// Reads n16 16-byte words once (streaming) and writes one word per block.
__global__ void __launch_bounds__(256) read_kernel(const uint4 *p, int64_t n16, uint32_t *out) {
  uint32_t acc = 0;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += (int64_t)gridDim.x * blockDim.x) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p + i));
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) out[blockIdx.x] = acc;
}

struct Set {
  uint8_t *packed, *q;
};

typedef void (*Kern)(LkNf4MmParams);
struct Variant {
  const char *name;
  Kern k1, k2, k4;  // T <= 8, T <= 16, T <= 32
};

int main(int argc, char **argv) {
  const int N = argc > 1 ? atoi(argv[1]) : 4096;
  const int K = argc > 2 ? atoi(argv[2]) : 4096;
  const int64_t numel = (int64_t)N * K, blocks = numel / 64, groups = (blocks + 255) / 256;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s (%d SMs), N = %d, K = %d, blocksize 64 + double quant\n", prop.name,
         prop.multiProcessorCount, N, K);

  std::mt19937_64 rng(42);
  const HostNf4 h(numel, rng);
  const auto &packed = h.packed, &q = h.q;
  const auto &code2 = h.code2, &absmax2 = h.absmax2;
  const float offset = h.offset;
  std::uniform_real_distribution<float> X(-1.0f, 1.0f);
  std::vector<float> deq(numel);
  for (int64_t e = 0; e < numel; ++e) deq[e] = bf16_round(h.value(e));
  const int TMAX = 32;
  std::vector<float> xf(TMAX * K);
  std::vector<uint16_t> xb(TMAX * K);
  for (int i = 0; i < TMAX * K; ++i) {
    xf[i] = bf16_round(X(rng));
    xb[i] = bf16_bits(xf[i]);
  }

  // Rotation: enough copies of the 4-bit weight to exceed L2 several times.
  const size_t bytes = packed.size() + q.size();
  const int nsets = std::max(2, (int)((200ull << 20) / bytes));
  std::vector<Set> sets(nsets);
  for (auto &s : sets) {
    CK(cudaMalloc(&s.packed, packed.size()));
    CK(cudaMalloc(&s.q, q.size()));
    CK(cudaMemcpy(s.packed, packed.data(), packed.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(s.q, q.data(), q.size(), cudaMemcpyHostToDevice));
  }
  float *d_code2, *d_absmax2;
  void *d_x, *d_y;
  uint32_t *d_sink;
  CK(cudaMalloc(&d_code2, 256 * 4));
  CK(cudaMalloc(&d_absmax2, groups * 4));
  CK(cudaMalloc(&d_x, TMAX * K * 2));
  CK(cudaMalloc(&d_y, (size_t)TMAX * N * 2));
  CK(cudaMalloc(&d_sink, 1 << 20));
  CK(cudaMemcpy(d_code2, code2.data(), 256 * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_absmax2, absmax2.data(), groups * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_x, xb.data(), TMAX * K * 2, cudaMemcpyHostToDevice));

  auto params = [&](const Set &s, int t) {
    LkNf4MmParams p;
    memset(&p, 0, sizeof p);
    p.w = nf4_weight_dq64(s.packed, s.q, d_absmax2, d_code2, offset, N, K);
    p.x = d_x;
    p.y = d_y;
    p.t = t;
    return p;
  };

  std::vector<Variant> variants = {
      {"v3 mma (per-element dequant)", lk_nf4_mm_mma_bf16_n1, lk_nf4_mm_mma_bf16_n2, lk_nf4_mm_mma_bf16_n4},
      {"v4 scale-after, lane table", lk_nf4_mm_sa_bf16_n1, lk_nf4_mm_sa_bf16_n2, lk_nf4_mm_sa_bf16_n4},
  };

  auto time_us = [&](auto &&launch) { return ::time_us(launch, 50, 30); };

  const float t_empty = time_us([&](int) { empty_kernel<<<1, 32>>>(0); });
  const int64_t n16 = (int64_t)packed.size() / 16;
  const float t_read = time_us([&](int i) {
    read_kernel<<<prop.multiProcessorCount * 8, 256>>>((const uint4 *)sets[i % nsets].packed, n16, d_sink);
  });
  printf("floors: empty launch %.2f us; plain read of the %.1f MB of codes %.2f us (%.0f GB/s)\n", t_empty,
         packed.size() / 1e6, t_read, packed.size() / t_read * 1e-3);

  std::vector<uint16_t> yb((size_t)TMAX * N);
  for (int t : {1, 4, 16, 32}) {
    // Reference.
    std::vector<double> ref((size_t)t * N), mag((size_t)t * N);
    for (int tt = 0; tt < t; ++tt)
      for (int n = 0; n < N; ++n) {
        double s = 0, m = 0;
        const float *wr = &deq[(int64_t)n * K];
        const float *xr = &xf[(int64_t)tt * K];
        for (int k = 0; k < K; ++k) {
          s += (double)wr[k] * xr[k];
          m += fabs((double)wr[k] * xr[k]);
        }
        ref[(size_t)tt * N + n] = s;
        mag[(size_t)tt * N + n] = m;
      }
    for (auto &v : variants) {
      Kern k = t <= 8 ? v.k1 : t <= 16 ? v.k2 : v.k4;
      CK(cudaMemset(d_y, 0xff, (size_t)TMAX * N * 2));
      k<<<(N + 15) / 16, 256>>>(params(sets[0], t));
      CK(cudaGetLastError());
      CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(yb.data(), d_y, (size_t)t * N * 2, cudaMemcpyDeviceToHost));
      double worst = 0;
      for (size_t i = 0; i < (size_t)t * N; ++i) {
        uint32_t u = (uint32_t)yb[i] << 16;
        float got;
        memcpy(&got, &u, 4);
        worst = std::max(worst, fabs(got - ref[i]) / (mag[i] + 1e-30));
      }
      const float us = time_us([&](int i) { k<<<(N + 15) / 16, 256>>>(params(sets[i % nsets], t)); });
      printf("T = %2d  %-32s %7.2f us  %6.0f GB/s of NF4  err/mag %.2e %s\n", t, v.name, us, bytes / us * 1e-3,
             worst, worst < 1.0 / 128 ? "ok" : "WRONG");
    }
  }
  return 0;
}
