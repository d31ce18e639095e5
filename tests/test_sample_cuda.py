"""`sample` on CUDA: identical to the CPU op (DESIGN §2's margin rule), at the
big shapes the CPU suite cannot afford; graph capture; no host sync."""
import pytest
import torch

import dspark_ops
from dspark_ops import Purpose, Status
from helpers import assert_same_tokens, poisoned, random_logits

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
