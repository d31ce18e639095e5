// The workspace of the split top-k/top-p select (kernels/split_select.cuh):
// its per-row state and histograms, and when a batch takes that path.
// Host-side sizes only; the kernels do the work.
#pragma once
#include <cstdint>

#include "chunks.h"

namespace dspark {

constexpr int kSplitSelectBins = 256;  // = radix_select.cuh's kRadixBins: 8 key bits a pass

// A row's selection state between passes (zeroed before the first).
struct SplitSelectRow {
  uint32_t prefix, mask;  // the key bits fixed so far
  uint32_t remaining;     // top-k: the rank left within the prefix
  uint32_t keep;          // top-k's key (top-p's floor), then the final key
  uint32_t max_key;       // top-p: float_key of the row's max x (atomicMax; 0: none yet)
  uint32_t bad;           // top-p: a NaN or +inf x was seen (atomicOr)
  uint32_t done;          // blocks of the current pass finished
  uint32_t pad;
  unsigned long long above, total;  // top-p: mass above the prefix, Z
};

struct SplitSelectHist {
  uint32_t counts[kSplitSelectBins];
  unsigned long long masses[kSplitSelectBins];
};

// Entries a block of the split path reads at least: below this a pass is
// launch latency, and the one-block select's 9 passes over a short row are
// cheaper than 10 launches (to be tuned on measurements).
constexpr int64_t kSplitSelectMinSlice = 2048;

// Blocks per row for the split path, or 0 where the one-block select is
// the better choice: a batch of at most kTargetBlocks / 4 rows (else one
// block per row fills the GPU), rows of at least 2 slices; about
// kTargetBlocks blocks in all.
inline int64_t split_select_splits(int64_t rows, int64_t n) {
  if (rows <= 0 || 4 * rows > kTargetBlocks) return 0;
  int64_t splits = (kTargetBlocks + rows - 1) / rows;
  if (splits > n / kSplitSelectMinSlice) splits = n / kSplitSelectMinSlice;
  return splits > 1 ? splits : 0;
}

inline int64_t split_select_workspace_bytes(int64_t rows) {
  return align_up(rows * int64_t{sizeof(SplitSelectRow)}, 256) +
         align_up(rows * int64_t{sizeof(SplitSelectHist)}, 256);
}

}  // namespace dspark
