"""The angular structure of a polar shower's core: what the high-level classifier's n_peaks feels.

On a polar readout (par04) Geant4's core sits off the axis by a fraction of a cell, in one direction through
the layers, so the depth-summed inner ring has a dipole; a generator that draws the core's cells as
independent noise has none and its summed image more local maxima. For each file, in an incident-energy
window, this script measures on the inner ring (ring 0) summed over depth and normalised to 1 per shower:

- ``power_k``: the mean angular power |FFT_k|^2 / A at k = 1, 2, 3 (x 1e3);
- ``aligned_dipole_share``: the share of the k = 1 power that the mean pattern holds once every shower is
  turned into the frame of its dipole (:func:`fastshower.models.layer_fm.align_cells`): how much of the
  dipole a model that learns aligned showers gets from its per-cell means alone;
- ``coherence``: per shower |sum_l d_l| / sum_l |d_l| of the per-layer ring-0 dipoles d_l over ``--layers``
  (1: every layer leans the same way; about 1 / sqrt(n) for independent directions), the mean;
- ``n_peaks``: the mean of fastshower's n_peaks observable (local maxima of the depth-summed image).

    .venv/bin/python benchmarks/core_angular.py --reference test.h5 --floor floor.h5 --candidate gen.h5 \\
        --out benchmarks/results/core_angular_par04-ds2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastshower.errors import FastshowerError
from fastshower.geometry import Geometry
from fastshower.io import ShowerBatch, ShowerFile
from fastshower.models.layer_fm import align_cells
from fastshower.validate.observables import compute_observables


def read_polar(path: Path) -> tuple[ShowerBatch, Geometry, tuple[int, int]]:
    """Every shower of ``path``, its geometry and the (A, R) cells of each layer; FastshowerError unless the file is
    a polar readout whose layers all have one shape."""
    with ShowerFile(path) as f:
        batch, geometry = f.read(0, f.n), f.geometry
    shapes = {layer.segmentation.shape for layer in geometry.layers}
    if len(shapes) != 1 or geometry.layers[0].segmentation.kind != "polar":
        raise FastshowerError(f"{path} is not a polar readout with one layer shape")
    a, r = next(iter(shapes))
    return batch, geometry, (a, r)


def core_measures(path: Path, window: tuple[float, float], layers: tuple[int, int]) -> dict[str, Any]:
    """The measures of the module docstring for the showers of ``path`` with E_inc (GeV) in ``window``."""
    batch, geometry, (a, r) = read_polar(path)
    e_gev = batch.energies.reshape(-1) / 1e3
    keep = (e_gev >= window[0]) & (e_gev < window[1])
    x = torch.as_tensor(batch.showers[keep], dtype=torch.float64)
    n_layers = len(geometry.layers)
    cells = x.reshape(-1, n_layers, a, r)

    def ring0_power(c: torch.Tensor) -> torch.Tensor:  # (N, A) depth-summed ring 0 -> (N, A // 2 + 1)
        ring = c[..., 0].sum(1)
        ring = ring / ring.sum(1, keepdim=True).clamp_min(1e-30)
        return torch.fft.rfft(ring, dim=1).abs() ** 2 / a

    power = ring0_power(cells).mean(0)
    aligned = align_cells(x, n_layers, a, r).reshape(-1, n_layers, a, r)[..., 0].sum(1)
    mean_pattern = (aligned / aligned.sum(1, keepdim=True).clamp_min(1e-30)).mean(0)
    mean_power = torch.fft.rfft(mean_pattern).abs() ** 2 / a
    ang = (torch.arange(a, dtype=torch.float64) + 0.5) * (2 * np.pi / a)
    d = (cells[:, layers[0] : layers[1], :, 0] * torch.exp(1j * ang)).sum(2)  # (N, layers) complex dipoles
    coherence = d.sum(1).abs() / d.abs().sum(1).clamp_min(1e-30)
    obs = compute_observables(batch.showers[keep], batch.energies.reshape(-1)[keep], geometry)
    return {"file": str(path), "n": int(keep.sum()), **{f"power_k{k}_x1e3": float(power[k]) * 1e3 for k in (1, 2, 3)},
            "aligned_dipole_share": float(mean_power[1] / power[1]), "coherence": float(coherence.mean()),
            "n_peaks": float(np.mean(obs["n_peaks"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--floor", type=Path, help="a second Geant4 file: the same measures, for their spread")
    ap.add_argument("--candidate", type=Path, action="append", default=[], help="generated files (repeatable)")
    ap.add_argument("--window", type=float, nargs=2, default=(10.0, 30.0), metavar=("E_MIN", "E_MAX"),
                    help="incident-energy window, GeV (default 10 30)")
    ap.add_argument("--layers", type=int, nargs=2, default=(5, 15), metavar=("FIRST", "STOP"),
                    help="layers of the dipole coherence, [FIRST, STOP) (default 5 15)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    files = {"reference": args.reference, **({"floor": args.floor} if args.floor else {}),
             **{p.stem: p for p in args.candidate}}
    try:
        measures = {k: core_measures(p, tuple(args.window), tuple(args.layers)) for k, p in files.items()}
    except FastshowerError as exc:  # a missing or non-polar file: one line, exit status 2, nothing written
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    result = {"window_gev": list(args.window), "coherence_layers": list(args.layers), "files": measures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for k, v in result["files"].items():
        print(f"{k:50s} n={v['n']:5d} P1..3 {v['power_k1_x1e3']:.3f} {v['power_k2_x1e3']:.3f} "
              f"{v['power_k3_x1e3']:.3f}  aligned share {v['aligned_dipole_share']:.2f}  "
              f"coherence {v['coherence']:.2f}  n_peaks {v['n_peaks']:.2f}")


if __name__ == "__main__":
    main()
