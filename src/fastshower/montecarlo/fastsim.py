"""Fast simulation inside Geant4: a trained run replaces the showers of e+/e-/gamma entering the calorimeter.

Full Geant4 tracking everywhere (the upstream slab, the gap, the particles below threshold inside the
calorimeter), but each e+, e- or gamma that crosses the calorimeter's front face with a kinetic energy at or
above the threshold, and inside the run's trained domain, is killed at its entry point and its state (kinetic
energy, entry point, direction) recorded. geant4-pybind has no ``G4VFastSimulationModel``: a Python sensitive
detector on the world volume sees every step in the world, and the step that ends on the front face
(``fGeomBoundary`` at z = front face, moving in) is the entry. At the end of the event the run's model
generates one shower per recorded particle (one call for the event, or one call per particle), and every
non-zero cell of each shower is placed in space and scored by the readout the full simulation fills:

* polar readouts (Par04): the shower's mesh in the particle's own frame (Par04's: across and along its
  momentum, from its entry point) is placed at the entry point along the direction; each cell's centre, at
  its layer's mid-depth, becomes a point in the world, binned by the event's readout (the primary's mesh);
* cartesian readouts: the cells are fixed in the detector, so a run conditioned on ``position`` and
  ``angle`` generates the cells of the entry point and direction themselves (placed as they are); what a run
  does not condition on is done in space: a run without ``position`` has its shower (made at the centre)
  moved to the entry point, a run without ``angle`` (only with ``allow_extrapolation``) has its
  normal-incidence shower turned along the direction about the entry point, as Par04 places its mesh.

One point per cell, as Par04 deposits its mesh (``G4FastSimHitMaker`` at the cell centres). Energies out of
the model are on the run's readout scale (``Geometry.energy_scale``) and are divided by it before they join
the event's deposits, so the file's scaling and voxel threshold apply to the sum as in full simulation.

The model itself comes from a higher floor: :class:`FastSim` carries the run's facts as plain data and a
picklable ``loader`` (``fastshower.fastsim_model.load_generator``) that each worker calls once to get a
:data:`ShowerGenerator`. Requests are checked here (:func:`check_fast_sim`), before Geant4 starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastshower.domain import TrainedDomain
from fastshower.geometry import CartesianSegmentation, Geometry, PolarSegmentation, convention_difference
from fastshower.montecarlo.backend import SimulationError
from fastshower.montecarlo.incidence import Incidence

__all__ = [
    "FAST_SIM_BATCHES",
    "FAST_SIM_TRUTH",
    "FastSim",
    "FastSimHook",
    "ShowerGenerator",
    "check_fast_sim",
    "from_shower_frame",
    "readout_layer",
]

#: how the model is called: once per event for all its replaced particles, or once per particle (batch 1)
FAST_SIM_BATCHES = ("event", "particle")
#: inference engines: torch, or ONNX Runtime on an exported file of the run
FAST_SIM_INFERENCE = ("torch", "onnx")
#: per-event truth of a fast-simulated file: particles replaced, their summed entry energy (MeV), and e+/e-/gamma
#: above threshold that entered outside the run's trained angles or entry points (tracked in full)
FAST_SIM_TRUTH = {"n_fastsim": 1, "e_fastsim": 1, "n_outside": 1}
#: PDG codes of the particles the model replaces
EM_PDG = (11, -11, 22)
#: particles a run must be trained on to replace e+/e-/gamma
EM_PARTICLES = ("e-", "e+", "gamma")
#: the conditions fast simulation can give a model (besides the energy)
SUPPORTED_CONDITIONS = ("angle", "position")
#: a trained range is widened by this fraction of its span (and 1e-6) on each side before a particle is refused
RANGE_MARGIN = 0.01
#: a point this close to the front face (mm) is on it
_ON_FACE_MM = 1e-6

#: (energies (k,) MeV, conditions {name: (k, width)}, noise seeds (k,) uint64) -> showers (k, V), the run's
#: readout scale; the same seed gives the same shower whatever else is in the call
ShowerGenerator = Callable[[np.ndarray, dict[str, np.ndarray], np.ndarray], np.ndarray]


@dataclass(frozen=True)
class FastSim(TrainedDomain):
    """A trained run as Geant4's fast simulation: its facts (checked against a request before Geant4 starts) and
    how a worker gets its model. Built by ``fastshower.fastsim_model.fast_sim_model``.

    Attributes:
        geometry, particle, cond_names, cond_widths, cond_ranges, energy_range_mev: the run's trained domain
            (:class:`~fastshower.domain.TrainedDomain`); the geometry must be the simulated calorimeter, the
            particle e-, e+ or gamma, the conditions of :data:`SUPPORTED_CONDITIONS`.
        run: the run folder (resolved path). run_id, model: its name and "model step N" for provenance.
        threshold_mev: particles at or above this kinetic energy are replaced, MeV.
        batch: one of :data:`FAST_SIM_BATCHES`. inference: one of :data:`FAST_SIM_INFERENCE`.
        onnx_path: the exported file ONNX inference runs (``inference == "onnx"``).
        sample_options: torch sampler settings (ODE ``steps``, ``method``); an ONNX graph has its own fixed.
        allow_extrapolation: replace particles outside the trained angles, entry points and energies too.
        warnings: the extrapolations the request makes (set by the production driver from :func:`check_fast_sim`).
        loader: picklable; ``loader(self)`` in a worker returns the :data:`ShowerGenerator`.
    """

    run: str
    run_id: str
    model: str
    threshold_mev: float
    batch: str = "event"
    inference: str = "torch"
    onnx_path: str | None = None
    sample_options: dict[str, Any] = field(default_factory=dict)
    allow_extrapolation: bool = False
    warnings: tuple[str, ...] = ()
    loader: Callable[[FastSim], ShowerGenerator] | None = field(default=None, compare=False)

    def options(self) -> dict[str, str]:
        """The request as the file records it (``option_*`` attributes; a resume must give the same)."""
        out = {"fast_sim": self.run, "fast_sim_run_id": self.run_id, "fast_sim_model": self.model,
               "fast_sim_threshold_mev": f"{self.threshold_mev:g}", "fast_sim_batch": self.batch,
               "fast_sim_inference": self.inference if self.onnx_path is None else f"onnx {self.onnx_path}"}
        if self.sample_options:
            out["fast_sim_sample_options"] = ", ".join(f"{k}={v}" for k, v in sorted(self.sample_options.items()))
        if self.allow_extrapolation:
            out["allow_extrapolation"] = "true"
        return out

    def describe(self) -> str:
        """One phrase for the file's ``physics`` attribute (with the extrapolations allowed, as warnings)."""
        text = (f"fast simulation: e+/e-/gamma entering the front face at >= {self.threshold_mev:g} MeV replaced by "
                f"run {self.run_id} ({self.model}, {self.inference}, batch per {self.batch})")
        return text + "".join(f" ; WARNING extrapolating: {w}" for w in self.warnings)

    def widened(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The trained range of condition ``name`` widened by :data:`RANGE_MARGIN`: (low (w,), high (w,))."""
        lo, hi = (np.asarray(v, dtype=float) for v in self.cond_ranges[name])
        pad = RANGE_MARGIN * (hi - lo) + 1e-6
        return lo - pad, hi + pad


# --- checks before Geant4 starts ---------------------------------------------------------------------


def _check_geometry(fs: FastSim, geometry: Geometry) -> None:
    diff = convention_difference(fs.geometry, geometry)
    if diff is None:
        raise SimulationError(f"--fast-sim run {fs.run_id} was trained on geometry {fs.geometry.name!r}, which "
                              f"differs from the simulated calorimeter {geometry.name!r}; use a run of this detector")
    if diff:
        raise SimulationError(f"--fast-sim run {fs.run_id} stores {fs.geometry.name} showers differently from this "
                              f"simulation ({diff}); use a run trained on files of this fastshower")


def _gun_positions(geometry: Geometry, incidence: Incidence, smears: bool) -> tuple[np.ndarray, np.ndarray]:
    """(low (2,), high (2,)) of the gun's entry points on the front face, mm."""
    if incidence.position is not None:
        (x0, x1), (y0, y1) = incidence.position
        return np.array([x0, y0]), np.array([x1, y1])
    seg = geometry.layers[0].segmentation
    if smears and isinstance(seg, CartesianSegmentation):
        half = np.array([0.5 * seg.pitch_x, 0.5 * seg.pitch_y])
        return -half, half
    return np.zeros(2), np.zeros(2)


def _check_domain(fs: FastSim, geometry: Geometry, incidence: Incidence, energy_high_mev: float,
                  smears: bool) -> list[str]:
    """What the gun asks for outside the run's training: refused, or (``allow_extrapolation``) returned as
    warnings for the file's provenance."""
    issues = []
    if energy_high_mev > fs.energy_range_mev[1] * (1 + 1e-9):
        issues.append(f"gun energies up to {energy_high_mev / 1e3:g} GeV lie above run {fs.run_id}'s training "
                      f"energies (up to {fs.energy_range_mev[1] / 1e3:g} GeV)")
    angled = incidence.max_theta > 0 or incidence.upstream is not None
    if "angle" not in fs.cond_names and angled:
        why = "--angle" if incidence.max_theta > 0 else "particles leave the --upstream slab at angles"
        issues.append(f"run {fs.run_id} has no angle condition but the particles enter at angles ({why}); its "
                      "normal-incidence showers are turned along their directions")
    if "angle" in fs.cond_names and incidence.theta is not None:
        lo, hi = fs.widened("angle")
        if incidence.theta[0] < lo[0] or incidence.theta[1] > hi[0]:
            trained = f"{fs.cond_ranges['angle'][0][0]:.3g}-{fs.cond_ranges['angle'][1][0]:.3g}"
            issues.append(f"--angle {incidence.theta[0]:g}:{incidence.theta[1]:g} reaches outside run {fs.run_id}'s "
                          f"trained polar angles {trained} degrees")
    if "position" in fs.cond_names:
        glo, ghi = _gun_positions(geometry, incidence, smears)
        lo, hi = fs.widened("position")
        if (glo < lo).any() or (ghi > hi).any():
            issues.append(f"the gun's entry points reach outside run {fs.run_id}'s trained positions "
                          f"(x {lo[0]:.3g}..{hi[0]:.3g}, y {lo[1]:.3g}..{hi[1]:.3g} mm)")
    if issues and not fs.allow_extrapolation:
        raise SimulationError(f"--fast-sim: {issues[0]}; pass allow_extrapolation=True to run anyway")
    return issues


def check_fast_sim(fs: FastSim, geometry: Geometry, incidence: Incidence, energy_range_mev: tuple[float, float],
                   smears: bool) -> list[str]:
    """Raise :class:`SimulationError` (one line) for a request the run cannot serve; returns the extrapolations
    ``allow_extrapolation`` lets through (warnings for the provenance).

    Refused: a run of another detector (or file conventions), a run not trained on e+/e-/gamma or conditioned
    on something fast simulation cannot give, a threshold below the run's training energies, an unknown batch
    mode or inference engine; and unless ``allow_extrapolation``: gun energies above the run's, angled
    particles (``--angle`` or upstream material) for a run without the angle condition, gun angles or entry
    points outside the trained ones. (An unknown upstream material is refused before, by :class:`Incidence`.)
    ``smears``: the gun's entry point is smeared over the centre crystal (crystal arrays).
    """
    _check_geometry(fs, geometry)
    if fs.particle not in EM_PARTICLES:
        raise SimulationError(f"--fast-sim run {fs.run_id} was trained on {fs.particle} showers; fast simulation "
                              f"replaces e+/e-/gamma and needs a run of {', '.join(EM_PARTICLES)}")
    other = [c for c in fs.cond_names if c not in SUPPORTED_CONDITIONS]
    if other:
        raise SimulationError(f"--fast-sim run {fs.run_id} conditions on {other}, which fast simulation cannot give "
                              f"it (only the energy, {' and '.join(SUPPORTED_CONDITIONS)})")
    lo = fs.energy_range_mev[0]
    if not fs.threshold_mev >= lo * (1 - 1e-9):
        raise SimulationError(f"--fast-sim-threshold {fs.threshold_mev / 1e3:g} GeV lies below run {fs.run_id}'s "
                              f"training energies ({lo / 1e3:g}-{fs.energy_range_mev[1] / 1e3:g} GeV); "
                              f"use a threshold of at least {lo / 1e3:g} GeV")
    if fs.batch not in FAST_SIM_BATCHES:
        raise SimulationError(f"--fast-sim-batch must be {' or '.join(FAST_SIM_BATCHES)}, got {fs.batch!r}")
    if fs.inference not in FAST_SIM_INFERENCE:
        raise SimulationError(f"fast-sim inference must be {' or '.join(FAST_SIM_INFERENCE)}, got {fs.inference!r}")
    return _check_domain(fs, geometry, incidence, energy_range_mev[1], smears)


# --- placing a shower in space -----------------------------------------------------------------------


def from_shower_frame(q: np.ndarray, entry: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Points (m, 3) given across and along a particle's direction (Par04's frame: x, y across, depth along; mm)
    -> world points (m, 3), mm, for the entry point ``entry`` (3,) and unit direction ``u`` (3,). The inverse of
    :func:`fastshower.montecarlo.geant4._par04_frame` (Rz(-phi), then Ry(-theta))."""
    theta, phi = math.acos(min(1.0, float(u[2]))), math.atan2(float(u[1]), float(u[0]))
    ct, st, cp, sp = math.cos(theta), math.sin(theta), math.cos(phi), math.sin(phi)
    xr, yr, d = q[:, 0], q[:, 1], q[:, 2]
    x1, dz = ct * xr + st * d, -st * xr + ct * d
    return np.stack([entry[0] + cp * x1 - sp * yr, entry[1] + sp * x1 + cp * yr, entry[2] + dz], axis=1)


def readout_layer(geometry: Geometry, depth: np.ndarray) -> np.ndarray:
    """Readout layer of points at ``depth`` mm behind the front face (any shape): int, -1 before the front face,
    ``n_layers`` behind the last layer."""
    edges = np.concatenate([[0.0], np.cumsum([layer.thickness for layer in geometry.layers])])
    return np.searchsorted(edges, depth, side="right") - 1


def cartesian_cells(seg: CartesianSegmentation, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cell index (row * nx + column, as the Geant4 replicas number them) of points (mm); -1 off the read-out."""
    hx, hy = seg.half_width
    ix = np.floor((x + hx) / seg.pitch_x).astype(np.int64)
    iy = np.floor((y + hy) / seg.pitch_y).astype(np.int64)
    ok = (ix >= 0) & (ix < seg.nx) & (iy >= 0) & (iy < seg.ny)
    return np.where(ok, iy * seg.nx + ix, -1)


def _cell_points(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Every voxel's centre in the model's frame, (V, 3) mm (x, y across, depth = its layer's mid-depth), and
    whether its layer is polar (V,)."""
    pts, polar = [], []
    z = geometry.layer_z_centres()
    for li, layer in enumerate(geometry.layers):
        c = layer.segmentation.cell_centres()
        pts.append(np.column_stack([c, np.full(len(c), z[li])]))
        polar.append(np.full(len(c), isinstance(layer.segmentation, PolarSegmentation)))
    return np.concatenate(pts), np.concatenate(polar)


def _within(v: np.ndarray, lo: np.ndarray, hi: np.ndarray, azimuth: bool) -> bool:
    """``v`` (w,) inside [lo, hi] column by column; with ``azimuth`` the second column (phi, degrees) also one
    turn down, so phi 359.9 is inside a range trained as -0.5..0.5."""
    ok = (v >= lo) & (v <= hi)
    if azimuth and len(v) > 1 and not ok[1]:
        ok[1] = lo[1] <= v[1] - 360.0 <= hi[1]
    return bool(ok.all())


@dataclass
class _Entering:
    """The e+/e-/gamma recorded at the front face during the running event."""

    energy: list[float] = field(default_factory=list)
    xy: list[tuple[float, float]] = field(default_factory=list)
    u: list[tuple[float, float, float]] = field(default_factory=list)

    def clear(self) -> None:
        self.energy.clear()
        self.xy.clear()
        self.u.clear()


class FastSimHook:
    """A :class:`~fastshower.montecarlo.geant4.Geant4Session`'s fast simulation: the world's sensitive detector
    that kills and records the entering particles, and the end-of-event generation and placement.

    Args:
        fs: the request. generator: the run's model (``fs.loader(fs)`` in the worker).
        geometry: the simulated calorimeter (the run's, checked).
    """

    def __init__(self, fs: FastSim, generator: ShowerGenerator, geometry: Geometry) -> None:
        self.fs = fs
        self.generator = generator
        self.geometry = geometry
        self.has_angle = "angle" in fs.cond_names
        self.has_position = "position" in fs.cond_names
        self._points, self._polar = _cell_points(geometry)
        self._entering = _Entering()
        self._seed = 0
        #: z of the calorimeter's front face in the world, mm (the session's, set with the sensitive detector)
        self.front_z = 0.0
        self.truth = np.zeros((0, len(FAST_SIM_TRUTH)))
        self._outside = 0
        hi = fs.energy_range_mev[1] * (1 + 1e-9)
        self._e_max = math.inf if fs.allow_extrapolation else hi
        self._ranges = {} if fs.allow_extrapolation else {k: fs.widened(k) for k in fs.cond_names}

    # --- in Geant4 -------------------------------------------------------------------------------
    def sensitive_detector(self, g4: Any, z0: float) -> Any:
        """The world volume's sensitive detector: kills the e+/e-/gamma the model replaces at the front face
        (z = ``z0`` mm, world frame) and records them."""
        hook = self
        boundary, kill = g4.G4StepStatus.fGeomBoundary, g4.G4TrackStatus.fStopAndKill
        self.front_z = z0

        class WorldSD(g4.G4VSensitiveDetector):
            def ProcessHits(self, step: Any, history: Any) -> bool:
                post = step.GetPostStepPoint()
                if post.GetStepStatus() != boundary:
                    return False
                p = post.GetPosition()
                if abs(p.z - z0) > _ON_FACE_MM or post.GetKineticEnergy() < hook.fs.threshold_mev:
                    return False
                track = step.GetTrack()
                if track.GetDefinition().GetPDGEncoding() not in EM_PDG:
                    return False
                u = post.GetMomentumDirection()
                if u.z > 0 and hook.replace(post.GetKineticEnergy(), p.x, p.y, (u.x, u.y, u.z)):
                    track.SetTrackStatus(kill)
                return True

        return WorldSD("fastsim_world")

    def replace(self, energy: float, x: float, y: float, u: tuple[float, float, float]) -> bool:
        """Record a particle at or above threshold entering at (x, y) mm along ``u``, if the run may replace it
        (inside its trained energies, angles and entry points, or ``allow_extrapolation``); False: tracked on."""
        cond = self._conditions(np.array([energy]), np.array([[x, y]]), np.array([u]))
        if energy > self._e_max or not all(_within(v[0], *self._ranges[k], k == "angle")
                                           for k, v in cond.items() if k in self._ranges):
            self._outside += 1
            return False
        self._entering.energy.append(energy)
        self._entering.xy.append((x, y))
        self._entering.u.append(u)
        return True

    # --- per run and event -----------------------------------------------------------------------
    def begin_run(self, n: int, seed: int) -> None:
        """A run of ``n`` events with MC seed ``seed`` starts (the noise of particle j of event i is seeded by
        (seed, i, j))."""
        self._seed = int(seed)
        self._entering.clear()
        self._outside = 0
        self.truth = np.zeros((n, len(FAST_SIM_TRUTH)))

    def _conditions(self, e: np.ndarray, xy: np.ndarray, u: np.ndarray) -> dict[str, np.ndarray]:
        """The model's conditions for particles of energies (k,) entering at (k, 2) along (k, 3)."""
        out: dict[str, np.ndarray] = {}
        for name, width in zip(self.fs.cond_names, self.fs.cond_widths, strict=True):
            if name == "angle":
                theta = np.degrees(np.arccos(np.clip(u[:, 2], -1.0, 1.0)))
                phi = np.mod(np.degrees(np.arctan2(u[:, 1], u[:, 0])), 360.0)
                out[name] = np.stack([theta, phi], axis=1)[:, :width]
            else:
                out[name] = np.asarray(xy, dtype=float)[:, :width]
        return out

    def _generate(self, event: int, e: np.ndarray, conds: dict[str, np.ndarray]) -> np.ndarray:
        """The model's showers (k, V) on the readout scale, each seeded by (MC seed, event, particle)."""
        k = len(e)
        seeds = np.array([np.random.SeedSequence([self._seed, event, j]).generate_state(1, dtype=np.uint64)[0]
                          for j in range(k)], dtype=np.uint64)
        if self.fs.batch == "event":
            return np.asarray(self.generator(e, conds, seeds), dtype=np.float64)
        return np.concatenate([np.asarray(self.generator(e[j:j + 1], {c: v[j:j + 1] for c, v in conds.items()},
                                                         seeds[j:j + 1]), dtype=np.float64) for j in range(k)])

    def end_of_event(self, event: int) -> tuple[np.ndarray, np.ndarray]:
        """Generate and place the showers of the particles replaced in ``event``: (world points (m, 3) mm, energies
        (m,) MeV deposited, i.e. the model's values over the geometry's ``energy_scale``). Empties the record."""
        rec = self._entering
        k = len(rec.energy)
        e = np.asarray(rec.energy, dtype=float)
        if event < len(self.truth):
            self.truth[event] = (k, e.sum(), self._outside)
        self._outside = 0
        if k == 0:
            rec.clear()
            return np.zeros((0, 3)), np.zeros(0)
        xy, u = np.asarray(rec.xy, dtype=float), np.asarray(rec.u, dtype=float)
        rec.clear()
        showers = self._generate(event, e, self._conditions(e, xy, u)) / self.geometry.energy_scale
        pts, en = [], []
        for j in range(k):
            nz = showers[j] > 0
            pts.append(self._place(self._points[nz], self._polar[nz], xy[j], u[j]))
            en.append(showers[j, nz])
        return np.concatenate(pts), np.concatenate(en)

    def _place(self, q: np.ndarray, polar: np.ndarray, xy: np.ndarray, u: np.ndarray) -> np.ndarray:
        """World points (m, 3) of model cells at ``q`` (m, 3) (polar ones: in the particle's frame; cartesian ones:
        detector cells) for a particle entering at ``xy`` along ``u`` (see the module docstring)."""
        entry = np.array([xy[0], xy[1], self.front_z])
        out = np.empty_like(q)
        if polar.any():
            out[polar] = from_shower_frame(q[polar], entry, u)
        cart = ~polar
        if cart.any():
            ref = np.array([xy[0], xy[1], 0.0]) if self.has_position else np.zeros(3)
            rel = q[cart] - ref  # the cell relative to the entry point the model made the shower for
            out[cart] = entry + rel if self.has_angle else from_shower_frame(rel, entry, u)
        return out
