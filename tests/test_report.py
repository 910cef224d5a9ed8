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

from fastshower.validate import report
from fastshower.validate.evaluate import EvaluationConfig, evaluate
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
    assert {"plots/images_00.png", "plots/profiles.png", "plots/response.png"} <= set(links)
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
        assert summary[f"classifier JSD ({side}-level)"]["value"] == _shown(clf["jsd"])
    assert summary["FPD x1e3"]["value"] == _shown(result["fpd"]["value"])
    assert summary["FPD x1e3"]["floor (reference halves)"] == _shown(result["floor"]["fpd"]["value"])
    assert "KPD x1e3" not in summary  # not requested
    fit = result["response"]["fit"]["candidate"]
    assert summary["resolution a (stochastic) candidate"]["value"] == _shown(fit["a"])


def test_per_energy_and_observable_tables(full: tuple[Path, dict[str, Any]]) -> None:
    out, result = full
    tables = _parse(out).tables
    per_energy = _as_dicts(tables["Per energy"])
    assert [r["label"] for r in per_energy] == ["1 GeV", "2 GeV", "5 GeV"]
    for shown, row in zip(per_energy, result["per_energy"], strict=True):
        assert int(shown["n_candidate"]) == row["n_candidate"]
        assert shown["auc_low"] == _shown(row["auc_low"])
        assert shown["separation_power_max_observable"] == row["separation_power_max_observable"]
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
    from fastshower.validate.metrics import Binning, calochallenge_binning
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
    assert figs == ["images_00.png", "images_01.png", "profiles.png", "layers_000.png", "layers_001.png"]
    assert all((tmp_path / f).stat().st_size > 1000 for f in figs)
