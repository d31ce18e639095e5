"""What the compat shims' conversions cost next to the op they wrap:
``python -m bench.compat_bench [--device cpu|cuda] [--threads N]``.
Medians of repeated calls in ms (CUDA: synchronised wall time)."""
from __future__ import annotations

import argparse

import torch

from bench.timing import median_ms
from dspark_ops.chain import verify_chunk
from dspark_ops.compat import flashinfer as fi
from dspark_ops.compat import vllm as vl
from dspark_ops.compat._streams import coin_uniforms


def _median_ms(fn, device: torch.device) -> float:
    return median_ms(fn, device, reps=21, warmup=3)


def bench_flashinfer(B: int, n: int, V: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(B, n, V, generator=g), -1)
    p = torch.softmax(torch.randn(B, n + 1, V, generator=g) * 3, -1).to(dtype)
    x = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, n)
    q, p, x = q.to(device), p.to(device), x.to(device)
    seeds, pos = torch.arange(B, dtype=torch.int64, device=device), torch.zeros(1, dtype=torch.int64, device=device)
    logits, cu = fi._target_logits(p), torch.arange(B + 1, dtype=torch.int32, device=device) * n
    xi, qf = x.int().reshape(-1), q.reshape(-1, V)
    return {
        "log(target_probs)": _median_ms(lambda: fi._target_logits(p), device),
        "coins (independent counter)": _median_ms(lambda: coin_uniforms(seeds, pos.expand(B), n), device),
        "verify_chunk alone": _median_ms(lambda: verify_chunk(logits, xi, cu, max_draft=n, draft_probs=qf,
                                                              seed=seeds, position=pos), device),
        "shim": _median_ms(lambda: fi.chain_speculative_sampling(q, x, p, seed=seeds, offset=0), device),
    }


def bench_vllm(B: int, k: int, V: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    q = torch.softmax(torch.randn(B * k, V, generator=g), -1)
    drafts = torch.multinomial(q, 1, generator=g).squeeze(1)
    full = torch.randn(B * (k + 1), V, generator=g)
    draft_rows = torch.cat([torch.arange(r * (k + 1), r * (k + 1) + k) for r in range(B)])
    q, drafts, full = q.to(device), drafts.to(device), full.to(device)
    draft_only = full[draft_rows.to(device)].contiguous()
    bonus = torch.randint(V, (B, 1), generator=g).to(device)
    cu = torch.arange(1, B + 1, device=device) * k
    cu32 = torch.cat([torch.zeros(1, dtype=torch.int32, device=device), cu.int()])
    seeds, pos = torch.arange(B, device=device), torch.zeros(B, dtype=torch.int64, device=device)
    md = vl.SamplingMetadata(torch.ones(B, device=device), False, True, seeds=seeds, positions=pos)
    return {
        "interleave copy ([num_tokens, V] form)": _median_ms(lambda: vl._with_bonus_rows(draft_only, cu32, B), device),
        "verify_chunk alone": _median_ms(lambda: verify_chunk(full, drafts.int(), cu32, max_draft=k, draft_probs=q,
                                                              seed=seeds, position=pos), device),
        "shim, [num_tokens + B, V] logits": _median_ms(
            lambda: vl.rejection_sample(drafts, [k] * B, k, cu, q, full, bonus, md), device),
        "shim, [num_tokens, V] logits": _median_ms(
            lambda: vl.rejection_sample(drafts, [k] * B, k, cu, q, draft_only, bonus, md), device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads")
    for B, n, V, dtype in [(8, 7, 32000, torch.float32), (1, 7, 152064, torch.bfloat16)]:
        res = bench_flashinfer(B, n, V, dtype, device)
        print(f"flashinfer B={B} n={n} V={V} {dtype}: " + " | ".join(f"{k} {v:.2f}" for k, v in res.items()))
    res = bench_vllm(8, 7, 32000, device)
    print("vllm B=8 k=7 V=32000 float32: " + " | ".join(f"{k} {v:.2f}" for k, v in res.items()))


if __name__ == "__main__":
    main()
