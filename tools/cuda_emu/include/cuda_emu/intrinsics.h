// CUDA's device built-ins for the emulator: execution-space keywords as
// no-ops, thread coordinates, barriers, warp shuffles and votes (through
// runtime.h's fibers), atomics (plain: one fiber runs at a time), bit casts,
// integer intrinsics and the 16-bit float conversions (round to nearest
// even, CUDA's canonical NaNs).
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static  // blocks run one at a time: one copy serves each block in turn
#define __constant__

#define threadIdx (::cuemu::g_thread->idx)
#define blockIdx (::cuemu::g_block_idx)
#define blockDim (::cuemu::g_block_dim)
#define gridDim (::cuemu::g_grid_dim)
constexpr int warpSize = 32;

// Macros, so that each barrier knows its call site (threads of a block must meet at the same one).
#define __syncthreads() ::cuemu::block_barrier(1, 0, __FILE__, __LINE__)
#define __syncthreads_and(p) ::cuemu::block_barrier((p), 0, __FILE__, __LINE__)
#define __syncthreads_or(p) ::cuemu::block_barrier((p), 1, __FILE__, __LINE__)
#define __syncthreads_count(p) ::cuemu::block_barrier((p), 2, __FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) { ::cuemu::warp_exchange(mask, 0, "__syncwarp"); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = ::cuemu::g_thread->lane;
  return ::cuemu::shfl_from(mask, v, (lane & ~(width - 1)) + (src & (width - 1)), "__shfl_sync");
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::cuemu::g_thread->lane;
  const int src = lane ^ lane_mask;  // PTX shfl.bfly: a lane may read a lower segment, not a higher one
  return ::cuemu::shfl_from(mask, v, src <= (lane | (width - 1)) ? src : lane, "__shfl_xor_sync");
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::cuemu::g_thread->lane;
  const int src = lane - static_cast<int>(delta);
  return ::cuemu::shfl_from(mask, v, src >= (lane & ~(width - 1)) ? src : lane, "__shfl_up_sync");
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::cuemu::g_thread->lane;
  const int src = lane + static_cast<int>(delta);
  return ::cuemu::shfl_from(mask, v, src < (lane & ~(width - 1)) + width ? src : lane, "__shfl_down_sync");
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  const uint64_t* slots = ::cuemu::warp_exchange(mask, pred != 0, "__ballot_sync");
  unsigned out = 0;  // exited lanes named in the mask vote 0
  for (int l = 0; l < 32; ++l) out |= (::cuemu::g_thread->snap_lanes >> l & 1u) && slots[l] ? 1u << l : 0u;
  return out;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  return __ballot_sync(mask, pred) == (mask & ::cuemu::g_thread->snap_lanes);
}

// Atomics: one fiber runs at a time, so a read-modify-write is atomic.
// Integer ones wrap around, as on the device (no signed-overflow UB here).
template <typename T, typename F>
inline T cuemu_rmw(T* p, F f) {
  const T old = *p;
  *p = f(old);
  return old;
}
template <typename T>
inline T cuemu_wrap(T a, T b, bool sub) {
  if constexpr (std::is_integral_v<T>) {
    using U = std::make_unsigned_t<T>;
    return static_cast<T>(sub ? static_cast<U>(a) - static_cast<U>(b) : static_cast<U>(a) + static_cast<U>(b));
  } else {
    return sub ? a - b : a + b;
  }
}
template <typename T>
inline T atomicAdd(T* p, T v) { return cuemu_rmw(p, [v](T o) { return cuemu_wrap(o, v, false); }); }
template <typename T>
inline T atomicSub(T* p, T v) { return cuemu_rmw(p, [v](T o) { return cuemu_wrap(o, v, true); }); }
template <typename T>
inline T atomicMax(T* p, T v) { return cuemu_rmw(p, [v](T o) { return o < v ? v : o; }); }
template <typename T>
inline T atomicMin(T* p, T v) { return cuemu_rmw(p, [v](T o) { return v < o ? v : o; }); }
template <typename T>
inline T atomicOr(T* p, T v) { return cuemu_rmw(p, [v](T o) { return static_cast<T>(o | v); }); }
template <typename T>
inline T atomicAnd(T* p, T v) { return cuemu_rmw(p, [v](T o) { return static_cast<T>(o & v); }); }
template <typename T>
inline T atomicExch(T* p, T v) { return cuemu_rmw(p, [v](T) { return v; }); }
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) { return cuemu_rmw(p, [cmp, v](T o) { return o == cmp ? v : o; }); }

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline T __ldca(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline void __stcg(T* p, T v) { *p = v; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }

// Rounded single operations (never fused): the emulator's host build does not contract either.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }

inline unsigned __float_as_uint(float v) { return std::bit_cast<unsigned>(v); }
inline float __uint_as_float(unsigned v) { return std::bit_cast<float>(v); }
inline int __float_as_int(float v) { return std::bit_cast<int>(v); }
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
inline long long __double_as_longlong(double v) { return std::bit_cast<long long>(v); }
inline double __longlong_as_double(long long v) { return std::bit_cast<double>(v); }

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(v)); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= (v >> i & 1u) << (31 - i);
  return r;
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }

// Device code calls min/max unqualified on mixed integer types.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

inline float __half2float(__half h) {
  const _Float16 f = std::bit_cast<_Float16>(h.__x);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  if (std::isnan(v)) return __half{0x7FFF};  // CUDA's canonical NaN
  return __half{std::bit_cast<uint16_t>(static_cast<_Float16>(v))};
}
inline __half __float2half(float v) { return __float2half_rn(v); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }

inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<uint32_t>(b.__x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  if (std::isnan(v)) return __nv_bfloat16{0x7FFF};  // CUDA's canonical NaN
  const uint32_t u = __float_as_uint(v);
  return __nv_bfloat16{static_cast<uint16_t>((u + 0x7FFFu + (u >> 16 & 1u)) >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float v) { return __float2bfloat16_rn(v); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::cuemu::g_last_error;
  ::cuemu::g_last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return ::cuemu::g_last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
  }
}
inline cudaError_t cudaMemsetAsync(void* p, int v, std::size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int v, std::size_t n) { return cudaMemsetAsync(p, v, n); }
