"""``evaluate``: score a candidate shower file against a reference file and write a report.

Memory stays bounded whatever the file and detector sizes: every file is streamed chunk by
chunk (at most ``EvaluationConfig.chunk_bytes`` of float64 showers at a time, so a 65 025-cell
detector reads a few hundred showers per chunk) through the observables into fixed-binning
histograms and per-energy moment sums; the sample-based scores (classifier, FPD/KPD, SSIM,
support size) use a seeded random subsample of at most ``EvaluationConfig.max_subsample``
showers per file, drawn uniformly over the whole file.

The low-level classifier sees log10(E_inc) and the voxels / E_inc. Above
``EvaluationConfig.classifier_max_voxels`` voxels (high-granularity calorimeters: ILD 27 000,
CaloChallenge dataset 3 40 500, CLIC-like 65 025 cells) it sees instead the energy summed over
k x k blocks of neighbouring cells within each layer, with the smallest k that brings the
feature count under the cap (:func:`fastshower.validate.observables.pooled_voxels`). Sum
pooling was chosen over a small CNN because it is deterministic without training, keeps every
layer's energy and the layer structure, costs one pass over the voxels, and leaves the MLP
classifier of the CaloChallenge unchanged; an MLP on 40 000-65 000 inputs would need several
GB for 20 000 showers per file and minutes per epoch on a CPU. What it gives up, structure
inside one block, the histograms of per-layer widths and the high-level classifier still see.
metrics.json records what the classifier saw (``classifier.low.input``).
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

from fastshower._version import __version__
from fastshower.errors import FastshowerError
from fastshower.geometry import Geometry, GeometryError, read_calochallenge_binning
from fastshower.io import ShowerFile, ShowerFileError, convention_clash
from fastshower.validate import metrics as M
from fastshower.validate import projections
from fastshower.validate.observables import (
    challenge_high_level,
    compute_observables,
    layer_energies,
    observable_names,
    pooled_size,
    pooled_voxels,
    radial_edges,
    radial_profile,
)

__all__ = ["BINNINGS", "METRICS", "EvaluationConfig", "EvaluationResultSchema", "ValidationInputError", "evaluate"]

#: metric names accepted by ``evaluate(metrics=...)`` (None = all)
METRICS: tuple[str, ...] = (
    "separation_power",
    "w1",
    "chi2",
    "classifier_low",
    "classifier_high",
    "classifier_challenge",
    "fpd",
    "kpd",
    "ssim",
    "support_size",
    "multi_peak",
    "response",
    "projections",
)
#: histogram binnings accepted by ``evaluate(binning=...)``: fastshower's quantile rule with
#: under/overflow bins, or the fixed ranges of the CaloChallenge evaluation (out-of-range dropped)
BINNINGS: tuple[str, ...] = ("quantile", "calochallenge")
_INTEGER_OBS = {"n_hits", "n_peaks"}
#: validation showers of each class an energy bin needs for its own classifier AUC
_MIN_PER_ENERGY_AUC = 20
_VOXEL = "voxel_energy"


class ValidationInputError(FastshowerError, ValueError):
    """Two shower files that cannot be compared (one line naming both files)."""


@dataclass(frozen=True)
class EvaluationConfig:
    """Knobs of :func:`evaluate` (defaults are the documented choices).

    Attributes:
        chunk_size: showers read per chunk (fewer when ``chunk_bytes`` is the tighter cap).
        chunk_bytes: cap on one chunk of float64 showers (rows x voxels x 8 bytes); the
            observables' temporaries take a few times this.
        n_bins: histogram bins per observable (see :func:`metrics.make_binning`).
        binning_sample: reference showers (random blocks of 1024) that fix the binnings.
        threshold: cell threshold for sparsity and hits, MeV.
        peak_fraction: a peak must exceed this fraction of the shower's visible energy.
        max_subsample: showers per file kept in memory for the sample-based scores.
        feature_budget_bytes: cap on the float32 low-level classifier features of one subsample.
        classifier_max_voxels: above this many voxels the low-level classifier sees k x k
            pooled cells per layer (see the module docstring), at most this many.
        raw_budget_bytes: cap on the float32 voxels kept per file for SSIM and the support size
            when the classifier sees pooled cells (otherwise they share the classifier's copy).
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
    chunk_bytes: int = 1 << 27
    n_bins: int = 50
    binning_sample: int = 20_000
    threshold: float = 0.0
    peak_fraction: float = 0.02
    max_subsample: int = 20_000
    feature_budget_bytes: int = 1 << 30
    classifier_max_voxels: int = 8192
    raw_budget_bytes: int = 1 << 29
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
    """Open one of the two files; a file that cannot be read becomes a ValidationInputError naming both."""
    try:
        return ShowerFile(path, geometry)
    except ShowerFileError as exc:
        raise ValidationInputError(f"cannot compare {cand} with reference {ref}: {exc}") from None


def _requested_metrics(metrics: Sequence[str] | None) -> set[str]:
    """The metric names to compute: all of :data:`METRICS` for None, else ``metrics`` checked against it."""
    which = set(METRICS if metrics is None else metrics)
    unknown = which - set(METRICS)
    if unknown:
        raise ValidationInputError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}")
    return which


def _binning_scheme(binning: str) -> str:
    """``binning`` checked against :data:`BINNINGS` (a path to an XML gets a pointer to ``binning_xml``)."""
    if binning in BINNINGS:
        return binning
    hint = ("; a CaloChallenge binning XML goes to binning_xml (--binning-xml)"
            if str(binning).lower().endswith(".xml") else "")
    raise ValidationInputError(f"unknown binning {str(binning)!r}; choose from {', '.join(BINNINGS)}{hint}")


def _imposed_geometry(binning_xml: str | Path | None, ref: Path, cand: Path) -> Geometry | None:
    """The geometry of a CaloChallenge binning XML to impose on both files (None: each file's own)."""
    if binning_xml is None:
        return None
    try:
        return read_calochallenge_binning(binning_xml)
    except GeometryError as exc:
        raise ValidationInputError(f"cannot compare {cand} with reference {ref}: {exc}") from None


def _open_pair(ref: Path, cand: Path, geometry: Geometry | None) -> tuple[ShowerFile, ShowerFile]:
    """Open reference and candidate (the reference is closed again if the candidate cannot be opened)."""
    rf = _open(ref, geometry, ref, cand)
    try:
        cf = _open(cand, geometry, ref, cand)
    except ValidationInputError:
        rf.close()
        raise
    return rf, cf


def _check_inputs(rf: ShowerFile, cf: ShowerFile, e_ref: np.ndarray, e_cand: np.ndarray) -> None:
    """Refuse files that cannot be compared: other geometry or particle, no showers, bad or disjoint
    incident energies ``e_ref`` / ``e_cand`` (n,) MeV."""
    both = f"reference {rf.path} vs candidate {cf.path}"
    if clash := convention_clash(rf, cf):  # one detector on two file conventions: name the convert command
        raise ValidationInputError(clash)
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
    """Label of the energy bin [lo, hi) MeV: its one energy of ``discrete`` (MeV), else its range, in GeV."""
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
        """Zeroed summaries for ``n_ebins`` energy bins and ``n_voxels`` voxels."""
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
        """Add one chunk: observables ``obs`` (n,) each, ``showers`` (n, V) MeV, ``energies`` (n,) MeV and
        their energy-bin index ``ebin`` (n,); voxel energies count above ``threshold`` MeV."""
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

    low: np.ndarray  # (m, 1 + P) float32: log10(E_inc / MeV), classifier voxel features / E_inc
    high: np.ndarray  # (m, n_obs) float64 observables
    ebin: np.ndarray  # (m,) energy-bin index
    half: np.ndarray  # (m,) bool: reference half B (floor)
    raw: np.ndarray  # (r, V) float32 voxels / E_inc (SSIM, support size); a view into low when not pooled
    raw_ebin: np.ndarray  # (r,) energy-bin index of the raw rows
    names: tuple[str, ...] = ()  # the observables' names, the columns of high


def _chunk_rows(geometry: Geometry, cfg: EvaluationConfig) -> int:
    """Showers per chunk: ``cfg.chunk_size``, fewer when rows x V float64 would exceed ``cfg.chunk_bytes``."""
    return int(max(1, min(cfg.chunk_size, cfg.chunk_bytes // (8 * max(geometry.n_voxels, 1)))))


def _shuffled_positions(m: int) -> np.ndarray:
    """Where the j-th of ``m`` rows read in file order goes in the shuffled subsample, shape (m,): the
    subsample is ``rows[perm]`` with ``perm`` from a generator seeded with ``m``, so any prefix is random."""
    perm = np.random.default_rng(m).permutation(m)
    dest = np.empty(m, dtype=np.int64)
    dest[perm] = np.arange(m)
    return dest


class _Rows:
    """The subsample (:class:`_Subsample`) filled chunk by chunk, each kept row written straight into
    its shuffled place: one copy in memory, where concatenating the chunks' rows and then permuting
    them held three at once (1.7 GB at 20 000 showers x 7226 pooled features)."""

    def __init__(self, plan: _Plan, keep: np.ndarray, keep_raw: np.ndarray | None) -> None:
        g, m = plan.geometry, len(keep)
        self.keep, self.dest = keep, _shuffled_positions(m)
        low = np.empty((m, 1 + pooled_size(g, plan.pool)), np.float32)
        ebin = np.empty(m, dtype=np.int64)
        names = tuple(observable_names(g))
        self.sub = _Subsample(low, np.empty((m, len(names))), ebin, np.empty(m, bool), low[:, 1:], ebin, names)
        self.keep_raw = keep_raw
        if keep_raw is not None:
            self.dest_raw = _shuffled_positions(len(keep_raw))
            self.sub.raw = np.empty((len(keep_raw), g.n_voxels), np.float32)
            self.sub.raw_ebin = np.empty(len(keep_raw), dtype=np.int64)

    def add(self, start: int, s: np.ndarray, e: np.ndarray, obs: dict[str, np.ndarray], eb: np.ndarray,
            half: np.ndarray, plan: _Plan) -> None:
        """Write the kept rows of the chunk that starts at file row ``start``: showers ``s`` (n, V) MeV,
        energies ``e`` (n,) MeV, observables ``obs`` (n,) each, energy bins ``eb`` (n,), halves (n,)."""
        lo, hi = np.searchsorted(self.keep, [start, start + len(e)])
        if hi > lo:
            sel, d = self.keep[lo:hi] - start, self.dest[lo:hi]
            self.sub.low[d, 0] = np.log10(e[sel])
            self.sub.low[d, 1:] = pooled_voxels(s[sel], plan.geometry, plan.pool) / e[sel, None]
            self.sub.high[d] = np.stack([obs[k][sel] for k in observable_names(plan.geometry)], axis=1)
            self.sub.ebin[d], self.sub.half[d] = eb[sel], half[sel]
        if self.keep_raw is not None:
            lo, hi = np.searchsorted(self.keep_raw, [start, start + len(e)])
            if hi > lo:
                sel, d = self.keep_raw[lo:hi] - start, self.dest_raw[lo:hi]
                self.sub.raw[d] = s[sel] / e[sel, None]
                self.sub.raw_ebin[d] = eb[sel]


def _stream(f: ShowerFile, plan: _Plan, n_used: int, keep: np.ndarray, keep_raw: np.ndarray | None,
            half_rng: np.random.Generator | None, cfg: EvaluationConfig, progress: bool,
            desc: str) -> tuple[dict[str, _Summary], _Subsample]:
    """Stream the first ``n_used`` showers of ``f`` through the observables in chunks.

    Returns the summaries ("all"; with ``half_rng`` also the random halves "A" and "B") and the
    in-memory subsample of the rows ``keep`` (m,) (raw voxels of the rows ``keep_raw`` when the
    classifier sees pooled cells). Energies are binned by ``plan.edges``; showers outside them get
    energy bin -1.
    """
    geometry, ne = plan.geometry, plan.n_energy_bins
    summaries = {"all": _Summary.empty(plan.binnings, ne, geometry.n_voxels)}
    if half_rng is not None:
        summaries["A"] = _Summary.empty(plan.binnings, ne, geometry.n_voxels)
        summaries["B"] = _Summary.empty(plan.binnings, ne, geometry.n_voxels)
    rows = _Rows(plan, keep, keep_raw)
    bar = _bar(n_used, desc, progress)
    step = _chunk_rows(geometry, cfg)
    for start in range(0, n_used, step):
        batch = f.read(start, min(start + step, n_used))
        s = batch.showers.astype(np.float64)
        e = batch.energies
        obs = compute_observables(s, e, geometry, cfg.threshold, cfg.peak_fraction)
        eb = M.energy_bin_index(e, plan.edges)
        summaries["all"].update(obs, s, e, eb, cfg.threshold)
        half = half_rng.random(len(e)) < 0.5 if half_rng is not None else np.zeros(len(e), bool)
        if half_rng is not None:
            for key, m in (("A", ~half), ("B", half)):
                summaries[key].update({k: v[m] for k, v in obs.items()}, s[m], e[m], eb[m], cfg.threshold)
        rows.add(start, s, e, obs, eb, half, plan)
        bar.update(len(e))
    bar.close()
    return summaries, rows.sub


class _NoBar:
    """The progress bar when progress is off: does nothing."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, progress: bool) -> Any:
    """A tqdm progress bar over ``total`` items, or a silent stand-in when not ``progress``."""
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="shower", leave=False)


# ======================================================================================
# binnings
# ======================================================================================


@dataclass
class _BinningSample:
    """Observables of the reference's binning sample and the largest values the CaloChallenge binning needs.

    Attributes:
        obs: observable -> values (m,) over the sampled showers.
        voxels: a random sample of voxel energies above threshold, MeV.
        maxima: "E_layer_i" and "voxel_energy" -> the largest value in the sample, MeV.
        whole: the sample is the whole reference (its maxima are the reference's).
    """

    obs: dict[str, np.ndarray]
    voxels: np.ndarray
    maxima: dict[str, float]
    whole: bool


def _sample_block(s: np.ndarray, e: np.ndarray, geometry: Geometry, cfg: EvaluationConfig,
                  rng: np.random.Generator, rows: int) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    """Observables, up to 100 000 random voxel energies above threshold and the largest voxel (MeV) of
    one block of showers ``s`` (n, V) MeV float32, ``e`` (n,) MeV, computed ``rows`` showers at a time."""
    parts: list[dict[str, np.ndarray]] = []
    vox: list[np.ndarray] = []
    vmax = 0.0
    for a in range(0, len(e), rows):
        x = s[a:a + rows].astype(np.float64)
        parts.append(compute_observables(x, e[a:a + rows], geometry, cfg.threshold, cfg.peak_fraction))
        v = x[x > cfg.threshold]
        take = max(1, 100_000 * len(x) // len(e))
        vox.append(v[rng.permutation(v.size)[:take]])
        vmax = max(vmax, float(x.max(initial=0.0)))
    obs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return obs, np.concatenate(vox), vmax


def _binning_sample(f: ShowerFile, n_used: int, geometry: Geometry, cfg: EvaluationConfig,
                    rng: np.random.Generator) -> _BinningSample:
    """Observables of random 1024-shower blocks of the reference (``cfg.binning_sample`` showers)."""
    block = 1024
    n_blocks = max(1, math.ceil(n_used / block))
    take = min(n_blocks, max(1, cfg.binning_sample // block))
    starts = np.sort(rng.choice(n_blocks, take, replace=False)) * block
    rows = _chunk_rows(geometry, cfg)
    obs_parts: list[dict[str, np.ndarray]] = []
    vox: list[np.ndarray] = []
    vmax = 0.0
    for a in starts:
        b = f.read(int(a), int(min(a + block, n_used)))
        obs, v, m = _sample_block(b.showers, b.energies, geometry, cfg, rng, rows)
        obs_parts.append(obs)
        vox.append(v)
        vmax = max(vmax, m)
    obs = {k: np.concatenate([o[k] for o in obs_parts]) for k in obs_parts[0]}
    maxima = {k: float(v.max()) for k, v in obs.items() if k.startswith("E_layer_")} | {_VOXEL: vmax}
    return _BinningSample(obs, np.concatenate(vox), maxima, whole=take == n_blocks)


def _reference_maxima(f: ShowerFile, n_used: int, geometry: Geometry, cfg: EvaluationConfig) -> dict[str, float]:
    """The largest energy of each layer ("E_layer_i") and of any voxel ("voxel_energy") over the first
    ``n_used`` showers of the reference, MeV: one extra pass, read in chunks."""
    layer_max = np.zeros(geometry.n_layers)
    vmax = 0.0
    step = _chunk_rows(geometry, cfg)
    for a in range(0, n_used, step):
        s = f.read(a, min(a + step, n_used)).showers.astype(np.float64)
        layer_max = np.maximum(layer_max, layer_energies(s, geometry).max(axis=0))
        vmax = max(vmax, float(s.max(initial=0.0)))
    return {f"E_layer_{i}": float(m) for i, m in enumerate(layer_max)} | {_VOXEL: vmax}


def _make_binnings(f: ShowerFile, n_used: int, geometry: Geometry, cfg: EvaluationConfig,
                   rng: np.random.Generator, scheme: str) -> dict[str, M.Binning]:
    """Fixed binnings of every observable, from a sample of the reference (see :class:`EvaluationConfig`).

    ``scheme`` "quantile": :func:`metrics.make_binning` for all. "calochallenge": the challenge's
    fixed ranges (:func:`metrics.calochallenge_binning`) where it has one, the quantile rule for
    the others; its log ranges end at the reference's largest layer and voxel energies, found by
    an extra pass over the reference unless the sample was the whole file.
    """
    sample = _binning_sample(f, n_used, geometry, cfg, rng)
    binnings = {
        k: M.make_binning(sample.obs[k], cfg.n_bins, integer=k in _INTEGER_OBS) for k in observable_names(geometry)
    }
    binnings[_VOXEL] = M.make_binning(sample.voxels, cfg.n_bins, log=True)
    if scheme == "calochallenge":
        maxima = sample.maxima if sample.whole else _reference_maxima(f, n_used, geometry, cfg)
        for k in binnings:
            # a hair above the maximum, so that the largest reference value stays inside whatever
            # the summation order of the pass that found it
            top = maxima.get(k)
            b = M.calochallenge_binning(k, None if top is None else top * (1 + 1e-12))
            if b is not None:
                binnings[k] = b
    return binnings


# ======================================================================================
# planning: what is read, how it is binned, which rows are kept in memory
# ======================================================================================


@dataclass(frozen=True)
class _Plan:
    """Everything fixed before the files are streamed.

    Attributes:
        geometry: the geometry both files share.
        which: the metrics to compute (SSIM and multi-peak are dropped for air-shower profiles).
        n_ref, n_cand: showers read from the start of each file (``max_showers`` applied).
        edges: energy-bin edges, shape (k + 1,), MeV; labels: one text label per energy bin (k,).
        binnings: observable -> fixed binning, made from reference showers; binning: its scheme.
        keep_ref, keep_cand: sorted row indices (m,) of the showers kept in memory per file.
        pool: side of the cell blocks the low-level classifier sees (1: every voxel).
        keep_raw_ref, keep_raw_cand: sorted rows (r,) whose raw voxels are kept (None: pool is 1
            and the classifier's copy serves).
    """

    geometry: Geometry
    which: set[str]
    n_ref: int
    n_cand: int
    edges: np.ndarray
    labels: list[str]
    binnings: dict[str, M.Binning]
    keep_ref: np.ndarray
    keep_cand: np.ndarray
    binning: str = "quantile"
    pool: int = 1
    keep_raw_ref: np.ndarray | None = None
    keep_raw_cand: np.ndarray | None = None

    @property
    def n_energy_bins(self) -> int:
        """Number of energy bins k."""
        return len(self.edges) - 1

    @property
    def low_input(self) -> str:
        """What the low-level classifier sees, in words (written to metrics.json)."""
        if self.pool == 1:
            return f"log10(E_inc) and voxels / E_inc ({self.geometry.n_voxels} voxels)"
        n = pooled_size(self.geometry, self.pool)
        return (f"log10(E_inc) and pooled {self.pool}x{self.pool} cells per layer / E_inc ({n} sums of "
                f"{self.geometry.n_voxels} voxels)")


def _classifier_pool(geometry: Geometry, cfg: EvaluationConfig) -> int:
    """Side k of the k x k cell blocks the low-level classifier sees: 1 (every voxel) up to
    ``cfg.classifier_max_voxels`` voxels, else the smallest k whose pooled count fits."""
    if geometry.profile is not None or geometry.n_voxels <= cfg.classifier_max_voxels:
        return 1
    largest = max(max(geometry.layer_shape(i)) for i in range(geometry.n_layers))
    k = 2
    while k < largest and pooled_size(geometry, k) > cfg.classifier_max_voxels:
        k += 1
    return k


def _subsample_cap(geometry: Geometry, cfg: EvaluationConfig, pool: int) -> int:
    """Showers per file kept in memory: ``cfg.max_subsample``, fewer when the float32 low-level
    features (1 + pooled cells per shower) would exceed ``cfg.feature_budget_bytes``, never fewer than 100."""
    n = pooled_size(geometry, pool) if geometry.profile is None else geometry.n_voxels
    return int(min(cfg.max_subsample, max(100, cfg.feature_budget_bytes // (4 * (n + 1)))))


def _plan(rf: ShowerFile, cf: ShowerFile, which: set[str], seed: int, max_showers: int | None,
          energy_bins: Sequence[float] | None, cfg: EvaluationConfig, binning: str) -> _Plan:
    """Check that the files can be compared and fix energy bins, binnings and subsamples.

    The generator seeded with ``seed`` draws the binning blocks first, then the reference's and
    the candidate's subsample rows, then (pooled classifier only) their raw-voxel rows.
    """
    n_ref = rf.n if max_showers is None else min(rf.n, max_showers)
    n_cand = cf.n if max_showers is None else min(cf.n, max_showers)
    e_ref, e_cand = rf.energies()[:n_ref], cf.energies()[:n_cand]
    _check_inputs(rf, cf, e_ref, e_cand)
    geometry = rf.geometry
    if geometry.profile is not None:
        which = which - {"ssim", "multi_peak"}
    edges = _energy_edges(e_ref, cfg, energy_bins)
    discrete = np.unique(e_ref)
    labels = [_energy_label(edges[j], edges[j + 1], discrete) for j in range(len(edges) - 1)]
    rng = np.random.default_rng(seed)
    binnings = _make_binnings(rf, n_ref, geometry, cfg, rng, binning)
    pool = _classifier_pool(geometry, cfg)
    cap = _subsample_cap(geometry, cfg, pool)
    keep_ref = np.sort(rng.choice(n_ref, min(n_ref, cap), replace=False))
    keep_cand = np.sort(rng.choice(n_cand, min(n_cand, cap), replace=False))
    raw_ref = raw_cand = None
    if pool > 1:
        n_raw = max(1, cfg.raw_budget_bytes // (4 * geometry.n_voxels))
        raw_ref = np.sort(rng.choice(keep_ref, min(len(keep_ref), n_raw), replace=False))
        raw_cand = np.sort(rng.choice(keep_cand, min(len(keep_cand), n_raw), replace=False))
    return _Plan(geometry, which, n_ref, n_cand, edges, labels, binnings, keep_ref, keep_cand, binning, pool,
                 raw_ref, raw_cand)


# ======================================================================================
# scores
# ======================================================================================


def _hist_scores(a: _Summary, b: _Summary, seed: int, n_boot: int) -> dict[str, M.HistogramScore]:
    """Separation power, W1 and chi2 per observable of ``b``'s histograms against ``a``'s (bootstrapped)."""
    return {k: M.histogram_score(a.hists[k].compute(), b.hists[k].compute(), a.hists[k].binning, n_boot, seed)
            for k in a.hists}


def _classifier(ref: np.ndarray, ref_bins: np.ndarray, cand: np.ndarray, cand_bins: np.ndarray, seed: int,
                n_ebins: int) -> dict[str, Any]:
    """Classifier AUC/JSD separating ``cand`` (m, d) from ``ref`` (m, d) on equal numbers of each, and
    its AUC per energy bin (from the bins ``ref_bins`` / ``cand_bins`` of the validation rows)."""
    n = min(len(ref), len(cand))
    if n < 10:
        return {"auc": math.nan, "error": "fewer than 10 showers per class"}
    res = M.classifier_score(ref[:n], cand[:n], seed=seed)
    out = res.to_dict()
    bins = np.concatenate([ref_bins[:n], cand_bins[:n]])[res.validation_index]
    per, counts = [], []
    for j in range(n_ebins):
        m = bins == j
        y = res.validation_label[m]
        counts.append(int(m.sum()))
        # an AUC of a handful of showers is 1.0 or 0.0 by chance: left out (null) below the minimum
        if min(y.sum(), (1 - y).sum()) >= _MIN_PER_ENERGY_AUC:
            from sklearn.metrics import roc_auc_score

            per.append(float(roc_auc_score(y, res.validation_proba[m])))
        else:
            per.append(math.nan)
    out["per_energy_auc"] = per
    out["per_energy_n_validation"] = counts
    return out


def _fpd_kpd(ref: np.ndarray, cand: np.ndarray, cfg: EvaluationConfig, seed: int,
             which: set[str]) -> dict[str, dict[str, float]]:
    """FPD and KPD (x1e3) of the high-level features ``cand`` (m, n_obs) against ``ref``, as requested."""
    out: dict[str, dict[str, float]] = {}
    if "fpd" in which:
        out["fpd"] = M.fpd(ref, cand, cfg.fpd_min_samples, cfg.fpd_max_samples, cfg.fpd_batches, cfg.fpd_points,
                           seed=seed).to_dict()
    if "kpd" in which:
        out["kpd"] = M.kpd(ref, cand, cfg.kpd_batches, cfg.kpd_batch_size, seed=seed).to_dict()
    return out


def _layer_images(raw: np.ndarray, geometry: Geometry) -> list[np.ndarray]:
    """Per layer, the images (m, rows, columns) of showers ``raw`` (m, V)."""
    return [raw[:, geometry.layer_slice(i)].reshape(len(raw), *geometry.layer_shape(i))
            for i in range(geometry.n_layers)]


def _nan_to_none(x: Any) -> Any:
    """``x`` with NaN and infinities as None and numpy scalars as Python numbers (for JSON)."""
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _histogram_metrics(hs: dict[str, M.HistogramScore], which: set[str], with_errors: bool) -> dict[str, Any]:
    """The requested histogram scores as {key: {observable: value}}: separation power, W1 and
    chi2/ndf, each with its bootstrap error (or ndf) when ``with_errors``."""
    out: dict[str, Any] = {}
    if "separation_power" in which:
        out["separation_power"] = {k: v.separation_power for k, v in hs.items()}
        if with_errors:
            out["separation_power_error"] = {k: v.separation_power_error for k, v in hs.items()}
    if "w1" in which:
        out["w1"] = {k: v.w1 for k, v in hs.items()}
        if with_errors:
            out["w1_error"] = {k: v.w1_error for k, v in hs.items()}
    if "chi2" in which:
        out["chi2_ndf"] = {k: v.chi2_ndf for k, v in hs.items()}
        if with_errors:
            out["ndf"] = {k: v.ndf for k, v in hs.items()}
    return out


def _score_pair(a: _Summary, b: _Summary, sub_a: _Subsample, sub_b: _Subsample, which: set[str],
                cfg: EvaluationConfig, seed: int, n_ebins: int, steps: Any, with_errors: bool) -> dict[str, Any]:
    """Histogram, classifier and FPD/KPD scores of sample ``b`` against sample ``a``.

    Used for candidate vs reference (``with_errors``: also the histogram scores' errors) and for
    the floor's two reference halves. Advances ``steps`` by 4.
    """
    out = _histogram_metrics(_hist_scores(a, b, seed, cfg.n_boot), which, with_errors)
    steps.update(1)
    clf: dict[str, Any] = {}
    if "classifier_low" in which:
        clf["low"] = _classifier(sub_a.low, sub_a.ebin, sub_b.low, sub_b.ebin, seed, n_ebins)
    steps.update(1)
    if "classifier_high" in which:
        clf["high"] = _classifier(sub_a.high, sub_a.ebin, sub_b.high, sub_b.ebin, seed, n_ebins)
    if "classifier_challenge" in which:
        ca, cb = (challenge_high_level(s.high, s.names, s.low[:, 0]) for s in (sub_a, sub_b))
        if ca is not None and cb is not None:
            clf["challenge"] = _classifier(ca, sub_a.ebin, cb, sub_b.ebin, seed, n_ebins)
    steps.update(1)
    if clf:
        out["classifier"] = clf
    out.update(_fpd_kpd(sub_a.high, sub_b.high, cfg, seed, which))
    steps.update(1)
    return out


def _split_halves(sub: _Subsample) -> tuple[_Subsample, _Subsample]:
    """The reference subsample's rows of half A and of half B (the floor's two samples)."""
    a, b = ~sub.half, sub.half
    no_raw, no_bins = sub.raw[:0], sub.raw_ebin[:0]  # the floor has no SSIM or support size
    return (_Subsample(sub.low[a], sub.high[a], sub.ebin[a], sub.half[a], no_raw, no_bins, sub.names),
            _Subsample(sub.low[b], sub.high[b], sub.ebin[b], sub.half[b], no_raw, no_bins, sub.names))


def _floor_scores(half_a: _Summary, half_b: _Summary, sub_ref: _Subsample, which: set[str], cfg: EvaluationConfig,
                  seed: int, n_ebins: int) -> dict[str, Any]:
    """The statistical floor: the same scores for the reference's random half B against half A."""
    sub_a, sub_b = _split_halves(sub_ref)
    out: dict[str, Any] = {"n_reference": half_a.n, "n_candidate": half_b.n}
    # with errors: the verdict judges a score against the floor's spread, not its value alone
    out.update(_score_pair(half_a, half_b, sub_a, sub_b, which, cfg, seed, n_ebins, _NoBar(), with_errors=True))
    return out


def _energy_bin_separation_powers(ref: dict[str, M.HistogramAccumulator],
                                  cand: dict[str, M.HistogramAccumulator]) -> dict[str, Any]:
    """Separation powers of one energy bin: for E_tot/E_inc, the mean over observables and the worst one
    (on the counts each binning scores: in range only for the CaloChallenge binning)."""
    sp = {k: M.separation_power(h.binning.scored(h.compute()), h.binning.scored(cand[k].compute()))
          for k, h in ref.items()}
    worst = max(sp, key=lambda k: sp[k])
    return {"separation_power_E_tot/E_inc": sp["E_tot/E_inc"],
            "separation_power_mean": float(np.mean(list(sp.values()))),
            "separation_power_max": sp[worst], "separation_power_max_observable": worst}


def _per_energy_rows(ref: _Summary, cand: _Summary, plan: _Plan, n_ref: np.ndarray, n_cand: np.ndarray,
                     clf: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per energy bin: label, edges (MeV), shower counts ``n_ref``/``n_cand`` (k,), separation
    powers (where both files have showers in the bin) and the per-energy classifier AUCs of ``clf``."""
    rows: list[dict[str, Any]] = []
    for j, label in enumerate(plan.labels):
        row: dict[str, Any] = {"label": label, "energy_lo_mev": float(plan.edges[j]),
                               "energy_hi_mev": float(plan.edges[j + 1]), "n_reference": int(n_ref[j]),
                               "n_candidate": int(n_cand[j])}
        if n_ref[j] > 0 and n_cand[j] > 0:
            row.update(_energy_bin_separation_powers(ref.hists_e[j], cand.hists_e[j]))
        for side in ("low", "high"):
            if side in clf and "per_energy_auc" in clf[side]:
                row[f"auc_{side}"] = clf[side]["per_energy_auc"][j]
        rows.append(row)
    return rows


def _multi_peak(ref: _Summary, cand: _Summary, peak_fraction: float) -> dict[str, float]:
    """Fraction of showers with at least two peaks in each file, with binomial errors."""
    fr, fr_e = M.binomial_fraction(ref.n_multi_peak, ref.n)
    fc, fc_e = M.binomial_fraction(cand.n_multi_peak, cand.n)
    return {"reference": fr, "reference_error": fr_e, "candidate": fc, "candidate_error": fc_e,
            "peak_fraction": peak_fraction}


def _scores(plan: _Plan, sums_ref: dict[str, _Summary], sub_ref: _Subsample, cand: _Summary, sub_cand: _Subsample,
            cfg: EvaluationConfig, seed: int, floor: bool, progress: bool) -> dict[str, Any]:
    """Every requested score of the candidate against the reference, keyed as in metrics.json
    (in its order), with the per-energy rows and, when ``floor``, the reference halves' scores."""
    which, ne = plan.which, plan.n_energy_bins
    ref = sums_ref["all"]
    rr, rc = ref.ratio.compute(), cand.ratio.compute()
    steps = _bar(8, "scores", progress)
    result = _score_pair(ref, cand, sub_ref, sub_cand, which, cfg, seed, ne, steps, with_errors=True)
    rows = _per_energy_rows(ref, cand, plan, rr["n"], rc["n"], result.get("classifier", {}))
    steps.update(1)
    if "response" in which:
        result["response"] = _response(rr, rc, ref.energy.compute(), cand.energy.compute(), plan.labels)
    if "multi_peak" in which:
        result["multi_peak"] = _multi_peak(ref, cand, cfg.peak_fraction)
    if "ssim" in which:
        result["ssim"] = _ssim(sub_ref, sub_cand, plan.geometry, plan.labels, cfg, seed)
        for row, s in zip(rows, result["ssim"], strict=True):
            row["ssim_reference"], row["ssim_candidate"] = s["reference"], s["candidate"]
    steps.update(1)
    if "support_size" in which:
        result["support_size"] = _support(sub_ref.raw, sub_cand.raw, plan.geometry, cfg, seed)
    steps.update(1)
    if "projections" in which and projections.applies(plan.geometry) and plan.geometry.n_layers > 1:
        result["projections"] = _projections(plan, sums_ref, cand, sub_ref, sub_cand, floor)
    result["per_energy"] = rows
    if floor:
        result["floor"] = _floor_scores(sums_ref["A"], sums_ref["B"], sub_ref, which, cfg, seed, ne)
    _label_classifier_inputs(result, plan)
    steps.update(1)
    steps.close()
    return result


def _projections(plan: _Plan, sums_ref: dict[str, _Summary], cand: _Summary, sub_ref: _Subsample,
                 sub_cand: _Subsample, floor: bool) -> dict[str, Any]:
    """The 3DGAN papers' profile and moment checks (module projections) from the mean images and the
    subsamples' observables; the floor from the reference's halves."""
    ref = sums_ref["all"]
    halves = None
    if floor:
        a, b = sums_ref["A"], sums_ref["B"]
        halves = (a.image_sum / max(a.n, 1), b.image_sum / max(b.n, 1), sub_ref.half)
    return projections.projection_checks(plan.geometry, observable_names(plan.geometry), ref.image_sum / max(ref.n, 1),
                                         cand.image_sum / max(cand.n, 1), sub_ref.high, sub_cand.high, halves)


def _label_classifier_inputs(result: dict[str, Any], plan: _Plan) -> None:
    """Write into each classifier result (and the floor's) what it saw: ``input``, in words."""
    high = f"log10(E_inc) and {len(observable_names(plan.geometry))} observables"
    challenge = ("the CaloChallenge's high-level set: log10 E_inc, log10 E_layer, x/y centres and widths per layer "
                 f"({1 + 5 * plan.geometry.n_layers} features)")
    for part in (result, result.get("floor", {})):
        for side, text in (("low", plan.low_input), ("high", high), ("challenge", challenge)):
            if side in part.get("classifier", {}):
                part["classifier"][side]["input"] = text


# ======================================================================================
# results
# ======================================================================================


def _inputs_header(rf: ShowerFile, cf: ShowerFile, plan: _Plan, seed: int, n_ref: int, n_cand: int) -> dict[str, Any]:
    """The first keys of metrics.json: inputs, showers streamed, version and the metrics computed."""
    return {
        "reference": str(rf.path), "candidate": str(cf.path), "geometry": plan.geometry.name,
        "particle": rf.particle, "seed": seed, "n_reference": n_ref, "n_candidate": n_cand,
        "fastshower_version": __version__, "metrics": sorted(plan.which), "histogram_binning": plan.binning,
        "classifier_low_input": plan.low_input,
    }


def _settings(plan: _Plan, cfg: EvaluationConfig, t0: float) -> dict[str, Any]:
    """The last keys of metrics.json: binnings, energy-bin edges (MeV), config and wall time since ``t0`` (s)."""
    return {
        "binning": {k: b.to_dict() for k, b in plan.binnings.items()},
        "energy_bin_edges_mev": [float(x) for x in plan.edges],
        "config": asdict(cfg),
        "wall_time_s": time.perf_counter() - t0,
    }


def _write_metrics(out_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Write ``out_dir/metrics.json`` (created; NaN and infinities as null); returns what was written."""
    result = _nan_to_none(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    return result


def _counts(hists: dict[str, M.HistogramAccumulator]) -> dict[str, np.ndarray]:
    """Observable -> histogram counts (k + 2,) of streamed histograms."""
    return {k: h.compute() for k, h in hists.items()}


def _write_html_report(out_dir: Path, result: dict[str, Any], plan: _Plan, sums_ref: dict[str, _Summary],
                       cand: _Summary) -> None:
    """Write ``out_dir/report.html`` and its plots from the streamed histograms and mean images
    (the reference halves' histograms, when the floor was computed, draw the floor band)."""
    from fastshower.validate.report import PlotData, write_report

    geometry, ref = plan.geometry, sums_ref["all"]
    radial = radial_edges(geometry) if geometry.profile is None else None
    ref_image, cand_image = ref.image_sum / max(ref.n, 1), cand.image_sum / max(cand.n, 1)
    halves = (_counts(sums_ref["A"].hists), _counts(sums_ref["B"].hists)) if "A" in sums_ref else None
    plot = PlotData(
        geometry=geometry,
        binnings=plan.binnings,
        ref_counts=_counts(ref.hists),
        cand_counts=_counts(cand.hists),
        ref_image=ref_image,
        cand_image=cand_image,
        radial_edges=radial,
        ref_radial=None if radial is None else radial_profile(ref_image[None], geometry)[0],
        cand_radial=None if radial is None else radial_profile(cand_image[None], geometry)[0],
        ref_halves=halves,
        energy_labels=list(plan.labels),
        ref_counts_e=[_counts(h) for h in ref.hists_e],
        cand_counts_e=[_counts(h) for h in cand.hists_e],
    )
    write_report(out_dir, result, plot)


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
    binning: str = "quantile",
    max_showers: int | None = None,
    progress: bool = True,
    energy_bins: Sequence[float] | None = None,
    config: EvaluationConfig | None = None,
    report: bool = True,
    binning_xml: str | Path | None = None,
    amplification: str | Path | None = None,
    downstream: bool = False,
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
        binning: histogram binning (:data:`BINNINGS`): "quantile" (default), reference quantiles
            with under/overflow bins (:func:`metrics.make_binning`); "calochallenge", the fixed
            ranges of the CaloChallenge datasets 2-3 evaluation where it has one
            (:func:`metrics.calochallenge_binning`), out-of-range values dropped. In metrics.json.
        max_showers: read only the first ``max_showers`` showers of each file (biased if sorted by energy).
        progress: tqdm progress bars.
        energy_bins: energy-bin edges in MeV for the per-energy rows (default: one bin per
            distinct reference energy when there are at most 20, e.g. Belle II's 0.5, 1, 1.5,
            2, 2.5 GeV, else 8 log-spaced bins).
        config: the remaining knobs (:class:`EvaluationConfig`).
        report: write report.html and its plots (False: metrics.json only, for quick checks).
        binning_xml: a CaloChallenge binning XML; its geometry is imposed on both files.
        amplification: the candidate model's training file; adds ``amplification`` (module amplification).
        downstream: add ``downstream``, the energy-regression check of module downstream.

    Returns:
        The metrics dict written to metrics.json (NaN as null); keys: :data:`EvaluationResultSchema`.

    Raises:
        ValidationInputError: files that cannot be compared (different geometries or particles, empty, no
            overlapping energies, NaN energies, unreadable), naming both files; an unknown metric or binning.
    """
    t0, cfg = time.perf_counter(), config or EvaluationConfig()
    which, scheme = _requested_metrics(metrics), _binning_scheme(binning)
    ref_path, cand_path = Path(reference), Path(candidate)
    rf, cf = _open_pair(ref_path, cand_path, _imposed_geometry(binning_xml, ref_path, cand_path))
    try:
        plan = _plan(rf, cf, which, seed, max_showers, energy_bins, cfg, scheme)
        studies = _Studies(None if amplification is None else Path(amplification), downstream)
        return _evaluate_open_files(rf, cf, plan, Path(out), seed, floor, progress, cfg, t0, report, studies)
    finally:
        rf.close()
        cf.close()


@dataclass(frozen=True)
class _Studies:
    """The optional studies :func:`evaluate` runs: the amplification study (the candidate model's
    training file, or None) and the downstream reconstruction check."""

    amplification: Path | None = None
    downstream: bool = False


def _evaluate_open_files(rf: ShowerFile, cf: ShowerFile, plan: _Plan, out_dir: Path, seed: int, floor: bool,
                         progress: bool, cfg: EvaluationConfig, t0: float, report: bool,
                         studies: _Studies) -> dict[str, Any]:
    """Stream both files, score them, run the optional ``studies``, write metrics.json (and the
    report); returns metrics.json's dict."""
    half_rng = np.random.default_rng([seed, 1]) if floor else None
    sums_ref, sub_ref = _stream(rf, plan, plan.n_ref, plan.keep_ref, plan.keep_raw_ref, half_rng, cfg, progress,
                                "reference")
    sums_cand, sub_cand = _stream(cf, plan, plan.n_cand, plan.keep_cand, plan.keep_raw_cand, None, cfg, progress,
                                  "candidate")
    ref, cand = sums_ref["all"], sums_cand["all"]
    result = _inputs_header(rf, cf, plan, seed, ref.n, cand.n)
    result.update(_scores(plan, sums_ref, sub_ref, cand, sub_cand, cfg, seed, floor, progress))
    result.update(_studies(rf, cf, plan, studies, seed))
    if studies.downstream:
        result["downstream"] = _downstream(rf, cf, plan, sub_ref, sub_cand, seed)
    result.update(_settings(plan, cfg, t0))
    result = _write_metrics(out_dir, result)
    if report:
        _write_html_report(out_dir, result, plan, sums_ref, cand)
    return result


def _downstream(rf: ShowerFile, cf: ShowerFile, plan: _Plan, sub_ref: _Subsample, sub_cand: _Subsample,
                seed: int) -> dict[str, Any]:
    """The downstream reconstruction check: for calorimeters (module downstream) on the observables of both
    in-memory subsamples (the reference's rows are in random order, so its first half trains the regressor);
    for air-shower profiles (module downstream_profiles) on the files, which hold the zenith and primary."""
    from fastshower.validate.downstream import (
        DownstreamConfig,
        DownstreamInputError,
        downstream_study,
        particle_condition,
        particle_study_from_files,
    )

    if plan.geometry.profile is not None:
        from fastshower.validate.downstream_profiles import (
            ProfileDownstreamConfig,
            ProfileDownstreamInputError,
            profile_downstream_from_files,
        )

        try:
            return profile_downstream_from_files(rf.path, cf.path, plan.geometry, ProfileDownstreamConfig(), seed)
        except ProfileDownstreamInputError as exc:
            return {"error": str(exc)}
    names = observable_names(plan.geometry)
    # the subsample keeps log10(E_inc / MeV) as the low-level classifier's first feature
    sides = [(s.high, 10.0 ** s.low[:, 0].astype(np.float64), s.ebin) for s in (sub_ref, sub_cand)]
    out = downstream_study(sides[0], sides[1], names, list(plan.labels), DownstreamConfig(), seed)
    condition = particle_condition(rf.condition_names)
    if condition is not None:  # a file of several particles: their identification too (issue 20 item 5)
        try:
            out["particle_classifier"] = particle_study_from_files(rf.path, cf.path, plan.geometry, condition,
                                                                   DownstreamConfig(), seed)
        except DownstreamInputError as exc:
            out["particle_classifier"] = {"error": str(exc)}
    return out


def _studies(rf: ShowerFile, cf: ShowerFile, plan: _Plan, studies: _Studies, seed: int) -> dict[str, Any]:
    """The optional file-based study: amplification (its training file given), each file streamed again."""
    from fastshower.validate.amplification import AmplificationConfig, AmplificationInputError, amplification_from_files

    out: dict[str, Any] = {}
    if studies.amplification is not None:
        train = studies.amplification
        try:
            out["amplification"] = amplification_from_files(rf.path, train, cf.path, plan.geometry, plan.edges,
                                                             AmplificationConfig(), seed)
        except (ShowerFileError, AmplificationInputError) as exc:
            raise ValidationInputError(f"amplification: training file {train} vs reference {rf.path}: {exc}") from None
    return out


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
        a = sub_r.raw[sub_r.raw_ebin == j][: cfg.ssim_per_bin]
        b = sub_c.raw[sub_c.raw_ebin == j][: cfg.ssim_per_bin]
        row: dict[str, Any] = {"label": lab, "n_reference": len(a), "n_candidate": len(b)}
        ia, ib = _layer_images(a, geometry), _layer_images(b, geometry)
        for key, x, y, same in (("reference", ia, ia, True), ("candidate", ib, ib, True), ("cross", ia, ib, False)):
            m, err = M.ssim_diversity(x, y, cfg.ssim_pairs, seed, same=same) if len(x[0]) and len(y[0]) else (
                math.nan, math.nan)
            row[key], row[f"{key}_error"] = m, err
        rows.append(row)
    return rows


def _support(ref: np.ndarray, cand: np.ndarray, geometry: Geometry, cfg: EvaluationConfig, seed: int) -> dict[str, Any]:
    """Birthday-test support size of each sample (n, V) of voxels / E_inc; near-duplicates are closer
    than ``cfg.birthday_fraction`` x the reference's median pairwise distance."""
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
    "histogram_binning": "quantile or calochallenge (see evaluate's binning)",
    "classifier_low_input": "what the low-level classifier saw: every voxel, or k x k pooled cells per layer",
    "classifier.low / classifier.high / classifier.challenge": "auc, auc_error, jsd, jsd_error, best_epoch, "
    "n_train, n_test, n_validation, "
    "per_energy_auc (null below 20 validation showers of a class in the bin), per_energy_n_validation, input",
    "fpd / kpd": "value, error, scale (=1000: values are x1e3)",
    "ssim": "[per energy bin: reference, candidate, cross mean SSIM and errors]",
    "support_size": "threshold, reference/candidate: support, error, median_draws, n, censored",
    "multi_peak": "fraction of showers with >= 2 peaks, reference/candidate with errors",
    "projections": "(uniform cartesian layers) profiles {x, y, z}: reference, candidate (normalised mean-shower "
    "projections), separation_power, max_rel_dev (bins >= 1 % of the energy) [, floor_*]; moments {x_mean, x_rms, "
    "y_mean, y_rms, z_mean, z_rms}: separation_power, means, stds [, floor_separation_power]; max_profile_separation, "
    "max_moment_separation (module projections: the 3DGAN papers' checks)",
    "response": "per_energy linearity/resolution, fit {reference, candidate}: a, b (sigma/E = a/sqrt(E/GeV) (+) b), "
    "at_bound: parameters at the fit's lower bound 0",
    "per_energy": "[rows per energy bin: label, counts, separation powers, per-energy AUCs, SSIM]",
    "floor": "same scores (with errors) for the reference's random halves (floor=True)",
    "amplification": "(amplification=TRAIN_FILE) curves {train, generated}: n, mse, error; fit_train a (MSE = "
    "a (1/n + 1/n_reference)); fit_generated a, floor; amplification = equivalent_mc_showers / n_train for all "
    "generated showers, amplification_asymptotic for the generated floor; *_at_limit: only a lower limit",
    "downstream": "(downstream=True) energy regressor (E_inc / E_tot from shape observables) trained on half the "
    "reference subsample: per_energy and all: reference_* (held-out half) and candidate_* n, bias = mean(E_pred / "
    "E_inc) - 1, resolution = std(E_pred / E_inc), their errors; bias/resolution_difference (candidate - "
    "reference), _error, _significance; features, n_train. Air-shower profiles (module downstream_profiles): the "
    "energy table as above for E_pred = E_cal x factor (bias = median - 1, resolution = half the 16-84 % interval), "
    "xmax: the same for Xmax_rec - Xmax (g/cm^2), classifier: p-against-Fe AUC on the held-out reference and the "
    "candidate, their difference, error and significance. particle_classifier (files with a particle or primary "
    "condition): classes, per_class reference_/candidate_ efficiency (classified as itself) with errors, "
    "efficiency_difference, _error and _significance; with two classes reference_/candidate_auc and errors",
    "binning": "{observable: edges, log, drop_outside, scheme} the fixed binnings used",
}

