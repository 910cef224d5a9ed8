"""Deployment: a run's sampler as a pure function of noise, ONNX export (FP32 / INT8) and speed benchmarks.

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

ONNX graph (:func:`export_onnx`)
--------------------------------
Inputs, float32, dynamic batch B:

- ``noise`` (B, D): standard-normal noise (:func:`draw_noise`);
- ``incident_energy_mev`` (B, 1): incident energy, MeV;
- one input per extra condition of the run, named as the condition (e.g. ``position`` (B, 2), mm).

Output: ``showers_mev`` (B, V), voxel energies in MeV, the run's preprocessing inverted and
:func:`fastshower.sample.postprocess` applied (NaN -> 0, clamp to [0, E_inc], readout threshold).

``metadata_props`` (all strings): ``fastshower_version``, ``run_id``, ``run_step``, ``model``,
``geometry``, ``particle``, ``condition_names`` / ``condition_widths`` (JSON), ``noise_dim``,
``n_voxels``, ``steps``, ``method``, ``threshold_mev``, ``energy_range_mev`` (JSON), ``precision``
(``fp32`` / ``int8``), ``opset``; INT8 files add ``int8_mode`` (``dynamic`` / ``static``) and static
ones ``calibration`` (JSON: method, showers, training file, seed, quantised op types).
:func:`load_onnx` checks them against this fastshower and, given a run, against the run, and raises
:class:`ExportError` on a mismatch.

INT8 (:data:`INT8_MODES`). Linear layers are exported as ``Gemm``, which ONNX Runtime's quantisers
skip, so the exporter first rewrites every ``Gemm`` with constant weights into ``MatMul`` + ``Add``.

- ``dynamic`` (default): ONNX Runtime's dynamic quantisation, weights int8 per channel, activations
  uint8 with a range computed per call.
- ``static``: ``quantize_static`` in QDQ format, weights int8 per output channel, activations int8 with
  ranges calibrated once (MinMax by default) on the run's own inputs: noise from the model's
  ``draw_noise`` and incident energies and conditions of showers of the run's training file
  (:func:`calibration_inputs`). Only ``MatMul`` is quantised: quantising every op (ONNX Runtime's
  default) puts an int8 range on the preprocessing inverse and post-processing too, where 8 bits over
  [0, E_inc] zero most low-energy voxels (measured on toy runs: occupancy 0.68 -> 0.02 and mean
  E_tot -66 % for flow-matching), while MatMul-only keeps the mean E_tot within 0.1 %. MinMax and
  Percentile (99.999 / 99.99) calibration agreed within 0.1 % in mean E_tot and its 1 % / 99 %
  quantiles on those runs; MinMax is the default because it clips no value seen in calibration
  (the rare, high-energy showers stay in range) and needs no histograms. Static is not faster than
  dynamic on x86 CPUs for these MLPs: ONNX Runtime runs the Q/DQ nodes as separate kernels and keeps
  the bias adds (and MatMuls whose output is not requantised) in FP32. Measured for a flow-matching
  net of width 512 on 32 voxels, one thread: at batch 1000 dynamic 2.9-3.2x and static 2.3-2.5x the
  FP32 speed; at batch 1 dynamic 1.8-2.5x, static 0.7x. What static buys is fixed scales: dynamic
  INT8 quantises each call's activations with that batch's own range, so a shower depends on the
  other showers of its batch (same net: E_tot up to 0.7 % apart for the same noise in a batch of 7
  and of 300), while a static graph gives every shower the same output in any batch (as FP32 does),
  and QDQ is the format integer accelerators take.

Benchmarks (:func:`bench`)
--------------------------
ms per shower (median of repeats after a warm-up) for torch FP32, ONNX FP32 and ONNX INT8 per
batch size and thread count; with ``geant4=True`` the Geant4 time per shower of the same
geometry, particle and energy spectrum measured in the same process (start-up measured apart
and excluded), and the speed-ups.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastshower import __version__
from fastshower.sample import GenerationError, Run, RunInfo, load_run, postprocess, sample_batch, zero_below_ground

__all__ = [
    "BACKENDS",
    "CALIBRATION_METHODS",
    "INT8_MODES",
    "OPTIONAL_BACKENDS",
    "ExportError",
    "OnnxSampler",
    "SamplerModule",
    "bench",
    "calibration_inputs",
    "check_metadata",
    "cpu_model",
    "draw_noise",
    "export_onnx",
    "load_onnx",
    "noise_dim",
    "profile_onnx",
    "sample_from_noise",
]

#: backends :func:`bench` measures by default
BACKENDS: tuple[str, ...] = ("torch-fp32", "onnx-fp32", "onnx-int8")
#: further backends :func:`bench` measures on request (static INT8 reads the run's training file)
OPTIONAL_BACKENDS: tuple[str, ...] = ("onnx-int8-static",)
#: INT8 quantisation modes of :func:`export_onnx`
INT8_MODES: tuple[str, ...] = ("dynamic", "static")
#: activation calibration methods of static INT8
CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "percentile")
#: percentile of |activation| kept by the ``percentile`` calibration (ONNX Runtime's default)
_CALIBRATION_PERCENTILE = 99.999
#: op types static INT8 quantises; everything else (the preprocessing inverse, post-processing) stays fp32
_STATIC_OP_TYPES: tuple[str, ...] = ("MatMul",)
#: showers per calibration batch fed to ONNX Runtime
_CALIBRATION_BATCH = 64
#: seed of the calibration rows and noise (a static INT8 export is reproducible)
_CALIBRATION_SEED = 0

_RESERVED_INPUTS = ("noise", "incident_energy_mev")


class ExportError(ValueError):
    """A run that cannot be exported, an ONNX file that does not fit, or a bad benchmark request."""


# --- sampling as a pure function of (noise, conditions) ---------------------------------------------


def _sample_options(model: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """Resolved sampling options: ``steps``/``method`` for flow-matching, none for the others."""
    name = getattr(model, "name", type(model).__name__)
    opts = {k: v for k, v in options.items() if v is not None}
    if name == "flow-matching":
        steps = int(opts.pop("steps", model.hparams["steps"]))
        method = str(opts.pop("method", model.hparams["method"]))
        if steps < 1:
            raise ExportError(f"steps must be >= 1, got {steps}")
        if method not in ("euler", "midpoint", "heun"):
            raise ExportError(f"unknown ODE method {method!r}; choose euler, midpoint or heun")
        resolved: dict[str, Any] = {"steps": steps, "method": method}
    else:
        resolved = {}
    if opts:
        raise ExportError(f"model {name!r} takes no sampling option(s) {sorted(opts)}")
    return resolved


def noise_dim(model: Any) -> int:
    """D: standard-normal numbers per shower that :func:`sample_from_noise` consumes (the model's protocol)."""
    try:
        return int(model.noise_dim())
    except NotImplementedError as exc:
        raise ExportError(str(exc)) from None


def draw_noise(model: Any, batch: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Tensor:
    """Standard-normal noise (batch, D), drawn in the order the model's ``sample`` draws it.

    With a generator in the same state, ``sample_from_noise(model, draw_noise(...), c)`` reproduces
    ``model.sample(c, generator)`` (same numbers, same order).
    """
    if batch < 1:
        raise ExportError(f"batch size must be >= 1, got {batch}")
    noise_dim(model)  # a clear ExportError for models without the noise protocol
    return model.draw_noise(batch, generator, dtype, device)


def sample_from_noise(model: Any, z: Tensor, c: Tensor, **options: Any) -> Tensor:
    """Model-space showers (B, V) from noise z (B, D) and model-space conditions c (B, C); traceable.

    Options: ``steps``, ``method`` for flow-matching (default: the run's hparams).
    """
    try:
        return model.sample_from_noise(z, c, **_sample_options(model, options))
    except NotImplementedError as exc:
        raise ExportError(str(exc)) from None


class SamplerModule(nn.Module):
    """The whole generator as one module: (noise, energy, conditions) -> showers in MeV.

    ``forward(noise (B, D), incident_energy_mev (B, 1), *conditions)`` with one (B, k) tensor per
    extra condition of the run in ``info.cond_names`` order (raw units, e.g. mm) returns
    ``showers_mev`` (B, V): model sampling, the run's inverse preprocessing and
    :func:`fastshower.sample.postprocess` with the readout threshold.
    """

    def __init__(self, run: Run, threshold_mev: float | None = None, **options: Any) -> None:
        super().__init__()
        model, transform, info = run
        self.model = model.eval()
        self.transform = transform
        self.cond_names = tuple(info.cond_names)
        self.threshold_mev = float(info.threshold_mev if threshold_mev is None else threshold_mev)
        self.options = _sample_options(model, options)
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


# --- export ---------------------------------------------------------------------------------------------


def _load(run: str | Path | Run) -> Run:
    """(model, transform, info) of a run folder or tuple; ExportError for an incomplete or unfinished run."""
    if not isinstance(run, (str, Path)):
        return run
    path = Path(run)
    if not path.is_dir():
        raise ExportError(f"{path}: no such run folder")
    try:
        loaded = load_run(path)
    except GenerationError as exc:
        raise ExportError(f"cannot export {path}: {str(exc).splitlines()[0]}") from None
    status = loaded[2].meta.get("status")
    if status != "finished":
        raise ExportError(f"{path}: training is not finished (status {status!r}); export a finished run")
    return loaded


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
    return (torch.randn(batch, d), e, *conds)


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
        "noise": f"(B, {d}) float32 standard-normal noise, one row per shower (fastshower.export.draw_noise)",
        "incident_energy_mev": "(B, 1) float32 incident energy, MeV",
    }
    for name, width in zip(info.cond_names, info.cond_widths, strict=True):
        docs[name] = f"(B, {width}) float32 condition {name!r} in the training file's units"
    return docs


def _gemm_to_matmul(model: Any) -> int:
    """Rewrite ``Gemm(A, W, b)`` with constant W into ``MatMul(A, W') + b`` in place; returns the count.

    ONNX Runtime's dynamic quantisation handles MatMul, not Gemm (what ``nn.Linear`` exports to).
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        w_name = f"{node.input[1]}__matmul_{count}"
        graph.initializer.append(numpy_helper.from_array(w, w_name))
        mm_out = node.output[0] if len(node.input) < 3 or not node.input[2] else f"{node.output[0]}__mm"
        new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=f"{node.name}_matmul"))
        if mm_out != node.output[0]:
            new_nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]],
                                              name=f"{node.name}_bias"))
        count += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    # drop initializers no node reads any more (the transposed originals)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.checker.check_model(model)
    return count


def _training_file(info: RunInfo) -> str:
    """The training file a run records (meta.json ``data.path``); ExportError if it records none."""
    path = info.meta.get("data", {}).get("path")
    if not path:
        raise ExportError(f"run {info.run_id} records no training file (meta.json data.path); static INT8 "
                          "calibration draws its energies and conditions from it")
    return str(path)


def calibration_inputs(info: RunInfo, n: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Incident energies (m,) MeV and conditions {name: (m, k)} (the file's units, e.g. mm) of
    m = min(n, N) showers drawn at random, without replacement, from the run's N training showers.

    Only the energies and conditions are read (whole: N numbers per column), not the showers.

    Raises:
        ExportError: the run records no training file, or that file is missing, unreadable, of another
            geometry or without one of the run's conditions (a one-line message naming the file).
    """
    from fastshower.sample import draw_training_conditions

    if n < 1:
        raise ExportError(f"calibration needs >= 1 shower, got {n}")
    path = _training_file(info)
    try:
        return draw_training_conditions(info, n, np.random.default_rng(seed))
    except (OSError, ValueError) as exc:  # ShowerFileError is a ValueError; h5py raises OSError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"static INT8 calibration reads run {info.run_id}'s training file {path}: "
                          f"{reason.removeprefix(f'{path}: ')}") from None


def _calibration_feeds(model: Any, info: RunInfo, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Inputs of the sampler graph for ``n`` calibration showers, in batches of :data:`_CALIBRATION_BATCH`:
    ``noise`` (b, D) from the model's own ``draw_noise``, ``incident_energy_mev`` (b, 1) MeV and the
    conditions (b, k) of training-file showers (:func:`calibration_inputs`), all float32."""
    e, conds = calibration_inputs(info, n, seed)
    gen = torch.Generator().manual_seed(seed)
    feeds = []
    for a in range(0, len(e), _CALIBRATION_BATCH):
        b = min(a + _CALIBRATION_BATCH, len(e))
        feed = {"noise": draw_noise(model, b - a, gen).numpy(),
                "incident_energy_mev": e[a:b].astype(np.float32).reshape(-1, 1)}
        for k in info.cond_names:
            feed[k] = np.ascontiguousarray(conds[k][a:b], dtype=np.float32)
        feeds.append(feed)
    return feeds


def _calibration_reader(feeds: Sequence[Mapping[str, np.ndarray]]) -> Any:
    """An ONNX Runtime ``CalibrationDataReader`` that hands out ``feeds`` once, in order, then None."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._next = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._next >= len(feeds):
                return None
            self._next += 1
            return dict(feeds[self._next - 1])

        def rewind(self) -> None:
            self._next = 0

    return FeedReader()


@contextlib.contextmanager
def _quiet_quantisation() -> Iterator[None]:
    """Silence onnxruntime.quantization: it warns through the root logger (about pre-processing) and its
    histogram calibrators print progress to stdout."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _quantize(prepared: Path, out: Path, mode: str, feeds: Sequence[Mapping[str, np.ndarray]] = (),
              method: str = "minmax") -> None:
    """INT8-quantise the Gemm-free FP32 graph ``prepared`` into ``out`` (``mode`` dynamic or static; static
    calibrates activation ranges on ``feeds`` with ``method``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    with _quiet_quantisation():
        if mode == "dynamic":
            quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8, per_channel=True)
            return
        quantize_static(
            str(prepared), str(out), _calibration_reader(feeds), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(_STATIC_OP_TYPES), per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile if method == "percentile" else CalibrationMethod.MinMax,
            extra_options={"CalibPercentile": _CALIBRATION_PERCENTILE} if method == "percentile" else {},
        )


def _annotate(model: Any, meta: Mapping[str, str], docs: Mapping[str, str]) -> None:
    from onnx import helper

    del model.metadata_props[:]
    helper.set_model_props(model, dict(meta))
    for vi in model.graph.input:
        vi.doc_string = docs.get(vi.name, vi.doc_string)
    for vi in model.graph.output:
        if vi.name == "showers_mev":
            vi.doc_string = (f"(B, {meta['n_voxels']}) float32 voxel energies, MeV (geometry {meta['geometry']}, "
                             f"threshold {meta['threshold_mev']} MeV applied)")
    precision = meta["precision"] + (f" ({meta['int8_mode']})" if "int8_mode" in meta else "")
    model.doc_string = (f"fastshower {meta['fastshower_version']} sampler: model {meta['model']} of run "
                        f"{meta['run_id']} (step {meta['run_step']}), {precision}, "
                        f"steps {meta['steps']}; noise + conditions -> showers_mev")
    model.producer_name = "fastshower"
    model.producer_version = __version__


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
) -> Path:
    """Export a run's sampler to an ONNX file; returns its path.

    Args:
        run: finished run folder (or the tuple of :func:`fastshower.sample.load_run`).
        out: the .onnx file to write (parents created; an existing file is replaced).
        int8: INT8 quantisation (see the module docs).
        int8_mode: with ``int8``: ``"dynamic"`` (default; weights int8 per channel, activations uint8 per
            call) or ``"static"`` (QDQ, weights int8 per channel, activation ranges calibrated on the run's
            training file).
        calibration: static INT8: showers of the training file (and noise draws) to calibrate on.
        calibration_method: static INT8: ``"minmax"`` (default) or ``"percentile"`` (99.999 %).
        opset: ONNX opset (>= 14).
        threshold_mev: readout threshold baked into the graph, MeV (default: the run's).
        steps, method: flow-matching ODE steps and solver, fixed in the graph (default: the run's).
        check: run the FP32 graph once with ONNX Runtime and compare with torch (ExportError if they differ).

    Raises:
        ExportError: unfinished run, a model that does not export, an FP32 graph that disagrees with torch,
            bad INT8 options, or (static INT8) an unreadable training file.
    """
    import onnx

    if opset < 14:
        raise ExportError(f"opset must be >= 14, got {opset}")
    mode = _int8_mode(int8, int8_mode, calibration, calibration_method)
    model, transform, info = _load(run)
    module = SamplerModule((model, transform, info), threshold_mev, steps=steps, method=method).eval()
    d = noise_dim(model)
    # read the calibration data before the (slower) export, so that a missing training file fails fast
    feeds = _calibration_feeds(model, info, calibration, _CALIBRATION_SEED) if mode == "static" else []
    names = ["noise", "incident_energy_mev", *info.cond_names]
    clash = set(info.cond_names) & set(_RESERVED_INPUTS)
    if clash:
        raise ExportError(f"run {info.run_id}: condition name(s) {sorted(clash)} clash with the graph's own inputs")
    example = _example_inputs(info, d)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fastshower-export-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module, example, str(fp32), dynamo=False, opset_version=opset, input_names=names,
                    output_names=["showers_mev"], dynamic_axes={n: {0: "batch"} for n in [*names, "showers_mev"]},
                )
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"model {info.model_name!r} of run {info.run_id} does not export to ONNX: "
                              f"{msg[:300]}") from None
        proto = onnx.load(str(fp32))
        meta = _metadata(info, module, d, "fp32", opset)
        docs = _input_docs(info, d)
        _annotate(proto, meta, docs)
        onnx.save(proto, str(fp32))
        if check:
            try:
                _check_against_torch(module, fp32, example)
            except ExportError as exc:
                raise ExportError(f"model {info.model_name!r} of run {info.run_id} does not export to ONNX "
                                  f"faithfully: {exc}") from None
        if not int8:
            tmp_out = out.with_name(out.name + ".tmp")
            tmp_out.write_bytes(fp32.read_bytes())
            os.replace(tmp_out, out)
            return out
        _gemm_to_matmul(proto)
        prepared = Path(tmp) / "fp32_matmul.onnx"
        onnx.save(proto, str(prepared))
        q = Path(tmp) / "int8.onnx"
        _quantize(prepared, q, mode, feeds, calibration_method)
        qproto = onnx.load(str(q))
        qmeta = {**meta, "precision": "int8", "int8_mode": mode}
        if mode == "static":
            qmeta["calibration"] = json.dumps({
                "method": calibration_method, "n_showers": sum(len(f["noise"]) for f in feeds),
                "data": _training_file(info), "seed": _CALIBRATION_SEED, "op_types": list(_STATIC_OP_TYPES)})
        _annotate(qproto, qmeta, docs)
        tmp_out = out.with_name(out.name + ".tmp")
        onnx.save(qproto, str(tmp_out))
        os.replace(tmp_out, out)
    return out


def _int8_mode(int8: bool, int8_mode: str | None, calibration: int, calibration_method: str) -> str:
    """The INT8 mode of an export (``"none"`` for FP32); ExportError for options that do not fit."""
    if int8_mode is not None and int8_mode not in INT8_MODES:
        raise ExportError(f"unknown INT8 mode {int8_mode!r}; choose {' or '.join(INT8_MODES)}")
    if int8_mode is not None and not int8:
        raise ExportError(f"INT8 mode {int8_mode!r} given without int8 (--int8)")
    if calibration < 1:
        raise ExportError(f"calibration needs >= 1 shower, got {calibration}")
    if calibration_method not in CALIBRATION_METHODS:
        raise ExportError(f"unknown calibration method {calibration_method!r}; choose "
                          f"{' or '.join(CALIBRATION_METHODS)}")
    return (int8_mode or "dynamic") if int8 else "none"


def _check_against_torch(module: SamplerModule, path: Path, example: tuple[Tensor, ...]) -> None:
    sess = _session(path, threads=1)
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(["showers_mev"], {n: t.numpy() for n, t in zip(names, example, strict=True)})[0]
    with torch.no_grad():
        want = module(*example).numpy()
    scale = max(float(np.abs(want).max()), 1.0)
    if not np.allclose(got, want, rtol=1e-3, atol=1e-4 * scale):
        raise ExportError(f"the exported graph disagrees with torch (max |diff| {np.abs(got - want).max():.3g} MeV)")


# --- loading and running an exported file ------------------------------------------------------------


def _session(path: str | Path, threads: int = 1, profile_prefix: str | None = None) -> Any:
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
    sess = _session(path, threads)
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    info: RunInfo | None
    if run is None or isinstance(run, RunInfo):
        info = run
    elif isinstance(run, (str, Path)):
        info = _load(run)[2]
    else:
        info = run[2]
    check_metadata(meta, info, path)
    return OnnxSampler(path, meta, sess, tuple(json.loads(meta["condition_names"])), int(meta["noise_dim"]))


# --- benchmarks -------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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
    from fastshower.sample import _condition_samplers

    e = _energy_sampler(info)(rng, batch)
    samplers, _ = _condition_samplers(info, None)
    return e, {k: s(rng, batch) for k, s in samplers.items()}


def _energy_spec_text(info: RunInfo) -> str:
    """The training file's energy spec (GeV), or the run's energy range as a log-uniform spec."""
    from fastshower.io import ShowerFile

    path = info.meta.get("data", {}).get("path")
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


def _geant4_time(info: RunInfo, n: int, n_startup: int, seed: int) -> dict[str, Any]:
    """Geant4 seconds per shower for the run's geometry, particle and energy spectrum (jobs=1).

    Two productions into temp files: ``n_startup`` showers (start-up dominated) and ``n``; the time per
    shower is the difference of their wall times over the difference of counts, which removes the
    process start-up, geometry construction and physics-table building.
    """
    from fastshower.simulate.run import simulate

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


def profile_onnx(path: str | Path, info: RunInfo, batch: int, threads: int = 1, runs: int = 3) -> dict[str, Any]:
    """Time per ONNX op type (ONNX Runtime's profiler) for ``runs`` calls at ``batch``.

    Returns {"batch", "ms_per_call", "by_op_type": {op: {"ms_per_call", "share", "count"}}} with ops sorted by time.
    """
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="fastshower-prof-") as tmp:
        sess = _session(path, threads, profile_prefix=str(Path(tmp) / "prof"))
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


def bench(
    run: str | Path | Run,
    out: str | Path | None = None,
    batch_sizes: Sequence[int] = (1, 100, 10000),
    threads: int = 1,
    geant4: bool | Mapping[str, Any] = False,
    *,
    backends: Sequence[str] = BACKENDS,
    repeats: int = 5,
    warmup: int = 1,
    budget_s: float = 20.0,
    steps: int | None = None,
    n_geant4: int = 200,
    n_geant4_startup: int = 10,
    profile_batch: int | None = None,
    seed: int = 0,
    print_table: bool = True,
) -> dict[str, Any]:
    """Measure generation speed on this machine; returns (and writes to ``out`` as JSON) the results.

    Args:
        run: finished run folder (or a loaded run).
        out: JSON file to write (optional).
        batch_sizes: showers per call.
        threads: intra-op threads for torch and ONNX Runtime.
        geant4: also time Geant4 (jobs=1) on the run's geometry, particle and energy spectrum; or the
            ``"geant4"`` entry of an earlier report of this machine to reuse (marked ``"reused": true``).
        backends: from :data:`BACKENDS` and :data:`OPTIONAL_BACKENDS` (``onnx-int8-static`` calibrates on
            the run's training file, see :func:`export_onnx`).
        repeats, warmup, budget_s: timed calls (median reported), untimed warm-up calls, and the time after
            which the repeats of one (backend, batch size) stop early (at least one timed call).
        steps: flow-matching ODE steps (default: the run's), the same for torch and ONNX.
        n_geant4, n_geant4_startup: Geant4 showers of the timed and of the start-up production.
        profile_batch: if given, also profile the ONNX FP32 (and INT8) graph per op type at this batch size.
        seed: seeds inputs and noise.
        print_table: print a short table.

    Returns:
        {"machine": {...}, "run": {...}, "results": [{"backend", "batch_size", "ms_per_shower", "ms_per_call",
        "repeats"}...], "geant4": {...} | None, "speedup_vs_geant4": {backend: {batch: x}}, "int8_vs_fp32":
        {batch: x} (dynamic INT8), "int8_static_vs_fp32": {batch: x}, "profile": {...}}.
    """
    sizes = [int(b) for b in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise ExportError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if threads < 1:
        raise ExportError(f"threads must be >= 1, got {threads}")
    unknown = set(backends) - set(BACKENDS) - set(OPTIONAL_BACKENDS)
    if unknown:
        raise ExportError(f"unknown backend(s) {sorted(unknown)}; choose from {[*BACKENDS, *OPTIONAL_BACKENDS]}")
    loaded = _load(run)
    model, transform, info = loaded
    opts = _sample_options(model, {"steps": steps})
    rng = np.random.default_rng(seed)
    inputs = {b: _bench_inputs(info, b, rng) for b in sizes}
    results: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fastshower-bench-") as tmp, _torch_threads(threads):
        files: dict[str, Path] = {}
        for be in backends:
            if be.startswith("onnx"):
                int8 = be.startswith("onnx-int8")
                files[be] = export_onnx(loaded, Path(tmp) / f"{be}.onnx", int8=int8,
                                        int8_mode=("static" if be.endswith("static") else "dynamic") if int8 else None,
                                        **opts)
        for be in backends:
            sampler = load_onnx(files[be], info, threads) if be in files else None
            gen = torch.Generator().manual_seed(seed)
            for b in sizes:
                e, conds = inputs[b]
                call: Callable[[], None]
                if sampler is None:
                    def call_torch(e: np.ndarray = e, conds: dict[str, np.ndarray] = conds,
                                   g: torch.Generator = gen) -> None:
                        sample_batch(model, transform, e, conds, g, info.threshold_mev, info.geometry, **opts)

                    call = call_torch
                else:
                    z_rng = np.random.default_rng(seed)

                    def call_onnx(e: np.ndarray = e, conds: dict[str, np.ndarray] = conds,
                                  s: OnnxSampler = sampler, r: np.random.Generator = z_rng) -> None:
                        s(r.standard_normal((len(e), s.noise_dim), dtype=np.float32), e, conds)

                    call = call_onnx
                sec, n = _time_calls(call, repeats, warmup, budget_s)
                results.append({"backend": be, "batch_size": b, "ms_per_call": 1e3 * sec,
                                "ms_per_shower": 1e3 * sec / b, "repeats": n})
            if profile_batch and be in files:
                profiles[be] = profile_onnx(files[be], info, int(profile_batch), threads)
    if isinstance(geant4, Mapping):
        g4: dict[str, Any] | None = {**geant4, "reused": True}
    else:
        g4 = _geant4_time(info, n_geant4, n_geant4_startup, seed) if geant4 else None
    table = {(r["backend"], r["batch_size"]): r["ms_per_shower"] for r in results}
    speedup: dict[str, dict[str, float]] = {}
    if g4:
        for (be, b), ms in table.items():
            speedup.setdefault(be, {})[str(b)] = g4["ms_per_shower"] / ms
    int8_vs_fp32, int8_static_vs_fp32 = ({str(b): table[("onnx-fp32", b)] / table[(be, b)]
                                          for b in sizes if ("onnx-fp32", b) in table and (be, b) in table}
                                         for be in ("onnx-int8", "onnx-int8-static"))
    report: dict[str, Any] = {
        "fastshower_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "device": "cpu",
            "cpu_model": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "threads": threads,
            "torch_version": torch.__version__,
            "onnxruntime_version": _ort_version(),
            "platform": platform.platform(),
        },
        "run": {
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
        },
        "timing": {"repeats": repeats, "warmup": warmup, "budget_s": budget_s, "statistic": "median"},
        "results": results,
        "geant4": g4,
        "speedup_vs_geant4": speedup,
        "int8_vs_fp32": int8_vs_fp32,
        "int8_static_vs_fp32": int8_static_vs_fp32,
        "profile": profiles,
    }
    if print_table:
        print(format_table(report))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


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
    return "\n".join(lines)
