"""Classifier-ratio refinement: rejection sampling on a density ratio, the refiner's fit, ``generate --refine``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fastshower.cli import main
from fastshower.generation import generate
from fastshower.geometry import Geometry
from fastshower.io import ShowerBatch, ShowerFile, ShowerWriter
from fastshower.refinement import RefineConfig, RefineError, Refiner, fit_refiner, load_refiner
from fastshower.training import train

HP = {"hidden": 32, "depth": 1, "emb_dim": 16, "steps": 4, "warmup": 5}
TRAIN = {"chunk_rows": 128, "shuffle_chunks": 2}


class _GaussianRatio(Refiner):
    """A refiner whose ratio is known: draws ~ N(0, 1) in column 0, the data N(0.5, 1): w = exp(x / 2 - 1 / 8)."""

    def ratio(self, showers: np.ndarray, energies: np.ndarray, conditions: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.exp(0.5 * showers[:, 0] - 0.125)


def test_rejection_follows_the_density_ratio(tiny_geo: Geometry) -> None:
    """Kept draws follow p_model x w (here N(0.5, 1)), each row keeps its own energy, and the number of draws is
    cap / E[min(w, cap)] per shower (w's mean under the model is 1)."""
    refiner = _GaussianRatio(tiny_geo, (), 1, RefineConfig(cap=8.0, max_rounds=400))
    gen = np.random.default_rng(1)

    def draw(e: np.ndarray, conds: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.c_[gen.normal(size=len(e)), e]

    e = np.linspace(1.0, 2.0, 4000)
    out, counts = refiner.refine(draw, e, {}, np.random.default_rng(2))
    assert np.array_equal(out[:, 1], e)
    assert out[:, 0].mean() == pytest.approx(0.5, abs=0.05)
    assert out[:, 0].std() == pytest.approx(1.0, abs=0.05)
    assert counts["unaccepted"] == 0
    assert counts["draws"] / len(e) == pytest.approx(8.0, rel=0.1)


def test_unaccepted_rows_take_their_most_likely_draw(tiny_geo: Geometry) -> None:
    """With one round the draw is kept whatever w says; with few rounds the left rows hold their largest-w draw."""
    refiner = _GaussianRatio(tiny_geo, (), 1, RefineConfig(cap=1e6, max_rounds=3))
    gen = np.random.default_rng(3)
    out, counts = refiner.refine(lambda e, c: gen.normal(size=(len(e), 1)), np.ones(500), {},
                                 np.random.default_rng(4))
    assert counts["unaccepted"] > 490 and counts["draws"] == 1500
    assert out[:, 0].mean() > 0.7  # the max of three N(0, 1) draws has mean 0.85


@pytest.fixture(scope="module")
def refined_run(tmp_path_factory: pytest.TempPathFactory, tiny_file: Path) -> tuple[Path, dict[str, Any]]:
    """A briefly trained flow-matching run and a refiner fitted against a selection of its own showers: the half
    of 1600 at 2 GeV with the larger response E_tot / E_inc (a known density ratio: 2 above the median, 0 below)."""
    tmp = tmp_path_factory.mktemp("refine")
    run = train(tiny_file, "flow-matching", tmp / "fm", steps=100, batch_size=64, progress=False,
                config={"hparams": HP, "train": TRAIN})
    with ShowerFile(generate(run, 1600, "2.0", out=tmp / "own.h5", seed=9, progress=False)) as f:
        own, geometry, particle = f.read(0, f.n), f.geometry, f.particle
    response = own.showers.sum(1) / 2000.0
    upper = response > np.median(response)
    with ShowerWriter(tmp / "upper.h5", geometry, particle, "selection", int(upper.sum()),
                      {k: v.shape[1] for k, v in own.conditions.items()}) as w:
        w.append(ShowerBatch(own.energies[upper], own.showers[upper], {k: v[upper] for k, v in own.conditions.items()}))
    summary = fit_refiner(run, tmp / "upper.h5", RefineConfig(showers=5000, cap=3.0, seed=1), progress=False)
    assert summary["showers"] == upper.sum()  # at most 5000: all 800 of the file
    return run, {**summary, "median": float(np.median(response))}


def test_refined_showers_follow_the_data(refined_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """The refiner tells the run's showers from the upper half (AUC > 0.65; a perfect one 0.75, as half of the
    run's showers are in the upper half too), and generate --refine makes 85 % or more of its showers fall in that
    half (half of them without), at ~3 / E[min(w, 3)] ~ 3 draws per shower (w = 2 or 0, mean 1)."""
    run, summary = refined_run
    assert summary["validation_auc"] > 0.65
    above = {}
    for refine in (False, True):
        out = generate(run, 600, "2.0", out=tmp_path / f"{refine}.h5", seed=5, progress=False, refine=refine)
        with ShowerFile(out) as f:
            above[refine] = float((f.read(0, f.n).showers.sum(1) / 2000.0 > summary["median"]).mean())
            attrs = f.attrs
    assert above[False] == pytest.approx(0.5, abs=0.08) and above[True] > 0.85, above
    assert 2 * 600 < int(attrs["refine_draws"]) < 5 * 600 and "cap" in str(attrs["refine"])


def test_refined_generation_is_reproducible_and_resumes(refined_run: tuple[Path, dict[str, Any]],
                                                        tmp_path: Path) -> None:
    """Same seed -> same refined file; an interrupted refined file resumed is the uninterrupted one; resuming
    an unrefined file with refinement is refused."""
    run = refined_run[0]
    full = generate(run, 90, "1:5", out=tmp_path / "full.h5", batch_size=30, seed=2, progress=False, refine=True)
    part = generate(run, 30, "1:5", out=tmp_path / "part.h5", batch_size=30, seed=2, progress=False, refine=True)
    generate(run, 90, "1:5", out=part, batch_size=30, seed=2, progress=False, refine=True, resume=True)
    with ShowerFile(full) as a, ShowerFile(part) as b:
        assert np.array_equal(a.read(0, 90).showers, b.read(0, 90).showers)
    plain = generate(run, 30, "1:5", out=tmp_path / "plain.h5", batch_size=30, seed=2, progress=False)
    with pytest.raises(Exception, match="refine"):
        generate(run, 60, "1:5", out=plain, batch_size=30, seed=2, progress=False, refine=True, resume=True)


def test_refine_bad_input(refined_run: tuple[Path, dict[str, Any]], tiny_file: Path, belle_file: Path,
                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One line and status 2: a run without a refiner, too few showers, a bad cap, a missing data file, data of
    another detector."""
    bare = train(tiny_file, "flow-matching", tmp_path / "bare", steps=2, batch_size=64, progress=False,
                 config={"hparams": HP, "train": TRAIN})
    with pytest.raises(RefineError, match="has no refiner"):
        load_refiner(bare, _geo(tiny_file))
    for argv, words in (
        (["generate", "--run", str(bare), "--n", "5", "--energy", "2", "--out", str(tmp_path / "g.h5"),
          "--refine"], "has no refiner"),
        (["refine", "--run", str(bare), "--showers", "5"], "showers must be >= 20"),
        (["refine", "--run", str(bare), "--cap", "0"], "cap > 0"),
        (["refine", "--run", str(bare), "--data", str(tmp_path / "none.h5")], "cannot be read"),
        (["refine", "--run", str(bare), "--data", str(belle_file)], "is on geometry 'belle2-ecl-5x5'"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "g.h5").exists()


def _geo(path: Path) -> Geometry:
    with ShowerFile(path) as f:
        return f.geometry


def test_marginal_shifts_moves_marginals_and_keeps_ranks() -> None:
    """benchmarks/marginal_shifts.py: a candidate that is the training sample doubled and reversed in one column
    comes back with the training marginal per energy decile, and its ranks (its copula) as they were."""
    from benchmark_scripts import load_benchmark

    ms = load_benchmark("marginal_shifts")
    rng = np.random.default_rng(0)
    e = np.exp(rng.uniform(np.log(1e3), np.log(1e5), 4000))
    train = np.c_[rng.normal(size=4000) * np.log(e), rng.gamma(2.0, size=4000)]
    cand = np.c_[2.0 * train[:, 0], -train[:, 1]]
    out = ms.moved(cand, np.log10(e), train, np.log10(e), [0, 1])
    assert np.corrcoef(out[:, 0], train[:, 0])[0, 1] > 0.999  # same ranks in each decile: the same values
    decile = np.digitize(np.log(e), np.quantile(np.log(e), np.linspace(0, 1, 11))[1:-1])
    for d in range(10):
        for j in (0, 1):
            rows = decile == d
            assert np.array_equal(np.argsort(out[rows, j]), np.argsort(cand[rows, j]))
    assert np.quantile(out[:, 1], [0.1, 0.5, 0.9]) == pytest.approx(np.quantile(train[:, 1], [0.1, 0.5, 0.9]),
                                                                    rel=0.05)
    assert np.array_equal(ms.moved(cand, np.log10(e), train, np.log10(e), [])[:, 1], cand[:, 1])
