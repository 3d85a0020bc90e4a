"""The trainer end to end: the CLI, exact resume after SIGKILL and SIGTERM, 1-vs-8-device
equivalence, no retracing, non-finite stops, and clear errors for bad workdirs and configs.

All runs share one configuration (the `tiny` synthetic PiPa config, 8 steps) and one XLA
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pipa_jax import config as config_lib
from pipa_jax import step as step_lib
from pipa_jax import train
from pipa_jax.data import pipeline
from pipa_jax.optim import learning_rate_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic.py")
OVERRIDES = {"total_steps": 8, "checkpoint_every": 2, "log_every": 2}


def load_config(arg="method=pipa,tiny"):
    spec = importlib.util.spec_from_file_location("synthetic_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


def tiny_config(cache_dir, arg="method=pipa,tiny"):
    c = load_config(arg)
    c.update(OVERRIDES)
    c.compilation_cache_dir = cache_dir
    return c


def cli(workdir, cache_dir, *extra):
    return [sys.executable, "-m", "pipa_jax.main", "--config", f"{CONFIG}:method=pipa,tiny",
            "--workdir", str(workdir), f"--config.compilation_cache_dir={cache_dir}",
            *[f"--config.{k}={v}" for k, v in OVERRIDES.items()], *extra]


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
def reference_run(tmp_path_factory, cache_dir):
    """One uninterrupted run through the README's entry point."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(cli(workdir, cache_dir), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(workdir), proc


def test_cli_trains_evaluates_and_checkpoints(reference_run):
    workdir, proc = reference_run
    assert "done: step 8" in proc.stdout
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
    assert state["bank"]["valid"].any()
    # A finished run started again does nothing and keeps its result.
    again = subprocess.run(cli(workdir, "", ), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and "done: step 8" in again.stdout


def test_sigkill_then_resume_is_bit_identical(reference_run, cache_dir, tmp_path):
    ref_dir, _ = reference_run
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(cli(workdir, cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    ckpts = workdir / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not (ckpts / "4").exists():
        time.sleep(0.05)
    time.sleep(np.random.default_rng().uniform(0, 1.0))  # an arbitrary moment after step 4
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (ckpts / "8").exists()
    resumed = subprocess.run(cli(workdir, cache_dir), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    assert_trees_identical(final_state(ref_dir), final_state(str(workdir)))


def test_sigterm_saves_and_resume_matches(reference_run, cache_dir, tmp_path, monkeypatch):
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
    c = tiny_config(cache_dir)
    out = train.train_and_evaluate(c, str(tmp_path))
    assert out["step"] == 5
    assert (tmp_path / "checkpoints" / "5").exists()
    monkeypatch.setattr(pipeline, "train_iterator", original)
    out = train.train_and_evaluate(c, str(tmp_path))
    assert out["step"] == 8
    assert_trees_identical(final_state(ref_dir), final_state(str(tmp_path)))


def test_one_device_equals_eight_and_no_retrace(cache_dir):
    c = tiny_config(cache_dir)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    batches = [next(pipeline.train_iterator(c, i)) for i in range(3)]
    results = {}
    for n in (1, 8):
        c.mesh_shape = n
        mesh = train.make_mesh(c)
        repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        graphdef, tx, state, imnet = train.build_model_and_state(c, mesh)
        train_step = step_lib.make_train_step(c, graphdef, tx, imnet[0])
        jitted = jax.jit(train_step, in_shardings=(repl, data, repl), out_shardings=(repl, repl), donate_argnums=0)
        imnet_params = jax.device_put(imnet[1], repl)
        metrics = []
        for b in batches:
            b = {k: jax.make_array_from_process_local_data(data, v) for k, v in b.items()}
            state, m = jitted(state, b, imnet_params)
            metrics.append(jax.device_get(m))
        assert jitted._cache_size() == 1, f"the step compiled {jitted._cache_size()} times on {n} device(s)"
        assert len(state.params["backbone"]["block1"][0]["attn"]["q"]["kernel"][...].sharding.device_set) == n
        results[n] = (jax.device_get(state.params), metrics)
    for m1, m8 in zip(results[1][1], results[8][1]):
        for k in m1:
            np.testing.assert_allclose(m8[k], m1[k], rtol=2e-4, atol=1e-6, err_msg=k)
    # Parameters: Adam moves each one by at most ~lr per step whatever the gradient's size, so
    # parameters whose exact gradient is 0 (a conv bias before BatchNorm) take +-lr steps on
    # rounding noise, which differs with the reduction order. Bound every difference by the
    # largest total step (head lr = 10x), and require the typical parameter to agree closely.
    schedule = learning_rate_schedule(c, c.optimizer.learning_rate)
    bound = 2 * 10 * sum(float(schedule(t)) for t in range(len(batches))) * 1.01
    rel = []
    for a, b in zip(jax.tree.leaves(results[1][0]), jax.tree.leaves(results[8][0])):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= bound
        rel.append(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
    assert np.median(rel) < 1e-5, np.median(rel)


def test_patch_gate_mask_equals_cond(cache_dir):
    """The patch term switched on at start_step by lax.cond (GPU/TPU) or by masking (CPU's
    default, where a conditional's branch runs far slower): the same losses, bank and updates,
    with the term and the bank idle before the start step."""
    c = tiny_config(cache_dir)
    c.mesh_shape = 1
    c.pipa.patch.start_step = 1
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    batches = [next(pipeline.train_iterator(c, i)) for i in range(2)]
    results = {}
    for gate in ("cond", "mask"):
        c.pipa.patch.gate = gate
        mesh = train.make_mesh(c)
        graphdef, tx, state, imnet = train.build_model_and_state(c, mesh)
        jitted = jax.jit(step_lib.make_train_step(c, graphdef, tx, imnet[0]))
        states, metrics = [], []
        for b in batches:
            state, m = jitted(state, b, imnet[1])
            states.append(jax.device_get(state))
            metrics.append(jax.device_get(m))
        results[gate] = (states, metrics)
    (s_cond, m_cond), (s_mask, m_mask) = results["cond"], results["mask"]
    for gate_metrics, gate_states in ((m_cond, s_cond), (m_mask, s_mask)):
        assert gate_metrics[0]["loss/patch"] == 0 and gate_metrics[0]["patch_counted"] == 0
        assert not gate_states[0].bank["valid"].any()          # nothing pushed before the start
        assert gate_states[1].bank["valid"].any()
    assert m_mask[1]["patch_counted"] == m_cond[1]["patch_counted"]
    for k in m_cond[1]:
        np.testing.assert_allclose(m_mask[1][k], m_cond[1][k], rtol=1e-4, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(s_cond[1].params), jax.tree.leaves(s_mask[1].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(s_mask[1].bank["feats"], s_cond[1].bank["feats"], atol=1e-5)
    np.testing.assert_array_equal(s_mask[1].bank["labels"], s_cond[1].bank["labels"])


def test_nonfinite_loss_stops_and_names_the_term(cache_dir, tmp_path, monkeypatch):
    import jax.numpy as jnp

    from pipa_jax import losses
    real = losses.cross_entropy
    monkeypatch.setattr(losses, "cross_entropy", lambda *a, **k: real(*a, **k) * jnp.nan)
    c = tiny_config(cache_dir, "method=source_only,tiny")
    with pytest.raises(FloatingPointError, match=r"non-finite source_ce.*steps 1 and 2"):
        train.train_and_evaluate(c, str(tmp_path))
    # Nothing non-finite was ever checkpointed.
    ckpts = tmp_path / "checkpoints"
    assert not ckpts.exists() or not any(p.name.isdigit() for p in ckpts.iterdir())


def test_workdir_of_another_model_is_refused(reference_run, cache_dir):
    ref_dir, _ = reference_run
    c = tiny_config(cache_dir)
    c.model.embed_dim = 32
    with pytest.raises(train.WorkdirMismatchError, match="model"):
        train.train_and_evaluate(c, ref_dir)


def test_bad_config_values_are_clear_errors():
    c = load_config()
    c.batch_size = 4
    with pytest.raises(ValueError, match=r"config.batch_size = 4: expected a multiple of the 8 devices"):
        config_lib.validate(c, 8)
    c = load_config()
    c.data.crop_size = (100, 64)
    with pytest.raises(ValueError, match="data.crop_size"):
        config_lib.validate(c, 8)
    c = load_config()
    c.uda.self_training = False
    with pytest.raises(ValueError, match="pipa.patch.enabled = True: expected False when uda.self_training"):
        config_lib.validate(c, 8)
    with pytest.raises(ValueError, match="unknown method 'fancy'"):
        load_config("method=fancy")
    for method in config_lib.METHODS:
        config_lib.validate(load_config(f"method={method},tiny"), 8)
        config_lib.validate(load_config(f"method={method}"), 1)   # the README's default, one CPU device
