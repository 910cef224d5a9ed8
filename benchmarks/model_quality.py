"""Model-quality table: every generative model trained on Geant4 showers under a wall-clock budget (CPU).

Protocol (DESIGN.md section 7, issue "Generative models"):

- belle2-ecl-5x5, e-: train on Geant4 showers at 0.5, 1.0, 1.5, 2.5 GeV (equal shares);
  score at 2.0 GeV, an energy never seen in training (interpolation), against a held-out
  Geant4 file, and at the training energies against a second held-out Geant4 file.
- calogan-3layer, e+: train on Geant4 showers uniform in 1-100 GeV; score on a held-out
  Geant4 file with the same spectrum.
- each model trains for ``--minutes`` on one CPU thread: a short probe run times the first
  steps, the step count is set so that the schedule (warm-up, cosine decay) ends within the
  budget, and a hard stop at 1.15 x the budget guards against slow-downs. The budget is
  counted in CPU time of the training process (``--clock cpu``, the default: minutes of one
  dedicated core, reproducible on a shared machine) or in wall time (``--clock wall``).
- generation: as many showers as the test reference, at its energies (positions uniform
  over the centre crystal face for Belle II, as in the Geant4 files); ms per shower timed.
- scores: :func:`fastshower.validate.evaluate` (low- and high-level classifier AUC, FPD,
  KPD, separation power per observable); the floor is the same evaluation of a second,
  independent Geant4 file of the same size against the test reference (Geant4 vs Geant4 on
  the same statistics).

Files are reused when present (complete Geant4 files, finished runs, generated files), so a
killed benchmark restarts where it stopped. Run ``nice``d, one thread::

    nice .venv/bin/python benchmarks/model_quality.py --detector belle2 --minutes 6 \
        --workdir /tmp/mq/belle --out benchmarks/results/model_quality_belle2-ecl-5x5.json
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastshower import __version__  # noqa: E402
from fastshower.config import TrainConfig  # noqa: E402
from fastshower.energy import parse_energy  # noqa: E402
from fastshower.generation import generate  # noqa: E402
from fastshower.io import ShowerFile, ShowerFileError  # noqa: E402
from fastshower.montecarlo.run import simulate  # noqa: E402
from fastshower.refinement import RefineConfig, fit_refiner  # noqa: E402
from fastshower.runs import load_run  # noqa: E402
from fastshower.training import train  # noqa: E402
from fastshower.validate.evaluate import evaluate  # noqa: E402

ALL_MODELS = ("flow-matching", "vae", "wgan-gp", "calogan", "flow", "layer-fm", "3dgan")
#: ``--distill``: teacher -> table key of its one-step student (``fastshower distill``)
DISTILLED = {"flow-matching": "one-step", "flow": "one-step-flow", "layer-fm": "one-step-layer-fm"}
#: named training configurations (``--variants``): table key -> (model, :func:`fastshower.training.train` config).
#: "wgan-gp-kit" is the KIT Belle II ECL design (issue 20 item 1) as it runs here: the generator writes fractions of
#: E_inc as energy x shape, and the critic sees each crystal as log and linear fraction beside the standardised
#: total energy, largest crystal, E1/E9 and E9/E25; energy and position constrainers; Adam 1e-4, betas (0.5, 0.9),
#: 5 critic steps per generator step (the defaults). MLP critic and constrainers: at an equal 5 CPU-minute budget
#: the talk's convolutions ("-conv", 2.4x the cost per step) scored worse (docs/model_quality.md). The others change
#: one thing each: the loss (item 3), a constrainer left out (the ablation), the critic's inputs. The run that meets
#: the targets (at their edge) is "wgan-gp-kit-no-energy-constrainer" at 25 CPU-minutes (a second run of it at 40,
#: ``--key-prefix 40min/``, did not). It leaves the energy constrainer out: with fractions of E_inc that constrainer
#: reads E_inc from the shape alone and its regression to the mean biases the energy response.
_KIT: dict[str, Any] = {"hparams": {"output": "fraction", "net": "mlp"}, "train": {"transform": ["per_incident"]}}


def _kit(**hparams: Any) -> tuple[str, dict[str, Any]]:
    return "wgan-gp", {"hparams": {**_KIT["hparams"], **hparams}, "train": dict(_KIT["train"])}


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "wgan-gp-kit": _kit(),
    "wgan-gp-kit-conv": _kit(net="conv"),
    "wgan-gp-kit-bce": _kit(loss="bce", n_critic=1),
    "wgan-gp-kit-no-energy-constrainer": _kit(energy_constrainer=False),
    "wgan-gp-kit-no-position-constrainer": _kit(position_constrainer=False),
    "wgan-gp-kit-no-constrainers": _kit(energy_constrainer=False, position_constrainer=False),
    "wgan-gp-kit-log-cells": _kit(linear_cells=False),
    "wgan-gp-kit-conv-log-cells": _kit(net="conv", linear_cells=False),
    "wgan-gp-kit-no-features": _kit(critic_features=False),
}
METRICS = ["separation_power", "classifier_low", "classifier_high", "classifier_challenge", "fpd", "kpd", "response"]

#: detector presets: geometry, particle, Geant4 files {name: (energy spec, n, seed)}, test sets
DETECTORS: dict[str, dict[str, Any]] = {
    "belle2": {
        "geometry": "belle2-ecl-5x5",
        "particle": "e-",
        "train": ("0.5,1,1.5,2.5", 20_000, 101),
        "files": {
            "test_2.0": ("2.0", 5_000, 102),
            "floor_2.0": ("2.0", 5_000, 103),
            "test_train": ("0.5,1,1.5,2.5", 4_000, 104),
            "floor_train": ("0.5,1,1.5,2.5", 4_000, 105),
        },
        # test set -> (reference file, floor file, energy spec to generate at)
        "tests": {
            "interpolation_2.0GeV": ("test_2.0", "floor_2.0", "2.0"),
            "training_energies": ("test_train", "floor_train", "0.5,1,1.5,2.5"),
        },
        "headline": "interpolation_2.0GeV",
        "target_auc": 0.70,
    },
    "calogan": {
        "geometry": "calogan-3layer",
        "particle": "e+",
        "train": ("1:100", 600, 201),
        "files": {
            "test": ("1:100", 250, 202),
            "floor": ("1:100", 250, 203),
        },
        "tests": {"uniform_1-100GeV": ("test", "floor", "1:100")},
        "headline": "uniform_1-100GeV",
        "target_auc": 0.80,
    },
    # issue 20 item 2: CaloGAN's second particle, one model per particle as the paper (e+: the preset above)
    "calogan-gamma": {
        "geometry": "calogan-3layer",
        "particle": "gamma",
        "train": ("1:100", 600, 211),
        "files": {
            "test": ("1:100", 250, 212),
            "floor": ("1:100", 250, 213),
        },
        "tests": {"uniform_1-100GeV": ("test", "floor", "1:100")},
        "headline": "uniform_1-100GeV",
        "target_auc": 0.80,
    },
    # CaloChallenge dataset-2 geometry (Geant4 Par04 binning, CaloChallenge energy scale), 1-100 GeV where the
    # challenge goes to 1 TeV
    "par04-ds2": {
        "geometry": "par04-ds2",
        "particle": "e-",
        "train": ("1:100:log", 10_000, 301),
        "files": {"test": ("1:100:log", 2_500, 302), "floor": ("1:100:log", 2_500, 303)},
        "tests": {"log-uniform_1-100GeV": ("test", "floor", "1:100:log")},
        "headline": "log-uniform_1-100GeV",
        "target_auc": 0.70,
    },
    "par04-ds3": {
        "geometry": "par04-ds3",
        "particle": "e-",
        "train": ("1:100:log", 1_000, 311),
        "files": {"test": ("1:100:log", 300, 312), "floor": ("1:100:log", 300, 313)},
        "tests": {"log-uniform_1-100GeV": ("test", "floor", "1:100:log")},
        "headline": "log-uniform_1-100GeV",
        "target_auc": 0.80,
    },
    "ild-siw-30": {
        "geometry": "ild-siw-30",
        "particle": "gamma",
        "train": ("10:100", 1_000, 321),
        "files": {"test": ("10:100", 300, 322), "floor": ("10:100", 300, 323)},
        "tests": {"uniform_10-100GeV": ("test", "floor", "10:100")},
        "headline": "uniform_10-100GeV",
        "target_auc": 0.80,
    },
    # the 3DGAN papers' CLIC-like Si-W calorimeter (issue 18): 25 layers of 51x51 cells; e- 10-100 GeV (the
    # papers: 2-500 GeV); Geant4 costs ~0.5-1.3 CPU-s per shower here, hence the small files
    "siw-51x51x25": {
        "geometry": "siw-51x51x25",
        "particle": "e-",
        "train": ("10:100", 2_000, 331),
        "files": {"test": ("10:100", 500, 332), "floor": ("10:100", 500, 333)},
        "tests": {"uniform_10-100GeV": ("test", "floor", "10:100")},
        "headline": "uniform_10-100GeV",
        "target_auc": 0.75,
        # the papers' checks besides the standard scores (E_sum/E_p vs E_p is "response")
        "extra_metrics": ["projections", "ssim", "support_size", "multi_peak"],
    },
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastshower": __version__,
        "platform": platform.platform(),
    }


# --- Geant4 references -----------------------------------------------------------------------------


def complete(path: Path, n: int) -> bool:
    try:
        with ShowerFile(path) as f:
            return f.n >= n
    except (ShowerFileError, OSError):
        return False


def ensure_reference(path: Path, geometry: str, particle: str, energy: str, n: int, seed: int,
                     chunk_size: int) -> dict[str, Any]:
    """Simulate ``path`` with Geant4 unless a complete file is there; returns its description."""
    # the real file: a workdir of symlinks to existing Geant4 files records where the files are
    info: dict[str, Any] = {"path": str(path.resolve()), "energy": energy, "n": n, "seed": seed,
                            "chunk_size": chunk_size}
    if not complete(path, n):
        log(f"Geant4: {n} x {particle} {energy} GeV in {geometry} -> {path}")
        res = simulate(geometry, particle, energy, n, path, seed=seed, jobs=1, chunk_size=chunk_size,
                       resume=path.exists(), progress=False)
        info["seconds"] = round(res.seconds, 1)
        info["ms_per_shower"] = round(1e3 * res.seconds_per_shower, 2)
    with ShowerFile(path) as f:  # the file's own seed and chunking (a file made elsewhere may differ)
        info["seed"] = int(f.attrs.get("seed", seed))
        info["chunk_size"] = int(f.attrs.get("chunk_size", chunk_size))
        info["generator"] = str(f.attrs.get("generator", ""))
        info["physics"] = str(f.attrs.get("physics", ""))
        info["n"] = f.n
    return info


# --- training under a wall-clock budget ---------------------------------------------------------------


class _Stop(KeyboardInterrupt):
    """Raised from the training callback to stop a run (train() checkpoints the step in hand)."""


#: the probe's end-of-training calibration reads at most this many showers; its cost per shower, times the run's
#: calibration_showers, is held back from the training budget (layer-fm maps "all" on par04-ds2: ~62 ms per shower,
#: 5.4 CPU-min on 5250 showers, which a probe calibrating in full paid twice out of the budget)
_PROBE_CALIBRATION = 250

#: how often timed_train re-plans its step count from its own measured cost
_REPLANS = 4


def timed_train(data: Path, model: str, out: Path, seconds: float, batch_size: int | None, seed: int,
                probe_steps: int, clock_name: str = "cpu", deadline: float | None = None,
                config: dict[str, Any] | None = None, device: str = "cpu",
                refine: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``model`` for about ``seconds`` on ``clock_name`` ("cpu": process time, or "wall").

    A probe run fixes the planned steps; the run then trains a fifth of them, measures its own cost per step and
    resumes to the total that the remaining budget buys (the cosine schedule takes the new horizon), since a
    probe on a shared machine mismeasures (a 30-step probe beside three other jobs: 0.80 CPU-s per step against
    0.51 afterwards, a third of the budget unused); it re-plans so up to ``_REPLANS`` times, each a fifth of the
    way on from its cost per step over the last stretch, since the load changes during an hour (one re-plan
    under contention left a par04-ds2 run at 54 of its 60 CPU-minutes when the other core came free). The
    budget holds the end-of-training calibration of a model that has one: the probe times it on a few showers
    (:func:`_probe`) and its cost for the run's ``calibration_showers`` is kept back from the steps.
    ``deadline`` (epoch seconds): stop at that wall time whatever the budget (a shared machine
    whose load leaves too little CPU); the run then keeps its last weights and says so.
    ``config``: :func:`fastshower.training.train`'s config (``hparams``, ``train``), None: the defaults.
    ``device``: where to train ("cuda" on a lent GPU, timed with ``clock_name="wall"``).
    ``refine``: :class:`fastshower.refinement.RefineConfig` fields: after training, fit the run's refiner, within
    the budget as the calibration is (the probe fits one on ``_PROBE_CALIBRATION`` showers to time it).
    """
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    c_start, t_start = clock(), time.perf_counter()
    s_per_step, setup_s, cal_per_shower, refine_per_shower = _probe(data, model, out, batch_size, seed, probe_steps,
                                                                    clock, config, device, refine)
    probe_s = clock() - c_start
    # the end-of-training calibration's cost, and the refiner's
    reserves = cal_per_shower * _calibration_showers(data, config), refine_per_shower * _refine_showers(refine)
    reserve = sum(reserves)
    budget = max(seconds - probe_s - setup_s - reserve, 10 * s_per_step)
    steps = max(50, int(0.95 * budget / s_per_step))
    log(f"{model}: probe {probe_steps} steps in {probe_s:.1f} s ({1e3 * s_per_step:.1f} ms/step), calibration "
        f"and refiner reserve {reserve:.0f} s -> {steps} steps")
    c0, t0 = clock(), time.perf_counter()
    state: dict[str, Any] = {"step": 0, "logs": {}, "stamps": {}, "until": max(50, steps // 5)}
    hard = c0 + 1.15 * budget + setup_s

    def cb(step: int, logs: dict[str, float]) -> None:
        state["step"], state["logs"] = step, logs
        state["stamps"][step] = clock()
        for why, over in (("budget", clock() > hard), ("deadline", deadline is not None and time.time() > deadline),
                          ("replan", step == state["until"])):
            if over:
                state["why"] = why
                raise _Stop

    def leg(total: int, resume: bool) -> None:
        state.pop("why", None)
        try:
            train(data, model, out, steps=total, batch_size=batch_size, seed=seed, progress=False, resume=resume,
                  checkpoint_every=max(500, total // 4), log_every=50, callback=cb, config=config, device=device)
        except _Stop:
            pass

    leg(steps, resume=False)
    start = k0 = min(10, state["step"] // 4)  # the first leg's cost is measured past the run's start
    for left in range(_REPLANS - 1, -1, -1):
        if state.get("why") != "replan":
            break
        k1 = state["step"]
        k0 = k0 if k1 - k0 >= 10 else start
        measured = (state["stamps"][k1] - state["stamps"][k0]) / (k1 - k0)  # the last leg's cost per step
        k0 = k1
        replanned = k1 + max(0, int(0.97 * (c0 + budget - clock()) / measured))
        log(f"{model}: {k1} steps at {1e3 * measured:.1f} ms/step -> {replanned} steps in all (planned {steps})")
        steps = replanned
        # the next re-plan a fifth of the way on, unless this was the last or too few steps remain
        state["until"] = k1 + (replanned - k1) // (left + 1) if left and replanned - k1 >= 250 else -1
        leg(steps, resume=True)
    stopped = state.get("why")
    if stopped:
        log(f"{model}: stopped ({stopped}) at step {state['step']} of {steps}")
    train_c = clock() - c0
    refined = _timed_refiner(out, data, refine, clock) if refine else {}
    return {
        **refined,
        "clock": clock_name,
        "budget_minutes_total": round(seconds / 60, 2),
        "used_minutes_total": round((clock() - c_start) / 60, 2),
        "planned_steps": steps,
        "steps": int(state["step"]),
        "stopped_early": stopped,  # None: ran its planned steps; "budget" or "deadline"
        "probe_steps": probe_steps,
        "probe_seconds": round(probe_s, 1),
        "calibration_reserve_seconds": round(reserves[0], 1),
        "refine_reserve_seconds": round(reserves[1], 1),
        "train_seconds_wall": round(time.perf_counter() - t0, 1),
        "train_seconds_clock": round(train_c, 1),
        "wall_minutes_total": round((time.perf_counter() - t_start) / 60, 2),
        "ms_per_step": round(1e3 * train_c / max(state["step"], 1), 1),
        "device": device if device == "cpu" else f"{device} ({torch.cuda.get_device_name()})",
        "last_logs": {k: round(float(v), 5) for k, v in state["logs"].items()},
        # the training process's peak (the end-of-training calibration included), as the run's meta.json has it
        "peak_rss_mb": json.loads((out / "meta.json").read_text()).get("peak_rss_mb"),
    }


def _probe(data: Path, model: str, out: Path, batch_size: int | None, seed: int, probe_steps: int,
           clock: Any, config: dict[str, Any] | None, device: str, refine: dict[str, Any] | None = None
           ) -> tuple[float, float, float, float]:
    """(seconds per step, set-up seconds, calibration and refiner seconds per shower) of a ``probe_steps`` run
    beside ``out`` (deleted afterwards). The probe's end-of-training calibration (models that fit maps after
    training) runs on at most ``_PROBE_CALIBRATION`` showers and is timed apart, so that the budget can hold the
    real one; with ``refine``, a refiner fitted on as many showers is timed too."""
    probe_dir = out.parent / (out.name + "-probe")
    shutil.rmtree(probe_dir, ignore_errors=True)
    cfg = dict(config or {})
    n_cal = min(_asked_calibration(config), _PROBE_CALIBRATION)
    cfg["train"] = {**cfg.get("train", {}), "calibration_showers": n_cal}
    stamps: dict[int, float] = {}
    c_start = clock()
    train(data, model, probe_dir, steps=probe_steps, batch_size=batch_size, seed=seed, progress=False,
          checkpoint_every=10**9, log_every=10**9, callback=lambda step, logs: stamps.__setitem__(step, clock()),
          config=cfg, device=device)
    # the calibration and its checkpoint, for a model that fitted one (meta.json says so); else nothing to hold back
    calibrated = "calibration" in json.loads((probe_dir / "meta.json").read_text())
    calibration_s = clock() - stamps[probe_steps] if calibrated else 0.0
    refine_s = 0.0
    if refine:
        refine_s = clock()
        fit_refiner(probe_dir, data, RefineConfig(**{**refine, "showers": _PROBE_CALIBRATION}), progress=False)
        refine_s = clock() - refine_s
    shutil.rmtree(probe_dir, ignore_errors=True)
    first = min(5, probe_steps // 4)
    s_per_step = (stamps[probe_steps] - stamps[first]) / (probe_steps - first)
    setup_s = stamps[probe_steps] - c_start - s_per_step * probe_steps  # transform fit, model build (paid again)
    return s_per_step, setup_s, calibration_s / n_cal, refine_s / _PROBE_CALIBRATION


def _refine_showers(refine: dict[str, Any] | None) -> int:
    """How many showers a run's refiner is fitted on (0 without one)."""
    return int(refine.get("showers", RefineConfig.showers)) if refine else 0


def _timed_refiner(run_dir: Path, data: Path, refine: dict[str, Any], clock: Any) -> dict[str, Any]:
    """Fit the run's refiner on ``data`` and say what it cost on ``clock``."""
    c0 = clock()
    summary = fit_refiner(run_dir, data, RefineConfig(**refine), progress=False)
    log(f"refiner: held-out AUC {summary['validation_auc']:.3f}, acceptance {summary['acceptance']:.2f}, "
        f"{clock() - c0:.0f} s")
    return {"refine": summary, "refine_seconds_clock": round(clock() - c0, 1)}


def _calibration_showers(data: Path, config: dict[str, Any] | None) -> int:
    """How many showers the run's end-of-training calibration reads: the config's ``calibration_showers``, at
    most the training file (one pass, as :func:`fastshower.training.train` caps it)."""
    with ShowerFile(data) as f:
        return min(_asked_calibration(config), f.n)


def _asked_calibration(config: dict[str, Any] | None) -> int:
    """The config's ``[train] calibration_showers``, or TrainConfig's default."""
    return int((config or {}).get("train", {}).get("calibration_showers", TrainConfig.calibration_showers))


def distilled_student(work: Path, args: argparse.Namespace, teacher_name: str, key: str,
                      teacher_info: dict[str, Any]) -> dict[str, Any]:
    """Distil the ``teacher_name`` run into a one-step student (once); its training-info entry.

    The student's CPU minutes are the teacher's plus the distillation's (pairs and regression).
    """
    from fastshower.distillation import distill

    teacher = work / "runs" / f"{teacher_name}-{args.minutes:g}min"
    run_dir = work / "runs" / f"{key}-{args.minutes:g}min"
    info_path = work / "runs" / f"{key}-{args.minutes:g}min.train.json"
    if info_path.exists() and not args.retrain:
        return dict(json.loads(info_path.read_text()))
    shutil.rmtree(run_dir, ignore_errors=True)
    log(f"{key}: distilling {teacher} ({args.distill_pairs} pairs, {args.distill_steps} steps)")
    c0 = time.process_time()
    distill(teacher, run_dir, n_pairs=args.distill_pairs, steps=args.distill_steps, seed=args.seed, progress=False,
            hparams=args.distill_hparams)
    minutes = (time.process_time() - c0) / 60
    meta = json.loads((run_dir / "meta.json").read_text())["distilled"]
    cfg = json.loads((run_dir / "config.json").read_text())
    info = {
        "clock": "cpu", "teacher": teacher_name, "distill_minutes": round(minutes, 2),
        "used_minutes_total": round(float(teacher_info["used_minutes_total"]) + minutes, 2),
        "steps": args.distill_steps, "stopped_early": None, "distilled": meta, "hparams": cfg["hparams"],
        "batch_size": meta["batch_size"],
        "n_parameters": int(sum(p.numel() for p in load_run(run_dir)[0].parameters())),
    }
    info_path.write_text(json.dumps(info, indent=1, default=str))
    log(f"{key}: distilled in {minutes:.1f} CPU min, held-out relative MSE {meta['relative_val_mse']:.4f}")
    return info


# --- scores -------------------------------------------------------------------------------------------


def summarise(m: dict[str, Any], geometry_layers: int) -> dict[str, Any]:
    """The table's numbers from an evaluate() result."""
    sp = m.get("separation_power", {})
    clf = m.get("classifier", {})
    out: dict[str, Any] = {
        "auc_low": clf.get("low", {}).get("auc"),
        "auc_high": clf.get("high", {}).get("auc"),
        # the CaloChallenge's own high-level set (layer energies, centres, widths); absent for one-layer detectors
        "auc_high_calochallenge": clf.get("challenge", {}).get("auc"),
        "fpd_x1e3": m.get("fpd", {}).get("value"),
        "fpd_error_x1e3": m.get("fpd", {}).get("error"),
        "kpd_x1e3": m.get("kpd", {}).get("value"),
        "kpd_error_x1e3": m.get("kpd", {}).get("error"),
        "sep_E_tot/E_inc": sp.get("E_tot/E_inc"),
    }
    if geometry_layers > 1:
        for i in range(geometry_layers):
            out[f"sep_E_layer_{i}"] = sp.get(f"E_layer_{i}")
    else:
        out["sep_E_tot"] = sp.get("E_tot")  # one layer: the layer energy is E_tot
        # Belle II (issue 20 item 1): the largest crystal, the crystal-array ratios and the single-crystal spectrum
        for k in ("max_cell", "E1/E9", "E9/E25", "voxel_energy"):
            if k in sp:
                out[f"sep_{k}"] = sp[k]
    if sp:
        worst = max(sp, key=lambda k: sp[k] if sp[k] is not None else -1)
        out["sep_mean"] = float(np.mean([v for v in sp.values() if v is not None]))
        out["sep_max"], out["sep_max_observable"] = sp[worst], worst
    out["separation_power"] = sp
    out.update(papers_checks(m))
    out["per_energy"] = m.get("per_energy")
    if "response" in m:
        out["response"] = m["response"]
    return out


def papers_checks(m: dict[str, Any]) -> dict[str, Any]:
    """The 3DGAN papers' checks of an evaluate() result, where computed: profile and moment separation
    powers (module projections), SSIM diversity (mean over energy bins), support size and multi-peak fraction."""
    out: dict[str, Any] = {}
    pr = m.get("projections")
    if pr:
        for ax, p in pr["profiles"].items():
            out[f"sep_profile_{ax}"], out[f"max_rel_dev_profile_{ax}"] = p["separation_power"], p["max_rel_dev"]
        for k, v in pr["moments"].items():
            out[f"sep_{k}"] = v["separation_power"]
        out["sep_profile_max"], out["sep_moment_max"] = pr["max_profile_separation"], pr["max_moment_separation"]
    if m.get("ssim"):
        for side in ("reference", "candidate", "cross"):
            vals = [r[side] for r in m["ssim"] if r.get(side) is not None]
            out[f"ssim_{side}"] = float(np.mean(vals)) if vals else None
    sup = m.get("support_size", {})
    if "reference" in sup:
        out["support_reference"], out["support_candidate"] = sup["reference"]["support"], sup["candidate"]["support"]
    if m.get("multi_peak"):
        out["multi_peak_reference"] = m["multi_peak"]["reference"]
        out["multi_peak_candidate"] = m["multi_peak"]["candidate"]
    return out


def score(reference: Path, candidate: Path, out: Path, layers: int, seed: int,
          extra_metrics: list[str] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    m = evaluate(reference, candidate, out, metrics=METRICS + list(extra_metrics or []), seed=seed, progress=False,
                 report=False)
    res = summarise(m, layers)
    res["eval_seconds"] = round(time.perf_counter() - t0, 1)
    res["n_reference"], res["n_candidate"] = m["n_reference"], m["n_candidate"]
    return res


def generate_for(run_dir: Path, reference: Path, energy: str | None, out: Path, seed: int,
                 refine: bool = False) -> dict[str, Any]:
    """Generate as many showers as ``reference`` at ``energy`` (None: the reference's own energies), with
    ``refine`` on the run's refiner."""
    with ShowerFile(reference) as f:
        n = f.n
        e_ref = f.energies()
    out.unlink(missing_ok=True)
    loaded = load_run(run_dir)
    if energy is None:  # the reference's own range
        energy = f"{float(e_ref.min()) / 1e3}:{float(e_ref.max()) / 1e3}"
    lo, hi = loaded[2].energy_range_mev
    spec = parse_energy(energy)
    # a continuous spectrum (calogan-3layer, 1-100 GeV) reaches a little beyond the training file's
    # extreme energies (e.g. 1.26-99.5 GeV for 400 showers): generate there too, and say so
    extrapolate = spec.low < lo * (1 - 1e-9) or spec.high > hi * (1 + 1e-9)
    t0 = time.perf_counter()
    generate(loaded, n, energy, out=out, seed=seed, progress=False, batch_size=5000, extrapolate=extrapolate,
             refine=refine)
    s = time.perf_counter() - t0
    info = {"n": n, "energy": energy, "seconds": round(s, 2), "ms_per_shower": round(1e3 * s / n, 3),
            "step": loaded[2].step}
    if refine:
        with ShowerFile(out) as f:
            info["refine_draws_per_shower"] = round(int(f.attrs["refine_draws"]) / n, 3)
    if extrapolate:
        info["extrapolated_beyond_training_range_gev"] = [lo / 1e3, hi / 1e3]
    return info


# --- readout-threshold study ------------------------------------------------------------------------------


def apply_threshold(src: Path, dst: Path, threshold_mev: float) -> Path:
    """Copy a generated file with voxels below ``threshold_mev`` set to 0.

    This is exactly what ``generate(..., threshold_mev=...)`` does as the last step of
    post-processing, so the result equals a generation with that readout threshold and the same seed.
    """
    from fastshower.io import ShowerBatch, ShowerWriter

    dst.unlink(missing_ok=True)
    with ShowerFile(src) as f:
        b = f.read(0, f.n)
        widths = {k: v.shape[1] for k, v in b.conditions.items()}
        showers = np.where(b.showers < threshold_mev, 0.0, b.showers).astype(np.float32)
        name = f"{f.attrs.get('generator', '')} + threshold {threshold_mev} MeV"
        with ShowerWriter(dst, f.geometry, f.particle, name, f.n, widths, {"threshold_mev": threshold_mev}) as w:
            w.append(ShowerBatch(b.energies, showers, b.conditions))
    return dst


# --- the docs' table --------------------------------------------------------------------------------------


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"


def markdown_tables(result: dict[str, Any]) -> str:
    """One markdown table per test set: the floor row first, then the models."""
    lines: list[str] = []
    tests = result["protocol"]["tests"]
    for test in tests:
        fl = result["floor"].get(test, {})
        sep_keys = [k for k in fl if k.startswith("sep_") and k not in ("sep_mean", "sep_max", "sep_max_observable")]
        head = ["model", "CPU min", "steps", "AUC low", "AUC high", "FPD x1e3", "KPD x1e3",
                *[f"S({k[4:]})" for k in sep_keys], "S mean", "S max (observable)", "gen ms/shower"]
        lines += [f"**{test}** (reference: {fl.get('n_reference', '?')} Geant4 showers)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def row(name: str, minutes: str, steps: str, h: dict[str, Any], ms: str,
                sep_keys: list[str] = sep_keys) -> str:
            cells = [name, minutes, steps, _f(h.get("auc_low")), _f(h.get("auc_high")),
                     f"{_f(h.get('fpd_x1e3'), 2)} ± {_f(h.get('fpd_error_x1e3'), 2)}",
                     f"{_f(h.get('kpd_x1e3'), 2)} ± {_f(h.get('kpd_error_x1e3'), 2)}",
                     *[_f(h.get(k)) for k in sep_keys], _f(h.get("sep_mean")),
                     f"{_f(h.get('sep_max'))} ({h.get('sep_max_observable', '-')})", ms]
            return "| " + " | ".join(cells) + " |"

        lines.append(row("Geant4 vs Geant4 (floor)", "-", "-", fl, "-"))
        for model, m in result["models"].items():
            if "error" in m:
                lines.append(f"| {model} | failed: {m['error']} |")
                continue
            h = m["tests"].get(test, {})
            steps = f"{m['steps']}" + (f" ({m['stopped_early']})" if m.get("stopped_early") else "")
            lines.append(row(model, _f(m.get("used_minutes_total"), 1), steps, h,
                             _f(h.get("generation", {}).get("ms_per_shower"), 2)))
        lines.append("")
    return "\n".join(lines)


# --- driver ---------------------------------------------------------------------------------------------


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with the models and floors of ``old`` (the --out already there) it does not score again.

    A row of ``new`` replaces the row of the same table key; every other row of ``old`` stays. Results of
    another detector are not merged.
    """
    if old.get("detector") != new.get("detector"):
        return new
    return {**new, "models": {**old.get("models", {}), **new.get("models", {})},
            "floor": {**old.get("floor", {}), **new.get("floor", {})}}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", choices=sorted(DETECTORS), required=True)
    ap.add_argument("--models", nargs="+", default=None, choices=ALL_MODELS,
                    help="models with their default settings (default: all, unless --variants or --variant-json)")
    ap.add_argument("--variants", nargs="+", default=[], choices=sorted(VARIANTS),
                    help="named configurations (VARIANTS), trained and scored as their own table rows")
    ap.add_argument("--variant-json", type=json.loads, default={},
                    help='ad hoc rows: \'{"LABEL": {"model": "wgan-gp", "hparams": {...}, "train": {...}}}\'')
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget per model, minutes")
    ap.add_argument("--key-prefix", default="",
                    help="prepended to the models' table keys in --out, e.g. '45min/': a second budget of a row "
                         "--out already holds (the runs in --workdir are named by model and minutes anyway)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="budget clock: CPU time of the (1-thread) training process, or wall time")
    ap.add_argument("--n-train", type=int, default=None, help="Geant4 training showers (default: the preset's)")
    ap.add_argument("--n-test", type=int, default=None, help="showers per test / floor file (default: preset)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: train()'s (256)")
    ap.add_argument("--probe-steps", type=int, default=30)
    ap.add_argument("--device", default="cpu", help="where to train: cpu, or cuda on a lent GPU (use --clock wall)")
    ap.add_argument("--train-only", action="store_true",
                    help="stop after training (a GPU run: generate and score on this machine afterwards)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True, help="results JSON (rewritten after every model)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="epoch seconds: stop training at this wall time whatever the budget (shared machines)")
    ap.add_argument("--retrain", action="store_true", help="train again even when a finished run exists")
    ap.add_argument("--distill", action="store_true",
                    help="also distil the flow-matching and flow runs into one-step students (fastshower distill) "
                         "and score them")
    ap.add_argument("--distill-pairs", type=int, default=100_000)
    ap.add_argument("--distill-steps", type=int, default=4000)
    ap.add_argument("--distill-hparams", type=json.loads, default=None,
                    help='student hyper-parameters as JSON, e.g. \'{"hidden": 32, "depth": 1}\'')
    ap.add_argument("--distill-suffix", default="", help="appended to the students' table keys (one-step<suffix>)")
    ap.add_argument("--skip-scored", action="store_true",
                    help="do not generate and score again the models --out already holds scores for")
    ap.add_argument("--wait-references", action="store_true",
                    help="a Geant4 file that exists but is incomplete is being written by another process: "
                         "wait for it instead of simulating")
    ap.add_argument("--print-table", action="store_true", help="only print the markdown tables of --out")
    ap.add_argument("--rescore-threshold-mev", type=float, default=None,
                    help="diagnostic: re-score the generated files of --models (already in --workdir) with voxels "
                         "below this readout threshold set to 0; stored under 'threshold_study' in --out")
    args = ap.parse_args()
    if args.models is None:
        args.models = [] if (args.variants or args.variant_json) else list(ALL_MODELS)
    #: table key -> (model, train() config or None)
    rows: dict[str, tuple[str, dict[str, Any] | None]] = {m: (m, None) for m in args.models}
    rows.update({v: VARIANTS[v] for v in args.variants})
    refines: dict[str, dict[str, Any]] = {}  # table key -> RefineConfig fields: fit a refiner, generate with it
    for label, spec in args.variant_json.items():
        spec = dict(spec)
        if "refine" in spec:
            refines[label] = dict(spec.pop("refine"))
        rows[label] = (spec.pop("model"), spec)
    if args.print_table:
        print(markdown_tables(json.loads(Path(args.out).read_text())))
        return
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    d = DETECTORS[args.detector]
    work = Path(args.workdir)
    if args.rescore_threshold_mev is not None:
        rescore_threshold(args, d, work, Path(args.out))
        return
    work.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.out)
    t_all = time.perf_counter()

    # 1. Geant4 training file
    chunk = 100 if args.detector == "belle2" else 50
    e_train, n_train, s_train = d["train"]
    n_train = args.n_train or n_train

    def reference(name: str, spec: str, n: int, seed: int) -> dict[str, Any]:
        path = work / f"{name}.h5"
        if args.wait_references and path.exists():  # another process is writing it: wait for it
            while not complete(path, n):
                time.sleep(15)
        return ensure_reference(path, d["geometry"], d["particle"], spec, n, seed, chunk)

    refs = {"train": reference("train", e_train, n_train, s_train)}
    with ShowerFile(work / "train.h5") as f:
        layers = f.geometry.n_layers

    result: dict[str, Any] = {
        "detector": d["geometry"],
        "particle": d["particle"],
        "protocol": {
            "train_energies_gev": e_train,
            "tests": {k: {"reference": v[0], "floor": v[1], "energy_gev": v[2]} for k, v in d["tests"].items()},
            "headline_test": d["headline"],
            "target_low_auc": d["target_auc"],
            "minutes_per_model": args.minutes,
            "budget_clock": args.clock,
            "metrics": METRICS,
            "fpd_kpd_units": "x 1e3 (JetNet definitions; features normalised by the reference's max |x|)",
            "floor": "a second independent Geant4 file of the same size scored against the test reference",
        },
        "references": refs,
        "machine": machine_info(),
        "floor": {},
        "models": {},
    }

    def write() -> None:
        """Rewrite the JSON, keeping models another invocation (a parallel stream) has written meanwhile."""
        import fcntl

        result["machine"]["load_average_1_5_15_end"] = list(os.getloadavg())
        out_json.parent.mkdir(parents=True, exist_ok=True)
        with open(work / "results.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if out_json.exists():
                try:
                    merged = merge_results(json.loads(out_json.read_text()), result)
                    result["models"], result["floor"] = merged["models"], merged["floor"]
                except json.JSONDecodeError:
                    pass
            tmp = out_json.with_name(out_json.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
            os.replace(tmp, out_json)

    # 2. training, one model after the other
    tinfos: dict[str, dict[str, Any]] = {}
    for model, (family, config) in rows.items():
        tag = f"{model}-{args.minutes:g}min"
        run_dir = work / "runs" / tag
        info_path = work / "runs" / f"{tag}.train.json"
        if args.retrain or not info_path.exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            log(f"{model}: training for {args.minutes} min ({args.clock} time)")
            try:
                tinfo = timed_train(work / "train.h5", family, run_dir, 60 * args.minutes, args.batch_size,
                                    args.seed, args.probe_steps, args.clock, args.deadline, config,
                                    args.device, refines.get(model))
            except Exception as exc:  # a model that cannot train here is a table row, not a crash
                log(f"{model}: training failed: {type(exc).__name__}: {exc}")
                traceback.print_exc()  # the where, for a failure on a machine seen only through its log
                result["models"][args.key_prefix + model] = {"error": f"{type(exc).__name__}: {exc}"}
                write()
                continue
            tinfo["model"], tinfo["train_config"] = family, config or {}
            cfg = json.loads((run_dir / "config.json").read_text())
            tinfo["hparams"] = cfg["hparams"]
            tinfo["batch_size"] = cfg["train"]["batch_size"]
            tinfo["n_parameters"] = int(sum(p.numel() for p in load_run(run_dir)[0].parameters()))
            info_path.parent.mkdir(parents=True, exist_ok=True)
            info_path.write_text(json.dumps(tinfo, indent=1, default=str))
            log(f"{model}: trained {tinfo['steps']} steps")
        tinfos[model] = json.loads(info_path.read_text())
    if args.train_only:
        log(f"trained {', '.join(tinfos)}; --train-only: no generation or scores")
        return
    if args.distill:
        for teacher, key in DISTILLED.items():
            if teacher in tinfos and "error" not in tinfos[teacher]:
                key += args.distill_suffix
                tinfos[key] = distilled_student(work, args, teacher, key, tinfos[teacher])

    # 3. test references and the floor: Geant4 vs Geant4 on the same statistics
    for name, (spec, n, seed) in d["files"].items():
        refs[name] = reference(name, spec, args.n_test or n, seed)
    for test, (ref, flo, _) in d["tests"].items():
        cache = work / "eval" / f"floor-{test}" / "summary.json"
        if cache.exists():
            result["floor"][test] = json.loads(cache.read_text())
        else:
            log(f"floor {test}: {flo} vs {ref}")
            result["floor"][test] = score(work / f"{ref}.h5", work / f"{flo}.h5", cache.parent, layers, args.seed,
                                          d.get("extra_metrics"))
            cache.write_text(json.dumps(result["floor"][test], default=float))
        f = result["floor"][test]
        log(f"floor {test}: AUC low {f['auc_low']} high {f['auc_high']} FPD {f['fpd_x1e3']} KPD {f['kpd_x1e3']}")
    write()

    # 4. generation and scores
    scored: set[str] = set()
    if args.skip_scored and out_json.exists():
        scored = {k for k, v in json.loads(out_json.read_text()).get("models", {}).items() if v.get("tests")}
    for model, tinfo in tinfos.items():
        key = args.key_prefix + model  # the table key; runs and generated files are named by model and minutes
        if key in scored:
            log(f"{key}: already scored in {out_json}, skipped")
            continue
        tag = f"{model}-{args.minutes:g}min"
        run_dir = work / "runs" / tag
        entry: dict[str, Any] = {"minutes_budget": args.minutes, **tinfo, "tests": {}}
        for test, (ref, _, energy) in d["tests"].items():
            gen = work / "gen" / f"{tag}-{test}.h5"
            gen.parent.mkdir(parents=True, exist_ok=True)
            log(f"{model}: generating for {test}")
            ginfo = generate_for(run_dir, work / f"{ref}.h5", energy, gen, seed=args.seed + 17,
                                 refine="refine" in tinfo)
            log(f"{model}: scoring {test} ({ginfo['ms_per_shower']} ms/shower)")
            try:
                sc = score(work / f"{ref}.h5", gen, work / "eval" / f"{tag}-{test}", layers, args.seed,
                           d.get("extra_metrics"))
            except Exception as exc:
                sc = {"error": f"{type(exc).__name__}: {exc}"}
            entry["tests"][test] = {"generation": ginfo, **sc}
            h = entry["tests"][test]
            log(f"{model} {test}: AUC low {h.get('auc_low')} high {h.get('auc_high')} FPD {h.get('fpd_x1e3')} "
                f"KPD {h.get('kpd_x1e3')} sep E_tot/E_inc {h.get('sep_E_tot/E_inc')}")
        result["models"][key] = entry
        write()
    log(f"done in {(time.perf_counter() - t_all) / 60:.1f} min -> {out_json}")


def rescore_threshold(args: argparse.Namespace, d: dict[str, Any], work: Path, out_json: Path) -> None:
    """Score the generated files again with a readout threshold (see :func:`apply_threshold`)."""
    import fcntl

    thr = float(args.rescore_threshold_mev)
    with ShowerFile(work / "train.h5") as f:
        layers = f.geometry.n_layers
    study: dict[str, Any] = {}
    for model in args.models:
        tag = f"{model}-{args.minutes:g}min"
        for test, (ref, _flo, _) in d["tests"].items():
            gen = work / "gen" / f"{tag}-{test}.h5"
            if not gen.exists():
                continue
            thr_file = apply_threshold(gen, work / "gen" / f"{tag}-{test}-thr{thr:g}.h5", thr)
            log(f"{model} {test}: scoring with a {thr} MeV threshold")
            sc = score(work / f"{ref}.h5", thr_file, work / "eval" / f"{tag}-{test}-thr{thr:g}", layers, args.seed)
            study.setdefault(model, {})[test] = sc
            log(f"{model} {test} thr {thr}: AUC low {sc['auc_low']} high {sc['auc_high']} FPD {sc['fpd_x1e3']} "
                f"KPD {sc['kpd_x1e3']}")
    # the floor with the same threshold on the Geant4 candidate (the reference keeps every deposit)
    for test, (ref, flo, _) in d["tests"].items():
        thr_file = apply_threshold(work / f"{flo}.h5", work / f"{flo}-thr{thr:g}.h5", thr)
        study.setdefault("geant4_floor", {})[test] = score(work / f"{ref}.h5", thr_file,
                                                           work / "eval" / f"floor-{test}-thr{thr:g}", layers,
                                                           args.seed)
    with open(work / "results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = json.loads(out_json.read_text())
        ts = result.setdefault("threshold_study", {})
        key = f"{thr:g} MeV"
        ts[key] = {**ts.get(key, {}), **study}
        ts[key]["note"] = (f"generated showers (and, for the floor row, the second Geant4 file) with voxels below "
                           f"{thr:g} MeV set to 0, scored against the unthresholded Geant4 test reference")
        tmp = out_json.with_name(out_json.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
        os.replace(tmp, out_json)


if __name__ == "__main__":
    sys.exit(main())
