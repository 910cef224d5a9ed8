"""Is a generated file told from Geant4 by its observables' marginals or by how they go together?

``evaluate``'s high-level classifier sees every observable at once (368 on par04-ds2). This script moves each of the
candidate's observables onto the Geant4 training file's marginal, per decile of incident energy, keeping the
candidate's ranks (so its copula, how the observables go together, stays as generated), and trains the same seeded
classifier (:func:`fastshower.validate.metrics.classifier_score`, raw observables as ``evaluate`` gives them) on:
the file as it is; every marginal moved; every marginal moved but one family's (what that family's marginals alone
give away). A file whose AUC falls to the floor with every marginal moved differs by marginals, each perhaps too
small to see alone: what :mod:`fastshower.refinement` removes. Its JSON goes to ``benchmarks/results/``::

    .venv/bin/python benchmarks/marginal_shifts.py --train train.h5 --reference test.h5 --candidate gen.h5 \\
        --out benchmarks/results/marginal_shifts_par04-ds2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastshower.validate.metrics import classifier_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from observable_families import load  # observables, log10 E_inc and names of a file

#: observable families, by name prefix ("globals": every observable of no per-layer family)
FAMILIES = ("E_layer_", "x_centre_", "y_centre_", "x_width_", "y_width_", "r_centre_", "r_width_", "sparsity_")


def moved(cand: np.ndarray, le_cand: np.ndarray, train: np.ndarray, le_train: np.ndarray, cols: list[int],
          bins: int = 10) -> np.ndarray:
    """``cand`` (n, F) with columns ``cols`` moved onto ``train``'s marginals per decile of the training file's log
    incident energy (``le_*``, (n,) each), each value to the training quantile of its rank within its decile."""
    edges = np.quantile(le_train, np.linspace(0, 1, bins + 1))
    edges[0], edges[-1] = -np.inf, np.inf
    bc, bt = np.digitize(le_cand, edges), np.digitize(le_train, edges)
    out = cand.copy()
    for b in np.unique(bc):
        mc, mt = bc == b, bt == b
        ranks = (np.argsort(np.argsort(cand[mc][:, cols], axis=0), axis=0) + 0.5) / mc.sum()
        for j, c in enumerate(cols):
            out[np.flatnonzero(mc), c] = np.quantile(train[mt, c], ranks[:, j])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True, help="Geant4 file whose marginals are the target")
    ap.add_argument("--reference", type=Path, required=True, help="Geant4 test file the classifier compares to")
    ap.add_argument("--candidate", type=Path, required=True, help="generated (or floor) file")
    ap.add_argument("--seeds", type=int, default=3, help="classifier seeds 0 .. k-1")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train, le_train, names = load(args.train)
    ref, _, _ = load(args.reference)
    cand, le_cand, _ = load(args.candidate)
    n = min(len(ref), len(cand))

    def aucs(x: np.ndarray) -> dict[str, float | list[float]]:
        v = [round(float(classifier_score(ref[:n], x[:n], seed=s).auc), 3) for s in range(args.seeds)]
        return {"values": v, "mean": round(float(np.mean(v)), 3)}

    every = list(range(len(names)))
    families = {p: [i for i, k in enumerate(names) if k.startswith(p)] for p in FAMILIES}
    families["globals"] = [i for i in every if not any(i in c for c in families.values())]
    as_is, all_moved = aucs(cand), aucs(moved(cand, le_cand, train, le_train, every))
    print("as generated", as_is, "every marginal moved", all_moved, flush=True)
    but = {}
    for family, cols in families.items():
        but[family] = aucs(moved(cand, le_cand, train, le_train, sorted(set(every) - set(cols))))
        print("every marginal moved but", family, but[family], flush=True)
    out = {"train": str(args.train.resolve()), "reference": str(args.reference.resolve()),
           "candidate": str(args.candidate.resolve()), "n": n, "features": "raw observables, as evaluate's",
           "as_generated": as_is, "every_marginal_moved": all_moved, "every_marginal_moved_but": but,
           "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
