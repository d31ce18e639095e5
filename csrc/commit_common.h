// The `commit_tokens` op's host-side half shared by the CPU and CUDA bindings.
#pragma once
#include <ATen/core/Tensor.h>

#include "checks.h"
#include "core/commit.h"

namespace dspark {

constexpr const char* kCommitOp = "dspark_ops.commit_tokens";

inline void check_commit_args(const at::Tensor& out_tokens, const at::Tensor& out_len, const at::Tensor& position,
                              const at::Tensor& max_len, const at::Tensor& finished, const at::Tensor& last_token,
                              const at::Tensor& error, const at::Tensor& tokens, const at::Tensor& emitted,
                              const at::Tensor& status, const c10::optional<at::Tensor>& stop_tokens) {
  const char* op = kCommitOp;
  check_dtype(op, "out_tokens", out_tokens, at::kInt);
  TORCH_CHECK_VALUE(out_tokens.dim() == 2 && out_tokens.is_contiguous(), op,
                    ": out_tokens must be a contiguous [R, max_total] tensor, got ", shape_str(out_tokens));
  const int64_t R = out_tokens.size(0);
  check_output(op, "out_len", out_len, R, at::kInt, out_tokens);
  check_output(op, "position", position, R, at::kLong, out_tokens);
  check_output(op, "max_len", max_len, R, at::kInt, out_tokens);
  check_output(op, "finished", finished, R, at::kBool, out_tokens);
  check_output(op, "last_token", last_token, R, at::kInt, out_tokens);
  check_output(op, "error", error, R, at::kInt, out_tokens);
  check_same_device(op, "tokens", tokens, out_tokens);
  check_dtype(op, "tokens", tokens, at::kInt);
  TORCH_CHECK_VALUE(tokens.dim() == 2 && tokens.size(0) == R && tokens.is_contiguous(), op,
                    ": tokens must be a contiguous [", R, ", W] tensor, got ", shape_str(tokens));
  check_output(op, "emitted", emitted, R, at::kInt, out_tokens);
  check_output(op, "status", status, R, at::kInt, out_tokens);
  if (stop_tokens.has_value()) {
    check_same_device(op, "stop_tokens", *stop_tokens, out_tokens);
    check_dtype(op, "stop_tokens", *stop_tokens, at::kInt);
    TORCH_CHECK_VALUE(stop_tokens->dim() == 1 && stop_tokens->is_contiguous(), op,
                      ": stop_tokens must be a contiguous [S] tensor, got ", shape_str(*stop_tokens));
  }
  check_apart(op,
              {named("out_tokens", out_tokens), named("out_len", out_len), named("position", position),
               named("finished", finished), named("last_token", last_token), named("error", error)},
              {named("max_len", max_len), named("tokens", tokens), named("emitted", emitted), named("status", status),
               named("stop_tokens", stop_tokens)});
}

inline CommitArgs make_commit_args(const at::Tensor& out_tokens, const at::Tensor& out_len, const at::Tensor& position,
                                   const at::Tensor& max_len, const at::Tensor& finished, const at::Tensor& last_token,
                                   const at::Tensor& error, const at::Tensor& tokens, const at::Tensor& emitted,
                                   const at::Tensor& status, const c10::optional<at::Tensor>& stop_tokens) {
  CommitArgs a{};
  a.out_tokens = static_cast<int32_t*>(out_tokens.data_ptr());
  a.max_total = out_tokens.size(1);
  a.out_len = static_cast<int32_t*>(out_len.data_ptr());
  a.position = static_cast<int64_t*>(position.data_ptr());
  a.max_len = max_len.const_data_ptr<int32_t>();
  a.finished = static_cast<bool*>(finished.data_ptr());
  a.last_token = static_cast<int32_t*>(last_token.data_ptr());
  a.error = static_cast<int32_t*>(error.data_ptr());
  a.tokens = tokens.const_data_ptr<int32_t>();
  a.width = tokens.size(1);
  a.emitted = emitted.const_data_ptr<int32_t>();
  a.status = status.const_data_ptr<int32_t>();
  a.stop_tokens = stop_tokens.has_value() ? stop_tokens->const_data_ptr<int32_t>() : nullptr;
  a.num_stop = stop_tokens.has_value() ? static_cast<int32_t>(stop_tokens->size(0)) : 0;
  a.num_requests = static_cast<int32_t>(out_tokens.size(0));
  return a;
}

}  // namespace dspark
