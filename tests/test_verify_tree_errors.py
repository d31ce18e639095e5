"""verify_tree's bad input. Host side: the same message from the C++ op and
its fake kernel, naming the argument and the value; the wrapper's own
checks. Device side: malformed trees, bad lengths, NaN rows, out-of-range
tokens, q = 0 children and bad sibling-mode codes give status bits and
defined outputs, and leave the batch's other requests as they were;
validate=True raises instead."""
import pytest
import torch

import dspark_ops
from dspark_ops import Status
from dspark_ops import reference as ref
from helpers import assert_cpp_and_fake_agree
from tree_helpers import assert_well_formed, cu_of, path_parents, star_parents, tree_batch

R, V, M, D = 3, 20, 9, 2


def good_args():
    """Keyword arguments of torch.ops.dspark_ops.verify_tree, by schema name."""
    t = lambda v, d, n=R: torch.full((n,), v, dtype=d)  # noqa: E731
    return dict(target_logits=torch.randn(M, V), node_tokens=torch.zeros(M, dtype=torch.int32),
                parents=torch.tensor([-1, 0, 0, -1, 0, 1, -1, 0, 1], dtype=torch.int32),
                cu_num_nodes=torch.tensor([0, 3, 6, 9], dtype=torch.int32), max_depth=D,
                draft_probs=torch.full((M, V), 1.0 / V), draft_logits=None, draft_temperature=t(1.0, torch.float32),
                sibling_mode=t(1, torch.int8), temperature=t(1.0, torch.float32), top_k=None, top_p=None,
                seed=t(0, torch.int64), position=t(0, torch.int64))


def call(args, out=None):
    if out is None:
        return torch.ops.dspark_ops.verify_tree(**args)
    return torch.ops.dspark_ops.verify_tree.out(**args, **out)


def test_good_args_run():
    res = call(good_args())
    assert [tuple(t.shape) for t in res] == [(R, D + 1), (R,), (R,), (R, D + 1), (R,)]


BAD = {
    "target dtype": (dict(target_logits=torch.zeros(M, V, dtype=torch.int64)),
                     "target_logits must have dtype float32, float16 or bfloat16, got torch.int64"),
    "target rank": (dict(target_logits=torch.zeros(M, V, 1)), "target_logits must have shape [rows, V], got [9, 20, 1]"),
    "target strides": (dict(target_logits=torch.zeros(V, M).t()),
                       "target_logits must be contiguous in its last dimension, got strides [1, 9]"),
    "node_tokens dtype": (dict(node_tokens=torch.zeros(M, dtype=torch.int64)), "node_tokens must have dtype torch.int32, got torch.int64"),
    "node_tokens rank": (dict(node_tokens=torch.zeros(3, 3, dtype=torch.int32)),
                         "node_tokens must have shape [N], got [3, 3]"),
    "parents dtype": (dict(parents=torch.zeros(M, dtype=torch.int64)), "parents must have dtype torch.int32, got torch.int64"),
    "parents length": (dict(parents=torch.zeros(M - 1, dtype=torch.int32)), "parents must have shape [9] like node_tokens, got [8]"),
    "cu dtype": (dict(cu_num_nodes=torch.tensor([0, 3, 6, 9])), "cu_num_nodes must have dtype torch.int32, got torch.int64"),
    "cu empty": (dict(cu_num_nodes=torch.zeros(0, dtype=torch.int32)), "cu_num_nodes must have shape [R + 1], got [0]"),
    "max_depth": (dict(max_depth=-1), "max_depth must be in [0, 65534], got -1"),
    "max_depth too big": (dict(max_depth=65535), "max_depth must be in [0, 65534], got 65535"),
    "both drafts": (dict(draft_logits=torch.randn(M, V)), "pass draft_probs or draft_logits, not both"),
    "draft V": (dict(draft_probs=torch.zeros(M, V + 1)),
                "draft_probs must have V = 20 columns like target_logits, got [9, 21]"),
    "draft dtype": (dict(draft_probs=torch.zeros(M, V, dtype=torch.float16)),
                    "draft_probs must have the dtype of target_logits (torch.float32) or torch.float32, got torch.float16"),
    "draft_logits dtype": (dict(draft_probs=None, draft_logits=torch.zeros(M, V, dtype=torch.bfloat16)),
                           "draft_logits must have the dtype of target_logits (torch.float32) or torch.float32, got torch.bfloat16"),
    "sibling_mode dtype": (dict(sibling_mode=torch.ones(R, dtype=torch.int32)), "sibling_mode must have dtype torch.int8, got torch.int32"),
    "sibling_mode shape": (dict(sibling_mode=torch.ones(2, dtype=torch.int8)),
                           "sibling_mode must have shape [3] or [1], got [2]"),
    "temperature shape": (dict(temperature=torch.ones(2)), "temperature must have shape [3] or [1], got [2]"),
    "draft_temperature dtype": (dict(draft_temperature=torch.ones(R, dtype=torch.float64)),
                                "draft_temperature must have dtype torch.float32, got torch.float64"),
    "top_k dtype": (dict(top_k=torch.ones(R, dtype=torch.int64)), "top_k must have dtype torch.int32, got torch.int64"),
    "top_p shape": (dict(top_p=torch.ones(R, 1)), "top_p must have shape [3] or [1], got [3, 1]"),
    "seed shape": (dict(seed=torch.zeros(4, dtype=torch.int64)), "seed must have shape [3] or [1], got [4]"),
    "position dtype": (dict(position=torch.zeros(R, dtype=torch.int32)), "position must have dtype torch.int64, got torch.int32"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cpp_and_fake_raise_the_same_message(case):
    change, message = BAD[case]
    assert_cpp_and_fake_agree(call, {**good_args(), **change}, f"dspark_ops.verify_tree: {message}")


def _out(**change):
    out = dict(tokens=torch.empty(R, D + 1, dtype=torch.int32), accepted=torch.empty(R, dtype=torch.int32),
               emitted=torch.empty(R, dtype=torch.int32), path=torch.empty(R, D + 1, dtype=torch.int32),
               status=torch.empty(R, dtype=torch.int32))
    out.update(change)
    return out


@pytest.mark.parametrize("name,value,message", [
    ("tokens", torch.empty(R, D, dtype=torch.int32), "tokens must have shape [3, 3], got [3, 2]"),
    ("path", torch.empty(R, D + 1, dtype=torch.int64), "path must have dtype torch.int32, got torch.int64"),
    ("path", torch.empty(R + 1, D + 1, dtype=torch.int32), "path must have shape [3, 3], got [4, 3]"),
    ("path", torch.empty(D + 1, R, dtype=torch.int32).t(), "path must be contiguous"),
    ("accepted", torch.empty(R, dtype=torch.int64), "accepted must have dtype torch.int32, got torch.int64"),
    ("emitted", torch.empty(R + 1, dtype=torch.int32), "emitted must have shape [3], got [4]"),
    ("status", torch.empty(R + 1, dtype=torch.int32), "status must have shape [3], got [4]"),
])
def test_out_tensors_are_checked(name, value, message):
    from torch._subclasses.fake_tensor import FakeTensorMode
    out = _out(**{name: value})
    with pytest.raises(ValueError) as err:
        call(good_args(), out)
    assert str(err.value).splitlines()[0] == f"dspark_ops.verify_tree: {message}"
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = lambda d: {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in d.items()}  # noqa: E731
        with pytest.raises(ValueError) as ferr:
            call(fake(good_args()), fake(out))
    assert str(ferr.value) == f"dspark_ops.verify_tree: {message}"


def _wrapper_args():
    a = good_args()
    return (a["target_logits"], a["node_tokens"], a["parents"], a["cu_num_nodes"]), dict(max_depth=D)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature must be finite and >= 0 (0 = greedy), got -1.0"),
    (dict(draft_temperature=float("inf")), "draft_temperature must be finite and >= 0"),
    (dict(top_k=-2), "top_k must be >= 0 (0 = off), got -2"),
    (dict(top_p=0.0), "top_p must be > 0"),
    (dict(seed=-(1 << 64)), "seed must fit in 64 bits"),
    (dict(position=-1), "position must be in [0, 2^63), got -1"),
    (dict(temperature=torch.ones(R, 1)), "temperature must be a scalar or have shape [3] or [1], got [3, 1]"),
])
def test_wrapper_rejects_bad_scalars(kwargs, message):
    args, kw = _wrapper_args()
    with pytest.raises(ValueError) as err:
        dspark_ops.verify_tree(*args, **kw, **kwargs)
    assert str(err.value).startswith(f"dspark_ops.verify_tree: {message}")


@pytest.mark.parametrize("value", ["iid ", "greedy", "IID", "without-replacement", 3, -1, 2.0])
def test_wrapper_rejects_unknown_sibling_modes(value):
    args, kw = _wrapper_args()
    with pytest.raises(ValueError) as err:
        dspark_ops.verify_tree(*args, **kw, sibling_mode=value)
    msg = str(err.value)
    assert msg.startswith("dspark_ops.verify_tree: sibling_mode must be"), msg
    assert (repr(value) in msg) or (type(value).__name__ in msg), msg


def test_wrapper_accepts_every_sibling_mode_name():
    args, kw = _wrapper_args()
    for name in ("iid", "without_replacement", "deterministic", None):
        dspark_ops.verify_tree(*args, **kw, sibling_mode=name, draft_probs=good_args()["draft_probs"])


# --------------------------------------------------------- device values


def _alone(target, tokens, parents, cu, r, **kw):
    """Request r by itself (fresh slices), to show a batch's bad request
    leaves the others as they were."""
    c0, c1 = int(cu[r]), int(cu[r + 1])
    one = {k: (v[c0:c1] if k in ("draft_probs", "draft_logits") else
               v[r:r + 1] if isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == cu.shape[0] - 1 else v)
           for k, v in kw.items()}
    return dspark_ops.verify_tree(target[c0:c1], tokens[c0:c1], parents[c0:c1],
                                  torch.tensor([0, c1 - c0], dtype=torch.int32), **one)


def _assert_aborted(res, r, bit):
    assert res.status[r] == bit, (r, res.status.tolist())
    W = res.tokens.shape[1]
    assert res.tokens[r].tolist() == [-1] * W and res.path[r].tolist() == [-1] * W
    assert res.accepted[r] == 0 and res.emitted[r] == 0


MALFORMED = {
    "parent equals child": [-1, 0, 2],
    "parent after child": [-1, 2, 0],
    "parent negative": [-1, 0, -5],
    "parent out of range": [-1, 0, 70000],
    "root parent 0": [0, 0, 1],
    "root parent -2": [-2, 0, 0],
    "second root": [-1, -1, 0],
    "bad leaf never visited": [-1, 0, 0, 0, 3, 3, 9],
}


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_tree_aborts_only_its_request(case, impl):
    verify = dspark_ops.verify_tree if impl == "op" else (lambda *a, **k: dspark_ops.TreeResult(*ref.verify_tree(*a, **k)))
    trees = [path_parents(3), MALFORMED[case], star_parents(4)]
    target, tokens, parents, cu, kw = tree_batch(trees, 12, draft="probs", seed=1, greedy_bias=1.0)
    kw.update(max_depth=4, seed=torch.tensor([1, 2, 3]), position=5)
    for params in (dict(temperature=0.0), dict(temperature=1.0, sibling_mode="iid")):
        res = verify(target, tokens, parents, cu, **kw, **params)
        _assert_aborted(res, 1, Status.BAD_TREE)
        for r in (0, 2):
            alone = _alone(target, tokens, parents, cu, r, **kw, **params)
            assert all(torch.equal(a[r], b[0]) for a, b in zip(res, alone)), (case, r)
        assert_well_formed(res, tokens, parents, cu, 12)


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_depth_beyond_max_depth_is_a_bad_tree(impl):
    verify = dspark_ops.verify_tree if impl == "op" else (lambda *a, **k: dspark_ops.TreeResult(*ref.verify_tree(*a, **k)))
    trees = [path_parents(4), path_parents(5), star_parents(6), [-1, 0, 0, 1, 3, 1]]  # depths 3, 4, 1, 3
    target, tokens, parents, cu, kw = tree_batch(trees, 12, draft="logits", seed=2, greedy_bias=1.0)
    res = verify(target, tokens, parents, cu, max_depth=3, temperature=0.0, **kw)
    assert res.status.tolist() == [0, Status.BAD_TREE, 0, 0]
    _assert_aborted(res, 1, Status.BAD_TREE)
    assert res.accepted[0] == 3 and res.tokens.shape == (4, 4)  # a depth exactly max_depth is fine
    res2 = verify(target, tokens, parents, cu, max_depth=0, temperature=0.0, **kw)
    assert res2.status.tolist() == [Status.BAD_TREE] * 4


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_bad_lengths_abort_only_their_request(impl):
    verify = dspark_ops.verify_tree if impl == "op" else (lambda *a, **k: dspark_ops.TreeResult(*ref.verify_tree(*a, **k)))
    Vs = 8
    trees = [path_parents(3), star_parents(3), path_parents(3)]
    target, tokens, parents, cu, kw = tree_batch(trees, Vs, draft="probs", seed=3, greedy_bias=1.0)
    base = verify(target, tokens, parents, cu, max_depth=2, temperature=0.0)
    assert base.status.tolist() == [0, 0, 0]
    # a request with 0 nodes
    res = verify(target, tokens, parents, torch.tensor([0, 3, 3, 6, 9], dtype=torch.int32), max_depth=2,
                 temperature=0.0)
    _assert_aborted(res, 1, Status.BAD_LENGTHS)
    for r_new, r_old in ((0, 0), (2, 1), (3, 2)):
        assert all(torch.equal(a[r_new], b[r_old]) for a, b in zip(res, base))
    # non-monotone offsets: request 1 claims -1 nodes
    res = verify(target, tokens, parents, torch.tensor([0, 3, 2, 9], dtype=torch.int32), max_depth=8,
                 temperature=0.0)
    _assert_aborted(res, 1, Status.BAD_LENGTHS)
    assert res.tokens[0, :3].tolist() == base.tokens[0].tolist() and res.status[0] == 0
    # nodes beyond M
    res = verify(target, tokens, parents, torch.tensor([0, 3, 6, 12], dtype=torch.int32), max_depth=2,
                 temperature=0.0)
    _assert_aborted(res, 2, Status.BAD_LENGTHS)
    assert all(torch.equal(a[:2], b[:2]) for a, b in zip(res, base))
    # a negative first offset
    res = verify(target, tokens, parents, torch.tensor([-3, 3, 6, 9], dtype=torch.int32), max_depth=2,
                 temperature=0.0)
    _assert_aborted(res, 0, Status.BAD_LENGTHS)
    assert all(torch.equal(a[1:], b[1:]) for a, b in zip(res, base))


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_node_count_limit_is_65535(impl):
    verify = dspark_ops.verify_tree if impl == "op" else (lambda *a, **k: dspark_ops.TreeResult(*ref.verify_tree(*a, **k)))
    # V = 1 keeps it cheap: request 0 is a star of 65535 nodes (legal, the
    # first child is the argmax), request 1 claims 65536 nodes, request 2 is
    # a lone root after them.
    n_ok, n_bad = 65535, 65536
    Mx = n_ok + n_bad + 1
    target = torch.zeros(Mx, 1)
    tokens = torch.zeros(Mx, dtype=torch.int32)
    parents = torch.cat([torch.tensor(star_parents(n_ok), dtype=torch.int32),
                         torch.tensor(star_parents(n_bad), dtype=torch.int32), torch.tensor([-1], dtype=torch.int32)])
    cu = torch.tensor([0, n_ok, n_ok + n_bad, Mx], dtype=torch.int32)
    res = verify(target, tokens, parents, cu, max_depth=1, temperature=0.0)
    assert res.status.tolist() == [0, Status.BAD_LENGTHS, 0]
    assert res.tokens.tolist() == [[0, 0], [-1, -1], [0, -1]] and res.path.tolist() == [[0, 1], [-1, -1], [0, -1]]


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_invalid_sibling_mode_code_is_a_bad_tree(impl):
    verify = dspark_ops.verify_tree if impl == "op" else (lambda *a, **k: dspark_ops.TreeResult(*ref.verify_tree(*a, **k)))
    trees = [star_parents(4)] * 5
    target, tokens, parents, cu, kw = tree_batch(trees, 10, draft="logits", seed=4)
    codes = torch.tensor([0, 3, 1, -1, 2], dtype=torch.int8)
    res = verify(target, tokens, parents, cu, max_depth=1, sibling_mode=codes, seed=torch.arange(5), **kw)
    assert res.status.tolist() == [0, Status.BAD_TREE, 0, Status.BAD_TREE, 0]
    for r in (1, 3):
        _assert_aborted(res, r, Status.BAD_TREE)
    for r in (0, 2, 4):
        alone = _alone(target, tokens, parents, cu, r, max_depth=1, sibling_mode=codes, seed=torch.arange(5), **kw)
        assert all(torch.equal(a[r], b[0]) for a, b in zip(res, alone)), r
    # a broadcast [1] code applies to every request
    res1 = verify(target, tokens, parents, cu, max_depth=1, sibling_mode=torch.tensor([7], dtype=torch.int8), **kw)
    assert res1.status.tolist() == [Status.BAD_TREE] * 5


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_nonfinite_rows_abort_only_when_needed(impl):
    verify = dspark_ops.verify_tree if impl == "op" else (lambda *a, **k: dspark_ops.TreeResult(*ref.verify_tree(*a, **k)))
    Vs = 12
    # every request: root 0 -> children 1 (argmax: followed) and 2 (not); 1 -> leaf 3
    tree = [-1, 0, 0, 1]
    R6 = 7
    target, tokens, parents, cu, kw = tree_batch([tree] * R6, Vs, draft="logits", seed=5)
    target, logits = target.clone(), kw["draft_logits"].clone()
    for r in range(R6):
        c0 = 4 * r
        tokens[c0 + 1] = int(target[c0].argmax())
        tokens[c0 + 2] = (int(target[c0].argmax()) + 1) % Vs
        tokens[c0 + 3] = int(target[c0 + 1].argmax())
    target[0 * 4 + 0, 3] = float("nan")  # request 0: root row, needed
    target[1 * 4 + 1, 0] = float("inf")  # request 1: the followed child's row, needed
    target[2 * 4 + 2, 5] = float("nan")  # request 2: the rejected child's row, never read
    target[3 * 4 + 3] = float("-inf")  # request 3: the leaf's row fully masked (needed)
    target[4 * 4 + 0, 7] = float("-inf")  # request 4: -inf is a mask, not an error
    logits[5 * 4 + 3, 1] = float("nan")  # request 5: a leaf's draft row, never read
    logits[6 * 4 + 0, 2] = float("nan")  # request 6: the root's draft row (children tried stochastically)
    greedy = verify(target, tokens, parents, cu, max_depth=2, temperature=0.0, draft_logits=logits)
    assert greedy.status.tolist() == [Status.NONFINITE_LOGITS, Status.NONFINITE_LOGITS, 0, Status.ALL_MASKED, 0, 0, 0]
    for r in (0, 1, 3):
        _assert_aborted(greedy, r, greedy.status[r])
    assert greedy.path[2].tolist() == [0, 1, 3] and greedy.accepted[2] == 2
    st = verify(target, tokens, parents, cu, max_depth=2, sibling_mode="iid", draft_logits=logits, seed=torch.arange(R6))
    assert st.status[0] == Status.NONFINITE_LOGITS and st.status[6] == Status.NONFINITE_LOGITS
    assert st.status[5] == 0 and st.status[4] == 0
    # deterministic mode ignores draft rows: request 6's NaN is not read
    det = verify(target, tokens, parents, cu, max_depth=2, sibling_mode="deterministic", draft_logits=logits,
                 seed=torch.arange(R6))
    assert det.status[6] == 0 and det.status[5] == 0


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_skipped_children_no_coin_no_update_subtree_not_visited(impl):
    verify = dspark_ops.verify_tree if impl == "op" else (lambda *a, **k: dspark_ops.TreeResult(*ref.verify_tree(*a, **k)))
    # root 0 -> children 1 (skipped), 2, 3; node 1 -> child 4 whose target
    # row is NaN (read only if node 1 were accepted). Skipping by token -1,
    # by token V or by q(x) = 0 must give the same walk, flags aside: no
    # coin (COIN slots are node indices, so 2's and 3's coins are the same),
    # no update of p or q.
    Vs, n_req = 9, 40
    tree = [-1, 0, 0, 0, 1]
    target, tokens, parents, cu, kw = tree_batch([tree] * n_req, Vs, draft="probs", siblings="without_replacement",
                                                 seed=6)
    target = target.clone()
    target[4::5] = float("nan")
    q = kw["draft_probs"].clone()
    z = []  # per request a token not on nodes 2 and 3, with q(z) = 0 at the root (every variant sees this q)
    for r in range(n_req):
        c0 = 5 * r
        zr = next(t for t in range(Vs) if t not in (int(tokens[c0 + 2]), int(tokens[c0 + 3])))
        q[c0, zr] = 0.0
        z.append(zr)
    results = {}
    for how, bad in (("minus_one", [-1] * n_req), ("V", [Vs] * n_req), ("q_zero", z)):
        toks = tokens.clone()
        toks[1::5] = torch.tensor(bad, dtype=torch.int32)
        for mode in ("iid", "without_replacement", "deterministic"):
            results[how, mode] = verify(target, toks, parents, cu, max_depth=2, draft_probs=q, sibling_mode=mode,
                                        seed=torch.arange(n_req), position=3)
    for mode in ("iid", "without_replacement", "deterministic"):
        a, b, c = results["minus_one", mode], results["V", mode], results["q_zero", mode]
        assert all(torch.equal(s, t) for s, t in zip(a, b)), mode
        assert a.status.tolist() == [int(Status.TOKEN_OUT_OF_RANGE)] * n_req
        assert not bool((a.path == 1).any()), "a skipped child was accepted"
        assert bool((a.accepted > 0).any()) and bool((a.accepted == 0).any())
        if mode != "deterministic":  # deterministic ignores q: there the q = 0 child is tried like any other
            assert all(torch.equal(s, t) for s, t in zip(a[:4], c[:4])), mode
            assert c.status.tolist() == [int(Status.DRAFT_PROB_ZERO)] * n_req


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_duplicate_siblings(impl):
    verify = dspark_ops.verify_tree if impl == "op" else (lambda *a, **k: dspark_ops.TreeResult(*ref.verify_tree(*a, **k)))
    # root with three children carrying the same token x, each rejected if
    # reached: iid keeps trying (p(x) is 0 after the first rejection, no
    # flag); without_replacement has q(x) = 0 after the first: flagged.
    Vs, n_req = 6, 200
    tree = star_parents(4)
    target, tokens, parents, cu, kw = tree_batch([tree] * n_req, Vs, draft="probs", seed=7)
    probs = kw["draft_probs"]
    x = torch.argmin(target.float()[0::4] - torch.log(probs[0::4]), -1)  # p(x)/q(x) smallest: mostly rejected
    for r in range(n_req):
        tokens[4 * r + 1:4 * r + 4] = int(x[r])
    iid = verify(target, tokens, parents, cu, max_depth=1, draft_probs=probs, sibling_mode="iid",
                 seed=torch.arange(n_req))
    wor = verify(target, tokens, parents, cu, max_depth=1, draft_probs=probs, sibling_mode="without_replacement",
                 seed=torch.arange(n_req))
    assert iid.status.tolist() == [0] * n_req
    rejected_first = wor.path[:, 1] != 1  # the first child rejected: the second is tried with q(x) = 0
    assert bool(rejected_first.any())
    assert (wor.status[rejected_first] == Status.DRAFT_PROB_ZERO).all()
    assert (wor.status[~rejected_first] == 0).all()
    assert not bool((wor.path[:, 1] > 1).any())  # never a duplicate after the first
    assert not bool((iid.path[:, 1] > 1).any())  # p(x) = 0 after the first rejection


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_greedy_flags_out_of_range_siblings_before_the_match(impl):
    verify = dspark_ops.verify_tree if impl == "op" else (lambda *a, **k: dspark_ops.TreeResult(*ref.verify_tree(*a, **k)))
    Vs = 10
    target = torch.randn(5, Vs, generator=torch.Generator().manual_seed(9))
    am = target.argmax(-1).tolist()
    parents = torch.tensor([-1, 0, 0, 2, 1], dtype=torch.int32)
    tokens = torch.tensor([0, -1, am[0], am[2], am[1]], dtype=torch.int32)
    res = verify(target, tokens, parents, torch.tensor([0, 5], dtype=torch.int32), max_depth=2, temperature=0.0)
    assert res.status.tolist() == [Status.TOKEN_OUT_OF_RANGE]
    assert res.path.tolist() == [[0, 2, 3]] and res.tokens.tolist() == [[am[0], am[2], am[3]]]


def test_validate_raises_with_a_message():
    trees = [path_parents(3), star_parents(4), [-1, 0, 1]]
    target, tokens, parents, cu, kw = tree_batch(trees, 9, draft="probs", seed=8)
    dspark_ops.verify_tree(target, tokens, parents, cu, validate=True, **kw)  # good input passes

    def raises(pattern, *args, **extra):
        a = [target, tokens, parents, cu]
        for i, v in args:
            a[i] = v
        with pytest.raises(ValueError, match=pattern):
            dspark_ops.verify_tree(*a, validate=True, **{**kw, **extra})

    bad = parents.clone()
    bad[5] = 7  # request 1, local node 2: parent 7 >= 2
    raises(r"dspark_ops\.verify_tree: parents\[5\] = 7 is invalid", (2, bad), max_depth=2)
    bad = parents.clone()
    bad[3] = 0  # request 1's root
    raises(r"parents\[3\] = 0 is invalid", (2, bad), max_depth=2)
    raises(r"cu_num_nodes\[2\] = 3 is invalid: every request needs 1 to 65535 nodes",
           (3, torch.tensor([0, 3, 3, 10], dtype=torch.int32)), max_depth=2)
    raises(r"cu_num_nodes\[3\] = 12 is invalid: past the 10 rows of target_logits",
           (3, torch.tensor([0, 3, 7, 12], dtype=torch.int32)), max_depth=2)
    raises(r"draft_probs has 9 rows, but the nodes need rows up to 10", draft_probs=kw["draft_probs"][:9])
    toks = tokens.clone()
    toks[8] = -1
    raises(r"node_tokens\[8\] = -1 is invalid: tokens must be in \[0, V = 9\)", (1, toks))
    nan = target.clone()
    nan[4, 0] = float("nan")
    raises(r"target_logits row\[4\] = 4 is invalid: it holds NaN or \+inf", (0, nan))
    raises(r"sibling_mode\[2\] = 5 is invalid", sibling_mode=torch.tensor([0, 1, 5], dtype=torch.int8))
    raises(r"max_depth", max_depth=1)
    raises(r"temperature\[1\]", temperature=torch.tensor([1.0, -1.0, 1.0]))


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fully_masked_row_is_all_masked(impl, temperature):
    verify = dspark_ops.verify_tree if impl == "op" else (lambda *a, **k: dspark_ops.TreeResult(*ref.verify_tree(*a, **k)))
    target = torch.randn(4, 6)
    target[2] = float("-inf")  # request 1's root row: needed
    res = verify(target, torch.zeros(4, dtype=torch.int32), torch.tensor([-1, 0, -1, 0], dtype=torch.int32),
                 torch.tensor([0, 2, 4], dtype=torch.int32), max_depth=1, temperature=temperature)
    assert res.status[1] == Status.ALL_MASKED and res.status[0] == 0
    _assert_aborted(res, 1, Status.ALL_MASKED)
