// The `sample` op's CUDA kernels (DESIGN §2): the exponential race over a
// row's vocabulary, split across blocks so one request fills the GPU, with
// the top-k/top-p threshold found first when a request asks for one.
// Framework-free: raw pointers, sizes and a stream.
//
//   sample_threshold_kernel  one block per request; only when top-k/top-p
//                            may be on. Re-reads the row (passes: 4 for
//                            top-k, 1 + 4 for top-p). Small batches take
//                            split_select.cuh's launches instead: the same
//                            keys, each row split across many blocks.
//   sample_race_kernel       [R * chunks] blocks; reads each logit once.
//   sample_finalize_kernel   a warp per request merges its chunks' partials.
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../core/sample_args.h"
#include "block_reduce.cuh"
#include "dtype.cuh"
#include "radix_select.cuh"
#include "split_select.cuh"

namespace dspark {

constexpr int kSampleRaceBlock = 256;
constexpr int kSampleThresholdBlock = 512;
constexpr int kSampleFinalizeWarps = 4;

// keep_keys [R]: the smallest order key request r keeps (0 = all).
template <typename T>
__global__ void __launch_bounds__(kSampleThresholdBlock, 1)
    sample_threshold_kernel(SampleArgs<T> a, uint32_t* __restrict__ keep_keys) {
  const int64_t r = blockIdx.x;
  const int64_t row = sample_row(a, r);
  if (row < 0 || !sample_filtered(a, r)) {
    if (threadIdx.x == 0) keep_keys[r] = 0;
    return;
  }
  const uint32_t keep = block_row_keep_key<kSampleThresholdBlock>(a.logits + row * a.row_stride, a.vocab,
                                                                  a.temperature[r], a.top_k[r], a.top_p[r]);
  if (threadIdx.x == 0) keep_keys[r] = keep;
}

// split_select.cuh's view of a batch: request r's row, filter and parameters.
template <typename T>
struct SampleSelectRows {
  SampleArgs<T> a;
  DSPARK_HD int64_t rows() const { return a.num_requests; }
  DSPARK_HD int64_t n() const { return a.vocab; }
  __device__ bool filtered(int64_t r) const { return sample_row(a, r) >= 0 && sample_filtered(a, r); }
  __device__ const T* logits(int64_t r) const { return a.logits + sample_row(a, r) * a.row_stride; }
  __device__ float temperature(int64_t r) const { return a.temperature[r]; }
  __device__ int32_t top_k(int64_t r) const { return a.top_k[r]; }
  __device__ float top_p(int64_t r) const { return a.top_p[r]; }
};

// partials [R, chunks]: each block's best candidate and flags.
template <typename T>
__global__ void __launch_bounds__(kSampleRaceBlock, 1)
    sample_race_kernel(SampleArgs<T> a, const uint32_t* __restrict__ keep_keys,
                       SamplePartial* __restrict__ partials, int64_t num_chunks,
                       int64_t chunk_len) {
  const int64_t r = blockIdx.x / num_chunks;
  const int64_t chunk = blockIdx.x - r * num_chunks;
  RaceBest best = race_empty();
  int32_t flags = 0;
  const int64_t row = sample_row(a, r);
  if (row < 0) {
    flags = kBadLengths;
  } else {
    const RaceRow rr{sample_greedy(a, r), a.temperature[r], keep_keys ? keep_keys[r] : 0u};
    const T* __restrict__ logits = a.logits + row * a.row_stride;
    const int64_t begin = chunk * chunk_len;
    const int64_t end = begin + chunk_len < a.vocab ? begin + chunk_len : a.vocab;
    const RaceStream stream{a.seed[r], a.position[r], a.purpose, static_cast<uint32_t>(a.slot[r])};
    // begin is a multiple of 4, so every group is aligned when the row is.
    const bool aligned = reinterpret_cast<uintptr_t>(logits) % (4 * sizeof(T)) == 0;
    for (int64_t i = begin + 4 * threadIdx.x; i < end; i += 4 * kSampleRaceBlock) {
      float l[4];
      const int count = end - i < 4 ? static_cast<int>(end - i) : 4;
      load4(logits + i, count, aligned, l);
      race_offer_group(best, flags, rr, stream, i >> 2, l, count);
    }
  }
  block_race_merge<kSampleRaceBlock>(best, flags);
  if (threadIdx.x == 0) partials[blockIdx.x] = SamplePartial{best.score, best.index, flags, 0};
}

// Merges partials[first], partials[first + step], ... (below n) into best
// and flags: one thread's share of a row's chunk partials.
__device__ __forceinline__ void merge_partials_strided(const SamplePartial* __restrict__ partials, int64_t n,
                                                       int64_t first, int64_t step, RaceBest& best,
                                                       int32_t& flags) {
  for (int64_t c = first; c < n; c += step) {
    const SamplePartial p = partials[c];
    best = race_merge(best, RaceBest{p.score, p.index});
    flags |= p.flags;
  }
}

// One warp merges a row's chunk partials [num_chunks]: every lane gets the
// row's best candidate and flags.
__device__ __forceinline__ void warp_merge_partials(const SamplePartial* __restrict__ row_partials,
                                                    int64_t num_chunks, RaceBest& best, int32_t& flags) {
  best = race_empty();
  flags = 0;
  merge_partials_strided(row_partials, num_chunks, threadIdx.x & 31, 32, best, flags);
  best = warp_race_merge(best);
  flags = warp_or(flags);
}

template <typename T>
__global__ void __launch_bounds__(kSampleFinalizeWarps * 32)
    sample_finalize_kernel(SampleArgs<T> a, const SamplePartial* __restrict__ partials,
                           int64_t num_chunks) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kSampleFinalizeWarps + (threadIdx.x >> 5);
  if (r >= a.num_requests) return;
  RaceBest best;
  int32_t flags;
  warp_merge_partials(partials + r * num_chunks, num_chunks, best, flags);
  if ((threadIdx.x & 31) == 0) race_finish(best, flags, a.tokens[r], a.status[r]);
}

// keep_keys [R]: the top-k/top-p keep key of each request's row alone (the
// `keep_key` op: what markov_draft masks its written logits with).
// split_workspace: split_select_workspace_bytes(R) bytes to take the split
// path where split_select_splits(R, V) > 0, or nullptr for one block a row.
template <typename T>
cudaError_t sample_keep_keys_launch(const SampleArgs<T>& a, uint32_t* keep_keys, void* split_workspace,
                                    cudaStream_t stream) {
  if (a.num_requests == 0) return cudaSuccess;
  const int64_t splits = split_workspace ? split_select_splits(a.num_requests, a.vocab) : 0;
  if (splits > 0) return split_select_launch(SampleSelectRows<T>{a}, splits, split_workspace, keep_keys, stream);
  sample_threshold_kernel<T><<<static_cast<unsigned>(a.num_requests), kSampleThresholdBlock, 0, stream>>>(a, keep_keys);
  return cudaGetLastError();
}

// workspace: sample_workspace_bytes(R, V) bytes. `may_filter`: false when
// top-k and top-p are off for every request (skips the threshold kernel).
// `split_select`: small batches find their thresholds with each row split
// across blocks (split_select.cuh; same keys), else one block per row.
template <typename T>
cudaError_t sample_launch(const SampleArgs<T>& a, void* workspace, bool may_filter, bool split_select,
                          cudaStream_t stream) {
  const int64_t R = a.num_requests;
  if (R == 0) return cudaSuccess;
  const int64_t chunks = split_chunks(R, a.vocab);  // the race is an exact argmax: any split gives the same token
  if (R * chunks > INT32_MAX) return cudaErrorInvalidConfiguration;
  const int64_t chunk_len = split_chunk_len(a.vocab, chunks);
  const SampleWorkspace layout = sample_workspace(R, a.vocab);
  char* ws = static_cast<char*>(workspace);
  uint32_t* keep_keys = may_filter ? reinterpret_cast<uint32_t*>(ws) : nullptr;
  auto* partials = reinterpret_cast<SamplePartial*>(ws + layout.partials_offset);
  if (may_filter) {
    const cudaError_t err =
        sample_keep_keys_launch(a, keep_keys, split_select ? ws + layout.split_offset : nullptr, stream);
    if (err != cudaSuccess) return err;
  }
  sample_race_kernel<T><<<static_cast<unsigned>(R * chunks), kSampleRaceBlock, 0, stream>>>(
      a, keep_keys, partials, chunks, chunk_len);
  const unsigned fin_blocks = static_cast<unsigned>((R + kSampleFinalizeWarps - 1) / kSampleFinalizeWarps);
  sample_finalize_kernel<T><<<fin_blocks, kSampleFinalizeWarps * 32, 0, stream>>>(a, partials, chunks);
  return cudaGetLastError();
}

}  // namespace dspark

#ifdef DSPARK_KERNEL_CHECK  // make cuda-check: compile every instantiation
template cudaError_t dspark::sample_launch<float>(const dspark::SampleArgs<float>&, void*, bool, bool, cudaStream_t);
template cudaError_t dspark::sample_launch<__half>(const dspark::SampleArgs<__half>&, void*, bool, bool, cudaStream_t);
template cudaError_t dspark::sample_launch<__nv_bfloat16>(const dspark::SampleArgs<__nv_bfloat16>&, void*, bool, bool,
                                                          cudaStream_t);
template cudaError_t dspark::sample_keep_keys_launch<float>(const dspark::SampleArgs<float>&, uint32_t*, void*,
                                                            cudaStream_t);
template cudaError_t dspark::sample_keep_keys_launch<__half>(const dspark::SampleArgs<__half>&, uint32_t*, void*,
                                                             cudaStream_t);
template cudaError_t dspark::sample_keep_keys_launch<__nv_bfloat16>(const dspark::SampleArgs<__nv_bfloat16>&, uint32_t*,
                                                                    void*, cudaStream_t);
#endif
