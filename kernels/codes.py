"""Integer codes shared by every layer that switches on them: the Python ops, the Triton kernels
(kernels/common.py wraps each as a tl.constexpr) and the CUDA extension (setup.py passes each as a
-D macro, AMPFUSE_<GROUP>_<NAME>). Plain Python, no imports: setup.py reads this file before
torch or triton is importable. A code is its name's index in the tuple."""

# Activations of the bottleneck (ampfuse.ops.activations holds their plain-PyTorch forms).
ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu", "tanh")

# How the adapter output is scaled: a Python float (no gradient), a learned scalar tensor, or a
# learned per-channel (d,) tensor.
SCALE_MODES = ("float", "scalar", "channel")


def code(group, name):
    """The code of ``name`` in ``group`` (one of the tuples above)."""
    return group.index(name)


def macros():
    """{"AMPFUSE_ACT_RELU": 1, ...}: every code as the C macro the CUDA sources use."""
    out = {}
    for prefix, group in (("ACT", ACTIVATIONS), ("SCALE", SCALE_MODES)):
        for index, name in enumerate(group):
            out[f"AMPFUSE_{prefix}_{name.upper()}"] = index
    return out
