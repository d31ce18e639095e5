"""Benchmark of `sample` against PyTorch (multinomial over softmax, and a
Gumbel-max argmax; a sort-based top-k/top-p filter as engines write it) and,
when installed, FlashInfer's sampling-from-logits kernels."""
from __future__ import annotations

import torch

import dspark_ops

from .timing import rotation_count, time_fn, with_env

MODES = {
    "temperature": dict(temperature=0.8, top_k=0, top_p=1.0),
    "top_k_top_p": dict(temperature=0.8, top_k=50, top_p=0.9),
    "greedy": dict(temperature=0.0, top_k=0, top_p=1.0),
}
# Reads of the logits per call (DESIGN §4: report the passes made).
PASSES = {"temperature": 1, "greedy": 1, "top_k_top_p": 4 + 1 + 4 + 1}


def torch_sample(logits, temperature, top_k, top_p, gen):
    """What an engine without our kernels does: fp32 probabilities, a sort
    for top-k/top-p, torch.multinomial."""
    if temperature == 0:
        return logits.argmax(-1)
    x = logits.float() / temperature
    if top_k or top_p < 1:
        sorted_x, idx = torch.sort(x, dim=-1, descending=True)
        if top_k:
            sorted_x[:, top_k:] = float("-inf")
        if top_p < 1:
            probs = torch.softmax(sorted_x, -1)
            above = torch.cumsum(probs, -1) - probs
            sorted_x = sorted_x.masked_fill(above >= top_p, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, idx, sorted_x)
    return torch.multinomial(torch.softmax(x, -1), 1, generator=gen).squeeze(-1)


def torch_gumbel(logits, temperature, gen):
    """Gumbel-max in PyTorch: argmax(x - log(-log u)) (temperature only)."""
    u = torch.rand(logits.shape, device=logits.device, generator=gen)
    return torch.argmax(logits.float() / temperature - torch.log(-torch.log(u)), -1)


def flashinfer_fn(mode):
    try:
        import flashinfer.sampling as fs
    except Exception:
        return None
    cfg = MODES[mode]
    if mode == "greedy":
        return None
    if mode == "temperature":
        return lambda l: fs.sampling_from_logits(l.float() / cfg["temperature"])
    return lambda l: fs.top_k_top_p_sampling_from_logits(l.float() / cfg["temperature"], cfg["top_k"], cfg["top_p"])


def check_against_cpu(logits, mode, seed, position) -> str:
    """The device's tokens equal the CPU op's (margin rule aside)."""
    kw = MODES[mode]
    dev = dspark_ops.sample(logits, seed=seed, position=position, **kw).tokens.cpu()
    cpu = dspark_ops.sample(logits.cpu(), seed=seed.cpu(), position=position.cpu(), **kw).tokens
    mismatches = int((dev != cpu).sum())
    return "ok" if mismatches == 0 else f"{mismatches} of {dev.numel()} differ (check the margin rule)"


def run_case(R: int, V: int, dtype: torch.dtype, mode: str, device: str, iters: int, copy_gbs: float) -> list:
    elem = torch.tensor([], dtype=dtype).element_size()
    bytes_read = R * V * elem
    n_buf = rotation_count(bytes_read, device)
    gen = torch.Generator(device=device).manual_seed(0)
    bufs = [(torch.randn(R, V, device=device, generator=gen) * 3).to(dtype) for _ in range(n_buf)]
    seed = torch.arange(R, device=device)
    position = torch.full((R,), 1000, device=device)
    kw = MODES[mode]
    out = dspark_ops.empty_sample_result(R, device=device)
    ws = torch.empty(dspark_ops.workspace_size("sample", num_requests=R, vocab_size=V), dtype=torch.uint8,
                     device=device)
    check = check_against_cpu(bufs[0], mode, seed, position)

    impls = {"dspark_ops.sample": lambda i: dspark_ops.sample(bufs[i % n_buf], seed=seed, position=position,
                                                              out=out, workspace=ws, **kw),
             "torch (softmax+sort+multinomial)": lambda i: torch_sample(bufs[i % n_buf], kw["temperature"],
                                                                        kw["top_k"], kw["top_p"], gen)}
    if device == "cuda" and mode == "top_k_top_p":  # the split select (small batches) against one block a row
        impls["dspark_ops.sample, one block a row"] = lambda i: with_env(
            "DSPARK_SPLIT_SELECT", "0",
            lambda: dspark_ops.sample(bufs[i % n_buf], seed=seed, position=position, out=out, workspace=ws, **kw))
    if mode == "temperature":
        impls["torch (gumbel argmax)"] = lambda i: torch_gumbel(bufs[i % n_buf], kw["temperature"], gen)
    fi = flashinfer_fn(mode) if device == "cuda" else None
    if fi is not None:
        impls["flashinfer"] = lambda i: fi(bufs[i % n_buf])
    rows = []
    base = None
    for name, fn in impls.items():
        stats = time_fn(fn, device, iters)
        us = stats["median_us"]
        base = base or us
        passes = PASSES[mode] if name.startswith("dspark_ops.sample") else None
        gbs = bytes_read / (us * 1e-6) / 1e9
        rows.append({"op": "sample", "impl": name, "mode": mode, "R": R, "V": V, "dtype": str(dtype).split(".")[-1],
                     "bytes_read_once": bytes_read, "logit_passes": passes, **stats,
                     "GBps_one_pass": gbs, "frac_copy_bw_one_pass": gbs / copy_gbs,
                     "time_vs_dspark": us / base, "check": check if name == "dspark_ops.sample" else None})
    return rows
