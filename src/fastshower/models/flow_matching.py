"""Conditional flow matching (rectified flow, straight optimal-transport path).

Objective (Lipman et al. 2022, Liu et al. 2022): with noise x0 ~ N(0, I), data x1 and
t ~ p(t) on [0, 1], the path is x_t = (1 - t) x0 + t x1 and the network v(x_t, t, c) is
regressed on the path's velocity x1 - x0 (mean squared error). Sampling integrates
dx/dt = v(x, t, c) from t = 0 to 1 with a fixed-step ODE solver (Euler, midpoint or
Heun); the number of steps is chosen at sampling time (the config's ``steps`` by default).

Training choices that matter on small CPU budgets (measured on belle2-ecl-5x5):
an exponential moving average of the weights is used for sampling (``ema``), the
learning rate warms up then follows a cosine decay to 5 % (``warmup``, ``schedule``),
and t can be drawn logit-normal (``t_dist``) to weight the middle of the path, where
the velocity is hardest to learn.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastshower.models import register
from fastshower.models.base import ModelConfig, ModelSpec, ShowerModel, warmup_cosine
from fastshower.models.nets import MLP, LayerTokenNet, ResidualMLP, SinusoidalEmbedding, auto_net, ema_update

__all__ = ["FlowMatching", "FlowMatchingConfig", "VelocityNet", "draw_t", "ema_update", "odeint"]

#: the fixed-step ODE solvers of :func:`odeint`
ODE_METHODS = ("euler", "midpoint", "heun")

Velocity = Callable[[Tensor, Tensor], Tensor]


def odeint(f: Velocity, x: Tensor, steps: int, method: str = "midpoint") -> Tensor:
    """Integrate dx/dt = f(x, t) from t = 0 to 1 in ``steps`` equal steps.

    Args:
        f: velocity, (x (B, V), t (B, 1)) -> (B, V).
        x: state at t = 0, (B, V).
        steps: number of steps (function evaluations: 1 per step for Euler, 2 for midpoint/Heun).
        method: "euler", "midpoint" or "heun".
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    h = 1.0 / steps
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    for i in range(steps):
        t = ones * (i * h)
        if method == "euler":
            x = x + h * f(x, t)
        elif method == "midpoint":
            x = x + h * f(x + 0.5 * h * f(x, t), t + 0.5 * h)
        elif method == "heun":
            k1 = f(x, t)
            k2 = f(x + h * k1, t + h)
            x = x + 0.5 * h * (k1 + k2)
        else:
            raise ValueError(f"unknown ODE method {method!r}; choose euler, midpoint or heun")
    return x


def draw_t(n: int, like: Tensor, dist: str) -> Tensor:
    """Path times (n, 1) in [0, 1]: "uniform", or "logit_normal" (sigmoid of N(0, 1): the middle weighted)."""
    if dist == "logit_normal":
        return torch.sigmoid(torch.randn(n, 1, dtype=like.dtype, device=like.device))
    return torch.rand(n, 1, dtype=like.dtype, device=like.device)


class VelocityNet(nn.Module):
    """v(x (B, V), t (B, 1), c (B, C)) -> (B, V); the dense or per-layer body is picked from the spec."""

    def __init__(self, spec: ModelSpec, net: str, hidden: int, depth: int, emb_dim: int, time_freqs: int,
                 layer_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.time = SinusoidalEmbedding(time_freqs)
        self.embed = MLP([2 * time_freqs + spec.cond_dim, emb_dim, emb_dim])
        kind = auto_net(net, spec.n_voxels)
        self.body: nn.Module
        if kind == "mlp":
            self.body = ResidualMLP(spec.n_voxels, spec.n_voxels, emb_dim, hidden, depth, dropout)
        else:
            self.body = LayerTokenNet(spec.layer_sizes, emb_dim, layer_dim, depth, heads, dropout)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        emb = self.embed(torch.cat([self.time(t), c], dim=1))
        return self.body(x, emb)


@dataclass(frozen=True)
class FlowMatchingConfig(ModelConfig):
    """Hyper-parameters of :class:`FlowMatching`.

    Attributes:
        net: "auto" (dense residual MLP for V <= 5000, per-layer tokens above), "mlp", "layers".
        hidden, depth: width and number of residual blocks of the dense net (depth is also
            the number of transformer layers of the per-layer net).
        emb_dim, time_freqs: embedding width; sin/cos frequencies of the time embedding.
        layer_dim, heads: per-layer net: token width per readout layer (``token_dim`` before) and
            attention heads.
        dropout: drop probability in the residual blocks.
        lr, weight_decay, grad_clip: AdamW learning rate and decoupled weight decay, gradient-norm clip.
        warmup, schedule: steps of linear lr warm-up; "cosine" (to 5 % of lr) or "constant" after it.
        ema: per-step decay of the weight average used for sampling (0 disables).
        t_dist: "uniform" or "logit_normal" (t = sigmoid(N(0, 1))).
        steps, method: default ODE steps and solver ("euler", "midpoint", "heun") of :meth:`FlowMatching.sample`.
    """

    net: str = "auto"
    hidden: int = 256
    depth: int = 4
    emb_dim: int = 128
    time_freqs: int = 16
    layer_dim: int = 128
    heads: int = 4
    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    warmup: int = 200
    schedule: str = "cosine"
    ema: float = 0.999
    t_dist: str = "logit_normal"
    steps: int = 32
    method: str = "midpoint"

    renamed: ClassVar[dict[str, str]] = {"token_dim": "layer_dim"}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        "net": ("auto", "mlp", "layers"),
        "schedule": ("cosine", "constant"),
        "t_dist": ("uniform", "logit_normal"),
        "method": ODE_METHODS,
    }


@register
class FlowMatching(ShowerModel):
    """Conditional flow matching on model-space showers (B, V) given conditions (B, C).

    Hyper-parameters: :class:`FlowMatchingConfig`.
    """

    name: ClassVar[str] = "flow-matching"
    default_transform: ClassVar[tuple[str, ...]] = ("per_incident", "log", "standardize")
    config_class: ClassVar[type[ModelConfig]] = FlowMatchingConfig
    config: FlowMatchingConfig

    def __init__(self, spec: ModelSpec, config: FlowMatchingConfig | Mapping[str, Any] | None = None,
                 **overrides: Any) -> None:
        super().__init__(spec, config, **overrides)
        cfg = self.config
        self.net = VelocityNet(spec, cfg.net, cfg.hidden, cfg.depth, cfg.emb_dim, cfg.time_freqs, cfg.layer_dim,
                               cfg.heads, cfg.dropout)
        self.ema_net: VelocityNet | None = None
        if cfg.ema > 0:
            # a frozen copy, part of state_dict so checkpoints and resume carry it
            self.ema_net = copy.deepcopy(self.net).requires_grad_(False)

    # -- objective -------------------------------------------------------------------
    def loss(self, x: Tensor, c: Tensor) -> dict[str, Tensor]:
        """MSE between v(x_t, t, c) and x1 - x0; x (B, V) model space, c (B, C)."""
        x0 = torch.randn_like(x)
        t = draw_t(x.shape[0], x, self.config.t_dist)
        xt = (1 - t) * x0 + t * x
        v = self.net(xt, t, c)
        return {"loss": ((v - (x - x0)) ** 2).mean()}

    # -- training --------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        params = [p for p in self.net.parameters() if p.requires_grad]
        return [torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)]

    def configure_schedulers(
        self, optimizers: list[torch.optim.Optimizer], total_steps: int
    ) -> list[torch.optim.lr_scheduler.LRScheduler]:
        return warmup_cosine(optimizers, self.config.warmup, total_steps, cosine=self.config.schedule == "cosine")

    def training_step(
        self, x: Tensor, c: Tensor, optimizers: list[torch.optim.Optimizer], step: int
    ) -> dict[str, float]:
        logs = super().training_step(x, c, optimizers, step)
        if self.ema_net is not None:
            ema_update(self.ema_net, self.net, self.config.ema, step)
        return logs

    # -- sampling --------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, c: Tensor, generator: torch.Generator | None = None, steps: int | None = None,
               method: str | None = None) -> Tensor:
        """Model-space showers (B, V) for conditions c (B, C): integrate the learned ODE from noise.

        Args:
            c: conditions (B, C).
            generator: torch generator for the initial noise (same generator state -> same sample).
            steps: ODE steps (default: the config's ``steps``).
            method: "euler", "midpoint" or "heun" (default: the config's ``method``).
        """
        return self.sample_from_noise(self.draw_noise(c.shape[0], generator, c.dtype, c.device), c, steps=steps,
                                      method=method)

    def noise_dim(self) -> int:
        """The ODE starts from one standard-normal number per voxel."""
        return int(self.spec.n_voxels)

    def sample_from_noise(self, z: Tensor, c: Tensor, steps: int | None = None, method: str | None = None,
                          **options: Any) -> Tensor:
        """Integrate the learned ODE from z (B, V) at t=0 to showers at t=1 (a fixed unrolled loop: traceable)."""
        if options:
            raise ValueError(f"model 'flow-matching' takes steps and method, got {sorted(options)}")
        net = self.ema_net if self.ema_net is not None else self.net
        n_steps = int(steps if steps is not None else self.config.steps)
        return odeint(lambda x, t: net(x, t, c), z, n_steps, str(method or self.config.method))
