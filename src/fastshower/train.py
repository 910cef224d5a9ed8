"""One generic fit loop for every model.

:func:`train` fits the run's preprocessing on the training file (streaming), builds the
model from the registry, and repeatedly calls ``model.training_step(x, c, optimizers,
step)`` on batches from a :class:`fastshower.data.BatchStream`. Models with several
optimizers (GANs) override ``training_step``; the loop only steps the learning-rate
schedulers the model asks for, logs, and checkpoints.

A run folder holds::

    config.json        model name, resolved hyper-parameters, training options
    config.toml        the TOML config as given (when one was)
    geometry.json      the training file's geometry
    transforms.json    fitted preprocessing (fastshower.data.ShowerTransform state)
    spec.json          the ModelSpec the networks were built from
    meta.json          fastshower/torch versions, the data file's provenance, status
    train_log.jsonl    one JSON line per logged step (losses, lr, elapsed seconds)
    checkpoints/last.pt model, optimizer, scheduler, RNG and data-order state

Checkpoints are written atomically (temporary file + ``os.replace``), so a killed run
always leaves the previous complete checkpoint, and ``resume=True`` continues bit for
bit: the data stream's position and every RNG state (torch, numpy, python, per rank)
are restored.

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

import json
import math
import os
import random
import shutil
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fastshower import __version__
from fastshower.data import BatchStream, DataError, ShowerDataset, ShowerTransform, fit_shower_transform
from fastshower.geometry import Geometry, geometry_from_json
from fastshower.io import ShowerFile, ShowerFileError
from fastshower.models import DEFAULT_MODEL, UnknownModelError, get_model_class
from fastshower.models.base import ModelSpec, ShowerModel

__all__ = ["TRAIN_DEFAULTS", "TrainingError", "load_config", "train"]

CHECKPOINT_FORMAT = 1

#: training options a config's ``[train]`` table may set, with their defaults
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": None,  # total optimisation steps; when neither steps nor epochs is set: 2000
    "epochs": None,  # alternative to steps: passes over the file (converted to steps at start)
    "batch_size": 256,
    "seed": 0,
    "checkpoint_every": 500,
    "log_every": 50,
    "num_workers": 0,  # DataLoader worker processes reading chunks (0: read in the training process)
    "transform": None,  # voxel preprocessing steps; None: the model's default_transform
    "eps": 1e-6,  # log transform offset (fraction of E_inc after per_incident)
    "alpha": 1e-6,  # logit transform squeeze
    "conditions": "all",  # extra file conditions to condition on: "all", a list of names, or []
    "condition_defaults": "range",  # "range": generation may omit conditions (uniform over the training range)
    "threshold_mev": "auto",  # readout threshold for generation: "auto" = data.DataStats.low_hit_mev
    "chunk_rows": None,  # showers per read; None: ~4 MiB of float32
    "shuffle_chunks": 8,  # chunks whose rows are shuffled together
}
_DEFAULT_STEPS = 2000
_CONFIG_KEYS = {"model", "hparams", "train"}


class TrainingError(ValueError):
    """A training run that cannot start or continue (bad config, data, checkpoint, NaN loss)."""


# --- configuration ----------------------------------------------------------------------


def load_config(config: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    """Read and check a config: a dict or a TOML file with optional ``model = "name"``,
    ``[hparams]`` (model hyper-parameters) and ``[train]`` (keys of :data:`TRAIN_DEFAULTS`)."""
    if config is None:
        return {}
    if isinstance(config, (str, Path)):
        path = Path(config)
        try:
            cfg: dict[str, Any] = tomllib.loads(path.read_text())
        except OSError as exc:
            raise TrainingError(f"config {path}: cannot read ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise TrainingError(f"config {path}: invalid TOML ({exc})") from None
    else:
        cfg = dict(config)
    unknown = set(cfg) - _CONFIG_KEYS
    if unknown:
        raise TrainingError(f"unknown config key(s) {sorted(unknown)}; allowed: model, [hparams], [train]")
    for table in ("hparams", "train"):
        if table in cfg and not isinstance(cfg[table], Mapping):
            raise TrainingError(f"config key {table!r} must be a table of settings")
    unknown = set(cfg.get("train", {})) - set(TRAIN_DEFAULTS)
    if unknown:
        raise TrainingError(f"unknown [train] key(s) {sorted(unknown)}; known: {', '.join(TRAIN_DEFAULTS)}")
    return cfg


def _model_class(name: str) -> type[ShowerModel]:
    try:
        cls = get_model_class(name)
    except UnknownModelError as exc:
        raise TrainingError(str(exc)) from None
    if not cls.trainable:
        raise TrainingError(f"model {name!r} is not trained on showers: make it from a trained run with "
                            f"`fastshower distill --run RUN --out NEW_RUN`")
    return cls


def _check_hparams(cls: type[ShowerModel], hparams: Mapping[str, Any]) -> None:
    unknown = set(hparams) - set(cls.defaults)
    if unknown:
        raise TrainingError(f"unknown hyper-parameter(s) {sorted(unknown)} for model {cls.name!r}; "
                            f"known: {', '.join(sorted(cls.defaults))}")


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


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save ``obj`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new checkpoint, never half of one


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (temporary file and rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint; :class:`TrainingError` when it is missing, truncated or not ours."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"{path}: no checkpoint") from None
    except Exception as exc:  # torch raises many types for truncated/corrupt zip archives
        raise TrainingError(f"{path}: corrupt or unreadable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise TrainingError(f"{path}: not a fastshower checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def _provenance(f: ShowerFile) -> dict[str, Any]:
    a = f.attrs
    keep = ("generator", "particle", "pdg", "physics", "seed", "fastshower_version", "created", "finished")
    st = f.path.stat()
    return {
        "path": str(f.path.resolve()),
        "n_showers": f.n,
        "bytes": st.st_size,
        "mtime": st.st_mtime,
        "geometry": f.geometry.name,
        **{k: (v.item() if isinstance(v, np.generic) else v) for k, v in a.items() if k in keep},
    }


# --- the loop ------------------------------------------------------------------------------------


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
) -> Path:
    """Train a generative model on a shower file; returns the run folder.

    Settings are taken from, in order of precedence: keyword arguments that are not None,
    the config (dict or TOML path; ``model``, ``[hparams]``, ``[train]``), then the
    model's ``defaults`` and :data:`TRAIN_DEFAULTS`.

    Args:
        data: training shower file (CaloChallenge layout; see :mod:`fastshower.io`).
        model: registered model name (default: the config's, else "flow-matching").
        out: run folder; must be new or empty unless ``resume``.
        steps: total optimisation steps (on resume: the new total, which may be larger).
        epochs: passes over the file, converted to steps (ignored when steps is given).
        batch_size: showers per step and rank (default 256).
        seed: seeds model initialisation, noise and data order (default 0).
        device: "cpu", "cuda" or "cuda:N" (under torchrun with CUDA, each rank uses LOCAL_RANK).
        config: model hyper-parameters and training options; unknown keys raise.
        resume: continue the run in ``out`` from its last checkpoint (starts fresh when it has none).
        progress: show a tqdm bar with the latest losses (rank 0 only).
        checkpoint_every: steps between checkpoints (default 500); one is always written at the end.
        log_every: steps between lines of train_log.jsonl (default 50).
        num_workers: DataLoader processes reading chunks (default 0).
        callback: called as ``callback(step, logs)`` after every step (after any checkpoint of that step).

    Raises:
        TrainingError: bad config, data, checkpoint, geometry mismatch on resume, non-finite loss.
    """
    out = Path(out)
    rank, world, dev, own_group = _dist_setup(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {device!r} requested but CUDA is not available")
    ckpt_path = out / "checkpoints" / "last.pt"
    resuming = resume and ckpt_path.exists()
    cfg = load_config(config)

    if resuming:
        stored = json.loads((out / "config.json").read_text())
        model_name = stored["model"]
        if model is not None and model != model_name:
            raise TrainingError(f"--resume: run {out} trains {model_name!r}, not {model!r}")
        if cfg:
            cls = _model_class(cfg.get("model", model_name))
            given = {**cls.defaults, **cfg.get("hparams", {})}
            if cfg.get("model", model_name) != model_name or given != stored["hparams"]:
                raise TrainingError(f"--resume: the config differs from the one run {out} was started with")
        hparams = dict(stored["hparams"])
        opts = {**TRAIN_DEFAULTS, **stored["train"]}
        cls = _model_class(model_name)
    else:
        # resume=True on a folder without a checkpoint (killed before the first one) starts it afresh
        if out.exists() and any(out.iterdir()) and rank == 0 and not resume:
            raise TrainingError(f"{out} exists and is not empty; pass resume=True (--resume) or choose another --out")
        cfg_model = cfg.get("model")
        if model is not None and cfg_model is not None and model != cfg_model:
            raise TrainingError(f"model {model!r} given but the config names {cfg_model!r}")
        model_name = model or cfg_model or DEFAULT_MODEL
        cls = _model_class(model_name)
        _check_hparams(cls, cfg.get("hparams", {}))
        hparams = {**cls.defaults, **cfg.get("hparams", {})}
        opts = {**TRAIN_DEFAULTS, **cfg.get("train", {})}
        for key, val in (("batch_size", batch_size), ("seed", seed), ("checkpoint_every", checkpoint_every),
                         ("log_every", log_every), ("num_workers", num_workers)):
            if val is not None:
                opts[key] = val
        if opts["transform"] is None:
            opts["transform"] = list(cls.default_transform)
    # what may change on resume: length, bookkeeping, workers
    if steps is not None:
        opts["steps"], opts["epochs"] = int(steps), None
    elif epochs is not None:
        opts["steps"], opts["epochs"] = None, float(epochs)
    for key, val in (("checkpoint_every", checkpoint_every), ("log_every", log_every), ("num_workers", num_workers)):
        if val is not None:
            opts[key] = int(val)
    for key in ("batch_size", "checkpoint_every", "log_every"):
        if int(opts[key]) < 1:
            raise TrainingError(f"{key} must be >= 1, got {opts[key]}")

    # -- data and preprocessing --------------------------------------------------------------
    try:
        with ShowerFile(data) as f:
            geometry = f.geometry
            provenance = _provenance(f)
    except ShowerFileError as exc:
        raise TrainingError(str(exc)) from None
    if resuming:
        run_geo = geometry_from_json((out / "geometry.json").read_text())
        if run_geo.to_dict() != geometry.to_dict():
            raise TrainingError(f"--resume: {data} holds geometry {geometry.name!r} but run {out} was trained on "
                                f"{run_geo.name!r}")
    try:
        if rank == 0:
            if resuming:
                tstate = ShowerTransform.load(out / "transforms.json").get_state()
            else:
                tstate = fit_shower_transform(
                    data, opts["transform"], opts["conditions"], geometry=geometry,
                    eps=float(opts["eps"]), alpha=float(opts["alpha"]),
                ).get_state()
        else:
            tstate = None
        transform = ShowerTransform.from_state(_broadcast_object(tstate, world))
        dataset = ShowerDataset(data, transform, opts["chunk_rows"], geometry)
    except (DataError, ShowerFileError) as exc:
        raise TrainingError(str(exc)) from None
    cond = transform.cond
    spec = ModelSpec.from_geometry(geometry, cond.all_names, cond.all_widths)
    stream = BatchStream(dataset, int(opts["batch_size"]), int(opts["seed"]), rank, world,
                         int(opts["shuffle_chunks"]), int(opts["num_workers"]))
    if opts["steps"] is not None:
        total_steps = int(opts["steps"])
    elif opts["epochs"] is not None:
        total_steps = max(1, math.ceil(float(opts["epochs"]) * stream.batches_per_epoch()))
    else:
        total_steps = _DEFAULT_STEPS
    opts["total_steps"] = total_steps
    stats = transform.stats
    threshold = opts["threshold_mev"]
    if threshold == "auto":
        threshold = (stats.low_hit_mev or stats.min_nonzero_mev) if stats is not None else 0.0
    opts["threshold_resolved_mev"] = float(threshold)

    # -- model -------------------------------------------------------------------------------
    seed_ = int(opts["seed"])
    random.seed(seed_)
    np.random.seed(seed_ % 2**32)  # noqa: NPY002 - seeds the legacy global RNG third-party code may use
    torch.manual_seed(seed_)  # identical initial weights on every rank
    try:
        net = cls(spec, **hparams).to(dev)
    except ValueError as exc:
        raise TrainingError(f"model {model_name!r}: {exc}") from None
    optimizers = net.configure_optimizers()
    schedulers = net.configure_schedulers(optimizers, total_steps)
    if world > 1:
        for t in net.state_dict().values():
            dist.broadcast(t, 0)
        for opt in optimizers:
            opt.register_step_pre_hook(_grad_sync_hook(world))
        torch.manual_seed(seed_ + 100_003 * rank)  # but independent noise per rank

    start_step = 0
    if resuming:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("model_name") != model_name:
            raise TrainingError(f"{ckpt_path}: checkpoint of model {ckpt.get('model_name')!r}, run says {model_name!r}")
        if ckpt.get("world_size", 1) != world:
            raise TrainingError(f"{ckpt_path}: written by {ckpt.get('world_size', 1)} ranks, now {world}; "
                                "resume with the same number of processes")
        try:
            net.load_state_dict(ckpt["model"])
            for opt, s in zip(optimizers, ckpt["optimizers"], strict=True):
                opt.load_state_dict(s)
            for sch, s in zip(schedulers, ckpt["schedulers"], strict=True):
                sch.load_state_dict(s)
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).splitlines()[0]
            raise TrainingError(f"{ckpt_path}: does not fit model {model_name!r} ({first})") from None
        # schedulers rebuilt from the (possibly new) total keep their step count and use the new horizon
        start_step = int(ckpt["step"])
        stream.load_state_dict(ckpt["data"][rank])
        _set_rng_state(ckpt["rng"][rank], dev)

    # -- run folder -------------------------------------------------------------------------------
    meta = {
        "fastshower_version": __version__,
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
        "model": model_name,
        "data": provenance,
        "world_size": world,
        "device": str(dev),
        "status": "running",
        "step": start_step,
    }
    if rank == 0:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        if not resuming:
            if isinstance(config, (str, Path)):
                shutil.copyfile(config, out / "config.toml")
            (out / "geometry.json").write_text(geometry.to_json())
            transform.save(out / "transforms.json")
            write_json(out / "spec.json", spec.to_dict())
            meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        else:
            meta = {**json.loads((out / "meta.json").read_text()), **meta, "resumed_at_step": start_step}
        write_json(out / "config.json", {"model": model_name, "hparams": hparams, "train": opts})
        write_json(out / "meta.json", meta)

    def checkpoint(step: int) -> None:
        rng = _rng_state(dev)
        data_state = stream.state_dict()
        if world > 1:
            rngs: list[Any] = [None] * world
            datas: list[Any] = [None] * world
            dist.all_gather_object(rngs, rng)
            dist.all_gather_object(datas, data_state)
        else:
            rngs, datas = [rng], [data_state]
        if rank != 0:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "model_name": model_name,
            "step": step,
            "world_size": world,
            "model": net.state_dict(),
            "optimizers": [o.state_dict() for o in optimizers],
            "schedulers": [s.state_dict() for s in schedulers],
            "rng": rngs,
            "data": datas,
        }
        atomic_save(state, ckpt_path)
        meta["step"] = step
        write_json(out / "meta.json", meta)

    # -- loop -----------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not progress or rank != 0, desc=model_name,
               dynamic_ncols=True)
    log_file = (out / "train_log.jsonl").open("a") if rank == 0 else None
    batches = iter(stream)
    step = start_step
    t0 = time.perf_counter()
    last_ckpt = start_step if resuming else -1
    try:
        net.train()
        while step < total_steps:
            try:
                x, c = next(batches)
            except (DataError, ShowerFileError) as exc:
                raise TrainingError(str(exc).splitlines()[0]) from None
            x, c = x.to(dev, non_blocking=True), c.to(dev, non_blocking=True)
            logs = net.training_step(x, c, optimizers, step)
            for sch in schedulers:
                sch.step()
            step += 1
            if world > 1:
                keys = sorted(logs)
                vals = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=dev)
                dist.all_reduce(vals)  # every rank sees the same mean losses: a NaN on one rank stops all
                logs = {k: float(v) / world for k, v in zip(keys, vals.tolist(), strict=True)}
            loss = logs.get("loss", math.nan)
            if not math.isfinite(loss):
                kept = f"last good checkpoint: {ckpt_path} (step {last_ckpt})" if last_ckpt >= 0 else "no checkpoint"
                raise TrainingError(f"loss is {loss} at step {step}; stopped ({kept}); "
                                    "try a lower lr or grad_clip")
            if step % int(opts["log_every"]) == 0 or step == total_steps:
                line = {"step": step, "epoch": stream.epoch, "elapsed_s": round(time.perf_counter() - t0, 3),
                        "lr": optimizers[0].param_groups[0]["lr"] if optimizers else None, **logs}
                if log_file is not None:
                    log_file.write(json.dumps(line) + "\n")
                    log_file.flush()
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
            bar.update(1)
            if step % int(opts["checkpoint_every"]) == 0 or step == total_steps:
                checkpoint(step)
                last_ckpt = step
            if callback is not None:
                callback(step, logs)
    except KeyboardInterrupt:
        # the step in hand completed: its state is consistent, so keep it for --resume
        if last_ckpt != step:
            checkpoint(step)
        raise
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
        dataset.close()
    if rank == 0:
        meta["status"] = "finished"
        meta["step"] = step
        meta["train_seconds"] = round(time.perf_counter() - t0, 3)
        write_json(out / "meta.json", meta)
    if world > 1:
        dist.barrier()
        if own_group:
            dist.destroy_process_group()
    return out


def run_geometry(run_dir: str | Path) -> Geometry:
    """The geometry a run was trained on."""
    return geometry_from_json(Path(run_dir, "geometry.json").read_text())
