"""The GMU adapter op: reference, Triton kernels (interpreter on CPU) against float64, errors."""

import pytest
import torch

from ampfuse import testing
from ampfuse.kernels import runtime
from ampfuse.ops.gmu import gmu_adapter, gmu_adapter_reference, masked_mean


def gmu_inputs(B=2, T=13, d=48, k=8, widths=(20,), aligned=(True,), gate="sigmoid", form="direct",
               stream_ln=True, fuse_ln=True, scale="channel", dtype=torch.float32, device="cpu", seed=0):
    """(tensors, options): tensors maps argument names to tensors or lists of tensors, all requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0, mean=0.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean
        return t.to(device=device, dtype=dtype).requires_grad_()

    S, sizes = len(widths) + 1, [d, *widths]
    gates = 1 if gate == "sigmoid" else S
    tensors = dict(
        x=rand(B, T, d), modalities=[rand(B, T, w) if a else rand(B, w) for w, a in zip(widths, aligned)],
        stream_w=[rand(k, s, std=s ** -0.5) for s in sizes], stream_b=[rand(k, std=0.3) for _ in sizes],
        gate_w=rand(gates, k, S * k, std=(S * k) ** -0.5), gate_b=rand(gates, k, std=0.3),
        w_up=rand(d, k, std=k ** -0.5), b_up=rand(d, std=0.3))
    if form == "gmu":
        tensors["gmu_w"] = rand(S, k, k, std=k ** -0.5)
    if stream_ln:
        tensors["stream_ln_w"] = [rand(s, std=0.2, mean=1.0) for s in sizes]
        tensors["stream_ln_b"] = [rand(s, std=0.2) for s in sizes]
    if fuse_ln:
        tensors.update(r=rand(B, T, d), ln_weight=rand(d, std=0.2, mean=1.0), ln_bias=rand(d, std=0.2))
    options = {"gate": gate}
    if scale == "float":
        options["scaling"] = 0.7
    else:
        tensors["scaling"] = rand(d if scale == "channel" else 1, std=0.2, mean=0.8)
    return tensors, options


def leaves(tensors):
    return [t for v in tensors.values() for t in (v if isinstance(v, list) else [v])]


def check(tensors, options, backend="triton", **kw):
    tol = testing.TOLERANCE[tensors["x"].dtype]
    y = gmu_adapter(**tensors, **options, **kw, backend=backend)
    ref = testing.float64_copy(tensors)
    y64 = gmu_adapter_reference(**ref, **options, **kw)
    assert y.shape == tensors["x"].shape and testing.rel_err(y, y64) < tol
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(y, leaves(tensors), dy.to(y.device, y.dtype))
    grads64 = torch.autograd.grad(y64, leaves(ref), dy)
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        assert g.shape == g64.shape and testing.rel_err(g, g64) < tol, (i, testing.rel_err(g, g64))


CASES = {  # widths, aligned, gate, form, stream_ln, fuse_ln, scale, activation
    "k1_sigmoid_direct_aligned": ((20,), (True,), "sigmoid", "direct", True, True, "channel", "relu"),
    "k1_sigmoid_gmu_per_sample": ((20,), (False,), "sigmoid", "gmu", False, False, "float", "gelu"),
    "k1_softmax_direct_per_sample": ((9,), (False,), "softmax", "direct", True, False, "scalar", "silu"),
    "k3_softmax_gmu_mixed": ((20, 7, 30), (True, False, True), "softmax", "gmu", True, True, "scalar", "tanh"),
    "k3_softmax_direct_per_sample": ((74, 35, 5), (False, False, False), "softmax", "direct", False, True,
                                     "channel", "gelu_tanh"),
    "k4_softmax_gmu_aligned": ((3, 17, 8, 12), (True, True, True, True), "softmax", "gmu", True, True, "float",
                               "identity"),
}


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_float64_reference(case, device):
    widths, aligned, gate, form, stream_ln, fuse_ln, scale, act = CASES[case]
    tensors, options = gmu_inputs(widths=widths, aligned=aligned, gate=gate, form=form, stream_ln=stream_ln,
                                  fuse_ln=fuse_ln, scale=scale, device=device)
    check(tensors, options, activation=act)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_triton_half_precision_d384(dtype, device):
    tensors, options = gmu_inputs(B=3, T=7, d=384, k=32, widths=(74, 35), aligned=(True, False), gate="softmax",
                                  form="gmu", dtype=dtype, device=device)
    check(tensors, options, activation="gelu")


@pytest.mark.parametrize("form", ["direct", "gmu"])
def test_triton_bottleneck_in_several_chunks(form, device, monkeypatch):
    # k=40 pads to 64 features, walked in four chunks of 16: stream projections, gate columns and
    # the up-projection each cross chunk boundaries, and the last chunk is partly padding.
    monkeypatch.setitem(runtime.CONFIG, "gmu_block_kc", 16)
    tensors, options = gmu_inputs(B=2, T=11, d=72, k=40, widths=(20, 9), aligned=(True, False), gate="softmax",
                                  form=form, device=device)
    check(tensors, options, activation="gelu")


def test_triton_ragged_tokens_and_k1(device):
    tensors, options = gmu_inputs(B=3, T=37, d=40, k=1, widths=(6,), aligned=(True,), device=device)
    check(tensors, options)


def test_triton_launch_counts_and_determinism(device):
    tensors, options = gmu_inputs(B=3, T=21, widths=(20, 7), aligned=(True, False), gate="softmax", form="gmu",
                                  device=device)
    before = runtime.launch_count
    y = gmu_adapter(**tensors, **options, backend="triton")
    assert runtime.launch_count - before == 1
    dy = torch.randn_like(y)
    before = runtime.launch_count
    first = torch.autograd.grad(y, leaves(tensors), dy, retain_graph=True)
    assert runtime.launch_count - before == 2
    second = torch.autograd.grad(y, leaves(tensors), dy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_frozen_modalities_and_layer_norm_get_no_gradient(device):
    tensors, options = gmu_inputs(widths=(20, 7), aligned=(True, False), gate="softmax", device=device)
    for t in [*tensors["modalities"], tensors["ln_weight"], tensors["ln_bias"]]:
        t.requires_grad_(False)
    y = gmu_adapter(**tensors, **options, backend="triton")
    y.sum().backward()
    assert all(m.grad is None for m in tensors["modalities"]) and tensors["ln_weight"].grad is None
    assert tensors["gate_w"].grad is not None and tensors["x"].grad is not None


def test_reference_gradcheck():
    for gate, form, aligned in (("sigmoid", "gmu", (False,)), ("softmax", "direct", (True,))):
        tensors, options = gmu_inputs(B=2, T=3, d=6, k=2, widths=(4,), aligned=aligned, gate=gate, form=form,
                                      dtype=torch.float64)
        names = list(tensors)
        flat = leaves(tensors)

        def fn(*values, names=names, tensors=tensors, options=options):
            rebuilt, i = {}, 0
            for n in names:
                if isinstance(tensors[n], list):
                    rebuilt[n] = list(values[i:i + len(tensors[n])])
                    i += len(tensors[n])
                else:
                    rebuilt[n] = values[i]
                    i += 1
            return gmu_adapter_reference(**rebuilt, **options, activation="gelu")

        assert torch.autograd.gradcheck(fn, tuple(flat))


def test_masked_mean_ignores_padding():
    seq = torch.randn(2, 6, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    pooled = masked_mean(seq, mask)
    torch.testing.assert_close(pooled[0], seq[0, :3].mean(0))
    noisy = seq.detach().clone()
    noisy[0, 3:] = 1e6
    torch.testing.assert_close(masked_mean(noisy, mask), pooled.detach())
    pooled.sum().backward()
    assert torch.count_nonzero(seq.grad[0, 3:]) == 0
    assert torch.equal(masked_mean(seq, torch.zeros(2, 6)), torch.zeros(2, 5))


@pytest.mark.parametrize("mutate,message", [
    (lambda t, o: t.__setitem__("modalities", [t["modalities"][0][:1]]), r"modalities\[0\] must be"),
    (lambda t, o: t["stream_w"].__setitem__(1, t["stream_w"][1][:, :-1]), r"stream_w\[1\] must have shape"),
    (lambda t, o: t.__setitem__("gate_w", t["gate_w"][:, :, :-1]), "gate_w must have shape"),
    (lambda t, o: o.__setitem__("gate", "tanh"), "gate must be one of"),
    (lambda t, o: t.__setitem__("x", t["x"][0]), "x must have shape"),
    (lambda t, o: t.__setitem__("modalities", [t["modalities"][0].double()]), "must have x's dtype"),
])
def test_bad_input_names_the_argument(mutate, message):
    tensors, options = gmu_inputs()
    mutate(tensors, options)
    with pytest.raises(ValueError, match=message):
        gmu_adapter(**tensors, **options, backend="triton")


def test_sigmoid_gate_needs_exactly_two_streams():
    tensors, options = gmu_inputs(widths=(5, 6), aligned=(True, True), gate="softmax")
    with pytest.raises(ValueError, match="sigmoid gate fuses exactly two streams"):
        gmu_adapter(**tensors, gate="sigmoid", backend="torch")
