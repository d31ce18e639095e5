// Every schema of the dspark_ops library, once. Backends register their
// kernels in csrc/cpu/*.cpp and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "core/sample_args.h"

// `import dspark_ops._C` runs the registrations below; the module itself is
// empty (ops are reached as torch.ops.dspark_ops.*).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace dspark {

// Scratch bytes an op's CUDA kernels need for the given sizes (0 on the CPU
// is fine too: the CPU ops allocate their own).
int64_t workspace_bytes(std::string op, int64_t num_requests, int64_t vocab) {
  TORCH_CHECK_VALUE(num_requests >= 0 && vocab >= 1, "dspark_ops.workspace_size: need num_requests >= 0 and ",
                    "vocab_size >= 1, got ", num_requests, " and ", vocab);
  if (op == "sample") return sample_workspace_bytes(num_requests, vocab);
  TORCH_CHECK_VALUE(false, "dspark_ops.workspace_size: unknown op '", op, "'");
}

}  // namespace dspark

TORCH_LIBRARY(dspark_ops, m) {
  m.def(
      "sample(Tensor logits, Tensor temperature, Tensor? top_k, Tensor? top_p, Tensor seed, "
      "Tensor position, int purpose, Tensor slot, Tensor? row_start) -> (Tensor tokens, Tensor status)");
  m.def(
      "sample.out(Tensor logits, Tensor temperature, Tensor? top_k, Tensor? top_p, Tensor seed, "
      "Tensor position, int purpose, Tensor slot, Tensor? row_start, *, Tensor(a!) tokens, "
      "Tensor(b!) status, Tensor(w!)? workspace=None) -> ()");
  m.def("workspace_bytes(str op, int num_requests, int vocab) -> int", &dspark::workspace_bytes);
}
