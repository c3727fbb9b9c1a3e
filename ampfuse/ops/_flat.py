"""Parameter gradients as views of a backward's flat buffer (each fused op's backward writes all its
parameter gradients into one buffer, placed by the op's gradient layout)."""

import functools

import torch


@functools.lru_cache(maxsize=None)
def _row_major(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def gradient_view(flat, offset, param):
    """The gradient of ``param`` laid out row-major at element ``offset`` of ``flat``: one as_strided view
    in param's shape (a split of the buffer makes a tensor per slot, and a view after it is a second aten
    call: microseconds each, per parameter per layer), cast only where ``param`` has another dtype.
    Autograd keeps such a view as .grad without a copy."""
    grad = flat.as_strided(param.shape, _row_major(param.shape), flat.storage_offset() + offset)
    return grad if grad.dtype == param.dtype else grad.to(param.dtype)


def summed_partials(flat, offset, count, param):
    """A learned scalar's gradient from the ``count`` partials at ``offset`` of ``flat``, summed in fp32, in
    param's shape and dtype."""
    grad = flat.narrow(0, offset, count).sum(dtype=torch.float32).view(param.shape)
    return grad if grad.dtype == param.dtype else grad.to(param.dtype)
