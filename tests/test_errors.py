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
    "logits dtype": (dict(logits=torch.randint(0, 5, (R, V))), "logits must have dtype float32, float16 or bfloat16, got torch.int64"),
    "logits rank": (dict(logits=torch.randn(R, V, 2)), "logits must have shape [rows, V], got [4, 50, 2]"),
    "logits empty V": (dict(logits=torch.randn(R, 0)), "logits must have V >= 1, got [4, 0]"),
    "logits strides": (dict(logits=torch.randn(V, R).t()), "logits must be contiguous in its last dimension, got strides [1, 4]"),
    "temperature dtype": (dict(temperature=torch.ones(R, dtype=torch.float64)), "temperature must have dtype torch.float32, got torch.float64"),
    "temperature shape": (dict(temperature=torch.ones(3)), "temperature must have shape [4] or [1], got [3]"),
    "top_k dtype": (dict(top_k=torch.ones(R, dtype=torch.int64)), "top_k must have dtype torch.int32, got torch.int64"),
    "top_p shape": (dict(top_p=torch.ones(R, 1)), "top_p must have shape [4] or [1], got [4, 1]"),
    "seed dtype": (dict(seed=torch.ones(R, dtype=torch.int32)), "seed must have dtype torch.int64, got torch.int32"),
    "position shape": (dict(position=torch.ones(5, dtype=torch.int64)), "position must have shape [4] or [1], got [5]"),
    "slot dtype": (dict(slot=torch.ones(R)), "slot must have dtype torch.int32, got torch.float32"),
    "row_start dtype": (dict(row_start=torch.zeros(R, dtype=torch.int64)), "row_start must have dtype torch.int32, got torch.int64"),
    "purpose": (dict(purpose=7), "purpose must be 1 (COIN), 2 (EMIT) or 3 (DRAFT), got 7"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cpp_and_fake_raise_the_same_message(case):
    change, message = BAD[case]
    assert_cpp_and_fake_agree(call, {**good_args(), **change}, f"dspark_ops.sample: {message}")


@pytest.mark.parametrize("name,value,message", [
    ("tokens", torch.empty(3, dtype=torch.int32), "tokens must have shape [4], got [3]"),
    ("status", torch.empty(R, dtype=torch.int64), "status must have dtype torch.int32, got torch.int64"),
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
    (dict(temperature=[0.0, 0.7, 1.0, 1.0]), "temperature must be a number or a torch.Tensor [R] or [1], got list"),
    (dict(seed=[1, 2, 3, 4]), "seed must be a number or a torch.Tensor [R] or [1], got list"),
    (dict(top_p="0.9"), "top_p must be a number or a torch.Tensor [R] or [1], got str"),
    (dict(top_k=1.5), "top_k must be an integer, got 1.5"),
    (dict(top_k=torch.full((R,), 2.0)), "top_k must have an integer dtype, got torch.float32"),
    (dict(seed=torch.tensor([1.5])), "seed must have an integer dtype, got torch.float32"),
    (dict(purpose="SOMETHING"), "purpose must be 1 (COIN), 2 (EMIT) or 3 (DRAFT), got SOMETHING"),
])
def test_wrapper_rejects_bad_scalars(kwargs, message):
    with pytest.raises(ValueError) as err:
        dspark_ops.sample(torch.randn(R, V), **kwargs)
    assert str(err.value).startswith(f"dspark_ops.sample: {message}")


def test_wrapper_accepts_equivalent_spellings():
    """0-d tensors, numpy scalars, integral floats and purpose names mean
    what they say; an int64 top_k past int32 saturates (off), never wraps."""
    np = pytest.importorskip("numpy")
    logits = torch.randn(R, V)
    want = dspark_ops.sample(logits, temperature=0.7, top_k=5, seed=3, position=2, purpose=2).tokens
    for kw in (dict(temperature=torch.tensor(0.7), top_k=torch.tensor(5), seed=torch.tensor(3), position=2),
               dict(temperature=np.float32(0.7), top_k=np.int64(5), seed=np.int32(3), position=2.0),
               dict(temperature=0.7, top_k=5.0, seed=3, position=torch.tensor(2)),
               dict(temperature=np.array(0.7), top_k=np.array(5), seed=3, position=2)):
        assert torch.equal(dspark_ops.sample(logits, purpose="emit", **kw).tokens, want), kw
    flat = -0.01 * torch.arange(V, dtype=torch.float32).expand(64, V).contiguous()  # top-5 = tokens 0..4
    seeds = torch.arange(64)
    off = dspark_ops.sample(flat, seed=seeds).tokens
    assert int(off.max()) >= 5 and int(dspark_ops.sample(flat, top_k=5, seed=seeds).tokens.max()) < 5
    huge = torch.full((64,), (1 << 32) + 5, dtype=torch.int64)  # wrapped to int32 this would be top-k 5
    assert torch.equal(dspark_ops.sample(flat, top_k=huge, seed=seeds).tokens, off)


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
    for op, sizes, missing in (("sample", dict(num_requests=1), "vocab_size"),
                               ("verify_chunk", dict(num_requests=1, vocab_size=9), "max_draft"),
                               ("verify_tree", dict(vocab_size=9), "num_requests"),
                               ("markov_draft", dict(num_requests=1, vocab_size=9), "rank"),
                               ("schedule_verify", dict(num_requests=4), "group")):
        with pytest.raises(ValueError, match=f"'{op}' needs {missing}$"):
            dspark_ops.workspace_size(op, **sizes)


def test_a_workspace_without_out_gives_the_functional_results():
    """workspace= alone: fresh outputs, the caller's scratch; same results."""
    from verify_helpers import ragged_batch
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(R, V, generator=g)
    ws = lambda op, **s: torch.empty(dspark_ops.workspace_size(op, **s), dtype=torch.uint8)  # noqa: E731
    a = dspark_ops.sample(logits, top_k=7, seed=2)
    b = dspark_ops.sample(logits, top_k=7, seed=2, workspace=ws("sample", num_requests=R, vocab_size=V))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    target, tokens, cu, kw = ragged_batch([2, 0, 3], 30, mode="probs", seed=8)
    a = dspark_ops.verify_chunk(target, tokens, cu, seed=3, **kw)
    b = dspark_ops.verify_chunk(target, tokens, cu, seed=3, **kw,
                                workspace=ws("verify_chunk", num_requests=3, vocab_size=30, max_draft=3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    conf = torch.rand(2, 3, generator=g)
    nd = torch.tensor([3, 2], dtype=torch.int32)
    sps = torch.tensor([0.0, 1.0, 1.9, 2.7, 3.4, 4.0, 4.5, 4.9], dtype=torch.float64)
    a = dspark_ops.schedule_verify(conf, nd, sps)
    b = dspark_ops.schedule_verify(conf, nd, sps, workspace=ws("schedule_verify", num_requests=2, group=3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", ["small", "dtype", "strided"])
def test_fake_kernels_check_a_workspace_as_the_op_does(bad):
    """sample.out / verify_chunk.out / schedule_verify.out under FakeTensorMode
    (torch.compile's tracing) refuse the workspace the C++ op refuses, with its
    message (alignment needs an address: the op checks it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from verify_helpers import ragged_batch
    g = torch.Generator().manual_seed(3)
    target, tokens, cu, kw = ragged_batch([2, 1], 30, mode="probs", seed=2)
    one = lambda v, d, n: torch.full((n,), v, dtype=d)  # noqa: E731
    conf, nd = torch.rand(2, 3, generator=g), torch.tensor([3, 2], dtype=torch.int32)
    sps = torch.linspace(0, 8, 9, dtype=torch.float64)
    cases = {
        "sample": (lambda a: torch.ops.dspark_ops.sample.out(
            a["logits"], one(1.0, torch.float32, R), None, None, one(1, torch.int64, R), one(0, torch.int64, R), 3,
            one(0, torch.int32, R), None, tokens=a["tokens"], status=a["status"], workspace=a["ws"]),
            dict(logits=torch.randn(R, V, generator=g), tokens=one(0, torch.int32, R),
                 status=one(0, torch.int32, R)), dspark_ops.workspace_size("sample", num_requests=R, vocab_size=V)),
        "verify_chunk": (lambda a: torch.ops.dspark_ops.verify_chunk.out(
            a["target"], a["draft_tokens"], a["cu"], 2, a["probs"], None, one(1.0, torch.float32, 2),
            one(1.0, torch.float32, 2), None, None, one(1, torch.int64, 2), one(0, torch.int64, 2), None, None,
            tokens=a["tok"], accepted=a["acc"], emitted=a["emi"], status=a["st"], workspace=a["ws"]),
            dict(target=target, draft_tokens=tokens, cu=cu, probs=kw["draft_probs"],
                 tok=torch.zeros(2, 3, dtype=torch.int32), acc=one(0, torch.int32, 2), emi=one(0, torch.int32, 2),
                 st=one(0, torch.int32, 2)),
            dspark_ops.workspace_size("verify_chunk", num_requests=2, vocab_size=30, max_draft=2)),
        "schedule_verify": (lambda a: torch.ops.dspark_ops.schedule_verify.out(
            a["conf"], a["nd"], a["sps"], "early_stop", float("nan"), None, None, verify_len=a["out"],
            workspace=a["ws"]),
            dict(conf=conf, nd=nd, sps=sps, out=one(0, torch.int32, 2)),
            dspark_ops.workspace_size("schedule_verify", num_requests=2, group=3)),
    }
    for name, (call, args, need) in cases.items():
        ws = {"small": torch.empty(need - 1, dtype=torch.uint8), "dtype": torch.empty(need, dtype=torch.float32),
              "strided": torch.empty(2 * need, dtype=torch.uint8)[::2]}[bad]
        assert_cpp_and_fake_agree(call, {**args, "ws": ws}, {
            "small": f"dspark_ops.{name}: workspace must hold at least {need} bytes (dspark_ops.workspace_size), "
                     f"got {need - 1}",
            "dtype": f"dspark_ops.{name}: workspace must have dtype torch.uint8, got torch.float32",
            "strided": f"dspark_ops.{name}: workspace must be contiguous"}[bad])


def test_an_int64_slot_past_int32_is_out_of_range_not_wrapped():
    """slot 2**32 + 5 saturates (BAD_LENGTHS, as any slot > 65535), it does
    not become slot 5."""
    logits = torch.randn(2, V)
    res = dspark_ops.sample(logits, seed=1, slot=torch.tensor([5, (1 << 32) + 5]))
    assert res.status.tolist() == [0, dspark_ops.Status.BAD_LENGTHS] and res.tokens[1] == -1
