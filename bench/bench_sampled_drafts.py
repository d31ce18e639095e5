"""Sampled speculative decoding on the embedded default pair, with and
without the draft model's top-k / top-p filtering (DraftModelDrafter's
filter_drafts), beside plain decoding and DSpark's drafter:

    python bench/bench_sampled_drafts.py [--batch 16] [--max-new 64] [--repeats 3] [--out DIR]

For each sampling setting (temperature, top-k, top-p): the demo's four
Python prompts repeated to --batch requests, decoded in one batch with a
fixed seed (at --batch 1: each prompt on its own); accepted drafts per step
and tokens/s (each method's best of --repeats interleaved runs per batch,
wall time, summed over the batches). Filtering changes which drafts are
made, never the output distribution (both are lossless), so the accepted
length is the quantity to compare; tokens/s adds the filter's cost (a
stable sort of each draft row). Writes sampled_drafts_b<batch>_<device>_<date>.json
to --out (default bench/results)."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dspark_ops.decoding import DraftModelDrafter, SpeculativeDecoder, load_default_dspark, tokenizer  # noqa: E402
from dspark_ops.decoding.default import load_default  # noqa: E402
from dspark_ops.demo_decoding import PROMPTS  # noqa: E402

SETTINGS = [(1.0, 0, 0.9), (0.8, 0, 0.9), (0.7, 0, 0.7), (1.0, 5, 1.0), (0.8, 20, 1.0), (1.0, 0, 1.0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--num-draft", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    target, draft = load_default(args.device)
    encoded = [tokenizer.encode(p) for p in PROMPTS]
    batches = [[p] for p in encoded] if args.batch == 1 else [[encoded[i % len(encoded)] for i in range(args.batch)]]
    n = args.num_draft
    decoders = {"plain": SpeculativeDecoder(target),
                "draft model, filtered": SpeculativeDecoder(target, DraftModelDrafter(draft, n, filter_drafts=True)),
                "draft model, unfiltered": SpeculativeDecoder(target, DraftModelDrafter(draft, n)),
                "DSpark": SpeculativeDecoder(target, load_default_dspark(target, num_draft=n))}
    rows = []
    for temperature, top_k, top_p in SETTINGS:
        kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=args.seed)
        total = {name: {"seconds": 0.0, "tokens": 0, "steps": 0, "accepted": 0.0} for name in decoders}
        for prompts in batches:
            best = {}
            for _ in range(args.repeats):
                for name, dec in decoders.items():
                    res = dec.generate(prompts, args.max_new, **kw)
                    if name not in best or res.stats["seconds"] < best[name].stats["seconds"]:
                        best[name] = res
            for name, res in best.items():
                t, st = total[name], res.stats
                t["seconds"] += st["seconds"]
                t["tokens"] += st["new_tokens"]
                t["steps"] += st["steps"]
                t["accepted"] += st["mean_accepted"] * st["steps"]
        plain = total["plain"]["tokens"] / total["plain"]["seconds"]
        for name, t in total.items():
            tps, acc = t["tokens"] / t["seconds"], t["accepted"] / t["steps"]
            rows.append({"temperature": temperature, "top_k": top_k, "top_p": top_p, "method": name,
                         "accepted_per_step": acc, "tokens_per_s": tps, "speedup_vs_plain": tps / plain,
                         "steps": t["steps"]})
            print(f"T={temperature:<4} top_k={top_k:<3} top_p={top_p:<4} {name:24s} accepted/step "
                  f"{acc:5.2f}  {tps:7.0f} tok/s  {tps / plain:5.2f}x", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU_{platform.machine()}_x{torch.get_num_threads()}_threads"
    out = Path(args.out) / f"sampled_drafts_b{args.batch}_{device.replace(' ', '_')}_{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "args": vars(args), "rows": rows},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
