"""End-to-end speculative decoding on the CPU against Hugging Face's own
(DESIGN §3: "the peers on a CPU are Hugging Face's assisted generation"):

    python bench/bench_e2e.py [--max-new 128] [--num-draft 5] [--repeats 3] [--threads 1] [--profile ours_ngram]

One HF Llama (random weights, a few million parameters, float32), batch 1,
greedy, side by side in one run:

  hf_plain             model.generate()
  ours_plain           SpeculativeDecoder(HFTarget(model))            (no drafter)
  hf_prompt_lookup     generate(prompt_lookup_num_tokens=n, max_matching_ngram_size=3)
  ours_ngram           NGramDrafter(max_ngram=3, num_draft=n)
  hf_assisted          generate(assistant_model=small) with the assistant's generation_config set to
                       num_assistant_tokens=n, constant schedule, assistant_confidence_threshold=0:
                       the same fixed-length chain as ours (HF reads these from the assistant's
                       config, not from generate()'s arguments)
  hf_assisted_default  generate(assistant_model=small) with HF's defaults (20 tokens, heuristic
                       schedule, confidence threshold 0.4), reset before every call
  ours_draft_model     DraftModelDrafter(HFTarget(small), num_draft=n)
  ours_builtin_*       the same three on BuiltinTarget(builtin_from_hf(model)): the same weights run by
                       the built-in model's forward (fused GEMMs, no HF module overhead), tokens compared

The weights are random, so acceptance comes from structure, not language:
the prompts are repeated code-like token lines (prompt lookup finds them, and
a random model's greedy text soon cycles, which lookup then follows), and the
draft model is the target's first layer with its embeddings, final norm and
head; the embeddings are initialised 20x larger than HF's default
(--embed-scale), so the residual stream is mostly the embedding and the
truncated model agrees with the target about 2/3 of the time. Every method's greedy tokens
are compared with hf_plain's. Methods run interleaved (per prompt, in a
rotating order), `--repeats` times; tokens/s sums each prompt's best repeat,
in wall time and in this process's CPU time (torch on one thread by
default, so CPU time is the run's own work: on a shared machine it is the
stable number; the plot and the "CPU" speedups use it). Writes bench/results/e2e_CPU_<date>.json and a bar plot
.png beside it. `--profile NAME` then runs one of ours under cProfile and
prints where the time goes."""
from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import dspark_ops  # noqa: E402
from dspark_ops.decoding import (BuiltinTarget, DraftModelDrafter, NGramDrafter, SpeculativeDecoder,  # noqa: E402
                                 builtin_from_hf)
from dspark_ops.decoding.hf import HFTarget  # noqa: E402


def build_models(vocab: int, hidden: int, layers: int, draft_layers: int, seed: int, embed_scale: float = 20.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    target = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # embedding-dominated residual stream: a truncated copy drafts well
        target.model.embed_tokens.weight.mul_(embed_scale)
    dcfg = LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": draft_layers})
    draft = LlamaForCausalLM(dcfg).float().eval()
    # the draft: the target's first layers, embeddings, final norm and head
    missing = draft.load_state_dict(target.state_dict(), strict=False)
    assert not missing.missing_keys, missing.missing_keys
    for m in (target, draft):
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = 0
    return target, draft


def code_prompts(vocab: int, n: int, length: int, seed: int):
    """Token sequences shaped like code: a few 'identifiers' and 'keywords'
    recombined into lines that repeat with small variations."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n):
        words = torch.randint(10, vocab, (24,), generator=g).tolist()
        kw, names = words[:6], words[6:]
        lines = []
        for j in range(4):  # line templates
            t = torch.randint(0, len(names), (5,), generator=g).tolist()
            lines.append([kw[j % 6], names[t[0]], kw[(j + 1) % 6], names[t[1]], names[t[2]], kw[5], names[t[3]],
                          names[t[4]], 3])
        seq = []
        while len(seq) < length:
            line = list(lines[int(torch.randint(0, 4, (1,), generator=g))])
            if torch.rand(1, generator=g).item() < 0.3:  # a small edit
                line[int(torch.randint(1, 8, (1,), generator=g))] = names[int(torch.randint(0, 18, (1,), generator=g))]
            seq += line
        prompts.append(seq[:length])
    return prompts


def methods(target, draft, n: int, b_target=None, b_draft=None):
    """HF's methods and ours; with b_target/b_draft (the same weights as
    BuiltinModels, builtin_from_hf) also ours on the built-in forward."""
    t_hf = HFTarget(target)

    def hf(assistant_config=None, **kw):
        def run(p, max_new):
            if assistant_config is not None:  # HF reads these from the assistant's own generation_config
                for key, value in assistant_config.items():  # (and a heuristic schedule persists: reset it)
                    setattr(draft.generation_config, key, value)
            ids = torch.tensor([p])
            out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=max_new, **kw)
            return out[0, len(p):].tolist()
        return run

    def ours(make_drafter, tgt=t_hf):
        def run(p, max_new):
            return SpeculativeDecoder(tgt, make_drafter()).generate([p], max_new_tokens=max_new).tokens[0]
        return run

    builtin = {} if b_target is None else {
        "ours_builtin_plain": ("plain", "builtin", ours(lambda: None, b_target)),
        "ours_builtin_ngram": ("ngram", "builtin", ours(lambda: NGramDrafter(max_ngram=3, num_draft=n), b_target)),
        "ours_builtin_draft_model": ("draft_model", "builtin",
                                     ours(lambda: DraftModelDrafter(b_draft, num_draft=n), b_target)),
    }
    return {
        "hf_plain": ("plain", "hf", hf()),
        "ours_plain": ("plain", "ours", ours(lambda: None)),
        "hf_prompt_lookup": ("ngram", "hf", hf(prompt_lookup_num_tokens=n, max_matching_ngram_size=3)),
        "ours_ngram": ("ngram", "ours", ours(lambda: NGramDrafter(max_ngram=3, num_draft=n))),
        "hf_assisted": ("draft_model", "hf", hf({"num_assistant_tokens": n, "num_assistant_tokens_schedule": "constant",
                                                 "assistant_confidence_threshold": 0.0}, assistant_model=draft)),
        "hf_assisted_default": ("draft_model", "hf", hf({"num_assistant_tokens": None,
                                                         "num_assistant_tokens_schedule": None,
                                                         "assistant_confidence_threshold": None},
                                                        assistant_model=draft)),
        "ours_draft_model": ("draft_model", "ours", ours(lambda: DraftModelDrafter(HFTarget(draft), num_draft=n))),
        **builtin,
    }


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [r["method"] for r in rows]
    vals = [r["tokens_per_s_cpu"] for r in rows]
    palette = {"hf": "#1f77b4", "ours": "#d62728", "builtin": "#2ca02c"}
    colors = [palette[r["impl"]] for r in rows]
    bars = ax.bar(range(len(rows)), vals, color=colors)
    for b, r in zip(bars, rows):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{r['tokens_per_s_cpu']:.0f}"
                + ("" if r["equal_to_hf_plain"] else " (≠)"), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    ax.set_ylabel("tokens/s (batch 1, greedy; CPU time, best repeat)")
    ax.set_title(title, fontsize=9)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color="#1f77b4", label="Hugging Face generate()"),
                       Patch(color="#d62728", label="dspark_ops SpeculativeDecoder + HFTarget"),
                       Patch(color="#2ca02c", label="dspark_ops + BuiltinTarget(builtin_from_hf(same weights))")],
              fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/bench_e2e.py")
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--num-draft", type=int, default=5)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings of a small model)")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embed-scale", type=float, default=20.0,
                   help="embedding init x this (HF's std 0.02 x 20): the draft agrees with the target ~2/3 of the time")
    p.add_argument("--profile", default=None, help="after the table, cProfile one of ours (ours_ngram, ...)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/e2e_CPU_<date>.json)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    target, draft = build_models(args.vocab, args.hidden, args.layers, args.draft_layers, args.seed,
                                 args.embed_scale)
    n_params = sum(x.numel() for x in target.parameters())
    n_draft = sum(x.numel() for x in draft.parameters())
    prompts = code_prompts(args.vocab, args.prompts, args.prompt_len, args.seed)
    command = "python bench/bench_e2e.py " + " ".join(argv)
    print(f"# CPU {platform.machine()} x{torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; target {n_params / 1e6:.1f}M params ({args.layers} layers), draft "
          f"{n_draft / 1e6:.1f}M ({args.draft_layers} layer(s)); {args.prompts} prompts x {args.prompt_len} tokens, "
          f"{args.max_new} new, num_draft {args.num_draft}\n# repro: {command}")
    b_target, b_draft = BuiltinTarget(builtin_from_hf(target)), BuiltinTarget(builtin_from_hf(draft))
    meths = methods(target, draft, args.num_draft, b_target, b_draft)
    with torch.inference_mode():
        for name, (_, _, fn) in meths.items():  # warm-up
            fn(prompts[0][:32], 8)
    names = list(meths)
    P = len(prompts)
    wall = {k: [[] for _ in range(P)] for k in names}  # [method][prompt] -> seconds per repeat
    cpu = {k: [[] for _ in range(P)] for k in names}
    tokens = {k: [None] * P for k in names}
    passes = {k: [0] * P for k in names}
    counter = [0]
    hooks = [m.register_forward_pre_hook(lambda mod, a: counter.__setitem__(0, counter[0] + 1))
             for m in (target, b_target.model)]
    t_start = time.perf_counter()
    # Interleaved: every repeat runs every prompt under every method, the methods' order rotating,
    # so that a burst of load on the machine hits all methods alike.
    for rep in range(args.repeats):
        for i, pr in enumerate(prompts):
            k = (rep * P + i) % len(names)
            for name in names[k:] + names[:k]:
                counter[0] = 0
                c0, t0 = time.process_time(), time.perf_counter()
                with torch.inference_mode():
                    toks = meths[name][2](pr, args.max_new)
                wall[name][i].append(time.perf_counter() - t0)
                cpu[name][i].append(time.process_time() - c0)
                tokens[name][i] = toks
                passes[name][i] = counter[0]  # target forward passes, prefill included
    for h in hooks:
        h.remove()
    total_new = P * args.max_new
    ref = tokens["hf_plain"]
    rows = []
    for name, (kind, impl, _) in meths.items():
        best_wall = sum(min(x) for x in wall[name])  # per prompt, the best repeat
        best_cpu = sum(min(x) for x in cpu[name])
        med_wall = sum(statistics.median(x) for x in wall[name])
        rows.append({"method": name, "drafter": kind, "impl": impl,
                     "tokens_per_s": total_new / best_wall, "tokens_per_s_cpu": total_new / best_cpu,
                     "tokens_per_s_median": total_new / med_wall,
                     "seconds_best": best_wall, "cpu_seconds_best": best_cpu, "seconds_all": wall[name],
                     "cpu_seconds_all": cpu[name], "target_passes": sum(passes[name]),
                     "equal_to_hf_plain": tokens[name] == ref,
                     "num_tokens": [len(t) for t in tokens[name]],
                     "first_mismatch": next(([i, j] for i, (a, b) in enumerate(zip(tokens[name], ref)) for j, (x, y)
                                             in enumerate(zip(a, b)) if x != y), None)})
    # acceptance of ours (one extra run each, not timed)
    with torch.inference_mode():
        t_hf = HFTarget(target)
        for row, tgt, mk in (("ours_ngram", t_hf, lambda: NGramDrafter(3, args.num_draft)),
                             ("ours_draft_model", t_hf, lambda: DraftModelDrafter(HFTarget(draft), args.num_draft)),
                             ("ours_builtin_ngram", b_target, lambda: NGramDrafter(3, args.num_draft)),
                             ("ours_builtin_draft_model", b_target, lambda: DraftModelDrafter(b_draft, args.num_draft))):
            st = [SpeculativeDecoder(tgt, mk()).generate([pr], max_new_tokens=args.max_new).stats for pr in prompts]
            r = next(x for x in rows if x["method"] == row)
            r["mean_accepted"] = sum(s["mean_accepted"] for s in st) / len(st)
    by = {r["method"]: r for r in rows}
    pairs = [("ours_plain", "hf_plain"), ("ours_ngram", "hf_prompt_lookup"), ("ours_draft_model", "hf_assisted"),
             ("ours_draft_model", "hf_assisted_default"), ("ours_builtin_plain", "hf_plain"),
             ("ours_builtin_ngram", "hf_prompt_lookup"), ("ours_builtin_draft_model", "hf_assisted"),
             ("ours_builtin_draft_model", "hf_assisted_default")]
    speedups = {f"{a} / {b}": {"wall": by[a]["tokens_per_s"] / by[b]["tokens_per_s"],
                               "cpu": by[a]["tokens_per_s_cpu"] / by[b]["tokens_per_s_cpu"]} for a, b in pairs}
    print(f"\n| method | drafter | tokens/s (wall, best) | tokens/s (CPU time, best) | tokens/s (wall, median) | "
          f"vs hf_plain (CPU) | same tokens as hf_plain | target passes | CPU ms / pass | mean accepted (ours) |"
          f"\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{r['mean_accepted']:.2f}" if "mean_accepted" in r else ""
        same = "yes" if r["equal_to_hf_plain"] else f"NO {r['first_mismatch']}"
        print(f"| {r['method']} | {r['drafter']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_cpu']:.1f} | "
              f"{r['tokens_per_s_median']:.1f} | {r['tokens_per_s_cpu'] / by['hf_plain']['tokens_per_s_cpu']:.2f}x | "
              f"{same} | {r['target_passes']} | {1e3 * r['cpu_seconds_best'] / r['target_passes']:.2f} | {acc} |")
    print()
    for k, v in speedups.items():
        print(f"# {k}: {v['wall']:.2f}x wall, {v['cpu']:.2f}x CPU time")
    print(f"# timed section {time.perf_counter() - t_start:.1f} s")
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"e2e_CPU_{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads",
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "date": date,
            "torch": torch.__version__, "transformers": transformers.__version__, "dspark_ops": dspark_ops.__version__,
            "command": command, "args": vars(args), "target_params": n_params, "draft_params": n_draft,
            "total_new_tokens": total_new, "rows": rows, "speedups": speedups}
    out.write_text(json.dumps(meta, indent=1))
    png = out.with_suffix(".png")
    plot(rows, png, f"{meta['device']}: Llama {n_params / 1e6:.1f}M (random), draft {n_draft / 1e6:.1f}M, "
                    f"batch 1, greedy, {args.prompts}x{args.max_new} new tokens, num_draft {args.num_draft}")
    print(f"# wrote {out} and {png}")
    if args.profile:
        fn = meths[args.profile][2]
        prof = cProfile.Profile()
        with torch.inference_mode():
            prof.enable()
            for pr in prompts:
                fn(pr, args.max_new)
            prof.disable()
        for key in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(30)
            print(f"# cProfile of {args.profile}, sorted by {key}\n" + s.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
