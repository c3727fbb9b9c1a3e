"""ampfuse: fused kernels for parameter-efficient multimodal adaptation of frozen BERT-family models."""

import os as _os

# The Triton kernels live in kernels/ beside this folder and are installed as ampfuse.kernels. When
# this package is imported straight from a source checkout (python -m ... from the repository
# root), let ampfuse.kernels resolve to that folder too: before the imports below, which import it.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
        _os.path.join(_here, _os.pardir, "kernels", "__init__.py")):
    __path__.append(_os.path.dirname(_here))  # noqa: F821 - __path__ exists in a package's __init__

from .backend import BackendUnavailableError, info, use_backend  # noqa: E402
from .config import AdapterConfig  # noqa: E402
from .memory import saved_tensor_bytes  # noqa: E402
from .models import MultimodalConfig, MultimodalModel, patch_multimodal  # noqa: E402
from .modules import BottleneckAdapter, FusionLayer, GMUAdapter  # noqa: E402
from .ops import adapter_block, adapter_block_reference, fusion_layer, gmu_adapter  # noqa: E402
from .patch import (load_adapterhub, load_adapters, patch, print_trainable_parameters, save_adapters,  # noqa: E402
                    trainable_parameters, unpatch)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "BackendUnavailableError", "BottleneckAdapter", "FusionLayer", "GMUAdapter", "MultimodalConfig",
    "MultimodalModel", "adapter_block", "adapter_block_reference", "fusion_layer", "gmu_adapter", "info",
    "load_adapterhub", "load_adapters", "patch", "patch_multimodal", "print_trainable_parameters", "save_adapters",
    "saved_tensor_bytes", "trainable_parameters", "unpatch", "use_backend",
]
