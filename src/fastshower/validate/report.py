"""HTML report with PNG plots (:mod:`fastshower.validate.plots`) for :func:`fastshower.validate.evaluate`.

Plots are made from the streamed summaries (histogram counts, mean images), never from raw
showers, and the scores come from the metrics dict: the report shows the numbers of
metrics.json, it does not compute its own. The page opens with the verdict
(:mod:`fastshower.validate.verdict`): every observable's separation power against the
Geant4-vs-Geant4 floor, flagged where it lies outside the floor's spread, and the classifier AUCs.

Every observable and every layer is plotted, however many layers the detector has: a global
observable gets a figure of its own (all of one size, two to a row); a per-layer one (``E_layer_i``,
``x_centre_i``, ...) a panel in a grid of its family, at most :data:`LAYERS_PER_GRID` layers a figure
(45 layers: 4 figures a family); the mean images come :data:`LAYERS_PER_IMAGE` layers a figure.
A file with several energies also gets E_vis/E_inc and the worst observable per energy bin.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mplhep as hep
import numpy as np

from fastshower.validate import plots as P
from fastshower.validate.plots import PlotData
from fastshower.validate.verdict import (
    CLASSIFIER_SIDES,
    N_SIGMA,
    STATUS_TEXT,
    Verdict,
    headline,
    observable_verdicts,
    score_verdicts,
)

__all__ = ["LAYERS_PER_GRID", "LAYERS_PER_IMAGE", "Figure", "PlotData", "write_report"]

#: layers per figure of a per-layer observable (a 4-column grid of panels)
LAYERS_PER_GRID = 12
#: layers per figure of the mean images (reference, candidate, difference)
LAYERS_PER_IMAGE = 8

_RC = {"font.size": 11, "axes.titlesize": 11, "axes.labelsize": 11, "xtick.labelsize": 9, "ytick.labelsize": 9,
       "legend.fontsize": 9, "figure.titlesize": 11}
#: the page's CSS: single-histogram figures two to a row, all of one size; wide figures a row each
_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1300px} table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #aaa;padding:2px 8px;text-align:right} td:first-child,td.t{text-align:left}"
          ".grid{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:16px}"
          ".grid figure{margin:0} .grid img{width:100%;border:1px solid #ddd} .wide{grid-column:1/-1}"
          "figcaption{font-size:0.85em;color:#333} .outside{color:#b00;font-weight:bold} .within{color:#070}"
          ".scroll{max-height:480px;overflow-y:auto;display:inline-block} .note{font-size:0.9em;color:#333}")
#: columns of the Per energy table, in order (those no row has are left out): metrics.json key -> heading
_PER_ENERGY_COLUMNS = {"label": "energy", "n_reference": "showers ref", "n_candidate": "showers cand",
                       "separation_power_E_tot/E_inc": "S(E_tot/E_inc)", "separation_power_mean": "mean S",
                       "separation_power_max": "worst S", "separation_power_max_observable": "worst observable",
                       "auc_low": "AUC low-level", "auc_high": "AUC high-level", "ssim_reference": "SSIM ref",
                       "ssim_candidate": "SSIM cand"}


@dataclass(frozen=True)
class Figure:
    """One PNG of the page: its file name under plots/, its caption, its section heading, and
    whether it spans the page's width (multi-panel figures) or takes one cell of the grid."""

    file: str
    caption: str
    section: str
    wide: bool = False


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


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table with the ``header`` cells and one row per list of ``rows``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    # text (names, notes) left-aligned, numbers right-aligned
    body = "".join("<tr>" + "".join(f"<td class='t'>{_fmt(c)}</td>" if isinstance(c, str) else f"<td>{_fmt(c)}</td>"
                                    for c in r) + "</tr>" for r in rows)
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


def _raw_jsd(value: Any) -> Any:
    """A JSD cell: the estimate, or "0 (estimate x)" when it fell below 0 (the estimator's noise
    around 0: the two samples are as close as it can tell)."""
    if isinstance(value, float) and value < 0:
        return f"0 (estimate {value:.2g}: noise around 0)"
    return value


def _distance_rows(result: dict[str, Any]) -> list[list[Any]]:
    """Summary rows [score, value, error, floor, how to read] of the scores that have a floor:
    classifier AUC and JSD, FPD and KPD (x1e3), and the separation power averaged over observables."""
    fl = result.get("floor", {})
    rows: list[list[Any]] = []
    for side, label in CLASSIFIER_SIDES.items():
        c = result.get("classifier", {}).get(side)
        if c:
            f = fl.get("classifier", {}).get(side, {})
            rows.append([f"classifier AUC ({label})", c.get("auc"), c.get("auc_error"), f.get("auc"),
                         f"0.5: cannot tell the samples apart; 1: always can. Input: {c.get('input', '-')}"])
            rows.append([f"classifier JSD ({label})", _raw_jsd(c.get("jsd")), c.get("jsd_error"),
                         _raw_jsd(f.get("jsd")), "bits; 0: same, 1: disjoint (from the calibrated classifier)"])
    for key in ("fpd", "kpd"):
        if key in result:
            rows.append([f"{key.upper()} x1e3", result[key]["value"], result[key]["error"],
                         fl.get(key, {}).get("value"), ("Fréchet" if key == "fpd" else "kernel")
                         + " distance of the high-level observables; 0: same"])
    rows += _projection_rows(result.get("projections", {}))
    sp = result.get("separation_power", {})
    if sp:
        vals = [v for v in sp.values() if v is not None]
        fsp = [v for v in fl.get("separation_power", {}).values() if v is not None]
        rows.append(["separation power, mean over observables", float(np.mean(vals)), None,
                     float(np.mean(fsp)) if fsp else None, "0: same histograms, 1: disjoint"])
    return rows


def _projection_rows(pr: dict[str, Any]) -> list[list[Any]]:
    """Summary rows of the 3DGAN papers' projection checks (module projections): the separation power of
    the x, y and z profiles of the mean shower and of each shower's x, y, z moments, with the floor."""
    rows: list[list[Any]] = []
    for ax, p in pr.get("profiles", {}).items():
        rows.append([f"{ax} profile separation power", p["separation_power"], None, p.get("floor_separation_power"),
                     f"normalised mean-shower energy along {ax} read as a histogram; largest |cand/ref - 1| in bins "
                     f"with >= 1 % of the energy: {_fmt(p.get('max_rel_dev'), 3)}"])
    for k, m in pr.get("moments", {}).items():
        what = "first moment (mean)" if k.endswith("mean") else "second moment (RMS)"
        rows.append([f"{k} separation power", m["separation_power"], None, m.get("floor_separation_power"),
                     f"{what} of each shower's energy along {k[0]}, mm: reference {_fmt(m['reference_mean'], 4)}, "
                     f"candidate {_fmt(m['candidate_mean'], 4)} on average"])
    return rows


_SUPPORT_NOTE = ("birthday paradox: how many distinct showers the sample behaves as if drawn from (two showers "
                 "closer than {thr} count as the same); a candidate far below the reference repeats itself "
                 "(mode collapse){cens}")


def _fit_note(fit: dict[str, Any], name: str) -> str:
    """How to read one resolution-fit parameter: the formula, and a flag when it sits at the bound 0."""
    if name in fit.get("at_bound", []):
        return (f"fit {P.FIT_FORMULA}: AT THE BOUND 0 (the data need no {'stochastic' if name == 'a' else 'constant'}"
                " term, or cannot tell it apart): a limit, not a measurement")
    return f"fit {P.FIT_FORMULA}, E_inc in GeV"


def _physics_rows(result: dict[str, Any]) -> list[list[Any]]:
    """Summary rows [score, value, error, None, how to read] of each file's own properties: multi-peak
    fraction, support size and the resolution fit's stochastic (a) and constant (b) terms."""
    rows: list[list[Any]] = []
    if "multi_peak" in result:
        m = result["multi_peak"]
        note = f"showers with two or more local maxima above {m.get('peak_fraction', 0.02):.0%} of E_vis"
        rows.append(["multi-peak fraction reference", m["reference"], m["reference_error"], None, note])
        rows.append(["multi-peak fraction candidate", m["candidate"], m["candidate_error"], None, note])
    if "support_size" in result and "reference" in result["support_size"]:
        sup = result["support_size"]
        for side in ("reference", "candidate"):
            s = sup[side]
            cens = (f"; no near-duplicate in {s['censored']:.0%} of the orderings: a lower bound"
                    if s.get("censored") else "")
            rows.append([f"support size {side} (birthday)", s["support"], s["error"], None,
                         _SUPPORT_NOTE.format(thr=_fmt(sup.get("threshold"), 3) + " in voxels / E_inc", cens=cens)])
    if "response" in result:
        for side in ("reference", "candidate"):
            f = result["response"]["fit"][side]
            for k, what in (("a", "stochastic"), ("b", "constant")):
                # at the bound the fitted ~1e-14 and its error say nothing: shown as the bound itself
                at = k in f.get("at_bound", [])
                rows.append([f"resolution {k} ({what}) {side}", 0.0 if at else f[k], None if at else f[f"{k}_error"],
                             None, _fit_note(f, k)])
    return rows


def _verdict_cells(v: Verdict) -> str:
    """The status cell of a verdict, coloured."""
    cls = {"outside": "outside", "within": "within"}.get(v.status, "")
    return f"<td class='{cls}'>{html.escape(v.status)}</td>"


def _verdict_table(first: str, verdicts: list[Verdict]) -> str:
    """A table of verdicts: name, value, error, floor, floor error, pull, status."""
    head = "".join(f"<th>{h}</th>" for h in (first, "value", "error", "floor", "floor error", "pull", "verdict"))
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in (v.name, v.value, v.error, v.floor, v.floor_error, v.pull))
        + _verdict_cells(v) + "</tr>" for v in verdicts)
    return f"<table><tr>{head}</tr>{body}</table>"


def _verdict_html(result: dict[str, Any]) -> list[str]:
    """The Verdict section (sample-level scores) and the Verdict per observable table, worst first."""
    parts = ["<h2>Verdict</h2>", f"<p><b>{html.escape(headline(result))}</b></p>"]
    scores = score_verdicts(result)
    if scores:
        parts.append(_verdict_table("score", scores))
    obs = observable_verdicts(result)
    if obs:
        parts += ["<h2>Verdict per observable</h2>",
                  "<div class='scroll'>" + _verdict_table("observable", obs) + "</div>"]
    parts.append(
        "<p class='note'>value: the candidate's score against the reference; floor: the same score between two random "
        "halves of the reference (Geant4 vs Geant4, <code>--floor</code>); pull: (value - floor) / combined error. "
        f"<span class='outside'>outside</span>: value - floor &gt; {N_SIGMA:g} combined errors ("
        f"{html.escape(STATUS_TEXT['outside'])}); <span class='within'>within</span>: "
        f"{html.escape(STATUS_TEXT['within'])}; no floor: {html.escape(STATUS_TEXT['no floor'])}. "
        "Separation power S = ½ Σ (p - q)² / (p + q) over the histogram bins: 0 same, 1 disjoint. "
        "AUC: 0.5 indistinguishable, 1 always told apart.</p>")
    return parts


def _tables_html(result: dict[str, Any]) -> list[str]:
    """The Summary table, the Per energy table and the Observables table (the last two when present)."""
    summary = _distance_rows(result) + _physics_rows(result)
    parts = ["<h2>Summary</h2>", _table(["score", "value", "error", "floor (reference halves)", "how to read"],
                                        summary)]
    rows = result.get("per_energy", [])
    if rows:
        cols = [k for k in _PER_ENERGY_COLUMNS if any(k in r for r in rows)]
        parts += ["<h2>Per energy</h2>", _table([_PER_ENERGY_COLUMNS[k] for k in cols],
                                                [[r.get(k) for k in cols] for r in rows]),
                  "<p class='note'>S: separation power of that energy bin's histograms (E_tot/E_inc; the mean and "
                  "the largest over observables, and which); AUC: the classifier's AUC on the showers of that "
                  "energy bin, left out (-) below 20 validation showers of either sample; SSIM: the mean structural "
                  "similarity of pairs of showers within each sample (diversity: a candidate far above the "
                  "reference's repeats itself) (metrics.json: per_energy).</p>"]
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
    return parts + _downstream_html(result.get("downstream", {}))


#: the downstream table's columns (metrics.json's ``downstream.per_energy`` keys)
_DOWNSTREAM_COLUMNS = ("label", "reference_n", "candidate_n", "reference_bias", "candidate_bias", "bias_difference",
                       "bias_difference_error", "bias_significance", "reference_resolution", "candidate_resolution",
                       "resolution_difference", "resolution_difference_error", "resolution_significance")
#: how to read the downstream check (under its table)
DOWNSTREAM_HOW_TO = (
    "An energy regressor (gradient-boosted trees predicting E_inc / E_tot from the shower's shape observables, "
    "E_pred = E_tot x factor) trained on half of the reference subsample, applied to the other half and to the "
    "candidate: bias = mean(E_pred / E_inc) - 1, resolution = std(E_pred / E_inc), with their errors; difference = "
    "candidate - reference, significance = difference / its error. A good candidate is reconstructed like Monte "
    "Carlo: differences within about 3 errors.")

#: the air-shower version (module downstream_profiles)
PROFILE_DOWNSTREAM_HOW_TO = (
    "Three reconstructions trained on half of the reference profiles as a fluorescence detector would see them "
    "(dE/dX in 20 g/cm^2 bins with 5 % noise): the energy (E_cal x a predicted invisible-energy factor), Xmax, and "
    "a p-against-Fe classifier; applied to the other half and to the candidate. Bias = median, resolution = half "
    "the 16-84 % interval (bootstrap errors); a good candidate is reconstructed like Monte Carlo: differences "
    "within about 3 errors, the same AUC.")


def _particle_html(pc: dict[str, Any]) -> list[str]:
    """The particle-identification table of a file of several particles (or its error, or nothing)."""
    if not pc:
        return []
    if "per_class" not in pc:
        return [f"<p class='note'>Particle classifier: {html.escape(str(pc.get('error')))}</p>"]
    cols = ["class", "reference_n", "candidate_n", "reference_efficiency", "candidate_efficiency",
            "efficiency_difference", "efficiency_significance"]
    auc = (f" AUC {_fmt(pc['reference_auc'], 3)} (held-out reference), {_fmt(pc['candidate_auc'], 3)} (candidate)."
           if "reference_auc" in pc else "")
    return [f"<h3>Particle identification (condition {html.escape(pc['condition'])})</h3>",
            _table(cols, [[r.get(k) for k in cols] for r in pc["per_class"]]),
            "<p class='note'>A classifier of the particle (gradient-boosted trees on log E_tot and the shape "
            "observables) trained on half of the reference; efficiency = the fraction of each particle's showers "
            f"classified as that particle.{auc}</p>"]


def _downstream_html(down: dict[str, Any]) -> list[str]:
    """The downstream reconstruction table (per energy bin and all bins), or its error, or nothing."""
    if not down:
        return []
    if "per_energy" not in down:
        return ["<h2>Downstream reconstruction</h2>", f"<p class='note'>{html.escape(str(down.get('error')))}</p>"]
    parts = ["<h2>Downstream reconstruction</h2>"]
    tables = [("", down)]
    if "xmax" in down:  # air-shower profiles: energy and Xmax tables, and the primary classifier
        tables = [("<h3>Energy, E_pred / E (median - 1, half the 16-84 % interval)</h3>", down),
                  ("<h3>Xmax, Xmax_rec - Xmax in g/cm^2 (median, half the 16-84 % interval)</h3>", down["xmax"])]
    for title, t in tables:
        rows = [[r.get(k) for k in _DOWNSTREAM_COLUMNS] for r in t["per_energy"]]
        rows.append(["all"] + [t["all"].get(k) for k in _DOWNSTREAM_COLUMNS[1:]])
        parts += ([title] if title else []) + [_table(list(_DOWNSTREAM_COLUMNS), rows)]
    parts += _particle_html(down.get("particle_classifier", {}))
    clf = down.get("classifier", {})
    if "reference_auc" in clf:
        parts.append(f"<p>Primary classifier (p against Fe, trained on the reference): AUC "
                     f"{_fmt(clf['reference_auc'], 3)} ± {_fmt(clf['reference_auc_error'], 2)} on held-out reference, "
                     f"{_fmt(clf['candidate_auc'], 3)} ± {_fmt(clf['candidate_auc_error'], 2)} on the candidate "
                     f"(difference {_fmt(clf['auc_significance'], 2)} sigma).</p>")
    how = PROFILE_DOWNSTREAM_HOW_TO if "xmax" in down else DOWNSTREAM_HOW_TO
    return [*parts, f"<p class='note'>{html.escape(how)}</p>"]


def _slug(text: str) -> str:
    """A file-name part for an observable: "E_tot/E_inc" -> "E_tot_over_E_inc"."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text.replace("/", "_over_"))


def _flow_text(name: str, pd: PlotData) -> str:
    """The caption's sentence on what lies outside the binning's range (empty when nothing does)."""
    parts = []
    for side, c in (("reference", pd.ref_counts[name]), ("candidate", pd.cand_counts[name])):
        tot = max(int(np.sum(c)), 1)
        if c[0] or c[-1]:
            parts.append(f"{side} {100 * c[0] / tot:.2g} % below, {100 * c[-1] / tot:.2g} % above")
    if not parts:
        return ""
    scored = " (drawn, not scored: this binning drops them)" if pd.binnings[name].drop_outside else ""
    return " Outside the binning's range, in the shaded under/overflow bins: " + "; ".join(parts) + scored + "."


def _score_text(v: Verdict | None, short: bool = False) -> str:
    """ "S = value ± error (floor f ± e): status", or shorter for a grid panel's title."""
    if v is None or v.value is None:
        return ""
    if short:
        return f"S = {v.value:.2g}" + (f" (floor {v.floor:.2g})" if v.floor is not None else "")
    err = f" ± {v.error:.2g}" if v.error is not None else ""
    floor = f" (floor {v.floor:.3g})" if v.floor is not None else ""
    return f"S = {v.value:.3g}{err}{floor}: {v.status}"


_HIST_CAPTION = ("reference (black) and candidate (red), each normalised to unit area, with Poisson error bars; "
                 "below, candidate / reference with propagated errors{band}.")


def _band_text(pd: PlotData) -> str:
    return (", and in grey the ratio of the reference's two random halves (the Geant4-vs-Geant4 floor)"
            if pd.ref_halves is not None else "")


def _hist_figures(plots: Path, pd: PlotData, verdicts: dict[str, Verdict]) -> list[Figure]:
    """One figure per global observable and one grid per family of per-layer observables."""
    figs: list[Figure] = []
    profile = pd.geometry.profile is not None
    cap = _HIST_CAPTION.format(band=_band_text(pd))
    for names in _plot_groups(list(pd.binnings)):
        first = names[0]
        if not _is_per_layer(first) or pd.geometry.n_layers == 1:  # one layer: no grid of one panel
            v = verdicts.get(first)
            fn = f"hist_{_slug(first)}.png"
            P.hist_figure(str(plots / fn), first, pd, f"{first}   {_score_text(v)}", v is not None and
                          v.status == "outside")
            figs.append(Figure(fn, f"<b>{html.escape(P.axis_label(first, profile))}</b>: {cap} "
                               f"{html.escape(_score_text(v))}.{_flow_text(first, pd)}", "Observables"))
            continue
        family = first.rpartition("_")[0]
        layers = [n.rpartition("_")[2] for n in names]
        fn = f"layers_{_slug(family)}_{layers[0]}-{layers[-1]}.png"
        titles = {n: (f"layer {n.rpartition('_')[2]}  {_score_text(verdicts.get(n), short=True)}",
                      getattr(verdicts.get(n), "status", "") == "outside") for n in names}
        P.grid_figure(str(plots / fn), names, pd, titles)
        bad = [n.rpartition("_")[2] for n in names if titles[n][1]]
        what = P.family_label(family)
        figs.append(Figure(fn, f"<b>{html.escape(what)}, layers {layers[0]}-{layers[-1]}</b>: {cap} Titles: "
                           "separation power S and its floor; red: outside the floor"
                           + (f" (layers {', '.join(bad)})" if bad else " (none)") + ".",
                           "Per layer (the CaloChallenge set: layer energies, centres of energy and widths, "
                           "sparsity)", wide=True))
    return figs


def _energy_figures(plots: Path, result: dict[str, Any], pd: PlotData, verdicts: list[Verdict]) -> list[Figure]:
    """Per energy bin (when there are several): E_vis/E_inc and the worst-scoring observable."""
    if len(pd.energy_labels) < 2 or not pd.ref_counts_e:
        return []
    rows = result.get("per_energy", [])
    names = ["E_tot/E_inc"] + [v.name for v in verdicts[:1] if v.name in pd.ref_counts_e[0]]
    figs = []
    for name in dict.fromkeys(names):
        titles = []
        for j, lab in enumerate(pd.energy_labels):
            row = rows[j] if j < len(rows) else {}
            s = row.get("separation_power_E_tot/E_inc") if name == "E_tot/E_inc" else None
            titles.append(f"{lab}: {row.get('n_reference', '?')} / {row.get('n_candidate', '?')} showers"
                          + (f", S = {s:.2g}" if s is not None else ""))
        fn = f"energy_{_slug(name)}.png"
        P.energy_figure(str(plots / fn), name, pd, titles)
        why = "" if name == "E_tot/E_inc" else " (the observable with the worst verdict)"
        figs.append(Figure(fn, f"<b>{html.escape(P.axis_label(name))} per energy bin</b>{why}: reference (black) "
                           "and candidate (red) showers of each bin, normalised, with Poisson errors and their ratio; "
                           "titles: showers reference / candidate.", "Per energy", wide=True))
    return figs


def _overview_figures(plots: Path, result: dict[str, Any], pd: PlotData) -> list[Figure]:
    """The mean images (reference, candidate, difference), the profiles and the response."""
    figs = []
    n = pd.geometry.n_layers
    if pd.geometry.profile is None:
        for a in range(0, n, LAYERS_PER_IMAGE):
            layers = list(range(a, min(a + LAYERS_PER_IMAGE, n)))
            fn = f"images_layers_{layers[0]}-{layers[-1]}.png"
            P.images_figure(str(plots / fn), pd, layers)
            figs.append(Figure(fn, f"<b>Mean shower, layers {layers[0]}-{layers[-1]}</b>: mean cell energy / E_inc of "
                               "reference and candidate on one logarithmic colour scale (grey: below 1e-5 of the "
                               "largest), and the relative difference (candidate - reference) / reference (grey: "
                               "reference below 1e-4 of its largest cell). Rows: angle or y; columns: r or x.",
                               "Mean images", wide=True))
    P.profiles_figure(str(plots / "profiles.png"), pd)
    one_layer = pd.geometry.n_layers == 1 and pd.geometry.profile is None
    figs.append(Figure("profiles.png", "<b>Mean " + ("radial profile</b> (fraction of E_inc per radial bin)."
                       if one_layer else "longitudinal and radial profiles</b> (fraction of E_inc per layer and per "
                       "radial bin)."), "Energy response and profiles", wide=not one_layer))
    if "response" in result:
        P.response_figure(str(plots / "response.png"), result["response"])
        figs.append(Figure("response.png", "<b>Response and resolution</b>: mean E_vis / E_inc and its relative "
                           f"spread per energy bin, with the fit {P.FIT_FORMULA} (parameters at the fit's bound 0 "
                           "are marked: a limit, not a measurement).", "Energy response and profiles", wide=True))
    return figs


def _write_plots(plots: Path, result: dict[str, Any], pd: PlotData) -> list[Figure]:
    """Write the PNGs into the folder ``plots``: profiles and response, mean images, one histogram
    per observable (grids per layer family) and the per-energy figures; returns them in page order."""
    ranked = observable_verdicts(result)
    verdicts = {v.name: v for v in ranked}
    # mplhep's ROOT look with fonts scaled to these small multi-panel figures
    with plt.style.context([hep.style.ROOT, _RC]):
        figs = _overview_figures(plots, result, pd)
        figs += _hist_figures(plots, pd, verdicts)
        figs += _energy_figures(plots, result, pd, [v for v in ranked if v.status == "outside"] or ranked)
        figs += _study_figures(plots, result)
    return figs


#: how to read the amplification study (also the figure's caption)
AMPLIFICATION_HOW_TO = (
    "How to read: each point is the quantile-binned MSE (arXiv:2008.06545) of n showers against the reference "
    "as truth; MC showers follow a (1/n + 1/n_ref). Where the generated curve flattens, more generated showers "
    "stop helping. Amplification = the MC sample size with the MSE of all generated showers / training size N: "
    "above 1 the model is worth more showers than it was trained on.")


def _study_figures(plots: Path, result: dict[str, Any]) -> list[Figure]:
    """The figures of the optional studies in ``result`` (amplification, downstream)."""
    figs = []
    amp = result.get("amplification")
    if amp and "curves" in amp:
        P.amplification_figure(str(plots / "amplification.png"), amp)
        lim = " (a lower limit: the reference cannot resolve more)" if amp["amplification_at_limit"] else ""
        figs.append(Figure("amplification.png", f"<b>GAN amplification</b>: {amp['n_generated']} generated showers "
                           f"are worth {_fmt(amp['equivalent_mc_showers'], 3)} MC showers, amplification "
                           f"{_fmt(amp['amplification'], 3)}{lim} over {amp['n_train']} training showers "
                           f"(unlimited generation: {_fmt(amp['amplification_asymptotic'], 3)}). "
                           + AMPLIFICATION_HOW_TO, "Studies"))
    down = result.get("downstream")
    if down and "per_energy" in down:
        profiles = "xmax" in down
        P.downstream_figure(str(plots / "downstream.png"), down, "E_pred / E - 1" if profiles else "E_pred / E_inc")
        figs.append(Figure("downstream.png", "<b>Downstream reconstruction</b>: bias and resolution of the energy "
                           "regressor trained on the reference, on held-out reference (black) and candidate (red) "
                           "showers per energy bin, and their difference. "
                           + (PROFILE_DOWNSTREAM_HOW_TO if profiles else DOWNSTREAM_HOW_TO), "Studies", wide=True))
    if down and "xmax" in down and "per_energy" in down["xmax"]:
        P.downstream_figure(str(plots / "downstream_xmax.png"), down["xmax"], "Xmax_rec - Xmax [g/cm^2]")
        figs.append(Figure("downstream_xmax.png", "<b>Downstream Xmax reconstruction</b>: median and half the "
                           "16-84 % interval of Xmax_rec - Xmax on held-out reference (black) and candidate (red) "
                           "profiles per energy bin, and their difference. " + PROFILE_DOWNSTREAM_HOW_TO, "Studies",
                           wide=True))
    return figs


def _figures_html(figs: list[Figure]) -> list[str]:
    """The plots, one grid per section in the order the sections first appear, each with its caption."""
    parts = ["<h2>Plots</h2>"]
    for section in dict.fromkeys(f.section for f in figs):
        parts += [f"<h3>{html.escape(section)}</h3>", "<div class='grid'>"]
        parts += [f"<figure class='{'wide' if f.wide else ''}'><img src='plots/{f.file}' alt='{html.escape(f.file)}'>"
                  f"<figcaption>{f.caption}</figcaption></figure>" for f in figs if f.section == section]
        parts.append("</div>")
    return parts


def write_report(out: Path, result: dict[str, Any], pd: PlotData) -> Path:
    """Write ``out/report.html`` and its PNGs under ``out/plots``; returns the HTML path."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    parts = _header_html(result) + _verdict_html(result) + _tables_html(result)
    parts += _figures_html(_write_plots(plots, result, pd))
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path
