"""verify_chunk's bad input: the same message from the C++ op and its fake
kernel, naming the argument and the value; the wrapper's own checks."""
import pytest
import torch

import dspark_ops
from helpers import assert_cpp_and_fake_agree

R, K, V = 3, 2, 20


def good_args():
    t = lambda v, d, n=R: torch.full((n,), v, dtype=d)  # noqa: E731
    return dict(target_logits=torch.randn(9, V), draft_tokens=torch.zeros(6, dtype=torch.int32),
                cu_num_draft=torch.tensor([0, 2, 4, 6], dtype=torch.int32), max_draft=K,
                draft_probs=torch.full((6, V), 1.0 / V), draft_logits=None, draft_temperature=t(1.0, torch.float32),
                temperature=t(1.0, torch.float32), top_k=None, top_p=None, seed=t(0, torch.int64),
                position=t(0, torch.int64), draft_row_start=None, target_row_start=None)


def call(args, out=None):
    if out is None:
        return torch.ops.dspark_ops.verify_chunk(*args.values())
    return torch.ops.dspark_ops.verify_chunk.out(*args.values(), **out)


BAD = {
    "target dtype": (dict(target_logits=torch.zeros(9, V, dtype=torch.int64)),
                     "target_logits must have dtype float32, float16 or bfloat16, got torch.int64"),
    "draft_tokens dtype": (dict(draft_tokens=torch.zeros(6, dtype=torch.int64)), "draft_tokens must have dtype torch.int32, got torch.int64"),
    "draft_tokens rank": (dict(draft_tokens=torch.zeros(3, 2, dtype=torch.int32)), "draft_tokens must have shape [N], got [3, 2]"),
    "cu dtype": (dict(cu_num_draft=torch.tensor([0, 2, 4, 6])), "cu_num_draft must have dtype torch.int32, got torch.int64"),
    "cu empty": (dict(cu_num_draft=torch.zeros(0, dtype=torch.int32)), "cu_num_draft must have shape [R + 1], got [0]"),
    "max_draft": (dict(max_draft=-1), "max_draft must be in [0, 65534], got -1"),
    "both drafts": (dict(draft_logits=torch.randn(6, V)), "pass draft_probs or draft_logits, not both"),
    "draft V": (dict(draft_probs=torch.zeros(6, V + 1)), "draft_probs must have V = 20 columns like target_logits, got [6, 21]"),
    "draft dtype": (dict(draft_probs=torch.zeros(6, V, dtype=torch.float16)),
                    "draft_probs must have the dtype of target_logits (torch.float32) or torch.float32, got torch.float16"),
    "temperature shape": (dict(temperature=torch.ones(2)), "temperature must have shape [3] or [1], got [2]"),
    "draft_temperature dtype": (dict(draft_temperature=torch.ones(R, dtype=torch.float64)),
                                "draft_temperature must have dtype torch.float32, got torch.float64"),
    "top_k dtype": (dict(top_k=torch.ones(R, dtype=torch.int64)), "top_k must have dtype torch.int32, got torch.int64"),
    "seed shape": (dict(seed=torch.zeros(4, dtype=torch.int64)), "seed must have shape [3] or [1], got [4]"),
    "row start shape": (dict(target_row_start=torch.zeros(2, dtype=torch.int32)), "target_row_start must have shape [3], got [2]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cpp_and_fake_raise_the_same_message(case):
    change, message = BAD[case]
    assert_cpp_and_fake_agree(call, {**good_args(), **change}, f"dspark_ops.verify_chunk: {message}")


@pytest.mark.parametrize("name,value,message", [
    ("tokens", torch.empty(R, K, dtype=torch.int32), "tokens must have shape [3, 3], got [3, 2]"),
    ("accepted", torch.empty(R, dtype=torch.int64), "accepted must have dtype torch.int32, got torch.int64"),
    ("status", torch.empty(R + 1, dtype=torch.int32), "status must have shape [3], got [4]"),
])
def test_out_tensors_are_checked(name, value, message):
    out = dict(tokens=torch.empty(R, K + 1, dtype=torch.int32), accepted=torch.empty(R, dtype=torch.int32),
               emitted=torch.empty(R, dtype=torch.int32), status=torch.empty(R, dtype=torch.int32))
    out[name] = value
    with pytest.raises(ValueError) as err:
        call(good_args(), out)
    assert str(err.value).splitlines()[0] == f"dspark_ops.verify_chunk: {message}"


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature must be finite and >= 0 (0 = greedy), got -1.0"),
    (dict(draft_temperature=float("inf")), "draft_temperature must be finite and >= 0"),
    (dict(top_p=0.0), "top_p must be > 0"),
    (dict(seed=-(1 << 64)), "seed must fit in 64 bits"),
])
def test_wrapper_rejects_bad_scalars(kwargs, message):
    a = good_args()
    with pytest.raises(ValueError) as err:
        dspark_ops.verify_chunk(a["target_logits"], a["draft_tokens"], a["cu_num_draft"], **kwargs)
    assert str(err.value).startswith(f"dspark_ops.verify_chunk: {message}")


def test_wrapper_shape_errors():
    with pytest.raises(ValueError, match="need cu_num_draft"):
        dspark_ops.verify_chunk(torch.randn(4, V), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"padded draft_tokens must have shape \[2, 3\]"):
        dspark_ops.verify_chunk(torch.randn(2, 4, V), torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="takes no cu_num_draft"):
        dspark_ops.verify_chunk(torch.randn(2, 4, V), torch.zeros(2, 3, dtype=torch.int32),
                                torch.tensor([0, 3, 6], dtype=torch.int32))
