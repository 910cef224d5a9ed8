"""INT8 quantisation of an exported FP32 sampler graph (:data:`INT8_MODES`), and its calibration data.

Linear layers are exported as ``Gemm``, which ONNX Runtime's quantisers skip, so the exporter first
rewrites every ``Gemm`` with constant weights into ``MatMul`` + ``Add`` (:func:`quantize_graph`), and
lets MatMuls that torch.onnx made read a weight through an ``Identity`` read the weight itself. Both
keep one weight per layer in an ODE sampler unrolled over S steps: ONNX Runtime quantises each weight
name once, so an INT8 file holds each int8 weight once, not S times (measured on belle2-ecl-5x5 runs:
flow-matching, 32 steps, 90.3 MB -> 3.6 MB against 6.0 MB FP32, peak memory of the export 2.1 GB ->
0.42 GB; layer-fm, 16 steps, 22.8 MB -> 6.8 MB against 7.6 MB FP32, 0.85 -> 0.59 GB, and its shared
weights, FP32 before, now quantised). What remains above a quarter of FP32 is the unrolled graph's
nodes (S copies of the ops, not of the weights).

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

An INT8 file's metadata (:func:`int8_metadata`) sets ``precision`` to ``int8`` and adds ``int8_mode``
(``dynamic`` / ``static``); static ones add ``calibration`` (JSON: method, showers, training file, seed,
quantised op types).

:class:`ExportError`, the error of the whole :mod:`fastshower.deploy` package, is defined here, in its
lowest module, so that every deploy module can raise it (:mod:`fastshower.deploy.export` re-exports it).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastshower.errors import FastshowerError
from fastshower.runs import RunInfo, draw_training_conditions
from fastshower.sampling import draw_noise

__all__ = [
    "CALIBRATION_METHODS",
    "INT8_MODES",
    "ExportError",
    "calibration_feeds",
    "calibration_inputs",
    "check_int8_options",
    "int8_metadata",
    "quantize_graph",
]

#: INT8 quantisation modes of :func:`fastshower.deploy.export_onnx`
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


class ExportError(FastshowerError, ValueError):
    """A run that cannot be exported, an ONNX file that does not fit, or a bad benchmark request."""


def check_int8_options(int8: bool, int8_mode: str | None, calibration: int, calibration_method: str) -> str:
    """The INT8 mode of an export (``"none"`` for FP32); ExportError for options that do not fit."""
    if int8_mode is not None and int8_mode not in INT8_MODES:
        raise ExportError(f"unknown INT8 mode {int8_mode!r}; choose {' or '.join(INT8_MODES)}")
    if int8_mode is not None and not int8:
        raise ExportError(f"INT8 mode {int8_mode!r} given without int8=True")
    if calibration < 1:
        raise ExportError(f"calibration needs >= 1 shower, got {calibration}")
    if calibration_method not in CALIBRATION_METHODS:
        raise ExportError(f"unknown calibration method {calibration_method!r}; choose "
                          f"{' or '.join(CALIBRATION_METHODS)}")
    return (int8_mode or "dynamic") if int8 else "none"


# --- calibration data (static INT8) --------------------------------------------------------------------


def _training_file(info: RunInfo) -> str:
    """The training file a run records (meta.json ``data.path``); ExportError if it records none."""
    path = info.training_file
    if path is None:
        raise ExportError(f"run {info.run_id} records no training file (meta.json data.path); static INT8 "
                          "calibration draws its energies and conditions from it")
    return path


def calibration_inputs(info: RunInfo, n: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Incident energies (m,) MeV and conditions {name: (m, k)} (the file's units, e.g. mm) of
    m = min(n, N) showers drawn at random, without replacement, from the run's N training showers.

    Only the energies and conditions are read (whole: N numbers per column), not the showers.

    Raises:
        ExportError: the run records no training file, or that file is missing, unreadable, of another
            geometry or without one of the run's conditions (a one-line message naming the file).
    """
    if n < 1:
        raise ExportError(f"calibration needs >= 1 shower, got {n}")
    path = _training_file(info)
    try:
        return draw_training_conditions(info, n, np.random.default_rng(seed))
    except (OSError, ValueError) as exc:  # ShowerFileError is a ValueError; h5py raises OSError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"static INT8 calibration reads run {info.run_id}'s training file {path}: "
                          f"{reason.removeprefix(f'{path}: ')}") from None


def calibration_feeds(model: Any, info: RunInfo, n: int, seed: int = _CALIBRATION_SEED
                      ) -> list[dict[str, np.ndarray]]:
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


# --- the graph rewrite and the quantisers ----------------------------------------------------------------


def _gemm_to_matmul(model: Any) -> int:
    """Rewrite ``Gemm(A, W, b)`` with constant W into ``MatMul(A, W') + b`` in place; returns the count.

    ONNX Runtime's dynamic quantisation handles MatMul, not Gemm (what ``nn.Linear`` exports to). Every
    Gemm that reads the same W reads the same W' (:func:`_matmul_weight`): an ODE sampler unrolled over
    S steps calls each layer S times, and ONNX Runtime's quantisers quantise each weight *name* once,
    so one W' per Gemm node stored S quantised copies of every weight (issue 17: 90 MB INT8 file,
    2.1 GB to quantise, for a 6 MB FP32 flow-matching graph of 32 steps).
    """
    import onnx
    from onnx import helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    made: dict[tuple[str, bool], str] = {}
    new_nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            new_nodes.append(node)
            continue
        w_name = _matmul_weight(graph, inits[node.input[1]], bool(attrs.get("transB", 0)), made)
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


def _bypass_weight_identities(model: Any) -> int:
    """Let every node that reads ``Identity(W)`` of an initializer W read W itself, in place; returns how
    many Identity nodes were dropped.

    torch.onnx's exporter emits one Identity of a folded constant (e.g. a transposed attention weight)
    per use after the first: layer-fm's 16-step ODE read most of its MatMul weights through 589 of them.
    ONNX Runtime quantises a MatMul only when its weight is an initializer, so those MatMuls stayed FP32
    and the file kept both the float weights and an int8 copy (INT8 larger than FP32).
    """
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    # names a graph output or a subgraph (If branches of the spline flows) reads keep their Identity
    fixed = {o.name for o in graph.output} | _subgraph_reads(graph)
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in fixed}
    if not alias:
        return 0
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        for k, name in enumerate(node.input):
            if name in alias:
                node.input[k] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)
    return len(alias)


def _subgraph_reads(graph: Any) -> set[str]:
    """Every value name that a node inside a subgraph of ``graph`` (If / Loop / Scan bodies, at any depth)
    reads."""
    from onnx import AttributeProto

    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                names.update(i for n in body.node for i in n.input)
                names |= _subgraph_reads(body)
    return names


def _matmul_weight(graph: Any, w: Any, trans_b: bool, made: dict[tuple[str, bool], str]) -> str:
    """The name of the MatMul weight (K, N) for the Gemm weight initializer ``w`` ((N, K) if ``trans_b``
    else (K, N)), added to ``graph`` the first time and looked up in ``made`` after that."""
    from onnx import numpy_helper

    key = (w.name, trans_b)
    if key not in made:
        arr = numpy_helper.to_array(w)
        made[key] = f"{w.name}__matmul{'_t' if trans_b else ''}"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr.T if trans_b else arr),
                                                         made[key]))
    return made[key]


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


def quantize_graph(proto: Any, workdir: Path, mode: str, feeds: Sequence[Mapping[str, np.ndarray]] = (),
                   method: str = "minmax") -> Any:
    """The INT8 version of the FP32 sampler graph ``proto`` (an ``onnx.ModelProto``, rewritten in place to
    Gemm-free form), quantised in ``mode`` (static: calibrated on ``feeds`` with ``method``); its files
    are written in ``workdir``."""
    import onnx

    _bypass_weight_identities(proto)
    _gemm_to_matmul(proto)
    prepared = workdir / "fp32_matmul.onnx"
    onnx.save(proto, str(prepared))
    q = workdir / "int8.onnx"
    _quantize(prepared, q, mode, feeds, method)
    return onnx.load(str(q))


def int8_metadata(info: RunInfo, mode: str, feeds: Sequence[Mapping[str, np.ndarray]] = (),
                  method: str = "minmax") -> dict[str, str]:
    """The metadata entries an INT8 file changes or adds to its FP32 graph's: ``precision``, ``int8_mode``
    and (static) ``calibration``."""
    meta = {"precision": "int8", "int8_mode": mode}
    if mode == "static":
        meta["calibration"] = json.dumps({
            "method": method, "n_showers": sum(len(f["noise"]) for f in feeds),
            "data": _training_file(info), "seed": _CALIBRATION_SEED, "op_types": list(_STATIC_OP_TYPES)})
    return meta
