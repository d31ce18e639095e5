// Top-k / top-p keep keys with each row split across many blocks, for
// batches too small to fill the GPU with one block per row (radix_select.cuh
// makes 9 passes over a row on one SM). Every pass is one launch over
// [rows, splits] blocks: each block histograms its slice in shared memory
// and adds it to the row's global histogram with integer atomics (counts
// and 2^-40 fixed-point masses: exact in any order), and the row's last
// block to finish picks the bin with radix_select.cuh's own topk_pick /
// topp_pick. So the keys equal block_row_keep_key's bit for bit, whatever
// the split. Framework-free.
//
//   passes 0-3   top-k, 8 key bits each (rows with top-k)
//   pass 4       top-p: the row's max of x and its non-finite flag
//   passes 5-8   top-p, 8 key bits each, among keys >= the top-k key
//   finish       keep_keys[r]
//
// `Rows` gives, for row r < rows(): filtered(r) (needs a key at all),
// logits(r), n(), temperature(r), top_k(r), top_p(r).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../core/chunks.h"
#include "../core/filters.h"
#include "../core/split_select.h"
#include "block_reduce.cuh"
#include "dtype.cuh"
#include "radix_select.cuh"

namespace dspark {

constexpr int kSplitSelectBlock = 256;
constexpr int kSplitSelectPasses = 9;
static_assert(kSplitSelectBins == kRadixBins, "one histogram layout");

__device__ __forceinline__ float float_from_key(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

template <typename Rows>
__global__ void __launch_bounds__(kSplitSelectBlock, 2)
    split_select_pass_kernel(Rows rows, SplitSelectRow* __restrict__ state, SplitSelectHist* __restrict__ hist,
                             int pass, int64_t splits, int64_t slice_len) {
  __shared__ uint32_t counts[kRadixBins];
  __shared__ unsigned long long masses[kRadixBins];
  __shared__ uint32_t s_bin, s_remaining;
  __shared__ unsigned long long s_above, s_total;
  __shared__ bool s_last;
  const int64_t r = blockIdx.x / splits, split = blockIdx.x - r * splits;
  if (!rows.filtered(r)) return;  // uniform over the block
  const bool topk = pass < 4;
  const int32_t k = rows.top_k(r);
  const float top_p = rows.top_p(r), temperature = rows.temperature(r);
  const int64_t n = rows.n();
  if (topk ? !topk_active(k, n) : !topp_active(top_p)) return;
  SplitSelectRow* st = state + r;
  const int64_t begin = split * slice_len < n ? split * slice_len : n;
  const int64_t end = begin + slice_len < n ? begin + slice_len : n;
  const auto* row = rows.logits(r) + begin;

  if (pass == 4) {  // the row's max x and non-finite flag (order-free: max of keys, OR)
    float local = -INFINITY;
    bool bad = false;
    block_row_each<kSplitSelectBlock>(row, end - begin, [&](float l) {
      const float x = l / temperature;
      bad |= (x != x) || x == INFINITY;
      local = fmaxf(local, x);
    });
    const bool any_bad = __syncthreads_or(bad);
    const float m = block_max<kSplitSelectBlock>(local);
    if (threadIdx.x == 0) {
      if (any_bad) atomicOr(&st->bad, 1u);
      if (end > begin) atomicMax(&st->max_key, float_key(m));
    }
    return;
  }
  // Top-p: a non-finite row aborts later, an all -inf row keeps what top-k kept.
  const float row_max = topk ? 0.0f : float_from_key(st->max_key);
  if (!topk && (st->bad != 0 || !(row_max > -INFINITY))) return;
  const int shift = 24 - 8 * (topk ? pass : pass - 5);
  const uint32_t prefix = st->prefix, mask = st->mask, min_key = topk ? 0u : st->keep;

  for (int b = threadIdx.x; b < kRadixBins; b += kSplitSelectBlock) {
    counts[b] = 0;
    masses[b] = 0;
  }
  __syncthreads();
  BinRun run;
  block_row_each<kSplitSelectBlock>(row, end - begin, [&](float l) {
    const float x = l / temperature;
    const uint32_t key = float_key(x);
    if (key >= min_key && (key & mask) == prefix)
      run.add((key >> shift) & 0xFF, topk ? 0 : mass_fixed(x, row_max), counts, topk ? nullptr : masses);
  });
  run.flush(counts, topk ? nullptr : masses);
  __syncthreads();
  SplitSelectHist* h = hist + r;
  for (int b = threadIdx.x; b < kRadixBins; b += kSplitSelectBlock) {
    if (counts[b]) atomicAdd(&h->counts[b], counts[b]);
    if (masses[b]) atomicAdd(&h->masses[b], masses[b]);
  }
  __threadfence();  // this block's additions are visible before it counts itself done
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(&st->done, 1u) == static_cast<uint32_t>(splits - 1);
  __syncthreads();
  if (!s_last) return;

  // The row's last block: read the finished histogram (past L1), clear it for the next pass, pick.
  __threadfence();
  for (int b = threadIdx.x; b < kRadixBins; b += kSplitSelectBlock) {
    counts[b] = __ldcg(&h->counts[b]);
    masses[b] = __ldcg(&h->masses[b]);
    h->counts[b] = 0;
    h->masses[b] = 0;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    if (topk) {
      topk_pick(counts, pass == 0 ? static_cast<uint32_t>(k) : st->remaining, s_bin, s_remaining);
    } else {
      topp_pick(counts, masses, pass == 5, st->above, st->total, top_p, s_bin, s_above, s_total);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    st->done = 0;
    const uint32_t new_prefix = prefix | (s_bin << shift);
    const bool last_digit = shift == 0;
    if (topk) {
      st->remaining = s_remaining;
    } else {
      st->above = s_above;
      if (pass == 5) st->total = s_total;
    }
    if (last_digit) {  // the key: top-k's is top-p's floor; reset the digits for top-p
      st->keep = new_prefix;
      st->prefix = 0;
      st->mask = 0;
    } else {
      st->prefix = new_prefix;
      st->mask = mask | (0xFFu << shift);
    }
  }
}

template <typename Rows>
__global__ void split_select_finish_kernel(Rows rows, const SplitSelectRow* __restrict__ state,
                                           uint32_t* __restrict__ keep_keys) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < rows.rows()) keep_keys[r] = rows.filtered(r) ? state[r].keep : 0u;
}

// keep_keys [rows]: each row's key, as block_row_keep_key computes it.
// workspace: split_select_workspace_bytes(rows) bytes; splits from
// split_select_splits (> 0).
template <typename Rows>
cudaError_t split_select_launch(const Rows& rows, int64_t splits, void* workspace, uint32_t* keep_keys,
                                cudaStream_t stream) {
  const int64_t R = rows.rows(), n = rows.n();
  if (R == 0) return cudaSuccess;
  if (splits < 1 || R * splits > INT32_MAX) return cudaErrorInvalidConfiguration;
  char* ws = static_cast<char*>(workspace);
  auto* state = reinterpret_cast<SplitSelectRow*>(ws);
  auto* hist = reinterpret_cast<SplitSelectHist*>(ws + align_up(R * int64_t{sizeof(SplitSelectRow)}, 256));
  cudaError_t err = cudaMemsetAsync(workspace, 0, split_select_workspace_bytes(R), stream);
  if (err != cudaSuccess) return err;
  const int64_t slice_len = split_chunk_len(n, splits);
  for (int pass = 0; pass < kSplitSelectPasses; ++pass) {
    split_select_pass_kernel<Rows><<<static_cast<unsigned>(R * splits), kSplitSelectBlock, 0, stream>>>(
        rows, state, hist, pass, splits, slice_len);
  }
  split_select_finish_kernel<Rows><<<static_cast<unsigned>((R + 127) / 128), 128, 0, stream>>>(rows, state,
                                                                                            keep_keys);
  return cudaGetLastError();
}

}  // namespace dspark
