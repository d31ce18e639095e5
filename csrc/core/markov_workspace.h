// The scratch of one CUDA markov_draft call, carved from one buffer: the
// .out form's `workspace` (dspark_ops.workspace_size("markov_draft",
// num_requests=R, vocab_size=V, rank=r)), or an allocation when none is
// passed. WorkspaceCarve's regions, as verify_workspace / tree_workspace.
#pragma once
#include <cstdint>

#include "chunks.h"
#include "sample_args.h"
#include "split_select.h"

namespace dspark {

struct MarkovBuffers {
  float* bias;              // [R, V] this step's w1[x_{k-1}] @ w2
  int64_t* prev;            // [R] x_{k-1}, always a valid w1 row
  int32_t* live;            // [R] 1 while the request drafts
  uint32_t* keep_keys;      // [R]
  SamplePartial* partials;  // [R, split_chunks(R, V)] a step's race per vocabulary chunk
  float* race_t;            // [R] the keep key's temperature: 1 (stochastic) or 0 (greedy)
  void* w1_rows;            // [R, rank] of 4-byte room: the gathered w1 rows the bf16/fp16 GEMM reads
  void* split_select;       // split_select_workspace_bytes(R) for small batches' keys, or nullptr
  int64_t bytes;
};

// Carves `base` (nullptr: only sizes it) for R requests, V and the rank.
inline MarkovBuffers markov_workspace(void* base, int64_t R, int64_t V, int64_t rank) {
  WorkspaceCarve c{static_cast<char*>(base)};
  MarkovBuffers b;
  b.prev = c.take<int64_t>(R);
  b.race_t = c.take<float>(R);
  b.live = c.take<int32_t>(R);
  b.keep_keys = c.take<uint32_t>(R);
  b.partials = c.take<SamplePartial>(R * split_chunks(R, V));
  b.bias = c.take<float>(R * V);
  b.w1_rows = c.take<float>(R * rank);
  b.split_select = split_select_splits(R, V) > 0 ? c.take<char>(split_select_workspace_bytes(R)) : nullptr;
  b.bytes = c.bytes;
  return b;
}

}  // namespace dspark
