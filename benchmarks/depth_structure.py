"""How the layers' occupancy goes together through the depth: what layer-fm's ``depth_copula`` maps.

Geant4's showers that are busy (many hit cells) in one layer are busy in the next few, less so far deeper; a
generator can get every layer's sparsity (fraction of its cells hit) right one layer at a time and still link the
layers wrongly, which a classifier on all layers' sparsities sees. Per file and narrow incident-energy bin (3-5,
10-14, 50-70 GeV: at like energy, so that E_inc's own spread does not link every layer) this script gives the mean
Pearson correlation of two layers' sparsities d layers apart (d = 1, 5, 10, 15, 25), over the layer pairs hit in
more than half of the reference's showers of the bin, and the same for the log layer energies (which layer-fm's
stage 1 draws jointly); the mean Spearman correlation of each such layer's hit count with its own energy and with
the next layer's; and the relative spread (std / mean) of the shower's total hit count. Against the reference:
the seeded classifier AUC
(:func:`fastshower.validate.metrics.classifier_score`) on the per-layer sparsities with log10 E_inc, as they are and
with each layer's column shuffled among the showers of its energy bin (1-10, 10-40, 40-100 GeV) in both files
(what is left is the marginals; the difference is what the links between layers add)::

    .venv/bin/python benchmarks/depth_structure.py --reference test.h5 --candidate floor.h5 --candidate gen.h5 \\
        --out benchmarks/results/depth_structure_par04-ds2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from fastshower.errors import FastshowerError
from fastshower.io import ShowerFile
from fastshower.validate.metrics import classifier_score
from fastshower.validate.observables import layer_energies, layer_sparsity

#: layer distances of the correlations; incident-energy bins (GeV) of the correlations, and of the shuffle (all showers)
DISTANCES = (1, 5, 10, 15, 25)
BINS_GEV = ((3.0, 5.0), (10.0, 14.0), (50.0, 70.0))
SHUFFLE_BINS_GEV = ((1.0, 10.0), (10.0, 40.0), (40.0, 100.0))


def layer_numbers(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-layer sparsity (N, L), per-layer log10 energy over E_inc (N, L; -12 where empty) and E_inc (N,) GeV
    (sparsity x cells = the layer's hit count)."""
    with ShowerFile(path) as f:
        batch, geometry = f.read(0, f.n), f.geometry
    x = np.asarray(batch.showers, dtype=np.float64)
    e = np.asarray(batch.energies, dtype=np.float64).reshape(-1)
    sparsity = 1.0 - np.asarray(layer_sparsity(x, geometry))  # the observables' is the empty fraction
    energy = np.asarray(layer_energies(x, geometry)) / e[:, None]
    return sparsity, np.log10(np.maximum(energy, 1e-12)), e / 1e3


def depth_correlations(v: np.ndarray, busy: np.ndarray) -> dict[str, float | None]:
    """Per-shower layer numbers v (n, L), layers to use busy (L,) bool -> {"d": mean correlation of layers d apart}
    (None where no pair of busy layers is d apart)."""
    with np.errstate(invalid="ignore", divide="ignore"):  # a layer of one value in the bin: NaN, left out below
        corr = np.corrcoef(v, rowvar=False) if len(v) > 2 else np.full((v.shape[1],) * 2, np.nan)
    out: dict[str, float | None] = {}
    for d in DISTANCES:
        pairs = [corr[i, i + d] for i in range(v.shape[1] - d) if busy[i] and busy[i + d]]
        pairs = [p for p in pairs if np.isfinite(p)]
        out[str(d)] = round(float(np.mean(pairs)), 3) if pairs else None
    return out


def hit_links(sparsity: np.ndarray, log_e: np.ndarray, busy: np.ndarray) -> dict[str, float | None]:
    """Per-layer sparsity and log energy (n, L) of like-energy showers, layers to use busy (L,) bool -> the mean
    Spearman correlation of a layer's sparsity with its own energy ("own_energy") and with the next layer's
    ("next_energy"), and std / mean of the summed sparsity ("total_spread": the total hit count's, for layers of
    equal size)."""
    def spearman(a: np.ndarray, b: np.ndarray) -> float:  # ties (a sparsity is k / cells) get their mean rank
        return float(spearmanr(a, b).statistic) if a.std() > 0 and b.std() > 0 else float("nan")

    layers = np.flatnonzero(busy)
    if len(sparsity) < 3 or not len(layers):
        return {"own_energy": None, "next_energy": None, "total_spread": None}
    own = [spearman(sparsity[:, i], log_e[:, i]) for i in layers]
    nxt = [spearman(sparsity[:, i], log_e[:, i + 1]) for i in layers if i + 1 < sparsity.shape[1]]
    total = sparsity.sum(1)
    return {"own_energy": round(float(np.nanmean(own)), 3), "next_energy": round(float(np.nanmean(nxt)), 3),
            "total_spread": round(float(total.std() / max(total.mean(), 1e-12)), 4)}


def shuffled(v: np.ndarray, e: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """v (N, L) with each column permuted among the showers of each energy bin of e (N,) GeV: the same marginals
    per bin, no link between layers."""
    out = v.copy()
    for lo, hi in SHUFFLE_BINS_GEV:
        idx = np.flatnonzero((e >= lo) & (e < hi))
        for j in range(v.shape[1]):
            out[idx, j] = v[rng.permutation(idx), j]
    return out


def sparsity_aucs(ref: tuple[np.ndarray, np.ndarray], cand: tuple[np.ndarray, np.ndarray], seed: int
                  ) -> dict[str, float]:
    """Classifier AUC on the per-layer sparsities (with log10 E_inc) of two files (sparsity, E_inc GeV each), as
    they are and shuffled (:func:`shuffled`) in both; the first min(N) showers of each."""
    n = min(len(ref[1]), len(cand[1]))
    rng = np.random.default_rng(seed)
    out = {}
    for name, shuffle in (("as_is", False), ("shuffled", True)):
        a, b = ((shuffled(s[:n], e[:n], rng) if shuffle else s[:n]) for s, e in (ref, cand))
        auc = classifier_score(np.c_[a, np.log10(ref[1][:n])], np.c_[b, np.log10(cand[1][:n])], seed=seed).auc
        out[name] = round(float(auc), 3)
    return out


def measure(reference: Path, candidates: list[Path], seed: int) -> dict[str, Any]:
    """The correlations of every file per energy bin, and the sparsity AUCs of each candidate against the
    reference."""
    files = {"reference": reference, **{p.stem: p for p in candidates}}
    numbers = {k: layer_numbers(p) for k, p in files.items()}
    ref_s, _, ref_e = numbers["reference"]
    out: dict[str, Any] = {}
    for k, (s, log_e, e) in numbers.items():
        bins = {}
        for lo, hi in BINS_GEV:
            sel, ref_sel = (e >= lo) & (e < hi), (ref_e >= lo) & (ref_e < hi)
            busy = (ref_s[ref_sel] > 0).sum(0) > 0.5 * max(int(ref_sel.sum()), 1)
            bins[f"{lo:g}-{hi:g} GeV"] = {"n": int(sel.sum()), "sparsity": depth_correlations(s[sel], busy),
                                          "log_energy": depth_correlations(log_e[sel], busy),
                                          "hits": hit_links(s[sel], log_e[sel], busy)}
        out[k] = {"correlation_by_distance": bins}
        if k != "reference":
            out[k]["sparsity_auc"] = sparsity_aucs((ref_s, ref_e), (s, e), seed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="Geant4 test file")
    ap.add_argument("--candidate", type=Path, action="append", default=[], help="generated or floor files (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        files = measure(args.reference, args.candidate, args.seed)
    except FastshowerError as exc:  # a missing or unreadable file: one line, exit status 2, nothing written
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    result = {"reference": str(args.reference), "distances": list(DISTANCES), "seed": args.seed, "files": files}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for k, v in files.items():
        top = v["correlation_by_distance"][f"{BINS_GEV[-1][0]:g}-{BINS_GEV[-1][1]:g} GeV"]
        print(f"{k:50s} top bin: sparsity corr by distance {top['sparsity']} {top['hits']}  AUC "
              f"{v.get('sparsity_auc', '')}")


if __name__ == "__main__":
    main()
