"""Reference production on a Dask cluster: each chunk one task, only the client writes.

:func:`fastshower.montecarlo.run.simulate` with ``executor="dask"`` comes here. The client plans every chunk
(energies, conditions and Monte Carlo seed from (seed, chunk), exactly as the process pool does), submits one
task per chunk and hands the finished ones, whatever their order, to the run's writer, which appends them in
chunk order. The file is therefore bit-identical to a ``jobs=J`` pool run of the same seed, and the crash-safety
rules of the file format hold unchanged: the workers never touch it.

A task carries the geometry (JSON), particle and backend options, so workers need no shared file system, only
fastshower installed. Each worker process builds its backend once and keeps it (Geant4 can be initialised once
per process), on one dedicated thread of its own (Geant4's state is per thread; Dask may run tasks on others).

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
        cls = getattr(importlib.import_module(spec.cls_path[0]), spec.cls_path[1])
        _backends[key] = cls(geometry_from_json(spec.geometry_json), spec.particle, spec.options)
    return _backends[key]


def _simulate(spec: WorkerSpec, task: Task, worker: str) -> tuple[ShowerBatch, str, str, dict[str, Any]]:
    """Run one chunk with this process's backend: (the chunk's new showers, generator, physics, worker report)."""
    _, skip, energies, conditions, mc_seed = task
    backend = _backend(spec)
    batch = drop_front(backend.run(energies, conditions, mc_seed), skip)
    return batch, backend.generator, backend.physics, worker_report(backend, worker)


def chunk_task(spec: WorkerSpec, task: Task) -> tuple[int, ShowerBatch, str, str, dict[str, Any]]:
    """The Dask task of one chunk: (index, showers, generator, physics, worker report).

    The report (a few hundred bytes) comes with every chunk, not only a worker's first: a first result lost
    with its worker or cancelled would otherwise leave the worker's later chunks unattributed; the client keeps
    one entry per worker.
    """
    from distributed import get_worker

    address = get_worker().address  # on Dask's task thread: the Monte Carlo thread is no Dask worker thread
    batch, generator, physics, report = _g4_thread.submit(_simulate, spec, task, address).result()
    return task[0], batch, generator, physics, report


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
    ``progress`` gets the number of showers of each task as it finishes, in whatever order (the progress bar).

    After a failed chunk the later ones are cancelled (they could not be written after the gap) and the earlier
    ones still run to the end, so the file keeps everything before it. Ctrl-C (KeyboardInterrupt) cancels all.
    """
    from distributed import as_completed

    tag = os.urandom(4).hex()  # keys unique per run: a shared cluster may hold another run's chunk 0
    losses = _Losses(tag)
    client.subscribe_topic(_TOPIC, losses)
    futures: dict[Any, Task] = {}
    for task in tasks:
        key = f"fastshower-chunk-{task[0]}-{tag}"
        futures[client.submit(chunk_task, spec, task, key=key, pure=False)] = task
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
            progress(len(batch))
            take("ready", -1, generator, physics)
            take("tables", -1, report, None)
            take("done", index, batch, None)
    finally:
        if running:  # Ctrl-C or a failed write: stop what still runs
            client.cancel(list(running))
        client.unsubscribe_topic(_TOPIC)
    return failure
