"""CaloGAN: one generator per readout layer, chained front to back (Paganini et al.).

Design after Paganini, de Oliveira, Nachman, arXiv:1712.10321 (and 1705.02355):

- **One generator per readout layer.** All share the latent z and the conditions c;
  generator ``l`` also receives the showers it will sit behind (``condition_on="all"``: every
  earlier layer, on a ``log1p(x / x_scale)`` scale; ``"previous"``: the preceding layer plus the
  log energies of all earlier layers, for geometries with many layers). With ``attention`` (the
  default) each layer also gets CaloGAN's in-painting attention: a per-cell blend, learned per
  shower, of its own cells and a learned map of the previous layer's shape.
- **Energies first** (``output_param="energies"``, the default): an energy network draws
  ``E_tot / E_inc = energy_cap * (1 - leak)`` and the layer shares, and each layer's network only
  the layer's shape. CaloGAN's published calorimeter scores absorber + active energy, so
  ``E_tot / E_inc`` is 0.997 with a per-mille width (calogan-3layer, Geant4): a sum over 504
  independently drawn cells cannot hit that, a generated leak can. The energy-conservation term
  then holds by construction (it stays, for the other parametrisations).
  ``energies="likelihood"`` draws the layer energies from stage 1 of :mod:`~.flow` (CaloFlow's flow on
  the L layer fractions, fitted by maximum likelihood in the same step) in place of the adversarial
  energy network, and the critic then only has the shapes to teach: on calogan-3layer gamma the
  adversarial energy network put a median 5.4 % of the energy into layer 0 where Geant4 has 13.1 %
  (a photon converts at a random depth, and that broad, skewed split is what a GAN drops first).
- **Positive output.** Each layer ends in a ReLU (CaloGAN's choice: it produces exact
  zeros, i.e. the sparsity of real showers). By default (``output_param="factorised"``)
  the layer is written as energy x shape: ``x_l = softplus(b_l) / L * relu(a_l) / sum relu(a_l)``
  with ``b_l`` one extra output of the layer's network. The plain form
  (``"direct"``: ``x_l = relu(a_l) / cells``) needs pre-activations of O(cells) x the
  energy share of a cell, which Adam at lr 1e-4 reaches only after many thousand steps
  (on toy Belle II showers the direct form still held 0.36 E_inc instead of 0.92 after
  300 generator updates); the factorisation, the CaloFlow split of energy and shape
  (arXiv:2106.05285) inside one generator, puts the layer energy under one O(1) output.
  ``output_activation="gated"`` with ``cell_noise`` goes one step further within a layer: each cell is
  ``relu(gate + gain * noise) * magnitude``, the magnitudes a softmax over log outputs, the noise one
  Gaussian per cell; whether a cell is hit and how much it holds are separate outputs, started at the
  real showers' per-cell hit rates and mean log shares. On calogan-3layer (10k showers, 12 CPU-min) that
  took the sparsities from 0.13-0.45 to <= 0.07 and 13 / 12 of the paper's 16 observables to 15 / 15; with
  the energies undequantised (:meth:`CaloGAN.undequantise`) and ``ema`` (the adversarial base's weight
  average) all 16 for both particles (docs/model_quality.md).
- **Discriminator** per-layer feature extractors (MLPs here, LAGAN-style convolutions and
  locally connected layers in the paper: with 3x96, 12x12 and 12x6 cells a dense layer, which
  holds a locally connected one as a special case, costs little on CPU), the paper's observables
  as explicit features (:func:`shower_features`: leak, layer shares, sparsity, centres and widths
  per layer; as CaloGAN's discriminator, which computes the layer energies and sparsities), and
  *minibatch discrimination* (Salimans et al., arXiv:1606.03498) on both the learned features and
  those observables, so that the critic can see a collapsed (too uniform) batch.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import register
from .base import ModelConfig, ModelSpec, float32
from .flow import CaloFlow
from .wgan import AdversarialConfig, AdversarialShowerModel, mlp

__all__ = ["CaloGAN", "CaloGANConfig", "CaloGANCritic", "CaloGANGenerator", "MinibatchDiscrimination",
           "shower_features"]

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


def _gate_init(frac: Tensor) -> Tensor:
    """``"gated"`` output biases (2 size,) from real layer shapes frac (B, size) (cell / layer energy): the gates
    at ``Phi^-1`` of each cell's hit rate (unit noise then hits it as often), the log magnitudes at its mean
    log share when hit (cells never hit: 2 below the smallest)."""
    hit = frac > 0
    gates = torch.special.ndtri(hit.float().mean(0).clamp(0.002, 0.998))
    n_hit = hit.sum(0)
    log_mag = torch.where(hit, torch.log(frac.clamp_min(1e-30)), 0.0).sum(0) / n_hit.clamp_min(1)
    seen = n_hit > 0
    floor = log_mag[seen].min() - 2.0 if bool(seen.any()) else log_mag.new_zeros(())
    return torch.cat([gates, torch.where(seen, log_mag, floor)])


class CaloGANGenerator(nn.Module):
    """Chain of per-layer generators.

    ``forward(z (B, Z), c (B, C)) -> x (B, V)``, x = voxel / E_inc, >= 0, layers in
    geometry order.

    ``output_param="energies"``: an energy network (z, c) -> (t, L layer logits) sets
    ``E_tot / E_inc = energy_cap * (1 - leak)``, ``leak = leak0 * exp(leak_range * tanh(t / leak_range))``
    (``leak0`` the real showers' geometric-mean leak, :meth:`init_from_data`), and the layer shares
    ``softmax``; each
    layer's network then draws only the layer's shape, conditioned on every layer energy.
    ``attention``: CaloGAN's in-painting attention; layer ``l``'s cells are
    ``alpha * relu(raw) + (1 - alpha) * relu(W shape_{l-1})``, ``alpha = sigmoid`` of a second
    output of the layer's network, ``W`` a learned map from the previous layer's cells.
    ``cell_noise``: z is (B, latent_dim + V); its last V numbers are per-cell Gaussian noise, added to
    each cell's pre-activation times a gain the layer's network outputs per cell (softplus of a third
    output), so that which of the sparse outer cells are hit is drawn per cell, as in the real shower.
    """

    log_leak0: Tensor

    def __init__(self, latent_dim: int, cond_dim: int, layer_sizes: tuple[int, ...], hidden: int, depth: int,
                 condition_on: str, x_scale: float, output_activation: str, output_param: str,
                 attention: bool = False, energy_cap: float = 1.0, leak_range: float = 2.0,
                 energy_net: bool = True, cell_noise: bool = False) -> None:
        super().__init__()
        self.layer_sizes, self.condition_on, self.x_scale = layer_sizes, condition_on, x_scale
        self.latent_dim, self.cell_noise = latent_dim, bool(cell_noise)
        if output_activation not in ("relu", "softplus", "gated"):
            raise ValueError(f"output_activation must be 'relu', 'softplus' or 'gated', got {output_activation!r}")
        if output_param not in ("factorised", "direct", "energies"):
            raise ValueError(f"output_param must be 'factorised', 'direct' or 'energies', got {output_param!r}")
        if output_activation == "gated" and output_param == "direct":
            raise ValueError("output_activation='gated' draws each layer's shape up to a scale: it needs "
                             "output_param 'energies' or 'factorised', got 'direct'")
        self.output_activation, self.output_param = output_activation, output_param
        self.energy_cap, self.leak_range = float(energy_cap), float(leak_range)
        n_layers = len(layer_sizes)
        self.attention = bool(attention) and n_layers > 1
        n_out = 1 if output_param == "factorised" else 0  # the layer-energy logit
        n_energy_in = n_layers + 1 if output_param == "energies" else 0  # log E_l / E_inc and log leak
        # energy_net=False: the layer energies come from outside (CaloGAN's energies="likelihood")
        with_net = bool(n_energy_in) and energy_net
        self.energy_net = mlp(latent_dim + cond_dim, hidden, depth, n_layers + 1) if with_net else None
        if self.energy_net is not None:
            self.register_buffer("log_leak0", torch.tensor(math.log(0.02)))
        nets, maps = [], []
        for i, size in enumerate(layer_sizes):
            if i == 0:
                extra = 0
            elif condition_on == "all":
                extra = sum(layer_sizes[:i])
            else:
                extra = layer_sizes[i - 1] + i  # previous layer's cells + log energy of every earlier layer
            n_att = size if self.attention and i > 0 else 0
            n_gain = size if self.cell_noise else 0  # per-cell noise gains
            n_cells = 2 * size if output_activation == "gated" else size  # gates and log magnitudes
            nets.append(mlp(latent_dim + cond_dim + extra + n_energy_in, hidden, depth,
                            n_cells + n_out + n_att + n_gain))
            if self.attention and i > 0:
                maps.append(nn.Linear(layer_sizes[i - 1], size))
        self.layers = nn.ModuleList(nets)
        self.maps = nn.ModuleList(maps)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """``output_param="energies"``: start at the mean real shower x (B, V) (fractions of E_inc).

        ``leak0`` is set to the geometric mean of the real leaks, the energy network's output bias to 0
        (the leak) and the log mean layer shares; each layer network's output bias to ``5 x`` the mean
        shape over its largest cell,
        its weights scaled by 0.1 (so the bias dominates: cells the mean leaves near 0 are switched on
        and off by the latent), and the attention logits to +3 (mostly the layer's own cells).
        """
        tot = x.sum(1).clamp_min(1e-9)
        self._init_layer_nets(x)
        if self.energy_net is None:
            return
        self.log_leak0.copy_(torch.log((1.0 - tot / self.energy_cap).clamp(1e-5, 1 - 1e-5)).mean())
        shares = torch.stack([p.sum(1) for p in torch.split(x, list(self.layer_sizes), dim=1)], 1) / tot[:, None]
        last = self.energy_net[-1]
        assert isinstance(last, nn.Linear)
        last.weight.mul_(0.1)
        last.bias.copy_(torch.cat([torch.zeros(1), torch.log(shares.mean(0) + 1e-7)]))

    @torch.no_grad()
    def _init_layer_nets(self, x: Tensor) -> None:
        """Each layer network's output bias from the real showers x (B, V): the cells' pre-activations to
        ``5 x`` the mean shape over its largest cell (``"gated"``: the gates to each cell's hit rate and the log
        magnitudes to its mean log share of the layer when hit), attention and energy logits to 3, the noise
        gains to 0.25 (``"gated"``: 1); the output weights scaled by 0.1 so that the biases dominate."""
        for net, part in zip(self.layers, torch.split(x, list(self.layer_sizes), dim=1), strict=True):
            assert isinstance(net, nn.Sequential)
            out = net[-1]
            assert isinstance(out, nn.Linear)
            out.weight.mul_(0.1)
            size = part.shape[1]
            frac = part / (part.sum(1, keepdim=True) + 1e-12)
            out.bias[size:] = 3.0
            if self.output_activation == "gated":
                out.bias[: 2 * size] = _gate_init(frac)
            else:
                mean = frac.mean(0)
                out.bias[:size] = 5.0 * mean / mean.max().clamp_min(1e-12)
            if self.cell_noise:  # gain softplus(b) = 0.25: a cell whose mean pre-activation is 5 % of the
                gain = 1.0 if self.output_activation == "gated" else 0.25  # core's is hit in ~60 % at the start
                out.bias[-size:] = math.log(math.expm1(gain))

    def _act(self, a: Tensor) -> Tensor:
        return F.relu(a) if self.output_activation == "relu" else F.softplus(a)

    def energies(self, z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """``output_param="energies"``: (E_l / E_inc (B, L), leak = 1 - E_tot / (cap E_inc) (B,))."""
        assert self.energy_net is not None
        a = self.energy_net(torch.cat([z, c], dim=1))
        r = self.leak_range  # e-folds around leak0: E_tot / E_inc stays within the data's neighbourhood
        leak = torch.exp(self.log_leak0 + r * torch.tanh(a[:, 0] / r)).clamp_max(1.0 - 1e-6)
        shares = torch.softmax(a[:, 1:], dim=1)
        return self.energy_cap * (1.0 - leak).unsqueeze(1) * shares, leak

    def _layer_output(self, a: Tensor, i: int, prev_shape: Tensor | None, energy: Tensor | None,
                      noise: Tensor | None = None) -> Tensor:
        """Network output (B, size [+1] [+size] [+size]) -> layer voxels (B, size), fractions of E_inc, >= 0.

        The output's columns: the cells' pre-activations (``"gated"``: the gates, then the log magnitudes),
        the layer-energy logit (``"factorised"``), the
        attention logits (layers after the first), the noise gains (``cell_noise``). ``energy`` (B,): the
        layer's E_l / E_inc (``"energies"``); ``prev_shape`` (B, size_{l-1}): the previous layer's normalised
        shape (attention); ``noise`` (B, size): unit Gaussians added, times the gains, before the ReLU."""
        size, n_layers = self.layer_sizes[i], len(self.layer_sizes)
        pre = a[:, :size]
        if noise is not None:
            pre = pre + F.softplus(a[:, -size:]) * noise
            a = a[:, :-size]
        if self.output_param == "direct":
            return self._act(pre) / size
        gated = self.output_activation == "gated"
        if gated:  # the rest as without: a[:, size] the energy logit, ...
            mag, a = torch.softmax(a[:, size: 2 * size], dim=1), a[:, size:]
        else:
            mag = self._act(pre)
        if self.attention and prev_shape is not None:  # ... a[:, -size:] the attention logits
            alpha = torch.sigmoid(a[:, -size:])
            att = F.relu(self.maps[i - 1](prev_shape))
            if gated:  # attention moves the magnitudes; which cells are hit stays the gates' draw
                att = att / (att.sum(1, keepdim=True) + 1e-12)
            mag = alpha * mag + (1 - alpha) * att
        shape = F.relu(pre) * mag if gated else mag
        shape = shape / (shape.sum(1, keepdim=True) + 1e-12)  # a layer whose cells all switch off stays empty
        if energy is None:
            energy = F.softplus(a[:, size]) / n_layers  # ~0.69 / L per layer at initialisation
        return shape * energy.unsqueeze(1)

    def forward(self, z: Tensor, c: Tensor, e_l: Tensor | None = None) -> Tensor:
        """Showers (B, V) from z (B, Z [+ V with ``cell_noise``]), c (B, C); ``e_l`` (B, L): the layer
        energies / E_inc to draw the shapes for, where they come from outside (``energy_net=False``), else
        the energy network's."""
        outs: list[Tensor] = []
        log_e: list[Tensor] = []
        # cell_noise: z holds latent_dim numbers for the networks, then one per cell (each layer's own)
        noises = torch.split(z[:, self.latent_dim:], list(self.layer_sizes), dim=1) if self.cell_noise else None
        z = z[:, : self.latent_dim]
        base = [z, c]
        if self.output_param == "energies":
            if e_l is None:
                e_l, leak = self.energies(z, c)
            else:  # a drawn total above the cap has no leak
                leak = (1.0 - e_l.sum(1) / self.energy_cap).clamp_min(0.0)
            base += [torch.log(e_l + _ENERGY_EPS), torch.log(leak + _ENERGY_EPS).unsqueeze(1)]
        prev: Tensor | None = None
        for i, net in enumerate(self.layers):
            inp = list(base)
            if i > 0:
                if self.condition_on == "all":
                    inp.append(torch.log1p(torch.cat(outs, dim=1) / self.x_scale))
                else:
                    inp += [torch.log1p(outs[-1] / self.x_scale), torch.stack(log_e, dim=1)]
            x_l = self._layer_output(net(torch.cat(inp, dim=1)), i, prev, None if e_l is None else e_l[:, i],
                                     None if noises is None else noises[i])
            outs.append(x_l)
            log_e.append(torch.log(x_l.sum(1) + _ENERGY_EPS))
            prev = x_l / (x_l.sum(1, keepdim=True) + 1e-12)
        return torch.cat(outs, dim=1)


def shower_features(x: Tensor, layer_shapes: tuple[tuple[int, int], ...], energy_cap: float = 1.0,
                    occupancy_eps: float = 1e-7, leak_floor: float = 1e-5) -> Tensor:
    """The CaloGAN paper's observables of showers x (B, V) (fractions of E_inc), differentiable: (B, 2 + 6 L).

    Columns: ``log(max(1 - E_tot / (cap E_inc), leak_floor))`` (the energy that leaked out: the
    per-mille width of ``E_tot / E_inc`` becomes an O(1) spread), ``log(E_tot / E_inc)``; per layer
    ``log(E_l / E_tot)``, the soft occupancy ``mean(x / (x + occupancy_eps))`` (the fraction of cells
    above ~``occupancy_eps`` E_inc: the paper's sparsity), and the energy-weighted centre and width of
    the layer along its rows and its columns, in units of the layer's rows / columns (the lateral
    widths; the cell pitch is uniform within a layer, so they are the observables' mm up to a scale).
    """
    tot = x.sum(1)
    out = [torch.log((1.0 - tot / energy_cap).clamp_min(leak_floor)), torch.log(tot + _ENERGY_EPS)]
    sizes = [r * c for r, c in layer_shapes]
    for part, (r, c) in zip(torch.split(x, sizes, dim=1), layer_shapes, strict=True):
        e = part.sum(1)
        out += [torch.log(e + _ENERGY_EPS) - torch.log(tot + _ENERGY_EPS), (part / (part + occupancy_eps)).mean(1)]
        w = (part / (e.unsqueeze(1) + 1e-12)).view(-1, r, c)
        for axis, n in ((1, r), (2, c)):  # rows, then columns
            pos = (torch.arange(n, dtype=x.dtype, device=x.device) + 0.5) / n
            marg = w.sum(3 - axis)  # (B, n)
            mean = (marg * pos).sum(1)
            var = (marg * pos**2).sum(1) - mean**2
            out += [mean, torch.sqrt(var.clamp_min(0.0) + 1e-8)]
    return torch.stack(out, dim=1)


class CaloGANCritic(nn.Module):
    """Discriminator on ``h = log1p(x / x_scale)`` (B, V) and conditions c (B, C) -> scores (B,).

    Features: per-layer MLP codes, log per-layer energies and log total energy (as
    fractions of E_inc, recomputed from h), the conditions, and minibatch-discrimination
    features of the codes and of the energies. With ``layer_shapes`` (``critic_features``) the
    energies are replaced by :func:`shower_features` (leak, layer shares, sparsity, centres and
    widths per layer), standardised, which arrive as extra columns of h (:meth:`CaloGAN.critic_input`),
    and the minibatch discrimination sees those.
    """

    feat_shift: Tensor
    feat_scale: Tensor

    def __init__(self, layer_sizes: tuple[int, ...], cond_dim: int, hidden: int, depth: int, layer_dim: int,
                 mbd_kernels: int, mbd_dim: int, x_scale: float,
                 layer_shapes: tuple[tuple[int, int], ...] | None = None, feature_args: tuple[float, ...] = ()) -> None:
        super().__init__()
        self.layer_sizes, self.x_scale = layer_sizes, x_scale
        self.layer_shapes, self.feature_args = layer_shapes, feature_args
        L = len(layer_sizes)
        self.encoders = nn.ModuleList(mlp(size, hidden, 1, layer_dim) for size in layer_sizes)
        n_feat = L * layer_dim
        n_energy = 2 + 6 * L if layer_shapes is not None else L + 1
        self.mbd_features = MinibatchDiscrimination(n_feat, mbd_kernels, mbd_dim)
        self.mbd_energies = MinibatchDiscrimination(n_energy, mbd_kernels, mbd_dim)
        self.head = mlp(n_feat + n_energy + cond_dim + 2 * mbd_kernels, hidden, depth, 1)
        if layer_shapes is not None:  # standardisation of the features, fitted on real showers (fit_features)
            self.register_buffer("feat_shift", torch.zeros(n_energy))
            self.register_buffer("feat_scale", torch.ones(n_energy))

    def features(self, x: Tensor) -> Tensor:
        """Standardised :func:`shower_features` of showers x (B, V), fractions of E_inc -> (B, 2 + 6 L)."""
        f = shower_features(x, self.layer_shapes or (), *self.feature_args)
        return (f - self.feat_shift) / self.feat_scale

    @torch.no_grad()
    def fit_features(self, x: Tensor) -> None:
        """Set the feature standardisation from real showers x (B, V): the per-mille spread of
        E_tot / E_inc or a layer width of 2 % of the layer becomes O(1) for the 1-Lipschitz critic."""
        self.feat_shift.zero_()
        self.feat_scale.fill_(1.0)
        f = self.features(x)
        self.feat_shift.copy_(f.mean(0))
        self.feat_scale.copy_(f.std(0).clamp_min(1e-4))

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        """Scores (B,) of critic inputs h (B, V [+ 2 + 6 L standardised features, with ``layer_shapes``])."""
        n_vox = sum(self.layer_sizes)
        parts = torch.split(h[:, :n_vox], list(self.layer_sizes), dim=1)
        codes = torch.cat([F.leaky_relu(enc(p), 0.2) for enc, p in zip(self.encoders, parts, strict=True)], dim=1)
        if self.layer_shapes is not None:
            energies = h[:, n_vox:]
        else:
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
        output_activation: ``"relu"`` (exact zeros, as CaloGAN), ``"softplus"``, or ``"gated"``: each cell
            ``relu(gate) * exp(log magnitude)``, two outputs per cell, started at each cell's hit rate and
            mean log share when hit (:func:`_gate_init`). Whether a cell is hit and how much it holds are then
            separate, and the magnitude lives on a log scale: a relu over one linear output must span the
            4-5 decades from a shower's core to its one-MeV outer hits (calogan-3layer gamma at 60-100 GeV:
            Geant4's median layer-0 hit 1.4 MeV, relu 4.9 MeV, with 34 % of the cells hit against 48 %).
        output_param: ``"energies"`` (an energy network draws E_tot / E_inc below ``energy_cap`` and
            the layer shares, the layer networks the shapes), ``"factorised"`` (each layer network's
            energy logit x normalised activations) or ``"direct"`` (activations / cells), see the
            module docstring.
        leak_range: ``output_param="energies"``: how far, in e-folds, the generated leak
            ``1 - E_tot / (cap E_inc)`` may go from the real showers' geometric mean (a free sigmoid leak
            drifted to 12 % on calogan-3layer e+, whose leak is 0.3 % +- 0.1 %, in 1600 steps).
        attention: CaloGAN's in-painting attention from each layer to the next (:class:`CaloGANGenerator`).
        x_scale: voxel fraction of E_inc at which ``log1p(x / x_scale)`` turns from linear to log
            (critic input and inter-layer conditioning); 1e-6 is 50 keV at 50 GeV, so the critic
            tells an empty cell from the smallest deposits.
        critic_features: the critic sees :func:`shower_features` (leak, layer shares, sparsity, centres
            and widths per layer) with their minibatch discrimination; else log layer and total energies.
        occupancy_eps: fraction of E_inc at which a cell counts half in the soft sparsity feature.
        leak_floor: floor of ``1 - E_tot / (cap E_inc)`` before its log in the critic features.
        lr, n_critic: Adam's learning rate and critic steps per generator step; 3e-4 and 2 (not WGAN-GP's
            1e-4 and 5): on 400 calogan-3layer e+ showers and 600 steps (75 CPU-s), the layer energies
            reached separation powers 0.09-0.14 with them and 0.27-0.56 with 1e-4 and 5.
        layer_dim: width of each per-layer critic code (``layer_features`` before).
        mbd_kernels, mbd_dim: minibatch-discrimination kernels K and their dimension D.
        energy_weight, energy_cap: energy-conservation penalty weight and the cap on
            ``sum(x) = E_vis / E_inc``.
        energies: with ``output_param="energies"``: ``"adversarial"`` (the energy network, trained by the
            critic) or ``"likelihood"`` (stage 1 of :class:`~.flow.CaloFlow`, a flow on the layer fractions
            fitted by maximum likelihood on every real batch with its own Adam; the generator draws the
            shapes for its energies, and the first ``L`` latent numbers are the flow's noise). In training the
            generated showers take the real batch's layer energies, so the critic teaches shapes only.
        stage1_transforms, stage1_hidden, stage1_bins, stage1_lr: ``energies="likelihood"``: that flow's
            transforms, hidden width and spline bins (:class:`~.flow.FlowConfig`'s defaults) and its lr.
        cell_noise: one Gaussian per cell beside the latent, added before the ReLU times a per-cell gain
            the layer's network sets (:class:`CaloGANGenerator`; the per-pixel noise inputs of StyleGAN,
            Karras et al., arXiv:1812.04948). Which outer cells of a shower are hit is close to independent
            from cell to cell, which a ReLU over a 64-number latent draws poorly: without it, calogan-3layer
            gamma's layer-0 hit rate per strip column was ragged (0.35-0.90 where Geant4 goes smoothly
            0.48-0.72) and did not rise with energy (34 % of cells hit at 60-100 GeV, Geant4 48 %).
    """

    lr: float = 3e-4
    n_critic: int = 2
    hidden: int = 256
    depth: int = 2
    condition_on: str = "auto"
    all_max_voxels: int = 4096
    output_activation: str = "relu"
    output_param: str = "energies"
    attention: bool = True
    x_scale: float = 1e-6
    critic_features: bool = True
    occupancy_eps: float = 1e-7
    leak_floor: float = 1e-5
    leak_range: float = 2.0
    layer_dim: int = 32
    mbd_kernels: int = 16
    mbd_dim: int = 8
    energy_weight: float = 1.0
    energy_cap: float = 1.0
    energies: str = "adversarial"
    stage1_transforms: int = 4
    stage1_hidden: int = 64
    stage1_bins: int = 8
    stage1_lr: float = 1e-3
    cell_noise: bool = False

    renamed: ClassVar[dict[str, str]] = {**AdversarialConfig.renamed, "n_hidden": "depth",
                                         "layer_features": "layer_dim"}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        **AdversarialConfig.choices,
        "condition_on": ("auto", "all", "previous"),
        "output_activation": ("relu", "softplus", "gated"),
        "output_param": ("energies", "factorised", "direct"),
        "energies": ("adversarial", "likelihood"),
    }
    #: runs saved before these fields existed were trained without them (their saved hparams hold the
    #: old output_param and x_scale explicitly)
    introduced: ClassVar[dict[str, Any]] = {"attention": False, "critic_features": False}


@register
class CaloGAN(AdversarialShowerModel):
    """CaloGAN ("calogan"): per-layer chained generators, minibatch-discrimination critic.

    Shapes: x (B, V) = voxel energy / E_inc (>= 0); c (B, C), column 0 the
    standardised log incident energy.

    Hyper-parameters: :class:`CaloGANConfig`.

    Optimizers: ``[generator Adam, critic Adam]`` (and, with ``energies="likelihood"``, the energy flow's Adam).
    """

    name: ClassVar[str] = "calogan"
    default_transform: ClassVar[tuple[str, ...]] = ("per_incident",)
    config_class: ClassVar[type[ModelConfig]] = CaloGANConfig
    config: CaloGANConfig
    data_ready: Tensor
    generator: CaloGANGenerator
    critic: CaloGANCritic

    def __init__(self, spec: ModelSpec, config: CaloGANConfig | Mapping[str, Any] | None = None,
                 **overrides: Any) -> None:
        super().__init__(spec, config, **overrides)
        cfg = self.config
        cond_on = cfg.condition_on
        if cond_on == "auto":
            cond_on = "all" if spec.n_voxels <= cfg.all_max_voxels else "previous"
        self.x_scale = cfg.x_scale
        self.energy_flow = self._energy_flow(spec, cfg)
        self._step_energies: Tensor | None = None  # energies="likelihood": the real batch's, during a step
        self.generator = CaloGANGenerator(
            cfg.latent_dim, spec.cond_dim, spec.layer_sizes, cfg.hidden, cfg.depth, cond_on, self.x_scale,
            cfg.output_activation, cfg.output_param, cfg.attention, cfg.energy_cap, cfg.leak_range,
            energy_net=self.energy_flow is None, cell_noise=cfg.cell_noise,
        )
        self.init_generator_average()
        self.critic = CaloGANCritic(
            spec.layer_sizes, spec.cond_dim, cfg.hidden, cfg.depth, cfg.layer_dim, cfg.mbd_kernels, cfg.mbd_dim,
            self.x_scale, spec.layer_shapes if cfg.critic_features else None,
            (cfg.energy_cap, cfg.occupancy_eps, cfg.leak_floor),
        )

        if cfg.critic_features or cfg.output_param == "energies":
            self.register_buffer("data_ready", torch.zeros(()))

    @property
    def latent_dim(self) -> int:
        """Width of z: the config's latent_dim, plus one noise number per cell with ``cell_noise``."""
        return self.config.latent_dim + (self.spec.n_voxels if self.config.cell_noise else 0)

    @staticmethod
    def _energy_flow(spec: ModelSpec, cfg: CaloGANConfig) -> CaloFlow | None:
        """``energies="likelihood"``: CaloFlow's stage 1 (its flow on the L layer fractions), else None."""
        if cfg.energies == "adversarial":
            return None
        if cfg.output_param != "energies":
            raise ValueError(f"energies='likelihood' needs output_param='energies', got {cfg.output_param!r}")
        if cfg.latent_dim < len(spec.layer_sizes):
            raise ValueError(f"energies='likelihood' takes the first {len(spec.layer_sizes)} latent numbers as "
                             f"the energy flow's noise: latent_dim must be at least that, got {cfg.latent_dim}")
        keys = ("stage1_transforms", "stage1_hidden", "stage1_bins")
        return CaloFlow(spec, {k: getattr(cfg, k) for k in keys}, with_stage2=False)

    @torch.no_grad()
    def fit_to_data(self, x: Tensor) -> None:
        """Fit the critic's feature standardisation and start the generator at the mean shower (with
        ``output_param="energies"``), from real showers x (B, V), fractions of E_inc (negative values, from
        another transform, are read as 0); once per run (the flag ``data_ready`` is saved with the weights).
        """
        x = x.clamp_min(0.0)
        if self.config.critic_features:
            self.critic.fit_features(x)
        if self.config.output_param == "energies":
            self.generator.init_from_data(x)
        self.data_ready.fill_(1.0)

    def training_step(
        self, x: Tensor, c: Tensor, optimizers: list[torch.optim.Optimizer], step: int
    ) -> dict[str, float]:
        """:meth:`AdversarialShowerModel.training_step`, after :meth:`fit_to_data` on the first batch."""
        if hasattr(self, "data_ready") and not bool(self.data_ready):
            self.fit_to_data(x)
        if self.energy_flow is None:
            return super().training_step(x, c, optimizers, step)
        # energies="likelihood": the step's generated showers take the real batch's layer energies (the energy
        # flow learns those by likelihood; CaloFlow's stage 2 is trained on the true ones the same way), so that
        # the critic compares shapes at equal energies and its gradient goes to the shapes only
        self._step_energies = self.energy_flow.layer_energies(x.clamp_min(0.0)).detach()
        try:
            return super().training_step(x, c, optimizers, step)
        finally:
            self._step_energies = None

    def generate(self, z: Tensor, c: Tensor) -> Tensor:
        """Showers (B, V) from latent z (B, Z) and conditions c (B, C); with ``energies="likelihood"`` the
        layer energies are the energy flow's draw from z[:, :L] (no gradient: the flow learns by likelihood),
        or inside a training step the real batch's."""
        if self.energy_flow is None:
            return self.generator(z, c)
        if self._step_energies is not None:  # inside a training step: the real batch's (see training_step)
            return self.generator(z, c, self._step_energies)
        flow = self.energy_flow
        with torch.no_grad():
            e_l = self.undequantise(flow.stage1_fractions(flow.sample_stage1(z[:, : flow.n_layers], c)))
        return self.generator(z, c, e_l)

    def undequantise(self, e_l: Tensor) -> Tensor:
        """Layer energies e_l (B, L) / E_inc drawn by the energy flow -> without its dequantisation noise.

        The flow learns dequantised layers (``U(0, noise)`` added to each of a layer's n cells, CaloFlow's
        rule), so an empty layer comes out near ``n noise / 2`` (72 keV at 2 GeV for calogan-3layer's layer 2,
        which Geant4 leaves empty in 24 % of 1-10 GeV e+). That mean is taken off, and a layer within four
        standard deviations of the noise sum (``4 sqrt(n / 12) noise``) of empty is empty; ``flow`` instead
        cuts its cells at ``noise`` one by one, which a generator that puts a layer's energy into a few hit
        cells would not reach."""
        assert self.energy_flow is not None
        noise = self.energy_flow.noise
        n = torch.as_tensor(self.spec.layer_sizes, dtype=e_l.dtype, device=e_l.device)
        e = e_l - n * noise / 2
        return e * (e > 4.0 * torch.sqrt(n / 12.0) * noise).to(e.dtype)

    def energy_nll(self, x: Tensor, c: Tensor) -> Tensor:
        """The energy flow's mean negative log-likelihood of the layer fractions of x (B, V) under c (B, C)."""
        assert self.energy_flow is not None
        flow = self.energy_flow
        with float32(x.device):
            g1 = flow.stage1_variables(flow.layer_energies(flow.dequantise(x)))  # dequantise clamps x at 0
            return -flow.flow1(c).log_prob(g1).mean()

    def auxiliary_optimizers(self) -> list[torch.optim.Optimizer]:
        if self.energy_flow is None:
            return []
        return [torch.optim.Adam(self.energy_flow.parameters(), lr=self.config.stage1_lr)]

    def auxiliary_step(
        self, x: Tensor, c: Tensor, optimizers: Sequence[torch.optim.Optimizer], step: int
    ) -> dict[str, float]:
        """``energies="likelihood"``: one maximum-likelihood update of the energy flow on the real batch."""
        if self.energy_flow is None:
            return {}
        nll = self.energy_nll(x, c)
        optimizers[0].zero_grad(set_to_none=True)
        nll.backward()
        self._clip(self.energy_flow)
        optimizers[0].step()
        return {"nll_energies": float(nll.detach())}

    def loss(self, x: Tensor, c: Tensor) -> dict[str, Tensor]:
        """The adversarial evaluation losses, and the energy flow's NLL where there is one."""
        out = super().loss(x, c)
        if self.energy_flow is not None:
            out["nll_energies"] = self.energy_nll(x, c)
        return out

    def critic_input(self, x: Tensor) -> Tensor:
        """``log1p(x / x_scale)`` (B, V) and, with ``critic_features``, the standardised observables beside it
        (B, V + 2 + 6 L): the gradient penalty then counts each observable as one input of unit scale. Computed
        from the cells instead, a leak of 0.3 % +- 0.1 % moves by ~300 standard deviations per unit of h in a
        big cell, and the penalty kept the critic from seeing it (the leak drifted to its bound)."""
        x = x.clamp_min(0.0)  # real data after other preprocessing could hold tiny negative values
        h = torch.log1p(x / self.x_scale)
        return torch.cat([h, self.critic.features(x)], dim=1) if self.config.critic_features else h

    def critic_score(self, h: Tensor, c: Tensor) -> Tensor:
        return self.critic(h, c)

    def energy_excess(self, x: Tensor) -> Tensor:
        """Per-shower excess ``relu(sum_v x_v - energy_cap)`` (B,), in units of E_inc."""
        return F.relu(x.sum(1) - self.config.energy_cap)

    def generator_penalties(self, fake: Tensor, c: Tensor, step: int) -> dict[str, Tensor]:
        """The energy-conservation term ``energy_weight * mean(relu(sum(x) - energy_cap))``."""
        return {"energy_conservation": self.config.energy_weight * self.energy_excess(fake).mean()}
