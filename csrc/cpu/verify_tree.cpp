// CPU implementation of `verify_tree`: requests in parallel; within a
// request, the walk from the root (core/tree.h holds the decisions, shared
// with the CUDA kernel), each vocabulary pass reduced over fixed chunks. The
// row statistics and the first residual are verify_chunk's (verify_rows.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../tree_common.h"
#include "keep_key.h"
#include "verify_rows.h"

namespace dspark {
namespace {

// The smallest child of `node` after `after` (local indices), or -1.
template <typename T, typename D>
int32_t next_child(const TreeArgs<T, D>& a, int64_t c0, int32_t n, int32_t node, int32_t after) {
  for (int32_t c = after + 1; c < n; ++c)
    if (a.parents[c0 + c] == node) return c;
  return -1;
}

// Every parent valid and every depth <= max_depth (depth: scratch of n).
template <typename T, typename D>
bool tree_valid(const TreeArgs<T, D>& a, int64_t c0, int32_t n, std::vector<int32_t>& depth) {
  depth.assign(n, 0);
  for (int32_t i = 0; i < n; ++i) {
    if (!tree_parent_ok(a, c0, i)) return false;
    if (i > 0 && (depth[i] = depth[a.parents[c0 + i]] + 1) > a.v.max_draft) return false;
  }
  return true;
}

// sum of f(i) over the vocabulary, in fixed chunk order.
template <typename F>
float vocab_sum(int64_t V, F f) {
  return chunked_reduce(
      V, 0.0f,
      [&](int64_t b, int64_t e) {
        float s = 0.0f;
        for (int64_t i = b; i < e; ++i) s += f(i);
        return s;
      },
      [](float x, float y) { return x + y; });
}

// The exponential race on the EMIT stream over race values value(i) (-inf:
// not a candidate): log w for materialised weights (the residual's token, as
// verify_chunk's residual race draws it), or p's race value without the
// zeroed tokens.
template <typename F>
RaceBest race_over(int64_t V, const RaceStream& stream, F value) {
  return chunked_reduce(
      V, race_empty(),
      [&](int64_t begin, int64_t end) {
        RaceBest best = race_empty();
        for (int64_t i = begin; i < end; i += 4) {
          const PhiloxBlock bits =
              philox_draw(stream.seed, stream.position, stream.purpose, stream.slot, static_cast<uint32_t>(i >> 2));
          for (int j = 0; j < 4 && i + j < end; ++j) {
            const float x = value(i + j);
            if (!(x > -INFINITY)) continue;
            const float s = race_score(x, bits.x[j]);
            if (race_better(s, static_cast<int32_t>(i + j), best)) best = RaceBest{s, static_cast<int32_t>(i + j)};
          }
        }
        return best;
      },
      race_merge);
}

template <typename T, typename D>
void tree_request(const TreeArgs<T, D>& a, int64_t r, std::vector<int32_t>& depth, std::vector<float>& w,
                  std::vector<float>& qv) {
  const VerifyArgs<T, D>& v = a.v;
  const int64_t width = int64_t{v.max_draft} + 1;
  int32_t* tok_out = v.tokens + r * width;
  int32_t* path_out = a.path + r * width;
  int32_t accepted = 0, emit = -1, flags = 0;
  const auto finish = [&] {
    const bool abort = (flags & kAbortMask) != 0;
    for (int64_t k = abort ? 0 : accepted; k < width; ++k) tok_out[k] = -1;
    for (int64_t k = abort ? 0 : accepted + 1; k < width; ++k) path_out[k] = -1;
    if (!abort) tok_out[accepted] = emit;
    v.accepted[r] = abort ? 0 : accepted;
    v.emitted[r] = abort ? 0 : accepted + 1;
    v.status[r] = flags;
  };
  const VerifyLayout L = verify_layout(v, r);
  const int32_t mode = tree_mode(a, r);
  if (!L.valid) flags = kBadLengths;
  else if (mode < 0 || !tree_valid(a, L.t0, L.n + 1, depth)) flags = kBadTree;
  if (flags) return finish();
  const int64_t c0 = L.t0, V = v.vocab;
  const int32_t n = L.n + 1;
  const float temperature = v.temperature[r], draft_temperature = v.draft_temperature[r];
  const int32_t top_k = v.top_k[r];
  const float top_p = v.top_p[r];
  const bool greedy = !(temperature > 0.0f);
  const bool filtered = !greedy && (topk_active(top_k, V) || topp_active(top_p));
  const int32_t draft_mode = verify_draft_mode(v, r);
  path_out[0] = 0;
  int32_t cur = 0;
  for (;;) {
    const T* trow = v.target + (c0 + cur) * v.target_stride;
    const D* drow = v.draft != nullptr ? v.draft + (c0 + cur) * v.draft_stride : nullptr;
    const RaceRow row{greedy, temperature, filtered ? row_keep_key(trow, V, temperature, top_k, top_p) : 0u};
    const RaceStream emit_stream = verify_stream(v, r, kPurposeEmit, static_cast<uint32_t>(cur));
    TargetRowStats st = greedy ? target_row_stats(trow, V, row, emit_stream) : target_row_softmax(trow, V, row);
    if (st.flags & kNonfiniteLogits) flags |= kNonfiniteLogits;
    else if (st.race.best.index < 0) flags |= kAllMasked;
    if (flags & kAbortMask) break;
    int32_t next = -1;
    if (greedy) {
      for (int32_t c = next_child(a, c0, n, cur, cur); c >= 0; c = next_child(a, c0, n, cur, c)) {
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
      const auto q_of = [&](int64_t i) {  // q at the current node, after updates
        if (s.q_mat) return s.qsum > 0.0f ? qv[i] / s.qsum : 0.0f;
        return draft_q(draft_mode, drow, i, ds, draft_temperature);
      };
      const auto p_of = [&](int64_t i) {  // p at the current node, after updates
        int32_t ignored = 0;
        const float x = race_value(ignored, row, static_cast<float>(trow[i]));
        const float e0 = x > -INFINITY ? expf(x - st.softmax.m) : 0.0f;
        const float p0 = x > -INFINITY ? e0 / st.softmax.s : 0.0f;  // target_prob's arithmetic
        const float wi = s.dist == kTreeWeights || (s.dist == kTreeZeroed && s.zeroed >= 2) ? w[i] : 0.0f;
        return tree_p(s, st.softmax, p0, e0, wi, static_cast<int32_t>(i));
      };
      for (int32_t c = next_child(a, c0, n, cur, cur); c >= 0; c = next_child(a, c0, n, cur, c)) {
        const int32_t tok = v.draft_tokens[c0 + c];
        if (tok < 0 || tok >= V) {  // skipped: no coin, no update, subtree not visited
          flags |= kTokenOutOfRange;
          continue;
        }
        if (mode != kSiblingDeterministic && !s.q_ready) {
          if (draft_mode == kDraftLogits) ds = draft_row_stats(drow, V, draft_temperature);
          s.q_ready = true;
          if (ds.flags & kNonfiniteLogits) {
            flags |= kNonfiniteLogits;
            break;
          }
        }
        const float q = mode == kSiblingDeterministic ? 1.0f : q_of(tok);
        if (!(q > 0.0f)) {  // q is not what this sibling was drawn from
          flags |= kDraftProbZero;
          continue;
        }
        const float p = p_of(tok);
        if (tree_coin(philox_draw(v.seed[r], v.position[r], kPurposeCoin, static_cast<uint32_t>(c), 0).x[0], q, p)) {
          next = c;
          break;
        }
        if (mode == kSiblingDeterministic) {  // p <- p without tok (nothing to do if p(tok) = 0)
          if (!(p > 0.0f)) continue;
          int32_t ignored = 0;
          const float e = expf(race_value(ignored, row, static_cast<float>(trow[tok])) - st.softmax.m);
          if (!(st.softmax.s - (s.removed + e) > 0.0f)) continue;  // no mass left: p unchanged
          if (s.zeroed == 1) {  // from the second on, live flags in w[]
            std::fill(w.begin(), w.begin() + V, 1.0f);
            w[s.first_zero] = 0.0f;
          }
          if (s.zeroed >= 1) w[tok] = 0.0f;
          if (s.zeroed == 0) s.first_zero = tok;
          s.last_zero = tok;
          s.removed += e;
          ++s.zeroed;
          s.dist = kTreeZeroed;
          continue;
        }
        // iid / without replacement: p <- max(0, p - q), renormalised unless its mass is 0.
        const float total = vocab_sum(V, [&](int64_t i) { return std::max(0.0f, p_of(i) - q_of(i)); });
        if (total > 0.0f) {
          at::parallel_for(0, V, kCpuChunk, [&](int64_t b, int64_t e) {
            for (int64_t i = b; i < e; ++i) w[i] = std::max(0.0f, p_of(i) - q_of(i));
          });
          s.dist = kTreeWeights;
          s.wsum = total;
        }
        if (mode == kSiblingWithoutReplacement) {  // q <- q without tok, renormalised
          if (!s.q_mat) {
            for (int64_t i = 0; i < V; ++i) qv[i] = q_of(i);
            s.q_mat = true;
          }
          qv[tok] = 0.0f;
          s.qsum = vocab_sum(V, [&](int64_t i) { return qv[i]; });
        }
      }
      if (flags & kAbortMask) break;
      if (next < 0) {  // no child accepted: a token from the current p
        RaceBest b;
        if (s.dist == kTreeWeights) {
          b = race_over(V, emit_stream, [&](int64_t i) { return w[i] > 0.0f ? logf(w[i]) : -INFINITY; });
        } else {
          const TargetRowStats full = target_row_stats(trow, V, row, emit_stream);
          if (s.dist == kTreePristine) b = full.race.best;
          else if (s.zeroed == 1) b = full.race.best.index != s.first_zero ? full.race.best : full.race.second;
          else
            b = race_over(V, emit_stream, [&](int64_t i) {
              int32_t ignored = 0;
              return w[i] == 0.0f ? -INFINITY : race_value(ignored, row, static_cast<float>(trow[i]));
            });
        }
        // Every kept token zeroed (rounding let the last coin fail where
        // exact p was 1): p before that zeroing, a point mass on it.
        emit = b.index >= 0 ? b.index : s.last_zero;
        break;
      }
    }
    tok_out[accepted] = v.draft_tokens[c0 + next];
    path_out[++accepted] = next;
    cur = next;
  }
  finish();
}

void verify_tree_out_cpu(const at::Tensor& target_logits, const at::Tensor& node_tokens, const at::Tensor& parents,
                         const at::Tensor& cu_num_nodes, int64_t max_depth,
                         const c10::optional<at::Tensor>& draft_probs, const c10::optional<at::Tensor>& draft_logits,
                         const at::Tensor& draft_temperature, const c10::optional<at::Tensor>& sibling_mode,
                         const at::Tensor& temperature, const c10::optional<at::Tensor>& top_k,
                         const c10::optional<at::Tensor>& top_p, const at::Tensor& seed, const at::Tensor& position,
                         at::Tensor& tokens, at::Tensor& accepted, at::Tensor& emitted, at::Tensor& path,
                         at::Tensor& status, const c10::optional<at::Tensor>& workspace) {
  check_tree_args(target_logits, node_tokens, parents, cu_num_nodes, max_depth, draft_probs, draft_logits,
                  draft_temperature, sibling_mode, temperature, top_k, top_p, seed, position);
  check_tree_outputs(target_logits, cu_num_nodes, max_depth, tokens, accepted, emitted, path, status);
  check_tree_apart(target_logits, node_tokens, parents, cu_num_nodes, draft_probs, draft_logits, draft_temperature,
                   sibling_mode, temperature, top_k, top_p, seed, position, tokens, accepted, emitted, path, status,
                   workspace);
  const int64_t R = verify_num_requests(cu_num_nodes);
  if (R == 0) return;
  const c10::optional<at::Tensor>& draft = draft_probs.has_value() ? draft_probs : draft_logits;
  const int64_t V = target_logits.size(1);
  check_tree_workspace(workspace, R, V, draft.has_value(), target_logits);
  dispatch_verify_types<float, c10::Half, c10::BFloat16>(target_logits, draft, [&]<typename T, typename D>() {
    const auto a = make_tree_args<T, D>(target_logits, node_tokens, parents, cu_num_nodes, max_depth, draft_probs,
                                        draft_logits, draft_temperature, sibling_mode, temperature, top_k, top_p, seed,
                                        position, tokens, accepted, emitted, path, status);
    // Requests in parallel; a request's vocabulary passes run inline there
    // (at::parallel_for does not nest), in the same fixed chunk order.
    at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) {
      std::vector<int32_t> depth;
      std::vector<float> w(V), qv(V);
      for (int64_t r = b; r < e; ++r) tree_request(a, r, depth, w, qv);
    });
  });
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CPU, m) {
  m.impl("verify_tree", &dspark::tree_functional<&dspark::verify_tree_out_cpu>);
  m.impl("verify_tree.out", &dspark::verify_tree_out_cpu);
}
