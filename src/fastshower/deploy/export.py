"""A run's sampler as an ONNX graph: :func:`export_onnx` writes it (FP32, or INT8 through
:mod:`fastshower.deploy.quantize`), :func:`load_onnx` opens it as an :class:`OnnxSampler`.

ONNX graph (:func:`export_onnx`)
--------------------------------
Inputs, float32, dynamic batch B:

- ``noise`` (B, D): standard-normal noise (:func:`fastshower.sampling.draw_noise`);
- ``incident_energy_mev`` (B, 1): incident energy, MeV;
- one input per extra condition of the run, named as the condition (e.g. ``position`` (B, 2), mm).

Output: ``showers_mev`` (B, V), voxel energies in MeV, the run's preprocessing inverted and
:func:`fastshower.sampling.postprocess` applied (NaN -> 0, clamp to [0, E_inc], readout threshold).

``metadata_props`` (all strings): ``fastshower_version``, ``run_id``, ``run_step``, ``model``,
``geometry``, ``particle``, ``condition_names`` / ``condition_widths`` (JSON), ``noise_dim``,
``n_voxels``, ``steps``, ``method``, ``threshold_mev``, ``energy_range_mev`` (JSON), ``precision``
(``fp32`` / ``int8``), ``opset``; INT8 files add ``int8_mode`` (``dynamic`` / ``static``) and static
ones ``calibration`` (JSON: method, showers, training file, seed, quantised op types).
:func:`load_onnx` checks them against this fastshower and, given a run, against the run, and raises
:class:`ExportError` on a mismatch.

INT8 (:data:`INT8_MODES`): the FP32 graph is rewritten Gemm-free and quantised, dynamically or
statically with calibrated activation ranges; :mod:`fastshower.deploy.quantize` documents the modes
and their measured speed and accuracy.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastshower._version import __version__
from fastshower.deploy.par04 import (
    N_PAR04_CONDITIONS,
    PAR04_MAX_ANGLE_DEG,
    PAR04_MAX_ENERGY_MEV,
    Par04Module,
    check_par04_run,
    par04_input,
    par04_mesh,
)
from fastshower.deploy.quantize import (
    CALIBRATION_METHODS,
    INT8_MODES,
    ExportError,
    calibration_feeds,
    calibration_inputs,
    check_int8_options,
    int8_metadata,
    quantize_graph,
)
from fastshower.models.base import ShowerModel
from fastshower.runs import Run, RunInfo, as_run
from fastshower.sampling import SamplerModule, noise_dim

__all__ = [
    "CALIBRATION_METHODS",
    "INT8_MODES",
    "LAYOUTS",
    "ExportError",
    "OnnxSampler",
    "calibration_inputs",
    "check_metadata",
    "export_onnx",
    "load_onnx",
]

_RESERVED_INPUTS = ("noise", "incident_energy_mev")
#: graph contracts of :func:`export_onnx`: fastshower's own, or Geant4 Par04's (:mod:`fastshower.deploy.par04`)
LAYOUTS: tuple[str, ...] = ("fastshower", "par04")


# --- export ---------------------------------------------------------------------------------------------


def export_onnx(
    run: str | Path | Run,
    out: str | Path,
    *,
    int8: bool = False,
    int8_mode: str | None = None,
    calibration: int = 256,
    calibration_method: str = "minmax",
    opset: int = 17,
    threshold_mev: float | None = None,
    steps: int | None = None,
    method: str | None = None,
    check: bool = True,
    overwrite: bool = False,
    layout: str = "fastshower",
) -> Path:
    """Export a run's sampler to an ONNX file; returns its path.

    Args:
        run: finished run folder (or a loaded :class:`fastshower.runs.Run`).
        out: the .onnx file to write (parents created; an existing file only with ``overwrite``, atomically).
        int8: INT8 quantisation (see :mod:`fastshower.deploy.quantize`).
        int8_mode: with ``int8``: ``"dynamic"`` (default; weights int8 per channel, activations uint8 per
            call) or ``"static"`` (QDQ, weights int8 per channel, activation ranges calibrated on the run's
            training file).
        calibration: static INT8: showers of the training file (and noise draws) to calibrate on.
        calibration_method: static INT8: ``"minmax"`` (default) or ``"percentile"`` (99.999 %).
        opset: ONNX opset (>= 14).
        threshold_mev: readout threshold baked into the graph, MeV (default: the run's).
        steps, method: ODE steps and solver (flow-matching, layer-fm), fixed in the graph (default: the run's).
        check: run the FP32 graph once with ONNX Runtime and compare with torch (ExportError if they differ).
        overwrite: replace an existing ``out``.
        layout: ``"fastshower"`` (above) or ``"par04"`` (FP32, par04-ds2/ds3: :mod:`fastshower.deploy.par04`).

    Raises:
        ExportError: an existing ``out`` without ``overwrite``, a model that does not export, an FP32 graph
            that disagrees with torch, bad INT8 options, or (static INT8) an unreadable training file.
        RunError: a missing, incomplete or unfinished run folder.
        GenerationError: bad ``steps`` / ``method``.
    """
    mode = _check_request(opset, int8, int8_mode, calibration, calibration_method, layout)
    if Path(out).exists() and not overwrite:
        raise ExportError(f"{out} exists; pass overwrite=True to replace it, or choose another out")
    plan = _plan(run, threshold_mev, steps, method, layout)
    feeds = calibration_feeds(plan.model, plan.info, calibration) if mode == "static" else []  # first: fails fast
    names, example = _graph_inputs(plan)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fastshower-export-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        proto, meta, docs = _export_fp32(plan, names, example, fp32, opset)
        if check:
            _verify(plan, fp32, example)
        if not int8:
            _write_atomically(out, lambda p: p.write_bytes(fp32.read_bytes()))
            return out
        qproto = quantize_graph(proto, Path(tmp), mode, feeds, calibration_method)
        _annotate(qproto, {**meta, **int8_metadata(plan.info, mode, feeds, calibration_method)}, docs)
        _write_atomically(out, lambda p: _save(qproto, p))
    return out


@dataclass
class _ExportPlan:
    """What an export traces: the sampler module of a loaded run, the run's facts and the noise width D."""

    model: ShowerModel
    module: SamplerModule
    info: RunInfo
    noise_dim: int
    #: what is traced: ``module``, or for layout par04 the :class:`Par04Module` around it
    graph: torch.nn.Module
    layout: str = "fastshower"


def _check_request(opset: int, int8: bool, int8_mode: str | None, calibration: int,
                   calibration_method: str, layout: str) -> str:
    """The INT8 mode of an export (``"none"`` for FP32); ExportError for options that do not fit."""
    if opset < 14:
        raise ExportError(f"opset must be >= 14, got {opset}")
    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout {layout!r}; choose {' or '.join(LAYOUTS)}")
    if layout == "par04" and int8:
        raise ExportError("--layout par04 writes FP32 only; export without --int8")
    return check_int8_options(int8, int8_mode, calibration, calibration_method)


def _plan(run: str | Path | Run, threshold_mev: float | None, steps: int | None, method: str | None,
          layout: str = "fastshower") -> _ExportPlan:
    """The finished run (RunError otherwise) and its sampler module with the sampling options fixed;
    ExportError for a run the ``layout`` does not take."""
    loaded = as_run(run, require_finished=True)
    if layout == "par04":  # before building anything: a refusal is one line and quick
        check_par04_run(loaded.info)
    module = SamplerModule(loaded, threshold_mev, steps=steps, method=method).eval()
    d = noise_dim(loaded.model)
    graph = Par04Module(module, loaded.info, d).eval() if layout == "par04" else module
    return _ExportPlan(loaded.model, module, loaded.info, d, graph, layout)


def _graph_inputs(plan: _ExportPlan) -> tuple[list[str], tuple[Tensor, ...]]:
    """The graph's input names and example inputs (batch 2; layout par04: its one input, batch 1)."""
    info = plan.info
    if plan.layout == "par04":
        e = 0.5 * sum(info.energy_range_mev) if math.isfinite(info.energy_range_mev[1]) else 1000.0
        return ["input"], (torch.as_tensor(par04_input(torch.randn(plan.noise_dim).numpy(), e)),)
    names = ["noise", "incident_energy_mev", *info.cond_names]
    clash = set(info.cond_names) & set(_RESERVED_INPUTS)
    if clash:
        raise ExportError(f"run {info.run_id}: condition name(s) {sorted(clash)} clash with the graph's own inputs")
    return names, _example_inputs(info, plan.noise_dim)


def _export_fp32(plan: _ExportPlan, names: Sequence[str], example: tuple[Tensor, ...], path: Path,
                 opset: int) -> tuple[Any, dict[str, str], dict[str, str]]:
    """Trace the sampler into the FP32 graph ``path``, annotated; returns (its proto, metadata, input docs)."""
    import onnx

    info = plan.info
    output = _output_name(plan.layout)
    # Par04 runs one particle per call and feeds dims {1, D + 4}: its graph keeps the fixed batch of 1
    axes = {n: {0: "batch"} for n in [*names, output]} if plan.layout == "fastshower" else None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                plan.graph, example, str(path), dynamo=False, opset_version=opset, input_names=list(names),
                output_names=[output], dynamic_axes=axes,
            )
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"model {info.model_name!r} of run {info.run_id} does not export to ONNX: "
                          f"{msg[:300]}") from None
    proto = onnx.load(str(path))
    meta = _metadata(info, plan.module, plan.noise_dim, "fp32", opset)
    docs = _input_docs(info, plan.noise_dim)
    if plan.layout == "par04":
        meta, docs = _par04_metadata(info, meta, plan.noise_dim)
    _annotate(proto, meta, docs)
    onnx.save(proto, str(path))
    return proto, meta, docs


def _verify(plan: _ExportPlan, path: Path, example: tuple[Tensor, ...]) -> None:
    """ExportError unless the FP32 graph ``path`` reproduces torch on ``example``."""
    try:
        _check_against_torch(plan.graph, path, example, _output_name(plan.layout))
    except ExportError as exc:
        raise ExportError(f"model {plan.info.model_name!r} of run {plan.info.run_id} does not export to ONNX "
                          f"faithfully: {exc}") from None


def _save(proto: Any, path: Path) -> None:
    import onnx

    onnx.save(proto, str(path))


def _write_atomically(out: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file next to ``out``, then rename it to ``out`` (readers never see half a file)."""
    tmp_out = out.with_name(out.name + ".tmp")
    write(tmp_out)
    os.replace(tmp_out, out)


def _output_name(layout: str) -> str:
    """The graph output of a layout: showers in MeV, or Par04's cell energies over the incident energy."""
    return "cell_energy_over_e" if layout == "par04" else "showers_mev"


def _check_against_torch(module: torch.nn.Module, path: Path, example: tuple[Tensor, ...],
                         output: str = "showers_mev") -> None:
    sess = ort_session(path, threads=1)
    names = [i.name for i in sess.get_inputs()]
    got = sess.run([output], {n: t.numpy() for n, t in zip(names, example, strict=True)})[0]
    with torch.no_grad():
        want = module(*example).numpy()
    if not graphs_agree(got, want):
        raise ExportError(f"the exported graph disagrees with torch (max |diff| {np.abs(got - want).max():.3g} MeV)")


def graphs_agree(got: np.ndarray, want: np.ndarray, max_flips: float = 1e-3) -> bool:
    """Whether showers ``got`` (B, V) MeV from an exported graph reproduce ``want`` (B, V) from torch: equal to
    1e-3 relative (1e-4 of the largest cell absolute), except that a fraction ``max_flips`` of the cells may be
    zero on one side only. Why: a cell whose value sits at a readout threshold or zero-share cut lands on either
    side of it in float32 depending on the order of operations (a par04-ds2 export failed on one 0.045 MeV cell,
    the readout threshold, next to 400 MeV ones)."""
    scale = max(float(np.abs(want).max()), 1.0)
    off = ~np.isclose(got, want, rtol=1e-3, atol=1e-4 * scale)
    flips = off & ((got == 0) | (want == 0))
    return not (off & ~flips).any() and float(flips.mean()) <= max_flips


# --- the graph's example inputs, metadata and docs ------------------------------------------------


def _example_inputs(info: RunInfo, d: int, batch: int = 2) -> tuple[Tensor, ...]:
    lo, hi = info.energy_range_mev
    e = torch.full((batch, 1), 0.5 * (lo + hi) if math.isfinite(hi) else 1000.0)
    conds = []
    for name, width in zip(info.cond_names, info.cond_widths, strict=True):
        if name in info.cond_ranges:
            a, b = info.cond_ranges[name]
            conds.append(0.5 * (torch.tensor(a, dtype=torch.float32) + torch.tensor(b, dtype=torch.float32))
                         .reshape(1, width).repeat(batch, 1))
        else:
            conds.append(torch.zeros(batch, width))
    return (torch.randn(batch, d, generator=torch.Generator().manual_seed(0)), e, *conds)


def _metadata(info: RunInfo, module: SamplerModule, d: int, precision: str, opset: int) -> dict[str, str]:
    return {
        "fastshower_version": __version__,
        "run_id": info.run_id,
        "run_path": str(info.run_dir.resolve()),
        "run_step": str(info.step),
        "model": info.model_name,
        "geometry": info.geometry.name,
        "particle": info.particle,
        "condition_names": json.dumps(list(info.cond_names)),
        "condition_widths": json.dumps(list(info.cond_widths)),
        "noise_dim": str(d),
        "n_voxels": str(info.spec.n_voxels),
        "steps": str(module.options.get("steps", 1)),
        "method": str(module.options.get("method", "single-pass")),
        "threshold_mev": repr(module.threshold_mev),
        "energy_range_mev": json.dumps(list(info.energy_range_mev)),
        "precision": precision,
        "opset": str(opset),
    }


def _input_docs(info: RunInfo, d: int) -> dict[str, str]:
    docs = {
        "noise": f"(B, {d}) float32 standard-normal noise, one row per shower (fastshower.sampling.draw_noise)",
        "incident_energy_mev": "(B, 1) float32 incident energy, MeV",
    }
    for name, width in zip(info.cond_names, info.cond_widths, strict=True):
        docs[name] = f"(B, {width}) float32 condition {name!r} in the training file's units"
    return docs


def _par04_metadata(info: RunInfo, meta: Mapping[str, str], d: int) -> tuple[dict[str, str], dict[str, str]]:
    """Metadata and docs of a Par04-layout graph: ``layout``, the normalisations and the mesh that
    Par04's macro must set (``par04_mesh``: n_r, n_phi, n_z, dr_mm, dz_mm, latent and condition sizes)."""
    n_r, n_phi, n_z = par04_mesh(info.geometry)
    seg = info.geometry.layers[0].segmentation
    dr = float(seg.r_edges[1] - seg.r_edges[0]) if hasattr(seg, "r_edges") else 0.0
    layer = info.geometry.layers[0]
    dz = layer.n_pairs * (layer.absorber_thickness + layer.active_thickness)
    mesh = {"n_r": n_r, "n_phi": n_phi, "n_z": n_z, "dr_mm": dr, "dz_mm": dz, "latent": d,
            "conditions": N_PAR04_CONDITIONS}
    out = {**meta, "layout": "par04", "par04_max_energy_mev": repr(PAR04_MAX_ENERGY_MEV),
           "par04_max_angle_deg": repr(PAR04_MAX_ANGLE_DEG), "par04_mesh": json.dumps(mesh)}
    docs = {"input": f"(1, {d + N_PAR04_CONDITIONS}) float32: {d} standard-normal numbers, E / "
                     f"{PAR04_MAX_ENERGY_MEV:g} MeV, theta / {PAR04_MAX_ANGLE_DEG:g} deg (90 = normal incidence), "
                     "geometry one-hot (2, not used)",
            "cell_energy_over_e": f"(1, {info.spec.n_voxels}) float32 cell energies / E in Par04's mesh order "
                                  "(r slowest, phi, z fastest)"}
    return out, docs


def _annotate(model: Any, meta: Mapping[str, str], docs: Mapping[str, str]) -> None:
    from onnx import helper

    del model.metadata_props[:]
    helper.set_model_props(model, dict(meta))
    for vi in model.graph.input:
        vi.doc_string = docs.get(vi.name, vi.doc_string)
    for vi in model.graph.output:
        vi.doc_string = docs.get(vi.name, vi.doc_string)
        if vi.name == "showers_mev":
            vi.doc_string = (f"(B, {meta['n_voxels']}) float32 voxel energies, MeV (geometry {meta['geometry']}, "
                             f"threshold {meta['threshold_mev']} MeV applied)")
    precision = meta["precision"] + (f" ({meta['int8_mode']})" if "int8_mode" in meta else "")
    model.doc_string = (f"fastshower {meta['fastshower_version']} sampler: model {meta['model']} of run "
                        f"{meta['run_id']} (step {meta['run_step']}), {precision}, "
                        f"steps {meta['steps']}; " + ("Par04 layout: input (1, D + 4) -> cell_energy_over_e"
                                                      if meta.get("layout") == "par04"
                                                      else "noise + conditions -> showers_mev"))
    model.producer_name = "fastshower"
    model.producer_version = __version__


# --- loading and running an exported file ------------------------------------------------------------


def ort_session(path: str | Path, threads: int = 1, profile_prefix: str | None = None) -> Any:
    """An ONNX Runtime CPU session of ``path`` (``threads`` intra-op threads, sequential, all graph
    optimisations; profiling into ``profile_prefix`` when given); ExportError if it does not load."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path}: not a loadable ONNX model ({msg[:200]})") from None


def check_metadata(meta: Mapping[str, str], info: RunInfo | None = None, path: str | Path = "model") -> None:
    """ExportError unless ``meta`` (an exported file's metadata_props) fits this fastshower and the run ``info``."""
    if "fastshower_version" not in meta or "run_id" not in meta:
        raise ExportError(f"{path}: not a fastshower export (no fastshower metadata)")
    if meta["fastshower_version"] != __version__:
        raise ExportError(f"{path}: exported by fastshower {meta['fastshower_version']}, this is {__version__}; "
                          "export it again")
    precision = meta.get("precision", "fp32")
    if precision not in ("fp32", "int8"):
        raise ExportError(f"{path}: unknown precision {precision!r} (this fastshower writes fp32 or int8)")
    # an INT8 file without int8_mode is a dynamic one (the only INT8 mode before static calibration)
    if precision == "int8" and meta.get("int8_mode", "dynamic") not in INT8_MODES:
        raise ExportError(f"{path}: unknown INT8 mode {meta['int8_mode']!r} (this fastshower writes "
                          f"{' or '.join(INT8_MODES)})")
    if info is None:
        return
    want = {
        "run_id": info.run_id,
        "run_step": str(info.step),
        "model": info.model_name,
        "geometry": info.geometry.name,
        "condition_names": json.dumps(list(info.cond_names)),
    }
    for key, value in want.items():
        if meta.get(key) != value:
            raise ExportError(f"{path}: exported from a different run ({key} {meta.get(key)!r}, run {info.run_id} "
                              f"has {value!r}); export this run again")


@dataclass
class OnnxSampler:
    """An exported sampler, checked and ready to run.

    Attributes:
        path: the .onnx file.
        meta: its metadata_props.
        session: the ONNX Runtime session.
        cond_names: extra condition inputs in order.
        noise_dim: D of the ``noise`` input.
    """

    path: Path
    meta: dict[str, str]
    session: Any
    cond_names: tuple[str, ...]
    noise_dim: int

    @property
    def backend(self) -> str:
        """``onnx-fp32``, ``onnx-int8`` (dynamic INT8) or ``onnx-int8-static``, as :func:`bench` names them."""
        precision = self.meta.get("precision", "fp32")
        static = precision == "int8" and self.meta.get("int8_mode") == "static"
        return f"onnx-{precision}" + ("-static" if static else "")

    def __call__(self, noise: np.ndarray | Tensor, energies_mev: np.ndarray | Sequence[float],
                 conditions: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Showers (B, V) float32 MeV from noise (B, D), energies (B,) MeV and conditions {name: (B, k)}."""
        z = noise.detach().cpu().numpy() if isinstance(noise, Tensor) else np.asarray(noise)
        z = np.ascontiguousarray(z, dtype=np.float32)
        e = np.asarray(energies_mev, dtype=np.float32).reshape(-1, 1)
        if z.ndim != 2 or z.shape != (e.shape[0], self.noise_dim):
            raise ExportError(f"noise must be ({e.shape[0]}, {self.noise_dim}), got {tuple(z.shape)}")
        if e.shape[0] < 1:
            raise ExportError("batch size must be >= 1, got 0")
        conditions = dict(conditions or {})
        missing = [k for k in self.cond_names if k not in conditions]
        if missing or set(conditions) - set(self.cond_names):
            raise ExportError(f"conditions {sorted(conditions)} given; the model takes {list(self.cond_names)}")
        feed = {"noise": z, "incident_energy_mev": e}
        for k in self.cond_names:
            feed[k] = np.ascontiguousarray(np.asarray(conditions[k], dtype=np.float32).reshape(e.shape[0], -1))
        return self.session.run(["showers_mev"], feed)[0]


def load_onnx(path: str | Path, run: str | Path | Run | RunInfo | None = None, threads: int = 1) -> OnnxSampler:
    """Open an exported sampler; checks its metadata against this fastshower and (given) the run.

    Raises:
        ExportError: missing/unreadable file, not a fastshower export, another version or another run.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    if threads < 1:
        raise ExportError(f"threads must be >= 1, got {threads}")
    sess = ort_session(path, threads)
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    info: RunInfo | None
    if run is None or isinstance(run, RunInfo):
        info = run
    elif isinstance(run, (str, Path)):
        info = as_run(run, require_finished=True)[2]
    else:
        info = run[2]
    check_metadata(meta, info, path)
    if meta.get("layout", "fastshower") != "fastshower":
        raise ExportError(f"{path}: a {meta['layout']}-layout export (one input, batch 1), not a fastshower "
                          "sampler; run it with onnxruntime as docs/integration.md shows")
    return OnnxSampler(path, meta, sess, tuple(json.loads(meta["condition_names"])), int(meta["noise_dim"]))
