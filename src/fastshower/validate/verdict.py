"""The verdict of an evaluation: which scores the candidate gets right and which wrong, against the floor.

Pure functions of the metrics dict that :func:`fastshower.validate.evaluate.evaluate` returns (and
writes to metrics.json): the report's verdict tables, the short table ``fastshower evaluate`` prints
and the demo's closing lines all read them, so they agree.

The rule: a score is *outside the floor* when it exceeds the Geant4-vs-Geant4 floor (the same score
of the reference's two random halves) by more than :data:`N_SIGMA` combined standard errors,
``value - floor > N_SIGMA * sqrt(error^2 + floor_error^2)`` (bootstrap errors for separation powers,
Hanley-McNeil for AUCs, batch spreads for FPD/KPD). The floor compares half the reference with the
other half, so it carries more statistical noise than the full comparison: the rule is conservative.
Without a floor (``evaluate(floor=False)``) no score is judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["CLASSIFIER_SIDES", "N_SIGMA", "Verdict", "format_score_table", "observable_verdicts", "score_verdicts"]

#: combined standard errors a score must exceed its floor by to be flagged
N_SIGMA = 3.0
#: what each status means, in words (the report's legend and the terminal table use them)
STATUS_TEXT = {
    "outside": "outside the floor: the model differs from Geant4 here",
    "within": "within the floor: as close as Geant4 is to itself",
    "no floor": "not judged: run evaluate with --floor (floor=True)",
}


@dataclass(frozen=True)
class Verdict:
    """One judged score.

    Attributes:
        name: the score or observable; value / error: the candidate's score and its standard error;
        floor / floor_error: the reference halves' score and error (None without a floor);
        status: "outside", "within" or "no floor" (see :data:`STATUS_TEXT`);
        pull: (value - floor) / combined error, None when not judged.
    """

    name: str
    value: float | None
    error: float | None
    floor: float | None
    floor_error: float | None
    status: str
    pull: float | None


def _finite(x: Any) -> float | None:
    """``x`` as a float, None for None and non-finite values."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def judge(name: str, value: Any, error: Any, floor: Any, floor_error: Any) -> Verdict:
    """The verdict of one score ``value`` +- ``error`` against ``floor`` +- ``floor_error`` (None:
    no floor); a missing error counts as 0, so such a score is judged on the other error alone."""
    v, f = _finite(value), _finite(floor)
    e, fe = _finite(error), _finite(floor_error)
    if v is None or f is None:
        return Verdict(name, v, e, f, fe, "no floor", None)
    sigma = math.hypot(e or 0.0, fe or 0.0)
    diff = v - f
    pull = diff / sigma if sigma > 0 else (math.inf if diff > 0 else 0.0)
    status = "outside" if diff > N_SIGMA * sigma and diff > 0 else "within"
    return Verdict(name, v, e, f, fe, status, pull)


def observable_verdicts(result: dict[str, Any]) -> list[Verdict]:
    """One verdict per observable of ``result["separation_power"]`` against the floor's, worst first:
    those outside the floor by decreasing pull, then the rest by decreasing separation power."""
    sp = result.get("separation_power", {})
    err = result.get("separation_power_error", {})
    floor = result.get("floor", {})
    fsp, ferr = floor.get("separation_power", {}), floor.get("separation_power_error", {})
    out = [judge(k, v, err.get(k), fsp.get(k), ferr.get(k)) for k, v in sp.items()]
    return sorted(out, key=lambda x: (x.status != "outside", -(x.pull or 0.0) if x.status == "outside" else 0.0,
                                      -(x.value or 0.0)))


#: the classifier results' keys, in the report's order, and what the report calls each: fastshower's own
#: high-level set (every observable) and the CaloChallenge's (layer energies, centres, widths) side by side
CLASSIFIER_SIDES = {"low": "low-level", "high": "high-level", "challenge": "CaloChallenge high-level"}


def score_verdicts(result: dict[str, Any]) -> list[Verdict]:
    """Verdicts of the sample-level scores present in ``result``: classifier AUCs (low, high) and
    FPD, KPD (x1e3), each against the floor's."""
    floor = result.get("floor", {})
    out: list[Verdict] = []
    for side, label in CLASSIFIER_SIDES.items():
        c = result.get("classifier", {}).get(side)
        if c:
            f = floor.get("classifier", {}).get(side, {})
            out.append(judge(f"classifier AUC ({label})", c.get("auc"), c.get("auc_error"), f.get("auc"),
                             f.get("auc_error")))
    for key in ("fpd", "kpd"):
        if key in result:
            f = floor.get(key, {})
            out.append(judge(f"{key.upper()} x1e3", result[key].get("value"), result[key].get("error"),
                             f.get("value"), f.get("error")))
    return out


def headline(result: dict[str, Any]) -> str:
    """One sentence: how many observables are outside the floor, and the classifiers' word."""
    obs = observable_verdicts(result)
    judged = [v for v in obs if v.status != "no floor"]
    if not judged:
        scores = [v for v in score_verdicts(result) if v.value is not None]
        if not obs and not scores:
            return "No score to judge."
        return "No floor computed: nothing is judged (rerun with --floor to compare with Geant4 vs Geant4)."
    bad = [v.name for v in judged if v.status == "outside"]
    text = f"{len(bad)} of {len(judged)} observables outside the Geant4-vs-Geant4 floor"
    text += f" (worst: {', '.join(bad[:3])})." if bad else "."
    bad_scores = [v.name for v in score_verdicts(result) if v.status == "outside"]
    if bad_scores:
        text += " Outside the floor too: " + ", ".join(bad_scores) + "."
    return text


def _num(x: float | None, err: float | None = None) -> str:
    """``x`` (+- ``err``) with 3 significant digits, "-" for None."""
    if x is None:
        return "-"
    return f"{x:.3g}" + (f" ± {err:.2g}" if err is not None else "")


def format_score_table(result: dict[str, Any], n_observables: int = 8) -> str:
    """The short terminal table: each sample-level score and the ``n_observables`` worst separation
    powers as score / value / floor / verdict, then the headline sentence."""
    rows = [("score", "value", "floor", "verdict")]
    rows += [(v.name, _num(v.value, v.error), _num(v.floor, v.floor_error), v.status) for v in score_verdicts(result)]
    obs = observable_verdicts(result)
    rows += [(f"S({v.name})", _num(v.value, v.error), _num(v.floor, v.floor_error), v.status)
             for v in obs[:n_observables]]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if len(obs) > n_observables:
        lines.append(f"... {len(obs) - n_observables} more observables in the report")
    lines.append(headline(result))
    lines.append("AUC: 0.5 = indistinguishable from the reference, 1 = told apart every time; S (separation "
                 f"power): 0 = same histogram, 1 = disjoint; outside = more than {N_SIGMA:g} combined errors above "
                 "the floor (Geant4 vs Geant4): the model differs from the reference there.")
    return "\n".join(lines)
