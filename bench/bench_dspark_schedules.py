"""DSpark's drafter on the embedded default pair with each lossless
verification schedule, batched, beside plain decoding:

    python bench/bench_dspark_schedules.py [--batch 16] [--max-new 64] [--repeats 3] [--out DIR]

The demo's four Python prompts repeated to --batch requests, decoded in one
batch (greedy, and sampled at temperature 1, seed 3). Methods: plain;
DSpark verifying all 5 drafts; `schedule="early_stop"` (DSpark's
Algorithm 1) on an SPS table measured first (step_sps_table: the target's
forward at R..R (n + 1) tokens plus the step's measured overhead outside
it); `schedule="budget"` with 48 and 32 drafted tokens a
step. Accepted drafts per step and tokens/s (best of --repeats interleaved
runs, wall time). Writes dspark_schedules_b<batch>_<device>_<date>.json to
--out (default bench/results)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode_bench import demo_batch, parse_and_load, write_results  # noqa: E402
from dspark_ops.decoding import SpeculativeDecoder, load_default_dspark  # noqa: E402
from dspark_ops.decoding.dspark import step_sps_table  # noqa: E402


def main() -> None:
    args, target, draft = parse_and_load(__doc__, batch=16, max_new=64)
    R, n = args.batch, args.num_draft
    prompts = demo_batch(R)
    # early_stop's cost model: the forward at R..R(n+1) tokens plus what a step spends outside it
    sps, overhead = step_sps_table(target, load_default_dspark(target, num_draft=n), prompts, max_new=args.max_new,
                                   repeats=2)
    makers = {"plain": lambda: None,
              "DSpark, all drafts": lambda: load_default_dspark(target, num_draft=n),
              "DSpark + early_stop": lambda: load_default_dspark(target, num_draft=n, schedule="early_stop",
                                                                 sps_table=sps),
              "DSpark + budget 48": lambda: load_default_dspark(target, num_draft=n, schedule="budget", budget=48),
              "DSpark + budget 32": lambda: load_default_dspark(target, num_draft=n, schedule="budget", budget=32)}
    decoders = {name: SpeculativeDecoder(target, make()) for name, make in makers.items()}
    for dec in decoders.values():
        dec.generate(prompts, 16)
    rows = []
    for temperature in (0.0, 1.0):
        best = {}
        for _ in range(args.repeats):
            for name, dec in decoders.items():
                res = dec.generate(prompts, args.max_new, temperature=temperature, seed=3)
                if name not in best or res.stats["seconds"] < best[name].stats["seconds"]:
                    best[name] = res
        plain = best["plain"].stats["tokens_per_s"]
        for name, res in best.items():
            s = res.stats
            rows.append({"temperature": temperature, "method": name, "accepted_per_step": s["mean_accepted"],
                         "tokens_per_s": s["tokens_per_s"], "speedup_vs_plain": s["tokens_per_s"] / plain,
                         "steps": s["steps"]})
            print(f"T={temperature}  {name:22s} accepted/step {s['mean_accepted']:5.2f}  {s['tokens_per_s']:7.0f} "
                  f"tok/s  {s['tokens_per_s'] / plain:5.2f}x", flush=True)
    write_results(args, "dspark_schedules", {"step_overhead_s": overhead, "sps_table": sps.tolist(), "rows": rows})


if __name__ == "__main__":
    main()
