// A per-request parameter: a tensor [R], one value for all requests (a [1]
// tensor read with stride 0), or absent (nullptr: `fallback` for all).
#pragma once
#include <cstdint>

#include "macros.h"

namespace dspark {

template <typename T>
struct PerRequest {
  const T* ptr;
  int64_t stride;  // 1 for a [R] tensor, 0 for a broadcast [1] tensor
  T fallback;      // the value when ptr is null
  DSPARK_HD T operator[](int64_t r) const { return ptr ? ptr[r * stride] : fallback; }
};

}  // namespace dspark
