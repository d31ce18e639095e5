// The SGLang peer of bench/tree_bench.py: SGLang's own JIT speculative
// kernels (sglang/kernels/jit/csrc/speculative/{sampling,tree}.cuh from the
// sglang wheel, packed by tools/pack_sglang.py, never committed here),
// exported through tvm-ffi exactly as SGLang's JIT loader exports them
// (its generated wrapper: TVM_FFI_DLL_EXPORT_TYPED_FUNC of the same entry
// points), so the benchmark times SGLang's kernels, not a re-implementation.
// Built on the GPU machine by bench/sglang_peer.py.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include "speculative/sampling.cuh"
#include "speculative/tree.cuh"

namespace sglang {
// sglang.kernels.ops.speculative.sampling picks VecSize = gcd(4, V) and deterministic=True by default.
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sample_vec4, (tree_speculative_sampling_target_only<4, true>));
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sample_vec2, (tree_speculative_sampling_target_only<2, true>));
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sample_vec1, (tree_speculative_sampling_target_only<1, true>));
TVM_FFI_DLL_EXPORT_TYPED_FUNC(verify_tree_greedy, (verify_tree_greedy));
}  // namespace sglang
