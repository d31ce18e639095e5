"""Top-k / top-p filtering of a drafter's logits on the device, so a draft
can be sampled from the request's filtered distribution and verified
against exactly that distribution (DraftModelDrafter).

The drafter samples from the filtered logits with the filters off and hands
them to verify_chunk as its draft distribution: losslessness needs only
that q is what was sampled, so this filter need not match DESIGN §2's
fixed-point top-p rule bit for bit; it follows its definitions (ties kept,
the argmax always kept) in floating point."""
from __future__ import annotations

import torch


def filter_top_k_top_p(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """logits [R, V] float; temperature [R] (0: greedy, left unfiltered: its
    draw is the argmax, which every filter keeps), top_k [R] int (0 or >= V:
    off), top_p [R] float (>= 1: off). Returns [R, V] (a new tensor): the
    logits where the request's filters keep a token, -inf elsewhere. Kept:
    tokens with fewer than top_k strictly larger logits, then of those the
    ones whose strictly-more-probable mass under softmax(logits /
    temperature) renormalised over the top-k set is < top_p; the argmax
    always. No host synchronisation."""
    R, V = logits.shape
    sorted_l, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # ties: the lower index first
    k = top_k.to(torch.int64).view(R, 1)
    kth = sorted_l.gather(1, (k.clamp(1, V) - 1))  # the k-th largest logit
    keep = (k <= 0) | (k >= V) | (sorted_l >= kth)  # ties with the k-th are kept
    t = temperature.to(sorted_l.dtype).view(R, 1)
    probs = torch.softmax((sorted_l / t.clamp(min=1e-20)).masked_fill(~keep, float("-inf")), -1)
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
