"""The CUDA extension: built and registered wherever a CUDA torch and toolkit are present (CI
checks this on every run); on a GPU the cuda backend passes the adapter block's correctness tests."""

import os
import shutil

import pytest
import torch

import ampfuse
from ampfuse import testing
from ampfuse.ops import cuda as cuda_ops
from ampfuse.ops.adapter_block import GRAD_SLOTS, adapter_block, adapter_block_reference


def toolkit_present():
    return any(os.path.isfile(os.path.join(home, "bin", "nvcc")) for home in filter(None, (
        os.environ.get("CUDA_HOME"), "/usr/local/cuda",
        os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc") or "/nonexistent"))))))


# setup.py builds it where torch sees a GPU, or with FORCE_CUDA=1 (CI), unless AMPFUSE_NO_CUDA=1
EXPECT_EXTENSION = (torch.version.cuda is not None and toolkit_present() and os.environ.get("AMPFUSE_NO_CUDA") != "1"
                    and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1"))


@pytest.mark.skipif(not EXPECT_EXTENSION, reason="needs a CUDA build of torch, a CUDA toolkit and a GPU or FORCE_CUDA=1")
def test_extension_is_built_and_registers_every_op():
    import ampfuse._C  # noqa: F401

    ops = torch.ops.ampfuse_C
    fwd, bwd = ops.adapter_block_fwd.default._schema, ops.adapter_block_bwd.default._schema
    assert len(fwd.arguments) == 19 and len(fwd.returns) == 1
    assert len(bwd.arguments) == 24 and len(bwd.returns) == 3
    assert sorted(cuda_ops.GRADIENT_ORDER) == sorted(GRAD_SLOTS)  # every slot, each once
    assert len(ops.set_poison_outputs.default._schema.arguments) == 1


def test_info_says_why_cuda_is_unavailable():
    report = ampfuse.info()["backends"]["cuda"]
    if not torch.cuda.is_available():
        assert not report["available"]
        assert ("CUDA tensors" in report["reason"]) if EXPECT_EXTENSION else ("not built" in report["reason"])


needs_cuda_backend = pytest.mark.skipif(
    not torch.cuda.is_available() or ampfuse.backend.why_unavailable("cuda", torch.device("cuda"), torch.float32)
    is not None, reason="needs a GPU and the built CUDA extension")
PLACEMENTS = [(True, True), (False, True), (True, False), (False, False)]


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "tanh", "identity"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_cuda_placements_and_activations(activation, placement):
    olnb, rbln = placement
    tensors, kwargs = testing.adapter_inputs(37, 48, 8, device="cuda", scale_kind="channel", ln_before=olnb)
    testing.check_adapter_block(tensors, kwargs, backend="cuda", activation=activation, original_ln_before=olnb,
                                residual_before_ln=rbln, ln_eps=1e-5)


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,d,k,scale_kind", [(4096, 768, 64, "scalar"), (333, 384, 1, "float"),
                                              (65, 1024, 256, "channel")])
def test_cuda_benchmark_and_awkward_shapes(dtype, M, d, k, scale_kind):
    tensors, kwargs = testing.adapter_inputs(M, d, k, dtype=dtype, param_dtype=torch.float32, device="cuda",
                                             scale_kind=scale_kind, ln_before=True)
    if dtype == torch.float32 and (d, k) == (1024, 256):
        # the backward would need 248 KiB of shared memory (csrc/adapter_block.cpp): a clear error
        y = testing.call(adapter_block, tensors, backend="cuda", activation="gelu", **kwargs)
        with pytest.raises(RuntimeError, match="use the triton backend"):
            y.sum().backward()
        return
    testing.check_adapter_block(tensors, kwargs, backend="cuda", activation="gelu")


@pytest.mark.gpu
@needs_cuda_backend
def test_cuda_dropout_mask_is_the_triton_mask():
    from ampfuse.kernels.adapter_block import dropout_keep_mask

    tensors, kwargs = testing.adapter_inputs(64, 96, 16, device="cuda", scale_kind="channel")
    seed = torch.tensor([987654321987], dtype=torch.int64, device="cuda")
    keep = dropout_keep_mask(seed, (64, 96), 0.3)
    y = testing.call(adapter_block, tensors, backend="cuda", training=True, dropout_p=0.3, seed=seed, **kwargs)
    y64 = testing.call(adapter_block_reference, testing.float64_copy(tensors), dropout_p=0.3,
                       keep_mask=keep.cpu(), **kwargs)
    assert testing.rel_err(y, y64) < 1e-4


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backward_with_dropout_is_deterministic_and_matches_the_reference(dtype):
    from ampfuse.kernels.adapter_block import dropout_keep_mask

    # 150 rows: ten 16-row tiles, the last one partial; d and k not multiples of 16; a learned scalar
    # scaling (its gradient is a block-wide sum) and the LayerNorm gradients.
    M, d, k, p = 150, 200, 40, 0.25
    tensors, kwargs = testing.adapter_inputs(M, d, k, dtype=dtype, param_dtype=torch.float32, device="cuda",
                                             scale_kind="scalar", ln_before=True)
    seed = torch.tensor([12345], dtype=torch.int64, device="cuda")
    dy = torch.randn(M, d, device="cuda", dtype=dtype)
    names = [n for n, t in tensors.items() if t.requires_grad]
    runs = []
    for _ in range(2):
        y = testing.call(adapter_block, tensors, backend="cuda", training=True, dropout_p=p, seed=seed, **kwargs)
        runs.append(torch.autograd.grad(y, [tensors[n] for n in names], dy))
    for name, a, b in zip(names, *runs):
        assert torch.equal(a, b), name
    ref64 = testing.float64_copy(tensors)
    keep = dropout_keep_mask(seed, (M, d), p).cpu()
    y64 = testing.call(adapter_block_reference, ref64, dropout_p=p, keep_mask=keep, **kwargs)
    grads64 = torch.autograd.grad(y64, [ref64[n] for n in names], dy.cpu().double())
    for name, g, g64 in zip(names, runs[0], grads64):
        assert testing.rel_err(g, g64) < testing.TOLERANCE[dtype], (name, testing.rel_err(g, g64))


@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_backward_hands_back_gradients_in_the_dtype_its_fake_kernel_declares(monkeypatch, grad_dtype):
    # The extension writes the parameter gradients in fp32; torch.compile traces the backward op with
    # its fake kernel, which declares the parameters' own dtype: the launcher casts (no GPU needed).
    from ampfuse.ops.adapter_block import AdapterBlockSpec, AdapterParams, gradient_layout

    M, d, k = 5, 24, 4
    tensors, _ = testing.adapter_inputs(M, d, k)
    params = AdapterParams(*(tensors[n].detach() for n in ("ln_weight", "ln_bias", "w_down", "b_down", "w_up",
                                                           "b_up")))
    written = torch.randn(gradient_layout(d, k)[1])

    class Extension:  # stands in for torch.ops.ampfuse_C
        @staticmethod
        def adapter_block_bwd(dy, h, r, *args):
            return torch.randn(M, d), torch.randn(M, d), written.clone()

    monkeypatch.setattr(cuda_ops, "_ops", lambda: Extension)
    h = tensors["h"].detach()
    _dh, _dr, flat = cuda_ops.backward(AdapterBlockSpec(), torch.randn(M, d), h, h.clone(), None, params, None,
                                       h.new_empty(0), True, True, grad_dtype)
    assert flat.dtype == grad_dtype
    torch.testing.assert_close(flat, written.to(grad_dtype), rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda_backend
def test_cuda_backend_under_torch_compile_equals_eager_with_half_parameters():
    # A half model: the backward's fake kernel declares fp16 gradients, which the CUDA launcher must hand back.
    module = ampfuse.BottleneckAdapter(200, 24, activation="gelu", scaling="channel", init="bert").cuda().half()
    ln = torch.nn.LayerNorm(200).cuda().half()
    h = torch.randn(3, 37, 200, device="cuda", dtype=torch.float16, requires_grad=True)
    r = torch.randn(3, 37, 200, device="cuda", dtype=torch.float16)
    params = [p for p in module.parameters() if p.requires_grad]

    def grads(fn):
        y = fn(h, r)
        return (y, *torch.autograd.grad(y.float().square().sum(), [h, *params]))

    with ampfuse.use_backend("cuda"):  # read once, when the function is traced
        eager = grads(lambda h, r: module(h, r, ln))
        compiled = grads(torch.compile(lambda h, r: module(h, r, ln), fullgraph=True))
    for a, b in zip(compiled, eager):  # the same kernels: equal up to the graph's own fp16 rounding
        assert a.dtype == b.dtype == torch.float16
        assert testing.rel_err(a, b) < 1e-3, testing.rel_err(a, b)
