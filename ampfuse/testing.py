"""Helpers for comparing the fused ops with their float64 references (used by tests and benchmarks)."""

import contextlib

import torch

# Relative-error bounds ||out - ref|| / ||ref|| against the float64 reference, per input dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out holds NaN/inf (so poisoned outputs fail)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def adapter_inputs(M, d, k, *, dtype=torch.float32, param_dtype=None, r_dtype=None, device="cpu",
                   scale_kind="float", ln_before=False, lead=None, row_offset=0.0, generator=None):
    """Fresh random inputs of the adapter block: (tensors, kwargs). Every tensor requires grad.

    Weights are scaled so that the adapter's output is of the same order as h (the bottleneck is
    not a near-zero perturbation, so errors in it show in y and in every gradient). ``r_dtype``
    gives r its own dtype (autocast hands the op a 16-bit h and an fp32 r). ``row_offset`` adds to
    each row of h a common value of that standard deviation, and to each column a fixed outlier
    pattern, as BERT's hidden states have: large means that must not cancel a row's variance."""
    param_dtype = param_dtype or dtype
    g = generator or torch.Generator().manual_seed(0)

    def rand(*shape, std=1.0, mean=0.0, dt=param_dtype):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean
        return t.to(device=device, dtype=dt).requires_grad_()

    shape = (M, d) if lead is None else (*lead, d)
    h = torch.randn(*shape, generator=g, dtype=torch.float64)
    if row_offset:
        h += row_offset * (torch.randn(*shape[:-1], 1, generator=g, dtype=torch.float64)
                           + (torch.arange(d) % 97 == 3).double() * 2.0)
    tensors = dict(
        h=h.to(device=device, dtype=dtype).requires_grad_(), r=rand(*shape, dt=r_dtype or dtype),
        ln_weight=rand(d, std=0.2, mean=1.0), ln_bias=rand(d, std=0.2),
        w_down=rand(k, d, std=d ** -0.5), b_down=rand(k, std=0.5),
        w_up=rand(d, k, std=k ** -0.5), b_up=rand(d, std=0.5),
    )
    kwargs = {}
    if scale_kind == "float":
        kwargs["scaling"] = 0.7
    elif scale_kind == "scalar":
        tensors["scaling"] = rand(1, std=0.2, mean=0.8)
    elif scale_kind == "channel":
        tensors["scaling"] = rand(d, std=0.2, mean=0.8)
    else:
        raise ValueError(scale_kind)
    if ln_before:
        tensors["adapter_ln_weight"] = rand(d, std=0.2, mean=1.0)
        tensors["adapter_ln_bias"] = rand(d, std=0.2)
    return tensors, kwargs


POSITIONAL = ("h", "r", "ln_weight", "ln_bias", "w_down", "b_down", "w_up", "b_up")


def call(fn, tensors, **kwargs):
    """fn(*positional tensors, **keyword tensors, **kwargs) for the adapter block's signature."""
    keyword = {name: t for name, t in tensors.items() if name not in POSITIONAL}
    return fn(*(tensors[name] for name in POSITIONAL), **keyword, **kwargs)


def check_adapter_block(tensors, kwargs, backend="triton", tol=None, **op_kwargs):
    """Runs the adapter block on ``backend`` and the float64 reference on the same inputs; asserts
    y and every gradient are within the dtype's relative tolerance (and have the right shape/dtype)."""
    from .ops.adapter_block import adapter_block, adapter_block_reference

    tol = tol or TOLERANCE[tensors["h"].dtype]
    y = call(adapter_block, tensors, backend=backend, **kwargs, **op_kwargs)
    ref64 = float64_copy(tensors)
    y64 = call(adapter_block_reference, ref64, **kwargs, **op_kwargs)
    assert y.shape == tensors["h"].shape and y.dtype == torch.promote_types(tensors["h"].dtype, tensors["r"].dtype)
    assert rel_err(y, y64) < tol, ("y", rel_err(y, y64))
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    names = [n for n, t in tensors.items() if t.requires_grad]
    grads = torch.autograd.grad(y, [tensors[n] for n in names], dy.to(y.device, y.dtype))
    grads64 = torch.autograd.grad(y64, [ref64[n] for n in names], dy)
    for name, g, g64 in zip(names, grads, grads64):
        assert g.shape == tensors[name].shape and g.dtype == tensors[name].dtype, name
        assert rel_err(g, g64) < tol, (name, rel_err(g, g64))


def cuda_kernel_names(fn):
    """Names of the CUDA kernels the profiler sees while ``fn()`` runs (synchronised): the launch count
    from the GPU's side, not from ampfuse's own counter."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@contextlib.contextmanager
def aten_ops():
    """``with aten_ops() as calls:`` records the aten operations run inside the block, in order: (name,
    whether it is a view) each. A view launches no kernel on a GPU; anything else but an allocation
    does. The host-path test and benchmarks/sharing.py count with it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append((func.overloadpacket.__name__, func.is_view))
            return func(*args, **(kwargs or {}))

    calls = []
    with Record():
        yield calls


@contextlib.contextmanager
def device_switches():
    """``with device_switches() as events:`` records, in order, each launch (``"launch"``) and each entry
    to and exit from the device switch of kernels/runtime.on_tensors_device (``("enter", device)``,
    ``"exit"``), the switch made for CPU tensors too, so a test on the CPU sees where launches happen."""
    from .kernels import runtime

    events, launch, device_switch = [], runtime.launch, runtime.device_switch

    @contextlib.contextmanager
    def switch(device):
        events.append(("enter", device))
        try:
            yield
        finally:
            events.append("exit")

    def recorded_launch(*args, **kwargs):
        events.append("launch")
        return launch(*args, **kwargs)

    runtime.device_switch, runtime.launch = switch, recorded_launch
    try:
        yield events
    finally:
        runtime.device_switch, runtime.launch = device_switch, launch


def assert_launches_on_device(call, device):
    """Runs ``call()`` (an op on tensors of ``device``) without grad, then again with a backward through its
    sum, and asserts that every Triton launch happened inside a switch to ``device``
    (kernels/runtime.on_tensors_device) and that there were three switches in all (no-grad forward,
    forward, backward)."""
    with device_switches() as events:
        with torch.no_grad():
            call()
        call().sum().backward()
    inside = None
    for event in events:
        assert event != "launch" or inside == device, events
        inside = event[1] if event[0] == "enter" else None if event == "exit" else inside
    assert "launch" in events and events.count("exit") == 3, events


@contextlib.contextmanager
def triton_without_gpu():
    """``with triton_without_gpu() as launches:`` runs Triton's real launch path without a GPU: kernels
    compile for sm_90 on their first launch, as on a Hopper GPU, and each launch ends at the driver's
    launcher, which records (compiled kernel's function handle, grid, stream, arguments) in
    ``launches`` instead of running anything; ``launches.device`` sets the current device it reports.
    Tensors may be CPU tensors (only their addresses are read). benchmarks/host_overhead.py and
    tests/launch_checks.py use it. On exit the previous driver comes back, and the kernels compiled here
    are dropped from Triton's and ampfuse's caches (their handles are not real)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from .kernels import runtime

    class Launches(list):
        device = 0  # the current device the stand-in reports (a test may change it); its stream is 7 + 1000 device

    launches, kernels, handles = Launches(), set(), iter(range(1, 1 << 30))

    class Utils:
        def load_binary(self, name, binary, shared, device):
            return object(), next(handles), 32, 0, 1024  # module, function, registers, spills, max threads

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

        def unload_module(self, module):
            pass

    class Driver:  # the surface of Triton's CUDA driver that compiling and launching use
        utils = Utils()

        def is_active(self):
            return True

        def get_current_device(self):
            return launches.device

        def get_current_stream(self, device):
            return 7 + 1000 * device

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def launcher_cls(self, src, metadata):
            kernels.add(src.fn)

            def launcher(grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
                         exit_hook, *args):  # as Triton's C launcher: the hooks around the launch
                if enter_hook is not None:
                    enter_hook(launch_metadata)
                launches.append((function, (grid_x, grid_y, grid_z), stream, args))
                if exit_hook is not None:
                    exit_hook(launch_metadata)
            return launcher

    previous = driver._active  # None until Triton first needs a driver (set_active(None) restores that)
    runtime._COMPILED.clear()
    driver.set_active(Driver())
    try:
        yield launches
    finally:
        runtime._COMPILED.clear()
        for kernel in kernels:
            for compiled_kernels, *_ in kernel.device_caches.values():
                for compiled in compiled_kernels.values():
                    compiled.module = None  # nothing to unload (Triton 3.8 would ask the driver)
            kernel.device_caches.clear()
        driver.set_active(previous)


def float64_copy(tensors):
    """Detached float64 CPU copies (lists of tensors too), requiring grad where the originals do."""
    def copy(t):
        return t.detach().to(device="cpu", dtype=torch.float64).requires_grad_(t.requires_grad)
    return {name: [copy(t) for t in v] if isinstance(v, list) else copy(v) for name, v in tensors.items()}


def tiny_bert(cls=None, config_cls=None, **kw):
    """A small randomly initialised BERT-family model (4 layers, d=48) in eval mode, seeded."""
    import transformers

    cls = cls or transformers.BertModel
    config_cls = config_cls or transformers.BertConfig
    torch.manual_seed(0)
    config = config_cls(vocab_size=120, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64, **kw)
    return cls(config).eval()


def ddp_adapter_step(rank, world, init_file, out_dir):
    """One DDP (gloo) training step of a patched tiny BERT; saves the adapter weights before/after.

    A spawn target, so it lives in an importable module rather than in the test file."""
    import os

    import torch.distributed as dist

    import ampfuse

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = ampfuse.patch(tiny_bert(), ampfuse.AdapterConfig.pfeiffer(scaling="learned"))
    torch.manual_seed(rank)  # each rank starts from other adapter weights: DDP must broadcast rank 0's
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ddp = torch.nn.parallel.DistributedDataParallel(model.train())
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 120, (4, 9), generator=torch.Generator().manual_seed(100 + rank))
    ddp(input_ids=ids).last_hidden_state.square().mean().backward()
    opt.step()
    final = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"initial": initial, "final": final}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
