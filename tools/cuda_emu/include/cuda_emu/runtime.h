// The CUDA emulator's execution model: a kernel launch runs its blocks one
// after another (in a seeded random order), and a block's threads as fibers
// that switch only where CUDA lets threads wait for each other: barriers,
// warp shuffles and votes. Between two such points a fiber runs alone, so
// the order in which fibers reach a barrier (shuffled every round) decides
// what a read of another thread's unsynchronised write sees: a missing
// __syncthreads or __syncwarp shows as results that change with the seed.
//
// Checked, and reported as a C++ exception from the launch: threads waiting
// at different __syncthreads, a barrier that can never complete (deadlock),
// overlapping but different shuffle masks, a shuffle reading a lane outside
// the mask or one that exited, and an invalid launch configuration (as
// cudaGetLastError).
// Shared memory reads NaN / -1 (0xFF bytes) until written in each block.
// Not modelled: memory ordering between blocks (blocks run in sequence).
#pragma once
#include <cstdint>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "fiber.h"
#include "types.h"

namespace cuemu {

struct ThreadState {
  uint3 idx;
  int warp = 0;
  int lane = 0;
  bool released = false;    // the warp exchange this thread waits at has completed
  unsigned snap_lanes = 0;  // the lanes whose words `snap` holds
  uint64_t snap[32] = {};   // this thread's copy of the completed exchange's words
};

// One shuffle / vote / __syncwarp in flight: the lanes of `mask` that have
// arrived and their words. Disjoint masks may be in flight at once.
struct Exchange {
  unsigned mask = 0;
  unsigned arrived = 0;
  uint64_t slots[32] = {};
};

struct WarpState {
  std::vector<Exchange> open;
  unsigned exited = 0;  // lanes that have returned (a mask may name them, CUDA ignores them)
  unsigned present = 0;  // lanes that exist (a partial last warp has fewer)
};

struct BlockState {
  int live = 0;     // threads not yet returned
  int arrived = 0;  // at the current __syncthreads
  unsigned gen = 0;
  const char* site_file = nullptr;  // the __syncthreads the current arrivals wait at
  int site_line = 0;
  int acc_and[2] = {1, 1}, acc_or[2] = {0, 0}, acc_count[2] = {0, 0};
  std::vector<WarpState> warps;
  ThreadState* threads = nullptr;
  long progress = 0;  // arrivals and exits: a round without any is a deadlock
  std::string error;  // set by a fiber that found a bug; the launch throws it
  std::set<const void*> poisoned;  // shared variables filled since the block began

  // Release the current __syncthreads once every running thread is at it
  // (threads that returned do not count, as on Volta and later).
  void release_if_complete() {
    if (arrived > 0 && arrived == live) arrived = 0, ++gen;
  }
};

// The emulated thread's coordinates (thread_local: the emulator runs on the
// calling host thread).
extern thread_local ThreadState* g_thread;
extern thread_local BlockState* g_block;
extern thread_local uint3 g_block_idx;
extern thread_local dim3 g_block_dim;
extern thread_local dim3 g_grid_dim;

// Record a bug found inside a fiber and park the fiber for good.
[[noreturn]] void fail(const std::string& what);

// Run every block of the launch `name`; throws std::runtime_error on a bug.
void run_grid(const char* name, dim3 grid, dim3 block, void (*thread_body)(void*), void* ctx);

// The sticky error of the last launch (cudaGetLastError clears it).
extern thread_local cudaError_t g_last_error;

// __syncthreads{,_and,_or,_count} at file:line (what: 0 and, 1 or, 2 count).
// Every thread still running must reach the same one.
int block_barrier(int pred, int what, const char* file, int line);

// Publish `word` to the lanes of `mask` and wait for the mask's lanes that
// have not exited; returns this thread's copy of every arrived lane's word
// (g_thread->snap_lanes says which).
const uint64_t* warp_exchange(unsigned mask, uint64_t word, const char* op);

// The first thread of a block to reach a __shared__ declaration fills the
// variable with 0xFF bytes (the build adds the call after each declaration).
inline void poison_shared(const void* p, std::size_t bytes) {
  if (g_block->poisoned.insert(p).second) std::memset(const_cast<void*>(p), 0xFF, bytes);
}

template <typename T>
inline uint64_t to_word(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move up to 8 bytes");
  uint64_t w = 0;
  std::memcpy(&w, &v, sizeof(T));
  return w;
}

template <typename T>
inline T from_word(uint64_t w) {
  T v;
  std::memcpy(&v, &w, sizeof(T));
  return v;
}

template <typename T>
inline T shfl_from(unsigned mask, T v, int src, const char* op) {
  const uint64_t* slots = warp_exchange(mask, to_word(v), op);
  if (!(g_thread->snap_lanes >> src & 1u))
    fail(std::string(op) + ": lane " + std::to_string(g_thread->lane) + " reads lane " + std::to_string(src) +
         (mask >> src & 1u ? ", which has exited" : ", outside the mask"));
  return from_word<T>(slots[src]);
}

// Count a launch of the kernel `name` (for tests that check which path ran).
void record_launch(const char* name);
std::map<std::string, int64_t>& launch_counts();

// A launch `k<<<grid, block, smem, stream>>>(args...)`, rewritten by the
// emulator's build as
// `cuemu::Launch(grid, block, smem, stream).named("k")(k, args...)`.
struct Launch {
  dim3 grid, block;
  const char* name = "kernel";
  Launch(dim3 g, dim3 b, std::size_t = 0, cudaStream_t = nullptr) : grid(g), block(b) {}
  Launch& named(const char* n) {
    name = n;
    return *this;
  }

  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), A&&... args) const {
    std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...>* params;
    } ctx{kernel, &params};
    run_grid(name, grid, block, [](void* c) {
      auto* x = static_cast<Ctx*>(c);
      std::apply(x->kernel, *x->params);  // each thread its own copies of the arguments
    }, &ctx);
  }
};

}  // namespace cuemu
