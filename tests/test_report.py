"""The HTML report of fastshower.validate.evaluate: its images exist and its tables show metrics.json's numbers.

Two tiny toy files (2 layers of 4x4 cells, 1/2/5 GeV) are scored once per module with the floor, so the
report has every section; a second run without response or classifier checks that absent scores leave
no plot and no row behind. Matplotlib takes ~0.3 s a histogram, so these runs plot only the first few
figures of ``report._plot_groups`` (tested on its own) to keep each run to a few seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fastshower.validate import plots, report, verdict
from fastshower.validate.evaluate import EvaluationConfig, evaluate
from fastshower.validate.metrics import Binning, HistogramAccumulator
from toy_showers import make_toy_file, tiny_geometry

FAST = EvaluationConfig(n_boot=3, fpd_batches=2, fpd_points=3, kpd_batches=2, kpd_batch_size=200,
                        fpd_min_samples=200, fpd_max_samples=300, ssim_per_bin=30, ssim_pairs=30, birthday_max=200)
METRICS = ["separation_power", "w1", "chi2", "classifier_low", "classifier_high", "fpd", "response"]


class _ReportParser(HTMLParser):
    """Collects the src/href links, the text of the <h2> headings and every table as rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.headings: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._heading: str | None = None
        self._in_h2 = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "h2":
            self._in_h2 = True
            self.headings.append("")
        elif tag == "table":
            assert self._heading is not None, "a table without a heading"
            self.tables[self._heading] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_h2 = False
            self._heading = self.headings[-1]
        elif tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None and self._heading is not None:
            self.tables[self._heading].append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.headings[-1] += data
        elif self._cell is not None:
            self._cell.append(data)


def _parse(out: Path) -> _ReportParser:
    parser = _ReportParser()
    parser.feed((out / "report.html").read_text())
    parser.close()
    return parser


def _as_dicts(table: list[list[str]]) -> list[dict[str, str]]:
    """Rows of a parsed table keyed by its header row."""
    header, *rows = table
    assert all(len(r) == len(header) for r in rows)
    return [dict(zip(header, r, strict=True)) for r in rows]


def _shown(value: Any) -> str:
    """How the report prints a number of metrics.json: 4 significant digits, "-" for null."""
    return "-" if value is None else f"{value:.4g}"


def _first(n: int) -> Callable[[list[str]], list[list[str]]]:
    """``report._plot_groups`` cut to its first ``n`` figures (fewer histogram plots, same code path)."""
    groups = report._plot_groups
    return lambda names: groups(names)[:n]


@pytest.fixture(scope="module")
def toy_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("toy")
    geo = tiny_geometry()
    return make_toy_file(d / "ref.h5", geo, 400, seed=1), make_toy_file(d / "cand.h5", geo, 400, seed=2)


@pytest.fixture(scope="module")
def full(toy_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "_plot_groups", _first(4))
        result = evaluate(*toy_pair, out, metrics=METRICS, floor=True, progress=False, config=FAST)
    return out, result


def test_html_and_plot_folder_agree(full: tuple[Path, dict[str, Any]]) -> None:
    out, _ = full
    links = _parse(out).links
    pngs = {f"plots/{p.name}" for p in (out / "plots").iterdir()}
    assert pngs, "no plots written"
    assert pngs <= set(links), f"plots the page does not show: {sorted(pngs - set(links))}"
    missing = [link for link in links if not (out / link).is_file()]
    assert not missing, f"the page references missing files: {missing}"
    assert {"plots/images_layers_0-1.png", "plots/profiles.png", "plots/response.png"} <= set(links)
    assert {"plots/energy_E_tot_over_E_inc.png"} <= set(links)  # three energies: per-energy panels
    assert len([link for link in links if link.startswith(("plots/hist_", "plots/layers_"))]) == 4
    assert len(links) == len(set(links)), "a plot shown twice"


def test_summary_table_shows_the_returned_scores(full: tuple[Path, dict[str, Any]]) -> None:
    out, result = full
    assert result == json.loads((out / "metrics.json").read_text()) | {"wall_time_s": result["wall_time_s"]}
    summary = {r["score"]: r for r in _as_dicts(_parse(out).tables["Summary"])}
    for side in ("low", "high"):
        clf, floor = result["classifier"][side], result["floor"]["classifier"][side]
        assert math.isfinite(clf["auc"]) and 0 <= clf["auc"] <= 1
        row = summary[f"classifier AUC ({side}-level)"]
        assert row["value"] == _shown(clf["auc"])
        assert float(row["value"]) == pytest.approx(clf["auc"], rel=1e-3)
        assert row["error"] == _shown(clf["auc_error"])
        assert row["floor (reference halves)"] == _shown(floor["auc"])
        jsd = summary[f"classifier JSD ({side}-level)"]["value"]
        # a negative estimate is noise around 0: shown as 0 with the estimate beside it
        assert jsd == _shown(clf["jsd"]) if clf["jsd"] >= 0 else jsd.startswith("0 (estimate")
    assert summary["FPD x1e3"]["value"] == _shown(result["fpd"]["value"])
    assert summary["FPD x1e3"]["floor (reference halves)"] == _shown(result["floor"]["fpd"]["value"])
    assert "KPD x1e3" not in summary  # not requested
    fit = result["response"]["fit"]["candidate"]
    row = summary["resolution a (stochastic) candidate"]
    if "a" in fit["at_bound"]:
        assert row["value"] == "0" and "AT THE BOUND" in row["how to read"]
    else:
        assert row["value"] == _shown(fit["a"]) and "a/√(E/GeV) ⊕ b" in row["how to read"]


def test_per_energy_and_observable_tables(full: tuple[Path, dict[str, Any]]) -> None:
    out, result = full
    tables = _parse(out).tables
    per_energy = _as_dicts(tables["Per energy"])
    assert [r["energy"] for r in per_energy] == ["1 GeV", "2 GeV", "5 GeV"]
    for shown, row in zip(per_energy, result["per_energy"], strict=True):
        assert int(shown["showers cand"]) == row["n_candidate"]
        assert shown["AUC low-level"] == _shown(row["auc_low"])
        assert shown["S(E_tot/E_inc)"] == _shown(row["separation_power_E_tot/E_inc"])
        assert shown["worst observable"] == row["separation_power_max_observable"]
    observables = {r["observable"]: r for r in _as_dicts(tables["Observables"])}
    assert set(observables) == set(result["separation_power"])
    for name, sp in result["separation_power"].items():
        assert observables[name]["separation power"] == _shown(sp)
        assert observables[name]["floor"] == _shown(result["floor"]["separation_power"][name])
        assert observables[name]["W1"] == _shown(result["w1"][name])


def test_absent_scores_leave_no_plot_or_row(toy_pair: tuple[Path, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "_plot_groups", _first(1))
    result = evaluate(*toy_pair, tmp_path, metrics=["w1"], progress=False, config=FAST)
    parsed = _parse(tmp_path)
    assert not (tmp_path / "plots" / "response.png").exists()
    assert "plots/response.png" not in parsed.links
    assert {f"plots/{p.name}" for p in (tmp_path / "plots").iterdir()} == set(parsed.links)
    assert "classifier" not in result and "floor" not in result
    assert len(parsed.tables["Summary"]) == 1  # the header only
    assert "Observables" not in parsed.tables  # it is keyed by separation power, not requested


def test_every_layer_of_a_45_layer_detector_is_plotted() -> None:
    families = ("E_layer", "x_centre", "x_width", "sparsity")
    names = ["E_tot/E_inc", "n_hits"] + [f"{f}_{i}" for i in range(45) for f in families]
    groups = report._plot_groups(names)
    assert sorted(k for g in groups for k in g) == sorted(names)  # every observable once, no cap
    assert groups[:2] == [["E_tot/E_inc"], ["n_hits"]]
    grids = groups[2:]
    assert len(grids) == len(families) * 4  # 45 layers in figures of 12: 12 + 12 + 12 + 9
    assert all(len({k.rpartition("_")[0] for k in g}) == 1 for g in grids)  # one family a figure
    assert [len(g) for g in grids[:4]] == [12, 12, 12, 9]
    assert grids[3] == [f"E_layer_{i}" for i in range(36, 45)]


def test_grid_and_images_of_many_layers(tmp_path: Path) -> None:
    """A 13-layer toy detector: two image figures and two grid figures per family show all 13 layers."""
    from fastshower.geometry import CartesianSegmentation, Geometry, ReadoutLayer
    from fastshower.validate.metrics import calochallenge_binning
    from fastshower.validate.observables import radial_edges, radial_profile

    seg = CartesianSegmentation(2, 2, 5.0, 5.0)
    geo = Geometry(name="g13", description="", source="",
                   layers=tuple(ReadoutLayer(None, 0.0, "G4_Si", 1.0, 1, seg) for _ in range(13)))
    names = [f"x_centre_{i}" for i in range(13)]
    b = calochallenge_binning("x_centre_0")
    assert isinstance(b, Binning)
    counts = {k: np.arange(b.n_bins + 2) for k in names}
    image = np.linspace(0, 1, geo.n_voxels)
    edges = radial_edges(geo)
    radial = radial_profile(image[None], geo)[0]
    pd = report.PlotData(geo, dict.fromkeys(names, b), counts, counts, image, image, edges, radial, radial)
    figs = report._write_plots(tmp_path, {"separation_power": dict.fromkeys(names, 0.0)}, pd)
    assert [f.file for f in figs] == ["images_layers_0-7.png", "images_layers_8-12.png", "profiles.png",
                                      "layers_x_centre_0-11.png", "layers_x_centre_12-12.png"]
    assert all((tmp_path / f.file).stat().st_size > 1000 for f in figs)
    assert "x centre of energy per layer [mm], layers 0-11" in figs[3].caption



# --- what the histograms draw -----------------------------------------------------------------------------


def test_under_and_overflow_bins_hold_the_out_of_range_counts() -> None:
    b = Binning((0.0, 1.0, 2.0, 4.0))
    h = HistogramAccumulator(b)
    h.update(np.array([-5.0, -1.0, 0.5, 1.5, 1.5, 3.0, 4.5, 9.0, 9.0]))
    counts = h.compute()
    d = plots.density(counts, b, under=True, over=True)
    widths = np.diff(d.edges)
    assert d.edges[0] == -1.0 and d.edges[-1] == 6.0  # each as wide as its neighbouring regular bin
    assert np.allclose(d.value * d.total * widths, [2, 1, 2, 1, 3])  # 2 below, 3 above the range
    assert np.allclose(d.error * d.total * widths, np.sqrt([2, 1, 2, 1, 3]))  # Poisson: sqrt(N), scaled alike
    inside = plots.density(counts, b, under=False, over=False)
    assert np.allclose(inside.value * inside.total * np.diff(inside.edges), [1, 2, 1])


def test_the_drop_outside_binning_scales_by_the_scored_total() -> None:
    b = Binning((1.0, 10.0, 100.0), log=True, drop_outside=True)
    d = plots.density(np.array([3, 4, 4, 1]), b, under=True, over=True)
    assert d.total == 8  # the in-range counts the scores compare
    assert np.allclose(d.edges, [0.1, 1.0, 10.0, 100.0, 1000.0])  # log bins: as wide in log
    assert np.allclose(d.value * 8 * np.diff(d.edges), [3, 4, 4, 1])


def test_ratio_errors_propagate_both_poisson_errors() -> None:
    b = Binning((0.0, 1.0, 2.0))
    num, den = plots.density(np.array([0, 100, 25, 0]), b, False, False), plots.density(
        np.array([0, 50, 50, 0]), b, False, False)
    r, err = plots.ratio(num, den)
    assert np.allclose(r, [(100 / 125) / 0.5, (25 / 125) / 0.5])
    assert np.allclose(err, r * np.sqrt([1 / 100 + 1 / 50, 1 / 25 + 1 / 50]))


def test_the_plot_covers_what_the_candidate_holds_beyond_the_reference(tmp_path: Path) -> None:
    """The quick demo's case: a candidate with E_tot/E_inc up to 2 on a binning that ends at 0.99."""
    import matplotlib.pyplot as plt

    b = Binning(tuple(np.linspace(0.9, 0.99, 10)))
    ref, cand = HistogramAccumulator(b), HistogramAccumulator(b)
    ref.update(np.linspace(0.9, 0.99, 100))
    cand.update(np.concatenate([np.linspace(0.9, 0.99, 71), np.linspace(1.0, 2.09, 29)]))
    fig, (ax, axr) = plt.subplots(2, 1)
    plots.draw_hist((ax, axr), "E_tot/E_inc", b, ref.compute(), cand.compute(), None, "E_vis / E_inc")
    assert ax.get_xlim()[1] > 0.99  # the overflow bin is drawn
    drawn = [p for p in ax.patches if hasattr(p, "get_data")]
    assert any(np.isclose(p.get_data().values[-1] * 100 * 0.01, 29) for p in drawn)  # it holds all 29 showers
    assert axr.get_ylim() != (0.5, 1.5) and ax.get_xlabel() == "" and axr.get_xlabel() == "E_vis / E_inc"
    plt.close(fig)


def test_axis_labels_carry_units() -> None:
    assert plots.axis_label("E_tot") == "E_vis [MeV]"
    assert plots.axis_label("r_width_3") == "r spread of energy, layer 3 [mm]"
    assert plots.axis_label("Xmax") == "X_max [g/cm²]"


# --- the verdict -------------------------------------------------------------------------------------------


def test_judge_flags_only_beyond_the_floor_spread() -> None:
    assert verdict.judge("x", 0.10, 0.01, 0.02, 0.01).status == "outside"  # 5.7 sigma
    assert verdict.judge("x", 0.05, 0.01, 0.02, 0.01).status == "within"  # 2.1 sigma
    assert verdict.judge("x", 0.01, 0.01, 0.02, 0.01).status == "within"  # below the floor
    assert verdict.judge("x", 0.10, 0.01, None, None).status == "no floor"


@pytest.fixture(scope="module")
def scaled_and_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Separation powers with the floor of an independent toy sample (MC vs MC) and of a copy of the
    reference with every cell scaled by 1.05 (3000 showers each: the floor of 1500 against 1500 must
    be well below the scaled copy's S)."""
    from fastshower.io import ShowerBatch, ShowerFile, write_showers

    d = tmp_path_factory.mktemp("verdict")
    geo = tiny_geometry()
    toy_pair = make_toy_file(d / "ref.h5", geo, 3000, seed=11), make_toy_file(d / "cand.h5", geo, 3000, seed=12)
    with ShowerFile(toy_pair[0]) as f:
        batch = f.read()
        scaled = write_showers(d / "scaled.h5", f.geometry, ShowerBatch(batch.energies, batch.showers * 1.05,
                                                                      batch.conditions), f.particle, "scaled")
    kw = {"metrics": ["separation_power"], "floor": True, "progress": False, "config": FAST, "report": False}
    return {"pair": evaluate(*toy_pair, d / "pair", **kw), "scaled": evaluate(toy_pair[0], scaled, d / "s", **kw)}


def test_the_verdict_flags_a_scaled_copy_and_not_an_mc_pair(scaled_and_pair: dict[str, Any]) -> None:
    pair = {v.name: v for v in verdict.observable_verdicts(scaled_and_pair["pair"])}
    scaled = {v.name: v for v in verdict.observable_verdicts(scaled_and_pair["scaled"])}
    assert [k for k, v in pair.items() if v.status == "outside"] == []
    assert all(v.status == "within" for v in pair.values())
    for name in ("E_tot/E_inc", "E_tot", "E_layer_0"):
        assert scaled[name].status == "outside", scaled[name]
    assert verdict.observable_verdicts(scaled_and_pair["scaled"])[0].status == "outside"  # worst first
    text = verdict.format_score_table(scaled_and_pair["scaled"])
    assert "observables outside the Geant4-vs-Geant4 floor" in text and len(text.splitlines()) < 20


def test_the_report_opens_with_the_verdict(full: tuple[Path, dict[str, Any]]) -> None:
    out, result = full
    parsed = _parse(out)
    assert parsed.headings[:2] == ["Verdict", "Verdict per observable"]
    rows = _as_dicts(parsed.tables["Verdict per observable"])
    assert {r["observable"] for r in rows} == set(result["separation_power"])
    assert all(r["verdict"] in ("outside", "within") for r in rows)
    assert [r["score"] for r in _as_dicts(parsed.tables["Verdict"])][:2] == ["classifier AUC (low-level)",
                                                                           "classifier AUC (high-level)"]
    assert "<figcaption>" in (out / "report.html").read_text()


# --- entries that meant nothing ------------------------------------------------------------------------------


def test_a_one_layer_detector_has_no_depth_observables(tiny_geo: Any) -> None:
    from fastshower.geometry import get_geometry
    from fastshower.validate.observables import compute_observables, observable_names

    belle = get_geometry("belle2-ecl-5x5")
    assert "z_centre" not in observable_names(belle) and "z_width" not in observable_names(belle)
    assert {"z_centre", "z_width"} <= set(observable_names(tiny_geo))
    obs = compute_observables(np.ones((2, belle.n_voxels)), np.full(2, 1000.0), belle)
    assert set(obs) == set(observable_names(belle))


def test_a_resolution_fit_at_its_bound_is_flagged() -> None:
    from fastshower.validate.metrics import fit_resolution

    e = np.array([0.5, 1.0, 2.0, 5.0])
    constant = fit_resolution(e, np.full(4, 0.02), np.full(4, 0.001))
    assert "a" in constant.at_bound and "b" not in constant.at_bound
    stochastic = fit_resolution(e, 0.03 / np.sqrt(e), 0.001 * np.ones(4))
    assert stochastic.at_bound == ("b",)
    both = fit_resolution(e, np.sqrt(0.03**2 / e + 0.01**2), 0.0005 * np.ones(4))
    assert both.at_bound == ()
