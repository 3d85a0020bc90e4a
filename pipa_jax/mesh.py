"""The one device-mesh builder, used by training, evaluation and prediction.

A ('data',) mesh over the first n devices, or with `spatial = k > 1` a ('data', 'spatial') mesh of
n/k x k devices (Auto axes). Batches are sharded along 'data' and, on the spatial mesh, images,
labels and masks along their height over 'spatial' (`batch_sharding`): the released 2 + 2 image
recipe then uses 2k devices, each holding a band of height/k rows of its image. XLA's SPMD
partitioner splits the convolutions (exchanging halo rows between neighbours), the attention
queries and the elementwise work along those bands and gathers only what the algorithm reads
across them (see docs/method.md, "Spatial partitioning"). Parameters and optimizer state are
replicated (P()).
"""
from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA, SPATIAL = "data", "spatial"


def make_mesh(num_devices: int = -1, *, batch_size: int | None = None, spatial: int = 1) -> jax.sharding.Mesh:
    """A mesh over `num_devices` devices (-1: all): ('data',), or ('data', 'spatial') of shape
    (n / spatial, spatial) when spatial > 1. With `batch_size` (1-D meshes only), the largest count
    that divides it (evaluation batches need not fill every device)."""
    n = jax.device_count() if num_devices in (-1, None) else int(num_devices)
    if not 0 < n <= jax.device_count():
        raise ValueError(f"a mesh of {n} devices: expected 1..{jax.device_count()} (or -1 for all)")
    spatial = int(spatial)
    if spatial < 1 or n % spatial:
        raise ValueError(f"a spatial axis of {spatial} devices: expected a divisor of the mesh's {n} devices")
    auto = jax.sharding.AxisType.Auto
    if spatial > 1:
        if batch_size is not None:
            raise ValueError("make_mesh(batch_size=...) shrinks 1-D data meshes only")
        return jax.make_mesh((n // spatial, spatial), (DATA, SPATIAL), axis_types=(auto, auto),
                             devices=jax.devices()[:n])
    if batch_size is not None:
        n = math.gcd(int(batch_size), n)
    return jax.make_mesh((n,), (DATA,), axis_types=(auto,), devices=jax.devices()[:n])


def data_size(mesh: jax.sharding.Mesh) -> int:
    """Devices along the batch axis (the batch must be a multiple of it)."""
    return int(mesh.shape[DATA])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The sharding of every training-batch entry ([B, H, W, ...]: images, labels, margins): rows
    along 'data' and, on a spatial mesh, height along 'spatial'."""
    return NamedSharding(mesh, P(DATA, SPATIAL) if SPATIAL in mesh.axis_names else P(DATA))
