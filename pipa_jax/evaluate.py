r"""Evaluates a model on the target validation split as the papers do (docs/method.md §8).

  python -m pipa_jax.evaluate --workdir runs/gta2cs [--which teacher] [--config configs/gta2cs.py]
  python -m pipa_jax.evaluate --checkpoint ckpt/pipa_gta --config configs/gta2cs.py \
      [--config.data.target_root=/data/cityscapes] [--out DIR] [--predictions DIR]

The model is either the latest checkpoint of a training run (`--workdir`: the student by default,
`--which teacher` for the EMA teacher, which is evaluated with the student's BatchNorm running
statistics as during training) or a model directory written by
`python -m pipa_jax.tools.convert_checkpoint` (`--checkpoint`). Data and inference settings
(`data.*`, `eval.*`: whole-image or sliding-window, class subsets) come from `--config` when
given, else from the run's config.json; `--checkpoint` needs `--config`.

Logits are computed at the test size, bilinearly upsampled to the full-resolution ground truth
and arg-maxed; one confusion matrix is summed over the split (pipa_jax.inference). Prints the
per-class table and writes `<out>/<name>.json` (per-class IoU, mIoU over 19 classes and, when
`eval.miou_subsets` asks for them, mIoU16 / mIoU13; the confusion matrix; what was evaluated)
and `<out>/<name>.txt` (the table). `<out>` defaults to `<workdir or checkpoint>/eval`.
`--predictions DIR` also writes every full-resolution prediction as `<frame>_trainIds.png`
(train ids; score them with `python -m pipa_jax.tools.score`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pipa_jax import config as config_lib
from pipa_jax import inference
from pipa_jax import io as io_lib
from pipa_jax import mesh as mesh_lib
from pipa_jax import metrics as metrics_lib
from pipa_jax.labels import CLASS_NAMES, NUM_CLASSES

WHICH = ("student", "teacher")
_PARAM_KEYS = {"student": "params", "teacher": "teacher_params"}


class ModelLoadError(ValueError):
    """A workdir or model directory that cannot give the requested model."""


@dataclasses.dataclass
class LoadedModel:
    graphdef: Any
    params: Any            # nnx.State of Param
    batch_stats: Any       # nnx.State of BatchStat (the student's running statistics)
    config: ml_collections.ConfigDict  # model config (config.model of a run, or model_config.json)
    origin: dict           # {'workdir' or 'checkpoint': path, 'which': ..., 'step': ...}


# ----------------------------------------------------------------------------- configs

def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was started with (workdir/config.json), on top of today's defaults."""
    path = os.path.join(os.path.abspath(workdir), "config.json")
    if not os.path.exists(path):
        raise ModelLoadError(
            f"{path} not found: {workdir} is not a pipa_jax training run (expected config.json and "
            "checkpoints/ written by `python -m pipa_jax.main`); for a converted model directory use "
            "--checkpoint instead of --workdir")
    with open(path) as f:
        values = json.load(f)
    c = config_lib.base_config()
    config_lib.merge_json(c, values)
    return c


def with_data_settings(run_config: ml_collections.ConfigDict,
                       data_config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """`run_config` with the data, evaluation and device settings of `data_config` (if given)."""
    if data_config is None:
        return run_config
    c = ml_collections.ConfigDict(run_config.to_dict())
    with c.unlocked():
        for group in ("data", "eval"):
            if group in data_config:
                c[group] = ml_collections.ConfigDict(data_config[group].to_dict())
        for key in ("seed", "mesh_shape"):
            if key in data_config:
                c[key] = data_config[key]
    return c


# ----------------------------------------------------------------------------- models

def latest_checkpoint(workdir: str) -> tuple[int, str]:
    """(step, directory) of the newest complete checkpoint of a run."""
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = []
    if os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            path = os.path.join(ckpt_dir, name)
            # Orbax writes into a temporary directory and renames it when the save completed.
            if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
                steps.append(int(name))
    if not steps:
        raise ModelLoadError(
            f"{workdir} holds no checkpoints (expected {ckpt_dir}/<step>/state, written by "
            "`python -m pipa_jax.main` every config.checkpoint_every steps). Train (or wait for the "
            "first checkpoint) first, or pass --checkpoint MODEL_DIR for a converted model")
    step = max(steps)
    return step, os.path.join(ckpt_dir, str(step))


def _inference_model_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The architecture fields of a model config (no run settings such as `pretrained`), without
    the training-only PiPa heads, which inference neither needs nor restores. A model built
    from it can be saved with model_io.save_model as it is."""
    from pipa_jax.models import default_model_config

    mc = default_model_config()
    mc.update({k: v for k, v in model_config.items() if k in mc})
    mc.pixel_head = False
    mc.patch_head = False
    return mc


def _check_classes(model_config, where):
    if int(model_config.num_classes) != NUM_CLASSES:
        raise ModelLoadError(
            f"{where} is a {model_config.num_classes}-class model; evaluation and prediction need the "
            f"{NUM_CLASSES} Cityscapes train ids. Use a checkpoint of a Cityscapes-class model")


def _key_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _restore_subtrees(ckpt_path: str, target: dict) -> dict:
    """Restores the arrays of `target` (a tree of ShapeDtypeStructs) from an Orbax PyTree
    checkpoint that may hold more. Shapes and names are compared with the checkpoint's metadata
    first, so a checkpoint of another model fails with the differing arrays named (and before
    Orbax starts reading)."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(ckpt_path)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        stored = {_key_str(p): tuple(getattr(leaf, "shape", None) or ())
                  for p, leaf in jax.tree_util.tree_flatten_with_path(dict(tree))[0]}
        problems = []
        for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
            key = _key_str(p)
            if key not in stored:
                problems.append(f"{key} is not in the checkpoint")
            elif stored[key] != tuple(leaf.shape):
                problems.append(f"{key} is {stored[key]} in the checkpoint but {tuple(leaf.shape)} in the model")
        if problems:
            raise ValueError(f"{len(problems)} arrays do not fit: " + "; ".join(problems[:3])
                             + ("; ..." if len(problems) > 3 else ""))
        return ckptr.restore(ckpt_path, args=ocp.args.PyTreeRestore(
            item=target, partial_restore=True, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))


def load_run_model(workdir: str, which: str = "student") -> tuple[LoadedModel, ml_collections.ConfigDict]:
    """The student (or teacher) of the latest checkpoint of a run, and the run's config."""
    from pipa_jax.models import build_segmentor

    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    run_config = load_run_config(workdir)
    step, path = latest_checkpoint(workdir)
    mc = _inference_model_config(run_config.model)
    _check_classes(mc, f"the run in {workdir}")
    # Shapes only (no initialisation compute): the checkpoint provides every value.
    graphdef, params, batch_stats = nnx.split(nnx.eval_shape(lambda: build_segmentor(mc)), nnx.Param,
                                              nnx.BatchStat)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {_PARAM_KEYS[which]: params, "batch_stats": batch_stats}
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
    try:
        restored = _restore_subtrees(os.path.join(path, "state"), target)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise ModelLoadError(
            f"the checkpoint {path} does not hold the model described by {workdir}/config.json "
            f"({run_config.model.get('segmentor', 'encoder_decoder')}: {run_config.model.backbone}, "
            f"{run_config.model.decode_head} head): {type(e).__name__}: "
            f"{str(e)[:700]}. Was config.json replaced or the workdir reused for another model? "
            "Evaluate with the run's own config.json, or convert the weights into a model directory "
            "and pass --checkpoint") from e
    origin = {"workdir": os.path.abspath(workdir), "which": which, "step": step}
    return LoadedModel(graphdef, restored[_PARAM_KEYS[which]], restored["batch_stats"], mc, origin), run_config


def _restore_model_dir(directory: str, model_config):
    """(graphdef, params, batch_stats) of a model directory (layout: pipa_jax.model_io), restored
    into an abstract model: unlike model_io.load_model nothing is initialised first (minutes for
    MiT-b5 on a CPU host), and the training-only heads are not read."""
    from pipa_jax.models import build_segmentor

    mc = _inference_model_config(model_config)
    graphdef, params, batch_stats = nnx.split(nnx.eval_shape(lambda: build_segmentor(mc)), nnx.Param,
                                              nnx.BatchStat)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {"params": params.to_pure_dict(), "batch_stats": batch_stats.to_pure_dict()}
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
    restored = _restore_subtrees(os.path.join(directory, "model"), target)
    nnx.replace_by_pure_dict(params, restored["params"])
    nnx.replace_by_pure_dict(batch_stats, restored["batch_stats"])
    return graphdef, params, batch_stats


def load_checkpoint_model(directory: str, which: str = "student") -> LoadedModel:
    """A model directory of tools/convert_checkpoint (or model_io.save_model)."""
    from pipa_jax import model_io

    directory = os.path.abspath(directory)
    if which != "student":
        raise ModelLoadError(
            f"--which {which} applies to --workdir runs; a model directory holds one network. Convert "
            f"the teacher with `python -m pipa_jax.tools.convert_checkpoint --which teacher` and pass "
            "that directory")
    if not os.path.isdir(directory):
        raise ModelLoadError(f"--checkpoint {directory} is not a directory; pass a model directory written "
                             "by `python -m pipa_jax.tools.convert_checkpoint --output DIR`")
    if os.path.isdir(os.path.join(directory, "checkpoints")) and not os.path.exists(
            os.path.join(directory, "model_config.json")):
        raise ModelLoadError(f"{directory} is a training run, not a model directory: pass it as --workdir")
    try:
        model_config = model_io.load_model_config(directory)
    except FileNotFoundError as e:
        raise ModelLoadError(str(e)) from e
    source = {}
    if os.path.exists(os.path.join(directory, "source.json")):
        with open(os.path.join(directory, "source.json")) as f:
            source = json.load(f)
    if not model_config.get("decode_head") or source.get("which") == "imagenet_encoder":
        raise ModelLoadError(
            f"{directory} holds an ImageNet-pretrained encoder with an untrained decoder (converted from "
            f"{source.get('input', 'an mit_b*.pth')}); it cannot segment. Use it as "
            "config.model.pretrained for training, and evaluate a trained DAFormer / PiPa checkpoint")
    _check_classes(model_config, directory)
    try:
        graphdef, params, batch_stats = _restore_model_dir(directory, model_config)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise ModelLoadError(
            f"the weights in {directory}/model do not match its model_config.json ({type(e).__name__}: "
            f"{str(e)[:300]}); re-run `python -m pipa_jax.tools.convert_checkpoint` into a new directory") from e
    origin = {"checkpoint": directory, "which": source.get("which", "student"), "step": None}
    if source.get("input"):
        origin["converted_from"] = source["input"]
    return LoadedModel(graphdef, params, batch_stats, _inference_model_config(model_config), origin)


def load_model_and_config(workdir: str | None, checkpoint: str | None, config=None,
                          which: str = "student") -> tuple[LoadedModel, ml_collections.ConfigDict]:
    """The model of a run or model directory, and the config whose data/eval settings apply."""
    if bool(workdir) == bool(checkpoint):
        raise ValueError("pass exactly one of --workdir (a training run) and --checkpoint (a model directory)")
    if workdir:
        loaded, run_config = load_run_model(workdir, which)
        return loaded, with_data_settings(run_config, config)
    if config is None:
        raise ValueError(
            f"--checkpoint {checkpoint} holds a model but no data settings: pass --config (e.g. "
            "configs/gta2cs.py, with --config.data.target_root=... if needed) for the dataset to use")
    loaded = load_checkpoint_model(checkpoint, which)
    return loaded, config


# ----------------------------------------------------------------------------- evaluation

def evaluate_model(loaded: LoadedModel, c: ml_collections.ConfigDict, *, predictions_dir: str | None = None,
                   source=None) -> dict:
    """Scores `loaded` on `c.data.target`'s val split with `c.eval`; returns the result dict."""
    from pipa_jax.data import pipeline

    settings = inference.settings_from_config(c)
    if source is None:
        source = pipeline.make_source(c.data.target, "val", c)
    if len(source) == 0:
        raise ValueError(f"the {c.data.target!r} val split is empty; check the data settings (data.target_root)")
    batch_size = int(c.data.eval_batch_size)
    mesh = mesh_lib.make_mesh(c.get("mesh_shape", -1), batch_size=batch_size)
    repl = NamedSharding(mesh, P())
    params, batch_stats = jax.device_put((loaded.params, loaded.batch_stats), repl)
    def write_predictions(names, preds):
        for name, pred in zip(names, preds):
            io_lib.write_label_png(os.path.join(predictions_dir, f"{os.path.basename(name)}_trainIds.png"), pred)

    if predictions_dir:
        os.makedirs(predictions_dir, exist_ok=True)

    t0 = time.time()
    conf, _ = inference.evaluate_source(
        inference.make_eval_step(loaded.graphdef), params, batch_stats, source, batch_size, settings,
        sharding=NamedSharding(mesh, P("data")), on_predictions=write_predictions if predictions_dir else None,
        num_threads=max(1, int(c.data.get("prefetch", 2))))
    subsets = metrics_lib.subsets_of(c)
    result = {
        "miou": metrics_lib.miou(conf),
        "per_class_iou": metrics_lib.per_class_iou(conf),
        "num_images": len(source),
        "subsets": {name: (list(ids) if ids is not None else list(range(NUM_CLASSES)))
                    for name, ids in subsets.items()},
        "model": dict(loaded.origin, backbone=str(loaded.config.backbone),
                      decode_head=str(loaded.config.decode_head),
                      segmentor=str(loaded.config.get("segmentor", "encoder_decoder"))),
        "data": {"target": str(c.data.target), "split": "val"},
        "inference": {"mode": settings.mode, "crop_size": list(settings.crop_size),
                      "stride": list(settings.stride), "batch_size": batch_size},
        "seconds": round(time.time() - t0, 3),
        "confusion_matrix": conf.tolist(),
    }
    for name, ids in subsets.items():
        if ids is not None:
            result[name.lower()] = metrics_lib.miou(conf, ids)
    return result


def format_result(result: dict) -> str:
    """The per-class table and the headline line(s), as printed."""
    conf = np.asarray(result["confusion_matrix"], np.int64)
    subsets = {name: (None if len(ids) == NUM_CLASSES else tuple(ids)) for name, ids in result["subsets"].items()}
    table = metrics_lib.format_iou_table(conf, CLASS_NAMES, subsets)
    m = result["model"]
    what = (f"{m['workdir']} ({m['which']}, step {m['step']})" if "workdir" in m else m["checkpoint"])
    inf = result["inference"]
    how = inf["mode"] + (f" {tuple(inf['crop_size'])}/{tuple(inf['stride'])}" if inf["mode"] == "slide" else "")
    heads = ", ".join(f"{name} {100 * result[name.lower()]:.2f}" for name in subsets)
    return (f"{table}\n\n{heads} on {result['data']['target']} val ({result['num_images']} images, "
            f"{how}); model {what}")


def _json_safe(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_result(result: dict, out_dir: str, name: str) -> tuple[str, str]:
    """Writes <out_dir>/<name>.json and <out_dir>/<name>.txt atomically; returns both paths."""
    out_dir = os.path.abspath(out_dir)
    json_path, txt_path = os.path.join(out_dir, name + ".json"), os.path.join(out_dir, name + ".txt")
    io_lib.write_text_atomic(json_path, json.dumps(_json_safe(result), indent=2) + "\n")
    io_lib.write_text_atomic(txt_path, format_result(result) + "\n")
    return json_path, txt_path


def default_output(loaded: LoadedModel, c) -> tuple[str, str]:
    """(directory, file stem) for the result files."""
    o = loaded.origin
    target = str(c.data.target)
    if "workdir" in o:
        return os.path.join(o["workdir"], "eval"), f"{target}_{o['which']}_step{o['step']}"
    return os.path.join(o["checkpoint"], "eval"), f"{target}_{o['which']}"


# ----------------------------------------------------------------------------- CLI

def define_model_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """Flags shared with pipa_jax.predict: --workdir | --checkpoint, --which, --config (its
    --config.x=y overrides are read from `argv`)."""
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "A training run (its latest checkpoint is used).", flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "A model directory from pipa_jax.tools.convert_checkpoint.",
                        flag_values=fv)
    flags.DEFINE_enum("which", "student", list(WHICH), "Network of a --workdir run.", flag_values=fv)
    config_flags.DEFINE_config_file("config", None, "Config file for the data / eval settings "
                                    "(required with --checkpoint; optional with --workdir).",
                                    flag_values=fv, lock_config=True,
                                    sys_argv=None if argv is None else list(argv))


def parse_cli(doc: str, prog: str, argv, define) -> tuple[flags.FlagValues | None, int | None]:
    """Parses `argv` with a private FlagValues; returns (flags, None) or (None, exit code)."""
    fv = flags.FlagValues()
    define(fv, argv)
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
        print(f"{doc}\nflags:\n{fv.get_help()}")
        return None, 0
    try:
        rest = fv(argv)
    except flags.Error as e:
        print(f"{prog}: error: {e}\n(see {prog} --help)", file=sys.stderr)
        return None, 2
    if len(rest) > 1:
        print(f"{prog}: error: unexpected arguments {rest[1:]} (quote glob patterns so the shell does not "
              "expand them)", file=sys.stderr)
        return None, 2
    return fv, None


def _define_flags(fv: flags.FlagValues, argv=None) -> None:
    define_model_flags(fv, argv)
    flags.DEFINE_string("out", None, "Directory for the result files (default <workdir|checkpoint>/eval).",
                        flag_values=fv)
    flags.DEFINE_string("predictions", None, "Also write full-resolution <frame>_trainIds.png here.",
                        flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; `argv[0]` is the program name. Returns the exit code."""
    argv = list(sys.argv if argv is None else argv)
    prog = "python -m pipa_jax.evaluate"
    fv, code = parse_cli(__doc__, prog, argv, _define_flags)
    if fv is None:
        return code
    try:
        loaded, c = load_model_and_config(fv.workdir, fv.checkpoint, fv.config, fv.which)
        config_lib.enable_compilation_cache(c)
        result = evaluate_model(loaded, c, predictions_dir=fv.predictions)
    except (OSError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        out_dir, stem = default_output(loaded, c)
        paths = write_result(result, fv.out or out_dir, stem)
        print(format_result(result))
        print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
