"""Chest phantom geometry in millimetres: drawing primitives, normal anatomy and the 18 pathology signatures.

A phantom is a list of primitives painted in order onto a ``Canvas`` (a HU
volume on a mm grid centred on the origin), so the same patient looks the
same at any voxel size. Axes are (z, y, x) = (inferior→superior,
anterior→posterior, patient right→left). ``sample_anatomy`` draws a normal
chest (body wall with fat and ribs, lungs with vessels and bronchi, heart in
a fat-lined pericardium, aorta, trachea, oesophagus, spine, liver);
``SIGNATURES[name]`` adds one pathology's visible signature and returns the
details a report states (side, lobe, size, ...). Signatures are sized to
survive downsampling to 4.5 mm voxels (the 32 × 64 × 64 tiny-model input).

CT-ViT normalises each patch (CT-CLIP's patch LayerNorm), which removes a
patch's mean HU and contrast. A signature therefore shows by its shape and
extent, as radiologists' signs do: hyperinflated lungs in emphysema, a raised
hemidiaphragm with atelectasis, an apical cap with fibrotic streaks, thick-
walled cystic bronchi, metal streak artefacts around devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from core.data.pathologies import PATHOLOGIES

Point = tuple[float, float, float]  # (z, y, x) mm


# --------------------------------------------------------------------------- drawing primitives


class Canvas:
    """A HU volume on a millimetre grid centred on the origin, with named region masks."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        self.hu = np.full(shape, -1000.0, dtype=np.float32)
        self.spacing = spacing
        self.axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing, strict=True)]
        self.masks: dict[str, np.ndarray] = {}

    def box(self, lo: Point, hi: Point) -> tuple[slice, slice, slice] | None:
        """Index slices covering the mm box [lo, hi]; None when it misses the grid."""
        slices = []
        for axis, a, b in zip(self.axes, lo, hi, strict=True):
            i0, i1 = int(np.searchsorted(axis, a, "left")), int(np.searchsorted(axis, b, "right"))
            if i0 >= i1:
                return None
            slices.append(slice(i0, i1))
        return tuple(slices)

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable z, y, x mm coordinates of ``box``."""
        z, y, x = (axis[s] for axis, s in zip(self.axes, box, strict=True))
        return z[:, None, None], y[None, :, None], x[None, None, :]

    def paint(self, box: tuple[slice, slice, slice], mask: np.ndarray, hu: float, where: str) -> None:
        """Set ``hu`` where ``mask`` (within ``box``) and the region ``where`` ("any" = everywhere)."""
        target = self.hu[box]
        mask = np.broadcast_to(mask, target.shape)
        if where != "any":
            mask = mask & self.masks[where][box]
        target[mask] = hu


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid; ``inner`` > 0 makes it a shell (outside ``inner`` × axes)."""

    centre: Point
    axes: Point
    hu: float
    where: str = "any"
    inner: float = 0.0

    def draw(self, canvas: Canvas) -> None:
        """Paint onto ``canvas``."""
        lo = tuple(c - a for c, a in zip(self.centre, self.axes, strict=True))
        hi = tuple(c + a for c, a in zip(self.centre, self.axes, strict=True))
        box = canvas.box(lo, hi)
        if box is None:
            return
        z, y, x = canvas.coords(box)
        (cz, cy, cx), (az, ay, ax) = self.centre, self.axes
        r2 = ((z - cz) / az) ** 2 + ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2
        mask = (r2 <= 1.0) & (r2 > self.inner**2) if self.inner else r2 <= 1.0
        canvas.paint(box, mask, self.hu, self.where)


@dataclass(frozen=True)
class Capsule:
    """All points within ``radius`` of the segment start–end (tubes, wires, streaks, plaques)."""

    start: Point
    end: Point
    radius: float
    hu: float
    where: str = "any"

    def draw(self, canvas: Canvas) -> None:
        """Paint onto ``canvas``."""
        a, b = np.asarray(self.start, np.float32), np.asarray(self.end, np.float32)
        box = canvas.box(tuple(np.minimum(a, b) - self.radius), tuple(np.maximum(a, b) + self.radius))
        if box is None:
            return
        z, y, x = canvas.coords(box)
        d = b - a
        length2 = max(float(d @ d), 1e-6)
        t = np.clip(((z - a[0]) * d[0] + (y - a[1]) * d[1] + (x - a[2]) * d[2]) / length2, 0.0, 1.0)
        dist2 = (z - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (x - a[2] - t * d[2]) ** 2
        canvas.paint(box, dist2 <= self.radius**2, self.hu, self.where)


@dataclass(frozen=True)
class Slab:
    """A disc-shaped plate: within ``thickness``/2 of a plane through ``centre`` and ``radius`` of it."""

    centre: Point
    normal: Point
    thickness: float
    radius: float
    hu: float
    where: str = "any"

    def draw(self, canvas: Canvas) -> None:
        """Paint onto ``canvas``."""
        c = np.asarray(self.centre)
        box = canvas.box(tuple(c - self.radius), tuple(c + self.radius))
        if box is None:
            return
        z, y, x = canvas.coords(box)
        n = np.asarray(self.normal) / np.linalg.norm(self.normal)
        dz, dy, dx = z - c[0], y - c[1], x - c[2]
        along = dz * n[0] + dy * n[1] + dx * n[2]
        mask = (np.abs(along) <= self.thickness / 2) & (dz**2 + dy**2 + dx**2 <= self.radius**2)
        canvas.paint(box, mask, self.hu, self.where)


@dataclass(frozen=True)
class Layer:
    """Region ``where`` posterior to ``y_min`` and below ``z_max``: dependent fluid (supine patient), or with
    ``y_min`` = -inf the lung base under a raised diaphragm."""

    y_min: float
    z_max: float
    hu: float
    where: str

    def draw(self, canvas: Canvas) -> None:
        """Paint onto ``canvas``."""
        z, y, x = canvas.coords((slice(None),) * 3)
        canvas.paint((slice(None),) * 3, (y >= self.y_min) & (z <= self.z_max), self.hu, self.where)


@dataclass(frozen=True)
class Field:
    """A smooth random field (seeded, ``cell`` mm correlation length) added to the HU of region ``where``.

    ``threshold`` None: add ``amplitude`` × field (parenchymal texture). Otherwise
    add ``low`` where field < threshold and ``high`` elsewhere (geographic mosaic).
    """

    seed: int
    cell: float
    where: str
    amplitude: float = 0.0
    threshold: float | None = None
    low: float = 0.0
    high: float = 0.0

    def draw(self, canvas: Canvas) -> None:
        """Paint onto ``canvas``."""
        extent = [abs(float(axis[0])) for axis in canvas.axes]
        nodes = [int(math.ceil(2 * e / self.cell)) + 2 for e in extent]
        coarse = np.random.default_rng(self.seed).standard_normal(nodes).astype(np.float32)
        mask = canvas.masks[self.where]
        index = np.nonzero(mask)
        points = [(axis[i] + e) / self.cell for axis, i, e in zip(canvas.axes, index, extent, strict=True)]
        values = ndimage.map_coordinates(coarse, points, order=1, mode="nearest")
        if self.threshold is None:
            canvas.hu[index] += self.amplitude * values
        else:
            canvas.hu[index] += np.where(values < self.threshold, self.low, self.high).astype(np.float32)


@dataclass(frozen=True)
class Shift:
    """Add ``delta`` HU over region ``where`` (e.g. the hyperlucent lungs of emphysema)."""

    delta: float
    where: str

    def draw(self, canvas: Canvas) -> None:
        """Paint onto ``canvas``."""
        canvas.hu[canvas.masks[self.where]] += self.delta


@dataclass(frozen=True)
class MarkRegions:
    """Record the region masks (both lungs, each lung) that later primitives are confined to."""

    lungs: dict[str, tuple[Point, Point]]

    def draw(self, canvas: Canvas) -> None:
        """Derive masks from the lung ellipsoids and the current air-filled voxels."""
        z, y, x = canvas.coords((slice(None),) * 3)
        aerated = canvas.hu < -500
        whole = np.zeros_like(aerated)
        for side, (centre, axes) in self.lungs.items():
            r2 = sum(((c - m) / a) ** 2 for c, m, a in zip((z, y, x), centre, axes, strict=True))
            lung = (r2 <= 1.0) & aerated
            canvas.masks[f"lung_{side}"] = lung
            whole |= lung
        canvas.masks["lung"] = whole


Primitive = Ellipsoid | Capsule | Slab | Layer | Field | Shift | MarkRegions


# --------------------------------------------------------------------------- anatomy


@dataclass
class Anatomy:
    """Millimetre geometry of one patient, shared by the normal chest and the pathology signatures."""

    scale: float
    body_axes: tuple[float, float]  # (y, x) semi-axes of the body cross-section, centred at y = body_y
    body_y: float
    lungs: dict[str, tuple[Point, Point]]  # side → (centre, semi-axes)
    heart: tuple[Point, Point]
    aorta: list[tuple[Point, Point, float]]  # (start, end, radius) segments
    trachea: tuple[Point, Point]
    oesophagus: tuple[Point, Point]
    bronchi: dict[str, list[tuple[Point, Point]]]
    vessels: dict[str, list[tuple[Point, Point]]]
    blood_hu: float
    bronchus_lumen: float = 2.2
    bronchus_wall: tuple[float, float] = (1.2, -150.0)  # (thickness mm, HU)


def _s(point: Point, scale: float) -> Point:
    return tuple(v * scale for v in point)


def random_point(rng: np.random.Generator, centre: Point, axes: Point, margin: float = 0.7,
                 z_range: tuple[float, float] = (-1.0, 1.0)) -> Point:
    """A uniform random point inside ``margin`` × the ellipsoid, its relative z within ``z_range``."""
    for _ in range(200):
        u = rng.uniform(-1, 1, 3)
        if u @ u <= 1 and z_range[0] <= u[0] * margin <= z_range[1]:
            break
    return tuple(float(c + a * margin * v) for c, a, v in zip(centre, axes, u, strict=True))


def sample_anatomy(rng: np.random.Generator, labels: dict[str, bool]) -> Anatomy:
    """The patient's geometry: normal, but with an enlarged heart (Cardiomegaly) or hyperinflated lungs (Emphysema)."""
    s = float(rng.uniform(0.92, 1.05))
    lungs = {
        "right": (_s((15.0, 5.0, -62.0), s), _s((105.0, 70.0, 48.0), s)),
        "left": (_s((15.0, 8.0, 64.0), s), _s((100.0, 66.0, 45.0), s)),
    }
    if labels["Emphysema"]:  # hyperinflation: a low, flat diaphragm and a deeper chest, apices unchanged
        tall, deep = rng.uniform(1.15, 1.25), rng.uniform(1.06, 1.12)
        lungs = {side: ((c[0] - (tall - 1) * ax[0], c[1], c[2]), (ax[0] * tall, ax[1] * deep, ax[2]))
                 for side, (c, ax) in lungs.items()}
    heart_centre, heart_axes = (-40.0, -30.0, 18.0), (45.0, 42.0, 50.0)
    if labels["Cardiomegaly"]:
        grow = rng.uniform(1.3, 1.45)
        heart_centre, heart_axes = (-44.0, -28.0, 28.0), (45.0 * 1.15, 42.0 * grow, 50.0 * grow)
    aorta = [((-20.0, -20.0, -8.0), (55.0, -22.0, -8.0), 15.0), ((55.0, -22.0, -8.0), (62.0, 40.0, 18.0), 13.0),
             ((62.0, 40.0, 18.0), (-125.0, 48.0, 20.0), 12.0)]
    bronchi, vessels = {}, {}
    for side, (centre, axes) in lungs.items():
        hilum = np.array([25.0 * s, 12.0 * s, math.copysign(32.0 * s, centre[2])])
        bronchi[side] = [(tuple(hilum + rng.normal(0, 5, 3)), random_point(rng, centre, axes, 0.75, (-0.9, 0.5)))
                         for _ in range(5)]
        vessels[side] = [(tuple(hilum + rng.normal(0, 6, 3)), random_point(rng, centre, axes, 0.8)) for _ in range(4)]
    return Anatomy(
        scale=s, body_axes=(100.0 * s, 132.0 * s), body_y=5.0 * s, lungs=lungs,
        heart=(_s(heart_centre, s), _s(heart_axes, s)),
        aorta=[(_s(a, s), _s(b, s), r * s) for a, b, r in aorta],
        trachea=(_s((130.0, 18.0, 0.0), s), _s((55.0, 20.0, 0.0), s)),
        oesophagus=(_s((130.0, 40.0, 4.0), s), _s((-95.0, 42.0, 12.0), s)),
        bronchi=bronchi, vessels=vessels, blood_hu=float(rng.choice([45.0, 160.0])),
    )


def heart_primitives(a: Anatomy) -> list[Primitive]:
    """Myocardium with a blood pool (contrast-enhanced or not)."""
    centre, axes = a.heart
    return [Ellipsoid(centre, axes, 55.0), Ellipsoid(centre, tuple(0.72 * v for v in axes), a.blood_hu)]


def bronchus_primitives(a: Anatomy, start: Point, end: Point, lumen: float, wall: tuple[float, float]) -> list:
    """A bronchus: wall tube then air lumen, confined to the lungs."""
    return [Capsule(start, end, lumen + wall[0], wall[1], "lung"), Capsule(start, end, lumen, -1000.0, "lung")]


def anatomy_primitives(a: Anatomy, rng: np.random.Generator) -> list[Primitive]:
    """The normal chest, back to front: body wall, ribs, abdomen, mediastinum, lungs, heart, great vessels,
    airways, oesophagus and spine; then the lung masks, parenchymal texture, pulmonary vessels and bronchi."""
    s, (by, bx), y0 = a.scale, a.body_axes, a.body_y
    tall = 400.0
    prims: list[Primitive] = [
        Ellipsoid((0.0, y0, 0.0), (tall, by, bx), -100.0),  # subcutaneous fat
        Ellipsoid((0.0, y0, 0.0), (tall, by - 12 * s, bx - 12 * s), 40.0),  # muscle / soft tissue
    ]
    rib_phase = rng.uniform(0, 26)
    for k in range(-6, 7):  # ribs: bony arcs of the inner chest wall every ~26 mm
        zc = k * 26.0 * s + rib_phase
        prims.append(Ellipsoid((zc, y0 + 5 * s, 0.0), (4.5 * s, by - 16 * s, bx - 16 * s), 450.0, inner=0.93))
    prims += [
        Ellipsoid((-115.0 * s, 5.0 * s, -35.0 * s), (60.0 * s, 80.0 * s, 85.0 * s), 60.0),  # liver
        Ellipsoid((-105.0 * s, -15.0 * s, 60.0 * s), (35.0 * s, 40.0 * s, 35.0 * s), 25.0),  # stomach
        Ellipsoid((10.0 * s, -5.0 * s, 5.0 * s), (115.0 * s, 62.0 * s, 42.0 * s), -90.0),  # mediastinal fat
        Capsule((-60.0 * s, -by + y0 + 20 * s, 0.0), (60.0 * s, -by + y0 + 20 * s, 0.0), 8.0 * s, 400.0),  # sternum
    ]
    prims += [Ellipsoid(centre, axes, -850.0) for centre, axes in a.lungs.values()]
    heart_c, heart_ax = a.heart
    prims.append(Ellipsoid(heart_c, tuple(v + 5 * s for v in heart_ax), -90.0))  # epicardial fat
    prims += heart_primitives(a)
    prims += [Capsule(p, q, r, a.blood_hu) for p, q, r in a.aorta]
    prims.append(Capsule(_s((0.0, -30.0, 15.0), s), _s((30.0, -15.0, 32.0), s), 13.0 * s, a.blood_hu))  # pulm. trunk
    t0, t1 = a.trachea
    prims += [Capsule(t0, t1, 11.0 * s, 40.0), Capsule(t0, t1, 8.5 * s, -1000.0)]
    for side in ("right", "left"):
        end = (35.0 * s, 14.0 * s, math.copysign(34.0 * s, a.lungs[side][0][2]))
        prims += [Capsule(t1, end, 7.5 * s, 40.0), Capsule(t1, end, 5.5 * s, -1000.0)]
    e0, e1 = a.oesophagus
    prims += [Capsule(e0, e1, 7.0 * s, 40.0), Capsule(e0, e1, 1.8 * s, -1000.0)]
    spine_y = y0 + by - 33 * s
    prims += [
        Capsule((-tall, spine_y, 0.0), (tall, spine_y, 0.0), 18.0 * s, 700.0),  # cortical bone
        Capsule((-tall, spine_y, 0.0), (tall, spine_y, 0.0), 15.5 * s, 230.0),  # cancellous bone
        Capsule((-tall, spine_y + 24 * s, 0.0), (tall, spine_y + 24 * s, 0.0), 9.0 * s, 500.0),  # neural arch
        Capsule((-tall, spine_y + 24 * s, 0.0), (tall, spine_y + 24 * s, 0.0), 6.5 * s, 15.0),  # spinal canal
    ]
    disc_phase = rng.uniform(0, 28)
    for k in range(-6, 7):
        zc = k * 28.0 * s + disc_phase
        prims.append(Capsule((zc - 2.5 * s, spine_y, 0.0), (zc + 2.5 * s, spine_y, 0.0), 15.5 * s, 80.0))
    # lung masks: the aerated parts of the lung ellipsoids, so lung signatures never paint over the mediastinum
    prims.append(MarkRegions(a.lungs))
    prims.append(Field(int(rng.integers(2**31)), 9.0, "lung", amplitude=22.0))  # parenchymal texture
    for side in a.lungs:
        prims += [Capsule(p, q, 2.0 * s, 20.0, "lung") for p, q in a.vessels[side]]
        for p, q in a.bronchi[side]:
            prims += bronchus_primitives(a, p, q, a.bronchus_lumen, a.bronchus_wall)
    return prims


# --------------------------------------------------------------------------- pathology signatures

Signature = Callable[[np.random.Generator, Anatomy], tuple[list[Primitive], dict[str, Any]]]
SIGNATURES: dict[str, Signature] = {}
# Drawing order (earlier is painted over by later): diffuse parenchymal patterns, focal lung lesions,
# pleura, then mediastinum / heart / devices.
DRAW_ORDER: tuple[str, ...] = (
    "Mosaic attenuation pattern", "Emphysema", "Interlobular septal thickening", "Lung opacity", "Consolidation",
    "Atelectasis", "Pulmonary fibrotic sequela", "Peribronchial thickening", "Bronchiectasis", "Lung nodule",
    "Pleural effusion", "Pericardial effusion", "Arterial wall calcification", "Coronary artery wall calcification",
    "Lymphadenopathy", "Hiatal hernia", "Medical material",
)  # Cardiomegaly is the heart's size in sample_anatomy


def signature(name: str) -> Callable[[Signature], Signature]:
    """Register the function that draws ``name``'s visible signature and returns its report details."""

    def wrap(fn: Signature) -> Signature:
        SIGNATURES[name] = fn
        return fn

    return wrap


def _lobe(a: Anatomy, side: str, point: Point) -> str:
    centre, axes = a.lungs[side]
    rel = (point[0] - centre[0]) / axes[0]
    if side == "right":
        return "upper lobe" if rel > 0.3 else "middle lobe" if rel > -0.2 else "lower lobe"
    return "upper lobe" if rel > 0.05 else "lower lobe"


def _side(rng: np.random.Generator) -> str:
    return "right" if rng.random() < 0.5 else "left"


def _direction(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


@signature("Lung nodule")
def _nodule(rng, a):
    count = int(rng.integers(4, 9))
    prims, sizes, first = [], [], None
    for _ in range(count):
        side = _side(rng)
        r = float(rng.uniform(13.0, 19.0)) * a.scale
        centre = random_point(rng, *a.lungs[side], margin=0.65)
        prims.append(Ellipsoid(centre, (r, r, r), 300.0, "lung"))  # solid, partly calcified
        sizes.append(2 * r)
        first = first or (side, centre)
    side, centre = first
    return prims, {"side": side, "lobe": _lobe(a, side, centre), "size": round(max(sizes)), "count": count}


@signature("Emphysema")
def _emphysema(rng, a):
    prims: list[Primitive] = [Shift(-30.0, "lung")]  # hyperlucent lungs, still lighter than the air-filled bullae
    for _ in range(int(rng.integers(50, 80))):
        side = _side(rng)
        r = float(rng.uniform(8.0, 14.0)) * a.scale
        prims.append(Ellipsoid(random_point(rng, *a.lungs[side], 0.85, (-0.2, 1.0)), (r, r, r), -1000.0, "lung"))
    for _ in range(int(rng.integers(2, 5))):  # large apical bullae
        side = _side(rng)
        r = float(rng.uniform(18.0, 26.0)) * a.scale
        prims.append(Ellipsoid(random_point(rng, *a.lungs[side], 0.7, (0.2, 1.0)), (r, r, r), -1000.0, "lung"))
    return prims, {"type": str(rng.choice(["centrilobular", "paraseptal"]))}


@signature("Lung opacity")
def _opacity(rng, a):
    side = _side(rng)
    sides = [side, "left" if side == "right" else "right"] if rng.random() < 0.5 else [side]  # often bilateral
    centre = random_point(rng, *a.lungs[side], 0.55)
    prims = []
    for other in sides:
        cluster = centre if other == side else random_point(rng, *a.lungs[other], 0.55)
        for _ in range(int(rng.integers(4, 8))):
            r = float(rng.uniform(24.0, 36.0)) * a.scale
            offset = _direction(rng) * rng.uniform(0, 25) * a.scale
            prims.append(Ellipsoid(tuple(np.add(cluster, offset)), (r * 0.8, r, r), -300.0, f"lung_{other}"))
    return prims, {"side": side, "lobe": _lobe(a, side, centre)}


@signature("Consolidation")
def _consolidation(rng, a):
    side = _side(rng)
    centre = random_point(rng, *a.lungs[side], 0.55, (-0.9, 0.2))
    prims: list[Primitive] = []
    for _ in range(int(rng.integers(3, 6))):
        r = float(rng.uniform(30.0, 42.0)) * a.scale
        offset = _direction(rng) * rng.uniform(0, 14) * a.scale
        prims.append(Ellipsoid(tuple(np.add(centre, offset)), (r * 0.8, r, r), 50.0, f"lung_{side}"))
    for _ in range(3):  # air bronchograms
        end = np.add(centre, _direction(rng) * 24 * a.scale)
        prims.append(Capsule(centre, tuple(end), 2.5 * a.scale, -950.0, f"lung_{side}"))
    return prims, {"side": side, "lobe": _lobe(a, side, centre)}


@signature("Atelectasis")
def _atelectasis(rng, a):
    side = _side(rng)
    centre = random_point(rng, *a.lungs[side], 0.5, (-0.8, -0.1))
    angle = rng.uniform(math.radians(25), math.radians(60))
    normal = (math.cos(angle), math.sin(angle) * rng.choice([-1.0, 1.0]), rng.uniform(-0.2, 0.2))
    slab = Slab(centre, normal, float(rng.uniform(15.0, 20.0)) * a.scale, float(rng.uniform(55.0, 70.0)) * a.scale,
                30.0, f"lung_{side}")
    lung_centre, lung_axes = a.lungs[side]
    base = lung_centre[0] - lung_axes[0] + float(rng.uniform(25.0, 35.0)) * a.scale  # volume loss: raised diaphragm
    return [slab, Layer(-math.inf, base, 40.0, f"lung_{side}")], {"side": side, "lobe": _lobe(a, side, centre)}


@signature("Pulmonary fibrotic sequela")
def _fibrosis(rng, a):
    side = _side(rng)
    centre, axes = a.lungs[side]
    prims = []
    first = None
    for _ in range(int(rng.integers(15, 22))):  # apical streaks (post-inflammatory sequelae)
        start = random_point(rng, centre, axes, 0.8, (0.45, 0.95))
        end = np.add(start, _direction(rng) * rng.uniform(40, 70) * a.scale)
        prims.append(Capsule(start, tuple(end), float(rng.uniform(6.0, 8.0)) * a.scale, 150.0, f"lung_{side}"))
        first = first or start
    apex = (centre[0] + axes[0], centre[1], centre[2])
    prims.append(Ellipsoid(apex, (float(rng.uniform(22.0, 30.0)) * a.scale, axes[1], axes[2]), 60.0,
                           f"lung_{side}"))  # apical pleuro-parenchymal cap
    return prims, {"side": side, "lobe": _lobe(a, side, first)}


@signature("Pleural effusion")
def _pleural_effusion(rng, a):
    sides = {"right": ["right"], "left": ["left"], "bilateral": ["right", "left"]}
    choice = str(rng.choice(list(sides), p=[0.35, 0.25, 0.4]))
    depth = float(rng.uniform(28.0, 48.0)) * a.scale
    prims = []
    for side in sides[choice]:
        centre, axes = a.lungs[side]
        prims.append(Layer(centre[1] + axes[1] - depth, centre[0] + 0.25 * axes[0], 12.0, f"lung_{side}"))
    phrase = {"right": "on the right", "left": "on the left", "bilateral": "on both sides"}[choice]
    adjective = {"right": "right-sided", "left": "left-sided", "bilateral": "bilateral"}[choice]
    return prims, {"side": choice, "side_phrase": phrase, "side_adj": adjective, "size": round(depth)}


@signature("Mosaic attenuation pattern")
def _mosaic(rng, a):
    return [Field(int(rng.integers(2**31)), 30.0 * a.scale, "lung", threshold=0.0, low=-150.0, high=250.0)], {}


@signature("Interlobular septal thickening")
def _septal(rng, a):
    prims = []
    for _ in range(int(rng.integers(220, 300))):  # short septal lines running in from the pleura
        side = _side(rng)
        centre, axes = a.lungs[side]
        u = _direction(rng)
        u[0] = -abs(u[0])  # basal predominance
        start = np.add(centre, 0.96 * np.asarray(axes) * u)
        inward = np.subtract(centre, start) / np.linalg.norm(np.subtract(centre, start))
        end = start + inward * rng.uniform(12.0, 22.0) * a.scale
        prims.append(Capsule(tuple(start), tuple(end), 3.5 * a.scale, 50.0, f"lung_{side}"))
    return prims, {}


@signature("Peribronchial thickening")
def _peribronchial(rng, a):
    """Thick soft-tissue walls around every bronchus (also the dilated ones Bronchiectasis draws after it)."""
    a.bronchus_wall = (float(rng.uniform(6.0, 7.5)) * a.scale, 40.0)
    prims = []
    for side in a.lungs:
        for p, q in a.bronchi[side]:
            prims += bronchus_primitives(a, p, q, a.bronchus_lumen, a.bronchus_wall)
    return prims, {}


@signature("Bronchiectasis")
def _bronchiectasis(rng, a):
    side = _side(rng)
    centre, axes = a.lungs[side]
    hilum = a.bronchi[side][0][0]
    lumen = float(rng.uniform(11.0, 15.0)) * a.scale
    wall = (max(6.0 * a.scale, a.bronchus_wall[0]), max(80.0, a.bronchus_wall[1]))  # thick-walled "tram tracks"
    prims, ends = [], []
    for _ in range(int(rng.integers(8, 12))):
        end = random_point(rng, centre, axes, 0.75, (-0.9, 0.3))
        ends.append(end)
        prims += bronchus_primitives(a, hilum, end, lumen, wall)
    for end in ends[: int(rng.integers(4, 8))]:  # cystic dilatation: thick-walled rings at the branch ends
        r = float(rng.uniform(12.0, 18.0)) * a.scale
        prims.append(Ellipsoid(end, (r, r, r), wall[1], f"lung_{side}", inner=1.0 - wall[0] / r))
    return prims, {"side": side, "lobe": _lobe(a, side, ends[0])}


@signature("Pericardial effusion")
def _pericardial_effusion(rng, a):
    centre, axes = a.heart
    thickness = float(rng.uniform(10.0, 16.0)) * a.scale
    return [Ellipsoid(centre, tuple(v + thickness for v in axes), 8.0), *heart_primitives(a)], {
        "size": round(thickness)}


def _plaques(rng, start: Point, end: Point, radius: float, count: int, hu: float) -> list[Primitive]:
    """Calcified plaques: short bright capsules on the wall of the tube start–end of ``radius``."""
    a, b = np.asarray(start), np.asarray(end)
    axis = (b - a) / np.linalg.norm(b - a)
    ortho = np.cross(axis, [0.0, 0.0, 1.0] if abs(axis[2]) < 0.9 else [1.0, 0.0, 0.0])
    ortho /= np.linalg.norm(ortho)
    ortho2 = np.cross(axis, ortho)
    prims = []
    for _ in range(count):
        t, phi = rng.uniform(0.05, 0.95), rng.uniform(0, 2 * math.pi)
        centre = a + t * (b - a) + radius * (math.cos(phi) * ortho + math.sin(phi) * ortho2)
        half = axis * rng.uniform(5.0, 12.0)
        prims.append(Capsule(tuple(centre - half), tuple(centre + half), 4.0, hu))
    return prims


@signature("Arterial wall calcification")
def _aortic_calcification(rng, a):
    segments = a.aorta if rng.random() < 0.5 else a.aorta[1:]
    prims = []
    for start, end, radius in segments:
        prims += _plaques(rng, start, end, radius, int(rng.integers(6, 11)), 1000.0)
    vessel = "thoracic aorta" if len(segments) == 3 else "aortic arch and descending aorta"
    return prims, {"vessel": vessel}


@signature("Coronary artery wall calcification")
def _coronary_calcification(rng, a):
    (cz, cy, cx), (az, ay, ax) = a.heart
    courses = {  # along the heart surface: (start, end) in heart-relative units
        "left anterior descending artery": ((0.6, -0.75, -0.25), (-0.5, -0.85, 0.45)),
        "circumflex artery": ((0.55, -0.2, 0.65), (0.1, 0.5, 0.75)),
        "right coronary artery": ((0.55, -0.55, -0.6), (-0.3, 0.1, -0.85)),
    }
    names = [str(n) for n in rng.choice(list(courses), size=int(rng.integers(1, 4)), replace=False)]
    prims = []
    for name in names:
        p, q = (np.array([cz + az * u[0], cy + ay * u[1], cx + ax * u[2]]) for u in courses[name])
        for t in rng.uniform(0, 1, int(rng.integers(3, 6))):
            centre = p + t * (q - p)
            half = _direction(rng) * 6.0
            prims.append(Capsule(tuple(centre - half), tuple(centre + half), 4.5, 1100.0))
    vessel = names[0] if len(names) == 1 else "coronary arteries"
    return prims, {"vessel": vessel}


LYMPH_STATIONS = {  # (z, y, x) mm
    "right paratracheal region": (75.0, 8.0, -16.0), "left paratracheal region": (70.0, 10.0, 17.0),
    "subcarinal region": (38.0, 32.0, 0.0), "prevascular region": (50.0, -40.0, 0.0),
    "aortopulmonary window": (40.0, 5.0, 28.0), "right hilum": (22.0, 8.0, -38.0), "left hilum": (22.0, 10.0, 40.0),
}


@signature("Lymphadenopathy")
def _lymphadenopathy(rng, a):
    stations = [str(s) for s in rng.choice(list(LYMPH_STATIONS), size=int(rng.integers(3, 6)), replace=False)]
    prims, sizes = [], []
    for station in stations:
        r = float(rng.uniform(13.0, 18.0)) * a.scale
        centre = np.add(_s(LYMPH_STATIONS[station], a.scale), rng.normal(0, 3, 3))
        prims.append(Ellipsoid(tuple(centre), (r * 1.2, r, r), 55.0))
        sizes.append(2 * r)
    return prims, {"station": stations[0], "size": round(max(sizes)), "count": len(stations)}


@signature("Hiatal hernia")
def _hiatal_hernia(rng, a):
    s = a.scale
    r = float(rng.uniform(18.0, 26.0)) * s
    c = (-72.0 * s, 35.0 * s, 12.0 * s)
    return [
        Ellipsoid(c, (r + 3 * s, r + 3 * s, r + 3 * s), 45.0),  # wall
        Ellipsoid(c, (r, r, r), 12.0),  # fluid
        Ellipsoid((c[0], c[1] - 0.45 * r, c[2]), (0.7 * r, 0.5 * r, 0.7 * r), -1000.0),  # air, anterior (up)
    ], {"size": round(2 * r)}


@signature("Medical material")
def _medical_material(rng, a):
    s = a.scale
    device = str(rng.choice(["a central venous catheter", "a cardiac pacemaker with its lead",
                             "sternotomy wires"]))
    if device == "sternotomy wires":
        y = -a.body_axes[0] + a.body_y + 20 * s
        prims = [Capsule((z * s, y - 4 * s, -17 * s), (z * s, y - 4 * s, 17 * s), 5.0, 3000.0)
                 for z in (-40.0, -15.0, 10.0, 35.0, 60.0)]
        return prims + _metal_streaks(rng, (10.0 * s, y - 4 * s, 0.0)), {"device": device}
    path = [(115.0, -45.0, -70.0), (85.0, -20.0, -25.0), (40.0, -18.0, -12.0), (-25.0, -28.0, 0.0)]
    prims = [Capsule(_s(p, s), _s(q, s), 5.0, 3000.0) for p, q in zip(path, path[1:], strict=False)]
    if "pacemaker" in device:
        prims.append(Ellipsoid(_s((95.0, -80.0, 70.0), s), (20.0, 6.0, 25.0), 3000.0))
        prims.append(Capsule(_s((95.0, -80.0, 70.0), s), _s(path[0], s), 5.0, 3000.0))
        prims += _metal_streaks(rng, _s((95.0, -80.0, 70.0), s))
    return prims + _metal_streaks(rng, _s(path[2], s)), {"device": device}


def _metal_streaks(rng: np.random.Generator, centre: Point) -> list[Primitive]:
    """Alternating bright and dark beam-hardening streaks radiating from metal across its axial slice."""
    prims: list[Primitive] = []
    for k, angle in enumerate(rng.uniform(0, math.pi, 6)):
        half = 140.0 * np.array([0.0, math.sin(angle), math.cos(angle)])
        prims.append(Capsule(tuple(np.subtract(centre, half)), tuple(np.add(centre, half)), 2.0,
                             600.0 if k % 2 == 0 else -700.0))
    return prims


assert set(SIGNATURES) == set(DRAW_ORDER) == set(PATHOLOGIES) - {"Cardiomegaly"}
