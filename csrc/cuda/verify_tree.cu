// CUDA binding of `verify_tree`: tensors -> TreeArgs -> kernels/verify_tree.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernels/verify_tree.cuh"
#include "../tree_common.h"
#include "workspace.h"

namespace dspark {
namespace {

void verify_tree_out_cuda(const at::Tensor& target_logits, const at::Tensor& node_tokens, const at::Tensor& parents,
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
  const int64_t R = verify_num_requests(cu_num_nodes);
  if (R == 0) return;
  const c10::cuda::CUDAGuard guard(target_logits.device());
  const bool with_q = draft_probs.has_value() || draft_logits.has_value();
  const int64_t need = tree_workspace(nullptr, R, target_logits.size(1), with_q).bytes;
  at::Tensor scratch;
  void* ws = workspace_ptr(kTreeOp, workspace, need, target_logits, scratch);
  const c10::optional<at::Tensor>& draft = draft_probs.has_value() ? draft_probs : draft_logits;
  dispatch_verify_types<float, __half, __nv_bfloat16>(target_logits, draft, [&]<typename T, typename D>() {
    const auto a = make_tree_args<T, D>(target_logits, node_tokens, parents, cu_num_nodes, max_depth, draft_probs,
                                        draft_logits, draft_temperature, sibling_mode, temperature, top_k, top_p, seed,
                                        position, tokens, accepted, emitted, path, status);
    const cudaError_t err = verify_tree_launch<T, D>(a, ws, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, kTreeOp, ": CUDA launch failed: ", cudaGetErrorString(err));
  });
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CUDA, m) {
  m.impl("verify_tree", &dspark::tree_functional<&dspark::verify_tree_out_cuda>);
  m.impl("verify_tree.out", &dspark::verify_tree_out_cuda);
}
