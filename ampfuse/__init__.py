"""ampfuse: fused kernels for parameter-efficient multimodal adaptation of frozen BERT-family models."""

from .backend import BackendUnavailableError, info, use_backend
from .modules import BottleneckAdapter
from .ops import adapter_block, adapter_block_reference

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "BottleneckAdapter", "adapter_block", "adapter_block_reference", "info", "use_backend"]
