"""SpeculativeDecoder: batched draft -> verify -> rollback -> commit loops on
our ops (DESIGN §3 orchestrator). Per step: one drafter proposal, one target
pass over every request's [last token, drafts], verify_chunk (a chain) or
verify_tree (a tree draft: the pass attends along each node's ancestors),
kv_compact keeping the accepted path, commit_tokens; then the step's one
host synchronisation, which checks for finished requests."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch

from .._host import to_device
from .drafters import Drafter
from .session import DecodeSession, pad_rows, session_key

_M64 = (1 << 64) - 1


def request_seed(base: int, index: int) -> int:
    """A distinct 64-bit seed per request (splitmix64 of base + index), as int64."""
    z = (base + (index + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


@dataclass
class GenerateResult:
    tokens: List[List[int]]  # each prompt's new tokens (prompt excluded), cut after a stop token
    stats: dict = field(default_factory=dict)  # mean_accepted, accepted_per_step, tokens_per_s, target_passes, ...
    errors: List[int] = field(default_factory=list)  # per request: the Status that aborted it, or 0


def _per_request(value, R: int, dtype, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.numel() not in (1, R):
            raise ValueError(f"SpeculativeDecoder.generate: a per-prompt tensor must have {R} entries, "
                             f"got {value.numel()}")
        return value.to(dtype=dtype, device=device).reshape(-1).expand(R).contiguous()
    if isinstance(value, (list, tuple)):
        if len(value) != R:
            raise ValueError(f"SpeculativeDecoder.generate: a per-prompt list must have {R} entries, got {len(value)}")
        return to_device(value, dtype, device)
    return torch.full((R,), value, dtype=dtype, device=device)


class _Mark:
    """A point in a generate() call: host time, and on a GPU a CUDA event
    (no synchronisation), so that seconds_since reads the device's timeline
    after the loop's host reads have synchronised."""

    def __init__(self, device: torch.device):
        self.host = time.perf_counter()
        self.event = None
        if device.type == "cuda":
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record(torch.cuda.current_stream(device))  # the target's device, not the current one

    def seconds_since(self, earlier: "_Mark") -> float:
        if self.event is not None and earlier.event is not None:
            return earlier.event.elapsed_time(self.event) / 1e3
        return self.host - earlier.host


def _host_values(value) -> list:
    """A scalar, a per-prompt list or a tensor as a host list (a tensor is
    read once per call, before any step)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value]


def filters_on(temperature, top_k, top_p) -> bool:
    """Whether some sampled request (temperature > 0) has top-k (> 0) or
    top-p (< 1) on; each argument a scalar, a per-prompt list or a tensor
    (a one-entry one broadcasts)."""
    t, k, p = (_host_values(v) for v in (temperature, top_k, top_p))
    R = max(len(t), len(k), len(p))

    def at(values, r):
        return float(values[r if len(values) > 1 else 0])
    return any(at(t, r) > 0 and (at(k, r) > 0 or at(p, r) < 1) for r in range(R))


class SpeculativeDecoder:
    """Speculative decoding of a target with a drafter (None: plain decoding,
    one token per target pass, through the same verify op with no drafts)."""

    def __init__(self, target, drafter: Optional[Drafter] = None, *, cuda_graph: bool = False,
                 trim_finished: Optional[bool] = None):
        """cuda_graph: run each step's target pass, verification, commit and
        rollback as a CUDA graph per step shape (captured on its second
        step; a BuiltinTarget on a GPU). Elsewhere the same static buffers
        run eagerly. With a BuiltinTarget the decoder then keeps its device
        state (caches sized up to a multiple of 256) between generate()
        calls of the same batch size and sizes, so graphs captured in one
        call replay in the next.

        trim_finished (chain drafts, without cuda_graph, whose graphs keep
        every step's full width): once some requests have finished, a step
        verifies none of their drafts — a ragged target pass of the
        others'. None (default): on for a CPU target, where it was measured
        faster; off on a GPU, where it has not been measured."""
        self.target, self.drafter, self.cuda_graph = target, drafter, cuda_graph
        self.trim_finished = trim_finished
        self._session: Optional[DecodeSession] = None  # kept between calls with cuda_graph (session.py)

    def release(self) -> None:
        """Drop what cuda_graph=True keeps between calls (the caches, the
        request state and the CUDA graphs of the target and the drafter)."""
        self._session = None
        if hasattr(self.drafter, "release"):
            self.drafter.release()

    def _graphs_captured(self) -> int:
        """CUDA graphs captured so far by the kept session and the drafter."""
        sess = self._session
        return (sess.graphs.captured if sess is not None and sess.graphs is not None else 0) + \
            getattr(self.drafter, "graphs_captured", 0)

    def generate(self, prompts: Union[Sequence[Sequence[int]], torch.Tensor],
                 max_new_tokens: Union[int, Sequence[int]] = 64, *,
                 temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_tokens: Sequence[int] = ()) -> GenerateResult:
        """prompts: token-id lists of any lengths >= 1 (or a [B, L] tensor);
        max_new_tokens, temperature, top_k, top_p and seed each a scalar or a
        per-prompt list (a scalar seed is the base of a distinct seed per
        request, `request_seed(seed, r)`)."""
        seqs = [list(map(int, p)) for p in (prompts.tolist() if isinstance(prompts, torch.Tensor) else prompts)]
        if not seqs or any(len(s) == 0 for s in seqs):
            raise ValueError("SpeculativeDecoder.generate: every prompt needs at least one token")
        V = self.target.vocab_size
        bad = next(((r, t) for r, s in enumerate(seqs) for t in s if not 0 <= t < V), None)
        if bad is not None:  # checked here: on a GPU the embedding lookup would assert and poison the context
            raise ValueError(f"SpeculativeDecoder.generate: prompt {bad[0]} has token {bad[1]}, outside the "
                             f"target's vocabulary [0, {V})")
        limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(seqs)
        if len(limits) != len(seqs) or any(int(m) < 1 for m in limits):
            raise ValueError(f"SpeculativeDecoder.generate: max_new_tokens must be >= 1 (a scalar or one per prompt), "
                             f"got {max_new_tokens}")
        max_new_tokens = max(int(m) for m in limits)
        t0 = time.perf_counter()
        R, dev, target = len(seqs), self.target.device, self.target
        started = _Mark(dev)
        n = self.drafter.num_draft if self.drafter is not None else 0
        # A session outlives the call only with graphs to replay, on a target whose cache resets in place.
        keep = self.cuda_graph and getattr(target, "graph_capturable", False)
        key = session_key(target, [len(s) for s in seqs], max_new_tokens, n, len(stop_tokens), keep=keep)
        max_len = key[1]
        sess = self._session if keep and self._session is not None and self._session.key == key else None
        reused = sess is not None
        if sess is None:
            self._session = None  # free the old session's caches and graphs before allocating the new ones
            sess = DecodeSession(target, key, graphs=self.cuda_graph, capture=keep and dev.type == "cuda")
            self._session = sess if keep else None
        cache, state, sampling = sess.cache, sess.state, sess.sampling
        per_prompt_seed = isinstance(seed, (list, tuple)) or (isinstance(seed, torch.Tensor) and seed.dim() > 0)
        seeds = seed if per_prompt_seed else [request_seed(int(seed), r) for r in range(R)]
        sess.reset(to_device([s[-1] for s in seqs], torch.int32, dev),
                   to_device([len(s) for s in seqs], torch.int64, dev), to_device(limits, torch.int32, dev),
                   _per_request(temperature, R, torch.float32, dev), _per_request(seeds, R, torch.int64, dev),
                   _per_request(top_k, R, torch.int32, dev), _per_request(top_p, R, torch.float32, dev),
                   to_device(list(stop_tokens), torch.int32, dev) if stop_tokens else None, reused=reused)
        sampling.filters = filters_on(temperature, top_k, top_p)  # drafters skip the filters' work otherwise
        if self.drafter is not None:
            self.drafter.start(R, max_len, dev)
        # Prefill every prompt but its last token (the first step's root).
        pre = [s[:-1] for s in seqs]
        cu = [0]
        for p in pre:
            cu.append(cu[-1] + len(p))
        layers = tuple(getattr(self.drafter, "hidden_layers", ()) or ()) if n else ()
        sess.hidden_layers = layers
        hidden = None
        if cu[-1]:
            _, hidden = target.forward(to_device([t for p in pre for t in p], torch.int64, dev),
                                       to_device([i for p in pre for i in range(len(p))], torch.int64, dev),
                                       torch.tensor(cu, dtype=torch.int32), cache, hidden_layers=layers)
        if layers:  # the drafter's first context: the prefilled tokens (none when every prompt is one token)
            last = getattr(self.drafter, "observe_last_only", False)  # [R, 1, k, d], not [R, longest prompt, k, d]
            self.drafter.observe(None if hidden is None else pad_rows(hidden, cu, last_only=last),
                                 None if hidden is None else to_device([min(len(p), 1) if last else len(p)
                                                                        for p in pre], torch.int32, dev))
        prefilled = _Mark(dev)  # the first step starts here: what came before is set-up and the prefill
        sess.check_graphs()  # graphs kept from an earlier call still read where the target's tensors are
        captured_before = self._graphs_captured()
        trim = not self.cuda_graph and (self.trim_finished if self.trim_finished is not None else dev.type == "cpu")
        out = [[] for _ in range(R)]
        finished = [False] * R
        steps, accepted_per_step = 0, []
        while True:
            steps += 1
            draft = self.drafter.propose(seqs, state, sampling) if n else None
            toks = draft.tokens if draft is not None else torch.zeros(R, 0, dtype=torch.int32, device=dev)
            m = toks.shape[1]  # this step's drafts per request (<= n: a drafter may propose fewer)
            draft_logits = draft.draft_logits[:, :m] if draft is not None and draft.draft_logits is not None else None
            draft_t = draft.draft_temperature if draft is not None else None
            if draft_t is not None and not isinstance(draft_t, torch.Tensor):  # a float: [R], a fixed shape
                draft_t = torch.full((R,), float(draft_t), dtype=torch.float32, device=dev)
            elif draft_t is not None:
                draft_t = draft_t.to(torch.float32).reshape(-1).expand(R)
            tree_parents = draft.parents[:, :m].to(torch.int32) if draft is not None and draft.parents is not None \
                and m > 0 else None
            if tree_parents is not None and draft_logits is not None:
                raise NotImplementedError("SpeculativeDecoder: tree drafts are verified as point masses "
                                          "(deterministic siblings); a tree with draft distributions is not supported")
            lengths = draft.lengths if draft is not None else None
            if trim and tree_parents is None and m and any(finished) and not all(finished):
                # finished requests verify no drafts: a ragged pass of the others' (graphs keep one shape instead)
                lengths = [0 if f else (m if lengths is None else lengths[r]) for r, f in enumerate(finished)]
            packed, rows, processed = sess.run_step(toks, tree_parents,
                                                    None if tree_parents is not None else draft_logits, draft_t,
                                                    lengths=lengths)
            # The step's one host synchronisation: what was appended, and who finished.
            host = packed.tolist()
            acc_step = []
            for r, row in enumerate(host):
                *tok, old, new, acc, fin, was = row
                if was:
                    continue
                out[r] += tok[: new - old]
                seqs[r] += tok[: new - old]
                finished[r] = bool(fin)
                acc_step.append(acc)
            accepted_per_step.append(sum(acc_step) / max(len(acc_step), 1))
            if self.drafter is not None:
                self.drafter.commit([row[-3] for row in host], [bool(row[-1]) for row in host])
                if layers:
                    self.drafter.observe(rows, processed)
            if all(finished):
                break
        elapsed = time.perf_counter() - t0
        total = sum(len(o) for o in out)
        stats = {"steps": steps, "target_passes": steps + (1 if cu[-1] else 0),
                 "mean_accepted": sum(accepted_per_step) / len(accepted_per_step),
                 "accepted_per_step": accepted_per_step, "new_tokens": total,
                 "tokens_per_s": total / elapsed if elapsed > 0 else float("inf"), "seconds": elapsed,
                 "prefill_seconds": prefilled.seconds_since(started),
                 "cuda_graphs": self._graphs_captured() - captured_before}  # captured in this call
        return GenerateResult(out, stats, state.error.tolist())
