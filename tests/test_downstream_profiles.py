"""Downstream check for air-shower profiles: energy, Xmax and p-against-Fe reconstructions trained on MC profiles."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from fastshower.airshower import write_synthetic_profiles
from fastshower.validate import downstream_profiles as dp
from fastshower.validate.downstream import auc_with_error, robust_stats
from fastshower.validate.downstream_profiles import (
    ProfileDownstreamConfig,
    observed_profiles,
    profile_downstream_from_files,
)

CFG = ProfileDownstreamConfig(max_iter=100)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic Gaisser-Hillas profiles (p and Fe): a reference and an independent Monte Carlo candidate."""
    d = tmp_path_factory.mktemp("profiles")
    return {"ref": write_synthetic_profiles(d / "ref.h5", 3000, seed=1),
            "mc": write_synthetic_profiles(d / "mc.h5", 1500, seed=2)}


def _edited(src: Path, dst: Path, scale: float = 1.0, swap_primaries: bool = False) -> Path:
    """A copy of ``src`` with every profile x ``scale`` and/or p and Fe labels exchanged."""
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as f:
        f["showers"][...] = f["showers"][...] * scale
        if swap_primaries:
            lna = f["conditions"]["primary"][...]
            f["conditions"]["primary"][...] = np.where(lna > 1, 0.0, math.log(56))
    return dst


def test_robust_stats_ignore_outliers() -> None:
    rng = np.random.default_rng(0)
    d = np.concatenate([rng.normal(0.02, 0.1, 9_800), rng.normal(0, 5.0, 200)])  # 2 % far outliers
    s = robust_stats(d, 10, np.random.default_rng(1))
    assert s["bias"] == pytest.approx(0.02, abs=0.004) and s["resolution"] == pytest.approx(0.1, rel=0.05)
    assert np.std(d) > 0.6  # what the sd would have said
    assert s["resolution_error"] == pytest.approx(0.1 / math.sqrt(2 * 10_000), rel=0.5)
    assert np.isnan(robust_stats(d[:5], 10, np.random.default_rng(1))["bias"])


def test_auc_error_at_one_half_is_hanley_mcneil() -> None:
    labels = np.arange(2000) % 2 == 0
    a, err = auc_with_error(labels, np.random.default_rng(0).random(2000))
    assert a == pytest.approx(0.5, abs=0.04)
    assert err == pytest.approx(math.sqrt(2000 / (12 * 1000 * 1000)), rel=0.05)  # var (n1 + n0) / (12 n1 n0)
    assert auc_with_error(labels, labels.astype(float)) == (1.0, 0.0)


def test_observed_profile_keeps_the_integral_and_empty_bins() -> None:
    dedx = np.zeros((2, 320))
    dedx[:, 10:30] = 5.0
    cfg = ProfileDownstreamConfig(noise=0.0)
    obs = observed_profiles(dedx, 10.0, cfg, np.random.default_rng(0))
    assert obs.shape == (2, 160) and obs.sum() * 20 == pytest.approx(dedx.sum() * 10)
    noisy = observed_profiles(dedx, 10.0, ProfileDownstreamConfig(noise=0.5), np.random.default_rng(0))
    assert (noisy[:, 15:] == 0).all() and (noisy >= 0).all()  # below the profile's end nothing appears
    with pytest.raises(dp.ProfileDownstreamInputError, match="multiple"):
        observed_profiles(dedx, 10.0, ProfileDownstreamConfig(bin_width=15.0), np.random.default_rng(0))


def test_independent_mc_is_reconstructed_alike(files: dict[str, Path]) -> None:
    r = profile_downstream_from_files(files["ref"], files["mc"], None, CFG, 0)
    assert r["classifier"]["reference_auc"] > 0.9  # Gaisser-Hillas p and Fe differ in depth and width
    assert abs(r["classifier"]["auc_significance"]) < 3.5
    for table in (r, r["xmax"]):
        assert abs(table["all"]["bias_significance"]) < 3.5 and abs(table["all"]["resolution_significance"]) < 3.5
    assert r["all"]["reference_resolution"] < 0.1  # the energy is reconstructed to a few per cent
    assert abs(r["all"]["reference_bias"]) < 0.01


def test_scaled_and_mislabelled_candidates_show(files: dict[str, Path], tmp_path: Path) -> None:
    hot = _edited(files["mc"], tmp_path / "hot.h5", scale=1.1)
    r = profile_downstream_from_files(files["ref"], hot, None, CFG, 0)
    assert r["all"]["bias_difference"] == pytest.approx(0.10, abs=0.02) and r["all"]["bias_significance"] > 5
    swapped = _edited(files["mc"], tmp_path / "swapped.h5", swap_primaries=True)
    c = profile_downstream_from_files(files["ref"], swapped, None, CFG, 0)["classifier"]
    assert c["candidate_auc"] == pytest.approx(1 - c["reference_auc"], abs=0.03)


def test_cli_evaluate_downstream_on_profiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fastshower.cli import main

    ref, cand = (write_synthetic_profiles(tmp_path / f"{k}.h5", 600, seed=s) for k, s in (("ref", 3), ("cand", 4)))
    out = tmp_path / "eval"
    assert main(["evaluate", "--reference", str(ref), "--candidate", str(cand), "--out", str(out),
                 "--quiet", "--metrics", "separation_power", "--downstream"]) == 0
    down = json.loads((out / "metrics.json").read_text())["downstream"]
    assert down["kind"] == "air-shower profiles" and len(down["xmax"]["per_energy"]) == 4
    assert (out / "plots" / "downstream_xmax.png").stat().st_size > 0
    page = (out / "report.html").read_text()
    assert "Primary classifier" in page and "Xmax_rec - Xmax" in page
    capsys.readouterr()
