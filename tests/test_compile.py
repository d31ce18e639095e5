"""torch.compile over a decoding loop: the wrappers keep per-step scalars
(position, seed) and batch sizes dynamic, so a loop compiles once or twice
(Dynamo specialises a new int once, then marks it dynamic), not per step."""
import pytest
import torch

import dspark_ops


def _counting_backend():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return graphs, backend


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_sample_position_per_step_does_not_recompile():
    graphs, backend = _counting_backend()
    logits = torch.randn(3, 40)
    f = torch.compile(lambda l, p: dspark_ops.sample(l, temperature=1.0, top_k=5, seed=7, position=p).tokens,
                      backend=backend, fullgraph=True)
    for step in range(12):
        got = f(logits, 100 + step)
        assert torch.equal(got, dspark_ops.sample(logits, temperature=1.0, top_k=5, seed=7, position=100 + step).tokens)
    assert len(graphs) <= 2, len(graphs)


def test_sample_out_batch_sizes_do_not_recompile_with_dynamic_shapes():
    graphs, backend = _counting_backend()

    def step(logits, out):
        return dspark_ops.sample(logits, temperature=0.8, seed=3, position=9, out=out).tokens
    f = torch.compile(step, backend=backend, fullgraph=True, dynamic=True)
    for R in (3, 5, 7, 9):
        logits = torch.randn(R, 40)
        got = f(logits, dspark_ops.empty_sample_result(R))
        assert torch.equal(got, step(logits, dspark_ops.empty_sample_result(R)))
    assert len(graphs) == 1, len(graphs)


def test_ragged_sizes_read_from_tensors_are_asked_for_under_compile():
    """max_draft / max_depth = None reads a tensor on the host: under
    torch.compile(fullgraph=True) the wrappers say to pass them."""
    target = torch.randn(5, 20)
    tokens = torch.tensor([1, 2, 3], dtype=torch.int32)
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    chain = torch.compile(lambda t, d, c: dspark_ops.verify_chunk(t, d, c).tokens, backend="aot_eager",
                          fullgraph=True)
    with pytest.raises(Exception, match="under torch.compile pass max_draft="):
        chain(target, tokens, cu)
    parents = torch.tensor([-1, 0, 0, -1, 0], dtype=torch.int32)
    nodes = torch.tensor([0, 4, 5, 0, 6], dtype=torch.int32)
    tree = torch.compile(lambda t, n, p, c: dspark_ops.verify_tree(t, n, p, c).tokens, backend="aot_eager",
                         fullgraph=True)
    with pytest.raises(Exception, match="under torch.compile pass max_depth="):
        tree(target, nodes, parents, torch.tensor([0, 3, 5], dtype=torch.int32))
    fixed = torch.compile(lambda t, d, c: dspark_ops.verify_chunk(t, d, c, max_draft=2).tokens, backend="aot_eager",
                          fullgraph=True)
    assert torch.equal(fixed(target, tokens, cu), dspark_ops.verify_chunk(target, tokens, cu, max_draft=2).tokens)
