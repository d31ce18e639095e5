// Deterministic parallel map-reduce over a row's vocabulary on the CPU:
// fixed chunks (multiples of 4, so Philox groups never straddle two),
// partials merged in chunk order whatever the thread count.
#pragma once
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace dspark {

constexpr int64_t kCpuChunk = 16384;

// body(begin, end) -> Acc for [begin, end); merge(Acc, Acc) -> Acc.
template <typename Acc, typename Body, typename Merge>
Acc chunked_reduce(int64_t n, Acc empty, Body body, Merge merge) {
  const int64_t chunks = (n + kCpuChunk - 1) / kCpuChunk;
  std::vector<Acc> partial(chunks, empty);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) partial[c] = body(c * kCpuChunk, std::min(n, (c + 1) * kCpuChunk));
  });
  Acc acc = empty;
  for (const Acc& p : partial) acc = merge(acc, p);
  return acc;
}

}  // namespace dspark
