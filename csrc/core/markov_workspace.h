// The scratch of one CUDA markov_draft call, as byte offsets into one
// buffer: the .out form's `workspace` (dspark_ops.workspace_size(
// "markov_draft", num_requests=R, vocab_size=V, rank=r)), or an allocation
// when none is passed. Each region starts on a 256-byte boundary.
#pragma once
#include <cstdint>

#include "chunks.h"
#include "sample_args.h"
#include "split_select.h"

namespace dspark {

struct MarkovLayout {
  int64_t prev;       // [R] int64: x_{k-1}, always a valid w1 row
  int64_t race_t;     // [R] float: the keep key's temperature, 1 (stochastic) or 0 (greedy)
  int64_t live;       // [R] int32: 1 while the request drafts
  int64_t keep_keys;  // [R] uint32
  int64_t partials;   // [R, markov chunks] SamplePartial: a step's race per vocabulary chunk
  int64_t bias;       // [R, V] float: the step's w1[x_{k-1}] @ w2
  int64_t w1_rows;    // [R, rank] of 4-byte room: the gathered w1 rows the bf16/fp16 GEMM reads
  int64_t split;      // the split select's state (small batches), or -1
  int64_t bytes;
};

inline MarkovLayout markov_layout(int64_t R, int64_t V, int64_t rank) {
  MarkovLayout m{};
  int64_t at = 0;
  const auto take = [&at](int64_t bytes) {
    const int64_t start = at;
    at += align_up(bytes, 256);
    return start;
  };
  m.prev = take(R * 8);
  m.race_t = take(R * 4);
  m.live = take(R * 4);
  m.keep_keys = take(R * 4);
  m.partials = take(R * split_chunks(R, V) * int64_t{sizeof(SamplePartial)});
  m.bias = take(R * V * 4);
  m.w1_rows = take(R * rank * 4);
  m.split = split_select_splits(R, V) > 0 ? take(split_select_workspace_bytes(R)) : -1;
  m.bytes = at;
  return m;
}

}  // namespace dspark
