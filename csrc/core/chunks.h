// How a row's vocabulary is split across CUDA blocks.
// split_chunks: enough blocks in all (about kTargetBlocks) to fill a large
// GPU even for one row, never chunks of fewer than kMinChunk entries; it
// depends on the number of rows, so only ops whose per-row result is exact in
// any order (an argmax under a total order: `sample`'s race) may use it.
// fixed_chunks: chunks of kFixedChunk entries, a function of V alone, for
// ops that sum floats over a row (verify_chunk's softmax normaliser): the
// summation order, hence every decision, is then independent of the batch.
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

constexpr int64_t kFixedChunk = 8192;

inline int64_t fixed_chunks(int64_t vocab) { return (vocab + kFixedChunk - 1) / kFixedChunk; }

inline int64_t align_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

// Carves consecutive 256-byte-aligned pieces out of a workspace; with a null
// base it only counts the bytes (workspace_size).
struct WorkspaceCarve {
  char* base;
  int64_t bytes = 0;
  template <typename T>
  T* take(int64_t count) {
    T* at = base ? reinterpret_cast<T*>(base + bytes) : nullptr;
    bytes += align_up(count * int64_t{sizeof(T)}, 256);
    return at;
  }
};

}  // namespace dspark
