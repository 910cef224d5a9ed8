"""CPU cost of one training step for every model on every detector, split into data pipeline and model.

Issue "High granularity", item 5: the cost per step was far above what the models' arithmetic needs.
For each detector this benchmark

1. takes a Geant4 training file when one is given (``--data DETECTOR=PATH``; the par04-ds2 file of
   ``model_quality.py``, say) or else writes a small file of synthetic showers with the detector's
   sparsity (a 10 % random occupancy of exponential energies summing to ~E_inc), because the data
   pipeline's cost depends only on the shape and compression of the file;
2. times the data pipeline alone over one epoch: the streamed, shuffled, transformed batches of
   :class:`fastshower.data.BatchStream` (CPU-s per batch), with the model's default preprocessing;
3. times ``training_step`` of every registered model on those batches (one warm-up step, then
   ``--steps`` timed ones; CPU seconds of this process, one torch thread), and records the model's
   parameters and FLOPs per shower (:func:`fastshower.models.base.model_cost`).

A model that refuses a detector (``flow`` above 1000 voxels) is recorded with its message. CPU-s per
shower-epoch is the step's CPU-s divided by the batch size: the cost of showing every training shower
to the model once, per shower. Run ``nice .venv/bin/python benchmarks/train_cost.py``; writes
benchmarks/results/train_cost.json.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastshower import __version__  # noqa: E402
from fastshower.data import BatchStream, ShowerDataset, fit_shower_transform  # noqa: E402
from fastshower.geometry import get_geometry  # noqa: E402
from fastshower.io import ShowerBatch, ShowerFile, write_showers  # noqa: E402
from fastshower.models import available_models, build_model, get_model_class  # noqa: E402
from fastshower.models.base import ModelSpec, model_cost  # noqa: E402

DETECTORS = ("belle2-ecl-5x5", "calogan-3layer", "par04-ds2", "ild-siw-30", "par04-ds3", "siw-51x51x25")


def synthetic_file(geometry: str, n: int, path: Path, seed: int = 0) -> Path:
    """``n`` showers of 1-100 GeV with 10 % of the voxels hit by exponential energies summing to ~E_inc."""
    geo = get_geometry(geometry)
    rng = np.random.default_rng(seed)
    e = np.exp(rng.uniform(np.log(1e3), np.log(1e5), n))
    hit = rng.random((n, geo.n_voxels)) < 0.1
    showers = (rng.exponential(1.0, (n, geo.n_voxels)) * hit).astype(np.float32)
    showers *= (e / np.maximum(showers.sum(1), 1e-9))[:, None].astype(np.float32)
    return write_showers(path, geo, ShowerBatch(e, showers, {}), "e-", "synthetic (train_cost benchmark)")


def cpu_per_call(fn: Any, n: int) -> float:
    """Mean CPU seconds of ``n`` calls of fn() after one warm-up call."""
    fn()
    c0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - c0) / n


def pipeline(path: Path, transform: tuple[str, ...], batch: int, n: int) -> tuple[BatchStream, float]:
    """The model's stream on ``path`` and the CPU-s per streamed batch (read, decompress, shuffle, transform)."""
    tr = fit_shower_transform(path, transform, "all")
    stream = BatchStream(ShowerDataset(path, tr), batch, seed=0)
    batches = iter(stream)
    # a whole epoch at least: the stream reads and shuffles groups of chunks, so batches differ in cost
    with ShowerFile(path) as f:
        per_epoch = -(-f.n // batch)
    return stream, cpu_per_call(lambda: next(batches), max(n, per_epoch))


def model_row(name: str, stream: BatchStream, spec_of: Any, steps: int) -> dict[str, Any]:
    """Step cost of model ``name`` on the stream's batches (or why it refused the detector)."""
    torch.manual_seed(0)
    try:
        model = build_model(name, spec_of(stream))
    except (ValueError, RuntimeError) as exc:
        return {"model": name, "refused": str(exc).splitlines()[0]}
    cost = model_cost(model)
    model.train()
    opts = model.configure_optimizers()
    batches = iter(stream)
    state = {"step": 0}

    def step() -> None:
        x, c = next(batches)
        model.training_step(x, c, opts, state["step"])
        state["step"] += 1

    data_and_step = cpu_per_call(step, steps)
    return {"model": name, **{k: float(f"{v:.4g}") for k, v in cost.items()},
            "cpu_s_per_step_with_data": round(data_and_step, 4)}


def detector_rows(geometry: str, data: Path | None, batch: int, steps: int, models: list[str],
                  tmp: Path) -> list[dict[str, Any]]:
    path = data if data is not None else synthetic_file(geometry, 4 * batch, tmp / f"{geometry}.h5")
    geo = get_geometry(geometry)
    rows = []
    for name in models:
        transform = get_model_class(name).default_transform
        stream, data_s = pipeline(path, transform, batch, steps)

        def spec_of(s: BatchStream) -> ModelSpec:
            return ModelSpec.from_geometry(geo, ("log_energy",), (s.dataset.transform.cond.dim,))

        row = model_row(name, stream, spec_of, steps)
        row.update(detector=geometry, voxels=geo.n_voxels, data=str(path) if data else "synthetic",
                   batch_size=batch, cpu_s_per_batch_data=round(data_s, 4))
        if "cpu_s_per_step_with_data" in row:
            row["cpu_s_per_step_model"] = round(row["cpu_s_per_step_with_data"] - data_s, 4)
            row["cpu_s_per_shower_epoch"] = round(row["cpu_s_per_step_with_data"] / batch, 6)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detectors", nargs="+", default=list(DETECTORS))
    ap.add_argument("--models", nargs="+", default=None, help="default: every trainable model")
    ap.add_argument("--data", nargs="*", default=[], help="DETECTOR=PATH: a Geant4 file instead of synthetic showers")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/train_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    given = dict(item.split("=", 1) for item in args.data)
    models = args.models or available_models()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for det in args.detectors:
            rows += detector_rows(det, Path(given[det]) if det in given else None, args.batch_size, args.steps,
                                  models, Path(tmp))
    result = {
        "benchmark": "train_cost", "fastshower_version": __version__, "torch": torch.__version__,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": 1},
        "method": __doc__.split("\n\n")[1].replace("\n", " ") if __doc__ else "",
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
