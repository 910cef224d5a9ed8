"""``evaluate``: score a candidate shower file against a reference file and write a report.

Memory stays bounded whatever the file sizes: every file is streamed chunk by chunk through
the observables into fixed-binning histograms and per-energy moment sums; the sample-based
scores (classifier, FPD/KPD, SSIM, support size) use a seeded random subsample of at most
``EvaluationConfig.max_subsample`` showers per file (fewer for large geometries, so the
low-level features fit ``feature_budget_bytes``), drawn uniformly over the whole file.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastshower import __version__
from fastshower.geometry import Geometry, GeometryError, read_calochallenge_binning
from fastshower.io import ShowerFile, ShowerFileError
from fastshower.validate import metrics as M
from fastshower.validate.observables import compute_observables, observable_names, radial_edges, radial_profile

__all__ = ["METRICS", "EvaluationConfig", "EvaluationResultSchema", "ValidationInputError", "evaluate"]

#: metric names accepted by ``evaluate(metrics=...)`` (None = all)
METRICS: tuple[str, ...] = (
    "separation_power",
    "w1",
    "chi2",
    "classifier_low",
    "classifier_high",
    "fpd",
    "kpd",
    "ssim",
    "support_size",
    "multi_peak",
    "response",
)
_INTEGER_OBS = {"n_hits", "n_peaks"}
_VOXEL = "voxel_energy"


class ValidationInputError(ValueError):
    """Two shower files that cannot be compared (one line naming both files)."""


@dataclass(frozen=True)
class EvaluationConfig:
    """Knobs of :func:`evaluate` (defaults are the documented choices).

    Attributes:
        chunk_size: showers read per chunk.
        n_bins: histogram bins per observable (see :func:`metrics.make_binning`).
        binning_sample: reference showers (random blocks of 1024) that fix the binnings.
        threshold: cell threshold for sparsity and hits, MeV.
        peak_fraction: a peak must exceed this fraction of the shower's visible energy.
        max_subsample: showers per file kept in memory for the sample-based scores.
        feature_budget_bytes: cap on the float32 low-level features of one subsample.
        n_boot: multinomial bootstrap replicas for histogram-score errors.
        fpd_*, kpd_*: FPD/KPD settings (JetNet's defaults, scaled down to the subsample).
        ssim_per_bin: showers per sample and energy bin used for SSIM; ssim_pairs: pairs drawn.
        birthday_max: sample size of the support-size test (also capped so that n^2 V <= 2e10).
        birthday_fraction: near-duplicate threshold as a fraction of the reference's median
            pairwise distance (features voxels / E_inc).
        max_discrete_energies: a reference with at most this many distinct energies gets one
            energy bin per energy; otherwise ``n_energy_bins`` log-spaced bins.
    """

    chunk_size: int = 4096
    n_bins: int = 50
    binning_sample: int = 20_000
    threshold: float = 0.0
    peak_fraction: float = 0.02
    max_subsample: int = 20_000
    feature_budget_bytes: int = 1 << 30
    n_boot: int = 30
    fpd_min_samples: int = 20_000
    fpd_max_samples: int = 50_000
    fpd_batches: int = 10
    fpd_points: int = 5
    kpd_batches: int = 10
    kpd_batch_size: int = 2_000
    ssim_per_bin: int = 200
    ssim_pairs: int = 300
    birthday_max: int = 2_000
    birthday_fraction: float = 0.1
    max_discrete_energies: int = 20
    n_energy_bins: int = 8


# ======================================================================================
# inputs
# ======================================================================================


def _open(path: Path, geometry: Geometry | None, ref: Path, cand: Path) -> ShowerFile:
    try:
        return ShowerFile(path, geometry)
    except ShowerFileError as exc:
        raise ValidationInputError(f"cannot compare {cand} with reference {ref}: {exc}") from None


def _check_inputs(rf: ShowerFile, cf: ShowerFile, e_ref: np.ndarray, e_cand: np.ndarray) -> None:
    both = f"reference {rf.path} vs candidate {cf.path}"
    if rf.geometry.to_dict() != cf.geometry.to_dict():
        raise ValidationInputError(
            f"{both}: different geometries ({rf.geometry.name!r}, {rf.geometry.n_voxels} voxels vs "
            f"{cf.geometry.name!r}, {cf.geometry.n_voxels} voxels)"
        )
    if "unknown" not in (rf.particle, cf.particle) and rf.particle != cf.particle:
        raise ValidationInputError(f"{both}: different particles ({rf.particle} vs {cf.particle})")
    for f, e in ((rf, e_ref), (cf, e_cand)):
        if len(e) == 0:
            raise ValidationInputError(f"{both}: {f.path} holds no showers")
        if not np.isfinite(e).all() or (e <= 0).any():
            raise ValidationInputError(f"{both}: {f.path} has NaN, infinite or non-positive incident energies")
    if e_cand.max() < e_ref.min() * (1 - 1e-9) or e_cand.min() > e_ref.max() * (1 + 1e-9):
        raise ValidationInputError(
            f"{both}: no overlapping energy range (reference {e_ref.min() / 1e3:.4g}-{e_ref.max() / 1e3:.4g} GeV, "
            f"candidate {e_cand.min() / 1e3:.4g}-{e_cand.max() / 1e3:.4g} GeV)"
        )


def _energy_edges(e_ref: np.ndarray, cfg: EvaluationConfig, energy_bins: Sequence[float] | None) -> np.ndarray:
    """Energy-bin edges (k + 1,), MeV: user edges, one bin per distinct energy, or log bins."""
    if energy_bins is not None:
        edges = np.asarray(sorted(energy_bins), dtype=np.float64)
        if edges.size < 2:
            raise ValidationInputError(f"energy_bins needs at least two edges (MeV), got {list(energy_bins)}")
        return edges
    u = np.unique(e_ref)
    if u.size <= cfg.max_discrete_energies:
        if u.size == 1:
            return np.array([u[0] * 0.999, u[0] * 1.001])
        mids = np.sqrt(u[1:] * u[:-1])
        return np.concatenate([[u[0] * (u[0] / mids[0])], mids, [u[-1] * (u[-1] / mids[-1])]])
    return np.geomspace(e_ref.min(), e_ref.max() * (1 + 1e-9), cfg.n_energy_bins + 1)


def _energy_label(lo: float, hi: float, discrete: np.ndarray) -> str:
    inside = discrete[(discrete >= lo) & (discrete < hi)]
    if inside.size == 1:
        return f"{inside[0] / 1e3:.4g} GeV"
    return f"{lo / 1e3:.4g}-{hi / 1e3:.4g} GeV"


# ======================================================================================
# streaming
# ======================================================================================


@dataclass
class _Summary:
    """Streamed summaries of one sample (a file, or one half of the reference)."""

    hists: dict[str, M.HistogramAccumulator]
    hists_e: list[dict[str, M.HistogramAccumulator]]
    ratio: M.MomentAccumulator
    energy: M.MomentAccumulator
    image_sum: np.ndarray  # (V,) sum of voxels / E_inc
    n: int = 0
    n_multi_peak: int = 0

    @classmethod
    def empty(cls, binnings: dict[str, M.Binning], n_ebins: int, n_voxels: int) -> _Summary:
        return cls(
            hists={k: M.HistogramAccumulator(b) for k, b in binnings.items()},
            hists_e=[{k: M.HistogramAccumulator(b) for k, b in binnings.items() if k != _VOXEL}
                     for _ in range(n_ebins)],
            ratio=M.MomentAccumulator(n_ebins),
            energy=M.MomentAccumulator(n_ebins),
            image_sum=np.zeros(n_voxels),
        )

    def update(self, obs: dict[str, np.ndarray], showers: np.ndarray, energies: np.ndarray, ebin: np.ndarray,
               threshold: float) -> None:
        for k, h in self.hists.items():
            h.update(showers[showers > threshold] if k == _VOXEL else obs[k])
        for j, hs in enumerate(self.hists_e):
            m = ebin == j
            if m.any():
                for k, h in hs.items():
                    h.update(obs[k][m])
        self.ratio.update(obs["E_tot/E_inc"], ebin)
        self.energy.update(energies, ebin)
        self.image_sum += (showers / energies[:, None]).sum(axis=0)
        self.n += len(energies)
        if "n_peaks" in obs:
            self.n_multi_peak += int((obs["n_peaks"] >= 2).sum())


@dataclass
class _Subsample:
    """Seeded random subsample of one file held in memory for the sample-based scores."""

    low: np.ndarray  # (m, 1 + V) float32: log10(E_inc / MeV), voxels / E_inc
    high: np.ndarray  # (m, n_obs) float64 observables
    ebin: np.ndarray  # (m,) energy-bin index
    half: np.ndarray  # (m,) bool: reference half B (floor)


def _stream(f: ShowerFile, n_used: int, geometry: Geometry, binnings: dict[str, M.Binning], edges: np.ndarray,
            keep: np.ndarray, half_rng: np.random.Generator | None, cfg: EvaluationConfig,
            progress: bool, desc: str) -> tuple[dict[str, _Summary], _Subsample]:
    names = observable_names(geometry)
    ne = len(edges) - 1
    summaries = {"all": _Summary.empty(binnings, ne, geometry.n_voxels)}
    if half_rng is not None:
        summaries["A"] = _Summary.empty(binnings, ne, geometry.n_voxels)
        summaries["B"] = _Summary.empty(binnings, ne, geometry.n_voxels)
    lows, highs, ebins, halves = [], [], [], []
    bar = _bar(n_used, desc, progress)
    for start in range(0, n_used, cfg.chunk_size):
        batch = f.read(start, min(start + cfg.chunk_size, n_used))
        s = batch.showers.astype(np.float64)
        e = batch.energies
        obs = compute_observables(s, e, geometry, cfg.threshold, cfg.peak_fraction)
        eb = np.searchsorted(edges, e, side="right") - 1
        eb = np.where(e == edges[-1], ne - 1, eb)
        eb = np.where((eb < 0) | (eb >= ne), -1, eb)
        summaries["all"].update(obs, s, e, eb, cfg.threshold)
        half = half_rng.random(len(e)) < 0.5 if half_rng is not None else np.zeros(len(e), bool)
        if half_rng is not None:
            for key, m in (("A", ~half), ("B", half)):
                summaries[key].update({k: v[m] for k, v in obs.items()}, s[m], e[m], eb[m], cfg.threshold)
        sel = keep[(keep >= start) & (keep < start + len(e))] - start
        if sel.size:
            lows.append(np.concatenate([np.log10(e[sel])[:, None], s[sel] / e[sel, None]], axis=1).astype(np.float32))
            highs.append(np.stack([obs[k][sel] for k in names], axis=1))
            ebins.append(eb[sel])
            halves.append(half[sel])
        bar.update(len(e))
    bar.close()
    sub = _Subsample(
        low=np.concatenate(lows) if lows else np.zeros((0, 1 + geometry.n_voxels), np.float32),
        high=np.concatenate(highs) if highs else np.zeros((0, len(names))),
        ebin=np.concatenate(ebins) if ebins else np.zeros(0, int),
        half=np.concatenate(halves) if halves else np.zeros(0, bool),
    )
    # the rows were read in file order: shuffle them so that any prefix is a random subsample
    perm = np.random.default_rng(len(sub.ebin)).permutation(len(sub.ebin))
    return summaries, _Subsample(sub.low[perm], sub.high[perm], sub.ebin[perm], sub.half[perm])


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, progress: bool) -> Any:
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="shower", leave=False)


def _make_binnings(f: ShowerFile, n_used: int, geometry: Geometry, cfg: EvaluationConfig,
                   rng: np.random.Generator) -> dict[str, M.Binning]:
    """Fixed binnings from random 1024-shower blocks of the reference (``cfg.binning_sample`` showers)."""
    block = 1024
    n_blocks = max(1, math.ceil(n_used / block))
    take = min(n_blocks, max(1, cfg.binning_sample // block))
    starts = np.sort(rng.choice(n_blocks, take, replace=False)) * block
    obs_parts: list[dict[str, np.ndarray]] = []
    vox: list[np.ndarray] = []
    for a in starts:
        b = f.read(int(a), int(min(a + block, n_used)))
        s = b.showers.astype(np.float64)
        obs_parts.append(compute_observables(s, b.energies, geometry, cfg.threshold, cfg.peak_fraction))
        v = s[s > cfg.threshold]
        vox.append(v[rng.permutation(v.size)[:100_000]])
    binnings = {
        k: M.make_binning(np.concatenate([o[k] for o in obs_parts]), cfg.n_bins, integer=k in _INTEGER_OBS)
        for k in observable_names(geometry)
    }
    binnings[_VOXEL] = M.make_binning(np.concatenate(vox), cfg.n_bins, log=True)
    return binnings


# ======================================================================================
# scores
# ======================================================================================


def _hist_scores(a: _Summary, b: _Summary, seed: int, n_boot: int) -> dict[str, M.HistogramScore]:
    return {k: M.histogram_score(a.hists[k].compute(), b.hists[k].compute(), a.hists[k].binning, n_boot, seed)
            for k in a.hists}


def _balanced(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = min(len(x), len(y))
    return x[:n], y[:n]


def _classifier(ref: np.ndarray, ref_bins: np.ndarray, cand: np.ndarray, cand_bins: np.ndarray, seed: int,
                n_ebins: int) -> dict[str, Any]:
    n = min(len(ref), len(cand))
    if n < 10:
        return {"auc": math.nan, "error": "fewer than 10 showers per class"}
    res = M.classifier_score(ref[:n], cand[:n], seed=seed)
    out = res.to_dict()
    bins = np.concatenate([ref_bins[:n], cand_bins[:n]])[res.validation_index]
    per = []
    for j in range(n_ebins):
        m = bins == j
        y = res.validation_label[m]
        if y.sum() > 0 and (1 - y).sum() > 0:
            from sklearn.metrics import roc_auc_score

            per.append(float(roc_auc_score(y, res.validation_proba[m])))
        else:
            per.append(math.nan)
    out["per_energy_auc"] = per
    return out


def _fpd_kpd(ref: np.ndarray, cand: np.ndarray, cfg: EvaluationConfig, seed: int,
             which: set[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    if "fpd" in which:
        out["fpd"] = M.fpd(ref, cand, cfg.fpd_min_samples, cfg.fpd_max_samples, cfg.fpd_batches, cfg.fpd_points,
                           seed=seed).to_dict()
    if "kpd" in which:
        out["kpd"] = M.kpd(ref, cand, cfg.kpd_batches, cfg.kpd_batch_size, seed=seed).to_dict()
    return out


def _layer_images(low: np.ndarray, geometry: Geometry) -> list[np.ndarray]:
    v = low[:, 1:]
    return [v[:, geometry.layer_slice(i)].reshape(len(v), *geometry.layer_shape(i)) for i in range(geometry.n_layers)]


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


# ======================================================================================
# the entry point
# ======================================================================================


def evaluate(
    reference: str | Path,
    candidate: str | Path,
    out: str | Path,
    metrics: Sequence[str] | None = None,
    seed: int = 0,
    floor: bool = False,
    binning: str | Path | None = None,
    max_showers: int | None = None,
    progress: bool = True,
    energy_bins: Sequence[float] | None = None,
    config: EvaluationConfig | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Score ``candidate`` against ``reference``; write ``out/metrics.json`` and ``out/report.html``.

    Args:
        reference, candidate: shower files (:class:`fastshower.io.ShowerFile`).
        out: output folder (created).
        metrics: subset of :data:`METRICS` (default all). Histograms are always filled (they
            drive the plots); only the requested scores are computed and written.
        seed: seeds binning blocks, subsamples, splits, bootstraps and the floor's halves.
        floor: also score the reference's two random halves against each other (``floor.*``):
            the statistical floor every score is read against (CaloChallenge's Geant4 vs Geant4).
        binning: a CaloChallenge binning XML; its geometry is imposed on both files.
        max_showers: read at most the first ``max_showers`` showers of each file (a quick look;
            a file sorted by energy is then biased).
        progress: tqdm progress bars.
        energy_bins: energy-bin edges in MeV for the per-energy rows (default: one bin per
            distinct reference energy when there are at most 20, e.g. Belle II's 0.5, 1, 1.5,
            2, 2.5 GeV, else 8 log-spaced bins).
        config: the remaining knobs (:class:`EvaluationConfig`).
        report: write report.html and its plots (False: metrics.json only, for quick checks).

    Returns:
        The metrics dict also written to metrics.json (NaN written as null); its keys are
        described by :data:`EvaluationResultSchema`.

    Raises:
        ValidationInputError: files that cannot be compared (different geometries or particles,
            empty, no overlapping energies, NaN energies, unreadable), naming both files.
    """
    t0 = time.perf_counter()
    cfg = config or EvaluationConfig()
    ref_path, cand_path, out_dir = Path(reference), Path(candidate), Path(out)
    which = set(METRICS if metrics is None else metrics)
    unknown = which - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}")
    geo_in: Geometry | None = None
    if binning is not None:
        try:
            geo_in = read_calochallenge_binning(binning)
        except GeometryError as exc:
            raise ValidationInputError(f"cannot compare {cand_path} with reference {ref_path}: {exc}") from None
    rf = _open(ref_path, geo_in, ref_path, cand_path)
    try:
        cf = _open(cand_path, geo_in, ref_path, cand_path)
    except ValidationInputError:
        rf.close()
        raise
    try:
        return _evaluate(rf, cf, out_dir, which, seed, floor, max_showers, progress, energy_bins, cfg, t0, report)
    finally:
        rf.close()
        cf.close()


def _evaluate(rf: ShowerFile, cf: ShowerFile, out_dir: Path, which: set[str], seed: int, floor: bool,
              max_showers: int | None, progress: bool, energy_bins: Sequence[float] | None,
              cfg: EvaluationConfig, t0: float, report: bool) -> dict[str, Any]:
    n_ref = rf.n if max_showers is None else min(rf.n, max_showers)
    n_cand = cf.n if max_showers is None else min(cf.n, max_showers)
    e_ref, e_cand = rf.energies()[:n_ref], cf.energies()[:n_cand]
    _check_inputs(rf, cf, e_ref, e_cand)
    geometry = rf.geometry
    if geometry.profile is not None:
        which -= {"ssim", "multi_peak"}
    edges = _energy_edges(e_ref, cfg, energy_bins)
    ne = len(edges) - 1
    rng = np.random.default_rng(seed)
    binnings = _make_binnings(rf, n_ref, geometry, cfg, rng)
    cap = int(min(cfg.max_subsample, max(100, cfg.feature_budget_bytes // (4 * (geometry.n_voxels + 1)))))
    keep_ref = np.sort(rng.choice(n_ref, min(n_ref, cap), replace=False))
    keep_cand = np.sort(rng.choice(n_cand, min(n_cand, cap), replace=False))
    half_rng = np.random.default_rng([seed, 1]) if floor else None
    sums_r, sub_r = _stream(rf, n_ref, geometry, binnings, edges, keep_ref, half_rng, cfg, progress, "reference")
    sums_c, sub_c = _stream(cf, n_cand, geometry, binnings, edges, keep_cand, None, cfg, progress, "candidate")
    ref, cand = sums_r["all"], sums_c["all"]

    result: dict[str, Any] = {
        "reference": str(rf.path), "candidate": str(cf.path), "geometry": geometry.name,
        "particle": rf.particle, "seed": seed, "n_reference": ref.n, "n_candidate": cand.n,
        "fastshower_version": __version__, "metrics": sorted(which),
    }
    steps = _bar(8, "scores", progress)
    hs = _hist_scores(ref, cand, seed, cfg.n_boot)
    steps.update(1)
    if "separation_power" in which:
        result["separation_power"] = {k: v.separation_power for k, v in hs.items()}
        result["separation_power_error"] = {k: v.separation_power_error for k, v in hs.items()}
    if "w1" in which:
        result["w1"] = {k: v.w1 for k, v in hs.items()}
        result["w1_error"] = {k: v.w1_error for k, v in hs.items()}
    if "chi2" in which:
        result["chi2_ndf"] = {k: v.chi2_ndf for k, v in hs.items()}
        result["ndf"] = {k: v.ndf for k, v in hs.items()}
    clf: dict[str, Any] = {}
    if "classifier_low" in which:
        clf["low"] = _classifier(sub_r.low, sub_r.ebin, sub_c.low, sub_c.ebin, seed, ne)
    steps.update(1)
    if "classifier_high" in which:
        clf["high"] = _classifier(sub_r.high, sub_r.ebin, sub_c.high, sub_c.ebin, seed, ne)
    steps.update(1)
    if clf:
        result["classifier"] = clf
    result.update(_fpd_kpd(sub_r.high, sub_c.high, cfg, seed, which))
    steps.update(1)

    discrete = np.unique(e_ref)
    labels = [_energy_label(edges[j], edges[j + 1], discrete) for j in range(ne)]
    rr, rc = ref.ratio.compute(), cand.ratio.compute()
    er, ec = ref.energy.compute(), cand.energy.compute()
    rows: list[dict[str, Any]] = []
    for j in range(ne):
        row: dict[str, Any] = {"label": labels[j], "energy_lo_mev": float(edges[j]),
                               "energy_hi_mev": float(edges[j + 1]), "n_reference": int(rr["n"][j]),
                               "n_candidate": int(rc["n"][j])}
        if rr["n"][j] > 0 and rc["n"][j] > 0:
            sp = {k: M.separation_power(ref.hists_e[j][k].compute(), cand.hists_e[j][k].compute())
                  for k in ref.hists_e[j]}
            row["separation_power_E_tot/E_inc"] = sp["E_tot/E_inc"]
            row["separation_power_mean"] = float(np.mean(list(sp.values())))
            worst = max(sp, key=lambda k: sp[k])
            row["separation_power_max"], row["separation_power_max_observable"] = sp[worst], worst
        for side in ("low", "high"):
            if side in clf and "per_energy_auc" in clf[side]:
                row[f"auc_{side}"] = clf[side]["per_energy_auc"][j]
        rows.append(row)
    steps.update(1)

    if "response" in which:
        result["response"] = _response(rr, rc, er, ec, labels)
    if "multi_peak" in which:
        fr, fr_e = M.binomial_fraction(ref.n_multi_peak, ref.n)
        fc, fc_e = M.binomial_fraction(cand.n_multi_peak, cand.n)
        result["multi_peak"] = {"reference": fr, "reference_error": fr_e, "candidate": fc, "candidate_error": fc_e,
                                "peak_fraction": cfg.peak_fraction}
    if "ssim" in which:
        result["ssim"] = _ssim(sub_r, sub_c, geometry, labels, cfg, seed)
        for row, s in zip(rows, result["ssim"], strict=True):
            row["ssim_reference"], row["ssim_candidate"] = s["reference"], s["candidate"]
    steps.update(1)
    if "support_size" in which:
        result["support_size"] = _support(sub_r.low[:, 1:], sub_c.low[:, 1:], geometry, cfg, seed)
    steps.update(1)
    result["per_energy"] = rows

    if floor:
        a, b = sums_r["A"], sums_r["B"]
        fl: dict[str, Any] = {"n_reference": a.n, "n_candidate": b.n}
        hf = _hist_scores(a, b, seed, cfg.n_boot)
        if "separation_power" in which:
            fl["separation_power"] = {k: v.separation_power for k, v in hf.items()}
        if "w1" in which:
            fl["w1"] = {k: v.w1 for k, v in hf.items()}
        if "chi2" in which:
            fl["chi2_ndf"] = {k: v.chi2_ndf for k, v in hf.items()}
        fclf: dict[str, Any] = {}
        ha, hb = ~sub_r.half, sub_r.half
        if "classifier_low" in which:
            fclf["low"] = _classifier(sub_r.low[ha], sub_r.ebin[ha], sub_r.low[hb], sub_r.ebin[hb], seed, ne)
        if "classifier_high" in which:
            fclf["high"] = _classifier(sub_r.high[ha], sub_r.ebin[ha], sub_r.high[hb], sub_r.ebin[hb], seed, ne)
        if fclf:
            fl["classifier"] = fclf
        fl.update(_fpd_kpd(sub_r.high[ha], sub_r.high[hb], cfg, seed, which))
        result["floor"] = fl
    steps.update(1)
    steps.close()

    result["binning"] = {k: b.to_dict() for k, b in binnings.items()}
    result["energy_bin_edges_mev"] = [float(x) for x in edges]
    result["config"] = asdict(cfg)
    result["wall_time_s"] = time.perf_counter() - t0
    result = _nan_to_none(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    if not report:
        return result

    from fastshower.validate.report import PlotData, write_report

    radial = radial_edges(geometry) if geometry.profile is None else None
    plot = PlotData(
        geometry=geometry,
        binnings=binnings,
        ref_counts={k: h.compute() for k, h in ref.hists.items()},
        cand_counts={k: h.compute() for k, h in cand.hists.items()},
        ref_image=ref.image_sum / max(ref.n, 1),
        cand_image=cand.image_sum / max(cand.n, 1),
        radial_edges=radial,
        ref_radial=None if radial is None else radial_profile(ref.image_sum[None] / max(ref.n, 1), geometry)[0],
        cand_radial=None if radial is None else radial_profile(cand.image_sum[None] / max(cand.n, 1), geometry)[0],
    )
    write_report(out_dir, result, plot)
    return result


def _response(rr: dict[str, np.ndarray], rc: dict[str, np.ndarray], er: dict[str, np.ndarray],
              ec: dict[str, np.ndarray], labels: list[str]) -> dict[str, Any]:
    """Linearity (mean E_vis/E_inc) and resolution (std/mean of E_vis/E_inc) per energy bin, and the fits."""
    out: dict[str, Any] = {"per_energy": [], "fit": {}}
    for side, r, e in (("reference", rr, er), ("candidate", rc, ec)):
        n = r["n"].astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            res = r["std"] / r["mean"]
            res_err = res / np.sqrt(2 * np.clip(n - 1, 1, None))
            mean_err = r["std"] / np.sqrt(n)
        ok = n > 2
        out["fit"][side] = M.fit_resolution(e["mean"][ok] / 1e3, res[ok], res_err[ok]).to_dict()
        for j, lab in enumerate(labels):
            if len(out["per_energy"]) <= j:
                out["per_energy"].append({"label": lab})
            out["per_energy"][j].update({
                f"energy_mean_gev_{side}": float(e["mean"][j] / 1e3) if n[j] else math.nan,
                f"response_{side}": float(r["mean"][j]), f"response_error_{side}": float(mean_err[j]),
                f"resolution_{side}": float(res[j]), f"resolution_error_{side}": float(res_err[j]),
            })
    return out


def _ssim(sub_r: _Subsample, sub_c: _Subsample, geometry: Geometry, labels: list[str], cfg: EvaluationConfig,
          seed: int) -> list[dict[str, Any]]:
    """Per energy bin: mean SSIM within reference, within candidate, and across (see metrics.ssim_diversity)."""
    rows = []
    for j, lab in enumerate(labels):
        a = sub_r.low[sub_r.ebin == j][: cfg.ssim_per_bin]
        b = sub_c.low[sub_c.ebin == j][: cfg.ssim_per_bin]
        row: dict[str, Any] = {"label": lab, "n_reference": len(a), "n_candidate": len(b)}
        ia, ib = _layer_images(a, geometry), _layer_images(b, geometry)
        for key, x, y, same in (("reference", ia, ia, True), ("candidate", ib, ib, True), ("cross", ia, ib, False)):
            m, err = M.ssim_diversity(x, y, cfg.ssim_pairs, seed, same=same) if len(x[0]) and len(y[0]) else (
                math.nan, math.nan)
            row[key], row[f"{key}_error"] = m, err
        rows.append(row)
    return rows


def _support(ref: np.ndarray, cand: np.ndarray, geometry: Geometry, cfg: EvaluationConfig, seed: int) -> dict[str, Any]:
    n = int(min(cfg.birthday_max, math.sqrt(2e10 / max(geometry.n_voxels, 1)), len(ref), len(cand)))
    if n < 10:
        return {"error": "fewer than 10 showers"}
    scale = M.pairwise_distance_median(ref[:n].astype(np.float64), seed=seed)
    thr = cfg.birthday_fraction * scale
    return {
        "threshold": thr, "threshold_definition": f"{cfg.birthday_fraction} x median pairwise distance of the "
        "reference (features voxels / E_inc)",
        "reference": M.birthday_support_size(ref[:n].astype(np.float64), thr, seed=seed).to_dict(),
        "candidate": M.birthday_support_size(cand[:n].astype(np.float64), thr, seed=seed).to_dict(),
    }


#: keys of metrics.json and their meaning (also in the report)
EvaluationResultSchema: dict[str, str] = {
    "reference, candidate, geometry, particle, seed": "inputs",
    "n_reference, n_candidate": "showers streamed from each file",
    "separation_power / separation_power_error": "{observable: S in [0, 1]} and bootstrap error",
    "w1 / w1_error": "{observable: binned W1 in the observable's unit}",
    "chi2_ndf / ndf": "{observable: two-sample chi2 / ndf}",
    "classifier.low / classifier.high": "auc, auc_error, jsd, jsd_error, best_epoch, n_train, n_test, n_validation, "
    "per_energy_auc",
    "fpd / kpd": "value, error, scale (=1000: values are x1e3)",
    "ssim": "[per energy bin: reference, candidate, cross mean SSIM and errors]",
    "support_size": "threshold, reference/candidate: support, error, median_draws, n, censored",
    "multi_peak": "fraction of showers with >= 2 peaks, reference/candidate with errors",
    "response": "per_energy linearity/resolution, fit {reference, candidate}: a, b (sigma/E = a/sqrt(E) (+) b)",
    "per_energy": "[rows per energy bin: label, counts, separation powers, per-energy AUCs, SSIM]",
    "floor": "same scores for the reference's random halves (floor=True)",
    "binning": "{observable: edges, log} the fixed binnings used",
}

