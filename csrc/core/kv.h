// KV-cache compaction (DESIGN §3 kv_compact): the per-layer byte geometry,
// the per-request validation and the entry addressing, shared by the CPU op
// and the CUDA kernel. Bytes are bytes: any element type (fp8 included).
#pragma once
#include <cstdint>

#include "macros.h"
#include "status.h"

namespace dspark {

// One cache tensor as bytes; 8 int64 fields so a layer table is a [L, 8]
// int64 tensor (dspark_ops.KVLayout builds it once).
struct KVLayer {
  int64_t ptr;         // base address
  int64_t r_stride;    // bytes between requests (contiguous layouts)
  int64_t s_stride;    // bytes between positions (paged: between pool slots)
  int64_t run_bytes;   // bytes of one contiguous run of an entry
  int64_t num_runs;    // runs per entry: H for heads-first [R, H, S, D], else 1
  int64_t run_stride;  // bytes between an entry's runs
  int64_t capacity;    // positions per request (contiguous) / block_size (paged)
  int64_t vec;         // copy width: the largest of 16, 8, 4, 2, 1 dividing every address and length
};
static_assert(sizeof(KVLayer) == 8 * sizeof(int64_t), "KVLayer is a [8] int64 row");

struct KVArgs {
  const KVLayer* layers;  // [L]
  int32_t num_layers;
  int32_t num_requests;        // R
  const int32_t* base_len;     // [R] read-only
  const int32_t* num_appended; // [R]
  const int32_t* keep_index;   // [R, k_max]
  int32_t k_max;
  const int32_t* num_keep;     // [R]
  const int32_t* block_table;  // [R, max_blocks] or nullptr (contiguous layouts)
  int32_t max_blocks;
  int32_t block_size;
  int64_t num_blocks;          // paged pool size
  int64_t min_capacity;        // contiguous: the smallest S over layers
  int32_t* new_len;            // [R] out
  int32_t* status;             // [R] out (nullptr: not written)
};

// The pool slot of position s of request r (paged), or -1 when the block
// table does not cover it.
DSPARK_HD int64_t kv_slot(const KVArgs& a, int64_t r, int64_t s) {
  const int64_t b = s / a.block_size;
  if (b < 0 || b >= a.max_blocks) return -1;
  const int64_t block = a.block_table[r * a.max_blocks + b];
  if (block < 0 || block >= a.num_blocks) return -1;
  return block * a.block_size + s % a.block_size;
}

// Status of request r's compaction: 0, kBadLengths or kBadIndex. Nothing is
// moved for a non-zero status.
DSPARK_HD int32_t kv_check(const KVArgs& a, int64_t r) {
  const int64_t base = a.base_len[r], appended = a.num_appended[r], keep = a.num_keep[r];
  if (base < 0 || appended < 0 || keep < 0 || keep > a.k_max || keep > appended) return kBadLengths;
  if (a.block_table == nullptr && base + appended > a.min_capacity) return kBadLengths;
  int64_t prev = -1;
  for (int64_t i = 0; i < keep; ++i) {
    const int64_t k = a.keep_index[r * a.k_max + i];
    if (k <= prev || k >= appended) return kBadIndex;  // strictly increasing, < num_appended
    prev = k;
    if (a.block_table != nullptr && (kv_slot(a, r, base + k) < 0 || kv_slot(a, r, base + i) < 0)) return kBadIndex;
  }
  return 0;
}

// Byte address of position s of request r in layer L (s valid).
DSPARK_HD char* kv_entry(const KVArgs& a, const KVLayer& L, int64_t r, int64_t s) {
  char* base = reinterpret_cast<char*>(L.ptr);
  if (a.block_table != nullptr) return base + kv_slot(a, r, s) * L.s_stride;
  return base + r * L.r_stride + s * L.s_stride;
}

}  // namespace dspark
