"""The training loop: mesh, data, state init/restore, jitted steps, evaluation, checkpoints, logs.

`train_and_evaluate(config, workdir)` runs (or resumes) a run in `workdir` and returns the final
metrics. Everything heavy happens in the jitted step; the host only feeds batches, writes logs
at log steps and saves checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pipa_jax import config as config_lib
from pipa_jax import convert, distributed, inference, model_io, report
from pipa_jax import io as io_lib
from pipa_jax import mesh as mesh_lib
from pipa_jax import metrics as metrics_lib
from pipa_jax import terms as terms_lib
from pipa_jax.data import pipeline
from pipa_jax.labels import CLASS_NAMES
from pipa_jax.models import build_segmentor
from pipa_jax.optim import make_optimizer
from pipa_jax.state import create_train_state
from pipa_jax.step import NONFINITE, init_term_states, make_train_step, nonfinite_terms


class WorkdirMismatchError(ValueError):
    """The workdir holds a run of a different model or data setup."""


# Fields that must agree between a checkpoint and the config that resumes it.
_IDENTITY_FIELDS = ("model", "data.crop_size", "batch_size", "seed", "pipa.patch.bank_cells",
                    "pipa.patch.bank_steps")
# Model fields that do not change what a checkpoint holds (how it computes, where it started):
# a run may resume with other values, e.g. remat=True after running out of memory.
_FREE_MODEL_FIELDS = ("pretrained", "require_pretrained", "dwconv_impl", "conv_impl", "attention_impl", "dense_impl", "scan_blocks", "remat",
                      "dtype")


def make_mesh(c: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The run's mesh over config.mesh_shape devices: ('data',), or ('data', 'spatial') with
    config.mesh_spatial > 1 (pipa_jax.mesh)."""
    return mesh_lib.make_mesh(c.mesh_shape, spatial=c.get("mesh_spatial", 1))


def _select(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else (list(cfg) if isinstance(cfg, tuple) else cfg)


def _check_workdir_config(c, workdir):
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    diffs = []
    for key in _IDENTITY_FIELDS:
        new_v = json.loads(json.dumps(_select(c, key)))
        old_v = old
        for part in key.split("."):
            old_v = old_v.get(part) if isinstance(old_v, dict) else None
        if key == "model" and isinstance(old_v, dict):
            old_v, new_v = ({k: v for k, v in d.items() if k not in _FREE_MODEL_FIELDS} for d in (old_v, new_v))
        if old_v != new_v:
            diffs.append(f"{key}: checkpoint {old_v!r} vs config {new_v!r}")
    if diffs:
        raise WorkdirMismatchError(
            f"{workdir} holds a run with a different setup, so it cannot be resumed:\n  " + "\n  ".join(diffs)
            + "\nUse a new --workdir, or the config that started this run.")


class _Preemption:
    """A SIGTERM makes the loop save a checkpoint and exit cleanly. One process: a handler sets a
    flag, seen at the next step. Several processes: JAX's coordination service catches the signal
    on whichever process receives it and tells the others; `reached(step)` (called by every process
    at every step) turns True on all of them at the same step, so all save that step and none
    is left waiting in a collective (jax.experimental.multihost_utils)."""

    def __init__(self):
        self._old = None
        self._multi = jax.process_count() > 1
        self.requested = False

    def __enter__(self):
        if self._multi:
            return self       # the coordination service owns SIGTERM; a Python handler would hide it
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. notebooks): no handler
            self._old = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                logging.warning("preemption notice: every process saves step %d and stops", step)
                self.requested = True
        return self.requested

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def build_model_and_state(c, mesh):
    """Model, frozen ImageNet encoder, optimizer and a fresh (sharded) TrainState."""
    model = build_segmentor(c.model, seed=c.seed)
    if c.model.get("pretrained", ""):
        path = c.model.pretrained
        if os.path.isdir(path):
            nnx.update(model.backbone, nnx.state(model_io.load_model(path).backbone))
        else:
            convert.load_torch_weights(model.backbone, path)
    if c.get("init_from", ""):
        loaded = load_network(c.init_from, "config.init_from", c)
        # To the host first: restored on one device, the arrays would pin the state's init there.
        nnx.update(model, jax.device_get(loaded.params), jax.device_get(loaded.batch_stats))
    imnet = None
    if c.uda.fd:
        imnet_graphdef, imnet_params = nnx.split(model.backbone, nnx.Param)
        imnet = (imnet_graphdef, jax.tree.map(jnp.copy, imnet_params))
    elif c.get("proda", {}).get("stage", "") in ("stage1", "stage2", "stage3"):
        # ProDA's frozen network (stage 1: the warm-up model, stages 2-3: the previous stage).
        loaded = load_network(c.proda.frozen_from, "config.proda.frozen_from", c)
        imnet = nnx.split(nnx.merge(loaded.graphdef, loaded.params, loaded.batch_stats))
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = make_optimizer(c, params)
    repl = NamedSharding(mesh, P())
    init = jax.jit(lambda p, b, s: create_train_state(p, b, tx, s), out_shardings=repl)
    state = init(params, batch_stats, init_term_states(terms_lib.build_terms(c)))
    return graphdef, tx, state, imnet


_NETWORK_FIELDS = ("segmentor", "backbone", "decode_head", "num_classes", "embed_dim")


def load_network(path: str, what: str, c):
    """The segmentation network (evaluate.LoadedModel) of a training workdir (its latest student)
    or a model directory, checked against `c.model`; `what` names the config field in errors."""
    from pipa_jax import evaluate as evaluate_lib
    if not path or not os.path.isdir(path):
        hint = ""
        if c.get("proda", {}).get("stage", ""):
            hint = (" (ProDA: each stage reads the previous one; `python -m pipa_jax.proda run --config ... "
                    "--workdir DIR` runs them in order)")
        raise FileNotFoundError(f"{what} = {path!r}: no such workdir or model directory{hint}")
    if os.path.exists(os.path.join(path, "config.json")):
        loaded, _ = evaluate_lib.load_run_model(path, "student")
    else:
        loaded = evaluate_lib.load_checkpoint_model(path)
    diffs = [f"{k}: {loaded.config.get(k)!r} there, {c.model.get(k)!r} here" for k in _NETWORK_FIELDS
             if loaded.config.get(k, None) != c.model.get(k, None)]
    if diffs:
        raise WorkdirMismatchError(f"{what} = {path} holds another network than config.model: " + "; ".join(diffs))
    return loaded


def make_eval_step(graphdef):
    """Jitted (params, batch_stats, images uint8, labels, *, settings) -> confusion matrix [19, 19]
    on device: whole-image or sliding-window logits upsampled to the labels' (full) resolution
    before the argmax (pipa_jax.inference, the same code as `python -m pipa_jax.evaluate`)."""
    return inference.make_eval_step(graphdef)


def evaluate(c, eval_step, mesh, params, batch_stats) -> np.ndarray:
    """Dataset-level confusion matrix int64 [19, 19] of the model on the target val split, with
    the inference settings of `c.eval` (mode, crop_size, stride)."""
    source = pipeline.make_source(c.data.target, "val", c)
    conf, _ = inference.evaluate_source(
        eval_step, params, batch_stats, source, c.data.eval_batch_size, inference.settings_from_config(c),
        sharding=NamedSharding(mesh, P("data")), num_threads=max(1, int(c.data.prefetch)))
    return conf


def _eval_record(conf, c=None):
    """metrics.json entry: mIoU over 19 classes, per-class IoU, mIoU16 / mIoU13 when the config's
    eval.miou_subsets asks for them (SYNTHIA->Cityscapes), and the pixel confusion matrix itself
    (rows = ground truth, columns = prediction), from which any other class subset or score can be
    recomputed without re-running the evaluation."""
    iou = metrics_lib.iou_from_confusion(conf)
    rec = {"miou": float(metrics_lib.miou(conf)),
           "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(CLASS_NAMES, iou)},
           "confusion_matrix": np.asarray(conf, dtype=np.int64).tolist()}
    for name, ids in (metrics_lib.subsets_of(c) if c is not None else {}).items():
        rec[name.lower()] = float(metrics_lib.miou(conf, ids))
    return rec


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    c = config
    workdir = os.path.abspath(workdir)
    config_lib.validate(c, jax.device_count())
    config_lib.enable_compilation_cache(c)
    os.makedirs(workdir, exist_ok=True)
    _check_workdir_config(c, workdir)
    mesh = make_mesh(c)
    repl, data_sharding = NamedSharding(mesh, P()), mesh_lib.batch_sharding(mesh)

    graphdef, tx, state, imnet = build_model_and_state(c, mesh)
    imnet_graphdef, imnet_params = imnet if imnet else (None, None)
    if imnet_params is not None:
        imnet_params = jax.device_put(imnet_params, repl)
    train_step = make_train_step(c, graphdef, tx, imnet_graphdef)
    p_train_step = jax.jit(train_step, in_shardings=(repl, data_sharding, repl),
                           out_shardings=(repl, repl), donate_argnums=0)
    eval_step = make_eval_step(graphdef)

    ckpt_dir = os.path.join(workdir, "checkpoints")
    mngr = ocp.CheckpointManager(
        ckpt_dir, item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(max_to_keep=c.keep_checkpoints, create=True,
                                             enable_async_checkpointing=True))
    start_index = 0
    latest = mngr.latest_step()
    if latest is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        try:
            restored = mngr.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise WorkdirMismatchError(
                f"the checkpoint at {ckpt_dir}/{latest} does not fit this model/config ({type(e).__name__}: "
                f"{str(e)[:300]}). Use a new --workdir or the config that started the run.") from e
        state = restored["state"]
        start_index = int(restored["data"]["next_index"])
        logging.info("resumed from step %d in %s", latest, ckpt_dir)
    if jax.process_index() == 0:
        io_lib.write_json_atomic(os.path.join(workdir, "config.json"), json.loads(c.to_json_best_effort()))

    writer = _make_writer(workdir)
    step = int(jax.device_get(state.step))
    if step == 0 and jax.process_index() == 0:
        _log_parameter_overview(state.params)
    it = pipeline.train_iterator(c, start_index)
    progress = _Progress(c, writer, workdir)
    metrics_path = os.path.join(workdir, "metrics.json")
    history = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            history = json.load(f)
    acc, acc_n, final = None, 0, {}
    # The step's metrics are summed on device by one jitted add (donated), not one host-launched
    # add per metric; they leave the device only at log steps.
    accumulate = jax.jit(lambda a, m: jax.tree.map(jnp.add, a, m), donate_argnums=0)
    compiled_once = False
    level = c.get("loop_transfer_guard", "")
    guard = (lambda: jax.transfer_guard(level)) if level else contextlib.nullcontext
    t0 = time.time()

    def save(step_now):
        # One process: the state is on its devices, and one device_get is fast (Orbax's own
        # device-to-host transfer of 800+ replicated arrays was measured at 3.7 MiB/s here, 14.5 s
        # blocking the loop for a 55 MiB MiT-b0 state; device_get takes well under 1 s). Several
        # processes: Orbax writes the global arrays itself, each shard once, from the process that
        # holds it, and commits when all processes are done. The write is asynchronous and atomic
        # (temporary directory, then rename) either way.
        saved = jax.device_get(state) if jax.process_count() == 1 else state
        mngr.save(step_now, args=ocp.args.Composite(
            state=ocp.args.StandardSave(saved), data=ocp.args.JsonSave(it.get_state())), force=True)

    last_confusions = {}

    def run_eval(step_now):
        last_confusions["student"] = evaluate(c, eval_step, mesh, state.params, state.batch_stats)
        if c.uda.self_training:
            # The teacher is evaluated with the student's running statistics (it keeps none).
            last_confusions["teacher"] = evaluate(c, eval_step, mesh, state.teacher_params, state.batch_stats)
        rec = {k: _eval_record(v, c) for k, v in last_confusions.items()}
        history[str(step_now)] = rec
        if jax.process_index() == 0:
            io_lib.write_json_atomic(metrics_path, history)
            scal = {f"eval/{k}_miou": v["miou"] for k, v in rec.items()}
            scal.update({f"eval/iou/{n}": v for n, v in rec["student"]["per_class_iou"].items() if v is not None})
            writer.write_scalars(step_now, scal)
            logging.info("step %d: student mIoU %.4f", step_now, rec["student"]["miou"])
        return rec

    with _Preemption() as preempt:
        while step < c.total_steps:
            with guard():
                with progress.timed("data"):       # the share of wall time spent waiting for input
                    batch = next(it)
                batch = {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in batch.items()}
                if jax.process_count() > 1 and not compiled_once:
                    # gloo (CPU) connects the processes at their first cross-process collective
                    # and gives up after 30 s, so a process whose compile took longer (another
                    # missed the compilation cache) would fail the others there: compile first,
                    # then meet at a barrier.
                    p_train_step = p_train_step.lower(state, batch, imnet_params).compile()
                    distributed.barrier(f"train_step_compiled_{step}")
                compiled_once = True
                state, m = p_train_step(state, batch, imnet_params)
                # Sums for averaging (the nonfinite/ entries count the bad steps of each term).
                acc = m if acc is None else accumulate(acc, m)
            step += 1
            acc_n += 1
            progress(step)
            preempt.reached(step)
            if step % c.log_every == 0 or step == c.total_steps or preempt.requested:
                host = jax.device_get(acc)
                bad = nonfinite_terms(host)
                host = {k: v for k, v in host.items() if not k.startswith(NONFINITE)}
                if bad:
                    mngr.wait_until_finished()
                    raise FloatingPointError(
                        f"non-finite {', '.join(bad)} between steps {step - acc_n + 1} and "
                        f"{step}; those updates were skipped and the last checkpoint in {ckpt_dir} is intact. "
                        "Lower the learning rate, check the inputs, or use float32 compute.")
                final = {k: float(v) / acc_n for k, v in host.items()}
                if jax.process_index() == 0:
                    writer.write_scalars(step, final)
                acc, acc_n = None, 0
            if (c.eval_every and step % c.eval_every == 0) or step == c.total_steps:
                final["eval"] = run_eval(step)
            if step % c.checkpoint_every == 0 or step == c.total_steps or preempt.requested:
                save(step)
            if preempt.requested:
                break
    if step == c.total_steps and last_confusions:
        # Every process predicts (the model is sharded over all of them); process 0 writes.
        written = report.write_run_report(workdir, c, graphdef, state.params, state.batch_stats,
                                          last_confusions, pipeline.make_source(c.data.target, "val", c),
                                          write=jax.process_index() == 0)
        if written:
            logging.info("wrote %s", ", ".join(written.values()))
    mngr.wait_until_finished()
    mngr.close()
    writer.flush()
    logging.info("finished at step %d in %.1f s", step, time.time() - t0)
    final["step"] = step
    return final


def _make_writer(workdir):
    from clu import metric_writers
    return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


class _Progress:
    """The loop's periodic actions: clu's ReportProgress (steps/s, ETA and, through `timed`, the
    share of time spent waiting for data) on process 0, and a profiler trace every
    config.profile_every steps (every process traces its own devices)."""

    def __init__(self, c, writer, workdir):
        from clu import periodic_actions
        self._null = contextlib.nullcontext()
        self._actions = []
        self._report = None
        if jax.process_index() == 0:
            self._report = periodic_actions.ReportProgress(num_train_steps=c.total_steps, writer=writer,
                                                           every_steps=c.log_every)
            self._actions.append(self._report)
        if int(c.get("profile_every", 0)) > 0:
            self._actions.append(periodic_actions.Profile(
                logdir=workdir, first_profile=int(c.profile_every), every_steps=int(c.profile_every),
                every_secs=None, num_profile_steps=int(c.profile_steps)))

    def timed(self, name):
        # Host wall time of the block (no wait for the device: the step runs asynchronously meanwhile).
        return self._report.timed(name, wait_jax_async_dispatch=False) if self._report is not None else self._null

    def __call__(self, step):
        for action in self._actions:
            action(step)


def _log_parameter_overview(params):
    from clu import parameter_overview
    try:
        parameter_overview.log_parameter_overview(params.to_pure_dict())
    except Exception as e:  # the overview is informational; never fail a run on it
        logging.warning("parameter overview unavailable: %s", e)
