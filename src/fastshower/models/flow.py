"""Two-stage conditional normalizing flow in the manner of CaloFlow (Krause & Shih).

CaloFlow (arXiv:2106.05285) splits ``p(shower | E_inc)`` into

- **flow 1**: ``p(layer energies | conditions)``, a small flow on L numbers;
- **flow 2**: ``p(shower normalised per layer | layer energies, conditions)``.

The split lets flow 1 learn the energy response (linearity, resolution, the
layer-energy correlations) exactly, while flow 2 only learns shapes.

Model space and internal variables. ``default_transform = ("per_incident",)``: the
model receives ``x = voxel energy / E_inc`` (B, V), >= 0, and does its own
decomposition (so it must not be combined with ``log``/``logit``/``standardize``):

1. *Dequantisation* (CaloFlow section 3): ``x += U(0, noise)`` per voxel during training,
   so that the many exact zeros do not make the density degenerate. ``noise`` is in
   units of E_inc (1e-6 = 1 keV at 1 GeV). On sampling every voxel below ``noise`` is set
   to zero, which removes the noise again.
2. *Stage-1 variables* (CaloFlow's u-variables), from the layer fractions
   ``e_l = sum_{v in l} x_v`` (E_l / E_inc):
   ``f_0 = log(sum_l e_l)`` and ``f_i = logit(alpha + (1 - 2 alpha) u_{i-1})`` for
   ``i = 1..L-1``, with ``u_i = e_i / sum_{j >= i} e_j`` in [0, 1]. The map is invertible
   given ``sum_l e_l``; a one-layer detector has only ``f_0``.
3. *Stage-2 variables*: ``y_v = logit(alpha + (1 - 2 alpha) x_v / e_l(v))``, the voxel's
   share of its layer, in logit space.

Both sets are standardised by buffers fitted on the first training batch (a
data-dependent initialisation, as ActNorm in Glow, arXiv:1807.03039) and saved in the
state dict. The stage-2 flow is conditioned on the conditions and the standardised
stage-1 variables (the true ones in training, the sampled ones in generation).

Sampling runs flow 1, then flow 2, clips the voxel shares to [0, 1], renormalises each
layer to sum to 1 (as CaloFlow does, since the shares of one layer are constrained to
sum to 1), multiplies by the sampled layer fractions and applies the zero threshold.

Loss: ``nll_stage1 + nll_stage2`` (mean per shower), trained jointly with one Adam. The
NLLs are of the flows' internal standardised variables; they differ from the NLL of
``x`` by a Jacobian that does not depend on the parameters, so the gradients are those
of the NLL of x.

Flows: zuko's neural spline flows (rational-quadratic splines, Durkan et al.,
arXiv:1906.04032). Flow 1 is fully autoregressive (as CaloFlow's MADE-based flows);
flow 2 defaults to coupling (``stage2_passes=2``: sampling takes one pass instead of V,
the reason CaloINN, arXiv:2305.11934, uses couplings) with random permutations between
transforms; ``stage2_passes=None`` gives CaloFlow's fully autoregressive flow 2 (same
training cost, but sampling 504 voxels then took 35 s for 16 showers on one CPU thread,
against 0.13 s with couplings).

Size limit: flow 2 models all V voxels jointly; above ``max_voxels`` (1000) the model
raises a clear error (use ``flow-matching`` for large detectors).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import zuko
from torch import Tensor, nn

from . import register
from .base import ModelConfig, ModelSpec, ShowerModel, float32

__all__ = ["CaloFlow", "FeatureScaler", "FlowConfig"]

_TINY = 1e-12  # guards divisions by an empty layer's energy


class FeatureScaler(nn.Module):
    """Per-feature standardisation ``(f - mean) / std`` fitted once on a batch.

    Buffers ``mean`` (D,), ``std`` (D,) and ``fitted`` (scalar bool) live in the
    state dict, so a loaded model does not refit. Under torch.distributed the moments
    are averaged over the ranks' first batches.
    """

    mean: Tensor
    std: Tensor
    fitted: Tensor

    def __init__(self, dim: int, min_std: float = 1e-2) -> None:
        super().__init__()
        self.min_std = min_std
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit_once(self, f: Tensor) -> None:
        """Fit on f (B, D) unless already fitted; a floor on std keeps constant features finite."""
        if bool(self.fitted) or f.shape[0] < 2:
            return
        moments = torch.stack([f.mean(0), (f * f).mean(0)])
        if dist.is_available() and dist.is_initialized():
            # every rank fits on its own first batch: average, so that all ranks hold one scaler
            dist.all_reduce(moments)
            moments /= dist.get_world_size()
        mean, sq = moments
        self.mean.copy_(mean)
        self.std.copy_((sq - mean * mean).clamp_min(0.0).sqrt().clamp_min(self.min_std))
        self.fitted.fill_(True)

    def forward(self, f: Tensor) -> Tensor:
        return (f - self.mean) / self.std

    def inverse(self, g: Tensor) -> Tensor:
        return g * self.std + self.mean


@dataclass(frozen=True)
class FlowConfig(ModelConfig):
    """Hyper-parameters of :class:`CaloFlow`.

    Attributes:
        stage1_transforms, stage1_hidden, stage1_bins: flow 1 (L features, autoregressive): spline
            transforms, width of their two hidden layers, spline bins.
        stage2_transforms, stage2_hidden, stage2_bins, stage2_passes: the same for flow 2 (V features);
            passes 2 = coupling, None = fully autoregressive.
        noise: dequantisation noise amplitude and zero threshold, fraction of E_inc.
        zero_share: on sampling, a voxel whose share of its layer is below this is empty (0: off).
        alpha: logit regulariser (CaloFlow's 1e-6), dimensionless.
        max_voxels: largest V accepted.
        lr, grad_clip: Adam learning rate and gradient-norm clip of the default step.
    """

    stage1_transforms: int = 4
    stage1_hidden: int = 64
    stage1_bins: int = 8
    stage2_transforms: int = 6
    stage2_hidden: int = 256
    stage2_bins: int = 8
    stage2_passes: int | None = 2
    noise: float = 1e-6
    alpha: float = 1e-6
    max_voxels: int = 1000
    zero_share: float = 0.0
    lr: float = 5e-4
    grad_clip: float | None = 5.0


@register
class CaloFlow(ShowerModel):
    """CaloFlow-style two-stage conditional flow ("flow").

    Shapes: x (B, V) = voxel energy / E_inc (>= 0); c (B, C), column 0 the
    standardised log incident energy.

    Hyper-parameters: :class:`FlowConfig`.

    Optimizers: one Adam over both flows (the base class's ``configure_optimizers``).
    """

    # (V,) readout-layer index of each voxel: no longer read (the layer bounds serve, see per_voxel), kept
    # because every saved flow and staged-student checkpoint holds it
    layer_index: Tensor

    name: ClassVar[str] = "flow"
    default_transform: ClassVar[tuple[str, ...]] = ("per_incident",)
    config_class: ClassVar[type[ModelConfig]] = FlowConfig
    config: FlowConfig

    def __init__(self, spec: ModelSpec, config: ModelConfig | Mapping[str, Any] | None = None, *,
                 with_stage2: bool = True, **overrides: Any) -> None:
        """``with_stage2=False`` builds stage 1 and the scalers only: the part of a trained flow that a
        staged one-step student (:class:`fastshower.models.onestep.OneStep`) keeps, without flow 2's weights."""
        super().__init__(spec, config, **overrides)
        cfg = self.config
        V, L, C = spec.n_voxels, len(spec.layer_sizes), spec.cond_dim
        if with_stage2 and V > cfg.max_voxels:  # flow 2 is what grows with V; stage 1 alone is L numbers
            raise ValueError(
                f"model 'flow' supports up to {cfg.max_voxels} voxels (hparam max_voxels), "
                f"this detector has {V}: flow 2 models all voxels jointly and its cost grows like V^2; "
                "use 'layer-fm' (the same stage 1, shapes by flow matching over layer tokens) for large detectors"
            )
        if min(spec.layer_sizes) < 2:
            raise ValueError("model 'flow' needs at least 2 voxels per layer (a 1-voxel layer has no shape to learn)")
        self.noise, self.alpha = cfg.noise, cfg.alpha
        self.n_layers = L
        self.stage2_width = V  # stage-2 numbers per shower: one logit share per voxel
        self.register_buffer("layer_index", torch.repeat_interleave(torch.arange(L), torch.tensor(spec.layer_sizes)))
        # [start, stop) voxel range of each layer: layers are contiguous blocks in the voxel order
        ends = torch.cumsum(torch.tensor(spec.layer_sizes), 0).tolist()
        self._layer_bounds: tuple[tuple[int, int], ...] = tuple(zip([0, *ends[:-1]], ends, strict=True))
        self.scale1 = FeatureScaler(L)
        self.scale2 = FeatureScaler(V)
        h1 = cfg.stage1_hidden
        self.flow1 = zuko.flows.NSF(L, C, bins=cfg.stage1_bins, transforms=cfg.stage1_transforms,
                                    hidden_features=(h1, h1))
        self.flow2: zuko.flows.NSF | None = None
        if not with_stage2:
            return
        passes, h2 = cfg.stage2_passes, cfg.stage2_hidden
        self.flow2 = zuko.flows.NSF(
            V,
            C + L,
            bins=cfg.stage2_bins,
            transforms=cfg.stage2_transforms,
            passes=passes,
            # with couplings a fixed alternation would only ever split the voxels into the same two halves
            randperm=passes is not None,
            hidden_features=(h2, h2),
        )

    # -- the two-stage decomposition ---------------------------------------------------
    def _logit(self, p: Tensor) -> Tensor:
        q = self.alpha + (1 - 2 * self.alpha) * p
        return torch.log(q) - torch.log1p(-q)

    def _expit(self, y: Tensor) -> Tensor:
        return ((torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)).clamp(0.0, 1.0)

    def layer_energies(self, x: Tensor) -> Tensor:
        """Layer fractions e_l = E_l / E_inc (B, L) of showers x (B, V) (any units in, the same units out).

        A sum over each layer's contiguous block of voxels. Not ``index_add`` over ``layer_index``:
        torch's ONNX exporter turns index_add into a ScatterND that *overwrites* repeated indices
        instead of adding them (it warns "does not support duplicated values in 'index'"), so an
        exported graph kept only the last voxel of each layer. Slices and sums export exactly.
        """
        return torch.stack([x[:, a:b].sum(1) for a, b in self._layer_bounds], dim=1)

    def stage1_features(self, e: Tensor) -> Tensor:
        """Layer fractions e (B, L), > 0 -> stage-1 variables (B, L): log total, then logit u's."""
        # sum_{j >= i} e_j summed from the back: total - cumsum(e) + e cancels to noise in float32 where the tail
        # holds less than ~1e-6 of the total (the last layers of a 45-layer shower)
        remaining = torch.flip(torch.cumsum(torch.flip(e, [1]), 1), [1])
        total = remaining[:, :1]
        u = (e[:, :-1] / remaining[:, :-1].clamp_min(_TINY)).clamp(0.0, 1.0)
        return torch.cat([torch.log(total.clamp_min(_TINY)), self._logit(u)], dim=1)

    def stage1_inverse(self, f: Tensor) -> Tensor:
        """Stage-1 variables (B, L) -> layer fractions (B, L), >= 0."""
        remaining = torch.exp(f[:, 0])
        u, rest = self._expit(f[:, 1:]), self._expit(-f[:, 1:])  # rest = 1 - u, without cancellation
        out = []
        for i in range(self.n_layers - 1):
            out.append(u[:, i] * remaining)
            # a product, not remaining - e_i: the difference lost all float32 digits in the last layers, and
            # the exported graph and torch then drew different showers from the same noise (par04-ds2, 45 layers)
            remaining = remaining * rest[:, i]
        out.append(remaining)
        return torch.stack(out, dim=1)

    def stage1_fractions(self, g1: Tensor) -> Tensor:
        """Standardised stage-1 variables g1 (B, L) (what flow 1 draws) -> layer fractions (B, L), >= 0."""
        return self.stage1_inverse(self.scale1.inverse(g1))

    def stage2_features(self, x: Tensor, e: Tensor) -> Tensor:
        """Showers x (B, V) and their layer fractions e (B, L) -> logit voxel shares (B, V)."""
        share = x / self.per_voxel(e).clamp_min(_TINY)
        return self._logit(share.clamp(0.0, 1.0))

    def stage2_inverse(self, y: Tensor, e: Tensor) -> Tensor:
        """Logit shares y (B, V) and layer fractions e (B, L) -> showers x (B, V), layers renormalised."""
        share = self._expit(y)
        if self.config.zero_share > 0:
            # an empty voxel's latent sits at the logit floor (share ~ alpha): a generated one lands near it,
            # a little above; below the cut it is empty before the layer is renormalised
            share = share * (share >= self.config.zero_share).to(share.dtype)
        factor = e / self.layer_energies(share).clamp_min(_TINY)  # (B, L): layer energy over share sum
        return share * self.per_voxel(factor)

    def stage2_hits(self, hit: Tensor) -> Tensor:
        """Hit voxels (B, V) bool -> hit stage-2 numbers (B, V): here one per voxel, the same mask (a model
        whose stage-2 numbers are not one per voxel maps the mask onto them)."""
        return hit

    def stage2_empty(self, empty: Tensor) -> Tensor:
        """0/1 mask (B, V) of stage-2 numbers set to share 0 -> the numbers that are then empty: here the same
        (a voxel's share feeds only that voxel)."""
        return empty

    def stage2_dead(self, y: Tensor) -> Tensor:
        """0/1 mask (B, V) of the unstandardised stage-2 numbers y (B, V) that :meth:`stage2_inverse` leaves
        empty by their value alone: logit shares below ``zero_share``."""
        return (self._expit(y) < self.config.zero_share).to(y.dtype)

    def per_voxel(self, e: Tensor) -> Tensor:
        """Per-layer values e (B, L) -> (B, V), each voxel given its layer's value.

        Expanded slices, not ``e[:, layer_index]``: the Gather that indexing exports to cost ONNX Runtime
        3.9 us per 504-voxel shower on one thread, against 0.3 us for this.
        """
        return torch.cat([e[:, i : i + 1].expand(-1, b - a) for i, (a, b) in enumerate(self._layer_bounds)], dim=1)

    # -- protocol ------------------------------------------------------------------------
    def stage_variables(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Showers x (B, V) = voxel / E_inc (conditions c (B, C), for a stage-2 scaling that depends on them)
        -> dequantised layer fractions e (B, L) and standardised stage variables g1 (B, L), g2 (B, V); in
        training the scalers are fitted on the first call."""
        x = self.dequantise(x)
        e = self.layer_energies(x)
        f2 = self.stage2_features(x, e)
        if self.training:
            self.fit_scale2(f2, c)
        return e, self.stage1_variables(e), self.standardise2(f2, c)

    def stage1_variables(self, e: Tensor) -> Tensor:
        """Layer fractions e (B, L) -> standardised stage-1 variables g1 (B, L); in training the scaler is
        fitted on the first call."""
        f1 = self.stage1_features(e)
        if self.training:
            self.scale1.fit_once(f1)
        return self.scale1(f1)

    def dequantise(self, x: Tensor) -> Tensor:
        """Showers x (B, V) = voxel / E_inc with ``U(0, noise)`` added per voxel (CaloFlow's dequantisation)."""
        return x.clamp_min(0.0) + self.noise * torch.rand_like(x)

    # stage 2's standardisation; flow's ignores the conditions, layer-fm's may scale by energy
    def fit_scale2(self, f2: Tensor, c: Tensor | None) -> None:
        self.scale2.fit_once(f2)

    def standardise2(self, f2: Tensor, c: Tensor | None) -> Tensor:
        return self.scale2(f2)

    def unstandardise2(self, g2: Tensor, c: Tensor | None, e: Tensor | None = None) -> Tensor:
        """Stage-2 numbers (B, W) from g2 (B, W); layer-fm's maps also read the conditions c and layer fractions e."""
        return self.scale2.inverse(g2)

    def loss(self, x: Tensor, c: Tensor) -> dict[str, Tensor]:
        """``nll_stage1 + nll_stage2`` (mean per shower) on x (B, V) = voxel / E_inc, c (B, C)."""
        with float32(x.device):  # both stages are flows: precision="bf16" leaves them in float32
            _, g1, g2 = self.stage_variables(x)
            nll1 = -self.flow1(c).log_prob(g1).mean()
            nll2 = -self._flow2()(torch.cat([c, g1], dim=1)).log_prob(g2).mean()
        return {"loss": nll1 + nll2, "nll_stage1": nll1, "nll_stage2": nll2}

    @torch.no_grad()
    def sample(self, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Showers (B, V) = voxel / E_inc for conditions c (B, C): flow 1, then flow 2."""
        return self.sample_from_noise(self.draw_noise(c.shape[0], generator, c.dtype, c.device), c)

    def noise_dim(self) -> int:
        """Stage-1 latents (one per layer) followed by stage-2 latents (one per voxel)."""
        return self.n_layers + self.spec.n_voxels

    def sample_from_noise(self, z: Tensor, c: Tensor, **options: Any) -> Tensor:
        """Showers (B, V) from noise z (B, L + V): flow 1 inverts z[:, :L], flow 2 inverts z[:, L:]."""
        if options:
            raise ValueError(f"model 'flow' takes no sampling options, got {sorted(options)}")
        g1, g2 = self.sample_latents(z, c)
        return self.assemble(g1, g2)

    def _flow2(self) -> zuko.flows.NSF:
        if self.flow2 is None:
            raise RuntimeError("this CaloFlow was built without stage 2 (with_stage2=False)")
        return self.flow2

    def sample_stage1(self, z1: Tensor, c: Tensor) -> Tensor:
        """Standardised stage-1 variables g1 (B, L) from stage-1 noise z1 (B, L), conditions c (B, C)."""
        return self.flow1(c).transform.inv(z1)

    def sample_latents(self, z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """Noise z (B, L + V) -> standardised stage variables g1 (B, L) and g2 (B, V) (logit voxel shares)."""
        z1, z2 = z[:, : self.n_layers], z[:, self.n_layers :]
        g1 = self.sample_stage1(z1, c)
        return g1, self._flow2()(torch.cat([c, g1], dim=1)).transform.inv(z2)

    def place(self, x: Tensor, z: Tensor) -> Tensor:
        """Assembled showers x (B, V) placed by their noise z (B, noise_dim): the identity here; layer-fm's
        ``align`` turns them (a staged student calls this after its teacher's assembly, as the teacher does)."""
        return x

    def assemble(self, g1: Tensor, g2: Tensor, c: Tensor | None = None) -> Tensor:
        """Standardised stage variables g1 (B, L), g2 (B, V) -> showers (B, V) = voxel / E_inc.

        Layer fractions from g1, voxel shares from g2 renormalised per layer, then the zero threshold. ``c``
        (B, C): the conditions, for a stage-2 scaling that depends on them (:meth:`unstandardise2`).
        """
        e = self.stage1_fractions(g1)
        x = self.stage2_inverse(self.unstandardise2(g2, c, e), e)
        # remove the dequantisation noise: everything below its amplitude is an empty voxel (a 0/1 mask
        # rather than where(..., zeros_like): the latter costs ONNX Runtime 10x more)
        return x * (x >= self.noise).to(x.dtype)

