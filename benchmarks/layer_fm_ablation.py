"""layer-fm's stage-2 representation at an equal number of training steps: which change buys what.

Arms (``LayerFMConfig`` keys; everything else the defaults):

- ``voxel``: each voxel's logit share of its layer, one standardisation for all energies (the model before
  ring shares);
- ``ring``: each ring's share of its layer, then each cell's share of its ring (``shares="ring"``);
- ``ringk``: ring shares standardised by incident energy (``energy_knots=5``; today's default on polar
  readouts);
- ``ringke``: as ``ringk``, each cell written as its log energy instead of its share of the ring
  (``cells="energy"``);
- ``ringkc``: as ``ringk``, with each ring's number of hit cells generated beside its share and the ring's
  largest cells kept (``occupancy="count"``); ``ringkec``: the same on ``ringke``.

Each arm trains ``--steps`` steps (batch 256, one thread, seed 0) on the same training file, generates as many
showers as the test file over its spectrum, and is scored by :func:`fastshower.validate.evaluate` against it
(the floor: a second Geant4 file against the same test file). Beside the scores, the shape facts that the
representation targets, per incident-energy band: the median share of its layer held by the hottest cell, and
the mean share of the layer in the innermost ring, averaged over layers 4-12 (shower maximum), and the median
energy of a hit in rings 2-8 (single particles crossing the silicon in Geant4), for Geant4 and for the arm.
Finished runs and generated files are reused, so a killed benchmark restarts where it stopped, and arms not
asked for keep their entry in an existing ``--out``::

    nice .venv/bin/python benchmarks/layer_fm_ablation.py --workdir /work/data/par04-ds2 \\
        --out benchmarks/results/layer_fm_ablation_par04-ds2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastshower.io import ShowerFile
from fastshower.runs import RunError, load_run
from fastshower.training import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_quality as mq  # the same generation and scoring as the quality table

ARMS: dict[str, dict[str, Any]] = {
    "voxel": {"shares": "voxel", "energy_knots": 0},
    "ring": {"shares": "ring", "energy_knots": 0},
    "ringk": {"shares": "ring", "energy_knots": 5, "cells": "share"},
    "ringke": {"shares": "ring", "energy_knots": 5, "cells": "energy"},
    "ringkc": {"shares": "ring", "energy_knots": 5, "cells": "share", "occupancy": "count"},
    "ringkec": {"shares": "ring", "energy_knots": 5, "cells": "energy", "occupancy": "count"},
}
BANDS_GEV = ((1.0, 5.0), (10.0, 30.0), (50.0, 100.0))


def shape_facts(path: Path, n_alpha: int = 16, n_r: int = 9, layers: slice = slice(4, 13)) -> dict[str, Any]:
    """Per energy band: median hottest-cell share of its layer and mean innermost-ring share (layers 4-12), and
    the median energy (MeV) of a hit in rings 2-8 of those layers."""
    with ShowerFile(path) as f:
        batch = f.read()
    x, e = batch.showers, batch.energies
    cells = x.reshape(len(x), -1, n_alpha, n_r)[:, layers].astype(np.float64)
    layer_e = cells.sum((2, 3))
    ok = layer_e > 0
    hottest = np.where(ok, cells.reshape(*layer_e.shape, -1).max(2) / np.where(ok, layer_e, 1.0), np.nan)
    inner = np.where(ok, cells[..., 0].sum(2) / np.where(ok, layer_e, 1.0), np.nan)
    outer = cells[..., 2:]
    out = {}
    for lo, hi in BANDS_GEV:
        sel = (e >= lo * 1e3) & (e < hi * 1e3)
        out[f"{lo:g}-{hi:g} GeV"] = {"n": int(sel.sum()),
                                     "hottest_cell_share_median": round(float(np.nanmedian(hottest[sel])), 4),
                                     "inner_ring_share_mean": round(float(np.nanmean(inner[sel])), 4),
                                     "outer_hit_median_mev": round(float(np.median(outer[sel][outer[sel] > 0])), 3)}
    return out


def run_arm(work: Path, name: str, steps: int, test: Path) -> dict[str, Any]:
    """Train (unless finished), generate and score one arm."""
    run_dir = work / "ab" / name
    try:
        info = load_run(run_dir)[2]
        finished = info.finished and info.step >= steps
    except RunError:
        finished = False
    t0, c0 = time.perf_counter(), time.process_time()
    if not finished:
        mq.log(f"{name}: training {steps} steps")
        train(work / "train.h5", "layer-fm", run_dir, steps=steps, seed=0, progress=False,
              resume=run_dir.exists(), config={"hparams": ARMS[name]})
    res: dict[str, Any] = {"hparams": ARMS[name], "steps": steps}
    if not finished:
        res["train_seconds_wall"] = round(time.perf_counter() - t0, 1)
        res["train_seconds_cpu"] = round(time.process_time() - c0, 1)
    gen = work / "ab" / f"gen-{name}.h5"
    with ShowerFile(test) as f:
        n_test = f.n
    if not mq.complete(gen, n_test):
        res["generation"] = mq.generate_for(run_dir, test, "1:100:log", gen, seed=7)
    res["scores"] = mq.score(test, gen, work / "ab" / f"eval-{name}", 45, seed=0)
    res["shape_facts"] = shape_facts(gen)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="holds train.h5 and test.h5 (model_quality.py's par04-ds2)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.workdir)
    test = work / "test.h5"
    out = Path(args.out)
    kept = json.loads(out.read_text())["arms"] if out.exists() else {}
    result: dict[str, Any] = {"detector": "par04-ds2", "machine": mq.machine_info(), "steps": args.steps,
                              "batch_size": 256, "geant4_shape_facts": shape_facts(test),
                              "arms": {k: v for k, v in kept.items() if k not in args.arms}}
    for name in args.arms:
        result["arms"][name] = run_arm(work, name, args.steps, test)
        out.write_text(json.dumps(result, indent=1, default=str))
        s = result["arms"][name]["scores"]
        mq.log(f"{name}: AUC low {s['auc_low']:.3f} high {s['auc_high']:.3f} mean S {s['sep_mean']:.3f}")


if __name__ == "__main__":
    main()
