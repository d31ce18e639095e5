"""dspark_ops.decoding (DESIGN §3 orchestrator) on tiny random BuiltinModels:

1. greedy speculative output == greedy target-only output token for token
   (plain, n-gram, a different draft model, the target as its own drafter),
   and both == a naive no-cache loop over an independent reference forward;
2. the target's and the draft model's KV caches after every rollback equal a
   fresh prefill of the same tokens (checked before every step through a
   wrapping drafter, and after the last step for finished requests too);
3. sampled output has the target's distribution (chi-square on the first two
   tokens, exact probabilities enumerated), and a drafter that shares the
   verifier's EMIT counters measurably does not (DESIGN §2);
4. drafters sample with purpose DRAFT, slots 1..n;
5. stats, errors and argument checks;
6. a request finishing early changes no other request's output.

Everything runs on the CPU in a few seconds. torch is pinned to one thread
here: these models are tiny, and on a busy 2-core machine two OpenMP threads
spin-waiting on each other made one tiny float64 forward take ~0.4 s instead
of ~3 ms (measured; one 30-token generate took 52 s instead of 0.4 s)."""
from __future__ import annotations

import copy
import math
from typing import List, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import dspark_ops.decoding.drafters as drafters_mod
import dspark_ops.decoding.session as session_mod
from dspark_ops import Purpose
from dspark_ops.decoding import (BuiltinModel, BuiltinTarget, Draft, Drafter, DraftModelDrafter, DSparkConfig,
                                 DSparkDrafter, DSparkHead, ModelConfig, NGramDrafter, SpeculativeDecoder,
                                 request_seed)
from dspark_ops.decoding.model import tree_ancestors


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------
# Tiny models and helpers

GREEDY_CFG = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden=64)
STATS_CFG = dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden=32)


def make_model(vocab: int, seed: int, *, head_scale: float = 2.0, dtype=torch.float64, cfg=GREEDY_CFG,
               perturb_of: Optional[BuiltinModel] = None, perturb: float = 0.0) -> BuiltinModel:
    """A random BuiltinModel whose outputs depend on the context (unit-variance
    embeddings, 1/sqrt(fan_in) weights; the default 0.02 init gives almost
    uniform, context-free logits). perturb_of: that model's weights plus
    `perturb` x their std of noise (a draft model that agrees with it often)."""
    m = BuiltinModel(ModelConfig(vocab_size=vocab, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if perturb_of is not None:
            m.load_state_dict(perturb_of.state_dict())
            for p in m.parameters():
                if p.dim() == 2:
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * perturb * p.std())
        else:
            for name, p in m.named_parameters():
                if p.dim() == 2:
                    std = 1.0 if name == "embed.weight" else 1.0 / math.sqrt(p.shape[1])
                    p.copy_(torch.randn(p.shape, generator=g) * std)
            m.head.weight.mul_(head_scale)
    return m.to(dtype).eval()


class CapturingTarget(BuiltinTarget):
    """A BuiltinTarget that keeps the last cache it created (the loop does
    not expose its cache) and counts rollbacks whose kept entries were not
    a prefix of the appended ones (entries moved)."""

    moved_keeps = 0

    def new_cache(self, num_requests, max_len):
        self.cache = super().new_cache(num_requests, max_len)
        return self.cache

    def rollback(self, cache, base_len, num_appended, keep_index, num_keep):
        for row, n in zip(keep_index.tolist(), num_keep.tolist()):
            self.moved_keeps += row[:n] != list(range(n))
        super().rollback(cache, base_len, num_appended, keep_index, num_keep)


def ragged_forward(target, seqs: List[List[int]], cache=None):
    """Prefill each sequence from position 0 into a fresh (or given, empty) cache."""
    cache = cache if cache is not None else target.new_cache(len(seqs), max(max(map(len, seqs)), 1))
    cu = [0]
    for s in seqs:
        cu.append(cu[-1] + len(s))
    logits, _ = target.forward(torch.tensor([t for s in seqs for t in s], dtype=torch.int64),
                               torch.tensor([i for s in seqs for i in range(len(s))], dtype=torch.int64),
                               torch.tensor(cu, dtype=torch.int32), cache)
    return logits, cache, cu


def _rope_ref(x, pos, theta):
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos.double()[:, None] * inv[None, :]
    c, s = ang.cos().to(x.dtype)[:, None, :], ang.sin().to(x.dtype)[:, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


@torch.no_grad()
def reference_logits(model: BuiltinModel, seq: List[int]) -> torch.Tensor:
    """One sequence through the model's weights with plain causal attention:
    no cache, no ragged batching, no padding masks."""
    cfg = model.cfg
    T, hd, rep = len(seq), cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    pos = torch.arange(T)
    h = model.embed(torch.tensor(seq))
    for blk in model.blocks:
        x = blk.attn_norm(h)
        q = _rope_ref(blk.wq(x).view(T, cfg.n_heads, hd), pos, cfg.rope_theta)
        k = _rope_ref(blk.wk(x).view(T, cfg.n_kv_heads, hd), pos, cfg.rope_theta).repeat_interleave(rep, 1)
        v = blk.wv(x).view(T, cfg.n_kv_heads, hd).repeat_interleave(rep, 1)
        att = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        h = h + blk.wo(att.transpose(0, 1).reshape(T, -1))
        x = blk.mlp_norm(h)
        h = h + blk.w2(F.silu(blk.w1(x)) * blk.w3(x))
    return model.head(model.norm(h))


def naive_greedy(model: BuiltinModel, prompt: List[int], max_new: int, stop=()) -> List[int]:
    seq, out = list(prompt), []
    while len(out) < max_new:
        tok = int(torch.argmax(reference_logits(model, seq)[-1].float()))  # the ops see fp32 logits
        out.append(tok)
        seq.append(tok)
        if tok in stop:
            break
    return out


def cut_at_stop(out: List[int], stop) -> List[int]:
    for i, t in enumerate(out):
        if t in stop:
            return out[: i + 1]
    return list(out)


def make_prompts(vocab: int, lengths, seed: int) -> List[List[int]]:
    """Ragged prompts; every other one a repeated motif (prompt lookup hits)."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i, L in enumerate(lengths):
        if i % 2 and L >= 4:
            motif = torch.randint(0, vocab, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
            prompts.append((motif * L)[:L])
        else:
            prompts.append(torch.randint(0, vocab, (L,), generator=g).tolist())
    return prompts


def pick_stops(outs: List[List[int]], max_new: int):
    """Two stop tokens under which >= 2 requests stop early at different
    lengths and >= 2 run to max_new (deterministic: the outputs are)."""
    cands = sorted({t for o in outs for t in o})
    for i, a in enumerate(cands):
        for b in cands[i:]:
            lens = [len(cut_at_stop(o, (a, b))) for o in outs]
            early = {L for L in lens if 2 <= L < max_new}
            if len(early) >= 2 and lens.count(max_new) >= 2 and min(lens) >= 2:
                return (a, b)
    raise AssertionError("no stop tokens found that finish requests at different steps")


class Recorder(Drafter):
    """Wraps a drafter; records each step's finished flags and, with a
    CapturingTarget, checks before every proposal that the target's cache
    (and a DraftModelDrafter's own cache) equals a fresh prefill of the
    tokens it should hold."""

    def __init__(self, inner: Drafter, target: Optional[CapturingTarget] = None, check_caches: bool = False):
        self.inner, self.target, self.check = inner, target, check_caches
        self.num_draft = inner.num_draft
        self.hidden_layers = getattr(inner, "hidden_layers", ())
        self.observe_last_only = getattr(inner, "observe_last_only", False)
        self.finished_per_step: List[List[bool]] = []
        self.checked = 0

    def start(self, num_requests, max_len, device):
        self.inner.start(num_requests, max_len, device)

    def propose(self, seqs, state, sampling):
        fin = state.finished.tolist()
        self.finished_per_step.append(fin)
        if self.check:
            pos = state.position.tolist()
            for r, s in enumerate(seqs):
                if fin[r]:
                    continue
                assert pos[r] == len(s)
                assert state.last_token[r].item() == s[-1]
                assert_cache_holds(self.target, self.target.cache, r, s[:-1])
                if isinstance(self.inner, DraftModelDrafter) and hasattr(self.inner, "fed"):
                    assert_cache_holds(self.inner.model, self.inner.cache, r, s[: self.inner.fed[r]])
                self.checked += 1
        return self.inner.propose(seqs, state, sampling)

    def commit(self, accepted, finished_before):
        self.inner.commit(accepted, finished_before)

    def observe(self, rows, processed):
        self.inner.observe(rows, processed)


def assert_cache_holds(target, cache, r: int, tokens: List[int], *, exact_length: bool = True):
    """cache request r == a fresh single-request prefill of `tokens`."""
    L = len(tokens)
    got_len = int(cache.lengths[r])
    if exact_length:
        assert got_len == L, f"request {r}: cache length {got_len}, expected {L}"
    else:
        assert got_len >= L, f"request {r}: cache length {got_len} < {L}"
    if L == 0:
        return
    _, fresh, _ = ragged_forward(BuiltinTarget(target.model), [tokens])  # (not the capturing target's new_cache)
    for layer in range(len(cache.k)):
        for got, want in ((cache.k[layer], fresh.k[layer]), (cache.v[layer], fresh.v[layer])):
            torch.testing.assert_close(got[r, :L], want[0, :L], rtol=1e-9, atol=1e-11,
                                       msg=lambda m: f"request {r} layer {layer}: {m}")


# ---------------------------------------------------------------------------
# 0. The model and its cache against an independent reference forward

def test_model_ragged_and_incremental_match_reference():
    model = make_model(97, 0)
    target = BuiltinTarget(model)
    seqs = make_prompts(97, [1, 20, 7, 3, 13], seed=1)
    logits, _, cu = ragged_forward(target, seqs)
    for r, s in enumerate(seqs):
        torch.testing.assert_close(logits[cu[r]:cu[r + 1]], reference_logits(model, s), rtol=1e-9, atol=1e-10)
    # incremental: ragged chunks of 1..4 new tokens per request per call, one cache
    cache = target.new_cache(len(seqs), 24)
    done = [0] * len(seqs)
    got = [[] for _ in seqs]
    step = 0
    while any(d < len(s) for d, s in zip(done, seqs)):
        step += 1
        chunks = [s[d:d + 1 + (r + step) % 4] for r, (d, s) in enumerate(zip(done, seqs))]
        cu = [0]
        for c in chunks:
            cu.append(cu[-1] + len(c))
        out, _ = target.forward(torch.tensor([t for c in chunks for t in c], dtype=torch.int64),
                                torch.tensor([d + i for c, d in zip(chunks, done) for i in range(len(c))]),
                                torch.tensor(cu, dtype=torch.int32), cache)
        for r, c in enumerate(chunks):
            got[r].append(out[cu[r]:cu[r + 1]])
            done[r] += len(c)
    assert cache.lengths.tolist() == [len(s) for s in seqs]
    for r, s in enumerate(seqs):
        torch.testing.assert_close(torch.cat(got[r]), reference_logits(model, s), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("R,chunk", [(1, 1), (1, 3), (3, 1), (3, 2)])
def test_model_uniform_chunks_match_reference(R, chunk):
    """The uniform-batch paths of the inference forward (every request
    appending `chunk` tokens: one request one token sees its whole cache
    without a bias; otherwise an additive causal bias) against the
    no-cache reference, after a ragged prefill."""
    model = make_model(97, 3)
    target = BuiltinTarget(model)
    seqs = make_prompts(97, [5 + 3 * r for r in range(R)], seed=4)
    total = 4 * chunk
    full = [s + make_prompts(97, [total], seed=40 + r)[0] for r, s in enumerate(seqs)]
    cache = target.new_cache(R, max(map(len, full)))
    ragged_forward(target, seqs, cache)
    got = [[] for _ in range(R)]
    for step in range(4):
        ids = [f[len(s) + step * chunk: len(s) + (step + 1) * chunk] for s, f in zip(seqs, full)]
        pos = [list(range(len(s) + step * chunk, len(s) + (step + 1) * chunk)) for s in seqs]
        out, _ = target.forward(torch.tensor(sum(ids, []), dtype=torch.int64), torch.tensor(sum(pos, [])),
                                torch.arange(R + 1, dtype=torch.int32) * chunk, cache)
        for r in range(R):
            got[r].append(out[r * chunk:(r + 1) * chunk])
    for r in range(R):
        want = reference_logits(model, full[r])[len(seqs[r]):]
        torch.testing.assert_close(torch.cat(got[r]), want, rtol=1e-9, atol=1e-10)


def test_serial_tokens_runs_small_forwards_on_one_thread_and_restores_the_setting():
    model = make_model(61, 7)
    seq = make_prompts(61, [6], seed=8)[0]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        serial, parallel = BuiltinTarget(model, serial_tokens=1), BuiltinTarget(model)
        for target in (serial, parallel):
            cache = model.new_cache(1, len(seq))
            ragged_forward(target, [seq[:-1]], cache)
            model.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
            out, _ = target.forward(torch.tensor(seq[-1:]), torch.tensor([len(seq) - 1]),
                                    torch.tensor([0, 1], dtype=torch.int32), cache)
            model._forward_pre_hooks.clear()
            torch.testing.assert_close(out, reference_logits(model, seq)[-1:], rtol=1e-9, atol=1e-10)
            assert torch.get_num_threads() == 2
        assert seen == [1, 2]
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def gpu_attention_path(monkeypatch):
    """Run the forward's GPU path on the CPU: no length reads, attention over
    the whole cache under a mask, no decode-step shortcut, grouped KV heads
    expanded for SDPA (long chunks)."""
    import dspark_ops.decoding.model as model_mod
    monkeypatch.setattr(model_mod, "_reads_lengths", lambda device: False)
    monkeypatch.setattr(model_mod, "_sdpa_expands_kv", lambda device: True)


def test_gpu_attention_path_matches_reference_and_plain_decoding(gpu_attention_path, greedy_setup):
    model, draft_model, prompts, nostop, _, _ = greedy_setup
    target = BuiltinTarget(model)
    logits, _, cu = ragged_forward(target, prompts[:4], target.new_cache(4, 40))  # ragged prefill
    for r, p in enumerate(prompts[:4]):
        torch.testing.assert_close(logits[cu[r]:cu[r + 1]], reference_logits(model, p), rtol=1e-9, atol=1e-10)
    for drafter in (None, NGramDrafter(3, 5), NGramDrafter(3, 8, branches=3),
                    DraftModelDrafter(BuiltinTarget(draft_model), 3)):
        assert SpeculativeDecoder(target, drafter).generate(prompts, MAX_NEW).tokens == nostop
    one = SpeculativeDecoder(target).generate(prompts[1:2], MAX_NEW).tokens  # R = 1 decode steps
    assert one == nostop[1:2]


def test_half_precision_norm_statistics_do_not_overflow():
    """fp16 activations above 256 square past fp16's range: the norm's
    statistics must be taken in fp32 (as nn.RMSNorm does)."""
    model = make_model(61, 12).float()
    with torch.no_grad():
        model.embed.weight[:, 3] = 400.0  # one huge residual channel
    seq = make_prompts(61, [9], seed=13)[0]
    want = reference_logits(model, seq)
    half = copy.deepcopy(model).half()
    got, _, _ = ragged_forward(BuiltinTarget(half), [seq])
    assert torch.isfinite(got).all()
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()
    assert torch.equal(got.float().argmax(-1), want.argmax(-1))


def test_models_made_under_inference_mode_and_writes_behind_version_counters():
    with torch.inference_mode():
        model = make_model(61, 14)  # inference tensors: no version counters
        seq = make_prompts(61, [7], seed=15)[0]
        logits, _, _ = ragged_forward(BuiltinTarget(model), [seq])
        torch.testing.assert_close(logits, reference_logits(model, seq), rtol=1e-9, atol=1e-10)
    model = make_model(61, 16)
    target = BuiltinTarget(model)
    ragged_forward(target, [seq])
    model.blocks[0].wq.weight.data.mul_(2.0)  # .data writes do not bump the version counter
    model.eval()  # clears the fused weights
    logits, _, _ = ragged_forward(target, [seq])
    torch.testing.assert_close(logits, reference_logits(model, seq), rtol=1e-9, atol=1e-10)


def test_a_forward_past_the_cache_raises_instead_of_writing_into_the_next_request():
    model = make_model(61, 17)
    target = BuiltinTarget(model)
    cache = target.new_cache(2, 6)
    ragged_forward(target, [[1, 2, 3, 4, 5], [1]], cache)
    with pytest.raises(ValueError, match="cache holds 6 entries per request, this forward needs 7"):
        target.forward(torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 1, 2]), torch.tensor([0, 2, 4],
                                                                                             dtype=torch.int32), cache)


def test_fused_weights_follow_weight_updates_and_autograd():
    """The inference forward caches fused weights: an in-place weight update
    (an optimizer step) must rebuild them, and with autograd on, gradients
    must reach the module's own parameters."""
    model = make_model(61, 5)
    seq = make_prompts(61, [9], seed=6)[0]
    target = BuiltinTarget(model)
    ragged_forward(target, [seq])  # builds the cache of fused weights
    with torch.no_grad():
        model.blocks[0].wq.weight.mul_(1.5)
        model.blocks[1].mlp_norm.weight.add_(0.25)
        model.norm.weight.mul_(0.5)
    logits, _, _ = ragged_forward(target, [seq])
    torch.testing.assert_close(logits, reference_logits(model, seq), rtol=1e-9, atol=1e-10)
    model.float()  # moves every weight's storage: the fused copies must follow
    logits, _, _ = ragged_forward(target, [seq])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference_logits(model, seq), rtol=1e-4, atol=1e-5)
    model.double()
    cache = model.new_cache(1, len(seq))
    out, _ = model(torch.tensor(seq), torch.arange(len(seq)), torch.tensor([0, len(seq)], dtype=torch.int32), cache)
    out.sum().backward()
    for name in ("wq", "wk", "wv", "w1", "w3", "wo", "w2", "attn_norm", "mlp_norm"):
        assert getattr(model.blocks[0], name).weight.grad is not None, name
    assert model.norm.weight.grad is not None and model.head.weight.grad is not None


# ---------------------------------------------------------------------------
# 1. Greedy: speculative == target-only == naive no-cache loop

V_GREEDY, MAX_NEW = 97, 24
LENGTHS = [1, 20, 7, 3, 13, 2, 17, 9]


@pytest.fixture(scope="module")
def greedy_setup():
    model = make_model(V_GREEDY, 0)
    draft_model = make_model(V_GREEDY, 1)
    prompts = make_prompts(V_GREEDY, LENGTHS, seed=2)
    nostop = [naive_greedy(model, p, MAX_NEW) for p in prompts]
    stops = pick_stops(nostop, MAX_NEW)
    expected = [cut_at_stop(o, stops) for o in nostop]
    return model, draft_model, prompts, nostop, stops, expected


def test_plain_greedy_matches_naive_loop(greedy_setup):
    model, _, prompts, nostop, stops, expected = greedy_setup
    target = BuiltinTarget(model)
    res = SpeculativeDecoder(target).generate(prompts, MAX_NEW)
    assert res.tokens == nostop
    assert res.stats["steps"] == MAX_NEW and res.stats["mean_accepted"] == 0
    res = SpeculativeDecoder(target).generate(prompts, MAX_NEW, stop_tokens=stops)
    assert res.tokens == expected
    lens = [len(o) for o in expected]
    assert len({L for L in lens if L < MAX_NEW}) >= 2 and lens.count(MAX_NEW) >= 2
    # a request that stops finishes at its stop token, and only there
    for o in res.tokens:
        assert all(t not in stops for t in o[:-1])
        assert o[-1] in stops or len(o) == MAX_NEW
    # the naive loop with stop tokens agrees with cutting
    assert naive_greedy(model, prompts[0], MAX_NEW, stops) == expected[0]


@pytest.mark.parametrize("kind", ["ngram", "ngram_tree", "draft_model", "draft_model_stop", "self"])
def test_speculative_greedy_equals_target_greedy(greedy_setup, kind):
    model, draft_model, prompts, nostop, stops, expected = greedy_setup
    target = BuiltinTarget(model)
    n = {"ngram": 5, "ngram_tree": 9, "draft_model": 3, "draft_model_stop": 6, "self": 4}[kind]
    inner = {"ngram": lambda: NGramDrafter(max_ngram=3, num_draft=n),
             "ngram_tree": lambda: NGramDrafter(max_ngram=3, num_draft=n, branches=3),
             "draft_model": lambda: DraftModelDrafter(BuiltinTarget(draft_model), num_draft=n),
             "draft_model_stop": lambda: StopCounting(BuiltinTarget(draft_model), num_draft=n, stop_below=0.3),
             "self": lambda: DraftModelDrafter(BuiltinTarget(model), num_draft=n)}[kind]()
    rec = Recorder(inner)
    res = SpeculativeDecoder(target, rec).generate(prompts, MAX_NEW, stop_tokens=stops)
    assert res.tokens == expected
    assert res.errors == [0] * len(prompts)
    st = res.stats
    if kind == "self":
        assert st["mean_accepted"] == n and all(a == n for a in st["accepted_per_step"])
    elif kind in ("ngram", "ngram_tree"):
        assert st["mean_accepted"] > 0.3, st  # repetitive prompts and looping greedy text: lookups hit
    assert st["steps"] <= MAX_NEW
    # requests finished at different steps (stop tokens, ragged acceptance)
    fin_step = [next((i for i, f in enumerate(rec.finished_per_step) if f[r]), st["steps"])
                for r in range(len(prompts))]
    assert len(set(fin_step)) >= 2
    if kind == "draft_model_stop":  # confidence cut proposals short, yet drafts were proposed
        assert inner.short_steps > 0 and inner.drafted > 0, (inner.short_steps, inner.drafted)
    # without stop tokens the whole no-stop outputs agree too
    res = SpeculativeDecoder(target, inner).generate(prompts, MAX_NEW)
    assert res.tokens == nostop


class StopCounting(DraftModelDrafter):
    """A DraftModelDrafter with stop_below that counts the steps whose
    proposal the confidence cut short (fewer than num_draft positions, or a
    request padded with -1)."""

    short_steps = drafted = 0

    def propose(self, seqs, state, sampling):
        d = super().propose(seqs, state, sampling)
        if d.tokens.shape[1] < self.num_draft or bool((d.tokens < 0).any()):
            self.short_steps += 1
        self.drafted += int((d.tokens >= 0).sum())
        return d


def test_greedy_requests_mixed_with_sampled_ones(greedy_setup):
    """temperature 0 and > 0 in one batch: the greedy requests are unchanged."""
    model, draft_model, prompts, nostop, _, _ = greedy_setup
    temps = [0.0 if r % 2 == 0 else 1.0 for r in range(len(prompts))]
    res = SpeculativeDecoder(BuiltinTarget(model), DraftModelDrafter(BuiltinTarget(draft_model), 3)).generate(
        prompts, MAX_NEW, temperature=temps, seed=11)
    for r in range(0, len(prompts), 2):
        assert res.tokens[r] == nostop[r]
    assert all(len(o) == MAX_NEW for o in res.tokens)


def test_tensor_prompts_equal_list_prompts(greedy_setup):
    model, _, _, _, _, _ = greedy_setup
    prompts = torch.randint(0, V_GREEDY, (3, 6), generator=torch.Generator().manual_seed(3))
    dec = SpeculativeDecoder(BuiltinTarget(model), NGramDrafter(2, 3))
    assert dec.generate(prompts, 8).tokens == dec.generate(prompts.tolist(), 8).tokens


def test_per_prompt_max_new_tokens(greedy_setup):
    model, _, prompts, nostop, _, _ = greedy_setup
    limits = [3 + 2 * r for r in range(len(prompts))]
    res = SpeculativeDecoder(BuiltinTarget(model), NGramDrafter(3, 4)).generate(prompts, limits)
    assert res.tokens == [o[:L] for o, L in zip(nostop, limits)]


# ---------------------------------------------------------------------------
# 2. KV caches after rollback == a fresh prefill of the same tokens

@pytest.mark.parametrize("kind,temperature", [("ngram", 0.0), ("ngram_tree", 0.0), ("decoy_tree", 0.0),
                                              ("decoy_tree", 1.0),
                                              ("draft_model", 1.0), ("draft_model", 0.0),
                                              ("draft_model_stop", 1.0), ("self", 0.0), ("self", 1.0),
                                              ("dspark_threshold", 0.0), ("dspark_threshold", 1.0)])
def test_caches_after_rollback_equal_plain_prefill(kind, temperature):
    V = 61
    model = make_model(V, 10)
    draft_model = make_model(V, 11, perturb_of=model, perturb=0.5)
    target = CapturingTarget(model)
    prompts = make_prompts(V, [1, 12, 5, 2, 9], seed=12)
    inner = {"ngram": lambda: NGramDrafter(3, 4),
             "ngram_tree": lambda: NGramDrafter(3, 8, branches=3),
             "decoy_tree": lambda: DecoyTreeDrafter(model, 3),
             "draft_model": lambda: DraftModelDrafter(BuiltinTarget(draft_model), 4),
             "draft_model_stop": lambda: DraftModelDrafter(BuiltinTarget(draft_model), 4, stop_below=0.2),
             "self": lambda: DraftModelDrafter(BuiltinTarget(model), 4),
             # a schedule cutting blocks per request: ragged target passes (DecodeSession.ragged_step)
             "dspark_threshold": lambda: _dspark(model, schedule="threshold", threshold=0.3)}[kind]()
    rec = Recorder(inner, target, check_caches=True)
    max_new = 16
    res = SpeculativeDecoder(target, rec).generate(prompts, max_new, temperature=temperature, seed=5)
    assert res.errors == [0] * len(prompts)
    assert rec.checked >= res.stats["steps"]  # every step checked the unfinished requests
    if kind == "self":  # q == p: every draft accepted, sampled too
        assert res.stats["mean_accepted"] == 4
    else:
        assert 0 < res.stats["mean_accepted"] < 4  # rollbacks of rejected drafts happened
    if kind == "decoy_tree" and temperature == 0:  # accepted paths were not a prefix of the nodes: entries moved
        assert target.moved_keeps > 0
    # after the last step, finished requests included: exactly prompt + output minus its last token (a request
    # cut by max_new_tokens mid-chain keeps no accepted drafts past its end: they are not its tokens)
    for r, (p, o) in enumerate(zip(prompts, res.tokens)):
        assert len(o) == max_new
        assert_cache_holds(target, target.cache, r, (p + o)[:-1])


class DecoyTreeDrafter(Drafter):
    """A tree whose first child of the root is a wrong token and whose
    second child starts the target's own greedy chain: greedy verification
    accepts nodes 2, 3, ... (not a prefix of the nodes), so kv_compact must
    move the kept entries."""

    def __init__(self, model: BuiltinModel, depth: int):
        self.model, self.num_draft, self.depth = model, depth + 1, depth

    def propose(self, seqs, state, sampling):
        V = self.model.cfg.vocab_size
        toks, pars = [], []
        for s in seqs:
            chain, seq = [], list(s)
            for _ in range(self.depth):
                chain.append(int(torch.argmax(reference_logits(self.model, seq)[-1].float())))
                seq.append(chain[-1])
            toks.append([(chain[0] + 1) % V] + chain)
            pars.append([0, 0] + list(range(2, self.depth + 1)))
        dev = state.last_token.device
        return Draft(torch.tensor(toks, dtype=torch.int32, device=dev), parents=torch.tensor(pars, dtype=torch.int32,
                                                                                              device=dev))


def test_plain_decoding_cache_equals_prefill():
    V = 61
    model = make_model(V, 10)
    target = CapturingTarget(model)
    prompts = make_prompts(V, [1, 12, 5], seed=13)
    res = SpeculativeDecoder(target).generate(prompts, 7, temperature=1.0, seed=3)
    for r, (p, o) in enumerate(zip(prompts, res.tokens)):
        assert_cache_holds(target, target.cache, r, (p + o)[:-1])


# ---------------------------------------------------------------------------
# 3. Sampled output follows the target distribution

V_STATS, N_STATS = 8, 10000
# The n-gram drafter proposes [2, 4] after it; p(2 | 4 2 4) = 0.64 at T = 1 (the 2nd best [x, y, x]). The
# negative control's power depends on the prompt (measured at N = 10^4: p = 1e-15 here, 4e-3 after [1, 6, 1]).
STATS_PROMPT = [4, 2, 4]


def process(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """DESIGN §2's processing in float64 on the fp32 logits the ops see."""
    x = logits.float() / torch.tensor(temperature, dtype=torch.float32)
    if 0 < top_k < x.shape[-1]:
        larger = (x.unsqueeze(-1) < x.unsqueeze(-2)).sum(-1)
        x = x.masked_fill(larger >= top_k, float("-inf"))
    p = torch.softmax(x.double(), -1)
    if top_p < 1:
        above = ((p.unsqueeze(-1) < p.unsqueeze(-2)) * p.unsqueeze(-2)).sum(-1)
        p = torch.where(above < top_p, p, torch.zeros_like(p))
        p = p / p.sum(-1, keepdim=True)
    return p


def exact_joint(target, prompt, temperature, top_k, top_p) -> np.ndarray:
    """P(t1, t2) = p(t1 | prompt) p(t2 | prompt, t1), [V, V]."""
    V = target.vocab_size
    seqs = [prompt] + [prompt + [t] for t in range(V)]
    logits, _, cu = ragged_forward(target, seqs)
    p = process(logits[torch.tensor(cu[1:]) - 1], temperature, top_k, top_p)
    return (p[0].unsqueeze(1) * p[1:]).numpy()


def goodness_of_fit(joint: np.ndarray, outputs: List[List[int]]):
    """(chi-square p-value, TV) of the observed (t1, t2) pairs; cells with an
    expected count < 5 pooled. Tokens of probability 0 must never appear."""
    N, V = len(outputs), joint.shape[0]
    obs = np.zeros(V * V)
    for o in outputs:
        assert len(o) == 2
        obs[o[0] * V + o[1]] += 1
    exp = joint.reshape(-1) * N
    assert obs[exp == 0].sum() == 0, "a token of probability 0 was emitted"
    small = exp < 5
    o = np.append(obs[~small], obs[small].sum())
    e = np.append(exp[~small], exp[small].sum())
    if e[-1] == 0:
        o, e = o[:-1], e[:-1]
    pvalue = stats.chisquare(o, e * o.sum() / e.sum()).pvalue
    return pvalue, 0.5 * np.abs(obs - exp).sum() / N


@pytest.fixture(scope="module")
def stats_models():
    target_model = make_model(V_STATS, 20, cfg=STATS_CFG, dtype=torch.float32)
    near = make_model(V_STATS, 21, cfg=STATS_CFG, dtype=torch.float32, perturb_of=target_model, perturb=0.5)
    far = make_model(V_STATS, 22, cfg=STATS_CFG, dtype=torch.float32)
    return BuiltinTarget(target_model), BuiltinTarget(near), BuiltinTarget(far)


class SharedCountersDrafter(DraftModelDrafter):
    """NEGATIVE CONTROL (DESIGN §2): draft j sampled with the verifier's EMIT
    counter of row j (purpose EMIT, slot j = k - 1) instead of DRAFT slot
    j + 1 — the draft and the token emitted after its rejection then race the
    same exponentials."""

    def propose(self, seqs, state, sampling):
        real = drafters_mod.sample

        def shared(logits, **kw):
            assert kw["purpose"] == Purpose.DRAFT
            return real(logits, **{**kw, "purpose": Purpose.EMIT, "slot": kw["slot"] - 1})

        drafters_mod.sample = shared
        try:
            return super().propose(seqs, state, sampling)
        finally:
            drafters_mod.sample = real


def run_distribution(stats_models, drafter_kind, temperature, top_k=0, top_p=1.0, seed=1234):
    target, near, far = stats_models
    drafter = {"near": lambda: DraftModelDrafter(near, 3), "far": lambda: DraftModelDrafter(far, 3),
               "near_filtered": lambda: DraftModelDrafter(near, 3, filter_drafts=True),
               "near_stop": lambda: DraftModelDrafter(near, 4, stop_below=0.25),
               "ngram": lambda: NGramDrafter(2, 3), "plain": lambda: None,
               "ngram_tree": lambda: NGramDrafter(2, 6, branches=3),
               "shared": lambda: SharedCountersDrafter(near, 3)}[drafter_kind]()
    res = SpeculativeDecoder(target, drafter).generate([STATS_PROMPT] * N_STATS, 2, temperature=temperature,
                                                       top_k=top_k, top_p=top_p, seed=seed)
    assert res.errors == [0] * N_STATS
    joint = exact_joint(target, STATS_PROMPT, temperature, top_k, top_p)
    pvalue, tv = goodness_of_fit(joint, res.tokens)
    return pvalue, tv, res.stats


@pytest.mark.parametrize("drafter_kind,temperature,top_k,top_p", [
    ("near", 1.0, 0, 1.0),   # a perturbed copy of the target: accepts ~2 of 3
    ("near", 0.7, 3, 1.0),   # draft sampled without top-k: tokens outside it are always rejected
    ("near_filtered", 0.7, 3, 1.0),  # filter_drafts: drafts from the draft's own top-k rows, verified on them
    ("near_filtered", 0.8, 0, 0.7),  # ... and top-p
    ("far", 1.0, 0, 1.0),    # an unrelated model: mostly rejections and residual sampling
    ("near_stop", 1.0, 0, 1.0),  # confidence early stop: -1 padded positions are sampled from the target
    ("near_stop", 0.7, 3, 1.0),
    ("ngram", 1.0, 0, 1.0),  # point-mass drafts
    ("ngram", 0.7, 0, 0.8),
    ("ngram_tree", 1.0, 0, 1.0),  # tree drafts: verify_tree with deterministic siblings
    ("ngram_tree", 0.7, 3, 1.0),
    ("plain", 1.0, 0, 1.0),
])
def test_sampled_output_follows_target_distribution(stats_models, drafter_kind, temperature, top_k, top_p):
    pvalue, tv, st = run_distribution(stats_models, drafter_kind, temperature, top_k, top_p)
    assert pvalue > 1e-3, (pvalue, tv, st["mean_accepted"])
    if drafter_kind in ("near", "near_filtered", "near_stop", "ngram", "ngram_tree"):
        assert st["mean_accepted"] > 0.2  # drafts were accepted, not only rejected


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8)])
def test_drafter_sharing_verifier_counters_is_detected(stats_models, temperature, top_k, top_p):
    """Same test, same size: the shared-counter drafter fails it (measured
    p = 1e-15 and 2.5e-9, TV 0.053 and 0.020, against p = 0.07 and 0.51, TV
    0.021 and 0.007 for the same drafter on its own DRAFT counters). With
    top-k 3 the filtered drafts race fewer tokens and the bias is smaller
    (p = 2e-4 at this size), so that case is not a control."""
    pvalue, tv, st = run_distribution(stats_models, "shared", temperature, top_k, top_p)
    assert pvalue < 1e-6, (pvalue, tv)
    assert st["mean_accepted"] > 0.2


# ---------------------------------------------------------------------------
# 4. Drafters never share counters with verification

def cloned(kw: dict) -> dict:
    """A call's keyword arguments as they were at the call (tensors cloned)."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def test_draft_model_drafter_samples_with_draft_purpose(monkeypatch):
    V, n = 40, 4
    model = make_model(V, 30, dtype=torch.float32)
    draft = make_model(V, 31, dtype=torch.float32, perturb_of=model, perturb=0.5)
    draft_calls, verify_calls = [], []
    real_sample, real_verify = drafters_mod.sample, session_mod.verify_chunk

    def rec_sample(logits, **kw):
        draft_calls.append(cloned(kw))
        return real_sample(logits, **kw)

    def rec_verify(*args, **kw):
        verify_calls.append(cloned(kw))
        return real_verify(*args, **kw)

    monkeypatch.setattr(drafters_mod, "sample", rec_sample)
    monkeypatch.setattr(session_mod, "verify_chunk", rec_verify)
    prompts = make_prompts(V, [3, 8, 1], seed=32)
    res = SpeculativeDecoder(BuiltinTarget(model), DraftModelDrafter(BuiltinTarget(draft), n)).generate(
        prompts, 10, temperature=0.9, seed=77)
    steps = res.stats["steps"]
    assert len(draft_calls) == steps * n and len(verify_calls) == steps
    seeds = torch.tensor([request_seed(77, r) for r in range(len(prompts))])
    for i, kw in enumerate(draft_calls):
        assert kw["purpose"] == Purpose.DRAFT, kw["purpose"]
        assert int(torch.as_tensor(kw["slot"]).max()) == int(torch.as_tensor(kw["slot"]).min()) == i % n + 1
        # the same (seed, position) as this step's verification: only purpose/slot keep them apart,
        # and DRAFT slots 1..n never coincide with COIN slots 1..n or EMIT slots 0..n
        assert torch.equal(kw["seed"], seeds)
        assert torch.equal(kw["position"], verify_calls[i // n]["position"])
    positions = torch.stack([v["position"] for v in verify_calls])
    assert bool((positions[1:] >= positions[:-1]).all())  # counters never repeat: positions only grow
    assert bool((positions[-1] > positions[0]).all())
    assert torch.equal(verify_calls[0]["seed"], seeds)


def test_ngram_drafter_draws_no_random_numbers(monkeypatch):
    calls = []
    monkeypatch.setattr(drafters_mod, "sample", lambda *a, **k: calls.append(k))
    model = make_model(40, 33, dtype=torch.float32)
    SpeculativeDecoder(BuiltinTarget(model), NGramDrafter(2, 3)).generate([[1, 2, 1, 2]], 6, temperature=1.0)
    assert calls == []


def test_ngram_lookup():
    d = NGramDrafter(max_ngram=3, num_draft=3)
    assert d.lookup([5, 6, 7, 8, 5, 6, 7]) == [8, 5, 6]
    assert d.lookup([1, 2, 3, 9, 2, 3, 4, 2, 3]) == [4, 2, 3]  # latest earlier occurrence
    assert d.lookup([1, 2, 3]) == []
    assert d.lookup([4]) == []
    assert d.lookup([7, 7]) == [7]
    with pytest.raises(ValueError):
        NGramDrafter(max_ngram=0)
    with pytest.raises(ValueError):
        NGramDrafter(num_draft=0)
    with pytest.raises(ValueError):
        DraftModelDrafter(None, num_draft=0)


def test_ngram_tree_merges_continuations_into_a_trie():
    d = NGramDrafter(max_ngram=2, num_draft=6, branches=3)
    seq = [1, 2, 7, 8, 9, 1, 2, 7, 5, 1, 2, 4, 1, 2]
    # tail [1, 2]: occurrences at 9, 5, 0 (latest first), num_draft tokens after each (fewer at the end)
    assert d.continuations(seq) == [[4, 1, 2], [7, 5, 1, 2, 4, 1], [7, 8, 9, 1, 2, 7]]
    tokens, parents = d.tree(seq)
    # breadth first, budget 6: depth 1: 4, 7 (the third branch shares 7); depth 2: 1 (under 4), 5 and 8 (under 7);
    # depth 3: 2 under 1 -- the budget is spent
    assert tokens == [4, 7, 1, 5, 8, 2] and parents == [0, 0, 1, 2, 2, 3]
    assert all(p < j + 1 for j, p in enumerate(parents))
    assert NGramDrafter(2, 4, branches=2).tree([3, 3]) == ([3], [0])
    with pytest.raises(ValueError):
        NGramDrafter(branches=0)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 40])
def test_tree_ancestors_against_walking_up(n):
    g = torch.Generator().manual_seed(n)
    parents = torch.full((3, n), -1, dtype=torch.int32)
    for j in range(1, n):  # random trees; row 2 a chain
        parents[:2, j] = torch.randint(0, j, (2,), generator=g)
        parents[2, j] = j - 1
    got = tree_ancestors(parents)
    for r in range(3):
        for i in range(n):
            want, node = set(), i
            while node >= 0:
                want.add(node)
                node = int(parents[r, node])
            assert set(torch.nonzero(got[r, i]).flatten().tolist()) == want


def test_tree_forward_equals_each_path_as_a_chain():
    """BuiltinModel.forward(tree_parents=...): each node's logits equal the
    no-cache reference on the prompt plus its root-to-node path (positions
    by depth), for two requests with different trees."""
    model = make_model(97, 9)
    target = BuiltinTarget(model)
    prompts = make_prompts(97, [6, 11], seed=10)
    parents = torch.tensor([[-1, 0, 1, 0, 3, 3, 2], [-1, 0, 0, 0, 1, 4, 5]], dtype=torch.int32)
    toks = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(11))
    cache = target.new_cache(2, 40)
    ragged_forward(target, [p[:-1] for p in prompts], cache)
    toks[:, 0] = torch.tensor([p[-1] for p in prompts])
    depth = torch.zeros(2, 7, dtype=torch.int64)
    for j in range(1, 7):
        depth[:, j] = depth.gather(1, parents[:, j:j + 1].long()).squeeze(1) + 1
    pos = (torch.tensor([len(p) - 1 for p in prompts]).unsqueeze(1) + depth).reshape(-1)
    out, _ = target.forward(toks.reshape(-1).long(), pos, torch.tensor([0, 7, 14], dtype=torch.int32), cache,
                            tree_parents=parents)
    for r, p in enumerate(prompts):
        for j in range(7):
            path, node = [], j
            while node > 0:
                path.append(int(toks[r, node]))
                node = int(parents[r, node])
            want = reference_logits(model, p + path[::-1])[-1]
            torch.testing.assert_close(out[r * 7 + j], want, rtol=1e-9, atol=1e-10)


def test_request_seed():
    seeds = [request_seed(0, r) for r in range(1000)] + [request_seed(1, r) for r in range(1000)]
    assert all(-(1 << 63) <= s < (1 << 63) for s in seeds)
    assert len(set(seeds)) == len(seeds)
    assert request_seed(-5, 3) == request_seed(-5, 3)


def test_scalar_seed_is_a_base_of_distinct_request_seeds():
    model = make_model(40, 34, dtype=torch.float32)
    dec = SpeculativeDecoder(BuiltinTarget(model), NGramDrafter(2, 3))
    prompts = [[1, 2, 3]] * 6
    a = dec.generate(prompts, 12, temperature=1.0, seed=9)
    b = dec.generate(prompts, 12, temperature=1.0, seed=[request_seed(9, r) for r in range(6)])
    c = dec.generate(prompts, 12, temperature=1.0, seed=10)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert len({tuple(o) for o in a.tokens}) > 1  # the same prompt, distinct streams


# ---------------------------------------------------------------------------
# 5. Stats, errors and bad arguments

@pytest.mark.parametrize("kind", ["plain", "ngram", "draft_model"])
def test_stats(kind):
    V = 53
    model = make_model(V, 40)
    n = {"plain": 0, "ngram": 4, "draft_model": 3}[kind]
    drafter = {"plain": None, "ngram": NGramDrafter(3, 4),
               "draft_model": DraftModelDrafter(BuiltinTarget(make_model(V, 41, perturb_of=model, perturb=0.3)), 3)
               }[kind]
    prompts = make_prompts(V, [1, 9, 4, 14], seed=42)
    res = SpeculativeDecoder(BuiltinTarget(model), drafter).generate(prompts, 12, temperature=0.8, seed=1)
    st = res.stats
    for key in ("steps", "target_passes", "mean_accepted", "accepted_per_step", "tokens_per_s", "new_tokens",
                "seconds", "prefill_seconds"):
        assert key in st, key
    assert res.errors == [0] * len(prompts)
    assert all(len(o) == 12 for o in res.tokens)
    assert st["new_tokens"] == sum(map(len, res.tokens)) == 48
    assert math.ceil(12 / (n + 1)) <= st["steps"] <= 12
    assert st["target_passes"] == st["steps"] + 1  # one prefill (some prompt is longer than 1) + one per step
    assert len(st["accepted_per_step"]) == st["steps"]
    assert all(0 <= a <= n for a in st["accepted_per_step"])
    assert st["mean_accepted"] == pytest.approx(sum(st["accepted_per_step"]) / st["steps"])
    assert 0 < st["tokens_per_s"] < float("inf")
    assert 0 < st["prefill_seconds"] < st["seconds"]
    if kind == "plain":
        assert st["steps"] == 12 and st["mean_accepted"] == 0
    else:
        assert st["mean_accepted"] > 0
    # prompts of one token: no prefill pass
    res = SpeculativeDecoder(BuiltinTarget(model), None).generate([[3], [4]], 2)
    assert res.stats["target_passes"] == res.stats["steps"] == 2


def test_finished_request_cache_stays_in_bounds():
    """Regression: a request cut by max_new_tokens after accepting all n
    drafts committed 1 token but kept root + n drafts in the cache; each later
    step (other requests still running) appends n + 1 entries after that, so
    its cache needed prompt + max_new + 2n entries and the loop allocates
    prompt + max_new + n + 2 -> IndexError in the model's cache write."""
    model = make_model(50, 45)
    target = BuiltinTarget(model)
    dec = SpeculativeDecoder(target, DraftModelDrafter(target, num_draft=4))  # q == p for request 0: all accepted
    # request 0 (greedy, longest prompt): 5 tokens a step, cut at 6 on step 2; request 1 (top_k=1 target vs an
    # untruncated draft: mostly rejected) keeps the loop going for several more steps
    res = dec.generate([[1, 2, 3, 4, 5], [6]], 6, temperature=[0.0, 1.0], top_k=[0, 1], seed=0)
    assert [len(o) for o in res.tokens] == [6, 6]
    assert res.stats["steps"] > 2


def test_ngram_padding_is_a_flag_not_an_error():
    """-1 padding (no lookup hit) flags TOKEN_OUT_OF_RANGE inside
    verify_chunk, which must not abort the request."""
    model = make_model(50, 43)
    prompts = [[1, 2, 3, 4, 5], [6], [7, 7, 7, 7]]
    res = SpeculativeDecoder(BuiltinTarget(model), NGramDrafter(3, 5)).generate(prompts, 10, temperature=1.0)
    assert res.errors == [0, 0, 0]
    assert all(len(o) == 10 for o in res.tokens)


def test_bad_arguments():
    model = make_model(30, 44, dtype=torch.float32)
    dec = SpeculativeDecoder(BuiltinTarget(model), NGramDrafter(2, 2))
    prompts = [[1, 2], [3]]
    with pytest.raises(ValueError, match="at least one token"):
        dec.generate([[1, 2], []], 4)
    with pytest.raises(ValueError, match="at least one token"):
        dec.generate([], 4)
    for token in (30, -1):  # vocabulary 30: refused on the host (a GPU's embedding lookup would assert)
        with pytest.raises(ValueError, match=rf"prompt 1 has token {token}, outside the target's vocabulary \[0, 30\)"):
            dec.generate([[1, 2], [3, token]], 4)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="max_new_tokens"):
            dec.generate(prompts, bad)
    for kw in ({"temperature": [1.0]}, {"top_k": [1, 2, 3]}, {"top_p": [0.9, 0.9, 0.9]}, {"seed": [1, 2, 3]}):
        with pytest.raises(ValueError, match="2 entries"):
            dec.generate(prompts, 4, **kw)
    # good per-prompt lists are accepted
    res = dec.generate(prompts, 3, temperature=[0.0, 1.0], top_k=[0, 5], top_p=[1.0, 0.9], seed=[1, 2])
    assert [len(o) for o in res.tokens] == [3, 3]


# ---------------------------------------------------------------------------
# 6. A request finishing early does not change the others

@pytest.mark.parametrize("kind,temperature", [("plain", 0.0), ("ngram", 0.0), ("draft_model", 0.0),
                                              ("draft_model", 1.0), ("ngram", 0.8)])
def test_early_finish_does_not_change_other_requests(kind, temperature):
    V, max_new = 71, 14
    model = make_model(V, 50)
    draft_model = make_model(V, 51, perturb_of=model, perturb=0.5)

    def decoder():
        drafter = {"plain": None, "ngram": NGramDrafter(3, 4),
                   "draft_model": DraftModelDrafter(BuiltinTarget(draft_model), 3)}[kind]
        return SpeculativeDecoder(BuiltinTarget(model), drafter)

    prompts = make_prompts(V, [6, 11, 1, 15], seed=52)
    seeds = [request_seed(123, r) for r in range(len(prompts))]
    alone0 = decoder().generate([prompts[0]], max_new, temperature=temperature, seed=[seeds[0]]).tokens[0]
    stops = (alone0[1],)  # request 0 stops at its 2nd token (or 1st, if it equals it)
    batched = decoder().generate(prompts, max_new, temperature=temperature, seed=seeds, stop_tokens=stops)
    alone = [decoder().generate([p], max_new, temperature=temperature, seed=[s], stop_tokens=stops).tokens[0]
             for p, s in zip(prompts, seeds)]
    assert batched.tokens == alone
    assert len(batched.tokens[0]) <= 2 and batched.tokens[0][-1] in stops
    assert max(len(o) for o in batched.tokens[1:]) == max_new  # others ran on after request 0 finished
    assert batched.errors == [0] * len(prompts)


@pytest.mark.parametrize("kind", ["ngram", "draft_model", "dspark"])
def test_finished_requests_verify_no_drafts(monkeypatch, kind):
    """Once some requests have finished (on the CPU, without cuda_graph), a
    step verifies none of their drafts: a ragged pass of the others'
    (DecodeSession.ragged_step with length 0 for each finished request).
    Same tokens and accepted counts as with trim_finished=False and as the
    full-width passes cuda_graph=True keeps (there n-gram lookups of
    differing lengths are padded with -1 too)."""
    V = 61
    model = make_model(V, 60, dtype=torch.float32)
    draft_model = make_model(V, 61, dtype=torch.float32, perturb_of=model, perturb=0.5)
    prompts = make_prompts(V, [6, 11, 3, 9], seed=62)
    calls = []
    real = session_mod.DecodeSession.ragged_step

    def counting(self, toks, draft_logits, draft_t, lengths):
        calls.append((list(lengths), self.state.finished.tolist()))
        return real(self, toks, draft_logits, draft_t, lengths)
    monkeypatch.setattr(session_mod.DecodeSession, "ragged_step", counting)

    def run(**kw):
        drafter = {"ngram": lambda: NGramDrafter(2, 4),
                   "draft_model": lambda: DraftModelDrafter(BuiltinTarget(draft_model), 3),
                   "dspark": lambda: _dspark(model)}[kind]()
        return SpeculativeDecoder(BuiltinTarget(model), drafter, **kw).generate(
            prompts, [2, 14, 5, 9], temperature=0.9, seed=8)
    trimmed = run()
    assert calls and all(n == 0 for lengths, fin in calls for n, f in zip(lengths, fin) if f)
    assert any(any(fin) and any(n > 0 for n in lengths) for lengths, fin in calls)
    for kw in (dict(trim_finished=False), dict(cuda_graph=True)):  # graphs keep the full width too
        calls.clear()
        full = run(**kw)
        if kind != "ngram" or "cuda_graph" in kw:  # n-gram lookups of differing lengths are ragged passes anyway
            assert not calls, kw
        assert trimmed.tokens == full.tokens and trimmed.errors == full.errors == [0] * len(prompts)
        assert trimmed.stats["accepted_per_step"] == full.stats["accepted_per_step"]


# ---------------------------------------------------------------------------
# cuda_graph=True: the verify step from static buffers (captured on a GPU)

def _dspark(target_model: BuiltinModel, **kw) -> DSparkDrafter:
    """A DSpark drafter with a random head (seeded) on the target's layers 0
    and 1, with context attention and its confidences (every device path
    of a step without a host read); kw: DSparkDrafter's (a schedule)."""
    g = torch.Generator().manual_seed(40)
    head = DSparkHead(DSparkConfig(dim=target_model.cfg.dim, vocab_size=target_model.cfg.vocab_size,
                                   hidden_layers=(0, 1), block=3, mlp_hidden=16, rank=4, context_heads=2,
                                   context_head_dim=8))
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return DSparkDrafter(target_model, head, with_confidence=True, temperatures=torch.ones(3), **kw)


# per kind: (target model, draft model, cuda_graph) -> drafter
GRAPH_KINDS = {"plain": lambda t, d, g: None, "ngram": lambda t, d, g: NGramDrafter(3, 4),
               "ngram_tree": lambda t, d, g: NGramDrafter(3, 8, branches=3),
               "draft_model": lambda t, d, g: DraftModelDrafter(BuiltinTarget(d), 3, cuda_graph=g),
               "draft_model_filtered": lambda t, d, g: DraftModelDrafter(BuiltinTarget(d), 3, cuda_graph=g,
                                                                         filter_drafts=True),
               "dspark": lambda t, d, g: _dspark(t)}


@pytest.mark.parametrize("kind", list(GRAPH_KINDS))
@pytest.mark.parametrize("temperature,filtered", [(0.0, False), (0.9, False), (0.9, True)])
def test_static_step_buffers_equal_the_plain_loop(gpu_attention_path, greedy_setup, kind, temperature, filtered):
    """The graph path's plumbing (drafts copied into per-shape static
    buffers, the step -- and the draft model's chain -- run from them,
    eagerly here) changes nothing: the same tokens, greedy and sampled
    (with per-request top-k / top-p: filtered drafts), batched with stop
    tokens; on the forward's GPU path (static shapes), where capture would
    happen."""
    model, draft_model, prompts, _, stops, _ = greedy_setup
    R = len(prompts)
    filters = dict(top_k=[(0, 4, 2)[r % 3] for r in range(R)], top_p=[(0.8, 1.0, 0.9)[r % 3] for r in range(R)]) \
        if filtered else {}

    def run(cuda_graph):
        dec = SpeculativeDecoder(BuiltinTarget(model), GRAPH_KINDS[kind](model, draft_model, cuda_graph),
                                 cuda_graph=cuda_graph)
        return dec.generate(prompts, MAX_NEW, temperature=temperature, seed=11, stop_tokens=stops, **filters)
    eager, static = run(False), run(True)
    assert static.tokens == eager.tokens and static.errors == eager.errors
    assert static.stats["steps"] == eager.stats["steps"] and static.stats["cuda_graphs"] == 0


class _StepTrace(TorchDispatchMode):
    """Every op a step runs: its name, its non-tensor arguments and the
    storages (and shapes) of the tensors it reads that the step did not
    create -- exactly what a replayed CUDA graph reuses from its capture."""

    def __init__(self):
        super().__init__()
        self.ops, self.made = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = tree_flatten((args, kwargs or {}))[0]
        ins = [a for a in flat if isinstance(a, torch.Tensor)]
        outside = tuple((a.untyped_storage().data_ptr(), tuple(a.shape)) for a in ins
                        if a.numel() and a.untyped_storage().data_ptr() not in self.made)
        out = func(*args, **(kwargs or {}))
        read = {a.untyped_storage().data_ptr() for a in ins}
        self.made |= {o.untyped_storage().data_ptr() for o in tree_flatten(out)[0]
                      if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in read}
        self.ops.append((str(func), tuple(repr(a) for a in flat if not isinstance(a, torch.Tensor)), outside))
        return out


@pytest.mark.parametrize("kind", list(GRAPH_KINDS))
def test_every_run_of_a_step_shape_repeats_its_first(gpu_attention_path, greedy_setup, monkeypatch, kind):
    """What makes a captured step replay correctly, checked without a GPU:
    each run of a step shape (after the first, which allocates its buffers)
    dispatches the same ops with the same scalar arguments and reads the
    same outside tensors at the same addresses as the first -- no input
    that moved, no host-side decision that changed between steps (sampled
    decoding, batched, stop tokens; the verify step and the draft chain;
    across two calls on one decoder, whose device state is kept)."""
    from dspark_ops.decoding import graphs as graphs_mod
    traces = {}

    made = iter(range(1 << 30))

    class Traced(graphs_mod.StepGraphs):
        def run(self, key, inputs):
            inner = self.step
            if not hasattr(self, "trace_id"):
                self.trace_id = next(made)  # graphs made anew (a new session, a rebuilt model) start afresh

            def step(inp):
                with _StepTrace() as rec:
                    out = inner(inp)
                traces.setdefault((self.trace_id, self.name, key), []).append(rec.ops)
                return out
            self.step = step
            try:
                return super().run(key, inputs)
            finally:
                self.step = inner

    monkeypatch.setattr(session_mod, "StepGraphs", Traced)
    monkeypatch.setattr(drafters_mod, "StepGraphs", Traced)
    model, draft_model, prompts, _, stops, _ = greedy_setup
    dec = SpeculativeDecoder(BuiltinTarget(model), GRAPH_KINDS[kind](model, draft_model, True), cuda_graph=True)
    filters = dict(top_k=3, top_p=0.9) if kind == "draft_model_filtered" else {}
    for seed in (11, 12):  # a second call reuses the session: its runs must repeat the first call's too
        dec.generate(prompts, MAX_NEW, temperature=0.9, seed=seed, stop_tokens=stops, **filters)
    assert traces and max(len(runs) for runs in traces.values()) >= 3
    for (_, name, key), runs in traces.items():
        for i, run in enumerate(runs[1:], 1):
            assert len(run) == len(runs[0]), f"{name} {key}: run {i} has {len(run)} ops, the first {len(runs[0])}"
            bad = [(a[0], a[1:], b[1:]) for a, b in zip(runs[0], run) if a != b]
            assert not bad, f"{name} {key}: run {i} differs from the first at {bad[0]}"


@pytest.mark.parametrize("kind", list(GRAPH_KINDS))
def test_a_kept_session_equals_fresh_decoders(gpu_attention_path, greedy_setup, kind):
    """With cuda_graph=True a decoder keeps its device state (caches, request
    state, sampling parameters, stop tokens; the draft model's cache and
    graphs) between calls and resets it in place: call after call -- other
    prompts, sampling parameters, seeds and stop tokens, a batch of another
    size in between -- it gives what fresh decoders give."""
    model, draft_model, prompts, _, stops, _ = greedy_setup
    kept = SpeculativeDecoder(BuiltinTarget(model), GRAPH_KINDS[kind](model, draft_model, True), cuda_graph=True)
    calls = [(prompts[:4], dict(temperature=0.9, seed=1, stop_tokens=stops)),
             (prompts[4:], dict(temperature=0.0, stop_tokens=stops[::-1])),
             (prompts[:2], dict(temperature=0.7, top_k=5, seed=3)),  # another batch size: a new session
             (prompts[2:6], dict(temperature=[0.0, 0.9, 1.1, 0.5], top_p=0.8, seed=4, stop_tokens=stops)),
             (prompts[:4], dict(temperature=0.9, seed=1, stop_tokens=stops))]
    sessions = []
    for i, (batch, kw) in enumerate(calls):
        fresh = SpeculativeDecoder(BuiltinTarget(model), GRAPH_KINDS[kind](model, draft_model, False))
        want, got = fresh.generate(batch, MAX_NEW, **kw), kept.generate(batch, MAX_NEW, **kw)
        assert got.tokens == want.tokens and got.errors == want.errors, f"call {i}"
        sessions.append(kept._session)
    assert sessions[0] is sessions[1] and sessions[2] is not sessions[1] and sessions[3] is not sessions[2]
    assert sessions[3] is sessions[4] and sessions[4].R == 4
    kept.release()
    assert kept._session is None


@pytest.mark.parametrize("between", ["new_target", "weights_written", "longer_cache"])
def test_kept_graphs_are_made_anew_when_the_model_rebuilds_what_they_read(greedy_setup, between):
    """Graphs kept from an earlier call read the models' weights, fused
    weights and rotary tables where they were; when those are rebuilt or
    moved between calls (BuiltinTarget(model) runs model.eval(), which drops
    the fused weights; a weight update; a longer cache regrows the rotary
    tables), the next call makes new graphs -- and still decodes what a
    fresh decoder does."""
    model = copy.deepcopy(greedy_setup[0])
    draft_model = copy.deepcopy(greedy_setup[1])
    prompts = greedy_setup[2][:3]
    dec = SpeculativeDecoder(BuiltinTarget(model), DraftModelDrafter(BuiltinTarget(draft_model), 3, cuda_graph=True),
                             cuda_graph=True)
    dec.generate(prompts, MAX_NEW, temperature=0.9, seed=5)
    graphs, draft_graphs = dec._session.graphs, dec.drafter._graphs
    if between == "new_target":
        BuiltinTarget(model), BuiltinTarget(draft_model)
    elif between == "weights_written":
        with torch.no_grad():
            for m in (model, draft_model):
                m.blocks[0].wq.weight.mul_(1.5)
    else:
        for m in (model, draft_model):
            SpeculativeDecoder(BuiltinTarget(m)).generate([[1] * (m.cfg.max_seq_len + 40)], 2)
    got = dec.generate(prompts, MAX_NEW, temperature=0.9, seed=6)
    want = SpeculativeDecoder(BuiltinTarget(model), DraftModelDrafter(BuiltinTarget(draft_model), 3)).generate(
        prompts, MAX_NEW, temperature=0.9, seed=6)
    assert got.tokens == want.tokens
    if between != "new_target":  # rebuilt while the old ones live: new addresses (a freed block may be reused)
        assert dec._session.graphs is not graphs and dec.drafter._graphs is not draft_graphs


def test_failed_capture_warns_and_runs_eagerly():
    """A step that cannot be captured (here: no GPU at all) warns once and
    goes on eagerly from its static buffers, with the same results."""
    from dspark_ops.decoding.graphs import StepGraphs
    calls = []

    def step(inputs):
        calls.append(1)
        return inputs[0] * 2

    graphs = StepGraphs(step, capture=True)
    x = torch.arange(6, dtype=torch.int32).view(2, 3)
    assert torch.equal(graphs.run("k", (x, None)), x * 2)  # first step of a shape: eager
    if torch.cuda.is_available():
        pytest.skip("a GPU can capture this step: the fallback is not reached")
    with pytest.warns(RuntimeWarning, match="capture of the verify step failed"):
        assert torch.equal(graphs.run("k", (x + 1, None)), (x + 1) * 2)
    assert torch.equal(graphs.run("k", (x + 2, None)), (x + 2) * 2) and len(calls) == 3
    assert graphs.captured == 0 and not graphs.capture


# ---------------------------------------------------------------------------
# On a GPU: the same guarantees, and one host synchronisation per step

@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["plain", "ngram", "ngram_tree", "draft_model", "dspark"])
def test_cuda_greedy_equals_cpu_greedy(greedy_setup, kind):
    model, draft_model, prompts, nostop, _, _ = greedy_setup
    gpu, gpu_draft = copy.deepcopy(model).cuda(), copy.deepcopy(draft_model).cuda()
    drafter = {"plain": lambda: None, "ngram": lambda: NGramDrafter(3, 5),
               "ngram_tree": lambda: NGramDrafter(3, 8, branches=3),
               "draft_model": lambda: DraftModelDrafter(BuiltinTarget(gpu_draft), 3),
               "dspark": lambda: _dspark(gpu), "dspark_budget": lambda: _dspark(gpu, schedule="budget", budget=6)}[kind]()
    res = SpeculativeDecoder(BuiltinTarget(gpu), drafter).generate(prompts, MAX_NEW)
    assert res.tokens == nostop and res.errors == [0] * len(prompts)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", list(GRAPH_KINDS))
@pytest.mark.parametrize("temperature,filtered", [(0.0, False), (0.9, False), (0.9, True)])
def test_cuda_graph_steps_equal_eager_steps(greedy_setup, kind, temperature, filtered):
    """cuda_graph=True captures the verify step (one graph per step shape,
    from the second step of that shape on) and the draft model's chain, and
    replays them -- in the call that captured them and in the next, and
    after the model rebuilt its fused weights: the same tokens as eager
    steps, greedy and sampled, with no fallback warning."""
    import warnings
    model, draft_model, prompts, _, stops, _ = greedy_setup
    gpu, gpu_draft = copy.deepcopy(model).cuda(), copy.deepcopy(draft_model).cuda()

    def make(cuda_graph):
        return SpeculativeDecoder(BuiltinTarget(gpu), GRAPH_KINDS[kind](gpu, gpu_draft, cuda_graph),
                                  cuda_graph=cuda_graph)
    kw = dict(temperature=temperature, stop_tokens=stops)
    if filtered:  # per-request top-k / top-p: the draft chain's graph filters its rows
        kw.update(top_k=[(0, 4, 2)[r % 3] for r in range(len(prompts))],
                  top_p=[(0.8, 1.0, 0.9)[r % 3] for r in range(len(prompts))])
    eager = [make(False).generate(prompts, MAX_NEW, seed=s, **kw) for s in (11, 12)]
    graphed_dec = make(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        graphed = [graphed_dec.generate(prompts, MAX_NEW, seed=s, **kw) for s in (11, 12)]  # the second replays
        BuiltinTarget(gpu)  # model.eval(): the fused weights are rebuilt; the kept graphs must be made anew
        again = graphed_dec.generate(prompts, MAX_NEW, seed=12, **kw)
    for g, e in zip(graphed + [again], eager + [eager[1]]):
        assert g.tokens == e.tokens and g.errors == e.errors
    assert graphed[0].stats["cuda_graphs"] >= (2 if kind.startswith("draft_model") else 1)  # the chain's graph too


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("kind", ["plain", "ngram", "ngram_tree", "draft_model", "dspark", "dspark_budget"])
def test_cuda_one_synchronisation_per_step(greedy_setup, kind, cuda_graph):
    """DESIGN §3: no host synchronisation inside a step but the finished
    check. torch's sync debug mode warns at every synchronising call; the
    generate() call may make one per step plus one at its end (the errors),
    and with CUDA graphs at most two per capture."""
    import warnings
    model, draft_model, prompts, _, _, _ = greedy_setup
    gpu, gpu_draft = copy.deepcopy(model).cuda(), copy.deepcopy(draft_model).cuda()
    make = {"plain": lambda: None, "ngram": lambda: NGramDrafter(3, 5),
            "ngram_tree": lambda: NGramDrafter(3, 8, branches=3),
            "draft_model": lambda: DraftModelDrafter(BuiltinTarget(gpu_draft), 3, cuda_graph=cuda_graph),
            "dspark": lambda: _dspark(gpu), "dspark_budget": lambda: _dspark(gpu, schedule="budget", budget=6)}[kind]
    dec = SpeculativeDecoder(BuiltinTarget(gpu), make(), cuda_graph=cuda_graph)
    dec.generate(prompts, 4)  # warm-up: lazy initialisation, pinned-memory pools
    dec = SpeculativeDecoder(BuiltinTarget(gpu), make(), cuda_graph=cuda_graph)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            res = dec.generate(prompts, MAX_NEW)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "called a synchronizing" in str(w.message)]  # not the "prototype" notice
    # At least the per-step check itself: the warnings do reach Python.
    most = res.stats["steps"] + 1 + 2 * res.stats["cuda_graphs"]
    assert res.stats["steps"] <= len(syncs) <= most, [f"{w.filename}:{w.lineno}" for w in syncs]
