"""verify_chunk on the CPU against the pure-PyTorch reference (DESIGN §3)."""
import pytest
import torch

import dspark_ops
from dspark_ops import Status
from dspark_ops import reference as ref
from verify_helpers import assert_verify_matches, ragged_batch, reference_with_margins

LENGTHS = [3, 0, 5, 1, 2]
MODES = {
    "greedy": dict(temperature=0.0),
    "point_mass": dict(temperature=0.9),
    "probs": dict(temperature=1.0),
    "logits": dict(temperature=0.8, draft_temperature=1.0),
    "logits_top_k_top_p": dict(temperature=1.1, top_k=20, top_p=0.85),
    "probs_top_p": dict(temperature=1.0, top_p=0.7),
}


def draft_mode(mode):
    return "probs" if mode.startswith("probs") else "logits" if mode.startswith("logits") else None


def poisoned_result(R, K):
    return dspark_ops.VerifyResult(torch.full((R, K + 1), 0x5A5A, dtype=torch.int32),
                                   *(torch.full((R,), 0x5A5A, dtype=torch.int32) for _ in range(3)))


def check(target, tokens, cu, max_draft, what="", **kw):
    R = cu.shape[0] - 1
    out = poisoned_result(R, max_draft)
    got = dspark_ops.verify_chunk(target, tokens, cu, max_draft=max_draft, out=out, **kw)
    want, margins = reference_with_margins(target, tokens, cu, max_draft=max_draft, **kw)
    assert_verify_matches(got, want, margins, what)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 7, 1000, 32001])
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_reference(V, dtype, mode):
    target, tokens, cu, kw = ragged_batch(LENGTHS, V, dtype, mode=draft_mode(mode) or "none", seed=V)
    check(target, tokens, cu, 6, f"V={V} {dtype} {mode}", seed=torch.arange(5) * 7 + 1,
          position=torch.tensor([0, 5, 1 << 33, 7, 100]), **kw, **MODES[mode])


@pytest.mark.parametrize("mode", ["probs", "logits", "greedy"])
def test_matches_reference_full_vocabulary(mode):
    target, tokens, cu, kw = ragged_batch([3, 2], 151936, torch.bfloat16, mode=draft_mode(mode) or "none", seed=1,
                                          scale=4.0)
    check(target, tokens, cu, 3, mode, seed=3, position=11, **kw, **MODES[mode])


def test_large_batch_mixed_parameters():
    R, V = 300, 11
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, 6, (R,), generator=g).tolist()
    target, tokens, cu, kw = ragged_batch(lengths, V, mode="logits", seed=2)
    temperature = torch.rand(R, generator=g) * 1.5
    temperature[::5] = 0.0
    draft_temperature = torch.ones(R)
    draft_temperature[1::7] = 0.0  # these requests treat their drafts as point masses
    check(target, tokens, cu, 5, "mixed", temperature=temperature, draft_temperature=draft_temperature,
          top_k=torch.randint(0, V + 2, (R,), generator=g, dtype=torch.int32),
          top_p=torch.rand(R, generator=g) * 1.1 + 0.1, seed=torch.randint(0, 1 << 62, (R,), generator=g),
          position=torch.randint(0, 1 << 40, (R,), generator=g), **kw)


def test_greedy_exact():
    V, K = 20, 4
    target = torch.randn(3, K + 1, V)
    argmax = target.argmax(-1).to(torch.int32)  # [3, K+1]
    drafts = argmax[:, :K].clone()
    drafts[1, 2] = (drafts[1, 2] + 1) % V  # request 1 diverges at draft 2
    drafts[2, 0] = (drafts[2, 0] + 1) % V  # request 2 at draft 0
    res = dspark_ops.verify_chunk(target, drafts, temperature=0.0)
    assert res.accepted.tolist() == [4, 2, 0]
    assert res.tokens[0].tolist() == argmax[0].tolist()  # all drafts + bonus argmax of row K
    assert res.tokens[1].tolist() == argmax[1, :3].tolist() + [-1, -1]
    assert res.tokens[2].tolist() == [int(argmax[2, 0])] + [-1] * 4
    assert res.status.tolist() == [0, 0, 0]


def test_padded_form_equals_ragged_form_in_place():
    B, K, V = 4, 3, 50
    target = torch.randn(B, K + 1, V)
    drafts = torch.randint(0, V, (B, K), dtype=torch.int32)
    probs = torch.softmax(torch.randn(B, K, V), -1)
    padded = dspark_ops.verify_chunk(target, drafts, draft_probs=probs, seed=4, position=9)
    cu = torch.arange(B + 1, dtype=torch.int32) * K
    ragged = dspark_ops.verify_chunk(target.reshape(-1, V), drafts.reshape(-1), cu, draft_probs=probs.reshape(-1, V),
                                     seed=4, position=9)
    assert all(torch.equal(a, b) for a, b in zip(padded, ragged))
    with pytest.raises(ValueError, match="contiguous in its first two dimensions"):
        dspark_ops.verify_chunk(torch.randn(B, K + 2, V)[:, :K + 1], drafts, draft_probs=probs)


def test_row_start_overrides_read_markov_layout_in_place():
    # markov_draft's [R, G, V] draft logits: request r's rows start at r*G.
    R, G, V = 3, 4, 30
    lengths = [2, 4, 1]
    draft_logits = torch.randn(R, G, V)
    tokens = torch.randint(0, V, (R, G), dtype=torch.int32)
    target = torch.randn(R * (G + 1), V)
    cu = torch.tensor([0, 2, 6, 7], dtype=torch.int32)
    dstart = torch.arange(R, dtype=torch.int32) * G
    tstart = torch.arange(R, dtype=torch.int32) * (G + 1)
    check(target, tokens.reshape(-1), cu, G, "markov layout", draft_logits=draft_logits.reshape(-1, V),
          draft_row_start=dstart, target_row_start=tstart, seed=1, position=3)
    assert lengths == (cu[1:] - cu[:-1]).tolist()


def test_strided_target_rows():
    target, tokens, cu, kw = ragged_batch(LENGTHS, 1001, torch.bfloat16, mode="probs", seed=3)
    padded = torch.zeros(target.shape[0], 1100, dtype=torch.bfloat16)
    padded[:, :1001] = target
    view = padded[:, :1001]
    assert view.stride(0) == 1100
    a = check(view, tokens, cu, 6, "strided", seed=2, **kw)
    b = dspark_ops.verify_chunk(target, tokens, cu, max_draft=6, seed=2, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_zero_drafts_is_plain_sampling_from_p0():
    V = 40
    logits = torch.randn(6, V)
    cu = torch.zeros(7, dtype=torch.int32)
    res = dspark_ops.verify_chunk(logits, torch.zeros(0, dtype=torch.int32), cu, max_draft=0, temperature=0.7,
                                  seed=torch.arange(6), position=12)
    assert res.accepted.tolist() == [0] * 6 and res.emitted.tolist() == [1] * 6
    # the bonus of row 0 is EMIT slot 0: what `sample` draws with purpose EMIT, slot 0
    s = dspark_ops.sample(logits, temperature=0.7, seed=torch.arange(6), position=12, purpose=dspark_ops.Purpose.EMIT)
    assert res.tokens[:, 0].tolist() == s.tokens.tolist()


def test_token_with_zero_target_probability_is_never_accepted():
    # SGLang's `<=` bug: a coin of 0 accepted a token of p = 0. Here p(x) = 0
    # (masked) while q(x) > 0, for many coins.
    V, R = 8, 400
    target = torch.randn(R * 2, V)
    target[0::2, 3] = float("-inf")
    tokens = torch.full((R,), 3, dtype=torch.int32)
    cu = torch.arange(R + 1, dtype=torch.int32)
    probs = torch.full((R, V), 1.0 / V)
    res = dspark_ops.verify_chunk(target, tokens, cu, draft_probs=probs, seed=torch.arange(R), position=0)
    assert int(res.accepted.sum()) == 0
    assert not bool((res.tokens[:, 0] == 3).any())


def test_minus_one_padding_is_a_flag_not_an_out_of_bounds_read():
    # FlashInfer: -1 padding in dense drafts read out of bounds and
    # over-counted emitted tokens.
    B, K, V = 3, 4, 16
    target = torch.randn(B, K + 1, V)
    drafts = target.argmax(-1)[:, :K].to(torch.int32)  # greedy would accept everything
    drafts[0, 2:] = -1
    drafts[1, 0] = V  # out of range above
    res = dspark_ops.verify_chunk(target, drafts, temperature=0.0)
    assert res.status.tolist() == [Status.TOKEN_OUT_OF_RANGE, Status.TOKEN_OUT_OF_RANGE, 0]
    assert res.accepted.tolist() == [2, 0, 4] and res.emitted.tolist() == [3, 1, 5]
    assert res.tokens[0, 2].item() == target[0, 2].argmax().item()  # emitted from p_2 itself
    stoch = dspark_ops.verify_chunk(target, drafts, draft_probs=torch.softmax(torch.randn(B, K, V), -1), seed=1)
    assert stoch.status[0].item() & Status.TOKEN_OUT_OF_RANGE and stoch.accepted[0] <= 2
    assert bool((stoch.tokens[stoch.tokens >= 0] < V).all())


def test_draft_prob_zero_is_flagged_and_stays_lossless():
    V = 10
    target = torch.randn(2, V)
    probs = torch.softmax(torch.randn(1, V), -1)
    probs[0, 4] = 0.0  # the draft claims it could not have drawn token 4
    res = dspark_ops.verify_chunk(target, torch.tensor([4], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
                                  draft_probs=probs, seed=3)
    assert res.status.tolist() == [Status.DRAFT_PROB_ZERO] and res.accepted.tolist() == [0]
    want = ref.verify_chunk(target, torch.tensor([4], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
                            draft_probs=probs, seed=3)
    assert res.tokens.tolist() == want[0].tolist()


def test_status_bits_abort_only_their_request():
    V = 12
    target, tokens, cu, kw = ragged_batch([2, 2, 2, 2, 2], V, mode="logits", seed=9)
    target = target.clone()
    kw["draft_logits"] = kw["draft_logits"].clone()
    target[0 * 3 + 0, 5] = float("nan")  # request 0, row 0: needed -> abort
    target[1 * 3 + 1] = float("-inf")  # request 1, row 1: all masked if reached
    target[2 * 3 + 0, 1] = float("inf")  # request 2: +inf -> abort
    kw["draft_logits"][3 * 2 + 0, 0] = float("nan")  # request 3: its draft row 0 -> abort
    clean = dspark_ops.verify_chunk(target, tokens, cu, seed=1, temperature=1.0, **kw)
    want, margins = reference_with_margins(target, tokens, cu, seed=1, temperature=1.0, **kw)
    assert_verify_matches(clean, want, margins)
    st = clean.status.tolist()
    assert st[0] == Status.NONFINITE_LOGITS and st[2] == Status.NONFINITE_LOGITS and st[3] == Status.NONFINITE_LOGITS
    assert st[1] in (0, Status.ALL_MASKED) and st[4] == 0
    for r in (0, 2, 3):
        assert clean.tokens[r].tolist() == [-1, -1, -1] and clean.accepted[r] == 0 and clean.emitted[r] == 0
    # A NaN in a row after the first rejection is not needed: no abort.
    g = target.clone()
    g[4 * 3 + 2] = float("nan")
    greedy_tokens = tokens.clone()
    greedy_tokens[8] = (g[12].argmax() + 1) % V  # request 4 rejects its first draft
    res = dspark_ops.verify_chunk(g, greedy_tokens, cu, temperature=0.0)
    assert res.status[4].item() == 0 and res.emitted[4].item() == 1


def test_bad_lengths_abort():
    V = 6
    target = torch.randn(10, V)
    tokens = torch.zeros(6, dtype=torch.int32)
    cu = torch.tensor([0, 2, 1, 4, 6], dtype=torch.int32)  # request 1 has -1 drafts
    res = dspark_ops.verify_chunk(target, tokens, cu, max_draft=2, temperature=0.0)
    assert res.status.tolist() == [0, Status.BAD_LENGTHS, Status.BAD_LENGTHS, 0]  # request 2: 3 > max_draft
    assert res.tokens[1].tolist() == [-1, -1, -1] and res.emitted[1] == 0
    rs = dspark_ops.verify_chunk(target, tokens, torch.tensor([0, 2, 4], dtype=torch.int32), max_draft=2,
                                 target_row_start=torch.tensor([0, 8], dtype=torch.int32), temperature=0.0)
    assert rs.status.tolist() == [0, Status.BAD_LENGTHS]  # rows 8..10 exceed T = 10


def test_validate_raises_with_a_message():
    target, tokens, cu, kw = ragged_batch([2, 1], 9, mode="probs")
    bad = tokens.clone()
    bad[1] = -1
    with pytest.raises(ValueError, match=r"draft_tokens\[1\] = -1 is invalid"):
        dspark_ops.verify_chunk(target, bad, cu, validate=True, **kw)
    with pytest.raises(ValueError, match=r"cu_num_draft\[1\] = 2 is invalid: a request has more than max_draft = 1"):
        dspark_ops.verify_chunk(target, tokens, cu, max_draft=1, validate=True, **kw)
    with pytest.raises(ValueError, match=r"cu_num_draft\[2\] = 1 is invalid: offsets must not decrease"):
        dspark_ops.verify_chunk(target, tokens, torch.tensor([0, 2, 1], dtype=torch.int32), max_draft=2,
                                validate=True, **kw)
    with pytest.raises(ValueError, match=r"request 1 needs rows \[3, 5\) of target_logits, which has 4 rows; "
                                         r"from cu_num_draft"):
        dspark_ops.verify_chunk(target[:4], tokens, cu, validate=True, **kw)
    with pytest.raises(ValueError, match=r"request 0 needs rows \[2, 5\) of target_logits, which has 4 rows; "
                                         r"from target_row_start\[0\] = 2"):
        dspark_ops.verify_chunk(target[:4], tokens, cu, target_row_start=torch.tensor([2, 0], dtype=torch.int32),
                                validate=True, **kw)
    with pytest.raises(ValueError, match=r"request 1 needs rows \[2, 3\) of draft_probs, which has 2 rows"):
        dspark_ops.verify_chunk(target, tokens, cu, validate=True, **{**kw, "draft_probs": kw["draft_probs"][:2]})
    nan = target.clone()
    nan[4, 0] = float("nan")
    with pytest.raises(ValueError, match=r"target_logits row\[4\] = 4 is invalid: it holds NaN or \+inf"):
        dspark_ops.verify_chunk(nan, tokens, cu, validate=True, **kw)
    dspark_ops.verify_chunk(target, tokens, cu, validate=True, **kw)
    # The index named is the draft token's own, through row starts too.
    toks = torch.tensor([0, 1, 2, 3, -7], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"draft_tokens\[4\] = -7 is invalid"):
        dspark_ops.verify_chunk(torch.randn(4, 9), toks, torch.tensor([0, 0, 2], dtype=torch.int32), max_draft=2,
                                draft_row_start=torch.tensor([0, 3], dtype=torch.int32),
                                target_row_start=torch.tensor([0, 1], dtype=torch.int32), validate=True)


def test_inputs_are_not_modified():
    target, tokens, cu, kw = ragged_batch(LENGTHS, 50, mode="probs", seed=4)
    before = [t.clone() for t in (target, tokens, cu, kw["draft_probs"])]
    dspark_ops.verify_chunk(target, tokens, cu, seed=1, top_p=0.9, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, (target, tokens, cu, kw["draft_probs"])))


def test_outcome_is_independent_of_batch_position():
    target, tokens, cu, kw = ragged_batch([2, 3, 1, 4], 40, mode="logits", seed=6)
    seed, pos = torch.tensor([5, 6, 7, 8]), torch.tensor([10, 20, 30, 40])
    base = dspark_ops.verify_chunk(target, tokens, cu, seed=seed, position=pos, **kw)
    # Request 2 alone, through row starts into the same tensors.
    one = dspark_ops.verify_chunk(target, tokens, torch.tensor([0, 1], dtype=torch.int32), max_draft=4,
                                  draft_row_start=cu[2:3].clone(), target_row_start=(cu[2:3] + 2).clone(),
                                  seed=seed[2:3], position=pos[2:3], **kw)
    assert one.tokens[0].tolist() == base.tokens[2].tolist() and one.status[0] == base.status[2]


def test_empty_batch_and_workspace_size():
    res = dspark_ops.verify_chunk(torch.zeros(0, 5), torch.zeros(0, dtype=torch.int32),
                                  torch.zeros(1, dtype=torch.int32), max_draft=3)
    assert res.tokens.shape == (0, 4)
    assert dspark_ops.workspace_size("verify_chunk", num_requests=8, vocab_size=32000, max_draft=7) > 0


def _op_args(mode="probs", top=True):
    target, tokens, cu, kw = ragged_batch([2, 0, 3], 30, mode=mode, seed=8)
    R = 3
    t = lambda v, d: torch.full((R,), v, dtype=d)  # noqa: E731
    return (target, tokens, cu, 3, kw.get("draft_probs"), kw.get("draft_logits"), t(1.0, torch.float32),
            t(0.9, torch.float32), t(10, torch.int32) if top else None, t(0.9, torch.float32) if top else None,
            t(1, torch.int64), t(2, torch.int64), None, None)


@pytest.mark.parametrize("mode,top", [("probs", True), ("logits", False), ("none", False)])
def test_opcheck_both_forms(mode, top):
    args = _op_args(mode, top)
    torch.library.opcheck(torch.ops.dspark_ops.verify_chunk.default, args)
    R, K = args[2].shape[0] - 1, args[3]
    out = dict(tokens=torch.empty(R, K + 1, dtype=torch.int32), accepted=torch.empty(R, dtype=torch.int32),
               emitted=torch.empty(R, dtype=torch.int32), status=torch.empty(R, dtype=torch.int32))
    torch.library.opcheck(torch.ops.dspark_ops.verify_chunk.out, args, out)


def test_torch_compile_fullgraph():
    B, K, V = 3, 4, 64
    target, drafts = torch.randn(B, K + 1, V), torch.randint(0, V, (B, K), dtype=torch.int32)
    probs = torch.softmax(torch.randn(B, K, V), -1)
    pos = torch.arange(B)

    def step(t, d, q, p):
        return dspark_ops.verify_chunk(t, d, draft_probs=q, temperature=0.8, top_k=10, seed=3, position=p)

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(target, drafts, probs, pos)
    want = step(target, drafts, probs, pos)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_padded_draft_rows_of_the_wrong_shape_are_refused():
    """Flattened, a [B, K', V] draft tensor with K' != K would be read as
    other requests' rows (silently wrong), and a 2-D one as one long row."""
    g = torch.Generator().manual_seed(21)
    B, K, V = 3, 4, 50
    target = torch.randn(B, K + 1, V, generator=g)
    drafts = torch.randint(0, V, (B, K), generator=g, dtype=torch.int32)
    for name, draft in (("draft_probs", torch.softmax(torch.randn(B, 2, V, generator=g), -1)),
                        ("draft_logits", torch.randn(B * K, V, generator=g))):
        with pytest.raises(ValueError, match=rf"padded {name} must have shape \[3, 4, V\], got \[{draft.shape[0]}, "):
            dspark_ops.verify_chunk(target, drafts, **{name: draft})


def test_padded_form_with_no_drafts_samples_the_bonus_row():
    target = torch.randn(3, 1, 50)
    res = dspark_ops.verify_chunk(target, torch.zeros(3, 0, dtype=torch.int32), temperature=0.0)
    assert res.tokens[:, 0].tolist() == target[:, 0].argmax(-1).tolist() and res.accepted.tolist() == [0, 0, 0]
