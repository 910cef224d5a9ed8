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

A ``layer-fm`` teacher has the same stage 1, and its shape ODE maps stage-2 noise to stage-2 latents
too, so it is distilled staged the same way (``stage1_model="layer-fm"``): the student's stage 1 is
the teacher's class built without the ODE's nets, holding the teacher's scalers, so its stage-2
numbers, W per shower, are the teacher's own: voxel shares (W = V) or, with ring shares, each
ring's share of its layer then each cell's share of its ring (W = V + L x R), standardised per
incident energy when the teacher's ``energy_knots`` are set, and the teacher's ``assemble`` turns
them into showers. Everything below that speaks of voxels then speaks of these W numbers; a ring
or cell share counts as hit when a voxel it feeds survives assembly.

Where the teacher's map is sharp, in whether a voxel is hit at all, an MSE fit averages "empty"
and "hit" into a faint hit, and the student's showers fill every voxel (calogan-3layer:
separation power of the sparsity 0.61). A staged student therefore has two heads (``occupancy``):
values, regressed only where the teacher's voxel is hit, and hit logits, trained by binary
cross-entropy. Thresholding the logits at 0 would give each shower its most likely hits, which
under-fills voxels hit in a minority of showers, so the cuts are calibrated after training
(:meth:`OneStep.calibrate_occupancy`): per energy knot and voxel, the cut at which the student
hits the voxel as often as the teacher does; at sampling the cut is interpolated linearly in the
log incident energy. A per-voxel 1-D Wasserstein term (``marginal_weight``) pulls back the
spread of values that regression to the mean narrows.

The student is not trained on showers: :func:`fastshower.distillation.distill` makes it. Its
:meth:`OneStep.loss` takes "pair" rows, the teacher's model-space shower followed by the
noise it came from, so the generic one-optimizer training step serves it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fastshower.errors import ConfigError
from fastshower.models import register
from fastshower.models.base import ModelConfig, ModelSpec, ShowerModel, warmup_cosine
from fastshower.models.flow import CaloFlow, FlowConfig
from fastshower.models.layer_fm import LayerFlowMatching, LayerFMConfig
from fastshower.models.nets import MLP, ResidualMLP

__all__ = ["OneStep", "OneStepConfig"]

#: latent subtracted from a voxel the occupancy head leaves empty (standardised logit units: share 0)
_EMPTY = 1e4


def _drop_misses(stage1: CaloFlow, g2: Tensor, logits: Tensor, cuts: Tensor, c: Tensor, g1: Tensor) -> Tensor:
    """Latents g2 (B, W) at conditions c (B, C) and stage-1 variables g1 (B, L) with the stage-2 numbers whose hit
    logit (B, W) is below its cut (B, W) pushed to share 0, and with those that ``stage1.stage2_empty`` empties as
    a consequence of these and of the numbers whose value is below the teacher's ``zero_share`` (a ring whose cells
    all are empty: else its energy would vanish; par04-ds2: 2.9 % of E_tot). g1 gives the layer energies that
    layer-fm's ring map reads (``layer_knots``).

    A 0/1 mask and a subtraction rather than where(): cheaper in ONNX Runtime.
    """
    dead = stage1.stage2_dead(stage1.unstandardise2(g2, c, stage1.stage1_fractions(g1)))
    return g2 - stage1.stage2_empty(torch.maximum((logits < cuts).to(g2.dtype), dead)) * _EMPTY


def _knots_over(c0: Tensor, n_knots: int) -> Tensor:
    """``n_knots`` equally spaced knots (K,) from the lowest to the highest standardised log energy c0 (N,)
    (one unit either side of a single energy)."""
    lo, hi = float(c0.min()), float(c0.max())
    if hi - lo < 1e-6:  # one energy: every knot gets the same cut
        lo, hi = lo - 1.0, hi + 1.0
    return torch.linspace(lo, hi, n_knots)


def _rate_matching_cuts(eff: Tensor, hit_t: Tensor, groups: list[Tensor]) -> Tensor:
    """Occupancy cuts (K, V): per knot and voxel, the quantile of the student's logits eff (N, V) (-inf where
    the voxel cannot be a hit) at which the student hits the voxel as often as the teacher (hits hit_t (N, V))
    over the pairs nearest to the knot (``groups``: K boolean masks (N,)).

    A knot with fewer than 10 pairs takes the cut of the nearest calibrated knot (counting those filled
    before it), and when no knot has 10, every knot takes the cut over all pairs; the cuts are clamped to
    +-1e4, finite stand-ins for "never" / "always" that keep the ONNX graph free of inf arithmetic.
    """
    k_n, v = len(groups), eff.shape[1]
    cuts = torch.full((k_n, v), float("nan"))

    def rate_cut(g: Tensor) -> Tensor:  # (V,) the cut over the pairs g
        n_k = int(g.sum())
        rate = hit_t[g].mean(0)  # (V,) teacher hit rate over these pairs
        srt = torch.cat([eff[g].sort(0).values, torch.full((1, v), float("inf"))])  # row n_k: never
        idx = ((1.0 - rate) * n_k).round().long().clamp(0, n_k)
        return srt.gather(0, idx[None]).squeeze(0)

    for k, g in enumerate(groups):
        if int(g.sum()) >= 10:  # fewer pairs near this knot: filled from the neighbours below
            cuts[k] = rate_cut(g)
    if torch.isnan(cuts).all():
        cuts[:] = rate_cut(torch.ones(eff.shape[0], dtype=torch.bool))
    for k in range(k_n):
        if torch.isnan(cuts[k]).any():
            good = [j for j in range(k_n) if not torch.isnan(cuts[j]).any()]
            cuts[k] = cuts[min(good, key=lambda j: abs(j - k))]
    return cuts.clamp(-1e4, 1e4)


def _build_stage1(spec: ModelSpec, cfg: OneStepConfig) -> CaloFlow | None:
    """The staged teacher's stage 1, scalers and stage-2 variables without its stage-2 generator (flow 2 or the
    shape ODE's nets), frozen; None for an unstaged student. The weights are the teacher's once loaded."""
    if not cfg.stage1:
        return None
    if cfg.stage1_model == "layer-fm":
        stage1: CaloFlow = LayerFlowMatching(spec, LayerFMConfig.from_saved(cfg.stage1), with_velocity=False)
    else:
        stage1 = CaloFlow(spec, cfg.stage1, with_stage2=False)
    return stage1.requires_grad_(False)  # the teacher's, kept as it is


@dataclass(frozen=True)
class OneStepConfig(ModelConfig):
    """Hyper-parameters of :class:`OneStep`.

    Attributes:
        hidden, depth: width and residual blocks of G (small on purpose: speed is its reason to be).
        emb_dim: width of the condition embedding added in every block.
        noise_dim: noise numbers per shower, the teacher's (0: one per voxel, as flow matching draws).
        lr, weight_decay, grad_clip, warmup: AdamW learning rate and decoupled weight decay, gradient-norm
            clip, steps of linear lr warm-up before the cosine decay to 5 %.
        teacher: the teacher run folder (provenance only).
        teacher_steps, teacher_method: the ODE the pairs were integrated with (provenance only).
        stage1: the staged teacher's config ({} for a flow-matching teacher); when set, the student holds the
            teacher's stage 1, scalers and stage-2 variables (frozen) and regresses only its stage-2 latents.
        stage1_model: the class that ``stage1`` builds: "flow" (:class:`~fastshower.models.flow.FlowConfig`
            keys; flow teachers, and layer-fm teachers distilled before ring shares were supported) or
            "layer-fm" (:class:`~fastshower.models.layer_fm.LayerFMConfig` keys, built without the shape ODE's
            nets: ring shares, energy-dependent stage-2 scaling).
        occupancy: staged students: a second head decides which voxels are hit (see the module docs).
        occupancy_knots: energy knots of the occupancy calibration (>= 2).
        marginal_weight: staged students with occupancy: weight of a per-voxel 1-D Wasserstein term between
            the student's and the teacher's latents of the batch's hit voxels (see :meth:`OneStep.loss`).
    """

    hidden: int = 64
    depth: int = 2
    emb_dim: int = 32
    noise_dim: int = 0
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    warmup: int = 200
    teacher: str = ""
    teacher_steps: int = 0
    teacher_method: str = ""
    stage1: dict[str, Any] = field(default_factory=dict)
    stage1_model: str = "flow"
    occupancy: bool = True
    occupancy_knots: int = 8
    marginal_weight: float = 3.0

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"stage1_model": ("flow", "layer-fm")}

    def check(self, where: str) -> None:
        super().check(where)
        if self.occupancy_knots < 2:
            raise ConfigError(f"{where}: occupancy_knots must be >= 2, got {self.occupancy_knots}")
        if self.stage1:
            stage1_class = LayerFMConfig if self.stage1_model == "layer-fm" else FlowConfig
            stage1_class.from_saved(self.stage1, where=f"{where}: stage1")


@register
class OneStep(ShowerModel):
    """Single-pass generator x = z + G(z, c) (flow-matching teacher), or staged (flow teacher).

    Hyper-parameters: :class:`OneStepConfig`.
    """

    name: ClassVar[str] = "one-step"
    trainable: ClassVar[bool] = False
    default_transform: ClassVar[tuple[str, ...]] = ("per_incident", "log", "standardize")
    config_class: ClassVar[type[ModelConfig]] = OneStepConfig
    config: OneStepConfig

    occ_knots: Tensor  # (K,) standardised log-energy knots of the occupancy cuts (staged, occupancy)
    occ_cuts: Tensor  # (K, W) occupancy-logit cut per knot and stage-2 number

    def __init__(self, spec: ModelSpec, config: OneStepConfig | Mapping[str, Any] | None = None,
                 **overrides: Any) -> None:
        super().__init__(spec, config, **overrides)
        cfg = self.config
        emb = cfg.emb_dim
        self.stage1 = _build_stage1(spec, cfg)
        cond = spec.cond_dim
        if self.stage1 is not None:
            cond += self.stage1.n_layers  # flow 2 is conditioned on g1 as well
            if self.noise_dim() != self.stage1.noise_dim():
                raise ValueError(f"a staged student draws the teacher's L + W = {self.stage1.noise_dim()} noise "
                                 f"numbers, not {self.noise_dim()}")
        w = self.target_width()
        d_in = w if self.stage1 is not None else self.noise_dim()
        self.occupancy = self.stage1 is not None and cfg.occupancy
        if self.occupancy:
            k = cfg.occupancy_knots
            self.register_buffer("occ_knots", torch.linspace(-1.0, 1.0, k))
            self.register_buffer("occ_cuts", torch.zeros(k, w))
        self.embed = MLP([cond, emb, emb])
        self.body = ResidualMLP(d_in, 2 * w if self.occupancy else w, emb, cfg.hidden, cfg.depth)
        # the teacher's map is the identity plus the integrated velocity when noise and shower share a space;
        # for a staged student, g2 and z2 share one (flow 2 is monotone in each voxel's own coordinate, and the
        # shape ODE's paths are nearly straight)
        self.skip = d_in == w

    def target_width(self) -> int:
        """Width of what the student regresses: W stage-2 numbers (staged: V voxel shares, or with a ring-share
        layer-fm teacher V + L x R), else the V voxels of a model-space shower."""
        return self.stage1.stage2_width if self.stage1 is not None else int(self.spec.n_voxels)

    def noise_dim(self) -> int:
        """The teacher's noise width: one number per voxel for flow matching, L + W for a staged teacher."""
        return self.config.noise_dim or int(self.spec.n_voxels)

    def sample_from_noise(self, z: Tensor, c: Tensor, **options: Any) -> Tensor:
        """Model-space showers (B, V) from noise z (B, D) and conditions c (B, C) in one pass.

        With D = V (a flow-matching teacher) the skip connection carries z and G only learns the
        displacement the ODE adds.
        """
        if options:
            raise ValueError(f"model 'one-step' has no sampler options (it is a single pass), got {sorted(options)}")
        if self.stage1 is not None:
            g1 = self.stage1.sample_stage1(z[:, : self.stage1.n_layers], c)
            return self.stage1.place(self.stage1.assemble(g1, self.stage2_latents(z, c, g1), c), z)
        out = self.body(z, self.embed(c))
        return z + out if self.skip else out

    def stage2_heads(self, z: Tensor, c: Tensor, g1: Tensor) -> tuple[Tensor, Tensor | None]:
        """Staged student: the value head g2 (B, W) and (with ``occupancy``) the hit logits (B, W), from
        noise z (B, L + W), conditions c (B, C) and g1 (B, L)."""
        w = self.target_width()
        z2 = z[:, -w:]
        out = self.body(z2, self.embed(torch.cat([c, g1], dim=1)))
        if not self.occupancy:
            return z2 + out, None
        return z2 + out[:, :w], out[:, w:]

    def stage2_latents(self, z: Tensor, c: Tensor, g1: Tensor) -> Tensor:
        """Staged student: g2 (B, W) from noise z (B, L + W), conditions c (B, C) and g1 (B, L); stage-2 numbers
        the occupancy head leaves empty get a latent far below any share (zero energy after assembly)."""
        g2, logits = self.stage2_heads(z, c, g1)
        if logits is None:
            return g2
        assert self.stage1 is not None
        return _drop_misses(self.stage1, g2, logits, self.occupancy_cuts(c), c, g1)

    def occupancy_cuts(self, c: Tensor) -> Tensor:
        """Hit-logit cut per shower and stage-2 number (B, W): the calibrated cuts, linear in c[:, 0] (standardised
        log incident energy) between the knots, constant beyond them."""
        k = self.occ_knots
        h = k[1] - k[0]
        w = torch.relu(1.0 - (c[:, :1].clamp(k[0], k[-1]) - k).abs() / h)  # (B, K) hat functions, sum 1
        return w @ self.occ_cuts

    @torch.no_grad()
    def calibrate_occupancy(self, x: Tensor, c: Tensor, rounds: int = 3) -> dict[str, float]:
        """Set the occupancy cuts from pair rows x (N, V + D) and conditions c (N, C).

        Per energy knot and stage-2 number, the cut is the quantile of the student's hit logits at which the student's
        showers hit the voxel as often as the teacher's do near that energy (pairs nearest to the knot). A
        cut at 0 would be the most likely answer per shower, which under-fills voxels that are hit in a
        minority of showers; matching the rates keeps the teacher's occupancy (sparsity, n_hits). A stage-2
        number counts as hit when it feeds a voxel that survives assembly (:meth:`stage2_hits`; its value can
        fall below the zero thresholds although the head said hit, and which survive depends on the cuts
        through the renormalisation), so the cuts are set ``rounds`` times, each on the showers the previous
        cuts give. Returns the mean absolute hit-rate difference to the teacher, over knots and stage-2
        numbers, with every logit cut at 0 and with the calibrated cuts.
        """
        stage1 = self.stage1
        assert stage1 is not None and self.occupancy
        w = self.target_width()
        target, g1, z = self.split_pairs(x)
        assert g1 is not None
        knots = _knots_over(c[:, 0], self.occ_knots.numel())
        g2, logits = self.stage2_heads(z, c, g1)
        assert logits is not None
        hit_t = self.stage2_hits(g1, target, c).float()
        nearest = (c[:, :1] - knots).abs().argmin(1)
        groups = [nearest == k for k in range(knots.numel())]

        def student_hits(cuts: Tensor) -> Tensor:  # (N, W) bool: stage-2 numbers hit with these cuts
            return self.stage2_hits(g1, _drop_misses(stage1, g2, logits, cuts[nearest], c, g1), c)

        def hit_error(cuts: Tensor) -> float:
            hit_s = student_hits(cuts)
            errs = [float((hit_s[g].float().mean(0) - hit_t[g].mean(0)).abs().mean()) for g in groups if g.any()]
            return sum(errs) / max(1, len(errs))

        cuts = torch.zeros(knots.numel(), w)
        err_zero = hit_error(cuts)
        for _ in range(rounds):
            # a voxel whose value does not survive assembly with the current cuts is not a hit at any cut;
            # masked voxels (below their cut): their value is unknown, keep their logits
            alive = student_hits(cuts) | (logits < cuts[nearest])
            eff = torch.where(alive, logits, torch.full_like(logits, -float("inf")))
            cuts = _rate_matching_cuts(eff, hit_t, groups)
        self.occ_cuts.copy_(cuts)
        self.occ_knots.copy_(knots)
        return {"hit_rate_error_uncalibrated": err_zero, "hit_rate_error_calibrated": hit_error(cuts)}

    def stage2_hits(self, g1: Tensor, g2: Tensor, c: Tensor) -> Tensor:
        """Staged student: which stage-2 numbers (B, W) bool of latents g1 (B, L), g2 (B, W) at conditions
        c (B, C) are hit: those that feed a voxel of the assembled shower above zero (W = V: the hit voxels;
        ring shares: a ring with any hit cell, a cell share whose cell is hit)."""
        assert self.stage1 is not None
        return self.stage1.stage2_hits(self.stage1.assemble(g1, g2, c) > 0)

    def regression_target(self, teacher: ShowerModel, z: Tensor, c: Tensor, **options: Any) -> Tensor:
        """What the student learns from for noise z (B, D) and conditions c (B, C): the teacher's model-space
        shower (B, V) (``options`` go to its sampler), or (staged) the teacher's standardised stage-2 latents g2
        (B, W) (flow 2's output, or the end of layer-fm's shape ODE at the teacher's own steps) followed by its
        stage-1 latents g1 (B, L), which the student's stage 1 would compute alike from z and c: carried so
        that training does not invert the autoregressive stage-1 flow at every step (par04-ds2: 1 CPU-s of a
        1.2 CPU-s step)."""
        if self.stage1 is not None:
            if not isinstance(teacher, type(self.stage1)) or options:
                raise TypeError(f"a staged student needs a {self.stage1.name!r} teacher, without sampler options")
            g1, g2 = teacher.sample_latents(z, c)
            return torch.cat([g2, g1], dim=1)
        return teacher.sample_from_noise(z, c, **options)

    def split_pairs(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Pair rows x (B, W [+ L] + D) = [:meth:`regression_target`, its noise] -> the regressed target (B, W),
        the teacher's stage-1 latents g1 (B, L) (staged; else None) and the noise z (B, D)."""
        w, n_l = self.target_width(), self.stage1.n_layers if self.stage1 is not None else 0
        if x.shape[1] != w + n_l + self.noise_dim():
            raise ValueError(f"one-step pair rows must be {w} + {n_l} + {self.noise_dim()} wide (teacher target, "
                             f"stage-1 latents, noise), got {x.shape[1]}")
        return x[:, :w], (x[:, w : w + n_l] if n_l else None), x[:, w + n_l :]

    @torch.no_grad()
    def sample(self, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.sample_from_noise(self.draw_noise(c.shape[0], generator, c.dtype, c.device), c)

    def loss(self, x: Tensor, c: Tensor) -> dict[str, Tensor]:
        """MSE to the teacher on pair rows x (B, W [+ L] + D) (see :meth:`split_pairs`), conditions c (B, C)."""
        target, g1, z = self.split_pairs(x)
        if g1 is not None:
            g2, logits = self.stage2_heads(z, c, g1)
            if logits is None:
                return {"loss": ((g2 - target) ** 2).mean()}
            # values are regressed where the teacher's voxel is hit; the hit itself is a classification, so
            # that the mean of "empty" and "hit" latents never lands between the two as a faint hit
            with torch.no_grad():
                hit = self.stage2_hits(g1, target, c).to(g2.dtype)
            mse = (hit * (g2 - target) ** 2).sum() / hit.sum().clamp_min(1.0)
            bce = F.binary_cross_entropy_with_logits(logits, hit)
            out = {"loss": mse + bce, "mse_hit": mse, "bce_hit": bce}
            if self.config.marginal_weight > 0:
                # regression to the conditional mean narrows each voxel's spread of values; the squared 1-D
                # Wasserstein distance per voxel (sorted batch values, empty entries parked at the top of
                # both sides, where they cancel) pulls the spread back
                parked = torch.full_like(g2, _EMPTY)
                w2 = (torch.where(hit > 0, g2, parked).sort(0).values
                      - torch.where(hit > 0, target, parked).sort(0).values) ** 2
                out["w2_hit"] = w2.sum() / hit.sum().clamp_min(1.0)
                out["loss"] = out["loss"] + self.config.marginal_weight * out["w2_hit"]
            return out
        else:
            pred = self.sample_from_noise(z, c)
        return {"loss": ((pred - target) ** 2).mean()}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)]

    def configure_schedulers(
        self, optimizers: list[torch.optim.Optimizer], total_steps: int
    ) -> list[torch.optim.lr_scheduler.LRScheduler]:
        return warmup_cosine(optimizers, self.config.warmup, total_steps)
