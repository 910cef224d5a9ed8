"""The end-to-end demo: Belle II 5x5 CsI, Geant4 -> flow matching -> generated showers -> report.

Stages (each shows progress and is skipped when its output is already complete, so
re-running the demo after an interruption continues where it stopped):

1. simulate the Geant4 training sample: e- at 0.5, 1.0, 1.5 and 2.5 GeV;
2. simulate two test samples: the held-out 2.0 GeV (interpolation) and a fresh
   sample at the training energies;
3. train the default model (flow matching);
4. generate as many showers as each test sample holds, at the same energies;
5. evaluate both against Geant4 (with the Geant4-vs-Geant4 floor) and write
   ``summary.json`` beside the two reports.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastshower.io import ShowerFile, ShowerFileError

__all__ = ["DemoSettings", "run_demo"]

GEOMETRY = "belle2-ecl-5x5"
PARTICLE = "e-"
TRAIN_ENERGIES = "0.5,1,1.5,2.5"
HELD_OUT_ENERGY = "2.0"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo. The full one fits in 15 minutes on 2 cores, the quick one in about 2."""

    n_train: int
    n_test: int
    steps: int
    batch_size: int = 256

    @classmethod
    def for_mode(cls, quick: bool) -> DemoSettings:
        return cls(n_train=3000, n_test=1000, steps=500) if quick else cls(n_train=20000, n_test=4000, steps=5000)


def _stage(title: str) -> None:
    print(f"\n== {title}", file=sys.stderr, flush=True)


def _complete(path: Path, n: int) -> bool:
    try:
        with ShowerFile(path, require_complete=False) as f:
            return f.complete and f.n >= n
    except ShowerFileError:
        return False


def _simulate(out: Path, energy: str, n: int, seed: int, jobs: int) -> None:
    from fastshower.montecarlo.run import simulate

    if _complete(out, n):
        print(f"   {out} is complete: kept", file=sys.stderr)
        return
    res = simulate(GEOMETRY, PARTICLE, energy, n, out, seed=seed, jobs=jobs, resume=out.exists(), progress=True)
    print(f"   {res.n_written} Geant4 showers in {res.seconds:.0f} s "
          f"({1e3 * res.seconds / max(res.n_new, 1) * jobs:.1f} ms per shower per core)", file=sys.stderr)


def _train(data: Path, run: Path, settings: DemoSettings, seed: int) -> float:
    import torch

    from fastshower.training import train

    meta = run / "meta.json"
    if meta.exists() and json.loads(meta.read_text()).get("status") == "finished":
        print(f"   {run} is trained: kept", file=sys.stderr)
        return 0.0
    # One intra-op thread: the networks are small and the second core is better used elsewhere; more threads
    # were measured ~10x slower on a loaded 2-core machine.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train(data, model="flow-matching", out=run, steps=settings.steps, batch_size=settings.batch_size, seed=seed,
          resume=(run / "checkpoints").exists(), progress=True)
    return time.perf_counter() - t0


def run_demo(out: str | Path = "demo-output", quick: bool = False, seed: int = 0, jobs: int = 2,
             settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the whole chain and return the summary (also written to ``out/summary.json``).

    ``settings`` overrides the sizes that ``quick`` picks (the tests run a tiny demo this way).
    """
    from fastshower.generation import generate
    from fastshower.validate.evaluate import evaluate
    from fastshower.validate.verdict import headline

    t_start = time.perf_counter()
    settings = settings or DemoSettings.for_mode(quick)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_file, test_file, held_file = out / "g4_train.h5", out / "g4_test.h5", out / "g4_2GeV.h5"
    run = out / "run-flow-matching"
    timings: dict[str, float] = {}

    _stage(f"1/5 Geant4: {settings.n_train} {PARTICLE} showers in {GEOMETRY} at {TRAIN_ENERGIES} GeV (training)")
    t = time.perf_counter()
    _simulate(train_file, TRAIN_ENERGIES, settings.n_train, seed, jobs)
    _stage(f"2/5 Geant4 test samples: {settings.n_test} at {TRAIN_ENERGIES} GeV and {settings.n_test} at the "
           f"held-out {HELD_OUT_ENERGY} GeV")
    _simulate(test_file, TRAIN_ENERGIES, settings.n_test, seed + 1, jobs)
    _simulate(held_file, HELD_OUT_ENERGY, settings.n_test, seed + 2, jobs)
    timings["geant4_s"] = time.perf_counter() - t

    _stage(f"3/5 training flow matching for {settings.steps} steps")
    timings["train_s"] = _train(train_file, run, settings, seed)

    _stage("4/5 generating")
    t = time.perf_counter()
    gen_test, gen_held = out / "gen_test.h5", out / "gen_2GeV.h5"
    for path, energy in ((gen_test, TRAIN_ENERGIES), (gen_held, HELD_OUT_ENERGY)):
        if path.exists():
            path.unlink()  # cheap to redo, and a changed run must not leave stale showers
        generate(run, settings.n_test, energy, out=path, seed=seed, progress=True)
    timings["generate_s"] = time.perf_counter() - t

    _stage("5/5 evaluating against Geant4 (with the Geant4-vs-Geant4 floor)")
    t = time.perf_counter()
    results = {}
    for name, ref, cand in (("training_energies", test_file, gen_test), ("held_out_2GeV", held_file, gen_held)):
        results[name] = evaluate(ref, cand, out / f"report_{name}", seed=seed, floor=True, progress=True)
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    summary = {
        "settings": asdict(settings) | {"quick": quick, "seed": seed, "jobs": jobs},
        "timings": timings,
        "scores": {name: _scores(r) for name, r in results.items()},
        "reports": {name: str(out / f"report_{name}" / "report.html") for name in results},
        "verdicts": {name: headline(r) for name, r in results.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    return summary


def _scores(r: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one evaluation and its floor."""

    def pick(d: dict[str, Any]) -> dict[str, Any]:
        sp = d.get("separation_power", {})
        e_ratio = sp.get("E_tot/E_inc")
        return {
            "low_level_auc": d.get("classifier", {}).get("low", {}).get("auc"),
            "high_level_auc": d.get("classifier", {}).get("high", {}).get("auc"),
            "fpd_x1e3": d.get("fpd", {}).get("value"),
            "kpd_x1e3": d.get("kpd", {}).get("value"),
            "separation_power_Evis_over_Einc": e_ratio,
            "max_separation_power": max(sp.values(), default=None, key=lambda v: -1 if v is None else v),
        }

    return {"model": pick(r), "geant4_floor": pick(r.get("floor", {})), "n_reference": r.get("n_reference"),
            "n_candidate": r.get("n_candidate")}


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


#: how to read the demo's table, printed under it
_READING = ("good: a model row close to its geant4_floor row (the same score between two halves of the Geant4 "
            "sample); AUC 0.5 = indistinguishable from Geant4, 1 = told apart every time; FPD, KPD and S: 0 = same")


def _print_summary(summary: dict[str, Any]) -> None:
    """The closing table: scores of the model and of the Geant4 floor per sample, what is good or
    bad, the verdict of each sample and the reports to open."""
    print("\nfastshower demo: flow matching vs Geant4 on belle2-ecl-5x5 (e-)")
    print(f"{'sample':20s} {'':12s} {'AUC low':>8s} {'AUC high':>9s} {'FPDx1e3':>8s} {'KPDx1e3':>8s} "
          f"{'S(Evis/E)':>9s}")
    for name, s in summary["scores"].items():
        for who in ("model", "geant4_floor"):
            v = s[who]
            cells = [_fmt(v[k]) for k in ("low_level_auc", "high_level_auc", "fpd_x1e3", "kpd_x1e3",
                                          "separation_power_Evis_over_Einc")]
            print(f"{name:20s} {who:12s} {cells[0]:>8s} {cells[1]:>9s} {cells[2]:>8s} {cells[3]:>8s} {cells[4]:>9s}")
    t = summary["timings"]
    print(f"time: Geant4 {t['geant4_s']:.0f} s, training {t['train_s']:.0f} s, generation {t['generate_s']:.0f} s, "
          f"evaluation {t['evaluate_s']:.0f} s, total {t['total_s'] / 60:.1f} min")
    print(_READING)
    for name, text in summary.get("verdicts", {}).items():
        print(f"{name}: {text}")
    for path in summary["reports"].values():
        print(f"open {path}")
