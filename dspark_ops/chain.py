"""verify_chunk: lossless chain verification (DESIGN §3), the typed wrapper
beside its fake kernels."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _checks
from ._params import (TensorOrFloat, TensorOrInt, position_tensor, seed_tensor, temperature_tensor,
                      top_k_tensor, top_p_tensor)
from .ops import _ops, check_fake_workspace

OP = _checks.VERIFY_OP


class VerifyResult(NamedTuple):
    """What :func:`verify_chunk` returns (R requests, K = max_draft)."""

    tokens: torch.Tensor  # [R, K+1] int32: accepted drafts, the emitted token, then -1
    accepted: torch.Tensor  # [R] int32: drafts accepted
    emitted: torch.Tensor  # [R] int32: accepted + 1 (0 when aborted)
    status: torch.Tensor  # [R] int32: Status bits


def empty_verify_result(num_requests: int, max_draft: int, *, device=None) -> VerifyResult:
    """Preallocated outputs for ``verify_chunk(..., out=...)``."""
    def vec():
        return torch.empty(num_requests, dtype=torch.int32, device=device)
    return VerifyResult(torch.empty(num_requests, max_draft + 1, dtype=torch.int32, device=device), vec(), vec(),
                        vec())


def _flatten_padded(t: torch.Tensor, name: str) -> torch.Tensor:
    """[B, K, ...] -> [B*K, ...] as a view (never a silent copy)."""
    if t.dim() >= 2 and t.shape[0] > 1 and t.shape[1] > 1 and t.stride(0) != t.shape[1] * t.stride(1):
        raise ValueError(f"{OP}: padded {name} must be contiguous in its first two dimensions to be read in place, "
                         f"got strides {list(t.stride())}")
    return t.flatten(0, 1)


def verify_chunk(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    cu_num_draft: Optional[torch.Tensor] = None,
    *,
    max_draft: Optional[int] = None,
    draft_probs: Optional[torch.Tensor] = None,
    draft_logits: Optional[torch.Tensor] = None,
    draft_temperature: TensorOrFloat = 1.0,
    temperature: TensorOrFloat = 1.0,
    top_k: TensorOrInt = 0,
    top_p: TensorOrFloat = 1.0,
    seed: TensorOrInt = 0,
    position: TensorOrInt = 0,
    draft_row_start: Optional[torch.Tensor] = None,
    target_row_start: Optional[torch.Tensor] = None,
    validate: bool = False,
    out: Optional[VerifyResult] = None,
    workspace: Optional[torch.Tensor] = None,
) -> VerifyResult:
    """Verify drafted chains against the target and emit what survives,
    losslessly (DESIGN §3): the emitted sequence is distributed exactly as
    sampling from the target token by token.

    Parameters
    ----------
    target_logits : Tensor [T, V] (ragged) or [B, K+1, V] (padded); fp32 / fp16 / bf16; V <= 2**23
        Target logits. Ragged: request r's n_r + 1 rows start at
        ``cu_num_draft[r] + r`` (or ``target_row_start[r]``); row j scores
        draft j, row n_r gives the bonus token. Rows may be strided; the last
        dimension must be contiguous.
    draft_tokens : Tensor [N] (ragged) or [B, K] (padded), int32
        Drafted tokens; request r's start at ``cu_num_draft[r]`` (or
        ``draft_row_start[r]``). A token outside [0, V) (e.g. -1 padding)
        ends the chain there with ``Status.TOKEN_OUT_OF_RANGE``; the request
        still emits a token from p_j.
    cu_num_draft : Tensor [R+1], int32, optional
        Offsets: request r has ``cu[r+1] - cu[r]`` drafts (0 allowed). None
        with the padded form: every request has K drafts.
    max_draft : int, optional
        Host bound on any request's drafts; sets ``tokens``' width K+1. None:
        K of the padded form, or read from ``cu_num_draft`` (one host sync).
    draft_probs : Tensor [N, V] or [B, K, V], optional
        q as probabilities (dtype of target_logits or float32).
    draft_logits : Tensor [N, V] or [B, K, V], optional
        q = softmax(draft_logits / draft_temperature), the logits taken as
        given (pass the processed logits a drafter sampled from, -inf
        outside its top-k/top-p). Neither given, or draft_temperature 0: q is
        a point mass on the drafted token (greedy or n-gram drafts).
    draft_temperature : float or Tensor [R] / [1]
    temperature, top_k, top_p : scalar or Tensor [R] / [1]
        The target's sampling parameters (temperature 0 = greedy: accept
        while the draft equals the row's argmax, emit the first mismatching
        row's argmax).
    seed, position : int or Tensor [R] / [1], int64
        Random stream: coin of draft j = Philox COIN slot j+1, emitted token
        from row j = EMIT slot j (DESIGN §2). ``position`` is the absolute
        index of the first token this step can emit.
    draft_row_start, target_row_start : Tensor [R], int32, optional
        Override the row starts, e.g. to read ``markov_draft``'s [R, G, V]
        output (start r*G) in place.
    validate : bool
        Check tensor values on the host first (one sync); raise ValueError
        naming the first bad value.
    out : VerifyResult, optional
        Preallocated outputs (``empty_verify_result``): the ``.out`` overload,
        for CUDA graphs and buffer reuse.
    workspace : Tensor, optional
        ``workspace_size("verify_chunk", num_requests=R, vocab_size=V,
        max_draft=K)`` bytes, 16-byte aligned, on the device: no allocation.

    Returns
    -------
    VerifyResult
        ``tokens [R, K+1]`` (accepted drafts, the emitted token, then -1),
        ``accepted [R]``, ``emitted [R]`` (= accepted + 1) and ``status
        [R]``. An aborted request (NaN/+inf in a needed row, nothing left
        after top-k/top-p, bad lengths) has tokens -1 and counts 0.

    Example
    -------
    >>> import torch, dspark_ops
    >>> B, K, V = 2, 3, 100
    >>> target = torch.randn(B, K + 1, V)
    >>> drafts = torch.randint(0, V, (B, K), dtype=torch.int32)
    >>> res = dspark_ops.verify_chunk(target, drafts, temperature=0.0)   # greedy, padded form
    >>> res.tokens.shape, res.emitted.tolist() == (res.accepted + 1).tolist()
    (torch.Size([2, 4]), True)

    Notes
    -----
    No host synchronisation (unless ``max_draft`` is None with ragged input,
    or ``validate``). CPU and CUDA decisions agree except where a
    comparison lies within a relative 1e-5 of its threshold (DESIGN §2).
    On CUDA every target row of the batch is read once (the vocabulary of
    each row split across blocks); a rejected row with draft probabilities
    is read once more to sample the residual.
    """
    if not isinstance(target_logits, torch.Tensor) or target_logits.dim() not in (2, 3):
        raise ValueError(f"{OP}: target_logits must be a tensor [T, V] or [B, K+1, V], got "
                         f"{getattr(target_logits, 'shape', type(target_logits).__name__)}")
    if target_logits.dim() == 3:  # the padded form, read in place
        B, K1, _ = target_logits.shape
        if cu_num_draft is not None or draft_row_start is not None or target_row_start is not None:
            raise ValueError(f"{OP}: the padded form takes no cu_num_draft or row starts")
        if not isinstance(draft_tokens, torch.Tensor) or draft_tokens.dim() != 2 \
                or tuple(draft_tokens.shape) != (B, K1 - 1):
            raise ValueError(f"{OP}: padded draft_tokens must have shape [{B}, {K1 - 1}], got "
                             f"{list(getattr(draft_tokens, 'shape', [])) or type(draft_tokens).__name__}")
        for name, draft in (("draft_probs", draft_probs), ("draft_logits", draft_logits)):
            # Flattened, a [B, K', V] of the wrong K' would be read as other requests' rows.
            if draft is not None and (not isinstance(draft, torch.Tensor) or draft.dim() != 3
                                      or tuple(draft.shape[:2]) != (B, K1 - 1)):
                raise ValueError(f"{OP}: padded {name} must have shape [{B}, {K1 - 1}, V], got "
                                 f"{list(getattr(draft, 'shape', [])) or type(draft).__name__}")
        target_logits = _flatten_padded(target_logits, "target_logits")
        draft_tokens = _flatten_padded(draft_tokens, "draft_tokens")
        draft_probs = _flatten_padded(draft_probs, "draft_probs") if draft_probs is not None else None
        draft_logits = _flatten_padded(draft_logits, "draft_logits") if draft_logits is not None else None
        cu_num_draft = torch.arange(B + 1, dtype=torch.int32, device=target_logits.device) * (K1 - 1)
        max_draft = K1 - 1 if max_draft is None else max_draft
    elif cu_num_draft is None:
        raise ValueError(f"{OP}: ragged target_logits [T, V] need cu_num_draft")
    if max_draft is None:
        if torch.compiler.is_compiling():  # reading it from the tensor is a host sync the graph cannot hold
            raise ValueError(f"{OP}: under torch.compile pass max_draft= (a host int) with ragged inputs")
        max_draft = int((cu_num_draft[1:] - cu_num_draft[:-1]).max()) if cu_num_draft.shape[0] > 1 else 0
    R, V, dev = cu_num_draft.shape[0] - 1, target_logits.shape[1], target_logits.device
    args = (
        target_logits, draft_tokens, cu_num_draft, int(max_draft), draft_probs, draft_logits,
        temperature_tensor(OP, draft_temperature, R, dev, name="draft_temperature"),
        temperature_tensor(OP, temperature, R, dev),
        top_k_tensor(OP, top_k, R, V, dev),
        top_p_tensor(OP, top_p, R, dev),
        seed_tensor(OP, seed, R, dev),
        position_tensor(OP, position, R, dev),
        draft_row_start, target_row_start,
    )
    if validate:
        _validate_verify(*args)
    if out is None and workspace is None:
        return VerifyResult(*_ops.verify_chunk(*args))
    if out is None:  # a workspace alone: fresh outputs, the caller's scratch
        out = empty_verify_result(R, int(max_draft), device=dev)
    _ops.verify_chunk.out(*args, tokens=out.tokens, accepted=out.accepted, emitted=out.emitted, status=out.status,
                          workspace=workspace)
    return out


def _validate_verify(target_logits, draft_tokens, cu, max_draft, draft_probs, draft_logits, draft_temperature,
                     temperature, top_k, top_p, seed, position, draft_row_start, target_row_start) -> None:
    """Host-side value checks (one synchronisation), first bad value named."""
    R = _checks.check_verify_args(target_logits, draft_tokens, cu, max_draft, draft_probs, draft_logits,
                                  draft_temperature, temperature, top_k, top_p, seed, position, draft_row_start,
                                  target_row_start)
    T, V = target_logits.shape

    cu = cu.cpu().long()
    n = cu[1:] - cu[:-1]
    ends = torch.arange(1, R + 1)  # n[r] is checked as cu_num_draft[r + 1]
    _checks.raise_first_invalid(OP, "cu_num_draft", cu[1:], n >= 0, ends, rule="offsets must not decrease")
    _checks.raise_first_invalid(OP, "cu_num_draft", cu[1:], n <= max_draft, ends,
                                rule=f"a request has more than max_draft = {max_draft} drafts")
    d0 = draft_row_start.cpu().long() if draft_row_start is not None else cu[:-1]
    t0 = target_row_start.cpu().long() if target_row_start is not None else cu[:-1] + torch.arange(R)
    draft = draft_probs if draft_probs is not None else draft_logits
    _check_row_ranges(draft_row_start is not None, d0, n, draft_tokens.shape[0], "draft_tokens",
                      "draft_row_start")
    if draft is not None:
        _check_row_ranges(draft_row_start is not None, d0, n, draft.shape[0],
                          "draft_probs" if draft_probs is not None else "draft_logits", "draft_row_start")
    _check_row_ranges(target_row_start is not None, t0, n + 1, T, "target_logits", "target_row_start")
    _checks.validate_sampling_values(OP, temperature, draft_temperature, top_k, top_p, position)
    def spans(starts, counts):  # the indices a request uses, all requests together
        return torch.cat([torch.arange(int(s), int(s) + int(c)) for s, c in zip(starts, counts)] +
                         [torch.zeros(0, dtype=torch.int64)])

    used = spans(d0, n)
    toks = draft_tokens.cpu().long()[used]
    _checks.raise_first_invalid(OP, "draft_tokens", toks, (toks >= 0) & (toks < V), used,
                                rule=f"tokens must be in [0, V = {V})")
    _checks.validate_finite_rows(OP, target_logits, spans(t0, n + 1))


def _check_row_ranges(given: bool, starts: torch.Tensor, counts: torch.Tensor, rows: int, tensor: str,
                      start_name: str) -> None:
    """validate=True: request r reads rows [starts[r], starts[r] + counts[r])
    of `tensor` (`rows` rows); name the first request that reaches outside."""
    ok = (starts >= 0) & (starts + counts <= rows)
    bad = (~ok).nonzero()
    if bad.numel():
        r = int(bad[0, 0])
        s, c = int(starts[r]), int(counts[r])
        origin = f"{start_name}[{r}] = {s}" if given else f"cu_num_draft (its offsets place request {r} at row {s})"
        raise ValueError(f"{OP}: request {r} needs rows [{s}, {s + c}) of {tensor}, which has {rows} rows; "
                         f"from {origin}")


@torch.library.register_fake("dspark_ops::verify_chunk")
def _verify_chunk_fake(target_logits, draft_tokens, cu_num_draft, max_draft, draft_probs, draft_logits,
                       draft_temperature, temperature, top_k, top_p, seed, position, draft_row_start,
                       target_row_start):
    R = _checks.check_verify_args(target_logits, draft_tokens, cu_num_draft, max_draft, draft_probs, draft_logits,
                                  draft_temperature, temperature, top_k, top_p, seed, position, draft_row_start,
                                  target_row_start)
    vec = lambda: target_logits.new_empty((R,), dtype=torch.int32)  # noqa: E731
    return target_logits.new_empty((R, max_draft + 1), dtype=torch.int32), vec(), vec(), vec()


@torch.library.register_fake("dspark_ops::verify_chunk.out")
def _verify_chunk_out_fake(target_logits, draft_tokens, cu_num_draft, max_draft, draft_probs, draft_logits,
                           draft_temperature, temperature, top_k, top_p, seed, position, draft_row_start,
                           target_row_start, *, tokens, accepted, emitted, status, workspace=None):
    _checks.check_verify_args(target_logits, draft_tokens, cu_num_draft, max_draft, draft_probs, draft_logits,
                              draft_temperature, temperature, top_k, top_p, seed, position, draft_row_start,
                              target_row_start)
    _checks.check_verify_outputs(target_logits, cu_num_draft, max_draft, tokens, accepted, emitted, status)
    check_fake_workspace("verify_chunk", workspace, target_logits, num_requests=cu_num_draft.shape[0] - 1,
                         vocab_size=target_logits.shape[1], max_draft=max_draft)
