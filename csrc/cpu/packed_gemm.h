// y[M, N] = r[M, N] + x[M, K] @ W^T for the few rows of a decode or verify
// pass on a CPU, with W packed once as [ceil(N/64), K, 64] (column group g
// holds columns 64g..64g+63, K-major, zero padding past N). Torch-free.
//
// Why: on this project's CPUs a 6-row GEMM through MKL ran at a third of the
// core's peak (it packs the weight on every call; on AMD it takes a generic
// path), so a 6-token verify pass cost 2-3x a 1-token decode step. Here a
// tile of up to 6 rows x 64 columns keeps 24 accumulators in registers and
// streams each weight group once, contiguously.
//
// Every output element is r + sum_k x[m,k] * W[n,k], accumulated by fused
// multiply-adds in k order from r (0 without a residual): the same bits
// whatever M is, whichever tile a row lands in and whichever path (AVX-512,
// AVX2 for CPUs without AVX-512, or the portable one) runs it. So a verify
// pass computes exactly the logits a decode step of the same token would
// (batch invariance).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define DSPARK_PACKED_GEMM_X86 1  // the AVX-512 and AVX2 paths are compiled
#endif

namespace dspark {

constexpr int64_t kPackWidth = 64;  // columns per packed group: 4 AVX-512 vectors
constexpr int64_t kTileRows = 6;    // rows per tile: 6 x 4 accumulators + 4 weights + 1 broadcast of 32 registers

struct PackedGemmArgs {
  const float* x;  // [M, K], row stride ldx
  int64_t ldx;
  const float* w;  // [G, K, 64] packed weight
  const float* r;  // [M, N] residual (row stride N) or nullptr
  float* y;        // [M, N], row stride N
  int64_t M, N, K;
};

// Rows m0..m0+rows-1 of column group g, portable: std::fma in k order, as the
// vector path does per lane.
inline void packed_tile_portable(const PackedGemmArgs& a, int64_t g, int64_t m0, int64_t rows) {
  const int64_t c0 = g * kPackWidth;
  const int64_t cols = a.N - c0 < kPackWidth ? a.N - c0 : kPackWidth;
  const float* wg = a.w + g * a.K * kPackWidth;
  for (int64_t m = m0; m < m0 + rows; ++m) {
    const float* xm = a.x + m * a.ldx;
    for (int64_t c = 0; c < cols; ++c) {
      float acc = a.r != nullptr ? a.r[m * a.N + c0 + c] : 0.0f;
      for (int64_t k = 0; k < a.K; ++k) acc = std::fma(xm[k], wg[k * kPackWidth + c], acc);
      a.y[m * a.N + c0 + c] = acc;
    }
  }
}

#ifdef DSPARK_PACKED_GEMM_X86
template <int Rows>
__attribute__((target("avx512f"))) inline void packed_tile_avx512(const PackedGemmArgs& a, int64_t g, int64_t m0) {
  const int64_t c0 = g * kPackWidth;
  const int64_t cols = a.N - c0 < kPackWidth ? a.N - c0 : kPackWidth;
  __mmask16 mask[4];
  for (int v = 0; v < 4; ++v) {
    const int64_t c = cols - 16 * v;
    mask[v] = c >= 16 ? static_cast<__mmask16>(0xFFFF) : c <= 0 ? 0 : static_cast<__mmask16>((1u << c) - 1);
  }
  __m512 acc[Rows][4];
  for (int m = 0; m < Rows; ++m)
    for (int v = 0; v < 4; ++v)
      acc[m][v] = a.r != nullptr ? _mm512_maskz_loadu_ps(mask[v], a.r + (m0 + m) * a.N + c0 + 16 * v)
                                 : _mm512_setzero_ps();
  const float* wg = a.w + g * a.K * kPackWidth;
  const float* x0 = a.x + m0 * a.ldx;
  for (int64_t k = 0; k < a.K; ++k) {
    const float* wk = wg + k * kPackWidth;
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);
    const __m512 w2 = _mm512_loadu_ps(wk + 32), w3 = _mm512_loadu_ps(wk + 48);
#pragma GCC unroll 6
    for (int m = 0; m < Rows; ++m) {
      const __m512 xb = _mm512_set1_ps(x0[m * a.ldx + k]);
      acc[m][0] = _mm512_fmadd_ps(xb, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(xb, w1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(xb, w2, acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(xb, w3, acc[m][3]);
    }
  }
  for (int m = 0; m < Rows; ++m)
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(a.y + (m0 + m) * a.N + c0 + 16 * v, mask[v], acc[m][v]);
}

// Rows [m0, m1) of column group g, in tiles of kTileRows.
__attribute__((target("avx512f"))) inline void packed_block_avx512(const PackedGemmArgs& a, int64_t g, int64_t m0,
                                                                  int64_t m1) {
  for (; m0 < m1; m0 += kTileRows) {
    switch (m1 - m0 < kTileRows ? m1 - m0 : kTileRows) {
      case 1: packed_tile_avx512<1>(a, g, m0); break;
      case 2: packed_tile_avx512<2>(a, g, m0); break;
      case 3: packed_tile_avx512<3>(a, g, m0); break;
      case 4: packed_tile_avx512<4>(a, g, m0); break;
      case 5: packed_tile_avx512<5>(a, g, m0); break;
      default: packed_tile_avx512<6>(a, g, m0); break;
    }
  }
}

// AVX2 + FMA (16 registers): rows m0..m0+Rows-1 of half h (32 columns) of
// group g, Rows x 4 accumulators; the weights are FMA memory operands.
template <int Rows>
__attribute__((target("avx2,fma"))) inline void packed_tile_avx2(const PackedGemmArgs& a, int64_t g, int64_t h,
                                                                 int64_t m0) {
  const int64_t c0 = g * kPackWidth + 32 * h;
  const int64_t cols = a.N - c0 < 32 ? a.N - c0 : 32;
  __m256i mask[4];
  for (int v = 0; v < 4; ++v) {
    const int64_t c = cols - 8 * v;
    const int n = c >= 8 ? 8 : c <= 0 ? 0 : static_cast<int>(c);
    mask[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  __m256 acc[Rows][4];
  for (int m = 0; m < Rows; ++m)
    for (int v = 0; v < 4; ++v)
      acc[m][v] = a.r != nullptr ? _mm256_maskload_ps(a.r + (m0 + m) * a.N + c0 + 8 * v, mask[v])
                                 : _mm256_setzero_ps();
  const float* wg = a.w + g * a.K * kPackWidth + 32 * h;
  const float* x0 = a.x + m0 * a.ldx;
  for (int64_t k = 0; k < a.K; ++k) {
    const float* wk = wg + k * kPackWidth;
#pragma GCC unroll 3
    for (int m = 0; m < Rows; ++m) {
      const __m256 xb = _mm256_set1_ps(x0[m * a.ldx + k]);
      for (int v = 0; v < 4; ++v) acc[m][v] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(wk + 8 * v), acc[m][v]);
    }
  }
  for (int m = 0; m < Rows; ++m)
    for (int v = 0; v < 4; ++v) _mm256_maskstore_ps(a.y + (m0 + m) * a.N + c0 + 8 * v, mask[v], acc[m][v]);
}

__attribute__((target("avx2,fma"))) inline void packed_block_avx2(const PackedGemmArgs& a, int64_t g, int64_t m0,
                                                                  int64_t m1) {
  for (int64_t h = 0; h < 2 && g * kPackWidth + 32 * h < a.N; ++h) {
    for (int64_t m = m0; m < m1; m += 3) {
      switch (m1 - m < 3 ? m1 - m : 3) {
        case 1: packed_tile_avx2<1>(a, g, h, m); break;
        case 2: packed_tile_avx2<2>(a, g, h, m); break;
        default: packed_tile_avx2<3>(a, g, h, m); break;
      }
    }
  }
}

inline bool packed_gemm_has_avx512() { return __builtin_cpu_supports("avx512f"); }
inline bool packed_gemm_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
inline bool packed_gemm_has_avx512() { return false; }
inline bool packed_gemm_has_avx2() { return false; }
#endif

enum class PackedGemmPath { kPortable, kAvx2, kAvx512 };

// The path packed_linear takes: the widest the CPU has, unless
// DSPARK_PACKED_LINEAR names a narrower one ("avx2", "portable"; tests
// compare the paths bit for bit). The environment is read at each call.
inline PackedGemmPath packed_gemm_path() {
  const char* v = std::getenv("DSPARK_PACKED_LINEAR");
  if (v != nullptr && std::strcmp(v, "portable") == 0) return PackedGemmPath::kPortable;
  const bool want_avx2 = v != nullptr && std::strcmp(v, "avx2") == 0;
  if (!want_avx2 && packed_gemm_has_avx512()) return PackedGemmPath::kAvx512;
  return packed_gemm_has_avx2() ? PackedGemmPath::kAvx2 : PackedGemmPath::kPortable;
}

inline const char* packed_gemm_path_name(PackedGemmPath p) {
  return p == PackedGemmPath::kAvx512 ? "avx512" : p == PackedGemmPath::kAvx2 ? "avx2" : "portable";
}

// Work items for threads: column group x block of kBlockRows rows, item i =
// (group i / row_blocks, row block i % row_blocks), so a thread's run of
// items reuses a group's weights from cache. Long inputs (prefills) then
// spread over the threads even when N has few groups.
constexpr int64_t kBlockRows = 8 * kTileRows;

inline int64_t packed_gemm_row_blocks(int64_t M) { return (M + kBlockRows - 1) / kBlockRows; }

// Items [i0, i1) on the given path.
inline void packed_gemm_items(const PackedGemmArgs& a, int64_t i0, int64_t i1, PackedGemmPath path) {
  const int64_t row_blocks = packed_gemm_row_blocks(a.M);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t g = i / row_blocks, m0 = (i % row_blocks) * kBlockRows;
    const int64_t m1 = m0 + kBlockRows < a.M ? m0 + kBlockRows : a.M;
#ifdef DSPARK_PACKED_GEMM_X86
    if (path == PackedGemmPath::kAvx512) {
      packed_block_avx512(a, g, m0, m1);
      continue;
    }
    if (path == PackedGemmPath::kAvx2) {
      packed_block_avx2(a, g, m0, m1);
      continue;
    }
#endif
    packed_tile_portable(a, g, m0, m1 - m0);
  }
}

}  // namespace dspark
