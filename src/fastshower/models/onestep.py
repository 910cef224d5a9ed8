"""One-step student of a multi-pass teacher (knowledge distillation of a deterministic sampler).

A trained flow-matching model maps noise to showers *deterministically*: the ODE carries
z (B, V) at t = 0 to x (B, V) at t = 1. That map can be regressed by a single network
pass, x ~ z + G(z, c), trained on (z, c, x) triples drawn from the teacher (Luhman &
Luhman 2021, "Knowledge distillation in iterative generative models", arXiv:2101.02388).
Rectified-flow paths are nearly straight, so the map is smooth and a small net learns it;
sampling then costs one pass of that small net instead of 2 x ``steps`` passes of the
teacher's velocity net, which is what deployment inside a simulation framework needs. The
two-stage ``flow`` is a deterministic noise-to-shower map too (its inverse transforms), and is
distilled the same way, without the skip connection (its noise has L + V numbers).

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
    """Single-pass generator x = z + G(z, c) (flow-matching teacher) or G(z, c) (flow teacher).

    Hyper-parameters (``defaults``):
        hidden, depth: width and residual blocks of G (small on purpose: speed is its reason to be).
        emb_dim: width of the condition embedding added in every block.
        lr, weight_decay, grad_clip, warmup: AdamW with linear warm-up then cosine decay to 5 %.
        noise_dim: noise numbers per shower, the teacher's (0: one per voxel, as flow matching draws).
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
        "noise_dim": 0,
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
        self.body = ResidualMLP(self.noise_dim(), spec.n_voxels, emb, int(hp["hidden"]), int(hp["depth"]))
        # the teacher's map is the identity plus the integrated velocity when noise and shower share a space
        self.skip = self.noise_dim() == spec.n_voxels

    def noise_dim(self) -> int:
        """The teacher's noise width: one number per voxel for flow matching, L + V for the two-stage flow."""
        return int(self.hparams["noise_dim"]) or int(self.spec.n_voxels)

    def sample_from_noise(self, z: Tensor, c: Tensor, **options: Any) -> Tensor:
        """Model-space showers (B, V) from noise z (B, D) and conditions c (B, C) in one pass.

        With D = V (a flow-matching teacher) the skip connection carries z and G only learns the
        displacement the ODE adds.
        """
        if options:
            raise ValueError(f"model 'one-step' has no sampler options (it is a single pass), got {sorted(options)}")
        out = self.body(z, self.embed(c))
        return z + out if self.skip else out

    @torch.no_grad()
    def sample(self, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.sample_from_noise(self.draw_noise(c.shape[0], generator, c.dtype, c.device), c)

    def loss(self, x: Tensor, c: Tensor) -> dict[str, Tensor]:
        """MSE to the teacher on pair rows x (B, V + D) = [teacher shower (V), its noise (D)], c (B, C)."""
        v = self.spec.n_voxels
        if x.shape[1] != v + self.noise_dim():
            raise ValueError(f"one-step loss expects pair rows of width {v} + {self.noise_dim()} (teacher shower, "
                             f"noise), got {x.shape[1]}")
        target, z = x[:, :v], x[:, v:]
        return {"loss": ((self.sample_from_noise(z, c) - target) ** 2).mean()}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        return [torch.optim.AdamW(self.parameters(), lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]))]

    def configure_schedulers(
        self, optimizers: list[torch.optim.Optimizer], total_steps: int
    ) -> list[torch.optim.lr_scheduler.LRScheduler]:
        return warmup_cosine(optimizers, int(self.hparams["warmup"]), total_steps)
