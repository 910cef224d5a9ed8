"""Air-shower profile scores: Xmax moments per primary and energy, physical validity, roughness.

Units: slant depths in g/cm^2, dE/dX in MeV/(g/cm^2), energies in eV where the name says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastshower.geometry import Geometry
from fastshower.io import ShowerFile, primary_ln_a
from fastshower.sampling import below_ground_mask
from fastshower.validate.observables import profile_shape

__all__ = ["compare_xmax_moments", "physicality", "profile_roughness", "xmax_moments"]


def _primary_labels(f: ShowerFile, m: int, start: int) -> np.ndarray:
    """Per-row primary label (n,) of a file: from conditions/primary (ln A, rounded), else the file's particle."""
    if "primary" in f.condition_names:
        lna = np.asarray(f._f["conditions"]["primary"][start:start + m], dtype=np.float64).reshape(-1)
        names = {round(primary_ln_a(p), 3): p for p in ("p", "He", "N", "Fe")}
        return np.array([names.get(round(v, 3), f"lnA={v:.3f}") for v in lna])
    return np.full(m, f.particle)


def xmax_moments(
    path: str | Path,
    log10_e_edges: Sequence[float] = (17.0, 17.5, 18.0, 18.5, 19.0),
    chunk_rows: int = 8192,
) -> list[dict[str, Any]]:
    """<Xmax> and RMS(Xmax) per primary and energy bin, Xmax from the dE/dX channel.

    Xmax is :func:`fastshower.validate.observables.profile_shape`'s parabola vertex (the same
    estimator for reference and model). Errors: RMS / sqrt(n) on the mean, RMS / sqrt(2 (n - 1)) on
    the RMS (Gaussian approximation).

    Returns:
        One dict per (primary, bin) with primary, lg_e_lo, lg_e_hi (log10 E/eV), n, mean,
        mean_error, rms, rms_error (g/cm^2); bins with fewer than 2 profiles are left out.
    """
    edges = np.asarray(log10_e_edges, dtype=np.float64)
    values: dict[tuple[str, int], list[np.ndarray]] = {}
    with ShowerFile(path) as f:
        for start in range(0, f.n, chunk_rows):
            b = f.read(start, start + chunk_rows, check=False)
            xmax = profile_shape(b.showers.astype(np.float64), f.geometry)["Xmax"]
            lg = np.log10(b.energies * 1e6)
            eb = np.clip(np.searchsorted(edges, lg, side="right") - 1, 0, len(edges) - 2)
            prim = _primary_labels(f, len(b), start)
            for p in np.unique(prim):
                for j in range(len(edges) - 1):
                    m = (prim == p) & (eb == j)
                    if m.any():
                        values.setdefault((str(p), j), []).append(xmax[m])
    rows = []
    for (p, j), parts in sorted(values.items()):
        x = np.concatenate(parts)
        if len(x) < 2:
            continue
        rms = float(x.std(ddof=1))
        rows.append({"primary": p, "lg_e_lo": float(edges[j]), "lg_e_hi": float(edges[j + 1]), "n": len(x),
                     "mean": float(x.mean()), "mean_error": rms / math.sqrt(len(x)),
                     "rms": rms, "rms_error": rms / math.sqrt(2 * (len(x) - 1))})
    return rows


def compare_xmax_moments(reference: str | Path, candidate: str | Path,
                         log10_e_edges: Sequence[float] = (17.0, 17.5, 18.0, 18.5, 19.0)) -> list[dict[str, Any]]:
    """Reference vs candidate <Xmax> and RMS per primary and energy bin, with differences and pulls.

    Returns:
        One dict per bin present in both: primary, lg_e_lo, lg_e_hi, n_ref, n_model, mean_ref, mean_model,
        d_mean (model - reference, g/cm^2), pull_mean (d_mean / combined error), rms_ref, rms_model,
        d_rms, pull_rms.
    """
    ref = {(r["primary"], r["lg_e_lo"]): r for r in xmax_moments(reference, log10_e_edges)}
    cand = {(r["primary"], r["lg_e_lo"]): r for r in xmax_moments(candidate, log10_e_edges)}
    out = []
    for key in sorted(set(ref) & set(cand)):
        r, c = ref[key], cand[key]
        d_mean, d_rms = c["mean"] - r["mean"], c["rms"] - r["rms"]
        out.append({
            "primary": key[0], "lg_e_lo": r["lg_e_lo"], "lg_e_hi": r["lg_e_hi"], "n_ref": r["n"], "n_model": c["n"],
            "mean_ref": r["mean"], "mean_model": c["mean"], "d_mean": d_mean,
            "pull_mean": d_mean / math.hypot(r["mean_error"], c["mean_error"]),
            "rms_ref": r["rms"], "rms_model": c["rms"], "d_rms": d_rms,
            "pull_rms": d_rms / math.hypot(r["rms_error"], c["rms_error"]),
        })
    return out


def profile_roughness(profiles: np.ndarray, geometry: Geometry, x_range: tuple[float, float] = (200.0, 900.0)) -> float:
    """Bin-to-bin roughness of dE/dX: median over profiles of the median |ln dEdX[i+1] - ln dEdX[i]|.

    Only bins whose centres lie in ``x_range`` (g/cm^2) and pairs where both values are > 0 count. A
    smooth simulated profile gives a few 0.01 (10 g/cm^2 bins); per-bin noise in generated profiles
    shows up as a larger value and breaks the Xmax fit.

    Args:
        profiles: (n, C x B) profiles, channel 0 dE/dX.
        geometry: profile geometry.
        x_range: slant-depth window, g/cm^2.
    """
    if geometry.profile is None:
        raise ValueError(f"geometry {geometry.name!r} has no profile axis")
    x = geometry.profile.centres()
    sel = (x >= x_range[0]) & (x <= x_range[1])
    y = np.asarray(profiles, dtype=np.float64)[:, geometry.layer_slice(0)][:, sel]
    ok = (y[:, 1:] > 0) & (y[:, :-1] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(ok, np.abs(np.diff(np.log(np.where(y > 0, y, 1.0)), axis=1)), np.nan)
    per = np.nanmedian(np.where(ok.any(axis=1, keepdims=True), d, 0.0), axis=1)
    return float(np.nanmedian(per))


def physicality(path: str | Path, chunk_rows: int = 8192) -> dict[str, Any]:
    """Physical-validity counts of a profile file (generated or reference).

    Returns:
        n (profiles), n_nonfinite and n_negative (values), n_nonzero_below_ground (values in bins that
        start at or beyond 1036 g/cm^2 / cos(zenith); needs conditions/zenith, else None),
        max_below_ground (largest such value), all_physical (bool).
    """
    n = n_nonfinite = n_negative = n_below = 0
    max_below = 0.0
    with ShowerFile(path) as f:
        has_zenith = "zenith" in f.condition_names
        for start in range(0, f.n, chunk_rows):
            b = f.read(start, start + chunk_rows, check=False)
            s = b.showers
            n += len(b)
            n_nonfinite += int((~np.isfinite(s)).sum())
            n_negative += int((s < 0).sum())
            if has_zenith:
                mask = below_ground_mask(f.geometry, torch.from_numpy(b.conditions["zenith"])).numpy()
                bad = mask & (s != 0)
                n_below += int(bad.sum())
                if bad.any():
                    max_below = max(max_below, float(np.abs(s[bad]).max()))
    return {"n": n, "n_nonfinite": n_nonfinite, "n_negative": n_negative,
            "n_nonzero_below_ground": n_below if has_zenith else None,
            "max_below_ground": max_below if has_zenith else None,
            "all_physical": n_nonfinite == 0 and n_negative == 0 and (not has_zenith or n_below == 0)}
