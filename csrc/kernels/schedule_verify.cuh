// schedule_verify's CUDA kernel (core/schedule.h): one block ranks every
// candidate of the batch (a bitonic sort of (survival, id) pairs in the
// workspace, a total order, so the result is exact and deterministic), one
// thread counts the admissions in ranked order (tau is a sequential fp64 sum,
// as on the CPU), and the block tallies verify_len.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../core/schedule.h"

namespace dspark {

constexpr int kScheduleBlock = 1024;

// keys/ids: `slots` entries (a power of two >= R * G).
__global__ void __launch_bounds__(kScheduleBlock)
    schedule_verify_kernel(ScheduleArgs a, double* __restrict__ keys, int32_t* __restrict__ ids, int64_t slots) {
  __shared__ int64_t s_admit;
  __shared__ int64_t s_count;
  const int64_t G = a.group, RG = static_cast<int64_t>(a.num_requests) * G;
  if (threadIdx.x == 0) s_count = 0;
  __syncthreads();
  // Survivals, one thread per request (a sequential product, as on the CPU).
  int64_t local = 0;
  for (int64_t r = threadIdx.x; r < a.num_requests; r += kScheduleBlock) {
    const int32_t n = schedule_num_draft(a, r);
    double s = 1.0;
    for (int64_t j = 0; j < G; ++j) {
      if (j < n) s *= schedule_confidence(a, r, j);
      keys[r * G + j] = j < n ? s : -1.0;  // not a candidate: ranked after every survival >= 0
      ids[r * G + j] = static_cast<int32_t>(r * G + j);
    }
    local += n;
  }
  for (int64_t i = RG + threadIdx.x; i < slots; i += kScheduleBlock) {
    keys[i] = -1.0;
    ids[i] = static_cast<int32_t>(i);
  }
  atomicAdd(reinterpret_cast<unsigned long long*>(&s_count), static_cast<unsigned long long>(local));
  __syncthreads();
  // Bitonic sort into `schedule_before` order.
  for (int64_t k = 2; k <= slots; k <<= 1) {
    for (int64_t step = k >> 1; step > 0; step >>= 1) {
      for (int64_t i = threadIdx.x; i < slots; i += kScheduleBlock) {
        const int64_t p = i ^ step;
        if (p <= i) continue;
        const bool up = (i & k) == 0;
        const bool swap = up ? schedule_before(keys[p], ids[p], keys[i], ids[i])
                             : schedule_before(keys[i], ids[i], keys[p], ids[p]);
        if (swap) {
          const double tk = keys[i];
          keys[i] = keys[p];
          keys[p] = tk;
          const int32_t ti = ids[i];
          ids[i] = ids[p];
          ids[p] = ti;
        }
      }
      __syncthreads();
    }
  }
  if (threadIdx.x == 0) s_admit = schedule_admit_count(a, keys, s_count);
  for (int64_t r = threadIdx.x; r < a.num_requests; r += kScheduleBlock) a.verify_len[r] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < s_admit; i += kScheduleBlock) atomicAdd(&a.verify_len[ids[i] / G], 1);
}

// workspace: slots * 12 bytes (keys, then ids).
inline cudaError_t schedule_verify_launch(const ScheduleArgs& a, void* workspace, int64_t slots, cudaStream_t stream) {
  if (a.num_requests == 0) return cudaSuccess;
  auto* keys = static_cast<double*>(workspace);
  auto* ids = reinterpret_cast<int32_t*>(keys + slots);
  schedule_verify_kernel<<<1, kScheduleBlock, 0, stream>>>(a, keys, ids, slots);
  return cudaGetLastError();
}

}  // namespace dspark
