"""The run folder: its layout, how it is written and read, its checkpoints and the :class:`Run` object.

``fastshower train`` and ``fastshower distill`` write a run folder; ``generate``, ``export``,
``bench``, ``distill`` (as teacher) and ``evaluate`` (through generated files) read it. This
module is the only one that knows the file names::

    config.json         model name, model config ("hparams"), training config ("train")
    config.toml         the TOML config as given (when one was)
    geometry.json       the training file's geometry
    transforms.json     fitted preprocessing (fastshower.data.ShowerTransform state)
    spec.json           the ModelSpec the networks were built from
    meta.json           fastshower/torch versions, the data file's provenance, status, step
    train_log.jsonl     one JSON line per logged training step
    distill_log.jsonl   a distilled run's held-out errors during distillation
    checkpoints/last.pt model, optimizer, scheduler, RNG and data-order state

Checkpoints and JSON files are written atomically (temporary file + ``os.replace``), so a
killed writer leaves the previous complete file. Checkpoints load with
``torch.load(weights_only=True)``: a file that would need arbitrary unpickling is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from fastshower.config import Config, TrainConfig
from fastshower.data import ShowerTransform
from fastshower.domain import TrainedDomain
from fastshower.energy import parse_energy
from fastshower.errors import FastshowerError
from fastshower.geometry import Geometry, geometry_from_json
from fastshower.io import ShowerFile
from fastshower.models import build_model, get_config_class
from fastshower.models.base import ModelSpec, ShowerModel

__all__ = [
    "CHECKPOINT_FORMAT",
    "Run",
    "RunError",
    "RunFolder",
    "RunInfo",
    "as_run",
    "atomic_save",
    "data_provenance",
    "draw_training_conditions",
    "load_checkpoint",
    "load_run",
    "read_json",
    "training_energy_range_mev",
    "write_config",
    "write_json",
]

#: version of the checkpoint dictionary; a checkpoint of another format is refused
CHECKPOINT_FORMAT = 1


class RunError(FastshowerError, ValueError):
    """A run folder that is missing, incomplete, unfinished or holds a checkpoint that does not fit."""


@dataclass(frozen=True)
class RunFolder:
    """The paths of a run folder (nothing is read or created by building one)."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def config_toml(self) -> Path:
        return self.path / "config.toml"

    @property
    def geometry(self) -> Path:
        return self.path / "geometry.json"

    @property
    def transforms(self) -> Path:
        return self.path / "transforms.json"

    @property
    def spec(self) -> Path:
        return self.path / "spec.json"

    @property
    def meta(self) -> Path:
        return self.path / "meta.json"

    @property
    def train_log(self) -> Path:
        return self.path / "train_log.jsonl"

    @property
    def distill_log(self) -> Path:
        return self.path / "distill_log.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    #: files that fix the model space: a distilled run copies them from its teacher unchanged
    SHARED: tuple[str, ...] = ("geometry.json", "transforms.json", "spec.json")

    def holds_run(self) -> bool:
        """Whether a run was started here (its config.json exists)."""
        return self.config.exists()


# --- JSON and checkpoints ----------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (temporary file and rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON in ``path``; :class:`RunError` when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"{path.parent}: not a complete fastshower run folder ({path.name}: "
                       f"{getattr(exc, 'strerror', None) or exc})") from None


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save ``obj`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new checkpoint, never half of one


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint; :class:`RunError` when it is missing, truncated or not ours."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path}: no checkpoint") from None
    except Exception as exc:  # torch raises many types for truncated/corrupt zip archives
        raise RunError(f"{path}: corrupt or unreadable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise RunError(f"{path}: not a fastshower checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def load_weights(model: torch.nn.Module, state: Mapping[str, Any], where: Path, model_name: str) -> None:
    """``model.load_state_dict(state)``; :class:`RunError` naming the run when the shapes do not fit."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise RunError(f"{where}: checkpoint does not fit model {model_name!r} "
                       f"({str(exc).splitlines()[0]})") from None


def write_config(folder: RunFolder, model_name: str, model_config: Config | Mapping[str, Any],
                 options: TrainConfig) -> None:
    """The run's config.json: model name, model config and training config."""
    hparams = model_config.to_dict() if isinstance(model_config, Config) else dict(model_config)
    write_json(folder.config, {"model": model_name, "hparams": hparams, "train": options.to_dict()})


# --- the Run object ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo(TrainedDomain):
    """What a run folder says about itself.

    Attributes:
        geometry, particle, cond_names, cond_widths, cond_ranges, energy_range_mev: the domain it was trained
            on (:class:`~fastshower.domain.TrainedDomain`): condition ranges as seen in training, the training
            file's (min, max) incident energy, MeV (for the range it was made with,
            :func:`training_energy_range_mev`).
        run_dir: the folder.
        model_name: registered model name.
        hparams: resolved model config as a dict (``model.config.to_dict()``).
        options: the training config.
        spec: the networks' ModelSpec.
        threshold_mev: readout threshold applied to generated voxels, MeV.
        step: training step of the loaded weights.
        meta: meta.json (versions, data provenance, status).
    """

    run_dir: Path
    model_name: str
    hparams: dict[str, Any]
    options: TrainConfig
    spec: ModelSpec
    threshold_mev: float
    step: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.run_dir.resolve().name

    @property
    def finished(self) -> bool:
        return self.meta.get("status") == "finished"

    @property
    def training_file(self) -> str | None:
        """The training file's path as recorded at training time (None when the run records none)."""
        path = self.meta.get("data", {}).get("path")
        return str(path) if path else None


class Run(NamedTuple):
    """A loaded run: the model (eval mode, last checkpoint's weights), its preprocessing and its facts.

    A tuple, so ``model, transform, info = run`` works as well as ``run.model``.
    """

    model: ShowerModel
    transform: ShowerTransform
    info: RunInfo


def _info(folder: RunFolder, cfg: Mapping[str, Any], model: ShowerModel, transform: ShowerTransform,
          step: int) -> RunInfo:
    meta = read_json(folder.meta)
    options = TrainConfig.from_dict(cfg.get("train", {}), where=f"{folder.config} [train]")
    stats = transform.stats
    return RunInfo(
        run_dir=folder.path,
        model_name=str(cfg["model"]),
        hparams=model.hparams,
        options=options,
        spec=model.spec,
        geometry=geometry_from_json(read_json(folder.geometry)),
        particle=str(meta.get("data", {}).get("particle", "unknown")),
        cond_names=transform.cond.names,
        cond_widths=transform.cond.widths,
        cond_ranges={k: (stats.cond_min[k], stats.cond_max[k]) for k in transform.cond.names} if stats else {},
        energy_range_mev=(stats.energy_min, stats.energy_max) if stats else (0.0, float("inf")),
        threshold_mev=float(options.threshold_resolved_mev or 0.0),
        step=step,
        meta=meta,
    )


def load_run(run_dir: str | Path, device: str = "cpu", require_finished: bool = False) -> Run:
    """The :class:`Run` of a run folder, with its last checkpoint's weights, in eval mode on ``device``.

    Raises:
        RunError: no such folder, a missing or unreadable file, a checkpoint that does not fit, an old
            config that cannot be read, or (``require_finished``) a run whose training has not finished.
    """
    folder = RunFolder(Path(run_dir))
    if not folder.path.is_dir():
        raise RunError(f"{folder.path}: no such run folder")
    cfg = read_json(folder.config)
    spec = ModelSpec.from_dict(read_json(folder.spec))
    transform = ShowerTransform.load(folder.transforms)
    ckpt = load_checkpoint(folder.checkpoint)
    try:
        name = str(cfg["model"])
        model = build_model(name, spec, get_config_class(name).from_saved(cfg.get("hparams", {})))
    except (KeyError, ValueError) as exc:
        raise RunError(f"{folder.path}: cannot rebuild the model ({str(exc).splitlines()[0]})") from None
    load_weights(model, ckpt["model"], folder.path, str(cfg["model"]))
    model.to(device).eval()
    transform.to(device)
    info = _info(folder, cfg, model, transform, int(ckpt["step"]))
    if require_finished and not info.finished:
        raise RunError(f"{folder.path}: training is not finished (status {info.meta.get('status')!r}); "
                       "resume it first")
    return Run(model, transform, info)


def as_run(run: str | Path | Run | tuple[ShowerModel, ShowerTransform, RunInfo], device: str = "cpu",
           require_finished: bool = False) -> Run:
    """A :class:`Run` from a run folder's path or an already loaded run (the one place that accepts both)."""
    if isinstance(run, (str, Path)):
        return load_run(run, device, require_finished)
    loaded = Run(*run)
    if require_finished and not loaded.info.finished:
        raise RunError(f"{loaded.info.run_dir}: training is not finished (status "
                       f"{loaded.info.meta.get('status')!r}); resume it first")
    return loaded


# --- the training data a run records --------------------------------------------------------------


def data_provenance(f: ShowerFile) -> dict[str, Any]:
    """What meta.json records of a training file: path, size, time stamp and the file's provenance."""
    keep = ("generator", "particle", "pdg", "physics", "seed", "energy_spec", "fastshower_version", "created",
            "finished")
    st = f.path.stat()
    return {
        "path": str(f.path.resolve()),
        "n_showers": f.n,
        "bytes": st.st_size,
        "mtime": st.st_mtime,
        "geometry": f.geometry.name,
        **{k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items() if k in keep},
    }


def training_energy_range_mev(info: RunInfo) -> tuple[float, float]:
    """(low, high) incident energy, MeV, the run was trained for: the range of the energy spec its training
    file was made with (``1:100`` gives 1-100 GeV, not the 1.5-98.8 GeV 300 draws happened to span), widened
    to the energies the file holds (a merged file may hold more). The spec is read from meta.json, or for runs
    trained before it recorded one, from the training file if it is still there; else the energies' range.
    """
    lo, hi = info.energy_range_mev
    text = info.meta.get("data", {}).get("energy_spec")
    path = info.training_file
    if text is None and path is not None and Path(path).is_file():
        try:
            with ShowerFile(path, info.geometry, require_complete=False) as f:
                text = f.attrs.get("energy_spec")
        except (FastshowerError, OSError):  # unreadable now: the energies' range is all there is
            text = None
    if not text:
        return lo, hi
    try:
        spec = parse_energy(str(text))
    except FastshowerError:  # a foreign or hand-written attribute: not ours to judge
        return lo, hi
    return min(lo, spec.low), max(hi, spec.high)


def draw_training_conditions(info: RunInfo, n: int, rng: np.random.Generator, replace: bool = False
                             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Incident energies (m,) MeV and the run's raw conditions {name: (m, k)} (the file's units) of
    showers drawn at random from the training file the run records (meta.json ``data.path``).

    ``replace=False``: m = min(n, N) distinct showers of the file's N; ``replace=True``: m = n, sorted.
    Only the energy and condition columns are read (whole), never the showers.

    Raises:
        RunError: the run records no training file.
        ShowerFileError | OSError: the file is missing, unreadable, of another geometry or without one
            of the run's conditions.
    """
    path = info.training_file
    if path is None:
        raise RunError(f"run {info.run_dir} records no training file (meta.json data.path)")
    with ShowerFile(path, info.geometry) as f:
        energies = f.energies()
        conds = {k: f.condition(k) for k in info.cond_names}
    rows = (np.sort(rng.integers(0, len(energies), size=n)) if replace
            else rng.choice(len(energies), min(n, len(energies)), replace=False))
    return energies[rows], {k: v[rows] for k, v in conds.items()}


def run_geometry(run_dir: str | Path) -> Geometry:
    """The geometry a run was trained on (read without loading the model)."""
    return geometry_from_json(read_json(RunFolder(Path(run_dir)).geometry))
