"""The loss terms and shared values of the train step (base.py explains the contract). Each file
registers its values and terms on import; the import order below is their order in the step."""
from pipa_jax.terms.base import (TERMS, VALUES, NamedKeys, StepContext, Term, TermOut, View, build_terms,
                                 gated, merge, ordered_needs, register_term, register_value, resolve_gate,
                                 stable_hash)
from pipa_jax.terms import views  # noqa: E402,F401  (values first: their order is the BatchNorm order)
from pipa_jax.terms import supervised, feature_distance, pixel, patch, mic, proda  # noqa: E402,F401

__all__ = [
    "NamedKeys", "StepContext", "TERMS", "Term", "TermOut", "VALUES", "View", "build_terms", "gated", "merge",
    "ordered_needs", "register_term", "register_value", "resolve_gate", "stable_hash",
]
