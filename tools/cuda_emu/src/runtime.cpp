// The CUDA emulator's scheduler: fibers, blocks in a seeded order, threads
// shuffled every round, deadlock and misuse reports. See runtime.h.
#include "cuda_emu/runtime.h"

#include <algorithm>
#include <map>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <stdexcept>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// cuemu_switch(save, load): push the callee-saved registers, store the stack
// pointer in *save, continue on the stack `load` (a stack cuemu_switch left,
// or one fiber_start prepared to "return" into cuemu_fiber_entry).
asm(R"(
.text
.globl cuemu_switch
.type cuemu_switch,@function
cuemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuemu_switch, .-cuemu_switch

.globl cuemu_fiber_entry
.type cuemu_fiber_entry,@function
cuemu_fiber_entry:
  movq %r12, %rdi
  call cuemu_fiber_main
  ud2
.size cuemu_fiber_entry, .-cuemu_fiber_entry
)");

namespace cuemu {

thread_local ThreadState* g_thread = nullptr;
thread_local BlockState* g_block = nullptr;
thread_local uint3 g_block_idx{0, 0, 0};
thread_local dim3 g_block_dim;
thread_local dim3 g_grid_dim;
thread_local cudaError_t g_last_error = cudaSuccess;

namespace {

thread_local void* t_scheduler_sp = nullptr;
thread_local Fiber* t_current = nullptr;

// AddressSanitizer must be told about every stack switch (else it reports
// the fibers' frames as overflows); without it these are no-ops.
#if defined(__SANITIZE_ADDRESS__)
thread_local const void* t_scheduler_bottom = nullptr;
thread_local std::size_t t_scheduler_size = 0;
inline void asan_enter_fiber(const Fiber& f, void** fake) {
  __sanitizer_start_switch_fiber(fake, f.stack, kStackBytes);
}
inline void asan_leave_fiber(void** fake) { __sanitizer_start_switch_fiber(fake, t_scheduler_bottom, t_scheduler_size); }
inline void asan_landed(void* fake, bool in_fiber) {
  if (in_fiber) {
    __sanitizer_finish_switch_fiber(fake, &t_scheduler_bottom, &t_scheduler_size);
  } else {
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
  }
}
#else
inline void asan_enter_fiber(const Fiber&, void**) {}
inline void asan_leave_fiber(void**) {}
inline void asan_landed(void*, bool) {}
#endif

}  // namespace

}  // namespace cuemu

extern "C" void cuemu_fiber_main(cuemu::Fiber* f) {
  cuemu::asan_landed(nullptr, true);
  f->body(f->arg);
  f->done = true;
  cuemu::BlockState& b = *cuemu::g_block;
  --b.live;
  ++b.progress;
  if (b.arrived > 0 && b.arrived == b.live) b.arrived = 0, ++b.gen;  // exited threads leave __syncthreads
  cuemu::fiber_yield();
  std::abort();  // a finished fiber is never resumed
}

namespace cuemu {

void fiber_start(Fiber& f, void (*body)(void*), void* arg) {
  if (f.stack == nullptr) f.stack = static_cast<char*>(std::malloc(kStackBytes));
  if (f.stack == nullptr) throw std::bad_alloc();
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);  // frames of an abandoned fiber are not this one's
#endif
  f.body = body;
  f.arg = arg;
  f.done = false;
  // From the top (16-byte aligned): the entry as return address, then six
  // registers for cuemu_switch to pop, r12 = the fiber.
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t{15});
  uint64_t* sp = top - 7;
  sp[0] = 0;                                          // r15
  sp[1] = 0;                                          // r14
  sp[2] = 0;                                          // r13
  sp[3] = reinterpret_cast<uint64_t>(&f);             // r12
  sp[4] = 0;                                          // rbx
  sp[5] = 0;                                          // rbp
  sp[6] = reinterpret_cast<uint64_t>(&cuemu_fiber_entry);  // return address
  f.sp = sp;
}

void fiber_resume(Fiber& f) {
  t_current = &f;
  void* fake = nullptr;
  asan_enter_fiber(f, &fake);
  cuemu_switch(&t_scheduler_sp, f.sp);
  asan_landed(fake, false);
  t_current = nullptr;
}

void fiber_yield() {
  Fiber* self = t_current;
  void* fake = nullptr;
  asan_leave_fiber(self->done ? nullptr : &fake);  // a finished fiber's stack is dead
  cuemu_switch(&self->sp, t_scheduler_sp);
  asan_landed(fake, true);
}

std::map<std::string, int64_t>& launch_counts() {
  static std::map<std::string, int64_t> counts;
  return counts;
}

void record_launch(const char* name) { ++launch_counts()[name]; }

void fail(const std::string& what) {
  if (g_block->error.empty()) g_block->error = what;
  for (;;) fiber_yield();
}

namespace {

struct Pool {
  std::vector<Fiber> fibers;
  ~Pool() {
    for (Fiber& f : fibers) std::free(f.stack);
  }
};

uint64_t schedule_seed() {
  const char* s = std::getenv("CUEMU_SEED");
  return s ? std::strtoull(s, nullptr, 10) : 0;
}

uint64_t g_launches = 0;

}  // namespace

void run_grid(dim3 grid, dim3 block, void (*thread_body)(void*), void* ctx) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7FFFFFFFu ||
      threads == 0 || threads > 1024 || block.z > 64) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  static thread_local Pool pool;
  if (pool.fibers.size() < threads) pool.fibers.resize(threads);
  std::vector<ThreadState> states(threads);
  // CUEMU_SEED=0 keeps the natural orders; any other value shuffles blocks
  // and each round's threads, differently for every launch.
  const uint64_t seed = schedule_seed();
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + g_launches++);
  const uint64_t nblocks = uint64_t{grid.x} * grid.y * grid.z;
  std::vector<uint64_t> block_order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) block_order[i] = i;
  if (seed != 0) std::shuffle(block_order.begin(), block_order.end(), rng);
  std::vector<int> order(threads);
  g_grid_dim = grid;
  g_block_dim = block;
  for (const uint64_t bi : block_order) {
    g_block_idx = uint3{static_cast<unsigned>(bi % grid.x), static_cast<unsigned>(bi / grid.x % grid.y),
                        static_cast<unsigned>(bi / (uint64_t{grid.x} * grid.y))};
    BlockState bs;
    bs.live = static_cast<int>(threads);
    bs.warps.resize((threads + 31) / 32);
    g_block = &bs;
    for (uint64_t t = 0; t < threads; ++t) {
      ThreadState& s = states[t];
      s.idx = uint3{static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                    static_cast<unsigned>(t / (uint64_t{block.x} * block.y))};
      s.linear = static_cast<int>(t);
      s.warp = static_cast<int>(t / 32);
      s.lane = static_cast<int>(t % 32);
      fiber_start(pool.fibers[t], thread_body, ctx);
      order[t] = static_cast<int>(t);
    }
    while (bs.live > 0) {
      const long before = bs.progress;
      if (seed != 0) std::shuffle(order.begin(), order.end(), rng);
      for (const int t : order) {
        Fiber& f = pool.fibers[t];
        if (f.done) continue;
        g_thread = &states[t];
        fiber_resume(f);
        if (!bs.error.empty()) break;
      }
      if (bs.error.empty() && bs.live > 0 && bs.progress == before) {
        bs.error = "deadlock: " + std::to_string(bs.live) + " of " + std::to_string(threads) +
                   " threads wait at a barrier that cannot complete (" + std::to_string(bs.arrived) +
                   " at __syncthreads)";
      }
      if (!bs.error.empty()) {
        g_block = nullptr;
        g_thread = nullptr;
        char where[96];
        std::snprintf(where, sizeof(where), " [block (%u,%u,%u) of a %u-thread launch]", g_block_idx.x,
                      g_block_idx.y, g_block_idx.z, static_cast<unsigned>(threads));
        throw std::runtime_error("cuda_emu: " + bs.error + where);
      }
    }
    g_block = nullptr;
    g_thread = nullptr;
  }
}

}  // namespace cuemu
