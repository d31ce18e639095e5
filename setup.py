"""Build dspark_ops: the CPU kernels always, the CUDA kernels when torch has
CUDA and nvcc is found.

Environment:
  DSPARK_FORCE_CUDA=1   a missing CUDA build is an error; =0 skips CUDA.
  TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;9.0+PTX": A100,
                        H100/H200 code, and sm_90 PTX that the driver compiles
                        for newer GPUs on first use).
  CUDA_HOME             the CUDA toolkit (found from nvcc or /usr/local/cuda*
                        when unset).
  MAX_JOBS              parallel compile jobs (torch's cpp_extension).
  DSPARK_DEBUG=1        keep the host debug info (-g from Python's CFLAGS:
                        ~20 MB of a 57 MB .so); the default adds -g0.
  DSPARK_OPENMP=0       build the CPU ops without OpenMP (one thread per op;
                        also the fallback when the compiler lacks it).
Install with `pip install --no-build-isolation .` so the build uses the torch
you already have.

The wheel also carries the torch-free headers (csrc/core, csrc/kernels) as
dspark_ops/include/dspark_ops/{core,kernels}: dspark_ops.get_include().
"""
import glob
import os
import shlex
import subprocess
import sys
from pathlib import Path

import setuptools
from setuptools import setup
from setuptools.command.build_py import build_py

PREREQUISITES = ("install the torch build your engine uses, ninja, setuptools>=77 and wheel first "
                 "(pip install torch ninja 'setuptools>=77' wheel), then run pip install --no-build-isolation .")
if int(setuptools.__version__.split(".")[0]) < 77:  # pyproject's SPDX `license` string (PEP 639)
    sys.exit(f"dspark_ops: setuptools {setuptools.__version__} is too old: {PREREQUISITES}")

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
from cuda_env import find_cuda_home, nvidia_wheel_includes  # noqa: E402


force = os.environ.get("DSPARK_FORCE_CUDA")
cuda_home = find_cuda_home() if force != "0" else None
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
# +PTX: GPUs newer than sm_90 (Blackwell) JIT-compile the sm_90 PTX instead of failing with "no kernel image".
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, is_ninja_available
except ImportError as err:  # --no-build-isolation: pyproject's build requirements are not installed for us
    sys.exit(f"dspark_ops: building needs torch ({err}): {PREREQUISITES}")

with_cuda = force != "0" and torch.version.cuda is not None and cuda_home is not None
if force == "1" and not with_cuda:
    sys.exit(
        "dspark_ops: DSPARK_FORCE_CUDA=1 but the CUDA build is impossible: "
        f"torch {torch.__version__} has CUDA {torch.version.cuda}, nvcc found at {cuda_home}"
    )

cpp_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
# -ffp-contract=off: CPU sums are rounded products added one by one (the CUDA kernels' __fmul_rn/__fadd_rn and
# the reference's order), whatever -march a packager adds; packed_gemm's FMAs are explicit.
# -std=c++20 whatever torch's default (2.11 builds C++17, 2.14 C++20): the bindings' template lambdas are C++20.
cxx_flags = ["-std=c++20", "-O3", "-Wall", "-Wno-unknown-pragmas", "-ffp-contract=off"]
# Python's CFLAGS carry -g: ~20 MB of host debug info in a 57 MB .so. nvcc gets no -g (its -lineinfo stays).
if os.environ.get("DSPARK_DEBUG") != "1":
    cxx_flags.append("-g0")
link_flags = []
# With torch's OpenMP backend, at::parallel_for (ATen/ParallelOpenMP.h, inlined into our CPU ops) runs serially
# unless we compile with OpenMP too; we then use torch's runtime (libgomp on Linux wheels).
def compiler_has_openmp() -> bool:
    """Whether the host compiler takes -fopenmp and has omp.h (a toolchain without it would fail the build)."""
    cxx = shlex.split(os.environ.get("CXX", "c++"))  # "ccache g++", "g++ -m64"
    try:
        return subprocess.run([*cxx, "-fopenmp", "-fsyntax-only", "-x", "c++", "-"], input="#include <omp.h>\n",
                              capture_output=True, text=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


if "parallel backend: OpenMP" in torch.__config__.parallel_info() and os.environ.get("DSPARK_OPENMP") != "0":
    if compiler_has_openmp():
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    else:
        print("dspark_ops: WARNING: the C++ compiler has no OpenMP (-fopenmp, omp.h): the CPU ops run their "
              "batches on one thread", file=sys.stderr, flush=True)
include_dirs = [str(ROOT / "csrc")]
if with_cuda:
    sources = cpp_sources + sorted(glob.glob("csrc/cuda/*.cu"))
    extension = CUDAExtension(
        "dspark_ops._C",
        sources,
        include_dirs=include_dirs + nvidia_wheel_includes(),
        extra_compile_args={"cxx": cxx_flags,
                            "nvcc": ["-std=c++20", "-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
        extra_link_args=link_flags,
    )
else:
    extension = CppExtension("dspark_ops._C", cpp_sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

print(
    f"dspark_ops: building backends CPU{' + CUDA' if with_cuda else ''} "
    f"(torch {torch.__version__}, CUDA_HOME={cuda_home}, "
    f"arch={os.environ['TORCH_CUDA_ARCH_LIST'] if with_cuda else '-'})",
    flush=True,
)
use_ninja = is_ninja_available()
if not use_ninja:
    print("dspark_ops: WARNING: ninja not found (pip install ninja): the sources compile one at a time, "
          "several times slower", file=sys.stderr, flush=True)

# The torch-free headers other engines include, copied into the wheel (not kept twice in git). Their relative
# includes (kernels/*.cuh -> ../core/*.h) keep working: the two folders stay siblings.
HEADERS = {"core": "*.h", "kernels": "*.cuh"}
HEADER_DEST = ("dspark_ops", "include", "dspark_ops")


class BuildPyWithHeaders(build_py):
    """build_py, plus csrc/{core,kernels} -> dspark_ops/include/dspark_ops/{core,kernels}. An editable install
    copies nothing: dspark_ops.get_include() serves the checkout's csrc/ then."""

    def header_files(self):
        """[(source, destination)] under build_lib."""
        return [(str(src), os.path.join(self.build_lib, *HEADER_DEST, sub, src.name))
                for sub, pattern in HEADERS.items() for src in sorted((ROOT / "csrc" / sub).glob(pattern))]

    def run(self):
        super().run()
        if self.editable_mode:
            return
        for src, dst in self.header_files():
            self.mkpath(os.path.dirname(dst))
            self.copy_file(src, dst)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else outputs + [dst for _, dst in self.header_files()]


setup(
    ext_modules=[extension],
    cmdclass={
        # ninja builds the sources in parallel (MAX_JOBS); without it, serially.
        "build_ext": BuildExtension.with_options(use_ninja=use_ninja),
        "build_py": BuildPyWithHeaders,
    },
)
