"""BatchNorm with PyTorch's exact semantics."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class BatchNorm(nnx.Module):
    """BatchNorm2d with PyTorch's exact semantics over NHWC inputs.

    Written here rather than taken from nnx.BatchNorm because PyTorch updates the running
    variance with the UNBIASED batch variance (n / (n - 1)) while normalising with the biased
    one; Flax uses the biased variance for both. Official checkpoints carry PyTorch statistics,
    and evaluation uses them, so training here must accumulate them the same way.
    Statistics are reduced in float32 over every axis but the last; under jit with a batch
    sharded over a mesh the reduction spans the global batch (SyncBN semantics).
    """

    def __init__(self, channels: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))
        self.eps = eps
        self.momentum = momentum
        self.dtype = dtype

    def __call__(self, x, *, use_running_average: bool):
        if use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            n = math.prod(x.shape[:-1])
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
            self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
        inv = jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        shift = self.bias[...].astype(jnp.float32) - mean * inv
        return (x.astype(jnp.float32) * inv + shift).astype(self.dtype)
