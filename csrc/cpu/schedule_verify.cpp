// CPU implementation of `schedule_verify` (core/schedule.h): rank, then count (threshold: count alone).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../schedule_common.h"

namespace dspark {
namespace {

void schedule_verify_out_cpu(const at::Tensor& confidence, const at::Tensor& num_draft, const at::Tensor& sps_table,
                             c10::string_view mode, double threshold, const c10::optional<at::Tensor>& budget,
                             const c10::optional<at::Tensor>& temperatures, at::Tensor& verify_len,
                             const c10::optional<at::Tensor>& workspace) {
  check_schedule_args(confidence, num_draft, sps_table, std::string(mode), budget, temperatures);
  check_output(kScheduleOp, "verify_len", verify_len, confidence.size(0), at::kInt, confidence);
  check_schedule_apart(confidence, num_draft, sps_table, budget, temperatures, verify_len, workspace);
  if (confidence.size(0) > 0)  // the CUDA binding returns before its check when R = 0
    check_given_workspace(kScheduleOp, workspace, schedule_workspace_need(confidence), confidence);
  const ScheduleArgs a = make_schedule_args(confidence, num_draft, sps_table, std::string(mode), threshold, budget,
                                            temperatures, verify_len);
  if (a.mode == kThreshold) {  // no ranking needed (core/schedule.h)
    for (int64_t r = 0; r < a.num_requests; ++r) a.verify_len[r] = schedule_threshold_len(a, r);
    return;
  }
  std::vector<std::pair<double, int32_t>> ranked;  // (survival, r * G + j)
  for (int64_t r = 0; r < a.num_requests; ++r) {
    double s = 1.0;
    for (int64_t j = 0; j < schedule_num_draft(a, r); ++j) {
      s *= schedule_confidence(a, r, j);
      ranked.emplace_back(s, static_cast<int32_t>(r * a.group + j));
    }
  }
  std::sort(ranked.begin(), ranked.end(),
            [](const auto& x, const auto& y) { return schedule_before(x.first, x.second, y.first, y.second); });
  std::vector<double> keys(ranked.size());
  for (size_t i = 0; i < ranked.size(); ++i) keys[i] = ranked[i].first;
  const int64_t admit = schedule_admit_count(a, keys.data(), static_cast<int64_t>(keys.size()),
                                             [&](int64_t i) { return schedule_sps_admitted(a, i); });
  std::fill(a.verify_len, a.verify_len + a.num_requests, 0);
  for (int64_t i = 0; i < admit; ++i) ++a.verify_len[ranked[i].second / a.group];
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CPU, m) {
  m.impl("schedule_verify", &dspark::schedule_functional<&dspark::schedule_verify_out_cpu>);
  m.impl("schedule_verify.out", &dspark::schedule_verify_out_cpu);
}
