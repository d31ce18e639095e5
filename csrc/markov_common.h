// The `markov_draft` op's host-side half shared by the CPU and CUDA
// bindings: argument checks, MarkovArgs from tensors, the functional form.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "checks.h"
#include "core/markov.h"
#include "core/markov_workspace.h"
#include "sample_common.h"

namespace dspark {

constexpr const char* kMarkovOp = "dspark_ops.markov_draft";

inline void check_markov_args(const at::Tensor& base, const at::Tensor& anchor, const at::Tensor& w1,
                              const at::Tensor& w2, const at::Tensor& temperature,
                              const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                              const at::Tensor& seed, const at::Tensor& position,
                              const c10::optional<at::Tensor>& num_draft) {
  const char* op = kMarkovOp;
  const auto st = base.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                    ": base_logits must have dtype float32, float16 or bfloat16, got ", dtype_str(st));
  TORCH_CHECK_VALUE(base.dim() == 3, op, ": base_logits must have shape [R, G, V], got ", shape_str(base));
  const int64_t R = base.size(0), G = base.size(1), V = base.size(2);
  TORCH_CHECK_VALUE(V >= 1 && V <= kMaxVocab, op, ": base_logits must have 1 <= V <= ", kMaxVocab, ", got V = ", V);
  TORCH_CHECK_VALUE(G <= kMaxSlot, op, ": base_logits must have G <= ", kMaxSlot, " (the slot of step G), got ", G);
  TORCH_CHECK_VALUE(V == 1 || base.stride(2) == 1, op,
                    ": base_logits must be contiguous in its last dimension, got strides ", base.strides());
  check_same_device(op, "anchor", anchor, base);
  check_dtype(op, "anchor", anchor, at::kLong);
  TORCH_CHECK_VALUE(anchor.dim() == 1 && anchor.size(0) == R && anchor.is_contiguous(), op,
                    ": anchor must be a contiguous [", R, "], got ", shape_str(anchor));
  for (const auto* w : {&w1, &w2}) {
    const char* name = w == &w1 ? "w1" : "w2";
    check_same_device(op, name, *w, base);
    const auto wt = w->scalar_type();
    TORCH_CHECK_VALUE(wt == at::kFloat || wt == at::kHalf || wt == at::kBFloat16, op, ": ", name,
                      " must have dtype float32, float16 or bfloat16, got ", dtype_str(wt));
  }
  TORCH_CHECK_VALUE(w1.dim() == 2 && w2.dim() == 2 && w1.size(0) == V && w2.size(1) == V && w1.size(1) == w2.size(0),
                    op, ": w1 must be [V, r] and w2 [r, V] with V = ", V, ", got ", shape_str(w1), " and ",
                    shape_str(w2));
  check_sampling_params(op, R, temperature, top_k, top_p, seed, position, base);
  if (num_draft.has_value()) check_output(op, "num_draft", *num_draft, R, at::kInt, base);
}

inline void check_markov_outputs(const at::Tensor& base, const at::Tensor& tokens, const at::Tensor& draft_logits,
                                 const at::Tensor& status) {
  const char* op = kMarkovOp;
  const int64_t R = base.size(0), G = base.size(1), V = base.size(2);
  check_int_rows(op, "tokens", tokens, R, G, base);
  check_same_device(op, "draft_logits", draft_logits, base);
  check_dtype(op, "draft_logits", draft_logits, base.scalar_type());
  TORCH_CHECK_VALUE(draft_logits.dim() == 3 && draft_logits.size(0) == R && draft_logits.size(1) == G &&
                        draft_logits.size(2) == V && draft_logits.is_contiguous(),
                    op, ": draft_logits must be a contiguous [", R, ", ", G, ", ", V, "] like base_logits, got ",
                    shape_str(draft_logits));
  check_output(op, "status", status, R, at::kInt, base);
}

// markov_draft.out's outputs share no memory with an input or each other (checks.h).
inline void check_markov_apart(const at::Tensor& base, const at::Tensor& anchor, const at::Tensor& w1,
                               const at::Tensor& w2, const at::Tensor& temperature,
                               const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                               const at::Tensor& seed, const at::Tensor& position,
                               const c10::optional<at::Tensor>& num_draft, const at::Tensor& tokens,
                               const at::Tensor& draft_logits, const at::Tensor& status,
                               const c10::optional<at::Tensor>& workspace) {
  check_apart(kMarkovOp,
              {named("tokens", tokens), named("draft_logits", draft_logits), named("status", status),
               named("workspace", workspace)},
              {named("base_logits", base), named("anchor", anchor), named("w1", w1), named("w2", w2),
               named("temperature", temperature), named("top_k", top_k), named("top_p", top_p), named("seed", seed),
               named("position", position), named("num_draft", num_draft)});
}

// The bytes markov_draft.out requires of a caller's workspace (R >= 1
// requests): the CUDA binding's scratch, checked by the CPU binding too.
inline int64_t markov_workspace_need(const at::Tensor& base, const at::Tensor& w1) {
  return markov_workspace(nullptr, base.size(0), base.size(2), w1.size(1)).bytes;
}

template <typename Storage>
MarkovArgs<Storage> make_markov_args(const at::Tensor& base, const at::Tensor& anchor, const at::Tensor& temperature,
                                     const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                                     const at::Tensor& seed, const at::Tensor& position,
                                     const c10::optional<at::Tensor>& num_draft, at::Tensor& tokens,
                                     at::Tensor& draft_logits, at::Tensor& status) {
  MarkovArgs<Storage> a;
  a.base = static_cast<const Storage*>(base.const_data_ptr());
  a.base_stride_r = base.stride(0);
  a.base_stride_g = base.stride(1);
  a.draft_logits = static_cast<Storage*>(draft_logits.data_ptr());
  a.tokens = tokens.data_ptr<int32_t>();
  a.status = status.data_ptr<int32_t>();
  a.anchor = anchor.const_data_ptr<int64_t>();
  a.num_draft = num_draft.has_value() ? num_draft->const_data_ptr<int32_t>() : nullptr;
  a.num_requests = static_cast<int32_t>(base.size(0));
  a.group = static_cast<int32_t>(base.size(1));
  a.vocab = static_cast<int32_t>(base.size(2));
  a.temperature = per_request<float>(temperature, 1.0f);
  a.top_k = per_request<int32_t>(top_k, 0);
  a.top_p = per_request<float>(top_p, 1.0f);
  a.seed = per_request<int64_t>(seed, 0);
  a.position = per_request<int64_t>(position, 0);
  return a;
}

using MarkovOutFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                             const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, at::Tensor&,
                             at::Tensor&, at::Tensor&, const c10::optional<at::Tensor>&);

template <MarkovOutFn kOut>
std::tuple<at::Tensor, at::Tensor, at::Tensor> markov_functional(
    const at::Tensor& base, const at::Tensor& anchor, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& temperature, const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
    const at::Tensor& seed, const at::Tensor& position, const c10::optional<at::Tensor>& num_draft) {
  check_markov_args(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft);
  const int64_t R = base.size(0), G = base.size(1), V = base.size(2);
  at::Tensor tokens = at::empty({R, G}, base.options().dtype(at::kInt));
  at::Tensor draft_logits = at::empty({R, G, V}, base.options());
  at::Tensor status = at::empty({R}, base.options().dtype(at::kInt));
  kOut(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft, tokens, draft_logits, status,
       c10::nullopt);
  return {tokens, draft_logits, status};
}

}  // namespace dspark
