"""What the spatially partitioned train step communicates: the collectives of its compiled program.

  python benchmarks/spatial_hlo.py --out benchmarks/results/spatial_hlo
  python benchmarks/spatial_hlo.py --method pipa --crop 128 --spatial 4 --forms accelerator,cpu

The step of configs/synthetic.py (or --config configs/synthetic_hrda.py; MiT-b0, DAFormer head, the method's terms) is compiled on 8 fake
CPU devices as a ('data', 'spatial') mesh of (8 / k) x k, with batch = 8 / k images per domain
(the released recipe's shape: 2 + 2 images over 2k devices), images, labels and masks split along
their height into k bands (config.mesh_spatial = k). It lists every collective of the optimised
program (pipa_jax.tools.hlo_collectives) and flags the all-gathers that rebuild a map at stride
1, 2 or 4 of the crop at full height on every device: the communication that spatial partitioning
exists to avoid. Forms: 'accelerator' compiles what GPU/TPU run ('auto' there: native depthwise and
1x1 convolutions, dense attention, 'nd' linear layers), 'cpu' what 'auto' gives on CPU (shifted
depthwise taps, matmul 1x1 convolutions, chunked attention, 'flat' linear layers).
XLA's SPMD partitioner is the same pass on every backend, but the GPU/TPU compilers may choose
other layouts and fusions: this audit reads XLA:CPU's partitioned program.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util  # noqa: E402

import jax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from pipa_jax import io as io_lib  # noqa: E402
from pipa_jax import mesh as mesh_lib  # noqa: E402
from pipa_jax import step as step_lib  # noqa: E402
from pipa_jax import train  # noqa: E402
from pipa_jax.data import pipeline  # noqa: E402
from pipa_jax.models import layers  # noqa: E402
from pipa_jax.tools import hlo_collectives  # noqa: E402

FORMS = {"accelerator": layers.ACCELERATOR_FORMS,
         "cpu": dict(dwconv_impl="shift", conv_impl="matmul", attention_impl="chunked", dense_impl="flat")}


def spatial_config(method: str, crop: int, spatial: int, forms: str, devices: int = 8,
                   config: str = "configs/synthetic.py"):
    spec = importlib.util.spec_from_file_location("synthetic_config", os.path.join(ROOT, config))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(f"method={method},tiny")
    c.data.image_size = c.data.crop_size = (crop, crop)
    c.pipa.patch.crop_size = (crop // 2, crop // 2)
    if c.model.segmentor == "hrda":      # HRDA's proportions: a detail crop of half the crop's side
        c.model.hrda.hr_crop_size = c.model.hrda.hr_slide_stride = (crop // 2, crop // 2)
        c.eval.crop_size, c.eval.stride = (crop, crop), (crop // 2, crop // 2)
    c.mesh_shape, c.mesh_spatial = devices, spatial
    c.batch_size = c.data.eval_batch_size = devices // spatial
    c.compilation_cache_dir = ""
    c.model.scan_blocks = "false"
    for k, v in FORMS[forms].items():
        c.model[k] = v
    return c


def compile_step(c):
    """The trainer's jitted step on the config's mesh, compiled for one real batch."""
    mesh = train.make_mesh(c)
    repl, data = NamedSharding(mesh, P()), mesh_lib.batch_sharding(mesh)
    graphdef, tx, state, imnet = train.build_model_and_state(c, mesh)
    fn = step_lib.make_train_step(c, graphdef, tx, imnet[0] if imnet else None)
    jitted = jax.jit(fn, in_shardings=(repl, data, repl), out_shardings=(repl, repl), donate_argnums=0)
    batch = {k: jax.make_array_from_process_local_data(data, v) for k, v in next(pipeline.train_iterator(c)).items()}
    imnet_params = jax.device_put(imnet[1], repl) if imnet else None
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch, imnet_params).compile()
    return compiled, time.perf_counter() - t0


def audit(method: str, crop: int, spatial: int, forms: str, config: str = "configs/synthetic.py") -> dict:
    c = spatial_config(method, crop, spatial, forms, config=config)
    compiled, compile_s = compile_step(c)
    recs = hlo_collectives.collectives(compiled.as_text())
    full = hlo_collectives.full_resolution_gathers(recs, (crop, crop))
    by_op = collections.Counter((r.shape, r.dimension, r.op_name.split("/")[-1] or "(no op name)") for r in full)
    gathers = sorted((r for r in recs if r.kind == "all-gather"), key=lambda r: -r.bytes)
    return {"config": config, "method": method, "crop": crop, "spatial": spatial, "forms": forms, "mesh": dict(train.make_mesh(c).shape),
            "batch_per_domain": c.batch_size, "compile_s": compile_s,
            "summary": {k: list(v) for k, v in hlo_collectives.summary(recs).items()},
            "full_resolution_gathers": [{"shape": list(s), "dimension": d, "op": op, "count": n}
                                        for (s, d, op), n in by_op.most_common()],
            "full_resolution_gather_bytes": sum(r.bytes for r in full),
            "largest_gathers": [{"shape": list(r.shape), "dimension": r.dimension, "op": r.op_name[-120:]}
                                for r in gathers[:8]]}


def markdown(rows, meta) -> str:
    out = [f"# Collectives of the spatially partitioned train step, {meta['date']}", "",
           f"Command: `{meta['command']}`", "", __doc__.split("\n\n")[2].strip(), "",
           "| config:method | crop | mesh (data x spatial) | forms | all-gathers (count, MiB) | all-reduces | "
           "collective-permutes | full-res. gathers (count, MiB) | compile (s) |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    mib = 2 ** 20
    for r in rows:
        s = r["summary"]
        g, a, p = s.get("all-gather", (0, 0)), s.get("all-reduce", (0, 0)), s.get("collective-permute", (0, 0))
        nfull = sum(x["count"] for x in r["full_resolution_gathers"])
        out.append(f"| {os.path.basename(r['config'])}:{r['method']} | {r['crop']} | {r['mesh']['data']} x {r['mesh']['spatial']} | {r['forms']} | "
                   f"{g[0]}, {g[1] / mib:.2f} | {a[0]}, {a[1] / mib:.2f} | {p[0]}, {p[1] / mib:.2f} | "
                   f"{nfull}, {r['full_resolution_gather_bytes'] / mib:.2f} | {r['compile_s']:.0f} |")
    for r in rows:
        out += ["", f"## {r['method']}, {r['forms']} forms: full-resolution all-gathers (result shape per data "
                "shard, gathered dimension, JAX op)", ""]
        if not r["full_resolution_gathers"]:
            out.append("None.")
        for x in r["full_resolution_gathers"]:
            out.append(f"- {x['count']} x f32{x['shape']} along dim {x['dimension']}: {x['op']}")
        out += ["", "Largest all-gathers:", ""]
        out += [f"- {x['shape']} dim {x['dimension']}: {x['op'] or '(no op name: parameters / optimizer)'}"
                for x in r["largest_gathers"]]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/synthetic.py", choices=("configs/synthetic.py",
                                                                          "configs/synthetic_hrda.py"))
    ap.add_argument("--method", default="pipa")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--spatial", type=int, default=4)
    ap.add_argument("--forms", default="accelerator,cpu")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = [audit(args.method, args.crop, args.spatial, f, args.config) for f in args.forms.split(",")]
    meta = {"date": datetime.date.today().isoformat(), "command": "python benchmarks/spatial_hlo.py " + " ".join(sys.argv[1:])}
    text = markdown(rows, meta)
    print(text)
    if args.out:
        io_lib.write_json_atomic(args.out + ".json", {"meta": meta, "rows": rows}, indent=1)
        io_lib.write_text_atomic(args.out + ".md", text)


if __name__ == "__main__":
    main()
