"""python -m bench [--op sample] [--quick] [--device cuda|cpu] [--out FILE]

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

from . import sample_bench
from .timing import copy_bandwidth_gbs

GPU_GRID = [(R, V, dt) for V in (32000, 151936) for R in (1, 8, 64, 256) for dt in (torch.bfloat16, torch.float32)]
CPU_GRID = [(1, 32000, torch.float32), (8, 32000, torch.bfloat16), (1, 151936, torch.bfloat16)]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--op", default="sample", choices=["sample"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a small grid (CI-sized on the CPU)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<device>_<date>.json)")
    args = p.parse_args(argv)
    dev = args.device
    grid = CPU_GRID if dev == "cpu" else (GPU_GRID[:4] if args.quick else GPU_GRID)
    if dev == "cpu" and args.quick:
        grid = grid[:2]
    iters = args.iters or (50 if dev == "cuda" else 5)
    copy_gbs = copy_bandwidth_gbs(dev)
    name = device_name(dev)
    print(f"# {name}: measured copy bandwidth {copy_gbs:.0f} GB/s; repro: python -m bench "
          + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
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
