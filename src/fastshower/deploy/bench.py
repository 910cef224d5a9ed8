"""Speed benchmarks of a run's sampler on this machine (:func:`bench`), per ONNX op profiles
(:func:`profile_onnx`) and the report's text table (:func:`format_table`).

Benchmarks (:func:`bench`)
--------------------------
ms per shower (median of repeats after a warm-up) for torch FP32, ONNX FP32 and ONNX INT8 per
batch size and thread count; with ``geant4=True`` the Geant4 time per shower of the same
geometry, particle and energy spectrum measured in the same process (start-up measured apart
and excluded), and the speed-ups.

INT8 change of quality (:func:`_int8_quality`)
-----------------------------------------------
With an INT8 backend timed and ``quality_showers`` > 0: the same showers (seed, energies, conditions, noise)
generated with ONNX FP32 and with each INT8 graph, each scored against a reference file (default: the run's
training file; its energy spec is generated) by :func:`fastshower.validate.evaluate.evaluate`; the table shows
the change of S(E_tot/E_inc), the largest change of any S and the AUCs' changes. The report's
``int8_quality``: {"reference", "n_showers", "energy_spec_gev", "seed", "scores": {backend: {"separation_power":
{observable: S}, "auc_low", "auc_low_error", "auc_high", "auc_high_error"}}, "change": {INT8 backend:
{"separation_power": {observable: dS}, "max_abs_separation_power", "max_abs_observable", "auc_low",
"auc_high"}}}; {"skipped": why} when the training file is gone; None when not asked for.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastshower._version import __version__
from fastshower.deploy.export import ExportError, OnnxSampler, export_onnx, load_onnx, ort_session
from fastshower.runs import Run, RunInfo, as_run
from fastshower.sampling import condition_samplers, noise_dim, sample_batch, sample_options
from fastshower.training import torch_threads

__all__ = ["BACKENDS", "INT8_ETOT_TOLERANCE", "OPTIONAL_BACKENDS", "QUALITY_METRICS", "bench", "cpu_model",
           "format_table", "profile_onnx"]

#: backends :func:`bench` measures by default
BACKENDS: tuple[str, ...] = ("torch-fp32", "onnx-fp32", "onnx-int8")
#: further backends :func:`bench` measures on request (static INT8 reads the run's training file)
OPTIONAL_BACKENDS: tuple[str, ...] = ("onnx-int8-static",)
#: the scores of the INT8 change of quality (:func:`fastshower.validate.evaluate.evaluate` metric names)
QUALITY_METRICS: tuple[str, ...] = ("separation_power", "classifier_low", "classifier_high")
#: the change of S(E_tot/E_inc) INT8 may make (the export issue's 0.01); the table flags a larger one
INT8_ETOT_TOLERANCE = 0.01


@dataclass(frozen=True)
class _Timing:
    """How each (backend, batch size) is timed: see :func:`_time_calls`."""

    repeats: int
    warmup: int
    budget_s: float
    say: Callable[[str], None]  # progress: what is being timed (stderr) or nothing


def bench(
    run: str | Path | Run,
    out: str | Path | None = None,
    batch_sizes: Sequence[int] = (1, 100, 10000),
    threads: int = 1,
    geant4: bool | Mapping[str, Any] = False,
    *,
    backends: Sequence[str] = BACKENDS,
    repeats: int = 5, warmup: int = 1, budget_s: float = 20.0,
    steps: int | None = None, method: str | None = None,
    n_geant4: int = 200, n_geant4_startup: int = 10, profile_batch: int | None = None,
    quality_showers: int = 2000, reference: str | Path | None = None,
    seed: int = 0, print_table: bool = True, progress: bool = False,
) -> dict[str, Any]:
    """Measure generation speed on this machine; returns (and writes to ``out`` as JSON) the results.

    Args:
        run, out: finished run folder (or a loaded run); JSON file to write (optional).
        batch_sizes: showers per call.
        threads: intra-op threads for torch and ONNX Runtime.
        geant4: also time Geant4 (jobs=1) on the run's geometry, particle and energy spectrum; or the
            ``"geant4"`` entry of an earlier report of this machine to reuse (marked ``"reused": true``).
        backends: from :data:`BACKENDS` and :data:`OPTIONAL_BACKENDS` (``onnx-int8-static`` calibrates on
            the run's training file, see :func:`fastshower.deploy.export_onnx`).
        repeats, warmup, budget_s: timed calls (median reported), untimed warm-up calls, and the time after
            which the repeats of one (backend, batch size) stop early (at least one timed call).
        steps, method: ODE steps and solver of flow-matching and layer-fm (default: the run's), the same for
            torch and ONNX.
        n_geant4, n_geant4_startup: Geant4 showers of the timed and of the start-up production (at most half).
        profile_batch: if given, also profile the ONNX FP32 (and INT8) graph per op type at this batch size.
        quality_showers: showers generated with ONNX FP32 and with each INT8 backend timed (same seed and
            noise) for the INT8 change of quality; 0: not measured (nor without an INT8 backend).
        reference: the shower file both are scored against (default: the run's training file); its
            ``energy_spec`` (else the training file's) sets the energies generated.
        seed: seeds inputs, noise and the quality's generation and scoring.
        print_table, progress: print a short table with a legend; say on stderr what is being timed.

    Returns:
        {"machine": {...}, "run": {...}, "results": [{"backend", "batch_size", "ms_per_shower", "ms_per_call",
        "repeats"}...], "geant4": {...} | None, "speedup_vs_geant4": {backend: {batch: x}}, "int8_vs_fp32":
        {batch: x} (dynamic INT8), "int8_static_vs_fp32": {batch: x}, "profile": {...}, "int8_quality": see
        the module docstring}.
    """
    sizes = _check_request(batch_sizes, threads, backends, n_geant4)
    loaded = as_run(run, require_finished=True)
    opts = sample_options(loaded.model, {"steps": steps, "method": method})
    quality_plan = _quality_plan(loaded.info, reference, quality_showers, backends)  # before minutes of timing
    timing = _Timing(repeats, warmup, budget_s, _say if progress else _quiet)
    with tempfile.TemporaryDirectory(prefix="fastshower-bench-") as tmp:
        results, profiles, files = _time_backends(loaded, backends, sizes, threads, timing, opts, seed,
                                                  profile_batch, Path(tmp))
        g4 = _geant4_entry(geant4, loaded.info, n_geant4, min(n_geant4_startup, n_geant4 // 2), seed, timing.say)
        quality = _int8_quality(loaded, files, opts, quality_plan, seed, Path(tmp), timing.say)
    report = {**_report(loaded, opts, threads, timing, results, g4, sizes, profiles), "int8_quality": quality}
    if print_table:
        print(format_table(report))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


# --- validating the request and timing each backend ---------------------------------------------------


def _check_request(batch_sizes: Sequence[int], threads: int, backends: Sequence[str], n_geant4: int) -> list[int]:
    """The batch sizes as ints; ExportError for a bad batch size, thread count, backend name or Geant4 count."""
    if n_geant4 < 2:  # start-up is timed on a smaller production and subtracted
        raise ExportError(f"Geant4 showers to time (n_geant4, --geant4-showers) must be >= 2, got {n_geant4}")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise ExportError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if threads < 1:
        raise ExportError(f"threads must be >= 1, got {threads}")
    unknown = set(backends) - set(BACKENDS) - set(OPTIONAL_BACKENDS)
    if unknown:
        raise ExportError(f"unknown backend(s) {sorted(unknown)}; choose from {[*BACKENDS, *OPTIONAL_BACKENDS]}")
    return sizes


def _time_backends(run: Run, backends: Sequence[str], sizes: Sequence[int], threads: int, timing: _Timing,
                   opts: Mapping[str, Any], seed: int, profile_batch: int | None, folder: Path
                   ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Path]]:
    """(one result per backend and batch size, per-op profiles of the ONNX backends when ``profile_batch``,
    the ONNX files exported into ``folder``): every backend runs on the same seeded inputs, with ``threads``
    threads."""
    rng = np.random.default_rng(seed)
    inputs = {b: _bench_inputs(run.info, b, rng) for b in sizes}
    results: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    with torch_threads(threads):
        files = _export_backends(run, backends, folder, opts, timing.say)
        for be in backends:
            sampler = load_onnx(files[be], run.info, threads) if be in files else None
            gen = torch.Generator().manual_seed(seed)
            for b in sizes:
                timing.say(f"timing {be} at batch {b}: {timing.warmup} warm-up + up to {timing.repeats} calls, "
                           f"at most ~{timing.budget_s:g} s")
                call = (_torch_call(run, inputs[b], gen, opts) if sampler is None
                        else _onnx_call(sampler, inputs[b], seed))
                sec, n = _time_calls(call, timing.repeats, timing.warmup, timing.budget_s)
                results.append({"backend": be, "batch_size": b, "ms_per_call": 1e3 * sec,
                                "ms_per_shower": 1e3 * sec / b, "repeats": n})
            if profile_batch and be in files:
                profiles[be] = profile_onnx(files[be], run.info, int(profile_batch), threads)
    return results, profiles, files


def _export_backends(run: Run, backends: Sequence[str], folder: Path, opts: Mapping[str, Any],
                     say: Callable[[str], None]) -> dict[str, Path]:
    """The ONNX file of each ONNX backend (FP32, dynamic or static INT8), exported into ``folder``."""
    files: dict[str, Path] = {}
    for be in backends:
        if be.startswith("onnx"):
            say(f"exporting the sampler for {be} (INT8 quantisation can take minutes)" if "int8" in be
                else f"exporting the sampler for {be}")
            int8 = be.startswith("onnx-int8")
            files[be] = export_onnx(run, folder / f"{be}.onnx", int8=int8,
                                    int8_mode=("static" if be.endswith("static") else "dynamic") if int8 else None,
                                    **opts)
    return files


def _torch_call(run: Run, inputs: tuple[np.ndarray, dict[str, np.ndarray]], gen: torch.Generator,
                opts: Mapping[str, Any]) -> Callable[[], None]:
    """One torch FP32 batch on ``inputs`` (noise from ``gen``), as :func:`fastshower.generation.generate` makes it."""
    model, transform, info = run
    e, conds = inputs

    def call() -> None:
        sample_batch(model, transform, e, conds, gen, info.threshold_mev, info.geometry, **opts)

    return call


def _onnx_call(sampler: OnnxSampler, inputs: tuple[np.ndarray, dict[str, np.ndarray]], seed: int
               ) -> Callable[[], None]:
    """One ONNX Runtime batch on ``inputs``, with fresh standard-normal noise per call (seeded)."""
    e, conds = inputs
    rng = np.random.default_rng(seed)

    def call() -> None:
        sampler(rng.standard_normal((len(e), sampler.noise_dim), dtype=np.float32), e, conds)

    return call


# --- timing helpers and inputs ------------------------------------------------------------------------


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _quiet(text: str) -> None:
    """No progress."""


def _time_calls(fn: Any, repeats: int, warmup: int, budget_s: float) -> tuple[float, int]:
    """(median seconds per call, calls timed): ``warmup`` untimed calls, then up to ``repeats`` timed ones,
    stopping early (after at least one) once ``budget_s`` is spent."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(times), len(times)


def _bench_inputs(info: RunInfo, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    e = _energy_sampler(info)(rng, batch)
    samplers, _ = condition_samplers(info, None)
    return e, {k: s(rng, batch) for k, s in samplers.items()}


def _energy_spec_text(info: RunInfo) -> str:
    """The training file's energy spec (GeV), or the run's energy range as a log-uniform spec."""
    from fastshower.io import ShowerFile

    path = info.training_file
    if path and Path(path).is_file():
        with contextlib.suppress(Exception), ShowerFile(path) as f:
            spec = f.attrs.get("energy_spec")
            if spec:
                return str(spec)
    lo, hi = info.energy_range_mev
    return f"{lo / 1e3!r}" if lo == hi else f"{lo / 1e3!r}:{hi / 1e3!r}:log"


def _energy_sampler(info: RunInfo) -> Any:
    from fastshower.energy import parse_energy

    spec = parse_energy(_energy_spec_text(info))
    return spec.sample


# --- Geant4 -----------------------------------------------------------------------------------------------


def _geant4_time(info: RunInfo, n: int, n_startup: int, seed: int) -> dict[str, Any]:
    """Geant4 seconds per shower for the run's geometry, particle and energy spectrum (jobs=1).

    Two productions into temp files: ``n_startup`` showers (start-up dominated) and ``n``; the time per
    shower is the difference of their wall times over the difference of counts, which removes the
    process start-up, geometry construction and physics-table building.
    """
    from fastshower.montecarlo.run import simulate

    spec = _energy_spec_text(info)
    with tempfile.TemporaryDirectory(prefix="fastshower-bench-g4-") as tmp:
        small = simulate(info.geometry, info.particle, spec, n_startup, Path(tmp) / "small.h5", seed=seed, jobs=1,
                         progress=False)
        big = simulate(info.geometry, info.particle, spec, n, Path(tmp) / "big.h5", seed=seed + 1, jobs=1,
                       progress=False)
    per = (big.seconds - small.seconds) / (big.n_new - small.n_new)
    if not per > 0:  # start-up noise larger than the extra showers' time: fall back to the plain average
        per = big.seconds / big.n_new
    return {
        "ms_per_shower": 1e3 * per,
        "startup_s": max(0.0, small.seconds - per * small.n_new),
        "n_showers": big.n_new,
        "n_startup_showers": small.n_new,
        "wall_s": [small.seconds, big.seconds],
        "energy_spec_gev": spec,
        "particle": info.particle,
        "jobs": 1,
        "generator": big.generator,
    }


def _geant4_entry(geant4: bool | Mapping[str, Any], info: RunInfo, n: int, n_startup: int, seed: int,
                  say: Callable[[str], None]) -> dict[str, Any] | None:
    """The report's ``geant4`` entry: an earlier one reused (marked), a new measurement, or None."""
    if isinstance(geant4, Mapping):
        return {**geant4, "reused": True}
    if not geant4:
        return None
    say(f"timing Geant4: {n_startup} then {n} {info.particle} showers in {info.geometry.name}, one job (the "
        "first production measures start-up; fewer showers: --geant4-showers / n_geant4)")
    return _geant4_time(info, n, n_startup, seed)


# --- the INT8 change of quality -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _QualityPlan:
    """The INT8 quality check asked for: ``n`` showers per sampler at the energies ``spec`` (GeV), scored
    against ``reference``; or ``skipped``, why it cannot run."""

    n: int = 0
    reference: Path | None = None
    spec: str = ""
    skipped: str | None = None


def _quality_plan(info: RunInfo, reference: str | Path | None, n: int, backends: Sequence[str]) -> _QualityPlan | None:
    """The quality check of a request, None when not asked for (``n`` 0 or no INT8 backend). ExportError for a
    bad ``n`` or a ``reference`` that is missing, of another detector or particle, or of energies outside the
    run's training range (all before any timing)."""
    from fastshower.io import ShowerFile

    if n < 0:
        raise ExportError(f"showers of the INT8 quality check (quality_showers, --quality-showers) must be >= 0 "
                          f"(0: no check), got {n}")
    if n == 0 or not any("int8" in be for be in backends):
        return None
    if reference is None:
        if not info.training_file or not Path(info.training_file).is_file():
            return _QualityPlan(skipped=f"the run's training file {info.training_file or '(not recorded)'} is not "
                                        "here; give a reference shower file (--reference)")
        reference = info.training_file
    path = Path(reference)
    try:
        with ShowerFile(path) as f:
            geometry, particle, spec = f.geometry.name, f.particle, f.attrs.get("energy_spec")
    except Exception as exc:  # a missing, unreadable or unfinished file: one line
        raise ExportError(f"reference of the INT8 quality check: {exc}") from None
    if geometry != info.geometry.name or particle not in (info.particle, "unknown"):
        raise ExportError(f"reference {path} holds {particle} showers in {geometry}; the run is {info.particle} in "
                          f"{info.geometry.name}")
    plan = _QualityPlan(n, path, str(spec) if spec else _energy_spec_text(info))
    _check_quality_energies(plan, info)
    return plan


def _check_quality_energies(plan: _QualityPlan, info: RunInfo) -> None:
    """ExportError when the reference's energies leave the run's training range (the check would extrapolate)."""
    from fastshower.energy import EnergySpecError, parse_energy
    from fastshower.runs import training_energy_range_mev

    lo, hi = training_energy_range_mev(info)
    try:
        parse_energy(plan.spec).check_range(lo, hi, f"run {info.run_id!r}")
    except EnergySpecError:
        raise ExportError(f"reference {plan.reference} was made at energies {plan.spec} GeV, outside the training "
                          f"range {lo / 1e3:g}-{hi / 1e3:g} GeV of run {info.run_id}; give a --reference inside it"
                          ) from None


def _int8_quality(run: Run, files: dict[str, Path], opts: Mapping[str, Any], plan: _QualityPlan | None, seed: int,
                  folder: Path, say: Callable[[str], None]) -> dict[str, Any] | None:
    """The report's ``int8_quality`` entry (see the module docstring): ``plan.n`` showers from ONNX FP32 and from
    each INT8 file of ``files``, of the same energies, conditions and noise, scored against ``plan.reference``."""
    from fastshower.validate.evaluate import evaluate

    if plan is None or plan.skipped or plan.reference is None:
        return None if plan is None else {"skipped": plan.skipped}
    int8 = [be for be in files if "int8" in be]
    if "onnx-fp32" not in files:
        say("exporting the sampler for onnx-fp32 (the INT8 quality check's baseline)")
        files = {**files, "onnx-fp32": export_onnx(run, folder / "onnx-fp32.onnx", **opts)}
    scores: dict[str, dict[str, Any]] = {}
    for be in ("onnx-fp32", *int8):
        say(f"INT8 quality: generating {plan.n} showers with {be} (energies {plan.spec} GeV), scoring them against "
            f"{plan.reference} (fewer: --quality-showers; none: 0)")
        gen = _quality_file(load_onnx(files[be], run.info), run.info, plan, seed, folder / f"quality-{be}.h5")
        m = evaluate(plan.reference, gen, folder / f"quality-{be}", metrics=QUALITY_METRICS, seed=seed,
                     progress=False, report=False)
        clf = m.get("classifier", {})
        scores[be] = {"separation_power": m.get("separation_power", {}),
                      **{f"auc_{side}{suffix}": clf.get(side, {}).get(f"auc{suffix}")
                         for side in ("low", "high") for suffix in ("", "_error")}}
    return {"reference": str(plan.reference), "n_showers": plan.n, "energy_spec_gev": plan.spec, "seed": seed,
            "scores": scores, "change": {be: _change(scores["onnx-fp32"], scores[be]) for be in int8}}


def _quality_file(sampler: OnnxSampler, info: RunInfo, plan: _QualityPlan, seed: int, path: Path) -> Path:
    """``plan.n`` showers of ``sampler`` in a new shower file ``path``: energies from ``plan.spec``, the run's
    conditions over their training range and standard-normal noise, all drawn from ``seed`` alone (so every
    sampler gets the same), in batches of 1000."""
    from fastshower.energy import parse_energy
    from fastshower.io import ShowerBatch, ShowerWriter

    rng = np.random.default_rng(seed)
    spec = parse_energy(plan.spec)
    samplers, _ = condition_samplers(info, None)
    widths = dict(zip(info.cond_names, info.cond_widths, strict=True))
    with ShowerWriter(path, info.geometry, info.particle, f"{info.model_name} run {info.run_id} [{sampler.backend}]",
                      plan.n, widths, {"seed": seed, "energy_spec": plan.spec}) as writer:
        for start in range(0, plan.n, 1000):
            m = min(1000, plan.n - start)
            e = spec.sample(rng, m)
            conds = {k: s(rng, m) for k, s in samplers.items()}
            z = rng.standard_normal((m, sampler.noise_dim), dtype=np.float32)
            writer.append(ShowerBatch(e, sampler(z, e, conds), conds))
    return path


def _change(fp32: Mapping[str, Any], int8: Mapping[str, Any]) -> dict[str, Any]:
    """INT8 - FP32 of every separation power and AUC (None where either is missing), and the largest |dS|."""
    def diff(a: Any, b: Any) -> float | None:
        return None if a is None or b is None else float(b) - float(a)

    sp = {k: diff(v, int8["separation_power"].get(k)) for k, v in fp32["separation_power"].items()}
    known = {k: v for k, v in sp.items() if v is not None}
    worst = max(known, key=lambda k: abs(known[k]), default=None)
    return {"separation_power": sp, "max_abs_separation_power": None if worst is None else abs(known[worst]),
            "max_abs_observable": worst, "auc_low": diff(fp32.get("auc_low"), int8.get("auc_low")),
            "auc_high": diff(fp32.get("auc_high"), int8.get("auc_high"))}


# --- the report -------------------------------------------------------------------------------------------


def _report(run: Run, opts: Mapping[str, Any], threads: int, timing: _Timing, results: list[dict[str, Any]],
            g4: dict[str, Any] | None, sizes: Sequence[int], profiles: dict[str, Any]) -> dict[str, Any]:
    """The :func:`bench` report (see its Returns)."""
    speedup, int8_vs_fp32, int8_static_vs_fp32 = _ratios(results, sizes, g4)
    return {
        "fastshower_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": _machine(threads),
        "run": _run_summary(run, opts),
        "timing": {"repeats": timing.repeats, "warmup": timing.warmup, "budget_s": timing.budget_s,
                   "statistic": "median"},
        "results": results,
        "geant4": g4,
        "speedup_vs_geant4": speedup,
        "int8_vs_fp32": int8_vs_fp32,
        "int8_static_vs_fp32": int8_static_vs_fp32,
        "profile": profiles,
    }


def _ratios(results: list[dict[str, Any]], sizes: Sequence[int], g4: dict[str, Any] | None
            ) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, float]]:
    """(speed-up over Geant4 per backend and batch size, ONNX FP32 time / dynamic INT8 time per batch size,
    the same for static INT8); batch sizes as strings."""
    table = {(r["backend"], r["batch_size"]): r["ms_per_shower"] for r in results}
    speedup: dict[str, dict[str, float]] = {}
    if g4:
        for (be, b), ms in table.items():
            speedup.setdefault(be, {})[str(b)] = g4["ms_per_shower"] / ms
    int8_vs_fp32, int8_static_vs_fp32 = ({str(b): table[("onnx-fp32", b)] / table[(be, b)]
                                          for b in sizes if ("onnx-fp32", b) in table and (be, b) in table}
                                         for be in ("onnx-int8", "onnx-int8-static"))
    return speedup, int8_vs_fp32, int8_static_vs_fp32


def _machine(threads: int) -> dict[str, Any]:
    """The report's ``machine`` entry."""
    return {
        "device": "cpu",
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch_version": torch.__version__,
        "onnxruntime_version": _ort_version(),
        "platform": platform.platform(),
    }


def cpu_model() -> str:
    """The CPU's model name (py-cpuinfo when installed, else /proc/cpuinfo, else platform)."""
    try:
        import cpuinfo

        name = cpuinfo.get_cpu_info().get("brand_raw")
        if name:
            return str(name)
    except Exception:  # optional dependency; any failure falls through to /proc/cpuinfo
        pass
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def _run_summary(run: Run, opts: Mapping[str, Any]) -> dict[str, Any]:
    """The report's ``run`` entry."""
    model, _, info = run
    return {
        "run_id": info.run_id,
        "path": str(info.run_dir.resolve()),
        "model": info.model_name,
        "step": info.step,
        "geometry": info.geometry.name,
        "n_voxels": info.spec.n_voxels,
        "particle": info.particle,
        "sample_options": opts,
        "noise_dim": noise_dim(model),
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }


# --- per-op profiles and the text table ---------------------------------------------------------------


def profile_onnx(path: str | Path, info: RunInfo, batch: int, threads: int = 1, runs: int = 3) -> dict[str, Any]:
    """Time per ONNX op type (ONNX Runtime's profiler) for ``runs`` calls at ``batch``.

    Returns {"batch", "ms_per_call", "by_op_type": {op: {"ms_per_call", "share", "count"}}} with ops sorted by time.
    """
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="fastshower-prof-") as tmp:
        sess = ort_session(path, threads, profile_prefix=str(Path(tmp) / "prof"))
        meta = dict(sess.get_modelmeta().custom_metadata_map)
        sampler = OnnxSampler(Path(path), meta, sess, tuple(json.loads(meta["condition_names"])),
                              int(meta["noise_dim"]))
        e, conds = _bench_inputs(info, batch, rng)
        z = rng.standard_normal((batch, sampler.noise_dim), dtype=np.float32)
        sampler(z, e, conds)  # warm-up (also profiled; dropped below by keeping the last `runs` model_run events)
        for _ in range(runs):
            sampler(z, e, conds)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, list[float]] = {}
    runs_us = [ev["dur"] for ev in trace if ev.get("name") == "model_run"]
    for ev in trace:
        if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            by_op.setdefault(op, []).append(float(ev["dur"]))
    calls = runs + 1
    total = sum(sum(v) for v in by_op.values()) or 1.0
    table = {
        op: {"ms_per_call": sum(v) / calls / 1e3, "share": sum(v) / total, "count": len(v) // calls}
        for op, v in sorted(by_op.items(), key=lambda kv: -sum(kv[1]))
    }
    return {"batch": batch, "threads": threads,
            "ms_per_call": statistics.median(runs_us[-runs:]) / 1e3 if runs_us else None, "by_op_type": table}


def format_table(report: Mapping[str, Any]) -> str:
    """A short text table of a :func:`bench` report: ms/shower per backend and batch size, speed-ups."""
    m, r = report["machine"], report["run"]
    sizes = sorted({x["batch_size"] for x in report["results"]})
    backends = list(dict.fromkeys(x["backend"] for x in report["results"]))
    ms = {(x["backend"], x["batch_size"]): x["ms_per_shower"] for x in report["results"]}
    lines = [f"{r['model']} run {r['run_id']} on {r['geometry']} {r['sample_options'] or ''} | "
             f"{m['cpu_model']}, {m['threads']} thread(s)",
             "ms/shower".ljust(17) + "".join(f"B={b:<12d}" for b in sizes)]
    for be in backends:
        lines.append(be.ljust(17) + "".join(f"{ms.get((be, b), float('nan')):<14.4g}" for b in sizes))
    g4 = report.get("geant4")
    if g4:
        lines.append(f"geant4           {g4['ms_per_shower']:.4g} ms/shower (start-up {g4['startup_s']:.2f} s "
                     f"excluded, {g4['n_showers']} showers, 1 job)")
        for be, row in report["speedup_vs_geant4"].items():
            lines.append(f"x G4 {be:<11} " + "".join(f"{row.get(str(b), float('nan')):<14.4g}" for b in sizes))
    for key, label in (("int8_vs_fp32", "onnx int8/fp32 x "), ("int8_static_vs_fp32", "int8 static/fp32 ")):
        if report.get(key):
            lines.append(label + "".join(f"{report[key].get(str(b), float('nan')):<14.4g}" for b in sizes))
    return "\n".join(lines + _quality_lines(report.get("int8_quality")) + _legend(report))


def _num(x: Any, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _quality_lines(q: Mapping[str, Any] | None) -> list[str]:
    """The table's INT8 change of quality: per INT8 backend dS(E_tot/E_inc) (flagged beyond
    :data:`INT8_ETOT_TOLERANCE`), the largest |dS| and the AUCs' changes with their combined errors."""
    if not q:
        return []
    if "skipped" in q:
        return [f"INT8 change of quality: not measured: {q['skipped']}"]
    fp = q["scores"]["onnx-fp32"]
    lines = [f"INT8 change of quality (INT8 - FP32; {q['n_showers']} showers each, same noise, vs "
             f"{Path(q['reference']).name}):",
             f"{'':17}{'dS(E_tot/E_inc)':<22}{'max |dS| (observable)':<30}{'dAUC low':<18}dAUC high"]
    for be, ch in q["change"].items():
        d = ch["separation_power"].get("E_tot/E_inc")
        flag = "" if d is None else (" ok" if abs(d) <= INT8_ETOT_TOLERANCE else f" > {INT8_ETOT_TOLERANCE:g}")
        worst = (f"{_num(ch['max_abs_separation_power'], '.4f')} ({ch['max_abs_observable']})"
                 if ch["max_abs_observable"] else "n/a")
        aucs = []
        for side in ("low", "high"):
            errs = [e for e in (fp.get(f"auc_{side}_error"), q["scores"][be].get(f"auc_{side}_error")) if e]
            err = f" +- {math.hypot(*errs):.3f}" if errs and ch[f"auc_{side}"] is not None else ""
            aucs.append(f"{_num(ch[f'auc_{side}'], '+.3f')}{err}")
        lines.append(f"{be:<17}{_num(d, '+.4f') + flag:<22}{worst:<30}{aucs[0]:<18}{aucs[1]}")
    lines.append(f"{'(FP32 itself)':<17}S(E_tot/E_inc) {_num(fp['separation_power'].get('E_tot/E_inc'), '.4f')}, "
                 f"AUC low {_num(fp.get('auc_low'), '.3f')}, high {_num(fp.get('auc_high'), '.3f')}")
    return lines


def _legend(report: Mapping[str, Any]) -> list[str]:
    """What the table's rows and columns mean (only those it has)."""
    lines = ["legend: B = showers per call; ms/shower = median time of a call / B, on this machine's threads"]
    if report.get("geant4"):
        lines.append("  x G4 BACKEND: Geant4 ms/shower / BACKEND ms/shower = how many times faster than Geant4")
    if report.get("int8_vs_fp32") or report.get("int8_static_vs_fp32"):
        lines.append("  onnx int8/fp32 x (int8 static/fp32): ONNX FP32 ms/shower / INT8 ms/shower; > 1: INT8 "
                     "faster")
    q = report.get("int8_quality")
    if q and "change" in q:
        lines += ["  dS, dAUC: separation power (0 = identical histograms, 1 = disjoint) and classifier AUC (0.5 = "
                  "indistinguishable)",
                  "    of the INT8 showers minus those of the FP32 showers, both against the reference; "
                  f"|dS(E_tot/E_inc)| <= {INT8_ETOT_TOLERANCE:g} is ok;",
                  "    +- : the two AUCs' errors combined; every observable's dS is in the JSON (int8_quality)"]
    return lines
