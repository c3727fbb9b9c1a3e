"""ampfuse: fused kernels for parameter-efficient multimodal adaptation of frozen BERT-family models."""

from .backend import BackendUnavailableError, info, use_backend
from .config import AdapterConfig
from .memory import saved_tensor_bytes
from .models import MultimodalConfig, MultimodalModel, patch_multimodal
from .modules import BottleneckAdapter, FusionLayer, GMUAdapter
from .ops import adapter_block, adapter_block_reference, fusion_layer, gmu_adapter
from .patch import (load_adapterhub, load_adapters, patch, print_trainable_parameters, save_adapters,
                    trainable_parameters, unpatch)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "BackendUnavailableError", "BottleneckAdapter", "FusionLayer", "GMUAdapter", "MultimodalConfig",
    "MultimodalModel", "adapter_block", "adapter_block_reference", "fusion_layer", "gmu_adapter", "info",
    "load_adapterhub", "load_adapters", "patch", "patch_multimodal", "print_trainable_parameters", "save_adapters",
    "saved_tensor_bytes", "trainable_parameters", "unpatch", "use_backend",
]

import os as _os  # noqa: E402

# The Triton kernels live in kernels/ beside this folder and are installed as ampfuse.kernels. When
# this package is imported straight from a source checkout (python -m ... from the repository
# root), let ampfuse.kernels resolve to that folder too.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
        _os.path.join(_here, _os.pardir, "kernels", "__init__.py")):
    __path__.append(_os.path.dirname(_here))  # noqa: F821 - __path__ exists in a package's __init__
