// The `markov_draft` op's CUDA kernels (DESIGN §3), one step k at a time;
// the bias rows w1[x_{k-1}] @ w2 [R, V] fp32 come first: markov_bias_kernel
// for fp32 weights, cuBLAS through torch for bf16/fp16 ones
// (csrc/cuda/markov_draft.cu). Per step, without a host synchronisation:
//   markov_correct_kernel     [R * chunks] blocks: the corrected row, written
//                             in the logits' dtype; raced right there unless
//                             the request is top-k/top-p filtered.
//   sample_threshold_kernel   (filtered requests only) the keep key of the
//                             written row at temperature 1 (sample.cuh; small
//                             batches: split_select.cuh, the same keys).
//   markov_mask_race_kernel   (filtered requests only) masks below the key,
//                             writes -inf there, races what is kept.
//   markov_finalize_kernel    a warp per request: merges the race, writes
//                             x_k and the status, advances the state
//                             (after the fused step: a block per request,
//                             markov_finalize_fused_kernel).
// Framework-free: raw pointers, sizes and a stream.
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../core/markov.h"
#include "../core/markov_workspace.h"
#include "../core/sample_args.h"
#include "block_reduce.cuh"
#include "dtype.cuh"
#include "sample.cuh"

namespace dspark {

constexpr int kMarkovBlock = 256;
constexpr int kMarkovFinalizeWarps = 4;

inline int64_t markov_chunks(int64_t R, int64_t V) { return split_chunks(R, V); }

// The bias rows w1[x_{k-1}] @ w2 [R, V] of fp32 weights, summed as the CPU op
// sums them: per entry, each product rounded and added in ascending rank
// (__fmul_rn / __fadd_rn: nvcc may not fuse them), so the bits are the CPU's
// and depend neither on R nor on torch's TF32 switch, as cuBLAS's would. A
// thread takes 4 columns of kBiasRequests requests: w2 is read once per
// group of requests. Grid: request groups on x (consecutive blocks share
// w2's columns in L2), vocabulary blocks on y (at most 2^23 / 1024).
// (bf16/fp16 weights take cuBLAS: products of two 16-bit values are exact
// in fp32, and w2 is half the bytes.)
constexpr int kBiasRequests = 8;

__global__ void __launch_bounds__(kMarkovBlock)
    markov_bias_kernel(const float* __restrict__ w1, const float* __restrict__ w2, const int64_t* __restrict__ prev,
                       int64_t R, int64_t rank, int64_t V, float* __restrict__ bias) {
  const int64_t v0 = 4 * (static_cast<int64_t>(blockIdx.y) * kMarkovBlock + threadIdx.x);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBiasRequests;
  if (v0 >= V) return;
  const int count = V - v0 < 4 ? static_cast<int>(V - v0) : 4;
  const int rows = R - r0 < kBiasRequests ? static_cast<int>(R - r0) : kBiasRequests;
  const bool aligned = V % 4 == 0 && reinterpret_cast<uintptr_t>(w2) % 16 == 0;
  const float* w1_row[kBiasRequests];
#pragma unroll
  for (int q = 0; q < kBiasRequests; ++q) w1_row[q] = w1 + prev[r0 + (q < rows ? q : rows - 1)] * rank;
  float acc[kBiasRequests][4];
#pragma unroll
  for (int q = 0; q < kBiasRequests; ++q)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[q][c] = 0.0f;
#pragma unroll 4
  for (int64_t j = 0; j < rank; ++j) {
    float w[4];
    load4(w2 + j * V + v0, count, aligned, w);
#pragma unroll
    for (int q = 0; q < kBiasRequests; ++q) {
      const float s = w1_row[q][j];
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[q][c] = __fadd_rn(acc[q][c], __fmul_rn(s, w[c]));
    }
  }
#pragma unroll
  for (int q = 0; q < kBiasRequests; ++q)
    if (q < rows)
      for (int c = 0; c < count; ++c) bias[(r0 + q) * V + v0 + c] = acc[q][c];
}

template <typename T>
__global__ void markov_start_kernel(MarkovArgs<T> a, MarkovBuffers b) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= a.num_requests) return;
  const MarkovState s = markov_start(a.anchor[r], a.vocab, a.status[r]);
  b.prev[r] = s.prev;
  b.live[r] = s.live;
  b.race_t[r] = a.temperature[r] > 0.0f ? 1.0f : 0.0f;  // NaN: 0
}

template <typename T>
__device__ __forceinline__ bool markov_live(const MarkovArgs<T>& a, const int32_t* live, int64_t r, int32_t k) {
  return live[r] != 0 && markov_limit(a, r) >= k;
}

// One group of 4 entries (indices 4g..): corrected from the base values u
// and the bias z, rounded and written to out, and raced unless the request
// is filtered (its written row is masked and raced later).
template <typename T>
__device__ __forceinline__ void markov_write_group(T* out, int count, bool aligned, const float (&u)[4],
                                                   const float (&z)[4], float t, bool race_here, const RaceRow& rr,
                                                   const RaceStream& stream, int64_t g, RaceBest& best,
                                                   int32_t& flags) {
  float v[4], l[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) v[j] = markov_corrected(u[j], z[j], t);
  store4_rounded(out, count, aligned, v, l);
  if (race_here) race_offer_group(best, flags, rr, stream, g, l, count);
}

template <typename T>
__global__ void __launch_bounds__(kMarkovBlock)
    markov_correct_kernel(MarkovArgs<T> a, int32_t k, MarkovBuffers b, int64_t num_chunks, int64_t chunk_len) {
  const int64_t r = blockIdx.x / num_chunks;
  const int64_t chunk = blockIdx.x - r * num_chunks;
  const int64_t V = a.vocab;
  const int64_t begin = chunk * chunk_len;
  const int64_t end = begin + chunk_len < V ? begin + chunk_len : V;
  T* __restrict__ out = a.draft_logits + (r * a.group + k - 1) * V;
  RaceBest best = race_empty();
  int32_t flags = 0;
  if (!markov_live(a, b.live, r, k)) {
    for (int64_t i = begin + threadIdx.x; i < end; i += kMarkovBlock) store_rounded(out + i, -INFINITY);
  } else {
    const T* __restrict__ base = a.base + r * a.base_stride_r + (k - 1) * a.base_stride_g;
    const float* __restrict__ bias = b.bias + r * V;
    const float t = a.temperature[r];
    const bool race_here = !markov_filtered(a, r);
    const RaceRow rr = markov_race_row(t);
    const RaceStream stream = markov_stream(a, r, k);
    // begin is a multiple of 4: whole groups, vector accesses where a row is aligned.
    const bool base_aligned = reinterpret_cast<uintptr_t>(base) % (4 * sizeof(T)) == 0;
    const bool bias_aligned = reinterpret_cast<uintptr_t>(bias) % 16 == 0;
    const bool out_aligned = reinterpret_cast<uintptr_t>(out) % (4 * sizeof(T)) == 0;
    constexpr int kGroups = 2;  // groups of 4 per thread whose loads are in flight together
    for (int64_t i = begin + 4 * threadIdx.x; i < end; i += 4 * kGroups * kMarkovBlock) {
      float u[kGroups][4], z[kGroups][4];
      int count[kGroups];
#pragma unroll
      for (int h = 0; h < kGroups; ++h) {
        const int64_t ih = i + h * 4 * kMarkovBlock;
        count[h] = ih < end ? (end - ih < 4 ? static_cast<int>(end - ih) : 4) : 0;
        if (count[h] > 0) {
          load4(base + ih, count[h], base_aligned, u[h]);
          load4(bias + ih, count[h], bias_aligned, z[h]);
        }
      }
      // The race is an exact argmax: the groups may be offered in any order.
#pragma unroll
      for (int h = 0; h < kGroups; ++h) {
        if (count[h] == 0) continue;
        const int64_t ih = i + h * 4 * kMarkovBlock;
        markov_write_group(out + ih, count[h], out_aligned, u[h], z[h], t, race_here, rr, stream, ih >> 2, best,
                           flags);
      }
    }
  }
  block_race_merge<kMarkovBlock>(best, flags);
  if (threadIdx.x == 0) b.partials[blockIdx.x] = SamplePartial{best.score, best.index, flags, 0};
}

template <typename T>
__global__ void __launch_bounds__(kMarkovBlock)
    markov_mask_race_kernel(MarkovArgs<T> a, int32_t k, MarkovBuffers b, int64_t num_chunks, int64_t chunk_len) {
  const int64_t r = blockIdx.x / num_chunks;
  // Uniform over the block: unfiltered rows keep the correct kernel's partials.
  if (!markov_live(a, b.live, r, k) || !markov_filtered(a, r)) return;
  const int64_t chunk = blockIdx.x - r * num_chunks;
  const int64_t V = a.vocab;
  const int64_t begin = chunk * chunk_len;
  const int64_t end = begin + chunk_len < V ? begin + chunk_len : V;
  T* __restrict__ row = a.draft_logits + (r * a.group + k - 1) * V;
  const uint32_t keep = b.keep_keys[r];
  const RaceRow rr = markov_race_row(a.temperature[r]);
  const RaceStream stream = markov_stream(a, r, k);
  RaceBest best = race_empty();
  int32_t flags = 0;
  for (int64_t i = begin + 4 * threadIdx.x; i < end; i += 4 * kMarkovBlock) {
    const int count = end - i < 4 ? static_cast<int>(end - i) : 4;
    float l[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      l[j] = j < count ? to_float(row[i + j]) : 0.0f;
      if (j < count && markov_masked(l[j], keep)) l[j] = store_rounded(row + i + j, -INFINITY);
    }
    race_offer_group(best, flags, rr, stream, i >> 2, l, count);
  }
  block_race_merge<kMarkovBlock>(best, flags);
  if (threadIdx.x == 0) b.partials[blockIdx.x] = SamplePartial{best.score, best.index, flags, 0};
}

// Request r's step k after its race: x_k, the status and the state.
template <typename T>
__device__ __forceinline__ void markov_finish(const MarkovArgs<T>& a, int32_t k, const MarkovBuffers& b, int64_t r,
                                              bool live_k, const RaceBest& best, int32_t flags) {
  int32_t token = -1, step_status = 0;
  if (live_k) race_finish(best, flags, token, step_status);
  MarkovState s{b.prev[r], b.live[r]};
  markov_advance(s, live_k, token, step_status, a.tokens[r * a.group + k - 1], a.status[r]);
  b.prev[r] = s.prev;
  b.live[r] = s.live;
}

template <typename T>
__global__ void __launch_bounds__(kMarkovFinalizeWarps * 32)
    markov_finalize_kernel(MarkovArgs<T> a, int32_t k, MarkovBuffers b, int64_t num_chunks) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kMarkovFinalizeWarps + (threadIdx.x >> 5);
  if (r >= a.num_requests) return;
  RaceBest best;
  int32_t flags;
  warp_merge_partials(b.partials + r * num_chunks, num_chunks, best, flags);
  if ((threadIdx.x & 31) == 0) markov_finish(a, k, b, r, markov_live(a, b.live, r, k), best, flags);
}

// After the fused step (markov_fused.cuh): a block per request, as its
// unfiltered requests have ~V / 128 partials each ([R, fused_tiles]; a warp
// would wait on dozens of dependent rounds of loads); filtered requests read
// the mask-race kernel's [R, num_chunks].
template <typename T>
__global__ void __launch_bounds__(kMarkovBlock)
    markov_finalize_fused_kernel(MarkovArgs<T> a, int32_t k, MarkovBuffers b, int64_t num_chunks,
                                 const SamplePartial* __restrict__ fused, int64_t fused_tiles) {
  const int64_t r = blockIdx.x;
  const bool live_k = markov_live(a, b.live, r, k);  // the same for the block
  RaceBest best = race_empty();
  int32_t flags = 0;
  if (live_k) {  // only live requests' partials were written this step
    const bool from_fused = !markov_filtered(a, r);
    const SamplePartial* p = from_fused ? fused + r * fused_tiles : b.partials + r * num_chunks;
    merge_partials_strided(p, from_fused ? fused_tiles : num_chunks, threadIdx.x, kMarkovBlock, best, flags);
  }
  block_race_merge<kMarkovBlock>(best, flags);
  if (threadIdx.x == 0) markov_finish(a, k, b, r, live_k, best, flags);
}

template <typename T>
cudaError_t markov_start_launch(const MarkovArgs<T>& a, const MarkovBuffers& b, cudaStream_t stream) {
  if (a.num_requests == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((a.num_requests + 127) / 128);
  markov_start_kernel<T><<<blocks, 128, 0, stream>>>(a, b);
  return cudaGetLastError();
}

// The fp32 bias rows of step k into `bias` (markov_bias_kernel); prev: x_{k-1}.
inline cudaError_t markov_bias_launch(const float* w1, const float* w2, const int64_t* prev, int64_t R, int64_t rank,
                                      int64_t V, float* bias, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  const int64_t groups = (R + kBiasRequests - 1) / kBiasRequests;
  const int64_t blocks = (V + 4 * kMarkovBlock - 1) / (4 * kMarkovBlock);
  if (groups > INT32_MAX || blocks > 65535) return cudaErrorInvalidConfiguration;
  markov_bias_kernel<<<dim3(static_cast<unsigned>(groups), static_cast<unsigned>(blocks)), kMarkovBlock, 0, stream>>>(
      w1, w2, prev, R, rank, V, bias);
  return cudaGetLastError();
}

// Step k (1..G) after the caller wrote b.bias. `may_filter`: false when
// top-k and top-p are off for every request (skips two kernels). `fused`:
// the partials [R, fused_tiles] of markov_fused_step_kernel, which already
// wrote the rows (markov_fused.cuh; the correct kernel is skipped), or nullptr.
template <typename T>
cudaError_t markov_step_launch(const MarkovArgs<T>& a, int32_t k, const MarkovBuffers& b, bool may_filter,
                               cudaStream_t stream, const SamplePartial* fused = nullptr, int64_t fused_tiles = 0) {
  const int64_t R = a.num_requests, V = a.vocab;
  if (R == 0) return cudaSuccess;
  const int64_t chunks = markov_chunks(R, V);
  if (R * chunks > INT32_MAX) return cudaErrorInvalidConfiguration;
  const int64_t chunk_len = split_chunk_len(V, chunks);
  const unsigned grid = static_cast<unsigned>(R * chunks);
  if (fused == nullptr) markov_correct_kernel<T><<<grid, kMarkovBlock, 0, stream>>>(a, k, b, chunks, chunk_len);
  if (may_filter) {
    SampleArgs<T> s{};
    s.logits = a.draft_logits + static_cast<int64_t>(k - 1) * V;
    s.row_stride = static_cast<int64_t>(a.group) * V;
    s.num_rows = R;
    s.vocab = a.vocab;
    s.num_requests = a.num_requests;
    s.row_start = nullptr;
    s.temperature = PerRequest<float>{b.race_t, 1, 1.0f};
    s.top_k = a.top_k;
    s.top_p = a.top_p;
    s.seed = PerRequest<int64_t>{nullptr, 0, 0};
    s.position = PerRequest<int64_t>{nullptr, 0, 0};
    s.slot = PerRequest<int32_t>{nullptr, 0, 0};
    s.purpose = kPurposeDraft;
    const cudaError_t err = sample_keep_keys_launch(s, b.keep_keys, b.split_select, stream);
    if (err != cudaSuccess) return err;
    markov_mask_race_kernel<T><<<grid, kMarkovBlock, 0, stream>>>(a, k, b, chunks, chunk_len);
  }
  if (fused != nullptr) {
    markov_finalize_fused_kernel<T><<<static_cast<unsigned>(R), kMarkovBlock, 0, stream>>>(a, k, b, chunks, fused,
                                                                                           fused_tiles);
  } else {
    const unsigned fin = static_cast<unsigned>((R + kMarkovFinalizeWarps - 1) / kMarkovFinalizeWarps);
    markov_finalize_kernel<T><<<fin, kMarkovFinalizeWarps * 32, 0, stream>>>(a, k, b, chunks);
  }
  return cudaGetLastError();
}

}  // namespace dspark

#ifdef DSPARK_KERNEL_CHECK  // make cuda-check: compile every instantiation
template cudaError_t dspark::markov_step_launch<float>(const dspark::MarkovArgs<float>&, int32_t,
                                                       const dspark::MarkovBuffers&, bool, cudaStream_t,
                                                       const dspark::SamplePartial*, int64_t);
template cudaError_t dspark::markov_step_launch<__half>(const dspark::MarkovArgs<__half>&, int32_t,
                                                        const dspark::MarkovBuffers&, bool, cudaStream_t,
                                                        const dspark::SamplePartial*, int64_t);
template cudaError_t dspark::markov_step_launch<__nv_bfloat16>(const dspark::MarkovArgs<__nv_bfloat16>&, int32_t,
                                                               const dspark::MarkovBuffers&, bool, cudaStream_t,
                                                               const dspark::SamplePartial*, int64_t);
template cudaError_t dspark::markov_start_launch<float>(const dspark::MarkovArgs<float>&, const dspark::MarkovBuffers&,
                                                        cudaStream_t);
template cudaError_t dspark::markov_start_launch<__half>(const dspark::MarkovArgs<__half>&,
                                                         const dspark::MarkovBuffers&, cudaStream_t);
template cudaError_t dspark::markov_start_launch<__nv_bfloat16>(const dspark::MarkovArgs<__nv_bfloat16>&,
                                                                const dspark::MarkovBuffers&, cudaStream_t);
#endif
