"""GPU tests are marked `cuda` and skipped without a GPU, unless
DSPARK_REQUIRE_CUDA=1, which turns the skip into a failure so a GPU run
cannot pass vacuously."""
import os

import pytest
import torch

import dspark_ops  # noqa: F401

REQUIRE_CUDA = os.environ.get("DSPARK_REQUIRE_CUDA") == "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or REQUIRE_CUDA:
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (DSPARK_REQUIRE_CUDA=1 makes this a failure)"))


@pytest.fixture(autouse=True)
def _require_cuda(request):
    if "cuda" in request.keywords and not torch.cuda.is_available():
        pytest.fail("DSPARK_REQUIRE_CUDA=1 but no CUDA GPU is available")
