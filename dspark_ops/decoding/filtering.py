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
        < top_p (in float32); >= 1 = off. The argmax (the lowest index among
        ties) is always kept.

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
    sorted_l, order = torch.sort(x, dim=-1, descending=True, stable=True)  # ties: the lower index first
    keep = torch.ones(R, V, dtype=torch.bool, device=logits.device)
    if top_k is not None:
        k = top_k.to(torch.int64).view(R, 1)
        kth = sorted_l.gather(1, (k.clamp(1, V) - 1))  # the k-th largest logit
        keep = (k <= 0) | (k >= V) | (sorted_l >= kth)  # ties with the k-th are kept
    t = temperature.to(sorted_l.dtype).view(R, 1)
    if top_p is not None:
        probs = torch.softmax((sorted_l / t.clamp(min=1e-30)).masked_fill(~keep, float("-inf")), -1)
        before = probs.cumsum(-1) - probs  # mass of the entries sorted before each one
        # Strictly more probable: the mass before the first entry of each run of equal logits.
        col = torch.arange(V, device=logits.device).expand(R, V)
        starts = torch.ones_like(keep)
        starts[:, 1:] = sorted_l[:, 1:] != sorted_l[:, :-1]
        first = torch.where(starts, col, 0).cummax(-1).values
        p = top_p.to(probs.dtype).view(R, 1)
        keep &= (p >= 1) | (before.gather(1, first) < p)
    keep[:, 0] = True  # the argmax
    keep |= t <= 0  # greedy: unfiltered
    mask = torch.empty_like(keep).scatter_(1, order, keep)
    return logits.masked_fill(~mask, float("-inf"))
