// CUDA binding of `markov_draft`: per step, the bias rows w1[x_{k-1}] @ w2
// (fp32 sums: cuBLAS through torch for bf16/fp16 weights, markov_bias_kernel
// for fp32 ones), then the fused kernels of kernels/markov_draft.cuh, all on
// the current stream; bf16/fp16 weights whose shapes fit compute the bias
// inside the kernel that writes the row instead (kernels/markov_fused.cuh;
// DSPARK_MARKOV_FUSED=0 turns it off). No host synchronisation: the state
// between steps (x_{k-1}, live) stays on the device.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernels/markov_draft.cuh"
#include "../kernels/markov_fused.cuh"
#include "../markov_common.h"
#include "env_switch.h"
#include "workspace.h"

namespace dspark {
namespace {

template <typename Storage>
void run(const at::Tensor& base, const at::Tensor& anchor, const at::Tensor& w1, const at::Tensor& w2,
         const at::Tensor& temperature, const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
         const at::Tensor& seed, const at::Tensor& position, const c10::optional<at::Tensor>& num_draft,
         at::Tensor& tokens, at::Tensor& draft_logits, at::Tensor& status, const c10::optional<at::Tensor>& workspace) {
  const auto args = make_markov_args<Storage>(base, anchor, temperature, top_k, top_p, seed, position, num_draft,
                                              tokens, draft_logits, status);
  const int64_t R = base.size(0), V = base.size(2), rank = w1.size(1);
  const auto stream = at::cuda::getCurrentCUDAStream();
  // bf16/fp16 weights of one dtype: cuBLAS reads them as they are and sums in fp32 into an fp32 bias (products of
  // two half-precision values are exact in fp32, and w2 is half the bytes a step). Otherwise fp32 copies once per
  // call (none when they are fp32 and contiguous) for markov_bias_kernel: the CPU op's sums bit for bit, whatever
  // the batch and torch's TF32 setting (cuBLAS would take TF32 for fp32 when a user allows it: ~1e-3 off).
  const bool half_gemm = w1.scalar_type() == w2.scalar_type() && w2.scalar_type() != at::kFloat;
  const at::Tensor w1g = half_gemm ? w1 : w1.to(at::kFloat).contiguous();
  const at::Tensor w2g = half_gemm ? w2 : w2.to(at::kFloat).contiguous();
  // Every other buffer lives in one workspace: the caller's (no allocation), or one allocation.
  at::Tensor scratch;
  void* ws = workspace_ptr(kMarkovOp, workspace, markov_workspace_need(base, w1), base, scratch);
  MarkovBuffers b = markov_workspace(ws, R, V, rank);
  const bool may_filter = top_k.has_value() || top_p.has_value();
  if (!may_filter || !split_select_enabled()) b.split_select = nullptr;  // one block a row for the keys
  const auto view = [&](void* p, at::IntArrayRef sizes, at::ScalarType t) {  // device given: no pointer query
    return at::for_blob(p, sizes).options(base.options().dtype(t)).target_device(base.device()).make_tensor();
  };
  cudaError_t err = markov_start_launch<Storage>(args, b, stream);
  // bf16/fp16 weights: the bias computed in the kernel that writes the row (no fp32 bias rows), whatever the batch.
  if (half_gemm && markov_fused_enabled() && w1.is_contiguous() && w2.is_contiguous() &&
      markov_fused_fits(V, rank, w1.const_data_ptr(), w2.const_data_ptr()) &&
      at::cuda::getCurrentDeviceProperties()->major >= 8) {  // bf16 WMMA
    const auto r32 = static_cast<int32_t>(rank);
    for (int32_t k = 1; k <= args.group && err == cudaSuccess; ++k) {
      if (w2.scalar_type() == at::kHalf)
        err = markov_fused_step_launch<Storage, __half>(args, k, b, static_cast<const __half*>(w1.const_data_ptr()),
                                                        static_cast<const __half*>(w2.const_data_ptr()), r32,
                                                        may_filter, stream);
      else
        err = markov_fused_step_launch<Storage, __nv_bfloat16>(
            args, k, b, static_cast<const __nv_bfloat16*>(w1.const_data_ptr()),
            static_cast<const __nv_bfloat16*>(w2.const_data_ptr()), r32, may_filter, stream);
    }
    TORCH_CHECK(err == cudaSuccess, kMarkovOp, ": CUDA launch failed: ", cudaGetErrorString(err));
    return;
  }
  const at::Tensor prev = view(b.prev, {R}, at::kLong);
  at::Tensor bias = view(b.bias, {R, V}, at::kFloat);
  at::Tensor w1_rows = view(b.w1_rows, {R, rank}, w1g.scalar_type());
  for (int32_t k = 1; k <= args.group && err == cudaSuccess; ++k) {
    if (half_gemm) {
      at::index_select_out(w1_rows, w1g, 0, prev);
#if defined(DSPARK_CUDA_EMU)  // the CPU has no mm with an fp32 out_dtype: fp32 copies, the same products
      at::mm_out(bias, w1_rows.to(at::kFloat), w2g.to(at::kFloat));
#else
      at::mm_out(bias, w1_rows, w2g, at::kFloat);
#endif
    } else {
      err = markov_bias_launch(w1g.const_data_ptr<float>(), w2g.const_data_ptr<float>(), b.prev, R, rank, V,
                               b.bias, stream);
      if (err != cudaSuccess) break;
    }
    err = markov_step_launch<Storage>(args, k, b, may_filter, stream);
  }
  TORCH_CHECK(err == cudaSuccess, kMarkovOp, ": CUDA launch failed: ", cudaGetErrorString(err));
}

void markov_draft_out_cuda(const at::Tensor& base, const at::Tensor& anchor, const at::Tensor& w1,
                           const at::Tensor& w2, const at::Tensor& temperature,
                           const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                           const at::Tensor& seed, const at::Tensor& position,
                           const c10::optional<at::Tensor>& num_draft, at::Tensor& tokens, at::Tensor& draft_logits,
                           at::Tensor& status, const c10::optional<at::Tensor>& workspace) {
  check_markov_args(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft);
  check_markov_outputs(base, tokens, draft_logits, status);
  check_markov_apart(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft, tokens, draft_logits,
                     status, workspace);
  if (base.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(base.device());
  switch (base.scalar_type()) {
    case at::kFloat:
      run<float>(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft, tokens, draft_logits,
                 status, workspace);
      break;
    case at::kHalf:
      run<__half>(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft, tokens, draft_logits,
                  status, workspace);
      break;
    default:
      run<__nv_bfloat16>(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft, tokens,
                         draft_logits, status, workspace);
  }
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CUDA, m) {
  m.impl("markov_draft", &dspark::markov_functional<&dspark::markov_draft_out_cuda>);
  m.impl("markov_draft.out", &dspark::markov_draft_out_cuda);
}
