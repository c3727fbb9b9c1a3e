"""nn.Modules that own the trainable parameters of the fused ops."""

from .bottleneck import BottleneckAdapter
from .fusion import FusionLayer
from .gmu import GMUAdapter

__all__ = ["BottleneckAdapter", "FusionLayer", "GMUAdapter"]
