"""Benchmark of `kv_compact` (KV-cache compaction after speculative
verification) with a prebuilt KVLayout and with a plain list of caches,
against the per-layer PyTorch gather/scatter an engine without our kernels
writes. Scenarios: "tree" (a few kept entries at random offsets: most move)
and "chain" (keep = 0..kept-1: nothing moves, only the lengths are written)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

import dspark_ops
from dspark_ops import reference

from .timing import rotation_count, time_fn

SCENARIOS = ("tree", "chain")
LAYOUTS = ("nhd", "heads_first")
# Cached positions before the appended window; rotations slide the window
# down by `appended`, so the GPU base bounds the rotation count (L2 misses).
BASE = {"cuda": 512, "cpu": 64}
REFERENCE_MAX_PAIRS = 1024  # R * tensors above which the Python-loop reference is skipped
OURS = "dspark_ops.kv_compact (KVLayout)"

# (base_len [R] int32) -> anything; runs one compaction of every layer.
Impl = Callable[[torch.Tensor], object]


@dataclass
class KeepSet:
    """kv_compact's per-request arguments, on the caches' device."""

    num_appended: torch.Tensor  # [R] int32
    keep_index: torch.Tensor  # [R, kept] int32, strictly increasing per row
    num_keep: torch.Tensor  # [R] int32

    def moved_entries(self) -> int:
        """Kept entries not already in place (keep_index[r, i] != i), per layer."""
        cols = torch.arange(self.keep_index.shape[1], device=self.keep_index.device)
        valid = cols < self.num_keep.unsqueeze(1)
        return int(((self.keep_index != cols) & valid).sum())

    def cpu(self) -> "KeepSet":
        return KeepSet(self.num_appended.cpu(), self.keep_index.cpu(), self.num_keep.cpu())


def make_keep(R: int, appended: int, kept: int, scenario: str, device: str, gen: torch.Generator) -> KeepSet:
    """tree: `kept` random strictly increasing offsets out of `appended`
    (never the prefix 0..kept-1, so most entries move); chain: 0..kept-1."""
    rows = []
    for _ in range(R):
        keep = torch.arange(kept)
        while scenario == "tree" and torch.equal(keep, torch.arange(kept)):
            keep = torch.randperm(appended, generator=gen)[:kept].sort().values
        rows.append(keep)
    full = lambda v: torch.full((R,), v, dtype=torch.int32, device=device)  # noqa: E731
    return KeepSet(full(appended), torch.stack(rows).to(torch.int32).to(device), full(kept))


def make_caches(R: int, L: int, S: int, H: int, D: int, dtype: torch.dtype, heads_first: bool, device: str,
                gen: torch.Generator) -> List[torch.Tensor]:
    """L contiguous cache tensors (each one layer's K or V), [R, S, H, D] or
    heads-first [R, H, S, D], random contents (so a wrong move shows)."""
    shape = (R, H, S, D) if heads_first else (R, S, H, D)
    return [torch.randn(shape, dtype=dtype, device=device, generator=gen) for _ in range(L)]


def torch_compact(caches: List[torch.Tensor], base_len: torch.Tensor, keep_index: torch.Tensor,
                  num_keep: torch.Tensor, heads_first: bool) -> torch.Tensor:
    """What an engine without our kernels writes: one gather index for the
    batch, then per layer gather the kept entries into a temporary and write
    them back (two kernels a layer). Padding slots (i >= num_keep) copy onto
    themselves; in-place entries are copied too. Returns new_len [R] int32."""
    R, K = keep_index.shape
    cols = torch.arange(K, device=keep_index.device)
    dst = base_len.long().unsqueeze(1) + cols  # [R, K]
    src = torch.where(cols < num_keep.unsqueeze(1), base_len.long().unsqueeze(1) + keep_index.long(), dst)
    rows = torch.arange(R, device=keep_index.device).unsqueeze(1)
    for c in caches:
        v = c.transpose(1, 2) if heads_first else c  # [R, S, H, D] view either way
        v[rows, dst] = v[rows, src]  # the gather copies before the write: overlaps are safe
    return base_len + num_keep


def make_impls(caches: List[torch.Tensor], keep: KeepSet, heads_first: bool) -> Dict[str, Impl]:
    """The timed implementations over these caches, ours (KVLayout) first.
    Ours writes into preallocated new_len / status, as an engine step would."""
    R, dev = keep.num_keep.shape[0], keep.num_keep.device
    new_len = torch.empty(R, dtype=torch.int32, device=dev)
    status = torch.empty(R, dtype=torch.int32, device=dev)
    layout = dspark_ops.KVLayout(caches, heads_first=heads_first)  # once: reused every call

    def ours(target) -> Impl:
        return lambda base: dspark_ops.kv_compact(target, base, keep.num_appended, keep.keep_index, keep.num_keep,
                                                  new_len, heads_first=heads_first, status=status)

    return {OURS: ours(layout), "dspark_ops.kv_compact (list)": ours(caches),
            "torch per-layer": lambda base: torch_compact(caches, base, keep.keep_index, keep.num_keep, heads_first)}


def _lengths(out) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(new_len, status or None) on the CPU from an Impl's return value."""
    if isinstance(out, tuple):
        return out[0].cpu(), out[1].cpu()
    return out.cpu(), None


CPU_CHECK_TENSORS = 4  # tensors checked against the CPU op per case


def expected_layers(caches: List[torch.Tensor], keep: KeepSet, base: torch.Tensor, heads_first: bool,
                    against: Optional[str]):
    """Yields (layer, expected CPU tensor), then a last (None, (new_len,
    status)): from the CPU op one layer at a time (against="CPU op"; layers
    are independent, so this bounds host memory on 11 GB caches) or from the
    reference (against="reference"); nothing for against=None."""
    if against == "CPU op":
        k, b = keep.cpu(), base.cpu()
        # Layers are independent and take the same path: the first few bound
        # the host copy of caches that can reach 11 GB.
        for l, c in enumerate(caches[:CPU_CHECK_TENSORS]):
            x = c.to("cpu", copy=True)  # a copy even on the CPU: the caches stay untouched
            lens = dspark_ops.kv_compact([x], b, k.num_appended, k.keep_index, k.num_keep, heads_first=heads_first)
            yield l, x
        yield None, lens
    elif against == "reference":
        out, new_len, status = reference.kv_compact(caches, base, keep.num_appended, keep.keep_index,
                                                    keep.num_keep, heads_first=heads_first)
        yield from enumerate(out)
        yield None, (new_len, status)


def check(caches: List[torch.Tensor], keep: KeepSet, base: torch.Tensor, heads_first: bool,
          against: Optional[str]) -> Dict[str, str]:
    """Run every implementation once on its own fresh copy of the (still
    untouched) caches and compare exactly (torch.equal): ours (KVLayout)
    against `against` ("CPU op" on CUDA, "reference" on small CPU cases,
    None: no independent check), the others against ours. Returns impl
    name -> verdict."""
    first = [c.clone() for c in caches]
    impls = make_impls(first, keep, heads_first)
    got_len, got_status = _lengths(impls[OURS](base))
    verdicts = {OURS: ""}
    bad, n = 0, 0
    for l, exp in expected_layers(caches, keep, base, heads_first, against):
        if l is None:
            bad += int(not torch.equal(got_len, exp[0].cpu())) + int(not torch.equal(got_status, exp[1].cpu()))
        else:
            bad, n = bad + int(not torch.equal(first[l].cpu(), exp)), n + 1
    if n:
        verdicts[OURS] = (f"ok (vs {against}, {n} tensors)" if bad == 0
                          else f"{bad} tensors/lengths differ vs {against}")
    if int((got_status != 0).sum()):
        verdicts[OURS] += f"; {int((got_status != 0).sum())} nonzero status"
    for name in list(impls)[1:]:
        other = [c.clone() for c in caches]
        new_len, _ = _lengths(make_impls(other, keep, heads_first)[name](base))
        diff = sum(not torch.equal(a, b) for a, b in zip(other, first)) + int(not torch.equal(new_len, got_len))
        verdicts[name] = "= KVLayout result" if diff == 0 else f"{diff} tensors/lengths differ from KVLayout"
        del other
    return verdicts


def count_device_ops(fn: Callable[[], object]) -> Tuple[Optional[int], Optional[int]]:
    """(kernels, memcpy/memset) one call puts on the GPU, from
    torch.profiler; (None, None) where the profiler is unavailable."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
        copies = sum(n.startswith(("Memcpy", "Memset")) for n in names)
        return len(names) - copies, copies
    except Exception as e:  # no CUPTI, another torch: report nothing rather than fail the run
        print(f"# note: kernel count skipped ({type(e).__name__}: {e})")
        return None, None


def host_issue_us(fn: Callable[[int], object], iters: int) -> float:
    """Median host time to issue one call on an idle GPU (synchronised
    before each, not after): near the event time, the eager timing is
    bound by host overhead rather than by the copies."""
    samples = []
    for i in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(samples)


def run_case(R: int, L: int, H: int, D: int, appended: int, kept: int, layout: str, dtype: torch.dtype,
             scenario: str, device: str, iters: int, copy_gbs: float) -> List[dict]:
    """Time kv_compact and the PyTorch baseline on L cache tensors (one per
    layer's K or V) of R requests, H heads x D, each request having appended
    `appended` entries after a base of BASE[device] and keeping `kept`.
    One row per implementation, ours (KVLayout) first."""
    heads_first = layout == "heads_first"
    gen = torch.Generator(device=device).manual_seed(0)
    base0 = BASE["cuda" if device == "cuda" else "cpu"]
    S = base0 + appended
    caches = make_caches(R, L, S, H, D, dtype, heads_first, device, gen)
    keep = make_keep(R, appended, kept, scenario, device, torch.Generator().manual_seed(1))
    entry = H * D * caches[0].element_size()
    moved = keep.moved_entries()
    bytes_moved = 2 * moved * entry * L  # read + write of every entry not in place, every layer
    # Rotating windows (base, base - appended, ...) so each call's entries come
    # from DRAM, not L2; sized on every kept entry read + written (the baseline's
    # traffic; ours in a chain touches none).
    n_buf = min(rotation_count(2 * R * kept * entry * L, device), base0 // appended + 1)
    bases = [torch.full((R,), base0 - j * appended, dtype=torch.int32, device=device) for j in range(n_buf)]

    against = "CPU op" if device == "cuda" else ("reference" if R * L <= REFERENCE_MAX_PAIRS else None)
    verdicts = check(caches, keep, bases[0], heads_first, against)
    impls = make_impls(caches, keep, heads_first)  # the timed caches are mutated from here on
    rows, t_ours = [], None
    for name, fn in impls.items():
        # Repeating a compaction moves the same bytes again (sources and
        # destinations are fixed), so every timed call costs the same.
        call = lambda i: fn(bases[i % n_buf])  # noqa: E731
        stats = time_fn(call, device, iters)
        host_us = host_issue_us(call, iters) if device == "cuda" else None
        kernels, copies = count_device_ops(lambda: fn(bases[0])) if device == "cuda" else (None, None)
        us = stats["median_us"]
        t_ours = t_ours or us
        gbs = bytes_moved / (us * 1e-6) / 1e9 if bytes_moved else None
        rows.append({"op": "kv_compact", "impl": name, "layout": layout, "scenario": scenario, "R": R,
                     "tensors": L, "model_layers": L // 2, "H": H, "D": D, "S": S, "appended": appended,
                     "kept": kept, "dtype": str(dtype).split(".")[-1], "rotations": n_buf,
                     "moved_entries_per_tensor": moved, "bytes_moved": bytes_moved, **stats,
                     "GBps": gbs, "frac_copy_bw": gbs / copy_gbs if gbs is not None else None,
                     "time_vs_dspark": us / t_ours, "host_issue_us": host_us, "kernels": kernels,
                     "device_copies": copies, "check": verdicts.get(name)})
    del caches, impls, fn, call
    if device == "cuda":
        torch.cuda.empty_cache()  # the next case may need the memory of three copies of 11 GB
    return rows
