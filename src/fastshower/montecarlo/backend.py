"""What a reference Monte Carlo must provide to the production driver.

The driver (:mod:`fastshower.montecarlo.run`) cuts a request into chunks, draws
each chunk's energies and conditions from its own seed (so the same seed gives
the same showers whatever the number of worker processes, and a resumed run
continues the same sequence), and hands chunks to backends living in worker
processes. A backend is built once per worker and turns a chunk into showers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fastshower.errors import FastshowerError
from fastshower.geometry import Geometry
from fastshower.io import ShowerBatch

if TYPE_CHECKING:
    from fastshower.montecarlo.fastsim import FastSim

__all__ = ["BackendOptions", "SimulationBackend", "SimulationError"]


class SimulationError(FastshowerError, RuntimeError):
    """A request the Monte Carlo cannot run (missing data, unsupported particle...)."""


@dataclass(frozen=True)
class BackendOptions:
    """Options passed from the CLI/API to a backend.

    Attributes:
        cut_mm: Geant4 production cut, mm.
        physics: "auto", "official" or "substitute" (Geant4 data choice).
        extra: backend-specific options (air showers: zenith/azimuth specs, ...).
        fast_sim: a trained run replacing the e+/e-/gamma showers in Geant4 (:mod:`.fastsim`); None: full simulation.
    """

    cut_mm: float = 0.7
    physics: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)
    fast_sim: FastSim | None = None


class SimulationBackend(ABC):
    """A reference Monte Carlo, instantiated once per worker process."""

    #: provenance string written to the file's ``generator`` attribute
    generator: str = "unknown"
    #: a longer physics description for the ``physics`` attribute
    physics: str = ""
    #: least seconds between two progress messages of a worker (each costs a pipe write in the parent's loop)
    progress_interval_s: float = 1.0
    #: called with 1 per finished shower while :meth:`run` works (set by the driver's worker; None: no one listens)
    on_shower: Callable[[int], None] | None = None

    def __init__(self, geometry: Geometry, particle: str, options: BackendOptions) -> None:
        self.geometry = geometry
        self.particle = particle
        self.options = options

    def shower_done(self) -> None:
        """Tell the driver one more shower of the running chunk is simulated (progress only; call from :meth:`run`).

        A backend that never calls it still works: its progress then moves by whole chunks.
        """
        if self.on_shower is not None:
            self.on_shower(1)

    def tables(self) -> list[dict[str, Any]]:
        """What this worker built or loaded for its physics tables, for the file's ``worker_tables`` provenance:
        one dict per table (``table``, ``version``, ``source`` "built"/"cache"/..., ``sha256`` where known).

        Asked after each chunk, so a backend that gets its tables lazily, or extends them for a later chunk,
        reports them too; what it returns may only grow.
        """
        return []  # a backend without tables of its own has nothing to report

    @classmethod
    def check_request(cls, geometry: Geometry, particle: str, options: BackendOptions,
                      energy_range_mev: tuple[float, float]) -> None:
        """Raise :class:`SimulationError` (clear one-line message) before any work is started.

        Other :class:`~fastshower.errors.FastshowerError` subclasses may pass through unchanged (the
        Geant4 backend lets :class:`~fastshower.montecarlo.g4data.Geant4DataError` through).
        """
        return  # a backend with nothing to check accepts every request

    @classmethod
    def condition_widths(cls, geometry: Geometry, options: BackendOptions) -> dict[str, int]:
        """Names and widths of the ``conditions/`` the backend writes."""
        return {}

    @classmethod
    def truth_widths(cls, geometry: Geometry, options: BackendOptions) -> dict[str, int]:
        """Names and widths of the ``truth/`` values the backend writes."""
        return {}

    @classmethod
    def draw_conditions(cls, geometry: Geometry, options: BackendOptions, rng: np.random.Generator,
                        n: int) -> dict[str, np.ndarray]:
        """Per-shower conditions for a chunk of ``n`` showers (drawn in the parent, seeded per chunk)."""
        return {}

    @abstractmethod
    def run(self, energies_mev: np.ndarray, conditions: dict[str, np.ndarray], seed: int) -> ShowerBatch:
        """Simulate one chunk: energies (n,) MeV and conditions -> a ShowerBatch with the same rows."""
