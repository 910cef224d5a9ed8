"""Fault injection: kill -9 ``simulate``, ``train`` and ``generate`` at random moments, resume, compare.

For each verb an uninterrupted run is the reference. Each trial starts the same command, kills it with
SIGKILL after a random delay, timed either from start-up (``startup``: uniform over the reference's wall
time, so start-up itself is hit) or from the first finished chunk / checkpoint (``first_chunk``: uniform
over what is left), and then checks what the kill left:

- shower files (simulate, generate): the file opens with plain ``h5py.File(path, "r")``, is marked
  incomplete unless it holds every shower (a kill after the file was finished), holds whole chunks only
  and each of its rows equals the reference's;
- runs (train): ``checkpoints/last.pt`` is absent or loads;
- the killed command's stderr holds no traceback (orphaned workers end quietly) once every process that
  held it has exited.

Then the command is run again with ``--resume`` and the final file (or checkpoint weights) is compared
with the reference, bit for bit. The cost of the crash-safe writing is measured too: milliseconds per
appended chunk (part file + index rewrite, fsync'ed) as the number of parts grows, and the final rewrite.

    python benchmarks/fault_injection.py [--trials 4] [--out benchmarks/results/fault_injection.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fastshower import __version__

FS = [sys.executable, "-m", "fastshower"]
SIMULATE = ["simulate", "--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "0.5:2", "--n", "1500",
            "--chunk-size", "100", "--jobs", "2", "--seed", "7", "--quiet"]
GENERATE_N, GENERATE_BATCH = 60000, 1000
TRAIN_TOML = '[train]\nbatch_size = 64\ncheckpoint_every = 50\nlog_every = 50\n'
TRAIN_STEPS = 1000


@dataclass
class Trial:
    """One kill and resume.

    Attributes:
        mode: "startup" (delay from launch) or "first_chunk" (delay from the first finished chunk/checkpoint).
        delay_s: seconds from that moment to the kill.
        killed: the command was still running when the kill came (else it had finished: not counted).
        kept: showers in the file (steps in the checkpoint) after the kill; -1 when there was nothing yet.
        plain_open: the file opened with plain h5py (None: no file yet; train: the checkpoint loaded).
        false_complete: the killed file says complete=True but holds fewer showers than asked for (None: no
            file); a kill after the file was finished leaves it complete, rightly.
        rows_match: every row kept equals the reference's row (None: no file).
        traceback: the killed command's stderr held a traceback or a leaked-resource warning.
        resume_rc: exit status of the resumed command.
        final_equal: the resumed result equals the reference bit for bit.
        resume_s: wall time of the resumed command, s.
    """

    mode: str
    delay_s: float
    killed: bool = False
    kept: int = -1
    plain_open: bool | None = None
    false_complete: bool | None = None
    rows_match: bool | None = None
    traceback: bool = False
    resume_rc: int = -1
    final_equal: bool = False
    resume_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(args: list[str], cwd: Path) -> tuple[int, float, str]:
    """Run a fastshower command to its end: (exit status, wall time s, stderr)."""
    t0 = time.perf_counter()
    r = subprocess.run(FS + args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    return r.returncode, time.perf_counter() - t0, r.stderr


def _read(path: Path) -> dict[str, np.ndarray]:
    """Every per-shower dataset of a shower file, read with plain h5py."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[:]) if isinstance(v, h5py.Dataset) else None)
    return out


def _rows(path: Path) -> int:
    """Showers in a shower file now (0 while it cannot be read yet)."""
    try:
        with h5py.File(path, "r") as f:
            return int(f["incident_energies"].shape[0])
    except (OSError, KeyError):
        return 0


def _kill_at(args: list[str], cwd: Path, mode: str, delay: float, started: Callable[[], bool]) -> tuple[bool, str]:
    """Start ``args``, SIGKILL it ``delay`` s after launch or after ``started()`` first holds. Returns whether
    it was still running and its stderr, read to the end: every process that held it, workers included,
    has exited by then."""
    proc = subprocess.Popen(FS + args, cwd=cwd, env=_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    if mode == "first_chunk":
        while not started() and proc.poll() is None:
            time.sleep(0.02)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    return killed, err


def _reference(args: list[str], cwd: Path, started: Callable[[], bool]) -> tuple[float, float]:
    """Run ``args`` uninterrupted: (wall time, time to the first finished chunk or checkpoint), s."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(FS + args, cwd=cwd, env=_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    first = None
    while proc.poll() is None:
        if first is None and started():
            first = time.perf_counter() - t0
        time.sleep(0.02)
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"reference {args[0]} failed: {err}")
    total = time.perf_counter() - t0
    return total, first if first is not None else total


def _delays(rng: random.Random, trials: int, total_s: float, first_s: float) -> list[tuple[str, float]]:
    """(mode, delay) of every trial: from start-up uniform over the whole run, from the first chunk uniform over
    the rest of it."""
    return ([("startup", rng.uniform(0.0, total_s)) for _ in range(trials)]
            + [("first_chunk", rng.uniform(0.0, max(total_s - first_s, 0.1))) for _ in range(trials)])


def _shower_trial(args: list[str], out: Path, ref: dict[str, np.ndarray], chunk: int, mode: str, delay: float,
                  resume_args: list[str]) -> Trial:
    """Kill a command writing shower file ``out``, check what is left against ``ref``, resume, compare."""
    for stale in out.parent.glob(out.name + "*"):
        subprocess.run(["rm", "-rf", str(stale)], check=True)
    killed, err = _kill_at(args, out.parent, mode, delay, lambda: _rows(out) > 0)
    t = Trial(mode, round(delay, 3), killed, traceback="Traceback" in err or "leaked" in err)
    if out.exists():
        try:
            got = _read(out)
            t.plain_open = True
        except OSError as exc:
            t.plain_open, got = False, {}
            t.notes.append(f"plain h5py: {exc}")
        if got:
            n = len(got["incident_energies"])
            t.kept = n
            with h5py.File(out, "r") as f:
                t.false_complete = bool(f.attrs["complete"]) and n < len(ref["incident_energies"])
            t.rows_match = n % chunk == 0 and all(np.array_equal(v, ref[k][:n]) for k, v in got.items())
    rc, t.resume_s, err = _run(resume_args if out.exists() else args, out.parent)
    t.resume_rc = rc
    if rc == 0:
        final = _read(out)
        t.final_equal = final.keys() == ref.keys() and all(np.array_equal(final[k], ref[k]) for k in ref)
    else:
        t.notes.append(err.strip()[-300:])
    return t


def bench_simulate(work: Path, trials: int, rng: random.Random) -> dict[str, Any]:
    ref_path = work / "ref.h5"
    total, first = _reference([*SIMULATE, "--out", str(ref_path)], work, lambda: _rows(ref_path) > 0)
    ref = _read(ref_path)
    out = work / "sim.h5"
    runs = [_shower_trial([*SIMULATE, "--out", str(out)], out, ref, 100, mode, delay,
                          [*SIMULATE, "--out", str(out), "--resume"])
            for mode, delay in _delays(rng, trials, total, first)]
    return {"command": " ".join(["fastshower", *SIMULATE]), "reference_s": round(total, 2),
            "first_chunk_s": round(first, 2), "trials": runs}


def bench_generate(work: Path, run: Path, trials: int, rng: random.Random) -> dict[str, Any]:
    args = ["generate", "--run", str(run), "--n", str(GENERATE_N), "--energy", "0.6:1.9", "--batch-size",
            str(GENERATE_BATCH), "--seed", "3", "--quiet"]
    ref_path = work / "gref.h5"
    total, first = _reference([*args, "--out", str(ref_path)], work, lambda: _rows(ref_path) > 0)
    ref = _read(ref_path)
    out = work / "gen.h5"
    runs = [_shower_trial([*args, "--out", str(out)], out, ref, GENERATE_BATCH, mode, delay,
                          [*args, "--out", str(out), "--resume"])
            for mode, delay in _delays(rng, trials, total, first)]
    return {"command": " ".join(["fastshower", *args]), "reference_s": round(total, 2),
            "first_chunk_s": round(first, 2), "trials": runs}


def _weights(run: Path) -> dict[str, Any]:
    import torch

    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def _train_trial(args: list[str], run: Path, ref: dict[str, Any], mode: str, delay: float) -> Trial:
    import torch

    subprocess.run(["rm", "-rf", str(run)], check=True)
    ckpt = run / "checkpoints" / "last.pt"
    killed, err = _kill_at([*args, "--out", str(run)], run.parent, mode, delay, ckpt.exists)
    t = Trial(mode, round(delay, 3), killed, traceback="Traceback" in err)
    if ckpt.exists():
        try:
            t.kept, t.plain_open = int(_weights(run)["step"]), True
        except Exception as exc:  # any unpickling error is a lost checkpoint, which is what we count
            t.plain_open = False
            t.notes.append(f"checkpoint: {type(exc).__name__}: {exc}")
    rc, t.resume_s, err = _run([*args, "--out", str(run), "--resume"], run.parent)
    t.resume_rc = rc
    if rc == 0:
        got = _weights(run)
        t.final_equal = got["step"] == ref["step"] and all(torch.equal(got["model"][k], v)
                                                           for k, v in ref["model"].items())
    else:
        t.notes.append(err.strip()[-300:])
    return t


def bench_train(work: Path, data: Path, trials: int, rng: random.Random) -> tuple[dict[str, Any], Path]:
    cfg = work / "train.toml"
    cfg.write_text(TRAIN_TOML)
    args = ["train", "--data", str(data), "--model", "vae", "--config", str(cfg), "--steps", str(TRAIN_STEPS),
            "--seed", "1", "--quiet"]
    ref_run = work / "tref"
    total, first = _reference([*args, "--out", str(ref_run)], work, (ref_run / "checkpoints" / "last.pt").exists)
    ref = _weights(ref_run)
    runs = [_train_trial(args, work / "trun", ref, mode, delay)
            for mode, delay in _delays(rng, trials, total, first)]
    return {"command": " ".join(["fastshower", *args, "--out", "RUN"]), "reference_s": round(total, 2),
            "first_checkpoint_s": round(first, 2), "trials": runs}, ref_run


def write_cost(work: Path) -> dict[str, Any]:
    """ms per appended chunk of 100 showers (part file + index rewrite, both fsync'ed) at a growing number of
    parts, on belle2-ecl-5x5 (25 voxels) and par04-ds2 (6480), and the final rewrite into one plain file."""
    from fastshower.geometry import get_geometry
    from fastshower.io import ShowerBatch, ShowerWriter

    out: dict[str, Any] = {}
    for name, n_chunks in (("belle2-ecl-5x5", 1000), ("par04-ds2", 30)):
        geo = get_geometry(name)
        rng = np.random.default_rng(0)
        path = work / f"cost-{name}.h5"
        times = []
        with ShowerWriter(path, geo, "e-", "cost", 100 * n_chunks) as w:
            for _ in range(n_chunks):
                s = rng.exponential(1.0, (100, geo.n_voxels)).astype(np.float32) * (rng.random((100, geo.n_voxels))
                                                                                    < 0.3)
                batch = ShowerBatch(rng.uniform(500, 2000, 100), s)
                t0 = time.perf_counter()
                w.append(batch)
                times.append(1e3 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
        final_ms = 1e3 * (time.perf_counter() - t0)
        out[name] = {"voxels": geo.n_voxels, "showers_per_chunk": 100, "chunks": n_chunks,
                     "ms_per_chunk_first_10": round(float(np.median(times[:10])), 2),
                     "ms_per_chunk_last_10": round(float(np.median(times[-10:])), 2),
                     "ms_final_rewrite": round(final_ms, 1), "file_mb": round(path.stat().st_size / 2**20, 2)}
    return out


def _summary(trials: list[Trial]) -> dict[str, int]:
    killed = [t for t in trials if t.killed]
    files = [t for t in killed if t.plain_open is not None]
    return {"trials": len(trials), "killed_while_running": len(killed), "killed_with_output": len(files),
            "unreadable_after_kill": sum(t.plain_open is False for t in files),
            "complete_but_short_after_kill": sum(bool(t.false_complete) for t in files),
            "rows_mismatch_after_kill": sum(t.rows_match is False for t in files),
            "tracebacks": sum(t.traceback for t in killed),
            "resume_failed": sum(t.resume_rc != 0 for t in trials),
            "final_mismatch": sum(not t.final_equal for t in trials)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=6, help="kills per verb and timing mode")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "fault_injection.json"))
    args = p.parse_args()
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastshower-faults-") as tmp:
        work = Path(tmp)
        verbs: dict[str, Any] = {"simulate": bench_simulate(work, args.trials, rng)}
        verbs["train"], run = bench_train(work, work / "ref.h5", args.trials, rng)
        verbs["generate"] = bench_generate(work, run, args.trials, rng)
        cost = write_cost(work)
    for v in verbs.values():
        v["summary"] = _summary(v["trials"])
        v["trials"] = [asdict(t) for t in v["trials"]]
    result = {"benchmark": "fault_injection", "fastshower_version": __version__, "python": platform.python_version(),
              "cpu_count": os.cpu_count(), "trials_per_mode": args.trials, "seed": args.seed,
              "wall_s": round(time.perf_counter() - t0, 1), "verbs": verbs, "write_cost": cost}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v["summary"] for k, v in verbs.items()}, indent=2))
    print(json.dumps(cost, indent=2))


if __name__ == "__main__":
    main()
