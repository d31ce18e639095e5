"""dspark_ops.compat.sglang: SGLang's own fixtures for verify_tree_greedy and
tree_speculative_sampling_target_only (exact outputs), a transcription of
SGLang's linked-list walk as the reference on random trees with arbitrary
numbering, unreachable nodes and depth cut-offs, malformed lists, the
first emitted token by chi-square (negative control: SGLang's running-sum
rule on duplicate siblings), and CUDA against CPU."""
import pytest
import torch

from dspark_ops import Status
from dspark_ops.compat import sglang
from helpers import chi_square_pvalue

P_PASS, P_REJECT = 1e-3, 1e-6


def outputs(bs, N, S, device="cpu"):
    return (torch.full((bs * N,), -1, dtype=torch.int32, device=device),
            torch.full((bs, S), -1, dtype=torch.int32, device=device),
            torch.zeros(bs, dtype=torch.int32, device=device))


# ------------------------------------------------------------------ SGLang's fixture


def sglang_fixture():
    """sgl-kernel tests/speculative/test_eagle_utils.py and
    test_speculative_sampling.py: two requests of 6 nodes; request 1 lists
    the root's children as 4 then 1 (not index order)."""
    candidates = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])
    index = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    next_token = torch.tensor([[1, 2, -1, 4, 5, -1], [4, 2, 3, -1, 5, -1]])
    next_sibling = torch.tensor([[-1, 3, -1, -1, -1, -1], [-1, -1, -1, -1, 1, -1]])
    logits = torch.full((2, 6, 20), 1.0)
    logits[0, 0, 3] = logits[0, 3, 4] = logits[0, 4, 5] = 10
    logits[1, 0, 11] = logits[1, 4, 12] = 10
    for i in range(2):
        for j in range(6):
            if logits[i, j].max() < 10:
                logits[i, j, 18] = 10
    return candidates, index, next_token, next_sibling, logits


EXPECTED_PREDICTS = [3, -1, -1, 4, 5, 18, 11, -1, -1, -1, 12, 18]
EXPECTED_ACCEPT_INDEX = [[0, 3, 4, 5], [6, 10, 11, -1]]
EXPECTED_ACCEPT_TOKEN_NUM = [3, 2]


@pytest.mark.parametrize("spelling", ["retrive", "retrieve"])
def test_verify_tree_greedy_sglang_fixture(spelling):
    candidates, index, next_token, next_sibling, logits = sglang_fixture()
    predicts, accept_index, accept_token_num = outputs(2, 6, 4)
    status = sglang.verify_tree_greedy(
        predicts=predicts, accept_index=accept_index, accept_token_num=accept_token_num, candidates=candidates,
        target_predict=torch.argmax(logits, dim=-1), return_status=True,
        **{f"{spelling}_index": index, f"{spelling}_next_token": next_token, f"{spelling}_next_sibling": next_sibling})
    assert predicts.tolist() == EXPECTED_PREDICTS
    assert accept_index.tolist() == EXPECTED_ACCEPT_INDEX
    assert accept_token_num.tolist() == EXPECTED_ACCEPT_TOKEN_NUM
    assert status.tolist() == [0, 0]


def test_target_only_sglang_fixture_is_deterministic_at_threshold_one():
    """SGLang's sampling fixture (softmax at temperature 0.01: one-hot in
    float32), thresholds 1: the same outputs for any coins."""
    candidates, index, next_token, next_sibling, logits = sglang_fixture()
    target_probs = torch.softmax(logits / 0.01, dim=-1)
    g = torch.Generator().manual_seed(0)
    for call in range(3):
        predicts, accept_index, accept_token_num = outputs(2, 6, 4)
        sglang.tree_speculative_sampling_target_only(
            predicts=predicts, accept_index=accept_index, accept_token_num=accept_token_num, candidates=candidates,
            retrive_index=index, retrive_next_token=next_token, retrive_next_sibling=next_sibling,
            uniform_samples=torch.rand(2, 6, generator=g),
            uniform_samples_for_final_sampling=torch.rand(2, generator=g),
            target_probs=target_probs, draft_probs=torch.zeros_like(target_probs), threshold_single=1.0,
            threshold_acc=1.0, deterministic=True)
        assert predicts.tolist() == EXPECTED_PREDICTS
        assert accept_index.tolist() == EXPECTED_ACCEPT_INDEX
        assert accept_token_num.tolist() == EXPECTED_ACCEPT_TOKEN_NUM


def test_relaxed_thresholds_are_refused():
    """SGLang's second case (thresholds 0, 0) accepts drafts the target
    rejects: not lossless, refused."""
    candidates, index, next_token, next_sibling, logits = sglang_fixture()
    probs = torch.softmax(logits / 0.01, dim=-1)
    for single, acc in ((0.0, 0.0), (1.0, 0.5), (0.9, 1.0)):
        with pytest.raises(ValueError, match="threshold_single and threshold_acc must be 1.0"):
            sglang.tree_speculative_sampling_target_only(*outputs(2, 6, 4), candidates, index, next_token,
                                                         next_sibling, torch.rand(2, 6), torch.rand(2), probs, None,
                                                         single, acc)


def test_docstring_example():
    import doctest
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(sglang.verify_tree_greedy, "verify_tree_greedy", globs={}):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0


# ------------------------------------------------------------------ random trees vs SGLang's walk


def reference_walk(candidates, index, next_token, next_sibling, predict_of, S):
    """SGLang's kernels' walk, transcribed: follow the first child (in list
    order) whose token is predict_of(b, local parent, flat parent); stop after
    S - 1 accepted. Returns (predicts dict flat -> token, accept_index rows,
    accept_token_num)."""
    bs, N = candidates.shape
    writes, rows, nums = {}, [], []
    for b in range(bs):
        last_local, last = 0, int(index[b, 0])
        acc, cur = [last], 0
        for _ in range(1, S):
            cur = int(next_token[b, cur])
            while cur != -1:
                want = predict_of(b, last_local, last)
                if int(candidates[b, cur]) == want:
                    writes[last] = want
                    last_local, last = cur, int(index[b, cur])
                    acc.append(last)
                    break
                cur = int(next_sibling[b, cur])
            if cur == -1:
                break
        writes[last] = predict_of(b, last_local, last)
        nums.append(len(acc) - 1)
        rows.append(acc + [-1] * (S - len(acc)))
    return writes, rows, nums


def random_lists(bs, N, g, extra=0):
    """bs random trees of N - extra nodes, labelled by a random permutation
    (root kept at 0), children listed in random order; `extra` unreachable
    nodes (no links to them; some link among themselves in a cycle)."""
    nt = torch.full((bs, N), -1, dtype=torch.int64)
    ns = torch.full((bs, N), -1, dtype=torch.int64)
    n = N - extra
    for b in range(bs):
        label = torch.cat([torch.zeros(1, dtype=torch.int64), 1 + torch.randperm(N - 1, generator=g)])
        children = {i: [] for i in range(n)}
        for i in range(1, n):
            bias = float(torch.rand((), generator=g))
            p = i - 1 if bias < 0.4 else int(torch.randint(0, i, (), generator=g))
            children[p].append(i)
        for p, kids in children.items():
            kids = [kids[j] for j in torch.randperm(len(kids), generator=g).tolist()]
            if kids:
                nt[b, label[p]] = label[kids[0]]
            for a, c in zip(kids, kids[1:]):
                ns[b, label[a]] = label[c]
        if extra >= 2:  # a sibling cycle and a first-child link among the unreachable nodes
            u = label[n:].tolist()
            ns[b, u[0]], ns[b, u[1]] = u[1], u[0]
            if extra >= 3:
                nt[b, u[1]] = u[2]
    return nt, ns


@pytest.mark.parametrize("S", [1, 2, 4, 9])
def test_random_trees_match_sglangs_walk(S):
    """Greedy and one-hot sampling on random trees (arbitrary numbering,
    random sibling order, duplicate sibling tokens, unreachable nodes, depth
    cut at S - 1) against the transcribed walk; retrive_index a random
    permutation of the flat indices."""
    g = torch.Generator().manual_seed(100 + S)
    bs, N, V = 24, 13, 3
    nt, ns = random_lists(bs, N, g, extra=3)
    candidates = torch.randint(V, (bs, N), generator=g)
    index = torch.randperm(bs * N, generator=g).view(bs, N)
    want_tok = torch.randint(V, (bs, N), generator=g)  # one-hot target after each node

    # greedy: target_predict is read at the flat index
    target_predict = torch.empty(bs * N, dtype=torch.int64)
    target_predict[index.reshape(-1)] = want_tok.reshape(-1)
    target_predict = target_predict.view(bs, N)
    writes, rows, nums = reference_walk(candidates, index, nt, ns,
                                        lambda b, local, flat: int(target_predict.reshape(-1)[flat]), S)
    predicts, accept_index, accept_token_num = outputs(bs, N, S)
    status = sglang.verify_tree_greedy(predicts, accept_index, accept_token_num, candidates, index, nt, ns,
                                       target_predict, return_status=True)
    expect = torch.full((bs * N,), -1, dtype=torch.int32)
    for k, v in writes.items():
        expect[k] = v
    assert torch.equal(predicts, expect)
    assert accept_index.tolist() == rows and accept_token_num.tolist() == nums
    assert bool(((status & ~int(Status.TOKEN_OUT_OF_RANGE)) == 0).all())

    # sampling with one-hot rows (by local node): the same walk, any seed
    probs = torch.zeros(bs, N, V).scatter_(2, want_tok.unsqueeze(-1), 1.0)
    writes, rows, nums = reference_walk(candidates, index, nt, ns, lambda b, local, flat: int(want_tok[b, local]), S)
    expect = torch.full((bs * N,), -1, dtype=torch.int32)
    for k, v in writes.items():
        expect[k] = v
    for call in range(2):
        predicts, accept_index, accept_token_num = outputs(bs, N, S)
        sglang.tree_speculative_sampling_target_only(predicts, accept_index, accept_token_num, candidates, index, nt,
                                                     ns, torch.rand(bs, N, generator=g), torch.rand(bs, generator=g),
                                                     probs)
        assert torch.equal(predicts, expect)
        assert accept_index.tolist() == rows and accept_token_num.tolist() == nums


def test_build_tree_numbering_is_kept_in_order():
    """SGLang's build_tree lists siblings in index order, level by level: the
    conversion keeps that numbering (identity order) and finds each parent."""
    nt, ns = sglang.eagle_lists(3, depth=3, topk=2)
    tree = sglang.tree_from_linked_lists(nt, ns, 3)
    N = nt.shape[1]
    assert torch.equal(tree.order, torch.arange(N).expand(3, N))
    assert tree.parents.view(3, N)[0].tolist() == [-1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert not bool(tree.malformed.any()) and bool(tree.kept.all())


# ------------------------------------------------------------------ malformed lists


def test_malformed_lists_abort_only_their_request():
    """The aborted request still gets its root in accept_index and a defined
    token after it (the root row's argmax): SGLang's kernels always write the
    root, and its callers read predicts there without a status."""
    candidates, index, next_token, next_sibling, logits = sglang_fixture()
    root_token = int(logits[0, 0].argmax())
    cases = []
    nt = next_token.clone(); nt[0, 2] = 4  # node 4 linked twice  # noqa: E702
    cases.append((nt, next_sibling, index))
    ns = next_sibling.clone(); ns[0, 5] = 0  # a link to the root  # noqa: E702
    cases.append((next_token, ns, index))
    nt = next_token.clone(); nt[0, 5] = 6  # a link outside [-1, N)  # noqa: E702
    cases.append((nt, next_sibling, index))
    ri = index.clone(); ri[0, 4] = 12  # a reachable node's flat index outside predicts  # noqa: E702
    cases.append((next_token, next_sibling, ri))
    nt = next_token.clone(); nt[0, 2] = 0  # a first-child chain back to the root (root -> 1 -> 2 -> root)  # noqa: E702
    cases.append((nt, next_sibling, index))
    for nt, ns, ri in cases:
        for greedy in (True, False):
            predicts, accept_index, accept_token_num = outputs(2, 6, 4)
            if greedy:
                status = sglang.verify_tree_greedy(predicts, accept_index, accept_token_num, candidates, ri, nt, ns,
                                                   logits.argmax(-1), return_status=True)
            else:
                status = sglang.tree_speculative_sampling_target_only(
                    predicts, accept_index, accept_token_num, candidates, ri, nt, ns, torch.rand(2, 6),
                    torch.rand(2), torch.softmax(logits / 0.01, -1), return_status=True)
            assert status.tolist() == [int(Status.BAD_TREE), 0]
            assert accept_index.tolist() == [[int(index[0, 0])] + [-1] * 3, EXPECTED_ACCEPT_INDEX[1]]
            assert accept_token_num.tolist() == [0, 2]
            assert predicts.tolist() == [root_token] + [-1] * 5 + EXPECTED_PREDICTS[6:]


def test_an_aborted_cycle_through_the_root_still_writes_the_root():
    """A first-child chain back to the root drops the root from the walk
    order; the aborted request's root slot is still the root's own index."""
    candidates = torch.tensor([[7, 1, 2, 3]])
    index = torch.tensor([[1, 2, 3, 0]])  # the root's flat index is 1, not 0
    next_token, next_sibling = torch.tensor([[1, 2, 0, -1]]), torch.full((1, 4), -1)
    predicts, accept_index, accept_token_num = outputs(1, 4, 3)
    target_predict = torch.tensor([[5, 6, 8, 9]])
    status = sglang.verify_tree_greedy(predicts, accept_index, accept_token_num, candidates, index, next_token,
                                       next_sibling, target_predict, return_status=True)
    assert status.tolist() == [int(Status.BAD_TREE)]
    assert accept_index.tolist() == [[1, -1, -1]] and accept_token_num.tolist() == [0]
    assert predicts.tolist() == [-1, int(target_predict.reshape(-1)[1]), -1, -1]  # at the root's slot only


def test_a_nan_row_aborts_with_a_defined_root_token():
    """NaN probabilities at the root: NONFINITE_LOGITS, the root in
    accept_index and the row's argmax with NaN ignored after it (never an
    index or token another request owns)."""
    candidates, index, next_token, next_sibling, logits = sglang_fixture()
    probs = torch.softmax(logits / 0.01, -1)
    probs[0, 0, 1] = float("nan")
    predicts, accept_index, accept_token_num = outputs(2, 6, 4)
    status = sglang.tree_speculative_sampling_target_only(
        predicts, accept_index, accept_token_num, candidates, index, next_token, next_sibling, torch.rand(2, 6),
        torch.rand(2), probs, return_status=True)
    assert status[0] & int(Status.NONFINITE_LOGITS) and status[1] == 0
    assert accept_index[0].tolist() == [int(index[0, 0]), -1, -1, -1] and accept_token_num[0] == 0
    assert int(predicts[int(index[0, 0])]) == int(torch.nan_to_num(probs[0, 0], nan=-1.0).argmax())
    assert accept_index[1].tolist() == EXPECTED_ACCEPT_INDEX[1] and predicts[6:].tolist() == EXPECTED_PREDICTS[6:]


def test_unreachable_garbage_and_the_roots_sibling_are_ignored():
    """The root's next_sibling is never read, and an unreachable cycle is
    skipped, as in SGLang's walk."""
    candidates, index, next_token, next_sibling, logits = sglang_fixture()
    nt, ns = next_token.clone(), next_sibling.clone()
    ns[1, 0] = 3  # the root's sibling (SGLang never reads it)
    ns[0, 1] = -1  # request 0: nodes 3, 4, 5 now unreachable...
    nt[0, 3] = nt[0, 4] = -1
    ns[0, 4], ns[0, 5] = 5, 4  # ...and 4, 5 a sibling cycle
    predicts, accept_index, accept_token_num = outputs(2, 6, 4)
    status = sglang.verify_tree_greedy(predicts, accept_index, accept_token_num, candidates, index, nt, ns,
                                       logits.argmax(-1), return_status=True)
    assert status[1] == 0 and accept_index.tolist()[1] == EXPECTED_ACCEPT_INDEX[1]
    # request 0: root -> 1 -> 2; the target wants 3 after the root: nothing accepted, 3 emitted
    assert accept_index.tolist()[0] == [0, -1, -1, -1] and accept_token_num.tolist() == [0, 2]
    assert predicts.tolist()[:6] == [3, -1, -1, -1, -1, -1]


def test_bad_arguments_raise_naming_them():
    candidates, index, next_token, next_sibling, logits = sglang_fixture()
    pred = logits.argmax(-1)
    with pytest.raises(ValueError, match="retrive_index \\(or retrieve_index\\) is required"):
        sglang.verify_tree_greedy(*outputs(2, 6, 4), candidates, None, next_token, next_sibling, pred)
    with pytest.raises(ValueError, match="pass retrive_next_token or retrieve_next_token, not both"):
        sglang.verify_tree_greedy(*outputs(2, 6, 4), candidates, index, next_token, next_sibling, pred,
                                  retrieve_next_token=next_token)
    with pytest.raises(ValueError, match="target_predict must be an integer tensor of shape \\[2, 6\\]"):
        sglang.verify_tree_greedy(*outputs(2, 6, 4), candidates, index, next_token, next_sibling, logits)
    with pytest.raises(ValueError, match="accept_index must have num_spec_step >= 1"):
        sglang.verify_tree_greedy(*outputs(2, 6, 0), candidates, index, next_token, next_sibling, pred)
    with pytest.raises(ValueError, match="target_probs must be a float32/float16/bfloat16 tensor \\[2, 6, V\\]"):
        sglang.tree_speculative_sampling_target_only(*outputs(2, 6, 4), candidates, index, next_token, next_sibling,
                                                     torch.rand(2, 6), torch.rand(2), logits[:, :5])
    with pytest.raises(ValueError, match="uniform_samples_for_final_sampling must be a float tensor of shape \\[2\\]"):
        sglang.tree_speculative_sampling_target_only(*outputs(2, 6, 4), candidates, index, next_token, next_sibling,
                                                     torch.rand(2, 6), torch.rand(3), logits.softmax(-1))
    with pytest.raises(ValueError, match="seed and offset must be given together"):
        sglang.tree_speculative_sampling_target_only(*outputs(2, 6, 4), candidates, index, next_token, next_sibling,
                                                     torch.rand(2, 6), torch.rand(2), logits.softmax(-1), seed=1)


# ------------------------------------------------------------------ losslessness


DUP_CANDIDATES = [0, 2, 2, 5, 1, 3]  # root -> 1, 2, 3 (tokens 2, 2, 5: a duplicate); 1 -> 4; 3 -> 5
DUP_NEXT_TOKEN = [1, 4, -1, 5, -1, -1]
DUP_NEXT_SIBLING = [-1, 2, 3, -1, -1, -1]


def duplicate_batch(B, V=8):
    g = torch.Generator().manual_seed(7)
    p_root = torch.rand(V, generator=g) + 0.2
    p_root[2] = p_root.sum() * 0.25  # p(2) about 0.2; SGLang's rule gives token 2 about twice that
    rows = torch.rand(6, V, generator=g)
    rows[0] = p_root
    rows = rows / rows.sum(-1, keepdim=True)
    t = lambda x: torch.tensor(x).expand(B, 6).contiguous()  # noqa: E731
    index = torch.arange(B * 6).view(B, 6)
    return rows, t(DUP_CANDIDATES), index, t(DUP_NEXT_TOKEN), t(DUP_NEXT_SIBLING)


def shim_first_tokens(B, seeded):
    rows, candidates, index, nt, ns = duplicate_batch(B)
    probs = rows.expand(B, 6, rows.shape[1]).contiguous()
    predicts, accept_index, accept_token_num = outputs(B, 6, 4)
    g = torch.Generator().manual_seed(11)
    kw = dict(seed=torch.arange(B, dtype=torch.int64) * 7919 + 3, offset=5) if seeded else {}
    status = sglang.tree_speculative_sampling_target_only(
        predicts, accept_index, accept_token_num, candidates, index, nt, ns, torch.rand(B, 6, generator=g),
        torch.rand(B, generator=g), probs, return_status=True, **kw)
    assert bool((status == 0).all())
    p = rows[0].double()
    return predicts[accept_index[:, 0].long()].long(), p / p.sum()  # the op renormalises


def sglang_rule_first_tokens(B):
    """SGLang's running-sum rule for the root's children (list order 2, 2, 5),
    then the residual p with the rejected tokens zeroed: counts the
    duplicate twice."""
    rows, *_ = duplicate_batch(B)
    p = rows[0].double()
    p = p / p.sum()
    g = torch.Generator().manual_seed(12)
    u = torch.rand(B, generator=g, dtype=torch.float64)
    cum = torch.cumsum(p[torch.tensor([2, 2, 5])], 0)
    residual = p.clone()
    residual[[2, 5]] = 0
    fallback = torch.multinomial(residual / residual.sum(), B, replacement=True, generator=g)
    first = torch.where(u <= cum[1], 2, torch.where(u <= cum[2], 5, fallback))
    return first, p


@pytest.mark.parametrize("seeded", [True, False])
def test_first_token_follows_the_target_chi_square(seeded):
    """Many requests, a tree whose root lists a duplicate token: the first
    emitted token is distributed as the root's target row, with explicit
    per-request seeds or seeds from the uniform samples (negative control:
    SGLang's own running-sum rule on the same tree is rejected)."""
    tokens, p = shim_first_tokens(20000, seeded)
    assert chi_square_pvalue(tokens, p) > P_PASS
    control, p = sglang_rule_first_tokens(20000)
    assert chi_square_pvalue(control, p) < P_REJECT


# ------------------------------------------------------------------ CUDA


@pytest.mark.cuda
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(5)
    bs, N, V, S = 32, 17, 1000, 6
    nt, ns = random_lists(bs, N, g, extra=2)
    candidates = torch.randint(V, (bs, N), generator=g)
    index = torch.randperm(bs * N, generator=g).view(bs, N)
    probs = torch.softmax(torch.randn(bs, N, V, generator=g) * 4, -1)
    candidates = torch.where(torch.rand(bs, N, generator=g) < 0.5, probs.argmax(-1), candidates)
    u, uf = torch.rand(bs, N, generator=g), torch.rand(bs, generator=g)
    pred = torch.randint(V, (bs, N), generator=g)
    pred = torch.where(torch.rand(bs, N, generator=g) < 0.7, candidates.roll(-1, 1), pred)

    def run(device):
        d = lambda x: x.to(device)  # noqa: E731
        greedy = outputs(bs, N, S, device)
        sg = sglang.verify_tree_greedy(*greedy, d(candidates), d(index), d(nt), d(ns), d(pred), return_status=True)
        sampled = outputs(bs, N, S, device)
        ss = sglang.tree_speculative_sampling_target_only(*sampled, d(candidates), d(index), d(nt), d(ns), d(u), d(uf),
                                                          d(probs), return_status=True)
        return [x.cpu() for x in (*greedy, sg, *sampled, ss)]

    for a, b in zip(run("cpu"), run("cuda")):
        assert torch.equal(a, b)
