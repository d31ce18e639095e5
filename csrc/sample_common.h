// The `sample` op's host-side half shared by the CPU and CUDA bindings: the
// argument checks and the translation of tensors into SampleArgs.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "checks.h"
#include "core/sample_args.h"

namespace dspark {

constexpr const char* kSampleOp = "dspark_ops.sample";

// R: row_start's length when given, else the number of logits rows.
inline int64_t sample_num_requests(const at::Tensor& logits, const c10::optional<at::Tensor>& row_start) {
  return row_start.has_value() ? row_start->size(0) : logits.size(0);
}

inline void check_sample_args(const at::Tensor& logits, const at::Tensor& temperature,
                              const c10::optional<at::Tensor>& top_k,
                              const c10::optional<at::Tensor>& top_p, const at::Tensor& seed,
                              const at::Tensor& position, int64_t purpose, const at::Tensor& slot,
                              const c10::optional<at::Tensor>& row_start) {
  const char* op = kSampleOp;
  check_logits(op, "logits", logits);
  check_vocab(op, "logits", logits.size(1));
  if (row_start.has_value()) {
    check_same_device(op, "row_start", *row_start, logits);
    check_dtype(op, "row_start", *row_start, at::kInt);
    TORCH_CHECK_VALUE(row_start->dim() == 1 && row_start->is_contiguous(), op,
                      ": row_start must be a contiguous 1-D tensor [R], got ", shape_str(*row_start));
  }
  const int64_t R = sample_num_requests(logits, row_start);
  check_sampling_params(op, R, temperature, top_k, top_p, seed, position, logits);
  check_per_request(op, "slot", slot, R, at::kInt, logits);
  TORCH_CHECK_VALUE(purpose >= kPurposeCoin && purpose <= kPurposeDraft, op,
                    ": purpose must be 1 (COIN), 2 (EMIT) or 3 (DRAFT), got ", purpose);
}

// sample.out's outputs and workspace share no memory with an input or each other (checks.h).
inline void check_sample_apart(const at::Tensor& logits, const at::Tensor& temperature,
                               const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                               const at::Tensor& seed, const at::Tensor& position, const at::Tensor& slot,
                               const c10::optional<at::Tensor>& row_start, const at::Tensor& tokens,
                               const at::Tensor& status, const c10::optional<at::Tensor>& workspace) {
  check_apart(kSampleOp, {named("tokens", tokens), named("status", status), named("workspace", workspace)},
              {named("logits", logits), named("temperature", temperature), named("top_k", top_k),
               named("top_p", top_p), named("seed", seed), named("position", position), named("slot", slot),
               named("row_start", row_start)});
}

// The bytes sample.out requires of a caller's workspace (R >= 1 requests):
// the CUDA binding's scratch, checked by the CPU binding too.
inline int64_t sample_workspace_need(const at::Tensor& logits, int64_t R) {
  return sample_workspace_bytes(R, logits.size(1));
}

template <typename T>
PerRequest<T> per_request(const c10::optional<at::Tensor>& t, T fallback) {
  if (!t.has_value()) return PerRequest<T>{nullptr, 0, fallback};
  return PerRequest<T>{static_cast<const T*>(t->const_data_ptr()), per_request_stride(*t), fallback};
}

// `Storage` is the element type the backend computes with (c10::Half on the
// CPU, __half in CUDA): same bits, different class.
template <typename Storage>
SampleArgs<Storage> make_sample_args(const at::Tensor& logits, const at::Tensor& temperature,
                                     const c10::optional<at::Tensor>& top_k,
                                     const c10::optional<at::Tensor>& top_p,
                                     const at::Tensor& seed, const at::Tensor& position,
                                     int64_t purpose, const at::Tensor& slot,
                                     const c10::optional<at::Tensor>& row_start,
                                     at::Tensor& tokens, at::Tensor& status) {
  SampleArgs<Storage> a;
  a.logits = static_cast<const Storage*>(logits.const_data_ptr());
  a.row_stride = logits.stride(0);
  a.num_rows = logits.size(0);
  a.vocab = static_cast<int32_t>(logits.size(1));
  a.num_requests = static_cast<int32_t>(sample_num_requests(logits, row_start));
  a.row_start = row_start.has_value() ? row_start->const_data_ptr<int32_t>() : nullptr;
  a.temperature = per_request<float>(temperature, 1.0f);
  a.top_k = per_request<int32_t>(top_k, 0);     // absent: top-k off
  a.top_p = per_request<float>(top_p, 1.0f);    // absent: top-p off
  a.seed = per_request<int64_t>(seed, 0);
  a.position = per_request<int64_t>(position, 0);
  a.slot = per_request<int32_t>(slot, 0);
  a.purpose = static_cast<uint32_t>(purpose);
  a.tokens = tokens.data_ptr<int32_t>();
  a.status = status.data_ptr<int32_t>();
  return a;
}

// keep_key(logits [R, V], temperature, top_k, top_p) -> keys [R] int32 (the
// uint32 bits): sample's checks with seed/position/slot absent.
inline at::Tensor keep_key_output(const at::Tensor& logits, const at::Tensor& temperature,
                                  const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p) {
  check_logits("dspark_ops.keep_key", "logits", logits);
  check_vocab("dspark_ops.keep_key", "logits", logits.size(1));
  const int64_t R = logits.size(0);
  check_per_request("dspark_ops.keep_key", "temperature", temperature, R, at::kFloat, logits);
  if (top_k.has_value()) check_per_request("dspark_ops.keep_key", "top_k", *top_k, R, at::kInt, logits);
  if (top_p.has_value()) check_per_request("dspark_ops.keep_key", "top_p", *top_p, R, at::kFloat, logits);
  return at::empty({R}, logits.options().dtype(at::kInt));
}

template <typename Storage>
SampleArgs<Storage> make_keep_key_args(const at::Tensor& logits, const at::Tensor& temperature,
                                       const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p) {
  SampleArgs<Storage> a{};
  a.logits = static_cast<const Storage*>(logits.const_data_ptr());
  a.row_stride = logits.stride(0);
  a.num_rows = logits.size(0);
  a.vocab = static_cast<int32_t>(logits.size(1));
  a.num_requests = static_cast<int32_t>(logits.size(0));
  a.row_start = nullptr;
  a.temperature = per_request<float>(temperature, 1.0f);
  a.top_k = per_request<int32_t>(top_k, 0);
  a.top_p = per_request<float>(top_p, 1.0f);
  a.seed = PerRequest<int64_t>{nullptr, 0, 0};
  a.position = PerRequest<int64_t>{nullptr, 0, 0};
  a.slot = PerRequest<int32_t>{nullptr, 0, 0};
  a.purpose = kPurposeDraft;
  return a;
}

// The functional form of `sample` over a backend's `.out` kernel.
using SampleOutFn = void (*)(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                             const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t,
                             const at::Tensor&, const c10::optional<at::Tensor>&, at::Tensor&, at::Tensor&,
                             const c10::optional<at::Tensor>&);

template <SampleOutFn kOut>
std::tuple<at::Tensor, at::Tensor> sample_functional(const at::Tensor& logits, const at::Tensor& temperature,
                                                     const c10::optional<at::Tensor>& top_k,
                                                     const c10::optional<at::Tensor>& top_p,
                                                     const at::Tensor& seed, const at::Tensor& position,
                                                     int64_t purpose, const at::Tensor& slot,
                                                     const c10::optional<at::Tensor>& row_start) {
  check_sample_args(logits, temperature, top_k, top_p, seed, position, purpose, slot, row_start);
  const int64_t R = sample_num_requests(logits, row_start);
  at::Tensor tokens = at::empty({R}, logits.options().dtype(at::kInt));
  at::Tensor status = at::empty({R}, logits.options().dtype(at::kInt));
  kOut(logits, temperature, top_k, top_p, seed, position, purpose, slot, row_start, tokens, status, c10::nullopt);
  return {tokens, status};
}

}  // namespace dspark
