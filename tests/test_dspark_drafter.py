"""DSparkDrafter (dspark_ops/decoding/dspark.py) in the speculative loop, on
tiny random BuiltinModels and random heads:

1. greedy speculative output == greedy target-only output (batched, ragged,
   one-token prompts, stop tokens; every schedule);
2. the context the drafter sees is the target's hidden states of the
   processed tokens (an independent forward): the last token's features,
   and with context attention every token's keys and values; the inference
   form equals the training form;
3. sampled output follows the target distribution (chi-square on the first
   two tokens), also with a confidence schedule cutting blocks;
4. the drafter samples through markov_draft with the verifier's seed and
   position (purpose DRAFT inside the op), and its schedule cuts blocks as
   schedule_verify says; argument errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import dspark_ops.decoding.dspark as dspark_mod
import dspark_ops.decoding.session as session_mod
from dspark_ops import schedule_verify
from dspark_ops.decoding import (BuiltinTarget, Draft, DSparkConfig, DSparkDrafter, DSparkHead,
                                 SpeculativeDecoder, request_seed)
from dspark_ops.decoding.dspark import step_sps_table, target_sps_table
from test_decoding import _one_thread  # noqa: F401 (the autouse fixture: one torch thread for tiny models)
from test_decoding import (LENGTHS, MAX_NEW, N_STATS, STATS_CFG, STATS_PROMPT, V_GREEDY, V_STATS, cloned,
                           cut_at_stop, exact_joint, goodness_of_fit, make_model, make_prompts, naive_greedy,
                           pick_stops)


def make_head(dim: int, vocab: int, layers, *, block: int = 4, seed: int = 0, scale: float = 0.5,
              heads: int = 0) -> DSparkHead:
    """A random head whose drafts depend on the features and the anchor
    (the default init's near-zero Markov head would hide bugs in them);
    heads > 0: with context attention."""
    torch.manual_seed(seed)
    head = DSparkHead(DSparkConfig(dim=dim, vocab_size=vocab, hidden_layers=tuple(layers), block=block,
                                   mlp_hidden=24, rank=6, context_heads=heads, context_head_dim=8))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, scale)
    return head


def share_context(dst: DSparkDrafter, src: DSparkDrafter) -> None:
    """dst drafts from src's context (its last features and key/value cache)."""
    dst.c_last = src.c_last
    if src.head.cfg.context_heads:
        dst.keys, dst.values, dst.lengths = src.keys, src.values, src.lengths


@pytest.fixture(scope="module")
def greedy_setup():
    model = make_model(V_GREEDY, 0)
    prompts = make_prompts(V_GREEDY, LENGTHS, seed=2)
    nostop = [naive_greedy(model, p, MAX_NEW) for p in prompts]
    stops = pick_stops(nostop, MAX_NEW)
    return model, prompts, nostop, stops, [cut_at_stop(o, stops) for o in nostop]


STEEP_SPS = torch.tensor([0.0] + [1000.0 / (1 + 0.6 * b) for b in range(1, 80)], dtype=torch.float64)


def drafter_for(target, head, schedule):
    kw = {None: {}, "threshold": dict(threshold=0.4), "early_stop": dict(sps_table=STEEP_SPS),
          "budget": dict(budget=5)}[schedule]
    return DSparkDrafter(target, head, schedule=schedule, **kw)


class FeatureRecorder(DSparkDrafter):
    """Records each step's sequences, the context it drafts from (the last
    features, and with attention the key/value cache) and its drafts."""

    def start(self, num_requests, max_len, device):
        super().start(num_requests, max_len, device)
        self.seen = []

    def propose(self, seqs, state, sampling):
        draft = super().propose(seqs, state, sampling)
        kv = (self.keys.clone(), self.values.clone(), self.lengths.clone()) if self.head.cfg.context_heads else None
        self.seen.append(([list(s) for s in seqs], self.c_last.clone(), kv, draft.tokens.clone()))
        return draft


class OracleRecorder(FeatureRecorder):
    """Records like FeatureRecorder, but proposes the target's own greedy
    continuation with its last draft made wrong (point masses): every step
    accepts n - 1 drafts and rejects one, so the rows after the accepted
    ones must be left out of the context."""

    def propose(self, seqs, state, sampling):
        super().propose(seqs, state, sampling)
        n = self.num_draft
        rows = [naive_greedy(self.oracle, s, n) for s in seqs]
        rows = [r[:-1] + [(r[-1] + 1) % V_GREEDY] for r in rows]
        return Draft(torch.tensor(rows, dtype=torch.int32))


@pytest.mark.parametrize("heads", [0, 2])
@pytest.mark.parametrize("schedule", [None, "threshold", "early_stop", "budget"])
def test_greedy_equals_target_greedy(greedy_setup, schedule, heads):
    model, prompts, nostop, stops, expected = greedy_setup
    target = BuiltinTarget(model)
    drafter = drafter_for(target, make_head(32, V_GREEDY, (0, 1), heads=heads), schedule)
    res = SpeculativeDecoder(target, drafter).generate(prompts, MAX_NEW, stop_tokens=stops)
    assert res.tokens == expected
    assert res.errors == [0] * len(prompts)
    res = SpeculativeDecoder(target, drafter).generate(prompts, MAX_NEW)
    assert res.tokens == nostop


@pytest.mark.parametrize("heads", [0, 2])
def test_one_token_prompts_start_from_zero_features(greedy_setup, heads):
    model = greedy_setup[0]
    target = BuiltinTarget(model)
    drafter = FeatureRecorder(target, make_head(32, V_GREEDY, (1,), heads=heads))
    prompts = [[5], [9]]
    res = SpeculativeDecoder(target, drafter).generate(prompts, 6)
    assert res.tokens == [naive_greedy(model, p, 6) for p in prompts]
    assert not drafter.seen[0][1].any()  # no context yet: zeros
    assert drafter.seen[1][1].abs().sum() > 0
    if heads:
        assert drafter.seen[0][2][2].tolist() == [0, 0] and drafter.seen[1][2][2].min() >= 1


@pytest.mark.parametrize("heads", [0, 2])
def test_context_is_the_targets_hidden_states_of_the_processed_tokens(greedy_setup, heads):
    """The drafter drafts after seq (its last token the anchor, not yet
    through the target): its last context features must be those of the
    target's hidden states (layers 0 and 1) at seq[-2], and with context
    attention its cache must hold the keys and values of every token of
    seq[:-1], in order — exactly what a fresh forward of seq[:-1] gives,
    also after steps that accepted drafts (which skip the rejected rows)."""
    model, prompts, *_ = greedy_setup
    target = BuiltinTarget(model)
    head = make_head(32, V_GREEDY, (0, 1), seed=3, heads=heads)
    drafter = OracleRecorder(target, head)
    drafter.oracle = model
    prompts = [prompts[1], prompts[2], prompts[4]]  # lengths >= 2
    res = SpeculativeDecoder(target, drafter).generate(prompts, 12, temperature=0.0)
    checked = 0
    for seqs, c_last, kv, _ in drafter.seen:
        for r, seq in enumerate(seqs):
            L = len(seq) - 1
            cache = target.new_cache(1, L + 1)
            with torch.inference_mode():
                _, hidden = target.forward(torch.tensor(seq[:-1]), torch.arange(L),
                                           torch.tensor([0, L], dtype=torch.int32), cache, hidden_layers=(0, 1))
                c = head.infer_context(hidden.unsqueeze(0))[0]  # [L, dim]
            torch.testing.assert_close(c_last[r], c[-1], rtol=1e-9, atol=1e-9)
            if heads:
                keys, values, lengths = kv
                assert int(lengths[r]) == L
                fw = head.fused(c.dtype)
                torch.testing.assert_close(keys[r, :L].flatten(1), c @ fw.ctx_k.t(), rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(values[r, :L].flatten(1), c @ fw.ctx_v.t(), rtol=1e-9, atol=1e-9)
            checked += 1
    assert checked == sum(len(s) for s, *_ in drafter.seen)
    assert res.stats["mean_accepted"] == drafter.num_draft - 1  # each step: the rejected row left out


def test_the_markov_head_chains_each_draft_on_the_one_before(greedy_setup):
    """A head with a zero backbone and a dominant Markov head encoding a
    fixed map a -> nxt[a]: greedy drafts must be nxt[anchor],
    nxt[nxt[anchor]], ... (step k conditions on the draft x_{k-1} it just
    sampled), and the output is still the target's own."""
    model, prompts, *_ = greedy_setup
    target = BuiltinTarget(model)
    V = V_GREEDY
    nxt = torch.randint(0, V, (V,), generator=torch.Generator().manual_seed(5))
    head = DSparkHead(DSparkConfig(dim=32, vocab_size=V, hidden_layers=(1,), block=4, mlp_hidden=24, rank=V))
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.markov_w1.copy_(torch.eye(V, dtype=torch.float32) * 100)  # w1[a] @ w2 = 100 x onehot(nxt[a])
        head.markov_w2.copy_(torch.eye(V, dtype=torch.float32)[nxt])
    rec = FeatureRecorder(target, head)
    res = SpeculativeDecoder(target, rec).generate(prompts, MAX_NEW)
    assert res.tokens == SpeculativeDecoder(target).generate(prompts, MAX_NEW).tokens
    for seqs, _, _, toks in rec.seen:
        for r, seq in enumerate(seqs):
            a = seq[-1]
            for j in range(toks.shape[1]):
                a = int(nxt[a])
                assert int(toks[r, j]) == a


@pytest.fixture(scope="module")
def stats_target():
    return BuiltinTarget(make_model(V_STATS, 20, cfg=STATS_CFG, dtype=torch.float32))


@pytest.mark.parametrize("temperature,top_k,schedule,heads", [
    (1.0, 0, None, 0), (0.7, 3, None, 0),  # top-k: the drafts are filtered too
    (1.0, 0, "threshold", 0), (1.0, 0, "early_stop", 0), (0.7, 3, "budget", 0),  # cut blocks: -1 from p
    (1.0, 0, None, 2)])
def test_sampled_output_follows_target_distribution(stats_target, temperature, top_k, schedule, heads):
    head = make_head(16, V_STATS, (0,), block=3, seed=7, scale=0.3, heads=heads)
    # early_stop: a steep table (each token of the batch costs more), covering R (n + 1) tokens
    sps = 1.0 / (1.0 + torch.arange(4 * N_STATS + 1, dtype=torch.float64) / (1.5 * N_STATS))
    drafter = DSparkDrafter(stats_target, head, schedule=schedule, threshold=0.45, sps_table=sps,
                            budget=N_STATS)
    res = SpeculativeDecoder(stats_target, drafter).generate([STATS_PROMPT] * N_STATS, 2, temperature=temperature,
                                                             top_k=top_k, seed=4321)
    assert res.errors == [0] * N_STATS
    pvalue, tv = goodness_of_fit(exact_joint(stats_target, STATS_PROMPT, temperature, top_k, 1.0), res.tokens)
    assert pvalue > 1e-3, (pvalue, tv, res.stats["mean_accepted"])
    assert res.stats["mean_accepted"] > 0.1  # drafts were accepted, not only rejected


def test_drafts_come_from_markov_draft_with_the_verifiers_seed_and_position(monkeypatch):
    V = 40
    model = make_model(V, 30, dtype=torch.float32)
    target = BuiltinTarget(model)
    draft_calls, verify_calls = [], []
    real_markov, real_verify = dspark_mod.markov_draft, session_mod.verify_chunk

    def rec_markov(*args, **kw):
        res = real_markov(*args, **kw)
        draft_calls.append((cloned(kw), res.draft_logits.clone()))
        return res

    def rec_verify(*args, **kw):
        verify_calls.append(cloned(kw))
        return real_verify(*args, **kw)

    monkeypatch.setattr(dspark_mod, "markov_draft", rec_markov)
    monkeypatch.setattr(session_mod, "verify_chunk", rec_verify)
    prompts = make_prompts(V, [3, 8, 1], seed=32)
    temps = [0.9, 0.0, 1.3]
    res = SpeculativeDecoder(target, DSparkDrafter(target, make_head(32, V, (1,)))).generate(
        prompts, 10, temperature=temps, top_k=[0, 0, 3], seed=77)
    assert len(draft_calls) == len(verify_calls) == res.stats["steps"]
    seeds = torch.tensor([request_seed(77, r) for r in range(len(prompts))])
    for (kw, logits), vkw in zip(draft_calls, verify_calls):
        assert torch.equal(kw["seed"], seeds) and torch.equal(vkw["seed"], seeds)
        assert torch.equal(kw["position"], vkw["position"])
        # verification reads exactly what markov_draft wrote, at temperature 1 (0: a greedy point mass); [R G, V]
        # in place once a request finished (a ragged pass: finished requests verify no drafts)
        torch.testing.assert_close(vkw["draft_logits"].reshape(logits.shape), logits, rtol=0, atol=0)
        assert vkw["draft_temperature"].tolist() == [1.0, 0.0, 1.0]
        assert kw["top_k"].tolist() == [0, 0, 3]  # the request's top-k filters its drafts
        assert (torch.isfinite(logits[2]).sum(-1) <= 3).all() and (torch.isfinite(logits[0]).sum(-1) == V).all()


@pytest.mark.parametrize("schedule", ["threshold", "early_stop"])
def test_schedule_cuts_blocks_as_schedule_verify_says(greedy_setup, schedule):
    model, prompts, *_ = greedy_setup
    target = BuiltinTarget(model)
    head = make_head(32, V_GREEDY, (0, 1), seed=9)
    kw = dict(threshold=0.4) if schedule == "threshold" else dict(sps_table=STEEP_SPS)
    drafter = DSparkDrafter(target, head, schedule=schedule, **kw)
    uncut = DSparkDrafter(target, head, with_confidence=True)
    widths = []

    def checked(seqs, state, sampling):
        share_context(uncut, drafter)
        full = uncut.propose(seqs, state, sampling)  # the same draws (greedy), not cut
        cut = DSparkDrafter.propose(drafter, seqs, state, sampling)
        R, n = full.tokens.shape
        counts = torch.where(state.finished, 0, n).to(torch.int32)  # finished requests draft nothing
        length = schedule_verify(full.confidence, counts, STEEP_SPS, mode=schedule, threshold=0.4)
        width = int(length.max())
        assert cut.tokens.shape == (R, width)
        for r in range(R):
            L = int(length[r])
            assert cut.tokens[r, :L].tolist() == full.tokens[r, :L].tolist()
            assert (cut.tokens[r, L:] == -1).all()
        widths.append(width)
        return cut

    drafter.propose = checked
    uncut.start(len(prompts), 1, torch.device("cpu"))  # its context comes from drafter's (share_context)
    res = SpeculativeDecoder(target, drafter).generate(prompts, MAX_NEW)
    assert res.errors == [0] * len(prompts)
    assert min(widths) < head.cfg.block and max(widths) > 0, widths  # cut, but not to nothing


@pytest.mark.parametrize("heads", [0, 2])
def test_the_prefill_hands_over_every_prompt_row_only_with_context_attention(greedy_setup, heads):
    """Without context attention the head reads each request's last
    processed row only: the prefill's observe() gets [R, 1, k, d] (not
    [R, longest prompt, k, d]), and the drafts are those every row gives."""
    model, prompts, *_ = greedy_setup
    target = BuiltinTarget(model)
    seen = []

    class Watching(DSparkDrafter):
        def observe(self, rows, processed):
            seen.append((None if rows is None else tuple(rows.shape),
                         None if processed is None else processed.tolist()))
            super().observe(rows, processed)

    class EveryRow(Watching):
        observe_last_only = False  # what the loop handed over before: every prompt row

    head = make_head(32, V_GREEDY, (0, 1), heads=heads)
    res = SpeculativeDecoder(target, Watching(target, head)).generate(prompts, 6, temperature=0.8, seed=2)
    R, lengths = len(prompts), [len(p) - 1 for p in prompts]
    every = ((R, max(lengths), 2, 32), lengths)
    assert seen[0] == (((R, 1, 2, 32), [min(n, 1) for n in lengths]) if heads == 0 else every)
    if heads == 0:
        seen.clear()
        again = SpeculativeDecoder(target, EveryRow(target, head)).generate(prompts, 6, temperature=0.8, seed=2)
        assert seen[0] == every
        assert again.tokens == res.tokens and again.stats["accepted_per_step"] == res.stats["accepted_per_step"]


def test_draft_lengths_are_checked(greedy_setup):
    model, prompts, *_ = greedy_setup
    target = BuiltinTarget(model)

    class BadLengths(DSparkDrafter):
        def propose(self, seqs, state, sampling):
            d = super().propose(seqs, state, sampling)
            return dataclasses.replace(d, lengths=[d.tokens.shape[1] + 1] * len(seqs))  # uniform, but too long
    with pytest.raises(ValueError, match=r"Draft.lengths must hold 8 counts in \[0, 4\]"):
        SpeculativeDecoder(target, BadLengths(target, make_head(32, V_GREEDY, (0, 1)))).generate(prompts, 4)


class PaddedPasses(DSparkDrafter):
    """The same drafts without their host-known lengths: the loop pads
    every request's block to the longest with -1 (one uniform pass)."""

    def propose(self, seqs, state, sampling):
        return dataclasses.replace(super().propose(seqs, state, sampling), lengths=None)


@pytest.mark.parametrize("gpu_path", [False, True])
@pytest.mark.parametrize("schedule", ["threshold", "early_stop"])
@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (0.9, 0), (1.0, 5)])
def test_ragged_scheduled_passes_equal_padded_ones(greedy_setup, monkeypatch, schedule, temperature, top_k, gpu_path):
    """A schedule that cuts each request's block differently sends a ragged
    target pass (each request's root and its own kept drafts: the token
    batch the SPS table priced); it decodes exactly as the padded pass the
    loop sent before (a -1 ends a chain where the count does; the emitted
    token uses the same row and slot): same tokens, same accepted counts,
    greedy and sampled, batched with stop tokens; also on the forward's GPU
    path (attention over the whole cache under a mask), run on the CPU."""
    if gpu_path:
        import dspark_ops.decoding.model as model_mod
        monkeypatch.setattr(model_mod, "_reads_lengths", lambda device: False)
    model, prompts, _, stops, _ = greedy_setup
    target = BuiltinTarget(model)
    head = make_head(32, V_GREEDY, (0, 1), seed=9)
    kw = dict(threshold=0.4) if schedule == "threshold" else dict(sps_table=STEEP_SPS)
    ragged_calls = []
    real = session_mod.DecodeSession.ragged_step

    def counting(self, toks, draft_logits, draft_t, lengths):
        ragged_calls.append(list(lengths))
        return real(self, toks, draft_logits, draft_t, lengths)
    monkeypatch.setattr(session_mod.DecodeSession, "ragged_step", counting)
    runs = []
    for cls in (DSparkDrafter, PaddedPasses):
        dec = SpeculativeDecoder(target, cls(target, head, schedule=schedule, **kw))
        runs.append(dec.generate(prompts, MAX_NEW, temperature=temperature, top_k=top_k, seed=4, stop_tokens=stops))
    ragged, padded = runs
    assert ragged.tokens == padded.tokens and ragged.errors == padded.errors == [0] * len(prompts)
    assert ragged.stats["accepted_per_step"] == padded.stats["accepted_per_step"]
    assert len(ragged_calls) >= 3  # ragged passes were sent, some with differing blocks of drafting requests
    assert any(len({n for n in c if n > 0}) > 1 for c in ragged_calls), ragged_calls


def test_confidence_is_the_heads_on_the_drafted_prefix(greedy_setup):
    """Draft.confidence[r, k] = sigmoid(conf(h_k, w1[x_{k-1}]) / T_k) with
    x_0 the anchor and x_k the drafts, recomputed from the head."""
    model, prompts, *_ = greedy_setup
    target = BuiltinTarget(model)
    head = make_head(32, V_GREEDY, (0, 1), seed=11)
    temps = torch.tensor([0.5, 1.0, 2.0, 4.0])
    drafter = DSparkDrafter(target, head, temperatures=temps, with_confidence=True)
    seen = []
    real = DSparkDrafter.propose

    def spy(seqs, state, sampling):
        c_last = None if drafter.c_last is None else drafter.c_last.clone()  # observe() replaces it
        d = real(drafter, seqs, state, sampling)
        seen.append((c_last, state.last_token.clone(), d.tokens.clone(), d.confidence.clone()))
        return d

    drafter.propose = spy
    SpeculativeDecoder(target, drafter).generate(prompts, 8)
    embed = model.embed.weight.float()
    with torch.no_grad():
        for c_last, anchor, toks, conf in seen:
            if c_last is None:
                continue
            x = (c_last.float() + embed[anchor.long()]).unsqueeze(1) + head.pos  # the training form's MLP
            y = head.mlp_norm(x)
            block = x + head.w_down(F.silu(head.w_gate(y)) * head.w_up(y))
            prev = torch.cat([anchor.unsqueeze(1).long(), toks[:, :-1].long()], 1)
            want = torch.sigmoid(head.confidence_logits(block, prev) / temps)
            torch.testing.assert_close(conf, want, rtol=1e-5, atol=1e-6)
    assert len(seen) > 2


@pytest.mark.parametrize("heads", [0, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_inference_block_equals_the_training_block(dtype, heads):
    """The inference form (fused weights, the target's RMSNorm form and
    dtype, a key/value cache grown row by row, the attention vectorised over
    the block) computes what the training form computes over a window, for
    every block of the window, and follows weight updates."""
    head = make_head(24, 50, (0, 2), block=5, seed=13, heads=heads)
    L, n = 9, 4
    feats, anchors = torch.randn(2, L, 2, 24), torch.randint(0, 50, (2, L))
    embed = torch.randn(50, 24)
    tol = dict(rtol=5e-2, atol=0.25) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)  # bf16: 8 bits
    for _ in range(2):
        want = head.block_hidden(feats, anchors, embed).detach()  # [2, L, G, dim]
        drafter_c = head.infer_context(feats.to(dtype))  # [2, L, dim]
        S = L + n + 2
        keys = torch.zeros(2, S, max(heads, 1), 8, dtype=dtype)
        values = torch.zeros_like(keys)
        if heads:
            fw = head.fused(dtype)
            keys[:, :L] = (drafter_c @ fw.ctx_k.t()).view(2, L, heads, 8)
            values[:, :L] = (drafter_c @ fw.ctx_v.t()).view(2, L, heads, 8)
        for t in range(L):
            kv = (keys, values, torch.full((2,), t + 1)) if heads else None
            got = head.infer_block(drafter_c[:, t], anchors[:, t], embed.to(dtype), n, kv)
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want[:, t, :n], **tol)
        with torch.no_grad():
            head.w_up.weight.mul_(1.5)  # in place: the fused weights must be rebuilt
            if heads:
                head.ctx_v.weight.mul_(0.5)


def test_target_sps_table(greedy_setup):
    """Steps per second of the target's forward at 1..n tokens (a table
    schedule_verify takes), and the per-step overhead added to each time."""
    target = BuiltinTarget(greedy_setup[0])
    table = target_sps_table(target, 4, context=16, warmup=1, iters=3)
    assert table.shape == (5,) and table.dtype == torch.float64
    assert bool((table > 0).all()) and bool(torch.isfinite(table).all())
    slow = target_sps_table(target, 4, context=16, overhead_s=0.5, warmup=1, iters=3)
    assert bool((slow < 2.0).all()) and bool((slow > 1.0 / (0.5 + 1.0)).all())  # 1 / (forward + 0.5 s)
    batch = target_sps_table(target, 9, requests=3, context=16, warmup=1, iters=3)  # 3 requests, 1..3 tokens each
    assert batch.shape == (10,) and bool((batch > 0).all())
    for t in (table, slow, batch):  # the convex fit: never rising with B (measured times scatter)
        assert bool((t[1:] <= t[:-1]).all()), t
    with pytest.raises(ValueError, match="requests"):
        target_sps_table(target, 2, requests=3)


def test_step_sps_table_adds_the_measured_step_overhead(greedy_setup):
    """The demo's and the schedules benchmark's cost model: the forward's
    table up to R (n + 1) tokens with a step's measured overhead (>= 0)
    added to every entry."""
    model, prompts, *_ = greedy_setup
    target = BuiltinTarget(model)
    drafter = DSparkDrafter(target, make_head(32, V_GREEDY, (0, 1), block=3))
    table, overhead = step_sps_table(target, drafter, prompts[:2], max_new=6, repeats=1)
    assert table.shape == (2 * 4 + 1,) and bool((table > 0).all()) and overhead >= 0
    assert bool((table[1:] <= table[:-1]).all())
    assert 1 / float(table[-1]) > overhead  # a step is the forward plus the overhead


def test_budget_schedule_has_a_width_known_in_advance(greedy_setup):
    """schedule='budget': the pass is min(n, budget) wide every step (no
    host read decides it), at most `budget` drafts are verified across the
    batch, each request's a prefix of its block."""
    model, prompts, *_ = greedy_setup
    target = BuiltinTarget(model)
    drafter = DSparkDrafter(target, make_head(32, V_GREEDY, (0, 1), seed=21), schedule="budget", budget=3)
    seen = []
    real = DSparkDrafter.propose

    def spy(seqs, state, sampling):
        d = real(drafter, seqs, state, sampling)
        seen.append((d.tokens.clone(), state.finished.clone()))
        return d

    drafter.propose = spy
    res = SpeculativeDecoder(target, drafter).generate(prompts, MAX_NEW)
    assert res.tokens == SpeculativeDecoder(target).generate(prompts, MAX_NEW).tokens
    for toks, finished in seen:
        assert toks.shape == (len(prompts), 3)
        kept = toks >= 0
        assert int(kept.sum()) <= 3 and not kept[finished].any()
        assert bool((kept[:, 1:] <= kept[:, :-1]).all())  # prefixes
    assert any(int((t >= 0).sum()) == 3 for t, _ in seen)


def test_early_stop_needs_a_table_covering_the_batch(greedy_setup):
    model, prompts, *_ = greedy_setup
    target = BuiltinTarget(model)
    drafter = DSparkDrafter(target, make_head(32, V_GREEDY, (0,)), schedule="early_stop", sps_table=torch.ones(10))
    with pytest.raises(ValueError, match="covers token batches up to 9"):
        SpeculativeDecoder(target, drafter).generate(prompts, 4)
    SpeculativeDecoder(target, drafter).generate(prompts[:1], 4)  # 1 request x 5 tokens: covered


def test_bad_arguments(greedy_setup):
    model = greedy_setup[0]
    target = BuiltinTarget(model)
    with pytest.raises(ValueError, match="dim 16"):
        DSparkDrafter(target, make_head(16, V_GREEDY, (0,)))
    with pytest.raises(ValueError, match="target must be a BuiltinTarget.*got Linear"):
        DSparkDrafter(torch.nn.Linear(2, 2), make_head(32, V_GREEDY, (0,)))  # e.g. not a BuiltinModel
    with pytest.raises(ValueError, match="hidden_layers"):
        DSparkDrafter(target, make_head(32, V_GREEDY, (2,)))
    with pytest.raises(ValueError, match="num_draft"):
        DSparkDrafter(target, make_head(32, V_GREEDY, (0,), block=3), num_draft=4)
    with pytest.raises(ValueError, match="lossless"):
        DSparkDrafter(target, make_head(32, V_GREEDY, (0,)), schedule="global")
    with pytest.raises(ValueError, match="sps_table"):
        DSparkDrafter(target, make_head(32, V_GREEDY, (0,)), schedule="early_stop")
    with pytest.raises(ValueError, match="threshold"):
        DSparkDrafter(target, make_head(32, V_GREEDY, (0,)), schedule="threshold")
    with pytest.raises(ValueError, match="budget"):
        DSparkDrafter(target, make_head(32, V_GREEDY, (0,)), schedule="budget")
    with pytest.raises(ValueError, match="temperatures"):
        DSparkDrafter(target, make_head(32, V_GREEDY, (0,)), temperatures=torch.ones(2))
    with pytest.raises(ValueError, match="hidden_layers"):
        DSparkConfig(dim=8, vocab_size=8, hidden_layers=())
    with pytest.raises(ValueError, match="distinct"):
        DSparkConfig(dim=8, vocab_size=8, hidden_layers=(1, 1))


@pytest.mark.parametrize("assign", [False, True])
def test_inference_weights_follow_load_state_dict(assign):
    """load_state_dict — in place, or assign=True, which puts new Parameter
    objects in place — reaches the cached fused (and packed) inference
    weights: the head then computes what a fresh head with those weights does."""
    head, other = make_head(24, 50, (0, 2), block=4, seed=3), make_head(24, 50, (0, 2), block=4, seed=4)
    feats, anchor, embed = torch.randn(2, 3, 2, 24), torch.randint(0, 50, (2,)), torch.randn(50, 24)

    def run(h):
        with torch.inference_mode():
            c = h.infer_context(feats)
            return c, h.infer_block(c[:, -1], anchor, embed, 4)
    head.eval(), other.eval()
    before = run(head)
    head.load_state_dict(other.state_dict(), assign=assign)
    after, want = run(head), run(other)
    assert not torch.allclose(before[1], want[1])
    for a, b in zip(after, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
