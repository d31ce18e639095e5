"""`sample` on the CPU against the pure-PyTorch reference (DESIGN §2)."""
import pytest
import torch

import dspark_ops
from dspark_ops import Purpose, Status
from dspark_ops import reference as ref
from helpers import assert_same_tokens, poisoned, random_logits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PARAMS = {
    "greedy": dict(temperature=0.0, top_k=0, top_p=1.0),
    "temperature": dict(temperature=0.8, top_k=0, top_p=1.0),
    "top_k": dict(temperature=1.0, top_k=5, top_p=1.0),
    "top_p": dict(temperature=1.2, top_k=0, top_p=0.7),
    "top_k_top_p": dict(temperature=0.6, top_k=40, top_p=0.9),
}


def check_against_reference(logits, row_start=None, **kw):
    R = row_start.shape[0] if row_start is not None else logits.shape[0]
    out = poisoned(R)
    got = dspark_ops.sample(logits, row_start=row_start, out=out, **kw)
    want_tokens, want_status = ref.sample(logits, row_start=row_start, **kw)
    assert torch.equal(got.status, want_status)
    per_request = {k: kw.get(k, d) for k, d in
                   dict(temperature=1.0, top_k=0, top_p=1.0, seed=0, position=0, slot=0).items()}
    per_request["purpose"] = int(kw.get("purpose", Purpose.DRAFT))
    assert_same_tokens(logits, got.tokens, want_tokens, row_start=row_start, **per_request)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32001])
@pytest.mark.parametrize("mode", list(PARAMS))
def test_matches_reference(vocab, dtype, mode):
    logits = random_logits(5, vocab, dtype, seed=vocab)
    check_against_reference(logits, seed=11 + vocab, position=1234, **PARAMS[mode])


@pytest.mark.parametrize("mode", ["temperature", "top_k_top_p", "greedy"])
def test_matches_reference_full_vocabulary(mode):
    logits = random_logits(2, 151936, torch.bfloat16, seed=3)
    check_against_reference(logits, seed=5, position=(1 << 33) + 9, **PARAMS[mode])


def test_per_request_parameters_large_batch():
    R, V = 512, 37
    g = torch.Generator().manual_seed(0)
    logits = random_logits(R, V, seed=1)
    temperature = torch.rand(R, generator=g) * 1.5
    temperature[::4] = 0.0  # greedy and random requests mixed
    top_k = torch.randint(0, V + 3, (R,), generator=g, dtype=torch.int32)
    top_p = torch.rand(R, generator=g) * 1.2 + 0.05
    seed = torch.randint(-(1 << 62), 1 << 62, (R,), generator=g)
    position = torch.randint(0, 1 << 40, (R,), generator=g)
    slot = torch.randint(0, 65536, (R,), generator=g, dtype=torch.int32)
    check_against_reference(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            position=position, slot=slot, purpose=Purpose.EMIT)


def test_greedy_is_argmax_with_ties_to_lowest_index():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [float("-inf"), -1.0, -1.0, -2.0],
                           [-0.0, 0.0, -1.0, -5.0]])
    res = dspark_ops.sample(logits, temperature=0.0, top_k=2, top_p=0.1)
    assert res.tokens.tolist() == [1, 1, 0] and res.status.tolist() == [0, 0, 0]


def test_top_p_keeps_only_the_argmax_at_tiny_top_p_and_is_skipped_at_one():
    logits = random_logits(64, 50, seed=2)
    res = dspark_ops.sample(logits, temperature=1.0, top_p=1e-6, seed=3, position=torch.arange(64))
    assert torch.equal(res.tokens.long(), logits.argmax(1))
    # top_p >= 1 is off: identical to not passing it (the filter is skipped).
    a = dspark_ops.sample(logits, temperature=1.0, top_p=1.0, seed=3)
    b = dspark_ops.sample(logits, temperature=1.0, top_p=torch.full((64,), 1.0), seed=3)
    c = dspark_ops.sample(logits, temperature=1.0, seed=3)
    assert torch.equal(a.tokens, c.tokens) and torch.equal(b.tokens, c.tokens)


def test_top_k_ties_keep_every_tied_token():
    # top_k = 2 with a three-way tie for second place keeps all four tokens.
    logits = torch.tensor([[5.0, 1.0, 1.0, 1.0, -3.0]]).repeat(400, 1)
    res = dspark_ops.sample(logits, temperature=10.0, top_k=2, seed=1, position=torch.arange(400))
    assert set(res.tokens.tolist()) == {0, 1, 2, 3}


def test_strided_rows_and_row_start():
    V = 1001
    padded = random_logits(6, 1100, torch.bfloat16, seed=4)
    view = padded[:, :V]
    assert view.stride(0) == 1100
    row_start = torch.tensor([5, 0, 0, 3], dtype=torch.int32)
    got = check_against_reference(view, row_start=row_start, temperature=0.9, top_k=30, seed=2, position=7)
    dense = dspark_ops.sample(view.contiguous(), row_start=row_start, temperature=0.9, top_k=30, seed=2,
                              position=7)
    assert torch.equal(got.tokens, dense.tokens)


def test_status_bits_abort_only_their_request():
    logits = random_logits(6, 100, seed=5)
    clean = dspark_ops.sample(logits, temperature=1.0, seed=9, position=torch.arange(6))
    bad = logits.clone()
    bad[1, 17] = float("nan")
    bad[2, 3] = float("inf")
    bad[3] = float("-inf")
    bad[4, 0] = 3e38  # finite, but 3e38 / 0.5 overflows to +inf
    slot = torch.zeros(6, dtype=torch.int32)
    res = dspark_ops.sample(bad, temperature=torch.tensor([1.0, 1, 1, 1, 0.5, 1]), seed=9,
                            position=torch.arange(6), slot=slot)
    assert res.status.tolist() == [0, Status.NONFINITE_LOGITS, Status.NONFINITE_LOGITS, Status.ALL_MASKED,
                                   Status.NONFINITE_LOGITS, 0]
    assert res.tokens.tolist()[1:5] == [-1, -1, -1, -1]
    assert res.tokens[0] == clean.tokens[0] and res.tokens[5] == clean.tokens[5]
    # Greedy rows: NaN aborts too, -inf everywhere is ALL_MASKED.
    g = dspark_ops.sample(bad[1:4], temperature=0.0)
    assert g.status.tolist() == [Status.NONFINITE_LOGITS, Status.NONFINITE_LOGITS, Status.ALL_MASKED]


def test_bad_row_start_and_slot_give_bad_lengths():
    logits = random_logits(3, 20, seed=6)
    res = dspark_ops.sample(logits, row_start=torch.tensor([0, 3, -1, 2], dtype=torch.int32),
                            slot=torch.tensor([0, 0, 0, 70000], dtype=torch.int32))
    assert res.status.tolist() == [0, Status.BAD_LENGTHS, Status.BAD_LENGTHS, Status.BAD_LENGTHS]
    assert res.tokens.tolist()[1:] == [-1, -1, -1]


def test_inputs_are_not_modified():
    logits = random_logits(4, 300, torch.float16, seed=7)
    args = dict(temperature=torch.tensor([0.0, 0.5, 1.0, 2.0]), top_k=torch.tensor([0, 3, 10, 0], dtype=torch.int32),
                top_p=torch.tensor([1.0, 0.5, 0.9, 0.3]), seed=torch.tensor([1, 2, 3, 4]),
                position=torch.tensor([5, 6, 7, 8]), slot=torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    before = [logits.clone()] + [v.clone() for v in args.values()]
    dspark_ops.sample(logits, **args)
    after = [logits] + list(args.values())
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_outcome_is_independent_of_batch_position():
    R, V = 40, 500
    logits = random_logits(R, V, seed=8)
    seed, position = torch.arange(R) * 7919, torch.arange(R) + 100
    temperature = torch.linspace(0, 1.5, R)
    base = dspark_ops.sample(logits, temperature=temperature, top_p=0.8, seed=seed, position=position)
    perm = torch.randperm(R, generator=torch.Generator().manual_seed(1))
    permuted = dspark_ops.sample(logits[perm], temperature=temperature[perm], top_p=0.8, seed=seed[perm],
                                 position=position[perm])
    assert torch.equal(permuted.tokens, base.tokens[perm])
    # Alone in a batch of one, request 13 gets the same token.
    alone = dspark_ops.sample(logits[13:14], temperature=temperature[13:14], top_p=0.8, seed=seed[13:14],
                              position=position[13:14])
    assert alone.tokens.item() == base.tokens[13].item()


def test_streams_differ_by_position_slot_purpose_and_seed():
    logits = torch.zeros(1, 1 << 16)  # uniform: the token is the race winner
    base = dict(temperature=1.0, seed=1, position=5, slot=0, purpose=Purpose.DRAFT)
    tokens = {dspark_ops.sample(logits, **base).tokens.item()}
    for key, value in [("seed", 2), ("position", 6), ("slot", 1), ("purpose", Purpose.EMIT)]:
        tokens.add(dspark_ops.sample(logits, **{**base, key: value}).tokens.item())
    assert len(tokens) == 5
    assert dspark_ops.sample(logits, **base).tokens.item() in tokens  # deterministic


def test_empty_batch():
    res = dspark_ops.sample(torch.zeros(0, 10), temperature=1.0)
    assert res.tokens.shape == (0,) and res.status.shape == (0,)


def test_out_overload_writes_every_output():
    logits = random_logits(7, 33, seed=9)
    out = poisoned(7)
    ws = torch.empty(dspark_ops.workspace_size("sample", num_requests=7, vocab_size=33), dtype=torch.uint8)
    res = dspark_ops.sample(logits, temperature=0.7, seed=3, out=out, workspace=ws)
    assert res is out
    fresh = dspark_ops.sample(logits, temperature=0.7, seed=3)
    assert torch.equal(out.tokens, fresh.tokens) and torch.equal(out.status, fresh.status)


def test_validate_rejects_bad_values_on_the_host():
    logits = random_logits(3, 10)
    with pytest.raises(ValueError, match=r"temperature\[1\] = -1"):
        dspark_ops.sample(logits, temperature=torch.tensor([1.0, -1.0, 1.0]), validate=True)
    with pytest.raises(ValueError, match=r"row_start\[0\] = 3"):
        dspark_ops.sample(logits, row_start=torch.tensor([3], dtype=torch.int32), validate=True)
    with pytest.raises(ValueError, match=r"slot\[2\] = 65536"):
        dspark_ops.sample(logits, slot=torch.tensor([0, 1, 65536], dtype=torch.int32), validate=True)
    dspark_ops.sample(logits, temperature=torch.tensor([1.0, 0.0, 2.0]), validate=True)


def _sample_args(R=4, V=50, top=True):
    logits = random_logits(R, V, seed=10)
    t = lambda v, d: torch.full((R,), v, dtype=d)  # noqa: E731
    return (logits, t(0.9, torch.float32), t(5, torch.int32) if top else None,
            t(0.8, torch.float32) if top else None, t(1, torch.int64), t(2, torch.int64), 3,
            t(0, torch.int32), None)


@pytest.mark.parametrize("top", [True, False])
def test_opcheck_both_forms(top):
    args = _sample_args(top=top)
    torch.library.opcheck(torch.ops.dspark_ops.sample.default, args)
    R = args[0].shape[0]
    out = dict(tokens=torch.empty(R, dtype=torch.int32), status=torch.empty(R, dtype=torch.int32))
    torch.library.opcheck(torch.ops.dspark_ops.sample.out, args, out)
    ws = torch.empty(dspark_ops.workspace_size("sample", num_requests=R, vocab_size=args[0].shape[1]),
                     dtype=torch.uint8)
    torch.library.opcheck(torch.ops.dspark_ops.sample.out, args, {**out, "workspace": ws})


def test_torch_compile_fullgraph():
    logits = random_logits(6, 77, seed=11)
    position = torch.arange(6)

    def step(l, pos):
        return dspark_ops.sample(l, temperature=0.8, top_k=10, top_p=0.9, seed=5, position=pos)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(logits, position), step(logits, position)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.status, want.status)


def test_infinite_device_temperature_aborts_a_masked_row():
    # -inf / inf is NaN: such a row is flagged, never silently sampled.
    logits = torch.tensor([[0.0, float("-inf"), 1.0], [0.0, 2.0, 1.0]])
    res = dspark_ops.sample(logits, temperature=torch.tensor([float("inf"), 1.0]))
    want = ref.sample(logits, temperature=torch.tensor([float("inf"), 1.0]))
    assert res.status.tolist() == want[1].tolist() == [Status.NONFINITE_LOGITS, 0]
