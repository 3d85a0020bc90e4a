"""What a train step is made of: named randomness, shared values (views), loss terms, gating.

A loss term is a pure function of a `StepContext` and its own state, built once from the config
(`Term`); the step sums `weight * loss` over the terms and takes one gradient. Terms read shared
values by name (`ctx.get('source')`): the student's forward on the source batch, the teacher's
pseudo-labels, the mixed batch, ... Each value is computed once per step by the function
registered under its name (`register_value`), so every term that reads the source view sees the
same forward, and the views run in registration order, which is the official order of BatchNorm
updates (source, target, mixed, masked). A framework adds a new file that registers its values
and terms (`register_term`); the step itself does not change.

Randomness is named: `ctx.key(purpose)` = fold_in(step key, stable_hash(purpose)), so adding a
term or a view never changes what the others draw.
"""
from __future__ import annotations

import contextlib
import dataclasses
import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


def stable_hash(name: str) -> int:
    """A 31-bit hash of `name` that is the same in every process and Python version."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


class NamedKeys:
    """Per-purpose PRNG keys of one step: `keys(name) = fold_in(fold_in(root, step), stable_hash(name))`."""

    def __init__(self, root_key: jax.Array, step):
        self.step_key = jax.random.fold_in(root_key, step)

    def __call__(self, name: str) -> jax.Array:
        return jax.random.fold_in(self.step_key, stable_hash(name))


@dataclasses.dataclass(frozen=True)
class View:
    """One student forward: the normalised images, their labels and pixel weights (None = 1), and
    the segmentor's output (models.segmentor.SegOutput)."""
    images: jax.Array
    labels: jax.Array
    weight: jax.Array | None
    out: Any


class TermOut(NamedTuple):
    """A term's result: the unweighted loss (float32 scalar), its new state (same structure as the
    state it was given; None for stateless terms) and scalar metrics to log."""
    loss: jax.Array
    state: Any = None
    metrics: dict = {}


@dataclasses.dataclass(frozen=True)
class Term:
    """A loss term: `fn(ctx, state) -> TermOut`, weighted by `weight`, active from `start_step`
    (earlier steps: loss 0, state unchanged, see `gated`). `needs` names the shared values it
    reads; the step computes them before any term runs. `init_state()` gives the term's initial
    state (kept in TrainState.terms[name]); None for stateless terms."""
    name: str
    fn: Callable[["StepContext", Any], TermOut]
    weight: float = 1.0
    start_step: int = 0
    needs: tuple[str, ...] = ()
    init_state: Callable[[], Any] | None = None


# name -> fn(ctx) computing a shared value; registration order = computation order.
VALUES: dict[str, Callable[["StepContext"], Any]] = {}
# name -> builder(config) -> Term | None (None: the term is off in this config); registration order
# is the order of the terms in the step.
TERMS: dict[str, Callable[[Any], Term | None]] = {}


def register_value(name: str):
    def wrap(fn):
        VALUES[name] = fn
        return fn
    return wrap


def register_term(name: str):
    def wrap(builder):
        TERMS[name] = builder
        return builder
    return wrap


class StepContext:
    """Everything the terms of one step read. Built inside the loss function, so `model` (the
    student merged once from the differentiated parameters) carries gradients, and its BatchNorm
    statistics are updated by the views in order; `fresh_model()` is a separate merge whose
    statistics are discarded (for extra forwards that must not enter the running averages)."""

    def __init__(self, config, *, step, keys: NamedKeys, batch: dict, graphdef, model, params, batch_stats,
                 teacher_params, imnet=None, term_states=None):
        self.config = config
        self.step = step
        self.keys = keys
        self.batch = batch
        self.graphdef = graphdef
        self.model = model
        self.params = params
        self.batch_stats = batch_stats
        self.teacher_params = teacher_params
        # The step's frozen network (a module) or None: the ImageNet encoder of the feature distance,
        # or ProDA's previous-stage model (pipa_jax.terms.proda).
        self.imnet = imnet
        self.term_states = dict(term_states or {})   # every term's state at the start of the step (read-only)
        self.metrics: dict = {}
        self._cache: dict = {}
        self._frozen = False

    def key(self, name: str) -> jax.Array:
        return self.keys(name)

    def get(self, name: str):
        """The shared value `name` (computed on first use; see VALUES)."""
        if name in self._cache:
            return self._cache[name]
        if name not in VALUES:
            raise KeyError(f"no shared value {name!r} is registered; known: {', '.join(VALUES)}")
        value = VALUES[name](self)
        if not self._frozen:
            self._cache[name] = value
        return value

    def record(self, name: str, value) -> None:
        """A metric from a shared value's computation (ignored inside a gated term)."""
        if not self._frozen:
            self.metrics[name] = value

    def fresh_model(self):
        return merge(self.graphdef, self.params, self.batch_stats)

    def teacher(self):
        """The EMA teacher with the student's statistics; callers run it on batch statistics
        (use_running_average=False), and its updates are discarded."""
        return merge(self.graphdef, self.teacher_params, self.batch_stats)

    @contextlib.contextmanager
    def frozen(self):
        """Inside a lax.cond branch: values computed here are not cached (they belong to the
        branch's trace) and metrics are not recorded."""
        old, self._frozen = self._frozen, True
        try:
            yield self
        finally:
            self._frozen = old


def merge(graphdef, params, batch_stats):
    """nnx.merge at the current trace level. The identity tree.map rebuilds the Variables, because
    BatchNorm updates its statistics in place and NNX refuses to mutate a Variable created under an
    outer trace (jit outside, grad or cond inside)."""
    return nnx.merge(graphdef, *jax.tree.map(lambda v: v, (params, batch_stats)))


def build_terms(config) -> tuple[Term, ...]:
    """The loss terms of `config`, in the step's order."""
    terms = tuple(t for t in (builder(config) for builder in TERMS.values()) if t is not None)
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate loss-term names {names}")
    if not terms:
        raise ValueError("the config enables no loss term; enable at least the source cross-entropy")
    return terms


def ordered_needs(terms) -> list[str]:
    """The shared values the terms read, in registration (computation) order."""
    wanted = {n for t in terms for n in t.needs}
    unknown = sorted(wanted - set(VALUES))
    if unknown:
        raise KeyError(f"loss terms need unregistered values {unknown}")
    return [n for n in VALUES if n in wanted]


def resolve_gate(gate: str, backend: str | None = None) -> str:
    """How a term with start_step > 0 is switched on (config.term_gate).

    'cond' runs it under lax.cond, so no work is done before the start step (GPU / TPU).
    'mask' computes it every step and zeroes it before the start step: XLA:CPU runs the large
    convolutions and matmuls inside a conditional's branch far slower than at top level
    (measured on a 2-core CPU, MiT-b0 DAFormer + PiPa step at 256x256, batch 2 + 2: 95 s with
    cond, 6.6 s without), so computing it unconditionally is much cheaper there.
    'auto' picks 'mask' on CPU and 'cond' elsewhere. Both give the same updates.
    """
    if gate not in ("auto", "cond", "mask"):
        raise ValueError(f"config.term_gate = {gate!r}: expected 'auto', 'cond' or 'mask'")
    if gate == "auto":
        return "mask" if (backend or jax.default_backend()) == "cpu" else "cond"
    return gate


def gated(term: Term, ctx: StepContext, state, mode: str) -> TermOut:
    """Runs `term` when ctx.step >= term.start_step; before that its loss and metrics are 0 and
    its state is unchanged. `mode`: 'cond' or 'mask' (resolve_gate)."""
    if term.start_step <= 0:
        return _checked(term, term.fn(ctx, state), state)
    active = ctx.step >= term.start_step

    def on(_):
        with ctx.frozen():
            return _checked(term, term.fn(ctx, state), state)

    if mode == "cond":
        shape = jax.eval_shape(on, None)
        zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731

        def off(_):
            return TermOut(jnp.zeros((), shape.loss.dtype), state, zeros(shape.metrics))
        return jax.lax.cond(active, on, off, None)
    out = on(None)
    keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731
    return TermOut(jnp.where(active, out.loss, 0.0), jax.tree.map(keep, out.state, state),
                   {k: jnp.where(active, v, jnp.zeros_like(v)) for k, v in out.metrics.items()})


def _checked(term: Term, out, state) -> TermOut:
    if not isinstance(out, TermOut):
        out = TermOut(out)
    loss = jnp.asarray(out.loss, jnp.float32)
    if loss.shape != ():
        raise ValueError(f"loss term {term.name!r} returned a loss of shape {loss.shape}; expected a scalar")
    if jax.tree.structure(out.state) != jax.tree.structure(state):
        raise ValueError(f"loss term {term.name!r} returned a state of another structure than it was given")
    return TermOut(loss, out.state, dict(out.metrics))

