// Kernels with known bugs (and their fixed twins) that the emulator must
// catch, registered as dspark_emu::emu_selftest(case, seed) for
// tests/test_cuda_emulated.py: proof that its checks can fail.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <torch/library.h>

#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "csrc/kernels/block_reduce.cuh"

namespace cuemu_selftest {

constexpr int kThreads = 64;

// Each thread reads its neighbour's shared-memory slot; `sync` orders the
// write before the read. Without it the value read depends on the schedule.
__global__ void neighbour_kernel(int32_t* out, bool sync) {
  __shared__ int32_t slot[kThreads];
  const int t = threadIdx.x;
  slot[t] = 1000 * (blockIdx.x + 1) + t;
  if (sync) __syncthreads();
  out[blockIdx.x * kThreads + t] = slot[(t + 1) % kThreads];
}

// Lanes 16..31 return; lanes 0..15 then read them in a full-mask shuffle
// (legal to name exited lanes in the mask, undefined to read one).
__global__ void exited_lanes_kernel(int32_t* out) {
  const int lane = threadIdx.x & 31;
  if (lane >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, lane, 16);
}

// Lanes 0..15 wait in a full-mask shuffle for lanes 16..31, which wait at
// __syncthreads for lanes 0..15: a hang on a GPU.
__global__ void divergent_wait_kernel(int32_t* out) {
  const int lane = threadIdx.x & 31;
  if (lane < 16) {
    out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, lane, 1);
  } else {
    __syncthreads();
  }
}

// Warp 0 and warp 1 wait at different __syncthreads.
__global__ void divergent_barriers_kernel(int32_t* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Legal: the two half-warps shuffle among themselves with disjoint masks.
__global__ void disjoint_masks_kernel(int32_t* out) {
  const int lane = threadIdx.x & 31;
  const unsigned mask = lane < 16 ? 0x0000FFFFu : 0xFFFF0000u;
  out[threadIdx.x] = __shfl_xor_sync(mask, 100 + lane, 1);
}

// Legal: after a full-warp shuffle, lanes 0..15 run two more among
// themselves before lane 16 reads its result of the first.
__global__ void slow_reader_kernel(int32_t* out) {
  const int lane = threadIdx.x & 31;
  int v = __shfl_up_sync(0xFFFFFFFFu, 100 + lane, 1);
  if (lane < 16) {
    v += __shfl_sync(0x0000FFFFu, 1000, 0) + __shfl_sync(0x0000FFFFu, 2000, 0);
  }
  out[threadIdx.x] = v;
}

// The two half-warps name different masks for one shuffle.
__global__ void mask_mismatch_kernel(int32_t* out) {
  const int lane = threadIdx.x & 31;
  const unsigned mask = lane < 16 ? 0x0000FFFFu : 0xFFFFFFFFu;
  out[threadIdx.x] = __shfl_xor_sync(mask, lane, 1);
}

// A correct block-wide sum (block_reduce.cuh) of 0..255 in every block.
__global__ void block_sum_kernel(int32_t* out) {
  __shared__ int32_t scratch[256 / 32];
  const int32_t s = dspark::block_reduce<256>(static_cast<int32_t>(threadIdx.x), [](int32_t a, int32_t b) {
    return a + b;
  }, scratch, 0);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

__global__ void noop_kernel(int32_t*) {}

// Reads a shared variable no thread of this block wrote.
__global__ void unwritten_shared_kernel(int32_t* out) {
  __shared__ int32_t s_value;
  if (blockIdx.x == 0 && threadIdx.x == 0) s_value = 7;
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = s_value;
}

// One element past the end of a global buffer of n, or of a shared array:
// what AddressSanitizer (CUEMU_ASAN=1) must report.
__global__ void global_overrun_kernel(int32_t* out, int64_t n) {
  if (threadIdx.x == 0) out[0] = out[n];
}
__global__ void shared_overrun_kernel(int32_t* out) {
  __shared__ int32_t slot[kThreads];
  slot[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = slot[threadIdx.x + 1];
}

// One warp multiplies A (a[i][k] = i + k) by B (b[k][j] = k - 2j) with WMMA
// onto an accumulator of ones, stores it to shared memory, and each lane
// copies out the entries after its own (entry e + 1: another lane stored
// it). `sync` puts a __syncwarp between the store and the reads; without it
// a lane may read entries not yet stored (0xFF bytes).
struct alignas(32) WmmaTiles {
  __half a[256];
  __half b[256];
  float d[256];
};
__global__ void wmma_kernel(int32_t* out, bool sync) {
  namespace wm = nvcuda::wmma;
  __shared__ WmmaTiles s;
  const int lane = threadIdx.x & 31;
  for (int e = lane; e < 256; e += 32) {
    s.a[e] = __float2half_rn(static_cast<float>(e / 16 + e % 16));
    s.b[e] = __float2half_rn(static_cast<float>(e / 16 - 2 * (e % 16)));
  }
  __syncwarp();
  wm::fragment<wm::matrix_a, 16, 16, 16, __half, wm::row_major> a;
  wm::fragment<wm::matrix_b, 16, 16, 16, __half, wm::row_major> b;
  wm::fragment<wm::accumulator, 16, 16, 16, float> d;
  wm::fill_fragment(d, 1.0f);
  wm::load_matrix_sync(a, s.a, 16);
  wm::load_matrix_sync(b, s.b, 16);
  wm::mma_sync(d, a, b, d);
  wm::store_matrix_sync(s.d, d, 16, wm::mem_row_major);
  if (sync) __syncwarp();
  for (int e = lane; e < 256; e += 32) out[e] = __float_as_int(s.d[(e + 1) % 256]);
}

// Lanes 16..31 return before the warp's mma_sync.
__global__ void wmma_divergent_kernel(int32_t* out) {
  namespace wm = nvcuda::wmma;
  const int lane = threadIdx.x & 31;
  if (lane >= 16) return;
  wm::fragment<wm::accumulator, 16, 16, 16, float> d;
  wm::fragment<wm::matrix_a, 16, 16, 16, __half, wm::row_major> a;
  wm::fragment<wm::matrix_b, 16, 16, 16, __half, wm::row_major> b;
  wm::fill_fragment(d, 0.0f);
  wm::fill_fragment(a, 1.0f);
  wm::fill_fragment(b, 1.0f);
  wm::mma_sync(d, a, b, d);
  out[lane] = 1;
}

// Each half-warp loads its own tile: one warp-wide load, two pointers.
__global__ void wmma_two_tiles_kernel(int32_t* out) {
  namespace wm = nvcuda::wmma;
  __shared__ WmmaTiles s;
  const int lane = threadIdx.x & 31;
  for (int e = lane; e < 256; e += 32) s.a[e] = __float2half_rn(1.0f);
  __syncwarp();
  wm::fragment<wm::matrix_a, 16, 16, 16, __half, wm::row_major> a;
  wm::load_matrix_sync(a, lane < 16 ? s.a : s.b, 16);
  out[lane] = 1;
}

at::Tensor emu_selftest(std::string which, int64_t seed) {
  setenv("CUEMU_SEED", std::to_string(seed).c_str(), 1);
  const int blocks = 3;
  at::Tensor out = at::zeros({blocks * 256}, at::TensorOptions().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  if (which == "race" || which == "synced") {
    neighbour_kernel<<<blocks, kThreads>>>(o, which == "synced");
  } else if (which == "exited_lanes") {
    exited_lanes_kernel<<<1, 32>>>(o);
  } else if (which == "divergent_wait") {
    divergent_wait_kernel<<<1, 32>>>(o);
  } else if (which == "divergent_barriers") {
    divergent_barriers_kernel<<<1, 64>>>(o);
  } else if (which == "disjoint_masks") {
    disjoint_masks_kernel<<<1, 32>>>(o);
  } else if (which == "slow_reader") {
    slow_reader_kernel<<<1, 32>>>(o);
  } else if (which == "mask_mismatch") {
    mask_mismatch_kernel<<<1, 32>>>(o);
  } else if (which == "block_sum") {
    block_sum_kernel<<<blocks, 256>>>(o);
  } else if (which == "unwritten_shared") {
    unwritten_shared_kernel<<<blocks, 32>>>(o);
  } else if (which == "global_overrun") {
    global_overrun_kernel<<<1, 32>>>(o, out.numel());
  } else if (which == "shared_overrun") {
    shared_overrun_kernel<<<1, kThreads>>>(o);
  } else if (which == "wmma_synced" || which == "wmma_race") {
    wmma_kernel<<<1, 32>>>(o, which == "wmma_synced");
  } else if (which == "wmma_divergent") {
    wmma_divergent_kernel<<<1, 32>>>(o);
  } else if (which == "wmma_two_tiles") {
    wmma_two_tiles_kernel<<<1, 32>>>(o);
  } else if (which == "zero_blocks") {
    noop_kernel<<<0, 32>>>(o);
  } else if (which == "too_many_threads") {
    noop_kernel<<<1, 2048>>>(o);
  } else {
    TORCH_CHECK_VALUE(false, "emu_selftest: unknown case '", which, "'");
  }
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "emu_selftest: launch failed: ", cudaGetErrorString(err));
  return out;
}

// Every kernel launched since the last reset, as "name count" lines.
std::vector<std::string> emu_launches(bool reset) {
  std::vector<std::string> out;
  for (const auto& [name, n] : cuemu::launch_counts()) out.push_back(name + " " + std::to_string(n));
  if (reset) cuemu::launch_counts().clear();
  return out;
}

}  // namespace cuemu_selftest

TORCH_LIBRARY_FRAGMENT(dspark_emu, m) {
  m.def("emu_selftest(str which, int seed) -> Tensor", &cuemu_selftest::emu_selftest);
  m.def("emu_launches(bool reset) -> str[]", &cuemu_selftest::emu_launches);
}
