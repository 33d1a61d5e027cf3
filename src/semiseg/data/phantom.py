"""A synthetic contrast-enhanced abdominal CT, deterministic per seed.

The phantom exists so that every pipeline (prepare, sampling, training, evaluation, predict) runs
end to end without downloading a dataset, on data with the properties that make multi-organ
segmentation hard: organs sit where anatomy puts them, their soft-tissue intensities overlap
(liver ~60 HU, spleen ~50, pancreas ~40, muscle ~50, bowel ~35), so shape and position matter;
and their volumes are as imbalanced as in real scans (liver about 250 times an adrenal gland).

Frame. Structures are laid out in millimetres in an anatomical frame: ``u`` towards the
patient's left, ``v`` towards the back (posterior), ``w`` towards the head (superior), origin on
the body axis at the level of the renal hila. Voxel index X grows with ``u``, Y with ``v``, Z
with ``w``: the usual voxel order of an axial CT (radiological display: patient's right on the
image left, anterior at the top). :func:`phantom_affine` gives the matching RAS+ affine,
diag(-sx, -sy, sz).

Variation. Each case draws a body size, per-organ position/size/rotation jitter, a smooth random
deformation of the whole field (a few mm), per-tissue intensity offsets, bowel gas and loops, the
sex (prostate or uterus), then blurs slightly (partial volume) and adds Gaussian noise.

Everything is vectorised NumPy evaluated inside each structure's bounding box; a 112x112x80 case
takes about 0.2 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from semiseg.data.classes import SYNAPSE, ClassSet
from semiseg.errors import ConfigError

if TYPE_CHECKING:
    from semiseg.data.splits import Split

Shape3 = tuple[int, int, int]
Spacing3 = tuple[float, float, float]
Vec3 = tuple[float, float, float]

# In-plane field of view (mm) and the superior-inferior range (w, mm) shown for each region.
_INPLANE_FOV = 392.0
_ABDOMEN_RANGE = (-115.0, 125.0)  # lower kidney poles to the oesophageal hiatus
_PELVIS_RANGE = (-280.0, 125.0)  # down to the prostate / pelvic floor
_PELVIC_ORGANS = {"bladder", "prostate/uterus"}

# Mean intensities (HU) of a portal-venous-phase CT; organ means overlap on purpose.
HU = {
    "air": -1000.0,
    "lung": -850.0,
    "gas": -900.0,
    "fat_sc": -100.0,
    "fat": -90.0,
    "muscle": 50.0,
    "cortical": 700.0,
    "marrow": 250.0,
    "csf": 15.0,
    "disc": 80.0,
    "liver": 60.0,
    "spleen": 50.0,
    "kidney_cortex": 150.0,
    "kidney_medulla": 40.0,
    "renal_sinus": -30.0,
    "gallbladder": 10.0,
    "stomach_wall": 45.0,
    "stomach_content": 15.0,
    "aorta": 160.0,
    "ivc": 130.0,
    "portal": 150.0,
    "pancreas": 40.0,
    "adrenal": 45.0,
    "duodenum": 35.0,
    "bowel": 35.0,
    "bowel_content": 15.0,
    "stool": -40.0,
    "esophagus": 40.0,
    "bladder": 10.0,
    "prostate": 40.0,
    "uterus": 80.0,
    "heart": 90.0,
}

ANATOMY_ORGANS = (
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "portal and splenic veins",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
    "duodenum",
    "bladder",
    "prostate/uterus",
)


# --------------------------------------------------------------------------- geometry


def _anatomy_range(class_set: ClassSet) -> tuple[float, float]:
    return _PELVIS_RANGE if _PELVIC_ORGANS & set(class_set.names) else _ABDOMEN_RANGE


def default_spacing(shape: Sequence[int], class_set: ClassSet = SYNAPSE) -> Spacing3:
    """Spacing (mm) at which ``shape`` covers the phantom's field of view: 392 mm in-plane and
    the abdomen (240 mm) or, when the class set has pelvic organs, abdomen and pelvis (405 mm).
    112x112x80 gives 3.5 x 3.5 x 3.0 mm (Synapse) or 3.5 x 3.5 x 5.06 mm (AMOS)."""
    lo, hi = _anatomy_range(class_set)
    return (_INPLANE_FOV / shape[0], _INPLANE_FOV / shape[1], (hi - lo) / shape[2])


def _grid_origin(shape: Sequence[int], spacing: Sequence[float], class_set: ClassSet) -> Vec3:
    """(u, v, w) of voxel (0, 0, 0): in-plane centred on the body axis, w centred on the range."""
    lo, hi = _anatomy_range(class_set)
    centre = (lo + hi) / 2.0
    return (
        -(shape[0] - 1) / 2.0 * spacing[0],
        -(shape[1] - 1) / 2.0 * spacing[1],
        centre - (shape[2] - 1) / 2.0 * spacing[2],
    )


def phantom_affine(
    shape: Sequence[int], spacing: Sequence[float], class_set: ClassSet = SYNAPSE
) -> np.ndarray:
    """RAS+ voxel-to-world affine of a phantom grid (u = -x_RAS, v = -y_RAS, w = z_RAS)."""
    origin = _grid_origin(shape, spacing, class_set)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = (-origin[0], -origin[1], origin[2])
    return affine


def _rotation(angles: Sequence[float]) -> np.ndarray:
    """Rotation about u, then v, then w (radians); rows are the body axes in the (u,v,w) frame."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return (rz @ ry @ rx).T


class _Canvas:
    """The voxel grid being painted: deformed coordinates, HU and label arrays."""

    def __init__(
        self,
        shape: Shape3,
        spacing: Spacing3,
        origin: Vec3,
        rng: np.random.Generator,
        deformation_mm: float,
    ) -> None:
        self.shape = shape
        self.spacing = spacing
        self.origin = origin
        self.axes = [
            (origin[a] + spacing[a] * np.arange(shape[a])).astype(np.float32) for a in range(3)
        ]
        self.margin = deformation_mm
        self.coords = self._deformed_coordinates(rng, deformation_mm)
        self.hu = np.full(shape, HU["air"], dtype=np.float32)
        self.label = np.zeros(shape, dtype=np.uint8)

    def _deformed_coordinates(self, rng: np.random.Generator, amplitude: float) -> list[np.ndarray]:
        # A smooth displacement field built from separable products of low-frequency 1-D
        # waves: broadcasting keeps it one multiply-add per term over the volume, far cheaper
        # than upsampling a random grid with spline interpolation.
        coords = []
        for a in range(3):
            displacement = np.zeros(self.shape, dtype=np.float32)
            for _ in range(2):
                factors = [self._wave(rng, self.axes[b]) for b in range(3)]
                displacement += (
                    factors[0][:, None, None]
                    * factors[1][None, :, None]
                    * factors[2][None, None, :]
                )
            displacement *= amplitude / 2.0
            axis_shape = [1, 1, 1]
            axis_shape[a] = self.shape[a]
            coords.append(self.axes[a].reshape(axis_shape) + displacement)
        return coords

    @staticmethod
    def _wave(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
        wavelength = rng.uniform(150.0, 400.0)
        phase = rng.uniform(0.0, 2 * np.pi)
        return np.sin(2 * np.pi * x / wavelength + phase).astype(np.float32)

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, ...] | None:
        """Index slices covering world box [lo, hi] widened by the deformation margin."""
        slices = []
        for a in range(3):
            start = int(np.floor((lo[a] - self.margin - self.origin[a]) / self.spacing[a]))
            stop = int(np.ceil((hi[a] + self.margin - self.origin[a]) / self.spacing[a])) + 1
            start, stop = max(start, 0), min(stop, self.shape[a])
            if start >= stop:
                return None
            slices.append(slice(start, stop))
        return tuple(slices)

    def local(self, sl: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Deformed (u, v, w) inside ``sl`` (broadcast to the box shape)."""
        return tuple(np.broadcast_to(c[sl], self.hu[sl].shape) for c in self.coords)  # type: ignore[return-value]

    def paint(
        self, sl: tuple[slice, ...], mask: np.ndarray, hu: float | np.ndarray, label: int | None
    ) -> None:
        """Set HU (scalar or box-shaped array) and, unless ``label`` is None, the label."""
        hu_view = self.hu[sl]
        hu_view[mask] = hu if np.isscalar(hu) else np.asarray(hu)[mask]
        if label is not None:
            self.label[sl][mask] = label


# --------------------------------------------------------------------------- primitives


@dataclass
class _Shape:
    """A painted region: its box and boolean mask inside the box, plus the quadric value."""

    sl: tuple[slice, ...]
    mask: np.ndarray
    q: np.ndarray | None = None


def _ellipsoid(
    canvas: _Canvas,
    centre: Sequence[float],
    semi: Sequence[float],
    angles: Sequence[float] = (0, 0, 0),
) -> _Shape | None:
    reach = max(semi)
    sl = canvas.box([c - reach for c in centre], [c + reach for c in centre])
    if sl is None:
        return None
    u, v, w = canvas.local(sl)
    du, dv, dw = u - centre[0], v - centre[1], w - centre[2]
    rot = _rotation(angles).astype(np.float32)
    q = np.zeros(du.shape, dtype=np.float32)
    for axis in range(3):
        along = rot[axis, 0] * du + rot[axis, 1] * dv + rot[axis, 2] * dw
        q += (along / np.float32(semi[axis])) ** 2
    return _Shape(sl, q <= 1.0, q)


def _tube(
    canvas: _Canvas, points: Sequence[Sequence[float]], radii: Sequence[float]
) -> _Shape | None:
    """Union of truncated cones along a polyline (radius interpolated along each segment)."""
    pts = np.asarray(points, dtype=np.float32)
    rad = np.asarray(radii, dtype=np.float32)
    reach = float(rad.max())
    sl = canvas.box(pts.min(axis=0) - reach, pts.max(axis=0) + reach)
    if sl is None:
        return None
    u, v, w = canvas.local(sl)
    mask = np.zeros(u.shape, dtype=bool)
    for a, b, ra, rb in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
        ab = b - a
        length2 = float(ab @ ab) or 1e-6
        pu, pv, pw = u - a[0], v - a[1], w - a[2]
        t = np.clip((pu * ab[0] + pv * ab[1] + pw * ab[2]) / length2, 0.0, 1.0)
        d2 = (pu - t * ab[0]) ** 2 + (pv - t * ab[1]) ** 2 + (pw - t * ab[2]) ** 2
        mask |= d2 <= (ra + t * (rb - ra)) ** 2
    return _Shape(sl, mask)


def _elliptic_cylinder(
    canvas: _Canvas, centre_uv: Sequence[float], semi_uv: Sequence[float], w_range: Sequence[float]
) -> _Shape | None:
    sl = canvas.box(
        (centre_uv[0] - semi_uv[0], centre_uv[1] - semi_uv[1], w_range[0]),
        (centre_uv[0] + semi_uv[0], centre_uv[1] + semi_uv[1], w_range[1]),
    )
    if sl is None:
        return None
    u, v, w = canvas.local(sl)
    q = ((u - centre_uv[0]) / semi_uv[0]) ** 2 + ((v - centre_uv[1]) / semi_uv[1]) ** 2
    return _Shape(sl, (q <= 1.0) & (w >= w_range[0]) & (w <= w_range[1]), q)


# --------------------------------------------------------------------------- the case


class _Anatomy:
    """Draws one case onto a canvas; ``labels`` maps organ names to the class set's ids."""

    def __init__(self, canvas: _Canvas, rng: np.random.Generator, labels: dict[str, int],
                 variability: float = 1.0) -> None:
        self.c = canvas
        self.rng = rng
        self.labels = labels
        # ``variability`` scales every between-case spread below (1 = the default phantom; the
        # random draws are the same, only their amplitudes change).
        self.v = v = variability
        # Body habitus, scales in-plane positions.
        self.scale = float(rng.uniform(1.0 - 0.08 * v, 1.0 + 0.08 * v))
        self.tissue = {k: val + float(rng.normal(0.0, 6.0 * v)) for k, val in HU.items()}
        # Contrast timing varies between scans (kept above a third of the nominal enhancement).
        enhancement = max(float(rng.uniform(1.0 - 0.15 * v, 1.0 + 0.15 * v)), 0.3)
        for key in ("aorta", "ivc", "portal", "kidney_cortex"):
            self.tissue[key] = HU[key] * enhancement + float(rng.normal(0.0, 5.0 * v))

    # -- helpers -------------------------------------------------------------------------

    def label(self, organ: str | None) -> int:
        return self.labels.get(organ, 0) if organ else 0

    def at(self, u: float, v: float, w: float, jitter: float = 4.0) -> Vec3:
        """A jittered position; in-plane coordinates follow the body size."""
        jitter *= self.v
        j = self.rng.normal(0.0, jitter, 3).clip(-2.5 * jitter, 2.5 * jitter)
        return (u * self.scale + j[0], v * self.scale + j[1], w + j[2])

    def size(self, *semi: float, spread: float = 0.08) -> Vec3:
        spread = min(spread * self.v, 0.6)
        f = self.rng.uniform(1.0 - spread, 1.0 + spread, 3)
        return (semi[0] * f[0] * self.scale, semi[1] * f[1] * self.scale, semi[2] * f[2])

    def angles(self, u: float = 0.0, v: float = 0.0, w: float = 0.0, jitter: float = 6.0) -> Vec3:
        j = np.deg2rad(self.rng.normal(0.0, jitter * self.v, 3))
        return (np.deg2rad(u) + j[0], np.deg2rad(v) + j[1], np.deg2rad(w) + j[2])

    def path(self, points: Sequence[Vec3], jitter: float = 3.0) -> list[Vec3]:
        shift = self.rng.normal(0.0, jitter * self.v, 3)
        return [
            (p[0] * self.scale + shift[0], p[1] * self.scale + shift[1], p[2] + shift[2])
            for p in points
        ]

    def fill(self, shape: _Shape | None, tissue: str | float, organ: str | None) -> None:
        if shape is None:
            return
        hu = self.tissue[tissue] if isinstance(tissue, str) else tissue
        self.c.paint(shape.sl, shape.mask, hu, self.label(organ))

    # -- body wall, bones, thorax ---------------------------------------------------------

    def body(self) -> None:
        a, b = 165.0 * self.scale, 120.0 * self.scale
        fat = float(self.rng.uniform(12.0, 30.0))
        wall = 10.0
        everywhere = (-1e4, 1e4)
        self.fill(_elliptic_cylinder(self.c, (0, 0), (a, b), everywhere), "fat_sc", None)
        self.fill(
            _elliptic_cylinder(self.c, (0, 0), (a - fat, b - fat), everywhere), "muscle", None
        )
        inner = (a - fat - wall, b - fat - wall)
        self.fill(_elliptic_cylinder(self.c, (0, 0), inner, everywhere), "fat", None)
        self.inner = inner

    def thorax(self) -> None:
        for side in (-1, 1):
            lung = _ellipsoid(self.c, self.at(75 * side, 35, 175, 6), self.size(75, 70, 80))
            self.fill(lung, "lung", None)
        self.fill(
            _ellipsoid(self.c, self.at(25, -45, 165, 6), self.size(65, 50, 45)), "heart", None
        )

    def ribs(self) -> None:
        a, b = self.inner
        sl = self.c.box((-a - 15, -b - 15, -30.0), (a + 15, b + 15, 1e4))
        if sl is None:
            return
        u, v, w = self.c.local(sl)
        radius = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        offset = float(self.rng.uniform(0.0, 32.0))
        # One rib every 32 mm craniocaudally, 10 mm thick, absent anteriorly (cartilage) and
        # near the spine (the paraspinal muscles are there).
        ring = (radius > 0.93) & (radius < 1.03) & (np.mod(w + offset, 32.0) < 10.0)
        ring &= (v > -0.45 * b) & (np.abs(u) > 45.0) & (w > -30.0)
        self.c.paint(sl, ring, self.tissue["cortical"] * 0.7, 0)

    def spine(self) -> None:
        column = (-1e4, 1e4)
        self.fill(
            _elliptic_cylinder(self.c, (0, 55 * self.scale), (24, 22), column), "cortical", None
        )
        self.fill(
            _elliptic_cylinder(self.c, (0, 55 * self.scale), (20, 18), column), "marrow", None
        )
        sl = self.c.box((-25, 30, -1e4), (25, 80, 1e4))
        if sl is not None:  # intervertebral discs every 34 mm
            u, v, w = self.c.local(sl)
            disc = (((u / 24) ** 2 + ((v - 55 * self.scale) / 22) ** 2) <= 1) & (
                np.mod(w + float(self.rng.uniform(0, 34)), 34.0) < 7.0
            )
            self.c.paint(sl, disc, self.tissue["disc"], 0)
        arch = _elliptic_cylinder(self.c, (0, 92 * self.scale), (16, 16), column)
        self.fill(arch, "cortical", None)
        self.fill(_elliptic_cylinder(self.c, (0, 88 * self.scale), (8, 8), column), "csf", None)
        self.fill(
            _elliptic_cylinder(self.c, (0, 110 * self.scale), (5, 10), column), "cortical", None
        )
        for side in (-1, 1):
            erector = _elliptic_cylinder(self.c, (38 * side, 92 * self.scale), (24, 18), column)
            self.fill(erector, "muscle", None)
            psoas = self.path([(30 * side, 48, 70), (42 * side, 42, -60), (58 * side, 25, -190)])
            self.fill(_tube(self.c, psoas, (7, 22, 22)), "muscle", None)

    def pelvis_bones(self) -> None:
        sacrum = _ellipsoid(self.c, self.at(0, 70, -200), self.size(45, 18, 55), self.angles(25))
        self.fill(sacrum, "cortical", None)
        for side in (-1, 1):
            wing = _ellipsoid(
                self.c,
                self.at(105 * side, 40, -175),
                self.size(14, 55, 45),
                self.angles(0, 0, 30 * side),
            )
            self.fill(wing, "cortical", None)
            if wing is not None and wing.q is not None:
                self.c.paint(wing.sl, wing.q < 0.55, self.tissue["marrow"], 0)
            head = _ellipsoid(self.c, self.at(95 * side, 10, -262), self.size(24, 24, 24))
            self.fill(head, "cortical", None)
            if head is not None:
                inner = _ellipsoid(
                    self.c, self.at(95 * side, 10, -262, 0.5), self.size(19, 19, 19, spread=0)
                )
                self.fill(inner, "marrow", None)

    # -- bowel (unlabelled distractors) ----------------------------------------------------

    def bowel(self, w_low: float) -> None:
        colon = self.path(
            [
                (-90, 15, -130),
                (-95, 0, -20),
                (-80, -35, 20),
                (0, -80, 5),
                (85, -25, 40),
                (95, 15, -40),
                (80, 10, -150),
                (20, 5, -215),
            ]
        )
        self.fill(_tube(self.c, colon, [22] * len(colon)), "bowel", None)
        self.fill(_tube(self.c, colon, [17] * len(colon)), "stool", None)
        for _ in range(int(self.rng.integers(3, 7))):  # gas pockets along the colon
            k = int(self.rng.integers(0, len(colon) - 1))
            t = float(self.rng.uniform(0.0, 1.0))
            centre = [a + t * (b - a) for a, b in zip(colon[k], colon[k + 1])]
            centre[1] -= 6.0  # gas rises to the non-dependent (anterior) side
            self.fill(_ellipsoid(self.c, centre, self.size(12, 9, 14, spread=0.3)), "gas", None)
        a, b = self.inner
        for _ in range(int(self.rng.integers(14, 24))):
            centre = (
                self.rng.uniform(-0.6, 0.6) * a,
                self.rng.uniform(-0.85, 0.1) * b,
                self.rng.uniform(w_low, 15.0),
            )
            loop = _ellipsoid(
                self.c, centre, self.size(16, 13, 16, spread=0.3), self.angles(jitter=40)
            )
            self.fill(loop, "bowel", None)
            if loop is not None and self.rng.random() < 0.3:
                lumen = _ellipsoid(self.c, centre, (7.0, 6.0, 7.0))
                self.fill(lumen, "gas", None)

    # -- organs ----------------------------------------------------------------------------

    def stomach(self) -> None:
        parts = [
            (self.at(55, 10, 92), self.size(40, 33, 30), self.angles()),
            (self.at(55, -35, 58), self.size(34, 28, 42), self.angles(0, 20, 0)),
            (self.at(12, -58, 28), self.size(34, 20, 20), self.angles(0, 0, -20)),
        ]
        for centre, semi, angles in parts:
            self.fill(_ellipsoid(self.c, centre, semi, angles), "stomach_wall", "stomach")
        for centre, semi, angles in parts:
            lumen = _ellipsoid(self.c, centre, [s - 5 for s in semi], angles)
            self.fill(lumen, "stomach_content", "stomach")
        if self.rng.random() < 0.6:  # an air cap in the non-dependent (anterior) fundus/body
            centre, semi, _ = parts[1]
            cap = _ellipsoid(
                self.c,
                (centre[0], centre[1] - semi[1] * 0.55, centre[2]),
                (semi[0] * 0.6, semi[1] * 0.35, semi[2] * 0.6),
            )
            self.fill(cap, "gas", "stomach")

    def liver(self) -> None:
        right = _ellipsoid(
            self.c, self.at(-68, 2, 58), self.size(72, 78, 63), self.angles(0, -10, 0)
        )
        left = _ellipsoid(
            self.c, self.at(-2, -48, 72), self.size(52, 28, 32), self.angles(0, 0, 15)
        )
        self.fill(right, "liver", "liver")
        self.fill(left, "liver", "liver")

    def spleen(self) -> None:
        shape = _ellipsoid(
            self.c, self.at(95, 48, 60), self.size(22, 46, 44), self.angles(0, 0, 35)
        )
        self.fill(shape, "spleen", "spleen")

    def kidneys(self) -> None:
        w_shift = float(self.rng.normal(0.0, 5.0))
        for organ, side, w in (("right kidney", -1, -15.0), ("left kidney", 1, 2.0)):
            centre = self.at(70 * side, 50, w + w_shift)
            angles = self.angles(0, -14 * side, -25 * side)
            shape = _ellipsoid(self.c, centre, self.size(27, 23, 52), angles)
            if shape is None:
                continue
            assert shape.q is not None
            cortex = np.where(
                shape.q > 0.45, self.tissue["kidney_cortex"], self.tissue["kidney_medulla"]
            )
            self.c.paint(shape.sl, shape.mask, cortex.astype(np.float32), self.label(organ))
            hilum = (centre[0] - 14 * side, centre[1] - 6, centre[2])
            sinus = _ellipsoid(self.c, hilum, (8.0, 7.0, 18.0), angles)
            if sinus is not None:
                sinus.mask &= self.c.label[sinus.sl] == self.label(organ)
                self.c.paint(sinus.sl, sinus.mask, self.tissue["renal_sinus"], None)

    def duodenum(self) -> None:
        loop = self.path(
            [
                (-15, -55, 25),
                (-40, -40, 25),
                (-50, -15, 15),
                (-50, -15, -35),
                (-25, 2, -50),
                (10, 0, -50),
                (28, -10, -30),
                (35, -20, -15),
            ]
        )
        self.fill(_tube(self.c, loop, [11] * len(loop)), "duodenum", "duodenum")
        self.fill(_tube(self.c, loop, [6] * len(loop)), "bowel_content", "duodenum")

    def pancreas(self) -> None:
        line = self.path([(-22, -15, -8), (0, -25, 5), (30, -15, 15), (68, 12, 25), (86, 28, 30)])
        self.fill(_tube(self.c, line, (15, 11, 10, 9, 7)), "pancreas", "pancreas")

    def gallbladder(self) -> None:
        shape = _ellipsoid(
            self.c, self.at(-48, -52, 8), self.size(16, 16, 34, spread=0.15), self.angles(-25, 0, 0)
        )
        self.fill(shape, "gallbladder", "gallbladder")

    def vessels(self, pelvis: bool) -> None:
        aorta = self.path([(12, 22, 200), (14, 26, 100), (12, 22, 0), (8, 20, -130)], 2.0)
        self.fill(_tube(self.c, aorta, (12, 11, 10, 9)), "aorta", "aorta")
        ivc = self.path([(-28, 8, 115), (-24, 16, 40), (-22, 18, -60), (-16, 20, -125)], 2.0)
        self.fill(_tube(self.c, ivc, (13, 12, 11, 11)), "ivc", "inferior vena cava")
        splenic = self.path([(85, 32, 35), (60, 8, 22), (30, -2, 12), (0, -8, 5)], 2.0)
        portal = self.path([(0, -8, 5), (-25, -10, 25), (-45, -5, 45), (-72, 0, 58)], 2.0)
        self.fill(_tube(self.c, splenic, (5, 5, 5, 6)), "portal", "portal and splenic veins")
        self.fill(_tube(self.c, portal, (7, 7, 6, 4)), "portal", "portal and splenic veins")
        # Unlabelled vessels with the same contrast: SMV, SMA, renal veins, iliac vessels.
        self.fill(
            _tube(self.c, self.path([(0, -10, 3), (-6, -22, -100)], 1.0), (5, 4)), "portal", None
        )
        self.fill(
            _tube(self.c, self.path([(12, 10, 10), (8, -14, -100)], 1.0), (4, 3)), "aorta", None
        )
        self.fill(
            _tube(self.c, self.path([(48, 42, 2), (12, 8, 0), (-20, 16, 0)], 1.0), (5, 5, 5)),
            "ivc",
            None,
        )
        if pelvis:
            for side in (-1, 1):
                artery = self.path(
                    [(8, 20, -130), (40 * side, 15, -190), (70 * side, 10, -265)], 1.0
                )
                self.fill(_tube(self.c, artery, (7, 6, 6)), "aorta", None)
                vein = self.path(
                    [(-16, 20, -125), (35 * side, 25, -190), (65 * side, 20, -265)], 1.0
                )
                self.fill(_tube(self.c, vein, (8, 8, 8)), "ivc", None)

    def adrenals(self) -> None:
        right = _ellipsoid(
            self.c, self.at(-38, 40, 58, 3), self.size(6, 13, 19, spread=0.1), self.angles(0, 0, 25)
        )
        left = _ellipsoid(
            self.c, self.at(36, 38, 42, 3), self.size(6, 13, 19, spread=0.1), self.angles(0, 0, -25)
        )
        self.fill(right, "adrenal", "right adrenal gland")
        self.fill(left, "adrenal", "left adrenal gland")

    def esophagus(self) -> None:
        line = self.path([(0, 2, 200), (2, 0, 125), (6, -4, 100), (28, -5, 88), (45, 0, 86)], 2.0)
        self.fill(_tube(self.c, line, (9, 9, 9, 9, 8)), "esophagus", "esophagus")

    def pelvic_organs(self) -> None:
        rectum = self.path([(20, 5, -215), (0, 45, -235), (0, 40, -290)], 2.0)
        self.fill(_tube(self.c, rectum, (16, 15, 14)), "bowel", None)
        self.fill(
            _ellipsoid(self.c, self.at(0, -40, -228), self.size(45, 34, 34, spread=0.15)),
            "bladder",
            "bladder",
        )
        if self.rng.random() < 0.5:
            shape = _ellipsoid(self.c, self.at(0, -12, -262), self.size(20, 15, 15), self.angles())
            self.fill(shape, "prostate", "prostate/uterus")
        else:
            shape = _ellipsoid(
                self.c, self.at(0, 5, -195), self.size(30, 22, 38), self.angles(-35, 0, 0)
            )
            self.fill(shape, "uterus", "prostate/uterus")

    def draw(self, pelvis: bool, w_low: float) -> None:
        self.body()
        self.thorax()
        self.ribs()
        self.spine()
        if pelvis:
            self.pelvis_bones()
        self.bowel(w_low)
        self.stomach()
        self.liver()
        self.spleen()
        self.kidneys()
        self.duodenum()
        self.pancreas()
        self.gallbladder()
        self.vessels(pelvis)
        self.adrenals()
        self.esophagus()
        if pelvis:
            self.pelvic_organs()


def _label_ids(class_set: ClassSet) -> dict[str, int]:
    unknown = [name for name in class_set.names if name not in ANATOMY_ORGANS]
    if unknown:
        raise ConfigError(
            f"phantom: class set {class_set.name!r} has organs the phantom does not draw: "
            f"{', '.join(unknown)}"
        )
    return {organ.name: organ.label for organ in class_set.organs}


def generate_case(
    seed: int | Sequence[int],
    shape: Sequence[int] = (112, 112, 80),
    spacing: Sequence[float] | None = None,
    class_set: ClassSet = SYNAPSE,
    noise_hu: float = 12.0,
    variability: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, Spacing3]:
    """One synthetic abdominal CT: (image float32 HU, label uint8, spacing), arrays (X, Y, Z).

    ``seed`` (an int or a tuple of ints) fixes everything. ``spacing`` defaults to
    :func:`default_spacing`, which fits the abdomen (and pelvis for AMOS) into ``shape``; with
    an explicit spacing the field of view is centred the same way and may cut organs off.
    Labels follow ``class_set`` (organs it does not list, e.g. the duodenum for Synapse, are
    drawn but labelled background). ``noise_hu`` is the standard deviation of the added noise.
    ``variability`` scales every between-case spread (body size, organ position, size and
    rotation jitter, deformation amplitude, tissue intensity offsets, contrast enhancement);
    1 is the default phantom, larger values make a cohort whose cases differ more.
    """
    if not variability >= 0:
        raise ConfigError(f"phantom variability must be >= 0, got {variability}")
    if not noise_hu >= 0:
        raise ConfigError(f"phantom noise_hu must be >= 0, got {noise_hu}")
    # scipy's gaussian_filter is the partial-volume blur; everything else is plain NumPy.
    from scipy.ndimage import gaussian_filter

    shape3: Shape3 = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if len(shape3) != 3 or min(shape3) < 8:
        raise ConfigError(f"phantom shape must be 3 sizes >= 8, got {tuple(shape)}")
    spacing3: Spacing3 = tuple(  # type: ignore[assignment]
        float(s) for s in (spacing if spacing is not None else default_spacing(shape3, class_set))
    )
    labels = _label_ids(class_set)
    rng = np.random.default_rng(seed)
    origin = _grid_origin(shape3, spacing3, class_set)
    deformation = float(rng.uniform(3.0, 7.0)) * variability
    canvas = _Canvas(shape3, spacing3, origin, rng, deformation_mm=deformation)
    pelvis = bool(_PELVIC_ORGANS & set(class_set.names))
    anatomy = _Anatomy(canvas, rng, labels, variability)
    anatomy.draw(pelvis, w_low=-200.0 if pelvis else -110.0)
    # Partial-volume blur (0.6 voxel) then scanner noise.
    image = gaussian_filter(canvas.hu, sigma=0.6, mode="nearest")
    image += rng.standard_normal(shape3, dtype=np.float32) * np.float32(noise_hu)
    np.clip(image, -1024.0, 3071.0, out=image)
    return image.astype(np.float32, copy=False), canvas.label, spacing3


# --------------------------------------------------------------------------- dataset


def phantom_case_ids(num_cases: int) -> list[str]:
    """Case ids of a phantom dataset: ``phantom0000``, ``phantom0001``, ..."""
    return [f"phantom{i:04d}" for i in range(num_cases)]


def generate_dataset(
    out_root: str | Path,
    num_cases: int = 30,
    shape: Sequence[int] = (112, 112, 80),
    class_set: ClassSet = SYNAPSE,
    seed: int = 0,
    spacing: Sequence[float] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    noise_hu: float = 12.0,
    variability: float = 1.0,
) -> Path:
    """Write ``num_cases`` phantom cases to ``out_root`` in the prepared (semiseg) layout.

    Stored like prepared real data: HU on the final grid (the phantom needs no resampling),
    with the GALoss intensity window (``ga``) recorded as default for loading. Case ``i`` uses
    seed ``(seed, i)``, so datasets of different sizes share their first cases. Resumable.
    """
    from tqdm.auto import tqdm

    from semiseg.data.prepare import get_profile
    from semiseg.data.store import CaseWriter

    if num_cases < 1:
        raise ConfigError(f"phantom: num_cases must be >= 1, got {num_cases}")
    params = get_profile("native")
    preprocessing = {
        **params.to_dict(),
        "source": "semiseg phantom (generated on its final grid)",
        "phantom": {
            "shape": [int(s) for s in shape],
            "seed": int(seed),
            "spacing": [float(s) for s in spacing] if spacing is not None else None,
            # Recorded only when not the default, so folders made before these knobs existed
            # keep matching the default phantom.
            **({"noise_hu": float(noise_hu)} if noise_hu != 12.0 else {}),
            **({"variability": float(variability)} if variability != 1.0 else {}),
        },
    }
    writer = CaseWriter(out_root, "phantom", class_set, preprocessing, overwrite=overwrite)
    ids = phantom_case_ids(num_cases)
    todo = [(i, case_id) for i, case_id in enumerate(ids) if not writer.done(case_id)]
    for i, case_id in tqdm(todo, desc="phantom", unit="case", disable=not progress):
        image, label, case_spacing = generate_case((seed, i), shape, spacing, class_set,
                                                   noise_hu=noise_hu, variability=variability)
        affine = phantom_affine(image.shape, case_spacing, class_set)
        record = {
            "profile": params.name,
            "original_shape": list(image.shape),
            "original_affine": affine.tolist(),
            "original_spacing": list(case_spacing),
            "crop_box": [[0, s] for s in image.shape],
            "resampled_shape": list(image.shape),
            "zoom": [1.0, 1.0, 1.0],
            "spacing": list(case_spacing),
            "phantom_seed": [int(seed), i],
        }
        writer.write(case_id, image, label, case_spacing, record)
    return Path(out_root)


def _split_sizes(num_cases: int) -> tuple[int, int, int]:
    # Synapse proportions 20 / 4 / 6 of 30, each subset non-empty when there are >= 3 cases.
    if num_cases < 3:
        raise ConfigError(
            f"phantom split needs at least 3 cases (train/eval/test), got {num_cases}"
        )
    n_eval = max(1, round(num_cases * 4 / 30))
    n_test = max(1, round(num_cases * 6 / 30))
    n_train = num_cases - n_eval - n_test
    if n_train < 1:
        n_train, n_test = 1, num_cases - 1 - n_eval
    return n_train, n_eval, n_test


def phantom_split(num_cases: int, class_set: str = "synapse") -> Split:
    """The phantom's split: train/eval/test in Synapse proportions (20/4/6 of 30) over
    :func:`phantom_case_ids`, labelled lists for ratios 0.1 and 0.2, and any other ratio computed
    as the first ``max(1, round(ratio * len(train)))`` training cases (nested across ratios)."""
    from semiseg.data.splits import Split

    ids = phantom_case_ids(num_cases)
    n_train, n_eval, _ = _split_sizes(num_cases)
    train = ids[:n_train]
    labeled = {f"{ratio:g}": train[: max(1, round(ratio * n_train))] for ratio in (0.1, 0.2)}
    return Split(
        name="phantom",
        dataset="phantom",
        class_set=class_set,
        source="semiseg synthetic phantom (Synapse proportions 20/4/6 of 30)",
        train=train,
        eval=ids[n_train : n_train + n_eval],
        test=ids[n_train + n_eval :],
        labeled=labeled,
        auto_ratios=True,
    )
