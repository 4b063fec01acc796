"""specjax: lossless speculative and parallel decoding for language models in JAX."""

from setuptools import setup

RUNTIME = [
    "jax>=0.6,<0.11",          # CPU wheels by default; see the gpu/tpu extras
    "flax>=0.10,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "chex>=0.1.88,<0.2",
    "absl-py>=2.1,<3",
    "numpy>=1.26,<3",
    "gguf>=0.16,<0.20",
    "safetensors>=0.4,<0.9",
    "tokenizers>=0.20,<0.24",
    "jinja2>=3.1,<4",          # chat templates
    "tqdm>=4.66,<5",
]

TEST = [
    "pytest>=8,<10",
    "scipy>=1.11,<2",
    # Test-time references only; never imported by specjax, models or drafters at run time.
    "torch==2.13.0",          # the CPU build; `pip install torch==2.13.0` takes the local wheel
    "transformers>=4.52,<6",
    "accelerate>=1.0,<2",     # transformers needs it to load GGUF files
]

setup(
    name="specjax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=["specjax", "models", "drafters"],
    install_requires=RUNTIME,
    extras_require={
        "test": TEST,
        # GPU: `pip install -e .[gpu]` installs jax's CUDA 12 plugin (Linux x86_64, NVIDIA driver >= 525).
        "gpu": ["jax[cuda12]>=0.6,<0.11"],
        # TPU: `pip install -e .[tpu]` on a Cloud TPU VM (libtpu comes from PyPI).
        "tpu": ["jax[tpu]>=0.6,<0.11"],
        "plot": ["matplotlib>=3.8"],
    },
)
