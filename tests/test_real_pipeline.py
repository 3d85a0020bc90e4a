"""The real-benchmark path end to end, as a user runs it, on fake dataset layouts built from the
real sample frames: prepare_data -> training (the configs' `smoke` variant through
`python -m pipa_jax.main`) -> `python -m pipa_jax.evaluate` -> `python -m pipa_jax.predict`,
for GTA5 -> Cityscapes (DAFormer + PiPa; DACS on DeepLabV2) and SYNTHIA -> Cityscapes (16-bit
labels; mIoU16/13).
"""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from test_data_real import make_cityscapes, make_gta, make_synthia

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("datasets")
    roots = {"gta": make_gta(str(base / "gta")), "synthia": make_synthia(str(base / "synthia"), n=4),
             "cityscapes": make_cityscapes(str(base / "cityscapes"))}
    for name, root in roots.items():
        run("pipa_jax.tools.prepare_data", name, root, "--workers", "1", "--no-progress")
        assert glob.glob(os.path.join(root, "**", "*_labelTrainIds.png"), recursive=True), name
    return roots


@pytest.mark.parametrize("config,source,method", [("gta2cs.py", "gta", "pipa"),
                                                   ("synthia2cs.py", "synthia", "daformer"),
                                                   ("gta2cs_dacs.py", "gta", "dacs")])
def test_prepare_train_evaluate_predict(layouts, tmp_path, xla_cache_dir, config, source, method):
    cfg = os.path.join(ROOT, "configs", config) + f":method={method},smoke"
    roots = [f"--config.data.source_root={layouts[source]}",
             f"--config.data.target_root={layouts['cityscapes']}",
             f"--config.compilation_cache_dir={xla_cache_dir}"]
    workdir = tmp_path / "run"
    out = run("pipa_jax.main", "--config", cfg, "--workdir", str(workdir), *roots)
    assert "done: step 4" in out.stdout
    with open(workdir / "metrics.json") as f:
        history = json.load(f)
    final = history["4"]["student"]
    assert 0.0 <= final["miou"] <= 1.0
    if source == "synthia":                       # SYNTHIA reports mIoU16 and mIoU13 as well
        assert {"miou16", "miou13"} <= set(final)
    assert (workdir / "iou_table.md").exists() and (workdir / "predictions.png").exists()

    # The evaluation CLI reproduces the in-training evaluation of the last step.
    out_dir = tmp_path / "eval"
    run("pipa_jax.evaluate", "--workdir", str(workdir), "--out", str(out_dir))
    results = [json.load(open(p)) for p in glob.glob(str(out_dir / "*.json"))]
    assert len(results) == 1
    assert results[0]["miou"] == pytest.approx(final["miou"], abs=1e-9)

    # Predictions for arbitrary images, at each image's own size.
    preds = tmp_path / "preds"
    images = os.path.join(layouts["cityscapes"], "leftImg8bit", "val", "*", "*.png")
    run("pipa_jax.predict", "--workdir", str(workdir), "--images", images, "--out", str(preds))
    written = sorted(os.listdir(preds))
    assert any(n.endswith("_trainIds.png") for n in written) and any(n.endswith("_overlay.png") for n in written)
    src = glob.glob(images)[0]
    ids = np.asarray(Image.open(preds / (os.path.splitext(os.path.basename(src))[0] + "_trainIds.png")))
    assert ids.shape == np.asarray(Image.open(src)).shape[:2]
    assert ids.max() < 19
