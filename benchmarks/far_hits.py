"""Hit rings of a polar shower whose energy per hit Geant4 never gives: what layer-fm's ``hit_map`` caps.

Far from the core Geant4's hits are single particles of a few MeV, whatever the ring's count; a generator that draws
a ring's share and its hit count apart can put a large share on one or two hits there, a far hot spot that widens
the r and x/y moments, adds a peak and can be the hottest cell. For every hit ring (layer l, ring r, n >= 1 cells
above 0) this script takes its energy per hit over E_inc, E_ring / (n E_inc), and compares it with a cap measured on
a Geant4 training file: the 99.5th percentile of the same quantity among the training rings of the same
incident-energy bin (5 bins of equal counts), layer, ring and count class floor(log2 n) (where at least 40 such
rings exist; elsewhere no cap). Per file: the fraction of hit rings above the cap (Geant4's own test file gives its
level, ~0.5 % and a little more for the bins' spread), the number above 3x the cap, and that number per ring::

    .venv/bin/python benchmarks/far_hits.py --train train.h5 --reference test.h5 --candidate gen.h5 \\
        --out benchmarks/results/far_hits_par04-ds2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fastshower.errors import FastshowerError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_angular import read_polar  # one reader of polar files for the diagnostics

#: the cap's percentile, its fewest rings, the count classes (1, 2-3, 4-7, 8-15, 16+) and incident-energy bins
LEVEL, MIN_RINGS, CLASSES, BINS = 99.5, 40, 5, 5


def rings_of(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Energy per hit over E_inc (N, L, R), hit count (N, L, R) and E_inc (N,) MeV of a polar file's showers."""
    batch, geometry, (a, r) = read_polar(path)
    cells = np.asarray(batch.showers, dtype=np.float64).reshape(-1, len(geometry.layers), a, r)
    e = np.asarray(batch.energies, dtype=np.float64).reshape(-1)
    n = (cells > 0).sum(2)
    return cells.sum(2) / np.maximum(n, 1) / e[:, None, None], n, e


def count_class(n: np.ndarray) -> np.ndarray:
    """Hit counts (...) -> class floor(log2 n), at most CLASSES - 1 (0 for n = 0, which no cap reads)."""
    return np.clip(np.floor(np.log2(np.maximum(n, 1) + 0.5)), 0, CLASSES - 1).astype(int)


def caps(train: Path) -> tuple[np.ndarray, np.ndarray]:
    """Incident-energy bin edges (BINS + 1,) and caps (BINS, L, R, CLASSES) of a Geant4 training file (inf: none)."""
    per_hit, n, e = rings_of(train)
    edges = np.quantile(e, np.linspace(0.0, 1.0, BINS + 1))
    edges[0], edges[-1] = 0.0, np.inf
    out = np.full((BINS, *per_hit.shape[1:], CLASSES), np.inf)
    group = count_class(n)
    for b in range(BINS):
        sel = (e >= edges[b]) & (e < edges[b + 1])
        for k in range(CLASSES):
            inside = (group[sel] == k) & (n[sel] > 0)
            values = np.where(inside, per_hit[sel], np.nan)
            enough = inside.sum(0) >= MIN_RINGS
            if enough.any():
                q = np.nanpercentile(values[:, enough], LEVEL, axis=0)
                out[b, :, :, k][enough] = q
    return edges, out


def far_hits(path: Path, edges: np.ndarray, cap: np.ndarray) -> dict[str, Any]:
    """The measures of one file against the caps."""
    per_hit, n, e = rings_of(path)
    b = np.clip(np.searchsorted(edges, e, side="right") - 1, 0, BINS - 1)
    layer, ring = np.indices(per_hit.shape[1:])
    limit = cap[b[:, None, None], layer[None], ring[None], count_class(n)]
    hit = n > 0
    far = hit & (per_hit > 3 * limit)
    return {"n": len(e), "hit_rings": int(hit.sum()),
            "fraction_above_cap": round(float((hit & (per_hit > limit)).sum() / max(int(hit.sum()), 1)), 5),
            "above_3x_cap": int(far.sum()), "above_3x_cap_per_ring": far.sum(axis=(0, 1)).tolist(),
            "showers_with_one_above_3x": int(far.any(axis=(1, 2)).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, required=True, help="Geant4 file the caps are measured on")
    ap.add_argument("--reference", type=Path, required=True, help="an independent Geant4 file: the caps' own level")
    ap.add_argument("--candidate", type=Path, action="append", default=[], help="generated files (repeatable)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    try:
        edges, cap = caps(args.train)
        files = {"reference": args.reference, **{p.stem: p for p in args.candidate}}
        measures = {k: far_hits(p, edges, cap) for k, p in files.items()}
    except FastshowerError as exc:  # a missing or non-polar file: one line, exit status 2, nothing written
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    result = {"train": str(args.train), "level_percent": LEVEL, "min_rings": MIN_RINGS, "files": measures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for k, v in measures.items():
        print(f"{k:55s} above cap {100 * v['fraction_above_cap']:.2f} %  above 3x {v['above_3x_cap']:4d} "
              f"in {v['showers_with_one_above_3x']} showers  per ring {v['above_3x_cap_per_ring']}")


if __name__ == "__main__":
    main()
