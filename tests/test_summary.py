"""fastshower.validate.summary.physics_summary: the terminal table states the file's own physics.

Every number the table prints is recomputed here from the file's showers (visible fraction, its spread,
layer fractions, <Xmax>), so the test pins what the table means, not how it happens to look.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fastshower.geometry import CartesianSegmentation, Geometry, ReadoutLayer, get_geometry
from fastshower.io import ShowerBatch, ShowerFile, ShowerWriter, write_showers
from fastshower.validate.summary import energy_groups, physics_summary
from toy_showers import make_toy_file, tiny_geometry, toy_showers


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows keyed by their energy label (the fields after the label, split on blanks)."""
    out = {}
    for line in text.splitlines()[2:]:
        fields = line.split()
        unit = fields.index("GeV") if "GeV" in fields else fields.index("eV")
        out[" ".join(fields[: unit + 1])] = fields[unit + 1:]
    return out


def _expected(path: Path) -> dict[float, dict[str, object]]:
    """Per incident energy (MeV): N, mean E_vis/E_inc, its relative spread and the mean layer fractions."""
    with ShowerFile(path, require_complete=False) as f:
        batch, geo = f.read(), f.geometry
    out: dict[float, dict[str, object]] = {}
    for e in np.unique(batch.energies):
        s = batch.showers[batch.energies == e].astype(np.float64)
        layers = np.stack([s[:, geo.layer_slice(i)].sum(1) for i in range(geo.n_layers)], 1)
        frac = layers.sum(1) / e
        out[float(e)] = {"n": len(frac), "mean": frac.mean(), "spread": frac.std() / frac.mean(),
                         "layers": (layers / layers.sum(1, keepdims=True)).mean(0)}
    return out


def test_discrete_energies(tmp_path: Path) -> None:
    path = make_toy_file(tmp_path / "toy.h5", tiny_geometry(), 300, energies_gev=(1.0, 2.0, 5.0), seed=3)
    text = physics_summary(path)
    assert text.splitlines()[0] == f"physics summary of {path} (tiny-2x4x4):"
    assert "layer fractions" in text.splitlines()[1]
    rows = _rows(text)
    assert list(rows) == ["1 GeV", "2 GeV", "5 GeV"]
    for (energy, exp), (label, fields) in zip(_expected(path).items(), rows.items(), strict=True):
        assert label == f"{energy / 1e3:.3g} GeV"
        n, mean, spread, *layers = fields
        assert int(n) == exp["n"] == 100
        assert float(mean) == pytest.approx(exp["mean"], abs=6e-5)
        assert 0.85 < float(mean) < 1.0  # the toy deposits ~93 % of E_inc
        assert float(spread.rstrip("%")) / 100 == pytest.approx(exp["spread"], abs=6e-5)
        assert [float(x) for x in layers] == pytest.approx(exp["layers"], abs=6e-4)
        assert sum(float(x) for x in layers) == pytest.approx(1.0, abs=2e-3)


def test_continuous_spectrum_is_cut_into_six_log_bins(tmp_path: Path) -> None:
    geo = tiny_geometry()
    rng = np.random.default_rng(4)
    e = np.geomspace(1e3, 1e5, 120)
    path = write_showers(tmp_path / "cont.h5", geo, ShowerBatch(e, toy_showers(geo, e, None, rng)), "e-", "toy")
    rows = _rows(physics_summary(path))
    assert len(rows) == 6
    assert sum(int(fields[0]) for fields in rows.values()) == 120
    labels = list(rows)
    first, last = labels[0], labels[-1]
    assert first.startswith("1-") and last.endswith("-100 GeV")
    # log-spaced bins over a log-uniform spectrum: equal shares
    assert [int(fields[0]) for fields in rows.values()] == [20] * 6


def test_energy_groups_labels_and_indices() -> None:
    idx, labels = energy_groups(np.array([2000.0, 500.0, 2000.0, 1000.0]))
    assert labels == ["0.5 GeV", "1 GeV", "2 GeV"]
    assert idx.tolist() == [2, 0, 2, 1]
    idx, labels = energy_groups(np.array([1e11, 1e12]), unit="eV")
    assert labels == ["1e+17 eV", "1e+18 eV"]


def test_many_layers_hide_layer_fractions_and_partial_files_are_read(tmp_path: Path) -> None:
    layer = ReadoutLayer("G4_W", 3.5, "G4_Si", 0.5, 5, CartesianSegmentation(2, 2, 10.0, 10.0))
    geo = Geometry(name="seven", description="7 layers", source="tests", layers=(layer,) * 7, energy="1:10")
    e = np.full(40, 3000.0)
    showers = toy_showers(geo, e, None, np.random.default_rng(5))
    with ShowerWriter(tmp_path / "partial.h5", geo, "e-", "toy", n_target=100) as w:
        w.append(ShowerBatch(e, showers))  # 40 of 100: the file stays incomplete
    text = physics_summary(tmp_path / "partial.h5")
    assert "layer fractions" not in text
    rows = _rows(text)
    assert list(rows) == ["3 GeV"]
    n, mean, _spread = rows["3 GeV"]
    assert int(n) == 40
    assert float(mean) == pytest.approx(showers.astype(np.float64).sum(1).mean() / 3000.0, abs=6e-5)


def test_air_shower_profiles_report_xmax(tmp_path: Path) -> None:
    geo = get_geometry("airshower-profile")
    rng = np.random.default_rng(6)
    e = np.repeat([1e11, 1e12], 30)  # MeV: 1e17 and 1e18 eV
    xmax = rng.normal(700.0, 40.0, 60) + 50 * (e > 5e11)
    batch = ShowerBatch(e, rng.random((60, geo.n_voxels)).astype(np.float32), truth={"xmax": xmax[:, None]})
    path = write_showers(tmp_path / "air.h5", geo, batch, "p", "toy profiles")
    text = physics_summary(path)
    assert text.splitlines()[0] == f"physics summary of {path} (airshower-profile, p):"
    rows = _rows(text)
    assert list(rows) == ["1e+17 eV", "1e+18 eV"]
    for fields, sel in zip(rows.values(), (e < 5e11, e > 5e11), strict=True):
        assert [int(fields[0]), float(fields[1]), float(fields[2])] == pytest.approx(
            [30, xmax[sel].mean(), xmax[sel].std()], abs=0.06)
    no_truth = write_showers(tmp_path / "air0.h5", geo, ShowerBatch(e, batch.showers), "p", "toy profiles")
    assert physics_summary(no_truth) == f"60 profiles of airshower-profile in {no_truth} (no truth/xmax to summarise)"
