"""GPU tests are marked `cuda` and skipped without a GPU, unless
DSPARK_REQUIRE_CUDA=1, which turns the skip into a failure so a GPU run
cannot pass vacuously."""
import os

import pytest
import torch

import dspark_ops  # noqa: F401

REQUIRE_CUDA = os.environ.get("DSPARK_REQUIRE_CUDA") == "1"

# DSPARK_EMULATE_CUDA=1: the package's ops run the CUDA kernels in the
# emulator (tools/cuda_emu) on CPU tensors, so the CPU suites check them.
EMULATE_CUDA = os.environ.get("DSPARK_EMULATE_CUDA") == "1"
if EMULATE_CUDA:
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import cuda_emu_build  # noqa: E402
    cuda_emu_build.route_ops_to_emulator()


def pytest_collection_modifyitems(config, items):
    if EMULATE_CUDA:
        for item in items:  # registration checks: the emulated namespace has no fake kernels to check
            if "opcheck" in item.name or "compile" in item.name or "fake_kernel" in item.name:
                item.add_marker(pytest.mark.skip(reason="DSPARK_EMULATE_CUDA=1 runs kernels, not registrations"))
    if torch.cuda.is_available() or REQUIRE_CUDA:
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (DSPARK_REQUIRE_CUDA=1 makes this a failure)"))


@pytest.fixture(autouse=True)
def _require_cuda(request):
    if "cuda" in request.keywords and not torch.cuda.is_available():
        pytest.fail("DSPARK_REQUIRE_CUDA=1 but no CUDA GPU is available")
