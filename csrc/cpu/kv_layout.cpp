// kv_layout_table: the [L, 8] int64 byte-geometry table of a list of caches
// (core/kv.h KVLayer), built on the host from tensor metadata alone, for any
// backend (CompositeExplicitAutograd); dspark_ops.KVLayout moves it to the
// device once and reuses it across steps and graph replays.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../kv_common.h"

namespace dspark {
namespace {

at::Tensor kv_layout_table(at::TensorList caches, bool heads_first, bool paged) {
  const std::vector<KVLayer> layers = kv_layers(caches, heads_first, paged);
  at::Tensor t = at::empty({static_cast<int64_t>(layers.size()), 8}, at::kLong);
  std::memcpy(t.data_ptr(), layers.data(), layers.size() * sizeof(KVLayer));
  return t;
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_IMPL(dspark_ops, CompositeExplicitAutograd, m) {
  m.impl("kv_layout_table", &dspark::kv_layout_table);
}
