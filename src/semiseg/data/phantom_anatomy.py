"""The phantom's anatomy: tissue intensities and the organs drawn onto a
:class:`~semiseg.data.phantom_geometry.Canvas`, one case at a time.

Variation. Each case draws a body size, per-organ position/size/rotation jitter, per-tissue
intensity offsets, bowel gas and loops and the sex (prostate or uterus); organ means overlap
on purpose (liver ~60 HU, spleen ~50, pancreas ~40, muscle ~50, bowel ~35).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from semiseg.data.phantom_geometry import (
    Canvas,
    Region,
    Vec3,
    ellipsoid,
    elliptic_cylinder,
    tube,
)

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


# --------------------------------------------------------------------------- the case


class Anatomy:
    """Draws one case onto a canvas; ``labels`` maps organ names to the class set's ids."""

    def __init__(self, canvas: Canvas, rng: np.random.Generator, labels: dict[str, int],
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

    def fill(self, shape: Region | None, tissue: str | float, organ: str | None) -> None:
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
        self.fill(elliptic_cylinder(self.c, (0, 0), (a, b), everywhere), "fat_sc", None)
        self.fill(
            elliptic_cylinder(self.c, (0, 0), (a - fat, b - fat), everywhere), "muscle", None
        )
        inner = (a - fat - wall, b - fat - wall)
        self.fill(elliptic_cylinder(self.c, (0, 0), inner, everywhere), "fat", None)
        self.inner = inner

    def thorax(self) -> None:
        for side in (-1, 1):
            lung = ellipsoid(self.c, self.at(75 * side, 35, 175, 6), self.size(75, 70, 80))
            self.fill(lung, "lung", None)
        self.fill(
            ellipsoid(self.c, self.at(25, -45, 165, 6), self.size(65, 50, 45)), "heart", None
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
            elliptic_cylinder(self.c, (0, 55 * self.scale), (24, 22), column), "cortical", None
        )
        self.fill(
            elliptic_cylinder(self.c, (0, 55 * self.scale), (20, 18), column), "marrow", None
        )
        sl = self.c.box((-25, 30, -1e4), (25, 80, 1e4))
        if sl is not None:  # intervertebral discs every 34 mm
            u, v, w = self.c.local(sl)
            disc = (((u / 24) ** 2 + ((v - 55 * self.scale) / 22) ** 2) <= 1) & (
                np.mod(w + float(self.rng.uniform(0, 34)), 34.0) < 7.0
            )
            self.c.paint(sl, disc, self.tissue["disc"], 0)
        arch = elliptic_cylinder(self.c, (0, 92 * self.scale), (16, 16), column)
        self.fill(arch, "cortical", None)
        self.fill(elliptic_cylinder(self.c, (0, 88 * self.scale), (8, 8), column), "csf", None)
        self.fill(
            elliptic_cylinder(self.c, (0, 110 * self.scale), (5, 10), column), "cortical", None
        )
        for side in (-1, 1):
            erector = elliptic_cylinder(self.c, (38 * side, 92 * self.scale), (24, 18), column)
            self.fill(erector, "muscle", None)
            psoas = self.path([(30 * side, 48, 70), (42 * side, 42, -60), (58 * side, 25, -190)])
            self.fill(tube(self.c, psoas, (7, 22, 22)), "muscle", None)

    def pelvis_bones(self) -> None:
        sacrum = ellipsoid(self.c, self.at(0, 70, -200), self.size(45, 18, 55), self.angles(25))
        self.fill(sacrum, "cortical", None)
        for side in (-1, 1):
            wing = ellipsoid(
                self.c,
                self.at(105 * side, 40, -175),
                self.size(14, 55, 45),
                self.angles(0, 0, 30 * side),
            )
            self.fill(wing, "cortical", None)
            if wing is not None and wing.q is not None:
                self.c.paint(wing.sl, wing.q < 0.55, self.tissue["marrow"], 0)
            head = ellipsoid(self.c, self.at(95 * side, 10, -262), self.size(24, 24, 24))
            self.fill(head, "cortical", None)
            if head is not None:
                inner = ellipsoid(
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
        self.fill(tube(self.c, colon, [22] * len(colon)), "bowel", None)
        self.fill(tube(self.c, colon, [17] * len(colon)), "stool", None)
        for _ in range(int(self.rng.integers(3, 7))):  # gas pockets along the colon
            k = int(self.rng.integers(0, len(colon) - 1))
            t = float(self.rng.uniform(0.0, 1.0))
            centre = [a + t * (b - a) for a, b in zip(colon[k], colon[k + 1])]
            centre[1] -= 6.0  # gas rises to the non-dependent (anterior) side
            self.fill(ellipsoid(self.c, centre, self.size(12, 9, 14, spread=0.3)), "gas", None)
        a, b = self.inner
        for _ in range(int(self.rng.integers(14, 24))):
            centre = (
                self.rng.uniform(-0.6, 0.6) * a,
                self.rng.uniform(-0.85, 0.1) * b,
                self.rng.uniform(w_low, 15.0),
            )
            loop = ellipsoid(
                self.c, centre, self.size(16, 13, 16, spread=0.3), self.angles(jitter=40)
            )
            self.fill(loop, "bowel", None)
            if loop is not None and self.rng.random() < 0.3:
                lumen = ellipsoid(self.c, centre, (7.0, 6.0, 7.0))
                self.fill(lumen, "gas", None)

    # -- organs ----------------------------------------------------------------------------

    def stomach(self) -> None:
        parts = [
            (self.at(55, 10, 92), self.size(40, 33, 30), self.angles()),
            (self.at(55, -35, 58), self.size(34, 28, 42), self.angles(0, 20, 0)),
            (self.at(12, -58, 28), self.size(34, 20, 20), self.angles(0, 0, -20)),
        ]
        for centre, semi, angles in parts:
            self.fill(ellipsoid(self.c, centre, semi, angles), "stomach_wall", "stomach")
        for centre, semi, angles in parts:
            lumen = ellipsoid(self.c, centre, [s - 5 for s in semi], angles)
            self.fill(lumen, "stomach_content", "stomach")
        if self.rng.random() < 0.6:  # an air cap in the non-dependent (anterior) fundus/body
            centre, semi, _ = parts[1]
            cap = ellipsoid(
                self.c,
                (centre[0], centre[1] - semi[1] * 0.55, centre[2]),
                (semi[0] * 0.6, semi[1] * 0.35, semi[2] * 0.6),
            )
            self.fill(cap, "gas", "stomach")

    def liver(self) -> None:
        right = ellipsoid(
            self.c, self.at(-68, 2, 58), self.size(72, 78, 63), self.angles(0, -10, 0)
        )
        left = ellipsoid(
            self.c, self.at(-2, -48, 72), self.size(52, 28, 32), self.angles(0, 0, 15)
        )
        self.fill(right, "liver", "liver")
        self.fill(left, "liver", "liver")

    def spleen(self) -> None:
        shape = ellipsoid(
            self.c, self.at(95, 48, 60), self.size(22, 46, 44), self.angles(0, 0, 35)
        )
        self.fill(shape, "spleen", "spleen")

    def kidneys(self) -> None:
        w_shift = float(self.rng.normal(0.0, 5.0))
        for organ, side, w in (("right kidney", -1, -15.0), ("left kidney", 1, 2.0)):
            centre = self.at(70 * side, 50, w + w_shift)
            angles = self.angles(0, -14 * side, -25 * side)
            shape = ellipsoid(self.c, centre, self.size(27, 23, 52), angles)
            if shape is None:
                continue
            assert shape.q is not None
            cortex = np.where(
                shape.q > 0.45, self.tissue["kidney_cortex"], self.tissue["kidney_medulla"]
            )
            self.c.paint(shape.sl, shape.mask, cortex.astype(np.float32), self.label(organ))
            hilum = (centre[0] - 14 * side, centre[1] - 6, centre[2])
            sinus = ellipsoid(self.c, hilum, (8.0, 7.0, 18.0), angles)
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
        self.fill(tube(self.c, loop, [11] * len(loop)), "duodenum", "duodenum")
        self.fill(tube(self.c, loop, [6] * len(loop)), "bowel_content", "duodenum")

    def pancreas(self) -> None:
        line = self.path([(-22, -15, -8), (0, -25, 5), (30, -15, 15), (68, 12, 25), (86, 28, 30)])
        self.fill(tube(self.c, line, (15, 11, 10, 9, 7)), "pancreas", "pancreas")

    def gallbladder(self) -> None:
        shape = ellipsoid(
            self.c, self.at(-48, -52, 8), self.size(16, 16, 34, spread=0.15), self.angles(-25, 0, 0)
        )
        self.fill(shape, "gallbladder", "gallbladder")

    def vessels(self, pelvis: bool) -> None:
        aorta = self.path([(12, 22, 200), (14, 26, 100), (12, 22, 0), (8, 20, -130)], 2.0)
        self.fill(tube(self.c, aorta, (12, 11, 10, 9)), "aorta", "aorta")
        ivc = self.path([(-28, 8, 115), (-24, 16, 40), (-22, 18, -60), (-16, 20, -125)], 2.0)
        self.fill(tube(self.c, ivc, (13, 12, 11, 11)), "ivc", "inferior vena cava")
        splenic = self.path([(85, 32, 35), (60, 8, 22), (30, -2, 12), (0, -8, 5)], 2.0)
        portal = self.path([(0, -8, 5), (-25, -10, 25), (-45, -5, 45), (-72, 0, 58)], 2.0)
        self.fill(tube(self.c, splenic, (5, 5, 5, 6)), "portal", "portal and splenic veins")
        self.fill(tube(self.c, portal, (7, 7, 6, 4)), "portal", "portal and splenic veins")
        # Unlabelled vessels with the same contrast: SMV, SMA, renal veins, iliac vessels.
        self.fill(
            tube(self.c, self.path([(0, -10, 3), (-6, -22, -100)], 1.0), (5, 4)), "portal", None
        )
        self.fill(
            tube(self.c, self.path([(12, 10, 10), (8, -14, -100)], 1.0), (4, 3)), "aorta", None
        )
        self.fill(
            tube(self.c, self.path([(48, 42, 2), (12, 8, 0), (-20, 16, 0)], 1.0), (5, 5, 5)),
            "ivc",
            None,
        )
        if pelvis:
            for side in (-1, 1):
                artery = self.path(
                    [(8, 20, -130), (40 * side, 15, -190), (70 * side, 10, -265)], 1.0
                )
                self.fill(tube(self.c, artery, (7, 6, 6)), "aorta", None)
                vein = self.path(
                    [(-16, 20, -125), (35 * side, 25, -190), (65 * side, 20, -265)], 1.0
                )
                self.fill(tube(self.c, vein, (8, 8, 8)), "ivc", None)

    def adrenals(self) -> None:
        right = ellipsoid(
            self.c, self.at(-38, 40, 58, 3), self.size(6, 13, 19, spread=0.1), self.angles(0, 0, 25)
        )
        left = ellipsoid(
            self.c, self.at(36, 38, 42, 3), self.size(6, 13, 19, spread=0.1), self.angles(0, 0, -25)
        )
        self.fill(right, "adrenal", "right adrenal gland")
        self.fill(left, "adrenal", "left adrenal gland")

    def esophagus(self) -> None:
        line = self.path([(0, 2, 200), (2, 0, 125), (6, -4, 100), (28, -5, 88), (45, 0, 86)], 2.0)
        self.fill(tube(self.c, line, (9, 9, 9, 9, 8)), "esophagus", "esophagus")

    def pelvic_organs(self) -> None:
        rectum = self.path([(20, 5, -215), (0, 45, -235), (0, 40, -290)], 2.0)
        self.fill(tube(self.c, rectum, (16, 15, 14)), "bowel", None)
        self.fill(
            ellipsoid(self.c, self.at(0, -40, -228), self.size(45, 34, 34, spread=0.15)),
            "bladder",
            "bladder",
        )
        if self.rng.random() < 0.5:
            shape = ellipsoid(self.c, self.at(0, -12, -262), self.size(20, 15, 15), self.angles())
            self.fill(shape, "prostate", "prostate/uterus")
        else:
            shape = ellipsoid(
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
