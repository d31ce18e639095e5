// kv_compact's CUDA kernel (DESIGN §3): every layer of every request in one
// launch. Block (request r, layer l) validates r (core/kv.h kv_check), then
// moves its kept entries with the widest aligned copies. Ranges may overlap
// (keep = [1, 2] moves entry 1 onto 0 and 2 onto 1): each round stages one
// byte slice of every kept entry in registers, synchronises, then writes, so
// every source is read before any destination of that slice is written;
// slices never alias each other, and entry batches go in ascending order
// (a source always lies at or after its destination).
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../core/kv.h"

namespace dspark {

constexpr int kKvBlock = 256;

template <typename U>
__device__ __forceinline__ void kv_move_layer(const KVArgs& a, const KVLayer& L, int64_t r, int64_t base,
                                              int64_t keep) {
  const int64_t units_per_run = L.run_bytes / static_cast<int64_t>(sizeof(U));
  const int64_t units = units_per_run * L.num_runs;  // per entry
  const int32_t* keep_index = a.keep_index + r * a.k_max;
  for (int64_t i0 = 0; i0 < keep; i0 += kKvBlock) {
    const int64_t batch = keep - i0 < kKvBlock ? keep - i0 : kKvBlock;
    const int64_t slice = kKvBlock / batch;  // units per entry per round, >= 1
    const int64_t i = i0 + threadIdx.x / slice;
    const int64_t k = threadIdx.x / slice < batch ? keep_index[i] : i;
    for (int64_t u0 = 0; u0 < units; u0 += slice) {
      const int64_t u = u0 + threadIdx.x % slice;
      const bool active = threadIdx.x / slice < batch && u < units && k != i;
      const int64_t off = (u / units_per_run) * L.run_stride + (u % units_per_run) * static_cast<int64_t>(sizeof(U));
      U v;
      if (active) v = *reinterpret_cast<const U*>(kv_entry(a, L, r, base + k) + off);
      __syncthreads();
      if (active) *reinterpret_cast<U*>(kv_entry(a, L, r, base + i) + off) = v;
      __syncthreads();
    }
  }
}

// Grid: R * L blocks, block b = (layer b / R, request b % R).
__global__ void __launch_bounds__(kKvBlock) kv_compact_kernel(KVArgs a) {
  __shared__ int32_t s_status;
  __shared__ int32_t s_moves;
  const int64_t r = blockIdx.x % a.num_requests, l = blockIdx.x / a.num_requests;
  if (threadIdx.x == 0) {
    const int32_t st = kv_check(a, r);
    int32_t moves = 0;
    if (st == 0) {
      for (int64_t i = 0; i < a.num_keep[r]; ++i) moves |= a.keep_index[r * a.k_max + i] != i;
    }
    s_status = st;
    s_moves = moves;
    if (l == 0) {  // one block per request writes the lengths
      a.new_len[r] = st == 0 ? a.base_len[r] + a.num_keep[r] : a.base_len[r];
      if (a.status) a.status[r] = st;
    }
  }
  __syncthreads();
  if (s_status != 0 || !s_moves) return;  // aborted, or already in place (a chain)
  const KVLayer L = a.layers[l];
  const int64_t base = a.base_len[r], keep = a.num_keep[r];
  switch (L.vec) {
    case 16: kv_move_layer<uint4>(a, L, r, base, keep); break;
    case 8: kv_move_layer<uint2>(a, L, r, base, keep); break;
    case 4: kv_move_layer<uint32_t>(a, L, r, base, keep); break;
    case 2: kv_move_layer<uint16_t>(a, L, r, base, keep); break;
    default: kv_move_layer<uint8_t>(a, L, r, base, keep);
  }
}

inline cudaError_t kv_compact_launch(const KVArgs& a, cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(a.num_requests) * a.num_layers;
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  kv_compact_kernel<<<static_cast<unsigned>(blocks), kKvBlock, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace dspark
