// CPU implementation of `sample`: the same core arithmetic as the CUDA
// kernels (core/race.h, core/filters.h), parallel over rows and vocabulary.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <utility>
#include <vector>

#include "../sample_common.h"
#include "keep_key.h"

namespace dspark {
namespace {

// The smallest order key request r keeps under top-k then top-p (0 = all).
template <typename T>
uint32_t threshold_key(const SampleArgs<T>& a, int64_t r) {
  const int64_t row = sample_row(a, r);
  if (row < 0 || !sample_filtered(a, r)) return 0;
  return row_keep_key(a.logits + row * a.row_stride, a.vocab, a.temperature[r], a.top_k[r], a.top_p[r]);
}

template <typename T>
SamplePartial race_chunk(const SampleArgs<T>& a, int64_t r, uint32_t keep_key, int64_t begin, int64_t end) {
  RaceBest best = race_empty();
  int32_t flags = 0;
  const int64_t row = sample_row(a, r);
  if (row < 0) return SamplePartial{best.score, best.index, kBadLengths, 0};
  const RaceRow rr{sample_greedy(a, r), a.temperature[r], keep_key};
  const T* logits = a.logits + row * a.row_stride;
  const RaceStream stream{a.seed[r], a.position[r], a.purpose, static_cast<uint32_t>(a.slot[r])};
  for (int64_t i = begin; i < end; i += 4) {
    float l[4];
    const int count = static_cast<int>(std::min<int64_t>(4, end - i));
    for (int j = 0; j < 4; ++j) l[j] = j < count ? static_cast<float>(logits[i + j]) : 0.0f;
    race_offer_group(best, flags, rr, stream, i >> 2, l, count);
  }
  return SamplePartial{best.score, best.index, flags, 0};
}

template <typename T>
void sample_cpu_impl(const SampleArgs<T>& a) {
  const int64_t R = a.num_requests;
  std::vector<uint32_t> keep(R, 0);
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) keep[r] = threshold_key(a, r);
  });
  const int64_t chunks = split_chunks(R, a.vocab);
  const int64_t chunk_len = split_chunk_len(a.vocab, chunks);
  std::vector<SamplePartial> partials(R * chunks);
  at::parallel_for(0, R * chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t r = t / chunks, begin = (t % chunks) * chunk_len;
      partials[t] = race_chunk(a, r, keep[r], begin, std::min<int64_t>(begin + chunk_len, a.vocab));
    }
  });
  for (int64_t r = 0; r < R; ++r) {
    RaceBest best = race_empty();
    int32_t flags = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const SamplePartial& p = partials[r * chunks + c];
      best = race_merge(best, RaceBest{p.score, p.index});
      flags |= p.flags;
    }
    race_finish(best, flags, a.tokens[r], a.status[r]);
  }
}

// The workspace is not needed on the CPU; one given is checked as on CUDA.
void sample_out_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                    const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                    const at::Tensor& seed, const at::Tensor& position, int64_t purpose, const at::Tensor& slot,
                    const c10::optional<at::Tensor>& row_start, at::Tensor& tokens, at::Tensor& status,
                    const c10::optional<at::Tensor>& workspace) {
  check_sample_args(logits, temperature, top_k, top_p, seed, position, purpose, slot, row_start);
  const int64_t R = sample_num_requests(logits, row_start);
  check_output(kSampleOp, "tokens", tokens, R, at::kInt, logits);
  check_output(kSampleOp, "status", status, R, at::kInt, logits);
  check_sample_apart(logits, temperature, top_k, top_p, seed, position, slot, row_start, tokens, status, workspace);
  if (R == 0) return;
  check_given_workspace(kSampleOp, workspace, sample_workspace_need(logits, R), logits);
  switch (logits.scalar_type()) {
    case at::kFloat:
      sample_cpu_impl(make_sample_args<float>(logits, temperature, top_k, top_p, seed, position, purpose, slot,
                                              row_start, tokens, status));
      break;
    case at::kHalf:
      sample_cpu_impl(make_sample_args<c10::Half>(logits, temperature, top_k, top_p, seed, position, purpose,
                                                  slot, row_start, tokens, status));
      break;
    default:
      sample_cpu_impl(make_sample_args<c10::BFloat16>(logits, temperature, top_k, top_p, seed, position,
                                                      purpose, slot, row_start, tokens, status));
  }
}

at::Tensor keep_key_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                        const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p) {
  at::Tensor keys = keep_key_output(logits, temperature, top_k, top_p);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const auto a = make_keep_key_args<T>(logits, temperature, top_k, top_p);
    auto* out = static_cast<uint32_t*>(keys.data_ptr());
    at::parallel_for(0, a.num_requests, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) out[r] = threshold_key(a, r);
    });
  };
  switch (logits.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: run(c10::BFloat16{});
  }
  return keys;
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CPU, m) {
  m.impl("keep_key", &dspark::keep_key_cpu);
  m.impl("sample", &dspark::sample_functional<&dspark::sample_out_cpu>);
  m.impl("sample.out", &dspark::sample_out_cpu);
}
