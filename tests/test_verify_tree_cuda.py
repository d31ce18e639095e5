"""verify_tree on CUDA: identical to the CPU op within DESIGN §2's margin
rule on random trees at the big shapes (V = 151936 bf16, R = 64 trees of 64
nodes), the path = chain identity on the GPU, status bits, CUDA-graph
capture and replay with fresh positions and no host sync, determinism."""
import pytest
import torch

import dspark_ops
from dspark_ops import Status
from helpers import MARGIN, assert_kernel_launched, off_alignment
from test_verify_tree import PATH_CASES, PATH_LENGTHS, path_batch
from tree_helpers import (POISON, assert_well_formed, chain_form, deep_tree, eagle_parents, max_depth_of,
                          path_parents, poisoned_tree_result, random_parents, reference_with_margins, slice_request,
                          star_parents, tree_batch, tree_batch_device)

pytestmark = pytest.mark.cuda

MODES = {
    "greedy": (None, dict(temperature=0.0)),
    "deterministic": (None, dict(temperature=0.9)),
    "iid_logits": ("logits", dict(temperature=0.8, sibling_mode="iid")),
    "wor_probs": ("probs", dict(sibling_mode="without_replacement")),
    "wor_logits_top_k_top_p": ("logits", dict(temperature=1.1, top_k=50, top_p=0.9,
                                              sibling_mode="without_replacement")),
    "iid_probs_top_p": ("probs", dict(top_p=0.8, sibling_mode="iid")),
}


def to(v, device):
    return v.to(device) if isinstance(v, torch.Tensor) else v


def sixty_four_trees(R=64, n=64, seed=0):
    """R trees of n nodes: random (bushy to deep), paths, stars, EAGLE-like."""
    g = torch.Generator().manual_seed(seed)
    trees = []
    for r in range(R):
        kind = r % 8
        if kind == 0:
            trees.append(path_parents(n))
        elif kind == 1:
            trees.append(star_parents(n))
        elif kind == 2:
            trees.append(eagle_parents(6, 4, 4)[:n])
        else:
            trees.append(random_parents(n, g, chain_bias=0.15 * (kind - 3)))
    return trees


def compare_with_cpu(target, tokens, parents, cu, max_depth, **kw):
    """CUDA (outputs poisoned, out= form) against the CPU op; a difference
    must be one the reference, on that request alone, says lies within the
    margin."""
    cpu = lambda v: to(v, "cpu")  # noqa: E731
    ckw = {k: cpu(v) for k, v in kw.items()}
    want = dspark_ops.verify_tree(cpu(target), cpu(tokens), cpu(parents), cpu(cu), max_depth=max_depth, **ckw)
    R = cu.shape[0] - 1
    out = poisoned_tree_result(R, max_depth, device="cuda")
    got = dspark_ops.verify_tree(to(target, "cuda"), to(tokens, "cuda"), to(parents, "cuda"), to(cu, "cuda"),
                                 max_depth=max_depth, out=out, **{k: to(v, "cuda") for k, v in kw.items()})
    got = tuple(t.cpu() for t in got)
    for name, t in zip(dspark_ops.TreeResult._fields, got):
        assert not bool((t == POISON).any()), f"{name} not fully written"
    ccu = cpu(cu)
    for r in range(R):
        if all(torch.equal(g[r], w[r]) for g, w in zip(got, want)):
            continue
        t, tok, par, one_cu, one = slice_request(r, cpu(target), cpu(tokens), cpu(parents), ccu, ckw)
        _, margins = reference_with_margins(t, tok, par, one_cu, max_depth=max_depth, **one)
        assert margins[0] < MARGIN, (f"request {r}: CUDA {[g[r].tolist() for g in got]} vs "
                                     f"CPU {[w[r].tolist() for w in want]} (margin {margins[0]:.3g})")
    assert_well_formed(got, cpu(tokens), cpu(parents), ccu, target.shape[1])
    return got, want


@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_matches_cpu_full_size(mode):
    R, V = 64, 151936
    draft, kw = MODES[mode]
    trees = sixty_four_trees(R)
    target, tokens, parents, cu, dkw = tree_batch_device(trees, V, torch.bfloat16, draft=draft, seed=1)
    compare_with_cpu(target, tokens, parents, cu, max_depth_of(trees), seed=torch.arange(R, device="cuda") + 3,
                     position=torch.arange(R, device="cuda") * 9, **dkw, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 7, 1000, 32001])
@pytest.mark.parametrize("mode", ["greedy", "deterministic", "iid_logits", "wor_probs", "wor_logits_top_k_top_p"])
def test_cuda_matches_cpu(V, dtype, mode):
    R = 16
    draft, kw = MODES[mode]
    trees = sixty_four_trees(R, n=24, seed=V) + [[-1], path_parents(2)]
    target, tokens, parents, cu, dkw = tree_batch_device(trees, V, dtype, draft=draft, seed=V, scale=3.0)
    compare_with_cpu(target, tokens, parents, cu, max_depth_of(trees) + 1, seed=torch.arange(R + 2) * 5 + 1,
                     position=7, **dkw, **kw)


@pytest.mark.parametrize("mode", ["greedy", "iid_logits", "wor_probs"])
def test_cuda_1024_nodes_and_depth_64(mode):
    V = 32001
    g = torch.Generator().manual_seed(2)
    trees = [random_parents(1024, g, chain_bias=0.3), star_parents(1024), path_parents(65),
             random_parents(1024, g, chain_bias=0.9)]
    draft, kw = MODES[mode]
    target, tokens, parents, cu, dkw = tree_batch_device(trees, V, torch.bfloat16, draft=draft, seed=2, noise=0.05,
                                                         greedy_bias=0.9)
    compare_with_cpu(target, tokens, parents, cu, max_depth_of(trees), seed=torch.arange(4), position=3, **dkw, **kw)


@pytest.mark.parametrize("n,V", [(40, 600), (1024, 600), (1025, 2048), (1025, 600)])
def test_cuda_depth_limits(n, V):
    """max_depth at its edge on the kernel's three depth checks (pointer
    jumping up to 1024 nodes; beyond, one thread in the scratch row when
    n <= V, else a walk per node): depth max_depth passes, one more is
    BAD_TREE, the deepest node first or last in index order, depths 2^k + 1
    included."""
    g = torch.Generator().manual_seed(n + V)
    for d in (1, 2, 5, 9, min(n - 2, 700)):
        trees = [deep_tree(n, d, g, last) for last in (False, True)]
        trees += [deep_tree(n, d - 1, g, True)] if d > 1 else [[-1]]
        trees += [deep_tree(n, d + 1, g, last) for last in (False, True) if d + 1 < n]
        target, tokens, parents, cu, _ = tree_batch(trees, V, draft=None, seed=d)
        R = len(trees)
        got, _ = compare_with_cpu(target, tokens, parents, cu, d, seed=torch.arange(R), position=torch.arange(R),
                                  temperature=torch.tensor([0.0, 0.9] * (R // 2) + [0.0] * (R % 2)))
        status = dspark_ops.TreeResult(*got).status.tolist()
        assert status == [0, 0, 0] + [Status.BAD_TREE] * (R - 3), (d, status)


def test_cuda_mixed_per_request_parameters():
    R, V = 256, 97
    g = torch.Generator().manual_seed(3)
    trees = [random_parents(int(torch.randint(1, 40, (), generator=g)), g, chain_bias=0.4) for _ in range(R)]
    target, tokens, parents, cu, kw = tree_batch_device(trees, V, torch.float32, draft="logits", seed=3, scale=2.0)
    temperature = torch.rand(R, generator=g) + 0.2
    temperature[::4] = 0.0
    draft_temperature = torch.ones(R)
    draft_temperature[1::5] = 0.0
    compare_with_cpu(target, tokens, parents, cu, max_depth_of(trees), temperature=temperature,
                     draft_temperature=draft_temperature, sibling_mode=torch.randint(0, 3, (R,), generator=g,
                                                                                    dtype=torch.int8),
                     top_k=torch.randint(0, 20, (R,), generator=g, dtype=torch.int32),
                     top_p=torch.rand(R, generator=g) + 0.3, seed=torch.arange(R), position=5, **kw)


@pytest.mark.parametrize("V,dtype", [(7, torch.float32), (16385, torch.float16), (151936, torch.bfloat16)])
@pytest.mark.parametrize("case", list(PATH_CASES))
def test_cuda_path_equals_chain(V, dtype, case):  # 16385: two full 8192-entry chunks and one entry
    draft, extra = PATH_CASES[case]
    trees, target, tokens, parents, cu, kw = path_batch(V, dtype, draft, seed=V + 1)
    R = len(trees)
    common = dict(seed=torch.arange(R) * 3 + 1, position=torch.tensor([0, 5, 1 << 33, 7, 100, 2]), **extra)
    cuda = lambda d: {k: to(v, "cuda") for k, v in d.items()}  # noqa: E731
    tree = dspark_ops.verify_tree(target.cuda(), tokens.cuda(), parents.cuda(), cu.cuda(),
                                  max_depth=max(PATH_LENGTHS) - 1, **cuda(kw), **cuda(common))
    args, ckw = chain_form(target, tokens, cu, kw)
    chain = dspark_ops.verify_chunk(*(a.cuda() for a in args), **cuda(ckw),
                                    **cuda({k: v for k, v in common.items() if k != "sibling_mode"}))
    for name, a, b in zip(("tokens", "accepted", "emitted", "status"), (tree[0], tree[1], tree[2], tree[4]), chain):
        assert torch.equal(a, b), f"{case}: {name} {a.tolist()} (tree) vs {b.tolist()} (chain)"


def test_cuda_status_bits_match_cpu():
    V = 3001
    trees = [path_parents(4), [-1, 0, 2], [0, 0], star_parents(5), path_parents(6), [-1, 0, 0, 1], [-1, 0, 1, 2, 3],
             star_parents(4), star_parents(4), [-1]]
    target, tokens, parents, cu, kw = tree_batch_device(trees, V, torch.bfloat16, draft="logits", seed=4,
                                                        device="cpu")
    target, logits = target.clone(), kw["draft_logits"].clone()
    c = cu.tolist()
    tokens[c[3] + 1] = -1  # request 3: out-of-range first children (always examined)
    tokens[c[3] + 2] = V
    target[c[4], 11] = float("nan")  # request 4: the root row
    target[c[5] + 2, 0] = float("inf")  # request 5: a child's row (needed only if accepted)
    logits[c[6], 5] = float("nan")  # request 6: the root's draft row
    target[c[7]] = float("-inf")  # request 7: all masked
    codes = torch.tensor([0, 1, 2, 1, 0, 1, 0, 1, 9, 2], dtype=torch.int8)  # request 8: a bad code
    kw = dict(draft_logits=logits, sibling_mode=codes, seed=torch.arange(10), position=2)
    got, want = compare_with_cpu(target, tokens, parents, cu, 5, **kw)
    st = want[4].tolist()
    assert st[1] == st[2] == st[8] == Status.BAD_TREE and st[4] == Status.NONFINITE_LOGITS
    assert st[6] == Status.NONFINITE_LOGITS and st[7] == Status.ALL_MASKED and st[3] & Status.TOKEN_OUT_OF_RANGE
    assert torch.equal(got[4], want[4])
    greedy = compare_with_cpu(target, tokens, parents, cu, 5, temperature=0.0, **kw)
    assert torch.equal(greedy[0][4], greedy[1][4])
    # a request claiming 65536 nodes next to one of 65535 (V = 1)
    n_ok, n_bad = 65535, 65536
    Mx = n_ok + n_bad + 1
    big = dspark_ops.verify_tree(torch.zeros(Mx, 1, device="cuda"), torch.zeros(Mx, dtype=torch.int32, device="cuda"),
                                 torch.cat([torch.tensor(star_parents(n_ok), dtype=torch.int32),
                                            torch.tensor(star_parents(n_bad), dtype=torch.int32),
                                            torch.tensor([-1], dtype=torch.int32)]).cuda(),
                                 torch.tensor([0, n_ok, n_ok + n_bad, Mx], dtype=torch.int32, device="cuda"),
                                 max_depth=1, temperature=0.0)
    assert big.status.tolist() == [0, Status.BAD_LENGTHS, 0] and big.tokens.tolist() == [[0, 0], [-1, -1], [0, -1]]


def run_both_row_passes(monkeypatch, *args, **kw):
    """verify_tree with the row pass forced on, then off (the walk reads
    its rows itself): the two must agree bit for bit."""
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("DSPARK_TREE_ROW_PASS", flag)
        results.append(tuple(t.cpu() for t in dspark_ops.verify_tree(*args, **kw)))
    monkeypatch.delenv("DSPARK_TREE_ROW_PASS")
    on, off = results
    for name, a, b in zip(dspark_ops.TreeResult._fields, on, off):
        assert torch.equal(a, b), f"{name}: row pass {a.tolist()} vs walk {b.tolist()}"
    return on


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("V,dtype", [(1000, torch.float32), (16385, torch.bfloat16), (151936, torch.bfloat16)])
def test_cuda_row_pass_equals_walk(monkeypatch, V, dtype, mode):
    """The row pass (every node row's statistics by the whole GPU, then the
    walk) gives the walk's own results bit for bit: same chunk sums, keep
    keys and races (V = 16385: a last chunk of one entry)."""
    R = 12
    draft, kw = MODES[mode]
    trees = sixty_four_trees(R, n=20, seed=V) + [[-1], path_parents(2)]
    target, tokens, parents, cu, dkw = tree_batch_device(trees, V, dtype, draft=draft, seed=V + 2, scale=3.0)
    args = dict(max_depth=max_depth_of(trees), seed=torch.arange(R + 2, device="cuda") * 3 + 1, position=11,
                **dkw, **kw)
    got = run_both_row_passes(monkeypatch, target, tokens, parents, cu, **args)
    assert int(got[1].sum()) > 0  # some walks went below their roots
    # 243 rows: a filtered batch's row pass takes its keys from the split select; no filter, no select
    monkeypatch.setenv("DSPARK_TREE_ROW_PASS", "1")
    monkeypatch.delenv("DSPARK_SPLIT_SELECT", raising=False)
    assert_kernel_launched(lambda: dspark_ops.verify_tree(target, tokens, parents, cu, **args),
                           "split_select_pass_kernel", "top" in mode and V >= 4096)
    monkeypatch.delenv("DSPARK_TREE_ROW_PASS")


def test_cuda_row_pass_mixed_and_malformed(monkeypatch):
    """Greedy and sampled requests, per-request sibling modes and filters,
    and malformed requests (bad parents, a bad code, NaN rows, a
    non-monotone cu) in one batch: the row pass skips or mis-owns nothing
    that the walk then trusts."""
    V = 3001
    g = torch.Generator().manual_seed(12)
    trees = [random_parents(int(torch.randint(1, 30, (), generator=g)), g, chain_bias=0.4) for _ in range(24)]
    trees[5] = [-1, 0, 2]  # parent >= child
    trees[6] = [0, 0]  # the root has a parent
    target, tokens, parents, cu, kw = tree_batch_device(trees, V, torch.bfloat16, draft="logits", seed=12,
                                                        scale=2.0, device="cpu")
    target = target.clone()
    c = cu.tolist()
    target[c[7], 3] = float("nan")  # request 7's root row
    target[c[8] + 1, 4] = float("inf")  # a child's row of request 8
    R = len(trees)
    temperature = torch.rand(R, generator=g) + 0.3
    temperature[::5] = 0.0
    codes = torch.randint(0, 3, (R,), generator=g, dtype=torch.int8)
    codes[9] = 7
    args = dict(max_depth=max_depth_of([t for i, t in enumerate(trees) if i not in (5, 6)]) + 1,
                temperature=temperature.cuda(), sibling_mode=codes.cuda(),
                top_k=torch.randint(0, 30, (R,), generator=g, dtype=torch.int32).cuda(),
                top_p=(torch.rand(R, generator=g) + 0.5).cuda(), seed=torch.arange(R).cuda(), position=4,
                draft_logits=kw["draft_logits"].cuda())
    got = run_both_row_passes(monkeypatch, target.cuda(), tokens.cuda(), parents.cuda(), cu.cuda(), **args)
    want = dspark_ops.verify_tree(target, tokens, parents, cu, **{k: to(v, "cpu") for k, v in args.items()})
    aborts = [5, 6, 7, 9]
    assert torch.equal(got[4][aborts], want.status[aborts])
    assert got[4][5] == got[4][6] == got[4][9] == Status.BAD_TREE and got[4][7] == Status.NONFINITE_LOGITS
    # A non-monotone cu: request 9 (a valid code now) spans request 11's rows, so the row pass computes
    # those rows as request 9's; request 11's walk must not use them.
    bad = cu.clone()
    bad[10] = bad[12] + 1
    codes[9] = 0
    args["sibling_mode"] = codes.cuda()
    got = run_both_row_passes(monkeypatch, target.cuda(), tokens.cuda(), parents.cuda(), bad.cuda(), **args)
    want = dspark_ops.verify_tree(target, tokens, parents, bad, **{k: to(v, "cpu") for k, v in args.items()})
    assert got[4][10] == want.status[10] == Status.BAD_LENGTHS and got[4][9] == want.status[9] == Status.BAD_TREE


def assert_row_pass(fn, expected: bool = True) -> None:
    """fn() launches verify_tree's row pass (or, expected=False, does not)."""
    assert_kernel_launched(fn, "verify_tree_row_stats_kernel", expected)


@pytest.mark.parametrize("draft", [None, "probs", "logits"])
@pytest.mark.parametrize("num_nodes", [False, True])
def test_cuda_workspace_with_and_without_row_pass_room(monkeypatch, num_nodes, draft):
    """A caller's workspace sized with num_nodes runs the row pass, one
    sized without it runs the walk alone (also without draft rows, where
    the unused room for q must not be taken for the pass's): the same
    results either way; DSPARK_TREE_ROW_PASS=0 turns it off; too small a
    workspace is an error naming the bytes needed."""
    monkeypatch.delenv("DSPARK_TREE_ROW_PASS", raising=False)
    R, V = 6, 5000
    trees = sixty_four_trees(R, n=12, seed=13)
    target, tokens, parents, cu, kw = tree_batch_device(trees, V, torch.bfloat16, draft=draft, seed=13)
    sizes = dict(num_requests=R, vocab_size=V) | (dict(num_nodes=target.shape[0]) if num_nodes else {})
    ws = torch.empty(dspark_ops.workspace_size("verify_tree", **sizes), dtype=torch.uint8, device="cuda")
    args = dict(max_depth=max_depth_of(trees), seed=5, top_k=40, **kw)
    if draft is not None:
        args["sibling_mode"] = "iid"
    out = dspark_ops.empty_tree_result(R, args["max_depth"], device="cuda")
    call = lambda: dspark_ops.verify_tree(target, tokens, parents, cu, out=out, workspace=ws, **args)  # noqa: E731
    assert_row_pass(call, num_nodes)
    want = run_both_row_passes(monkeypatch, target, tokens, parents, cu, **args)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(out, want))
    assert_row_pass(lambda: dspark_ops.verify_tree(target, tokens, parents, cu, **args))  # R = 6: auto runs it
    monkeypatch.setenv("DSPARK_TREE_ROW_PASS", "0")
    assert_row_pass(call, False)
    small = torch.empty(64, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="workspace must hold at least"):
        dspark_ops.verify_tree(target, tokens, parents, cu, out=out, workspace=small, **args)


def test_cuda_empty_draft_rows_are_bad_lengths():
    """A draft tensor with no rows while requests have nodes: BAD_LENGTHS
    (its null data pointer once skipped the bound and crashed)."""
    V = 50
    trees = [path_parents(3), [-1]]
    target, tokens, parents, cu, _ = tree_batch_device(trees, V, torch.float32, draft=None, seed=14)
    for name in ("draft_probs", "draft_logits"):
        res = dspark_ops.verify_tree(target, tokens, parents, cu, max_depth=2, seed=1,
                                     **{name: torch.empty(0, V, device="cuda")})
        assert res.status.tolist() == [Status.BAD_LENGTHS] * 2 and res.tokens.tolist() == [[-1] * 3] * 2


def test_cuda_strided_target_rows():
    V = 3001
    trees = sixty_four_trees(8, n=16)
    target, tokens, parents, cu, kw = tree_batch_device(trees, V, torch.bfloat16, draft="probs", seed=5)
    padded = torch.zeros(target.shape[0], 3072, dtype=torch.bfloat16, device="cuda")
    padded[:, :V] = target
    view = padded[:, :V]
    assert view.stride(0) == 3072
    a = dspark_ops.verify_tree(view, tokens, parents, cu, max_depth=15, seed=3, sibling_mode="iid", **kw)
    b = dspark_ops.verify_tree(target, tokens, parents, cu, max_depth=15, seed=3, sibling_mode="iid", **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_greedy_rows_off_alignment(dtype):
    """A greedy walk reads each visited row in one vectorised pass: rows
    starting one element past a 16-byte boundary, odd V, a tie for the argmax
    on a visited row, give the CPU op's results."""
    V = 1031
    trees = sixty_four_trees(8, n=16)
    target, tokens, parents, cu, _ = tree_batch(trees, V, dtype, draft=None, seed=7, greedy_bias=0.9)
    target[0, 5] = target[0, 700] = float(target[0].float().max()) + 1  # request 0's root: index 5 wins the tie
    D = max_depth_of(trees)
    want = dspark_ops.verify_tree(target, tokens, parents, cu, max_depth=D, temperature=0.0)
    got = dspark_ops.verify_tree(off_alignment(target), tokens.cuda(), parents.cuda(), cu.cuda(), max_depth=D,
                                 temperature=0.0)
    assert all(torch.equal(x.cpu(), y) for x, y in zip(got, want))
    assert int(want.accepted.sum()) > 8  # the walks went below the roots


@pytest.mark.parametrize("num_nodes", [False, True])
def test_cuda_graph_replay_no_sync_no_allocation(num_nodes):
    R, V = 8, 32000
    trees = [eagle_parents(4, 3, 3)] * R
    target, tokens, parents, cu, kw = tree_batch_device(trees, V, torch.bfloat16, draft="probs", seed=6)
    D = max_depth_of(trees)
    seed = torch.arange(R, device="cuda")
    position = torch.zeros(R, dtype=torch.int64, device="cuda")
    modes = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1], dtype=torch.int8, device="cuda")
    out = dspark_ops.empty_tree_result(R, D, device="cuda")
    sizes = dict(num_requests=R, vocab_size=V) | (dict(num_nodes=target.shape[0]) if num_nodes else {})
    ws = torch.empty(dspark_ops.workspace_size("verify_tree", **sizes), dtype=torch.uint8, device="cuda")

    def step():
        dspark_ops.verify_tree(target, tokens, parents, cu, max_depth=D, sibling_mode=modes, top_p=0.95, seed=seed,
                               position=position, out=out, workspace=ws, **kw)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    results = []
    for pos in (100, 101, 102):
        position.fill_(pos)
        graph.replay()
        want = dspark_ops.verify_tree(target, tokens, parents, cu, max_depth=D, sibling_mode=modes, top_p=0.95,
                                      seed=seed, position=position, **kw)
        assert all(torch.equal(a, b) for a, b in zip(out, want))
        results.append(out.tokens.clone())
    assert not all(torch.equal(results[0], x) for x in results[1:])  # fresh numbers at each position


def test_cuda_deterministic_run_to_run():
    R, V = 64, 151936
    trees = sixty_four_trees(R, seed=7)
    target, tokens, parents, cu, kw = tree_batch_device(trees, V, torch.bfloat16, draft="logits", seed=7)
    args = dict(max_depth=max_depth_of(trees), seed=2, top_p=0.95, sibling_mode="without_replacement", **kw)
    a = dspark_ops.verify_tree(target, tokens, parents, cu, **args)
    b = dspark_ops.verify_tree(target, tokens, parents, cu, **args)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_cuda_opcheck():
    from test_verify_tree import recorded_op_call
    trees = [random_parents(6, torch.Generator().manual_seed(1)), [-1], star_parents(4)]
    target, tokens, parents, cu, kw = tree_batch_device(trees, 300, torch.float32, draft="probs", seed=8)
    D = max_depth_of(trees)
    common = dict(max_depth=D, sibling_mode="without_replacement", top_k=10, seed=torch.tensor([1, 2, 3], device="cuda"),
                  position=torch.tensor([2, 2, 2], device="cuda"), **kw)
    op, args, kwargs = recorded_op_call(target, tokens, parents, cu, **common)
    torch.library.opcheck(op, args, kwargs)
    op, args, kwargs = recorded_op_call(target, tokens, parents, cu, out=dspark_ops.empty_tree_result(3, D, device="cuda"),
                                        **common)
    torch.library.opcheck(op, args, kwargs)
