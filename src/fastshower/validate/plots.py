"""The report's figures (matplotlib Agg, mplhep's ROOT style) and the numbers they draw.

Every histogram shows:

- the normalised counts (density: counts / total / bin width) of both samples with Poisson error
  bars, sqrt(counts) scaled the same way;
- explicit underflow and overflow bins, as wide as the neighbouring regular bin and shaded, when
  either sample has values outside the binning's range: nothing either sample holds is hidden;
- a ratio panel candidate / reference with the propagated Poisson errors, its range set by the
  data, and, when the floor was computed, the ratio of the reference's two random halves as a grey
  band (the Geant4-vs-Geant4 spread the candidate is judged against);
- an axis label with the unit (:func:`axis_label`) and the separation power against its floor.

Plots are made from the streamed histograms and mean images, never from raw showers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.ticker import NullFormatter

from fastshower.geometry import Geometry
from fastshower.validate.metrics import Binning

__all__ = ["FIT_FORMULA", "Density", "PlotData", "axis_label", "density", "display_edges", "family_label", "ratio"]

#: axis label (with unit) of each observable that is not per layer
_LABELS = {
    "E_tot/E_inc": "E_vis / E_inc",
    "E_tot": "E_vis [MeV]",
    "max_cell": "largest cell energy [MeV]",
    "sparsity": "fraction of cells without energy",
    "n_hits": "cells with energy",
    "n_peaks": "local maxima (> 2 % of E_vis)",
    "z_centre": "depth centre of energy [mm]",
    "z_width": "depth spread of energy [mm]",
    "E1/E9": "E1 / E9 (centre cell / 3x3 cells)",
    "E9/E25": "E9 / E25 (3x3 / 5x5 cells)",
    "voxel_energy": "cell energy [MeV] (cells with energy)",
    "Xmax": "X_max [g/cm²]",
    "dEdX_max": "dE/dX at X_max [MeV/(g/cm²)]",
    "X_width": "profile width [g/cm²]",
    "X_mean": "mean slant depth [g/cm²]",
}
#: axis label of each per-layer family, ``{i}`` the layer
_LAYER_LABELS = {
    "E_layer": "energy in layer {i} [MeV]",
    "x_centre": "x centre of energy, layer {i} [mm]",
    "y_centre": "y centre of energy, layer {i} [mm]",
    "x_width": "x width of energy, layer {i} [mm]",
    "y_width": "y width of energy, layer {i} [mm]",
    "r_centre": "mean r of energy, layer {i} [mm]",
    "r_width": "r spread of energy, layer {i} [mm]",
    "sparsity": "fraction of empty cells, layer {i}",
}
_REF, _CAND, _BAND = "k", "tab:red", "0.8"


def family_label(family: str) -> str:
    """What a per-layer family (``E_layer`` of ``E_layer_0``, ...) shows, with its unit, for captions."""
    text = _LAYER_LABELS.get(family)
    if text is None:
        return family
    return text.replace(" in layer {i}", " per layer").replace(", layer {i}", " per layer").replace(" layer {i}",
                                                                                                     " per layer")


def axis_label(name: str, profile: bool = False) -> str:
    """The axis label, with its unit, of observable ``name`` (air-shower profiles: ``profile``)."""
    if profile and name == "E_tot":
        return "sum of the profile's bins"
    family, _, layer = name.rpartition("_")
    if layer.isdigit() and family in _LAYER_LABELS:
        return _LAYER_LABELS[family].format(i=layer)
    return _LABELS.get(name, name)


@dataclass
class PlotData:
    """What the plots need.

    Attributes:
        binnings: observable -> fixed binning; ref_counts / cand_counts: observable -> counts (k + 2,)
            with under/overflow.
        ref_image / cand_image: mean of voxels / E_inc, shape (V,).
        radial_edges: (k + 1,) mm or None (air showers); ref_radial / cand_radial: mean energy
            fraction per radial bin, shape (k,).
        ref_halves: the counts of the reference's two random halves (the floor), or None.
        energy_labels: one label per energy bin; ref_counts_e / cand_counts_e: per energy bin,
            observable -> counts (every observable but the voxel spectrum).
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
    ref_halves: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
    energy_labels: list[str] = field(default_factory=list)
    ref_counts_e: list[dict[str, np.ndarray]] = field(default_factory=list)
    cand_counts_e: list[dict[str, np.ndarray]] = field(default_factory=list)


# ======================================================================================
# numbers
# ======================================================================================


def display_edges(binning: Binning, under: bool, over: bool) -> np.ndarray:
    """Edges of the drawn bins, shape (k + 1 + under + over,): the binning's, with an underflow
    (overflow) bin as wide as the first (last) regular bin in front (behind) when asked (log
    binnings: as wide in log)."""
    e = np.asarray(binning.edges, dtype=np.float64)
    if binning.log and e[0] > 0:
        lo, hi = e[0] * e[0] / e[1], e[-1] * e[-1] / e[-2]
    else:
        lo, hi = 2 * e[0] - e[1], 2 * e[-1] - e[-2]
    return np.concatenate([[lo] if under else [], e, [hi] if over else []])


@dataclass(frozen=True)
class Density:
    """A histogram as drawn: ``edges`` (m + 1,) in the observable's unit; ``value`` and ``error``
    (m,): counts / total / bin width and sqrt(counts) / total / bin width, with ``total`` the
    counts the scores compare (the in-range total when the binning drops what falls outside)."""

    edges: np.ndarray
    value: np.ndarray
    error: np.ndarray
    total: int


def density(counts: np.ndarray, binning: Binning, under: bool, over: bool) -> Density:
    """The drawn density of ``counts`` (k + 2,) on ``binning``, with the underflow / overflow bin
    (``under`` / ``over``) included as a bin of its own (see :func:`display_edges`)."""
    c = np.asarray(counts, dtype=np.float64)
    shown = c[(0 if under else 1): (len(c) if over else len(c) - 1)]
    edges = display_edges(binning, under, over)
    total = int(np.asarray(binning.scored(counts)).sum())
    scale = 1.0 / (max(total, 1) * np.diff(edges))
    return Density(edges, shown * scale, np.sqrt(shown) * scale, total)


def ratio(num: Density, den: Density) -> tuple[np.ndarray, np.ndarray]:
    """``num / den`` per bin and its error (both Poisson errors propagated), shape (m,) each; NaN
    where ``den`` is empty."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(den.value > 0, num.value / den.value, np.nan)
        err = np.sqrt((num.error / den.value) ** 2 + (r * den.error / den.value) ** 2)
    return r, np.where(den.value > 0, err, np.nan)


def _flows(*counts: np.ndarray) -> tuple[bool, bool]:
    """Whether any of the histograms ``counts`` (k + 2,) has underflow, overflow."""
    return any(c[0] > 0 for c in counts), any(c[-1] > 0 for c in counts)


def _ratio_limits(r: np.ndarray, err: np.ndarray, den: Density) -> tuple[float, float]:
    """y range of a ratio panel: the ratios +- errors of the bins with >= 10 reference counts (the
    rest are noise), at least 0.8-1.2, at most 0-3 (points beyond sit on the edge)."""
    counts = den.value * den.total * np.diff(den.edges)
    ok = np.isfinite(r) & (counts >= 10)
    if not ok.any():
        return 0.0, 2.0
    lo = float(np.nanmin(r[ok] - np.nan_to_num(err[ok])))
    hi = float(np.nanmax(r[ok] + np.nan_to_num(err[ok])))
    return max(0.0, min(0.8, lo - 0.05)), min(3.0, max(1.2, hi + 0.05))


# ======================================================================================
# one histogram
# ======================================================================================


def _centres(edges: np.ndarray, log: bool) -> np.ndarray:
    return np.sqrt(edges[1:] * edges[:-1]) if log and edges[0] > 0 else 0.5 * (edges[1:] + edges[:-1])


def _errorbars(ax: Axes, d: Density, log: bool, color: str, label: str) -> None:
    """Stairs of ``d`` and its Poisson error bars at the bin centres."""
    ax.stairs(d.value, d.edges, color=color, label=label, lw=1.2)
    ax.errorbar(_centres(d.edges, log), d.value, d.error, fmt="none", ecolor=color, elinewidth=0.8)


def _shade_flows(axes: tuple[Axes, Axes], edges: np.ndarray, under: bool, over: bool, note: str) -> None:
    """Grey background and a label on the drawn underflow / overflow bins."""
    for flag, a, b, text in ((under, edges[0], edges[1], "under" + note), (over, edges[-2], edges[-1], "over" + note)):
        if flag:
            for ax in axes:
                ax.axvspan(a, b, color="0.92", zorder=0)
            axes[0].text(0.5 * (a + b), 0.98, text, transform=axes[0].get_xaxis_transform(), ha="center",
                         va="top", rotation=90, fontsize=7, color="0.35")


def draw_hist(axes: tuple[Axes, Axes], name: str, binning: Binning, ref: np.ndarray, cand: np.ndarray,
              halves: tuple[np.ndarray, np.ndarray] | None, label: str) -> None:
    """Observable ``name`` on ``axes`` (histograms, ratio below): reference and candidate counts
    (k + 2,), the reference halves' ratio as the floor band when ``halves`` is given; x label ``label``."""
    ax, axr = axes
    under, over = _flows(ref, cand)
    dr, dc = density(ref, binning, under, over), density(cand, binning, under, over)
    _errorbars(ax, dr, binning.log, _REF, "reference")
    _errorbars(ax, dc, binning.log, _CAND, "candidate")
    r, err = ratio(dc, dr)
    if halves is not None:
        ha, hb = (density(h, binning, under, over) for h in halves)
        rb, eb = ratio(hb, ha)
        ok = np.isfinite(rb)
        axr.stairs(np.where(ok, rb + eb, 1), dr.edges, baseline=np.where(ok, rb - eb, 1), fill=True,
                   color=_BAND, label="reference half B / half A (floor)")
    axr.errorbar(_centres(dr.edges, binning.log), r, err, fmt="o", ms=2.5, color=_CAND, elinewidth=0.8)
    axr.axhline(1, color="k", lw=0.8)
    lo, hi = _ratio_limits(r, err, dr)
    axr.set_ylim(lo, hi)
    axr.set_ylabel("cand / ref")
    axr.set_xlabel(label)
    ax.set_ylabel("density")
    if binning.log:
        for a in (ax, axr):
            a.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlim(dr.edges[0], dr.edges[-1])
    _shade_flows((ax, axr), dr.edges, under, over, "flow (not scored)" if binning.drop_outside else "flow")


def _title(ax: Axes, text: str, outside: bool) -> None:
    ax.set_title(text, fontsize=9, color="tab:red" if outside else "k")


def hist_figure(path: str, name: str, pd: PlotData, title: str, outside: bool) -> None:
    """One observable in a figure of its own (6 x 5 inches, as every single-histogram figure)."""
    fig, (ax, axr) = plt.subplots(2, 1, figsize=(6, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    halves = (pd.ref_halves[0][name], pd.ref_halves[1][name]) if pd.ref_halves else None
    draw_hist((ax, axr), name, pd.binnings[name], pd.ref_counts[name], pd.cand_counts[name], halves,
              axis_label(name, pd.geometry.profile is not None))
    _title(ax, title, outside)
    ax.legend(fontsize=8, loc="best")
    if halves is not None:
        axr.legend(fontsize=7, loc="upper left", frameon=False)
    fig.subplots_adjust(left=0.13, right=0.97, top=0.93, bottom=0.12, hspace=0.08)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def panel_grid(n: int, columns: int) -> tuple[plt.Figure, list[tuple[Axes, Axes]]]:
    """A figure of ``n`` panels in rows of ``columns``, each a histogram above its ratio (3.6 x 3.4
    inches a panel); unused cells are hidden."""
    rows = math.ceil(n / columns)
    fig = plt.figure(figsize=(3.6 * columns, 3.4 * rows))
    # nested grids: a panel's histogram and ratio touch, while the rows keep room for the x labels above the
    # next row's titles (one flat grid spaced them alike, and the titles hid under the tick labels)
    outer = fig.add_gridspec(rows, columns, hspace=0.42, wspace=0.32)
    out = []
    for k in range(rows * columns):
        r, c = divmod(k, columns)
        inner = outer[r, c].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.08)
        ax = fig.add_subplot(inner[0])
        axr = fig.add_subplot(inner[1], sharex=ax)
        if k >= n:
            ax.set_axis_off()
            axr.set_axis_off()
        else:
            ax.tick_params(labelbottom=False, labelsize=7)
            axr.tick_params(labelsize=7)
            out.append((ax, axr))
    # fixed margins in inches (room for the x labels): tight_layout draws every panel once more to measure it
    height = 3.4 * rows
    fig.subplots_adjust(left=0.7 / (3.6 * columns), right=0.98, bottom=0.6 / height, top=1 - 0.3 / height)
    return fig, out


def grid_figure(path: str, names: list[str], pd: PlotData, titles: dict[str, tuple[str, bool]],
                columns: int = 4) -> None:
    """One panel per observable of ``names`` (the layers of one family), titled by ``titles``."""
    fig, panels = panel_grid(len(names), min(columns, len(names)))
    for (ax, axr), name in zip(panels, names, strict=True):
        halves = (pd.ref_halves[0][name], pd.ref_halves[1][name]) if pd.ref_halves else None
        draw_hist((ax, axr), name, pd.binnings[name], pd.ref_counts[name], pd.cand_counts[name], halves,
                  axis_label(name))
        _title(ax, *titles[name])
        for a in (ax, axr):
            a.xaxis.label.set_fontsize(8)
            a.yaxis.label.set_fontsize(8)
        ax.minorticks_off()  # the ROOT style's minor ticks are half the drawing time of a panel
        axr.minorticks_off()
    panels[0][0].legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def energy_figure(path: str, name: str, pd: PlotData, titles: list[str], columns: int = 4) -> None:
    """Observable ``name`` in one panel per energy bin (reference and candidate of that bin only),
    titled by ``titles`` (one per energy bin)."""
    n = len(pd.energy_labels)
    fig, panels = panel_grid(n, min(columns, n))
    for j, (ax, axr) in enumerate(panels):
        draw_hist((ax, axr), name, pd.binnings[name], pd.ref_counts_e[j][name], pd.cand_counts_e[j][name], None,
                  axis_label(name, pd.geometry.profile is not None))
        _title(ax, titles[j], False)
        ax.minorticks_off()
        axr.minorticks_off()
    panels[0][0].legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ======================================================================================
# mean images, profiles, response
# ======================================================================================


def _relative_difference(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """(cand - ref) / ref per cell, NaN where the reference holds under 1e-4 of its largest cell
    (a ratio of two tiny means is noise)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ref > 1e-4 * max(float(ref.max()), 1e-300), (cand - ref) / ref, np.nan)


def images_figure(path: str, pd: PlotData, layers: list[int]) -> None:
    """Mean voxel energy / E_inc of ``layers``: reference and candidate on one log colour scale,
    and the relative difference (cand - ref) / ref on a diverging one. Up to 3 layers: a row a
    layer (reference, candidate, difference); more: those three as rows, a column a layer."""
    g = pd.geometry
    n, transpose = len(layers), len(layers) <= 3
    shape = (n, 3) if transpose else (3, n)
    fig, axes = plt.subplots(*shape, figsize=(12, 3.6 * n) if transpose else (1.9 * n + 2.2, 6.6), squeeze=False)
    top = max(float(pd.ref_image.max()), float(pd.cand_image.max()), 1e-12)
    norm = LogNorm(vmin=top * 1e-5, vmax=top)
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.93", under="0.93")
    diffs = [_relative_difference(pd.ref_image[g.layer_slice(i)], pd.cand_image[g.layer_slice(i)]) for i in layers]
    finite = np.concatenate([np.abs(d[np.isfinite(d)]) for d in diffs] + [np.zeros(1)])
    lim = float(np.clip(np.quantile(finite, 0.95), 0.05, 1.0))
    for j, i in enumerate(layers):
        sl, ls = g.layer_slice(i), g.layer_shape(i)
        cells = ((pd.ref_image[sl], "reference"), (pd.cand_image[sl], "candidate"), (diffs[j], "(cand - ref) / ref"))
        for row, (img, lab) in enumerate(cells):
            ax = axes[j, row] if transpose else axes[row, j]
            if row < 2:
                im = ax.imshow(np.where(img > 0, img, np.nan).reshape(ls), origin="lower", aspect="auto", norm=norm,
                               cmap=cmap)
            else:
                dim = ax.imshow(img.reshape(ls), origin="lower", aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(f"{lab}, layer {i}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes[:, :2].ravel().tolist() if transpose else axes[:2].ravel().tolist(), shrink=0.8,
                 label="mean cell energy / E_inc")
    fig.colorbar(dim, ax=axes[:, 2].tolist() if transpose else axes[2].tolist(), shrink=0.8,
                 label="relative difference")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def profiles_figure(path: str, pd: PlotData) -> None:
    """Longitudinal (per layer, mm) and radial (mm) mean energy fractions; for air showers, the mean
    profile of the first two channels against slant depth (g/cm^2)."""
    g = pd.geometry
    if g.n_layers == 1 and g.profile is None:  # one layer: no longitudinal profile to draw
        fig, ax = plt.subplots(figsize=(6, 5))
        axes = np.array([ax, ax])
    else:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if g.profile is None and g.n_layers > 1:
        z = g.layer_z_centres()
        lr = np.array([pd.ref_image[g.layer_slice(i)].sum() for i in range(g.n_layers)])
        lc = np.array([pd.cand_image[g.layer_slice(i)].sum() for i in range(g.n_layers)])
        axes[0].plot(z, lr, "k-o", ms=3, label="reference")
        axes[0].plot(z, lc, "r--s", ms=3, label="candidate")
        axes[0].set_xlabel("depth of layer centre [mm]")
        axes[0].set_ylabel("mean E_layer / E_inc")
    if g.profile is None:
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
            axes[i].set_xlabel("slant depth [g/cm²]")
            axes[i].set_ylabel(f"mean {ch} / E_inc")
    for ax in set(axes):
        ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.13 if len(set(axes)) == 1 else 0.08, right=0.97, bottom=0.14, top=0.95, wspace=0.25)
    fig.savefig(path, dpi=100)
    plt.close(fig)


#: the resolution fit, in words (legend and report)
FIT_FORMULA = "σ/E = a/√(E/GeV) ⊕ b"
#: the same in matplotlib's mathtext (the plot fonts lack the circled plus)
_FIT_MATH = r"$\sigma/E = a\,(E/\mathrm{GeV})^{-1/2} \oplus b$"


def _fit_label(side: str, fit: dict) -> str:
    """Legend text of one resolution fit: a and b, each marked when at the fit's bound 0."""
    bound = set(fit.get("at_bound", []))
    parts = [f"{k} = {fit[k]:.3g}" + (" (at bound 0)" if k in bound else "") for k in ("a", "b")]
    return f"{side}: " + ", ".join(parts)


def response_figure(path: str, resp: dict) -> None:
    """Response (mean E_vis/E_inc) and resolution against E_inc (GeV) with the resolution fits
    :data:`FIT_FORMULA`."""
    rows = resp["per_energy"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
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
            axes[1].plot(ee, np.sqrt(a**2 / ee + b**2), style[0] + "-", lw=0.8, label=_fit_label(side, fit))
    axes[0].set_ylabel("mean E_vis / E_inc")
    axes[1].set_ylabel("σ / mean of E_vis / E_inc")
    axes[1].set_title(f"fit: {_FIT_MATH}", fontsize=10)
    for ax in axes:
        ax.set_xlabel("E_inc [GeV]")
        ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.92, wspace=0.25)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def amplification_figure(path: str, amp: dict) -> None:
    """Quantile-binned MSE against sample size n (log-log) of the training (MC) subsamples and the
    generated ones, with both fits and the generated sample's equivalent MC size (arXiv:2008.06545)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style, label in (("train", "ko", "training sample (MC)"), ("generated", "rs", "generated")):
        c = amp["curves"][key]
        ax.errorbar(c["n"], c["mse"], np.nan_to_num(np.asarray(c["error"], dtype=float)), fmt=style, ms=4,
                    label=label)
    n_max = max(amp["curves"]["generated"]["n"][-1], amp["curves"]["train"]["n"][-1], amp["equivalent_mc_showers"])
    n = np.geomspace(amp["curves"]["train"]["n"][0], n_max, 100)
    ft, fg = amp["fit_train"], amp["fit_generated"]
    ax.plot(n, ft["a"] / n + ft["floor"], "k-", lw=0.8, label="MC fit a (1/n + 1/n_ref)")
    ax.plot(n, fg["a"] / n + fg["floor"], "r--", lw=0.8, label="generated fit a/n + floor")
    more = "≥ " if amp["amplification_at_limit"] else ""
    ax.axvline(amp["equivalent_mc_showers"], color="grey", ls=":",
               label=f"equivalent MC showers ({more}{amp['equivalent_mc_showers']:.3g}, amplification "
               f"{more}{amp['amplification']:.3g})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sample size n")
    ax.set_ylabel("quantile MSE")
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.13, right=0.98, bottom=0.13, top=0.96)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def downstream_figure(path: str, down: dict, quantity: str = "E_pred / E_inc") -> None:
    """Bias and resolution of a downstream reconstruction against mean E_inc (GeV) per energy bin,
    held-out reference and candidate (top), and candidate - reference (bottom). ``quantity``: what the
    rows' bias and resolution are of ("E_pred / E_inc": mean - 1 and std; else its text labels the axes)."""
    rows = down["per_energy"]
    e = np.array([r["energy_mean_gev"] if r["energy_mean_gev"] is not None else np.nan for r in rows], dtype=float)
    fig, axes = plt.subplots(2, 2, figsize=(12, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})

    def col(key: str) -> np.ndarray:
        return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)

    for j, key in enumerate(("bias", "resolution")):
        for side, style in (("reference", "ko"), ("candidate", "rs")):
            axes[0, j].errorbar(e, col(f"{side}_{key}"), col(f"{side}_{key}_error"), fmt=style, ms=4,
                                label=f"{side}" + (" (held out)" if side == "reference" else ""))
        axes[1, j].errorbar(e, col(f"{key}_difference"), col(f"{key}_difference_error"), fmt="bD", ms=4)
        axes[1, j].axhline(0, color="grey", lw=0.8)
        if quantity == "E_pred / E_inc":
            axes[0, j].set_ylabel("mean(E_pred / E_inc) - 1" if key == "bias" else "std(E_pred / E_inc)")
        else:
            axes[0, j].set_ylabel(f"{key} of {quantity}")
        axes[1, j].set_ylabel("cand. - ref.")
        axes[1, j].set_xlabel("E_inc [GeV]")
        axes[1, j].set_xscale("log")
        axes[1, j].xaxis.set_minor_formatter(NullFormatter())  # "3x10^0 4x10^0" crowded the axis
        axes[0, j].legend(fontsize=8)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.11, top=0.97, wspace=0.25, hspace=0.08)
    fig.savefig(path, dpi=100)
    plt.close(fig)
