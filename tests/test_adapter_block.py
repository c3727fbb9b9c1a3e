"""The adapter block op: reference, Triton kernels (interpreter on CPU), custom op, dispatch, bad input."""

import collections
import itertools

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import ampfuse
from ampfuse import BackendUnavailableError
from ampfuse import testing
from ampfuse.kernels import runtime
from ampfuse.kernels.common import sum_partials, walk_chunk
from ampfuse.ops.activations import ACTIVATIONS
from ampfuse.ops.adapter_block import adapter_block, adapter_block_reference

HAS_GPU = torch.cuda.is_available()
PLACEMENTS = {  # (original_ln_before, residual_before_ln)
    "pfeiffer": (True, True),
    "houlsby": (False, True),
    "ln_before_res_after": (True, False),
    "res_after": (False, False),
}
SCALES = ("float", "scalar", "channel")
KERNEL_DTYPES = [torch.float32, torch.float16] + [pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


check_against_reference = testing.check_adapter_block


# ----------------------------------------------------------------------------- reference

@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("scale_kind", SCALES)
def test_reference_gradcheck(placement, scale_kind):
    olnb, rbln = PLACEMENTS[placement]
    tensors, kwargs = testing.adapter_inputs(5, 12, 3, dtype=torch.float64, scale_kind=scale_kind,
                                             ln_before=placement == "pfeiffer")
    names = list(tensors)

    def fn(*values):
        return testing.call(adapter_block_reference, dict(zip(names, values)), activation="gelu", ln_eps=1e-5,
                            original_ln_before=olnb, residual_before_ln=rbln, **kwargs)

    assert torch.autograd.gradcheck(fn, tuple(tensors.values()))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_low_precision_tracks_float64(activation, dtype):
    """The reference run in fp32 or bf16 stays close to its own float64 evaluation. Every op of the
    bf16 reference rounds to bf16 (no fp32 accumulation, unlike the kernels): 3e-2 there."""
    tensors, kwargs = testing.adapter_inputs(33, 40, 8, scale_kind="channel", ln_before=True)
    low = {n: t.detach().to(dtype).requires_grad_() for n, t in tensors.items()}
    check_against_reference(low, kwargs, backend="torch", activation=activation,
                            tol=3e-2 if dtype == torch.bfloat16 else None)


def test_reference_matches_formula_with_nn_modules():
    """The reference is docs/design.md section 2 written with nn.LayerNorm / nn.Linear (Pfeiffer, ln_before)."""
    torch.manual_seed(0)
    d, k = 16, 4
    base_ln, ada_ln = torch.nn.LayerNorm(d, eps=1e-5).double(), torch.nn.LayerNorm(d).double()
    down, up = torch.nn.Linear(d, k).double(), torch.nn.Linear(k, d).double()
    for module in (base_ln, ada_ln):
        torch.nn.init.normal_(module.weight, 1.0, 0.3)
        torch.nn.init.normal_(module.bias, 0.0, 0.3)
    h, r = torch.randn(2, 7, d, dtype=torch.float64), torch.randn(2, 7, d, dtype=torch.float64)
    a = base_ln(h + r)
    expected = base_ln(0.5 * up(torch.nn.functional.silu(down(ada_ln(a)))) + h + r)
    y = adapter_block_reference(h, r, base_ln.weight, base_ln.bias, down.weight, down.bias, up.weight, up.bias,
                                scaling=0.5, adapter_ln_weight=ada_ln.weight, adapter_ln_bias=ada_ln.bias,
                                ln_eps=1e-5, activation="silu")
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- Triton kernels

@pytest.mark.parametrize("placement,activation", list(itertools.product(PLACEMENTS, ACTIVATIONS)))
def test_triton_placements_and_activations(placement, activation, device):
    olnb, rbln = PLACEMENTS[placement]
    index = list(PLACEMENTS).index(placement) + list(ACTIVATIONS).index(activation)
    tensors, kwargs = testing.adapter_inputs(37, 48, 8, device=device, scale_kind=SCALES[index % 3],
                                             ln_before=index % 2 == 0)
    check_against_reference(tensors, kwargs, activation=activation, original_ln_before=olnb,
                            residual_before_ln=rbln, ln_eps=1e-5)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("scale_kind,ln_before,k", [
    ("float", False, 1), ("scalar", True, 8), ("channel", False, 64), ("channel", True, 1), ("float", True, 64),
    ("scalar", False, 8),
])
def test_triton_scalings_dtypes_d384(dtype, scale_kind, ln_before, k, device):
    tensors, kwargs = testing.adapter_inputs(29, 384, k, dtype=dtype, device=device, scale_kind=scale_kind,
                                             ln_before=ln_before)
    check_against_reference(tensors, kwargs, activation="gelu")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_triton_bert_base_width(dtype, placement, device):
    olnb, rbln = PLACEMENTS[placement]
    tensors, kwargs = testing.adapter_inputs(21, 768, 64, dtype=dtype, device=device, scale_kind="channel",
                                             ln_before=True)
    check_against_reference(tensors, kwargs, activation="silu", original_ln_before=olnb, residual_before_ln=rbln)


@pytest.mark.parametrize("dtype", [torch.float16] + [pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_triton_fp32_parameters_with_half_activations(dtype, device):
    """fp32 parameters, 16-bit hidden states; gradients come back in fp32."""
    tensors, kwargs = testing.adapter_inputs(19, 96, 16, dtype=dtype, param_dtype=torch.float32, device=device,
                                             scale_kind="scalar", ln_before=True)
    check_against_reference(tensors, kwargs, activation="relu")


@pytest.mark.parametrize("dtype", [torch.float16] + [pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby", "ln_before_res_after"])
def test_triton_autocast_mix_runs_natively(dtype, placement, device):
    """Autocast's layout: a 16-bit h (a dense layer's output), an fp32 r (the previous LayerNorm's) and
    fp32 parameters. The op keeps it: y in the dtype of h + r (fp32), dh in h's dtype, dr in r's, the
    parameters' gradients in fp32; the tensor-core operands are 16-bit (so a 16-bit tolerance)."""
    olnb, rbln = PLACEMENTS[placement]
    tensors, kwargs = testing.adapter_inputs(35, 80, 12, dtype=dtype, r_dtype=torch.float32,
                                             param_dtype=torch.float32, device=device, scale_kind="channel",
                                             ln_before=placement == "houlsby")
    y = testing.call(adapter_block, tensors, backend="triton", original_ln_before=olnb, residual_before_ln=rbln,
                     **kwargs)
    assert y.dtype == torch.float32
    check_against_reference(tensors, kwargs, tol=testing.TOLERANCE[dtype], original_ln_before=olnb,
                            residual_before_ln=rbln, activation="gelu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby", "ln_before_res_after"])
def test_triton_rows_with_large_means(dtype, placement, device):
    """Hidden states whose rows carry a common offset 30 times their spread, and outlier channels (BERT's
    are known for both): the LayerNorm statistics and the folded LN(x1) W_down^T must not cancel."""
    olnb, rbln = PLACEMENTS[placement]
    tensors, kwargs = testing.adapter_inputs(33, 96, 16, dtype=dtype, device=device, scale_kind="channel",
                                             ln_before=placement == "houlsby", row_offset=30.0)
    check_against_reference(tensors, kwargs, original_ln_before=olnb, residual_before_ln=rbln, activation="silu")


def test_triton_up_projection_with_large_means(device):
    """An up-projection whose every column carries a common offset 40 times its spread (the bias the same
    offset, 16 times its spread): the
    constants kernel's centred Gram matrix, from which the forward takes the output LayerNorm's variance,
    comes from one pass of sums about a shift and must not cancel (a one-pass sum of products does: this
    test then fails). Widths of several chunks, a ragged last one. fp32: in fp16 the 16-bit dz of such an
    adapter puts W_down's gradient 1.1e-2 off, with either way of taking the constants."""
    tensors, kwargs = testing.adapter_inputs(26, 200, 24, device=device)
    offset = 40.0 * 24 ** -0.5
    with torch.no_grad():
        tensors["w_up"].add_(offset)
        tensors["b_up"].add_(offset)
    check_against_reference(tensors, kwargs, activation="relu")


def test_triton_leading_dims_and_bottleneck_wider_than_a_chunk(device):
    tensors, kwargs = testing.adapter_inputs(0, 80, 200, device=device, lead=(3, 11), scale_kind="scalar")
    check_against_reference(tensors, kwargs, activation="tanh")


def test_triton_frozen_layer_norm_gets_no_gradient(device):
    tensors, kwargs = testing.adapter_inputs(17, 64, 8, device=device)
    tensors["ln_weight"].requires_grad_(False)
    tensors["ln_bias"].requires_grad_(False)
    y = testing.call(adapter_block, tensors, backend="triton", **kwargs)
    y.sum().backward()
    assert tensors["ln_weight"].grad is None and tensors["ln_bias"].grad is None
    assert tensors["w_down"].grad is not None and tensors["h"].grad is not None
    check_against_reference(tensors, kwargs)


def test_triton_parameters_only_backward(device):
    """Below the lowest adapter h and r need no gradient: the kernel skips dh, dr."""
    tensors, kwargs = testing.adapter_inputs(40, 64, 8, device=device, scale_kind="channel", ln_before=True)
    tensors["h"].requires_grad_(False)
    tensors["r"].requires_grad_(False)
    check_against_reference(tensors, kwargs, activation="relu")


# d >= 8: LayerNorm over a handful of elements is so ill-conditioned that its float64 gradients
# are rounding noise. No shrinking: each example costs a kernel run in the interpreter.
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(M=st.integers(1, 70), d=st.integers(8, 130), k=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_triton_random_shapes(M, d, k, seed):
    device = torch.device("cuda" if HAS_GPU else "cpu")
    runtime.POISON_OUTPUTS = True
    tensors, kwargs = testing.adapter_inputs(M, d, k, device=device, scale_kind="channel", ln_before=True,
                                             generator=torch.Generator().manual_seed(seed))
    check_against_reference(tensors, kwargs, activation="gelu_tanh")


def test_triton_launch_counts(device):
    """Two launches forward (the parameters' constants, the row kernel), three backward (row kernel,
    column kernel, the fixed-order sum of the column kernel's splits)."""
    tensors, kwargs = testing.adapter_inputs(45, 48, 8, device=device, scale_kind="channel", ln_before=True)
    before = runtime.launch_count
    y = testing.call(adapter_block, tensors, backend="triton", **kwargs)
    assert runtime.launch_count - before == 2
    before = runtime.launch_count
    y.backward(torch.randn_like(y))
    assert runtime.launch_count - before == 3


def test_host_path_runs_no_aten_kernel_but_allocations_and_views(device, monkeypatch):
    """The eager host path around the launches (docs/design.md rule 4; benchmarks/host_overhead.py times
    it): forward allocates y and its state; backward allocates its outputs and scratch, and hands autograd
    the parameter gradients as views of the reduced buffer, one each, with no copy, cast or reduction (each
    would be a kernel launch on a GPU, per parameter per layer). Autograd takes the views themselves as
    .grad (they share the buffer's storage: no copy there either). Launches
    stubbed: what the kernels compute is tested above; h alone of the inputs wants a gradient (a leaf h and
    r sharing one gradient tensor would make autograd copy one of them, which in a model never happens)."""
    monkeypatch.setattr(runtime, "POISON_OUTPUTS", False)  # poisoning is a fill kernel of its own
    monkeypatch.setattr(runtime, "launch", lambda *args, **meta: None)
    tensors, kwargs = testing.adapter_inputs(8, 64, 16, device=device, scale_kind="float")
    tensors["r"].requires_grad_(False)
    with testing.aten_ops() as calls:
        y = testing.call(adapter_block, tensors, backend="triton", **kwargs)
    forward = collections.Counter(name for name, _ in calls)
    dy = torch.randn_like(y)
    with testing.aten_ops() as calls:
        y.backward(dy)
    backward = collections.Counter(name for name, _ in calls)
    # "detach": autograd's own, as it saves the output y, which this placement's backward reads
    assert set(forward) <= {"empty", "promote_types", "detach"} and forward["empty"] == 2, forward
    assert forward["detach"] <= 1, forward
    # "detach": autograd's own, as it takes each gradient
    assert set(backward) <= {"empty", "as_strided", "detach"}, backward
    assert backward["as_strided"] == 6, backward  # a view per parameter gradient
    storages = {tensors[name].grad.untyped_storage().data_ptr()
                for name in ("ln_weight", "ln_bias", "w_down", "b_down", "w_up", "b_up")}
    assert len(storages) == 1


def test_output_is_saved_where_backward_reads_it(device):
    """Without dropout and for k <= 64 the forward takes o's moments algebraically, and the backward's row
    kernel then reads dy and y rather than dy, h and r: autograd saves y, so changing y in place before
    backward is an error autograd names. With dropout backward does not read y, and autograd keeps no
    reference to it."""
    from ampfuse.kernels.adapter_block import reads_output
    from ampfuse.ops.adapter_block import AdapterBlockSpec

    assert reads_output(AdapterBlockSpec(), 64) and not reads_output(AdapterBlockSpec(), 65)
    assert not reads_output(AdapterBlockSpec(dropout_p=0.1), 8)
    tensors, kwargs = testing.adapter_inputs(12, 40, 8, device=device)
    y = testing.call(adapter_block, tensors, backend="triton", **kwargs)
    y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    seed = torch.tensor([5], dtype=torch.int64, device=device)
    dropped = lambda: testing.call(adapter_block, tensors, backend="triton", training=True,  # noqa: E731
                                   dropout_p=0.2, seed=seed, **kwargs)
    expected = torch.autograd.grad(dropped().sum(), tensors["h"])[0]
    y = dropped()
    y.add_(1.0)
    assert torch.equal(torch.autograd.grad(y.sum(), tensors["h"])[0], expected)


def test_pfeiffer_gradient_of_h_and_r_computed_once_stays_safe(device):
    """In the Pfeiffer placement dh equals dr, so backward writes it once and hands autograd one tensor for
    both: leaves still get separate .grad storage, and an upstream node that uses h and r accumulates
    correctly (compared with the reference)."""
    tensors, kwargs = testing.adapter_inputs(19, 40, 6, device=device)
    y = testing.call(adapter_block, tensors, backend="triton", **kwargs)
    y.sum().backward()
    assert tensors["h"].grad.data_ptr() != tensors["r"].grad.data_ptr()
    assert torch.equal(tensors["h"].grad, tensors["r"].grad)
    x = torch.randn(19, 40, device=device, requires_grad=True)
    lin = torch.nn.Linear(40, 40).to(device)
    grads = []
    for fn in (adapter_block, adapter_block_reference):
        h, r = lin(x), torch.tanh(x)
        out = testing.call(fn, dict(tensors, h=h, r=r), **kwargs, **({"backend": "triton"} if fn is adapter_block
                                                                     else {}))
        (x_grad,) = torch.autograd.grad(out.sum() + (3 * r).sum(), x)
        grads.append(x_grad)
    assert testing.rel_err(*grads) < 1e-5


def test_triton_backward_is_deterministic(device):
    tensors, kwargs = testing.adapter_inputs(70, 48, 24, device=device, scale_kind="channel")
    dy = torch.randn(70, 48, device=device)
    runs = []
    for _ in range(2):
        y = testing.call(adapter_block, tensors, backend="triton", **kwargs)
        runs.append(torch.autograd.grad(y, list(tensors.values()), dy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("splits", range(1, 10))
def test_sum_of_partials_adds_the_splits_in_order(splits, device):
    """reduce_partials_kernel loads four splits a step (SPLITS_AT_ONCE): across that boundary it still adds
    exactly the given splits, in order, so its fp32 sum is bitwise the sequential one (and the cast to the
    output dtype that of it)."""
    part = torch.randn(splits, 1500, device=device) * torch.logspace(-3, 3, splits, device=device)[:, None]
    expected = torch.zeros(1500, device=device)
    for p in range(splits):
        expected += part[p]
    assert torch.equal(sum_partials(part), expected)
    assert torch.equal(sum_partials(part, torch.float16), expected.half())


@triton.jit
def _walk_kernel(out_ptr, D, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Stores walk_chunk's (first column, columns before) at each step."""
    for i in range(0, tl.cdiv(D, BLOCK_D)):
        c0, before = walk_chunk(i, D, REVERSE, BLOCK_D)
        tl.store(out_ptr + 2 * i, c0)
        tl.store(out_ptr + 2 * i + 1, before)


@pytest.mark.parametrize("D", [16, 72, 80, 5])
@pytest.mark.parametrize("reverse", [False, True])
def test_walk_chunk_visits_each_chunk_once_and_counts_the_columns_before(D, reverse, device):
    # the passes over a row block walk in alternate directions (docs/design.md section 6, rule 7); the
    # moments merged in a walk from the end need the columns passed before a chunk, not its first column
    block = 16
    steps = -(-D // block)
    out = torch.full((steps, 2), -1, dtype=torch.int32, device=device)
    _walk_kernel[(1,)](out, D, REVERSE=reverse, BLOCK_D=block)
    starts = list(range(0, D, block))[::-1 if reverse else 1]
    widths = [min(block, D - c0) for c0 in starts]
    assert out[:, 0].tolist() == starts
    assert out[:, 1].tolist() == [sum(widths[:i]) for i in range(steps)]


def test_launches_run_on_the_tensors_device(device):
    # Triton launches on the current CUDA device, whatever the tensors': forward, no-grad forward and
    # backward each launch inside a switch to the tensors' device (runtime.on_tensors_device)
    tensors, kwargs = testing.adapter_inputs(9, 24, 8, device=device)
    testing.assert_launches_on_device(lambda: testing.call(adapter_block, tensors, backend="triton", **kwargs),
                                      tensors["h"].device)


def test_inputs_are_not_modified(device):
    tensors, kwargs = testing.adapter_inputs(23, 48, 8, device=device, scale_kind="channel", ln_before=True)
    before = {n: t.detach().clone() for n, t in tensors.items()}
    y = testing.call(adapter_block, tensors, backend="triton", training=True, dropout_p=0.2, **kwargs)
    y.sum().backward()
    for name, t in tensors.items():
        assert torch.equal(t.detach(), before[name]), name


# ----------------------------------------------------------------------------- dropout

def test_triton_dropout_matches_reference_with_the_same_mask(device):
    """Forward and every gradient equal the reference run with the kernels' own Philox mask."""
    from ampfuse.kernels.adapter_block import dropout_keep_mask

    tensors, kwargs = testing.adapter_inputs(33, 48, 8, device=device, scale_kind="channel", ln_before=True)
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    keep = dropout_keep_mask(seed, (33, 48), 0.3)
    assert 0.55 < keep.float().mean().item() < 0.85
    y = testing.call(adapter_block, tensors, backend="triton", training=True, dropout_p=0.3, seed=seed, **kwargs)
    ref64 = testing.float64_copy(tensors)
    y64 = testing.call(adapter_block_reference, ref64, dropout_p=0.3, keep_mask=keep.cpu(), **kwargs)
    assert testing.rel_err(y, y64) < 1e-4
    dy = torch.randn(33, 48, dtype=torch.float64)
    grads = torch.autograd.grad(y, list(tensors.values()), dy.to(device, y.dtype))
    grads64 = torch.autograd.grad(y64, list(ref64.values()), dy)
    for name, g, g64 in zip(tensors, grads, grads64):
        assert testing.rel_err(g, g64) < 1e-4, name


def test_triton_dropout_seed_semantics(device):
    tensors, kwargs = testing.adapter_inputs(20, 48, 8, device=device)
    run = lambda seed, training=True: testing.call(  # noqa: E731
        adapter_block, tensors, backend="triton", training=training, dropout_p=0.5,
        seed=torch.tensor([seed], device=device), **kwargs)
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert torch.equal(run(7, training=False), testing.call(adapter_block, tensors, backend="triton", **kwargs))


def test_dropout_statistics_agree_between_backends(device):
    """Masks differ between backends (Philox in the kernels, torch's generator in the reference), so
    the check is statistical: over 48 draws, the per-element mean and variance of y agree."""
    tensors, kwargs = testing.adapter_inputs(16, 32, 8, device=device, scale_kind="float")
    torch.manual_seed(0)
    draws = {b: torch.stack([testing.call(adapter_block, tensors, backend=b, training=True, dropout_p=0.4,
                                          **kwargs).detach().double().cpu() for _ in range(48)])
             for b in ("triton", "torch")}
    mean_t, mean_r = draws["triton"].mean(0), draws["torch"].mean(0)
    stderr = ((draws["triton"].var(0) + draws["torch"].var(0)) / 48).sqrt()
    z = (mean_t - mean_r) / stderr.clamp_min(1e-6)
    assert z.abs().mean() < 1.2  # |N(0,1)| has mean 0.8
    ratio = draws["triton"].var(0).mean() / draws["torch"].var(0).mean()
    assert 0.8 < ratio < 1.25
    assert draws["triton"].var(0).mean() > 1e-3  # dropout really is on


# ----------------------------------------------------------------------------- custom op and compile

def test_custom_op_is_registered_with_fake_kernels():
    tensors, kwargs = testing.adapter_inputs(9, 32, 4, scale_kind="channel", ln_before=True)
    args = [tensors[n].detach() for n in testing.POSITIONAL]
    from ampfuse.ops.adapter_block import AdapterBlockSpec

    spec = AdapterBlockSpec("relu", True, True, True, "channel", 1.0, 1e-12, 1e-5, 0.0)
    op_args = (*args[:2], None, *args[2:], tensors["scaling"].detach(), tensors["adapter_ln_weight"].detach(),
               tensors["adapter_ln_bias"].detach(), spec.encode(), "triton")
    torch.library.opcheck(torch.ops.ampfuse.adapter_block.default, op_args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("k", [8, 72])  # backward reads y (saved by the op's autograd), or not (k > 64: None)
def test_torch_compile_fullgraph_equals_eager(k, device):
    module = ampfuse.BottleneckAdapter(48, k, activation="gelu", scaling="channel", ln_before=True,
                                       init="bert").to(device)
    ln = torch.nn.LayerNorm(48).to(device)
    h = torch.randn(2, 13, 48, device=device, requires_grad=True)
    r = torch.randn(2, 13, 48, device=device)

    def step(h, r):
        return module(h, r, ln)

    wrt = [h] + [p for p in module.parameters() if p.requires_grad]  # their gradients come back as views
    with ampfuse.use_backend("triton"):  # read once, when the function is traced
        eager = step(h, r)
        g_eager = torch.autograd.grad(eager.square().sum(), wrt)
        before = runtime.launch_count
        compiled = torch.compile(step, fullgraph=True)(h, r)
        g_compiled = torch.autograd.grad(compiled.square().sum(), wrt)
    assert runtime.launch_count - before == 5  # the fused kernels ran inside the compiled graph
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert len(wrt) == 8  # h, both weights and biases, the per-channel scaling, the adapter LayerNorm
    for a, b in zip(g_compiled, g_eager):  # relative to each gradient's norm: some are small
        assert testing.rel_err(a, b) < 1e-5, testing.rel_err(a, b)


# ----------------------------------------------------------------------------- dispatch and bad input

def test_backend_selection(monkeypatch, device):
    tensors, kwargs = testing.adapter_inputs(4, 16, 2, device=device)
    monkeypatch.setenv("AMPFUSE_BACKEND", "torch")
    before = runtime.launch_count
    testing.call(adapter_block, tensors, **kwargs)
    assert runtime.launch_count == before
    with ampfuse.use_backend("triton"):  # the context manager wins over the environment
        testing.call(adapter_block, tensors, **kwargs)
    assert runtime.launch_count == before + 2
    monkeypatch.setenv("AMPFUSE_BACKEND", "fast")
    with pytest.raises(ValueError, match="AMPFUSE_BACKEND"):
        testing.call(adapter_block, tensors, **kwargs)
    with pytest.raises(ValueError, match="backend"):
        testing.call(adapter_block, tensors, backend="cudnn", **kwargs)


def test_unavailable_backends_say_why(monkeypatch):
    tensors, kwargs = testing.adapter_inputs(4, 16, 2)
    if not HAS_GPU:
        with pytest.raises(ampfuse.BackendUnavailableError, match="not built|CUDA tensors"):
            testing.call(adapter_block, tensors, backend="cuda", **kwargs)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ampfuse.BackendUnavailableError, match="CUDA tensors"):
            testing.call(adapter_block, tensors, backend="triton", **kwargs)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    t64 = {n: t.detach().double() for n, t in tensors.items()}
    with pytest.raises(ampfuse.BackendUnavailableError, match="dtype"):
        testing.call(adapter_block, t64, backend="triton", **kwargs)
    info = ampfuse.info()
    assert info["backends"]["torch"]["available"]
    assert all(v["available"] or v["reason"] for v in info["backends"].values())


@pytest.mark.parametrize("name,bad,message", [
    ("r", lambda t: t["r"][:, :-1], "r must have shape"),
    ("w_down", lambda t: t["w_down"][:, :-1], "w_down must have shape"),
    ("w_up", lambda t: t["w_up"].t(), "w_up must have shape"),
    ("b_down", lambda t: t["b_down"][:-1], "b_down must have shape"),
    ("ln_weight", lambda t: t["ln_weight"][:-1], "ln_weight must have shape"),
    ("h", lambda t: t["h"].long(), "h must have a floating-point dtype"),
    ("r", lambda t: t["r"].long(), "r must have a floating-point dtype"),
    ("w_up", lambda t: t["w_up"].to("meta"), "w_up is on meta"),
    ("h", lambda t: t["h"].detach().numpy(), "h must be a torch.Tensor"),
])
def test_bad_input_names_the_argument(name, bad, message):
    tensors, kwargs = testing.adapter_inputs(6, 16, 4)
    tensors[name] = bad(tensors)
    for backend in ("torch", "triton"):
        with pytest.raises((ValueError, TypeError), match=message):
            testing.call(adapter_block, tensors, backend=backend, **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(scaling=torch.ones(3)), "scaling must be"),
    (dict(scaling="big"), "scaling must be"),
    (dict(activation="softmax"), "activation must be"),
    (dict(dropout_p=1.0), "dropout_p"),
    (dict(ln_eps=0.0), "ln_eps"),
    (dict(adapter_ln_weight=torch.ones(16)), "given together"),
    (dict(training=True, dropout_p=0.1, seed=torch.tensor([7], dtype=torch.int32)), "seed must have dtype torch.int64"),
    (dict(training=True, dropout_p=0.1, seed=torch.tensor([7.0])), "seed must have dtype torch.int64"),
    (dict(training=True, dropout_p=0.1, seed=torch.tensor([7, 8])), r"seed must have shape \(1,\)"),
])
def test_bad_options_are_rejected(kwargs, message):
    tensors, _ = testing.adapter_inputs(6, 16, 4)
    with pytest.raises((ValueError, TypeError), match=message):
        testing.call(adapter_block, tensors, backend="triton", **kwargs)


def test_non_contiguous_inputs_are_copied_and_correct(device):
    tensors, kwargs = testing.adapter_inputs(24, 40, 6, device=device, scale_kind="channel")
    for name in ("h", "r"):  # (24, 40) views with a row stride of 80
        tensors[name] = torch.randn(24, 80, device=device)[:, ::2].requires_grad_()
    tensors["w_up"] = tensors["w_up"].detach().t().contiguous().t().requires_grad_()  # ok: contiguous
    tensors["w_down"] = torch.randn(40, 6, device=device).t().requires_grad_()  # transposed view
    assert not tensors["h"].is_contiguous() and not tensors["w_down"].is_contiguous()
    check_against_reference(tensors, kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_tokens(backend, device):
    tensors, kwargs = testing.adapter_inputs(0, 32, 4, device=device, scale_kind="scalar")
    y = testing.call(adapter_block, tensors, backend=backend, **kwargs)
    assert y.shape == (0, 32)
    y.sum().backward()
    assert tensors["h"].grad.shape == (0, 32)
    assert torch.count_nonzero(tensors["w_down"].grad) == 0 and torch.count_nonzero(tensors["scaling"].grad) == 0


# ----------------------------------------------------------------------------- module

def test_module_zero_init_up_is_exact_identity(device):
    module = ampfuse.BottleneckAdapter(48, reduction_factor=4, zero_init_up=True).to(device)
    ln = torch.nn.LayerNorm(48).to(device)
    h, r = torch.randn(3, 5, 48, device=device), torch.randn(3, 5, 48, device=device)
    for backend in ("torch", "triton"):
        with ampfuse.use_backend(backend):
            torch.testing.assert_close(module(h, r, ln), ln(h + r), rtol=1e-5, atol=1e-5)
    assert module.bottleneck_size == 12


def test_module_houlsby_init_is_near_identity_and_trainable():
    module = ampfuse.BottleneckAdapter(64, 8, original_ln_before=False, activation="swish")
    assert module.activation == "silu"
    assert module.down.weight.abs().max() <= 2e-2 and module.up.weight.abs().max() > 0
    ln = torch.nn.LayerNorm(64)
    h, r = torch.randn(4, 64), torch.randn(4, 64)
    y = module(h, r, ln)
    assert (y - ln(h + r)).abs().max() < 2e-2
    y.square().sum().backward()
    assert module.up.weight.grad is not None and module.up.weight.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_profiler_counts_kernel_launches(dtype, monkeypatch):
    """On a GPU the profiler, not our own counter, sees 2 kernels forward (constants, rows) and 3 backward
    (rows, columns, the fixed-order sum of the split partials)."""
    monkeypatch.setattr(runtime, "POISON_OUTPUTS", False)  # poisoning is a fill kernel of its own

    tensors, kwargs = testing.adapter_inputs(4096, 768, 64, dtype=dtype, param_dtype=torch.float32,
                                             device="cuda", scale_kind="channel")
    dy = torch.randn(4096, 768, device="cuda", dtype=dtype)
    for _ in range(2):  # compile and warm up outside the profile
        testing.call(adapter_block, tensors, backend="triton", **kwargs).backward(dy)
    torch.cuda.synchronize()

    y = None

    def forward():
        nonlocal y
        y = testing.call(adapter_block, tensors, backend="triton", **kwargs)

    assert len(testing.cuda_kernel_names(forward)) == 2
    params = [t for n, t in tensors.items() if n not in ("h", "r")]
    inputs = [tensors["h"], tensors["r"], *params]
    backward = testing.cuda_kernel_names(lambda: torch.autograd.grad(y, inputs, dy))
    assert len(backward) == 3, backward


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's bf16 refusal is a CPU matter")
def test_interpreter_refuses_bfloat16_rather_than_computing_it_wrongly():
    """Triton's CPU interpreter keeps bf16 as raw bits (triton issue 11584): the triton backend says
    so instead of returning garbage, for bf16 inputs alone and in autocast's mix with fp32."""
    tensors, kwargs = testing.adapter_inputs(9, 24, 4)
    for h_dtype, r_dtype in [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]:
        inputs = dict(tensors, h=tensors["h"].to(h_dtype), r=tensors["r"].to(r_dtype))
        with pytest.raises(BackendUnavailableError, match="bfloat16.*11584"):
            testing.call(adapter_block, inputs, backend="triton", **kwargs)
