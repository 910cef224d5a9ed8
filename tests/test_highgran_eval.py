"""Evaluation of high-granularity calorimeters: polar centres of energy, pooled classifier input, chunking,
the CaloChallenge binning and the report's per-layer plots.

The end-to-end checks use a small synthetic polar detector (6 layers of 5 rings x 12 angular bins, 360
voxels) whose classifier cap is lowered so that it sees pooled cells, the path the 27 000-65 025-cell
detectors take; each evaluation runs in a few seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fastshower.cli import main
from fastshower.geometry import Geometry, PolarSegmentation, ReadoutLayer, get_geometry
from fastshower.io import ShowerBatch, ShowerFile, write_showers
from fastshower.validate import evaluate as E
from fastshower.validate import metrics as M
from fastshower.validate import observables as O
from fastshower.validate.synthetic import write_synthetic

SEG = PolarSegmentation((0.0, 2.0, 5.0, 10.0, 20.0, 40.0), 12)
POLAR = Geometry(name="polar-6x5x12", description="test", source="tests",
                 layers=tuple(ReadoutLayer("G4_W", 3.5, "G4_Si", 0.5, 2, SEG) for _ in range(6)), energy="10:100")
#: the classifier cap that makes POLAR's 360 voxels pooled: k = 3 gives 6 x (4 x 2) = 48 sums
POOLED = E.EvaluationConfig(classifier_max_voxels=100, n_boot=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two independent samples of one synthetic distribution ("a", "b") and a copy of b with every
    cell x 1.3 ("scaled"), 1500 showers each at 10-100 GeV."""
    d = tmp_path_factory.mktemp("polar")
    e = np.exp(np.random.default_rng(0).uniform(np.log(1e4), np.log(1e5), 1500))
    return {"a": write_synthetic(d / "a.h5", POLAR, e, seed=1),
            "b": write_synthetic(d / "b.h5", POLAR, e, seed=2),
            "scaled": write_synthetic(d / "scaled.h5", POLAR, e, seed=2, scale=1.3)}


# --- observables --------------------------------------------------------------------------------


def test_single_cell_centre_is_the_calochallenge_cell_centre() -> None:
    """x = r_mid cos(alpha_mid), y = r_mid sin(alpha_mid) with alpha bins from -pi (CaloChallenge XMLHandler)."""
    g = get_geometry("par04-ds2")
    seg = g.layers[7].segmentation
    assert isinstance(seg, PolarSegmentation)
    ia, ir = 3, 4  # angular bin 3, radial bin 4
    s = np.zeros((1, g.n_voxels))
    s[0, g.layer_slice(7).start + ia * seg.n_r + ir] = 2.5
    centre, width = O.centre_of_energy(s, g)
    r_mid = 0.5 * (seg.r_edges[ir] + seg.r_edges[ir + 1])
    alpha_mid = -math.pi + (ia + 0.5) * 2 * math.pi / seg.n_alpha
    assert centre[0, 7] == pytest.approx([r_mid * math.cos(alpha_mid), r_mid * math.sin(alpha_mid)], abs=1e-9)
    assert alpha_mid < -math.pi / 2 and centre[0, 7, 0] < 0  # bin 3 of 16 from -180 deg: third quadrant
    assert np.allclose(width, 0.0, atol=1e-6) and np.all(centre[0, :7] == 0.0)  # sqrt of rounding: ~1e-8 mm
    obs = O.compute_observables(s, np.array([1e4]), g)
    assert obs["x_centre_7"][0] == pytest.approx(centre[0, 7, 0]) and obs["sparsity_7"][0] == pytest.approx(143 / 144)
    assert obs["E_layer_7"][0] == 2.5 and obs["E_layer_6"][0] == 0.0


def test_width_is_the_energy_weighted_standard_deviation() -> None:
    """Two opposite cells of one ring with energies 1 and 3: <x> = (3 - 1) r / 4 = r / 2, std = r sqrt(3) / 2."""
    s = np.zeros((1, POLAR.n_voxels))
    # angular bins 0 and 6 of 12 are 180 deg apart; ring 2 (5-10 mm), r_mid = 7.5 mm
    s[0, 0 * SEG.n_r + 2], s[0, 6 * SEG.n_r + 2] = 1.0, 3.0
    centre, width = O.centre_of_energy(s, POLAR)
    alpha = -math.pi + 0.5 * 2 * math.pi / 12
    x0, y0 = 7.5 * math.cos(alpha), 7.5 * math.sin(alpha)
    assert centre[0, 0] == pytest.approx([-x0 / 2, -y0 / 2])
    assert width[0, 0] == pytest.approx([abs(x0) * math.sqrt(3) / 2, abs(y0) * math.sqrt(3) / 2])


def test_pooled_voxels_sum_blocks_and_keep_layer_energies() -> None:
    rng = np.random.default_rng(3)
    s = rng.gamma(0.5, 1.0, (4, POLAR.n_voxels))
    p = O.pooled_voxels(s, POLAR, 3)
    assert p.shape == (4, O.pooled_size(POLAR, 3)) == (4, 6 * 4 * 2)
    assert np.allclose(p.reshape(4, 6, -1).sum(2), O.layer_energies(s, POLAR))
    img = s[:, :60].reshape(4, 12, 5)  # layer 0: 12 angular x 5 radial bins
    assert np.allclose(p[:, 0], img[:, 0:3, 0:3].sum((1, 2)))  # first block
    assert np.allclose(p[:, 7], img[:, 9:12, 3:5].sum((1, 2)))  # last block: 3 x 2 remainder
    assert np.array_equal(O.pooled_voxels(s, POLAR, 1), s)


def test_classifier_pool_and_chunks_of_the_large_detectors() -> None:
    """Default caps: pooled blocks bring every detector under 8192 classifier inputs; chunks stay at 128 MiB."""
    cfg = E.EvaluationConfig()
    expect = {"par04-ds2": (1, 6480), "ild-siw-30": (2, 6750), "par04-ds3": (3, 4590), "siw-51x51x25": (3, 7225)}
    for name, (k, n) in expect.items():
        g = get_geometry(name)
        assert (E._classifier_pool(g, cfg), O.pooled_size(g, k)) == (k, n), name
        assert E._chunk_rows(g, cfg) * g.n_voxels * 8 <= cfg.chunk_bytes
    assert E._chunk_rows(get_geometry("siw-51x51x25"), cfg) == (1 << 27) // (8 * 65025)


# --- CaloChallenge binning --------------------------------------------------------------------------


def test_calochallenge_binning_ranges() -> None:
    b = M.calochallenge_binning("E_tot/E_inc")
    assert b is not None and b.n_bins == 100 and (b.edges[0], b.edges[-1]) == (0.5, 1.5) and b.drop_outside
    b = M.calochallenge_binning("x_centre_12")
    assert b is not None and b.n_bins == 100 and (b.edges[0], b.edges[-1]) == (-30.0, 30.0)
    b = M.calochallenge_binning("y_width_0")
    assert b is not None and b.n_bins == 100 and (b.edges[0], b.edges[-1]) == (0.0, 30.0)
    b = M.calochallenge_binning("sparsity_44")
    assert b is not None and b.n_bins == 19 and (b.edges[0], b.edges[-1]) == (0.0, 1.0)
    b = M.calochallenge_binning("E_layer_3", reference_max=2000.0)
    assert b is not None and b.n_bins == 39 and b.log
    assert b.edges[0] == pytest.approx(0.5e-3 / 0.033) and b.edges[-1] == pytest.approx(2000.0)
    assert np.allclose(np.diff(np.log(b.edges)), np.log(b.edges[1] / b.edges[0]))  # log-uniform
    b = M.calochallenge_binning("voxel_energy", reference_max=50.0)
    assert b is not None and b.n_bins == 49
    for name in ("E_tot", "r_centre_3", "n_hits", "z_width", "sparsity"):
        assert M.calochallenge_binning(name) is None, name


def test_out_of_range_values_are_dropped_and_the_rest_renormalised() -> None:
    rng = np.random.default_rng(5)
    ref = rng.normal(1.0, 0.05, 20_000)
    cand = rng.normal(1.01, 0.05, 20_000)
    tails = np.concatenate([cand, np.full(3000, 1.8), np.full(1000, 0.3)])  # 17 % outside [0.5, 1.5]
    cc = M.calochallenge_binning("E_tot/E_inc")
    q = M.make_binning(ref, 100)
    assert cc is not None

    def sp(b: M.Binning, x: np.ndarray) -> float:
        h, g = M.HistogramAccumulator(b), M.HistogramAccumulator(b)
        h.update(ref)
        g.update(x)
        return M.histogram_score(h.compute(), g.compute(), b, n_boot=0).separation_power

    assert sp(cc, tails) == pytest.approx(sp(cc, cand), rel=1e-12)  # the tails are not seen
    # the quantile binning counts them in its under/overflow bins: S grows by about half the 1/6 outside
    assert sp(q, tails) > sp(q, cand) + 0.06
    assert sp(q, tails) - sp(cc, tails) > 0.06


# --- end to end ----------------------------------------------------------------------------------------


def test_mc_vs_mc_and_scaled_copy_with_pooled_classifier(files: dict[str, Path], tmp_path: Path) -> None:
    kw = {"metrics": ["classifier_low", "separation_power"], "progress": False, "config": POOLED, "report": False}
    same = E.evaluate(files["a"], files["b"], tmp_path / "same", **kw)
    low = same["classifier"]["low"]
    assert low["input"].startswith("log10(E_inc) and pooled 3x3 cells per layer") and "(48 sums of 360" in low["input"]
    assert same["classifier_low_input"] == low["input"]
    assert abs(low["auc"] - 0.5) < 0.07
    scaled = E.evaluate(files["a"], files["scaled"], tmp_path / "scaled", **kw)
    assert scaled["classifier"]["low"]["auc"] > 0.95
    assert scaled["separation_power"]["E_tot/E_inc"] > 0.9  # 30 % shift, ~3 % resolution: nearly disjoint


def test_chunking_does_not_change_the_histograms(files: dict[str, Path], tmp_path: Path) -> None:
    kw = {"metrics": ["separation_power"], "progress": False, "report": False, "binning": "calochallenge"}
    big = E.evaluate(files["a"], files["b"], tmp_path / "big", config=POOLED, **kw)
    tiny = E.EvaluationConfig(classifier_max_voxels=100, n_boot=2, chunk_bytes=7 * 360 * 8)  # 7 showers a chunk
    small = E.evaluate(files["a"], files["b"], tmp_path / "small", config=tiny, **kw)
    assert small["separation_power"] == big["separation_power"]


def test_calochallenge_binning_end_to_end(files: dict[str, Path], tmp_path: Path) -> None:
    """A candidate with 300 showers at 3 x the energy: quantile bins see the tail, CaloChallenge bins drop it."""
    with ShowerFile(files["b"]) as f:
        b = f.read()
    tail = write_showers(tmp_path / "tail.h5", POLAR, ShowerBatch(
        np.concatenate([b.energies, b.energies[:300]]), np.concatenate([b.showers, 3 * b.showers[:300]])), "e-", "t")
    kw = {"metrics": ["separation_power"], "progress": False, "report": False}
    cfg = E.EvaluationConfig(n_boot=2, binning_sample=1024)  # 1500 showers: the maxima need the extra pass
    res = {(scheme, c): E.evaluate(files["a"], files[c] if c != "tail" else tail, tmp_path / f"{scheme}_{c}",
                                   binning=scheme, config=cfg, **kw)
           for scheme in E.BINNINGS for c in ("b", "tail")}
    key = "E_tot/E_inc"
    cc_b, cc_t = res["calochallenge", "b"], res["calochallenge", "tail"]
    assert cc_t["separation_power"][key] == pytest.approx(cc_b["separation_power"][key], rel=1e-12)
    q_b, q_t = res["quantile", "b"]["separation_power"][key], res["quantile", "tail"]["separation_power"][key]
    assert q_t > q_b + 0.06  # 300 of 1800 showers in the overflow bin: S grows by about 1/12
    assert q_t != pytest.approx(cc_t["separation_power"][key], abs=0.05)
    saved = json.loads((tmp_path / "calochallenge_b" / "metrics.json").read_text())
    assert saved["histogram_binning"] == "calochallenge"
    assert saved["binning"][key]["scheme"] == "calochallenge" and saved["binning"][key]["drop_outside"]
    assert saved["binning"]["r_centre_0"]["scheme"] == "quantile" and not saved["binning"]["r_centre_0"]["drop_outside"]
    with ShowerFile(files["a"]) as f:  # the log range ends at the reference's largest layer energy
        top = O.layer_energies(f.read().showers.astype(np.float64), POLAR).max(0)
    assert saved["binning"]["E_layer_2"]["edges"][-1] == pytest.approx(top[2], rel=1e-9)
    assert json.loads((tmp_path / "quantile_b" / "metrics.json").read_text())["histogram_binning"] == "quantile"


def test_unknown_binning_is_one_line_and_status_2(files: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    base = ["evaluate", "--reference", str(files["a"]), "--candidate", str(files["b"]), "--out", str(tmp_path)]
    assert main([*base, "--binning", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantile, calochallenge" in err
    assert main([*base, "--binning", "binning_dataset_2.xml"]) == 2
    assert "--binning-xml" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_calochallenge_high_level_classifier_sees_the_challenge_s_features(files: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    """The CaloChallenge's high-level classifier input: per layer log10(E_layer + 1e-8) and the x/y centres and
    widths in units of 100 mm (a single-cell shower: its layer energy, its cell's centre, zero width); MC vs MC
    gives AUC near 0.5 and the scaled copy near 1; one-layer detectors have no such set."""
    s = np.zeros((1, POLAR.n_voxels), np.float32)
    s[0, 2 * 60 + 3 * 5 + 4] = 250.0  # layer 2, angular bin 3, ring 4
    names = O.observable_names(POLAR)
    obs = O.compute_observables(s, np.array([1e4]), POLAR)
    feats = O.challenge_high_level(np.stack([obs[k] for k in names], 1), names, np.array([4.0]))
    assert feats is not None and feats.shape == (1, 1 + 5 * 6)
    assert feats[0, 0] == 4.0 and math.isclose(feats[0, 1 + 2], math.log10(250.0), rel_tol=1e-6)
    assert feats[0, 1] == -8.0  # an empty layer
    x, y = feats[0, 1 + 6 + 2] * 100, feats[0, 1 + 12 + 2] * 100
    phi = math.radians(-180.0 + 3.5 * 30.0)  # bin 3 of 12 from -180 degrees (binning_dataset_2.xml)
    assert np.allclose([x, y], [30.0 * math.cos(phi), 30.0 * math.sin(phi)], atol=1e-3)  # ring 4: 20-40 mm
    assert np.all(feats[0, 1 + 18 :] == 0.0)
    one = get_geometry("belle2-ecl-5x5")
    one_names = O.observable_names(one)
    assert O.challenge_high_level(np.zeros((1, len(one_names))), one_names, np.zeros(1)) is None
    kw = {"metrics": ["classifier_challenge"], "progress": False, "config": POOLED, "report": False}
    same = E.evaluate(files["a"], files["b"], tmp_path / "same", **kw)["classifier"]["challenge"]
    assert abs(same["auc"] - 0.5) < 0.07 and same["input"].startswith("the CaloChallenge's high-level set")
    assert E.evaluate(files["a"], files["scaled"], tmp_path / "scaled", **kw)["classifier"]["challenge"]["auc"] > 0.95
