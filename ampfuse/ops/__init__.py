"""Ops: one module per op family, each with its plain-PyTorch reference and its custom op."""

from .adapter_block import adapter_block, adapter_block_reference
from .fusion import fusion_layer, fusion_layer_reference
from .gmu import gmu_adapter, gmu_adapter_reference

__all__ = ["adapter_block", "adapter_block_reference", "fusion_layer", "fusion_layer_reference", "gmu_adapter",
           "gmu_adapter_reference"]
