"""Turning the public API's scalar-or-tensor sampling parameters into the
[R] or [1] tensors the ops take, without a host synchronisation."""
from __future__ import annotations

import numbers
import operator
from typing import Optional, Union

import torch

from ._enums import MAX_SLOT, Purpose

TensorOrFloat = Union[torch.Tensor, float]
TensorOrInt = Union[torch.Tensor, int]

_INT64_MIN, _UINT64_END = -(1 << 63), 1 << 64
_INT32_MAX = (1 << 31) - 1


def _number(op: str, name: str, value, integer: bool):
    """A Python number from a scalar argument (int, float, numpy scalar or 0-d
    array), or a ValueError naming the argument: lists and arrays are not
    per-request values (pass a tensor), and an integer parameter refuses 1.5.
    Ints pass through int() first: under torch.compile a traced int stays
    dynamic (operator.index would specialise it: a recompile per step)."""
    if isinstance(value, (bool, str)):
        raise ValueError(f"{op}: {name} must be a number or a torch.Tensor [R] or [1], got {type(value).__name__}")
    if isinstance(value, (int, torch.SymInt)):
        return int(value) if integer else float(value)
    if isinstance(value, (float, torch.SymFloat)) and not integer:
        return float(value)
    if type(value).__name__ == "ndarray" and getattr(value, "ndim", None) == 0:
        value = value.item()  # a 0-d numpy array
        if isinstance(value, bool):
            raise ValueError(f"{op}: {name} must be a number or a torch.Tensor [R] or [1], got bool")
    if not isinstance(value, numbers.Real):
        raise ValueError(f"{op}: {name} must be a number or a torch.Tensor [R] or [1], got {type(value).__name__}")
    if not integer:
        return float(value)
    try:
        return operator.index(value)  # numpy integers
    except TypeError:
        if float(value).is_integer():
            return int(value)
        raise ValueError(f"{op}: {name} must be an integer, got {value!r}") from None


def _as_per_request(op: str, name: str, value, R: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """A tensor [R] or [1] (broadcast) of `dtype` on `device`. A 0-d tensor
    counts as [1]; an integer parameter refuses a floating tensor (its
    values would be truncated)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1)
        if value.dim() != 1 or value.shape[0] not in (R, 1):
            raise ValueError(f"{op}: {name} must be a scalar or have shape [{R}] or [1], "
                             f"got {list(value.shape)}")
        if value.device != device:
            raise ValueError(f"{op}: {name} must be on {device} like logits, got {value.device}")
        if not dtype.is_floating_point and (value.is_floating_point() or value.is_complex()):
            raise ValueError(f"{op}: {name} must have an integer dtype, got {value.dtype}")
        if dtype == torch.int32 and value.dtype == torch.int64:  # saturate, never wrap (2^32 + 5 -> 5)
            value = value.clamp(-1, _INT32_MAX)
        return value.to(dtype).contiguous()
    # torch.full is a device-side fill: no host-to-device copy, graph-capturable.
    return torch.full((1,), value, dtype=dtype, device=device)


def temperature_tensor(op: str, value: TensorOrFloat, R: int, device, name: str = "temperature") -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        value = _number(op, name, value, integer=False)
        if not (value >= 0.0) or value == float("inf"):
            raise ValueError(f"{op}: {name} must be finite and >= 0 (0 = greedy), got {value}")
    return _as_per_request(op, name, value, R, torch.float32, device)


def top_k_tensor(op: str, value: TensorOrInt, R: int, vocab: int, device) -> Optional[torch.Tensor]:
    """None when top-k is off for every request (0 or >= V)."""
    if not isinstance(value, torch.Tensor):
        value = _number(op, "top_k", value, integer=True)
        if value < 0:
            raise ValueError(f"{op}: top_k must be >= 0 (0 = off), got {value}")
        if value == 0 or value >= vocab:
            return None
    return _as_per_request(op, "top_k", value, R, torch.int32, device)


def top_p_tensor(op: str, value: TensorOrFloat, R: int, device) -> Optional[torch.Tensor]:
    """None when top-p is off for every request (>= 1: skipped, never evaluated)."""
    if not isinstance(value, torch.Tensor):
        value = _number(op, "top_p", value, integer=False)
        if not (value > 0.0):
            raise ValueError(f"{op}: top_p must be > 0 (>= 1 = off), got {value}")
        if value >= 1.0:
            return None
    return _as_per_request(op, "top_p", value, R, torch.float32, device)


def seed_tensor(op: str, value: TensorOrInt, R: int, device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        value = _number(op, "seed", value, integer=True)
        if not (_INT64_MIN <= value < _UINT64_END):
            raise ValueError(f"{op}: seed must fit in 64 bits, got {value}")
        if value >= 1 << 63:  # the same 64 bits, as int64
            value -= _UINT64_END
    return _as_per_request(op, "seed", value, R, torch.int64, device)


def position_tensor(op: str, value: TensorOrInt, R: int, device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        value = _number(op, "position", value, integer=True)
        if not (0 <= value < 1 << 63):
            raise ValueError(f"{op}: position must be in [0, 2^63), got {value}")
    return _as_per_request(op, "position", value, R, torch.int64, device)


def slot_tensor(op: str, value: TensorOrInt, R: int, device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        value = _number(op, "slot", value, integer=True)
        if not (0 <= value <= MAX_SLOT):
            raise ValueError(f"{op}: slot must be in [0, {MAX_SLOT}], got {value}")
    return _as_per_request(op, "slot", value, R, torch.int32, device)


def check_purpose(op: str, purpose: Union[int, str]) -> int:
    if isinstance(purpose, str):  # "DRAFT", "emit"
        if purpose.upper() in Purpose.__members__:
            return int(Purpose[purpose.upper()])
    else:
        purpose = _number(op, "purpose", purpose, integer=True)
    if purpose not in (1, 2, 3):
        raise ValueError(f"{op}: purpose must be 1 (COIN), 2 (EMIT) or 3 (DRAFT), got {purpose}")
    return purpose
