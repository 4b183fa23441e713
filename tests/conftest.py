"""Shared test setup.

Without a GPU, Triton kernels run through the interpreter: TRITON_INTERPRET must be set before
any kernel is defined (importing torch defines none). With a GPU they run compiled.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


# The tests use small tensors: one thread avoids oversubscribing a small machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """The device a Triton kernel test runs on: CPU tensors under the interpreter, CUDA tensors
    with the compiled kernels (a module may define its own `device`)."""
    from prong_ext import _triton_ops

    if request.param == "cpu" and not _triton_ops.INTERPRETED:
        pytest.skip("CPU tensors run the kernels only under TRITON_INTERPRET=1")
    if request.param == "cuda" and _triton_ops.INTERPRETED:
        pytest.skip("run with TRITON_INTERPRET=0 to test the compiled kernels")
    return request.param
