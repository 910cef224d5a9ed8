"""Preprocessing transforms and streaming datasets."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fastshower.data import (
    BatchStream,
    Chain,
    ConditionTransform,
    DataError,
    ShowerDataset,
    ShowerTransform,
    build_transform,
    fit_shower_transform,
)
from fastshower.geometry import Geometry
from fastshower.io import ShowerFile, ShowerFileError

CHAINS = [
    ["per_incident"],
    ["log"],
    ["per_incident", "log"],
    ["per_incident", "logit"],
    ["standardize"],
    ["per_incident", "log", "standardize"],
    ["per_incident", "logit", "standardize"],
]


def _showers(n: int = 64, v: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    e = 1000 * (1 + 4 * torch.rand(n, generator=g, dtype=torch.float64))
    x = torch.rand(n, v, generator=g) ** 3 * e.reshape(-1, 1).float() / v
    x[:, :3] = 0.0  # empty voxels must survive the round trip too
    return x, e


@pytest.mark.parametrize("names", CHAINS, ids=lambda n: "+".join(n))
def test_round_trip(names: list[str]) -> None:
    x, e = _showers()
    chain = build_transform(names, 32)
    chain.fit(lambda: [(x, e)], 32)
    y = chain(x, e)
    assert torch.isfinite(y).all()
    back = chain.inverse(y, e)
    # float32 through exp/log of fractions down to 1e-6 of E_inc: absolute error ~1e-7 E_inc
    torch.testing.assert_close(back, x, rtol=1e-4, atol=1e-6 * float(e.max()))


def test_standardize_fit_streaming_equals_one_shot() -> None:
    x, e = _showers(200)
    one = build_transform(["per_incident", "log", "standardize"], 32)
    one.fit(lambda: [(x, e)], 32)
    chunked = build_transform(["per_incident", "log", "standardize"], 32)
    chunked.fit(lambda: [(x[i : i + 37], e[i : i + 37]) for i in range(0, 200, 37)], 32)
    y = chunked(x, e)
    torch.testing.assert_close(chunked(x, e), one(x, e))
    live = y[:, 3:]  # voxels 0-2 are constant (empty): std fixed to 1, only centred
    torch.testing.assert_close(live.mean(0), torch.zeros(29), atol=1e-4, rtol=0)
    torch.testing.assert_close(live.std(0, correction=0), torch.ones(29), atol=1e-4, rtol=0)
    assert torch.allclose(y[:, :3], torch.zeros(200, 3), atol=1e-5)


def test_unknown_transform_and_bad_options() -> None:
    with pytest.raises(DataError, match="unknown transform 'sqrt'"):
        build_transform(["sqrt"], 4)
    with pytest.raises(DataError, match="eps > 0"):
        build_transform(["log"], 4, eps=0.0)
    with pytest.raises(DataError, match="unknown transform option"):
        build_transform(["log"], 4, epsilon=1.0)


def test_fit_on_file_and_json_state(tiny_file: Path, tmp_path: Path) -> None:
    t = fit_shower_transform(tiny_file, chunk_rows=100)
    assert t.cond.names == ("position",) and t.cond.widths == (2,)
    assert t.stats is not None and t.stats.n == 600
    assert t.stats.min_nonzero_mev > 0
    assert t.stats.energy_min == pytest.approx(1000.0) and t.stats.energy_max == pytest.approx(5000.0)
    t.save(tmp_path / "t.json")
    t2 = ShowerTransform.load(tmp_path / "t.json")
    with ShowerFile(tiny_file) as f:
        batch = f.read(0, 50)
    x1, c1 = t.encode(batch)
    x2, c2 = t2.encode(batch)
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)
    torch.testing.assert_close(c1, c2, rtol=0, atol=0)
    # conditions are standardised: log E first, then position columns
    _, c = t.encode(f_read_all(tiny_file))
    torch.testing.assert_close(c.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    e = torch.from_numpy(batch.energies)
    torch.testing.assert_close(t.inverse(x1, e), torch.from_numpy(batch.showers), rtol=1e-4, atol=1e-4)


def f_read_all(path: Path):  # type: ignore[no-untyped-def]
    with ShowerFile(path) as f:
        return f.read()


def test_condition_selection(tiny_file: Path) -> None:
    t = fit_shower_transform(tiny_file, conditions=[])
    assert t.cond.dim == 1
    with pytest.raises(DataError, match="not in the data file"):
        fit_shower_transform(tiny_file, conditions=["angle"])
    cond = ConditionTransform(("position",), (2,))
    with pytest.raises(DataError, match="missing condition"):
        cond(torch.ones(3) * 1000, {})
    with pytest.raises(DataError, match="columns"):
        cond(torch.ones(3) * 1000, {"position": torch.zeros(3, 3)})


def test_inverse_exports_to_onnx(tiny_file: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    t = fit_shower_transform(tiny_file)

    class Inverse(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = t

        def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            return self.t.inverse(x, e)

    x, e = torch.randn(5, 32), torch.full((5,), 2000.0)
    buf = io.BytesIO()
    with pytest.warns(DeprecationWarning):  # the TorchScript exporter warns that it is legacy
        torch.onnx.export(Inverse(), (x, e), buf, dynamo=False, input_names=["x", "e"])
    sess = ort.InferenceSession(buf.getvalue())
    (got,) = sess.run(None, {"x": x.numpy(), "e": e.numpy()})
    np.testing.assert_allclose(got, t.inverse(x, e).numpy(), rtol=1e-4)


# --- datasets --------------------------------------------------------------------------------


def test_dataset_chunks_and_lazy_handle(tiny_file: Path) -> None:
    t = fit_shower_transform(tiny_file)
    ds = ShowerDataset(tiny_file, t, chunk_rows=100)
    with h5py.File(tiny_file) as f:
        file_rows = f["showers"].chunks[0]
    assert ds.chunk_rows % file_rows == 0
    assert sum(ds.rows(i) for i in range(len(ds))) == 600
    assert ds._file is None  # nothing opened until the first read
    x, c = ds[0]
    assert x.shape == (ds.rows(0), 32) and c.shape == (ds.rows(0), 3) and x.dtype == torch.float32
    assert ds._file is not None
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    assert clone._file is None
    torch.testing.assert_close(clone[0][0], x)
    ds.close()


def test_stream_resume_and_workers(tiny_file: Path) -> None:
    t = fit_shower_transform(tiny_file)
    ds = ShowerDataset(tiny_file, t, chunk_rows=64)
    a = BatchStream(ds, 50, seed=3, shuffle_chunks=2)
    it = iter(a)
    first = [next(it) for _ in range(7)]
    state = a.state_dict()
    rest = [next(it) for _ in range(12)]  # crosses an epoch boundary (600 rows in groups of 128)
    assert a.epoch >= 1
    b = BatchStream(ds, 50, seed=3, shuffle_chunks=2)
    b.load_state_dict(state)
    itb = iter(b)
    for x1, c1 in rest:
        x2, c2 = next(itb)
        torch.testing.assert_close(x1, x2, rtol=0, atol=0)
        torch.testing.assert_close(c1, c2, rtol=0, atol=0)
    # DataLoader workers (each with its own lazily opened handle) deliver the same stream
    w = BatchStream(ds, 50, seed=3, shuffle_chunks=2, num_workers=2)
    itw = iter(w)
    for x1, _ in first[:4]:
        torch.testing.assert_close(next(itw)[0], x1, rtol=0, atol=0)


def test_epoch_sees_every_shower_once(tiny_file: Path) -> None:
    ds = ShowerDataset(tiny_file, None, chunk_rows=64)  # raw: (showers MeV, energies MeV)
    s = BatchStream(ds, 40, seed=5, shuffle_chunks=3)
    it = iter(s)
    rows = torch.cat([next(it)[0] for _ in range(s.batches_per_epoch())])
    assert s.epoch == 0 or s.state_dict() == {"epoch": 1, "group": 0, "batch": 0}
    assert rows.shape[0] == 600
    with ShowerFile(tiny_file) as f:
        ref = torch.from_numpy(f.read().showers)
    key = lambda m: sorted(map(tuple, m.numpy().round(3).tolist()))  # noqa: E731
    assert key(rows) == key(ref)


def test_stream_sharding(tiny_file: Path) -> None:
    ds = ShowerDataset(tiny_file, None, chunk_rows=64)
    shards = [BatchStream(ds, 32, seed=0, rank=r, world_size=2)._shard(0) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(range(len(ds)))


def test_nan_in_data_raises(tiny_file: Path, tmp_path: Path, tiny_geo: Geometry) -> None:
    bad = tmp_path / "nan.h5"
    bad.write_bytes(tiny_file.read_bytes())
    with h5py.File(bad, "r+") as f:
        f["showers"][123, 5] = np.nan
    t = fit_shower_transform(tiny_file)
    ds = ShowerDataset(bad, t, chunk_rows=64)
    with pytest.raises(ShowerFileError, match="shower 123 has NaN"):
        for i in range(len(ds)):
            ds[i]


def test_nan_after_transform_raises(tiny_file: Path) -> None:
    t = fit_shower_transform(tiny_file, names=["log"], eps=1e-6)
    # a transform state that yields NaN (log of a negative) must be caught per chunk
    t.voxel = Chain(list(t.voxel.steps))
    t.voxel.steps[0].eps = -1e9  # type: ignore[union-attr]
    ds = ShowerDataset(tiny_file, t)
    with pytest.raises(DataError, match="NaN/inf after preprocessing"):
        ds[0]
