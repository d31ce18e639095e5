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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode_bench import demo_batch, parse_and_load, write_results  # noqa: E402
from dspark_ops.decoding import DraftModelDrafter, SpeculativeDecoder, load_default_dspark  # noqa: E402
from dspark_ops.demo_decoding import PROMPTS  # noqa: E402

SETTINGS = [(1.0, 0, 0.9), (0.8, 0, 0.9), (0.7, 0, 0.7), (1.0, 5, 1.0), (0.8, 20, 1.0), (1.0, 0, 1.0)]


def main() -> None:
    args, target, draft = parse_and_load(__doc__, batch=16, max_new=64,
                                         extra=lambda ap: ap.add_argument("--seed", type=int, default=7))
    batches = [[p] for p in demo_batch(len(PROMPTS))] if args.batch == 1 else [demo_batch(args.batch)]
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
    write_results(args, "sampled_drafts", {"rows": rows})


if __name__ == "__main__":
    main()
