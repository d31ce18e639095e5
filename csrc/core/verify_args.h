// The `verify_chunk` op's arguments as raw pointers, shared by the CPU op and
// the CUDA kernels (csrc/kernels/verify_chunk.cuh).
#pragma once
#include <cstdint>

#include "broadcast.h"
#include "chunks.h"
#include "macros.h"
#include "race.h"
#include "rng.h"
#include "split_select.h"
#include "verify.h"

namespace dspark {

// T: target logits type; D: draft rows type (T or float).
template <typename T, typename D>
struct VerifyArgs {
  const T* target;          // [target_rows, target_stride], rows of `vocab` values
  int64_t target_stride;
  int64_t target_rows;
  int32_t vocab;
  const int32_t* draft_tokens;  // [num_tokens]
  int64_t num_tokens;
  const D* draft;               // [draft_rows, draft_stride] probs or logits; nullptr: point masses
  int64_t draft_stride;
  int64_t draft_rows;
  int32_t draft_mode;           // DraftMode
  const int32_t* cu;            // [R + 1]
  int32_t num_requests;         // R
  int32_t max_draft;
  const int32_t* draft_row_start;   // [R] or nullptr: cu[r]
  const int32_t* target_row_start;  // [R] or nullptr: cu[r] + r
  PerRequest<float> draft_temperature;
  PerRequest<float> temperature;
  PerRequest<int32_t> top_k;
  PerRequest<float> top_p;
  PerRequest<int64_t> seed;
  PerRequest<int64_t> position;
  int32_t tree_rows;  // 0: a chain (above); 1: verify_tree's rows, one per node
                      // (cu counts nodes; target and draft rows both start at cu[r])
  int32_t* tokens;    // [R, max_draft + 1] out
  int32_t* accepted;  // [R] out
  int32_t* emitted;   // [R] out
  int32_t* status;    // [R] out
};

// Where request r's rows are: n drafts, draft rows d0.., target rows t0..
struct VerifyLayout {
  int32_t n;
  int64_t d0;
  int64_t t0;
  bool valid;  // false: kBadLengths
};

template <typename T, typename D>
DSPARK_HD VerifyLayout verify_layout(const VerifyArgs<T, D>& a, int64_t r) {
  VerifyLayout L;
  const int64_t begin = a.cu[r], end = a.cu[r + 1];
  if (a.tree_rows) {  // n + 1 nodes; node i's rows at begin + i (max_draft is not a bound here)
    const int64_t nodes = end - begin;
    L.n = static_cast<int32_t>(nodes - 1);
    L.d0 = L.t0 = begin;
    L.valid = begin >= 0 && nodes >= 1 && nodes <= static_cast<int64_t>(kMaxSlot) && begin + nodes <= a.num_tokens &&
              (a.draft_mode == kDraftPointMass || begin + nodes <= a.draft_rows) && begin + nodes <= a.target_rows;
    return L;
  }
  L.n = static_cast<int32_t>(end - begin);
  L.d0 = a.draft_row_start ? static_cast<int64_t>(a.draft_row_start[r]) : begin;
  L.t0 = a.target_row_start ? static_cast<int64_t>(a.target_row_start[r]) : begin + r;
  const int64_t n = end - begin;
  L.valid = n >= 0 && n <= a.max_draft && n < static_cast<int64_t>(kMaxSlot) && L.d0 >= 0 &&
            L.d0 + n <= a.num_tokens && (a.draft_mode == kDraftPointMass || L.d0 + n <= a.draft_rows) && L.t0 >= 0 &&
            L.t0 + n + 1 <= a.target_rows;
  return L;
}

// Whether request r samples with a top-k/top-p filter (its rows need keep keys).
template <typename T, typename D>
DSPARK_HD bool verify_filtered(const VerifyArgs<T, D>& a, int64_t r) {
  return a.temperature[r] > 0.0f && (topk_active(a.top_k[r], a.vocab) || topp_active(a.top_p[r]));
}

template <typename T, typename D>
DSPARK_HD int32_t verify_draft_mode(const VerifyArgs<T, D>& a, int64_t r) {
  return a.draft_mode == kDraftPointMass || !(a.draft_temperature[r] > 0.0f) ? kDraftPointMass : a.draft_mode;
}

template <typename T, typename D>
DSPARK_HD RaceStream verify_stream(const VerifyArgs<T, D>& a, int64_t r, uint32_t purpose, uint32_t slot) {
  return RaceStream{a.seed[r], a.position[r], purpose, slot};
}

// COIN draw of draft j (slot j + 1, vocabulary index 0).
template <typename T, typename D>
DSPARK_HD uint32_t verify_coin_bits(const VerifyArgs<T, D>& a, int64_t r, int32_t j) {
  return philox_draw(a.seed[r], a.position[r], kPurposeCoin, static_cast<uint32_t>(j + 1), 0).x[0];
}

// Write request r's outputs: the accepted drafts, then `emit`, then -1s.
// An abort writes -1 everywhere and 0 counts.
template <typename T, typename D>
DSPARK_HD void verify_write(const VerifyArgs<T, D>& a, int64_t r, const VerifyLayout& L, int32_t accepted,
                            int32_t emit, int32_t flags) {
  const bool abort = (flags & kAbortMask) != 0;
  int32_t* row = a.tokens + r * (static_cast<int64_t>(a.max_draft) + 1);
  for (int32_t i = 0; i <= a.max_draft; ++i) {
    int32_t t = -1;
    if (!abort && i < accepted) t = a.draft_tokens[L.d0 + i];
    if (!abort && i == accepted) t = emit;
    row[i] = t;
  }
  a.accepted[r] = abort ? 0 : accepted;
  a.emitted[r] = abort ? 0 : accepted + 1;
  a.status[r] = flags;
}

}  // namespace dspark

namespace dspark {

// What the decision kernel leaves for the residual pass of request r.
struct VerifyPending {
  int32_t j;         // the rejected position, or -1 (outputs already written)
  int32_t accepted;
  int32_t flags;
  int32_t from_p;    // 1: emit the race over p_j (a lazily raced row's rare emit), 0: the residual's winner, or
                     // the race over p_j when the residual has no mass
  SoftmaxAcc target;
  DraftRowStats draft;
};

inline int64_t verify_rows(int64_t num_requests, int64_t max_draft) { return num_requests * (max_draft + 1); }

struct VerifyWorkspace {
  uint32_t* keep_keys;              // [R, K + 1]
  TargetRowStats* target_partials;  // [R, K + 1, chunks]
  DraftRowStats* draft_partials;    // [R, K + 1, chunks]
  VerifyPending* pending;           // [R]
  RaceBest* residual_partials;      // [2, R, residual chunks]: the residual's race, then p_j's
  char* split_select;               // split_select.h's state for small batches' keep keys, or nullptr
  int64_t bytes;
};

// Carves `base` (nullptr: only sizes it) for R requests, max_draft K, V.
inline VerifyWorkspace verify_workspace(void* base, int64_t R, int64_t K, int64_t V) {
  const int64_t rows = verify_rows(R, K), chunks = fixed_chunks(V), rchunks = split_chunks(R, V);
  WorkspaceCarve c{static_cast<char*>(base)};
  VerifyWorkspace w;
  w.keep_keys = c.take<uint32_t>(rows);
  w.target_partials = c.take<TargetRowStats>(rows * chunks);
  w.draft_partials = c.take<DraftRowStats>(rows * chunks);
  w.pending = c.take<VerifyPending>(R);
  w.residual_partials = c.take<RaceBest>(2 * R * rchunks);
  w.split_select = split_select_splits(rows, V) > 0 ? c.take<char>(split_select_workspace_bytes(rows)) : nullptr;
  w.bytes = c.bytes;
  return w;
}

}  // namespace dspark
