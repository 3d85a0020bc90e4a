"""HRDA + PiPa + MIC end to end: `python -m pipa_jax.main --config configs/synthetic_hrda.py:method=pipa_mic,tiny`
trains every term on the multi-resolution segmentor (the source and mixed CE of both branches,
FD, both contrastive terms, MIC's masked view), evaluates and reports; `pipa_jax.evaluate`
reproduces its numbers from the workdir and from the student converted to an official-layout file
and back; `pipa_jax.predict` segments an image with it. One run trains HRDA + PiPa and MIC(HRDA)
at once (two CLI runs cost twice the compile); test_mic.py checks MIC's term value itself."""
import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from PIL import Image

from pipa_jax import convert, evaluate, predict
from pipa_jax.data import pipeline
from pipa_jax.tools import convert_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic_hrda.py")
ARG = "method=pipa_mic,tiny"


def load(arg):
    import importlib.util
    spec = importlib.util.spec_from_file_location("synthetic_hrda_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, xla_cache_dir):
    workdir = str(tmp_path_factory.mktemp("hrda_run"))
    cmd = [sys.executable, "-m", "pipa_jax.main", "--config", f"{CONFIG}:{ARG}", "--workdir", workdir,
           f"--config.compilation_cache_dir={xla_cache_dir}", "--config.report.grid_images=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: step 4, target mIoU" in proc.stdout
    for term in ("source_ce", "mix_ce", "fd", "pixel", "patch", "mic"):       # every term was logged
        assert f"loss/{term}=" in proc.stderr, term
    return workdir


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_cli_trains_hrda_pipa_mic_and_reports(run_dir):
    history = read_json(os.path.join(run_dir, "metrics.json"))
    assert set(history["4"]) == {"student", "teacher"}
    for name in ("iou_table.md", "predictions.png", "config.json"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert read_json(os.path.join(run_dir, "config.json"))["model"]["segmentor"] == "hrda"
    with ocp.PyTreeCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(run_dir, "checkpoints", "4", "state"))
    assert int(state["step"]) == 4
    assert "scale_attention" in state["params"]["decode_head"] and "head" in state["params"]["decode_head"]
    assert state["terms"]["patch"]["valid"].any()        # the patch term ran (start step 0) and filled its bank
    assert "pixel_head" in state["params"] and "patch_head" in state["params"]


def test_evaluate_reproduces_the_run_and_a_converted_checkpoint(run_dir, tmp_path, capsys):
    assert evaluate.main(["prog", "--workdir", run_dir, "--out", str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    result = read_json(os.path.join(tmp_path, "eval", "synthetic_target_student_step4.json"))
    logged = read_json(os.path.join(run_dir, "metrics.json"))["4"]["student"]
    assert result["miou"] == pytest.approx(logged["miou"], abs=1e-9)
    assert result["model"]["segmentor"] == "hrda" and result["inference"]["mode"] == "slide"

    # The student in the official HRDA layout, converted back with the run's HRDA settings.
    loaded, run_config = evaluate.load_run_model(run_dir)
    sd = convert.export_torch_state_dict(nnx.merge(loaded.graphdef, loaded.params, loaded.batch_stats), "model.")
    assert "model.decode_head.head.conv_seg.weight" in sd and "model.decode_head.conv_seg.weight" not in sd
    path = tmp_path / "hrda_student.npz"
    np.savez(path, **sd)
    model_dir = str(tmp_path / "model")
    summary = convert_checkpoint.convert_file(str(path), model_dir, hrda_settings=run_config.model.hrda)
    assert summary["config"]["segmentor"] == "hrda"
    argv = ["prog", "--checkpoint", model_dir, "--config", f"{CONFIG}:{ARG}",
            "--config.compilation_cache_dir=", "--out", str(tmp_path / "eval2")]
    assert evaluate.main(argv) == 0
    capsys.readouterr()
    converted = read_json(os.path.join(tmp_path, "eval2", "synthetic_target_student.json"))
    assert converted["confusion_matrix"] == result["confusion_matrix"]

    # predict: one synthetic target image, resized into the test box and back.
    image = pipeline.make_source("synthetic_target", "val", run_config)[0]["image"]
    Image.fromarray(image).save(tmp_path / "frame.png")
    code = predict.main(["prog", "--checkpoint", model_dir, "--config", f"{CONFIG}:{ARG}",
                         "--config.compilation_cache_dir=", "--images", str(tmp_path / "frame.png"),
                         "--out", str(tmp_path / "pred")])
    assert code == 0, capsys.readouterr().err
    pred = np.asarray(Image.open(tmp_path / "pred" / "frame_trainIds.png"))
    assert pred.shape == image.shape[:2] and pred.max() < 19
