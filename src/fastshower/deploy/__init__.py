"""Deployment: a run's sampler as an ONNX graph (FP32, dynamic or static INT8), loaded back for ONNX
Runtime, and speed benchmarks against Geant4.

- :mod:`fastshower.deploy.export`: :func:`export_onnx`, :func:`load_onnx`, :class:`OnnxSampler`, the
  graph's inputs, outputs and metadata;
- :mod:`fastshower.deploy.quantize`: INT8 quantisation of the exported graph (dynamic, or static with
  activation ranges calibrated on the run's training file, :func:`calibration_inputs`);
- :mod:`fastshower.deploy.bench`: :func:`bench`, ms per shower per backend, batch size and thread count,
  with Geant4's time per shower measured in the same run.

Imports point down only: ``bench`` -> ``export`` -> ``quantize``.
The sampler itself (noise in, showers in MeV out) is :class:`fastshower.sampling.SamplerModule`.
"""

from __future__ import annotations

from fastshower.deploy.bench import BACKENDS, OPTIONAL_BACKENDS, bench, cpu_model, format_table, profile_onnx
from fastshower.deploy.export import OnnxSampler, check_metadata, export_onnx, load_onnx
from fastshower.deploy.quantize import CALIBRATION_METHODS, INT8_MODES, ExportError, calibration_inputs

__all__ = [
    "BACKENDS",
    "CALIBRATION_METHODS",
    "INT8_MODES",
    "OPTIONAL_BACKENDS",
    "ExportError",
    "OnnxSampler",
    "bench",
    "calibration_inputs",
    "check_metadata",
    "cpu_model",
    "export_onnx",
    "format_table",
    "load_onnx",
    "profile_onnx",
]
