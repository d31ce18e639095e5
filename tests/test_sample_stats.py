"""Goodness of fit: `sample` draws exactly from the processed target
distribution. Exact chi-square against the analytic probabilities at fixed
seeds, with negative controls (deliberately wrong samplers) that the same
test must reject, so a passing test means something."""
import pytest
import torch

import dspark_ops
from dspark_ops import reference as ref
from helpers import chi_square_pvalue

N = 20000  # draws per test: positions 0..N-1 of one seed
LOGITS = torch.tensor([2.0, 1.5, 1.5, 0.3, 0.0, -0.4, -1.0, -2.0, float("-inf"), 0.9])
P_PASS, P_REJECT = 1e-3, 1e-6


def target_probs(logits, temperature, top_k, top_p):
    """The processed distribution in float64: keep set by the spec's rules,
    softmax of logits / temperature over it."""
    x = logits / torch.tensor(temperature, dtype=torch.float32)
    keep = ref.topp_keep(x, ref.topk_keep(x, top_k), top_p) & (x > float("-inf"))
    w = torch.where(keep, torch.exp(x.double() - x.double()[keep].max()), torch.zeros((), dtype=torch.float64))
    return w / w.sum()


def draw(temperature, top_k, top_p, seed=12345, device="cpu"):
    logits = LOGITS.unsqueeze(0).to(device)
    res = dspark_ops.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            position=torch.arange(N, device=device),
                            row_start=torch.zeros(N, dtype=torch.int32, device=device))
    assert int(res.status.max()) == 0
    return res.tokens.cpu().long()


CASES = {
    "temperature": (1.0, 0, 1.0),
    "low_temperature": (0.5, 0, 1.0),
    "top_k_with_tie": (1.0, 2, 1.0),  # the tie for 2nd place keeps 3 tokens
    "top_p": (1.3, 0, 0.8),
    "top_k_then_top_p": (1.0, 4, 0.8),  # top-p after top-k keeps 3 tokens, before it 4
}


@pytest.mark.parametrize("case", list(CASES))
def test_sample_follows_target(case):
    T, k, p = CASES[case]
    probs = target_probs(LOGITS, T, k, p)
    assert chi_square_pvalue(draw(T, k, p), probs) > P_PASS


def test_top_k_tie_rule_in_expectation():
    probs = target_probs(LOGITS, 1.0, 2, 1.0)
    assert (probs > 0).nonzero().flatten().tolist() == [0, 1, 2]


def test_negative_control_wrong_temperature_is_rejected():
    # Sampling at T = 1.15 while the target is T = 1: a 15 % error must fail.
    assert chi_square_pvalue(draw(1.15, 0, 1.0), target_probs(LOGITS, 1.0, 0, 1.0)) < P_REJECT


def test_negative_control_wrong_race_is_rejected():
    # argmax x + E (a plausible typo for x - log E) is not a sample of softmax(x).
    x = LOGITS
    tokens = []
    for pos in range(N // 4):
        bits = ref.random_bits(12345, pos, 3, 0, x.shape[0])
        tokens.append(int(torch.argmax(x + ref.exponential_from_bits(bits))))
    assert chi_square_pvalue(torch.tensor(tokens), target_probs(LOGITS, 1.0, 0, 1.0)) < P_REJECT


def test_negative_control_top_p_without_top_k_first_is_rejected():
    # Applying top-p to the unfiltered distribution instead of after top-k.
    T, k, p = CASES["top_k_then_top_p"]
    wrong = target_probs(LOGITS, T, 0, p)
    assert (wrong > 0).sum() == 4 and (target_probs(LOGITS, T, k, p) > 0).sum() == 3
    tokens = draw(T, k, p)
    assert chi_square_pvalue(tokens, wrong) < P_REJECT


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CASES))
def test_sample_follows_target_cuda(case):
    T, k, p = CASES[case]
    assert chi_square_pvalue(draw(T, k, p, device="cuda"), target_probs(LOGITS, T, k, p)) > P_PASS
