// Per-request status bits (DESIGN §2). Mirrored by dspark_ops.Status in
// Python; tests/test_status.py checks that the two agree.
#pragma once
#include <cstdint>

namespace dspark {

enum Status : int32_t {
  kStatusOk = 0,
  kTokenOutOfRange = 1,   // flag: a draft token < 0 or >= V
  kNonfiniteLogits = 2,   // abort: NaN or +inf in a needed row
  kBadLengths = 4,        // abort: bad offsets, lengths, slots or row starts
  kDraftProbZero = 8,     // flag: a drafted token has q = 0
  kAllMasked = 16,        // abort: the masks left no token
  kBadTree = 32,          // abort: malformed tree
  kBadIndex = 64,         // abort: keep index or block-table entry out of range
};

constexpr int32_t kAbortMask = kNonfiniteLogits | kBadLengths | kAllMasked | kBadTree | kBadIndex;

}  // namespace dspark
