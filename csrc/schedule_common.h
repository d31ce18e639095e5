// The `schedule_verify` op's host-side half shared by the CPU and CUDA bindings.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <string>

#include "checks.h"
#include "core/schedule.h"

namespace dspark {

constexpr const char* kScheduleOp = "dspark_ops.schedule_verify";

inline int32_t schedule_mode(const std::string& mode) {
  if (mode == "early_stop") return kEarlyStop;
  if (mode == "threshold") return kThreshold;
  if (mode == "budget") return kBudget;
  if (mode == "global") return kGlobal;
  TORCH_CHECK_VALUE(false, kScheduleOp, ": mode must be early_stop, threshold, budget or global, got '", mode, "'");
}

inline void check_schedule_args(const at::Tensor& confidence, const at::Tensor& num_draft, const at::Tensor& sps_table,
                                const std::string& mode, const c10::optional<at::Tensor>& budget,
                                const c10::optional<at::Tensor>& temperatures) {
  const char* op = kScheduleOp;
  schedule_mode(mode);
  check_dtype(op, "confidence", confidence, at::kFloat);
  TORCH_CHECK_VALUE(confidence.dim() == 2 && confidence.is_contiguous(), op,
                    ": confidence must be a contiguous [R, G] tensor, got ", shape_str(confidence));
  const int64_t R = confidence.size(0), G = confidence.size(1);
  TORCH_CHECK_VALUE(R * G <= (int64_t{1} << 20), op, ": R * G must be at most 2^20, got ", R, " * ", G);
  check_output(op, "num_draft", num_draft, R, at::kInt, confidence);
  check_same_device(op, "sps_table", sps_table, confidence);
  check_dtype(op, "sps_table", sps_table, at::kDouble);
  TORCH_CHECK_VALUE(sps_table.dim() == 1 && sps_table.size(0) >= 1 && sps_table.is_contiguous(), op,
                    ": sps_table must be a contiguous [B_max + 1] tensor, got ", shape_str(sps_table));
  if (budget.has_value()) {
    check_same_device(op, "budget", *budget, confidence);
    check_dtype(op, "budget", *budget, at::kLong);
    TORCH_CHECK_VALUE(budget->numel() == 1, op, ": budget must have one element, got ", shape_str(*budget));
  }
  if (temperatures.has_value()) check_output(op, "temperatures", *temperatures, G, at::kFloat, confidence);
}

// schedule_verify.out's output and workspace share no memory with an input or each other (checks.h).
inline void check_schedule_apart(const at::Tensor& confidence, const at::Tensor& num_draft, const at::Tensor& sps_table,
                                 const c10::optional<at::Tensor>& budget,
                                 const c10::optional<at::Tensor>& temperatures, const at::Tensor& verify_len,
                                 const c10::optional<at::Tensor>& workspace) {
  check_apart(kScheduleOp, {named("verify_len", verify_len), named("workspace", workspace)},
              {named("confidence", confidence), named("num_draft", num_draft), named("sps_table", sps_table),
               named("budget", budget), named("temperatures", temperatures)});
}

inline ScheduleArgs make_schedule_args(const at::Tensor& confidence, const at::Tensor& num_draft,
                                       const at::Tensor& sps_table, const std::string& mode, double threshold,
                                       const c10::optional<at::Tensor>& budget,
                                       const c10::optional<at::Tensor>& temperatures, at::Tensor& verify_len) {
  ScheduleArgs a{};
  a.confidence = confidence.const_data_ptr<float>();
  a.num_requests = static_cast<int32_t>(confidence.size(0));
  a.group = static_cast<int32_t>(confidence.size(1));
  a.num_draft = num_draft.const_data_ptr<int32_t>();
  a.sps = sps_table.const_data_ptr<double>();
  a.sps_len = sps_table.size(0);
  a.temperatures = temperatures.has_value() ? temperatures->const_data_ptr<float>() : nullptr;
  a.mode = schedule_mode(mode);
  a.threshold = threshold;
  a.budget = budget.has_value() ? budget->const_data_ptr<int64_t>() : nullptr;
  a.verify_len = verify_len.data_ptr<int32_t>();
  return a;
}

// Workspace of the CUDA kernel: the ranked list (keys, ids) padded to a power of two.
inline int64_t schedule_slots(int64_t R, int64_t G) {
  int64_t p = 1;
  while (p < R * G) p <<= 1;
  return p;
}

inline int64_t schedule_workspace_bytes(int64_t R, int64_t G) { return schedule_slots(R, G) * 12; }

// The bytes schedule_verify.out requires of a caller's workspace (R >= 1
// requests): the CUDA binding's scratch, checked by the CPU binding too.
inline int64_t schedule_workspace_need(const at::Tensor& confidence) {
  return schedule_workspace_bytes(confidence.size(0), confidence.size(1));
}

using ScheduleOutFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, double,
                               const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, at::Tensor&,
                               const c10::optional<at::Tensor>&);

template <ScheduleOutFn kOut>
at::Tensor schedule_functional(const at::Tensor& confidence, const at::Tensor& num_draft, const at::Tensor& sps_table,
                               c10::string_view mode, double threshold, const c10::optional<at::Tensor>& budget,
                               const c10::optional<at::Tensor>& temperatures) {
  check_schedule_args(confidence, num_draft, sps_table, std::string(mode), budget, temperatures);
  at::Tensor verify_len = at::empty({confidence.size(0)}, confidence.options().dtype(at::kInt));
  kOut(confidence, num_draft, sps_table, mode, threshold, budget, temperatures, verify_len, c10::nullopt);
  return verify_len;
}

}  // namespace dspark
