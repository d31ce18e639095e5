"""kv_compact and commit_tokens on CUDA: byte-identical to the CPU op;
overlapping moves under many blocks; graph capture with a KVLayout."""
import pytest
import torch

import dspark_ops
from dspark_ops import reference as ref
from kv_helpers import random_caches, random_keep

pytestmark = pytest.mark.cuda


def compare(caches, base, app, keep, nk, **kw):
    cuda_caches = [c.cuda() for c in caches]
    want_len, want_status = dspark_ops.kv_compact(caches, base, app, keep, nk, **kw)
    ckw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    got_len, got_status = dspark_ops.kv_compact(cuda_caches, base.cuda(), app.cuda(), keep.cuda(), nk.cuda(), **ckw)
    assert torch.equal(got_len.cpu(), want_len) and torch.equal(got_status.cpu(), want_status)
    for a, b in zip(cuda_caches, caches):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("dtype,H,D", [(torch.float16, 3, 5), (torch.uint8, 1, 3), (torch.bfloat16, 8, 128),
                                       (torch.float32, 4, 6)])
@pytest.mark.parametrize("heads_first", [False, True])
def test_cuda_matches_cpu(dtype, H, D, heads_first):
    g = torch.Generator().manual_seed(H + D)
    R, S, K, L = 16, 40, 12, 6
    app, keep, nk = random_keep(R, K, 16, g)
    base = torch.randint(0, S - 16, (R,), generator=g, dtype=torch.int32)
    compare(random_caches(L, R, S, H, D, dtype, g, heads_first), base, app, keep, nk, heads_first=heads_first)


def test_cuda_paged():
    g = torch.Generator().manual_seed(2)
    R, bs, H, D, L, max_blocks = 8, 16, 8, 64, 4, 4
    num_blocks = R * max_blocks
    caches = [torch.randn(num_blocks, bs, H, D, generator=g).bfloat16() for _ in range(L)]
    block_table = torch.randperm(num_blocks, generator=g).reshape(R, max_blocks).to(torch.int32)
    app, keep, nk = random_keep(R, 16, 20, g)
    compare(caches, torch.randint(0, 40, (R,), generator=g, dtype=torch.int32), app, keep, nk, block_table=block_table)


def test_cuda_overlapping_moves_repeatedly():
    # Every request keeps a dense overlapping run (keep = 1..16 or odd offsets):
    # a parallel forward copy would read overwritten entries.
    g = torch.Generator().manual_seed(3)
    R, S, H, D, L = 64, 48, 8, 128, 4
    for trial in range(10):
        caches = random_caches(L, R, S, H, D, torch.bfloat16, g)
        base = torch.randint(0, 8, (R,), generator=g, dtype=torch.int32)
        app = torch.full((R,), 32, dtype=torch.int32)
        keep = (torch.arange(16, dtype=torch.int32) + 1 + (trial % 3)).expand(R, 16).contiguous()
        nk = torch.full((R,), 16, dtype=torch.int32)
        want, _, _ = ref.kv_compact(caches, base, app, keep, nk)
        cuda_caches = [c.cuda() for c in caches]
        dspark_ops.kv_compact(cuda_caches, base.cuda(), app.cuda(), keep.cuda(), nk.cuda())
        assert all(torch.equal(a.cpu(), b) for a, b in zip(cuda_caches, want)), f"trial {trial}"


def test_cuda_layout_graph_capture():
    g = torch.Generator().manual_seed(4)
    R, S, H, D, L = 8, 32, 4, 64, 32
    caches = [c.cuda() for c in random_caches(L, R, S, H, D, torch.float16, g)]
    layout = dspark_ops.KVLayout(caches)
    base = torch.full((R,), 4, dtype=torch.int32, device="cuda")
    app = torch.full((R,), 8, dtype=torch.int32, device="cuda")
    keep = torch.tensor([0, 2, 5, -1, -1, -1, -1, -1], dtype=torch.int32, device="cuda").expand(R, 8).contiguous()
    nk = torch.full((R,), 3, dtype=torch.int32, device="cuda")
    new_len = torch.empty(R, dtype=torch.int32, device="cuda")
    status = torch.empty(R, dtype=torch.int32, device="cuda")
    host = [c.cpu() for c in caches]
    want, _, _ = ref.kv_compact(host, base.cpu(), app.cpu(), keep.cpu(), nk.cpu())
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        dspark_ops.kv_compact(layout, base, app, keep, nk, new_len, status=status)
    graph.replay()
    assert all(torch.equal(a.cpu(), b) for a, b in zip(caches, want))
    assert new_len.tolist() == [7] * R
    # Without the layout each call copies its layer table from pinned host memory the allocator reuses: a replay
    # would copy whatever is there by then (wild layer pointers). Refused during capture, before any CUDA work.
    with pytest.raises(ValueError, match="pass layout=KVLayout"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            dspark_ops.kv_compact(caches, base, app, keep, nk, new_len, status=status)


def test_cuda_commit_tokens_matches_cpu():
    g = torch.Generator().manual_seed(5)
    R, W, T = 300, 6, 20
    cpu = dspark_ops.RequestState.new(torch.zeros(R, dtype=torch.int32), torch.arange(R),
                                      torch.randint(1, T, (R,), generator=g, dtype=torch.int32), T)
    gpu = dspark_ops.RequestState(*(getattr(cpu, f).clone().cuda() for f in cpu.__dataclass_fields__))
    stops = torch.tensor([2], dtype=torch.int32)
    for _ in range(6):
        tokens = torch.randint(0, 10, (R, W), generator=g, dtype=torch.int32)
        emitted = torch.randint(0, W + 1, (R,), generator=g, dtype=torch.int32)
        status = (torch.rand(R, generator=g) < 0.05).to(torch.int32) * 2
        dspark_ops.commit_tokens(cpu, tokens, emitted, status, stop_tokens=stops)
        dspark_ops.commit_tokens(gpu, tokens.cuda(), emitted.cuda(), status.cuda(), stop_tokens=stops.cuda())
    for f in cpu.__dataclass_fields__:
        assert torch.equal(getattr(gpu, f).cpu(), getattr(cpu, f)), f


def test_cuda_many_kept_entries_dense_overlap_heads_first_bytes():
    g = torch.Generator().manual_seed(10)
    R, S, H, D = 4, 1300, 3, 5
    caches = random_caches(3, R, S, H, D, torch.uint8, g, heads_first=True)
    base = torch.tensor([3, 0, 7, 1], dtype=torch.int32)
    app = torch.tensor([1200, 700, 600, 900], dtype=torch.int32)
    keep = torch.full((R, 600), -1, dtype=torch.int32)
    keep[0] = torch.arange(1, 1200, 2, dtype=torch.int32)[:600]
    keep[1, :450] = torch.arange(1, 451, dtype=torch.int32)
    keep[2, :300] = torch.arange(0, 600, 2, dtype=torch.int32)
    keep[3, :257] = torch.arange(3, 260, dtype=torch.int32)
    nk = torch.tensor([600, 450, 300, 257], dtype=torch.int32)
    compare(caches, base, app, keep, nk, heads_first=True)


def test_cuda_paged_invalid_request_untouched_beside_valid_ones():
    g = torch.Generator().manual_seed(11)
    R, bs, H, D, max_blocks = 3, 4, 2, 8, 4
    caches = [torch.randn(R * max_blocks, bs, H, D, generator=g).half() for _ in range(3)]
    block_table = torch.arange(R * max_blocks, dtype=torch.int32).reshape(R, max_blocks)
    block_table[1, 2] = 99  # request 1 reaches an out-of-range block
    base = torch.tensor([2, 2, 2], dtype=torch.int32)
    app = torch.tensor([8, 8, 8], dtype=torch.int32)
    keep = torch.tensor([[1, 4, 7], [1, 4, 7], [0, 5, 6]], dtype=torch.int32)
    nk = torch.tensor([3, 3, 3], dtype=torch.int32)
    compare(caches, base, app, keep, nk, block_table=block_table)
