"""A trained run as Geant4's fast simulation: ``simulate(..., fast_sim=fast_sim_model(RUN))``.

The Geant4 side (killing e+/e-/gamma at the calorimeter's front face, placing and scoring the model's showers)
is :mod:`fastshower.montecarlo.fastsim`, on a floor below runs and sampling; this module gives it the run as
plain data (:class:`~fastshower.montecarlo.fastsim.FastSim`) and :func:`load_generator`, which each worker calls
once to load the model and get a function (energies, conditions, noise seeds) -> showers, through torch or
ONNX Runtime (an exported file of the run).

    import fastshower as fs
    fs.simulate("calogan-3layer", "e+", "10:50", 100, "fast.h5", upstream="G4_Pb:5.6mm", angle="0:30",
                fast_sim=fs.fast_sim_model("runs/calo", threshold="1GeV"))
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastshower.deploy.export import ExportError, load_onnx
from fastshower.energy import parse_energy_value
from fastshower.errors import FastshowerError
from fastshower.io import ShowerFile
from fastshower.montecarlo.backend import BackendOptions
from fastshower.montecarlo.fastsim import FAST_SIM_BATCHES, FastSim, ShowerGenerator
from fastshower.montecarlo.incidence import Incidence
from fastshower.runs import Run, RunInfo, as_run, training_energy_range_mev
from fastshower.sampling import GenerationError, SamplerModule, draw_noise, noise_dim
from fastshower.sampling import sample_options as sample_opts

__all__ = ["fast_sim_model", "load_generator", "trained_ranges"]


def fast_sim_model(
    run: str | Path | Run,
    threshold: str | None = None,
    *,
    batch: str = "event",
    onnx_path: str | Path | None = None,
    allow_extrapolation: bool = False,
    sample_options: Mapping[str, Any] | None = None,
) -> FastSim:
    """The fast simulation of a trained run, for :func:`fastshower.simulate`'s ``fast_sim``.

    Args:
        run: a run folder (or a loaded run; workers load it again from its folder).
        threshold: e+/e-/gamma entering the calorimeter at or above this kinetic energy are replaced ("1GeV",
            "500MeV"; GeV without a unit); default: the lowest energy the run was trained on.
        batch: "event" (one model call per event for all its replaced particles) or "particle" (one per particle).
        onnx_path: infer with ONNX Runtime on this export of the run (``fastshower export``); default torch.
        allow_extrapolation: replace particles outside the run's trained angles, entry points and energies too
            (and angled ones for a run without the angle condition), with a warning in the file's provenance.
        sample_options: torch sampler settings, e.g. {"steps": 4} for flow-matching and layer-fm (default: the
            run's); an ONNX export has its own fixed in the graph.

    Raises:
        RunError, ExportError, GenerationError, EnergySpecError: an unusable run, ONNX file, model or threshold.
        Whether the run fits the simulation (geometry, threshold, angles) is checked by ``simulate``.
    """
    loaded = as_run(run)
    info = loaded.info
    noise_dim(loaded.model)  # GenerationError for a model that cannot be sampled from given noise
    if batch not in FAST_SIM_BATCHES:
        raise GenerationError(f"--fast-sim-batch must be {' or '.join(FAST_SIM_BATCHES)}, got {batch!r}")
    options = {k: v for k, v in (sample_options or {}).items() if v is not None}
    if onnx_path is not None:
        meta = load_onnx(onnx_path, info).meta  # refused here, in the calling process, if not this run's export
        for key, value in options.items():
            if str(value) != meta.get(key):
                raise ExportError(f"{onnx_path}: exported with {key} {meta.get(key)}, fast simulation asks for "
                                  f"{value}; export again with it or leave it out")
        options = {}
    else:
        sample_opts(loaded.model, options)  # GenerationError for an option the model does not take
    lo, hi = training_energy_range_mev(info)
    threshold_mev = lo if threshold is None else parse_energy_value(str(threshold))
    return FastSim(
        run=str(info.run_dir.resolve()), run_id=info.run_id, model=f"{info.model_name} step {info.step}",
        geometry=info.geometry, particle=info.particle, cond_names=tuple(info.cond_names),
        cond_widths=tuple(info.cond_widths), cond_ranges=trained_ranges(info),
        energy_range_mev=(float(lo), float(hi)), threshold_mev=float(threshold_mev), batch=batch,
        inference="torch" if onnx_path is None else "onnx",
        onnx_path=None if onnx_path is None else str(Path(onnx_path).resolve()), sample_options=options,
        allow_extrapolation=bool(allow_extrapolation), loader=load_generator,
    )


def trained_ranges(info: RunInfo) -> dict[str, tuple[list[float], list[float]]]:
    """Per condition, (low per column, high per column) the run was trained for: the ranges its training file was
    simulated with (``option_angle``, ``option_phi``, ``option_position``; ``--angle 0:30`` gives 0-30 degrees, not
    the 0.1-29.9 that the draws happened to span), widened to the values seen in training; the values seen alone
    when the file is gone or was not made by ``simulate`` with those options (as for the energy, see
    :func:`~fastshower.runs.training_energy_range_mev`)."""
    seen = {k: (list(map(float, a)), list(map(float, b))) for k, (a, b) in info.cond_ranges.items()}
    path = info.training_file
    if path is None or not Path(path).is_file():
        return seen
    try:
        with ShowerFile(path, info.geometry, require_complete=False) as f:
            made = {k.removeprefix("option_"): str(v) for k, v in f.attrs.items() if k.startswith("option_")}
        inc = Incidence.from_options(info.geometry, BackendOptions(extra=made))
    except (FastshowerError, OSError):  # unreadable, or options of another kind: the values seen are all there is
        return seen
    spec: dict[str, tuple[list[float], list[float]]] = {}
    if inc.theta is not None:
        spec["angle"] = ([inc.theta[0], inc.phi[0]], [inc.theta[1], inc.phi[1]])
    if inc.position is not None:
        (x0, x1), (y0, y1) = inc.position
        spec["position"] = ([x0, y0], [x1, y1])
    for k, (lo, hi) in seen.items():
        if k in spec:
            a, b = spec[k]
            seen[k] = ([min(u, v) for u, v in zip(lo, a[:len(lo)], strict=True)],
                       [max(u, v) for u, v in zip(hi, b[:len(hi)], strict=True)])
    return seen


def load_generator(fs: FastSim) -> ShowerGenerator:
    """The run's showers as a function (energies (k,) MeV, conditions {name: (k, w)}, seeds (k,)) -> (k, V) on the
    readout scale; the noise of row j is drawn from a torch generator seeded with ``seeds[j]``, so a shower does
    not depend on what else is in the call (per event and per particle agree within float rounding).

    Called once per worker process (torch then runs on one thread there, as the workers share the cores).
    """
    torch.set_num_threads(1)
    run = as_run(fs.run)
    model = run.model
    names = tuple(fs.cond_names)

    def noise(seeds: np.ndarray) -> torch.Tensor:
        return torch.cat([draw_noise(model, 1, torch.Generator().manual_seed(int(s) % 2**63)) for s in seeds])

    if fs.onnx_path is not None:
        sampler = load_onnx(fs.onnx_path, run.info)

        def generate_onnx(e: np.ndarray, conds: dict[str, np.ndarray], seeds: np.ndarray) -> np.ndarray:
            return sampler(noise(seeds), e, {k: conds[k] for k in names})

        return generate_onnx
    module = SamplerModule(run, **fs.sample_options)

    @torch.no_grad()
    def generate_torch(e: np.ndarray, conds: dict[str, np.ndarray], seeds: np.ndarray) -> np.ndarray:
        e_t = torch.as_tensor(np.asarray(e, dtype=np.float32)).reshape(-1, 1)
        c_t = [torch.as_tensor(np.asarray(conds[k], dtype=np.float32)) for k in names]
        return module(noise(seeds), e_t, *c_t).float().numpy()

    return generate_torch
