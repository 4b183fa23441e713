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
