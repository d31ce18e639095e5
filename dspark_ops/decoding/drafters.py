"""Drafters: what proposes the tokens a speculative step verifies. Every
drafter samples through our ops with purpose DRAFT (slot = node index: draft
j is node j+1), never with the verifier's counters (DESIGN §2)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch

from .._enums import Purpose
from ..kv import RequestState
from ..ops import sample
from .._host import to_device
from .filtering import filter_top_k_top_p
from .graphs import StepGraphs


@dataclass
class Draft:
    """One step's proposals for R requests (n = the drafter's num_draft)."""

    tokens: torch.Tensor  # [R, n] int32; -1 where a request has fewer proposals
    draft_logits: Optional[torch.Tensor] = None  # [R, n, V]: q = softmax(logits / draft_temperature); None: point masses
    draft_temperature: Optional[torch.Tensor] = None  # [R] float32
    confidence: Optional[torch.Tensor] = None  # [R, n]: per-position confidence for schedule_verify
    width: Optional[int] = None  # host-known proposals of the longest row (< n): the target pass is trimmed to it
    # Host-known proposals per request (each row's first lengths[r] tokens; -1 after): when they differ, the
    # target pass is ragged (each request's root and its own drafts, no -1 padding). None: padded to the width.
    lengths: Optional[List[int]] = None
    # [R, n] int32: a tree draft — draft j (node j+1) is a child of node parents[r, j] (0 = the root, the last
    # committed token; else a draft node, < j + 1); verified with verify_tree, as point masses (draft_logits
    # None: deterministic siblings). None: a chain.
    parents: Optional[torch.Tensor] = None


@dataclass
class Sampling:
    """The requests' sampling parameters, as device tensors [R]."""

    temperature: torch.Tensor
    seed: torch.Tensor
    top_k: Optional[torch.Tensor] = None  # int32 (0: off); drafters filter their drafts with them
    top_p: Optional[torch.Tensor] = None  # float32 (1: off)
    # Known on the host: some sampled request (temperature > 0) has top-k or top-p on (False: drafters may skip
    # the filters' work; SpeculativeDecoder.generate sets it per call).
    filters: bool = True

    def filtering(self) -> bool:
        """Whether drafts should be filtered by top_k / top_p (a None one is off)."""
        return self.filters and (self.top_k is not None or self.top_p is not None)


class Drafter(ABC):
    """The interface every drafter implements (DraftModelDrafter, NGramDrafter,
    and DSpark's block drafter, which also fills Draft.confidence)."""

    num_draft: int
    # Target layers whose hidden states the drafter reads (DSpark's context features): the loop asks the
    # target's passes for them and hands them to observe().
    hidden_layers: Tuple[int, ...] = ()
    # The drafter reads only each request's last processed row: after the prefill observe() gets [R, 1, k, d]
    # (the last prompt row, processed 1; 0 for a request with none) instead of every prompt row.
    observe_last_only: bool = False

    def start(self, num_requests: int, max_len: int, device: torch.device) -> None:
        """A new generate() call with these requests."""

    def observe(self, rows: Optional[torch.Tensor], processed: Optional[torch.Tensor]) -> None:
        """The target's hidden states (layers hidden_layers) of its last
        pass, rows [R, w, len(hidden_layers), d], of which each request's
        first processed[r] ([R] int32) are now processed tokens of its
        sequence, in order (after the prefill: the prompt but its last
        token, 0 for a one-token prompt; after a step: the root and the
        accepted drafts); None, None when the prefill had no tokens. Only
        called when hidden_layers is not empty; valid until the next step.
        With observe_last_only the prefill's rows are [R, 1, ...], each
        request's last prompt row, and processed is then 1 (0 for a request
        with none), not the prompt's length."""

    @abstractmethod
    def propose(self, seqs: List[List[int]], state: RequestState, sampling: Sampling) -> Draft:
        """Drafts after each request's sequence (prompt + accepted tokens;
        its last token is state.last_token, its length state.position)."""

    def commit(self, accepted: List[int], finished_before: List[bool]) -> None:
        """After verification: request r accepted `accepted[r]` drafts
        (ignored where it had finished before the step)."""


class NGramDrafter(Drafter):
    """Prompt lookup: the tokens that followed the latest earlier occurrence
    of the sequence's last k tokens (k = max_ngram down to 1). Deterministic
    drafts (point masses); host-side lists, no model.

    branches > 1 drafts a tree: the continuations of up to `branches`
    earlier occurrences (latest first, longest matching tail first), merged
    into a trie of at most num_draft nodes and verified in one pass with
    verify_tree (deterministic siblings: lossless for any drafting)."""

    def __init__(self, max_ngram: int = 3, num_draft: int = 7, *, branches: int = 1):
        if max_ngram < 1 or num_draft < 1 or branches < 1:
            raise ValueError(f"NGramDrafter: need max_ngram, num_draft and branches >= 1, got {max_ngram}, "
                             f"{num_draft}, {branches}")
        self.max_ngram, self.num_draft, self.branches = max_ngram, num_draft, branches

    def occurrences(self, seq: List[int]) -> Iterator[Tuple[int, List[int]]]:
        """(k, continuation) of every earlier occurrence of the sequence's
        last k tokens (k = max_ngram down to 1; later occurrences first);
        a continuation is the <= num_draft tokens after it (never empty)."""
        for k in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            tail = seq[-k:]
            for start in range(len(seq) - k - 1, -1, -1):
                if seq[start:start + k] == tail:
                    yield k, seq[start + k:start + k + self.num_draft]

    def continuations(self, seq: List[int]) -> List[List[int]]:
        """Up to `branches` distinct continuations, best first: longer
        matching tails first, then later occurrences first."""
        out: List[List[int]] = []
        for _, cont in self.occurrences(seq):
            if not any(c[:len(cont)] == cont for c in out):
                out.append(cont)
                if len(out) == self.branches:
                    break
        return out

    def tree(self, seq: List[int]):
        """(tokens, parents) of the trie of continuations(seq), at most
        num_draft nodes, filled breadth first (depth by depth, better
        branches first at each depth, so one long branch cannot take the
        whole budget); a parent comes before its children and better
        siblings first. parents index nodes with 0 = the root."""
        conts = self.continuations(seq)
        tokens: List[int] = []
        parents: List[int] = []
        children = {0: {}}
        at = [0] * len(conts)  # the node each continuation has reached; -1: cut off by the budget
        for depth in range(max((len(c) for c in conts), default=0)):
            for b, cont in enumerate(conts):
                if depth >= len(cont) or at[b] < 0:
                    continue
                node, t = at[b], cont[depth]
                nxt = children[node].get(t)
                if nxt is None:
                    if len(tokens) == self.num_draft:
                        at[b] = -1
                        continue
                    tokens.append(t)
                    parents.append(node)
                    nxt = len(tokens)
                    children[node][t] = nxt
                    children[nxt] = {}
                at[b] = nxt
        return tokens, parents

    def lookup(self, seq: List[int]) -> List[int]:
        """The continuation of the latest earlier match of the longest tail
        that has num_draft tokens after it (else of the latest match)."""
        found, found_k = None, None
        for k, cont in self.occurrences(seq):
            if found_k is not None and k != found_k:  # the longest matching tail had no full continuation
                break
            if len(cont) == self.num_draft:
                return cont
            if found is None:
                found, found_k = cont, k
        return found or []

    def propose(self, seqs, state, sampling) -> Draft:
        dev = state.last_token.device
        if self.branches > 1:
            trees = [self.tree(s) for s in seqs]
            width = max(len(t) for t, _ in trees)
            toks = [t + [-1] * (width - len(t)) for t, _ in trees]  # padding: flagged children of the root
            pars = [p + [0] * (width - len(p)) for _, p in trees]
            return Draft(to_device(toks, torch.int32, dev).view(len(seqs), width), width=width,
                         parents=to_device(pars, torch.int32, dev).view(len(seqs), width))
        found = [self.lookup(s) for s in seqs]
        width = max(len(f) for f in found)  # no padded rows through the target (host lists: no sync)
        rows = [f + [-1] * (width - len(f)) for f in found]
        return Draft(to_device(rows, torch.int32, dev).view(len(seqs), width), width=width,
                     lengths=[len(f) for f in found])


class DraftModelDrafter(Drafter):
    """A small model drafting a chain autoregressively: up to num_draft
    single-token steps per verification, sampled with the request's
    temperature from softmax(logits / T), which verify_chunk reads as the
    draft rows: exactly what was sampled (lossless).

    filter_drafts=True also applies the request's top-k and top-p: each row
    is filtered on the device (filter_top_k_top_p: -inf outside the kept
    set), sampled with the filters off, and the filtered rows are the
    Draft's, so q is still exactly what was sampled. Drafts then stay out of
    the tail the target's own filters cut (always rejected there): on the
    embedded pair, 16 requests a batch, it raised the accepted drafts per
    step from 2.89 to 3.17 (T = 1, top-p 0.9), 3.01 to 3.73 (T = 0.7, top-p
    0.7) and 2.63 to 3.08 (top-k 5), and lowered them from 2.91 to 2.84 at
    top-k 20. But the filter's ~12 small ops per draft token cost about as
    much as that gains with this tiny draft model on a CPU: tokens/s went
    from -14 % to +8 % at batch 16 and fell 2-20 % at batch 1
    (bench/bench_sampled_drafts.py, bench/results/sampled_drafts_*), so it
    is off by default. With a draft model whose step costs far more than
    those ops (a real one on a GPU, where the chain is one CUDA graph) it
    should pay; not measured.

    stop_below: a request stops drafting at position k when the draft's top
    probability there (softmax of its logits at temperature 1) is below this
    value, before x_k is sampled; drafting ends when every request has
    stopped (one more host read per draft step). Lossless: whether x_k is
    proposed depends only on x_1..x_{k-1}, and a stopped position is padded
    with -1, which verify_chunk answers by sampling from the target itself
    (DESIGN §3). 0 (default) drafts num_draft tokens always.

    cuda_graph: the chain (the n draws and the n - 1 single-token forwards,
    and the catch-up forward when every request catches up the same 1 or 2
    tokens, as at batch 1) runs from static buffers, as one CUDA graph per
    shape on a GPU with a BuiltinTarget (captured on its second step;
    graphs.py); not with stop_below, whose stops read the host. The Draft's
    tensors are then the graph's outputs, rewritten by the next propose():
    consume them first (SpeculativeDecoder copies them into its own step
    buffers)."""

    def __init__(self, target, num_draft: int = 5, *, stop_below: float = 0.0, cuda_graph: bool = False,
                 filter_drafts: bool = False):
        if num_draft < 1:
            raise ValueError(f"DraftModelDrafter: num_draft must be >= 1, got {num_draft}")
        if not 0.0 <= stop_below < 1.0:
            raise ValueError(f"DraftModelDrafter: stop_below must be in [0, 1), got {stop_below}")
        self.model, self.num_draft, self.stop_below = target, num_draft, stop_below
        self.cuda_graph = cuda_graph and stop_below == 0
        self.filter_drafts = filter_drafts

    def start(self, num_requests, max_len, device) -> None:
        self.fed = [0] * num_requests  # tokens of each sequence in the draft cache
        p = next(self.model.model.parameters()) if hasattr(self.model, "model") else None
        shape = (num_requests, max_len + self.num_draft + 1, str(device), None if p is None else p.dtype)
        keeps = self.cuda_graph and getattr(self.model, "graph_capturable", False)
        if keeps and getattr(self, "_shape", None) == shape:  # the last call's cache and graphs: they replay
            self.model.lengths(self.cache).zero_()
            self._check_graphs()
            return
        self.cache = self._graphs = None  # free the old cache and graphs before allocating the new ones
        self._shape = shape
        self.cache = self.model.new_cache(*shape[:2])
        self._one = torch.arange(num_requests + 1, dtype=torch.int32)  # cu_tokens of one token per request
        self._slots = [torch.full((1,), k, dtype=torch.int32, device=device) for k in range(self.num_draft + 1)]
        if self.cuda_graph:
            capture = getattr(self.model, "device", torch.device(device)).type == "cuda" and keeps
            self._graphs = StepGraphs(self._chain, capture=capture, name="the draft chain")
            self._check_graphs()

    def _check_graphs(self) -> None:
        """Kept graphs read the draft model's weights and lazily built tensors
        where they were at capture (graph_token): new graphs if they moved."""
        if self._graphs is not None and hasattr(self.model, "graph_token"):
            self._graphs = self._graphs.renewed(self.model.graph_token(self.cache))

    def release(self) -> None:
        """Drop the draft cache and graphs kept between calls."""
        self.cache = self._graphs = self._shape = None

    @property
    def graphs_captured(self) -> int:
        """CUDA graphs this drafter's current graphs have captured (they may
        span several generate() calls)."""
        return self._graphs.captured if getattr(self, "_graphs", None) is not None else 0

    def _chain(self, inputs):
        """The draft chain: optionally the catch-up forward of w tokens per
        request (ids, positions [R w], what the draft cache has not seen),
        then draws 1..n from the first row and the n - 1 single-token
        forwards between them. inputs: (ids, positions) or (None, None), the
        first row [R, V] float32 or None (from the catch-up), the requests'
        position, temperature and seed [R], and their top_k and top_p [R]
        (None: that filter off; both None: rows unfiltered). Returns (tokens
        [R, n] int32, the rows each draw sampled from [R, n, V] (filtered:
        -inf outside the kept set), the draft cache's lengths before the
        chain's forwards [R])."""
        ids, positions, row0, position, temperature, seed, top_k, top_p = inputs
        R = position.shape[0]
        if ids is not None:
            w = ids.shape[0] // R
            logits, _ = self.model.forward(ids, positions, torch.arange(R + 1, dtype=torch.int32) * w, self.cache)
            row0 = logits.view(R, w, -1)[:, -1].float()
        base = self.model.lengths(self.cache).clone()
        filtered = (lambda row: row) if top_k is None and top_p is None else (
            lambda row: filter_top_k_top_p(row, temperature, top_k, top_p))
        rows, toks = [filtered(row0)], []
        for k in range(1, self.num_draft + 1):
            tok = sample(rows[-1], temperature=temperature, seed=seed, position=position, purpose=Purpose.DRAFT,
                         slot=self._slots[k]).tokens
            toks.append(tok)
            if k == self.num_draft:
                break
            step_logits, _ = self.model.forward(tok.clamp(min=0).long(), position + (k - 1), self._one, self.cache)
            rows.append(filtered(step_logits.float()))
        return torch.stack(toks, 1), torch.stack(rows, 1), base

    def propose(self, seqs, state, sampling) -> Draft:
        R, n, dev = len(seqs), self.num_draft, state.last_token.device
        filters = (sampling.top_k, sampling.top_p) if self.filter_drafts and sampling.filtering() else (None, None)
        catch = [s[f:] for s, f in zip(seqs, self.fed)]  # what the cache has not seen (1 or 2 tokens, or the prompt)
        ids = to_device([t for c in catch for t in c], torch.int64, dev)
        positions = to_device([f + i for c, f in zip(catch, self.fed) for i in range(len(c))], torch.int64, dev)
        w = len(catch[0])
        if self._graphs is not None and w <= 2 and all(len(c) == w for c in catch):
            # every request catches up w tokens: that forward and the chain in one graph (a shape of its own)
            inputs = (ids, positions, None, state.position, sampling.temperature, sampling.seed, *filters)
            key = ("catch-up", w, R, *(f is None for f in filters))
            tokens, draft_rows, self.base = self._graphs.run(key, inputs)
            self.fed, self.forwarded = [len(s) for s in seqs], n - 1
            return Draft(tokens, draft_rows, sampling.temperature)
        cu = [0]
        for c in catch:
            cu.append(cu[-1] + len(c))
        logits, _ = self.model.forward(ids, positions, torch.tensor(cu, dtype=torch.int32), self.cache)
        one_each = all(len(c) == 1 for c in catch)
        last = None if one_each else to_device([max(c - 1, 0) for c in cu[1:]], torch.int64, dev)
        rows = [(logits if one_each else logits.index_select(0, last)).float()]  # each request's last row
        self.fed = [len(s) for s in seqs]
        if self.stop_below == 0:  # the whole chain (from static buffers, a CUDA graph on a GPU, with cuda_graph)
            inputs = (None, None, rows[0], state.position, sampling.temperature, sampling.seed, *filters)
            tokens, draft_rows, self.base = (self._graphs.run(("row", R, *(f is None for f in filters)), inputs)
                                             if self._graphs else self._chain(inputs))
            self.forwarded = n - 1
            return Draft(tokens, draft_rows, sampling.temperature)
        self.base = self.model.lengths(self.cache).clone()
        self.forwarded = 0  # draft tokens appended to the draft cache after base
        toks = []
        live = None
        for k in range(1, n + 1):  # stop_below: a host read per draw decides whether drafting goes on
            confident = (torch.softmax(rows[-1], -1).amax(-1) >= self.stop_below) & ~state.finished
            live = confident if live is None else live & confident  # finished requests keep no one drafting
            if not bool(live.any()):  # every request stopped: the step's drafts end here
                break
            if filters != (None, None):
                rows[-1] = filter_top_k_top_p(rows[-1], sampling.temperature, *filters)
            tok = sample(rows[-1], temperature=sampling.temperature, seed=sampling.seed, position=state.position,
                         purpose=Purpose.DRAFT, slot=self._slots[k]).tokens
            toks.append(torch.where(live, tok, -1))
            if k == n:
                break
            step_logits, _ = self.model.forward(tok.clamp(min=0).long(), state.position + (k - 1), self._one,
                                                self.cache)
            self.forwarded += 1
            rows.append(step_logits.float())
        width = len(toks)
        if width == 0:
            return Draft(torch.empty(R, 0, dtype=torch.int32, device=dev), width=0)
        return Draft(torch.stack(toks, 1), torch.stack(rows[:width], 1), sampling.temperature,
                     width=width if width < n else None)

    def commit(self, accepted, finished_before) -> None:
        m, dev = self.forwarded, self.base.device
        keep = [0 if f else min(a, m) for a, f in zip(accepted, finished_before)]
        R = len(keep)
        if m:
            self.model.rollback(self.cache, self.base, torch.full((R,), m, dtype=torch.int32, device=dev),
                                torch.arange(m, dtype=torch.int32, device=dev).expand(R, -1).contiguous(),
                                to_device(keep, torch.int32, dev))
        self.fed = [f + k for f, k in zip(self.fed, keep)]
