// Cooperative fibers for the CUDA emulator: one stack per emulated thread,
// switched by a few instructions (x86-64 System V only). A fiber runs until
// it waits at a barrier (yield back to the block's scheduler) or returns.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#if !defined(__x86_64__)
#error "the CUDA emulator's fibers are written for x86-64"
#endif

extern "C" void cuemu_switch(void** save_sp, void* load_sp);
extern "C" void cuemu_fiber_entry();

namespace cuemu {

struct Fiber {
  void* sp = nullptr;       // saved stack pointer while switched out
  char* stack = nullptr;    // owned, kStackBytes
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  bool done = true;
};

constexpr std::size_t kStackBytes = 256 * 1024;

// Prepare `f` to run body(arg) on its own stack at the next switch into it.
void fiber_start(Fiber& f, void (*body)(void*), void* arg);
// Run `f` until it yields or finishes; returns on the scheduler's stack.
void fiber_resume(Fiber& f);
// From inside a fiber: back to the scheduler.
void fiber_yield();

}  // namespace cuemu
