"""DSpark's semi-autoregressive drafting step: the Markov head (DESIGN §3
markov_draft), one registered op (csrc/cpu/markov_draft.cpp,
csrc/kernels/markov_draft.cuh) with its fake kernels, so it runs without
host synchronisation and traces under torch.compile."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _checks
from ._params import (TensorOrFloat, TensorOrInt, position_tensor, seed_tensor, temperature_tensor, top_k_tensor,
                      top_p_tensor)
from .ops import _ops, check_fake_workspace

OP = "dspark_ops.markov_draft"


class MarkovResult(NamedTuple):
    """What :func:`markov_draft` returns."""

    tokens: torch.Tensor  # [R, G] int32: drafted tokens x_1..x_G, -1 past num_draft or after an abort
    draft_logits: torch.Tensor  # [R, G, V]: the processed logits each token was sampled from
    status: torch.Tensor  # [R] int32: Status bits


@torch.library.register_fake("dspark_ops::keep_key")
def _keep_key_fake(logits, temperature, top_k, top_p):
    return logits.new_empty((logits.shape[0],), dtype=torch.int32)


def markov_draft(
    base_logits: torch.Tensor,
    anchor: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    *,
    temperature: TensorOrFloat = 1.0,
    top_k: TensorOrInt = 0,
    top_p: TensorOrFloat = 1.0,
    seed: TensorOrInt = 0,
    position: TensorOrInt = 0,
    num_draft: Optional[torch.Tensor] = None,
    out: Optional[MarkovResult] = None,
    workspace: Optional[torch.Tensor] = None,
) -> MarkovResult:
    """Draft a block of G tokens left to right with DSpark's Markov head.

    The parallel backbone produced U_1..U_G in one pass; step k computes the
    corrected logits ``U_k + w1[x_{k-1}] @ w2`` (x_0 = the anchor; the
    product in fp32), divides by the request's temperature, applies top-k
    then top-p (DESIGN §2 rules), rounds to ``base_logits``' dtype, samples
    x_k from exactly those rounded values (Philox purpose DRAFT, slot k) and
    writes them, -inf outside the kept set. So ``draft_logits`` is what
    ``verify_chunk(draft_logits=..., draft_temperature=1, draft_row_start=r*G)``
    must use, read in place: the pair is lossless.

    Parameters
    ----------
    base_logits : Tensor [R, G, V], float32 / float16 / bfloat16
    anchor : Tensor [R], int32 or int64: the last committed token.
    w1 : Tensor [V, r]; w2 : Tensor [r, V]: float32, float16 or bfloat16 (float64 is cast to float32).
    temperature, top_k, top_p, seed, position : scalar or Tensor [R] / [1]
        Temperature 0 = greedy: x_k is the argmax of the rounded corrected
        logits, ``draft_logits`` holds them undivided and unfiltered, and
        verification treats the draft as a point mass
        (``draft_temperature`` 0 for that request).
    num_draft : Tensor [R] or [1], integer, optional
        Stop request r after num_draft[r] tokens (the rest: token -1,
        logits -inf); clamped to [0, G].
    out : MarkovResult, optional
        Preallocated outputs: the ``.out`` overload.
    workspace : Tensor, optional
        ``workspace_size("markov_draft", num_requests=R, vocab_size=V,
        rank=r)`` bytes on the logits' device, 16-byte aligned: the CUDA op's
        scratch (the state between steps, the fp32 bias rows, the gathered
        w1 rows, the race partials). A call allocates nothing when it also
        passes ``out=``, contiguous weights of one dtype (fp32, or bf16/fp16
        both; mixed dtypes make fp32 copies), and the per-request parameters
        as tensors the op takes as they are: temperature / top_p float32,
        top_k / num_draft int32, seed / position int64, each [R] (or [1];
        num_draft [R]) on the device (scalars become tensors each call).
        Without a workspace the CUDA op allocates through torch's caching
        allocator. The CPU op needs no scratch but checks a given one as CUDA does.

    Returns
    -------
    MarkovResult(tokens [R, G] int32, draft_logits [R, G, V], status [R])
        Status: ``TOKEN_OUT_OF_RANGE`` for an anchor outside [0, V) (that
        request drafts nothing; verifying it with 0 drafts is plain
        sampling); ``NONFINITE_LOGITS`` / ``ALL_MASKED`` abort the request
        from that step on.

    Example
    -------
    >>> import torch, dspark_ops
    >>> R, G, V, r = 2, 4, 50, 8
    >>> res = dspark_ops.markov_draft(torch.randn(R, G, V), torch.tensor([3, 7]), torch.randn(V, r) * 0.1,
    ...                               torch.randn(r, V) * 0.1, temperature=0.8, seed=1, position=10)
    >>> res.tokens.shape, res.draft_logits.shape
    (torch.Size([2, 4]), torch.Size([2, 4, 50]))

    Notes
    -----
    One op: on the CPU each step reads w2 once for every drafting request
    (fp32 sums, ascending r). On CUDA each step first computes the bias
    rows in fp32: a cuBLAS GEMM on the weights as they are when w1 and w2
    share a bf16/fp16 dtype; otherwise a kernel on fp32 copies (made once
    per call, none for contiguous fp32 weights) that sums in the CPU op's
    order, so its bits match the CPU's whatever the batch and torch's TF32
    setting. Then two kernels (four with top-k/top-p): the corrected row is
    written and raced in one pass. No host synchronisation. fp16 logits
    divided by a small temperature can overflow to +inf and abort the
    request (``NONFINITE_LOGITS``): use bf16 or fp32.
    """
    if base_logits.dim() != 3:
        raise ValueError(f"{OP}: base_logits must have shape [R, G, V], got {list(base_logits.shape)}")
    R, G, V = base_logits.shape
    dev, dtype = base_logits.device, base_logits.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{OP}: base_logits must have dtype float32, float16 or bfloat16, got "
                         f"{_checks.dtype_name(dtype)}")
    if anchor.dim() != 1 or anchor.shape[0] != R or anchor.device != dev:
        raise ValueError(f"{OP}: anchor must have shape [{R}] on {dev}, got {list(anchor.shape)} on {anchor.device}")
    if w1.dim() != 2 or w2.dim() != 2 or w1.shape[0] != V or w2.shape[1] != V or w1.shape[1] != w2.shape[0]:
        raise ValueError(f"{OP}: w1 must be [V, r] and w2 [r, V] with V = {V}, got {list(w1.shape)} and "
                         f"{list(w2.shape)}")
    temps = temperature_tensor(OP, temperature, R, dev)
    k_t, p_t = top_k_tensor(OP, top_k, R, V, dev), top_p_tensor(OP, top_p, R, dev)
    seeds, positions = seed_tensor(OP, seed, R, dev), position_tensor(OP, position, R, dev)
    limit = None
    if num_draft is not None:  # clamped in int64 first: no wrap-around; a [1] tensor broadcasts
        if num_draft.dim() != 1 or num_draft.shape[0] not in (1, R) or num_draft.device != dev:
            raise ValueError(f"{OP}: num_draft must have shape [{R}] or [1] on {dev}, got "
                             f"{list(num_draft.shape)} on {num_draft.device}")
        if num_draft.dtype == torch.int32 and num_draft.shape[0] == R and num_draft.is_contiguous():
            limit = num_draft  # as the op takes it (it clamps to [0, G] itself): no copy
        else:
            limit = num_draft.to(torch.int64).clamp(0, G).to(torch.int32).expand(R).contiguous()
    w1, w2 = (w.float() if w.dtype == torch.float64 else w for w in (w1, w2))  # the op takes fp32/fp16/bf16
    if V > 1 and base_logits.stride(2) != 1:
        base_logits = base_logits.contiguous()
    args = (base_logits, anchor.to(torch.int64).contiguous(), w1, w2, temps, k_t, p_t, seeds, positions, limit)
    if out is None and workspace is None:
        return MarkovResult(*_ops.markov_draft(*args))
    if out is None:
        out = MarkovResult(base_logits.new_empty((R, G), dtype=torch.int32), base_logits.new_empty((R, G, V)),
                           base_logits.new_empty((R,), dtype=torch.int32))
    _ops.markov_draft.out(*args, tokens=out.tokens, draft_logits=out.draft_logits, status=out.status,
                          workspace=workspace)
    return out


def _check_markov_args(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft) -> None:
    """csrc/markov_common.h check_markov_args, for the fake kernels."""
    if base.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{OP}: base_logits must have dtype float32, float16 or bfloat16, got "
                         f"{_checks.dtype_name(base.dtype)}")
    if base.dim() != 3:
        raise ValueError(f"{OP}: base_logits must have shape [R, G, V], got {_checks.shape_str(base)}")
    R, G, V = base.shape
    if not 1 <= V <= _checks.MAX_VOCAB:
        raise ValueError(f"{OP}: base_logits must have 1 <= V <= {_checks.MAX_VOCAB}, got V = {V}")
    if G > 0xFFFF:
        raise ValueError(f"{OP}: base_logits must have G <= 65535 (the slot of step G), got {G}")
    if V > 1 and base.stride(2) != 1:
        raise ValueError(f"{OP}: base_logits must be contiguous in its last dimension, got strides "
                         f"{list(base.stride())}")
    _checks.check_same_device(OP, "anchor", anchor, base)
    _checks.check_dtype(OP, "anchor", anchor, torch.int64)
    if anchor.dim() != 1 or anchor.shape[0] != R:
        raise ValueError(f"{OP}: anchor must be a contiguous [{R}], got {_checks.shape_str(anchor)}")
    for name, w in (("w1", w1), ("w2", w2)):
        _checks.check_same_device(OP, name, w, base)
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{OP}: {name} must have dtype float32, float16 or bfloat16, got "
                             f"{_checks.dtype_name(w.dtype)}")
    if w1.dim() != 2 or w2.dim() != 2 or w1.shape[0] != V or w2.shape[1] != V or w1.shape[1] != w2.shape[0]:
        raise ValueError(f"{OP}: w1 must be [V, r] and w2 [r, V] with V = {V}, got {_checks.shape_str(w1)} and "
                         f"{_checks.shape_str(w2)}")
    _checks.check_sampling_params(OP, R, temperature, top_k, top_p, seed, position, base)
    if num_draft is not None:
        _checks.check_output(OP, "num_draft", num_draft, R, torch.int32, base)


@torch.library.register_fake("dspark_ops::markov_draft")
def _markov_draft_fake(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft):
    _check_markov_args(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft)
    R, G, V = base.shape
    return (base.new_empty((R, G), dtype=torch.int32), base.new_empty((R, G, V)),
            base.new_empty((R,), dtype=torch.int32))


@torch.library.register_fake("dspark_ops::markov_draft.out")
def _markov_draft_out_fake(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft, *, tokens,
                           draft_logits, status, workspace=None):
    _check_markov_args(base, anchor, w1, w2, temperature, top_k, top_p, seed, position, num_draft)
    R, G, V = base.shape
    _checks.check_int_rows(OP, "tokens", tokens, R, G, base)
    _checks.check_same_device(OP, "draft_logits", draft_logits, base)
    _checks.check_dtype(OP, "draft_logits", draft_logits, base.dtype)
    if draft_logits.shape != (R, G, V) or not draft_logits.is_contiguous():
        raise ValueError(f"{OP}: draft_logits must be a contiguous [{R}, {G}, {V}] like base_logits, got "
                         f"{_checks.shape_str(draft_logits)}")
    _checks.check_output(OP, "status", status, R, torch.int32, base)
    check_fake_workspace("markov_draft", workspace, base, num_requests=R, vocab_size=V, rank=w1.shape[1])
