"""3DGAN: the CERN openlab conditional GAN of 3D convolutions for high-granularity calorimeters ("3dgan").

Design after Khattak, Vallecorsa, Carminati, Khan (ICMLA 2019; "Fast simulation of a high granularity
calorimeter by generative adversarial networks", Eur. Phys. J. C 82 (2022) 386) and the reduced-precision
and physics-validation studies of Rehm et al. (arXiv:2103.13698, arXiv:2103.10142), whose reference code
(the Keras ``AngleArch3dGAN`` / ``AngleTrain`` and its PyTorch port) is where the numbers below were
checked:

- **Generator**: (latent, conditions) -> a dense layer -> a coarse 3D grid of channels -> 3D (transposed)
  convolutions, ReLU and batch normalisation -> one channel on the calorimeter grid (51 x 51 x 25 for
  ``siw-51x51x25``) with a final **ReLU**: exact zeros, as the sparse Geant4 images have. The papers'
  input is ``[E_p / 100 GeV, angle, 254 noise numbers]`` (256 wide); here it is ``[z, c]`` with c the
  run's standardised conditions (log incident energy first, then e.g. the angle).
- **Discriminator**: 3D convolutions with LeakyReLU, batch normalisation and dropout 0.2, then three
  outputs: the real/fake probability (sigmoid, binary cross-entropy), the *auxiliary* regression of the
  primary energy (mean absolute percentage error, MAPE), and the parameter-free **total deposited energy**
  ``sum(image^(1/power))`` (MAPE against the real showers' sums). The discriminator is not given the
  conditions: the auxiliary regression is how it judges the conditioning (an AC-GAN).
- **Loss weights** (defaults): real/fake 3, auxiliary energy 0.1, total energy 0.1 -- the papers'
  ``loss_weights = [3, 0.1, 25, 0.1]`` (the 25 weighs the angle regression, which the angle-conditioned
  version adds; the first, energy-only 3DGAN used [2, 0.1, 0.1]). MAPE is in percent, as Keras computes it,
  which is what makes 0.1 commensurate with the cross-entropy's 3.
- **Schedule** (one :meth:`training_step` per real batch, as the papers' loop per batch): a discriminator
  update on the real batch, one on a generated batch (labels flipped with probability 0.05, the papers'
  ``BitFlip``), then two generator updates with "real" labels (the non-saturating loss); RMSprop,
  lr 1e-3, rho 0.9 (Keras' defaults the papers train with).
- **Preprocessing** (the papers' ``xpower = 0.85``): the networks see cell energies raised to the power
  0.85, ``y = (x / x_scale)^0.85``; the generator's output is mapped back by ``x = x_scale * y^(1/0.85)``
  *inside* :meth:`generate`, so an exported (ONNX) sampler contains the inverse. The run's own
  preprocessing is none (``default_transform = ()``): model space is the cell energy in MeV, as the papers
  feed the networks GeV images; ``x_scale`` (100 MeV) puts the bright core cells at O(1). In absolute
  units the image carries its energy (E_sum is ~2.5 % of E_p here), which is what lets the discriminator
  regress E_p; a first version trained on ``x / E_inc`` (``per_incident``), where only the depth of the
  shower tells 10 from 100 GeV: the auxiliary regression, trained alone on real siw-51x51x25 showers,
  stayed near the error of a constant guess (100 |dc| 65-120 against 85 after 300 steps).

What differs from the papers, and why:

- **Size.** The papers' generator up-samples a (8, 9, 9, 8) grid six-fold and convolves at ~54 x 54 x 48
  with 8 channels (of order 10^9 multiply-adds per shower); discriminator convolutions run at full
  resolution with 16 channels. That is far beyond a CPU budget, so the up-sampling is by stride-2 transposed
  convolutions (kernel 4, cropped to odd sizes) from a (4, 7, 7) grid (``depth`` stages, see
  :func:`upsampling_plan`) and the discriminator down-samples by stride-2 convolutions; ``hidden`` and
  ``critic_hidden`` set the widths (:func:`fastshower.models.base.model_cost` gives parameters and FLOPs).
  (Kernel-3 transposed convolutions, tried first, printed a period-2 checkerboard into the generated
  showers: after 400 steps the z profile alternated by a factor ~50 between neighbouring layers.)
- **A straight-through final ReLU** (``dead_slope``): exact zeros as the papers', but in training a cell
  that is off still gets 0.2 of its gradient (see :class:`GAN3DConfig`).
- **Per-voxel scale and bias** before the generator's final ReLU (:class:`Generator3D`): 2 x 65 025
  parameters that let the generator switch far cells off and sharpen the core, which the papers' much
  larger convolution stack learns without them.
- **Energy regression target.** Model space knows only the standardised conditions, not E_p in GeV, so
  the auxiliary head regresses the condition vector c and its loss is ``100 x |c_pred - c|`` averaged:
  for the log-energy column that is ``100 |d ln E| / sigma(ln E)``, the percentage error of E for a
  spread sigma(ln E) of 1 (MAPE ~ 100 |d ln E| for small errors), i.e. the papers' MAPE in the
  variable the model has.
- **Total-energy label.** As in the angle version: each generated shower is compared with the real
  shower of the batch whose conditions it was generated for (the first 3DGAN used a linear fit,
  ``2 x E_p``).

Voxel order: layer-major, ``(layer, row, column)`` as :mod:`fastshower.geometry` flattens cartesian
layers, i.e. the model sees the shower as a (1, L, rows, cols) volume. Every layer must have the same
shape.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastshower.errors import ConfigError

from . import register
from .base import ModelConfig, ModelSpec, ShowerModel

__all__ = [
    "GAN3D",
    "Discriminator3D",
    "GAN3DConfig",
    "Generator3D",
    "PowerTransform",
    "upsampling_plan",
]


# --- preprocessing in the graph ------------------------------------------------------------


class PowerTransform(nn.Module):
    """``y = (max(x, 0) / x_scale)^power`` and its inverse ``x = x_scale * max(y, 0)^(1/power)``.

    The papers' ``X ** 0.85`` on cell energies (with ``x_scale`` the unit the power is taken in).
    Both directions are elementwise and traceable, so the inverse sits in an exported graph.
    Negative inputs (none in Geant4 showers) are clamped to 0 first.
    """

    def __init__(self, power: float, x_scale: float) -> None:
        super().__init__()
        self.power, self.x_scale = float(power), float(x_scale)

    def forward(self, x: Tensor) -> Tensor:
        return torch.pow(x.clamp_min(0.0) / self.x_scale, self.power)

    def inverse(self, y: Tensor) -> Tensor:
        return self.x_scale * torch.pow(y.clamp_min(0.0), 1.0 / self.power)


# --- networks --------------------------------------------------------------------------------


def upsampling_plan(grid: Sequence[int], stages: int) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """The start grid and the size after each of ``stages`` stride-2 up-samplings that end on ``grid``.

    Each stage is a transposed convolution of kernel 4, stride 2, padding 1 (n -> 2n: every output voxel
    sums exactly 2 taps per axis, so the up-sampling has no built-in checkerboard, which kernel 3 has),
    then a crop of the last row where the target size is odd. Walking back from the target: n comes from
    ceil(n / 2); 51 <- 26 <- 13 <- 7 and 25 <- 13 <- 7 <- 4 for the 3DGAN calorimeter. Sizes of 1 stay 1.

    Returns:
        (start grid, sizes): sizes[i] is the grid after stage i (coarsest first); sizes[-1] == grid.
    """
    target = [int(n) for n in grid]
    if any(n < 1 for n in target):
        raise ValueError(f"grid sizes must be >= 1, got {tuple(grid)}")
    sizes: list[tuple[int, ...]] = []
    cur = target
    for _ in range(stages):
        sizes.append(tuple(cur))
        cur = [(n + 1) // 2 for n in cur]
    return tuple(cur), sizes[::-1]


def _channels(first: int, stages: int, floor: int) -> list[int]:
    """``first`` halved per stage, never below ``floor``: [first, first/2, ...] (stages + 1 values)."""
    return [max(first >> i, floor) for i in range(stages + 1)]


def _init_transposed(conv: nn.ConvTranspose3d, kind: str) -> None:
    """The papers' initialisations (he_uniform, glorot_normal for the last layer) with the fans of a stride-2
    transposed convolution: each output voxel sums ``C_in x prod(k) / 8`` products (torch's default reads the
    fan off the weight's (C_in, C_out, k...) layout and starts ~3x too small per stage); biases 0."""
    c_in, c_out, *k = conv.weight.shape
    taps = math.prod(k) / 8
    fan_in, fan_out = c_in * taps, c_out * taps
    with torch.no_grad():
        if kind == "he":
            bound = math.sqrt(6.0 / fan_in)
            conv.weight.uniform_(-bound, bound)
        else:
            conv.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
        if conv.bias is not None:
            conv.bias.zero_()


class _Up(nn.Module):
    """Transposed convolution (kernel 4, stride 2, padding 1: n -> 2n) cropped to ``size``."""

    def __init__(self, c_in: int, c_out: int, size: tuple[int, ...], kind: str) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose3d(c_in, c_out, kernel_size=4, stride=2, padding=1)
        _init_transposed(self.conv, kind)
        self.size = (int(size[0]), int(size[1]), int(size[2]))

    def forward(self, x: Tensor) -> Tensor:
        d, h, w = self.size
        return self.conv(x)[:, :, :d, :h, :w]


class Generator3D(nn.Module):
    """``(z (B, Z), c (B, C)) -> y (B, 1, L, rows, cols)`` in power space, >= 0 (final ReLU).

    Dense -> (hidden, start grid) -> ``depth`` stride-2 up-samplings (:func:`upsampling_plan`), channels
    halved per stage, each but the last followed by BatchNorm and ReLU; the last has one output channel.
    Before the final ReLU a learned per-voxel scale and bias (``a * scale + bias``, initialised to 1 and 0):
    the mean image of a calorimeter is anything but translation invariant (on siw-51x51x25 71 % of the
    energy is in the central column and 99.9 % within 25 x 25 of the 51 x 51 cells), which convolutions
    alone learn slowly; a negative bias switches far cells off, as the Geant4 images have them (0.8 % of the
    cells hit). In training the final ReLU passes ``dead_slope`` x the gradient to cells that are off
    (a straight-through leaky ReLU: the output is still exactly ReLU); sampling is the plain ReLU. (The papers
    put the batch norm after the ReLU; before it, an untrained generator in eval
    mode, whose running statistics are still 0 and 1, passes half of its activations as in training.)
    """

    def __init__(self, latent_dim: int, cond_dim: int, grid: tuple[int, int, int], hidden: int, depth: int,
                 min_channels: int, batch_norm: bool, dead_slope: float = 0.0) -> None:
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]), int(grid[2]))
        self.dead_slope = float(dead_slope)
        start, sizes = upsampling_plan(self.grid, depth)
        self.start = start
        ch = _channels(hidden, depth, min_channels)
        ch[-1] = 1
        self.dense = nn.Linear(latent_dim + cond_dim, ch[0] * math.prod(start))
        self.ch0 = ch[0]
        layers: list[nn.Module] = [nn.BatchNorm3d(ch[0])] if batch_norm else []
        layers.append(nn.ReLU())
        for i, size in enumerate(sizes):
            last = i == len(sizes) - 1
            layers.append(_Up(ch[i], ch[i + 1], size, "glorot" if last else "he"))
            if not last:
                if batch_norm:
                    layers.append(nn.BatchNorm3d(ch[i + 1]))
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.voxel_scale = nn.Parameter(torch.ones(1, 1, *self.grid))
        self.voxel_bias = nn.Parameter(torch.zeros(1, 1, *self.grid))

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        h = self.dense(torch.cat([z, c], dim=1)).view(-1, self.ch0, *self.start)
        a = self.net(h) * self.voxel_scale + self.voxel_bias
        y = F.relu(a)
        if self.training and self.dead_slope > 0:
            # the value stays relu(a) exactly (n - n.detach() is 0); the gradient of a cell that is off is
            # dead_slope instead of 0, so the discriminator can still switch it back on
            neg = a.clamp_max(0.0)
            y = y + self.dead_slope * (neg - neg.detach())
        return y


class Discriminator3D(nn.Module):
    """``y (B, 1, L, rows, cols)`` power space -> (real/fake logit (B,), condition regression (B, C)).

    ``depth`` x [Conv3d 3x3x3 stride 2 -> LeakyReLU -> (BatchNorm from the second) -> Dropout], channels
    doubled per stage from ``critic_hidden``, then two linear heads on the flattened features.
    """

    def __init__(self, grid: tuple[int, int, int], cond_dim: int, hidden: int, depth: int, dropout: float,
                 batch_norm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for i in range(depth):
            cout = hidden << i
            layers += [nn.Conv3d(cin, cout, kernel_size=3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            if batch_norm and i > 0:
                layers.append(nn.BatchNorm3d(cout))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            cin = cout
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        n_feat = cin * math.prod(_down(n, depth) for n in grid)
        self.real_fake = nn.Linear(n_feat, 1)
        self.aux = nn.Linear(n_feat, cond_dim)

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(y)
        return self.real_fake(h).squeeze(1), self.aux(h)


def _down(n: int, stages: int) -> int:
    """Size after ``stages`` convolutions of kernel 3, stride 2, padding 1: n -> floor((n - 1) / 2) + 1."""
    for _ in range(stages):
        n = (n - 1) // 2 + 1
    return n


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No gradient into ``module``'s parameters for the block (gradients still flow through it)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


# --- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GAN3DConfig(ModelConfig):
    """Hyper-parameters of :class:`GAN3D` (defaults: the papers' loss weights, label flipping, schedule and
    optimizer; widths sized for a CPU, see the module docstring).

    Attributes:
        latent_dim: Gaussian noise numbers per shower (the papers: 254, plus energy and angle).
        hidden: generator channels on its coarsest grid, halved per up-sampling stage.
        min_channels: the fewest channels of a generator stage.
        depth: stride-2 stages of generator (up) and discriminator (down).
        critic_hidden: channels of the first discriminator convolution, doubled per stage.
        batch_norm: batch normalisation in both networks (the papers').
        dead_slope: in training, the gradient the generator's final ReLU passes to cells that are off (0: the
            papers' plain ReLU). With 0 the siw-51x51x25 runs lost cells for good: after 2000 steps at
            batch 16 every shower was one hot cell (the same one), after 1000 at batch 32 showers had 123 hits
            against Geant4's 537; the ReLU gives a switched-off cell no gradient to come back.
        dropout: discriminator dropout (the papers': 0.2).
        power: exponent of the cell-energy transform (the papers' ``xpower``: 0.85).
        x_scale: the cell energy that maps to 1 before the power, in model-space units (MeV with the default
            preprocessing; set it to ~1e-3 with ``transform = ["per_incident"]``).
        adv_weight, aux_weight, ecal_weight: weights of the real/fake cross-entropy, the auxiliary
            condition regression (percent) and the total-energy MAPE (percent): the papers' 3, 0.1, 0.1.
        label_flip: probability that a discriminator label is flipped (the papers' BitFlip: 0.05).
        generator_steps: generator updates per training step (the papers': 2).
        optimizer: "rmsprop" (the papers', with ``rho``) or "adam" (with ``betas``).
        lr: learning rate of both networks (the papers': 1e-3).
        rho: RMSprop's squared-gradient decay (Keras' rho, torch's alpha; the papers': 0.9).
        betas: Adam's (beta1, beta2).
        grad_clip: gradient-norm clip of each network (None: off, as the papers).
    """

    latent_dim: int = 64
    hidden: int = 32
    min_channels: int = 4
    depth: int = 3
    critic_hidden: int = 8
    batch_norm: bool = True
    dead_slope: float = 0.2
    dropout: float = 0.2
    power: float = 0.85
    x_scale: float = 100.0
    adv_weight: float = 3.0
    aux_weight: float = 0.1
    ecal_weight: float = 0.1
    label_flip: float = 0.05
    generator_steps: int = 2
    optimizer: str = "rmsprop"
    lr: float = 1e-3
    rho: float = 0.9
    betas: tuple[float, float] = (0.5, 0.9)

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"optimizer": ("rmsprop", "adam")}

    def check(self, where: str) -> None:
        super().check(where)
        for key in ("latent_dim", "hidden", "min_channels", "depth", "critic_hidden", "generator_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}: {key} must be >= 1, got {getattr(self, key)}")
        if not self.power > 0 or not self.x_scale > 0:
            raise ConfigError(f"{where}: power and x_scale must be > 0, got {self.power}, {self.x_scale}")
        if not 0 <= self.label_flip < 0.5 or not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}: label_flip must be in [0, 0.5) and dropout in [0, 1)")
        if len(self.betas) != 2:
            raise ConfigError(f"{where}: betas must be two numbers, got {self.betas!r}")


def _grid(spec: ModelSpec) -> tuple[int, int, int]:
    """(layers, rows, cols) of a spec whose layers all have one shape."""
    shapes = set(spec.layer_shapes)
    if len(shapes) != 1 or math.prod(next(iter(shapes))) * len(spec.layer_shapes) != spec.n_voxels:
        raise ValueError(f"model '3dgan' needs layers of one shape covering every voxel, got {spec.layer_shapes}")
    rows, cols = next(iter(shapes))
    return len(spec.layer_shapes), int(rows), int(cols)


def _mape(pred: Tensor, true: Tensor) -> Tensor:
    """Mean absolute percentage error, as Keras computes it (denominator at least 1e-7)."""
    return 100.0 * ((pred - true).abs() / true.abs().clamp_min(1e-7)).mean()


@register
class GAN3D(ShowerModel):
    """The 3DGAN ("3dgan"): 3D transposed-convolution generator, 3D-convolution discriminator with the
    real/fake, auxiliary-energy and total-energy outputs (see the module docstring).

    Shapes: x (B, V) = cell energy, MeV (model space of ``default_transform = ()``);
    c (B, C), column 0 the standardised log incident energy.

    Optimizers (:meth:`configure_optimizers`): ``[generator, discriminator]``.
    """

    name: ClassVar[str] = "3dgan"
    #: an adversarial game: its losses need not decrease
    adversarial: ClassVar[bool] = True
    default_transform: ClassVar[tuple[str, ...]] = ()
    config_class: ClassVar[type[ModelConfig]] = GAN3DConfig
    config: GAN3DConfig

    def __init__(self, spec: ModelSpec, config: GAN3DConfig | Mapping[str, Any] | None = None,
                 **overrides: Any) -> None:
        super().__init__(spec, config, **overrides)
        cfg = self.config
        self.grid = _grid(spec)
        self.power = PowerTransform(cfg.power, cfg.x_scale)
        self.generator = Generator3D(cfg.latent_dim, spec.cond_dim, self.grid, cfg.hidden, cfg.depth,
                                     cfg.min_channels, cfg.batch_norm, cfg.dead_slope)
        self.discriminator = Discriminator3D(self.grid, spec.cond_dim, cfg.critic_hidden, cfg.depth, cfg.dropout,
                                             cfg.batch_norm)

    # -- generation (traced by the ONNX export) --
    def generate_power(self, z: Tensor, c: Tensor) -> Tensor:
        """Generated showers in power space, (B, 1, L, rows, cols), >= 0."""
        return self.generator(z, c)

    def generate(self, z: Tensor, c: Tensor) -> Tensor:
        """Model-space showers (B, V): the generator's output with the power transform inverted."""
        return self.power.inverse(self.generate_power(z, c)).flatten(1)

    def to_power(self, x: Tensor) -> Tensor:
        """Model-space showers (B, V) -> power space (B, 1, L, rows, cols), the discriminator's input."""
        return self.power(x).view(-1, 1, *self.grid)

    def total_energy(self, y: Tensor) -> Tensor:
        """The discriminator's third output: ``sum(y^(1/power)) x x_scale`` per shower, = sum of model space."""
        return self.power.inverse(y).flatten(1).sum(1)

    def noise_dim(self) -> int:
        return int(self.config.latent_dim)

    def draw_noise(self, batch: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> Tensor:
        # the same draw as sample(): on the condition's device
        return torch.randn(batch, self.config.latent_dim, generator=generator, dtype=dtype, device=device)

    @torch.no_grad()
    def sample(self, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(c.shape[0], self.config.latent_dim, generator=generator, dtype=c.dtype, device=c.device)
        return self.generate(z, c)

    def sample_from_noise(self, z: Tensor, c: Tensor, **options: Any) -> Tensor:
        if options:
            raise ValueError(f"model {self.name!r} takes no sampling options, got {sorted(options)}")
        return self.generate(z, c)

    # -- losses --
    def _latent(self, c: Tensor) -> Tensor:
        return torch.randn(c.shape[0], self.config.latent_dim, dtype=c.dtype, device=c.device)

    def _labels(self, n: int, value: float, like: Tensor) -> Tensor:
        """``value`` labels with the papers' BitFlip: each flipped with probability ``label_flip``."""
        labels = torch.full((n,), value, dtype=like.dtype, device=like.device)
        if self.config.label_flip > 0:
            flip = torch.rand(n, device=like.device) < self.config.label_flip
            labels = torch.where(flip, 1.0 - labels, labels)
        return labels

    def _discriminator_terms(self, y: Tensor, labels: Tensor, c: Tensor) -> dict[str, Tensor]:
        logit, aux = self.discriminator(y)
        return {"adv": F.binary_cross_entropy_with_logits(logit, labels),
                "aux": 100.0 * (aux - c).abs().mean()}

    def _weighted(self, terms: Mapping[str, Tensor]) -> Tensor:
        w = {"adv": self.config.adv_weight, "aux": self.config.aux_weight, "ecal": self.config.ecal_weight}
        return sum((w[k] * v for k, v in terms.items()), torch.zeros((), device=next(iter(terms.values())).device))

    def loss(self, x: Tensor, c: Tensor) -> dict[str, Tensor]:
        """Evaluation losses (no label flipping): ``loss`` the discriminator's weighted loss on the real
        and a generated batch (mean of both), ``generator`` the generator's weighted loss, and the terms."""
        y_real = self.to_power(x)
        y_fake = self.generate_power(self._latent(c), c)
        ones, zeros = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
        real = self._discriminator_terms(y_real, ones, c)
        fake = self._discriminator_terms(y_fake, zeros, c)
        gen = self._discriminator_terms(y_fake, ones, c)
        gen["ecal"] = _mape(self.total_energy(y_fake), x.clamp_min(0.0).sum(1))
        return {"loss": 0.5 * (self._weighted(real) + self._weighted(fake)), "generator": self._weighted(gen),
                "d_real_adv": real["adv"], "d_fake_adv": fake["adv"], "aux_real": real["aux"],
                "aux_fake": fake["aux"], "ecal_mape": gen["ecal"]}

    # -- training --
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """``[generator, discriminator]``: RMSprop (lr, rho; eps 1e-7 as Keras) or Adam (lr, betas)."""
        cfg = self.config
        if cfg.optimizer == "adam":
            betas = (float(cfg.betas[0]), float(cfg.betas[1]))
            return [torch.optim.Adam(m.parameters(), lr=cfg.lr, betas=betas)
                    for m in (self.generator, self.discriminator)]
        return [torch.optim.RMSprop(m.parameters(), lr=cfg.lr, alpha=cfg.rho, eps=1e-7)
                for m in (self.generator, self.discriminator)]

    def _step(self, opt: torch.optim.Optimizer, module: nn.Module, loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(module.parameters(), self.config.grad_clip)
        opt.step()

    def training_step(self, x: Tensor, c: Tensor, optimizers: list[torch.optim.Optimizer],
                      step: int) -> dict[str, float]:
        """The papers' step: discriminator on the real batch, then on a generated one (labels flipped with
        probability ``label_flip``), then ``generator_steps`` generator updates.

        Returns floats to log: ``loss`` (the discriminator's weighted loss, mean of real and fake),
        ``loss_generator`` (the last generator update's) and the unweighted terms.
        """
        opt_g, opt_d = optimizers
        n = x.shape[0]
        y_real = self.to_power(x)
        with torch.no_grad():
            y_fake = self.generate_power(self._latent(c), c)
        real = self._discriminator_terms(y_real, self._labels(n, 1.0, x), c)
        loss_real = self._weighted(real)
        self._step(opt_d, self.discriminator, loss_real)
        fake = self._discriminator_terms(y_fake, self._labels(n, 0.0, x), c)
        loss_fake = self._weighted(fake)
        self._step(opt_d, self.discriminator, loss_fake)

        e_real = x.clamp_min(0.0).sum(1)
        ones = torch.ones(n, dtype=x.dtype, device=x.device)
        for _ in range(self.config.generator_steps):
            with _frozen(self.discriminator):
                y = self.generate_power(self._latent(c), c)
                gen = self._discriminator_terms(y, ones, c)
                gen["ecal"] = _mape(self.total_energy(y), e_real)
                loss_g = self._weighted(gen)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
            if self.config.grad_clip:
                nn.utils.clip_grad_norm_(self.generator.parameters(), self.config.grad_clip)
            opt_g.step()
        return {"loss": float(0.5 * (loss_real + loss_fake).detach()), "loss_generator": float(loss_g.detach()),
                "d_real_adv": float(real["adv"].detach()), "d_fake_adv": float(fake["adv"].detach()),
                "aux_real": float(real["aux"].detach()), "aux_fake": float(fake["aux"].detach()),
                "gen_adv": float(gen["adv"].detach()), "gen_aux": float(gen["aux"].detach()),
                "ecal_mape": float(gen["ecal"].detach())}
