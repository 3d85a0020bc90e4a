"""Procedural street scenes with a GTA5 -> Cityscapes-like domain gap (no files, no downloads).

`SyntheticSource(domain, split, num_examples, height, width, seed)` is a grain random-access data
source: `source[i]` renders example i lazily (numpy only) and returns
`{'image': uint8 [H, W, 3] RGB, 'label': uint8 [H, W] Cityscapes train ids, 'name': str}`.
Every example is a pure function of (seed, domain, split, index); image size changes only the
rendering, not the scene (the geometry is drawn from its own random stream, so a label map
rendered at 2x the size agrees with the small one on ~98 % of pixels). A 512x256 example takes
about 10-20 ms on one (shared) CPU core, a 256x128 one about 5 ms.

Scenes
------
A pinhole camera one unit above a flat ground looks down a straight street. With the horizon at
row `hy`, the vanishing point at column `vx` and the focal length `f = W` pixels, a world point at
lateral offset X, height Y (camera heights) and depth Z projects to

    s = f / Z,    x = vx + X * s,    y = hy + (1 - Y) * s,

so every size is in camera heights and everything shrinks correctly towards the horizon.
Back to front: sky (10); a distant skyline band of building (2) or vegetation (8) on the horizon;
the ground (road 0 between the kerbs, sidewalk 1, an optional terrain 9 verge); two rows of
facade planes parallel to the street on each side (a back row of buildings / trees and a front row
of building, vegetation, wall 3, fence 4 or open terrain segments, each with its own height and
colour); then the objects, painted far to near so nearer ones occlude: cars (13; moving in lanes,
seen from behind, or parked at the kerb, drawn as perspective boxes with a cabin, windows, wheels
and lights), trucks (14), buses (15), a tram (train 16, rare), pedestrians (11), riders (12) on
bicycles (18) or motorcycles (17), parked bicycles, poles (5) carrying traffic signs (7) or traffic
lights (6, sometimes on an arm over the road), and street trees (8). Rare classes are rare: a train
appears in ~2-3 % of images, a motorcycle in ~10 %, buses and trucks in a quarter or so.

Domain gap (see `DOMAIN_GAP` and `describe_domain_gap()`)
--------------------------------------------------------
Both domains share the label space, the camera model, the scene grammar and the class-identity
cues that a segmentation network can transfer: where a class sits (sky above the horizon, road
between the kerbs, facades beside it, objects standing on the ground), its shape (boxes with a
cabin and wheels, upright people with heads and legs, thin poles, round sign plates), and its
texture *structure* (lane markings on the road, paving grid on sidewalks, window grids on
buildings, slats on fences, blotchy foliage, clouds / gradient in the sky). What differs:

* Appearance, not as a global colour transform. Each class gets its own colour change
  (per-class palette shift) and classes move in opposite directions, so no per-channel monotone
  map (colour jitter, histogram matching, mean/std normalisation) can undo it: the road
  brightens while the sidewalk darkens and turns warm; source sky is a saturated blue, target
  sky an overcast near-white (the brightest target class, while the source's brightest is the
  sidewalk); source terrain is a dry, bright yellow-green and source vegetation a vivid green,
  target terrain a dull khaki and target vegetation a dark olive; source cars, people and
  buildings mostly wear bright saturated colours, target ones mostly grey, black, white and
  beige (each domain has a few of the other's: dark clothes in the source, a red or blue jacket
  or car in the target). Textures differ in amplitude and scale (fine crisp asphalt grain vs.
  coarse stains; shiny sky-reflecting windows vs. dark windows; bright high-contrast foliage vs.
  darker, less contrasted foliage). The target is also overcast
  (lower exposure and contrast, cool white balance, desaturated, vignetted), blurred and noisy
  where the source is sunlit, sharpened and clean, and the target has a dark ego-vehicle hood at
  the bottom labelled 255 (ignore), as Cityscapes does; it is the only use of 255.
* Layout statistics: a higher horizon in the source (more sky), wider roads, more open
  countryside, somewhat lower buildings, more and larger cars and heavy vehicles; the target has
  continuous facades, narrower roads with wider sidewalks, about twice the pedestrians and
  riders, many more bicycles, poles, signs and lights, more parked cars and street trees.

Within the target, colour still separates classes nearly as well as within the source, so the
target is learnable; but a colour classifier fitted on source pixels fails on the target, and
matching the target's colour statistics to the source's recovers only a small part of the loss.
tests/test_synthetic.py measures this (pixel accuracy at 256x128, 16 train / 16 val images per
domain; "table" is the Bayes colour-only classifier over 16^3 colour bins):

    classifier          src->src  tgt->tgt  src->tgt  src->hist-matched tgt  src->mean/std tgt
    colour table          0.82      0.66      0.31          0.42                 0.40
    nearest class mean    0.41      0.38      0.17          0.22                 0.16

How hard the gap is was set by training on it (configs/synthetic.py, MiT-b0 from scratch;
benchmarks/results/synthetic_uda.md has the table). What was learnt, in order:
* A first version swapped the brightness order of neighbouring classes (target road lighter
  than its sidewalk, target terrain the colour of source vegetation, blotchy target facades like
  source foliage). A source-only model then labels such a pair the wrong way round on the
  target, its pseudo-labels repeat the swap, and self-training cannot undo it: source-only
  reached 4-8 % target mIoU and DAFormer 12-17 % (seed 0). The pairs now shift in different
  directions without swapping places.
* Self-training repairs appearance errors (road, sidewalk, sky, car, terrain rose by 10-30 IoU
  points each), not layout errors. With source buildings 1.8-6 camera heights tall and target
  ones 3.5-9, source-trained models called the upper storeys of target facades vegetation (in
  the source only trees stand that high) and the pseudo-labels kept it (DAFormer building
  49 % IoU, the oracle 84 %, seed 0); with source buildings 3-8.5 tall DAFormer reached 69 %.
  Pedestrians, riders and heavy vehicles do not transfer at this length, with or without
  target-like colours among the source's (each domain's clothes palette now holds a few of the
  other's) and with 3.5 instead of 1.5 pedestrians per source image (the target has 6):
  self-trained models stay at 0-4 % IoU on them, the oracle reaches 15-40 %.
* Classes that even the oracle does not learn at the default's size and length (traffic
  lights, signs, trains, motorcycles, walls, fences: 0-2 % IoU with target labels) only dilute
  the mean; `omit_classes` leaves them out of the scenes (configs/synthetic.py does).

Every scale and colour lives in `STYLES` (one `DomainStyle` per domain) if the gap needs tuning.
"""
from __future__ import annotations

import dataclasses
import math
import operator

import numpy as np

from pipa_jax.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES

__all__ = [
    "DOMAINS",
    "SPLITS",
    "DOMAIN_GAP",
    "DomainStyle",
    "STYLES",
    "OMITTABLE",
    "SyntheticSource",
    "class_ids",
    "class_frequencies",
    "describe_domain_gap",
    "render_example",
    "without_classes",
]

DOMAINS = ("source", "target")
SPLITS = ("train", "val")
MIN_SIZE = 16  # smallest height / width accepted (pixels)

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON,
 RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(NUM_CLASSES)


_OPEN = 255  # a front facade segment with nothing standing in it (open terrain)


class _IndexOutOfRange(ValueError, IndexError):
    """A ValueError, as the data-source contract asks, that also ends Python's legacy iteration."""


@dataclasses.dataclass(frozen=True)
class DomainStyle:
    """Everything that differs between the two domains. Colours are RGB 0..255 before lighting;
    tuples of colours are palettes an instance draws from; sizes are in camera heights."""

    # --- layout ---------------------------------------------------------------------------
    horizon: tuple[float, float]            # horizon row as a fraction of the height
    road_half_width: tuple[float, float]    # per side, camera heights
    sidewalk_width: tuple[float, float]
    p_no_sidewalk: float                    # a side is a country verge (terrain, no sidewalk)
    p_verge: float                          # a terrain strip between sidewalk and facades
    front_types: tuple[float, ...]          # P(building, vegetation, wall, fence, open)
    back_p_building: float                  # back facade row: building else vegetation
    building_height: tuple[float, float]
    p_far_city: float                       # skyline band is city (else hills / trees)
    n_cars: float                           # Poisson means per image
    n_parked: float
    car_scale: tuple[float, float]
    n_trucks: float
    n_buses: float
    p_train: float
    n_persons: float
    n_riders: float
    p_motorcycle: float                     # a rider's vehicle is a motorcycle
    n_parked_bicycles: float
    n_poles: float
    n_trees: float
    # --- appearance ------------------------------------------------------------------------
    colors: dict                            # class id -> palette (tuple of RGB)
    trunk_colors: tuple                     # tree trunks (labelled vegetation, as Cityscapes)
    window_rgb: tuple
    marking_rgb: tuple
    sky_top: tuple
    sky_horizon: tuple
    clouds: float                           # cloud cover blended into the sky, 0..1
    fine_noise: tuple                       # per-class std of pixel-scale texture (19 values)
    coarse_noise: tuple                     # per-class std of blotchy texture (19 values)
    coarse_cell: float                      # blotch size as a fraction of the height
    instance_jitter: float                  # per-instance relative colour jitter
    exposure: tuple[float, float]
    white_balance: tuple                    # ((r_lo, r_hi), (g_lo, g_hi), (b_lo, b_hi)) gains
    saturation: float
    contrast: float
    side_shading: tuple[float, float]       # brightness of left / right facing surfaces
    blur: int                               # 3x3 box-blur passes
    sharpen: float                          # unsharp-mask amount
    sensor_noise: float                     # std, 0..255
    vignette: float
    hood: tuple[float, float]               # ego-vehicle hood height (fraction of H); 0 = none
    pole_furniture: tuple = (0.45, 0.35, 0.20)  # what a pole carries: P(sign, light, lamp arm)


def _per_class(default: float, **overrides: float) -> tuple:
    values = [default] * NUM_CLASSES
    for name, value in overrides.items():
        values[CLASS_NAMES.index(name.replace("_", " "))] = value
    return tuple(values)


_SOURCE_COLORS = {
    ROAD: ((72, 68, 78), (80, 76, 82)),
    SIDEWALK: ((190, 188, 194), (178, 176, 186)),
    BUILDING: ((196, 170, 132), (170, 112, 84), (212, 196, 162), (150, 140, 124), (186, 150, 118)),
    WALL: ((160, 148, 122), (140, 128, 110)),
    FENCE: ((128, 100, 74), (150, 120, 90)),
    POLE: ((112, 112, 116),),
    LIGHT: ((44, 44, 38),),
    SIGN: ((205, 32, 32), (32, 72, 180), (236, 204, 40)),
    VEGETATION: ((66, 140, 40), (84, 150, 50)),
    TERRAIN: ((178, 166, 96), (190, 172, 110)),
    SKY: ((96, 150, 226),),
    PERSON: ((222, 60, 48), (48, 92, 204), (240, 200, 60), (60, 170, 84), (232, 232, 232),
             (44, 44, 50), (96, 90, 84), (70, 62, 58), (120, 116, 110)),
    RIDER: ((232, 110, 30), (40, 40, 170), (220, 40, 40), (44, 44, 50), (84, 84, 62)),
    CAR: ((206, 30, 30), (30, 64, 186), (232, 232, 232), (240, 190, 30), (30, 142, 62),
          (22, 22, 26)),
    TRUCK: ((214, 214, 204), (206, 126, 40), (60, 110, 60)),
    BUS: ((236, 204, 40), (40, 124, 206)),
    TRAIN: ((206, 62, 40),),
    MOTORCYCLE: ((40, 40, 44), (186, 22, 22)),
    BICYCLE: ((30, 30, 30), (170, 170, 180), (30, 90, 200)),
}

_TARGET_COLORS = {
    ROAD: ((116, 112, 122), (108, 106, 114)),
    SIDEWALK: ((170, 156, 146), (178, 164, 152)),
    BUILDING: ((150, 136, 112), (128, 118, 100), (160, 150, 130), (118, 112, 104), (140, 124, 104)),
    WALL: ((120, 118, 104), (102, 102, 96)),
    FENCE: ((134, 134, 128), (112, 112, 108)),
    POLE: ((78, 78, 74),),
    LIGHT: ((30, 32, 30),),
    SIGN: ((178, 44, 44), (42, 72, 140), (190, 180, 64)),
    VEGETATION: ((60, 86, 36), (70, 94, 44)),
    TERRAIN: ((134, 128, 80), (142, 132, 88)),
    SKY: ((236, 238, 240),),
    PERSON: ((40, 40, 46), (72, 62, 56), (92, 92, 104), (150, 140, 130), (160, 50, 44),
             (50, 80, 150), (200, 60, 50), (60, 110, 190), (210, 180, 70)),
    RIDER: ((40, 40, 46), (84, 84, 62), (120, 40, 40), (50, 80, 150), (220, 110, 40),
            (200, 40, 40)),
    CAR: ((30, 30, 34), (152, 152, 156), (204, 204, 204), (60, 60, 82), (100, 32, 32),
          (40, 60, 140)),
    TRUCK: ((186, 186, 180), (90, 96, 104)),
    BUS: ((164, 172, 62), (200, 200, 196)),
    TRAIN: ((196, 196, 184),),
    MOTORCYCLE: ((30, 30, 30), (70, 70, 80)),
    BICYCLE: ((30, 30, 30), (60, 60, 66)),
}

STYLES = {
    "source": DomainStyle(
        horizon=(0.36, 0.50), road_half_width=(1.5, 3.2), sidewalk_width=(0.8, 2.0),
        p_no_sidewalk=0.3, p_verge=0.5, front_types=(0.50, 0.26, 0.06, 0.04, 0.14),
        back_p_building=0.5, building_height=(3.0, 8.5), p_far_city=0.5,
        n_cars=3.5, n_parked=1.0, car_scale=(1.0, 1.25), n_trucks=0.5, n_buses=0.35,
        p_train=0.02, n_persons=3.5, n_riders=0.8, p_motorcycle=0.45, n_parked_bicycles=0.1,
        n_poles=2.0, n_trees=1.0,
        colors=_SOURCE_COLORS, trunk_colors=((110, 80, 50), (96, 72, 52)),
        window_rgb=(150, 190, 230), marking_rgb=(236, 236, 228),
        sky_top=(60, 120, 220), sky_horizon=(170, 204, 238), clouds=0.55,
        fine_noise=_per_class(4.0, road=7.0, sidewalk=5.0, building=4.0, vegetation=22.0,
                              terrain=12.0, sky=1.5),
        coarse_noise=_per_class(3.0, road=4.0, sidewalk=4.0, building=6.0, vegetation=26.0,
                                terrain=12.0, sky=0.0),
        coarse_cell=0.06, instance_jitter=0.08, exposure=(0.95, 1.2),
        white_balance=((1.0, 1.1), (0.98, 1.03), (0.86, 0.98)), saturation=1.25, contrast=1.12,
        side_shading=(1.15, 0.72), blur=0, sharpen=0.6, sensor_noise=1.5, vignette=0.0,
        hood=(0.0, 0.0),
    ),
    "target": DomainStyle(
        horizon=(0.28, 0.40), road_half_width=(1.2, 2.4), sidewalk_width=(1.4, 2.8),
        p_no_sidewalk=0.08, p_verge=0.25, front_types=(0.74, 0.10, 0.07, 0.05, 0.04),
        back_p_building=0.8, building_height=(3.5, 9.0), p_far_city=0.85,
        n_cars=1.5, n_parked=2.0, car_scale=(0.9, 1.05), n_trucks=0.2, n_buses=0.15,
        p_train=0.03, n_persons=6.0, n_riders=1.2, p_motorcycle=0.12, n_parked_bicycles=1.0,
        n_poles=5.0, n_trees=2.0,
        colors=_TARGET_COLORS, trunk_colors=((62, 54, 46), (70, 64, 56)),
        window_rgb=(40, 44, 48), marking_rgb=(186, 186, 180),
        sky_top=(206, 216, 232), sky_horizon=(234, 236, 240), clouds=0.0,
        fine_noise=_per_class(3.0, road=3.0, sidewalk=4.0, building=3.0, vegetation=18.0,
                              terrain=7.0, sky=2.0),
        coarse_noise=_per_class(5.0, road=7.0, sidewalk=7.0, building=6.0, vegetation=20.0,
                                terrain=14.0, sky=6.0),
        coarse_cell=0.12, instance_jitter=0.06, exposure=(0.82, 1.0),
        white_balance=((0.92, 0.98), (0.98, 1.03), (1.0, 1.08)), saturation=0.8, contrast=0.9,
        side_shading=(0.95, 0.88), blur=1, sharpen=0.0, sensor_noise=5.0, vignette=0.2,
        hood=(0.04, 0.08),
    ),
}

DOMAIN_GAP = {
    "colour": "per-class palette shift in opposite directions: the road brightens, the sidewalk "
              "darkens and warms; sky saturated blue vs overcast near-white (the brightest "
              "target class); terrain dry yellow-green vs dull khaki; vegetation bright vs dark "
              "olive; mostly saturated vs mostly grey/black/white cars, people and buildings; "
              "sky-reflecting vs dark windows",
    "lighting": "source sunlit (warm, higher exposure, saturation and contrast, strongly shaded "
                "facade sides); target overcast (cool, dimmer, desaturated, low contrast, "
                "vignetted)",
    "texture": "source crisp fine grain, high-contrast foliage, clouds; target coarse stains "
               "on the ground, darker and flatter foliage, uniform sky",
    "optics": "source sharpened, little noise; target 3x3 box blur, sensor noise and an "
              "ego-vehicle hood labelled 255 (ignore)",
    "layout": "source: higher horizon (more sky), wider roads, countryside, somewhat lower "
              "buildings, more and larger cars, more trucks and buses; target: continuous "
              "facades, wide sidewalks, twice the pedestrians and riders, many more bicycles, "
              "poles, signs, lights",
    "shared": "camera model, scene grammar, class positions and shapes, texture structure "
              "(lane markings, paving grid, window grid, fence slats, foliage blotches)",
}

# Classes a scene can be drawn without (the ground, facades, vegetation and sky make the street).
OMITTABLE = (WALL, FENCE, POLE, LIGHT, SIGN, PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE,
             BICYCLE)


def class_ids(names) -> frozenset:
    """Train ids of the omittable classes named in `names` (Cityscapes names, e.g. 'traffic
    light'; underscores allowed), with a clear error for anything else."""
    ids = set()
    for name in names:
        key = str(name).strip().lower().replace("_", " ")
        if key not in CLASS_NAMES or CLASS_NAMES.index(key) not in OMITTABLE:
            raise ValueError(
                f"cannot omit class {name!r} from the synthetic scenes; expected any of "
                f"{', '.join(repr(CLASS_NAMES[c]) for c in OMITTABLE)}")
        ids.add(CLASS_NAMES.index(key))
    return frozenset(ids)


def without_classes(style: DomainStyle, omit) -> DomainStyle:
    """`style` with the classes in `omit` (train ids, see OMITTABLE) never drawn: their objects
    are not placed (a rider's two-wheeler becomes the other kind; riders go when both kinds do),
    wall / fence facade segments become the remaining kinds, poles carry only what is left."""
    omit = frozenset(omit)
    if not omit:
        return style
    bad = sorted(omit - set(OMITTABLE))
    if bad:
        raise ValueError(f"cannot omit train ids {bad}; omittable: {sorted(OMITTABLE)}")
    changes = {}
    front = list(style.front_types)           # building, vegetation, wall, fence, open
    for i, cls in ((2, WALL), (3, FENCE)):
        if cls in omit:
            front[i] = 0.0
    changes["front_types"] = tuple(front)
    counts = {PERSON: ("n_persons",), CAR: ("n_cars", "n_parked"), TRUCK: ("n_trucks",),
              BUS: ("n_buses",), TRAIN: ("p_train",), POLE: ("n_poles",),
              BICYCLE: ("n_parked_bicycles",)}
    for cls, fields in counts.items():
        if cls in omit:
            changes.update({f: 0.0 for f in fields})
    if (MOTORCYCLE in omit and BICYCLE in omit) or RIDER in omit:
        changes["n_riders"] = 0.0
    elif MOTORCYCLE in omit:
        changes["p_motorcycle"] = 0.0
    elif BICYCLE in omit:
        changes["p_motorcycle"] = 1.0
    p_sign, p_light, p_lamp = style.pole_furniture
    changes["pole_furniture"] = (0.0 if SIGN in omit else p_sign,
                                 0.0 if LIGHT in omit else p_light, p_lamp)
    return dataclasses.replace(style, **changes)


_NUMERIC_FIELDS = (
    "horizon", "road_half_width", "sidewalk_width", "building_height", "n_cars", "n_parked",
    "car_scale", "n_trucks", "n_buses", "p_train", "n_persons", "n_riders", "n_poles", "n_trees",
    "exposure", "saturation", "contrast", "blur", "sharpen", "sensor_noise", "vignette", "hood",
)


def describe_domain_gap() -> str:
    """A human-readable summary of what differs between the synthetic source and target: the
    qualitative `DOMAIN_GAP` and the numeric `STYLES` parameters side by side."""
    lines = [f"{key}: {value}" for key, value in DOMAIN_GAP.items()]
    lines.append(f"{'parameter':18s} {'source':>16s} {'target':>16s}")
    for name in _NUMERIC_FIELDS:
        values = [getattr(STYLES[d], name) for d in DOMAINS]
        lines.append(f"{name:18s} " + " ".join(f"{str(v):>16s}" for v in values))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Painting primitives. `_Canvas` holds the label map, the linear colour buffer and the camera.
# ------------------------------------------------------------------------------------------
class _Canvas:
    __slots__ = ("label", "color", "h", "w", "hy", "vx", "f")

    def __init__(self, h: int, w: int, hy: float, vx: float):
        self.h, self.w, self.hy, self.vx, self.f = h, w, hy, vx, float(w)
        self.label = np.full((h, w), SKY, dtype=np.uint8)
        # Planar [3, H, W]: broadcasting [H, W] maps over channels then runs along rows,
        # several times faster in numpy than [H, W, 3] with its length-3 inner loop.
        self.color = np.zeros((3, h, w), dtype=np.float32)

    def span(self, lo: float, hi: float, size: int) -> tuple[int, int]:
        return max(0, int(math.floor(lo + 0.5))), min(size, int(math.floor(hi + 0.5)))

    def fill(self, rows, cols, mask, cls: int, rgb) -> None:
        """Paints mask (bool [len(rows), len(cols)] or None for the whole box) with cls / rgb."""
        r0, r1 = rows
        c0, c1 = cols
        if r1 <= r0 or c1 <= c0:
            return
        rgb = np.asarray(rgb, np.float32).reshape(3, 1, 1)
        if mask is None:
            self.label[r0:r1, c0:c1] = cls
            self.color[:, r0:r1, c0:c1] = rgb
        else:
            np.copyto(self.label[r0:r1, c0:c1], np.uint8(cls), where=mask)
            np.copyto(self.color[:, r0:r1, c0:c1], rgb, where=mask)

    def rect(self, x0, x1, y0, y1, z, cls, rgb, min_width: bool = False) -> None:
        """An upright billboard at depth z: lateral x0..x1, heights y0..y1 (world units)."""
        s = self.f / z
        left, right = self.vx + x0 * s, self.vx + x1 * s
        if min_width and right - left < 1.0:
            mid = 0.5 * (left + right)
            left, right = mid - 0.5, mid + 0.5
        cols = self.span(left, right, self.w)
        rows = self.span(self.hy + (1 - y1) * s, self.hy + (1 - y0) * s, self.h)
        self.fill(rows, cols, None, cls, rgb)

    def _box_grid(self, xc, yc, rx, ry):
        rows = self.span(yc - ry, yc + ry + 1, self.h)
        cols = self.span(xc - rx, xc + rx + 1, self.w)
        if rows[1] <= rows[0] or cols[1] <= cols[0]:
            return rows, cols, None, None
        yy = np.arange(rows[0], rows[1], dtype=np.float32)[:, None] + 0.5 - yc
        xx = np.arange(cols[0], cols[1], dtype=np.float32)[None, :] + 0.5 - xc
        return rows, cols, yy, xx

    def ellipse(self, x, y, rx, ry, z, cls, rgb, inner: float = 0.0) -> None:
        """A filled ellipse (a ring if inner > 0) centred at world (x, y), depth z."""
        s = self.f / z
        xc, yc = self.vx + x * s, self.hy + (1 - y) * s
        prx, pry = max(rx * s, 0.5), max(ry * s, 0.5)
        rows, cols, yy, xx = self._box_grid(xc, yc, prx, pry)
        if yy is None:
            return
        r2 = (xx / prx) ** 2 + (yy / pry) ** 2
        mask = r2 <= 1.0
        if inner > 0:
            mask &= r2 >= inner ** 2
        self.fill(rows, cols, mask, cls, rgb)

    def segment(self, xa, ya, xb, yb, thickness, z, cls, rgb) -> None:
        """A thick line between world points (xa, ya) and (xb, yb) at depth z."""
        s = self.f / z
        pa = np.array([self.vx + xa * s, self.hy + (1 - ya) * s])
        pb = np.array([self.vx + xb * s, self.hy + (1 - yb) * s])
        half = max(0.5 * thickness * s, 0.6)
        lo, hi = np.minimum(pa, pb) - half, np.maximum(pa, pb) + half
        rows, cols = self.span(lo[1], hi[1] + 1, self.h), self.span(lo[0], hi[0] + 1, self.w)
        if rows[1] <= rows[0] or cols[1] <= cols[0]:
            return
        yy = np.arange(rows[0], rows[1], dtype=np.float32)[:, None] + 0.5
        xx = np.arange(cols[0], cols[1], dtype=np.float32)[None, :] + 0.5
        d = pb - pa
        t = np.clip(((xx - pa[0]) * d[0] + (yy - pa[1]) * d[1]) / max(d @ d, 1e-6), 0, 1)
        dist2 = (xx - pa[0] - t * d[0]) ** 2 + (yy - pa[1] - t * d[1]) ** 2
        self.fill(rows, cols, dist2 <= half * half, cls, rgb)

    # Faces of an axis-aligned box: lateral x0..x1, depth z0..z1, heights b..t.
    def face_rear(self, x0, x1, z, b, t, cls, rgb) -> None:
        self.rect(x0, x1, b, t, z, cls, rgb)

    def face_side(self, xs, z0, z1, b, t, cls, rgb) -> None:
        """The face in the plane x = xs between depths z0 < z1 (visible when xs != 0)."""
        if abs(xs) < 1e-3:
            return
        xa, xb = self.vx + xs * self.f / z1, self.vx + xs * self.f / z0
        cols = self.span(min(xa, xb), max(xa, xb), self.w)
        if cols[1] <= cols[0]:
            return
        xx = np.arange(cols[0], cols[1], dtype=np.float32) + 0.5
        s = (xx - self.vx) / xs                                  # [C] pixels per unit
        top, bot = self.hy + (1 - t) * s, self.hy + (1 - b) * s
        rows = self.span(top.min(), bot.max(), self.h)
        if rows[1] <= rows[0]:
            return
        yy = np.arange(rows[0], rows[1], dtype=np.float32)[:, None] + 0.5
        self.fill(rows, cols, (yy >= top) & (yy < bot), cls, rgb)

    def face_top(self, x0, x1, z0, z1, t, cls, rgb) -> None:
        """The horizontal face at height t < 1 (seen from above)."""
        if t >= 0.98:
            return
        rows = self.span(self.hy + (1 - t) * self.f / z1, self.hy + (1 - t) * self.f / z0, self.h)
        if rows[1] <= rows[0]:
            return
        yy = np.arange(rows[0], rows[1], dtype=np.float32) + 0.5
        s = (yy - self.hy) / (1 - t)                             # [R]
        left, right = self.vx + x0 * s, self.vx + x1 * s
        cols = self.span(left.min(), right.max(), self.w)
        if cols[1] <= cols[0]:
            return
        xx = np.arange(cols[0], cols[1], dtype=np.float32)[None, :] + 0.5
        self.fill(rows, cols, (xx >= left[:, None]) & (xx < right[:, None]), cls, rgb)


# ------------------------------------------------------------------------------------------
# Scene rendering.
# ------------------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, palette, jitter: float) -> np.ndarray:
    rgb = np.asarray(palette[rng.integers(len(palette))], dtype=np.float32)
    return np.clip(rgb * rng.uniform(1 - jitter, 1 + jitter, size=3), 0, 255).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Bilinearly upsampled Gaussian noise with blobs of about `cell` pixels, std ~1, [H, W]."""
    gh, gw = int(math.ceil(h / cell)) + 2, int(math.ceil(w / cell)) + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    ry = np.arange(h, dtype=np.float32) / cell
    rx = np.arange(w, dtype=np.float32) / cell
    iy, ix = ry.astype(np.int32), rx.astype(np.int32)
    fy, fx = (ry - iy)[:, None], (rx - ix)[None, :]
    rows = grid[iy] * (1 - fy) + grid[iy + 1] * fy                  # [H, gw]
    out = rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx
    return out * 1.6  # bilinear interpolation lowers the std; bring it back to ~1


def _box_blur(img: np.ndarray) -> np.ndarray:
    """3x3 box blur with edge replication over the last two axes of [C, H, W] float32."""
    v = img * np.float32(1 / 9)
    out = v.copy()
    out[:, 1:] += v[:, :-1]
    out[:, :-1] += v[:, 1:]
    out[:, 0] += v[:, 0]
    out[:, -1] += v[:, -1]
    res = out.copy()
    res[:, :, 1:] += out[:, :, :-1]
    res[:, :, :-1] += out[:, :, 1:]
    res[:, :, 0] += out[:, :, 0]
    res[:, :, -1] += out[:, :, -1]
    return res


def _frac(x: np.ndarray) -> np.ndarray:
    """x mod 1 (faster than np.mod for floats)."""
    return x - np.floor(x)


def _uniform_noise(rng: np.random.Generator, shape) -> np.ndarray:
    """Zero-mean, unit-std uniform noise, float32."""
    noise = rng.random(shape, dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.float32(math.sqrt(12.0))
    return noise


@dataclasses.dataclass
class _Street:
    road: tuple[float, float]       # half width, left / right
    sidewalk: tuple[float, float]
    verge: tuple[float, float]
    front: tuple[float, float]      # lateral distance of the front facade plane
    back: tuple[float, float]


def _draw_street(rng: np.random.Generator, style: DomainStyle) -> _Street:
    road = tuple(rng.uniform(*style.road_half_width, size=2))
    sidewalk, verge = [], []
    for _ in range(2):
        if rng.random() < style.p_no_sidewalk:
            sidewalk.append(0.0)
            verge.append(rng.uniform(1.0, 4.0))
        else:
            sidewalk.append(rng.uniform(*style.sidewalk_width))
            verge.append(rng.uniform(0.4, 2.5) if rng.random() < style.p_verge else 0.0)
    front = tuple(r + s + v for r, s, v in zip(road, sidewalk, verge))
    back = tuple(fr + rng.uniform(1.5, 6.0) for fr in front)
    return _Street(road, tuple(sidewalk), tuple(verge), front, back)


def _facade_segments(rng, style: DomainStyle, row: str):
    """Segments along the street for one facade row on one side: (depth bounds, class, height,
    colour, window period along / up, window on), all arrays indexed by segment."""
    bounds = [0.5]
    while bounds[-1] < 400.0:
        bounds.append(bounds[-1] * math.exp(rng.uniform(0.15, 0.5)))
    n = len(bounds) - 1
    if row == "back":
        cls = np.where(rng.random(n) < style.back_p_building, BUILDING, VEGETATION)
    else:
        kinds = np.array([BUILDING, VEGETATION, WALL, FENCE, _OPEN])
        cls = kinds[rng.choice(5, size=n, p=np.asarray(style.front_types) / sum(style.front_types))]
    height = rng.uniform(*style.building_height, size=n)
    height = np.where(cls == VEGETATION, rng.uniform(1.5, 4.0, size=n), height)
    height = np.where(cls == WALL, rng.uniform(0.5, 1.4, size=n), height)
    height = np.where(cls == FENCE, rng.uniform(0.6, 1.3, size=n), height)
    if row == "back":
        height = height * 1.3
    choice = rng.random(n)
    jitter = rng.uniform(1 - 1.5 * style.instance_jitter, 1 + 1.5 * style.instance_jitter, (n, 3))
    colors = np.empty((n, 3), np.float32)
    for c in np.unique(cls):
        palette = np.asarray(style.colors[c if c != _OPEN else TERRAIN], np.float32)
        sel = cls == c
        colors[sel] = palette[(choice[sel] * len(palette)).astype(int)]
    colors = np.clip(colors * jitter, 0, 255).astype(np.float32)
    window_period = np.stack([rng.uniform(1.2, 2.4, size=n), rng.uniform(1.6, 2.2, size=n)], 1)
    windows = rng.random(n) < 0.8
    phase = rng.uniform(0, 2 * math.pi, size=(n, 2))
    return np.asarray(bounds), cls, height, colors, window_period, windows, phase


def _paint_facades(cv: _Canvas, style: DomainStyle, segments, plane: float, side: int) -> None:
    """Paints one facade row (a vertical plane at lateral distance `plane`) on one side."""
    bounds, cls, height, colors, period, windows, phase = segments
    if side < 0:
        c0, c1 = 0, min(cv.w, int(math.floor(cv.vx)))
    else:
        c0, c1 = max(0, int(math.ceil(cv.vx))), cv.w
    if c1 <= c0:
        return
    xx = np.arange(c0, c1, dtype=np.float32) + 0.5
    s = np.maximum(np.abs(xx - cv.vx) / plane, 1e-3)           # [C] pixels per unit
    z = cv.f / s                                                # [C] depth along the street
    idx = np.clip(np.searchsorted(bounds, z) - 1, 0, len(cls) - 1)
    seg_cls, seg_h = cls[idx], height[idx]
    wobble = np.where(
        seg_cls == VEGETATION,
        1 + 0.12 * np.sin(z * 2.1 + phase[idx, 0]) + 0.08 * np.sin(z * 5.3 + phase[idx, 1]),
        1.0,
    )
    bot = cv.hy + s
    top = np.where(seg_cls == _OPEN, bot, bot - seg_h * wobble * s)
    r0 = max(0, int(math.floor(top.min())))
    r1 = min(cv.h, int(math.ceil(bot.max())) + 1)
    if r1 <= r0:
        return
    yy = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
    mask = (yy >= top) & (yy < bot)
    lab = cv.label[r0:r1, c0:c1]
    col = cv.color[:, r0:r1, c0:c1]
    np.copyto(lab, seg_cls.astype(np.uint8)[None], where=mask)
    shade = style.side_shading[0] if side < 0 else style.side_shading[1]
    np.copyto(col, (colors[idx] * shade).T.astype(np.float32)[:, None, :], where=mask)
    # Texture structure shared by both domains: window grids on buildings, slats on fences,
    # courses on walls. Column conditions first, then the per-pixel ones on those columns only.
    u = _frac(z / period[idx, 0])
    win_cols = np.nonzero((seg_cls == BUILDING) & windows[idx] & (u > 0.25) & (u < 0.75)
                          & (s > 1.5))[0]
    if len(win_cols):
        sub_s, sub_bot = s[win_cols], bot[win_cols]
        up = (sub_bot - yy) / sub_s                               # height above ground
        v = _frac(up / period[idx[win_cols], 1])
        win = (mask[:, win_cols] & (v > 0.35) & (v < 0.8) & (up > 1.2)
               & (up < seg_h[win_cols] - 0.4))
        sub = col[:, :, win_cols]
        glass = np.asarray(style.window_rgb, np.float32) * np.float32(0.8 + 0.2 * shade)
        np.copyto(sub, glass[:, None, None], where=win)
        col[:, :, win_cols] = sub
    slat_cols = np.nonzero(((seg_cls == FENCE) & (_frac(z / 0.35) < 0.45))
                           | ((seg_cls == WALL) & (s > 2.0)))[0]
    if len(slat_cols):
        up = (bot[slat_cols] - yy) / s[slat_cols]
        fence = seg_cls[slat_cols] == FENCE
        dark = mask[:, slat_cols] & np.where(fence, up < seg_h[slat_cols] * 0.9,
                                             _frac(up / 0.25) < 0.12)
        factor = np.where(fence, np.float32(0.6), np.float32(0.85))
        col[:, :, slat_cols] *= np.where(dark, factor, np.float32(1.0))


def _paint_ground(cv: _Canvas, style: DomainStyle, rng, street: _Street, colors) -> None:
    """Labels and colours every pixel below the horizon by its lateral world position."""
    r0 = max(0, int(math.floor(cv.hy)) + 1)
    if r0 >= cv.h:
        return
    yy = np.arange(r0, cv.h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(cv.w, dtype=np.float32)[None, :] + 0.5
    s = yy - cv.hy                                               # [R, 1] pixels per unit
    x_world = (xx - cv.vx) / s                                   # [R, W] lateral position
    z_world = cv.f / s                                           # [R, 1] depth
    road_l, road_r = street.road
    # Lateral thresholds per side -> class via a small lookup on the signed position.
    lab = np.full(x_world.shape, TERRAIN, np.uint8)
    walk_l = road_l + street.sidewalk[0] if street.sidewalk[0] > 0 else road_l
    walk_r = road_r + street.sidewalk[1] if street.sidewalk[1] > 0 else road_r
    lab[(x_world >= -walk_l) & (x_world < walk_r)] = SIDEWALK
    is_road = (x_world >= -road_l) & (x_world < road_r)
    lab[is_road] = ROAD
    cv.label[r0:] = lab
    col = cv.color[:, r0:]
    col[:] = np.take(colors.T, lab, axis=1)
    # Road markings (lane lines, edge lines, an occasional zebra crossing), sidewalk paving grid
    # and kerb: the same structure in both domains, different colours.
    lane = rng.uniform(2.0, 2.6)
    dash = _frac(z_world / rng.uniform(4.0, 7.0)) < 0.5         # [R, 1]
    offset = _frac((x_world + road_l) / lane) * lane
    lines = (np.minimum(offset, lane - offset) < 0.06) & dash & (x_world > -road_l + 0.5) & (
        x_world < road_r - 0.5)
    edge = ((x_world < -road_l + 0.2) & (x_world > -road_l + 0.1)) | (
        (x_world > road_r - 0.2) & (x_world < road_r - 0.1))
    mark = lines | edge
    if rng.random() < 0.3:
        z0 = rng.uniform(6.0, 25.0)
        band = (z_world > z0) & (z_world < z0 + 2.5)             # [R, 1]
        mark |= band & (_frac(x_world / 0.9) < 0.5)
    mark &= is_road
    np.copyto(col, np.asarray(style.marking_rgb, np.float32)[:, None, None], where=mark)
    walk = lab == SIDEWALK
    tile = rng.uniform(0.5, 0.9)
    grid = walk & ((_frac(x_world / tile) < 0.1) | (_frac(z_world / tile) < 0.1))
    kerb = walk & (((x_world > -road_l - 0.15) & (x_world < -road_l))
                   | ((x_world >= road_r) & (x_world < road_r + 0.15)))
    col *= 1.0 - np.float32(0.18) * grid + np.float32(0.25) * kerb


def _paint_sky(cv: _Canvas, style: DomainStyle, rng) -> None:
    """A vertical gradient (and clouds) above the horizon; the ground covers everything below."""
    n = min(cv.h, int(math.floor(cv.hy)) + 1)
    t = np.clip(np.arange(n, dtype=np.float32) / max(cv.hy, 1.0), 0, 1)[:, None]
    top = np.asarray(style.sky_top, np.float32)[:, None, None]
    hor = np.asarray(style.sky_horizon, np.float32)[:, None, None]
    sky = top * (1 - t) + hor * t                                 # [3, n, 1]
    if style.clouds > 0:
        cloud = _smooth_noise(rng, n, cv.w, cv.h * 0.12) + 0.5 * _smooth_noise(
            rng, n, cv.w, cv.h * 0.04)
        amount = np.clip((cloud - 1.0 + style.clouds) * 0.8, 0, 1)
        sky = sky * (1 - amount) + np.float32(240) * amount
    cv.color[:, :n] = sky


def _paint_skyline(cv: _Canvas, style: DomainStyle, rng, colors) -> None:
    """A band of distant city or hills on the horizon (seen where the facades end)."""
    city = rng.random() < style.p_far_city
    n = 24
    edges = np.sort(rng.uniform(0, cv.w, n))
    if city:
        heights = rng.uniform(0.02, 0.1, n + 1) * cv.h
    else:
        heights = rng.uniform(0.02, 0.05, n + 1) * cv.h
    xx = np.arange(cv.w) + 0.5
    h = heights[np.searchsorted(edges, xx)]
    if not city:
        h = h * (1 + 0.3 * np.sin(xx / cv.w * 40 + rng.uniform(0, 6)))
    top = cv.hy - h
    r0, r1 = max(0, int(math.floor(top.min()))), min(cv.h, int(math.ceil(cv.hy)) + 1)
    if r1 <= r0:
        return
    yy = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
    mask = yy >= top
    cls = BUILDING if city else VEGETATION
    np.copyto(cv.label[r0:r1], np.uint8(cls), where=mask)
    col = cv.color[:, r0:r1]
    haze = 0.55 * colors[cls][:, None, None] + 0.45 * col         # aerial perspective
    np.copyto(col, haze, where=mask)


# --- objects --------------------------------------------------------------------------------
def _vehicle(cv: _Canvas, style, rng, kind: int, x0, x1, z0, length, height, parked=False):
    """A vehicle as perspective boxes: body, cabin (cars), windows, wheels, lights."""
    z1 = z0 + length
    rgb = _pick(rng, style.colors[kind], style.instance_jitter)
    dark = np.float32([22, 22, 24])
    win = np.asarray(style.window_rgb, np.float32) * 0.7
    side_x = x1 if x1 < 0 else (x0 if x0 > 0 else None)
    shade_side = style.side_shading[0] if (side_x is not None and side_x < 0) else (
        style.side_shading[1])
    width = x1 - x0
    # A soft shadow on the ground, painted before the body.
    s0 = cv.f / z0
    cx, cy = cv.vx + 0.5 * (x0 + x1) * s0, cv.hy + s0
    rows, cols, yy, xx = cv._box_grid(cx, cy, 0.65 * width * s0, 0.12 * s0)
    if yy is not None:
        m = (xx / max(0.65 * width * s0, 0.5)) ** 2 + (yy / max(0.12 * s0, 0.5)) ** 2 <= 1
        cv.color[:, rows[0]:rows[1], cols[0]:cols[1]] *= np.where(m, np.float32(0.55),
                                                                   np.float32(1.0))
    if kind == CAR:
        body = 0.58 * height
        cv.face_top(x0, x1, z0, z1, body, kind, rgb * 1.1)
        if side_x is not None:
            cv.face_side(side_x, z0, z1, 0.12, body, kind, rgb * shade_side)
        cv.face_rear(x0, x1, z0, 0.12, body, kind, rgb)
        # cabin
        cx0, cx1 = x0 + 0.1 * width, x1 - 0.1 * width
        cz0, cz1 = z0 + 0.28 * length, z1 - 0.2 * length
        cside = cx1 if cx1 < 0 else (cx0 if cx0 > 0 else None)
        cv.face_top(cx0, cx1, cz0, cz1, height, kind, rgb * 1.1)
        if cside is not None:
            cv.face_side(cside, cz0, cz1, body, height, kind, rgb * shade_side)
            cv.face_side(cside, cz0 + 0.05 * length, cz1 - 0.05 * length, body + 0.05,
                         height - 0.06, kind, win)
        cv.face_rear(cx0, cx1, cz0, body, height, kind, rgb)
        cv.face_rear(cx0 + 0.06, cx1 - 0.06, cz0, body + 0.04, height - 0.06, kind, win)
        # wheels and lights
        if side_x is not None:
            for zc in (z0 + 0.18 * length, z1 - 0.18 * length):
                cv.face_side(side_x, zc - 0.3, zc + 0.3, 0.0, 0.42, kind, dark)
        cv.face_rear(x0 + 0.05, x0 + 0.28, z0, 0.0, 0.2, kind, dark)
        cv.face_rear(x1 - 0.28, x1 - 0.05, z0, 0.0, 0.2, kind, dark)
        lamp = np.float32([210, 30, 30]) if not parked or rng.random() < 0.5 else np.float32(
            [120, 30, 30])
        cv.face_rear(x0 + 0.04, x0 + 0.24, z0, body - 0.18, body - 0.06, kind, lamp)
        cv.face_rear(x1 - 0.24, x1 - 0.04, z0, body - 0.18, body - 0.06, kind, lamp)
        cv.face_rear(x0 + 0.42 * width, x1 - 0.42 * width, z0, 0.2, 0.3, kind,
                     np.float32([220, 220, 210]))
        return
    # Trucks, buses, trams: one tall box with a band of windows.
    cv.face_top(x0, x1, z0, z1, height, kind, rgb * 1.1)
    if side_x is not None:
        cv.face_side(side_x, z0, z1, 0.15, height, kind, rgb * shade_side)
    cv.face_rear(x0, x1, z0, 0.15, height, kind, rgb)
    if kind == TRUCK:
        stripe = np.clip(rgb * 0.6, 0, 255)
        cv.face_rear(x0 + 0.1, x1 - 0.1, z0, 0.5, height - 0.1, kind, stripe)
        if side_x is not None:
            cv.face_side(side_x, z0 + 0.3, z1 - 0.3, 0.5, height - 0.1, kind, stripe * shade_side)
    else:
        if side_x is not None:
            cv.face_side(side_x, z0 + 0.4, z1 - 0.4, height * 0.5, height * 0.85, kind, win)
        cv.face_rear(x0 + 0.15, x1 - 0.15, z0, height * 0.5, height * 0.85, kind, win)
    if side_x is not None:
        for zc in (z0 + 0.12 * length, z1 - 0.12 * length):
            cv.face_side(side_x, zc - 0.35, zc + 0.35, 0.0, 0.48, kind, dark)
    cv.face_rear(x0 + 0.05, x0 + 0.3, z0, 0.0, 0.28, kind, dark)
    cv.face_rear(x1 - 0.3, x1 - 0.05, z0, 0.0, 0.28, kind, dark)


def _person(cv: _Canvas, style, rng, cls: int, x, z, base=0.0, scale=1.0, seated=False):
    h = rng.uniform(1.05, 1.25) * scale
    w = 0.34 * scale
    skin = np.float32([214, 170, 140]) if rng.random() < 0.7 else np.float32([120, 84, 60])
    top = _pick(rng, style.colors[cls], style.instance_jitter * 2)
    legs = _pick(rng, style.colors[cls], style.instance_jitter * 2) * 0.7
    if not seated:
        stride = rng.uniform(-0.08, 0.08)
        cv.segment(x - 0.08 + stride, base + 0.48 * h, x - 0.1 - stride, base + 0.02, 0.12, z, cls,
                   legs)
        cv.segment(x + 0.08 - stride, base + 0.48 * h, x + 0.1 + stride, base + 0.02, 0.12, z, cls,
                   legs)
        torso0 = base + 0.46 * h
    else:
        torso0 = base
    cv.rect(x - w / 2, x + w / 2, torso0, base + 0.84 * h, z, cls, top)
    cv.segment(x - w / 2, base + 0.82 * h, x - w / 2 - 0.06, base + 0.5 * h, 0.08, z, cls, top)
    cv.segment(x + w / 2, base + 0.82 * h, x + w / 2 + 0.06, base + 0.5 * h, 0.08, z, cls, top)
    cv.ellipse(x, base + 0.92 * h, 0.085 * scale, 0.1 * scale, z, cls, skin)
    if cls == RIDER:  # helmet
        cv.ellipse(x, base + 0.96 * h, 0.095 * scale, 0.06 * scale, z, cls, top * 0.8)


def _two_wheeler(cv: _Canvas, style, rng, kind: int, x, z, rider: bool, side_view: bool):
    rgb = _pick(rng, style.colors[kind], style.instance_jitter)
    tyre = np.float32([24, 24, 24])
    r = 0.24 if kind == BICYCLE else 0.27
    if side_view:
        gap = 0.72 if kind == BICYCLE else 0.8
        xa, xb = x - gap / 2, x + gap / 2
        if kind == BICYCLE:
            for xc in (xa, xb):
                cv.ellipse(xc, r, r, r, z, kind, tyre, inner=0.75)
            cv.segment(xa, r, x, r, 0.05, z, kind, rgb)
            cv.segment(x, r, x - 0.1, 2.3 * r, 0.05, z, kind, rgb)
            cv.segment(xa, r, x - 0.1, 2.3 * r, 0.05, z, kind, rgb)
            cv.segment(x - 0.1, 2.3 * r, xb - 0.08, 2.3 * r, 0.05, z, kind, rgb)
            cv.segment(xb, r, xb - 0.08, 2.6 * r, 0.05, z, kind, rgb)
            cv.segment(x, r, xb - 0.08, 2.3 * r, 0.05, z, kind, rgb)
        else:
            for xc in (xa, xb):
                cv.ellipse(xc, r, r, r, z, kind, tyre)
            cv.ellipse(x, 2.0 * r, 0.42, 0.17, z, kind, rgb)
            cv.segment(xb, r, xb - 0.1, 2.9 * r, 0.07, z, kind, rgb * 0.6)
        seat_y, seat_x = (2.4 * r if kind == BICYCLE else 2.3 * r), x - 0.1
    else:
        cv.rect(x - 0.04, x + 0.04, 0.0, 2 * r, z, kind, tyre)
        if kind == MOTORCYCLE:
            cv.rect(x - 0.2, x + 0.2, 0.35, 0.7, z, kind, rgb)
            cv.rect(x - 0.12, x - 0.05, 0.5, 0.58, z, kind, np.float32([200, 30, 30]))
        cv.segment(x - 0.28, 2.8 * r, x + 0.28, 2.8 * r, 0.05, z, kind, rgb)
        seat_y, seat_x = 2.4 * r, x
    if rider:
        _person(cv, style, rng, RIDER, seat_x, z, base=seat_y, scale=0.95, seated=True)
        legs = _pick(rng, style.colors[RIDER], 0.1) * 0.6
        if side_view:  # legs down to the pedals
            cv.segment(seat_x, seat_y + 0.05, x + 0.05, r * 0.6, 0.1, z, RIDER, legs)
        else:          # seen from behind: a leg on each side of the wheel
            for sx in (-1, 1):
                cv.segment(x + sx * 0.12, seat_y + 0.05, x + sx * 0.14, r * 0.5, 0.1, z, RIDER,
                           legs)


def _pole(cv: _Canvas, style, rng, x, z, road_side: float):
    height = rng.uniform(3.0, 5.0)
    grey = _pick(rng, style.colors[POLE], style.instance_jitter)
    cv.rect(x - 0.05, x + 0.05, 0.0, height, z, POLE, grey, min_width=True)
    kind = rng.random()
    p_sign, p_light, _ = style.pole_furniture
    if kind < p_sign:   # a traffic sign at 2-2.8 units
        y = rng.uniform(1.8, 2.6)
        rgb = _pick(rng, style.colors[SIGN], style.instance_jitter)
        shape = rng.integers(3)
        if shape == 0:
            cv.ellipse(x, y, 0.24, 0.24, z, SIGN, rgb)
            cv.ellipse(x, y, 0.17, 0.17, z, SIGN, np.float32([235, 235, 235]) * 0.9)
        elif shape == 1:
            cv.rect(x - 0.25, x + 0.25, y - 0.2, y + 0.2, z, SIGN, rgb)
        else:
            for i in range(4):
                cv.rect(x - 0.26 + 0.065 * i, x + 0.26 - 0.065 * i, y - 0.2 + 0.1 * i,
                        y - 0.1 + 0.1 * i, z, SIGN, rgb)
    elif kind < p_sign + p_light:  # a traffic light on the pole or on an arm over the road
        housing = _pick(rng, style.colors[LIGHT], 0.05)
        lx, ly = x, height - 0.7
        if rng.random() < 0.35:
            lx = x + road_side * rng.uniform(1.0, 2.5)
            cv.segment(x, height - 0.1, lx, height - 0.1, 0.08, z, POLE, grey)
            ly = height - 0.9
        cv.rect(lx - 0.13, lx + 0.13, ly, ly + 0.72, z, LIGHT, housing)
        lit = rng.integers(3)
        lamps = (np.float32([230, 40, 30]), np.float32([240, 170, 20]), np.float32([40, 220, 90]))
        for i in range(3):
            rgb = lamps[i] if i == lit else housing * 1.6
            cv.ellipse(lx, ly + 0.6 - 0.23 * i, 0.07, 0.07, z, LIGHT, rgb)
    else:             # a street lamp: an arm only
        arm = x + road_side * 0.8
        cv.segment(x, height, arm, height - 0.05, 0.07, z, POLE, grey)


def _tree(cv: _Canvas, style, rng, x, z):
    green = _pick(rng, style.colors[VEGETATION], style.instance_jitter * 2)
    trunk_h = rng.uniform(1.5, 2.5)
    bark = _pick(rng, style.trunk_colors, style.instance_jitter)
    cv.rect(x - 0.09, x + 0.09, 0.0, trunk_h + 0.5, z, VEGETATION, bark, min_width=True)
    r = rng.uniform(0.9, 1.6)
    for _ in range(4):
        dx, dy = rng.uniform(-0.5, 0.5) * r, rng.uniform(-0.3, 0.4) * r
        k = rng.uniform(0.6, 0.9)
        cv.ellipse(x + dx, trunk_h + r + dy, r * k, r * k * 0.9, z, VEGETATION,
                   green * rng.uniform(0.85, 1.1))


def _place_objects(cv: _Canvas, style: DomainStyle, rng, street: _Street) -> None:
    z_near = cv.f / max(cv.h - cv.hy, 1.0) * 0.8                # the closest visible depth
    z_far = 70.0
    road_l, road_r = street.road
    objects = []  # (depth, painter)

    def depth(lo=None):
        return math.exp(rng.uniform(math.log(lo or z_near), math.log(z_far)))

    # moving vehicles in lanes, seen from behind
    lane = 2.2
    centres = np.arange(-road_l + lane / 2, road_r - 0.6, lane)
    if len(centres) == 0:
        centres = np.array([0.0])
    occupied = []
    plan = [CAR] * rng.poisson(style.n_cars) + [TRUCK] * rng.poisson(style.n_trucks)
    plan += [BUS] * rng.poisson(style.n_buses) + ([TRAIN] if rng.random() < style.p_train else [])
    for kind in plan:
        for _ in range(6):
            if kind == TRAIN:
                xc = centres[len(centres) // 2]
            else:
                xc = rng.choice(centres) + rng.uniform(-0.25, 0.25)
            z0 = depth(z_near * (1.2 if kind == CAR else 2.0))
            if kind == CAR:
                scale = rng.uniform(*style.car_scale)
                width, length, height = 1.3 * scale, 3.1 * scale, rng.uniform(0.95, 1.15) * scale
            elif kind == TRUCK:
                width, length, height = 1.7, rng.uniform(4.5, 7.0), rng.uniform(2.0, 2.6)
            elif kind == BUS:
                width, length, height = 1.75, rng.uniform(7.0, 9.0), rng.uniform(2.1, 2.3)
            else:
                width, length, height = 1.8, rng.uniform(14.0, 20.0), 2.4
            if all(abs(xc - ox) > 1.6 or z0 + length < oz0 or z0 > oz1
                   for ox, oz0, oz1 in occupied):
                occupied.append((xc, z0 - 1.0, z0 + length + 1.0))
                objects.append((z0, lambda k=kind, a=xc - width / 2, b=xc + width / 2, z=z0,
                                ln=length, ht=height: _vehicle(cv, style, rng, k, a, b, z, ln, ht)))
                break
    # parked cars along the kerbs, seen from the side and back
    for _ in range(rng.poisson(style.n_parked)):
        side = -1 if rng.random() < 0.5 else 1
        kerb = road_l if side < 0 else road_r
        scale = rng.uniform(*style.car_scale)
        width, length = 1.3 * scale, 3.1 * scale
        a = side * (kerb - 0.15) - (0 if side < 0 else width)
        z0 = depth(z_near * 1.1)
        if all(abs(a + width / 2 - ox) > 1.6 or z0 + length < oz0 or z0 > oz1
               for ox, oz0, oz1 in occupied):
            occupied.append((a + width / 2, z0 - 0.5, z0 + length + 0.5))
            ht = rng.uniform(0.95, 1.15) * scale
            objects.append((z0, lambda a=a, z=z0, ln=length, ht=ht, wd=width:
                            _vehicle(cv, style, rng, CAR, a, a + wd, z, ln, ht, parked=True)))

    def sidewalk_x(margin=0.25):
        side = -1 if rng.random() < 0.5 else 1
        i = 0 if side < 0 else 1
        lo = street.road[i] + margin
        hi = max(lo + 0.1, street.road[i] + street.sidewalk[i] + street.verge[i] - margin)
        return side, side * rng.uniform(lo, hi)

    for _ in range(rng.poisson(style.n_persons)):
        if rng.random() < 0.15:  # crossing the road
            x = rng.uniform(-road_l, road_r)
        else:
            _, x = sidewalk_x()
        z = depth(z_near * 1.5)
        objects.append((z, lambda x=x, z=z: _person(cv, style, rng, PERSON, x, z)))
    for _ in range(rng.poisson(style.n_riders)):
        kind = MOTORCYCLE if rng.random() < style.p_motorcycle else BICYCLE
        side = -1 if rng.random() < 0.5 else 1
        x = side * (street.road[0 if side < 0 else 1] - rng.uniform(0.5, 1.2))
        z = depth(z_near * 1.5)
        side_view = rng.random() < 0.5
        objects.append((z, lambda k=kind, x=x, z=z, sv=side_view:
                        _two_wheeler(cv, style, rng, k, x, z, True, sv)))
    for _ in range(rng.poisson(style.n_parked_bicycles)):
        _, x = sidewalk_x()
        z = depth()
        objects.append((z, lambda x=x, z=z:
                        _two_wheeler(cv, style, rng, BICYCLE, x, z, False, True)))
    for _ in range(rng.poisson(style.n_poles)):
        side = -1 if rng.random() < 0.5 else 1
        i = 0 if side < 0 else 1
        at_kerb = rng.random() < 0.7
        x = side * (street.road[i] + 0.3 if at_kerb else street.front[i] - 0.3)
        z = depth()
        objects.append((z, lambda x=x, z=z, sd=-side: _pole(cv, style, rng, x, z, sd)))
    for _ in range(rng.poisson(style.n_trees)):
        _, x = sidewalk_x(0.5)
        z = depth()
        objects.append((z, lambda x=x, z=z: _tree(cv, style, rng, x, z)))
    objects.sort(key=lambda item: -item[0])   # far to near
    for _, paint in objects:
        paint()


def render_example(seed: int, domain: str, split: str, index: int, height: int,
                   width: int, omit=()) -> tuple[np.ndarray, np.ndarray]:
    """Renders one example: (image uint8 [H, W, 3] RGB, label uint8 [H, W] train ids), without
    the classes in `omit` (train ids, see `without_classes`)."""
    style = without_classes(STYLES[domain], omit)
    entropy = [int(seed), DOMAINS.index(domain), SPLITS.index(split), int(index)]
    geo_seq, tex_seq = np.random.SeedSequence(entropy).spawn(2)
    rng = np.random.default_rng(geo_seq)   # scene geometry and colours: independent of H, W
    tex = np.random.default_rng(tex_seq)   # pixel noise: depends on H, W
    hy = rng.uniform(*style.horizon) * height
    vx = (0.5 + rng.uniform(-0.12, 0.12)) * width
    cv = _Canvas(height, width, hy, vx)
    colors = np.stack([_pick(rng, style.colors[c], style.instance_jitter)
                       for c in range(NUM_CLASSES)])
    street = _draw_street(rng, style)
    segments = {(row, side): _facade_segments(rng, style, row)
                for row in ("back", "front") for side in (-1, 1)}

    _paint_sky(cv, style, tex)
    _paint_skyline(cv, style, rng, colors)
    _paint_ground(cv, style, rng, street, colors)
    for row, planes in (("back", street.back), ("front", street.front)):
        for side, plane in zip((-1, 1), planes):
            _paint_facades(cv, style, segments[(row, side)], plane, side)
    _place_objects(cv, style, rng, street)

    # Per-class texture: fine grain and blotches with domain-specific amplitudes. Uniform noise
    # (scaled to unit std) is several times cheaper to draw than Gaussian noise.
    label = cv.label
    fine = np.take(np.asarray(style.fine_noise, np.float32), label)
    coarse = np.take(np.asarray(style.coarse_noise, np.float32), label)
    grain = _uniform_noise(tex, (height, width))
    blotch = _smooth_noise(tex, height, width, max(2.0, style.coarse_cell * height))
    texture = fine * grain + coarse * blotch
    # Lighting and camera as one affine colour map: white balance x exposure, then saturation
    # about the grey value, then contrast about mid-grey.
    gains = np.float64([rng.uniform(*wb) for wb in style.white_balance]) * rng.uniform(
        *style.exposure)
    sat = style.saturation * np.eye(3) + (1 - style.saturation) / 3.0
    matrix = style.contrast * sat * gains[None, :]
    offset = 128.0 * (1 - style.contrast)
    if style.vignette > 0:
        yy = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height - 0.5
        xx = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width - 0.5
        light = 1.0 - style.vignette * 2.0 * (xx * xx + yy * yy)
    else:
        light = None
    src = cv.color
    src += texture
    img = np.empty((3, height, width), np.float32)
    for c in range(3):
        out = img[c]
        np.multiply(src[0], np.float32(matrix[c, 0]), out=out)
        out += src[1] * np.float32(matrix[c, 1])
        out += src[2] * np.float32(matrix[c, 2])
        out += np.float32(offset)
        if light is not None:
            out *= light
    for _ in range(style.blur):
        img = _box_blur(img)
    if style.sharpen > 0:
        img += np.float32(style.sharpen) * (img - _box_blur(img))
    if style.hood[1] > 0:  # the ego vehicle's bonnet, ignored like Cityscapes' ego vehicle
        depth_frac = rng.uniform(*style.hood)
        xx = (np.arange(width, dtype=np.float32) + 0.5) / width - 0.5
        top = height * (1 - depth_frac * (1 - 1.6 * xx * xx))     # [W]
        r0 = max(0, int(math.floor(top.min())))
        yy = np.arange(r0, height, dtype=np.float32)[:, None] + 0.5
        hood = yy >= top
        shade = np.clip(30 + 60 * (1 - (yy - top) / max(depth_frac * height, 1.0)), 20, 90)
        np.copyto(label[r0:], np.uint8(IGNORE_INDEX), where=hood)
        tint = np.float32([1.0, 1.0, 1.05])[:, None, None]
        np.copyto(img[:, r0:], (shade * tint).astype(np.float32), where=hood)
    if style.sensor_noise > 0:
        img += np.float32(style.sensor_noise) * _uniform_noise(tex, (3, height, width))
    img += np.float32(0.5)
    np.clip(img, 0, 255, out=img)
    image = np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0))
    return image, label


class SyntheticSource:
    """Random-access data source (grain protocol) of procedural street scenes.

    Args:
      domain: 'source' (GTA5-like) or 'target' (Cityscapes-like).
      split: 'train' or 'val' (disjoint random streams).
      num_examples: number of examples, >= 1.
      height, width: image size in pixels, each >= 16.
      seed: non-negative integer; with (domain, split, index) it fixes every example.
      omit_classes: Cityscapes class names never drawn (any of `OMITTABLE`, e.g.
        ('traffic light', 'train')); their train ids then never occur in the labels.

    `source[i]` returns {'image': uint8 [H, W, 3] RGB, 'label': uint8 [H, W] train ids
    (0..18, 255 only on the target's ego-vehicle hood), 'name': str}. Instances hold only a few
    scalars, so they pickle cheaply into grain worker processes.
    """

    def __init__(self, domain: str, split: str, num_examples: int, height: int, width: int,
                 seed: int = 0, omit_classes=()):
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.domain, self.split = domain, split
        self.num_examples = _check_int("num_examples", num_examples, 1)
        self.height = _check_int("height", height, MIN_SIZE)
        self.width = _check_int("width", width, MIN_SIZE)
        self.seed = _check_int("seed", seed, 0)
        if isinstance(omit_classes, str):
            omit_classes = [n for n in omit_classes.split(",") if n.strip()]
        self.omit = tuple(sorted(class_ids(omit_classes)))

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index) -> dict:
        try:
            i = operator.index(index)
        except TypeError:
            raise ValueError(
                f"index must be an integer in [0, {self.num_examples}), got {index!r} "
                f"of type {type(index).__name__}") from None
        if not 0 <= i < self.num_examples:
            raise _IndexOutOfRange(
                f"index must be in [0, {self.num_examples}) for this {self!r}, got {i}")
        image, label = render_example(self.seed, self.domain, self.split, i, self.height,
                                      self.width, self.omit)
        return {"image": image, "label": label,
                "name": f"synthetic_{self.domain}_{self.split}_s{self.seed}_{i:06d}"}

    def class_stats(self) -> np.ndarray:
        """int64 [len(self), 19] pixel counts per example (255 left out), for Rare Class Sampling.

        Renders every example once (about 3 ms each at 96x192), so call it once per run."""
        counts = np.zeros((self.num_examples, NUM_CLASSES), np.int64)
        for i in range(self.num_examples):
            counts[i] = np.bincount(self[i]["label"].ravel(), minlength=256)[:NUM_CLASSES]
        return counts

    def __repr__(self) -> str:
        return (f"SyntheticSource(domain={self.domain!r}, split={self.split!r}, "
                f"num_examples={self.num_examples}, height={self.height}, width={self.width}, "
                f"seed={self.seed}, omit_classes={tuple(CLASS_NAMES[c] for c in self.omit)})")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {value!r} of type "
            f"{type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def class_frequencies(source, num: int | None = None) -> np.ndarray:
    """Pixel frequency of each of the 19 classes over the first `num` examples of `source`
    (all by default), ignoring 255: float64 [19] summing to 1."""
    n = len(source) if num is None else _check_int("num", num, 1)
    n = min(n, len(source))
    counts = np.zeros(256, np.int64)
    for i in range(n):
        counts += np.bincount(source[i]["label"].ravel(), minlength=256)
    counts = counts[:NUM_CLASSES].astype(np.float64)
    return counts / max(counts.sum(), 1.0)
