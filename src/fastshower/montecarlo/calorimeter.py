"""Geant4 as a production backend for calorimeter geometries.

Beam: the particle enters the front face travelling along +z. For crystal
arrays (one homogeneous cartesian layer, e.g. belle2-ecl-5x5) the entry point is
smeared uniformly over the centre crystal's face and stored as
``conditions/position`` (x, y in mm), as in the Belle II ECL fast-simulation
studies; sampling calorimeters are hit at the centre of their read-out (the
CaloChallenge convention). Options ``angle``, ``phi``, ``position`` and ``upstream`` tilt the beam, move its
entry point and put a slab before the calorimeter (:mod:`~fastshower.montecarlo.incidence`); the angle is
stored as ``conditions/angle`` (theta, phi in degrees) and an asked-for entry point as ``conditions/position``.

With ``BackendOptions.fast_sim`` (a :class:`~fastshower.montecarlo.fastsim.FastSim`) a trained run replaces the
showers of the e+/e-/gamma that enter the calorimeter above its threshold (:mod:`~fastshower.montecarlo.fastsim`);
the file then holds ``truth/n_fastsim``, ``truth/e_fastsim`` and ``truth/n_outside`` per event.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastshower.geometry import CartesianSegmentation, Geometry
from fastshower.io import ShowerBatch
from fastshower.montecarlo.backend import BackendOptions, SimulationBackend, SimulationError
from fastshower.montecarlo.fastsim import FAST_SIM_TRUTH, FastSim, FastSimHook, check_fast_sim
from fastshower.montecarlo.incidence import UPSTREAM_GAP_MM, Incidence, directions

__all__ = ["Geant4Backend", "fast_sim_warnings", "smears_entry_point"]

#: incident energies Geant4's standard EM and FTFP_BERT physics are used for here, MeV
ENERGY_RANGE_MEV = (1.0, 1.0e7)
HADRONS = ("pi+", "pi-")


def smears_entry_point(geometry: Geometry) -> bool:
    """True for crystal arrays: one homogeneous cartesian layer."""
    return (
        len(geometry.layers) == 1
        and geometry.layers[0].absorber is None
        and isinstance(geometry.layers[0].segmentation, CartesianSegmentation)
    )


def _materials(geometry: Geometry, incidence: Incidence) -> list[str]:
    """The NIST materials a run builds: the calorimeter's, the upstream slab's and the world's."""
    upstream = [incidence.upstream[0]] if incidence.upstream is not None else []
    return [*geometry.materials(), *upstream, "G4_Galactic"]


def fast_sim_warnings(geometry: Geometry, options: BackendOptions, energy_range_mev: tuple[float, float]) -> list[str]:
    """Check ``options.fast_sim`` against the request (:func:`~fastshower.montecarlo.fastsim.check_fast_sim`):
    SimulationError if the run cannot serve it, else the extrapolations ``allow_extrapolation`` lets through."""
    assert options.fast_sim is not None
    return check_fast_sim(options.fast_sim, geometry, Incidence.from_options(geometry, options), energy_range_mev,
                          smears_entry_point(geometry))


class Geant4Backend(SimulationBackend):
    """Geant4 11.4 (geant4-pybind) with official data or substitute EM tables; one instance per worker."""

    @classmethod
    def check_request(cls, geometry: Geometry, particle: str, options: BackendOptions,
                      energy_range_mev: tuple[float, float]) -> None:
        from fastshower.montecarlo.g4data import elements_of, resolve_data
        from fastshower.montecarlo.geant4 import PARTICLES

        if geometry.kind != "calorimeter":
            raise SimulationError(f"geometry {geometry.name!r} is not a calorimeter")
        if particle not in PARTICLES:
            raise SimulationError(f"unknown particle {particle!r} for Geant4; choose one of: {', '.join(PARTICLES)}")
        if any(layer.active == "unknown" for layer in geometry.layers):
            raise SimulationError(f"geometry {geometry.name!r} has no materials (read from a binning XML); "
                                  "it can be evaluated but not simulated")
        incidence = Incidence.from_options(geometry, options)  # bad angle/position/upstream: refused here
        lo, hi = energy_range_mev
        if lo < ENERGY_RANGE_MEV[0] or hi > ENERGY_RANGE_MEV[1]:
            raise SimulationError(
                f"energy {lo:g}-{hi:g} MeV is outside the range simulated here (1 MeV to 10 TeV)")
        if options.fast_sim is not None:
            fast_sim_warnings(geometry, options, energy_range_mev)
        # Resolving here (in the parent) fails fast on missing official data (Geant4DataError, a
        # FastshowerError like SimulationError) and builds substitute tables once, before the workers start.
        resolve_data(elements_of(_materials(geometry, incidence)), options.physics,  # type: ignore[arg-type]
                     hadronic=particle in HADRONS)

    @classmethod
    def condition_widths(cls, geometry: Geometry, options: BackendOptions) -> dict[str, int]:
        incidence = Incidence.from_options(geometry, options)
        widths = {"position": 2} if smears_entry_point(geometry) or incidence.position is not None else {}
        return {**widths, "angle": 2} if incidence.theta is not None else widths

    @classmethod
    def truth_widths(cls, geometry: Geometry, options: BackendOptions) -> dict[str, int]:
        return dict(FAST_SIM_TRUTH) if options.fast_sim is not None else {}

    @classmethod
    def draw_conditions(cls, geometry: Geometry, options: BackendOptions, rng: np.random.Generator,
                        n: int) -> dict[str, np.ndarray]:
        incidence = Incidence.from_options(geometry, options)
        if not smears_entry_point(geometry) or incidence.position is not None:
            return incidence.draw(rng, n)
        seg = geometry.layers[0].segmentation
        assert isinstance(seg, CartesianSegmentation)
        # The centre cell (odd nx, ny) spans [-pitch/2, pitch/2]; with an even count this is a cell corner.
        # Drawn before the angle, so files made before angles existed keep their positions.
        half = np.array([0.5 * seg.pitch_x, 0.5 * seg.pitch_y])
        position = rng.uniform(-half, half, size=(n, 2))
        return {"position": position, **incidence.draw(rng, n)}

    def __init__(self, geometry: Geometry, particle: str, options: BackendOptions) -> None:
        super().__init__(geometry, particle, options)
        from fastshower.montecarlo import g4data
        from fastshower.montecarlo.g4data import apply_environment, elements_of, resolve_data

        incidence = Incidence.from_options(geometry, options)
        # the manifest's hash before resolving tells whether this worker read the tables or (re)built them
        hash_before = g4data.manifest_hash(g4data.default_cache_dir() / g4data.SUBSTITUTE_VERSION)
        data = resolve_data(elements_of(_materials(geometry, incidence)), options.physics,  # type: ignore[arg-type]
                            hadronic=particle in HADRONS)
        apply_environment(data)  # before geant4_pybind is imported
        self._tables = g4data.describe_tables(data, hash_before)
        from fastshower.montecarlo.geant4 import Geant4Session

        hook = self._fast_sim_hook(options.fast_sim) if options.fast_sim is not None else None
        self.session = Geant4Session(geometry, particle, cut_mm=options.cut_mm, data=data,
                                     upstream=incidence.upstream, max_angle_deg=incidence.max_theta, fastsim=hook)
        self.session.on_event = self.shower_done
        self.generator = data.provenance
        self.physics = f"{self.session.physics_list} ; production cut {options.cut_mm:g} mm ; {data.provenance}"
        if incidence.upstream is not None:
            self.physics += (f" ; upstream {incidence.upstream[1]:g} mm {incidence.upstream[0]} "
                             f"{UPSTREAM_GAP_MM:g} mm before the front face")
        if hook is not None:
            self.physics += " ; " + hook.fs.describe()
            self.generator += f" + fast simulation by run {hook.fs.run_id} ({hook.fs.model})"

    def _fast_sim_hook(self, fs: FastSim) -> FastSimHook:
        """The session's fast simulation, with the run's model loaded in this worker (``fs.loader``)."""
        if fs.loader is None:
            raise SimulationError("the fast-sim request has no model loader (build it with fast_sim_model)")
        return FastSimHook(fs, fs.loader(fs), self.geometry)

    def tables(self) -> list[dict[str, Any]]:
        """The Geant4 data this worker resolved (see :func:`~fastshower.montecarlo.g4data.describe_tables`)."""
        return [self._tables]

    def run(self, energies_mev: np.ndarray, conditions: dict[str, np.ndarray], seed: int) -> ShowerBatch:
        n = len(energies_mev)
        positions = conditions.get("position", np.zeros((n, 2)))
        angles = conditions.get("angle", np.zeros((n, 2)))
        showers = self.session.run(np.asarray(energies_mev, dtype=np.float64), np.asarray(positions), seed,
                                   directions=directions(angles))
        showers = self.geometry.to_readout_scale(showers)
        truth = {}
        if self.session.fastsim is not None:
            t = self.session.fastsim.truth
            truth = {name: t[:, k:k + 1].copy() for k, name in enumerate(FAST_SIM_TRUTH)}
        return ShowerBatch(np.asarray(energies_mev, dtype=np.float64), showers, dict(conditions), truth)
