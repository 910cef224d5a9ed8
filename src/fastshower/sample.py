"""Batched generation from a trained run.

- :func:`load_run` rebuilds (model, transform, info) from a run folder written by
  :func:`fastshower.train.train`.
- :func:`sample_batch` generates an in-memory batch in MeV for given incident energies
  and conditions (the validation suite and the ONNX exporter use it).
- :func:`generate` draws energies and conditions from specs, generates batch by batch
  and streams to a shower file (any N: memory holds one batch).

Post-processing (:func:`postprocess`, traceable): NaN -> 0, clamp to [0, E_inc] per
voxel, and voxels below the run's readout threshold set to 0. The threshold defaults to
the training option ``threshold_mev``; its default ``"auto"`` resolves at training time
to the energy below which 0.1 % of the training file's hits lie (data.DataStats.low_hit_mev;
8.9 keV for Belle II 5x5 with Geant4), so models do not fill cells the Monte Carlo leaves
empty with sub-keV noise; a float (MeV) fixes it, 0 disables it.

Air-shower profiles (geometries with a ``profile`` axis) get one more, geometry-aware step
(:func:`zero_below_ground`) when the run is conditioned on ``zenith``: every slant-depth bin
that starts at or beyond the ground, ``X_ground = 1036 g/cm^2 / cos(zenith)`` (flat Earth,
sea level, as in the reference generator), is set to exactly zero in every channel.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastshower import __version__
from fastshower.data import ShowerTransform
from fastshower.energy import EnergySpec, EnergySpecError, parse_energy
from fastshower.geometry import Geometry, geometry_from_json
from fastshower.io import ShowerBatch, ShowerFile, ShowerFileError, ShowerWriter
from fastshower.models import get_model_class
from fastshower.models.base import ModelSpec, ShowerModel
from fastshower.simulate.airshower import X_GROUND_VERTICAL

__all__ = [
    "GenerationError",
    "RunInfo",
    "below_ground_mask",
    "draw_training_conditions",
    "generate",
    "load_run",
    "parse_condition",
    "postprocess",
    "sample_batch",
    "zero_below_ground",
]

#: vertical depth of the ground (sea level) of the air-shower reference generator, g/cm^2
GROUND_VERTICAL_DEPTH = X_GROUND_VERTICAL


class GenerationError(ValueError):
    """A run that cannot be loaded or a generation request that does not fit it."""


@dataclass
class RunInfo:
    """What a run folder says about itself.

    Attributes:
        run_dir: the folder.
        model_name: registered model name.
        hparams: resolved model hyper-parameters.
        options: resolved training options (see :data:`fastshower.train.TRAIN_DEFAULTS`).
        spec: the networks' ModelSpec.
        geometry: training geometry.
        particle: particle of the training file.
        cond_names, cond_widths: extra conditions generation needs (without log_energy).
        cond_ranges: per condition, (min per column, max per column) seen in training.
        energy_range_mev: (min, max) incident energy of the training file, MeV.
        threshold_mev: readout threshold applied to generated voxels, MeV.
        step: training step of the loaded weights.
        meta: meta.json (versions, data provenance, status).
    """

    run_dir: Path
    model_name: str
    hparams: dict[str, Any]
    options: dict[str, Any]
    spec: ModelSpec
    geometry: Geometry
    particle: str
    cond_names: tuple[str, ...]
    cond_widths: tuple[int, ...]
    cond_ranges: dict[str, tuple[list[float], list[float]]]
    energy_range_mev: tuple[float, float]
    threshold_mev: float
    step: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.run_dir.resolve().name


Run = tuple[ShowerModel, ShowerTransform, RunInfo]


def load_run(run_dir: str | Path, device: str = "cpu") -> Run:
    """(model in eval mode, transform, info) of a run folder, with the last checkpoint's weights."""
    from fastshower.train import TrainingError, load_checkpoint

    run_dir = Path(run_dir)
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
        spec = ModelSpec.from_dict(json.loads((run_dir / "spec.json").read_text()))
        geometry = geometry_from_json((run_dir / "geometry.json").read_text())
        meta = json.loads((run_dir / "meta.json").read_text())
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise GenerationError(f"{run_dir}: not a complete fastshower run folder ({exc})") from None
    transform = ShowerTransform.load(run_dir / "transforms.json")
    try:
        ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    except TrainingError as exc:
        raise GenerationError(str(exc)) from None
    cls = get_model_class(cfg["model"])
    model = cls(spec, **cfg["hparams"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise GenerationError(f"{run_dir}: checkpoint does not fit model {cfg['model']!r} "
                              f"({str(exc).splitlines()[0]})") from None
    model.to(device).eval()
    transform.to(device)
    stats = transform.stats
    opts = cfg["train"]
    info = RunInfo(
        run_dir=run_dir,
        model_name=cfg["model"],
        hparams=cfg["hparams"],
        options=opts,
        spec=spec,
        geometry=geometry,
        particle=str(meta.get("data", {}).get("particle", "unknown")),
        cond_names=transform.cond.names,
        cond_widths=transform.cond.widths,
        cond_ranges={k: (stats.cond_min[k], stats.cond_max[k]) for k in transform.cond.names} if stats else {},
        energy_range_mev=(stats.energy_min, stats.energy_max) if stats else (0.0, float("inf")),
        threshold_mev=float(opts.get("threshold_resolved_mev", 0.0)),
        step=int(ckpt["step"]),
        meta=meta,
    )
    return model, transform, info


def draw_training_conditions(info: RunInfo, n: int, rng: np.random.Generator, replace: bool = False
                             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Incident energies (m,) MeV and the run's raw conditions {name: (m, k)} (the file's units) of
    showers drawn at random from the training file the run records (meta.json ``data.path``).

    ``replace=False``: m = min(n, N) distinct showers of the file's N; ``replace=True``: m = n, sorted.
    Only the energy and condition columns are read (whole), never the showers.

    Raises:
        ShowerFileError | OSError: the run records no training file, or it is missing, unreadable, of
            another geometry or without one of the run's conditions.
    """
    path = info.meta.get("data", {}).get("path")
    if not path:
        raise ShowerFileError(f"run {info.run_dir} records no training file (meta.json data.path)")
    with ShowerFile(path, info.geometry) as f:
        energies = f.energies()
        conds = {k: f.condition(k) for k in info.cond_names}
    rows = (np.sort(rng.integers(0, len(energies), size=n)) if replace
            else rng.choice(len(energies), min(n, len(energies)), replace=False))
    return energies[rows], {k: v[rows] for k, v in conds.items()}


# --- post-processing and in-memory sampling -----------------------------------------------------


def postprocess(showers: Tensor, energy: Tensor, threshold_mev: float = 0.0) -> Tensor:
    """Physical showers from decoded ones: NaN -> 0, clamp to [0, E_inc], zero below threshold.

    Args:
        showers: decoded showers (B, V), MeV.
        energy: incident energies (B,), MeV.
        threshold_mev: readout threshold, MeV.
    """
    # written for the ONNX graph as much as for torch: ONNX Runtime's Where with a materialised zeros
    # tensor (what nan_to_num and where(..., zeros_like) export to) cost 2-3 us per 504-voxel shower on one
    # thread, a masked fill or a 0/1 mask 0.2-0.8 us (measured with calogan-3layer students)
    s = showers.masked_fill(~torch.isfinite(showers), 0.0)
    s = torch.minimum(s.clamp_min(0.0), energy.reshape(-1, 1).to(s.dtype))
    if threshold_mev > 0:
        s = s * (s >= threshold_mev).to(s.dtype)
    return s


def below_ground_mask(geometry: Geometry, zenith_deg: Tensor,
                      ground_vertical_depth: float = GROUND_VERTICAL_DEPTH) -> Tensor:
    """Which profile values lie below ground: bool (B, V), True where the bin starts at or beyond the ground.

    Bin ``i`` of the slant-depth axis covers ``[i dx, (i + 1) dx)`` g/cm^2; it is below ground when
    ``i dx >= ground_vertical_depth / cos(zenith)`` (the bin that holds the ground itself keeps its
    value, as in the reference, which keeps the part of that bin above ground). Every channel of
    the profile geometry uses the same axis.

    Args:
        geometry: a geometry with a ``profile`` axis.
        zenith_deg: zenith angles (B,) or (B, 1), degrees, in [0, 90).
        ground_vertical_depth: vertical depth of the ground, g/cm^2.
    """
    if geometry.profile is None:
        raise GenerationError(f"geometry {geometry.name!r} has no profile axis: no ground to apply")
    ax = geometry.profile
    z = zenith_deg.reshape(-1, 1).to(torch.float64)
    x_ground = ground_vertical_depth / torch.cos(z * (math.pi / 180.0))  # (B, 1) slant depth, g/cm^2 (ONNX: no deg2rad)
    low_edges = torch.arange(ax.n_bins, dtype=torch.float64, device=z.device) * ax.dx  # (n_bins,)
    mask = low_edges.unsqueeze(0) >= x_ground  # (B, n_bins)
    return mask.repeat(1, len(ax.channels))


def zero_below_ground(showers: Tensor, geometry: Geometry, zenith_deg: Tensor,
                      ground_vertical_depth: float = GROUND_VERTICAL_DEPTH) -> Tensor:
    """Profiles (B, V) with every value below ground set to exactly 0 (see :func:`below_ground_mask`)."""
    mask = below_ground_mask(geometry, zenith_deg.to(showers.device), ground_vertical_depth)
    return showers.masked_fill(mask, 0.0)


@torch.no_grad()
def sample_batch(
    model: ShowerModel,
    transform: ShowerTransform,
    energies_mev: np.ndarray | Tensor | Sequence[float],
    conditions: Mapping[str, np.ndarray | Tensor] | None = None,
    generator: torch.Generator | None = None,
    threshold_mev: float = 0.0,
    geometry: Geometry | None = None,
    **sample_options: Any,
) -> np.ndarray:
    """Generate one in-memory batch.

    Args:
        model, transform: from :func:`load_run`.
        energies_mev: incident energies (n,), MeV.
        conditions: the run's extra conditions, name -> (n, k) raw values (e.g. position in mm).
        generator: torch generator for the model's noise.
        threshold_mev: readout threshold (``info.threshold_mev`` for a run's own).
        geometry: the run's geometry (``info.geometry``); for an air-shower profile geometry and
            a run conditioned on ``zenith``, values below ground are set to 0 (:func:`zero_below_ground`).
        sample_options: passed to ``model.sample`` (e.g. ``steps=`` for flow-matching).

    Returns:
        showers (n, V) float32, MeV.
    """
    device = next(iter(transform.buffers()), torch.empty(0)).device
    e = torch.as_tensor(np.asarray(energies_mev, dtype=np.float64)).reshape(-1).to(device)
    conds = {k: torch.as_tensor(np.asarray(v)).to(device) for k, v in (conditions or {}).items()}
    unknown = set(conds) - set(transform.cond.names)
    if unknown:
        raise GenerationError(f"unknown condition(s) {sorted(unknown)}; the run uses {list(transform.cond.names)}")
    try:
        c = transform.conditions(e, conds)
    except ValueError as exc:
        raise GenerationError(str(exc)) from None
    model.eval()
    x = model.sample(c, generator, **sample_options)
    showers = postprocess(transform.inverse(x, e), e, threshold_mev)
    if geometry is not None and geometry.profile is not None and "zenith" in conds:
        showers = zero_below_ground(showers, geometry, conds["zenith"])
    return showers.float().cpu().numpy()


# --- condition specs ----------------------------------------------------------------------------------

ConditionSampler = Callable[[np.random.Generator, int], np.ndarray]


def parse_condition(spec: str | float | Sequence[float], width: int, name: str = "condition") -> ConditionSampler:
    """A sampler (rng, n) -> (n, width) from a spec.

    A spec has one field per column, comma-separated; a field is a fixed value ``2.5``
    or a uniform range ``LOW:HIGH``; one field is used for every column. Numbers or a
    sequence of numbers are fixed values. Example for a 2-column position in mm:
    ``"-30:30,-30:30"`` (uniform over a 60 mm square) or ``"0,0"``.
    """
    if isinstance(spec, str):
        fields = [f.strip() for f in spec.split(",") if f.strip()]
    elif isinstance(spec, (int, float)):
        fields = [str(float(spec))]
    else:
        fields = [str(float(v)) for v in spec]
    if len(fields) == 1:
        fields = fields * width
    if len(fields) != width:
        raise GenerationError(f"condition {name!r}: {len(fields)} fields given for {width} columns (spec {spec!r})")
    lows, highs = [], []
    for f in fields:
        try:
            parts = [float(p) for p in f.split(":")]
        except ValueError:
            raise GenerationError(f"condition {name!r}: cannot read {f!r}; use VALUE or LOW:HIGH") from None
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or not all(np.isfinite(parts)) or parts[0] > parts[1]:
            raise GenerationError(f"condition {name!r}: bad field {f!r}; use VALUE or LOW:HIGH with LOW <= HIGH")
        lows.append(parts[0])
        highs.append(parts[1])
    lo, hi = np.asarray(lows), np.asarray(highs)

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        return lo + (hi - lo) * rng.random((n, width))

    return draw


def _condition_samplers(info: RunInfo, given: Mapping[str, Any] | None) -> tuple[dict[str, ConditionSampler],
                                                                                 dict[str, str]]:
    given = dict(given or {})
    unknown = set(given) - set(info.cond_names)
    if unknown:
        raise GenerationError(f"unknown condition(s) {sorted(unknown)}; run {info.run_id} uses "
                              f"{list(info.cond_names) or 'none'}")
    samplers: dict[str, ConditionSampler] = {}
    used: dict[str, str] = {}
    for name, width in zip(info.cond_names, info.cond_widths, strict=True):
        if name in given:
            spec = given[name]
        elif info.options.get("condition_defaults", "range") == "range" and name in info.cond_ranges:
            lo, hi = info.cond_ranges[name]
            # default: uniform over the training range (for belle2-ecl-5x5 the centre crystal's face)
            spec = ",".join(f"{a!r}:{b!r}" for a, b in zip(lo, hi, strict=True))
        else:
            raise GenerationError(f"condition {name!r} is required by run {info.run_id}: give it as "
                                  f"{name}=LOW:HIGH or a fixed value per column ({width} column(s))")
        samplers[name] = parse_condition(spec, width, name)
        used[name] = spec if isinstance(spec, str) else json.dumps(spec)
    return samplers, used


def generate(
    run: str | Path | Run,
    n: int,
    energy: str | EnergySpec,
    conditions: Mapping[str, str | float | Sequence[float]] | None = None,
    out: str | Path = "generated.h5",
    *,
    batch_size: int = 10000,
    seed: int = 0,
    progress: bool = True,
    device: str = "cpu",
    threshold_mev: float | None = None,
    extrapolate: bool = False,
    sample_options: Mapping[str, Any] | None = None,
    backend: str = "torch",
    onnx_path: str | Path | None = None,
    int8: bool = False,
) -> Path:
    """Generate ``n`` showers from a trained run into a new shower file; returns its path.

    Args:
        run: run folder (or the tuple from :func:`load_run`).
        n: number of showers.
        energy: incident energy spec (see :mod:`fastshower.energy`, e.g. "2.0" GeV, "0.5:2.5").
        conditions: the run's extra conditions as specs (see :func:`parse_condition`); a missing one
            is drawn uniformly over its training range unless the run was trained with
            ``condition_defaults = "none"``.
        out: output file (must not exist).
        batch_size: showers generated and written per step (memory ~ batch_size x V x 4 bytes x a few).
        seed: seeds energies, conditions and the model's noise: same seed and batch_size -> same file.
        progress: tqdm bar.
        device: where the model runs.
        threshold_mev: readout threshold, MeV (default: the run's).
        extrapolate: allow energies outside the training range (otherwise an error).
        sample_options: passed to ``model.sample`` (e.g. {"steps": 16} for flow-matching); with the ONNX
            backend they are fixed in the exported graph.
        backend: "torch" or "onnx" (ONNX Runtime on CPU, see :mod:`fastshower.export`). Both draw the same
            noise from ``seed``, so the same call gives the same showers within float tolerance.
        onnx_path: with ``backend="onnx"``, an exported file of this run (its metadata is checked);
            default: the run is exported to a temporary file first.
        int8: with ``backend="onnx"`` and no ``onnx_path``, export with INT8 quantisation.
    """
    from tqdm.auto import tqdm

    model, transform, info = load_run(run, device) if isinstance(run, (str, Path)) else run
    if n < 1 or batch_size < 1:
        raise GenerationError(f"n and batch_size must be >= 1 (got {n}, {batch_size})")
    espec = parse_energy(energy) if isinstance(energy, str) else energy
    lo, hi = info.energy_range_mev
    if not extrapolate:
        try:
            espec.check_range(lo, hi, f"run {info.run_id} (trained on)")
        except EnergySpecError as exc:
            raise GenerationError(f"{exc}; pass extrapolate=True (--extrapolate) to generate anyway") from None
    samplers, used = _condition_samplers(info, conditions)
    thr = info.threshold_mev if threshold_mev is None else float(threshold_mev)
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    opts = dict(sample_options or {})
    attrs = {
        "seed": seed,
        "model": info.model_name,
        "run": str(info.run_dir.resolve()),
        "run_step": info.step,
        "energy_spec": espec.text,
        "condition_specs": used,
        "threshold_mev": thr,
        "sample_options": opts,
        "training_data": info.meta.get("data", {}).get("path", "unknown"),
    }
    if backend not in ("torch", "onnx"):
        raise GenerationError(f"unknown backend {backend!r}; choose torch or onnx")
    generator_name = f"{info.model_name} run {info.run_id} step {info.step} (fastshower {__version__})"
    widths = dict(zip(info.cond_names, info.cond_widths, strict=True))
    with contextlib.ExitStack() as stack:
        onnx_sampler = None
        if backend == "onnx":
            onnx_sampler = _onnx_sampler(stack, (model, transform, info), onnx_path, thr, opts, int8)
            attrs["backend"] = onnx_sampler.backend  # onnx-fp32, onnx-int8 (dynamic) or onnx-int8-static
            generator_name += f" [{onnx_sampler.backend.upper().replace('-', ' ', 1)}]"
        else:
            attrs["backend"] = "torch"
        w = stack.enter_context(ShowerWriter(out, info.geometry, info.particle, generator_name, n, widths, attrs))
        bar = stack.enter_context(tqdm(total=n, disable=not progress, desc="generate", unit="shower"))
        while w.n_written < n:
            m = min(batch_size, n - w.n_written)
            e = espec.sample(rng, m)
            conds = {k: s(rng, m) for k, s in samplers.items()}
            if onnx_sampler is None:
                showers = sample_batch(model, transform, e, conds, gen, thr, geometry=info.geometry, **opts)
            else:
                from fastshower.export import draw_noise

                # the same noise, in the same order, as model.sample draws from gen
                showers = onnx_sampler(draw_noise(model, m, gen), e, conds)
            w.append(ShowerBatch(e, showers, conds))
            bar.update(m)
    return Path(out)


def _onnx_sampler(stack: contextlib.ExitStack, run: Run, onnx_path: str | Path | None, threshold_mev: float,
                  options: Mapping[str, Any], int8: bool) -> Any:
    """A :class:`fastshower.export.OnnxSampler` of ``run``: the given file (checked) or a fresh export."""
    from fastshower.export import ExportError, export_onnx, load_onnx

    info = run[2]
    if onnx_path is None:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fastshower-onnx-")))
        path = export_onnx(run, tmp / "sampler.onnx", int8=int8, threshold_mev=threshold_mev, **options)
        return load_onnx(path, info)
    sampler = load_onnx(onnx_path, info)
    meta = sampler.meta
    if float(meta.get("threshold_mev", "nan")) != threshold_mev:
        raise ExportError(f"{onnx_path}: exported with threshold {meta.get('threshold_mev')} MeV, "
                          f"generation asks for {threshold_mev!r} MeV; export again with that threshold")
    for key in ("steps", "method"):
        if key in options and str(options[key]) != meta.get(key):
            raise ExportError(f"{onnx_path}: exported with {key} {meta.get(key)}, generation asks for {options[key]}")
    return sampler
