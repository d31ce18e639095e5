// schedule_verify's CUDA kernels (core/schedule.h). early_stop, budget and
// global: one block ranks every candidate of the batch (a bitonic sort of
// (survival, id) pairs, a total order, so the result is exact and
// deterministic), one thread counts the admissions in ranked order (tau is a
// sequential fp64 sum, as on the CPU), and the block tallies verify_len. Up
// to kScheduleSharedSlots slots the sort runs in shared memory; beyond, in
// the workspace, with the steps within a tile of that size in shared memory.
// threshold needs no ranking: a thread per request.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../core/schedule.h"

namespace dspark {

constexpr int kScheduleBlock = 1024;
// 2048 slots (R * G <= 2048, e.g. 256 requests x 7 drafts): keys, ids and the
// SPS values of the admission loop in 40 KB of shared memory.
constexpr int64_t kScheduleSharedSlots = 2 * kScheduleBlock;

// Survivals of every candidate into keys/ids (ids = r * G + j), -1 after a
// request's num_draft and in the padding up to `slots`; returns the number of
// candidates (all threads).
__device__ __forceinline__ int64_t schedule_fill(const ScheduleArgs& a, double* keys, int32_t* ids, int64_t slots,
                                                 unsigned long long* count) {
  const int64_t G = a.group, RG = static_cast<int64_t>(a.num_requests) * G;
  if (threadIdx.x == 0) *count = 0;
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
  atomicAdd(count, static_cast<unsigned long long>(local));
  __syncthreads();
  return static_cast<int64_t>(*count);
}

// Steps step_hi down to step_lo (powers of two) of the bitonic sort's stage
// k over `len` slots at keys/ids, the sort's slots base .. base + len - 1
// (all threads; a barrier after each step). A step compares len / 2
// disjoint pairs, i and i + step with i's bit `step` clear, into
// `schedule_before` order, ascending or descending by the sort-wide slot's
// bit k.
__device__ __forceinline__ void schedule_sort_steps(double* keys, int32_t* ids, int64_t len, int64_t base, int64_t k,
                                                    int64_t step_hi, int64_t step_lo) {
  for (int64_t step = step_hi; step >= step_lo; step >>= 1) {
    for (int64_t t = threadIdx.x; t < len / 2; t += kScheduleBlock) {
      const int64_t i = ((t & ~(step - 1)) << 1) | (t & (step - 1)), p = i + step;
      const bool up = ((base + i) & k) == 0;
      const double ki = keys[i], kp = keys[p];
      const int32_t ii = ids[i], ip = ids[p];
      if (up ? schedule_before(kp, ip, ki, ii) : schedule_before(ki, ii, kp, ip)) {
        keys[i] = kp;
        keys[p] = ki;
        ids[i] = ip;
        ids[p] = ii;
      }
    }
    __syncthreads();
  }
}

// Bitonic sort of `slots` (a power of two) pairs in one array (all threads).
__device__ __forceinline__ void schedule_sort(double* keys, int32_t* ids, int64_t slots) {
  for (int64_t k = 2; k <= slots; k <<= 1) schedule_sort_steps(keys, ids, slots, 0, k, k >> 1, 1);
}

// The same sort of `slots` > kScheduleSharedSlots pairs in the workspace:
// every step shorter than a tile of kScheduleSharedSlots runs on the tile
// in shared memory (t_keys/t_ids), tile after tile; only the longer steps
// (5 stages x 1..5 steps at 65536 slots, against 136 steps in all) go
// through global memory.
__device__ __forceinline__ void schedule_sort_tiled(double* keys, int32_t* ids, int64_t slots, double* t_keys,
                                                    int32_t* t_ids) {
  constexpr int64_t T = kScheduleSharedSlots;
  const auto tiles = [&](int64_t k_lo, int64_t k_hi) {  // stages k_lo..k_hi, their steps below T, on each tile
    for (int64_t base = 0; base < slots; base += T) {
      for (int64_t i = threadIdx.x; i < T; i += kScheduleBlock) {
        t_keys[i] = keys[base + i];
        t_ids[i] = ids[base + i];
      }
      __syncthreads();
      for (int64_t k = k_lo; k <= k_hi; k <<= 1)
        schedule_sort_steps(t_keys, t_ids, T, base, k, (k < T ? k : T) >> 1, 1);
      for (int64_t i = threadIdx.x; i < T; i += kScheduleBlock) {
        keys[base + i] = t_keys[i];
        ids[base + i] = t_ids[i];
      }
      __syncthreads();  // every thread's copy-out is visible before the global steps and the admission read it
    }
  };
  tiles(2, T);
  for (int64_t k = 2 * T; k <= slots; k <<= 1) {
    schedule_sort_steps(keys, ids, slots, 0, k, k >> 1, T);
    tiles(k, k);
  }
}

// verify_len from the first `admit` ranked ids (all threads; verify_len was
// zeroed before the caller's last barrier).
__device__ __forceinline__ void schedule_tally(const ScheduleArgs& a, const int32_t* ids, int64_t admit) {
  for (int64_t i = threadIdx.x; i < admit; i += kScheduleBlock) atomicAdd(&a.verify_len[ids[i] / a.group], 1);
}

__device__ __forceinline__ void schedule_zero_lengths(const ScheduleArgs& a) {
  for (int64_t r = threadIdx.x; r < a.num_requests; r += kScheduleBlock) a.verify_len[r] = 0;
}

// Up to kScheduleSharedSlots slots: everything in shared memory.
__global__ void __launch_bounds__(kScheduleBlock) schedule_verify_shared_kernel(ScheduleArgs a, int64_t slots) {
  __shared__ double s_keys[kScheduleSharedSlots];
  __shared__ int32_t s_ids[kScheduleSharedSlots];
  __shared__ double s_sps[kScheduleSharedSlots];  // s_sps[i]: the rate with candidate i admitted
  __shared__ unsigned long long s_count;
  __shared__ int64_t s_admit;
  const int64_t N = schedule_fill(a, s_keys, s_ids, slots, &s_count);
  for (int64_t i = threadIdx.x; i < N; i += kScheduleBlock) s_sps[i] = schedule_sps_admitted(a, i);
  __syncthreads();
  schedule_sort(s_keys, s_ids, slots);
  if (threadIdx.x == 0) s_admit = schedule_admit_count(a, s_keys, N, [&](int64_t i) { return s_sps[i]; });
  schedule_zero_lengths(a);
  __syncthreads();
  schedule_tally(a, s_ids, s_admit);
}

// keys/ids: `slots` (a power of two > kScheduleSharedSlots) entries of the
// workspace.
__global__ void __launch_bounds__(kScheduleBlock)
    schedule_verify_kernel(ScheduleArgs a, double* __restrict__ keys, int32_t* __restrict__ ids, int64_t slots) {
  __shared__ double t_keys[kScheduleSharedSlots];
  __shared__ int32_t t_ids[kScheduleSharedSlots];
  __shared__ unsigned long long s_count;
  __shared__ int64_t s_admit;
  const int64_t N = schedule_fill(a, keys, ids, slots, &s_count);
  schedule_sort_tiled(keys, ids, slots, t_keys, t_ids);
  if (threadIdx.x == 0) {
    s_admit = schedule_admit_count(a, keys, N, [&](int64_t i) { return schedule_sps_admitted(a, i); });
  }
  schedule_zero_lengths(a);
  __syncthreads();
  schedule_tally(a, ids, s_admit);
}

// threshold: a thread per request (core/schedule.h: schedule_threshold_len).
constexpr int kScheduleThresholdBlock = 256;
__global__ void __launch_bounds__(kScheduleThresholdBlock) schedule_threshold_kernel(ScheduleArgs a) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kScheduleThresholdBlock + threadIdx.x;
  if (r < a.num_requests) a.verify_len[r] = schedule_threshold_len(a, r);
}

// Whether the launch uses its workspace: slots * 12 bytes (keys, then ids),
// only past kScheduleSharedSlots slots and not in threshold mode.
inline bool schedule_uses_workspace(int32_t mode, int64_t slots) {
  return mode != kThreshold && slots > kScheduleSharedSlots;
}

inline cudaError_t schedule_verify_launch(const ScheduleArgs& a, void* workspace, int64_t slots, cudaStream_t stream) {
  if (a.num_requests == 0) return cudaSuccess;
  if (a.mode == kThreshold) {
    const int64_t blocks = (int64_t{a.num_requests} + kScheduleThresholdBlock - 1) / kScheduleThresholdBlock;
    schedule_threshold_kernel<<<static_cast<unsigned>(blocks), kScheduleThresholdBlock, 0, stream>>>(a);
  } else if (!schedule_uses_workspace(a.mode, slots)) {
    schedule_verify_shared_kernel<<<1, kScheduleBlock, 0, stream>>>(a, slots);
  } else {
    auto* keys = static_cast<double*>(workspace);
    auto* ids = reinterpret_cast<int32_t*>(keys + slots);
    schedule_verify_kernel<<<1, kScheduleBlock, 0, stream>>>(a, keys, ids, slots);
  }
  return cudaGetLastError();
}

}  // namespace dspark
