// Scratch for a CUDA op: the caller's workspace (checked) or, without one, a
// fresh allocation from torch's caching allocator kept alive by `scratch`.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "../checks.h"

namespace dspark {

inline void* workspace_ptr(const char* op, const c10::optional<at::Tensor>& workspace, int64_t need,
                           const at::Tensor& ref, at::Tensor& scratch) {
  if (workspace.has_value()) {
    check_workspace(op, *workspace, need, ref);
    return workspace->data_ptr();
  }
  scratch = at::empty({need}, ref.options().dtype(at::kByte));
  return scratch.data_ptr();
}

}  // namespace dspark
