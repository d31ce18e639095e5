"""The CUDA kernels without a GPU: csrc/cuda and csrc/kernels built by the
host compiler against tools/cuda_emu (blocks in turn, threads as fibers that
meet at barriers and shuffles) and run on CPU tensors. Each op's emulated
CUDA path must give exactly the CPU op's outputs on the paths the GPU picks
by size (split top-k/top-p select, verify_tree's row pass, the greedy
kernels, many vocabulary chunks), under shuffled thread schedules
(CUEMU_SEED) that expose a missing barrier. The emulator's own checks are
shown to fire on deliberately broken kernels. What this cannot show (timing,
memory ordering between blocks, the real compiler): tools/cuda_emu/README.md.

`make test-emulated` runs the op suites through the emulator as well
(DSPARK_EMULATE_CUDA=1)."""
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dspark_ops
import test_kv_compact
import test_workspace_checks
from test_schedule_verify import random_case
from tree_helpers import deep_tree, max_depth_of, mixed_trees, tree_batch
from verify_helpers import ragged_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import cuda_emu_build  # noqa: E402

SCHEDULES = [0, 1, 2]  # CUEMU_SEED: 0 the natural order, else shuffled blocks and threads


@pytest.fixture(scope="module", autouse=True)
def _emulator():
    cuda_emu_build.load()


@pytest.fixture(params=SCHEDULES, ids=lambda s: f"sched{s}")
def schedule(request, monkeypatch):
    monkeypatch.setenv("CUEMU_SEED", str(request.param))
    return request.param


def launched(reset=True):
    """The kernels the emulator ran (since the last reset), by name."""
    return {line.rsplit(" ", 1)[0] for line in torch.ops.dspark_emu.emu_launches(reset)}


def both(call):
    """call() on the CPU ops and on the emulated CUDA kernels; also the
    names of the kernels the emulated call launched."""
    want = call()
    launched()
    with cuda_emu_build.emulated_ops():
        got = call()
    kernels = launched()
    assert kernels, "the emulated call launched no kernel: the ops were not routed to the emulator"
    return got, want, kernels


def takes_split_select(rows, V):
    """Whether csrc/core/split_select.h sends `rows` filtered rows of V
    entries to the split select (kTargetBlocks = 1024, slices of 2048)."""
    return 4 * rows <= 1024 and min((1024 + rows - 1) // rows, V // 2048) > 1


def assert_same(got, want, what=""):
    for name, g, w in zip(got._fields, got, want):
        if torch.equal(g, w):
            continue
        diff = (g != w) & ~(g.isnan() & w.isnan()) if g.is_floating_point() else g != w
        if not bool(diff.any()):  # NaN in the same places: equal (torch.equal says no)
            continue
        at = diff.nonzero()[:4].tolist()
        pytest.fail(f"{what} {name}: {int(diff.sum())} of {g.numel()} entries differ, first at {at}: "
                    f"emulated CUDA {[g[tuple(i)].item() for i in at]} vs CPU {[w[tuple(i)].item() for i in at]}")


# --- the emulator's own checks -------------------------------------------

def test_emulator_schedules_expose_a_missing_barrier():
    racy = {s: torch.ops.dspark_emu.emu_selftest("race", s) for s in (1, 2, 3)}
    synced = {s: torch.ops.dspark_emu.emu_selftest("synced", s) for s in (0, 1, 2, 3)}
    want = synced[0]
    assert want[:3].tolist() == [1001, 1002, 1003]
    assert all(torch.equal(v, want) for v in synced.values())
    assert all(not torch.equal(v, want) for v in racy.values())


def test_emulator_block_reduce_is_schedule_independent():
    for s in (0, 1, 2):
        assert torch.ops.dspark_emu.emu_selftest("block_sum", s)[:3].tolist() == [32640] * 3  # 0 + ... + 255


def test_emulator_poisons_unwritten_shared_memory():
    """Block 0 writes its shared variable, blocks 1 and 2 read theirs
    unwritten: 0xFF bytes, whatever block ran before."""
    for s in (0, 1):
        assert torch.ops.dspark_emu.emu_selftest("unwritten_shared", s)[:3].tolist() == [7, -1, -1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_emulator_allows_legal_divergent_shuffles(seed):
    disjoint = torch.ops.dspark_emu.emu_selftest("disjoint_masks", seed)[:32]
    assert disjoint.tolist() == [100 + (lane ^ 1) for lane in range(32)]
    slow = torch.ops.dspark_emu.emu_selftest("slow_reader", seed)[:32]
    assert slow.tolist() == [100 + 3000] + [100 + lane - 1 + (3000 if lane < 16 else 0) for lane in range(1, 32)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_emulator_wmma_product_and_a_missing_syncwarp(seed):
    """The WMMA stand-in (include/mma.h): D = A @ B + 1 on a 16 x 16 x 16
    tile, read back through shared memory, each lane reading entries another
    lane stored: exact with a __syncwarp after the store, wrong without."""
    i = torch.arange(16, dtype=torch.float32)
    a, b = i[:, None] + i[None, :], i[:, None] - 2 * i[None, :]
    want = torch.roll((a @ b + 1).flatten(), -1).view(torch.int32)  # lane reads entry e + 1
    assert torch.equal(torch.ops.dspark_emu.emu_selftest("wmma_synced", seed)[:256], want)
    assert not torch.equal(torch.ops.dspark_emu.emu_selftest("wmma_race", seed)[:256], want)


@pytest.mark.parametrize("case,message", [
    ("wmma_divergent", "without the whole warp"),
    ("wmma_two_tiles", "passed different pointers"),
    ("exited_lanes", r"reads lane \d+, which has exited"),
    ("divergent_wait", "deadlock"),
    ("divergent_barriers", "different __syncthreads"),
    ("mask_mismatch", "disagree on the mask"),
    ("zero_blocks", "invalid configuration"),
    ("too_many_threads", "invalid configuration"),
])
def test_emulator_reports_misuse(case, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dspark_emu.emu_selftest(case, 1)


@pytest.mark.skipif(not cuda_emu_build.asan_requested(), reason="needs the AddressSanitizer build: "
                    "make test-emulated-asan (which make test runs)")
@pytest.mark.parametrize("case,report", [("global_overrun", "heap-buffer-overflow"),
                                         ("shared_overrun", "global-buffer-overflow")])
def test_asan_reports_an_overrun(case, report):
    """With CUEMU_ASAN=1 an access past a tensor or a shared array aborts
    with AddressSanitizer's report (in a child: the report ends the process)."""
    code = ("import sys; sys.path.insert(0, 'tools'); import cuda_emu_build; cuda_emu_build.load(); "
            f"import torch; torch.ops.dspark_emu.emu_selftest('{case}', 0)")
    child = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode != 0 and report in child.stderr and "overrun_kernel" in child.stderr, child.stderr[-3000:]


def test_shared_rewrite():
    text = ("  __shared__ uint32_t s_bin, s_remaining;  // x\n  __shared__ RaceBest s_best[kBlock / 32];\n"
            "  __shared__ unsigned long long masses[kBins];\n")
    assert cuda_emu_build.rewrite_shared(text) == (
        "  __shared__ uint32_t s_bin, s_remaining; ::cuemu::poison_shared(&s_bin, sizeof(s_bin)); "
        "::cuemu::poison_shared(&s_remaining, sizeof(s_remaining));  // x\n"
        "  __shared__ RaceBest s_best[kBlock / 32]; ::cuemu::poison_shared(&s_best, sizeof(s_best));\n"
        "  __shared__ unsigned long long masses[kBins]; ::cuemu::poison_shared(&masses, sizeof(masses));\n")


def test_launch_rewrite():
    text = "k<T, D><<<static_cast<unsigned>(R), kBlock, 0, stream>>>(\n a, b);\nnoop<<<1, 32>>>();"
    assert cuda_emu_build.rewrite_launches(text) == (
        '::cuemu::Launch(static_cast<unsigned>(R), kBlock, 0, stream).named("k")(k<T, D>, a, b);\n'
        '::cuemu::Launch(1, 32).named("noop")(noop);')


# --- sample ----------------------------------------------------------------

@pytest.mark.parametrize("split", ["auto", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R,V", [(3, 9001), (1, 4096), (37, 700)])
def test_sample(R, V, dtype, split, schedule, monkeypatch):
    monkeypatch.setenv("DSPARK_SPLIT_SELECT", split)  # R * V >= 2 x 2048 takes the split select unless "0"
    g = torch.Generator().manual_seed(R * V)
    logits = (torch.randn(R, V, generator=g) * 3).to(dtype)
    logits[0, :5] = logits[0].max()  # ties at the top
    kw = dict(temperature=torch.rand(R, generator=g) * 1.5, top_k=torch.randint(0, 60, (R,), generator=g),
              top_p=torch.rand(R, generator=g) * 0.5 + 0.5, seed=torch.arange(R) + 11, position=torch.arange(R) * 5)
    kw["temperature"][R // 2] = 0.0
    got, want, kernels = both(lambda: dspark_ops.sample(logits, **kw))
    assert_same(got, want, f"sample R={R} V={V}")
    assert ("split_select_pass_kernel" in kernels) == (split == "auto" and takes_split_select(R, V)), kernels


def test_sample_row_start_and_slots(schedule):
    """Requests reading rows of a shared block (row_start), each at its own
    slot, as the decoding loop's drafters call it."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 5003, generator=g) * 2
    R = 4
    kw = dict(temperature=torch.tensor([0.0, 0.8, 1.0, 1.3]), top_k=torch.tensor([0, 7, 0, 0]),
              top_p=torch.tensor([1.0, 1.0, 0.9, 1.0]), seed=torch.arange(R) + 5, position=torch.arange(R) * 11,
              slot=torch.tensor([0, 3, 1, 2], dtype=torch.int32), row_start=torch.tensor([8, 0, 5, 2], dtype=torch.int32))
    got, want, _ = both(lambda: dspark_ops.sample(logits, **kw))
    assert_same(got, want, "sample row_start")


# --- verify_chunk ------------------------------------------------------------

CHAIN_MODES = {
    "greedy": ("none", dict(temperature=0.0)),
    "point_mass": ("none", dict(temperature=0.9)),
    "probs": ("probs", dict(temperature=1.0)),
    "logits_top_k_top_p": ("logits", dict(temperature=1.1, top_k=40, top_p=0.9)),
}


@pytest.mark.parametrize("mode", list(CHAIN_MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,lengths", [(7, [3, 0, 5, 1]), (8193, [3, 1]), (20001, [6, 0, 2])])
def test_verify_chunk(V, lengths, dtype, mode, schedule):
    draft, kw = CHAIN_MODES[mode]
    target, tokens, cu, dkw = ragged_batch(lengths, V, dtype, mode=draft, seed=V + len(lengths), scale=4.0)
    R = len(lengths)
    got, want, kernels = both(lambda: dspark_ops.verify_chunk(target, tokens, cu, max_draft=max(lengths),
                                                              seed=torch.arange(R), position=torch.arange(R) * 7,
                                                              **dkw, **kw))
    assert_same(got, want, f"verify_chunk {mode} V={V}")
    rows = R * (max(lengths) + 1)
    filtered = "top_k" in kw
    assert ("split_select_pass_kernel" in kernels) == (filtered and takes_split_select(rows, V)), kernels
    assert ("verify_threshold_kernel" in kernels) == (filtered and not takes_split_select(rows, V)), kernels
    assert ("verify_residual_kernel" in kernels) == (draft != "none"), kernels


def test_verify_chunk_mixed_requests_and_row_starts(schedule):
    """Greedy and sampled requests in one batch, drafts read from a shared
    row block (draft_row_start), as the decoding loop calls it."""
    lengths, V = [4, 2, 0, 5], 3001
    target, tokens, cu, dkw = ragged_batch(lengths, V, torch.float32, mode="logits", seed=5, scale=3.0)
    R = len(lengths)
    kw = dict(temperature=torch.tensor([0.0, 0.8, 1.0, 0.0]), top_k=torch.tensor([0, 20, 0, 0]),
              top_p=torch.tensor([1.0, 1.0, 0.9, 1.0]), seed=torch.arange(R) + 1, position=torch.arange(R),
              draft_temperature=torch.tensor([0.0, 1.0, 1.0, 0.0]),
              draft_row_start=cu[:-1].clone(), target_row_start=cu[:-1] + torch.arange(R, dtype=torch.int32))
    got, want, kernels = both(lambda: dspark_ops.verify_chunk(target, tokens, cu, max_draft=5, **dkw, **kw))
    assert_same(got, want, "verify_chunk mixed")
    assert {"verify_greedy_kernel", "verify_threshold_kernel", "verify_residual_kernel"} <= kernels, kernels


# --- verify_tree -------------------------------------------------------------

TREE_MODES = {
    "greedy": (None, dict(temperature=0.0)),
    "deterministic": (None, dict(temperature=0.9)),
    "iid_logits_top_k_top_p": ("logits", dict(temperature=1.1, top_k=30, top_p=0.9, sibling_mode="iid")),
    "wor_probs": ("probs", dict(sibling_mode="without_replacement")),
}


@pytest.mark.parametrize("row_pass", ["auto", "0", "1"])
@pytest.mark.parametrize("mode", list(TREE_MODES))
@pytest.mark.parametrize("V,dtype", [(33, torch.float32), (5001, torch.bfloat16), (777, torch.float16)])
def test_verify_tree(V, dtype, mode, row_pass, schedule, monkeypatch):
    monkeypatch.setenv("DSPARK_TREE_ROW_PASS", row_pass)
    draft, kw = TREE_MODES[mode]
    trees = mixed_trees(seed=V)
    siblings = kw.get("sibling_mode", "iid")
    target, tokens, parents, cu, dkw = tree_batch(trees, V, dtype, draft=draft, seed=V, siblings=siblings)
    R = len(trees)
    got, want, kernels = both(lambda: dspark_ops.verify_tree(target, tokens, parents, cu,
                                                             max_depth=max_depth_of(trees), seed=torch.arange(R) + 2,
                                                             position=torch.arange(R) * 3, **dkw, **kw))
    assert_same(got, want, f"verify_tree {mode} V={V} row_pass={row_pass}")
    if row_pass != "auto":
        assert ("verify_tree_row_stats_kernel" in kernels) == (row_pass == "1"), kernels
    if row_pass == "1" and "top_k" in kw:
        assert ("split_select_pass_kernel" in kernels) == takes_split_select(int(cu[-1]), V), kernels


@pytest.mark.parametrize("sms", ["1", "132"])
def test_verify_tree_row_pass_thresholds(sms, monkeypatch):
    """The binding's automatic choice of the row pass (by multiprocessor
    count) gives the same result either way."""
    monkeypatch.setenv("DSPARK_EMU_SMS", sms)
    monkeypatch.setenv("CUEMU_SEED", "3")
    trees = mixed_trees(seed=1, scale=6)  # 8 trees, 281 nodes: over 32 x 1 SM x 8 waves, under 32 x 132
    target, tokens, parents, cu, dkw = tree_batch(trees, 600, draft="logits", seed=1)
    R = len(trees)
    got, want, kernels = both(lambda: dspark_ops.verify_tree(
        target, tokens, parents, cu, max_depth=max_depth_of(trees),
        temperature=torch.tensor([0.0, 1.0] * (R // 2) + [0.7] * (R % 2)), seed=torch.arange(R),
        position=torch.arange(R), **dkw))
    assert_same(got, want, f"verify_tree sms={sms}")
    assert int(cu[-1]) == 281
    assert ("verify_tree_row_stats_kernel" in kernels) == (sms == "132"), kernels


@pytest.mark.parametrize("n,V", [(40, 64), (1024, 64), (1025, 1028), (1025, 64)],
                         ids=["jump", "jump_1024", "serial_scratch", "ancestor_walks"])
def test_verify_tree_depth_limits(n, V, monkeypatch):
    """max_depth at its edge on each of the kernel's three depth checks
    (pointer jumping in shared memory up to 1024 nodes; beyond, one thread
    in the request's scratch row when n <= V, else a walk per node): a depth
    of exactly max_depth passes, one more is BAD_TREE, whether the deepest
    node comes first or last in index order. The jump, whose rounds meet at
    barriers, under the three thread schedules; the single-thread and
    per-node checks in natural order (each depth is one call, and the big
    trees cost the emulator seconds; the row pass is off: the walk checks)."""
    monkeypatch.setenv("DSPARK_TREE_ROW_PASS", "0")
    g = torch.Generator().manual_seed(n + V)
    for i, d in enumerate((1, 2, 5, 9, min(n - 2, 700))):  # 2^k + 1: a pointer-jumping round more than 2^k
        monkeypatch.setenv("CUEMU_SEED", str(i % 3 if n <= 1024 else 0))
        trees = [deep_tree(n, d, g, last) for last in (False, True)]
        trees += [deep_tree(n, d - 1, g, True)] if d > 1 else [[-1]]
        trees += [deep_tree(n, d + 1, g, last) for last in (False, True) if d + 1 < n]
        assert [max_depth_of([t]) for t in trees[:2]] == [d, d]
        target, tokens, parents, cu, _ = tree_batch(trees, V, draft=None, seed=d)
        R = len(trees)
        kw = dict(max_depth=d, temperature=torch.tensor([0.0, 0.9] * (R // 2) + [0.0] * (R % 2)),
                  seed=torch.arange(R), position=torch.arange(R))
        got, want, _ = both(functools.partial(dspark_ops.verify_tree, target, tokens, parents, cu, **kw))
        assert_same(got, want, f"depth {d}, n={n}")
        bad = dspark_ops.Status.BAD_TREE
        assert got.status.tolist() == [0, 0, 0] + [bad] * (R - 3), (d, got.status.tolist())


# --- markov_draft --------------------------------------------------------------

@pytest.mark.parametrize("filters", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,V", [(3, 1000), (2, 9000), (3, 1003)])  # 1003: rows off 4-element alignment
def test_markov_draft(R, V, dtype, filters, schedule):
    G, r = 4, 16
    g = torch.Generator().manual_seed(R + V)
    base = (torch.randn(R, G, V, generator=g) * 3).to(dtype)
    # Weights on a grid of 1/16: every product and partial sum of the bias w1[x] @ w2 is exact in fp32, so
    # the binding's GEMM (at::mm here, cuBLAS on a GPU) and the CPU op's ascending loop give the same bits.
    w1 = (torch.randint(-8, 9, (V, r), generator=g) / 16).to(dtype)
    w2 = (torch.randint(-8, 9, (r, V), generator=g) / 16).to(dtype)
    anchor = torch.randint(0, V, (R,), generator=g)
    kw = dict(temperature=torch.tensor([0.0, 0.9, 1.2][:R]), seed=torch.arange(R) + 4, position=torch.arange(R) * 2,
              num_draft=torch.tensor([4, 2, 3][:R], dtype=torch.int32))
    if filters:
        kw.update(top_k=torch.tensor([0, 25, 0][:R]), top_p=torch.tensor([1.0, 0.95, 0.8][:R]))
    got, want, kernels = both(lambda: dspark_ops.markov_draft(base, anchor, w1, w2, **kw))
    assert_same(got, want, f"markov_draft R={R} V={V} filters={filters}")
    assert ("split_select_pass_kernel" in kernels) == (filters and takes_split_select(R, V)), kernels


FUSED_CASES = [  # (R, V, rank, logits dtype, weights dtype, filters)
    (1, 1040, 16, torch.bfloat16, torch.bfloat16, False),  # 9 column tiles, the last with one warp of columns
    (3, 1040, 144, torch.float32, torch.float16, True),  # rank 144: a second, partial round of w2 fragments
    (17, 2064, 48, torch.float16, torch.bfloat16, True),  # 2 request tiles, the second with one request
    (32, 400, 64, torch.bfloat16, torch.bfloat16, True),  # 2 full request tiles
    (40, 400, 32, torch.bfloat16, torch.float16, False),  # 4 request tiles, the last empty
    (64, 272, 256, torch.bfloat16, torch.bfloat16, True),  # the largest group and A tile (64 x (256 + 8))
    (70, 272, 32, torch.bfloat16, torch.bfloat16, True),  # two request groups: 64 + 6
    (40, 272, 272, torch.bfloat16, torch.bfloat16, False),  # rank 272: groups of 32 requests (32 + 8)
    (20, 272, 1040, torch.float16, torch.float16, False),  # rank 1040: groups of 16 (16 + 4)
]


def fused_case_inputs(R, V, rank, dtype, wdtype, filters, G=3):
    """Inputs with every request state: sampled, greedy, filtered (top-k,
    top-p), stopping after 0..G steps, an out-of-range anchor."""
    g = torch.Generator().manual_seed(R * V + rank)
    base = (torch.randn(R, G, V, generator=g) * 3).to(dtype)
    w1 = (torch.randn(V, rank, generator=g) * 0.4).to(wdtype)
    w2 = (torch.randn(rank, V, generator=g) * 0.4).to(wdtype)
    anchor = torch.randint(0, V, (R,), generator=g)
    if R >= 5:
        anchor[3] = V + 1  # TOKEN_OUT_OF_RANGE: drafts nothing
    r = torch.arange(R)
    kw = dict(temperature=(r % 3) * 0.6, seed=r + 2, position=r * 3,
              num_draft=torch.tensor([G, 2, 0, 1], dtype=torch.int32)[r % 4])
    if filters:
        kw.update(top_k=(r % 2) * 9, top_p=torch.where(r % 4 == 1, 0.8, 1.0))
    return base, anchor, w1, w2, kw


@pytest.mark.parametrize("R,V,rank,dtype,wdtype,filters", FUSED_CASES,
                         ids=[f"R{c[0]}-V{c[1]}-r{c[2]}" for c in FUSED_CASES])
def test_markov_draft_fused_step(R, V, rank, dtype, wdtype, filters, schedule):
    """bf16/fp16 weights, V and rank multiples of 16: the bias is computed by
    WMMA inside the kernel that writes the row (markov_fused_step_kernel, a
    block per request group and 128 columns; the emulator's WMMA sums in
    ascending rank as the CPU op does, so the bits are the CPU's even off
    any grid), filtered requests through the mask-race kernel, a block per
    request merging the partials."""
    base, anchor, w1, w2, kw = fused_case_inputs(R, V, rank, dtype, wdtype, filters)
    got, want, kernels = both(lambda: dspark_ops.markov_draft(base, anchor, w1, w2, **kw))
    assert_same(got, want, f"markov_draft fused R={R} V={V} rank={rank}")
    assert {"markov_fused_step_kernel", "markov_finalize_fused_kernel"} <= kernels, kernels
    assert not {"markov_correct_kernel", "markov_finalize_kernel"} & kernels, kernels
    assert ("markov_mask_race_kernel" in kernels) == filters, kernels
    assert int((got.tokens >= 0).sum()) >= R // 2, "most requests draft"


def test_markov_draft_fused_step_fallbacks(monkeypatch):
    """Which weights take the fused step (whatever the batch: 65 requests
    too) and which fall back to the GEMM + correct kernel (or the fp32 bias
    kernel), each condition alone; the same results either way."""
    def case(R, V, rank, w1dtype=torch.bfloat16, w2dtype=torch.bfloat16, place=lambda w, n: w):
        g = torch.Generator().manual_seed(V + rank)
        base = torch.randn(R, 2, V, generator=g).to(torch.bfloat16)
        w1 = (torch.randint(-8, 9, (V, rank), generator=g) / 16).to(w1dtype)  # a grid: at::mm sums exactly too
        w2 = (torch.randint(-8, 9, (rank, V), generator=g) / 16).to(w2dtype)
        w1, w2 = place(w1, 1), place(w2, 2)
        anchor = torch.randint(0, V, (R,), generator=g)
        kw = dict(temperature=(torch.arange(R) % 2) * 0.7, seed=1, position=2)
        got, want, kernels = both(lambda: dspark_ops.markov_draft(base, anchor, w1, w2, **kw))
        assert_same(got, want, f"markov_draft R={R} V={V} rank={rank}")
        return "markov_fused_step_kernel" in kernels

    def offset(elems, which):  # a contiguous copy `elems` entries into a fresh buffer
        def place(w, n):
            if n != which:
                return w
            buf = torch.zeros(w.numel() + elems, dtype=w.dtype)
            out = buf[elems:].view(w.shape)
            out.copy_(w)
            return out
        return place

    def strided(w, n):  # w2 as a view of wider rows: not contiguous
        if n != 2:
            return w
        wide = torch.zeros(w.shape[0], w.shape[1] + 16, dtype=w.dtype)
        wide[:, :w.shape[1]] = w
        return wide[:, :w.shape[1]]

    assert case(5, 512, 32)
    assert case(65, 512, 16)  # two request groups
    assert case(40, 512, 272)  # groups of 32
    assert case(5, 512, 32, place=offset(8, 1))  # w1 16 bytes off: its 16-byte vectors still aligned
    assert not case(5, 512, 33)  # rank not a multiple of 16
    assert not case(5, 512, 8)  # rank below 16
    assert not case(5, 512, 1056)  # 16 rows of 1056 + 8 entries do not fit in shared memory
    assert not case(5, 1000, 32)  # V not a multiple of 16
    assert not case(5, 512, 32, torch.float32, torch.float32)  # fp32 weights: markov_bias_kernel
    assert not case(5, 512, 32, torch.bfloat16, torch.float16)  # mixed weight dtypes
    assert not case(5, 512, 32, place=strided)  # w2 not contiguous
    assert not case(5, 512, 32, place=offset(8, 2))  # w2 16 bytes off a 32-byte boundary
    assert not case(5, 512, 32, place=offset(4, 1))  # w1 8 bytes off a 16-byte boundary
    monkeypatch.setenv("DSPARK_MARKOV_FUSED", "0")
    assert not case(5, 512, 32)


@pytest.mark.parametrize("R,V,rank", [(11, 1000, 37), (3, 1003, 16)])  # 11: two request groups of the kernel
def test_markov_draft_fp32_bias_is_the_cpu_sum(R, V, rank, schedule):
    """fp32 weights off any grid: markov_bias_kernel rounds each product and
    adds in ascending rank as the CPU op does, so the written logits and the
    tokens are the CPU op's bit for bit (cuBLAS, which this kernel replaces
    for fp32 weights, sums in its own order, and in TF32 if a user allows it)."""
    g = torch.Generator().manual_seed(R * V + rank)
    base = torch.randn(R, 3, V, generator=g) * 2
    w1, w2 = torch.randn(V, rank, generator=g), torch.randn(rank, V, generator=g) * 0.3
    anchor = torch.randint(0, V, (R,), generator=g)
    kw = dict(temperature=(torch.rand(R, generator=g) + 0.5) * (torch.arange(R) % 4 != 0), seed=7, position=3)
    got, want, kernels = both(lambda: dspark_ops.markov_draft(base, anchor, w1, w2, **kw))
    assert_same(got, want, f"markov_draft fp32 weights R={R} V={V} rank={rank}")
    assert "markov_bias_kernel" in kernels, kernels


@pytest.mark.parametrize("R,V,filters", [(3, 9000, True), (40, 1003, False)])  # 3 x 9000: split select's state too
def test_markov_draft_out_with_a_workspace(R, V, filters, schedule):
    """The .out form with a workspace: every scratch buffer (bias rows,
    gathered bf16 w1 rows, state, partials, split select) carved from it;
    the same results as the CPU op. A workspace one byte short is refused."""
    G, r = 3, 16
    g = torch.Generator().manual_seed(R * V)
    base = (torch.randn(R, G, V, generator=g) * 3).to(torch.bfloat16)
    w1 = (torch.randint(-8, 9, (V, r), generator=g) / 16).to(torch.bfloat16)  # on a grid: exact sums (see above)
    w2 = (torch.randint(-8, 9, (r, V), generator=g) / 16).to(torch.bfloat16)
    anchor = torch.randint(0, V, (R,), generator=g)
    kw = dict(temperature=(torch.arange(R) % 3) * 0.5, seed=torch.arange(R), position=torch.full((R,), 3))
    if filters:
        kw.update(top_k=torch.tensor([0, 25, 4][:R]), top_p=torch.tensor([1.0, 0.9, 0.8][:R]))
    need = dspark_ops.workspace_size("markov_draft", num_requests=R, vocab_size=V, rank=r)
    ws = torch.full((need,), 0xAB, dtype=torch.uint8)  # stale bytes: nothing may be read before it is written
    got, want, kernels = both(lambda: dspark_ops.markov_draft(base, anchor, w1, w2, workspace=ws, **kw))
    assert_same(got, want, f"markov_draft R={R} V={V} with a workspace")
    assert ("split_select_pass_kernel" in kernels) == (filters and takes_split_select(R, V)), kernels
    with cuda_emu_build.emulated_ops(), pytest.raises(ValueError, match=f"workspace must hold at least {need}"):
        dspark_ops.markov_draft(base, anchor, w1, w2, workspace=ws[:need - 1], **kw)


# --- schedule_verify -----------------------------------------------------------

@pytest.mark.parametrize("mode,kw", [("early_stop", {}), ("threshold", dict(threshold=0.4)),
                                     ("budget", dict(budget=600)), ("global", dict(allow_lossy=True)),
                                     ("budget_all_but_one", {})])  # every rank but the last: the whole ranking
@pytest.mark.parametrize("R,G", [(300, 7), (256, 8), (1, 7), (3, 1), (1100, 8)])
def test_schedule_verify(R, G, mode, kw, schedule):
    """Both ranking kernels (shared memory up to 2048 slots; beyond, the
    workspace with 2048-slot tiles in shared memory: 2 and 8 tiles here) and
    threshold's kernel without ranking, against the CPU op."""
    conf, n, sps = random_case(R, G, 1500 + R, ties=True)
    if mode == "budget_all_but_one":
        mode, kw = "budget", dict(budget=max(int(n.clamp(0, G).sum()) - 1, 0))
    emu, got, kernels = both(lambda: dspark_ops.schedule_verify(conf, n, sps, mode=mode, **kw))
    assert torch.equal(emu, got), f"schedule_verify {mode}"
    want = {"schedule_threshold_kernel"} if mode == "threshold" else \
        {"schedule_verify_shared_kernel" if R * G <= 2048 else "schedule_verify_kernel"}
    assert kernels == want, kernels
    if mode == "early_stop" and R >= 256:
        assert 0 < int(got.sum()) < int(n.clamp(0, G).sum()), "the case must stop early somewhere"


# --- workspaces ------------------------------------------------------------------

def first_line(error):
    return str(error.value).splitlines()[0]


def ws_need(case):
    """The bytes the CPU op names when refusing a one-byte workspace."""
    with pytest.raises(ValueError, match="workspace must hold at least") as e:
        case.run(torch.empty(1, dtype=torch.uint8))
    return int(first_line(e).split("at least ")[1].split()[0])


WS_CASES = [(op, "auto") for op in test_workspace_checks.CASES] + [
    (op, row_pass) for op in ("verify_tree", "verify_tree_no_draft") for row_pass in ("0", "1")]


@pytest.mark.parametrize("op,row_pass", WS_CASES)
def test_workspace_checks_match_the_cpu_ops(op, row_pass, monkeypatch):
    """The CPU bindings check a workspace as the CUDA bindings do: each bad
    workspace of test_workspace_checks is refused by both with the same
    message, and both accept exactly the byte count a refusal names
    (verify_tree's, whatever DSPARK_TREE_ROW_PASS, since a workspace short of
    the row pass's room runs without it)."""
    monkeypatch.setenv("DSPARK_TREE_ROW_PASS", row_pass)
    monkeypatch.setenv("CUEMU_SEED", "0")
    case = test_workspace_checks.CASES[op]("cpu")
    need = ws_need(case)
    for name, ws, _ in test_workspace_checks.bad_workspaces(case, "cpu") + [
            ("need_minus_one", torch.empty(need - 1, dtype=torch.uint8), None)]:
        with pytest.raises(ValueError) as cpu:
            case.run(ws)
        with cuda_emu_build.emulated_ops(), pytest.raises(ValueError) as emu:
            case.run(ws)
        assert first_line(emu) == first_line(cpu), name
    want = case.run(None)
    for ws in (torch.empty(need, dtype=torch.uint8), torch.full((case.size,), 0xAB, dtype=torch.uint8)):
        with cuda_emu_build.emulated_ops():
            got = case.run(ws)
        assert_same(got, want, f"{op} with a workspace of {ws.numel()} bytes")


@pytest.mark.parametrize("draft", ["logits", None])
def test_tree_row_pass_runs_only_with_its_room(draft, monkeypatch):
    """With DSPARK_TREE_ROW_PASS=1 the emulated binding runs the row pass
    from a workspace sized with num_nodes, and without it from one sized
    without (which the CPU op accepts too): same results either way."""
    monkeypatch.setenv("DSPARK_TREE_ROW_PASS", "1")
    case = test_workspace_checks._verify_tree("cpu", draft=draft)
    want = case.run(None)
    full = dspark_ops.workspace_size("verify_tree", num_requests=3, vocab_size=211, num_nodes=10)
    for size, row_pass in ((ws_need(case), False), (case.size, False), (full - 1, False), (full, True)):
        ws = torch.empty(size, dtype=torch.uint8)
        case.run(ws)  # the CPU op accepts it
        launched()
        with cuda_emu_build.emulated_ops():
            got = case.run(ws)
        assert ("verify_tree_row_stats_kernel" in launched()) == row_pass, size
        assert_same(got, want, f"verify_tree with a workspace of {size} bytes")


# --- keep_key, kv_compact, commit_tokens -------------------------------------------

@pytest.mark.parametrize("R,V", [(2, 9001), (40, 300)])
def test_keep_key(R, V, schedule):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(R, V, generator=g) * 2
    args = (torch.rand(R, generator=g) + 0.2, torch.randint(0, 80, (R,), generator=g, dtype=torch.int32),
            torch.rand(R, generator=g) * 0.5 + 0.5)
    # keep_key has no wrapper: called through the handle emulated_ops re-routes
    got, want, kernels = both(lambda: dspark_ops.ops._ops.keep_key(logits, *args))
    assert torch.equal(got, want)
    assert ("split_select_pass_kernel" in kernels) == takes_split_select(R, V), kernels


KV_CASES = [test_kv_compact.test_many_layers_and_overlapping_keeps, test_kv_compact.test_paged_caches,
            test_kv_compact.test_chain_keep_moves_nothing_and_updates_lengths,
            test_kv_compact.test_bad_values_abort_only_their_request,
            test_kv_compact.test_paged_block_table_out_of_range,
            test_kv_compact.test_many_kept_entries_dense_overlap_heads_first_bytes,
            test_kv_compact.test_commit_tokens_matches_reference_over_steps,
            test_kv_compact.test_commit_tokens_stop_and_max_len,
            test_kv_compact.test_commit_tokens_bad_device_values_finish_with_an_error]


@pytest.mark.parametrize("case", KV_CASES, ids=lambda f: f.__name__[5:])
def test_kv_compact_and_commit_tokens(case, schedule):
    """test_kv_compact's cases (each against the reference), with the ops
    routed to the emulated kernels."""
    launched()
    with cuda_emu_build.emulated_ops():
        case()
    assert launched() & {"kv_compact_kernel", "commit_tokens_kernel"}


@pytest.mark.parametrize("dtype,H,D", [(torch.float16, 3, 5), (torch.uint8, 1, 3), (torch.bfloat16, 8, 128)])
@pytest.mark.parametrize("heads_first", [False, True])
def test_kv_compact_layouts(dtype, H, D, heads_first, schedule):
    launched()
    with cuda_emu_build.emulated_ops():
        test_kv_compact.test_matches_reference(dtype, H, D, heads_first)
    assert launched() == {"kv_compact_kernel"}
