// CUDA binding of `commit_tokens`.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../commit_common.h"
#include "../kernels/commit_tokens.cuh"

namespace dspark {
namespace {

void commit_tokens_cuda(const at::Tensor& out_tokens, const at::Tensor& out_len, const at::Tensor& position,
                        const at::Tensor& max_len, const at::Tensor& finished, const at::Tensor& last_token,
                        const at::Tensor& error, const at::Tensor& tokens, const at::Tensor& emitted,
                        const at::Tensor& status, const c10::optional<at::Tensor>& stop_tokens) {
  check_commit_args(out_tokens, out_len, position, max_len, finished, last_token, error, tokens, emitted, status,
                    stop_tokens);
  const c10::cuda::CUDAGuard guard(out_tokens.device());
  const CommitArgs a = make_commit_args(out_tokens, out_len, position, max_len, finished, last_token, error, tokens,
                                        emitted, status, stop_tokens);
  const cudaError_t err = commit_tokens_launch(a, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kCommitOp, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CUDA, m) { m.impl("commit_tokens", &dspark::commit_tokens_cuda); }
