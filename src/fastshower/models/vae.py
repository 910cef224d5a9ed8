"""Conditional variational auto-encoder (Kingma & Welling 2013; conditional as in CaloVAE-style
calorimeter studies).

Encoder q(z | x, c) = N(mu, diag sigma^2), decoder p(x | z, c) = N(m(z, c), diag s^2) with a
fixed width s (``decoder_sigma``, in standardised model space) or a learned per-voxel one
(``decoder_sigma = 0``). Per shower

    loss = [ NLL(x | z, c) + beta_t KL(q || N(0, I)) + lambda_mmd MMD(q(z), N(0, I)) ] / V

with beta_t warmed up linearly over ``kl_warmup`` steps (avoids posterior collapse early)
and the optional MMD term (weight ``mmd_weight``) of InfoVAE (Zhao et al. 2017): an RBF-kernel MMD between the
batch's latent codes and prior draws, which pulls the *aggregate* posterior onto the prior
so that prior samples land where the decoder was trained. Dividing by V keeps the loss
O(1) for any detector size, so one learning rate fits all.

Sampling draws z ~ N(0, I), decodes, and (``sample_noise``) adds the learned per-voxel
Gaussian noise, which restores the shower-to-shower fluctuations a decoder mean smooths away.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastshower.models import register
from fastshower.models.base import ModelConfig, ModelSpec, ShowerModel
from fastshower.models.nets import MLP, auto_net

__all__ = ["VAE", "VAEConfig"]


class _PerLayerIn(nn.Module):
    """(B, V) -> (B, L * d): one linear map per readout layer (compression for large V)."""

    def __init__(self, layer_sizes: tuple[int, ...], d: int) -> None:
        super().__init__()
        self.sizes = list(layer_sizes)
        self.maps = nn.ModuleList(nn.Linear(n, d) for n in self.sizes)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([f(p) for f, p in zip(self.maps, torch.split(x, self.sizes, dim=1), strict=True)], dim=1)


class _PerLayerOut(nn.Module):
    """(B, L * d) -> (B, V): one linear map per readout layer."""

    def __init__(self, layer_sizes: tuple[int, ...], d: int) -> None:
        super().__init__()
        self.d = d
        self.maps = nn.ModuleList(nn.Linear(d, n) for n in layer_sizes)

    def forward(self, h: Tensor) -> Tensor:
        return torch.cat([f(p) for f, p in zip(self.maps, torch.split(h, self.d, dim=1), strict=True)], dim=1)


def rbf_mmd(a: Tensor, b: Tensor) -> Tensor:
    """Biased MMD^2 between samples a (n, d) and b (m, d), RBF kernel of width sqrt(d) (multi-scale sum)."""
    d = a.shape[1]
    xx, yy, xy = torch.cdist(a, a) ** 2, torch.cdist(b, b) ** 2, torch.cdist(a, b) ** 2
    out = a.new_zeros(())
    for scale in (0.5, 1.0, 2.0):
        h = 2.0 * d * scale
        out = out + torch.exp(-xx / h).mean() + torch.exp(-yy / h).mean() - 2 * torch.exp(-xy / h).mean()
    return out


@dataclass(frozen=True)
class VAEConfig(ModelConfig):
    """Hyper-parameters of :class:`VAE`.

    Attributes:
        latent_dim: dimension of z (``latent`` before).
        hidden, depth: width and number of hidden layers of the encoder and decoder MLPs.
        net: "auto" (dense for V <= 5000, per-layer linear compression to ``layer_dim`` per
            readout layer in front of / behind the MLPs above), "mlp", "layers".
        layer_dim: width per readout layer of the per-layer compression.
        beta: final KL weight; kl_warmup: steps of linear warm-up of it from 0.
        mmd_weight: weight of the latent MMD term (0 disables; ``mmd`` before).
        sample_noise: add the decoder's per-voxel noise when sampling.
        decoder_sigma: fixed decoder width, in standardised model-space units; 0 learns one per voxel
            (prone to posterior collapse on standardised data, see the module notes).
        lr, grad_clip: Adam learning rate, gradient-norm clip.
    """

    latent_dim: int = 16
    hidden: int = 256
    depth: int = 3
    net: str = "auto"
    layer_dim: int = 32
    beta: float = 1.0
    kl_warmup: int = 500
    mmd_weight: float = 1.0
    sample_noise: bool = True
    decoder_sigma: float = 0.2
    lr: float = 1e-3
    grad_clip: float | None = 5.0

    renamed: ClassVar[dict[str, str]] = {"latent": "latent_dim", "mmd": "mmd_weight"}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"net": ("auto", "mlp", "layers")}


@register
class VAE(ShowerModel):
    """Conditional VAE on model-space showers (B, V) given conditions (B, C); hyper-parameters: :class:`VAEConfig`."""

    name: ClassVar[str] = "vae"
    default_transform: ClassVar[tuple[str, ...]] = ("per_incident", "log", "standardize")
    config_class: ClassVar[type[ModelConfig]] = VAEConfig
    config: VAEConfig

    def __init__(self, spec: ModelSpec, config: VAEConfig | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(spec, config, **overrides)
        cfg = self.config
        v, cdim, z, h, k = spec.n_voxels, spec.cond_dim, cfg.latent_dim, cfg.hidden, cfg.depth
        if auto_net(cfg.net, v) == "layers":
            d = cfg.layer_dim
            self.enc_in: nn.Module = _PerLayerIn(spec.layer_sizes, d)
            self.dec_out: nn.Module = _PerLayerOut(spec.layer_sizes, d)
            width = d * len(spec.layer_sizes)
        else:
            self.enc_in, self.dec_out, width = nn.Identity(), nn.Identity(), v
        self.encoder = MLP([width + cdim] + [h] * k + [2 * z])
        self.decoder = nn.Sequential(MLP([z + cdim] + [h] * k + [width]))
        fixed = cfg.decoder_sigma
        # a parameter only when learned: a frozen unused one would be dead weight in checkpoints
        self.log_sigma: nn.Parameter | None = nn.Parameter(torch.zeros(v)) if fixed <= 0 else None
        self.register_buffer("fixed_log_sigma", torch.full((v,), math.log(fixed) if fixed > 0 else 0.0))
        self._beta_now = cfg.beta  # set from the step in training_step; full weight otherwise

    fixed_log_sigma: Tensor

    def _log_s(self) -> Tensor:
        if self.log_sigma is None:
            # a fixed width keeps reconstruction pressure on z; a learned one (decoder_sigma = 0) let the decoder
            # explain standardised voxels as independent noise and the posterior collapse (KL -> 0) on belle2 toys
            return self.fixed_log_sigma
        return self.log_sigma.clamp(-7.0, 3.0)

    def encode(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z | x, c), each (B, latent_dim)."""
        mu, logvar = self.encoder(torch.cat([self.enc_in(x), c], dim=1)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode(self, z: Tensor, c: Tensor) -> Tensor:
        """Decoder mean (B, V) in model space."""
        return self.dec_out(self.decoder(torch.cat([z, c], dim=1)))

    def loss(self, x: Tensor, c: Tensor) -> dict[str, Tensor]:
        """Per-voxel-normalised negative ELBO (+ MMD); x (B, V), c (B, C)."""
        mu, logvar = self.encode(x, c)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        xm = self.decode(z, c)
        log_s = self._log_s()
        nll = (0.5 * ((x - xm) * torch.exp(-log_s)) ** 2 + log_s + 0.5 * math.log(2 * math.pi)).sum(1).mean()
        kl = (0.5 * (mu**2 + logvar.exp() - 1.0 - logvar)).sum(1).mean()
        v = x.shape[1]
        total = nll + self._beta_now * kl
        out = {"nll": nll / v, "kl": kl / v}
        if self.config.mmd_weight > 0:
            mmd = rbf_mmd(z, torch.randn_like(z))
            total = total + self.config.mmd_weight * mmd * v  # on the NLL's (summed) scale
            out["mmd"] = mmd
        return {"loss": total / v, **out}

    def training_step(
        self, x: Tensor, c: Tensor, optimizers: list[torch.optim.Optimizer], step: int
    ) -> dict[str, float]:
        warm = self.config.kl_warmup
        self._beta_now = self.config.beta * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)
        try:
            return super().training_step(x, c, optimizers, step)
        finally:
            self._beta_now = self.config.beta

    @torch.no_grad()
    def sample(self, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Model-space showers (B, V): decode prior draws, plus the learned noise when ``sample_noise``."""
        return self.sample_from_noise(self.draw_noise(c.shape[0], generator, c.dtype, c.device), c)

    def noise_dim(self) -> int:
        """The latent prior draw, then (with ``sample_noise``) one decoder-noise number per voxel."""
        return self.config.latent_dim + (int(self.spec.n_voxels) if self.config.sample_noise else 0)

    def sample_from_noise(self, z: Tensor, c: Tensor, **options: Any) -> Tensor:
        """Decode z[:, :latent_dim]; add z[:, latent_dim:] times the learned noise width when ``sample_noise``."""
        if options:
            raise ValueError(f"model 'vae' takes no sampling options, got {sorted(options)}")
        latent = self.config.latent_dim
        x = self.decode(z[:, :latent], c)
        if self.config.sample_noise:
            x = x + z[:, latent:] * torch.exp(self._log_s())
        return x
