"""Generation speed against Geant4 in CPU seconds, for a shared machine (issue 18 item 4).

:func:`fastshower.deploy.bench` (``benchmarks/bench_generation.py``) times wall clocks; on a machine whose
cores other jobs share, a process gets a fluctuating fraction of a core and wall times follow the load.
This script measures the same things in CPU time of the process that does the work, in one run:

- Geant4: two productions of the run's geometry, particle and energy spectrum (``--g4-startup`` then
  ``--g4-showers`` showers, one worker); the worker's CPU seconds (``RUSAGE_CHILDREN``) of the larger minus the
  smaller, over the difference of counts, removes start-up, geometry and physics tables;
- the run's sampler exported to ONNX FP32, dynamic INT8 and static INT8 (:func:`fastshower.deploy.export_onnx`),
  ONNX Runtime on one thread, ``process_time`` per call at each batch size (median of repeats after a
  warm-up), inputs as :func:`fastshower.deploy.bench` draws them (noise, energies over the training range);
- with ``--reference``: the INT8 change of quality, ``--quality-showers`` showers from each ONNX file (the same
  seed: the same energies and noise) scored against the Geant4 reference: every separation power of
  :func:`fastshower.validate.evaluate` and the 3DGAN papers' x/y/z profile and moment separations
  (``projections``), each precision's value and INT8 - FP32.

Example::

    nice .venv/bin/python benchmarks/speed_cpu.py --run /work/data/siw-51x51x25/runs/3dgan-45min \\
        --batch-sizes 1,100,10000 --out benchmarks/results/speed_cpu_siw-51x51x25_3dgan.json
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from fastshower.deploy import export_onnx, load_onnx  # noqa: E402
from fastshower.montecarlo.run import simulate  # noqa: E402
from fastshower.runs import load_run  # noqa: E402
from fastshower.sampling import draw_noise  # noqa: E402

#: the 3DGAN papers' speed-ups over Geant4 on a Xeon (Rehm et al., arXiv:2103.13698): FP32 and INT8
PAPERS = {"fp32": 38_000, "int8": 68_000}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def geant4_cpu(info: Any, n_startup: int, n: int, seed: int) -> dict[str, Any]:
    """Geant4 CPU and wall seconds per shower of the run's geometry, particle and spectrum (one worker)."""
    lo, hi = info.energy_range_mev
    spec = f"{lo / 1e3:g}:{hi / 1e3:g}"
    out: dict[str, Any] = {"energy_spec_gev": spec, "particle": info.particle, "n_startup": n_startup, "n": n}
    with tempfile.TemporaryDirectory(prefix="speed-cpu-g4-") as tmp:
        cpu, wall = [], []
        for k, m in enumerate((n_startup, n)):
            c0 = _children_cpu()
            res = simulate(info.geometry, info.particle, spec, m, Path(tmp) / f"g4_{k}.h5", seed=seed + k, jobs=1,
                           progress=False)
            cpu.append(_children_cpu() - c0)
            wall.append(res.seconds)
    out["cpu_s"], out["wall_s"] = cpu, wall
    out["cpu_ms_per_shower"] = 1e3 * (cpu[1] - cpu[0]) / (n - n_startup)
    out["wall_ms_per_shower"] = 1e3 * (wall[1] - wall[0]) / (n - n_startup)
    return out


def time_onnx(path: Path, run: Any, batch: int, repeats: int, budget_s: float, seed: int) -> dict[str, Any]:
    """CPU and wall ms per shower of one ONNX file at one batch size (one thread)."""
    sampler = load_onnx(path, run, threads=1)
    info = run[2]
    rng = np.random.default_rng(seed)
    lo, hi = info.energy_range_mev
    e = rng.uniform(lo, hi, batch)
    conds = {k: np.zeros((batch, w), np.float32) for k, w in zip(info.cond_names, info.cond_widths, strict=True)}
    import torch

    z = draw_noise(run[0], batch, torch.Generator().manual_seed(seed)).numpy()
    sampler(z, e, conds)  # warm-up
    cpu, wall = [], []
    t_start = time.perf_counter()
    while len(cpu) < repeats:
        c0, w0 = time.process_time(), time.perf_counter()
        sampler(z, e, conds)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        if time.perf_counter() - t_start > budget_s:
            break
    return {"batch_size": batch, "cpu_ms_per_shower": 1e3 * statistics.median(cpu) / batch,
            "wall_ms_per_shower": 1e3 * statistics.median(wall) / batch, "repeats": len(cpu),
            "process_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def quality(run_dir: str, files: dict[str, Path], reference: Path, n: int, seed: int, tmp: Path) -> dict[str, Any]:
    """Separation powers (all observables, and the papers' profiles and moments as ``profile_x``, ``mean_x`` ...)
    of ``n`` showers of each ONNX file against ``reference`` (energies: the reference's spectrum), and the
    change INT8 - FP32 of each."""
    from fastshower.generation import generate
    from fastshower.io import ShowerFile
    from fastshower.validate.evaluate import evaluate

    with ShowerFile(reference) as f:  # the file's energy spec, else the range of its energies
        e = f.energies()
        spec = str(f.attrs.get("energy_spec") or f"{float(e.min()) / 1e3:g}:{float(e.max()) / 1e3:g}")
    scores: dict[str, dict[str, float]] = {}
    for prec, path in files.items():
        gen = generate(run_dir, n, spec, out=tmp / f"q-{prec}.h5", seed=seed, progress=False, backend="onnx",
                       onnx_path=path, batch_size=100)
        m = evaluate(reference, gen, tmp / f"eval-{prec}", metrics=["separation_power", "projections"], seed=seed,
                     progress=False, report=False)
        sp = {k: float(v) for k, v in m["separation_power"].items() if v is not None}
        pr = m["projections"]
        sp.update({f"profile_{ax}": float(v["separation_power"]) for ax, v in pr["profiles"].items()})
        sp.update({k: float(v["separation_power"]) for k, v in pr["moments"].items()})
        scores[prec] = sp
        print(prec, "quality:", {k: round(sp[k], 4) for k in sp if k.startswith(("profile_", "E_tot"))}, flush=True)
    change = {p: {k: scores[p][k] - v for k, v in scores["fp32"].items() if k in scores[p]}
              for p in scores if p != "fp32"}
    worst = {p: max(d, key=lambda k: abs(d[k])) for p, d in change.items()}
    return {"reference": str(reference), "energy_spec_gev": spec, "n_showers": n, "seed": seed,
            "separation_power": scores, "int8_minus_fp32": change,
            "largest_change": {p: [k, change[p][k]] for p, k in worst.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--batch-sizes", default="1,100,10000")
    ap.add_argument("--precisions", default="fp32,int8-dynamic,int8-static")
    ap.add_argument("--g4-startup", type=int, default=5)
    ap.add_argument("--g4-showers", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", default=None, help="Geant4 file for the INT8 change of quality (default: none)")
    ap.add_argument("--quality-showers", type=int, default=500)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    run = load_run(args.run)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    result: dict[str, Any] = {"run": args.run, "model": run[2].model_name, "geometry": run[2].geometry.name,
                              "load_average_start": list(os.getloadavg()), "papers_speedup": PAPERS, "onnx": {}}
    with tempfile.TemporaryDirectory(prefix="speed-cpu-") as tmp:
        for prec in args.precisions.split(","):
            path = Path(tmp) / f"{prec}.onnx"
            int8 = prec.startswith("int8")
            export_onnx(args.run, path, int8=int8, int8_mode=prec.split("-")[1] if int8 else None)
            result["onnx"][prec] = [time_onnx(path, run, b, args.repeats, args.budget_s, args.seed) for b in sizes]
            print(prec, json.dumps(result["onnx"][prec]), flush=True)
        if args.reference:
            files = {p: Path(tmp) / f"{p}.onnx" for p in result["onnx"]}
            result["int8_quality"] = quality(args.run, files, Path(args.reference), args.quality_showers, args.seed,
                                             Path(tmp))
    g4 = geant4_cpu(run[2], args.g4_startup, args.g4_showers, args.seed)
    result["geant4"] = g4
    print("geant4", json.dumps(g4), flush=True)
    result["speedup_cpu"] = {p: {str(r["batch_size"]): g4["cpu_ms_per_shower"] / r["cpu_ms_per_shower"] for r in rows}
                             for p, rows in result["onnx"].items()}
    result["speedup_wall"] = {p: {str(r["batch_size"]): g4["wall_ms_per_shower"] / r["wall_ms_per_shower"]
                                  for r in rows} for p, rows in result["onnx"].items()}
    result["load_average_end"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"speedup_cpu": result["speedup_cpu"], "speedup_wall": result["speedup_wall"]}, indent=1))


if __name__ == "__main__":
    main()
