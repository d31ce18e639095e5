// Tree verification (DESIGN §3 verify_tree): the op's arguments as raw
// pointers and the decisions both backends take while walking a request's
// tree. The row statistics and the first residual are verify_chunk's own
// (core/verify.h), so a path-shaped tree gives the chain's results bit for bit.
#pragma once
#include <math.h>

#include <cstdint>

#include "broadcast.h"
#include "chunks.h"
#include "macros.h"
#include "split_select.h"
#include "status.h"
#include "verify.h"
#include "verify_args.h"

namespace dspark {

// How p (and q) change after a rejected sibling (dspark_ops.SiblingMode).
enum SiblingMode : int32_t { kSiblingIid = 0, kSiblingWithoutReplacement = 1, kSiblingDeterministic = 2 };

// T: target logits type; D: draft rows type (T or float). `v` holds the rows,
// sampling parameters and tokens/accepted/emitted/status outputs with
// v.tree_rows = 1 (cu counts nodes, node i's rows at cu[r] + i, node tokens
// as v.draft_tokens) and v.max_draft = max_depth (token rows of max_depth + 1).
template <typename T, typename D>
struct TreeArgs {
  VerifyArgs<T, D> v;
  const int32_t* parents;          // [M] request-local parent indices, -1 for each root
  PerRequest<int8_t> sibling_mode;  // codes; fallback -1: iid with draft rows, deterministic without
  int32_t* path;                   // [R, max_depth + 1] out: accepted node indices, root first, then -1
};

// The request's sibling mode, or -1 for an unknown code (kBadTree). A point
// mass draft (no draft rows, or draft temperature 0) is always deterministic.
template <typename T, typename D>
DSPARK_HD int32_t tree_mode(const TreeArgs<T, D>& a, int64_t r) {
  const bool given = a.sibling_mode.ptr != nullptr;
  const int32_t code = given ? a.sibling_mode[r] : kSiblingIid;
  if (code < kSiblingIid || code > kSiblingDeterministic) return -1;
  return verify_draft_mode(a.v, r) == kDraftPointMass ? kSiblingDeterministic : code;
}

// Whether node i (local, i >= 1) of a request whose rows start at c0 has a
// valid parent: 0 <= parent < i. The root's parent must be -1.
template <typename T, typename D>
DSPARK_HD bool tree_parent_ok(const TreeArgs<T, D>& a, int64_t c0, int32_t i) {
  const int32_t p = a.parents[c0 + i];
  return i == 0 ? p == -1 : (p >= 0 && p < i);
}

// The walk's view of p at the current node after rejected siblings.
enum TreeDist : int32_t {
  kTreePristine = 0,  // p itself: exp(x - m) / s over the kept set
  kTreeZeroed = 1,    // deterministic: p without the rejected tokens, / (s - removed) (w[] flags from 2 on)
  kTreeWeights = 2,   // iid / without replacement: w[] / wsum, materialised
};

struct TreeState {
  int32_t dist;      // TreeDist
  int32_t zeroed;    // tokens zeroed (kTreeZeroed)
  int32_t first_zero;  // the first one (the chain's single rejection: the race's runner-up)
  int32_t last_zero;   // the latest one
  float removed;     // sum of exp(x - m) over zeroed tokens
  float wsum;        // sum of w[] (kTreeWeights)
  bool q_ready;      // the draft row's normaliser is known (draft logits)
  bool q_mat;        // q materialised in qv[] / qsum (without replacement, after a rejection)
  float qsum;
};

DSPARK_HD TreeState tree_state_fresh() { return TreeState{kTreePristine, 0, -1, -1, 0.0f, 0.0f, false, false, 0.0f}; }

// p(tok) at the current node: `p0` is the pristine p(tok) (target_prob),
// e0 = exp(x_tok - m) (the same value before division), w_tok the
// materialised entry (kTreeWeights) or the live flag (kTreeZeroed, >= 2 zeroed).
DSPARK_HD float tree_p(const TreeState& s, const SoftmaxAcc& sm, float p0, float e0, float w_tok, int32_t tok) {
  switch (s.dist) {
    case kTreeWeights:
      return w_tok / s.wsum;
    case kTreeZeroed:
      if (s.zeroed == 1 ? tok == s.first_zero : w_tok == 0.0f) return 0.0f;
      return e0 / (sm.s - s.removed);
    default:
      return p0;
  }
}

// The coin of child `slot`: accept iff u * q < p (q = 1 for point masses).
DSPARK_HD bool tree_coin(uint32_t bits, float q, float p) { return uniform_from_bits(bits) * q < p; }

struct TreeWorkspace {
  TargetRowStats* target_partials;  // [R, chunks] the visited row's chunk partials
  DraftRowStats* draft_partials;    // [R, chunks]
  float* w;                         // [R, V] p after rejections (or live flags)
  float* qv;                        // [R, V] q after rejections (without replacement)
  // The row pass (rows > 0): every node row's keep key, owning request and
  // chunk partials, computed by the whole GPU before the walk.
  uint32_t* row_keys;               // [rows]
  int32_t* row_owner;               // [rows] the request whose sampled node the row is, or -1
  TargetRowStats* row_partials;     // [rows, chunks]
  DraftRowStats* row_draft_partials;  // [rows, chunks] (draft rows given)
  char* row_split_select;           // split_select.h's state for the rows' keys, where they are few enough
  int64_t bytes;
};

// Carves `base` (nullptr: only sizes it) for R requests and V; qv only
// with draft rows (workspace_size counts it always); the row pass's arrays
// only for rows > 0 (the number of target rows: every node of every request).
inline TreeWorkspace tree_workspace(void* base, int64_t R, int64_t V, bool with_q, int64_t rows = 0) {
  const int64_t chunks = fixed_chunks(V);
  WorkspaceCarve c{static_cast<char*>(base)};
  TreeWorkspace w;
  w.target_partials = c.take<TargetRowStats>(R * chunks);
  w.draft_partials = c.take<DraftRowStats>(R * chunks);
  w.w = c.take<float>(R * V);
  w.qv = with_q ? c.take<float>(R * V) : nullptr;
  w.row_keys = rows > 0 ? c.take<uint32_t>(rows) : nullptr;
  w.row_owner = rows > 0 ? c.take<int32_t>(rows) : nullptr;
  w.row_partials = rows > 0 ? c.take<TargetRowStats>(rows * chunks) : nullptr;
  w.row_draft_partials = rows > 0 && with_q ? c.take<DraftRowStats>(rows * chunks) : nullptr;
  w.row_split_select =
      rows > 0 && split_select_splits(rows, V) > 0 ? c.take<char>(split_select_workspace_bytes(rows)) : nullptr;
  w.bytes = c.bytes;
  return w;
}

}  // namespace dspark
