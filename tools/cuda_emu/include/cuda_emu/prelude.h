// Included first in every translation unit of the emulated build: the CUDA
// bindings register their kernels for CPU tensors under the op namespace
// dspark_emu (the real ops stay dspark_ops), so one process can compare the
// emulated CUDA path with the CPU ops.
#pragma once
#include <torch/library.h>

#include "intrinsics.h"

#undef TORCH_LIBRARY
#define TORCH_LIBRARY(ns, m)                                                                               \
  static void TORCH_LIBRARY_init_dspark_emu(torch::Library&);                                              \
  static const torch::detail::TorchLibraryInit TORCH_LIBRARY_static_init_dspark_emu(                       \
      torch::Library::DEF, &TORCH_LIBRARY_init_dspark_emu, "dspark_emu", std::nullopt, __FILE__, __LINE__); \
  void TORCH_LIBRARY_init_dspark_emu(torch::Library& m)

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(dspark_emu, CPU, m, C10_UID)
