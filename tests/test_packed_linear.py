"""packed_linear: the CPU small-batch GEMM the built-in model's decode and
verify passes run on (csrc/cpu/packed_gemm.h)."""
import pytest
import torch

from dspark_ops import reference as ref
from dspark_ops.packed_linear import (PACK_WIDTH, pack_linear_weight, packed_linear, packed_linear_fast,
                                     packed_linear_kernel)

AVX512 = packed_linear_kernel() == "avx512"  # the C++ op's own answer
needs_avx512 = pytest.mark.skipif(not AVX512, reason="compares the AVX-512 path, which this CPU lacks")


def data(M, N, K, seed=0, residual=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    r = torch.randn(M, N, generator=g) if residual else None
    return x, w, r


def test_pack_layout():
    w = torch.randn(130, 7)
    p = pack_linear_weight(w)
    assert p.shape == (3, 7, PACK_WIDTH) and p.is_contiguous()
    for n in (0, 63, 64, 129):
        assert torch.equal(p[n // 64, :, n % 64], w[n])
    assert bool((p[2, :, 130 - 128:] == 0).all())  # padding past N


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 259, 192), (5, 63, 7), (6, 64, 33), (7, 65, 192),
                                   (13, 1000, 48), (40, 130, 512), (3, 672, 192),
                                   (101, 70, 33)])
def test_matches_float64_reference(M, N, K, residual):
    x, w, r = data(M, N, K, seed=M * 1000 + N + K, residual=residual)
    x0, r0 = x.clone(), (r.clone() if r is not None else None)
    got = packed_linear(x, pack_linear_weight(w), N, r)
    assert got.shape == (M, N) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref.packed_linear(x, w, r), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x0) and (r is None or torch.equal(r, r0))  # inputs untouched


def test_each_row_is_bitwise_independent_of_the_batch():
    """A verify pass's rows equal the one-row (decode) calls bit for bit, in
    any tile and row block (rows 0..52 span tiles of 6 and blocks of 48)."""
    x, w, r = data(53, 300, 192, seed=5)
    p = pack_linear_weight(w)
    full = packed_linear(x, p, 300, r)
    for m in range(53):
        assert torch.equal(packed_linear(x[m:m + 1], p, 300, r[m:m + 1]), full[m:m + 1]), m
    assert torch.equal(packed_linear(x[4:10], p, 300, r[4:10]), full[4:10])


@needs_avx512
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("M,N,K", [(11, 200, 77), (1, 15, 3), (53, 129, 17), (6, 64, 192), (4, 7, 9), (2, 40, 5)])
def test_avx512_avx2_and_portable_paths_agree_bitwise(monkeypatch, M, N, K, residual):
    x, w, r = data(M, N, K, seed=8, residual=residual)
    p = pack_linear_weight(w)
    assert packed_linear_fast()
    fast = packed_linear(x, p, N, r)
    for path in ("avx2", "portable"):
        monkeypatch.setenv("DSPARK_PACKED_LINEAR", path)
        assert packed_linear_kernel() == path  # the C++ op reads the switch
        assert packed_linear_fast() == (path == "avx2")
        assert torch.equal(packed_linear(x, p, N, r), fast), path


def test_strided_and_empty_inputs():
    x, w, r = data(6, 70, 40, seed=2)
    p = pack_linear_weight(w)
    wide = torch.randn(6, 100)
    wide[:, 10:50] = x  # rows contiguous, row stride 100
    assert torch.equal(packed_linear(wide[:, 10:50], p, 70, r), packed_linear(x, p, 70, r))
    xt = x.t().contiguous().t()  # column-major: copied
    assert torch.equal(packed_linear(xt, p, 70, r[:, :].t().contiguous().t()), packed_linear(x, p, 70, r))
    empty = packed_linear(x[:0], p, 70)
    assert empty.shape == (0, 70)
    k0 = packed_linear(torch.zeros(3, 0), pack_linear_weight(torch.zeros(70, 0)), 70, r[:3])
    assert torch.equal(k0, r[:3])


@pytest.mark.parametrize("bad,message", [
    (dict(x=torch.zeros(2, 8, dtype=torch.float64)), "input must have dtype torch.float32, got torch.float64"),
    (dict(x=torch.zeros(2, 4, 8)), r"input must have shape \[rows, in_features\], got \[2, 4, 8\]"),
    (dict(n=0), "out_features must be >= 1, got 0"),
    (dict(n=65), r"packed_weight must have shape \[2, 8, 64\] \(pack_linear_weight of a \[65, 8\] weight\), "
                 r"got \[1, 8, 64\]"),
    (dict(x=torch.zeros(2, 9)), r"packed_weight must have shape \[1, 9, 64\]"),
    (dict(r=torch.zeros(2, 10)), r"residual must have shape \[2, 5\], got \[2, 10\]"),
    (dict(r=torch.zeros(2, 5, dtype=torch.float16)), "residual must have dtype torch.float32, got torch.float16"),
    (dict(p=torch.zeros(1, 64, 8).transpose(1, 2)), "packed_weight must be contiguous"),
])
def test_errors_name_the_argument(bad, message):
    x, n, r = bad.get("x", torch.zeros(2, 8)), bad.get("n", 5), bad.get("r")
    p = bad.get("p", pack_linear_weight(torch.zeros(5, 8)))
    with pytest.raises(ValueError, match="dspark_ops.packed_linear: " + message):
        packed_linear(x, p, n, r)
    with pytest.raises(ValueError, match="dspark_ops.packed_linear: " + message):  # the fake kernel: same text
        with torch._subclasses.FakeTensorMode():
            packed_linear(torch.empty_strided(x.shape, x.stride(), dtype=x.dtype),
                          torch.empty_strided(p.shape, p.stride()), n,
                          None if r is None else torch.empty(r.shape, dtype=r.dtype))


def test_opcheck_and_compile():
    x, w, r = data(6, 100, 24, seed=3)
    p = pack_linear_weight(w)
    torch.library.opcheck(torch.ops.dspark_ops.packed_linear.default, (x, p, 100, r))
    torch.library.opcheck(torch.ops.dspark_ops.packed_linear.default, (x, p, 100, None))

    def layer(a, b):
        return torch.relu(packed_linear(a, p, 100, b)) * 2

    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, r)
    assert torch.equal(got, layer(x, r))


@needs_avx512
def test_benchmark_script_runs(tmp_path):
    """bench/bench_packed_linear.py at one row count, a few iterations: it
    checks the two GEMMs agree and writes its JSON."""
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.bench_packed_linear import SHAPES, main
    out = tmp_path / "b.json"
    assert main(["--threads", "1", "--rows", "2", "--iters", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(SHAPES) and all(r["packed_us"] > 0 and r["M"] == 2 for r in rows)


def test_gradients_of_input_and_residual():
    x, w, r = data(7, 70, 20, seed=4)
    x.requires_grad_(True)
    r.requires_grad_(True)
    g = torch.randn(7, 70)
    packed_linear(x, pack_linear_weight(w), 70, r).backward(g)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    assert torch.equal(r.grad, g)
    p = pack_linear_weight(w).requires_grad_(True)
    with pytest.raises(NotImplementedError, match="no gradient for packed_weight"):
        packed_linear(x, p, 70, r)


def _float32_model():
    from dspark_ops.decoding import BuiltinModel, ModelConfig
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, dim=80, n_layers=2, n_heads=4, n_kv_heads=2, hidden=136, max_seq_len=128)
    return BuiltinModel(cfg).eval()


def _forwards(model):
    """Logits of a ragged prefill, a decode step, a 6-token verify pass and
    a ragged 2-request pass over caches of those prefixes."""
    out = []
    with torch.inference_mode():
        cache = model.new_cache(2, 64)
        out.append(model(torch.randint(0, 300, (37,), generator=torch.Generator().manual_seed(1)),
                         torch.cat([torch.arange(30), torch.arange(7)]), torch.tensor([0, 30, 37], dtype=torch.int32),
                         cache)[0])
        out.append(model(torch.tensor([5, 9]), torch.tensor([30, 7]), torch.tensor([0, 1, 2], dtype=torch.int32),
                         cache)[0])
        out.append(model(torch.arange(12) + 3, torch.cat([torch.arange(31, 37), torch.arange(8, 14)]),
                         torch.tensor([0, 6, 12], dtype=torch.int32), cache)[0])
        out.append(model(torch.arange(4) + 40, torch.cat([torch.arange(37, 40), torch.tensor([14])]),
                         torch.tensor([0, 3, 4], dtype=torch.int32), cache)[0])
    return out


@needs_avx512
def test_builtin_model_float32_forward_on_packed_linear(monkeypatch):
    """The built-in model's CPU float32 inference forward (prefill, decode,
    verify, ragged) on packed_linear gives torch's GEMM's logits, and its
    packed weights follow weight updates and go with clear_inference_cache."""
    import dspark_ops.decoding.model as model_mod
    calls = []
    real = model_mod._packed_linear
    monkeypatch.setattr(model_mod, "_packed_linear", lambda *a: calls.append(1) or real(*a))
    model = _float32_model()
    for step in range(2):
        calls.clear()
        got = _forwards(model)
        assert len(calls) == 4 * (2 * 4 + 1)  # every GEMM of every forward
        monkeypatch.setenv("DSPARK_PACKED_LINEAR", "portable")  # the model then keeps torch's GEMMs
        want = _forwards(model)
        monkeypatch.delenv("DSPARK_PACKED_LINEAR")
        assert len(calls) == 4 * 9
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # an in-place update: the fused and packed weights are rebuilt
            model.blocks[0].w1.weight.mul_(1.5)
            model.head.weight.add_(0.01)
    assert all(blk._fused[3][0] is not None for blk in model.blocks)
    model.clear_inference_cache()
    assert all(blk._fused is None for blk in model.blocks) and model._head is None


@needs_avx512
def test_dspark_head_inference_on_packed_linear(monkeypatch):
    """DSparkHead's inference forms (context fuse, block MLP) on
    packed_linear equal them on torch's GEMM (float32, inference mode)."""
    from dspark_ops.decoding import DSparkConfig, DSparkHead
    torch.manual_seed(3)
    head = DSparkHead(DSparkConfig(dim=48, vocab_size=90, hidden_layers=(0, 1), block=4, mlp_hidden=40, rank=6))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.3)
    head.eval()
    feats, anchor, embed = torch.randn(3, 2, 2, 48), torch.randint(0, 90, (3,)), torch.randn(90, 48)

    def run():
        with torch.inference_mode():
            c = head.infer_context(feats)
            return c, head.infer_block(c[:, -1], anchor, embed, 4)
    got = run()
    assert head._fused[3][0] is not None  # the packed path ran
    monkeypatch.setenv("DSPARK_PACKED_LINEAR", "portable")
    want = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
