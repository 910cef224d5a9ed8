"""Reference production: chunks, seeds, worker processes, crash-safe writing, resume.

A request of N showers is cut into chunks of ``chunk_size``. Chunk ``k`` draws
its energies and conditions from ``numpy.random.default_rng([seed, k])`` and
gives the Monte Carlo the seed derived from the same pair, so the showers
depend on (seed, chunk_size) only: not on the number of worker processes, nor
on whether the run was interrupted and resumed.

Each worker is a separate process (a Geant4 abort kills only its process, and
Geant4 can be initialised once per process). The parent writes finished chunks
in order and flushes each one, so a crash, a dead worker or Ctrl-C loses at most
the chunks in flight; ``resume=True`` tops the file up to N.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fastshower.energy import EnergySpec, parse_energy
from fastshower.geometry import Geometry, geometry_from_json, get_geometry
from fastshower.io import ShowerBatch, ShowerFile, ShowerFileError, ShowerWriter
from fastshower.simulate.backend import BackendOptions, SimulationBackend, SimulationError

__all__ = ["SimulationResult", "backend_class", "chunk_plan", "simulate"]

_DEFAULT_CHUNK = 100


@dataclass(frozen=True)
class SimulationResult:
    """What a production run did.

    Attributes:
        path: the shower file.
        n_written: showers now in the file.
        n_new: showers simulated by this call.
        seconds: wall time of this call, s.
        complete: the file reached its target.
        generator: the Monte Carlo's provenance string.
    """

    path: Path
    n_written: int
    n_new: int
    seconds: float
    complete: bool
    generator: str

    @property
    def seconds_per_shower(self) -> float:
        return self.seconds / max(self.n_new, 1)


def backend_class(geometry: Geometry) -> type[SimulationBackend]:
    """The reference Monte Carlo for a geometry: Geant4 for calorimeters, the hybrid for air showers."""
    if geometry.kind == "airshower":
        from fastshower.simulate.airshower import AirShowerBackend

        return AirShowerBackend
    from fastshower.simulate.calorimeter import Geant4Backend

    return Geant4Backend


def chunk_seed(seed: int, index: int) -> int:
    """Monte Carlo seed of chunk ``index``: a positive 31-bit integer (Geant4's engines take a long)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0] % (2**31 - 1)) + 1


def chunk_plan(
    spec: EnergySpec,
    cls: type[SimulationBackend],
    geometry: Geometry,
    options: BackendOptions,
    seed: int,
    index: int,
    chunk_size: int,
) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Energies (chunk_size,) MeV, conditions and MC seed of chunk ``index``."""
    rng = np.random.default_rng([seed, index])
    energies = spec.sample(rng, chunk_size)
    conditions = cls.draw_conditions(geometry, options, rng, chunk_size)
    return energies, conditions, chunk_seed(seed, index)


# --- worker process ------------------------------------------------------------------


def _worker(
    cls_path: tuple[str, str],
    geometry_json: str,
    particle: str,
    options: BackendOptions,
    tasks: Any,
    results: Any,
) -> None:
    """Worker loop: build the backend once, then simulate chunks until a None task.

    ``results`` is this worker's end of a pipe: ``send`` returns only once the data is in the pipe, so a
    chunk reported before an abort is never lost (a Queue's feeder thread would die with the process).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        import importlib

        cls = getattr(importlib.import_module(cls_path[0]), cls_path[1])
        backend = cls(geometry_from_json(geometry_json), particle, options)
    except BaseException as exc:  # report set-up failures (missing data, ...) to the parent
        results.send(("error", -1, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    results.send(("ready", -1, backend.generator, backend.physics))
    while True:
        task = tasks.get()
        if task is None:
            return
        index, skip, energies, conditions, mc_seed = task
        try:
            batch = backend.run(energies, conditions, mc_seed)
        except BaseException as exc:
            results.send(("error", index, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            return
        if skip:  # a resumed partial chunk: its first showers are already in the file
            batch = ShowerBatch(
                batch.energies[skip:], batch.showers[skip:],
                {k: v[skip:] for k, v in batch.conditions.items()}, {k: v[skip:] for k, v in batch.truth.items()},
            )
        results.send(("done", index, batch, None))


def _messages(readers: dict[Any, Any]) -> Iterator[tuple[str, int, Any, Any]]:
    """Messages from the workers' pipes as they come; ("dead", ...) when a worker vanished mid-work."""
    live = dict(readers)
    while True:
        if not live:
            yield ("dead", -1, "all workers stopped but chunks are missing", None)
            return
        for recv in mp_connection.wait(list(live), timeout=1.0):
            try:
                yield recv.recv()  # type: ignore[union-attr,call-arg,misc]
            except EOFError:  # the worker's end closed: it exited (normally after its last task) or died
                proc = live.pop(recv)
                proc.join(timeout=5)
                if proc.exitcode not in (0, None):
                    yield ("dead", -1, f"a worker process died (exit code {proc.exitcode}; a Geant4 abort or "
                           "out of memory) while simulating", None)
                    return


# --- driver ---------------------------------------------------------------------------


def simulate(
    geometry: str | Geometry,
    particle: str,
    energy: str | EnergySpec,
    n: int,
    out: str | Path,
    seed: int = 0,
    jobs: int = 1,
    cut_mm: float = 0.7,
    physics: str = "auto",
    resume: bool = False,
    chunk_size: int | None = None,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    backend: type[SimulationBackend] | None = None,
) -> SimulationResult:
    """Produce ``n`` reference showers into ``out`` (see the module docstring).

    Args:
        geometry: built-in name or Geometry.
        particle: e-, e+, gamma, pi+, pi- (calorimeters) or p, He, N, Fe (air showers).
        energy: energy spec (``2.0``, ``0.5,1,1.5,2.5``, ``1:100``, ``1:100:log``, ``500MeV``; GeV by default).
        n: showers the file must hold.
        out: the HDF5 file.
        seed: master seed.
        jobs: worker processes.
        cut_mm: Geant4 production cut, mm.
        physics: Geant4 data: "auto", "official" or "substitute".
        resume: top up an existing, interrupted or smaller file to ``n``.
        chunk_size: showers per chunk (the unit of seeding, writing and loss on a crash).
        progress: show a progress bar on stderr.
        extra: backend options (air showers: {"zenith": "0:65", "azimuth": "0:360"}).
        backend: the Monte Carlo class (default: :func:`backend_class` of the geometry); it must be importable
            by module path, since workers are fresh processes.

    Raises:
        SimulationError, ShowerFileError, EnergySpecError, GeometryError: bad requests, with a one-line message.
    """
    t0 = time.perf_counter()
    geo = get_geometry(geometry) if isinstance(geometry, str) else geometry
    spec = parse_energy(energy) if isinstance(energy, str) else energy
    if int(n) != n or n <= 0:
        raise SimulationError(f"--n must be a positive number of showers, got {n}")
    if jobs <= 0:
        raise SimulationError(f"--jobs must be >= 1, got {jobs}")
    if cut_mm <= 0:
        raise SimulationError(f"--cut must be a positive length in mm, got {cut_mm}")
    if physics not in ("auto", "official", "substitute"):
        raise SimulationError(f"--physics must be auto, official or substitute, got {physics!r}")
    out = Path(out)
    options = BackendOptions(cut_mm=cut_mm, physics=physics, extra=dict(extra or {}))
    cls = backend or backend_class(geo)
    cls.check_request(geo, particle, options, (spec.low, spec.high))

    start = 0
    if resume:
        if not out.exists():
            raise ShowerFileError(f"--resume: {out} does not exist (drop --resume to start a new file)")
        with ShowerFile(out, require_complete=False) as f:
            if f.geometry.to_dict() != geo.to_dict():
                raise ShowerFileError(f"--resume: {out} holds geometry {f.geometry.name!r}, not {geo.name!r}")
            if f.particle != particle:
                raise ShowerFileError(f"--resume: {out} holds {f.particle} showers, not {particle}")
            a = f.attrs
            start = f.n
            stored = {k: a.get(k) for k in ("seed", "chunk_size", "energy_spec")}
        if stored["energy_spec"] is not None and stored["energy_spec"] != spec.text:
            raise ShowerFileError(f"--resume: {out} was made with --energy {stored['energy_spec']}, not {spec.text}")
        seed = int(stored["seed"]) if stored["seed"] is not None else seed
        chunk_size = int(stored["chunk_size"]) if stored["chunk_size"] is not None else chunk_size
    elif out.exists():
        raise ShowerFileError(f"{out} exists; use --resume to top it up or choose another --out")
    chunk_size = int(chunk_size or _DEFAULT_CHUNK)

    attrs: dict[str, Any] = {"seed": seed, "chunk_size": chunk_size, "energy_spec": spec.text,
                             **{f"option_{k}": str(v) for k, v in options.extra.items()}}
    if geo.kind == "calorimeter":
        attrs.update(cut_mm=cut_mm, physics_choice=physics)
    if start >= n:
        with ShowerWriter(out, geo, particle, "", n, cls.condition_widths(geo, options), resume=True,
                          truth=cls.truth_widths(geo, options)):
            pass  # the file already holds n showers: opening and closing marks it complete
        return SimulationResult(out, start, 0, time.perf_counter() - t0, True, "")

    first_chunk, first_skip = divmod(start, chunk_size)
    n_chunks = -(-n // chunk_size)
    ctx = mp.get_context("spawn")  # fork would copy an initialised Geant4 or torch state
    tasks: Any = ctx.Queue()
    for k in range(first_chunk, n_chunks):
        size = min(chunk_size, n - k * chunk_size)
        energies, conditions, mc_seed = chunk_plan(spec, cls, geo, options, seed, k, chunk_size)
        tasks.put((k, first_skip if k == first_chunk else 0, energies[:size],
                   {c: v[:size] for c, v in conditions.items()}, mc_seed))
    n_workers = min(jobs, n_chunks - first_chunk)
    for _ in range(n_workers):
        tasks.put(None)
    pipes = [ctx.Pipe(duplex=False) for _ in range(n_workers)]
    procs = [
        ctx.Process(target=_worker, args=((cls.__module__, cls.__name__), geo.to_json(), particle, options,
                                          tasks, send), daemon=True)
        for _, send in pipes
    ]
    for p in procs:
        p.start()
    for _, send in pipes:
        send.close()  # the parent keeps only the reading ends: EOF then means the worker is gone
    readers = {recv: proc for (recv, _), proc in zip(pipes, procs, strict=True)}

    writer: ShowerWriter | None = None
    pending: dict[int, ShowerBatch] = {}
    next_chunk = first_chunk
    generator = physics_text = ""
    failure: str | None = None
    bar = tqdm(total=n, initial=start, unit="shower", desc=f"simulate {geo.name}", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        messages = _messages(readers)
        while next_chunk < n_chunks:
            kind, index, payload, detail = next(messages)
            if kind == "dead":
                failure = payload
                break
            if kind == "error":
                failure = payload if index < 0 else f"chunk {index} failed: {payload}"
                if os.environ.get("FASTSHOWER_DEBUG"):
                    failure += "\n" + str(detail)
                break
            if kind == "ready":
                generator, physics_text = payload, detail
                if writer is None:
                    writer = ShowerWriter(out, geo, particle, generator, n, cls.condition_widths(geo, options),
                                          {**attrs, "physics": physics_text}, resume=resume,
                                          truth=cls.truth_widths(geo, options))
                continue
            pending[index] = payload
            while next_chunk in pending and writer is not None:
                batch = pending.pop(next_chunk)
                writer.append(batch)
                bar.update(len(batch))
                next_chunk += 1
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        bar.close()
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
        n_written = writer.n_written if writer is not None else start
        if writer is not None:
            writer.close()
        with contextlib.suppress(Exception):
            tasks.cancel_join_thread()
        for recv in readers:
            recv.close()
    seconds = time.perf_counter() - t0
    if failure is not None:
        kept = f"{n_written} of {n} showers are kept in {out}" if writer is not None else "nothing was written"
        resume_hint = "; continue with --resume" if writer is not None and n_written < n else ""
        if failure == "interrupted":
            raise KeyboardInterrupt(f"interrupted; {kept}{resume_hint}")
        raise SimulationError(f"{failure}; {kept}{resume_hint}")
    return SimulationResult(out, n_written, n_written - start, seconds, n_written >= n, generator)
