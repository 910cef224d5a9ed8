"""Speed against quality of a trained run's deployable versions: fewer ODE steps, a one-step student.

For each sampler setting (``--samplers`` STEPS:METHOD of the run's ODE; a distilled ``--student`` run has one
step):

- speed: :func:`fastshower.deploy.bench` of the ONNX FP32 export, batch ``--batch`` (100), one CPU thread,
  with Geant4 timed in the same run on the same spectrum (``--geant4 N`` showers, start-up removed);
- quality: as many showers as the ``--test`` file, over its energy spectrum and the same sampler (torch; the ONNX
  export equals it, tests/test_export.py), scored by :func:`fastshower.validate.evaluate` against ``--test``,
  with the floor (``--floor``: a second independent Geant4 file against the same test file) beside it.

Example (par04-ds2, the files of ``model_quality.py --detector par04-ds2``)::

    nice .venv/bin/python benchmarks/deployable.py --run /work/data/par04-ds2/runs/layer-fm-60min \\
        --test /work/data/par04-ds2/test.h5 --floor /work/data/par04-ds2/floor.h5 \\
        --samplers 16:midpoint 4:midpoint 8:euler \\
        --workdir /work/data/par04-ds2/deploy --out benchmarks/results/deployable_par04-ds2.json
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from fastshower.deploy.bench import bench  # noqa: E402
from fastshower.generation import generate  # noqa: E402
from fastshower.io import ShowerFile  # noqa: E402
from fastshower.runs import load_run  # noqa: E402
from fastshower.validate.evaluate import evaluate  # noqa: E402

METRICS = ["separation_power", "classifier_low", "classifier_high", "classifier_challenge", "response"]


def score(reference: Path, candidate: Path, out: Path, seed: int) -> dict[str, Any]:
    """The headline numbers of ``candidate`` against ``reference``."""
    m = evaluate(reference, candidate, out, metrics=METRICS, seed=seed, progress=False, report=False)
    sp = {k: v for k, v in m.get("separation_power", {}).items() if v is not None}
    worst = max(sp, key=lambda k: sp[k])
    return {
        "auc_low": m["classifier"]["low"]["auc"], "auc_high": m["classifier"]["high"]["auc"],
        "auc_high_calochallenge": m["classifier"].get("challenge", {}).get("auc"),
        "sep_E_tot/E_inc": sp.get("E_tot/E_inc"), "sep_mean": sum(sp.values()) / len(sp),
        "sep_max": sp[worst], "sep_max_observable": worst, "n_candidate": m["n_candidate"],
    }


def speed(run: Path, sampler: dict[str, Any], batch: int, geant4: int | dict[str, Any], workdir: Path
          ) -> dict[str, Any]:
    """ONNX FP32 ms per shower at ``batch`` on one thread (and torch's); ``geant4``: showers to time Geant4 on
    (0: none) or an earlier measurement to reuse."""
    timed = geant4 if isinstance(geant4, dict) else geant4 > 0
    rep = bench(run, workdir / "bench.json", batch_sizes=(batch,), threads=1, geant4=timed,
                backends=("torch-fp32", "onnx-fp32"), **sampler, n_geant4=geant4 if isinstance(geant4, int) else 200,
                print_table=False)
    ms = {r["backend"]: r["ms_per_shower"] for r in rep["results"]}
    return {"onnx_fp32_ms_per_shower": ms["onnx-fp32"], "torch_fp32_ms_per_shower": ms["torch-fp32"],
            "geant4": rep["geant4"]}


def setting(run: Path, sampler: dict[str, Any], args: argparse.Namespace, geant4: int | dict[str, Any],
            tag: str) -> dict[str, Any]:
    """Speed and quality of one sampler setting of ``run``."""
    work = Path(args.workdir) / tag
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"run": str(run), **sampler}
    res.update(speed(run, sampler, args.batch, geant4, work))
    with ShowerFile(args.test) as f:
        n, spec = f.n, str(f.attrs.get("energy_spec") or f"{f.energies().min() / 1e3}:{f.energies().max() / 1e3}")
    gen = work / "generated.h5"
    gen.unlink(missing_ok=True)
    t0 = time.perf_counter()
    generate(load_run(run), n, spec, out=gen, seed=args.seed,
             progress=False, batch_size=500, extrapolate=True, sample_options=sampler)
    res["generate_torch_ms_per_shower"] = 1e3 * (time.perf_counter() - t0) / n
    res["score"] = score(Path(args.test), gen, work / "eval", args.seed)
    print(f"[{time.strftime('%H:%M:%S')}] {tag}: ONNX {res['onnx_fp32_ms_per_shower']:.2f} ms/shower, "
          f"AUC low {res['score']['auc_low']:.3f} high {res['score']['auc_high']:.3f}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="finished run folder (layer-fm, flow-matching, flow)")
    ap.add_argument("--student", default=None, help="its one-step student (fastshower distill), optional")
    ap.add_argument("--test", required=True, help="held-out Geant4 file")
    ap.add_argument("--floor", required=True, help="a second independent Geant4 file (the floor)")
    ap.add_argument("--samplers", nargs="+", default=["16:midpoint", "4:midpoint", "8:euler"],
                    help="ODE samplers to try, STEPS:METHOD")
    ap.add_argument("--batch", type=int, default=100, help="showers per ONNX call (default 100)")
    ap.add_argument("--geant4", type=int, default=40, help="Geant4 showers timed (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True, help="results JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    if old.get("test") == args.test and old.get("batch") == args.batch:  # resume: keep what was measured
        result: dict[str, Any] = old
    else:
        floor = score(Path(args.test), Path(args.floor), Path(args.workdir) / "floor", args.seed)
        result = {"benchmark": "deployable", "test": args.test, "batch": args.batch, "threads": 1, "floor": floor,
                  "settings": []}
    done = {s.get("tag") for s in result["settings"]}
    geant4: int | dict[str, Any] = next((s["geant4"] for s in result["settings"] if s.get("geant4")), args.geant4)
    runs = [(Path(args.run), {"steps": int(s.split(":")[0]), "method": s.split(":")[1]}, s.replace(":", "-"))
            for s in args.samplers]
    if args.student:
        runs.append((Path(args.student), {}, "student"))
    for run, sampler, tag in runs:
        if tag in done:
            continue
        entry = {"tag": tag, **setting(run, sampler, args, geant4, tag)}
        geant4 = entry["geant4"] or 0  # timed once, reused (marked) by the other settings
        result["settings"].append(entry)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
