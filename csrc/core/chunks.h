// How a row's vocabulary is split across CUDA blocks: enough blocks in all
// (about kTargetBlocks) to fill a large GPU even for one row, never chunks of
// fewer than kMinChunk entries. Depends on (rows, V) only, so workspace sizes
// are device-independent and the results never depend on it.
#pragma once
#include <cstdint>

namespace dspark {

constexpr int64_t kMinChunk = 1024;
constexpr int64_t kTargetBlocks = 1024;

inline int64_t split_chunks(int64_t rows, int64_t vocab) {
  const int64_t max_chunks = (vocab + kMinChunk - 1) / kMinChunk;
  int64_t want = rows > 0 ? (kTargetBlocks + rows - 1) / rows : 1;
  if (want > max_chunks) want = max_chunks;
  return want < 1 ? 1 : want;
}

// Chunk length, a multiple of 4 so Philox groups never straddle chunks.
inline int64_t split_chunk_len(int64_t vocab, int64_t num_chunks) {
  const int64_t len = (vocab + num_chunks - 1) / num_chunks;
  return (len + 3) / 4 * 4;
}

inline int64_t align_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

}  // namespace dspark
