// CPU op `packed_linear` (cpu/packed_gemm.h): residual + input @ W^T for the
// few rows of a decode or verify pass, W packed by dspark_ops.pack_linear_weight.
// CPU only: on a GPU the built-in model uses cuBLAS.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "packed_gemm.h"

namespace dspark {
namespace {

constexpr const char* kOp = "dspark_ops.packed_linear";

void check_cpu_float(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, ": ", name, " must be on the CPU (the op has no GPU kernel), got ",
                    t.device());
  check_dtype(kOp, name, t, at::kFloat);
}

at::Tensor packed_linear_cpu(const at::Tensor& input, const at::Tensor& packed_weight, int64_t out_features,
                             const c10::optional<at::Tensor>& residual) {
  check_cpu_float("input", input);
  check_cpu_float("packed_weight", packed_weight);
  TORCH_CHECK_VALUE(input.dim() == 2, kOp, ": input must have shape [rows, in_features], got ", shape_str(input));
  TORCH_CHECK_VALUE(out_features >= 1, kOp, ": out_features must be >= 1, got ", out_features);
  const int64_t M = input.size(0), K = input.size(1), N = out_features;
  const int64_t G = (N + kPackWidth - 1) / kPackWidth;
  TORCH_CHECK_VALUE(packed_weight.dim() == 3 && packed_weight.size(0) == G && packed_weight.size(1) == K &&
                        packed_weight.size(2) == kPackWidth,
                    kOp, ": packed_weight must have shape [", G, ", ", K, ", ", kPackWidth,
                    "] (pack_linear_weight of a [", N, ", ", K, "] weight), got ", shape_str(packed_weight));
  TORCH_CHECK_VALUE(packed_weight.is_contiguous(), kOp, ": packed_weight must be contiguous");
  at::Tensor r;
  if (residual.has_value()) {
    check_cpu_float("residual", *residual);
    TORCH_CHECK_VALUE(residual->dim() == 2 && residual->size(0) == M && residual->size(1) == N, kOp,
                      ": residual must have shape [", M, ", ", N, "], got ", shape_str(*residual));
    r = residual->contiguous();
  }
  const at::Tensor x = input.stride(1) == 1 ? input : input.contiguous();
  at::Tensor y = at::empty({M, N}, input.options());
  if (M == 0 || K == 0) {  // no products: the residual, or zeros
    if (r.defined()) y.copy_(r); else y.zero_();
    return y;
  }
  const PackedGemmArgs a{x.data_ptr<float>(), x.stride(0), packed_weight.data_ptr<float>(),
                         r.defined() ? r.data_ptr<float>() : nullptr, y.data_ptr<float>(), M, N, K};
  const PackedGemmPath path = packed_gemm_path();
  // An item is up to kBlockRows x K x 64 multiply-adds; a thread hand-off costs about as much as ~2^17 of them.
  const int64_t items = G * packed_gemm_row_blocks(M);
  const int64_t item_work = std::min(M, kBlockRows) * K * kPackWidth;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, item_work));
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) { packed_gemm_items(a, i0, i1, path); });
  return y;
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CPU, m) { m.impl("packed_linear", &dspark::packed_linear_cpu); }
