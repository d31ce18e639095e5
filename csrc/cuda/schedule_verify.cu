// CUDA binding of `schedule_verify`.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "../kernels/schedule_verify.cuh"
#include "../schedule_common.h"
#include "workspace.h"

namespace dspark {
namespace {

void schedule_verify_out_cuda(const at::Tensor& confidence, const at::Tensor& num_draft, const at::Tensor& sps_table,
                              c10::string_view mode, double threshold, const c10::optional<at::Tensor>& budget,
                              const c10::optional<at::Tensor>& temperatures, at::Tensor& verify_len,
                              const c10::optional<at::Tensor>& workspace) {
  check_schedule_args(confidence, num_draft, sps_table, std::string(mode), budget, temperatures);
  check_output(kScheduleOp, "verify_len", verify_len, confidence.size(0), at::kInt, confidence);
  check_schedule_apart(confidence, num_draft, sps_table, budget, temperatures, verify_len, workspace);
  if (confidence.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(confidence.device());
  const int64_t slots = schedule_slots(confidence.size(0), confidence.size(1));
  const ScheduleArgs a = make_schedule_args(confidence, num_draft, sps_table, std::string(mode), threshold, budget,
                                            temperatures, verify_len);
  // A caller's workspace is checked whatever the path; without one, scratch only where the kernel reads it.
  at::Tensor scratch;
  void* ws = workspace.has_value() || schedule_uses_workspace(a.mode, slots)
                 ? workspace_ptr(kScheduleOp, workspace, schedule_workspace_need(confidence), confidence, scratch)
                 : nullptr;
  const cudaError_t err = schedule_verify_launch(a, ws, slots, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kScheduleOp, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CUDA, m) {
  m.impl("schedule_verify", &dspark::schedule_functional<&dspark::schedule_verify_out_cuda>);
  m.impl("schedule_verify.out", &dspark::schedule_verify_out_cuda);
}
