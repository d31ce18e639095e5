"""What the SGLang shim's conversions cost next to verify_tree:
``python -m bench.sglang_bench [--device cpu|cuda] [--threads N] [--cpu-time]``.
Medians of repeated calls in ms (CUDA: synchronised wall time)."""
from __future__ import annotations

import time
from typing import Union

import torch

from bench.timing import median_ms
from dspark_ops.compat.sglang import (eagle_lists, tree_from_linked_lists, tree_speculative_sampling_target_only,
                                      verify_tree_greedy)
from dspark_ops.tree import verify_tree

_CLOCK = time.perf_counter  # main(--cpu-time): time.process_time, robust to a contended machine


def _median_ms(fn, device: torch.device) -> float:
    return median_ms(fn, device, reps=51, warmup=5, clock=_CLOCK)


def bench(bs: int, depth: int, topk: int, N: int, V: int, device: Union[str, torch.device] = "cpu") -> dict:
    """ms per call (medians) on an EAGLE-like tree of N nodes (random target
    probabilities): the list conversion, each shim, verify_tree alone on the
    inputs each shim builds, and the sampling shim's row gather + log."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    nt, ns = eagle_lists(bs, depth, topk, N, device)
    S = depth + 1
    probs = torch.softmax(torch.randn(bs, N, V, generator=g) * 3, -1).to(device)
    cand = torch.randint(V, (bs, N), generator=g).to(device)
    index = torch.arange(bs * N, device=device).view(bs, N)
    u, uf = torch.rand(bs, N, generator=g).to(device), torch.rand(bs, generator=g).to(device)
    pred = probs.argmax(-1)
    out = lambda: (torch.full((bs * N,), -1, dtype=torch.int32, device=device),  # noqa: E731
                   torch.full((bs, S), -1, dtype=torch.int32, device=device),
                   torch.zeros(bs, dtype=torch.int32, device=device))
    tree = tree_from_linked_lists(nt, ns, S - 1)
    rows = (tree.order + torch.arange(bs, device=device).unsqueeze(1) * N).reshape(-1)
    logits = probs.reshape(bs * N, V).index_select(0, rows).log_()
    tokens = cand.gather(1, tree.order).to(torch.int32).reshape(-1)
    surrogate = torch.arange(0, -2, -1, dtype=torch.float32, device=device).expand(bs * N, 2)
    cu = torch.arange(bs + 1, dtype=torch.int32, device=device) * N
    seeds = torch.arange(bs, device=device)
    return {
        "list conversion": _median_ms(lambda: tree_from_linked_lists(nt, ns, S - 1), device),
        "greedy: verify_tree alone": _median_ms(
            lambda: verify_tree(surrogate, tokens.remainder(2), tree.parents, cu, max_depth=S - 1, temperature=0.0),
            device),
        "greedy shim": _median_ms(lambda: verify_tree_greedy(*out(), cand, index, nt, ns, pred), device),
        "sampling: row gather + log": _median_ms(
            lambda: probs.reshape(bs * N, V).index_select(0, rows).to(torch.float32).log_(), device),
        "sampling: verify_tree alone": _median_ms(
            lambda: verify_tree(logits, tokens, tree.parents, cu, max_depth=S - 1, sibling_mode="deterministic",
                                seed=seeds, position=0), device),
        "sampling shim": _median_ms(
            lambda: tree_speculative_sampling_target_only(*out(), cand, index, nt, ns, u, uf, probs), device),
    }


CASES = ((1, 5, 4, 8), (8, 5, 4, 8), (8, 5, 8, 64), (32, 5, 8, 64))  # bs, depth (steps), topk, num_draft_tokens


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description="What the SGLang shim's conversions cost next to verify_tree.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--cpu-time", action="store_true", help="process CPU time instead of wall time (CPU only)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        global _CLOCK
        _CLOCK = time.process_time
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, V = {args.vocab} float32; "
          f"ms per call ({'process CPU time' if args.cpu_time else 'wall time'}, medians)")
    for bs, depth, topk, N in CASES:
        r = bench(bs, depth, topk, N, args.vocab, args.device)
        print(f"bs={bs} steps={depth} topk={topk} N={N}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
