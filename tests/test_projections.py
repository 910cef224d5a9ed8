"""The 3DGAN papers' projection checks (fastshower.validate.projections) and their place in evaluate()."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastshower.validate.evaluate import EvaluationConfig, evaluate
from fastshower.validate.observables import _voxel_tables, compute_observables, observable_names
from fastshower.validate.projections import MOMENTS, applies, axis_profiles, projection_checks, shower_moments
from toy_showers import make_toy_file, tiny_geometry, toy_showers

FAST = EvaluationConfig(n_boot=2)


def test_profiles_of_a_known_image() -> None:
    geo = tiny_geometry()  # 2 layers of 4 x 4
    img = np.zeros((2, 4, 4))
    img[0, 1, 2] = 3.0  # layer 0, row (y) 1, column (x) 2
    img[1, 3, 0] = 1.0
    p = axis_profiles(img.ravel(), geo)
    np.testing.assert_allclose(p["x"], [0.25, 0, 0.75, 0])
    np.testing.assert_allclose(p["y"], [0, 0.75, 0, 0.25])
    np.testing.assert_allclose(p["z"], [0.75, 0.25])
    assert applies(geo)


def test_moments_from_observables_equal_the_voxel_sums() -> None:
    geo = tiny_geometry()
    rng = np.random.default_rng(0)
    s = toy_showers(geo, np.full(50, 2000.0), rng.uniform(-5, 5, (50, 2)), rng).astype(np.float64)
    obs = compute_observables(s, np.full(50, 2000.0), geo)
    names = observable_names(geo)
    m = shower_moments(np.stack([obs[k] for k in names], axis=1), names, geo.n_layers)
    t = _voxel_tables(geo)
    e = s.sum(1)
    for ax in ("x", "y", "z"):
        c = t[ax]
        mean = s @ c / e
        rms = np.sqrt(np.clip(s @ (c * c) / e - mean**2, 0, None))
        np.testing.assert_allclose(m[f"{ax}_mean"], mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(m[f"{ax}_rms"], rms, rtol=1e-7, atol=1e-7)


def test_identical_samples_score_zero() -> None:
    geo = tiny_geometry()
    rng = np.random.default_rng(1)
    s = toy_showers(geo, np.full(40, 2000.0), None, rng).astype(np.float64)
    names = observable_names(geo)
    obs = compute_observables(s, np.full(40, 2000.0), geo)
    high = np.stack([obs[k] for k in names], axis=1)
    img = (s / 2000.0).mean(0)
    r = projection_checks(geo, names, img, img, high, high)
    assert r["max_profile_separation"] == 0 and r["max_moment_separation"] == 0
    assert set(r["moments"]) == set(MOMENTS) and r["profiles"]["x"]["max_rel_dev"] == 0


def test_evaluate_reports_projections_with_a_floor(tmp_path: Path) -> None:
    geo = tiny_geometry()
    ref = make_toy_file(tmp_path / "r.h5", geo, 600, seed=1, position=False)
    cand = make_toy_file(tmp_path / "c.h5", geo, 600, seed=2, position=False, n_hits=40)
    r = evaluate(ref, cand, tmp_path / "out", metrics=["projections"], floor=True, progress=False, config=FAST)
    pr = r["projections"]
    assert set(pr["profiles"]) == {"x", "y", "z"} and set(pr["moments"]) == set(MOMENTS)
    for p in pr["profiles"].values():
        assert len(p["reference"]) in (2, 4) and abs(sum(p["candidate"]) - 1) < 1e-9
        assert 0 <= p["floor_separation_power"] < 0.05
    # fewer hits per shower: the same mean profile, broader per-shower moment distributions
    assert pr["moments"]["x_rms"]["separation_power"] > pr["moments"]["x_rms"]["floor_separation_power"]
    assert "x profile separation power" in (tmp_path / "out" / "report.html").read_text()
