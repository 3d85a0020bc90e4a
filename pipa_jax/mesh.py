"""The one device-mesh builder: a 1-D ('data',) mesh over the first n devices (Auto axes), used by
training, evaluation and prediction. Batches are sharded along 'data' (NamedSharding(mesh,
P('data'))); parameters and optimizer state are replicated (P())."""
from __future__ import annotations

import math

import jax


def make_mesh(num_devices: int = -1, *, batch_size: int | None = None) -> jax.sharding.Mesh:
    """A ('data',) mesh over `num_devices` devices (-1: all). With `batch_size`, the largest count
    that divides it (evaluation batches need not fill every device)."""
    n = jax.device_count() if num_devices in (-1, None) else int(num_devices)
    if not 0 < n <= jax.device_count():
        raise ValueError(f"a mesh of {n} devices: expected 1..{jax.device_count()} (or -1 for all)")
    if batch_size is not None:
        n = math.gcd(int(batch_size), n)
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])
