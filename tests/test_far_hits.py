"""benchmarks/far_hits.py: a ring whose energy per hit the reference (here a constructed file) never gives is found."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from benchmark_scripts import load_benchmark
from fastshower.geometry import Geometry, PolarSegmentation, ReadoutLayer
from fastshower.io import ShowerBatch, write_showers

POLAR = Geometry(name="polar-3x3x4", description="test", source="tests", energy="10:100",
                 layers=tuple(ReadoutLayer("G4_W", 3.5, "G4_Si", 0.5, 2, PolarSegmentation((0.0, 3.0, 8.0, 20.0), 4))
                              for _ in range(3)))


def _far_hits() -> ModuleType:
    return load_benchmark("far_hits")


def _showers(path: Path, n: int, seed: int, hot: bool = False) -> Path:
    """A polar file of n showers (3 layers x 4 angles x 3 rings, E_inc 10-100 GeV): the core ring holds most of the
    energy, the middle ring half its cells, the outer ring 0-2 single particles of 7 MeV; with ``hot`` every 10th
    shower's outer ring in layer 1 holds one hit of 30 % of E_inc instead."""
    rng = np.random.default_rng(seed)
    e = np.exp(rng.uniform(np.log(1e4), np.log(1e5), n))
    x = np.zeros((n, 3, 4, 3))
    x[..., 0] = 0.2 * e[:, None, None] * rng.uniform(0.5, 1.5, (n, 3, 4))
    x[..., 1] = 0.01 * e[:, None, None] * rng.uniform(0.5, 1.5, (n, 3, 4)) * (rng.random((n, 3, 4)) < 0.5)
    x[..., 2] = 7.0 * (rng.random((n, 3, 4)).argsort(2) < rng.integers(0, 3, (n, 3, 1)))
    if hot:
        x[::10, 1, :, 2] = 0.0
        x[::10, 1, 0, 2] = 0.3 * e[::10]
    return write_showers(path, POLAR, ShowerBatch(e, x.reshape(n, -1)), "e-", "test")


def test_far_hot_hits_stand_out_against_the_reference_s_caps(tmp_path: Path) -> None:
    """Caps from one file: an independent file of the same kind has under 2 % of its hit rings above them and none
    above 3x; the same kind of file with one hit of 30 % of E_inc in layer 1's outer ring of every 10th shower has
    each of those above 3x, in ring 2."""
    fh = _far_hits()
    edges, cap = fh.caps(_showers(tmp_path / "train.h5", 3000, seed=1))
    good = fh.far_hits(_showers(tmp_path / "ref.h5", 3000, seed=2), edges, cap)
    worse = fh.far_hits(_showers(tmp_path / "bad.h5", 3000, seed=2, hot=True), edges, cap)
    assert good["fraction_above_cap"] < 0.02 and good["above_3x_cap"] == 0, good
    assert worse["above_3x_cap_per_ring"] == [0, 0, 300] and worse["showers_with_one_above_3x"] == 300, worse


def test_a_file_that_is_not_polar_is_one_line_and_status_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    fh = _far_hits()
    monkeypatch.setattr(sys, "argv", ["far_hits.py", "--train", str(tmp_path / "none.h5"), "--reference",
                                      str(tmp_path / "none.h5"), "--out", str(tmp_path / "out.json")])
    with pytest.raises(SystemExit) as exc:
        fh.main()
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out.json").exists()
