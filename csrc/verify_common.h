// The `verify_chunk` op's host-side half shared by the CPU and CUDA bindings:
// argument checks, SampleArgs-style translation into VerifyArgs, and the
// functional form over a backend's `.out` kernel.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "checks.h"
#include "core/verify_args.h"
#include "sample_common.h"

namespace dspark {

constexpr const char* kVerifyOp = "dspark_ops.verify_chunk";

inline int64_t verify_num_requests(const at::Tensor& cu) { return cu.size(0) - 1; }

// A 1-D int32 tensor of `want` elements (or any length when want < 0).
// want < 0: any length; `like` names the tensor the length comes from.
inline void check_int_vector(const char* op, const char* name, const at::Tensor& t, int64_t want,
                             const at::Tensor& ref, const char* like = nullptr) {
  check_same_device(op, name, t, ref);
  check_dtype(op, name, t, at::kInt);
  TORCH_CHECK_VALUE(t.dim() == 1 && (want < 0 || t.size(0) == want), op, ": ", name, " must have shape [",
                    want < 0 ? std::string("N") : std::to_string(want), "]", like ? " like " : "", like ? like : "",
                    ", got ", shape_str(t));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// The draft distribution rows (verify_chunk, verify_tree): at most one of
// draft_probs / draft_logits, [rows, V] like the target, its dtype or float32.
inline void check_draft_rows(const char* op, const c10::optional<at::Tensor>& draft_probs,
                             const c10::optional<at::Tensor>& draft_logits, const at::Tensor& target_logits) {
  const int64_t V = target_logits.size(1);
  TORCH_CHECK_VALUE(!(draft_probs.has_value() && draft_logits.has_value()), op,
                    ": pass draft_probs or draft_logits, not both");
  const c10::optional<at::Tensor>& draft = draft_probs.has_value() ? draft_probs : draft_logits;
  if (draft.has_value()) {
    const char* name = draft_probs.has_value() ? "draft_probs" : "draft_logits";
    check_logits(op, name, *draft);
    check_same_device(op, name, *draft, target_logits);
    TORCH_CHECK_VALUE(draft->size(1) == V, op, ": ", name, " must have V = ", V, " columns like target_logits, got ",
                      shape_str(*draft));
    TORCH_CHECK_VALUE(draft->scalar_type() == target_logits.scalar_type() || draft->scalar_type() == at::kFloat, op,
                      ": ", name, " must have the dtype of target_logits (", dtype_str(target_logits.scalar_type()),
                      ") or torch.float32, got ", dtype_str(draft->scalar_type()));
  }
}

inline void check_verify_args(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                              const at::Tensor& cu_num_draft, int64_t max_draft,
                              const c10::optional<at::Tensor>& draft_probs,
                              const c10::optional<at::Tensor>& draft_logits, const at::Tensor& draft_temperature,
                              const at::Tensor& temperature, const c10::optional<at::Tensor>& top_k,
                              const c10::optional<at::Tensor>& top_p, const at::Tensor& seed,
                              const at::Tensor& position, const c10::optional<at::Tensor>& draft_row_start,
                              const c10::optional<at::Tensor>& target_row_start) {
  const char* op = kVerifyOp;
  check_logits(op, "target_logits", target_logits);
  check_vocab(op, "target_logits", target_logits.size(1));
  check_int_vector(op, "draft_tokens", draft_tokens, -1, target_logits);
  check_offsets(op, "cu_num_draft", cu_num_draft, target_logits);
  TORCH_CHECK_VALUE(max_draft >= 0 && max_draft < static_cast<int64_t>(kMaxSlot), op,
                    ": max_draft must be in [0, ", kMaxSlot - 1, "], got ", max_draft);
  check_draft_rows(op, draft_probs, draft_logits, target_logits);
  const int64_t R = verify_num_requests(cu_num_draft);
  check_per_request(op, "draft_temperature", draft_temperature, R, at::kFloat, target_logits);
  check_sampling_params(op, R, temperature, top_k, top_p, seed, position, target_logits);
  if (draft_row_start.has_value()) check_int_vector(op, "draft_row_start", *draft_row_start, R, target_logits);
  if (target_row_start.has_value()) check_int_vector(op, "target_row_start", *target_row_start, R, target_logits);
}

inline void check_verify_outputs(const at::Tensor& target_logits, const at::Tensor& cu_num_draft, int64_t max_draft,
                                 const at::Tensor& tokens, const at::Tensor& accepted, const at::Tensor& emitted,
                                 const at::Tensor& status) {
  const char* op = kVerifyOp;
  const int64_t R = verify_num_requests(cu_num_draft);
  check_int_rows(op, "tokens", tokens, R, max_draft + 1, target_logits);
  check_output(op, "accepted", accepted, R, at::kInt, target_logits);
  check_output(op, "emitted", emitted, R, at::kInt, target_logits);
  check_output(op, "status", status, R, at::kInt, target_logits);
}

// verify_chunk.out's outputs and workspace share no memory with an input or each other (checks.h).
inline void check_verify_apart(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                               const at::Tensor& cu_num_draft, const c10::optional<at::Tensor>& draft_probs,
                               const c10::optional<at::Tensor>& draft_logits, const at::Tensor& draft_temperature,
                               const at::Tensor& temperature, const c10::optional<at::Tensor>& top_k,
                               const c10::optional<at::Tensor>& top_p, const at::Tensor& seed,
                               const at::Tensor& position, const c10::optional<at::Tensor>& draft_row_start,
                               const c10::optional<at::Tensor>& target_row_start, const at::Tensor& tokens,
                               const at::Tensor& accepted, const at::Tensor& emitted, const at::Tensor& status,
                               const c10::optional<at::Tensor>& workspace) {
  check_apart(kVerifyOp,
              {named("tokens", tokens), named("accepted", accepted), named("emitted", emitted),
               named("status", status), named("workspace", workspace)},
              {named("target_logits", target_logits), named("draft_tokens", draft_tokens),
               named("cu_num_draft", cu_num_draft), named("draft_probs", draft_probs),
               named("draft_logits", draft_logits), named("draft_temperature", draft_temperature),
               named("temperature", temperature), named("top_k", top_k), named("top_p", top_p), named("seed", seed),
               named("position", position), named("draft_row_start", draft_row_start),
               named("target_row_start", target_row_start)});
}

// The bytes verify_chunk.out requires of a caller's workspace (R >= 1
// requests): the CUDA binding's scratch, checked by the CPU binding too.
inline int64_t verify_workspace_need(const at::Tensor& target_logits, int64_t R, int64_t max_draft) {
  return verify_workspace(nullptr, R, max_draft, target_logits.size(1)).bytes;
}

template <typename T, typename D>
VerifyArgs<T, D> make_verify_args(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                                  const at::Tensor& cu_num_draft, int64_t max_draft,
                                  const c10::optional<at::Tensor>& draft_probs,
                                  const c10::optional<at::Tensor>& draft_logits,
                                  const at::Tensor& draft_temperature, const at::Tensor& temperature,
                                  const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                                  const at::Tensor& seed, const at::Tensor& position,
                                  const c10::optional<at::Tensor>& draft_row_start,
                                  const c10::optional<at::Tensor>& target_row_start, at::Tensor& tokens,
                                  at::Tensor& accepted, at::Tensor& emitted, at::Tensor& status) {
  VerifyArgs<T, D> a;
  a.target = static_cast<const T*>(target_logits.const_data_ptr());
  a.target_stride = target_logits.stride(0);
  a.target_rows = target_logits.size(0);
  a.vocab = static_cast<int32_t>(target_logits.size(1));
  a.draft_tokens = draft_tokens.const_data_ptr<int32_t>();
  a.num_tokens = draft_tokens.size(0);
  const c10::optional<at::Tensor>& draft = draft_probs.has_value() ? draft_probs : draft_logits;
  a.draft = draft.has_value() ? static_cast<const D*>(draft->const_data_ptr()) : nullptr;
  a.draft_stride = draft.has_value() ? draft->stride(0) : 0;
  a.draft_rows = draft.has_value() ? draft->size(0) : 0;
  a.draft_mode = draft_probs.has_value() ? kDraftProbs : draft_logits.has_value() ? kDraftLogits : kDraftPointMass;
  a.cu = cu_num_draft.const_data_ptr<int32_t>();
  a.num_requests = static_cast<int32_t>(verify_num_requests(cu_num_draft));
  a.max_draft = static_cast<int32_t>(max_draft);
  a.draft_row_start = draft_row_start.has_value() ? draft_row_start->const_data_ptr<int32_t>() : nullptr;
  a.target_row_start = target_row_start.has_value() ? target_row_start->const_data_ptr<int32_t>() : nullptr;
  a.draft_temperature = per_request<float>(draft_temperature, 1.0f);
  a.temperature = per_request<float>(temperature, 1.0f);
  a.top_k = per_request<int32_t>(top_k, 0);
  a.top_p = per_request<float>(top_p, 1.0f);
  a.seed = per_request<int64_t>(seed, 0);
  a.position = per_request<int64_t>(position, 0);
  a.tree_rows = 0;
  a.tokens = tokens.data_ptr<int32_t>();
  a.accepted = accepted.data_ptr<int32_t>();
  a.emitted = emitted.data_ptr<int32_t>();
  a.status = status.data_ptr<int32_t>();
  return a;
}

// Calls fn.template operator()<T, D>() with the storage types of the target
// logits and draft rows (D = T when no draft rows are given).
template <typename FloatT, typename HalfT, typename BFloat16T, typename Fn>
void dispatch_verify_types(const at::Tensor& target_logits, const c10::optional<at::Tensor>& draft, Fn&& fn) {
  const bool draft_float = draft.has_value() && draft->scalar_type() == at::kFloat;
  switch (target_logits.scalar_type()) {
    case at::kFloat:
      fn.template operator()<FloatT, FloatT>();
      break;
    case at::kHalf:
      if (draft_float) fn.template operator()<HalfT, FloatT>();
      else fn.template operator()<HalfT, HalfT>();
      break;
    default:
      if (draft_float) fn.template operator()<BFloat16T, FloatT>();
      else fn.template operator()<BFloat16T, BFloat16T>();
  }
}

using VerifyOutFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                             const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const at::Tensor&,
                             const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                             const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                             const c10::optional<at::Tensor>&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                             const c10::optional<at::Tensor>&);

template <VerifyOutFn kOut>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_functional(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& cu_num_draft,
    int64_t max_draft, const c10::optional<at::Tensor>& draft_probs, const c10::optional<at::Tensor>& draft_logits,
    const at::Tensor& draft_temperature, const at::Tensor& temperature, const c10::optional<at::Tensor>& top_k,
    const c10::optional<at::Tensor>& top_p, const at::Tensor& seed, const at::Tensor& position,
    const c10::optional<at::Tensor>& draft_row_start, const c10::optional<at::Tensor>& target_row_start) {
  check_verify_args(target_logits, draft_tokens, cu_num_draft, max_draft, draft_probs, draft_logits, draft_temperature,
                    temperature, top_k, top_p, seed, position, draft_row_start, target_row_start);
  const int64_t R = verify_num_requests(cu_num_draft);
  const auto opts = target_logits.options().dtype(at::kInt);
  at::Tensor tokens = at::empty({R, max_draft + 1}, opts);
  at::Tensor accepted = at::empty({R}, opts), emitted = at::empty({R}, opts), status = at::empty({R}, opts);
  kOut(target_logits, draft_tokens, cu_num_draft, max_draft, draft_probs, draft_logits, draft_temperature, temperature,
       top_k, top_p, seed, position, draft_row_start, target_row_start, tokens, accepted, emitted, status,
       c10::nullopt);
  return {tokens, accepted, emitted, status};
}

}  // namespace dspark
