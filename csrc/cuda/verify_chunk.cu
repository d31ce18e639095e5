// CUDA binding of `verify_chunk`: tensors -> VerifyArgs -> kernels/verify_chunk.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernels/verify_chunk.cuh"
#include "../verify_common.h"
#include "env_switch.h"
#include "workspace.h"

namespace dspark {
namespace {

void verify_chunk_out_cuda(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                           const at::Tensor& cu_num_draft, int64_t max_draft,
                           const c10::optional<at::Tensor>& draft_probs, const c10::optional<at::Tensor>& draft_logits,
                           const at::Tensor& draft_temperature, const at::Tensor& temperature,
                           const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                           const at::Tensor& seed, const at::Tensor& position,
                           const c10::optional<at::Tensor>& draft_row_start,
                           const c10::optional<at::Tensor>& target_row_start, at::Tensor& tokens,
                           at::Tensor& accepted, at::Tensor& emitted, at::Tensor& status,
                           const c10::optional<at::Tensor>& workspace) {
  check_verify_args(target_logits, draft_tokens, cu_num_draft, max_draft, draft_probs, draft_logits, draft_temperature,
                    temperature, top_k, top_p, seed, position, draft_row_start, target_row_start);
  check_verify_outputs(target_logits, cu_num_draft, max_draft, tokens, accepted, emitted, status);
  check_verify_apart(target_logits, draft_tokens, cu_num_draft, draft_probs, draft_logits, draft_temperature,
                     temperature, top_k, top_p, seed, position, draft_row_start, target_row_start, tokens, accepted,
                     emitted, status, workspace);
  const int64_t R = verify_num_requests(cu_num_draft);
  if (R == 0) return;
  const c10::cuda::CUDAGuard guard(target_logits.device());
  at::Tensor scratch;
  void* ws = workspace_ptr(kVerifyOp, workspace, verify_workspace_need(target_logits, R, max_draft), target_logits,
                           scratch);
  const bool may_filter = top_k.has_value() || top_p.has_value();
  const c10::optional<at::Tensor>& draft = draft_probs.has_value() ? draft_probs : draft_logits;
  dispatch_verify_types<float, __half, __nv_bfloat16>(target_logits, draft, [&]<typename T, typename D>() {
    const auto a = make_verify_args<T, D>(target_logits, draft_tokens, cu_num_draft, max_draft, draft_probs,
                                          draft_logits, draft_temperature, temperature, top_k, top_p, seed, position,
                                          draft_row_start, target_row_start, tokens, accepted, emitted, status);
    const cudaError_t err =
        verify_chunk_launch<T, D>(a, ws, may_filter, split_select_enabled(), at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, kVerifyOp, ": CUDA launch failed: ", cudaGetErrorString(err));
  });
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CUDA, m) {
  m.impl("verify_chunk", &dspark::verify_functional<&dspark::verify_chunk_out_cuda>);
  m.impl("verify_chunk.out", &dspark::verify_chunk_out_cuda);
}
