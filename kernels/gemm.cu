// Hopper (sm_90a) tensor-core GEMM core, v2: y = x Wᵀ (+ U Blᵀ), then the epilogue.
//
//   y[T, N] = col_scale ⊙ (x[T, K] · W[N, K]ᵀ + U[T, r] · Bl[N, r]ᵀ) + bias     (f32 accumulate)
//   z[T, N] = x · Wᵀ + U · Blᵀ  (optional: the unscaled accumulator, DoRA's z)
//
// Operands are K-major row-major (PyTorch's layout), bf16 or f16; y is written in the
// operand type. The low-rank term (U = s·h from the LoRA down product, Bl = LoRA's B) is
// one extra K-slice of the same mainloop, so y is written once.
//
// The NN kernels (lk_gemm_nn_*) are the same with W stored [K, N] and Bl [r, N]: the B
// operand MN-major (wgmma's transposed-B descriptor, TMA boxes of 64 columns × 64 rows),
// for the LoRA backward's dX[T, K_in] = dY[T, N_out] · W[N_out, K_in] + G · A.
//
// Structure (a persistent grid of clusters of 2 CTAs, at most one CTA per SM; the two
// CTAs of a cluster take tile rows 2q and 2q + 1 of one tile column, each tile 128 × BN
// of y, BN = 256 or 128; 384 threads = 3 warpgroups per CTA):
// - warpgroup 0, the producer: `setmaxnreg.dec` to 40 registers; one thread issues the
//   TMA loads (cp.async.bulk.tensor.2d, 128-byte swizzle) of its CTA's 128 × 64 x tile
//   and of half (BN/2 rows) of the BN × 64 W tile per K-slice, that half multicast into
//   both CTAs of the cluster, so W crosses L2 once per pair. The ring has 4 stages for
//   BN = 256, 6 for 128. Each stage has a `full` mbarrier (1 arrival + the transaction
//   bytes: the producer's expect_tx, the TMA's complete_tx from its own and the peer's
//   loads) and an `empty` mbarrier (16 arrivals: lane 0 of each consumer warp of both
//   CTAs once its wgmmas that read the stage are complete: the peer's multicast
//   overwrites the stage in both). The producer runs on into the next tile while the
//   consumers store the last one.
// - warpgroups 1 and 2, the consumers: `setmaxnreg.inc` to 232; consumer c owns rows
//   64c .. 64c + 63 of the tile and issues four `wgmma.m64nBNk16` per K-slice (A: its
//   64-row half of the x tile, B: the whole W tile, both through smem descriptors),
//   keeping one wgmma group in flight (wait_group 1) and releasing the previous stage.
// - epilogue: with N % 8 == 0 and y (z) 16-byte aligned, each consumer warp writes its
//   16 rows × 64 columns at a time into a 128-byte-swizzled staging buffer (two per
//   warp) and one lane issues a TMA store (bulk async, clipped at T and N), so the
//   warp goes on to the next chunk and tile without waiting for global memory;
//   otherwise registers → global directly, predicated at the T and N edges.
// - the fused down product (LoRA, r ≤ 32, U = s · x Aᵀ computed in the same launch,
//   p.u_out set): before their tiles, the clusters with the fewest tiles (or spare
//   clusters, when there are more clusters than tiles) run one job per pair of tile
//   rows: per K-slice the CTA's x tile and the A tile ([u_rn][64], in the stage's W
//   area), m64n16 or m64n32 wgmmas into h, then U = s·h and h stored and the tile row's
//   flag set to the launch's epoch (release). A tile's producer acquires its row's flag
//   before it loads U for the low-rank slice. Jobs never wait and every cluster is
//   resident, so every tile's wait ends; after the first round of tiles the flags are
//   long set. Dense kernels only (NT and NN: in the LoRA backward's NN launch the jobs
//   compute G = s · dY B from the dY tiles and Bᵀ [r, N], a K-major A tile as here).
//
// Edges: TMA zero-fills every out-of-bounds element of a box (rows ≥ T or ≥ N, columns
// ≥ K or ≥ r), and still counts the whole box in complete_tx, so the mainloop has no
// edge code; only the stores are predicated. K % 8 == 0 is TMA's 16-byte row stride
// rule (checked on the host).
//
// Registers: 2 × 128 × 232 + 128 × 40 = 64 512 ≤ 65 536 per SM (one CTA per SM).
// Shared memory: the ring, 4 × (16 + 32) KB or 6 × (16 + 16) KB, + 32 KB of epilogue
// staging + 1 KB alignment slack = 225 KB dynamic.
//
// Everything is under __CUDA_ARCH_FEAT_SM90_ALL (compute_90a): the sm_80/86/89 SASS and
// the compute_80 PTX get a stub that traps; the host never launches it off sm_90. The
// GEMM core of those GPUs is gemm_mma.cu's (mma.sync); the two share lk_gemm.cuh. The
// transpose and column-pad kernels at the end of this file run on any arch.

#include <stdint.h>

#include "lk_common.cuh"
#include "lk_gemm.cuh"
#include "lk_mma.cuh"
#include "lk_nf4.cuh"

// Threads per CTA: a producer warpgroup and two consumer warpgroups.
#define LK_GEMM_THREADS 384

// The host's CUtensorMap (128 opaque bytes), passed by value as a __grid_constant__
// parameter so that TMA reads it in the kernel's parameter space (64-byte aligned).
struct alignas(64) LkTmap {
  unsigned long long opaque[16];
};


#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LK_GEMM_SM90 1
#endif

#ifdef LK_GEMM_SM90
namespace {

constexpr int BM = 128;                 // tile rows (of x and y)
constexpr int BK = 64;                  // K per stage: 64 × 2 B = one 128-byte swizzle row
constexpr int A_BYTES = BM * BK * 2;    // 16 KB: x tile [128][64]
constexpr int GROUP_M = 8;              // tile rows per L2 group (grouped order)
constexpr int CLUSTER = 2;              // CTAs per cluster: tile rows 2q and 2q + 1
constexpr int EMPTY_ARRIVALS = 8 * CLUSTER;  // lane 0 of each consumer warp of both CTAs
constexpr int MAX_STAGES = 6;
constexpr int RING_BYTES = 192 * 1024;  // both tile widths' rings
// The TMA-store epilogue's staging: per consumer warp two buffers of 16 rows × 64
// columns (2 KB each, 128-byte swizzled rows), after the ring: 8 × 4 KB = 32 KB.
constexpr int STORE_BUF_BYTES = 16 * 64 * 2;
constexpr int STORE_BYTES = 8 * 2 * STORE_BUF_BYTES;
static_assert(RING_BYTES + STORE_BYTES + 1024 <= 227 * 1024, "dynamic shared memory");
// The NF4 kernels: one staging buffer per consumer warp (16 KB), then a ring of RAW_SLOTS
// slots of raw NF4 data, each the CTA's half of a W tile's codes for one K-slice
// ([BN/2][32] bytes, TMA) and their scales ([BN/2][2] f32, a bulk copy).
constexpr int NF4_STORE_BYTES = 8 * STORE_BUF_BYTES;
constexpr int RAW_SLOTS = 3;
template <int BN_> struct Nf4Raw {
  static constexpr int CODE_BYTES = BN_ / 2 * 32;
  static constexpr int SCALE_BYTES = BN_ / 2 * 8;
  static constexpr int SLOT_BYTES = CODE_BYTES + SCALE_BYTES;  // a multiple of 128
};
static_assert(RING_BYTES + NF4_STORE_BYTES + RAW_SLOTS * Nf4Raw<256>::SLOT_BYTES + 1024 <=
                  227 * 1024 - 512,
              "dynamic shared memory (NF4), with room for the static barriers and table");

// The two tile widths. BN = 256: 4 stages of 16 + 32 KB; BN = 128: 6 stages of
// 16 + 16 KB. Both use 192 KB of ring (+ 1 KB alignment slack), chosen on the host.
template <int BN_> struct Tile {
  static constexpr int HALF_B_BYTES = BN_ / 2 * BK * 2; // the W rows one CTA loads
  static constexpr int STAGES = BN_ == 256 ? 4 : 6;     // ring depth
  static constexpr int B_BYTES = BN_ * BK * 2;          // W tile [BN][64]
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES; // a multiple of 1024
  static constexpr int ACC = BN_ / 2;                   // f32 accumulators per consumer thread
};
static_assert(Tile<256>::STAGES <= MAX_STAGES && Tile<128>::STAGES <= MAX_STAGES, "ring");

using lk::smem_u32;

// ---- mbarriers ---------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
// Completes this thread's arrival and adds `bytes` to the transaction count the phase
// waits for (the TMA loads complete them).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}
// Waits until the phase of parity `parity` has completed. On a fresh barrier (phase 0 in
// progress) parity 1 counts as completed, which is what lets the producer fill every
// stage once before the first release.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// ---- TMA -----------------------------------------------------------------------------
// Loads the box at (c0 = column, c1 = row) of the tensor map into shared memory at dst
// (1024-byte aligned: the 128-byte swizzle pattern repeats every 8 rows × 128 B), and
// completes its bytes on the mbarrier. Out-of-bounds elements are written as zeros.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const LkTmap *map, int c0, int c1,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// The same load, multicast: the box lands at dst in every CTA of the cluster named in
// cta_mask, and completes its bytes on the mbarrier at the same offset in each of them.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const LkTmap *map, int c0,
                                                      int c1, uint32_t bar, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "h"(cta_mask)
      : "memory");
}

// ---- clusters ---------------------------------------------------------------------------
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t cluster_id_x() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t cluster_count_x() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(r));
  return r;
}
// Every thread of both CTAs: release this CTA's prior shared-memory writes (the barrier
// inits) to the cluster, wait for the peer's.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\n"
               "barrier.cluster.wait.acquire;" ::: "memory");
}
// Arrives on the mbarrier at the same shared-memory offset as `bar` in cluster CTA `cta`
// (the default .release.cta semantics, as CUTLASS's ClusterBarrier: a .cluster-scope
// release would fence every arrival, measured 2.4× slower overall). The arrival only
// says that this warp's wgmmas reading the stage have completed (wgmma.wait_group).
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t cta) {
  asm volatile(
      "{\n"
      ".reg .b32 ra;\n"
      "mapa.shared::cluster.u32 ra, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [ra];\n"
      "}" ::"r"(bar),
      "r"(cta)
      : "memory");
}

// Stores the box at (c0 = column, c1 = row) of the tensor map from shared memory at src
// (laid out as the map's 128-byte swizzle); elements outside the tensor are not written.
__device__ __forceinline__ void tma_store_2d(const LkTmap *map, uint32_t src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(c0), "r"(c1), "r"(src)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
// Waits until at most N of this thread's committed bulk stores still read shared memory.
template <int N> __device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
// Makes this thread's generic-proxy shared-memory writes visible to the async proxy (TMA).
__device__ __forceinline__ void fence_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint32_t a, uint32_t b, uint32_t c,
                                             uint32_t d) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(a), "r"(b), "r"(c),
               "r"(d)
               : "memory");
}

// ---- the NF4 producer's synchronization --------------------------------------------------
// Adds `bytes` to the transaction count of the barrier's current phase without arriving.
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}
// One arrival (release: this thread's prior shared-memory writes happen before the
// phase completes for its waiters).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// The shared::cluster address of the same offset in cluster CTA `cta`.
__device__ __forceinline__ uint32_t mapa(uint32_t addr, uint32_t cta) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(cta));
  return r;
}
// Bulk copy (the TMA engine, async proxy) of `bytes` of this CTA's shared memory at src
// into a cluster CTA's shared memory at dst (a shared::cluster address), completing the
// bytes on that CTA's mbarrier at bar (a shared::cluster address).
__device__ __forceinline__ void bulk_copy_to_cta(uint32_t dst, uint32_t src, uint32_t bytes,
                                                 uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, "
      "[%3];" ::"r"(dst),
      "r"(src), "r"(bytes), "r"(bar)
      : "memory");
}
// Bulk copy (TMA engine) of `bytes` contiguous bytes of global memory at src into this
// CTA's shared memory at dst (16-byte aligned, bytes % 16 == 0), completing on bar.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void *src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
      : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 r;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "r"(addr));
  return r;
}
__device__ __forceinline__ float ld_shared_f32(uint32_t addr) {
  float r;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(r) : "r"(addr));
  return r;
}
// The producer warpgroup's own barrier (named barrier 1, 128 threads).
__device__ __forceinline__ void producer_sync() { asm volatile("bar.sync 1, 128;" ::: "memory"); }

// ---- wgmma -----------------------------------------------------------------------------
// Shared-memory matrix descriptor of a K-major tile written by TMA with the 128-byte
// swizzle: rows of 64 16-bit elements (128 B) stored back to back, the 16-byte chunk c
// of row i at chunk c ^ (i % 8). PTX ISA "Matrix Descriptor Format":
//   bits  0-13  start address >> 4 (the tile's shared address; +2 per k16 step = 32 B)
//   bits 16-29  leading byte offset >> 4: unused for swizzled K-major layouts (set to 1)
//   bits 32-45  stride byte offset >> 4: 8 rows × 128 B = 1024 B between 8-row groups
//   bits 49-51  base offset: 0, every tile starts 1024-byte aligned
//   bits 62-63  layout: 1 = 128-byte swizzle
__device__ __forceinline__ uint64_t desc_sw128(uint32_t saddr) {
  return static_cast<uint64_t>((saddr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// The descriptor of an MN-major B tile (the NN kernels): [64 K rows][BN columns] stored
// as BN/64 chunks of [64 rows][64 columns] (8 KB each, one TMA box, 128-byte swizzle),
// row k of a chunk holding columns 64j .. 64j + 63 for that k. In the canonical MN-major
// 128-byte-swizzle layout ((8 × 8 elements, m chunks), (8 rows, k groups)):
//   leading byte offset  = 8192 B between 64-column chunks (the N direction)
//   stride byte offset   = 1024 B between 8-row groups (the K direction)
// A k16 step starts 16 rows (2048 B, +128 in the >> 4 field) further on.
__device__ __forceinline__ uint64_t desc_mn_sw128(uint32_t saddr) {
  return static_cast<uint64_t>((saddr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>(8192 >> 4) << 16) | (static_cast<uint64_t>(1024 >> 4) << 32) |
         (static_cast<uint64_t>(1) << 62);
}
constexpr int MN_CHUNK_BYTES = 64 * 64 * 2;  // one [64][64] chunk of an MN-major B tile

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator reads/writes across a wgmma wait.
template <int N> __device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The accumulator operands of an m64n256 (128) and an m64n128 (64) wgmma.
#define LK_WGMMA_D128 \
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
#define LK_WGMMA_D64 \
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// One m64nNk16 step: D[64, N] += A[64, 16] · B[N, 16]ᵀ, A K-major in shared memory
// (descriptors da, db), f32 accumulators. Operands: d, da, db, scale-d = 1 (accumulate),
// imm-scale-a = imm-scale-b = 1, tnsp-a = 0 (x is K-major), tnsp-b = TB: "0" for a
// K-major B (W [N, K], the NT kernels), "1" for an MN-major B (W [K, N], the NN kernels).
#define LK_WGMMA_M64N256K16(TY, TB)                                               \
  asm volatile("{\n"                                                             \
               "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY "\n"      \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127},\n" \
               "%128, %129, 1, 1, 1, 0, " TB ";\n"                                \
               "}\n"                                                             \
               : LK_WGMMA_D128                                                    \
               : "l"(da), "l"(db))
#define LK_WGMMA_M64N128K16(TY, TB)                                               \
  asm volatile("{\n"                                                             \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY "\n"      \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63},\n" \
               "%64, %65, 1, 1, 1, 0, " TB ";\n"                                  \
               "}\n"                                                             \
               : LK_WGMMA_D64                                                     \
               : "l"(da), "l"(db))

template <bool F16, int ACC, bool TB>
__device__ __forceinline__ void wgmma_k16(float (&d)[ACC], uint64_t da, uint64_t db) {
  if constexpr (ACC == 128) {
    if constexpr (F16 && TB) {
      LK_WGMMA_M64N256K16("f16", "1");
    } else if constexpr (F16) {
      LK_WGMMA_M64N256K16("f16", "0");
    } else if constexpr (TB) {
      LK_WGMMA_M64N256K16("bf16", "1");
    } else {
      LK_WGMMA_M64N256K16("bf16", "0");
    }
  } else {
    static_assert(ACC == 64, "m64n128 or m64n256");
    if constexpr (F16 && TB) {
      LK_WGMMA_M64N128K16("f16", "1");
    } else if constexpr (F16) {
      LK_WGMMA_M64N128K16("f16", "0");
    } else if constexpr (TB) {
      LK_WGMMA_M64N128K16("bf16", "1");
    } else {
      LK_WGMMA_M64N128K16("bf16", "0");
    }
  }
}

// The fused down product's wgmma: DU[64, u_rn] += A[64, 16] · Aw[u_rn, 16]ᵀ, the x tile
// as A and the LoRA A tile ([u_rn][64], K-major, 128-byte swizzled, rows ≥ rank zero) as
// B; u_rn (16 or 32) a compile-time width. du[0 .. u_rn / 2) hold the m64nNk16 fragment
// (the layout of d below). (m64n64 for ranks up to 64 would cost the 128 × 256 tile's
// wgmma pipeline: ptxas serializes it for want of registers, so those ranks keep the
// down kernel.)
#define LK_WGMMA_M64N16K16_U(TY)                                                 \
  asm volatile("{\n"                                                             \
               "wgmma.mma_async.sync.aligned.m64n16k16.f32." TY "." TY "\n"       \
               "{%0, %1, %2, %3, %4, %5, %6, %7},\n" \
               "%8, %9, 1, 1, 1, 0, 0;\n"                                        \
               "}\n"                                                             \
               : "+f"(du[0]), "+f"(du[1]), "+f"(du[2]), "+f"(du[3]), "+f"(du[4]), "+f"(du[5]), "+f"(du[6]), "+f"(du[7]) \
               : "l"(da), "l"(db))
#define LK_WGMMA_M64N32K16_U(TY)                                                 \
  asm volatile("{\n"                                                             \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY "\n"       \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15},\n" \
               "%16, %17, 1, 1, 1, 0, 0;\n"                                        \
               "}\n"                                                             \
               : "+f"(du[0]), "+f"(du[1]), "+f"(du[2]), "+f"(du[3]), "+f"(du[4]), "+f"(du[5]), "+f"(du[6]), "+f"(du[7]), "+f"(du[8]), "+f"(du[9]), "+f"(du[10]), "+f"(du[11]), "+f"(du[12]), "+f"(du[13]), "+f"(du[14]), "+f"(du[15]) \
               : "l"(da), "l"(db))

template <bool F16, int UW>
__device__ __forceinline__ void wgmma_u_k16(float (&du)[32], uint64_t da, uint64_t db) {
  if constexpr (UW == 16) {
    if constexpr (F16) {
      LK_WGMMA_M64N16K16_U("f16");
    } else {
      LK_WGMMA_M64N16K16_U("bf16");
    }
  } else {
    static_assert(UW == 32, "m64n16 or m64n32");
    if constexpr (F16) {
      LK_WGMMA_M64N32K16_U("f16");
    } else {
      LK_WGMMA_M64N32K16_U("bf16");
    }
  }
}

template <int V> struct IntC {
  static constexpr int value = V;
};

// The grouped (L2-friendly) tile order: consecutive tile indices walk GROUP_M tile rows
// down one tile column before moving right, so the CTAs working at the same time reuse
// their GROUP_M x tiles and each W tile from L2. Returns (tile row, tile column).
__device__ __forceinline__ void tile_of(int pid, int tiles_m, int tiles_n, int &tm, int &tn) {
  const int per_group = GROUP_M * tiles_n;
  const int group = pid / per_group;
  const int first_m = group * GROUP_M;
  const int rows = min(tiles_m - first_m, GROUP_M);
  const int in_group = pid - group * per_group;
  tm = first_m + in_group % rows;
  tn = in_group / rows;
}

// The fused down product's jobs: job j computes h = x · Aᵀ for tile-row pair j (both
// CTAs of a cluster, each its 128 rows), j < pairs_m. A cluster runs its jobs before its
// tiles, and the jobs go to the clusters with the fewest tiles: the cluster in slot q
// takes tiles q, q + clusters, ..., so slots q ≥ light0 have one tile fewer than the
// rest (or none, when there are more clusters than tiles). Job j runs in slot light0 +
// j % lights. Slots count down from the last cluster (slot = clusters - 1 - cluster
// id), so the jobs, which never wait, sit on the lowest cluster ids, the first the GPU
// starts. Returns this slot's first job and the stride to its next (none if ≥ jobs).
__device__ __forceinline__ void jobs_of(int slot, int clusters, int pairs, int &first,
                                        int &stride) {
  const int light0 = clusters > pairs ? pairs : (pairs % clusters == 0 ? 0 : pairs % clusters);
  stride = clusters - light0;
  first = slot >= light0 ? slot - light0 : 1 << 30;
}

// ---- the fused down product's flags (global memory, gpu scope) -------------------------
using lk::ld_acquire_gpu;
__device__ __forceinline__ void st_release_gpu(uint32_t *p, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// Orders this thread's prior memory accesses before its later ones at gpu scope.
__device__ __forceinline__ void fence_acq_rel_gpu() {
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
}
// Orders this thread's generic-proxy global accesses with its async-proxy (TMA) ones.
__device__ __forceinline__ void fence_async_global() {
  asm volatile("fence.proxy.async.global;" ::: "memory");
}
// The two consumer warpgroups' barrier (named barrier 2, 256 threads).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 2, 256;" ::: "memory"); }
// The fused down product's outputs for one consumer thread: du is its m64n{u_rn} fragment
// of h for rows row0 and row0 + 8 (row0 = the tile's row 64c + 16·warp + lane/4):
// U[row, col] = u_scale · h (row stride u_ld) and h[row, col] (row stride rank, if
// h_out) for col < rank and row < t, each rounded once from the f32 sum.
template <typename T>
__device__ __forceinline__ void write_u(const float (&du)[32], const LkGemmParams &p, int row0,
                                        int lane) {
  T *u = static_cast<T *>(p.u_out);
  T *h = static_cast<T *>(p.h_out);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (8 * j >= p.u_rn) break;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = row0 + 8 * (e / 2);
      const int col = 8 * j + 2 * (lane % 4) + e % 2;
      if (row < p.t && col < p.rank) {
        const float v = du[4 * j + e];
        u[static_cast<size_t>(row) * p.u_ld + col] = lk::from_f32<T>(p.u_scale * v);
        if (h != nullptr) h[static_cast<size_t>(row) * p.rank + col] = lk::from_f32<T>(v);
      }
    }
  }
}

// The consumer warpgroups' part of gemm_nt_body: wgmma over the ring, then the epilogue,
// tile after tile.
template <typename T, bool F16, int BN, int BUFS, bool TB>
__device__ __forceinline__ void consumer(uint32_t ring, const uint64_t *full_bar,
                                         const uint64_t *empty_bar, uint32_t rank, int pairs_m,
                                         int pairs, int cluster, int clusters, int iters,
                                         const LkTmap &y_map, const LkTmap &z_map,
                                         const LkGemmParams &p) {
  using C = Tile<BN>;
  constexpr int STAGES = C::STAGES;
  const int c = threadIdx.x / 128 - 1;      // consumer: rows 64c .. 64c + 63 of the tile
  const int lane = threadIdx.x % 32;
  const int warp = (threadIdx.x / 32) % 4;  // warp within the warpgroup
  T *y = static_cast<T *>(p.y);
  T *z = static_cast<T *>(p.z);
  const T *bias = static_cast<const T *>(p.bias);
  const bool even_n = (p.n & 1) == 0;  // pairs of columns are 4-byte aligned in y
  // This warp's BUFS staging buffers (2, or 1 in the NF4 kernels) for the TMA-store
  // epilogue.
  const uint32_t stage_buf = ring + RING_BYTES + (4 * c + warp) * BUFS * STORE_BUF_BYTES;
  uint32_t buf = 0;  // which of the two buffers the next chunk uses

  uint32_t g = 0;  // K-slices consumed by this CTA so far (jobs and tiles)
  // The fused down product's jobs of this cluster (dense kernels only), before its tiles:
  // per K-slice the x tile and the A tile (in the stage's W area), h accumulated by
  // m64n{u_rn} wgmmas; then U = s·h (and h) written for the CTA's 128 rows and the tile
  // row's flag published: the producers of that row's tiles wait for it before they
  // load U for the low-rank slice.
  if constexpr (BUFS == 2) {
    if (p.u_out != nullptr) {
      int job, stride;
      jobs_of(cluster, clusters, pairs, job, stride);
      auto run_jobs = [&](auto uw) {
        constexpr int UW = decltype(uw)::value;
        for (; job < pairs_m; job += stride) {
          const int m0 = (2 * job + static_cast<int>(rank)) * BM;
          float du[32];
#pragma unroll
          for (int i = 0; i < 32; ++i) du[i] = 0.0f;
          fence_regs(du);  // zeroed before the job's first wgmma
          for (int it = 0; it < p.k_tiles; ++it, ++g) {
            const uint32_t s = g % STAGES;
            mbar_wait(smem_u32(&full_bar[s]), (g / STAGES) & 1);
            const uint64_t da = desc_sw128(ring + s * C::STAGE_BYTES + c * (64 * 128));
            const uint64_t dau = desc_sw128(ring + s * C::STAGE_BYTES + A_BYTES);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) wgmma_u_k16<F16, UW>(du, da + 2 * kk, dau + 2 * kk);
            wgmma_commit();
            wgmma_wait<1>();
            fence_regs(du);
            if (it > 0 && lane == 0) {
              const uint32_t e = smem_u32(&empty_bar[(g - 1) % STAGES]);
              mbar_arrive_cluster(e, 0);
              mbar_arrive_cluster(e, 1);
            }
          }
          wgmma_wait<0>();
          fence_regs(du);
          if (lane == 0) {
            const uint32_t e = smem_u32(&empty_bar[(g - 1) % STAGES]);
            mbar_arrive_cluster(e, 0);
            mbar_arrive_cluster(e, 1);
          }
          write_u<T>(du, p, m0 + 64 * c + 16 * warp + lane / 4, lane);
          fence_async_global();
          fence_acq_rel_gpu();
          consumers_sync();
          if (threadIdx.x == 128) st_release_gpu(p.u_flags + (m0 / BM), p.u_epoch);
        }
      };
      if (p.u_rn == 16) {
        run_jobs(IntC<16>{});
      } else if (p.u_rn == 32) {
        run_jobs(IntC<32>{});
      }
    }
  }
  for (int pair = cluster; pair < pairs; pair += clusters) {
    int pm, tn;
    tile_of(pair, pairs_m, p.tiles_n, pm, tn);
    const int m0 = (2 * pm + static_cast<int>(rank)) * BM, n0 = tn * BN;

    // Accumulator D [64, BN] in wgmma's m64nNk16 fragment layout: thread (warp, lane)
    // holds d[i] = D[row, col] with
    //   row = 16 · warp + lane / 4 + 8 · ((i / 2) % 2)
    //   col = 8 · (i / 4) + 2 · (lane % 4) + i % 2
    // (each 8-column chunk j = i / 4 is mma.sync's m16n8 C fragment for the warp's 16 rows).
    float d[C::ACC];
#pragma unroll
    for (int i = 0; i < C::ACC; ++i) d[i] = 0.0f;

    for (int it = 0; it < iters; ++it, ++g) {
      const uint32_t s = g % STAGES;
      mbar_wait(smem_u32(&full_bar[s]), (g / STAGES) & 1);
      const uint32_t a_tile = ring + s * C::STAGE_BYTES + c * (64 * 128);  // this consumer's 64 rows
      const uint32_t b_tile = ring + s * C::STAGE_BYTES + A_BYTES;
      const uint64_t da = desc_sw128(a_tile);
      const uint64_t db = TB ? desc_mn_sw128(b_tile) : desc_sw128(b_tile);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        // K-major: k16 step kk starts 32 bytes further along each 128-byte row, +2 in
        // the >> 4 start-address field (the hardware applies the swizzle on the full
        // address); MN-major B: 16 rows further on, +128.
        wgmma_k16<F16, C::ACC, TB>(d, da + 2 * kk, db + (TB ? 128 : 2) * kk);
      }
      wgmma_commit();
      // At most one group (this slice's) still running: the previous slice's stage is free.
      wgmma_wait<1>();
      fence_regs(d);
      if (it > 0 && lane == 0) {
        const uint32_t e = smem_u32(&empty_bar[(g - 1) % STAGES]);
        mbar_arrive_cluster(e, 0);
        mbar_arrive_cluster(e, 1);
      }
    }
    wgmma_wait<0>();
    fence_regs(d);
    // The tile's last stage is free too: the producer may refill it during the epilogue.
    if (lane == 0) {
      const uint32_t e = smem_u32(&empty_bar[(g - 1) % STAGES]);
      mbar_arrive_cluster(e, 0);
      mbar_arrive_cluster(e, 1);
    }

    // ---- epilogue: y = col_scale ⊙ acc + bias (and z = acc), cast ---------------------
    if (p.tma_store) {
      // Per 64-column chunk: the warp's 16 × 64 block into a staging buffer (128-byte
      // swizzled: the 16-byte piece q of row i at q ^ (i % 8), so the 8 rows a store
      // instruction touches fall in 8 different bank groups), then one TMA store by lane
      // 0, which clips rows ≥ T and columns ≥ N. Two buffers: a chunk's writes wait only
      // for the store two chunks back to have read its buffer.
      const int wrow0 = m0 + 64 * c + 16 * warp;  // the warp's first row
      if (wrow0 < p.t) {
#pragma unroll
        for (int q = 0; q < BN / 64; ++q) {
          float sc[16], bi[16];  // scale and bias of this thread's 16 columns of the chunk
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) {
            const int col = n0 + 64 * q + 8 * jj + 2 * (lane % 4);
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const bool in = col + e < p.n;
              sc[2 * jj + e] = (p.col_scale != nullptr && in) ? __ldg(p.col_scale + col + e) : 1.0f;
              bi[2 * jj + e] = (bias != nullptr && in) ? lk::ldg(bias + col + e) : 0.0f;
            }
          }
#pragma unroll
          for (int out = 0; out < 2; ++out) {
            if (out == 1 && z == nullptr) break;
            const uint32_t sb = stage_buf + buf * STORE_BUF_BYTES;
            if (lane == 0) bulk_wait_read<BUFS - 1>();
            __syncwarp();
#pragma unroll
            for (int jj = 0; jj < 8; ++jj) {
              const int j = 8 * q + jj;
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const int r = lane / 4 + 8 * h;
                const float a0 = d[4 * j + 2 * h], a1 = d[4 * j + 2 * h + 1];
                const uint32_t v = out == 0 ? lk::pack2<T>(fmaf(sc[2 * jj], a0, bi[2 * jj]),
                                                      fmaf(sc[2 * jj + 1], a1, bi[2 * jj + 1]))
                                            : lk::pack2<T>(a0, a1);
                st_shared_u32(sb + r * 128 + ((jj ^ (r % 8)) * 16) + 4 * (lane % 4), v);
              }
            }
            fence_async_smem();
            __syncwarp();
            if (lane == 0) {
              tma_store_2d(out == 0 ? &y_map : &z_map, sb, n0 + 64 * q, wrow0);
              bulk_commit();
            }
            buf = (buf + 1) % BUFS;
          }
        }
      }
      continue;
    }
    const int row0 = m0 + 64 * c + 16 * warp + lane / 4;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int col = n0 + 8 * j + 2 * (lane % 4);
      if (col >= p.n) continue;
      const bool has1 = col + 1 < p.n;
      float s0 = 1.0f, s1 = 1.0f, b0 = 0.0f, b1 = 0.0f;
      if (p.col_scale != nullptr) {
        s0 = __ldg(p.col_scale + col);
        if (has1) s1 = __ldg(p.col_scale + col + 1);
      }
      if (bias != nullptr) {
        b0 = lk::ldg(bias + col);
        if (has1) b1 = lk::ldg(bias + col + 1);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + 8 * h;
        if (row >= p.t) continue;
        const float v0 = fmaf(s0, d[4 * j + 2 * h], b0);
        const float v1 = fmaf(s1, d[4 * j + 2 * h + 1], b1);
        store_col_pair(y + static_cast<size_t>(row) * p.n + col, v0, v1, even_n, has1);
        if (z != nullptr) {
          const float a0 = d[4 * j + 2 * h], a1 = d[4 * j + 2 * h + 1];
          store_col_pair(z + static_cast<size_t>(row) * p.n + col, a0, a1, even_n, has1);
        }
      }
    }
   }
  // The staging buffers must outlive the stores' reads of them.
  if (lane == 0) bulk_wait_read<0>();
}

// The low-rank K-slice's half of the B tile that a CTA loads for both CTAs of its
// cluster (multicast): Bl's columns n_half .. n_half + BN/2 into dst. Bl [N, r] (TB
// false): its columns 0 .. 63, zeros from r on; Bl [r, N] (TB, the NN kernels): rows
// 0 .. 63 (zeros from r on) as BN/128 chunks of [64][64], MN_CHUNK_BYTES apart.
template <int BN, bool TB>
__device__ __forceinline__ void load_bl_half(uint32_t dst, const LkTmap &bl_map, int n_half,
                                             uint32_t full) {
  if constexpr (TB) {
#pragma unroll
    for (int j = 0; j < BN / 128; ++j) {
      tma_load_2d_multicast(dst + j * MN_CHUNK_BYTES, &bl_map, n_half + 64 * j, 0, full, 0x3);
    }
  } else {
    tma_load_2d_multicast(dst, &bl_map, 0, n_half, full, 0x3);
  }
}

// ---- the NF4 B-operand producer (lk_gemm_nf4_*) ----------------------------------------
// Dequantizes one 32-element piece of a W row (16 bytes of codes, byte b holding elements
// 2b (high nibble) and 2b + 1 (low)) with its block's absmax: code · absmax in f32,
// rounded once to T (the standalone dequantize's values), into the W-tile row at
// row_addr in the 128-byte-swizzled layout TMA would have written: 16-byte chunk c of
// the row at c ^ (row % 8) = c ^ sw. Chunk 4 · half + j holds elements 8j .. 8j + 7.
template <typename T>
__device__ __forceinline__ void nf4_store_piece(const float *lut, uint4 codes, float am,
                                                uint32_t row_addr, int half, int sw) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t word = lk::word_of(codes, j);
    uint32_t o[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint32_t byte = (word >> (8 * b)) & 0xffu;
      o[b] = lk::pack2<T>(__fmul_rn(lut[byte >> 4], am), __fmul_rn(lut[byte & 15u], am));
    }
    st_shared_v4(row_addr + (((4 * half + j) ^ sw) << 4), o[0], o[1], o[2], o[3]);
  }
}

// The producer warpgroup of the NF4 kernels, all 128 threads. Per K-slice each CTA
// dequantizes its half of the W tile (BN/2 rows × 64 columns: one or two 32-element
// pieces per thread) into its own stage; then one thread bulk-copies that half into the
// peer CTA's stage (complete_tx on the peer's full barrier), so each W tile is
// dequantized once per pair, as the dense kernels read it from L2 once per pair.
//
// The raw data never passes through registers from global memory: thread 0 keeps a ring
// of RAW_SLOTS slots filled ahead by TMA (the codes, [BN/2][32] bytes, zero-filled past
// N and K) and a bulk copy (their scales, [BN/2][2] f32 from the nf4_scales table), so
// the dequantizing threads only read shared memory. That matters: the proxy fence each
// thread needs before publishing its writes to wgmma (the async proxy) waits for all of
// the thread's outstanding memory operations, which would expose a global load's whole
// latency on every K-slice.
//
// The stage's full barrier takes 128 arrivals (each thread after its writes and the
// fence) plus the transaction bytes of the x tile (TMA) and of the peer's half. A raw
// slot is refilled once the producer barrier after its K-slice has passed (every thread
// has read it).
//
// TB (the NN kernels, dX = dY · deq(W), W [N_w, K_w] the layer's weight read as the
// GEMM's MN-major B [k = N_w, n = K_w]): a K-slice is 64 rows of W and the CTA's half
// is BN/2 of its columns, stored as BN/128 chunks of [64 rows][64 columns] (128-byte
// rows, the layout the dense NN kernels' TMA boxes write, MN_CHUNK_BYTES apart). A W
// row's piece is then a half of a chunk row, so the same piece store serves: the raw
// slot holds the codes [64][BN/4] bytes (one TMA box) and their scales as BN/128 runs of
// [64][2] f32 (the table's [s][rows][2] for the chunk's column step s).
template <typename T, int BN, bool TB>
__device__ __forceinline__ void nf4_producer(uint32_t ring, uint32_t raw, const uint64_t *full_bar,
                                             const uint64_t *empty_bar, const uint64_t *raw_bar,
                                             float *lut, uint32_t rank, int pairs_m, int pairs,
                                             int cluster, int clusters, int iters,
                                             const LkTmap &x_map, const LkTmap &codes_map,
                                             const LkTmap &u_map, const LkTmap &bl_map,
                                             const LkGemmParams &p) {
  using C = Tile<BN>;
  using R = Nf4Raw<BN>;
  constexpr int STAGES = C::STAGES;
  constexpr int HALF = BN / 2;            // W rows (TB: columns) this CTA dequantizes
  constexpr int PIECES = HALF * 2 / 128;  // per thread: 2 (BN = 256) or 1 (BN = 128)
  const uint32_t peer = rank ^ 1u;
  const bool lead = threadIdx.x == 0;
  if (threadIdx.x < 16) lut[threadIdx.x] = NF4_CODE[threadIdx.x];
  producer_sync();

  auto n_base_of = [&](int pair) {
    int pm, tn;
    tile_of(pair, pairs_m, p.tiles_n, pm, tn);
    return tn * BN + static_cast<int>(rank) * HALF;
  };
  // Thread 0's raw-load cursor: the NF4 K-slices of this CTA's tiles in order (the
  // low-rank slices have no raw data), `issued` of them so far.
  int load_pair = cluster, load_it = 0;
  uint32_t issued = 0;
  auto issue_raw = [&]() {
    if (load_pair >= pairs) return;
    const uint32_t slot = issued % RAW_SLOTS;
    const uint32_t bar = smem_u32(&raw_bar[slot]);
    const uint32_t dst = raw + slot * R::SLOT_BYTES;
    const int n_base = n_base_of(load_pair);
    mbar_arrive_expect_tx(bar, R::SLOT_BYTES);
    if constexpr (TB) {
      tma_load_2d(dst, &codes_map, n_base / 2, load_it * BK, bar);
#pragma unroll
      for (int j = 0; j < BN / 128; ++j) {
        bulk_load(dst + R::CODE_BYTES + j * (BK * 8),
                  p.nf4_scales +
                      ((static_cast<int64_t>(n_base / 64 + j)) * p.nf4_n_pad + load_it * BK) * 2,
                  BK * 8, bar);
      }
    } else {
      tma_load_2d(dst, &codes_map, load_it * 32, n_base, bar);
      bulk_load(dst + R::CODE_BYTES,
                p.nf4_scales + (static_cast<int64_t>(load_it) * p.nf4_n_pad + n_base) * 2,
                R::SCALE_BYTES, bar);
    }
    ++issued;
    if (++load_it == p.k_tiles) {
      load_it = 0;
      load_pair += clusters;
    }
  };
  if (lead) {
    for (int i = 0; i < RAW_SLOTS; ++i) issue_raw();
  }

  uint32_t g = 0;  // K-slices issued by this CTA so far (all tiles)
  uint32_t u = 0;  // NF4 K-slices dequantized so far
  for (int pair = cluster; pair < pairs; pair += clusters) {
    int pm, tn;
    tile_of(pair, pairs_m, p.tiles_n, pm, tn);
    const int m0 = (2 * pm + static_cast<int>(rank)) * BM;
    const int n_base = tn * BN + static_cast<int>(rank) * HALF;
    for (int it = 0; it < iters; ++it, ++g) {
      const uint32_t s = g % STAGES;
      // Free in both CTAs: 16 arrivals, 8 from each CTA's consumer warps.
      mbar_wait(smem_u32(&empty_bar[s]), ((g / STAGES) & 1) ^ 1);
      const uint32_t full = smem_u32(&full_bar[s]);
      const uint32_t a_dst = ring + s * C::STAGE_BYTES;
      const uint32_t half_dst = a_dst + A_BYTES + rank * C::HALF_B_BYTES;
      if (it < p.k_tiles) {
        if (lead) {
          mbar_expect_tx(full, A_BYTES + C::HALF_B_BYTES);
          tma_load_2d(a_dst, &x_map, it * BK, m0, full);
        }
        const uint32_t slot = u % RAW_SLOTS;
        mbar_wait(smem_u32(&raw_bar[slot]), (u / RAW_SLOTS) & 1);
        const uint32_t src = raw + slot * R::SLOT_BYTES;
#pragma unroll
        for (int j = 0; j < PIECES; ++j) {
          const int q = static_cast<int>(threadIdx.x) + 128 * j;
          if constexpr (TB) {
            // Row q / RP of the slice, its piece c = q % RP: chunk c / 2, half c % 2.
            constexpr int RP = HALF / 32;  // pieces per W row in this CTA's half
            const int row = q / RP, c = q % RP;
            const uint4 codes = ld_shared_v4(src + q * 16);
            const float am = ld_shared_f32(src + R::CODE_BYTES + ((c / 2) * BK + row) * 8 +
                                           (c % 2) * 4);
            nf4_store_piece<T>(lut, codes, am, half_dst + (c / 2) * MN_CHUNK_BYTES + row * 128,
                               c % 2, row % 8);
          } else {
            const int row = q / 2;  // row q / 2, half q % 2
            const uint4 codes = ld_shared_v4(src + q * 16);
            const float am = ld_shared_f32(src + R::CODE_BYTES + q * 4);
            nf4_store_piece<T>(lut, codes, am, half_dst + row * 128, q % 2, row % 8);
          }
        }
        fence_async_smem();
        mbar_arrive(full);
        producer_sync();  // the half is written and fenced, the raw slot read by all
        ++u;
        if (lead) {
          bulk_copy_to_cta(mapa(half_dst, peer), half_dst, C::HALF_B_BYTES, mapa(full, peer));
          issue_raw();
        }
      } else {
        // The low-rank K-slice, as the dense kernels load it: U's and Bl's columns 0 .. 63.
        if (lead) {
          mbar_expect_tx(full, C::STAGE_BYTES);
          tma_load_2d(a_dst, &u_map, 0, m0, full);
          load_bl_half<BN, TB>(half_dst, bl_map, n_base, full);
        }
        mbar_arrive(full);
      }
    }
  }
}

// x_map: x [T, K], box 64 (K) × 128 (rows); w_map: W [N, K], box 64 × BN/2;
// u_map: U [T, r] (row stride rp ≥ r, rp % 8 == 0), box 64 × 128, columns ≥ r zero-filled;
// bl_map: Bl [N, r], box 64 × BN/2. Without the low-rank term u_map / bl_map are unused.
//
// Clusters of 2 CTAs (__cluster_dims__ on the entry points): the CTAs of a cluster work
// on tile rows 2q and 2q + 1 of the same tile column at the same time, so they need the
// same W tile. Each loads its own x tile and half of the W tile (BN/2 rows), the half
// multicast into both CTAs' shared memory: W is read from L2 once per pair, a third less
// L2 traffic per K-slice (32 KB instead of 48 KB per CTA at BN = 256). A stage may only
// be refilled when the consumers of both CTAs are done with it, so each consumer warp
// releases a stage on the empty barriers of both CTAs (16 arrivals).
//
// Persistent: the cluster in slot q (= clusters - 1 - its id) takes tile pairs q, q +
// clusters, ... in the grouped order (over pairs), after its down-product jobs if any. The producer and the consumers count K-slices across tiles (g), so the ring
// runs on from one tile into the next: while the consumers run the epilogue of a tile,
// the producer already fills the ring with the next tile's first slices. With an odd
// number of tile rows the last pairs' second tile lies past T: TMA zero-fills its x
// rows and its stores are all predicated off, but it still loads its W half for the peer.
template <typename T, bool F16, int BN, bool NF4, bool TB>
__device__ __forceinline__ void gemm_nt_body(const LkTmap &x_map, const LkTmap &w_map,
                                             const LkTmap &u_map, const LkTmap &bl_map,
                                             const LkTmap &y_map, const LkTmap &z_map,
                                             const LkTmap &a_map, const LkGemmParams &p) {
  using C = Tile<BN>;
  constexpr int STAGES = C::STAGES;
  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[MAX_STAGES];
  __shared__ __align__(8) uint64_t empty_bar[MAX_STAGES];
  __shared__ __align__(8) uint64_t raw_bar[NF4 ? RAW_SLOTS : 1];  // the NF4 raw ring

  // Stage s: x tile at ring + s · STAGE_BYTES ([128][64], 16 KB), W tile after it
  // ([BN][64]; rank-0's half, then rank-1's). The ring starts 1024-byte aligned (the
  // host adds 1 KB of slack), at the same offset in both CTAs.
  const uint32_t ring = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const int wg = threadIdx.x / 128;  // 0: producer, 1 and 2: consumers
  const uint32_t rank = cluster_ctarank();
  const int pairs_m = (p.tiles_m + 1) / 2;
  const int pairs = pairs_m * p.tiles_n;
  const int clusters = static_cast<int>(cluster_count_x());
  // This cluster's slot in the tile order (see jobs_of): the last cluster id first.
  const int cluster = clusters - 1 - static_cast<int>(cluster_id_x());
  const int iters = p.k_tiles + (p.low_rank ? 1 : 0);  // K-slices per tile

  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      // Dense: the producer thread's arrive.expect_tx; NF4: every producer thread.
      mbar_init(smem_u32(&full_bar[s]), NF4 ? 128 : 1);
      mbar_init(smem_u32(&empty_bar[s]), EMPTY_ARRIVALS);
    }
    if constexpr (NF4) {
#pragma unroll
      for (int s = 0; s < RAW_SLOTS; ++s) mbar_init(smem_u32(&raw_bar[s]), 1);
    }
    // Makes the initialized barriers visible to the async proxy (TMA) as well.
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // Both CTAs' barriers exist before either CTA multicasts or arrives remotely.
  cluster_sync();

  if constexpr (NF4) {
    if (wg == 0) {
      // Registers: 128 × 56 + 2 × 128 × 224 = 64 512 (the dequantizing producer needs more).
      asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");
      __shared__ float lut[16];
      const uint32_t raw = ring + RING_BYTES + NF4_STORE_BYTES;
      nf4_producer<T, BN, TB>(ring, raw, full_bar, empty_bar, raw_bar, lut, rank, pairs_m,
                              pairs, cluster, clusters, iters, x_map, w_map, u_map, bl_map, p);
    } else {
      asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");
      consumer<T, F16, BN, 1, TB>(ring, full_bar, empty_bar, rank, pairs_m, pairs, cluster,
                              clusters, iters, y_map, z_map, p);
    }
  } else if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) {
      const bool fused = p.u_out != nullptr;  // the fused down product
      uint32_t g = 0;  // K-slices issued by this CTA so far (jobs and tiles)
      if (fused) {
        // This cluster's down-product jobs (see the consumers): per K-slice the CTA's x
        // tile and the whole A tile (rows ≥ rank zero-filled) into the stage's W area.
        const uint32_t a_bytes = static_cast<uint32_t>(p.u_rn) * 128u;
        int job, stride;
        jobs_of(cluster, clusters, pairs, job, stride);
        for (; job < pairs_m; job += stride) {
          const int m0 = (2 * job + static_cast<int>(rank)) * BM;
          for (int it = 0; it < p.k_tiles; ++it, ++g) {
            const uint32_t s = g % STAGES;
            mbar_wait(smem_u32(&empty_bar[s]), ((g / STAGES) & 1) ^ 1);
            const uint32_t full = smem_u32(&full_bar[s]);
            const uint32_t a_dst = ring + s * C::STAGE_BYTES;
            mbar_arrive_expect_tx(full, A_BYTES + a_bytes);
            tma_load_2d(a_dst, &x_map, it * BK, m0, full);
            tma_load_2d(a_dst + A_BYTES, &a_map, it * BK, 0, full);
          }
        }
      }
      for (int pair = cluster; pair < pairs; pair += clusters) {
        int pm, tn;
        tile_of(pair, pairs_m, p.tiles_n, pm, tn);
        const int m0 = (2 * pm + static_cast<int>(rank)) * BM;
        const int n_half = tn * BN + static_cast<int>(rank) * (BN / 2);  // this CTA's W rows
        for (int it = 0; it < iters; ++it, ++g) {
          const uint32_t s = g % STAGES;
          const uint32_t phase = (g / STAGES) & 1;
          // Free in both CTAs: 16 arrivals, 8 from each CTA's consumer warps.
          mbar_wait(smem_u32(&empty_bar[s]), phase ^ 1);
          const uint32_t full = smem_u32(&full_bar[s]);
          const uint32_t a_dst = ring + s * C::STAGE_BYTES;
          const uint32_t b_dst = a_dst + A_BYTES + rank * C::HALF_B_BYTES;
          if (it < p.k_tiles) {
            // This CTA's phase completes on its x tile and both W halves (its own and
            // the peer's multicast); whole boxes are counted, out-of-bounds zero fill
            // included.
            mbar_arrive_expect_tx(full, C::STAGE_BYTES);
            tma_load_2d(a_dst, &x_map, it * BK, m0, full);
            if constexpr (TB) {
              // W [K, N]: this CTA's BN/2 columns as [64][64] chunks, rows it · 64 ...
#pragma unroll
              for (int j = 0; j < BN / 128; ++j) {
                tma_load_2d_multicast(b_dst + j * MN_CHUNK_BYTES, &w_map, n_half + 64 * j,
                                      it * BK, full, 0x3);
              }
            } else {
              tma_load_2d_multicast(b_dst, &w_map, it * BK, n_half, full, 0x3);
            }
          } else {
            if (fused) {
              // U of this tile row is written by a down-product job (published with a
              // release of u_epoch; an acquire here, then the proxy fence so that the
              // TMA load below reads after it).
              const uint32_t *flag = p.u_flags + (m0 / BM);
              while (ld_acquire_gpu(flag) != p.u_epoch) __nanosleep(128);
              fence_async_global();
            }
            mbar_arrive_expect_tx(full, C::STAGE_BYTES);
            // The low-rank K-slice: U's and Bl's columns 0 .. 63, zeros from r on.
            tma_load_2d(a_dst, &u_map, 0, m0, full);
            load_bl_half<BN, TB>(b_dst, bl_map, n_half, full);
          }
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    consumer<T, F16, BN, 2, TB>(ring, full_bar, empty_bar, rank, pairs_m, pairs, cluster, clusters,
                            iters, y_map, z_map, p);
  }
  // No CTA leaves while its peer may still arrive on its barriers or multicast into it.
  cluster_sync();
}

}  // namespace
#endif  // LK_GEMM_SM90

// Clusters of 2 CTAs exist from sm_90 on; the other targets' stubs are never launched.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define LK_GEMM_CLUSTER __cluster_dims__(2, 1, 1)
#else
#define LK_GEMM_CLUSTER
#endif

#ifdef LK_GEMM_SM90
#define LK_GEMM_BODY(T, F16, BN, NF4, TB) \
  gemm_nt_body<T, F16, BN, NF4, TB>(x_map, w_map, u_map, bl_map, y_map, z_map, a_map, p)
#else
#define LK_GEMM_BODY(T, F16, BN, NF4, TB) __trap()
#endif

// Entry points, lk_gemm_nt_{bf16,f16} (128 × 256 tiles) and lk_gemm_nt_n128_{bf16,f16}
// (128 × 128 tiles). Shapes: x [T, K], W [N, K], U [T, r], Bl [N, r], y [T, N]; grid
// min(tiles_m · tiles_n, SMs) CTAs of 384 threads (persistent), 192 KB + 1 KB dynamic
// shared memory.
#define LK_GEMM_ENTRY(NAME, T, F16, BN, NF4, TB)                                                  \
  extern "C" __global__ void LK_GEMM_CLUSTER __launch_bounds__(LK_GEMM_THREADS, 1) NAME(   \
      const __grid_constant__ LkTmap x_map, const __grid_constant__ LkTmap w_map,           \
      const __grid_constant__ LkTmap u_map, const __grid_constant__ LkTmap bl_map,          \
      const __grid_constant__ LkTmap y_map, const __grid_constant__ LkTmap z_map,           \
      const __grid_constant__ LkTmap a_map, const LkGemmParams p) {                                                               \
    LK_GEMM_BODY(T, F16, BN, NF4, TB);                                                               \
  }

LK_GEMM_ENTRY(lk_gemm_nt_bf16, __nv_bfloat16, false, 256, false, false)
LK_GEMM_ENTRY(lk_gemm_nt_f16, __half, true, 256, false, false)
LK_GEMM_ENTRY(lk_gemm_nt_n128_bf16, __nv_bfloat16, false, 128, false, false)
LK_GEMM_ENTRY(lk_gemm_nt_n128_f16, __half, true, 128, false, false)
// The same with W stored [K, N] (MN-major B: dX = dY · W for a LoRA W [N_out, K_in]),
// low-rank Bl [r, N]: lk_gemm_nn_{bf16,f16} and lk_gemm_nn_n128_{bf16,f16}.
LK_GEMM_ENTRY(lk_gemm_nn_bf16, __nv_bfloat16, false, 256, false, true)
LK_GEMM_ENTRY(lk_gemm_nn_f16, __half, true, 256, false, true)
LK_GEMM_ENTRY(lk_gemm_nn_n128_bf16, __nv_bfloat16, false, 128, false, true)
LK_GEMM_ENTRY(lk_gemm_nn_n128_f16, __half, true, 128, false, true)
// The same with W as NF4 (p.wq; w_map unused): lk_gemm_nf4_{bf16,f16} and
// lk_gemm_nf4_n128_{bf16,f16}.
LK_GEMM_ENTRY(lk_gemm_nf4_bf16, __nv_bfloat16, false, 256, true, false)
LK_GEMM_ENTRY(lk_gemm_nf4_f16, __half, true, 256, true, false)
LK_GEMM_ENTRY(lk_gemm_nf4_n128_bf16, __nv_bfloat16, false, 128, true, false)
LK_GEMM_ENTRY(lk_gemm_nf4_n128_f16, __half, true, 128, true, false)
// NF4 W read as the MN-major B (dX = dY · deq(W), W [N_w, K_w]: the GEMM's k = N_w,
// n = K_w), low-rank Bl [r, n]: lk_gemm_nf4nn_{bf16,f16} and lk_gemm_nf4nn_n128_{bf16,f16}.
LK_GEMM_ENTRY(lk_gemm_nf4nn_bf16, __nv_bfloat16, false, 256, true, true)
LK_GEMM_ENTRY(lk_gemm_nf4nn_f16, __half, true, 256, true, true)
LK_GEMM_ENTRY(lk_gemm_nf4nn_n128_bf16, __nv_bfloat16, false, 128, true, true)
LK_GEMM_ENTRY(lk_gemm_nf4nn_n128_f16, __half, true, 128, true, true)

// out[j, i] = in[i, j] (in [rows, cols]): any arch (a grid-stride loop over out, whose
// writes are coalesced; the inputs are small: the LoRA B, [N, r]).
extern "C" __global__ void __launch_bounds__(256) lk_gemm_transpose(const LkTransposeParams p) {
  const int64_t total = static_cast<int64_t>(p.rows) * p.cols;
  for (int64_t e = blockIdx.x * 256ll + threadIdx.x; e < total; e += gridDim.x * 256ll) {
    const int64_t j = e / p.rows;
    const int64_t i = e - j * p.rows;
    p.out[e] = p.in[i * p.cols + j];
  }
}

// out[i, j] = in[i, j] for j < r, 0 for r ≤ j < rp: any arch (a grid-stride loop).
extern "C" __global__ void __launch_bounds__(256) lk_gemm_pad_cols(const LkGemmPadParams p) {
  const int64_t total = static_cast<int64_t>(p.rows) * p.rp;
  for (int64_t e = blockIdx.x * 256ll + threadIdx.x; e < total; e += gridDim.x * 256ll) {
    const int64_t i = e / p.rp;
    const int j = static_cast<int>(e - i * p.rp);
    p.out[e] = j < p.r ? p.in[i * p.r + j] : static_cast<uint16_t>(0);
  }
}
