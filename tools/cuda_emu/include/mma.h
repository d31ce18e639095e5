// CUDA's WMMA API (nvcuda::wmma, 16 x 16 x 16 tiles of fp16/bf16 with fp32
// accumulators) for the emulator. A fragment holds its whole tile in every
// lane (a real one spreads it over the warp in an opaque layout, which a
// kernel must not rely on: it may only fill, load, multiply and store whole
// fragments, and elementwise ops over num_elements work either way). Every
// call is warp-synchronous like its CUDA namesake: the whole warp must reach
// it, loads and stores with one pointer, leading dimension and layout
// (both checked). mma_sync adds the 16 products of each entry to the
// accumulator in ascending k, each product exact and each sum rounded in
// fp32: what the CPU ops' ascending loops compute (the tensor cores sum in
// their own order). store_matrix_sync writes only the entries this lane
// owns (entry e: lane e % 32), so reading another lane's entries without a
// __syncwarp shows as a schedule-dependent result, as on a GPU.
#pragma once
#include <string>

#include "cuda_emu/intrinsics.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "cuda_emu: WMMA m16n16k16 only");
  static constexpr int num_elements = 256;
  float x[256];  // row-major [16][16]: A [m][k], B [k][n], accumulator [m][n]
};

namespace detail {
// The whole warp reaches the call, every lane with the same `same` (a
// load's or store's pointer, leading dimension and layout: one tile, which
// the warp loads or stores together).
inline void whole_warp(const char* op, uint64_t same = 0) {
  const uint64_t* slots = ::cuemu::warp_exchange(0xFFFFFFFFu, same, op);
  const int lane = ::cuemu::g_thread->lane;
  if (::cuemu::g_thread->snap_lanes != 0xFFFFFFFFu)
    ::cuemu::fail(std::string(op) + ": lane " + std::to_string(lane) + " called it without the whole warp");
  for (int l = 0; l < 32; ++l)
    if (slots[l] != slots[lane])
      ::cuemu::fail(std::string(op) + ": lanes " + std::to_string(l) + " and " + std::to_string(lane) +
                    " passed different pointers, leading dimensions or layouts");
}
inline uint64_t tile_id(const void* p, unsigned ldm, int layout) {
  return reinterpret_cast<uintptr_t>(p) * 1000003u ^ (uint64_t{ldm} << 1 | static_cast<uint64_t>(layout));
}
inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }
}  // namespace detail

template <typename Use, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float v) {
  for (float& e : f.x) e = v;
}

// A [m][k] or B [k][n] from p with leading dimension ldm (entries).
template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "cuda_emu: an accumulator load needs a layout");
  detail::whole_warp("wmma::load_matrix_sync", detail::tile_id(p, ldm, 0));
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm % (16 / sizeof(T)) != 0)
    ::cuemu::fail("wmma::load_matrix_sync: the pointer must be 32-byte aligned and ldm a multiple of 16 bytes");
  constexpr bool row = std::is_same_v<Layout, row_major>;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[16 * i + j] = detail::as_float(row ? p[i * ldm + j] : p[j * ldm + i]);
}

template <typename TA, typename TB, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  detail::whole_warp("wmma::mma_sync");
  float out[256];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.x[16 * m + n];
      for (int k = 0; k < 16; ++k) s = __fadd_rn(s, __fmul_rn(a.x[16 * m + k], b.x[16 * k + n]));
      out[16 * m + n] = s;
    }
  for (int e = 0; e < 256; ++e) d.x[e] = out[e];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::whole_warp("wmma::store_matrix_sync", detail::tile_id(p, ldm, layout));
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm % 4 != 0)
    ::cuemu::fail("wmma::store_matrix_sync: the pointer must be 32-byte aligned and ldm a multiple of 16 bytes");
  for (int e = ::cuemu::g_thread->lane; e < 256; e += 32) {
    const int m = e / 16, n = e % 16;
    p[layout == mem_row_major ? m * ldm + n : n * ldm + m] = f.x[e];
  }
}

}  // namespace wmma
}  // namespace nvcuda
