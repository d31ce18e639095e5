"""verify_chunk on CUDA: identical to the CPU op within DESIGN §2's margin
rule, at the big shapes; graph capture, no host sync, workspace."""
import pytest
import torch

import dspark_ops
from helpers import MARGIN, off_alignment
from verify_helpers import ragged_batch, reference_with_margins

pytestmark = pytest.mark.cuda

MODES = {
    "greedy": dict(temperature=0.0),
    "point_mass": dict(temperature=0.9),
    "probs": dict(temperature=1.0),
    "logits": dict(temperature=0.8),
    "logits_top_k_top_p": dict(temperature=1.1, top_k=50, top_p=0.9),
}


def draft_mode(mode):
    return "probs" if mode.startswith("probs") else "logits" if mode.startswith("logits") else "none"


def to_cuda(v):
    return v.cuda() if isinstance(v, torch.Tensor) else v


def compare_with_cpu(target, tokens, cu, max_draft, **kw):
    want = dspark_ops.verify_chunk(target, tokens, cu, max_draft=max_draft, **kw)
    R = cu.shape[0] - 1
    out = dspark_ops.VerifyResult(torch.full((R, max_draft + 1), 0x5A5A, dtype=torch.int32, device="cuda"),
                                  *(torch.full((R,), 0x5A5A, dtype=torch.int32, device="cuda") for _ in range(3)))
    got = dspark_ops.verify_chunk(target.cuda(), tokens.cuda(), cu.cuda(), max_draft=max_draft, out=out,
                                  **{k: to_cuda(v) for k, v in kw.items()})
    for r in range(R):
        if all(torch.equal(g[r].cpu(), w[r]) for g, w in zip(got, want)):
            continue
        # Explain the difference with the reference on this request alone.
        d0, n = int(cu[r]), int(cu[r + 1] - cu[r])
        one = {k: (v[r:r + 1] if isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == R else v)
               for k, v in kw.items()}
        _, margins = reference_with_margins(target, tokens, torch.tensor([0, n], dtype=torch.int32),
                                            max_draft=max_draft, draft_row_start=torch.tensor([d0], dtype=torch.int32),
                                            target_row_start=torch.tensor([d0 + r], dtype=torch.int32), **one)
        assert margins[0] < MARGIN, f"request {r}: CUDA {[g[r].tolist() for g in got]} vs CPU {[w[r].tolist() for w in want]}"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,lengths", [(7, [3, 0, 5, 1, 2]), (8193, [3, 1]), (32001, [7, 0, 3]), (151936, [7]),
                                       (151936, [7] * 8 + [0, 3, 5])])  # 8193: a last chunk of one entry
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_matches_cpu(V, lengths, dtype, mode):
    target, tokens, cu, kw = ragged_batch(lengths, V, dtype, mode=draft_mode(mode), seed=V + len(lengths), scale=4.0)
    R = len(lengths)
    compare_with_cpu(target, tokens, cu, max(lengths), seed=torch.arange(R) + 3, position=torch.arange(R) * 9,
                     **kw, **MODES[mode])


def test_cuda_float32_draft_probs_with_bf16_target():
    target, tokens, cu, kw = ragged_batch([4, 2, 6], 5003, torch.bfloat16, mode="probs", seed=2)
    compare_with_cpu(target, tokens, cu, 6, draft_probs=kw["draft_probs"].float(), seed=1)


def test_cuda_large_batch_mixed():
    R, V = 1024, 97
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 8, (R,), generator=g).tolist()
    target, tokens, cu, kw = ragged_batch(lengths, V, mode="logits", seed=4)
    temperature = torch.rand(R, generator=g) + 0.2
    temperature[::4] = 0.0
    compare_with_cpu(target, tokens, cu, 7, temperature=temperature, top_k=torch.randint(0, 20, (R,), generator=g,
                     dtype=torch.int32), top_p=torch.rand(R, generator=g) + 0.3, seed=torch.arange(R), position=5,
                     **kw)


def test_cuda_strided_rows_and_status():
    target, tokens, cu, kw = ragged_batch([3, 2, 2], 3001, torch.bfloat16, mode="probs", seed=5)
    target[0, 7] = float("nan")  # request 0, row 0: always needed
    padded = torch.zeros(target.shape[0], 3072, dtype=torch.bfloat16, device="cuda")
    padded[:, :3001] = target.cuda()
    view = padded[:, :3001]
    assert view.stride(0) == 3072
    want = dspark_ops.verify_chunk(target, tokens, cu, seed=3, **kw)
    got = dspark_ops.verify_chunk(view, tokens.cuda(), cu.cuda(), seed=3, draft_probs=kw["draft_probs"].cuda())
    assert torch.equal(got.status.cpu(), want.status) and want.status[0] != 0


def greedy_edge_batch(dtype):
    """Ties to the lower index (+0 and -0 too) on an accepted path, a NaN, a
    +inf and an all -inf first row, odd V."""
    V, lengths = 1031, [3, 2, 4, 1, 3, 2]  # request r's rows start at cu[r] + r: 0, 4, 7, 12, 14, 18
    target, tokens, cu, _ = ragged_batch(lengths, V, dtype, mode="none", seed=17, scale=3.0)
    target[0, 100] = target[0, 900] = float(target[0].float().max()) + 1  # a tie: index 100 wins
    target[1] = 0.0
    target[1, :500] = -0.0  # +0 and -0 tie everywhere: index 0 wins
    tokens[0], tokens[1] = 100, 0  # request 0 accepts both drafts, so its rows 1 and 2 are read
    target[4, 3] = float("nan")  # request 1's first row: NONFINITE_LOGITS
    target[7, 5] = float("inf")  # request 2's first row: NONFINITE_LOGITS
    target[12] = float("-inf")  # request 3's only needed row: ALL_MASKED
    return target, tokens, cu, max(lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_greedy_rows_edge_cases(dtype):
    """Greedy requests take their own one-block-per-row kernel (16-byte loads
    after an unaligned head): the edge cases above, mixed with a sampled
    request, and again with every row starting off a 16-byte boundary."""
    target, tokens, cu, K = greedy_edge_batch(dtype)
    temperature = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.7, 0.0])
    compare_with_cpu(target, tokens, cu, K, temperature=temperature, seed=torch.arange(6),
                     position=torch.arange(6) * 3)
    want = dspark_ops.verify_chunk(target, tokens, cu, max_draft=K, temperature=0.0)
    got = dspark_ops.verify_chunk(off_alignment(target), tokens.cuda(), cu.cuda(), max_draft=K, temperature=0.0)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
    bad, masked = int(dspark_ops.Status.NONFINITE_LOGITS), int(dspark_ops.Status.ALL_MASKED)
    assert int(want.accepted[0]) >= 2 and int(want.status[1]) & bad and int(want.status[2]) & bad
    assert int(want.status[3]) & masked


def rare_from_p_batch(V, dtype, mode):
    """Draft-distribution requests reaching rows that emit a token drawn
    from p_j itself. Row 0 accepts for certain (q_0 = p_0 at temperature 1,
    the drafted token its argmax), so these paths sit at j = 1 (pass 2 reads
    row t0 + 1): request 0 a draft token out of range (raced in pass 1),
    request 1 a drafted token with q = 0 (raced lazily in pass 2), requests
    2.. (draft probs only) q_1 = min(1, 2 p_1) at the argmax of p_1, so a
    rejection leaves no residual mass (the lazy race is the fallback); the
    last request has q = 0 at j = 0."""
    R = 3 + (12 if mode == "probs" else 0)
    target, tokens, cu, kw = ragged_batch([3] * R, V, dtype, mode=mode, seed=V + 11, scale=3.0)
    draft = kw["draft_probs" if mode == "probs" else "draft_logits"]
    p = torch.softmax(target.float(), -1)  # request r's row j is target row 4 r + j, draft row 3 r + j
    for r in range(R - 1):
        tokens[3 * r] = int(p[4 * r].argmax())
        draft[3 * r] = p[4 * r] if mode == "probs" else target[4 * r]
    tokens[1] = V
    tokens[4] = 5
    tokens[3 * (R - 1)] = 7
    for row, tok in ((4, 5), (3 * (R - 1), 7)):
        draft[row, tok] = 0.0 if mode == "probs" else float("-inf")
    for r in range(2, R - 1):  # probs only
        tokens[3 * r + 1] = int(p[4 * r + 1].argmax())
        draft[3 * r + 1] = (2 * p[4 * r + 1]).clamp(max=1.0)
    return target, tokens, cu, kw


@pytest.mark.parametrize("V", [1031, 32001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["probs", "logits"])
def test_cuda_rare_emits_from_p_before_the_last_row(V, dtype, mode):
    """Rows before a draft-distribution request's last race p only where
    their token is out of range; their rare emits from p_j (q = 0, an empty
    residual) race lazily in the residual pass, and must give the CPU op's
    tokens."""
    target, tokens, cu, kw = rare_from_p_batch(V, dtype, mode)
    R = cu.shape[0] - 1
    args = dict(temperature=1.0, seed=torch.arange(R) + 1, position=torch.arange(R) * 5, **kw)
    want = dspark_ops.verify_chunk(target, tokens, cu, max_draft=3, **args)
    flag = dspark_ops.Status
    assert want.status[[0, 1, R - 1]].tolist() == [int(flag.TOKEN_OUT_OF_RANGE), int(flag.DRAFT_PROB_ZERO),
                                                     int(flag.DRAFT_PROB_ZERO)]
    assert want.accepted[[0, 1, R - 1]].tolist() == [1, 1, 0]
    if mode == "probs":  # some rejections at j = 1 with no residual mass: a token from p_1
        assert int((want.accepted[2:R - 1] == 1).sum()) >= 2
    compare_with_cpu(target, tokens, cu, 3, **args)
    compare_with_cpu(target, tokens, cu, 3, **{**args, "top_k": 20})


def test_cuda_graph_replay_no_sync_no_allocation():
    B, K, V = 8, 7, 32000
    target = torch.randn(B, K + 1, V, device="cuda", dtype=torch.bfloat16)
    drafts = torch.randint(0, V, (B, K), device="cuda", dtype=torch.int32)
    probs = torch.softmax(torch.randn(B, K, V, device="cuda"), -1)
    seed = torch.arange(B, device="cuda")
    position = torch.zeros(B, dtype=torch.int64, device="cuda")
    out = dspark_ops.empty_verify_result(B, K, device="cuda")
    ws = torch.empty(dspark_ops.workspace_size("verify_chunk", num_requests=B, vocab_size=V, max_draft=K),
                     dtype=torch.uint8, device="cuda")

    def step():
        dspark_ops.verify_chunk(target, drafts, draft_probs=probs, seed=seed, position=position, out=out,
                                workspace=ws)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for pos in (100, 101):
        position.fill_(pos)
        graph.replay()
        want = dspark_ops.verify_chunk(target, drafts, draft_probs=probs, seed=seed, position=position)
        assert all(torch.equal(a, b) for a, b in zip(out, want))


def test_cuda_deterministic_run_to_run():
    target, tokens, cu, kw = ragged_batch([7] * 16, 151936, torch.bfloat16, mode="logits", seed=8, device="cuda")
    a = dspark_ops.verify_chunk(target, tokens, cu, seed=2, top_p=0.95, **kw)
    b = dspark_ops.verify_chunk(target, tokens, cu, seed=2, top_p=0.95, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_cuda_opcheck():
    target, tokens, cu, kw = ragged_batch([2, 0, 3], 300, mode="probs", seed=8, device="cuda")
    t = lambda v, d: torch.full((3,), v, dtype=d, device="cuda")  # noqa: E731
    args = (target, tokens, cu, 3, kw["draft_probs"], None, t(1.0, torch.float32), t(0.9, torch.float32),
            t(10, torch.int32), None, t(1, torch.int64), t(2, torch.int64), None, None)
    torch.library.opcheck(torch.ops.dspark_ops.verify_chunk.default, args)


def keys_and_outputs(monkeypatch, flag, dev, args, R, K, V):
    """verify_chunk's .out form with DSPARK_SPLIT_SELECT=flag (None: unset)
    and a 0xFF-filled workspace: (its keep keys [R * (K + 1)] int32 -- the
    workspace's first region -- and the outputs), on the host."""
    if flag is None:
        monkeypatch.delenv("DSPARK_SPLIT_SELECT", raising=False)
    else:
        monkeypatch.setenv("DSPARK_SPLIT_SELECT", flag)
    ws = torch.full((dspark_ops.workspace_size("verify_chunk", num_requests=R, vocab_size=V, max_draft=K),), 0xFF,
                    dtype=torch.uint8, device="cuda")
    out = dspark_ops.empty_verify_result(R, K, device="cuda")
    dspark_ops.verify_chunk(*dev, out=out, workspace=ws, **args)
    return ws[:4 * R * (K + 1)].view(torch.int32).cpu(), [t.cpu() for t in out]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V,lengths", [(32001, [7]), (151936, [7, 0, 3, 5]), (5000, [2] * 40)])
def test_cuda_split_select_equals_one_block(monkeypatch, V, lengths, dtype):
    """Small batches find their top-k/top-p keys with the split select
    (every row across many blocks): the keys verify_chunk computes (read
    from its workspace) equal one block per row's (DSPARK_SPLIT_SELECT=0)
    and keep_key's on each request's target rows j <= n_r (0 for greedy,
    padding and aborted requests), with target_row_start permuted and one
    start out of range; the outputs are the same too."""
    from test_sample_cuda import assert_split_select
    target, tokens, cu, kw = ragged_batch(lengths, V, dtype, "logits", seed=V + len(lengths))
    R, K = len(lengths), max(lengths)
    g = torch.Generator().manual_seed(R)
    top_k = torch.randint(1, 200, (R,), generator=g, dtype=torch.int32)
    top_k[::3] = V
    top_p = torch.full((R,), 0.9)
    top_p[1::4] = 1.0
    temperature = torch.rand(R, generator=g) + 0.4
    temperature[2::5] = 0.0
    # each request's n_r + 1 target rows, laid out in reverse request order; the last request's start out of range
    n = torch.tensor(lengths)
    starts = torch.zeros(R, dtype=torch.int32)
    at = 0
    for r in reversed(range(R)):
        starts[r] = at
        at += int(n[r]) + 1
    if R > 1:
        starts[-1] = target.shape[0]
    args = dict(max_draft=K, temperature=temperature.cuda(), top_k=top_k.cuda(), top_p=top_p.cuda(),
                seed=torch.arange(R).cuda(), position=9, target_row_start=starts.cuda(),
                **{k: to_cuda(v) for k, v in kw.items()})
    dev = (target.cuda(), tokens.cuda(), cu.cuda())
    monkeypatch.delenv("DSPARK_SPLIT_SELECT", raising=False)
    assert_split_select(lambda: dspark_ops.verify_chunk(*dev, **args))
    split_keys, split = keys_and_outputs(monkeypatch, None, dev, args, R, K, V)
    one_keys, one = keys_and_outputs(monkeypatch, "0", dev, args, R, K, V)
    assert torch.equal(split_keys, one_keys)
    for name, a, b in zip(dspark_ops.VerifyResult._fields, split, one):
        assert torch.equal(a, b), f"{name}: split select {a.tolist()} vs one block a row {b.tolist()}"
    assert R == 1 or int(one[3][-1]) == dspark_ops.Status.BAD_LENGTHS
    # keep_key (one block a row) on the rows each request's keys belong to
    want = torch.zeros(R * (K + 1), dtype=torch.int32)
    rows, owner = [], []
    for r in range(R - 1 if R > 1 else R):  # the last of several aborted: its keys stay 0
        if temperature[r] > 0:
            for j in range(int(n[r]) + 1):
                rows.append(int(starts[r]) + j)
                owner.append((r, j))
    if rows:
        idx = torch.tensor([r for r, _ in owner])
        keys = torch.ops.dspark_ops.keep_key(target.cuda()[torch.tensor(rows).cuda()], temperature[idx].cuda(),
                                             top_k[idx].cuda(), top_p[idx].cuda()).cpu()
        for (r, j), key in zip(owner, keys.view(torch.int32)):
            want[r * (K + 1) + j] = key
    assert torch.equal(split_keys, want)
