"""Backend choice per call: ``cuda`` (compiled extension), ``triton``, ``torch`` (reference).

Precedence: an explicit ``backend=`` argument, then the innermost ``use_backend(...)`` context,
then the ``AMPFUSE_BACKEND`` environment variable, then the default (``triton`` for CUDA tensors
when Triton is importable, ``torch`` otherwise). Asking for a backend that cannot run the call
raises ``BackendUnavailableError`` saying why.
"""

import contextlib
import contextvars
import functools
import importlib
import os

import torch

BACKENDS = ("cuda", "triton", "torch")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_override = contextvars.ContextVar("ampfuse_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call (not built, no GPU, unsupported dtype)."""


def _check_name(name, source):
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ampfuse ops inside this block on ``name`` (one of ``cuda``, ``triton``, ``torch``)."""
    token = _override.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend():
    """The backend asked for by context or environment, or None for the default."""
    name = _override.get()
    if name is None:
        env = os.environ.get("AMPFUSE_BACKEND", "").strip()
        name = _check_name(env, "AMPFUSE_BACKEND") if env else None
    return name


@functools.cache
def _import_error(module: str):
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available", with its reason
        return f"{type(exc).__name__}: {exc}"
    return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(name: str, device: torch.device, dtypes):
    """None when ``name`` can run tensors of this device and dtype(s) (one dtype, or a tuple of the
    operands' dtypes), else the reason in words."""
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    if name == "torch":
        return None
    for dtype in dtypes:
        if dtype not in KERNEL_DTYPES:
            return f"dtype {dtype} is not supported by the {name} kernels (float16, bfloat16, float32)"
    if name == "triton":
        error = _import_error("triton")
        if error:
            return f"triton cannot be imported ({error})"
        if device.type != "cuda" and not interpreting():
            return (f"tensors are on {device}; the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 "
                    "(set before ampfuse is imported) to run the kernels in Triton's CPU interpreter")
        if interpreting() and torch.bfloat16 in dtypes:  # refused rather than a silently wrong answer
            return ("Triton's CPU interpreter (TRITON_INTERPRET=1) keeps bfloat16 as raw bits, so bfloat16 "
                    "arithmetic comes out wrong there (triton issue 11584); use float16 or float32 in the "
                    "interpreter and bfloat16 on a GPU")
        return None
    error = _import_error("ampfuse._C")
    if error:
        return ("the CUDA extension ampfuse._C is not built (reinstall with a CUDA build of torch and a CUDA "
                f"toolkit present; {error})")
    if device.type != "cuda":
        return f"tensors are on {device}; the cuda backend needs CUDA tensors"
    return None


@torch.compiler.assume_constant_result  # decided once when torch.compile traces the caller
def resolve(device: torch.device, dtype, explicit=None, op: str = "op") -> str:
    """The backend that runs this call (``dtype``: one dtype or a tuple of the operands' dtypes);
    raises BackendUnavailableError when it cannot."""
    name = _check_name(explicit, "backend") if explicit is not None else requested_backend()
    if name is None:
        if device.type == "cuda" and why_unavailable("triton", device, dtype) is None:
            return "triton"
        return "torch"
    reason = why_unavailable(name, device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"ampfuse {op}: backend {name!r} is unavailable: {reason}")
    return name


def info() -> dict:
    """Which backends this installation can use, and why not where it cannot."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    report = {"torch": torch.__version__, "device": str(device),
              "cuda_available": torch.cuda.is_available(), "triton_interpret": interpreting(), "backends": {}}
    for name in BACKENDS:
        reason = why_unavailable(name, device, torch.float32)
        report["backends"][name] = {"available": reason is None, "reason": reason}
    return report
