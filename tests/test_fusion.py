"""The layer-wise fusion op: reference, Triton kernels (interpreter on CPU) against float64, errors."""

import pytest
import torch

from ampfuse import testing
from ampfuse.kernels import runtime
from ampfuse.ops.fusion import fusion_layer, fusion_layer_reference


def fusion_inputs(B=2, T=13, d=48, widths=(20,), dtype=torch.float32, param_dtype=None, device="cpu", seed=0,
                  row_offset=0.0):
    """Fresh random inputs, every tensor requiring grad. ``param_dtype``: the parameters' own dtype (autocast's
    mix keeps them in fp32). ``row_offset``: each row of x gets a common value of that standard deviation,
    as hidden states with large means have."""
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype

    def rand(*shape, std=1.0, mean=0.0, dt=param_dtype):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean
        return t.to(device=device, dtype=dt).requires_grad_()

    x = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    x += row_offset * torch.randn(B, T, 1, generator=g, dtype=torch.float64)
    return dict(x=x.to(device=device, dtype=dtype).requires_grad_(),
                modalities=[rand(B, T, w, dt=dtype) for w in widths],
                gate_w=[rand(d, d + w, std=(d + w) ** -0.5) for w in widths], gate_b=[rand(d, std=0.3) for _ in widths],
                proj_w=[rand(d, w, std=w ** -0.5) for w in widths], proj_b=[rand(d, std=0.3) for _ in widths],
                ln_weight=rand(d, std=0.2, mean=1.0), ln_bias=rand(d, std=0.2))


def leaves(tensors):
    return [t for v in tensors.values() for t in (v if isinstance(v, list) else [v]) if t.requires_grad]


def alphas(tensors, beta):
    """The reference's alpha per token, before its clamp at 1 (float64)."""
    from ampfuse.ops.fusion import fusion_shift

    t = testing.float64_copy(tensors)
    shift = fusion_shift(t["x"], t["modalities"], t["gate_w"], t["gate_b"], t["proj_w"], t["proj_b"])
    return (beta * t["x"].norm(dim=-1) / (shift.norm(dim=-1) + 1e-6)).detach()


def check(tensors, tol=None, **kw):
    """fusion_layer on the triton backend against the float64 reference: y and the gradient of every leaf
    that requires grad, each in its own input's dtype (y in x's promoted with ln_weight's)."""
    tol = tol or testing.TOLERANCE[tensors["x"].dtype]
    keep = kw.pop("keep_mask", None)
    y = fusion_layer(**tensors, **kw, backend="triton")
    assert y.shape == tensors["x"].shape and y.dtype == torch.promote_types(tensors["x"].dtype,
                                                                            tensors["ln_weight"].dtype)
    ref = testing.float64_copy(tensors)
    y64 = fusion_layer_reference(**ref, **{k: v for k, v in kw.items() if k not in ("dropout_p", "training")})
    if keep is not None:
        y64 = y64 * keep / (1 - kw["dropout_p"])
    assert testing.rel_err(y, y64) < tol, testing.rel_err(y, y64)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(y, leaves(tensors), dy.to(y.device, y.dtype))
    grads64 = torch.autograd.grad(y64, leaves(ref), dy)
    for i, (t, g, g64) in enumerate(zip(leaves(tensors), grads, grads64)):
        assert g.shape == t.shape and g.dtype == t.dtype, i
        assert testing.rel_err(g, g64) < tol, (i, testing.rel_err(g, g64))
    return y


@pytest.mark.parametrize("beta", [1.0, 0.05])  # alpha clamped at 1, and alpha < 1 (its gradient flows)
@pytest.mark.parametrize("widths", [(20,), (74, 35), (3, 17, 8, 12)])
def test_triton_matches_float64_reference(beta, widths, device):
    check(fusion_inputs(widths=widths, device=device), beta=beta)


@pytest.mark.parametrize("regime", ["clamped", "free", "mixed"])
def test_triton_alpha_clamped_free_and_mixed(regime, device):
    """Every token clamped (alpha = 1: no gradient through alpha), none clamped, and half and half; no token
    within 2% of the clamp (where the gradient jumps)."""
    tensors = fusion_inputs(B=3, T=11, d=40, widths=(9, 30), device=device, seed=4)
    raw = alphas(tensors, 1.0).flatten().sort().values
    n = len(raw)
    gap = max(range(n // 3, 2 * n // 3), key=lambda i: raw[i + 1] / raw[i])  # the widest gap near the median
    beta = {"clamped": 1.5 / raw[0], "free": 0.5 / raw[-1], "mixed": (raw[gap] * raw[gap + 1]).rsqrt()}[regime].item()
    assert ((raw * beta - 1).abs() > 0.02).all()
    clamped = (raw * beta > 1).float().mean()
    assert {"clamped": clamped == 1, "free": clamped == 0, "mixed": 0.3 < clamped < 0.7}[regime]
    check(tensors, beta=beta)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_triton_half_precision_d384_ragged(dtype, device):
    check(fusion_inputs(B=3, T=7, d=384, widths=(74, 35), dtype=dtype, device=device), beta=0.3)


@pytest.mark.parametrize("B,T,d,widths", [(1, 1, 8, (1,)), (3, 7, 40, (3, 17)), (2, 19, 72, (33,)),
                                          (1, 37, 100, (5, 70))])
def test_triton_awkward_shapes(B, T, d, widths, device):
    """Token counts, d and d_m that are not multiples of any tile, and several tiles in every direction (the
    interpreter's GEMM tiles are 32 x 64 with K steps of 64, its row passes take 32-column chunks; d = 8 and
    d_m = 1 are narrower than one)."""
    check(fusion_inputs(B=B, T=T, d=d, widths=widths, device=device), beta=0.4)


def test_triton_five_modalities(device):
    """A fifth modality is configuration: the kernels loop over however many they are given."""
    check(fusion_inputs(B=2, T=5, d=40, widths=(5, 9, 3, 17, 8), device=device), beta=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_rows_with_large_means(dtype, device):
    check(fusion_inputs(B=2, T=9, d=64, widths=(12,), dtype=dtype, device=device, row_offset=30.0), beta=0.02)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_triton_autocast_mix_runs_natively(dtype, device, monkeypatch):
    """Autocast's layout: 16-bit x and modalities, fp32 parameters. The GEMMs take 16-bit operands (the
    shift the forward saves is 16-bit); y is fp32, as LN(x) with an fp32 weight (and as the eager module
    gives under CUDA autocast); dx and dm in 16-bit, the parameters' gradients in fp32."""
    from ampfuse.kernels import fusion as kernels

    seen = []
    forward = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda spec, *a, **k: seen.append(spec.operands) or forward(spec, *a, **k))
    tensors = fusion_inputs(B=3, T=7, d=80, widths=(20, 9), dtype=dtype, param_dtype=torch.float32, device=device)
    y = check(tensors, tol=testing.TOLERANCE[dtype], beta=0.3)
    assert y.dtype == torch.float32 and seen == [str(dtype)[6:]]


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_triton_under_autocast_uses_its_dtype_for_the_gemms(dtype, device, monkeypatch):
    """Under autocast an fp32 x (a BERT LayerNorm's output) gets autocast's 16-bit operands, as F.linear would,
    not fp32 dots; y stays fp32."""
    from ampfuse.kernels import fusion as kernels

    seen = []
    forward = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda spec, *a, **k: seen.append(spec.operands) or forward(spec, *a, **k))
    tensors = fusion_inputs(B=2, T=9, d=48, widths=(20,), device=device)
    with torch.autocast(device.type, dtype=dtype):
        y = fusion_layer(**tensors, beta=0.3, backend="triton")
    assert y.dtype == torch.float32 and seen == [str(dtype)[6:]]
    ref = testing.float64_copy(tensors)
    y64 = fusion_layer_reference(**ref, beta=0.3)
    assert testing.rel_err(y, y64) < testing.TOLERANCE[dtype]
    assert testing.rel_err(y, y64) > testing.TOLERANCE[torch.float32]  # it did compute in 16-bit
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves(tensors), dy)
    grads64 = torch.autograd.grad(y64, leaves(ref), dy.double().cpu())
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        assert g.dtype == torch.float32 and testing.rel_err(g, g64) < testing.TOLERANCE[dtype], i


@pytest.mark.parametrize("trainable", ["x", "modalities", "weights", "ln", "weights+ln"])
def test_triton_gradients_of_a_subset(trainable, device):
    """Only some inputs require grad (frozen parameters, frozen features): those get exact gradients, the
    others none."""
    tensors = fusion_inputs(B=2, T=10, d=40, widths=(20, 9), device=device)
    groups = {"x": ["x"], "modalities": ["modalities"], "weights": ["gate_w", "gate_b", "proj_w", "proj_b"],
              "ln": ["ln_weight", "ln_bias"]}
    wanted = [name for part in trainable.split("+") for name in groups[part]]
    for name, value in tensors.items():
        for t in value if isinstance(value, list) else [value]:
            t.requires_grad_(name in wanted)
    check(tensors, beta=0.3)


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
    """Forward: the weights packed, the shift's GEMM tiles, the row pass. Backward: the row pass, the gate
    GEMMs, the input GEMMs, the weight GEMMs over tokens, the fixed-order sum of their token splits; the
    kernels nobody needs are skipped."""
    tensors = fusion_inputs(widths=(20, 9), device=device)
    before = runtime.launch_count
    y = fusion_layer(**tensors, backend="triton")
    assert runtime.launch_count - before == 3
    before = runtime.launch_count
    y.backward(torch.randn_like(y))
    assert runtime.launch_count - before == 5
    for name, value in tensors.items():  # x alone: rows, gate, input
        for t in value if isinstance(value, list) else [value]:
            t.requires_grad_(name == "x")
    y = fusion_layer(**tensors, backend="triton")
    before = runtime.launch_count
    y.backward(torch.randn_like(y))
    assert runtime.launch_count - before == 3
    with torch.no_grad():
        before = runtime.launch_count
        fusion_layer(**tensors, backend="triton")
        assert runtime.launch_count - before == 3


def test_triton_backward_is_deterministic(device):
    tensors = fusion_inputs(B=2, T=21, d=40, widths=(20, 9), device=device)
    dy = torch.randn(2, 21, 40, device=device)
    runs = []
    for _ in range(2):
        y = fusion_layer(**tensors, beta=0.3, backend="triton")
        runs.append(torch.autograd.grad(y, leaves(tensors), dy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_launches_run_on_the_tensors_device(device):
    # Triton launches on the current CUDA device, whatever the tensors': forward, no-grad forward and
    # backward each launch inside a switch to the tensors' device (runtime.on_tensors_device)
    tensors = fusion_inputs(device=device)
    testing.assert_launches_on_device(lambda: fusion_layer(**tensors, backend="triton"), tensors["x"].device)


def test_inputs_are_not_modified(device):
    tensors = fusion_inputs(widths=(20, 9), device=device)
    before = {n: [t.detach().clone() for t in v] if isinstance(v, list) else v.detach().clone()
              for n, v in tensors.items()}
    y = fusion_layer(**tensors, beta=0.3, dropout_p=0.2, training=True, backend="triton")
    y.sum().backward()
    for name, value in tensors.items():
        listed = isinstance(value, list)
        for t, t0 in zip(value if listed else [value], before[name] if listed else [before[name]]):
            assert torch.equal(t.detach(), t0), name


def test_non_contiguous_inputs_are_copied_and_correct(device):
    tensors = fusion_inputs(widths=(20,), device=device)
    tensors["x"] = torch.randn(2, 13, 96, device=device)[..., ::2].requires_grad_()
    tensors["proj_w"] = [torch.randn(20, 48, device=device).t().requires_grad_()]
    assert not tensors["x"].is_contiguous() and not tensors["proj_w"][0].is_contiguous()
    check(tensors, beta=0.3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_tokens(backend, device):
    tensors = fusion_inputs(B=2, T=0, widths=(20, 9), device=device)
    y = fusion_layer(**tensors, backend=backend)
    assert y.shape == (2, 0, 48)
    y.sum().backward()
    assert tensors["x"].grad.shape == (2, 0, 48) and torch.count_nonzero(tensors["gate_w"][0].grad) == 0


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.__setitem__("modalities", [t["modalities"][0][:, :5]]), r"modalities\[0\] must be token-aligned"),
    (lambda t: t["gate_w"].__setitem__(0, t["gate_w"][0][:, :-1]), r"gate_w\[0\] must have shape"),
    (lambda t: t.__setitem__("proj_b", []), "one gate_w, gate_b, proj_w, proj_b for each"),
    (lambda t: t.__setitem__("ln_bias", t["ln_bias"][:3]), "ln_bias must have shape"),
    (lambda t: t.__setitem__("modalities", t["modalities"][0]), "takes a list of at least one modality"),
    (lambda t: t.__setitem__("x", t["x"][0]), r"x must have shape \(batch, tokens, d\)"),
    (lambda t: t["proj_w"].__setitem__(0, t["proj_w"][0].long()), r"proj_w\[0\] must have a floating-point dtype"),
])
def test_bad_input_names_the_argument(mutate, message):
    tensors = fusion_inputs()
    mutate(tensors)
    with pytest.raises(ValueError, match=message):
        fusion_layer(**tensors, backend="triton")


# ----------------------------------------------------------------------------- custom op and compile

def test_custom_op_is_registered_with_fake_kernels():
    from ampfuse.ops.fusion import FusionParams, FusionSpec

    t = fusion_inputs(B=1, T=9, d=32, widths=(7, 5))
    params = FusionParams(*(tuple(p.detach() for p in t[n]) for n in ("gate_w", "gate_b", "proj_w", "proj_b")),
                          t["ln_weight"].detach(), t["ln_bias"].detach())
    args = (t["x"].detach().view(9, 32), None, [m.detach().view(9, -1) for m in t["modalities"]], params.weights(),
            params.ln_weight, params.ln_bias, FusionSpec(beta=0.3).encode())
    torch.library.opcheck(torch.ops.ampfuse.fusion_layer.default, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_equals_eager(device):
    tensors = fusion_inputs(B=2, T=7, d=32, widths=(7, 5), device=device)
    leaves_ = leaves(tensors)

    def step(t):
        return fusion_layer(**t, beta=0.3, backend="triton")

    eager = step(tensors)
    g_eager = torch.autograd.grad(eager.square().sum(), leaves_)
    before = runtime.launch_count
    compiled = torch.compile(step, fullgraph=True)(tensors)
    g_compiled = torch.autograd.grad(compiled.square().sum(), leaves_)
    assert runtime.launch_count - before == 8  # the fused kernels ran inside the compiled graph
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_compiled, g_eager):  # relative to each gradient's norm: some are small
        assert testing.rel_err(a, b) < 1e-5, testing.rel_err(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_profiler_counts_kernel_launches(dtype, monkeypatch):
    """On a GPU the profiler, not our own counter, sees 3 kernels forward and 5 backward."""
    monkeypatch.setattr(runtime, "POISON_OUTPUTS", False)  # poisoning is a fill kernel of its own
    tensors = fusion_inputs(B=32, T=128, d=768, widths=(74, 35), dtype=dtype, param_dtype=torch.float32,
                            device="cuda")
    dy = torch.randn(32, 128, 768, device="cuda", dtype=torch.promote_types(dtype, torch.float32))
    for _ in range(2):  # compile and warm up outside the profile
        fusion_layer(**tensors, beta=0.5, backend="triton").backward(dy)
    torch.cuda.synchronize()

    y = None

    def forward():
        nonlocal y
        y = fusion_layer(**tensors, beta=0.5, backend="triton")

    assert len(testing.cuda_kernel_names(forward)) == 3
    backward = testing.cuda_kernel_names(lambda: torch.autograd.grad(y, leaves(tensors), dy))
    assert len(backward) == 5, backward
