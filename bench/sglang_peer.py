"""SGLang's tree verification kernels as a benchmark peer (issue: verify_tree
against SGLang's `tree_speculative_sampling_target_only` and
`verify_tree_greedy`). The sgl-kernel wheel (535 MB, built for another
torch) cannot travel to the GPU machine; SGLang's JIT copies of the same
kernels can: tools/pack_sglang.py packs their sources from the sglang wheel
(never committed here), tools/gpu_check.sh unpacks them and calls
:func:`build`, which compiles tools/peer/sglang_speculative.cu with SGLang's
JIT flags, and the benchmark loads the module with tvm-ffi (as SGLang does).

    DSPARK_SGLANG_PEER=/path/to/sglang_speculative.so  -> load() finds it
"""
from __future__ import annotations

import math
import os
import pathlib
import shutil
import subprocess
from typing import List, Optional, Sequence

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
WRAPPER = ROOT / "tools" / "peer" / "sglang_speculative.cu"
ENV = "DSPARK_SGLANG_PEER"


def nvcc_command(src: pathlib.Path, out: pathlib.Path, includes: Sequence[pathlib.Path], tvm_lib: pathlib.Path,
                 arch: str = "90a") -> List[str]:
    """SGLang's JIT flags (sglang.kernels.jit.utils: -std=c++20 -O3
    --expt-relaxed-constexpr, the GPU's exact arch, -DSGL_CUDA_ARCH) for one
    shared module; src: the unpacked pack (include/, csrc/)."""
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    digits = "".join(c for c in arch if c.isdigit())
    return [nvcc, "-std=c++20", "-O3", "--expt-relaxed-constexpr", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            f"-DSGL_CUDA_ARCH={int(digits) * 10}", "-Xcompiler", "-fPIC", "-shared",
            f"-I{src / 'include'}", f"-I{src / 'csrc'}", *(f"-I{p}" for p in includes), str(WRAPPER),
            "-o", str(out), f"-L{tvm_lib}", "-ltvm_ffi", "-lcudart"]


def installed_includes() -> tuple:
    """(include dirs, tvm-ffi's lib dir) from the installed packages: tvm-ffi's
    headers, FlashInfer's (SGLang's sampler is built on flashinfer/sampling.cuh),
    and curand.h from the nvidia-* wheels when the toolkit lacks it."""
    import flashinfer
    import tvm_ffi
    tvm = pathlib.Path(tvm_ffi.__file__).parent
    inc = [tvm / "include", pathlib.Path(flashinfer.__file__).parent / "data" / "include"]
    try:
        import nvidia
        inc += [p for p in pathlib.Path(nvidia.__path__[0]).glob("*/include") if (p / "curand.h").exists()]
    except ImportError:
        pass
    return inc, tvm / "lib"


def build(src: pathlib.Path, out: pathlib.Path, arch: str = "90a") -> pathlib.Path:
    """Compile the peer module from the unpacked sources `src`; returns `out`."""
    inc, lib = installed_includes()
    res = subprocess.run(nvcc_command(src, out, inc, lib, arch), capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"sglang peer: nvcc failed:\n{(res.stdout + res.stderr)[-3000:]}")
    return out


class SGLangPeer:
    """SGLang's two entry points on torch tensors, with the inputs SGLang's
    EAGLE worker builds: fp32 target probabilities (a softmax of every node
    row; zeros as draft probabilities: "target only"), per-request linked
    lists of first children and next siblings, uniform coins."""

    def __init__(self, module):
        self.module = module

    def sample(self, predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
               retrive_next_sibling, uniform_samples, uniform_final, target_probs, draft_probs) -> None:
        vec = math.gcd(4, target_probs.shape[-1])  # as sglang.kernels.ops.speculative.sampling picks it
        fn = {4: self.module.sample_vec4, 2: self.module.sample_vec2, 1: self.module.sample_vec1}[vec]
        fn(predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
           retrive_next_sibling, uniform_samples, uniform_final, target_probs, draft_probs, 1.0, 1.0)

    def greedy(self, predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
               retrive_next_sibling, target_predict) -> None:
        self.module.verify_tree_greedy(predicts, accept_index, accept_token_num, candidates, retrive_index,
                                       retrive_next_token, retrive_next_sibling, target_predict)


def load() -> Optional[SGLangPeer]:
    """The peer built by tools/gpu_check.sh ($DSPARK_SGLANG_PEER), or None
    (not built here, or tvm-ffi absent: the benchmark then skips it)."""
    path = os.environ.get(ENV)
    if not path or not torch.cuda.is_available():
        return None
    try:
        import tvm_ffi
        return SGLangPeer(tvm_ffi.load_module(path))
    except Exception as e:  # noqa: BLE001 -- a peer that does not load is skipped, and said so
        print(f"# note: the SGLang peer at {path} did not load ({type(e).__name__}: {e})")
        return None


def linked_lists(children: List[List[int]], R: int, device) -> tuple:
    """SGLang's tree layout for R copies of one tree: retrive_next_token [R, N]
    (each node's first child, -1) and retrive_next_sibling [R, N] (its next
    sibling, -1), int64."""
    N = len(children)
    first, sibling = [-1] * N, [-1] * N
    for u, kids in enumerate(children):
        if kids:
            first[u] = kids[0]
        for a, b in zip(kids, kids[1:]):
            sibling[a] = b
    as_rows = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device).expand(R, N).contiguous()  # noqa: E731
    return as_rows(first), as_rows(sibling)
