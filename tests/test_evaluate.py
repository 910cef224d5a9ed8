"""Acceptance tests of fastshower.validate.evaluate.

The fixture ``pair`` gives two independent Geant4 files of one configuration (belle2-ecl-5x5, e-, 1 GeV,
different seeds), simulated once per test module (~30 s on 2 cores); set FASTSHOWER_REFERENCE and
FASTSHOWER_REFERENCE2 to run the same checks on other files of one configuration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fastshower.errors import FastshowerError
from fastshower.geometry import get_geometry
from fastshower.io import ShowerBatch, ShowerFile, write_showers
from fastshower.montecarlo.run import simulate
from fastshower.validate.evaluate import METRICS, EvaluationConfig, ValidationInputError, evaluate
from fastshower.validate.synthetic import write_synthetic

GEO = get_geometry("belle2-ecl-5x5")
N = 4000
FAST = EvaluationConfig(n_boot=5, fpd_batches=3, fpd_points=3, kpd_batches=3, kpd_batch_size=1000)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    a, b = os.environ.get("FASTSHOWER_REFERENCE"), os.environ.get("FASTSHOWER_REFERENCE2")
    if a and b:
        return Path(a), Path(b)
    d = tmp_path_factory.mktemp("pair")
    files = (d / "g4_seed1.h5", d / "g4_seed2.h5")
    for seed, path in enumerate(files, start=1):
        simulate(GEO, "e-", "1", N, path, seed=seed, jobs=2, progress=False)
    return files


def _transformed(src: Path, dst: Path, kind: str, seed: int = 0) -> Path:
    with ShowerFile(src) as f:
        b = f.read()
        s = b.showers.copy()
        if kind == "scale":
            s *= 1.05
        else:
            rng = np.random.default_rng(seed)
            s = np.take_along_axis(s, rng.random(s.shape).argsort(axis=1), axis=1)
        return write_showers(dst, f.geometry, ShowerBatch(b.energies, s, b.conditions), f.particle, kind)


def test_same_distribution(pair: tuple[Path, Path], tmp_path: Path) -> None:
    r = evaluate(pair[0], pair[1], tmp_path, metrics=["separation_power", "classifier_low"], progress=False,
                 config=FAST, report=False)
    assert r["classifier"]["low"]["auc"] <= 0.56
    assert max(v for v in r["separation_power"].values() if v is not None) < 0.02
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["n_reference"] == saved["n_candidate"] > 0


def test_scaled_energies(pair: tuple[Path, Path], tmp_path: Path) -> None:
    cand = _transformed(pair[1], tmp_path / "scaled.h5", "scale")
    r = evaluate(pair[0], cand, tmp_path / "out", metrics=["separation_power", "classifier_high"], progress=False,
                 config=FAST, report=False)
    assert r["classifier"]["high"]["auc"] >= 0.9
    assert r["separation_power"]["E_tot/E_inc"] >= 0.2


def test_shuffled_voxels(pair: tuple[Path, Path], tmp_path: Path) -> None:
    cand = _transformed(pair[1], tmp_path / "shuffled.h5", "shuffle")
    r = evaluate(pair[0], cand, tmp_path / "out", metrics=["classifier_low"], progress=False, config=FAST,
                 report=False)
    assert r["classifier"]["low"]["auc"] >= 0.95


def test_bad_inputs(pair: tuple[Path, Path], tmp_path: Path) -> None:
    other = write_synthetic(tmp_path / "ild.h5", get_geometry("par04-ds2"), np.full(5, 1000.0), seed=3)
    with pytest.raises(ValidationInputError, match="different geometries") as exc:
        evaluate(pair[0], other, tmp_path / "o1", progress=False)
    assert str(pair[0]) in str(exc.value) and str(other) in str(exc.value)
    empty = write_showers(tmp_path / "empty.h5", GEO, ShowerBatch(np.zeros(0), np.zeros((0, 25))), "e-", "x")
    with pytest.raises(ValidationInputError) as exc:
        evaluate(pair[0], empty, tmp_path / "o2", progress=False)
    assert str(pair[0]) in str(exc.value) and str(empty) in str(exc.value)
    far = write_synthetic(tmp_path / "far.h5", GEO, np.full(50, 50_000.0), seed=4)
    with pytest.raises(ValidationInputError, match="no overlapping energy") as exc:
        evaluate(pair[0], far, tmp_path / "o3", progress=False)
    assert str(pair[0]) in str(exc.value) and str(far) in str(exc.value)
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(pair[0], pair[1], tmp_path / "o4", metrics=["nope"], progress=False)


def test_input_errors_are_fastshower_errors(tmp_path: Path) -> None:
    assert issubclass(ValidationInputError, FastshowerError) and issubclass(ValidationInputError, ValueError)
    ref = write_synthetic(tmp_path / "belle.h5", GEO, np.full(5, 1000.0), seed=1)
    other = write_synthetic(tmp_path / "ild.h5", get_geometry("par04-ds2"), np.full(5, 1000.0), seed=2)
    with pytest.raises(FastshowerError, match="different geometries"):
        evaluate(ref, other, tmp_path / "out", progress=False)
    with pytest.raises(ValidationInputError, match="energy_bins needs at least two edges"):
        evaluate(ref, ref, tmp_path / "out", energy_bins=[1000.0], progress=False)
    assert not (tmp_path / "out").exists()


def test_streaming_chunks_equal_one_shot(pair: tuple[Path, Path], tmp_path: Path) -> None:
    kw = {"metrics": ["separation_power", "chi2"], "progress": False, "report": False}
    a = evaluate(pair[0], pair[1], tmp_path / "a", config=EvaluationConfig(chunk_size=100_000, n_boot=2), **kw)
    b = evaluate(pair[0], pair[1], tmp_path / "b", config=EvaluationConfig(chunk_size=333, n_boot=2), **kw)
    assert a["separation_power"] == b["separation_power"] and a["chi2_ndf"] == b["chi2_ndf"]


@pytest.mark.slow
def test_full_report_with_floor_and_energy_bins(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    e_ref = rng.choice([500.0, 1000.0, 1500.0, 2000.0, 2500.0], 6000)
    ref = write_synthetic(tmp_path / "r.h5", GEO, e_ref, seed=1)
    cand = write_synthetic(tmp_path / "c.h5", GEO, e_ref, seed=2)
    r = evaluate(ref, cand, tmp_path / "out", floor=True, progress=False)
    assert set(r["metrics"]) == set(METRICS)
    assert [row["label"] for row in r["per_energy"]][3] == "2 GeV"
    for key in ("fpd", "kpd"):
        assert {"value", "error"} <= set(r[key]) and {"value", "error"} <= set(r["floor"][key])
    assert r["floor"]["classifier"]["low"]["auc"] < 0.56
    assert (tmp_path / "out" / "plots" / "images_00.png").exists()
    assert (tmp_path / "out" / "report.html").exists()
