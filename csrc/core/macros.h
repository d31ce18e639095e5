// Portability macros for code that both the host compiler and nvcc build.
#pragma once

#if defined(__CUDACC__)
#define DSPARK_HD __host__ __device__ __forceinline__
#else
#define DSPARK_HD inline
#endif
