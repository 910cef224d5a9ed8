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
  loop (:mod:`fastshower.training`) serves every model.

Hyper-parameters are a frozen dataclass per family (:class:`ModelConfig` and its subclasses,
``ShowerModel.config_class``), built by :meth:`ModelConfig.from_dict`: unknown keys, values of the
wrong kind and values outside a field's choices raise :class:`fastshower.errors.ConfigError`. Every
family speaks one vocabulary: ``hidden`` (width), ``depth`` (hidden layers or blocks), ``latent_dim``,
``layer_dim`` (width of a readout layer's code), ``net`` ("auto", "mlp", "layers"), ``lr``,
``weight_decay``, ``grad_clip``, ``warmup``, ``*_weight`` for loss weights. The names of earlier
releases are in each config's ``renamed`` map, so old run folders still load.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastshower.config import Config
from fastshower.errors import ConfigError

__all__ = ["ModelConfig", "ModelSpec", "ShowerModel", "float32", "model_cost", "warmup_cosine"]


def _readout_kind(geometry: Any) -> str:
    """"polar" when every readout layer is a polar grid (rings x angular bins), else "cartesian"."""
    layers = getattr(geometry, "layers", ())
    polar = bool(layers) and all(getattr(layer.segmentation, "kind", "") == "polar" for layer in layers)
    return "polar" if polar else "cartesian"


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
            extra={"geometry": geometry.name, "readout": _readout_kind(geometry)},
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


@dataclass(frozen=True)
class ModelConfig(Config):
    """Hyper-parameters every model family has; each family's config derives from this one.

    Attributes:
        lr: learning rate of the model's (main) optimizer(s), per step.
        grad_clip: clip of the gradient L2 norm over a network's parameters before each step
            (dimensionless, in the units of the loss per parameter); None or 0: no clip.
    """

    lr: float = 1e-3
    grad_clip: float | None = None


class ShowerModel(nn.Module):
    """Base class: subclasses set ``name`` and ``default_transform`` and implement loss/sample."""

    name: ClassVar[str] = "base"
    #: False for models made from another run rather than trained on showers (``fastshower distill``)
    trainable: ClassVar[bool] = True
    #: preprocessing chain the model expects (names understood by fastshower.data.build_transform)
    default_transform: ClassVar[tuple[str, ...]] = ("per_incident", "log", "standardize")
    #: the family's hyper-parameters; a run's config may override any of their defaults
    config_class: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, spec: ModelSpec, config: ModelConfig | Mapping[str, Any] | None = None,
                 **overrides: Any) -> None:
        """A model for ``spec`` with ``config`` (a config, or a mapping of its keys: a run's
        ``config.json`` "hparams", names of earlier releases included) and ``overrides`` on top.

        Raises:
            ConfigError: an unknown key (the message lists the known ones) or a bad value.
        """
        super().__init__()
        where = f"model {self.name!r}"
        if isinstance(config, ModelConfig):
            if not isinstance(config, self.config_class):
                raise ConfigError(f"{where} takes a {self.config_class.__name__}, got a {type(config).__name__}")
            config = config.to_dict()
        self.spec = spec
        self.config = self.config_class.from_dict({**(config or {}), **overrides}, where=where)
        #: the config as a plain dict (JSON-ready, tuples as lists), for reading; change the config, not this
        self.hparams: dict[str, Any] = self.config.to_dict()

    @classmethod
    def default_config(cls) -> ModelConfig:
        """The family's config with every default."""
        return cls.config_class()

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
        return [torch.optim.Adam(self.parameters(), lr=self.config.lr)]

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
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(self.parameters(), self.config.grad_clip)
        opt.step()
        return {k: float(v.detach()) for k, v in losses.items()}


def float32(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A float32 region inside a ``precision="bf16"`` training step (autocast off), for normalising flows: their
    spline bins and log-determinants need it (layer-fm's stage-1 NLL on par04-ds2 came out 0.45-0.64 nats higher
    at steps 500-700 with the flow under bfloat16 autocast)."""
    return torch.autocast(device.type, enabled=False)


def model_cost(model: ShowerModel) -> dict[str, float]:
    """Size and arithmetic of ``model``: trainable parameters, and FLOPs per shower (matrix products,
    convolutions and attention as torch's FlopCounterMode counts them; elementwise work is not counted)
    of one loss evaluation (the forward half of a training step) and of sampling one shower.

    Measured on two showers of model-space zeros-and-ones with conditions 0, in eval mode and
    without gradients, on the model's device; its training state and torch's RNG (CPU, and the GPU's where it
    runs on one) are restored afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    spec, was_training = model.spec, model.training
    dev = next(model.parameters()).device  # a model trained on a GPU is measured there
    x = (torch.arange(2 * spec.n_voxels, dtype=torch.float32, device=dev).reshape(2, -1) % 3 == 0).float()
    c = torch.zeros(2, spec.cond_dim, device=dev)
    out = {"parameters": float(sum(p.numel() for p in model.parameters() if p.requires_grad))}
    model.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # the fused inference kernels of nn.TransformerEncoder are invisible to the FLOP counter
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        # fork_rng: the losses and samplers draw noise, and a resumed run must continue its RNG stream untouched
        with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            for key, fn in (("flops_per_shower_loss", lambda: model.loss(x, c)),
                            ("flops_per_shower_sample", lambda: model.sample(c))):
                counter = FlopCounterMode(display=False)
                try:
                    with counter:
                        fn()
                except (NotImplementedError, ValueError):  # a model that is made, not trained (one-step)
                    continue
                out[key] = counter.get_total_flops() / 2
    finally:
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return out
