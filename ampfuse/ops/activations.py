"""The activations the fused ops support, as plain PyTorch (the reference side of kernels/common.py)."""

import torch
import torch.nn.functional as F

from ..kernels import codes

ACTIVATIONS = {
    "identity": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
}
assert tuple(ACTIVATIONS) == codes.ACTIVATIONS, "kernels/codes.py and this table must list the same activations"

# Names other libraries use for the same functions (the adapters library says "swish").
ALIASES = {"swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "linear": "identity"}


def canonical(name: str) -> str:
    name = ALIASES.get(name.lower(), name.lower())
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)} (or an alias {tuple(ALIASES)}), "
                         f"got {name!r}")
    return name
