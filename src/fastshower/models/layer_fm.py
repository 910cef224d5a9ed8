"""Two-stage model for high-granularity calorimeters: layer energies by a flow, shapes by flow matching.

``layer-fm`` keeps the decomposition of :mod:`fastshower.models.flow` (CaloFlow, arXiv:2106.05285):

- **stage 1**: ``p(layer energies | conditions)``, the same small autoregressive spline flow on the L
  stage-1 variables (log total, then the logit of each layer's share of what remains), so the energy
  response and resolution are learned by exact likelihood;
- **stage 2**: ``p(voxel shares | layer energies, conditions)`` on the same standardised logit voxel
  shares g2 (B, V), but learned by conditional flow matching (rectified flow, arXiv:2209.03003) with
  a transformer over one token per readout layer (:class:`~fastshower.models.nets.LayerTransformer`,
  adaLN-zero blocks as in DiT, arXiv:2212.09748) instead of a spline flow over all V voxels. This is
  the CaloDREAM recipe (arXiv:2405.09629: energies first, then a transformer with flow matching for
  the shapes) cut to what a CPU trains: one token per layer rather than 3-D patches.

Why it scales: flow 2 of ``flow`` couples all V voxels in every transform (parameters and cost grow
like V x hidden, and its conditioner like V^2 for autoregressive passes); here the shared per-layer
maps make the parameters O(V/L x dim) and the cost per shower O(V x dim + L x depth x dim^2), linear
in V at a fixed number of layers (par04-ds2: 6480 cells; par04-ds3: 40500; siw-51x51x25: 65025).

Sampling: stage 1 inverts z[:, :L]; the ODE dg/dt = v(g, t | c, g1, layer energies) is integrated
from g = z[:, L:] at t = 0 to t = 1 with the config's fixed-step solver; the voxel shares are
renormalised to the sampled layer energies (so the layer energies are exactly stage 1's) and every
voxel below ``noise`` x E_inc is zero. Everything is a fixed unrolled graph of the noise, so the
model exports to ONNX, and ``fastshower distill`` makes a staged one-step student of it as of a
``flow`` teacher (stage 1 kept, the ODE's noise-to-g2 map regressed).

The dequantisation noise defaults to 1e-9 x E_inc (``flow``: 1e-6): on the CaloChallenge scale the
15.15 keV voxel threshold is 1.5e-7 x E_inc at 100 GeV, and ``flow``'s noise would cut real voxels
there. The logit regulariser stays 1e-6: in float32, 1 - 2e-8 rounds to 1 and a layer's only hit
voxel (share 1) would map to infinity.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from fastshower.models import register
from fastshower.models.base import ModelConfig, ModelSpec, float32, warmup_cosine
from fastshower.models.flow import _TINY, CaloFlow, FeatureScaler
from fastshower.models.flow_matching import ODE_METHODS, draw_t, ema_update, odeint
from fastshower.models.nets import MLP, LayerTransformer, SinusoidalEmbedding

__all__ = ["EnergyScaler", "LayerFMConfig", "LayerFlowMatching", "ShapeVelocity", "align_cells", "angular_basis",
           "dipole_angle", "random_turn", "ring_grid", "stencil", "turn_cells"]

#: cells="energy": a cell below this many times the dequantisation noise is empty. Empty cells train at
#: log(noise) to log(2 noise) and the faintest real hits (15.15 keV at 100 GeV) at log(150 noise): the cut
#: sits in the gap, log(10) above the empty band.
_CELL_CUT = 10.0
#: incident-energy knots (standardised log energy on [-2, 2]) and quantiles per table of the calibrated cell map
_MAP_KNOTS, _MAP_POINTS = 5, 24
#: the highest level of a map sits at the _TAIL_VALUES-th largest value of its sample
_TAIL_VALUES = 5
#: hit_map: a ring's energy per hit is capped at this quantile of the data's (same knot, layer, ring, count class);
#: before the fit the cap is _NO_CAP, above any log energy per hit (units of E_inc) a ring can hold
_HIT_LEVEL, _NO_CAP = 0.995, 10.0
#: fewest showers of the model and of the data behind one (incident knot, layer knot, layer) table of the ring map
_MIN_GROUP = 40
#: Gaussian copulas (depth_copula, layer_copula): the L x L and 2 L x 2 L correlation matrices (45 and 90 on
#: par04-ds2) come from ~400 showers per incident-energy knot (2000 calibration showers over 5 knots), so each is
#: shrunk this far towards the identity: a sample correlation of 400 showers has noise ~0.05, and the conditional
#: regression of 45 counts on 45 energies fits it. The marginal tables span normal scores -2.5 to 2.5 (0.6 % to
#: 99.4 % of ~400 showers) and the map back stops at their ends.
_COPULA_SHRINK, _COPULA_SCORES = 0.1, 2.5
#: the per-layer ring copulas (count_copula, share_copula): the rings' numbers each links to its layer's energy, and
#: its buffers (the model's marginal tables, the mix)
_RING_COPULAS = {"counts": ("copula_in", "copula_mix"), "shares": ("share_in", "share_mix")}
#: their normal scores stay within this far beyond their tables' ends (tables end at the 2 % and 98 % quantiles,
#: scores -2.05 and 2.05: a Gaussian sample of 1e9 stays within 6); an unfitted table is the identity over _WIDE
_SCORE_BOUND = 4.0
#: coherent_rings: fixed-point rounds of the gains' fit (the first lands within ~3 % of the data's power), the bounds
#: of a gain b (1 + b from 0.1 to 4 times the summed pattern's mode) and the floor of a cell's factor 1 + h
_COHERENCE_ROUNDS, _COHERENCE_GAIN, _COHERENCE_FLOOR = 4, (-0.9, 3.0), 0.1
#: the span of a copula's identity tables: wide enough for every value it sees (log fractions down to log(_TINY),
#: logit shares to about +-14, log(1 + hits) up to log(1 + V))
_WIDE = (-60.0, 60.0)


def _identity_map(shape: torch.Size | tuple[int, ...], lo: float = -30.0, hi: float = 0.0) -> Tensor:
    """Tables (..., 2, Q) of the identity map: the same increasing points, lo to hi, as its input and output."""
    q = torch.linspace(lo, hi, shape[-1])
    return q.expand(*shape[:-2], 2, shape[-1]).clone()


def _identity_modes(shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Tables ``shape`` = (..., 3, A) of the identity mode map: the model's and the data's means 0, the spread
    ratios 1."""
    out = torch.zeros(shape)
    out[..., 2, :] = 1.0
    return out


def _normal_scores(v: Tensor) -> Tensor:
    """Values v (n, ...) -> their normal scores along dim 0, Phi^-1((rank + 1/2) / n)."""
    ranks = v.argsort(dim=0).argsort(dim=0).to(v.dtype)
    return torch.special.ndtri((ranks + 0.5) / v.shape[0])


def _correlation_factor(z: Tensor, shrink: float = 0.01) -> tuple[Tensor, Tensor]:
    """Scores z (n, L, D) -> per L the correlation matrix (L, D, D) of the D scores, shrunk towards the identity
    by ``shrink`` (a column without spread counts as uncorrelated), and its lower Cholesky factor (L, D, D)."""
    zc = (z - z.mean(0)).permute(1, 0, 2)  # (L, n, D)
    cov = zc.transpose(1, 2) @ zc / max(z.shape[0] - 1, 1)
    sd = cov.diagonal(dim1=1, dim2=2).clamp_min(1e-12).sqrt()
    corr = (cov / (sd.unsqueeze(2) * sd.unsqueeze(1))).clamp(-1.0, 1.0)
    eye = torch.eye(z.shape[2]).expand_as(corr)
    corr = (1.0 - shrink) * torch.where(sd.unsqueeze(2) * sd.unsqueeze(1) > 1e-9, corr, eye) + shrink * eye
    corr = torch.where(eye > 0, eye, corr)
    return corr, torch.linalg.cholesky(corr)


def _identity_copula(d: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """A Gaussian copula of D values, the first k kept (:func:`_gauss_copula`), as the identity: its tables
    (_MAP_KNOTS, D, 2, Q), wide enough for every value (log fractions down to log(_TINY), log(1 + hits) up to
    log(1 + V)), the mix (_MAP_KNOTS, D - k, D) that gives each moved value its own score, and the trends
    (_MAP_KNOTS, D, 4): mean 0, slope 0 in c0, residual spread 1, the knot's mean c0 0."""
    eye = torch.eye(d - k)
    trend = torch.zeros(_MAP_KNOTS, d, 4)
    trend[..., 2] = 1.0
    return (_identity_map((_MAP_KNOTS, d, 2, _MAP_POINTS), *_WIDE),
            torch.cat([torch.zeros(d - k, k), eye], dim=1).expand(_MAP_KNOTS, d - k, d).clone(), trend)


def _conditional_mix(model: Tensor, data: Tensor, k: int) -> Tensor:
    """Correlation matrices (D, D) of the model's and the data's normal scores, the first k the kept ones (z_e), the
    other D - k (z_n, D - k = k, or k = 0: none kept) each linked to its own kept one -> M (D - k, D): z_n' = M z
    sends the model's scores z = (z_e, z_n) to the data's conditional law of z_n given z_e,
    z_n' = b_d z_e + C_d C_m^-1 (z_n - b_m z_e), with b the diagonal of each z_n's regression on its own z_e and C
    the Cholesky factor of the residuals' covariance, of each sample. z_e stays as it is.

    Why each on its own: a full regression of 45 counts on 45 layer energies, fitted on the data's strongly
    collinear energies, has large coefficients that cancel only there; applied to the model's energies (adjacent
    layers correlated 0.47 against the data's 0.60) it inflated the counts' spread and their links across far
    layers (par04-ds2 60-min run, 50-70 GeV: summed covariance of the layers' counts 10818 against Geant4's 6008,
    correlation 10 layers apart 0.22 against 0.14)."""
    parts = []
    for s in (model.double(), data.double()):
        b = torch.diag(s[k:, :k].diagonal()) if k else s.new_zeros(s.shape[0], 0)
        see, sne, snn = s[:k, :k], s[k:, :k], s[k:, k:]
        resid = snn - sne @ b.T - b @ sne.T + b @ see @ b.T
        parts.append((b, torch.linalg.cholesky(resid + 1e-6 * torch.eye(resid.shape[0], dtype=s.dtype))))
    (b_m, c_m), (b_d, c_d) = parts
    m_n = c_d @ torch.linalg.inv(c_m)
    return torch.cat([b_d - m_n @ b_m, m_n], dim=1).to(model.dtype)


def _trend(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Scores z (n, D) and centred c0 t (n,) -> each score's least-squares line in t, (D, 2) (mean, slope), and the
    residuals from it (n, D)."""
    line = torch.stack([z.mean(0), (z * t[:, None]).sum(0) / (t @ t).clamp_min(1e-12)], dim=1)
    return line, z - line[:, 0] - line[:, 1] * t[:, None]


def _gauss_copula(v: Tensor, tab: Tensor, mix: Tensor, trend: Tensor, c0: Tensor) -> Tensor:
    """Values v (B, D) at standardised log incident energies c0 (B,), the model's marginal tables tab (B, D, 2, Q)
    (values -> normal scores), the mix (B, D - k, D) and the model's score trends (B, D, 4: mean, slope in c0,
    residual spread, the knot's mean c0) -> the last D - k values moved (B, D - k): each value to its score, the
    score's linear trend in c0 taken out, the residuals mixed, the trend put back, back through the marginal.

    Why the trend: a knot pools showers over a factor ~4 in E_inc (par04-ds2), over which every layer's count grows
    together, so the pooled scores correlate through E_inc (10 layers apart: 0.38-0.54 in a knot, -0.08-0.14 at
    like energy); mixed as they are, that common trend was added to each shower (Geant4's covariance of the layers'
    counts summed at 10-14 GeV: 1429, the model's 1623 before, 4552 after). The map back stops at its table's ends:
    beyond them a piecewise-linear map goes on with slope 1 (a factor e per unit of score for a log count)."""
    z = _piecewise_linear(v, tab[..., 0, :], tab[..., 1, :])
    t = c0.unsqueeze(1) - trend[..., 3]  # (B, D)
    r = (z - trend[..., 0] - trend[..., 1] * t) / trend[..., 2]
    k = v.shape[1] - mix.shape[1]
    r = torch.einsum("bij,bj->bi", mix, r)
    z = trend[:, k:, 0] + trend[:, k:, 1] * t[:, k:] + trend[:, k:, 2] * r
    back = tab[:, k:]
    z = torch.minimum(torch.maximum(z, back[..., 1, 0]), back[..., 1, -1])
    return _piecewise_linear(z, back[..., 1, :], back[..., 0, :])


def _share_out(m: Tensor, total: Tensor, weight: Tensor, hit: Tensor, a: int) -> Tensor:
    """Hit counts m (B, L, R) (n + u) of hit rings (hit: 0/1), moved so that their sum goes to ``total`` (B, L, 1),
    the change shared by ``weight`` (B, L, R), each hit ring kept within [0.05, a + 0.5] (floor: 0 to a hits)."""
    change = total - m.sum(2, keepdim=True)
    m = m + change * weight / weight.sum(2, keepdim=True).clamp_min(_TINY)
    return torch.where(hit > 0, m.clamp(0.05, a + 0.5), m)


def _from_nearest_fitted(tables: Tensor, fitted: Tensor) -> None:
    """Fill ``tables`` (K, ...) in place: where ``fitted`` (K, ...), whose dims lead the tables', is False, the
    entry of the nearest knot where it is True (the lower knot of two as near); left as it is where none is."""
    extra = (1,) * (tables.dim() - fitted.dim())
    for knot in range(fitted.shape[0]):
        for other in sorted(range(fitted.shape[0]), key=lambda j: (abs(j - knot), j), reverse=True):
            take = (fitted[other] & ~fitted[knot]).reshape(*fitted.shape[1:], *extra)
            tables[knot] = torch.where(take, tables[other], tables[knot])


def _hit_class(n: Tensor, classes: int) -> Tensor:
    """Hit counts n (...) >= 1 -> class floor(log2 n) (...), long, at most ``classes`` - 1 (n + 0.5: no float
    rounding of log2 at a power of two can move a count into the class below)."""
    return torch.floor(torch.log(n.clamp_min(1.0) + 0.5) / math.log(2.0)).clamp(max=classes - 1).long()


def _piecewise_linear(y: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """The monotone map through the points (xs, ys) (..., Q) applied to y (...), slope 1 beyond the end points.

    A sum of clamped ramps rather than a search, so it exports to ONNX and holds (..., ) memory, not (..., Q).
    """
    out = ys[..., 0] + (y - xs[..., 0]).clamp(max=0.0) + (y - xs[..., -1]).clamp(min=0.0)
    for j in range(xs.shape[-1] - 1):
        width = (xs[..., j + 1] - xs[..., j]).clamp_min(1e-6)
        out = out + (ys[..., j + 1] - ys[..., j]) / width * torch.minimum((y - xs[..., j]).clamp(min=0.0), width)
    return out


def _hit_quantiles(m: int, start: float, device: torch.device, tail: bool = False) -> Tensor:
    """m quantile levels (m,) of the hits from ``start`` up, evenly spaced to 1 - 1/(m + 1) (m + 2 with a
    start); with ``tail`` the last three at 0.99, 0.996 and 0.999 of the way instead.

    Why the tail levels (the cell map): a tail left beyond the last point moves with slope 1; with evenly
    spaced levels the 60-min par04-ds2 run kept its hottest 4 % of ring-0 cells as the ODE drew them, 1.6 times
    Geant4's at the 99th percentile, and the hottest cell alone told it from Geant4 (AUC 0.82; 0.65 with
    them). Why not for ring shares: those are renormalised over a layer's rings after the map, which squashes
    a matched tail (in the unit test a ring's 99th-percentile share came out 0.033 low with them, within the
    test's 0.03 without)."""
    v = torch.linspace(start, 1.0 - 1.0 / (m + (2 if start else 1)), m, device=device)
    if tail:
        v[-3:] = start + (1.0 - start) * torch.tensor([0.99, 0.996, 0.999], device=device)
    return v


def _quantile_tables(model: Tensor, data: Tensor, rate: Tensor, gap: float = 0.0, tail: bool = False) -> Tensor:
    """Map tables (L, R, 2, Q) from cell numbers of the model and the data (n, L, A, R) each and the data's hit
    fraction (L, R): both samples' values at the minimum and at Q - 1 quantiles over the top ``rate``; with
    ``gap`` > 0, at the minimum, at 1 - rate - gap (the top of the data's empty band) and at Q - 2 quantiles from
    1 - rate + gap up, so that the map steps from empty to hit instead of spreading the model's values in
    between over the data's gap."""
    n_layers, n_r, q = model.shape[1], model.shape[3], _MAP_POINTS
    lo = torch.zeros(n_layers, n_r, 1, device=rate.device)
    if gap > 0:
        u = _hit_quantiles(q - 2, gap, rate.device, tail)
        lo = torch.cat([lo, (1.0 - rate - gap).clamp_min(0.0).unsqueeze(2)], dim=2)
    else:
        u = _hit_quantiles(q - 1, 0.0, rate.device, tail)
    # no level above the 5th largest value: beyond it an empirical quantile is the noise of a few showers
    top = 1.0 - _TAIL_VALUES / (model.shape[0] * model.shape[2])
    p = torch.cat([lo, (1.0 - rate).unsqueeze(2) + rate.unsqueeze(2) * u], dim=2).clamp(max=max(top, 0.0))
    out = []
    for v in (model, data):
        srt = v.permute(1, 3, 0, 2).reshape(n_layers, n_r, -1).sort(dim=2).values
        out.append(srt.gather(2, (p * (srt.shape[2] - 1)).round().long()))
    return torch.stack(out, dim=2)



@dataclass(frozen=True)
class LayerFMConfig(ModelConfig):
    """Hyper-parameters of :class:`LayerFlowMatching`.

    Attributes:
        stage1_transforms, stage1_hidden, stage1_bins: flow 1 (as :class:`~fastshower.models.flow.FlowConfig`).
        noise: dequantisation noise amplitude and zero threshold, fraction of E_inc.
        alpha: logit regulariser of the voxel shares, dimensionless.
        hidden, depth, heads, dropout: token width, adaLN transformer blocks, attention heads, dropout.
        group: adjacent readout layers per token (0: 3 when more than 20 equal layers divide by 3, else 1);
            the attention cost falls with the square of the token count.
        head_dim: width of the per-voxel output unit that sees the voxel's own current value (0: a linear
            out map per token, which cannot; see :class:`~fastshower.models.nets.LayerTransformer`).
        emb_dim, time_freqs: width of the (t, conditions, stage-1) embedding; sin/cos frequencies of t.
        lr, weight_decay, grad_clip, warmup: AdamW learning rate, decoupled weight decay, gradient-norm
            clip, steps of linear warm-up before the cosine decay to 5 %.
        ema: per-step decay of the velocity net's weight average used for sampling (0 disables).
        t_dist: "uniform" or "logit_normal" time sampling of the flow-matching loss.
        steps, method: ODE steps and solver ("euler", "midpoint", "heun") of sampling.
        max_voxels: largest V accepted (only stage 1 reads it; kept so a staged student can share it).
        zero_share: on sampling, voxels whose share of their layer is below this are empty. Empty voxels
            train at share ~0 (the logit floor, alpha); the ODE puts them near it, a little above, and
            without the cut ild-siw-30 came out 39 % occupied against Geant4's 2.3 %.
        energy_knots: K > 0 standardises the stage-2 numbers with a mean and std that depend on the incident
            energy (linear between K knots in the standardised log energy), 0 with one mean and std for all.
            Why: a central cell's logit share is -2.74 +- 0.31 above 30 GeV but -3.9 +- 3.4 over 1-100 GeV
            (par04-ds2), so with one std the ODE had to land within 0.09 units for high-energy showers.
        shares: what the shape ODE generates per layer. "voxel": each voxel's share of its layer. "ring"
            (polar readouts): each ring's share of its layer, then each cell's share of its ring, so the
            radial profile cannot be spoilt by noise in single cells. "auto": "ring" for polar readouts.
        cells: with ring shares, how a cell is written. "share": the logit of its share of its ring.
            "energy": log(cell / E_inc + noise), renormalised to the ring's energy on sampling (a cell below
            ``_CELL_CUT`` x noise is empty), and :meth:`LayerFlowMatching.calibrate` fits a cell map after
            training. Why it exists: Geant4's hits outside the core are single particles crossing the silicon,
            ~7 MeV each on the CaloChallenge scale whatever the ring holds (par04-ds2, 20-40 GeV: median hit
            6.5-7.9 MeV in rings 2-8), a peak that moves with the ring's energy when written as a share. Why it
            is not the default (par04-ds2, docs/model_quality.md): better at 1000 steps (low-level AUC 0.803
            against 0.844) but not after 60 CPU-minutes (0.723, 0.786 with the cell map, against 0.652).
        occupancy: with ring shares, how empty cells are decided. "none": by value (``zero_share``, or the cell
            cut of cells="energy"). "count": each ring's number of hit cells n is one more stage-2 number
            (log(1 + n + u), u ~ U(0, 1), so that n = floor(exp(y) - 1)), generated by the ODE with the rest;
            on sampling a ring keeps its n largest cells and is empty when n = 0. Why: the ODE smooths the
            step from empty to hit; par04-ds2's 60-min run (cells="share") had the ring energies right but,
            in the late sparse layers where Geant4 has one or two ~7 MeV hits (lateral width 0), spread them
            over many cells: the per-layer widths alone told it from Geant4 with AUC 0.90, sparsity 0.99.
        maps: post-training quantile maps (:meth:`LayerFlowMatching.calibrate`, fitted on training showers):
            "layers": per incident-energy knot and layer, a monotone map sends stage 1's log layer fractions to
            the data's at the same quantiles, stepping from empty to hit at the data's rate; "rings": also each
            ring's logit share of its layer (ring shares), per knot, layer and ring; "all": also each cell's
            number, per knot, layer and ring (the cells pooled over angle; with cells="share" it needs
            occupancy="count"); "none". Why: a late layer in
            Geant4 is empty or holds a particle's ~1-10 MeV, and the spline flow fills the gap between
            (par04-ds2, 60-min run, layer 40: 262 of 2500 showers at 0.1-1 MeV against Geant4's 12); and the
            ODE's outer-ring shares have tails Geant4 lacks (layer 15, ring 8, 10-30 GeV: 99th percentile 0.27
            of the layer against 0.085), which the r^2-weighted widths feel, and one hot cell where Geant4
            spreads the core over its 16 angular cells (hottest cell, 10-30 GeV: 1.75 % of E_inc against 0.95 %).
        fourier_rings: with ring shares, how many inner rings the velocity net sees as their cells' orthonormal
            angular Fourier modes (:func:`angular_basis`) rather than as cells; 0: none. The ODE, the maps and
            the students are unchanged (the net is wrapped in the rotation, the same flow in other
            coordinates). Why: the voxel head gives every number a unit that sees its own value, a bias towards
            independent numbers, and Geant4's core cells are not independent (the core sits off the axis by a
            fraction of a cell, in the same direction through the layers): the 60-min par04-ds2 run drew ring 0
            as white noise (dipole of the depth-summed ring 0: 5.3e-3 of its power against Geant4's 25.9e-3;
            phase coherence of the dipole over layers 5-15: 0.26 against 0.44; the summed image 1.5-1.9 local maxima
            too many, n_peaks the strongest single high-level observable once the cell maps were fitted). A
            ring's angular covariance is circulant (no preferred angle), and Fourier modes diagonalise every
            circulant matrix. Only inner rings: every ring in modes (measured, par04-ds2) trained to a 13 %
            higher flow-matching loss at 1000 steps (1.34 against 1.18), worst in the sparse outer rings, where
            a few hit cells among empty ones are no smooth angular pattern.
        layer_knots: with the ring map (maps "rings", "all"), K > 0 fits it per incident-energy knot and per knot
            of the layer's own energy (K knots on stage 1's standardised log layer fraction, [-2, 2]), so that each
            ring's share and count follow the data's at that layer energy; 0: per incident-energy knot only. Why:
            a map per incident energy keeps the ODE's ranks, and with them its coupling of a late layer's hit
            count to the layer's energy, which was too loose (par04-ds2 60-min run, layer 20: correlation 0.68
            against Geant4's 0.89; per-layer sparsity alone told the samples apart with AUC 0.73). A hit there is
            a ~7 MeV particle, so the count is nearly fixed by the layer energy.
        stencil: with ring shares and ``head_dim``, each number's unit of the voxel head also sees its six
            neighbours' current values (:func:`stencil`: the angular and radial neighbours and the same cell in
            the adjacent layers), through six weights per head unit shared by all cells, zero at the start. Why:
            the transformer sees a token of 3 x 144 cells through 128 numbers, so a cell's velocity knew its own
            value and the token's summary but not its neighbours'; the 60-min par04-ds2 run drew the core's cells
            as independent noise (n_peaks of the depth-summed image 1.5-1.9 too many; the off-axis core of
            Geant4, coherent through the layers, missing), which a local stencil, as in a convolutional denoiser,
            can smooth and align.
        align: with ring shares, every training shower is turned by whole angular bins and mirrored
            (:func:`align_cells`) so that its angular dipole points into the first half of bin 0, and every
            sampled shower is turned by a uniformly drawn element of the same dihedral group (:func:`random_turn`,
            from one more noise number, between stage 1's and stage 2's). A readout symmetric under these turns
            (par04: a cylinder, no field, the particle along its axis) keeps its distribution exactly. Why: Geant4's
            core sits off the axis by a fraction of a cell, in one direction through the layers; without a frame
            the ODE must break the symmetry itself, and the 60-min par04-ds2 runs did not (depth-summed ring 0 at
            10-30 GeV: dipole power 0.06e-3 against Geant4's 0.51e-3). In the aligned frame 70 % of Geant4's
            dipole power (0.36e-3) is in the mean pattern, which the energy scaler's per-cell means hold.
        mode_rings: with the ring map (maps "rings", "all") and occupancy="count", the k inner rings get one more post-
            training map, fitted after the cells' map: per incident-energy knot, layer and ring, each angular Fourier
            mode (:func:`angular_basis`) of the log of the ring's cell shares is moved to the data's mean and spread (u
            -> m_data + (s_data / s_model) (u - m_model)), on rings whose A cells are all hit (the map is fitted on
            those showers of the data and of the model and applied to those of the model); 0: none. Why: the cells' map
            pools a ring's cells over angle and keeps each shower's ranks, so it sets each cell's spectrum but not how
            neighbouring cells vary together, and the 60-min par04-ds2 runs drew the core as white noise over its 16
            cells where Geant4's angular power falls from k = 1 to k = 3 (n_peaks of the depth-summed image 5.3 against
            4.7, the strongest single high-level observable left). A ring's angular covariance is close to circulant,
            which Fourier modes diagonalise, so matching each mode's spread is matching the covariance with 16 numbers
            per ring instead of 136.
        count_copula: with the ring map and occupancy="count", one more post-training map, fitted before the ring
            map: per incident-energy knot and layer, the rings' count numbers get the data's dependence on each other
            and on the layer's energy (a Gaussian copula: each number to its normal score under the model's own
            marginal, the scores mixed by L_data L_model^-1 with the Cholesky factors of the two correlation matrices,
            the layer energy first so that it stays as it is, then back through the model's marginal, which the
            ring map then sends to the data's). Why: the ring map keeps the ODE's ranks, and with them its loose
            coupling of a layer's hit count to the layer's energy (par04-ds2, layer 20: correlation 0.68 against
            Geant4's 0.89; per-layer sparsity the strongest family of the high-level classifier, AUC 0.71-0.77
            alone); ``layer_knots`` conditions the map on the layer energy by grouping showers, which made every
            map noisier (5 x 5 groups of 2000 showers); a copula uses every shower of a knot.
        share_copula: with the ring map, the same per-layer copula as ``count_copula`` on the rings' logit shares of
            their layer instead of their counts: per incident-energy knot and layer, the R shares get the data's
            dependence on each other and on the layer's energy, before the ring map sets each one's marginal. Why:
            the ring map keeps the ODE's ranks, and with them its looser radial profile: par04-ds2's 60-min runs,
            10-40 GeV, layers 3-16, rank correlation of ring 0's and ring 1's shares -0.54 to -0.73 against
            Geant4's -0.73 to -0.81, of rings 1 and 2 -0.12 to 0.07 against 0.09 to 0.18; the per-layer r moments, each
            within AUC 0.57 of Geant4's, told a seed-0 run from Geant4 with AUC 0.69 together. Measured with
            coherent_rings on three runs (docs/model_quality.md): the links come to Geant4's, the CaloChallenge
            high-level set's AUC 0.591-0.603 -> 0.565-0.591, the strict one within its noise (0.748, 0.639, 0.622
            against 0.760, 0.636, 0.651); off by default, as the recipe trained end to end does not have it.
        hit_map: with the ring map and occupancy="count", a cap fitted by ``calibrate`` from the data alone: per
            incident-energy knot, layer, ring and class of the ring's hit count n (1, 2-3, 4-7, ..., all A cells:
            floor(log2 n)), the ``_HIT_LEVEL`` (99.5th) percentile of the data's log energy per hit, log(share x
            layer fraction / n); on sampling, after the ring map, a hit ring above its cap is lowered to it and the
            layer's hit rings renormalised (the layer keeps stage 1's energy). Why: the ring map sends each ring's
            share and count to the data's separately, and the ODE sometimes pairs them as Geant4 never does:
            par04-ds2's 60-min runs had 228-536 of 2500 showers with a hit ring above 3x Geant4's cap (Geant4: 9-11),
            e.g. one hit holding 10-45 % of layer 5's energy in rings 4-8, where Geant4's far hits are particles of a
            few MeV; a far hot spot that widens the r and x/y moments, adds a peak and sets the hottest cell. With the
            cap: 48-148 such showers and FPD 7-8 % lower on three runs; the strict high-level AUC within the runs'
            spread (docs/model_quality.md), so it is off by default.
        depth_copula: with the ring map and occupancy="count", one more post-training map, fitted after the ring map
            and applied after it: per incident-energy knot, the layers' hit counts get the data's dependence on each
            other through the depth and on their own layer's energy. A Gaussian copula of 2 L numbers per shower
            (each layer's log energy fraction, then each layer's log(1 + hits), the hits summed over its rings), each
            to its normal score under the model's own marginal, the score's linear trend in log E_inc within the knot
            taken out (:func:`_gauss_copula`); the counts' residuals replaced by the data's conditional law given the
            energies' (:func:`_conditional_mix`: the energies stay as stage 1 drew them), the trend put back, back
            through the model's marginal; the change of each layer's total is shared among its hit rings by their
            room (:meth:`couple_depth`). Why: the ring map keeps the ODE's ranks, and the ODE ties a layer's hit
            count to its neighbours' and to its own energy far more loosely than Geant4 does (par04-ds2 60-min run,
            50-70 GeV, ``benchmarks/depth_structure.py``: sparsities one layer apart correlated 0.31 against 0.51,
            a layer's hits with its energy 0.41 against 0.67); per-layer sparsity was the strongest family of the
            strict high-level classifier (AUC 0.62-0.76 alone across runs), and shuffling each layer's sparsity
            among like-energy showers took it from 0.76 to 0.58. Measured on three runs (docs/model_quality.md):
            with ``layer_copula`` and 5250 calibration showers, the CaloChallenge high-level set's AUC 0.592-0.605
            over classifier seeds, against 0.638-0.671 without.
        layer_copula: with the layer map (maps other than "none"), one more post-training map of stage 1, fitted and
            applied before the layer map: per incident-energy knot, a Gaussian copula of the L log layer fractions
            (each to its normal score under the model's own marginal, its trend in log E_inc taken out, the residuals
            mixed by L_data L_model^-1 with the Cholesky factors of the two residual correlation matrices, the trend
            put back, back through the model's marginal), so that the layers' energies vary together as the data's;
            the layer map then sets each marginal. Why: stage 1's flow links neighbouring layers' energies more
            loosely than Geant4 does (par04-ds2 60-min run, log energies one layer apart at 3-5 / 10-14 / 50-70 GeV:
            0.15 / 0.31 / 0.45 against Geant4's 0.25 / 0.39 / 0.58), and the layer map keeps its ranks; the layer
            energies alone told the model from Geant4 with AUC 0.58-0.63.
        coherent_rings: with the ring map (maps "rings", "all"), the k inner rings get one more post-training map,
            fitted last and applied to the assembled shower (:meth:`cohere`): per incident-energy knot and ring, each
            angular Fourier frequency of the ring's depth-summed pattern (its relative deviation from the ring's mean
            over angle) is amplified or damped by a gain 1 + b_f, by multiplying every layer's cells of the ring by
            1 + h, h the summed pattern's modes times b_f; each layer's ring keeps its energy and its empty cells.
            The gains are fitted (a few fixed-point steps) so that the model's mean power per frequency of the
            summed pattern is the data's; 0: none. Why: Geant4's core sits off the axis by a fraction of a cell and
            keeps its sub-cell shape through the layers, so its depth-summed ring 0 is smooth in angle (power falls
            from k = 1 to 4), where the model's layers fluctuate nearly independently and their sum is white noise:
            par04-ds2's 60-min runs had 5.2-5.3 local maxima in the depth-summed image against Geant4's 4.7 (above
            10 GeV), n_peaks the strongest single high-level observable left, and shuffling Geant4's own ring-0
            patterns among like showers layer by layer gives it 5.1. A per-layer mode map (``mode_rings``) cannot
            supply what is shared between layers; a gain on the summed pattern's modes makes each layer follow it.
            Measured on three 60-min runs with both copulas (docs/model_quality.md): n_peaks 5.24-5.32 -> 4.66-4.72
            (Geant4 4.71), the strict high-level AUC over classifier seeds 0.724-0.791 -> 0.636-0.760.
        ring_weight: with ring shares, the weight of each ring's numbers (its share, and count) in the flow-matching
            loss against 1 for a cell's (the weights then scaled to average 1). Why: they set the radial profile and
            the occupancy, which the strongest high-level families measure (r and x/y widths, per-layer sparsity:
            AUC 0.71-0.76 alone on par04-ds2's 60-min run), yet are 18 of a layer's 162 numbers, 11 % of the loss.
    """

    stage1_transforms: int = 4
    stage1_hidden: int = 64
    stage1_bins: int = 8
    noise: float = 1e-9
    alpha: float = 1e-6
    hidden: int = 128
    depth: int = 4
    heads: int = 4
    group: int = 0
    head_dim: int = 8
    dropout: float = 0.0
    emb_dim: int = 128
    time_freqs: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    warmup: int = 200
    ema: float = 0.999
    t_dist: str = "logit_normal"
    steps: int = 16
    method: str = "midpoint"
    max_voxels: int = 10_000_000
    zero_share: float = 1e-5
    shares: str = "auto"
    energy_knots: int = 5
    cells: str = "share"
    occupancy: str = "none"
    maps: str = "none"
    fourier_rings: int = 0
    layer_knots: int = 0
    stencil: bool = False
    align: bool = False
    mode_rings: int = 0
    count_copula: bool = False
    share_copula: bool = False
    hit_map: bool = False
    ring_weight: float = 1.0
    depth_copula: bool = False
    layer_copula: bool = False
    coherent_rings: int = 0

    introduced: ClassVar[dict[str, Any]] = {"head_dim": 0, "shares": "voxel", "energy_knots": 0, "cells": "share",
                                          "occupancy": "none", "maps": "none", "fourier_rings": 0,
                                          "layer_knots": 0, "stencil": False, "align": False,
                                          "mode_rings": 0, "count_copula": False, "hit_map": False,
                                          "ring_weight": 1.0, "depth_copula": False,
                                          "layer_copula": False, "coherent_rings": 0, "share_copula": False}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"t_dist": ("uniform", "logit_normal"), "method": ODE_METHODS,
                                                     "shares": ("auto", "voxel", "ring"),
                                                     "cells": ("share", "energy"), "occupancy": ("none", "count"),
                                                     "maps": ("none", "layers", "rings", "all")}

    def stage1_config(self) -> dict[str, Any]:
        """The keys of :class:`~fastshower.models.flow.FlowConfig` that build this model's stage 1."""
        keys = ("stage1_transforms", "stage1_hidden", "stage1_bins", "noise", "alpha", "max_voxels", "zero_share")
        return {k: getattr(self, k) for k in keys}


def _group(group: int, layer_sizes: tuple[int, ...]) -> int:
    """Resolve ``group`` = 0 (auto): 3 adjacent layers per token when there are more than 20 equal layers and
    3 divides their number (par04: 15 tokens of 3 layers), 1 otherwise."""
    if group:
        return group
    n = len(layer_sizes)
    return 3 if n > 20 and n % 3 == 0 and len(set(layer_sizes)) == 1 else 1


def ring_grid(cfg: LayerFMConfig, spec: ModelSpec) -> tuple[int, int] | None:
    """(angular bins A, rings R) of every layer when the shape ODE generates ring shares, else None.

    Raises ValueError for ``shares="ring"`` on a readout that is not polar with one layer shape.
    """
    polar = spec.extra.get("readout") == "polar"
    if cfg.shares == "voxel" or (cfg.shares == "auto" and not polar):
        return None
    shapes = set(spec.layer_shapes)
    if not polar or len(shapes) != 1 or min(next(iter(shapes))) < 2:
        raise ValueError("layer-fm shares='ring' needs a polar readout whose layers all have the same angular "
                         f"bins x rings (>= 2 each); this detector has {sorted(shapes)[:3]}: use shares='voxel'")
    a, r = next(iter(shapes))
    return int(a), int(r)


def hat_weights(c0: Tensor, knots: Tensor) -> Tensor:
    """Weights (B, K) of linear interpolation in c0 (B,) between equally spaced ``knots`` (K,), constant beyond
    them: hat functions, each row summing to 1."""
    return torch.relu(1.0 - (c0.unsqueeze(1).clamp(knots[0], knots[-1]) - knots).abs() / (knots[1] - knots[0]))


class EnergyScaler(torch.nn.Module):
    """Standardisation ``(f - m(c0)) / s(c0)`` of features f (B, D) whose mean and std depend on c0 (B,), the
    standardised log incident energy: linear between K knots on [-2, 2] (hat-function weights), constant beyond.

    Fitted once on a batch (the weighted moments at each knot; a knot that the batch barely reaches takes the
    batch's global moments); ``min_std`` floors the std as :class:`~fastshower.models.flow.FeatureScaler` does.
    """

    mean: Tensor
    std: Tensor
    fitted: Tensor
    knots: Tensor

    def __init__(self, dim: int, knots: int, min_std: float = 1.0) -> None:
        super().__init__()
        if knots < 2:
            raise ValueError(f"EnergyScaler needs at least 2 knots, got {knots}")
        self.min_std = min_std
        self.register_buffer("knots", torch.linspace(-2.0, 2.0, knots))
        self.register_buffer("mean", torch.zeros(knots, dim))
        self.register_buffer("std", torch.ones(knots, dim))
        self.register_buffer("fitted", torch.tensor(False))

    def weights(self, c0: Tensor) -> Tensor:
        """c0 (B,) -> hat-function weights (B, K), each row summing to 1."""
        return hat_weights(c0, self.knots)

    @torch.no_grad()
    def fit_once(self, f: Tensor, c0: Tensor) -> None:
        """Fit on f (B, D) at energies c0 (B,) unless already fitted."""
        if bool(self.fitted) or f.shape[0] < 2:
            return
        with float32(f.device):  # moments in float32 under precision="bf16" as well
            f = f.float()
            w = self.weights(c0.float())
            sums = torch.stack([w.T @ f, w.T @ (f * f)])  # (2, K, D)
        n = w.sum(0)
        if dist.is_available() and dist.is_initialized():  # every rank's first batch: one scaler for all
            dist.all_reduce(sums)
            dist.all_reduce(n)
        mean, sq = sums / n.clamp_min(1e-12).reshape(1, -1, 1)
        sparse = n < 8  # fewer than ~8 showers near a knot: its moments would be noise, use the global ones
        mean[sparse], sq[sparse] = sums[0].sum(0) / n.sum(), sums[1].sum(0) / n.sum()
        self.mean.copy_(mean)
        self.std.copy_((sq - mean * mean).clamp_min(0.0).sqrt().clamp_min(self.min_std))
        self.fitted.fill_(True)

    def forward(self, f: Tensor, c0: Tensor) -> Tensor:
        w = self.weights(c0)
        return (f - w @ self.mean) / (w @ self.std)

    def inverse(self, g: Tensor, c0: Tensor) -> Tensor:
        w = self.weights(c0)
        return g * (w @ self.std) + w @ self.mean


def split_cells(y: Tensor, n_layers: int, a: int, r: int) -> tuple[Tensor, Tensor]:
    """Stage-2 numbers y (B, W) with ring shares -> per layer the numbers before the cells (B, L, k) (the rings'
    shares, and counts) and the cells (B, L, A, R)."""
    y = y.reshape(y.shape[0], n_layers, -1)
    k = y.shape[2] - a * r
    return y[:, :, :k], y[:, :, k:].reshape(y.shape[0], n_layers, a, r)


def join_cells(head: Tensor, cells: Tensor) -> Tensor:
    """The inverse of :func:`split_cells`: head (B, L, k) and cells (B, L, A, R) -> stage-2 numbers (B, W)."""
    b, n_layers = cells.shape[:2]
    return torch.cat([head, cells.reshape(b, n_layers, -1)], dim=2).reshape(b, -1)


def _shifted(t: Tensor, dim: int, step: int, circular: bool = False) -> Tensor:
    """t with index i along ``dim`` holding t's entry i + step: around the circle, or clamped (the edge itself)."""
    i = torch.arange(t.shape[dim]) + step
    return t.index_select(dim, i % t.shape[dim] if circular else i.clamp(0, t.shape[dim] - 1))


def stencil(n_layers: int, a: int, r: int, per_ring: int) -> Tensor:
    """Indices (W, 6) of each stage-2 number's neighbours in the ring-share layout (per layer: per_ring x R ring
    numbers, then A x R cells): a cell's two angular neighbours (around the circle), its two radial ones and the same
    cell in the layers before and after; a ring number's (share or count) the same number of the rings inside and
    outside and of the same ring in the adjacent layers, and itself twice for the angle. A neighbour off the grid
    (inside ring 0, outside the last ring, before the first layer or after the last) is the number itself."""
    width = per_ring * r + a * r
    idx = torch.arange(n_layers * width).reshape(n_layers, width)
    head, cells = idx[:, : per_ring * r].reshape(n_layers, per_ring, r), idx[:, per_ring * r :].reshape(n_layers, a, r)
    parts = []
    for t in (head, cells):
        angular = [_shifted(t, 1, s, circular=True) for s in (-1, 1)] if t is cells else [t, t]
        nb = [*angular, _shifted(t, 2, -1), _shifted(t, 2, 1), _shifted(t, 0, -1), _shifted(t, 0, 1)]
        parts.append(torch.stack(nb, dim=-1).reshape(n_layers, -1, 6))
    return torch.cat(parts, dim=1).reshape(-1, 6)


def angular_basis(n: int) -> Tensor:
    """The orthonormal real Fourier basis (n, n) over n angular bins: row 0 the mean, then cos and sin of
    each frequency k = 1 .. (n - 1) // 2 at the bins' angles 2 pi a / n, and for even n the alternating row."""
    a = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    rows = [torch.full((n,), 1.0 / math.sqrt(n), dtype=torch.float64)]
    for k in range(1, (n - 1) // 2 + 1):
        rows += [math.sqrt(2.0 / n) * torch.cos(k * a), math.sqrt(2.0 / n) * torch.sin(k * a)]
    if n % 2 == 0:
        rows.append(torch.cos(n // 2 * a) / math.sqrt(n))
    return torch.stack(rows).float()


def _angular_frequencies(n: int) -> list[int]:
    """The frequency k of each row of :func:`angular_basis` (n): 0 for the mean, then k for cos and sin of k."""
    return [0] + [(j + 1) // 2 for j in range(1, n)]


def dipole_angle(x: Tensor, n_layers: int, a: int, r: int) -> Tensor:
    """Showers x (B, V) on a polar grid (layer, a angular bins, r rings) -> the direction (B,) in [0, 2 pi) of
    their angular dipole, sum over cells of E (cos, sin) of the bin's centre angle 2 pi (j + 1/2) / a."""
    per_angle = x.reshape(-1, n_layers, a, r).sum(dim=(1, 3))
    ang = (torch.arange(a, device=x.device, dtype=x.dtype) + 0.5) * (2 * math.pi / a)
    # sums of products, not a matmul: autocast would round a bf16 matmul, and the bin edges need float32
    return torch.atan2((per_angle * ang.sin()).sum(1), (per_angle * ang.cos()).sum(1)) % (2 * math.pi)


def turn_cells(x: Tensor, n_layers: int, a: int, r: int, shift: Tensor, mirror: Tensor) -> Tensor:
    """Showers x (B, V) on a polar grid with each shower's angular bins permuted by an element of the dihedral
    group of the a-gon: bin j of the result holds bin (j + shift) mod a, or with ``mirror`` (shift - j) mod a;
    shift (B,) whole bins and mirror (B,) 0/1, as floats. A permutation of each ring's cells: every layer's and
    ring's energy is kept exactly."""
    j = torch.arange(a, device=x.device, dtype=x.dtype)
    v = (1.0 - 2.0 * mirror).unsqueeze(1) * j + shift.unsqueeze(1)  # (B, a)
    src = (v - a * torch.floor(v / a)).round().long()  # mod a, in float ops that export to ONNX
    cells = x.reshape(-1, n_layers, a, r)
    return cells.gather(2, src[:, None, :, None].expand(-1, n_layers, -1, r)).reshape(x.shape)


def align_cells(x: Tensor, n_layers: int, a: int, r: int) -> Tensor:
    """Showers x (B, V) on a polar grid turned and mirrored (:func:`turn_cells`) so that each one's angular
    dipole (:func:`dipole_angle`) points into the first half of bin 0: [0, pi / a)."""
    phi = dipole_angle(x, n_layers, a, r) * (a / (2 * math.pi))  # in bins
    j0 = torch.floor(phi).clamp(0, a - 1)
    return turn_cells(x, n_layers, a, r, j0, (phi - j0 > 0.5).to(x.dtype))


def random_turn(x: Tensor, n_layers: int, a: int, r: int, z: Tensor) -> Tensor:
    """Showers x (B, V) on a polar grid turned by an element of the a-gon's dihedral group (2a of them), chosen
    uniformly by one standard-normal number per shower z (B,) (its normal CDF cut into 2a equal bins)."""
    u = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    m = torch.floor(u * (2 * a)).clamp(0, 2 * a - 1)
    mirror = (m >= a).to(x.dtype)
    return turn_cells(x, n_layers, a, r, m - a * mirror, mirror)


class ShapeVelocity(torch.nn.Module):
    """v(g2_t (B, W), t (B, 1) | c (B, C), g1 (B, L), layer features (B, L, 1)) -> (B, W); ``sizes``: the
    stage-2 numbers of each layer (its voxels, or its rings and cells), summing to W; ``rings``: (A, R) with
    ring shares; ``fourier_rings``: how many inner rings the net sees as angular Fourier modes."""

    basis: Tensor  # (A, A) with fourier_rings: angular_basis(A)

    def __init__(self, spec: ModelSpec, cfg: LayerFMConfig, sizes: tuple[int, ...],
                 rings: tuple[int, int] | None = None, fourier_rings: int = 0) -> None:
        super().__init__()
        n_layers = len(spec.layer_sizes)
        self.time = SinusoidalEmbedding(cfg.time_freqs)
        self.embed = MLP([2 * cfg.time_freqs + spec.cond_dim + n_layers, cfg.emb_dim, cfg.emb_dim])
        nb = None
        if cfg.stencil and rings is not None:  # each layer: R x (per_ring + A) numbers
            nb = stencil(n_layers, *rings, sizes[0] // rings[1] - rings[0])
        self.net = LayerTransformer(sizes, 1, cfg.emb_dim, cfg.hidden, cfg.depth, cfg.heads, cfg.dropout,
                                    _group(cfg.group, sizes), cfg.head_dim, nb)
        self.n_layers, self.rings, self.fourier_rings = n_layers, rings, fourier_rings
        if rings is not None and fourier_rings:
            self.register_buffer("basis", angular_basis(rings[0]), persistent=False)

    def rotate(self, g: Tensor, inverse: bool = False) -> Tensor:
        """Stage-2 numbers g (B, W) with the A cells of each of the ``fourier_rings`` inner rings replaced by
        their angular Fourier modes (or back); the basis is orthonormal, so with isotropic noise the flow in
        these coordinates is the same flow: only the voxel head now sees a mode as "its own value"."""
        if self.rings is None or not self.fourier_rings:
            return g
        head, cells = split_cells(g, self.n_layers, *self.rings)
        q = self.basis.t() if inverse else self.basis
        inner = torch.einsum("ma,blar->blmr", q, cells[..., : self.fourier_rings])
        return join_cells(head, torch.cat([inner, cells[..., self.fourier_rings :]], dim=3))

    def forward(self, g: Tensor, t: Tensor, c: Tensor, g1: Tensor, feats: Tensor) -> Tensor:
        emb = self.embed(torch.cat([self.time(t), c, g1], dim=1))
        return self.rotate(self.net(self.rotate(g), feats, emb), inverse=True)


@register
class LayerFlowMatching(CaloFlow):
    """Layer energies by a spline flow, voxel shares by flow matching over layer tokens ("layer-fm").

    Shapes: x (B, V) = voxel energy / E_inc (>= 0); c (B, C), column 0 the standardised log incident
    energy. Hyper-parameters: :class:`LayerFMConfig`. One AdamW over both stages.
    """

    name: ClassVar[str] = "layer-fm"
    #: most (rows x V x head_dim) voxel-head activations one block of the sampling ODE holds (2^26: 256 MB)
    block_elements: ClassVar[int] = 2**26
    config_class: ClassVar[type[ModelConfig]] = LayerFMConfig
    config: LayerFMConfig  # type: ignore[assignment]
    map_knots: Tensor  # (_MAP_KNOTS,) standardised log incident energies of the cell map's tables (ring shares)
    cell_map: Tensor  # (_MAP_KNOTS, L, R, 2, _MAP_POINTS) per knot, layer and ring: the map's points (in, out)
    layer_table: Tensor  # (_MAP_KNOTS, L, 1, 2, _MAP_POINTS) per knot and layer: stage 1's map (maps)
    ring_table: Tensor  # (_MAP_KNOTS [x layer_knots], L, per_ring x R, 2, _MAP_POINTS): shares' (counts') map
    layer_knots: Tensor  # (layer_knots,) standardised log layer fractions of the ring map's second axis
    mode_table: Tensor  # (_MAP_KNOTS, L, mode_rings, 3, A): per knot, layer and inner ring the mode map (m, m', s)
    mode_basis: Tensor  # (A, A): angular_basis(A) (mode_rings, coherent_rings)
    copula_in: Tensor  # (_MAP_KNOTS, L, 1 + R, 2, Q): the model's log layer fraction and counts -> normal scores
    copula_mix: Tensor  # (_MAP_KNOTS, L, 1 + R, 1 + R): L_data L_model^-1 of the normal scores' correlations
    hit_cap: Tensor  # (_MAP_KNOTS, L, count classes, R): the highest log energy per hit of a ring (hit_map)
    depth_in: Tensor  # (_MAP_KNOTS, 2 L, 2, Q): the model's log layer fractions and log(1 + hits) -> normal scores
    depth_mix: Tensor  # (_MAP_KNOTS, L, 2 L): the layer counts' new normal scores from all 2 L (depth_copula)
    depth_fitted: Tensor  # () bool: whether calibrate fitted the depth copula (depth_copula)
    layer_in: Tensor  # (_MAP_KNOTS, L, 2, Q): stage 1's log layer fractions -> normal scores (layer_copula)
    layer_mix: Tensor  # (_MAP_KNOTS, L, L): L_data L_model^-1 of the scores' correlations (layer_copula)
    layer_trend: Tensor  # (_MAP_KNOTS, L, 4): the model's scores' trend in c0 (layer_copula; see _gauss_copula)
    depth_trend: Tensor  # (_MAP_KNOTS, 2 L, 4): the same for depth_copula
    core_gain: Tensor  # (_MAP_KNOTS, k, A): per knot and inner ring each angular mode's gain b (coherent_rings)

    def __init__(self, spec: ModelSpec, config: LayerFMConfig | Mapping[str, Any] | None = None, *,
                 with_velocity: bool = True, **overrides: Any) -> None:
        """``with_velocity=False`` builds stage 1, the scalers and the stage-2 variables without the shape ODE's
        nets: what a staged one-step student (:class:`fastshower.models.onestep.OneStep`) keeps of a trained run."""
        super().__init__(spec, config, with_stage2=False, **overrides)
        cfg = self.config
        self.rings = ring_grid(cfg, spec)
        self._check_options(cfg)
        #: numbers per ring before the cells: its share of the layer, and with occupancy="count" its hit count
        self.per_ring = 2 if cfg.occupancy == "count" else 1
        sizes = (spec.layer_sizes if self.rings is None else
                 (self.rings[1] * (self.rings[0] + self.per_ring),) * self.n_layers)
        # logit shares span about +-14; a voxel rarely hit in the first batch would get a tiny std and its
        # few hits standardised values of 1e3, which dominate a squared-error loss: floor the std at 1
        self.stage2_width = sum(sizes)
        scale2 = (EnergyScaler(self.stage2_width, cfg.energy_knots) if cfg.energy_knots else
                  FeatureScaler(self.stage2_width, min_std=1.0))
        self.scale2: FeatureScaler | EnergyScaler = scale2  # type: ignore[assignment]
        self.scale_e = FeatureScaler(self.n_layers)  # log layer fractions -> the tokens' energy feature
        self.register_buffer("map_knots", torch.linspace(-2.0, 2.0, _MAP_KNOTS), persistent=False)
        if self.rings is not None:  # per energy knot, layer and ring: see calibrate
            self.register_buffer("cell_map", _identity_map((_MAP_KNOTS, self.n_layers, self.rings[1], 2, _MAP_POINTS)))
        if cfg.maps != "none":
            self.register_buffer("layer_table", _identity_map((_MAP_KNOTS, self.n_layers, 1, 2, _MAP_POINTS)))
        if cfg.layer_copula:  # per knot, over the layers: see _fit_layer_map; wide: the identity leaves all as it is
            self._register_copula("layer", self.n_layers, 0)
        if cfg.maps in ("rings", "all") and self.rings is not None:
            # with layer_knots K: row k1 * K + k2 holds incident-energy knot k1 and layer-energy knot k2
            shape = (_MAP_KNOTS * max(cfg.layer_knots, 1), self.n_layers, self.per_ring * self.rings[1], 2, _MAP_POINTS)
            self.register_buffer("ring_table", _identity_map(shape))
            self.register_buffer("layer_knots", torch.linspace(-2.0, 2.0, max(cfg.layer_knots, 2)), persistent=False)
        for part, on in (("counts", cfg.count_copula), ("shares", cfg.share_copula)):
            if on and self.rings is not None:  # per knot and layer: see _fit_copula
                r1, (tables, mix) = self.rings[1] + 1, _RING_COPULAS[part]
                self.register_buffer(tables, _identity_map((_MAP_KNOTS, self.n_layers, r1, 2, _MAP_POINTS), *_WIDE))
                self.register_buffer(mix, torch.eye(r1).expand(_MAP_KNOTS, self.n_layers, r1, r1).clone())
        if cfg.hit_map and self.rings is not None:  # per knot, layer, count class and ring: see _fit_hit_map
            self.hit_classes = int(math.log2(self.rings[0])) + 1
            self.register_buffer("hit_cap", torch.full((_MAP_KNOTS, self.n_layers, self.hit_classes, self.rings[1]),
                                                        _NO_CAP))
        if cfg.depth_copula and self.rings is not None:  # per knot, over the layers: see _fit_depth_copula
            self._register_copula("depth", 2 * self.n_layers, self.n_layers)
            # not fitted, the map is skipped rather than applied as the identity: it bounds each ring's count to A
            # on the way, and the ring map, fitted before it, must see the ODE's counts as they are
            self.register_buffer("depth_fitted", torch.zeros((), dtype=torch.bool))
        if cfg.mode_rings and self.rings is not None:  # per knot, layer and inner ring: see _fit_mode_map
            self.register_buffer("mode_table", _identity_modes((_MAP_KNOTS, self.n_layers, cfg.mode_rings, 3,
                                                               self.rings[0])))
        if cfg.coherent_rings and self.rings is not None:  # per knot, inner ring and angular mode: see _fit_coherence
            self.register_buffer("core_gain", torch.zeros(_MAP_KNOTS, cfg.coherent_rings, self.rings[0]))
        if (cfg.mode_rings or cfg.coherent_rings) and self.rings is not None:
            self.register_buffer("mode_basis", angular_basis(self.rings[0]), persistent=False)
        self.register_buffer("loss_weight", self._loss_weights(cfg, tuple(sizes)), persistent=False)
        self.ema_velocity: ShapeVelocity | None = None
        if not with_velocity:
            return
        self.velocity = ShapeVelocity(spec, cfg, tuple(sizes), self.rings, cfg.fourier_rings)
        if cfg.ema > 0:
            self.ema_velocity = copy.deepcopy(self.velocity).requires_grad_(False)

    def _loss_weights(self, cfg: LayerFMConfig, sizes: tuple[int, ...]) -> Tensor:
        """Weights (W,) of the stage-2 numbers in the flow-matching loss, averaging 1: ``ring_weight`` for each
        layer's ring numbers (with ring shares), 1 for the rest."""
        if self.rings is None or cfg.ring_weight == 1.0:
            return torch.ones(self.stage2_width)
        w = torch.ones(self.n_layers, sizes[0])
        w[:, : self.per_ring * self.rings[1]] = cfg.ring_weight
        return (w / w.mean()).reshape(-1)

    def _check_options(self, cfg: LayerFMConfig) -> None:
        """ValueError, in one line naming the option and what it needs, for options this readout cannot take."""
        if cfg.occupancy == "count" and self.rings is None:
            raise ValueError("layer-fm occupancy='count' counts the hit cells of each ring: it needs ring shares "
                             "(a polar readout); use occupancy='none' here")
        if cfg.maps == "all" and self.rings is not None and cfg.cells == "share" and cfg.occupancy != "count":
            raise ValueError("layer-fm maps='all' maps the cells' shares, which needs occupancy='count' (without "
                             "counts the zero_share cut decides the hits, and the map moves it); use maps='rings'")
        if cfg.fourier_rings and (self.rings is None or not 0 < cfg.fourier_rings <= self.rings[1]):
            have = f"this readout has {self.rings[1]} rings" if self.rings else "this readout has no ring shares"
            raise ValueError(f"layer-fm fourier_rings={cfg.fourier_rings} sees that many inner rings as angular "
                             f"Fourier modes: it needs ring shares (a polar readout) and at most its rings; {have}")
        if cfg.layer_knots and (cfg.layer_knots < 2 or cfg.maps not in ("rings", "all") or self.rings is None):
            raise ValueError(f"layer-fm layer_knots={cfg.layer_knots} sets the ring map's knots in the layer energy: "
                             "it needs at least 2, maps='rings' or 'all' and ring shares (a polar readout); use 0 here")
        if cfg.mode_rings and (self.rings is None or cfg.maps not in ("rings", "all") or cfg.occupancy != "count"
                               or not 0 < cfg.mode_rings <= self.rings[1]):
            raise ValueError(f"layer-fm mode_rings={cfg.mode_rings} maps the angular modes of that many inner rings: "
                             "it needs ring shares (a polar readout) with at least that many rings, maps='rings' or "
                             "'all' and occupancy='count'; use 0 here")
        if cfg.coherent_rings and (self.rings is None or cfg.maps not in ("rings", "all")
                                   or not 0 < cfg.coherent_rings <= self.rings[1]):
            raise ValueError(f"layer-fm coherent_rings={cfg.coherent_rings} shapes that many inner rings by their "
                             "depth-summed angular pattern: it needs ring shares (a polar readout) with at least that "
                             "many rings and maps='rings' or 'all'; use 0 here")
        if cfg.share_copula and (self.rings is None or cfg.maps not in ("rings", "all")):
            raise ValueError("layer-fm share_copula=true couples the rings' shares to their layer's energy: it needs "
                             "ring shares (a polar readout) and maps='rings' or 'all'; use share_copula=false here")
        for name, what in (("count_copula", "couples the rings' hit counts to their layer's energy"),
                           ("hit_map", "caps each hit ring's energy per hit by its hit count"),
                           ("depth_copula", "couples the layers' hit counts through the depth")):
            if getattr(cfg, name) and (self.rings is None or cfg.maps not in ("rings", "all")
                                       or cfg.occupancy != "count"):
                raise ValueError(f"layer-fm {name}=true {what}: it needs ring shares (a polar readout), maps='rings' "
                                 f"or 'all' and occupancy='count'; use {name}=false here")
        if cfg.layer_copula and cfg.maps == "none":
            raise ValueError("layer-fm layer_copula=true links the layers' energies before the layer map: it needs "
                             "maps other than 'none'; use layer_copula=false here")
        if cfg.ring_weight <= 0:
            raise ValueError(f"layer-fm ring_weight={cfg.ring_weight} weighs the rings' numbers in the loss: it must "
                             "be positive")
        if cfg.align and self.rings is None:
            raise ValueError("layer-fm align=true turns each shower's angular bins: it needs ring shares (a polar "
                             "readout); use align=false here")
        if cfg.stencil and (self.rings is None or not cfg.head_dim or cfg.fourier_rings):
            raise ValueError("layer-fm stencil=true shows each cell's unit its neighbours on the polar grid: it needs "
                             "ring shares (a polar readout), head_dim > 0 and fourier_rings=0; use stencil=false here")

    def noise_dim(self) -> int:
        """Stage-1 latents (one per layer), with ``align`` the turn's number, then one per stage-2 number (V, or
        V + L x R with ring shares)."""
        return self.n_layers + int(self.config.align) + self.stage2_width

    def aligned(self, x: Tensor) -> Tensor:
        """Showers x (B, V) in the frame the model learns: with ``align``, each turned so that its angular dipole
        points into bin 0 (:func:`align_cells`); else x."""
        if not self.config.align or self.rings is None:
            return x
        return align_cells(x, self.n_layers, *self.rings)

    def place(self, x: Tensor, z: Tensor) -> Tensor:
        """Assembled showers x (B, V) from noise z (B, noise_dim): with ``align``, turned by the element of the
        dihedral group that z[:, L] draws (:func:`random_turn`); else x."""
        if not self.config.align or self.rings is None:
            return x
        return random_turn(x, self.n_layers, *self.rings, z[:, self.n_layers])

    def _velocity(self) -> ShapeVelocity:
        if "velocity" not in self._modules:
            raise RuntimeError("this layer-fm was built without the shape ODE's nets (with_velocity=False)")
        return self.velocity

    # -- ring shares (polar readouts) ------------------------------------------------------
    def stage2_features(self, x: Tensor, e: Tensor) -> Tensor:
        """Showers x (B, V) and layer fractions e (B, L) -> stage-2 numbers (B, W): per layer the voxels' logit
        shares (W = V), or with ring shares the R rings' logit shares of the layer, with occupancy="count" the R
        rings' dequantised log hit counts, then the A x R cells' (their logit share of the ring, or with
        cells="energy" log(cell / E_inc + noise)). A cell is hit above ``_CELL_CUT`` x noise (x is dequantised)."""
        if self.rings is None:
            return super().stage2_features(x, e)
        a, r = self.rings
        cells = x.reshape(-1, self.n_layers, a, r)
        ring = cells.sum(2)  # (B, L, R)
        ring_share = self._logit((ring / e.unsqueeze(2).clamp_min(_TINY)).clamp(0.0, 1.0))
        if self.config.cells == "energy":
            cell = torch.log(cells.reshape(-1, self.n_layers, a * r) + self.noise)
        else:
            cell = self._logit((cells / ring.unsqueeze(2).clamp_min(_TINY)).reshape(-1, self.n_layers, a * r)
                               .clamp(0.0, 1.0))
        parts = [ring_share, cell]
        if self.per_ring == 2:
            n = (cells > _CELL_CUT * self.noise).sum(2).to(x.dtype)
            # u in [0.05, 0.95]: float32 rounding of exp(log(1 + n + u)) - 1 cannot cross an integer
            parts.insert(1, torch.log1p(n + 0.05 + 0.9 * torch.rand_like(n)))
        return torch.cat(parts, dim=2).reshape(x.shape[0], -1)

    def stage2_inverse(self, y: Tensor, e: Tensor) -> Tensor:
        """Stage-2 numbers y (B, W), layer fractions e (B, L) -> showers x (B, V): shares below ``zero_share``
        (and with cells="energy", cells below ``_CELL_CUT`` x noise) are empty, the rest renormalised (rings to
        their layer, cells to their ring)."""
        if self.rings is None:
            return super().stage2_inverse(y, e)
        a, r = self.rings
        y = y.reshape(-1, self.n_layers, r * (a + self.per_ring))
        ring = self._expit(y[:, :, :r])
        cell = self._cell_values(y[:, :, self.per_ring * r :]).reshape(-1, self.n_layers, a, r)
        if self.per_ring == 2:
            ring, cell = self._keep_counted(ring, self._counts(y[:, :, r : 2 * r]), cell)
        else:
            ring = ring * (ring >= self.config.zero_share).to(ring.dtype)
        ring = ring / ring.sum(2, keepdim=True).clamp_min(_TINY)
        cell = cell / cell.sum(2, keepdim=True).clamp_min(_TINY)
        return (cell * (ring * e.unsqueeze(2)).unsqueeze(2)).reshape(y.shape[0], -1)

    def _cell_values(self, y: Tensor) -> Tensor:
        """The cells' numbers (..., n) -> their unnormalised weights in the ring (..., n), zero where empty by value;
        with occupancy="count" nothing is empty by value (the count decides) and every weight is positive."""
        if self.config.cells == "energy":
            cell = torch.exp(y.clamp(max=0.0))
            if self.per_ring == 2:
                return cell
            cell = cell - self.noise
            return cell * (cell >= _CELL_CUT * self.noise).to(cell.dtype)
        cell = self._expit(y)
        return cell if self.per_ring == 2 else cell * (cell >= self.config.zero_share).to(cell.dtype)

    def _counts(self, y: Tensor) -> Tensor:
        """Unstandardised count numbers log(1 + n + u) (...) -> hit counts n (...), float, n >= 0."""
        return torch.floor(torch.exp(y.clamp(max=20.0)) - 1.0).clamp_min(0.0)  # ONNX has no expm1

    def _keep_counted(self, ring: Tensor, n: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
        """occupancy="count": ring shares (B, L, R), hit counts n (B, L, R), cell weights (B, L, A, R) -> the
        shares with rings of no hit zeroed, the weights with all but each ring's n largest zeroed. A layer whose
        rings all count 0 keeps one hit in its largest ring: stage 1 gave it energy, which must land somewhere."""
        a = cell.shape[2]
        top = (ring >= ring.amax(2, keepdim=True)).to(n.dtype)
        none = (n.amax(2, keepdim=True) < 1).to(n.dtype)
        n = torch.maximum(n, top * none).clamp(max=float(a))
        ranked = cell.sort(dim=2, descending=True).values  # (B, L, A, R)
        kth = ranked.gather(2, (n - 1).clamp_min(0).long().unsqueeze(2))  # the n-th largest of each ring
        alive = (n >= 1).to(cell.dtype)
        return ring * alive, cell * (cell >= kth).to(cell.dtype) * alive.unsqueeze(2)

    def stage2_hits(self, hit: Tensor) -> Tensor:
        """Hit voxels (B, V) bool -> hit stage-2 numbers (B, W): with ring shares a ring (and its count) is hit
        when any of its cells is, a cell share when its cell is (a share below ``zero_share`` feeds no voxel)."""
        if self.rings is None:
            return super().stage2_hits(hit)
        a, r = self.rings
        cells = hit.reshape(-1, self.n_layers, a, r)
        rings = [cells.any(2)] * self.per_ring
        return torch.cat([*rings, cells.reshape(-1, self.n_layers, a * r)], dim=2).reshape(hit.shape[0], -1)

    def stage2_empty(self, empty: Tensor) -> Tensor:
        """0/1 mask (B, W) of stage-2 numbers to set to share 0 -> the numbers that are then empty. With ring
        shares: also each ring whose cells are all empty, so that its share of the layer goes to the layer's
        other rings (renormalised) rather than vanishing with the cells; and none of a layer's numbers when
        that would empty all its rings, so that every layer keeps stage 1's energy (the mask comes from a
        one-step student's hit heads, which are not trained to keep a layer alive). With occupancy="count" no
        cell is emptied by the mask: its ring's count chooses the ring's cells."""
        if self.rings is None:
            return super().stage2_empty(empty)
        a, r = self.rings
        k = self.per_ring * r
        per_layer = empty.reshape(-1, self.n_layers, k + a * r)
        all_cells = per_layer[:, :, k:].reshape(-1, self.n_layers, a, r).amin(2)  # (B, L, R): 1 where all empty
        rings = torch.maximum(per_layer[:, :, :r], all_cells)
        cells = per_layer[:, :, k:]
        if self.per_ring == 2:  # an empty count empties its ring, an empty ring has count 0, and counts pick cells
            rings, cells = torch.maximum(rings, per_layer[:, :, r:k]), torch.zeros_like(cells)
        keep = 1.0 - rings.amin(2, keepdim=True)  # (B, L, 1): 0 where every ring of the layer would be empty
        return (torch.cat([rings] * self.per_ring + [cells], dim=2) * keep).reshape(empty.shape)

    def stage2_dead(self, y: Tensor) -> Tensor:
        """As flow's (a logit share below ``zero_share``); with ring shares and cells="energy" a cell is dead
        below ``_CELL_CUT`` x noise; with occupancy="count" a ring and its count are dead at count 0 and no cell
        is dead by its value alone (its rank in the ring decides)."""
        dead = super().stage2_dead(y)
        if self.rings is None or (self.config.cells != "energy" and self.per_ring == 1):
            return dead
        a, r = self.rings
        k = self.per_ring * r
        per_layer, y = dead.reshape(-1, self.n_layers, k + a * r), y.reshape(-1, self.n_layers, k + a * r)
        cells = (self._cell_values(y[:, :, k:]) <= 0).to(y.dtype)
        rings = [per_layer[:, :, :r]]
        if self.per_ring == 2:
            rings = [(self._counts(y[:, :, r:k]) < 1).to(y.dtype)] * 2
        return torch.cat([*rings, cells], dim=2).reshape(dead.shape)

    def _layer_features(self, e: Tensor) -> Tensor:
        """Layer fractions e (B, L) -> standardised log fractions (B, L, 1), the tokens' energy feature."""
        return self.scale_e(torch.log(e.clamp_min(1e-12))).unsqueeze(2)

    # stage 2's standardisation at the showers' energies c[:, 0] (energy_knots > 0), else flow's
    def fit_scale2(self, f2: Tensor, c: Tensor | None) -> None:
        if isinstance(self.scale2, EnergyScaler):
            self.scale2.fit_once(f2, self._energy(c))
        else:
            self.scale2.fit_once(f2)

    def standardise2(self, f2: Tensor, c: Tensor | None) -> Tensor:
        return self.scale2(f2, self._energy(c)) if isinstance(self.scale2, EnergyScaler) else self.scale2(f2)

    def unstandardise2(self, g2: Tensor, c: Tensor | None, e: Tensor | None = None) -> Tensor:
        """Stage-2 numbers (B, W) from g2 (B, W); with conditions c and ring shares, the ring shares (maps "rings",
        "all") and the cells (cells="energy", maps "all") go through their calibrated maps (:meth:`calibrate`);
        e (B, L): the layer fractions, which the ring map reads with ``layer_knots``."""
        if isinstance(self.scale2, EnergyScaler):
            y = self.scale2.inverse(g2, self._energy(c))
        else:
            y = self.scale2.inverse(g2)
        if self.rings is None or c is None:
            return y
        for part, (_, mix) in _RING_COPULAS.items():
            if mix in self._buffers:
                y = self.couple_rings(y, c, e, part)
        if "ring_table" in self._buffers:
            y = self.map_rings(y, c, e)
        if "depth_mix" in self._buffers and bool(self.depth_fitted):
            y = self.couple_depth(y, c, e)
        if "hit_cap" in self._buffers:
            y = self.cap_hits(y, c, e)
        if self._has_cell_map:
            y = self.map_cells(y, c)
        return self.map_modes(y, c) if "mode_table" in self._buffers else y

    def map_rings(self, y: Tensor, c: Tensor, e: Tensor | None = None) -> Tensor:
        """Stage-2 numbers y (B, W) with every ring's logit share (and count) moved by the calibrated map of its
        layer and ring (tables interpolated at c[:, 0], and with ``layer_knots`` at the layer fractions e (B, L))."""
        k = self.per_ring * (self.rings[1] if self.rings else 1)
        tab = self._ring_tables_at(c, e, y.dtype)  # (B, L, k, 2, Q)
        y = y.reshape(y.shape[0], self.n_layers, -1)
        rings = _piecewise_linear(y[:, :, :k], tab[..., 0, :], tab[..., 1, :])
        return torch.cat([rings, y[:, :, k:]], dim=2).reshape(y.shape[0], -1)

    def _hit_shares(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Stage-2 numbers y (B, W) with ring counts -> each ring's share of its layer as assembled (B, L, R): zero
        where its count is, the rest renormalised over the layer; and its hit count n (B, L, R)."""
        r = (self.rings or (1, 1))[1]
        n = self._counts(self._count_numbers(y))
        share = self._expit(y.reshape(y.shape[0], self.n_layers, -1)[:, :, :r]) * (n >= 1).to(y.dtype)
        return share / share.sum(2, keepdim=True).clamp_min(_TINY), n

    def _hit_energies(self, y: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        """Stage-2 numbers y (B, W) with ring counts and layer fractions e (B, L) -> each ring's log energy per hit as
        assembled, log(share x e / n) (B, L, R), in units of E_inc (finite where n >= 1), and its hit count n."""
        share, n = self._hit_shares(y)
        return torch.log(share.clamp_min(_TINY) * e.unsqueeze(2) / n.clamp_min(1.0)), n

    def cap_hits(self, y: Tensor, c: Tensor, e: Tensor | None) -> Tensor:
        """Stage-2 numbers y (B, W) with the share of every hit ring lowered to the calibrated cap of its layer, ring
        and count class (``hit_map``; interpolated at c[:, 0]) where its energy per hit as assembled is above it,
        then the hit rings' shares renormalised over the layer, given the layer fractions e (B, L)."""
        if e is None:
            raise ValueError("this layer-fm caps its rings' energy per hit (hit_map): pass the layer fractions")
        r = (self.rings or (1, 1))[1]
        share, n = self._hit_shares(y)
        cap = self._tables_at(self.hit_cap, c, y.dtype)  # (B, L, classes, R)
        cap = cap.gather(2, _hit_class(n, self.hit_classes).unsqueeze(2)).squeeze(2)
        share = torch.minimum(share, torch.exp(cap) * n / e.unsqueeze(2).clamp_min(_TINY))
        share = share / share.sum(2, keepdim=True).clamp_min(_TINY)
        y = y.reshape(y.shape[0], self.n_layers, -1)
        rings = torch.where(n >= 1, self._logit(share), y[:, :, :r])
        return torch.cat([rings, y[:, :, r:]], dim=2).reshape(y.shape[0], -1)

    def _count_numbers(self, y: Tensor) -> Tensor:
        """The rings' count numbers log(1 + n + u) (B, L, R) of stage-2 numbers y (B, W) with occupancy="count"."""
        return y.reshape(y.shape[0], self.n_layers, -1)[:, :, self._ring_part("counts")]

    def _ring_part(self, part: str) -> slice:
        """Where a layer's ring numbers ``part`` ("shares": logit shares of the layer, "counts": count numbers) sit
        among its stage-2 numbers."""
        r = (self.rings or (1, 1))[1]
        return slice(0, r) if part == "shares" else slice(r, 2 * r)

    def _copula_values(self, y: Tensor, e: Tensor, part: str = "counts") -> Tensor:
        """Stage-2 numbers y (B, W) and layer fractions e (B, L) -> (B, L, 1 + R): each layer's log fraction, then
        its rings' numbers ``part`` (:meth:`_ring_part`)."""
        rings = y.reshape(y.shape[0], self.n_layers, -1)[:, :, self._ring_part(part)]
        return torch.cat([torch.log(e.clamp_min(_TINY)).unsqueeze(2), rings], dim=2)

    def couple_rings(self, y: Tensor, c: Tensor, e: Tensor | None, part: str) -> Tensor:
        """Stage-2 numbers y (B, W) with each layer's ring numbers ``part`` moved by its calibrated copula
        (``count_copula``, ``share_copula``; tables interpolated at c[:, 0]) given the layer fractions e (B, L)."""
        if e is None:
            raise ValueError("this layer-fm couples its ring numbers to the layer energies (a ring copula): pass them")
        tables, mixes = (self.get_buffer(name) for name in _RING_COPULAS[part])
        tab = self._tables_at(tables, c, y.dtype)  # (B, L, 1 + R, 2, Q)
        mix = self._tables_at(mixes, c, y.dtype)  # (B, L, 1 + R, 1 + R)
        # scores kept within _SCORE_BOUND of their table's ends: a value far beyond them (an untrained or badly
        # fitted net's, 1e4 units out) would otherwise be carried by the mix into every ring of its layer
        lo, hi = tab[..., 1, 0] - _SCORE_BOUND, tab[..., 1, -1] + _SCORE_BOUND  # (B, L, 1 + R)
        z = _piecewise_linear(self._copula_values(y, e, part), tab[..., 0, :], tab[..., 1, :])
        z = torch.einsum("blij,blj->bli", mix, torch.minimum(torch.maximum(z, lo), hi))
        z = torch.minimum(torch.maximum(z, lo), hi)[:, :, 1:]
        moved = _piecewise_linear(z, tab[:, :, 1:, 1, :], tab[:, :, 1:, 0, :])  # back: the model's own
        y, at = y.reshape(y.shape[0], self.n_layers, -1), self._ring_part(part)
        return torch.cat([y[:, :, : at.start], moved, y[:, :, at.stop :]], dim=2).reshape(y.shape[0], -1)

    def _copula_at(self, name: str, v: Tensor, c: Tensor) -> Tensor:
        """Values v (B, D) moved by the copula ``name`` ("layer", "depth": buffers name_in, name_mix, name_trend)
        interpolated at each shower's c[:, 0] (:func:`_gauss_copula`): its last D - k values (B, D - k)."""
        tab, mix, trend = (self._tables_at(b, c, v.dtype) for b in self._copula_buffers(name))
        return _gauss_copula(v, tab, mix, trend, c[:, 0].to(v.dtype))

    def _copula_buffers(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """The copula ``name``'s tables, mix and trends (buffers name_in, name_mix, name_trend)."""
        return self.get_buffer(f"{name}_in"), self.get_buffer(f"{name}_mix"), self.get_buffer(f"{name}_trend")

    def _register_copula(self, name: str, d: int, k: int) -> None:
        """Buffers of a copula ``name`` of d values, the first k kept, at the identity (:func:`_identity_copula`)."""
        for part, value in zip(("in", "mix", "trend"), _identity_copula(d, k), strict=True):
            self.register_buffer(f"{name}_{part}", value)

    def _reset_copula(self, name: str) -> None:
        """The copula ``name`` back to the identity."""
        tables, mix, _ = buffers = self._copula_buffers(name)
        for buffer, value in zip(buffers, _identity_copula(tables.shape[1], tables.shape[1] - mix.shape[1]),
                                 strict=True):
            buffer.copy_(value)

    def _depth_values(self, y: Tensor, e: Tensor) -> Tensor:
        """Stage-2 numbers y (B, W) with ring counts and layer fractions e (B, L) -> (B, 2 L): each layer's log
        fraction, then log(1 + its hits) with the hits summed over its hit rings as the count numbers hold them
        (n + u, u the dequantisation: continuous, so that normal scores need no ties broken)."""
        v = self._count_numbers(y)
        hits = ((torch.exp(v.clamp(max=20.0)) - 1.0) * (self._counts(v) >= 1).to(y.dtype)).sum(2)
        return torch.cat([torch.log(e.clamp_min(_TINY)), torch.log1p(hits)], dim=1)

    def couple_depth(self, y: Tensor, c: Tensor, e: Tensor | None) -> Tensor:
        """Stage-2 numbers y (B, W) with each layer's hit count moved by the calibrated depth copula
        (``depth_copula``; tables interpolated at c[:, 0]) given all layer fractions e (B, L): the change of the
        layer's total shared among its hit rings by m (A - m) / A (m: the ring's count), so that a full ring stays
        full and a ring of one hit nearly so, then what the bounds (0 to A hits) left over by each ring's room to
        its bound; a hit ring can empty (its share goes to the layer's other rings), an empty ring gets no hit (it
        has no share to give them); every other number as it is. Why by room: scaled in proportion to m, the full
        inner rings of a layer whose total went down lost hits (par04-ds2 60-min run, 40-100 GeV: layers with ring 0
        full 39 % -> 27 %, Geant4 43 %), where Geant4's busier layers add their hits at the edge of the core."""
        if e is None:
            raise ValueError("this layer-fm couples its layers' hit counts to the layer energies (depth_copula): "
                             "pass them")
        a, r = self.rings or (1, 1)
        t = self._copula_at("depth", self._depth_values(y, e), c)
        counts = self._count_numbers(y)
        hit = (self._counts(counts) >= 1).to(y.dtype)
        m = (torch.exp(counts.clamp(max=20.0)) - 1.0) * hit  # (B, L, R): hits of each hit ring, n + u
        total = (torch.exp(t) - 1.0).unsqueeze(2)  # (B, L, 1): the layer's new total
        m = _share_out(m, total, m * (a - m).clamp_min(0.0) / a, hit, a)
        # what the bounds left over, by each ring's room to its bound: exact wherever the total can be reached
        rest = total - m.sum(2, keepdim=True)
        m = _share_out(m, total, torch.where(rest > 0, a + 0.5 - m, m - 0.05) * hit, hit, a)
        moved = torch.log1p(m)
        y = y.reshape(y.shape[0], self.n_layers, -1)
        return torch.cat([y[:, :, :r], torch.where(hit > 0, moved, counts), y[:, :, 2 * r :]], dim=2).reshape(
            y.shape[0], -1)

    def _full_rings(self, y: Tensor) -> Tensor:
        """Stage-2 numbers y (B, W) with ring counts -> (B, L, mode_rings) bool: the inner rings whose count is
        all A cells."""
        return self._counts(self._count_numbers(y)[:, :, : self.config.mode_rings]) >= (self.rings or (1, 1))[0]

    def _modes(self, cells: Tensor, inverse: bool = False) -> Tensor:
        """Cells (B, L, A, k) -> their angular modes (B, L, k, A), or with ``inverse`` modes back to cells."""
        if inverse:
            return torch.einsum("ma,blkm->blak", self.mode_basis.to(cells.dtype), cells)
        return torch.einsum("ma,blak->blkm", self.mode_basis.to(cells.dtype), cells)

    def map_modes(self, y: Tensor, c: Tensor) -> Tensor:
        """Stage-2 numbers y (B, W) with the cells of each fully hit inner ring (``mode_rings``) moved by the
        calibrated map of its angular modes (tables interpolated at c[:, 0]); other rings as they are."""
        k = self.config.mode_rings
        tab = self._tables_at(self.mode_table, c, y.dtype)  # (B, L, k, 3, A)
        head, cells = split_cells(y, self.n_layers, *(self.rings or (1, 1)))
        u = self._modes(self._log_shares(cells[..., :k]))
        inner = self._from_log_shares(self._modes(tab[..., 1, :] + tab[..., 2, :] * (u - tab[..., 0, :]), inverse=True),
                                      cells[..., :k])
        inner = torch.where(self._full_rings(y).unsqueeze(2), inner, cells[..., :k])
        return join_cells(head, torch.cat([inner, cells[..., k:]], dim=3))

    def assemble(self, g1: Tensor, g2: Tensor, c: Tensor | None = None) -> Tensor:
        """Showers (B, V) = voxel / E_inc of the standardised stage variables, as :class:`CaloFlow`'s; with
        ``coherent_rings`` and conditions c (B, C) the inner rings then shaped by their depth-summed angular
        pattern (:meth:`cohere`), and the zero threshold applied again."""
        x = super().assemble(g1, g2, c)
        if c is None or "core_gain" not in self._buffers:
            return x
        x = self.cohere(x, c)
        return x * (x >= self.noise).to(x.dtype)

    def _summed_modes(self, cells: Tensor) -> Tensor:
        """Cells (B, L, A, k) of k rings -> the angular modes (B, A, k) (:func:`angular_basis`) of each ring's
        depth-summed pattern: its cells over the ring's mean over angle, minus 1 (0 for a ring empty in every layer)."""
        summed = cells.sum(1)  # (B, A, k)
        mean = summed.mean(1, keepdim=True)
        rel = torch.where(mean > 0, summed / mean.clamp_min(_TINY) - 1.0, torch.zeros_like(summed))
        return torch.einsum("ma,bak->bmk", self.mode_basis.to(rel.dtype), rel)

    def cohere(self, x: Tensor, c: Tensor) -> Tensor:
        """Showers x (B, V) with the cells of each of the ``coherent_rings`` inner rings, in every layer, multiplied
        by 1 + h (floored at ``_COHERENCE_FLOOR``), h (B, A, k) the ring's depth-summed pattern with each mode times
        its gain (``core_gain`` interpolated at c[:, 0]), then rescaled to the ring's energy in that layer: every
        ring keeps its energy in every layer, and its empty cells stay empty."""
        a, r = self.rings or (1, 1)
        k = self.config.coherent_rings
        gain = self._tables_at(self.core_gain, c, x.dtype).transpose(1, 2)  # (B, A, k)
        cells = x.reshape(x.shape[0], self.n_layers, a, r)
        inner = cells[..., :k]
        h = torch.einsum("ma,bmk->bak", self.mode_basis.to(x.dtype), self._summed_modes(inner) * gain)
        shaped = inner * (1.0 + h).clamp_min(_COHERENCE_FLOOR).unsqueeze(1)
        shaped = shaped * (inner.sum(2, keepdim=True) / shaped.sum(2, keepdim=True).clamp_min(_TINY))
        return torch.cat([shaped, cells[..., k:]], dim=3).reshape(x.shape)

    def _log_shares(self, cells: Tensor) -> Tensor:
        """Cell numbers (B, L, A, k) -> the log of each cell's share of its ring, (B, L, A, k). Why this space for
        the mode map: a fully hit core ring's cells all hold a fair share in Geant4, while the model's faint cells
        have logits far below, which dominated the spread of logit modes and not the shares' (par04-ds2, 60-min
        run, layer 8, 10-30 GeV: logit modes 1.5-2.2 times the data's spread, share power at k = 1 half of it)."""
        if self.config.cells == "energy":
            return cells - torch.logsumexp(cells, dim=2, keepdim=True)
        share = self._expit(cells).clamp_min(_TINY)
        return torch.log(share) - torch.log(share.sum(2, keepdim=True))

    def _from_log_shares(self, log_shares: Tensor, cells: Tensor) -> Tensor:
        """The inverse of :meth:`_log_shares` (renormalised over the ring), the ring's total taken from the cell
        numbers ``cells`` it replaces (cells="energy"; shares need none)."""
        if self.config.cells == "energy":
            return log_shares - torch.logsumexp(log_shares, dim=2, keepdim=True) + torch.logsumexp(cells, 2, True)
        return self._logit(torch.softmax(log_shares, dim=2))

    def _cells(self, y: Tensor) -> Tensor:
        """The cells' numbers (B, L, A, R) of stage-2 numbers y (B, W) with ring shares."""
        return split_cells(y, self.n_layers, *(self.rings or (1, 1)))[1]

    def map_cells(self, y: Tensor, c: Tensor) -> Tensor:
        """Stage-2 numbers y (B, W) with every cell moved by the calibrated monotone map of its layer and ring
        (tables interpolated at c[:, 0]); a ring's hottest cell stays hit, as its ring's share says it is."""
        tab = self._tables_at(self.cell_map, c, y.dtype).unsqueeze(2)  # (B, L, 1, R, 2, Q)
        head, cells = split_cells(y, self.n_layers, *(self.rings or (1, 1)))
        out = _piecewise_linear(cells, tab[..., 0, :], tab[..., 1, :])
        hot = (cells >= cells.amax(dim=2, keepdim=True)).to(y.dtype)
        alive = (math.log(2 * _CELL_CUT * self.noise) if self.config.cells == "energy" else
                 float(self._logit(torch.tensor(2 * self.config.zero_share))))
        return join_cells(head, out + hot * (out.clamp_min(alive) - out))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # runs saved before the calibration existed load uncalibrated (the identity map)
        for name in ("cell_map", "layer_table", "ring_table", "mode_table", "copula_in", "copula_mix", "hit_cap",
                     "depth_in", "depth_mix", "depth_fitted", "depth_trend", "layer_in", "layer_mix", "layer_trend",
                     "core_gain", "share_in", "share_mix"):
            if name in self._buffers and prefix + name not in state_dict:
                state_dict[prefix + name] = getattr(self, name).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def has_calibration(self) -> bool:
        """Whether :meth:`calibrate` fits anything: the cell map (ring shares with cells="energy"), the layer and
        ring maps (``maps``)."""
        return self._has_cell_map or self.config.maps != "none"

    @property
    def _has_cell_map(self) -> bool:
        return self.rings is not None and (self.config.cells == "energy" or self.config.maps == "all")

    @torch.no_grad()
    def calibrate(self, x: Tensor, c: Tensor, generator: torch.Generator | None = None) -> dict[str, float]:
        """:meth:`_calibrate`, reproducible from ``generator``: the data's count numbers are dequantised with torch's
        global random numbers (``stage2_features``, as in training), which are seeded from it meanwhile."""
        if generator is None:
            return self._calibrate(x, c, None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            return self._calibrate(x, c, generator)

    def _calibrate(self, x: Tensor, c: Tensor, generator: torch.Generator | None) -> dict[str, float]:
        """Fit the layer map, the ring map (``maps``), then the cells' map (cells="energy"), each on the model's
        showers after the maps before it, against showers x (B, V) = voxel / E_inc at conditions c (B, C);
        returns the fraction of layers hit in x, and of cells hit in x and in the model before and after.

        The layer and ring maps: per energy knot and layer (and ring), stage 1's log layer fraction (a ring's
        logit share of its layer) onto the data's at the same quantiles, with a step at the data's empty
        fraction (see ``maps``).

        Per energy knot (the showers nearest to it), layer and ring: the monotone piecewise-linear map that sends
        the model's cell numbers to the data's at the same quantiles: one at the minimum, the rest spread over
        the data's hit fraction at the top, so that the hit rate and the spectrum of the hits both come out as
        the data's while each cell keeps its rank. Why: the shape ODE smooths the step from "empty" to "hit", and
        the 60-min par04-ds2 runs put a flat spectrum of 0.03-3 MeV cells where Geant4 has single particles of
        ~7 MeV (hit fraction 10 % above Geant4's; sparsity alone told them apart, AUC 0.99 per layer). Only with
        cells="energy" (with ring shares), where a cell's number is its energy, comparable across showers.
        """
        out: dict[str, float] = {}
        x = self.aligned(x)  # the maps pool over angle, so the frame only matters for the hit fractions' bookkeeping
        xd = x.clamp_min(0.0) + self.noise * torch.rand(x.shape, generator=generator, device=x.device)
        if self.config.maps != "none":
            out.update(self._fit_layer_map(x, xd, c, generator))
        rings = "ring_table" in self._buffers
        if not (rings or self._has_cell_map):
            return out
        self._reset_shape_maps()
        # one draw of the ODE serves both maps: the cells' numbers do not depend on the ring map
        g1, g2 = self.sample_latents(self.draw_noise(x.shape[0], generator, c.dtype, c.device), c)
        before = float((self.assemble(g1, g2, c) > 0).float().mean())
        e_model, e_data = self.stage1_fractions(g1), self.layer_energies(xd)
        data = self.stage2_features(xd, e_data)
        for part, (_, mix) in _RING_COPULAS.items():
            if mix in self._buffers:
                out.update(self._fit_copula(data, self.unstandardise2(g2, c, e_model), c, (e_model, e_data), part))
        if "hit_cap" in self._buffers:
            out.update(self._fit_hit_cap(data, c, e_data))
        if rings:
            self._fit_ring_map(x, data, self.unstandardise2(g2, c, e_model), c, (e_model, e_data))
        if "depth_mix" in self._buffers:
            out.update(self._fit_depth_copula(data, self.unstandardise2(g2, c, e_model), c, (e_model, e_data)))
        if not self._has_cell_map:
            out.update(self._fit_mode_map(x, data, self.unstandardise2(g2, c, e_model), c))
            return {**out, **self._fit_coherence(x, self.assemble(g1, g2, c), c)}
        model = self._cells(self.unstandardise2(g2, c, e_model)).float()  # the cells' identity map now
        # a step at the data's empty fraction, as for layers and rings; cells="energy" alone keeps the measured
        # map of its introduction (no step: calibration_effect_par04-ds2.json)
        gap = 0.0 if self.config.cells == "energy" and self.per_ring == 1 else 1e-3
        if self.per_ring == 2:  # the cells a count leaves out sit at the floor, as the data's empty cells
            floor = math.log(self.noise) if self.config.cells == "energy" else float(self._logit(torch.zeros(())))
            model = torch.where((self.assemble(g1, g2, c) > 0).reshape(model.shape), model, floor)
        self._fit_tables(self.cell_map, model, self._cells(data).float(), (x > 0).reshape(model.shape), c, gap,
                         tail=True)
        out.update(self._fit_mode_map(x, data, self.unstandardise2(g2, c, e_model), c))
        out.update(self._fit_coherence(x, self.assemble(g1, g2, c), c))
        after = float((self.assemble(g1, g2, c) > 0).float().mean())
        return {**out, "hit_fraction_data": float((x > 0).float().mean()), "hit_fraction_model_before": before,
                "hit_fraction_model_after": after}

    def _reset_shape_maps(self) -> None:
        """Every map of the stage-2 numbers back to the identity (the layer map is refitted on its own)."""
        for name in ("ring_table", "cell_map"):
            if name in self._buffers:
                getattr(self, name).copy_(_identity_map(getattr(self, name).shape))
        for name in ("copula_in", "share_in"):
            if name in self._buffers:
                getattr(self, name).copy_(_identity_map(getattr(self, name).shape, *_WIDE))
        if "depth_mix" in self._buffers:
            self._reset_copula("depth")
            self.depth_fitted.fill_(False)
        for name in ("copula_mix", "share_mix"):
            if name in self._buffers:
                mix = self.get_buffer(name)
                mix.copy_(torch.eye(mix.shape[-1]).expand_as(mix))
        if "mode_table" in self._buffers:
            self.mode_table.copy_(_identity_modes(self.mode_table.shape))
        if "hit_cap" in self._buffers:
            self.hit_cap.fill_(_NO_CAP)
        if "core_gain" in self._buffers:
            self.core_gain.zero_()

    def _fit_layer_map(self, x: Tensor, xd: Tensor, c: Tensor, generator: torch.Generator | None
                       ) -> dict[str, float]:
        """The layer map (with ``layer_copula`` the copula first) from showers x (B, V), dequantised xd (B, V), at
        conditions c (B, C). Returns the fraction of layers hit in x; with the copula also the mean correlation of
        adjacent layers' log energy scores, model and data (layer_corr_{model,data}_1)."""
        out: dict[str, float] = {}
        self.layer_table.copy_(_identity_map(self.layer_table.shape))
        if "layer_mix" in self._buffers:  # the copula first, from the flow's own energies
            self._reset_copula("layer")
        z1 = self.draw_noise(x.shape[0], generator, c.dtype, c.device)[:, : self.n_layers]
        g1 = self.sample_stage1(z1, c)
        data = torch.log(self.layer_energies(xd).clamp_min(_TINY))
        if "layer_mix" in self._buffers:
            model = torch.log(self.stage1_fractions(g1).clamp_min(_TINY)).float()
            fits = self._fit_gauss_copula("layer", model, data.float(), c)
            for i, side in enumerate(("model", "data")) if fits else ():
                out[f"layer_corr_{side}_1"] = float(torch.cat([f[i].diagonal(1) for f in fits]).mean())
            g1 = self.sample_stage1(z1, c)
        model = torch.log(self.stage1_fractions(g1).clamp_min(_TINY))
        hit = self.layer_energies(x.clamp_min(0.0)) > 0
        self._fit_tables(self.layer_table, model.float()[..., None, None], data.float()[..., None, None],
                         hit[..., None, None], c, gap=1e-3)
        return {**out, "layer_hit_fraction_data": float(hit.float().mean())}

    def _fit_ring_map(self, x: Tensor, data: Tensor, y: Tensor, c: Tensor, e: tuple[Tensor, Tensor]) -> None:
        """The ring map from showers x (B, V), their stage-2 numbers ``data`` (B, W) and the model's ``y`` (B, W)
        at conditions c (B, C); e: the model's and the data's layer fractions (B, L) each. With occupancy="count"
        the counts' map comes first (every value, no step: the ODE's counts came out 7-9 % low on par04-ds2),
        then a ring the mapped count leaves empty is at the share floor, as an empty ring of the data."""
        a, r = self.rings or (1, 1)
        k = self.per_ring * r
        y, data = y.reshape(-1, self.n_layers, k + a * r), data.reshape(-1, self.n_layers, k + a * r)
        model = y[:, :, :r]
        if self.per_ring == 2:
            every = torch.ones(y.shape[0], self.n_layers, 1, r, dtype=torch.bool)
            self._fit_ring_tables(self.ring_table[:, :, r:], y[:, :, None, r:k].float(),
                                  data[:, :, None, r:k].float(), every, c, e)
            counts = self._counts(self.map_rings(y.reshape(y.shape[0], -1), c, e[0]).reshape(y.shape)[:, :, r:k])
            model = torch.where(counts >= 1, model, self._logit(torch.zeros(())))
        hit = (x > 0).reshape(-1, self.n_layers, a, r).any(2)
        self._fit_ring_tables(self.ring_table[:, :, :r], model.float()[:, :, None], data[:, :, None, :r].float(),
                              hit[:, :, None], c, e, gap=1e-3)

    def _fit_hit_cap(self, data: Tensor, c: Tensor, e: Tensor) -> dict[str, float]:
        """The hit caps (``hit_map``) from the data's stage-2 numbers (B, W) at conditions c (B, C) with layer
        fractions e (B, L): per energy knot (the showers nearest to it), layer, count class and ring, the
        ``_HIT_LEVEL`` quantile of the data's log energy per hit; where fewer than ``_MIN_GROUP`` rings are, the
        nearest fitted knot's, or no cap. Returns the fraction of (knot, layer, class, ring) fitted."""
        v, n = self._hit_energies(data, e)
        group = _hit_class(n, self.hit_classes)
        near = self._nearest_knot(c)
        fitted = torch.zeros(self.hit_cap.shape, dtype=torch.bool)
        for knot in range(_MAP_KNOTS):
            for j in range(self.hit_classes):
                inside = (group == j) & (n >= 1) & (near == knot)[:, None, None]  # (B, L, R)
                fitted[knot, :, j] = inside.sum(0) >= _MIN_GROUP
                cap = torch.where(inside, v.float(), torch.nan).nanquantile(_HIT_LEVEL, dim=0)  # NaN where none
                self.hit_cap[knot, :, j] = torch.where(fitted[knot, :, j], cap, self.hit_cap[knot, :, j])
        _from_nearest_fitted(self.hit_cap, fitted)
        return {"hit_cap_fitted_fraction": float(fitted.float().mean())}

    def _fit_copula(self, data: Tensor, y: Tensor, c: Tensor, e: tuple[Tensor, Tensor], part: str = "counts"
                    ) -> dict[str, float]:
        """The ring copula of ``part`` (``count_copula``: "counts", ``share_copula``: "shares") from the data's
        stage-2 numbers (B, W) and the model's y (B, W, before the ring map), drawn at the same conditions c (B, C),
        with the model's and the data's layer fractions e (B, L) each: per energy knot (the showers nearest to it)
        and layer, the model's marginal tables (its values at _MAP_POINTS quantiles -> their normal scores) and the
        mix L_data L_model^-1 of the normal scores' correlation matrices; a knot with fewer than ``_MIN_GROUP``
        showers takes the nearest fitted knot's. Returns, for "counts", the mean correlation of the layer energy's
        score with its rings' count scores, model and data, over the (knot, layer, ring) whose data correlation is
        above 0.3; for "shares", the mean correlation of ring 0's score with ring 1's, model and data."""
        model, real = self._copula_values(y, e[0], part).float(), self._copula_values(data, e[1], part).float()
        tables, mixes = (self.get_buffer(name) for name in _RING_COPULAS[part])
        near = self._nearest_knot(c)
        levels = torch.linspace(0.02, 0.98, _MAP_POINTS)
        fitted, corr_m, corr_d = [], [], []
        for knot in range(_MAP_KNOTS):
            sel = near == knot
            if int(sel.sum()) < _MIN_GROUP:
                continue
            xs = model[sel].quantile(levels, dim=0).permute(1, 2, 0)  # (L, 1 + R, Q)
            tables[knot] = torch.stack([xs, torch.special.ndtri(levels).expand_as(xs)], dim=2)
            scores = (_piecewise_linear(model[sel], xs, tables[knot, :, :, 1]), _normal_scores(real[sel]))
            (cm, lm), (cd, ld) = (_correlation_factor(z) for z in scores)
            mixes[knot] = ld @ torch.linalg.inv(lm)
            if part == "counts":  # the layer energy's links to its rings' counts, where the data's is strong
                strong = cd[:, 0, 1:] > 0.3
                corr_m.append(cm[:, 0, 1:][strong])
                corr_d.append(cd[:, 0, 1:][strong])
            else:  # ring 0's link to ring 1
                corr_m.append(cm[:, 1, 2])
                corr_d.append(cd[:, 1, 2])
            fitted.append(knot)
        done = torch.tensor([k in fitted for k in range(_MAP_KNOTS)])
        _from_nearest_fitted(tables, done)
        _from_nearest_fitted(mixes, done)
        if not fitted:
            return {}
        what = "energy_count" if part == "counts" else "ring0_ring1"
        key = "copula" if part == "counts" else "share_copula"
        return {f"{key}_knots_fitted": float(len(fitted)), f"{key}_{what}_corr_model": float(torch.cat(corr_m).mean()),
                f"{key}_{what}_corr_data": float(torch.cat(corr_d).mean())}

    def _fit_gauss_copula(self, name: str, model: Tensor, real: Tensor, c: Tensor
                          ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Fill the copula ``name``'s tables (K, D, 2, Q), mix (K, D - k, D) and trend (K, D, 4) in place from the
        model's and the data's values (n, D) each, drawn at the same conditions c (B, C): per energy knot (the
        showers nearest to it), the model's marginal tables (its quantiles at normal scores -2.5 to 2.5), each
        sample's scores' least-squares line in c0 (:func:`_gauss_copula`), and :func:`_conditional_mix` of the two
        samples' residual correlations, the first k values kept; a knot with fewer than ``_MIN_GROUP`` showers
        takes the nearest fitted knot's. Returns per fitted knot the model's and the data's residual correlation
        matrices (D, D) and the data's values (n_knot, D)."""
        out = tables, mix, trend = self._copula_buffers(name)
        keep = tables.shape[1] - mix.shape[1]
        near = self._nearest_knot(c)
        scores = torch.linspace(-_COPULA_SCORES, _COPULA_SCORES, _MAP_POINTS)
        fits, done = [], torch.zeros(_MAP_KNOTS, dtype=torch.bool)
        for knot in range(_MAP_KNOTS):
            sel = near == knot
            if int(sel.sum()) < _MIN_GROUP:
                continue
            xs = model[sel].quantile(torch.special.ndtr(scores), dim=0).T  # (D, Q)
            tables[knot] = torch.stack([xs, scores.expand_as(xs)], dim=1)
            c0 = c[sel, 0].float()
            (line, resid_m), (_, resid_d) = (_trend(z, c0 - c0.mean()) for z in (
                _piecewise_linear(model[sel], xs, tables[knot, :, 1]), _normal_scores(real[sel])))
            corr = [_correlation_factor(r.unsqueeze(1), _COPULA_SHRINK)[0][0] for r in (resid_m, resid_d)]
            mix[knot] = _conditional_mix(corr[0], corr[1], keep)
            # the model's line and residual spread: what sampling takes out before the mix and puts back after it
            trend[knot] = torch.cat([line, resid_m.std(0).clamp_min(1e-3)[:, None], c0.mean().expand(xs.shape[0], 1)],
                                    dim=1)
            fits.append((corr[0], corr[1], real[sel]))
            done[knot] = True
        for table in out:
            _from_nearest_fitted(table, done)
        return fits

    def _fit_depth_copula(self, data: Tensor, y: Tensor, c: Tensor, e: tuple[Tensor, Tensor]) -> dict[str, float]:
        """The depth copula (``depth_copula``, :meth:`_fit_gauss_copula` of the 2 L :meth:`_depth_values`, the L
        energies kept) from the data's stage-2 numbers (B, W) and the model's y (B, W, after the ring map) at the
        same conditions c (B, C), with the model's and the data's layer fractions e (B, L) each. Returns the mean
        correlation of a layer's count score with the count score of the layer 1 and 5 deeper
        (depth_count_corr_{model,data}_{1,5}), over the layers the data hits in more than half the showers."""
        n_layers = self.n_layers
        model, real = self._depth_values(y, e[0]).float(), self._depth_values(data, e[1]).float()
        fits = self._fit_gauss_copula("depth", model, real, c)
        self.depth_fitted.fill_(bool(fits))
        apart = [d for d in (1, 5) if d < n_layers]
        deeper: dict[str, list[Tensor]] = {f"{k}_{d}": [] for k in ("model", "data") for d in apart}
        for cm, cd, values in fits:
            busy = (values[:, n_layers:] > 0).float().mean(0) > 0.5
            for (k, corr), d in itertools.product((("model", cm), ("data", cd)), apart):
                deeper[f"{k}_{d}"].append(corr[n_layers:, n_layers:].diagonal(d)[busy[: n_layers - d]])
        return {"depth_knots_fitted": float(len(fits)), **{f"depth_count_corr_{k}": float(torch.cat(v).mean())
                                                             for k, v in deeper.items() if v and torch.cat(v).numel()}}

    def _fit_mode_map(self, x: Tensor, data: Tensor, y: Tensor, c: Tensor) -> dict[str, float]:
        """The mode map (``mode_rings``) from showers x (B, V), their stage-2 numbers ``data`` (B, W) and the
        model's ``y`` (B, W, after the ring map) at conditions c (B, C): per energy knot (the showers nearest to
        it), layer and inner ring, each angular mode's mean and std over the showers whose ring is fully hit, in
        the data and in the model; a (knot, layer, ring) with fewer than ``_MIN_GROUP`` of either stays the
        identity. Returns the fraction of (knot, layer, ring) fitted and the mean spread ratio per frequency (nothing
        without ``mode_rings``). Fitted last, on the cells after their quantile map, which is monotone per cell but
        not linear and would otherwise undo much of the modes' spread."""
        if "mode_table" not in self._buffers:
            return {}
        a, r = self.rings or (1, 1)
        k = self.config.mode_rings
        full = {"model": self._full_rings(y), "data": (x > 0).reshape(-1, self.n_layers, a, r)[..., :k].all(2)}
        modes = {"model": self._modes(self._log_shares(self._cells(y)[..., :k].float())),
                 "data": self._modes(self._log_shares(self._cells(data)[..., :k].float()))}
        near = self._nearest_knot(c)
        fitted = torch.zeros(_MAP_KNOTS, self.n_layers, k, dtype=torch.bool)
        for knot in range(_MAP_KNOTS):
            moments, enough = [], torch.ones(self.n_layers, k, dtype=torch.bool)
            for side in ("model", "data"):
                w = (full[side] & (near == knot)[:, None, None]).float()  # (B, L, k)
                n = w.sum(0)
                mean = (w[..., None] * modes[side]).sum(0) / n.clamp_min(1.0)[..., None]
                var = (w[..., None] * (modes[side] - mean) ** 2).sum(0) / (n - 1.0).clamp_min(1.0)[..., None]
                moments.append((mean, var.sqrt()))
                enough &= n >= _MIN_GROUP
            (m_model, s_model), (m_data, s_data) = moments
            ratio = (s_data / s_model.clamp_min(1e-6)).clamp(0.01, 100.0)  # only a degenerate sample reaches these
            table = torch.stack([m_model, m_data, ratio], dim=2)  # (L, k, 3, A)
            self.mode_table[knot] = torch.where(enough[..., None, None], table, self.mode_table[knot])
            fitted[knot] = enough
        ratios = self.mode_table[..., 2, :][fitted]  # (n fitted, A)
        _from_nearest_fitted(self.mode_table, fitted)  # a knot too few showers reach takes the nearest fitted one's
        out = {"mode_map_fitted_fraction": float(fitted.float().mean())}
        if ratios.numel():  # modes 2k - 1 and 2k are frequency k's cos and sin
            freq = _angular_frequencies(a)
            for f in sorted(set(freq)):
                out[f"mode_map_spread_ratio_k{f}"] = float(ratios[:, [j for j in range(a) if freq[j] == f]].mean())
        return out

    def _fit_coherence(self, x: Tensor, model: Tensor, c: Tensor) -> dict[str, float]:
        """The gains of ``coherent_rings`` (``core_gain``, (K, k, A)) from showers x (B, V) and the model's showers
        (B, V; every other map applied) at conditions c (B, C): per energy knot (the showers nearest to it) and
        inner ring, a gain b_f per angular frequency f (cos and sin alike) such that the model's mean power at f of
        the depth-summed pattern, after :meth:`cohere`, is the data's: b <- (1 + b) sqrt(P_data / P_model) - 1,
        ``_COHERENCE_ROUNDS`` times. A knot with fewer than ``_MIN_GROUP`` showers takes the nearest fitted one's
        gains. Returns the fitted fraction of knots and ring 0's gains at frequencies 1-3, averaged over knots."""
        if "core_gain" not in self._buffers:
            return {}
        a, r = self.rings or (1, 1)
        k = self.config.coherent_rings
        freq = torch.tensor(_angular_frequencies(a), device=x.device)
        near = torch.nn.functional.one_hot(self._nearest_knot(c), _MAP_KNOTS).float()
        per_f = torch.nn.functional.one_hot(freq).float()  # (A, F)
        fitted = near.sum(0) >= _MIN_GROUP  # (K,)

        def power(showers: Tensor) -> Tensor:  # mean power per knot, frequency and ring (K, F, k)
            q = self._summed_modes(showers.float().reshape(-1, self.n_layers, a, r)[..., :k]) ** 2
            return torch.einsum("bn,bak,af->nfk", near, q, per_f) / near.sum(0).clamp_min(1.0)[:, None, None]

        target, gain = power(x), torch.zeros(_MAP_KNOTS, per_f.shape[1], k, device=x.device)
        moving = (torch.arange(per_f.shape[1], device=x.device) > 0)[:, None]  # frequency 0: the pattern's mean, 0
        for _ in range(_COHERENCE_ROUNDS):
            self.core_gain.copy_(gain[:, freq, :].transpose(1, 2))
            ratio = (target / power(self.cohere(model, c)).clamp_min(1e-12)).sqrt()
            gain = ((1.0 + gain) * ratio - 1.0).clamp(*_COHERENCE_GAIN)
            gain = torch.where(fitted[:, None, None] & moving, gain, 0.0)
        self.core_gain.copy_(gain[:, freq, :].transpose(1, 2))
        _from_nearest_fitted(self.core_gain, fitted)
        kept = gain[fitted][..., 0]  # (fitted knots, F): ring 0
        out = {"coherence_fitted_fraction": float(fitted.float().mean())}
        out.update({f"coherence_gain_k{f}": float(kept[:, f].mean()) for f in range(1, min(4, kept.shape[1]))
                    if kept.numel()})
        return out

    def _fit_ring_tables(self, tables: Tensor, model: Tensor, data: Tensor, hit: Tensor, c: Tensor,
                         e: tuple[Tensor, Tensor], gap: float = 0.0) -> None:
        """As :meth:`_fit_tables` for the ring map; with ``layer_knots`` K also per knot of each layer's energy,
        the model's showers grouped by the model's layer fraction e[0] (B, L), the data's by theirs e[1]. A
        (knot, knot, layer) cell with fewer than ``_MIN_GROUP`` showers of either keeps its incident-energy knot's
        map over all layer energies."""
        k2 = self.config.layer_knots
        if not k2:
            return self._fit_tables(tables, model, data, hit, c, gap)
        marginal = tables[::k2].clone()
        self._fit_tables(marginal, model, data, hit, c, gap)
        near = self._nearest_knot(c)
        groups = [hat_weights(self._layer_features(f)[..., 0].reshape(-1).float(), self.layer_knots).argmax(1)
                  .reshape(f.shape) for f in e]  # (B, L) each: the nearest layer-energy knot
        for k in range(tables.shape[0]):
            tables[k] = marginal[k // k2]
            for layer in range(self.n_layers):
                sm, sd = ((near == k // k2) & (g[:, layer] == k % k2) for g in groups)
                if min(int(sm.sum()), int(sd.sum())) < _MIN_GROUP:
                    continue
                rate = hit[sd, layer : layer + 1].float().mean(dim=(0, 2))
                tables[k, layer] = _quantile_tables(model[sm, layer : layer + 1], data[sd, layer : layer + 1],
                                                    rate, gap)[0]
        return None

    def _ring_tables_at(self, c: Tensor, e: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The ring map's tables (B, L, per_ring x R, 2, Q) interpolated at each shower's c[:, 0] and, with
        ``layer_knots``, bilinearly at each layer's fraction e (B, L) as well."""
        if not self.config.layer_knots:
            return self._tables_at(self.ring_table, c, dtype)
        if e is None:
            raise ValueError("this layer-fm maps its rings by layer energy (layer_knots > 0): pass the layer fractions")
        w = self._map_weights(c, e, dtype)  # (B, L, K1 x K2)
        tables = self.ring_table.to(dtype)
        out = torch.einsum("blk,klm->blm", w, tables.reshape(tables.shape[0], self.n_layers, -1))
        return out.reshape(-1, *tables.shape[1:])

    def _map_weights(self, c: Tensor, e: Tensor, dtype: torch.dtype) -> Tensor:
        """Bilinear weights (B, L, K1 x K2) over (incident-energy knot, layer-energy knot) of conditions c (B, C)
        and layer fractions e (B, L), each row summing to 1."""
        w1 = hat_weights(c[:, 0].to(dtype), self.map_knots.to(dtype))  # (B, K1)
        f = self._layer_features(e)[..., 0].to(dtype)  # (B, L)
        w2 = hat_weights(f.reshape(-1), self.layer_knots.to(dtype)).reshape(*f.shape, -1)  # (B, L, K2)
        return (w1[:, None, :, None] * w2[:, :, None, :]).reshape(*f.shape, -1)

    def _nearest_knot(self, c: Tensor) -> Tensor:
        """The incident-energy knot (B,) nearest each shower's c[:, 0]: the group whose showers a map's fit pools."""
        return hat_weights(c[:, 0].float(), self.map_knots).argmax(1)

    def _tables_at(self, tables: Tensor, c: Tensor, dtype: torch.dtype) -> Tensor:
        """Map tables (K, ...) of the energy knots -> (B, ...) interpolated at each shower's c[:, 0]."""
        w = hat_weights(c[:, 0].to(dtype), self.map_knots.to(dtype))
        return (w @ tables.to(dtype).reshape(_MAP_KNOTS, -1)).reshape(-1, *tables.shape[1:])

    def _fit_tables(self, tables: Tensor, model: Tensor, data: Tensor, hit: Tensor, c: Tensor, gap: float = 0.0,
                    tail: bool = False) -> None:
        """Fill ``tables`` (K, L, R, 2, Q) in place: per energy knot (the showers nearest to it) the quantile map
        of the model's values (n, L, A, R) onto the data's (n, L, A, R), hit (n, L, A, R) bool (``tail``: see
        :func:`_hit_quantiles`); knots with fewer than 20 showers take the nearest fitted knot's tables."""
        near = self._nearest_knot(c)
        fitted = torch.tensor([int((near == k).sum()) >= 20 for k in range(_MAP_KNOTS)])
        for k in fitted.nonzero().flatten().tolist():
            rate = hit[near == k].float().mean(dim=(0, 2))  # (L, R)
            tables[k] = _quantile_tables(model[near == k], data[near == k], rate, gap, tail)
        _from_nearest_fitted(tables, fitted)

    def sample_stage1(self, z1: Tensor, c: Tensor) -> Tensor:
        """As flow's; with ``maps`` each layer's energy then goes through its calibrated map (identity until
        :meth:`calibrate`), so that the shape ODE, the assembly and a staged student all see the mapped ones."""
        g1 = super().sample_stage1(z1, c)
        if self.config.maps == "none":
            return g1
        tab = self._tables_at(self.layer_table, c, g1.dtype)[:, :, 0]  # (B, L, 2, Q)
        v = torch.log(self.stage1_fractions(g1).clamp_min(_TINY))
        if "layer_mix" in self._buffers:
            v = self._copula_at("layer", v, c)
        return self.scale1(self.stage1_features(torch.exp(_piecewise_linear(v, tab[:, :, 0], tab[:, :, 1]))))

    @staticmethod
    def _energy(c: Tensor | None) -> Tensor:
        if c is None:
            raise ValueError("this layer-fm scales stage 2 by energy (energy_knots > 0): pass the conditions c")
        return c[:, 0]

    def loss(self, x: Tensor, c: Tensor) -> dict[str, Tensor]:
        """``nll_stage1 + fm_stage2`` on x (B, V) = voxel / E_inc, c (B, C)."""
        e, g1, g2 = self.stage_variables(self.aligned(x), c)
        if self.training:
            self.scale_e.fit_once(torch.log(e.clamp_min(1e-12)))
        with float32(x.device):  # stage 1 is a flow; precision="bf16" speeds up the shape ODE's net only
            nll1 = -self.flow1(c).log_prob(g1).mean()
        z = torch.randn_like(g2)
        t = draw_t(g2.shape[0], g2, self.config.t_dist)
        v = self._velocity()((1 - t) * z + t * g2, t, c, g1, self._layer_features(e))
        fm = (self.loss_weight * (v - (g2 - z)) ** 2).mean()
        return {"loss": nll1 + fm, "nll_stage1": nll1, "fm_stage2": fm}

    # -- training ----------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)]

    def configure_schedulers(
        self, optimizers: list[torch.optim.Optimizer], total_steps: int
    ) -> list[torch.optim.lr_scheduler.LRScheduler]:
        return warmup_cosine(optimizers, self.config.warmup, total_steps)

    def training_step(self, x: Tensor, c: Tensor, optimizers: list[torch.optim.Optimizer],
                      step: int) -> dict[str, float]:
        logs = super().training_step(x, c, optimizers, step)
        if self.ema_velocity is not None:
            ema_update(self.ema_velocity, self.velocity, self.config.ema, step)
        return logs

    # -- sampling ----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, c: Tensor, generator: torch.Generator | None = None, steps: int | None = None,
               method: str | None = None) -> Tensor:
        """Showers (B, V) = voxel / E_inc for conditions c (B, C); ``steps``/``method``: the shape ODE's
        solver (default: the config's)."""
        z = self.draw_noise(c.shape[0], generator, c.dtype, c.device)
        return self.sample_from_noise(z, c, steps=steps, method=method)

    def sample_from_noise(self, z: Tensor, c: Tensor, steps: int | None = None, method: str | None = None,
                          **options: Any) -> Tensor:
        """Showers (B, V) from noise z (B, noise_dim): flow 1 inverts z[:, :L], the shape ODE carries the last W,
        and with ``align`` z[:, L] turns the result."""
        if options:
            raise ValueError(f"model 'layer-fm' takes steps and method, got {sorted(options)}")
        return self.place(self.assemble(*self.sample_latents(z, c, steps, method), c), z)

    def sample_latents(self, z: Tensor, c: Tensor, steps: int | None = None,
                       method: str | None = None) -> tuple[Tensor, Tensor]:
        """Noise z (B, noise_dim) -> standardised g1 (B, L) by flow 1 from z[:, :L] and g2 (B, W) by the shape ODE
        from the last W."""
        z1, z2 = z[:, : self.n_layers], z[:, -self.stage2_width :]
        g1 = self.sample_stage1(z1, c)
        feats = self._layer_features(self.stage1_fractions(g1))
        n_steps, how = int(steps if steps is not None else self.config.steps), str(method or self.config.method)
        # the voxel head holds (B, V, head_dim) activations: 13 GB for 10^4 showers of par04-ds3, so the ODE
        # runs on row blocks of at most 2^26 of them in eager mode (a traced export keeps one graph for any B)
        per_row = z2.shape[1] * max(self.config.head_dim, 1)
        rows = z2.shape[0] if torch.jit.is_tracing() else max(1, self.block_elements // per_row)
        blocks = [self._shape_ode(z2[i : i + rows], c[i : i + rows], g1[i : i + rows], feats[i : i + rows], n_steps,
                                  how) for i in range(0, z2.shape[0], rows)]
        return g1, torch.cat(blocks)

    def _shape_ode(self, z2: Tensor, c: Tensor, g1: Tensor, feats: Tensor, steps: int, method: str) -> Tensor:
        """The shape ODE from noise z2 (B, V) at t = 0 to standardised g2 (B, V) at t = 1 (EMA net if any)."""
        net = self.ema_velocity if self.ema_velocity is not None else self._velocity()
        return odeint(lambda g, t: net(g, t, c, g1, feats), z2, steps, method)
