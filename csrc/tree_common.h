// The `verify_tree` op's host-side half shared by the CPU and CUDA bindings:
// argument checks, translation into TreeArgs, and the functional form over a
// backend's `.out` kernel.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "checks.h"
#include "core/tree.h"
#include "verify_common.h"

namespace dspark {

constexpr const char* kTreeOp = "dspark_ops.verify_tree";

inline void check_tree_args(const at::Tensor& target_logits, const at::Tensor& node_tokens, const at::Tensor& parents,
                            const at::Tensor& cu_num_nodes, int64_t max_depth,
                            const c10::optional<at::Tensor>& draft_probs,
                            const c10::optional<at::Tensor>& draft_logits, const at::Tensor& draft_temperature,
                            const c10::optional<at::Tensor>& sibling_mode, const at::Tensor& temperature,
                            const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                            const at::Tensor& seed, const at::Tensor& position) {
  const char* op = kTreeOp;
  check_logits(op, "target_logits", target_logits);
  check_vocab(op, "target_logits", target_logits.size(1));
  check_int_vector(op, "node_tokens", node_tokens, -1, target_logits);
  check_int_vector(op, "parents", parents, node_tokens.size(0), target_logits, "node_tokens");
  check_offsets(op, "cu_num_nodes", cu_num_nodes, target_logits);
  TORCH_CHECK_VALUE(max_depth >= 0 && max_depth < static_cast<int64_t>(kMaxSlot), op,
                    ": max_depth must be in [0, ", kMaxSlot - 1, "], got ", max_depth);
  check_draft_rows(op, draft_probs, draft_logits, target_logits);
  const int64_t R = verify_num_requests(cu_num_nodes);
  check_per_request(op, "draft_temperature", draft_temperature, R, at::kFloat, target_logits);
  if (sibling_mode.has_value()) check_per_request(op, "sibling_mode", *sibling_mode, R, at::kChar, target_logits);
  check_sampling_params(op, R, temperature, top_k, top_p, seed, position, target_logits);
}

inline void check_tree_outputs(const at::Tensor& target_logits, const at::Tensor& cu_num_nodes, int64_t max_depth,
                               const at::Tensor& tokens, const at::Tensor& accepted, const at::Tensor& emitted,
                               const at::Tensor& path, const at::Tensor& status) {
  const char* op = kTreeOp;
  const int64_t R = verify_num_requests(cu_num_nodes);
  check_int_rows(op, "tokens", tokens, R, max_depth + 1, target_logits);
  check_int_rows(op, "path", path, R, max_depth + 1, target_logits);
  check_output(op, "accepted", accepted, R, at::kInt, target_logits);
  check_output(op, "emitted", emitted, R, at::kInt, target_logits);
  check_output(op, "status", status, R, at::kInt, target_logits);
}

// verify_tree.out's outputs and workspace share no memory with an input or each other (checks.h).
inline void check_tree_apart(const at::Tensor& target_logits, const at::Tensor& node_tokens, const at::Tensor& parents,
                             const at::Tensor& cu_num_nodes, const c10::optional<at::Tensor>& draft_probs,
                             const c10::optional<at::Tensor>& draft_logits, const at::Tensor& draft_temperature,
                             const c10::optional<at::Tensor>& sibling_mode, const at::Tensor& temperature,
                             const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                             const at::Tensor& seed, const at::Tensor& position, const at::Tensor& tokens,
                             const at::Tensor& accepted, const at::Tensor& emitted, const at::Tensor& path,
                             const at::Tensor& status, const c10::optional<at::Tensor>& workspace) {
  check_apart(kTreeOp,
              {named("tokens", tokens), named("accepted", accepted), named("emitted", emitted), named("path", path),
               named("status", status), named("workspace", workspace)},
              {named("target_logits", target_logits), named("node_tokens", node_tokens), named("parents", parents),
               named("cu_num_nodes", cu_num_nodes), named("draft_probs", draft_probs),
               named("draft_logits", draft_logits), named("draft_temperature", draft_temperature),
               named("sibling_mode", sibling_mode), named("temperature", temperature), named("top_k", top_k),
               named("top_p", top_p), named("seed", seed), named("position", position)});
}

// Whether a caller's workspace has room for the CUDA row pass over `rows`
// target rows: workspace_size counts qv always, so compare with that, not
// with the layout a call without draft distributions would carve.
inline bool tree_workspace_fits_row_pass(const c10::optional<at::Tensor>& workspace, int64_t R, int64_t V,
                                         int64_t rows) {
  return !workspace.has_value() ||
         workspace->nbytes() >= static_cast<size_t>(tree_workspace(nullptr, R, V, true, rows).bytes);
}

// The bytes verify_tree.out requires of a caller's workspace (R >= 1
// requests), the row pass over `pass_rows` rows included (0: none).
inline int64_t tree_workspace_need(int64_t R, int64_t V, bool with_q, int64_t pass_rows) {
  return tree_workspace(nullptr, R, V, with_q, pass_rows).bytes;
}

// The CPU binding's check of a given workspace, the CUDA binding's outcome
// whatever the GPU, DSPARK_TREE_ROW_PASS and rows: that binding carves the
// row pass only from a workspace that fits it (above), which then also holds
// tree_workspace_need(..., rows) (the layouts only add regions); any smaller
// one runs without the pass and must hold tree_workspace_need(..., 0), the
// count a refusal names on both.
inline void check_tree_workspace(const c10::optional<at::Tensor>& workspace, int64_t R, int64_t V, bool with_q,
                                 const at::Tensor& target_logits) {
  check_given_workspace(kTreeOp, workspace, tree_workspace_need(R, V, with_q, 0), target_logits);
}

template <typename T, typename D>
TreeArgs<T, D> make_tree_args(const at::Tensor& target_logits, const at::Tensor& node_tokens, const at::Tensor& parents,
                              const at::Tensor& cu_num_nodes, int64_t max_depth,
                              const c10::optional<at::Tensor>& draft_probs,
                              const c10::optional<at::Tensor>& draft_logits, const at::Tensor& draft_temperature,
                              const c10::optional<at::Tensor>& sibling_mode, const at::Tensor& temperature,
                              const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                              const at::Tensor& seed, const at::Tensor& position, at::Tensor& tokens,
                              at::Tensor& accepted, at::Tensor& emitted, at::Tensor& path, at::Tensor& status) {
  TreeArgs<T, D> a;
  a.v = make_verify_args<T, D>(target_logits, node_tokens, cu_num_nodes, max_depth, draft_probs, draft_logits,
                               draft_temperature, temperature, top_k, top_p, seed, position, c10::nullopt,
                               c10::nullopt, tokens, accepted, emitted, status);
  a.v.tree_rows = 1;
  a.parents = parents.const_data_ptr<int32_t>();
  a.sibling_mode = per_request<int8_t>(sibling_mode, -1);
  a.path = path.data_ptr<int32_t>();
  return a;
}

using TreeOutFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                           const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const at::Tensor&,
                           const c10::optional<at::Tensor>&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                           at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, const c10::optional<at::Tensor>&);

template <TreeOutFn kOut>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tree_functional(
    const at::Tensor& target_logits, const at::Tensor& node_tokens, const at::Tensor& parents,
    const at::Tensor& cu_num_nodes, int64_t max_depth, const c10::optional<at::Tensor>& draft_probs,
    const c10::optional<at::Tensor>& draft_logits, const at::Tensor& draft_temperature,
    const c10::optional<at::Tensor>& sibling_mode, const at::Tensor& temperature,
    const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p, const at::Tensor& seed,
    const at::Tensor& position) {
  check_tree_args(target_logits, node_tokens, parents, cu_num_nodes, max_depth, draft_probs, draft_logits,
                  draft_temperature, sibling_mode, temperature, top_k, top_p, seed, position);
  const int64_t R = verify_num_requests(cu_num_nodes);
  const auto opts = target_logits.options().dtype(at::kInt);
  at::Tensor tokens = at::empty({R, max_depth + 1}, opts), path = at::empty({R, max_depth + 1}, opts);
  at::Tensor accepted = at::empty({R}, opts), emitted = at::empty({R}, opts), status = at::empty({R}, opts);
  kOut(target_logits, node_tokens, parents, cu_num_nodes, max_depth, draft_probs, draft_logits, draft_temperature,
       sibling_mode, temperature, top_k, top_p, seed, position, tokens, accepted, emitted, path, status, c10::nullopt);
  return {tokens, accepted, emitted, path, status};
}

}  // namespace dspark
