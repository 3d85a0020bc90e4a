"""The full DAFormer + PiPa train step on this machine: compile time, median step time, peak
memory, the time split by stage, and the memory of the contrastive losses against N.

  python benchmarks/train_step.py --variants b0,b5 --repeats 5 --out benchmarks/results/train_step
  python benchmarks/train_step.py --segmentor hrda --size 1024 --variants b0,b5 --ladder_variants b0,b5 \
      --methods source_only,daformer,pipa --remat_variants '' --out benchmarks/results/train_step_hrda

Stage split: the step is built for a ladder of methods that each add one stage
(source_only -> dacs -> daformer -> pixel_only -> pipa) and the medians are differenced:
  source forward/backward + AdamW | + EMA teacher forward, ClassMix, strong augmentation and
  the mixed forward/backward | + frozen ImageNet encoder forward and feature distance |
  + pixel head and pixel contrast | + two overlapping crops through the student and patch contrast |
  + MIC's augmented, block-masked target through the student (the rung 'pipa_mic'; 'mic' alone is
  DAFormer + MIC). MIC's blocks are 1/16 of the crop side (64 for 1024, 32 for 512, as the recipes).
The patch term runs from step 0 here (start_step = 0) so that it is timed. With --segmentor hrda
every rung runs on the HRDA segmentor (docs/method.md §6): detail crop = half the crop, detail
windows every quarter crop in the teacher's inference, patch crops 3/4 of the crop; 'daformer' is
then HRDA's own recipe (self-training + FD) and 'pipa' HRDA + PiPa.
`--render FILE.json` writes a recorded run's table again (FILE.md).
Timings are medians over repeats measured in one process; this machine is noisy, so compare
ratios from the same run rather than absolute seconds across runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pipa_jax import config as config_lib
from pipa_jax import io as io_lib
from pipa_jax import losses, step as step_lib, train

LADDER = ("source_only", "dacs", "daformer", "pixel_only", "pipa", "pipa_mic")
STAGE_NAMES = {
    "source_only": "source fwd+bwd, AdamW",
    "dacs": "+ teacher fwd, ClassMix, augmentation, mixed fwd+bwd",
    "daformer": "+ ImageNet encoder fwd, feature distance",
    "pixel_only": "+ pixel head, pixel contrast",
    "pipa": "+ 2 crops fwd+bwd, patch contrast",
    "pipa_mic": "+ MIC: augmented, block-masked target fwd+bwd",
    "mic": "DAFormer + MIC (no pixel / patch terms)",
}


def bench_config(variant: str, method: str, size: int, batch: int, remat: bool = False,
                 segmentor: str = "encoder_decoder"):
    c = config_lib.base_config()
    config_lib.apply_method(c, method)
    c.model.segmentor = segmentor
    if segmentor == "hrda":
        c.model.hrda.hr_crop_size = (size // 2, size // 2)
        c.model.hrda.hr_slide_stride = (size // 4, size // 4)
        c.pipa.patch.weight = 0.01
    c.model.backbone = f"mit_{variant}"
    c.model.remat = remat
    c.batch_size = batch
    c.data.crop_size = (size, size)
    c.data.image_size = (size, size)
    c.pipa.patch.crop_size = (size * 3 // 4 // 32 * 32,) * 2
    c.pipa.patch.start_step = 0
    c.mic.block_size = size // 16
    c.mesh_shape = -1
    c.compilation_cache_dir = ""
    return c


def time_method(variant, method, size, batch, repeats, remat=False, force=False, segmentor="encoder_decoder"):
    c = bench_config(variant, method, size, batch, remat, segmentor)
    mesh = train.make_mesh(c)
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    graphdef, tx, state, imnet = train.build_model_and_state(c, mesh)
    fn = step_lib.make_train_step(c, graphdef, tx, imnet[0] if imnet else None)
    imnet_params = jax.device_put(imnet[1], repl) if imnet else None
    rng = np.random.default_rng(0)
    batch_np = {
        "source_image": rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8),
        "source_label": rng.integers(0, 19, (batch, size, size), dtype=np.uint8),
        "target_image": rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8),
        "target_label": rng.integers(0, 19, (batch, size, size), dtype=np.uint8),
    }
    b = {k: jax.device_put(v, data) for k, v in batch_np.items()}
    jitted = jax.jit(fn, in_shardings=(repl, data, repl), out_shardings=(repl, repl), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, b, imnet_params).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    need = sum(getattr(mem, a, 0) or 0 for a in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    row = {"method": method, "compile_s": compile_s, "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
           "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
           "output_bytes": getattr(mem, "output_size_in_bytes", None)}
    if need > 0.8 * ram and not force:  # would swap or be killed: report XLA's estimate instead
        return {**row, "step_s_median": float("nan"), "step_s_all": [],
                "not_run": f"needs {need / 2**30:.1f} GiB by XLA's estimate; this machine has {ram / 2**30:.1f} GiB"}
    _, times = time_steps(compiled, state, b, imnet_params, repeats)
    return {**row, "step_s_median": statistics.median(times), "step_s_all": times}


def time_steps(compiled, state, batch, imnet_params, repeats):
    """One warm-up step, then `repeats` timed steps (each waited for); returns (state, seconds)."""
    state, m = compiled(state, batch, imnet_params)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, m = compiled(state, batch, imnet_params)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return state, times


def contrastive_memory(dim=128):
    """Compiled temporary memory of the loss gradients against N, next to a dense N x N matrix."""
    rows = []
    for n in (1024, 4096, 16384):
        key = jax.random.key(0)
        f = jax.random.normal(key, (n, dim))
        f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
        lab = jax.random.randint(key, (n,), 0, 19)
        valid = jnp.ones((n,), bool)
        pix = jax.jit(jax.grad(lambda x: losses.pixel_contrast_loss(x, lab, valid)))
        pix_mem = pix.lower(f).compile().memory_analysis().temp_size_in_bytes
        conf = jnp.full((n,), 0.5)
        conf2 = jnp.full((n,), 0.95)
        patch = jax.jit(jax.grad(lambda x: losses.directional_contrast_loss(
            x, f, lab, conf, conf2, valid, f, lab, valid)[0]))
        patch_mem = patch.lower(f).compile().memory_analysis().temp_size_in_bytes
        rows.append({"n": n, "pixel_grad_temp_bytes": pix_mem, "patch_grad_temp_bytes": patch_mem,
                     "dense_nxn_float32_bytes": 4 * n * n})
    return rows


def _write(path, obj):
    io_lib.write_json_atomic(path, obj, sort_keys=False)


def machine():
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="b0,b5")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--ladder_variants", default="b0", help="variants timed for the stage split")
    ap.add_argument("--remat_variants", default="b5",
                    help="variants run with model.remat=True (encoder activations recomputed: memory)")
    ap.add_argument("--out", default="benchmarks/results/train_step")
    ap.add_argument("--methods", default="", help="only these rungs of the ladder (default: all)")
    ap.add_argument("--segmentor", default="encoder_decoder", choices=("encoder_decoder", "hrda"))
    ap.add_argument("--force", action="store_true",
                    help="run even when XLA's memory estimate exceeds 80%% of RAM (may be killed)")
    ap.add_argument("--render", metavar="JSON", help="only write JSON's table again (next to it, as .md)")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            io_lib.write_text_atomic(os.path.splitext(args.render)[0] + ".md", render(json.load(f)))
        return
    result = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "load_average_start": os.getloadavg(), "size": args.size,
              "batch_per_domain": args.batch, "segmentor": args.segmentor, "variants": {}}
    for v in args.variants.split(","):
        methods = LADDER if v in args.ladder_variants.split(",") else ("pipa",)
        if args.methods:  # any rungs (STAGE_NAMES), in the order given
            methods = [m for m in args.methods.split(",") if m]
            unknown = sorted(set(methods) - set(STAGE_NAMES))
            if unknown:
                raise SystemExit(f"unknown methods {unknown}; expected some of {', '.join(STAGE_NAMES)}")
        rows = []
        for method in methods:
            r = time_method(v, method, args.size, args.batch, args.repeats, v in args.remat_variants.split(","),
                            args.force, args.segmentor)
            r["remat"] = v in args.remat_variants.split(",")
            print(f"mit_{v} {method}: compile {r['compile_s']:.1f} s, step {r['step_s_median']:.2f} s "
                  f"{r.get('not_run', '')}", flush=True)
            rows.append(r)
            result["variants"][v] = rows
            _write(args.out + ".partial.json", result)   # an interrupted run keeps what it measured
    result["load_average_end"] = os.getloadavg()
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["contrastive_memory"] = contrastive_memory()
    _write(args.out + ".json", result)
    io_lib.write_text_atomic(args.out + ".md", render(result))
    print(render(result))


def stage_label(prev_method, method) -> str:
    """What a rung adds to the row above it: its own stage, or every stage of the ladder in
    between when rungs were left out (--methods), so that the delta column reads right."""
    if prev_method in LADDER and method in LADDER and LADDER.index(method) > LADDER.index(prev_method) + 1:
        return "; ".join(STAGE_NAMES[m] for m in LADDER[LADDER.index(prev_method) + 1:LADDER.index(method) + 1])
    return STAGE_NAMES[method]


def _load_remark(r) -> str:
    nproc = r["machine"]["nproc"] or 1
    if max(*r["load_average_start"], *r["load_average_end"]) > nproc:
        return (" (above the core count: something else shared the machine, and the step times "
                "are not comparable)")
    return ": nothing else ran"


def render(r) -> str:
    m = r["machine"]
    lines = [f"# Train step benchmark ({r['date']})", "",
             f"Command: `{r['command']}`  ", f"Machine: {m['cpu']}, {m['nproc']} cores, {m['devices']}, "
             f"jax {m['jax']}, Python {m['python']}  ",
             f"Step: {'HRDA' if r.get('segmentor') == 'hrda' else 'DAFormer'} + PiPa ladder, batch "
             f"{r['batch_per_domain']} + {r['batch_per_domain']}, "
             f"{r['size']}x{r['size']} crops, float32. Medians of the repeats in one process.  ",
             f"Load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in r['load_average_start'])}, "
             f"at end {tuple(round(x, 2) for x in r['load_average_end'])}{_load_remark(r)}.", ""]
    for v, rows in r["variants"].items():
        remat = " (model.remat=True)" if rows and rows[0].get("remat") else ""
        lines += [f"## MiT-{v}{remat}", "", "| method (adds) | compile s | step s (median) | delta s | XLA temp MiB |",
                  "|---|---|---|---|---|"]
        prev = prev_method = None
        for row in rows:
            delta = "" if prev is None else f"{row['step_s_median'] - prev:+.2f}"
            temp = row["temp_bytes"] / 2**20 if row["temp_bytes"] is not None else float("nan")
            step = f"{row['step_s_median']:.2f}" if not row.get("not_run") else f"not run: {row['not_run']}"
            lines.append(f"| {row['method']} ({stage_label(prev_method, row['method'])}) | {row['compile_s']:.1f} | "
                         f"{step} | {delta} | {temp:.0f} |")
            prev, prev_method = row["step_s_median"], row["method"]
        lines.append("")
    lines += [f"Peak process RSS: {r['peak_rss_bytes'] / 2**30:.2f} GiB", "",
              "## Contrastive losses: compiled temporary memory of the gradient", "",
              "| N | pixel contrast MiB | patch contrast MiB | dense N x N float32 MiB |", "|---|---|---|---|"]
    for row in r["contrastive_memory"]:
        lines.append(f"| {row['n']} | {row['pixel_grad_temp_bytes'] / 2**20:.1f} | "
                     f"{row['patch_grad_temp_bytes'] / 2**20:.1f} | {row['dense_nxn_float32_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
