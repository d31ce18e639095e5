"""GPU time per kernel of the ops' large cases, from torch.profiler: which
kernel of a call dominates (the benchmarks time whole calls). For the device
machine: `python3 tools/gpu_kernel_times.py` (tools/gpu_check.sh runs it with
GPU_CHECK_PROFILE=1 and appends the tables to test.log)."""
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dspark_ops  # noqa: E402
from bench.tree_bench import eagle_parents, tree_depth  # noqa: E402


def table(name: str, fn, calls: int = 5) -> None:
    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    print(f"== {name}: {calls} calls")
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=8,
                                    max_name_column_width=60))


def main(small: bool = False) -> None:
    """small: tiny shapes on the CPU (a smoke test of this script)."""
    dev, bf16 = ("cpu" if small else "cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    R, n, V = (4, 3, 1000) if small else (256, 7, 152064)
    target = torch.randn(R, n + 1, V, device=dev, generator=g).to(bf16)
    draft = torch.randn(R, n, V, device=dev, generator=g).to(bf16)
    tokens = draft.float().argmax(-1).to(torch.int32)
    seed, pos = torch.arange(R, device=dev), torch.full((R,), 5, device=dev)
    table(f"verify_chunk R={R} n={n} V={V} bf16, draft logits, temperature 1",
          lambda: dspark_ops.verify_chunk(target, tokens, draft_logits=draft, draft_temperature=1.0,
                                          temperature=1.0, seed=seed, position=pos))
    table("verify_chunk greedy, same shapes", lambda: dspark_ops.verify_chunk(target, tokens, temperature=0.0,
                                                                             seed=seed, position=pos))
    del target, draft

    Rt, nodes = (2, 16) if small else (64, 64)
    par = eagle_parents(nodes)
    logits = torch.randn(Rt * nodes, V, device=dev, generator=g).to(bf16)
    node_tok = logits.float().argmax(-1).to(torch.int32)
    parents = torch.tensor(par * Rt, dtype=torch.int32, device=dev)
    cu = (torch.arange(Rt + 1, dtype=torch.int32) * nodes).to(dev)
    table(f"verify_tree R={Rt} {nodes} nodes V={V} bf16, deterministic, temperature 1",
          lambda: dspark_ops.verify_tree(logits, node_tok, parents, cu, max_depth=tree_depth(par), temperature=1.0,
                                         seed=seed[:Rt], position=pos[:Rt]))
    del logits

    x = torch.randn(R, V, device=dev, generator=g).to(bf16)
    table(f"sample R={R} V={V} bf16 temperature 1",
          lambda: dspark_ops.sample(x, temperature=1.0, seed=seed, position=pos))
    y = torch.randn(4, V, device=dev, generator=g)
    table(f"sample R=4 V={V} fp32 top-k 50 top-p 0.9",
          lambda: dspark_ops.sample(y, temperature=1.0, top_k=50, top_p=0.9, seed=seed[:4], position=pos[:4]))

    r, G = (16, 3) if small else (256, 7)
    w1 = (torch.randn(V, r, device=dev, generator=g) * 0.05).to(bf16)
    w2 = (torch.randn(r, V, device=dev, generator=g) * 0.05).to(bf16)
    for Rm in ((1, 2) if small else (1, 32)):
        U = torch.randn(Rm, G, V, device=dev, generator=g).to(bf16)
        anchor = torch.randint(0, V, (Rm,), device=dev, generator=g)
        table(f"markov_draft R={Rm} G={G} V={V} r={r} bf16 temperature 0.8",
              lambda: dspark_ops.markov_draft(U, anchor, w1, w2, temperature=0.8, seed=seed[:Rm],
                                              position=pos[:Rm]))


if __name__ == "__main__":
    main(small="--small" in sys.argv)
