"""``fastshower generate``: new showers from a trained run, streamed to a shower file.

:func:`generate` draws incident energies and conditions from specs, generates batch by batch
(torch, or ONNX Runtime through :mod:`fastshower.deploy`) and writes every batch to the file as
it comes (any N: memory holds one batch). The file carries its provenance: model, run, step,
seed, the specs and the sampler options.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastshower._version import __version__
from fastshower.deploy.export import ExportError, OnnxSampler, export_onnx, load_onnx
from fastshower.energy import EnergySpec, EnergySpecError, parse_energy
from fastshower.io import ShowerBatch, ShowerWriter
from fastshower.refinement import Refiner, load_refiner, refiner_summary
from fastshower.runs import Run, RunInfo, as_run, training_energy_range_mev
from fastshower.sampling import ConditionSampler, GenerationError, condition_samplers, draw_noise, sample_batch

__all__ = ["generate"]

#: the samplers :func:`generate` can run
GENERATION_BACKENDS = ("torch", "onnx")


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
    resume: bool = False,
    refine: bool = False,
) -> Path:
    """Generate ``n`` showers from a trained run into a new shower file ``out``; returns its path.

    Args:
        run: run folder (or a loaded :class:`fastshower.runs.Run`).
        n: number of showers; batch_size: showers generated and written per step.
        energy: incident energy spec (see :mod:`fastshower.energy`, e.g. "2.0" GeV, "0.5:2.5").
        conditions: the run's extra conditions as specs (:func:`fastshower.sampling.parse_condition`); a
            missing one is drawn uniformly over its training range unless the run says ``condition_defaults="none"``.
        seed: seeds energies, conditions and the model's noise of batch k by (seed, k): same seed and batch_size
            -> same file, also when it was interrupted and resumed.
        progress, device, threshold_mev: tqdm bar; where the model runs; readout threshold, MeV (default: the run's).
        extrapolate: allow energies outside the training range (otherwise an error).
        sample_options: sampler settings (e.g. {"steps": 16} for flow-matching; fixed in an ONNX graph).
        backend: "torch" or "onnx" (ONNX Runtime, the same noise: the same showers within float tolerance);
            onnx_path: an exported file of this run (default: a fresh export, INT8 when ``int8``).
        resume: top up an interrupted ``out`` (or a smaller one) to ``n``; the request must be the file's own
            (run, step, seed, batch_size, specs, sampler), else it is refused naming what differs.
        refine: rejection-sample on the run's refiner (:mod:`fastshower.refinement`); attributes ``refine`` (the
            refiner) and ``refine_draws`` (showers drawn) say so in the file.

    Raises:
        GenerationError: bad n, batch_size, backend, energies outside the training range, conditions;
            RunError, ExportError, ShowerFileError, RefineError: an unusable run, ONNX file, output path, refiner.
    """
    _check_request(out, resume, n, batch_size, backend)
    loaded = as_run(run, device)
    info, espec = loaded.info, _energy_spec(energy, loaded.info, extrapolate)
    samplers, used = condition_samplers(info, conditions)
    thr, opts = info.threshold_mev if threshold_mev is None else float(threshold_mev), dict(sample_options or {})
    refiner = load_refiner(info.run_dir, info.geometry) if refine else None
    attrs = {"seed": seed, "model": info.model_name, "run": str(info.run_dir.resolve()), "run_step": info.step,
             "energy_spec": espec.text, "condition_specs": used, "threshold_mev": thr, "sample_options": opts,
             "training_data": info.training_file or "unknown", "batch_size": batch_size, **_refine_attr(info, refiner)}
    with contextlib.ExitStack() as stack:
        onnx_sampler = _onnx_sampler(stack, loaded, onnx_path, thr, opts, int8) if backend == "onnx" else None
        attrs["backend"] = onnx_sampler.backend if onnx_sampler else "torch"
        writer = stack.enter_context(_writer(out, info, onnx_sampler, n, attrs, resume))
        _fill(writer, loaded, espec, samplers, onnx_sampler, n, batch_size, seed, thr, opts, device, progress,
              refiner)
    return Path(out)


def _refine_attr(info: RunInfo, refiner: Refiner | None) -> dict[str, Any]:
    """{"refine": the file's attribute}: "none", or the refiner's cap, data and held-out figures."""
    if refiner is None:
        return {"refine": "none"}
    fitted = refiner_summary(info.run_dir)
    return {"refine": {"cap": refiner.config.cap, "max_rounds": refiner.config.max_rounds, "data": fitted.get("data"),
                       "validation_auc": fitted.get("validation_auc"), "acceptance": fitted.get("acceptance")}}


def _check_request(out: str | Path, resume: bool, n: int, batch_size: int, backend: str) -> None:
    """Raise :class:`GenerationError` for an existing ``out`` without ``resume``, bad sizes or backend."""
    if Path(out).exists() and not resume:
        raise GenerationError(f"{out} exists; use resume=True to top it up, or choose another out")
    if n < 1 or batch_size < 1:
        raise GenerationError(f"n and batch_size must be >= 1 (got {n}, {batch_size})")
    if backend not in GENERATION_BACKENDS:
        raise GenerationError(f"unknown backend {backend!r}; choose {' or '.join(GENERATION_BACKENDS)}")


def _writer(out: str | Path, info: RunInfo, onnx_sampler: OnnxSampler | None, n: int, attrs: Mapping[str, Any],
            resume: bool) -> ShowerWriter:
    """The output's writer: a new file, or (``resume``) the file this very request began."""
    widths = dict(zip(info.cond_names, info.cond_widths, strict=True))
    writer = ShowerWriter(out, info.geometry, info.particle, _generator_name(info, onnx_sampler), n, widths, attrs,
                          resume=resume)
    if resume:
        try:
            _check_resumed(writer, attrs, int(attrs["batch_size"]))
        except GenerationError:
            writer.close(complete=False)
            raise
    return writer


def _check_resumed(writer: ShowerWriter, attrs: Mapping[str, Any], batch_size: int) -> None:
    """Raise :class:`GenerationError` unless the resumed file was made by this very request, in whole batches."""
    stored = writer.attrs
    for key in ("run", "run_step", "seed", "batch_size", "energy_spec", "condition_specs", "threshold_mev",
                "sample_options", "backend", "refine"):
        have = stored.get(key, "none" if key == "refine" else None)  # files from before refinement: unrefined
        want = attrs[key] if isinstance(attrs[key], (str, int, float)) else json.dumps(attrs[key])
        if have is None or str(have) != str(want):
            raise GenerationError(f"resume=True: {writer.path} was generated with {key}={have}, not {want}; "
                                  "resume with the request that made it, or write a new file")
    if writer.n_written % batch_size:
        raise GenerationError(f"resume=True: {writer.path} holds {writer.n_written} showers, not whole batches of "
                              f"{batch_size}; write a new file")


def _energy_spec(energy: str | EnergySpec, info: RunInfo, extrapolate: bool) -> EnergySpec:
    """The parsed energy spec, checked against the run's training range unless ``extrapolate``."""
    espec = parse_energy(energy) if isinstance(energy, str) else energy
    if not extrapolate:
        lo, hi = training_energy_range_mev(info)
        try:
            espec.check_range(lo, hi, f"run {info.run_id!r}")
        except EnergySpecError:
            raise GenerationError(
                f"energy {espec.text} outside the training range {lo / 1e3:g}-{hi / 1e3:g} GeV of run "
                f"{info.run_id}; pass extrapolate=True to generate there anyway") from None
    return espec


def _generator_name(info: RunInfo, onnx_sampler: OnnxSampler | None) -> str:
    """The file's ``generator`` attribute: model, run, step, fastshower version and the ONNX backend if any."""
    name = f"{info.model_name} run {info.run_id} step {info.step} (fastshower {__version__})"
    if onnx_sampler is not None:  # onnx-fp32, onnx-int8 (dynamic) or onnx-int8-static
        name += f" [{onnx_sampler.backend.upper().replace('-', ' ', 1)}]"
    return name


def _fill(writer: ShowerWriter, run: Run, espec: EnergySpec, samplers: Mapping[str, ConditionSampler],
          onnx_sampler: OnnxSampler | None, n: int, batch_size: int, seed: int, threshold_mev: float,
          options: Mapping[str, Any], device: str, progress: bool, refiner: Refiner | None = None) -> None:
    """Generate and append batches until ``writer`` holds ``n`` showers.

    Batch k draws energies and conditions from a numpy generator and the model's noise from a torch
    generator, both seeded by (``seed``, k), and a refiner's acceptance from (``seed``, k, 1): the same call
    writes the same file, and a resumed file the file an uninterrupted call would have written.
    """
    from tqdm.auto import tqdm

    model, transform, info = run
    with tqdm(total=n, initial=writer.n_written, disable=not progress, desc="generate", unit="shower") as bar:
        while writer.n_written < n:
            k = writer.n_written // batch_size  # batch k draws from (seed, k) alone: a resumed file continues exactly
            rng = np.random.default_rng([seed, k])
            torch_seed = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
            gen = torch.Generator(device=device).manual_seed(torch_seed)
            m = min(batch_size, n - writer.n_written)
            e = espec.sample(rng, m)
            conds = {k: s(rng, m) for k, s in samplers.items()}

            def draw(e: np.ndarray, conds: Mapping[str, np.ndarray], gen: torch.Generator = gen) -> np.ndarray:
                if onnx_sampler is None:
                    return sample_batch(model, transform, e, conds, gen, threshold_mev, geometry=info.geometry,
                                        **options)
                return onnx_sampler(draw_noise(model, len(e), gen), e, conds)  # model.sample's noise, in order

            if refiner is None:
                showers = draw(e, conds)
            else:
                showers, counts = refiner.refine(draw, e, conds, np.random.default_rng([seed, k, 1]))
                writer.set_attrs({key: int(writer.attrs.get(key, 0)) + v for key, v in
                                  (("refine_draws", counts["draws"]), ("refine_unaccepted", counts["unaccepted"]))})
            writer.append(ShowerBatch(e, showers, conds))
            bar.update(m)


def _onnx_sampler(stack: contextlib.ExitStack, run: Run, onnx_path: str | Path | None, threshold_mev: float,
                  options: Mapping[str, Any], int8: bool) -> OnnxSampler:
    """An ONNX Runtime sampler of ``run``: the given file (checked against the request) or a fresh export."""
    if onnx_path is None:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fastshower-onnx-")))
        path = export_onnx(run, tmp / "sampler.onnx", int8=int8, threshold_mev=threshold_mev, **options)
        return load_onnx(path, run.info)
    sampler = load_onnx(onnx_path, run.info)
    meta = sampler.meta
    if float(meta.get("threshold_mev", "nan")) != threshold_mev:
        raise ExportError(f"{onnx_path}: exported with threshold {meta.get('threshold_mev')} MeV, "
                          f"generation asks for {threshold_mev!r} MeV; export again with that threshold")
    for key in ("steps", "method"):
        if key in options and str(options[key]) != meta.get(key):
            raise ExportError(f"{onnx_path}: exported with {key} {meta.get(key)}, generation asks for {options[key]}")
    return sampler
