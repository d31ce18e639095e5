"""dspark_ops: CUDA kernels (with CPU twins and a pure-PyTorch reference) for
lossless speculative decoding."""
from __future__ import annotations

import torch

from ._enums import ABORT_MASK, Purpose, SiblingMode, Status
from .chain import VerifyResult, empty_verify_result, verify_chunk
from .markov import MarkovResult, markov_draft
from .kv import KVLayout, RequestState, commit_tokens, kv_compact, tree_to_keep
from .ops import SampleResult, empty_sample_result, sample, workspace_size
from .packed_linear import pack_linear_weight, packed_linear, packed_linear_kernel
from .schedule import fit_sequential_temperatures, measure_sps, schedule_verify
from .tree import TreeResult, empty_tree_result, verify_tree

__version__ = "0.1.0"


def cuda_kernels_available() -> bool:
    """Whether this build registered CUDA kernels (true even without a GPU
    present: the kernels are compiled in; running them needs a device)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("dspark_ops::sample", "CUDA")


def get_include() -> str:
    """The directory to put on an engine's include path (``-I``) for the
    torch-free headers: ``#include "dspark_ops/kernels/sample.cuh"``,
    ``"dspark_ops/core/philox.h"``, ... (raw pointers, sizes and a
    ``cudaStream_t``; no torch include).

    An installed wheel has them in ``dspark_ops/include``. A source checkout
    (editable or in-place build) keeps them in ``csrc/core`` and
    ``csrc/kernels`` only; there this returns ``build/include``, whose
    ``dspark_ops/core`` and ``dspark_ops/kernels`` are links to them, made
    on first call, so the same ``#include`` lines work."""
    from pathlib import Path

    package = Path(__file__).resolve().parent
    installed = package / "include"
    if (installed / "dspark_ops" / "kernels").is_dir():
        return str(installed)
    root = package.parent
    if not (root / "csrc" / "kernels").is_dir():
        raise FileNotFoundError(f"dspark_ops.get_include: the headers are neither in {installed} nor in a "
                                f"source checkout at {root / 'csrc'}")
    tree = root / "build" / "include"
    for sub in ("core", "kernels"):
        link = tree / "dspark_ops" / sub
        if link.exists():
            continue
        try:
            if link.is_symlink():  # dangling (the checkout moved): make it anew
                link.unlink()
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path("..", "..", "..", "csrc", sub), target_is_directory=True)
        except FileExistsError:  # made meanwhile by another process
            pass
        except OSError as err:  # a read-only checkout
            raise OSError(f"dspark_ops.get_include: cannot make {link} -> csrc/{sub} in this source checkout "
                          f"({err}); put {root / 'csrc'} on the include path and include \"kernels/...\" "
                          "and \"core/...\" instead") from err
    return str(tree)


__all__ = ["ABORT_MASK", "KVLayout", "Purpose", "RequestState", "SampleResult", "Status", "VerifyResult",
           "__version__", "commit_tokens", "cuda_kernels_available", "empty_sample_result", "empty_verify_result",
           "fit_sequential_temperatures", "get_include", "kv_compact", "markov_draft", "MarkovResult",
           "measure_sps", "pack_linear_weight", "packed_linear", "packed_linear_kernel", "sample",
           "schedule_verify", "SiblingMode", "TreeResult", "empty_tree_result", "tree_to_keep", "verify_tree",
           "verify_chunk", "workspace_size"]
