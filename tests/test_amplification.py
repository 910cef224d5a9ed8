"""GAN amplification (arXiv:2008.06545) on toy samples whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from fastshower.validate.amplification import AmplificationConfig, amplification_study, equivalent_size

EDGES = np.array([500.0, 1500.0, 2500.0, 6000.0])  # MeV: one bin per toy energy 1, 2, 5 GeV


def _draw(n: int, rng: np.random.Generator, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Toy showers: features (n, 3) whose mean depends on E_inc (n,) MeV, shifted by ``shift`` sigma."""
    e = rng.choice([1000.0, 2000.0, 5000.0], n)
    x = rng.normal(size=(n, 3)) * 0.05 + 0.9 - 0.01 * np.log(e)[:, None] + shift * 0.05
    return x, e


@pytest.fixture(scope="module")
def samples() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    return {"ref": _draw(200_000, rng), "train": _draw(1_000, rng), "small": _draw(5_000, rng),
            "large": _draw(50_000, rng), "biased": _draw(50_000, rng, shift=0.5)}


def _study(s: dict, gen: str) -> dict:
    return amplification_study(s["ref"], s["train"], s[gen], EDGES, AmplificationConfig(n_repeats=10), seed=0)


def test_independent_draws_amplify_and_grow_with_size(samples: dict) -> None:
    small, large = _study(samples, "small"), _study(samples, "large")
    # an exact generator's G showers are worth about G MC showers: amplification ~ G / N
    assert 2.5 < small["amplification"] < 10
    assert large["amplification"] > 2 * small["amplification"]
    assert small["n_train"] == 1_000 and small["energy_bins_used"] == [0, 1, 2]
    # the MC fit describes the training curve: a/n at n = N within 30 % of the measured MSE
    fit = small["fit_train"]
    assert fit["a"] * (1 / 1_000 + 1 / small["n_reference"]) == pytest.approx(small["mse_train"], rel=0.3)


def test_biased_generator_saturates(samples: dict) -> None:
    biased = _study(samples, "biased")
    assert biased["amplification"] < 1 and not biased["amplification_at_limit"]
    # its curve levels off at a floor far above the MC one
    assert biased["fit_generated"]["floor"] > 10 * biased["fit_train"]["floor"]
    assert biased["amplification_asymptotic"] < 1


def test_equivalent_size_limits() -> None:
    assert equivalent_size(0.01 * (1 / 100 + 1 / 10_000), 0.01, 10_000) == (pytest.approx(100), False)
    assert equivalent_size(0.5e-6, 0.01, 10_000) == (10_000, True)  # below the reference's own floor


def test_cli_evaluate_with_amplification(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from fastshower.cli import main
    from toy_showers import make_toy_file, tiny_geometry

    geo = tiny_geometry()
    ref = make_toy_file(tmp_path / "ref.h5", geo, 6000, seed=1, position=False, n_hits=40)
    train = make_toy_file(tmp_path / "train.h5", geo, 300, seed=2, position=False, n_hits=40)
    cand = make_toy_file(tmp_path / "cand.h5", geo, 3000, seed=3, position=False, n_hits=40)
    out = tmp_path / "eval"
    args = ["evaluate", "--reference", str(ref), "--candidate", str(cand), "--out", str(out), "--quiet",
            "--metrics", "separation_power", "--amplification"]
    assert main([*args, str(train)]) == 0
    amp = json.loads((out / "metrics.json").read_text())["amplification"]
    assert amp["observables"] == ["E_tot/E_inc", "E_layer_0/E_inc", "E_layer_1/E_inc"]
    assert amp["n_train"] == 300 and amp["n_generated"] == 3000
    assert 3 < amp["amplification"] < 30  # an independent draw of 3000 toy showers: ~10 x the 300 trained on
    assert (out / "plots" / "amplification.png").stat().st_size > 0
    assert "GAN amplification" in (out / "report.html").read_text()
    capsys.readouterr()
    assert main([*args, str(tmp_path / "missing.h5")]) == 2  # a bad training file: one line, status 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.h5" in err
