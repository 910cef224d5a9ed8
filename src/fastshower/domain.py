"""What a trained run covers: its detector, particle, conditions and energies, as plain data.

One home for these facts: :class:`fastshower.runs.RunInfo` (a loaded run folder) and
:class:`fastshower.montecarlo.fastsim.FastSim` (a run as Geant4's fast simulation, on a floor below runs)
both derive from :class:`TrainedDomain`, so code on either floor reads the same attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastshower.geometry import Geometry

__all__ = ["TrainedDomain"]


@dataclass(frozen=True)
class TrainedDomain:
    """The domain a run was trained on.

    Attributes:
        geometry: the training file's geometry (the readout the run's showers have, V voxels).
        particle: particle of the training file (e-, e+, gamma, ...; "unknown" when not recorded).
        cond_names, cond_widths: the extra conditions generation needs (besides log_energy) and their widths
            (columns each, e.g. angle 2: theta and phi in degrees; position 2: x and y in mm).
        cond_ranges: per condition, (min per column, max per column): in a :class:`~fastshower.runs.RunInfo` the
            values seen in training, in a ``FastSim`` the ranges the training file was simulated with, widened
            to those seen.
        energy_range_mev: (low, high) incident energy, MeV; in a ``RunInfo`` the training file's (min, max)
            ((0, inf) when the run records none), in a ``FastSim`` the range it was made with.
    """

    geometry: Geometry
    particle: str
    cond_names: tuple[str, ...]
    cond_widths: tuple[int, ...]
    cond_ranges: dict[str, tuple[list[float], list[float]]]
    energy_range_mev: tuple[float, float]
