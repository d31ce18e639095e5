"""`sample` on CUDA: identical to the CPU op (DESIGN §2's margin rule), at the
big shapes the CPU suite cannot afford; graph capture; no host sync."""
import pytest
import torch

import dspark_ops
from dspark_ops import Purpose, Status
from helpers import assert_kernel_launched, assert_same_tokens, off_alignment, poisoned, random_logits

pytestmark = pytest.mark.cuda

MODES = {
    "greedy": dict(temperature=0.0, top_k=0, top_p=1.0),
    "temperature": dict(temperature=0.8, top_k=0, top_p=1.0),
    "top_k": dict(temperature=1.0, top_k=50, top_p=1.0),
    "top_p": dict(temperature=1.1, top_k=0, top_p=0.9),
    "top_k_top_p": dict(temperature=0.7, top_k=5000, top_p=0.95),
}


def compare_with_cpu(logits_cpu, row_start=None, logits_cuda=None, **kw):
    """logits_cuda: the same values on the GPU, e.g. a strided view there."""
    R = row_start.shape[0] if row_start is not None else logits_cpu.shape[0]
    want = dspark_ops.sample(logits_cpu, row_start=row_start, **kw)
    to_dev = lambda v: v.cuda() if isinstance(v, torch.Tensor) else v  # noqa: E731
    out = poisoned(R, device="cuda")
    logits_cuda = logits_cpu.cuda() if logits_cuda is None else logits_cuda
    got = dspark_ops.sample(logits_cuda, row_start=to_dev(row_start), out=out,
                            **{k: to_dev(v) for k, v in kw.items()})
    assert torch.equal(got.status.cpu(), want.status)
    params = {k: kw.get(k, d) for k, d in dict(temperature=1.0, top_k=0, top_p=1.0, seed=0, position=0,
                                                 slot=0).items()}
    params["purpose"] = int(kw.get("purpose", Purpose.DRAFT))
    assert_same_tokens(logits_cpu, got.tokens, want.tokens, row_start=row_start, **params)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab,R", [(1, 3), (7, 64), (1000, 1), (32001, 9), (151936, 1), (151936, 64)])
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_matches_cpu(vocab, R, dtype, mode):
    logits = random_logits(R, vocab, dtype, seed=vocab + R)
    compare_with_cpu(logits, seed=torch.arange(R) * 31 + 7, position=torch.arange(R) + 1000, **MODES[mode])


def test_cuda_large_batch_mixed_parameters():
    R, V = 4096, 1003
    g = torch.Generator().manual_seed(0)
    logits = random_logits(R, V, seed=2)
    temperature = torch.rand(R, generator=g) * 1.5
    temperature[::3] = 0.0
    compare_with_cpu(logits, temperature=temperature,
                     top_k=torch.randint(0, V + 5, (R,), generator=g, dtype=torch.int32),
                     top_p=torch.rand(R, generator=g) * 1.2 + 0.05,
                     seed=torch.randint(-(1 << 62), 1 << 62, (R,), generator=g),
                     position=torch.randint(0, 1 << 40, (R,), generator=g),
                     slot=torch.randint(0, 65536, (R,), generator=g, dtype=torch.int32), purpose=Purpose.EMIT)


def test_cuda_strided_rows_row_start_and_status():
    padded = random_logits(8, 2048, torch.bfloat16, seed=3)
    view = padded[:, :2001]
    bad = view.clone()
    bad[1, 5] = float("nan")
    bad[2] = float("-inf")
    padded_bad = torch.full((8, 2048), 7.0, dtype=torch.bfloat16)
    padded_bad[:, :2001] = bad
    row_start = torch.tensor([0, 1, 2, 9, 3, 3], dtype=torch.int32)
    view_cuda = padded_bad.cuda()[:, :2001]  # strided on the GPU too: row stride 2048
    assert view_cuda.stride(0) == 2048
    got = compare_with_cpu(padded_bad[:, :2001], row_start=row_start, logits_cuda=view_cuda, temperature=0.9,
                           top_p=0.8, seed=4)
    assert got.status.tolist() == [0, Status.NONFINITE_LOGITS, Status.ALL_MASKED, Status.BAD_LENGTHS, 0, 0]


def test_cuda_deterministic_and_batch_invariant():
    R, V = 33, 151936
    logits = random_logits(R, V, torch.bfloat16, seed=5, device="cuda")
    kw = dict(temperature=0.9, top_k=100, top_p=0.9, seed=torch.arange(R, device="cuda"),
              position=torch.full((R,), 77, device="cuda"))
    a, b = dspark_ops.sample(logits, **kw), dspark_ops.sample(logits, **kw)
    assert torch.equal(a.tokens, b.tokens)
    one = dspark_ops.sample(logits[5:6], **{**kw, "seed": kw["seed"][5:6], "position": kw["position"][5:6]})
    assert one.tokens.item() == a.tokens[5].item()


def test_cuda_graph_replay_uses_fresh_seeds_and_no_sync():
    R, V = 16, 32001
    logits = random_logits(R, V, torch.bfloat16, seed=6, device="cuda")
    seed = torch.arange(R, device="cuda")
    position = torch.zeros(R, dtype=torch.int64, device="cuda")
    temperature = torch.full((R,), 0.8, device="cuda")
    top_p = torch.full((R,), 0.9, device="cuda")
    out = dspark_ops.empty_sample_result(R, device="cuda")
    ws = torch.empty(dspark_ops.workspace_size("sample", num_requests=R, vocab_size=V), dtype=torch.uint8,
                     device="cuda")

    def step():
        dspark_ops.sample(logits, temperature=temperature, top_p=top_p, seed=seed, position=position, out=out,
                          workspace=ws)

    step()  # warm-up outside capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()  # any host synchronisation inside the op raises here
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for pos in (3, 4):
        position.fill_(pos)
        graph.replay()
        want = dspark_ops.sample(logits, temperature=temperature, top_p=top_p, seed=seed, position=position)
        assert torch.equal(out.tokens, want.tokens) and torch.equal(out.status, want.status)


def test_cuda_workspace_too_small_is_an_error():
    logits = random_logits(4, 5000, device="cuda")
    out = dspark_ops.empty_sample_result(4, device="cuda")
    with pytest.raises(ValueError, match="workspace must hold at least"):
        dspark_ops.sample(logits, out=out, workspace=torch.empty(8, dtype=torch.uint8, device="cuda"))


def test_cuda_opcheck():
    R, V = 5, 3001
    t = lambda v, d: torch.full((R,), v, dtype=d, device="cuda")  # noqa: E731
    args = (random_logits(R, V, torch.float16, device="cuda"), t(0.9, torch.float32), t(20, torch.int32),
            t(0.8, torch.float32), t(1, torch.int64), t(2, torch.int64), 3, t(0, torch.int32), None)
    torch.library.opcheck(torch.ops.dspark_ops.sample.default, args)
    out = dict(tokens=t(0, torch.int32), status=t(0, torch.int32))
    torch.library.opcheck(torch.ops.dspark_ops.sample.out, args, out)


def test_cuda_empty_batch():
    res = dspark_ops.sample(torch.zeros(0, 10, device="cuda"), temperature=1.0)
    assert res.tokens.shape == (0,)


def test_cuda_misaligned_workspace_is_an_error():
    logits = random_logits(4, 5000, device="cuda")
    out = dspark_ops.empty_sample_result(4, device="cuda")
    need = dspark_ops.workspace_size("sample", num_requests=4, vocab_size=5000)
    buf = torch.empty(need + 16, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="workspace must be 16-byte aligned"):
        dspark_ops.sample(logits, out=out, workspace=buf[1:])
    dspark_ops.sample(logits, out=out, workspace=buf[16:])  # aligned: fine
    torch.cuda.synchronize()


def keys_split_and_one_block(monkeypatch, logits, temperature, top_k, top_p):
    """keep_key on CUDA with the split select (DSPARK_SPLIT_SELECT unset)
    and with one block per row (=0)."""
    got = []
    for flag in (None, "0"):
        if flag is None:
            monkeypatch.delenv("DSPARK_SPLIT_SELECT", raising=False)
        else:
            monkeypatch.setenv("DSPARK_SPLIT_SELECT", flag)
        got.append(torch.ops.dspark_ops.keep_key(logits, temperature, top_k, top_p).cpu())
    monkeypatch.delenv("DSPARK_SPLIT_SELECT")
    return got


def assert_split_select(fn, expected: bool = True) -> None:
    """fn() launches the split select (or, expected=False, does not)."""
    assert_kernel_launched(fn, "split_select_pass_kernel", expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V,R,split", [(7, 3, False), (4095, 6, False), (4096, 6, True), (32001, 8, True),
                                       (151936, 3, True), (151936, 64, True),
                                       pytest.param(32001, 257, False, id="large_batch-32001-257")])
def test_cuda_split_select_keys_equal_one_block(monkeypatch, V, R, split, dtype):
    """The split top-k/top-p select (batches of <= 256 rows of >= 4096
    entries: each row across many blocks, integer histograms) gives the
    one-block select's keys bit for bit: top-k, top-p, both, neither,
    greedy rows (temperature 0 or NaN), k >= V and k < 0 (off), top_p NaN,
    <= 0 or >= 1, ties, a NaN row, an +inf row, an all -inf row, rows off
    the 16-byte boundary; top-k-only keys also equal the CPU op's (counts
    are exact on both)."""
    g = torch.Generator().manual_seed(V * 31 + R)
    logits = (torch.randn(R, V, generator=g) * 3).to(dtype)
    temperature = torch.rand(R, generator=g) + 0.3
    top_k = torch.randint(1, V + 3, (R,), generator=g, dtype=torch.int32)
    top_p = torch.tensor([0.3, 0.9, 1.0, 0.999, 0.5, 0.95] * R)[:R]
    temperature[0] = 0.0  # greedy: key 0
    if R >= 6:
        logits[1] = torch.round(logits[1].float()).to(dtype)  # many ties
        logits[2, V // 2] = float("nan")
        logits[3, 0] = float("inf")
        logits[4] = float("-inf")
        logits[5, :V // 3] = float("-inf")
        top_k[1], top_k[5], top_k[3] = V, -5, 0
        top_p[1], top_p[4], top_p[5] = float("nan"), 0.0, -0.2
        temperature[2] = float("nan")
    dev = off_alignment(logits)
    args = (temperature.cuda(), top_k.cuda(), top_p.cuda())
    monkeypatch.delenv("DSPARK_SPLIT_SELECT", raising=False)
    assert_split_select(lambda: torch.ops.dspark_ops.keep_key(dev, *args), split)
    split_keys, one = keys_split_and_one_block(monkeypatch, dev, *args)
    assert torch.equal(split_keys, one)
    only_k = keys_split_and_one_block(monkeypatch, dev, temperature.cuda(), top_k.cuda(), None)
    want = torch.ops.dspark_ops.keep_key(logits, temperature, top_k, None)
    finite = [r for r in range(R) if R < 6 or r not in (2, 3)]  # NaN bits differ across backends; such rows abort
    assert torch.equal(only_k[0], only_k[1]) and torch.equal(only_k[0][finite], want[finite])
    only_p = keys_split_and_one_block(monkeypatch, dev, temperature.cuda(), None, top_p.cuda())
    assert torch.equal(only_p[0], only_p[1])


@pytest.mark.parametrize("R", [1, 8, 300])
def test_cuda_split_select_sampling_equal_one_block(monkeypatch, R):
    """sample with top-k and top-p: the same tokens and status with the
    split select as with one block per row, which large batches keep."""
    V = 32001
    logits = random_logits(R + 1, V, torch.bfloat16, seed=R, device="cuda")
    temperature = torch.linspace(0.3, 1.5, R, device="cuda")
    temperature[1:2] = 0.0  # a greedy request (R > 1)
    row_start = torch.arange(R, dtype=torch.int32, device="cuda")
    if R > 1:
        row_start[-1] = R + 5  # out of range: BAD_LENGTHS
    kw = dict(temperature=temperature, top_k=torch.randint(0, 100, (R,), device="cuda", dtype=torch.int32),
              top_p=torch.full((R,), 0.9, device="cuda"), seed=torch.arange(R, device="cuda"), position=5,
              row_start=row_start)
    call = lambda: dspark_ops.sample(logits, **kw)  # noqa: E731
    monkeypatch.delenv("DSPARK_SPLIT_SELECT", raising=False)
    assert_split_select(call, R <= 256)
    split = call()
    monkeypatch.setenv("DSPARK_SPLIT_SELECT", "0")
    assert_split_select(call, False)
    one = call()
    assert torch.equal(split.tokens, one.tokens) and torch.equal(split.status, one.status)
    assert R == 1 or int(one.status[-1]) == Status.BAD_LENGTHS
