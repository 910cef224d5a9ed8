"""simulate(executor="dask"): the same file as the process pool, resume, dead workers, bad schedulers.

Each test starts a LocalCluster of two worker processes (a few seconds); the Monte Carlo ones run Geant4 and
the air-shower generator at small sizes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")

from fastshower.cli import main
from fastshower.io import ShowerBatch, ShowerFile
from fastshower.montecarlo import dask_run
from fastshower.montecarlo.backend import SimulationBackend, SimulationError
from fastshower.montecarlo.g4data import SUBSTITUTE_VERSION
from fastshower.montecarlo.run import chunk_seed, simulate
from test_simulate import (
    GrowingTablesBackend,
    TablesBackend,
    ToyBackend,
    assert_tables_cover_every_chunk,
    worker_tables,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _read(path: Path) -> ShowerBatch:
    with ShowerFile(path) as f:
        return f.read()


def _assert_same(a_path: Path, b_path: Path) -> None:
    a, b = _read(a_path), _read(b_path)
    np.testing.assert_array_equal(a.energies, b.energies)
    np.testing.assert_array_equal(a.showers, b.showers)
    assert a.conditions.keys() == b.conditions.keys() and a.truth.keys() == b.truth.keys()
    for name in a.conditions:
        np.testing.assert_array_equal(a.conditions[name], b.conditions[name])
    for name in a.truth:
        np.testing.assert_array_equal(a.truth[name], b.truth[name])


def test_geant4_dask_file_is_the_pool_file(tmp_path: Path) -> None:
    kw = dict(geometry="belle2-ecl-5x5", particle="e-", energy="0.5:1.5", n=40, seed=11, chunk_size=10, jobs=2,
              progress=False)
    pool = simulate(out=tmp_path / "pool.h5", **kw)
    dask = simulate(out=tmp_path / "dask.h5", executor="dask", **kw)
    assert dask.complete and dask.n_written == 40 and dask.generator == pool.generator
    _assert_same(tmp_path / "pool.h5", tmp_path / "dask.h5")
    for name, prefix in (("pool.h5", ""), ("dask.h5", "tcp://")):
        with ShowerFile(tmp_path / name) as f:
            entries = json.loads(f.attrs["worker_tables"])
        assert 1 <= len(entries) <= 2 and all(e["worker"].startswith(prefix) for e in entries)
        versions = {e["tables"][0]["version"] for e in entries}
        assert versions <= {SUBSTITUTE_VERSION, "official"} and len(versions) == 1


def test_dask_worker_tables_name_each_worker(tmp_path: Path) -> None:
    simulate("belle2-ecl-5x5", "e-", "1:2", 40, tmp_path / "t.h5", seed=3, chunk_size=5, jobs=2, progress=False,
             executor="dask", backend=TablesBackend)
    entries, pids = worker_tables(tmp_path / "t.h5")
    assert {e["pid"] for e in entries} == pids and len(entries) == len(pids)  # one entry per producing worker
    assert all(e["worker"].startswith("tcp://") and e["tables"][0]["version"] == "toy-tables-v1" for e in entries)
    with ShowerFile(tmp_path / "t.h5") as f:  # fastshower info: one line of them
        assert f"tables:     {len(pids)} worker(s): toy-tables-v1 cache ({len(pids)} worker" in f.describe()


def test_dask_worker_tables_merge_a_workers_later_tables(tmp_path: Path) -> None:
    """Reports come with every chunk and grow as a worker extends its tables: one entry per worker, holding all."""
    out = tmp_path / "g.h5"
    simulate("belle2-ecl-5x5", "e-", "1:2", 40, out, seed=3, chunk_size=5, jobs=2, progress=False, executor="dask",
             backend=GrowingTablesBackend)
    assert_tables_cover_every_chunk(out)


def test_airshower_dask_file_is_the_pool_file(tmp_path: Path) -> None:
    pytest.importorskip("chromo")
    kw = dict(geometry="airshower-profile", particle="p", energy="1e15eV:3e15eV:log", n=12, seed=4, chunk_size=3,
              jobs=2, progress=False, extra={"zenith": "0:60"})
    simulate(out=tmp_path / "pool.h5", **kw)
    simulate(out=tmp_path / "dask.h5", executor="dask", **kw)
    _assert_same(tmp_path / "pool.h5", tmp_path / "dask.h5")
    # item 4: each worker's sub-shower tables (version, read or built, content hash) in the file's provenance
    hashes: dict[int, set[str]] = {}
    for name, prefix in (("pool.h5", ""), ("dask.h5", "tcp://")):
        with ShowerFile(tmp_path / name) as f:
            entries = json.loads(f.attrs["worker_tables"])
        assert 1 <= len({e["worker"] for e in entries}) <= 2 and all(e["worker"].startswith(prefix) for e in entries)
        for e in entries:
            assert e["tables"]  # one entry per time the worker got them (a later chunk may extend them)
            for table in e["tables"]:
                assert table["table"] == "airshower-subshower" and table["version"] == "airshower-tables-v1"
                assert table["source"] in ("cache", "built", "extended") and table["e_max_gev"] >= 0.99e4  # f_thr E0
                hashes.setdefault(table["n_energies"], set()).add(table["sha256"])
    assert all(len(h) == 1 for h in hashes.values())  # tables of one reach are the same on every worker


def test_dask_resume_submits_the_missing_chunks_only(tmp_path: Path) -> None:
    kw = dict(geometry="belle2-ecl-5x5", particle="e-", energy="1:2", seed=1, chunk_size=20, progress=False,
              backend=ToyBackend)
    simulate(out=tmp_path / "full.h5", n=90, **kw)
    simulate(out=tmp_path / "part.h5", n=50, **kw)  # ends inside chunk 2
    res = simulate(out=tmp_path / "part.h5", n=90, resume=True, executor="dask", jobs=2, **kw)
    assert res.n_new == 40 and res.complete
    _assert_same(tmp_path / "full.h5", tmp_path / "part.h5")


class DyingBackend(ToyBackend):
    """Kills its worker process (like a Geant4 abort) on the chunk whose Monte Carlo seed is in
    $FASTSHOWER_TEST_DIE_SEED: every time, or only the first time when $FASTSHOWER_TEST_DIE_ONCE names a marker
    file (the workers inherit the environment; the marker is shared through the file system).

    It dies 0.2 s into the chunk, as an abort comes during a chunk's work: a worker that exits at once can beat
    its own message that its previous chunk finished (Dask batches those every few ms), and the scheduler then
    counts that chunk as lost with it, each time the pair is retried on one worker, until it gives up on the
    innocent chunk (seen once in ~20 runs on a loaded machine)."""

    def run(self, energies_mev: np.ndarray, conditions: dict[str, np.ndarray], seed: int) -> ShowerBatch:
        import time

        if str(seed) == os.environ.get("FASTSHOWER_TEST_DIE_SEED"):
            marker = os.environ.get("FASTSHOWER_TEST_DIE_ONCE")
            if marker is None or not os.path.exists(marker):
                if marker is not None:
                    Path(marker).touch()
                time.sleep(0.2)
                os._exit(134)
        return super().run(energies_mev, conditions, seed)


class HeldBackend(ToyBackend):
    """The toy's showers; on the chunk whose Monte Carlo seed is $FASTSHOWER_TEST_HOLD_SEED, the first time only
    (no file $FASTSHOWER_TEST_HOLD_FILE yet), it writes its worker's pid there and waits (up to a minute) for
    the test to kill -9 that process mid-chunk."""

    def run(self, energies_mev: np.ndarray, conditions: dict[str, np.ndarray], seed: int) -> ShowerBatch:
        import time

        marker = Path(os.environ.get("FASTSHOWER_TEST_HOLD_FILE", "/nonexistent/hold"))
        if str(seed) == os.environ.get("FASTSHOWER_TEST_HOLD_SEED") and not marker.exists():
            marker.with_suffix(".tmp").write_text(str(os.getpid()))
            marker.with_suffix(".tmp").rename(marker)
            time.sleep(60)
        return super().run(energies_mev, conditions, seed)


class QuickBackend(SimulationBackend):
    """The slow test backend's showers (ones, no conditions) without its sleep: tops its files up quickly."""

    def run(self, energies_mev: np.ndarray, conditions: dict[str, np.ndarray], seed: int) -> ShowerBatch:
        return ShowerBatch(energies_mev, np.ones((len(energies_mev), self.geometry.n_voxels)))


@pytest.mark.parametrize("once", [True, False])
def test_dead_worker_retried_or_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture, once: bool) -> None:
    monkeypatch.setenv("FASTSHOWER_TEST_DIE_SEED", str(chunk_seed(3, 2)))
    if once:
        monkeypatch.setenv("FASTSHOWER_TEST_DIE_ONCE", str(tmp_path / "died"))
    kw = dict(geometry="belle2-ecl-5x5", particle="e-", energy="1", n=60, seed=3, chunk_size=10, progress=False,
              jobs=2, executor="dask", backend=DyingBackend)
    out = tmp_path / "die.h5"
    with caplog.at_level(logging.WARNING, logger=dask_run.__name__):
        if once:
            assert simulate(out=out, **kw).complete
            assert "chunk 2 retried" in caplog.text
            return
        with pytest.raises(SimulationError, match=rf"^chunk 2 \(Monte Carlo seed {chunk_seed(3, 2)}\) killed "
                           r"\d worker\(s\) and was given up .* 20 of 60 showers are kept"):
            simulate(out=out, **kw)
    with ShowerFile(out, require_complete=False) as f:
        assert f.n == 20 and not f.complete


def test_running_cluster_by_file_and_address_worker_killed_9(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A running cluster given by scheduler file and by address; kill -9 of the worker process simulating chunk 3:
    the chunk is retried elsewhere, the log names it, and both files equal the pool's."""
    import signal
    import threading
    import time

    from distributed import LocalCluster

    marker, sched_file = tmp_path / "held", tmp_path / "scheduler.json"
    monkeypatch.setenv("FASTSHOWER_TEST_HOLD_SEED", str(chunk_seed(5, 3)))  # before the workers start
    monkeypatch.setenv("FASTSHOWER_TEST_HOLD_FILE", str(marker))
    kw = dict(geometry="belle2-ecl-5x5", particle="e-", energy="1:2", n=60, seed=5, chunk_size=10, progress=False,
              backend=HeldBackend)
    killed: list[int] = []

    def kill_when_held() -> None:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if marker.exists():
            killed.append(int(marker.read_text()))
            os.kill(killed[0], signal.SIGKILL)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
                      scheduler_kwargs={"scheduler_file": str(sched_file)}) as cluster:
        killer = threading.Thread(target=kill_when_held, daemon=True)
        killer.start()
        with caplog.at_level(logging.WARNING, logger=dask_run.__name__):
            res = simulate(out=tmp_path / "file.h5", executor="dask", scheduler=str(sched_file), **kw)
        killer.join(timeout=5)
        assert killed and res.complete and res.n_written == 60
        assert "chunk 3 retried: worker" in caplog.text
        by_address = simulate(out=tmp_path / "address.h5", executor="dask", scheduler=cluster.scheduler_address,
                              **kw)
        assert by_address.complete
    simulate(out=tmp_path / "pool.h5", jobs=2, **kw)
    _assert_same(tmp_path / "pool.h5", tmp_path / "file.h5")
    _assert_same(tmp_path / "pool.h5", tmp_path / "address.h5")


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:9", "no address::", "missing-scheduler.json"])
def test_bad_scheduler_one_line_status_2_nothing_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str], address: str) -> None:
    monkeypatch.setattr(dask_run, "_CONNECT_TIMEOUT_S", 2)
    monkeypatch.chdir(tmp_path)
    rc = main(["simulate", "--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "1", "--n", "10",
               "--out", "x.h5", "--executor", "dask", "--scheduler", address])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("fastshower: error: ") and "scheduler" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.h5").exists()


def test_executor_arguments_checked_first(tmp_path: Path) -> None:
    with pytest.raises(SimulationError, match=r"^executor must be pool or dask, got 'ray'$"):
        simulate("belle2-ecl-5x5", "e-", "1", 10, tmp_path / "x.h5", executor="ray")
    with pytest.raises(SimulationError, match=r"needs executor='dask'"):
        simulate("belle2-ecl-5x5", "e-", "1", 10, tmp_path / "x.h5", scheduler="tcp://127.0.0.1:9")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # about 20 s: a LocalCluster twice and 30 slow chunks
def test_ctrl_c_keeps_finished_chunks_and_resume_completes(tmp_path: Path) -> None:
    import subprocess
    import sys

    from test_simulate import _RUN, _SLOW_BACKEND, interrupt_after_rows

    (tmp_path / "slowbackend.py").write_text(_SLOW_BACKEND)
    run = _RUN.replace('"--quiet"]', '"--quiet", "--executor", "dask", "--jobs", "2"]')
    assert run != _RUN
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # the workers import slowbackend too
    proc = subprocess.Popen([sys.executable, "-c", run], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "ctrlc.h5"
    # not created yet, or being created while the client's cluster starts
    n, err = interrupt_after_rows(proc, out, unreadable=(Exception,))
    assert proc.returncode == 130, err
    assert "interrupted;" in err and "continue with --resume" in err
    with ShowerFile(out, require_complete=False) as f:
        kept = f.n
        assert kept >= n and not f.complete and kept % 10 == 0
    res = simulate("belle2-ecl-5x5", "e-", "1", 1000, out, resume=True, progress=False, executor="dask", jobs=2,
                   backend=QuickBackend)
    assert res.complete and res.n_new == 1000 - kept


def test_progress_fed_by_each_finished_task_resumed_chunk_trimmed() -> None:
    from fastshower.geometry import get_geometry
    from fastshower.montecarlo.backend import BackendOptions

    spec = dask_run.WorkerSpec((QuickBackend.__module__, "QuickBackend"), get_geometry("belle2-ecl-5x5").to_json(),
                               "e-", BackendOptions())
    tasks = [(k, 2 if k == 0 else 0, np.full(5, 1000.0), {}, 7 + k) for k in range(4)]  # chunk 0: 2 already kept
    got: list[int] = []
    seen: list[tuple[str, int, int]] = []

    def take(kind: str, index: int, payload: object, detail: object) -> None:
        seen.append((kind, index, len(payload) if isinstance(payload, ShowerBatch) else -1))

    with dask_run.connect(None, 2) as client:
        assert dask_run.run_chunks(client, spec, tasks, take, got.append) is None
    assert sorted(got) == [3, 5, 5, 5]
    assert sorted((i, n) for kind, i, n in seen if kind == "done") == [(0, 3), (1, 5), (2, 5), (3, 5)]
    assert seen[0][0] == "ready"


class ShowerByShowerBackend(QuickBackend):
    """QuickBackend's showers, 0.15 s each, each reported as it finishes, every report sent (no interval)."""

    progress_interval_s = 0.0

    def run(self, energies_mev: np.ndarray, conditions: dict[str, np.ndarray], seed: int) -> ShowerBatch:
        import time

        for _ in energies_mev:
            time.sleep(0.15)
            self.shower_done()
        return super().run(energies_mev, conditions, seed)


def test_progress_moves_per_shower_before_a_task_ends() -> None:
    """Issue 17's bar on Dask: tasks report their showers as they finish (events through the scheduler), so the
    bar moves before the first chunk is back; each shower is counted once, a resumed chunk's kept ones not."""
    from fastshower.geometry import get_geometry
    from fastshower.montecarlo.backend import BackendOptions

    spec = dask_run.WorkerSpec((ShowerByShowerBackend.__module__, "ShowerByShowerBackend"),
                               get_geometry("belle2-ecl-5x5").to_json(), "e-", BackendOptions())
    tasks = [(k, 2 if k == 0 else 0, np.full(8, 1000.0), {}, 7 + k) for k in range(3)]  # chunk 0: 2 already kept
    got: list[int] = []
    on_bar_at_first_done: list[int] = []

    def take(kind: str, index: int, payload: object, detail: object) -> None:
        if kind == "done" and not on_bar_at_first_done:
            on_bar_at_first_done.append(sum(got))

    with dask_run.connect(None, 2) as client:
        assert dask_run.run_chunks(client, spec, tasks, take, got.append) is None
    assert sum(got) == 6 + 8 + 8
    assert len(got) > 6  # per shower, not per task
    # the first chunk to come back had its showers on the bar (from its events) but for the last few
    assert on_bar_at_first_done[0] >= 4


def test_progress_counts_a_retried_chunk_once() -> None:
    got: list[int] = []
    counter = dask_run._Progress(got.append)
    for event in ([0, 3], [1, 2], [0, 1], [0, 2], [0, 4]):  # chunk 0's worker died after 3; its retry restarts
        counter((0.0, event))
    counter.finish(0, 5)
    counter((0.0, [0, 5]))  # late event of a finished chunk
    counter((0.0, "junk"))
    counter.finish(1, 4)
    counter.close()
    counter((0.0, [2, 1]))  # after the run
    assert got == [3, 2, 1, 1, 2] and sum(got) == 9
