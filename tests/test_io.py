"""Shower files: format, provenance, crash safety, validation, converters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from fastshower.geometry import get_geometry
from fastshower.io import (
    ShowerBatch,
    ShowerFile,
    ShowerFileError,
    ShowerWriter,
    convert_3dgan,
    convert_calogan,
    write_showers,
)


@pytest.fixture
def blob_file(tmp_path: Path) -> Path:
    """A complete belle2-ecl-5x5 file: 100 showers at each of 0.5 and 1 GeV, with entry positions."""
    geo = get_geometry("belle2-ecl-5x5")
    rng = np.random.default_rng(1)
    e = np.repeat([500.0, 1000.0], 100)
    showers = rng.dirichlet(np.ones(25), 200) * (0.95 * e)[:, None]
    batch = ShowerBatch(e, showers, {"position": rng.uniform(-30, 30, (200, 2))})
    return write_showers(tmp_path / "belle.h5", geo, batch, "e-", "synthetic (tests)")


def _batch(n: int, v: int, seed: int = 0) -> ShowerBatch:
    rng = np.random.default_rng(seed)
    return ShowerBatch(rng.uniform(500, 2500, n), rng.exponential(10.0, (n, v)).astype(np.float32),
                       {"position": rng.uniform(-30, 30, (n, 2))})


def test_calochallenge_keys_units_and_provenance(blob_file: Path) -> None:
    with h5py.File(blob_file) as f:
        assert f["incident_energies"].shape == (200, 1)
        assert f["showers"].shape == (200, 25)
        assert f["conditions/position"].shape == (200, 2)
        assert f.attrs["complete"] and f.attrs["particle"] == "e-" and f.attrs["pdg"] == 11
        assert "fastshower_version" in f.attrs and "belle2-ecl-5x5" in f.attrs["geometry"]
    with ShowerFile(blob_file) as sf:
        assert sf.geometry.name == "belle2-ecl-5x5" and sf.n == 200
        assert set(np.unique(sf.energies())) == {500.0, 1000.0}
        assert "e-" in sf.describe()


def test_streaming_equals_whole_read(blob_file: Path) -> None:
    with ShowerFile(blob_file) as f:
        whole = f.read()
        parts = list(f.iter_chunks(64))
    assert [len(p) for p in parts] == [64, 64, 64, 8]
    np.testing.assert_array_equal(np.concatenate([p.showers for p in parts]), whole.showers)
    np.testing.assert_array_equal(np.concatenate([p.conditions["position"] for p in parts]),
                                  whole.conditions["position"])


def test_interrupted_writer_is_incomplete_and_resumable(tmp_path: Path) -> None:
    geo = get_geometry("belle2-ecl-5x5")
    path = tmp_path / "part.h5"
    with pytest.raises(RuntimeError):
        with ShowerWriter(path, geo, "e-", "test", 300, {"position": 2}) as w:
            w.append(_batch(100, 25, 0))
            raise RuntimeError("crash")
    with pytest.raises(ShowerFileError, match="incomplete"):
        ShowerFile(path)
    with ShowerFile(path, require_complete=False) as f:
        assert f.n == 100 and not f.complete
    with ShowerWriter(path, geo, "e-", "test", 300, {"position": 2}, resume=True) as w:
        assert w.n_written == 100
        w.append(_batch(200, 25, 1))
    with ShowerFile(path) as f:
        assert f.n == 300 and f.complete


_KILL_SCRIPT = """
import sys, time, numpy as np
from fastshower.geometry import get_geometry
from fastshower.io import ShowerBatch, ShowerWriter
geo = get_geometry("belle2-ecl-5x5")
w = ShowerWriter(sys.argv[1], geo, "e-", "test", 10**6)
rng = np.random.default_rng(0)
for i in range(10**6):
    w.append(ShowerBatch(np.full(100, 1000.0), rng.exponential(1.0, (100, 25)).astype(np.float32)))
    print(w.n_written, flush=True)
"""


def test_killed_writer_keeps_every_flushed_chunk(tmp_path: Path) -> None:
    path = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    written = 0
    deadline = time.time() + 60
    while written < 2000 and time.time() < deadline:
        written = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    with ShowerFile(path, require_complete=False) as f:
        assert not f.complete
        assert f.n >= written  # everything reported flushed is there
        assert f.n % 100 == 0
        f.check()
        n_kept = f.n
    # resume=True on a file whose writer was killed: the flushed chunks are kept and writing goes on
    geo = get_geometry("belle2-ecl-5x5")
    with ShowerWriter(path, geo, "e-", "test", n_kept + 100, resume=True) as w:
        assert w.n_written == n_kept
        w.append(ShowerBatch(np.full(100, 1000.0), np.ones((100, 25), dtype=np.float32)))
    with ShowerFile(path) as f:
        assert f.complete and f.n == n_kept + 100


def test_bad_values_are_refused_naming_the_shower(tmp_path: Path) -> None:
    geo = get_geometry("belle2-ecl-5x5")
    b = _batch(10, 25)
    b.showers[3, 4] = np.nan
    with pytest.raises(ShowerFileError, match="shower 3 has NaN"):
        write_showers(tmp_path / "nan.h5", geo, b, "e-", "test")
    b = _batch(10, 25)
    b.showers[7, 0] = -1.0
    with pytest.raises(ShowerFileError, match="shower 7 has negative"):
        write_showers(tmp_path / "neg.h5", geo, b, "e-", "test")


def test_nan_in_a_foreign_file_is_found_when_read(tmp_path: Path) -> None:
    path = tmp_path / "foreign.h5"
    s = np.ones((10, 6480), dtype=np.float32)
    s[5, 17] = np.nan
    with h5py.File(path, "w") as f:
        f["incident_energies"] = np.full((10, 1), 1000.0)
        f["showers"] = s
    with ShowerFile(path) as sf:  # foreign CaloChallenge file: geometry inferred from the voxel count
        assert sf.geometry.name == "par04-ds2"
        with pytest.raises(ShowerFileError, match="shower 5 has NaN"):
            sf.check()


def test_wrong_geometry_truncated_and_foreign_files(tmp_path: Path, blob_file: Path) -> None:
    with pytest.raises(ShowerFileError, match="expected 'calogan-3layer'"):
        ShowerFile(blob_file, geometry=get_geometry("calogan-3layer"))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(blob_file.read_bytes()[:1500])
    with pytest.raises(ShowerFileError, match="truncated or corrupt"):
        ShowerFile(truncated)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["something"] = np.zeros(3)
    with pytest.raises(ShowerFileError, match="missing dataset 'incident_energies'"):
        ShowerFile(foreign)
    with pytest.raises(ShowerFileError, match="no such file"):
        ShowerFile(tmp_path / "absent.h5")


def test_writer_refuses_existing_file_and_mismatched_resume(tmp_path: Path, blob_file: Path) -> None:
    geo = get_geometry("belle2-ecl-5x5")
    with pytest.raises(ShowerFileError, match="exists"):
        ShowerWriter(blob_file, geo, "e-", "test", 10, {"position": 2})
    with pytest.raises(ShowerFileError, match="holds e- showers, not gamma"):
        ShowerWriter(blob_file, geo, "gamma", "test", 400, {"position": 2}, resume=True)
    with pytest.raises(ShowerFileError, match="geometry"):
        ShowerWriter(blob_file, get_geometry("calogan-3layer"), "e-", "test", 400, resume=True)


def test_convert_calogan_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "calogan.h5"
    layers = [rng.exponential(1.0, (20, *shape)).astype(np.float32) for shape in [(3, 96), (12, 12), (12, 6)]]
    with h5py.File(src, "w") as f:
        f["energy"] = rng.uniform(1, 100, (20, 1))
        for i, a in enumerate(layers):
            f[f"layer_{i}"] = a
    out = convert_calogan(src, tmp_path / "calogan_cc.h5")
    with ShowerFile(out) as sf, h5py.File(src) as f:
        b = sf.read()
        np.testing.assert_allclose(b.energies, f["energy"][:, 0] * 1e3)  # GeV -> MeV
        geo = sf.geometry
        np.testing.assert_array_equal(b.showers[:, geo.layer_slice(1)].reshape(20, 12, 12), layers[1])
        np.testing.assert_array_equal(b.showers[:, geo.layer_slice(0)].reshape(20, 3, 96), layers[0])


def test_convert_3dgan_layout_axis_order(tmp_path: Path) -> None:
    src = tmp_path / "3dgan.h5"
    ecal = np.zeros((2, 51, 51, 25), dtype=np.float32)
    ecal[0, 30, 20, 7] = 0.5  # x=30, y=20, layer 7, in GeV
    with h5py.File(src, "w") as f:
        f["ECAL"] = ecal
        f["energy"] = np.array([100.0, 200.0])
    out = convert_3dgan(src, tmp_path / "3dgan_cc.h5")
    with ShowerFile(out) as sf:
        s = sf.read().showers
        geo = sf.geometry
        idx = int(np.argmax(s[0]))
        layer = next(i for i in range(geo.n_layers) if geo.layer_slice(i).start <= idx < geo.layer_slice(i).stop)
        row, col = divmod(idx - geo.layer_slice(layer).start, 51)
        assert (layer, row, col) == (7, 20, 30) and s[0, idx] == pytest.approx(500.0)
