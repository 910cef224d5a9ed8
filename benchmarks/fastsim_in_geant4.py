"""Fast simulation inside Geant4 (issue 19 item 4): full Geant4 against Geant4 + a trained run's showers.

Per detector, with the set-up a physicist's application has (1 X0 of lead 20 mm before the calorimeter, the
gun at 0-30 degrees, full azimuth), three Geant4 files of the same request:

- ``g4``: full Geant4 (the reference, timed);
- ``floor``: full Geant4 again, another seed (the Geant4-vs-Geant4 floor of every score);
- ``fast``: Geant4 + fast simulation (``simulate(..., fast_sim=fast_sim_model(run))``, timed): every e+/e-/gamma
  entering the calorimeter at or above the threshold is killed at the front face and replaced by the run's
  shower for its energy, entry point and direction, the rest tracked in full.

The run is trained on single particles without upstream material (as a fast-simulation model is: a gun at
the front face, uniform in angle, azimuth and entry point, energies log-uniform from the threshold up), for a
fixed CPU budget (a 30-step probe, then the planned steps on one thread, ``model_quality.timed_train``). The
scores are ``evaluate``'s (E_tot/E_inc, layer energies, centres of energy, classifier AUCs), ``fast`` against
``g4`` beside ``floor`` against ``g4``. The time per event of both timed files is (T_N - T_startup) /
(N - N_startup), T in wall seconds and in CPU seconds of the worker processes (getrusage of the children), a
startup run of N_startup events measured before each: the event-level speed-up, Geant4's own work on the
upstream slab and the particles below threshold included (Amdahl's law).

    python benchmarks/fastsim_in_geant4.py --detector calogan-3layer --workdir /tmp/fsb [--out FILE]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib import import_module  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from model_quality import log, summarise, timed_train  # noqa: E402

from fastshower import __version__  # noqa: E402
from fastshower.deploy.export import export_onnx  # noqa: E402
from fastshower.fastsim_model import fast_sim_model  # noqa: E402
from fastshower.geometry import get_geometry  # noqa: E402
from fastshower.io import ShowerFile  # noqa: E402
from fastshower.montecarlo.run import simulate  # noqa: E402
from fastshower.runs import RunFolder  # noqa: E402
from fastshower.training import train  # noqa: E402
from fastshower.validate.evaluate import evaluate  # noqa: E402

#: per detector: the gun, the training set-up of the run, and the test set-up
DETECTORS: dict[str, dict[str, Any]] = {
    "calogan-3layer": {
        "particle": "e+", "model": "flow", "minutes": 8.0,
        # training: single particles at the front face; angles and entry points a little wider than the test
        # gun's, as the particles that leave the lead are scattered
        "train_energy": "1:30:log", "n_train": 3000, "train_angle": "0:35", "train_position": "-15:15,-15:15",
        "test_energy": "10:30", "n_test": 300, "angle": "0:30", "upstream": "G4_Pb:5.6mm", "threshold": "1GeV",
        # the fast file's inference; timed only, on a fifth of the events: torch, and ONNX one particle at a time
        "inference": "onnx", "sample_options": {},
        "timing_only": {"geant4_fastsim_torch": {}, "geant4_fastsim_onnx_per_particle": {"onnx": True,
                                                                                        "batch": "particle"}},
    },
    "par04-ds2": {
        # a polar readout follows each particle's entry point and direction, so the run needs no position
        "particle": "e-", "model": "layer-fm", "minutes": 8.0,
        # torch: exporting layer-fm's 16-step sampler to ONNX took over 10 CPU-minutes on this machine; 4 midpoint
        # steps (as good as 16 for the 60-minute par04-ds2 run, deployable_par04-ds2.json), 16 timed only
        "inference": "torch", "sample_options": {"steps": 4},
        "timing_only": {"geant4_fastsim_torch_16_steps": {"sample_options": {"steps": 16}}},
        "train_energy": "1:30:log", "n_train": 1500, "train_angle": "0:35", "train_position": None,
        "test_energy": "10:30", "n_test": 150, "angle": "0:30", "upstream": "G4_Pb:5.6mm", "threshold": "1GeV",
    },
}
METRICS = ["separation_power", "classifier_low", "classifier_high", "response"]
NOTES = [
    "N per file is setup.n_test (full Geant4, Geant4 + fast simulation with setup.inference, the floor, the null "
    "model); the setup.timing_only rows time a fifth of the events (at least 30) and are noisier.",
    "cpu_s_per_event counts the worker processes' CPU time (getrusage of the children): on a shared machine (load "
    "average in machine) the wall times are dominated by other processes, the CPU times are not.",
    "geant4_fastsim_null_model: the same fast simulation with a model that costs nothing and deposits nothing: "
    "Geant4's own work that no model removes (upstream slab, particles below threshold, the world's sensitive "
    "detector, placing no cells); model_cpu_s_per_event = a fast-sim row less that; speedup_bound_cpu = full "
    "Geant4 over it, the speed-up of an infinitely fast model (Amdahl's law).",
]
#: events of the startup runs (worker spawn, Geant4 initialisation, tables, the model's loading)
N_STARTUP = 10


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children (the simulate workers)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _complete(path: Path) -> bool:
    try:
        with ShowerFile(path):
            return True
    except Exception:  # missing, incomplete or unreadable: simulate again
        return False


def _simulate(d: dict[str, Any], path: Path, n: int, seed: int, jobs: int, **kw: Any) -> dict[str, Any]:
    """The test set-up's ``n`` events into ``path`` (kept if complete); wall and worker-CPU seconds."""
    if _complete(path):
        return {}
    path.unlink(missing_ok=True)
    t0, c0 = time.perf_counter(), _children_cpu()
    simulate(d["detector"], d["particle"], d["test_energy"], n, path, seed=seed, jobs=jobs, progress=False,
             chunk_size=max(1, -(-n // jobs)), angle=d["angle"], phi="0:360", upstream=d["upstream"], **kw)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": _children_cpu() - c0, "n": n}


def _timed(d: dict[str, Any], work: Path, tag: str, n: int, seed: int, cache: dict[str, Any],
           **kw: Any) -> dict[str, Any]:
    """Time per event of the test set-up (jobs 1): a startup run, then ``n`` events into ``work/tag.h5``."""
    if tag in cache and _complete(work / f"{tag}.h5"):
        return dict(cache[tag])
    (work / f"{tag}_startup.h5").unlink(missing_ok=True)
    start = _simulate(d, work / f"{tag}_startup.h5", N_STARTUP, seed + 1000, 1, **kw)
    (work / f"{tag}.h5").unlink(missing_ok=True)
    full = _simulate(d, work / f"{tag}.h5", n, seed, 1, **kw)
    out = {"n": n, "n_startup": N_STARTUP, "startup_wall_s": round(start["wall_s"], 2),
           "total_wall_s": round(full["wall_s"], 2), "startup_cpu_s": round(start["cpu_s"], 2),
           "total_cpu_s": round(full["cpu_s"], 2)}
    for clock in ("wall", "cpu"):
        out[f"{clock}_s_per_event"] = round((full[f"{clock}_s"] - start[f"{clock}_s"]) / (n - N_STARTUP), 5)
    cache[tag] = out
    return out


def _fast_sim_stats(path: Path) -> dict[str, Any]:
    """What the fast simulation replaced, from the file's truth."""
    with ShowerFile(path) as f:
        b = f.read()
        attrs = {k: str(v) for k, v in f.attrs.items() if k.startswith("option_fast_sim") or k == "physics"}
    n, e = b.truth["n_fastsim"].ravel(), b.truth["e_fastsim"].ravel()
    return {
        "replaced_per_event_mean": round(float(n.mean()), 3),
        "replaced_per_event_histogram": dict(zip(*(u.tolist() for u in np.unique(n.astype(int), return_counts=True)),
                                                 strict=True)),
        "replaced_energy_fraction_of_gun_mean": round(float((e / b.energies).mean()), 4),
        "outside_trained_domain_per_event_mean": round(float(b.truth["n_outside"].mean()), 4),
        "events_without_replacement": int((n == 0).sum()),
        "provenance": attrs,
    }


def _null_loader(fs: Any) -> Any:
    """A fast-sim 'model' that costs nothing and deposits nothing: Geant4's own work in a fast-simulated event."""
    return lambda e, conds, seeds: np.zeros((len(e), fs.geometry.n_voxels), dtype=np.float32)


def _hits(path: Path) -> float:
    """Mean number of non-zero cells per event."""
    with ShowerFile(path) as f:
        return round(float((f.read().showers > 0).sum(1).mean()), 1)


def _train(d: dict[str, Any], work: Path, seed: int) -> tuple[Path, dict[str, Any]]:
    """The single-particle training file and the run trained on it (kept if finished)."""
    data, run = work / "train.h5", work / "run"
    info_path = work / "train_info.json"
    if not _complete(data):
        data.unlink(missing_ok=True)
        log(f"simulating {d['n_train']} training showers")
        t0, c0 = time.perf_counter(), _children_cpu()
        simulate(d["detector"], d["particle"], d["train_energy"], d["n_train"], data, seed=seed, jobs=2,
                 chunk_size=50, progress=False, angle=d["train_angle"], phi="0:360", position=d["train_position"])
        info_path.write_text(json.dumps({"simulate_wall_s": round(time.perf_counter() - t0, 1),
                                         "simulate_cpu_s": round(_children_cpu() - c0, 1)}))
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    meta = RunFolder(run).meta
    if not (meta.exists() and json.loads(meta.read_text()).get("status") == "finished" and "train" in info):
        log(f"training {d['model']} for {d['minutes']} CPU-minutes")
        info["train"] = timed_train(data, d["model"], run, 60 * d["minutes"], None, seed, 30)
        if info["train"]["stopped_early"]:  # stopped at the budget: close the run at the step it reached
            train(data, None, run, steps=info["train"]["steps"], resume=True, progress=False)
        info_path.write_text(json.dumps(info))
    return run, info


def _score(reference: Path, candidate: Path, out: Path, layers: int, seed: int) -> dict[str, Any]:
    m = evaluate(reference, candidate, out, metrics=METRICS, seed=seed, progress=False, report=False)
    res = summarise(m, layers)
    res["n_reference"], res["n_candidate"] = m["n_reference"], m["n_candidate"]
    return res


def _headline(scores: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The scores the issue asks for, fast simulation beside the floor: separation powers of E_tot/E_inc, of the
    layer energies and of the centres of energy (mean and worst over layers), the classifier AUCs."""
    out: dict[str, dict[str, float]] = {}
    for name, key in (("fastsim", "fastsim_vs_geant4"), ("floor", "floor_geant4_vs_geant4")):
        sc = scores[key]
        sp = sc["separation_power"]
        layers = [v for k, v in sp.items() if k.startswith("E_layer_")]
        centres = [v for k, v in sp.items() if "_centre" in k]
        row = {"sep_E_tot/E_inc": sp.get("E_tot/E_inc"), "sep_E_layer_mean": float(np.mean(layers)),
               "sep_E_layer_max": float(np.max(layers)), "sep_centre_mean": float(np.mean(centres)),
               "sep_centre_max": float(np.max(centres)), "sep_all_mean": sc.get("sep_mean"),
               "auc_low": sc.get("auc_low"), "auc_high": sc.get("auc_high")}
        for k, v in row.items():
            out.setdefault(k, {})[name] = round(float(v), 4) if v is not None else None  # type: ignore[assignment]
    return out


def run_detector(d: dict[str, Any], work: Path, seed: int) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    cache_path = work / "timings.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    run, train_info = _train(d, work, seed)
    engine = d["inference"]
    onnx = work / "run.onnx"
    if engine == "onnx" and not onnx.exists():
        export_onnx(run, onnx)
    main_kw = {"onnx_path": onnx} if engine == "onnx" else {"sample_options": d["sample_options"]}
    models = {f"geant4_fastsim_{engine}": fast_sim_model(run, d["threshold"], **main_kw)}
    for k, kw in d["timing_only"].items():
        kw = {key: v for key, v in kw.items() if key != "onnx"} | ({"onnx_path": onnx} if kw.get("onnx") else {})
        models[k] = fast_sim_model(run, d["threshold"], **kw)
    # the same kills and records with a model that costs nothing: Geant4's work left (pickled by this module's name)
    null = import_module("fastsim_in_geant4")._null_loader
    models["geant4_fastsim_null_model"] = dataclasses.replace(models[f"geant4_fastsim_{engine}"], loader=null)
    log("full Geant4 (timed), then Geant4 + fast simulation (timed)")
    timings = {"geant4": _timed(d, work, "g4", d["n_test"], seed + 1, cache)}
    for i, (label, fs) in enumerate(models.items()):  # the first is the scored file, the others a fifth
        tag, n = ("fast", d["n_test"]) if i == 0 else (label.replace("geant4_fastsim", "fast"),
                                                       max(N_STARTUP + 20, d["n_test"] // 5))
        n = d["n_test"] if label.endswith("null_model") else n
        cache_path.write_text(json.dumps(cache))
        timings[label] = _timed(d, work, tag, n, seed + 3 if i == 0 else seed + 4, cache, fast_sim=fs)
    cache_path.write_text(json.dumps(cache))
    log("the floor: full Geant4 again")
    _simulate(d, work / "floor.h5", d["n_test"], seed + 2, 2)
    g4, left = timings["geant4"], timings["geant4_fastsim_null_model"]["cpu_s_per_event"]
    for k in models:
        t = timings[k]
        t["speedup_wall"] = round(g4["wall_s_per_event"] / t["wall_s_per_event"], 2)
        t["speedup_cpu"] = round(g4["cpu_s_per_event"] / t["cpu_s_per_event"], 2)
        if not k.endswith("null_model"):  # Amdahl: the model's cost in the event, beside Geant4's work left
            t["model_cpu_s_per_event"] = round(t["cpu_s_per_event"] - left, 5)
    timings["geant4_left_fraction_of_full"] = round(left / g4["cpu_s_per_event"], 3)
    timings["speedup_bound_cpu"] = round(g4["cpu_s_per_event"] / left, 1)
    layers = len(get_geometry(d["detector"]).layers)
    log("scoring")
    scores = {"fastsim_vs_geant4": _score(work / "g4.h5", work / "fast.h5", work / "eval_fast", layers, seed),
              "floor_geant4_vs_geant4": _score(work / "g4.h5", work / "floor.h5", work / "eval_floor", layers, seed)}
    stats = _fast_sim_stats(work / "fast.h5")
    stats["hit_cells_per_event_mean"] = {name: _hits(work / f"{name}.h5") for name in ("g4", "fast", "floor")}
    return {"setup": dict(d), "training": train_info, "fast_sim": stats, "timing": timings,
            "headline": _headline(scores), "scores": scores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", choices=list(DETECTORS), default="calogan-3layer")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/fastsim_in_geant4_DET.json)")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--minutes", type=float, default=None, help="training budget, CPU minutes")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = {"detector": args.detector, **DETECTORS[args.detector]}
    for key in ("n_train", "n_test", "minutes"):
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    t0 = time.perf_counter()
    result = {"benchmark": "fastsim_in_geant4", "fastshower_version": __version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                          "torch_threads": 1},
              "method": __doc__.split("\n\n")[1:4],
              "notes": NOTES,
              **run_detector(d, Path(args.workdir), args.seed)}
    result["machine"]["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    result["wall_minutes_this_invocation"] = round((time.perf_counter() - t0) / 60, 1)  # files of earlier ones kept
    out = Path(args.out or Path(__file__).parent / "results" / f"fastsim_in_geant4_{args.detector}.json")
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
