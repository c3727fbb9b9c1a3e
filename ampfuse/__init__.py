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
    "MultimodalModel", "adapter_block", "adapter_block_reference", "fusion_layer", "gmu_adapter", "info", "load_adapterhub", "load_adapters", "patch", "patch_multimodal", "print_trainable_parameters", "save_adapters",
    "saved_tensor_bytes", "trainable_parameters", "unpatch", "use_backend",
]
