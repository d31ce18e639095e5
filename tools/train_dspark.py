"""Train the embedded default target's DSpark drafting head once
(dspark_ops.decoding.dspark; RESEARCH.md's recipe, simplified): the target
stays frozen; its hidden states after layers (2, 4) are the context
features, its embedding, final norm and LM head are shared. Writes
default_dspark.safetensors (fp16) next to the default pair and adds a
"dspark" entry (config, sha256, training and held-out record) to
default.json, keeping every shipped file under 5 MB together.

    .venv/bin/python tools/train_dspark.py                    # 32 min on 2 CPU cores (what ships)
    .venv/bin/python tools/train_dspark.py --minutes 0.5 --out /tmp/w   # a smoke run (copies the pair first)

Per training window of 256 bytes and every position t: features h_t, the
anchor x_{t+1}, and G = 5 drafts teacher-forced (x_{k-1} is the true
previous byte). Loss (DSpark's weights): 0.1 x cross entropy of the
Markov-corrected logits + 0.9 x their total variation from the target's
distribution at that position + 1.0 x the confidence head's BCE toward
1 - TV. The held-out record gives the expected accepted length at
temperature 1 (sum over k of prod_{i<=k} (1 - TV_i)) and the greedy
agreement; fit_sequential_temperatures calibrates the confidence head on
held-out blocks whose accept counts are drawn from those probabilities."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import pathlib
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from train_default import MAX_TOTAL_BYTES, batch, load_corpus, val_windows  # noqa: E402
from dspark_ops.decoding.default import WEIGHTS_DIR, load_default  # noqa: E402
from dspark_ops.decoding.dspark import DSparkConfig, DSparkHead  # noqa: E402
from dspark_ops.schedule import expected_calibration_error, fit_sequential_temperatures  # noqa: E402

HEAD_FILE = "default_dspark.safetensors"


def block_terms(head: DSparkHead, target, w: torch.Tensor):
    """Windows w [B, L + 1] -> (corrected logits [B, T, G, V], labels
    [B, T, G], TV [B, T, G], confidence logits [B, T, G], the target's
    logits for the same tokens [B, T, G, V]), T = L - G."""
    G = head.cfg.block
    ids = w[:, :-1]
    L = ids.shape[1]
    with torch.no_grad():
        tgt, hid = target.train_hidden(ids, head.cfg.hidden_layers)
    T = L - G
    pos = torch.arange(T).unsqueeze(1) + torch.arange(1, G + 1)  # [T, G]: x_{t+k}, the draft's predecessor
    prev, labels = w[:, pos], w[:, pos + 1]
    tgt = tgt[:, pos]
    p_target = torch.softmax(tgt.float(), -1)
    block = head.block_hidden(hid, w[:, 1:T + 1], target.embed.weight)
    base = F.linear(target.norm(block), target.head.weight)
    corr = base + F.embedding(prev, head.markov_w1) @ head.markov_w2
    tv = 0.5 * (torch.softmax(corr.float(), -1) - p_target).abs().sum(-1)
    return corr, labels, tv, head.confidence_logits(block, prev), tgt


def loss_of(head, target, w, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        corr, labels, tv, conf, _ = block_terms(head, target, w)
    ce = F.cross_entropy(corr.float().flatten(0, 2), labels.flatten())
    bce = F.binary_cross_entropy_with_logits(conf.float(), (1 - tv).detach())
    return 0.1 * ce + 0.9 * tv.mean() + bce, ce, tv


@torch.no_grad()
def evaluate(head, target, windows, chunk: int = 8, seed: int = 0) -> dict:
    """Held-out: mean TV per position, expected accepted length (T = 1,
    teacher forced), greedy agreement per position, and the confidence
    logits with sampled accept counts (for calibration)."""
    head.eval()
    tvs, agree, confs, accs = [], [], [], []
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(windows), chunk):
        w = windows[i:i + chunk]
        corr, labels, tv, conf, tgt = block_terms(head, target, w)
        agree.append((corr.argmax(-1) == tgt.argmax(-1)).float().flatten(0, 1))
        tvs.append(tv.flatten(0, 1))
        confs.append(conf.flatten(0, 1))
        ok = torch.rand(tv.flatten(0, 1).shape, generator=g) < (1 - tv.flatten(0, 1))
        accs.append(ok.int().cumprod(-1).sum(-1))
    head.train()
    tv, agree, conf, acc = (torch.cat(x) for x in (tvs, agree, confs, accs))
    survive = (1 - tv).cumprod(-1)
    return {"tv_per_position": [round(float(x), 4) for x in tv.mean(0)],
            "expected_accepted_t1": round(float(survive.sum(-1).mean()), 3),
            "greedy_agreement_per_position": [round(float(x), 4) for x in agree.mean(0)],
            "_conf": conf, "_accepted": acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(WEIGHTS_DIR))
    ap.add_argument("--minutes", type=float, default=32.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--val-windows", type=int, default=32)
    ap.add_argument("--block", type=int, default=5, help="G: drafted positions per step")
    ap.add_argument("--mlp-hidden", type=int, default=192)
    ap.add_argument("--rank", type=int, default=64, help="the Markov head's r")
    ap.add_argument("--context-heads", type=int, default=0,
                    help="context attention heads (0: none, what ships; tried: 2 heads of 24 with --block 6 "
                         "--mlp-hidden 160 --rank 40 accepted 3.16 drafts a step against 3.06 in the demo, but "
                         "decoded slower)")
    ap.add_argument("--context-head-dim", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    if out.resolve() != WEIGHTS_DIR.resolve():  # a copy of the pair to train against
        out.mkdir(parents=True, exist_ok=True)
        for f in ("default.json", "default_target.safetensors", "default_draft.safetensors"):
            shutil.copy(WEIGHTS_DIR / f, out / f)
    record = json.loads((out / "default.json").read_text())
    target_bt, _ = load_default("cpu", weights_dir=out)
    target = target_bt.model.train()  # train mode: train_hidden uses the module path; weights stay frozen
    for p in target.parameters():
        p.requires_grad_(False)
    tc = target.cfg
    cfg = DSparkConfig(dim=tc.dim, vocab_size=tc.vocab_size, hidden_layers=(2, 4), block=args.block,
                       mlp_hidden=args.mlp_hidden, rank=args.rank, context_heads=args.context_heads,
                       context_head_dim=args.context_head_dim)
    torch.manual_seed(args.seed)
    head = DSparkHead(cfg)
    n_params = sum(p.numel() for p in head.parameters())
    budget = MAX_TOTAL_BYTES - record["target"]["bytes"] - record["draft"]["bytes"]
    if 2 * n_params + 4096 > budget:
        raise SystemExit(f"the head's {n_params} params in fp16 exceed the {budget} bytes left under {MAX_TOTAL_BYTES}")

    train_data, val_data, corpus = load_corpus(args.val_every)
    val_w = val_windows(val_data, args.val_windows)
    before = evaluate(head, target, val_w)
    print(f"head: {n_params:,} params; held-out before training: expected accepted (T=1) "
          f"{before['expected_accepted_t1']}, TV {before['tv_per_position']}")
    decay = [p for p in head.parameters() if p.dim() == 2]
    rest = [p for p in head.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    t0, budget_s, step, log, warmup = time.perf_counter(), args.minutes * 60, 0, [], 30
    ema = None
    bar = tqdm(total=int(budget_s), unit="s", desc="dspark head")
    while True:
        frac = (time.perf_counter() - t0) / budget_s
        if frac >= 1:
            break
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        loss, ce, tv = loss_of(head, target, batch(train_data, args.batch_size, g), args.precision == "bf16")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step += 1
        tv_now = float(tv.detach().mean())
        ema = tv_now if ema is None else 0.98 * ema + 0.02 * tv_now
        bar.n = int(time.perf_counter() - t0)
        bar.set_postfix(step=step, ce=f"{float(ce):.3f}", tv=f"{ema:.3f}")
        bar.refresh()
        if step % 200 == 0:
            log.append({"step": step, "seconds": round(time.perf_counter() - t0, 1), "ce": round(float(ce), 4),
                        "tv_ema": round(ema, 4)})
    bar.close()
    seconds = time.perf_counter() - t0

    from safetensors.torch import load_file, save_file
    path = out / HEAD_FILE
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in head.state_dict().items()}, str(path),
              metadata={"config": json.dumps(cfg.to_dict()), "name": "dspark_ops default DSpark head"})
    path.chmod(0o644)
    shipped = DSparkHead(cfg)  # what ships: fp16 weights loaded as float32
    shipped.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    after = evaluate(shipped, target, val_w)
    conf, acc = after.pop("_conf"), after.pop("_accepted")
    before.pop("_conf"), before.pop("_accepted")
    temps = fit_sequential_temperatures(conf, acc)
    survival = torch.sigmoid(conf / temps).cumprod(-1)
    label = (torch.arange(cfg.block) < acc.unsqueeze(1)).float()
    ece_raw = expected_calibration_error(torch.sigmoid(conf).cumprod(-1).flatten(), label.flatten())
    ece_cal = expected_calibration_error(survival.flatten(), label.flatten())
    print(f"[dspark head] {step} steps in {seconds:.0f}s; held-out expected accepted (T=1) "
          f"{before['expected_accepted_t1']} -> {after['expected_accepted_t1']}, greedy agreement "
          f"{after['greedy_agreement_per_position']}; confidence ECE {ece_raw:.3f} -> {ece_cal:.3f} calibrated")
    record["dspark"] = {
        "file": HEAD_FILE, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size,
        "dtype": "float16", "config": cfg.to_dict(), "params": n_params,
        "confidence_temperatures": [round(float(t), 4) for t in temps],
        "training": {"steps": step, "seconds": round(seconds, 1), "batch_size": args.batch_size,
                     "windows_tokens": 256, "lr": args.lr, "seed": args.seed, "precision": args.precision,
                     "loss": "0.1 CE + 0.9 TV (vs the frozen target) + 1.0 confidence BCE toward 1 - TV", "log": log},
        "held_out_before": before, "held_out": after,
        "confidence_ece": {"raw": round(ece_raw, 4), "calibrated": round(ece_cal, 4)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    record["total_bytes"] = sum(record[k]["bytes"] for k in ("target", "draft", "dspark"))
    if record["total_bytes"] > MAX_TOTAL_BYTES:
        raise SystemExit(f"{record['total_bytes']} bytes together, over {MAX_TOTAL_BYTES}")
    (out / "default.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path} ({path.stat().st_size:,} bytes; {record['total_bytes']:,} shipped together) and "
          f"{out / 'default.json'}")


if __name__ == "__main__":
    main()
