"""Which observables a high-level classifier separates a generated file by: one AUC per family of observables.

The high-level AUC of ``evaluate`` is one classifier on every observable (368 on par04-ds2) and log E_inc; it
says how far a model is, not where. This script trains the same seeded classifier
(:func:`fastshower.validate.metrics.classifier_score`) on each family alone (with log E_inc) and on all
observables but that family, so that a family the model gets wrong stands out (alone: high; left out: the
rest drops). Features are signed log1p(|x| / median |x|) per observable, the median over both files.
A diagnostic for model development; its JSON goes to ``benchmarks/results/``::

    .venv/bin/python benchmarks/observable_families.py --reference test.h5 --candidate gen.h5 \\
        --out benchmarks/results/observable_families_par04-ds2_control.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fastshower.io import ShowerFile
from fastshower.validate.metrics import classifier_score
from fastshower.validate.observables import compute_observables, observable_names

#: family -> observable-name prefixes (a name matches a prefix, or equals it for single observables)
FAMILIES: dict[str, tuple[str, ...]] = {
    "global (E_tot, max_cell, sparsity, n_hits, depth)": ("E_tot/E_inc", "E_tot", "max_cell", "sparsity",
                                                          "n_hits", "z_centre", "z_width"),
    "n_peaks": ("n_peaks",),
    "max_cell": ("max_cell",),
    "n_hits + sparsity": ("n_hits", "sparsity"),
    "E_layer": ("E_layer_",),
    "x/y centres": ("x_centre_", "y_centre_"),
    "x/y widths": ("x_width_", "y_width_"),
    "r centres and widths": ("r_centre_", "r_width_"),
    "sparsity per layer": ("sparsity_",),
}


def load(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Observables (N, F) of every shower in ``path``, log10 E_inc (N,) and the F names."""
    with ShowerFile(path) as f:
        batch, geometry = f.read(0, f.n), f.geometry
    e = batch.energies.reshape(-1)
    obs = compute_observables(batch.showers, e, geometry)
    names = observable_names(geometry)
    return np.stack([np.asarray(obs[n], dtype=np.float64) for n in names], 1), np.log10(e), names


def members(names: list[str], prefixes: tuple[str, ...]) -> list[int]:
    """Columns of the observables in a family: ``E_layer_`` matches E_layer_0.., ``sparsity`` only itself."""
    return [i for i, n in enumerate(names) if any(n == p or (p.endswith("_") and n.startswith(p)) for p in prefixes)]


def family_aucs(ref: np.ndarray, cand: np.ndarray, e_ref: np.ndarray, e_cand: np.ndarray, names: list[str],
                seed: int) -> dict[str, dict[str, float]]:
    """{family: {"alone": AUC, "left_out": AUC}} and {"all": {"alone": AUC}} for files of equal size."""
    scale = np.median(np.abs(np.concatenate([ref, cand])), 0) + 1e-9

    def auc(cols: list[int]) -> float:
        a, b = (np.sign(x[:, cols]) * np.log1p(np.abs(x[:, cols]) / scale[cols]) for x in (ref, cand))
        return round(float(classifier_score(np.c_[a, e_ref], np.c_[b, e_cand], seed=seed).auc), 3)

    out: dict[str, dict[str, float]] = {}
    for family, prefixes in FAMILIES.items():
        cols = members(names, prefixes)
        rest = [i for i in range(len(names)) if i not in cols]
        out[family] = {"n_observables": len(cols), "alone": auc(cols), "left_out": auc(rest)}
        print(family, out[family], flush=True)
    out["all"] = {"n_observables": len(names), "alone": auc(list(range(len(names))))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, required=True, help="Geant4 test file")
    ap.add_argument("--candidate", type=Path, required=True, help="generated (or floor) file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ref, e_ref, names = load(args.reference)
    cand, e_cand, _ = load(args.candidate)
    n = min(len(ref), len(cand))
    result = {"reference": str(args.reference.resolve()), "candidate": str(args.candidate.resolve()), "n": n,
              "features": "signed log1p(|x| / median |x|) per observable, plus log10 E_inc",
              "families": family_aucs(ref[:n], cand[:n], e_ref[:n], e_cand[:n], names, args.seed),
              "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
