// Development harness for the standalone NF4 dequantize to bf16 (in the manner of
// llm.c's dev/cuda): every version checked bit for bit against a host reference, then
// timed on weights and outputs rotated past L2 beside the crate's baseline measured in
// the same process, a device-to-device copy of the output's bytes (copy bandwidth:
// read + write bytes / time).
//
//   nvcc -std=c++17 -O3 --use_fast_math -gencode=arch=compute_90a,code=sm_90a \
//        -I kernels -o dev/bin/nf4_dequant dev/nf4_dequant.cu
//   dev/bin/nf4_dequant [N] [K]
//
// Not part of the crate's build; benches/nf4.rs gives the crate's figures.
#include "../kernels/nf4.cu"
#include "dev_common.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

// v3: G groups of 8 elements per thread and step, G consecutive 32-bit words of codes
// (one 4G-byte load) and G consecutive 16-byte stores; STREAM: st.global.cs.
template <int G, bool STREAM>
__global__ void __launch_bounds__(256) deq_v3(const LkNf4DequantParams p) {
  __shared__ float lut[16];
  load_lut(lut);
  const LkNf4 &w = p.w;
  const int64_t units = p.count / (8 * G);
  uint4 *out = reinterpret_cast<uint4 *>(p.out);
  for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < units;
       u += (int64_t)gridDim.x * blockDim.x) {
    uint32_t word[G];
    if constexpr (G == 1) {
      asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(word[0]) : "l"(w.packed + 4 * u));
    } else if constexpr (G == 2) {
      asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];"
          : "=r"(word[0]), "=r"(word[1])
          : "l"(w.packed + 8 * u));
    } else {
      asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
          : "=r"(word[0]), "=r"(word[1]), "=r"(word[2]), "=r"(word[3])
          : "l"(w.packed + 16 * u));
    }
    // One scale per unit when a unit lies in one block (8G <= blocksize).
    const float am = nf4_absmax(w, (8 * G * u) >> w.log2_blocksize);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float v[8];
      dequant8(lut, word[g], am, v);
      uint32_t o[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        o[i] = lk::f32_to_bits16<__nv_bfloat16>(v[2 * i]) |
               (lk::f32_to_bits16<__nv_bfloat16>(v[2 * i + 1]) << 16);
      uint4 *dst = out + G * u + g;
      if constexpr (STREAM) {
        asm volatile("st.global.cs.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(dst), "r"(o[0]), "r"(o[1]),
                     "r"(o[2]), "r"(o[3])
                     : "memory");
      } else {
        *dst = make_uint4(o[0], o[1], o[2], o[3]);
      }
    }
  }
}

// v4: as v3 with G = 1, but each thread takes U units in flight (loads of all first),
// units strided by the grid so a warp's loads and stores stay contiguous.
template <int U, bool STREAM>
__global__ void __launch_bounds__(256) deq_v4(const LkNf4DequantParams p) {
  __shared__ float lut[16];
  load_lut(lut);
  const LkNf4 &w = p.w;
  const int64_t units = p.count / 8;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  uint4 *out = reinterpret_cast<uint4 *>(p.out);
  const uint32_t *words = reinterpret_cast<const uint32_t *>(w.packed);
  for (int64_t u0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u0 < units; u0 += U * stride) {
    uint32_t word[U];
    float am[U];
#pragma unroll
    for (int j = 0; j < U; ++j) {
      const int64_t u = u0 + j * stride;
      if (u < units) {
        asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(word[j]) : "l"(words + u));
        am[j] = nf4_absmax(w, (8 * u) >> w.log2_blocksize);
      }
    }
#pragma unroll
    for (int j = 0; j < U; ++j) {
      const int64_t u = u0 + j * stride;
      if (u < units) {
        float v[8];
        dequant8(lut, word[j], am[j], v);
        uint32_t o[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
          o[i] = lk::f32_to_bits16<__nv_bfloat16>(v[2 * i]) |
                 (lk::f32_to_bits16<__nv_bfloat16>(v[2 * i + 1]) << 16);
        if constexpr (STREAM) {
          asm volatile("st.global.cs.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(out + u), "r"(o[0]),
                       "r"(o[1]), "r"(o[2]), "r"(o[3])
                       : "memory");
        } else {
          out[u] = make_uint4(o[0], o[1], o[2], o[3]);
        }
      }
    }
  }
}

struct Set {
  uint8_t *packed, *q;
  uint16_t *dense, *out;
};

int main(int argc, char **argv) {
  const int N = argc > 1 ? atoi(argv[1]) : 4096;
  const int K = argc > 2 ? atoi(argv[2]) : 4096;
  const int64_t numel = (int64_t)N * K, blocks = numel / 64, groups = (blocks + 255) / 256;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  printf("device: %s (%d SMs), N = %d, K = %d, blocksize 64 + double quant -> bf16\n", prop.name,
         sms, N, K);

  std::mt19937_64 rng(42);
  const HostNf4 h(numel, rng);
  const auto &packed = h.packed, &q = h.q;
  const auto &code2 = h.code2, &absmax2 = h.absmax2;
  const float offset = h.offset;
  std::vector<uint16_t> ref(numel);
  for (int64_t e = 0; e < numel; ++e) ref[e] = bf16_bits(h.value(e));

  const size_t set_bytes = packed.size() + q.size() + 4 * numel;
  const int nsets = std::max(2, (int)((1200ull << 20) / set_bytes));
  std::vector<Set> sets(nsets);
  for (auto &s : sets) {
    CK(cudaMalloc(&s.packed, packed.size()));
    CK(cudaMalloc(&s.q, q.size()));
    CK(cudaMalloc(&s.dense, 2 * numel));
    CK(cudaMalloc(&s.out, 2 * numel));
    CK(cudaMemcpy(s.packed, packed.data(), packed.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(s.q, q.data(), q.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(s.dense, ref.data(), 2 * numel, cudaMemcpyHostToDevice));
  }
  float *d_code2, *d_absmax2;
  CK(cudaMalloc(&d_code2, 256 * 4));
  CK(cudaMalloc(&d_absmax2, groups * 4));
  CK(cudaMemcpy(d_code2, code2.data(), 256 * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_absmax2, absmax2.data(), groups * 4, cudaMemcpyHostToDevice));
  auto params = [&](const Set &s, int streaming) {
    LkNf4DequantParams p;
    memset(&p, 0, sizeof p);
    p.w = nf4_weight_dq64(s.packed, s.q, d_absmax2, d_code2, offset, N, K);
    p.out = s.out;
    p.start = 0;
    p.count = numel;
    p.streaming = streaming;
    return p;
  };

  auto time_us = [&](auto &&launch) { return ::time_us(launch, 20, 31); };

  const double copy_bytes = 4.0 * numel, deq_bytes = packed.size() + q.size() + 2.0 * numel;
  auto copy = [&](int i) {
    const Set &s = sets[i % nsets];
    CK(cudaMemcpyAsync(s.out, s.dense, 2 * numel, cudaMemcpyDeviceToDevice));
  };
  typedef void (*Kern)(LkNf4DequantParams);
  struct V {
    const char *name;
    Kern k;
    int64_t grid;
    int streaming;  // the crate kernel's flag (the others ignore it)
  };
  const int64_t g8 = (numel / 8 + 255) / 256;
  const std::vector<V> vs = {
      {"v2 plain stores, <= 8 blocks/SM (panels)", lk_nf4_dequant_bf16,
       std::min<int64_t>((numel / 32 + 255) / 256, 8 * sms), 0},
      {"v2 plain stores, 1 group/thread", lk_nf4_dequant_bf16, g8, 0},
      {"crate: streaming, 1 group/thread", lk_nf4_dequant_bf16, g8, 1},
      {"v3 G=1 st.cs, 1 group/thread", deq_v3<1, true>, g8, 0},
      {"v3 G=2, 1 unit/thread", deq_v3<2, false>, (g8 + 1) / 2, 0},
      {"v3 G=2 st.cs, 1 unit/thread", deq_v3<2, true>, (g8 + 1) / 2, 0},
      {"v3 G=4, 1 unit/thread", deq_v3<4, false>, (g8 + 3) / 4, 0},
      {"v3 G=2, 16/SM", deq_v3<2, false>, 16 * sms, 0},
      {"v4 U=2, 2 units/thread", deq_v4<2, false>, (g8 + 1) / 2, 0},
      {"v4 U=4, 4 units/thread", deq_v4<4, false>, (g8 + 3) / 4, 0},
      {"v4 U=4 st.cs", deq_v4<4, true>, (g8 + 3) / 4, 0},
      {"v4 U=2, 8/SM", deq_v4<2, false>, 8 * sms, 0},
  };
  std::vector<uint16_t> got(numel);
  for (int rep = 0; rep < 2; ++rep) {
    const float t_copy = time_us(copy);
    printf("copy of the output's bytes: %.2f us, %.0f GB/s\n", t_copy, copy_bytes / t_copy * 1e-3);
    for (const V &v : vs) {
      CK(cudaMemset(sets[0].out, 0xff, 2 * numel));
      v.k<<<(unsigned)v.grid, 256>>>(params(sets[0], v.streaming));
      CK(cudaGetLastError());
      CK(cudaMemcpy(got.data(), sets[0].out, 2 * numel, cudaMemcpyDeviceToHost));
      const bool ok = memcmp(got.data(), ref.data(), 2 * numel) == 0;
      const float t = time_us([&](int i) { v.k<<<(unsigned)v.grid, 256>>>(params(sets[i % nsets], v.streaming)); });
      const float tc = time_us(copy);
      const double bw = deq_bytes / t * 1e-3, cbw = copy_bytes / tc * 1e-3;
      printf("  %-40s %s %7.2f us %6.0f GB/s = %5.1f%% of copy (%.0f GB/s beside it)\n", v.name,
             ok ? "exact" : "WRONG", t, bw, 100.0 * bw / cbw, cbw);
    }
  }
  return 0;
}
