"""Conditional Wasserstein GAN with gradient penalty, with optional constrainer networks.

Objective (Gulrajani et al., arXiv:1704.00028): the critic ``D`` minimises
``E[D(G(z, c), c)] - E[D(x, c)] + lambda * E[(|grad D(x_hat, c)| - 1)^2]`` on random
interpolates ``x_hat`` of real and generated showers; the generator minimises
``-E[D(G(z, c), c)]``. Adam with betas (0.5, 0.9) and ``n_critic = 5`` critic updates
per generator update are the paper's settings. ``loss="bce"`` replaces the Wasserstein game by
the original GAN's (Goodfellow et al., arXiv:1406.2661): the critic's score is a logit, trained by
binary cross entropy (real 1, generated 0), and the generator minimises the non-saturating
``-log sigmoid(D(G(z, c), c))``; no gradient penalty.

Constrainers (the design of the Belle II ECL fast-simulation GAN studies, H. Hashemi et
al.; the idea of 3DGAN's auxiliary energy regression, Khattak et al., arXiv:2103.10142,
but as separate networks trained on real showers only): small regressors trained on
*real* showers to predict the incident energy (condition column 0) and, when the
conditions hold an entry position, the position columns, from the shower. Their squared error on generated
showers, against the conditions the showers were generated for, is added to the
generator loss, which pushes the generator to respect the conditioning that a
critic alone enforces only weakly.

Model space. ``output="free"`` (the default) works in the default preprocessing
``("per_incident", "log", "standardize")``: the networks see standardised ``log(voxel / E_inc)``
and the generator's output is linear. The constrainers see that same model-space shower.
Targets are the standardised conditions themselves, so the regression error is dimensionless
(units of one standard deviation of the condition). Note that ``per_incident`` divides the
incident energy out: an energy constrainer can only read it from the shower's shape.

``output="fraction"`` (with ``transform = ["per_incident"]``) is the Belle II design of this
module: the generator writes each shower as its visible energy fraction times a softmax shape
(:class:`FractionGenerator`), and the critic (and the constrainers) see the cells as
``log(x + log_eps)`` together with the shower observables of :func:`shower_features` (total
energy, largest cell, E1/E9, E9/E25), each standardised on the first real batch. The gradient
penalty then measures a total-energy difference in units of the real showers' spread of it,
rather than as the small change of a few cells' logs that it is in the default space; with
``net="conv"`` critic and constrainers are 3x3 convolutions over the crystal array.

Training schedule (one call of :meth:`training_step` per real batch; ``step`` is the
global step counter, so a resumed run repeats exactly the same schedule):

1. critic update on this batch (every step);
2. constrainer update on this batch (every step, when constrainers exist);
3. generator update when ``(step + 1) % n_critic == 0``.

Using every real batch for a critic update (rather than drawing ``n_critic`` batches
inside one step) keeps one batch per step, which is what the generic fit loop feeds.

:class:`AdversarialShowerModel` holds the schedule and the penalties shared with
:mod:`fastshower.models.calogan`; :class:`WGANGP` adds the networks and constrainers.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastshower.errors import ConfigError

from . import register
from .base import ModelConfig, ModelSpec, ShowerModel
from .nets import ema_update

__all__ = [
    "WGANGP",
    "AdversarialConfig",
    "AdversarialShowerModel",
    "ConvCritic",
    "ConvRegressor",
    "FractionGenerator",
    "LayerwiseCritic",
    "LayerwiseGenerator",
    "WGANConfig",
    "column_names",
    "gradient_penalty",
    "mlp",
    "position_columns",
    "shower_features",
]


# --- building blocks -------------------------------------------------------------------


def mlp(
    in_dim: int,
    hidden: int,
    depth: int,
    out_dim: int,
    *,
    slope: float = 0.2,
    layer_norm: bool = False,
) -> nn.Sequential:
    """A multilayer perceptron ``in_dim -> hidden (x depth) -> out_dim`` with LeakyReLU.

    No batch normalisation anywhere: the gradient penalty is defined per sample and
    batch norm couples the samples of a batch (Gulrajani et al., section 4). Layer
    norm is per sample and therefore allowed.
    """
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(max(int(depth), 0)):
        layers.append(nn.Linear(d, hidden))
        if layer_norm:
            layers.append(nn.LayerNorm(hidden))
        layers.append(nn.LeakyReLU(slope))
        d = hidden
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def column_names(spec: ModelSpec) -> list[str]:
    """One name per condition column (length ``spec.cond_dim``).

    ``spec.cond_names`` names condition *groups* of ``spec.cond_widths`` columns each
    (``("log_energy", "position")`` with widths ``(1, 2)``), or one column per name when
    ``cond_widths`` is empty. A group's name is repeated for each of its columns.
    Columns that cannot be attributed are named ``""``.
    """
    names = list(spec.cond_names)
    widths = [int(w) for w in spec.cond_widths] or [1] * len(names)
    if len(widths) == len(names) and sum(widths) == spec.cond_dim:
        return [n for n, w in zip(names, widths, strict=True) for _ in range(w)]
    if len(names) == 2 and spec.cond_dim > 2:  # one group after log_energy: it holds the rest
        return [names[0]] + [names[1]] * (spec.cond_dim - 1)
    return (names + [""] * spec.cond_dim)[: spec.cond_dim]


def position_columns(spec: ModelSpec) -> list[int]:
    """Indices of the condition columns that hold an entry position.

    A column counts as a position when its name (see :func:`column_names`) contains
    ``pos`` (``position``, ``position_x``, ``pos_y``...) or is exactly ``x``/``y``/``z``.
    Column 0 (log incident energy) never counts.
    """
    out: list[int] = []
    for i, name in enumerate(column_names(spec)):
        n = name.lower()
        if i > 0 and ("pos" in n or n in ("x", "y", "z")):
            out.append(i)
    return out


def gradient_penalty(critic: Any, real: Tensor, fake: Tensor, c: Tensor) -> Tensor:
    """WGAN-GP penalty ``E[(|grad_x D(x_hat, c)|_2 - 1)^2]`` on random interpolates.

    Args:
        critic: callable ``(x (B, D), c (B, C)) -> (B,)`` scores.
        real, fake: (B, D) points in the space the Lipschitz constraint is imposed on.
        c: (B, C) conditions (not interpolated: real and fake share them).

    Returns:
        scalar tensor, differentiable w.r.t. the critic's parameters.
    """
    alpha = torch.rand(real.shape[0], 1, dtype=real.dtype, device=real.device)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    score = critic(x_hat, c)
    (grad,) = torch.autograd.grad(score.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()


@contextlib.contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Turn off ``requires_grad`` of the modules' parameters for the block, then restore it.

    Used in the generator step: gradients must flow *through* the critic and the
    constrainers to the generator, but must not accumulate in their parameters.
    """
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


# --- the shared adversarial protocol --------------------------------------------------


@dataclass(frozen=True)
class AdversarialConfig(ModelConfig):
    """The critic/generator schedule shared by the adversarial models (not a model's config itself).

    Defaults are the settings of Gulrajani et al. (arXiv:1704.00028): Adam 1e-4, betas (0.5, 0.9),
    gradient penalty 10, 5 critic steps per generator step; the drift term is Karras et al.'s.

    Attributes:
        latent_dim: width of the Gaussian latent z.
        lr, betas: Adam learning rate and (beta1, beta2) of generator and critic.
        gp_weight: gradient-penalty weight lambda (``loss="wgan-gp"`` only).
        drift: weight of the drift term ``E[D(real)^2]`` in the critic loss (Karras et al.; ``loss="wgan-gp"`` only).
        n_critic: critic updates per generator update (>= 1).
        loss: the adversarial loss (``gan_loss`` before). "wgan-gp": Wasserstein critic with gradient
            penalty (Gulrajani et al.). "bce": the original GAN's cross entropy (Goodfellow et al.,
            arXiv:1406.2661): the critic becomes a discriminator whose score is a logit, trained with
            binary cross entropy on real showers labelled 1 and generated ones labelled 0; the generator
            minimises the non-saturating ``-log sigmoid(D(G(z)))``; no gradient penalty, no drift term.
            Goodfellow et al. used one discriminator step per generator step (``n_critic=1``).
        grad_clip: gradient-norm clip of each network (None: off).
        ema: decay per generator update of an average of the generator's weights, which then draws the
            samples (Yazici et al., arXiv:1806.04498: a GAN's generator oscillates around its equilibrium,
            and the average sits nearer it); 0: off, the last weights draw them.
    """

    latent_dim: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    gp_weight: float = 10.0
    drift: float = 1e-3
    n_critic: int = 5
    loss: str = "wgan-gp"
    ema: float = 0.0

    renamed: ClassVar[dict[str, str]] = {"gan_loss": "loss"}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"loss": ("wgan-gp", "bce")}

    def check(self, where: str) -> None:
        super().check(where)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                           for b in self.betas):
            raise ConfigError(f"{where}: betas must be two numbers, got {self.betas!r}")
        if self.n_critic < 1:
            raise ConfigError(f"{where}: n_critic must be >= 1, got {self.n_critic}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"{where}: ema must be in [0, 1), got {self.ema}")


class AdversarialShowerModel(ShowerModel):
    """Generator/critic schedule shared by the GAN models (not registered itself).

    Subclasses build ``self.generator`` and ``self.critic`` and implement
    :meth:`generate` and :meth:`critic_score`; they may add generator penalties
    (:meth:`generator_penalties`) and an auxiliary update with its own optimizers
    (:meth:`auxiliary_optimizers`, :meth:`auxiliary_step`).

    Hyper-parameters used here: the fields of :class:`AdversarialConfig`.

    Optimizers (:meth:`configure_optimizers`), in this order:
    ``[generator Adam, critic Adam, *auxiliary_optimizers()]``.
    """

    #: an adversarial game: its losses need not decrease (read by generic tests and tooling)
    adversarial: ClassVar[bool] = True
    config_class: ClassVar[type[ModelConfig]] = AdversarialConfig
    config: AdversarialConfig

    generator: nn.Module
    critic: nn.Module
    generator_average: nn.Module | None  # set by init_generator_average (a class default would hide the module)

    # -- to be provided by subclasses --
    def generate(self, z: Tensor, c: Tensor) -> Tensor:
        """Model-space showers (B, V) from latent z (B, latent_dim) and conditions c (B, C)."""
        raise NotImplementedError

    def critic_input(self, x: Tensor) -> Tensor:
        """Map a model-space shower (B, V) to the space the critic (and its GP) works in."""
        return x

    def critic_score(self, h: Tensor, c: Tensor) -> Tensor:
        """Critic scores (B,) of critic-space showers h (B, V') under conditions c (B, C)."""
        raise NotImplementedError

    def generator_penalties(self, fake: Tensor, c: Tensor, step: int) -> dict[str, Tensor]:
        """Extra generator loss terms (already weighted) on a generated batch."""
        return {}

    def auxiliary_optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    def auxiliary_step(
        self, x: Tensor, c: Tensor, optimizers: Sequence[torch.optim.Optimizer], step: int
    ) -> dict[str, float]:
        return {}

    # -- shared machinery --
    def init_generator_average(self) -> None:
        """With ``ema``: a copy of the generator that keeps the average of its weights (subclasses call this
        once they have built ``self.generator``, so that saved runs hold it from the start)."""
        average = copy.deepcopy(self.generator).requires_grad_(False) if self.config.ema > 0 else None
        self.generator_average = average

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Within: ``self.generator`` is the weight average (with ``ema``), so that sampling and its ONNX
        export draw from it; training steps outside use the live generator."""
        if self.generator_average is None:
            yield
            return
        live = self.generator
        self.generator = self.generator_average
        try:
            yield
        finally:
            self.generator = live

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def _latent(self, n: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, self.latent_dim, generator=generator, dtype=like.dtype, device=like.device)

    def _adversarial_losses(self, d_real: Tensor | None, d_fake: Tensor) -> tuple[Tensor | None, Tensor]:
        """(critic loss without GP, generator adversarial loss) for the configured ``loss``.

        ``d_real``, ``d_fake``: critic scores (B,) of real and generated showers (``d_real`` None: the
        generator's loss only). "wgan-gp": ``E[D(fake)] - E[D(real)]`` and ``-E[D(fake)]``. "bce": the scores
        are logits; ``BCE(D(real), 1) + BCE(D(fake), 0)`` and the non-saturating ``BCE(D(fake), 1)``, each
        BCE the batch mean of :func:`torch.nn.functional.binary_cross_entropy_with_logits`.
        """
        if self.config.loss == "bce":
            bce = F.binary_cross_entropy_with_logits
            d_loss = None if d_real is None else (bce(d_real, torch.ones_like(d_real))
                                                   + bce(d_fake, torch.zeros_like(d_fake)))
            return d_loss, bce(d_fake, torch.ones_like(d_fake))
        d_loss = None if d_real is None else d_fake.mean() - d_real.mean()
        return d_loss, -d_fake.mean()

    def loss(self, x: Tensor, c: Tensor) -> dict[str, Tensor]:
        """Evaluation losses on a batch (x (B, V) model space, c (B, C)).

        ``"loss"`` is the critic loss *without* the gradient penalty (the penalty needs
        input gradients and this method may run under ``torch.no_grad``); for WGAN-GP
        ``-loss`` is the critic's estimate of the Wasserstein distance, ``"wasserstein"``.
        ``"generator"`` is the generator's adversarial loss, and the generator
        penalties are reported under their own names.
        """
        fake = self.generate(self._latent(x.shape[0], x), c)
        d_real = self.critic_score(self.critic_input(x), c)
        d_fake = self.critic_score(self.critic_input(fake), c)
        d_loss, g_loss = self._adversarial_losses(d_real, d_fake)
        assert d_loss is not None
        out = {"loss": d_loss, "wasserstein": d_real.mean() - d_fake.mean(), "generator": g_loss}
        out.update(self.generator_penalties(fake, c, step=-1))
        return out

    @torch.no_grad()
    def sample(self, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Model-space showers (B, V), one per condition row of c (B, C)."""
        with self.averaged():
            return self.generate(self._latent(c.shape[0], c, generator), c)

    def noise_dim(self) -> int:
        return int(self.latent_dim)

    def draw_noise(self, batch: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> Tensor:
        # the same draw as sample(): on the condition's device
        return torch.randn(batch, self.latent_dim, generator=generator, dtype=dtype, device=device)

    def sample_from_noise(self, z: Tensor, c: Tensor, **options: Any) -> Tensor:
        """The generator applied to latent z (B, latent_dim) and conditions c."""
        if options:
            raise ValueError(f"model {self.name!r} takes no sampling options, got {sorted(options)}")
        with self.averaged():
            return self.generate(z, c)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """``[generator Adam, critic Adam, *auxiliary_optimizers()]`` (lr, betas from the config)."""
        lr, (b1, b2) = self.config.lr, self.config.betas
        betas = (float(b1), float(b2))
        return [
            torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas),
            torch.optim.Adam(self.critic.parameters(), lr=lr, betas=betas),
            *self.auxiliary_optimizers(),
        ]

    def is_generator_step(self, step: int) -> bool:
        """True when the call with this global step counter also updates the generator."""
        return (step + 1) % self.config.n_critic == 0

    def _clip(self, module: nn.Module) -> None:
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(module.parameters(), self.config.grad_clip)

    def critic_update(self, x: Tensor, c: Tensor, opt: torch.optim.Optimizer) -> dict[str, float]:
        """One critic update on a real batch; returns the logged values."""
        with torch.no_grad():
            fake = self.generate(self._latent(x.shape[0], x), c)
        h_real, h_fake = self.critic_input(x), self.critic_input(fake)
        d_real, d_fake = self.critic_score(h_real, c), self.critic_score(h_fake, c)
        d_loss, _ = self._adversarial_losses(d_real, d_fake)
        assert d_loss is not None
        logs = {"wasserstein": float((d_real.mean() - d_fake.mean()).detach())}
        if self.config.loss == "wgan-gp":
            gp = gradient_penalty(self.critic_score, h_real, h_fake, c)
            # drift term (Karras et al., arXiv:1710.10196): the WGAN loss is blind to a constant
            # offset of the critic; a small penalty on D(real)^2 keeps the scores anchored near 0
            drift = (d_real**2).mean()
            d_loss = d_loss + self.config.gp_weight * gp + self.config.drift * drift
            logs["gp"] = float(gp.detach())
        opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self._clip(self.critic)
        opt.step()
        logs["loss_critic"] = float(d_loss.detach())
        return logs

    def generator_update(self, c: Tensor, opt: torch.optim.Optimizer, step: int) -> dict[str, float]:
        """One generator update for the conditions c; returns the logged values."""
        aux = [m for m in self.children() if m is not self.generator]
        with frozen(*aux):
            fake = self.generate(self._latent(c.shape[0], c), c)
            _, g_loss = self._adversarial_losses(None, self.critic_score(self.critic_input(fake), c))
            penalties = self.generator_penalties(fake, c, step)
            total = g_loss + sum(penalties.values(), torch.zeros((), dtype=g_loss.dtype, device=g_loss.device))
            opt.zero_grad(set_to_none=True)
            total.backward()
        self._clip(self.generator)
        opt.step()
        if self.generator_average is not None:
            ema_update(self.generator_average, self.generator, self.config.ema, step // self.config.n_critic)
        logs = {"loss_generator": float(total.detach()), "generator_adv": float(g_loss.detach())}
        logs.update({k: float(v.detach()) for k, v in penalties.items()})
        return logs

    def training_step(
        self, x: Tensor, c: Tensor, optimizers: list[torch.optim.Optimizer], step: int
    ) -> dict[str, float]:
        """Critic update, auxiliary update, and (every ``n_critic``-th step) a generator update.

        Args:
            x: (B, V) real model-space showers.
            c: (B, C) their conditions; generated showers use the same conditions.
            optimizers: as returned by :meth:`configure_optimizers`.
            step: global step counter (0-based), which fixes the schedule.

        Returns:
            floats to log; ``"loss"`` is the critic loss (with GP), logged every step.
            Generator values (``loss_generator``...) appear only on generator steps.
        """
        opt_g, opt_d, *aux_opts = optimizers
        logs = self.critic_update(x, c, opt_d)
        logs.update(self.auxiliary_step(x, c, aux_opts, step))
        if self.is_generator_step(step):
            logs.update(self.generator_update(c, opt_g, step))
        logs["loss"] = logs["loss_critic"]
        return logs


# --- networks -------------------------------------------------------------------------


class DenseGenerator(nn.Module):
    """``[z, c] -> MLP -> (B, V)`` with a linear output (model space is unbounded)."""

    def __init__(self, latent_dim: int, cond_dim: int, n_voxels: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.net = mlp(latent_dim + cond_dim, hidden, depth, n_voxels)

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        return self.net(torch.cat([z, c], dim=1))


class DenseCritic(nn.Module):
    """``[x, c] -> MLP -> (B,)`` scores."""

    def __init__(self, n_voxels: int, cond_dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.net = mlp(n_voxels + cond_dim, hidden, depth, 1)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.net(torch.cat([x, c], dim=1)).squeeze(1)


class LayerwiseGenerator(nn.Module):
    """Generator for many equal-sized layers (e.g. 30 x 30x30 cells).

    A trunk MLP maps ``[z, c]`` to one code of width ``d`` per layer; a layer
    embedding is added and a decoder *shared by all layers* maps each code to that
    layer's cells. Parameters grow with cells-per-layer instead of with V, which
    is what makes 10^4-10^5 voxels tractable for an MLP GAN.
    """

    def __init__(
        self, latent_dim: int, cond_dim: int, n_layers: int, cells: int, hidden: int, depth: int, d: int
    ) -> None:
        super().__init__()
        self.n_layers, self.cells, self.d = n_layers, cells, d
        self.trunk = mlp(latent_dim + cond_dim, hidden, depth, n_layers * d)
        self.layer_embedding = nn.Parameter(torch.randn(n_layers, d) * 0.1)
        self.decoder = mlp(d, hidden, 1, cells)

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        codes = self.trunk(torch.cat([z, c], dim=1)).view(-1, self.n_layers, self.d) + self.layer_embedding
        return self.decoder(F.leaky_relu(codes, 0.2)).flatten(1)


class LayerwiseCritic(nn.Module):
    """Critic for many equal-sized layers: a shared per-layer encoder, then an MLP over all codes."""

    def __init__(self, n_layers: int, cells: int, cond_dim: int, hidden: int, depth: int, d: int) -> None:
        super().__init__()
        self.n_layers, self.cells = n_layers, cells
        self.encoder = mlp(cells, hidden, 1, d)
        self.layer_embedding = nn.Parameter(torch.randn(n_layers, d) * 0.1)
        self.head = mlp(n_layers * d + cond_dim, hidden, depth, 1)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        codes = self.encoder(x.view(-1, self.n_layers, self.cells)) + self.layer_embedding
        return self.head(torch.cat([F.leaky_relu(codes, 0.2).flatten(1), c], dim=1)).squeeze(1)


class ConvCritic(nn.Module):
    """Critic of convolutions over a one-layer image (the Belle II crystal array), then an MLP head.

    Input ``h`` (B, n_images * R*C + K): ``n_images`` (R, C) images, row-major, one after the other
    (the convolutions' input channels), followed by K extra features (the standardised shower
    observables of ``output="fraction"``, or none). Three 3x3 convolutions
    (``channels``, ``2 channels``, ``2 channels``; the first two keep the size, the third has no
    padding) with LeakyReLU, flattened, concatenated with the features and the conditions, then an
    MLP of ``depth`` hidden layers to one score. No normalisation layers (the gradient penalty is
    per sample).
    """

    def __init__(self, shape: tuple[int, int], n_extra: int, cond_dim: int, channels: int, hidden: int,
                 depth: int, out_dim: int = 1, n_images: int = 1) -> None:
        super().__init__()
        self.shape, self.n_extra, self.n_images = (int(shape[0]), int(shape[1])), int(n_extra), int(n_images)
        r, c = self.shape
        ch = int(channels)
        self.conv = nn.Sequential(
            nn.Conv2d(self.n_images, ch, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, 2 * ch, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * ch, 2 * ch, 3, padding=0 if min(r, c) >= 3 else 1), nn.LeakyReLU(0.2),
        )
        n_conv = 2 * ch * (max(r - 2, 1) * max(c - 2, 1) if min(r, c) >= 3 else r * c)
        self.head = mlp(n_conv + self.n_extra + cond_dim, hidden, depth, out_dim)
        self.out_dim = out_dim

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        r, cc = self.shape
        n_img = self.n_images * r * cc
        img = h[:, :n_img].reshape(-1, self.n_images, r, cc)
        feats = [self.conv(img).flatten(1), h[:, n_img:], c]
        out = self.head(torch.cat(feats, dim=1))
        return out.squeeze(1) if self.out_dim == 1 else out


class ConvRegressor(nn.Module):
    """A constrainer of convolutions: :class:`ConvCritic`'s layout regressing ``out_dim`` values from ``h``
    alone (no conditions: it predicts them)."""

    def __init__(self, shape: tuple[int, int], n_extra: int, channels: int, hidden: int, out_dim: int,
                 n_images: int = 1) -> None:
        super().__init__()
        self.net = ConvCritic(shape, n_extra, 0, channels, hidden, 1, out_dim=out_dim, n_images=n_images)

    def forward(self, h: Tensor) -> Tensor:
        out = self.net(h, h[:, :0])
        return out.unsqueeze(1) if out.dim() == 1 else out


class FractionGenerator(nn.Module):
    """``[z, c] -> MLP -> (B, V)`` fractions of E_inc, factorised as energy x shape.

    The MLP's V + 1 outputs ``a`` give ``x = softmax(a[:V]) * sigmoid(a[V] + bias)``: the shower's
    visible fraction ``sum_v x_v = sigmoid(a[V] + bias)`` (in (0, 1): a shower cannot deposit more
    than it brought) under one output, and the shape as a softmax, whose logits are log cell
    fractions, so that cells from 1e-6 to 1 of the energy are equally easy to produce. ``bias``
    (3.0) starts the visible fraction near 0.95, where a contained electromagnetic shower is.
    """

    def __init__(self, latent_dim: int, cond_dim: int, n_voxels: int, hidden: int, depth: int,
                 bias: float = 3.0) -> None:
        super().__init__()
        self.net = mlp(latent_dim + cond_dim, hidden, depth, n_voxels + 1)
        self.bias = float(bias)

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        a = self.net(torch.cat([z, c], dim=1))
        return torch.softmax(a[:, :-1], dim=1) * torch.sigmoid(a[:, -1:] + self.bias)


def shower_features(x: Tensor, spec: ModelSpec) -> Tensor:
    """Observables of showers given as fractions of E_inc, x (B, V) -> (B, K), differentiable in x.

    Always ``log(E_tot / E_inc)`` and ``log(E_max / E_tot)`` (the largest cell's share). One layer of at
    least 3x3 cells (a crystal array): also E1/E9 and E9/E25 around the largest cell, as
    :func:`fastshower.validate.observables.e1_e9_e25` defines them. Several layers: each layer's
    ``log(E_layer / E_tot)``. The small offsets keep empty showers finite.
    """
    tot = x.sum(1)
    out = [torch.log(tot + 1e-6), torch.log(x.max(1).values + 1e-9) - torch.log(tot + 1e-9)]
    if len(spec.layer_sizes) == 1 and min(spec.layer_shapes[0]) >= 3:
        r, c = spec.layer_shapes[0]
        img = x.reshape(-1, 1, r, c)
        e9 = F.avg_pool2d(img, 3, stride=1, padding=1, count_include_pad=True, divisor_override=1).flatten(1)
        e25 = F.avg_pool2d(img, 5, stride=1, padding=2, count_include_pad=True, divisor_override=1).flatten(1)
        idx = x.argmax(1, keepdim=True)
        e1, e9m, e25m = x.gather(1, idx)[:, 0], e9.gather(1, idx)[:, 0], e25.gather(1, idx)[:, 0]
        out += [e1 / (e9m + 1e-9), e9m / (e25m + 1e-9)]
    elif len(spec.layer_sizes) > 1:
        for part in torch.split(x, list(spec.layer_sizes), dim=1):
            out.append(torch.log(part.sum(1) + 1e-9) - torch.log(tot + 1e-9))
    return torch.stack(out, dim=1)


# --- the model ------------------------------------------------------------------------


#: the spellings of ``net`` before it was shared with the other families -> the present ones
_OLD_NETS = {"dense": "mlp", "layerwise": "layers"}


@dataclass(frozen=True)
class WGANConfig(AdversarialConfig):
    """Hyper-parameters of :class:`WGANGP` (with those of :class:`AdversarialConfig`).

    Attributes:
        hidden, depth: width and number of hidden layers of generator and critic MLPs (``n_hidden`` before).
        net: "mlp" (MLPs over all V voxels), "layers" (shared per-layer decoder/encoder; needs
            equal-sized layers), "conv" (critic and constrainers of 3x3 convolutions over the image of a
            one-layer geometry, the Belle II crystal array; the generator stays an MLP) or "auto" (layers
            when V > ``mlp_max_voxels`` and all layers have the same size, else mlp). Before: ``arch`` =
            "dense", "layerwise", "auto" (still accepted).
        mlp_max_voxels: the largest V for which ``net="auto"`` picks "mlp" (``dense_max_voxels`` before).
        layer_dim: per-layer code width of the "layers" variant (``layer_code`` before).
        conv_channels: channels of the first convolution of "conv" (then twice as many).
        output: what model space holds. "free": any unbounded per-voxel space (the default transform,
            standardised ``log(voxel / E_inc)``), generated by a linear output. "fraction": the fraction
            of E_inc per voxel (train with ``transform = ["per_incident"]``), generated as energy x shape
            (:class:`FractionGenerator`); the critic and the constrainers then see ``log(x + log_eps)``
            per voxel and, with ``critic_features``, the shower observables of :func:`shower_features`,
            each standardised on the first real batch.
        critic_features: with ``output="fraction"``, show the critic the observables (total energy,
            largest cell, E1/E9, E9/E25) beside the cells, so that its gradient penalty measures them in
            their own standard deviations.
        linear_cells: with ``output="fraction"``, show the critic the cells also as fractions of E_inc
            (standardised), beside their logs: the logs resolve the smallest deposits and the empty
            crystals, the linear values the large ones (what a classifier on the cells sees).
        log_eps: offset of the critic's ``log(x + log_eps)`` in ``output="fraction"``, a fraction of E_inc;
            below the readout threshold (Belle II: 0.009 MeV, 4e-6 of 2 GeV), so that the critic tells an
            empty crystal from the smallest real hits and the generator learns to leave crystals empty.
        energy_constrainer: train an incident-energy regressor and use it.
        position_constrainer: same for the entry position (only when the conditions
            have position columns, see :func:`position_columns`).
        energy_weight, position_weight: weights of the constrainers' squared errors
            (in condition standard deviations squared) in the generator loss.
        constrainer_hidden, constrainer_lr: constrainer MLP width and Adam learning rate.
        constrainer_warmup: steps during which the constrainers train but are not yet
            used by the generator (an untrained regressor would push it at random).
    """

    hidden: int = 256
    depth: int = 3
    net: str = "auto"
    mlp_max_voxels: int = 2000
    layer_dim: int = 32
    conv_channels: int = 16
    output: str = "free"
    critic_features: bool = True
    linear_cells: bool = True
    log_eps: float = 1e-7
    energy_constrainer: bool = True
    position_constrainer: bool = True
    energy_weight: float = 1.0
    position_weight: float = 1.0
    constrainer_hidden: int = 128
    constrainer_lr: float = 1e-3
    constrainer_warmup: int = 1000

    renamed: ClassVar[dict[str, str]] = {**AdversarialConfig.renamed, "n_hidden": "depth", "arch": "net",
                                         "dense_max_voxels": "mlp_max_voxels", "layer_code": "layer_dim"}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {**AdversarialConfig.choices,
                                                     "net": ("auto", "mlp", "layers", "conv"),
                                                     "output": ("free", "fraction")}

    def __post_init__(self) -> None:
        object.__setattr__(self, "net", _OLD_NETS.get(self.net, self.net))

    def check(self, where: str) -> None:
        super().check(where)
        if not self.log_eps > 0:
            raise ConfigError(f"{where}: log_eps must be > 0, got {self.log_eps}")


@register
class WGANGP(AdversarialShowerModel):
    """Conditional WGAN-GP with optional energy/position constrainers ("wgan-gp").

    Shapes: showers x (B, V) in model space (``output="free"``: standardised log of voxel / E_inc,
    the default transform; ``output="fraction"``: voxel / E_inc); conditions c (B, C), column 0 the
    standardised log incident energy.

    Hyper-parameters: :class:`WGANConfig`.

    Optimizers: ``[generator, critic]`` plus ``[constrainers]`` (one Adam over both
    constrainer networks) when at least one constrainer exists.
    """

    name: ClassVar[str] = "wgan-gp"
    default_transform: ClassVar[tuple[str, ...]] = ("per_incident", "log", "standardize")
    config_class: ClassVar[type[ModelConfig]] = WGANConfig
    config: WGANConfig
    h_shift: Tensor
    h_scale: Tensor
    scaler_ready: Tensor

    def __init__(self, spec: ModelSpec, config: WGANConfig | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(spec, config, **overrides)
        cfg = self.config
        V, C = spec.n_voxels, spec.cond_dim
        hidden, depth = cfg.hidden, cfg.depth
        sizes = set(spec.layer_sizes)
        net = cfg.net
        if net == "auto":
            net = "layers" if V > cfg.mlp_max_voxels and len(sizes) == 1 else "mlp"
        fraction = cfg.output == "fraction"
        #: observables shown to the critic beside the cells (output="fraction" with critic_features)
        self.n_features = 0
        if fraction and cfg.critic_features:
            self.n_features = int(shower_features(torch.full((1, V), 1.0 / V), spec).shape[1])
        #: cell images in the critic's input: log cells, and the linear cells with ``linear_cells``
        self.n_images = 2 if fraction and cfg.linear_cells else 1
        H = self.n_images * V + self.n_features  # width of the critic's input h
        if net == "conv" and (len(spec.layer_sizes) != 1 or spec.layer_shapes[0][0] * spec.layer_shapes[0][1] != V):
            raise ValueError(f"net='conv' needs a one-layer image geometry, got layer shapes {spec.layer_shapes}")
        if fraction and net == "layers":
            raise ValueError("output='fraction' works with net 'mlp' or 'conv', not 'layers'")
        if net == "layers":
            if len(sizes) != 1:
                raise ValueError(f"net='layers' needs equal-sized layers, got sizes {spec.layer_sizes}")
            L, cells, d = len(spec.layer_sizes), spec.layer_sizes[0], cfg.layer_dim
            self.generator = LayerwiseGenerator(self.latent_dim, C, L, cells, hidden, depth, d)
            self.critic = LayerwiseCritic(L, cells, C, hidden, depth, d)
        else:
            self.generator = (FractionGenerator(self.latent_dim, C, V, hidden, depth) if fraction
                              else DenseGenerator(self.latent_dim, C, V, hidden, depth))
            self.critic = (ConvCritic(spec.layer_shapes[0], self.n_features, C, cfg.conv_channels, hidden, depth,
                                      n_images=self.n_images)
                           if net == "conv" else DenseCritic(H, C, hidden, depth))
        #: the network kind in use: "mlp", "layers" or "conv" (``net`` with "auto" resolved)
        self.net_kind: str = net
        self.init_generator_average()

        ch = cfg.constrainer_hidden
        self.pos_cols: list[int] = position_columns(spec) if cfg.position_constrainer else []

        def regressor(out_dim: int) -> nn.Module:
            # separate regressors, as in the Belle II design; convolutional with net="conv"
            if net == "conv":
                return ConvRegressor(spec.layer_shapes[0], self.n_features, max(cfg.conv_channels // 2, 1), ch, out_dim,
                                     n_images=self.n_images)
            return mlp(H, ch, 2, out_dim)

        self.energy_constrainer: nn.Module | None = regressor(1) if cfg.energy_constrainer else None
        self.position_constrainer: nn.Module | None = regressor(len(self.pos_cols)) if self.pos_cols else None
        if fraction:
            # standardisation of the critic's input, fitted on the first real batch (saved with the weights)
            self.register_buffer("h_shift", torch.zeros(H))
            self.register_buffer("h_scale", torch.ones(H))
            self.register_buffer("scaler_ready", torch.zeros(()))

    # -- the critic's space (output="fraction") --
    def critic_input(self, x: Tensor) -> Tensor:
        """``output="free"``: x itself. ``"fraction"``: ``[log(x + log_eps), x, shower_features(x)]``, standardised
        (x only with ``linear_cells``, the features only with ``critic_features``)."""
        if self.config.output != "fraction":
            return x
        parts = [torch.log(x.clamp_min(0.0) + self.config.log_eps)]
        if self.n_images == 2:
            parts.append(x)
        if self.n_features:
            parts.append(shower_features(x.clamp_min(0.0), self.spec))
        return (torch.cat(parts, dim=1) - self.h_shift) / self.h_scale

    @torch.no_grad()
    def fit_scaler(self, x: Tensor) -> None:
        """Fit the critic-input standardisation on real showers x (B, V), fractions of E_inc.

        Raises:
            ValueError: x is not a fraction of E_inc (negative values, or sums far above 1): the run's
                transform is not ``["per_incident"]``.
        """
        if float(x.min()) < -1e-6 or float(x.sum(1).max()) > 1.5:
            raise ValueError("wgan-gp with output='fraction' needs showers as fractions of E_inc "
                             "(train with transform = [\"per_incident\"]); got values "
                             f"in [{float(x.min()):.3g}, {float(x.max()):.3g}], sums up to {float(x.sum(1).max()):.3g}")
        self.h_shift.zero_()
        self.h_scale.fill_(1.0)
        h = self.critic_input(x)
        self.h_shift.copy_(h.mean(0))
        self.h_scale.copy_(h.std(0).clamp_min(1e-5))
        self.scaler_ready.fill_(1.0)

    def training_step(
        self, x: Tensor, c: Tensor, optimizers: list[torch.optim.Optimizer], step: int
    ) -> dict[str, float]:
        """:meth:`AdversarialShowerModel.training_step`, after fitting the critic's scaler on the first batch."""
        if self.config.output == "fraction" and not bool(self.scaler_ready):
            self.fit_scaler(x)
        return super().training_step(x, c, optimizers, step)

    # -- networks --
    def generate(self, z: Tensor, c: Tensor) -> Tensor:
        return self.generator(z, c)

    def critic_score(self, h: Tensor, c: Tensor) -> Tensor:
        return self.critic(h, c)

    # -- constrainers --
    def constrainer_errors(self, x: Tensor, c: Tensor) -> dict[str, Tensor]:
        """Mean squared errors of the constrainers on showers x (B, V) against conditions c (B, C).

        Keys ``energy_constraint`` and ``position_constraint`` (present only for the
        constrainers that exist); units: squared standard deviations of the condition. The
        constrainers see the critic's input (:meth:`critic_input`).
        """
        out: dict[str, Tensor] = {}
        if self.energy_constrainer is None and self.position_constrainer is None:
            return out
        h = self.critic_input(x)
        if self.energy_constrainer is not None:
            out["energy_constraint"] = F.mse_loss(self.energy_constrainer(h).squeeze(1), c[:, 0])
        if self.position_constrainer is not None:
            out["position_constraint"] = F.mse_loss(self.position_constrainer(h), c[:, self.pos_cols])
        return out

    def generator_penalties(self, fake: Tensor, c: Tensor, step: int) -> dict[str, Tensor]:
        """Weighted constrainer errors on generated showers; zero weight during the warm-up.

        ``step=-1`` (evaluation) reports the weighted errors regardless of the warm-up.
        """
        if 0 <= step < self.config.constrainer_warmup:
            return {}
        weights = {"energy_constraint": self.config.energy_weight, "position_constraint": self.config.position_weight}
        return {f"gen_{k}": weights[k] * v for k, v in self.constrainer_errors(fake, c).items()}

    def _constrainer_params(self) -> list[nn.Parameter]:
        nets = [m for m in (self.energy_constrainer, self.position_constrainer) if m is not None]
        return [p for m in nets for p in m.parameters()]

    def auxiliary_optimizers(self) -> list[torch.optim.Optimizer]:
        params = self._constrainer_params()
        if not params:
            return []
        return [torch.optim.Adam(params, lr=self.config.constrainer_lr)]

    def auxiliary_step(
        self, x: Tensor, c: Tensor, optimizers: Sequence[torch.optim.Optimizer], step: int
    ) -> dict[str, float]:
        """One regression update of the constrainers on the real batch (x (B, V), c (B, C))."""
        if not optimizers:
            return {}
        (opt,) = optimizers
        errors = self.constrainer_errors(x, c)
        total = sum(errors.values(), torch.zeros((), dtype=x.dtype, device=x.device))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return {k: float(v.detach()) for k, v in errors.items()}

    def loss(self, x: Tensor, c: Tensor) -> dict[str, Tensor]:
        """As :meth:`AdversarialShowerModel.loss`, plus the constrainers' errors on real showers."""
        out = super().loss(x, c)
        out.update(self.constrainer_errors(x, c))
        return out
