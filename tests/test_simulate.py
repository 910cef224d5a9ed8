"""The production driver: reproducibility, resume, crash safety, bad input, physics sanity with Geant4."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fastshower.geometry import get_geometry
from fastshower.io import ShowerBatch, ShowerFile, ShowerFileError
from fastshower.montecarlo.backend import BackendOptions, SimulationBackend, SimulationError
from fastshower.montecarlo.run import simulate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # multiprocessing fork notices


class ToyBackend(SimulationBackend):
    """A cheap deterministic 'Monte Carlo': the driver's logic without Geant4's start-up cost."""

    generator = "toy backend (tests)"

    @classmethod
    def condition_widths(cls, geometry, options):  # type: ignore[no-untyped-def]
        return {"position": 2}

    @classmethod
    def draw_conditions(cls, geometry, options, rng, n):  # type: ignore[no-untyped-def]
        return {"position": rng.uniform(-30, 30, (n, 2))}

    def run(self, energies_mev: np.ndarray, conditions: dict[str, np.ndarray], seed: int) -> ShowerBatch:
        rng = np.random.default_rng(seed)
        showers = rng.dirichlet(np.ones(self.geometry.n_voxels), len(energies_mev)) * energies_mev[:, None]
        return ShowerBatch(energies_mev, showers, dict(conditions))


class CrashingBackend(ToyBackend):
    """Dies like a Geant4 abort (the process exits) on its third chunk."""

    calls = 0

    def run(self, energies_mev: np.ndarray, conditions: dict[str, np.ndarray], seed: int) -> ShowerBatch:
        CrashingBackend.calls += 1
        if CrashingBackend.calls == 3:
            os._exit(134)
        return super().run(energies_mev, conditions, seed)


class ShowerByShowerBackend(ToyBackend):
    """The toy's showers, reported one by one as Geant4's end-of-event hook does, with no throttling."""

    progress_interval_s = 0.0

    def run(self, energies_mev: np.ndarray, conditions: dict[str, np.ndarray], seed: int) -> ShowerBatch:
        for _ in energies_mev:
            self.shower_done()
        return super().run(energies_mev, conditions, seed)


class TablesBackend(ToyBackend):
    """The toy's showers, each with the pid of the worker that made it (truth ``pid``), and a table report."""

    @classmethod
    def truth_widths(cls, geometry, options):  # type: ignore[no-untyped-def]
        return {"pid": 1}

    def tables(self) -> list[dict[str, object]]:
        return [{"table": "toy", "version": "toy-tables-v1", "source": "cache"}]

    def run(self, energies_mev: np.ndarray, conditions: dict[str, np.ndarray], seed: int) -> ShowerBatch:
        batch = super().run(energies_mev, conditions, seed)
        return ShowerBatch(batch.energies, batch.showers, batch.conditions,
                           {"pid": np.full((len(energies_mev), 1), float(os.getpid()))})


class GrowingTablesBackend(TablesBackend):
    """As :class:`TablesBackend`, but each chunk extends the worker's tables (as a higher-energy chunk extends the
    air-shower tables): one table entry per chunk run, keyed by the chunk's first energy (truth ``first``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[dict[str, object]] = []

    @classmethod
    def truth_widths(cls, geometry, options):  # type: ignore[no-untyped-def]
        return {"pid": 1, "first": 1}

    def tables(self) -> list[dict[str, object]]:
        return list(self.log)

    def run(self, energies_mev: np.ndarray, conditions: dict[str, np.ndarray], seed: int) -> ShowerBatch:
        batch = super().run(energies_mev, conditions, seed)
        self.log.append({"table": "toy", "version": "toy-tables-v1", "source": "extended",
                         "first_mev": float(energies_mev[0])})
        first = np.full((len(energies_mev), 1), float(energies_mev[0]))
        return ShowerBatch(batch.energies, batch.showers, batch.conditions, {**batch.truth, "first": first})


def assert_tables_cover_every_chunk(path: Path) -> None:
    """Each worker that made showers of a GrowingTablesBackend file has one entry, whose tables name exactly the
    chunks it made (its first chunk's and all later ones)."""
    entries, pids = worker_tables(path)
    with ShowerFile(path) as f:
        truth = f.read().truth
    assert sorted(e["pid"] for e in entries) == sorted(pids)  # one entry per producing worker
    for e in entries:
        made = {float(x) for x, p in zip(truth["first"].ravel(), truth["pid"].ravel(), strict=True) if p == e["pid"]}
        listed = [t["first_mev"] for t in e["tables"]]
        assert len(listed) == len(set(listed)) and set(listed) == made


def worker_tables(path: Path) -> tuple[list[dict[str, object]], set[int]]:
    """The file's ``worker_tables`` entries and the pids of the workers that made its showers (TablesBackend)."""
    import json

    with ShowerFile(path) as f:
        entries = json.loads(f.attrs["worker_tables"])
        pids = {int(p) for p in f.read().truth["pid"].ravel()}
    return entries, pids


def _read(path: Path) -> ShowerBatch:
    with ShowerFile(path) as f:
        return f.read()


def test_same_seed_same_showers_whatever_the_jobs(tmp_path: Path) -> None:
    kw = dict(geometry="belle2-ecl-5x5", particle="e-", energy="0.5,1", n=70, seed=5, chunk_size=20,
              progress=False, backend=ToyBackend)
    simulate(out=tmp_path / "a.h5", jobs=1, **kw)
    simulate(out=tmp_path / "b.h5", jobs=3, **kw)
    a, b = _read(tmp_path / "a.h5"), _read(tmp_path / "b.h5")
    np.testing.assert_array_equal(a.showers, b.showers)
    np.testing.assert_array_equal(a.energies, b.energies)
    simulate(out=tmp_path / "c.h5", jobs=1, **{**kw, "seed": 6})
    assert not np.array_equal(_read(tmp_path / "c.h5").showers, a.showers)


class _RecordingBar:
    """A stand-in for the tqdm bar that logs its updates next to the chunks the writer receives."""

    def __init__(self, log: list[tuple[str, int]]) -> None:
        self.log = log

    def update(self, k: int) -> None:
        self.log.append(("bar", k))

    def close(self) -> None:
        pass


def test_progress_moves_per_shower_before_the_first_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastshower.montecarlo import run

    log: list[tuple[str, int]] = []
    take = run._ChunkWriter.take

    def logged_take(self: run._ChunkWriter, kind: str, index: int, payload: object, detail: object) -> str | None:
        if kind == "done":
            log.append(("done", index))
        return take(self, kind, index, payload, detail)

    monkeypatch.setattr(run, "_bar", lambda plan, progress: _RecordingBar(log))
    monkeypatch.setattr(run._ChunkWriter, "take", logged_take)
    kw = dict(geometry="belle2-ecl-5x5", particle="e-", energy="1:2", n=30, seed=2, chunk_size=20, jobs=1)
    simulate(out=tmp_path / "a.h5", backend=ShowerByShowerBackend, **kw)  # type: ignore[arg-type]
    first_done = log.index(("done", 0))
    assert log[:first_done] == [("bar", 1)] * 20  # chunk 0 (20 showers) moved the bar shower by shower
    assert sum(k for what, k in log if what == "bar") == 30
    monkeypatch.undo()
    simulate(out=tmp_path / "b.h5", backend=ToyBackend, progress=False, **kw)  # type: ignore[arg-type]
    a, b = _read(tmp_path / "a.h5"), _read(tmp_path / "b.h5")
    np.testing.assert_array_equal(a.showers, b.showers)
    np.testing.assert_array_equal(a.energies, b.energies)


def test_resume_tops_up_to_the_same_showers(tmp_path: Path) -> None:
    kw = dict(geometry="belle2-ecl-5x5", particle="e-", energy="1:2", seed=1, chunk_size=20, progress=False,
              backend=ToyBackend)
    simulate(out=tmp_path / "full.h5", n=90, **kw)
    simulate(out=tmp_path / "part.h5", n=50, **kw)  # ends inside chunk 2
    res = simulate(out=tmp_path / "part.h5", n=90, resume=True, **kw)
    assert res.n_new == 40 and res.complete
    again = simulate(out=tmp_path / "part.h5", n=90, resume=True, **kw)  # complete already: its provenance kept
    assert again.n_new == 0 and again.complete and again.generator == res.generator != ""
    full, part = _read(tmp_path / "full.h5"), _read(tmp_path / "part.h5")
    np.testing.assert_array_equal(full.showers, part.showers)
    np.testing.assert_array_equal(full.conditions["position"], part.conditions["position"])


def test_dead_worker_is_reported_and_finished_chunks_kept(tmp_path: Path) -> None:
    out = tmp_path / "crash.h5"
    with pytest.raises(SimulationError, match=r"worker process died.*40 of 100 showers are kept.*resume=True"):
        simulate("belle2-ecl-5x5", "e-", "1", 100, out, chunk_size=20, progress=False, backend=CrashingBackend)
    with ShowerFile(out, require_complete=False) as f:
        assert f.n == 40 and not f.complete
    res = simulate("belle2-ecl-5x5", "e-", "1", 100, out, chunk_size=20, progress=False, resume=True,
                   backend=ToyBackend)
    assert res.n_written == 100


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"n": 0}, r"^n must be a positive number of showers, got 0$"),
        ({"jobs": 0}, r"^jobs must be >= 1, got 0$"),
        ({"cut_mm": 0.0}, r"^cut_mm must be a positive length in mm"),
        ({"physics": "nope"}, r"^physics must be auto, official or substitute, got 'nope'$"),
    ],
)
def test_bad_arguments_are_named_as_python_arguments(tmp_path: Path, kw: dict, message: str) -> None:
    args = dict(geometry="belle2-ecl-5x5", particle="e-", energy="1", n=5, out=tmp_path / "x.h5", progress=False,
                backend=ToyBackend) | kw
    with pytest.raises(SimulationError, match=message):
        simulate(**args)
    assert not (tmp_path / "x.h5").exists()


def test_resume_errors_name_the_argument(tmp_path: Path) -> None:
    kw = dict(energy="1", n=20, seed=1, chunk_size=20, progress=False, backend=ToyBackend)
    with pytest.raises(ShowerFileError, match=r"^resume=True: .*x\.h5 does not exist \(drop resume=True"):
        simulate("belle2-ecl-5x5", "e-", out=tmp_path / "x.h5", resume=True, **kw)
    simulate("belle2-ecl-5x5", "e-", out=tmp_path / "x.h5", **kw)
    with pytest.raises(ShowerFileError, match=r"exists; use resume=True to top it up or choose another out$"):
        simulate("belle2-ecl-5x5", "e-", out=tmp_path / "x.h5", **kw)
    with pytest.raises(ShowerFileError, match=r"^resume=True: .* was made with energy 1, not 2"):
        simulate("belle2-ecl-5x5", "e-", out=tmp_path / "x.h5", resume=True, **{**kw, "energy": "2"})


def test_user_errors_share_one_base() -> None:
    from fastshower.data import DataError
    from fastshower.energy import EnergySpecError
    from fastshower.errors import FastshowerError
    from fastshower.geometry import GeometryError
    from fastshower.montecarlo.g4data import Geant4DataError
    from fastshower.montecarlo.geant4 import Geant4Error

    for cls, builtin in [(GeometryError, ValueError), (EnergySpecError, ValueError), (ShowerFileError, ValueError),
                         (DataError, ValueError), (SimulationError, RuntimeError), (Geant4DataError, RuntimeError),
                         (Geant4Error, RuntimeError)]:
        assert issubclass(cls, FastshowerError) and issubclass(cls, builtin), cls


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastshower", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--geometry", "nope", "--particle", "e-", "--energy", "1", "--n", "5"], "unknown geometry 'nope'"),
        (["--geometry", "belle2-ecl-5x5", "--particle", "mu-", "--energy", "1", "--n", "5"], "unknown particle"),
        (["--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "1:x", "--n", "5"], "cannot read energy"),
        (["--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "1e9", "--n", "5"], "outside the range"),
        (["--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "1", "--n", "0"], "positive number"),
        (["--geometry", "belle2-ecl-5x5", "--particle", "pi+", "--energy", "1", "--n", "5", "--physics",
          "substitute"], "official"),
        (["--geometry", "airshower-profile", "--particle", "Fe", "--energy", "1e18eV", "--n", "5", "--zenith",
          "95"], "zenith"),
    ],
)
def test_bad_simulate_requests_give_one_line_and_status_2(tmp_path: Path, args: list[str], message: str) -> None:
    r = _cli("simulate", *args, "--out", "x.h5", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.h5").exists()


def test_existing_output_and_mismatched_resume_are_refused(tmp_path: Path) -> None:
    kw = dict(energy="1", n=20, seed=1, chunk_size=20, progress=False, backend=ToyBackend)
    simulate("belle2-ecl-5x5", "e-", out=tmp_path / "a.h5", **kw)
    base = ["--energy", "1", "--n", "40", "--out", "a.h5"]
    r = _cli("simulate", "--geometry", "belle2-ecl-5x5", "--particle", "e-", *base, cwd=tmp_path)
    assert r.returncode == 2 and "exists; use --resume" in r.stderr
    r = _cli("simulate", "--geometry", "belle2-ecl-5x5", "--particle", "gamma", *base, "--resume", cwd=tmp_path)
    assert r.returncode == 2 and "holds e- showers, not gamma" in r.stderr
    r = _cli("simulate", "--geometry", "calogan-3layer", "--particle", "e-", *base, "--resume", cwd=tmp_path)
    assert r.returncode == 2 and "holds geometry 'belle2-ecl-5x5'" in r.stderr
    (tmp_path / "t.h5").write_bytes((tmp_path / "a.h5").read_bytes()[:2000])
    r = _cli("info", "t.h5", cwd=tmp_path)
    assert r.returncode == 2 and "truncated or corrupt" in r.stderr


def test_geant4_through_the_driver_and_cli(tmp_path: Path) -> None:
    """Real Geant4 (substitute EM tables unless official data are installed): Belle II 1 GeV e-."""
    r = _cli("simulate", "--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "1", "--n", "40",
             "--out", "b.h5", "--seed", "3", "--jobs", "2", "--chunk-size", "20", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "E_vis/E_inc" in r.stdout
    with ShowerFile(tmp_path / "b.h5") as f:
        b = f.read()
        assert "geant4 11.4" in f.generator and f.attrs["seed"] == 3
    ratio = b.showers.sum(1) / b.energies
    assert 0.85 < ratio.mean() < 1.0  # CsI, 16 X0: nearly full containment
    # the entry point is smeared over the centre crystal and the centre crystal takes most of the energy
    assert np.abs(b.conditions["position"]).max() <= 30.0
    assert (b.showers[:, 12] / b.showers.sum(1)).mean() > 0.6


def test_longitudinal_centre_grows_with_log_energy(tmp_path: Path) -> None:
    """Shower maximum ~ ln(E/Ec): the depth of the energy centroid rises linearly in ln E (Geant4, ILD)."""
    geo = get_geometry("ild-siw-30")
    z = geo.layer_z_centres()
    depths = []
    energies = (1.0, 4.0, 16.0)
    for i, e in enumerate(energies):
        out = tmp_path / f"ild{i}.h5"
        simulate(geo, "e-", str(e), 12, out, seed=i, jobs=2, chunk_size=6, progress=False)
        b = _read(out)
        layer_e = np.stack([b.showers[:, geo.layer_slice(k)].sum(1) for k in range(geo.n_layers)], 1)
        depths.append(float((layer_e @ z).sum() / layer_e.sum()))
    steps = np.diff(depths)
    assert np.all(steps > 0)
    # equal steps in ln E give equal steps in depth (within the statistics of 12 showers)
    assert steps[1] == pytest.approx(steps[0], rel=0.35)


def test_options_reach_the_backend() -> None:
    opts = BackendOptions(cut_mm=0.5, physics="substitute", extra={"zenith": "30"})
    assert opts.extra["zenith"] == "30" and opts.cut_mm == 0.5


_SLOW_BACKEND = '''
import time
import numpy as np
from fastshower.io import ShowerBatch
from fastshower.montecarlo.backend import SimulationBackend


class SlowBackend(SimulationBackend):
    generator = "slow toy backend (tests)"

    def run(self, energies_mev, conditions, seed):
        time.sleep(0.3)
        return ShowerBatch(energies_mev, np.ones((len(energies_mev), self.geometry.n_voxels)))
'''

_RUN = '''
import signal
import sys
# A shell that starts jobs in the background (CI runners may) hands them SIGINT ignored; restore what a
# terminal gives, so Ctrl-C raises KeyboardInterrupt as for a user.
signal.signal(signal.SIGINT, signal.default_int_handler)
from fastshower.cli import main
import fastshower.montecarlo.run as run
from slowbackend import SlowBackend
run.backend_class = lambda geometry: SlowBackend
sys.exit(main(["simulate", "--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "1", "--n", "1000",
               "--out", "ctrlc.h5", "--chunk-size", "10", "--quiet"]))
'''


def interrupt_after_rows(proc: subprocess.Popen[str], out: Path, rows: int = 30,
                         unreadable: tuple[type[Exception], ...] = (ShowerFileError,)) -> tuple[int, str]:
    """Wait (at most 120 s) until ``out`` holds ``rows`` showers, then Ctrl-C ``proc``; returns the rows seen
    before the interrupt and the process's stderr. ``unreadable``: errors of a file not created yet."""
    import signal
    import time

    deadline, n = time.time() + 120, 0
    try:
        while n < rows and time.time() < deadline:
            time.sleep(0.2)
            try:
                with ShowerFile(out, require_complete=False) as f:
                    n = f.n
            except unreadable:
                continue  # not created yet
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return n, err


def test_ctrl_c_keeps_every_finished_chunk(tmp_path: Path) -> None:
    (tmp_path / "slowbackend.py").write_text(_SLOW_BACKEND)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", _RUN], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "ctrlc.h5"
    n, err = interrupt_after_rows(proc, out)
    assert proc.returncode == 130, err
    assert "interrupted;" in err and "continue with --resume" in err
    with ShowerFile(out, require_complete=False) as f:
        assert f.n >= n and not f.complete and f.n % 10 == 0


def test_worker_tables_name_each_worker_and_survive_resume(tmp_path: Path) -> None:
    kw = dict(geometry="belle2-ecl-5x5", particle="e-", energy="1:2", seed=3, chunk_size=5, jobs=2, progress=False,
              backend=TablesBackend)
    out = tmp_path / "t.h5"
    simulate(out=out, n=20, **kw)
    first, _ = worker_tables(out)
    simulate(out=out, n=40, resume=True, **kw)
    entries, pids = worker_tables(out)
    assert entries[:len(first)] == first  # the first run's workers are kept
    assert {e["pid"] for e in entries} == pids and os.getpid() not in pids  # each producing worker, only those
    for e in entries:
        assert e["worker"] == f"{e['host']}:{e['pid']}"
        assert e["tables"] == [{"table": "toy", "version": "toy-tables-v1", "source": "cache"}]
    np.testing.assert_array_equal(_read(out).showers, _read(_plain(tmp_path, kw)).showers)


def test_worker_tables_include_tables_extended_after_the_first_chunk(tmp_path: Path) -> None:
    """A pool worker that extends its tables on later chunks (the air-shower tables grow with the energy) has
    them all in the file, not only those of its first chunk."""
    out = tmp_path / "g.h5"
    simulate("belle2-ecl-5x5", "e-", "1:2", 40, out, seed=3, chunk_size=5, jobs=2, progress=False,
             backend=GrowingTablesBackend)
    assert_tables_cover_every_chunk(out)
    entries, _ = worker_tables(out)
    assert sum(len(e["tables"]) for e in entries) == 8  # 40 showers in chunks of 5, each chunk one extension


def _plain(tmp_path: Path, kw: dict[str, object]) -> Path:
    """The same 40 showers in one go, without resume."""
    out = tmp_path / "plain.h5"
    simulate(out=out, n=40, **kw)  # type: ignore[arg-type]
    return out
