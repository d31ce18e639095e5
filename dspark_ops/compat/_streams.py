"""Random streams for the shims (no kernels): other engines' seed / offset /
torch.Generator arguments turned into the per-request (seed, position) of the
pinned Philox contract (DESIGN §2), and verify_chunk's acceptance coins
recomputed as a vectorised torch computation."""
from __future__ import annotations

from typing import Optional, Union

import torch

from .._enums import Purpose

_M32 = 0xFFFFFFFF
_INT64_MIN, _INT64_END, _UINT64_END = -(1 << 63), 1 << 63, 1 << 64
# Row r of a batch that shares one seed uses seed + r * golden (mod 2^64, the
# splitmix64 increment): distinct Philox keys, so rows are independent streams
# (a bare shared seed would give every row the same coins).
_GOLDEN = 0x9E3779B97F4A7C15 - _UINT64_END  # as int64

IntOrTensor = Union[int, torch.Tensor]


def draw_seeds(count: int, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[count] int64 seeds drawn from `generator` (torch's default generator of
    `device` when None), which advances. A generator on `device` draws there:
    no host synchronisation (else one small copy to `device`)."""
    gen_device = generator.device if generator is not None else device
    seeds = torch.randint(_INT64_MIN, _INT64_END - 1, (count,), dtype=torch.int64, device=gen_device,
                          generator=generator)
    return seeds.to(device)


def as_int64(op: str, name: str, value: IntOrTensor, B: int, device: torch.device) -> torch.Tensor:
    """A seed or offset given as a Python int or a tensor [1] / [B] of int64 /
    uint64 (the same 64 bits) as an int64 tensor [1] / [B] on `device`."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.shape[0] not in (1, B):
            raise ValueError(f"{op}: {name} must be an int or a tensor of shape [1] or [{B}], got "
                             f"{list(value.shape)}")
        if value.device != device:
            raise ValueError(f"{op}: {name} must be on {device}, got {value.device}")
        if value.dtype == torch.uint64:
            return value.view(torch.int64)
        if value.dtype != torch.int64:
            raise ValueError(f"{op}: {name} must have dtype int64 or uint64, got {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{op}: {name} must be an int or a tensor, got {type(value).__name__}")
    if not _INT64_MIN <= value < _UINT64_END:
        raise ValueError(f"{op}: {name} must fit in 64 bits, got {value}")
    if value >= _INT64_END:
        value -= _UINT64_END
    return torch.full((1,), value, dtype=torch.int64, device=device)


def per_row_seeds(seed: torch.Tensor, B: int) -> torch.Tensor:
    """[B] seeds: a [B] tensor as given (one stream per row), a [1] tensor
    spread to distinct streams seed + r * golden (int64 arithmetic wraps)."""
    if seed.shape[0] == B:
        return seed
    rows = torch.arange(B, dtype=torch.int64, device=seed.device)
    return seed + rows * _GOLDEN


def _philox_lane0(c0, c1, c2, c3, k0, k1) -> torch.Tensor:
    """Output 0 of Philox4x32-10 (csrc/core/philox.h) on int64 tensors of
    uint32 values. A 32x32-bit product fits the 64 bits of an int64 whose
    multiplication wraps (as torch's does on CPU and CUDA), so its high half is
    (p >> 32) & M32: 14 ops a round (dspark_ops.reference splits into 16-bit
    halves instead; tests compare the two)."""
    for _ in range(10):
        p0, p1 = c0 * 0xD2511F53, c2 * 0xCD9E8D57
        c0, c1, c2, c3 = ((p1 >> 32) & _M32) ^ c1 ^ k0, p1 & _M32, ((p0 >> 32) & _M32) ^ c3 ^ k1, p0 & _M32
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0


def coin_uniforms(seed: torch.Tensor, position: torch.Tensor, num_draft: int) -> torch.Tensor:
    """[B, num_draft] float32: the acceptance coin u_j of draft j that
    verify_chunk draws (Philox COIN, slot j + 1, vocab lane 0), for every j —
    also after the first rejection, where verify_chunk draws none.

    seed, position: int64 [B] (or [1], broadcast). About 150 elementwise torch
    ops on [B, num_draft] int64 tensors, on their device: dispatch-bound,
    ~0.35 ms on the 2-core CPU at any small size."""
    dev = seed.device
    s, p = seed.reshape(-1, 1), position.reshape(-1, 1)
    slot = torch.arange(1, num_draft + 1, dtype=torch.int64, device=dev).reshape(1, -1) | (int(Purpose.COIN) << 16)
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    counter_key = torch.broadcast_tensors(zero, slot, p & _M32, (p >> 32) & _M32, s & _M32, (s >> 32) & _M32)
    bits = _philox_lane0(*counter_key)
    return ((bits >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)
