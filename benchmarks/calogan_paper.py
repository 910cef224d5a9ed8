"""CaloGAN's own observables on calogan-3layer, one model per particle (issue 20 item 2).

Paganini, de Oliveira, Nachman, arXiv:1712.10321 compare Geant4 and CaloGAN on: the layer energies
E_0, E_1, E_2 and the layer fractions E_l / E_tot, the total energy E_tot and E_tot / E_inc, the
sparsity of each layer, the shower depth (energy-weighted depth) and its width, and the lateral width
of each layer (the spread along the fine, eta-like direction: x here, 96 cells of 5 mm in layer 0).
This script collects those separation powers for the ``calogan`` rows of the per-particle
``benchmarks/model_quality.py`` runs (``--detector calogan`` for e+, ``calogan-gamma`` for gamma), each beside the
Geant4-vs-Geant4 floor (a second, independent Geant4 file against the same test reference). The
separation powers of ``fastshower evaluate`` are taken as computed there; the layer fractions, which
``evaluate`` does not histogram, are scored here the same way (50 bins between the reference's
0.05 % and 99.95 % quantiles, under- and overflow as bins, :func:`fastshower.validate.metrics.histogram_score`).

    .venv/bin/python benchmarks/calogan_paper.py --particle e+ /work/data/calogan-3layer/e+ \\
        benchmarks/results/model_quality_calogan-3layer_calogan-e+.json --particle gamma ... \\
        --out benchmarks/results/model_quality_calogan-3layer_calogan-e+-gamma.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from fastshower.io import ShowerFile
from fastshower.validate import metrics as M
from fastshower.validate.observables import layer_energies

TEST = "uniform_1-100GeV"
#: the paper's observables, in the order of its figures; f_layer_l = E_l / E_tot (computed here)
PAPER = ["E_layer_0", "E_layer_1", "E_layer_2", "f_layer_0", "f_layer_1", "f_layer_2", "E_tot", "E_tot/E_inc",
         "sparsity_0", "sparsity_1", "sparsity_2", "z_centre", "z_width", "x_width_0", "x_width_1", "x_width_2"]
#: reported beside them (not the paper's): the widths along the coarse direction
EXTRA = ["y_width_0", "y_width_1", "y_width_2"]
TARGET = 0.10


def layer_fractions(path: Path) -> np.ndarray:
    """E_l / E_tot of every shower of a file: (n, L), dimensionless (0 for an empty shower)."""
    with ShowerFile(path) as f:
        b = f.read(0, f.n)
        e_l = np.asarray(layer_energies(b.showers, f.geometry), dtype=np.float64)
    return e_l / np.clip(e_l.sum(1, keepdims=True), 1e-12, None)


def fraction_scores(reference: Path, candidate: Path, seed: int = 0) -> dict[str, float]:
    """Separation power of each layer fraction of ``candidate`` against ``reference``: {f_layer_l: S}."""
    ref, cand = layer_fractions(reference), layer_fractions(candidate)
    out: dict[str, float] = {}
    for i in range(ref.shape[1]):
        bn = M.make_binning(ref[:, i])
        p = np.bincount(bn.index(ref[:, i]), minlength=bn.n_bins + 2)
        q = np.bincount(bn.index(cand[:, i]), minlength=bn.n_bins + 2)
        out[f"f_layer_{i}"] = M.histogram_score(p, q, bn, seed=seed).separation_power
    return out


def particle_table(work: Path, mq_json: Path) -> dict[str, Any]:
    """The paper's observables for one particle: {observable: {calogan, floor}}, the AUCs and the costs."""
    mq = json.loads(mq_json.read_text())
    (key, model), = ((k, v) for k, v in mq["models"].items() if v.get("model", k) == "calogan")
    res, floor = model["tests"][TEST], mq["floor"][TEST]
    gen = work / "gen" / f"{key}-{model['minutes_budget']:g}min-{TEST}.h5"
    sp_model = {**res["separation_power"], **fraction_scores(work / "test.h5", gen)}
    sp_floor = {**floor["separation_power"], **fraction_scores(work / "test.h5", work / "floor.h5")}
    obs = {k: {"calogan": sp_model.get(k), "floor": sp_floor.get(k)} for k in PAPER + EXTRA}
    paper = {k: obs[k]["calogan"] for k in PAPER}
    return {
        "particle": mq["particle"],
        "n_train": mq["references"]["train"]["n"], "n_test": res["n_reference"], "n_floor": floor["n_candidate"],
        "cpu_minutes_training": model.get("used_minutes_total"), "steps": model.get("steps"),
        "stopped_early": model.get("stopped_early"), "hparams": model.get("hparams"),
        "auc_low": res.get("auc_low"), "auc_high": res.get("auc_high"),
        "floor_auc_low": floor.get("auc_low"), "floor_auc_high": floor.get("auc_high"),
        "generation_ms_per_shower": res.get("generation", {}).get("ms_per_shower"),
        "separation_power": obs,
        "at_most_target": sorted(k for k, v in paper.items() if v is not None and v <= TARGET),
        "above_target": {k: round(v, 3) for k, v in paper.items() if v is not None and v > TARGET},
        "source": {"workdir": str(work), "model_quality_json": str(mq_json)},
    }


def continued_run(work: Path, run_dir: Path, cpu_minutes: float) -> dict[str, Any]:
    """Score a run trained on past its benchmark budget (``fastshower train --resume --steps N`` on a copy of
    the benchmark's run folder) exactly as ``model_quality.py`` scores: as many showers as the test file, at
    its energy range, the same seeds; {observable: S} for the paper's observables, the AUCs, the steps."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from model_quality import generate_for, score

    gen = run_dir / "gen-uniform_1-100GeV.h5"
    generate_for(run_dir, work / "test.h5", "1:100", gen, seed=17)
    res = score(work / "test.h5", gen, run_dir / "eval", 3, 0)
    sp = {**res["separation_power"], **fraction_scores(work / "test.h5", gen)}
    steps = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line]
    return {"run": str(run_dir), "steps": max(steps), "cpu_minutes_training": cpu_minutes,
            "auc_low": res["auc_low"], "auc_high": res["auc_high"],
            "separation_power": {k: sp.get(k) for k in PAPER + EXTRA}}


def markdown(result: dict[str, Any]) -> str:
    """Observable rows, one (calogan, floor) column pair per particle; AUCs and costs at the bottom."""
    parts = result["particles"]
    head = ["observable", *[f"{p}: calogan | {p}: floor" for p in parts]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * (1 + 2 * len(parts))]

    def cell(v: float | None, bold: bool = False) -> str:
        if v is None:
            return "-"
        return f"**{v:.3f}**" if bold and v > TARGET else f"{v:.3f}"

    for k in PAPER + EXTRA:
        row = [k if k in PAPER else f"({k})"]
        for p in parts.values():
            s = p["separation_power"][k]
            row += [cell(s["calogan"], bold=k in PAPER), cell(s["floor"])]
        lines.append("| " + " | ".join(row) + " |")
    aucs = (("AUC low-level", "auc_low", "floor_auc_low"), ("AUC high-level", "auc_high", "floor_auc_high"))
    for label, a, b in aucs:
        row = [label]
        for p in parts.values():
            row += [cell(p[a]), cell(p[b])]
        lines.append("| " + " | ".join(row) + " |")
    row = ["training CPU-min (steps), showers train/test/floor"]
    for p in parts.values():
        row += [f"{p['cpu_minutes_training']} ({p['steps']})", f"{p['n_train']}/{p['n_test']}/{p['n_floor']}"]
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particle", nargs=3, action="append", required=True, metavar=("NAME", "WORKDIR", "MQ_JSON"),
                    help="a particle, the model_quality.py workdir of its run and that run's results JSON")
    ap.add_argument("--continued", nargs=4, action="append", default=[],
                    metavar=("PARTICLE", "WORKDIR", "RUN_DIR", "CPU_MINUTES"),
                    help="also score a run trained on past the budget (its total training CPU-minutes)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    result: dict[str, Any] = {
        "benchmark": "calogan_paper", "issue": "20 item 2", "detector": "calogan-3layer", "test": TEST,
        "paper": "Paganini, de Oliveira, Nachman, arXiv:1712.10321", "target_separation_power": TARGET,
        "observables": PAPER, "extra_observables": EXTRA,
        "notes": "f_layer_l = E_l / E_tot scored here (50 quantile bins of the reference); the others are "
                 "fastshower evaluate's separation powers; floor: a second independent Geant4 file vs the test file",
        "particles": {name: particle_table(Path(w), Path(j)) for name, w, j in args.particle},
        "continued_training": {p: continued_run(Path(w), Path(r), float(m)) for p, w, r, m in args.continued},
    }
    Path(args.out).write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(markdown(result))
    for p, c in result["continued_training"].items():
        vals = ", ".join(f"{k} {v:.3f}" for k, v in c["separation_power"].items() if v is not None)
        print(f"\n{p}, trained on to {c['steps']} steps ({c['cpu_minutes_training']} CPU-min): AUC low "
              f"{c['auc_low']:.3f} high {c['auc_high']:.3f}; {vals}")


if __name__ == "__main__":
    main()
