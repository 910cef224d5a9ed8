"""Train profile models on CONEX-like reference air showers and score them (issue "Air showers", 3 and 5).

Inputs: reference files made with the hybrid generator, e.g.::

    fastshower simulate --geometry airshower-profile --particle p  --energy 1e17eV:1e19eV:log \
        --zenith 0:65 --n 3000 --out p_train.h5 --jobs 2 --seed 11      (Fe: seed 12)
    ... --n 1000 --out p_test.h5 --seed 21                              (Fe: seed 22)

Steps:

1. merge p and Fe files into one training and one test file with a ``primary`` condition
   (ln A; :func:`fastshower.io.merge_files`), interleaved; the training file's below-ground bins are
   continued smoothly (:func:`fastshower.airshower.prepare_training_file`; ``--no-fill`` trains
   on the raw profiles), the test file is left as simulated;
2. per model (WGAN-GP as in the KIT design, flow matching), train on the merged training file for a
   wall-clock budget (steps calibrated on a 40-step run), conditioned on log E, zenith, azimuth, ln A;
3. generate one profile per test profile with the same energy, zenith, azimuth and primary
   (:func:`fastshower.airshower.mirror_generate`), check physicality (non-negative, finite,
   exactly zero below ground; also how much the raw network put below ground before the postprocess);
4. score with the validation suite (``evaluate``: separation power of Xmax, dE/dX_max and the other
   profile observables, classifier AUCs on low-level (log E, profile / E) and high-level features, with
   the reference-vs-reference floor), per primary and on the mixture, and compare <Xmax> and RMS(Xmax)
   per primary and energy bin (:func:`fastshower.airshower.compare_xmax_moments`); on the mixture, the
   downstream check (``evaluate --downstream``: energy and Xmax reconstruction and a p-against-Fe
   classifier trained on half the test profiles, applied to the other half and to the generated ones;
   module :mod:`fastshower.validate.downstream_profiles`);
5. time generation (ms per profile, batch 10k, 1 thread) beside the reference's seconds per shower
   (benchmarks/results/airshower_speed.json).

Run: ``nice .venv/bin/python benchmarks/airshower_models.py --data /tmp/airsh --budget-s 240``
Writes benchmarks/results/airshower_models.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastshower.airshower import (
    PROFILE_CONFIGS,
    compare_xmax_moments,
    mirror_generate,
    physicality,
    prepare_training_file,
    profile_roughness,
)
from fastshower.io import ShowerFile, merge_files
from fastshower.runs import load_run
from fastshower.sampling import below_ground_mask, sample_batch
from fastshower.training import train
from fastshower.validate.evaluate import EvaluationConfig, evaluate

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "airshower_models.json"
SPEED = HERE / "results" / "airshower_speed.json"
KEY_OBS = ("Xmax", "dEdX_max", "X_width", "X_mean", "E_tot/E_inc")


def _config(model: str, steps: int) -> dict[str, Any]:
    cfg = json.loads(json.dumps(PROFILE_CONFIGS[model]))
    cfg["train"]["steps"] = steps
    return cfg


def _train_budget(model: str, data: Path, out: Path, budget_s: float, max_steps: int) -> dict[str, Any]:
    """Calibrate seconds per step on 40 steps, then train for ~budget_s seconds."""
    cal = out.with_name(out.name + "_calibrate")
    shutil.rmtree(cal, ignore_errors=True)
    t = time.perf_counter()
    train(data, out=cal, config=_config(model, 40), progress=False)
    s_cal = json.loads((cal / "meta.json").read_text())["train_seconds"] / 40
    fit_s = time.perf_counter() - t - 40 * s_cal
    shutil.rmtree(cal)
    steps = int(min(max_steps, max(200, budget_s / s_cal)))
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    train(data, out=out, config=_config(model, steps), progress=False)
    wall = time.perf_counter() - t
    meta = json.loads((out / "meta.json").read_text())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {"steps": steps, "train_seconds": meta["train_seconds"], "wall_seconds_incl_transform_fit": wall,
            "calibration_s_per_step": s_cal, "transform_fit_seconds_estimate": fit_s,
            "batch_size": PROFILE_CONFIGS[model]["train"]["batch_size"],
            "hparams": PROFILE_CONFIGS[model]["hparams"],
            "last_log": {k: v for k, v in log[-1].items() if isinstance(v, (int, float))}}


def _raw_below_ground(run_dir: Path, test: Path, n: int = 2000) -> dict[str, float]:
    """How much dE/dX the network itself puts below ground before :func:`zero_below_ground`."""
    model, transform, info = load_run(run_dir)
    with ShowerFile(test) as f:
        b = f.read(0, n)
    conds = {k: b.conditions[k] for k in info.cond_names}
    s = sample_batch(model, transform, b.energies, conds, torch.Generator().manual_seed(5), info.threshold_mev)
    mask = below_ground_mask(info.geometry, torch.from_numpy(b.conditions["zenith"])).numpy()
    dedx = slice(0, info.geometry.profile.n_bins if info.geometry.profile else 0)
    below = (s * mask)[:, dedx].sum(axis=1)
    tot = s[:, dedx].sum(axis=1)
    return {"n": n, "frac_values_nonzero_below_ground": float(((s != 0) & mask).sum() / max(mask.sum(), 1)),
            "mean_fraction_of_dEdX_below_ground": float(np.mean(below / np.maximum(tot, 1e-30))),
            "max_fraction_of_dEdX_below_ground": float(np.max(below / np.maximum(tot, 1e-30)))}


def _speed(run_dir: Path, test: Path, batch: int = 10000, repeats: int = 2) -> dict[str, Any]:
    """Generation time per profile, batch ``batch``, 1 thread, including pre/postprocessing."""
    torch.set_num_threads(1)
    model, transform, info = load_run(run_dir)
    with ShowerFile(test) as f:
        b = f.read(0, f.n)
    idx = np.resize(np.arange(len(b)), batch)
    e = b.energies[idx]
    conds = {k: b.conditions[k][idx] for k in info.cond_names}
    gen = torch.Generator().manual_seed(0)
    sample_batch(model, transform, e[:100], {k: v[:100] for k, v in conds.items()}, gen, info.threshold_mev,
                 geometry=info.geometry)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sample_batch(model, transform, e, conds, gen, info.threshold_mev, geometry=info.geometry)
        times.append(time.perf_counter() - t)
    best = min(times)
    sampler = getattr(model, "generator", None) or getattr(model, "ema_net", None) or model
    return {"batch": batch, "threads": 1, "seconds_per_batch": times, "ms_per_profile": 1e3 * best / batch,
            "n_parameters_sampler": sum(p.numel() for p in sampler.parameters()),
            "sampler": "generator" if hasattr(model, "generator") else "EMA velocity net, steps x 2 evaluations"}


def _scores(result: dict[str, Any]) -> dict[str, Any]:
    clf = result.get("classifier", {})
    fl = result.get("floor", {})
    out: dict[str, Any] = {
        "n_reference": result["n_reference"], "n_candidate": result["n_candidate"],
        "separation_power": {k: result["separation_power"][k] for k in KEY_OBS},
        "separation_power_error": {k: result["separation_power_error"][k] for k in KEY_OBS},
        "auc_low": clf.get("low", {}).get("auc"), "auc_high": clf.get("high", {}).get("auc"),
    }
    if fl:
        out["floor"] = {"separation_power": {k: fl["separation_power"][k] for k in KEY_OBS},
                        "auc_low": fl.get("classifier", {}).get("low", {}).get("auc"),
                        "auc_high": fl.get("classifier", {}).get("high", {}).get("auc")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/airsh", help="folder with p_train/Fe_train/p_test/Fe_test .h5")
    ap.add_argument("--work", default=None, help="work folder (default DATA/bench)")
    ap.add_argument("--models", nargs="+", default=["wgan-gp", "flow-matching"])
    ap.add_argument("--budget-s", type=float, default=240.0, help="training wall-clock budget per model")
    ap.add_argument("--max-steps", type=int, default=20000)
    ap.add_argument("--no-fill", action="store_true", help="train on raw profiles (zero below ground)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--note", default="2 CPU cores shared with other jobs, nice'd; wall-clock numbers are pessimistic",
                    help="what else ran on the machine (written to the JSON)")
    args = ap.parse_args()
    results = Path(args.out)
    torch.set_num_threads(1)
    data = Path(args.data)
    work = Path(args.work or data / "bench")
    work.mkdir(parents=True, exist_ok=True)
    prim = ("p", "Fe")
    tests = {p: data / f"{p}_test.h5" for p in prim}
    train_file, test_file = work / "train.h5", work / "test.h5"
    for old in (train_file, test_file):
        old.unlink(missing_ok=True)
    prepare_training_file([data / f"{p}_train.h5" for p in prim], train_file, fill_ground=not args.no_fill)
    merge_files([tests[p] for p in prim], test_file, add_condition="primary")
    with ShowerFile(train_file) as tf:
        n_train = tf.n
        merged_attrs = {k: tf.attrs[k] for k in ("particle", "merge_condition", "merge_condition_values",
                                                 "below_ground_fill")}
    test_n = {}
    for p in prim:
        with ShowerFile(tests[p]) as sf:
            test_n[p] = sf.n
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": 1,
                    "note": args.note},
        "data": {"train": {"n": n_train, **merged_attrs}, "test_n": test_n,
                 "energy": "1e17-1e19 eV log-uniform", "zenith": "0-65 deg, uniform in cos^2",
                 "generator": "fastshower CONEX-like hybrid (SIBYLL-2.3d)",
                 "conditions": "log E, zenith, azimuth, primary (ln A)"},
        "models": {},
    }
    ref_speed = json.loads(SPEED.read_text()) if SPEED.exists() else None
    if ref_speed:
        result["reference_speed"] = {"source": str(SPEED.relative_to(HERE.parent)),
                                     "seconds_per_shower": ref_speed["seconds_per_shower"]}
    cfg = EvaluationConfig(n_boot=20)
    for model in args.models:
        print(f"== {model}", flush=True)
        run_dir = work / f"run_{model}"
        m: dict[str, Any] = {"training": _train_budget(model, train_file, run_dir, args.budget_s, args.max_steps)}
        print(m["training"], flush=True)
        cands = {"mixture": work / f"cand_{model}_mix.h5", **{p: work / f"cand_{model}_{p}.h5" for p in prim}}
        refs = {"mixture": test_file, **tests}
        for key in cands:
            cands[key].unlink(missing_ok=True)
            mirror_generate(run_dir, refs[key], cands[key], seed=1)
        m["physicality"] = {k: physicality(v) for k, v in cands.items()}
        m["raw_network_below_ground"] = _raw_below_ground(run_dir, test_file)
        with ShowerFile(test_file) as fr, ShowerFile(cands["mixture"]) as fc:
            m["roughness_dEdX_200_900"] = {"reference": profile_roughness(fr.read().showers, fr.geometry),
                                           "model": profile_roughness(fc.read().showers, fc.geometry)}
        m["validation"] = {}
        for key in cands:
            r = evaluate(refs[key], cands[key], work / f"eval_{model}_{key}",
                         metrics=["separation_power", "classifier_low", "classifier_high"], seed=0,
                         floor=key == "mixture", progress=False, config=cfg, report=key == "mixture",
                         downstream=key == "mixture")
            m["validation"][key] = _scores(r)
            if key == "mixture":  # issue "Seed systems" item 5: what an analysis reconstructs from the profiles
                m["downstream"] = r["downstream"]
            print(key, m["validation"][key], flush=True)
        m["xmax_moments"] = compare_xmax_moments(test_file, cands["mixture"])
        m["generation_speed"] = _speed(run_dir, test_file)
        if ref_speed:
            ref_s = [r["seconds"] for r in ref_speed["seconds_per_shower"]]
            m["generation_speed"]["speedup_vs_reference_range"] = [
                min(ref_s) / (m["generation_speed"]["ms_per_profile"] * 1e-3),
                max(ref_s) / (m["generation_speed"]["ms_per_profile"] * 1e-3)]
        print(m["generation_speed"], flush=True)
        result["models"][model] = m
        results.write_text(json.dumps(result, indent=1))
    results.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
