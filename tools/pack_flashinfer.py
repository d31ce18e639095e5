"""Pack FlashInfer's sampling kernels small enough to carry to the GPU machine
(the peer in bench/verify_bench.py and bench/sample_bench.py).

The flashinfer-python wheel is 62 MB (426 MB unpacked) and a device call
carries 64 MiB with the repository, so it never travelled. What
`import flashinfer.sampling` loads is ~11 MB of Python; the sampling module
is JIT-compiled from three .cu files and FlashInfer's headers. This keeps
exactly that (the import closure, measured by importing it here, plus
data/include and the sampling sources), as one .tar.xz, next to the
apache-tvm-ffi wheel it needs for the device's Python 3.12:

    .venv/bin/python tools/pack_flashinfer.py          # -> .peer/ (git-ignored)

then `tools/gpu_check.sh` unpacks it, JIT-builds the sampling module for
sm_90a (~1 min there) and the benchmarks pick FlashInfer up. Here it also
checks the pack: the trimmed package imports, and the sampling module's
sources compile with nvcc (linking needs the GPU driver's libcuda, absent on
a machine without a GPU). Needs the network (pip download) and nvcc.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
VERSION = "0.7.2.post1"
TVM_FFI = "apache-tvm-ffi<0.2,>=0.1.11"
HOST_DEPS = ["requests", "tabulate", "einops", "nvidia-ml-py", "click", "packaging", "tqdm"]  # on the device already
SAMPLING_SOURCES = ("sampling.cu", "renorm.cu", "flashinfer_sampling_binding.cu", "sampling_utils.h",
                    "tvm_ffi_utils.h", "runtime_utils.h")
CLOSURE = """
import sys
import flashinfer.sampling, flashinfer.jit.sampling
root = sys.argv[1]
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None)
    if f and f.startswith(root):
        print(f[len(root):])
"""


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download(dest: pathlib.Path, spec: str, python: str) -> pathlib.Path:
    before = set(dest.glob("*.whl"))
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64", "--platform",
        "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(dest), spec)
    new = set(dest.glob("*.whl")) - before
    name = spec.split("<")[0].split("=")[0].replace("-", "_")
    return (new or {w for w in dest.glob("*.whl") if w.name.startswith(name)}).pop()


def closure(site: pathlib.Path, deps: pathlib.Path) -> list:
    """The files under site/ that importing flashinfer.sampling loads."""
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{deps}")
    res = subprocess.run([sys.executable, "-c", CLOSURE, f"{site}/"], env=env, capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    if res.returncode:
        raise SystemExit(f"pack_flashinfer: import flashinfer.sampling failed:\n{res.stderr[-3000:]}")
    return sorted(set(res.stdout.split()))


def check_compiles(site: pathlib.Path, deps: pathlib.Path, work: pathlib.Path) -> None:
    """JIT-build the sampling module from the trimmed tree: every object must
    compile; the link may fail only for the driver library."""
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{deps}", FLASHINFER_WORKSPACE_BASE=str(work),
               FLASHINFER_CUDA_ARCH_LIST="9.0", CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda-13.0"))
    env["PATH"] = f"{env['CUDA_HOME']}/bin{os.pathsep}{env['PATH']}"
    import torch  # curand.h and friends: the nvidia-* wheels torch pulled in, when the toolkit lacks them
    nv = pathlib.Path(torch.__file__).parents[1] / "nvidia" / "cu13" / "include"
    if nv.is_dir():
        env["CPATH"] = f"{nv}{os.pathsep}{env.get('CPATH', '')}"
    code = "from flashinfer.jit.sampling import gen_sampling_module; gen_sampling_module().build(verbose=False)"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    log = res.stdout + res.stderr
    objects = list(work.rglob("*.cuda.o"))
    if res.returncode == 0 or (len(objects) == 3 and "cannot find -lcuda" in log):
        print(f"pack_flashinfer: the sampling module's {len(objects)} objects compile from the pack"
              + ("" if res.returncode == 0 else " (the link needs libcuda: on the GPU machine)"))
        return
    raise SystemExit(f"pack_flashinfer: the trimmed sources do not build:\n{log[-3000:]}")


def pack_args(doc: str) -> argparse.Namespace:
    """The pack scripts' command line (this one's and pack_sglang.py's):
    --out (default .peer/, created; args.out a Path) and --no-compile-check."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / ".peer")
    ap.add_argument("--no-compile-check", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def main() -> None:
    args = pack_args(__doc__)
    out = args.out
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        wheels, site, deps = tmp / "wheels", tmp / "site", tmp / "deps"
        wheels.mkdir()
        fi_whl = download(wheels, f"flashinfer-python=={VERSION}", "3.12")
        ffi_312 = download(wheels, TVM_FFI, "3.12")
        ffi_here = download(wheels, TVM_FFI, f"{sys.version_info.major}.{sys.version_info.minor}")
        with zipfile.ZipFile(fi_whl) as z:
            z.extractall(site)
        pip("install", "-q", "--no-compile", "--target", str(deps), *HOST_DEPS)  # only to import it here
        pip("install", "-q", "--no-deps", "--no-compile", "--target", str(deps), str(ffi_here))

        keep = closure(site, deps)
        data = site / "flashinfer" / "data"
        keep += [str(p.relative_to(site)) for p in (data / "include").rglob("*") if p.is_file()]
        keep += [f"flashinfer/data/csrc/{name}" for name in SAMPLING_SOURCES]
        keep += [str(p.relative_to(site)) for p in site.glob("flashinfer_python-*.dist-info/*") if p.is_file()]
        keep = sorted(set(keep))
        trimmed = tmp / "trimmed"
        for rel in keep:
            (trimmed / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(site / rel, trimmed / rel)
        size = sum((trimmed / rel).stat().st_size for rel in keep)
        pack = out / f"flashinfer-{VERSION}-sampling.tar.xz"
        with tarfile.open(pack, "w:xz") as t:
            for rel in keep:
                t.add(trimmed / rel, arcname=rel)
        for old in out.glob("apache_tvm_ffi-*.whl"):
            old.unlink()
        shutil.copy2(ffi_312, out / ffi_312.name)
        print(f"pack_flashinfer: {len(keep)} files, {size / 1e6:.1f} MB -> {pack.name} "
              f"{pack.stat().st_size / 1e6:.1f} MB, plus {ffi_312.name} ({ffi_312.stat().st_size / 1e6:.1f} MB)")

        check = tmp / "check"
        with tarfile.open(pack) as t:
            t.extractall(check)
        got = closure(check, deps)  # the pack imports on its own
        print(f"pack_flashinfer: import flashinfer.sampling from the pack loads {len(got)} of its files")
        if not args.no_compile_check:
            check_compiles(check, deps, tmp / "ws")


if __name__ == "__main__":
    main()
