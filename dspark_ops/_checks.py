"""Python twins of csrc/checks.h for the fake (meta) kernels: the same checks
in the same order with the same messages, so a shape error reads the same
under torch.compile as in eager mode (tests/test_errors.py compares them)."""
from __future__ import annotations

from typing import Optional

import torch

from ._enums import MAX_SLOT

MAX_VOCAB = 1 << 23  # csrc/core/filters.h kMaxVocab


def dtype_name(dtype: torch.dtype) -> str:
    """As Python spells it (torch.int32), the C++ checks' dtype_str."""
    return str(dtype)


def shape_str(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_dtype(op: str, name: str, t: torch.Tensor, want: torch.dtype) -> None:
    if t.dtype != want:
        raise ValueError(f"{op}: {name} must have dtype {dtype_name(want)}, got {dtype_name(t.dtype)}")


def check_same_device(op: str, name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on {ref.device} like logits, got {t.device}")


def check_per_request(op: str, name: str, t: torch.Tensor, R: int, want: torch.dtype,
                      ref: torch.Tensor) -> None:
    check_same_device(op, name, t, ref)
    check_dtype(op, name, t, want)
    if t.dim() != 1 or t.shape[0] not in (R, 1):
        raise ValueError(f"{op}: {name} must have shape [{R}] or [1], got {shape_str(t)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def check_output(op: str, name: str, t: torch.Tensor, R: int, want: torch.dtype,
                 ref: torch.Tensor) -> None:
    check_same_device(op, name, t, ref)
    check_dtype(op, name, t, want)
    if t.dim() != 1 or t.shape[0] != R:
        raise ValueError(f"{op}: {name} must have shape [{R}], got {shape_str(t)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def check_logits(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: {name} must have dtype float32, float16 or bfloat16, "
                         f"got {dtype_name(t.dtype)}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must have shape [rows, V], got {shape_str(t)}")
    if t.shape[1] < 1:
        raise ValueError(f"{op}: {name} must have V >= 1, got {shape_str(t)}")
    if t.shape[1] != 1 and t.stride(1) != 1:
        strides = "[" + ", ".join(str(s) for s in t.stride()) + "]"
        raise ValueError(f"{op}: {name} must be contiguous in its last dimension, got strides {strides}")


def check_vocab(op: str, name: str, V: int) -> None:
    if V > MAX_VOCAB:
        raise ValueError(f"{op}: {name} must have V <= {MAX_VOCAB}, got V = {V}")


def check_sampling_params(op: str, R: int, temperature, top_k, top_p, seed, position, ref: torch.Tensor) -> None:
    """The sampling parameters of every sampling op, each [R] or [1]."""
    check_per_request(op, "temperature", temperature, R, torch.float32, ref)
    if top_k is not None:
        check_per_request(op, "top_k", top_k, R, torch.int32, ref)
    if top_p is not None:
        check_per_request(op, "top_p", top_p, R, torch.float32, ref)
    check_per_request(op, "seed", seed, R, torch.int64, ref)
    check_per_request(op, "position", position, R, torch.int64, ref)


def check_offsets(op: str, name: str, cu: torch.Tensor, ref: torch.Tensor) -> None:
    """Ragged offsets [R + 1], int32, contiguous."""
    check_same_device(op, name, cu, ref)
    check_dtype(op, name, cu, torch.int32)
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{op}: {name} must have shape [R + 1], got {shape_str(cu)}")
    if not cu.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def check_int_rows(op: str, name: str, t: torch.Tensor, R: int, W: int, ref: torch.Tensor) -> None:
    """An int32 output [R, W], contiguous, on the logits' device."""
    check_same_device(op, name, t, ref)
    check_dtype(op, name, t, torch.int32)
    if t.dim() != 2 or t.shape[0] != R or t.shape[1] != W:
        raise ValueError(f"{op}: {name} must have shape [{R}, {W}], got {shape_str(t)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def static_ints(*sizes) -> bool:
    """Plain Python ints (not a traced torch.SymInt): a fake kernel may size a
    workspace from them without specialising a dynamic shape."""
    return all(type(s) is int for s in sizes)


def check_workspace(op: str, ws: Optional[torch.Tensor], need: Optional[int], ref: torch.Tensor) -> None:
    """csrc/checks.h check_workspace, for the fake kernels of the .out forms
    (a given workspace; `need` None: size unknown here, not checked)."""
    if ws is None:
        return
    check_same_device(op, "workspace", ws, ref)
    check_dtype(op, "workspace", ws, torch.uint8)
    if not ws.is_contiguous():
        raise ValueError(f"{op}: workspace must be contiguous")
    nbytes = ws.numel() * ws.element_size()
    if need is not None and nbytes < need:
        raise ValueError(f"{op}: workspace must hold at least {need} bytes "
                         f"(dspark_ops.workspace_size), got {nbytes}")
    from torch._subclasses.fake_tensor import is_fake
    if ws.device.type == "meta" or is_fake(ws):  # no address to check (the op checks it at run time)
        return
    if ws.data_ptr() % 16 != 0:
        raise ValueError(f"{op}: workspace must be 16-byte aligned, got address {hex(ws.data_ptr())}")


def raise_first_invalid(op: str, name: str, values: torch.Tensor, ok: torch.Tensor,
                        index: Optional[torch.Tensor] = None, rule: Optional[str] = None) -> None:
    """validate=True: raise naming the first value with ok False (host
    tensors), as name[i] = value; `index` maps positions to the index shown,
    `rule` says what was broken."""
    bad = (~ok).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        shown = int(index[i]) if index is not None else i
        raise ValueError(f"{op}: {name}[{shown}] = {values[i].item()} is invalid" + (f": {rule}" if rule else ""))


def validate_sampling_values(op: str, temperature, draft_temperature, top_k, top_p, position) -> None:
    """validate=True for the verify ops' per-request sampling tensors."""
    for name, t in (("temperature", temperature), ("draft_temperature", draft_temperature)):
        raise_first_invalid(op, name, t, (t >= 0) & torch.isfinite(t), rule="must be finite and >= 0")
    if top_k is not None:
        raise_first_invalid(op, "top_k", top_k, top_k >= 0, rule="must be >= 0 (0 = off)")
    if top_p is not None:
        raise_first_invalid(op, "top_p", top_p, top_p > 0, rule="must be > 0 (>= 1 = off)")
    raise_first_invalid(op, "position", position, position >= 0, rule="must be >= 0")


def validate_finite_rows(op: str, target_logits: torch.Tensor, rows: torch.Tensor) -> None:
    """validate=True: no NaN / +inf in the target rows `rows` (host int64)."""
    block = target_logits[rows.to(target_logits.device)]
    finite = (~(torch.isnan(block) | (block == float("inf")))).all(1).cpu()
    raise_first_invalid(op, "target_logits row", rows, finite, rows, rule="it holds NaN or +inf")


SAMPLE_OP = "dspark_ops.sample"


def sample_num_requests(logits: torch.Tensor, row_start: Optional[torch.Tensor]) -> int:
    return row_start.shape[0] if row_start is not None else logits.shape[0]


def check_sample_args(logits, temperature, top_k, top_p, seed, position, purpose, slot,
                      row_start) -> int:
    """csrc/sample_common.h check_sample_args; returns R."""
    op = SAMPLE_OP
    check_logits(op, "logits", logits)
    check_vocab(op, "logits", logits.shape[1])
    if row_start is not None:
        check_same_device(op, "row_start", row_start, logits)
        check_dtype(op, "row_start", row_start, torch.int32)
        if row_start.dim() != 1 or not row_start.is_contiguous():
            raise ValueError(f"{op}: row_start must be a contiguous 1-D tensor [R], got {shape_str(row_start)}")
    R = sample_num_requests(logits, row_start)
    check_sampling_params(op, R, temperature, top_k, top_p, seed, position, logits)
    check_per_request(op, "slot", slot, R, torch.int32, logits)
    if purpose not in (1, 2, 3):
        raise ValueError(f"{op}: purpose must be 1 (COIN), 2 (EMIT) or 3 (DRAFT), got {purpose}")
    return R


VERIFY_OP = "dspark_ops.verify_chunk"


def check_int_vector(op, name, t, want, ref, like=None):
    check_same_device(op, name, t, ref)
    check_dtype(op, name, t, torch.int32)
    if t.dim() != 1 or (want >= 0 and t.shape[0] != want):
        raise ValueError(f"{op}: {name} must have shape [{'N' if want < 0 else want}]"
                         f"{' like ' + like if like else ''}, got {shape_str(t)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def check_draft_rows(op, draft_probs, draft_logits, target_logits) -> None:
    """csrc/verify_common.h check_draft_rows: at most one of draft_probs /
    draft_logits, [rows, V] like the target, its dtype or Float."""
    V = target_logits.shape[1]
    if draft_probs is not None and draft_logits is not None:
        raise ValueError(f"{op}: pass draft_probs or draft_logits, not both")
    draft = draft_probs if draft_probs is not None else draft_logits
    if draft is not None:
        name = "draft_probs" if draft_probs is not None else "draft_logits"
        check_logits(op, name, draft)
        check_same_device(op, name, draft, target_logits)
        if draft.shape[1] != V:
            raise ValueError(f"{op}: {name} must have V = {V} columns like target_logits, got {shape_str(draft)}")
        if draft.dtype not in (target_logits.dtype, torch.float32):
            raise ValueError(f"{op}: {name} must have the dtype of target_logits ({dtype_name(target_logits.dtype)}) "
                             f"or torch.float32, got {dtype_name(draft.dtype)}")


def check_verify_args(target_logits, draft_tokens, cu_num_draft, max_draft, draft_probs, draft_logits,
                      draft_temperature, temperature, top_k, top_p, seed, position, draft_row_start,
                      target_row_start) -> int:
    """csrc/verify_common.h check_verify_args; returns R."""
    op = VERIFY_OP
    check_logits(op, "target_logits", target_logits)
    check_vocab(op, "target_logits", target_logits.shape[1])
    check_int_vector(op, "draft_tokens", draft_tokens, -1, target_logits)
    check_offsets(op, "cu_num_draft", cu_num_draft, target_logits)
    if not 0 <= max_draft < MAX_SLOT:
        raise ValueError(f"{op}: max_draft must be in [0, {MAX_SLOT - 1}], got {max_draft}")
    check_draft_rows(op, draft_probs, draft_logits, target_logits)
    R = cu_num_draft.shape[0] - 1
    check_per_request(op, "draft_temperature", draft_temperature, R, torch.float32, target_logits)
    check_sampling_params(op, R, temperature, top_k, top_p, seed, position, target_logits)
    if draft_row_start is not None:
        check_int_vector(op, "draft_row_start", draft_row_start, R, target_logits)
    if target_row_start is not None:
        check_int_vector(op, "target_row_start", target_row_start, R, target_logits)
    return R


def check_verify_outputs(target_logits, cu_num_draft, max_draft, tokens, accepted, emitted, status) -> None:
    op = VERIFY_OP
    R = cu_num_draft.shape[0] - 1
    check_int_rows(op, "tokens", tokens, R, max_draft + 1, target_logits)
    check_output(op, "accepted", accepted, R, torch.int32, target_logits)
    check_output(op, "emitted", emitted, R, torch.int32, target_logits)
    check_output(op, "status", status, R, torch.int32, target_logits)


TREE_OP = "dspark_ops.verify_tree"


def check_tree_args(target_logits, node_tokens, parents, cu_num_nodes, max_depth, draft_probs, draft_logits,
                    draft_temperature, sibling_mode, temperature, top_k, top_p, seed, position) -> int:
    """csrc/tree_common.h check_tree_args; returns R."""
    op = TREE_OP
    check_logits(op, "target_logits", target_logits)
    check_vocab(op, "target_logits", target_logits.shape[1])
    check_int_vector(op, "node_tokens", node_tokens, -1, target_logits)
    check_int_vector(op, "parents", parents, node_tokens.shape[0], target_logits, "node_tokens")
    check_offsets(op, "cu_num_nodes", cu_num_nodes, target_logits)
    if not 0 <= max_depth < MAX_SLOT:
        raise ValueError(f"{op}: max_depth must be in [0, {MAX_SLOT - 1}], got {max_depth}")
    check_draft_rows(op, draft_probs, draft_logits, target_logits)
    R = cu_num_nodes.shape[0] - 1
    check_per_request(op, "draft_temperature", draft_temperature, R, torch.float32, target_logits)
    if sibling_mode is not None:
        check_per_request(op, "sibling_mode", sibling_mode, R, torch.int8, target_logits)
    check_sampling_params(op, R, temperature, top_k, top_p, seed, position, target_logits)
    return R


def check_tree_outputs(target_logits, cu_num_nodes, max_depth, tokens, accepted, emitted, path, status) -> None:
    op = TREE_OP
    R = cu_num_nodes.shape[0] - 1
    check_int_rows(op, "tokens", tokens, R, max_depth + 1, target_logits)
    check_int_rows(op, "path", path, R, max_depth + 1, target_logits)
    check_output(op, "accepted", accepted, R, torch.int32, target_logits)
    check_output(op, "emitted", emitted, R, torch.int32, target_logits)
    check_output(op, "status", status, R, torch.int32, target_logits)


KV_OP = "dspark_ops.kv_compact"


def check_kv_args(caches, base_len, num_appended, keep_index, num_keep, new_len, status, block_table,
                  heads_first) -> int:
    """csrc/kv_common.h check_kv_args then kv_layers' per-tensor checks, for
    the fake kernel (the memory-overlap checks need real addresses: the op
    makes them); returns R."""
    op = KV_OP
    if base_len.dim() != 1:
        raise ValueError(f"{op}: base_len must have shape [R], got {shape_str(base_len)}")
    R = base_len.shape[0]
    if not caches:
        raise ValueError(f"{op}: caches must hold at least one tensor")
    ref = caches[0]
    for name, t in (("base_len", base_len), ("num_appended", num_appended), ("num_keep", num_keep),
                    ("new_len", new_len), ("status", status)):
        check_output(op, name, t, R, torch.int32, ref)
    check_same_device(op, "keep_index", keep_index, ref)
    check_dtype(op, "keep_index", keep_index, torch.int32)
    if keep_index.dim() != 2 or keep_index.shape[0] != R or not keep_index.is_contiguous():
        raise ValueError(f"{op}: keep_index must be a contiguous [{R}, K_max] tensor, got {shape_str(keep_index)}")
    paged = block_table is not None
    layout = "[num_blocks, block_size, H, D]" if paged else "[R, H, S, D]" if heads_first else "[R, S, H, D]"
    for i, c in enumerate(caches):
        if c.dim() != 4:
            raise ValueError(f"{op}: caches[{i}] must have 4 dimensions {layout}, got {shape_str(c)}")
    if paged:
        if ref.shape[1] < 1:
            raise ValueError(f"{op}: paged caches must have block_size >= 1, got {shape_str(ref)}")
        if heads_first:
            raise ValueError(f"{op}: heads_first caches cannot be paged")
        check_same_device(op, "block_table", block_table, ref)
        check_dtype(op, "block_table", block_table, torch.int32)
        if block_table.dim() != 2 or block_table.shape[0] != R or not block_table.is_contiguous():
            raise ValueError(f"{op}: block_table must be a contiguous [{R}, max_blocks] tensor, got "
                             f"{shape_str(block_table)}")
        for i, c in enumerate(caches):
            if c.shape[0] != ref.shape[0] or c.shape[1] != ref.shape[1]:
                raise ValueError(f"{op}: paged caches[{i}] must have num_blocks = {ref.shape[0]} and block_size = "
                                 f"{ref.shape[1]} like caches[0], got {shape_str(c)}")
    else:
        for i, c in enumerate(caches):
            if c.shape[0] != R:
                raise ValueError(f"{op}: caches[{i}] must have R = {R} requests in dimension 0, got {shape_str(c)}")
    for i, c in enumerate(caches):  # kv_layers, layer by layer
        if not c.is_contiguous():
            raise ValueError(f"{op}: caches[{i}] must be contiguous")
        if c.device != ref.device:
            raise ValueError(f"{op}: caches[{i}] must be on {ref.device} like caches[0], got {c.device}")
    return R
