"""Typed configuration: the fit loop's :class:`TrainConfig` and the base every model config derives from.

A config is a frozen dataclass. :meth:`Config.from_dict` is the one door from untyped input
(a TOML table, a run folder's ``config.json``, keyword arguments) into it:

- an unknown key raises :class:`fastshower.errors.ConfigError` naming the known ones;
- a key renamed since an earlier release (``renamed``) is read under its new name, so old run
  folders still load;
- JSON and TOML have no tuples, so a list given for a tuple field becomes a tuple (a config read
  back from its run folder equals the one that was saved);
- a value of the wrong kind (a string for an int, a float for a bool) is refused with the key's name.

``to_dict()`` is what is written to the run folder (JSON-ready: tuples become lists there).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from fastshower.errors import ConfigError

__all__ = ["Config", "TrainConfig", "default_threads"]


def _allowed(hint: Any) -> tuple[Any, ...]:
    """The alternatives of a field's type hint (``int | None`` -> (int, NoneType))."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against ``hint`` (and a list made a tuple where a tuple is expected)."""
    for alt in _allowed(hint):
        origin = typing.get_origin(alt) or alt
        if alt is Any or (alt is type(None) and value is None):
            return value
        if origin is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool, dict) and isinstance(value, origin):
            return value
    names = " or ".join(getattr(a, "__name__", str(a)) for a in _allowed(hint))
    raise ConfigError(f"{where}: {key} must be {names}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of typed configs (see the module docstring)."""

    #: keys of earlier releases -> their present names
    renamed: ClassVar[dict[str, str]] = {}
    #: keys added since an earlier release -> the value that release behaved as; a *saved* config (which
    #: holds every key of its release) lacking one gets this, not today's default (:meth:`from_saved`)
    introduced: ClassVar[dict[str, Any]] = {}
    #: the allowed values of the fields that take one of a few strings (checked by :meth:`check`)
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def keys(cls) -> list[str]:
        """The known keys, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, where: str | None = None) -> Self:
        """A checked config from a mapping; keys not given keep their defaults.

        Raises:
            ConfigError: an unknown key (the message lists the known ones) or a value of the wrong kind.
        """
        where = where or cls.__name__
        given = dict(values or {})
        for old, new in cls.renamed.items():
            if old in given and new not in given:
                given[new] = given.pop(old)
        known = cls.keys()
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {', '.join(known)}")
        hints = typing.get_type_hints(cls)
        config = cls(**{k: _coerce(k, v, hints[k], where) for k, v in given.items()})
        config.check(where)
        return config

    def check(self, where: str) -> None:
        """Refuse values outside their field's :attr:`choices` (subclasses add their own rules).

        Raises:
            ConfigError: naming ``where`` (the model or table), the key and the allowed values.
        """
        for key, allowed in self.choices.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(f"{where}: {key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")

    @classmethod
    def from_saved(cls, values: Mapping[str, Any] | None = None, where: str | None = None) -> Self:
        """:meth:`from_dict` of a config written by :meth:`to_dict` in this or an earlier release."""
        return cls.from_dict({**cls.introduced, **(values or {})}, where)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-ready values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied and checked like :meth:`from_dict`."""
        return type(self).from_dict({**dataclasses.asdict(self), **changes})


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """Options of the fit loop (:func:`fastshower.training.train`), a config's ``[train]`` table.

    Attributes:
        steps: total optimisation steps; when neither steps nor epochs is set, 2000.
        epochs: alternative to steps: passes over the file (converted to steps at start).
        batch_size: showers per step and rank.
        seed: seeds initialisation, noise and data order.
        checkpoint_every, log_every: steps between checkpoints and between log lines.
        num_workers: DataLoader worker processes reading chunks (0: read in the training process).
        transform: voxel preprocessing steps; None: the model's ``default_transform``.
        eps: log-transform offset (fraction of E_inc after ``per_incident``).
        alpha: logit-transform squeeze.
        conditions: extra file conditions to condition on: "all", or a tuple of names (empty: none).
        condition_defaults: "range": generation may omit conditions (uniform over the training
            range); "none": it must give them.
        threshold_mev: readout threshold for generation, MeV; "auto": the training file's
            :attr:`fastshower.data.DataStats.low_hit_mev`.
        chunk_rows: showers per read; None: about 4 MiB of float32.
        shuffle_chunks: chunks whose rows are shuffled together.
        precision: "fp32", or "bf16": the training step's matrix products in bfloat16 (torch.autocast; weights,
            optimizer and sampling stay float32). Measured on par04-ds2's layer-fm, one thread of a Zen 4 CPU
            (avx512_bf16): 0.76 -> 0.60 CPU-s per step; on a GPU's tensor cores the gain is larger. On a CPU
            without bf16 units it is emulated (AVX2 EPYC: 0.95 -> 8.0 CPU-s per step) and ``train`` says so.
        calibration_showers: training showers a model with a post-training calibration (layer-fm's maps) fits it on
            at the end of training. Why settable: layer-fm's copulas (depth_copula, layer_copula) fit 45 x 45 and
            90 x 90 correlation matrices per incident-energy knot; on par04-ds2 (seed-0 60-min run, maps "all" with
            both) 5250 showers instead of 2000 took the strict high-level AUC from 0.822 to 0.780 for 323 CPU-s
            of calibration instead of ~120.
        total_steps: resolved at the start of training from steps/epochs (not for the user to set).
        threshold_resolved_mev: threshold_mev resolved at the start of training, MeV (likewise).
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 256
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    num_workers: int = 0
    transform: tuple[str, ...] | None = None
    eps: float = 1e-6
    alpha: float = 1e-6
    conditions: str | tuple[str, ...] = "all"
    condition_defaults: str = "range"
    threshold_mev: float | str = "auto"
    chunk_rows: int | None = None
    shuffle_chunks: int = 8
    precision: str = "fp32"
    calibration_showers: int = 2000
    total_steps: int | None = None
    threshold_resolved_mev: float | None = None

    #: what training resolves itself; a user's config may not set these
    RESOLVED: ClassVar[tuple[str, ...]] = ("total_steps", "threshold_resolved_mev")
    introduced: ClassVar[dict[str, Any]] = {"precision": "fp32", "calibration_showers": 2000}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"precision": ("fp32", "bf16")}


def default_threads(cores: int | None = None) -> int:
    """torch intra-op threads for training when the caller names none (the CLI's ``--threads`` default).

    ``cores``: the CPUs this process may use (default: its affinity set). Measured on the 2-core machine this
    project is developed on, with another job using about two cores (flow matching, belle2-ecl-5x5, batch 256,
    40 steps): 1 thread 68-73 ms per step, 2 threads (torch's default there) 1950-2140 ms per step, the
    thread pool spinning against the other process. So one thread up to 2 cores; above that half the cores,
    at most 8, which was not measured here (small networks gain little from more).
    """
    n = cores if cores is not None else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    return 1 if n <= 2 else min(n // 2, 8)
