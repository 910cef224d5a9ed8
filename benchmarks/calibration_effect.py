"""What layer-fm's post-training maps buy on a finished run: the same run scored without and with them.

``train`` now fits the map at the end of training (:meth:`~fastshower.models.layer_fm.LayerFlowMatching.calibrate`);
runs trained before it generate without one. This script takes such a run, copies it to ``<run>-calibrated``,
fits the map there with :func:`fastshower.training.calibrate_run` (CPU-seconds recorded), and generates and
scores both the same way as ``model_quality.py`` (same seed, the test file's spectrum ``--energy``, the floor
beside them).
``--maps layers|rings|all`` also turns on layer-fm's layer (and ring) maps (``maps``, an option that acts only after
training) in the copy's config before calibrating, so a run trained without them can be measured with them.
The uncalibrated scores are read from ``model_quality.py``'s JSON for that run when given, else computed.
Finished steps are reused, so a killed benchmark restarts where it stopped::

    nice .venv/bin/python benchmarks/calibration_effect.py --workdir /work/data/par04-ds2-v4 \\
        --run layer-fm-60min --quality /work/data/par04-ds2-v4/mq.json \\
        --out benchmarks/results/calibration_effect_par04-ds2.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fastshower.io import ShowerFile
from fastshower.runs import read_json
from fastshower.training import CALIBRATION_SHOWERS, calibrate_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_quality as mq  # the same generation and scoring as the quality table


def calibrated_copy(run: Path, maps: str | None = None, suffix: str = "", hparams: dict[str, Any] | None = None,
                    showers: int = CALIBRATION_SHOWERS) -> tuple[Path, dict[str, Any]]:
    """``<run>-calibrated`` (``<run>-maps-<maps>`` with ``maps``), then ``suffix``, with its maps fitted on
    ``showers`` training showers (reused when its meta.json records them); ``hparams``: other post-training options
    set in the copy's config (layer-fm's ``layer_knots``)."""
    dst = run.with_name(run.name + (f"-maps-{maps}" if maps else "-calibrated") + suffix)
    if dst.exists() and "calibration" in read_json(dst / "meta.json"):
        return dst, dict(read_json(dst / "meta.json")["calibration"])
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(run, dst)
    if maps or hparams:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["hparams"].update({**({"maps": maps} if maps else {}), **(hparams or {})})
        (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    c0 = time.process_time()
    stats: dict[str, Any] = dict(calibrate_run(dst, n=showers))
    stats["cpu_seconds"] = round(time.process_time() - c0, 1)
    return dst, stats


def scored(work: Path, run: Path, test: Path, energy: str, n_layers: int, seed: int) -> dict[str, Any]:
    """Generate (unless done) as many showers as ``test`` over ``energy`` (its spectrum) and score them."""
    gen = work / "gen" / f"{run.name}.h5"
    gen.parent.mkdir(exist_ok=True)
    with ShowerFile(test) as f:
        n = f.n
    out: dict[str, Any] = {}
    if not mq.complete(gen, n):
        out["generation"] = mq.generate_for(run, test, energy, gen, seed=seed + 17)
    out["scores"] = mq.score(test, gen, work / "eval" / run.name, n_layers, seed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="holds test.h5, floor.h5 and runs/RUN (model_quality.py's)")
    ap.add_argument("--run", required=True, help="run folder name under WORKDIR/runs")
    ap.add_argument("--quality", default=None, help="model_quality.py's JSON holding this run's uncalibrated scores")
    ap.add_argument("--energy", default="1:100:log", help="the test file's spectrum (default: par04-ds2's)")
    ap.add_argument("--maps", choices=("layers", "rings", "all"), default=None,
                    help="also fit layer-fm's maps in the copy")
    ap.add_argument("--suffix", default="", help="appended to the calibrated copy's name (a refit beside another)")
    ap.add_argument("--hparams", type=json.loads, default=None,
                    help='other post-training options set in the copy\'s config, e.g. \'{"layer_knots": 5}\'')
    ap.add_argument("--showers", type=int, default=CALIBRATION_SHOWERS,
                    help=f"training showers the maps are fitted on (default: train's {CALIBRATION_SHOWERS})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work, run = Path(args.workdir), Path(args.workdir) / "runs" / args.run
    test = work / "test.h5"
    with ShowerFile(test) as f:
        n_layers = f.geometry.n_layers
    result: dict[str, Any] = {"machine": mq.machine_info(), "run": str(run), "test": str(test)}
    if args.quality:
        q = json.loads(Path(args.quality).read_text())
        result["floor"], result["uncalibrated"] = q.get("floor"), q.get("models")
    else:
        result["uncalibrated"] = scored(work, run, test, args.energy, n_layers, args.seed)
        if (work / "floor.h5").exists():  # a second Geant4 file against the same test file
            result["floor"] = mq.score(test, work / "floor.h5", work / "eval" / "floor", n_layers, args.seed)
    cal, result["calibration"] = calibrated_copy(run, args.maps, args.suffix, args.hparams, args.showers)
    result["calibrated"] = scored(work, cal, test, args.energy, n_layers, args.seed)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    s = result["calibrated"]["scores"]
    mq.log(f"calibrated: AUC low {s['auc_low']:.3f} high {s['auc_high']:.3f} "
           f"(CaloChallenge set {s.get('auc_high_calochallenge')}) mean S {s['sep_mean']:.3f}")


if __name__ == "__main__":
    main()
