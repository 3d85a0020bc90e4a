"""Softmax attention of the MiT encoder: dense, or chunked over queries with a hand-written VJP."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pipa_jax.models.layers.forms import resolve_attention_impl

# Query rows per attention chunk are chosen so that one (image, head) pair's logits in a chunk
# hold at most this many elements (2048 rows x 256 keys). Measured on this CPU (2 cores, MiT-b5
# at 512x512, batch 2, forward + backward), this rule with the heads folded into the batch vs the
# earlier form (heads in the middle, about 2^20 logits of all images and heads a chunk):
# stage 1 (16384 queries, 1 head) 67 vs 81 ms, stage 3 (1024 queries, 5 heads, now unchunked)
# 19 vs 34 ms, stage 2 32 ms both. Rows of 1024 or 4096 at stage 1 took 72-75 ms.
ATTENTION_CHUNK_ELEMENTS = 1 << 19


def attention_chunk_size(n: int, m: int, elements: int = ATTENTION_CHUNK_ELEMENTS) -> int:
    """Query rows per chunk: n itself when n * m <= `elements`, else the largest power of two
    (>= 64) whose logits [chunk, m] per (image, head) hold at most `elements` values."""
    if n * m <= elements:
        return n
    chunk = 64
    while (2 * chunk) * m <= elements and 2 * chunk < n:
        chunk *= 2
    return chunk


def _dense_attention(q, k, v, scale):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * scale, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _fold_heads(x):
    """[B, n, heads, d] -> [B * heads, n, d]: one independent attention problem per leading index.
    XLA:CPU runs these 3-D batched dots 1.5-4x faster than the same dots with the heads axis in
    the middle (measured at MiT stage 1: forward 11 vs 42 ms), which need transposing copies."""
    b, n, h, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * h, n, d)


def _chunk_rows(x, chunk):
    """[G, n, ...] -> [n / chunk, G, chunk, ...] (n must be a multiple of chunk)."""
    g, n = x.shape[:2]
    return x.reshape(g, n // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)


def _unchunk_rows(x):
    x = x.swapaxes(0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _logits(qs, k):
    """Logits of the pre-scaled queries qs = q * scale: scaling q [G, n, d] instead of the logits
    [G, n, m] keeps a full-size multiply (and, on XLA:CPU, a materialised broadcast of the scale
    feeding the YNNPACK dot fusion) out of both passes."""
    return jnp.einsum("gqd,gkd->gqk", qs, k, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_attention(q, k, v, scale: float, chunk: int):
    return _chunked_attention_fwd(q, k, v, scale, chunk)[0]


def _chunked_attention_fwd(q, k, v, scale, chunk):
    """q [G, n, d], k and v [G, m, d] (heads folded into G). Saves q, k, v, the output and the
    log-sum-exp of each row's logits; the probabilities are recomputed in the backward pass."""
    def one(qc):
        logits = _logits(qc * scale, k)
        top = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - top)
        total = jnp.sum(e, axis=-1, keepdims=True)
        # Normalise before the value product: dividing its [chunk, d] result instead was 3x slower
        # on XLA:CPU (stage 1 forward, 32 vs 11 ms), as the division stops the fusions around it.
        out = jnp.einsum("gqk,gkd->gqd", (e / total).astype(v.dtype), v)
        return out, (top + jnp.log(total))[..., 0]

    if chunk >= q.shape[1]:
        out, lse = one(q)
    else:
        out, lse = jax.lax.map(one, _chunk_rows(q, chunk))  # lse stays chunked: [n / chunk, G, chunk]
        out = _unchunk_rows(out)
    return out, (q, k, v, out, lse)


def _chunked_attention_bwd(scale, chunk, res, g):
    q, k, v, out, lse = res

    def one(qc, gc, oc, lc):
        qs = qc * scale
        probs = jnp.exp(_logits(qs, k) - lc[..., None])                    # [G, c, m] float32
        dv = jnp.einsum("gqk,gqd->gkd", probs.astype(gc.dtype), gc, preferred_element_type=jnp.float32)
        dp = jnp.einsum("gqd,gkd->gqk", gc, v, preferred_element_type=jnp.float32)
        delta = jnp.sum(gc.astype(jnp.float32) * oc.astype(jnp.float32), axis=-1)
        ds = (probs * (dp - delta[..., None])).astype(q.dtype)  # d(loss) / d(logits)
        dq = jnp.einsum("gqk,gkd->gqd", ds, k, preferred_element_type=jnp.float32) * scale
        dk = jnp.einsum("gqk,gqd->gkd", ds, qs, preferred_element_type=jnp.float32)
        return dq, dk, dv

    if chunk >= q.shape[1]:
        dq, dk, dv = one(q, g, out, lse)
    else:
        def body(carry, inp):
            dq, dk, dv = one(*inp)
            return (carry[0] + dk, carry[1] + dv), dq

        zeros = jnp.zeros(k.shape, jnp.float32)
        (dk, dv), dq = jax.lax.scan(body, (zeros, zeros),
                                    (_chunk_rows(q, chunk), _chunk_rows(g, chunk), _chunk_rows(out, chunk), lse))
        dq = _unchunk_rows(dq)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_chunked_attention.defvjp(_chunked_attention_fwd, _chunked_attention_bwd)


def attention(q, k, v, *, impl: str = "auto", chunk: int | None = None):
    """softmax(q k^T / sqrt(d)) v per head. q [B, N, heads, d], k and v [B, M, heads, d] ->
    [B, N, heads, d]. Logits and softmax are computed in float32 whatever the input dtype.

    'chunked' (see resolve_attention_impl) folds the heads into the batch and computes the same
    values in chunks of `chunk` query rows (default: attention_chunk_size), padding N up to a
    multiple of the chunk with zero rows whose outputs are dropped (their cotangents are zero, so
    they add nothing to dk, dv).
    """
    scale = q.shape[-1] ** -0.5
    if resolve_attention_impl(impl) == "dense":
        return _dense_attention(q, k, v, scale)
    b, n, h, d = q.shape
    chunk = int(chunk) if chunk is not None else attention_chunk_size(n, k.shape[1])
    if chunk < 1:
        raise ValueError(f"attention chunk must be >= 1, got {chunk}")
    q, k, v = _fold_heads(q), _fold_heads(k), _fold_heads(v)
    pad = (-n) % chunk if chunk < n else 0
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0)))
    out = _chunked_attention(q, k, v, scale, min(chunk, q.shape[1]))[:, :n]
    return out.reshape(b, h, n, d).transpose(0, 2, 1, 3)

