// markov_draft's fused step for small batches (R <= kGemvMaxR): one kernel
// computes the bias rows w1[x_{k-1}] @ w2 for its 256 columns, adds them to
// the base logits, writes the corrected rows and races them -- w2 is read
// once per step and no fp32 bias goes through global memory (the cuBLAS path
// writes and re-reads R x V fp32 per step, and at R = 1 it is a GEMV that
// pays three launches). The top-k/top-p mask and the merge are the unfused
// path's kernels (markov_finish_step_launch), with 256-entry chunks.
//
//   markov_gemv_kernel  [ceil(V / 256)] blocks of 256: 8 warps split the
//                       rank, each lane owns 8 columns (one 16-byte vector of
//                       a 2-byte w2 row); partial sums meet in shared memory
//                       in warp order; then 64 threads per request take 4
//                       columns each: correct, round, write, race.
// Framework-free: raw pointers, sizes and a stream.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "markov_draft.cuh"

namespace dspark {

constexpr int kGemvMaxR = 4;       // requests per call (64 race threads each)
constexpr int kGemvMaxRank = 512;  // w1 rows staged in shared memory as fp32
constexpr int kGemvBlock = 256;
constexpr int kGemvWarps = kGemvBlock / 32;
constexpr int kGemvCols = 256;      // columns per block: 32 lanes x 8
constexpr int kGemvUnroll = 4;      // w2 rows in flight per lane

inline bool markov_gemv_fits(int64_t R, int64_t rank) { return R >= 1 && R <= kGemvMaxR && rank >= 1 && rank <= kGemvMaxRank; }
inline int64_t markov_gemv_chunks(int64_t V) { return (V + kGemvCols - 1) / kGemvCols; }

// Eight consecutive weights as floats: vector loads when aligned and whole.
__device__ __forceinline__ void load8(const float* p, int count, bool aligned, float (&x)[8]) {
  if (aligned && count == 8) {
    const float4 u = reinterpret_cast<const float4*>(p)[0], v = reinterpret_cast<const float4*>(p)[1];
    x[0] = u.x, x[1] = u.y, x[2] = u.z, x[3] = u.w, x[4] = v.x, x[5] = v.y, x[6] = v.z, x[7] = v.w;
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = j < count ? p[j] : 0.0f;
  }
}
template <typename W>  // __half or __nv_bfloat16
__device__ __forceinline__ void load8(const W* p, int count, bool aligned, float (&x)[8]) {
  if (aligned && count == 8) {
    unpack16(*reinterpret_cast<const uint4*>(p), p, x);
  } else {
    const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = j < count ? bits_to_float(q[j], p) : 0.0f;
  }
}

// w1 [V, rank] and w2 [rank, V] contiguous, of the logits' type T.
template <typename T>
__global__ void __launch_bounds__(kGemvBlock, 1)
    markov_gemv_kernel(MarkovArgs<T> a, int32_t k, MarkovBuffers b, const T* __restrict__ w1,
                       const T* __restrict__ w2, int32_t rank) {
  __shared__ float s_w1[kGemvMaxR][kGemvMaxRank];
  __shared__ float s_part[kGemvWarps][kGemvMaxR][kGemvCols];
  __shared__ RaceBest s_best[kGemvWarps];
  __shared__ int32_t s_flags[kGemvWarps];
  const int R = a.num_requests;
  const int64_t V = a.vocab;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kGemvCols;

  for (int i = threadIdx.x; i < R * rank; i += kGemvBlock) {
    const int r = i / rank, j = i - r * rank;
    s_w1[r][j] = to_float(w1[b.prev[r] * rank + j]);
  }
  __syncthreads();

  // Partial sums over ranks j = warp, warp + 8, ... (ascending), 8 columns per lane.
  float acc[kGemvMaxR][8];
#pragma unroll
  for (int r = 0; r < kGemvMaxR; ++r)
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[r][c] = 0.0f;
  const int64_t col0 = tile0 + 8 * lane;
  const int count = V - col0 >= 8 ? 8 : (V > col0 ? static_cast<int>(V - col0) : 0);
  const bool aligned = reinterpret_cast<uintptr_t>(w2) % 16 == 0 && (V * sizeof(T)) % 16 == 0;
  if (count > 0) {
    for (int j0 = warp; j0 < rank; j0 += kGemvWarps * kGemvUnroll) {
      float x[kGemvUnroll][8];
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
        const int j = j0 + u * kGemvWarps;
        if (j < rank) load8(w2 + static_cast<int64_t>(j) * V + col0, count, aligned, x[u]);
      }
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
        const int j = j0 + u * kGemvWarps;
        if (j >= rank) break;
#pragma unroll
        for (int r = 0; r < kGemvMaxR; ++r) {
          if (r >= R) break;
          const float w = s_w1[r][j];
#pragma unroll
          for (int c = 0; c < 8; ++c) acc[r][c] = fmaf(w, x[u][c], acc[r][c]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kGemvMaxR; ++r) {
    if (r >= R) break;
#pragma unroll
    for (int c = 0; c < 8; ++c) s_part[warp][r][8 * lane + c] = acc[r][c];
  }
  __syncthreads();

  // 64 threads per request, 4 columns each (one Philox group): the corrected
  // row as markov_correct_kernel writes it, and the race.
  const int r = threadIdx.x >> 6, g = threadIdx.x & 63;
  RaceBest best = race_empty();
  int32_t flags = 0;
  if (r < R) {
    const int64_t i0 = tile0 + 4 * g;
    const int cnt = V - i0 >= 4 ? 4 : (V > i0 ? static_cast<int>(V - i0) : 0);
    T* __restrict__ out = a.draft_logits + (static_cast<int64_t>(r) * a.group + k - 1) * V;
    if (!markov_live(a, b.live, r, k)) {
      for (int j = 0; j < cnt; ++j) store_rounded(out + i0 + j, -INFINITY);
    } else if (cnt > 0) {
      const T* __restrict__ base = a.base + r * a.base_stride_r + (k - 1) * a.base_stride_g;
      const float t = a.temperature[r];
      float l[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (j >= cnt) {
          l[j] = 0.0f;
          continue;
        }
        float bias = 0.0f;
#pragma unroll
        for (int w = 0; w < kGemvWarps; ++w) bias += s_part[w][r][4 * g + j];
        l[j] = store_rounded(out + i0 + j, markov_corrected(to_float(base[i0 + j]), bias, t));
      }
      if (!markov_filtered(a, r)) race_offer_group(best, flags, markov_race_row(t), markov_stream(a, r, k), i0 >> 2, l, cnt);
    }
  }
  best = warp_race_merge(best);
  flags = warp_or(flags);
  if (lane == 0) {
    s_best[warp] = best;
    s_flags[warp] = flags;
  }
  __syncthreads();
  if (threadIdx.x < R) {  // request t's two warps
    const int w = 2 * threadIdx.x;
    const RaceBest m = race_merge(s_best[w], s_best[w + 1]);
    b.partials[static_cast<int64_t>(threadIdx.x) * gridDim.x + blockIdx.x] =
        SamplePartial{m.score, m.index, s_flags[w] | s_flags[w + 1], 0};
  }
}

// Step k (1..G), fused; b.bias unused. Partials [R, markov_gemv_chunks(V)].
template <typename T>
cudaError_t markov_gemv_step_launch(const MarkovArgs<T>& a, int32_t k, const MarkovBuffers& b, const T* w1,
                                    const T* w2, int32_t rank, bool may_filter, cudaStream_t stream) {
  if (a.num_requests == 0) return cudaSuccess;
  if (!markov_gemv_fits(a.num_requests, rank)) return cudaErrorInvalidConfiguration;
  const int64_t chunks = markov_gemv_chunks(a.vocab);
  markov_gemv_kernel<T><<<static_cast<unsigned>(chunks), kGemvBlock, 0, stream>>>(a, k, b, w1, w2, rank);
  return markov_finish_step_launch(a, k, b, may_filter, chunks, kGemvCols, stream);
}

}  // namespace dspark

#ifdef DSPARK_KERNEL_CHECK  // make cuda-check: compile every instantiation
template cudaError_t dspark::markov_gemv_step_launch<float>(const dspark::MarkovArgs<float>&, int32_t,
                                                            const dspark::MarkovBuffers&, const float*, const float*,
                                                            int32_t, bool, cudaStream_t);
template cudaError_t dspark::markov_gemv_step_launch<__half>(const dspark::MarkovArgs<__half>&, int32_t,
                                                             const dspark::MarkovBuffers&, const __half*,
                                                             const __half*, int32_t, bool, cudaStream_t);
template cudaError_t dspark::markov_gemv_step_launch<__nv_bfloat16>(const dspark::MarkovArgs<__nv_bfloat16>&, int32_t,
                                                                    const dspark::MarkovBuffers&,
                                                                    const __nv_bfloat16*, const __nv_bfloat16*,
                                                                    int32_t, bool, cudaStream_t);
#endif
