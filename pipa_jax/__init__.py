"""pipa_jax: PiPa (pixel- and patch-wise self-supervised learning for domain-adaptive semantic
segmentation) and the self-training frameworks it builds on, in JAX + Flax NNX."""
__version__ = "0.1.0"
