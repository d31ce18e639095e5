"""`make ops-demo`: a realistic verification batch through `verify_chunk` (and a
glance at `sample`), with the op's speed against the PyTorch reference.
(Also `python -m dspark_ops ops-demo`; `make demo` is the decoding demo.)"""
import time

import torch

import dspark_ops
from dspark_ops import reference


def realistic_batch(R: int, V: int, device: str, seed: int = 0):
    """Peaked target rows (a few likely tokens, a long tail) and a drafter
    that agrees with the target most of the time: drafts are drawn from q, a
    blurred copy of p, and passed with q's probabilities."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 8, (R,), generator=g)
    cu = torch.zeros(R + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    N = int(cu[-1])
    target = torch.randn(N + R, V, generator=g) * 2.0
    hot = torch.randint(0, V, (N + R, 3), generator=g)
    target.scatter_add_(1, hot, torch.tensor([9.0, 7.5, 6.0]).expand(N + R, 3).contiguous())
    rows = torch.cat([torch.arange(int(cu[r]) + r, int(cu[r + 1]) + r) for r in range(R)])  # draft-scored rows
    draft_logits = target[rows] * 0.8 + torch.randn(N, V, generator=g)
    q = torch.softmax(draft_logits, -1)
    drafts = torch.multinomial(q, 1, generator=g).squeeze(1).to(torch.int32)
    return (target.to(torch.bfloat16).to(device), drafts.to(device), cu.to(device), q.to(device), lengths)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    R, V = 8, 32000
    target, drafts, cu, q, lengths = realistic_batch(R, V, device)
    seed = torch.arange(R, device=device) * 1000003
    position = torch.full((R,), 128, device=device)
    print(f"dspark_ops {dspark_ops.__version__} on {device} (CUDA kernels built: "
          f"{dspark_ops.cuda_kernels_available()})")
    print(f"verify_chunk: {R} requests, V={V}, bf16 target logits, drafts with their probabilities")
    res = dspark_ops.verify_chunk(target, drafts, cu, max_draft=7, draft_probs=q, temperature=1.0, seed=seed,
                                  position=position)
    for r in range(R):
        n = int(lengths[r])
        print(f"  request {r}: drafted {n}, accepted {res.accepted[r].item()}, emitted "
              f"{res.tokens[r, :res.emitted[r]].tolist()}  status {res.status[r].item()}")
    print(f"  mean emitted per request: {res.emitted.float().mean().item():.2f} "
          f"(of {(lengths.float() + 1).mean().item():.2f} possible)")

    def timed(fn, reps):
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps * 1e3

    ours = timed(lambda: dspark_ops.verify_chunk(target, drafts, cu, max_draft=7, draft_probs=q, seed=seed,
                                                 position=position), 20)
    cpu_args = [t.cpu() for t in (target, drafts, cu, q, seed, position)]
    ref_ms = timed(lambda: reference.verify_chunk(cpu_args[0], cpu_args[1], cpu_args[2], max_draft=7,
                                                  draft_probs=cpu_args[3], seed=cpu_args[4],
                                                  position=cpu_args[5]), 2)
    print(f"  time: dspark_ops {ours:.2f} ms vs the PyTorch reference {ref_ms:.1f} ms (CPU) "
          f"-> {ref_ms / ours:.0f}x")
    same = all(torch.equal(a.cpu(), b) for a, b in zip(
        res, reference.verify_chunk(cpu_args[0], cpu_args[1], cpu_args[2], max_draft=7, draft_probs=cpu_args[3],
                                    seed=cpu_args[4], position=cpu_args[5])))
    print(f"  identical to the reference: {same}")

    s = dspark_ops.sample(target[:R], temperature=0.7, top_p=0.9, seed=seed, position=position)
    print(f"sample: tokens {s.tokens.tolist()} (temperature 0.7, top-p 0.9)")


if __name__ == "__main__":
    main()
