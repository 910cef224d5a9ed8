"""Distil a flow-matching, flow or layer-fm run into a one-step generator (``fastshower distill``).

The teacher's ODE sampler costs 2 x ``steps`` passes of its velocity net per shower; the
student (:class:`fastshower.models.onestep.OneStep`) costs one pass of a much smaller net.
Procedure (Luhman & Luhman 2021, arXiv:2101.02388):

1. conditions: ``n_pairs`` rows drawn (with replacement) from the teacher's training file,
   so the student learns where the showers are, in the run's own condition transform;
2. pairs: noise z ~ N(0, I) per row, carried through the teacher's ODE (``ode_steps``,
   default the teacher's own) to its model-space shower x; 10 % of the pairs are held out.
   A two-stage teacher (``flow``, ``layer-fm``) is distilled *staged*: the student keeps its stage-1
   flow, scalers and stage-2 variables, and x is the teacher's standardised stage-2 latents g2 (B, W):
   flow 2's output or the end of layer-fm's shape ODE, one logit share per voxel (W = V) or, for a
   layer-fm with ring shares (polar readouts), each ring's share of its layer then each cell's share
   of its ring (W = V + L x R), standardised per incident energy when the teacher's ``energy_knots``
   are set; the student assembles them with the teacher's own code (see :mod:`fastshower.models.onestep`);
3. regression: the student minimises the mean squared error to x on the other 90 % with the
   generic one-optimizer step (AdamW, warm-up, cosine decay); the held-out MSE, relative to
   the variance of x, is recorded as the distillation error;
4. the new run folder holds the teacher's geometry, transforms and spec (the same model space
   and readout threshold), the student's config and checkpoint, ``distill_log.jsonl`` and a
   ``meta.json`` naming the teacher: ``generate``, ``export``, ``bench`` and ``evaluate`` use it
   like any trained run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastshower._version import __version__
from fastshower.errors import FastshowerError
from fastshower.io import ShowerFileError
from fastshower.models.base import ShowerModel
from fastshower.models.layer_fm import LayerFMConfig
from fastshower.models.onestep import OneStep
from fastshower.runs import (
    CHECKPOINT_FORMAT,
    Run,
    RunFolder,
    atomic_save,
    draw_training_conditions,
    load_run,
    write_config,
    write_json,
)

__all__ = ["DistillError", "distill", "teacher_conditions"]

class DistillError(FastshowerError, ValueError):
    """A teacher run that cannot be distilled, or bad distillation settings."""


def teacher_conditions(run: Run, n: int, rng: np.random.Generator) -> Tensor:
    """Model-space conditions (n, C) drawn with replacement from the teacher's training file.

    Raises:
        DistillError: the training file named in the run's meta.json is gone or unreadable.
    """
    _, transform, info = run
    try:
        e, conds = draw_training_conditions(info, n, rng, replace=True)
    except (ShowerFileError, OSError) as exc:
        path = info.training_file or ""
        raise DistillError(f"the teacher's training file {str(path)!r} is needed for the conditions to "
                           f"distil on and cannot be read ({exc})") from None
    with torch.no_grad():
        return transform.conditions(torch.from_numpy(e), {k: torch.from_numpy(v) for k, v in conds.items()}).float()


@torch.no_grad()
def teacher_pairs(model: ShowerModel, student: OneStep, c: Tensor, generator: torch.Generator,
                  ode_steps: int | None, chunk: int = 4096, progress: bool = False) -> Tensor:
    """Pair rows (n, W [+ L] + D): the student's regression target for each condition row (the teacher's
    model-space shower, W = V, or a staged teacher's stage-2 latents and then its stage-1 latents), then the
    noise (D) it came from (see :meth:`OneStep.split_pairs`)."""
    from tqdm.auto import tqdm

    opts: dict[str, Any] = {} if ode_steps is None else {"steps": int(ode_steps)}
    out = []
    for i in tqdm(range(0, c.shape[0], chunk), desc="teacher pairs", unit="chunk", disable=not progress):
        cc = c[i:i + chunk]
        z = model.draw_noise(cc.shape[0], generator)
        out.append(torch.cat([student.regression_target(model, z, cc, **opts), z], dim=1))
    return torch.cat(out)


#: models whose sampler is a deterministic, multi-pass noise-to-shower map worth compressing into one pass
TEACHERS = ("flow-matching", "flow", "layer-fm")


def _check_teacher(run: Run, ode_steps: int | None) -> None:
    _, _, info = run
    if info.model_name not in TEACHERS:
        raise DistillError(f"{info.run_dir}: distillation needs a flow-matching, flow or layer-fm teacher (a "
                           f"deterministic multi-pass noise-to-shower map); this run is {info.model_name!r}")
    if ode_steps is not None and info.model_name != "flow-matching":
        raise DistillError(f"ode_steps applies to a flow-matching teacher only; this run is {info.model_name!r}")
    if not info.finished:
        raise DistillError(f"{info.run_dir}: the teacher's training has not finished (status "
                           f"{info.meta.get('status')!r}); resume it first")


def distill(
    teacher: str | Path,
    out: str | Path,
    n_pairs: int = 100_000,
    steps: int = 4000,
    batch_size: int = 512,
    ode_steps: int | None = None,
    hparams: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Make a one-step run at ``out`` from the flow-matching, flow or layer-fm run ``teacher``; returns ``out``.

    Every layer-fm teacher distils (voxel or ring shares, with or without energy-dependent stage-2 scaling): the
    student's stage 1 is the teacher's own class without the shape ODE's nets, so it assembles the showers
    exactly as the teacher does. par04-ds2 layer-fm (ring shares, energy_knots 5), a small-budget student: see
    docs/model_quality.md.

    Args:
        teacher: finished flow-matching, flow or layer-fm run folder.
        out: new run folder (must not hold a run already).
        n_pairs: teacher (noise, shower) pairs to learn from (10 % held out).
        steps: student optimisation steps; batch_size: pairs per step.
        ode_steps: teacher ODE steps for the pairs (default: the teacher's own ``steps``).
        hparams: student hyper-parameters (see :class:`fastshower.models.onestep.OneStep`).
        seed: seeds the conditions, noise, initialisation and batches (same seed -> same student).
    """
    out = Path(out)
    if n_pairs < 100 or steps < 1 or batch_size < 1:
        raise DistillError(f"need n_pairs >= 100, steps >= 1 and batch_size >= 1 (got {n_pairs}, {steps}, "
                           f"{batch_size})")
    if RunFolder(out).holds_run():
        raise DistillError(f"{out}: already holds a run; choose a new folder")
    run = load_run(teacher)
    _check_teacher(run, ode_steps)
    model, _, info = run
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    c = teacher_conditions(run, n_pairs, rng)
    student = _make_student(run, teacher, ode_steps, hparams, seed)
    pairs = teacher_pairs(model, student, c, gen, ode_steps, progress=progress)
    t_pairs = time.perf_counter() - t0
    n_val = max(1, n_pairs // 10)
    x_tr, c_tr, x_val, c_val = pairs[n_val:], c[n_val:], pairs[:n_val], c[:n_val]
    teacher_steps = int(student.hparams["teacher_steps"])
    log = _fit_student(student, x_tr, c_tr, x_val, c_val, steps, batch_size, gen, progress)
    # the hit cuts are set on the held-out pairs: on the training pairs the heads are a little overconfident
    occupancy = student.calibrate_occupancy(x_val, c_val) if student.occupancy else {}
    _write_run(out, run, student, steps, {
        "teacher": str(Path(teacher).resolve()), "teacher_step": info.step, "n_pairs": n_pairs,
        "held_out": n_val, "ode_steps": teacher_steps, "steps": steps, "batch_size": batch_size, "seed": seed,
        "pairs_seconds": round(t_pairs, 2), "seconds": round(time.perf_counter() - t0, 2),
        "relative_val_mse": log[-1]["relative_val_mse"], **occupancy,
    }, log)
    return out


def _make_student(run: Run, teacher: str | Path, ode_steps: int | None, hparams: dict[str, Any] | None,
                  seed: int) -> OneStep:
    """The untrained student for ``run``; a flow teacher's stage 1 and scalers are copied into it (staged)."""
    model, _, info = run
    teacher_steps = int(ode_steps if ode_steps is not None else info.hparams.get("steps", 0))
    hp = {**(hparams or {}), "teacher": str(Path(teacher).resolve()), "teacher_steps": teacher_steps,
          "teacher_method": str(info.hparams.get("method", "")), "noise_dim": model.noise_dim()}
    if info.model_name == "flow":
        hp["stage1"] = dict(info.hparams)
    elif info.model_name == "layer-fm":  # staged as well, on the teacher's own stage-2 variables and scalers
        hp["stage1"] = LayerFMConfig.from_saved(info.hparams).to_dict()
        hp["stage1_model"] = "layer-fm"
    torch.manual_seed(seed)
    try:
        student = OneStep(info.spec, **hp)
    except ValueError as exc:
        raise DistillError(str(exc)) from None
    if student.stage1 is not None:
        own = student.stage1.state_dict()
        kept = {k: v for k, v in model.state_dict().items() if k in own}
        student.stage1.load_state_dict(kept)
    return student


def _held_out(student: OneStep, x: Tensor, c: Tensor) -> dict[str, float]:
    """Held-out MSE to the teacher divided by the teacher targets' variance (0 = exact, 1 = mean only), and
    (staged students with an occupancy head) the hit classification's cross-entropy; x: pair rows (N, W + D)."""
    w = student.target_width()
    with torch.no_grad():
        losses = student.loss(x, c)
    out = {"relative_val_mse": float(losses.get("mse_hit", losses["loss"])) / float(x[:, :w].var(dim=0).mean())}
    if "bce_hit" in losses:
        out["val_bce_hit"] = float(losses["bce_hit"])
    return out


def _fit_student(student: OneStep, x: Tensor, c: Tensor, x_val: Tensor, c_val: Tensor, steps: int,
                 batch_size: int, gen: torch.Generator, progress: bool) -> list[dict[str, float]]:
    from tqdm.auto import tqdm

    optimizers = student.configure_optimizers()
    schedulers = student.configure_schedulers(optimizers, steps)
    student.train()
    log: list[dict[str, float]] = []
    every = max(1, steps // 20)
    bar = tqdm(range(1, steps + 1), desc="one-step", disable=not progress)
    for step in bar:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        logs = student.training_step(x[idx], c[idx], optimizers, step)
        for s in schedulers:
            s.step()
        if not np.isfinite(logs["loss"]):
            raise DistillError(f"the student's loss became {logs['loss']} at step {step}; lower the lr")
        if step % every == 0 or step == steps:
            student.eval()
            held = _held_out(student, x_val, c_val)
            student.train()
            log.append({"step": step, "loss": logs["loss"], **held})
            bar.set_postfix(loss=f"{logs['loss']:.4f}", val=f"{held['relative_val_mse']:.4f}")
    student.eval()
    return log


def _write_run(out: Path, run: Run, student: ShowerModel, steps: int, distilled: dict[str, Any],
               log: list[dict[str, float]]) -> None:
    """The student's run folder: the teacher's model-space files, the student's config, checkpoint and log."""
    info = run.info
    folder, teacher = RunFolder(out), RunFolder(info.run_dir)
    folder.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    for name in RunFolder.SHARED:  # the student works in the teacher's model space
        shutil.copyfile(teacher.path / name, folder.path / name)
    atomic_save({"format": CHECKPOINT_FORMAT, "model_name": student.name, "step": steps,
                 "world_size": 1, "model": student.state_dict()}, folder.checkpoint)
    with folder.distill_log.open("w") as f:
        for line in log:
            f.write(json.dumps(line) + "\n")
    write_config(folder, student.name, student.hparams, info.options)
    # the teacher's data provenance carries over (generation checks conditions and energies against it)
    meta = {**info.meta, "status": "finished", "step": steps, "fastshower_version": __version__,
            "torch_version": torch.__version__, "distilled": distilled}
    write_json(folder.meta, meta)
