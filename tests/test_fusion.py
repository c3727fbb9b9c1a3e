"""The layer-wise fusion op: reference, Triton kernels (interpreter on CPU) against float64, errors."""

import pytest
import torch

from ampfuse import testing
from ampfuse.kernels import runtime
from ampfuse.ops.fusion import fusion_layer, fusion_layer_reference


def fusion_inputs(B=2, T=13, d=48, widths=(20,), dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0, mean=0.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean
        return t.to(device=device, dtype=dtype).requires_grad_()

    return dict(x=rand(B, T, d), modalities=[rand(B, T, w) for w in widths],
                gate_w=[rand(d, d + w, std=(d + w) ** -0.5) for w in widths], gate_b=[rand(d, std=0.3) for _ in widths],
                proj_w=[rand(d, w, std=w ** -0.5) for w in widths], proj_b=[rand(d, std=0.3) for _ in widths],
                ln_weight=rand(d, std=0.2, mean=1.0), ln_bias=rand(d, std=0.2))


def leaves(tensors):
    return [t for v in tensors.values() for t in (v if isinstance(v, list) else [v]) if t.requires_grad]


def check(tensors, **kw):
    tol = testing.TOLERANCE[tensors["x"].dtype]
    keep = kw.pop("keep_mask", None)
    y = fusion_layer(**tensors, **kw, backend="triton")
    ref = testing.float64_copy(tensors)
    y64 = fusion_layer_reference(**ref, **{k: v for k, v in kw.items() if k not in ("dropout_p", "training")})
    if keep is not None:
        y64 = y64 * keep / (1 - kw["dropout_p"])
    assert testing.rel_err(y, y64) < tol, testing.rel_err(y, y64)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(y, leaves(tensors), dy.to(y.device, y.dtype))
    grads64 = torch.autograd.grad(y64, leaves(ref), dy)
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        assert testing.rel_err(g, g64) < tol, (i, testing.rel_err(g, g64))


@pytest.mark.parametrize("beta", [1.0, 0.05])  # alpha clamped at 1, and alpha < 1 (its gradient flows)
@pytest.mark.parametrize("widths", [(20,), (74, 35), (3, 17, 8, 12)])
def test_triton_matches_float64_reference(beta, widths, device):
    check(fusion_inputs(widths=widths, device=device), beta=beta)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_triton_half_precision_d384_ragged(dtype, device):
    check(fusion_inputs(B=3, T=7, d=384, widths=(74, 35), dtype=dtype, device=device), beta=0.3)


def test_triton_frozen_modalities_and_dropout_with_the_kernels_mask(device):
    from ampfuse.kernels.adapter_block import dropout_keep_mask

    tensors = fusion_inputs(widths=(20, 9), device=device)
    for m in tensors["modalities"]:
        m.requires_grad_(False)
    torch.manual_seed(3)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    keep = dropout_keep_mask(seed, (26, 48), 0.25).reshape(2, 13, 48).cpu()
    torch.manual_seed(3)  # fusion_layer draws the same seed
    check(tensors, beta=0.2, dropout_p=0.25, training=True, keep_mask=keep)


def test_triton_launch_counts(device):
    tensors = fusion_inputs(widths=(20, 9), device=device)
    before = runtime.launch_count
    y = fusion_layer(**tensors, backend="triton")
    assert runtime.launch_count - before == 1
    before = runtime.launch_count
    y.backward(torch.randn_like(y))
    assert runtime.launch_count - before == 2


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.__setitem__("modalities", [t["modalities"][0][:, :5]]), r"modalities\[0\] must be token-aligned"),
    (lambda t: t["gate_w"].__setitem__(0, t["gate_w"][0][:, :-1]), r"gate_w\[0\] must have shape"),
    (lambda t: t.__setitem__("proj_b", []), "one gate_w, gate_b, proj_w, proj_b for each"),
    (lambda t: t.__setitem__("ln_bias", t["ln_bias"][:3]), "ln_bias must have shape"),
])
def test_bad_input_names_the_argument(mutate, message):
    tensors = fusion_inputs()
    mutate(tensors)
    with pytest.raises(ValueError, match=message):
        fusion_layer(**tensors, backend="triton")
