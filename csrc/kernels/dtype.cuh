// Element loads for the logits types the kernels take (fp32, fp16, bf16).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace dspark {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

}  // namespace dspark
