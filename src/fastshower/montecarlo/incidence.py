"""Incidence of the calorimeter gun: polar angle, azimuth and entry point, and upstream material.

Options (``BackendOptions.extra`` of a calorimeter request, all strings as on the command line):

* ``angle``: ``"DEG"`` or ``"LOW:HIGH"``, the polar angle theta to the calorimeter normal (+z) in degrees,
  drawn uniformly in [LOW, HIGH], within [0, 90).
* ``phi``: the azimuth in degrees (default ``"0:360"``), uniform; phi = 0 tilts the beam towards +x.
* ``position``: ``"X,Y"`` with X and Y each ``"MM"`` or ``"LOW:HIGH"``: the entry point on the front face (mm),
  uniform over the rectangle, which must lie on the face of every layer.
* ``upstream``: ``"MATERIAL:THICKNESS"`` (``G4_Pb:5.6mm``; mm, cm or m): a slab of that NIST material,
  :data:`UPSTREAM_GAP_MM` before the front face, as wide as the world.

Every request is checked here, before Geant4 starts, and refused with a one-line :class:`SimulationError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from fastshower.geometry import CartesianSegmentation, Geometry, PolarSegmentation
from fastshower.montecarlo.backend import BackendOptions, SimulationError

__all__ = ["OPTIONS", "UPSTREAM_GAP_MM", "Incidence", "directions", "parse_upstream", "polar_radius"]

#: distance between the upstream slab's back face and the calorimeter's front face, mm
UPSTREAM_GAP_MM = 20.0
#: the ``extra`` options this module reads (the calorimeter gun's; air showers take zenith and azimuth)
OPTIONS = ("angle", "phi", "position", "upstream")
_UNITS_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
Range = tuple[float, float]


def _parse_range(text: str, name: str, unit: str) -> Range:
    """``"a"`` or ``"a:b"`` -> (a, b) with a <= b, finite; SimulationError naming the option otherwise."""
    try:
        parts = [float(p) for p in str(text).strip().split(":")]
    except ValueError:
        raise SimulationError(f"cannot read --{name} {text!r}: expected {unit} or LOW:HIGH in {unit}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(math.isfinite(p) for p in parts) or parts[0] > parts[1]:
        raise SimulationError(f"bad --{name} {text!r}: expected {unit} or LOW:HIGH in {unit} with LOW <= HIGH")
    return parts[0], parts[1]


def parse_upstream(text: str) -> tuple[str, float]:
    """``"G4_Pb:5.6mm"`` -> ("G4_Pb", 5.6): a NIST material fastshower can simulate and a thickness in mm (> 0)."""
    from fastshower.montecarlo.g4data import Geant4DataError, elements_of

    material, colon, thickness = str(text).partition(":")
    if not colon:
        raise SimulationError(f"bad --upstream {text!r}: expected MATERIAL:THICKNESS, e.g. G4_Pb:5.6mm or G4_Al:2cm")
    try:
        elements_of([material])
    except Geant4DataError:
        raise SimulationError(f"unknown --upstream material {material!r}; choose a NIST material such as "
                              "G4_Pb, G4_Al, G4_Fe, G4_Cu, G4_W, G4_Si") from None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(mm|cm|m)\s*", thickness)
    if m is None or float(m.group(1)) <= 0:
        raise SimulationError(f"bad --upstream thickness {thickness!r}: expected a positive length with a unit, "
                              "e.g. G4_Pb:5.6mm or G4_Al:2cm")
    return material, float(m.group(1)) * _UNITS_MM[m.group(2)]


def polar_radius(seg: PolarSegmentation) -> float:
    """Radius of the Geant4 cylinders of a polar layer, mm: max(3 r_max, 300 mm), so the cells can follow the beam."""
    return max(3.0 * seg.r_edges[-1], 300.0)


def _face_half_width(geometry: Geometry) -> tuple[float, float]:
    """Half extent (x, y) of the front face every layer covers, mm: a cartesian read-out's area; for a polar
    layer, the cylinders' radius less the mesh radius (its mesh follows the entry point and must fit)."""
    hx = hy = math.inf
    for layer in geometry.layers:
        seg = layer.segmentation
        if isinstance(seg, CartesianSegmentation):
            lx, ly = seg.half_width
        else:
            lx = ly = (polar_radius(seg) - seg.r_edges[-1]) / math.sqrt(2.0)  # a square inside the disk
        hx, hy = min(hx, lx), min(hy, ly)
    return hx, hy


def _parse_position(text: str, geometry: Geometry) -> tuple[Range, Range]:
    """``"X,Y"`` -> ((x_lo, x_hi), (y_lo, y_hi)) in mm, checked to lie on the calorimeter's front face."""
    parts = str(text).split(",")
    if len(parts) != 2:
        raise SimulationError(f"bad --position {text!r}: expected X,Y with each MM or LOW:HIGH (mm), e.g. -10:10,0")
    xr, yr = (_parse_range(p, "position", "mm") for p in parts)
    hx, hy = _face_half_width(geometry)
    if xr[0] < -hx or xr[1] > hx or yr[0] < -hy or yr[1] > hy:
        raise SimulationError(f"--position {text!r} lies outside the front face of {geometry.name} "
                              f"(x within +-{hx:g} mm, y within +-{hy:g} mm)")
    return xr, yr


@dataclass(frozen=True)
class Incidence:
    """A checked incidence request; None fields were not asked for (normal incidence, default entry point).

    Attributes:
        theta: polar-angle range, degrees. phi: azimuth range, degrees.
        position: entry-point rectangle ((x_lo, x_hi), (y_lo, y_hi)), mm.
        upstream: (NIST material, thickness mm).
    """

    theta: Range | None
    phi: Range
    position: tuple[Range, Range] | None
    upstream: tuple[str, float] | None

    @classmethod
    def from_options(cls, geometry: Geometry, options: BackendOptions) -> Incidence:
        """Parse and check ``options.extra`` (see the module docstring); SimulationError on a bad value."""
        extra = options.extra
        if extra.get("zenith") is not None or extra.get("azimuth") is not None:
            raise SimulationError("--zenith and --azimuth are for air showers; a calorimeter takes --angle and --phi")
        theta = None
        if extra.get("angle") is not None:
            theta = _parse_range(extra["angle"], "angle", "degrees")
            if theta[0] < 0.0 or theta[1] >= 90.0:
                raise SimulationError(f"--angle {extra['angle']!r} must lie in [0, 90) degrees from the normal")
        phi = _parse_range(extra.get("phi") or "0:360", "phi", "degrees")
        if extra.get("phi") is not None and theta is None:
            raise SimulationError("--phi needs --angle (the azimuth of a tilted beam)")
        position = _parse_position(extra["position"], geometry) if extra.get("position") is not None else None
        upstream = parse_upstream(extra["upstream"]) if extra.get("upstream") is not None else None
        return cls(theta, phi, position, upstream)

    @property
    def max_theta(self) -> float:
        """Largest polar angle drawn, degrees (0 at normal incidence)."""
        return 0.0 if self.theta is None else self.theta[1]

    def draw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """``position`` (n, 2) mm when asked for, then ``angle`` (n, 2) as (theta, phi) degrees when asked for."""
        out: dict[str, np.ndarray] = {}
        if self.position is not None:
            (x0, x1), (y0, y1) = self.position
            out["position"] = rng.uniform([x0, y0], [x1, y1], size=(n, 2))
        if self.theta is not None:
            out["angle"] = rng.uniform([self.theta[0], self.phi[0]], [self.theta[1], self.phi[1]], size=(n, 2))
        return out


def directions(angle_deg: np.ndarray) -> np.ndarray:
    """Unit momentum directions (n, 3) from (theta, phi) in degrees, shape (n, 2); theta from +z, phi from +x."""
    a = np.radians(np.asarray(angle_deg, dtype=float).reshape(-1, 2))
    st = np.sin(a[:, 0])
    return np.stack([st * np.cos(a[:, 1]), st * np.sin(a[:, 1]), np.cos(a[:, 0])], axis=1)
