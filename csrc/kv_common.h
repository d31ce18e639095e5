// The `kv_compact` op's host-side half shared by the CPU and CUDA bindings:
// argument checks and the per-layer byte geometry (core/kv.h KVLayer).
#pragma once
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "checks.h"
#include "core/kv.h"

namespace dspark {

constexpr const char* kKvOp = "dspark_ops.kv_compact";

inline int64_t kv_vec_width(std::initializer_list<int64_t> values) {
  for (int64_t w : {16, 8, 4, 2}) {
    if (std::all_of(values.begin(), values.end(), [w](int64_t v) { return v % w == 0; })) return w;
  }
  return 1;
}

// Each cache tensor compacted once: two that share bytes (a tensor listed
// twice, or layers sharing one KV tensor) would have their entries moved
// twice -- on a GPU by blocks racing each other. Caches are contiguous, so
// their byte spans are exact. O(L log L): sorted by address, neighbours compared.
inline void check_kv_caches_apart(const at::TensorList caches) {
  std::vector<std::pair<std::pair<uintptr_t, uintptr_t>, size_t>> spans;
  spans.reserve(caches.size());
  for (size_t l = 0; l < caches.size(); ++l) {
    const auto span = byte_span(caches[l]);
    if (span.first < span.second) spans.push_back({span, l});
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    const size_t a = std::min(spans[i - 1].second, spans[i].second), b = std::max(spans[i - 1].second, spans[i].second);
    TORCH_CHECK_VALUE(spans[i].first.first >= spans[i - 1].first.second, kKvOp, ": caches[", a, "] and caches[", b,
                      "] share memory; pass each cache tensor once (layers that share a KV tensor list it once)");
  }
}

// Caches are 4-D: [R, S, H, D], [R, H, S, D] (heads_first) or paged blocks.
inline void check_kv_cache_dim(size_t l, const at::Tensor& c, bool heads_first, bool paged) {
  TORCH_CHECK_VALUE(c.dim() == 4, kKvOp, ": caches[", l, "] must have 4 dimensions ",
                    paged ? "[num_blocks, block_size, H, D]" : heads_first ? "[R, H, S, D]" : "[R, S, H, D]",
                    ", got ", shape_str(c));
}

// The byte geometry of every cache tensor (checked against each other).
inline std::vector<KVLayer> kv_layers(const at::TensorList caches, bool heads_first, bool paged) {
  const char* op = kKvOp;
  TORCH_CHECK_VALUE(!caches.empty(), op, ": caches must hold at least one tensor");
  TORCH_CHECK_VALUE(!(paged && heads_first), op, ": heads_first caches cannot be paged");
  std::vector<KVLayer> layers;
  layers.reserve(caches.size());
  for (size_t l = 0; l < caches.size(); ++l) {
    const at::Tensor& c = caches[l];
    check_kv_cache_dim(l, c, heads_first, paged);
    TORCH_CHECK_VALUE(c.is_contiguous(), op, ": caches[", l, "] must be contiguous");
    TORCH_CHECK_VALUE(c.device() == caches[0].device(), op, ": caches[", l, "] must be on ", caches[0].device(),
                      " like caches[0], got ", c.device());
    const int64_t e = c.element_size();
    KVLayer L{};
    L.ptr = reinterpret_cast<int64_t>(c.data_ptr());
    if (heads_first) {  // [R, H, S, D]
      const int64_t H = c.size(1), S = c.size(2), D = c.size(3);
      L.r_stride = H * S * D * e, L.s_stride = D * e, L.run_bytes = D * e, L.num_runs = H;
      L.run_stride = S * D * e, L.capacity = S;
    } else {  // [R, S, H, D] or [num_blocks, block_size, H, D]
      const int64_t S = c.size(1), H = c.size(2), D = c.size(3);
      L.r_stride = S * H * D * e, L.s_stride = H * D * e, L.run_bytes = H * D * e, L.num_runs = 1;
      L.run_stride = 0, L.capacity = S;
    }
    L.vec = kv_vec_width({L.ptr, L.r_stride, L.s_stride, L.run_bytes, L.run_stride});
    layers.push_back(L);
  }
  check_kv_caches_apart(caches);
  return layers;
}

inline void check_kv_vector(const char* name, const at::Tensor& t, int64_t R, const at::Tensor& ref) {
  check_output(kKvOp, name, t, R, at::kInt, ref);
}

// Checks everything but the caches' geometry; returns R.
inline int64_t check_kv_args(const at::TensorList caches, const at::Tensor& base_len, const at::Tensor& num_appended,
                             const at::Tensor& keep_index, const at::Tensor& num_keep, const at::Tensor& new_len,
                             const at::Tensor& status, const c10::optional<at::Tensor>& block_table, bool heads_first) {
  const char* op = kKvOp;
  const int64_t R = base_len.dim() == 1 ? base_len.size(0) : -1;
  TORCH_CHECK_VALUE(R >= 0, op, ": base_len must have shape [R], got ", shape_str(base_len));
  TORCH_CHECK_VALUE(!caches.empty(), op, ": caches must hold at least one tensor");
  const at::Tensor& ref = caches[0];
  check_kv_vector("base_len", base_len, R, ref);
  check_kv_vector("num_appended", num_appended, R, ref);
  check_kv_vector("num_keep", num_keep, R, ref);
  check_kv_vector("new_len", new_len, R, ref);
  check_kv_vector("status", status, R, ref);
  check_same_device(op, "keep_index", keep_index, ref);
  check_dtype(op, "keep_index", keep_index, at::kInt);
  TORCH_CHECK_VALUE(keep_index.dim() == 2 && keep_index.size(0) == R && keep_index.is_contiguous(), op,
                    ": keep_index must be a contiguous [", R, ", K_max] tensor, got ", shape_str(keep_index));
  for (const auto& [out_name, out] : {std::pair<const char*, const at::Tensor&>{"new_len", new_len},
                                       std::pair<const char*, const at::Tensor&>{"status", status}}) {
    check_no_overlap(op, out_name, out, "base_len", base_len);
    check_no_overlap(op, out_name, out, "num_appended", num_appended);
    check_no_overlap(op, out_name, out, "num_keep", num_keep);
    check_no_overlap(op, out_name, out, "keep_index", keep_index);
    if (block_table.has_value()) check_no_overlap(op, out_name, out, "block_table", *block_table);
  }
  check_no_overlap(op, "status", status, "new_len", new_len);
  // Every cache 4-D before any size is read: a 3-D one is named as such, not as a wrong R or block size.
  for (size_t l = 0; l < caches.size(); ++l) check_kv_cache_dim(l, caches[l], heads_first, block_table.has_value());
  if (block_table.has_value()) {
    TORCH_CHECK_VALUE(ref.size(1) >= 1, op, ": paged caches must have block_size >= 1, got ", shape_str(ref));
    TORCH_CHECK_VALUE(!heads_first, op, ": heads_first caches cannot be paged");
    check_same_device(op, "block_table", *block_table, ref);
    check_dtype(op, "block_table", *block_table, at::kInt);
    TORCH_CHECK_VALUE(block_table->dim() == 2 && block_table->size(0) == R && block_table->is_contiguous(), op,
                      ": block_table must be a contiguous [", R, ", max_blocks] tensor, got ", shape_str(*block_table));
    for (size_t l = 0; l < caches.size(); ++l) {
      TORCH_CHECK_VALUE(caches[l].size(0) == ref.size(0) && caches[l].size(1) == ref.size(1), op,
                        ": paged caches[", l, "] must have num_blocks = ", ref.size(0), " and block_size = ",
                        ref.size(1), " like caches[0], got ", shape_str(caches[l]));
    }
  } else {
    for (size_t l = 0; l < caches.size(); ++l) {
      TORCH_CHECK_VALUE(caches[l].size(0) == R, op, ": caches[", l, "] must have R = ", R,
                        " requests in dimension 0, got ", shape_str(caches[l]));
    }
  }
  return R;
}

inline KVArgs make_kv_args(const at::TensorList caches, const std::vector<KVLayer>& layers, const KVLayer* table,
                           const at::Tensor& base_len, const at::Tensor& num_appended, const at::Tensor& keep_index,
                           const at::Tensor& num_keep, at::Tensor& new_len, at::Tensor& status,
                           const c10::optional<at::Tensor>& block_table) {
  KVArgs a{};
  a.layers = table;
  a.num_layers = static_cast<int32_t>(layers.size());
  a.num_requests = static_cast<int32_t>(base_len.size(0));
  a.base_len = base_len.const_data_ptr<int32_t>();
  a.num_appended = num_appended.const_data_ptr<int32_t>();
  a.keep_index = keep_index.const_data_ptr<int32_t>();
  a.k_max = static_cast<int32_t>(keep_index.size(1));
  a.num_keep = num_keep.const_data_ptr<int32_t>();
  a.block_table = block_table.has_value() ? block_table->const_data_ptr<int32_t>() : nullptr;
  a.max_blocks = block_table.has_value() ? static_cast<int32_t>(block_table->size(1)) : 0;
  a.block_size = block_table.has_value() ? static_cast<int32_t>(caches[0].size(1)) : 1;
  a.num_blocks = block_table.has_value() ? caches[0].size(0) : 0;
  int64_t cap = INT64_MAX;
  for (const KVLayer& L : layers) cap = std::min(cap, L.capacity);
  a.min_capacity = cap;
  a.new_len = new_len.data_ptr<int32_t>();
  a.status = status.data_ptr<int32_t>();
  return a;
}

}  // namespace dspark
