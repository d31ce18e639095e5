"""python -m bench [--op sample|verify_chunk|verify_tree|kv_compact|schedule_verify|markov_draft|all]
                   [--quick] [--device cuda|cpu] [--out FILE]

Times each op after a reference check, with CUDA events and medians over
rotating buffers larger than L2, side by side with PyTorch (and FlashInfer
when installed); prints a table and writes JSON (device, date, rows) to
bench/results/ unless --out says otherwise."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
from pathlib import Path

import torch

import dspark_ops

from . import kv_bench, markov_bench, sample_bench, schedule_bench, tree_bench, verify_bench
from .timing import copy_bandwidth_gbs

GPU_GRID = [(R, V, dt) for V in (32000, 151936) for R in (1, 8, 64, 256) for dt in (torch.bfloat16, torch.float32)]
GPU_QUICK = [(1, 32000, torch.bfloat16), (64, 32000, torch.bfloat16), (256, 151936, torch.bfloat16),
             (8, 151936, torch.float32)]
CPU_GRID = [(1, 32000, torch.float32), (8, 32000, torch.bfloat16), (1, 151936, torch.bfloat16)]

# verify_chunk: (R, n drafts, V, dtype), each run in every verify_bench.MODES mode.
VERIFY_GPU_GRID = [(R, n, V, dt) for V in (32000, 152064) for n in (3, 7) for R in (1, 8, 64, 256)
                   for dt in (torch.bfloat16, torch.float32)]
VERIFY_GPU_QUICK = [(1, 7, 32000, torch.bfloat16), (64, 7, 32000, torch.bfloat16),
                    (256, 7, 152064, torch.bfloat16), (64, 3, 152064, torch.float32)]
# The first case is the acceptance target (C++ op >= 3x the reference, probs).
VERIFY_CPU_GRID = [(8, 7, 32000, torch.float32), (1, 3, 32000, torch.bfloat16),
                   (1, 7, 152064, torch.bfloat16), (8, 3, 152064, torch.bfloat16)]
VERIFY_CPU_QUICK = VERIFY_CPU_GRID[:2]
ACCEPTANCE_CASE = dict(R=8, n_draft=7, V=32000, dtype="float32", mode="probs")

# verify_tree: (R, nodes per request, V, dtype), each run in every
# tree_bench.MODES mode on EAGLE-like top-k trees (tree_bench.eagle_parents).
TREE_GPU_GRID = [(R, nodes, V, torch.bfloat16) for V in (32000, 128256, 152064) for nodes in (16, 64)
                 for R in (1, 8, 64)]
TREE_GPU_QUICK = [(1, 16, 32000, torch.bfloat16), (64, 16, 32000, torch.bfloat16),
                  (8, 64, 128256, torch.bfloat16), (64, 64, 152064, torch.bfloat16)]
# The first two cases are the acceptance target (C++ op >= 3x the reference).
TREE_CPU_GRID = [(8, 16, 32000, torch.float32), (8, 16, 32000, torch.bfloat16),
                 (1, 16, 32000, torch.float32), (1, 16, 32000, torch.bfloat16)]
TREE_CPU_QUICK = [TREE_CPU_GRID[0], TREE_CPU_GRID[3]]
TREE_ACCEPTANCE_CASE = dict(R=8, nodes=16, V=32000)

# kv_compact: (R, cache tensors = 2 x model layers (K and V), H, D, appended,
# kept, layout, dtype, scenario). 16 appended, 5 kept: a tree verify pass.
KV_GPU_GRID = [(64, 2 * layers, 8, 128, 16, 5, layout, torch.bfloat16, scen) for layers in (32, 80)
               for layout in kv_bench.LAYOUTS for scen in kv_bench.SCENARIOS]
KV_GPU_QUICK = [c for c in KV_GPU_GRID if c[1] == 64] + [(64, 160, 8, 128, 16, 5, "nhd", torch.bfloat16, "tree")]
KV_CPU_GRID = [(8, 8, 8, 128, 16, 5, layout, torch.bfloat16, scen) for layout in kv_bench.LAYOUTS
               for scen in kv_bench.SCENARIOS]
KV_CPU_QUICK = [c for c in KV_CPU_GRID if c[-1] == "tree"]
KV_CPU_ITERS = 25  # default --iters for kv_compact on the CPU: calls take microseconds


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def run_sample(dev: str, quick: bool, iters: int, copy_gbs: float) -> list:
    """Time `sample` over its grid; print its table."""
    grid = CPU_GRID if dev == "cpu" else (GPU_QUICK if quick else GPU_GRID)
    if dev == "cpu" and quick:
        grid = grid[:2]
    rows = []
    for R, V, dtype in grid:
        for mode in sample_bench.MODES:
            rows += sample_bench.run_case(R, V, dtype, mode, dev, iters, copy_gbs)
    hdr = f"{'impl':34s} {'mode':12s} {'R':>4s} {'V':>7s} {'dtype':8s} {'median us':>10s} {'GB/s 1pass':>10s} {'%copy':>6s} {'x ours':>7s} check"
    print(hdr)
    for r in rows:
        print(f"{r['impl']:34s} {r['mode']:12s} {r['R']:4d} {r['V']:7d} {r['dtype']:8s} {r['median_us']:10.1f} "
              f"{r['GBps_one_pass']:10.1f} {100 * r['frac_copy_bw_one_pass']:6.1f} {r['time_vs_dspark']:7.2f} "
              f"{r['check'] or ''}")
    return rows


def _fmt(x, spec: str) -> str:
    """format(x, spec), or blanks of the same width for None (baseline rows)."""
    return format(x, spec) if x is not None else " " * int(spec.split(".")[0])


def run_verify(dev: str, quick: bool, iters: int, copy_gbs: float) -> list:
    """Time `verify_chunk` over its grid; print its table and, on the CPU,
    the acceptance ratio (reference time / ours on ACCEPTANCE_CASE)."""
    if dev == "cpu":
        grid = VERIFY_CPU_QUICK if quick else VERIFY_CPU_GRID
    else:
        grid = VERIFY_GPU_QUICK if quick else VERIFY_GPU_GRID
    rows = []
    for R, n, V, dtype in grid:
        for mode in verify_bench.MODES:
            rows += verify_bench.run_case(R, n, V, dtype, mode, dev, iters, copy_gbs)
    print(f"{'impl':38s} {'mode':6s} {'R':>4s} {'n':>2s} {'V':>7s} {'dtype':8s} {'median us':>10s} "
          f"{'GB/s 1pass':>10s} {'%copy':>6s} {'GB/s+rr':>8s} {'x ours':>7s} {'acc':>5s} {'E acc':>5s} check")
    for r in rows:
        print(f"{r['impl']:38s} {r['mode']:6s} {r['R']:4d} {r['n_draft']:2d} {r['V']:7d} {r['dtype']:8s} "
              f"{r['median_us']:10.1f} {r['GBps_one_pass']:10.1f} {100 * r['frac_copy_bw_one_pass']:6.1f} "
              f"{_fmt(r['GBps_with_reread'], '8.1f')} {r['time_vs_dspark']:7.2f} {_fmt(r['accepted_mean'], '5.2f')} "
              f"{_fmt(r['accepted_expected'], '5.2f')} {r['check'] or ''}")
    print("# GB/s 1pass: every target logit + every draft row read once; GB/s+rr adds one target + draft row "
          "re-read per rejected request (residual sampling); acc: mean drafts accepted by ours on buffer 0, "
          "E acc: its expectation given the drafted tokens")
    ratio = acceptance_ratio(rows)
    if ratio is not None:
        print(f"# acceptance: torch reference / dspark_ops.verify_chunk at R=8 n=7 V=32000 float32 probs = "
              f"{ratio:.2f}x (target >= 3x): {'PASS' if ratio >= 3 else 'FAIL'}")
    return rows


def tree_acceptance_ratios(rows: list) -> list:
    """[(dtype, mode, reference median / our median)] on TREE_ACCEPTANCE_CASE."""
    t = {(r["dtype"], r["mode"], r["impl"]): r["median_us"] for r in rows
         if all(r.get(k) == v for k, v in TREE_ACCEPTANCE_CASE.items())}
    return [(dt, mode, t[(dt, mode, "torch reference")] / us) for (dt, mode, impl), us in t.items()
            if impl == "dspark_ops.verify_tree" and (dt, mode, "torch reference") in t
            and mode != "greedy"]  # the issue's CPU target is for temperature sampling


def run_tree(dev: str, quick: bool, iters: int, copy_gbs: float) -> list:
    """Time `verify_tree` over its grid; print its table and, on the CPU,
    the acceptance ratios (reference time / ours on TREE_ACCEPTANCE_CASE)."""
    if dev == "cpu":
        grid = TREE_CPU_QUICK if quick else TREE_CPU_GRID
    else:
        grid = TREE_GPU_QUICK if quick else TREE_GPU_GRID
    rows = []
    for R, nodes, V, dtype in grid:
        for mode in tree_bench.MODES:
            rows += tree_bench.run_case(R, nodes, V, dtype, mode, dev, iters, copy_gbs)
    print(f"{'impl':34s} {'mode':13s} {'R':>3s} {'nodes':>5s} {'D':>2s} {'V':>7s} {'dtype':8s} {'median us':>10s} "
          f"{'GB/s all':>9s} {'%copy':>6s} {'GB/s path':>9s} {'x ours':>7s} {'acc':>5s} check")
    for r in rows:
        print(f"{r['impl']:34s} {r['mode']:13s} {r['R']:3d} {r['nodes']:5d} {r['max_depth']:2d} {r['V']:7d} "
              f"{r['dtype']:8s} {r['median_us']:10.1f} {r['GBps_one_pass']:9.1f} "
              f"{100 * r['frac_copy_bw_one_pass']:6.1f} {_fmt(r['GBps_path'], '9.1f')} {r['time_vs_dspark']:7.2f} "
              f"{_fmt(r['accepted_mean'], '5.2f')} {r['check'] or ''}")
    print("# GB/s all: every target row of the batch (R x nodes x V x elem) read once, draft rows not counted -- "
          "a walk needs only the path's rows, so %copy can pass 100; GB/s path: the rows on our accepted path, "
          "root included (target + iid's fp32 draft row), once; D: tree depth; acc: mean nodes accepted on "
          "buffer 0 (ours; torch vectorised: its own coins, so equal only in expectation); "
          f"trees: top-{tree_bench.TOPK} EAGLE-like (tree_bench.eagle_parents), temperature 1 (greedy: 0); "
          "CUDA: ', row pass' forces the row pass (every node row's statistics by the whole GPU before the walk), "
          "', walk only' runs without it, the plain row lets the op choose; 'sglang ...': SGLang's own kernels "
          "(bench/sglang_peer.py, when tools/gpu_check.sh built them), their softmax / argmax of every node row "
          "included, check = their accepted counts against ours")
    for dt, mode, ratio in tree_acceptance_ratios(rows):
        print(f"# acceptance: torch reference / dspark_ops.verify_tree at R=8 nodes=16 V=32000 {dt} {mode} = "
              f"{ratio:.2f}x (target >= 3x): {'PASS' if ratio >= 3 else 'FAIL'}")
    return rows


def _launches(r: dict) -> str:
    """GPU kernels per call, "+Nc" for memcpys/memsets (blank on the CPU)."""
    if r["kernels"] is None:
        return ""
    return f"{r['kernels']}" + (f"+{r['device_copies']}c" if r["device_copies"] else "")


def run_kv(dev: str, quick: bool, iters: int, copy_gbs: float) -> list:
    """Time `kv_compact` over its grid; print its table."""
    if dev == "cpu":
        grid = KV_CPU_QUICK if quick else KV_CPU_GRID
    else:
        grid = KV_GPU_QUICK if quick else KV_GPU_GRID
    rows = []
    for case in grid:
        rows += kv_bench.run_case(*case, device=dev, iters=iters, copy_gbs=copy_gbs)
    print(f"{'impl':33s} {'layout':11s} {'scen':5s} {'R':>3s} {'L':>4s} {'HxD':>7s} {'dtype':8s} {'median us':>10s} "
          f"{'moved':>5s} {'MB moved':>8s} {'GB/s':>7s} {'%copy':>6s} {'x ours':>7s} "
          f"{'host us':>8s} {'kern':>6s} check")
    for r in rows:
        print(f"{r['impl']:33s} {r['layout']:11s} {r['scenario']:5s} {r['R']:3d} {r['tensors']:4d} "
              f"{str(r['H']) + 'x' + str(r['D']):>7s} {r['dtype']:8s} {r['median_us']:10.1f} "
              f"{r['moved_entries_per_tensor']:5d} {r['bytes_moved'] / 1e6:8.2f} {_fmt(r['GBps'], '7.1f')} "
              f"{_fmt(r['frac_copy_bw'] and 100 * r['frac_copy_bw'], '6.1f')} {r['time_vs_dspark']:7.2f} "
              f"{_fmt(r['host_issue_us'], '8.1f')} {_launches(r):>6s} {r['check'] or ''}")
    print("# L: cache tensors (K and V of L/2 layers); moved: kept entries not already in place per tensor; "
          "MB moved: 2 x moved x H x D x elem x L (read + write); kern: GPU kernels per call (+ memcpys, "
          "from the profiler); host us: host time to issue one call on an idle GPU (near median us: "
          "host-bound eager timing). torch per-layer copies every kept entry (in-place ones too), chain included")
    if dev == "cpu":
        print("# CPU: the caches fit in L2/L3 (no rotation on the CPU), so %copy (of a 128 MB DRAM copy) can pass 100")
    return rows


# The last case: fp32 weights (bf16 logits) take the exact fp32 bias kernel instead of cuBLAS.
MARKOV_GPU_GRID = [(R, 7, 152064, 256, torch.bfloat16) for R in (1, 32, 128, 4, 64)] + [
    (32, 7, 152064, 256, torch.bfloat16, torch.float32)]
MARKOV_CPU_GRID = [(1, 7, 32000, 64, torch.float32), (8, 7, 32000, 64, torch.bfloat16)]


def run_markov(dev: str, quick: bool, iters: int, copy_gbs: float) -> list:
    """Time `markov_draft` per step against its memory floor; print its table."""
    grid = MARKOV_CPU_GRID[:1 if quick else 2] if dev == "cpu" else MARKOV_GPU_GRID[:2] if quick else MARKOV_GPU_GRID
    rows = []
    for case in grid:
        rows += markov_bench.run_case(*case, device=dev, iters=iters, copy_gbs=copy_gbs)
    print(f"{'impl':48s} {'R':>4s} {'G':>2s} {'V':>7s} {'r':>4s} {'dtype':8s} {'weights':8s} {'median us':>10s} "
          f"{'us/step':>9s} {'floor':>8s} {'x floor':>8s} {'x ours':>7s}")
    for r in rows:
        print(f"{r['impl']:48s} {r['R']:4d} {r['G']:2d} {r['V']:7d} {r['r']:4d} {r['dtype']:8s} {r['weight_dtype']:8s} "
              f"{r['median_us']:10.1f} {r['us_per_step']:9.1f} {r['floor_us_per_step']:8.2f} {r['x_floor']:8.1f} "
              f"{r['time_vs_dspark']:7.2f}")
    print("# floor: reading w2 once and one base row + writing one corrected row per request per step, at the "
          "measured copy bandwidth")
    return rows


SCHEDULE_GRID = [(256, 7), (4096, 16)]
SCHEDULE_CPU_GRID = [(256, 7)]


def run_schedule(dev: str, quick: bool, iters: int) -> list:
    """Time `schedule_verify` (DSpark's scheduler) per mode; print its table."""
    grid = SCHEDULE_CPU_GRID if (dev == "cpu" or quick) else SCHEDULE_GRID
    rows = []
    for R, G in grid:
        for mode in schedule_bench.MODES:
            rows += schedule_bench.run_case(R, G, mode, dev, iters)
    print(f"{'impl':28s} {'mode':11s} {'R':>5s} {'G':>3s} {'median us':>10s} {'x ours':>7s} {'admitted':>8s} check")
    for r in rows:
        print(f"{r['impl']:28s} {r['mode']:11s} {r['R']:5d} {r['G']:3d} {r['median_us']:10.1f} "
              f"{r['time_vs_dspark']:7.2f} {r['admitted']:8d} {r['check'] or ''}")
    return rows


def acceptance_ratio(rows: list):
    """Reference median / our median on ACCEPTANCE_CASE, None if not run."""
    t = {r["impl"]: r["median_us"] for r in rows
         if all(r.get(k) == v for k, v in ACCEPTANCE_CASE.items())}
    if "torch reference" not in t or "dspark_ops.verify_chunk" not in t:
        return None
    return t["torch reference"] / t["dspark_ops.verify_chunk"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--op", default="sample", choices=["sample", "verify_chunk", "verify_tree", "kv_compact",
                                                      "schedule_verify", "markov_draft", "all"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a small grid (CI-sized on the CPU)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<op>_<device>_<date>.json)")
    args = p.parse_args(argv)
    dev = args.device
    iters = args.iters or (50 if dev == "cuda" else 5)
    copy_gbs = copy_bandwidth_gbs(dev)
    name = device_name(dev)
    print(f"# {name}: measured copy bandwidth {copy_gbs:.0f} GB/s; repro: python -m bench "
          + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    rows = []
    if args.op in ("sample", "all"):
        rows += run_sample(dev, args.quick, iters, copy_gbs)
    if args.op in ("verify_chunk", "all"):
        rows += run_verify(dev, args.quick, iters, copy_gbs)
    if args.op in ("verify_tree", "all"):
        rows += run_tree(dev, args.quick, iters, copy_gbs)
    if args.op in ("kv_compact", "all"):
        rows += run_kv(dev, args.quick, args.iters or (iters if dev == "cuda" else KV_CPU_ITERS), copy_gbs)
    if args.op in ("schedule_verify", "all"):
        rows += run_schedule(dev, args.quick, iters)
    if args.op in ("markov_draft", "all"):
        rows += run_markov(dev, args.quick, iters, copy_gbs)
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        f"{args.op}_{name.replace(' ', '_').replace('/', '_')}_{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "date": date, "torch": torch.__version__,
                               "dspark_ops": dspark_ops.__version__, "copy_GBps": copy_gbs,
                               "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                               "rows": rows}, indent=1))
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
