"""The phantom's geometry: its anatomical frame, the voxel canvas it is painted on, and the
shapes (ellipsoids, tubes, elliptic cylinders) its organs are made of.

Frame. Structures are laid out in millimetres in an anatomical frame: ``u`` towards the
patient's left, ``v`` towards the back (posterior), ``w`` towards the head (superior), origin on
the body axis at the level of the renal hila. Voxel index X grows with ``u``, Y with ``v``, Z
with ``w``: the usual voxel order of an axial CT (radiological display: patient's right on the
image left, anterior at the top). :func:`phantom_affine` gives the matching RAS+ affine,
diag(-sx, -sy, sz).

Everything is vectorised NumPy evaluated inside each structure's bounding box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from semiseg.data.classes import SYNAPSE, ClassSet

Shape3 = tuple[int, int, int]
Spacing3 = tuple[float, float, float]
Vec3 = tuple[float, float, float]

# In-plane field of view (mm) and the superior-inferior range (w, mm) shown for each region.
_INPLANE_FOV = 392.0
_ABDOMEN_RANGE = (-115.0, 125.0)  # lower kidney poles to the oesophageal hiatus
_PELVIS_RANGE = (-280.0, 125.0)  # down to the prostate / pelvic floor
PELVIC_ORGANS = {"bladder", "prostate/uterus"}


# --------------------------------------------------------------------------- geometry


def _anatomy_range(class_set: ClassSet) -> tuple[float, float]:
    return _PELVIS_RANGE if PELVIC_ORGANS & set(class_set.names) else _ABDOMEN_RANGE


def default_spacing(shape: Sequence[int], class_set: ClassSet = SYNAPSE) -> Spacing3:
    """Spacing (mm) at which ``shape`` covers the phantom's field of view: 392 mm in-plane and
    the abdomen (240 mm) or, when the class set has pelvic organs, abdomen and pelvis (405 mm).
    112x112x80 gives 3.5 x 3.5 x 3.0 mm (Synapse) or 3.5 x 3.5 x 5.06 mm (AMOS)."""
    lo, hi = _anatomy_range(class_set)
    return (_INPLANE_FOV / shape[0], _INPLANE_FOV / shape[1], (hi - lo) / shape[2])


def grid_origin(shape: Sequence[int], spacing: Sequence[float], class_set: ClassSet) -> Vec3:
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
    origin = grid_origin(shape, spacing, class_set)
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


class Canvas:
    """The voxel grid being painted: deformed coordinates, HU (``background_hu`` where nothing
    is painted) and label arrays."""

    def __init__(
        self,
        shape: Shape3,
        spacing: Spacing3,
        origin: Vec3,
        rng: np.random.Generator,
        deformation_mm: float,
        background_hu: float,
    ) -> None:
        self.shape = shape
        self.spacing = spacing
        self.origin = origin
        self.axes = [
            (origin[a] + spacing[a] * np.arange(shape[a])).astype(np.float32) for a in range(3)
        ]
        self.margin = deformation_mm
        self.coords = self._deformed_coordinates(rng, deformation_mm)
        self.hu = np.full(shape, background_hu, dtype=np.float32)
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
class Region:
    """A painted region: its box and boolean mask inside the box, plus the quadric value."""

    sl: tuple[slice, ...]
    mask: np.ndarray
    q: np.ndarray | None = None


def ellipsoid(
    canvas: Canvas,
    centre: Sequence[float],
    semi: Sequence[float],
    angles: Sequence[float] = (0, 0, 0),
) -> Region | None:
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
    return Region(sl, q <= 1.0, q)


def tube(
    canvas: Canvas, points: Sequence[Sequence[float]], radii: Sequence[float]
) -> Region | None:
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
    return Region(sl, mask)


def elliptic_cylinder(
    canvas: Canvas, centre_uv: Sequence[float], semi_uv: Sequence[float], w_range: Sequence[float]
) -> Region | None:
    sl = canvas.box(
        (centre_uv[0] - semi_uv[0], centre_uv[1] - semi_uv[1], w_range[0]),
        (centre_uv[0] + semi_uv[0], centre_uv[1] + semi_uv[1], w_range[1]),
    )
    if sl is None:
        return None
    u, v, w = canvas.local(sl)
    q = ((u - centre_uv[0]) / semi_uv[0]) ** 2 + ((v - centre_uv[1]) / semi_uv[1]) ** 2
    return Region(sl, (q <= 1.0) & (w >= w_range[0]) & (w <= w_range[1]), q)
