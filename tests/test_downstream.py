"""Downstream reconstruction check: an energy regressor trained on MC, applied to MC and to a candidate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastshower.validate.downstream import (
    DownstreamConfig,
    DownstreamInputError,
    downstream_study,
    particle_condition,
    particle_features,
    particle_study,
    particle_study_from_files,
    response_stats,
)
from fastshower.validate.observables import compute_observables, observable_names
from toy_showers import make_toy_file, tiny_geometry, toy_showers

LABELS = ["1 GeV", "2 GeV", "5 GeV"]


def _sample(n: int, seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Toy showers at 1, 2, 5 GeV as (observables (n, d), E_inc (n,) MeV, energy bin (n,)), deposits x ``scale``."""
    geo, rng = tiny_geometry(), np.random.default_rng(seed)
    e = rng.choice([1000.0, 2000.0, 5000.0], n)
    s = toy_showers(geo, e, None, rng, n_hits=40).astype(np.float64) * scale
    obs = compute_observables(s, e, geo)
    return np.stack([obs[k] for k in observable_names(geo)], axis=1), e, np.searchsorted([1000, 2000, 5000], e)


@pytest.fixture(scope="module")
def ref() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _sample(4000, 1)


def _study(ref: tuple, cand: tuple) -> dict:
    return downstream_study(ref, cand, observable_names(tiny_geometry()), LABELS, DownstreamConfig(max_iter=100), 0)


def test_independent_mc_agrees_within_errors(ref: tuple) -> None:
    out = _study(ref, _sample(2000, 2))
    assert out["n_train"] == 2000 and "E_layer_0/E_tot" in out["features"]
    # the target does not leak, and no absolute energy lets the trees learn the training energies
    assert not any("E_inc" in f for f in out["features"]) and "E_tot" not in out["features"]
    for row in out["per_energy"]:
        assert row["reference_n"] > 400 and row["candidate_n"] > 400
        assert abs(row["reference_bias"]) < 0.02  # the regressor reconstructs held-out MC without bias
        assert 0 < row["reference_resolution"] < 0.2
        assert abs(row["bias_significance"]) < 4 and abs(row["resolution_significance"]) < 4
    assert abs(out["all"]["bias_difference"]) < 4 * out["all"]["bias_difference_error"]


def test_scaled_candidate_shows_its_bias(ref: tuple) -> None:
    out = _study(ref, _sample(2000, 2, scale=1.1))
    for row in out["per_energy"]:
        assert row["bias_difference"] == pytest.approx(0.10, abs=0.02)
        assert row["bias_significance"] > 10
        # the resolution scales with the deposits too: 10 % wider, not more
        assert row["candidate_resolution"] == pytest.approx(1.1 * row["reference_resolution"], rel=0.2)


def test_response_stats_errors() -> None:
    r = np.random.default_rng(0).normal(1.05, 0.1, 10_000)
    s = response_stats(r, 10)
    assert s["bias"] == pytest.approx(0.05, abs=0.004) and s["resolution"] == pytest.approx(0.1, rel=0.03)
    assert s["bias_error"] == pytest.approx(0.001, rel=0.05)
    assert np.isnan(response_stats(r[:5], 10)["bias"])  # too few showers: no number


def test_cli_evaluate_downstream(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from fastshower.cli import main

    geo = tiny_geometry()
    ref_f = make_toy_file(tmp_path / "ref.h5", geo, 3000, seed=1, position=False, n_hits=40)
    cand_f = make_toy_file(tmp_path / "cand.h5", geo, 1500, seed=3, position=False, n_hits=40)
    out = tmp_path / "eval"
    assert main(["evaluate", "--reference", str(ref_f), "--candidate", str(cand_f), "--out", str(out), "--quiet",
                 "--metrics", "separation_power", "--downstream"]) == 0
    down = json.loads((out / "metrics.json").read_text())["downstream"]
    assert down["n_train"] == 1500 and [r["label"] for r in down["per_energy"]] == ["1 GeV", "2 GeV", "5 GeV"]
    assert all(abs(r["bias_significance"]) < 4 for r in down["per_energy"])
    assert (out / "plots" / "downstream.png").stat().st_size > 0
    page = (out / "report.html").read_text()
    assert "Downstream reconstruction" in page and "bias_difference" in page
    capsys.readouterr()


@pytest.fixture(scope="module")
def two_particles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Merged toy files of two 'particles' that overlap (showers of 40 hits, labelled 0, and of 60, labelled 1):
    a reference, an independent one, and one with the labels exchanged."""
    from fastshower.io import merge_files

    d, geo = tmp_path_factory.mktemp("particles"), tiny_geometry()
    out = {}
    for name, seeds, values in (("ref", (1, 2), (0.0, 1.0)), ("mc", (3, 4), (0.0, 1.0)),
                                ("swapped", (5, 6), (1.0, 0.0))):
        parts = [make_toy_file(d / f"{name}_{k}.h5", geo, 1500, seed=s, position=False, n_hits=h)
                 for k, s, h in (("a", seeds[0], 40), ("b", seeds[1], 60))]
        labels = {str(p): v for p, v in zip(parts, values, strict=True)}
        out[name] = merge_files(parts, d / f"{name}.h5", condition_values=labels)
    return out


def test_particle_classifier_agrees_on_mc_and_sees_swapped_labels(two_particles: dict[str, Path]) -> None:
    cfg = DownstreamConfig(max_iter=50)
    mc = particle_study_from_files(two_particles["ref"], two_particles["mc"], None, "primary", cfg, 0)
    assert mc["classes"] == [0.0, 1.0] and 0.6 < mc["reference_auc"] < 0.99  # the two overlap
    assert all(abs(r["efficiency_significance"]) < 3.5 for r in mc["per_class"])
    sw = particle_study_from_files(two_particles["ref"], two_particles["swapped"], None, "primary", cfg, 0)
    assert sw["candidate_auc"] == pytest.approx(1 - sw["reference_auc"], abs=0.05)
    assert all(r["efficiency_significance"] < -10 for r in sw["per_class"])


def test_particle_classifier_needs_labels(tmp_path: Path) -> None:
    f = make_toy_file(tmp_path / "one.h5", tiny_geometry(), 100, seed=1, position=False)
    assert particle_condition(["position"]) is None and particle_condition(["zenith", "primary"]) == "primary"
    with pytest.raises(DownstreamInputError, match="no 'primary' condition"):
        particle_features(f, None, "primary", 100)
    x, y = np.zeros((10, 3)), np.zeros(10)
    assert "error" in particle_study((x, y), (x, y), DownstreamConfig(), 0)  # one particle: nothing to classify


def test_cli_evaluate_downstream_identifies_particles(two_particles: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from fastshower.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--reference", str(two_particles["ref"]), "--candidate", str(two_particles["mc"]),
                 "--out", str(out), "--quiet", "--metrics", "separation_power", "--downstream"]) == 0
    pc = json.loads((out / "metrics.json").read_text())["downstream"]["particle_classifier"]
    assert pc["condition"] == "primary" and len(pc["per_class"]) == 2
    assert "Particle identification" in (out / "report.html").read_text()
    capsys.readouterr()
