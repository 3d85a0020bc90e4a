"""pipa_jax: PiPa / DAFormer / HRDA domain-adaptive semantic segmentation in JAX + Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="pipa_jax",
    version="0.1.0",
    description=(
        "Pixel- and patch-wise self-supervised domain-adaptive semantic segmentation "
        "(PiPa, DAFormer, HRDA, MIC) in JAX/Flax"
    ),
    packages=find_packages(include=["pipa_jax", "pipa_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.0",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.0",
        "ml-collections>=1.1.0",
        "clu>=0.0.12",
        "tensorflow-datasets>=4.9.10",
        # tensorflow-datasets imports it without declaring it.
        "importlib_resources>=6.0",
        "grain>=0.2.18",
        "numpy>=2.0",
        "pillow>=10.0",
        # SYNTHIA labels are 16-bit RGB PNGs, which Pillow silently reduces to 8 bits (every class
        # id becomes 0). pipa_jax reads both bytes through Pillow's decoder and falls back to pypng
        # (pure Python, no binary wheels), which also explains malformed files.
        "pypng>=0.20220715",
        # Progress bars of prepare_data (TFDS depends on it too).
        "tqdm>=4.60",
        "absl-py>=2.0",
        # On-device photometric ops (brightness, saturation, hue) of the DACS strong augmentation.
        "dm-pix>=0.4.5",
        # clu's metric writers (TensorBoard) and periodic actions import TensorFlow.
        "tensorflow-cpu>=2.16",
        "tensorboard>=2.16",
    ],
    extras_require={
        # Reading official .pth checkpoints. Pin to the CPU wheel in CI; users pick their own build.
        "torch": ["torch>=2.3"],
        # The parity tests compare against PyTorch (torch + transformers' SegFormer). On CPU-only
        # machines install a CPU torch build first; a plain `torch` may pull CUDA wheels.
        # The Cityscapes evaluator is installed separately with --no-deps (see README).
        # pytest-timeout: a hung test (a collective waiting for a dead peer) fails with a stack
        # trace after pytest.ini's timeout instead of holding CI until its limit.
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "pytest-timeout>=2.3", "transformers>=5.0", "torch>=2.3", "pyquaternion", "kornia>=0.7",
                 "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"],   # executing colab/pipa_jax.ipynb
    },
)
