"""packed_linear: the CPU small-batch GEMM the built-in model's decode and
verify passes run on (csrc/cpu/packed_gemm.h)."""
import pytest
import torch

from dspark_ops.packed_linear import PACK_WIDTH, pack_linear_weight, packed_linear, packed_linear_kernel

AVX512 = packed_linear_kernel() == "avx512"
needs_avx512 = pytest.mark.skipif(not AVX512, reason="compares the AVX-512 path, which this CPU lacks")


def data(M, N, K, seed=0, residual=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    r = torch.randn(M, N, generator=g) if residual else None
    return x, w, r


def reference(x, w, r):
    y = x.double() @ w.double().T
    return (y + r.double() if r is not None else y).float()


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
    torch.testing.assert_close(got, reference(x, w, r), rtol=1e-5, atol=1e-5)
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
def test_avx512_and_portable_paths_agree_bitwise(monkeypatch, residual):
    x, w, r = data(11, 200, 77, seed=8, residual=residual)
    p = pack_linear_weight(w)
    fast = packed_linear(x, p, 200, r)
    monkeypatch.setenv("DSPARK_PACKED_LINEAR", "portable")
    assert packed_linear_kernel() == "portable"
    assert torch.equal(packed_linear(x, p, 200, r), fast)


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
    (dict(x=torch.zeros(2, 8, dtype=torch.float64)), "input must have dtype Float, got Double"),
    (dict(x=torch.zeros(2, 4, 8)), r"input must have shape \[rows, in_features\], got \[2, 4, 8\]"),
    (dict(n=0), "out_features must be >= 1, got 0"),
    (dict(n=65), r"packed_weight must have shape \[2, 8, 64\] \(pack_linear_weight of a \[65, 8\] weight\), "
                 r"got \[1, 8, 64\]"),
    (dict(x=torch.zeros(2, 9)), r"packed_weight must have shape \[1, 9, 64\]"),
    (dict(r=torch.zeros(2, 10)), r"residual must have shape \[2, 5\], got \[2, 10\]"),
    (dict(r=torch.zeros(2, 5, dtype=torch.float16)), "residual must have dtype Float, got Half"),
])
def test_errors_name_the_argument(bad, message):
    x, p, n, r = bad.get("x", torch.zeros(2, 8)), pack_linear_weight(torch.zeros(5, 8)), bad.get("n", 5), bad.get("r")
    with pytest.raises(ValueError, match="dspark_ops.packed_linear: " + message):
        packed_linear(x, p, n, r)
    with pytest.raises(ValueError, match="dspark_ops.packed_linear: " + message):  # the fake kernel: same text
        with torch._subclasses.FakeTensorMode():
            packed_linear(torch.empty(x.shape, dtype=x.dtype), torch.empty(p.shape), n,
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
