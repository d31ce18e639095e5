// Argument checks shared by the CPU and CUDA bindings. Every message names
// the op, the argument, what was expected and what was received; the fake
// kernels in dspark_ops/_checks.py raise the same text.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <sstream>
#include <string>
#include <utility>

#include "core/filters.h"

namespace dspark {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// A dtype as Python spells it ("torch.int32", not c10's "Int"): what users pass.
inline std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return c10::toString(t);
  }
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK_VALUE(t.scalar_type() == want, op, ": ", name, " must have dtype ", dtype_str(want), ", got ",
                    dtype_str(t.scalar_type()));
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(),
                    " like logits, got ", t.device());
}

// A per-request parameter: shape [R] or [1] (broadcast), contiguous.
inline void check_per_request(const char* op, const char* name, const at::Tensor& t, int64_t R,
                              at::ScalarType want, const at::Tensor& ref) {
  check_same_device(op, name, t, ref);
  check_dtype(op, name, t, want);
  TORCH_CHECK_VALUE(t.dim() == 1 && (t.size(0) == R || t.size(0) == 1), op, ": ", name,
                    " must have shape [", R, "] or [1], got ", shape_str(t));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// An output: exactly [R], the given dtype, contiguous, on the logits' device.
inline void check_output(const char* op, const char* name, const at::Tensor& t, int64_t R,
                         at::ScalarType want, const at::Tensor& ref) {
  check_same_device(op, name, t, ref);
  check_dtype(op, name, t, want);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == R, op, ": ", name, " must have shape [", R,
                    "], got ", shape_str(t));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Logits: [rows, V], a float type, last dimension contiguous.
inline void check_logits(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                    " must have dtype float32, float16 or bfloat16, got ", dtype_str(st));
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must have shape [rows, V], got ",
                    shape_str(t));
  TORCH_CHECK_VALUE(t.size(1) >= 1, op, ": ", name, " must have V >= 1, got ", shape_str(t));
  TORCH_CHECK_VALUE(t.size(1) == 1 || t.stride(1) == 1, op, ": ", name,
                    " must be contiguous in its last dimension, got strides ", t.strides());
}

// The bytes a tensor's elements occupy, [begin, end); {0, 0} when it has
// none (torch strides are never negative).
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return {0, 0};
  int64_t last = 0;  // the last element's offset from the first, in elements
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {begin, begin + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(t.element_size()))};
}

inline bool spans_overlap(const at::Tensor& a, const at::Tensor& b) {
  const auto x = byte_span(a), y = byte_span(b);
  return x.first < x.second && y.first < y.second && x.first < y.second && y.first < x.second;
}

// An output must not share memory with an input other blocks still read.
inline void check_no_overlap(const char* op, const char* out_name, const at::Tensor& out, const char* in_name,
                             const at::Tensor& in) {
  TORCH_CHECK_VALUE(!spans_overlap(out, in), op, ": ", out_name, " must not share memory with ", in_name, " (",
                    in_name, " is read-only; other blocks still read it)");
}

// A named argument for check_apart; t is null when an optional one is absent.
struct NamedArg {
  const char* name;
  const at::Tensor* t;
};
inline NamedArg named(const char* name, const at::Tensor& t) { return {name, &t}; }
inline NamedArg named(const char* name, const c10::optional<at::Tensor>& t) {
  return {name, t.has_value() ? &*t : nullptr};
}

// The outputs (and workspace) of an op's .out form: each is written while
// other threads read the inputs and write the other outputs, so none may
// share a byte with an input or with another output (on a GPU the result
// would depend on scheduling; CPU threads race the same way).
inline void check_apart(const char* op, std::initializer_list<NamedArg> outputs,
                        std::initializer_list<NamedArg> inputs) {
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    if (o->t == nullptr) continue;
    for (const NamedArg& in : inputs)
      if (in.t != nullptr) check_no_overlap(op, o->name, *o->t, in.name, *in.t);
    for (auto p = std::next(o); p != outputs.end(); ++p)
      TORCH_CHECK_VALUE(p->t == nullptr || !spans_overlap(*o->t, *p->t), op, ": ", o->name,
                        " must not share memory with ", p->name, " (both are written)");
  }
}

inline int64_t per_request_stride(const at::Tensor& t) { return t.size(0) == 1 ? 0 : 1; }

// A row length the fixed-point top-p sums can take (core/filters.h).
inline void check_vocab(const char* op, const char* name, int64_t V) {
  TORCH_CHECK_VALUE(V <= kMaxVocab, op, ": ", name, " must have V <= ", kMaxVocab, ", got V = ", V);
}

// The sampling parameters of every sampling op, each [R] or [1].
inline void check_sampling_params(const char* op, int64_t R, const at::Tensor& temperature,
                                  const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                                  const at::Tensor& seed, const at::Tensor& position, const at::Tensor& ref) {
  check_per_request(op, "temperature", temperature, R, at::kFloat, ref);
  if (top_k.has_value()) check_per_request(op, "top_k", *top_k, R, at::kInt, ref);
  if (top_p.has_value()) check_per_request(op, "top_p", *top_p, R, at::kFloat, ref);
  check_per_request(op, "seed", seed, R, at::kLong, ref);
  check_per_request(op, "position", position, R, at::kLong, ref);
}

// Ragged offsets [R + 1], int32, contiguous.
inline void check_offsets(const char* op, const char* name, const at::Tensor& cu, const at::Tensor& ref) {
  check_same_device(op, name, cu, ref);
  check_dtype(op, name, cu, at::kInt);
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, op, ": ", name, " must have shape [R + 1], got ",
                    shape_str(cu));
  TORCH_CHECK_VALUE(cu.is_contiguous(), op, ": ", name, " must be contiguous");
}

// An int32 output [R, W], contiguous, on the logits' device.
inline void check_int_rows(const char* op, const char* name, const at::Tensor& t, int64_t R, int64_t W,
                           const at::Tensor& ref) {
  check_same_device(op, name, t, ref);
  check_dtype(op, name, t, at::kInt);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == R && t.size(1) == W, op, ": ", name, " must have shape [", R,
                    ", ", W, "], got ", shape_str(t));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Workspace: uint8 bytes (DESIGN §2), on the device, contiguous, enough, aligned.
inline void check_workspace(const char* op, const at::Tensor& ws, int64_t need,
                            const at::Tensor& ref) {
  check_same_device(op, "workspace", ws, ref);
  check_dtype(op, "workspace", ws, at::kByte);
  TORCH_CHECK_VALUE(ws.is_contiguous(), op, ": workspace must be contiguous");
  TORCH_CHECK_VALUE(ws.nbytes() >= static_cast<size_t>(need), op, ": workspace must hold at least ",
                    need, " bytes (dspark_ops.workspace_size), got ", ws.nbytes());
  // Misaligned scratch would be a sticky CUDA error, not an exception.
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(ws.data_ptr()) % 16 == 0, op,
                    ": workspace must be 16-byte aligned, got address ", ws.data_ptr());
}

// A CPU .out form's workspace, when given: checked as its CUDA binding checks
// it (workspace_ptr), with the same `need`, then left unused (the CPU ops need
// no scratch), so a workspace a GPU would refuse is refused on the CPU too.
inline void check_given_workspace(const char* op, const c10::optional<at::Tensor>& ws, int64_t need,
                                  const at::Tensor& ref) {
  if (ws.has_value()) check_workspace(op, *ws, need, ref);
}

}  // namespace dspark
