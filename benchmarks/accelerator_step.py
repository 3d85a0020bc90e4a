"""The released recipes' train step on whatever backend is present: compile time, step time,
device memory, FLOPs per step (XLA's cost analysis) and the model-FLOPs utilisation they imply.

  python benchmarks/accelerator_step.py --out benchmarks/results/accelerator_step
  python benchmarks/accelerator_step.py --recipes daformer_pipa --repeats 20      # one recipe

Recipes (the config files' own settings, MiT-b5, bfloat16 compute, random weights and images of
the released crop size; the data pipeline is not part of the measurement):
  daformer_pipa  configs/gta2cs.py:method=pipa       (640x640 crops, 2 + 2 images)
  hrda_pipa      configs/gta2cs_hrda.py:method=pipa  (1024x1024 crops, 512 detail crop, 2 + 2 images)
  dacs           configs/gta2cs_dacs.py              (DeepLabV2-ResNet-101, 512x512 crops, 2 + 2 images;
                                                      its config computes in float32, measured here in bfloat16)
On GPU / TPU the step is compiled and timed (`--repeats` steps after one warm-up). On CPU it is
only lowered, with the accelerator's compute forms (native depthwise and 1x1 convolutions, dense
attention), so the FLOPs are those an accelerator runs, and the script prints the on-paper time of
the recipe's steps at 40 % MFU of an H100 (989 dense bf16 TFLOP/s) and of a TPU v5e (197).
FLOPs come from XLA's cost analysis of the lowered (unoptimised) program: every multiply-add
counts 2, elementwise work counts too, and no fusion or rematerialisation is credited.
The official code's cost to compare with: DAFormer 16 h on one RTX 2080 Ti (40k steps), HRDA
32 h on one Titan RTX (40k steps); PiPa runs 60k steps.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from pipa_jax import io as io_lib  # noqa: E402
from pipa_jax import step as step_lib  # noqa: E402
from pipa_jax import train  # noqa: E402
from pipa_jax.models import layers  # noqa: E402
from train_step import time_steps  # noqa: E402  (benchmarks/, the script's own folder)

RECIPES = {"daformer_pipa": ("configs/gta2cs.py", "method=pipa"),
           "hrda_pipa": ("configs/gta2cs_hrda.py", "method=pipa"),
           "dacs": ("configs/gta2cs_dacs.py", "")}
# Dense bf16 peak FLOP/s per chip, for the MFU of a measured step and the on-paper times.
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5e": 197e12, "TPU v4": 275e12,
         "TPU v5p": 459e12, "TPU v6e": 918e12}
PAPER_MFU = 0.4


def recipe_config(name: str):
    path, arg = RECIPES[name]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    c.model.pretrained = ""
    c.model.require_pretrained = False
    c.model.dtype = "bfloat16"            # every recipe at the accelerators' compute type
    c.compilation_cache_dir = ""
    # The data axis: as many devices as the batch can fill (2 + 2 images use at most 2).
    c.mesh_shape = math.gcd(int(c.batch_size), jax.device_count())
    if jax.default_backend() == "cpu":    # count the FLOPs of the forms an accelerator runs
        c.model.update(layers.ACCELERATOR_FORMS)
    return c


def fake_batch(c, sharding):
    rng = np.random.default_rng(0)
    b, (h, w) = c.batch_size, tuple(c.data.crop_size)
    batch = {"source_image": rng.integers(0, 255, (b, h, w, 3), dtype=np.uint8),
             "source_label": rng.integers(0, 19, (b, h, w), dtype=np.uint8),
             "target_image": rng.integers(0, 255, (b, h, w, 3), dtype=np.uint8),
             "target_label": np.full((b, h, w), 255, np.uint8)}
    if tuple(c.data.get("target_valid_margins", ())):
        batch["target_valid"] = np.ones((b, h, w), np.uint8)
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def chip_peak() -> tuple[str, float | None]:
    kind = jax.devices()[0].device_kind
    for name, peak in PEAKS.items():
        if name.replace("TPU ", "").lower() in kind.lower():
            return name, peak
    return kind, None


def bench(name: str, repeats: int) -> dict:
    c = recipe_config(name)
    mesh = train.make_mesh(c)
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    graphdef, tx, state, imnet = train.build_model_and_state(c, mesh)
    fn = step_lib.make_train_step(c, graphdef, tx, imnet[0] if imnet else None)
    imnet_params = jax.device_put(imnet[1], repl) if imnet else None
    batch = fake_batch(c, data)
    jitted = jax.jit(fn, in_shardings=(repl, data, repl), out_shardings=(repl, repl), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = jitted.lower(state, batch, imnet_params)
    lower_s = time.perf_counter() - t0
    cost = lowered.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan")))
    row = {"recipe": name, "config": ":".join(RECIPES[name]), "crop": list(c.data.crop_size),
           "batch_per_domain": c.batch_size, "steps": c.total_steps, "dtype": c.model.dtype,
           "backbone": c.model.backbone, "segmentor": c.model.segmentor, "lower_s": lower_s,
           "flops_per_step": flops, "devices": jax.device_count()}
    paper = {}
    for chip in ("H100", "TPU v5e"):
        paper[chip] = c.total_steps * flops / (PAPER_MFU * PEAKS[chip]) / 3600
    row["paper_hours_at_40pct_mfu_one_chip"] = paper
    if jax.default_backend() == "cpu":
        row["note"] = "CPU: lowered only (FLOPs and on-paper times); not compiled or timed"
        return row
    t0 = time.perf_counter()
    compiled = lowered.compile()
    row["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    row.update({k: getattr(mem, k, None) for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                                                   "output_size_in_bytes")})
    _, times = time_steps(compiled, state, batch, imnet_params, repeats)
    step_s = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    chip, peak = chip_peak()
    row.update(step_s_median=step_s, step_s_all=times, peak_bytes_in_use=stats.get("peak_bytes_in_use"),
               chip=chip, recipe_hours_measured=c.total_steps * step_s / 3600,
               mfu=(flops / step_s / (peak * jax.device_count())) if peak else None)
    return row


def render(result) -> str:
    lines = [f"# Accelerator train step ({result['date']})", "", f"Command: `{result['command']}`  ",
             f"Backend: {result['backend']}, {result['devices']}, jax {result['jax']}", ""]
    for r in result["rows"]:
        lines += [f"## {r['recipe']}: `{r['config']}`", "",
                  f"{r['backbone']}, {r['segmentor']}, {r['crop'][0]}x{r['crop'][1]} crops, "
                  f"{r['batch_per_domain']} + {r['batch_per_domain']} images, {r['dtype']} compute, {r['steps']} steps.", "",
                  f"- FLOPs per step (XLA cost analysis, lowered program): {r['flops_per_step'] / 1e12:.2f} TFLOP",
                  f"- lowering: {r['lower_s']:.1f} s"]
        for chip, hours in r["paper_hours_at_40pct_mfu_one_chip"].items():
            lines.append(f"- on paper, {r['steps']} steps on one {chip} at 40 % MFU: {hours:.1f} h")
        if "step_s_median" in r:
            mem = r.get("peak_bytes_in_use")
            lines += [f"- compile: {r['compile_s']:.1f} s",
                      f"- step: {r['step_s_median'] * 1e3:.0f} ms median of {len(r['step_s_all'])}"
                      f" -> {r['recipe_hours_measured']:.1f} h for the recipe on {r['devices']} device(s)",
                      f"- MFU: {100 * r['mfu']:.1f} % of {r['chip']}" if r.get("mfu") else f"- chip {r['chip']}: peak unknown",
                      f"- XLA temporaries {r['temp_size_in_bytes'] / 2**30:.2f} GiB; peak device memory "
                      + (f"{mem / 2**30:.2f} GiB" if mem else "n/a")]
        else:
            lines.append(f"- {r['note']}")
        lines.append("")
    lines += ["The official code: DAFormer 16 h on one RTX 2080 Ti and HRDA 32 h on one Titan RTX (40k steps "
              "each, as published); PiPa's recipes run 60k steps.", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    names = [n for n in args.recipes.split(",") if n]
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; expected some of {', '.join(RECIPES)}")
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python"] + sys.argv), "backend": jax.default_backend(),
              "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "jax": jax.__version__, "rows": []}
    for name in names:
        row = bench(name, args.repeats)
        result["rows"].append(row)
        print(f"{name}: {row['flops_per_step'] / 1e12:.2f} TFLOP/step, "
              + (f"{row['step_s_median'] * 1e3:.0f} ms/step" if "step_s_median" in row else row["note"]), flush=True)
        if args.out:
            io_lib.write_json_atomic(args.out + ".partial.json", result, sort_keys=False)
    text = render(result)
    if args.out:
        io_lib.write_json_atomic(args.out + ".json", result, sort_keys=False)
        io_lib.write_text_atomic(args.out + ".md", text)
    print(text)


if __name__ == "__main__":
    main()
