"""Reliability (issue 16): a second writer, a full disk, kill -9 at any moment, and bad input answered in one line.

Each test reproduces one failure of the issue: two writers on one file, a disk that fills up mid-run, a
writer killed at random moments (the file must open with plain h5py and hold every finished chunk), a
resumed training config, and the inputs that were accepted silently or answered with a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

import fastshower.io as fio
from fastshower.cli import main
from fastshower.geometry import get_geometry
from fastshower.io import ShowerBatch, ShowerFile, ShowerFileError, ShowerWriter, merge_files, write_showers
from fastshower.montecarlo.backend import SimulationBackend
from fastshower.montecarlo.run import simulate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # multiprocessing fork notices

GEO = get_geometry("belle2-ecl-5x5")


class QuickBackend(SimulationBackend):
    """A cheap deterministic 'Monte Carlo' (importable by workers as ``test_reliability.QuickBackend``)."""

    generator = "quick toy backend (tests)"

    def run(self, energies_mev: np.ndarray, conditions: dict[str, np.ndarray], seed: int) -> ShowerBatch:
        rng = np.random.default_rng(seed)
        showers = rng.dirichlet(np.ones(self.geometry.n_voxels), len(energies_mev)) * energies_mev[:, None]
        return ShowerBatch(energies_mev, showers, dict(conditions))


def _batch(n: int, seed: int) -> ShowerBatch:
    rng = np.random.default_rng(seed)
    return ShowerBatch(rng.uniform(500, 2500, n), rng.exponential(1.0, (n, 25)).astype(np.float32))


def _plain(path: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    """(energies (N,), showers (N, 25), complete) read with plain h5py, as a physicist's script would."""
    with h5py.File(path, "r") as f:
        return f["incident_energies"][:, 0], f["showers"][:], bool(f.attrs["complete"])


# --- 1. a second writer ----------------------------------------------------------------------------

_HOLDER = """
import sys, numpy as np
from fastshower.geometry import get_geometry
from fastshower.io import ShowerBatch, ShowerWriter
rng = np.random.default_rng(0)
def batch():
    return ShowerBatch(rng.uniform(500, 2500, 100), rng.exponential(1.0, (100, 25)).astype(np.float32))
with ShowerWriter(sys.argv[1], get_geometry("belle2-ecl-5x5"), "e-", "holder (tests)", 300) as w:
    w.append(batch())
    print("holding", flush=True)
    sys.stdin.readline()  # the test says when to go on
    w.append(batch())
    w.append(batch())
print("done", flush=True)
"""


def test_a_second_writer_is_refused_naming_the_live_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    path = tmp_path / "X.h5"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "holding"
        for resume in (True, False):
            with pytest.raises(ShowerFileError, match=f"being written by process {proc.pid} "):
                ShowerWriter(path, GEO, "e-", "intruder", 600, resume=resume)
        # the CLI: one line, exit 2, before any worker starts
        argv = ["simulate", "--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "1", "--n", "600",
                "--out", str(path), "--quiet"]
        for extra in (["--resume"], []):
            assert main(argv + extra) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"being written by process {proc.pid}" in err
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()
    energies, showers, complete = _plain(path)  # the live run finished intact
    assert complete and len(energies) == 300 and len(np.unique(showers[:, 0])) == 300
    assert not path.with_name("X.h5.lock").exists() and not path.with_name("X.h5.parts").exists()


def test_a_reader_does_not_block_a_resume(tmp_path: Path) -> None:
    path = tmp_path / "r.h5"
    with pytest.raises(RuntimeError):
        with ShowerWriter(path, GEO, "e-", "test", 200) as w:
            w.append(_batch(100, 0))
            raise RuntimeError("interrupted")
    with h5py.File(path, "r") as reader, ShowerWriter(path, GEO, "e-", "test", 200, resume=True) as w:
        assert reader["showers"].shape == (100, 25)
        w.append(_batch(100, 1))
    assert _plain(path)[2]


# --- 2. a full disk --------------------------------------------------------------------------------


@contextlib.contextmanager
def _disk_full_after(monkeypatch: pytest.MonkeyPatch, n_files: int) -> Iterator[None]:
    """Every file write after the first ``n_files`` fails with ENOSPC, as on a full disk."""
    real_open = open
    count = {"n": 0}

    def full_open(file: object, mode: str = "r", *args: object, **kw: object):  # type: ignore[no-untyped-def]
        if "w" in mode and str(file).endswith(".tmp"):
            count["n"] += 1
            if count["n"] > n_files:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(fio, "open", full_open, raising=False)
    yield
    monkeypatch.undo()


def test_a_full_disk_stops_the_run_and_resume_completes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kw = dict(geometry="belle2-ecl-5x5", particle="e-", energy="0.5:2", n=80, seed=3, chunk_size=10, jobs=1,
              progress=False, backend=QuickBackend)
    ref = simulate(out=tmp_path / "ref.h5", **kw).path  # type: ignore[arg-type]
    out = tmp_path / "full.h5"
    # 1 index + 3 chunks of (part, index) fit: the disk fills up during the 4th chunk
    with _disk_full_after(monkeypatch, 7), pytest.raises(ShowerFileError) as info:
        simulate(out=out, **kw)  # type: ignore[arg-type]
    assert str(info.value) == (f"{out}: cannot write showers 30-39 (No space left on device); the file keeps the "
                               "30 before them: make room and continue with resume=True")
    energies, showers, complete = _plain(out)  # only whole chunks, none of them zeros
    assert len(energies) == 30 and not complete and (energies > 0).all() and (showers.sum(1) > 0).all()
    assert not list(tmp_path.glob("**/*.tmp"))
    simulate(out=out, resume=True, **{k: v for k, v in kw.items() if k != "seed"})  # type: ignore[arg-type]
    a, b = _plain(out), _plain(ref)
    assert a[2] and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_a_full_disk_on_finishing_keeps_the_showers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 100))
    path = tmp_path / "f.h5"
    with pytest.raises(ShowerFileError, match=r"cannot finish the file \(No space left on device.*resume=True"):
        with ShowerWriter(path, GEO, "e-", "test", 100) as w:
            w.append(_batch(100, 0))
    assert _plain(path)[0].shape == (100,) and not _plain(path)[2]
    monkeypatch.undo()
    with ShowerWriter(path, GEO, "e-", "test", 100, resume=True):
        pass
    assert _plain(path)[2]


def _tmpfs(where: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` at ``where`` (root only); False where the platform does not allow it."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


_SIMULATE = """
import sys
import fastshower.montecarlo.run as run
from fastshower.cli import main
from test_reliability import QuickBackend
run.backend_class = lambda geometry: QuickBackend
sys.exit(main(["simulate", "--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "1", "--n", sys.argv[2],
               "--out", sys.argv[1], "--chunk-size", "100", "--quiet", "--jobs", "2", *sys.argv[3:]]))
"""


def _cli_simulate(out: Path, n: int, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run([sys.executable, "-c", _SIMULATE, str(out), str(n), *extra], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_real_full_disk_is_one_line_not_a_segfault(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "1m"):
        pytest.skip("needs root to mount a 1 MiB tmpfs")
    try:
        out = disk / "X.h5"
        r = _cli_simulate(out, 6000, "--seed", "7")
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"fastshower: error: {out}: cannot write showers ") and "No space left" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        energies, _, complete = _plain(out)
        assert not complete and len(energies) % 100 == 0 and (energies > 0).all()
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert _cli_simulate(out, 6000, "--resume").returncode == 0
        ref = tmp_path / "ref.h5"
        assert _cli_simulate(ref, 6000, "--seed", "7").returncode == 0
        a, b = _plain(out), _plain(ref)
        assert a[2] and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_parts_are_merged_so_an_index_stays_small(tmp_path: Path) -> None:
    path = tmp_path / "many.h5"
    batches = [_batch(2, i) for i in range(300)]
    w = ShowerWriter(path, GEO, "e-", "test", 1000)
    for b in batches:
        w.append(b)
    w.close(complete=False)
    parts = sorted(p.name for p in (tmp_path / "many.h5.parts").iterdir())
    # 300 chunks = 1 x 256 (level 2) + 2 x 16 (level 1) + 12 single chunks
    assert len(parts) == 15 and parts[0] == "rows-000000000000-L2.h5"
    energies, showers, _ = _plain(path)
    np.testing.assert_array_equal(showers, np.concatenate([b.showers for b in batches]))
    np.testing.assert_array_equal(energies, np.concatenate([b.energies for b in batches]))


# --- 3. kill -9 at any moment ----------------------------------------------------------------------

_WRITER = """
import sys, numpy as np
from fastshower.geometry import get_geometry
from fastshower.io import ShowerBatch, ShowerWriter
w = ShowerWriter(sys.argv[1], get_geometry("belle2-ecl-5x5"), "e-", "test", 10**6)
for i in range(10**6):
    rng = np.random.default_rng(i)
    w.append(ShowerBatch(rng.uniform(500, 2500, 100), rng.exponential(1.0, (100, 25)).astype(np.float32)))
    print(w.n_written, flush=True)
"""


def test_kill_9_at_random_moments_leaves_a_plain_h5py_file(tmp_path: Path) -> None:
    rng = random.Random(16)
    for trial in range(4):
        path = tmp_path / f"k{trial}.h5"
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        written = int(proc.stdout.readline())  # the first chunk is committed
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        written = max([written, *(int(line) for line in proc.stdout.read().split())])
        proc.stdout.close()
        energies, _, complete = _plain(path)
        assert not complete and len(energies) >= written and len(energies) % 100 == 0
        for i in range(0, len(energies), 100):  # every chunk whole and in its place
            rng_i = np.random.default_rng(i // 100)
            np.testing.assert_array_equal(energies[i:i + 100], rng_i.uniform(500, 2500, 100))
        with ShowerWriter(path, GEO, "e-", "test", len(energies) + 100, resume=True) as w:
            w.append(_batch(100, 9))
        assert _plain(path)[2] and not path.with_name(path.name + ".parts").exists()


_MERGE = """
import sys, time
from fastshower.io import merge_files
def slow(batch):
    time.sleep(0.01)
    return batch
merge_files(sys.argv[1:3], sys.argv[3], chunk_rows=20, map_batch=slow, resume=len(sys.argv) > 4)
"""


def test_a_killed_merge_opens_plainly_and_resumes_to_the_same_file(tmp_path: Path) -> None:
    inputs = [str(write_showers(tmp_path / f"{p}.h5", GEO, _batch(200, i), p, "test"))
              for i, p in enumerate(("p", "Fe"))]
    merge_files(inputs, tmp_path / "ref.h5", chunk_rows=20)
    out = tmp_path / "m.h5"
    proc = subprocess.Popen([sys.executable, "-c", _MERGE, *inputs, str(out)])
    while not out.exists() or len(_plain(out)[0]) < 40:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n = len(_plain(out)[0])
    assert 40 <= n < 400 and not _plain(out)[2]
    assert subprocess.run([sys.executable, "-c", _MERGE, *inputs, str(out), "resume"]).returncode == 0
    a, b = _plain(out), _plain(tmp_path / "ref.h5")
    assert a[2] and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


_SLOW_SIMULATE = _SIMULATE.replace("from test_reliability import QuickBackend",
                                   "from test_reliability import SlowBackend as QuickBackend")


class SlowBackend(QuickBackend):
    """0.2 s per chunk: a run long enough to be killed in the middle."""

    def run(self, energies_mev: np.ndarray, conditions: dict[str, np.ndarray], seed: int) -> ShowerBatch:
        time.sleep(0.2)
        return super().run(energies_mev, conditions, seed)


def test_orphaned_workers_of_a_killed_simulate_exit_quietly(tmp_path: Path) -> None:
    out = tmp_path / "o.h5"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SIMULATE, str(out), "100000"], env=env,
                            stderr=subprocess.PIPE, text=True)
    while not out.exists() or len(_plain(out)[0]) < 200:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    # stderr ends only when every process holding it (workers, resource tracker) has exited
    _, err = proc.communicate(timeout=30)
    assert err == "", err
    assert len(_plain(out)[0]) >= 200 and not _plain(out)[2]


# --- damaged files and refused requests -------------------------------------------------------------


def test_info_says_a_file_with_zero_rows_is_damaged_and_resume_redoes_them(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]
                                                                           ) -> None:
    """A file an old writer left on a full disk: claims 100 showers, rows 60-99 never written (zeros)."""
    path = tmp_path / "zeros.h5"
    b = _batch(100, 0)
    with h5py.File(path, "w") as f:
        f["incident_energies"] = np.where(np.arange(100) < 60, b.energies, 0.0)[:, None]
        f["showers"] = np.where(np.arange(100)[:, None] < 60, b.showers, 0.0)
        f.attrs.update(geometry=GEO.to_json(), particle="e-", complete=True, n_target=100)
    assert main(["info", str(path)]) == 0
    assert "DAMAGED:    40 of the 100 showers were never written" in capsys.readouterr().out
    with ShowerWriter(path, GEO, "e-", "test", 100, resume=True) as w:
        assert w.n_written == 60
        w.append(ShowerBatch(b.energies[60:], b.showers[60:]))
    energies, showers, complete = _plain(path)
    assert complete and np.array_equal(energies, b.energies) and np.array_equal(showers, b.showers)


_OLD_SWMR_WRITER = """
import os, sys, numpy as np, h5py
from fastshower.geometry import get_geometry
f = h5py.File(sys.argv[1], "w", libver="latest")
f.create_dataset("incident_energies", data=np.full((100, 1), 1000.0), maxshape=(None, 1), chunks=(100, 1))
f.create_dataset("showers", data=np.ones((100, 25), np.float32), maxshape=(None, 25), chunks=(100, 25))
f.create_group("conditions"); f.create_group("truth")
f.attrs.update(geometry=get_geometry("belle2-ecl-5x5").to_json(), particle="e-", complete=False, n_target=200)
f.swmr_mode = True
f.flush()
os._exit(0)  # killed with the file open: its consistency flags stay set
"""


def test_a_file_an_old_swmr_writer_was_killed_with_is_resumed(tmp_path: Path) -> None:
    path = tmp_path / "old.h5"
    subprocess.run([sys.executable, "-c", _OLD_SWMR_WRITER, str(path)], check=True)
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")
    with ShowerFile(path, require_complete=False) as f:
        assert f.n == 100
    with ShowerWriter(path, GEO, "e-", "test", 200, resume=True) as w:
        w.append(_batch(100, 0))
    energies, showers, complete = _plain(path)
    assert complete and len(energies) == 200 and (showers[:100] == 1).all()


def test_a_missing_parts_folder_is_reported_as_damage(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    w = ShowerWriter(path, GEO, "e-", "test", 200)
    w.append(_batch(100, 0))
    w.close(complete=False)
    shutil.rmtree(tmp_path / "p.h5.parts")
    with pytest.raises(ShowerFileError, match=r"damaged: 1 of the 1 parts .* are missing"):
        ShowerFile(path, require_complete=False)


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_resume_refuses_another_seed_or_chunk_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.h5"
    kw = dict(geometry="belle2-ecl-5x5", particle="e-", energy="1", n=40, out=out, progress=False,
              backend=QuickBackend)
    simulate(seed=7, chunk_size=10, **{**kw, "n": 20})  # type: ignore[arg-type]
    for bad, word in (({"seed": 8}, "seed=7, not 8"), ({"chunk_size": 20}, "chunk_size=10, not 20")):
        with pytest.raises(ShowerFileError, match=word):
            simulate(resume=True, **bad, **kw)  # type: ignore[arg-type]
    assert simulate(resume=True, seed=7, **kw).n_written == 40  # type: ignore[arg-type]
    assert main(["simulate", "--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "1", "--n", "10",
                 "--out", str(tmp_path / "z.h5"), "--chunk-size", "0", "--quiet"]) == 2
    assert "chunk_size must be a positive number of showers, got 0" in _one_error(capsys)


@pytest.fixture(scope="module")
def vae_run(tiny_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastshower.training import train

    return Path(train(tiny_file, "vae", tmp_path_factory.mktemp("rel") / "vae", steps=2, batch_size=32,
                      progress=False))


def test_generate_resumes_to_the_uninterrupted_file(vae_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from fastshower.generation import generate

    kw = dict(run=vae_run, energy="1:5", batch_size=10, seed=4, progress=False)
    generate(n=35, out=tmp_path / "ref.h5", **kw)  # type: ignore[arg-type]
    out = tmp_path / "g.h5"
    generate(n=20, out=out, **kw)  # type: ignore[arg-type]
    argv = ["generate", "--run", str(vae_run), "--n", "35", "--energy", "1:5", "--batch-size", "10", "--seed", "4",
            "--out", str(out), "--quiet"]
    assert main(argv) == 2
    assert "exists; use --resume" in _one_error(capsys)  # the CLI names its flag, which generate has:
    assert main([*argv[:-1], "--seed", "5", "--resume"]) == 2
    assert "was generated with seed=4, not 5" in _one_error(capsys)
    assert main([*argv, "--resume"]) == 0
    a, b = _plain(out), _plain(tmp_path / "ref.h5")
    assert a[2] and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_export_keeps_an_existing_file_without_overwrite(vae_run: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"precious")
    assert main(["export", "--run", str(vae_run), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in _one_error(capsys) and out.read_bytes() == b"precious"
    assert main(["export", "--run", str(vae_run), "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != b"precious"


def test_a_read_only_file_system_is_one_line(vae_run: Path, tiny_file: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmp_path / "ro"
    if not _tmpfs(disk, "1m"):
        pytest.skip("needs root to mount a read-only tmpfs (root ignores file permissions)")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        commands = [
            ["simulate", "--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "1", "--n", "10", "--out",
             str(disk / "s.h5"), "--quiet"],
            ["generate", "--run", str(vae_run), "--n", "10", "--energy", "2", "--out", str(disk / "g.h5"), "--quiet"],
            ["train", "--data", str(tiny_file), "--model", "vae", "--steps", "1", "--out", str(disk / "r"), "--quiet"],
            ["export", "--run", str(vae_run), "--out", str(disk / "m.onnx")],
        ]
        for argv in commands:
            assert main(argv) == 2, argv
            assert "Read-only file system" in _one_error(capsys)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_train_refuses_no_steps(tiny_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                steps: str) -> None:
    assert main(["train", "--data", str(tiny_file), "--model", "vae", "--out", str(tmp_path / "r"), "--steps", steps,
                 "--quiet"]) == 2
    assert f"steps must be >= 1, got {steps}" in _one_error(capsys) and not (tmp_path / "r").exists()


def test_wgan_toml_config_resumes_its_own_run_from_the_cli(tiny_file: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "wgan.toml"
    cfg.write_text('model = "wgan-gp"\n[hparams]\nhidden = 16\nbetas = [0.5, 0.9]\n[train]\nbatch_size = 16\n')
    argv = ["train", "--data", str(tiny_file), "--model", "wgan-gp", "--config", str(cfg), "--out",
            str(tmp_path / "w"), "--quiet"]
    assert main([*argv, "--steps", "2"]) == 0
    assert main([*argv, "--steps", "3", "--resume"]) == 0, capsys.readouterr().err
