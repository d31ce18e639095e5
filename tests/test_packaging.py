"""Packaging: the torch-free headers reach the wheel and get_include(), setup.py
names its prerequisites, the metadata builds without deprecation warnings.
No compiling of the extension: setup.py runs its build_py step only (~3 s)."""
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import dspark_ops
from tools_path import find_cuda_home

ROOT = Path(__file__).resolve().parent.parent
HEADERS = {"core": "*.h", "kernels": "*.cuh"}  # setup.py's HEADERS: what other engines include
needs_checkout = pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source checkout")


def checkout_headers():
    """{"core/philox.h": path, ...}: the headers under csrc/ that the wheel must ship."""
    return {f"{sub}/{p.name}": p
            for sub, pattern in HEADERS.items() for p in sorted((ROOT / "csrc" / sub).glob(pattern))}


def run_setup(*args, env=None, prelude=""):
    """setup.py in a fresh interpreter (it sets CUDA_HOME and TORCH_CUDA_ARCH_LIST in its process)."""
    code = "; ".join(["import runpy, sys", *([prelude] if prelude else []),
                      f"sys.argv = ['setup.py', *{list(args)!r}]", "runpy.run_path('setup.py', run_name='__main__')"])
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_get_include_has_the_headers():
    inc = Path(dspark_ops.get_include())
    assert (inc / "dspark_ops" / "core" / "philox.h").is_file()
    assert (inc / "dspark_ops" / "kernels" / "sample.cuh").is_file()
    shipped = {f"{sub}/{p.name}"
               for sub, pattern in HEADERS.items() for p in (inc / "dspark_ops" / sub).glob(pattern)}
    if (ROOT / "csrc").is_dir():
        assert shipped == set(checkout_headers())


def test_get_include_headers_include_each_other_relatively():
    """kernels/*.cuh reach core/ as "../core/x.h": every quoted include resolves from the header's folder."""
    inc = Path(dspark_ops.get_include()) / "dspark_ops"
    headers = [p for sub, pattern in HEADERS.items() for p in (inc / sub).glob(pattern)]
    assert headers
    for header in headers:
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', header.read_text(), re.M):
            assert (header.parent / name).is_file(), f"{header}: #include \"{name}\" does not resolve"


def test_get_include_path_preprocesses(tmp_path):
    """The README's include lines through the preprocessor: -I get_include(), "dspark_ops/..."."""
    inc = Path(dspark_ops.get_include())
    cuda_home = find_cuda_home()
    if cuda_home is not None:  # every header
        compiler = [str(Path(cuda_home) / "bin" / "nvcc"), "-std=c++20"]
        names = sorted(str(p.relative_to(inc)) for sub, pattern in HEADERS.items()
                       for p in (inc / "dspark_ops" / sub).glob(pattern))
        source = tmp_path / "engine.cu"
    elif shutil.which("g++"):  # the host-side core only
        compiler = ["g++", "-std=c++20"]
        names = ["dspark_ops/core/philox.h", "dspark_ops/core/verify.h"]
        source = tmp_path / "engine.cpp"
    else:
        pytest.skip("neither nvcc nor g++")
    source.write_text("".join(f'#include "{name}"\n' for name in names))
    proc = subprocess.run([*compiler, "-E", f"-I{inc}", "-o", os.devnull, str(source)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@needs_checkout
def test_build_py_puts_the_headers_in_the_wheel(tmp_path):
    """setup.py's build_py (what the wheel is made of) copies csrc/{core,kernels} to
    dspark_ops/include/dspark_ops/, without a deprecation warning; the default arch list embeds PTX."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    (tmp_path / "egg").mkdir()
    proc = run_setup("egg_info", "--egg-base", str(tmp_path / "egg"),
                     "build_py", "--build-lib", str(tmp_path / "lib"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = tmp_path / "lib" / "dspark_ops" / "include" / "dspark_ops"
    expected = checkout_headers()
    assert expected and "core/philox.h" in expected and "kernels/sample.cuh" in expected
    for name, src in expected.items():
        assert (built / name).read_bytes() == src.read_bytes(), name
    assert (tmp_path / "lib" / "dspark_ops" / "decoding" / "weights" / "default.json").is_file()
    output = proc.stdout + proc.stderr
    assert "Deprecation" not in output and "Package would be ignored" not in output, output[-3000:]
    backends = re.search(r"dspark_ops: building backends .*arch=(\S+)\)", proc.stdout)
    assert backends, proc.stdout[-2000:]
    if backends.group(1) != "-":  # a CUDA build: A100 and H100 code, and PTX for newer GPUs
        assert backends.group(1) == "8.0;9.0+PTX"


@needs_checkout
def test_setup_without_torch_names_the_prerequisites():
    proc = run_setup("--version", prelude="sys.modules['torch'] = None")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "install the torch build your engine uses, ninja, setuptools>=77 and wheel first" in proc.stderr


@needs_checkout
def test_setup_warns_without_ninja(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # no ninja (nor nvcc: CUDA comes from CUDA_HOME or /usr/local/cuda*)
    proc = run_setup("--version", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ninja not found" in proc.stderr


@needs_checkout
def test_license_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"]
    assert "setuptools>=77" in project["build-system"]["requires"]  # the SPDX string needs it
    assert "Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()
    assert "include LICENSE" in (ROOT / "MANIFEST.in").read_text().splitlines()
