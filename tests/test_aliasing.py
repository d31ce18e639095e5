"""The `.out` forms refuse outputs (and workspaces) that share memory with an
input or with another output: on a GPU, blocks write them while other blocks
still read, so the result would depend on scheduling (CPU threads race the
same way). Disjoint parts of one buffer are fine."""
import pytest
import torch

import dspark_ops
from dspark_ops import RequestState

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
R, V = 3, 40


def raises_sharing(out_name, in_name):
    return pytest.raises(ValueError, match=f"{out_name} must not share memory with {in_name}")


def verify_inputs(device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * R + R, V, generator=g).to(device)  # 2 drafts a request + bonus rows
    drafts = torch.randint(0, V, (2 * R,), generator=g, dtype=torch.int32).to(device)
    cu = torch.arange(0, 2 * R + 1, 2, dtype=torch.int32, device=device)
    return logits, drafts, cu


@pytest.mark.parametrize("device", DEVICES)
def test_verify_chunk_out(device):
    logits, drafts, cu = verify_inputs(device)
    out = dspark_ops.empty_verify_result(R, 2, device=device)
    dspark_ops.verify_chunk(logits, drafts, cu, temperature=0.0, out=out)  # disjoint: accepted
    # draft_tokens living in the tokens output: blocks overwrite drafts others still read.
    buf = torch.empty(R, 3, dtype=torch.int32, device=device)
    buf.view(-1)[:2 * R] = drafts
    with raises_sharing("tokens", "draft_tokens"):
        dspark_ops.verify_chunk(logits, buf.view(-1)[:2 * R], cu, temperature=0.0,
                                out=out._replace(tokens=buf))
    with raises_sharing("accepted", "emitted"):
        dspark_ops.verify_chunk(logits, drafts, cu, temperature=0.0, out=out._replace(emitted=out.accepted))
    with raises_sharing("status", "cu_num_draft"):
        dspark_ops.verify_chunk(logits, drafts, cu, temperature=0.0, out=out._replace(status=cu[:R]))


@pytest.mark.parametrize("device", DEVICES)
def test_verify_chunk_strided_logits_span_their_rows(device):
    """A strided input spans from its first to its last element: an output
    inside a row's unused tail is refused, one past the last row is not."""
    _, drafts, cu = verify_inputs(device)
    rows = 3 * R
    storage = torch.randn(rows * 2 * V, device=device)
    logits = storage[:rows * 2 * V].view(rows, 2 * V)[:, :V]  # row stride 2V: gaps between rows
    out = dspark_ops.empty_verify_result(R, 2, device=device)
    float_status = storage.view(torch.int32)
    gap = float_status[V:V + R]  # in row 0's unused half: not an element of logits, but inside its span
    with raises_sharing("status", "target_logits"):
        dspark_ops.verify_chunk(logits, drafts, cu, temperature=0.0, out=out._replace(status=gap))
    past = float_status[(rows - 1) * 2 * V + V:(rows - 1) * 2 * V + V + R]  # the last row's tail: past the span
    dspark_ops.verify_chunk(logits, drafts, cu, temperature=0.0, out=out._replace(status=past))


@pytest.mark.parametrize("device", DEVICES)
def test_verify_tree_out(device):
    logits = torch.randn(3 * R, V, device=device)
    nodes = torch.randint(0, V, (3 * R,), dtype=torch.int32, device=device)
    parents = torch.tensor([-1, 0, 0] * R, dtype=torch.int32, device=device)
    cu = torch.arange(0, 3 * R + 1, 3, dtype=torch.int32, device=device)
    out = dspark_ops.empty_tree_result(R, 1, device=device)
    dspark_ops.verify_tree(logits, nodes, parents, cu, max_depth=1, temperature=0.0, out=out)
    with raises_sharing("path", "parents"):
        dspark_ops.verify_tree(logits, nodes, parents, cu, max_depth=1, temperature=0.0,
                               out=out._replace(path=parents[:2 * R].view(R, 2)))
    with raises_sharing("tokens", "path"):
        dspark_ops.verify_tree(logits, nodes, parents, cu, max_depth=1, temperature=0.0,
                               out=out._replace(path=out.tokens))


@pytest.mark.parametrize("device", DEVICES)
def test_sample_out(device):
    logits = torch.randn(R, V, device=device)
    buf = torch.empty(2 * R, dtype=torch.int32, device=device)
    out = dspark_ops.SampleResult(buf[:R], buf[R:])  # two halves of one buffer: accepted
    dspark_ops.sample(logits, temperature=1.0, seed=1, out=out)
    slot = torch.zeros(R, dtype=torch.int32, device=device)
    with raises_sharing("tokens", "slot"):
        dspark_ops.sample(logits, temperature=1.0, seed=1, slot=slot, out=out._replace(tokens=slot))
    with raises_sharing("tokens", "status"):
        dspark_ops.sample(logits, temperature=1.0, seed=1, out=out._replace(status=buf[1:R + 1]))
    big = torch.randn(R, 400, device=device)  # a workspace read from inside the logits (as many bytes as it needs)
    ws = big.view(torch.uint8).view(-1)
    assert ws.numel() >= dspark_ops.workspace_size("sample", num_requests=R, vocab_size=400)
    with raises_sharing("workspace", "logits"):
        dspark_ops.sample(big, temperature=1.0, seed=1, out=out, workspace=ws)


@pytest.mark.parametrize("device", DEVICES)
def test_markov_draft_out(device):
    G, rank = 2, 4
    base = torch.randn(R, G, V, device=device)
    anchor = torch.zeros(R, dtype=torch.int64, device=device)
    w1, w2 = torch.randn(V, rank, device=device), torch.randn(rank, V, device=device)
    num_draft = torch.full((R,), G, dtype=torch.int32, device=device)
    out = dspark_ops.MarkovResult(torch.empty(R, G, dtype=torch.int32, device=device), torch.empty_like(base),
                                  torch.empty(R, dtype=torch.int32, device=device))
    dspark_ops.markov_draft(base, anchor, w1, w2, num_draft=num_draft, out=out)
    with raises_sharing("status", "anchor"):
        dspark_ops.markov_draft(base, anchor, w1, w2, num_draft=num_draft,
                                out=out._replace(status=anchor.view(torch.int32)[:R]))
    logits = torch.empty_like(base)  # w2 read from inside the draft_logits output
    w2_inside = logits.view(-1)[:rank * V].view(rank, V).normal_()
    with raises_sharing("draft_logits", "w2"):
        dspark_ops.markov_draft(base, anchor, w1, w2_inside, num_draft=num_draft,
                                out=out._replace(draft_logits=logits))
    ws = torch.empty(dspark_ops.workspace_size("markov_draft", num_requests=R, vocab_size=V, rank=rank) + 64,
                     dtype=torch.uint8, device=device)
    with raises_sharing("workspace", "w2"):  # w2 living in the workspace the op overwrites
        dspark_ops.markov_draft(base, anchor, w1, ws[:rank * V * 4].view(torch.float32).view(rank, V),
                                num_draft=num_draft, out=out, workspace=ws)
    with raises_sharing("draft_logits", "workspace"):
        dspark_ops.markov_draft(base, anchor, w1, w2, num_draft=num_draft, workspace=ws,
                                out=out._replace(draft_logits=ws[:R * G * V * 4].view(torch.float32).view(R, G, V)))


@pytest.mark.parametrize("device", DEVICES)
def test_schedule_verify_out(device):
    conf = torch.rand(R, 4, device=device)
    num_draft = torch.full((R,), 4, dtype=torch.int32, device=device)
    sps = torch.ones(64, dtype=torch.float64, device=device)
    out = torch.empty(R, dtype=torch.int32, device=device)
    dspark_ops.schedule_verify(conf, num_draft, sps, out=out)
    with raises_sharing("verify_len", "num_draft"):
        dspark_ops.schedule_verify(conf, num_draft, sps, out=num_draft)


@pytest.mark.parametrize("device", DEVICES)
def test_commit_tokens(device):
    state = RequestState.new(torch.zeros(R, dtype=torch.int32, device=device),
                             torch.full((R,), 5, dtype=torch.int64, device=device), 8, 3)
    tokens = torch.zeros(R, 3, dtype=torch.int32, device=device)
    emitted = torch.ones(R, dtype=torch.int32, device=device)
    status = torch.zeros(R, dtype=torch.int32, device=device)
    dspark_ops.commit_tokens(state, tokens, emitted, status)
    with raises_sharing("out_len", "emitted"):
        dspark_ops.commit_tokens(state, tokens, state.out_len, status)
    with raises_sharing("out_tokens", "tokens"):
        dspark_ops.commit_tokens(state, state.out_tokens, emitted, status)
