// CPU implementation of `verify_chunk`: requests in parallel; within a
// request, positions in order, each row's statistics reduced over vocabulary
// chunks (core/verify.h holds the arithmetic and the decisions, shared with
// the CUDA kernels). Rows after the first rejection are never read.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

#include "../verify_common.h"
#include "keep_key.h"
#include "verify_rows.h"

namespace dspark {
namespace {

template <typename T, typename D>
void verify_request(const VerifyArgs<T, D>& a, int64_t r) {
  const VerifyLayout L = verify_layout(a, r);
  if (!L.valid) {
    verify_write(a, r, L, 0, -1, kBadLengths);
    return;
  }
  const int64_t V = a.vocab;
  const float temperature = a.temperature[r], draft_temperature = a.draft_temperature[r];
  const int32_t top_k = a.top_k[r];
  const float top_p = a.top_p[r];
  const bool greedy = !(temperature > 0.0f);
  const bool filtered = !greedy && (topk_active(top_k, V) || topp_active(top_p));
  const int32_t mode = verify_draft_mode(a, r);
  int32_t flags = 0, accepted = 0, emit = -1;
  for (int32_t j = 0; j <= L.n; ++j) {
    const T* trow = a.target + (L.t0 + j) * a.target_stride;
    const RaceRow row{greedy, temperature, filtered ? row_keep_key(trow, V, temperature, top_k, top_p) : 0u};
    const RaceStream emit_stream = verify_stream(a, r, kPurposeEmit, static_cast<uint32_t>(j));
    TargetRowStats st = greedy ? target_row_stats(trow, V, row, emit_stream) : target_row_softmax(trow, V, row);
    const int32_t tok = j < L.n ? a.draft_tokens[L.d0 + j] : -1;
    const D* drow = a.draft != nullptr && j < L.n ? a.draft + (L.d0 + j) * a.draft_stride : nullptr;
    float p_tok = 0.0f, q_tok = 0.0f;
    DraftRowStats ds = draft_stats_empty();
    if (!greedy && j < L.n && tok >= 0 && tok < V) {
      p_tok = st.softmax.s > 0.0f ? target_prob(row, st.softmax, static_cast<float>(trow[tok])) : 0.0f;
      if (mode == kDraftLogits) ds = draft_row_stats(drow, V, draft_temperature);
      if (mode != kDraftPointMass) q_tok = draft_q(mode, drow, tok, ds, draft_temperature);
    }
    const uint32_t coin = j < L.n ? verify_coin_bits(a, r, j) : 0u;
    VerifyStep step = verify_step(greedy, mode, j, L.n, st, tok, a.vocab, p_tok, q_tok, ds.flags, coin);
    const auto with_race = [&] {  // the real race for a token from p_j
      if (!greedy) st = target_row_stats(trow, V, row, emit_stream);
    };
    if (step.action == kVerifyEmit) {
      with_race();
      step = verify_step(greedy, mode, j, L.n, st, tok, a.vocab, p_tok, q_tok, ds.flags, coin);
    }
    flags |= step.flags;
    if (step.action == kVerifyAccept) {
      ++accepted;
      continue;
    }
    emit = step.token;
    if (step.action == kVerifyResidual) {
      const RaceBest b = residual_race(trow, drow, V, row, st.softmax, mode, ds, draft_temperature, emit_stream);
      if (b.index < 0) with_race();  // residual mass 0: from p
      emit = b.index >= 0 ? b.index : st.race.best.index;
    }
    break;
  }
  verify_write(a, r, L, accepted, emit, flags);
}

void verify_chunk_out_cpu(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                          const at::Tensor& cu_num_draft, int64_t max_draft,
                          const c10::optional<at::Tensor>& draft_probs, const c10::optional<at::Tensor>& draft_logits,
                          const at::Tensor& draft_temperature, const at::Tensor& temperature,
                          const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                          const at::Tensor& seed, const at::Tensor& position,
                          const c10::optional<at::Tensor>& draft_row_start,
                          const c10::optional<at::Tensor>& target_row_start, at::Tensor& tokens, at::Tensor& accepted,
                          at::Tensor& emitted, at::Tensor& status, const c10::optional<at::Tensor>& workspace) {
  check_verify_args(target_logits, draft_tokens, cu_num_draft, max_draft, draft_probs, draft_logits, draft_temperature,
                    temperature, top_k, top_p, seed, position, draft_row_start, target_row_start);
  check_verify_outputs(target_logits, cu_num_draft, max_draft, tokens, accepted, emitted, status);
  check_verify_apart(target_logits, draft_tokens, cu_num_draft, draft_probs, draft_logits, draft_temperature,
                     temperature, top_k, top_p, seed, position, draft_row_start, target_row_start, tokens, accepted,
                     emitted, status, workspace);
  const int64_t R = verify_num_requests(cu_num_draft);
  if (R == 0) return;
  check_given_workspace(kVerifyOp, workspace, verify_workspace_need(target_logits, R, max_draft), target_logits);
  const c10::optional<at::Tensor>& draft = draft_probs.has_value() ? draft_probs : draft_logits;
  dispatch_verify_types<float, c10::Half, c10::BFloat16>(target_logits, draft, [&]<typename T, typename D>() {
    const auto a = make_verify_args<T, D>(target_logits, draft_tokens, cu_num_draft, max_draft, draft_probs,
                                          draft_logits, draft_temperature, temperature, top_k, top_p, seed, position,
                                          draft_row_start, target_row_start, tokens, accepted, emitted, status);
    at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) verify_request(a, r);
    });
  });
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CPU, m) {
  m.impl("verify_chunk", &dspark::verify_functional<&dspark::verify_chunk_out_cpu>);
  m.impl("verify_chunk.out", &dspark::verify_chunk_out_cpu);
}
