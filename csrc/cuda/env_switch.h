// The environment switches of the CUDA bindings, read at each call (so a
// CUDA graph keeps the choice made when it was captured): "0" turns a path
// off, "1" forces it on, anything else (or unset) lets the op choose. The
// benchmarks and tests compare the paths with them.
//   DSPARK_SPLIT_SELECT   the split top-k/top-p select of small batches
//                         (kernels/split_select.cuh; the same keys as one
//                         block per row); only "0" matters
//   DSPARK_TREE_ROW_PASS  verify_tree's row pass (csrc/cuda/verify_tree.cu)
//   DSPARK_MARKOV_FUSED   markov_draft's step with the bias GEMM fused in
//                         (kernels/markov_fused.cuh); only "0" matters
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdlib>
#include <cstring>

#include "../core/split_select.h"

namespace dspark {

enum class EnvSwitch { kAuto, kOff, kOn };

inline EnvSwitch env_switch(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return EnvSwitch::kAuto;
  if (std::strcmp(v, "0") == 0) return EnvSwitch::kOff;
  return std::strcmp(v, "1") == 0 ? EnvSwitch::kOn : EnvSwitch::kAuto;
}

inline bool split_select_enabled() { return env_switch("DSPARK_SPLIT_SELECT") != EnvSwitch::kOff; }
inline bool markov_fused_enabled() { return env_switch("DSPARK_MARKOV_FUSED") != EnvSwitch::kOff; }

// The split select's state for `rows` rows of `n` entries, held by `holder`,
// where the split path is enabled and the batch takes it; nullptr otherwise
// (one block per row). For ops whose caller passes no workspace for it.
inline void* split_select_scratch(int64_t rows, int64_t n, const at::Tensor& like, at::Tensor& holder) {
  if (!split_select_enabled() || split_select_splits(rows, n) <= 0) return nullptr;
  holder = at::empty({split_select_workspace_bytes(rows)}, like.options().dtype(at::kByte));
  return holder.data_ptr();
}

}  // namespace dspark
