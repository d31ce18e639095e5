"""Build dspark_ops: the CPU kernels always, the CUDA kernels when torch has
CUDA and nvcc is found.

Environment:
  DSPARK_FORCE_CUDA=1   a missing CUDA build is an error; =0 skips CUDA.
  TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;9.0": A100, H100/H200).
  CUDA_HOME             the CUDA toolkit (found from nvcc or /usr/local/cuda*
                        when unset).
  MAX_JOBS              parallel compile jobs (torch's cpp_extension).
Install with `pip install --no-build-isolation .` so the build uses the torch
you already have.
"""
import glob
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
from cuda_env import find_cuda_home, nvidia_wheel_includes  # noqa: E402


force = os.environ.get("DSPARK_FORCE_CUDA")
cuda_home = find_cuda_home() if force != "0" else None
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import (BuildExtension, CppExtension, CUDAExtension,  # noqa: E402
                                       is_ninja_available)

with_cuda = force != "0" and torch.version.cuda is not None and cuda_home is not None
if force == "1" and not with_cuda:
    sys.exit(
        "dspark_ops: DSPARK_FORCE_CUDA=1 but the CUDA build is impossible: "
        f"torch {torch.__version__} has CUDA {torch.version.cuda}, nvcc found at {cuda_home}"
    )

cpp_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
# -ffp-contract=off: CPU sums are rounded products added one by one (the CUDA kernels' __fmul_rn/__fadd_rn and
# the reference's order), whatever -march a packager adds; packed_gemm's FMAs are explicit.
cxx_flags = ["-O3", "-Wall", "-Wno-unknown-pragmas", "-ffp-contract=off"]
link_flags = []
# With torch's OpenMP backend, at::parallel_for (ATen/ParallelOpenMP.h, inlined into our CPU ops) runs serially
# unless we compile with OpenMP too; we then use torch's runtime (libgomp on Linux wheels).
if "parallel backend: OpenMP" in torch.__config__.parallel_info():
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
include_dirs = [str(ROOT / "csrc")]
if with_cuda:
    sources = cpp_sources + sorted(glob.glob("csrc/cuda/*.cu"))
    extension = CUDAExtension(
        "dspark_ops._C",
        sources,
        include_dirs=include_dirs + nvidia_wheel_includes(),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
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

setup(
    ext_modules=[extension],
    # ninja builds the sources in parallel (MAX_JOBS); without it, serially.
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=is_ninja_available())},
)
