"""Builders and comparison helpers for verify_tree tests: random tree shapes
(random recursive, paths, stars, EAGLE-like top-k trees), batches of them
with awkward vocabularies and draft rows, the reference with its margins,
and the DESIGN §2 margin rule for comparing an op with the reference."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

import dspark_ops
from dspark_ops import reference as ref
from helpers import MARGIN

NAMES = ("tokens", "accepted", "emitted", "path", "status")
POISON = 0x5A5A


# ------------------------------------------------------------------ shapes


def path_parents(n: int) -> List[int]:
    """A chain of n nodes: node i's parent is i - 1."""
    return [-1] + list(range(n - 1))


def star_parents(n: int) -> List[int]:
    """A root with n - 1 children."""
    return [-1] + [0] * (n - 1)


def random_parents(n: int, g: torch.Generator, chain_bias: float = 0.0) -> List[int]:
    """A random recursive tree: node i's parent is i - 1 with probability
    `chain_bias` (deeper trees), else uniform over 0..i-1 (bushier)."""
    par = [-1]
    for i in range(1, n):
        if chain_bias > 0 and float(torch.rand((), generator=g)) < chain_bias:
            par.append(i - 1)
        else:
            par.append(int(torch.randint(0, i, (), generator=g)))
    return par


def deep_tree(n: int, depth: int, g: torch.Generator, chain_last: bool) -> List[int]:
    """n nodes whose deepest is at exactly `depth` (>= 1): a chain down to
    it plus shallower random nodes, the chain first in index order or last
    (the deepest node then has index n - 1)."""
    rest = n - depth - 1
    if not chain_last:
        return [-1] + list(range(depth)) + [int(torch.randint(0, depth, (), generator=g)) for _ in range(rest)]
    par, dep = [-1], [0]
    for i in range(1, rest + 1):  # a random recursive tree, kept above `depth`
        p = int(torch.randint(0, i, (), generator=g))
        while p > 0 and dep[p] + 1 >= depth:
            p = par[p]
        par.append(p)
        dep.append(dep[p] + 1)
    return par + [0] + list(range(rest + 1, n - 1))


def eagle_parents(depth: int, topk: int, width: int) -> List[int]:
    """An EAGLE-like tree, level by level: the first `width` nodes of each
    level (the drafter's best) get `topk` children each."""
    par, level = [-1], [0]
    for _ in range(depth):
        nxt = []
        for u in level[:width]:
            for _ in range(topk):
                nxt.append(len(par))
                par.append(u)
        level = nxt
    return par


def depths(parents: Sequence[int]) -> List[int]:
    d = [0] * len(parents)
    for i in range(1, len(parents)):
        d[i] = d[parents[i]] + 1 if 0 <= parents[i] < i else 0
    return d


def max_depth_of(trees: Sequence[Sequence[int]]) -> int:
    return max([max(depths(t)) for t in trees if len(t)] or [0])


def mixed_trees(seed: int = 0, scale: int = 1) -> List[List[int]]:
    """One of each shape: a path, a star, random bushy and deep trees, an
    EAGLE tree and a lone root (emits from the root's own row)."""
    g = torch.Generator().manual_seed(seed)
    return [path_parents(5 * scale), star_parents(6 * scale), random_parents(12 * scale, g), eagle_parents(3, 2, 2),
            [-1], random_parents(20 * scale, g, chain_bias=0.7), path_parents(2), random_parents(9, g, 0.4)]


# ----------------------------------------------------------------- batches


def cu_of(trees) -> torch.Tensor:
    cu = torch.zeros(len(trees) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([len(t) for t in trees], dtype=torch.int64), 0).to(torch.int32)
    return cu


def children_of(parents: Sequence[int]) -> List[List[int]]:
    kids = [[] for _ in parents]
    for i in range(1, len(parents)):
        if 0 <= parents[i] < i:  # malformed entries (BAD_TREE tests) have no place
            kids[parents[i]].append(i)
    return kids


def _gumbel_top_k(q: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k distinct tokens drawn from q without replacement, in drawing order
    (Gumbel-top-k: the k largest log q - log E)."""
    e = -torch.log(torch.rand(q.shape, generator=g, dtype=torch.float64))
    keys = torch.where(q > 0, torch.log(q.double()) - torch.log(e), torch.tensor(float("-inf"), dtype=torch.float64))
    return torch.topk(keys, k).indices


def tree_batch(trees, V, dtype=torch.float32, draft="logits", seed=0, siblings="iid", scale=2.0, greedy_bias=0.5,
               noise=0.2, device="cpu"):
    """A batch of trees (lists of request-local parents): target logits
    [M, V], node tokens [M], parents [M], cu [R + 1], and draft rows in kw
    (`draft` = "logits", "probs" (float32) or None). Target rows are the
    draft rows plus `noise` * `scale` Gaussian noise, so children are often
    accepted and walks go deep; each
    node's children are drawn from its draft row (`siblings` = "iid",
    "without_replacement" or "top_k"), and with probability `greedy_bias`
    one child is replaced by the node's target argmax so greedy walks go
    deep."""
    g = torch.Generator().manual_seed(seed)
    cu = cu_of(trees)
    M = int(cu[-1])
    draft_logits = (torch.randn(M, V, generator=g) * scale).to(dtype)
    target = (draft_logits.float() + torch.randn(M, V, generator=g) * scale * noise).to(dtype)
    q = torch.softmax(draft_logits.float(), -1)
    tokens = torch.randint(0, V, (M,), generator=g, dtype=torch.int32)  # roots: any committed token
    parents = torch.tensor([p for t in trees for p in t], dtype=torch.int32)
    am = target.float().argmax(-1)
    for r, t in enumerate(trees):
        c0 = int(cu[r])
        for u, kids in enumerate(children_of(t)):
            k = len(kids)
            if not k:
                continue
            qu = q[c0 + u]
            if siblings == "top_k":
                toks = torch.topk(qu, min(k, V)).indices
            elif siblings == "without_replacement":
                toks = _gumbel_top_k(qu, min(k, V), g)
            else:
                toks = torch.multinomial(qu, k, replacement=True, generator=g)
            if toks.shape[0] < k:  # more siblings than tokens: repeat (flagged in without_replacement)
                toks = torch.cat([toks, torch.multinomial(qu, k - toks.shape[0], replacement=True, generator=g)])
            if float(torch.rand((), generator=g)) < greedy_bias and not bool((toks == am[c0 + u]).any()):
                toks[int(torch.randint(0, k, (), generator=g))] = am[c0 + u]
            tokens[[c0 + i for i in kids]] = toks.to(torch.int32)
    kw = {}
    if draft == "logits":
        kw["draft_logits"] = draft_logits.to(device)
    elif draft == "probs":
        kw["draft_probs"] = q.to(device)
    return target.to(device), tokens.to(device), parents.to(device), cu.to(device), kw


def tree_batch_device(trees, V, dtype=torch.bfloat16, draft="logits", seed=0, scale=4.0, noise=0.2,
                      greedy_bias=0.5, device="cuda"):
    """tree_batch for big shapes, generated on `device` in one pass: each
    node's children are a Gumbel-top-k draw (without replacement, in drawing
    order) from its draft row; with probability `greedy_bias` a node's first
    child carries the node's target argmax instead."""
    g = torch.Generator(device=device).manual_seed(seed)
    cu = cu_of(trees)
    M = int(cu[-1])
    draft_logits = (torch.randn(M, V, generator=g, device=device) * scale).to(dtype)
    target = (draft_logits.float() + torch.randn(M, V, generator=g, device=device) * (scale * noise)).to(dtype)
    parent_row, rank = [], []
    for r, t in enumerate(trees):
        c0, seen = int(cu[r]), {}
        for i, p in enumerate(t):
            if i == 0 or not 0 <= p < i:
                parent_row.append(-1)
                rank.append(0)
                continue
            parent_row.append(c0 + p)
            rank.append(seen.get(p, 0))
            seen[p] = rank[-1] + 1
    k = max(rank) + 1
    parent_row = torch.tensor(parent_row, dtype=torch.int64, device=device)
    rank = torch.tensor(rank, dtype=torch.int64, device=device)
    tokens = torch.randint(0, V, (M,), generator=g, device=device, dtype=torch.int64)
    child = parent_row >= 0
    rows = parent_row[child]
    picks = torch.empty(0, k, dtype=torch.int64, device=device)
    if rows.numel():
        u = torch.rand(rows.shape[0], V, generator=g, device=device).clamp_min(1e-30)
        keys = draft_logits[rows].float() - torch.log(-torch.log(u))
        picks = torch.topk(keys, min(k, V), dim=-1).indices
        chosen = picks.gather(1, rank[child].clamp(max=min(k, V) - 1).unsqueeze(1)).squeeze(1)
        greedy = (torch.rand(M, generator=g, device=device) < greedy_bias)[rows]
        am = target.float().argmax(-1)[rows]
        chosen = torch.where(greedy & (rank[child] == 0), am, chosen)
        tokens[child] = chosen
    tokens = tokens.to(torch.int32)
    parents = torch.tensor([p for t in trees for p in t], dtype=torch.int32, device=device)
    kw = {}
    if draft == "logits":
        kw["draft_logits"] = draft_logits
    elif draft == "probs":
        kw["draft_probs"] = torch.softmax(draft_logits.float(), -1)
    return target, tokens, parents, cu.to(device), kw


# ----------------------------------------------------- reference and checks


def reference_with_margins(*args, **kw):
    margins = []
    out = ref.verify_tree(*args, margins=margins, **kw)
    return out, margins


def poisoned_tree_result(R, D, device="cpu"):
    full = lambda *s: torch.full(s, POISON, dtype=torch.int32, device=device)  # noqa: E731
    return dspark_ops.TreeResult(full(R, D + 1), full(R), full(R), full(R, D + 1), full(R))


def assert_tree_matches(got, want, margins, what=""):
    """Equal outputs, or per request a difference the margin rule allows
    (the reference's smallest decision margin for that request < 1e-5)."""
    for r in range(want[0].shape[0]):
        same = all(torch.equal(g[r].cpu(), w[r].cpu()) for g, w in zip(got, want))
        if not same:
            assert margins[r] < MARGIN, (
                f"{what} request {r}: " + "; ".join(f"{n} {g[r].tolist()} vs {w[r].tolist()}"
                                                   for n, g, w in zip(NAMES, got, want)) + f" (margin {margins[r]:.3g})")


def assert_well_formed(res, node_tokens, parents, cu, V=None):
    """Output invariants for any result: emitted = accepted + 1 (0 when
    aborted); path = root then a chain of children whose tokens are the
    accepted tokens; -1 beyond; the emitted token in range."""
    tokens, accepted, emitted, path, status = (t.cpu() for t in res)
    toks, par, cu = node_tokens.cpu(), parents.cpu(), cu.cpu()
    W = tokens.shape[1]
    for r in range(tokens.shape[0]):
        a, e = int(accepted[r]), int(emitted[r])
        if int(status[r]) & int(dspark_ops.ABORT_MASK):
            assert a == 0 and e == 0 and tokens[r].tolist() == [-1] * W and path[r].tolist() == [-1] * W, r
            continue
        assert e == a + 1, r
        assert path[r, 0] == 0 and tokens[r, a:].tolist()[1:] == [-1] * (W - a - 1), r
        assert path[r, a + 1:].tolist() == [-1] * (W - a - 1), r
        c0 = int(cu[r])
        for i in range(1, a + 1):
            node, prev = int(path[r, i]), int(path[r, i - 1])
            assert int(par[c0 + node]) == prev, f"request {r}: path {path[r].tolist()} is not a chain"
            assert int(toks[c0 + node]) == int(tokens[r, i - 1]), f"request {r}: token of node {node}"
        if V is not None:
            assert 0 <= int(tokens[r, a]) < V, r


def slice_request(r, target, node_tokens, parents, cu, kw):
    """Request r alone, through fresh [n, ...] slices of every [M, ...] input
    and [1] slices of every [R] parameter."""
    R = cu.shape[0] - 1
    c0, c1 = int(cu[r]), int(cu[r + 1])
    one = {}
    for k, v in kw.items():
        if k in ("draft_probs", "draft_logits") and v is not None:
            one[k] = v[c0:c1]
        elif isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == R:
            one[k] = v[r:r + 1]
        else:
            one[k] = v
    return (target[c0:c1], node_tokens[c0:c1], parents[c0:c1],
            torch.tensor([0, c1 - c0], dtype=torch.int32, device=cu.device), one)


# ------------------------------------------------------------ path = chain


def chain_form(target, node_tokens, cu, kw):
    """The verify_chunk call that reads a batch of path-shaped trees in
    place: request r's drafts are nodes 1..n-1 (tokens shifted by one, so
    one draft_row_start serves tokens and draft rows: draft j's q is node
    j's draft row), its n target rows start at node 0. Returns (args, kw)."""
    R = cu.shape[0] - 1
    shifted = torch.cat([node_tokens[1:], node_tokens.new_full((1,), -1)])
    counts = (cu[1:] - cu[:-1] - 1).clamp(min=0)
    cu_chain = torch.zeros_like(cu)
    cu_chain[1:] = torch.cumsum(counts, 0).to(cu.dtype)
    starts = cu[:-1].clone()
    ckw = {k: v for k, v in kw.items() if k != "sibling_mode" and k != "max_depth"}
    ckw.update(draft_row_start=starts, target_row_start=starts.clone(),
               max_draft=int(counts.max()) if R else 0)
    if "max_depth" in kw:
        ckw["max_draft"] = kw["max_depth"]
    return (target, shifted, cu_chain), ckw
