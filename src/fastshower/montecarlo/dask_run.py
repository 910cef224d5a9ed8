"""Reference production on a Dask cluster: each chunk one task, only the client writes.

:func:`fastshower.montecarlo.run.simulate` with ``executor="dask"`` comes here. The client plans every chunk
(energies, conditions and Monte Carlo seed from (seed, chunk), exactly as the process pool does), submits one
task per chunk and hands the finished ones, whatever their order, to the run's writer, which appends them in
chunk order. The file is therefore bit-identical to a ``jobs=J`` pool run of the same seed, and the crash-safety
rules of the file format hold unchanged: the workers never touch it.

A task carries the geometry (JSON), particle and backend options, so workers need no shared file system, only
fastshower installed. Each worker process builds its backend once and keeps it (Geant4 can be initialised once
per process), on one dedicated thread of its own (Geant4's state is per thread; Dask may run tasks on others).

The progress bar moves per shower as with the pool: a task's backend reports its showers as they finish
(:meth:`~.backend.SimulationBackend.shower_done`) as events on a topic of this run, at most one per
``progress_interval_s`` per worker (longer on a big cluster, see :data:`_PROGRESS_EVENTS_PER_S`; the first
shower at once), which the client counts; the rest of a chunk
is counted when its task's result arrives. A chunk retried after its worker died is not counted twice.

A worker that dies (kill -9, a Geant4 abort, out of memory) loses only its task: the scheduler runs it again
elsewhere and the log says which chunk was retried. A chunk that kills ``allowed-failures + 1`` workers
(``distributed.scheduler.allowed-failures``, :data:`ALLOWED_FAILURES` for a cluster started here) is reported
by index and seed; the chunks before it are still written.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastshower.geometry import geometry_from_json
from fastshower.io import ShowerBatch
from fastshower.montecarlo.backend import BackendOptions, SimulationBackend, SimulationError

__all__ = ["ALLOWED_FAILURES", "DaskSchedulerError", "WorkerSpec", "connect", "drop_front", "run_chunks",
           "worker_report"]

log = logging.getLogger(__name__)

#: worker deaths a chunk may cause before it is given up (a cluster started here; a running one has its own)
ALLOWED_FAILURES = 2
#: the scheduler's event topic that reports, among others, each worker removed and the tasks it held
_TOPIC = "all"
#: the LocalCluster's HTTP server (dashboard when bokeh is there): a free port on this host only, since the
#: default 8787 clashes with a second run or any other Dask user of the machine
_LOCAL_HTTP = "127.0.0.1:0"
#: seconds to wait for a scheduler given by address before reporting it unreachable
_CONNECT_TIMEOUT_S = 10
#: progress events per second the whole cluster may send at most: each worker's interval is at least
#: workers / this (1,000 workers: one event per worker every 10 s), so the scheduler and client stay idle
_PROGRESS_EVENTS_PER_S = 100.0

#: (index, showers to drop from its front, energies (size,) MeV, conditions, MC seed): one chunk to simulate
Task = tuple[int, int, np.ndarray, dict[str, np.ndarray], int]


class DaskSchedulerError(SimulationError):
    """The Dask scheduler given cannot be used (a malformed address, nothing listening, a missing file)."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build the backend: it travels with every task (no shared file system).

    Attributes:
        cls_path: (module, class name) of the backend.
        geometry_json: the geometry.
        particle: the primary.
        options: the backend options.
    """

    cls_path: tuple[str, str]
    geometry_json: str
    particle: str
    options: BackendOptions


def drop_front(batch: ShowerBatch, skip: int) -> ShowerBatch:
    """``batch`` without its first ``skip`` showers (a resumed partial chunk: those are already in the file)."""
    if not skip:
        return batch
    return ShowerBatch(batch.energies[skip:], batch.showers[skip:],
                       {k: v[skip:] for k, v in batch.conditions.items()},
                       {k: v[skip:] for k, v in batch.truth.items()})


def worker_report(backend: SimulationBackend, worker: str | None = None) -> dict[str, Any]:
    """Who this worker is (``worker``: its Dask address, else host:pid) and the tables its backend built or read,
    for the file's ``worker_tables`` provenance."""
    host, pid = socket.gethostname(), os.getpid()
    return {"worker": worker or f"{host}:{pid}", "host": host, "pid": pid, "tables": backend.tables()}


# --- worker side -----------------------------------------------------------------------

_backends: dict[str, SimulationBackend] = {}  # by repr(spec): the options' dict makes a spec unhashable
#: the one thread of this worker process on which backends are built and run
_g4_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastshower-mc")


def _backend(spec: WorkerSpec) -> SimulationBackend:
    """This process's backend for ``spec``, built on first use (on the Monte Carlo thread)."""
    key = repr(spec)
    if key not in _backends:
        _backends[key] = _backend_class(spec)(geometry_from_json(spec.geometry_json), spec.particle, spec.options)
    return _backends[key]


class _TaskProgress:
    """A backend's ``on_shower`` while it runs one task: the chunk's showers simulated so far beyond ``skip`` (a
    resumed chunk's, already in the file) sent as an event ``[index, showers]`` on ``topic``, at most one per
    ``interval_s`` (the first at once). ``send``: the worker's ``log_event`` (safe from any thread)."""

    def __init__(self, send: Callable[[str, Any], Any], topic: str, index: int, skip: int,
                 interval_s: float) -> None:
        self.send, self.topic, self.index, self.skip, self.interval_s = send, topic, index, skip, interval_s
        self.done = 0  # showers of the chunk simulated
        self.sent = 0  # of those beyond skip, reported
        self.last = -float("inf")

    def __call__(self, k: int) -> None:
        self.done += k
        now = time.monotonic()
        beyond = max(0, self.done - self.skip)
        if beyond <= self.sent or now - self.last < self.interval_s:
            return
        self.last, self.sent = now, beyond
        with contextlib.suppress(Exception):  # progress only: never raise through Geant4's event loop
            self.send(self.topic, [self.index, beyond])


def _simulate(spec: WorkerSpec, task: Task, worker: str, on_shower: Callable[[int], None] | None
              ) -> tuple[ShowerBatch, str, str, dict[str, Any]]:
    """Run one chunk with this process's backend, ``on_shower`` hearing of each shower: (the chunk's new
    showers, generator, physics, worker report)."""
    _, skip, energies, conditions, mc_seed = task
    backend = _backend(spec)
    backend.on_shower = on_shower
    try:
        batch = drop_front(backend.run(energies, conditions, mc_seed), skip)
    finally:
        backend.on_shower = None
    return batch, backend.generator, backend.physics, worker_report(backend, worker)


def chunk_task(spec: WorkerSpec, task: Task, topic: str | None = None, min_interval_s: float = 0.0
               ) -> tuple[int, ShowerBatch, str, str, dict[str, Any]]:
    """The Dask task of one chunk: (index, showers, generator, physics, worker report); with ``topic``, the
    chunk's showers reported as they finish (see :class:`_TaskProgress`), at most once per the backend's
    ``progress_interval_s`` or ``min_interval_s``, the longer.

    The report (a few hundred bytes) comes with every chunk, not only a worker's first: a first result lost
    with its worker or cancelled would otherwise leave the worker's later chunks unattributed; the client keeps
    one entry per worker.
    """
    from distributed import get_worker

    worker = get_worker()  # on Dask's task thread: the Monte Carlo thread is no Dask worker thread
    on_shower = None
    if topic is not None:
        interval = max(_backend_class(spec).progress_interval_s, min_interval_s)
        on_shower = _TaskProgress(worker.log_event, topic, task[0], task[1], interval)
    batch, generator, physics, report = _g4_thread.submit(_simulate, spec, task, worker.address, on_shower).result()
    return task[0], batch, generator, physics, report


def _backend_class(spec: WorkerSpec) -> type[SimulationBackend]:
    cls: type[SimulationBackend] = getattr(importlib.import_module(spec.cls_path[0]), spec.cls_path[1])
    return cls


# --- client side -----------------------------------------------------------------------


@contextlib.contextmanager
def connect(scheduler: str | None, jobs: int) -> Iterator[Any]:
    """A ``distributed.Client``: of a new LocalCluster with ``jobs`` single-threaded worker processes, or of the
    running scheduler at ``scheduler`` (``tcp://host:port`` or a scheduler file).

    Raises :class:`DaskSchedulerError` (one line) before any work when ``scheduler`` cannot be reached.
    """
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise SimulationError("executor='dask' needs dask and distributed: pip install 'fastshower[dask]'") from None
    if scheduler is None:
        with (dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}),
              LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True,
                           dashboard_address=_LOCAL_HTTP) as cluster,
              Client(cluster) as client):
            yield client
        return
    with _client_of(Client, scheduler) as client:
        yield client


def _client_of(client_cls: Any, scheduler: str) -> Any:
    """A Client of the running scheduler ``scheduler`` (address or scheduler file), or DaskSchedulerError."""
    is_file = "://" not in scheduler and (scheduler.endswith(".json") or Path(scheduler).is_file())
    if is_file and not Path(scheduler).is_file():
        raise DaskSchedulerError(f"scheduler={scheduler!r}: no such scheduler file")
    try:
        if is_file:
            return client_cls(scheduler_file=scheduler, timeout=_CONNECT_TIMEOUT_S)
        return client_cls(scheduler, timeout=_CONNECT_TIMEOUT_S)
    except (OSError, ValueError, TypeError) as exc:  # nothing listening, timed out, a malformed address
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DaskSchedulerError(f"cannot reach the Dask scheduler at scheduler={scheduler!r}: {reason}") from None


class _Losses:
    """Logs each chunk of this run that a dead worker took with it, from the scheduler's "remove-worker" events
    (a worker's own message would die with it), and counts them per chunk."""

    def __init__(self, tag: str) -> None:
        self.prefix, self.suffix = "fastshower-chunk-", f"-{tag}"
        self.counts: dict[int, int] = {}
        self.lock = threading.Lock()

    def _chunks(self, keys: Iterable[Any]) -> list[int]:
        """This run's chunk indices among task keys."""
        return sorted(int(k[len(self.prefix):-len(self.suffix)]) for k in keys
                      if isinstance(k, str) and k.startswith(self.prefix) and k.endswith(self.suffix))

    def __call__(self, event: tuple[float, dict[str, Any]]) -> None:
        msg = event[1]
        if not isinstance(msg, dict) or msg.get("action") != "remove-worker" or msg.get("expected"):
            return  # not a worker that died (a cluster shutting down removes its workers "expected")
        for why, field in (("was running or queued", "processing-tasks"),
                           ("had finished, its result lost", "lost-computed-tasks")):
            for index in self._chunks(msg.get(field, ())):
                with self.lock:
                    tries = self.counts[index] = self.counts.get(index, 0) + 1
                log.warning("chunk %d retried: worker %s died while it %s (loss %d)", index, msg.get("worker"),
                            why, tries)


class _Progress:
    """The client's count of showers simulated, fed by the tasks' progress events (the scheduler's, on the
    client's event-loop thread) and by each finished task (the main thread): ``progress`` hears of every
    shower once, however its events and result interleave, and a chunk retried after its worker died counts
    only the showers beyond what its lost attempt had reported."""

    def __init__(self, progress: Callable[[int], Any]) -> None:
        self.progress = progress
        self.counted: dict[int, int] = {}  # chunk -> showers already on the bar
        self.finished: set[int] = set()
        self.closed = False  # the run is over: late events are dropped (the bar may be closed)
        self.lock = threading.Lock()

    def __call__(self, event: tuple[float, Any]) -> None:
        """A progress event ``(time, [index, showers of the chunk simulated beyond its skip])``."""
        try:
            index, done = (int(v) for v in event[1])
        except (TypeError, ValueError):
            return
        with self.lock:
            new = done - self.counted.get(index, 0)
            if self.closed or index in self.finished or new <= 0:
                return
            self.counted[index] = done
            self.progress(new)

    def finish(self, index: int, n: int) -> None:
        """Chunk ``index`` came back with ``n`` new showers: count those not counted yet."""
        with self.lock:
            self.finished.add(index)
            rest = n - self.counted.pop(index, 0)
            if rest > 0:
                self.progress(rest)

    def close(self) -> None:
        with self.lock:
            self.closed = True


def _failure(exc: BaseException, index: int, mc_seed: int, tries: int) -> str:
    """One line for a chunk that failed: a Monte Carlo error, or one that kept killing its workers."""
    if type(exc).__name__ == "KilledWorker":
        return (f"chunk {index} (Monte Carlo seed {mc_seed}) killed {max(tries, 1)} worker(s) and was given up "
                "(a Geant4 abort or out of memory; distributed.scheduler.allowed-failures bounds the tries)")
    failure = f"chunk {index} failed: {type(exc).__name__}: {exc}"
    if os.environ.get("FASTSHOWER_DEBUG"):
        import traceback

        failure += "\n" + "".join(traceback.format_exception(exc))
    return failure


def run_chunks(client: Any, spec: WorkerSpec, tasks: Iterable[Task], take: Callable[[str, int, Any, Any], Any],
               progress: Callable[[int], Any]) -> str | None:
    """Submit one task per chunk and hand each finished one to ``take`` (the run's writer: ("ready", -1, generator,
    physics), ("tables", -1, worker report, None), then ("done", index, batch, None)); returns the first failure,
    None when every chunk came back.
    ``progress`` gets numbers of showers simulated, as the tasks report them (per shower, at most once a second
    per worker) and as they finish, in whatever order (the progress bar; see :class:`_Progress`).

    After a failed chunk the later ones are cancelled (they could not be written after the gap) and the earlier
    ones still run to the end, so the file keeps everything before it. Ctrl-C (KeyboardInterrupt) cancels all.
    """
    from distributed import as_completed

    tag = os.urandom(4).hex()  # keys unique per run: a shared cluster may hold another run's chunk 0
    losses, counter, topic = _Losses(tag), _Progress(progress), f"fastshower-progress-{tag}"
    client.subscribe_topic(_TOPIC, losses)
    client.subscribe_topic(topic, counter)  # before the tasks: the scheduler takes both in order
    every_s = len(client.scheduler_info().get("workers", {})) / _PROGRESS_EVENTS_PER_S  # as the cluster is now
    futures: dict[Any, Task] = {}
    for task in tasks:
        key = f"fastshower-chunk-{task[0]}-{tag}"
        futures[client.submit(chunk_task, spec, task, topic, every_s, key=key, pure=False)] = task
    running = set(futures)
    failed: int | None = None
    failure: str | None = None
    try:
        for fut in as_completed(list(futures)):
            running.discard(fut)
            index = futures[fut][0]
            if fut.status == "cancelled" or (failed is not None and index > failed):
                continue
            if fut.status == "error":
                failure = _failure(fut.exception(), index, futures[fut][4], losses.counts.get(index, 0))
                failed = index
                client.cancel([f for f in running if futures[f][0] > index])
                continue
            _, batch, generator, physics, report = fut.result()
            fut.release()  # its showers live on in the writer's buffer or the file, not on the worker
            counter.finish(index, len(batch))
            take("ready", -1, generator, physics)
            take("tables", -1, report, None)
            take("done", index, batch, None)
    finally:
        if running:  # Ctrl-C or a failed write: stop what still runs
            client.cancel(list(running))
        counter.close()
        client.unsubscribe_topic(_TOPIC)
        client.unsubscribe_topic(topic)
    return failure
