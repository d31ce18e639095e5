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
from ..packed_linear import pack_linear_weight, packed_linear_fast
from .._host import to_device


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
        self.row_offsets = torch.arange(num_requests, dtype=torch.int64, device=device) * max_len
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


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, dim] / sqrt(mean(x^2) + eps): RMSNorm without its weight, which
    the fused weights carry (_Block.fused). Four ops, no Python scalars in
    in-place ops (each would cost a host-side tensor conversion). The
    statistics of fp16/bf16 activations are taken in fp32 (like
    nn.RMSNorm): x^2 overflows fp16 above 256."""
    low = x.dtype in (torch.float16, torch.bfloat16)
    xs = x.float() if low else x
    D = x.shape[-1]
    ss = torch.addmm(_filled((), eps, xs.dtype, x.device), xs * xs,
                     _filled((D, 1), 1.0 / D, xs.dtype, x.device))  # [T, 1]: mean(x^2) + eps
    return (xs * ss.rsqrt_()).to(x.dtype) if low else xs * ss.rsqrt_()


_CONST: dict = {}
_MATMUL_ATTENTION_MAX_TOKENS = 16  # new tokens per request up to which attention is batched matmuls, not SDPA
_PACKED_MAX_TOKENS = 512  # new tokens (all requests) up to which the CPU forward's GEMMs use packed_linear
_packed_linear = torch.ops.dspark_ops.packed_linear


def _use_packed(h: torch.Tensor) -> bool:
    """Whether this forward's GEMMs go through dspark_ops.packed_linear: a
    float32 CPU inference forward of at most _PACKED_MAX_TOKENS tokens on a
    CPU with AVX-512 or AVX2. (On this project's CPU MKL ran a 6-row GEMM of these
    shapes 2-3x slower and a 1-row one ~2x slower; a longer prefill keeps
    MKL, whose per-call packing of the weight pays off there.)"""
    return (h.device.type == "cpu" and h.dtype == torch.float32 and h.shape[0] <= _PACKED_MAX_TOKENS
            and not torch.is_grad_enabled() and packed_linear_fast())


def _packed_once(slot: list, *weights: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """weights packed for packed_linear, kept in slot[0] (a cache entry's
    slot: built on first use, freed with the entry that holds it)."""
    if slot[0] is None:
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable outside inference mode
            slot[0] = tuple(pack_linear_weight(w) for w in weights)
    return slot[0]


def _version(w: torch.Tensor) -> int:
    """A weight's version counter; 0 for an inference tensor (made under
    inference_mode: it has none, and cannot change outside that mode)."""
    return 0 if w.is_inference() else w._version


def _filled(shape: Tuple[int, ...], value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A constant tensor, made once (a plain tensor even under inference mode)."""
    key = (shape, value, dtype, device)
    t = _CONST.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = _CONST[key] = torch.full(shape, value, dtype=dtype, device=device)
    return t


def _rotate_half_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rows of a projection [n * head_dim, dim] whose output is
    rotate_half of the original's per head: (-x2, x1)."""
    w = w.view(-1, head_dim, w.shape[-1])
    return torch.cat([-w[:, head_dim // 2:], w[:, : head_dim // 2]], 1).reshape(-1, w.shape[-1])


_FUSED_WEIGHTS = ("wq", "wk", "wv", "w1", "w3", "wo", "w2", "attn_norm", "mlp_norm")


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
        self._fused: Optional[tuple] = None

    def fused(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inference path's weights: wqkv [(2H+3Hkv)D, dim] = q, k, v,
        rotate_half(q), rotate_half(k) in one GEMM (RoPE then needs no
        shuffle), w13 [2 hidden, dim] (the SwiGLU's two inputs), both with
        their RMSNorm's weight folded in; wo^T and w2^T (views) for addmm.
        Rebuilt when a weight moves (model.to(), load_state_dict) or its
        version counter changes (in-place updates by torch ops, optimizer
        steps); writes that bypass the counter (``p.data`` ops, numpy views,
        fused optimizers) need BuiltinModel.clear_inference_cache() — which
        model.train() and model.eval() call. Differentiable and uncached
        while autograd records."""
        hd = self.cfg.head_dim
        mods = self._modules  # not self.wq.weight: nn.Module's __getattr__ costs ~1 us a lookup
        ws = tuple(mods[name]._parameters["weight"] for name in _FUSED_WEIGHTS)
        if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
            return self._build(ws, hd)
        # Storage addresses and version counters: in-place updates bump the version, model.to() or a .data swap
        # moves the storage (the cache keeps the old storage alive, so its address cannot be reused meanwhile).
        key = tuple(w.data_ptr() for w in ws) + tuple(_version(w) for w in ws)
        cached = self._fused
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable outside inference mode
                cached = self._fused = (key, self._build(ws, hd),
                                        tuple(w.detach() for w in ws), [None])  # [packed(), built on demand]
        return cached[1]

    def packed(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """fused()'s wqkv, w13, wo and w2 packed for packed_linear (CPU,
        float32, inference), kept in fused()'s cache entry: rebuilt and
        freed with it."""
        self.fused()
        _, (wqkv, w13, wo_t, w2_t), _, slot = self._fused
        return _packed_once(slot, wqkv, w13, wo_t.t(), w2_t.t())

    @staticmethod
    def _build(ws, hd: int):
        wq, wk, wv, w1, w3, wo, w2, g_attn, g_mlp = ws
        wqkv = torch.cat([wq, wk, wv, _rotate_half_rows(wq, hd), _rotate_half_rows(wk, hd)]) * g_attn
        return wqkv, torch.cat([w1, w3]) * g_mlp, wo.t(), w2.t()  # addmm takes the transposed views as they are

    def forward(self, h: torch.Tensor, layer: int, cache: KVCache, plan: "_Plan") -> torch.Tensor:
        cfg, hd = self.cfg, self.cfg.head_dim
        T, H, Hkv = h.shape[0], cfg.n_heads, cfg.n_kv_heads
        wqkv, w13, wo_t, w2_t = self.fused()
        if plan.packed:
            pqkv, p13, po, p2 = self.packed()
            qkv = _packed_linear(_normalize(h, cfg.norm_eps), pqkv, wqkv.shape[0])
        else:
            qkv = F.linear(_normalize(h, cfg.norm_eps), wqkv)
        qkv = qkv.view(T, 2 * H + 3 * Hkv, hd)
        n = H + Hkv
        qk = torch.addcmul(qkv[:, :n] * plan.cos, qkv[:, n + Hkv:], plan.sin)  # RoPE of q and k together
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, n: n + Hkv]
        ck, cv = cache.k[layer], cache.v[layer]
        ck.view(-1, Hkv, hd).index_copy_(0, plan.flat_slot, k if k.dtype == ck.dtype else k.to(ck.dtype))
        cv.view(-1, Hkv, hd).index_copy_(0, plan.flat_slot, v if v.dtype == cv.dtype else v.to(cv.dtype))
        kk, vv = ck[:, : plan.S], cv[:, : plan.S]
        if kk.dtype != q.dtype:
            kk, vv = kk.to(q.dtype), vv.to(q.dtype)
        R, Tq, rep = plan.R, plan.Tq, H // Hkv
        if not plan.sdpa:  # few new tokens per request: batched matmuls, queries grouped by KV head
            qp = q if plan.pad_index is None else q.index_select(0, plan.flat_pad_index)  # ragged: padded to Tq
            qg = qp.reshape(R, Tq, Hkv, rep, hd).permute(0, 2, 3, 1, 4).reshape(R * Hkv, rep * Tq, hd)
            scores = torch.baddbmm(plan.bias, qg, kk.permute(0, 2, 3, 1).reshape(R * Hkv, hd, plan.S),
                                   beta=1.0 if plan.bias.dim() else 0.0, alpha=hd ** -0.5).softmax(-1)
            out = torch.bmm(scores, vv.transpose(1, 2).reshape(R * Hkv, plan.S, hd))  # [R Hkv, rep Tq, D]
            out = out.view(R, Hkv, rep, Tq, hd).permute(0, 3, 1, 2, 4).reshape(R * Tq, H * hd)
            if plan.pad_index is not None:  # the padded queries' rows (finite: they see the cache) dropped
                out = out.index_select(0, plan.valid_rows)
        else:  # queries [R, Tq, H, D], padded per request when ragged
            qp = q.view(R, Tq, H, hd) if plan.pad_index is None else (
                q[plan.pad_index.clamp(min=0)].masked_fill(~plan.pad_valid[..., None, None], 0.0))
            if rep > 1 and Tq >= hd and _sdpa_expands_kv(q.device):  # expanded KV heads: a fused kernel takes the mask
                out = F.scaled_dot_product_attention(qp.transpose(1, 2), kk.repeat_interleave(rep, 2).transpose(1, 2),
                                                     vv.repeat_interleave(rep, 2).transpose(1, 2),
                                                     attn_mask=plan.mask).transpose(1, 2)
            else:
                out = F.scaled_dot_product_attention(qp.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                                     attn_mask=plan.mask, enable_gqa=True).transpose(1, 2)
            out = out.reshape(T, H * hd) if plan.pad_index is None else (
                out.reshape(R * Tq, H * hd).index_select(0, plan.valid_rows))
        if plan.packed:  # the residual starts each output's accumulation
            h = _packed_linear(out, po, wo_t.shape[1], h)
            gate, up = _packed_linear(_normalize(h, cfg.norm_eps), p13, w13.shape[0]).chunk(2, -1)
            return _packed_linear(F.silu(gate).mul_(up), p2, w2_t.shape[1], h)
        h = torch.addmm(h, out, wo_t)
        gate, up = F.linear(_normalize(h, cfg.norm_eps), w13).chunk(2, -1)
        return torch.addmm(h, F.silu(gate).mul_(up), w2_t)


def _sdpa_expands_kv(device: torch.device) -> bool:
    """Whether the SDPA path (long chunks: prefill) expands grouped KV heads
    to the query heads first, for chunks of at least head_dim tokens. On a
    GPU, SDPA's flash kernel takes no mask and its memory-efficient one no
    grouped heads, so `enable_gqa` with a mask falls back to the math path,
    which builds fp32 scores [R, H, Tq, S] (gigabytes for a long prompt);
    expanded K/V [R, S, H, D] (two, 16-bit) cost less once Tq >= D/2, and
    the fused kernel is faster. On the CPU SDPA's kernel takes both. A
    function, so tests can run the GPU path on the CPU."""
    return device.type == "cuda"


def _reads_lengths(device: torch.device) -> bool:
    """Whether a forward reads the cache lengths on the host (the CPU: free)
    or attends over the whole cache without reading them (a GPU: a read
    would synchronise). A function, so tests can run the GPU path on the
    CPU."""
    return device.type == "cpu"


def _check_room(needed: int, max_len: int) -> None:
    if needed > max_len:  # a flat-view write past a row would land in the next request's entries
        raise ValueError(f"BuiltinModel.forward: the cache holds {max_len} entries per request, this forward needs "
                         f"{needed}")


def tree_ancestors(parents: torch.Tensor) -> torch.Tensor:
    """[R, N, N] bool: entry (r, i, j) is True iff node j is node i or one of
    its ancestors, for parents [R, N] (parent index < own index, -1 for a
    root). Reachability by repeated squaring of (I + parent edges): log2(N)
    batched matrix products on the device, no host read."""
    R, N = parents.shape
    par = parents.to(torch.int64)
    reach = torch.zeros(R, N, N, dtype=torch.float32, device=parents.device)
    reach.scatter_(2, par.clamp(min=0).unsqueeze(2), (par >= 0).unsqueeze(2).to(torch.float32))
    reach += torch.eye(N, dtype=torch.float32, device=parents.device)
    for _ in range(max(N - 2, 0).bit_length()):  # paths of up to 2^k edges after k squarings; N - 1 suffice
        reach = (torch.bmm(reach, reach) > 0).to(torch.float32)
    return reach > 0


class _Plan:
    """The index tensors one forward's layers share: where each new token's
    K/V goes (flat_slot: entry r * max_len + s of a cache viewed as
    [R * max_len, H, D]), the attention's additive bias [R Hkv, rep Tq, S]
    (short chunks, ragged ones with their queries padded to Tq by
    flat_pad_index and taken back by valid_rows; ignored for a CPU decode
    step) or boolean mask [R, 1, Tq, S] with the query padding (long
    chunks), the keys
    attended S (the longest cache after the forward on the CPU; the whole
    cache on a GPU, where reading the lengths would synchronise) and the
    rotary tables at the new tokens' positions. Nothing here synchronises
    with a GPU."""

    def __init__(self, positions: torch.Tensor, cu: List[int], cache: KVCache, rope: Tuple[torch.Tensor, ...],
                 cfg: ModelConfig, dtype: torch.dtype, ancestors: Optional[torch.Tensor] = None):
        dev = positions.device
        R, T = len(cu) - 1, positions.shape[0]
        self.packed = False  # set by BuiltinModel.forward: the GEMMs on packed_linear
        self.cos, self.sin = rope[0][positions], rope[1][positions]  # [T, 1, D] each
        self.counts = counts = [cu[r + 1] - cu[r] for r in range(R)]
        self.R, self.Tq = R, (max(counts) if counts else 0)
        self.uniform = all(c == self.Tq for c in counts)
        if ancestors is not None and not self.uniform:
            raise ValueError("BuiltinModel.forward: tree_parents needs the same number of new tokens per request")
        on_host = _reads_lengths(dev)  # lengths readable for free; on a GPU, no read: attend over the whole cache
        if on_host and R == 1 and self.Tq == 1:  # a decode step sees its whole cache: baddbmm (beta 0) ignores bias
            self.flat_slot = cache.lengths + cache.row_offsets
            self.pad_index = self.pad_valid = None
            self.sdpa = False
            self.S = int(cache.lengths[0]) + 1  # the one device-to-host read
            _check_room(self.S, cache.max_len)
            self.bias = _filled((), 0.0, dtype, dev)
            return
        base = cache.lengths.to(torch.int64)
        col = torch.arange(self.Tq, device=dev)
        row_start = base + cache.row_offsets  # [R]: request r's entry 0 in the flat view, plus its length
        if self.uniform:
            self.flat_slot = (row_start.unsqueeze(1) + col).reshape(-1)
            self.pad_index = self.pad_valid = None
        else:  # (sizes known on the host: no synchronisation)
            count_t = to_device(counts, torch.int64, dev)
            starts = to_device(cu[:-1], torch.int64, dev)
            owner = torch.repeat_interleave(torch.arange(R, device=dev), count_t, output_size=T)
            local = torch.arange(T, device=dev) - starts[owner]
            self.flat_slot = row_start[owner] + local
            self.pad_valid = col.unsqueeze(0) < count_t.unsqueeze(1)  # [R, Tq]
            self.pad_index = torch.where(self.pad_valid, starts.unsqueeze(1) + col, -1)
            self.flat_pad_index = self.pad_index.clamp(min=0).reshape(-1)  # [R Tq]: padding repeats token 0
            self.valid_rows = owner * self.Tq + local  # [T]: each token's row in the padded [R Tq] layout
        if on_host:  # the longest cache after this forward, and a clear error past the cache's end
            self.S = int(cache.lengths.max()) + self.Tq if R else 0
            _check_room(self.S, cache.max_len)
        else:  # the caller keeps within max_len (the loop sizes its caches so)
            self.S = cache.max_len
        key = torch.arange(self.S, device=dev)
        # query (r, i) sees cache entries 0 .. base[r] + i (itself included), or with a tree the cache
        # before base[r] and its own ancestors among the new tokens
        if ancestors is None:
            visible = key.view(1, 1, self.S) <= (base.view(R, 1, 1) + col.view(1, self.Tq, 1))  # [R, Tq, S]
        else:
            rel = key.view(1, 1, self.S) - base.view(R, 1, 1)  # [R, 1, S]: new-token index of a cache entry
            new = ancestors.gather(2, rel.clamp(0, self.Tq - 1).expand(R, self.Tq, self.S))
            visible = (rel < 0) | ((rel < self.Tq) & new)
        # Long chunks (prefill) go to SDPA with a boolean mask [R, 1, Tq, S]: no [R H, Tq, S] score and bias
        # tensors; short ones (verify passes, ragged too: queries padded to Tq) to batched matmuls with an additive
        # bias (on the CPU a ragged 17-token pass of 16 requests took 6.5 ms through SDPA, 5.5 for 16 uniform).
        self.sdpa = self.Tq > _MATMUL_ATTENTION_MAX_TOKENS
        if self.sdpa:
            if self.pad_valid is not None:
                visible = visible | ~self.pad_valid.unsqueeze(-1)  # padded queries: any row without NaN
            self.mask = visible.unsqueeze(1)
        else:  # additive bias [R Hkv, rep Tq, S], in the grouped query order of _Block.forward
            bias = torch.zeros(visible.shape, dtype=dtype, device=dev).masked_fill_(~visible, float("-inf"))
            Hkv, rep = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads
            self.bias = bias.unsqueeze(1).unsqueeze(1).expand(R, Hkv, rep, self.Tq, self.S).reshape(
                R * Hkv, rep * self.Tq, self.S)


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

    def clear_inference_cache(self) -> None:
        """Drop the inference forward's fused weights (rebuilt on the next
        forward): after writing weights in ways their version counters do
        not see."""
        self._head = None
        for blk in self._modules["blocks"]:
            blk._fused = None

    def train(self, mode: bool = True) -> "BuiltinModel":
        self.clear_inference_cache()  # a training phase may write weights behind the version counters
        return super().train(mode)

    def new_cache(self, num_requests: int, max_len: int) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.cfg, num_requests, max_len, dtype=p.dtype, device=p.device)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cu_tokens: torch.Tensor, cache: KVCache, *,
                hidden_layers: Sequence[int] = (), tree_parents: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """ids [T] int64, positions [T] int64, cu_tokens [R+1] int32: request
        r's new tokens are ids[cu[r]:cu[r+1]], appended after its cached
        length. Returns (logits [T, V], hidden [T, len(hidden_layers), dim] or
        None). cu_tokens is read on the host (keep it there); no other read:
        on a GPU the forward never synchronises (attention spans the whole
        cache, masked), on the CPU it reads the lengths and raises past the
        cache's end.

        tree_parents [R, Tq] int32 (every request appending Tq tokens): the
        new tokens form a tree per request — token j's parent is new token
        tree_parents[r, j] < j, or -1 for a token whose parent is the cached
        prefix — and each token attends to the cache and its ancestors only
        (positions should be the prefix length plus the depth)."""
        cu = cu_tokens.tolist()
        h = F.embedding(ids, self._modules["embed"]._parameters["weight"])
        ancestors = tree_ancestors(tree_parents) if tree_parents is not None else None
        plan = _Plan(positions, cu, cache, self._rope_tables(cache.max_len, h.dtype, h.device), self.cfg, h.dtype,
                     ancestors)
        plan.packed = _use_packed(h)
        hidden = []
        for layer, blk in enumerate(self._modules["blocks"]):
            h = blk.forward(h, layer, cache, plan)  # not blk(...): skips nn.Module's hook machinery
            if layer in hidden_layers:
                hidden.append(h)
        if plan.uniform:
            cache.lengths += plan.Tq
        else:
            cache.lengths += to_device(plan.counts, torch.int32, cache.lengths.device)
        logits = self.head_logits(_normalize(h, self.cfg.norm_eps), plan.packed)
        return logits, (torch.stack(hidden, 1) if hidden else None)

    @torch.no_grad()
    def graph_token(self, max_len: int) -> tuple:
        """What a CUDA graph of this model's inference forward (over caches
        of max_len entries) reads besides its inputs: the addresses of the
        parameters and of the lazily built tensors (rotary tables, fused
        block weights, the head), built now if they are not, plus dtype and
        device. A kept graph replays correctly only while this is unchanged
        (model.eval(), a weight update, .to() or a longer cache rebuild them)."""
        p = next(self.parameters())
        with torch.inference_mode():
            tabs = self._rope_tables(max_len, p.dtype, p.device)
            built = [t for blk in self._modules["blocks"] for t in blk.fused()] + [self._head_weight(), *tabs]
        return (p.dtype, p.device, tuple(q.data_ptr() for q in self.parameters()),
                tuple(t.data_ptr() for t in built))

    def head_logits(self, x: torch.Tensor, packed: bool) -> torch.Tensor:
        """x [T, dim] (normalised, without the final norm's weight) -> logits
        [T, V]: the LM head, through packed_linear where `packed`."""
        w = self._head_weight()
        if not packed:
            return F.linear(x, w)
        (packed,) = _packed_once(self._head[4], w)  # kept in _head_weight's cache entry
        return _packed_linear(x, packed, w.shape[0])

    def _head_weight(self) -> torch.Tensor:
        """The LM head with the final RMSNorm's weight folded in (cached like _Block.fused)."""
        w, g = self._modules["head"]._parameters["weight"], self._modules["norm"]._parameters["weight"]
        if torch.is_grad_enabled() and (w.requires_grad or g.requires_grad):
            return w * g
        key = (w.data_ptr(), _version(w), g.data_ptr(), _version(g))  # as in _Block.fused
        cached = getattr(self, "_head", None)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                cached = self._head = (key, (w * g).contiguous(), w.detach(), g.detach(), [None])
        return cached[1]

    def _rope_tables(self, length: int, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
        """(cos, sin) [length, 1, head_dim] for positions 0..length-1
        (a cache's positions are its slots), built once and grown on demand."""
        tabs = getattr(self, "_rope", None)
        if tabs is None or tabs[0].shape[0] < length or tabs[0].dtype != dtype or tabs[0].device != device:
            n = max(length, self.cfg.max_seq_len)
            with torch.inference_mode(False), torch.no_grad():
                cos, sin = rope_tables(torch.arange(n, device=device), self.cfg.head_dim, self.cfg.rope_theta, dtype)
                tabs = (cos, sin)
            self._rope = tabs
        return tabs

    def train_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Plain causal forward over ids [B, L] at positions 0..L-1 (no
        cache), for training: logits [B, L, V], the same modules and maths
        as forward()."""
        return self.train_hidden(ids)[0]

    def train_hidden(self, ids: torch.Tensor, hidden_layers: Sequence[int] = ()
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """train_forward plus the hidden states after the named layers:
        (logits [B, L, V], hidden [B, L, len(hidden_layers), dim] or None),
        as forward() returns them (a drafter's training features)."""
        cfg, hd = self.cfg, self.cfg.head_dim
        B, L = ids.shape
        positions = torch.arange(L, device=ids.device)
        h = self.embed(ids)
        hidden = []
        for layer, blk in enumerate(self.blocks):
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
            if layer in hidden_layers:
                hidden.append(h)
        return self.head(self.norm(h)), (torch.stack(hidden, 2) if hidden else None)
