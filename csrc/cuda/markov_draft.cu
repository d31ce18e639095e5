// CUDA binding of `markov_draft`: per step, the bias rows w1[x_{k-1}] @ w2
// (fp32 sums: cuBLAS through torch for bf16/fp16 weights, markov_bias_kernel
// for fp32 ones), then the fused kernels of kernels/markov_draft.cuh, all on
// the current stream. No host synchronisation: the state between steps
// (x_{k-1}, live) stays on the device.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernels/markov_draft.cuh"
#include "../markov_common.h"
#include "env_switch.h"

namespace dspark {
namespace {

template <typename Storage>
void run(const at::Tensor& base, const at::Tensor& anchor, const at::Tensor& w1, const at::Tensor& w2,
         const at::Tensor& temperature, const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
         const at::Tensor& seed, const at::Tensor& position, const c10::optional<at::Tensor>& num_draft,
         at::Tensor& tokens, at::Tensor& draft_logits, at::Tensor& status) {
  const auto args = make_markov_args<Storage>(base, anchor, temperature, top_k, top_p, seed, position, num_draft,
                                              tokens, draft_logits, status);
  const int64_t R = base.size(0), V = base.size(2);
  const auto stream = at::cuda::getCurrentCUDAStream();
  // bf16/fp16 weights of one dtype: cuBLAS reads them as they are and sums in fp32 into an fp32 bias (products of
  // two half-precision values are exact in fp32, and w2 is half the bytes a step). Otherwise fp32 copies once per
  // call (none when they are fp32 and contiguous) for markov_bias_kernel: the CPU op's sums bit for bit, whatever
  // the batch and torch's TF32 setting (cuBLAS would take TF32 for fp32 when a user allows it: ~1e-3 off).
  const bool half_gemm = w1.scalar_type() == w2.scalar_type() && w2.scalar_type() != at::kFloat;
  const at::Tensor w1g = half_gemm ? w1 : w1.to(at::kFloat).contiguous();
  const at::Tensor w2g = half_gemm ? w2 : w2.to(at::kFloat).contiguous();
  const at::Tensor race_t = temperature.gt(0).to(at::kFloat);  // the keep key's temperature: 1, or 0 (greedy)
  at::Tensor prev = at::empty({R}, base.options().dtype(at::kLong));
  at::Tensor bias = at::empty({R, V}, base.options().dtype(at::kFloat));
  at::Tensor scratch = at::empty({markov_workspace_bytes(R, V)}, base.options().dtype(at::kByte));
  WorkspaceCarve carve{static_cast<char*>(scratch.data_ptr())};
  MarkovBuffers b;
  b.bias = bias.const_data_ptr<float>();
  b.prev = prev.data_ptr<int64_t>();
  b.live = carve.take<int32_t>(R);
  b.keep_keys = carve.take<uint32_t>(R);
  b.partials = carve.take<SamplePartial>(R * markov_chunks(R, V));
  b.race_temperature = per_request<float>(race_t, 1.0f);
  const bool may_filter = top_k.has_value() || top_p.has_value();
  at::Tensor split_ws;  // the split select's state, for filtered batches that take it
  b.split_select = may_filter ? split_select_scratch(R, V, base, split_ws) : nullptr;
  cudaError_t err = markov_start_launch<Storage>(args, b, stream);
  for (int32_t k = 1; k <= args.group && err == cudaSuccess; ++k) {
    if (half_gemm) {
#if defined(DSPARK_CUDA_EMU)  // the CPU has no mm with an fp32 out_dtype: fp32 copies, the same products
      at::mm_out(bias, w1g.index_select(0, prev).to(at::kFloat), w2g.to(at::kFloat));
#else
      at::mm_out(bias, w1g.index_select(0, prev), w2g, at::kFloat);
#endif
    } else {
      err = markov_bias_launch(w1g.const_data_ptr<float>(), w2g.const_data_ptr<float>(), b.prev, R, w1g.size(1), V,
                               bias.data_ptr<float>(), stream);
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
                           at::Tensor& status) {
  check_markov_args(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft);
  check_markov_outputs(base, tokens, draft_logits, status);
  check_markov_apart(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft, tokens, draft_logits,
                     status);
  if (base.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(base.device());
  switch (base.scalar_type()) {
    case at::kFloat:
      run<float>(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft, tokens, draft_logits,
                 status);
      break;
    case at::kHalf:
      run<__half>(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft, tokens, draft_logits,
                  status);
      break;
    default:
      run<__nv_bfloat16>(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft, tokens,
                         draft_logits, status);
  }
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CUDA, m) {
  m.impl("markov_draft", &dspark::markov_functional<&dspark::markov_draft_out_cuda>);
  m.impl("markov_draft.out", &dspark::markov_draft_out_cuda);
}
