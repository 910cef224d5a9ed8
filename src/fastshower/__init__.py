"""fastshower: fast simulation of particle showers with deep generative models.

The chain, one function per verb (the CLI's sub-commands call the same functions)::

    simulate (reference Monte Carlo) -> train -> generate -> evaluate -> export_onnx / bench

    import fastshower as fs
    fs.simulate("belle2-ecl-5x5", "e-", "0.5,1,1.5,2.5", 40000, "belle.h5", jobs=2, seed=1)
    fs.simulate("belle2-ecl-5x5", "e-", "2.0", 10000, "g4_2GeV.h5", jobs=2, seed=2)
    run = fs.train("belle.h5", model="flow-matching", out="runs/fm", steps=5000)
    fs.generate(run, 10000, "2.0", out="gen.h5")
    fs.evaluate("g4_2GeV.h5", "gen.h5", "report/", floor=True)

The names are imported on first use (PEP 562), so ``import fastshower`` stays light and the
command line starts fast; where each lives is in ``_API`` below and in docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastshower._version import __version__

# public name -> module that defines it
_API: dict[str, str] = {
    "simulate": "fastshower.montecarlo.run",
    "train": "fastshower.training",
    "distill": "fastshower.distillation",
    "generate": "fastshower.generation",
    "fit_refiner": "fastshower.refinement",
    "fast_sim_model": "fastshower.fastsim_model",
    "evaluate": "fastshower.validate.evaluate",
    "export_onnx": "fastshower.deploy.export",
    "load_onnx": "fastshower.deploy.export",
    "bench": "fastshower.deploy.bench",
    "load_run": "fastshower.runs",
    "Run": "fastshower.runs",
    "sample_batch": "fastshower.sampling",
    "get_geometry": "fastshower.geometry",
    "list_geometries": "fastshower.geometry",
    "Geometry": "fastshower.geometry",
    "ShowerFile": "fastshower.io",
    "ShowerWriter": "fastshower.io",
    "ShowerBatch": "fastshower.io",
    "parse_energy": "fastshower.energy",
    "available_models": "fastshower.models",
    "TrainConfig": "fastshower.config",
    "FastshowerError": "fastshower.errors",
}

__all__ = [
    "FastshowerError",
    "Geometry",
    "Run",
    "ShowerBatch",
    "ShowerFile",
    "ShowerWriter",
    "TrainConfig",
    "__version__",
    "available_models",
    "bench",
    "distill",
    "evaluate",
    "export_onnx",
    "fast_sim_model",
    "fit_refiner",
    "generate",
    "get_geometry",
    "list_geometries",
    "load_onnx",
    "load_run",
    "parse_energy",
    "sample_batch",
    "simulate",
    "train",
]

if TYPE_CHECKING:
    from fastshower.config import TrainConfig
    from fastshower.deploy.bench import bench
    from fastshower.deploy.export import export_onnx, load_onnx
    from fastshower.distillation import distill
    from fastshower.energy import parse_energy
    from fastshower.errors import FastshowerError
    from fastshower.fastsim_model import fast_sim_model
    from fastshower.generation import generate
    from fastshower.geometry import Geometry, get_geometry, list_geometries
    from fastshower.io import ShowerBatch, ShowerFile, ShowerWriter
    from fastshower.models import available_models
    from fastshower.montecarlo.run import simulate
    from fastshower.refinement import fit_refiner
    from fastshower.runs import Run, load_run
    from fastshower.sampling import sample_batch
    from fastshower.training import train
    from fastshower.validate.evaluate import evaluate


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'fastshower' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
