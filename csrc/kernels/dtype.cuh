// Element loads for the logits types the kernels take (fp32, fp16, bf16).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace dspark {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

}  // namespace dspark

namespace dspark {

// Decoding the raw 16 bits of a 2-byte logit (keeps vector loads in plain
// integer registers; the __half / __nv_bfloat16 classes made ptxas spill).
__device__ __forceinline__ float bits_to_float(uint16_t b, const __half*) {
  return __half2float(__ushort_as_half(b));
}
__device__ __forceinline__ float bits_to_float(uint16_t b, const __nv_bfloat16*) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

// Four consecutive logits as floats: one 8- or 16-byte load when `p` is
// aligned to 4 elements and all four exist, element loads otherwise.
__device__ __forceinline__ void load4(const float* p, int count, bool aligned, float (&l)[4]) {
  if (aligned && count == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    l[0] = v.x, l[1] = v.y, l[2] = v.z, l[3] = v.w;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) l[j] = j < count ? p[j] : 0.0f;
  }
}

template <typename T>  // __half or __nv_bfloat16
__device__ __forceinline__ void load4(const T* p, int count, bool aligned, float (&l)[4]) {
  static_assert(sizeof(T) == 2, "2-byte logits");
  const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
  if (aligned && count == 4) {
    const uint2 v = *reinterpret_cast<const uint2*>(q);
    l[0] = bits_to_float(static_cast<uint16_t>(v.x & 0xFFFFu), p);
    l[1] = bits_to_float(static_cast<uint16_t>(v.x >> 16), p);
    l[2] = bits_to_float(static_cast<uint16_t>(v.y & 0xFFFFu), p);
    l[3] = bits_to_float(static_cast<uint16_t>(v.y >> 16), p);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) l[j] = j < count ? bits_to_float(q[j], p) : 0.0f;
  }
}

}  // namespace dspark

namespace dspark {

// Store v in the logits' type (round to nearest even) and return the stored
// value as a float: what a later reader of *p sees.
__device__ __forceinline__ float store_rounded(float* p, float v) {
  *p = v;
  return v;
}
__device__ __forceinline__ float store_rounded(__half* p, float v) {
  const __half h = __float2half_rn(v);
  *p = h;
  return __half2float(h);
}
__device__ __forceinline__ float store_rounded(__nv_bfloat16* p, float v) {
  const __nv_bfloat16 h = __float2bfloat16_rn(v);
  *p = h;
  return __bfloat162float(h);
}

// v rounded to the logits' type: the stored bits and the value they read back as.
__device__ __forceinline__ uint16_t round_bits(float v, const __half*, float& back) {
  const __half h = __float2half_rn(v);
  back = __half2float(h);
  return __half_as_ushort(h);
}
__device__ __forceinline__ uint16_t round_bits(float v, const __nv_bfloat16*, float& back) {
  const __nv_bfloat16 h = __float2bfloat16_rn(v);
  back = __bfloat162float(h);
  return __bfloat16_as_ushort(h);
}

// Four consecutive entries p[0..count) stored rounded, as one 16- or 8-byte
// store when p is aligned to 4 entries and all four exist; `back` gets the
// stored values (store_rounded for each, in one instruction).
__device__ __forceinline__ void store4_rounded(float* p, int count, bool aligned, const float (&v)[4],
                                               float (&back)[4]) {
  if (aligned && count == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
#pragma unroll
    for (int j = 0; j < 4; ++j) back[j] = v[j];
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) back[j] = j < count ? store_rounded(p + j, v[j]) : 0.0f;
  }
}
template <typename T>  // __half or __nv_bfloat16
__device__ __forceinline__ void store4_rounded(T* p, int count, bool aligned, const float (&v)[4],
                                               float (&back)[4]) {
  if (aligned && count == 4) {
    uint16_t b[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = round_bits(v[j], p, back[j]);
    *reinterpret_cast<uint2*>(p) = make_uint2(b[0] | (static_cast<uint32_t>(b[1]) << 16),
                                              b[2] | (static_cast<uint32_t>(b[3]) << 16));
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) back[j] = j < count ? store_rounded(p + j, v[j]) : 0.0f;
  }
}

}  // namespace dspark

namespace dspark {

// The floats of one 16-byte vector of logits (4 fp32 or 8 fp16/bf16).
template <typename T>
struct Vec16 {
  static constexpr int kLen = 16 / sizeof(T);
};

__device__ __forceinline__ void unpack16(const uint4& v, const float*, float (&x)[4]) {
  x[0] = __uint_as_float(v.x), x[1] = __uint_as_float(v.y), x[2] = __uint_as_float(v.z), x[3] = __uint_as_float(v.w);
}
template <typename T>  // __half or __nv_bfloat16
__device__ __forceinline__ void unpack16(const uint4& v, const T* p, float (&x)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    x[2 * j] = bits_to_float(static_cast<uint16_t>(w[j] & 0xFFFFu), p);
    x[2 * j + 1] = bits_to_float(static_cast<uint16_t>(w[j] >> 16), p);
  }
}

// Calls f(i, float(row[i])) once for every i in [0, n), spread over the
// block: 16-byte vector loads, kUnroll of them in flight per thread (a row
// pass by one block is latency-bound otherwise), scalar loads for the
// unaligned head and the tail. Each thread sees consecutive runs; the order
// across threads is unspecified, so only order-free work (counts, max, an
// argmax with index ties, OR) may go in f.
template <int kBlock, typename T, typename F>
__device__ __forceinline__ void block_row_each_indexed(const T* __restrict__ row, int64_t n, F&& f) {
  constexpr int kLen = Vec16<T>::kLen, kUnroll = 4;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  int64_t head = addr % sizeof(T) != 0 ? n : static_cast<int64_t>((16 - addr % 16) % 16 / sizeof(T));
  if (head > n) head = n;
  for (int64_t i = threadIdx.x; i < head; i += kBlock) f(i, to_float(row[i]));
  const int64_t nvec = (n - head) / kLen;
  const uint4* __restrict__ vrow = reinterpret_cast<const uint4*>(row + head);
  int64_t v = threadIdx.x;
  for (; v + (kUnroll - 1) * kBlock < nvec; v += kUnroll * kBlock) {
    uint4 buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) buf[u] = vrow[v + u * kBlock];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float x[kLen];
      unpack16(buf[u], row, x);
#pragma unroll
      for (int j = 0; j < kLen; ++j) f(head + (v + u * kBlock) * kLen + j, x[j]);
    }
  }
  for (; v < nvec; v += kBlock) {
    float x[kLen];
    unpack16(vrow[v], row, x);
#pragma unroll
    for (int j = 0; j < kLen; ++j) f(head + v * kLen + j, x[j]);
  }
  for (int64_t i = head + nvec * kLen + threadIdx.x; i < n; i += kBlock) f(i, to_float(row[i]));
}

// block_row_each_indexed without the index: f(float(row[i])).
template <int kBlock, typename T, typename F>
__device__ __forceinline__ void block_row_each(const T* __restrict__ row, int64_t n, F&& f) {
  block_row_each_indexed<kBlock>(row, n, [&](int64_t, float x) { f(x); });
}

// This thread's groups of 4 entries in [begin, end) of a row: the group at
// begin + 4 * threadIdx.x, then every 4 * kBlock entries after it, passed to
// f(i, l[4], count) in that increasing order -- the order the softmax sums
// of verify_chunk's stats kernel and verify_tree's walk are defined by, so
// their per-chunk results stay bit-identical -- with the loads of kInFlight
// groups issued before the first of them is offered (a chunk pass is
// latency-bound otherwise). count < 4 only at the row's end.
constexpr int kChunkInFlight = 4;
template <int kBlock, int kInFlight, typename T, typename F>
__device__ __forceinline__ void chunk_groups_each(const T* __restrict__ row, int64_t begin, int64_t end, bool aligned,
                                                  F&& f) {
  constexpr int64_t kStride = 4 * kBlock;
  for (int64_t i0 = begin + 4 * threadIdx.x; i0 < end; i0 += kInFlight * kStride) {
    float l[kInFlight][4];
    int count[kInFlight];
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      const int64_t i = i0 + k * kStride;
      count[k] = i < end ? (end - i < 4 ? static_cast<int>(end - i) : 4) : 0;
      if (count[k] > 0) load4(row + i, count[k], aligned, l[k]);
    }
#pragma unroll
    for (int k = 0; k < kInFlight; ++k)
      if (count[k] > 0) f(i0 + k * kStride, l[k], count[k]);
  }
}

}  // namespace dspark
