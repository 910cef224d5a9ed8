"""GAN amplification: how many Monte Carlo showers a generated sample is worth.

Method of Butter, Diefenbacher, Kasieczka, Nachman, Plehn, "GANplifying event samples"
(arXiv:2008.06545, SciPost Phys. 10, 139): the truth distribution is cut into quantiles, and a
sample's precision is the mean squared error (MSE) of the fraction of its events in each quantile
against the truth's. Here the truth is the large, independent reference (Monte Carlo) file; the
observables are E_tot/E_inc and, with more than one layer, each layer's energy / E_inc; the
quantiles are taken per incident-energy bin (so files with different energy mixtures, e.g. a
held-out energy, are compared bin by bin, and only in the bins all three files fill).

- MC curve: MSE against subsample size n of the training sample (N showers). An independent sample
  has expected MSE = a (1/n + 1/M): the 1/n term of its own fluctuations plus a floor a/M from
  those of the M reference showers, so the fit has one parameter, a.
- generated curve: the same for subsamples of the generated sample (G showers), fitted with a free
  floor, a_g / n + b_g: a model's bias shows as a floor above the MC one.
- amplification = n_eq / N with n_eq the MC size of the same MSE, n_eq = a / (MSE - a/M), for the
  MSE of all G generated showers; ``amplification_asymptotic`` uses b_g instead (unlimited
  generation). An MSE at or below the MC floor a/M cannot be told from the truth: n_eq is then only
  known to be >= M (``*_at_limit``).

The three files must be independent samples (training showers inside the reference would make the
MC curve look better than it is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastshower.errors import FastshowerError
from fastshower.geometry import Geometry
from fastshower.io import ShowerFile
from fastshower.validate.metrics import energy_bin_index
from fastshower.validate.observables import layer_energies

__all__ = [
    "AmplificationConfig",
    "AmplificationInputError",
    "amplification_features",
    "amplification_from_files",
    "amplification_study",
    "equivalent_size",
    "fit_mse",
    "mse_curve",
    "quantile_cells",
]


class AmplificationInputError(FastshowerError, ValueError):
    """A training file that cannot be compared with the reference (one line naming both)."""


@dataclass(frozen=True)
class AmplificationConfig:
    """Knobs of the amplification study.

    Attributes:
        n_quantiles: quantiles of the reference per observable and energy bin (the paper's n_quant).
        n_sizes: subsample sizes per curve, log-spaced from ``min_size`` to the sample size.
        n_repeats: random subsamples per size (the full sample once).
        min_size: smallest subsample size.
        min_reference_per_bin: an energy bin needs this many reference showers to define its quantiles.
    """

    n_quantiles: int = 10
    n_sizes: int = 10
    n_repeats: int = 20
    min_size: int = 20
    min_reference_per_bin: int = 200


@dataclass(frozen=True)
class _Cells:
    """Quantile cells of the reference: ``edges`` (K, d, q-1) inner quantile edges per energy bin and
    observable, ``truth`` (K, d, q) the reference's fraction per cell, ``used`` (K,) bins kept."""

    edges: np.ndarray
    truth: np.ndarray
    used: np.ndarray


def amplification_features(path: str | Path, geometry: Geometry | None, chunk_size: int = 4096
                           ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-shower observables of a file, streamed: features (n, d) dimensionless (E_tot/E_inc, then
    E_layer_i/E_inc when there is more than one layer), incident energies (n,) MeV, and the names."""
    feats: list[np.ndarray] = []
    energies: list[np.ndarray] = []
    with ShowerFile(path, geometry) as f:
        geo = f.geometry
        rows = max(1, min(chunk_size, (1 << 27) // max(8 * geo.n_voxels, 1)))  # ~128 MB of float64 per chunk
        for batch in f.iter_chunks(rows):
            e = batch.energies
            cols = [batch.showers.sum(axis=1, dtype=np.float64)[:, None]]
            if geo.n_layers > 1:
                cols.append(np.asarray(layer_energies(batch.showers.astype(np.float64), geo)))
            feats.append(np.concatenate(cols, axis=1) / e[:, None])
            energies.append(e)
    names = ["E_tot/E_inc"] + ([f"E_layer_{i}/E_inc" for i in range(geo.n_layers)] if geo.n_layers > 1 else [])
    return np.concatenate(feats), np.concatenate(energies), names


def _codes(x: np.ndarray, kbin: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Flat cell index (n, d) into (K, d, q) of features ``x`` (n, d) in energy bins ``kbin`` (n,); -1
    for showers outside every bin."""
    n_k, d, q1 = edges.shape
    out = np.full(x.shape, -1, dtype=np.int64)
    for k in range(n_k):
        rows = kbin == k
        for j in range(d):
            c = np.searchsorted(edges[k, j], x[rows, j], side="right")
            out[rows, j] = (k * d + j) * (q1 + 1) + c
    return out


def quantile_cells(x: np.ndarray, kbin: np.ndarray, n_bins: int, cfg: AmplificationConfig) -> _Cells:
    """The reference's quantile cells from its features ``x`` (n, d) in energy bins ``kbin`` (n,).

    Ties (e.g. empty layers) merge quantiles; the truth fraction of each cell is therefore the
    reference's own, not 1 / n_quantiles."""
    q, d = cfg.n_quantiles, x.shape[1]
    edges = np.zeros((n_bins, d, q - 1))
    used = np.zeros(n_bins, dtype=bool)
    probs = np.linspace(0, 1, q + 1)[1:-1]
    for k in range(n_bins):
        rows = kbin == k
        if rows.sum() >= cfg.min_reference_per_bin:
            used[k] = True
            edges[k] = np.quantile(x[rows], probs, axis=0).T
    cells = _Cells(edges, np.zeros((n_bins, d, q)), used)
    return _Cells(edges, _fractions(_codes(x, kbin, edges), cells), used)


def _fractions(codes: np.ndarray, cells: _Cells) -> np.ndarray:
    """Fraction (K, d, q) of the showers of each energy bin in each cell; NaN in bins without showers."""
    shape = cells.truth.shape
    counts = np.bincount(codes[codes >= 0].ravel(), minlength=math.prod(shape)).reshape(shape).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts / counts[:, :1, :].sum(axis=2, keepdims=True)


def quantile_mse(codes: np.ndarray, cells: _Cells, bins: np.ndarray) -> float:
    """Quantile-binned MSE of a sample (cell codes (n, d)) against the reference: the mean over the
    energy bins ``bins`` (indices) that the sample fills, observables and quantiles of
    (fraction - reference fraction)^2, dimensionless."""
    sq = (_fractions(codes, cells) - cells.truth)[bins] ** 2
    per_bin = sq.mean(axis=(1, 2))
    return float(np.nanmean(per_bin)) if np.isfinite(per_bin).any() else math.nan


def _sizes(n: int, cfg: AmplificationConfig) -> np.ndarray:
    """Subsample sizes (k,), log-spaced from ``cfg.min_size`` to ``n`` inclusive."""
    lo = min(cfg.min_size, n)
    return np.unique(np.geomspace(lo, n, cfg.n_sizes).round().astype(np.int64))


def mse_curve(codes: np.ndarray, cells: _Cells, bins: np.ndarray, cfg: AmplificationConfig,
              rng: np.random.Generator) -> dict[str, list[float]]:
    """MSE against subsample size of one sample (cell codes (n, d)): ``n``, ``mse`` (mean over
    ``cfg.n_repeats`` random subsamples without replacement) and ``error`` (its standard error)."""
    out: dict[str, list[float]] = {"n": [], "mse": [], "error": []}
    for size in _sizes(len(codes), cfg):
        reps = 1 if size == len(codes) else cfg.n_repeats
        vals = [quantile_mse(codes[rng.choice(len(codes), size, replace=False)], cells, bins) for _ in range(reps)]
        out["n"].append(int(size))
        out["mse"].append(float(np.mean(vals)))
        out["error"].append(float(np.std(vals, ddof=1) / math.sqrt(reps)) if reps > 1 else math.nan)
    return out


def _weights(curve: dict[str, list[float]]) -> np.ndarray:
    """Fit weights 1/sigma (k,): the standard error, at least 5 % of the MSE (the full-sample point
    has none, and neighbouring sizes share showers, so the errors are not independent anyway)."""
    mse, err = np.asarray(curve["mse"]), np.nan_to_num(np.asarray(curve["error"]), nan=0.0)
    return 1.0 / np.maximum(err, 0.05 * mse)


def fit_mse(curve: dict[str, list[float]], floor_per_a: float | None) -> tuple[float, float]:
    """Weighted least-squares fit of MSE = a / n + b to a curve; returns (a, b).

    ``floor_per_a`` given: b is tied to a (b = a * floor_per_a, the MC model a (1/n + 1/M)); None:
    b free and >= 0 (refitted with b = 0 when it comes out negative)."""
    n, mse, w = np.asarray(curve["n"], float), np.asarray(curve["mse"]), _weights(curve)
    if floor_per_a is not None:
        x = 1.0 / n + floor_per_a
        a = float(np.sum(w**2 * x * mse) / np.sum(w**2 * x * x))
        return a, a * floor_per_a
    design = np.stack([1.0 / n, np.ones_like(n)], axis=1) * w[:, None]
    (a, b), *_ = np.linalg.lstsq(design, mse * w, rcond=None)
    if b < 0:
        a, b = float(np.sum(w**2 * mse / n) / np.sum(w**2 / n**2)), 0.0
    return float(a), float(b)


def equivalent_size(mse: float, a: float, n_reference: int) -> tuple[float, bool]:
    """MC sample size whose expected MSE a (1/n + 1/M) equals ``mse`` (M = ``n_reference``), and
    whether it is only a lower limit (``mse`` at or below the floor a/M: n_eq >= M, returned as M)."""
    excess = mse - a / n_reference
    if not math.isfinite(mse) or excess <= 0:
        return float(n_reference), True
    return min(a / excess, float(n_reference)), a / excess >= n_reference


def _amplification(mse: float, a: float, n_ref: int, n_train: int) -> tuple[float, bool]:
    """n_eq / N for a generated MSE, and whether it is a lower limit (see :func:`equivalent_size`)."""
    n_eq, at_limit = equivalent_size(mse, a, n_ref)
    return n_eq / n_train, at_limit


def amplification_study(ref: tuple[np.ndarray, np.ndarray], train: tuple[np.ndarray, np.ndarray],
                        gen: tuple[np.ndarray, np.ndarray], energy_edges: np.ndarray, cfg: AmplificationConfig,
                        seed: int) -> dict[str, Any]:
    """The amplification of a generated sample over the training sample it was trained on.

    Args:
        ref, train, gen: (features (n, d), incident energies (n,) MeV) of the reference (truth),
            the training sample (N showers) and the generated sample (G showers).
        energy_edges: energy-bin edges (K+1,) MeV; quantiles and MSEs are per bin.

    Returns:
        The dict of metrics.json's ``amplification`` key (see the module docstring).
    """
    n_bins = len(energy_edges) - 1
    cells = quantile_cells(ref[0], energy_bin_index(ref[1], energy_edges), n_bins, cfg)
    codes = {k: _codes(x, energy_bin_index(e, energy_edges), cells.edges) for k, (x, e) in (("train", train),
                                                                                      ("generated", gen))}
    kbins = [energy_bin_index(e, energy_edges) for _, e in (train, gen)]
    filled = [np.bincount(k[k >= 0], minlength=n_bins) > 0 for k in kbins]
    bins = np.flatnonzero(cells.used & filled[0] & filled[1])
    if len(bins) == 0:
        return {"error": "no energy bin holds training, generated and enough reference showers"}
    rng = np.random.default_rng([seed, 20])
    n_ref = int(np.isin(energy_bin_index(ref[1], energy_edges), bins).sum())
    # the showers of the energy bins compared; the others do not enter any MSE
    codes = {k: c[np.isin(c[:, 0] // (c.shape[1] * cfg.n_quantiles), bins)] for k, c in codes.items()}
    curves = {k: mse_curve(c, cells, bins, cfg, rng) for k, c in codes.items()}
    a, b = fit_mse(curves["train"], 1.0 / n_ref)
    a_g, b_g = fit_mse(curves["generated"], None)
    n_train, n_gen = len(codes["train"]), len(codes["generated"])
    amp, lim = _amplification(curves["generated"]["mse"][-1], a, n_ref, n_train)
    amp_inf, lim_inf = _amplification(b_g, a, n_ref, n_train)
    return {
        "n_quantiles": cfg.n_quantiles,
        "energy_bins_used": [int(k) for k in bins], "n_reference": n_ref, "n_train": n_train, "n_generated": n_gen,
        "curves": curves, "fit_train": {"a": a, "floor": b, "formula": "a (1/n + 1/n_reference)"},
        "fit_generated": {"a": a_g, "floor": b_g, "formula": "a / n + floor"},
        "mse_generated": curves["generated"]["mse"][-1], "mse_train": curves["train"]["mse"][-1],
        "equivalent_mc_showers": amp * n_train, "amplification": amp, "amplification_at_limit": lim,
        "amplification_asymptotic": amp_inf, "amplification_asymptotic_at_limit": lim_inf,
    }


def amplification_from_files(reference: str | Path, train: str | Path, generated: str | Path,
                             geometry: Geometry | None, energy_edges: np.ndarray, cfg: AmplificationConfig,
                             seed: int) -> dict[str, Any]:
    """:func:`amplification_study` on three shower files (each streamed once for its observables)."""
    ref_x, ref_e, names = amplification_features(reference, geometry)
    tr_x, tr_e, tr_names = amplification_features(train, geometry)
    gen_x, gen_e, _ = amplification_features(generated, geometry)
    if tr_names != names:
        raise AmplificationInputError(f"training file {train} has another layer count than reference {reference}")
    out = amplification_study((ref_x, ref_e), (tr_x, tr_e), (gen_x, gen_e), energy_edges, cfg, seed)
    out["observables"] = names
    out["train_file"] = str(train)
    return out
