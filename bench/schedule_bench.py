"""Latency of `schedule_verify` (one launch ranking R*G candidates) against the
pure-PyTorch/Python reference, after an exact-equality check."""
from __future__ import annotations

import torch

import dspark_ops
from dspark_ops import reference

from .timing import time_fn

MODES = {"early_stop": {}, "budget": dict(budget=64), "threshold": dict(threshold=0.5)}


def make_inputs(R: int, G: int, device: str, seed: int = 0):
    """confidence [R, G] (decaying along the block, as drafters' are),
    num_draft [R] = G, an SPS table [R + R*G + 1] falling with the token batch."""
    g = torch.Generator().manual_seed(seed)
    conf = (0.95 - 0.08 * torch.arange(G) + 0.1 * torch.randn(R, G, generator=g)).clamp(0.05, 0.99).float()
    n = torch.full((R,), G, dtype=torch.int32)
    B = torch.arange(R + R * G + 1, dtype=torch.float64)
    sps = 1e4 / (1.0 + B / 512.0) ** 1.5
    return conf.to(device), n.to(device), sps.to(device)


def run_case(R: int, G: int, mode: str, device: str, iters: int) -> list:
    conf, n, sps = make_inputs(R, G, device)
    kw = MODES[mode]
    ours = dspark_ops.schedule_verify(conf, n, sps, mode=mode, **kw).cpu()
    want = reference.schedule_verify(conf.cpu(), n.cpu(), sps.cpu(), mode=mode, threshold=kw.get("threshold"),
                                     budget=kw.get("budget"))
    check = "ok (vs reference)" if torch.equal(ours, want) else "MISMATCH"
    out = torch.empty(R, dtype=torch.int32, device=device)
    ws = torch.empty(dspark_ops.workspace_size("schedule_verify", num_requests=R, group=G), dtype=torch.uint8,
                     device=device)
    impls = {"dspark_ops.schedule_verify": lambda i: dspark_ops.schedule_verify(conf, n, sps, mode=mode, out=out,
                                                                                workspace=ws, **kw)}
    if device == "cpu":
        impls["python reference"] = lambda i: reference.schedule_verify(conf, n, sps, mode=mode,
                                                                        threshold=kw.get("threshold"),
                                                                        budget=kw.get("budget"))
    rows, base = [], None
    for name, fn in impls.items():
        stats = time_fn(fn, device, iters if name.startswith("dspark") else max(2, iters // 5))
        base = base or stats["median_us"]
        rows.append({"op": "schedule_verify", "impl": name, "mode": mode, "R": R, "G": G, **stats,
                     "time_vs_dspark": stats["median_us"] / base, "admitted": int(ours.sum()),
                     "check": check if name.startswith("dspark") else None})
    return rows
