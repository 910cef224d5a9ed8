"""Preprocessing transforms and streaming torch data access to shower files.

Transforms
----------
Models work in *model space*. A :class:`ShowerTransform` maps showers in MeV to model
space and back; it is an ``nn.Module`` built only from traceable tensor operations, so
``torch.onnx.export`` can put the inverse inside an exported generator graph. It holds

- a voxel :class:`Chain` of elementwise steps, each with ``forward(x, energy)`` and
  ``inverse(y, energy)`` (``energy``: incident energy, shape (B,), MeV):

  ``per_incident``  x / E_inc (MeV / MeV: the fraction of the incident energy)
  ``log``           log(x + eps); ``eps`` defaults to 1e-6 in the units of its input, i.e.
                    1e-6 of E_inc after ``per_incident`` (1 keV at 1 GeV), small enough to
                    resolve single-crystal noise and large enough to keep empty voxels
                    at a finite value (log 1e-6 = -13.8)
  ``logit``         logit(alpha + (1 - 2 alpha) x) for x in [0, 1] (CaloFlow); alpha = 1e-6
  ``standardize``   (x - mean) / std per voxel, fitted on the training file; voxels with
                    std below 1e-6 (always empty, or constant) keep std = 1

- a :class:`ConditionTransform`: log(E_inc / MeV) standardised, then every
  ``conditions/<name>`` of the file that the run uses, standardised per column.

Fitting streams the file chunk by chunk, so memory stays bounded; the state is plain
JSON (``transforms.json`` in a run folder), and loading it gives the same module.

Data
----
:class:`ShowerDataset` is a map-style dataset whose items are *chunks* of consecutive
showers, already transformed. It opens its h5py handle lazily in the process that reads
(each DataLoader worker opens its own; a handle is never pickled into a worker).
:class:`BatchStream` turns it into an endless, deterministic stream of shuffled batches:
each epoch shuffles the chunk order (seeded by seed and epoch), shards chunks across
distributed ranks, and shuffles rows within groups of ``shuffle_chunks`` chunks. Its
position (epoch, group, batch) is checkpointable, so a resumed run sees exactly the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from fastshower.errors import FastshowerError
from fastshower.geometry import Geometry
from fastshower.io import ShowerBatch, ShowerFile

__all__ = [
    "TRANSFORMS",
    "BatchStream",
    "Chain",
    "ConditionTransform",
    "DataError",
    "DataStats",
    "LogTransform",
    "LogitTransform",
    "PerIncident",
    "ShowerDataset",
    "ShowerTransform",
    "Standardize",
    "Transform",
    "build_transform",
    "check_finite_batch",
    "fit_shower_transform",
]

_STD_FLOOR = 1e-6


class DataError(FastshowerError, ValueError):
    """Bad training data (NaN after preprocessing, unknown condition, ...) or transform state."""


# --- voxel transforms --------------------------------------------------------------


class Transform(nn.Module):
    """One invertible elementwise step on showers (B, V) given incident energies (B,) in MeV."""

    name: ClassVar[str] = "transform"
    needs_fit: ClassVar[bool] = False

    def forward(self, x: Tensor, energy: Tensor) -> Tensor:
        raise NotImplementedError

    def inverse(self, y: Tensor, energy: Tensor) -> Tensor:
        raise NotImplementedError

    # streaming fit: reset, update per chunk (input already passed through earlier steps), finalize
    def fit_reset(self, n_voxels: int) -> None:
        """Start a streaming fit."""

    def fit_update(self, x: Tensor) -> None:
        """Accumulate one chunk (n, V) of this step's input."""

    def fit_finalize(self) -> None:
        """Turn the accumulated statistics into parameters."""

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable parameters (with ``name``)."""
        return {"name": self.name}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], n_voxels: int) -> Transform:
        return cls()


class PerIncident(Transform):
    """Voxel energy as a fraction of the incident energy: x / E_inc."""

    name = "per_incident"

    def forward(self, x: Tensor, energy: Tensor) -> Tensor:
        return x / energy.reshape(-1, 1).to(x.dtype)

    def inverse(self, y: Tensor, energy: Tensor) -> Tensor:
        return y * energy.reshape(-1, 1).to(y.dtype)


class LogTransform(Transform):
    """log(x + eps); inverse exp(y) - eps. ``eps`` is in the units of the step's input."""

    name = "log"

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        if not eps > 0:
            raise DataError(f"log transform needs eps > 0, got {eps}")
        self.eps = float(eps)

    def forward(self, x: Tensor, energy: Tensor) -> Tensor:
        return torch.log(x + self.eps)

    def inverse(self, y: Tensor, energy: Tensor) -> Tensor:
        return torch.exp(y) - self.eps

    def get_state(self) -> dict[str, Any]:
        return {"name": self.name, "eps": self.eps}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], n_voxels: int) -> Transform:
        return cls(eps=float(state.get("eps", 1e-6)))


class LogitTransform(Transform):
    """logit(alpha + (1 - 2 alpha) x) for x in [0, 1]; values outside are clipped first."""

    name = "logit"

    def __init__(self, alpha: float = 1e-6) -> None:
        super().__init__()
        if not 0 < alpha < 0.5:
            raise DataError(f"logit transform needs 0 < alpha < 0.5, got {alpha}")
        self.alpha = float(alpha)

    def forward(self, x: Tensor, energy: Tensor) -> Tensor:
        u = self.alpha + (1 - 2 * self.alpha) * x.clamp(0.0, 1.0)
        return torch.log(u) - torch.log1p(-u)

    def inverse(self, y: Tensor, energy: Tensor) -> Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)

    def get_state(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], n_voxels: int) -> Transform:
        return cls(alpha=float(state.get("alpha", 1e-6)))


class Standardize(Transform):
    """(x - mean) / std per voxel, with mean and std fitted by streaming (float64 sums)."""

    name = "standardize"
    needs_fit = True
    mean: Tensor
    std: Tensor

    def __init__(self, n_voxels: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        m = torch.zeros(n_voxels) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        s = torch.ones(n_voxels) if std is None else torch.as_tensor(std, dtype=torch.float32)
        if m.shape != (n_voxels,) or s.shape != (n_voxels,):
            raise DataError(f"standardize state has {m.shape[0]} means / {s.shape[0]} stds for {n_voxels} voxels")
        # buffers: saved with the module and exported as constants by ONNX
        self.register_buffer("mean", m)
        self.register_buffer("std", s)
        self._acc: tuple[int, Tensor, Tensor] | None = None

    def forward(self, x: Tensor, energy: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def inverse(self, y: Tensor, energy: Tensor) -> Tensor:
        return y * self.std + self.mean

    def fit_reset(self, n_voxels: int) -> None:
        self._acc = (0, torch.zeros(n_voxels, dtype=torch.float64), torch.zeros(n_voxels, dtype=torch.float64))

    def fit_update(self, x: Tensor) -> None:
        assert self._acc is not None, "fit_reset first"
        n, s1, s2 = self._acc
        xd = x.to(torch.float64)  # float64 sums: sum(x^2) - n mean^2 stays accurate for O(1) standardised data
        self._acc = (n + x.shape[0], s1 + xd.sum(0), s2 + (xd * xd).sum(0))

    def fit_finalize(self) -> None:
        assert self._acc is not None, "fit_reset first"
        n, s1, s2 = self._acc
        if n == 0:
            raise DataError("standardize: no data to fit")
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0.0)
        std = var.sqrt()
        std = torch.where(std < _STD_FLOOR, torch.ones_like(std), std)
        self.mean.copy_(mean.to(torch.float32))
        self.std.copy_(std.to(torch.float32))
        self._acc = None

    def get_state(self) -> dict[str, Any]:
        return {"name": self.name, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], n_voxels: int) -> Transform:
        return cls(n_voxels, state.get("mean"), state.get("std"))


TRANSFORMS: dict[str, type[Transform]] = {
    t.name: t for t in (PerIncident, LogTransform, LogitTransform, Standardize)
}


class Chain(Transform):
    """Steps applied in order; the inverse runs them backwards."""

    name = "chain"

    def __init__(self, steps: Sequence[Transform]) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)

    @property
    def transforms(self) -> list[Transform]:
        """The steps, typed (nn.ModuleList items are plain Modules to a type checker)."""
        return [t for t in self.steps if isinstance(t, Transform)]

    @property
    def needs_fit(self) -> bool:  # type: ignore[override]
        return any(t.needs_fit for t in self.transforms)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.transforms]

    def forward(self, x: Tensor, energy: Tensor) -> Tensor:
        for t in self.transforms:
            x = t(x, energy)
        return x

    def inverse(self, y: Tensor, energy: Tensor) -> Tensor:
        for t in reversed(self.transforms):
            y = t.inverse(y, energy)
        return y

    def fit(self, chunks: Callable[[], Iterable[tuple[Tensor, Tensor]]], n_voxels: int) -> None:
        """Fit every step that needs it, one streaming pass per such step.

        ``chunks()`` must return a fresh iterable of (showers (n, V) MeV, energies (n,) MeV).
        """
        steps = self.transforms
        for i, step in enumerate(steps):
            if not step.needs_fit:
                continue
            step.fit_reset(n_voxels)
            for x, e in chunks():
                with torch.no_grad():
                    for prev in steps[:i]:
                        x = prev(x, e)
                step.fit_update(x)
            step.fit_finalize()

    def get_state(self) -> dict[str, Any]:
        return {"name": self.name, "steps": [t.get_state() for t in self.transforms]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], n_voxels: int) -> Chain:
        steps = []
        for s in state.get("steps", []):
            name = s.get("name")
            if name not in TRANSFORMS:
                raise DataError(f"unknown transform {name!r} in saved state; known: {', '.join(TRANSFORMS)}")
            steps.append(TRANSFORMS[name].from_state(s, n_voxels))
        return cls(steps)


def build_transform(names: Sequence[str], n_voxels: int, **options: float) -> Chain:
    """An unfitted :class:`Chain` from step names, e.g. ``["per_incident", "log", "standardize"]``.

    ``options`` set step parameters: ``eps`` (log), ``alpha`` (logit).
    """
    unknown_opts = set(options) - {"eps", "alpha"}
    if unknown_opts:
        raise DataError(f"unknown transform option(s) {sorted(unknown_opts)}; known: alpha, eps")
    steps: list[Transform] = []
    for name in names:
        if name == "per_incident":
            steps.append(PerIncident())
        elif name == "log":
            steps.append(LogTransform(eps=float(options.get("eps", 1e-6))))
        elif name == "logit":
            steps.append(LogitTransform(alpha=float(options.get("alpha", 1e-6))))
        elif name == "standardize":
            steps.append(Standardize(n_voxels))
        else:
            raise DataError(f"unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")
    return Chain(steps)


# --- conditions ----------------------------------------------------------------------


class ConditionTransform(nn.Module):
    """Condition vector: [standardised log(E_inc / MeV), standardised extra conditions...].

    Attributes:
        names: extra condition names in column order (``log_energy`` is implicit and first).
        widths: columns per extra condition.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, names: Sequence[str] = (), widths: Sequence[int] = (),
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(names) != len(widths):
            raise DataError(f"condition names {list(names)} and widths {list(widths)} differ in length")
        self.names = tuple(names)
        self.widths = tuple(int(w) for w in widths)
        dim = 1 + sum(self.widths)
        self.register_buffer("mean", torch.zeros(dim) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.ones(dim) if std is None else torch.as_tensor(std, dtype=torch.float32))
        if self.mean.shape != (dim,) or self.std.shape != (dim,):
            raise DataError(f"condition state has {self.mean.shape[0]} columns, expected {dim}")

    @property
    def dim(self) -> int:
        return 1 + sum(self.widths)

    @property
    def all_names(self) -> tuple[str, ...]:
        return ("log_energy", *self.names)

    @property
    def all_widths(self) -> tuple[int, ...]:
        return (1, *self.widths)

    def raw(self, energy: Tensor, conditions: Mapping[str, Tensor] | None = None) -> Tensor:
        """Unstandardised columns (B, C): log(E/MeV), then the named conditions."""
        conditions = conditions or {}
        missing = [k for k in self.names if k not in conditions]
        if missing:
            raise DataError(f"missing condition(s) {missing}; this run is conditioned on {list(self.names)}")
        cols = [torch.log(energy.reshape(-1, 1).to(torch.float32))]
        n = cols[0].shape[0]
        for k, w in zip(self.names, self.widths, strict=True):
            v = torch.as_tensor(conditions[k]).to(torch.float32).reshape(n, -1)
            if v.shape[1] != w:
                raise DataError(f"condition {k!r} has {v.shape[1]} columns, the run expects {w}")
            cols.append(v)
        return torch.cat(cols, dim=1)

    def forward(self, energy: Tensor, conditions: Mapping[str, Tensor] | None = None) -> Tensor:
        """Model-space conditions (B, C) from energies (B,) MeV and raw conditions {name: (B, k)}."""
        return (self.raw(energy, conditions) - self.mean) / self.std

    def get_state(self) -> dict[str, Any]:
        return {"names": list(self.names), "widths": list(self.widths),
                "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ConditionTransform:
        return cls(state.get("names", ()), state.get("widths", ()), state.get("mean"), state.get("std"))


# --- the run's full preprocessing ----------------------------------------------------------


@dataclass
class DataStats:
    """Facts about the training data gathered while fitting (stored in transforms.json).

    Attributes:
        n: showers seen.
        energy_min, energy_max: incident energy range, MeV.
        min_nonzero_mev: smallest positive voxel energy, MeV.
        low_hit_mev: the energy below which a fraction LOW_HIT_FRACTION of the positive voxels lie, MeV
            (the default readout threshold of generation; 0 for runs made before it existed).
        cond_min, cond_max: per extra condition, per column, the range seen.
    """

    n: int
    energy_min: float
    energy_max: float
    min_nonzero_mev: float
    cond_min: dict[str, list[float]]
    cond_max: dict[str, list[float]]
    low_hit_mev: float = 0.0


class ShowerTransform(nn.Module):
    """Voxel chain + condition transform of a run.

    ``forward(showers, energy)`` -> model space (B, V); ``inverse(x, energy)`` -> MeV (B, V);
    ``conditions(energy, conds)`` -> (B, C). ``energy`` is the incident energy (B,) in MeV.
    """

    def __init__(self, voxel: Chain, cond: ConditionTransform, n_voxels: int, stats: DataStats | None = None) -> None:
        super().__init__()
        self.voxel = voxel
        self.cond = cond
        self.n_voxels = int(n_voxels)
        self.stats = stats

    def forward(self, showers: Tensor, energy: Tensor) -> Tensor:
        return self.voxel(showers, energy)

    def inverse(self, x: Tensor, energy: Tensor) -> Tensor:
        return self.voxel.inverse(x, energy)

    def conditions(self, energy: Tensor, conditions: Mapping[str, Tensor] | None = None) -> Tensor:
        return self.cond(energy, conditions)

    def encode(self, batch: ShowerBatch) -> tuple[Tensor, Tensor]:
        """A :class:`ShowerBatch` -> (x (n, V), c (n, C)) float32 tensors in model space."""
        e = torch.from_numpy(np.asarray(batch.energies, dtype=np.float64))
        s = torch.from_numpy(np.asarray(batch.showers, dtype=np.float32))
        with torch.no_grad():
            x = self.voxel(s, e)
            c = self.cond(e, {k: torch.from_numpy(np.asarray(v)) for k, v in batch.conditions.items()})
        return x, c

    def get_state(self) -> dict[str, Any]:
        return {
            "n_voxels": self.n_voxels,
            "voxel": self.voxel.get_state(),
            "conditions": self.cond.get_state(),
            "stats": None if self.stats is None else self.stats.__dict__,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ShowerTransform:
        try:
            n = int(state["n_voxels"])
            stats = state.get("stats")
            return cls(Chain.from_state(state["voxel"], n), ConditionTransform.from_state(state["conditions"]), n,
                       DataStats(**stats) if stats else None)
        except (KeyError, TypeError) as exc:
            raise DataError(f"malformed transform state: {exc!r}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.get_state()))

    @classmethod
    def load(cls, path: str | Path) -> ShowerTransform:
        try:
            return cls.from_state(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: unreadable transform state ({exc})") from exc


def _resolve_conditions(available: Sequence[str], wanted: Sequence[str] | str | None) -> list[str]:
    if wanted is None or wanted == "all":
        return sorted(available)
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    missing = [k for k in wanted if k not in available]
    if missing:
        raise DataError(f"condition(s) {missing} not in the data file (it has {sorted(available)})")
    return wanted


def fit_shower_transform(
    path: str | Path,
    names: Sequence[str] = ("per_incident", "log", "standardize"),
    conditions: Sequence[str] | str | None = "all",
    chunk_rows: int = 8192,
    geometry: Geometry | None = None,
    **options: float,
) -> ShowerTransform:
    """Fit a run's :class:`ShowerTransform` on a shower file by streaming it.

    Args:
        path: training file.
        names: voxel transform steps (see :func:`build_transform`).
        conditions: extra conditions to use: "all" (every ``conditions/<name>`` of the file),
            a list of names, or [] for energy only.
        chunk_rows: showers read per pass step (memory ~ chunk_rows x V x 4 bytes).
        geometry: expected geometry (checked against the file).
        options: step parameters (``eps``, ``alpha``).
    """
    with ShowerFile(path, geometry) as f:
        v = f.geometry.n_voxels
        cond_names = _resolve_conditions(f.condition_names, conditions)
        widths = [f.condition_widths()[k] for k in cond_names]
        chain = build_transform(names, v, **options)
        cond, stats = _condition_pass(f, cond_names, widths, chunk_rows)

        def chunks() -> Iterator[tuple[Tensor, Tensor]]:
            for b in f.iter_chunks(chunk_rows):
                yield torch.from_numpy(b.showers), torch.from_numpy(b.energies)

        chain.fit(chunks, v)
    return ShowerTransform(chain, cond, v, stats)


def _condition_pass(f: ShowerFile, cond_names: list[str], widths: list[int],
                    chunk_rows: int) -> tuple[ConditionTransform, DataStats]:
    """First pass over a file: the fitted :class:`ConditionTransform` and the :class:`DataStats`.

    Streams ``f`` in chunks of ``chunk_rows`` showers (always needed, and cheap: no voxel transform):
    mean and std of the raw conditions (log energy, then ``cond_names`` of ``widths`` columns), the
    incident energy range (MeV), the smallest hit and the hit-energy histogram (MeV), the conditions' ranges.
    """
    n = 0
    e_min, e_max, nz_min = math.inf, -math.inf, math.inf
    cond = ConditionTransform(cond_names, widths)
    s1 = torch.zeros(cond.dim, dtype=torch.float64)
    s2 = torch.zeros(cond.dim, dtype=torch.float64)
    c_min = {k: np.full(w, np.inf) for k, w in zip(cond_names, widths, strict=True)}
    c_max = {k: np.full(w, -np.inf) for k, w in zip(cond_names, widths, strict=True)}
    hit_counts = np.zeros(len(_HIT_EDGES) + 1, dtype=np.int64)
    for batch in f.iter_chunks(chunk_rows):
        e = batch.energies
        n += len(batch)
        e_min, e_max = min(e_min, float(e.min())), max(e_max, float(e.max()))
        pos = batch.showers[batch.showers > 0]
        if pos.size:
            nz_min = min(nz_min, float(pos.min()))
            hit_counts += np.bincount(np.searchsorted(_HIT_EDGES, pos), minlength=len(hit_counts))
        raw = cond.raw(torch.from_numpy(e), {k: torch.from_numpy(batch.conditions[k]) for k in cond_names})
        rd = raw.to(torch.float64)
        s1 += rd.sum(0)
        s2 += (rd * rd).sum(0)
        for k in cond_names:
            c_min[k] = np.minimum(c_min[k], batch.conditions[k].min(0))
            c_max[k] = np.maximum(c_max[k], batch.conditions[k].max(0))
    mean = s1 / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt()
    # a single-energy (or fixed-condition) file has std 0: keep 1 so the column is just centred
    std = torch.where(std < _STD_FLOOR, torch.ones_like(std), std)
    stats = DataStats(
        n=n, energy_min=e_min, energy_max=e_max,
        min_nonzero_mev=nz_min if math.isfinite(nz_min) else 0.0,
        cond_min={k: c_min[k].tolist() for k in cond_names},
        cond_max={k: c_max[k].tolist() for k in cond_names},
        low_hit_mev=_low_hit_quantile(hit_counts, nz_min),
    )
    return ConditionTransform(cond_names, widths, mean.tolist(), std.tolist()), stats


#: Fraction of the training file's hits (positive voxels) that may fall below the default readout threshold.
#: Models that regress every voxel put tiny non-zero values (keV and below) into cells the Monte Carlo leaves
#: empty; a threshold at the 0.1 % quantile of real hits removes them while losing ~nothing real (Belle II
#: 5x5 with Geant4: 9.7 keV, carrying 1e-7 of the energy; the floor-level FPD it restores is in
#: docs/model_quality.md).
LOW_HIT_FRACTION = 1e-3
# log-spaced edges for the streaming hit-energy histogram, MeV (20 per decade)
_HIT_EDGES = np.logspace(-12, 7, 381)


def _low_hit_quantile(counts: np.ndarray, nz_min: float) -> float:
    """Lower edge of the histogram bin holding the LOW_HIT_FRACTION quantile of hit energies, MeV."""
    total = counts.sum()
    if total == 0:
        return 0.0
    k = int(np.searchsorted(np.cumsum(counts), LOW_HIT_FRACTION * total))
    return float(max(_HIT_EDGES[k - 1] if k > 0 else 0.0, nz_min if math.isfinite(nz_min) else 0.0))


# --- datasets ---------------------------------------------------------------------------


class ShowerDataset(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    """Chunks of a shower file, transformed: item i -> (x (n_i, V), c (n_i, C)) float32.

    The h5py handle is opened lazily by the process that reads and is dropped when the
    dataset is pickled, so every DataLoader worker has its own handle (h5py handles must
    not cross processes). Values are checked per chunk: NaN/inf/negative energies in the
    file raise :class:`fastshower.io.ShowerFileError`, non-finite values after the
    transform raise :class:`DataError`, both naming the rows.

    Args:
        path: shower file.
        transform: the run's fitted transform; None yields raw (showers MeV, energies MeV) pairs.
        chunk_rows: showers per item; rounded up to whole HDF5 chunks of the file.
        geometry: expected geometry.
    """

    def __init__(self, path: str | Path, transform: ShowerTransform | None = None, chunk_rows: int | None = None,
                 geometry: Geometry | None = None) -> None:
        self.path = Path(path)
        self.transform = transform
        with ShowerFile(self.path, geometry) as f:
            self.geometry = f.geometry
            self.n = f.n
            file_rows = f._f["showers"].chunks[0] if f._f["showers"].chunks else 1024
        if chunk_rows is None:
            # ~4 MiB of float32 per item: large enough for efficient gzip reads, small enough to bound memory
            chunk_rows = max(1, (4 << 20) // (4 * max(self.geometry.n_voxels, 1)))
        chunk_rows = int(math.ceil(chunk_rows / file_rows) * file_rows)
        self.chunk_rows = chunk_rows
        self.starts = list(range(0, self.n, chunk_rows))
        self._file: ShowerFile | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def rows(self, i: int) -> int:
        """Number of showers in chunk i (known without reading)."""
        return min(self.starts[i] + self.chunk_rows, self.n) - self.starts[i]

    def _handle(self) -> ShowerFile:
        # a forked worker inherits the parent's object: reopen rather than share the parent's handle
        if self._file is None or self._pid != os.getpid():
            self._file = ShowerFile(self.path, self.geometry)
            self._pid = os.getpid()
        return self._file

    def read(self, i: int) -> ShowerBatch:
        a = self.starts[i]
        return self._handle().read(a, a + self.chunk_rows, check=True)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        batch = self.read(i)
        if self.transform is None:
            return torch.from_numpy(batch.showers), torch.from_numpy(batch.energies)
        x, c = self.transform.encode(batch)
        for what, t in (("showers", x), ("conditions", c)):
            bad = ~torch.isfinite(t).all(dim=1)
            if bool(bad.any()):
                row = self.starts[i] + int(torch.nonzero(bad)[0, 0])
                raise DataError(f"{self.path}: shower {row}: {what} are NaN/inf after preprocessing "
                                f"({' -> '.join(self.transform.voxel.names)})")
        return x, c

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None  # never pickle an open h5py handle into a worker
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    @staticmethod
    def worker_init(worker_id: int) -> None:
        """DataLoader ``worker_init_fn``: drop any inherited handle so the worker opens its own."""
        info = torch.utils.data.get_worker_info()
        if info is not None and isinstance(info.dataset, ShowerDataset):
            info.dataset._file = None
            info.dataset._pid = None


class BatchStream:
    """Endless deterministic stream of shuffled batches (x (b, V), c (b, C)) from a ShowerDataset.

    Epoch e visits the chunks in ``permutation(seed, e)`` order, padded by wrapping to a
    multiple of ``world_size`` and dealt round-robin to ranks. A rank reads its chunks in
    groups of ``shuffle_chunks``, shuffles the group's rows (seeded by seed, epoch, rank,
    group) and cuts them into batches (the group's last batch may be smaller). Memory: one
    group of chunks plus the DataLoader's prefetch.

    The position ``state_dict() = {"epoch", "group", "batch"}`` is the next batch to yield.
    """

    def __init__(self, dataset: ShowerDataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_chunks: int = 8, num_workers: int = 0) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle_chunks = max(1, int(shuffle_chunks))
        self.num_workers = int(num_workers)
        self.epoch = self.group = self.batch = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "group": self.group, "batch": self.batch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.group, self.batch = int(state["epoch"]), int(state["group"]), int(state["batch"])

    def _shard(self, epoch: int) -> list[int]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        pad = (-len(order)) % self.world_size
        order = np.concatenate([order, order[:pad]]) if pad else order
        while len(order) < self.world_size:  # fewer chunks than ranks: repeat
            order = np.concatenate([order, order])[: self.world_size]
        return [int(i) for i in order[self.rank :: self.world_size]]

    def _groups(self, epoch: int) -> list[list[int]]:
        shard = self._shard(epoch)
        k = self.shuffle_chunks
        return [shard[i : i + k] for i in range(0, len(shard), k)]

    def batches_per_epoch(self) -> int:
        """Batches one rank sees per epoch (epoch 0's count; later epochs differ by at most a few)."""
        return sum(math.ceil(sum(self.dataset.rows(i) for i in g) / self.batch_size) for g in self._groups(0))

    def _chunks(self, chunk_ids: list[int]) -> Iterator[tuple[Tensor, Tensor]]:
        if self.num_workers <= 0:
            for i in chunk_ids:
                yield self.dataset[i]
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, sampler=chunk_ids, num_workers=self.num_workers,
            worker_init_fn=ShowerDataset.worker_init,
            # own generator: creating worker seeds must not consume the global torch RNG (bit-for-bit resume)
            generator=torch.Generator().manual_seed(self.seed),
        )
        yield from loader

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            groups = self._groups(self.epoch)
            flat = [i for g in groups[self.group :] for i in g]
            chunk_iter = self._chunks(flat)
            while self.group < len(groups):
                parts = [next(chunk_iter) for _ in groups[self.group]]
                x = torch.cat([p[0] for p in parts])
                c = torch.cat([p[1] for p in parts])
                perm = torch.from_numpy(
                    np.random.default_rng([self.seed, self.epoch, self.rank, self.group]).permutation(x.shape[0])
                )
                n_batches = math.ceil(x.shape[0] / self.batch_size)
                while self.batch < n_batches:
                    idx = perm[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
                    self.batch += 1  # advance before yielding: a checkpoint taken after the step resumes after it
                    yield x[idx], c[idx]
                self.group += 1
                self.batch = 0
            self.epoch += 1
            self.group = 0


def check_finite_batch(x: Tensor, c: Tensor, where: str = "batch") -> None:
    """Raise :class:`DataError` when a batch holds NaN/inf (cheap guard in the fit loop)."""
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(c).all())):
        raise DataError(f"{where}: NaN/inf in the model-space batch")

