// Portability macros for code that both the host compiler and nvcc build.
#pragma once

#if defined(__CUDACC__)
#define DSPARK_HD __host__ __device__ __forceinline__
#else
#define DSPARK_HD inline
#endif

// Full unrolling of short fixed loops in device code (a no-op on the host).
#if defined(__CUDA_ARCH__)
#define DSPARK_UNROLL _Pragma("unroll")
#else
#define DSPARK_UNROLL
#endif
