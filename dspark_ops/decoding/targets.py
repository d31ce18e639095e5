"""Targets: the pinned protocol (DESIGN §3) and the built-in model's target.

    forward(ids [T] int64, positions [T] int64, cu_tokens [R+1] int32, cache,
            *, hidden_layers=()) -> (logits [T, V], hidden [T, k, d] | None)

`cache` is the target's own handle (`new_cache`), holding each request's
cached length; new tokens are appended after it. `tree_parents [R, Tq]`
(an extension for tree drafts; BuiltinTarget only): the new tokens form a
tree per request and attend along their ancestors. `rollback` keeps a subset of
what a step appended (kv_compact) — the speculative loop's only cache edit."""
from __future__ import annotations

from typing import Optional, Protocol, Sequence, Tuple

import torch

from .model import BuiltinModel, KVCache


class Target(Protocol):
    vocab_size: int

    def new_cache(self, num_requests: int, max_len: int): ...

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cu_tokens: torch.Tensor, cache, *,
                hidden_layers: Sequence[int] = (), tree_parents: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]: ...

    def lengths(self, cache) -> torch.Tensor: ...

    def rollback(self, cache, base_len: torch.Tensor, num_appended: torch.Tensor, keep_index: torch.Tensor,
                 num_keep: torch.Tensor) -> None: ...


class BuiltinTarget:
    """The built-in model as a target: batched and ragged, KV caches
    [R, S, H, D] compacted in place by kv_compact."""

    # On a GPU its forward and rollback never read the host (uniform steps: no host-to-device copies either),
    # so SpeculativeDecoder(cuda_graph=True) may capture them.
    graph_capturable = True

    def __init__(self, model: BuiltinModel, *, serial_tokens: int = 0):
        """serial_tokens: on the CPU, a forward of at most this many new tokens
        runs on one thread, larger ones on torch's configured threads. 0
        (default): always torch's setting — since the forward's GEMMs run on
        packed_linear, a decode step gains from a second core too (plain
        decoding of the embedded target 4 % faster than with 1 here; with
        MKL's GEMMs a decode step lost to thread hand-offs)."""
        self.model = model.eval()
        self.vocab_size = model.cfg.vocab_size
        self.serial_tokens = serial_tokens

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_cache(self, num_requests: int, max_len: int) -> KVCache:
        return self.model.new_cache(num_requests, max_len)

    @torch.inference_mode()
    def forward(self, ids, positions, cu_tokens, cache: KVCache, *, hidden_layers=(), tree_parents=None):
        """The protocol's forward; tree_parents [R, Tq] (optional): the new
        tokens of each request form a tree (BuiltinModel.forward)."""
        kw = dict(hidden_layers=hidden_layers, tree_parents=tree_parents)
        threads = torch.get_num_threads()
        if threads > 1 and ids.shape[0] <= self.serial_tokens and ids.device.type == "cpu":
            torch.set_num_threads(1)
            try:
                return self.model(ids, positions, cu_tokens, cache, **kw)
            finally:
                torch.set_num_threads(threads)
        return self.model(ids, positions, cu_tokens, cache, **kw)

    def graph_token(self, cache: KVCache) -> tuple:
        """BuiltinModel.graph_token for this cache: kept CUDA graphs of the
        forward replay only while it is unchanged."""
        return self.model.graph_token(cache.max_len)

    def lengths(self, cache: KVCache) -> torch.Tensor:
        return cache.lengths

    def rollback(self, cache: KVCache, base_len, num_appended, keep_index, num_keep) -> None:
        cache.rollback(base_len, num_appended, keep_index, num_keep)
