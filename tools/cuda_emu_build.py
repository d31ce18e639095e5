"""Build the emulated CUDA extension: csrc's CUDA bindings and kernels
compiled by the host compiler against tools/cuda_emu's stand-in headers, so
that the kernels run on the CPU (blocks in turn, threads as fibers; see
include/cuda_emu/runtime.h). The ops register for CPU tensors as
torch.ops.dspark_emu.*, beside the real torch.ops.dspark_ops.*.

    python tools/cuda_emu_build.py        # build (cached) and load

What it checks and what it cannot: tools/cuda_emu/README.md.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "cuda_emu"
BUILD = ROOT / "build" / "cuda_emu"

# `name<targs><<<cfg>>>(` -> `::cuemu::Launch(cfg).named("name")(name<targs>, `
_LAUNCH = re.compile(r"(([A-Za-z_][\w:]*)(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(\s*(\)?)")


def rewrite_launches(text: str) -> str:
    """Rewrite every triple-chevron launch of `text` into a cuemu::Launch call."""
    def repl(m: re.Match) -> str:
        kernel, name, cfg, empty = m.groups()
        return f'::cuemu::Launch({cfg}).named("{name}")({kernel}' + (")" if empty else ", ")
    return _LAUNCH.sub(repl, text)


# `__shared__ T a[n], b;` on one line -> the same, then each name poisoned
# once per block (runtime.h: poison_shared).
_SHARED = re.compile(r"^(\s*)__shared__\s+([\w:<>]+(?:\s*\*)?)\s+([^;{}()]+);(.*)$", re.M)


def rewrite_shared(text: str) -> str:
    """Make every one-line __shared__ declaration fill its variables with
    0xFF bytes when the block first reaches it: a read before any write
    then sees NaN / -1, not the previous block's values."""
    def repl(m: re.Match) -> str:
        decl, rest = m.group(0)[:m.end(3) - m.start(0)] + ";", m.group(4)
        names = [re.search(r"(\w+)\s*(?:\[[^\]]*\]\s*)*$", d).group(1) for d in m.group(3).split(",")]
        poison = " ".join(f"::cuemu::poison_shared(&{n}, sizeof({n}));" for n in names)
        return f"{decl} {poison}{rest}"
    return _SHARED.sub(repl, text)


def _rewrite(path: Path) -> str:
    """Both rewrites of one source file; a launch or a __shared__ declaration
    left in a form they do not handle is an error, not a silent gap."""
    text = rewrite_shared(rewrite_launches(path.read_text()))
    for i, line in enumerate(text.splitlines(), 1):
        code = line.split("//")[0]
        if "<<<" in code or ("__shared__" in code and "poison_shared" not in line):
            raise RuntimeError(f"cuda_emu: {path}:{i}: a launch or __shared__ declaration the emulator's build "
                               f"cannot rewrite (keep each on its own line in the usual form): {line.strip()}")
    return text


def _write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def generate_sources() -> list[Path]:
    """Copy csrc (launches rewritten) under build/cuda_emu/src; return the
    translation units: the schemas, one per CUDA binding, the emulator's
    self-test kernels, its runtime."""
    src = BUILD / "src"
    csrc = ROOT / "csrc"
    for f in sorted(csrc.rglob("*")):
        # csrc/cpu's kernels are not CUDA code; its headers come along (ops.cpp includes packed_gemm.h)
        cpu = "cpu" in f.relative_to(csrc).parts
        if f.is_file() and f.suffix in ({".h"} if cpu else {".h", ".cuh", ".cu", ".cpp"}):
            _write_if_changed(src / "csrc" / f.relative_to(csrc), _rewrite(f))
    units = [src / "csrc" / "ops.cpp"]
    for cu in sorted((csrc / "cuda").glob("*.cu")):
        unit = src / f"emu_{cu.stem}.cpp"
        _write_if_changed(unit, f'#include "csrc/cuda/{cu.name}"\n')
        units.append(unit)
    selftest = src / "selftest.cpp"  # the emulator's own negative controls, launches rewritten too
    _write_if_changed(selftest, _rewrite(HERE / "src" / "selftest.cu"))
    units += [selftest, HERE / "src" / "runtime.cpp"]
    return units


def asan_requested() -> bool:
    """CUEMU_ASAN=1: build with AddressSanitizer, which then checks every
    emulated global, shared and local memory access (the process must start
    with libasan preloaded; see `make test-emulated-asan`)."""
    return os.environ.get("CUEMU_ASAN") == "1"


def load(verbose: bool = False) -> None:
    """Build (once; ninja rebuilds what changed) and load the emulated ops."""
    import torch
    from torch.utils.cpp_extension import load as load_extension

    if hasattr(torch.ops, "dspark_emu") and hasattr(torch.ops.dspark_emu, "verify_chunk"):
        return
    units = generate_sources()
    asan = asan_requested()
    out = BUILD / ("build_asan" if asan else "build")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []
    load_extension(
        name="dspark_ops_cuda_emu" + ("_asan" if asan else ""),
        sources=[str(u) for u in units],
        extra_include_paths=[str(HERE / "include"), str(BUILD / "src")],
        extra_cflags=["-std=c++20", "-O2", "-DDSPARK_CUDA_EMU", "-include", "cuda_emu/prelude.h",
                      "-Wno-unknown-pragmas", "-fno-strict-aliasing", "-ffp-contract=off"] + sanitize,
        extra_ldflags=sanitize,
        build_directory=str(out),
        is_python_module=False,
        with_cuda=False,
        verbose=verbose,
    )


class _EmulatedOps:
    """torch.ops.dspark_ops with every op the CUDA bindings implement taken
    from torch.ops.dspark_emu (the rest, host-only helpers, unchanged)."""

    def __getattr__(self, name: str):
        import torch
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"dspark_emu::{name}", "CPU"):
            return getattr(torch.ops.dspark_emu, name)
        return getattr(torch.ops.dspark_ops, name)


def route_ops_to_emulator() -> Callable[[], None]:
    """Make the dspark_ops package call the emulated CUDA kernels for CPU
    tensors: every loaded dspark_ops module's `_ops` handle is replaced.
    Returns the function that undoes it."""
    import torch
    load()
    emulated = _EmulatedOps()
    modules = []
    for name, module in list(sys.modules.items()):
        if name.startswith("dspark_ops") and getattr(module, "_ops", None) is torch.ops.dspark_ops:
            module._ops = emulated
            modules.append(module)
    if not modules:
        raise RuntimeError("cuda_emu: no dspark_ops module holds the _ops handle to re-route")

    def undo() -> None:
        for module in modules:
            module._ops = torch.ops.dspark_ops
    return undo


@contextlib.contextmanager
def emulated_ops() -> Iterator[None]:
    """Within the block, the package's ops run the emulated CUDA kernels."""
    undo = route_ops_to_emulator()
    try:
        yield
    finally:
        undo()


if __name__ == "__main__":
    load(verbose="-v" in sys.argv)
    import torch
    print("loaded:", sorted(n for n in dir(torch.ops.dspark_emu) if not n.startswith("_")))
