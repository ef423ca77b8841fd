"""Install: `pip install -e .[dev]` inside the environment made by `scripts/env.sh`."""
from setuptools import find_packages, setup

setup(
    name="parallel_adapters",
    version="0.1.0",
    description="Exact LoRA-family adapters for Megatron-core under TP/PP/DP, exported as PEFT safetensors",
    python_requires=">=3.11",
    packages=find_packages(include=["parallel_adapters", "parallel_adapters.*"]),
    package_data={"parallel_adapters": ["data/*.txt", "configs/*.yaml"]},
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "safetensors==0.8.0",
        "numpy",
        "PyYAML",
        "tqdm",
    ],
    extras_require={
        "deepspeed": ["deepspeed==0.19.8"],
        # Only on CUDA machines: a half-installed transformer-engine breaks `import megatron.core`.
        "te": ["transformer-engine[pytorch]"],
        "dev": ["pytest==9.2.0", "transformers==5.23.0", "peft==0.21.2", "gguf==0.19.0"],
    },
    entry_points={"console_scripts": ["parallel-adapters=parallel_adapters.cli:main"]},
)
