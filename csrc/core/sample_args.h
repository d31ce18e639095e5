// The `sample` op's arguments as raw pointers: shared by the CPU op and the
// CUDA kernels (csrc/kernels/sample.cuh), neither of which sees torch.
#pragma once
#include <cstdint>

#include "broadcast.h"
#include "chunks.h"
#include "filters.h"
#include "macros.h"
#include "race.h"
#include "rng.h"
#include "split_select.h"
#include "status.h"

namespace dspark {

template <typename T>
struct SampleArgs {
  const T* logits;        // [num_rows, row_stride], rows of `vocab` contiguous values
  int64_t row_stride;     // elements between rows
  int64_t num_rows;
  int32_t vocab;
  int32_t num_requests;   // R
  const int32_t* row_start;  // [R] row of request r, or nullptr for row r
  PerRequest<float> temperature;
  PerRequest<int32_t> top_k;
  PerRequest<float> top_p;
  PerRequest<int64_t> seed;
  PerRequest<int64_t> position;
  PerRequest<int32_t> slot;
  uint32_t purpose;
  int32_t* tokens;  // [R] out
  int32_t* status;  // [R] out
};

// The row request r reads, or -1 (with kBadLengths) when the row start or the
// slot is out of range.
template <typename T>
DSPARK_HD int64_t sample_row(const SampleArgs<T>& a, int64_t r) {
  const int64_t row = a.row_start ? static_cast<int64_t>(a.row_start[r]) : r;
  const int32_t slot = a.slot[r];
  if (row < 0 || row >= a.num_rows || slot < 0 || static_cast<uint32_t>(slot) > kMaxSlot) return -1;
  return row;
}

template <typename T>
DSPARK_HD bool sample_greedy(const SampleArgs<T>& a, int64_t r) {
  return !(a.temperature[r] > 0.0f);
}

// Whether request r needs a top-k/top-p threshold at all.
template <typename T>
DSPARK_HD bool sample_filtered(const SampleArgs<T>& a, int64_t r) {
  return !sample_greedy(a, r) && (topk_active(a.top_k[r], a.vocab) || topp_active(a.top_p[r]));
}

struct SamplePartial {
  float score;
  int32_t index;
  int32_t flags;
  int32_t pad;
};

// Workspace: thresholds [R] uint32, partials [R, chunks], then (batches
// small enough for it) the split top-k/top-p select's state (split_select.h).
struct SampleWorkspace {
  int64_t partials_offset, split_offset, bytes;
};

inline SampleWorkspace sample_workspace(int64_t num_requests, int64_t vocab) {
  SampleWorkspace w;
  w.partials_offset = align_up(num_requests * 4, 256);
  w.split_offset = w.partials_offset +
                   align_up(num_requests * split_chunks(num_requests, vocab) * int64_t{sizeof(SamplePartial)}, 256);
  w.bytes = w.split_offset +
            (split_select_splits(num_requests, vocab) > 0 ? split_select_workspace_bytes(num_requests) : 0);
  return w;
}

inline int64_t sample_workspace_bytes(int64_t num_requests, int64_t vocab) {
  return sample_workspace(num_requests, vocab).bytes;
}

}  // namespace dspark
