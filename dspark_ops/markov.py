"""DSpark's semi-autoregressive drafting step: the Markov head (DESIGN §3
markov_draft), composed from torch ops and this library's `keep_key` and
`sample` ops, so it runs on any device without host synchronisation and
traces under torch.compile."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _checks
from ._enums import ABORT_MASK, Purpose, Status
from ._params import (TensorOrFloat, TensorOrInt, position_tensor, seed_tensor, temperature_tensor, top_k_tensor,
                      top_p_tensor)
from .ops import _ops, sample

OP = "dspark_ops.markov_draft"
_M32 = 0xFFFFFFFF


class MarkovResult(NamedTuple):
    """What :func:`markov_draft` returns."""

    tokens: torch.Tensor  # [R, G] int32: drafted tokens x_1..x_G, -1 past num_draft or after an abort
    draft_logits: torch.Tensor  # [R, G, V]: the processed logits each token was sampled from
    status: torch.Tensor  # [R] int32: Status bits


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """The order-preserving uint32 key of every value (csrc/core/filters.h
    float_key), as int64: key(a) >= key(b) iff a >= b, -0 == +0."""
    xf = x.float()
    xf = torch.where(xf == 0, torch.zeros_like(xf), xf)
    bits = xf.view(torch.int32).to(torch.int64) & _M32
    return torch.where(bits >= (1 << 31), (~bits) & _M32, bits | (1 << 31))


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
    w1 : Tensor [V, r]; w2 : Tensor [r, V] (any float dtype).
    temperature, top_k, top_p, seed, position : scalar or Tensor [R] / [1]
        Temperature 0 = greedy: x_k is the argmax of the rounded corrected
        logits, ``draft_logits`` holds them undivided and unfiltered, and
        verification treats the draft as a point mass
        (``draft_temperature`` 0 for that request).
    num_draft : Tensor [R], int32, optional
        Stop request r after num_draft[r] tokens (the rest: token -1,
        logits -inf).
    out : MarkovResult, optional
        Preallocated outputs.

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
    Each step runs a few kernels (the fp32 bias GEMM, elementwise ops,
    ``keep_key`` when top-k/top-p are on, and ``sample``); fusing them into
    one kernel per step is planned (and so is a bf16 GEMM with fp32
    accumulation: today ``w2`` is converted to fp32 once per call). No host
    synchronisation. fp16 logits divided by a small temperature can overflow
    to +inf and abort the request (``NONFINITE_LOGITS``): use bf16 or fp32.
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
    temps = temperature_tensor(OP, temperature, R, dev).expand(R)
    k_t, p_t = top_k_tensor(OP, top_k, R, V, dev), top_p_tensor(OP, top_p, R, dev)
    seeds, positions = seed_tensor(OP, seed, R, dev), position_tensor(OP, position, R, dev)
    if out is None:
        out = MarkovResult(torch.empty(R, G, dtype=torch.int32, device=dev),
                           torch.empty(R, G, V, dtype=dtype, device=dev), torch.empty(R, dtype=torch.int32, device=dev))
    stochastic = temps > 0
    t_sample = stochastic.to(torch.float32)  # sample the processed logits at 1; 0 = greedy
    scale = torch.where(stochastic, temps, torch.ones_like(temps)).unsqueeze(1)
    limit = num_draft.to(torch.int64).clamp(0, G) if num_draft is not None else torch.full((R,), G, device=dev)
    prev = anchor.to(torch.int64)
    in_range = (prev >= 0) & (prev < V)
    out.status.copy_(torch.where(in_range, 0, int(Status.TOKEN_OUT_OF_RANGE)).to(torch.int32))
    live = in_range
    w2f = w2.float()
    neg_inf = torch.full((), float("-inf"), dtype=dtype, device=dev)  # a device fill: no host copy, no sync
    for k in range(1, G + 1):
        live_k = live & (limit >= k)
        bias = w1[prev.clamp(0, V - 1)].float() @ w2f  # [R, V]
        x = ((base_logits[:, k - 1].float() + bias) / scale).to(dtype)
        x = torch.where(live_k.unsqueeze(1), x, neg_inf)
        if k_t is not None or p_t is not None:
            keys = _ops.keep_key(x, t_sample, k_t, p_t).to(torch.int64) & _M32
            x = torch.where(order_keys(x) >= keys.unsqueeze(1), x, neg_inf)
        out.draft_logits[:, k - 1] = x
        step = sample(out.draft_logits[:, k - 1], temperature=t_sample, seed=seeds, position=positions,
                      purpose=Purpose.DRAFT, slot=k)
        tok = torch.where(live_k, step.tokens, -1)
        out.status.bitwise_or_(torch.where(live_k, step.status, 0).to(torch.int32))
        out.tokens[:, k - 1] = tok
        live = live_k & ((step.status & int(ABORT_MASK)) == 0)
        prev = tok.to(torch.int64)
    return out
