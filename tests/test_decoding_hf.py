"""HFTarget (dspark_ops.decoding.hf): a Hugging Face causal LM as a target
of the pinned protocol. Tiny random Llama / Qwen2 models built locally (no
download), float64 so that greedy ties cannot depend on the pass shape."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from dspark_ops.decoding import (BuiltinTarget, DraftModelDrafter, NGramDrafter, SpeculativeDecoder,  # noqa: E402
                                 builtin_from_hf)
from dspark_ops.decoding.hf import HFCache, HFTarget  # noqa: E402

V = 160
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [11, 12, 13], [3], [20, 21, 22, 23, 24, 25, 20, 21, 22]]
MAX_NEW = 24


def _config(kind: str, layers: int, hidden: int, seed_vocab: int = V):
    common = dict(vocab_size=seed_vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=0,
                  tie_word_embeddings=False)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    return transformers.Qwen2Config(**common)


def _model(kind: str, layers: int, hidden: int, seed: int):
    torch.manual_seed(seed)
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM
    m = cls(_config(kind, layers, hidden)).to(torch.float64).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is faster and steadier on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request):
    return request.param, _model(request.param, 3, 48, 0), _model(request.param, 1, 32, 1)


def _hf_greedy(model, prompts, max_new, eos=None):
    out = []
    for p in prompts:
        kw = {} if eos is None else {"eos_token_id": eos}
        g = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           do_sample=False, max_new_tokens=max_new, **kw)
        out.append(g[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("drafter_kind", ["none", "ngram", "draft_model", "self_draft"])
def test_greedy_equals_hf_generate(models, drafter_kind):
    kind, target_model, small = models
    ref = _hf_greedy(target_model, PROMPTS, MAX_NEW)
    drafter = {"none": lambda: None, "ngram": lambda: NGramDrafter(max_ngram=3, num_draft=5),
               "draft_model": lambda: DraftModelDrafter(HFTarget(small), num_draft=4),
               # the target drafting for itself: every draft accepted (long keeps, full rollbacks)
               "self_draft": lambda: DraftModelDrafter(HFTarget(target_model), num_draft=4)}[drafter_kind]()
    res = SpeculativeDecoder(HFTarget(target_model), drafter).generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert res.tokens == ref
    assert res.errors == [0] * len(PROMPTS)
    if drafter_kind == "self_draft":
        assert res.stats["mean_accepted"] > 3.0
    if drafter_kind == "ngram":
        assert res.stats["mean_accepted"] > 0.0  # the repetitive prompts give lookups that hit


def test_greedy_stop_token_matches_hf_eos(models):
    kind, target_model, _ = models
    p = PROMPTS[0]
    free = _hf_greedy(target_model, [p], MAX_NEW)[0]
    eos = free[6]
    ref = _hf_greedy(target_model, [p], MAX_NEW, eos=eos)[0]
    assert ref[-1] == eos and len(ref) <= 7
    res = SpeculativeDecoder(HFTarget(target_model), NGramDrafter(3, 5)).generate([p], max_new_tokens=MAX_NEW,
                                                                                  stop_tokens=[eos])
    assert res.tokens == [ref]


def _full_logits(model, seq, hidden_layers=()):
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([seq]), output_hidden_states=bool(hidden_layers))
    hid = torch.stack([out.hidden_states[l + 1][0] for l in hidden_layers], 1) if hidden_layers else None
    return out.logits[0], hid


def test_ragged_forward_equals_per_request(models):
    kind, m, _ = models
    t = HFTarget(m)
    assert t.vocab_size == V and t.device == torch.device("cpu")
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13]]
    cache = t.new_cache(3, 32)
    assert isinstance(cache, HFCache) and t.lengths(cache).dtype == torch.int32
    got = [[] for _ in seqs]
    got_h = [[] for _ in seqs]
    # step 1: ragged, one request empty; step 2: the rest, ragged again
    for split in ([3, 0, 4], [3, 2, 1]):
        start = t.lengths(cache).tolist()
        ids, pos, cu = [], [], [0]
        for r, s in enumerate(seqs):
            ids += s[start[r]:start[r] + split[r]]
            pos += list(range(start[r], start[r] + split[r]))
            cu.append(cu[-1] + split[r])
        logits, hidden = t.forward(torch.tensor(ids), torch.tensor(pos), torch.tensor(cu, dtype=torch.int32), cache,
                                   hidden_layers=(0, 2))
        assert logits.shape == (len(ids), V) and hidden.shape == (len(ids), 2, 48)
        for r in range(3):
            got[r].append(logits[cu[r]:cu[r + 1]])
            got_h[r].append(hidden[cu[r]:cu[r + 1]])
    assert t.lengths(cache).tolist() == [6, 2, 5]
    for r, s in enumerate(seqs):
        ref, ref_h = _full_logits(m, s, (0, 2))
        torch.testing.assert_close(torch.cat(got[r]), ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(torch.cat(got_h[r]), ref_h, rtol=1e-9, atol=1e-9)
    logits, hidden = t.forward(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                               torch.zeros(4, dtype=torch.int32), cache)
    assert logits.shape == (0, V) and hidden is None


def _branch(t, prefix, branch_tokens):
    """A fresh single-request HFCache holding prefix + branch (chain), and its layers' K/V."""
    c = t.new_cache(1, 64)
    seq = prefix + branch_tokens
    t.forward(torch.tensor(seq), torch.arange(len(seq)), torch.tensor([0, len(seq)], dtype=torch.int32), c)
    return c


def _layers(hf):
    return [(l.keys, l.values) for l in hf.layers]


def test_tree_rollback_matches_prefill(models):
    """Two sibling branches appended interleaved, as a tree-attention pass
    would (nodes x0 a0 x1 a1 x2: branch a = [a0, a1] beside x = [x0, x1, x2],
    both children of the root); keeping branch a (non-prefix keep [1, 3],
    kv_compact + slice) must give the cache a prefill of prefix + a gives,
    and the same next-token logits. Request 1 keeps the prefix [x0] (the
    slicing path), request 2 nothing."""
    kind, m, _ = models
    t = HFTarget(m)
    prefixes = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    a, x = [30, 31], [40, 41, 42]
    cache = t.new_cache(3, 64)
    for r, p in enumerate(prefixes):  # build each request's interleaved tree cache from the two branches
        ca, cx = _branch(t, p, a), _branch(t, p, x)
        L = len(p)
        order = [("x", 0), ("a", 0), ("x", 1), ("a", 1), ("x", 2)]
        for li, layer in enumerate(cache.caches[r].layers):
            ka, va = _layers(ca.caches[0])[li]
            kx, vx = _layers(cx.caches[0])[li]
            src = {"a": (ka, va), "x": (kx, vx)}
            layer.lazy_initialization(ka, va)
            layer.keys = torch.cat([ka[:, :, :L]] + [src[b][0][:, :, L + i:L + i + 1] for b, i in order], 2)
            layer.values = torch.cat([va[:, :, :L]] + [src[b][1][:, :, L + i:L + i + 1] for b, i in order], 2)
        cache.host_lengths[r] = L + len(order)
    cache._sync_lengths()
    base = torch.tensor([len(p) for p in prefixes], dtype=torch.int32)
    keep_index = torch.tensor([[1, 3], [0, -1], [-1, -1]], dtype=torch.int32)
    num_keep = torch.tensor([2, 1, 0], dtype=torch.int32)
    t.rollback(cache, base, torch.full((3,), 5, dtype=torch.int32), keep_index, num_keep)
    assert t.lengths(cache).tolist() == [len(prefixes[0]) + 2, len(prefixes[1]) + 1, len(prefixes[2])]
    expect = [prefixes[0] + a, prefixes[1] + x[:1], prefixes[2]]
    for r, seq in enumerate(expect):
        ref = _branch(t, seq, [])
        for (k, v), (rk, rv) in zip(_layers(cache.caches[r]), _layers(ref.caches[0])):
            assert k.shape == rk.shape
            torch.testing.assert_close(k, rk, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(v, rv, rtol=1e-9, atol=1e-9)
    # decoding continues from the compacted caches exactly as from a prefill
    nxt = [50, 51, 52]
    ids = torch.tensor(nxt)
    pos = torch.tensor([len(s) for s in expect])
    logits, _ = t.forward(ids, pos, torch.arange(4, dtype=torch.int32), cache)
    for r, seq in enumerate(expect):
        ref, _ = _full_logits(m, seq + [nxt[r]])
        torch.testing.assert_close(logits[r], ref[-1], rtol=1e-9, atol=1e-9)


def test_rollback_rejects_bad_arguments(models):
    _, m, _ = models
    t = HFTarget(m)
    cache = t.new_cache(1, 16)
    t.forward(torch.arange(1, 5), torch.arange(4), torch.tensor([0, 4], dtype=torch.int32), cache)
    one = lambda v: torch.tensor([v], dtype=torch.int32)  # noqa: E731
    with pytest.raises(ValueError):  # more appended than cached
        t.rollback(cache, one(2), one(5), torch.tensor([[0, 1]], dtype=torch.int32), one(2))
    with pytest.raises(ValueError):  # keep not increasing: kv_compact's BAD_INDEX
        t.rollback(cache, one(1), one(3), torch.tensor([[2, 1]], dtype=torch.int32), one(2))
    assert t.lengths(cache).tolist() == [4]


def test_rollback_moves_entries_of_every_layer(models):
    """Pure data movement: after a prefix rollback (a sliced, non-contiguous
    view) a non-prefix keep of the same appended region moves exactly the
    kept entries, in every layer's K and V, and truncates the rest."""
    _, m, _ = models
    t = HFTarget(m)
    cache = t.new_cache(1, 32)
    t.forward(torch.arange(1, 11), torch.arange(10), torch.tensor([0, 10], dtype=torch.int32), cache)
    orig = [(k.clone(), v.clone()) for k, v in _layers(cache.caches[0])]
    one = lambda v: torch.tensor([v], dtype=torch.int32)  # noqa: E731
    t.rollback(cache, one(4), one(6), torch.arange(5, dtype=torch.int32).view(1, 5), one(5))  # keep 0..4: slice
    assert t.lengths(cache).tolist() == [9] and not _layers(cache.caches[0])[0][0].is_contiguous()
    t.rollback(cache, one(4), one(5), torch.tensor([[1, 3, 4]], dtype=torch.int32), one(3))  # non-prefix
    assert t.lengths(cache).tolist() == [7]
    pick = [0, 1, 2, 3, 5, 7, 8]
    for (k, v), (ok, ov) in zip(_layers(cache.caches[0]), orig):
        assert torch.equal(k, ok[:, :, pick]) and torch.equal(v, ov[:, :, pick])


def test_rollback_with_layers_sharing_a_kv_tensor(models):
    """Models that share KV across layers give the cache one tensor for
    several layers: a non-prefix rollback moves its entries once (kv_compact
    refuses a tensor listed twice), and the layers still share it."""
    _, m, _ = models
    t = HFTarget(m)
    cache = t.new_cache(1, 32)
    t.forward(torch.arange(1, 11), torch.arange(10), torch.tensor([0, 10], dtype=torch.int32), cache)
    hf = cache.caches[0]
    first, second = hf.layers[0], hf.layers[1]
    second.keys, second.values = first.keys, first.values  # layer 1 reads layer 0's KV
    orig = [(k.clone(), v.clone()) for k, v in _layers(hf)]
    one = lambda v: torch.tensor([v], dtype=torch.int32)  # noqa: E731
    t.rollback(cache, one(4), one(6), torch.tensor([[1, 3, 4]], dtype=torch.int32), one(3))
    assert t.lengths(cache).tolist() == [7]
    pick = [0, 1, 2, 3, 5, 7, 8]
    for (k, v), (ok, ov) in zip(_layers(hf), orig):
        assert torch.equal(k, ok[:, :, pick]) and torch.equal(v, ov[:, :, pick])
    assert second.keys.data_ptr() == first.keys.data_ptr()


def test_sampled_generation_runs(models):
    """Sampling through HFTarget: right lengths, reproducible for a seed."""
    _, m, small = models
    dec = SpeculativeDecoder(HFTarget(m), DraftModelDrafter(HFTarget(small), num_draft=3))
    a = dec.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=7)
    b = dec.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=7)
    assert a.tokens == b.tokens and [len(x) for x in a.tokens] == [10] * len(PROMPTS)
    assert all(0 <= tok < V for row in a.tokens for tok in row)


# ---------------------------------------------------------------------------
# builtin_from_hf: a Hugging Face Llama's weights in the built-in model

@pytest.mark.parametrize("tied", [False, True])
def test_builtin_from_hf_matches_hf_logits_and_greedy_generate(tied):
    torch.manual_seed(3)
    cfg = _config("llama", 3, 48)
    cfg.tie_word_embeddings = tied
    cfg.rms_norm_eps = 1e-5
    hf = transformers.LlamaForCausalLM(cfg).to(torch.float64).eval()
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    ours = builtin_from_hf(hf)
    assert ours.cfg.n_kv_heads == 2 and ours.cfg.norm_eps == 1e-5 and ours.cfg.rope_theta == 10000.0
    seq = PROMPTS[0] + PROMPTS[3]
    with torch.no_grad():
        want = hf(torch.tensor([seq])).logits[0]
    got, _ = BuiltinTarget(ours).forward(torch.tensor(seq), torch.arange(len(seq)),
                                         torch.tensor([0, len(seq)], dtype=torch.int32), ours.new_cache(1, len(seq)))
    # HF computes the rotary tables in float32 (ours in float64): differences ~1e-7
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ref = _hf_greedy(hf, PROMPTS, MAX_NEW)
    small = builtin_from_hf(_model("llama", 1, 32, 1))
    for drafter in (None, NGramDrafter(3, 5), DraftModelDrafter(BuiltinTarget(small), 4)):
        assert SpeculativeDecoder(BuiltinTarget(ours), drafter).generate(PROMPTS, MAX_NEW).tokens == ref


def test_builtin_from_hf_refuses_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match="model_type 'qwen2' is not supported"):
        builtin_from_hf(_model("qwen2", 1, 32, 0))
    cfg = _config("llama", 1, 32)
    cfg.attention_bias = True
    with pytest.raises(ValueError, match="attention_bias=True is not supported"):
        builtin_from_hf(transformers.LlamaForCausalLM(cfg))
    cfg = _config("llama", 1, 32)
    cfg.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="rope_type 'linear' is not supported"):
        builtin_from_hf(transformers.LlamaForCausalLM(cfg))


def test_tree_drafts_need_a_builtin_target(models):
    _, target_model, _ = models
    with pytest.raises(NotImplementedError, match="tree drafts"):
        SpeculativeDecoder(HFTarget(target_model), NGramDrafter(3, 6, branches=2)).generate(PROMPTS, 8)
