"""dspark_ops.compat.vllm.rejection_sample: our adaptation of what vLLM v1's
rejection-sampler tests assert (greedy fixtures, seeded determinism, the
output approaching the target distribution), plus the bonus-token contract,
losslessness by chi-square, and errors."""
import pytest
import torch

from dspark_ops import Status
from dspark_ops import reference as ref
from dspark_ops.compat.vllm import PLACEHOLDER_TOKEN_ID as PH
from dspark_ops.compat.vllm import SamplingMetadata, rejection_sample
from helpers import chi_square_pvalue

P_PASS, P_REJECT = 1e-3, 1e-6
GREEDY = SamplingMetadata(temperature=None, all_greedy=True, all_random=False)


def greedy_logits(output_tokens, V=100, bonus_rows=False):
    """Logits whose argmax is each request's output token at each draft
    position (and at its bonus row when `bonus_rows`)."""
    rows = [t for toks in output_tokens for t in (toks if bonus_rows else toks[:-1])]
    logits = torch.full((len(rows), V), -100.0)
    logits[torch.arange(len(rows)), torch.tensor(rows, dtype=torch.long)] = 100.0
    return logits


def run_greedy(spec, output_tokens, form):
    drafts = torch.tensor([t for s in spec for t in s], dtype=torch.int64)
    num = [len(s) for s in spec]
    cu = torch.tensor(num).cumsum(0)
    bonus = torch.tensor([[toks[-1]] for toks in output_tokens])
    max_spec = max(num)
    if form == "list":
        return rejection_sample(drafts, num, max_spec, None, None, greedy_logits(output_tokens), bonus, GREEDY)
    if form == "cu":
        return rejection_sample(drafts, None, max_spec, cu, None, greedy_logits(output_tokens), bonus, GREEDY)
    # vLLM's forward() layout: bonus rows included, the op picks the bonus token itself
    return rejection_sample(drafts, num, max_spec, cu, None, greedy_logits(output_tokens, bonus_rows=True), None,
                            GREEDY)


GREEDY_CASES = {
    "perfect_match": ([[1, 2, 3]], [[1, 2, 3, 4]], [[1, 2, 3, 4]]),
    "early_mismatch": ([[1, 2, 3]], [[1, 5, 3, 4]], [[1, 5, PH, PH]]),
    "multiple_sequences": ([[1, 2], [3]], [[1, 2, 5], [3, 4]], [[1, 2, 5], [3, 4, PH]]),
    "single_token": ([[1]], [[1, 2]], [[1, 2]]),
    "empty_sequence": ([[]], [[5]], [[5]]),
    "multiple_mismatches": ([[1, 2, 3], [4, 5, 6]], [[1, 2, 7, 6], [4, 8, 6, 9]],
                            [[1, 2, 7, PH], [4, 8, PH, PH]]),
    "first_mismatch": ([[1]], [[2, 3]], [[2, PH]]),
    "zero_draft_requests": ([[1, 2], [], [3], []], [[1, 2, 7], [8], [4, 9], [6]],
                            [[1, 2, 7], [8, PH, PH], [4, PH, PH], [6, PH, PH]]),
}


@pytest.mark.parametrize("form", ["list", "cu", "bonus_rows"])
@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_greedy(case, form):
    spec, output_tokens, expected = GREEDY_CASES[case]
    out = run_greedy(spec, output_tokens, form)
    assert out.dtype == torch.int32
    assert out.tolist() == expected


def random_case(B=8, k=3, V=1000, seed=0, draft_probs=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.rand(B * k, V, generator=g), -1)
    return dict(drafts=torch.multinomial(q, 1, generator=g).squeeze(1), num=[k] * B,
                q=q if draft_probs else None, logits=torch.randn(B * k, V, generator=g) * 3,
                bonus=torch.randint(V, (B, 1), generator=g))


def call(c, md, **kw):
    return rejection_sample(c["drafts"], c["num"], max(c["num"]), None, c["q"], c["logits"], c["bonus"], md, **kw)


@pytest.mark.parametrize("draft_probs", [True, False])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_deterministic_when_seeded(batch_size, draft_probs):
    """Requests with a generator (fresh, seeded alike each repetition) repeat
    their outputs; our own seeds/positions streams do too, and different
    seeds differ somewhere."""
    c = random_case(B=batch_size, draft_probs=draft_probs)
    seeded = [i for i in range(batch_size) if i % 2 == 0]
    temperature = torch.ones(batch_size)
    results = []
    for _ in range(5):
        gens = {i: torch.Generator().manual_seed(i) for i in seeded}
        results.append(call(c, SamplingMetadata(temperature, False, True, generators=gens)))
    for i in seeded:
        assert all(torch.equal(r[i], results[0][i]) for r in results)

    def ours(seed):
        return call(c, SamplingMetadata(temperature, False, True, seeds=torch.full((batch_size,), seed),
                                        positions=torch.arange(batch_size) * 10))
    assert torch.equal(ours(5), ours(5))
    assert any(not torch.equal(ours(5), ours(s)) for s in range(6, 30))


def test_seeded_requests_leave_generators_alone_without_drafts():
    """As vLLM: a request with no drafts (its bonus given) draws nothing."""
    c = random_case(B=2, k=2)
    c["num"], c["drafts"], c["q"], c["logits"] = [2, 0], c["drafts"][:2], c["q"][:2], c["logits"][:2]
    g0, g1 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    call(c, SamplingMetadata(torch.ones(2), False, True, generators={0: g0, 1: g1}))
    assert torch.equal(g1.get_state(), torch.Generator().manual_seed(2).get_state())
    assert not torch.equal(g0.get_state(), torch.Generator().manual_seed(1).get_state())


def test_output_approaches_the_target_distribution():
    """vLLM's test, adapted: the empirical distribution of the first emitted
    token approaches the target as samples grow, far faster than its
    distance to random reference distributions shrinks."""
    V, k = 10, 2
    g = torch.Generator().manual_seed(3)
    q_row = torch.softmax(torch.rand(V, generator=g), -1)
    target_logits = torch.rand(V, generator=g)
    target = torch.softmax(target_logits.double(), -1)
    reference = torch.softmax(torch.rand(100, V, generator=g, dtype=torch.float64), -1)
    torch.manual_seed(0)  # unseeded requests use the default generator
    d_target, d_reference = [], []
    for B in (100, 1000, 20000):
        drafts = torch.multinomial(q_row.expand(B * k, V), 1, generator=g).squeeze(1)
        logits = target_logits.expand(B * (k + 1), V).contiguous()
        md = SamplingMetadata(torch.ones(B), False, True)
        out = rejection_sample(drafts, [k] * B, k, None, q_row.expand(B * k, V), logits, None, md)
        est = torch.bincount(out[:, 0].long(), minlength=V).double() / B
        d_target.append(float(torch.dist(target, est)))
        d_reference.append(float(torch.dist(reference, est)) / reference.shape[0])
    assert d_target[-1] < 0.02
    assert d_target[0] / d_target[-1] > 3
    assert d_reference[0] / d_reference[-1] < d_target[0] / d_target[-1]


def test_first_token_follows_the_processed_target_chi_square():
    """Temperature 0.7 and top-k 6 applied by the op to raw logits: the first
    emitted token follows the processed target (negative control: not the
    temperature-1 distribution)."""
    B, V, k = 20000, 10, 2
    g = torch.Generator().manual_seed(11)
    row = torch.randn(V, generator=g) * 1.5
    q_row = torch.softmax(torch.randn(V, generator=g), -1)
    drafts = torch.multinomial(q_row.expand(B * k, V), 1, generator=g).squeeze(1)
    md = SamplingMetadata(torch.full((B,), 0.7), False, True, top_k=torch.full((B,), 6),
                          seeds=torch.arange(B) + 10**6, positions=torch.zeros(B, dtype=torch.int64))
    out = rejection_sample(drafts, [k] * B, k, None, q_row.expand(B * k, V), row.expand(B * (k + 1), V).contiguous(),
                           None, md)
    tokens = out[:, 0].long()
    assert chi_square_pvalue(tokens, ref.target_distribution(row, 0.7, 6, 1.0)[1]) > P_PASS
    assert chi_square_pvalue(tokens, ref.target_distribution(row, 1.0, 0, 1.0)[1]) < P_REJECT


def test_bonus_token_is_the_callers_when_every_draft_is_accepted():
    """Stochastic requests whose drafts have p = 1: all accepted, then the
    given bonus token (or, without one, the op's sample of the bonus row)."""
    spec = [[3, 4], [5]]
    logits = greedy_logits([[3, 4, 0], [5, 0]], V=20, bonus_rows=True)
    logits[2] = torch.linspace(0, 1, 20)  # bonus rows: a spread distribution
    logits[4] = torch.linspace(1, 0, 20)
    drafts, num = torch.tensor([3, 4, 5]), [2, 1]
    md = SamplingMetadata(torch.ones(2), False, True, seeds=torch.tensor([1, 2]), positions=torch.tensor([0, 0]))
    given = rejection_sample(drafts, num, 3, None, None, logits, torch.tensor([[17], [18]]), md)
    assert given.tolist() == [[3, 4, 17, PH], [5, 18, PH, PH]]
    own = rejection_sample(drafts, num, 3, None, None, logits, None, md)
    assert own[0, :2].tolist() == [3, 4] and own[1, 0] == 5 and bool((own[:, 3] == PH).all())
    draft_only = rejection_sample(drafts, num, 3, None, None, logits[[0, 1, 3]], torch.tensor([[17], [18]]), md)
    assert torch.equal(draft_only, given)


def test_mixed_greedy_and_random_and_draft_probs_dtype():
    c = random_case(B=4, k=3, V=64, seed=4)
    md = SamplingMetadata(torch.tensor([0.0, 1.0, -1.0, 0.8]), False, False, top_p=torch.tensor([1.0, 0.9, 1.0, 0.5]),
                          seeds=torch.arange(4), positions=torch.zeros(4, dtype=torch.int64))
    out = call(c, md)
    half = call(dict(c, q=c["q"].half()), md)  # draft probs of another dtype are cast to float32
    assert torch.equal(half, call(dict(c, q=c["q"].half().float()), md))
    argmax = c["logits"].argmax(-1).view(4, 3)
    for r in (0, 2):  # temperature <= 0 is greedy (vLLM's 0, and its older -1)
        d = c["drafts"].view(4, 3)[r]
        n_acc = int((d == argmax[r]).int().cumprod(0).sum())
        want = d[:n_acc].tolist() + ([int(argmax[r, n_acc])] if n_acc < 3 else [int(c["bonus"][r])])
        assert out[r, :len(want)].tolist() == want and bool((out[r, len(want):] == PH).all())


def test_bad_requests_abort_and_bad_arguments_raise():
    c = random_case(B=3, k=2, V=50)
    c["logits"][2, 7] = float("nan")  # request 1's first row
    md = SamplingMetadata(torch.ones(3), False, True, seeds=torch.arange(3),
                          positions=torch.zeros(3, dtype=torch.int64))
    out, status = call(c, md, return_status=True)
    assert out[1].tolist() == [PH] * 3 and status[1] & Status.NONFINITE_LOGITS
    assert bool((out[[0, 2], 0] >= 0).all()) and status[0] == 0 and status[2] == 0
    d, q, logits, bonus = c["drafts"], c["q"], c["logits"], c["bonus"]
    with pytest.raises(ValueError, match="num_draft_tokens sum to 5 but draft_token_ids has 6 tokens"):
        rejection_sample(d, [2, 2, 1], 2, None, q, logits, bonus, md)
    with pytest.raises(ValueError, match="a request has 2 drafts, more than max_spec_len = 1"):
        rejection_sample(d, [2, 2, 2], 1, None, q, logits, bonus, md)
    with pytest.raises(ValueError, match="bonus_token_ids is None, so target_logits must include the bonus rows"):
        rejection_sample(d, [2, 2, 2], 2, None, q, logits, None, md)
    with pytest.raises(ValueError, match="target_logits must have 6 \\(draft positions\\) or 9"):
        rejection_sample(d, [2, 2, 2], 2, None, q, logits[:5], bonus, md)
    with pytest.raises(ValueError, match="pass num_draft_tokens or cu_num_draft_tokens"):
        rejection_sample(d, None, 2, None, q, logits, bonus, md)
    with pytest.raises(ValueError, match="seeds and .positions must be given together"):
        rejection_sample(d, [2, 2, 2], 2, None, q, logits, bonus, SamplingMetadata(torch.ones(3), False, True,
                                                                                    seeds=torch.arange(3)))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    c = random_case(B=16, k=5, V=32001, seed=9)
    md = dict(top_k=torch.full((16,), 50), top_p=torch.full((16,), 0.9), seeds=torch.arange(16),
              positions=torch.full((16,), 3, dtype=torch.int64))
    temperature = torch.linspace(0, 1.2, 16)
    cpu = call(c, SamplingMetadata(temperature, False, False, **md), return_status=True)
    cuda_case = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    md_cuda = {k: v.cuda() for k, v in md.items()}
    cuda = call(cuda_case, SamplingMetadata(temperature.cuda(), False, False, **md_cuda), return_status=True)
    for a, b in zip(cpu, cuda):
        assert torch.equal(a, b.cpu())
