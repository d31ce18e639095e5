"""Bad input raises a clear error naming the argument and the value, with the
same message from the C++ op and from its fake kernel (torch.compile)."""
import pytest
import torch

import dspark_ops
from helpers import assert_cpp_and_fake_agree

R, V = 4, 50


def good_args():
    t = lambda v, d, n=R: torch.full((n,), v, dtype=d)  # noqa: E731
    return dict(logits=torch.randn(R, V), temperature=t(1.0, torch.float32), top_k=t(3, torch.int32),
                top_p=t(0.9, torch.float32), seed=t(1, torch.int64), position=t(0, torch.int64), purpose=3,
                slot=t(0, torch.int32), row_start=None)


def call(args, out=None):
    a = list(args.values())
    if out is None:
        return torch.ops.dspark_ops.sample(*a)
    return torch.ops.dspark_ops.sample.out(*a, **out)


BAD = {
    "logits dtype": (dict(logits=torch.randint(0, 5, (R, V))), "logits must have dtype float32, float16 or bfloat16, got Long"),
    "logits rank": (dict(logits=torch.randn(R, V, 2)), "logits must have shape [rows, V], got [4, 50, 2]"),
    "logits empty V": (dict(logits=torch.randn(R, 0)), "logits must have V >= 1, got [4, 0]"),
    "logits strides": (dict(logits=torch.randn(V, R).t()), "logits must be contiguous in its last dimension, got strides [1, 4]"),
    "temperature dtype": (dict(temperature=torch.ones(R, dtype=torch.float64)), "temperature must have dtype Float, got Double"),
    "temperature shape": (dict(temperature=torch.ones(3)), "temperature must have shape [4] or [1], got [3]"),
    "top_k dtype": (dict(top_k=torch.ones(R, dtype=torch.int64)), "top_k must have dtype Int, got Long"),
    "top_p shape": (dict(top_p=torch.ones(R, 1)), "top_p must have shape [4] or [1], got [4, 1]"),
    "seed dtype": (dict(seed=torch.ones(R, dtype=torch.int32)), "seed must have dtype Long, got Int"),
    "position shape": (dict(position=torch.ones(5, dtype=torch.int64)), "position must have shape [4] or [1], got [5]"),
    "slot dtype": (dict(slot=torch.ones(R)), "slot must have dtype Int, got Float"),
    "row_start dtype": (dict(row_start=torch.zeros(R, dtype=torch.int64)), "row_start must have dtype Int, got Long"),
    "purpose": (dict(purpose=7), "purpose must be 1 (COIN), 2 (EMIT) or 3 (DRAFT), got 7"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cpp_and_fake_raise_the_same_message(case):
    change, message = BAD[case]
    assert_cpp_and_fake_agree(call, {**good_args(), **change}, f"dspark_ops.sample: {message}")


@pytest.mark.parametrize("name,value,message", [
    ("tokens", torch.empty(3, dtype=torch.int32), "tokens must have shape [4], got [3]"),
    ("status", torch.empty(R, dtype=torch.int64), "status must have dtype Int, got Long"),
    ("tokens", torch.empty(R, 2, dtype=torch.int32)[:, 0], "tokens must be contiguous"),
])
def test_out_tensors_are_checked(name, value, message):
    out = dict(tokens=torch.empty(R, dtype=torch.int32), status=torch.empty(R, dtype=torch.int32))
    out[name] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(good_args(), out)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.5), "temperature must be finite and >= 0 (0 = greedy), got -0.5"),
    (dict(temperature=float("nan")), "temperature must be finite and >= 0"),
    (dict(top_k=-1), "top_k must be >= 0 (0 = off), got -1"),
    (dict(top_p=0.0), "top_p must be > 0 (>= 1 = off), got 0.0"),
    (dict(slot=65536), "slot must be in [0, 65535], got 65536"),
    (dict(position=-1), "position must be in [0, 2^63), got -1"),
    (dict(seed=1 << 64), "seed must fit in 64 bits"),
    (dict(purpose=0), "purpose must be 1 (COIN), 2 (EMIT) or 3 (DRAFT), got 0"),
    (dict(temperature=torch.ones(R, 1)), "temperature must be a scalar or have shape [4] or [1], got [4, 1]"),
])
def test_wrapper_rejects_bad_scalars(kwargs, message):
    with pytest.raises(ValueError) as err:
        dspark_ops.sample(torch.randn(R, V), **kwargs)
    assert str(err.value).startswith(f"dspark_ops.sample: {message}")


def test_wrapper_rejects_non_matrix_logits():
    with pytest.raises(ValueError, match="logits must be a tensor"):
        dspark_ops.sample(torch.randn(V))


def test_seed_accepts_the_full_64_bit_range():
    logits = torch.randn(2, V)
    a = dspark_ops.sample(logits, seed=(1 << 64) - 1).tokens
    b = dspark_ops.sample(logits, seed=-1).tokens  # the same 64 bits
    assert torch.equal(a, b)


def test_workspace_size_errors():
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        dspark_ops.workspace_size("nope", num_requests=1, vocab_size=10)
    with pytest.raises(ValueError, match="unknown sizes"):
        dspark_ops.workspace_size("sample", rows=3)
