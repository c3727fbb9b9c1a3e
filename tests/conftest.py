import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; Triton reads this variable
# when ampfuse.kernels is imported, so it is set before any test module imports ampfuse.
HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_GPU else "cpu")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel forgets to write fails the test."""
    from ampfuse.kernels import runtime

    monkeypatch.setattr(runtime, "POISON_OUTPUTS", True)


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
