"""What the decoding-loop benchmarks (bench_sampled_drafts.py,
bench_dspark_schedules.py) share: their common arguments, the demo's
prompts as a batch, and writing results as
bench/results/<stem>_b<batch>_<device>_<date>.json."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path
from typing import Callable, List, Optional

import torch


def add_common_args(ap: argparse.ArgumentParser, *, batch: int, max_new: int) -> None:
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--max-new", type=int, default=max_new)
    ap.add_argument("--num-draft", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))


def parse_and_load(doc: str, *, batch: int, max_new: int,
                   extra: Optional[Callable[[argparse.ArgumentParser], None]] = None):
    """(args, target, draft): the common arguments (and `extra`'s) parsed,
    the embedded default pair loaded on --device."""
    from dspark_ops.decoding.default import load_default
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, batch=batch, max_new=max_new)
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    target, draft = load_default(args.device)
    return args, target, draft


def demo_batch(batch: int) -> List[List[int]]:
    """The demo's Python prompts (byte tokens), repeated to `batch` requests."""
    from dspark_ops.decoding import tokenizer
    from dspark_ops.demo_decoding import PROMPTS
    encoded = [tokenizer.encode(p) for p in PROMPTS]
    return [encoded[i % len(encoded)] for i in range(batch)]


def write_results(args: argparse.Namespace, stem: str, payload: dict) -> Path:
    """Writes payload (plus device, torch version and args) and returns the path."""
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU_{platform.machine()}_x{torch.get_num_threads()}_threads"
    out = Path(args.out) / f"{stem}_b{args.batch}_{device.replace(' ', '_')}_{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "args": vars(args), **payload},
                              indent=1))
    print(f"wrote {out}")
    return out
