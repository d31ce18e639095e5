"""python bench/bench_packed_linear.py [--threads 1,2] [--rows 1,2,6,16,32,64,128] [--out FILE]
(DSPARK_PACKED_LINEAR=avx2 times the AVX2 path on an AVX-512 CPU)

dspark_ops.packed_linear against torch's GEMM (F.linear / addmm: MKL on
this machine) at the embedded target's shapes, for the row counts of decode
steps (1 per request), verify passes (n + 1 per request) and short
prefills. Each case cycles through copies of the weight totalling >= 16 MB
(more than L2, about what the model's forward streams: its ~9 MB of fused
fp32 weights do not stay in L2 between layers), after checking the two
agree. Median µs per call, GFLOP/s, weight GB/s, and the ratio; JSON to
bench/results/packed_linear_CPU_<date>.json unless --out says otherwise."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import time_fn  # noqa: E402
from dspark_ops.packed_linear import pack_linear_weight, packed_linear, packed_linear_kernel  # noqa: E402

# (name, out_features, in_features, residual): the embedded target's GEMMs (dspark_ops/decoding/model.py)
SHAPES = [("wqkv", 672, 192, False), ("w13", 1024, 192, False), ("wo (+ residual)", 192, 192, True),
          ("w2 (+ residual)", 192, 512, True), ("lm head", 259, 192, False)]
WORKING_SET = 16 << 20


def run_case(name: str, N: int, K: int, residual: bool, M: int, threads: int, iters: int) -> dict:
    torch.set_num_threads(threads)
    copies = max(2, -(-WORKING_SET // (N * K * 4)))
    g = torch.Generator().manual_seed(N * K + M)
    ws = [torch.randn(N, K, generator=g) / K ** 0.5 for _ in range(copies)]
    packs = [pack_linear_weight(w) for w in ws]
    wts = [w.t() for w in ws]  # addmm takes the transposed view, as the model does
    x = torch.randn(M, K, generator=g)
    r = torch.randn(M, N, generator=g) if residual else None
    if residual:
        def torch_fn(i):
            return torch.addmm(r, x, wts[i % copies])
    else:
        def torch_fn(i):
            return F.linear(x, ws[i % copies])

    def ours(i):
        return packed_linear(x, packs[i % copies], N, r)
    torch.testing.assert_close(ours(0), torch_fn(0), rtol=1e-4, atol=1e-4)  # the same product before timing
    t_torch = time_fn(torch_fn, "cpu", iters, warmup=copies)
    t_ours = time_fn(ours, "cpu", iters, warmup=copies)
    flops, wbytes = 2 * M * N * K, N * K * 4
    return {"shape": name, "N": N, "K": K, "M": M, "threads": threads, "residual": residual,
            "torch_us": t_torch["median_us"], "torch_p25_us": t_torch["p25_us"], "torch_p75_us": t_torch["p75_us"],
            "packed_us": t_ours["median_us"], "packed_p25_us": t_ours["p25_us"], "packed_p75_us": t_ours["p75_us"],
            "packed_gflops": flops / t_ours["median_us"] / 1e3, "torch_gflops": flops / t_torch["median_us"] / 1e3,
            "packed_weight_gbs": wbytes / t_ours["median_us"] / 1e3,
            "speedup": t_torch["median_us"] / t_ours["median_us"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", default="1,2,6,16,32,64,128")
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    kernel = packed_linear_kernel()  # DSPARK_PACKED_LINEAR=avx2 times the AVX2 path on an AVX-512 CPU
    if kernel == "portable":
        print("packed_linear takes its portable path on this CPU (no AVX2): the built-in model keeps torch's "
              "GEMMs here, nothing to compare")
        return 0
    print(f"# packed_linear path: {kernel}")
    threads = [int(t) for t in args.threads.split(",")]
    rows_list = [int(m) for m in args.rows.split(",")]
    before = torch.get_num_threads()
    rows = []
    print(f"{'shape':16s} {'N':>5s} {'K':>4s} {'M':>4s} {'thr':>3s} {'torch us':>9s} {'packed us':>9s} "
          f"{'GFLOP/s':>8s} {'wt GB/s':>8s} {'speed-up':>8s}")
    try:
        for t in threads:
            for name, N, K, res in SHAPES:
                for M in rows_list:
                    row = run_case(name, N, K, res, M, t, args.iters)
                    rows.append(row)
                    print(f"{name:16s} {N:5d} {K:4d} {M:4d} {t:3d} {row['torch_us']:9.1f} {row['packed_us']:9.1f} "
                          f"{row['packed_gflops']:8.1f} {row['packed_weight_gbs']:8.1f} {row['speedup']:7.2f}x")
    finally:
        torch.set_num_threads(before)
    date = datetime.date.today().isoformat()
    suffix = "" if kernel == "avx512" else f"_{kernel}"
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" /
                                           f"packed_linear{suffix}_CPU_{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": f"CPU {platform.machine()} x{os.cpu_count()}", "cpu_capability":
        torch.backends.cpu.get_cpu_capability(), "packed_linear_kernel": kernel, "date": date, "torch": torch.__version__,
        "command": "python bench/bench_packed_linear.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "working_set_bytes": WORKING_SET, "rows": rows}, indent=1))
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
