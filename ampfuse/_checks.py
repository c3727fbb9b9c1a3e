"""Argument checks that turn bad input into a ValueError naming the argument and what was expected."""

import torch


def tensor(name, value, *, shape=None, device=None, floating=True, dtype=None):
    """``value`` as a tensor of ``shape`` on ``device``: of ``dtype`` where given, else floating-point
    unless ``floating`` is False."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {value.dtype}")
    if dtype is None and floating and not value.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device}, expected {device} (the device of h)")
    return value


def optional_tensor(name, value, **kwargs):
    return None if value is None else tensor(name, value, **kwargs)


def choice(name, value, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def probability(name, value):
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def positive(name, value):
    if not float(value) > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def scaling(value, d, device):
    """An adapter's scaling: a float, or a one-element or (d,) tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        tensor("scaling", value, device=device)
        if value.numel() != 1 and tuple(value.shape) != (d,):
            raise ValueError(f"scaling must be a float, a one-element tensor or a ({d},) tensor, "
                             f"got shape {tuple(value.shape)}")
    elif not isinstance(value, (int, float)):
        raise TypeError(f"scaling must be a float or a tensor, got {type(value).__name__}")
