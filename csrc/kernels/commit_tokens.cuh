// commit_tokens' CUDA kernel: one thread per request (core/commit.h).
#pragma once
#include <cuda_runtime.h>

#include "../core/commit.h"

namespace dspark {

constexpr int kCommitBlock = 128;

__global__ void __launch_bounds__(kCommitBlock) commit_tokens_kernel(CommitArgs a) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kCommitBlock + threadIdx.x;
  if (r < a.num_requests) commit_request(a, r);
}

inline cudaError_t commit_tokens_launch(const CommitArgs& a, cudaStream_t stream) {
  if (a.num_requests == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((a.num_requests + kCommitBlock - 1) / kCommitBlock);
  commit_tokens_kernel<<<blocks, kCommitBlock, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace dspark
