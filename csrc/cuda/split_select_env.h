// Whether the CUDA bindings let small batches find their top-k/top-p keep
// keys with the split select (kernels/split_select.cuh: the same keys, each
// row read by many blocks). DSPARK_SPLIT_SELECT=0 keeps one block per row:
// the benchmarks and tests compare the two. Read at each call (so a CUDA
// graph keeps the choice made when it was captured).
#pragma once
#include <cstdlib>
#include <cstring>

namespace dspark {

inline bool split_select_enabled() {
  const char* env = std::getenv("DSPARK_SPLIT_SELECT");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

}  // namespace dspark
