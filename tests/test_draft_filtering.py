"""Drafts sampled under the request's top-k / top-p (decoding/filtering.py,
DraftModelDrafter): the device-side filter against a brute-force float64
one (ties and every off value included), the drafter handing verification
exactly the filtered rows it sampled from, and the host-known switch that
skips the filters' work when every request has them off. Losslessness with
filtered drafts is tested in test_decoding.py (goodness of fit)."""
from __future__ import annotations

import pytest
import torch

import dspark_ops.decoding.drafters as drafters_mod
import dspark_ops.decoding.dspark as dspark_mod
from dspark_ops import Purpose, sample
from dspark_ops.decoding import (BuiltinModel, BuiltinTarget, DraftModelDrafter, DSparkConfig, DSparkDrafter,
                                 DSparkHead, ModelConfig, SpeculativeDecoder)
from dspark_ops.decoding.filtering import filter_top_k_top_p
from dspark_ops.decoding.loop import filters_on
from test_decoding import _one_thread  # noqa: F401 (the autouse fixture: one torch thread for tiny models)


def brute_keep(row: torch.Tensor, t: float, k: int, p: float):
    """DESIGN §2's kept set of one row in float64 by definition, and whether
    a top-p mass lies within 1e-6 of p (a boundary float32 may decide
    either way)."""
    V = row.numel()
    x = row.double()
    if t <= 0:
        return torch.ones(V, dtype=torch.bool), False
    keep = torch.ones(V, dtype=torch.bool)
    if 0 < k < V:
        keep = (x.unsqueeze(0) > x.unsqueeze(1)).sum(1) < k  # fewer than k strictly larger
    probs = torch.softmax((x / t).masked_fill(~keep, float("-inf")), 0)
    above = ((probs.unsqueeze(0) > probs.unsqueeze(1)) * probs.unsqueeze(0)).sum(1)  # strictly more probable mass
    if p < 1:
        keep &= above < p
    top = x == x.max()
    keep |= top  # the largest logit (and its ties) always
    near = (above - p).abs() < 1e-6
    near[top] = False
    return keep, bool(near.any()) if p < 1 else False


@pytest.mark.parametrize("V", [7, 50, 259])
def test_filter_matches_brute_force(V):
    g = torch.Generator().manual_seed(V)
    R = 96
    logits = torch.randn(R, V, generator=g) * 2
    logits[::3] = (logits[::3] * 2).round() / 2  # ties
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.randint(0, 4, (R,), generator=g)]
    top_k = torch.tensor([0, 1, 3, V, V + 5, -1])[torch.randint(0, 6, (R,), generator=g)].to(torch.int32)
    top_p = torch.tensor([1.0, 0.95, 0.6, 0.0, 1.5])[torch.randint(0, 5, (R,), generator=g)]
    before = logits.clone()
    out = filter_top_k_top_p(logits, temperature, top_k, top_p)
    assert torch.equal(logits, before)  # the input is not modified
    kept = torch.isfinite(out)
    assert torch.equal(out[kept], logits[kept])  # kept logits unchanged, the rest -inf
    assert bool((out[~kept] == float("-inf")).all())
    checked = 0
    for r in range(R):
        want, close = brute_keep(logits[r], float(temperature[r]), int(top_k[r]), float(top_p[r]))
        if close:
            continue
        assert torch.equal(kept[r], want), (r, float(temperature[r]), int(top_k[r]), float(top_p[r]))
        checked += 1
    assert checked > R * 0.9


def test_filter_keeps_or_cuts_ties_together():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [5.0, 1.0, 1.0, 1.0]])
    out = filter_top_k_top_p(logits, torch.ones(3), torch.zeros(3, dtype=torch.int32), torch.zeros(3))
    assert torch.isfinite(out).tolist() == [[False, True, True, False], [True] * 4, [True, False, False, False]]
    out = filter_top_k_top_p(logits, torch.ones(3), torch.tensor([2, 1, 2]), None)  # ties with the k-th kept
    assert torch.isfinite(out).tolist() == [[False, True, True, False], [True] * 4, [True] * 4]


def test_filters_on():
    assert not filters_on(1.0, 0, 1.0) and not filters_on(0.7, [0, 0], [1.0, 1.5])
    assert filters_on(1.0, 5, 1.0) and filters_on(1.0, 0, 0.9) and filters_on(1.0, [0, 3], 1.0)
    assert filters_on(0.5, 0, [1.0, 0.5]) and filters_on(1.0, torch.tensor([0, 2]), 1.0)
    assert not filters_on(1.0, torch.zeros(3), torch.ones(3))
    assert not filters_on(0.0, 50, 0.9)  # greedy requests: nothing to filter
    assert not filters_on([0.0, 1.0], [50, 0], [1.0, 1.0]) and filters_on([0.0, 1.0], [0, 50], 1.0)
    assert not filters_on(1.0, float("nan"), float("nan"))


def test_filter_in_half_precision_and_with_one_filter():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [3.0, 0.0, 0.0, -1.0]])
    t = torch.tensor([1e-9, 1.0])  # a tiny temperature is not greedy: top-p keeps the argmax only
    want = filter_top_k_top_p(logits, t, None, torch.tensor([0.5, 0.5]))
    assert torch.isfinite(want).tolist() == [[False, True, False, True], [True, False, False, False]]
    for dtype in (torch.float16, torch.bfloat16):
        out = filter_top_k_top_p(logits.to(dtype), t, None, torch.tensor([0.5, 0.5]))
        assert out.dtype == dtype and torch.equal(torch.isfinite(out), torch.isfinite(want))
    k_only = filter_top_k_top_p(logits, torch.ones(2), torch.tensor([1, -3]), None)  # negative: off
    assert torch.isfinite(k_only).tolist() == [[False, True, False, True], [True] * 4]


def _pair(V=40):
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden=64, max_seq_len=128)
    target, draft = BuiltinModel(cfg), BuiltinModel(cfg)
    for m in (target, draft):
        with torch.no_grad():
            m.head.weight.mul_(100.0)  # peaked enough that top-p cuts
    return BuiltinTarget(target), BuiltinTarget(draft)


class _Recording(DraftModelDrafter):
    """Keeps every Draft it proposes, and the counters it drew with."""

    def propose(self, seqs, state, sampling):
        d = super().propose(seqs, state, sampling)
        self.drafts = getattr(self, "drafts", []) + [(d.tokens.clone(), d.draft_logits.clone())]
        self.counters = getattr(self, "counters", []) + [(sampling.seed.clone(), state.position.clone())]
        return d


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (3, 1.0), (0, 0.5), (4, 0.7)])
def test_draft_model_drafts_come_from_the_filtered_rows_it_hands_over(monkeypatch, top_k, top_p):
    target, draft = _pair()
    filtered = []  # (the draft model's row, its filtered form) per draw
    real = drafters_mod.filter_top_k_top_p

    def recording(rows, *a):
        out = real(rows, *a)
        filtered.append((rows.clone(), out.clone()))
        return out
    monkeypatch.setattr(drafters_mod, "filter_top_k_top_p", recording)
    rec = _Recording(draft, 4, filter_drafts=True)
    prompts = [[1, 2, 3], [7], [9, 9, 9, 9, 2]]
    T = 0.7
    SpeculativeDecoder(target, rec).generate(prompts, 12, temperature=T, top_k=top_k, top_p=top_p, seed=3)
    assert len(filtered) == 4 * len(rec.drafts)
    saw_cut = False
    for step, ((tokens, rows), (seed, position)) in enumerate(zip(rec.drafts, rec.counters)):
        draws = filtered[4 * step: 4 * step + 4]
        assert torch.equal(rows, torch.stack([out for _, out in draws], 1))  # verification reads what was sampled
        for j in range(rows.shape[1]):  # ... and each draft is the draw from its handed row (DRAFT, slot j + 1)
            again = sample(rows[:, j], temperature=T, seed=seed, position=position, purpose=Purpose.DRAFT, slot=j + 1)
            assert torch.equal(again.tokens, tokens[:, j])
        for raw, out in draws:  # the filter on the draft model's own rows, against the brute-force one
            for r in range(raw.shape[0]):
                want, close = brute_keep(raw[r], T, top_k, top_p)
                assert close or torch.equal(torch.isfinite(out[r]), want)
        saw_cut |= bool((~torch.isfinite(rows)).any())
    assert saw_cut  # the filter cut something (the goodness-of-fit tests pass with or without it: lossless either way)


def test_greedy_requests_beside_filtered_ones_decode_as_the_target_alone():
    target, draft = _pair()
    prompts = [[1, 2, 3], [7], [9, 9, 9, 9, 2]]
    greedy = SpeculativeDecoder(target).generate(prompts, 10, temperature=0.0).tokens
    mixed = SpeculativeDecoder(target, DraftModelDrafter(draft, 3, filter_drafts=True)).generate(
        prompts, 10, temperature=[0.0, 1.0, 0.0], top_k=3, top_p=[1.0, 0.8, 0.5], seed=2)
    assert mixed.tokens[0] == greedy[0] and mixed.tokens[2] == greedy[2]


def test_a_kept_draft_chain_switches_between_filtered_and_unfiltered_calls():
    """cuda_graph=True keeps the draft chain's static buffers between calls
    (eager on the CPU); a filtered and an unfiltered chain are different
    step shapes: each call equals a fresh eager decoder's."""
    target, draft = _pair()
    prompts = [[1, 2, 3], [7]]
    kept = SpeculativeDecoder(target, DraftModelDrafter(draft, 3, cuda_graph=True, filter_drafts=True),
                              cuda_graph=True)
    for kw in (dict(top_k=3), dict(), dict(top_p=[0.6, 1.0]), dict(top_k=torch.tensor([2, 0]), top_p=0.9), dict()):
        fresh = SpeculativeDecoder(target, DraftModelDrafter(draft, 3, filter_drafts=True)).generate(
            prompts, 9, temperature=0.8, seed=5, **kw)
        again = kept.generate(prompts, 9, temperature=0.8, seed=5, **kw)
        assert again.tokens == fresh.tokens and again.stats["steps"] == fresh.stats["steps"]


def test_filter_drafts_false_and_filters_off_sample_unfiltered_rows(monkeypatch):
    target, draft = _pair()
    calls = []
    real = drafters_mod.filter_top_k_top_p
    monkeypatch.setattr(drafters_mod, "filter_top_k_top_p", lambda *a: calls.append(1) or real(*a))
    for drafter, kw in ((_Recording(draft, 3), dict(top_k=2)),  # the default: unfiltered
                        (_Recording(draft, 3, filter_drafts=True), dict(top_k=0, top_p=1.0))):
        SpeculativeDecoder(target, drafter).generate([[1, 2, 3]], 8, temperature=1.0, seed=4, **kw)
        assert all(bool(torch.isfinite(rows).all()) for _, rows in drafter.drafts)
    assert calls == []
    SpeculativeDecoder(target, _Recording(draft, 3, filter_drafts=True)).generate([[1, 2, 3]], 8, temperature=1.0,
                                                                                  top_k=2, seed=4)
    assert calls


def test_dspark_passes_filters_to_markov_draft_only_when_some_request_uses_them(monkeypatch):
    target, _ = _pair()
    m = target.model
    head = DSparkHead(DSparkConfig(dim=m.cfg.dim, vocab_size=m.cfg.vocab_size, hidden_layers=(0, 1), block=3,
                                   mlp_hidden=16, rank=4))
    seen = []
    real = dspark_mod.markov_draft
    monkeypatch.setattr(dspark_mod, "markov_draft", lambda *a, **kw: seen.append("top_k" in kw) or real(*a, **kw))
    dec = SpeculativeDecoder(target, DSparkDrafter(m, head))
    dec.generate([[1, 2], [3]], 5, temperature=[1.0, 0.5], seed=1)
    assert seen and not any(seen)
    seen.clear()
    dec.generate([[1, 2], [3]], 5, temperature=1.0, top_p=[1.0, 0.8], seed=1)
    assert seen and all(seen)
