"""The collectives in a compiled XLA program, read off its HLO text, for auditing how a sharded
step communicates (benchmarks/spatial_hlo.py; tests/test_train_step.py's spatial test).

`collectives(hlo_text)` lists every all-gather, all-reduce, reduce-scatter, all-to-all and
collective-permute with its result shape, the gathered / scattered dimension and the JAX op that
made it. `full_resolution_gathers(records, crop_hw)` picks the all-gathers that rebuild the full
height of a map at stride 1, 2 or 4 of the crop: under spatial partitioning (config.mesh_spatial)
those are the expensive ones (a whole activation copied to every band), as opposed to gathers of
reduced maps (the attention's keys/values at stride 32) or of parameters.
"""
from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_LINE = re.compile(r"=\s+(?P<shape>\(?[a-z]\w*\[[^=]*?)\s+(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\(")
_ARRAY = re.compile(r"([a-z]\w*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    dtype: str
    shape: tuple[int, ...]          # the result (the first array of a tuple result)
    dimension: int | None           # all-gather / reduce-scatter / all-to-all dimension
    op_name: str                    # the JAX op that produced it ('' when XLA did not record one)

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * _DTYPE_BYTES.get(self.dtype, 4)


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of the (post-partitioning) HLO module text, in program order. Async pairs
    (`all-gather-start` / `-done`) count once."""
    out = []
    for line in hlo_text.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        arrays = _ARRAY.findall(m.group("shape"))
        if not arrays:
            continue
        # An async start's result is a tuple (operand, result, ...): the last array is the result.
        dtype, dims = arrays[-1] if m.group("shape").startswith("(") else arrays[0]
        dim = re.search(r"dimensions=\{(\d+)\}", line)
        name = re.search(r'op_name="([^"]*)"', line)
        out.append(Collective(m.group("kind"), dtype, tuple(int(d) for d in dims.split(",") if d),
                              int(dim.group(1)) if dim else None, name.group(1) if name else ""))
    return out


def full_resolution_gathers(records: list[Collective], crop_hw: tuple[int, int],
                            strides: tuple[int, ...] = (1, 2, 4)) -> list[Collective]:
    """All-gathers whose result is a map [..., H/s, W/s, C] of the crop at one of `strides`,
    gathered along its height: a full-resolution activation rebuilt on every device."""
    h, w = crop_hw
    found = []
    for r in records:
        if r.kind != "all-gather" or r.dimension is None or len(r.shape) < 3:
            continue
        d = r.dimension
        if d + 1 < len(r.shape) and any(r.shape[d] == h // s and r.shape[d + 1] == w // s for s in strides):
            found.append(r)
    return found


def summary(records: list[Collective]) -> dict[str, tuple[int, int]]:
    """{kind: (count, total result bytes)}."""
    out = {}
    for r in records:
        n, b = out.get(r.kind, (0, 0))
        out[r.kind] = (n + 1, b + r.bytes)
    return out
