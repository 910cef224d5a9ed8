"""One-step student of a flow-matching teacher (knowledge distillation of the sampling ODE).

A trained flow-matching model maps noise to showers *deterministically*: the ODE carries
z (B, V) at t = 0 to x (B, V) at t = 1. That map can be regressed by a single network
pass, x ~ z + G(z, c), trained on (z, c, x) triples drawn from the teacher (Luhman &
Luhman 2021, "Knowledge distillation in iterative generative models", arXiv:2101.02388).
Rectified-flow paths are nearly straight, so the map is smooth and a small net learns it;
sampling then costs one pass of that small net instead of 2 x ``steps`` passes of the
teacher's velocity net, which is what deployment inside a simulation framework needs.

The student is not trained on showers: :func:`fastshower.distill.distill` makes it. Its
:meth:`OneStep.loss` takes "pair" rows, the teacher's model-space shower followed by the
noise it came from, so the generic one-optimizer training step serves it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from fastshower.models import register
from fastshower.models.base import ModelSpec, ShowerModel, warmup_cosine
from fastshower.models.nets import MLP, ResidualMLP

__all__ = ["OneStep"]


@register
class OneStep(ShowerModel):
    """Single-pass generator x = z + G(z, c) distilled from a flow-matching run.

    Hyper-parameters (``defaults``):
        hidden, depth: width and residual blocks of G (small on purpose: speed is its reason to be).
        emb_dim: width of the condition embedding added in every block.
        lr, weight_decay, grad_clip, warmup: AdamW with linear warm-up then cosine decay to 5 %.
        teacher: the teacher run folder (provenance only).
        teacher_steps, teacher_method: the ODE the pairs were integrated with (provenance only).
    """

    name: ClassVar[str] = "one-step"
    trainable: ClassVar[bool] = False
    default_transform: ClassVar[tuple[str, ...]] = ("per_incident", "log", "standardize")
    defaults: ClassVar[dict[str, Any]] = {
        "hidden": 64,
        "depth": 2,
        "emb_dim": 32,
        "lr": 2e-3,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "warmup": 200,
        "teacher": "",
        "teacher_steps": 0,
        "teacher_method": "",
    }

    def __init__(self, spec: ModelSpec, **hparams: Any) -> None:
        super().__init__(spec, **hparams)
        hp = self.hparams
        emb = int(hp["emb_dim"])
        self.embed = MLP([spec.cond_dim, emb, emb])
        self.body = ResidualMLP(spec.n_voxels, spec.n_voxels, emb, int(hp["hidden"]), int(hp["depth"]))

    def noise_dim(self) -> int:
        """One standard-normal number per voxel: the teacher ODE's starting point."""
        return int(self.spec.n_voxels)

    def sample_from_noise(self, z: Tensor, c: Tensor, **options: Any) -> Tensor:
        """Model-space showers (B, V) from noise z (B, V) and conditions c (B, C) in one pass.

        The skip connection carries z: the teacher's map is the identity plus the integrated
        velocity, so G only learns the displacement.
        """
        if options:
            raise ValueError(f"model 'one-step' has no sampler options (it is a single pass), got {sorted(options)}")
        return z + self.body(z, self.embed(c))

    @torch.no_grad()
    def sample(self, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.sample_from_noise(self.draw_noise(c.shape[0], generator, c.dtype, c.device), c)

    def loss(self, x: Tensor, c: Tensor) -> dict[str, Tensor]:
        """MSE to the teacher on pair rows x (B, 2V) = [teacher shower (V), its noise (V)], c (B, C)."""
        v = self.spec.n_voxels
        if x.shape[1] != 2 * v:
            raise ValueError(f"one-step loss expects pair rows of width 2 x {v} (teacher shower, noise), "
                             f"got {x.shape[1]}")
        target, z = x[:, :v], x[:, v:]
        return {"loss": ((self.sample_from_noise(z, c) - target) ** 2).mean()}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        return [torch.optim.AdamW(self.parameters(), lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]))]

    def configure_schedulers(
        self, optimizers: list[torch.optim.Optimizer], total_steps: int
    ) -> list[torch.optim.lr_scheduler.LRScheduler]:
        return warmup_cosine(optimizers, int(self.hparams["warmup"]), total_steps)
