// verify_tree's CUDA kernel (DESIGN §3): one block per request walks its tree
// from the root. Every row statistic is summed exactly as verify_chunk's
// kernels sum it (kFixedChunk-entry chunks, each reduced by a 256-thread block,
// chunks merged lane-strided by one warp), so a path-shaped tree gives the
// chain's results bit for bit; rows off the accepted path are never read.
// Framework-free: raw pointers and a stream.
//
//   verify_tree_kernel  [R] blocks of 256: validate the tree, then per
//                       visited node: keep key (top-k/top-p), row stats
//                       (greedy rows: one vectorised argmax pass),
//                       children in index order (coin, update of p / q on
//                       rejection: vocabulary passes over the workspace
//                       vectors w / qv), and the emitted token.
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../core/tree.h"
#include "block_reduce.cuh"
#include "dtype.cuh"
#include "greedy_stats.cuh"
#include "radix_select.cuh"

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

// Parents valid, then depths <= max_depth (all threads). Depths in index
// order by one thread (parent < child) into `scratch` when it holds n ints;
// otherwise each thread walks its nodes' ancestors, at most max_depth + 1 steps.
template <typename T, typename D>
__device__ bool tree_valid(const TreeArgs<T, D>& a, int64_t c0, int32_t n, int32_t* scratch, int64_t scratch_len,
                           TreeShared& sh) {
  bool ok = true;
  for (int32_t i = threadIdx.x; i < n; i += kTreeBlock) ok &= tree_parent_ok(a, c0, i);
  if (!__syncthreads_and(ok)) return false;  // ancestors are read only once every parent is in range
  const int32_t max_depth = a.v.max_draft;
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
    TargetRowStats st = target_stats_empty();
    chunk_groups_each<kTreeBlock, kChunkInFlight>(trow, begin, end, aligned,
                                                   [&](int64_t i, const float(&l)[4], int count) {
                                                     target_offer_group(st, row, stream, i >> 2, l, count);
                                                   });
    st = block_reduce<kTreeBlock>(st, target_stats_merge, sh.target, target_stats_empty());
    if (threadIdx.x == 0) part[chunk] = st;
    __syncthreads();
  }
  if (threadIdx.x < 32) {
    TargetRowStats st = target_stats_empty();
    for (int64_t c = threadIdx.x; c < chunks; c += 32) st = target_stats_merge(st, part[c]);
    st = warp_reduce(st, target_stats_merge);
    if (threadIdx.x == 0) sh.st = st;
  }
  __syncthreads();
  return sh.st;
}

// A greedy row's statistics (greedy_stats.cuh), broadcast to every thread.
template <typename T>
__device__ TargetRowStats tree_greedy_stats(const T* __restrict__ trow, int64_t V, TreeShared& sh) {
  const TargetRowStats st = block_greedy_stats<kTreeBlock>(trow, V, 0, sh.target);
  if (threadIdx.x == 0) sh.st = st;
  __syncthreads();
  return sh.st;
}

template <typename D>
__device__ DraftRowStats tree_draft_stats(const D* __restrict__ drow, int64_t V, float draft_temperature,
                                          DraftRowStats* part, int64_t chunks, TreeShared& sh) {
  const bool aligned = reinterpret_cast<uintptr_t>(drow) % (4 * sizeof(D)) == 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t begin = chunk * kFixedChunk;
    const int64_t end = begin + kFixedChunk < V ? begin + kFixedChunk : V;
    DraftRowStats ds = draft_stats_empty();
    chunk_groups_each<kTreeBlock, kChunkInFlight>(drow, begin, end, aligned, [&](int64_t, const float(&l)[4],
                                                                                 int count) {
      draft_offer_group(ds, l, count, draft_temperature);
    });
    ds = block_reduce<kTreeBlock>(ds, draft_stats_merge, sh.draft, draft_stats_empty());
    if (threadIdx.x == 0) part[chunk] = ds;
    __syncthreads();
  }
  if (threadIdx.x < 32) {
    DraftRowStats ds = draft_stats_empty();
    for (int64_t c = threadIdx.x; c < chunks; c += 32) ds = draft_stats_merge(ds, part[c]);
    ds = warp_reduce(ds, draft_stats_merge);
    if (threadIdx.x == 0) sh.ds = ds;
  }
  __syncthreads();
  return sh.ds;
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
                       float* qv_all,
                       int64_t chunks) {
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
      uint32_t keep = 0;
      if (filtered) keep = block_row_keep_key<kTreeBlock>(trow, V, temperature, top_k, top_p);
      const RaceRow row{greedy, temperature, keep};
      const RaceStream emit_stream = verify_stream(v, r, kPurposeEmit, static_cast<uint32_t>(cur));
      const TargetRowStats st = greedy ? tree_greedy_stats(trow, V, sh)
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
            if (draft_mode == kDraftLogits) ds = tree_draft_stats(drow, V, draft_temperature, dpart, chunks, sh);
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

// workspace: tree_workspace(nullptr, R, V, draft rows given).bytes bytes.
template <typename T, typename D>
cudaError_t verify_tree_launch(const TreeArgs<T, D>& a, void* workspace, cudaStream_t stream) {
  const int64_t R = a.v.num_requests;
  if (R == 0) return cudaSuccess;
  const TreeWorkspace w = tree_workspace(workspace, R, a.v.vocab, a.v.draft != nullptr);
  const int64_t chunks = fixed_chunks(a.v.vocab);
  if (R > INT32_MAX) return cudaErrorInvalidConfiguration;
  verify_tree_kernel<T, D><<<static_cast<unsigned>(R), kTreeBlock, 0, stream>>>(a, w.target_partials,
                                                                                 w.draft_partials, w.w, w.qv, chunks);
  return cudaGetLastError();
}

}  // namespace dspark

#ifdef DSPARK_KERNEL_CHECK  // make cuda-check: compile every instantiation
#define DSPARK_TREE_INSTANTIATE(T, D) \
  template cudaError_t dspark::verify_tree_launch<T, D>(const dspark::TreeArgs<T, D>&, void*, cudaStream_t);
DSPARK_TREE_INSTANTIATE(float, float)
DSPARK_TREE_INSTANTIATE(__half, __half)
DSPARK_TREE_INSTANTIATE(__half, float)
DSPARK_TREE_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
DSPARK_TREE_INSTANTIATE(__nv_bfloat16, float)
#endif
