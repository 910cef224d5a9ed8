"""GAN amplification of the best model on Belle II and calogan-3layer (issue 20, item 4).

For a model trained on N Geant4 showers: how many Geant4 showers is a large generated sample worth?
Method of Butter, Diefenbacher, Kasieczka, Nachman, Plehn (arXiv:2008.06545), as
``fastshower evaluate --amplification TRAIN_FILE`` computes it (module
:mod:`fastshower.validate.amplification`): the quantile-binned MSE of E_tot/E_inc (and each layer's
energy / E_inc) against a large, independent Geant4 truth, per incident-energy bin, as a function of
the sample size, for subsamples of the training file and of the generated file.

Protocol, per detector preset (files and runs are reused when present, so a killed run restarts where
it stopped):

1. Geant4: one truth file of M showers and one training file per N (independent seeds);
2. per model and N: train on the N showers for ``--minutes`` CPU-minutes on one thread
   (``model_quality.timed_train``: probe, then re-planned steps);
3. generate G = M showers at the truth's energy spectrum;
4. ``evaluate(truth, generated, amplification=train, downstream=True)`` writes metrics.json, report.html
   and the MSE curve (amplification.png); the JSON here collects the study, the downstream energy
   reconstruction (issue 20 item 5) and the separation power of E_tot/E_inc with its Geant4 floor (the
   training file against the truth).

Cost on this machine: Geant4 9.4 ms per Belle II shower (0.5-2.5 GeV), 0.70 s per calogan-3layer e+ shower
(1-100 GeV uniform); generation is negligible. Run ``nice``d, one thread::

    nice .venv/bin/python benchmarks/amplification.py --detector belle2 --n-train 1000 10000 \
        --workdir /tmp/amp/belle2 --out benchmarks/results/amplification_belle2-ecl-5x5.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_quality as mq  # the same Geant4 files, budgeted training and generation as the quality table

from fastshower.validate.evaluate import evaluate

#: detector presets: geometry, particle, energy spec, truth (n, seed), training-file seed base, chunk size
PRESETS: dict[str, dict[str, Any]] = {
    "belle2": {"geometry": "belle2-ecl-5x5", "particle": "e-", "energy": "0.5,1,1.5,2.5",
               "truth": (100_000, 121), "train_seed": 130, "chunk": 100},
    "calogan": {"geometry": "calogan-3layer", "particle": "e+", "energy": "1:100",
                "truth": (4_000, 302), "train_seed": 300, "chunk": 50},
}


def _train_file(work: Path, p: dict[str, Any], n: int) -> tuple[Path, dict[str, Any]]:
    """The Geant4 training file of ``n`` showers (seed: the preset's base + the number of digits of ``n``)."""
    path = work / f"train_{n}.h5"
    # 1000 -> +4, 10000 -> +5, stable across runs; sizes with as many digits share a seed (nested files), which
    # the study allows: only the truth must be independent of each training file (its seed is not a base + 1..9)
    seed = p["train_seed"] + len(str(n))
    return path, mq.ensure_reference(path, p["geometry"], p["particle"], p["energy"], n, seed, p["chunk"])


def _run(work: Path, args: argparse.Namespace, model: str, config: dict[str, Any] | None, key: str,
         train_path: Path) -> dict[str, Any]:
    """Train (unless a finished run is there) and return the run directory and its training figures."""
    run_dir = work / "runs" / key
    info_path = work / "runs" / f"{key}.train.json"
    if args.retrain or not info_path.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        mq.log(f"{key}: training {model} for {args.minutes} CPU-min on {train_path.name}")
        info = mq.timed_train(train_path, model, run_dir, 60 * args.minutes, None, args.seed, args.probe_steps,
                              config=config)
        info_path.write_text(json.dumps(info, indent=1))
    return {"run": str(run_dir), "training": json.loads(info_path.read_text())}


def _study(work: Path, args: argparse.Namespace, truth: Path, train_path: Path, key: str,
           energy: str) -> dict[str, Any]:
    """Generate as many showers as the truth and run ``evaluate --amplification`` on them."""
    gen = work / "gen" / f"{key}.h5"
    gen.parent.mkdir(parents=True, exist_ok=True)
    ginfo = mq.generate_for(work / "runs" / key, truth, energy, gen, args.seed + 7)
    t0 = time.perf_counter()
    ev_dir = work / "eval" / key
    m = evaluate(truth, gen, ev_dir, metrics=["separation_power"], seed=args.seed, progress=False,
                 amplification=train_path, downstream=True)
    # the training file against the truth: the Geant4 floor of E_tot/E_inc at N showers
    floor = evaluate(truth, train_path, work / "eval" / f"floor_{train_path.stem}", metrics=["separation_power"],
                     seed=args.seed, progress=False, report=False)
    amp = m["amplification"]
    amp.pop("train_file", None)
    figure = Path(args.out).with_name(f"{Path(args.out).stem}_{key}.png")
    shutil.copyfile(ev_dir / "plots" / "amplification.png", figure)
    return {
        "generation": ginfo, "evaluate_seconds": round(time.perf_counter() - t0, 1),
        "separation_power_E_tot_over_E_inc": m["separation_power"]["E_tot/E_inc"],
        "floor_separation_power_E_tot_over_E_inc_train_vs_truth": floor["separation_power"]["E_tot/E_inc"],
        "amplification": amp, "figure": str(figure), "report": str(ev_dir / "report.html"),
        # item 5 on the same files: the energy regressor trained on half the truth's subsample
        "downstream": m["downstream"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", choices=sorted(PRESETS), required=True)
    ap.add_argument("--n-train", type=int, nargs="+", default=[1000], help="training-file sizes N")
    ap.add_argument("--model", default="flow", help="model family (default: flow, the best on both detectors)")
    ap.add_argument("--label", default=None, help="the model's key in --out (default: --model)")
    ap.add_argument("--hparams", type=json.loads, default=None, help="hyper-parameters as JSON")
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget per run, CPU-minutes")
    ap.add_argument("--probe-steps", type=int, default=30)
    ap.add_argument("--truth-n", type=int, default=None, help="truth showers M (default: the preset's)")
    ap.add_argument("--wait-truth", action="store_true",
                    help="a truth file that exists but is incomplete is being written by another process: wait")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True, help="results JSON (rewritten after every run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    p, work, out = PRESETS[args.detector], Path(args.workdir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    result.update({"detector": p["geometry"], "particle": p["particle"], "energy_gev": p["energy"],
                   "method": "arXiv:2008.06545, quantile-binned MSE per incident-energy bin (evaluate --amplification)",
                   "machine": mq.machine_info()})
    result.setdefault("runs", {})
    label = args.label or args.model
    config = {"hparams": args.hparams} if args.hparams else None
    rows = {}
    for n in args.n_train:  # training first: it needs only its own file, the truth may still be simulated
        train_path, tinfo = _train_file(work, p, n)
        key = f"{label}-N{n}-{args.minutes:g}min"
        rows[key] = (train_path, {"model": args.model, "hparams": args.hparams or {}, "train_file": tinfo,
                                  **_run(work, args, args.model, config, key, train_path)})
    truth = work / "truth.h5"
    n_truth = args.truth_n or p["truth"][0]
    while args.wait_truth and truth.exists() and not mq.complete(truth, n_truth):
        time.sleep(20)  # another process is writing it
    result["truth"] = mq.ensure_reference(truth, p["geometry"], p["particle"], p["energy"], n_truth, p["truth"][1],
                                          p["chunk"])
    for key, (train_path, row) in rows.items():
        row.update(_study(work, args, truth, train_path, key, p["energy"]))
        a = row["amplification"]
        mq.log(f"{key}: amplification {a['amplification']:.3g} (asymptotic {a['amplification_asymptotic']:.3g}), "
               f"{a['equivalent_mc_showers']:.0f} MC showers from N = {a['n_train']}")
        result["runs"][key] = row
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)

if __name__ == "__main__":
    main()
