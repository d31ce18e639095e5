"""Losslessness of verify_chunk: the emitted tokens follow the target
exactly, whatever the drafts. Exact chi-square at fixed seeds against the
analytic target distributions, with negative controls (the bugs peers
shipped) that the same test must reject."""
import pytest
import torch

import dspark_ops
from dspark_ops import reference as ref
from helpers import chi_square_pvalue

N, V, n = 20000, 6, 2
P_PASS, P_REJECT = 1e-3, 1e-6
TARGET = torch.tensor([[1.2, 0.4, -0.3, 0.9, -1.5, 0.0],
                       [-0.2, 1.0, 0.6, -1.0, 0.3, 0.8],
                       [0.5, -0.5, 1.5, 0.1, -0.7, 0.2]])
DRAFT = torch.tensor([[0.1, 1.3, 0.2, -0.4, 0.8, -1.0],
                      [0.9, -0.6, 0.4, 0.7, -1.2, 0.5]])


def target_p(j, temperature=1.0, top_k=0, top_p=1.0):
    return ref.target_distribution(TARGET[j], temperature, top_k, top_p)[1]


def run(q_rows, draft_tokens_from, mode, device="cpu", **kw):
    """N requests sharing the target rows (target_row_start = 0); drafts
    [N, n] drawn from `draft_tokens_from` rows ([n, V] probabilities) or
    given as a fixed [n] tensor; q passed as `mode` ("probs", "logits" with
    q_rows as logits, or "none")."""
    g = torch.Generator().manual_seed(2024)
    if draft_tokens_from.dim() == 2:
        drafts = torch.stack([torch.multinomial(draft_tokens_from[j], N, replacement=True, generator=g)
                              for j in range(n)], 1).to(torch.int32)
    else:
        drafts = draft_tokens_from.to(torch.int32).expand(N, n).contiguous()
    kwargs = dict(kw)
    if mode == "probs":
        kwargs["draft_probs"] = q_rows.repeat(N, 1).to(device)
    elif mode == "logits":
        kwargs["draft_logits"] = q_rows.repeat(N, 1).to(device)
    cu = (torch.arange(N + 1, dtype=torch.int32) * n).to(device)
    res = dspark_ops.verify_chunk(TARGET.to(device), drafts.reshape(-1).to(device), cu, max_draft=n,
                                  target_row_start=torch.zeros(N, dtype=torch.int32, device=device), seed=77,
                                  position=torch.arange(N, device=device), **kwargs)
    assert int(res.status.max()) == 0
    return res.tokens.cpu().long(), res.accepted.cpu()


def assert_follows_target(tokens, accepted, **target_kw):
    assert chi_square_pvalue(tokens[:, 0], target_p(0, **target_kw)) > P_PASS
    second = tokens[accepted >= 1, 1]  # given the first draft was accepted
    assert second.numel() > 1000
    assert chi_square_pvalue(second, target_p(1, **target_kw)) > P_PASS


Q = torch.softmax(DRAFT, -1)


def test_q_differs_from_p_probs():
    assert_follows_target(*run(Q, Q, "probs"))


def test_q_differs_from_p_logits_with_draft_temperature():
    q_at_t = torch.softmax(DRAFT / 0.7, -1)
    assert_follows_target(*run(DRAFT, q_at_t, "logits", draft_temperature=0.7))


def test_q_equals_p_accepts_everything():
    p = torch.stack([target_p(0), target_p(1)]).float()
    tokens, accepted = run(p, p, "probs")
    assert bool((accepted == n).all())
    assert_follows_target(tokens, accepted)


def test_one_hot_drafts():
    tokens, accepted = run(None, torch.tensor([3, 1]), "none")
    assert_follows_target(tokens, accepted)


def test_target_top_k():
    tokens, accepted = run(Q, Q, "probs", top_k=3)
    assert_follows_target(tokens, accepted, top_k=3)


def test_target_top_p_and_temperature():
    tokens, accepted = run(DRAFT, Q, "logits", temperature=0.8, top_p=0.8)
    assert_follows_target(tokens, accepted, temperature=0.8, top_p=0.8)


def test_negative_control_draft_probs_that_are_not_the_sampling_distribution():
    # Drafts drawn from q but p passed as their distribution: all accepted,
    # the output follows q. The test must catch it.
    p = torch.stack([target_p(0), target_p(1)]).float()
    tokens, _ = run(p, Q, "probs")
    assert chi_square_pvalue(tokens[:, 0], target_p(0)) < P_REJECT


def test_negative_control_argmax_drafts_passed_as_sampled():
    # Drafts taken by argmax of q, verified as if sampled from q.
    tokens, _ = run(Q, Q.argmax(-1), "probs")
    assert chi_square_pvalue(tokens[:, 0], target_p(0)) < P_REJECT


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["probs", "logits", "none"])
def test_follows_target_cuda(case):
    if case == "none":
        tokens, accepted = run(None, torch.tensor([3, 1]), "none", device="cuda")
    else:
        tokens, accepted = run(Q if case == "probs" else DRAFT, Q, case, device="cuda", top_p=0.9)
    assert_follows_target(tokens, accepted, **({} if case == "none" else {"top_p": 0.9}))
