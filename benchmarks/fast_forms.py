"""CPU fast forms, old against new: jitted gradient of the MiT + DAFormer-head Segmentor.

The "old" forms are those before the fast forms were added (depthwise shift conv differentiated
by autodiff, 1x1 and spatial-reduction convs as lax convolutions); "new" is the default 'auto'
on CPU (shift conv with its hand-written VJP, those convs as matmuls). Two ablation rows take one
change each, and one row adds remat. All configurations share one set of parameters and run
interleaved round by round in one process, so that load drift on a shared machine hits them
alike: compare the ratios, not absolute times.

Measured: value_and_grad (w.r.t. the parameters) of the mean cross-entropy of the stride-4
logits vs random labels, train mode (batch-stat BatchNorm, dropout 0.1, drop path 0.1), float32,
one jitted function per configuration; median (min) of the timed rounds after the first call;
XLA temp memory = compiled.memory_analysis().temp_size_in_bytes. Before timing, every
configuration's loss and gradient are checked against the old forms'.

    python benchmarks/fast_forms.py [--variant b0] [--batch 2] [--size 512] [--rounds 5]
        [--configs old,dwvjp,matmul,new,new_remat] [--out benchmarks/results/fast_forms.md]
    python benchmarks/fast_forms.py --variant b5 --configs old,new,new_remat --compile-only
        (temp memory and compile time only, for models too slow or too big to run here)
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pipa_jax.models import build_segmentor, default_model_config

# name -> (dwconv_impl, conv_impl, remat, description)
CONFIGS = {
    "old": ("shift_autodiff", "native", False, "old forms: shift dwconv by autodiff, 1x1 / sr convs native"),
    "dwvjp": ("shift", "native", False, "only the dwconv VJP"),
    "matmul": ("shift_autodiff", "matmul", False, "only 1x1 / sr convs as matmuls"),
    "new": ("auto", "auto", False, "new forms (default 'auto' on CPU)"),
    "new_remat": ("auto", "auto", True, "new forms + model.remat=True"),
}


def build(variant, dw, conv, remat):
    c = default_model_config()
    c.backbone = f"mit_{variant}"
    c.pixel_head = c.patch_head = False
    c.dwconv_impl, c.conv_impl, c.remat = dw, conv, remat
    return build_segmentor(c, seed=0)


def grad_fn(graphdef):
    def loss_fn(params, stats, x, y, rng):
        model = nnx.merge(graphdef, *jax.tree.map(lambda v: v, (params, stats)))
        logits = model(x, train=True, rng=rng)
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
    return jax.value_and_grad(loss_fn)


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def rel_err(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(la, lb))
    den = sum(float(jnp.sum(y ** 2)) for y in lb)
    return (num / den) ** 0.5


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="b0")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default="benchmarks/results/fast_forms.md")
    p.add_argument("--compile-only", action="store_true", help="report compile time and temp memory only")
    args = p.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    if names[0] != "old" or any(n not in CONFIGS for n in names):
        p.error(f"--configs: names from {list(CONFIGS)}, starting with 'old' (the reference)")
    command = "python benchmarks/fast_forms.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    load_start = os.getloadavg()
    t_start = time.time()

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 19, size=(args.batch, args.size // 4, args.size // 4)), jnp.int32)
    key = jax.random.key(0)

    runs = {}
    for n in names:
        dw, conv, remat, _ = CONFIGS[n]
        graphdef, params, stats = nnx.split(build(args.variant, dw, conv, remat), nnx.Param, nnx.BatchStat)
        t0 = time.perf_counter()
        lowered = jax.jit(grad_fn(graphdef)).lower(params, stats, x, y, key)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        runs[n] = dict(fn=compiled, params=params, stats=stats, lower=t1 - t0, compile=t2 - t1,
                       temp=compiled.memory_analysis().temp_size_in_bytes, times=[], cpu=[])
        print(f"{n}: lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s, temp {runs[n]['temp'] / 2**30:.2f} GiB",
              flush=True)

    if args.compile_only:
        lines = [
            "# CPU fast forms: XLA temp memory of the jitted gradient (compile only)", "",
            f"- command: `{command}`",
            f"- date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, "
            f"wall time {time.time() - t_start:.0f} s; jax {jax.__version__} (backend {jax.default_backend()})",
            f"- compiled: value_and_grad of MiT-{args.variant} + DAFormer head (no PiPa heads), batch {args.batch}, "
            f"{args.size}x{args.size}, float32, train mode; not run", "",
            "| config | dwconv_impl | conv_impl | remat | XLA temp memory | temp ratio to old | lower + compile s |",
            "|---|---|---|---|---|---|---|",
        ]
        for n in names:
            r, (dw, conv, remat, desc) = runs[n], CONFIGS[n]
            lines.append(f"| {n} ({desc}) | {dw} | {conv} | {remat} | {r['temp'] / 2**30:.2f} GiB "
                         f"| {r['temp'] / runs['old']['temp']:.2f} | {r['lower']:.1f} + {r['compile']:.1f} |")
        return write(lines, args.out)

    # First call (warm-up) and equality against the old forms.
    ref = None
    for n in names:
        r = runs[n]
        loss, grads = jax.block_until_ready(r["fn"](r["params"], r["stats"], x, y, key))
        if ref is None:
            ref = (loss, grads)
        r["loss_diff"] = abs(float(loss) - float(ref[0]))
        r["grad_rel_err"] = rel_err(grads, ref[1])
        print(f"{n}: loss {float(loss):.6f} |dloss| {r['loss_diff']:.2e} grad rel err {r['grad_rel_err']:.2e}",
              flush=True)
        del grads

    for i in range(args.rounds):
        for n in names:
            r = runs[n]
            t, c = time.perf_counter(), cpu_seconds()
            jax.block_until_ready(r["fn"](r["params"], r["stats"], x, y, key))
            r["times"].append(time.perf_counter() - t)
            r["cpu"].append(cpu_seconds() - c)
        print(f"round {i + 1}: " + ", ".join(f"{n} {runs[n]['times'][-1]:.2f} s (cpu {runs[n]['cpu'][-1]:.2f} s)"
                                             for n in names), flush=True)

    base = runs["old"]
    lines = [
        "# CPU fast forms: jitted gradient, old vs new forms",
        "",
        f"- command: `{command}`",
        f"- date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, "
        f"wall time {time.time() - t_start:.0f} s, load average start / end "
        f"{' '.join(f'{v:.2f}' for v in load_start)} / {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"- machine: {os.cpu_count()} cores, {platform.platform()}; jax {jax.__version__} "
        f"(backend {jax.default_backend()})",
        f"- measured: value_and_grad of MiT-{args.variant} + DAFormer head (no PiPa heads), batch {args.batch}, "
        f"{args.size}x{args.size}, float32, train mode; {args.rounds} interleaved rounds after one warm-up call",
        "- shared machine: compare ratios (same rounds), not absolute times. CPU = user + system time of this "
        "process during the call (all threads): less sensitive than wall time to other jobs taking the cores",
        "- grad rel. err = ||g - g_old|| / ||g_old|| over all parameters (float32 rounding; see the tests)",
        "",
        "| config | dwconv_impl | conv_impl | remat | wall s: median (min) | wall ratio to old: median of "
        "per-round ratios (of minima) | CPU s: median (min) | CPU ratio (of minima) | XLA temp memory | temp ratio "
        "| compile s | loss diff | grad rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = runs[n]
        dw, conv, remat, desc = CONFIGS[n]
        ratios = [a / b for a, b in zip(r["times"], base["times"])]
        cpu_ratios = [a / b for a, b in zip(r["cpu"], base["cpu"])]
        lines.append(
            f"| {n} ({desc}) | {dw} | {conv} | {remat} | {statistics.median(r['times']):.2f} ({min(r['times']):.2f}) "
            f"| {statistics.median(ratios):.2f} ({min(r['times']) / min(base['times']):.2f}) "
            f"| {statistics.median(r['cpu']):.2f} ({min(r['cpu']):.2f}) "
            f"| {statistics.median(cpu_ratios):.2f} ({min(r['cpu']) / min(base['cpu']):.2f}) "
            f"| {r['temp'] / 2**30:.2f} GiB | {r['temp'] / base['temp']:.2f} | {r['compile']:.1f} "
            f"| {r['loss_diff']:.1e} | {r['grad_rel_err']:.1e} |")
    lines += ["", "All timed rounds, wall (CPU) s: " + "; ".join(
        f"{n} " + " ".join(f"{t:.2f} ({c:.2f})" for t, c in zip(runs[n]["times"], runs[n]["cpu"])) for n in names), ""]
    write(lines, args.out)


def write(lines, out):
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        mode = "a" if os.path.exists(out) else "w"
        with open(out, mode) as f:
            f.write(("\n" if mode == "a" else "") + text)
        print(f"appended to {out}" if mode == "a" else f"wrote {out}")


if __name__ == "__main__":
    main()
