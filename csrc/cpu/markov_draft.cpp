// CPU implementation of `markov_draft` (DESIGN §3): per step, the bias
// w1[x_{k-1}] @ w2 of every drafting request in one pass over w2 (parallel
// over vocabulary chunks, fp32, summed in ascending r), the corrected row
// written in the logits' dtype, then per request the keep-key mask and the
// race (core/markov.h, the CUDA kernels' arithmetic).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../markov_common.h"
#include "keep_key.h"

namespace dspark {
namespace {

constexpr int64_t kBiasChunk = 512;  // vocabulary entries per task: the chunk's sums stay in L1

template <typename T>
void markov_cpu_impl(const MarkovArgs<T>& a, const float* w1, const float* w2, int64_t rank) {
  const int64_t R = a.num_requests, G = a.group, V = a.vocab;
  std::vector<MarkovState> state(R);
  for (int64_t r = 0; r < R; ++r) state[r] = markov_start(a.anchor[r], a.vocab, a.status[r]);
  std::vector<int64_t> rows;  // requests drafting this step
  for (int32_t k = 1; k <= G; ++k) {
    rows.clear();
    for (int64_t r = 0; r < R; ++r) {
      if (state[r].live && markov_limit(a, r) >= k) {
        rows.push_back(r);
      } else {
        state[r].live = 0;
        a.tokens[r * G + k - 1] = -1;
        std::fill_n(a.draft_logits + (r * G + k - 1) * V, V, static_cast<T>(-INFINITY));
      }
    }
    if (rows.empty()) continue;
    // Corrected rows: w2 is read once per step for all drafting requests.
    at::parallel_for(0, (V + kBiasChunk - 1) / kBiasChunk, 1, [&](int64_t cb, int64_t ce) {
      std::vector<float> acc(kBiasChunk);
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t v0 = c * kBiasChunk, n = std::min<int64_t>(kBiasChunk, V - v0);
        for (const int64_t r : rows) {
          std::fill_n(acc.data(), n, 0.0f);
          const float* w1_row = w1 + state[r].prev * rank;
          for (int64_t j = 0; j < rank; ++j) {
            const float s = w1_row[j];
            const float* w2_row = w2 + j * V + v0;
            for (int64_t i = 0; i < n; ++i) acc[i] += s * w2_row[i];
          }
          const T* base = a.base + r * a.base_stride_r + (k - 1) * a.base_stride_g + v0;
          T* out = a.draft_logits + (r * G + k - 1) * V + v0;
          const float t = a.temperature[r];
          for (int64_t i = 0; i < n; ++i) {
            out[i] = static_cast<T>(markov_corrected(static_cast<float>(base[i]), acc[i], t));
          }
        }
      }
    });
    // Mask and race each drafting request's row.
    at::parallel_for(0, static_cast<int64_t>(rows.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q) {
        const int64_t r = rows[q];
        T* row = a.draft_logits + (r * G + k - 1) * V;
        if (markov_filtered(a, r)) {
          const uint32_t keep = row_keep_key(row, V, 1.0f, a.top_k[r], a.top_p[r]);
          for (int64_t i = 0; i < V; ++i) {
            const float x = static_cast<float>(row[i]);
            if (markov_masked(x, keep)) row[i] = static_cast<T>(-INFINITY);
          }
        }
        const RaceRow rr = markov_race_row(a.temperature[r]);
        const RaceStream stream = markov_stream(a, r, k);
        RaceBest best = race_empty();
        int32_t flags = 0;
        for (int64_t i = 0; i < V; i += 4) {
          float l[4];
          const int count = static_cast<int>(std::min<int64_t>(4, V - i));
          for (int j = 0; j < 4; ++j) l[j] = j < count ? static_cast<float>(row[i + j]) : 0.0f;
          race_offer_group(best, flags, rr, stream, i >> 2, l, count);
        }
        int32_t token, step_status;
        race_finish(best, flags, token, step_status);
        markov_advance(state[r], true, token, step_status, a.tokens[r * G + k - 1], a.status[r]);
      }
    });
  }
}

void markov_draft_out_cpu(const at::Tensor& base, const at::Tensor& anchor, const at::Tensor& w1,
                          const at::Tensor& w2, const at::Tensor& temperature, const c10::optional<at::Tensor>& top_k,
                          const c10::optional<at::Tensor>& top_p, const at::Tensor& seed, const at::Tensor& position,
                          const c10::optional<at::Tensor>& num_draft, at::Tensor& tokens, at::Tensor& draft_logits,
                          at::Tensor& status, const c10::optional<at::Tensor>& workspace) {  // checked, not used
  check_markov_args(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft);
  check_markov_outputs(base, tokens, draft_logits, status);
  check_markov_apart(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft, tokens, draft_logits,
                     status, workspace);
  if (base.size(0) == 0) return;  // (G = 0 still sets each anchor's status)
  check_given_workspace(kMarkovOp, workspace, markov_workspace_need(base, w1), base);
  const at::Tensor w1f = w1.to(at::kFloat).contiguous(), w2f = w2.to(at::kFloat).contiguous();
  const float* w1p = w1f.const_data_ptr<float>();
  const float* w2p = w2f.const_data_ptr<float>();
  switch (base.scalar_type()) {
    case at::kFloat:
      markov_cpu_impl(make_markov_args<float>(base, anchor, temperature, top_k, top_p, seed, position, num_draft,
                                              tokens, draft_logits, status), w1p, w2p, w1.size(1));
      break;
    case at::kHalf:
      markov_cpu_impl(make_markov_args<c10::Half>(base, anchor, temperature, top_k, top_p, seed, position,
                                                  num_draft, tokens, draft_logits, status), w1p, w2p, w1.size(1));
      break;
    default:
      markov_cpu_impl(make_markov_args<c10::BFloat16>(base, anchor, temperature, top_k, top_p, seed, position,
                                                      num_draft, tokens, draft_logits, status), w1p, w2p,
                      w1.size(1));
  }
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CPU, m) {
  m.impl("markov_draft", &dspark::markov_functional<&dspark::markov_draft_out_cpu>);
  m.impl("markov_draft.out", &dspark::markov_draft_out_cpu);
}
