"""verify_tree on the CPU against the pure-PyTorch reference (DESIGN §3
verify_tree): random trees of every shape, every sibling mode and draft
form, greedy exactness, the path = chain identity, deep and wide trees,
the out= form, opcheck and torch.compile."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dspark_ops
from dspark_ops import Status
from dspark_ops import reference as ref
from tree_helpers import (POISON, assert_tree_matches, assert_well_formed, chain_form, eagle_parents, max_depth_of,
                          mixed_trees, path_parents, poisoned_tree_result, random_parents, reference_with_margins,
                          slice_request, star_parents, tree_batch)

# name: (draft rows, how each node's children were drafted, call arguments)
MODES = {
    "greedy": (None, "top_k", dict(temperature=0.0)),
    "greedy_with_draft_rows": ("logits", "iid", dict(temperature=0.0, sibling_mode="iid")),
    "deterministic_default": (None, "top_k", dict(temperature=0.9)),  # no draft rows: None means deterministic
    "deterministic_ignores_draft_rows": ("probs", "top_k", dict(sibling_mode="deterministic")),
    "iid_probs": ("probs", "iid", dict(sibling_mode="iid")),
    "iid_default_logits": ("logits", "iid", dict(temperature=0.8)),  # draft rows: None means iid
    "iid_draft_temperature": ("logits", "iid", dict(sibling_mode="iid", draft_temperature=0.7)),
    "wor_logits": ("logits", "without_replacement", dict(sibling_mode="without_replacement")),
    "wor_probs_top_p": ("probs", "without_replacement", dict(sibling_mode="without_replacement", top_p=0.7)),
    "iid_logits_top_k_top_p": ("logits", "iid", dict(temperature=1.1, top_k=20, top_p=0.85)),
}


def check(target, tokens, parents, cu, max_depth, what="", **kw):
    """The op (outputs poisoned, the out= form) against the reference."""
    R = cu.shape[0] - 1
    out = poisoned_tree_result(R, max_depth)
    got = dspark_ops.verify_tree(target, tokens, parents, cu, max_depth=max_depth, out=out, **kw)
    assert all(a is b for a, b in zip(got, out))
    for name, t in zip(got._fields, got):
        assert not bool((t == POISON).any()), f"{what}: {name} not fully written"
    want, margins = reference_with_margins(target, tokens, parents, cu, max_depth=max_depth, **kw)
    assert_tree_matches(got, want, margins, what)
    assert_well_formed(got, tokens, parents, cu, target.shape[1])
    return got, want


def per_request(R, seed=0):
    return dict(seed=torch.arange(R) * 7 + seed + 1, position=torch.tensor([0, 5, 1 << 33, 7, 100, 3, 9, 2] * R)[:R])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 7, 1000])
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_reference(V, dtype, mode):
    draft, siblings, kw = MODES[mode]
    trees = mixed_trees(seed=V)
    target, tokens, parents, cu, dkw = tree_batch(trees, V, dtype, draft=draft, siblings=siblings, seed=V)
    check(target, tokens, parents, cu, max_depth_of(trees), f"V={V} {dtype} {mode}", **per_request(len(trees)),
          **dkw, **kw)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("mode", list(MODES))
def test_matches_reference_vocabulary_32001(mode):
    # A smaller batch (the reference's top-p pass costs ~50 ms a row at this V);
    # the dtype cycles with the mode so each dtype meets several modes.
    dtype = DTYPES[list(MODES).index(mode) % 3]
    draft, siblings, kw = MODES[mode]
    g = torch.Generator().manual_seed(1)
    trees = [path_parents(4), star_parents(4), random_parents(8, g), [-1]]
    target, tokens, parents, cu, dkw = tree_batch(trees, 32001, dtype, draft=draft, siblings=siblings, seed=7,
                                                  scale=4.0)
    check(target, tokens, parents, cu, max_depth_of(trees), f"V=32001 {dtype} {mode}", **per_request(len(trees)),
          **dkw, **kw)


@pytest.mark.parametrize("mode", ["greedy", "iid_probs", "wor_logits", "deterministic_default"])
@pytest.mark.parametrize("shape", ["path", "star", "random", "eagle", "root"])
def test_single_request(shape, mode):
    g = torch.Generator().manual_seed(3)
    tree = {"path": path_parents(7), "star": star_parents(9), "random": random_parents(15, g),
            "eagle": eagle_parents(3, 3, 2), "root": [-1]}[shape]
    draft, siblings, kw = MODES[mode]
    target, tokens, parents, cu, dkw = tree_batch([tree], 50, draft=draft, siblings=siblings, seed=11)
    check(target, tokens, parents, cu, max_depth_of([tree]), f"{shape} {mode}", seed=5, position=17, **dkw, **kw)


def test_large_batch_mixed_parameters_and_sibling_modes():
    R, V = 40, 11
    g = torch.Generator().manual_seed(5)
    trees = [random_parents(int(torch.randint(1, 14, (), generator=g)), g, chain_bias=0.5) for _ in range(R)]
    target, tokens, parents, cu, kw = tree_batch(trees, V, draft="logits", siblings="without_replacement", seed=2)
    temperature = torch.rand(R, generator=g) * 1.5
    temperature[::5] = 0.0
    draft_temperature = torch.ones(R)
    draft_temperature[1::7] = 0.0  # point-mass drafts: deterministic whatever the mode says
    modes = torch.tensor([0, 1, 2] * R, dtype=torch.int8)[:R]
    check(target, tokens, parents, cu, max_depth_of(trees) + 1, "mixed", temperature=temperature,
          draft_temperature=draft_temperature, sibling_mode=modes,
          top_k=torch.randint(0, V + 2, (R,), generator=g, dtype=torch.int32),
          top_p=torch.rand(R, generator=g) * 1.1 + 0.1, seed=torch.randint(0, 1 << 62, (R,), generator=g),
          position=torch.randint(0, 1 << 40, (R,), generator=g), **kw)


def test_greedy_exact():
    V = 10
    g = torch.Generator().manual_seed(0)
    # request 0: root 0 with children 1, 2, 3; 2 and 3 both carry the root's
    # argmax (the first, node 2, is followed); node 2's children 4 (argmax)
    # and 5; node 3's child 6 is never visited. Request 1: a lone root.
    # Request 2: no child matches.
    trees = [[-1, 0, 0, 0, 2, 2, 3], [-1], [-1, 0, 0]]
    cu = torch.tensor([0, 7, 8, 11], dtype=torch.int32)
    parents = torch.tensor([p for t in trees for p in t], dtype=torch.int32)
    target = torch.randn(11, V, generator=g)
    am = target.argmax(-1).tolist()
    tokens = torch.zeros(11, dtype=torch.int32)
    tokens[1] = (am[0] + 1) % V
    tokens[2] = tokens[3] = am[0]
    tokens[4], tokens[5], tokens[6] = am[2], (am[2] + 3) % V, am[3]
    tokens[9], tokens[10] = (am[8] + 1) % V, (am[8] + 2) % V
    res = dspark_ops.verify_tree(target, tokens, parents, cu, max_depth=2, temperature=0.0)
    assert res.tokens.tolist() == [[am[0], am[2], am[4]], [am[7], -1, -1], [am[8], -1, -1]]
    assert res.path.tolist() == [[0, 2, 4], [0, -1, -1], [0, -1, -1]]
    assert res.accepted.tolist() == [2, 0, 0] and res.emitted.tolist() == [3, 1, 1]
    assert res.status.tolist() == [0, 0, 0]
    want = ref.verify_tree(target, tokens, parents, cu, max_depth=2, temperature=0.0)
    assert all(torch.equal(a, b) for a, b in zip(res, want))
    # greedy ignores draft rows and sibling modes
    probs = torch.softmax(torch.randn(11, V, generator=g), -1)
    for mode in ("iid", "without_replacement", "deterministic"):
        other = dspark_ops.verify_tree(target, tokens, parents, cu, max_depth=2, temperature=0.0, draft_probs=probs,
                                       sibling_mode=mode)
        assert all(torch.equal(a, b) for a, b in zip(res, other))


# ------------------------------------------------------------ path = chain

PATH_CASES = {
    "logits": ("logits", {}),
    "probs": ("probs", {}),
    "point_mass": (None, {}),
    "greedy": ("logits", dict(temperature=0.0)),
    "top_k_top_p": ("logits", dict(temperature=0.9, top_k=5, top_p=0.8)),
    "draft_temperature": ("logits", dict(draft_temperature=torch.tensor([1.0, 0.0, 0.7, 1.0, 0.0, 1.3]))),
    "wor_probs": ("probs", dict(sibling_mode="without_replacement")),
    "iid_no_draft_rows": (None, dict(sibling_mode="iid")),
    "deterministic_point_mass": (None, dict(sibling_mode="deterministic")),
}
PATH_LENGTHS = [1, 2, 5, 8, 3, 6]


def path_batch(V, dtype, draft, seed):
    """Path trees with a -1 token (request 3, node 4) and a q = 0 child
    (request 5, node 2) so the flags are compared too."""
    trees = [path_parents(n) for n in PATH_LENGTHS]
    target, tokens, parents, cu, kw = tree_batch(trees, V, dtype, draft=draft, seed=seed, greedy_bias=0.7)
    tokens[int(cu[3]) + 4] = -1
    if "draft_probs" in kw:
        kw["draft_probs"][int(cu[5]) + 1, int(tokens[int(cu[5]) + 2])] = 0.0
    return trees, target, tokens, parents, cu, kw


def _tree_vs_chain(verify_tree, verify_chunk, V, dtype, case):
    draft, extra = PATH_CASES[case]
    trees, target, tokens, parents, cu, kw = path_batch(V, dtype, draft, seed=V + 1)
    R = len(trees)
    common = dict(seed=torch.arange(R) * 3 + 1, position=torch.tensor([0, 5, 1 << 33, 7, 100, 2]), **extra)
    tree = verify_tree(target, tokens, parents, cu, max_depth=max(PATH_LENGTHS) - 1, **kw, **common)
    args, ckw = chain_form(target, tokens, cu, kw)
    chain = verify_chunk(*args, **ckw, **{k: v for k, v in common.items() if k != "sibling_mode"})
    for name, a, b in zip(("tokens", "accepted", "emitted", "status"), (tree[0], tree[1], tree[2], tree[4]), chain):
        assert torch.equal(a, b), f"{case}: {name} {a.tolist()} (tree) vs {b.tolist()} (chain)"
    accepted = tree[1].tolist()
    for r in range(R):  # a path's accepted nodes are 0..accepted
        assert tree[3][r, :accepted[r] + 1].tolist() == list(range(accepted[r] + 1))
    return tree


@pytest.mark.parametrize("V,dtype", [(1, torch.float32), (7, torch.bfloat16), (1000, torch.float32),
                                     (1000, torch.float16)])
@pytest.mark.parametrize("case", list(PATH_CASES))
def test_path_equals_chain_reference(V, dtype, case):
    _tree_vs_chain(ref.verify_tree, ref.verify_chunk, V, dtype, case)


@pytest.mark.parametrize("V,dtype", [(1, torch.float32), (7, torch.bfloat16), (1000, torch.float32),
                                     (32001, torch.bfloat16)])
@pytest.mark.parametrize("case", list(PATH_CASES))
def test_path_equals_chain_op(V, dtype, case):
    _tree_vs_chain(dspark_ops.verify_tree, dspark_ops.verify_chunk, V, dtype, case)


# ------------------------------------------------------- deep, wide, big


def test_depth_64_greedy_accepts_the_whole_path():
    n, V = 65, 300
    target = torch.randn(n, V, generator=torch.Generator().manual_seed(1))
    am = target.argmax(-1).to(torch.int32)
    tokens = torch.cat([torch.tensor([7], dtype=torch.int32), am[:-1]])  # node i+1 carries row i's argmax
    parents = torch.tensor(path_parents(n), dtype=torch.int32)
    cu = torch.tensor([0, n], dtype=torch.int32)
    got, _ = check(target, tokens, parents, cu, 64, "depth 64 greedy", temperature=0.0)
    assert got.accepted.tolist() == [64] and got.tokens[0].tolist() == am.tolist()
    assert got.path[0].tolist() == list(range(65))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_depth_64_q_equal_to_p_accepts_the_whole_path(dtype):
    # Draft logits = target logits, both at temperature 1: every coin passes.
    n, V = 65, 257
    g = torch.Generator().manual_seed(2)
    target = (torch.randn(n, V, generator=g) * 2).to(dtype)
    p = torch.softmax(target.float(), -1)
    tokens = torch.cat([torch.zeros(1, dtype=torch.int64),
                        torch.multinomial(p[:-1], 1, generator=g).squeeze(1)]).to(torch.int32)
    parents = torch.tensor(path_parents(n), dtype=torch.int32)
    cu = torch.tensor([0, n], dtype=torch.int32)
    got, want = check(target, tokens, parents, cu, 64, "depth 64 stochastic", draft_logits=target, seed=3,
                      position=11, sibling_mode="without_replacement")
    assert want[1].tolist() == [64]


@pytest.mark.parametrize("shape,V,mode", [("random", 97, "without_replacement"), ("star", 50, "iid"),
                                          ("star", 2000, "without_replacement"), ("eagle", 300, "deterministic"),
                                          ("deep", 97, "iid")])
def test_1024_node_trees(shape, V, mode):
    g = torch.Generator().manual_seed(4)
    tree = {"random": random_parents(1024, g, chain_bias=0.3), "star": star_parents(1024),
            "eagle": eagle_parents(8, 4, 60)[:1024], "deep": random_parents(1024, g, chain_bias=0.95)}[shape]
    assert len(tree) == 1024
    siblings = {"iid": "iid", "without_replacement": "without_replacement", "deterministic": "top_k"}[mode]
    trees = [tree, path_parents(3)]
    target, tokens, parents, cu, kw = tree_batch(trees, V, draft="logits", siblings=siblings, seed=V, noise=0.1)
    check(target, tokens, parents, cu, max_depth_of(trees), f"{shape} {mode}", sibling_mode=mode, seed=1,
          position=torch.tensor([4, 5]), **kw)


def test_max_depth_none_reads_it_from_parents():
    trees = [path_parents(4), star_parents(5), [-1, 0, 1, 1, 3]]  # depths 3, 1, 3
    target, tokens, parents, cu, kw = tree_batch(trees, 20, draft="probs", seed=1, greedy_bias=1.0)
    res = dspark_ops.verify_tree(target, tokens, parents, cu, seed=2, **kw)
    assert res.tokens.shape == (3, 4) and res.path.shape == (3, 4)
    wide = dspark_ops.verify_tree(target, tokens, parents, cu, max_depth=9, seed=2, **kw)
    assert wide.tokens.shape == (3, 10)
    assert torch.equal(wide.tokens[:, :4], res.tokens) and bool((wide.tokens[:, 4:] == -1).all())
    assert torch.equal(wide.path[:, :4], res.path) and bool((wide.path[:, 4:] == -1).all())
    assert all(torch.equal(a, b) for a, b in zip(wide[1:3], res[1:3])) and torch.equal(wide.status, res.status)


# ----------------------------------------------------------- API contract


def test_outputs_fully_overwritten_including_aborted_requests():
    trees = [path_parents(3), star_parents(4), [-1, 0, 5], [-1]]  # request 2: parent 5 >= child 2
    target, tokens, parents, cu, kw = tree_batch(trees, 30, draft="logits", seed=6)
    target[int(cu[3])] = float("nan")  # request 3: its only row is needed
    check(target, tokens, parents, cu, 4, "poisoned", seed=1, **kw)
    res = dspark_ops.verify_tree(target, tokens, parents, cu, max_depth=4, out=poisoned_tree_result(4, 4), **kw)
    assert res.status[2] == Status.BAD_TREE and res.status[3] == Status.NONFINITE_LOGITS
    for r in (2, 3):
        assert res.tokens[r].tolist() == [-1] * 5 and res.path[r].tolist() == [-1] * 5
        assert res.accepted[r] == 0 and res.emitted[r] == 0


def test_out_form_equals_functional_form():
    trees = mixed_trees(seed=2)
    target, tokens, parents, cu, kw = tree_batch(trees, 64, draft="probs", siblings="without_replacement", seed=3)
    D = max_depth_of(trees)
    args = dict(max_depth=D, sibling_mode="without_replacement", temperature=0.9, seed=4, position=8, **kw)
    fresh = dspark_ops.verify_tree(target, tokens, parents, cu, **args)
    assert isinstance(fresh, dspark_ops.TreeResult)
    out = dspark_ops.empty_tree_result(len(trees), D)
    assert out.tokens.shape == (len(trees), D + 1) and out.path.shape == (len(trees), D + 1)
    assert all(t.dtype == torch.int32 for t in out)
    got = dspark_ops.verify_tree(target, tokens, parents, cu, out=out, **args)
    assert all(a is b for a, b in zip(got, out))
    assert all(torch.equal(a, b) for a, b in zip(got, fresh))
    again = dspark_ops.verify_tree(target, tokens, parents, cu, out=out, **args)  # buffers reused
    assert all(torch.equal(a, b) for a, b in zip(again, fresh))


def test_inputs_are_not_modified():
    trees = mixed_trees(seed=4)
    for draft, mode in (("probs", "without_replacement"), ("logits", "iid"), ("probs", "deterministic")):
        target, tokens, parents, cu, kw = tree_batch(trees, 50, draft=draft, siblings="without_replacement", seed=4)
        modes = torch.tensor([0, 1, 2, 1, 0, 1, 2, 1], dtype=torch.int8)
        inputs = [target, tokens, parents, cu, *kw.values(), modes]
        before = [t.clone() for t in inputs]
        dspark_ops.verify_tree(target, tokens, parents, cu, seed=1, top_p=0.9, sibling_mode=mode, **kw)
        dspark_ops.verify_tree(target, tokens, parents, cu, seed=1, top_k=5, sibling_mode=modes, **kw)
        assert all(torch.equal(a, b) for a, b in zip(before, inputs))


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_sibling_mode_tensor_mixes_modes_per_request(impl):
    verify = dspark_ops.verify_tree if impl == "op" else (lambda *a, **k: dspark_ops.TreeResult(*ref.verify_tree(*a, **k)))
    g = torch.Generator().manual_seed(8)
    R = 12
    trees = [random_parents(int(torch.randint(2, 12, (), generator=g)), g) for _ in range(R)]
    target, tokens, parents, cu, kw = tree_batch(trees, 9, draft="logits", siblings="without_replacement", seed=8)
    codes = torch.tensor([0, 1, 2] * 4, dtype=torch.int8)
    common = dict(max_depth=max_depth_of(trees), seed=torch.arange(R), position=3, temperature=1.2, **kw)
    mixed = verify(target, tokens, parents, cu, sibling_mode=codes, **common)
    by_name = {code: verify(target, tokens, parents, cu, sibling_mode=name, **common)
               for code, name in enumerate(("iid", "without_replacement", "deterministic"))}
    for r in range(R):
        want = by_name[int(codes[r])]
        assert all(torch.equal(a[r], b[r]) for a, b in zip(mixed, want)), r
    assert [int(m) for m in dspark_ops.SiblingMode] == [0, 1, 2]
    assert dspark_ops.SiblingMode.WITHOUT_REPLACEMENT == 1 and dspark_ops.SiblingMode.DETERMINISTIC == 2
    # the modes really differ somewhere on this batch (else the test shows nothing)
    assert any(not torch.equal(a, b) for a, b in zip(by_name[0], by_name[2]))


def test_point_mass_drafts_are_deterministic_whatever_the_mode():
    trees = mixed_trees(seed=9)
    R = len(trees)
    target, tokens, parents, cu, kw = tree_batch(trees, 40, draft="probs", siblings="iid", seed=9)
    common = dict(max_depth=max_depth_of(trees), seed=torch.arange(R) + 2, position=6)
    det = dspark_ops.verify_tree(target, tokens, parents, cu, sibling_mode="deterministic", **common)
    for mode in ("iid", "without_replacement", None):
        no_rows = dspark_ops.verify_tree(target, tokens, parents, cu, sibling_mode=mode, **common)
        zero_t = dspark_ops.verify_tree(target, tokens, parents, cu, sibling_mode=mode, draft_temperature=0.0,
                                        **common, **kw)
        assert all(torch.equal(a, b) for a, b in zip(no_rows, det)), mode
        assert all(torch.equal(a, b) for a, b in zip(zero_t, det)), mode
    # and with draft rows given, deterministic ignores them
    with_rows = dspark_ops.verify_tree(target, tokens, parents, cu, sibling_mode="deterministic", **common, **kw)
    assert all(torch.equal(a, b) for a, b in zip(with_rows, det))
    # the enum and its code name the same mode
    for mode in (dspark_ops.SiblingMode.DETERMINISTIC, 2):
        same = dspark_ops.verify_tree(target, tokens, parents, cu, sibling_mode=mode, **common, **kw)
        assert all(torch.equal(a, b) for a, b in zip(same, det)), mode
    with pytest.raises(ValueError, match="sibling_mode must be 0 \\(iid\\), 1 \\(without_replacement\\) or 2"):
        dspark_ops.verify_tree(target, tokens, parents, cu, sibling_mode=3, **common)


def test_outcome_is_independent_of_batch_position():
    trees = mixed_trees(seed=12)
    R = len(trees)
    target, tokens, parents, cu, kw = tree_batch(trees, 40, draft="logits", seed=12)
    params = dict(seed=torch.arange(R) + 5, position=torch.arange(R) * 10, sibling_mode="without_replacement",
                  top_k=torch.tensor([0, 3, 5, 0, 7, 2, 0, 9], dtype=torch.int32), **kw)
    D = max_depth_of(trees)
    base = dspark_ops.verify_tree(target, tokens, parents, cu, max_depth=D, **params)
    for r in range(R):
        t, tok, par, one_cu, one = slice_request(r, target, tokens, parents, cu, params)
        alone = dspark_ops.verify_tree(t, tok, par, one_cu, max_depth=D, **one)
        assert all(torch.equal(a[0], b[r]) for a, b in zip(alone, base)), r


def test_root_token_is_not_checked():
    # node 0 is the last committed token: its value plays no part
    trees = [path_parents(4), star_parents(3)]
    target, tokens, parents, cu, kw = tree_batch(trees, 20, draft="probs", seed=13)
    base = dspark_ops.verify_tree(target, tokens, parents, cu, seed=1, **kw)
    odd = tokens.clone()
    odd[cu[:-1].long()] = torch.tensor([-1, 1 << 20], dtype=torch.int32)
    other = dspark_ops.verify_tree(target, odd, parents, cu, seed=1, **kw)
    assert all(torch.equal(a, b) for a, b in zip(base, other)) and other.status.tolist() == [0, 0]
    want = ref.verify_tree(target, odd, parents, cu, seed=1, **kw)
    assert all(torch.equal(a, b) for a, b in zip(other, want))


def test_empty_batch():
    res = dspark_ops.verify_tree(torch.zeros(0, 5), torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                                 torch.zeros(1, dtype=torch.int32), max_depth=3)
    assert res.tokens.shape == (0, 4) and res.path.shape == (0, 4) and res.status.shape == (0,)


# ------------------------------------------------------ opcheck, compile


class _Record(TorchDispatchMode):
    """Records the dspark_ops calls the wrapper makes (so the tests need
    not know the schema's argument order)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", None) == "dspark_ops":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def recorded_op_call(*args, **kw):
    """(op overload, args, kwargs) of the torch.ops call made by
    dspark_ops.verify_tree(*args, **kw)."""
    with _Record() as rec:
        dspark_ops.verify_tree(*args, **kw)
    calls = [c for c in rec.calls if c[0].name().startswith("dspark_ops::verify_tree")]
    assert len(calls) == 1, [c[0] for c in rec.calls]
    return calls[0]


OPCHECK_CASES = {
    "probs_wor_top": ("probs", dict(sibling_mode="without_replacement", top_k=10, top_p=0.9, temperature=0.9)),
    "logits_iid": ("logits", dict(sibling_mode="iid", draft_temperature=0.8)),
    "none_greedy": (None, dict(temperature=0.0)),
    "codes": ("logits", dict(sibling_mode=torch.tensor([0, 1, 2], dtype=torch.int8))),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck_both_forms(case):
    draft, kw = OPCHECK_CASES[case]
    trees = [random_parents(6, torch.Generator().manual_seed(1)), [-1], star_parents(4)]
    target, tokens, parents, cu, dkw = tree_batch(trees, 30, draft=draft, seed=8)
    D = max_depth_of(trees)
    common = dict(max_depth=D, seed=torch.tensor([1, 2, 3]), position=torch.tensor([2, 2, 2]), **dkw, **kw)
    op, args, kwargs = recorded_op_call(target, tokens, parents, cu, **common)
    assert op == torch.ops.dspark_ops.verify_tree.default and not kwargs
    torch.library.opcheck(op, args, kwargs)
    out_op, out_args, out_kwargs = recorded_op_call(target, tokens, parents, cu, out=dspark_ops.empty_tree_result(3, D),
                                                    **common)
    assert out_op == torch.ops.dspark_ops.verify_tree.out
    torch.library.opcheck(out_op, out_args, out_kwargs)


def test_torch_compile_fullgraph():
    trees = [eagle_parents(2, 2, 2), path_parents(4), star_parents(3)]
    target, tokens, parents, cu, kw = tree_batch(trees, 64, draft="probs", siblings="without_replacement", seed=3)
    D = max_depth_of(trees)
    pos = torch.arange(3)

    def step(t, tok, par, c, q, p):
        return dspark_ops.verify_tree(t, tok, par, c, max_depth=D, draft_probs=q, sibling_mode="without_replacement",
                                      temperature=0.8, top_k=10, seed=3, position=p)

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(target, tokens, parents, cu, kw["draft_probs"], pos)
    want = step(target, tokens, parents, cu, kw["draft_probs"], pos)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_workspace_size_row_pass_room():
    """num_nodes adds the CUDA row pass's arrays (a keep key, an owner and
    a chunk partial per chunk for every node row) to the walk's workspace."""
    base = dspark_ops.workspace_size("verify_tree", num_requests=8, vocab_size=32000)
    more = dspark_ops.workspace_size("verify_tree", num_requests=8, vocab_size=32000, num_nodes=100)
    assert more - base >= 100 * (4 + 4 + 4 * 28)  # V = 32000: 4 chunks of 8192
    with pytest.raises(ValueError, match="unknown sizes"):
        dspark_ops.workspace_size("verify_tree", num_requests=8, vocab_size=32000, nodes=100)
    with pytest.raises(ValueError, match="unknown sizes"):  # verify_tree has no max_draft, verify_chunk no num_nodes
        dspark_ops.workspace_size("verify_tree", num_requests=8, vocab_size=32000, max_draft=7)
    with pytest.raises(ValueError, match="unknown sizes"):
        dspark_ops.workspace_size("verify_chunk", num_requests=8, vocab_size=32000, num_nodes=7)
    with pytest.raises(ValueError, match="num_nodes must be >= 0, got -1"):
        dspark_ops.workspace_size("verify_tree", num_requests=8, vocab_size=32000, num_nodes=-1)


@pytest.mark.parametrize("name", ["draft_probs", "draft_logits"])
def test_empty_draft_rows_are_bad_lengths(name):
    """A draft tensor with no rows while requests have nodes gives
    BAD_LENGTHS (its null data pointer once skipped the row bound: a
    segfault), for the tree and the chain; a chain request without drafts
    needs no draft row."""
    V = 50
    target = torch.randn(5, V)
    tree = dspark_ops.verify_tree(target[:4], torch.tensor([1, 2, 3, 4], dtype=torch.int32),
                                  torch.tensor([-1, 0, 1, -1], dtype=torch.int32),
                                  torch.tensor([0, 3, 4], dtype=torch.int32), max_depth=2, seed=1,
                                  **{name: torch.empty(0, V)})
    assert tree.status.tolist() == [Status.BAD_LENGTHS] * 2 and tree.tokens.tolist() == [[-1] * 3] * 2
    chain = dspark_ops.verify_chunk(target[:4], torch.tensor([1, 2], dtype=torch.int32),
                                    torch.tensor([0, 0, 2], dtype=torch.int32), max_draft=2, seed=1,
                                    **{name: torch.empty(0, V)})
    assert chain.status.tolist() == [0, Status.BAD_LENGTHS] and chain.emitted.tolist() == [1, 0]
