"""Multi-host training proven on one machine: the README's command as 2 processes x 4 CPU devices
(jax.distributed over 127.0.0.1, gloo collectives) trains exactly as 1 process x 8 devices; a
checkpoint the 2 processes wrote resumes in 1 process; a SIGTERM to one of the two processes makes
both save the same step and exit cleanly; bad multi-host arguments fail fast with clear errors.

The runs are test_train.py's CLI (8 steps) on the tiny DACS config (see ARG below)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pipa_jax import distributed
from test_train import ROOT, cli

STEPS = 8
# The multi-host runs test the mechanics (per-process data, one global mesh, the gradient
# all-reduce, checkpoints, preemption, evaluation and the report), so they train the smaller DACS
# step (EMA teacher, pseudo-labels, ClassMix: every kind of state but a term's) rather than the
# full PiPa + MIC one: its compile, done by every process, is what these tests spend their time on.
ARG = "method=dacs,tiny"
# A checkpoint every 4 steps, not test_train.py's 2: the two processes' Orbax save of the
# replicated state (each shard once, then a commit barrier over gloo) took 18 s a checkpoint here,
# twice the time of the steps between two of them.
CHECKPOINT_EVERY = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_flags(n: int) -> str:
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])


class Job:
    """The CLI as `n` processes with 8 / n CPU devices each, output in files (logs are long)."""

    def __init__(self, workdir, xla_cache_dir, n, *extra):
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        port = free_port()
        self.procs, self.logs = [], []
        for i in range(n):
            cmd = cli(self.workdir, xla_cache_dir, *extra, arg=ARG, overrides={"checkpoint_every": CHECKPOINT_EVERY})
            if n > 1:
                cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}",
                        "--initialization_timeout=300"]
            out = open(f"{self.workdir}.p{i}.out", "w+")
            err = open(f"{self.workdir}.p{i}.err", "w+")
            self.logs.append((out, err))
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True,
                                               env=dict(os.environ, XLA_FLAGS=device_flags(8 // n))))

    def wait(self, timeout=1500):
        """[(returncode, stdout, stderr)] of every process; kills all of them on a timeout."""
        deadline = time.time() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, deadline - time.time()))
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        results = []
        for p, (out, err) in zip(self.procs, self.logs):
            out.seek(0)
            err.seek(0)
            results.append((p.returncode, out.read(), err.read()))
            out.close()
            err.close()
        return results


def assert_ok(results):
    for i, (rc, _, err) in enumerate(results):
        assert rc == 0, f"process {i} exited with {rc}:\n{err[-3000:]}"


def adam_bound():
    """The most that any parameter can move in the run: Adam steps each one by at most ~lr per
    step (x10 for the head), whatever its gradient."""
    from pipa_jax.optim import learning_rate_schedule
    from test_train import load_config
    c = load_config(ARG)
    c.total_steps = STEPS
    schedule = learning_rate_schedule(c, c.optimizer.learning_rate)
    return 2 * 10 * sum(float(schedule(t)) for t in range(STEPS)) * 1.01


def assert_trees_close(a, b):
    """Same state up to the order of floating-point sums. The gradient all-reduce adds the devices'
    parts in another order across processes (gloo) than within one (XLA), and Adam turns the
    rounding noise of a zero gradient (a conv bias before BatchNorm) into +-lr steps, so
    elementwise 1e-6 cannot hold after 8 steps. Instead: integers (step, bank labels) equal;
    every parameter within the largest possible total update of the one-process value; BatchNorm
    statistics and term state within 1e-3 relative per array; the typical parameter array within
    1e-4 relative (measured here: 1e-6 median, 3.4e-5 worst BatchNorm array)."""
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    bound, rel = adam_bound(), []
    for (path, x), (_, y) in zip(la, lb):
        name, group = jax.tree_util.keystr(path), jax.tree_util.keystr(path[:1])
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind in "iub":
            np.testing.assert_array_equal(x, y, err_msg=name)
            continue
        if x.size == 0:
            continue
        x, y = x.astype(np.float64), y.astype(np.float64)
        r = np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-12)
        if group in ("['params']", "['teacher_params']"):
            assert np.max(np.abs(x - y)) <= bound, name
            rel.append(r)
        elif group in ("['batch_stats']", "['terms']"):
            assert r < 1e-3, (name, r)
    assert np.median(rel) < 1e-4, np.median(rel)
def logged_losses(stderr):
    """{step: {name: value}} of the loss lines process 0 logged (6 significant digits)."""
    out = {}
    for line in stderr.splitlines():
        if "] ema_alpha=" not in line:
            continue
        step = int(line.split("] ema_alpha=")[0].rsplit("[", 1)[1])
        out[step] = {k: float(v) for k, v in (kv.split("=") for kv in line.split("] ", 1)[1].split(", "))
                     if k.startswith("loss/")}
    return out


def final_state(workdir, step=STEPS):
    """A checkpoint's state as NumPy arrays, whatever devices wrote it (a checkpoint keeps the
    shardings it was saved with; the 2-process one names devices this process does not have)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(path, restore_args=args)


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)


def finished_run(tmp_path_factory, xla_cache_dir, n):
    workdir = tmp_path_factory.mktemp(f"run{n}") / "run"
    results = Job(workdir, xla_cache_dir, n).wait()
    assert_ok(results)
    return str(workdir), results


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, xla_cache_dir):
    return finished_run(tmp_path_factory, xla_cache_dir, 1)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, xla_cache_dir):
    return finished_run(tmp_path_factory, xla_cache_dir, 2)


def test_two_processes_train_as_one(one_process, two_processes):
    (one_dir, _), (two_dir, two) = one_process, two_processes
    # Process 0 reports; process 1 logs only warnings.
    assert f"done: step {STEPS}" in two[0][1] and f"done: step {STEPS}" not in two[1][1]
    assert "loss/source_ce=" in two[0][2] and "loss/source_ce=" not in two[1][2]
    # The same losses at every log step.
    l1, l2 = logged_losses(one_process[1][0][2]), logged_losses(two[0][2])
    assert sorted(l1) == sorted(l2) == list(range(2, STEPS + 1, 2))
    for step in l1:
        for k in l1[step]:
            np.testing.assert_allclose(l2[step][k], l1[step][k], rtol=2e-5, atol=1e-6, err_msg=f"{k} at {step}")
    # The same parameters, teacher, optimizer state, BatchNorm statistics and term state.
    assert_trees_close(final_state(one_dir), final_state(two_dir))
    # The same evaluation: the confusion matrix is summed over both processes' halves of the val
    # set, so its ground-truth counts (row sums, which do not depend on the weights) are exactly
    # the one-process ones. The predictions come from weights equal only up to the rounding above,
    # so an argmax may flip on a few pixels (one CI run: mIoU 0.071024 vs 0.071031); a flip moves
    # one count between two cells of a row, hence the bound on the moved counts.
    m1, m2 = read_metrics(one_dir), read_metrics(two_dir)
    assert list(m1) == [str(STEPS)]
    assert m1.keys() == m2.keys()
    for step in m1:
        for who in m1[step]:
            c1, c2 = (np.asarray(m[step][who]["confusion_matrix"], np.int64) for m in (m1, m2))
            np.testing.assert_array_equal(c2.sum(1), c1.sum(1), err_msg=f"ground-truth pixels, {who}")
            moved = np.abs(c2 - c1).sum() / 2
            assert moved <= 1e-3 * c1.sum(), (who, moved, c1.sum())
            np.testing.assert_allclose(m2[step][who]["miou"], m1[step][who]["miou"], atol=1e-3)
    # The report is written once, by process 0, from predictions made on all devices: the same
    # pictures up to the argmax flips above (one local run: 1 pixel of 24576 differed).
    for name in ("iou_table.md", "predictions.png", "grid_predictions.npz", "config.json"):
        assert os.path.exists(os.path.join(two_dir, name)), name
    with np.load(os.path.join(one_dir, "grid_predictions.npz")) as a, \
            np.load(os.path.join(two_dir, "grid_predictions.npz")) as b:
        assert a["predictions"].shape == b["predictions"].shape
        flipped = int((a["predictions"] != b["predictions"]).sum())
        assert flipped <= 1e-3 * a["predictions"].size, (flipped, a["predictions"].size)


def test_sigterm_to_one_process_stops_both_and_resumes_in_one(one_process, xla_cache_dir, tmp_path):
    one_dir, _ = one_process
    workdir = tmp_path / "run"
    job = Job(workdir, xla_cache_dir, 2)
    first = workdir / "checkpoints" / str(CHECKPOINT_EVERY)
    deadline = time.time() + 1200
    while time.time() < deadline and not first.exists() and all(p.poll() is None for p in job.procs):
        time.sleep(0.1)
    assert first.exists(), f"no checkpoint at step {CHECKPOINT_EVERY}: " + job.wait(timeout=5)[0][2][-2000:]
    job.procs[1].send_signal(signal.SIGTERM)        # one host is preempted
    results = job.wait()
    assert_ok(results)
    stops = [int(err.split("preemption notice: every process saves step ")[1].split()[0])
             for _, _, err in results if "preemption notice" in err]
    assert len(stops) == 2 and stops[0] == stops[1], stops
    stop = stops[0]
    assert CHECKPOINT_EVERY <= stop < STEPS
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert steps[-1] == stop, steps
    # The checkpoint of the 2-process run resumes in 1 process x 8 devices and ends as the
    # uninterrupted 1-process run.
    (rc, out, err), = Job(workdir, xla_cache_dir, 1).wait()
    assert rc == 0, err[-3000:]
    assert f"resumed from step {stop}" in err and f"done: step {STEPS}" in out
    assert_trees_close(final_state(one_dir), final_state(str(workdir)))


def test_bad_multihost_arguments_fail_fast(tmp_path, xla_cache_dir):
    def run(*flags):
        cmd = cli(tmp_path / "bad", xla_cache_dir, *flags)
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)

    t = time.time()
    proc = run("--coordinator_address=127.0.0.1:9", "--num_processes=2", "--process_id=1",
               "--initialization_timeout=3")
    assert proc.returncode != 0 and time.time() - t < 100
    assert "the coordinator at 127.0.0.1:9 did not answer within 3 s" in proc.stderr
    proc = run("--coordinator_address=127.0.0.1:9", "--num_processes=2", "--process_id=2")
    assert proc.returncode != 0 and "--process_id=2: expected 0..1" in proc.stderr
    proc = run("--coordinator_address=localhost", "--num_processes=2", "--process_id=0")
    assert proc.returncode != 0 and "expected HOST:PORT" in proc.stderr
    proc = run("--num_processes=2")
    assert proc.returncode != 0 and "missing --coordinator_address, --process_id" in proc.stderr


def test_setup_checks():
    distributed.check(distributed.Setup())                                  # one process: nothing to check
    distributed.check(distributed.Setup("10.0.0.1:1234", 4, 3))
    distributed.check(distributed.Setup(auto=True))                          # the cluster fills the rest
    for bad, match in ((distributed.Setup("10.0.0.1:1234", 0, 0), "--num_processes=0"),
                       (distributed.Setup("10.0.0.1:1234", 2, -1), "--process_id=-1"),
                       (distributed.Setup("10.0.0.1:99999", 2, 0), "HOST:PORT"),
                       (distributed.Setup("10.0.0.1:1234", 2, 0, timeout_s=0), "initialization_timeout")):
        with pytest.raises(distributed.DistributedSetupError, match=match):
            distributed.check(bad)


def test_mesh_must_span_every_process(monkeypatch):
    from test_train import load_config
    from pipa_jax import config as config_lib
    c = load_config()
    c.mesh_shape = 4
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="mesh_shape = 4: expected -1 .all 8 devices. with 2 processes"):
        config_lib.validate(c, 8)
    c.mesh_shape = -1
    config_lib.validate(c, 8)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
