"""ForwardContext: the model-level inputs of one forward, for modules deep inside a frozen model.

MultimodalModel.forward enters a context holding the batch's modality tensors; the GMU adapters
and fusion layers, which the frozen model's own layers call several frames down, read them with
``modality_tensors(names)``. Contexts live on a thread-local stack, as in the adapters library's
ForwardContext, so two threads can run one model on different inputs at the same time.

Activation checkpointing reruns a layer during backward, after the model's forward has left its
context, and possibly on another thread (the autograd engine runs GPU backward on its own
threads). ``in_context(checkpoint_fn)`` wraps a checkpoint function so that the checkpointed
function re-enters, on every run, the context that was current when it was first called; this
holds for reentrant and non-reentrant checkpointing alike.
"""

import threading
from typing import Mapping, Optional

_local = threading.local()


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


class ForwardContext:
    """``with ForwardContext(modalities={"audio": A}): model(...)``: the modules the model calls
    read ``A`` through ``modality_tensors(["audio"])``, and leave per-forward results (a GMU
    adapter's gate statistics) in ``records[module]``. Nested contexts shadow outer ones."""

    def __init__(self, modalities: Mapping[str, object] = ()):
        self.modalities = dict(modalities)
        self.records = {}

    def __enter__(self) -> "ForwardContext":
        _stack().append(self)
        return self

    def __exit__(self, *exc) -> None:
        _stack().pop()

    @staticmethod
    def current() -> Optional["ForwardContext"]:
        stack = _stack()
        return stack[-1] if stack else None


def modality_tensors(names):
    """The current context's tensors for ``names``, in that order; a ValueError names any missing."""
    context = ForwardContext.current()
    given = {} if context is None else context.modalities
    missing = [n for n in names if n not in given]
    if missing:
        raise ValueError(f"no input for modalities {missing}: pass them to the model's forward "
                         f"(as {', '.join(f'{n}=...' for n in missing)})"
                         + ("" if context is not None else "; called outside any ampfuse ForwardContext"))
    return [given[n] for n in names]


def record(module, value) -> None:
    """Keeps ``value`` as ``module``'s result of this forward, when a context is entered."""
    context = ForwardContext.current()
    if context is not None:
        context.records[module] = value


def in_context(checkpoint_fn):
    """Wraps ``checkpoint_fn(function, *args, **kwargs)`` (torch.utils.checkpoint.checkpoint or a
    partial of it) so the checkpointed function runs in the context current at the first call,
    also when backward recomputes it."""
    if getattr(checkpoint_fn, "_ampfuse_in_context", False):
        return checkpoint_fn

    def checkpoint(function, *args, **kwargs):
        context = ForwardContext.current()
        if context is None:
            return checkpoint_fn(function, *args, **kwargs)

        def run(*run_args, **run_kwargs):
            with context:
                return function(*run_args, **run_kwargs)
        return checkpoint_fn(run, *args, **kwargs)

    checkpoint._ampfuse_in_context = True
    return checkpoint
