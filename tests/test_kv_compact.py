"""kv_compact, tree_to_keep and commit_tokens on the CPU against the
reference (DESIGN §3)."""
import pytest
import torch

import dspark_ops
from dspark_ops import Status
from dspark_ops import reference as ref
from kv_helpers import random_caches, random_keep


def run_both(caches, base, app, keep, nk, **kw):
    want_caches, want_len, want_status = ref.kv_compact(caches, base, app, keep, nk, **kw)
    new_len = torch.full_like(base, 0x5A5A)
    status = torch.full_like(base, 0x5A5A)
    got_len, got_status = dspark_ops.kv_compact(caches, base, app, keep, nk, new_len, status=status, **kw)
    assert torch.equal(got_len, want_len) and torch.equal(got_status, want_status)
    for l, (c, w) in enumerate(zip(caches, want_caches)):  # nothing outside the kept ranges changes
        assert torch.equal(c, w), f"layer {l}"
    return got_status


@pytest.mark.parametrize("dtype,H,D", [(torch.float16, 3, 5), (torch.float32, 2, 7), (torch.uint8, 1, 3),
                                       (torch.bfloat16, 8, 128)])
@pytest.mark.parametrize("heads_first", [False, True])
def test_matches_reference(dtype, H, D, heads_first):
    g = torch.Generator().manual_seed(H * D)
    R, S, K, L = 6, 24, 8, 3
    app, keep, nk = random_keep(R, K, 10, g)
    base = torch.randint(0, S - 10, (R,), generator=g, dtype=torch.int32)
    caches = random_caches(L, R, S, H, D, dtype, g, heads_first)
    status = run_both(caches, base, app, keep, nk, heads_first=heads_first)
    assert int(status.abs().sum()) == 0


def test_many_layers_and_overlapping_keeps():
    g = torch.Generator().manual_seed(1)
    R, S, H, D, L = 4, 16, 2, 3, 80
    caches = random_caches(L, R, S, H, D, torch.float16, g)
    base = torch.tensor([0, 2, 5, 1], dtype=torch.int32)
    app = torch.tensor([3, 6, 8, 4], dtype=torch.int32)
    keep = torch.tensor([[1, 2, -1, -1], [1, 2, 3, 5], [0, 1, 2, 3], [3, -1, -1, -1]], dtype=torch.int32)
    nk = torch.tensor([2, 4, 4, 1], dtype=torch.int32)
    run_both(caches, base, app, keep, nk)


def test_stacked_tensor_is_many_layers():
    g = torch.Generator().manual_seed(2)
    stacked = torch.randn(5, 3, 12, 2, 4, generator=g)
    app, keep, nk = random_keep(3, 4, 6, g)
    base = torch.tensor([1, 0, 4], dtype=torch.int32)
    want, _, _ = ref.kv_compact(list(stacked.unbind(0)), base, app, keep, nk)
    dspark_ops.kv_compact(stacked, base, app, keep, nk)
    assert torch.equal(stacked, torch.stack(want))


def test_paged_caches():
    g = torch.Generator().manual_seed(3)
    R, bs, H, D, L, max_blocks = 4, 4, 3, 6, 5, 6
    num_blocks = R * max_blocks + 3
    caches = [torch.randn(num_blocks, bs, H, D, generator=g).half() for _ in range(L)]
    block_table = torch.randperm(num_blocks, generator=g)[:R * max_blocks].reshape(R, max_blocks).to(torch.int32)
    app, keep, nk = random_keep(R, 8, 9, g)
    base = torch.tensor([0, 5, 3, 10], dtype=torch.int32)
    status = run_both(caches, base, app, keep, nk, block_table=block_table)
    assert int(status.abs().sum()) == 0


def test_chain_keep_moves_nothing_and_updates_lengths():
    g = torch.Generator().manual_seed(4)
    caches = random_caches(4, 3, 10, 2, 3, torch.float32, g)
    before = [c.clone() for c in caches]
    base = torch.tensor([2, 0, 5], dtype=torch.int32)
    app = torch.tensor([5, 3, 4], dtype=torch.int32)
    keep = torch.tensor([[0, 1, 2], [0, -1, -1], [0, 1, 2]], dtype=torch.int32)
    nk = torch.tensor([3, 1, 3], dtype=torch.int32)
    new_len, status = dspark_ops.kv_compact(caches, base, app, keep, nk)
    assert new_len.tolist() == [5, 1, 8] and status.tolist() == [0, 0, 0]
    assert all(torch.equal(a, b) for a, b in zip(before, caches))
    assert base.tolist() == [2, 0, 5]  # read-only


def test_bad_values_abort_only_their_request():
    g = torch.Generator().manual_seed(5)
    R, S = 6, 12
    caches = random_caches(2, R, S, 2, 2, torch.float32, g)
    base = torch.tensor([0, 0, 0, 0, 10, 0], dtype=torch.int32)
    app = torch.tensor([4, 4, 4, 4, 4, 4], dtype=torch.int32)
    keep = torch.tensor([[1, 4], [2, 1], [1, 2], [-1, 0], [0, 1], [1, 2]], dtype=torch.int32)
    nk = torch.tensor([2, 2, 3, 1, 2, 2], dtype=torch.int32)
    status = run_both(caches, base, app, keep, nk)
    assert status.tolist() == [Status.BAD_INDEX, Status.BAD_INDEX, Status.BAD_LENGTHS, Status.BAD_INDEX,
                               Status.BAD_LENGTHS, 0]


def test_paged_block_table_out_of_range():
    caches = [torch.randn(4, 2, 1, 2)]
    block_table = torch.tensor([[0, 9], [1, 2]], dtype=torch.int32)
    base = torch.tensor([0, 0], dtype=torch.int32)
    app = torch.tensor([4, 4], dtype=torch.int32)
    keep = torch.tensor([[1, 3], [1, 3]], dtype=torch.int32)
    nk = torch.tensor([2, 2], dtype=torch.int32)
    status = run_both(caches, base, app, keep, nk, block_table=block_table)
    assert status.tolist() == [Status.BAD_INDEX, 0]


def test_host_errors():
    R = 2
    base = torch.zeros(R, dtype=torch.int32)
    idx = dict(num_appended=torch.ones(R, dtype=torch.int32), keep_index=torch.zeros(R, 1, dtype=torch.int32),
               num_keep=torch.ones(R, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"caches\[1\] must have R = 2 requests in dimension 0, got \[3, 4, 1, 1\]"):
        dspark_ops.kv_compact([torch.zeros(2, 4, 1, 1), torch.zeros(3, 4, 1, 1)], base, **idx)
    with pytest.raises(ValueError, match="new_len must not share memory with base_len"):
        dspark_ops.kv_compact([torch.zeros(2, 4, 1, 1)], base, new_len=base, **idx)
    with pytest.raises(ValueError, match="status must not share memory with num_keep"):
        dspark_ops.kv_compact([torch.zeros(2, 4, 1, 1)], base, status=idx["num_keep"], **idx)
    with pytest.raises(ValueError, match="paged caches must have block_size >= 1"):
        dspark_ops.kv_compact([torch.zeros(3, 0, 1, 1)], base, block_table=torch.zeros(R, 2, dtype=torch.int32),
                              **idx)
    with pytest.raises(ValueError, match="keep_index must have dtype torch.int32, got torch.int64"):
        dspark_ops.kv_compact([torch.zeros(2, 4, 1, 1)], base, **{**idx, "keep_index": torch.zeros(R, 1).long()})
    with pytest.raises(ValueError, match=r"paged caches\[1\] must have num_blocks = 3"):
        dspark_ops.kv_compact([torch.zeros(3, 4, 1, 1), torch.zeros(5, 4, 1, 1)], base,
                              block_table=torch.zeros(R, 2, dtype=torch.int32), **idx)
    with pytest.raises(ValueError, match=r"caches\[0\] must be contiguous"):
        dspark_ops.kv_compact([torch.zeros(2, 3, 4, 1).transpose(1, 2)], base, **idx)


def test_caches_sharing_memory_are_refused():
    """A tensor listed twice (or two overlapping ones) would have its entries
    moved twice -- on a GPU by racing blocks; disjoint slices of one buffer
    are separate caches."""
    R = 2
    base = torch.zeros(R, dtype=torch.int32)
    idx = dict(num_appended=torch.ones(R, dtype=torch.int32), keep_index=torch.zeros(R, 1, dtype=torch.int32),
               num_keep=torch.ones(R, dtype=torch.int32))
    a, b = torch.zeros(2, 4, 1, 1), torch.zeros(2, 4, 1, 1)
    with pytest.raises(ValueError, match=r"caches\[0\] and caches\[2\] share memory"):
        dspark_ops.kv_compact([a, b, a], base, **idx)
    with pytest.raises(ValueError, match=r"caches\[0\] and caches\[1\] share memory"):
        dspark_ops.KVLayout([a, a])
    buf = torch.zeros(3, 2, 4, 1, 1)
    with pytest.raises(ValueError, match=r"caches\[0\] and caches\[1\] share memory"):  # offset by one entry
        dspark_ops.kv_compact([buf.view(-1)[:8].view(2, 4, 1, 1), buf.view(-1)[1:9].view(2, 4, 1, 1)], base, **idx)
    g = torch.Generator().manual_seed(8)
    buf = torch.randn(2, R, 6, 1, 2, generator=g)  # K and V: disjoint halves of one buffer
    keep = torch.tensor([[1, 2], [0, 2]], dtype=torch.int32)
    args = (torch.tensor([1, 0], dtype=torch.int32), torch.tensor([3, 3], dtype=torch.int32), keep,
            torch.tensor([2, 2], dtype=torch.int32))
    want, _, _ = ref.kv_compact([buf[0].clone(), buf[1].clone()], *args)
    _, status = dspark_ops.kv_compact([buf[0], buf[1]], *args)
    assert status.tolist() == [0, 0] and torch.equal(buf[0], want[0]) and torch.equal(buf[1], want[1])


def test_kv_layout_is_reusable_and_checked():
    g = torch.Generator().manual_seed(6)
    caches = random_caches(3, 2, 8, 1, 4, torch.float32, g, heads_first=True)
    layout = dspark_ops.KVLayout(caches, heads_first=True)
    assert layout.table.shape == (3, 8) and layout.matches(caches)
    base = torch.tensor([1, 2], dtype=torch.int32)
    app = torch.tensor([3, 3], dtype=torch.int32)
    keep = torch.tensor([[2, -1], [0, 2]], dtype=torch.int32)
    nk = torch.tensor([1, 2], dtype=torch.int32)
    want, _, _ = ref.kv_compact(caches, base, app, keep, nk, heads_first=True)
    dspark_ops.kv_compact(layout, base, app, keep, nk, heads_first=True)
    assert all(torch.equal(a, b) for a, b in zip(caches, want))
    with pytest.raises(ValueError, match="KVLayout was built with heads_first=True"):
        dspark_ops.kv_compact(layout, base, app, keep, nk)


def test_compiled_fullgraph_with_a_layout_and_a_list():
    """torch.compile(fullgraph=True) traces both forms (the layout's
    data-pointer check is skipped while tracing: dynamo guards its tensors)."""
    g = torch.Generator().manual_seed(9)
    args = (torch.tensor([3, 5], dtype=torch.int32), torch.tensor([4, 4], dtype=torch.int32),
            torch.tensor([[0, 2, 3], [0, 1, -1]], dtype=torch.int32), torch.tensor([3, 2], dtype=torch.int32))
    f = torch.compile(lambda *a: dspark_ops.kv_compact(*a), fullgraph=True, backend="aot_eager")
    for as_layout in (True, False):
        caches = random_caches(2, 2, 16, 2, 4, torch.float32, g)
        want, _, _ = ref.kv_compact([c.clone() for c in caches], *args)
        new_len, status = f(dspark_ops.KVLayout(caches) if as_layout else caches, *args)
        assert new_len.tolist() == [6, 7] and status.tolist() == [0, 0]
        assert all(torch.equal(a, b) for a, b in zip(caches, want)), as_layout


@pytest.mark.parametrize("case", ["3-D cache", "R", "keep dtype", "lengths device", "strided cache"])
def test_fake_kernel_raises_what_the_op_raises(case):
    """Under FakeTensorMode (torch.compile's tracing, meta tensors) the fake
    kernel checks the arguments as the C++ op does, with the same message."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    R = 2
    caches = [torch.zeros(R, 4, 1, 2), torch.zeros(R, 4, 1, 2)]
    kw = dict(base_len=torch.zeros(R, dtype=torch.int32), num_appended=torch.ones(R, dtype=torch.int32),
              keep_index=torch.zeros(R, 1, dtype=torch.int32), num_keep=torch.ones(R, dtype=torch.int32))
    if case == "3-D cache":
        caches[1] = torch.zeros(R, 4, 2)
    elif case == "R":
        caches[1] = torch.zeros(3, 4, 1, 2)
    elif case == "keep dtype":
        kw["keep_index"] = kw["keep_index"].long()
    elif case == "lengths device":
        kw["num_keep"] = kw["num_keep"].to("meta")
    else:
        caches[0] = torch.zeros(R, 2, 4, 1).transpose(1, 2)
    with pytest.raises(ValueError) as cpp:
        dspark_ops.kv_compact(caches, **kw)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = lambda t: mode.from_tensor(t)  # noqa: E731
        with pytest.raises(ValueError) as faked:
            dspark_ops.kv_compact([fake(c) for c in caches], **{k: fake(v) for k, v in kw.items()})
    assert str(faked.value) == str(cpp.value).splitlines()[0], case


def test_opcheck():
    g = torch.Generator().manual_seed(7)
    caches = random_caches(2, 3, 10, 2, 2, torch.float32, g)
    app, keep, nk = random_keep(3, 4, 5, g)
    base = torch.tensor([0, 1, 2], dtype=torch.int32)
    args = (caches, base, app, keep, nk, torch.empty(3, dtype=torch.int32), torch.empty(3, dtype=torch.int32), None,
            False, None)
    torch.library.opcheck(torch.ops.dspark_ops.kv_compact.default, args)


# ----------------------------------------------------------- tree_to_keep


def test_tree_to_keep_chain_and_tree():
    path = torch.tensor([[0, 1, 2, -1], [0, 3, 7, 9], [-1, -1, -1, -1]], dtype=torch.int32)
    accepted = torch.tensor([2, 3, 0], dtype=torch.int32)
    keep, nk = dspark_ops.tree_to_keep(path, accepted)
    assert keep.tolist() == [[0, 1, 2, -1], [0, 3, 7, 9], [-1, -1, -1, -1]] and nk.tolist() == [3, 4, 0]
    # Nodes appended in another order: node i of request r sits at node_offset[cu[r] + i].
    cu = torch.tensor([0, 4, 14, 15], dtype=torch.int32)
    node_offset = torch.arange(15, dtype=torch.int32).flip(0)
    keep2, _ = dspark_ops.tree_to_keep(path, accepted, node_offset=node_offset, cu_num_nodes=cu)
    assert keep2[0].tolist()[:3] == [14, 13, 12] and keep2[1].tolist() == [10, 7, 3, 1]


# ----------------------------------------------------------- commit_tokens


def random_state(R, max_total, g):
    state = dspark_ops.RequestState.new(torch.randint(0, 50, (R,), generator=g, dtype=torch.int32),
                                        torch.randint(1, 100, (R,), generator=g),
                                        torch.randint(1, max_total + 3, (R,), generator=g, dtype=torch.int32),
                                        max_total)
    return state


def test_commit_tokens_matches_reference_over_steps():
    g = torch.Generator().manual_seed(8)
    R, W, max_total = 40, 5, 16
    state = random_state(R, max_total, g)
    stops = torch.tensor([3, 7], dtype=torch.int32)
    for step in range(8):
        tokens = torch.randint(0, 12, (R, W), generator=g, dtype=torch.int32)
        emitted = torch.randint(0, W + 1, (R,), generator=g, dtype=torch.int32)
        status = torch.zeros(R, dtype=torch.int32)
        status[torch.randint(0, R, (2,), generator=g)] = int(Status.NONFINITE_LOGITS)  # aborts
        status[torch.randint(0, R, (2,), generator=g)] |= int(Status.TOKEN_OUT_OF_RANGE)  # a flag: not an error
        fields = [state.out_tokens, state.out_len, state.position, state.max_len, state.finished, state.last_token,
                  state.error]
        want = ref.commit_tokens(*fields, tokens, emitted, status, stops)
        dspark_ops.commit_tokens(state, tokens, emitted, status, stop_tokens=stops)
        got = (state.out_tokens, state.out_len, state.position, state.finished, state.last_token, state.error)
        for name, a, b in zip(("out_tokens", "out_len", "position", "finished", "last_token", "error"), got, want):
            assert torch.equal(a, b), f"step {step}: {name}"
    assert bool(state.finished.any()) and bool((state.error == int(Status.NONFINITE_LOGITS)).any())


def test_commit_tokens_stop_and_max_len():
    state = dspark_ops.RequestState.new(torch.tensor([1, 1, 1], dtype=torch.int32), torch.tensor([10, 10, 10]),
                                        torch.tensor([8, 2, 8], dtype=torch.int32), 8)
    tokens = torch.tensor([[5, 9, 6, -1], [5, 6, 7, -1], [5, 6, 7, 8]], dtype=torch.int32)
    dspark_ops.commit_tokens(state, tokens, torch.tensor([3, 3, 4], dtype=torch.int32), torch.zeros(3, dtype=torch.int32),
                             stop_tokens=torch.tensor([9], dtype=torch.int32))
    assert state.out_len.tolist() == [2, 2, 4] and state.finished.tolist() == [True, True, False]
    assert state.position.tolist() == [12, 12, 14] and state.last_token.tolist() == [9, 6, 8]
    assert state.out_tokens[0, :3].tolist() == [5, 9, -1]


def test_commit_tokens_opcheck():
    g = torch.Generator().manual_seed(9)
    s = random_state(4, 6, g)
    args = (s.out_tokens, s.out_len, s.position, s.max_len, s.finished, s.last_token, s.error,
            torch.randint(0, 5, (4, 3), generator=g, dtype=torch.int32), torch.tensor([1, 2, 3, 0], dtype=torch.int32),
            torch.zeros(4, dtype=torch.int32), None)
    torch.library.opcheck(torch.ops.dspark_ops.commit_tokens.default, args)


def test_many_kept_entries_dense_overlap_heads_first_bytes():
    # num_keep well above one CUDA block's 256 threads, byte-wise copies.
    g = torch.Generator().manual_seed(10)
    R, S, H, D = 2, 1300, 3, 5
    caches = random_caches(2, R, S, H, D, torch.uint8, g, heads_first=True)
    base = torch.tensor([3, 0], dtype=torch.int32)
    app = torch.tensor([1200, 700], dtype=torch.int32)
    keep = torch.full((R, 600), -1, dtype=torch.int32)
    keep[0] = torch.arange(1, 1200, 2, dtype=torch.int32)[:600]      # odd offsets: every entry moves
    keep[1, :450] = torch.arange(1, 451, dtype=torch.int32)          # shift by one: dense overlap
    nk = torch.tensor([600, 450], dtype=torch.int32)
    run_both(caches, base, app, keep, nk, heads_first=True)


def test_commit_tokens_host_errors():
    s = dspark_ops.RequestState.new(torch.zeros(2, dtype=torch.int32), torch.zeros(2), 4, 4)
    ok = dict(tokens=torch.zeros(2, 3, dtype=torch.int32), emitted=torch.ones(2, dtype=torch.int32),
              status=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="tokens must have dtype torch.int32, got torch.int64"):
        dspark_ops.commit_tokens(s, **{**ok, "tokens": torch.zeros(2, 3, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"emitted must have shape \[2\], got \[3\]"):
        dspark_ops.commit_tokens(s, **{**ok, "emitted": torch.ones(3, dtype=torch.int32)})
    with pytest.raises(ValueError, match="stop_tokens must have dtype torch.int32"):
        dspark_ops.commit_tokens(s, **ok, stop_tokens=torch.tensor([1.0]))
    bad = dspark_ops.RequestState(*(getattr(s, f) for f in s.__dataclass_fields__))
    bad.position = s.position.int()
    with pytest.raises(ValueError, match="position must have dtype torch.int64, got torch.int32"):
        dspark_ops.commit_tokens(bad, **ok)


def test_commit_tokens_bad_device_values_finish_with_an_error():
    s = dspark_ops.RequestState.new(torch.zeros(3, dtype=torch.int32), torch.zeros(3), 8, 8)
    s.out_len[2] = -5  # corrupted state: never a write before the row
    dspark_ops.commit_tokens(s, torch.ones(3, 2, dtype=torch.int32), torch.tensor([1, 7, 1], dtype=torch.int32),
                             torch.zeros(3, dtype=torch.int32))
    assert s.finished.tolist() == [False, True, True] and s.error.tolist() == [0, Status.BAD_LENGTHS,
                                                                               Status.BAD_LENGTHS]
    assert s.out_len.tolist() == [1, 0, -5]
