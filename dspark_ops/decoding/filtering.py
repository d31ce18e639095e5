"""Top-k / top-p filtering of a drafter's logits on the device, so a draft
can be sampled from the request's filtered distribution and verified
against exactly that distribution (DraftModelDrafter).

The drafter samples from the filtered logits with the filters off and hands
them to verify_chunk as its draft distribution: losslessness needs only
that q is what was sampled, so this filter need not match DESIGN §2's
fixed-point top-p rule bit for bit. It follows its definitions (ties kept,
the argmax always kept) with float32 sums, so a CPU and a CUDA run may keep
different sets where a top-p mass lies within float32 rounding of top_p
(their drafts, not their losslessness, then differ)."""
from __future__ import annotations

from typing import Optional

import torch


def filter_top_k_top_p(logits: torch.Tensor, temperature: torch.Tensor, top_k: Optional[torch.Tensor],
                       top_p: Optional[torch.Tensor]) -> torch.Tensor:
    """Mask the logits each request's top-k and top-p filters cut.

    Parameters
    ----------
    logits : Tensor [R, V], float32 / float16 / bfloat16 / float64
    temperature : Tensor [R]
        0 (or less) = greedy: the row is left unfiltered (its draw is the
        argmax, which every filter keeps).
    top_k : Tensor [R] integer, or None (off)
        Keep tokens with fewer than top_k strictly larger logits; <= 0 or
        >= V = off.
    top_p : Tensor [R] float, or None (off)
        Of those, keep tokens whose strictly-more-probable mass under
        softmax(logits / temperature), renormalised over the top-k set, is
        < top_p (in float32); >= 1 = off. The largest logit is always kept
        (with its ties: the kept set is every logit at or above the
        smallest kept one, so tied logits are kept or cut together).

    Returns
    -------
    Tensor [R, V], logits' dtype: a new tensor, the logits where kept and
    -inf elsewhere. No host synchronisation.

    Example
    -------
    >>> import torch
    >>> from dspark_ops.decoding.filtering import filter_top_k_top_p
    >>> out = filter_top_k_top_p(torch.tensor([[0.0, 2.0, 1.0, 2.0]]), torch.ones(1), torch.tensor([2]), None)
    >>> out.tolist()
    [[-inf, 2.0, -inf, 2.0]]
    """
    R, V = logits.shape
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    sorted_l = torch.sort(x, dim=-1, descending=True).values
    # The kept set is every logit >= the smallest kept one: ties at a boundary are kept or cut together (their
    # strictly-larger count and strictly-more-probable mass are the group's first member's).
    floor = None
    if top_k is not None:
        k = top_k.to(torch.int64).view(R, 1)
        floor = torch.where((k <= 0) | (k >= V), float("-inf"), sorted_l.gather(1, k.clamp(1, V) - 1))
    t = temperature.to(sorted_l.dtype).view(R, 1)
    if top_p is not None:
        z = sorted_l / t.clamp(min=1e-30)
        if floor is not None:
            z = z.masked_fill(sorted_l < floor, float("-inf"))
        probs = torch.softmax(z, -1)
        p = top_p.to(probs.dtype).view(R, 1)
        before = probs.cumsum(-1) - probs  # 0 exactly for the argmax, >= its probability after it
        cut = (before >= p) & (before > 0) & (p < 1)  # the mass sorted before reaches top_p (>= 1: off); the argmax
        # stays (no in-place write of a Python scalar: the draft chain may be a CUDA graph)
        p_floor = sorted_l.masked_fill(cut, float("inf")).amin(-1, keepdim=True)
        floor = p_floor if floor is None else torch.maximum(floor, p_floor)
    if floor is None:
        return logits.clone()
    floor = floor.masked_fill(t <= 0, float("-inf"))  # greedy: unfiltered
    return logits.masked_fill(x < floor, float("-inf"))
