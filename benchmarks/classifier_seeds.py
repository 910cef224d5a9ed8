"""How far evaluate's classifier AUCs move with the classifier's own seed, on two fixed files: the metric's noise.

Every AUC of ``evaluate`` comes from one seeded MLP trained on 60 % of the two samples and scored on 20 % of them
(the CaloChallenge's procedure), so it moves with the seed even on the same files: the split, the initialisation
and the batch order change, and on 2500 + 2500 showers the validation split holds 1000. This script scores each
candidate against the reference with classifier seeds 0 .. k-1 (the classifiers only: low-level, all high-level
observables, the CaloChallenge's high-level set) and writes every value with their mean and standard deviation::

    .venv/bin/python benchmarks/classifier_seeds.py --reference test.h5 --candidate gen.h5 --seeds 5 \\
        --out benchmarks/results/classifier_seeds_par04-ds2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastshower.errors import FastshowerError
from fastshower.validate.evaluate import evaluate

#: evaluate's classifier metrics and the names this script gives their AUCs
CLASSIFIERS = {"low": "classifier_low", "high": "classifier_high", "challenge": "classifier_challenge"}


def seed_spread(reference: Path, candidate: Path, seeds: int) -> dict[str, Any]:
    """{"low" | "high" | "challenge": {"values": [AUC per seed], "mean", "std"}} of one candidate."""
    values: dict[str, list[float]] = {k: [] for k in CLASSIFIERS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            m = evaluate(reference, candidate, Path(tmp) / str(seed), metrics=list(CLASSIFIERS.values()), seed=seed,
                         progress=False, report=False)
            for k in CLASSIFIERS:
                auc = m.get("classifier", {}).get(k, {}).get("auc")
                if auc is not None:
                    values[k].append(round(float(auc), 4))
    return {k: {"values": v, "mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v, ddof=1)), 4)}
            for k, v in values.items() if len(v) > 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="Geant4 test file")
    ap.add_argument("--candidate", type=Path, action="append", default=[], help="generated or floor files (repeatable)")
    ap.add_argument("--seeds", type=int, default=5, help="classifier seeds 0 .. SEEDS-1 (at least 2)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.seeds < 2:
        print(f"error: --seeds {args.seeds}: a spread needs at least 2", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        files = {p.stem: seed_spread(args.reference, p, args.seeds) for p in args.candidate}
    except FastshowerError as exc:  # a missing or mismatched file: one line, exit status 2, nothing written
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    result = {"reference": str(args.reference), "seeds": args.seeds, "files": files,
              "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for k, v in files.items():
        print(f"{k:55s} " + "  ".join(f"{c} {s['mean']:.3f} +- {s['std']:.3f}" for c, s in v.items()))


if __name__ == "__main__":
    main()
