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

from ..chain import verify_chunk
from ..kv import RequestState, commit_tokens
from ..tree import verify_tree
from .._host import host_to_device, to_device
from .drafters import Drafter, Sampling
from .graphs import StepGraphs
from .model import tree_ancestors

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


class SpeculativeDecoder:
    """Speculative decoding of a target with a drafter (None: plain decoding,
    one token per target pass, through the same verify op with no drafts)."""

    def __init__(self, target, drafter: Optional[Drafter] = None, *, cuda_graph: bool = False):
        """cuda_graph: run each step's target pass, verification, commit and
        rollback as a CUDA graph per step shape (captured on its second
        step; a BuiltinTarget on a GPU). Elsewhere the same static buffers
        run eagerly."""
        self.target, self.drafter, self.cuda_graph = target, drafter, cuda_graph

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
        limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(seqs)
        if len(limits) != len(seqs) or any(int(m) < 1 for m in limits):
            raise ValueError(f"SpeculativeDecoder.generate: max_new_tokens must be >= 1 (a scalar or one per prompt), "
                             f"got {max_new_tokens}")
        max_new_tokens = max(int(m) for m in limits)
        t0 = time.perf_counter()
        R, dev, target = len(seqs), self.target.device, self.target
        n = self.drafter.num_draft if self.drafter is not None else 0
        max_len = max(len(s) for s in seqs) + max_new_tokens + n + 2
        cache = target.new_cache(R, max_len)
        if self.drafter is not None:
            self.drafter.start(R, max_len, dev)
        # Prefill every prompt but its last token (the first step's root).
        pre = [s[:-1] for s in seqs]
        cu = [0]
        for p in pre:
            cu.append(cu[-1] + len(p))
        if cu[-1]:
            target.forward(to_device([t for p in pre for t in p], torch.int64, dev),
                           to_device([i for p in pre for i in range(len(p))], torch.int64, dev),
                           torch.tensor(cu, dtype=torch.int32), cache)
        state = RequestState.new(to_device([s[-1] for s in seqs], torch.int32, dev),
                                 to_device([len(s) for s in seqs], torch.int64, dev),
                                 to_device(limits, torch.int32, dev), max_new_tokens)
        per_prompt_seed = isinstance(seed, (list, tuple)) or (isinstance(seed, torch.Tensor) and seed.dim() > 0)
        seeds = seed if per_prompt_seed else [request_seed(int(seed), r) for r in range(R)]
        sampling = Sampling(_per_request(temperature, R, torch.float32, dev), _per_request(seeds, R, torch.int64, dev))
        top_k_t, top_p_t = _per_request(top_k, R, torch.int32, dev), _per_request(top_p, R, torch.float32, dev)
        stop = to_device(list(stop_tokens), torch.int32, dev) if stop_tokens else None
        out = [[] for _ in range(R)]
        finished = [False] * R
        chain_cus = [torch.arange(R + 1, dtype=torch.int32) * (m + 1) for m in range(n + 1)]  # host, per width
        node_cus = [host_to_device(c, dev) for c in chain_cus]  # the same on the device, for verify_tree
        keep_chain = [torch.arange(m + 1, dtype=torch.int32, device=dev).expand(R, -1).contiguous()
                      for m in range(n + 1)]  # per width: a chain keeps its first entries
        appended = [torch.full((R,), m + 1, dtype=torch.int32, device=dev) for m in range(n + 1)]
        root_parent = torch.full((R, 1), -1, dtype=torch.int32, device=dev)

        def verify_step(inputs) -> torch.Tensor:
            """One step from its drafts: toks [R, m] int32, parents [R, m]
            int32 (a tree) or None, draft logits [R, m, V] or None (point
            masses), draft temperature [R] or None (1). Returns what the host
            reads: [R, W + 5] int32, the committed tokens then old length,
            new length, accepted drafts, finished, finished before."""
            toks, tree_parents, draft_logits, draft_t = inputs
            m = toks.shape[1]
            nodes = torch.cat([state.last_token.unsqueeze(1), toks], 1)  # [R, m + 1]: the root, then the drafts
            ids = nodes.clamp(min=0).reshape(-1).long()
            base = target.lengths(cache).clone()
            if tree_parents is not None:  # node j's parent: -1 for the root (the cached prefix), else a node < j
                parents = torch.cat([root_parent, tree_parents], 1)
                depth = tree_ancestors(parents).sum(-1) - 1  # [R, m + 1]
                positions = ((state.position - 1).unsqueeze(1) + depth).reshape(-1)
                logits, _ = target.forward(ids, positions, chain_cus[m], cache, tree_parents=parents)
            else:
                positions = ((state.position - 1).unsqueeze(1) + torch.arange(m + 1, device=dev)).reshape(-1)
                logits, _ = target.forward(ids, positions, chain_cus[m], cache)
            if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                logits = logits.float()  # e.g. float64 test models: the ops take fp32/fp16/bf16
            V = logits.shape[-1]
            if tree_parents is not None:  # node tokens and draft rows flat, request r's nodes at cu[r]:cu[r+1]
                res = verify_tree(logits, nodes.reshape(-1).to(torch.int32), parents.reshape(-1), node_cus[m],
                                  max_depth=m, temperature=sampling.temperature, top_k=top_k_t, top_p=top_p_t,
                                  seed=sampling.seed, position=state.position)  # deterministic siblings
                keep_index = res.path
            else:
                res = verify_chunk(logits.view(R, m + 1, V), toks, draft_logits=draft_logits,
                                   draft_temperature=1.0 if draft_t is None else draft_t,
                                   temperature=sampling.temperature, top_k=top_k_t, top_p=top_p_t,
                                   seed=sampling.seed, position=state.position)
                keep_index = keep_chain[m]
            was_finished = state.finished.clone()
            old_len = state.out_len.clone()
            commit_tokens(state, res.tokens, res.emitted, res.status, stop_tokens=stop)
            # Keep in the cache exactly what was committed: [last, accepted drafts]
            # cut at a stop token or max_new_tokens; nothing for finished or aborted requests.
            num_keep = torch.where(was_finished, 0, state.out_len - old_len).to(torch.int32)
            target.rollback(cache, base, appended[m], keep_index, num_keep)
            return torch.cat([res.tokens, old_len.unsqueeze(1), state.out_len.unsqueeze(1), res.accepted.unsqueeze(1),
                              state.finished.int().unsqueeze(1), was_finished.int().unsqueeze(1)], 1)

        graphs = None
        if self.cuda_graph:  # capture only where the target's forward never reads the host (BuiltinTarget)
            capture = dev.type == "cuda" and getattr(target, "graph_capturable", False)
            graphs = StepGraphs(verify_step, capture=capture)
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
            inputs = (toks, tree_parents, None if tree_parents is not None else draft_logits, draft_t)
            if graphs is None:
                packed = verify_step(inputs)
            else:
                key = (m, tree_parents is not None, None if inputs[2] is None else inputs[2].dtype, draft_t is None)
                packed = graphs.run(key, inputs)
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
            if all(finished):
                break
        elapsed = time.perf_counter() - t0
        total = sum(len(o) for o in out)
        stats = {"steps": steps, "target_passes": steps + (1 if cu[-1] else 0),
                 "mean_accepted": sum(accepted_per_step) / len(accepted_per_step),
                 "accepted_per_step": accepted_per_step, "new_tokens": total,
                 "tokens_per_s": total / elapsed if elapsed > 0 else float("inf"), "seconds": elapsed,
                 "cuda_graphs": (graphs.captured if graphs is not None else 0)
                 + getattr(self.drafter, "graphs_captured", 0)}
        return GenerateResult(out, stats, state.error.tolist())
