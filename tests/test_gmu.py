"""The GMU adapter op: reference, Triton kernels (interpreter on CPU) against float64, errors."""

import pytest
import torch

from ampfuse import testing
from ampfuse.kernels import runtime
from ampfuse.ops.gmu import GMUSpec, gmu_adapter, gmu_adapter_reference, masked_mean


def gmu_inputs(B=2, T=13, d=48, k=8, widths=(20,), aligned=(True,), gate="sigmoid", form="direct",
               stream_ln=True, fuse_ln=True, scale="channel", dtype=torch.float32, r_dtype=None, param_dtype=None,
               row_offset=0.0, device="cpu", seed=0):
    """(tensors, options): tensors maps argument names to tensors or lists of tensors, all requiring grad.
    ``dtype`` is x's and the modalities'; ``r_dtype`` and ``param_dtype`` default to it (autocast hands the op
    a 16-bit x and an fp32 r and parameters). ``row_offset`` gives every row of x and of the token-aligned
    modalities (token-aligned and per sample) a common offset of that standard deviation and a few outlier
    channels, as BERT's hidden states have: large means that must not cancel a row's variance."""
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype

    def rand(*shape, std=1.0, mean=0.0, dt=param_dtype):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean
        return t.to(device=device, dtype=dt).requires_grad_()

    def activations(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        if row_offset:
            t += row_offset * (torch.randn(*shape[:-1], 1, generator=g, dtype=torch.float64)
                               + (torch.arange(shape[-1]) % 29 == 3).double() * 0.05)
        return t.to(device=device, dtype=dtype).requires_grad_()

    S, sizes = len(widths) + 1, [d, *widths]
    gates = 1 if gate == "sigmoid" else S
    tensors = dict(
        x=activations(B, T, d),
        modalities=[activations(B, T, w) if a else activations(B, w) for w, a in zip(widths, aligned)],
        stream_w=[rand(k, s, std=s ** -0.5) for s in sizes], stream_b=[rand(k, std=0.3) for _ in sizes],
        gate_w=rand(gates, k, S * k, std=(S * k) ** -0.5), gate_b=rand(gates, k, std=0.3),
        w_up=rand(d, k, std=k ** -0.5), b_up=rand(d, std=0.3))
    if form == "gmu":
        tensors["gmu_w"] = rand(S, k, k, std=k ** -0.5)
    if stream_ln:
        tensors["stream_ln_w"] = [rand(s, std=0.2, mean=1.0) for s in sizes]
        tensors["stream_ln_b"] = [rand(s, std=0.2) for s in sizes]
    if fuse_ln:
        tensors.update(r=rand(B, T, d, dt=r_dtype or dtype), ln_weight=rand(d, std=0.2, mean=1.0),
                       ln_bias=rand(d, std=0.2))
    options = {"gate": gate}
    if scale == "float":
        options["scaling"] = 0.7
    else:
        tensors["scaling"] = rand(d if scale == "channel" else 1, std=0.2, mean=0.8)
    return tensors, options


def leaves(tensors):
    return [t for v in tensors.values() for t in (v if isinstance(v, list) else [v])]


def check(tensors, options, backend="triton", tol=None, **kw):
    """y and every gradient against the float64 reference on the same inputs, each in its input's dtype."""
    tol = tol or testing.TOLERANCE[tensors["x"].dtype]
    y = gmu_adapter(**tensors, **options, **kw, backend=backend)
    ref = testing.float64_copy(tensors)
    y64 = gmu_adapter_reference(**ref, **options, **kw)
    x, r = tensors["x"], tensors.get("r")
    assert y.dtype == (torch.promote_types(x.dtype, r.dtype) if "ln_weight" in tensors else x.dtype)
    assert y.shape == x.shape and testing.rel_err(y, y64) < tol, testing.rel_err(y, y64)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(y, leaves(tensors), dy.to(y.device, y.dtype))
    grads64 = torch.autograd.grad(y64, leaves(ref), dy)
    for i, (g, g64, t) in enumerate(zip(grads, grads64, leaves(tensors))):
        assert g.shape == g64.shape and g.dtype == t.dtype, (i, g.dtype, t.dtype)
        assert testing.rel_err(g, g64) < tol, (i, testing.rel_err(g, g64))


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


def test_triton_five_modalities_are_configuration(device):
    # nothing in the kernels is written per modality: six streams (the text and five modalities) run the same
    # code as two
    tensors, options = gmu_inputs(B=2, T=5, d=24, k=4, widths=(5, 9, 3, 6, 4), aligned=(True, False, True, False,
                                                                                        True),
                                  gate="softmax", form="gmu", device=device)
    check(tensors, options, activation="gelu")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_triton_half_precision_d384(dtype, device):
    tensors, options = gmu_inputs(B=3, T=7, d=384, k=32, widths=(74, 35), aligned=(True, False), gate="softmax",
                                  form="gmu", dtype=dtype, device=device)
    check(tensors, options, activation="gelu")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("form", ["direct", "gmu"])
def test_triton_autocast_mix_runs_natively(dtype, form, device):
    """Autocast's layout: 16-bit x and modalities (a dense layer's output), an fp32 r (the previous LayerNorm's)
    and fp32 parameters. The op keeps it: y in the dtype of x + r (fp32), dx in x's dtype, dr in r's, the
    parameters' gradients in fp32; the tensor-core operands are 16-bit (so a 16-bit tolerance)."""
    tensors, options = gmu_inputs(B=2, T=11, d=40, k=8, widths=(20, 9), aligned=(True, False), gate="softmax",
                                  form=form, dtype=dtype, r_dtype=torch.float32, param_dtype=torch.float32,
                                  device=device)
    y = gmu_adapter(**tensors, **options, backend="triton")
    assert y.dtype == torch.float32
    check(tensors, options, activation="gelu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_rows_with_large_means(dtype, device):
    """x and both modalities with a common offset per row about 50 times their spread (outlier channels
    included): the stream LayerNorms folded into the projections, each stream's moments in one pass (the
    per-sample one too, over two chunks) and the output LayerNorm must not cancel (in fp16, folding without
    the per-row shift fails this test)."""
    tensors, options = gmu_inputs(B=2, T=9, d=72, k=8, widths=(40, 45), aligned=(True, False), gate="softmax",
                                  form="gmu", dtype=dtype, row_offset=200.0, device=device)
    check(tensors, options, activation="silu")


def test_triton_per_sample_rows_with_large_means(device):
    """A per-sample modality (two column chunks) whose rows carry an offset 10^4 times their spread, in fp32:
    the prep kernel takes its LayerNorm moments in the same pass as its projection, as sums about the row's
    first-chunk mean; without that shift fp32 cancels the variance away and this test fails."""
    tensors, options = gmu_inputs(B=3, T=5, d=40, k=8, widths=(45,), aligned=(False,), row_offset=1e4,
                                  device=device)
    check(tensors, options, activation="gelu")


@pytest.mark.parametrize("form", ["direct", "gmu"])
def test_triton_bottleneck_and_modalities_wider_than_a_chunk(form, device):
    # k = 40 pads to 64 bottleneck features, the last part padding; the modalities span several column chunks
    # of every kernel (the interpreter's chunks are 16 and 32 columns), one token-aligned, one per sample
    tensors, options = gmu_inputs(B=2, T=11, d=72, k=40, widths=(75, 130), aligned=(True, False), gate="softmax",
                                  form=form, device=device)
    check(tensors, options, activation="gelu")


def test_triton_ragged_tokens_and_k1(device):
    tensors, options = gmu_inputs(B=3, T=37, d=40, k=1, widths=(6,), aligned=(True,), device=device)
    check(tensors, options)


def test_triton_launch_counts_and_determinism(device):
    """Forward: the prep and the row kernel; backward: the row kernel, the column kernel and the fixed-order
    reduction of its token splits (so gradients are bitwise the same on every run)."""
    tensors, options = gmu_inputs(B=3, T=21, widths=(20, 7), aligned=(True, False), gate="softmax", form="gmu",
                                  device=device)
    before = runtime.launch_count
    with torch.no_grad():
        gmu_adapter(**tensors, **options, backend="triton")
    assert runtime.launch_count - before == 2
    before = runtime.launch_count
    y = gmu_adapter(**tensors, **options, backend="triton")
    assert runtime.launch_count - before == 2
    dy = torch.randn_like(y)
    before = runtime.launch_count
    first = torch.autograd.grad(y, leaves(tensors), dy, retain_graph=True)
    assert runtime.launch_count - before == 3
    second = torch.autograd.grad(y, leaves(tensors), dy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_triton_no_grad_forward_equals_training_forward(device):
    tensors, options = gmu_inputs(widths=(20, 7), aligned=(True, False), gate="softmax", device=device)
    with torch.no_grad():
        inference = gmu_adapter(**tensors, **options, backend="triton")
    assert torch.equal(inference, gmu_adapter(**tensors, **options, backend="triton").detach())


def test_frozen_modalities_and_layer_norm_get_no_gradient(device):
    tensors, options = gmu_inputs(widths=(20, 7), aligned=(True, False), gate="softmax", device=device)
    for t in [*tensors["modalities"], tensors["ln_weight"], tensors["ln_bias"]]:
        t.requires_grad_(False)
    y = gmu_adapter(**tensors, **options, backend="triton")
    y.sum().backward()
    assert all(m.grad is None for m in tensors["modalities"]) and tensors["ln_weight"].grad is None
    assert tensors["gate_w"].grad is not None and tensors["x"].grad is not None


def test_launches_run_on_the_tensors_device(device):
    # Triton launches on the current CUDA device, whatever the tensors': forward, no-grad forward and
    # backward each launch inside a switch to the tensors' device (runtime.on_tensors_device)
    tensors, options = gmu_inputs(device=device)
    testing.assert_launches_on_device(lambda: gmu_adapter(**tensors, **options, backend="triton"), tensors["x"].device)


def test_inputs_are_not_modified(device):
    tensors, options = gmu_inputs(widths=(20, 7), aligned=(True, False), gate="softmax", form="gmu", device=device)
    before = [t.detach().clone() for t in leaves(tensors)]
    gmu_adapter(**tensors, **options, backend="triton").sum().backward()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, leaves(tensors)))


def test_zero_tokens(device):
    tensors, options = gmu_inputs(T=0, widths=(20, 7), aligned=(True, False), gate="softmax", device=device)
    y = gmu_adapter(**tensors, **options, backend="triton")
    assert y.shape == tensors["x"].shape
    y.sum().backward()
    assert tensors["gate_w"].grad is not None and torch.count_nonzero(tensors["gate_w"].grad) == 0


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


# ----------------------------------------------------------------------------- custom op and compile

def test_custom_op_is_registered_with_fake_kernels():
    tensors, _ = gmu_inputs(B=2, T=3, d=16, k=4, widths=(6, 5), aligned=(True, False), gate="softmax", form="gmu")
    t = {name: [v.detach() for v in value] if isinstance(value, list) else value.detach()
         for name, value in tensors.items()}
    spec = GMUSpec("relu", "softmax", "gmu", True, True, "channel", 1.0, 1e-5, 1e-12)
    args = (t["x"], t["r"], t["modalities"], t["stream_w"], t["stream_b"], t["stream_ln_w"], t["stream_ln_b"],
            t["gate_w"], t["gate_b"], t["gmu_w"], t["w_up"], t["b_up"], t["scaling"], t["ln_weight"], t["ln_bias"],
            spec.encode())
    torch.library.opcheck(torch.ops.ampfuse.gmu_adapter.default, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_equals_eager(device):
    tensors, options = gmu_inputs(B=2, T=5, d=32, k=8, widths=(12, 7), aligned=(True, False), gate="softmax",
                                  form="gmu", device=device)
    x, r = tensors.pop("x"), tensors.pop("r")

    def step(x, r):
        return gmu_adapter(x, r=r, **tensors, **options, activation="gelu", backend="triton")

    wrt = [x] + [t for t in leaves(tensors) if t.requires_grad]  # the parameters' gradients come back as views
    eager = step(x, r)
    g_eager = torch.autograd.grad(eager.square().sum(), wrt)
    before = runtime.launch_count
    compiled = torch.compile(step, fullgraph=True)(x, r)
    g_compiled = torch.autograd.grad(compiled.square().sum(), wrt)
    assert runtime.launch_count - before == 5  # the fused kernels ran inside the compiled graph: 2 + 3
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert len(g_compiled) > 5
    for a, b in zip(g_compiled, g_eager):  # relative to each gradient's norm: some are small
        assert testing.rel_err(a, b) < 1e-5, testing.rel_err(a, b)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("mutate,message", [
    (lambda t, o: t.__setitem__("modalities", [t["modalities"][0][:1]]), r"modalities\[0\] must be"),
    (lambda t, o: t["stream_w"].__setitem__(1, t["stream_w"][1][:, :-1]), r"stream_w\[1\] must have shape"),
    (lambda t, o: t.__setitem__("gate_w", t["gate_w"][:, :, :-1]), "gate_w must have shape"),
    (lambda t, o: o.__setitem__("gate", "tanh"), "gate must be one of"),
    (lambda t, o: t.__setitem__("x", t["x"][0]), "x must have shape"),
    (lambda t, o: t.__setitem__("modalities", [t["modalities"][0].double()]), "must have x's dtype"),
    (lambda t, o: t.__setitem__("scaling", t["scaling"][:-1]), "scaling must be"),
    (lambda t, o: t["stream_ln_b"].pop(), "stream_ln_w and stream_ln_b need one entry per stream"),
    (lambda t, o: t.__setitem__("r", t["r"][:, :-1]), "r must have shape"),
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
