"""The benchmark's SGLang peer (bench/sglang_peer.py, tools/pack_sglang.py)
runs only in a GPU session, with no second try: what can be checked without
a GPU is checked here -- the tree layout SGLang reads, the inputs the
benchmark hands its kernels (shapes and dtypes as SGLang's TensorMatcher
checks them), the nvcc command, and the build step's Python in
tools/gpu_check.sh."""
import ast
import re
from pathlib import Path

import pytest
import torch

from bench import sglang_peer, tree_bench

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("nodes", [16, 64])
def test_linked_lists_walk_to_the_children_table(nodes):
    parents = tree_bench.eagle_parents(nodes)
    kids = tree_bench.children_table(parents)
    first, sibling = sglang_peer.linked_lists(kids, 3, "cpu")
    assert first.shape == (3, nodes) and first.dtype == torch.int64 and torch.equal(first[0], first[2])
    for u in range(nodes):
        walked, c = [], int(first[1, u])
        while c != -1:
            walked.append(c)
            c = int(sibling[1, c])
        assert walked == kids[u]


class StubPeer:
    """Checks what SGLang's entry points check, records the calls."""

    def __init__(self, R, N, S, V):
        self.R, self.N, self.S, self.V, self.calls = R, N, S, V, []

    def _common(self, predicts, accept_index, accept_num, cands, index, nxt, sib):
        R, N = self.R, self.N
        for t in (cands, index, nxt, sib):
            assert t.shape == (R, N) and t.dtype == torch.int64
        assert predicts.shape == (R * N,) and predicts.dtype == torch.int32
        assert accept_index.shape == (R, self.S) and accept_index.dtype == torch.int32
        assert accept_num.shape == (R,) and accept_num.dtype == torch.int32
        accept_num.fill_(1)

    def greedy(self, predicts, accept_index, accept_num, cands, index, nxt, sib, target_predict):
        self._common(predicts, accept_index, accept_num, cands, index, nxt, sib)
        assert target_predict.shape == (self.R, self.N) and target_predict.dtype == torch.int64
        self.calls.append("greedy")

    def sample(self, predicts, accept_index, accept_num, cands, index, nxt, sib, coins, final, probs, draft):
        self._common(predicts, accept_index, accept_num, cands, index, nxt, sib)
        assert coins.shape == (self.R, self.N) and final.shape == (self.R,) and coins.dtype == torch.float32
        assert probs.shape == draft.shape == (self.R, self.N, self.V) and probs.dtype == draft.dtype == torch.float32
        torch.testing.assert_close(probs.sum(-1), torch.ones(self.R, self.N))
        assert not draft.any()
        self.calls.append("sample")


@pytest.mark.parametrize("mode", ["deterministic", "greedy", "iid"])
def test_the_benchmark_hands_sglang_its_inputs(monkeypatch, mode):
    R, nodes, V = 3, 16, 101
    case = tree_bench.Case(R, nodes, V, "cpu")
    gen = torch.Generator().manual_seed(0)
    bufs = [tree_bench.make_inputs(R, case.parents_list, V, torch.float32, mode, "cpu", gen) for _ in range(2)]
    res = case.run(bufs[0], mode)
    stub = StubPeer(R, nodes, case.max_depth + 1, V)
    monkeypatch.setattr(sglang_peer, "load", lambda: stub)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    impls = {}
    checks = tree_bench.add_sglang(impls, case, bufs, mode, res)
    if mode == "iid":  # no SGLang counterpart
        assert impls == {} and checks == {} and stub.calls == []
        return
    (name,) = impls
    assert name.startswith("sglang ") and name in checks
    impls[name](1)  # the timed call, on the second buffer
    assert stub.calls == ["greedy" if mode == "greedy" else "sample"] * 2


def test_nvcc_command_uses_sglangs_jit_flags():
    cmd = sglang_peer.nvcc_command(Path("/src"), Path("/out.so"), [Path("/inc")], Path("/lib"))
    for flag in ("-std=c++20", "-O3", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a",
                 "-DSGL_CUDA_ARCH=900", "-I/src/include", "-I/src/csrc", "-I/inc", "-ltvm_ffi",
                 str(sglang_peer.WRAPPER)):
        assert flag in cmd, flag
    assert sglang_peer.WRAPPER.exists()


def test_gpu_check_builds_the_peer_with_parseable_python():
    script = (ROOT / "tools" / "gpu_check.sh").read_text()
    bodies = [b for b in re.findall(r'python3 -c "(.*?)"', script, re.S) if "sglang_peer" in b]
    assert bodies, "gpu_check.sh: the SGLang peer's build step was not found"
    for body in bodies:
        ast.parse(body)


def test_load_without_a_built_peer_is_none(monkeypatch):
    monkeypatch.delenv(sglang_peer.ENV, raising=False)
    assert sglang_peer.load() is None
