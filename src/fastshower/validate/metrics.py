"""Scores that compare a candidate shower sample with a reference sample.

Histogram scores (streamable: :class:`HistogramAccumulator` has update/compute/reset/merge, so
a file larger than memory gives exactly the one-shot counts):

- separation power S = 1/2 sum_i (p_i - q_i)^2 / (p_i + q_i) on unit-normalised histograms
  (CaloChallenge 2022, arXiv:2410.21611, eq. 4.1): 0 for identical, 1 for disjoint;
- W1, the 1-Wasserstein distance between the binned distributions (scipy);
- chi2/ndf of the two-sample (unweighted) chi2 test on the same bins.

Sample scores (on bounded random subsamples held in memory):

- binary-classifier AUC and JSD (CaloChallenge): an MLP separates candidate from reference,
  best epoch kept on the test split, isotonic calibration fitted on test, scored on validation;
- FPD and KPD as defined by JetNet (Kansal et al., arXiv:2211.10295);
- SSIM diversity (mean structural similarity between pairs of showers, Wang et al. 2004);
- birthday-paradox support size (Arora & Zhang, arXiv:1706.08224);
- multi-peak fraction; energy linearity and resolution with sigma/E = a/sqrt(E) (+) b.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import linalg, optimize, stats
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits  # a requirement of scikit-learn

__all__ = [
    "CALOCHALLENGE_MIN_ENERGY_MEV",
    "Binning",
    "ClassifierResult",
    "DistanceResult",
    "HistogramAccumulator",
    "HistogramScore",
    "MomentAccumulator",
    "ResolutionFit",
    "SupportSize",
    "auc_error",
    "binned_w1",
    "binomial_fraction",
    "birthday_support_size",
    "calochallenge_binning",
    "chi2_ndf",
    "classifier_score",
    "energy_bin_index",
    "fit_resolution",
    "fpd",
    "frechet_distance",
    "histogram_score",
    "kpd",
    "make_binning",
    "mmd2_unbiased",
    "separation_power",
    "ssim",
    "ssim_diversity",
]


# ============================================================================================
# binnings and streaming histograms
# ============================================================================================


@dataclass(frozen=True)
class Binning:
    """A fixed binning of one observable: ``edges`` (k + 1,) in the observable's unit.

    Values below the first edge and above the last go to an underflow and an overflow bin, so
    a histogram has k + 2 counts and no value is ever lost. With ``drop_outside`` the scores
    ignore those two bins and compare the in-range shapes, each renormalised to 1 (the
    CaloChallenge convention: ``plt.hist(density=True)`` over a fixed range); without it they
    count as bins like any other. ``log`` only records how the edges were spaced (for
    plotting); ``scheme`` names the rule that made the edges ("quantile": :func:`make_binning`,
    "calochallenge": :func:`calochallenge_binning`).
    """

    edges: tuple[float, ...]
    log: bool = False
    drop_outside: bool = False
    scheme: str = "quantile"

    @property
    def n_bins(self) -> int:
        return len(self.edges) - 1

    def index(self, values: np.ndarray) -> np.ndarray:
        """Bin index of each value, shape like ``values``: 0 underflow, 1..k bins, k + 1 overflow
        (NaN counts as overflow)."""
        v = np.asarray(values, dtype=np.float64)
        i = np.searchsorted(np.asarray(self.edges), v, side="right")
        # the last edge belongs to the last regular bin
        i = np.where(v == self.edges[-1], self.n_bins, i)
        return np.where(np.isnan(v), self.n_bins + 1, i)

    def centres(self) -> np.ndarray:
        """Representative value of each of the k + 2 bins (under/overflow at half a bin outside)."""
        e = np.asarray(self.edges)
        c = 0.5 * (e[1:] + e[:-1])
        w0, w1 = (e[1] - e[0]), (e[-1] - e[-2])
        return np.concatenate([[e[0] - 0.5 * w0], c, [e[-1] + 0.5 * w1]])

    def scored(self, counts: np.ndarray) -> np.ndarray:
        """The part of a histogram (counts (k + 2,)) the scores compare: the k regular bins when
        ``drop_outside``, else all k + 2."""
        c = np.asarray(counts)
        return c[1:-1] if self.drop_outside else c

    def to_dict(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "log": self.log, "drop_outside": self.drop_outside, "scheme": self.scheme}


def make_binning(reference_values: np.ndarray, n_bins: int = 50, integer: bool = False,
                 log: bool = False) -> Binning:
    """Binning derived from a sample of the reference, then fixed for the whole evaluation.

    Rules (documented so results are reproducible; the edges are written to metrics.json):

    - ``integer`` observables (counts): one bin per integer from min to max of the reference,
      merged into at most ``n_bins`` bins of equal integer width;
    - ``log`` (positive, wide-range quantities such as voxel energies): ``n_bins`` bins uniform
      in log10 between the reference's min and max positive value;
    - otherwise ``n_bins`` uniform bins between the reference's 0.05 % and 99.95 % quantiles
      (anything outside lands in the under/overflow bins);
    - a constant reference gets one bin of width 1e-6 x max(1, |x|) around its value.

    Args:
        reference_values: shape (m,), the observable over (a sample of) the reference.
    """
    v = np.asarray(reference_values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Binning((0.0, 1.0))
    if integer:
        lo, hi = math.floor(v.min()), math.ceil(v.max())
        step = max(1, math.ceil((hi - lo + 1) / n_bins))
        return Binning(tuple(float(x) for x in np.arange(lo - 0.5, hi + 0.5 + step, step)))
    if log:
        pos = v[v > 0]
        if pos.size == 0:
            return Binning((0.0, 1.0))
        lo, hi = float(pos.min()), float(pos.max())
        if hi <= lo:
            hi = lo * 1.001
        return Binning(tuple(float(x) for x in np.geomspace(lo, hi, n_bins + 1)), log=True)
    lo, hi = (float(q) for q in np.quantile(v, [0.0005, 0.9995]))
    if hi <= lo:
        pad = 1e-6 * max(1.0, abs(lo))
        return Binning((lo - pad, lo + pad))
    return Binning(tuple(float(x) for x in np.linspace(lo, hi, n_bins + 1)))


#: lowest layer and voxel energy of the CaloChallenge datasets 2 and 3 histograms, MeV: the 0.5 keV
#: silicon read-out threshold divided by the sampling fraction 0.033 (``args.min_energy`` of the
#: challenge's ``evaluate.py``)
CALOCHALLENGE_MIN_ENERGY_MEV = 0.5e-3 / 0.033

#: observable-name prefix -> (low, high, number of edges) of the fixed linear CaloChallenge ranges
_CALOCHALLENGE_LINEAR = {
    "x_centre_": (-30.0, 30.0, 101),
    "y_centre_": (-30.0, 30.0, 101),
    "x_width_": (0.0, 30.0, 101),
    "y_width_": (0.0, 30.0, 101),
    "sparsity_": (0.0, 1.0, 20),
}


def calochallenge_binning(name: str, reference_max: float | None = None) -> Binning | None:
    """The fixed binning the CaloChallenge 2022 evaluation gives observable ``name`` (datasets 2
    and 3), or None where it has none (the caller then keeps :func:`make_binning`).

    Source: ``code/evaluate.py`` (commit ff49275) and ``code/evaluate_plotting_helper.py``
    (commit 5e12c02) of github.com/CaloChallenge/homepage, with ``x_scale = 'log'`` and
    ``min_energy = 0.5e-3 / 0.033`` MeV as that script sets them for datasets 2 and 3:

    - ``E_tot/E_inc``: 100 uniform bins in [0.5, 1.5] (``plot_Etot_Einc``);
    - ``E_layer_i``: 39 log bins (40 edges) from ``min_energy`` to the reference's largest energy
      in that layer, MeV (``plot_E_layers``);
    - ``x_centre_i`` / ``y_centre_i`` (the challenge's centres of energy in eta / phi, x = r cos
      alpha, y = r sin alpha): 100 uniform bins in [-30, 30] mm (``plot_ECEtas``, ``plot_ECPhis``);
    - ``x_width_i`` / ``y_width_i``: 100 uniform bins in [0, 30] mm (``plot_ECWidthEtas/Phis``);
    - ``voxel_energy``: 49 log bins (50 edges) from ``min_energy`` to the reference's largest
      voxel, MeV (``plot_cell_dist``);
    - ``sparsity_i``: 19 uniform bins in [0, 1]. The homepage script has no sparsity histogram;
      this is the binning of ``plot_sparsity`` in the evaluation helper the challenge paper's
      plots were made with (e.g. heidelberg-hepml/CaloINN ``src/evaluate_plotting_helper.py``),
      which bins 1 - sparsity: the edges k/19 are symmetric, so it is the same binning.

    Everything outside the range is dropped and the rest renormalised (``drop_outside``), as
    ``plt.hist(density=True)`` does there. Args: ``reference_max``: the reference's largest value
    of the observable (needed for ``E_layer_i`` and ``voxel_energy``), MeV.
    """
    if name == "E_tot/E_inc":
        edges = np.linspace(0.5, 1.5, 101)
    elif name.startswith("E_layer_") or name == "voxel_energy":
        if reference_max is None:
            raise ValueError(f"the CaloChallenge binning of {name} needs the reference's largest value")
        lo = CALOCHALLENGE_MIN_ENERGY_MEV
        # a reference that never exceeds the read-out threshold leaves one empty bin above it
        hi = max(float(reference_max), lo * 1.001)
        n = 40 if name.startswith("E_layer_") else 50
        return Binning(tuple(float(x) for x in np.geomspace(lo, hi, n)), log=True, drop_outside=True,
                       scheme="calochallenge")
    else:
        prefix = next((p for p in _CALOCHALLENGE_LINEAR if name.startswith(p) and name[len(p):].isdigit()), None)
        if prefix is None:
            return None
        lo, hi, n = _CALOCHALLENGE_LINEAR[prefix]
        edges = np.linspace(lo, hi, n)
    return Binning(tuple(float(x) for x in edges), drop_outside=True, scheme="calochallenge")


class HistogramAccumulator:
    """Streaming histogram with a fixed :class:`Binning` (torchmetrics-style protocol).

    ``update`` adds values, ``compute`` returns the integer counts (k + 2,) including under- and
    overflow, ``reset`` empties it, ``merge`` adds another accumulator's counts (same binning).
    Counts are int64, so any chunking gives exactly the one-shot result.
    """

    def __init__(self, binning: Binning) -> None:
        self.binning = binning
        self.counts = np.zeros(binning.n_bins + 2, dtype=np.int64)

    def update(self, values: np.ndarray | torch.Tensor) -> None:
        v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        self.counts += np.bincount(self.binning.index(v.reshape(-1)), minlength=self.binning.n_bins + 2)

    def compute(self) -> np.ndarray:
        return self.counts.copy()

    def reset(self) -> None:
        self.counts[:] = 0

    def merge(self, other: HistogramAccumulator) -> HistogramAccumulator:
        if other.binning != self.binning:
            raise ValueError("cannot merge histograms with different binnings")
        self.counts += other.counts
        return self

    @property
    def total(self) -> int:
        return int(self.counts.sum())


class MomentAccumulator:
    """Streaming count, sum and sum of squares of a quantity per group (e.g. per energy bin).

    ``update(values, groups)`` with values (n,) and integer group labels (n,) in [0, n_groups);
    ``compute()`` returns dict(n, mean, std) each of shape (n_groups,) (NaN where empty).
    """

    def __init__(self, n_groups: int) -> None:
        self.n_groups = n_groups
        self.reset()

    def reset(self) -> None:
        self.n = np.zeros(self.n_groups, dtype=np.int64)
        self.s1 = np.zeros(self.n_groups)
        self.s2 = np.zeros(self.n_groups)

    def update(self, values: np.ndarray, groups: np.ndarray) -> None:
        g = np.asarray(groups, dtype=np.int64)
        ok = (g >= 0) & (g < self.n_groups)
        v = np.asarray(values, dtype=np.float64)[ok]
        g = g[ok]
        self.n += np.bincount(g, minlength=self.n_groups)
        self.s1 += np.bincount(g, weights=v, minlength=self.n_groups)
        self.s2 += np.bincount(g, weights=v * v, minlength=self.n_groups)

    def merge(self, other: MomentAccumulator) -> MomentAccumulator:
        self.n += other.n
        self.s1 += other.s1
        self.s2 += other.s2
        return self

    def compute(self) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.s1 / self.n
            var = (self.s2 - self.n * mean**2) / (self.n - 1)
        return {"n": self.n.copy(), "mean": mean, "std": np.sqrt(np.clip(var, 0, None))}


# ============================================================================================
# histogram scores
# ============================================================================================


def separation_power(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """S = 1/2 sum_i (p_i - q_i)^2 / (p_i + q_i) of two histograms (counts (k,)), each unit-normalised.

    0 for identical shapes, 1 for disjoint ones (arXiv:2410.21611, eq. 4.1); bins empty in both
    are skipped.
    """
    p = np.asarray(p_counts, dtype=np.float64)
    q = np.asarray(q_counts, dtype=np.float64)
    p, q = p / max(p.sum(), 1e-300), q / max(q.sum(), 1e-300)
    m = (p + q) > 0
    return float(0.5 * np.sum((p[m] - q[m]) ** 2 / (p[m] + q[m])))


def binned_w1(p_counts: np.ndarray, q_counts: np.ndarray, centres: np.ndarray) -> float:
    """1-Wasserstein distance between two binned distributions (counts (k,) at ``centres`` (k,)),
    in the observable's unit (scipy.stats.wasserstein_distance with bin-centre values)."""
    p = np.asarray(p_counts, dtype=np.float64)
    q = np.asarray(q_counts, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return math.nan
    return float(stats.wasserstein_distance(centres, centres, u_weights=p, v_weights=q))


def chi2_ndf(p_counts: np.ndarray, q_counts: np.ndarray) -> tuple[float, int]:
    """Two-sample chi2 for unweighted histograms (counts (k,)) and its ndf.

    chi2 = sum_i (sqrt(Q/P) p_i - sqrt(P/Q) q_i)^2 / (p_i + q_i) with P, Q the totals; ndf is
    the number of bins non-empty in either sample minus one (Gagunashvili, arXiv:physics/0605123).
    """
    p = np.asarray(p_counts, dtype=np.float64)
    q = np.asarray(q_counts, dtype=np.float64)
    big_p, big_q = p.sum(), q.sum()
    m = (p + q) > 0
    if big_p <= 0 or big_q <= 0 or m.sum() < 2:
        return math.nan, 0
    chi2 = np.sum((math.sqrt(big_q / big_p) * p[m] - math.sqrt(big_p / big_q) * q[m]) ** 2 / (p[m] + q[m]))
    return float(chi2), int(m.sum() - 1)


@dataclass
class HistogramScore:
    """Histogram scores of one observable. Errors: std over multinomial resamplings of both histograms."""

    separation_power: float
    separation_power_error: float
    w1: float
    w1_error: float
    chi2: float
    ndf: int

    @property
    def chi2_ndf(self) -> float:
        return self.chi2 / self.ndf if self.ndf > 0 else math.nan


def histogram_score(p_counts: np.ndarray, q_counts: np.ndarray, binning: Binning, n_boot: int = 50,
                    seed: int = 0) -> HistogramScore:
    """S, W1 and chi2 of two histograms (counts (k + 2,) with under/overflow) on ``binning``.

    A binning that drops what falls outside (``binning.drop_outside``) scores the k regular bins
    only, each histogram renormalised to its in-range total. Uncertainties are the standard
    deviation over ``n_boot`` bootstrap replicas, each drawing both histograms anew from
    multinomials with the observed bin probabilities (equivalent to resampling the binned
    showers with replacement).
    """
    centres = binning.scored(binning.centres())
    p, q = np.asarray(binning.scored(p_counts), np.int64), np.asarray(binning.scored(q_counts), np.int64)
    s = separation_power(p, q)
    w = binned_w1(p, q, centres)
    chi2, ndf = chi2_ndf(p, q)
    s_err = w_err = math.nan
    if n_boot > 1 and p.sum() > 0 and q.sum() > 0:
        rng = np.random.default_rng(seed)
        pb = rng.multinomial(p.sum(), p / p.sum(), size=n_boot)
        qb = rng.multinomial(q.sum(), q / q.sum(), size=n_boot)
        s_err = float(np.std([separation_power(a, b) for a, b in zip(pb, qb, strict=True)], ddof=1))
        w_err = float(np.std([binned_w1(a, b, centres) for a, b in zip(pb, qb, strict=True)], ddof=1))
    return HistogramScore(s, s_err, w, w_err, chi2, ndf)


# ============================================================================================
# classifier test
# ============================================================================================


@dataclass
class ClassifierResult:
    """Classifier two-sample test (CaloChallenge, arXiv:2410.21611 sect. 4.2).

    Attributes:
        auc: ROC AUC of the calibrated classifier on the validation split (0.5 = indistinguishable).
        auc_error: Hanley-McNeil standard error of the AUC.
        jsd: Jensen-Shannon divergence estimate in bits, 1 + 1/2 (<log2 p>_cand + <log2 (1-p)>_ref)
            with p the calibrated probability of "candidate"; 0 = identical, 1 = disjoint.
        jsd_error: standard error of that mean.
        best_epoch: epoch with the lowest test loss (1-based).
        n_train, n_test, n_validation: showers per split (both classes together).
        validation_proba: calibrated p(candidate) of the validation showers, shape (n_validation,).
        validation_label: 1 for candidate, shape (n_validation,).
        validation_index: row of each validation shower in the stacked input (reference rows
            first), shape (n_validation,).
    """

    auc: float
    auc_error: float
    jsd: float
    jsd_error: float
    best_epoch: int
    n_train: int
    n_test: int
    n_validation: int
    validation_proba: np.ndarray = field(repr=False)
    validation_label: np.ndarray = field(repr=False)
    validation_index: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("validation_proba", "validation_label", "validation_index"):
            d.pop(k)
        return d


def auc_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of the AUC."""
    if n_pos == 0 or n_neg == 0:
        return math.nan
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return float(math.sqrt(max(var, 0.0)))


def mlp_classifier(d: int, hidden: int) -> torch.nn.Sequential:
    """The CaloChallenge classifier's net: d features -> 2 hidden layers of ``hidden`` LeakyReLU(0.2) units -> a
    logit (B, 1)."""
    return torch.nn.Sequential(
        torch.nn.Linear(d, hidden), torch.nn.LeakyReLU(0.2),
        torch.nn.Linear(hidden, hidden), torch.nn.LeakyReLU(0.2),
        torch.nn.Linear(hidden, 1),
    )


def classifier_score(
    reference: np.ndarray,
    candidate: np.ndarray,
    seed: int = 0,
    hidden: int = 128,
    max_epochs: int = 50,
    patience: int = 5,
    batch_size: int = 1024,
    lr: float = 2e-3,
    num_threads: int | None = 1,
) -> ClassifierResult:
    """Train an MLP to tell candidate (label 1) from reference (label 0) and score it.

    Procedure (CaloChallenge): the stacked sample is split by a seeded permutation into train /
    test / validation = 60 / 20 / 20 %; features are standardised with train statistics; an MLP
    (2 hidden layers of ``hidden`` LeakyReLU units, Adam, BCE) trains for at most ``max_epochs``
    epochs, stopping after ``patience`` epochs without improvement of the test loss; the weights
    of the best test epoch are kept; an isotonic regression fitted on the test outputs
    calibrates the probabilities; AUC and JSD are computed on the validation split. The caller
    balances the classes (equal numbers of rows), as the JSD formula assumes.

    Args:
        reference: features, shape (n_ref, d). candidate: shape (n_cand, d).
        seed: seeds the split, the initialisation and the batch order.
        num_threads: torch intra-op threads while training (restored afterwards); a small MLP
            trains fastest on one thread, None keeps torch's setting.
    """
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _classifier_score(reference, candidate, seed, hidden, max_epochs, patience, batch_size, lr)
    finally:
        torch.set_num_threads(old_threads)


def fit_early_stopped(net: torch.nn.Module, xs: torch.Tensor, y: torch.Tensor, epoch_rows: Callable[[], torch.Tensor],
                      stop_rows: torch.Tensor, opt: torch.optim.Optimizer, batch_size: int, max_epochs: int,
                      patience: int) -> tuple[float, int]:
    """Train a logit net on features xs (n, d) and labels y (n,) by binary cross-entropy with ``opt``: each epoch
    over the rows ``epoch_rows()`` returns (in that order, ``batch_size`` at a time), stopping after ``patience``
    epochs whose loss on ``stop_rows`` is not 1e-5 below the best; the best epoch's weights are loaded and the net
    left in eval mode. Returns (best held-out loss, best epoch). The one loop of the classifier metrics and the
    refiner (:mod:`fastshower.refinement`)."""
    lossf = torch.nn.BCEWithLogitsLoss()
    best, best_state, best_epoch, bad = math.inf, copy.deepcopy(net.state_dict()), 0, 0
    for epoch in range(1, max_epochs + 1):
        net.train()
        order = epoch_rows()
        for a in range(0, len(order), batch_size):
            b = order[a:a + batch_size]
            opt.zero_grad()
            loss = lossf(net(xs[b])[:, 0], y[b])
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            stop_loss = float(lossf(net(xs[stop_rows])[:, 0], y[stop_rows]))
        if stop_loss < best - 1e-5:
            best, best_state, best_epoch, bad = stop_loss, copy.deepcopy(net.state_dict()), epoch, 0
        else:
            bad += 1
            if bad >= patience:
                break
    net.load_state_dict(best_state)
    net.eval()
    return best, best_epoch


def _standardise(x: np.ndarray, rows: np.ndarray, block: int = 2048) -> np.ndarray:
    """``x`` (n, d) float32 shifted and scaled in place to zero mean and unit variance over ``rows``
    (constant features keep scale 1).

    In place, with the two passes (mean, then squared deviations, float64 sums) taken ``block``
    rows at a time: at 20 000 showers per file and 7 000 features, ``x[rows].std()`` alone held
    three more copies of the training rows (2 GB).
    """
    mu = np.zeros(x.shape[1])
    for a in range(0, len(rows), block):
        mu += x[rows[a:a + block]].sum(axis=0, dtype=np.float64)
    mu /= max(len(rows), 1)
    var = np.zeros(x.shape[1])
    for a in range(0, len(rows), block):
        var += np.square(x[rows[a:a + block]] - mu).sum(axis=0)
    sd = np.sqrt(var / max(len(rows), 1))
    sd[sd <= 0] = 1.0
    for a in range(0, len(x), block):
        x[a:a + block] -= mu
        x[a:a + block] /= sd
    return x


def _classifier_score(reference: np.ndarray, candidate: np.ndarray, seed: int, hidden: int, max_epochs: int,
                      patience: int, batch_size: int, lr: float) -> ClassifierResult:
    x = np.concatenate([reference, candidate]).astype(np.float32, copy=False)
    y = np.concatenate([np.zeros(len(reference)), np.ones(len(candidate))]).astype(np.float32)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    n_tr, n_te = int(0.6 * len(x)), int(0.2 * len(x))
    i_tr, i_te, i_va = perm[:n_tr], perm[n_tr:n_tr + n_te], perm[n_tr + n_te:]
    xs = torch.from_numpy(_standardise(x, i_tr))
    yt = torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = mlp_classifier(x.shape[1], hidden)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    tr = torch.from_numpy(i_tr)
    _, best_epoch = fit_early_stopped(net, xs, yt, lambda: tr[torch.randperm(len(tr), generator=gen)],
                                      torch.from_numpy(i_te), opt, batch_size, max_epochs, patience)
    with torch.no_grad():
        p_te = torch.sigmoid(net(xs[i_te])[:, 0]).numpy().astype(np.float64)
        p_va = torch.sigmoid(net(xs[i_va])[:, 0]).numpy().astype(np.float64)
    eps = 1e-6
    iso = IsotonicRegression(y_min=eps, y_max=1 - eps, out_of_bounds="clip").fit(p_te, y[i_te])
    pc = np.clip(iso.predict(p_va), eps, 1 - eps)
    yv = y[i_va]
    n_pos, n_neg = int(yv.sum()), int(len(yv) - yv.sum())
    auc = float(roc_auc_score(yv, pc)) if n_pos and n_neg else math.nan
    a, b = np.log2(pc[yv == 1]), np.log2(1 - pc[yv == 0])
    jsd = float(1 + 0.5 * (a.mean() + b.mean())) if n_pos and n_neg else math.nan
    jsd_err = float(0.5 * math.sqrt(a.var(ddof=1) / max(n_pos, 1) + b.var(ddof=1) / max(n_neg, 1))) \
        if n_pos > 1 and n_neg > 1 else math.nan
    return ClassifierResult(
        auc=auc, auc_error=auc_error(auc, n_pos, n_neg), jsd=jsd, jsd_error=jsd_err, best_epoch=best_epoch,
        n_train=len(i_tr), n_test=len(i_te), n_validation=len(i_va),
        validation_proba=pc, validation_label=yv.astype(np.int8), validation_index=i_va,
    )


# ============================================================================================
# FPD and KPD (JetNet)
# ============================================================================================


@dataclass
class DistanceResult:
    """A distance with its uncertainty, both already multiplied by ``scale`` (1e3 for FPD/KPD)."""

    value: float
    error: float
    scale: float = 1e3

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _normalise(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Divide every feature of both samples by the reference's max |x| (JetNet); 1 where that is 0."""
    m = np.max(np.abs(x), axis=0)
    m = np.where(m > 0, m, 1.0)
    return x / m, y / m


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Args: means (d,) and covariances (d, d). Tr (S1 S2)^(1/2) is computed as the sum of square
    roots of the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric, so stable and fast).
    """
    w, v = linalg.eigh(np.atleast_2d(sigma1))
    s1h = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1h @ np.atleast_2d(sigma2) @ s1h
    tr_sqrt = float(np.sum(np.sqrt(np.clip(linalg.eigvalsh(0.5 * (m + m.T)), 0, None))))
    d = np.asarray(mu1) - np.asarray(mu2)
    return float(d @ d + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def fpd(reference: np.ndarray, candidate: np.ndarray, min_samples: int = 20_000, max_samples: int = 50_000,
        num_batches: int = 20, num_points: int = 10, normalise: bool = True, seed: int = 42,
        scale: float = 1e3, num_threads: int | None = 1) -> DistanceResult:
    """Fréchet physics distance (JetNet ``fpd``, arXiv:2211.10295).

    Features (n, d) are divided by the reference's max |x|; for ``num_points`` sample sizes N
    evenly spaced in [min_samples, max_samples] (capped by the smaller sample), the Fréchet
    distance of ``num_batches`` pairs of random subsamples (drawn with replacement) is averaged;
    a straight line in 1/N is fitted (non-negative intercept and slope) and the intercept, the
    N -> infinity value, is returned with the fit's standard error, both x ``scale``.

    ``num_threads``: BLAS threads meanwhile (restored afterwards; None keeps the setting). The
    covariances of a few hundred observables gain nothing from threads, and on a busy machine
    (a simulation on the other cores) OpenBLAS's spinning threads made each distance 12x slower.
    """
    with threadpool_limits(limits=num_threads, user_api="blas"):
        return _fpd(reference, candidate, min_samples, max_samples, num_batches, num_points, normalise, seed,
                    scale)


def _fpd(reference: np.ndarray, candidate: np.ndarray, min_samples: int, max_samples: int, num_batches: int,
         num_points: int, normalise: bool, seed: int, scale: float) -> DistanceResult:
    x, y = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if normalise:
        x, y = _normalise(x, y)
    n_max = min(max_samples, len(x), len(y))
    n_min = min(min_samples, n_max // 2)
    sizes = np.unique(np.linspace(max(n_min, 2), n_max, num_points).astype(int))
    rng = np.random.default_rng(seed)
    vals = []
    for n in sizes:
        fds = []
        for _ in range(num_batches):
            a = x[rng.choice(len(x), size=n)]
            b = y[rng.choice(len(y), size=n)]
            fds.append(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))
        vals.append(np.mean(fds))
    if len(sizes) < 2:
        return DistanceResult(float(vals[0]) * scale, math.nan, scale)
    params, cov = optimize.curve_fit(lambda t, c, m: c + m * t, 1 / sizes, np.asarray(vals),
                                     bounds=([0, 0], [np.inf, np.inf]))
    return DistanceResult(float(params[0]) * scale, float(np.sqrt(cov[0, 0])) * scale, scale)


def mmd2_unbiased(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, degree: int = 3) -> float:
    """Unbiased MMD^2 of samples x (m, d) and y (n, d) with the kernel k(a, b) = (a.b / d + 1)^degree."""
    xt = torch.as_tensor(np.asarray(x, np.float64)) if not isinstance(x, torch.Tensor) else x.double()
    yt = torch.as_tensor(np.asarray(y, np.float64)) if not isinstance(y, torch.Tensor) else y.double()
    d = xt.shape[1]
    m, n = xt.shape[0], yt.shape[0]
    kxx = (xt @ xt.T / d + 1) ** degree
    kyy = (yt @ yt.T / d + 1) ** degree
    kxy = (xt @ yt.T / d + 1) ** degree
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kpd(reference: np.ndarray, candidate: np.ndarray, num_batches: int = 10, batch_size: int = 5000,
        normalise: bool = True, seed: int = 42, degree: int = 3, scale: float = 1e3) -> DistanceResult:
    """Kernel physics distance (JetNet ``kpd``, arXiv:2211.10295).

    Features normalised as in :func:`fpd`; ``num_batches`` pairs of random subsamples of
    ``batch_size`` rows (with replacement, capped by the smaller sample) give unbiased MMD^2
    values with the polynomial kernel (x.y/d + 1)^3; the value is their median and the error
    half the 16.5-83.5 % inter-quantile range (a 1-sigma equivalent), both x ``scale``.
    """
    x, y = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if normalise:
        x, y = _normalise(x, y)
    n = min(batch_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    vals = np.array([mmd2_unbiased(x[rng.choice(len(x), size=n)], y[rng.choice(len(y), size=n)], degree)
                     for _ in range(num_batches)])
    err = float(stats.iqr(vals, rng=(16.5, 83.5)) / 2)
    return DistanceResult(float(np.median(vals)) * scale, err * scale, scale)


# ============================================================================================
# diversity and support size
# ============================================================================================


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, window: int = 7) -> np.ndarray:
    """Structural similarity (Wang et al., IEEE TIP 13 (2004) 600) of image pairs.

    Args:
        a, b: images, shape (p, h, w) (any non-negative unit, e.g. MeV).
        window: side of the uniform window; reduced to the largest odd size that fits.

    Returns:
        shape (p,), the mean SSIM over all window positions, with C1 = (0.01 L)^2 and
        C2 = (0.03 L)^2 where L is the larger maximum of the two images of the pair. Two empty
        images give 1.
    """
    x = torch.as_tensor(np.asarray(a, np.float64)) if not isinstance(a, torch.Tensor) else a.double()
    y = torch.as_tensor(np.asarray(b, np.float64)) if not isinstance(b, torch.Tensor) else b.double()
    k = min(window, x.shape[1], x.shape[2])
    k = k if k % 2 == 1 else k - 1
    big_l = torch.maximum(x.flatten(1).max(1).values, y.flatten(1).max(1).values)
    big_l = torch.where(big_l > 0, big_l, torch.ones_like(big_l)).reshape(-1, 1, 1, 1)
    c1, c2 = (0.01 * big_l) ** 2, (0.03 * big_l) ** 2
    x, y = x.unsqueeze(1), y.unsqueeze(1)

    def pool(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(t, k, stride=1)

    mx, my = pool(x), pool(y)
    vx = pool(x * x) - mx * mx
    vy = pool(y * y) - my * my
    cxy = pool(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).numpy()


def ssim_diversity(images_a: Sequence[np.ndarray], images_b: Sequence[np.ndarray], n_pairs: int = 500,
                   seed: int = 0, same: bool = False) -> tuple[float, float]:
    """Mean SSIM between random pairs of showers, one from sample a and one from sample b.

    Args:
        images_a, images_b: per layer, an array (n, h, w) of layer images (MeV) of the showers of
            one energy bin; both lists have the same layers.
        same: a and b are the same sample: pairs of two different showers are drawn.

    Returns:
        (mean, standard error) over the pairs; each pair's SSIM is the average of its layers'
        SSIM weighted by the pair's energy in the layer. Low values = diverse showers; a
        candidate whose within-sample SSIM is higher than the reference's lacks diversity.
    """
    na, nb = len(images_a[0]), len(images_b[0])
    if na < 1 or nb < 1 or (same and na < 2):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, na, n_pairs)
    ib = rng.integers(0, nb, n_pairs)
    if same:
        ib = (ia + rng.integers(1, na, n_pairs)) % na
    num = np.zeros(n_pairs)
    den = np.zeros(n_pairs)
    for la, lb in zip(images_a, images_b, strict=True):
        xa, xb = la[ia], lb[ib]
        wgt = xa.reshape(n_pairs, -1).sum(1) + xb.reshape(n_pairs, -1).sum(1)
        num += wgt * ssim(xa, xb)
        den += wgt
    v = num[den > 0] / den[den > 0]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan


@dataclass
class SupportSize:
    """Birthday-paradox support-size estimate.

    Attributes:
        support: estimated number of distinct showers the sampler produces (mean(T^2)/2), or
            the lower bound ``n^2 / 2`` when no near-duplicate exists in the sample (``censored``).
        error: standard error over the orderings (they share one sample, so a lower bound).
        median_draws: median number of draws until the first near-duplicate pair.
        n: sample size; threshold: the distance that counts as a near-duplicate;
        censored: fraction of orderings that reached n draws without a duplicate.
    """

    support: float
    error: float
    median_draws: float
    n: int
    threshold: float
    censored: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def pairwise_distance_median(x: np.ndarray, n_max: int = 1000, seed: int = 0) -> float:
    """Median Euclidean distance between the rows of x (n, d), from at most ``n_max`` rows."""
    rng = np.random.default_rng(seed)
    xs = torch.as_tensor(x[rng.permutation(len(x))[:n_max]], dtype=torch.float64)
    d = torch.cdist(xs, xs)
    iu = torch.triu_indices(len(xs), len(xs), 1)
    return float(d[iu[0], iu[1]].median())


def birthday_support_size(x: np.ndarray, threshold: float, n_orderings: int = 200, seed: int = 0,
                          max_pairs: int = 2_000_000) -> SupportSize:
    """Support size of a sampler from the birthday paradox (Arora & Zhang, arXiv:1706.08224).

    Drawing from a distribution with N equally likely distinct outcomes, the number T of draws
    until the first repeat follows P(T > k) ~ exp(-k^2 / 2N), so E[T^2] = 2N. Here x (n, d) is a
    sample of showers (features such as voxels / E_inc); two showers closer than ``threshold``
    (Euclidean, same unit as x) count as a repeat. For ``n_orderings`` random orderings of the
    sample, T is the position of the first shower with a near-duplicate among those before
    it; N is estimated as mean(T^2) / 2. If some ordering finds no repeat, T = n + 1 is used
    for it and the estimate is a lower bound (reported by ``censored``).
    """
    n = len(x)
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    pairs_a, pairs_b = [], []
    for a in range(0, n, 1024):
        d = torch.cdist(xt[a:a + 1024], xt)
        ii, jj = torch.nonzero(d < threshold, as_tuple=True)
        keep = (ii + a) < jj
        pairs_a.append((ii[keep] + a).numpy())
        pairs_b.append(jj[keep].numpy())
    pa, pb = np.concatenate(pairs_a), np.concatenate(pairs_b)
    rng = np.random.default_rng(seed)
    if len(pa) > max_pairs:
        sel = rng.choice(len(pa), max_pairs, replace=False)
        pa, pb = pa[sel], pb[sel]
    t = np.full(n_orderings, n + 1, dtype=np.float64)
    if len(pa):
        for r in range(n_orderings):
            pos = rng.permutation(n)
            t[r] = np.max(np.stack([pos[pa], pos[pb]]), axis=0).min() + 1
    cens = float(np.mean(t > n))
    t2 = t**2 / 2
    return SupportSize(support=float(t2.mean()), error=float(t2.std(ddof=1) / math.sqrt(n_orderings)),
                       median_draws=float(np.median(t)), n=n, threshold=float(threshold), censored=cens)


# ============================================================================================
# fractions and energy response
# ============================================================================================


def energy_bin_index(energies: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Energy-bin index (n,) of ``energies`` (n,) for bins ``edges`` (k + 1,) in the same unit: the last edge
    belongs to the last bin, energies outside the edges get -1."""
    ne = len(edges) - 1
    eb = np.searchsorted(edges, energies, side="right") - 1
    eb = np.where(energies == edges[-1], ne - 1, eb)
    return np.where((eb < 0) | (eb >= ne), -1, eb)


def binomial_fraction(k: int, n: int) -> tuple[float, float]:
    """Fraction k/n and its binomial standard error (NaN when n = 0)."""
    if n <= 0:
        return math.nan, math.nan
    f = k / n
    return f, math.sqrt(f * (1 - f) / n)


@dataclass
class ResolutionFit:
    """sigma/E = a / sqrt(E / GeV) (+) b (quadrature sum); a and b dimensionless (fractions).

    Attributes: a, a_error, b, b_error; ndf; chi2 of the weighted fit; at_bound: the parameters
    ("a", "b") that ended at the fit's lower bound 0 (or were fixed there: one energy only), whose
    value and error are then the bound's, not a measurement.
    """

    a: float
    a_error: float
    b: float
    b_error: float
    chi2: float
    ndf: int
    at_bound: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"at_bound": list(self.at_bound)}


def fit_resolution(energy_gev: np.ndarray, resolution: np.ndarray, resolution_error: np.ndarray) -> ResolutionFit:
    """Weighted least-squares fit of sigma/E = sqrt(a^2 / E + b^2).

    Args:
        energy_gev: bin energies, shape (k,), GeV. resolution: sigma/E per bin, shape (k,).
        resolution_error: its uncertainty, shape (k,) (e.g. sigma/E / sqrt(2 (n - 1))).
    """
    e, r, dr = (np.asarray(v, np.float64) for v in (energy_gev, resolution, resolution_error))
    ok = np.isfinite(e) & np.isfinite(r) & np.isfinite(dr) & (dr > 0) & (e > 0)
    e, r, dr = e[ok], r[ok], dr[ok]
    if len(e) == 0:
        return ResolutionFit(math.nan, math.nan, math.nan, math.nan, math.nan, 0)

    def model(en: np.ndarray, a: float, b: float) -> np.ndarray:
        return np.sqrt(a * a / en + b * b)

    if len(e) == 1:  # one energy: attribute everything to the stochastic term
        a = float(r[0] * math.sqrt(e[0]))
        return ResolutionFit(a, float(dr[0] * math.sqrt(e[0])), 0.0, math.nan, 0.0, 0, ("b",))
    p0 = [float(np.median(r * np.sqrt(e))), float(np.min(r)) * 0.1]
    try:
        params, cov = optimize.curve_fit(model, e, r, p0=p0, sigma=dr, absolute_sigma=True,
                                         bounds=([0, 0], [np.inf, np.inf]))
    except (RuntimeError, ValueError):
        return ResolutionFit(math.nan, math.nan, math.nan, math.nan, math.nan, len(e) - 2)
    chi2 = float(np.sum(((model(e, *params) - r) / dr) ** 2))
    err = np.sqrt(np.clip(np.diag(cov), 0, None))
    # a term pushed onto the bound 0 comes back as 1e-14 or 1e-7, not exactly 0, with a huge error: call it
    # at the bound when it adds under a millionth of the smallest resolution, or is under 1e-3 of its error
    tiny = 1e-6 * float(np.min(r))
    bound = tuple(n for n, v, scale, dv in (("a", params[0], math.sqrt(float(np.max(e))), err[0]),
                                            ("b", params[1], 1.0, err[1])) if v / scale < tiny or v < 1e-3 * dv)
    return ResolutionFit(float(params[0]), float(err[0]), float(params[1]), float(err[1]), chi2, len(e) - 2, bound)
