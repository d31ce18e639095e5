// verify_chunk's CUDA kernels (DESIGN §3): lossless chain verification from
// logits, ragged requests, the vocabulary of every row split across blocks so
// that one request fills the GPU. Framework-free: raw pointers and a stream.
//
//   verify_threshold_kernel  [R*(K+1)] blocks, only when top-k/top-p may be on
//                            (small batches: split_select.cuh's launches, the
//                            same keys with each row across many blocks)
//   verify_greedy_kernel     [R*(K+1)*gchunks] blocks: a greedy request's
//                            target rows (argmax and flags: no softmax, no
//                            draws, 16-byte loads), split so that a small batch
//                            fills the GPU; other rows return at once
//   verify_stats_kernel      [R*(K+1)*chunks] blocks: each stochastic
//                            request's target row read once (normaliser,
//                            flags, and where verify_row_races says so the
//                            race for a token from p), each draft-logit row
//                            once (normaliser); greedy rows return at once
//   verify_decide_kernel     a warp per request: the accept/reject chain
//                            (core/verify.h verify_step), outputs written
//                            unless a residual is needed
//   verify_residual_kernel   [R*chunks] blocks: re-reads the one rejected
//                            target and draft row of requests that need it
//                            (the residual's race and p's, the lazy one)
//   verify_finish_kernel     a warp per request: the residual's winner, or p's
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../core/verify_args.h"
#include "block_reduce.cuh"
#include "dtype.cuh"
#include "greedy_stats.cuh"
#include "radix_select.cuh"
#include "split_select.cuh"

namespace dspark {

constexpr int kVerifyBlock = 256;
constexpr int kVerifyThresholdBlock = 512;
constexpr int kVerifyWarpsPerBlock = 4;
constexpr int kVerifyGreedyBlock = 256;

template <typename T, typename D>
__global__ void __launch_bounds__(kVerifyThresholdBlock, 1)
    verify_threshold_kernel(VerifyArgs<T, D> a, uint32_t* __restrict__ keep_keys) {
  const int64_t K1 = a.max_draft + 1;
  const int64_t r = blockIdx.x / K1, j = blockIdx.x - r * K1;
  const VerifyLayout L = verify_layout(a, r);
  if (!L.valid || j > L.n || !verify_filtered(a, r)) {
    if (threadIdx.x == 0) keep_keys[blockIdx.x] = 0;
    return;
  }
  const uint32_t keep = block_row_keep_key<kVerifyThresholdBlock>(a.target + (L.t0 + j) * a.target_stride, a.vocab,
                                                                   a.temperature[r], a.top_k[r], a.top_p[r]);
  if (threadIdx.x == 0) keep_keys[blockIdx.x] = keep;
}

// split_select.cuh's view of the target rows: row (r, j), j <= n_r, of a
// filtered request needs a key (the rows verify_threshold_kernel serves).
template <typename T, typename D>
struct VerifySelectRows {
  VerifyArgs<T, D> a;
  DSPARK_HD int64_t rows() const { return int64_t{a.num_requests} * (a.max_draft + 1); }
  DSPARK_HD int64_t n() const { return a.vocab; }
  __device__ bool filtered(int64_t row_id) const {
    const int64_t r = row_id / (a.max_draft + 1), j = row_id - r * (a.max_draft + 1);
    const VerifyLayout L = verify_layout(a, r);
    return L.valid && j <= L.n && verify_filtered(a, r);
  }
  __device__ const T* logits(int64_t row_id) const {
    const int64_t r = row_id / (a.max_draft + 1), j = row_id - r * (a.max_draft + 1);
    return a.target + (verify_layout(a, r).t0 + j) * a.target_stride;
  }
  __device__ float temperature(int64_t row_id) const { return a.temperature[row_id / (a.max_draft + 1)]; }
  __device__ int32_t top_k(int64_t row_id) const { return a.top_k[row_id / (a.max_draft + 1)]; }
  __device__ float top_p(int64_t row_id) const { return a.top_p[row_id / (a.max_draft + 1)]; }
};

// A greedy request's row statistics are its argmax (top two, ties to the
// lower index: exact in any order, so the split may depend on the batch)
// and flags; the softmax stays empty. Each row is split into `greedy_chunks`
// chunks of `greedy_len` entries (split_chunks: enough blocks for one row to
// fill the GPU, one block per row for large batches); chunk c goes to the
// row's slot c, the slots verify_decide_kernel reads for a greedy request.
template <typename T, typename D>
__global__ void __launch_bounds__(kVerifyGreedyBlock)
    verify_greedy_kernel(VerifyArgs<T, D> a, TargetRowStats* target_partials, int64_t num_chunks,
                         int64_t greedy_chunks, int64_t greedy_len) {
  __shared__ TargetRowStats s_target[kVerifyGreedyBlock / 32];
  const int64_t K1 = a.max_draft + 1;
  const int64_t row_id = blockIdx.x / greedy_chunks, chunk = blockIdx.x - row_id * greedy_chunks;
  const int64_t r = row_id / K1, j = row_id - r * K1;
  const VerifyLayout L = verify_layout(a, r);
  const float temperature = a.temperature[r];
  if (!L.valid || j > L.n || temperature > 0.0f) return;  // uniform over the block
  const int64_t begin = chunk * greedy_len < a.vocab ? chunk * greedy_len : a.vocab;  // a last chunk may be empty
  const int64_t end = begin + greedy_len < a.vocab ? begin + greedy_len : a.vocab;
  const TargetRowStats st = block_greedy_stats<kVerifyGreedyBlock>(a.target + (L.t0 + j) * a.target_stride + begin,
                                                                   end - begin, begin, s_target);
  if (threadIdx.x == 0) target_partials[row_id * num_chunks + chunk] = st;
}

template <typename T, typename D>
__global__ void __launch_bounds__(kVerifyBlock, 3)
    verify_stats_kernel(VerifyArgs<T, D> a, const uint32_t* __restrict__ keep_keys, TargetRowStats* target_partials,
                        DraftRowStats* draft_partials, int64_t num_chunks, int64_t chunk_len) {
  __shared__ TargetRowStats s_target[kVerifyBlock / 32];
  __shared__ DraftRowStats s_draft[kVerifyBlock / 32];
  const int64_t K1 = a.max_draft + 1;
  const int64_t row_id = blockIdx.x / num_chunks, chunk = blockIdx.x - row_id * num_chunks;
  const int64_t r = row_id / K1, j = row_id - r * K1;
  const VerifyLayout L = verify_layout(a, r);
  if (!L.valid || j > L.n) return;  // never read by the decision kernel
  const float temperature = a.temperature[r];
  if (!(temperature > 0.0f)) return;  // greedy: verify_greedy_kernel
  const RaceRow row{false, temperature, keep_keys ? keep_keys[row_id] : 0u};
  const RaceStream stream = verify_stream(a, r, kPurposeEmit, static_cast<uint32_t>(j));
  const int64_t begin = chunk * chunk_len;
  const int64_t end = begin + chunk_len < a.vocab ? begin + chunk_len : a.vocab;

  const T* __restrict__ trow = a.target + (L.t0 + j) * a.target_stride;
  const bool t_aligned = reinterpret_cast<uintptr_t>(trow) % (4 * sizeof(T)) == 0;
  const int32_t mode = verify_draft_mode(a, r);
  TargetRowStats st = target_stats_empty();
  const int32_t tok = j < L.n ? a.draft_tokens[L.d0 + j] : -1;
  if (verify_row_races(mode, j, L.n, tok, a.vocab)) {
    chunk_groups_each<kVerifyBlock, kChunkInFlight>(trow, begin, end, t_aligned, [&](int64_t i, const float(&l)[4],
                                                                                     int count) {
      target_offer_group(st, row, stream, i >> 2, l, count);
    });
  } else {  // a draft-distribution row before the last: its race is drawn lazily (verify_residual_kernel)
    chunk_groups_each<kVerifyBlock, kChunkInFlight>(trow, begin, end, t_aligned, [&](int64_t, const float(&l)[4],
                                                                                     int count) {
      target_offer_softmax(st, row, l, count);
    });
  }
  st = block_reduce<kVerifyBlock>(st, target_stats_merge, s_target, target_stats_empty());
  if (threadIdx.x == 0) target_partials[blockIdx.x] = st;

  const bool draft_needed = j < L.n && mode == kDraftLogits;
  if (!draft_needed) return;
  const float draft_temperature = a.draft_temperature[r];
  const D* __restrict__ drow = a.draft + (L.d0 + j) * a.draft_stride;
  const bool d_aligned = reinterpret_cast<uintptr_t>(drow) % (4 * sizeof(D)) == 0;
  DraftRowStats ds = draft_stats_empty();
  chunk_groups_each<kVerifyBlock, kChunkInFlight>(drow, begin, end, d_aligned, [&](int64_t, const float(&l)[4],
                                                                                   int count) {
    draft_offer_group(ds, l, count, draft_temperature);
  });
  ds = block_reduce<kVerifyBlock>(ds, draft_stats_merge, s_draft, draft_stats_empty());
  if (threadIdx.x == 0) draft_partials[blockIdx.x] = ds;
}

template <typename T, typename D>
__global__ void __launch_bounds__(kVerifyWarpsPerBlock * 32)
    verify_decide_kernel(VerifyArgs<T, D> a, const uint32_t* __restrict__ keep_keys,
                         const TargetRowStats* __restrict__ target_partials,
                         const DraftRowStats* __restrict__ draft_partials, VerifyPending* __restrict__ pending,
                         int64_t num_chunks, int64_t greedy_chunks) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kVerifyWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= a.num_requests) return;
  const VerifyLayout L = verify_layout(a, r);
  if (!L.valid) {
    if (lane == 0) {
      verify_write(a, r, L, 0, -1, kBadLengths);
      pending[r].j = -1;
    }
    return;
  }
  const int64_t K1 = a.max_draft + 1;
  const int64_t V = a.vocab;
  const float temperature = a.temperature[r], draft_temperature = a.draft_temperature[r];
  const bool greedy = !(temperature > 0.0f);
  const int32_t mode = verify_draft_mode(a, r);
  int32_t flags = 0, accepted = 0, emit = -1, residual_j = -1, from_p = 0;
  TargetRowStats st = target_stats_empty();
  DraftRowStats ds = draft_stats_empty();
  for (int32_t j = 0; j <= L.n; ++j) {
    const int64_t row_id = r * K1 + j;
    st = target_stats_empty();
    ds = draft_stats_empty();
    for (int64_t c = lane; c < (greedy ? greedy_chunks : num_chunks); c += 32) {  // greedy: verify_greedy_kernel
      st = target_stats_merge(st, target_partials[row_id * num_chunks + c]);
      if (!greedy && j < L.n && mode == kDraftLogits) ds = draft_stats_merge(ds, draft_partials[row_id * num_chunks + c]);
    }
    st = warp_reduce(st, target_stats_merge);
    ds = warp_reduce(ds, draft_stats_merge);
    const int32_t tok = j < L.n ? a.draft_tokens[L.d0 + j] : -1;
    const bool lazy = !greedy && !verify_row_races(mode, j, L.n, tok, V);  // no race in pass 1: a stand-in winner
    if (lazy) st = target_stats_stand_in(st);
    int32_t action = kVerifyAbort;
    if (lane == 0) {
      const T* trow = a.target + (L.t0 + j) * a.target_stride;
      const RaceRow row{greedy, temperature, keep_keys ? keep_keys[row_id] : 0u};
      float p_tok = 0.0f, q_tok = 0.0f;
      if (!greedy && j < L.n && tok >= 0 && tok < V) {
        p_tok = st.softmax.s > 0.0f ? target_prob(row, st.softmax, to_float(trow[tok])) : 0.0f;
        if (mode != kDraftPointMass)
          q_tok = draft_q_value(mode, to_float(a.draft[(L.d0 + j) * a.draft_stride + tok]), ds, draft_temperature);
      }
      const uint32_t coin = j < L.n ? verify_coin_bits(a, r, j) : 0u;
      const VerifyStep step = verify_step(greedy, mode, j, L.n, st, tok, a.vocab, p_tok, q_tok, ds.flags, coin);
      flags |= step.flags;
      action = step.action;
      emit = step.token;
      if (action == kVerifyAccept) ++accepted;
      if (action == kVerifyResidual) residual_j = j;
      if (action == kVerifyEmit && lazy) {  // a rare emit from p_j (q = 0): raced in pass 2
        residual_j = j;
        from_p = 1;
      }
    }
    action = __shfl_sync(kFullMask, action, 0);
    if (action != kVerifyAccept) break;
  }
  if (lane != 0) return;
  VerifyPending& p = pending[r];
  p.j = residual_j;
  if (residual_j < 0) {
    verify_write(a, r, L, accepted, emit, flags);
    return;
  }
  p.accepted = accepted;
  p.flags = flags;
  p.from_p = from_p;
  p.target = st.softmax;
  p.draft = ds;
}

template <typename T, typename D>
__global__ void __launch_bounds__(kVerifyBlock, 1)
    verify_residual_kernel(VerifyArgs<T, D> a, const uint32_t* __restrict__ keep_keys,
                           const VerifyPending* __restrict__ pending, RaceBest* __restrict__ partials,
                           int64_t num_chunks, int64_t chunk_len) {
  __shared__ RaceBest s_best[kVerifyBlock / 32];
  __shared__ RaceBest s_p_best[kVerifyBlock / 32];  // its own scratch: two reduces without a barrier between
  const int64_t r = blockIdx.x / num_chunks, chunk = blockIdx.x - r * num_chunks;
  const VerifyPending p = pending[r];
  if (p.j < 0) return;
  const VerifyLayout L = verify_layout(a, r);
  const int64_t row_id = r * (a.max_draft + 1) + p.j;
  const float temperature = a.temperature[r], draft_temperature = a.draft_temperature[r];
  const int32_t mode = verify_draft_mode(a, r);
  const RaceRow row{false, temperature, keep_keys ? keep_keys[row_id] : 0u};
  const RaceStream stream = verify_stream(a, r, kPurposeEmit, static_cast<uint32_t>(p.j));
  const float log_s = logf(p.target.s);
  const T* __restrict__ trow = a.target + (L.t0 + p.j) * a.target_stride;
  const D* __restrict__ drow = a.draft + (L.d0 + p.j) * a.draft_stride;
  const bool t_aligned = reinterpret_cast<uintptr_t>(trow) % (4 * sizeof(T)) == 0;
  const bool d_aligned = reinterpret_cast<uintptr_t>(drow) % (4 * sizeof(D)) == 0;
  const int64_t begin = chunk * chunk_len;
  const int64_t end = begin + chunk_len < a.vocab ? begin + chunk_len : a.vocab;
  // The race over p_j with pass 1's stream: the token pass 1 would have drawn (an exact argmax, any split).
  RaceBest best = race_empty(), p_best = race_empty();
  int32_t flags = 0;  // already known from pass 1
  for (int64_t i = begin + 4 * threadIdx.x; i < end; i += 4 * kVerifyBlock) {
    float l[4], q[4];
    const int count = end - i < 4 ? static_cast<int>(end - i) : 4;
    load4(trow + i, count, t_aligned, l);
    race_offer_group(p_best, flags, row, stream, i >> 2, l, count);
    if (p.from_p) continue;
    load4(drow + i, count, d_aligned, q);
#pragma unroll
    for (int k = 0; k < 4; ++k) q[k] = k < count ? draft_q_value(mode, q[k], p.draft, draft_temperature) : 0.0f;
    residual_offer_group(best, row, p.target, log_s, stream, i >> 2, l, q, count);
  }
  best = block_reduce<kVerifyBlock>(best, race_merge, s_best, race_empty());
  p_best = block_reduce<kVerifyBlock>(p_best, race_merge, s_p_best, race_empty());
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = best;
    partials[gridDim.x + blockIdx.x] = p_best;
  }
}

template <typename T, typename D>
__global__ void __launch_bounds__(kVerifyWarpsPerBlock * 32)
    verify_finish_kernel(VerifyArgs<T, D> a, const VerifyPending* __restrict__ pending,
                         const RaceBest* __restrict__ partials, int64_t num_chunks) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kVerifyWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= a.num_requests) return;
  const VerifyPending p = pending[r];
  if (p.j < 0) return;
  const int64_t p_offset = a.num_requests * num_chunks;  // p_j's partials follow the residual's
  RaceBest best = race_empty(), p_best = race_empty();
  for (int64_t c = lane; c < num_chunks; c += 32) {
    best = race_merge(best, partials[r * num_chunks + c]);
    p_best = race_merge(p_best, partials[p_offset + r * num_chunks + c]);
  }
  best = warp_reduce(best, race_merge);
  p_best = warp_reduce(p_best, race_merge);
  if (lane == 0) {
    // No residual mass (q >= p everywhere, up to rounding): sample from p.
    const int32_t token = !p.from_p && best.index >= 0 ? best.index : p_best.index;
    verify_write(a, r, verify_layout(a, r), p.accepted, token, p.flags);
  }
}

// workspace: verify_workspace(nullptr, R, max_draft, V).bytes bytes.
// may_filter: false when top-k and top-p are off for every request.
template <typename T, typename D>
cudaError_t verify_chunk_launch(const VerifyArgs<T, D>& a, void* workspace, bool may_filter, bool split_select,
                                cudaStream_t stream) {
  const int64_t R = a.num_requests;
  if (R == 0) return cudaSuccess;
  const int64_t K = a.max_draft;
  const VerifyWorkspace w = verify_workspace(workspace, R, K, a.vocab);
  const int64_t rows = verify_rows(R, K);
  // Row statistics sum floats: chunks depend on V alone (batch-invariant).
  const int64_t chunks = fixed_chunks(a.vocab), chunk_len = kFixedChunk;
  const int64_t rchunks = split_chunks(R, a.vocab), rchunk_len = split_chunk_len(a.vocab, rchunks);
  // Greedy rows: an exact argmax, so any split; at most `chunks` (their partial slots).
  int64_t gchunks = split_chunks(rows, a.vocab);
  if (gchunks > chunks) gchunks = chunks;
  const int64_t gchunk_len = split_chunk_len(a.vocab, gchunks);
  const uint32_t* keep = may_filter ? w.keep_keys : nullptr;
  const unsigned warp_blocks = static_cast<unsigned>((R + kVerifyWarpsPerBlock - 1) / kVerifyWarpsPerBlock);
  if (rows * chunks > INT32_MAX || rows * gchunks > INT32_MAX || R * rchunks > INT32_MAX)
    return cudaErrorInvalidConfiguration;
  if (may_filter && split_select && w.split_select != nullptr) {  // small batches: each row across many blocks
    const cudaError_t err = split_select_launch(VerifySelectRows<T, D>{a}, split_select_splits(rows, a.vocab),
                                                w.split_select, w.keep_keys, stream);
    if (err != cudaSuccess) return err;
  } else if (may_filter) {
    verify_threshold_kernel<T, D><<<static_cast<unsigned>(rows), kVerifyThresholdBlock, 0, stream>>>(a, w.keep_keys);
  }
  verify_greedy_kernel<T, D><<<static_cast<unsigned>(rows * gchunks), kVerifyGreedyBlock, 0, stream>>>(
      a, w.target_partials, chunks, gchunks, gchunk_len);
  verify_stats_kernel<T, D><<<static_cast<unsigned>(rows * chunks), kVerifyBlock, 0, stream>>>(
      a, keep, w.target_partials, w.draft_partials, chunks, chunk_len);
  verify_decide_kernel<T, D><<<warp_blocks, kVerifyWarpsPerBlock * 32, 0, stream>>>(
      a, keep, w.target_partials, w.draft_partials, w.pending, chunks, gchunks);
  if (a.draft_mode != kDraftPointMass) {  // only then can a residual be needed
    verify_residual_kernel<T, D><<<static_cast<unsigned>(R * rchunks), kVerifyBlock, 0, stream>>>(
        a, keep, w.pending, w.residual_partials, rchunks, rchunk_len);
    verify_finish_kernel<T, D><<<warp_blocks, kVerifyWarpsPerBlock * 32, 0, stream>>>(a, w.pending,
                                                                                      w.residual_partials, rchunks);
  }
  return cudaGetLastError();
}

}  // namespace dspark

#ifdef DSPARK_KERNEL_CHECK  // make cuda-check: compile every instantiation
#define DSPARK_VERIFY_INSTANTIATE(T, D) \
  template cudaError_t dspark::verify_chunk_launch<T, D>(const dspark::VerifyArgs<T, D>&, void*, bool, bool, \
                                                         cudaStream_t);
DSPARK_VERIFY_INSTANTIATE(float, float)
DSPARK_VERIFY_INSTANTIATE(__half, __half)
DSPARK_VERIFY_INSTANTIATE(__half, float)
DSPARK_VERIFY_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
DSPARK_VERIFY_INSTANTIATE(__nv_bfloat16, float)
#endif
