"""Downstream check for air-shower profiles: does what an analysis reconstructs from generated profiles
match what it reconstructs from Monte Carlo ones?

Three reconstructions, each trained on half of the reference (Monte Carlo) profiles and applied to the
other half and to the candidate (issue "Seed systems", item 5; the KIT profile studies' argument):

- **primary classifier** (p against Fe): gradient-boosted trees on the observed profile; its ROC AUC on the
  held-out reference and on the candidate (a published CNN on full, noise-free profiles reaches 0.976,
  arXiv:2508.13933), with Hanley-McNeil errors and the difference;
- **energy**: the invisible-energy correction E / E_cal predicted from the profile's shape and zenith angle
  (E_cal = the observed calorimetric energy, integral of dE/dX), E_pred = E_cal x factor, so no energy prior
  enters (as in :mod:`fastshower.validate.downstream`); bias and resolution of E_pred / E per energy bin;
- **Xmax**: the depth of the maximum of the full 10 g/cm^2 profile (the parabola vertex of
  :func:`fastshower.validate.observables.profile_shape`, the same estimator on both samples) predicted from
  the observed profile; bias and resolution of Xmax_rec - Xmax in g/cm^2 per energy bin.

The observed profile stands in for a fluorescence detector's view: dE/dX summed into ``bin_width`` bins
and multiplied by 1 + ``noise`` x N(0, 1) per bin (seeded; photon statistics), zero below ground as
simulated. Every feature comes from it and the zenith angle: the energy, the primary and the full
profile are truth. Profiles need a ``zenith`` condition (degrees); the primary is the ``primary``
condition (ln A) of a merged file or the file's particle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastshower.errors import FastshowerError
from fastshower.geometry import Geometry
from fastshower.io import ShowerFile, primary_ln_a
from fastshower.validate.downstream import auc_with_error, boosted, difference, robust_stats
from fastshower.validate.metrics import energy_bin_index
from fastshower.validate.observables import profile_shape

__all__ = ["ProfileDownstreamConfig", "ProfileDownstreamInputError", "observed_profiles",
           "profile_downstream_from_files", "profile_downstream_study"]

#: ln A of the two primaries the classifier separates
_LN_A_P, _LN_A_FE = primary_ln_a("p"), primary_ln_a("Fe")


class ProfileDownstreamInputError(FastshowerError, ValueError):
    """A profile file the check cannot use (no zenith condition, another geometry): one line naming it."""


@dataclass(frozen=True)
class ProfileDownstreamConfig:
    """Knobs of the air-shower downstream check.

    Attributes:
        bin_width: the observed profile's depth bins, g/cm^2 (a multiple of the file's bins).
        noise: relative Gaussian noise per observed bin (0: the profile as generated).
        log10_e_edges: energy bins of the tables, log10(E / eV).
        max_profiles: profiles read per file (the first ones; merged files interleave primaries).
        max_iter, learning_rate, max_leaf_nodes: boosting settings of the three reconstructions.
        min_per_bin: profiles an energy bin needs for its bias and resolution.
    """

    bin_width: float = 20.0
    noise: float = 0.05
    log10_e_edges: tuple[float, ...] = (17.0, 17.5, 18.0, 18.5, 19.0)
    max_profiles: int = 50_000
    max_iter: int = 300
    learning_rate: float = 0.1
    max_leaf_nodes: int = 31
    min_per_bin: int = 10


@dataclass(frozen=True)
class _Sample:
    """One file's profiles as the check sees them: ``observed`` (n, B') MeV/(g/cm^2), ``zenith`` (n,) degrees,
    ``ln_a`` (n,), ``energy`` (n,) eV, ``xmax`` (n,) g/cm^2 of the full profile."""

    observed: np.ndarray
    zenith: np.ndarray
    ln_a: np.ndarray
    energy: np.ndarray
    xmax: np.ndarray


def observed_profiles(dedx: np.ndarray, dx: float, cfg: ProfileDownstreamConfig,
                      rng: np.random.Generator) -> np.ndarray:
    """The detector's view (n, B / k) of dE/dX profiles ``dedx`` (n, B) in bins of ``dx`` g/cm^2: means over
    k = bin_width / dx bins, times 1 + noise x N(0, 1), clipped at 0 (empty bins stay empty)."""
    k = round(cfg.bin_width / dx)
    if k < 1 or abs(k * dx - cfg.bin_width) > 1e-9 * cfg.bin_width or dedx.shape[1] % k:
        raise ProfileDownstreamInputError(f"bin_width {cfg.bin_width} g/cm^2 is not a multiple of the file's "
                                          f"{dx} g/cm^2 bins dividing its {dedx.shape[1]} bins")
    coarse = dedx.reshape(len(dedx), -1, k).mean(axis=2)
    return np.clip(coarse * (1.0 + cfg.noise * rng.standard_normal(coarse.shape)), 0.0, None)


def _ln_a(f: ShowerFile, batch_conditions: dict[str, np.ndarray], n: int) -> np.ndarray:
    """ln A per profile (n,): the ``primary`` condition of a merged file, else the file's particle."""
    if "primary" in batch_conditions:
        return np.asarray(batch_conditions["primary"], np.float64).reshape(-1)
    return np.full(n, primary_ln_a(f.particle))


def _read(path: str | Path, geometry: Geometry | None, cfg: ProfileDownstreamConfig, seed: int) -> _Sample:
    """The first ``cfg.max_profiles`` profiles of a file as :class:`_Sample` (observed with its own seeded noise)."""
    with ShowerFile(path, geometry) as f:
        geo = f.geometry
        if geo.profile is None:
            raise ProfileDownstreamInputError(f"{path}: geometry {geo.name} has no air-shower profile")
        if "zenith" not in f.condition_names:
            raise ProfileDownstreamInputError(f"{path}: no zenith condition (the check needs the zenith angle)")
        b = f.read(0, min(f.n, cfg.max_profiles))
        ln_a = _ln_a(f, b.conditions, len(b))
    dedx = b.showers[:, geo.layer_slice(0)].astype(np.float64)
    rng = np.random.default_rng([seed, 31])
    observed = observed_profiles(dedx, geo.profile.dx, cfg, rng)
    xmax = np.asarray(profile_shape(dedx, geo)["Xmax"], np.float64)
    return _Sample(observed, np.asarray(b.conditions["zenith"], np.float64).reshape(-1), ln_a,
                   np.asarray(b.energies, np.float64) * 1e6, xmax)


def _features(s: _Sample, bin_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, 2 + B') of a sample: cos(zenith), log10 E_cal / eV, the observed profile / E_cal (per
    g/cm^2), and E_cal (n,) eV, the observed calorimetric energy."""
    e_cal = s.observed.sum(axis=1) * bin_width * 1e6  # MeV -> eV
    with np.errstate(divide="ignore", invalid="ignore"):
        shape = s.observed / (e_cal[:, None] / 1e6)
        log_e = np.log10(e_cal)
    x = np.concatenate([np.cos(np.radians(s.zenith))[:, None], log_e[:, None], shape], axis=1)
    return np.where(np.isfinite(x), x, np.nan), e_cal


def _classifier(train: tuple[np.ndarray, np.ndarray], tests: dict[str, tuple[np.ndarray, np.ndarray]],
                cfg: ProfileDownstreamConfig, seed: int) -> dict[str, Any]:
    """p-against-Fe AUC on each test side; train/tests: (features, ln A) with only p and Fe rows used."""
    def pick(x: np.ndarray, ln_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = np.isclose(ln_a, _LN_A_P, atol=1e-3) | np.isclose(ln_a, _LN_A_FE, atol=1e-3)
        return x[keep], np.isclose(ln_a[keep], _LN_A_FE, atol=1e-3)

    xt, yt = pick(*train)
    if yt.all() or not yt.any():
        return {"error": "the reference needs both p and Fe profiles for the primary classifier"}
    model = boosted("classifier", cfg, seed).fit(xt, yt)
    out: dict[str, Any] = {"classifier": "HistGradientBoostingClassifier, Fe = 1", "n_train": len(yt)}
    for side, (x, ln_a) in tests.items():
        xs, ys = pick(x, ln_a)
        out[f"{side}_n"] = len(ys)
        out[f"{side}_auc"], out[f"{side}_auc_error"] = (auc_with_error(ys, model.predict_proba(xs)[:, 1])
                                                          if len(ys) else (math.nan, math.nan))
    auc = {side: {"auc": out[f"{side}_auc"], "auc_error": out[f"{side}_auc_error"]} for side in tests}
    out.update(difference(auc["reference"], auc["candidate"], ("auc",)))
    return out


def _table(values: dict[str, tuple[np.ndarray, np.ndarray]], edges: np.ndarray, cfg: ProfileDownstreamConfig,
           ratio: bool, seed: int) -> dict[str, Any]:
    """Per energy bin and over all bins: bias and resolution of each side's values (n,) at energies (n,) eV,
    reference and candidate with their differences (rows laid out as :mod:`downstream`'s).

    ``ratio``: the values are E_pred / E (bias = median - 1), else deviations (bias = median); see
    :func:`robust_stats`."""
    rng = np.random.default_rng([seed, 33])

    def stats(v: np.ndarray) -> dict[str, float]:
        return robust_stats(v - 1.0 if ratio else v, cfg.min_per_bin, rng)

    kbin = {side: energy_bin_index(np.log10(e), edges) for side, (_, e) in values.items()}
    rows = []
    for j in range(len(edges) - 1):
        row: dict[str, Any] = {"label": f"10^{edges[j]:.3g}-10^{edges[j + 1]:.3g} eV"}
        per = {}
        for side, (v, e) in values.items():
            m = kbin[side] == j
            per[side] = stats(v[m])
            row.setdefault("energy_mean_gev", float(e[m].mean() / 1e9) if m.any() else math.nan)
            row.update({f"{side}_{k}": val for k, val in per[side].items()})
        row.update(difference(per["reference"], per["candidate"]))
        rows.append(row)
    overall: dict[str, Any] = {}
    sides = {}
    for side, (v, _) in values.items():
        sides[side] = stats(v[kbin[side] >= 0])
        overall.update({f"{side}_{k}": val for k, val in sides[side].items()})
    overall.update(difference(sides["reference"], sides["candidate"]))
    return {"per_energy": rows, "all": overall}


def profile_downstream_study(ref: _Sample, cand: _Sample, cfg: ProfileDownstreamConfig, seed: int) -> dict[str, Any]:
    """The three reconstructions trained on the first half of ``ref`` (shuffled with ``seed``), applied to its
    second half and to ``cand``; returns metrics.json's ``downstream`` dict (energy table at the top level,
    as for calorimeters, plus ``xmax`` and ``classifier``)."""
    order = np.random.default_rng([seed, 32]).permutation(len(ref.energy))
    half = len(order) // 2
    if half < 50:
        return {"error": f"too few reference profiles ({len(order)}) for the downstream check"}
    samples = {"train": _subset(ref, order[:half]), "reference": _subset(ref, order[half:]), "candidate": cand}
    # a profile without observed energy cannot be reconstructed (a generated one could be empty)
    samples = {k: _subset(s, np.flatnonzero(s.observed.sum(axis=1) > 0)) for k, s in samples.items()}
    feats = {k: _features(s, cfg.bin_width) for k, s in samples.items()}
    (x_tr, ecal_tr), s_tr = feats["train"], samples["train"]
    shape_only = [0, *range(2, x_tr.shape[1])]  # the energy factor without log10 E_cal: no energy prior enters
    energy_model = boosted("regressor", cfg, seed).fit(x_tr[:, shape_only], s_tr.energy / ecal_tr)
    xmax_model = boosted("regressor", cfg, seed).fit(x_tr, s_tr.xmax)
    energy, xmax, tests = {}, {}, {}
    for side in ("reference", "candidate"):
        (x, ecal), s = feats[side], samples[side]
        energy[side] = (ecal * energy_model.predict(x[:, shape_only]) / s.energy, s.energy)
        xmax[side] = (xmax_model.predict(x) - s.xmax, s.energy)
        tests[side] = (x, s.ln_a)
    edges = np.asarray(cfg.log10_e_edges, np.float64)
    out: dict[str, Any] = {
        "kind": "air-shower profiles",
        "observation": {"bin_width_g_cm2": cfg.bin_width, "relative_noise": cfg.noise},
        "regressor": "HistGradientBoostingRegressor of E / E_cal from cos(zenith) and the observed profile / E_cal; "
                     "E_pred = E_cal x factor",
        "n_train": len(samples["train"].energy),
        "n_candidate_empty": len(cand.energy) - len(samples["candidate"].energy),
        **_table(energy, edges, cfg, True, seed),
        "xmax": {"regressor": "HistGradientBoostingRegressor of Xmax (full profile) from the observed profile, "
                              "log10 E_cal and cos(zenith); deviation Xmax_rec - Xmax in g/cm^2",
                 **_table(xmax, edges, cfg, False, seed)},
        "classifier": _classifier((x_tr, s_tr.ln_a), tests, cfg, seed),
    }
    return out


def _subset(s: _Sample, rows: np.ndarray) -> _Sample:
    """The profiles ``rows`` of a sample."""
    return _Sample(s.observed[rows], s.zenith[rows], s.ln_a[rows], s.energy[rows], s.xmax[rows])


def profile_downstream_from_files(reference: str | Path, candidate: str | Path, geometry: Geometry | None,
                                  cfg: ProfileDownstreamConfig, seed: int) -> dict[str, Any]:
    """:func:`profile_downstream_study` on two profile files (reference: Monte Carlo; candidate: generated)."""
    # independent noise draws: the two files' views of one profile would otherwise share their noise
    return profile_downstream_study(_read(reference, geometry, cfg, seed), _read(candidate, geometry, cfg, seed + 1),
                                    cfg, seed)
