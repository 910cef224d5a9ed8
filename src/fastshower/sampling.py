"""Sampling from a loaded run: in-memory batches in MeV, condition specs, and the sampler as a pure function.

- :func:`sample_batch` generates an in-memory batch in MeV for given incident energies and
  conditions (the validation suite, the ONNX exporter and :func:`fastshower.generation.generate` use it).
- :func:`parse_condition` / :func:`condition_samplers` turn condition specs (``"-30:30,0"``) into samplers.

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

Sampling as a pure function
---------------------------
Every model's ``sample(c, generator)`` draws Gaussian noise and maps it deterministically to a
shower. :func:`noise_dim`, :func:`draw_noise` and :func:`sample_from_noise` split the two:

- ``noise_dim(model)`` -> D, the width of the standard-normal noise one shower needs;
- ``draw_noise(model, B, generator)`` -> (B, D), drawn in the order ``model.sample`` draws, so
  ``sample_from_noise(model, draw_noise(model, B, g), c)`` equals ``model.sample(c, g)`` for a
  generator ``g`` in the same state;
- ``sample_from_noise(model, z (B, D), c (B, C))`` -> model-space showers (B, V).

The noise per model: ``flow-matching`` V (the ODE's initial state; the ODE is unrolled with the
step count and solver fixed at export); ``vae`` latent (+ V for the decoder noise when
``sample_noise``); ``wgan-gp`` and ``calogan`` latent_dim; ``flow`` L + V (flow 1's, then flow 2's
base variables). These are the models' own ``noise_dim``/``draw_noise``/``sample_from_noise`` methods
(the ShowerModel protocol, :mod:`fastshower.models.base`); the functions here validate and delegate.
:class:`SamplerModule` puts noise sampling, the inverse preprocessing and post-processing in one
module: what the ONNX exporter (:mod:`fastshower.deploy`) traces.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastshower.data import ShowerTransform
from fastshower.errors import FastshowerError
from fastshower.geometry import GROUND_VERTICAL_DEPTH, Geometry
from fastshower.models.base import ShowerModel
from fastshower.runs import Run, RunInfo

__all__ = [
    "ConditionSampler",
    "GenerationError",
    "SamplerModule",
    "below_ground_mask",
    "condition_samplers",
    "draw_noise",
    "noise_dim",
    "parse_condition",
    "postprocess",
    "sample_batch",
    "sample_from_noise",
    "sample_options",
    "zero_below_ground",
]


class GenerationError(FastshowerError, ValueError):
    """A generation request that does not fit its run (energies, conditions, sampling options, backend)."""


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


def condition_samplers(info: RunInfo, given: Mapping[str, Any] | None) -> tuple[dict[str, ConditionSampler],
                                                                                 dict[str, str]]:
    """One sampler per condition of the run, from ``given`` specs or the training range; and the specs used."""
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
        elif info.options.condition_defaults == "range" and name in info.cond_ranges:
            lo, hi = info.cond_ranges[name]
            # default: uniform over the training range (for belle2-ecl-5x5 the centre crystal's face)
            spec = ",".join(f"{a!r}:{b!r}" for a, b in zip(lo, hi, strict=True))
        else:
            raise GenerationError(f"condition {name!r} is required by run {info.run_id}: give it as "
                                  f"{name}=LOW:HIGH or a fixed value per column ({width} column(s))")
        samplers[name] = parse_condition(spec, width, name)
        used[name] = spec if isinstance(spec, str) else json.dumps(spec)
    return samplers, used




# --- sampling as a pure function of (noise, conditions) ---------------------------------------------


def sample_options(model: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """Resolved sampling options: ``steps``/``method`` for the ODE models (flow-matching, layer-fm), none for
    the others."""
    name = getattr(model, "name", type(model).__name__)
    opts = {k: v for k, v in options.items() if v is not None}
    if name in ("flow-matching", "layer-fm"):
        steps = int(opts.pop("steps", model.hparams["steps"]))
        method = str(opts.pop("method", model.hparams["method"]))
        if steps < 1:
            raise GenerationError(f"steps must be >= 1, got {steps}")
        if method not in ("euler", "midpoint", "heun"):
            raise GenerationError(f"unknown ODE method {method!r}; choose euler, midpoint or heun")
        resolved: dict[str, Any] = {"steps": steps, "method": method}
    else:
        resolved = {}
    if opts:
        raise GenerationError(f"model {name!r} takes no sampling option(s) {sorted(opts)}")
    return resolved


def noise_dim(model: Any) -> int:
    """D: standard-normal numbers per shower that :func:`sample_from_noise` consumes (the model's protocol)."""
    try:
        return int(model.noise_dim())
    except NotImplementedError as exc:
        raise GenerationError(str(exc)) from None


def draw_noise(model: Any, batch: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Tensor:
    """Standard-normal noise (batch, D), drawn in the order the model's ``sample`` draws it.

    With a generator in the same state, ``sample_from_noise(model, draw_noise(...), c)`` reproduces
    ``model.sample(c, generator)`` (same numbers, same order).
    """
    if batch < 1:
        raise GenerationError(f"batch size must be >= 1, got {batch}")
    noise_dim(model)  # a clear GenerationError for models without the noise protocol
    return model.draw_noise(batch, generator, dtype, device)


def sample_from_noise(model: Any, z: Tensor, c: Tensor, **options: Any) -> Tensor:
    """Model-space showers (B, V) from noise z (B, D) and model-space conditions c (B, C); traceable.

    Options: ``steps``, ``method`` for flow-matching (default: the run's hparams).
    """
    try:
        return model.sample_from_noise(z, c, **sample_options(model, options))
    except NotImplementedError as exc:
        raise GenerationError(str(exc)) from None


class SamplerModule(nn.Module):
    """The whole generator as one module: (noise, energy, conditions) -> showers in MeV.

    ``forward(noise (B, D), incident_energy_mev (B, 1), *conditions)`` with one (B, k) tensor per
    extra condition of the run in ``info.cond_names`` order (raw units, e.g. mm) returns
    ``showers_mev`` (B, V): model sampling, the run's inverse preprocessing and
    :func:`postprocess` with the readout threshold.
    """

    def __init__(self, run: Run, threshold_mev: float | None = None, **options: Any) -> None:
        super().__init__()
        model, transform, info = run
        self.model = model.eval()
        self.transform = transform
        self.cond_names = tuple(info.cond_names)
        self.threshold_mev = float(info.threshold_mev if threshold_mev is None else threshold_mev)
        self.options = sample_options(model, options)
        # air-shower profiles conditioned on zenith: values below ground are zeroed, as sample_batch does
        self.geometry = info.geometry if info.geometry.profile is not None and "zenith" in self.cond_names else None

    def forward(self, noise: Tensor, incident_energy_mev: Tensor, *conditions: Tensor) -> Tensor:
        e = incident_energy_mev.reshape(-1)
        conds = dict(zip(self.cond_names, conditions, strict=True))
        c = self.transform.conditions(e, conds)
        x = sample_from_noise(self.model, noise, c, **self.options)
        showers = postprocess(self.transform.inverse(x, e), e, self.threshold_mev)
        if self.geometry is not None:
            showers = zero_below_ground(showers, self.geometry, conds["zenith"])
        return showers


