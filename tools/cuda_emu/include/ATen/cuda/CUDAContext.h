// Emulator stand-in for ATen/cuda/CUDAContext.h: the current stream (none)
// and the device properties the bindings read, for an emulated H100 unless
// DSPARK_EMU_SMS names another multiprocessor count.
#pragma once
#include <cstdlib>

#include "cuda_emu/intrinsics.h"

namespace at::cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(signed char = -1) { return {}; }

struct DeviceProp {
  int multiProcessorCount;
  int maxThreadsPerBlock;
  int warpSize;
  int major;  // compute capability: 9.0, an H100
  int minor;
};

inline DeviceProp* getCurrentDeviceProperties() {
  static thread_local DeviceProp p;
  const char* sms = std::getenv("DSPARK_EMU_SMS");
  p = DeviceProp{sms ? std::atoi(sms) : 132, 1024, 32, 9, 0};
  return &p;
}

}  // namespace at::cuda
