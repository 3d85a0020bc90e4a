"""Data sources, transforms and grain pipelines (docs/method.md §8-9)."""
from pipa_jax.data.synthetic import SyntheticSource, class_frequencies, describe_domain_gap

__all__ = ["SyntheticSource", "class_frequencies", "describe_domain_gap"]
