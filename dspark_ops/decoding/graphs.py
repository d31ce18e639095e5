"""CUDA-graph capture of the speculative loop's steps (DESIGN §3: optional
on a GPU). A verify step -- one target pass, verification, commit_tokens,
the KV rollback and the packing of what the host reads -- is a function of
the step's draft tensors and of state that lives at fixed addresses (the
caches, RequestState, the sampling parameters); so is a draft model's chain
of single-token forwards and draws. `StepGraphs` copies the varying inputs
into static buffers, one set per step shape, and runs the step from them:
the first step of a shape eagerly (it warms every lazy cache up), the next
ones as a CUDA graph captured on the second. With capture off (the CPU) the
same buffers run eagerly, so tests on any machine exercise the plumbing;
only the capture itself needs a GPU."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Hashable, Optional, Sequence

import torch

# step(inputs) -> its output tensor(s), rewritten in place by each replay
StepFn = Callable[[Sequence[Optional[torch.Tensor]]], Any]


class _Slot:
    """Static inputs of one step shape, its graph and its output."""

    def __init__(self, inputs: Sequence[Optional[torch.Tensor]]):
        self.inputs = [None if t is None else t.detach().clone() for t in inputs]
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.out: Any = None

    def load(self, inputs: Sequence[Optional[torch.Tensor]]) -> None:
        for dst, src in zip(self.inputs, inputs):
            if dst is not None:
                dst.copy_(src, non_blocking=True)


class StepGraphs:
    """Runs `step` on static copies of its inputs, keyed by the step's shape
    (the caller's `key`: draft width, tree or chain, ...). capture=True (a
    CUDA device): from the second step of a shape on, as a replayed CUDA
    graph (all graphs share one memory pool). A capture that fails warns
    once and leaves that runner eager."""

    def __init__(self, step: StepFn, *, capture: bool, name: str = "the verify step"):
        self.step, self.capture, self.name = step, capture, name
        self.slots: Dict[Hashable, _Slot] = {}
        self.pool = None
        self.captured = 0  # graphs captured (res.stats["cuda_graphs"])

    def run(self, key: Hashable, inputs: Sequence[Optional[torch.Tensor]]) -> Any:
        slot = self.slots.get(key)
        if slot is None:  # the first step of this shape: eager, on the new static buffers
            slot = self.slots[key] = _Slot(inputs)
            return self.step(slot.inputs)
        slot.load(inputs)
        if slot.graph is None and self.capture:
            self._capture(slot)
        if slot.graph is None:
            return self.step(slot.inputs)
        slot.graph.replay()
        return slot.out

    def _capture(self, slot: _Slot) -> None:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.step(slot.inputs)
        except Exception as e:  # an op that cannot be captured: stay eager, say why once
            warnings.warn(f"SpeculativeDecoder: CUDA graph capture of {self.name} failed, running eagerly "
                          f"({type(e).__name__}: {e})", RuntimeWarning, stacklevel=3)
            self.capture = False
            return
        self.pool = graph.pool()
        slot.graph, slot.out = graph, out
        self.captured += 1
