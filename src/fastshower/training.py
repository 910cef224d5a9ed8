"""One generic fit loop for every model (``fastshower train``).

:func:`train` fits the run's preprocessing on the training file (streaming), builds the
model from the registry with its typed config, and repeatedly calls
``model.training_step(x, c, optimizers, step)`` on batches from a
:class:`fastshower.data.BatchStream`. Models with several optimizers (GANs) override
``training_step``; the loop only steps the learning-rate schedulers the model asks for, logs,
and checkpoints into the run folder (layout and checkpoint format: :mod:`fastshower.runs`).

Settings: a :class:`fastshower.config.TrainConfig` for the loop and the model family's config
(:class:`fastshower.models.base.ModelConfig`), both saved in the run folder's ``config.json``.
A resumed run continues bit for bit: the data stream's position and every RNG state (torch,
numpy, python, per rank) are restored from the checkpoint.

Distributed training: under ``torchrun`` (RANK / WORLD_SIZE set) the process group is
initialised (gloo on CPU, nccl on CUDA), parameters are broadcast from rank 0, chunks
of the file are dealt to ranks, and gradients are averaged across ranks just before
every optimizer step. The averaging is done by an optimizer step pre-hook rather than
by wrapping the model in ``DistributedDataParallel``: the model protocol lets a model
call its own sub-networks and run several backward passes per step (GANs), which
bypass a DDP wrapper's ``forward``; a hook on each optimizer synchronises exactly the
gradients that are about to be used, whatever the model does. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist

from fastshower._version import __version__
from fastshower.config import TrainConfig
from fastshower.data import BatchStream, DataError, ShowerDataset, ShowerTransform, fit_shower_transform
from fastshower.errors import ConfigError, FastshowerError
from fastshower.geometry import Geometry
from fastshower.io import ShowerFile, ShowerFileError
from fastshower.models import DEFAULT_MODEL, get_model_class
from fastshower.models.base import ModelConfig, ModelSpec, ShowerModel, model_cost
from fastshower.runs import (
    CHECKPOINT_FORMAT,
    RunFolder,
    atomic_save,
    data_provenance,
    load_checkpoint,
    load_run,
    load_weights,
    read_json,
    run_geometry,
    write_config,
    write_json,
)

__all__ = ["TrainingError", "calibrate_run", "load_config", "torch_threads", "train"]

#: training showers that a post-training calibration (layer-fm's cell map) sees
CALIBRATION_SHOWERS = TrainConfig.calibration_showers

#: steps when neither steps nor epochs is given
DEFAULT_STEPS = 2000
_CONFIG_TABLES = ("model", "hparams", "train")


class TrainingError(FastshowerError, ValueError):
    """A training run that cannot start or continue (bad data, a run folder that does not fit, NaN loss)."""


# --- configuration ----------------------------------------------------------------------


def load_config(config: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    """Read and check a config: a dict or a TOML file with optional ``model = "name"``,
    ``[hparams]`` (the model family's config) and ``[train]`` (:class:`fastshower.config.TrainConfig` keys).

    Returns the raw tables; ``[train]`` is checked here, ``[hparams]`` once the model is known.
    """
    if config is None:
        return {}
    if isinstance(config, (str, Path)):
        path = Path(config)
        try:
            cfg: dict[str, Any] = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"config {path}: cannot read ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path}: invalid TOML ({exc})") from None
    else:
        cfg = dict(config)
    unknown = sorted(set(cfg) - set(_CONFIG_TABLES))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; allowed: model, [hparams], [train]")
    for table in ("hparams", "train"):
        if table in cfg and not isinstance(cfg[table], Mapping):
            raise ConfigError(f"config key {table!r} must be a table of settings")
    resolved = sorted(set(cfg.get("train", {})) & set(TrainConfig.RESOLVED))
    if resolved:
        raise ConfigError(f"[train] {resolved} are resolved by training itself; leave them out")
    TrainConfig.from_dict(cfg.get("train", {}), where="[train]")
    return cfg


def _model_class(name: str) -> type[ShowerModel]:
    cls = get_model_class(name)
    if not cls.trainable:
        raise TrainingError(f"model {name!r} is not trained on showers: make it from a trained run with "
                            "fastshower.distill(teacher, out)")
    return cls


@dataclass
class _Plan:
    """What a call of :func:`train` will do: the run folder, the model and both configs."""

    folder: RunFolder
    model_name: str
    model_config: ModelConfig
    options: TrainConfig
    resuming: bool

    @property
    def cls(self) -> type[ShowerModel]:
        return get_model_class(self.model_name)


def _plan_resumed(folder: RunFolder, model: str | None, cfg: Mapping[str, Any]) -> _Plan:
    """The plan of a run continued from its folder; a different model or config is refused."""
    stored = read_json(folder.config)
    name = str(stored["model"])
    if model is not None and model != name:
        raise TrainingError(f"resume=True: run {folder.path} trains {name!r}, not {model!r}")
    cls = _model_class(name)
    config = cls.config_class.from_saved(stored["hparams"], where=f"{folder.config} [hparams]")
    if cfg:
        given = _model_class(cfg.get("model", name)).config_class.from_dict(cfg.get("hparams", {}),
                                                                           where="[hparams]")
        if cfg.get("model", name) != name or _plain(given.to_dict()) != _plain(config.to_dict()):
            raise TrainingError(f"resume=True: the config differs from the one run {folder.path} was started with")
    options = TrainConfig.from_dict(stored["train"], where=f"{folder.config} [train]")
    return _Plan(folder, name, config, options, resuming=True)


def _plain(values: Mapping[str, Any]) -> Any:
    """``values`` as JSON gives them back, so that a tuple default and the list saved in config.json compare
    equal (and 10 and 10.0 do)."""
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def _plan_new(folder: RunFolder, model: str | None, cfg: Mapping[str, Any], overrides: Mapping[str, Any],
              check_empty: bool) -> _Plan:
    """The plan of a new run: model from the argument or the config, configs from the config and overrides."""
    if check_empty and folder.path.exists() and any(folder.path.iterdir()):
        raise TrainingError(f"{folder.path} exists and is not empty; pass resume=True or choose another out")
    cfg_model = cfg.get("model")
    if model is not None and cfg_model is not None and model != cfg_model:
        raise TrainingError(f"model {model!r} given but the config names {cfg_model!r}")
    name = model or cfg_model or DEFAULT_MODEL
    cls = _model_class(name)
    config = cls.config_class.from_dict(cfg.get("hparams", {}), where=f"[hparams] of model {name!r}")
    options = TrainConfig.from_dict({**cfg.get("train", {}), **{k: v for k, v in overrides.items() if v is not None}},
                                    where="[train]")
    if options.transform is None:
        options = options.replace(transform=tuple(cls.default_transform))
    return _Plan(folder, name, config, options, resuming=False)


def _plan(folder: RunFolder, model: str | None, cfg: Mapping[str, Any], resume: bool, rank0: bool,
          overrides: Mapping[str, Any]) -> _Plan:
    """A resumed run's plan when ``resume`` and the folder has a checkpoint, else a new run's."""
    if resume and folder.checkpoint.exists():
        return _plan_resumed(folder, model, cfg)
    # resume=True on a folder without a checkpoint (killed before the first one) starts it afresh
    return _plan_new(folder, model, cfg, overrides, check_empty=rank0 and not resume)


def _with_length(options: TrainConfig, steps: int | None, epochs: float | None,
                 bookkeeping: Mapping[str, int | None]) -> TrainConfig:
    """``options`` with what may change on resume: the run's length, checkpoint/log cadence, workers."""
    changes: dict[str, Any] = {k: int(v) for k, v in bookkeeping.items() if v is not None}
    if steps is not None:
        changes.update(steps=int(steps), epochs=None)
    elif epochs is not None:
        changes.update(steps=None, epochs=float(epochs))
    options = options.replace(**changes)
    if options.steps is not None and options.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {options.steps}")
    if options.epochs is not None and not options.epochs > 0:
        raise ConfigError(f"epochs must be > 0, got {options.epochs}")
    for key in ("batch_size", "checkpoint_every", "log_every", "calibration_showers"):
        if getattr(options, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(options, key)}")
    return options


# --- distributed helpers ---------------------------------------------------------------------


def _dist_setup(device: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, whether we created the process group); initialises it under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return 0, 1, torch.device(device), False
    dev = torch.device(device)
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev, created


def _grad_sync_hook(world: int) -> Callable[..., None]:
    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective per step, not one per tensor
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    return hook


def _broadcast_object(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- RNG and checkpoint state ----------------------------------------------------------------


def _rng_state(device: torch.device) -> dict[str, Any]:
    # the legacy global numpy RNG is saved because user and model code may draw from it
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # plain types and tensors only, so checkpoints load with torch.load(weights_only=True)
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "python": [int(version), list(internal), gauss],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --- data, model and state -----------------------------------------------------------------


@dataclass
class _Data:
    """The training file as the loop sees it."""

    geometry: Geometry
    provenance: dict[str, Any]
    transform: ShowerTransform
    dataset: ShowerDataset
    spec: ModelSpec


def _open_data(plan: _Plan, data: str | Path, rank: int, world: int) -> _Data:
    """Geometry, provenance and the fitted (or, on resume, reloaded) preprocessing of the training file.

    The transform is fitted on rank 0 only and broadcast, so every rank uses the same numbers.
    """
    try:
        with ShowerFile(data) as f:
            geometry, provenance = f.geometry, data_provenance(f)
    except ShowerFileError as exc:
        raise TrainingError(str(exc)) from None
    if plan.resuming:
        run_geo = run_geometry(plan.folder.path)
        if run_geo.to_dict() != geometry.to_dict():
            raise TrainingError(f"resume=True: {data} holds geometry {geometry.name!r} but run {plan.folder.path} "
                                f"was trained on {run_geo.name!r}")
    opts = plan.options
    try:
        tstate = None
        if rank == 0 and plan.resuming:
            tstate = ShowerTransform.load(plan.folder.transforms).get_state()
        elif rank == 0:
            tstate = fit_shower_transform(data, list(opts.transform or ()), opts.conditions, geometry=geometry,
                                          eps=opts.eps, alpha=opts.alpha).get_state()
        transform = ShowerTransform.from_state(_broadcast_object(tstate, world))
        dataset = ShowerDataset(data, transform, opts.chunk_rows, geometry)
    except (DataError, ShowerFileError) as exc:
        raise TrainingError(str(exc)) from None
    spec = ModelSpec.from_geometry(geometry, transform.cond.all_names, transform.cond.all_widths)
    return _Data(geometry, provenance, transform, dataset, spec)


def _resolve(options: TrainConfig, stream: BatchStream, transform: ShowerTransform) -> TrainConfig:
    """``options`` with the total step count and the readout threshold (MeV) resolved."""
    if options.steps is not None:
        total = options.steps
    elif options.epochs is not None:
        total = max(1, math.ceil(options.epochs * stream.batches_per_epoch()))
    else:
        total = DEFAULT_STEPS
    threshold = options.threshold_mev
    if threshold == "auto":
        stats = transform.stats
        threshold = (stats.low_hit_mev or stats.min_nonzero_mev) if stats is not None else 0.0
    return options.replace(total_steps=total, threshold_resolved_mev=float(threshold))


@dataclass
class _State:
    """The model and everything a checkpoint restores."""

    net: ShowerModel
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    stream: BatchStream
    step: int = 0


def _build(plan: _Plan, data: _Data, stream: BatchStream, dev: torch.device, rank: int, world: int) -> _State:
    """The seeded model and its optimizers and schedulers (gradients synced across ranks)."""
    opts = plan.options
    seed = opts.seed
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds the legacy global RNG third-party code may use
    torch.manual_seed(seed)  # identical initial weights on every rank
    try:
        net = plan.cls(data.spec, plan.model_config).to(dev)
    except ConfigError:
        raise
    except ValueError as exc:
        raise TrainingError(f"model {plan.model_name!r}: {exc}") from None
    optimizers = net.configure_optimizers()
    schedulers = net.configure_schedulers(optimizers, int(opts.total_steps or DEFAULT_STEPS))
    if world > 1:
        for t in net.state_dict().values():
            dist.broadcast(t, 0)
        for opt in optimizers:
            opt.register_step_pre_hook(_grad_sync_hook(world))
        torch.manual_seed(seed + 100_003 * rank)  # but independent noise per rank
    return _State(net, optimizers, schedulers, stream)


def _restore(plan: _Plan, state: _State, rank: int, world: int, dev: torch.device) -> None:
    """Load the run's last checkpoint into ``state``: weights, optimizers, schedulers, data position, RNGs."""
    path = plan.folder.checkpoint
    ckpt = load_checkpoint(path)
    if ckpt.get("model_name") != plan.model_name:
        raise TrainingError(f"{path}: checkpoint of model {ckpt.get('model_name')!r}, run says {plan.model_name!r}")
    if ckpt.get("world_size", 1) != world:
        raise TrainingError(f"{path}: written by {ckpt.get('world_size', 1)} ranks, now {world}; "
                            "resume with the same number of processes")
    load_weights(state.net, ckpt["model"], path, plan.model_name)
    try:
        for opt, s in zip(state.optimizers, ckpt["optimizers"], strict=True):
            opt.load_state_dict(s)
        # schedulers rebuilt from the (possibly new) total keep their step count and use the new horizon
        for sch, s in zip(state.schedulers, ckpt["schedulers"], strict=True):
            sch.load_state_dict(s)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise TrainingError(f"{path}: does not fit model {plan.model_name!r} ({str(exc).splitlines()[0]})") from None
    state.step = int(ckpt["step"])
    state.stream.load_state_dict(ckpt["data"][rank])
    _set_rng_state(ckpt["rng"][rank], dev)


def _start_run_folder(plan: _Plan, data: _Data, config: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Write (new run) or update (resumed run) the run folder's files; returns the meta.json contents."""
    folder = plan.folder
    folder.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if plan.resuming:
        meta = {**read_json(folder.meta), **meta, "resumed_at_step": meta["step"]}
    else:
        if isinstance(config, (str, Path)):
            shutil.copyfile(config, folder.config_toml)
        folder.geometry.write_text(data.geometry.to_json())
        data.transform.save(folder.transforms)
        write_json(folder.spec, data.spec.to_dict())
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_config(folder, plan.model_name, plan.model_config, plan.options)
    write_json(folder.meta, meta)
    return meta


# --- the loop ------------------------------------------------------------------------------------


@dataclass
class _Loop:
    """The fit loop's bookkeeping: logging, checkpoints, the NaN guard."""

    plan: _Plan
    state: _State
    rank: int
    world: int
    dev: torch.device
    meta: dict[str, Any]
    last_ckpt: int = -1
    t0: float = field(default_factory=time.perf_counter)
    cpu0: float = field(default_factory=time.process_time)
    log_file: TextIO | None = None

    def checkpoint(self) -> None:
        """Write checkpoints/last.pt (rank 0; every rank's RNG and data position gathered first)."""
        rng, data_state = _rng_state(self.dev), self.state.stream.state_dict()
        rngs: list[Any] = [rng]
        datas: list[Any] = [data_state]
        if self.world > 1:
            rngs, datas = [None] * self.world, [None] * self.world
            dist.all_gather_object(rngs, rng)
            dist.all_gather_object(datas, data_state)
        self.last_ckpt = self.state.step
        if self.rank != 0:
            return
        s = self.state
        atomic_save({"format": CHECKPOINT_FORMAT, "model_name": self.plan.model_name, "step": s.step,
                     "world_size": self.world, "model": s.net.state_dict(),
                     "optimizers": [o.state_dict() for o in s.optimizers],
                     "schedulers": [x.state_dict() for x in s.schedulers], "rng": rngs, "data": datas},
                    self.plan.folder.checkpoint)
        self.meta["step"] = s.step
        write_json(self.plan.folder.meta, self.meta)

    def mean_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Losses averaged over ranks: every rank sees the same values, so a NaN on one rank stops all."""
        if self.world == 1:
            return logs
        keys = sorted(logs)
        vals = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.dev)
        dist.all_reduce(vals)
        return {k: float(v) / self.world for k, v in zip(keys, vals.tolist(), strict=True)}

    def check_finite(self, logs: Mapping[str, float]) -> None:
        loss = logs.get("loss", math.nan)
        if not math.isfinite(loss):
            path = self.plan.folder.checkpoint
            kept = f"last good checkpoint: {path} (step {self.last_ckpt})" if self.last_ckpt >= 0 else "no checkpoint"
            raise TrainingError(f"loss is {loss} at step {self.state.step}; stopped ({kept}); "
                                "try a lower lr or grad_clip")

    def log(self, logs: Mapping[str, float]) -> None:
        line = {"step": self.state.step, "epoch": self.state.stream.epoch,
                "elapsed_s": round(time.perf_counter() - self.t0, 3),
                "cpu_s": round(time.process_time() - self.cpu0, 3), "peak_rss_mb": _peak_rss_mb(),
                "lr": self.state.optimizers[0].param_groups[0]["lr"] if self.state.optimizers else None, **logs}
        if self.log_file is not None:
            self.log_file.write(json.dumps(line) + "\n")
            self.log_file.flush()


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _batches(stream: BatchStream, dev: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The stream's batches on ``dev``; a data error becomes a one-line TrainingError."""
    batches = iter(stream)
    while True:
        try:
            x, c = next(batches)
        except (DataError, ShowerFileError) as exc:
            raise TrainingError(str(exc).splitlines()[0]) from None
        yield x.to(dev, non_blocking=True), c.to(dev, non_blocking=True)


def native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (avx512_bf16 or amx_bf16 among its flags); True where
    ``cpuinfo`` cannot be read (not Linux), so that nothing is claimed there."""
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _warn_precision(precision: str, dev: torch.device, rank: int) -> None:
    """One line on stderr when precision="bf16" will be emulated: measured for layer-fm on par04-ds2, one thread
    of an AVX2 CPU without bf16 units, 8.0 CPU-s per step against 0.95 in float32."""
    if precision == "bf16" and dev.type == "cpu" and rank == 0 and not native_bf16():
        print("fastshower: warning: precision bf16 on a CPU without bf16 units (no avx512_bf16 or amx_bf16) is "
              "emulated and about 8x slower per step than fp32 here; use --precision fp32", file=sys.stderr)


def _precision(precision: str, dev: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The training step's arithmetic: "bf16" runs matrix products in bfloat16 under torch.autocast (the weights,
    their gradients and the optimizer stay float32, so no loss scaling is needed); "fp32" changes nothing."""
    if precision == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _run_loop(loop: _Loop, progress: bool, callback: Callable[[int, dict[str, float]], None] | None) -> None:
    """Step until the planned total; checkpoint on schedule, at the end and on Ctrl-C."""
    from tqdm.auto import tqdm

    s, opts = loop.state, loop.plan.options
    total = int(opts.total_steps or DEFAULT_STEPS)
    bar = tqdm(total=total, initial=s.step, disable=not progress or loop.rank != 0, desc=loop.plan.model_name,
               dynamic_ncols=True)
    try:
        s.net.train()
        batches = _batches(s.stream, loop.dev)
        while s.step < total:
            x, c = next(batches)
            with _precision(opts.precision, loop.dev):
                logs = s.net.training_step(x, c, s.optimizers, s.step)
            for sch in s.schedulers:
                sch.step()
            s.step += 1
            logs = loop.mean_logs(logs)
            loop.check_finite(logs)
            if s.step % opts.log_every == 0 or s.step == total:
                loop.log(logs)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
            bar.update(1)
            if s.step % opts.checkpoint_every == 0 or s.step == total:
                loop.checkpoint()
            if callback is not None:
                callback(s.step, logs)
    except KeyboardInterrupt:
        if loop.last_ckpt != s.step:  # the step in hand completed: its state is consistent, keep it
            loop.checkpoint()
        raise
    finally:
        bar.close()


def _calibrator(model: ShowerModel) -> Callable[..., dict[str, float]] | None:
    """The model's post-training calibration (``calibrate(x, c, generator)``), or None when it has nothing to
    fit (no such method, or ``has_calibration`` false: e.g. layer-fm with cells="share")."""
    fit = getattr(model, "calibrate", None)
    return fit if fit is not None and getattr(model, "has_calibration", True) else None


def _calibrate(loop: _Loop) -> dict[str, float] | None:
    """Post-training calibration of a model that has one (:func:`_calibrator`) on the config's
    ``calibration_showers`` showers of the training stream (at most one pass over the rank's share of the file),
    seeded by the run's seed; the checkpoint is written again with it (every rank calibrates on its own showers,
    rank 0's is saved). Models without one read no showers and write nothing."""
    net = loop.state.net
    fit = _calibrator(net)
    if fit is None:
        return None
    # no more than one pass over this rank's share of the file: the stream cycles, and a repeated shower would
    # count twice in every quantile and correlation the calibration fits
    want = min(loop.plan.options.calibration_showers, max(loop.state.stream.dataset.n // loop.world, 1))
    xs, cs, n = [], [], 0
    for x, c in _batches(loop.state.stream, loop.dev):
        xs.append(x)
        cs.append(c)
        n += x.shape[0]
        if n >= want:
            break
    net.eval()
    gen = torch.Generator(device=loop.dev).manual_seed(int(loop.plan.options.seed or 0))
    stats: dict[str, float] = fit(torch.cat(xs)[:want], torch.cat(cs)[:want], gen)
    loop.checkpoint()
    return stats


def calibrate_run(run_dir: str | Path, n: int = CALIBRATION_SHOWERS, seed: int = 0) -> dict[str, float]:
    """Calibrate a finished run after its training, as ``train`` now does at its end (layer-fm's cell map;
    runs trained before it generate uncalibrated): on the first ``n`` showers of its training file (named in
    meta.json). The checkpoint is rewritten atomically and meta.json records the result, which is returned.

    Raises:
        TrainingError: the model has no calibration, or the training file cannot be read.
    """
    model, transform, info = load_run(run_dir, require_finished=True)
    fit = _calibrator(model)
    if fit is None:
        raise TrainingError(f"{run_dir}: model {info.model_name!r} has no post-training calibration")
    try:
        with ShowerFile(info.training_file or "") as f:
            batch = f.read(0, min(n, f.n))
    except (ShowerFileError, OSError) as exc:
        raise TrainingError(f"{run_dir}: its training file {info.training_file!r} cannot be read ({exc})") from None
    e = torch.from_numpy(batch.energies.reshape(-1))
    with torch.no_grad():
        x = transform(torch.from_numpy(batch.showers), e).float()
        c = transform.conditions(e, {k: torch.from_numpy(v) for k, v in batch.conditions.items()
                                     if k in transform.cond.names}).float()
    stats: dict[str, float] = fit(x, c, torch.Generator().manual_seed(seed))
    folder = RunFolder(Path(run_dir))
    ckpt = load_checkpoint(folder.checkpoint)
    ckpt["model"] = model.state_dict()
    atomic_save(ckpt, folder.checkpoint)
    meta = read_json(folder.meta)
    meta["calibration"] = stats
    write_json(folder.meta, meta)
    return stats


# --- the verb --------------------------------------------------------------------------------------


def train(
    data: str | Path,
    model: str | None = None,
    out: str | Path = "runs/run",
    *,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    device: str = "cpu",
    config: Mapping[str, Any] | str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    checkpoint_every: int | None = None,
    log_every: int | None = None,
    num_workers: int | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    threads: int | None = None,
    precision: str | None = None,
) -> Path:
    """Train a generative model on a shower file; returns the run folder.

    Settings come from keyword arguments that are not None, else the config (dict or TOML path; ``model``,
    ``[hparams]``, ``[train]``), else the model family's config and :class:`fastshower.config.TrainConfig`.

    Args:
        data: training shower file (CaloChallenge layout; see :mod:`fastshower.io`).
        model: registered model name (default: the config's, else "flow-matching").
        out: run folder; must be new or empty unless ``resume``.
        steps, epochs: total optimisation steps (on resume: the new total), or passes over the file instead.
        batch_size, seed: showers per step and rank (256); seeds initialisation, noise and data order (0).
        device: "cpu", "cuda" or "cuda:N" (under torchrun with CUDA, each rank uses LOCAL_RANK).
        config: model config and training options; unknown keys raise ConfigError.
        resume: continue the run in ``out`` from its last checkpoint (starts fresh when it has none).
        progress: show a tqdm bar with the latest losses (rank 0 only).
        checkpoint_every, log_every, num_workers: steps between checkpoints (default 500, and one at the end),
            between train_log.jsonl lines (50); DataLoader processes (0).
        callback: called as ``callback(step, logs)`` after every step (after any checkpoint of that step).
        threads: torch threads meanwhile (None: as set; see config.default_threads); meta.json ``torch_threads``.
        precision: "fp32" or "bf16" (a new run's; default the config's, else fp32): see TrainConfig.precision.

    Raises: ConfigError (unknown config keys, values of the wrong kind); TrainingError (bad data, a checkpoint
        or geometry that does not fit on resume, non-finite loss).
    """
    with torch_threads(threads):  # first: a bad count is refused before anything is read or written
        folder = RunFolder(Path(out))
        rank, world, dev, own_group = _dist_setup(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError(f"device {device!r} requested but CUDA is not available")
        bookkeeping = {"checkpoint_every": checkpoint_every, "log_every": log_every, "num_workers": num_workers}
        plan = _plan(folder, model, load_config(config), resume, rank == 0,
                     {"batch_size": batch_size, "seed": seed, "precision": precision, **bookkeeping})
        plan.options = _with_length(plan.options, steps, epochs, bookkeeping)
        data_ = _open_data(plan, data, rank, world)
        try:
            _train(plan, data_, config, rank, world, dev, progress, callback)
        finally:
            data_.dataset.close()
    _leave_dist(world, own_group)
    return folder.path


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` meanwhile (None: left alone), restored afterwards;
    ConfigError for a count below 1, before anything runs."""
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _leave_dist(world: int, own_group: bool) -> None:
    """Wait for every rank; under torchrun, leave no process group behind for the caller."""
    if world > 1:
        dist.barrier()
        if own_group:
            dist.destroy_process_group()


def _train(plan: _Plan, data: _Data, config: Any, rank: int, world: int, dev: torch.device, progress: bool,
           callback: Callable[[int, dict[str, float]], None] | None) -> None:
    """Build or restore the state, write the run folder, run the loop and mark the run finished."""
    opts = plan.options
    stream = BatchStream(data.dataset, opts.batch_size, opts.seed, rank, world, opts.shuffle_chunks, opts.num_workers)
    plan.options = _resolve(opts, stream, data.transform)
    state = _build(plan, data, stream, dev, rank, world)
    if plan.resuming:
        _restore(plan, state, rank, world, dev)
    meta = {"fastshower_version": __version__, "torch_version": torch.__version__,
            "python": sys.version.split()[0], "model": plan.model_name, "data": data.provenance,
            "world_size": world, "device": str(dev), "torch_threads": torch.get_num_threads(), "status": "running",
            "step": state.step}
    if rank == 0:
        meta["cost"] = model_cost(state.net)
        meta = _start_run_folder(plan, data, config, meta)
    loop = _Loop(plan, state, rank, world, dev, meta, last_ckpt=state.step if plan.resuming else -1)
    _warn_precision(plan.options.precision, dev, rank)
    with (plan.folder.train_log.open("a") if rank == 0 else open(os.devnull, "w")) as log_file:
        loop.log_file = log_file
        _run_loop(loop, progress, callback)
    calibration = _calibrate(loop)
    if rank == 0:
        meta.update(status="finished", step=state.step, train_seconds=round(time.perf_counter() - loop.t0, 3),
                    train_cpu_seconds=round(time.process_time() - loop.cpu0, 3), peak_rss_mb=_peak_rss_mb())
        if calibration:
            meta["calibration"] = calibration
        write_json(plan.folder.meta, meta)
