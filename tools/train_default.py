"""Train the embedded default pair once (DESIGN §3, "The embedded default
model"): a target and a draft BuiltinModel on an offline corpus — the Python
standard library's own *.py sources, byte-tokenized (dspark_ops.decoding.
tokenizer) — written as fp16 safetensors under dspark_ops/decoding/weights/
with default.json (configs, sha256 checksums, training record).

    .venv/bin/python tools/train_default.py                 # ~15 + ~5 min on 2 CPU cores
    .venv/bin/python tools/train_default.py --target-minutes 1 --draft-minutes 0.5 --out /tmp/w   # a smoke run

Each model trains for a wall-clock budget: the learning rate follows a linear
warm-up and then a cosine over the budget's elapsed fraction (so the schedule
completes however busy the shared CPU is); --target-steps / --draft-steps
switch to a fixed step count instead. `make demo` never runs this.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import pathlib
import platform
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dspark_ops.decoding import tokenizer  # noqa: E402
from dspark_ops.decoding.model import BuiltinModel, ModelConfig  # noqa: E402

SEQ_LEN = 256
TARGET_CFG = ModelConfig(vocab_size=tokenizer.VOCAB_SIZE, dim=192, n_layers=5, n_heads=4, n_kv_heads=2, hidden=512,
                         max_seq_len=SEQ_LEN)
DRAFT_CFG = ModelConfig(vocab_size=tokenizer.VOCAB_SIZE, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=192,
                        max_seq_len=SEQ_LEN)
MAX_TOTAL_BYTES = 5_000_000
LN2 = math.log(2.0)


# --------------------------------------------------------------------------- corpus

def load_corpus(val_every: int):
    """Every *.py of the standard library (site-packages excluded), sorted by
    path; a file is held out for validation when the sha256 of its relative
    path is 0 mod val_every. Each file is BOS + its UTF-8 bytes + EOS."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py")
                   if not ({"site-packages", "dist-packages"} & set(f.relative_to(root).parts)) and f.is_file())
    train, val, val_names = [], [], []
    for f in files:
        rel = f.relative_to(root).as_posix()
        text = f.read_bytes().decode("utf-8", errors="replace")
        ids = tokenizer.encode(text) + [tokenizer.EOS]
        if int(hashlib.sha256(rel.encode()).hexdigest(), 16) % val_every == 0:
            val.extend(ids)
            val_names.append(rel)
        else:
            train.extend(ids)
    info = {"source": "Python standard library *.py (sysconfig stdlib, site-packages excluded)",
            "python": platform.python_version(), "files": len(files), "val_files": len(val_names),
            "train_tokens": len(train), "val_tokens": len(val), "val_file_names": val_names}
    return torch.tensor(train, dtype=torch.int16), torch.tensor(val, dtype=torch.int16), info


def batch(data: torch.Tensor, B: int, g: torch.Generator) -> torch.Tensor:
    """B random windows of SEQ_LEN + 1 tokens."""
    start = torch.randint(0, data.numel() - SEQ_LEN - 1, (B,), generator=g)
    return data[start.unsqueeze(1) + torch.arange(SEQ_LEN + 1)].long()


def val_windows(val: torch.Tensor, n: int) -> torch.Tensor:
    """n fixed, evenly spaced windows of the held-out stream."""
    step = (val.numel() - SEQ_LEN - 1) // n
    return torch.stack([val[i * step:i * step + SEQ_LEN + 1] for i in range(n)]).long()


def bits_per_byte(model: BuiltinModel, w: torch.Tensor) -> float:
    return float(F.cross_entropy(model.train_forward(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())) / LN2


@torch.no_grad()
def evaluate(model: BuiltinModel, windows: torch.Tensor, chunk: int = 16) -> float:
    model.eval()
    tot = sum(bits_per_byte(model, windows[i:i + chunk]) * len(windows[i:i + chunk])
              for i in range(0, len(windows), chunk))
    model.train()
    return tot / len(windows)


# --------------------------------------------------------------------------- cost

def cost(cfg: ModelConfig, ctx: int = SEQ_LEN) -> dict:
    """Parameters and forward FLOPs per token: 2 x every matmul weight (the
    embedding is a lookup) + attention scores and mixing (4 x ctx x dim per
    layer) at a context of ctx tokens."""
    hd = cfg.head_dim
    per_layer = cfg.dim * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.dim * cfg.hidden
    matmul = cfg.n_layers * per_layer + cfg.dim * cfg.vocab_size
    params = matmul + cfg.dim * cfg.vocab_size + (2 * cfg.n_layers + 1) * cfg.dim  # + embedding, norms
    attn = 4 * ctx * cfg.n_heads * hd * cfg.n_layers
    return {"params": params, "matmul_params": matmul, "flops_per_token": 2 * matmul + attn, "context": ctx}


# --------------------------------------------------------------------------- training

def train(name: str, cfg: ModelConfig, train_data, val_w, *, minutes: float, steps: int, batch_size: int,
          lr: float, warmup: int, seed: int, eval_every: int, bf16: bool):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = BuiltinModel(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embed")]
    other = [p for n, p in model.named_parameters() if not (p.dim() == 2 and not n.startswith("embed"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    budget = minutes * 60.0
    print(f"[{name}] {sum(p.numel() for p in model.parameters()):,} parameters; "
          + (f"{steps} steps" if steps else f"{minutes:g} min budget") + f", batch {batch_size} x {SEQ_LEN}")
    t0, step, ema = time.perf_counter(), 0, None
    bar = tqdm(total=steps if steps else int(budget), desc=name, unit="step", dynamic_ncols=True, mininterval=1.0,
               bar_format=None if steps else "{l_bar}{bar}| {n}/{total} s [{elapsed}<{remaining}{postfix}]")
    log = []
    while True:
        elapsed = time.perf_counter() - t0
        progress = step / steps if steps else elapsed / budget
        if progress >= 1.0:
            break
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for grp in opt.param_groups:
            grp["lr"] = lr * scale
        w = batch(train_data, batch_size, g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # fp32 master weights, bf16 matmuls
            logits = model.train_forward(w[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bpb = loss.item() / LN2
        ema = bpb if ema is None else 0.98 * ema + 0.02 * bpb
        if steps:
            bar.update(1)
        else:
            bar.n = min(int(time.perf_counter() - t0), int(budget))
            bar.refresh()
        bar.set_postfix(step=step, train_bpb=f"{ema:.3f}", lr=f"{lr * scale:.1e}", refresh=False)
        if step % eval_every == 0:
            v = evaluate(model, val_w)
            log.append({"step": step, "seconds": round(time.perf_counter() - t0, 1), "train_bpb": round(ema, 4),
                        "val_bpb": round(v, 4)})
            tqdm.write(f"[{name}] step {step:5d}  {time.perf_counter() - t0:6.0f}s  train {ema:.3f}  "
                       f"val {v:.3f} bits/byte")
    bar.close()
    seconds = time.perf_counter() - t0
    return model, {"steps": step, "seconds": round(seconds, 1), "tokens_seen": step * batch_size * SEQ_LEN,
                   "batch_size": batch_size, "seq_len": SEQ_LEN, "lr": lr, "warmup_steps": warmup, "seed": seed,
                   "precision": "bf16 autocast, fp32 weights" if bf16 else "fp32",
                   "final_train_bpb_ema": round(ema, 4), "log": log}


def save(model: BuiltinModel, path: pathlib.Path, meta: dict) -> str:
    from safetensors.torch import save_file
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(model.cfg.to_dict()), **meta})
    path.chmod(0o644)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reload(path: pathlib.Path, cfg: ModelConfig) -> BuiltinModel:
    from safetensors.torch import load_file
    m = BuiltinModel(cfg)
    m.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "dspark_ops" / "decoding" / "weights"))
    ap.add_argument("--target-minutes", type=float, default=15.0)
    ap.add_argument("--draft-minutes", type=float, default=5.0)
    ap.add_argument("--target-steps", type=int, default=0, help="a fixed step count instead of the time budget")
    ap.add_argument("--draft-steps", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (on a busy shared CPU, 1 is faster than 2: the OpenMP barrier stalls)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="training matmuls (bf16 autocast: ~1.4x faster on CPUs with AVX512-BF16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-every", type=int, default=50, help="hold out ~1/N of the files")
    ap.add_argument("--val-windows", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t_all = time.perf_counter()
    train_data, val_data, corpus = load_corpus(args.val_every)
    val_w = val_windows(val_data, args.val_windows)
    print(f"corpus: {corpus['files']} files of Python {corpus['python']}'s standard library, "
          f"{corpus['train_tokens'] / 1e6:.1f}M train / {corpus['val_tokens'] / 1e6:.2f}M val bytes "
          f"({corpus['val_files']} held-out files)")

    ct, cd = cost(TARGET_CFG), cost(DRAFT_CFG)
    ratio = ct["flops_per_token"] / cd["flops_per_token"]
    print(f"cost per token at context {SEQ_LEN}: target {ct['params']:,} params / {ct['flops_per_token'] / 1e6:.2f} "
          f"MFLOP, draft {cd['params']:,} params / {cd['flops_per_token'] / 1e6:.3f} MFLOP -> ratio {ratio:.1f}x "
          f"(params {ct['params'] / cd['params']:.1f}x)")
    if ratio < 8:
        raise SystemExit(f"the target must cost >= 8x the draft per token, got {ratio:.1f}x")
    fp16_bytes = 2 * (ct["params"] + cd["params"])
    if fp16_bytes > MAX_TOTAL_BYTES:
        raise SystemExit(f"the pair would take {fp16_bytes} bytes in fp16, over {MAX_TOTAL_BYTES}")

    models = {}
    for name, cfg, minutes, steps, bs, lr, seed in (
            ("target", TARGET_CFG, args.target_minutes, args.target_steps, 16, 2e-3, args.seed),
            ("draft", DRAFT_CFG, args.draft_minutes, args.draft_steps, 32, 3e-3, args.seed + 100)):
        model, rec = train(name, cfg, train_data, val_w, minutes=minutes, steps=steps, batch_size=bs, lr=lr,
                           warmup=50, seed=seed, eval_every=200 if name == "target" else 500,
                           bf16=args.precision == "bf16")
        path = out / f"default_{name}.safetensors"
        sha = save(model, path, {"name": f"dspark_ops default {name}"})
        fp16 = reload(path, cfg)  # the losses of what ships: fp16 weights loaded as float32
        rec["final_train_bpb"] = round(evaluate(fp16, batch(train_data, args.val_windows,
                                                            torch.Generator().manual_seed(12345))), 4)
        rec["final_val_bpb"] = round(evaluate(fp16, val_w), 4)
        print(f"[{name}] {rec['steps']} steps, {rec['tokens_seen'] / 1e6:.1f}M tokens in {rec['seconds']:.0f}s: "
              f"final train {rec['final_train_bpb']:.3f}, val {rec['final_val_bpb']:.3f} bits/byte (fp16 weights); "
              f"{path.stat().st_size:,} bytes")
        models[name] = {"file": path.name, "sha256": sha, "bytes": path.stat().st_size, "dtype": "float16",
                        "config": cfg.to_dict(), "cost": cost(cfg), "training": rec}

    total = sum(m["bytes"] for m in models.values())
    record = {
        "description": "dspark_ops embedded default pair: a byte-level Llama-style target and draft trained by "
                       "tools/train_default.py (DESIGN §3)",
        "tokenizer": {"kind": "bytes", "vocab_size": tokenizer.VOCAB_SIZE, "bos": tokenizer.BOS,
                      "eos": tokenizer.EOS, "pad": tokenizer.PAD},
        "target": models["target"], "draft": models["draft"],
        "cost_ratio_flops_per_token": round(ratio, 2),
        "cost_ratio_params": round(ct["params"] / cd["params"], 2),
        "total_bytes": total,
        "corpus": corpus,
        "optimizer": "AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up + cosine to 10%, "
                     "grad clip 1.0; loss in bits per byte (cross entropy / ln 2 per byte token)",
        "training_seconds_total": round(time.perf_counter() - t_all, 1),
        "threads": args.threads, "torch": torch.__version__, "platform": platform.platform(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / "default.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}/default_target.safetensors, default_draft.safetensors ({total:,} bytes together) and "
          f"default.json in {record['training_seconds_total']:.0f}s")


if __name__ == "__main__":
    main()
