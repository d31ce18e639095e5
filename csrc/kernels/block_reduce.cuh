// Warp and block reductions used by several kernels. Every reduction here is
// over an associative, commutative operation with a total order, so the
// result does not depend on the thread layout.
#pragma once
#include <cstdint>

#include "../core/race.h"

namespace dspark {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

// Lane (lane ^ off)'s race candidate (the whole warp takes part).
__device__ __forceinline__ RaceBest race_shfl_xor(const RaceBest& b, int off) {
  RaceBest o;
  o.score = __shfl_xor_sync(kFullMask, b.score, off);
  o.index = __shfl_xor_sync(kFullMask, b.index, off);
  return o;
}

__device__ __forceinline__ RaceBest warp_race_merge(RaceBest b) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) b = race_merge(b, race_shfl_xor(b, off));
  return b;
}

__device__ __forceinline__ int32_t warp_or(int32_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v |= __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// __shfl_xor_sync of any trivially copyable struct, word by word.
template <typename T>
__device__ __forceinline__ T shfl_xor_struct(const T& v, int lane_mask) {
  static_assert(sizeof(T) % 4 == 0, "struct of 32-bit words");
  constexpr int kWords = sizeof(T) / 4;
  const uint32_t* in = reinterpret_cast<const uint32_t*>(&v);
  T out;
  uint32_t* o = reinterpret_cast<uint32_t*>(&out);
#pragma unroll
  for (int w = 0; w < kWords; ++w) o[w] = __shfl_xor_sync(kFullMask, in[w], lane_mask);
  return out;
}

// Butterfly reduction of a full warp with `merge`; every lane gets the
// result. A fixed tree: the same inputs always give the same bits.
template <typename T, typename Merge>
__device__ __forceinline__ T warp_reduce(T v, Merge merge) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = merge(v, shfl_xor_struct(v, off));
  return v;
}

// Whole-block reduction with `merge`; the result is valid in thread 0.
// `scratch` holds kBlock / 32 values of T in shared memory.
template <int kBlock, typename T, typename Merge>
__device__ __forceinline__ T block_reduce(T v, Merge merge, T* scratch, const T& empty) {
  constexpr int kWarps = kBlock / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v, merge);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? scratch[lane] : empty;
    v = warp_reduce(v, merge);
  }
  return v;
}

// Inclusive prefix sum over the lanes of a full warp (lane 0 first).
template <typename T>
__device__ __forceinline__ T warp_inclusive_sum(T v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const T t = __shfl_up_sync(kFullMask, v, off);
    if (lane >= off) v += t;
  }
  return v;
}

// Whole-block merge of a race and its flags; the result is valid in thread 0.
template <int kBlock>
__device__ __forceinline__ void block_race_merge(RaceBest& best, int32_t& flags) {
  static_assert(kBlock % 32 == 0 && kBlock <= 1024, "block size");
  constexpr int kWarps = kBlock / 32;
  __shared__ RaceBest s_best[kWarps];
  __shared__ int32_t s_flags[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  best = warp_race_merge(best);
  flags = warp_or(flags);
  if (lane == 0) {
    s_best[warp] = best;
    s_flags[warp] = flags;
  }
  __syncthreads();
  if (warp == 0) {
    best = lane < kWarps ? s_best[lane] : race_empty();
    flags = lane < kWarps ? s_flags[lane] : 0;
    best = warp_race_merge(best);
    flags = warp_or(flags);
  }
}

// Block-wide max (NaN ignored); the result is returned to every thread.
template <int kBlock>
__device__ __forceinline__ float block_max(float v) {
  constexpr int kWarps = kBlock / 32;
  __shared__ float s_max[kWarps];
  __shared__ float s_result;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  if (lane == 0) s_max[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? s_max[lane] : -INFINITY;
    v = warp_max(v);
    if (lane == 0) s_result = v;
  }
  __syncthreads();
  return s_result;
}

}  // namespace dspark
