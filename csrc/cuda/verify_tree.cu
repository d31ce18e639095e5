// CUDA binding of `verify_tree`: tensors -> TreeArgs -> kernels/verify_tree.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernels/verify_tree.cuh"
#include "../tree_common.h"
#include "env_switch.h"
#include "workspace.h"

namespace dspark {
namespace {

// Whether to run the row pass (every node row's statistics read by the
// whole GPU before the walk) and over which requests' rows.
struct TreeRowPass {
  int64_t rows = 0;          // 0: none; else every target row
  bool greedy_rows = false;  // greedy requests' rows too (else their walk's argmax pass reads them)
};

// DSPARK_TREE_ROW_PASS=1: always, every request's rows; =0: never (the
// benchmarks and tests compare the two). Otherwise: a sampled request's
// walk spends ~19 sequential chunk rounds on one SM per visited row, so the
// pass's one parallel read of every row wins while rows <= 32 x SMs x
// waves of walking blocks (about 32 nodes per request; 4224 rows for
// R <= 132 on an H100); a greedy walk's argmax pass is much faster, so
// greedy rows join only while rows <= 2 x SMs (bench/PERF_NOTES.md §5a;
// thresholds to be tuned on measurements). Needs the larger workspace: a
// caller's workspace sized without num_nodes (= target_logits.size(0))
// runs without it.
TreeRowPass tree_row_pass(int64_t R, int64_t rows, const c10::optional<at::Tensor>& workspace, int64_t V) {
  const EnvSwitch env = env_switch("DSPARK_TREE_ROW_PASS");
  if (env == EnvSwitch::kOff || rows * fixed_chunks(V) > INT32_MAX) return {};
  if (!tree_workspace_fits_row_pass(workspace, R, V, rows)) return {};
  if (env == EnvSwitch::kOn) return {rows, true};
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t waves = (R + sms - 1) / sms;
  if (rows > 32 * sms * waves) return {};
  return {rows, rows <= 2 * sms};
}

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
  check_tree_apart(target_logits, node_tokens, parents, cu_num_nodes, draft_probs, draft_logits, draft_temperature,
                   sibling_mode, temperature, top_k, top_p, seed, position, tokens, accepted, emitted, path, status,
                   workspace);
  const int64_t R = verify_num_requests(cu_num_nodes);
  if (R == 0) return;
  const c10::cuda::CUDAGuard guard(target_logits.device());
  const bool with_q = draft_probs.has_value() || draft_logits.has_value();
  const int64_t V = target_logits.size(1);
  const TreeRowPass pass = tree_row_pass(R, target_logits.size(0), workspace, V);
  at::Tensor scratch;
  void* ws = workspace_ptr(kTreeOp, workspace, tree_workspace_need(R, V, with_q, pass.rows), target_logits, scratch);
  const c10::optional<at::Tensor>& draft = draft_probs.has_value() ? draft_probs : draft_logits;
  dispatch_verify_types<float, __half, __nv_bfloat16>(target_logits, draft, [&]<typename T, typename D>() {
    const auto a = make_tree_args<T, D>(target_logits, node_tokens, parents, cu_num_nodes, max_depth, draft_probs,
                                        draft_logits, draft_temperature, sibling_mode, temperature, top_k, top_p, seed,
                                        position, tokens, accepted, emitted, path, status);
    const bool may_filter = top_k.has_value() || top_p.has_value();
    const cudaError_t err = verify_tree_launch<T, D>(a, ws, pass.rows, pass.greedy_rows,
                                                    may_filter && split_select_enabled(),
                                                    at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, kTreeOp, ": CUDA launch failed: ", cudaGetErrorString(err));
  });
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CUDA, m) {
  m.impl("verify_tree", &dspark::tree_functional<&dspark::verify_tree_out_cuda>);
  m.impl("verify_tree.out", &dspark::verify_tree_out_cuda);
}
