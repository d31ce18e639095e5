"""Typed, documented wrappers over torch.ops.dspark_ops.*, each beside its
fake (meta) kernel so torch.compile and opcheck work."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

try:
    from . import _C  # noqa: F401  (registers the ops)
except ImportError as err:  # Python calls a missing extension "a circular import": say what it is
    import pathlib as _pathlib
    _here = _pathlib.Path(__file__).resolve().parent
    if not any(_here.glob("_C*.so")) and not any(_here.glob("_C*.pyd")):
        raise ImportError(
            f"dspark_ops: the compiled extension dspark_ops/_C is not built in {_here} -- this is a source tree. "
            "Run from another directory to use an installed dspark_ops, or build here: `make build`, or "
            "`pip install --no-build-isolation -e .`") from err
    raise
from . import _checks
from ._enums import ABORT_MASK, Purpose, Status
from ._params import (TensorOrFloat, TensorOrInt, check_purpose, position_tensor, seed_tensor,
                      slot_tensor, temperature_tensor, top_k_tensor, top_p_tensor)

_ops = torch.ops.dspark_ops


def workspace_size(op_name: str, **sizes: int) -> int:
    """Bytes of scratch an op's ``.out`` form needs on the GPU.

    Parameters
    ----------
    op_name : str
        The op, e.g. ``"sample"``.
    **sizes : int
        All required but ``num_nodes``: ``num_requests`` (R), ``vocab_size``
        (V) and, for ``"verify_chunk"``, ``max_draft``; for
        ``"schedule_verify"``, R and ``group`` (G); for
        ``"verify_tree"``, R, V (2 x R x V floats: p and q after rejections)
        and optionally ``num_nodes``, the target rows (every node of every
        request): room for the row pass, which reads every node row with
        the whole GPU before the walk (faster for small batches); a
        workspace sized without it runs verify_tree without the row pass;
        for ``"markov_draft"``, R, V and ``rank`` (the Markov head's r).

    Returns
    -------
    int
        Bytes; pass ``torch.empty(n, dtype=torch.uint8, device=...)`` as
        ``workspace=`` to run without any allocation (CUDA-graph capture).
        Size it for each batch size you use (or the largest over them): it is
        not monotone in R (small batches -- ``sample``'s R <= 256 rows,
        ``verify_chunk``'s R x (max_draft + 1) <= 256 -- also hold the split
        top-k/top-p select's state).
        The CPU ops need no scratch, but check a given workspace as the
        CUDA op does (size, dtype, alignment), so a mistake shows on the CPU.
        Passed without ``out=``, it is used with freshly allocated outputs.

    Example
    -------
    >>> import dspark_ops
    >>> dspark_ops.workspace_size("sample", num_requests=8, vocab_size=32000) > 0
    True
    """
    # The op's third size: verify_chunk's max_draft, schedule_verify's group (or max_draft), verify_tree's num_nodes.
    third = {"verify_tree": ("num_nodes",), "schedule_verify": ("group", "max_draft"),
             "markov_draft": ("rank",)}.get(op_name, ("max_draft",))
    unknown = set(sizes) - {"num_requests", "vocab_size", *third}
    if unknown:
        raise ValueError(f"dspark_ops.workspace_size: unknown sizes {sorted(unknown)} for '{op_name}'")
    # Every size the op's scratch depends on (a default would size a workspace its CUDA call refuses).
    needs = {"sample": ("num_requests", "vocab_size"), "verify_chunk": ("num_requests", "vocab_size", "max_draft"),
             "verify_tree": ("num_requests", "vocab_size"), "markov_draft": ("num_requests", "vocab_size", "rank"),
             "schedule_verify": ("num_requests",)}.get(op_name, ())
    missing = [k for k in needs if k not in sizes]
    if op_name == "schedule_verify" and not any(k in sizes for k in third):
        missing.append("group")
    if missing:
        raise ValueError(f"dspark_ops.workspace_size: '{op_name}' needs {', '.join(missing)}")
    extra = next((int(sizes[k]) for k in third if k in sizes), 0)
    if extra < 0:
        raise ValueError(f"dspark_ops.workspace_size: {third[0]} must be >= 0, got {extra}")
    return int(_ops.workspace_bytes(op_name, int(sizes.get("num_requests", 0)), int(sizes.get("vocab_size", 1)),
                                    extra))


def check_fake_workspace(op_name: str, workspace: Optional[torch.Tensor], ref: torch.Tensor, sized: bool = True,
                         **sizes: int) -> None:
    """An .out fake kernel's check of a given workspace, as its C++ op makes
    it (none at R = 0): sized by workspace_size(op_name, **sizes) when
    `sized` and every size is a plain int, so a traced size stays dynamic."""
    R = sizes["num_requests"]
    if workspace is None or (_checks.static_ints(R) and R == 0):
        return
    need = workspace_size(op_name, **sizes) if sized and _checks.static_ints(*sizes.values()) else None
    _checks.check_workspace(f"dspark_ops.{op_name}", workspace, need, ref)


# --------------------------------------------------------------------- sample


class SampleResult(NamedTuple):
    """What :func:`sample` returns."""

    tokens: torch.Tensor  # [R] int32: the sampled token, -1 when aborted
    status: torch.Tensor  # [R] int32: Status bits


def empty_sample_result(num_requests: int, *, device=None) -> SampleResult:
    """Preallocated outputs for ``sample(..., out=...)``: tokens [R], status [R]."""
    return SampleResult(torch.empty(num_requests, dtype=torch.int32, device=device),
                        torch.empty(num_requests, dtype=torch.int32, device=device))


def sample(
    logits: torch.Tensor,
    *,
    temperature: TensorOrFloat = 1.0,
    top_k: TensorOrInt = 0,
    top_p: TensorOrFloat = 1.0,
    seed: TensorOrInt = 0,
    position: TensorOrInt = 0,
    purpose: int = Purpose.DRAFT,
    slot: TensorOrInt = 0,
    row_start: Optional[torch.Tensor] = None,
    validate: bool = False,
    out: Optional[SampleResult] = None,
    workspace: Optional[torch.Tensor] = None,
) -> SampleResult:
    """Sample one token per request from logits, reproducibly (DESIGN §2).

    The token is ``argmax_i p_i / E_i`` over the processed distribution p
    (logits / temperature, then top-k, then top-p, then softmax) with
    ``E_i ~ Exp(1)`` drawn from Philox at counter ``(i >> 2, slot | purpose
    << 16, position)`` under key ``seed``: an exact sample of p that depends
    only on the request's own (seed, position, purpose, slot) — not on its
    place in the batch, the backend or the thread layout.

    Parameters
    ----------
    logits : Tensor [T, V], float32 / float16 / bfloat16; V <= 2**23
        Rows of logits; the last dimension must be contiguous (a ``[:, :V]``
        view of a padded LM head's output is fine). Request r reads row r,
        or ``row_start[r]``.
    temperature : float or Tensor [R] or [1], float32
        0 = greedy (argmax, ties to the lowest index). Per request.
    top_k : int or Tensor [R] or [1], int32
        Keep tokens with fewer than k strictly larger logits; 0 or >= V = off.
    top_p : float or Tensor [R] or [1], float32
        Keep tokens whose strictly-more-probable mass (after top-k) is
        < top_p; the argmax is always kept; >= 1 = off (skipped).
    seed : int or Tensor [R] or [1], int64
        Philox key. A scalar gives every request the same stream.
    position : int or Tensor [R] or [1], int64
        Absolute position of the token being sampled (prompt included).
    purpose : int
        ``Purpose.DRAFT`` (drafters, default) or ``Purpose.EMIT`` (plain
        decoding, slot 0) or ``Purpose.COIN``.
    slot : int or Tensor [R] or [1], int32
        Node index of the token (< 65536).
    row_start : Tensor [R], int32, optional
        Row of logits each request reads; default r. Out of range: that
        request aborts with ``Status.BAD_LENGTHS``.
    validate : bool
        Check the values of tensor arguments on the host first (one
        synchronisation) and raise ``ValueError`` naming a bad one.
    out : SampleResult, optional
        Preallocated outputs (``empty_sample_result``); uses the ``.out``
        overload, the form for CUDA graphs and buffer reuse.
    workspace : Tensor, optional
        ``workspace_size("sample", num_requests=R, vocab_size=V)`` bytes on
        the logits' device; without it the CUDA op allocates scratch through
        torch's caching allocator.

    Returns
    -------
    SampleResult
        ``tokens [R] int32`` (-1 for an aborted request) and ``status [R]
        int32`` (:class:`Status` bits: ``NONFINITE_LOGITS`` for a NaN/+inf
        row, ``ALL_MASKED`` for a row of -inf, ``BAD_LENGTHS`` for a bad row
        start or slot).

    Example
    -------
    >>> import torch, dspark_ops
    >>> logits = torch.randn(4, 1000)
    >>> res = dspark_ops.sample(logits, temperature=0.8, top_p=0.9, seed=1234, position=17)
    >>> res.tokens.shape, int(res.status.max())
    (torch.Size([4]), 0)

    Notes
    -----
    No host synchronisation (unless ``validate``); a captured CUDA graph
    replays with fresh numbers when ``seed``/``position`` are device
    tensors. Top-p masses are sums of ``exp(x - max)`` rounded to 2^-40
    fixed point, exact in any order. CPU and CUDA results are identical
    except where two candidates' scores (or a top-p mass and its bound) lie
    within a relative 1e-5.

    See Also
    --------
    dspark_ops.reference.sample : the pure-PyTorch specification.
    """
    op = _checks.SAMPLE_OP
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{op}: logits must be a tensor [rows, V], got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    R = row_start.shape[0] if row_start is not None else logits.shape[0]
    V, dev = logits.shape[1], logits.device
    args = (
        logits,
        temperature_tensor(op, temperature, R, dev),
        top_k_tensor(op, top_k, R, V, dev),
        top_p_tensor(op, top_p, R, dev),
        seed_tensor(op, seed, R, dev),
        position_tensor(op, position, R, dev),
        check_purpose(op, purpose),
        slot_tensor(op, slot, R, dev),
        row_start,
    )
    if validate:
        _validate_sample(*args)
    if out is None and workspace is None:
        return SampleResult(*_ops.sample(*args))
    if out is None:  # a workspace alone: fresh outputs, the caller's scratch
        out = empty_sample_result(R, device=dev)
    _ops.sample.out(*args, tokens=out.tokens, status=out.status, workspace=workspace)
    return out


def _validate_sample(logits, temperature, top_k, top_p, seed, position, purpose, slot, row_start):
    """Host-side value checks (one synchronisation)."""
    op = _checks.SAMPLE_OP
    _checks.check_sample_args(logits, temperature, top_k, top_p, seed, position, purpose, slot, row_start)

    def bad(name, t, ok):
        _checks.raise_first_invalid(op, name, t, ok)

    bad("temperature", temperature, (temperature >= 0) & torch.isfinite(temperature))
    if top_k is not None:
        bad("top_k", top_k, top_k >= 0)
    if top_p is not None:
        bad("top_p", top_p, top_p > 0)
    bad("position", position, position >= 0)
    bad("slot", slot, (slot >= 0) & (slot <= 0xFFFF))
    if row_start is not None:
        bad("row_start", row_start, (row_start >= 0) & (row_start < logits.shape[0]))


@torch.library.register_fake("dspark_ops::sample")
def _sample_fake(logits, temperature, top_k, top_p, seed, position, purpose, slot, row_start):
    R = _checks.check_sample_args(logits, temperature, top_k, top_p, seed, position, purpose, slot, row_start)
    return (logits.new_empty((R,), dtype=torch.int32), logits.new_empty((R,), dtype=torch.int32))


@torch.library.register_fake("dspark_ops::sample.out")
def _sample_out_fake(logits, temperature, top_k, top_p, seed, position, purpose, slot, row_start, *,
                     tokens, status, workspace=None):
    R = _checks.check_sample_args(logits, temperature, top_k, top_p, seed, position, purpose, slot, row_start)
    _checks.check_output(_checks.SAMPLE_OP, "tokens", tokens, R, torch.int32, logits)
    _checks.check_output(_checks.SAMPLE_OP, "status", status, R, torch.int32, logits)
    check_fake_workspace("sample", workspace, logits, num_requests=R, vocab_size=logits.shape[1])


__all__ = ["ABORT_MASK", "Purpose", "SampleResult", "Status", "empty_sample_result", "sample",
           "workspace_size"]
