"""HTML report with PNG plots (matplotlib Agg, mplhep style) for :func:`fastshower.validate.evaluate`.

Plots are made from the streamed summaries (histogram counts, mean images), never from raw
showers, and the scores come from the metrics dict: the report shows the numbers of
metrics.json, it does not compute its own.

Every observable and every layer is plotted, however many layers the detector has: a global
observable gets a figure of its own; a per-layer one (``E_layer_i``, ``x_centre_i``, ...)
a panel in a grid of its family, at most :data:`LAYERS_PER_GRID` layers a figure (45 layers:
4 figures a family); the mean images come :data:`LAYERS_PER_IMAGE` layers a figure.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mplhep as hep
import numpy as np

from fastshower.geometry import Geometry
from fastshower.validate.metrics import Binning

__all__ = ["LAYERS_PER_GRID", "LAYERS_PER_IMAGE", "PlotData", "write_report"]

#: layers per figure of a per-layer observable (a 4-column grid of panels)
LAYERS_PER_GRID = 12
#: layers per figure of the mean images (reference above candidate)
LAYERS_PER_IMAGE = 8
_GRID_COLUMNS = 4


@dataclass
class PlotData:
    """What the plots need.

    Attributes:
        binnings: observable -> fixed binning; ref_counts / cand_counts: observable -> counts (k + 2,).
        ref_image / cand_image: mean of voxels / E_inc, shape (V,).
        radial_edges: (k + 1,) mm or None (air showers); ref_radial / cand_radial: mean energy
            fraction per radial bin, shape (k,).
    """

    geometry: Geometry
    binnings: dict[str, Binning]
    ref_counts: dict[str, np.ndarray]
    cand_counts: dict[str, np.ndarray]
    ref_image: np.ndarray
    cand_image: np.ndarray
    radial_edges: np.ndarray | None
    ref_radial: np.ndarray | None
    cand_radial: np.ndarray | None


_DPI = 100
_RC = {"font.size": 11, "axes.titlesize": 11, "axes.labelsize": 12, "xtick.labelsize": 10, "ytick.labelsize": 10,
       "legend.fontsize": 9, "figure.titlesize": 11}
#: the page's CSS
_STYLE = ("body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #aaa;padding:2px 8px;text-align:right} img{max-width:48%}")
#: columns of the Per energy table, in order (those no row has are left out)
_PER_ENERGY_COLUMNS = ("label", "n_reference", "n_candidate", "separation_power_E_tot/E_inc", "separation_power_mean",
                       "separation_power_max", "separation_power_max_observable", "auc_low", "auc_high",
                       "ssim_reference", "ssim_candidate")


def _fmt(x: Any, digits: int = 4) -> str:
    """A table cell: ``digits`` significant digits for floats, "-" for None and non-finite, else escaped text."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if math.isfinite(x) else "-"
    return html.escape(str(x))


def _is_per_layer(name: str) -> bool:
    """An observable of one layer: its name ends in ``_<layer index>``."""
    return name.rpartition("_")[2].isdigit()


def _plot_groups(names: list[str]) -> list[list[str]]:
    """The observables of each histogram figure, in page order: every global observable alone, then
    per family of per-layer observables (``x_centre`` of ``x_centre_0``, ``x_centre_1``, ...) its
    layers in figures of at most :data:`LAYERS_PER_GRID`. Every name of ``names`` is in one group."""
    glob = [[k] for k in names if not _is_per_layer(k)]
    families: dict[str, list[str]] = {}
    for k in names:
        if _is_per_layer(k):
            families.setdefault(k.rpartition("_")[0], []).append(k)
    per = [members[a:a + LAYERS_PER_GRID] for members in families.values()
           for a in range(0, len(members), LAYERS_PER_GRID)]
    return glob + per


def _normalised(counts: np.ndarray, binning: Binning) -> np.ndarray:
    """Density of the k regular bins of ``counts`` (k + 2,): divided by the counted total (the in-range
    total when the binning drops what falls outside, as the scores do) and by the bin widths."""
    return counts[1:-1] / max(int(binning.scored(counts).sum()), 1) / np.diff(np.asarray(binning.edges))


def _hist_plot(path: Path, name: str, binning: Binning, ref: np.ndarray, cand: np.ndarray, sp: float | None) -> None:
    """Normalised histograms of observable ``name`` (counts (k + 2,) with under/overflow) and their ratio,
    titled with its separation power ``sp``."""
    edges = np.asarray(binning.edges)
    rn, cn = _normalised(ref, binning), _normalised(cand, binning)
    fig, (ax, axr) = plt.subplots(2, 1, figsize=(6, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    hep.histplot(rn, edges, ax=ax, label="reference", color="k")
    hep.histplot(cn, edges, ax=ax, label="candidate", color="tab:red")
    ax.set_ylabel("normalised")
    title = name + (f"  (S = {sp:.3g})" if sp is not None else "")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    if binning.log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(rn > 0, cn / rn, np.nan)
    axr.stairs(ratio, edges, color="tab:red")
    axr.axhline(1, color="k", lw=0.8)
    axr.set_ylim(0.5, 1.5)
    axr.set_ylabel("cand/ref")
    axr.set_xlabel(name)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def _hist_grid(path: Path, names: list[str], pd: PlotData, sp: dict[str, Any]) -> None:
    """One panel per observable of ``names`` (the layers of one family): normalised reference and
    candidate histograms, titled with the separation power of ``sp``."""
    rows = math.ceil(len(names) / _GRID_COLUMNS)
    cols = min(len(names), _GRID_COLUMNS)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names, strict=False):
        b = pd.binnings[name]
        ax.stairs(_normalised(pd.ref_counts[name], b), b.edges, color="k", label="reference")
        ax.stairs(_normalised(pd.cand_counts[name], b), b.edges, color="tab:red", label="candidate")
        if b.log:
            ax.set_xscale("log")
        s = sp.get(name)
        ax.set_title(name + (f"  (S = {s:.3g})" if s is not None else ""), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.minorticks_off()  # the ROOT style's minor ticks are half the drawing time of a panel
    for ax in axes.ravel()[len(names):]:
        ax.set_axis_off()
    axes[0, 0].legend(fontsize=7)
    # fixed margins: tight_layout draws every panel once more to measure it (~40 % of a 12-panel figure)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.06, top=0.94, wspace=0.3, hspace=0.45)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def _images_plot(path: Path, pd: PlotData, layers: list[int]) -> None:
    """Mean voxel energy / E_inc of the ``layers``, reference above candidate."""
    g = pd.geometry
    cols = len(layers)
    fig, axes = plt.subplots(2, cols, figsize=(max(2.6 * cols, 4.5), 6.0), squeeze=False)
    for j, i in enumerate(layers):
        sl = g.layer_slice(i)
        shape = g.layer_shape(i)
        vmax = max(pd.ref_image[sl].max(), pd.cand_image[sl].max(), 1e-12)
        for row, (img, lab) in enumerate(((pd.ref_image, "reference"), (pd.cand_image, "candidate"))):
            ax = axes[row, j]
            im = ax.imshow(img[sl].reshape(shape), origin="lower", aspect="auto", vmin=0, vmax=vmax, cmap="viridis")
            ax.set_title(f"{lab} layer {i}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=axes[:, j].tolist(), shrink=0.6)
    fig.suptitle("mean voxel energy / E_inc (rows: angle or y; columns: r or x)", fontsize=9)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def _profiles_plot(path: Path, pd: PlotData) -> None:
    """Longitudinal (per layer, mm) and radial (mm) mean energy fractions; for air showers, the mean
    profile of the first two channels against slant depth (g/cm^2)."""
    g = pd.geometry
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if g.profile is None:
        z = g.layer_z_centres()
        lr = np.array([pd.ref_image[g.layer_slice(i)].sum() for i in range(g.n_layers)])
        lc = np.array([pd.cand_image[g.layer_slice(i)].sum() for i in range(g.n_layers)])
        axes[0].plot(z, lr, "k-o", ms=3, label="reference")
        axes[0].plot(z, lc, "r--s", ms=3, label="candidate")
        axes[0].set_xlabel("depth of layer centre [mm]")
        axes[0].set_ylabel("mean E_layer / E_inc")
        if pd.radial_edges is not None and pd.ref_radial is not None and pd.cand_radial is not None:
            axes[1].stairs(pd.ref_radial, pd.radial_edges, color="k", label="reference")
            axes[1].stairs(pd.cand_radial, pd.radial_edges, color="tab:red", label="candidate")
            axes[1].set_yscale("log")
            axes[1].set_xlabel("r [mm]")
            axes[1].set_ylabel("mean E(r bin) / E_inc")
    else:
        x = g.profile.centres()
        for i, ch in enumerate(g.profile.channels[:2]):
            sl = g.layer_slice(i)
            axes[i].plot(x, pd.ref_image[sl], "k-", label="reference")
            axes[i].plot(x, pd.cand_image[sl], "r--", label="candidate")
            axes[i].set_xlabel("slant depth [g/cm^2]")
            axes[i].set_ylabel(f"mean {ch} / E_inc")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def _response_plot(path: Path, resp: dict[str, Any]) -> None:
    """Response (mean E_vis/E_inc) and resolution against E_inc (GeV) with the resolution fits."""
    rows = resp["per_energy"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for side, style in (("reference", "ko"), ("candidate", "rs")):
        e = np.array([r.get(f"energy_mean_gev_{side}") or np.nan for r in rows], dtype=float)
        for ax, key in ((axes[0], "response"), (axes[1], "resolution")):
            y = np.array([r.get(f"{key}_{side}") or np.nan for r in rows], dtype=float)
            dy = np.array([r.get(f"{key}_error_{side}") or np.nan for r in rows], dtype=float)
            ax.errorbar(e, y, dy, fmt=style, ms=4, label=side)
        fit = resp["fit"].get(side, {})
        a, b = fit.get("a"), fit.get("b")
        if a is not None and b is not None and np.isfinite(e).any():
            ee = np.geomspace(np.nanmin(e), np.nanmax(e), 50)
            axes[1].plot(ee, np.sqrt(a**2 / ee + b**2), style[0] + "-", lw=0.8,
                         label=f"{side}: a={a:.3g}, b={b:.3g}")
    axes[0].set_ylabel("mean E_vis / E_inc")
    axes[1].set_ylabel("sigma / mean of E_vis / E_inc")
    for ax in axes:
        ax.set_xlabel("E_inc [GeV]")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table with the ``header`` cells and one row per list of ``rows``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _header_html(result: dict[str, Any]) -> list[str]:
    """The page head and the inputs paragraph (files, shower counts, geometry, particle, seed)."""
    return [
        "<html><head><meta charset='utf-8'><title>fastshower evaluation</title><style>"
        + _STYLE + "</style></head><body>",
        "<h1>fastshower evaluation</h1>",
        f"<p>reference: <code>{html.escape(result['reference'])}</code> ({result['n_reference']} showers)<br>"
        f"candidate: <code>{html.escape(result['candidate'])}</code> ({result['n_candidate']} showers)<br>"
        f"geometry {html.escape(result['geometry'])}, particle {html.escape(str(result['particle']))}, "
        f"seed {result['seed']}<br>"
        f"histogram binning: {html.escape(str(result.get('histogram_binning', 'quantile')))}; "
        f"low-level classifier input: {html.escape(str(result.get('classifier_low_input', '-')))}</p>",
    ]


def _distance_rows(result: dict[str, Any]) -> list[list[Any]]:
    """Summary rows [score, value, error, floor] of the scores that have a floor: classifier AUC and
    JSD, FPD and KPD (x1e3), and the separation power averaged over observables."""
    fl = result.get("floor", {})
    rows: list[list[Any]] = []
    for side in ("low", "high"):
        c = result.get("classifier", {}).get(side)
        if c:
            f = fl.get("classifier", {}).get(side, {})
            rows.append([f"classifier AUC ({side}-level)", c.get("auc"), c.get("auc_error"), f.get("auc")])
            rows.append([f"classifier JSD ({side}-level)", c.get("jsd"), c.get("jsd_error"), f.get("jsd")])
    for key in ("fpd", "kpd"):
        if key in result:
            rows.append([f"{key.upper()} x1e3", result[key]["value"], result[key]["error"],
                         fl.get(key, {}).get("value")])
    sp = result.get("separation_power", {})
    if sp:
        vals = [v for v in sp.values() if v is not None]
        fsp = [v for v in fl.get("separation_power", {}).values() if v is not None]
        rows.append(["separation power, mean over observables", float(np.mean(vals)), None,
                     float(np.mean(fsp)) if fsp else None])
    return rows


def _physics_rows(result: dict[str, Any]) -> list[list[Any]]:
    """Summary rows [score, value, error, None] of each file's own properties: multi-peak fraction,
    support size and the resolution fit's stochastic (a) and constant (b) terms."""
    rows: list[list[Any]] = []
    if "multi_peak" in result:
        m = result["multi_peak"]
        rows.append(["multi-peak fraction reference", m["reference"], m["reference_error"], None])
        rows.append(["multi-peak fraction candidate", m["candidate"], m["candidate_error"], None])
    if "support_size" in result and "reference" in result["support_size"]:
        for side in ("reference", "candidate"):
            s = result["support_size"][side]
            rows.append([f"support size {side} (birthday)", s["support"], s["error"], None])
    if "response" in result:
        for side in ("reference", "candidate"):
            f = result["response"]["fit"][side]
            rows.append([f"resolution a (stochastic) {side}", f["a"], f["a_error"], None])
            rows.append([f"resolution b (constant) {side}", f["b"], f["b_error"], None])
    return rows


def _tables_html(result: dict[str, Any]) -> list[str]:
    """The Summary table, the Per energy table and the Observables table (the last two when present)."""
    summary = _distance_rows(result) + _physics_rows(result)
    parts = ["<h2>Summary</h2>", _table(["score", "value", "error", "floor (reference halves)"], summary)]
    rows = result.get("per_energy", [])
    if rows:
        cols = [k for k in _PER_ENERGY_COLUMNS if any(k in r for r in rows)]
        parts += ["<h2>Per energy</h2>", _table(cols, [[r.get(k) for k in cols] for r in rows])]
    sp = result.get("separation_power", {})
    if sp:
        w1 = result.get("w1", {})
        chi = result.get("chi2_ndf", {})
        err = result.get("separation_power_error", {})
        fsp = result.get("floor", {}).get("separation_power", {})
        parts += ["<h2>Observables</h2>", _table(
            ["observable", "separation power", "error", "floor", "W1", "chi2/ndf"],
            [[k, v, err.get(k), fsp.get(k), w1.get(k), chi.get(k)] for k, v in sp.items()],
        )]
    return parts


def _write_plots(plots: Path, result: dict[str, Any], pd: PlotData) -> list[str]:
    """Write the PNGs into the folder ``plots``: mean images, profiles, response (when scored) and
    one histogram per selected observable; returns their file names in page order."""
    sp = result.get("separation_power", {})
    figs: list[str] = []
    # mplhep's ROOT look with fonts scaled to these small multi-panel figures
    with plt.style.context([hep.style.ROOT, _RC]):
        n = pd.geometry.n_layers
        for g, a in enumerate(range(0, n, LAYERS_PER_IMAGE)):
            _images_plot(plots / f"images_{g:02d}.png", pd, list(range(a, min(a + LAYERS_PER_IMAGE, n))))
            figs.append(f"images_{g:02d}.png")
        _profiles_plot(plots / "profiles.png", pd)
        figs.append("profiles.png")
        if "response" in result:
            _response_plot(plots / "response.png", result["response"])
            figs.append("response.png")
        for i, names in enumerate(_plot_groups(list(pd.binnings))):
            if not _is_per_layer(names[0]):
                fn = f"hist_{i:03d}.png"
                b = pd.binnings[names[0]]
                _hist_plot(plots / fn, names[0], b, pd.ref_counts[names[0]], pd.cand_counts[names[0]],
                           sp.get(names[0]))
            else:
                fn = f"layers_{i:03d}.png"
                _hist_grid(plots / fn, names, pd, sp)
            figs.append(fn)
    return figs


def write_report(out: Path, result: dict[str, Any], pd: PlotData) -> Path:
    """Write ``out/report.html`` and its PNGs under ``out/plots``; returns the HTML path."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    parts = _header_html(result) + _tables_html(result)
    figs = _write_plots(plots, result, pd)
    parts += ["<h2>Plots</h2>"] + [f"<img src='plots/{f}' alt='{f}'>" for f in figs]
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path
