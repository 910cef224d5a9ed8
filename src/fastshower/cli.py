"""The ``fastshower`` command: a thin layer over the Python API.

Every sub-command parses its arguments, calls one API function and prints a short summary.
Its options map one-to-one to the function's arguments (``--batch-size`` -> ``batch_size``).
Bad input, anything the API rejects with a :class:`fastshower.errors.FastshowerError` or the
operating system refuses (a missing file, a read-only or full disk), prints one line
``fastshower: error: ...`` and exits with 2 (:func:`main` is the one place that does this);
Ctrl-C exits with 130 after the API has kept what was finished.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastshower._version import __version__
from fastshower.config import default_threads
from fastshower.errors import FastshowerError

__all__ = ["MODEL_NAMES", "build_parser", "main"]

#: the trainable models, the default first, as ``fastshower.models.available_models()`` lists them (a test
#: checks the two agree); written out so that ``fastshower --help`` does not import torch
MODEL_NAMES = ("flow-matching", "3dgan", "calogan", "flow", "layer-fm", "vae", "wgan-gp")

#: operating-system errors that mean bad input or a full or read-only disk, not a bug
_USER_OS_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                   errno.EDQUOT, errno.EISDIR, errno.ENOTDIR}


# --- sub-commands ------------------------------------------------------------------------


def _cmd_geometries(args: argparse.Namespace) -> int:
    from fastshower.geometry import get_geometry, list_geometries

    if args.name:
        print(get_geometry(args.name).summary())
        return 0
    print(f"{'name':20s} {'voxels':>7s}  description")
    for g in list_geometries():
        print(f"{g.name:20s} {g.n_voxels:7d}  {g.description}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from fastshower.io import ShowerFile

    with ShowerFile(args.file, require_complete=False) as f:
        print(f.describe())
        if args.check:
            f.check()
            print("values:     all finite and non-negative")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from fastshower.errors import ConfigError
    from fastshower.io import LEGACY_LAYOUT, convert_3dgan, convert_calogan, convert_conventions

    if args.layout == "calogan":
        out = convert_calogan(args.input, args.out, particle=args.particle or "e+")
    elif args.layout == LEGACY_LAYOUT:
        if args.particle is not None:
            raise ConfigError(f"--particle does not apply to --layout {LEGACY_LAYOUT}: the file names its particle")
        out = convert_conventions(args.input, args.out)
    else:
        out = convert_3dgan(args.input, args.out, particle=args.particle or "e-", unit_mev=args.ecal_unit_mev)
    print(f"wrote {out}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from fastshower.io import merge_files

    if args.fill_below_ground:
        from fastshower.airshower import prepare_training_file

        out = prepare_training_file(args.inputs, args.out, resume=args.resume)
    else:
        out = merge_files(args.inputs, args.out, add_condition=args.condition or None, resume=args.resume)
    print(f"wrote {out}")
    return 0


def _name_spec(item: str) -> tuple[str, str]:
    """argparse type of ``--condition``: ``name=SPEC`` -> (name, SPEC)."""
    if "=" not in item:
        raise argparse.ArgumentTypeError(f"expects name=SPEC, got {item!r}")
    k, v = item.split("=", 1)
    return k.strip(), v.strip()


def _int_list(text: str) -> list[int]:
    """argparse type of ``--batch-sizes``: comma-separated positive integers."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects comma-separated integers (1,100,10000), got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expects integers >= 1, got {text!r}")
    return values


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fastshower.montecarlo.run import simulate

    keys = ("zenith", "azimuth", "angle", "phi", "position", "upstream")
    extra = {k: v for k in keys if (v := getattr(args, k)) is not None}
    res = simulate(
        args.geometry, args.particle, args.energy, args.n, args.out, seed=args.seed, jobs=args.jobs,
        cut_mm=args.cut, physics=args.physics, resume=args.resume, chunk_size=args.chunk_size,
        progress=not args.quiet, extra=extra, executor=args.executor, scheduler=args.scheduler,
        fast_sim=_fast_sim(args),
    )
    done = (f"{res.n_new} new in {res.seconds:.1f} s, {1e3 * res.seconds_per_shower:.1f} ms/shower with "
            f"{args.jobs} job(s)" if res.n_new else "it held them already: nothing simulated")
    print(f"wrote {res.n_written} showers to {res.path} ({done}); generator: {res.generator}")
    if not args.quiet:
        from fastshower.validate.summary import physics_summary

        print(physics_summary(res.path))
    return 0


def _fast_sim(args: argparse.Namespace) -> Any:
    """simulate's ``fast_sim`` from --fast-sim and its options (None without --fast-sim)."""
    from fastshower.errors import ConfigError

    if args.fast_sim is None:
        given = [flag for flag, _ in _FAST_SIM_OPTIONS if getattr(args, flag[2:].replace("-", "_"))]
        if given:
            raise ConfigError(f"{', '.join(given)} need(s) --fast-sim RUN")
        return None
    from fastshower.fastsim_model import fast_sim_model

    return fast_sim_model(args.fast_sim, args.fast_sim_threshold, batch=args.fast_sim_batch or "event",
                          onnx_path=args.fast_sim_onnx, allow_extrapolation=args.allow_extrapolation)


def _cmd_train(args: argparse.Namespace) -> int:
    from fastshower.training import train

    run = train(
        data=args.data, model=args.model, out=args.out, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch_size, seed=args.seed, device=args.device, config=args.config, resume=args.resume,
        progress=not args.quiet, threads=args.threads, precision=args.precision,
    )
    print(f"run written to {run}; trained with {args.threads} torch thread(s) (--threads; meta.json torch_threads)")
    meta = json.loads((Path(run) / "meta.json").read_text())
    cost = meta.get("cost", {})
    if cost:
        sampled = cost.get("flops_per_shower_sample")
        print(f"{meta.get('model')}: {cost['parameters'] / 1e6:.3g} M parameters; per shower "
              f"{cost.get('flops_per_shower_loss', 0) / 1e6:.3g} MFLOP per loss evaluation"
              + (f", {sampled / 1e6:.3g} MFLOP to sample" if sampled else "")
              + f"; {meta.get('train_cpu_seconds', 0):.0f} CPU-s, peak memory {meta.get('peak_rss_mb', 0):.0f} MiB")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from fastshower.distillation import distill

    hparams = {k: v for k, v in (("hidden", args.hidden), ("depth", args.depth)) if v is not None}
    run = distill(args.run, args.out, n_pairs=args.pairs, steps=args.steps, batch_size=args.batch_size,
                  ode_steps=args.ode_steps, hparams=hparams, seed=args.seed, progress=not args.quiet)
    done = json.loads((run / "meta.json").read_text())["distilled"]
    hits = (f", hit-rate error {done['hit_rate_error_calibrated']:.4f} (uncalibrated "
            f"{done['hit_rate_error_uncalibrated']:.4f})") if "hit_rate_error_calibrated" in done else ""
    print(f"one-step run written to {run}: held-out relative error {done['relative_val_mse']:.4f}{hits}")
    return 0


def _cmd_refine(args: argparse.Namespace) -> int:
    from fastshower.refinement import RefineConfig, fit_refiner

    cfg = RefineConfig(showers=args.showers, cap=args.cap, seed=args.seed)
    done = fit_refiner(args.run, args.data, cfg, progress=not args.quiet)
    print(f"refiner written to {args.run} ({done['showers']} showers of each): held-out AUC of the run against the "
          f"data {done['validation_auc']:.3f}; "
          f"generate --refine keeps {done['acceptance']:.2f} of the draws (cap {cfg.cap:g}); "
          f"{done['cpu_seconds']:.0f} CPU-s")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from fastshower.generation import generate

    out = generate(
        run=args.run, n=args.n, energy=args.energy, conditions=dict(args.condition or []),
        out=args.out, batch_size=args.batch_size, seed=args.seed, progress=not args.quiet, backend=args.backend,
        onnx_path=args.onnx, int8=args.int8, extrapolate=args.extrapolate, resume=args.resume, refine=args.refine,
    )
    print(f"wrote {args.n} showers to {out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fastshower.validate.evaluate import evaluate

    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    result = evaluate(
        args.reference, args.candidate, args.out, metrics=metrics, seed=args.seed, floor=args.floor,
        binning=args.binning, binning_xml=args.binning_xml, progress=not args.quiet,
        amplification=args.amplification, downstream=args.downstream,
    )
    from fastshower.validate.verdict import format_score_table

    out = Path(args.out)
    print(f"{result['n_candidate']} candidate vs {result['n_reference']} reference showers")
    print(format_score_table(result))
    print(f"all numbers: {out / 'metrics.json'}\nopen {out / 'report.html'}")
    return 0


#: how an interrupted or failed demo goes on: it has no --resume, a second run skips what is complete
_DEMO_AGAIN = "run the same fastshower demo command again to continue where it stopped"


def _cmd_demo(args: argparse.Namespace) -> int:
    from fastshower.demo import run_demo

    try:
        run_demo(out=args.out, quick=args.quick, seed=args.seed, jobs=args.jobs)
    except KeyboardInterrupt as exc:
        text = str(exc.args[0]) if exc.args else "interrupted"
        raise KeyboardInterrupt(f"{text.replace('; continue with resume=True', '')}; {_DEMO_AGAIN}") from None
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import time

    from fastshower.deploy import export_onnx

    what = f"INT8 ({args.int8_mode or 'dynamic'}) quantisation" if args.int8 else "FP32"
    print(f"export: tracing the sampler of {args.run} to ONNX, {what}"
          + ("; quantising a many-step ODE sampler takes a minute or more" if args.int8 else ""),
          flush=True)  # stdout: stderr stays one line when the export is refused
    t0 = time.perf_counter()
    path = export_onnx(args.run, args.out, int8=args.int8, int8_mode=args.int8_mode, calibration=args.calibration,
                       opset=args.opset, overwrite=args.overwrite, layout=args.layout)
    print(f"wrote {path} ({Path(path).stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.0f} s)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from fastshower.deploy import bench

    backends = [s.strip() for s in args.backends.split(",") if s.strip()]
    bench(args.run, out=args.out, batch_sizes=args.batch_sizes, threads=args.threads, geant4=args.geant4,
          backends=backends, n_geant4=args.geant4_showers, quality_showers=args.quality_showers,
          reference=args.reference, progress=True)
    return 0


# --- parser ---------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows an option's default where it has one worth showing (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # identity, not ==: a default of 0 (seeds) is worth showing, only None and a flag's False are not
        shown = action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _verb(sub: argparse._SubParsersAction, name: str, fn: Callable[[argparse.Namespace], int],
          help_: str) -> argparse.ArgumentParser:
    sp = sub.add_parser(name, help=help_, description=help_, formatter_class=_HelpFormatter)
    sp.set_defaults(func=fn)
    return sp


def _add_files(sub: argparse._SubParsersAction) -> None:
    """geometries, info, convert, merge: detectors and shower files."""
    g = _verb(sub, "geometries", _cmd_geometries, "list the built-in detectors, or describe one")
    g.add_argument("name", nargs="?", help="geometry name (or a CaloChallenge binning XML)")

    i = _verb(sub, "info", _cmd_info, "describe a shower file: geometry, particle, energies, N, provenance")
    i.add_argument("file", help="shower file (HDF5, CaloChallenge layout)")
    i.add_argument("--check", action="store_true", help="also scan every value (NaN, negative)")

    c = _verb(sub, "convert", _cmd_convert, "convert CaloGAN or 3DGAN files to the CaloChallenge format, or rewrite "
              "a fastshower 0.1 file on current conventions (par04: alpha bins from -180 deg, Si MeV / 0.033)")
    c.add_argument("input", help="file in the CaloGAN, 3DGAN or fastshower 0.1 layout")
    c.add_argument("--layout", choices=["calogan", "3dgan", "fastshower-0.1"], required=True,
                   help="layout of the input (fastshower-0.1: a shower file written before the par04 conventions)")
    c.add_argument("--out", required=True, help="new CaloChallenge-format file")
    c.add_argument("--particle", default=None,
                   help="particle of the file (default e+ for CaloGAN, e- for 3DGAN; fastshower files name their own)")
    c.add_argument("--ecal-unit-mev", type=float, default=1e3, help="3DGAN: unit of ECAL cells in MeV (GeV: 1000)")

    m = _verb(sub, "merge", _cmd_merge, "merge shower files of one geometry (e.g. shards, or several primaries)")
    m.add_argument("inputs", nargs="+", help="shower files of one geometry")
    m.add_argument("--out", required=True, help="new merged file")
    m.add_argument("--condition", default="primary",
                   help="condition added per input: 'primary' = ln A of its particle; '' adds none")
    m.add_argument("--resume", action="store_true", help="finish an interrupted merge into --out (same inputs)")
    m.add_argument("--fill-below-ground", action="store_true",
                   help="air showers: also continue below-ground bins smoothly for training (undone on generation)")


#: simulate's options that qualify --fast-sim RUN, each (flag, add_argument keywords); given without --fast-sim
#: they are refused (:func:`_fast_sim`)
_FAST_SIM_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--fast-sim-threshold", {"metavar": "ENERGY", "help": "with --fast-sim: replace particles at or above this "
     "kinetic energy, e.g. 1GeV or 500MeV (GeV without a unit; default: the run's lowest training energy)"}),
    ("--fast-sim-batch", {"choices": ["event", "particle"], "help": "with --fast-sim: one model call per event for "
     "all its particles, or one per particle (default: event)"}),
    ("--fast-sim-onnx", {"metavar": "FILE", "help": "with --fast-sim: infer with ONNX Runtime on this export of the "
     "run (default: torch)"}),
    ("--allow-extrapolation", {"action": "store_true", "help": "with --fast-sim: also replace particles outside the "
     "run's trained angles, entry points or energies (a warning in the file's provenance; default: off)"}),
)


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    s = _verb(sub, "simulate", _cmd_simulate, "produce reference showers with Geant4 (or the air-shower hybrid)")
    s.add_argument("--geometry", required=True, help="detector name (see `fastshower geometries`)")
    s.add_argument("--particle", required=True, help="e-, e+, gamma, pi+, pi- ; air showers: p, He, N, Fe")
    s.add_argument("--energy", required=True, help="2.0 | 0.5,1,1.5,2.5 | 1:100 | 1:100:log ; GeV unless a unit "
                   "is given (500MeV, 1e18eV)")
    s.add_argument("--n", type=int, required=True, help="number of showers")
    s.add_argument("--out", required=True, help="output shower file")
    s.add_argument("--seed", type=int, default=None,
                   help="seed: the same seed gives the same showers (default 0; with --resume the file's own)")
    s.add_argument("--jobs", type=int, default=1, help="worker processes (--executor dask: of the LocalCluster)")
    s.add_argument("--executor", choices=["pool", "dask"], default="pool",
                   help="pool: worker processes of our own; dask: a task per chunk on a Dask cluster, the same file "
                   "(needs fastshower[dask]; docs/scaling.md)")
    s.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="--executor dask: a running scheduler, tcp://host:port or a scheduler file (default: a "
                   "LocalCluster of --jobs workers)")
    s.add_argument("--cut", type=float, default=0.7, help="Geant4 production cut, mm")
    s.add_argument("--physics", choices=["auto", "official", "substitute"], default="auto",
                   help="Geant4 data: official sets (GEANT4_DATA_DIR), substitute EM tables, or auto")
    s.add_argument("--resume", action="store_true", help="top an interrupted or smaller file up to --n")
    s.add_argument("--chunk-size", type=int, default=None,
                   help="showers per chunk, the seeding and writing unit (default 100; with --resume the file's own)")
    s.add_argument("--zenith", default=None,
                   help="air showers: zenith range in degrees, e.g. 0:65 (default: 0, vertical)")
    s.add_argument("--azimuth", default=None, help="air showers: azimuth range in degrees (default: 0:360)")
    s.add_argument("--angle", default=None, help="calorimeters: polar angle to the normal in degrees, DEG or "
                   "LOW:HIGH in [0, 90), stored as conditions/angle (theta, phi) (default: 0, normal incidence)")
    s.add_argument("--phi", default=None, help="calorimeters, with --angle: azimuth in degrees, 0 tilts towards +x "
                   "(default: 0:360)")
    s.add_argument("--position", default=None, metavar="X,Y",
                   help="calorimeters: entry point on the front face, mm, each MM or LOW:HIGH, uniform; write "
                        "--position=-10:10,0 (stored as conditions/position; default: the centre, Belle II: "
                        "its centre crystal)")
    s.add_argument("--upstream", default=None, metavar="MATERIAL:THICKNESS",
                   help="calorimeters: a slab 20 mm before the front face, e.g. G4_Pb:5.6mm (1 X0) or G4_Al:2cm "
                        "(default: none)")
    s.add_argument("--fast-sim", default=None, metavar="RUN",
                   help="calorimeters: full Geant4 tracking, but each e+/e-/gamma entering the front face above "
                        "--fast-sim-threshold is killed there and replaced by this run's shower (docs/integration.md; "
                        "default: none, full simulation)")
    for flag, keywords in _FAST_SIM_OPTIONS:
        s.add_argument(flag, **keywords)
    s.add_argument("--quiet", action="store_true", help="no progress bar and no physics summary")


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = _verb(sub, "train", _cmd_train, "train a generative model on a shower file")
    t.add_argument("--data", required=True, help="training shower file")
    t.add_argument("--model", default=None, metavar="MODEL",
                   help=f"model family: {', '.join(MODEL_NAMES)} (default: the config's, else {MODEL_NAMES[0]})")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--steps", type=int, default=None, help="total optimisation steps (default 2000)")
    t.add_argument("--epochs", type=float, default=None,
                   help="passes over the file, instead of --steps (default: none, --steps counts)")
    t.add_argument("--batch-size", type=int, default=None, help="showers per step (default 256)")
    t.add_argument("--seed", type=int, default=None, help="seeds initialisation, noise and data order (default 0)")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    t.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="the step's matrix products in float32 or bfloat16 (autocast; weights stay float32): "
                        "bf16 was 1.27x faster for layer-fm on a CPU with avx512_bf16, 8x slower on one "
                        "without bf16 units "
                        "(default: the config's, else fp32)")
    t.add_argument("--config", default=None,
                   help="TOML file: model = NAME, [hparams] and [train] tables (default: none, the model's defaults)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--threads", type=int, default=default_threads(),
                   help="torch CPU threads: 1 up to 2 cores (measured 30x faster than 2 on a busy 2-core machine), "
                        "else half the cores, at most 8 (default: %(default)s on this machine)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    ds = _verb(sub, "distill", _cmd_distill, "distil a flow-matching, flow or layer-fm run into a one-step generator")
    ds.add_argument("--run", required=True, help="finished flow-matching, flow or layer-fm run (the teacher)")
    ds.add_argument("--out", required=True, help="new run folder for the one-step student")
    ds.add_argument("--pairs", type=int, default=100_000, help="teacher (noise, shower) pairs to learn from")
    ds.add_argument("--steps", type=int, default=4000, help="student optimisation steps")
    ds.add_argument("--batch-size", type=int, default=512, help="pairs per step")
    ds.add_argument("--ode-steps", type=int, default=None, help="teacher ODE steps (default: the teacher's)")
    ds.add_argument("--hidden", type=int, default=None, help="student width (default 64)")
    ds.add_argument("--depth", type=int, default=None, help="student residual blocks (default 2)")
    ds.add_argument("--seed", type=int, default=0, help="seeds conditions, noise, initialisation and batches")
    ds.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = _verb(sub, "generate", _cmd_generate, "generate showers from a trained run")
    gen.add_argument("--run", required=True, help="run folder")
    gen.add_argument("--n", type=int, required=True, help="number of showers")
    gen.add_argument("--energy", required=True, help="incident energy spec, as for simulate (GeV unless a unit)")
    gen.add_argument("--condition", action="append", type=_name_spec, metavar="NAME=SPEC",
                     help="the run's extra conditions, e.g. position=-30:30,0 (default: its training range)")
    gen.add_argument("--out", required=True, help="new shower file")
    gen.add_argument("--batch-size", type=int, default=10000, help="showers generated and written per step")
    gen.add_argument("--seed", type=int, default=0, help="seeds energies, conditions and noise")
    gen.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="sampler")
    gen.add_argument("--onnx", default=None, help="with --backend onnx: an exported model of this run (default: "
                     "export one to a temporary file)")
    gen.add_argument("--int8", action="store_true", help="with --backend onnx and no --onnx: INT8 quantisation")
    gen.add_argument("--extrapolate", action="store_true", help="allow energies outside the training range")
    gen.add_argument("--resume", action="store_true",
                     help="top an interrupted --out up to --n (same run, seed, batch size and specs)")
    gen.add_argument("--refine", action="store_true",
                     help="rejection-sample on the run's refiner (fit by fastshower refine): closer to the data")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    rf = _verb(sub, "refine", _cmd_refine, "fit a run's refiner: a classifier of its showers against the data, "
               "for generate --refine")
    rf.add_argument("--run", required=True, help="finished run folder (the refiner is saved in it)")
    rf.add_argument("--data", default=None, help="Geant4 file to learn from (default: the run's training file)")
    rf.add_argument("--showers", type=int, default=5000,
                    help="data showers used (at most; all if the file holds fewer), and as many of the run's own "
                    "drawn at their energies")
    rf.add_argument("--cap", type=float, default=3.0,
                    help="largest density ratio honoured: a larger cap follows the data further at more draws")
    rf.add_argument("--seed", type=int, default=0, help="seeds the run's showers, the split and the classifier")
    rf.add_argument("--quiet", action="store_true", help="no progress messages")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    e = _verb(sub, "evaluate", _cmd_evaluate, "score a candidate shower file against a reference")
    e.add_argument("--reference", required=True, help="reference shower file (e.g. Geant4)")
    e.add_argument("--candidate", required=True, help="shower file to score")
    e.add_argument("--out", required=True, help="report folder (report.html, metrics.json, plots)")
    e.add_argument("--metrics", default=None, help="comma-separated subset of metrics (default: all)")
    e.add_argument("--seed", type=int, default=0, help="seeds the classifier split and subsamples")
    e.add_argument("--floor", action="store_true", help="also score the reference against itself (halves)")
    # checked by evaluate, so that a wrong value is one line and status 2 like any other bad input
    e.add_argument("--binning", default="quantile", metavar="{quantile,calochallenge}",
                   help="histogram binning: quantile bins of the reference with under/overflow, or the fixed "
                   "ranges of the CaloChallenge evaluation (datasets 2-3; out-of-range values dropped)")
    e.add_argument("--binning-xml", default=None, help="CaloChallenge binning XML for files of datasets 1-3 (default: "
                   "none, the files' own geometry)")
    e.add_argument("--amplification", default=None, metavar="TRAIN_FILE",
                   help="the candidate model's training file (N MC showers): how many MC showers the candidate is "
                   "worth against the reference as truth (GAN amplification, arXiv:2008.06545; quantile-binned "
                   "MSE of E_tot/E_inc and layer energies); the three files must be independent (default: none)")
    e.add_argument("--downstream", action="store_true",
                   help="downstream reconstruction check: an energy regressor trained on half the reference, "
                   "its bias and resolution per energy bin on the other half and on the candidate (air-shower "
                   "profiles: energy and Xmax reconstruction and a p-against-Fe classifier)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_deploy(sub: argparse._SubParsersAction) -> None:
    d = _verb(sub, "demo", _cmd_demo, "end-to-end demo on Belle II 5x5: simulate, train, generate, evaluate")
    d.add_argument("--out", default="demo-output", help="folder of the demo's files, runs and reports")
    d.add_argument("--quick", action="store_true", help="a 2-minute version")
    d.add_argument("--seed", type=int, default=0, help="seeds every step")
    d.add_argument("--jobs", type=int, default=2, help="Geant4 worker processes")
    d.set_defaults(say={"continue with resume=True": _DEMO_AGAIN})

    x = _verb(sub, "export", _cmd_export, "export a run's sampler to ONNX (optionally INT8)")
    x.add_argument("--run", required=True, help="finished run folder")
    x.add_argument("--out", required=True, help="ONNX file")
    x.add_argument("--int8", action="store_true", help="INT8 quantisation (dynamic unless --int8-mode static)")
    x.add_argument("--int8-mode", choices=("dynamic", "static"), default=None,
                   help="with --int8: dynamic (activation ranges per call) or static (ranges calibrated on the "
                        "run's training file, QDQ) (default: dynamic)")
    x.add_argument("--calibration", type=int, default=256,
                   help="with --int8-mode static: training-file showers to calibrate on")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset")
    x.add_argument("--layout", choices=("fastshower", "par04"), default="fastshower",
                   help="graph contract: fastshower's (noise, energy, conditions -> showers in MeV, any batch) or "
                        "Geant4 Par04's (one input of batch 1, cell energies / E in Par04's mesh order; runs on "
                        "par04-ds2/ds3, FP32; docs/integration.md) (default: fastshower)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    b = _verb(sub, "bench", _cmd_bench, "measure generation speed (and Geant4's) on this machine")
    b.add_argument("--run", required=True, help="finished run folder")
    b.add_argument("--geant4", action="store_true", help="also time Geant4 on the run's geometry and energies")
    b.add_argument("--geant4-showers", type=int, default=200,
                   help="with --geant4: showers timed (after a start-up production of up to 10, timed apart)")
    b.add_argument("--batch-sizes", type=_int_list, default="1,100,10000", help="comma-separated batch sizes")
    b.add_argument("--threads", type=int, default=1, help="CPU threads of torch and ONNX Runtime")
    b.add_argument("--backends", default="torch-fp32,onnx-fp32,onnx-int8",
                   help="comma-separated; also onnx-int8-static (calibrates on the run's training file)")
    b.add_argument("--quality-showers", type=int, default=2000,
                   help="with an INT8 backend: showers generated with ONNX FP32 and with INT8 (same noise), both "
                        "scored against --reference, for INT8's change of each separation power and AUC (0: skip)")
    b.add_argument("--reference", default=None,
                   help="shower file the INT8 quality check scores against (default: the run's training file)")
    b.add_argument("--out", required=True, help="benchmark JSON")


def build_parser() -> argparse.ArgumentParser:
    """The ``fastshower`` parser: one sub-command per verb."""
    p = argparse.ArgumentParser(
        prog="fastshower",
        description="Fast simulation of particle showers: simulate -> train -> generate -> evaluate -> export.",
    )
    p.add_argument("--version", action="version", version=f"fastshower {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_files, _add_simulate, _add_train, _add_generate, _add_evaluate, _add_deploy):
        add(sub)
    # every sub-command's flags, for the messages (see _as_flags)
    p.set_defaults(cli_flags=frozenset(f for sp in sub.choices.values() for f in sp._option_string_actions))
    return p


def _is_user_error(exc: BaseException) -> bool:
    """Bad input rather than a bug: any FastshowerError, or an OS error such as a missing file or full disk."""
    return isinstance(exc, FastshowerError) or (isinstance(exc, OSError) and exc.errno in _USER_OS_ERRNOS)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.filename}: {exc.strerror}"
    return text.splitlines()[0] if text else type(exc).__name__


def _as_flags(text: str, args: argparse.Namespace) -> str:
    """An API message as the command line reads it: ``resume=True`` -> ``--resume``, ``extrapolate=True`` ->
    ``--extrapolate`` where a sub-command has that flag (the API names its arguments; a message may point at
    another command, "the simulate or generate that wrote it"). A sub-command's ``say`` first replaces what it
    has no flag for (the demo has no --resume)."""
    for python_words, cli_words in getattr(args, "say", {}).items():
        text = text.replace(python_words, cli_words)

    def flag(m: re.Match[str]) -> str:
        name = "--" + m.group(1).replace("_", "-")
        return name if name in args.cli_flags else m.group(0)

    return re.sub(r"\b([a-z][a-z0-9_]*)=True\b", flag, text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 done, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stdout = open(os.devnull, "w")  # silence the flush at interpreter exit
        return 0
    except KeyboardInterrupt as exc:
        print(f"fastshower: {_as_flags(str(exc.args[0]) if exc.args else 'interrupted', args)}", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"fastshower: error: {_as_flags(_one_line(exc), args)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
