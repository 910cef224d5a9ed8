"""Geant4 physics sanity figures quoted in the README, measured and written as JSON.

- belle2-ecl-5x5, e- 1 GeV: deposited / incident energy (mean, spread) and the centre crystal's share;
- ild-siw-30, gamma 10 and 50 GeV: visible (Si) fraction and its ratio 50/10 GeV (flat within 10 %);
- calogan-3layer, e+ 10 GeV: energy fraction per layer and total / incident;
- ild-siw-30, e- 1, 4, 16 GeV: depth of the longitudinal centre of energy (linear in ln E).

    python benchmarks/geant4_physics.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from fastshower.geometry import get_geometry
from fastshower.io import ShowerFile
from fastshower.montecarlo.run import simulate


def _run(workdir: Path, geometry: str, particle: str, energy: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    out = workdir / f"{geometry}_{particle}_{energy}.h5"
    res = simulate(geometry, particle, energy, n, out, seed=seed, jobs=2, progress=False)
    with ShowerFile(out) as f:
        b = f.read()
    print(f"{geometry} {particle} {energy} GeV: {n} showers, {res.generator}", flush=True)
    return b.energies, b.showers


def _layers(geometry: str, showers: np.ndarray) -> np.ndarray:
    geo = get_geometry(geometry)
    return np.stack([showers[:, geo.layer_slice(i)].sum(1) for i in range(geo.n_layers)], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "geant4_physics.json"))
    args = ap.parse_args()
    result: dict[str, object] = {"benchmark": "geant4_physics"}
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        e, s = _run(w, "belle2-ecl-5x5", "e-", "1", 400, 1)
        r = s.sum(1) / e
        result["belle2_1GeV_e-"] = {"n": len(e), "deposited_over_incident": float(r.mean()),
                                    "relative_spread": float(r.std() / r.mean()),
                                    "centre_crystal_share": float((s[:, 12] / s.sum(1)).mean())}
        fractions, weighted = {}, {}
        ild = get_geometry("ild-siw-30")
        # ILD calibration: each layer's Si energy weighted by its tungsten thickness (layers 21-30: x2)
        weights = np.repeat([layer.absorber_thickness / 2.1 for layer in ild.layers], ild.layer_sizes)
        for energy, n in (("10", 40), ("50", 12)):
            e, s = _run(w, "ild-siw-30", "gamma", energy, n, 2)
            fractions[energy] = float((s.sum(1) / e).mean())
            weighted[energy] = float((s @ weights / e).mean())
        result["ild_gamma_si_fraction"] = {**fractions, "ratio_50_over_10": fractions["50"] / fractions["10"],
                                           "absorber_weighted": weighted,
                                           "absorber_weighted_ratio_50_over_10": weighted["50"] / weighted["10"]}
        e, s = _run(w, "calogan-3layer", "e+", "10", 60, 3)
        layer = _layers("calogan-3layer", s)
        result["calogan_10GeV_e+"] = {"layer_fractions": (layer.sum(0) / layer.sum()).tolist(),
                                      "total_over_incident": float((s.sum(1) / e).mean())}
        z = get_geometry("ild-siw-30").layer_z_centres()
        depth = {}
        for energy in ("1", "4", "16"):
            e, s = _run(w, "ild-siw-30", "e-", energy, 40, 4)
            layer = _layers("ild-siw-30", s)
            depth[energy] = float((layer @ z).sum() / layer.sum())
        result["ild_e-_centre_depth_mm"] = depth
    result["physics"] = "see generator lines above: Geant4 11.4 G4EmStandardPhysics, 0.7 mm cut"
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
