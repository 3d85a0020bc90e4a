"""ProDA's pipeline (docs/method.md §15): the stages in order in one workdir, and the prototype pass.

  python -m pipa_jax.proda run --config configs/gta2cs_proda.py --workdir runs/proda [--config.x=v]
  python -m pipa_jax.proda prototypes --config configs/gta2cs_proda.py:stage=stage1 --workdir runs/proda

`run` trains, inside WORKDIR: warmup/ (the adversarial or source-only warm-up), prototypes.npz
(the initial class prototypes of the warm-up model over the target train split), stage1/
(started from the warm-up, its frozen copy giving the soft pseudo-labels), stage2/ (from the
config's ImageNet weights, distilled from stage 1) and stage3/ (from stage 2, distilled from
stage 2). The config file's `stage=` option is overridden per stage; `--config.key=value`
overrides apply to every stage. Each stage resumes from its own checkpoints and is skipped once
its `done.json` exists, so the command can be re-run after a preemption at any point, and the
prototype pass saves its partial sums every `--save_every` images.
"""
from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

PIPELINE = ("warmup", "prototypes", "stage1", "stage2", "stage3")
TRAIN_STAGES = ("warmup", "stage1", "stage2", "stage3")
PROTOTYPES_FILE = "prototypes.npz"
DONE_FILE = "done.json"

FLAGS = flags.FLAGS


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(os.path.abspath(workdir), stage)


def wire_stage(c, stage: str, workdir: str):
    """`c` (a stage's config) with the paths of the stages it reads, all inside `workdir`."""
    c.proda.stage = stage
    if stage == "stage1":
        c.init_from = stage_dir(workdir, "warmup")
        c.proda.frozen_from = stage_dir(workdir, "warmup")
        c.proda.prototypes = os.path.join(os.path.abspath(workdir), PROTOTYPES_FILE)
    elif stage == "stage2":
        c.proda.frozen_from = stage_dir(workdir, "stage1")
    elif stage == "stage3":
        c.init_from = stage_dir(workdir, "stage2")
        c.proda.frozen_from = stage_dir(workdir, "stage2")
    return c


def _require_done(path: str, what: str, stage: str, config_name: str):
    if not os.path.exists(os.path.join(path, DONE_FILE)):
        raise FileNotFoundError(
            f"ProDA {stage} needs {what} in {path}, which has not finished (no {DONE_FILE}); make it with "
            f"`python -m pipa_jax.proda run --config {config_name} --workdir {os.path.dirname(path)}` "
            "(runs and resumes every stage in order)")


def accumulate_prototypes(protos: np.ndarray, counts: np.ndarray, means: np.ndarray, present: np.ndarray, *,
                          cap: int) -> None:
    """One image's class means into the prototypes, in place: eta_k <- (eta_k n + v_k) / (n + 1) with
    n = min(count_k, cap) for every present class (the official calc_prototype update)."""
    for cls in np.flatnonzero(present):
        n = min(int(counts[cls]), cap)
        protos[cls] = (protos[cls] * n + means[cls]) / (n + 1)
        counts[cls] += 1


def compute_prototypes(c, model_dir: str, out_path: str, *, save_every: int = 200) -> np.ndarray:
    """ProDA's initial prototypes: the model of `model_dir` (a workdir or model directory) in
    evaluation mode over the target train split, proda.prototype_passes times (no augmentation);
    for every image and class with >= proda.proto_min_pixels pixels of its argmax, the mean 256-d
    feature updates a cumulative mean whose count is capped at proda.prototype_cap (then a
    running average with weight 1 / (cap + 1)). Writes {'prototypes' [K, D], 'counts' [K]} to
    `out_path` atomically; partial sums go to `out_path + '.partial.npz'` every `save_every`
    images, from which a second call resumes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pipa_jax import io as io_lib
    from pipa_jax import labels as L
    from pipa_jax.data import pipeline
    from pipa_jax.losses import proda as P
    from pipa_jax.train import load_network

    p = c.proda
    loaded = load_network(model_dir, "the warm-up model", c)
    graphdef, state = nnx.split(nnx.merge(loaded.graphdef, loaded.params, loaded.batch_stats))
    k = int(c.model.num_classes)

    @jax.jit
    def image_means(state, image):
        model = nnx.merge(graphdef, state)
        logits, f = model(L.normalize(image[None]), train=False, return_features=True)
        means, present = P.class_means(f["fused"], jnp.argmax(logits, -1), k, min_pixels=int(p.proto_min_pixels))
        return means[0], present[0]

    source = pipeline.make_source(c.data.target, "train", c)
    n, passes, cap = len(source), int(p.prototype_passes), int(p.prototype_cap)
    partial = out_path + ".partial.npz"
    protos, counts, done = None, np.zeros(k, np.int64), 0
    if os.path.exists(partial):
        with np.load(partial) as f:
            protos, counts, done = np.array(f["prototypes"]), np.array(f["counts"]), int(f["done"])
        logging.info("prototypes: resuming at image %d of %d", done, n * passes)
    for i in range(done, n * passes):
        means, present = jax.device_get(image_means(state, jnp.asarray(source[i % n]["image"])))
        if protos is None:
            protos = np.zeros((k, means.shape[-1]), np.float32)
        accumulate_prototypes(protos, counts, means, present, cap=cap)
        if (i + 1) % save_every == 0:
            io_lib.write_npz_atomic(partial, prototypes=protos, counts=counts, done=np.int64(i + 1))
    if protos is None:
        raise ValueError(f"the target train split of {c.data.target} is empty: no prototypes")
    missing = [int(x) for x in np.flatnonzero(counts == 0)]
    if missing:
        logging.warning("prototypes: classes %s never predicted on >= %d pixels of an image; their "
                        "prototypes stay 0", missing, p.proto_min_pixels)
    io_lib.write_npz_atomic(out_path, prototypes=protos, counts=counts)
    if os.path.exists(partial):
        os.remove(partial)
    return protos


def run_pipeline(make_config, workdir: str, config_name: str = "<config>", stages=PIPELINE) -> dict:
    """Every stage in order (module docstring); `make_config(stage)` gives that stage's config.
    Returns {stage: its final metrics}."""
    from pipa_jax import io as io_lib
    from pipa_jax import train

    results = {}
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    for stage in stages:
        if stage == "prototypes":
            out = os.path.join(workdir, PROTOTYPES_FILE)
            if not os.path.exists(out):
                _require_done(stage_dir(workdir, "warmup"), "the warm-up model", "prototypes", config_name)
                c = wire_stage(make_config("stage1"), "stage1", workdir)
                compute_prototypes(c, stage_dir(workdir, "warmup"), out)
            results[stage] = {"file": out}
            continue
        d = stage_dir(workdir, stage)
        done = os.path.join(d, DONE_FILE)
        if os.path.exists(done):
            with open(done) as f:
                results[stage] = json.load(f)
            logging.info("ProDA %s: already finished in %s", stage, d)
            continue
        c = wire_stage(make_config(stage), stage, workdir)
        for path, what in ((c.get("init_from", ""), "its initial weights"), (c.proda.frozen_from, "its frozen network")):
            if path and path.startswith(workdir):
                _require_done(path, what, stage, config_name)
        logging.info("ProDA %s in %s", stage, d)
        final = train.train_and_evaluate(c, d)
        if final.get("step") != c.total_steps:      # preempted: the next call resumes this stage
            results[stage] = final
            logging.warning("ProDA %s stopped at step %s of %d; re-run to resume", stage, final.get("step"),
                            c.total_steps)
            break
        # The next stage compiles its own programs; this one's are not needed again.
        import gc

        import jax
        jax.clear_caches()
        gc.collect()
        record = {"step": final["step"]}
        if "eval" in final:
            record["miou"] = final["eval"]["student"]["miou"]
        io_lib.write_json_atomic(done, record)
        results[stage] = record
    return results


def _load_config_file(spec: str):
    """get_config(arg) of 'path.py[:arg]'."""
    from pipa_jax import config as config_lib
    path, _, arg = spec.partition(":")
    module = config_lib.sibling_config(os.path.abspath(path), os.path.basename(path))
    return module.get_config(arg)


def _stage_config_factory(spec: str, overrides: dict):
    from pipa_jax import config as config_lib
    path, _, arg = spec.partition(":")

    def make(stage):
        kept = [x for x in arg.split(",") if x.strip() and not x.strip().startswith("stage=")]
        opts = ",".join(kept + [f"stage={stage}"])
        c = _load_config_file(f"{path}:{opts}")
        config_lib.apply_overrides(c, overrides)
        return c
    return make


def main(argv):
    if len(argv) != 2 or argv[1] not in ("run", "prototypes"):
        raise app.UsageError("usage: python -m pipa_jax.proda run|prototypes --config FILE[:opts] --workdir DIR")
    spec = config_flags.get_config_filename(FLAGS["config"])
    overrides = config_flags.get_override_values(FLAGS["config"])
    if argv[1] == "prototypes":
        c = wire_stage(FLAGS.config, "stage1", FLAGS.workdir)
        out = os.path.join(os.path.abspath(FLAGS.workdir), PROTOTYPES_FILE)
        compute_prototypes(c, stage_dir(FLAGS.workdir, "warmup") if not FLAGS.model else FLAGS.model, out,
                           save_every=FLAGS.save_every)
        print(f"wrote {out}")
        return
    results = run_pipeline(_stage_config_factory(spec, overrides), FLAGS.workdir, spec)
    for stage, r in results.items():
        print(f"{stage}: {r}")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "A ProDA config file (configs/gta2cs_proda.py[:opts]).",
                                    lock_config=False)
    flags.DEFINE_string("workdir", None, "The pipeline's directory (one subdirectory per stage).")
    flags.DEFINE_string("model", "", "prototypes: the model to compute them with (default WORKDIR/warmup).")
    flags.DEFINE_integer("save_every", 200, "prototypes: images between saves of the partial sums.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
