// Every schema of the dspark_ops library, once. Backends register their
// kernels in csrc/cpu/*.cpp and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "core/markov_workspace.h"
#include "core/sample_args.h"
#include "core/tree.h"
#include "core/verify_args.h"
#include "cpu/packed_gemm.h"
#include "schedule_common.h"

// `import dspark_ops._C` runs the registrations below; the module itself is
// empty (ops are reached as torch.ops.dspark_ops.*).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace dspark {

// Scratch bytes an op's CUDA kernels need for the given sizes (0 on the CPU
// is fine too: the CPU ops allocate their own).
int64_t workspace_bytes(std::string op, int64_t num_requests, int64_t vocab, int64_t max_draft) {
  TORCH_CHECK_VALUE(num_requests >= 0 && vocab >= 1 && max_draft >= 0,
                    "dspark_ops.workspace_size: need num_requests >= 0, vocab_size >= 1 and max_draft >= 0, got ",
                    num_requests, ", ", vocab, " and ", max_draft);
  if (op == "sample") return sample_workspace_bytes(num_requests, vocab);
  if (op == "verify_chunk") return verify_workspace(nullptr, num_requests, max_draft, vocab).bytes;
  if (op == "verify_tree") return tree_workspace(nullptr, num_requests, vocab, true, max_draft).bytes;  // = num_nodes
  if (op == "schedule_verify") return schedule_workspace_bytes(num_requests, max_draft);  // max_draft = G
  if (op == "markov_draft") return markov_workspace(nullptr, num_requests, vocab, max_draft).bytes;  // = the rank
  TORCH_CHECK_VALUE(false, "dspark_ops.workspace_size: unknown op '", op, "'");
}

// Which path packed_linear takes on this CPU now: "avx512", "avx2" or "portable".
std::string packed_linear_kernel() { return packed_gemm_path_name(packed_gemm_path()); }

}  // namespace dspark

TORCH_LIBRARY(dspark_ops, m) {
  m.def(
      "sample(Tensor logits, Tensor temperature, Tensor? top_k, Tensor? top_p, Tensor seed, "
      "Tensor position, int purpose, Tensor slot, Tensor? row_start) -> (Tensor tokens, Tensor status)");
  m.def(
      "sample.out(Tensor logits, Tensor temperature, Tensor? top_k, Tensor? top_p, Tensor seed, "
      "Tensor position, int purpose, Tensor slot, Tensor? row_start, *, Tensor(a!) tokens, "
      "Tensor(b!) status, Tensor(w!)? workspace=None) -> ()");
  m.def(
      "verify_chunk(Tensor target_logits, Tensor draft_tokens, Tensor cu_num_draft, int max_draft, "
      "Tensor? draft_probs, Tensor? draft_logits, Tensor draft_temperature, Tensor temperature, Tensor? top_k, "
      "Tensor? top_p, Tensor seed, Tensor position, Tensor? draft_row_start, Tensor? target_row_start) "
      "-> (Tensor tokens, Tensor accepted, Tensor emitted, Tensor status)");
  m.def(
      "verify_chunk.out(Tensor target_logits, Tensor draft_tokens, Tensor cu_num_draft, int max_draft, "
      "Tensor? draft_probs, Tensor? draft_logits, Tensor draft_temperature, Tensor temperature, Tensor? top_k, "
      "Tensor? top_p, Tensor seed, Tensor position, Tensor? draft_row_start, Tensor? target_row_start, *, "
      "Tensor(a!) tokens, Tensor(b!) accepted, Tensor(c!) emitted, Tensor(d!) status, "
      "Tensor(w!)? workspace=None) -> ()");
  m.def(
      "verify_tree(Tensor target_logits, Tensor node_tokens, Tensor parents, Tensor cu_num_nodes, int max_depth, "
      "Tensor? draft_probs, Tensor? draft_logits, Tensor draft_temperature, Tensor? sibling_mode, Tensor temperature, "
      "Tensor? top_k, Tensor? top_p, Tensor seed, Tensor position) "
      "-> (Tensor tokens, Tensor accepted, Tensor emitted, Tensor path, Tensor status)");
  m.def(
      "verify_tree.out(Tensor target_logits, Tensor node_tokens, Tensor parents, Tensor cu_num_nodes, int max_depth, "
      "Tensor? draft_probs, Tensor? draft_logits, Tensor draft_temperature, Tensor? sibling_mode, Tensor temperature, "
      "Tensor? top_k, Tensor? top_p, Tensor seed, Tensor position, *, Tensor(a!) tokens, Tensor(b!) accepted, "
      "Tensor(c!) emitted, Tensor(d!) path, Tensor(e!) status, Tensor(w!)? workspace=None) -> ()");
  m.def(
      "kv_compact(Tensor(a!)[] caches, Tensor base_len, Tensor num_appended, Tensor keep_index, Tensor num_keep, "
      "Tensor(b!) new_len, Tensor(c!) status, Tensor? block_table, bool heads_first, Tensor? layout) -> ()");
  m.def(
      "commit_tokens(Tensor(a!) out_tokens, Tensor(b!) out_len, Tensor(c!) position, Tensor max_len, "
      "Tensor(d!) finished, Tensor(e!) last_token, Tensor(f!) error, Tensor tokens, Tensor emitted, Tensor status, "
      "Tensor? stop_tokens) -> ()");
  m.def(
      "schedule_verify(Tensor confidence, Tensor num_draft, Tensor sps_table, str schedule_mode, float threshold, "
      "Tensor? budget, Tensor? temperatures) -> Tensor verify_len");
  m.def(
      "schedule_verify.out(Tensor confidence, Tensor num_draft, Tensor sps_table, str schedule_mode, float threshold, "
      "Tensor? budget, Tensor? temperatures, *, Tensor(a!) verify_len, Tensor(w!)? workspace=None) -> ()");
  m.def("kv_layout_table(Tensor[] caches, bool heads_first, bool paged) -> Tensor");
  m.def("keep_key(Tensor logits, Tensor temperature, Tensor? top_k, Tensor? top_p) -> Tensor keys");
  m.def(
      "markov_draft(Tensor base_logits, Tensor anchor, Tensor w1, Tensor w2, Tensor temperature, Tensor? top_k, "
      "Tensor? top_p, Tensor seed, Tensor position, Tensor? num_draft) "
      "-> (Tensor tokens, Tensor draft_logits, Tensor status)");
  m.def(
      "markov_draft.out(Tensor base_logits, Tensor anchor, Tensor w1, Tensor w2, Tensor temperature, Tensor? top_k, "
      "Tensor? top_p, Tensor seed, Tensor position, Tensor? num_draft, *, Tensor(a!) tokens, "
      "Tensor(b!) draft_logits, Tensor(c!) status, Tensor(w!)? workspace=None) -> ()");
  m.def("packed_linear(Tensor input, Tensor packed_weight, int out_features, Tensor? residual=None) -> Tensor");
  m.def("packed_linear_kernel() -> str", &dspark::packed_linear_kernel);
  m.def("workspace_bytes(str op, int num_requests, int vocab, int max_draft) -> int", &dspark::workspace_bytes);
}
