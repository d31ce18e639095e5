// The top-k/top-p threshold of one row on the CPU: sorting-based, the same
// rule the radix descent of kernels/radix_select.cuh evaluates
// (core/filters.h), shared by every CPU op that samples from logits.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "../core/filters.h"

namespace dspark {

// The smallest order key that top-k then top-p keep among x = logits / T
// (0 = everything). A row with NaN or +inf returns the top-k key: the caller
// aborts it anyway.
template <typename T>
uint32_t row_keep_key(const T* logits, int64_t n, float temperature, int32_t top_k, float top_p) {
  std::vector<float> x(n);
  std::vector<uint32_t> keys(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<float>(logits[i]) / temperature;
    keys[i] = float_key(x[i]);
  }
  uint32_t keep = 0;
  if (topk_active(top_k, n)) {
    std::vector<uint32_t> sorted(keys);
    std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<uint32_t>());
    keep = sorted[top_k - 1];
  }
  if (!topp_active(top_p)) return keep;
  float row_max = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] != x[i] || x[i] == INFINITY) return keep;
    row_max = std::max(row_max, x[i]);
  }
  if (row_max == -INFINITY) return keep;
  std::vector<std::pair<uint32_t, uint64_t>> kept;  // (key, mass), key >= keep
  kept.reserve(n);
  uint64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (keys[i] < keep) continue;
    const uint64_t m = mass_fixed(x[i], row_max);
    kept.emplace_back(keys[i], m);
    total += m;
  }
  std::sort(kept.begin(), kept.end(), [](const auto& p, const auto& q) { return p.first > q.first; });
  uint64_t above = 0;  // mass of strictly larger keys
  uint32_t result = kept.front().first;
  for (size_t i = 0; i < kept.size();) {
    if (!topp_keeps(above, total, top_p)) break;
    result = kept[i].first;
    size_t j = i;
    while (j < kept.size() && kept[j].first == kept[i].first) above += kept[j++].second;
    i = j;
  }
  return result;
}

}  // namespace dspark
