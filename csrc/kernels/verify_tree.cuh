// verify_tree's CUDA kernel (DESIGN §3): one block per request walks its tree
// from the root. Every row statistic is summed exactly as verify_chunk's
// kernels sum it (kFixedChunk-entry chunks, each reduced by a 256-thread block,
// chunks merged lane-strided by one warp), so a path-shaped tree gives the
// chain's results bit for bit; rows off the accepted path are never read.
// Framework-free: raw pointers and a stream.
//
//   verify_tree_row_keys_kernel   [rows] blocks (the row pass, optional):
//                       each target row's owner (the request whose node it
//                       is, or -1) and keep key (top-k/top-p; few rows:
//                       split_select.cuh's launches compute the keys next)
//   verify_tree_row_stats_kernel  [rows * chunks] blocks (the row pass): the
//                       chunk partials of every owned row (and of its draft
//                       row where the walk needs q's normaliser), so a small
//                       batch reads its rows with the whole GPU, not one SM
//   verify_tree_kernel  [R] blocks of 256: validate the tree, then per
//                       visited node: keep key (top-k/top-p), row stats
//                       (from the row pass when it ran; greedy rows: one
//                       vectorised argmax pass), children in index order
//                       (coin, update of p / q on rejection: vocabulary
//                       passes over the workspace vectors w / qv), and the
//                       emitted token.
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../core/tree.h"
#include "block_reduce.cuh"
#include "dtype.cuh"
#include "greedy_stats.cuh"
#include "radix_select.cuh"
#include "split_select.cuh"

namespace dspark {

constexpr int kTreeBlock = 256;  // = kVerifyBlock of verify_chunk: the same per-chunk sums
static_assert(kFixedChunk % (4 * kTreeBlock) == 0, "whole groups per thread and chunk");

struct TreeShared {
  TargetRowStats target[kTreeBlock / 32];
  DraftRowStats draft[kTreeBlock / 32];
  RaceBest race[kTreeBlock / 32];
  float sum[kTreeBlock / 32];
  int32_t first[kTreeBlock / 32];
  TargetRowStats st;  // broadcast results
  DraftRowStats ds;
  RaceBest best;
  float total;
};

// The smallest local index c > after with parent `node`, or -1 (all threads).
template <typename T, typename D>
__device__ int32_t tree_next_child(const TreeArgs<T, D>& a, int64_t c0, int32_t n, int32_t node, int32_t after,
                                   TreeShared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int32_t base = after + 1; base < n; base += kTreeBlock) {
    const int32_t c = base + static_cast<int32_t>(threadIdx.x);
    const bool hit = c < n && a.parents[c0 + c] == node;
    const unsigned ballot = __ballot_sync(kFullMask, hit);
    if (lane == 0) sh.first[warp] = ballot ? base + warp * 32 + __ffs(ballot) - 1 : INT_MAX;
    __syncthreads();
    int32_t best = INT_MAX;
#pragma unroll
    for (int w = 0; w < kTreeBlock / 32; ++w) best = min(best, sh.first[w]);
    __syncthreads();
    if (best != INT_MAX) return best;
  }
  return -1;
}

// Trees up to this many nodes check their depths in shared memory (4 KB).
constexpr int32_t kTreeJumpNodes = 1024;
constexpr int kTreeJumpPerThread = kTreeJumpNodes / kTreeBlock;
static_assert(kTreeJumpNodes % kTreeBlock == 0 && kTreeJumpNodes <= (1 << 16), "a link packs 16-bit fields");

// Every depth <= max_depth (all threads; parents already in range, n <=
// kTreeJumpNodes) by pointer jumping: link[i] packs an ancestor of node i
// (low 16 bits) and its distance (high 16 bits), starting at the parent;
// each round composes a link with its ancestor's, doubling the distance
// covered, so ~log2(depth) rounds of shared-memory reads instead of n
// dependent global loads by one thread.
template <typename T, typename D>
__device__ bool tree_depths_ok_jump(const TreeArgs<T, D>& a, int64_t c0, int32_t n, int32_t max_depth) {
  __shared__ uint32_t link[kTreeJumpNodes];
  bool pending = false;  // some link of this thread's nodes stops short of the root
#pragma unroll
  for (int k = 0; k < kTreeJumpPerThread; ++k) {
    const int32_t i = static_cast<int32_t>(threadIdx.x) + k * kTreeBlock;
    if (i < n) {
      const uint32_t parent = i == 0 ? 0u : static_cast<uint32_t>(a.parents[c0 + i]);
      link[i] = i == 0 ? 0u : parent | (1u << 16);
      pending |= parent != 0;
    }
  }
  // After covering `span`, a link short of the root means a depth > span.
  for (int32_t span = 1; __syncthreads_or(pending); span *= 2) {
    if (span >= max_depth) return false;  // uniform: depth > span >= max_depth
    uint32_t next[kTreeJumpPerThread];
#pragma unroll
    for (int k = 0; k < kTreeJumpPerThread; ++k) {
      const int32_t i = static_cast<int32_t>(threadIdx.x) + k * kTreeBlock;
      if (i < n) {
        const uint32_t l = link[i], up = link[l & 0xFFFFu];
        next[k] = (up & 0xFFFFu) | ((l >> 16) + (up >> 16)) << 16;
      }
    }
    __syncthreads();  // every read of this round before any write (a fresher read would only jump further)
    pending = false;
#pragma unroll
    for (int k = 0; k < kTreeJumpPerThread; ++k) {
      const int32_t i = static_cast<int32_t>(threadIdx.x) + k * kTreeBlock;
      if (i < n) {
        link[i] = next[k];
        pending |= (next[k] & 0xFFFFu) != 0;
      }
    }
  }
  bool ok = true;  // every link reaches the root: its distance is the depth
  for (int32_t i = threadIdx.x; i < n; i += kTreeBlock) ok &= static_cast<int32_t>(link[i] >> 16) <= max_depth;
  return __syncthreads_and(ok) != 0;
}

// Parents valid, then depths <= max_depth (all threads). Up to
// kTreeJumpNodes nodes by pointer jumping in shared memory; beyond, depths
// in index order by one thread (parent < child) into `scratch` when it holds
// n ints, else each thread walks its nodes' ancestors, at most max_depth + 1
// steps.
template <typename T, typename D>
__device__ bool tree_valid(const TreeArgs<T, D>& a, int64_t c0, int32_t n, int32_t* scratch, int64_t scratch_len,
                           TreeShared& sh) {
  bool ok = true;
  for (int32_t i = threadIdx.x; i < n; i += kTreeBlock) ok &= tree_parent_ok(a, c0, i);
  if (!__syncthreads_and(ok)) return false;  // ancestors are read only once every parent is in range
  const int32_t max_depth = a.v.max_draft;
  if (n <= kTreeJumpNodes) return tree_depths_ok_jump(a, c0, n, max_depth);
  if (n <= scratch_len) {
    if (threadIdx.x == 0) {
      scratch[0] = 0;
      for (int32_t i = 1; i < n && ok; ++i) ok = (scratch[i] = scratch[a.parents[c0 + i]] + 1) <= max_depth;
    }
    return __syncthreads_and(ok) != 0;
  }
  for (int32_t i = threadIdx.x; i < n; i += kTreeBlock) {
    int32_t node = i, depth = 0;
    while (node > 0 && depth <= max_depth) {
      node = a.parents[c0 + node];
      ++depth;
    }
    ok &= depth <= max_depth;
  }
  return __syncthreads_and(ok) != 0;
}

// One chunk [begin, end) of a sampled row's statistics, block-reduced
// (valid in thread 0): the walk and the row pass both call this, so the
// partials are the same bit for bit whichever computes them.
template <typename T>
__device__ __forceinline__ TargetRowStats tree_chunk_stats(const T* __restrict__ trow, int64_t begin, int64_t end,
                                                           bool aligned, const RaceRow& row, const RaceStream& stream,
                                                           TargetRowStats* smem) {
  TargetRowStats st = target_stats_empty();
  chunk_groups_each<kTreeBlock, kChunkInFlight>(trow, begin, end, aligned,
                                                 [&](int64_t i, const float(&l)[4], int count) {
                                                   target_offer_group(st, row, stream, i >> 2, l, count);
                                                 });
  return block_reduce<kTreeBlock>(st, target_stats_merge, smem, target_stats_empty());
}

// A row's statistics (TargetRowStats or DraftRowStats) from its chunk
// partials: warp 0 merges them lane-strided, as verify_decide_kernel does;
// the result goes through `shared` to every thread.
template <typename S, typename Merge>
__device__ __forceinline__ S tree_merge_partials(const S* part, int64_t chunks, Merge merge, S empty, S& shared) {
  if (threadIdx.x < 32) {
    S st = empty;
    for (int64_t c = threadIdx.x; c < chunks; c += 32) st = merge(st, part[c]);
    st = warp_reduce(st, merge);
    if (threadIdx.x == 0) shared = st;
  }
  __syncthreads();
  return shared;
}

// A row's statistics as verify_stats_kernel + verify_decide_kernel compute
// them (the chunk partials pass through `part`, [chunks] in global memory).
template <typename T>
__device__ TargetRowStats tree_target_stats(const T* __restrict__ trow, int64_t V, const RaceRow& row,
                                            const RaceStream& stream, TargetRowStats* part, int64_t chunks,
                                            TreeShared& sh) {
  const bool aligned = reinterpret_cast<uintptr_t>(trow) % (4 * sizeof(T)) == 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t begin = chunk * kFixedChunk;
    const int64_t end = begin + kFixedChunk < V ? begin + kFixedChunk : V;
    const TargetRowStats st = tree_chunk_stats(trow, begin, end, aligned, row, stream, sh.target);
    if (threadIdx.x == 0) part[chunk] = st;
    __syncthreads();
  }
  return tree_merge_partials(part, chunks, target_stats_merge, target_stats_empty(), sh.st);
}

// A greedy row's statistics (greedy_stats.cuh), broadcast to every thread.
template <typename T>
__device__ TargetRowStats tree_greedy_stats(const T* __restrict__ trow, int64_t V, TreeShared& sh) {
  const TargetRowStats st = block_greedy_stats<kTreeBlock>(trow, V, 0, sh.target);
  if (threadIdx.x == 0) sh.st = st;
  __syncthreads();
  return sh.st;
}

// One chunk of a draft-logit row's normaliser, block-reduced (valid in
// thread 0): shared by the walk and the row pass, like tree_chunk_stats.
template <typename D>
__device__ __forceinline__ DraftRowStats tree_draft_chunk_stats(const D* __restrict__ drow, int64_t begin, int64_t end,
                                                                bool aligned, float draft_temperature,
                                                                DraftRowStats* smem) {
  DraftRowStats ds = draft_stats_empty();
  chunk_groups_each<kTreeBlock, kChunkInFlight>(drow, begin, end, aligned, [&](int64_t, const float(&l)[4],
                                                                               int count) {
    draft_offer_group(ds, l, count, draft_temperature);
  });
  return block_reduce<kTreeBlock>(ds, draft_stats_merge, smem, draft_stats_empty());
}

template <typename D>
__device__ DraftRowStats tree_draft_stats(const D* __restrict__ drow, int64_t V, float draft_temperature,
                                          DraftRowStats* part, int64_t chunks, TreeShared& sh) {
  const bool aligned = reinterpret_cast<uintptr_t>(drow) % (4 * sizeof(D)) == 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t begin = chunk * kFixedChunk;
    const int64_t end = begin + kFixedChunk < V ? begin + kFixedChunk : V;
    const DraftRowStats ds = tree_draft_chunk_stats(drow, begin, end, aligned, draft_temperature, sh.draft);
    if (threadIdx.x == 0) part[chunk] = ds;
    __syncthreads();
  }
  return tree_merge_partials(part, chunks, draft_stats_merge, draft_stats_empty(), sh.ds);
}

// The request whose node target row t is, if its layout and sibling mode
// are valid and it samples (or, with greedy_rows, is greedy); -1 otherwise.
// A malformed cu costs only the row pass: the walk uses a row's results
// only where this names its own request.
template <typename T, typename D>
__device__ int64_t tree_row_owner(const TreeArgs<T, D>& a, int64_t t, bool greedy_rows) {
  const VerifyArgs<T, D>& v = a.v;
  if (v.num_requests <= 0 || !(v.cu[0] <= t)) return -1;
  int64_t lo = 0, hi = v.num_requests;  // the last r < R with cu[r] <= t (exact when cu is monotone)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (v.cu[mid] <= t) lo = mid;
    else hi = mid;
  }
  const VerifyLayout L = verify_layout(v, lo);
  if (!L.valid || t < L.t0 || t > L.t0 + L.n || tree_mode(a, lo) < 0) return -1;
  return greedy_rows || v.temperature[lo] > 0.0f ? lo : -1;
}

// The row pass, 1 of 2: [rows] blocks; row t's owner and, unless the split
// select computes them next (keys_too false), its keep key.
template <typename T, typename D>
__global__ void __launch_bounds__(kTreeBlock, 1)
    verify_tree_row_keys_kernel(TreeArgs<T, D> a, uint32_t* __restrict__ row_keys, int32_t* __restrict__ row_owner,
                                bool greedy_rows, bool keys_too) {
  const VerifyArgs<T, D>& v = a.v;
  const int64_t t = blockIdx.x;
  const int64_t r = tree_row_owner(a, t, greedy_rows);
  if (threadIdx.x == 0) row_owner[t] = static_cast<int32_t>(r);
  if (!keys_too) return;
  uint32_t keep = 0;
  if (r >= 0 && verify_filtered(v, r))  // uniform over the block
    keep = block_row_keep_key<kTreeBlock>(v.target + t * v.target_stride, v.vocab, v.temperature[r], v.top_k[r],
                                          v.top_p[r]);
  if (threadIdx.x == 0) row_keys[t] = keep;
}

// split_select.cuh's view of the node rows once their owners are known: an
// owned row of a filtered request needs a key.
template <typename T, typename D>
struct TreeSelectRows {
  VerifyArgs<T, D> v;
  const int32_t* owner;  // [rows] (verify_tree_row_keys_kernel)
  DSPARK_HD int64_t rows() const { return v.target_rows; }
  DSPARK_HD int64_t n() const { return v.vocab; }
  __device__ bool filtered(int64_t t) const { return owner[t] >= 0 && verify_filtered(v, owner[t]); }
  __device__ const T* logits(int64_t t) const { return v.target + t * v.target_stride; }
  __device__ float temperature(int64_t t) const { return v.temperature[owner[t]]; }
  __device__ int32_t top_k(int64_t t) const { return v.top_k[owner[t]]; }
  __device__ float top_p(int64_t t) const { return v.top_p[owner[t]]; }
};

// The row pass, 2 of 2: [rows * chunks] blocks; the chunk partials of every
// owned row, exactly as the walk would compute them at that node (a greedy
// row's: its chunk's argmax, which merges to the walk's one-pass argmax
// exactly, in any order).
template <typename T, typename D>
__global__ void __launch_bounds__(kTreeBlock)
    verify_tree_row_stats_kernel(TreeArgs<T, D> a, const uint32_t* __restrict__ row_keys,
                                 const int32_t* __restrict__ row_owner, TargetRowStats* __restrict__ row_partials,
                                 DraftRowStats* __restrict__ row_draft_partials, int64_t chunks) {
  __shared__ TargetRowStats s_target[kTreeBlock / 32];
  __shared__ DraftRowStats s_draft[kTreeBlock / 32];
  const VerifyArgs<T, D>& v = a.v;
  const int64_t t = blockIdx.x / chunks, chunk = blockIdx.x - t * chunks;
  const int64_t r = row_owner[t];
  if (r < 0) return;
  const int64_t begin = chunk * kFixedChunk;
  const int64_t end = begin + kFixedChunk < v.vocab ? begin + kFixedChunk : v.vocab;
  const T* trow = v.target + t * v.target_stride;
  if (!(v.temperature[r] > 0.0f)) {  // greedy (uniform over the block)
    const TargetRowStats st = block_greedy_stats<kTreeBlock>(trow + begin, end - begin, begin, s_target);
    if (threadIdx.x == 0) row_partials[blockIdx.x] = st;
    return;
  }
  const int64_t node = t - verify_layout(v, r).t0;
  const RaceRow row{false, v.temperature[r], row_keys[t]};
  const RaceStream stream = verify_stream(v, r, kPurposeEmit, static_cast<uint32_t>(node));
  const bool aligned = reinterpret_cast<uintptr_t>(trow) % (4 * sizeof(T)) == 0;
  const TargetRowStats st = tree_chunk_stats(trow, begin, end, aligned, row, stream, s_target);
  if (threadIdx.x == 0) row_partials[blockIdx.x] = st;
  // The draft row's normaliser where the walk needs it (draft logits, a mode that reads q).
  if (row_draft_partials == nullptr || verify_draft_mode(v, r) != kDraftLogits ||
      tree_mode(a, r) == kSiblingDeterministic)
    return;
  const D* drow = v.draft + t * v.draft_stride;
  const bool d_aligned = reinterpret_cast<uintptr_t>(drow) % (4 * sizeof(D)) == 0;
  const DraftRowStats ds = tree_draft_chunk_stats(drow, begin, end, d_aligned, v.draft_temperature[r], s_draft);
  if (threadIdx.x == 0) row_draft_partials[blockIdx.x] = ds;
}

__device__ __forceinline__ float tree_block_sum(float v, TreeShared& sh) {
  v = block_reduce<kTreeBlock>(v, [](float x, float y) { return x + y; }, sh.sum, 0.0f);
  if (threadIdx.x == 0) sh.total = v;
  __syncthreads();
  return sh.total;
}

__device__ __forceinline__ RaceBest tree_block_race(RaceBest b, TreeShared& sh) {
  b = block_reduce<kTreeBlock>(b, race_merge, sh.race, race_empty());
  if (threadIdx.x == 0) sh.best = b;
  __syncthreads();
  return sh.best;
}

template <typename T, typename D>
__global__ void __launch_bounds__(kTreeBlock, 1)
    verify_tree_kernel(TreeArgs<T, D> a, TargetRowStats* target_part, DraftRowStats* draft_part, float* w_all,
                       float* qv_all, const uint32_t* __restrict__ row_keys, const int32_t* __restrict__ row_owner,
                       const TargetRowStats* __restrict__ row_partials,
                       const DraftRowStats* __restrict__ row_draft_partials, int64_t chunks) {
  __shared__ TreeShared sh;
  const VerifyArgs<T, D>& v = a.v;
  const int64_t r = blockIdx.x;
  const int64_t V = v.vocab, width = int64_t{v.max_draft} + 1;
  const bool lead = threadIdx.x == 0;
  int32_t* tok_out = v.tokens + r * width;
  int32_t* path_out = a.path + r * width;
  TargetRowStats* tpart = target_part + r * chunks;
  DraftRowStats* dpart = draft_part + r * chunks;
  float* w = w_all + r * V;
  float* qv = qv_all != nullptr ? qv_all + r * V : nullptr;  // only with draft rows
  int32_t accepted = 0, emit = -1, flags = 0;

  const VerifyLayout L = verify_layout(v, r);
  const int32_t mode = tree_mode(a, r);
  if (!L.valid) flags = kBadLengths;
  else if (mode < 0 || !tree_valid(a, L.t0, L.n + 1, reinterpret_cast<int32_t*>(w), V, sh)) flags = kBadTree;
  if (!flags) {
    const int64_t c0 = L.t0;
    const int32_t n = L.n + 1;
    const float temperature = v.temperature[r], draft_temperature = v.draft_temperature[r];
    const int32_t top_k = v.top_k[r];
    const float top_p = v.top_p[r];
    const bool greedy = !(temperature > 0.0f);
    const bool filtered = !greedy && (topk_active(top_k, V) || topp_active(top_p));
    const int32_t draft_mode = verify_draft_mode(v, r);
    if (lead) path_out[0] = 0;
    int32_t cur = 0;
    for (;;) {
      const T* trow = v.target + (c0 + cur) * v.target_stride;
      const D* drow = v.draft != nullptr ? v.draft + (c0 + cur) * v.draft_stride : nullptr;
      // The row pass's keep key and partials when it computed this row for this request (uniform).
      const bool pre = row_owner != nullptr && row_owner[c0 + cur] == r;
      uint32_t keep = 0;
      if (filtered)
        keep = pre ? row_keys[c0 + cur] : block_row_keep_key<kTreeBlock>(trow, V, temperature, top_k, top_p);
      const RaceRow row{greedy, temperature, keep};
      const RaceStream emit_stream = verify_stream(v, r, kPurposeEmit, static_cast<uint32_t>(cur));
      const TargetRowStats st =
          pre      ? tree_merge_partials(row_partials + (c0 + cur) * chunks, chunks, target_stats_merge,
                                         target_stats_empty(), sh.st)
          : greedy ? tree_greedy_stats(trow, V, sh)
                   : tree_target_stats(trow, V, row, emit_stream, tpart, chunks, sh);
      if (st.flags & kNonfiniteLogits) flags |= kNonfiniteLogits;
      else if (st.race.best.index < 0) flags |= kAllMasked;
      if (flags & kAbortMask) break;
      int32_t next = -1;
      if (greedy) {
        for (int32_t c = tree_next_child(a, c0, n, cur, cur, sh); c >= 0; c = tree_next_child(a, c0, n, cur, c, sh)) {
          const int32_t tok = v.draft_tokens[c0 + c];
          if (tok < 0 || tok >= V) flags |= kTokenOutOfRange;
          else if (tok == st.race.best.index) {
            next = c;
            break;
          }
        }
        if (next < 0) {
          emit = st.race.best.index;
          break;
        }
      } else {
        TreeState s = tree_state_fresh();
        DraftRowStats ds = draft_stats_empty();
        // q and p at the current node after updates (core/tree.h; the same
        // arithmetic as verify_chunk's coin and residual).
        const auto q_of = [&](int64_t i) {
          if (s.q_mat) return s.qsum > 0.0f ? qv[i] / s.qsum : 0.0f;
          return draft_q_value(draft_mode, to_float(drow[i]), ds, draft_temperature);
        };
        const auto p_of = [&](int64_t i) {
          int32_t ignored = 0;
          const float x = race_value(ignored, row, to_float(trow[i]));
          const float e0 = x > -INFINITY ? expf(x - st.softmax.m) : 0.0f;
          const float p0 = x > -INFINITY ? e0 / st.softmax.s : 0.0f;
          const float wi = s.dist == kTreeWeights || (s.dist == kTreeZeroed && s.zeroed >= 2) ? w[i] : 0.0f;
          return tree_p(s, st.softmax, p0, e0, wi, static_cast<int32_t>(i));
        };
        for (int32_t c = tree_next_child(a, c0, n, cur, cur, sh); c >= 0; c = tree_next_child(a, c0, n, cur, c, sh)) {
          const int32_t tok = v.draft_tokens[c0 + c];
          if (tok < 0 || tok >= V) {  // skipped: no coin, no update, subtree not visited
            flags |= kTokenOutOfRange;
            continue;
          }
          if (mode != kSiblingDeterministic && !s.q_ready) {
            if (draft_mode == kDraftLogits)
              ds = pre ? tree_merge_partials(row_draft_partials + (c0 + cur) * chunks, chunks, draft_stats_merge,
                                             draft_stats_empty(), sh.ds)
                       : tree_draft_stats(drow, V, draft_temperature, dpart, chunks, sh);
            s.q_ready = true;
            if (ds.flags & kNonfiniteLogits) {
              flags |= kNonfiniteLogits;
              break;
            }
          }
          const float q = mode == kSiblingDeterministic ? 1.0f : q_of(tok);
          if (!(q > 0.0f)) {
            flags |= kDraftProbZero;
            continue;
          }
          const float p = p_of(tok);
          if (tree_coin(philox_draw(v.seed[r], v.position[r], kPurposeCoin, static_cast<uint32_t>(c), 0).x[0], q,
                        p)) {
            next = c;
            break;
          }
          if (mode == kSiblingDeterministic) {  // p <- p without tok
            if (!(p > 0.0f)) continue;
            int32_t ignored = 0;
            const float e = expf(race_value(ignored, row, to_float(trow[tok])) - st.softmax.m);
            if (!(st.softmax.s - (s.removed + e) > 0.0f)) continue;
            __syncthreads();  // every thread has read w[tok] (p_of) before it changes
            if (s.zeroed == 1) {  // from the second on, live flags in w[]
              for (int64_t i = threadIdx.x; i < V; i += kTreeBlock) w[i] = i == s.first_zero || i == tok ? 0.0f : 1.0f;
            } else if (s.zeroed >= 2 && lead) {
              w[tok] = 0.0f;
            }
            __syncthreads();
            if (s.zeroed == 0) s.first_zero = tok;
            s.last_zero = tok;
            s.removed += e;
            ++s.zeroed;
            s.dist = kTreeZeroed;
            continue;
          }
          // iid / without replacement: p <- max(0, p - q), renormalised unless its mass is 0.
          float local = 0.0f;
          for (int64_t i = threadIdx.x; i < V; i += kTreeBlock) local += fmaxf(0.0f, p_of(i) - q_of(i));
          const float total = tree_block_sum(local, sh);
          if (total > 0.0f) {
            for (int64_t i = threadIdx.x; i < V; i += kTreeBlock) w[i] = fmaxf(0.0f, p_of(i) - q_of(i));
            __syncthreads();
            s.dist = kTreeWeights;
            s.wsum = total;
          }
          if (mode == kSiblingWithoutReplacement) {  // q <- q without tok, renormalised
            if (!s.q_mat) {
              for (int64_t i = threadIdx.x; i < V; i += kTreeBlock) qv[i] = q_of(i);
              __syncthreads();
              s.q_mat = true;
            }
            if (lead) qv[tok] = 0.0f;
            __syncthreads();
            float qs = 0.0f;
            for (int64_t i = threadIdx.x; i < V; i += kTreeBlock) qs += qv[i];
            s.qsum = tree_block_sum(qs, sh);
          }
        }
        if (flags & kAbortMask) break;
        if (next < 0) {  // no child accepted: a token from the current p
          RaceBest b = race_empty();
          if (s.dist == kTreePristine) {
            b = st.race.best;
          } else if (s.dist == kTreeZeroed && s.zeroed == 1) {
            b = st.race.best.index != s.first_zero ? st.race.best : st.race.second;
          } else {
            const bool weights = s.dist == kTreeWeights;
            for (int64_t g = threadIdx.x; 4 * g < V; g += kTreeBlock) {
              const PhiloxBlock bits = philox_draw(emit_stream.seed, emit_stream.position, emit_stream.purpose,
                                                   emit_stream.slot, static_cast<uint32_t>(g));
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                const int64_t i = 4 * g + j;
                if (i >= V) break;
                float x;
                if (weights) {
                  if (!(w[i] > 0.0f)) continue;
                  x = logf(w[i]);
                } else {
                  int32_t ignored = 0;
                  x = race_value(ignored, row, to_float(trow[i]));
                  if (!(x > -INFINITY) || w[i] == 0.0f) continue;
                }
                const float score = race_score(x, bits.x[j]);
                if (race_better(score, static_cast<int32_t>(i), b)) b = RaceBest{score, static_cast<int32_t>(i)};
              }
            }
            b = tree_block_race(b, sh);
          }
          // Every kept token zeroed (rounding let the last coin fail where
          // exact p was 1): p before that zeroing, a point mass on it.
          emit = b.index >= 0 ? b.index : s.last_zero;
          break;
        }
      }
      if (lead) {
        tok_out[accepted] = v.draft_tokens[c0 + next];
        path_out[accepted + 1] = next;
      }
      ++accepted;
      cur = next;
    }
  }
  __syncthreads();
  if (!lead) return;
  const bool abort = (flags & kAbortMask) != 0;
  for (int64_t k = abort ? 0 : accepted; k < width; ++k) tok_out[k] = -1;
  for (int64_t k = abort ? 0 : accepted + 1; k < width; ++k) path_out[k] = -1;
  if (!abort) tok_out[accepted] = emit;
  v.accepted[r] = abort ? 0 : accepted;
  v.emitted[r] = abort ? 0 : accepted + 1;
  v.status[r] = flags;
}

// workspace: tree_workspace(nullptr, R, V, draft rows given, row_pass_rows).bytes
// bytes. row_pass_rows: 0, or a.v.target_rows (every node of every request)
// to run the row pass before the walk, over the sampled requests' rows and,
// with greedy_rows, the greedy requests' too; split_select: their keep keys
// by split_select.cuh where the rows are few enough (the same keys).
template <typename T, typename D>
cudaError_t verify_tree_launch(const TreeArgs<T, D>& a, void* workspace, int64_t row_pass_rows, bool greedy_rows,
                               bool split_select, cudaStream_t stream) {
  const int64_t R = a.v.num_requests;
  if (R == 0) return cudaSuccess;
  const TreeWorkspace w = tree_workspace(workspace, R, a.v.vocab, a.v.draft != nullptr, row_pass_rows);
  const int64_t chunks = fixed_chunks(a.v.vocab);
  // The walk reads row_owner[t] for any of its rows: the pass covers all of them or none.
  if (R > INT32_MAX || row_pass_rows * chunks > INT32_MAX || (row_pass_rows != 0 && row_pass_rows != a.v.target_rows))
    return cudaErrorInvalidConfiguration;
  if (row_pass_rows > 0) {
    const bool split = split_select && w.row_split_select != nullptr;  // the rows' keys by the split select
    verify_tree_row_keys_kernel<T, D><<<static_cast<unsigned>(row_pass_rows), kTreeBlock, 0, stream>>>(
        a, w.row_keys, w.row_owner, greedy_rows, !split);
    if (split) {
      const cudaError_t err = split_select_launch(TreeSelectRows<T, D>{a.v, w.row_owner},
                                                  split_select_splits(row_pass_rows, a.v.vocab), w.row_split_select,
                                                  w.row_keys, stream);
      if (err != cudaSuccess) return err;
    }
    verify_tree_row_stats_kernel<T, D><<<static_cast<unsigned>(row_pass_rows * chunks), kTreeBlock, 0, stream>>>(
        a, w.row_keys, w.row_owner, w.row_partials, w.row_draft_partials, chunks);
  }
  verify_tree_kernel<T, D><<<static_cast<unsigned>(R), kTreeBlock, 0, stream>>>(
      a, w.target_partials, w.draft_partials, w.w, w.qv, w.row_keys, w.row_owner, w.row_partials,
      w.row_draft_partials, chunks);
  return cudaGetLastError();
}

}  // namespace dspark

#ifdef DSPARK_KERNEL_CHECK  // make cuda-check: compile every instantiation
#define DSPARK_TREE_INSTANTIATE(T, D) \
  template cudaError_t dspark::verify_tree_launch<T, D>(const dspark::TreeArgs<T, D>&, void*, int64_t, bool, bool, \
                                                           cudaStream_t);
DSPARK_TREE_INSTANTIATE(float, float)
DSPARK_TREE_INSTANTIATE(__half, __half)
DSPARK_TREE_INSTANTIATE(__half, float)
DSPARK_TREE_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
DSPARK_TREE_INSTANTIATE(__nv_bfloat16, float)
#endif
