"""DSpark's confidence-scheduled verification (DESIGN §3): schedule_verify,
its calibration (fit_sequential_temperatures) and the SPS table it consumes
(measure_sps)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Optional, Sequence, Union

import torch

from . import _checks
from ._params import _number
from .ops import _ops, check_fake_workspace

OP = "dspark_ops.schedule_verify"
MODES = ("early_stop", "threshold", "budget", "global")


def schedule_verify(
    confidence: torch.Tensor,
    num_draft: torch.Tensor,
    sps_table: torch.Tensor,
    *,
    mode: str = "early_stop",
    threshold: Optional[float] = None,
    budget: Union[int, torch.Tensor, None] = None,
    temperatures: Optional[torch.Tensor] = None,
    allow_lossy: bool = False,
    out: Optional[torch.Tensor] = None,
    workspace: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """How many drafted tokens each request sends to the target this step.

    Survival ``a[r, j] = prod_{i <= j} c[r, i]`` is the probability that
    draft j survives verification; the token batch is ``B = sum(1 + l_r)``
    and the expected emitted tokens ``tau = sum(1 + sum_{j < l_r} a[r, j])``
    (fp64, in admission order: CPU and CUDA agree exactly; with
    ``temperatures`` the sigmoid's exp may differ in the last bit between
    backends, so a candidate exactly at a boundary may differ — DESIGN §2's
    margin rule). Candidates are
    admitted in descending survival (ties: request, then position), so each
    request's admitted drafts are a prefix.

    Parameters
    ----------
    confidence : Tensor [R, G], float32
        c[r, k]: the calibrated probability that draft k survives given the
        ones before it did; or raw confidence logits when ``temperatures`` is
        given (c = sigmoid(logit / T_k)). NaN counts as 0; values clamp to [0, 1].
    num_draft : Tensor [R], int32
        Drafts available per request (<= G).
    sps_table : Tensor [B_max + 1], float64 (float32 is converted)
        Measured target steps per second at token batch B (``measure_sps``);
        0 beyond B_max: never admitted.
    mode : str
        ``"early_stop"`` (DSpark's Algorithm 1: stop at the first admission
        that does not raise tau * SPS(B)), ``"threshold"`` (cut each request
        at the first survival below ``threshold``), ``"budget"`` (admit the
        ``budget`` best candidates; the budget fixed before this block was
        drafted, e.g. from an earlier step or a CUDA-graph bucket) — all three
        lossless — or ``"global"`` (the admission count maximising the
        objective: **not lossless** when confidences depend on this block's
        tokens; raises unless ``allow_lossy=True``).
    threshold : float, required by mode "threshold"
    budget : int or Tensor [1] int64, required by mode "budget"
        Drafted tokens admitted across the batch (the token batch is R + budget).
    temperatures : Tensor [G], float32, optional
        Per-position temperatures (``fit_sequential_temperatures``).

    Returns
    -------
    verify_len : Tensor [R], int32

    Example
    -------
    >>> import torch, dspark_ops
    >>> conf = torch.tensor([[0.9, 0.8, 0.5], [0.6, 0.3, 0.2]])
    >>> sps = torch.tensor([0.0, 100.0, 99.0, 98.0, 97.0, 80.0, 60.0, 50.0, 40.0], dtype=torch.float64)
    >>> dspark_ops.schedule_verify(conf, torch.tensor([3, 3], dtype=torch.int32), sps).tolist()
    [2, 0]

    Notes
    -----
    One CUDA block ranks up to 2^20 candidates; no host synchronisation.
    """
    if mode not in MODES:
        raise ValueError(f"{OP}: mode must be early_stop, threshold, budget or global, got '{mode}'")
    if mode == "global" and not allow_lossy:
        raise ValueError(f"{OP}: mode 'global' is not lossless when confidences depend on the drafted tokens "
                         "(a token can be admitted because it was sampled); pass allow_lossy=True for studies")
    if mode == "threshold" and threshold is None:
        raise ValueError(f"{OP}: mode 'threshold' needs threshold=")
    if mode == "budget" and budget is None:
        raise ValueError(f"{OP}: mode 'budget' needs budget=")
    dev = confidence.device
    if budget is not None and not isinstance(budget, torch.Tensor):
        budget = _number(OP, "budget", budget, integer=True)
        if budget < 0:
            raise ValueError(f"{OP}: budget must be >= 0 drafted tokens, got {budget}")
        budget = torch.full((1,), budget, dtype=torch.int64, device=dev)
    if isinstance(sps_table, torch.Tensor) and sps_table.dtype == torch.float32:
        sps_table = sps_table.double()  # the op ranks in fp64; a [B_max + 1] copy is cheap
    args = (confidence, num_draft, sps_table, mode, float("nan") if threshold is None else float(threshold), budget,
            temperatures)
    if out is None and workspace is None:
        return _ops.schedule_verify(*args)
    if out is None:  # a workspace alone: a fresh output, the caller's scratch
        out = torch.empty(confidence.shape[0], dtype=torch.int32, device=dev)
    _ops.schedule_verify.out(*args, verify_len=out, workspace=workspace)
    return out


@torch.library.register_fake("dspark_ops::schedule_verify")
def _schedule_verify_fake(confidence, num_draft, sps_table, schedule_mode, threshold, budget, temperatures):
    if confidence.dim() != 2:
        raise ValueError(f"{OP}: confidence must be a contiguous [R, G] tensor, got "
                         f"[{', '.join(map(str, confidence.shape))}]")
    return confidence.new_empty((confidence.shape[0],), dtype=torch.int32)


@torch.library.register_fake("dspark_ops::schedule_verify.out")
def _schedule_verify_out_fake(confidence, num_draft, sps_table, schedule_mode, threshold, budget, temperatures, *,
                              verify_len, workspace=None):
    _schedule_verify_fake(confidence, num_draft, sps_table, schedule_mode, threshold, budget, temperatures)
    R, G = confidence.shape
    _checks.check_output(OP, "verify_len", verify_len, R, torch.int32, confidence)
    check_fake_workspace("schedule_verify", workspace, confidence, num_requests=R, group=G)


def expected_calibration_error(pred: torch.Tensor, label: torch.Tensor, bins: int = 15) -> float:
    """ECE of predictions [N] in [0, 1] against 0/1 labels [N]: the
    count-weighted mean |mean(pred) - mean(label)| over equal-width bins."""
    idx = (pred.clamp(0, 1) * bins).long().clamp(max=bins - 1)
    total, err = pred.shape[0], 0.0
    for b in range(bins):
        m = idx == b
        if bool(m.any()):
            err += float(m.sum()) / total * abs(float(pred[m].mean()) - float(label[m].float().mean()))
    return err


def fit_sequential_temperatures(conf_logits: torch.Tensor, accepted: torch.Tensor,
                                grid: Optional[Sequence[float]] = None, bins: int = 15) -> torch.Tensor:
    """Per-position temperatures fitted left to right (host-side).

    Position k's temperature is the grid value minimising the expected
    calibration error of the running survival product
    ``prod_{i <= k} sigmoid(logit_i / T_i)`` (earlier positions already
    fitted) against whether draft k survived (``accepted > k``).

    Parameters
    ----------
    conf_logits : Tensor [N, G]: confidence logits of N drafted blocks.
    accepted : Tensor [N]: drafts accepted in each block.
    grid : temperatures to try (default 0.1 .. 10, log-spaced, 81 values).

    Returns
    -------
    temperatures : Tensor [G], float32 — pass to ``schedule_verify``.
    """
    x = conf_logits.detach().cpu().double()
    acc = accepted.detach().cpu().long()
    grid = list(grid) if grid is not None else torch.logspace(-1, 1, 81, dtype=torch.float64).tolist()
    N, G = x.shape
    temps = torch.ones(G, dtype=torch.float64)
    running = torch.ones(N, dtype=torch.float64)
    for k in range(G):
        label = acc > k
        best = min(grid, key=lambda t: (expected_calibration_error(running * torch.sigmoid(x[:, k] / t), label, bins),
                                        abs(t - 1.0)))
        temps[k] = best
        running = running * torch.sigmoid(x[:, k] / best)
    return temps.to(torch.float32)


def _non_decreasing(ys: List[float]) -> List[float]:
    """The least-squares non-decreasing fit of ys (pool adjacent violators)."""
    blocks: List[List[float]] = []  # [mean, count]
    for y in ys:
        blocks.append([y, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, c1), (m2, c2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2]
    return [m for m, c in blocks for _ in range(int(c))]


def _convex_non_decreasing(xs: List[float], ys: List[float]) -> List[float]:
    """The greatest convex non-decreasing minorant of the points (xs
    increasing, ys), at xs: their lower convex hull, held at its minimum
    left of it (a convex function rises right of its minimum)."""
    hull: List[int] = []
    for i in range(len(xs)):  # the lower hull, left to right (monotone chain)
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (ys[b] - ys[a]) * (xs[i] - xs[a]) >= (ys[i] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()  # b lies on or above the chord a-i
            else:
                break
        hull.append(i)
    out, h = [], 0
    for x in xs:
        while h + 1 < len(hull) and xs[hull[h + 1]] < x:
            h += 1
        a, b = hull[h], hull[min(h + 1, len(hull) - 1)]
        out.append(ys[a] if a == b else ys[a] + (ys[b] - ys[a]) * (x - xs[a]) / (xs[b] - xs[a]))
    k = out.index(min(out))
    return [out[k]] * k + out[k:]


def measure_sps(step_fn: Callable[[int], object], batch_sizes: Sequence[int], *, warmup: int = 2, iters: int = 5,
                device: Union[str, torch.device, None] = None, fit: str = "raw") -> torch.Tensor:
    """Steps per second of a target step at each token batch size, as the
    table ``schedule_verify`` consumes.

    The sizes are timed in turn, ``iters`` rounds over all of them (so a
    drift, e.g. a GPU warming up, is not read as a trend in B); the median
    step time per size is (optionally) fitted, interpolated linearly
    between sizes (flat below the smallest) and inverted.

    Parameters
    ----------
    step_fn : callable, step_fn(B) runs one step of token batch B
    batch_sizes : sequence of int >= 1 (B_max = the largest)
    warmup, iters : calls per size before timing, timed rounds
    device : str or torch.device, optional
        A CUDA device: CUDA events on its current stream; else the wall
        clock (default: CUDA when available).
    fit : "raw" (default), "convex" or "monotone"
        What the median step times become before interpolation.
        "raw": as measured. "convex": their greatest convex non-decreasing
        minorant — what ``early_stop`` needs (target_sps_table uses it). It
        admits candidates in order of survival while tau x SPS(B) rises and
        stops at the first that does not; tau is concave in B (survivals
        sorted descending), so with a convex rising step time (linear
        between sizes keeps it convex) tau x SPS is unimodal and that first
        stop is the best admission. Measured times are neither: noise
        between neighbouring sizes, or a real jump (on the CPU a ragged pass
        of 17 tokens for 16 requests cost ~10 % more than the uniform 16),
        stopped it at the first draft (16 requests: 0.0-0.5 drafts accepted
        a step against 2.84 unscheduled). The minorant is optimistic where
        the times jump or scatter: it prices the cheapest trend through
        them. "monotone": their least-squares non-decreasing fit.

    Returns
    -------
    Tensor [B_max + 1] float64: steps per second at each token batch.

    Example
    -------
    >>> import torch, dspark_ops
    >>> sps = dspark_ops.measure_sps(lambda B: torch.randn(64 * B, 64) @ torch.randn(64, 64), [1, 4, 8],
    ...                              iters=3, device="cpu", fit="convex")
    >>> sps.shape, bool((sps[1:] <= sps[:-1]).all())
    (torch.Size([9]), True)
    """
    if fit not in ("convex", "monotone", "raw"):
        raise ValueError(f"dspark_ops.measure_sps: fit must be 'convex', 'monotone' or 'raw', got {fit!r}")
    sizes = sorted(set(int(b) for b in batch_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"dspark_ops.measure_sps: batch_sizes must be positive, got {list(batch_sizes)}")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    if cuda and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    for B in sizes:
        for _ in range(warmup):
            step_fn(B)
    times: dict = {B: [] for B in sizes}
    for _ in range(iters):
        for B in sizes:
            if cuda:
                stream = torch.cuda.current_stream(dev)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                step_fn(B)
                end.record(stream)
                end.synchronize()
                times[B].append(start.elapsed_time(end) / 1e3)
            else:  # wall clock: the CPU (or a GPU the caller times this way) must be idle at both ends
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step_fn(B)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times[B].append(time.perf_counter() - t0)
    medians = [statistics.median(times[B]) for B in sizes]  # seconds
    if fit == "convex":
        medians = _convex_non_decreasing([float(b) for b in sizes], medians)
    elif fit == "monotone":
        medians = _non_decreasing(medians)
    table = torch.empty(sizes[-1] + 1, dtype=torch.float64)  # step times first, inverted at the end
    xs = torch.tensor(sizes, dtype=torch.float64)
    ys = torch.tensor(medians, dtype=torch.float64)
    for B in range(sizes[-1] + 1):
        if B <= sizes[0]:
            table[B] = ys[0]
        else:
            i = int(torch.searchsorted(xs, torch.tensor(float(B))))
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            table[B] = y0 + (y1 - y0) * (B - x0) / (x1 - x0)
    return 1.0 / table.clamp(min=1e-12)
