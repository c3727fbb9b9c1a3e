"""Ops: one module per op family, each with its plain-PyTorch reference and its custom op."""

from .adapter_block import adapter_block, adapter_block_reference

__all__ = ["adapter_block", "adapter_block_reference"]
