// markov_draft's step with the bias GEMM fused in, for bf16/fp16 weights
// (DESIGN §3 markov_draft; PERF_NOTES §3b):
//   markov_fused_step_kernel  [request groups, ceil(V / 128)] blocks of 8
//                             warps. A block gathers its group's rows
//                             w1[x_{k-1}] (up to 64 requests; 32 or 16 at
//                             larger ranks) into shared memory; each warp
//                             multiplies them by its 16 columns of w2 on the
//                             tensor cores (WMMA, fp32 accumulators, w2 read
//                             once from global memory), then adds the base
//                             logits, divides, rounds, writes and races its
//                             columns, as markov_correct_kernel does from a
//                             stored bias.
// The fp32 bias rows [R, V] are never written or read back: a step moves w2,
// the base rows and the written rows only. Whether a step takes this kernel
// depends on V, the rank and the weights alone, and a request's values do
// not depend on its group: the bits do not depend on the batch (DESIGN §2).
// The partials go to the bias rows' room of the workspace ([R, tiles]); the
// filtered requests and the finalize kernels are markov_draft.cuh's.
// Framework-free: raw pointers, sizes and a stream.
#pragma once
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "markov_draft.cuh"

namespace dspark {

constexpr int kFusedWarps = 8;
constexpr int kFusedBlock = kFusedWarps * 32;
constexpr int kFusedTile = 16 * kFusedWarps;  // vocabulary columns a block covers: 16 per warp
constexpr int kFusedMaxRequests = 64;  // a block's request group: 4 tiles of 16
// Gathered w1 entries: the group rounded up to tiles of 16, x (rank + kFusedAPad). The pad of 8 entries (16 bytes)
// shifts consecutive rows across the shared-memory banks: with a row stride of 2 * rank bytes (a multiple of 128
// from rank 64) the 8 rows an A-fragment load reads would all hit the same 4 banks.
constexpr int kFusedAPad = 8;
constexpr int kFusedARoom = 64 * (256 + kFusedAPad);
constexpr int kFusedKSteps = 8;  // w2 fragments (16 ranks each) a warp loads before multiplying them

// Tiles of 16 requests a block takes at rank `rank`: 4, 2 or 1 (as many as
// fit in shared memory), 0 when even one does not fit.
inline int markov_fused_rank_mtiles(int64_t rank) {
  for (int mt = 4; mt >= 1; mt /= 2)
    if (16 * mt * (rank + kFusedAPad) <= kFusedARoom) return mt;
  return 0;
}

// Tiles of 16 requests the kernel is instantiated with for R requests: 1, 2
// or 4, at most what the rank allows (more requests: more groups).
inline int markov_fused_mtiles(int64_t R, int64_t rank) {
  const int want = R <= 16 ? 1 : (R <= 32 ? 2 : 4);
  const int room = markov_fused_rank_mtiles(rank);
  return want < room ? want : room;
}

inline int64_t markov_fused_tiles(int64_t V) { return (V + kFusedTile - 1) / kFusedTile; }

// Whether a step of vocabulary V and rank `rank` fits the fused kernel (any
// batch: the answer must not depend on it): WMMA reads w2 in 16 x 16 tiles
// straight from global memory (32-byte aligned rows: V a multiple of 16), the
// gathered w1 rows of 16 requests fit in shared memory in 16-byte vectors,
// and the column tiles fit on grid y. (The caller also needs compute
// capability 8.0 or later: bf16 WMMA.)
inline bool markov_fused_fits(int64_t V, int64_t rank, const void* w1, const void* w2) {
  return rank >= 16 && rank % 16 == 0 && markov_fused_rank_mtiles(rank) > 0 && V >= 16 && V % 16 == 0 &&
         markov_fused_tiles(V) <= 65535 && reinterpret_cast<uintptr_t>(w1) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(w2) % 32 == 0;
}

// The fused step's race partials [R, tiles]: in the bias rows' room, which
// this path leaves unused (R * tiles * 16 bytes <= R * V * 4 bytes).
inline SamplePartial* markov_fused_partials(const MarkovBuffers& b) {
  return reinterpret_cast<SamplePartial*>(b.bias);
}

template <typename W>
struct alignas(32) MarkovFusedShared {
  W a[kFusedARoom];                 // [16 * kMTiles, rank + kFusedAPad] w1[x_{k-1}] per request, zero rows past R
  float acc[kFusedWarps][16 * 16];  // a warp's bias tile, row-major: [request in tile][column]
  RaceBest best[kFusedWarps][kFusedMaxRequests];  // each warp's race per request over its 16 columns
  int32_t flags[kFusedWarps][kFusedMaxRequests];
};
static_assert(sizeof(MarkovFusedShared<__half>) <= 48 * 1024, "static shared memory is limited to 48 KB");

// Loads the w2 fragments of ranks [k0, k0 + 16 * kFusedKSteps) for the 16
// columns at col0. Past the rank the last fragment is loaded again instead
// (never multiplied): unconditional loads let ptxas issue them all before
// the first is used.
template <typename W, typename Frag>
__device__ __forceinline__ void markov_fused_load_w2(Frag (&bf)[kFusedKSteps], const W* __restrict__ w2,
                                                     int32_t rank, int64_t V, int32_t k0, int64_t col0) {
#pragma unroll
  for (int q = 0; q < kFusedKSteps; ++q) {
    const int32_t kq = k0 + 16 * q < rank ? k0 + 16 * q : rank - 16;
    nvcuda::wmma::load_matrix_sync(bf[q], w2 + static_cast<int64_t>(kq) * V + col0, static_cast<unsigned>(V));
  }
}

// Step k of every request: a block per (request group of 16 * kMTiles,
// column tile of kFusedTile). w1 [V, rank] and w2 [rank, V] contiguous (T:
// the logits' dtype, W: the weights'); b.prev [R] holds x_{k-1}; writes
// a.draft_logits[:, k - 1, tile's columns] and partials [R, tiles] (the
// unfiltered requests' race over the tile; empty for the others).
template <typename T, typename W, int kMTiles>
__global__ void __launch_bounds__(kFusedBlock, kMTiles == 4 ? 2 : 3)
    markov_fused_step_kernel(MarkovArgs<T> a, int32_t k, MarkovBuffers b, const W* __restrict__ w1,
                             const W* __restrict__ w2, int32_t rank, SamplePartial* __restrict__ partials,
                             int64_t tiles) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // bf16 WMMA; the binding takes this path from 8.0 only
  namespace wm = nvcuda::wmma;
  __shared__ MarkovFusedShared<W> s;
  const int64_t V = a.vocab;
  // This block's requests [r_base, r_base + R): its group (grid x, so that consecutive blocks share w2's columns).
  const int64_t r_base = static_cast<int64_t>(blockIdx.x) * 16 * kMTiles;
  const int64_t R = a.num_requests - r_base < 16 * kMTiles ? a.num_requests - r_base : 16 * kMTiles;
  const int64_t tile = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int lda = rank + kFusedAPad;
  // This warp's 16 columns: all inside the vocabulary or all past it (V % 16 == 0).
  const int64_t col0 = tile * kFusedTile + 16 * warp;
  const bool active = col0 < V;
  // The first w2 fragments are in flight while the block gathers the w1 rows.
  wm::fragment<wm::matrix_b, 16, 16, 16, W, wm::row_major> bf[kFusedKSteps];
  if (active) markov_fused_load_w2(bf, w2, rank, V, 0, col0);
  // The requests' w1 rows, 16 bytes at a time (rank is a multiple of 16).
  const int vecs = rank / 8;
  for (int i = threadIdx.x; i < 16 * kMTiles * vecs; i += kFusedBlock) {
    const int m = i / vecs, c = i - m * vecs;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (m < R) v = *reinterpret_cast<const uint4*>(w1 + b.prev[r_base + m] * rank + 8 * c);
    *reinterpret_cast<uint4*>(s.a + m * lda + 8 * c) = v;
  }
  __syncthreads();

  wm::fragment<wm::accumulator, 16, 16, 16, float> acc[kMTiles];
  if (active) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) wm::fill_fragment(acc[mt], 0.0f);
    // Ranks in ascending order into every accumulator.
    for (int k0 = 0; k0 < rank; k0 += 16 * kFusedKSteps) {
      if (k0 > 0) markov_fused_load_w2(bf, w2, rank, V, k0, col0);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        if (16 * mt >= R) break;  // the same for the whole block
#pragma unroll
        for (int q = 0; q < kFusedKSteps; ++q) {
          if (k0 + 16 * q >= rank) break;
          wm::fragment<wm::matrix_a, 16, 16, 16, W, wm::row_major> af;
          wm::load_matrix_sync(af, s.a + 16 * mt * lda + k0 + 16 * q, static_cast<unsigned>(lda));
          wm::mma_sync(acc[mt], af, bf[q], acc[mt]);
        }
      }
    }
  }

  // Per request tile: the accumulators through shared memory (their register layout is opaque), then lane pair
  // (2m, 2m + 1) takes request m's columns [0, 8) and [8, 16): two groups of 4, as markov_correct_kernel.
  const int m_in_tile = lane >> 1, half = lane & 1;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    const int64_t m = 16 * mt + m_in_tile, r = r_base + m;
    RaceBest best = race_empty();
    int32_t flags = 0;
    if (active && 16 * mt < R) {  // the same for the whole warp
      wm::store_matrix_sync(s.acc[warp], acc[mt], 16, wm::mem_row_major);
      __syncwarp();
      if (m < R) {
        const int64_t i0 = col0 + 8 * half;
        T* __restrict__ out = a.draft_logits + (r * a.group + k - 1) * V;
        const bool out_aligned = reinterpret_cast<uintptr_t>(out) % (4 * sizeof(T)) == 0;
        if (!markov_live(a, b.live, r, k)) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float v[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
            float l[4];
            store4_rounded(out + i0 + 4 * h, 4, out_aligned, v, l);
          }
        } else {
          const T* __restrict__ base = a.base + r * a.base_stride_r + (k - 1) * a.base_stride_g;
          const bool base_aligned = reinterpret_cast<uintptr_t>(base) % (4 * sizeof(T)) == 0;
          const float t = a.temperature[r];
          const bool race_here = !markov_filtered(a, r);
          const RaceRow rr = markov_race_row(t);
          const RaceStream stream = markov_stream(a, r, k);
          const float* bias = s.acc[warp] + 16 * m_in_tile + 8 * half;
          float u[2][4], z[2][4];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            load4(base + i0 + 4 * h, 4, base_aligned, u[h]);
#pragma unroll
            for (int j = 0; j < 4; ++j) z[h][j] = bias[4 * h + j];
          }
#pragma unroll
          for (int h = 0; h < 2; ++h)
            markov_write_group(out + i0 + 4 * h, 4, out_aligned, u[h], z[h], t, race_here, rr, stream,
                               (i0 + 4 * h) >> 2, best, flags);
        }
      }
      __syncwarp();  // the next tile rewrites s.acc[warp]
    }
    best = race_merge(best, race_shfl_xor(best, 1));  // the lane pair of request m
    flags |= __shfl_xor_sync(kFullMask, flags, 1);
    if (half == 0) {
      s.best[warp][16 * mt + m_in_tile] = best;
      s.flags[warp][16 * mt + m_in_tile] = flags;
    }
  }
  __syncthreads();
  // The race is an exact argmax: the warps merge in any order.
  for (int64_t m = threadIdx.x; m < R; m += kFusedBlock) {
    RaceBest best = race_empty();
    int32_t flags = 0;
#pragma unroll
    for (int w = 0; w < kFusedWarps; ++w) {
      best = race_merge(best, s.best[w][m]);
      flags |= s.flags[w][m];
    }
    partials[(r_base + m) * tiles + tile] = SamplePartial{best.score, best.index, flags, 0};
  }
#else
  __trap();
#endif
}

// Step k (1..G) with the bias fused in; no b.bias needed. The caller checked
// markov_fused_fits. `may_filter` as markov_step_launch.
template <typename T, typename W>
cudaError_t markov_fused_step_launch(const MarkovArgs<T>& a, int32_t k, const MarkovBuffers& b, const W* w1,
                                     const W* w2, int32_t rank, bool may_filter, cudaStream_t stream) {
  const int64_t R = a.num_requests, V = a.vocab;
  if (R == 0) return cudaSuccess;
  if (!markov_fused_fits(V, rank, w1, w2)) return cudaErrorInvalidValue;
  const int64_t tiles = markov_fused_tiles(V);
  SamplePartial* partials = markov_fused_partials(b);
  const int mtiles = markov_fused_mtiles(R, rank);
  const int64_t groups = (R + 16 * mtiles - 1) / (16 * mtiles);
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(tiles));
  switch (mtiles) {
    case 1:
      markov_fused_step_kernel<T, W, 1><<<grid, kFusedBlock, 0, stream>>>(a, k, b, w1, w2, rank, partials, tiles);
      break;
    case 2:
      markov_fused_step_kernel<T, W, 2><<<grid, kFusedBlock, 0, stream>>>(a, k, b, w1, w2, rank, partials, tiles);
      break;
    default:
      markov_fused_step_kernel<T, W, 4><<<grid, kFusedBlock, 0, stream>>>(a, k, b, w1, w2, rank, partials, tiles);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return markov_step_launch<T>(a, k, b, may_filter, stream, partials, tiles);
}

}  // namespace dspark

#ifdef DSPARK_KERNEL_CHECK  // make cuda-check: compile every instantiation
#define DSPARK_FUSED_CHECK(T, W)                                                                                \
  template cudaError_t dspark::markov_fused_step_launch<T, W>(const dspark::MarkovArgs<T>&, int32_t,          \
                                                                const dspark::MarkovBuffers&, const W*, const W*, \
                                                                int32_t, bool, cudaStream_t);
DSPARK_FUSED_CHECK(float, __half)
DSPARK_FUSED_CHECK(float, __nv_bfloat16)
DSPARK_FUSED_CHECK(__half, __half)
DSPARK_FUSED_CHECK(__half, __nv_bfloat16)
DSPARK_FUSED_CHECK(__nv_bfloat16, __half)
DSPARK_FUSED_CHECK(__nv_bfloat16, __nv_bfloat16)
#undef DSPARK_FUSED_CHECK
#endif
