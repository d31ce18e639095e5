"""The built-in target / draft model: a compact Llama-style transformer
(RMSNorm, RoPE, grouped-query attention, SwiGLU) in plain PyTorch, batched
and ragged, with a KV cache in the [R, S, H, D] layout kv_compact handles."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kv import KVLayout, kv_compact


@dataclass
class ModelConfig:
    """Shape of a BuiltinModel."""

    vocab_size: int = 259  # 256 bytes + BOS, EOS, PAD (tokenizer.py)
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden: int = 688  # SwiGLU width
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Per-layer K and V, each [R, S, n_kv_heads, head_dim], and each
    request's cached length (int32 [R], on the device). Entry s of request r
    is the token at absolute position s."""

    def __init__(self, cfg: ModelConfig, num_requests: int, max_len: int, *, dtype: torch.dtype,
                 device: torch.device):
        shape = (num_requests, max_len, cfg.n_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.lengths = torch.zeros(num_requests, dtype=torch.int32, device=device)
        self.max_len = max_len
        self.layout = KVLayout(self.k + self.v)

    def rollback(self, base_len: torch.Tensor, num_appended: torch.Tensor, keep_index: torch.Tensor,
                 num_keep: torch.Tensor) -> None:
        """Keep `num_keep[r]` of the entries appended after `base_len[r]` (in
        place, every layer in one kv_compact launch); lengths = base + kept."""
        new_len, _ = kv_compact(self.layout, base_len, num_appended, keep_index, num_keep)
        self.lengths.copy_(new_len)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [T, 1, head_dim] of the rotary embedding at positions [T],
    computed in float64 once per forward and shared by every layer."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim))
    ang = positions.to(torch.float64).unsqueeze(-1) * inv  # [T, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype).unsqueeze(-2)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype).unsqueeze(-2)
    return cos, sin


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float, tables=None) -> torch.Tensor:
    """Rotary embedding of x [..., T, H, D] at positions [T] (rotate-half form)."""
    D = x.shape[-1]
    cos, sin = tables if tables is not None else rope_tables(positions, D, theta, x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class _Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.w1 = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.w2 = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, layer: int, cache: KVCache, owner: torch.Tensor,
                slot: torch.Tensor, pad_index: torch.Tensor, pad_valid: torch.Tensor, mask: torch.Tensor,
                tables: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cfg, hd = self.cfg, self.cfg.head_dim
        T = h.shape[0]
        x = self.attn_norm(h)
        q = _rope(self.wq(x).view(T, cfg.n_heads, hd), positions, cfg.rope_theta, tables)
        k = _rope(self.wk(x).view(T, cfg.n_kv_heads, hd), positions, cfg.rope_theta, tables)
        v = self.wv(x).view(T, cfg.n_kv_heads, hd)
        cache.k[layer][owner, slot] = k.to(cache.k[layer].dtype)
        cache.v[layer][owner, slot] = v.to(cache.v[layer].dtype)
        # Queries padded per request [R, Tq, H, D]; keys the request's whole cache.
        R, Tq = pad_index.shape
        qp = q[pad_index.clamp(min=0)].masked_fill(~pad_valid[..., None, None], 0.0)
        S = mask.shape[-1]
        kk = cache.k[layer][:, :S].to(q.dtype)
        vv = cache.v[layer][:, :S].to(q.dtype)
        out = F.scaled_dot_product_attention(qp.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                             attn_mask=mask.unsqueeze(1), enable_gqa=True)  # [R, H, Tq, D]
        out = out.transpose(1, 2)[pad_valid]  # [T, H, D] in ragged order
        h = h + self.wo(out.reshape(T, cfg.n_heads * hd))
        x = self.mlp_norm(h)
        return h + self.w2(F.silu(self.w1(x)) * self.w3(x))


class BuiltinModel(nn.Module):
    """A Llama-style causal LM whose forward takes a ragged batch of new
    tokens and appends their K/V to a KVCache (DESIGN §3 target protocol)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        for blk in self.blocks:  # scaled residual projections
            nn.init.normal_(blk.wo.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))
            nn.init.normal_(blk.w2.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def new_cache(self, num_requests: int, max_len: int) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.cfg, num_requests, max_len, dtype=p.dtype, device=p.device)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cu_tokens: torch.Tensor, cache: KVCache, *,
                hidden_layers: Sequence[int] = ()) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """ids [T] int64, positions [T] int64, cu_tokens [R+1] int32: request
        r's new tokens are ids[cu[r]:cu[r+1]], appended after its cached
        length. Returns (logits [T, V], hidden [T, len(hidden_layers), dim] or
        None). Reads cu_tokens on the host (one sync on a GPU)."""
        cu = cu_tokens.tolist()
        R, T, dev = len(cu) - 1, ids.shape[0], ids.device
        counts = [cu[r + 1] - cu[r] for r in range(R)]
        owner = torch.repeat_interleave(torch.arange(R, device=dev), torch.tensor(counts, device=dev))
        local = torch.arange(T, device=dev) - torch.tensor(cu[:-1], device=dev, dtype=torch.int64)[owner]
        base = cache.lengths.to(torch.int64)
        slot = base[owner] + local
        Tq = max(counts) if counts else 0
        col = torch.arange(Tq, device=dev)
        pad_valid = col.unsqueeze(0) < torch.tensor(counts, device=dev).unsqueeze(1)  # [R, Tq]
        pad_index = torch.where(pad_valid, torch.tensor(cu[:-1], device=dev).unsqueeze(1) + col, -1)
        S = min(cache.max_len, int(cache.lengths.max()) + Tq) if R else 0
        key = torch.arange(S, device=dev)
        # query (r, i) sees cache entries 0 .. base[r] + i (itself included)
        mask = key.view(1, 1, S) <= (base.view(R, 1, 1) + col.view(1, Tq, 1))
        mask = mask | ~pad_valid.unsqueeze(-1)  # padded queries: any row without NaN
        h = self.embed(ids)
        tables = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        hidden = []
        for layer, blk in enumerate(self.blocks):
            h = blk(h, positions, layer, cache, owner, slot, pad_index, pad_valid, mask, tables)
            if layer in hidden_layers:
                hidden.append(h)
        cache.lengths += torch.tensor(counts, device=dev, dtype=torch.int32)
        logits = self.head(self.norm(h))
        return logits, (torch.stack(hidden, 1) if hidden else None)

    def train_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Plain causal forward over ids [B, L] at positions 0..L-1 (no
        cache), for training: logits [B, L, V], the same modules and maths
        as forward()."""
        cfg, hd = self.cfg, self.cfg.head_dim
        B, L = ids.shape
        positions = torch.arange(L, device=ids.device)
        h = self.embed(ids)
        for blk in self.blocks:
            x = blk.attn_norm(h)
            q = _rope(blk.wq(x).view(B, L, cfg.n_heads, hd), positions, cfg.rope_theta)
            k = _rope(blk.wk(x).view(B, L, cfg.n_kv_heads, hd), positions, cfg.rope_theta)
            v = blk.wv(x).view(B, L, cfg.n_kv_heads, hd)
            rep = cfg.n_heads // cfg.n_kv_heads
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(rep, dim=2).transpose(1, 2),
                                                 v.repeat_interleave(rep, dim=2).transpose(1, 2), is_causal=True)
            h = h + blk.wo(out.transpose(1, 2).reshape(B, L, cfg.n_heads * hd))
            x = blk.mlp_norm(h)
            h = h + blk.w2(F.silu(blk.w1(x)) * blk.w3(x))
        return self.head(self.norm(h))
