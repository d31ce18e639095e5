// A greedy row's statistics, shared by verify_chunk's and verify_tree's
// kernels: the argmax (top two, ties to the lower index) and the
// non-finite flag, the softmax left empty. Exact in any order, so one pass
// in 16-byte loads (block_row_each_indexed) instead of the chunked sums of a
// sampled row, with the same results.
#pragma once
#include <cstdint>

#include "../core/verify.h"
#include "block_reduce.cuh"
#include "dtype.cuh"

namespace dspark {

// Entries row[0, n) of one target row, whose index in the vocabulary is
// `first` + i. The result is valid in thread 0 (block_reduce); `scratch`
// holds kBlock / 32 values in shared memory.
template <int kBlock, typename T>
__device__ TargetRowStats block_greedy_stats(const T* __restrict__ row, int64_t n, int64_t first,
                                             TargetRowStats* scratch) {
  const RaceRow greedy{true, 0.0f, 0u};  // race_value returns a greedy row's logit as it is
  TargetRowStats st = target_stats_empty();
  block_row_each_indexed<kBlock>(row, n, [&](int64_t i, float l) {
    const float x = race_value(st.flags, greedy, l);
    if (x > -INFINITY) top2_offer(st.race, x, static_cast<int32_t>(first + i));
  });
  return block_reduce<kBlock>(st, target_stats_merge, scratch, target_stats_empty());
}

}  // namespace dspark
