"""A `.out` form's workspace is checked on the CPU as on CUDA: the same
dtype (uint8), contiguity, byte count and 16-byte alignment, with the same
messages, so an engine developed on the CPU does not first learn of a bad
workspace on a GPU. The CPU ops need no scratch: a workspace of
dspark_ops.workspace_size bytes changes nothing. (tests/test_cuda_emulated.py
compares these messages with the emulated CUDA bindings'.)"""
import re
from typing import Callable, NamedTuple, Optional

import pytest
import torch

import dspark_ops
from test_schedule_verify import random_case
from tree_helpers import max_depth_of, tree_batch
from verify_helpers import ragged_batch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


class ScheduleResult(NamedTuple):
    verify_len: torch.Tensor


class Case(NamedTuple):
    op: str  # the name errors start with
    run: Callable[[Optional[torch.Tensor]], tuple]  # fresh outputs, the given workspace
    size: int  # dspark_ops.workspace_size for the call's sizes
    need: Optional[int]  # the bytes a refusal names (None: below `size`, not given by workspace_size)


def _sample(device):
    R, V = 5, 300
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(R, V, generator=g) * 3).to(device)
    kw = dict(temperature=torch.tensor([0.0, 0.7, 1.0, 1.3, 0.9], device=device), top_k=7, top_p=0.9,
              seed=torch.arange(R, device=device), position=3)

    def run(ws):
        return dspark_ops.sample(logits, out=dspark_ops.empty_sample_result(R, device=device), workspace=ws, **kw)
    size = dspark_ops.workspace_size("sample", num_requests=R, vocab_size=V)
    return Case("dspark_ops.sample", run, size, size)


def _verify_chunk(device):
    lengths, V, K = [3, 0, 2, 1], 257, 3
    target, tokens, cu, dkw = ragged_batch(lengths, V, mode="logits", seed=2, device=device)
    R = len(lengths)
    kw = dict(temperature=torch.tensor([0.0, 1.0, 0.8, 1.2], device=device), top_k=20, top_p=0.9,
              seed=torch.arange(R, device=device), position=5, **dkw)

    def run(ws):
        return dspark_ops.verify_chunk(target, tokens, cu, max_draft=K, out=dspark_ops.empty_verify_result(
            R, K, device=device), workspace=ws, **kw)
    size = dspark_ops.workspace_size("verify_chunk", num_requests=R, vocab_size=V, max_draft=K)
    return Case("dspark_ops.verify_chunk", run, size, size)


def _verify_tree(device, draft="logits"):
    trees = [[-1, 0, 0, 1, 3], [-1], [-1, 0, 1, 0]]
    V = 211
    target, tokens, parents, cu, dkw = tree_batch(trees, V, draft=draft, seed=3, device=device)
    R, D = len(trees), max_depth_of(trees)
    kw = dict(temperature=torch.tensor([0.0, 1.0, 0.9], device=device), top_k=30, top_p=0.95,
              seed=torch.arange(R, device=device), position=1, **dkw)

    def run(ws):
        return dspark_ops.verify_tree(target, tokens, parents, cu, max_depth=D, out=dspark_ops.empty_tree_result(
            R, D, device=device), workspace=ws, **kw)
    # workspace_size counts the draft distribution's row (qv) always: a call with drafts needs exactly that, one
    # without needs less (and the count is not one workspace_size gives).
    size = dspark_ops.workspace_size("verify_tree", num_requests=R, vocab_size=V)
    return Case("dspark_ops.verify_tree", run, size, size if draft is not None else None)


def _markov_draft(device):
    R, G, V, rank = 3, 3, 500, 8
    g = torch.Generator().manual_seed(4)
    base = (torch.randn(R, G, V, generator=g) * 3).to(device)
    w1 = (torch.randint(-8, 9, (V, rank), generator=g) / 16).to(device)
    w2 = (torch.randint(-8, 9, (rank, V), generator=g) / 16).to(device)
    anchor = torch.randint(0, V, (R,), generator=g).to(device)
    kw = dict(temperature=torch.tensor([0.0, 0.9, 1.2], device=device), top_k=25, seed=torch.arange(R, device=device),
              position=2)

    def run(ws):
        out = dspark_ops.MarkovResult(torch.empty(R, G, dtype=torch.int32, device=device),
                                      torch.empty(R, G, V, device=device),
                                      torch.empty(R, dtype=torch.int32, device=device))
        return dspark_ops.markov_draft(base, anchor, w1, w2, out=out, workspace=ws, **kw)
    size = dspark_ops.workspace_size("markov_draft", num_requests=R, vocab_size=V, rank=rank)
    return Case("dspark_ops.markov_draft", run, size, size)


def _schedule_verify(device):
    R, G = 6, 4
    conf, n, sps = random_case(R, G, 5)
    conf, n, sps = conf.to(device), n.to(device), sps.to(device)

    def run(ws):
        out = torch.empty(R, dtype=torch.int32, device=device)
        return ScheduleResult(dspark_ops.schedule_verify(conf, n, sps, mode="early_stop", out=out, workspace=ws))
    size = dspark_ops.workspace_size("schedule_verify", num_requests=R, group=G)
    return Case("dspark_ops.schedule_verify", run, size, size)


CASES = {
    "sample": _sample,
    "verify_chunk": _verify_chunk,
    "verify_tree": _verify_tree,
    "verify_tree_no_draft": lambda device: _verify_tree(device, draft=None),
    "markov_draft": _markov_draft,
    "schedule_verify": _schedule_verify,
}


def bad_workspaces(case: Case, device):
    """(name, workspace, message pattern): each refused by the CPU and CUDA bindings alike."""
    n = case.size
    aligned = torch.empty(n + 64, dtype=torch.uint8, device=device)
    assert aligned.data_ptr() % 16 == 0
    short = rf"must hold at least {case.need} bytes \(dspark_ops\.workspace_size\), got {case.need - 1}$" if case.need \
        else r"must hold at least \d+ bytes \(dspark_ops\.workspace_size\), got 1$"
    return [
        ("too_small", torch.empty(case.need - 1 if case.need else 1, dtype=torch.uint8, device=device), short),
        ("one_byte", torch.empty(1, dtype=torch.uint8, device=device), r"must hold at least \d+ bytes .*, got 1$"),
        ("misaligned", aligned[1:], r"must be 16-byte aligned, got address"),
        ("misaligned_by_8", aligned[8:], r"must be 16-byte aligned, got address"),
        ("wrong_dtype", torch.empty(n // 4 + 1, dtype=torch.float32, device=device),
         r"must have dtype torch.uint8, got torch.float32"),
        ("non_contiguous", torch.empty(2 * n, dtype=torch.uint8, device=device)[::2], r"must be contiguous$"),
    ]


BAD = ["too_small", "one_byte", "misaligned", "misaligned_by_8", "wrong_dtype", "non_contiguous"]


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_bad_workspace_is_refused(op, bad, device):
    case = CASES[op](device)
    _, ws, pattern = next(b for b in bad_workspaces(case, device) if b[0] == bad)
    with pytest.raises(ValueError, match=re.escape(case.op) + ": workspace " + pattern):
        case.run(ws)


@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_sized_workspace_changes_nothing(op, device):
    """A workspace of workspace_size bytes (stale bytes in it), at an aligned
    offset into a larger buffer or with room to spare, gives the results of a
    call without one."""
    case = CASES[op](device)
    want = case.run(None)
    buf = torch.full((case.size + 64,), 0xAB, dtype=torch.uint8, device=device)
    for ws in (buf[:case.size], buf[16:16 + case.size], buf):
        got = case.run(ws)
        for g, w in zip(got, want):
            assert torch.equal(g, w), op
    if case.need is not None:  # exactly the count a refusal names is enough
        case.run(buf[:case.need])


@pytest.mark.parametrize("device", DEVICES)
def test_tree_workspace_with_row_pass_room(device):
    """verify_tree's larger workspace (num_nodes counted: room for the CUDA
    row pass) is accepted too, and changes nothing."""
    case = CASES["verify_tree"](device)
    size = dspark_ops.workspace_size("verify_tree", num_requests=3, vocab_size=211, num_nodes=10)
    assert size > case.size
    for g, w in zip(case.run(torch.empty(size, dtype=torch.uint8, device=device)), case.run(None)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_needs_no_workspace(device):
    """R = 0: the CUDA bindings return before looking at the workspace, and so
    do the CPU ones (any workspace is accepted)."""
    res = dspark_ops.verify_chunk(torch.zeros(0, 5, device=device), torch.zeros(0, dtype=torch.int32, device=device),
                                  torch.zeros(1, dtype=torch.int32, device=device), max_draft=3,
                                  out=dspark_ops.empty_verify_result(0, 3, device=device),
                                  workspace=torch.empty(1, dtype=torch.uint8, device=device))
    assert res.tokens.shape == (0, 4)
    out = torch.empty(0, dtype=torch.int32, device=device)
    dspark_ops.schedule_verify(torch.zeros(0, 4, device=device), torch.zeros(0, dtype=torch.int32, device=device),
                               torch.ones(3, dtype=torch.float64, device=device), out=out,
                               workspace=torch.empty(1, dtype=torch.float32, device=device))


@pytest.mark.cuda
@pytest.mark.parametrize("op", list(CASES))
def test_workspace_on_another_device_is_refused(op):
    case = CASES[op]("cuda")
    with pytest.raises(ValueError, match=re.escape(case.op) + r": workspace must be on cuda:\d+ like logits, got cpu"):
        case.run(torch.empty(case.size, dtype=torch.uint8))


# --- kv_compact: a cache of the wrong rank is named as such ----------------------

def test_kv_compact_three_dim_cache_message():
    """A 3-D cache is reported as one (not as a wrong R in dimension 0,
    which it is not), with or without a block table."""
    R = 2
    base = torch.zeros(R, dtype=torch.int32)
    idx = dict(num_appended=torch.ones(R, dtype=torch.int32), keep_index=torch.zeros(R, 1, dtype=torch.int32),
               num_keep=torch.ones(R, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"caches\[0\] must have 4 dimensions \[R, S, H, D\], got \[2, 16, 8\]"):
        dspark_ops.kv_compact([torch.randn(2, 16, 8)], base, **idx)
    with pytest.raises(ValueError, match=r"caches\[1\] must have 4 dimensions \[R, H, S, D\], got \[2, 4, 1\]"):
        dspark_ops.kv_compact([torch.zeros(2, 1, 4, 1), torch.zeros(2, 4, 1)], base, heads_first=True, **idx)
    with pytest.raises(ValueError, match=r"caches\[0\] must have 4 dimensions \[num_blocks, block_size, H, D\], "
                                         r"got \[3, 4, 1\]"):
        dspark_ops.kv_compact([torch.zeros(3, 4, 1)], base, block_table=torch.zeros(R, 2, dtype=torch.int32), **idx)
    # a 4-D cache of the wrong R still says so
    with pytest.raises(ValueError, match=r"caches\[0\] must have R = 2 requests in dimension 0, got \[3, 4, 1, 1\]"):
        dspark_ops.kv_compact([torch.zeros(3, 4, 1, 1)], base, **idx)
