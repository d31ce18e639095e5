// CPU implementation of `kv_compact`: requests in parallel; within a request
// and layer, kept entries move in ascending order, which is safe because
// keep_index is strictly increasing (every source lies at or after its
// destination), like a forward memmove.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>

#include "../kv_common.h"

namespace dspark {
namespace {

void kv_compact_request(const KVArgs& a, int64_t r) {
  const int32_t st = kv_check(a, r);
  a.status[r] = st;
  const int64_t base = a.base_len[r];
  if (st != 0) {
    a.new_len[r] = static_cast<int32_t>(base);
    return;
  }
  const int64_t keep = a.num_keep[r];
  a.new_len[r] = static_cast<int32_t>(base + keep);
  for (int64_t l = 0; l < a.num_layers; ++l) {
    const KVLayer& L = a.layers[l];
    for (int64_t i = 0; i < keep; ++i) {
      const int64_t k = a.keep_index[r * a.k_max + i];
      if (k == i) continue;  // already in place
      const char* src = kv_entry(a, L, r, base + k);
      char* dst = kv_entry(a, L, r, base + i);
      for (int64_t run = 0; run < L.num_runs; ++run)
        std::memmove(dst + run * L.run_stride, src + run * L.run_stride, L.run_bytes);
    }
  }
}

void kv_compact_cpu(const at::TensorList caches, const at::Tensor& base_len, const at::Tensor& num_appended,
                    const at::Tensor& keep_index, const at::Tensor& num_keep, const at::Tensor& new_len,
                    const at::Tensor& status, const c10::optional<at::Tensor>& block_table, bool heads_first,
                    const c10::optional<at::Tensor>& /*layout: the CPU builds its table from the list*/) {
  const int64_t R = check_kv_args(caches, base_len, num_appended, keep_index, num_keep, new_len, status, block_table,
                                  heads_first);
  const std::vector<KVLayer> layers = kv_layers(caches, heads_first, block_table.has_value());
  if (R == 0) return;
  at::Tensor out_len = new_len, out_status = status;
  const KVArgs a = make_kv_args(caches, layers, layers.data(), base_len, num_appended, keep_index, num_keep,
                                out_len, out_status, block_table);
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) kv_compact_request(a, r);
  });
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CPU, m) { m.impl("kv_compact", &dspark::kv_compact_cpu); }
