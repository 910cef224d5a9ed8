"""CaloGAN: one generator per readout layer, chained front to back (Paganini et al.).

Design after Paganini, de Oliveira, Nachman, arXiv:1712.10321 (and 1705.02355):

- **One generator per readout layer.** All share the latent z and the conditions c;
  generator ``l`` also receives the showers it will sit behind. CaloGAN passes the
  previous layer through a learned "attentional" transformation; the simplest faithful
  form used here is to concatenate the previous layers' generated output (on a
  ``log1p(x / x_scale)`` scale, so that its many small values are not lost) to the
  generator's input. With ``condition_on="all"`` every earlier layer is passed; with
  ``"previous"`` only the immediately preceding layer plus the log energies of all
  earlier layers (for geometries with many layers, where "all" grows like V).
- **Positive output.** Each layer ends in a ReLU (CaloGAN's choice: it produces exact
  zeros, i.e. the sparsity of real showers). By default (``output_param="factorised"``)
  the layer is written as energy x shape: ``x_l = softplus(b_l) / L * relu(a_l) / sum relu(a_l)``
  with ``b_l`` one extra output of the layer's network. The plain form
  (``"direct"``: ``x_l = relu(a_l) / cells``) needs pre-activations of O(cells) x the
  energy share of a cell, which Adam at lr 1e-4 reaches only after many thousand steps
  (on toy Belle II showers the direct form still held 0.36 E_inc instead of 0.92 after
  300 generator updates); the factorisation, the CaloFlow split of energy and shape
  (arXiv:2106.05285) inside one generator, puts the layer energy under one O(1) output.
- **Discriminator** per-layer feature extractors (MLPs here, LAGAN-style convolutions in
  the paper), the per-layer and total energies as explicit features, and *minibatch
  discrimination* (Salimans et al., arXiv:1606.03498) on both the learned features and
  the energies, so that the critic can see a collapsed (too uniform) batch.
- **Energy conservation.** CaloGAN penalises generated showers whose total energy
  exceeds the nominal incident energy. This needs energies in physical units, hence the
  model-space assumption below; the term is ``energy_weight * mean(relu(sum_v x_v - energy_cap))``.

Model space: ``default_transform = ("per_incident",)``, i.e. ``x = voxel energy / E_inc``
(dimensionless, >= 0). Then ``sum_v x_v = E_visible / E_inc`` directly, which the energy
term caps at ``energy_cap`` (1.0: a shower cannot deposit more than it brought; for
sampling calorimeters that score the active layers only the sum is ~ the sampling
fraction and the cap rarely binds, which is harmless). Do not combine this model with a
``log``/``standardize`` transform: the positive output and the energy term assume the
plain ratio.

Loss: WGAN-GP by default (``loss="wgan-gp"``; Gulrajani et al., arXiv:1704.00028),
because it trains more stably than the original GAN loss at the small batches and step
counts affordable on CPU. ``loss="bce"`` gives the paper's non-saturating GAN loss
(set ``n_critic=1`` with it; see :meth:`~.wgan.AdversarialShowerModel._adversarial_losses`).
The critic, and its gradient penalty, work on ``h = log1p(x / x_scale)``: in raw ``x`` most
voxels are ~1e-4-1e-3 and a 1-Lipschitz critic could barely tell showers apart. With
minibatch discrimination the critic's output depends on the whole batch; the penalty is
then taken on the batch of interpolates as a whole, which is the usual practical compromise.

With one layer (``belle2-ecl-5x5``) the model is a single conditional generator with a
ReLU output, the energy-conservation term and a minibatch-discrimination critic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import register
from .base import ModelConfig, ModelSpec
from .wgan import AdversarialConfig, AdversarialShowerModel, mlp

__all__ = ["CaloGAN", "CaloGANConfig", "CaloGANCritic", "CaloGANGenerator", "MinibatchDiscrimination"]

_ENERGY_EPS = 1e-6  # floor of per-layer energy fractions before the log (avoids log 0 for empty layers)


class MinibatchDiscrimination(nn.Module):
    """Minibatch discrimination features (Salimans et al., arXiv:1606.03498, section 3.2).

    ``f (B, A) -> M = f T (B, K, D)``; for each kernel k, ``o_k(i) = sum_{j != i} exp(-|M_ik - M_jk|^2)``.
    Output (B, K): how many other samples in the batch look like sample i.

    The paper's kernel uses the L1 distance; the squared L2 distance is used here
    because it is a batched matrix product (``|a|^2 + |b|^2 - 2 a.b``), whereas the L1 form
    materialises a (B, B, K, D) tensor whose double backward (needed by the gradient
    penalty) took ~70 % of a CaloGAN training step on CPU at batch 256.
    """

    def __init__(self, in_features: int, n_kernels: int, kernel_dim: int) -> None:
        super().__init__()
        self.n_kernels, self.kernel_dim = n_kernels, kernel_dim
        self.T = nn.Parameter(torch.randn(in_features, n_kernels * kernel_dim) / math.sqrt(in_features))

    def forward(self, f: Tensor) -> Tensor:
        m = (f @ self.T).view(-1, self.n_kernels, self.kernel_dim).transpose(0, 1)  # (K, B, D)
        sq = (m * m).sum(-1)  # (K, B)
        # explicit form, not torch.cdist: the gradient penalty needs a double backward
        dist = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2.0 * (m @ m.transpose(1, 2))).clamp_min(0.0)  # (K, B, B)
        return (torch.exp(-dist).sum(2) - 1.0).transpose(0, 1)  # (B, K); minus the self term exp(0) = 1


class CaloGANGenerator(nn.Module):
    """Chain of per-layer generators.

    ``forward(z (B, Z), c (B, C)) -> x (B, V)``, x = voxel / E_inc, >= 0, layers in
    geometry order.
    """

    def __init__(
        self,
        latent_dim: int,
        cond_dim: int,
        layer_sizes: tuple[int, ...],
        hidden: int,
        depth: int,
        condition_on: str,
        x_scale: float,
        output_activation: str,
        output_param: str,
    ) -> None:
        super().__init__()
        self.layer_sizes, self.condition_on, self.x_scale = layer_sizes, condition_on, x_scale
        if output_activation not in ("relu", "softplus"):
            raise ValueError(f"output_activation must be 'relu' or 'softplus', got {output_activation!r}")
        if output_param not in ("factorised", "direct"):
            raise ValueError(f"output_param must be 'factorised' or 'direct', got {output_param!r}")
        self.output_activation, self.output_param = output_activation, output_param
        n_out = 1 if output_param == "factorised" else 0  # the layer-energy logit
        nets = []
        for i, size in enumerate(layer_sizes):
            if i == 0:
                extra = 0
            elif condition_on == "all":
                extra = sum(layer_sizes[:i])
            else:
                extra = layer_sizes[i - 1] + i  # previous layer's cells + log energy of every earlier layer
            nets.append(mlp(latent_dim + cond_dim + extra, hidden, depth, size + n_out))
        self.layers = nn.ModuleList(nets)

    def _layer_output(self, a: Tensor, size: int) -> Tensor:
        """Network output (B, size [+1]) -> layer voxels (B, size), fractions of E_inc, >= 0."""
        n_layers = len(self.layer_sizes)
        if self.output_param == "direct":
            act = F.relu(a) if self.output_activation == "relu" else F.softplus(a)
            return act / size
        shape = F.relu(a[:, :size]) if self.output_activation == "relu" else F.softplus(a[:, :size])
        shape = shape / (shape.sum(1, keepdim=True) + 1e-12)  # a layer whose cells all switch off stays empty
        energy = F.softplus(a[:, size:]) / n_layers  # ~0.69 / L per layer at initialisation
        return shape * energy

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        outs: list[Tensor] = []
        log_e: list[Tensor] = []
        for i, (net, size) in enumerate(zip(self.layers, self.layer_sizes, strict=True)):
            inp = [z, c]
            if i > 0:
                if self.condition_on == "all":
                    inp.append(torch.log1p(torch.cat(outs, dim=1) / self.x_scale))
                else:
                    inp += [torch.log1p(outs[-1] / self.x_scale), torch.stack(log_e, dim=1)]
            x_l = self._layer_output(net(torch.cat(inp, dim=1)), size)
            outs.append(x_l)
            log_e.append(torch.log(x_l.sum(1) + _ENERGY_EPS))
        return torch.cat(outs, dim=1)


class CaloGANCritic(nn.Module):
    """Discriminator on ``h = log1p(x / x_scale)`` (B, V) and conditions c (B, C) -> scores (B,).

    Features: per-layer MLP codes, log per-layer energies and log total energy (as
    fractions of E_inc, recomputed from h), the conditions, and minibatch-discrimination
    features of the codes and of the energies.
    """

    def __init__(
        self,
        layer_sizes: tuple[int, ...],
        cond_dim: int,
        hidden: int,
        depth: int,
        layer_dim: int,
        mbd_kernels: int,
        mbd_dim: int,
        x_scale: float,
    ) -> None:
        super().__init__()
        self.layer_sizes, self.x_scale = layer_sizes, x_scale
        L = len(layer_sizes)
        self.encoders = nn.ModuleList(mlp(size, hidden, 1, layer_dim) for size in layer_sizes)
        n_feat = L * layer_dim
        self.mbd_features = MinibatchDiscrimination(n_feat, mbd_kernels, mbd_dim)
        self.mbd_energies = MinibatchDiscrimination(L + 1, mbd_kernels, mbd_dim)
        self.head = mlp(n_feat + L + 1 + cond_dim + 2 * mbd_kernels, hidden, depth, 1)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        parts = torch.split(h, list(self.layer_sizes), dim=1)
        codes = torch.cat([F.leaky_relu(enc(p), 0.2) for enc, p in zip(self.encoders, parts, strict=True)], dim=1)
        e_layers = torch.stack([(self.x_scale * torch.expm1(p)).sum(1) for p in parts], dim=1)  # E_l / E_inc
        energies = torch.log(torch.cat([e_layers, e_layers.sum(1, keepdim=True)], dim=1) + _ENERGY_EPS)
        feats = [codes, energies, c, self.mbd_features(codes), self.mbd_energies(energies)]
        return self.head(torch.cat(feats, dim=1)).squeeze(1)


@dataclass(frozen=True)
class CaloGANConfig(AdversarialConfig):
    """Hyper-parameters of :class:`CaloGAN` (with those of :class:`~.wgan.AdversarialConfig`).

    Attributes:
        hidden, depth: width and number of hidden layers of each per-layer generator MLP and of the
            critic head (``n_hidden`` before).
        condition_on: ``"all"`` earlier layers, ``"previous"`` layer only, or ``"auto"``
            (``"all"`` when V <= ``all_max_voxels``).
        output_activation: ``"relu"`` (exact zeros, as CaloGAN) or ``"softplus"``.
        output_param: ``"factorised"`` (layer energy x normalised activations) or
            ``"direct"`` (activations / cells), see the module docstring.
        x_scale: voxel fraction of E_inc at which ``log1p(x / x_scale)`` turns from linear to log
            (critic input and inter-layer conditioning).
        layer_dim: width of each per-layer critic code (``layer_features`` before).
        mbd_kernels, mbd_dim: minibatch-discrimination kernels K and their dimension D.
        energy_weight, energy_cap: energy-conservation penalty weight and the cap on
            ``sum(x) = E_vis / E_inc``.
    """

    hidden: int = 256
    depth: int = 2
    condition_on: str = "auto"
    all_max_voxels: int = 4096
    output_activation: str = "relu"
    output_param: str = "factorised"
    x_scale: float = 1e-3
    layer_dim: int = 32
    mbd_kernels: int = 16
    mbd_dim: int = 8
    energy_weight: float = 1.0
    energy_cap: float = 1.0

    renamed: ClassVar[dict[str, str]] = {**AdversarialConfig.renamed, "n_hidden": "depth",
                                         "layer_features": "layer_dim"}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        **AdversarialConfig.choices,
        "condition_on": ("auto", "all", "previous"),
        "output_activation": ("relu", "softplus"),
        "output_param": ("factorised", "direct"),
    }


@register
class CaloGAN(AdversarialShowerModel):
    """CaloGAN ("calogan"): per-layer chained generators, minibatch-discrimination critic.

    Shapes: x (B, V) = voxel energy / E_inc (>= 0); c (B, C), column 0 the
    standardised log incident energy.

    Hyper-parameters: :class:`CaloGANConfig`.

    Optimizers: ``[generator Adam, critic Adam]``.
    """

    name: ClassVar[str] = "calogan"
    default_transform: ClassVar[tuple[str, ...]] = ("per_incident",)
    config_class: ClassVar[type[ModelConfig]] = CaloGANConfig
    config: CaloGANConfig

    def __init__(self, spec: ModelSpec, config: CaloGANConfig | Mapping[str, Any] | None = None,
                 **overrides: Any) -> None:
        super().__init__(spec, config, **overrides)
        cfg = self.config
        cond_on = cfg.condition_on
        if cond_on == "auto":
            cond_on = "all" if spec.n_voxels <= cfg.all_max_voxels else "previous"
        self.x_scale = cfg.x_scale
        self.generator = CaloGANGenerator(
            self.latent_dim,
            spec.cond_dim,
            spec.layer_sizes,
            cfg.hidden,
            cfg.depth,
            cond_on,
            self.x_scale,
            cfg.output_activation,
            cfg.output_param,
        )
        self.critic = CaloGANCritic(
            spec.layer_sizes,
            spec.cond_dim,
            cfg.hidden,
            cfg.depth,
            cfg.layer_dim,
            cfg.mbd_kernels,
            cfg.mbd_dim,
            self.x_scale,
        )

    def generate(self, z: Tensor, c: Tensor) -> Tensor:
        return self.generator(z, c)

    def critic_input(self, x: Tensor) -> Tensor:
        # clamp: real data after other preprocessing could hold tiny negative values
        return torch.log1p(x.clamp_min(0.0) / self.x_scale)

    def critic_score(self, h: Tensor, c: Tensor) -> Tensor:
        return self.critic(h, c)

    def energy_excess(self, x: Tensor) -> Tensor:
        """Per-shower excess ``relu(sum_v x_v - energy_cap)`` (B,), in units of E_inc."""
        return F.relu(x.sum(1) - self.config.energy_cap)

    def generator_penalties(self, fake: Tensor, c: Tensor, step: int) -> dict[str, Tensor]:
        """The energy-conservation term ``energy_weight * mean(relu(sum(x) - energy_cap))``."""
        return {"energy_conservation": self.config.energy_weight * self.energy_excess(fake).mean()}
