// Block-wide top-k and top-p thresholds by radix descent over order keys
// (core/filters.h), 8 bits a pass, 4 passes each. One block owns a row; the
// row is re-read every pass (from L2 at the sizes that matter), in 16-byte
// vectors with several loads in flight per thread (block_row_each). Histograms
// are integer (counts, 2^-40 fixed-point masses), so every pass is exact and
// the result does not depend on thread layout or atomic order.
#pragma once
#include <cstdint>

#include "../core/filters.h"
#include "block_reduce.cuh"
#include "dtype.cuh"

namespace dspark {

constexpr int kRadixBins = 256;

// Threads add to a private run while consecutive elements fall in one bin (at
// the first pass nearly all logits share a few exponent bins) and flush it on
// a change, which turns most shared-memory atomics into register adds.
struct BinRun {
  int bin = -1;
  uint32_t count = 0;
  uint64_t mass = 0;

  __device__ __forceinline__ void flush(uint32_t* counts, unsigned long long* masses) {
    if (bin < 0) return;
    atomicAdd(&counts[bin], count);
    if (masses && mass) atomicAdd(&masses[bin], static_cast<unsigned long long>(mass));
    bin = -1;
    count = 0;
    mass = 0;
  }
  __device__ __forceinline__ void add(int b, uint64_t m, uint32_t* counts,
                                      unsigned long long* masses) {
    if (b != bin) {
      flush(counts, masses);
      bin = b;
    }
    ++count;
    mass += m;
  }
};

// One radix pass's choice, made by warp 0 from a finished histogram (shared
// by the one-block selects below and split_select.cuh's, so both give the
// same keys). Lane l owns bins 255-8l .. 248-8l, walked from the top.
//
// top-k: the bin holding the `remaining`-th largest key, and the rank left
// within it; written to bin_out / remaining_out by the lane that finds it.
__device__ __forceinline__ void topk_pick(const uint32_t* counts, uint32_t remaining, uint32_t& bin_out,
                                          uint32_t& remaining_out) {
  const int lane = threadIdx.x & 31;
  uint32_t c[8], lane_sum = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    c[j] = counts[kRadixBins - 1 - (lane * 8 + j)];
    lane_sum += c[j];
  }
  const uint32_t incl = warp_inclusive_sum(lane_sum);
  uint32_t cum = incl - lane_sum;  // count in higher bins
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (cum < remaining && remaining <= cum + c[j]) {
      bin_out = kRadixBins - 1 - (lane * 8 + j);
      remaining_out = remaining - cum;
    }
    cum += c[j];
  }
}

// top-p: the lowest bin the rule keeps given the mass `above` the current
// prefix and Z (`total`; the first pass's own total when `first`, then
// also written to total_out by lane 0), and the mass above that bin.
__device__ __forceinline__ void topp_pick(const uint32_t* counts, const unsigned long long* masses, bool first,
                                          uint64_t above, uint64_t total, float top_p, uint32_t& bin_out,
                                          unsigned long long& above_out, unsigned long long& total_out) {
  const int lane = threadIdx.x & 31;
  uint32_t c[8];
  uint64_t m[8], lane_sum = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int b = kRadixBins - 1 - (lane * 8 + j);
    c[j] = counts[b];
    m[j] = masses[b];
    lane_sum += m[j];
  }
  const uint64_t incl = warp_inclusive_sum(lane_sum);
  // Z (all kept mass) is the first pass's total; later passes reuse it.
  const uint64_t pass_total = __shfl_sync(0xFFFFFFFFu, incl, 31);
  const uint64_t z = first ? pass_total : total;
  if (first && lane == 0) total_out = pass_total;
  uint64_t a = above + (incl - lane_sum);  // mass in higher bins
  int found = -1;
  uint64_t found_above = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (c[j] > 0 && topp_keeps(a, z, top_p)) {
      found = j;
      found_above = a;
    }
    a += m[j];
  }
  // The kept bins are the top ones; the answer is the lowest, i.e. in the
  // highest lane that found one (the top bin always qualifies).
  const unsigned ballot = __ballot_sync(0xFFFFFFFFu, found >= 0);
  const int chosen = 31 - __clz(ballot);
  if (lane == chosen) {
    bin_out = kRadixBins - 1 - (lane * 8 + found);
    above_out = found_above;
  }
}

// The key of the k-th largest row[i] / temperature, i in [0, n), 0 < k <= n: keeping
// key >= result keeps exactly the tokens with fewer than k strictly larger.
template <int kBlock, typename T>
__device__ uint32_t block_topk_key(const T* __restrict__ row, int64_t n, float temperature, uint32_t k) {
  __shared__ uint32_t counts[kRadixBins];
  __shared__ uint32_t s_bin, s_remaining;
  const int warp = threadIdx.x >> 5;
  uint32_t prefix = 0, mask = 0, remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < kRadixBins; b += kBlock) counts[b] = 0;
    __syncthreads();
    BinRun run;
    block_row_each<kBlock>(row, n, [&](float l) {
      const uint32_t key = float_key(l / temperature);
      if ((key & mask) == prefix) run.add((key >> shift) & 0xFF, 0, counts, nullptr);
    });
    run.flush(counts, nullptr);
    __syncthreads();
    if (warp == 0) topk_pick(counts, remaining, s_bin, s_remaining);
    __syncthreads();
    prefix |= s_bin << shift;
    mask |= 0xFFu << shift;
    remaining = s_remaining;
    __syncthreads();  // s_bin is rewritten next pass
  }
  return prefix;
}

// The smallest key the top-p rule keeps among tokens with key >= min_key:
// S(x) < top_p * Z or S(x) == 0 (core/filters.h), masses exp(x - row_max).
template <int kBlock, typename T>
__device__ uint32_t block_topp_key(const T* __restrict__ row, int64_t n, float temperature, uint32_t min_key,
                                   float row_max, float top_p) {
  __shared__ uint32_t counts[kRadixBins];
  __shared__ unsigned long long masses[kRadixBins];
  __shared__ uint32_t s_bin;
  __shared__ unsigned long long s_above, s_total;
  const int warp = threadIdx.x >> 5;
  uint32_t prefix = 0, mask = 0;
  uint64_t above = 0, total = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < kRadixBins; b += kBlock) {
      counts[b] = 0;
      masses[b] = 0;
    }
    __syncthreads();
    BinRun run;
    block_row_each<kBlock>(row, n, [&](float l) {
      const float x = l / temperature;
      const uint32_t key = float_key(x);
      if (key >= min_key && (key & mask) == prefix)
        run.add((key >> shift) & 0xFF, mass_fixed(x, row_max), counts, masses);
    });
    run.flush(counts, masses);
    __syncthreads();
    if (warp == 0) topp_pick(counts, masses, shift == 24, above, total, top_p, s_bin, s_above, s_total);
    __syncthreads();
    if (shift == 24) total = s_total;
    prefix |= s_bin << shift;
    mask |= 0xFFu << shift;
    above = s_above;
    __syncthreads();
  }
  return prefix;
}

// The keep key of one row of logits (x = logits / temperature) under top-k
// then top-p, computed by the whole block: the smallest key a token may have
// and be kept (0 = all). Passes over the row: 4 for top-k, 1 + 4 for top-p.
template <int kBlock, typename T>
__device__ uint32_t block_row_keep_key(const T* __restrict__ logits, int64_t n, float temperature, int32_t top_k,
                                       float top_p) {
  uint32_t keep = 0;
  if (topk_active(top_k, n)) keep = block_topk_key<kBlock>(logits, n, temperature, static_cast<uint32_t>(top_k));
  if (topp_active(top_p)) {
    float local = -INFINITY;
    bool bad = false;
    block_row_each<kBlock>(logits, n, [&](float l) {
      const float x = l / temperature;
      bad |= (x != x) || x == INFINITY;
      local = fmaxf(local, x);
    });
    const bool any_bad = __syncthreads_or(bad);
    const float row_max = block_max<kBlock>(local);
    // A non-finite row aborts later; an all -inf row has nothing to keep.
    if (!any_bad && row_max > -INFINITY) keep = block_topp_key<kBlock>(logits, n, temperature, keep, row_max, top_p);
  }
  return keep;
}

}  // namespace dspark
