"""One training iteration as a pure function (docs/method.md §3).

`make_train_step(config, graphdef, tx, imnet_graphdef)` returns
`train_step(state, batch, imnet_params) -> (state, metrics)`. It reads like the paper:
1. the EMA teacher moves towards the student (self-training only);
2. inside the loss function the student is merged once and the shared values the loss terms
   need are computed in order (pipa_jax.terms: the source view, the teacher's pseudo-labels, the
   ClassMix batch, the mixed view, ...);
3. the loss terms run (each gated by its start step), `loss = sum(weight * term)`;
4. one optimizer update on its gradient.
No host round trip. The frozen ImageNet encoder is an argument (not a closure constant, not
part of the checkpointed state). Randomness is named (pipa_jax.terms.NamedKeys): every purpose
draws `fold_in(fold_in(key(seed), step), stable_hash(purpose))`, so a resumed run draws the same
numbers and a new term never re-draws the others.

A non-finite loss or gradient skips the update, so the state (and any checkpoint of it) stays
the last good one; `metrics['nonfinite/<term>']` (1 when that term was non-finite, summed by the
loop over a log window) name the culprit, 'nonfinite/gradient' the gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from pipa_jax import terms as terms_lib
from pipa_jax import uda
from pipa_jax.optim import learning_rate_schedule
from pipa_jax.state import TrainState

NONFINITE = "nonfinite/"


def make_train_step(config: ml_collections.ConfigDict, graphdef, tx: optax.GradientTransformation,
                    imnet_graphdef=None, terms=None):
    c = config
    terms = tuple(terms) if terms is not None else terms_lib.build_terms(c)
    needs = terms_lib.ordered_needs(terms)
    if "imnet_source" in needs and imnet_graphdef is None:
        raise ValueError("uda.fd needs the frozen ImageNet encoder (imnet_graphdef)")
    gate = terms_lib.resolve_gate(c.get("term_gate", "auto"))
    schedule = learning_rate_schedule(c, c.optimizer.learning_rate)
    root_key = jax.random.key(c.seed)
    self_training = bool(c.uda.self_training)

    def train_step(state: TrainState, batch: dict, imnet_params=None):
        keys = terms_lib.NamedKeys(root_key, state.step)
        metrics = {}
        teacher = state.teacher_params
        if self_training:
            ramp = bool(c.uda.get("ema_ramp", True))
            teacher = uda.ema_update(state.teacher_params, state.params, state.step, alpha=c.uda.ema_alpha, ramp=ramp)
            metrics["ema_alpha"] = uda.ema_alpha(state.step, alpha=c.uda.ema_alpha, ramp=ramp)
        imnet = nnx.merge(imnet_graphdef, imnet_params) if imnet_graphdef is not None else None

        def loss_fn(params):
            model = terms_lib.merge(graphdef, params, state.batch_stats)
            ctx = terms_lib.StepContext(c, step=state.step, keys=keys, batch=batch, graphdef=graphdef, model=model,
                                        params=params, batch_stats=state.batch_stats, teacher_params=teacher,
                                        imnet=imnet, term_states=state.terms)
            for name in needs:      # the views in the official BatchNorm order
                ctx.get(name)
            outs = {t.name: terms_lib.gated(t, ctx, state.terms.get(t.name), gate) for t in terms}
            total = sum(t.weight * outs[t.name].loss for t in terms)
            return total, (outs, nnx.state(model, nnx.BatchStat), ctx.metrics)

        (total, (outs, new_bs, ctx_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        tx_updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, tx_updates)
        new_terms = {name: outs[name].state for name in state.terms}

        gnorm = optax.tree.norm(grads)
        finite = {name: jnp.isfinite(o.loss) for name, o in outs.items()}
        finite["gradient"] = jnp.isfinite(gnorm)
        ok = jnp.all(jnp.stack(list(finite.values()))) & jnp.isfinite(total)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new_state = state.replace(
            step=jnp.where(ok, state.step + 1, state.step),
            params=keep(new_params, state.params),
            batch_stats=keep(new_bs, state.batch_stats),
            teacher_params=keep(teacher, state.teacher_params),
            opt_state=keep(new_opt, state.opt_state),
            terms=keep(new_terms, state.terms),
        )
        metrics.update(ctx_metrics)
        for name, o in outs.items():
            metrics[f"loss/{name}"] = o.loss
            metrics.update(o.metrics)
        metrics["loss/total"] = total
        metrics["grad_norm"] = gnorm
        metrics["learning_rate"] = schedule(state.step)
        metrics.update({NONFINITE + k: (~v).astype(jnp.int32) for k, v in finite.items()})
        return new_state, metrics

    return train_step


def init_term_states(terms) -> dict:
    """{term name: initial state} of the terms that keep one (TrainState.terms)."""
    return {t.name: t.init_state() for t in terms if t.init_state is not None}


def nonfinite_terms(metrics: dict) -> list[str]:
    """Names of the terms whose `nonfinite/` count in `metrics` is positive ('gradient' last)."""
    bad = [k[len(NONFINITE):] for k, v in metrics.items() if k.startswith(NONFINITE) and int(v) > 0]
    return sorted(bad, key=lambda name: name == "gradient")
