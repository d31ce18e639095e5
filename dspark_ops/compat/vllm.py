"""vLLM v1's ``rejection_sample`` over :func:`dspark_ops.verify_chunk` (a thin
shim: no kernels of its own).

Mirrors ``vllm/v1/sample/rejection_sampler.py::rejection_sample`` at
vllm-project/vllm@7f6fc1c5ce8d02f473b1b923debbfef3fa0b7a6a (GREEDY_TEMPERATURE
= 0, PLACEHOLDER_TOKEN_ID = -1, MAX_SPEC_LEN = 128): the same positional
arguments in the same order, the same output ``[B, max_spec_len + 1]`` int32
with -1 placeholders after the emitted tokens. It replaces vLLM's
``apply_sampling_constraints`` + softmax + ``rejection_sample``, so the one
argument that differs is the target:

* ``target_logits`` are **logits**, not vLLM's ``target_probs``: the
  output of ``apply_logits_processors`` in ``RejectionSampler.forward``
  (penalties, bad words, allowed-token masks applied) and **not** of
  ``apply_sampling_constraints`` (which divides by the temperature in place
  and masks top-k / top-p: the op applies those itself, from
  ``sampling_metadata``, DESIGN §2 order and tie rules; passing constrained
  logits applies them twice, and passing probabilities samples from their
  softmax, nearly uniform — silently either way). Either ``[num_tokens,
  V]`` (the draft positions) or ``[num_tokens + B, V]`` (request r's n_r
  draft rows then its bonus row — our ragged layout, read in place, no
  copy).

The bonus token. vLLM samples it outside (``bonus_token_ids [B, 1]``, from
the bonus row with the request's own sampler). If ``bonus_token_ids`` is
given, the shim emits it exactly when every draft of the request is
accepted: lossless, since it was drawn from the bonus row independently of
our coins. If it is None, the op samples the bonus token itself, which needs
the ``[num_tokens + B, V]`` form. With ``[num_tokens, V]`` logits the op
still needs a (never used) row after each request's drafts, so the shim
builds a ``[num_tokens + B, V]`` copy with zero rows interleaved: one copy
of the logits, measured on the 2-core CPU machine (torch 2.14.1, ``python -m
bench.compat_bench``, medians, 2 threads on an idle machine / 1 thread)
at 56 draft rows x 32000 float32: 0.4 / 0.7 ms next to 8.2 ms for
verify_chunk; with the ``[num_tokens + B, V]`` logits the shim costs 8.4 ms
in all (no conversion: the metadata and the bonus scatter are small ops).

Sampling metadata: any object with vLLM's ``SamplingMetadata`` attributes
``temperature`` ([B] float, None when all greedy; <= 0 is greedy, so vLLM's
old -1 marker works too), ``all_greedy``, ``top_k`` ([B] int or None; 0,
negative or >= V is off), ``top_p`` ([B] float or None; >= 1 is off) and
``generators`` (dict request index -> torch.Generator), and optionally our
``seeds`` / ``positions`` ([B] int64, both or neither). :class:`SamplingMetadata`
below is a minimal one. Random streams: with ``seeds`` and ``positions``, the
Philox contract of DESIGN §2 (no generator touched, no host sync);
otherwise one 64-bit seed per request is drawn with ``torch.randint`` from
its generator (seeded requests: reproducible, like vLLM's) or from torch's
default generator, at position 0 — a request with no drafts whose bonus
token is given draws nothing from its generator (as vLLM), when
``num_draft_tokens`` is given.

Where it differs from vLLM (stricter, or documented):

* Random numbers are ours (Philox, exponential race), not torch's
  ``rand`` / ``exponential_``: tokens for a given generator state differ
  from vLLM's; the distribution is the same (exactly lossless).
* top-k / top-p use DESIGN §2's sort-free rules: top-k keeps every token tied
  with the k-th, top-p keeps a token iff the mass strictly above it is <
  top_p (vLLM sorts and sums in float32: the two differ only on ties and
  where a mass lies within float rounding of the boundary).
* A draft outside [0, V) or with q = 0 ends the chain with the token drawn
  from p_j (``Status`` flag); vLLM reads out of bounds / samples the
  residual. A request with NaN / inf logits, a fully masked row or more
  drafts than ``max_spec_len`` aborts: its row is all -1 (vLLM has no abort).
  ``return_status=True`` also returns the ``Status`` bits [B]. With
  ``num_draft_tokens`` given, too many drafts raise a ValueError.
* ``max_spec_len`` may be up to 65534 (vLLM: 128).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch

from .._enums import ABORT_MASK
from ..chain import verify_chunk
from ._streams import as_int64, draw_seeds

OP = "dspark_ops.compat.vllm.rejection_sample"
PLACEHOLDER_TOKEN_ID = -1
GREEDY_TEMPERATURE = 0


@dataclass
class SamplingMetadata:
    """The fields of vLLM's ``SamplingMetadata`` the shim reads, plus our own
    ``seeds`` / ``positions`` streams ([B] int64, both or neither)."""

    temperature: Optional[torch.Tensor]  # [B] float32; None when all greedy
    all_greedy: bool
    all_random: bool
    top_p: Optional[torch.Tensor] = None  # [B] float32
    top_k: Optional[torch.Tensor] = None  # [B] int
    generators: Dict[int, torch.Generator] = field(default_factory=dict)
    seeds: Optional[torch.Tensor] = None  # [B] int64: our Philox seeds (wins over generators)
    positions: Optional[torch.Tensor] = None  # [B] int64: advance by >= 1 every step


def _offsets(num_draft_tokens, cu_num_draft_tokens, num_tokens: int, device) -> torch.Tensor:
    """Our cu_num_draft [B+1] int32 (leading 0) from vLLM's list or its
    inclusive cumulative tensor [B] (preferred: already on the device; the
    list alone costs a small host-to-device copy)."""
    if cu_num_draft_tokens is not None:
        cu = cu_num_draft_tokens
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.device != device:
            raise ValueError(f"{OP}: cu_num_draft_tokens must be a tensor [B] on {device}, got "
                             f"{list(getattr(cu, 'shape', []))} on {getattr(cu, 'device', None)}")
        if num_draft_tokens is not None and cu.shape[0] != len(num_draft_tokens):
            raise ValueError(f"{OP}: cu_num_draft_tokens has {cu.shape[0]} requests but num_draft_tokens has "
                             f"{len(num_draft_tokens)}")
        return torch.cat([cu.new_zeros(1), cu]).to(torch.int32)
    if num_draft_tokens is None:
        raise ValueError(f"{OP}: pass num_draft_tokens or cu_num_draft_tokens")
    cu = [0]
    for n in num_draft_tokens:
        cu.append(cu[-1] + int(n))
    if cu[-1] != num_tokens:
        raise ValueError(f"{OP}: num_draft_tokens sum to {cu[-1]} but draft_token_ids has {num_tokens} tokens")
    return torch.tensor(cu, dtype=torch.int32).to(device)


def _with_bonus_rows(target_logits: torch.Tensor, cu: torch.Tensor, B: int) -> torch.Tensor:
    """[num_tokens + B, V]: request r's draft rows then a zero row (a finite
    stand-in for the bonus row, whose sample the caller's bonus replaces)."""
    num_tokens = target_logits.shape[0]
    counts = (cu[1:] - cu[:-1]).long()
    req = torch.repeat_interleave(torch.arange(B, device=cu.device), counts, output_size=num_tokens)
    out = target_logits.new_empty(num_tokens + B, target_logits.shape[1])
    out[cu[1:].long() + torch.arange(B, device=cu.device)] = 0
    out.index_copy_(0, torch.arange(num_tokens, device=cu.device) + req, target_logits)
    return out


def _streams(md, B: int, num_draft_tokens, draws_for_empty: bool, device):
    """(seed [B], position [1] or [B]) int64."""
    seeds, positions = getattr(md, "seeds", None), getattr(md, "positions", None)
    if (seeds is None) != (positions is None):
        raise ValueError(f"{OP}: sampling_metadata.seeds and .positions must be given together")
    if seeds is not None:
        return as_int64(OP, "sampling_metadata.seeds", seeds, B, device), \
            as_int64(OP, "sampling_metadata.positions", positions, B, device)
    out = draw_seeds(B, device)
    for i, gen in (getattr(md, "generators", None) or {}).items():
        if num_draft_tokens is not None and num_draft_tokens[i] == 0 and not draws_for_empty:
            continue  # like vLLM: a request with nothing to verify leaves its generator alone
        out[i:i + 1] = draw_seeds(1, device, gen)
    return out, torch.zeros(1, dtype=torch.int64, device=device)


def _per_request(md):
    """temperature, top_k, top_p as the op takes them."""
    if md.all_greedy or md.temperature is None:
        return 0.0, 0, 1.0
    top_k = md.top_k.clamp_min(0).to(torch.int32) if getattr(md, "top_k", None) is not None else 0
    top_p = md.top_p.to(torch.float32) if getattr(md, "top_p", None) is not None else 1.0
    return md.temperature.to(torch.float32), top_k, top_p


def rejection_sample(
    draft_token_ids: torch.Tensor,
    num_draft_tokens: Optional[Sequence[int]],
    max_spec_len: int,
    cu_num_draft_tokens: Optional[torch.Tensor],
    draft_probs: Optional[torch.Tensor],
    target_logits: torch.Tensor,
    bonus_token_ids: Optional[torch.Tensor],
    sampling_metadata,
    *,
    return_status: bool = False,
):
    """vLLM v1's ``rejection_sample`` with target logits, lossless via
    :func:`dspark_ops.verify_chunk` (module docstring: what differs).

    Parameters
    ----------
    draft_token_ids : Tensor [num_tokens], integer
        All requests' drafts, flattened.
    num_draft_tokens : list[int] [B] or None
        Drafts per request (host). At least one of this and
        ``cu_num_draft_tokens`` must be given.
    max_spec_len : int
        Host bound on any request's drafts: the output has max_spec_len + 1
        columns.
    cu_num_draft_tokens : Tensor [B] or None
        vLLM's inclusive cumulative sum of ``num_draft_tokens`` (on the device).
    draft_probs : Tensor [num_tokens, V] or None
        Draft distributions; None for drafts without one (n-gram, EAGLE):
        a point mass on the drafted token.
    target_logits : Tensor [num_tokens, V] or [num_tokens + B, V], float32 / float16 / bfloat16
        Target logits before temperature / top-k / top-p (module docstring).
    bonus_token_ids : Tensor [B, 1] or [B], integer, or None
        The caller's bonus tokens, emitted when every draft is accepted;
        None: the op samples them (needs the [num_tokens + B, V] form).
    sampling_metadata : vLLM's SamplingMetadata or :class:`SamplingMetadata`
    return_status : bool
        Also return ``Status`` bits [B] int32 (keyword only; not vLLM's).

    Returns
    -------
    Tensor [B, max_spec_len + 1] int32: per request the accepted drafts, the
    recovered or bonus token, then PLACEHOLDER_TOKEN_ID (-1); and
    ``status [B]`` when ``return_status``.
    """
    if not isinstance(draft_token_ids, torch.Tensor) or draft_token_ids.dim() != 1:
        raise ValueError(f"{OP}: draft_token_ids must be a tensor [num_tokens], got "
                         f"{list(getattr(draft_token_ids, 'shape', []))}")
    if not isinstance(target_logits, torch.Tensor) or target_logits.dim() != 2:
        raise ValueError(f"{OP}: target_logits must be a tensor [num_tokens(+B), V], got "
                         f"{list(getattr(target_logits, 'shape', []))}")
    if not isinstance(max_spec_len, int) or not 0 <= max_spec_len <= 65534:
        raise ValueError(f"{OP}: max_spec_len must be an int in [0, 65534], got {max_spec_len!r}")
    dev, num_tokens, V = target_logits.device, draft_token_ids.shape[0], target_logits.shape[1]
    cu = _offsets(num_draft_tokens, cu_num_draft_tokens, num_tokens, dev)
    B = cu.shape[0] - 1
    if num_draft_tokens is not None and max(num_draft_tokens, default=0) > max_spec_len:
        raise ValueError(f"{OP}: a request has {max(num_draft_tokens)} drafts, more than max_spec_len = "
                         f"{max_spec_len}")
    if target_logits.shape[0] not in (num_tokens, num_tokens + B):
        raise ValueError(f"{OP}: target_logits must have {num_tokens} (draft positions) or {num_tokens + B} "
                         f"(with bonus rows) rows, got {target_logits.shape[0]}")
    if bonus_token_ids is not None:
        if not isinstance(bonus_token_ids, torch.Tensor) or bonus_token_ids.numel() != B:
            raise ValueError(f"{OP}: bonus_token_ids must be a tensor [B, 1] or [B] with B = {B}, got "
                             f"{list(getattr(bonus_token_ids, 'shape', []))}")
    elif target_logits.shape[0] != num_tokens + B:
        raise ValueError(f"{OP}: bonus_token_ids is None, so target_logits must include the bonus rows "
                         f"([{num_tokens + B}, V]), got {list(target_logits.shape)}")
    if target_logits.shape[0] == num_tokens and B > 0:
        target_logits = _with_bonus_rows(target_logits, cu, B)
    if draft_probs is not None and draft_probs.dtype not in (target_logits.dtype, torch.float32):
        draft_probs = draft_probs.float()

    temperature, top_k, top_p = _per_request(sampling_metadata)
    seeds, positions = _streams(sampling_metadata, B, num_draft_tokens, bonus_token_ids is None, dev)
    res = verify_chunk(target_logits, draft_token_ids.to(torch.int32), cu, max_draft=max_spec_len,
                       draft_probs=draft_probs, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seeds, position=positions)
    tokens = res.tokens
    if bonus_token_ids is not None and B > 0:
        n = (cu[1:] - cu[:-1]).long()
        all_accepted = (res.accepted.long() == n) & ((res.status & int(ABORT_MASK)) == 0)
        col = n.clamp(max=max_spec_len).unsqueeze(1)
        bonus = bonus_token_ids.reshape(B, 1).to(torch.int32)
        tokens.scatter_(1, col, torch.where(all_accepted.unsqueeze(1), bonus, tokens.gather(1, col)))
    return (tokens, res.status) if return_status else tokens
