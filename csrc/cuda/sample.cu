// CUDA binding of `sample`: tensors -> SampleArgs -> kernels/sample.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernels/sample.cuh"
#include "../sample_common.h"
#include "env_switch.h"
#include "workspace.h"

namespace dspark {
namespace {

template <typename Storage>
void launch(const at::Tensor& logits, const at::Tensor& temperature,
            const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
            const at::Tensor& seed, const at::Tensor& position, int64_t purpose,
            const at::Tensor& slot, const c10::optional<at::Tensor>& row_start, at::Tensor& tokens,
            at::Tensor& status, void* workspace) {
  const auto args = make_sample_args<Storage>(logits, temperature, top_k, top_p, seed, position,
                                              purpose, slot, row_start, tokens, status);
  const cudaError_t err = sample_launch<Storage>(args, workspace, top_k.has_value() || top_p.has_value(),
                                                 split_select_enabled(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kSampleOp, ": CUDA launch failed: ", cudaGetErrorString(err));
}

void sample_out_cuda(const at::Tensor& logits, const at::Tensor& temperature,
                     const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                     const at::Tensor& seed, const at::Tensor& position, int64_t purpose,
                     const at::Tensor& slot, const c10::optional<at::Tensor>& row_start,
                     at::Tensor& tokens, at::Tensor& status,
                     const c10::optional<at::Tensor>& workspace) {
  check_sample_args(logits, temperature, top_k, top_p, seed, position, purpose, slot, row_start);
  const int64_t R = sample_num_requests(logits, row_start);
  check_output(kSampleOp, "tokens", tokens, R, at::kInt, logits);
  check_output(kSampleOp, "status", status, R, at::kInt, logits);
  check_sample_apart(logits, temperature, top_k, top_p, seed, position, slot, row_start, tokens, status, workspace);
  if (R == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor scratch;
  void* ws = workspace_ptr(kSampleOp, workspace, sample_workspace_need(logits, R), logits, scratch);
  switch (logits.scalar_type()) {
    case at::kFloat:
      launch<float>(logits, temperature, top_k, top_p, seed, position, purpose, slot, row_start, tokens, status, ws);
      break;
    case at::kHalf:
      launch<__half>(logits, temperature, top_k, top_p, seed, position, purpose, slot, row_start, tokens, status, ws);
      break;
    default:
      launch<__nv_bfloat16>(logits, temperature, top_k, top_p, seed, position, purpose, slot, row_start, tokens,
                            status, ws);
  }
}

at::Tensor keep_key_cuda(const at::Tensor& logits, const at::Tensor& temperature,
                         const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p) {
  at::Tensor keys = keep_key_output(logits, temperature, top_k, top_p);
  if (logits.size(0) == 0) return keys;
  const c10::cuda::CUDAGuard guard(logits.device());
  auto* out = static_cast<uint32_t*>(keys.data_ptr());
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor split_ws;
  void* split = split_select_scratch(logits.size(0), logits.size(1), logits, split_ws);
  cudaError_t err;
  switch (logits.scalar_type()) {
    case at::kFloat:
      err = sample_keep_keys_launch(make_keep_key_args<float>(logits, temperature, top_k, top_p), out, split, stream);
      break;
    case at::kHalf:
      err = sample_keep_keys_launch(make_keep_key_args<__half>(logits, temperature, top_k, top_p), out, split, stream);
      break;
    default:
      err = sample_keep_keys_launch(make_keep_key_args<__nv_bfloat16>(logits, temperature, top_k, top_p), out, split,
                                    stream);
  }
  TORCH_CHECK(err == cudaSuccess, "dspark_ops.keep_key: CUDA launch failed: ", cudaGetErrorString(err));
  return keys;
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CUDA, m) {
  m.impl("keep_key", &dspark::keep_key_cuda);
  m.impl("sample", &dspark::sample_functional<&dspark::sample_out_cuda>);
  m.impl("sample.out", &dspark::sample_out_cuda);
}
