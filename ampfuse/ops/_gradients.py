"""Turning a backward kernel's flat fp32 gradient buffer into per-input gradients (all op families)."""


def split_gradients(flat, layout, tensors):
    """{name: gradient} for each entry (name, offset, shape) of ``layout``: a view of ``flat`` cast
    to the dtype of ``tensors[name]``. "name.i" names element i of a list input; every list input
    of ``tensors`` comes back as a list, None where the layout has no entry."""
    grads = {name: [None] * len(value) for name, value in tensors.items() if isinstance(value, (list, tuple))}
    for name, offset, _ in layout:
        base, _, index = name.partition(".")
        param = tensors[base][int(index)] if index else tensors[base]
        grad = flat[offset:offset + param.numel()].view(param.shape).to(param.dtype)
        if index:
            grads[base][int(index)] = grad
        else:
            grads[base] = grad
    return grads


def needed(grads, tensors, names, needs_input_grad):
    """The gradients in input order, None where autograd needs none; a list input always gets a
    list back (its structure must match the input's), of Nones when none is needed."""
    out = []
    for name, need in zip(names, needs_input_grad):
        value = tensors[name]
        if isinstance(value, (list, tuple)):
            out.append(grads.get(name) if need and name in grads else [None] * len(value))
        else:
            out.append(grads.get(name) if need else None)
    return tuple(out)
