"""benchmarks/depth_structure.py: layers linked through the depth are told from independent ones, and only by that."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from benchmark_scripts import load_benchmark
from fastshower.geometry import Geometry, PolarSegmentation, ReadoutLayer
from fastshower.io import ShowerBatch, write_showers

DEEP = Geometry(name="polar-12x3x4", description="test", source="tests", energy="10:100",
                layers=tuple(ReadoutLayer("G4_W", 3.5, "G4_Si", 0.5, 2, PolarSegmentation((0.0, 3.0, 8.0, 20.0), 4))
                             for _ in range(12)))


def _showers(path: Path, n: int, seed: int, linked: bool) -> Path:
    """n showers (E_inc 10-100 GeV, 12 layers of 12 cells, 7 MeV per hit) whose every layer has k = 1..12 hit cells:
    with ``linked`` one k per shower for all its layers, else one k per layer (the same marginals)."""
    rng = np.random.default_rng(seed)
    e = np.exp(rng.uniform(np.log(1e4), np.log(1e5), n))
    k = rng.integers(1, 13, (n, 1 if linked else 12, 1))
    x = 7.0 * (rng.random((n, 12, 12)).argsort(2) < k)
    return write_showers(path, DEEP, ShowerBatch(e, x.reshape(n, -1)), "e-", "test")


def test_linked_layers_are_told_from_independent_ones_by_their_links_alone(tmp_path: Path) -> None:
    """Reference: one hit count per shower through all layers (sparsity correlation 1 at every distance);
    candidate: one per layer (correlation ~0), so the total hit count spreads less. The sparsity classifier tells
    them apart as they are (AUC > 0.8) and not once each layer is shuffled within its energy bin (< 0.6), since
    their marginals are the same; a second linked file stays at the floor both ways."""
    ds = load_benchmark("depth_structure")
    ref = _showers(tmp_path / "ref.h5", 3000, seed=1, linked=True)
    twin = _showers(tmp_path / "twin.h5", 3000, seed=2, linked=True)
    loose = _showers(tmp_path / "loose.h5", 3000, seed=3, linked=False)
    out = ds.measure(ref, [twin, loose], seed=0)
    top = "50-70 GeV"
    assert out["reference"]["correlation_by_distance"][top]["sparsity"]["5"] > 0.99
    assert abs(out["loose"]["correlation_by_distance"][top]["sparsity"]["5"]) < 0.15
    assert out["loose"]["correlation_by_distance"][top]["sparsity"]["25"] is None  # no two layers 25 apart
    # 12 layers of one count vary as one count does; 12 independent ones average out (std / mean: 0.54 vs ~0.16)
    spread = {k: out[k]["correlation_by_distance"][top]["hits"]["total_spread"] for k in ("reference", "loose")}
    assert spread["reference"] > 0.45 > 0.25 > spread["loose"], spread
    assert out["loose"]["sparsity_auc"]["as_is"] > 0.8 and out["loose"]["sparsity_auc"]["shuffled"] < 0.6
    assert max(out["twin"]["sparsity_auc"].values()) < 0.6, out["twin"]


def test_a_missing_file_is_one_line_and_status_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ds = load_benchmark("depth_structure")
    monkeypatch.setattr(sys, "argv", ["depth_structure.py", "--reference", str(tmp_path / "none.h5"),
                                      "--out", str(tmp_path / "out.json")])
    with pytest.raises(SystemExit) as exc:
        ds.main()
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out.json").exists()
