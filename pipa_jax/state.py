"""TrainState: everything a run needs to continue exactly where it stopped."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    step: jax.Array            # int32 scalar: optimizer steps taken
    params: Any                # student parameters (nnx.State of Param)
    batch_stats: Any           # student BatchNorm running statistics (nnx.State of BatchStat)
    teacher_params: Any        # EMA teacher parameters (its BatchNorm runs on batch statistics)
    opt_state: Any             # optax state
    terms: Any                 # loss-term states by term name, e.g. {'patch': the PiPa FIFO bank}


def create_train_state(params, batch_stats, tx, term_states=None) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        # At step 0 the teacher is the student (docs/method.md §3.1); the copy is explicit so that
        # donation of the state never aliases the two.
        teacher_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        terms=dict(term_states or {}),
    )
