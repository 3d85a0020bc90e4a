"""Mean-teacher EMA of the student parameters (docs/method.md §3.1).

Official behaviour (DAFormer ``DACS._init_ema_weights`` / ``_update_ema``): at UDA iteration 0 the
teacher is a copy of the student; before every later iteration t the teacher becomes
``a_t * teacher + (1 - a_t) * student`` with ``a_t = min(1 - 1/(t + 1), alpha)``. Because
``a_0 = 0``, calling :func:`ema_update` at step 0 already yields the copy, so the train step can
call it unconditionally every step (no Python branch, one compiled program).

Only parameters are averaged; the caller decides what to do with BatchNorm statistics (the
teacher runs with batch statistics, docs/method.md §2.2).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_alpha(step, alpha: float = 0.999, ramp: bool = True) -> jax.Array:
    """Teacher momentum ``min(1 - 1/(step + 1), alpha)`` as a float32 scalar (``alpha`` at every
    step with ``ramp=False``: ProDA's EMA, a copy of the student updated with a fixed momentum).

    Args:
      step: the UDA iteration counter (Python or traced integer, >= 0).
      alpha: the momentum ceiling (0.999 in DAFormer/PiPa, 0.99 in DACS).

    Returns:
      float32 scalar: 0 at step 0, 0.5 at step 1, 0.9 at step 9, ``alpha`` from step
      ``1/(1 - alpha) - 1`` on.
    """
    if not ramp:
        return jnp.float32(alpha)
    step = jnp.asarray(step).astype(jnp.float32)
    rising = 1.0 - 1.0 / (step + 1.0)
    return jnp.minimum(rising, jnp.float32(alpha)).astype(jnp.float32)


def ema_update(teacher_params, student_params, step, alpha: float = 0.999, ramp: bool = True):
    """One EMA step: ``a * teacher + (1 - a) * student`` leaf by leaf, in float32.

    Args:
      teacher_params: pytree of teacher parameters.
      student_params: pytree with the same structure (the student after its last update).
      step: UDA iteration counter (traced int is fine); ``a = ema_alpha(step, alpha)``.
      alpha: the momentum ceiling.

    Returns:
      The new teacher pytree; floating leaves are float32. At step 0 it equals the student
      (``a = 0``), which reproduces the official initial copy. Non-floating leaves (if any) are
      taken from the student unchanged: there is nothing to average.
    """
    a = ema_alpha(step, alpha, ramp)

    def update(t, s):
        s = jnp.asarray(s)
        if not jnp.issubdtype(s.dtype, jnp.floating):
            return s
        return a * jnp.asarray(t, jnp.float32) + (1.0 - a) * s.astype(jnp.float32)

    return jax.tree.map(update, teacher_params, student_params)
