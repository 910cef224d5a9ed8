"""The protocol every generative model follows.

A model is an ``nn.Module`` that works in *model space*: showers after the
run's invertible preprocessing (see :mod:`fastshower.data`), shape (B, V), and
conditions, shape (B, C) (log-scaled incident energy first, then the file's
extra conditions, each standardised). It knows nothing about files or units.

- ``loss(x, c)`` returns a dict of scalar tensors with at least ``"loss"``.
- ``sample(c, generator)`` returns model-space showers for each condition row.
- ``configure_optimizers()`` returns the optimizers; ``configure_schedulers(optimizers,
  total_steps)`` optionally returns one learning-rate scheduler per optimizer (the fit
  loop steps them once per training step and checkpoints their state).
- ``training_step(x, c, optimizers, step)`` does one optimisation step and
  returns floats to log. The default is the one-optimizer step; adversarial
  models override it with their critic/generator schedule, so a single fit
  loop (:mod:`fastshower.train`) serves every model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["ModelSpec", "ShowerModel", "warmup_cosine"]


@dataclass(frozen=True)
class ModelSpec:
    """What a model needs to know about the data to build its networks.

    Attributes:
        n_voxels: V, voxels per shower.
        layer_sizes: voxels per readout layer (sums to V).
        layer_shapes: image shape (rows, cols) per layer, for convolutional variants.
        cond_dim: C, width of the condition vector.
        cond_names: names of the condition groups (``log_energy`` first, then the file's
            ``conditions/<name>`` in the run's order).
        cond_widths: columns per condition group (same length as cond_names, sums to C);
            empty means one column per name.
        extra: free-form facts (geometry name, ...), JSON-serialisable.
    """

    n_voxels: int
    layer_sizes: tuple[int, ...]
    layer_shapes: tuple[tuple[int, int], ...]
    cond_dim: int
    cond_names: tuple[str, ...] = ("log_energy",)
    extra: dict[str, Any] = field(default_factory=dict)
    cond_widths: tuple[int, ...] = ()

    @classmethod
    def from_geometry(
        cls, geometry: Any, cond_names: tuple[str, ...] = ("log_energy",), cond_widths: tuple[int, ...] = (1,)
    ) -> ModelSpec:
        """Spec of a :class:`fastshower.geometry.Geometry` with the given condition groups."""
        return cls(
            n_voxels=int(geometry.n_voxels),
            layer_sizes=tuple(int(v) for v in geometry.layer_sizes),
            layer_shapes=tuple(
                (int(geometry.layer_shape(i)[0]), int(geometry.layer_shape(i)[1])) for i in range(geometry.n_layers)
            ),
            cond_dim=int(sum(cond_widths)),
            cond_names=tuple(cond_names),
            cond_widths=tuple(int(w) for w in cond_widths),
            extra={"geometry": geometry.name},
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(
            n_voxels=int(d["n_voxels"]),
            layer_sizes=tuple(int(v) for v in d["layer_sizes"]),
            layer_shapes=tuple((int(a), int(b)) for a, b in d["layer_shapes"]),
            cond_dim=int(d["cond_dim"]),
            cond_names=tuple(d.get("cond_names", ("log_energy",))),
            extra=dict(d.get("extra", {})),
            cond_widths=tuple(int(w) for w in d.get("cond_widths", ())),
        )


def warmup_cosine(
    optimizers: list[torch.optim.Optimizer], warmup: int, total_steps: int, cosine: bool = True, floor: float = 0.05
) -> list[torch.optim.lr_scheduler.LRScheduler]:
    """One LambdaLR per optimizer: linear warm-up over ``warmup`` steps, then a cosine decay that
    reaches ``floor`` x lr at ``total_steps`` (or a constant lr when ``cosine`` is false)."""
    warmup = max(0, int(warmup))
    total = max(int(total_steps), warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))

    return [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers]


class ShowerModel(nn.Module):
    """Base class: subclasses set ``name`` and ``default_transform`` and implement loss/sample."""

    name: ClassVar[str] = "base"
    #: False for models made from another run rather than trained on showers (``fastshower distill``)
    trainable: ClassVar[bool] = True
    #: preprocessing chain the model expects (names understood by fastshower.data.build_transform)
    default_transform: ClassVar[tuple[str, ...]] = ("per_incident", "log", "standardize")
    #: default hyper-parameters; a run's config may override any of them
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, spec: ModelSpec, **hparams: Any) -> None:
        super().__init__()
        unknown = set(hparams) - set(self.defaults)
        if unknown:
            raise ValueError(f"unknown hyper-parameter(s) for model {self.name!r}: {sorted(unknown)}; "
                             f"known: {sorted(self.defaults)}")
        self.spec = spec
        self.hparams: dict[str, Any] = {**self.defaults, **hparams}

    def loss(self, x: Tensor, c: Tensor) -> dict[str, Tensor]:
        """Training objective on a batch: x (B, V) model space, c (B, C)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Model-space showers (B, V), one per condition row of c (B, C)."""
        raise NotImplementedError

    def noise_dim(self) -> int:
        """D: standard-normal numbers per shower that :meth:`sample_from_noise` consumes."""
        raise NotImplementedError(f"model {self.name!r} cannot be sampled from given noise")

    def draw_noise(self, batch: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> Tensor:
        """Standard-normal noise (batch, D), drawn in the order :meth:`sample` draws it, so that
        ``sample_from_noise(draw_noise(B, g), c)`` equals ``sample(c, g)`` for a generator in the same state."""
        dev = generator.device if generator is not None else torch.device(device)
        return torch.randn(batch, self.noise_dim(), generator=generator, dtype=dtype, device=dev).to(device)

    def sample_from_noise(self, z: Tensor, c: Tensor, **options: Any) -> Tensor:
        """Model-space showers (B, V) as a pure, traceable function of noise z (B, D) and conditions c (B, C).

        This is what the ONNX exporter traces; ``options`` are sampler settings (flow matching: steps, method).
        """
        raise NotImplementedError(f"model {self.name!r} cannot be sampled from given noise")

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimizers used by :meth:`training_step` (one by default)."""
        lr = float(self.hparams.get("lr", 1e-3))
        return [torch.optim.Adam(self.parameters(), lr=lr)]

    def configure_schedulers(
        self, optimizers: list[torch.optim.Optimizer], total_steps: int
    ) -> list[torch.optim.lr_scheduler.LRScheduler]:
        """Learning-rate schedulers, stepped once per training step (none by default).

        ``total_steps`` is the run's planned number of steps, so that a decaying schedule
        ends where training ends.
        """
        return []

    def training_step(
        self, x: Tensor, c: Tensor, optimizers: list[torch.optim.Optimizer], step: int
    ) -> dict[str, float]:
        """One optimisation step; returns the values to log (must include ``"loss"``)."""
        (opt,) = optimizers
        opt.zero_grad(set_to_none=True)
        losses = self.loss(x, c)
        losses["loss"].backward()
        clip = self.hparams.get("grad_clip")
        if clip:
            nn.utils.clip_grad_norm_(self.parameters(), float(clip))
        opt.step()
        return {k: float(v.detach()) for k, v in losses.items()}
