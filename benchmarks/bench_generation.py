"""Generation speed against Geant4, INT8 vs FP32, and the physics cost of quantisation, in one run.

For each trained run given: :func:`fastshower.deploy.bench` (torch FP32, ONNX FP32, ONNX INT8 at
each batch size; the Geant4 time per shower of the same geometry, particle and energy spectrum is
measured once in this process and shared by all runs), an ONNX Runtime per-op profile, optional
flow-matching step sweeps (ONNX FP32 at the largest batch), and, given a Geant4 reference file,
the separation powers of torch FP32, ONNX FP32 and ONNX INT8 samples (same seed) against it with
the change INT8 - FP32 per observable. Targets (DESIGN.md section 8 / the export issue): speed-up over
Geant4 >= 1e4 at the largest batch on one thread, INT8 >= 1.5x faster than FP32.

Usage::

    python benchmarks/bench_generation.py --run runs/fm --run runs/vae --geant4 --reference belle.h5 \\
        --batch-sizes 1,100,10000 --threads 1 --tag belle2 [--fm-steps 4,8]

writes ``benchmarks/results/bench_generation_<tag>.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fastshower.deploy import bench, export_onnx, format_table
from fastshower.generation import generate
from fastshower.runs import load_run

SPEEDUP_TARGET = 1e4
INT8_TARGET = 1.5
ETOT_INT8_TOLERANCE = 0.01


def physics_check(run: str, reference: str, n: int, energy: str, seed: int = 0) -> dict[str, Any]:
    """Separation powers vs ``reference`` of n showers from torch FP32, ONNX FP32 and ONNX INT8 (same seed)."""
    from fastshower.validate.evaluate import evaluate

    out: dict[str, Any] = {"n": n, "energy": energy, "seed": seed, "separation_power": {}}
    with tempfile.TemporaryDirectory(prefix="bench-phys-") as tmp:
        static = export_onnx(run, Path(tmp) / "static.onnx", int8=True, int8_mode="static")
        for label, kw in (("torch-fp32", {}), ("onnx-fp32", {"backend": "onnx"}),
                          ("onnx-int8", {"backend": "onnx", "int8": True}),
                          ("onnx-int8-static", {"backend": "onnx", "onnx_path": static})):
            f = generate(run, n, energy, out=Path(tmp) / f"{label}.h5", seed=seed, progress=False, **kw)
            res = evaluate(reference, f, Path(tmp) / f"eval-{label}", metrics=["separation_power"], seed=seed,
                           progress=False, report=False)
            out["separation_power"][label] = res["separation_power"]
    sp = out["separation_power"]
    out["int8_minus_fp32"] = {k: sp["onnx-int8"][k] - sp["onnx-fp32"][k] for k in sp["onnx-fp32"]}
    out["int8_static_minus_fp32"] = {k: sp["onnx-int8-static"][k] - sp["onnx-fp32"][k] for k in sp["onnx-fp32"]}
    out["onnx_fp32_minus_torch"] = {k: sp["onnx-fp32"][k] - sp["torch-fp32"][k] for k in sp["onnx-fp32"]}
    for key, diff in (("etot_int8_within_tolerance", "int8_minus_fp32"),
                      ("etot_int8_static_within_tolerance", "int8_static_minus_fp32")):
        d = out[diff].get("E_tot/E_inc")
        out[key] = None if d is None else bool(abs(d) <= ETOT_INT8_TOLERANCE)
    return out


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """Pass/fail of the speed targets at the largest batch size of a bench report."""
    big = max(r["batch_size"] for r in report["results"])
    sp = report.get("speedup_vs_geant4") or {}
    best = max((row.get(str(big), 0.0) for row in sp.values()), default=None)
    ratios = [r for r in (report["int8_vs_fp32"].get(str(big)),
                          (report.get("int8_static_vs_fp32") or {}).get(str(big))) if r is not None]
    ratio = max(ratios, default=None)  # the faster of dynamic and static INT8
    return {
        "batch_size": big,
        "best_speedup_vs_geant4": best,
        "speedup_target": SPEEDUP_TARGET,
        "speedup_met": None if best is None else bool(best >= SPEEDUP_TARGET),
        "int8_vs_fp32": ratio,
        "int8_target": INT8_TARGET,
        "int8_met": None if ratio is None else bool(ratio >= INT8_TARGET),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="trained run folder (repeatable)")
    p.add_argument("--geant4", action="store_true")
    p.add_argument("--n-geant4", type=int, default=200)
    p.add_argument("--reference", default=None, help="Geant4 shower file for the INT8 physics check")
    p.add_argument("--physics-n", type=int, default=4000)
    p.add_argument("--physics-energy", default="0.5,1,1.5,2.5",
                   help="energy spec of the physics check (inside the run's training range)")
    p.add_argument("--batch-sizes", default="1,100,10000")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=15.0)
    p.add_argument("--fm-steps", default="", help="extra flow-matching ODE step counts to time (ONNX FP32/INT8)")
    p.add_argument("--backends", default="torch-fp32,onnx-fp32,onnx-int8,onnx-int8-static")
    p.add_argument("--tag", default="belle2")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    big = max(sizes)
    summary: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": []}
    g4: Any = args.geant4
    for run in args.run:
        rep = bench(run, batch_sizes=sizes, threads=args.threads, geant4=g4, repeats=args.repeats,
                    budget_s=args.budget_s, n_geant4=args.n_geant4, profile_batch=min(big, 1000),
                    backends=[b for b in args.backends.split(",") if b])
        if rep["geant4"] is not None and not rep["geant4"].get("reused"):
            g4 = rep["geant4"]
        entry: dict[str, Any] = {"bench": rep, "targets": targets(rep)}
        model = rep["run"]["model"]
        if model == "flow-matching" and args.fm_steps:
            sweep = []
            for steps in [int(s) for s in args.fm_steps.split(",") if s]:
                r = bench(run, batch_sizes=[big], threads=args.threads, geant4=g4 or False, repeats=args.repeats,
                          budget_s=args.budget_s, steps=steps, backends=("onnx-fp32", "onnx-int8"),
                          print_table=True)
                sweep.append({"steps": steps, "results": r["results"], "speedup_vs_geant4": r["speedup_vs_geant4"],
                              "int8_vs_fp32": r["int8_vs_fp32"]})
            entry["flow_matching_step_sweep"] = sweep
        if model == "flow-matching":
            ms = {(r["backend"], r["batch_size"]): r["ms_per_shower"] for r in rep["results"]}
            steps = rep["run"]["sample_options"]["steps"]
            evals = steps * (2 if rep["run"]["sample_options"]["method"] in ("midpoint", "heun") else 1)
            entry["per_ode_step"] = {
                be: {"ms_per_shower_per_step": ms[(be, big)] / steps,
                     "ms_per_shower_per_network_evaluation": ms[(be, big)] / evals}
                for be in ("torch-fp32", "onnx-fp32", "onnx-int8") if (be, big) in ms
            }
            entry["per_ode_step"]["steps"] = steps
            entry["per_ode_step"]["network_evaluations"] = evals
            net = load_run(run)[0].net
            entry["per_ode_step"]["n_parameters_velocity_net"] = sum(p.numel() for p in net.parameters())
        summary["runs"].append(entry)
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        out_json = out_dir / f"bench_generation_{args.tag}.json"
        out_json.write_text(json.dumps(summary, indent=2) + "\n")  # timings kept even if the physics check fails
        if args.reference:
            entry["physics"] = physics_check(run, args.reference, args.physics_n, args.physics_energy)
            out_json.write_text(json.dumps(summary, indent=2) + "\n")

    print("\n=== summary ===")
    for entry in summary["runs"]:
        print(format_table(entry["bench"]))
        print("targets:", json.dumps(entry["targets"]))
        if "physics" in entry:
            d = entry["physics"]["int8_minus_fp32"]
            print("separation power INT8 - FP32:", json.dumps({k: round(v, 4) for k, v in d.items()}))
            print("separation power ONNX FP32 - torch:",
                  json.dumps({k: round(v, 5) for k, v in entry["physics"]["onnx_fp32_minus_torch"].items()}))
        print()


if __name__ == "__main__":
    main()
