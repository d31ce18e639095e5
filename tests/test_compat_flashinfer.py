"""dspark_ops.compat.flashinfer.chain_speculative_sampling: our adaptation of
what FlashInfer's tests assert (valid outputs, one-hot exactness, counters),
plus the independent-acceptance counter against verify_chunk's own coins,
losslessness by chi-square, and the seed / offset / generator mapping."""
import pytest
import torch

from dspark_ops import Purpose, Status
from dspark_ops import reference as ref
from dspark_ops.compat import flashinfer as fi
from dspark_ops.compat._streams import coin_uniforms, per_row_seeds
from helpers import chi_square_pvalue

css = fi.chain_speculative_sampling
P_PASS, P_REJECT = 1e-3, 1e-6


def normalised(*shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g)
    return (x / x.sum(-1, keepdim=True)).to(device)


def drafts_from(q, seed=1):
    """[B, n] tokens sampled from the draft rows q [B, n, V]."""
    g = torch.Generator().manual_seed(seed)
    B, n, V = q.shape
    return torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, n).to(q.device)


@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("V", [111, 500])
def test_output_is_valid(n, V):
    B = 64
    q, p = normalised(B, n, V, seed=n), normalised(B, n + 1, V, seed=V)
    x = torch.randint(V, (B, n), generator=torch.Generator().manual_seed(3))  # drafts not from q: still valid
    for call in range(3):
        out, acc, emitted = css(q, x, p, seed=11, offset=call)
        assert out.shape == (B, n + 1) and out.dtype == torch.int32
        assert bool(((out == -1) | ((out >= 0) & (out < V))).all())
        cols = torch.arange(n + 1).expand(B, -1)
        assert torch.equal(out != -1, cols <= emitted.unsqueeze(1))  # -1 only after the emitted token
        assert torch.equal(emitted + 1, (out != -1).sum(1).int())
        prefix = cols[:, :n] < emitted.unsqueeze(1)
        assert torch.equal(out[:, :n][prefix], x.int()[prefix])  # accepted drafts come first
        assert bool((acc >= emitted).all()) and bool((acc <= n).all())


@pytest.mark.parametrize("n", [1, 4])
def test_one_hot_target_equal_to_drafts_accepts_all_and_adds_the_bonus(n):
    B, V = 33, 97
    g = torch.Generator().manual_seed(5)
    want = torch.randint(V, (B, n + 1), generator=g)
    p = torch.zeros(B, n + 1, V).scatter_(2, want.unsqueeze(-1), 1.0)
    q = normalised(B, n, V)
    for call in range(3):
        out, acc, emitted = css(q, want[:, :n], p, seed=call, offset=0)
        assert torch.equal(out, want.int())
        assert torch.equal(acc, torch.full((B,), n, dtype=torch.int32))
        assert torch.equal(emitted, acc)


def test_flashinfer_docstring_example_is_deterministic():
    """p(x_1) = 0 rejects draft 1 whatever the coin; the residual max(p - q, 0)
    of row 1 is a point mass on token 0; draft 0 has p >= q: always accepted."""
    q = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.1]]])
    x = torch.tensor([[2, 1]], dtype=torch.int32)
    p = torch.tensor([[[0.0, 0.1, 0.6, 0.3], [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]])
    for seed in range(5):
        out, acc, emitted = css(q, x, p, seed=seed, offset=seed)
        assert out.tolist() == [[2, 0, -1]] and acc.tolist() == [1] and emitted.tolist() == [1]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_counters_accumulate_in_place_across_calls(dtype):
    B, n, V = 40, 4, 50
    q, p = normalised(B, n, V, seed=1), normalised(B, n + 1, V, seed=2)
    x = drafts_from(q)
    acc = torch.full((B,), 3, dtype=dtype)
    emitted = torch.full((B,), 5, dtype=dtype)
    a_ptr, e_ptr = acc.data_ptr(), emitted.data_ptr()
    singles = [css(q, x, p, seed=9, offset=k) for k in (0, 1)]
    for k in (0, 1):
        _, acc_out, emitted_out = css(q, x, p, acc, emitted, seed=9, offset=k)
        assert acc_out is acc and emitted_out is emitted
    assert acc.data_ptr() == a_ptr and emitted.data_ptr() == e_ptr and acc.dtype == dtype
    assert torch.equal(acc, 3 + (singles[0][1] + singles[1][1]).to(dtype))
    assert torch.equal(emitted, 5 + (singles[0][2] + singles[1][2]).to(dtype))
    assert not torch.equal(singles[0][0], singles[1][0])  # a new offset is a new stream


def test_coin_uniforms_follow_the_philox_contract():
    """The fast Philox (wrapping int64 products) against the reference's
    16-bit-split one, for seeds and positions that use all 64 bits."""
    seeds = torch.tensor([0, 1, -5, 2**62 + 12345, -(2**63), 2**63 - 1], dtype=torch.int64)
    positions = torch.tensor([0, 7, 2**40 + 3, 99, 2**62, 2**63 - 1], dtype=torch.int64)
    u = coin_uniforms(seeds, positions, 4)
    for r in range(seeds.shape[0]):
        for j in range(4):
            bits = ref.random_bits(int(seeds[r]), int(positions[r]), int(Purpose.COIN), j + 1, 1)
            assert float(u[r, j]) == float(ref.uniform_from_bits(bits)[0]), (r, j)


def test_independent_coins_reproduce_verify_chunks_decisions():
    """coin_uniforms gives the coin verify_chunk drew for every draft it
    decided: accepted drafts pass u*q < p, the rejected one fails (beyond the
    float32 rounding of p through log/exp: a relative 1e-5, DESIGN §2)."""
    B, n, V = 3000, 4, 12
    q, p = normalised(B, n, V, seed=7), normalised(B, n + 1, V, seed=8)
    x = drafts_from(q, seed=9)
    out, acc, emitted, status = css(q, x, p, seed=123, offset=77, return_status=True)
    assert bool((status == 0).all())
    u = coin_uniforms(per_row_seeds(torch.tensor([123]), B), torch.tensor([77]).expand(B), n)
    qx = q.gather(2, x.unsqueeze(-1)).squeeze(-1)
    px = p[:, :n].gather(2, x.unsqueeze(-1)).squeeze(-1)
    coin = u * qx < px
    decided = torch.arange(n).expand(B, -1) <= emitted.unsqueeze(1)
    want = torch.arange(n).expand(B, -1) < emitted.unsqueeze(1)  # accepted before, rejected at `emitted`
    near = (u * qx - px).abs() <= 1e-5 * px
    bad = decided & (coin != want) & ~near
    assert not bool(bad.any()), bad.nonzero()[:5]
    assert int(decided.sum()) > B  # many rejections were checked, not only acceptances
    extra = (coin & ~decided).sum(1)
    assert torch.equal(acc.long(), emitted.long() + extra)


def test_independent_counter_is_unbiased():
    """E[count] = sum_j E[min(1, p/q)] = n * sum_x min(p(x), q(x)) when the
    drafts are drawn from q (FlashInfer's kernel recounts the rejected draft
    with a fresh coin, which would push the mean up by P(reject) * a)."""
    B, n, V = 20000, 3, 6
    q_row, p_row = normalised(V, seed=21), normalised(V, seed=22)
    q, p = q_row.expand(B, n, V).contiguous(), p_row.expand(B, n + 1, V).contiguous()
    _, acc, emitted = css(q, drafts_from(q, seed=23), p, seed=5, offset=0)
    a = float(torch.minimum(p_row, q_row).sum())
    mean, sd = float(acc.double().mean()), (n * a * (1 - a) / B) ** 0.5
    assert abs(mean - n * a) < 5 * sd, (mean, n * a, sd)
    assert float(emitted.double().mean()) < mean  # the chain stops at the first rejection


def first_tokens(seed, B=20000, V=8, n=2):
    q_rows, p_rows = normalised(n, V, seed=31), normalised(n + 1, V, seed=32)
    q, p = q_rows.expand(B, n, V).contiguous(), p_rows.expand(B, n + 1, V).contiguous()
    out, _, _ = css(q, drafts_from(q, seed=33), p, seed=seed, offset=0)
    return out[:, 0].long(), p_rows[0], q_rows[0]


def test_first_token_follows_the_target_chi_square():
    """Many requests, one scalar seed spread to distinct per-row streams: the
    first emitted token is distributed as p_0 (negative control: not as q_0,
    and a seed tensor repeating one value gives every row the same stream)."""
    tokens, p0, q0 = first_tokens(2024)
    p0, q0 = p0.double() / p0.double().sum(), q0.double() / q0.double().sum()  # the op renormalises
    assert chi_square_pvalue(tokens, p0) > P_PASS
    assert chi_square_pvalue(tokens, q0) < P_REJECT
    same, _, _ = first_tokens(torch.full((20000,), 7, dtype=torch.int64))
    assert chi_square_pvalue(same, p0) < P_REJECT


def test_generator_and_seed_offset_streams():
    B, n, V = 16, 3, 40
    q, p = normalised(B, n, V, seed=41), normalised(B, n + 1, V, seed=42)
    x = drafts_from(q, seed=43)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = css(q, x, p, generator=g1)[0], css(q, x, p, generator=g2)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, css(q, x, p, generator=g1)[0])  # the generator advanced
    seeds = torch.arange(B, dtype=torch.int64) * 1000
    per_row = css(q, x, p, seed=seeds, offset=torch.full((B,), 4, dtype=torch.int64))[0]
    assert torch.equal(per_row, css(q, x, p, seed=seeds.to(torch.uint64), offset=4)[0])
    assert torch.equal(css(q, x, p, seed=3, offset=4)[0], css(q, x, p, seed=torch.tensor([3]), offset=4)[0])
    torch.manual_seed(0)
    c = css(q, x, p)[0]  # the default generator
    torch.manual_seed(0)
    assert torch.equal(c, css(q, x, p)[0])


def test_bad_drafts_are_flagged_and_bad_rows_abort():
    q = normalised(3, 2, 5)
    p = normalised(3, 3, 5, seed=1)
    x = torch.tensor([[-1, 2], [5, 1], [0, 1]])
    p[2, 0, 0] = float("nan")
    acc, emitted = torch.full((3,), 10), torch.full((3,), 10)
    out, acc, emitted, status = css(q, x, p, acc, emitted, seed=1, offset=0, return_status=True)
    assert status[0] == Status.TOKEN_OUT_OF_RANGE and status[1] == Status.TOKEN_OUT_OF_RANGE
    assert bool((out[:2, 0] >= 0).all()) and bool((out[:2, 1:] == -1).all())
    assert status[2] & Status.NONFINITE_LOGITS and out[2].tolist() == [-1, -1, -1]
    assert acc[2] == 10 and emitted.tolist() == [10, 10, 10]
    assert acc[0] <= 11 and acc[1] <= 11  # an out-of-range draft is never counted


def test_bad_arguments_raise_naming_them():
    q, p = normalised(2, 3, 5), normalised(2, 4, 5)
    x = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="target_probs must have shape \\[2, 4, 5\\]"):
        css(q, x, p[:, :3])
    with pytest.raises(ValueError, match="draft_token_ids must be an integer tensor of shape \\[2, 3\\]"):
        css(q, x.float(), p)
    with pytest.raises(ValueError, match="seed and offset must be given together"):
        css(q, x, p, seed=1)
    with pytest.raises(ValueError, match="maybe_output_accepted_token_num must be an integer tensor \\[2\\]"):
        css(q, x, p, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="offset must be an int or a tensor of shape \\[1\\] or \\[2\\]"):
        css(q, x, p, seed=1, offset=torch.zeros(3, dtype=torch.int64))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    B, n, V = 64, 5, 32001
    q, p = normalised(B, n, V, seed=51), normalised(B, n + 1, V, seed=52)
    x = drafts_from(q, seed=53)
    cpu = css(q, x, p, seed=torch.arange(B, dtype=torch.int64), offset=9, return_status=True)
    cuda = css(q.cuda(), x.cuda(), p.cuda(), seed=torch.arange(B, dtype=torch.int64).cuda(), offset=9,
               return_status=True)
    for a, b in zip(cpu, cuda):
        assert torch.equal(a, b.cpu())
