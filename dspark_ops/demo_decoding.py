"""`python -m dspark_ops demo` (`make demo`): speculative decoding on the
embedded default pair — a byte-level target and draft trained on the Python
standard library (dspark_ops/decoding/weights, never downloaded, never
trained here). Plain greedy decoding against speculative decoding with
prompt lookup (NGramDrafter) and with the draft model (DraftModelDrafter),
with an n-gram tree (verify_tree), and with DSpark's block drafter (one head
forward + markov_draft per step; optionally cut by schedule_verify's
early_stop), on the same Python-code prompts:
accepted length, tokens/s, speed-up, and a check that the greedy outputs are
identical token for token."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import torch

PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv=None):\n    if argv is None:\n        argv = sys.argv[1:]\n    ",
    "class Stack:\n\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, item):\n        self.items.append(item)\n\n    def pop(self):\n        ",
    "def read_lines(path, encoding=\"utf-8\"):\n    \"\"\"Return the lines of the file at *path*.\"\"\"\n    "
    "with open(path, encoding=encoding) as f:\n        ",
    "    def __repr__(self):\n        return '%s(%r)' % (self.__class__.__name__, self.",
]


def _methods(target, draft, num_ngram: int, num_model: int, num_dspark: int, graphs: str, weights_dir):
    """(name, drafter factory, cuda_graph) per row; graphs: off, on or both
    (every method eagerly, then with its verify step as CUDA graphs). The
    DSpark rows need the head in the weights' record (tools/train_dspark.py)."""
    from .decoding import DraftModelDrafter, NGramDrafter, load_default_dspark, tokenizer
    from .decoding.default import default_record
    from .decoding.dspark import step_sps_table
    base = [("plain (target only)", lambda g: None),
            (f"n-gram lookup, {num_ngram} drafts", lambda g: NGramDrafter(max_ngram=3, num_draft=num_ngram)),
            ("n-gram tree, 3 branches, 12 nodes", lambda g: NGramDrafter(max_ngram=3, num_draft=12, branches=3)),
            (f"draft model, {num_model} drafts",
             lambda g: DraftModelDrafter(draft, num_draft=num_model, cuda_graph=g))]
    record = default_record(weights_dir)
    if "dspark" in record:
        G = min(num_dspark, record["dspark"]["config"]["block"])
        # early_stop's cost model, measured now on this machine (one request at a time, as the demo decodes)
        sps, _ = step_sps_table(target, load_default_dspark(target, weights_dir=weights_dir, num_draft=G),
                                [tokenizer.encode(PROMPTS[0])])
        base += [(f"DSpark block + Markov head, {G} drafts",
                  lambda g: load_default_dspark(target, weights_dir=weights_dir, num_draft=G)),
                 ("DSpark + early_stop schedule", lambda g: load_default_dspark(
                     target, weights_dir=weights_dir, num_draft=G, schedule="early_stop", sps_table=sps))]
    rows = [(name, lambda make=make: make(False), False) for name, make in base] if graphs != "on" else []
    if graphs != "off":
        rows += [(name + " +graphs", lambda make=make: make(True), True) for name, make in base]
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dspark_ops demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--ngram-drafts", type=int, default=7)
    ap.add_argument("--model-drafts", type=int, default=5)
    ap.add_argument("--dspark-drafts", type=int, default=6, help="at most the head's block")
    ap.add_argument("--weights-dir", default=None, help="another copy of the default pair (default: the embedded one)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per (method, prompt); the fastest counts")
    ap.add_argument("--cuda-graph", choices=("off", "on", "both"), default=None,
                    help="run the verify steps as CUDA graphs (SpeculativeDecoder(cuda_graph=True)): off, on, or "
                         "both side by side (default: both on a GPU, off on the CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from tqdm import tqdm
    except ImportError:
        raise SystemExit("the decoding demo needs tqdm and safetensors: pip install 'dspark_ops[demo]'") from None

    import dspark_ops
    from .decoding import SpeculativeDecoder, tokenizer
    from .decoding.default import DefaultWeightsError, default_record, load_default

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"dspark_ops demo: --device {device!r} is not a device (cpu or cuda)") from None
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"dspark_ops demo: --device {device!r}: the demo runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"dspark_ops demo: --device {device}: no CUDA device is available "
                         "(torch.cuda.is_available() is False)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > cores and dev.type == "cpu":
        # torch's OpenMP threads spin when the cores are taken: the timings then mean little (seen: 10x slower)
        print(f"dspark_ops demo: warning: load average {os.getloadavg()[0]:.1f} on {cores} usable cores; "
              "other processes share the CPU, so these timings are unreliable (try --threads 1)", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        target, draft = load_default(device, weights_dir=args.weights_dir)
    except (DefaultWeightsError, ImportError) as e:
        raise SystemExit(f"dspark_ops demo: {e}") from None
    rec = default_record(args.weights_dir)
    print(f"dspark_ops {dspark_ops.__version__} on {device}: the embedded default pair (checksums verified, "
          f"loaded in {time.perf_counter() - t0:.2f}s)")
    for role, m in (("target", target), ("draft", draft)):
        c, tr = rec[role]["config"], rec[role]["training"]
        print(f"  {role:6s} {sum(p.numel() for p in m.model.parameters()) / 1e6:.2f}M params (dim {c['dim']}, "
              f"{c['n_layers']} layers), {tr['final_val_bpb']:.2f} bits/byte on held-out stdlib files")
    print(f"  target/draft cost per token: {rec['cost_ratio_flops_per_token']:.1f}x; "
          f"{len(PROMPTS)} Python prompts, greedy, {args.max_new_tokens} new bytes each, one request at a time")

    prompts = [tokenizer.encode(p) for p in PROMPTS]
    graphs = args.cuda_graph or ("both" if device.startswith("cuda") else "off")
    methods = _methods(target, draft, args.ngram_drafts, args.model_drafts, args.dspark_drafts, graphs,
                       args.weights_dir)
    # One decoder per method for the whole run (with CUDA graphs it keeps its device state and graphs from call
    # to call while the sizes fall in the same 256-entry bucket); a warm-up (first-call allocations, lazy inits)
    # on a short generation each.
    decoders = {name: SpeculativeDecoder(target, make(), cuda_graph=cuda_graph) for name, make, cuda_graph in methods}
    for dec in decoders.values():
        dec.generate([prompts[0]], max_new_tokens=8)

    # Rounds of every prompt under every method, interleaved; each (method, prompt) keeps its fastest round,
    # so a burst of load from the machine's neighbours does not decide the speed-up.
    results = {name: [None] * len(prompts) for name, _, _ in methods}
    bar = tqdm(total=args.rounds * len(methods) * len(prompts), desc="decoding", unit="run", dynamic_ncols=True,
               leave=False)
    for _ in range(args.rounds):
        for i, p in enumerate(prompts):
            for name, _, _ in methods:
                bar.set_postfix_str(name.split(",")[0], refresh=False)
                res = decoders[name].generate([p], max_new_tokens=args.max_new_tokens, temperature=0.0)
                best = results[name][i]
                if best is None or res.stats["seconds"] < best.stats["seconds"]:
                    results[name][i] = res
                bar.update(1)
    bar.close()

    plain_name = methods[0][0]
    plain_s = sum(r.stats["seconds"] for r in results[plain_name])
    print(f"\n  {'method':42s} {'accepted/step':>13s} {'tokens/pass':>11s} {'tokens/s':>9s} {'speed-up':>8s}   "
          f"per prompt: accepted/step")
    ref = [r.tokens for r in results[plain_name]]
    identical = True
    for name, _, _ in methods:
        rs = results[name]
        steps = sum(r.stats["steps"] for r in rs)
        new = sum(r.stats["new_tokens"] for r in rs)
        secs = sum(r.stats["seconds"] for r in rs)
        acc = sum(a for r in rs for a in r.stats["accepted_per_step"]) / steps
        same = [r.tokens for r in rs] == ref
        identical &= same
        per = "  ".join(f"{r.stats['mean_accepted']:.2f}" for r in rs)
        print(f"  {name:42s} {acc:13.2f} {new / steps:11.2f} {new / secs:9.0f} {plain_s / secs:7.2f}x   {per}"
              + ("" if same else "   (OUTPUT DIFFERS)"))
    print(f"\n  greedy outputs identical to plain decoding, token for token: {identical}")
    sample = results[methods[0][0]][3]
    print("\n  one sample (prompt | continuation, the same from every method):")
    text = PROMPTS[3] + "\u2502" + tokenizer.decode(sample.tokens[0])
    print("\n".join("    " + line for line in text.splitlines()))
    if not identical:
        raise SystemExit("dspark_ops demo: speculative greedy output differs from plain greedy output")


if __name__ == "__main__":
    main()
