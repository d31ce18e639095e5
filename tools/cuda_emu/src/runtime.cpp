// The CUDA emulator's scheduler: fibers, blocks in a seeded order, threads
// shuffled every round, deadlock and misuse reports. See runtime.h.
#include "cuda_emu/runtime.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <stdexcept>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// cuemu_switch(save, load): push the callee-saved registers and the MXCSR
// and x87 control words (also callee-saved), store the stack pointer in
// *save, continue on the stack `load` (a stack cuemu_switch left, or one
// fiber_start prepared to "return" into cuemu_fiber_entry).
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
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
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

// Complete every exchange of warp `wi` whose lanes that have not exited have
// all arrived: each arrived lane gets its own copy of the words.
void complete_exchanges(BlockState& b, int wi) {
  WarpState& w = b.warps[wi];
  for (std::size_t i = 0; i < w.open.size();) {
    Exchange& e = w.open[i];
    if ((e.mask & ~w.exited & ~e.arrived) != 0 || e.arrived == 0) {
      ++i;
      continue;
    }
    for (int l = 0; l < 32; ++l) {
      if (!(e.arrived >> l & 1u)) continue;
      ThreadState& t = b.threads[wi * 32 + l];
      std::memcpy(t.snap, e.slots, sizeof(t.snap));
      t.snap_lanes = e.arrived;
      t.released = true;
    }
    w.open.erase(w.open.begin() + static_cast<std::ptrdiff_t>(i));
  }
}

}  // namespace
}  // namespace cuemu

extern "C" void cuemu_fiber_main(cuemu::Fiber* f) {
  cuemu::asan_landed(nullptr, true);
  f->body(f->arg);
  f->done = true;
  cuemu::BlockState& b = *cuemu::g_block;
  const cuemu::ThreadState& t = *cuemu::g_thread;
  --b.live;
  ++b.progress;
  b.release_if_complete();                 // an exited thread leaves __syncthreads
  b.warps[t.warp].exited |= 1u << t.lane;  // and the warp's exchanges
  cuemu::complete_exchanges(b, t.warp);
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
  // From the top (16-byte aligned): the entry as return address, six
  // registers for cuemu_switch to pop (r12 = the fiber), and the caller's
  // MXCSR and x87 control word.
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t{15});
  uint64_t* sp = top - 8;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = mxcsr | uint64_t{fpucw} << 32;
  sp[1] = 0;                                               // r15
  sp[2] = 0;                                               // r14
  sp[3] = 0;                                               // r13
  sp[4] = reinterpret_cast<uint64_t>(&f);                  // r12
  sp[5] = 0;                                               // rbx
  sp[6] = 0;                                               // rbp
  sp[7] = reinterpret_cast<uint64_t>(&cuemu_fiber_entry);  // return address
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

int block_barrier(int pred, int what, const char* file, int line) {
  BlockState& b = *g_block;
  const unsigned gen = b.gen;
  const int p = gen & 1;
  if (b.arrived == 0) {
    b.acc_and[p] = 1, b.acc_or[p] = 0, b.acc_count[p] = 0;
    b.site_file = file, b.site_line = line;
  } else if (b.site_line != line || std::strcmp(b.site_file, file) != 0) {
    fail("threads of one block wait at different __syncthreads: " + std::string(b.site_file) + ":" +
         std::to_string(b.site_line) + " and " + file + ":" + std::to_string(line));
  }
  b.acc_and[p] &= pred != 0;
  b.acc_or[p] |= pred != 0;
  b.acc_count[p] += pred != 0;
  ++b.arrived;
  ++b.progress;
  b.release_if_complete();
  while (b.gen == gen) fiber_yield();
  return what == 0 ? b.acc_and[p] : what == 1 ? b.acc_or[p] : b.acc_count[p];
}

const uint64_t* warp_exchange(unsigned mask, uint64_t word, const char* op) {
  ThreadState& t = *g_thread;
  BlockState& b = *g_block;
  WarpState& w = b.warps[t.warp];
  if (!(mask >> t.lane & 1u))
    fail(std::string(op) + ": lane " + std::to_string(t.lane) + " calls it with a mask that excludes itself");
  if (mask & ~w.present) fail(std::string(op) + ": the mask names lanes this (partial) warp does not have");
  Exchange* e = nullptr;
  for (Exchange& o : w.open) {
    if (o.mask == mask) {
      e = &o;
    } else if (o.mask & mask) {
      fail(std::string(op) + ": lanes of warp " + std::to_string(t.warp) + " disagree on the mask");
    }
  }
  if (e == nullptr) {
    w.open.emplace_back();
    e = &w.open.back();
    e->mask = mask;
  }
  e->slots[t.lane] = word;
  e->arrived |= 1u << t.lane;
  ++b.progress;
  complete_exchanges(b, t.warp);
  while (!t.released) fiber_yield();
  t.released = false;
  return t.snap;
}

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

void run_grid(const char* name, dim3 grid, dim3 block, void (*thread_body)(void*), void* ctx) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7FFFFFFFu ||
      threads == 0 || threads > 1024 || block.z > 64) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  record_launch(name);
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
    for (uint64_t wi = 0; wi < bs.warps.size(); ++wi) {
      const uint64_t n = std::min<uint64_t>(32, threads - 32 * wi);
      bs.warps[wi].present = n == 32 ? 0xFFFFFFFFu : (1u << n) - 1u;
    }
    bs.threads = states.data();
    g_block = &bs;
    for (uint64_t t = 0; t < threads; ++t) {
      ThreadState& s = states[t];
      s.idx = uint3{static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                    static_cast<unsigned>(t / (uint64_t{block.x} * block.y))};
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
        std::size_t open = 0;
        for (const WarpState& w : bs.warps) open += w.open.size();
        bs.error = "deadlock: " + std::to_string(bs.live) + " of " + std::to_string(threads) +
                   " threads wait at barriers that cannot complete (" + std::to_string(bs.arrived) +
                   " at __syncthreads, " + std::to_string(open) + " warp exchanges open)";
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
