"""Pack SGLang's tree verification kernels small enough to carry to the GPU
machine (the peer of bench/tree_bench.py, through bench/sglang_peer.py).

sgl-kernel's wheel is 535 MB and built for another torch, so it never
travelled. The sglang wheel (39 MB) carries JIT copies of the same kernels:
sglang/kernels/jit/csrc/speculative/{sampling,tree}.cuh and the headers they
include (sglang/kernels/jit/include, ~0.5 MB), built by SGLang against
FlashInfer's headers and tvm-ffi, both already in tools/pack_flashinfer.py's
pack. This keeps exactly those sources, as one .tar.xz (git-ignored):

    .venv/bin/python tools/pack_flashinfer.py    # first: FlashInfer's headers, tvm-ffi
    .venv/bin/python tools/pack_sglang.py        # -> .peer/sglang-<version>-speculative.tar.xz

then tools/gpu_check.sh unpacks it and builds the module there (~20 s).
Here it also checks the pack: tools/peer/sglang_speculative.cu compiles and
links against it for sm_90a (running needs a GPU). Needs the network (pip
download) and nvcc.
"""
from __future__ import annotations

import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.sglang_peer import nvcc_command  # noqa: E402
from pack_flashinfer import pack_args  # noqa: E402 (beside this file)

VERSION = "0.5.23"
JIT = "sglang/kernels/jit/"
SOURCES = ("csrc/speculative/sampling.cuh", "csrc/speculative/tree.cuh")  # the rest: include/**


def download(dest: pathlib.Path) -> pathlib.Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest),
                    f"sglang=={VERSION}"], check=True)
    return next(dest.glob("sglang-*.whl"))


def main() -> None:
    args = pack_args(__doc__)
    out = args.out
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        whl = download(tmp)
        pack = out / f"sglang-{VERSION}-speculative.tar.xz"
        with zipfile.ZipFile(whl) as z, tarfile.open(pack, "w:xz") as t:
            names = [n for n in z.namelist() if n.startswith(JIT + "include/") and not n.endswith("/")]
            names += [JIT + s for s in SOURCES]
            for n in names:
                z.extract(n, tmp / "src")
                t.add(tmp / "src" / n, arcname=n[len(JIT):])
        print(f"pack_sglang: {len(names)} files from {whl.name} -> {pack.name} ({pack.stat().st_size / 1e6:.2f} MB)")
        if not args.no_compile_check:
            check_compiles(pack, out, tmp)


def check_compiles(pack: pathlib.Path, peer: pathlib.Path, tmp: pathlib.Path) -> None:
    """Build the peer module from the pack with the headers of the FlashInfer
    pack and the tvm-ffi wheel beside it (and curand.h from torch's nvidia
    wheels when the toolkit lacks it)."""
    src, deps = tmp / "unpacked", tmp / "deps"
    with tarfile.open(pack) as t:
        t.extractall(src)
    fi = next(peer.glob("flashinfer-*-sampling.tar.xz"), None)
    ffi = next(peer.glob("apache_tvm_ffi-*.whl"), None)
    if fi is None or ffi is None:
        raise SystemExit("pack_sglang: run tools/pack_flashinfer.py first (FlashInfer's headers, tvm-ffi)")
    with tarfile.open(fi) as t:
        t.extractall(deps, members=[m for m in t.getmembers() if m.name.startswith("flashinfer/data/include/")])
    with zipfile.ZipFile(ffi) as z:
        z.extractall(deps)
    inc = [deps / "tvm_ffi" / "include", deps / "flashinfer" / "data" / "include"]
    import torch  # curand.h: the nvidia-* wheels torch pulled in
    nvidia = pathlib.Path(torch.__file__).parents[1] / "nvidia"
    inc += [p for p in nvidia.glob("*/include") if (p / "curand.h").exists()]
    so = tmp / "sglang_speculative.so"
    res = subprocess.run(nvcc_command(src, so, inc, deps / "tvm_ffi" / "lib"), capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"pack_sglang: the peer does not build from the pack:\n{(res.stdout + res.stderr)[-3000:]}")
    syms = subprocess.run(["nm", "-D", str(so)], capture_output=True, text=True).stdout
    exported = sorted(s.split()[-1] for s in syms.splitlines() if "__tvm_ffi_" in s and " T " in s)
    print(f"pack_sglang: the peer builds from the pack for sm_90a ({so.stat().st_size / 1e6:.1f} MB): {exported}")


if __name__ == "__main__":
    main()
