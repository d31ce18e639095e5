"""DSpark's block drafter (RESEARCH.md; DESIGN §3) for a BuiltinModel target.

One drafting step is one small forward plus one op:

1. **Parallel backbone.** The target's hidden states after a few layers
   (the loop hands them over through Drafter.observe: the prefill's rows
   and each verify pass's processed rows) are fused (linear + RMSNorm) into
   context features. The last processed token's, the anchor's embedding
   (the target's, frozen) and a learned embedding per block position are
   added; optional context attention over every processed token's features
   (block position k attends to keys j and reads value j + k - 1, from a
   key/value cache the drafter grows) and one residual SwiGLU MLP run over
   the G positions at once. The target's own final norm and LM head
   (frozen, shared) turn them into base logits U_1..U_G [R, G, V]. (DFlash's
   backbone adds the features to the keys and values of several draft
   layers; this is a one-layer, cheaper form of it.)
2. **Markov head.** ``markov_draft`` samples the block left to right from
   ``U_k + w1[x_{k-1}] @ w2`` (x_0 = the anchor), purpose DRAFT, slot k, and
   writes exactly the logits it sampled from, which ``verify_chunk`` reads
   in place: lossless.
3. **Confidence head** (optional scheduling). c_k = sigmoid(w . [h_k;
   w1[x_{k-1}]] + b), trained toward 1 - TV(p_draft, p_target); with
   ``schedule=`` the drafter cuts each request's block with
   ``schedule_verify`` (lossless modes only) before the target pass.

The trainable weights (DSparkHead) are ~0.2 M parameters for the embedded
default target; tools/train_dspark.py trains them on the frozen target."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._host import host_to_device
from ..markov import markov_draft
from ..schedule import measure_sps, schedule_verify
from .drafters import Draft, Drafter
from .model import BuiltinModel, _normalize, _packed_linear, _packed_once, _use_packed, _version


@dataclass
class DSparkConfig:
    """Shape of a DSparkHead for a target of width `dim` and `vocab_size`."""

    dim: int
    vocab_size: int
    hidden_layers: Tuple[int, ...] = (2, 4)  # target layers whose outputs are the context features
    block: int = 5  # G: positions drafted per step
    mlp_hidden: int = 192
    rank: int = 64  # r of the Markov head's w1 [V, r] and w2 [r, V]
    norm_eps: float = 1e-5
    # Context attention (0: none): the block attends over every processed token's features; block position k
    # reads the value k - 1 tokens after the key it matched (a copy of what followed an earlier occurrence).
    context_heads: int = 0
    context_head_dim: int = 32

    def __post_init__(self):
        self.hidden_layers = tuple(int(x) for x in self.hidden_layers)
        if (not self.hidden_layers or len(set(self.hidden_layers)) != len(self.hidden_layers) or self.block < 1
                or self.rank < 1 or self.mlp_hidden < 1 or self.context_heads < 0 or self.context_head_dim < 1):
            raise ValueError(f"DSparkConfig: need distinct hidden_layers, block, rank, mlp_hidden and "
                             f"context_head_dim >= 1 and context_heads >= 0, got {self}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden_layers"] = list(self.hidden_layers)
        return d


class FusedWeights(NamedTuple):
    """DSparkHead's inference weights (DSparkHead.fused): in the target's
    dtype but w1, w2 (float32, for markov_draft); ctx_* None without context
    attention."""

    fuse: torch.Tensor  # [dim, k dim]
    fuse_norm: torch.Tensor  # [dim]: fuse_norm's weight
    pos: torch.Tensor  # [G, dim]
    w13: torch.Tensor  # [2 mlp_hidden, dim]: w_gate and w_up, mlp_norm's weight folded in
    w_down_t: torch.Tensor  # [mlp_hidden, dim]
    ctx_q: Optional[torch.Tensor]  # [heads head_dim, dim], attn_norm's weight folded in
    ctx_k: Optional[torch.Tensor]
    ctx_v: Optional[torch.Tensor]
    ctx_o_t: Optional[torch.Tensor]  # [heads head_dim, dim]
    w1: torch.Tensor  # [V, r] float32
    w2: torch.Tensor  # [r, V] float32


class DSparkHead(nn.Module):
    """DSpark's trainable drafting weights. The embedding, the final norm
    and the LM head are the target's and are passed in, never stored."""

    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.cfg = cfg
        d, k = cfg.dim, len(cfg.hidden_layers)
        self.fuse = nn.Linear(k * d, d, bias=False)
        self.fuse_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.pos = nn.Parameter(torch.zeros(cfg.block, d))
        self.mlp_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.w_gate = nn.Linear(d, cfg.mlp_hidden, bias=False)
        self.w_up = nn.Linear(d, cfg.mlp_hidden, bias=False)
        self.w_down = nn.Linear(cfg.mlp_hidden, d, bias=False)
        self.markov_w1 = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.rank))  # zero: training starts at U_k
        self.markov_w2 = nn.Parameter(torch.randn(cfg.rank, cfg.vocab_size) * 0.02)
        self.conf = nn.Linear(d + cfg.rank, 1)
        lins = [self.fuse, self.w_gate, self.w_up, self.w_down]
        if cfg.context_heads:
            inner = cfg.context_heads * cfg.context_head_dim
            self.attn_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
            self.ctx_q, self.ctx_k, self.ctx_v = (nn.Linear(d, inner, bias=False) for _ in range(3))
            self.ctx_o = nn.Linear(inner, d, bias=False)
            lins += [self.ctx_q, self.ctx_k, self.ctx_v, self.ctx_o]
        for lin in lins:
            nn.init.normal_(lin.weight, std=0.02)
        # load_state_dict(..., assign=True) puts new Parameter objects in place: forget the cached ones
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_inference_cache())

    def clear_inference_cache(self) -> None:
        """Drop the inference path's fused (and packed) weights and the
        parameters they were built from (rebuilt on the next use): after
        replacing a Parameter object (``load_state_dict(assign=True)`` does
        it by itself) or writing weights behind their version counters."""
        self.__dict__.pop("_params", None)
        self.__dict__.pop("_fused", None)

    def train(self, mode: bool = True) -> "DSparkHead":
        self.clear_inference_cache()  # a training phase may write weights behind the version counters
        return super().train(mode)

    def context(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., k, dim] (the target's hidden states of processed
        tokens) -> the fused context features [..., dim]."""
        return self.fuse_norm(self.fuse(features.flatten(-2)))

    def block_hidden(self, features: torch.Tensor, anchor: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """Training form. features [B, L, k, dim]: the target's hidden states
        of a window of L processed tokens; anchor [B, T] (T <= L): block t
        drafts after tokens 0..t, its anchor the token at t + 1; embed
        [V, dim] (the target's) -> the blocks' hidden states [B, T, G, dim]."""
        c = self.context(features)  # [B, L, dim]
        T = anchor.shape[1]
        x = (c[:, :T] + F.embedding(anchor.long(), embed)).unsqueeze(2) + self.pos
        if self.cfg.context_heads:
            x = x + self._attend_window(x, c)
        y = self.mlp_norm(x)
        return x + self.w_down(F.silu(self.w_gate(y)) * self.w_up(y))

    def _attend_window(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Context attention, training form: block t, position g + 1 attends
        to keys j with j + g <= t and reads value j + g (plus a zero sink)."""
        B, T, G, _ = x.shape
        L, H, hd = c.shape[1], self.cfg.context_heads, self.cfg.context_head_dim
        q = self.ctx_q(self.attn_norm(x)).view(B, T, G, H, hd) * hd ** -0.5
        k, v = self.ctx_k(c).view(B, L, H, hd), self.ctx_v(c).view(B, L, H, hd)
        t, j = torch.arange(T, device=x.device).unsqueeze(1), torch.arange(L, device=x.device)
        outs = []
        for g in range(G):
            s = torch.einsum("bthd,bjhd->bhtj", q[:, :, g], k).masked_fill(j + g > t, float("-inf"))
            p = torch.softmax(torch.cat([s, s.new_zeros(B, H, T, 1)], -1), -1)[..., :L]
            outs.append(torch.einsum("bhtj,bjhd->bthd", p, F.pad(v[:, g:], (0, 0, 0, 0, 0, g))))
        return self.ctx_o(torch.stack(outs, 2).flatten(-2))

    def fused(self, dtype: torch.dtype) -> "FusedWeights":
        """The inference path's weights in `dtype` (the target's), with the
        RMSNorm weights folded into the matrices after them (FusedWeights).
        Cached while every parameter keeps its storage and version (like
        BuiltinModel's fused weights)."""
        ps = self.__dict__.get("_params")
        if ps is None:  # the Parameter objects, until clear_inference_cache; .to() and updates change their data
            ps = self.__dict__["_params"] = tuple(self.parameters())
        key = (dtype,) + tuple(p.data_ptr() for p in ps) + tuple(_version(p) for p in ps)
        cached = getattr(self, "_fused", None)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                g = self.mlp_norm.weight
                w13 = torch.cat([self.w_gate.weight * g, self.w_up.weight * g])
                attn = (self.ctx_q.weight * self.attn_norm.weight, self.ctx_k.weight, self.ctx_v.weight,
                        self.ctx_o.weight.t()) if self.cfg.context_heads else (None,) * 4
                built = FusedWeights(*(None if t is None else t.to(dtype).contiguous() for t in (
                    self.fuse.weight, self.fuse_norm.weight, self.pos, w13, self.w_down.weight.t(), *attn)),
                    w1=self.markov_w1.float().contiguous(), w2=self.markov_w2.float().contiguous())
                # the detached parameters keep the storages the key names alive (no address is reused meanwhile)
                cached = self._fused = (key, built, tuple(p.detach() for p in ps), [None])  # [packed()]
        return cached[1]

    def packed(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fused(dtype)'s fuse, w13 and w_down packed for packed_linear (the
        CPU float32 inference path)."""
        fw = self.fused(dtype)
        return _packed_once(self._fused[3], fw.fuse, fw.w13, fw.w_down_t.t())  # kept in fused()'s cache entry

    def infer_context(self, features: torch.Tensor) -> torch.Tensor:
        """context() for inference: features [R, w, k, dim] in the target's
        dtype -> [R, w, dim], on the fused weights."""
        fw = self.fused(features.dtype)
        R, w = features.shape[:2]
        flat = features.reshape(R * w, -1)
        c = _packed_linear(flat, self.packed(flat.dtype)[0], fw.fuse.shape[0]) if _use_packed(flat) else \
            F.linear(flat, fw.fuse)
        c = _normalize(c, self.cfg.norm_eps) * fw.fuse_norm
        return c.view(R, w, -1)

    def infer_block(self, c_last: torch.Tensor, anchor: torch.Tensor, embed: torch.Tensor, n: int,
                    kv: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """block_hidden's first n positions for inference, in the target's
        dtype, on the fused weights with RMSNorm as BuiltinModel's forward
        computes it. c_last [R, dim]: the last processed token's context
        features; kv (with context attention): keys and values of every
        processed token [R, S, heads, head_dim] and how many there are [R].
        Returns [R, n, dim]."""
        fw = self.fused(c_last.dtype)
        R = c_last.shape[0]
        x = (c_last + F.embedding(anchor.long(), embed)).unsqueeze(1) + fw.pos[:n]  # [R, n, dim]
        if self.cfg.context_heads:
            x = x + self._attend_cache(x, kv, fw)
        x = x.flatten(0, 1)
        if _use_packed(x):
            _, p13, pdown = self.packed(x.dtype)
            gate, up = _packed_linear(_normalize(x, self.cfg.norm_eps), p13, fw.w13.shape[0]).chunk(2, -1)
            x = _packed_linear(F.silu(gate).mul_(up), pdown, fw.w_down_t.shape[1], x)  # x starts the sums
        else:
            gate, up = F.linear(_normalize(x, self.cfg.norm_eps), fw.w13).chunk(2, -1)
            x = torch.addmm(x, F.silu(gate) * up, fw.w_down_t)
        return x.view(R, n, -1)

    def _attend_cache(self, x: torch.Tensor, kv, fw: "FusedWeights") -> torch.Tensor:
        """Context attention, inference form (what _attend_window computes
        for t = lengths - 1), vectorised over the block's positions:
        position g + 1's weights over keys j, moved to value j + g."""
        keys, values, lengths = kv
        R, n, d = x.shape
        S, H, hd = keys.shape[1], self.cfg.context_heads, self.cfg.context_head_dim
        q = F.linear(_normalize(x.reshape(R * n, d), self.cfg.norm_eps), fw.ctx_q).view(R, n, H, hd) * hd ** -0.5
        s = torch.einsum("rghd,rjhd->rghj", q, keys)  # [R, n, H, S]
        g = torch.arange(n, device=x.device)
        valid = (torch.arange(S, device=x.device) + g.unsqueeze(1)) < lengths.view(R, 1, 1)  # [R, n, S]
        s = s.masked_fill(~valid.unsqueeze(2), float("-inf"))
        p = torch.softmax(torch.cat([s, s.new_zeros(R, n, H, 1)], -1), -1)[..., :S]
        # value index j' = j + g: p_shift[..., j'] = p[..., j' - g] (0 for j' < g)
        idx = (torch.arange(S, device=x.device) - g.unsqueeze(1) + n).view(1, n, 1, S).expand(R, n, H, S)
        p_shift = F.pad(p, (n, 0)).gather(-1, idx)
        out = torch.einsum("rghj,rjhd->rghd", p_shift, values).reshape(R * n, H * hd)
        return (out @ fw.ctx_o_t).view(R, n, d)

    def confidence_logits(self, block: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """block [..., G, dim], prev [..., G] (x_{k-1}: the anchor, then the
        drafts) -> confidence logits [..., G] (sigmoid: P(x_k survives | its
        prefix survived))."""
        w1 = F.embedding(prev.long().clamp(min=0), self.markov_w1)
        return self.conf(torch.cat([block, w1.to(block.dtype)], -1)).squeeze(-1)


class DSparkDrafter(Drafter):
    """DSpark's block drafter on a BuiltinTarget (or any target whose
    `.model` is a BuiltinModel): one head forward and one markov_draft per
    step. Draft j is sampled from the corrected logits with the request's
    temperature, top-k and top-p (greedy at temperature 0: verified as a
    point mass).

    schedule: how many of each request's drafts the target verifies —
    None: all n; or a lossless schedule_verify mode on the head's
    calibrated confidences (cut positions are -1, which verify_chunk
    answers from the target):
      * "budget" (needs budget: drafted tokens admitted across the batch,
        the highest survivals first): the pass's width is min(n, budget),
        known before drafting — no host read (DESIGN §3's orchestrator mode);
      * "early_stop" (needs sps_table [B_max + 1] covering token batches up
        to R (n + 1): DSpark's Algorithm 1) and "threshold" (needs
        threshold): each request's kept length is read on the host (one
        read per step, Draft.lengths) and the target pass is ragged: each
        request's root and its kept drafts, the token batch the SPS table
        priced.
    Draft.confidence holds the confidences of the verified positions when
    scheduling or with with_confidence=True (else None: the confidence head
    is not run). temperatures [G]: the per-position calibration (confidence
    = sigmoid(logit / T_k); fit_sequential_temperatures). Without a
    schedule (or with "budget") no step reads the host. The head is moved
    to the target's device and put in eval mode (as BuiltinTarget does
    with its model)."""

    def __init__(self, target, head: DSparkHead, *, num_draft: Optional[int] = None, schedule: Optional[str] = None,
                 sps_table: Optional[torch.Tensor] = None, threshold: Optional[float] = None,
                 budget: Optional[int] = None, temperatures: Optional[torch.Tensor] = None,
                 with_confidence: bool = False):
        model = getattr(target, "model", target)
        if not isinstance(model, BuiltinModel):
            raise ValueError(f"DSparkDrafter: target must be a BuiltinTarget or a BuiltinModel (the head shares its "
                             f"embedding, final norm and LM head, and reads its hidden states), got "
                             f"{type(target).__name__}; a Hugging Face Llama converts with "
                             f"BuiltinTarget(builtin_from_hf(model))")
        cfg = head.cfg
        if (model.cfg.dim, model.cfg.vocab_size) != (cfg.dim, cfg.vocab_size):
            raise ValueError(f"DSparkDrafter: the head is for dim {cfg.dim} and vocab {cfg.vocab_size}, the target "
                             f"has {model.cfg.dim} and {model.cfg.vocab_size}")
        if max(cfg.hidden_layers) >= model.cfg.n_layers or min(cfg.hidden_layers) < 0:
            raise ValueError(f"DSparkDrafter: hidden_layers {cfg.hidden_layers} outside the target's "
                             f"{model.cfg.n_layers} layers")
        n = cfg.block if num_draft is None else int(num_draft)
        if not 1 <= n <= cfg.block:
            raise ValueError(f"DSparkDrafter: num_draft must be in [1, {cfg.block}] (the head's block), got {n}")
        if schedule not in (None, "budget", "early_stop", "threshold"):
            raise ValueError(f"DSparkDrafter: schedule must be None, 'budget', 'early_stop' or 'threshold' (the "
                             f"lossless modes), got {schedule!r}")
        if schedule == "early_stop" and sps_table is None:
            raise ValueError("DSparkDrafter: schedule='early_stop' needs sps_table (dspark_ops.measure_sps, "
                             "target_sps_table)")
        if schedule == "threshold" and threshold is None:
            raise ValueError("DSparkDrafter: schedule='threshold' needs threshold")
        if schedule == "budget" and (budget is None or int(budget) < 0):
            raise ValueError(f"DSparkDrafter: schedule='budget' needs budget >= 0 (drafted tokens a step), got "
                             f"{budget}")
        if temperatures is not None and temperatures.numel() < n:
            raise ValueError(f"DSparkDrafter: temperatures needs {n} entries (one per drafted position), got "
                             f"{temperatures.numel()}")
        self.model, self.head, self.num_draft = model, head, n
        self.hidden_layers = cfg.hidden_layers
        self.schedule, self.threshold, self.with_confidence = schedule, threshold, with_confidence
        self.budget = None if budget is None else int(budget)
        self._sps = None if sps_table is None else sps_table.detach().to("cpu", torch.float64).reshape(-1)
        self.temperatures = (None if temperatures is None
                             else temperatures.detach().to("cpu", torch.float32).reshape(-1)[:n])
        self.c_last: Optional[torch.Tensor] = None
        head.to(device=model.embed.weight.device).eval()

    @property
    def observe_last_only(self) -> bool:
        """Without context attention only the last processed row counts (with
        it, every row's key and value does: not a setting)."""
        return not self.head.cfg.context_heads

    def start(self, num_requests, max_len, device) -> None:
        R, n, cfg = num_requests, self.num_draft, self.head.cfg
        if self.schedule == "early_stop" and self._sps.numel() < R * (n + 1) + 1:
            raise ValueError(f"DSparkDrafter: the SPS table covers token batches up to {self._sps.numel() - 1}; "
                             f"{R} requests with {n} drafts need up to {R * (n + 1)} (beyond it SPS is 0 and "
                             f"nothing would be drafted): measure it there (target_sps_table(..., requests={R}))")
        self.c_last = None  # until observe(): each request's last processed token's context features
        # Device copies made once per call (pinned and asynchronous: no synchronisation); none in a step.
        self.temps_dev = None if self.temperatures is None else host_to_device(self.temperatures, device)
        self.sps_dev = (host_to_device(self._sps, device) if self._sps is not None
                        else torch.ones(R * (n + 1) + 1, dtype=torch.float64, device=device))
        self.budget_dev = None if self.budget is None else torch.full((1,), self.budget, dtype=torch.int64,
                                                                      device=device)
        if cfg.context_heads:  # keys and values of every processed token (room for a step's rows past max_len)
            shape = (R, max_len + n + 2, cfg.context_heads, cfg.context_head_dim)
            dt = self.model.embed.weight.dtype
            self.keys = torch.zeros(shape, dtype=dt, device=device)
            self.values = torch.zeros(shape, dtype=dt, device=device)
            self.lengths = torch.zeros(R, dtype=torch.int64, device=device)

    @torch.inference_mode()
    def observe(self, rows: Optional[torch.Tensor], processed: Optional[torch.Tensor]) -> None:
        """Keeps the last processed token's context features per request
        and, with context attention, appends the processed rows' keys and
        values (all w rows are written; the lengths advance by processed)."""
        if rows is None:
            return
        R, w = rows.shape[:2]
        r = torch.arange(R, device=rows.device)
        fresh = (processed > 0).unsqueeze(1)
        attend = self.head.cfg.context_heads > 0
        if attend:
            c = self.head.infer_context(rows)  # [R, w, dim]: every row has a key and a value
            last = c[r, (processed.long() - 1).clamp(min=0)]
        else:  # only the last processed row matters
            last = self.head.infer_context(rows[r, (processed.long() - 1).clamp(min=0)].unsqueeze(1))[:, 0]
        self.c_last = torch.where(fresh, last, self.c_last if self.c_last is not None else torch.zeros_like(last))
        if attend:
            fw = self.head.fused(c.dtype)
            H, hd = self.keys.shape[2:]
            at = (self.lengths.unsqueeze(1) + torch.arange(w, device=c.device)).clamp(max=self.keys.shape[1] - 1)
            self.keys[r.unsqueeze(1), at] = F.linear(c, fw.ctx_k).view(R, w, H, hd)
            self.values[r.unsqueeze(1), at] = F.linear(c, fw.ctx_v).view(R, w, H, hd)
            self.lengths += processed.long()

    @torch.inference_mode()
    def propose(self, seqs, state, sampling) -> Draft:
        R, n, dev = len(seqs), self.num_draft, state.last_token.device
        embed = self.model.embed.weight
        if self.c_last is None:  # no context yet (every prompt was one token): zero features
            self.c_last = torch.zeros(R, embed.shape[1], dtype=embed.dtype, device=dev)
        head = self.head
        kv = (self.keys, self.values, self.lengths) if head.cfg.context_heads else None
        block = head.infer_block(self.c_last, state.last_token, embed, n, kv)  # [R, n, dim]
        x = _normalize(block.flatten(0, 1), head.cfg.norm_eps)
        base = self.model.head_logits(x, _use_packed(x))
        base = base.view(R, n, -1)  # [R, n, V]: U_1..U_n
        fw = head.fused(embed.dtype)
        if base.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            base = base.float()  # e.g. float64 test models: the op takes fp32/fp16/bf16
        filters = dict(top_k=sampling.top_k, top_p=sampling.top_p) if sampling.filtering() else {}
        res = markov_draft(base, state.last_token, fw.w1, fw.w2, temperature=sampling.temperature, seed=sampling.seed,
                           position=state.position, **filters)
        tokens, draft_logits = res.tokens, res.draft_logits
        draft_t = (sampling.temperature > 0).to(torch.float32)  # markov_draft wrote the processed logits (T = 1)
        if self.schedule is None and not self.with_confidence:
            return Draft(tokens, draft_logits, draft_t)
        prev = torch.cat([state.last_token.unsqueeze(1).to(torch.int32), tokens[:, :-1]], 1)
        conf_logits = head.confidence_logits(block.to(next(head.parameters()).dtype), prev).float()
        conf = torch.sigmoid(conf_logits / self.temps_dev if self.temps_dev is not None else conf_logits)
        if self.schedule is None:
            return Draft(tokens, draft_logits, draft_t, confidence=conf)
        counts = torch.where(state.finished, 0, n).to(torch.int32)  # finished requests take no budget
        length = schedule_verify(conf, counts, self.sps_dev, mode=self.schedule, threshold=self.threshold,
                                 budget=self.budget_dev)
        # The pass: for a budget min(n, budget) wide, known in advance (no host read); else each request's kept
        # block, read on the host (the step's one read): a ragged pass of exactly the admitted tokens, the batch
        # the SPS table priced.
        lengths = None if self.schedule == "budget" else length.tolist()
        width = min(n, self.budget) if lengths is None else max(lengths)
        keep = torch.arange(n, device=dev) < length.unsqueeze(1)
        tokens = torch.where(keep, tokens, -1)[:, :width].contiguous()
        return Draft(tokens, draft_logits[:, :width].contiguous(), draft_t, confidence=conf[:, :width],
                     width=width if width < n else None, lengths=lengths)


def target_sps_table(target, max_tokens: int, *, requests: int = 1, context: int = 128, overhead_s: float = 0.0,
                     warmup: int = 3, iters: int = 9, fit: str = "convex") -> torch.Tensor:
    """The SPS table [max_tokens + 1] (float64) schedule_verify's early_stop
    needs: steps per second of the target's forward of B = requests ..
    max_tokens new tokens, spread evenly over `requests` requests with
    `context` cached tokens each, timed by measure_sps (CUDA events on a
    GPU, wall clock on the CPU; medians; flat below B = requests), with
    `overhead_s` added to each step's time (what a step spends outside the
    target's forward: drafting, verification, bookkeeping — on a small
    model not negligible, and it makes a longer pass relatively cheaper).
    R requests with n drafts need max_tokens >= R (n + 1). fit: measure_sps's
    (default "convex": the fit under which early_stop's first stop is its
    best admission)."""
    if requests < 1 or max_tokens < requests:
        raise ValueError(f"target_sps_table: need 1 <= requests <= max_tokens, got {requests} and {max_tokens}")
    dev = target.device
    per = -(-max_tokens // requests)
    cache = target.new_cache(requests, context + per)
    ids = torch.zeros(max_tokens, dtype=torch.int64, device=dev)

    @torch.inference_mode()
    def step(B: int) -> None:
        counts = [B // requests + (1 if r < B % requests else 0) for r in range(requests)]
        cu = torch.tensor([0] + counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        pos = torch.cat([torch.arange(context, context + c) for c in counts]).to(dev)
        target.lengths(cache).fill_(context)
        target.forward(ids[:B], pos, cu, cache)

    sps = measure_sps(step, range(requests, max_tokens + 1), warmup=warmup, iters=iters, device=dev, fit=fit)
    return 1.0 / (1.0 / sps + overhead_s)


def step_sps_table(target, drafter: Drafter, prompts: Sequence[Sequence[int]], *, max_new: int = 48,
                   repeats: int = 3) -> Tuple[torch.Tensor, float]:
    """early_stop's cost model for these prompts decoded as one batch of
    R = len(prompts) requests, measured now: (target_sps_table up to
    R (n + 1) tokens (n = drafter.num_draft) with the step's overhead
    added, that overhead in seconds). The overhead is what a step spends
    outside the target's forward: the best of `repeats` unscheduled runs of
    `drafter` (max_new new tokens each), its mean step time after the
    prefill minus the full pass's forward."""
    from .loop import SpeculativeDecoder  # (the loop does not import this module back)
    R, top = len(prompts), len(prompts) * (drafter.num_draft + 1)
    bare = target_sps_table(target, top, requests=R)
    dec = SpeculativeDecoder(target, drafter)
    dec.generate(prompts, 16)
    st = min((dec.generate(prompts, max_new).stats for _ in range(repeats)), key=lambda s: s["seconds"])
    overhead = max((st["seconds"] - st["prefill_seconds"]) / st["steps"] - 1.0 / float(bare[top]), 0.0)
    return target_sps_table(target, top, requests=R, overhead_s=overhead), overhead


__all__: Sequence[str] = ("DSparkConfig", "DSparkDrafter", "DSparkHead", "step_sps_table", "target_sps_table")
