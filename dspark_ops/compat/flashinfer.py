"""FlashInfer's ``flashinfer.sampling.chain_speculative_sampling`` over
:func:`dspark_ops.verify_chunk` (a thin shim: no kernels of its own).

Same arguments, same outputs (``output_token_ids [B, n+1]`` int32 padded
with -1, the two counters accumulated in place) — mirrored from FlashInfer's
public docstring and kernel at flashinfer-ai/flashinfer@fb28d72 (2026-08-22).

Probabilities in, logits to the op. ``verify_chunk`` takes target logits, so
the shim passes ``log(target_probs)`` (float32) at temperature 1, no top-k /
top-p: ``softmax(log p) = p / sum(p)`` exactly, so the emitted tokens follow
the given target probabilities (renormalised, as every row should already be)
up to the float32 rounding of one log and one exp per entry (a relative
error of about (|log p| + 2) * 2^-23, ~3e-6 at p = 1e-9: far below what any
test of the distribution can see).
Zero probabilities become -inf, which the op treats as masked (never sampled,
never accepted). There is no exact mapping without the log: the op's only
probability input is ``draft_probs``, which is passed as given (float32).
Cost, measured on the 2-core CPU machine (torch 2.14.1, ``python -m
bench.compat_bench``, medians, 2 threads on an idle machine / 1
thread): B = 8, n = 7, V = 32000 float32: log 1.1 / 2.1 ms and the
independent counter's coins 0.4 ms, next to 4.5 ms for verify_chunk itself
(the whole shim 6.6 / 7.3 ms); B = 1, n = 7, V = 152064 bfloat16: cast + log
0.7 / 1.3 ms next to 2.4 ms (shim 3.9 / 4.4 ms). On a GPU the log is one
elementwise pass over [B, n+1, V] (read, and write float32) and the coins
about 150 tiny launches; not measured there yet.

Where it differs from FlashInfer (stricter or documented, never looser):

* ``maybe_output_accepted_token_num`` ("accepted if each draft is considered
  independently") counts, per row, the drafts verify_chunk accepted plus the
  drafts after the first rejection whose own coin accepts them:
  ``u_j * q_j(x_j) < p_j(x_j)`` with probabilities as given (float32), u_j
  the Philox COIN of slot j + 1 that verify_chunk would draw for draft j
  (``_streams.coin_uniforms``, a vectorised torch computation of about 150
  elementwise ops on [B, n]; tests check it reproduces the op's decisions).
  The rejected draft itself is never counted. FlashInfer's kernel instead
  draws a second, fresh coin at the rejected position and may count it, so
  its counter's mean exceeds sum_j min(1, p_j/q_j) by that position's
  acceptance probability whenever a draft is rejected; ours has exactly that
  mean (a test checks it). A draft outside [0, V) or with q_j(x_j) = 0 is
  never counted.
* Bad drafts are safe: a token outside [0, V) (e.g. -1) or with q = 0 ends the
  chain there and the token is drawn from p_j (``Status`` flag); FlashInfer
  reads out of bounds or accepts it. A row the op needs with NaN / inf /
  negative probabilities or no mass aborts: tokens -1, counters unchanged.
  ``return_status=True`` also returns the ``Status`` bits [B].
* Random numbers follow our Philox contract, not cuRAND's, so the tokens for
  a given seed differ from FlashInfer's (the distribution is the same).
  ``seed`` and ``offset`` must be given together (FlashInfer silently falls
  back to the generator when one is missing): ``offset`` is our ``position``
  (advance it by >= 1 every call), ``seed`` a per-row tensor [B] or one
  value (int or [1]) spread to distinct per-row streams (seed + r * golden
  ratio, mod 2^64) — as FlashInfer 0.7.2 gives each row its own cuRAND
  subsequence. An int ``seed`` with a tensor ``offset`` is accepted
  (FlashInfer refuses it).
  Neither given: one 64-bit seed per row is drawn with ``torch.randint`` from
  ``generator`` (torch's default generator of the device when None), which
  advances, and position 0. No host synchronisation on either path (a CPU
  generator for CUDA tensors costs one small host-to-device copy).
* Probabilities must be float32, float16 or bfloat16 (FlashInfer casts
  float64 with ``.float()``; this raises, naming the argument).
* ``deterministic`` is accepted and ignored: verify_chunk is always
  deterministic (bit-identical across runs and batch layouts).
* Counters of any integer dtype are updated in place (FlashInfer's op
  converts them with ``.int()``, so an int64 counter is left unchanged).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .._enums import ABORT_MASK
from ..chain import verify_chunk
from ._streams import as_int64, coin_uniforms, draw_seeds, per_row_seeds

OP = "dspark_ops.compat.flashinfer.chain_speculative_sampling"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(draft_probs, draft_token_ids, target_probs) -> Tuple[int, int, int]:
    for name, t in (("draft_probs", draft_probs), ("target_probs", target_probs)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.dtype not in _FLOATS:
            raise ValueError(f"{OP}: {name} must be a float32/float16/bfloat16 tensor [B, n(+1), V], got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
    B, n, V = draft_probs.shape
    if tuple(target_probs.shape) != (B, n + 1, V):
        raise ValueError(f"{OP}: target_probs must have shape [{B}, {n + 1}, {V}] (draft_probs is "
                         f"{list(draft_probs.shape)}), got {list(target_probs.shape)}")
    if (not isinstance(draft_token_ids, torch.Tensor) or tuple(draft_token_ids.shape) != (B, n)
            or draft_token_ids.dtype.is_floating_point or draft_token_ids.dtype == torch.bool):
        raise ValueError(f"{OP}: draft_token_ids must be an integer tensor of shape [{B}, {n}], got "
                         f"{getattr(draft_token_ids, 'dtype', None)} {list(getattr(draft_token_ids, 'shape', []))}")
    for name, t in (("draft_token_ids", draft_token_ids), ("target_probs", target_probs)):
        if t.device != draft_probs.device:
            raise ValueError(f"{OP}: {name} must be on {draft_probs.device} like draft_probs, got {t.device}")
    return B, n, V


def _counter(name: str, t: Optional[torch.Tensor], B: int, device: torch.device) -> torch.Tensor:
    if t is None:
        return torch.zeros(B, dtype=torch.int32, device=device)
    if (not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != B or t.dtype.is_floating_point
            or t.dtype == torch.bool or t.device != device):
        raise ValueError(f"{OP}: {name} must be an integer tensor [{B}] on {device}, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))} "
                         f"on {getattr(t, 'device', None)}")
    return t


def _stream(seed, offset, generator, B: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(seed [B], position [1] or [B]) int64 on `device`."""
    if (seed is None) != (offset is None):
        raise ValueError(f"{OP}: seed and offset must be given together (got seed={seed!r}, offset={offset!r}); "
                         f"neither draws the seeds from the generator")
    if seed is None:
        return draw_seeds(B, device, generator), torch.zeros(1, dtype=torch.int64, device=device)
    return per_row_seeds(as_int64(OP, "seed", seed, B, device), B), as_int64(OP, "offset", offset, B, device)


def _target_logits(target_probs: torch.Tensor) -> torch.Tensor:
    """log(target_probs) as float32 [B*(n+1), V], contiguous, one pass (two for
    a dtype cast); the input is never modified."""
    x = target_probs.to(torch.float32, memory_format=torch.contiguous_format)
    x = torch.log(x) if x.data_ptr() == target_probs.data_ptr() else x.log_()
    return x.reshape(-1, x.shape[-1])


def _independent_accepts(draft_probs, target_probs, tokens, u, accepted) -> torch.Tensor:
    """[B] int64: accepted + drafts after the first rejection that their own
    coin accepts (u_j * q_j(x_j) < p_j(x_j), float32, probabilities as given)."""
    n, V = tokens.shape[1], draft_probs.shape[2]
    ok = (tokens >= 0) & (tokens < V)
    idx = tokens.clamp(0, V - 1).unsqueeze(-1)
    q = draft_probs.gather(2, idx).squeeze(-1).float()
    p = target_probs[:, :n].gather(2, idx).squeeze(-1).float()
    coin = ok & (q > 0) & (u * q < p)
    after = torch.arange(n, device=tokens.device).unsqueeze(0) > accepted.unsqueeze(1)
    return accepted.long() + (coin & after).sum(1)


def chain_speculative_sampling(
    draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    target_probs: torch.Tensor,
    maybe_output_accepted_token_num: Optional[torch.Tensor] = None,
    maybe_output_emitted_draft_token_num: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    *,
    return_status: bool = False,
):
    """Chain speculative sampling with FlashInfer's signature, lossless via
    :func:`dspark_ops.verify_chunk` (see the module docstring for what differs).

    Parameters
    ----------
    draft_probs : Tensor [B, n, V], float32 / float16 / bfloat16
        The draft distributions the draft tokens were sampled from.
    draft_token_ids : Tensor [B, n], integer
    target_probs : Tensor [B, n+1, V], float32 / float16 / bfloat16
        Target probabilities; row n gives the bonus token.
    maybe_output_accepted_token_num : Tensor [B], integer, optional
        Incremented in place by the drafts each row would accept with
        independent coins at every position (module docstring).
    maybe_output_emitted_draft_token_num : Tensor [B], integer, optional
        Incremented in place by the drafts actually emitted (accepted).
    deterministic : bool
        Ignored: always deterministic.
    generator : torch.Generator, optional
        Source of per-row seeds when seed/offset are not given.
    seed, offset : int or Tensor [1] / [B] (int64 / uint64), optional
        Our Philox seed and position (both or neither).
    return_status : bool
        Also return ``Status`` bits [B] int32 (keyword only; not FlashInfer's).

    Returns
    -------
    (output_token_ids [B, n+1] int32, accepted [B], emitted [B]) — the
    counters are the tensors passed in (or fresh int32 zeros plus this call's
    counts) — and ``status [B]`` when ``return_status``.
    """
    B, n, V = _check_inputs(draft_probs, draft_token_ids, target_probs)
    dev = draft_probs.device
    acc_out = _counter("maybe_output_accepted_token_num", maybe_output_accepted_token_num, B, dev)
    emit_out = _counter("maybe_output_emitted_draft_token_num", maybe_output_emitted_draft_token_num, B, dev)
    seeds, position = _stream(seed, offset, generator, B, dev)

    q = draft_probs.to(torch.float32, memory_format=torch.contiguous_format)
    tokens = draft_token_ids.to(torch.int32, memory_format=torch.contiguous_format)
    cu = torch.arange(B + 1, dtype=torch.int32, device=dev) * n  # ragged form: also fine for n = 0
    res = verify_chunk(_target_logits(target_probs), tokens.reshape(-1), cu, max_draft=n,
                       draft_probs=q.reshape(-1, V), temperature=1.0, seed=seeds, position=position)

    if n > 0:
        ok = (res.status & int(ABORT_MASK)) == 0
        u = coin_uniforms(seeds, position.expand(B), n)
        indep = _independent_accepts(q, target_probs, tokens, u, res.accepted)
        acc_out.add_(torch.where(ok, indep, 0).to(acc_out.dtype))
    emit_out.add_(res.accepted.to(emit_out.dtype))  # 0 for an aborted row
    if return_status:
        return res.tokens, acc_out, emit_out, res.status
    return res.tokens, acc_out, emit_out
