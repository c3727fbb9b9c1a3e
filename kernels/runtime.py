"""Launch bookkeeping shared by the Triton ops: launch settings, output allocation, launching and counting."""

import functools
import os

import torch
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from . import codes

# Tests set this to fill every output with NaN before a kernel runs, so unwritten elements fail.
POISON_OUTPUTS = False

# Activation codes by name (kernels/codes.py is the one source).
ACTIVATION_CODES = {name: index for index, name in enumerate(codes.ACTIVATIONS)}

# Number of Triton launches made through `launch` since import (tests read the difference).
launch_count = 0


def empty_output(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def max_programs(device) -> int:
    """Programs of a persistent grid: two per SM on a GPU; three under the interpreter so that
    small test shapes still walk several row blocks per program."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 3


# One software-pipelining stage unless a launcher asks for more (row_tiles, column_tiles and gemm_tiles do).
DEFAULT_META = {"num_stages": 1}

# Software-pipelining stages of the streaming kernels' chunk loops (the adapter block's ``pipelined``
# launches, the GMU adapter's backward). The backward's row and column kernels hold one block of 8 warps
# per SM (164-255 registers a thread on sm_90): with one stage a program's chunk loads wait out the whole
# memory latency before its dots, and no other block on the SM hides it. With two, Triton copies the next
# chunk asynchronously (cp.async into shared memory) while this one computes: 12-36 KiB more shared memory
# a block and a few registers, no spill (compile_report, triton 3.6 and 3.8). The adapter forward's two
# blocks per SM each keep one [64, 32] chunk of h and r in flight, 16 KiB an SM in bf16, below what covers
# an H100's memory latency at full bandwidth (docs/design.md, rule 6); pipelined too (its down pass's loads
# become cp.async copies) it keeps two blocks per SM under its 128-register cap, without a spill. Not
# pipelined, where two stages cost a spill or a block per SM: the GMU forward (8 bytes spilled in the mix
# with a per-sample stream), the adapter forward with its LayerNorm (8 bytes under triton 3.6), the adapter
# backward's variants with its LayerNorm or dropout (8-16 bytes in autocast's mix) and fp32 operands (no
# tensor cores, not a speed target: spills, or the column kernel drops to one block per SM).
STREAM_STAGES = 2

# The adapter backward's row kernel, pipelined, takes one more stage: one block per SM and [64, 32] chunks
# of dy and y (8 KiB in bf16), so two stages keep 8 KiB ahead of the chunk being computed and three keep
# 16 KiB, closer to the 17-25 KiB an H100's latency asks for (docs/design.md, rule 6). Compiled for sm_90
# at three stages instead of two it takes -3 to +11 registers and 2-5 KiB more shared memory at k = 64
# (77-96 KiB at k = 256, 43-60 at two), no spill at any width or k under triton 3.6 and 3.8. The column
# kernel's tiles carry 16 KiB of p and dz besides their dy, h and r: two stages keep about 23 KiB ahead.
ROW_PASS_STAGES = 3


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host ints (triton.cdiv is a constexpr function: several microseconds a call
    on the host, where every launch computes its grid)."""
    return -(-a // b)


def launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **DEFAULT_META | meta), counted: through Triton's JITFunction.run the first time
    a specialisation is seen, then straight to the compiled kernel's launcher (see the note below)."""
    global launch_count
    launch_count += 1
    meta = DEFAULT_META | meta
    if (not DIRECT_LAUNCH or not isinstance(kernel, JITFunction)  # not under TRITON_INTERPRET
            or kernel.pre_run_hooks or knobs.runtime.add_stages_inspection_hook is not None):
        kernel[grid](*args, **meta)
        return
    # the options JITFunction.run adds: Triton's cache key holds them, so ours does
    meta["debug"] = meta.get("debug", kernel.debug) or knobs.runtime.debug
    meta["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    device = driver.active.get_current_device()
    binder = kernel.device_caches[device][4]  # JITFunction.run's own (kernel cache, key cache, target, backend, binder)
    bound, specialization, options = binder(*args, **meta)
    key = (binder, *specialization, *options.items())
    try:
        compiled = _COMPILED.get(key)
    except TypeError:  # an unhashable constexpr or option (Triton's own key is a str): Triton's path
        kernel[grid](*args, **meta)
        return
    if compiled is None:
        _COMPILED[key] = kernel[grid](*args, **meta)
        return
    if callable(grid):
        grid = grid(bound)
    stream = driver.active.get_current_stream(device)
    padded, bound = (*grid, 1, 1), bound.values()
    enter_hook, exit_hook = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    # the launch metadata goes only to the hooks (a profiler's): none registered, none built
    metadata = compiled.launch_metadata(grid, stream, *bound) if _hooked(enter_hook) or _hooked(exit_hook) else None
    compiled.run(padded[0], padded[1], padded[2], stream, compiled.function, compiled.packed_metadata, metadata,
                 enter_hook, exit_hook, *bound)


def _hooked(hook):
    """Whether a launch hook of Triton's knobs has anything to call (an empty HookChain has not)."""
    return hook is not None and bool(getattr(hook, "calls", True))


# Direct launches. Triton's JITFunction.run spends 8-33 us of Python on every launch (28-33 us for the
# adapter block's kernels, benchmarks/host_overhead.py measures it): it binds and specialises the
# arguments, turns the specialisation into a cache key with str(), and compares every global constant
# the kernel reads with its value at compile time. A BERT layer's adapter kernels take about that long
# on the GPU. So `launch` runs only the first step, Triton's own binder, and looks the compiled kernel
# up under what Triton's cache key is made of (the specialisation and the options); it lets
# JITFunction.run launch a specialisation the first time (compiling it if need be) and keeps the
# compiled kernel it returns; after that it calls that kernel's launcher as JITFunction.run would,
# with the bound arguments on the current stream. Not followed after the first launch: a change of a
# global a kernel reads (Triton raises on that; these kernels read only constants). Pre-run hooks and
# a stages inspection hook send launches through JITFunction.run, as AMPFUSE_TRITON_LAUNCH=triton does.
DIRECT_LAUNCH = os.environ.get("AMPFUSE_TRITON_LAUNCH", "direct") != "triton"

_COMPILED = {}  # (Triton's binder of a kernel on a device, its specialisation, options) -> compiled kernel


def on_tensors_device(launcher):
    """Decorates an op's launcher ``launcher(spec, tensor, ...)``: it runs with ``tensor``'s CUDA device
    current. Triton launches on the current device whatever the tensors' device, and a model spread
    over GPUs (device_map="auto") calls layers on devices other than the current one; every path in
    (eager, no grad, torch.compile's custom ops, backward) goes through these launchers."""
    @functools.wraps(launcher)
    def run(spec, tensor, *args, **kwargs):
        switch = device_switch(tensor.device)
        if switch is None:
            return launcher(spec, tensor, *args, **kwargs)
        with switch:
            return launcher(spec, tensor, *args, **kwargs)
    return run


def device_switch(device):
    """torch.cuda.device(device) where ``device`` is a CUDA device other than the current one, else None
    (nothing to switch on the CPU or on the current device)."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return None


def scale_args(scale, scale_value, dummy):
    """(SCALE_MODE, pointer, value) for a float scaling (scale None) or a learned scalar/channel tensor."""
    if scale is None:
        return codes.code(codes.SCALE_MODES, "float"), dummy, float(scale_value)
    return codes.code(codes.SCALE_MODES, "channel" if scale.numel() > 1 else "scalar"), scale, 1.0


def block_width(width: int) -> int:
    """Padded tile width of a row: a power of two, and at least 16 (tl.dot's smallest operand)."""
    return max(16, 1 << (int(width) - 1).bit_length())


# Shared memory a kernel may give one staged dot operand (a weight chunk of [chunk, BLOCK_D]): with
# the row tiles that are staged too, kernels then stay under Hopper's 227 KiB per block.
CHUNK_BYTES = 64 << 10


def chunk_limit(block_d: int, element_size: int) -> int:
    """Largest power-of-two chunk (>= 16, tl.dot's least) of rows of a [chunk, block_d] tile of
    element_size bytes that fits CHUNK_BYTES."""
    return max(16, 1 << ((CHUNK_BYTES // (block_d * element_size)).bit_length() - 1))


def pack_layout(entries, num_slots):
    """Places gradients one after another in a flat buffer. entries: (name, slot, shape). Returns
    ([(name, offset, shape)], table of num_slots offsets with -1 for absent slots, total length)."""
    layout, table, offset = [], [-1] * num_slots, 0
    for name, slot, shape in entries:
        layout.append((name, offset, shape))
        table[int(slot)] = offset
        offset += int(torch.Size(shape).numel())
    return layout, table, offset


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (read when Triton imports the kernels)."""
    return _INTERPRETING


_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _precision(dtype):
    # fp32 operands: full-precision dots; 16-bit operands ignore the setting
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def row_tiles(D, K, dtype, heavy=False, stages=1, two_blocks=False):
    """Launch settings of a row kernel: a program owns BLOCK_M rows and walks the D columns in chunks of
    BLOCK_D, keeping [BLOCK_M, BLOCK_K] tiles of the k-wide bottleneck on chip. Small tiles in the
    interpreter (fast, and many chunks per row in the tests). On a GPU 8 warps, and as many rows as fit
    the registers without spilling (benchmarks/compile_report checks it): 64 (tensor-core friendly) at
    k <= 64, fewer for a wider bottleneck or fp32 operands (full-precision dots hold more); ``heavy``
    variants (an extra LayerNorm, dropout, mixed dtypes: more work per element) and fp32 get 16-column
    chunks (fp32 at k = 256 with 32: the forward spilled 2.7 KB per thread, ptxas falling back to 32
    registers, and the backward row kernel 1.5 KB; with 16, 136-176 and 0-192 bytes). ``stages``:
    software-pipelining stages on a GPU (one in the interpreter). ``two_blocks`` (the forward): 16-bit
    operands cap a thread at 128 registers (maxnreg), so that two blocks of 8 warps share an SM and hide
    each other's loads; compiled for sm_90 under the cap no 16-bit variant spills but one option corner
    (24-32 bytes, k = 256: README), fp32 would (176-200 bytes), and uncapped the forward took 122-161
    registers, one block per SM above 128."""
    block_k = block_width(K)
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_D=_interpreter_chunk(D), BLOCK_K=block_k, PRECISION=_precision(dtype))
    rows = 64 if block_k <= 64 else 32 if block_k <= 128 else 16
    if dtype == torch.float32:
        rows = min(rows, 32)
    narrow = heavy or dtype == torch.float32
    capped = {"maxnreg": 128} if two_blocks and dtype != torch.float32 else {}
    return dict(BLOCK_M=rows, BLOCK_D=16 if narrow else 32, BLOCK_K=block_k, PRECISION=_precision(dtype), num_warps=8,
                num_stages=stages, **capped)


@functools.lru_cache(maxsize=None)
def constants_tiles(D, K):
    """Launch settings of a kernel that turns parameters into per-call constants (the adapter block's): a
    program owns BLOCK_G rows of a k-wide block and walks d once, in chunks of BLOCK_D. Such a kernel is
    latency-bound (a few programs over about a hundred KB of weights): its time is its dependent round trips
    to memory, about one a chunk, so on a GPU wide chunks, 256 columns: three at d = 768, where 64-column
    chunks in three passes took 36 (docs/design.md, rule 8). 8 warps: about 100 registers on sm_90, no spill
    (4 warps take 128). In the interpreter the same 16 rows, so the tests' k > 16 cross row blocks of the
    Gram matrix, and chunks narrower than the test widths, so they cross chunk boundaries and a ragged last
    chunk."""
    if interpreting():
        return dict(BLOCK_G=16, BLOCK_D=_interpreter_chunk(D))
    return dict(BLOCK_G=16, BLOCK_D=256, num_warps=8)


@functools.lru_cache(maxsize=None)
def column_tiles(D, K, dtype, heavy=False, stages=1):
    """Launch settings of a column kernel: a program owns BLOCK_D columns and walks its tokens in tiles
    of BLOCK_M rows, accumulating two [BLOCK_KS, BLOCK_D] fp32 weight-gradient tiles on chip for a slice
    of BLOCK_KS of the k bottleneck columns (a grid axis runs over the slices). 16 columns: at 32, the
    fp16 and mixed-dtype variants spill at k = 64 on sm_90 (benchmarks/compile_report). Slices of at most
    128: at k = 256 two whole [256, 16] accumulators spill even at 16 rows. The products over all of k
    that the elementwise backward recomputes step through k BLOCK_KC = 64 columns at a time (at k = 256
    whole operands spill). ``heavy`` variants (the adapter's own LayerNorm or dropout recomputed per
    element) take at most 32 rows: at 64, Triton 3.6 spills 8 to 48 bytes at k = 64 in the variants with
    both (compile_report --all-placements). In the interpreter, slices of 32 and steps of 16, so the
    tests cross a slice boundary at their k = 48 and take both the one-step path (k <= 16) and the
    stepped one. ``stages``: software-pipelining stages on a GPU (one in the interpreter); an argument, not
    a read of STREAM_STAGES here, since the settings are cached per argument and STREAM_STAGES may change
    between calls (benchmarks.tune)."""
    block_k = block_width(K)
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_D=_interpreter_chunk(D), BLOCK_K=block_k, BLOCK_KS=min(block_k, 32),
                    BLOCK_KC=min(block_k, 16), PRECISION=_precision(dtype))
    rows = 64 if block_k <= 64 and dtype != torch.float32 else 16
    if heavy:
        rows = min(rows, 32)
    return dict(BLOCK_M=rows, BLOCK_D=16, BLOCK_K=block_k, BLOCK_KS=min(block_k, 128), BLOCK_KC=min(block_k, 64),
                PRECISION=_precision(dtype), num_warps=8, num_stages=stages)


def _interpreter_chunk(D):
    """Column chunk in the interpreter: 32 for test widths (several chunks, a ragged last one), 128 for
    BERT widths (still several chunks; the interpreter's cost is per operation, not per element)."""
    return 32 if D <= 256 else 128


def token_splits(tiles, chunks):
    """How many token ranges a column kernel's grid splits the tiles into (split-K over tokens): enough
    programs to fill a GPU, a number that depends on the shape alone, so gradients are bitwise the same
    on every run and every GPU. A few in the interpreter, so the tests cross split boundaries."""
    target = 6 if interpreting() else 264
    return max(1, min(tiles, cdiv(target, chunks)))


@functools.lru_cache(maxsize=None)
def gemm_tiles(dtype, accumulators=1, converted=False):
    """Launch settings of a tensor-core GEMM with a fused epilogue: a program owns a [BLOCK_M, BLOCK_N]
    output tile and walks the reduction in steps of BLOCK_K, its operand tiles software-pipelined
    through num_stages shared-memory buffers. ``dtype``: the operands'. ``accumulators``: how many
    [BLOCK_M, BLOCK_N] fp32 tiles stay live at once (a fused gate and projection keep three: the sum, the
    gate, the projection); it sets BLOCK_M so they stay in registers. ``converted``: an operand is loaded in
    a wider dtype and converted in registers (autocast's fp32 activations), which with three accumulators
    takes half the BLOCK_N. fp32 operands (full-precision dots, on the FMA units with their operands in
    registers) take half the BLOCK_K and, with three accumulators, half the BLOCK_N. On sm_90 none of these
    spills and all fit Hopper's shared memory (python -m benchmarks.compile_report --only fusion). Large
    tiles in the interpreter, which pays per operation and per program, not per element."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, PRECISION=_precision(dtype))
    narrow = accumulators > 1 and (converted or dtype == torch.float32)
    return dict(BLOCK_M=128 if accumulators == 1 else 64, BLOCK_N=64 if narrow else 128,
                BLOCK_K=32 if dtype == torch.float32 else 64, PRECISION=_precision(dtype), num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=None)
def stream_tiles(dtype):
    """Launch settings of an elementwise row pass without dots: a program owns BLOCK_M rows and streams the
    columns in chunks of BLOCK_D (no row of d in registers: design rule 1). On a GPU [32, 64] chunks over 4
    warps: 16 elements of each tensor per thread, about 100 registers, five blocks per SM. In the interpreter,
    chunks narrower than the test widths, so the tests cross chunk boundaries."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_D=32)
    return dict(BLOCK_M=32, BLOCK_D=64, num_warps=4)


def weight_grad_splits(tiles, token_blocks):
    """Token ranges (split-K) of a weight-gradient grid of ``tiles`` output tiles over ``token_blocks``
    blocks of tokens: enough programs to fill a GPU (about two per SM of a 132-SM part), a number that
    depends on the shape alone, so gradients are bitwise the same on every run and every GPU. Two in
    the interpreter whenever there are tokens for them, so the tests cross split boundaries."""
    target = 2 * tiles if interpreting() else 264
    return max(1, min(token_blocks, cdiv(target, tiles)))
