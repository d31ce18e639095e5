"""Builders and comparison helpers for verify_chunk tests."""
from __future__ import annotations

import torch

from dspark_ops import reference as ref
from helpers import MARGIN


def ragged_batch(lengths, V, dtype=torch.float32, mode="logits", seed=0, device="cpu", scale=2.0,
                 sample_drafts=True):
    """A ragged batch: target logits [N + R, V], draft tokens [N] (drawn from
    q when sample_drafts), cu [R + 1], and draft probs or logits [N, V]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    R, N = lengths.shape[0], int(lengths.sum())
    cu = torch.zeros(R + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    target = (torch.randn(N + R, V, generator=g) * scale).to(dtype)
    draft_logits = (torch.randn(N, V, generator=g) * scale).to(dtype)
    q = torch.softmax(draft_logits.float(), -1)
    if sample_drafts and N:
        tokens = torch.multinomial(q, 1, generator=g).squeeze(1).to(torch.int32)
    else:
        tokens = torch.randint(0, V, (N,), generator=g, dtype=torch.int32)
    kw = {}
    if mode == "logits":
        kw["draft_logits"] = draft_logits.to(device)
    elif mode == "probs":
        kw["draft_probs"] = q.to(device)
    return target.to(device), tokens.to(device), cu.to(device), kw


def assert_verify_matches(got, want, margins, what=""):
    """Equal outputs, or per request a difference the margin rule allows."""
    names = ("tokens", "accepted", "emitted", "status")
    for r in range(want[0].shape[0]):
        same = all(torch.equal(g[r].cpu(), w[r].cpu()) for g, w in zip(got, want))
        if not same:
            assert margins[r] < MARGIN, (
                f"{what} request {r}: " + "; ".join(f"{n} {g[r].tolist()} vs {w[r].tolist()}"
                                                   for n, g, w in zip(names, got, want)) + f" (margin {margins[r]:.3g})")


def reference_with_margins(*args, **kw):
    margins = []
    out = ref.verify_chunk(*args, margins=margins, **kw)
    return out, margins
