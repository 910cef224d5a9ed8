"""Train a model on toy showers and score it with a quick low-level classifier (CPU benchmark).

The toy showers (tests/toy_showers.py) are a parametric stand-in for Geant4: this measures
the training loop's speed and the model's ability to learn a sparse, fluctuating,
position-dependent 5x5 / 504-voxel pattern, not agreement with Geant4.

Interpolation protocol of DESIGN.md section 7 (Belle II): train on 0.5, 1.0, 1.5, 2.5 GeV,
score at 2.0 GeV (never seen) and at 1.0 GeV (seen). Classifier: sklearn MLP on
(log10 E_inc, voxels / E_inc), 50/50 split by seed, AUC on the held-out half.

    nice python benchmarks/train_toy.py --geometry belle2-ecl-5x5 --model flow-matching --steps 3000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fastshower.generation import generate
from fastshower.geometry import get_geometry
from fastshower.io import ShowerFile
from fastshower.training import train
from toy_showers import make_toy_file


def auc(ref: np.ndarray, ref_e: np.ndarray, gen: np.ndarray, gen_e: np.ndarray, seed: int = 0) -> float:
    def feats(s: np.ndarray, e: np.ndarray) -> np.ndarray:
        return np.concatenate([np.log10(e / 1e3)[:, None], s / e[:, None]], axis=1)

    x = np.concatenate([feats(ref, ref_e), feats(gen, gen_e)])
    y = np.concatenate([np.zeros(len(ref)), np.ones(len(gen))])
    xa, xb, ya, yb = train_test_split(x, y, test_size=0.5, random_state=seed, stratify=y)
    mu, sd = xa.mean(0), xa.std(0) + 1e-12
    clf = MLPClassifier((64, 64), max_iter=200, early_stopping=True, random_state=seed)
    clf.fit((xa - mu) / sd, ya)
    a = roc_auc_score(yb, clf.predict_proba((xb - mu) / sd)[:, 1])
    return float(max(a, 1 - a))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", default="belle2-ecl-5x5")
    ap.add_argument("--model", default="flow-matching")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--n-train", type=int, default=40000)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--config", default=None)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    geo = get_geometry(args.geometry)
    belle = geo.name.startswith("belle2")
    train_e = (0.5, 1.0, 1.5, 2.5) if belle else (5.0, 10.0, 20.0, 50.0)
    test_e = (2.0, 1.0) if belle else (30.0, 10.0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fs-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.h5"
    if not data.exists():
        make_toy_file(data, geo, args.n_train, train_e, seed=0, position=belle)
    run_dir = work / f"run-{args.model}-{args.steps}"
    t0 = time.perf_counter()
    run = train(data, args.model, run_dir, steps=args.steps, config=args.config, progress=False,
                resume=run_dir.exists())
    train_s = time.perf_counter() - t0
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    result = {"geometry": geo.name, "model": args.model, "steps": args.steps, "threads": args.threads,
              "train_seconds": round(train_s, 1), "ms_per_step": round(1e3 * train_s / args.steps, 2),
              "loss_curve": [(r["step"], round(r["loss"], 5)) for r in log[:: max(1, len(log) // 20)]],
              "auc": {}, "note": "toy showers (tests/toy_showers.py), not Geant4"}
    for e in test_e:
        ref = make_toy_file(work / f"ref-{e}.h5", geo, args.n_test, (e,), seed=int(100 + 10 * e), position=belle) \
            if not (work / f"ref-{e}.h5").exists() else work / f"ref-{e}.h5"
        g = work / f"gen-{args.model}-{args.steps}-{e}.h5"
        g.unlink(missing_ok=True)
        t1 = time.perf_counter()
        generate(run, args.n_test, str(e), None, g, progress=False)
        gen_s = time.perf_counter() - t1
        with ShowerFile(ref) as fr, ShowerFile(g) as fg:
            r, s = fr.read(), fg.read()
        result["auc"][f"{e}GeV"] = round(auc(r.showers, r.energies, s.showers, s.energies), 4)
        result[f"gen_ms_per_shower_{e}GeV"] = round(1e3 * gen_s / args.n_test, 4)
        result[f"mean_total_ref_{e}GeV"] = float(r.showers.sum(1).mean())
        result[f"mean_total_gen_{e}GeV"] = float(s.showers.sum(1).mean())
    print(json.dumps(result, indent=1))
    out = Path(__file__).parent / "results" / f"train_toy_{geo.name}_{args.model}_{args.steps}.json"
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
