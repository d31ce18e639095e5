// CUDA binding of `kv_compact`: the layer table from a KVLayout (or copied
// from the host per call) -> kernels/kv_compact.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#if !defined(DSPARK_CUDA_EMU)
#include <c10/cuda/CUDAGraphsC10Utils.h>
#endif

#include <cstring>

#include "../kernels/kv_compact.cuh"
#include "../kv_common.h"

namespace dspark {
namespace {

void kv_compact_cuda(const at::TensorList caches, const at::Tensor& base_len, const at::Tensor& num_appended,
                     const at::Tensor& keep_index, const at::Tensor& num_keep, const at::Tensor& new_len,
                     const at::Tensor& status, const c10::optional<at::Tensor>& block_table, bool heads_first,
                     const c10::optional<at::Tensor>& layout) {
  const int64_t R = check_kv_args(caches, base_len, num_appended, keep_index, num_keep, new_len, status, block_table,
                                  heads_first);
  std::vector<KVLayer> layers = kv_layers(caches, heads_first, block_table.has_value());
  if (R == 0) return;
  const c10::cuda::CUDAGuard guard(base_len.device());
  at::Tensor table;
  if (layout.has_value()) {  // built by KVLayout for these caches: trusted, shape-checked
    TORCH_CHECK_VALUE(layout->scalar_type() == at::kLong && layout->dim() == 2 &&
                          layout->size(0) == static_cast<int64_t>(layers.size()) && layout->size(1) == 8 &&
                          layout->is_contiguous() && layout->device() == base_len.device(),
                      kKvOp, ": layout must be the contiguous [", layers.size(), ", 8] int64 table of KVLayout on ",
                      base_len.device(), ", got ", shape_str(*layout));
    table = *layout;
  } else {  // one small asynchronous host-to-device copy per call, from pinned memory
#if defined(DSPARK_CUDA_EMU)
    constexpr bool kPinned = false;  // the emulator (tools/cuda_emu) has no driver to pin memory with
#else
    constexpr bool kPinned = true;
    // A captured copy would replay from host memory the allocator has handed out again: wild layer pointers.
    TORCH_CHECK_VALUE(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None, kKvOp,
                      ": pass layout=KVLayout(caches, ...) to a call captured in a CUDA graph (without it each call "
                      "copies the layer table from host memory, and a replay would copy what is there by then)");
#endif
    at::Tensor host = at::empty({static_cast<int64_t>(layers.size()), 8},
                                at::TensorOptions().dtype(at::kLong).pinned_memory(kPinned));
    std::memcpy(host.data_ptr(), layers.data(), layers.size() * sizeof(KVLayer));
    table = host.to(base_len.device(), /*non_blocking=*/true, /*copy=*/true);
  }
  at::Tensor out_len = new_len, out_status = status;
  const KVArgs a = make_kv_args(caches, layers, static_cast<const KVLayer*>(table.const_data_ptr()), base_len,
                                num_appended, keep_index, num_keep, out_len, out_status, block_table);
  const cudaError_t err = kv_compact_launch(a, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kKvOp, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CUDA, m) { m.impl("kv_compact", &dspark::kv_compact_cuda); }
