"""One-step student of a multi-pass teacher (knowledge distillation of a deterministic sampler).

A trained flow-matching model maps noise to showers *deterministically*: the ODE carries
z (B, V) at t = 0 to x (B, V) at t = 1. That map can be regressed by a single network
pass, x ~ z + G(z, c), trained on (z, c, x) triples drawn from the teacher (Luhman &
Luhman 2021, "Knowledge distillation in iterative generative models", arXiv:2101.02388).
Rectified-flow paths are nearly straight, so the map is smooth and a small net learns it;
sampling then costs one pass of that small net instead of 2 x ``steps`` passes of the
teacher's velocity net, which is what deployment inside a simulation framework needs.

The two-stage ``flow`` is a deterministic noise-to-shower map too, but regressing the whole
shower on its L + V noise numbers blurs it (Belle II low-level AUC 0.95): the energy response
is what the flow gets right, and an MSE fit smears it. So a flow teacher is distilled *staged*
(``stage1`` holds the teacher's flow hyper-parameters): the student keeps the teacher's small
stage-1 flow (layer energies, L numbers, exact) and its scalers, and regresses only flow 2,
the map from stage-2 noise z2 (B, V) to the standardised logit voxel shares g2 (B, V), given
the conditions and g1. Flow 2 is a stack of coupling splines, each monotone in the voxel's own
coordinate, so g2_v is close to a monotone function of z2_v and the skip connection
g2 = z2 + G(z2, c, g1) applies. The layers are renormalised to the sampled layer energies as in
the teacher, so the student's energy response is the flow's.

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
from fastshower.models.flow import CaloFlow
from fastshower.models.nets import MLP, ResidualMLP

__all__ = ["OneStep"]


@register
class OneStep(ShowerModel):
    """Single-pass generator x = z + G(z, c) (flow-matching teacher), or staged (flow teacher).

    Hyper-parameters (``defaults``):
        hidden, depth: width and residual blocks of G (small on purpose: speed is its reason to be).
        emb_dim: width of the condition embedding added in every block.
        lr, weight_decay, grad_clip, warmup: AdamW with linear warm-up then cosine decay to 5 %.
        noise_dim: noise numbers per shower, the teacher's (0: one per voxel, as flow matching draws).
        teacher: the teacher run folder (provenance only).
        teacher_steps, teacher_method: the ODE the pairs were integrated with (provenance only).
        stage1: the flow teacher's hyper-parameters ({} for a flow-matching teacher); when set, the
            student holds that flow's stage 1 (frozen) and regresses only its stage-2 latents.
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
        "stage1": {},
    }

    def __init__(self, spec: ModelSpec, **hparams: Any) -> None:
        super().__init__(spec, **hparams)
        hp = self.hparams
        emb = int(hp["emb_dim"])
        self.stage1: CaloFlow | None = None
        v, cond = spec.n_voxels, spec.cond_dim
        if hp["stage1"]:
            self.stage1 = CaloFlow(spec, with_stage2=False, **dict(hp["stage1"]))
            self.stage1.requires_grad_(False)  # the teacher's, kept as it is
            cond += self.stage1.n_layers  # flow 2 is conditioned on g1 as well
            if self.noise_dim() != self.stage1.noise_dim():
                raise ValueError(f"a staged student draws the flow's L + V = {self.stage1.noise_dim()} noise "
                                 f"numbers, not {self.noise_dim()}")
            d_in = v
        else:
            d_in = self.noise_dim()
        self.embed = MLP([cond, emb, emb])
        self.body = ResidualMLP(d_in, v, emb, int(hp["hidden"]), int(hp["depth"]))
        # the teacher's map is the identity plus the integrated velocity when noise and shower share a space;
        # for a staged student, g2 and z2 share one (flow 2 is monotone in each voxel's own coordinate)
        self.skip = d_in == v

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
        if self.stage1 is not None:
            g1 = self.stage1.sample_stage1(z[:, : self.stage1.n_layers], c)
            return self.stage1.assemble(g1, self.stage2_latents(z, c, g1))
        out = self.body(z, self.embed(c))
        return z + out if self.skip else out

    def stage2_latents(self, z: Tensor, c: Tensor, g1: Tensor) -> Tensor:
        """Staged student: g2 (B, V) from noise z (B, L + V), conditions c (B, C) and g1 (B, L)."""
        z2 = z[:, -self.spec.n_voxels:]
        return z2 + self.body(z2, self.embed(torch.cat([c, g1], dim=1)))

    def regression_target(self, teacher: ShowerModel, z: Tensor, c: Tensor, **options: Any) -> Tensor:
        """What the student regresses for noise z (B, D) and conditions c (B, C), (B, V): the teacher's
        model-space shower (``options`` go to its sampler), or (staged) the flow teacher's stage-2 latents g2."""
        if self.stage1 is not None:
            if not isinstance(teacher, CaloFlow) or options:
                raise TypeError("a staged student needs a 'flow' teacher, which takes no sampler options")
            return teacher.sample_latents(z, c)[1]
        return teacher.sample_from_noise(z, c, **options)

    @torch.no_grad()
    def sample(self, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.sample_from_noise(self.draw_noise(c.shape[0], generator, c.dtype, c.device), c)

    def loss(self, x: Tensor, c: Tensor) -> dict[str, Tensor]:
        """MSE to the teacher on pair rows x (B, V + D) = [:meth:`regression_target` (V), its noise (D)], c (B, C)."""
        v = self.spec.n_voxels
        if x.shape[1] != v + self.noise_dim():
            raise ValueError(f"one-step loss expects pair rows of width {v} + {self.noise_dim()} (teacher target, "
                             f"noise), got {x.shape[1]}")
        target, z = x[:, :v], x[:, v:]
        if self.stage1 is not None:
            with torch.no_grad():
                g1 = self.stage1.sample_stage1(z[:, : self.stage1.n_layers], c)
            pred = self.stage2_latents(z, c, g1)
        else:
            pred = self.sample_from_noise(z, c)
        return {"loss": ((pred - target) ** 2).mean()}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        return [torch.optim.AdamW(params, lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]))]

    def configure_schedulers(
        self, optimizers: list[torch.optim.Optimizer], total_steps: int
    ) -> list[torch.optim.lr_scheduler.LRScheduler]:
        return warmup_cosine(optimizers, int(self.hparams["warmup"]), total_steps)
