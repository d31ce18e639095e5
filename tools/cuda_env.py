"""Finding the CUDA toolkit and the nvidia-* wheel headers (used by setup.py
and tools/cuda_check.py, so the user never has to set them)."""
import glob
import importlib.util
import os
import shutil
from pathlib import Path


def _is_toolkit(home):
    """A real toolkit: nvcc and the cudart library the link needs (a wrapper
    script such as /usr/local/bin/nvcc would make torch guess /usr/local)."""
    return bool(home) and Path(home, "bin", "nvcc").exists() and bool(
        glob.glob(os.path.join(home, "lib*", "libcudart.so*"))
        or glob.glob(os.path.join(home, "targets", "*", "lib", "libcudart.so*")))


def find_cuda_home():
    """The CUDA toolkit: $CUDA_HOME / $CUDA_PATH, nvcc on PATH, /usr/local/cuda*."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((home for home in candidates if _is_toolkit(home)), None)


def nvidia_wheel_includes():
    """Headers of the nvidia-* wheels torch depends on (cusparse.h, cublas...),
    which ATen/cuda/CUDAContext.h includes."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return dirs
