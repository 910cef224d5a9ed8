"""benchmarks/classifier_seeds.py: the seeds' spread of evaluate's classifier AUCs, near 0.5 for like files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from benchmark_scripts import load_benchmark
from fastshower.geometry import Geometry, PolarSegmentation, ReadoutLayer
from fastshower.io import ShowerBatch, write_showers

RINGS = Geometry(name="polar-4x3x4", description="test", source="tests", energy="10:100",
                 layers=tuple(ReadoutLayer("G4_W", 3.5, "G4_Si", 0.5, 2, PolarSegmentation((0.0, 3.0, 8.0, 20.0), 4))
                              for _ in range(4)))


def _showers(path: Path, n: int, seed: int, scale: float = 1.0) -> Path:
    """n showers (E_inc 10-100 GeV, 4 layers of 12 cells) holding ~E_inc / 2 in exponential cell energies, times
    ``scale``."""
    rng = np.random.default_rng(seed)
    e = np.exp(rng.uniform(np.log(1e4), np.log(1e5), n))
    x = rng.exponential(1.0, (n, 48)) * e[:, None] / 48
    return write_showers(path, RINGS, ShowerBatch(e, scale * x), "e-", "test")


def test_like_files_sit_at_one_half_and_a_scaled_copy_at_one_with_a_seed_spread(tmp_path: Path) -> None:
    """Two independent files of one kind: every classifier's mean AUC over 3 seeds within 0.1 of 0.5; the same kind
    scaled by 1.5: above 0.9; each spread from 3 values, non-negative and under 0.1."""
    cs = load_benchmark("classifier_seeds")
    ref = _showers(tmp_path / "ref.h5", 600, seed=1)
    twin = cs.seed_spread(ref, _showers(tmp_path / "twin.h5", 600, seed=2), seeds=3)
    scaled = cs.seed_spread(ref, _showers(tmp_path / "scaled.h5", 600, seed=2, scale=1.5), seeds=3)
    assert set(twin) >= {"low", "high"}
    for k in twin:
        assert abs(twin[k]["mean"] - 0.5) < 0.1 and len(twin[k]["values"]) == 3, (k, twin[k])
        assert scaled[k]["mean"] > 0.9 and 0.0 <= scaled[k]["std"] < 0.1, (k, scaled[k])


def test_one_seed_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cs = load_benchmark("classifier_seeds")
    monkeypatch.setattr(sys, "argv", ["classifier_seeds.py", "--reference", str(tmp_path / "a.h5"), "--seeds", "1",
                                      "--out", str(tmp_path / "out.json")])
    with pytest.raises(SystemExit) as exc:
        cs.main()
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out.json").exists()
