"""CUDA-graph capture of the speculative loop's steps (DESIGN §3: optional
on a GPU). A verify step -- one target pass, verification, commit_tokens,
the KV rollback and the packing of what the host reads -- is a function of
the step's draft tensors and of state that lives at fixed addresses (the
caches, RequestState, the sampling parameters); so is a draft model's chain
of single-token forwards and draws. `StepGraphs` copies the varying inputs
into static buffers, one set per step shape, and runs the step from them:
the first step of a shape eagerly (it warms every lazy cache up; on a GPU
on the side stream the capture then uses, as torch's CUDA-graph notes ask),
the next ones as a CUDA graph captured on the second. With capture off (the
CPU) the same buffers run eagerly, so tests on any machine exercise the
plumbing; only the capture itself needs a GPU.

A replayed step's outputs are the graph's static tensors, rewritten by its
next replay: callers read them (or copy them) before the next step. All
graphs of a StepGraphs share one memory pool, which is safe because each
one's outputs are consumed before another replays."""
from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
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
    graph. A capture that fails warns once, restores the stream, and leaves
    every later step of this StepGraphs eager."""

    def __init__(self, step: StepFn, *, capture: bool, name: str = "the verify step", token: Any = None):
        """step: a function or a bound method (held weakly: its owner and
        these graphs do not keep each other alive). token: what the graphs
        read besides their inputs (renewed)."""
        self._source = ref = weakref.WeakMethod(step) if inspect.ismethod(step) else (lambda: step)
        self.step = lambda inputs: ref()(inputs)
        self.capture, self.name, self.token = capture, name, token
        self._capture_asked = capture  # renewed graphs try again after a failed capture
        self.slots: Dict[Hashable, _Slot] = {}
        self.pool = None
        # warm-up and capture on a side stream of the inputs' device, made at the first step (none without a
        # GPU: a capture attempt then fails into the fallback)
        self.side_streams = capture and torch.cuda.is_available()
        self.stream: Optional[torch.cuda.Stream] = None
        self.captured = 0  # graphs captured (res.stats["cuda_graphs"])

    def renewed(self, token: Any) -> "StepGraphs":
        """These graphs if they were made for `token` (e.g. a model's
        graph_token: the addresses of the tensors they read) or none was
        recorded yet, else new ones for it (the old ones and their pool are
        dropped with the last reference)."""
        if self.token is None or token == self.token:
            self.token = token
            return self
        return type(self)(self._source(), capture=self._capture_asked, name=self.name, token=token)

    def run(self, key: Hashable, inputs: Sequence[Optional[torch.Tensor]]) -> Any:
        slot = self.slots.get(key)
        if slot is None:  # the first step of this shape: eager, on the new static buffers
            slot = self.slots[key] = _Slot(inputs)
            return self._warm_up(slot)
        slot.load(inputs)
        if slot.graph is None and self.capture:
            self._capture(slot)
        if slot.graph is None:
            return self.step(slot.inputs)
        slot.graph.replay()
        return slot.out

    def _device(self, slot: _Slot) -> torch.device:
        """The step's GPU: its inputs', which need not be the current device
        (a stream or capture on another device would record nothing)."""
        dev = next((t.device for t in slot.inputs if t is not None and t.is_cuda), None)
        return dev if dev is not None else torch.device("cuda", torch.cuda.current_device())

    def _warm_up(self, slot: _Slot) -> Any:
        if not self.side_streams:
            return self.step(slot.inputs)
        dev = self._device(slot)
        with torch.cuda.device(dev):
            if self.stream is None or self.stream.device != dev:
                self.stream = torch.cuda.Stream(device=dev)
            main = torch.cuda.current_stream(dev)
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                out = self.step(slot.inputs)
            main.wait_stream(self.stream)
        return out

    def _capture(self, slot: _Slot) -> None:
        dev = self._device(slot) if self.stream is not None else None
        main = torch.cuda.current_stream(dev) if dev is not None else None
        try:
            graph = torch.cuda.CUDAGraph()
            on_device = torch.cuda.device(dev) if dev is not None else contextlib.nullcontext()
            # thread_local: another thread's CUDA work during the capture does not invalidate it
            with on_device, torch.cuda.graph(graph, pool=self.pool, stream=self.stream,
                                             capture_error_mode="thread_local"):
                out = self.step(slot.inputs)
        except Exception as e:  # an op that cannot be captured: stay eager, say why once
            if main is not None:
                torch.cuda.set_stream(main)  # a failed capture_end leaves the capture stream current
                torch.cuda.synchronize(dev)
            cause = e.__context__ if e.__context__ is not None else e  # the op's error, not capture_end's
            warnings.warn(f"SpeculativeDecoder: CUDA graph capture of {self.name} failed, running eagerly "
                          f"({type(cause).__name__}: {cause})", RuntimeWarning, stacklevel=3)
            self.capture = False
            return
        self.pool = graph.pool()
        slot.graph, slot.out = graph, out
        self.captured += 1
