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
import dataclasses
import json
import math
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import time
import traceback
import types
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from tqdm import tqdm

from fastshower.energy import EnergySpec, parse_energy
from fastshower.geometry import Geometry, geometry_from_json, get_geometry
from fastshower.io import ShowerBatch, ShowerFile, ShowerFileError, ShowerWriter, WriteLock
from fastshower.montecarlo.backend import BackendOptions, SimulationBackend, SimulationError
from fastshower.montecarlo.dask_run import WorkerSpec, drop_front, worker_report
from fastshower.montecarlo.fastsim import FastSim

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
        from fastshower.montecarlo.airshower import AirShowerBackend

        return AirShowerBackend
    from fastshower.montecarlo.calorimeter import Geant4Backend

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


def _die_with_parent() -> None:
    """Have Linux end this worker (SIGTERM, silently) when its parent dies, kill -9 included, so no orphan goes
    on simulating for no one; where that is not available the broken pipe ends it after its chunk."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    parent = mp.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl took effect
        os._exit(0)


def _worker(
    cls_path: tuple[str, str],
    geometry_json: str,
    particle: str,
    options: BackendOptions,
    tasks: Any,
    results: Any,
) -> None:
    """A worker process: serve tasks from the parent until it says stop; end quietly when the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    _die_with_parent()
    with contextlib.suppress(BrokenPipeError, EOFError, ConnectionResetError):  # parent killed: no one to tell
        _serve(cls_path, geometry_json, particle, options, tasks, results)


class _Reporter:
    """A worker's per-shower progress for one chunk: ("progress", index, k, None) on the result pipe, at most
    one message per ``interval_s`` (the first shower at once, so the bar moves and estimates early).

    Showers before ``skip`` (a resumed chunk's, already in the file and on the bar) are not counted.
    """

    def __init__(self, results: Any, index: int, skip: int, interval_s: float) -> None:
        self.results, self.index, self.skip, self.interval_s = results, index, skip, interval_s
        self.done = 0  # showers of the chunk simulated
        self.sent = 0  # of those, reported (beyond skip)
        self.last = -math.inf

    def __call__(self, k: int) -> None:
        """``k`` more showers are simulated."""
        self.done += k
        now = time.monotonic()
        new = max(0, self.done - self.skip) - self.sent
        if new <= 0 or now - self.last < self.interval_s:
            return
        self.last = now
        self.sent += new
        # inside Geant4's event loop: a gone parent must not raise through it; the chunk's "done" send then does
        with contextlib.suppress(OSError):
            self.results.send(("progress", self.index, new, None))


def _serve(cls_path: tuple[str, str], geometry_json: str, particle: str, options: BackendOptions, tasks: Any,
           results: Any) -> None:
    """Worker loop: build the backend once, say "ready", then simulate each task received until a None one,
    reporting its showers as they finish ("progress", see :class:`_Reporter`) and the chunk at its end ("done");
    before a chunk's "done", the worker's tables ("tables", see :func:`~.dask_run.worker_report`) after its first
    chunk and after each one that got or extended tables (the air-shower tables grow with the energy).

    ``tasks`` and ``results`` are this worker's ends of two pipes: ``send`` returns only once the data is in
    the pipe, so a chunk reported before an abort is never lost (a Queue's feeder thread would die with the
    process), and no semaphore is shared (a killed parent would leave it to the resource tracker).
    """
    try:
        import importlib

        cls = getattr(importlib.import_module(cls_path[0]), cls_path[1])
        backend = cls(geometry_from_json(geometry_json), particle, options)
    except BaseException as exc:  # report set-up failures (missing data, ...) to the parent
        results.send(("error", -1, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    results.send(("ready", -1, backend.generator, backend.physics))
    reported: dict[str, Any] | None = None
    while True:
        task = tasks.recv()
        if task is None:
            return
        index, skip, energies, conditions, mc_seed = task
        backend.on_shower = _Reporter(results, index, skip, backend.progress_interval_s)
        try:
            batch = backend.run(energies, conditions, mc_seed)
        except BaseException as exc:
            results.send(("error", index, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            return
        report = worker_report(backend)  # after each chunk: a backend may get or extend its tables on any run
        if report != reported:
            results.send(("tables", -1, report, None))
            reported = report
        results.send(("done", index, drop_front(batch, skip), None))  # skip: a resumed chunk's showers in the file


def _messages(readers: dict[Any, Any]) -> Iterator[tuple[Any, tuple[str, int, Any, Any]]]:
    """(pipe, message) from the workers' result pipes as they come; ("dead", ...) when a worker vanished mid-work."""
    live = dict(readers)
    while True:
        if not live:
            yield None, ("dead", -1, "all workers stopped but chunks are missing", None)
            return
        for recv in mp_connection.wait(list(live), timeout=1.0):
            try:
                message: Any = recv.recv()  # type: ignore[union-attr,call-arg]
                yield recv, message
            except EOFError:  # the worker's end closed: it exited (normally after its last task) or died
                proc = live.pop(recv)
                proc.join(timeout=5)
                if proc.exitcode not in (0, None):
                    yield None, ("dead", -1, f"a worker process died (exit code {proc.exitcode}; a Geant4 abort or "
                                 "out of memory) while simulating", None)
                    return


# --- request -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """A validated production request: what to simulate, into which file, and from which shower on.

    Attributes:
        geometry, particle, spec, options: what to simulate (spec: energies in MeV).
        backend: the Monte Carlo class.
        out: the HDF5 file.
        n: showers the file must hold.
        seed, chunk_size: the seeding (a resumed file's own values).
        start: showers already in the file (0 for a new file).
        jobs: worker processes asked for.
        resume: the file exists and is topped up.
        attrs: provenance for a new file (seed, chunk size, energy spec, backend options...).
        lock: the output's write lock, held from before the file is read until the run ends.
        executor: "pool" (worker processes of our own) or "dask" (tasks on a Dask cluster).
        scheduler: the Dask scheduler (address or scheduler file); None starts a LocalCluster of ``jobs`` workers.
    """

    geometry: Geometry
    particle: str
    spec: EnergySpec
    options: BackendOptions
    backend: type[SimulationBackend]
    out: Path
    n: int
    seed: int
    chunk_size: int
    start: int
    jobs: int
    resume: bool
    attrs: dict[str, Any]
    lock: WriteLock
    executor: str = "pool"
    scheduler: str | None = None

    @property
    def n_chunks(self) -> int:
        """Chunks of the whole file, the last one possibly short."""
        return -(-self.n // self.chunk_size)

    @property
    def first_chunk(self) -> int:
        """The chunk holding shower ``start``: the first one to simulate."""
        return self.start // self.chunk_size

    def open_writer(self, generator: str, physics: str, resume: bool) -> ShowerWriter:
        """The file's writer: a new file (or the resumed one) with this plan's conditions and provenance."""
        cls, geo, options = self.backend, self.geometry, self.options
        return ShowerWriter(self.out, geo, self.particle, generator, self.n, cls.condition_widths(geo, options),
                            {**self.attrs, "physics": physics}, resume=resume, truth=cls.truth_widths(geo, options),
                            lock=self.lock)


def _check_numbers(n: int, jobs: int, cut_mm: float, physics: str, chunk_size: int | None) -> None:
    """Raise :class:`SimulationError` for a bad number of showers, workers or chunk size, cut (mm) or data choice."""
    if int(n) != n or n <= 0:
        raise SimulationError(f"n must be a positive number of showers, got {n}")
    if jobs <= 0:
        raise SimulationError(f"jobs must be >= 1, got {jobs}")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size <= 0):
        raise SimulationError(f"chunk_size must be a positive number of showers, got {chunk_size}")
    if cut_mm <= 0:
        raise SimulationError(f"cut_mm must be a positive length in mm, got {cut_mm}")
    if physics not in ("auto", "official", "substitute"):
        raise SimulationError(f"physics must be auto, official or substitute, got {physics!r}")


def _resume_point(out: Path, geo: Geometry, particle: str, spec: EnergySpec, seed: int | None,
                  chunk_size: int | None, resume: bool, extra: dict[str, Any]) -> tuple[int, int | None, int | None]:
    """(showers already in ``out``, seed, chunk size): a resumed file continues with its own seed and chunks.

    Raises :class:`ShowerFileError` when ``out`` exists without ``resume``, or does not match the request
    (a ``seed`` or ``chunk_size`` given that differs from the file's would silently be ignored otherwise; the
    backend options ``extra``, an angle range say, must be the file's, or its showers would mix two set-ups).
    """
    if not resume:
        if out.exists():
            raise ShowerFileError(f"{out} exists; use resume=True to top it up or choose another out")
        return 0, seed, chunk_size
    if not out.exists():
        raise ShowerFileError(f"resume=True: {out} does not exist (drop resume=True to start a new file)")
    with ShowerFile(out, require_complete=False) as f:
        if f.geometry.to_dict() != geo.to_dict():
            raise ShowerFileError(f"resume=True: {out} holds geometry {f.geometry.name!r}, not {geo.name!r}")
        if f.particle != particle:
            raise ShowerFileError(f"resume=True: {out} holds {f.particle} showers, not {particle}")
        start = f.first_blank()
        stored = {k: f.attrs.get(k) for k in ("seed", "chunk_size", "energy_spec")}
        made = {k.removeprefix("option_"): str(v) for k, v in f.attrs.items() if k.startswith("option_")}
    asked = {k: str(v) for k, v in extra.items()}
    if made != asked:
        def text(d: dict[str, str]) -> str:
            return ", ".join(f"{k}={v}" for k, v in sorted(d.items())) or "no options"
        raise ShowerFileError(f"resume=True: {out} was made with {text(made)}, not {text(asked)}; give the same")
    if stored["energy_spec"] is not None and stored["energy_spec"] != spec.text:
        raise ShowerFileError(f"resume=True: {out} was made with energy {stored['energy_spec']}, not {spec.text}")
    for name, given in (("seed", seed), ("chunk_size", chunk_size)):
        value = stored[name]
        if given is not None and value is not None and int(value) != given:
            raise ShowerFileError(f"resume=True: {out} was made with {name}={int(value)}, not {given}; "
                                  f"leave {name} out to continue with the file's own")
    seed = int(stored["seed"]) if stored["seed"] is not None else seed
    chunk_size = int(stored["chunk_size"]) if stored["chunk_size"] is not None else chunk_size
    return start, seed, chunk_size


def _plan(geometry: str | Geometry, particle: str, energy: str | EnergySpec, n: int, out: str | Path, *,
          seed: int | None, jobs: int, cut_mm: float, physics: str, resume: bool, chunk_size: int | None,
          extra: dict[str, Any] | None, backend: type[SimulationBackend] | None, lock: WriteLock,
          fast_sim: FastSim | None = None) -> _Plan:
    """Parse and check a request (arguments as :func:`simulate`'s), in the order its errors are reported.

    ``lock`` (of ``out``) is taken before the file is read, so a file another run is writing is refused
    before its partial contents are taken for a resume point.
    """
    geo = get_geometry(geometry) if isinstance(geometry, str) else geometry
    spec = parse_energy(energy) if isinstance(energy, str) else energy
    _check_numbers(n, jobs, cut_mm, physics, chunk_size)
    out = Path(out)
    options = BackendOptions(cut_mm=cut_mm, physics=physics, extra=dict(extra or {}))
    cls = backend or backend_class(geo)
    if fast_sim is not None:
        options = _with_fast_sim(geo, cls, options, fast_sim, (spec.low, spec.high))
    cls.check_request(geo, particle, options, (spec.low, spec.high))
    lock.acquire()
    start, seed, chunk_size = _resume_point(out, geo, particle, spec, seed, chunk_size, resume, options.extra)
    seed, chunk_size = int(seed or 0), int(chunk_size or _DEFAULT_CHUNK)
    attrs: dict[str, Any] = {"seed": seed, "chunk_size": chunk_size, "energy_spec": spec.text,
                             **{f"option_{k}": str(v) for k, v in options.extra.items()}}
    if geo.kind == "calorimeter":
        attrs.update(cut_mm=cut_mm, physics_choice=physics)
    return _Plan(geo, particle, spec, options, cls, out, n, seed, chunk_size, start, jobs, resume, attrs, lock)


def _with_fast_sim(geo: Geometry, cls: type[SimulationBackend], options: BackendOptions, fast_sim: FastSim,
                   energy_range_mev: tuple[float, float]) -> BackendOptions:
    """``options`` with the fast simulation checked (SimulationError before Geant4 starts), its extrapolations
    noted in it as warnings, and the request in ``extra`` (the file's ``option_fast_sim*`` provenance)."""
    from fastshower.montecarlo.calorimeter import Geant4Backend, fast_sim_warnings

    if geo.kind != "calorimeter" or not issubclass(cls, Geant4Backend):
        raise SimulationError(f"fast_sim: fast simulation runs inside Geant4, for calorimeters only, not {geo.name!r}")
    options = dataclasses.replace(options, fast_sim=fast_sim)
    warnings = fast_sim_warnings(geo, options, energy_range_mev)
    return dataclasses.replace(options, fast_sim=dataclasses.replace(fast_sim, warnings=tuple(warnings)),
                               extra={**options.extra, **fast_sim.options()})


# --- workers --------------------------------------------------------------------------


@dataclass
class _Workers:
    """The worker processes of a run and the parent's ends of their pipes.

    Attributes:
        procs: the processes.
        readers: result pipe (parent's reading end) -> its worker's process.
        senders: result pipe -> the parent's sending end of that worker's task pipe.
        backlog: tasks not handed out yet, in chunk order (see :func:`_tasks`).
    """

    procs: list[Any]
    readers: dict[Any, Any]
    senders: dict[Any, Any]
    backlog: deque[Any]

    def feed(self, reader: Any) -> None:
        """Hand the worker behind result pipe ``reader`` its next task, or None (stop) when none is left."""
        with contextlib.suppress(OSError):  # a worker that died is reported through its result pipe
            self.senders[reader].send(self.backlog.popleft() if self.backlog else None)

    def stop(self) -> None:
        """Terminate the workers still alive and wait for them (5 s each)."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)

    def release(self) -> None:
        """Close the pipes (after :meth:`stop`)."""
        for conn in (*self.readers, *self.senders.values()):
            conn.close()


def _tasks(plan: _Plan) -> Iterator[tuple[int, int, np.ndarray, dict[str, np.ndarray], int]]:
    """The chunks still to simulate, in order: (chunk index, showers to drop from its front, energies (size,) MeV,
    conditions, MC seed); the first chunk of a resumed file drops the showers it already holds."""
    first_skip = plan.start - plan.first_chunk * plan.chunk_size
    for k in range(plan.first_chunk, plan.n_chunks):
        size = min(plan.chunk_size, plan.n - k * plan.chunk_size)
        energies, conditions, mc_seed = chunk_plan(plan.spec, plan.backend, plan.geometry, plan.options, plan.seed,
                                                   k, plan.chunk_size)
        yield (k, first_skip if k == plan.first_chunk else 0, energies[:size],
               {c: v[:size] for c, v in conditions.items()}, mc_seed)


@contextlib.contextmanager
def _workers_skip_user_main(cls: type[SimulationBackend]) -> Iterator[None]:
    """Start spawned workers as fastshower's own modules, without running the user's ``__main__``.

    A spawned child normally re-imports the parent's ``__main__`` (by path, or by name under ``python -m``), so
    a script calling ``simulate(..., jobs=2)`` without an ``if __name__ == "__main__"`` guard would run again in
    every worker and die there in multiprocessing's bootstrapping check. The workers need nothing from it (their
    target and arguments are fastshower objects), so while they start ``__main__`` is a blank module, which
    multiprocessing leaves alone. A backend class defined in the user's ``__main__`` does need it: then the
    default stays, and that script needs the guard.
    """
    main = sys.modules.get("__main__")
    if main is None or cls.__module__ == "__main__":
        yield
        return
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield  # Process.start() pickles its preparation data before returning, so restoring after is safe
    finally:
        sys.modules["__main__"] = main


def _start_workers(plan: _Plan) -> _Workers:
    """Start the workers, each with a task pipe and a result pipe; tasks are handed out as workers ask."""
    ctx = mp.get_context("spawn")  # fork would copy an initialised Geant4 or torch state
    backlog = deque(_tasks(plan))
    n_workers = min(plan.jobs, len(backlog))
    task_pipes = [ctx.Pipe(duplex=False) for _ in range(n_workers)]
    result_pipes = [ctx.Pipe(duplex=False) for _ in range(n_workers)]
    cls = plan.backend
    procs = [
        ctx.Process(target=_worker, args=((cls.__module__, cls.__name__), plan.geometry.to_json(), plan.particle,
                                          plan.options, task_recv, result_send), daemon=True)
        for (task_recv, _), (_, result_send) in zip(task_pipes, result_pipes, strict=True)
    ]
    with _workers_skip_user_main(cls):
        for p in procs:
            p.start()
    for (task_recv, _), (_, result_send) in zip(task_pipes, result_pipes, strict=True):
        task_recv.close()  # the parent keeps only its ends: EOF on a result pipe then means the worker is gone
        result_send.close()
    readers = [recv for recv, _ in result_pipes]
    return _Workers(procs, dict(zip(readers, procs, strict=True)),
                    {recv: send for recv, (_, send) in zip(readers, task_pipes, strict=True)}, backlog)


# --- writing --------------------------------------------------------------------------


class _ChunkWriter:
    """The parent's side of a run: takes the workers' messages and writes finished chunks in chunk order.

    The file is opened when the first worker is ready (its generator and physics are provenance), so a
    run whose workers cannot start writes nothing.
    """

    def __init__(self, plan: _Plan, bar: Any) -> None:
        self.plan = plan
        self.bar = bar
        self.writer: ShowerWriter | None = None
        self.pending: dict[int, ShowerBatch] = {}
        self.reported: dict[int, int] = {}  # chunk -> showers its worker reported as simulated so far
        self.next_chunk = plan.first_chunk
        self.generator = ""

    @property
    def done(self) -> bool:
        """Every chunk is written."""
        return self.next_chunk >= self.plan.n_chunks

    @property
    def n_written(self) -> int:
        """Showers in the file now."""
        return self.writer.n_written if self.writer is not None else self.plan.start

    def take(self, kind: str, index: int, payload: Any, detail: Any) -> str | None:
        """Handle one worker message (see :func:`_worker`); returns the failure it reports, if any."""
        if kind == "dead":
            return str(payload)
        if kind == "error":
            failure = payload if index < 0 else f"chunk {index} failed: {payload}"
            if os.environ.get("FASTSHOWER_DEBUG"):
                failure += "\n" + str(detail)
            return str(failure)
        if kind == "ready":
            self.generator = payload
            if self.writer is None:
                self.writer = self.plan.open_writer(payload, detail, self.plan.resume)
            return None
        if kind == "tables":
            self._record_tables(payload)
            return None
        if kind == "progress":  # the bar counts showers simulated, the file only takes whole chunks
            self.reported[index] = self.reported.get(index, 0) + payload
            self.bar.update(payload)
            return None
        self.bar.update(len(payload) - self.reported.pop(index, 0))  # the rest of the chunk, unreported so far
        self.pending[index] = payload
        while self.next_chunk in self.pending and self.writer is not None:
            self.writer.append(self.pending.pop(self.next_chunk))
            self.next_chunk += 1
        return None

    def _record_tables(self, report: dict[str, Any]) -> None:
        """Add a worker's report (see :func:`~.dask_run.worker_report`) to the file's ``worker_tables`` (JSON):
        one entry per worker process (address and pid), whose ``tables`` gain what a later report adds (a
        worker's reports only grow, but Dask's may come out of order); a resumed file's earlier entries are kept,
        so the file names every worker that built or read tables for it. Written with the next chunk (the writer
        commits all attributes each time)."""
        if self.writer is None:  # cannot happen: a worker's "ready" opens the file before its report
            return
        old = self.writer.attrs.get("worker_tables", [])
        entries = json.loads(old) if isinstance(old, (str, bytes)) else list(old)
        who = (report["worker"], report["pid"])
        same = [k for k, e in enumerate(entries) if (e.get("worker"), e.get("pid")) == who]
        if not same:
            self.writer.set_attrs({"worker_tables": [*entries, report]})
            return
        known = entries[same[0]].get("tables", [])
        new = [t for t in report["tables"] if t not in known]
        if new:
            entries[same[0]] = {**entries[same[0]], "tables": [*known, *new]}
            self.writer.set_attrs({"worker_tables": entries})

    def close(self) -> None:
        """Close the file (complete when it reached its target)."""
        if self.writer is not None:
            self.writer.close()


def _bar(plan: _Plan, progress: bool) -> Any:
    """The run's progress bar on stderr, counting showers simulated (rate and ETA from tqdm): per shower from
    backends that call :meth:`~.backend.SimulationBackend.shower_done`, else per chunk."""
    return tqdm(total=plan.n, initial=plan.start, unit="shower", desc=f"simulate {plan.geometry.name}",
                disable=not progress, dynamic_ncols=True, file=sys.stderr)


def _produce_dask(plan: _Plan, progress: bool) -> tuple[_ChunkWriter, str | None]:
    """As :func:`_produce`, with the chunks as tasks on a Dask cluster (see :mod:`.dask_run`).

    The scheduler is reached (or the LocalCluster started) before the bar and the file; its workers start
    without the user's ``__main__`` as the pool's do, also those restarted after a worker died.
    """
    from fastshower.montecarlo import dask_run

    cls = plan.backend
    spec = WorkerSpec((cls.__module__, cls.__name__), plan.geometry.to_json(), plan.particle, plan.options)
    with _workers_skip_user_main(cls), dask_run.connect(plan.scheduler, plan.jobs) as client:
        bar = _bar(plan, progress)
        sink = _ChunkWriter(plan, tqdm(disable=True))  # the bar moves as tasks finish, not as chunks are written
        failure: str | None = None
        try:
            failure = dask_run.run_chunks(client, spec, _tasks(plan), sink.take, bar.update)
        except KeyboardInterrupt:
            failure = "interrupted"
        finally:
            bar.close()
            sink.close()
    return sink, failure


def _produce(plan: _Plan, progress: bool) -> tuple[_ChunkWriter, str | None]:
    """Run the workers and write their chunks until the file is full, a worker fails or Ctrl-C.

    Returns the writer's state and the failure ("interrupted" for Ctrl-C), None on success. Workers
    are stopped and the file closed in every case, also when writing raises.
    """
    if plan.executor == "dask":
        return _produce_dask(plan, progress)
    workers = _start_workers(plan)
    bar = _bar(plan, progress)
    sink = _ChunkWriter(plan, bar)
    failure: str | None = None
    try:
        messages = _messages(workers.readers)
        while failure is None and not sink.done:
            source, message = next(messages)
            if message[0] in ("ready", "done"):
                workers.feed(source)  # first: the worker simulates on while the parent writes
            failure = sink.take(*message)
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        bar.close()
        workers.stop()
        sink.close()
        workers.release()
    return sink, failure


def _raise_failure(plan: _Plan, sink: _ChunkWriter, failure: str) -> NoReturn:
    """Raise the failure of a run with what the file keeps and, when it is short, how to continue."""
    n_written = sink.n_written
    wrote = sink.writer is not None
    kept = f"{n_written} of {plan.n} showers are kept in {plan.out}" if wrote else "nothing was written"
    resume_hint = "; continue with resume=True" if wrote and n_written < plan.n else ""
    if failure == "interrupted":
        raise KeyboardInterrupt(f"interrupted; {kept}{resume_hint}")
    raise SimulationError(f"{failure}; {kept}{resume_hint}")


def _complete_as_is(plan: _Plan, t0: float) -> SimulationResult:
    """The result for a file that already holds its ``n`` showers (``t0``: the call's start, perf_counter)."""
    with plan.open_writer("", "", resume=True):
        pass  # opening and closing marks it complete
    with ShowerFile(plan.out) as f:  # the provenance of the run that made it
        generator = str(f.attrs.get("generator", ""))
    return SimulationResult(plan.out, plan.start, 0, time.perf_counter() - t0, True, generator)


def _result(plan: _Plan, sink: _ChunkWriter, failure: str | None, seconds: float) -> SimulationResult:
    """What a run that took ``seconds`` did, or its failure raised (see :func:`_raise_failure`)."""
    if failure is not None:
        _raise_failure(plan, sink, failure)
    n_written = sink.n_written
    return SimulationResult(plan.out, n_written, n_written - plan.start, seconds, n_written >= plan.n,
                            sink.generator)


def _with_incidence(extra: dict[str, Any] | None, **incidence: str | None) -> dict[str, Any]:
    """``extra`` with the calorimeter incidence options given (angle, phi, position, upstream; strings)."""
    return {**(extra or {}), **{k: str(v) for k, v in incidence.items() if v is not None}}


# --- driver ---------------------------------------------------------------------------


def _check_executor(executor: str, scheduler: str | None) -> None:
    """Raise :class:`SimulationError` for an unknown executor, or a scheduler without executor="dask"."""
    if executor not in ("pool", "dask"):
        raise SimulationError(f"executor must be pool or dask, got {executor!r}")
    if scheduler is not None and executor != "dask":
        raise SimulationError(f"scheduler={scheduler!r} needs executor='dask'")


def simulate(
    geometry: str | Geometry,
    particle: str,
    energy: str | EnergySpec,
    n: int,
    out: str | Path,
    seed: int | None = None,
    jobs: int = 1,
    cut_mm: float = 0.7,
    physics: str = "auto",
    resume: bool = False,
    chunk_size: int | None = None,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    backend: type[SimulationBackend] | None = None,
    executor: str = "pool",
    scheduler: str | None = None, fast_sim: FastSim | None = None,
    angle: str | None = None, phi: str | None = None, position: str | None = None, upstream: str | None = None,
) -> SimulationResult:
    """Produce ``n`` reference showers into ``out`` (see the module docstring).

    Args:
        geometry: built-in name or Geometry.
        particle: e-, e+, gamma, pi+, pi- (calorimeters) or p, He, N, Fe (air showers).
        energy: energy spec (``2.0``, ``0.5,1,1.5,2.5``, ``1:100``, ``1:100:log``, ``500MeV``; GeV by default).
        n: showers the file must hold.
        out: the HDF5 file.
        seed: master seed (default 0 for a new file; a resumed file continues with its own, refusing another).
        jobs: worker processes.
        cut_mm: Geant4 production cut, mm.
        physics: Geant4 data: "auto", "official" or "substitute".
        resume: top up an existing, interrupted or smaller file to ``n``.
        chunk_size: showers per chunk (the unit of seeding, writing and loss on a crash; default 100, or a
            resumed file's own).
        progress: show a progress bar on stderr.
        extra: backend options (air showers: {"zenith": "0:65"}); angle, phi, position, upstream: see .incidence.
        backend: the Monte Carlo class (default: :func:`backend_class` of the geometry); it must be importable
            by module path, since workers are fresh processes.
        executor: "pool" (``jobs`` worker processes) or "dask" (a task per chunk; the same file, see .dask_run).
        scheduler: for "dask", ``tcp://host:port`` or a scheduler file (default: a LocalCluster of ``jobs``).
        fast_sim: a trained run replacing e+/e-/gamma showers inside Geant4 (``fastshower.fast_sim_model``, .fastsim).

    Raises:
        SimulationError, ShowerFileError, EnergySpecError, GeometryError, Geant4DataError: bad requests, with a
            one-line message (all :class:`~fastshower.errors.FastshowerError`).
    """
    t0 = time.perf_counter()
    _check_executor(executor, scheduler)
    lock = WriteLock(out)
    try:
        plan = _plan(geometry, particle, energy, n, out, seed=seed, jobs=jobs, cut_mm=cut_mm, physics=physics,
                     resume=resume, chunk_size=chunk_size, backend=backend, lock=lock, fast_sim=fast_sim,
                     extra=_with_incidence(extra, angle=angle, phi=phi, position=position, upstream=upstream))
        plan = dataclasses.replace(plan, executor=executor, scheduler=scheduler)
        if plan.start >= plan.n:
            return _complete_as_is(plan, t0)
        sink, failure = _produce(plan, progress)
    finally:
        lock.release()
    return _result(plan, sink, failure, time.perf_counter() - t0)
