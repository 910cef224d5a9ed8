"""Detector descriptions as data.

A :class:`Geometry` is a stack of readout layers along the beam axis ``z``. Each
:class:`ReadoutLayer` merges ``n_pairs`` absorber+active slabs and is segmented
either on a cartesian grid (``ny`` rows x ``nx`` columns, centred on the beam
axis) or on a polar grid (radial edges x ``n_alpha`` angular bins, centred on
the incident particle, as in the CaloChallenge).

Voxel order in a flattened shower (CaloChallenge convention): within a layer,
polar layers run radial bins fastest, then angular bins; cartesian layers run
columns (x) fastest, then rows (y); layers follow one another front to back.

All lengths are in mm. Materials are Geant4 NIST names (``G4_W``, ``G4_Si``, ...).
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fastshower.errors import FastshowerError

__all__ = [
    "CartesianSegmentation",
    "Geometry",
    "GeometryError",
    "PolarSegmentation",
    "ProfileAxis",
    "ReadoutLayer",
    "alpha_permutation",
    "convention_difference",
    "geometry_from_json",
    "get_geometry",
    "list_geometries",
    "read_calochallenge_binning",
]


class GeometryError(FastshowerError, ValueError):
    """An unknown or malformed detector description."""


@dataclass(frozen=True)
class CartesianSegmentation:
    """A grid of ``ny`` rows x ``nx`` columns of cells, centred on the z axis.

    Attributes:
        nx: number of columns (along x).
        ny: number of rows (along y).
        pitch_x: cell width along x, mm.
        pitch_y: cell width along y, mm.
    """

    nx: int
    ny: int
    pitch_x: float
    pitch_y: float
    kind: Literal["cartesian"] = "cartesian"

    @property
    def n_cells(self) -> int:
        return self.nx * self.ny

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape of the layer: (rows, columns) = (ny, nx)."""
        return (self.ny, self.nx)

    @property
    def half_width(self) -> tuple[float, float]:
        """Half extent (x, y) of the read-out area, mm."""
        return (0.5 * self.nx * self.pitch_x, 0.5 * self.ny * self.pitch_y)

    def cell_centres(self) -> np.ndarray:
        """Cell centres, shape (n_cells, 2) as (x, y) in mm, in voxel order."""
        xs = (np.arange(self.nx) - 0.5 * (self.nx - 1)) * self.pitch_x
        ys = (np.arange(self.ny) - 0.5 * (self.ny - 1)) * self.pitch_y
        yy, xx = np.meshgrid(ys, xs, indexing="ij")  # rows (y) slow, columns (x) fast
        return np.stack([xx.ravel(), yy.ravel()], axis=1)

    def cell_areas(self) -> np.ndarray:
        """Cell areas, shape (n_cells,), mm^2."""
        return np.full(self.n_cells, self.pitch_x * self.pitch_y)


@dataclass(frozen=True)
class PolarSegmentation:
    """Rings x angular sectors centred on the incident particle (CaloChallenge).

    Attributes:
        r_edges: radial bin edges, mm, strictly increasing, starting at 0.
        n_alpha: number of angular bins covering 2 pi (1 means rings only).
        alpha_min_deg: lower edge of the first angular bin, degrees. The CaloChallenge
            binning (``binning_dataset_2.xml`` read by its ``XMLHandler``) starts at -180,
            so bin k covers [-180 + k w, -180 + (k+1) w) with w = 360 / n_alpha and
            alpha = atan2(y, x); files written before fastshower 0.2 started at 0.
    """

    r_edges: tuple[float, ...]
    n_alpha: int
    kind: Literal["polar"] = "polar"
    alpha_min_deg: float = -180.0

    @property
    def n_r(self) -> int:
        return len(self.r_edges) - 1

    @property
    def n_cells(self) -> int:
        return self.n_r * self.n_alpha

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape of the layer: (alpha bins, radial bins)."""
        return (self.n_alpha, self.n_r)

    @property
    def half_width(self) -> tuple[float, float]:
        return (self.r_edges[-1], self.r_edges[-1])

    def r_centres(self) -> np.ndarray:
        """Radial bin centres, shape (n_r,), mm."""
        e = np.asarray(self.r_edges)
        return 0.5 * (e[1:] + e[:-1])

    def alpha_centres(self) -> np.ndarray:
        """Angular bin centres, shape (n_alpha,), radians from ``alpha_min_deg``."""
        return math.radians(self.alpha_min_deg) + (np.arange(self.n_alpha) + 0.5) * (2 * math.pi / self.n_alpha)

    def alpha_bin(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Angular bin index of points (x, y) (any shape, mm), int64 in [0, n_alpha)."""
        turns = (np.arctan2(y, x) - math.radians(self.alpha_min_deg)) / (2 * math.pi)
        ia = (np.mod(turns, 1.0) * self.n_alpha).astype(np.int64)
        return np.minimum(ia, self.n_alpha - 1)  # mod can round up to exactly 1.0

    def cell_centres(self) -> np.ndarray:
        """Cell centres, shape (n_cells, 2) as (x, y) in mm, in voxel order
        (radial bins fastest, then angular bins)."""
        aa, rr = np.meshgrid(self.alpha_centres(), self.r_centres(), indexing="ij")
        return np.stack([(rr * np.cos(aa)).ravel(), (rr * np.sin(aa)).ravel()], axis=1)

    def cell_areas(self) -> np.ndarray:
        """Cell areas, shape (n_cells,), mm^2."""
        e = np.asarray(self.r_edges)
        ring = math.pi * (e[1:] ** 2 - e[:-1] ** 2) / self.n_alpha
        return np.tile(ring, self.n_alpha)


Segmentation = CartesianSegmentation | PolarSegmentation


@dataclass(frozen=True)
class ReadoutLayer:
    """One readout layer: ``n_pairs`` x (absorber + active) read out together.

    Attributes:
        absorber: NIST material of the passive slab, or None (homogeneous).
        absorber_thickness: mm per pair (0 when homogeneous).
        active: NIST material of the sensitive slab.
        active_thickness: mm per pair.
        n_pairs: number of absorber+active pairs merged into this readout layer.
        segmentation: cartesian or polar cells.
        score: ``"active"`` (sampling calorimeter, CaloChallenge) or ``"all"``
            (active + absorber energy, as in CaloGAN's published files).
    """

    absorber: str | None
    absorber_thickness: float
    active: str
    active_thickness: float
    n_pairs: int
    segmentation: Segmentation
    score: Literal["active", "all"] = "active"

    @property
    def thickness(self) -> float:
        """Depth of the readout layer, mm."""
        return self.n_pairs * (self.absorber_thickness + self.active_thickness)

    @property
    def n_cells(self) -> int:
        return self.segmentation.n_cells


#: vertical depth of the ground (sea level, flat Earth) of air-shower profiles, g/cm^2: the slant
#: depth of the ground is this over cos(zenith), for the reference generator and the models alike
GROUND_VERTICAL_DEPTH = 1036.0


@dataclass(frozen=True)
class ProfileAxis:
    """Binning of a longitudinal air-shower profile.

    Attributes:
        x_max: last slant depth edge, g/cm^2 (bins start at 0).
        dx: bin width, g/cm^2.
        channels: names of the profile quantities, e.g. ("dEdX",) in MeV/(g/cm^2).
    """

    x_max: float
    dx: float
    channels: tuple[str, ...] = ("dEdX",)

    @property
    def n_bins(self) -> int:
        return round(self.x_max / self.dx)

    def centres(self) -> np.ndarray:
        """Bin centres, shape (n_bins,), g/cm^2."""
        return (np.arange(self.n_bins) + 0.5) * self.dx


@dataclass(frozen=True)
class Geometry:
    """A detector: readout layers (calorimeter) or a profile axis (air shower).

    Attributes:
        name: registry name.
        description: one line for listings.
        source: citation of the paper or repository whose dimensions are used.
        layers: readout layers front to back (empty for air-shower profiles).
        profile: the slant-depth axis for air-shower profiles, else None.
        particles: particles the detector is meant for (default first).
        energy: default energy spec (see :mod:`fastshower.energy`).
        notes: deviations from the source and other facts a user should know.
        energy_scale: stored voxel value per MeV deposited in the scoring volumes. CaloChallenge
            datasets 2 and 3 divide the silicon energy by the sampling fraction 0.033 (so
            E_tot/E_inc is about 1); 1.0 stores the deposited energy itself.
        voxel_threshold_mev: voxels below this value (on the stored scale) are set to 0;
            15.15 keV in CaloChallenge datasets 2 and 3.
    """

    name: str
    description: str
    source: str
    layers: tuple[ReadoutLayer, ...] = ()
    profile: ProfileAxis | None = None
    particles: tuple[str, ...] = ("e-",)
    energy: str = "1"
    notes: str = ""
    energy_scale: float = 1.0
    voxel_threshold_mev: float = 0.0
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False, hash=False)

    # --- sizes ---------------------------------------------------------------
    @property
    def kind(self) -> Literal["calorimeter", "airshower"]:
        return "airshower" if self.profile is not None else "calorimeter"

    @property
    def n_layers(self) -> int:
        if self.profile is not None:
            return len(self.profile.channels)
        return len(self.layers)

    @cached_property
    def layer_sizes(self) -> tuple[int, ...]:
        """Voxels per layer (per channel for profiles)."""
        if self.profile is not None:
            return tuple(self.profile.n_bins for _ in self.profile.channels)
        return tuple(layer.n_cells for layer in self.layers)

    @property
    def n_voxels(self) -> int:
        return int(sum(self.layer_sizes))

    @cached_property
    def layer_offsets(self) -> tuple[int, ...]:
        """Start index of each layer in the flattened shower; length n_layers + 1."""
        return tuple(int(v) for v in np.concatenate([[0], np.cumsum(self.layer_sizes)]))

    def layer_slice(self, i: int) -> slice:
        """Slice of the flattened shower that holds layer ``i``."""
        return slice(self.layer_offsets[i], self.layer_offsets[i + 1])

    def layer_shape(self, i: int) -> tuple[int, int]:
        """Image shape of layer ``i`` (see the segmentation's ``shape``)."""
        if self.profile is not None:
            return (1, self.profile.n_bins)
        return self.layers[i].segmentation.shape

    @property
    def depth(self) -> float:
        """Total depth of the calorimeter, mm."""
        return float(sum(layer.thickness for layer in self.layers))

    def layer_z_centres(self) -> np.ndarray:
        """Depth of each readout layer's centre from the front face, shape (n_layers,), mm."""
        t = np.array([layer.thickness for layer in self.layers])
        return np.cumsum(t) - 0.5 * t

    def materials(self) -> tuple[str, ...]:
        """NIST materials used, in order of first appearance."""
        out: list[str] = []
        for layer in self.layers:
            for m in (layer.absorber, layer.active):
                if m is not None and m not in out:
                    out.append(m)
        return tuple(out)

    @property
    def is_uniform(self) -> bool:
        """True when every layer has the same segmentation (image stacks as 3D)."""
        return len({layer.segmentation for layer in self.layers}) <= 1

    def to_readout_scale(self, deposited_mev: np.ndarray) -> np.ndarray:
        """Deposited energies (n, n_voxels), MeV -> stored voxel values: scaled, then thresholded."""
        out = np.asarray(deposited_mev, dtype=np.float32) * np.float32(self.energy_scale)
        if self.voxel_threshold_mev > 0:
            out[out < self.voxel_threshold_mev] = 0.0
        return out

    # --- serialisation -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_cache", None)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def summary(self) -> str:
        """Multi-line human description (for ``fastshower geometries NAME``); runs of identical layers share a line."""
        lines = [f"{self.name}: {self.description}", f"  source: {self.source}"]
        if self.profile is not None:
            p = self.profile
            lines.append(
                f"  slant depth 0-{p.x_max:g} g/cm^2 in {p.n_bins} bins of {p.dx:g} g/cm^2; "
                f"channels {', '.join(p.channels)}"
            )
        else:
            lines.append(f"  depth {self.depth:.1f} mm, {self.n_layers} readout layers")
            first = 0
            for i in range(1, self.n_layers + 1):
                if i < self.n_layers and self.layers[i] == self.layers[first]:
                    continue
                span = f"layer {first}" if i - 1 == first else f"layers {first}-{i - 1}"
                lines.append(f"  {span}: {_layer_text(self.layers[first])}")
                first = i
        lines.append(f"  voxels: {self.n_voxels}")
        if self.energy_scale != 1.0 or self.voxel_threshold_mev > 0:
            lines.append(f"  voxel values: MeV deposited in the scoring volumes x {self.energy_scale:.4g}, "
                         f"zero below {self.voxel_threshold_mev * 1e3:g} keV on that scale")
        lines.append(f"  particles: {', '.join(self.particles)}; default energy: {self.energy}")
        if self.notes:
            lines.append(f"  notes: {self.notes}")
        return "\n".join(lines)


def _layer_text(layer: ReadoutLayer) -> str:
    """One readout layer in words: its slabs, its cells and what it scores."""
    seg = layer.segmentation
    if isinstance(seg, CartesianSegmentation):
        cells = f"{seg.ny}x{seg.nx} cells of {seg.pitch_x:g}x{seg.pitch_y:g} mm (x*y)"
    else:
        cells = (
            f"{seg.n_r} r bins (edges {seg.r_edges[0]:g}..{seg.r_edges[-1]:g} mm) x {seg.n_alpha} alpha bins "
            f"of {360 / seg.n_alpha:g} deg from {seg.alpha_min_deg:g} deg (alpha = atan2(y, x))"
        )
    absorber = f"{layer.absorber_thickness:g} mm {layer.absorber} + " if layer.absorber else ""
    return (f"{layer.n_pairs} x ({absorber}{layer.active_thickness:g} mm {layer.active}) = "
            f"{layer.thickness:.1f} mm; {cells}; scores {layer.score}")


def _segmentation_from_dict(d: dict[str, Any]) -> Segmentation:
    if d.get("kind") == "polar":
        # files written before alpha_min_deg existed binned alpha from 0 (see PolarSegmentation)
        return PolarSegmentation(r_edges=tuple(float(r) for r in d["r_edges"]), n_alpha=int(d["n_alpha"]),
                                 alpha_min_deg=float(d.get("alpha_min_deg", 0.0)))
    if d.get("kind") == "cartesian":
        return CartesianSegmentation(
            nx=int(d["nx"]), ny=int(d["ny"]), pitch_x=float(d["pitch_x"]), pitch_y=float(d["pitch_y"])
        )
    raise GeometryError(f"unknown segmentation kind {d.get('kind')!r}")


def geometry_from_json(text: str | dict[str, Any]) -> Geometry:
    """Rebuild a :class:`Geometry` from :meth:`Geometry.to_json` output."""
    try:
        d = json.loads(text) if isinstance(text, str) else dict(text)
        layers = tuple(
            ReadoutLayer(
                absorber=la["absorber"],
                absorber_thickness=float(la["absorber_thickness"]),
                active=la["active"],
                active_thickness=float(la["active_thickness"]),
                n_pairs=int(la["n_pairs"]),
                segmentation=_segmentation_from_dict(la["segmentation"]),
                score=la.get("score", "active"),
            )
            for la in d.get("layers", ())
        )
        prof = d.get("profile")
        profile = (
            ProfileAxis(float(prof["x_max"]), float(prof["dx"]), tuple(prof["channels"])) if prof else None
        )
        return Geometry(
            name=d["name"],
            description=d.get("description", ""),
            source=d.get("source", ""),
            layers=layers,
            profile=profile,
            particles=tuple(d.get("particles", ("e-",))),
            energy=str(d.get("energy", "1")),
            notes=d.get("notes", ""),
            energy_scale=float(d.get("energy_scale", 1.0)),
            voxel_threshold_mev=float(d.get("voxel_threshold_mev", 0.0)),
        )
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise GeometryError(f"malformed geometry description: {exc}") from exc


# --- file conventions -------------------------------------------------------------
# Besides the detector, a geometry fixes how a file stores showers: where the angular bins start
# (PolarSegmentation.alpha_min_deg), the stored value per deposited MeV (Geometry.energy_scale) and the
# voxel threshold. Files of fastshower 0.1 carry none of these keys and read as alpha bins from 0 deg,
# deposited MeV and no threshold; the helpers below tell such a file from one of another detector and
# map its voxels onto the current conventions.


def _detector_dict(g: Geometry) -> dict[str, Any]:
    """``g.to_dict()`` without the file conventions and the free-text notes: the detector and its binning."""
    d = g.to_dict()
    for key in ("energy_scale", "voxel_threshold_mev", "notes"):
        d.pop(key, None)
    for layer in d["layers"]:
        layer["segmentation"].pop("alpha_min_deg", None)
    return d


def _alpha_starts(g: Geometry) -> tuple[float, ...]:
    """``alpha_min_deg`` of every polar layer, front to back."""
    return tuple(la.segmentation.alpha_min_deg for la in g.layers if isinstance(la.segmentation, PolarSegmentation))


def _joined(values: tuple[float, ...]) -> str:
    """Distinct values in order of first appearance, e.g. ``"0"`` or ``"0/-180"``."""
    return "/".join(f"{x:g}" for x in dict.fromkeys(values))


def convention_difference(a: Geometry, b: Geometry) -> str | None:
    """The file conventions in which ``a`` and ``b`` differ, ``a``'s value first, as one phrase, e.g.
    ``"alpha bins from 0 vs -180 deg; voxel value per deposited MeV 1 vs 30.3; zero below 0 vs 15.15 keV"``.

    ``""`` when both are the same detector and binning (notes aside) on the same conventions; None
    when they are not the same detector and binning.
    """
    if _detector_dict(a) != _detector_dict(b):
        return None
    parts = []
    if (sa := _alpha_starts(a)) != (sb := _alpha_starts(b)):
        parts.append(f"alpha bins from {_joined(sa)} vs {_joined(sb)} deg")
    if a.energy_scale != b.energy_scale:
        parts.append(f"voxel value per deposited MeV {a.energy_scale:.4g} vs {b.energy_scale:.4g}")
    if a.voxel_threshold_mev != b.voxel_threshold_mev:
        parts.append(f"zero below {a.voxel_threshold_mev * 1e3:g} vs {b.voxel_threshold_mev * 1e3:g} keV")
    return "; ".join(parts)


def alpha_permutation(src: Geometry, dst: Geometry) -> np.ndarray:
    """Voxel map from ``src``'s angular bins to ``dst``'s: ``showers_dst = showers_src[:, perm]``.

    Returns int64 indices, shape (n_voxels,). Both geometries must have the same cells layer by layer
    (``alpha_min_deg`` aside). In a polar layer bin k of ``src`` covers the same angles as bin
    (k + s) mod n_alpha of ``dst``, s = (src start - dst start) / bin width, which must be a whole number
    of bins (otherwise a cell of one straddles two of the other: :class:`GeometryError`); other layers
    map onto themselves.
    """
    if src.layer_sizes != dst.layer_sizes:
        raise GeometryError(f"{src.name!r} and {dst.name!r} have different cells per layer")
    perm = np.arange(src.n_voxels, dtype=np.int64)
    for i, (ls, ld) in enumerate(zip(src.layers, dst.layers, strict=True)):
        s, d = ls.segmentation, ld.segmentation
        if not (isinstance(s, PolarSegmentation) and isinstance(d, PolarSegmentation)):
            continue
        if (s.n_alpha, s.r_edges) != (d.n_alpha, d.r_edges):
            raise GeometryError(f"layer {i}: {src.name!r} and {dst.name!r} have different polar bins")
        shift = (s.alpha_min_deg - d.alpha_min_deg) * s.n_alpha / 360.0
        if abs(shift - round(shift)) > 1e-6:
            raise GeometryError(
                f"layer {i}: alpha bins from {s.alpha_min_deg:g} deg cannot be moved onto bins from "
                f"{d.alpha_min_deg:g} deg: the shift is {shift:.4g} bins of {360 / s.n_alpha:g} deg, not a whole number"
            )
        block = perm[src.layer_slice(i)].reshape(s.n_alpha, s.n_r)
        perm[src.layer_slice(i)] = np.roll(block, round(shift), axis=0).ravel()  # new[j] = old[j - shift]
    return perm


# --- built-in detectors ---------------------------------------------------------


def _uniform(
    n_layers: int,
    absorber: str | None,
    t_abs: float | Sequence[float],
    active: str,
    t_act: float,
    seg: Segmentation,
    n_pairs: int = 1,
    score: Literal["active", "all"] = "active",
) -> tuple[ReadoutLayer, ...]:
    """``n_layers`` readout layers of ``n_pairs`` absorber + active pairs each, all with segmentation ``seg``.

    ``t_abs``: absorber thickness in mm, one value for all layers or one per layer; ``t_act``: active, mm.
    """
    t = [t_abs] * n_layers if isinstance(t_abs, (int, float)) else list(t_abs)
    return tuple(ReadoutLayer(absorber, float(t[i]), active, t_act, n_pairs, seg, score) for i in range(n_layers))


#: CaloChallenge datasets 2 and 3: silicon energy is divided by the sampling fraction 0.033 and voxels
#: below 15.15 keV on that scale are zero (CaloChallenge 2022, arXiv:2410.21611, dataset description)
CALOCHALLENGE_ENERGY_SCALE = 1.0 / 0.033
CALOCHALLENGE_THRESHOLD_MEV = 0.01515


def _par04(n_r: int, n_alpha: int, dr: float, ds: int) -> Geometry:
    """Geant4 Par04 / CaloChallenge dataset ``ds``: 45 polar layers of ``n_r`` rings of ``dr`` mm x ``n_alpha``."""
    return Geometry(
        name=f"par04-ds{ds}",
        description=f"Geant4 Par04 / CaloChallenge dataset {ds}: Si-W, 45 layers x {n_r} r x {n_alpha} alpha",
        source=(
            "Geant4 examples/extended/parameterisations/Par04; CaloChallenge 2022 dataset "
            f"{ds} (arXiv:2410.21611): 90 x (1.4 mm W + 0.3 mm Si), pairs merged into 45 readout layers, "
            f"{n_r} radial bins of {dr:g} mm x {n_alpha} angular bins"
        ),
        layers=_uniform(
            45, "G4_W", 1.4, "G4_Si", 0.3,
            PolarSegmentation(tuple(round(i * dr, 6) for i in range(n_r + 1)), n_alpha), n_pairs=2,
        ),
        particles=("e-", "gamma", "e+"),
        energy="1:1000:log",
        notes=("energy outside the outermost radial edge is not scored, as in the CaloChallenge files; "
               "voxels hold silicon energy / 0.033 (the challenge's sampling fraction) above 15.15 keV"),
        energy_scale=CALOCHALLENGE_ENERGY_SCALE,
        voxel_threshold_mev=CALOCHALLENGE_THRESHOLD_MEV,
    )


def _belle2_ecl() -> Geometry:
    """Belle II-like ECL: a 5x5 array of CsI(Tl) crystals (homogeneous, one cartesian layer)."""
    return Geometry(
        name="belle2-ecl-5x5",
        description="Belle II-like ECL: 5x5 CsI(Tl) crystals, 6x6x30 cm, homogeneous",
        source=(
            "Belle II Technical Design Report (arXiv:1011.0352), ECL: CsI(Tl) crystals 30 cm "
            "(16.1 X0) long with ~6x6 cm faces"
        ),
        layers=(ReadoutLayer(None, 0.0, "G4_CESIUM_IODIDE", 300.0, 1, CartesianSegmentation(5, 5, 60.0, 60.0)),),
        particles=("e-", "gamma", "e+", "pi+", "pi-"),
        energy="0.5,1,1.5,2.5",
        notes=(
            "crystals are straight boxes without wrapping or gaps; the entry point is smeared uniformly "
            "over the centre crystal's face and stored as conditions/position (mm)"
        ),
    )


def _calogan() -> Geometry:
    """CaloGAN's 3-layer Pb/LAr sampling calorimeter; cells score absorber + active energy."""
    return Geometry(
        name="calogan-3layer",
        description="CaloGAN 3-layer Pb/LAr calorimeter, 480 mm deep, 3x96 + 12x12 + 12x6 cells",
        source=(
            "Paganini, de Oliveira, Nachman, arXiv:1712.10321 and 1705.02355: 2 mm Pb + 4 mm LAr, 480 mm "
            "deep, layers 90/347/43 mm; cells 160x5, 40x40, 40x80 mm (eta x phi)"
        ),
        layers=(
            ReadoutLayer("G4_Pb", 2.0, "G4_lAr", 4.0, 15, CartesianSegmentation(96, 3, 5.0, 160.0), "all"),
            ReadoutLayer("G4_Pb", 2.0, "G4_lAr", 4.0, 58, CartesianSegmentation(12, 12, 40.0, 40.0), "all"),
            ReadoutLayer("G4_Pb", 2.0, "G4_lAr", 4.0, 7, CartesianSegmentation(6, 12, 80.0, 40.0), "all"),
        ),
        particles=("e+", "gamma", "pi+"),
        energy="1:100",
        notes=(
            "readout boundaries are put on whole Pb+LAr pairs: 15/58/7 pairs = 90/348/42 mm instead of "
            "90/347/43 mm; cells score absorber + active energy as the published CaloGAN files do"
        ),
    )


def _ild_siw() -> Geometry:
    """ILD-like Si-W ECAL of BIB-AE: 30 layers of 30x30 cartesian cells."""
    return Geometry(
        name="ild-siw-30",
        description="ILD-like Si-W ECAL: 30 layers, 30x30 cells of 5.1 mm",
        source=(
            "ILD ECAL as used by BIB-AE (Buhmann et al., arXiv:2005.05334): W 2.1 mm (layers 1-20) and "
            "4.2 mm (21-30), Si 0.5 mm, 5.1 mm cells, 30x30 cells around the impact point"
        ),
        layers=_uniform(30, "G4_W", [2.1] * 20 + [4.2] * 10, "G4_Si", 0.5, CartesianSegmentation(30, 30, 5.1, 5.1)),
        particles=("gamma", "e-"),
        energy="10:100",
        notes="flat slabs without PCB, cooling or gaps between wafers",
    )


def _clic_siw() -> Geometry:
    """CLIC-like Si-W ECAL of the 3DGAN papers: 25 layers of 51x51 cartesian cells."""
    return Geometry(
        name="siw-51x51x25",
        description="CLIC-like Si-W ECAL of the 3DGAN papers: 25 layers of 51x51 cells of 5.1 mm",
        source=(
            "3DGAN (Khattak et al., arXiv:2103.10142) on the CLIC ECAL (CLICdp ECal twiki): 25 layers, "
            "17 x 2.4 mm W then 8 x 4.8 mm W, Si pads 5.1x5.1 mm"
        ),
        layers=_uniform(25, "G4_W", [2.4] * 17 + [4.8] * 8, "G4_Si", 0.5, CartesianSegmentation(51, 51, 5.1, 5.1)),
        particles=("e-", "gamma", "pi+"),
        energy="2:500",
        notes="Si thickness 0.5 mm assumed; flat slabs, no PCB or gaps",
    )


def _airshower_profile() -> Geometry:
    """Longitudinal air-shower profiles (dE/dX and charged-particle number vs slant depth)."""
    return Geometry(
        name="airshower-profile",
        description="air-shower longitudinal profile: slant depth 0-3200 g/cm^2 in 10 g/cm^2 bins",
        source="CONEX-style profiles (Bergmann et al., astro-ph/0606564); KIT profile-GAN study",
        profile=ProfileAxis(3200.0, 10.0, ("dEdX", "Ne")),
        particles=("p", "He", "N", "Fe"),
        energy="1e17eV:1e19eV:log",
        notes="dEdX in MeV/(g/cm^2), Ne = number of charged particles; bins below ground are zero",
    )


def _builtins() -> dict[str, Geometry]:
    """The built-in detectors by name, in registry order (one builder per detector family)."""
    g = [_belle2_ecl(), _calogan(), _ild_siw(), _par04(9, 16, 4.65, 2), _par04(18, 50, 2.325, 3), _clic_siw(),
         _airshower_profile()]
    return {geo.name: geo for geo in g}


_REGISTRY: dict[str, Geometry] = _builtins()


def list_geometries() -> list[Geometry]:
    """All built-in detectors, in registry order."""
    return list(_REGISTRY.values())


def get_geometry(name: str) -> Geometry:
    """A built-in detector by name, or one read from a CaloChallenge binning XML path."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.endswith(".xml") and Path(name).is_file():
        return read_calochallenge_binning(name)
    raise GeometryError(f"unknown geometry {name!r}; choose one of: {', '.join(_REGISTRY)}")


#: particle names of the CaloChallenge binning files -> fastshower's (see io.PDG)
_CALOCHALLENGE_PARTICLES = {"electron": "e-", "photon": "gamma", "pion": "pi+"}


def read_calochallenge_binning(path: str | Path, name: str | None = None) -> Geometry:
    """Read a CaloChallenge binning XML: ``<Bins><Bin pid name><Layer id r_edges n_bin_alpha/>...``.

    As the challenge's ``XMLHandler``, the first element that holds ``<Layer>`` children is the
    particle's binning, angular bins start at -180 deg (``alpha = atan2(y, x)``) and voxels run
    radial bins fastest, then angular bins, layer after layer. Layers without radial bins
    (``r_edges="0"``, as in dataset 1) hold no voxels in the challenge's files and are skipped, so
    layer i of the result is the i-th layer with cells. Only the binning is known from such a file,
    so layers have no materials (``active="unknown"``) and values are taken as stored
    (``energy_scale`` 1): the result serves evaluation and training, not simulation.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise GeometryError(f"{path}: not a readable binning XML ({exc})") from exc
    bins = [el for el in root.iter() if el.find("Layer") is not None]
    if not bins:
        raise GeometryError(f"{path}: no element with <Layer> children (expected <Bins><Bin ...><Layer .../>)")
    layers: list[ReadoutLayer] = []
    try:
        for el in bins[0].iter("Layer"):
            edges = tuple(float(v) for v in (el.get("r_edges") or "").split(",") if v.strip())
            if len(edges) < 2:
                continue  # a layer without cells contributes no voxels in the CaloChallenge files
            seg = PolarSegmentation(edges, int(el.get("n_bin_alpha", "1")), alpha_min_deg=-180.0)
            layers.append(ReadoutLayer(None, 0.0, "unknown", 1.0, 1, seg))
    except ValueError as exc:
        raise GeometryError(f"{path}: malformed <Layer> ({exc})") from exc
    if not layers:
        raise GeometryError(f"{path}: no <Layer> with r_edges")
    particle = bins[0].get("name", "")
    return Geometry(
        name=name or path.stem,
        description=f"CaloChallenge binning read from {path.name}",
        source=str(path),
        layers=tuple(layers),
        particles=(_CALOCHALLENGE_PARTICLES.get(particle, particle),) if particle else ("e-",),
        energy="1:1000:log",
    )
