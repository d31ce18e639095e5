// CPU implementation of `commit_tokens` (core/commit.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../commit_common.h"

namespace dspark {
namespace {

void commit_tokens_cpu(const at::Tensor& out_tokens, const at::Tensor& out_len, const at::Tensor& position,
                       const at::Tensor& max_len, const at::Tensor& finished, const at::Tensor& last_token,
                       const at::Tensor& error, const at::Tensor& tokens, const at::Tensor& emitted,
                       const at::Tensor& status, const c10::optional<at::Tensor>& stop_tokens) {
  check_commit_args(out_tokens, out_len, position, max_len, finished, last_token, error, tokens, emitted, status,
                    stop_tokens);
  const CommitArgs a = make_commit_args(out_tokens, out_len, position, max_len, finished, last_token, error, tokens,
                                        emitted, status, stop_tokens);
  at::parallel_for(0, a.num_requests, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) commit_request(a, r);
  });
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CPU, m) { m.impl("commit_tokens", &dspark::commit_tokens_cpu); }
