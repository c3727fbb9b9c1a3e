"""nn.Modules that own the trainable parameters of the fused ops."""

from .bottleneck import BottleneckAdapter

__all__ = ["BottleneckAdapter"]
