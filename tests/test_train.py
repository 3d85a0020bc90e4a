"""The trainer end to end: the CLI, exact resume after SIGKILL and SIGTERM, and a clear error
for a workdir of another model. The jitted step itself (1 vs 8 devices, no retracing, the
patch gate, non-finite stops, config errors) is tested in test_train_step.py; the two files
run in parallel under the README's `pytest -n 2 --dist loadfile`.

All runs share one configuration (the `tiny` synthetic PiPa + MIC config, 8 steps: every loss
term at once, and the README's `configs/synthetic.py:method=pipa_mic,tiny` command) and one XLA
compilation cache, so the expensive train step compiles once per device layout.
"""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pipa_jax import train
from pipa_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic.py")
# The patch term starts at step 1, so that the 1-device and 8-device steps of test_train_step.py
# (which also test its start-step gate) are the very programs these runs compile (one shared cache).
OVERRIDES = {"total_steps": 8, "checkpoint_every": 2, "log_every": 2, "pipa.patch.start_step": 1}


DEFAULT_ARG = "method=pipa_mic,tiny"


def load_config(arg=DEFAULT_ARG):
    spec = importlib.util.spec_from_file_location("synthetic_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_config(xla_cache_dir, arg=DEFAULT_ARG):
    c = load_config(arg)
    for key, value in OVERRIDES.items():
        *groups, leaf = key.split(".")
        node = c
        for g in groups:
            node = node[g]
        node[leaf] = value
    c.compilation_cache_dir = xla_cache_dir
    return c


def cli(workdir, xla_cache_dir, *extra, arg=DEFAULT_ARG, overrides=None):
    return [sys.executable, "-m", "pipa_jax.main", "--config", f"{CONFIG}:{arg}",
            "--workdir", str(workdir), f"--config.compilation_cache_dir={xla_cache_dir}",
            *[f"--config.{k}={v}" for k, v in {**OVERRIDES, **(overrides or {})}.items()], *extra]


def final_state(workdir, step=8):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(path)


def assert_trees_identical(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, xla_cache_dir):
    """One uninterrupted run through the README's entry point."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(cli(workdir, xla_cache_dir), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(workdir), proc


def test_cli_trains_evaluates_and_checkpoints(reference_run):
    workdir, proc = reference_run
    assert "done: step 8" in proc.stdout
    for term in ("source_ce", "mix_ce", "fd", "pixel", "patch", "mic"):     # every term was logged
        assert f"loss/{term}=" in proc.stderr, term
    with open(os.path.join(workdir, "metrics.json")) as f:
        history = json.load(f)
    final = history["8"]
    for who in ("student", "teacher"):
        assert 0.0 <= final[who]["miou"] <= 1.0
        assert set(final[who]["per_class_iou"]) == set(pipeline.L.CLASS_NAMES)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int)[-1] == "8"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    # The report for a person: the per-class table agrees with metrics.json, and the picture has
    # a header row and one row per grid image with 3 columns (no baseline given).
    with open(os.path.join(workdir, "iou_table.md")) as f:
        table = f.read()
    assert "## student" in table and "## teacher" in table
    student_rows = table.split("## teacher")[0]
    assert re.search(rf"\| mIoU +\| +{100 * final['student']['miou']:.2f} \|", student_rows), student_rows
    from PIL import Image
    grid = Image.open(os.path.join(workdir, "predictions.png"))
    c = load_config()
    tile = c.report.tile_width
    assert grid.size[0] == 3 * tile + 2 * 4
    rows = min(c.report.grid_images, c.data.num_val)
    assert grid.size[1] == 14 + rows * (tile + 4)   # header + rows of square tiles
    state = final_state(workdir)
    assert int(state["step"]) == 8
    # The teacher moved away from the student (EMA), and the patch bank was filled.
    assert not np.array_equal(state["teacher_params"]["decode_head"]["conv_seg"]["kernel"]["value"],
                              state["params"]["decode_head"]["conv_seg"]["kernel"]["value"])
    assert state["terms"]["patch"]["valid"].any()
    # A finished run started again does nothing and keeps its result.
    again = subprocess.run(cli(workdir, "", ), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and "done: step 8" in again.stdout


def test_sigkill_then_resume_is_bit_identical(reference_run, xla_cache_dir, tmp_path):
    ref_dir, _ = reference_run
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(cli(workdir, xla_cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    ckpts = workdir / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not (ckpts / "4").exists():
        time.sleep(0.05)
    time.sleep(np.random.default_rng().uniform(0, 1.0))  # an arbitrary moment after step 4
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (ckpts / "8").exists()
    resumed = subprocess.run(cli(workdir, xla_cache_dir), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    assert_trees_identical(final_state(ref_dir), final_state(str(workdir)))


def test_sigterm_saves_and_resume_matches(reference_run, xla_cache_dir, tmp_path, monkeypatch):
    """Preemption: SIGTERM during step 5 -> checkpoint at 5, clean return; resuming ends with
    the uninterrupted run's parameters (in-process, 8 devices)."""
    ref_dir, _ = reference_run
    original = pipeline.train_iterator

    class Interrupting:
        def __init__(self, it):
            self.it, self.n = it, 0

        def __next__(self):
            self.n += 1
            if self.n == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return next(self.it)

        def get_state(self):
            return self.it.get_state()

    monkeypatch.setattr(pipeline, "train_iterator", lambda c, start=0: Interrupting(original(c, start)))
    c = tiny_config(xla_cache_dir)
    # The steps move data only explicitly (batches in, metrics out at log steps): any implicit
    # host <-> device transfer inside the loop's step part raises.
    c.loop_transfer_guard = "disallow"
    out = train.train_and_evaluate(c, str(tmp_path))
    assert out["step"] == 5
    assert (tmp_path / "checkpoints" / "5").exists()
    monkeypatch.setattr(pipeline, "train_iterator", original)
    out = train.train_and_evaluate(c, str(tmp_path))
    assert out["step"] == 8
    assert_trees_identical(final_state(ref_dir), final_state(str(tmp_path)))


def test_workdir_of_another_model_is_refused(reference_run, xla_cache_dir):
    ref_dir, _ = reference_run
    c = tiny_config(xla_cache_dir)
    c.model.embed_dim = 32
    with pytest.raises(train.WorkdirMismatchError, match="model"):
        train.train_and_evaluate(c, ref_dir)
