"""`make demo`: sample from a batch of requests with mixed settings and show
that the streams are reproducible and independent of batch position.
(The speculative-decoding demo replaces this once the decoding loop lands.)"""
import time

import torch

import dspark_ops


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    R, V = 8, 32000
    torch.manual_seed(0)
    logits = (torch.randn(R, V) * 4).to(torch.bfloat16).to(device)
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.0, 0.7, 1.0, 1.3, 0.0], device=device)
    top_k = torch.tensor([0, 50, 0, 20, 0, 0, 100, 0], dtype=torch.int32, device=device)
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.8, 0.5, 1.0, 0.95, 1.0], device=device)
    seed = torch.arange(R, device=device) * 1000003
    position = torch.full((R,), 42, device=device)
    t0 = time.perf_counter()
    res = dspark_ops.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            position=position)
    ms = (time.perf_counter() - t0) * 1e3
    print(f"dspark_ops {dspark_ops.__version__} on {device} (CUDA kernels built: "
          f"{dspark_ops.cuda_kernels_available()})")
    print(f"sampled {R} requests x V={V} (bf16) in {ms:.2f} ms (first call)")
    for r in range(R):
        print(f"  request {r}: T={temperature[r].item():.1f} top_k={top_k[r].item():3d} "
              f"top_p={top_p[r].item():.2f} -> token {res.tokens[r].item():5d} status {res.status[r].item()}")
    perm = torch.randperm(R)
    again = dspark_ops.sample(logits[perm], temperature=temperature[perm], top_k=top_k[perm],
                              top_p=top_p[perm], seed=seed[perm], position=position[perm])
    same = torch.equal(again.tokens, res.tokens[perm])
    print(f"shuffled batch gives each request the same token: {same}")
    greedy_ok = torch.equal(res.tokens[[0, 7]].long(), logits[[0, 7]].float().argmax(1))
    print(f"greedy requests equal argmax: {greedy_ok}")


if __name__ == "__main__":
    main()
