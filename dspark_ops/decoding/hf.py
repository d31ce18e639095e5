"""HFTarget: any already-loaded Hugging Face transformers causal LM as a
target of the pinned protocol (DESIGN §3):

    forward(ids [T] int64, positions [T] int64, cu_tokens [R+1] int32, cache,
            *, hidden_layers=()) -> (logits [T, V], hidden [T, k, d] | None)

A Hugging Face cache shares one length across its batch, so requests run one
at a time: the handle (`HFCache`) holds one cache per request (the model's
own DynamicCache, layers [1, H, S, D] heads-first) and the lengths (int32
[R] on the model's device).

Rollback keeps a subset of the entries a step appended, per request:

* the kept entries are a prefix (chain verification: keep = 0..accepted) —
  the cheap path, no data moves: every layer's K and V are sliced to
  base + num_keep (what ``DynamicCache.crop`` does);
* any other keep (a tree's accepted path) — ``dspark_ops.kv_compact(...,
  heads_first=True)`` moves the kept entries down over every layer's K and V
  in one call, then each tensor is sliced to the new length (a Hugging Face
  cache grows by concatenation, so its length is the tensor's).

The slices are views; the next forward's concatenation makes them contiguous
again. Rollback reads its arguments on the host (one synchronisation on a
GPU, on top of the per-request forwards': this is the convenience path, the
batched one is BuiltinTarget). Never downloads anything: pass a loaded model.

Supported: caches whose every layer holds the whole sequence (full
attention: Llama, Qwen2, Mistral without a sliding window, ...). A sliding-
window or recurrent layer cannot be rolled back by position: rollback raises
NotImplementedError there, forward works."""
from __future__ import annotations

import inspect
from typing import List, Optional, Sequence, Tuple

import torch

from .._host import to_device
from ..kv import kv_compact


def _cache_kwarg(model) -> str:
    """The name the model's forward takes its cache by: ``cache``
    (transformers >= 5.x) or ``past_key_values`` (earlier)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _new_hf_cache(model):
    """A fresh cache of the model's own kind (DynamicCache, built from the
    model's config where the version supports it)."""
    from transformers import DynamicCache  # imported lazily: transformers is optional

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _get_kv(cache) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Every initialised layer's (keys, values), each [1, H, S, D]."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(l.keys, l.values) for l in layers if getattr(l, "keys", None) is not None and l.keys.numel()]
    return [(k, v) for k, v in zip(cache.key_cache, cache.value_cache) if k is not None and k.numel()]


def _slice_kv(cache, new_len: int) -> None:
    """Truncate every layer to new_len positions (views, no copy)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for l in layers:
            if getattr(l, "keys", None) is not None and l.keys.numel():
                l.keys = l.keys[..., :new_len, :]
                l.values = l.values[..., :new_len, :]
        return
    for i, k in enumerate(cache.key_cache):
        if k is not None and k.numel():
            cache.key_cache[i] = k[..., :new_len, :]
            cache.value_cache[i] = cache.value_cache[i][..., :new_len, :]


def _check_rollable(cache) -> None:
    layers = getattr(cache, "layers", None)
    for l in layers or ():
        if getattr(l, "is_sliding", False) or not hasattr(l, "keys"):
            raise NotImplementedError(
                f"HFTarget.rollback: the cache has a {type(l).__name__} layer (sliding window or recurrent "
                "state), which cannot be rolled back by position; only full-attention caches are supported")


class HFCache:
    """HFTarget's cache handle: one Hugging Face cache per request, and each
    request's cached length (``lengths``, int32 [R], on the model's device;
    ``host_lengths`` mirrors it on the host)."""

    def __init__(self, caches: list, device: torch.device, max_len: int):
        self.caches = caches
        self.host_lengths = [0] * len(caches)
        self.lengths = torch.zeros(len(caches), dtype=torch.int32, device=device)
        self.max_len = max_len

    def _sync_lengths(self) -> None:
        self.lengths.copy_(to_device(self.host_lengths, torch.int32, self.lengths.device))  # pinned, asynchronous


class HFTarget:
    """A loaded transformers causal LM (``AutoModelForCausalLM``-like: its
    forward takes input_ids, position_ids and a cache, and returns logits)
    as a target. Runs the requests of a ragged batch one at a time.

    hidden_layers: index l is the output of decoder layer l (Hugging Face's
    ``output_hidden_states`` entry ``hidden_states[l + 1]``). Whether the last
    layer's is before or after the final norm follows the model's own
    convention (transformers 5.x: after it, unlike BuiltinModel's)."""

    def __init__(self, model):
        self.model = model.eval()
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab_size = int(emb.weight.shape[0]) if emb is not None else int(cfg.vocab_size)
        self._cache_kw = _cache_kwarg(model)
        first = next(model.parameters())
        self._device, self._dtype = first.device, first.dtype  # read once: next(parameters()) costs ~70 us a call

    @property
    def device(self) -> torch.device:
        """The model's device when wrapped (move the model before wrapping it)."""
        return self._device

    def new_cache(self, num_requests: int, max_len: int) -> HFCache:
        return HFCache([_new_hf_cache(self.model) for _ in range(num_requests)], self.device, max_len)

    def lengths(self, cache: HFCache) -> torch.Tensor:
        return cache.lengths

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cu_tokens: torch.Tensor, cache: HFCache, *,
                hidden_layers: Sequence[int] = (), tree_parents: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if tree_parents is not None:
            raise NotImplementedError("HFTarget.forward: tree drafts (tree attention) are not supported; use a chain "
                                      "drafter, or BuiltinTarget(builtin_from_hf(model)) for Llama-family models")
        cu = cu_tokens.tolist()
        R = len(cu) - 1
        if R != len(cache.caches):
            raise ValueError(f"HFTarget.forward: cu_tokens has {R} requests, the cache {len(cache.caches)}")
        ids, positions = ids.to(self._device, torch.int64), positions.to(self._device, torch.int64)
        hidden_layers = list(hidden_layers)
        want_hidden = bool(hidden_layers)
        logits, hidden = [], []
        for r in range(R):
            a, b = cu[r], cu[r + 1]
            if b <= a:
                continue
            out = self.model(input_ids=ids[a:b].unsqueeze(0), position_ids=positions[a:b].unsqueeze(0),
                             use_cache=True, output_hidden_states=want_hidden,
                             **{self._cache_kw: cache.caches[r]})
            logits.append(out.logits[0])
            if want_hidden:
                hs = out.hidden_states
                hidden.append(torch.stack([hs[l + 1][0] for l in hidden_layers], 1))
            cache.host_lengths[r] += b - a
        cache._sync_lengths()
        if not logits:
            return torch.empty(0, self.vocab_size, dtype=self._dtype, device=self._device), None
        return (torch.cat(logits, 0) if len(logits) > 1 else logits[0],
                (torch.cat(hidden, 0) if want_hidden else None))

    @torch.inference_mode()  # the caches' tensors were made under inference mode: edit them under it
    def rollback(self, cache: HFCache, base_len: torch.Tensor, num_appended: torch.Tensor, keep_index: torch.Tensor,
                 num_keep: torch.Tensor) -> None:
        """Keep entries keep_index[r, :num_keep[r]] (strictly increasing, <
        num_appended[r]) of those request r appended after base_len[r];
        lengths = base_len + num_keep (anything cached beyond base_len +
        num_appended goes too). A prefix keep slices; any other
        kv_compact's (heads_first=True), then slices. Reads its arguments on
        the host."""
        base_h, app_h, nk_h = base_len.tolist(), num_appended.tolist(), num_keep.tolist()
        keep_h = keep_index.tolist()
        for r, hf in enumerate(cache.caches):
            base, app, nk = int(base_h[r]), int(app_h[r]), int(nk_h[r])
            if not (0 <= nk <= app) or base < 0:
                raise ValueError(f"HFTarget.rollback: request {r}: need 0 <= num_keep ({nk}) <= num_appended "
                                 f"({app}) and base_len ({base}) >= 0")
            have = cache.host_lengths[r]
            if base + app > have:
                raise ValueError(f"HFTarget.rollback: request {r}: base_len + num_appended = {base + app} exceeds "
                                 f"its cached length {have}")
            keep = [int(k) for k in keep_h[r][:nk]]
            new_len = base + nk
            if keep != list(range(nk)):  # not a prefix: move the kept entries down, in every layer at once
                _check_rollable(hf)
                tensors, made = [], {}  # made: one contiguous copy per strided tensor, however often it appears
                for k, v in _get_kv(hf):
                    if k.shape[-2] != have or v.shape[-2] != have:
                        raise NotImplementedError(
                            f"HFTarget.rollback: a cache layer holds {k.shape[-2]} positions, not the request's "
                            f"{have} (sliding window?): cannot roll back by position")
                    for t in (k, v):
                        if not t.is_contiguous() and id(t) not in made:
                            made[id(t)] = t.contiguous()
                        tensors.append(made.get(id(t), t))
                self._set_kv(hf, tensors)
                # Layers that share a KV tensor list it once: kv_compact moves each tensor's entries once.
                unique = list({(t.data_ptr(), t.shape, t.stride()): t for t in tensors}.values())
                dev = tensors[0].device
                _, status = kv_compact(unique, torch.tensor([base], dtype=torch.int32, device=dev),
                                       torch.tensor([app], dtype=torch.int32, device=dev),
                                       torch.tensor([keep], dtype=torch.int32, device=dev).view(1, nk),
                                       torch.tensor([nk], dtype=torch.int32, device=dev), heads_first=True)
                if int(status[0]) != 0:
                    raise ValueError(f"HFTarget.rollback: request {r}: kv_compact status {int(status[0])} "
                                     f"(keep {keep}, num_appended {app})")
            elif new_len < have:
                _check_rollable(hf)
            if new_len < have:
                _slice_kv(hf, new_len)
            cache.host_lengths[r] = new_len
        cache._sync_lengths()

    @staticmethod
    def _set_kv(hf, tensors: List[torch.Tensor]) -> None:
        """Put (possibly made-contiguous) layer tensors back, in _get_kv's order."""
        it = iter(tensors)
        layers = getattr(hf, "layers", None)
        if layers is not None:
            for l in layers:
                if getattr(l, "keys", None) is not None and l.keys.numel():
                    l.keys, l.values = next(it), next(it)
            return
        for i, k in enumerate(hf.key_cache):
            if k is not None and k.numel():
                hf.key_cache[i], hf.value_cache[i] = next(it), next(it)
