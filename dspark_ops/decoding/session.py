"""The device state of SpeculativeDecoder.generate() and its verify step.

A `DecodeSession` holds everything a step reads or writes at a fixed
address: the target's KV cache, the requests' RequestState, their sampling
parameters, the stop tokens and the per-draft-width constants. With
cuda_graph=True a decoder keeps its session from one generate() call to the
next (when R and the bucketed sizes match) and resets it in place, so the
CUDA graphs captured in one call replay in the next (graphs.py)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..chain import verify_chunk
from ..kv import RequestState, commit_tokens
from ..tree import verify_tree
from .._host import host_to_device, to_device
from .drafters import Sampling
from .graphs import StepGraphs
from .model import tree_ancestors

SIZE_BUCKET = 256  # a kept session's cache length and output width are rounded up to this


def bucket(n: int) -> int:
    return -(-n // SIZE_BUCKET) * SIZE_BUCKET


class DecodeSession:
    """R requests, a target cache of max_len entries each, output room for
    max_total tokens, drafts of up to n tokens, num_stop stop tokens."""

    def __init__(self, target, key: tuple, *, graphs: bool, capture: bool):
        """key: session_key(...) of the calls it serves."""
        R, max_len, max_total, n, num_stop = key[:5]
        dev = target.device
        self.target, self.R, self.dev, self.key = target, R, dev, key
        self.cache = target.new_cache(R, max_len)
        i32, f32, i64 = (dict(dtype=d, device=dev) for d in (torch.int32, torch.float32, torch.int64))
        self.state = RequestState.new(torch.zeros(R, **i32), torch.ones(R, **i64), 1, max_total)
        self.top_k, self.top_p = torch.zeros(R, **i32), torch.ones(R, **f32)
        self.sampling = Sampling(torch.zeros(R, **f32), torch.zeros(R, **i64), self.top_k, self.top_p)
        self.stop = torch.zeros(num_stop, **i32) if num_stop else None
        self.chain_cus = [torch.arange(R + 1, dtype=torch.int32) * (m + 1) for m in range(n + 1)]  # host, per width
        self.node_cus = [host_to_device(c, dev) for c in self.chain_cus]  # the same on the device, for verify_tree
        self.keep_chain = [torch.arange(m + 1, **i32).expand(R, -1).contiguous()
                           for m in range(n + 1)]  # per width: a chain keeps its first entries
        self.appended = [torch.full((R,), m + 1, **i32) for m in range(n + 1)]
        self.draft_row_starts = [torch.arange(R, **i32) * m for m in range(n + 1)]  # request r's drafts at r m
        self.root_parent = torch.full((R, 1), -1, **i32)
        self.hidden_layers: tuple = ()  # the drafter's (Drafter.hidden_layers), set per call
        self.graphs = StepGraphs(self.verify_step, capture=capture) if graphs else None

    def check_graphs(self) -> None:
        """Before a call's first step: graphs captured in an earlier call read
        the target's weights and lazily built tensors where they were then;
        if the target rebuilt or moved them since (its graph_token), drop
        the graphs (they are captured anew)."""
        if self.graphs is not None and hasattr(self.target, "graph_token"):
            self.graphs = self.graphs.renewed(self.target.graph_token(self.cache))

    def reset(self, last_token: torch.Tensor, position: torch.Tensor, limits: torch.Tensor,
              temperature: torch.Tensor, seed: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
              stop: Optional[torch.Tensor], *, reused: bool) -> None:
        """A new call's requests, written in place ([R] tensors on the
        device; stop [num_stop]). reused: the cache holds an earlier call's
        entries (a kept session): every request's length goes back to 0."""
        if reused:
            self.target.lengths(self.cache).zero_()
        s = self.state
        s.out_tokens.fill_(-1)
        s.out_len.zero_()
        s.finished.zero_()
        s.error.zero_()
        for dst, src in ((s.last_token, last_token), (s.position, position), (s.max_len, limits),
                         (self.sampling.temperature, temperature), (self.sampling.seed, seed),
                         (self.top_k, top_k), (self.top_p, top_p)):
            dst.copy_(src)
        if stop is not None:
            self.stop.copy_(stop)

    def run_step(self, toks: torch.Tensor, tree_parents: Optional[torch.Tensor],
                 draft_logits: Optional[torch.Tensor], draft_t: Optional[torch.Tensor],
                 lengths: Optional[List[int]] = None) -> tuple:
        """One step (verify_step's outputs), through the graphs when the
        session has them; without graphs, a chain whose per-request draft
        counts the host knows and which differ (lengths) as a ragged pass
        (ragged_step: its shape changes from step to step; graphs keep one
        shape per width, the drafts padded with -1)."""
        if lengths is not None and tree_parents is None:
            m = toks.shape[1]
            if len(lengths) != self.R or any(not 0 <= n <= m for n in lengths):
                raise ValueError(f"SpeculativeDecoder: Draft.lengths must hold {self.R} counts in [0, {m}] (the "
                                 f"drafts' width), got {lengths}")
            if len(set(lengths)) > 1 and self.graphs is None:
                return self.ragged_step(toks, draft_logits, draft_t, lengths)
        inputs = (toks, tree_parents, draft_logits, draft_t)
        if self.graphs is None:
            return self.verify_step(inputs)
        key = (toks.shape[1], tree_parents is not None, None if draft_logits is None else draft_logits.dtype,
               draft_t is None, self.hidden_layers)
        return self.graphs.run(key, inputs)

    def verify_step(self, inputs: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """One step from its drafts: toks [R, m] int32, parents [R, m] int32
        (a tree) or None, draft logits [R, m, V] or None (point masses),
        draft temperature [R] or None (1). One target pass over every
        request's [last token, drafts], verify_chunk (a chain) or
        verify_tree (a tree: the pass attends along each node's ancestors),
        commit_tokens, and the rollback that keeps what was committed.
        Returns (packed, rows, processed): what the host reads, [R, W + 5]
        int32, the committed tokens then old length, new length, accepted
        drafts, finished, finished before; and when the drafter reads hidden
        states (hidden_layers), the pass's [R, m + 1, k, d] and how many of
        each request's rows are now processed tokens [R] int32 (its root and
        accepted drafts), else None, None."""
        toks, tree_parents, draft_logits, draft_t = inputs
        R, target, cache, state, sampling = self.R, self.target, self.cache, self.state, self.sampling
        m = toks.shape[1]
        nodes = torch.cat([state.last_token.unsqueeze(1), toks], 1)  # [R, m + 1]: the root, then the drafts
        ids = nodes.clamp(min=0).reshape(-1).long()
        base = target.lengths(cache).clone()
        if tree_parents is not None and self.hidden_layers:
            raise NotImplementedError("SpeculativeDecoder: a drafter that reads hidden states drafts chains, "
                                      "not trees")
        if tree_parents is not None:  # node j's parent: -1 for the root (the cached prefix), else a node < j
            parents = torch.cat([self.root_parent, tree_parents], 1)
            depth = tree_ancestors(parents).sum(-1) - 1  # [R, m + 1]
            positions = ((state.position - 1).unsqueeze(1) + depth).reshape(-1)
            logits, _ = target.forward(ids, positions, self.chain_cus[m], cache, tree_parents=parents)
        else:
            positions = ((state.position - 1).unsqueeze(1) + torch.arange(m + 1, device=self.dev)).reshape(-1)
            logits, hidden = target.forward(ids, positions, self.chain_cus[m], cache, hidden_layers=self.hidden_layers)
        logits = _op_dtype(logits)
        V = logits.shape[-1]
        if tree_parents is not None:  # node tokens and draft rows flat, request r's nodes at cu[r]:cu[r+1]
            res = verify_tree(logits, nodes.reshape(-1).to(torch.int32), parents.reshape(-1), self.node_cus[m],
                              max_depth=m, temperature=sampling.temperature, top_k=self.top_k, top_p=self.top_p,
                              seed=sampling.seed, position=state.position)  # deterministic siblings
            keep_index = res.path
        else:
            res = verify_chunk(logits.view(R, m + 1, V), toks, draft_logits=draft_logits,
                               draft_temperature=1.0 if draft_t is None else draft_t,
                               temperature=sampling.temperature, top_k=self.top_k, top_p=self.top_p,
                               seed=sampling.seed, position=state.position)
            keep_index = self.keep_chain[m]
        packed = self._commit(res, base, self.appended[m], keep_index)
        if not self.hidden_layers:
            return packed, None, None
        # The drafter's context (Drafter.observe): this pass's hidden states, of which the root and the
        # accepted drafts are now processed tokens.
        return packed, hidden.view(R, m + 1, *hidden.shape[1:]), (res.accepted.clamp(0, m) + 1).to(torch.int32)

    def _commit(self, res, base: torch.Tensor, appended: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """After a pass that appended `appended` [R] entries past `base` [R]
        and its verification `res`: commit_tokens, then keep in the cache
        exactly what was committed ([last, accepted drafts] cut at a stop
        token or max_new_tokens; nothing for finished or aborted requests).
        Returns what the host reads, [R, W + 5] int32 (verify_step)."""
        state = self.state
        was_finished = state.finished.clone()
        old_len = state.out_len.clone()
        commit_tokens(state, res.tokens, res.emitted, res.status, stop_tokens=self.stop)
        num_keep = torch.where(was_finished, 0, state.out_len - old_len).to(torch.int32)
        self.target.rollback(self.cache, base, appended, keep_index, num_keep)
        return torch.cat([res.tokens, old_len.unsqueeze(1), state.out_len.unsqueeze(1), res.accepted.unsqueeze(1),
                          state.finished.int().unsqueeze(1), was_finished.int().unsqueeze(1)], 1)

    def ragged_step(self, toks: torch.Tensor, draft_logits: Optional[torch.Tensor], draft_t: Optional[torch.Tensor],
                    lengths: List[int]) -> tuple:
        """verify_step for a chain of lengths[r] <= m drafts per request
        (toks [R, m], -1 past them; draft logits [R, m, V] or None): the
        target pass carries each request's root and its own drafts only —
        sum(lengths) + R tokens, the token batch schedule_verify's SPS
        table prices (DESIGN §3) — not R (m + 1) with -1 padding. The same
        outputs as verify_step on the padded drafts: a -1 ends a chain
        where its count does, and the emitted token uses the same row and
        random-number slot."""
        R, target, cache, state, sampling, dev = self.R, self.target, self.cache, self.state, self.sampling, self.dev
        m = toks.shape[1]  # lengths: checked by run_step
        counts = [n + 1 for n in lengths]  # the root and the kept drafts
        cu = [0]
        for c in counts:
            cu.append(cu[-1] + c)
        pick = to_device([r * (m + 1) + j for r, c in enumerate(counts) for j in range(c)], torch.int64, dev)
        nodes = torch.cat([state.last_token.unsqueeze(1), toks], 1)  # [R, m + 1]
        ids = nodes.reshape(-1).index_select(0, pick).clamp(min=0).long()
        positions = (state.position - 1).unsqueeze(1) + torch.arange(m + 1, device=dev)  # [R, m + 1]
        positions = positions.reshape(-1).index_select(0, pick)
        base = target.lengths(cache).clone()
        logits, hidden = target.forward(ids, positions, torch.tensor(cu, dtype=torch.int32), cache,
                                        hidden_layers=self.hidden_layers)
        logits = _op_dtype(logits)
        V = logits.shape[-1]
        cu_draft = to_device([c - r for r, c in enumerate(cu)], torch.int32, dev)  # [R + 1]: drafts before request r
        rows = self.draft_row_starts[m]  # request r's drafts (tokens and rows) at r m of the padded [R m] layout
        res = verify_chunk(logits, toks.reshape(-1), cu_draft, max_draft=max(lengths),
                           draft_logits=None if draft_logits is None else draft_logits.reshape(R * m, V),
                           draft_temperature=1.0 if draft_t is None else draft_t,
                           temperature=sampling.temperature, top_k=self.top_k, top_p=self.top_p,
                           seed=sampling.seed, position=state.position, draft_row_start=rows)
        packed = self._commit(res, base, to_device(counts, torch.int32, dev), self.keep_chain[m])
        if not self.hidden_layers:
            return packed, None, None
        return packed, pad_rows(hidden, cu), (res.accepted.clamp(0, m) + 1).to(torch.int32)


def _op_dtype(logits: torch.Tensor) -> torch.Tensor:
    """The target's logits in a dtype the ops take (fp32/fp16/bf16; e.g.
    float64 test models' as fp32)."""
    return logits if logits.dtype in (torch.float32, torch.float16, torch.bfloat16) else logits.float()


def pad_rows(hidden: torch.Tensor, cu: List[int], *, last_only: bool = False) -> torch.Tensor:
    """Ragged rows hidden [T, ...] (request r's at cu[r]:cu[r+1], host
    offsets) -> [R, max rows, ...], each request's rows first (the rest
    repeat its last row, or row 0 for a request with none); last_only:
    [R, 1, ...], each request's last row (row 0 for one with none)."""
    counts = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if last_only:
        idx = [[b - 1 if c else 0] for b, c in zip(cu[1:], counts)]
    else:
        width = max(counts)
        idx = [[a + min(i, max(c - 1, 0)) if c else 0 for i in range(width)] for a, c in zip(cu[:-1], counts)]
    return hidden.index_select(0, to_device([i for row in idx for i in row], torch.int64, hidden.device)).view(
        len(counts), len(idx[0]), *hidden.shape[1:])


def session_key(target, prompt_lengths: List[int], max_new_tokens: int, n: int, num_stop: int, *,
                keep: bool) -> tuple:
    """(R, cache length, output width, n, stop tokens, device, dtype) of a
    call: exact sizes, or bucketed ones for a kept session."""
    max_len = max(prompt_lengths) + max_new_tokens + n + 2
    sizes = (bucket(max_len), bucket(max_new_tokens)) if keep else (max_len, max_new_tokens)
    p = next(target.model.parameters()) if hasattr(target, "model") else None
    return (len(prompt_lengths), *sizes, n, num_stop, target.device, None if p is None else p.dtype)
