"""Geant4 reference cost: seconds per shower per geometry at 1, 10 and 50 GeV, with 1 and 2 worker processes.

Each point runs the production driver (fastshower.montecarlo.run.simulate) twice: once on a single chunk to
measure the start-up (process spawn, Geant4 initialisation, physics tables) and once on N showers; the cost
per shower is (T_N - T_startup) / N, and the throughput with J jobs is N / (T_N - T_startup) showers/s.

    python benchmarks/simulate_speed.py [--geometries a,b] [--energies 1,10,50] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from fastshower import __version__
from fastshower.geometry import get_geometry
from fastshower.montecarlo.run import simulate

GEOMETRIES = ("belle2-ecl-5x5", "calogan-3layer", "ild-siw-30", "par04-ds2", "par04-ds3", "siw-51x51x25")
PARTICLE = {"belle2-ecl-5x5": "e-", "calogan-3layer": "e+", "ild-siw-30": "gamma", "par04-ds2": "e-",
            "par04-ds3": "e-", "siw-51x51x25": "e-"}
# showers per point: enough for the per-shower time to dominate the start-up, affordable on 2 cores
N_AT = {1.0: 40, 10.0: 12, 50.0: 4}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _timed(geometry: str, energy: float, n: int, jobs: int, workdir: Path, tag: str) -> tuple[float, str]:
    out = workdir / f"{geometry}_{energy:g}_{jobs}_{tag}.h5"
    t0 = time.perf_counter()
    res = simulate(geometry, PARTICLE[geometry], f"{energy:g}", n, out, seed=1, jobs=jobs,
                   chunk_size=max(1, -(-n // jobs)), progress=False)
    seconds = time.perf_counter() - t0
    out.unlink()
    return seconds, res.generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometries", default=",".join(GEOMETRIES))
    ap.add_argument("--energies", default="1,10,50", help="GeV")
    ap.add_argument("--jobs", default="1,2")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "simulate_speed.json"))
    args = ap.parse_args()
    energies = [float(e) for e in args.energies.split(",")]
    rows = []
    generator = ""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for geometry in args.geometries.split(","):
            get_geometry(geometry)  # fail early on a typo
            for jobs in (int(j) for j in args.jobs.split(",")):
                startup, _ = _timed(geometry, 1.0, jobs, jobs, workdir, "startup")  # one 1 GeV shower per worker
                for energy in energies:
                    n = N_AT.get(energy, 8) * jobs
                    total, generator = _timed(geometry, energy, n, jobs, workdir, "run")
                    per = max(total - startup, 1e-9) / n
                    row = {"geometry": geometry, "particle": PARTICLE[geometry], "energy_gev": energy, "jobs": jobs,
                           "n": n, "startup_s": round(startup, 3), "total_s": round(total, 3),
                           "wall_s_per_shower": round(per, 5), "core_s_per_shower": round(per * jobs, 5),
                           "ms_per_gev_per_core": round(1e3 * per * jobs / energy, 3)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    result = {
        "benchmark": "simulate_speed",
        "fastshower_version": __version__,
        "geant4": generator,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    # other work on the machine slows every figure: keep the load beside them
                    "load_average_1_5_15_min_at_end": list(os.getloadavg())},
        "method": __doc__.strip().splitlines()[2],
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
