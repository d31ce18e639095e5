"""Benchmark of `verify_tree` (temperature-only target) on EAGLE-like top-k
trees against the pure-PyTorch reference (small CPU cases only) and a
vectorised PyTorch tree walk as an engine without our kernels writes it."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch

import dspark_ops
from dspark_ops import reference

from .timing import rotation_count, time_fn, with_env
from .verify_bench import DRAFT_NOISE, elem_size

# Temperature-only target sampling (top-k / top-p off). "deterministic": no
# draft rows (point masses: what EAGLE top-k trees need), the children are
# the draft row's top tokens; "iid": draft_probs given, the siblings drawn
# i.i.d. (with replacement) from the draft row; "greedy": the deterministic
# tree at temperature 0 (accept the child equal to the argmax).
MODES: Dict[str, dict] = {
    "deterministic": dict(temperature=1.0, top_k=0, top_p=1.0),
    "iid": dict(temperature=1.0, top_k=0, top_p=1.0),
    "greedy": dict(temperature=0.0, top_k=0, top_p=1.0),  # EAGLE's common case
}
TOPK = 4  # children per expanded node
DEPTH = 6  # levels below the root the tree aims for
# R*nodes*V above which the Python-loop reference is neither checked against
# nor timed. It reads only the rows on the path (<= DEPTH + 1 per request),
# so it is cheaper per element than verify_chunk's; 5e6 keeps the CPU
# acceptance case R=8 nodes=16 V=32000 (4.1e6) in.
REFERENCE_MAX_ELEMS = 5e6
CHECK_MAX_REQUESTS = 64  # the CPU op re-runs at most this many requests of the first buffer

# One input set: (target_logits [M, V], node_tokens [M] int32, draft_probs
# [M, V] float32 or None); M = R * nodes, request r owns rows r*nodes.. .
Inputs = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


def eagle_parents(nodes: int, topk: int = TOPK, depth: int = DEPTH) -> List[int]:
    """An EAGLE-like top-k tree of `nodes` nodes, level by level: the root's
    min(topk, nodes - 1) children, then per level ceil((nodes - 1 - topk) /
    (depth - 1)) nodes, `topk` children each for the previous level's first
    nodes (the drafter's best), until `nodes` (16 nodes: levels 4,3,3,3,2,
    depth 5; 64 nodes: 4,12,12,12,12,11, depth 6)."""
    per_level = max(1, -(-(nodes - 1 - topk) // (depth - 1)))
    par, level = [-1], [0]
    while len(par) < nodes:
        want = min(topk if level == [0] else per_level, nodes - len(par), topk * len(level))
        nxt = []
        for j in range(want):
            nxt.append(len(par))
            par.append(level[j // topk])
        level = nxt
    return par


def children_table(parents: List[int]) -> List[List[int]]:
    kids: List[List[int]] = [[] for _ in parents]
    for c in range(1, len(parents)):
        kids[parents[c]].append(c)
    return kids


def tree_depth(parents: List[int]) -> int:
    d = [0] * len(parents)
    for c in range(1, len(parents)):
        d[c] = d[parents[c]] + 1
    return max(d)


def make_inputs(R: int, parents: List[int], V: int, dtype: torch.dtype, mode: str, device: str,
                gen: torch.Generator) -> Inputs:
    """LLM-like inputs as verify_bench.make_inputs (per row one dominant token,
    p ~ 0.7, over a 2*N(0,1) background; the draft a noisy copy of the
    target), one row per node; each expanded node's children take the
    draft row's top tokens (deterministic) or tokens drawn i.i.d. from it
    (iid, torch.multinomial with replacement)."""
    N = len(parents)
    target = 2 * torch.randn(R, N, V, device=device, generator=gen)
    hot = torch.randint(0, V, (R, N, 1), device=device, generator=gen)
    target.scatter_add_(-1, hot, torch.full_like(hot, math.log(V) + 3, dtype=torch.float32))
    draft_logits = target + DRAFT_NOISE * torch.randn(R, N, V, device=device, generator=gen)
    kids = children_table(parents)
    expanded = [u for u in range(N) if kids[u]]
    sub = draft_logits[:, expanded]  # [R, E, V]
    if mode in ("deterministic", "greedy"):
        picks = sub.topk(TOPK, -1).indices
        draft = None
    else:
        picks = torch.multinomial(torch.softmax(sub, -1).view(-1, V), TOPK, replacement=True,
                                  generator=gen).view(R, len(expanded), TOPK)
        draft = torch.softmax(draft_logits, -1).view(R * N, V)
    del sub, draft_logits
    tokens = torch.randint(0, V, (R, N), device=device, generator=gen)  # roots: any committed token
    e_idx = torch.tensor([expanded.index(parents[c]) for c in range(1, N)], device=device)
    j_idx = torch.tensor([kids[parents[c]].index(c) for c in range(1, N)], device=device)
    tokens[:, 1:] = picks[:, e_idx, j_idx]
    return target.to(dtype).view(R * N, V).contiguous(), tokens.view(-1).to(torch.int32), draft


def torch_tree_verify(target: torch.Tensor, tokens: torch.Tensor, kids: torch.Tensor, draft: Optional[torch.Tensor],
                      max_depth: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """What an engine without our kernels does, vectorised over requests
    (every request `nodes` nodes, kids [R, nodes, K] its children table, -1
    padded, built once outside the timing): fp32 softmax of every node row,
    then per level and child slot a gather of p (and q) at the child's
    token, a torch.rand coin, accept with u * q(x) < p(x), on rejection p <-
    p with x zeroed (deterministic) or max(0, p - q) (iid), renormalised;
    the emitted token from the final p by one torch.multinomial. No host
    sync. Returns (tokens [R, D+1] int64: accepted, emitted, -1; accepted [R])."""
    R, N, K = kids.shape
    dev = target.device
    p_all = torch.softmax(target.float(), -1).view(R, N, -1)
    q_all = draft.view(R, N, -1) if draft is not None else None
    toks = tokens.view(R, N).long()
    rows = torch.arange(R, device=dev)
    cur = torch.zeros(R, dtype=torch.long, device=dev)
    active = torch.ones(R, dtype=torch.bool, device=dev)
    out = torch.full((R, max_depth + 1), -1, dtype=torch.long, device=dev)
    final_p = p_all[:, 0]
    for d in range(max_depth + 1):
        p = p_all[rows, cur]
        q = q_all[rows, cur] if q_all is not None else None
        nxt = torch.full((R,), -1, dtype=torch.long, device=dev)
        for k in range(K):
            c = kids[rows, cur, k]
            trying = active & (nxt < 0) & (c >= 0)
            tok = toks[rows, c.clamp(min=0)].unsqueeze(-1)
            px = p.gather(1, tok).squeeze(-1)
            qx = q.gather(1, tok).squeeze(-1) if q is not None else 1.0
            ok = trying & (torch.rand(R, device=dev, generator=gen) * qx < px)
            nxt = torch.where(ok, c, nxt)
            new = p.scatter(1, tok, 0.0) if q is None else (p - q).clamp_min(0)
            mass = new.sum(-1, keepdim=True)
            p = torch.where((trying & ~ok).unsqueeze(-1) & (mass > 0), new / mass, p)
        took = active & (nxt >= 0)
        out[:, d] = torch.where(took, toks[rows, nxt.clamp(min=0)], out[:, d])
        final_p = torch.where((active & ~took).unsqueeze(-1), p, final_p)
        active = took
        cur = torch.where(took, nxt, cur)
    accepted = (out >= 0).sum(-1)  # the accepted nodes (the emitted token is not written yet)
    emit = torch.multinomial(final_p, 1, generator=gen).squeeze(-1)
    return out.scatter(1, accepted.clamp(max=max_depth).unsqueeze(-1), emit.unsqueeze(-1)), accepted


def torch_tree_greedy(target: torch.Tensor, tokens: torch.Tensor, kids: torch.Tensor,
                      max_depth: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy tree verification as an engine without our kernels writes it,
    vectorised over requests: the argmax of every node row, then per level
    the first child whose token equals it. Returns (tokens [R, D+1] int64:
    accepted, emitted, -1; accepted [R])."""
    R, N, K = kids.shape
    dev = target.device
    best = target.view(R, N, -1).argmax(-1)  # [R, N]
    toks = tokens.view(R, N).long()
    rows = torch.arange(R, device=dev)
    cur = torch.zeros(R, dtype=torch.long, device=dev)
    active = torch.ones(R, dtype=torch.bool, device=dev)
    out = torch.full((R, max_depth + 1), -1, dtype=torch.long, device=dev)
    for d in range(max_depth):
        want = best[rows, cur]
        nxt = torch.full((R,), -1, dtype=torch.long, device=dev)
        for k in range(K):
            c = kids[rows, cur, k]
            hit = active & (nxt < 0) & (c >= 0) & (toks[rows, c.clamp(min=0)] == want)
            nxt = torch.where(hit, c, nxt)
        took = nxt >= 0
        out[:, d] = torch.where(took, toks[rows, nxt.clamp(min=0)], out[:, d])
        active &= took
        cur = torch.where(took, nxt, cur)
    accepted = (out >= 0).sum(-1)
    return out.scatter(1, accepted.unsqueeze(-1), best[rows, cur].unsqueeze(-1)), accepted


def _differing(a: tuple, b: tuple) -> int:
    """Requests whose tokens, accepted/emitted counts, path or status differ."""
    bad = torch.zeros(a[1].shape[0], dtype=torch.bool)
    for x, y in zip(a, b):
        ne = x.cpu() != y.cpu()
        bad |= ne.any(-1) if ne.dim() > 1 else ne
    return int(bad.sum())


def _verdict(bad: int, what: str, res: dspark_ops.TreeResult) -> str:
    verdict = f"ok ({what})" if bad == 0 else f"{bad} {what} differ (check the margin rule)"
    nonzero = int((res.status != 0).sum())
    return verdict + (f"; {nonzero} nonzero status" if nonzero else "")


class Case:
    """One (R, nodes, V, dtype, mode): the tree, its device tensors and the
    per-request sampling parameters shared by every implementation."""

    def __init__(self, R: int, nodes: int, V: int, device: str):
        self.parents_list = eagle_parents(nodes)
        self.max_depth = tree_depth(self.parents_list)
        self.parents = torch.tensor(self.parents_list * R, dtype=torch.int32, device=device)
        self.cu = (torch.arange(R + 1, dtype=torch.int32) * nodes).to(device)
        kids = children_table(self.parents_list)
        table = torch.full((nodes, TOPK), -1, dtype=torch.long)
        for u, ks in enumerate(kids):
            table[u, :len(ks)] = torch.tensor(ks, dtype=torch.long)
        self.kids = table.to(device).expand(R, nodes, TOPK)
        self.seed = torch.arange(R, device=device)
        self.position = torch.full((R,), 1000, device=device)

    def run(self, inp: Inputs, mode: str, **kw) -> dspark_ops.TreeResult:
        t, tok, q = inp
        return dspark_ops.verify_tree(t, tok, self.parents, self.cu, max_depth=self.max_depth, draft_probs=q,
                                      seed=self.seed, position=self.position, **MODES[mode], **kw)

    def run_reference(self, inp: Inputs, mode: str) -> tuple:
        t, tok, q = inp
        return reference.verify_tree(t, tok, self.parents, self.cu, max_depth=self.max_depth, draft_probs=q,
                                     seed=self.seed, position=self.position, **MODES[mode])

    def check_against_cpu(self, inp: Inputs, mode: str, res: dspark_ops.TreeResult) -> str:
        """res (the device's outputs) equals the CPU op's on the first
        CHECK_MAX_REQUESTS requests (margin rule aside)."""
        t, tok, q = inp
        R = self.seed.shape[0]
        m = min(R, CHECK_MAX_REQUESTS)
        rows = int(self.cu[m])
        cpu = dspark_ops.verify_tree(t[:rows].cpu(), tok[:rows].cpu(), self.parents[:rows].cpu(),
                                     self.cu[:m + 1].cpu(), max_depth=self.max_depth,
                                     draft_probs=q[:rows].cpu() if q is not None else None,
                                     seed=self.seed[:m].cpu(), position=self.position[:m].cpu(), **MODES[mode])
        return _verdict(_differing(tuple(x[:m] for x in res), tuple(cpu)), f"of {m} requests vs CPU op", res)

    def check(self, inp: Inputs, mode: str, with_reference: bool) -> Tuple[str, dspark_ops.TreeResult]:
        """Run the op once on the first buffer and check it: on CUDA against
        the CPU op, on the CPU against the reference where that is run (""
        when neither applies). Returns (verdict, the op's result)."""
        res = self.run(inp, mode)
        if inp[0].is_cuda:
            return self.check_against_cpu(inp, mode, res), res
        if with_reference:
            return _verdict(_differing(tuple(res), self.run_reference(inp, mode)), "vs reference", res), res
        return "", res


def run_case(R: int, nodes: int, V: int, dtype: torch.dtype, mode: str, device: str, iters: int,
             copy_gbs: float) -> List[dict]:
    """Time verify_tree and the baselines on one (R, nodes, V, dtype, mode);
    one row per implementation, the first being dspark_ops.verify_tree."""
    case = Case(R, nodes, V, device)
    elem, elem_d = elem_size(dtype), (4 if mode == "iid" else 0)
    once = R * nodes * V * elem  # every target row once (the draft rows of iid mode not counted)
    n_buf = rotation_count(R * nodes * V * (elem + elem_d), device)
    gen = torch.Generator(device=device).manual_seed(0)
    bufs = [make_inputs(R, case.parents_list, V, dtype, mode, device, gen) for _ in range(n_buf)]
    run_ref = device == "cpu" and R * nodes * V <= REFERENCE_MAX_ELEMS
    verdict, res = case.check(bufs[0], mode, run_ref)
    live = res.status == 0
    acc_mean = float(res.accepted.float().mean())
    # The rows a tree walk needs: the accepted path, root included (target +
    # draft row each), once.
    path_bytes = int(((res.accepted + 1) * live).sum()) * V * (elem + elem_d)
    if mode == "greedy":
        vectorised = lambda i: torch_tree_greedy(*bufs[i % n_buf][:2], case.kids, case.max_depth)  # noqa: E731
    else:
        vectorised = lambda i: torch_tree_verify(*bufs[i % n_buf][:2], case.kids, bufs[i % n_buf][2],  # noqa: E731
                                                 case.max_depth, gen)
    tv_acc = float(vectorised(0)[1].float().mean())

    out = dspark_ops.empty_tree_result(R, case.max_depth, device=device)
    ws = torch.empty(dspark_ops.workspace_size("verify_tree", num_requests=R, vocab_size=V, num_nodes=R * nodes),
                     dtype=torch.uint8, device=device)

    impls: Dict[str, Callable[[int], object]] = {
        "dspark_ops.verify_tree": lambda i: case.run(bufs[i % n_buf], mode, out=out, workspace=ws)}
    if device != "cpu":  # the CUDA row pass forced on (every request's rows) and off: which should auto pick?
        impls["dspark_ops.verify_tree, row pass"] = lambda i: with_env(
            "DSPARK_TREE_ROW_PASS", "1", lambda: case.run(bufs[i % n_buf], mode, out=out, workspace=ws))
        impls["dspark_ops.verify_tree, walk only"] = lambda i: with_env(
            "DSPARK_TREE_ROW_PASS", "0", lambda: case.run(bufs[i % n_buf], mode, out=out, workspace=ws))
    if run_ref:
        impls["torch reference"] = lambda i: case.run_reference(bufs[i % n_buf], mode)
    impls["torch vectorised"] = vectorised
    peer_checks = add_sglang(impls, case, bufs, mode, res) if device != "cpu" else {}

    rows, base = [], None
    for name, fn in impls.items():
        stats = time_fn(fn, device, iters)
        us = stats["median_us"]
        base = base or us
        gbs = once / (us * 1e-6) / 1e9
        ours_row = name.startswith("dspark_ops.verify_tree")
        rows.append({"op": "verify_tree", "impl": name, "mode": mode, "R": R, "nodes": nodes,
                     "max_depth": case.max_depth, "V": V, "dtype": str(dtype).split(".")[-1],
                     "draft_dtype": "float32" if mode == "iid" else None,
                     "bytes_read_once": once, "bytes_path": path_bytes if ours_row else None, **stats,
                     "GBps_one_pass": gbs, "frac_copy_bw_one_pass": gbs / copy_gbs,
                     "GBps_path": path_bytes / (us * 1e-6) / 1e9 if ours_row else None,
                     "time_vs_dspark": us / base,
                     "accepted_mean": acc_mean if ours_row else (tv_acc if name == "torch vectorised" else None),
                     "check": verdict if ours_row else peer_checks.get(name)})
    return rows


def add_sglang(impls: Dict[str, Callable[[int], object]], case: Case, bufs: List[Inputs], mode: str,
               ours: dspark_ops.TreeResult) -> Dict[str, str]:
    """SGLang's kernels on the same trees (bench/sglang_peer.py), timed with
    the passes SGLang runs before them: the softmax of every node row in fp32
    (temperature 1) for tree_speculative_sampling_target_only (draft
    probabilities: zeros, allocated once here; SGLang allocates them each
    step, and its kernel writes into them: zeroed again in each timed
    call), the argmax of every row for verify_tree_greedy. The iid mode has
    no SGLang counterpart. Returns each added impl's check: its accepted
    counts against ours (greedy: equal; sampled: the means)."""
    if mode == "iid":
        return {}
    from . import sglang_peer
    peer = sglang_peer.load()
    if peer is None:
        return {}
    R, N = case.seed.shape[0], len(case.parents_list)
    dev = case.seed.device
    nxt, sib = sglang_peer.linked_lists(children_table(case.parents_list), R, dev)
    index = torch.arange(R * N, device=dev).view(R, N)
    predicts = torch.empty(R * N, dtype=torch.int32, device=dev)
    accept_index = torch.empty(R, case.max_depth + 1, dtype=torch.int32, device=dev)
    accept_num = torch.empty(R, dtype=torch.int32, device=dev)
    cands = [b[1].view(R, N).long() for b in bufs]
    if mode == "greedy":
        name = "sglang verify_tree_greedy (argmax included)"

        def fn(i: int):
            t, _, _ = bufs[i % len(bufs)]
            peer.greedy(predicts, accept_index, accept_num, cands[i % len(bufs)], index, nxt, sib,
                        t.view(R, N, -1).argmax(-1))
    else:
        name = "sglang tree_speculative_sampling_target_only (softmax included)"
        zeros = torch.zeros(R, N, bufs[0][0].shape[-1], device=dev)
        coins, coins_final = torch.rand(R, N, device=dev), torch.rand(R, device=dev)

        def fn(i: int):
            t, _, _ = bufs[i % len(bufs)]
            peer.sample(predicts, accept_index, accept_num, cands[i % len(bufs)], index, nxt, sib, coins,
                        coins_final, torch.softmax(t.float(), -1).view(R, N, -1), zeros.zero_())
    try:
        fn(0)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 -- a peer that fails is skipped, and said so
        print(f"# note: {name} skipped ({type(e).__name__}: {e})")
        return {}
    theirs = accept_num.cpu()
    mine = ours.accepted.cpu()
    if mode == "greedy":
        check = f"accepted counts equal ours for {int((theirs == mine).sum())} of {R} requests"
    else:
        check = f"mean accepted {float(theirs.float().mean()):.2f} (ours {float(mine.float().mean()):.2f})"
    impls[name] = fn
    return {name: check}
