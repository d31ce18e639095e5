"""A batch whose requests finish at different times, on the embedded
default pair: speculative decoding with and without trimming finished
requests' drafts (SpeculativeDecoder(trim_finished=...)), beside plain
decoding:

    python bench/bench_ragged_batch.py [--batch 16] [--max-new 128] [--repeats 3] [--out DIR]

Request r of --batch gets 8 + (max_new - 8) r / (batch - 1) new tokens
(greedy), so the batch thins out as it runs. Methods interleaved, each
one's best of --repeats runs (wall time). Writes
ragged_batch_b<batch>_<device>_<date>.json to --out (default
bench/results)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode_bench import demo_batch, parse_and_load, write_results  # noqa: E402
from dspark_ops.decoding import DraftModelDrafter, SpeculativeDecoder, load_default_dspark  # noqa: E402


def main() -> None:
    args, target, draft = parse_and_load(__doc__, batch=16, max_new=128)
    R, n = args.batch, args.num_draft
    prompts = demo_batch(R)
    limits = [8 + (args.max_new - 8) * r // max(R - 1, 1) for r in range(R)]
    makers = {"DSpark": lambda: load_default_dspark(target, num_draft=n),
              "draft model": lambda: DraftModelDrafter(draft, n)}
    decoders = {"plain": SpeculativeDecoder(target)}
    for name, make in makers.items():
        for trim in (True, False):
            decoders[f"{name}, trim_finished={trim}"] = SpeculativeDecoder(target, make(), trim_finished=trim)
    for dec in decoders.values():  # warm-up at the timed sizes
        dec.generate(prompts, limits)
    best = {}
    for _ in range(args.repeats):
        for name, dec in decoders.items():
            res = dec.generate(prompts, limits)
            if name not in best or res.stats["seconds"] < best[name].stats["seconds"]:
                best[name] = res
    plain = best["plain"].stats["tokens_per_s"]
    rows = []
    for name, res in best.items():
        s = res.stats
        rows.append({"method": name, "tokens_per_s": s["tokens_per_s"], "speedup_vs_plain": s["tokens_per_s"] / plain,
                     "steps": s["steps"], "accepted_per_step": s["mean_accepted"]})
        print(f"{name:34s} {s['tokens_per_s']:7.0f} tok/s  {s['tokens_per_s'] / plain:5.2f}x  steps {s['steps']}",
              flush=True)
    write_results(args, "ragged_batch", {"new_tokens_per_request": limits, "rows": rows})


if __name__ == "__main__":
    main()
