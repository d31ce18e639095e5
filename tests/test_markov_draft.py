"""markov_draft: DSpark's Markov-head block sampler (DESIGN §3)."""
import os
import subprocess
import sys

import pytest
import torch

import dspark_ops
from dspark_ops import Purpose, Status
from dspark_ops import reference as ref
from helpers import MARGIN, chi_square_pvalue

MODES = {"greedy": dict(temperature=0.0), "temperature": dict(temperature=0.8),
         "top_k_top_p": dict(temperature=1.2, top_k=7, top_p=0.8)}


def head(R, G, V, r, dtype=torch.float32, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(R, G, V, generator=g) * scale).to(dtype), torch.randint(0, V, (R,), generator=g),
            torch.randn(V, r, generator=g) * 0.5, torch.randn(r, V, generator=g) * 0.5)


def assert_matches_reference(got, want, kw, seed, position):
    """Same tokens up to a first difference that the margin rule explains;
    written logits equal up to the last bit of the output dtype before it."""
    tokens, logits, status = want
    R, G, V = logits.shape
    for r in range(R):
        for k in range(G):
            a, b = int(got.tokens[r, k]), int(tokens[r, k])
            x = logits[r, k].float()
            ours = got.draft_logits[r, k].float()
            # The same masked (-inf) entries: top-k/top-p, stopped or aborted requests.
            assert torch.equal(torch.isneginf(ours), torch.isneginf(x)), f"request {r} step {k + 1}: masks differ"
            finite = torch.isfinite(x) & torch.isfinite(ours)
            assert torch.allclose(ours[finite], x[finite], rtol=2 ** -7 if logits.dtype != torch.float32 else 1e-5,
                                  atol=1e-5)
            if a == b:
                continue
            # A different draw must be a near-tie of the race on the reference's row.
            T = float(torch.as_tensor(kw.get("temperature", 1.0)))
            _, _, scores = ref.sample_row(x, temperature=1.0 if T > 0 else 0.0, top_k=0, top_p=1.0, seed=seed,
                                          position=position, purpose=int(Purpose.DRAFT), slot=k + 1)
            gap = abs(float(scores[a]) - float(scores[b])) if a >= 0 and b >= 0 else float("inf")
            assert gap <= MARGIN * max(1.0, abs(float(scores[b]))), f"request {r} step {k + 1}: {a} vs {b}"
            break  # later steps condition on a different token
        else:
            assert int(got.status[r]) == int(status[r])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_reference(dtype, mode):
    U, anchor, w1, w2 = head(5, 4, 301, 16, dtype, seed=3)
    n = torch.tensor([4, 0, 2, 4, 3], dtype=torch.int32)
    got = dspark_ops.markov_draft(U, anchor, w1, w2, seed=9, position=40, num_draft=n, **MODES[mode])
    want = ref.markov_draft(U, anchor, w1, w2, seed=9, position=40, num_draft=n, **MODES[mode])
    assert_matches_reference(got, want, MODES[mode], 9, 40)
    assert got.tokens[1].tolist() == [-1] * 4 and bool((got.draft_logits[1] == float("-inf")).all())


def test_greedy_equals_the_obvious_loop():
    U, anchor, w1, w2 = head(3, 5, 97, 8, seed=4)
    res = dspark_ops.markov_draft(U, anchor, w1, w2, temperature=0.0)
    prev = anchor.clone()
    for k in range(5):
        z = U[:, k] + w1[prev] @ w2
        assert torch.equal(res.tokens[:, k].long(), z.argmax(-1))
        assert torch.allclose(res.draft_logits[:, k], z, atol=1e-5)
        prev = z.argmax(-1)


def test_first_token_follows_the_processed_corrected_distribution():
    N, V, r = 20000, 8, 4
    U, _, w1, w2 = head(1, 2, V, r, seed=5, scale=1.0)
    anchor = torch.full((N,), 2)
    res = dspark_ops.markov_draft(U.expand(N, 2, V).contiguous(), anchor, w1, w2, temperature=0.9, top_k=5,
                                  top_p=0.9, seed=3, position=torch.arange(N))
    x = ((U[0, 0].double() + w1[2].double() @ w2.double()).float() / torch.tensor(0.9)).float()
    keep = ref.topp_keep(x, ref.topk_keep(x, 5), 0.9)
    p = torch.where(keep, torch.softmax(x.double(), 0), torch.zeros((), dtype=torch.float64))
    p = p / p.sum()
    assert chi_square_pvalue(res.tokens[:, 0].long(), p) > 1e-3


def markov_then_verify(dtype, temperature, top_k=0, greedy_share=0.0, N=20000, V=6, G=2):
    """Target rows fixed (they do not depend on the prefix in this synthetic
    setup); drafts from markov_draft; verification of its draft_logits in
    place. Returns the first two emitted tokens and accepted counts."""
    g = torch.Generator().manual_seed(6)
    target = torch.randn(G + 1, V, generator=g)
    U = torch.randn(1, G, V, generator=g)
    w1, w2 = torch.randn(V, 3, generator=g), torch.randn(3, V, generator=g)
    temps = torch.full((N,), float(temperature))
    temps[: int(N * greedy_share)] = 0.0
    res = dspark_ops.markov_draft(U.expand(N, G, V).to(dtype).contiguous(), torch.full((N,), 1), w1, w2,
                                  temperature=temps, top_k=top_k, seed=11, position=torch.arange(N))
    cu = torch.arange(N + 1, dtype=torch.int32) * G
    ver = dspark_ops.verify_chunk(target.to(dtype), res.tokens.reshape(-1), cu, max_draft=G,
                                  draft_logits=res.draft_logits.reshape(N * G, V), draft_temperature=(temps > 0).float(),
                                  target_row_start=torch.zeros(N, dtype=torch.int32), temperature=1.0, seed=12,
                                  position=torch.arange(N))
    assert int(ver.status.max()) == 0
    p = [ref.target_distribution(target[j].to(dtype).float(), 1.0, 0, 1.0)[1] for j in range(2)]
    return ver.tokens.long(), ver.accepted, p


@pytest.mark.parametrize("dtype,temperature,top_k,greedy_share", [(torch.float32, 1.0, 0, 0.0),
                                                                   (torch.bfloat16, 0.7, 0, 0.0),
                                                                   (torch.float32, 1.0, 3, 0.0),
                                                                   (torch.float32, 1.0, 0, 0.5)])
def test_markov_draft_then_verify_chunk_is_lossless(dtype, temperature, top_k, greedy_share):
    tokens, accepted, p = markov_then_verify(dtype, temperature, top_k, greedy_share)
    assert chi_square_pvalue(tokens[:, 0], p[0]) > 1e-3
    second = tokens[accepted >= 1, 1]
    assert second.numel() > 1000 and chi_square_pvalue(second, p[1]) > 1e-3


def test_negative_control_raw_logits_passed_as_the_draft_distribution():
    # Verifying against the unprocessed corrected logits (not what was sampled
    # from: top-k applied) must be caught.
    N, V, G = 20000, 6, 1
    g = torch.Generator().manual_seed(7)
    target = torch.randn(2, V, generator=g)
    U = torch.randn(1, G, V, generator=g) * 2
    w1, w2 = torch.zeros(V, 2), torch.zeros(2, V)
    res = dspark_ops.markov_draft(U.expand(N, G, V).contiguous(), torch.zeros(N, dtype=torch.int64), w1, w2,
                                  temperature=1.0, top_k=2, seed=1, position=torch.arange(N))
    raw = U.expand(N, G, V).reshape(N, V).contiguous()
    ver = dspark_ops.verify_chunk(target, res.tokens.reshape(-1), torch.arange(N + 1, dtype=torch.int32),
                                  max_draft=1, draft_logits=raw, target_row_start=torch.zeros(N, dtype=torch.int32),
                                  seed=2, position=torch.arange(N))
    p0 = ref.target_distribution(target[0], 1.0, 0, 1.0)[1]
    assert chi_square_pvalue(ver.tokens[:, 0].long(), p0) < 1e-6


def test_status_bits():
    U, _, w1, w2 = head(3, 3, 20, 4, seed=8)
    U = U.clone()
    U[1, 1, 4] = float("nan")  # request 1 aborts at step 2
    res = dspark_ops.markov_draft(U, torch.tensor([0, 1, 20]), w1, w2, temperature=1.0, seed=1)
    assert res.status.tolist() == [0, Status.NONFINITE_LOGITS, Status.TOKEN_OUT_OF_RANGE]
    assert res.tokens[1, 0] >= 0 and res.tokens[1, 1:].tolist() == [-1, -1] and res.tokens[2].tolist() == [-1] * 3


def test_errors():
    U, anchor, w1, w2 = head(2, 3, 10, 4)
    with pytest.raises(ValueError, match=r"w1 must be \[V, r\] and w2 \[r, V\]"):
        dspark_ops.markov_draft(U, anchor, w1[:, :3], w2)
    with pytest.raises(ValueError, match=r"anchor must have shape \[2\]"):
        dspark_ops.markov_draft(U, anchor[:1], w1, w2)
    with pytest.raises(ValueError, match="temperature must be finite"):
        dspark_ops.markov_draft(U, anchor, w1, w2, temperature=-1.0)


def test_keep_key_opcheck_and_compile():
    x = torch.randn(4, 40)
    t = torch.ones(4)
    torch.library.opcheck(torch.ops.dspark_ops.keep_key.default, (x, t, torch.full((4,), 5, dtype=torch.int32), None))
    U, anchor, w1, w2 = head(2, 3, 40, 4)

    def draft(u, a):
        return dspark_ops.markov_draft(u, a, w1, w2, temperature=0.8, top_k=5, seed=1, position=3)

    got = torch.compile(draft, fullgraph=True, backend="aot_eager")(U, anchor)
    want = draft(U, anchor)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.draft_logits, want.draft_logits)


def op_args(R=3, G=4, V=53, r=6, dtype=torch.bfloat16, seed=11, device="cpu"):
    """Raw op arguments with per-request parameters: greedy, plain and
    filtered requests side by side, and a num_draft that stops some early."""
    U, anchor, w1, w2 = head(R, G, V, r, dtype, seed=seed)
    temps = torch.tensor([0.0, 0.8, 1.1] * R)[:R]
    top_k = torch.tensor([0, 5, 9] * R, dtype=torch.int32)[:R]
    n = torch.tensor([G, 2, 0] * R, dtype=torch.int32)[:R]
    args = (U, anchor.long(), w1, w2, temps, top_k, torch.full((1,), 0.9), torch.arange(R), torch.full((R,), 7), n)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def test_opcheck_both_forms():
    args = op_args()
    U = args[0]
    R, G, V = U.shape
    torch.library.opcheck(torch.ops.dspark_ops.markov_draft.default, args)
    out = dict(tokens=torch.empty(R, G, dtype=torch.int32), draft_logits=torch.empty(R, G, V, dtype=U.dtype),
               status=torch.empty(R, dtype=torch.int32))
    torch.library.opcheck(torch.ops.dspark_ops.markov_draft.out, args, out)
    ws = torch.empty(dspark_ops.workspace_size("markov_draft", num_requests=R, vocab_size=V, rank=args[2].shape[1]),
                     dtype=torch.uint8)
    torch.library.opcheck(torch.ops.dspark_ops.markov_draft.out, args, {**out, "workspace": ws})


def test_workspace_size_covers_the_cuda_scratch():
    """The .out form's workspace holds the CUDA op's whole scratch: the fp32
    bias rows [R, V] and more; it grows with R, V and the rank."""
    size = lambda R, V, r: dspark_ops.workspace_size("markov_draft", num_requests=R, vocab_size=V, rank=r)  # noqa
    assert size(4, 1000, 16) >= 4 * 1000 * 4 + 4 * 16 * 4
    assert size(8, 1000, 16) > size(4, 1000, 16) and size(4, 2000, 16) > size(4, 1000, 16)
    assert size(4, 1000, 64) > size(4, 1000, 16)
    with pytest.raises(ValueError, match="unknown sizes"):
        dspark_ops.workspace_size("markov_draft", num_requests=4, vocab_size=1000, max_draft=3)
    with pytest.raises(ValueError, match="needs rank"):  # a rank-0 size would be refused by the CUDA op
        dspark_ops.workspace_size("markov_draft", num_requests=4, vocab_size=1000)


def test_out_form_equals_functional():
    args = op_args(R=5, G=3, V=71)
    U, anchor, w1, w2, temps, top_k, top_p, seeds, pos, n = args
    kw = dict(temperature=temps, top_k=top_k, top_p=top_p, seed=seeds, position=pos, num_draft=n)
    want = dspark_ops.markov_draft(U, anchor, w1, w2, **kw)
    R, G, V = U.shape
    out = dspark_ops.MarkovResult(torch.full((R, G), 99, dtype=torch.int32), torch.zeros(R, G, V, dtype=U.dtype),
                                  torch.full((R,), 99, dtype=torch.int32))
    got = dspark_ops.markov_draft(U, anchor, w1, w2, out=out, **kw)
    assert got is out
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    ws = torch.empty(dspark_ops.workspace_size("markov_draft", num_requests=R, vocab_size=V, rank=w1.shape[1]),
                     dtype=torch.uint8)
    for a, b in zip(dspark_ops.markov_draft(U, anchor, w1, w2, workspace=ws, **kw), want):  # outputs made for it
        assert torch.equal(a, b)


@pytest.mark.parametrize("logits_dtype,weight_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                       (torch.float32, torch.float16)])
def test_per_request_parameters_and_weight_dtypes_match_reference(logits_dtype, weight_dtype):
    U, anchor, w1, w2 = head(6, 5, 1031, 12, logits_dtype, seed=12)
    w1, w2 = w1.to(weight_dtype), w2.to(weight_dtype)
    kw = dict(temperature=torch.tensor([0.0, 0.7, 1.3, 0.9, 0.0, 1.0]),
              top_k=torch.tensor([0, 5, 0, 50, 3, 1], dtype=torch.int32),
              top_p=torch.tensor([1.0, 0.9, 0.8, 1.0, 0.5, 0.95]), seed=torch.arange(6) * 1000003,
              position=torch.arange(6) + 100, num_draft=torch.tensor([5, 4, 3, 5, 1, 5], dtype=torch.int32))
    got = dspark_ops.markov_draft(U, anchor, w1, w2, **kw)
    want = ref.markov_draft(U, anchor, w1, w2, **kw)
    for r in range(6):  # one request at a time: the helper reads scalar parameters
        one = {k: v[r:r + 1] for k, v in kw.items()}
        sub = dspark_ops.MarkovResult(got.tokens[r:r + 1], got.draft_logits[r:r + 1], got.status[r:r + 1])
        assert_matches_reference(sub, tuple(t[r:r + 1] for t in want), {"temperature": one["temperature"]},
                                 int(one["seed"]), int(one["position"]))


def test_no_steps_still_checks_anchors_and_bad_outputs_are_refused():
    U, _, w1, w2 = head(3, 0, 10, 4)
    res = dspark_ops.markov_draft(U, torch.tensor([1, 10, -1]), w1, w2)
    assert res.tokens.shape == (3, 0)
    assert res.status.tolist() == [0, Status.TOKEN_OUT_OF_RANGE, Status.TOKEN_OUT_OF_RANGE]
    U, anchor, w1, w2 = head(2, 3, 10, 4)
    with pytest.raises(ValueError, match="draft_logits must not share memory with base_logits"):
        dspark_ops.markov_draft(U, anchor, w1, w2, out=dspark_ops.MarkovResult(
            torch.empty(2, 3, dtype=torch.int32), U, torch.empty(2, dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"draft_logits must be a contiguous \[2, 3, 10\]"):
        dspark_ops.markov_draft(U, anchor, w1, w2, out=dspark_ops.MarkovResult(
            torch.empty(2, 3, dtype=torch.int32), torch.empty(2, 3, 9), torch.empty(2, dtype=torch.int32)))
    with pytest.raises(ValueError, match="draft_logits must have dtype torch.float32, got torch.float16"):
        dspark_ops.markov_draft(U, anchor, w1, w2, out=dspark_ops.MarkovResult(
            torch.empty(2, 3, dtype=torch.int32), torch.empty(2, 3, 10, dtype=torch.float16),
            torch.empty(2, dtype=torch.int32)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_negative_nan_in_a_filtered_row_aborts(dtype):
    """A NaN with its sign bit set has a tiny order key: masking it away under
    top-k would hide it from the race. It must abort like any NaN."""
    U, _, w1, w2 = head(2, 2, 16, 4, seed=13)
    U = U.clone()
    U[0, 0, 5] = -float("nan")
    assert U[0, 0, 5].view(torch.int32) < 0  # the sign bit is set
    res = dspark_ops.markov_draft(U.to(dtype), torch.tensor([1, 2]),
                                  w1, w2, temperature=1.0, top_k=3, seed=4)
    assert res.status[0] == Status.NONFINITE_LOGITS and res.tokens[0].tolist() == [-1, -1]
    assert res.status[1] == 0 and bool((res.tokens[1] >= 0).all())


def test_wrapper_accepts_what_the_composite_accepted():
    """float64 weights, a [1] num_draft (broadcast), out-of-range num_draft
    values (clamped, no int32 wrap-around) and base logits strided in V."""
    U, anchor, w1, w2 = head(3, 4, 40, 5, seed=14)
    want = dspark_ops.markov_draft(U, anchor, w1, w2, temperature=0.0,
                                   num_draft=torch.tensor([2, 2, 2], dtype=torch.int32))
    got = dspark_ops.markov_draft(U, anchor, w1.double(), w2.double(), temperature=0.0,
                                  num_draft=torch.tensor([2]))
    assert torch.equal(got.tokens, want.tokens)
    full = dspark_ops.markov_draft(U, anchor, w1, w2, temperature=0.0)
    big = dspark_ops.markov_draft(U, anchor, w1, w2, temperature=0.0, num_draft=torch.tensor([1 << 40, -5, 4]))
    assert torch.equal(big.tokens[0], full.tokens[0]) and big.tokens[1].tolist() == [-1] * 4
    strided = torch.empty(3, 4, 80)[:, :, ::2]
    strided.copy_(U)
    assert torch.equal(dspark_ops.markov_draft(strided, anchor, w1, w2, temperature=0.0).tokens, full.tokens)


@pytest.mark.cuda
def test_cuda_opcheck_and_per_request_parameters():
    args = op_args(R=6, G=4, V=4099, device="cuda")
    torch.library.opcheck(torch.ops.dspark_ops.markov_draft.default, args)
    U, anchor, w1, w2, temps, top_k, top_p, seeds, pos, n = args
    kw = dict(temperature=temps.cpu(), top_k=top_k.cpu(), top_p=float(top_p), seed=seeds.cpu(), position=pos.cpu(),
              num_draft=n.cpu())
    got = dspark_ops.MarkovResult(*(t.cpu() for t in torch.ops.dspark_ops.markov_draft(*args)))
    cpu = dspark_ops.markov_draft(U.cpu(), anchor.cpu(), w1.cpu(), w2.cpu(), **kw)
    assert torch.equal(got.status, cpu.status)
    same = (got.tokens == cpu.tokens).all(1)
    assert int(same.sum()) >= 5  # a near-tie of the race may split one request at most
    for r in range(6):
        if bool(same[r]):
            torch.testing.assert_close(got.draft_logits[r].float(), cpu.draft_logits[r].float(), rtol=2 ** -7,
                                       atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_matches_reference(mode):
    U, anchor, w1, w2 = head(6, 5, 32001, 64, torch.bfloat16, seed=9)
    got = dspark_ops.markov_draft(U.cuda(), anchor.cuda(), w1.cuda(), w2.cuda(), seed=5, position=7, **MODES[mode])
    want = ref.markov_draft(U, anchor, w1, w2, seed=5, position=7, **MODES[mode])
    assert_matches_reference(dspark_ops.MarkovResult(*(t.cpu() for t in got)), want, MODES[mode], 5, 7)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("R,V,rank", [(1, 4099, 37), (3, 32001, 64), (4, 1000, 512), (2, 515, 513)])
def test_cuda_small_batches_match_reference(dtype, mode, R, V, rank):
    """Small batches with weights of the logits' dtype (the cuBLAS GEMM reads
    bf16/fp16 weights as they are), odd V and ranks, fp32/fp16/bf16. (A fused
    GEMV step for R <= 4 passed this test on an H100 but was slower than
    cuBLAS: 74 vs 48 us a step at R = 1, V = 152064, r = 256; not kept.)"""
    U, anchor, w1, w2 = head(R, 5, V, rank, dtype, seed=R + V)
    w1, w2 = w1.to(dtype), w2.to(dtype)
    if R == 3:
        anchor[1] = V + 3  # TOKEN_OUT_OF_RANGE: nothing drafted
    n = torch.tensor([5, 2, 0, 4][:R], dtype=torch.int32)
    kw = dict(seed=5, position=7, num_draft=n, **MODES[mode])
    got = dspark_ops.markov_draft(U.cuda(), anchor.cuda(), w1.cuda(), w2.cuda(), **{**kw, "num_draft": n.cuda()})
    want = ref.markov_draft(U, anchor, w1, w2, **kw)
    assert_matches_reference(dspark_ops.MarkovResult(*(t.cpu() for t in got)), want, MODES[mode], 5, 7)


FUSED_CASES = [  # (R, V, rank, logits dtype, weights dtype, DSPARK_MARKOV_FUSED)
    (1, 8208, 256, torch.bfloat16, torch.bfloat16, "auto"), (32, 4112, 256, torch.float16, torch.float16, "auto"),
    (64, 2064, 64, torch.float32, torch.bfloat16, "auto"), (40, 32000, 16, torch.bfloat16, torch.float16, "auto"),
    (5, 1040, 1024, torch.bfloat16, torch.bfloat16, "auto"), (70, 2064, 64, torch.bfloat16, torch.bfloat16, "auto"),
    (40, 2064, 272, torch.float16, torch.bfloat16, "auto"), (32, 4112, 256, torch.float16, torch.float16, "0")]


@pytest.mark.cuda
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("R,V,rank,dtype,wdtype,fused", FUSED_CASES,
                         ids=[f"R{c[0]}-V{c[1]}-r{c[2]}-fused_{c[5]}" for c in FUSED_CASES])
def test_cuda_fused_step_matches_reference(R, V, rank, dtype, wdtype, fused, mode, monkeypatch):
    """bf16/fp16 weights, V and rank multiples of 16: the step computes the
    bias on the tensor cores inside the kernel that writes the row
    (kernels/markov_fused.cuh: 1, 2 and 4 request tiles, two request groups,
    groups of 32 and 16 at large ranks); DSPARK_MARKOV_FUSED=0 takes the
    cuBLAS GEMM + correct kernel. Both match the reference up to the margin
    rule (the tensor cores sum the rank in their own order, as cuBLAS does)."""
    monkeypatch.setenv("DSPARK_MARKOV_FUSED", fused)
    U, anchor, w1, w2 = head(R, 4, V, rank, dtype, seed=R + V + rank)
    w1, w2 = (w1 * 0.3).to(wdtype), (w2 * 0.3).to(wdtype)
    n = torch.tensor([4, 2, 0, 3, 1], dtype=torch.int32)[torch.arange(R) % 5]  # request 0 drafts all 4 steps
    kw = dict(seed=3, position=9, num_draft=n, **MODES[mode])
    got = dspark_ops.markov_draft(U.cuda(), anchor.cuda(), w1.cuda(), w2.cuda(), **{**kw, "num_draft": n.cuda()})
    want = ref.markov_draft(U, anchor, w1, w2, **kw)
    assert_matches_reference(dspark_ops.MarkovResult(*(t.cpu() for t in got)), want, MODES[mode], 3, 9)


@pytest.mark.cuda
def test_cuda_fused_step_is_batch_invariant():
    """DESIGN §2: a request's outcome does not depend on the batch's other
    requests. The fused step takes any batch of fitting weights (so no size
    switches paths) and a request's values do not depend on its request
    group: 70 requests (two groups of 64 + 6) against slices and one alone,
    bit for bit."""
    R, V, rank = 70, 4112, 64
    U, anchor, w1, w2 = (t.cuda() for t in head(R, 4, V, rank, torch.bfloat16, seed=31))
    w1, w2 = (w1 * 0.3).bfloat16(), (w2 * 0.3).bfloat16()
    r = torch.arange(R, device="cuda")
    kw = dict(temperature=(r % 3) * 0.5, top_k=(r % 2) * 20, seed=r + 1, position=r + 5)
    full = dspark_ops.markov_draft(U, anchor, w1, w2, **kw)
    for lo, hi in [(0, 1), (63, 70), (5, 40)]:
        part = dspark_ops.markov_draft(U[lo:hi], anchor[lo:hi], w1, w2, **{k: v[lo:hi] for k, v in kw.items()})
        for name, a, b in zip(full._fields, full, part):
            assert torch.equal(a[lo:hi], b), f"{name} of requests [{lo}, {hi}) differ in the batch of {R}"


@pytest.mark.cuda
@pytest.mark.parametrize("fused", ["auto", "0"])
def test_cuda_fused_step_kernel_names(fused):
    """Which kernels the step runs (torch.profiler): the fused step for 32
    requests of bf16 weights, cuBLAS + the correct kernel with
    DSPARK_MARKOV_FUSED=0 -- so the fused cases above do test the fused
    kernel. (Not under compute-sanitizer: tools/gpu_check.sh deselects it.)"""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the fused step needs compute capability 8.0 (bf16 WMMA)")
    # In a fresh process: CUPTI attaching after other tests captured CUDA graphs is a known source of trouble.
    code = """
import torch, dspark_ops
from torch.profiler import ProfilerActivity, profile
g = torch.Generator().manual_seed(2)
U = torch.randn(32, 3, 4096, generator=g).bfloat16().cuda()
w1, w2 = (torch.randn(4096, 256, generator=g) * 0.1).bfloat16().cuda(), (torch.randn(256, 4096, generator=g) * 0.1).bfloat16().cuda()
anchor = torch.randint(0, 4096, (32,), generator=g).cuda()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    dspark_ops.markov_draft(U, anchor, w1, w2, temperature=0.7, seed=1, position=2)
    torch.cuda.synchronize()
print(" ".join(e.name for e in prof.events()))
"""
    env = {**os.environ, "DSPARK_MARKOV_FUSED": fused}
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    names = child.stdout
    assert ("markov_fused_step_kernel" in names) == (fused == "auto"), names[:2000]
    assert ("markov_finalize_fused_kernel" in names) == (fused == "auto"), names[:2000]
    assert ("markov_correct_kernel" in names) == (fused == "0"), names[:2000]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_strided_base_rows_match_reference(dtype):
    """Base rows [R, G, V] as a view of wider rows (odd row stride: every
    row off the vector alignment) and odd V: the scalar fallbacks of the
    correct kernel's vector loads and stores."""
    R, G, V, rank = 3, 4, 2049, 16
    U, anchor, w1, w2 = head(R, G, V + 1, rank, dtype, seed=21)
    U, w1, w2 = U[:, :, :V], w1[:V], w2[:, :V]
    anchor = anchor % V
    kw = dict(seed=4, position=11, **MODES["temperature"])
    got = dspark_ops.markov_draft(U.cuda(), anchor.cuda(), w1.cuda(), w2.cuda(), **kw)
    want = ref.markov_draft(U, anchor, w1, w2, **kw)
    assert_matches_reference(dspark_ops.MarkovResult(*(t.cpu() for t in got)), want, MODES["temperature"], 4, 11)


@pytest.mark.cuda
def test_cuda_fp32_weights_give_the_cpu_bits_whatever_tf32_and_the_batch():
    """fp32 weights: the bias is summed by markov_bias_kernel in the CPU op's
    order, not by cuBLAS (whose fp32 GEMM takes TF32 when a user allows it,
    ~1e-3 off, and whose order may change with R). So the written logits and
    tokens equal the CPU op's exactly, with TF32 allowed, and a request's row
    is the same alone as in a batch of 11 (two of the kernel's request groups)."""
    U, anchor, w1, w2 = head(11, 4, 5003, 48, seed=12)
    kw = dict(temperature=0.9, seed=5, position=6)
    want = dspark_ops.markov_draft(U, anchor, w1, w2, **kw)
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        got = dspark_ops.markov_draft(U.cuda(), anchor.cuda(), w1.cuda(), w2.cuda(), **kw)
        alone = dspark_ops.markov_draft(U[9:10].cuda(), anchor[9:10].cuda(), w1.cuda(), w2.cuda(), **kw)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    got_cpu = dspark_ops.MarkovResult(*(t.cpu() for t in got))
    assert_matches_reference(got_cpu, want, kw, 5, 6)  # tokens: equal, or a near-tie of the race
    for r in range(11):  # written logits: the same bits up to a request's first different token
        for k in range(4):
            assert torch.equal(got_cpu.draft_logits[r, k], want.draft_logits[r, k]), f"request {r} step {k + 1}"
            if int(got_cpu.tokens[r, k]) != int(want.tokens[r, k]):
                break
    assert torch.equal(alone.draft_logits[0], got.draft_logits[9]) and torch.equal(alone.tokens[0], got.tokens[9])


@pytest.mark.cuda
@pytest.mark.parametrize("weights,V,rank", [(torch.bfloat16, 9001, 24), (torch.bfloat16, 9008, 32),  # 9008: fused
                                           (torch.float32, 9001, 24)])
def test_cuda_out_with_workspace_allocates_nothing(weights, V, rank):
    """DESIGN §2: a .out call with a workspace takes all its scratch from it
    (weights of one dtype, contiguous: no copies), and gives the functional
    form's results; a workspace one byte short is refused. cuBLAS + the
    correct kernel, the fused step, the fp32 bias kernel."""
    U, anchor, w1, w2 = (t.cuda() for t in head(3, 4, V, rank, torch.bfloat16, seed=14))
    w1, w2 = w1.to(weights), w2.to(weights)
    kw = dict(temperature=torch.tensor([0.0, 0.8, 1.1], device="cuda"), top_k=torch.tensor([0, 30, 5], device="cuda",
              dtype=torch.int32), top_p=torch.full((3,), 0.9, device="cuda"), seed=torch.arange(3, device="cuda"),
              position=torch.full((3,), 4, device="cuda"), num_draft=torch.tensor([4, 2, 3], dtype=torch.int32,
                                                                                 device="cuda"))
    want = dspark_ops.markov_draft(U, anchor, w1, w2, **kw)
    need = dspark_ops.workspace_size("markov_draft", num_requests=3, vocab_size=V, rank=rank)
    ws = torch.empty(need, dtype=torch.uint8, device="cuda")
    out = dspark_ops.MarkovResult(torch.empty_like(want.tokens), torch.empty_like(want.draft_logits),
                                  torch.empty_like(want.status))
    dspark_ops.markov_draft(U, anchor, w1, w2, out=out, workspace=ws, **kw)  # warm-up: cuBLAS's own workspace
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    dspark_ops.markov_draft(U, anchor, w1, w2, out=out, workspace=ws, **kw)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    for name, a, b in zip(dspark_ops.MarkovResult._fields, out, want):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match=f"workspace must hold at least {need} bytes"):
        dspark_ops.markov_draft(U, anchor, w1, w2, out=out, workspace=ws[:need - 1], **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("weights,V", [(torch.float32, 5003), (torch.bfloat16, 5008)])  # 5008, bf16: fused
def test_cuda_markov_draft_never_synchronises(weights, V):
    U, anchor, w1, w2 = (t.cuda() for t in head(4, 3, V, 32, torch.bfloat16, seed=10))
    w1, w2 = w1.to(weights), w2.to(weights)
    kw = dict(temperature=torch.full((4,), 0.9, device="cuda"), top_k=20, top_p=0.9,
              seed=torch.arange(4, device="cuda"), position=torch.full((4,), 3, device="cuda"))
    dspark_ops.markov_draft(U, anchor, w1, w2, **kw)  # warm-up (allocator, cuBLAS handles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dspark_ops.markov_draft(U, anchor, w1, w2, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,V", [(1, 32001), (5, 8192), (300, 4099)])
def test_cuda_split_select_equals_one_block(monkeypatch, dtype, R, V):
    """Each filtered step's keep keys come from the split select for small
    batches (every row across many blocks, DESIGN-exact integer
    histograms): tokens, written logits and status equal one block per
    row's (DSPARK_SPLIT_SELECT=0) bit for bit; R = 300 keeps one block a row."""
    from test_sample_cuda import assert_split_select
    U, anchor, w1, w2 = head(R, 4, V, 32, dtype, seed=R + V)
    g = torch.Generator().manual_seed(R)
    kw = dict(temperature=(torch.rand(R, generator=g) + 0.5).cuda(), top_k=torch.randint(0, 60, (R,), generator=g,
              dtype=torch.int32).cuda(), top_p=torch.full((R,), 0.85).cuda(), seed=3, position=2)
    call = lambda: dspark_ops.markov_draft(U.cuda(), anchor.cuda(), w1.cuda(), w2.cuda(), **kw)  # noqa: E731
    monkeypatch.delenv("DSPARK_SPLIT_SELECT", raising=False)
    assert_split_select(call, R <= 256)
    split = [t.cpu() for t in call()]
    monkeypatch.setenv("DSPARK_SPLIT_SELECT", "0")
    assert_split_select(call, False)
    one = [t.cpu() for t in call()]
    for name, a, b in zip(dspark_ops.MarkovResult._fields, split, one):  # written logits: -inf where masked, no NaN
        assert torch.equal(a, b), f"{name} differs"
