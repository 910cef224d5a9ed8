"""ONNX export, the ONNX generation backend, INT8, metadata checks and the benchmark schema (tiny runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from fastshower import __version__
from fastshower.cli import main as cli_main
from fastshower.export import (
    ExportError,
    SamplerModule,
    bench,
    draw_noise,
    export_onnx,
    load_onnx,
    noise_dim,
    sample_from_noise,
)
from fastshower.io import ShowerFile
from fastshower.models import available_models
from fastshower.sample import generate, load_run
from fastshower.train import train

TINY_HP: dict[str, dict[str, Any]] = {
    "flow-matching": {"hidden": 32, "depth": 1, "emb_dim": 16, "steps": 3, "warmup": 5},
    "vae": {"latent": 4, "hidden": 32, "depth": 1, "kl_warmup": 5},
    "wgan-gp": {"hidden": 32, "n_hidden": 2, "latent_dim": 8, "constrainer_hidden": 16,
                "constrainer_warmup": 0, "n_critic": 2},
    "calogan": {"hidden": 32, "n_hidden": 1, "latent_dim": 8, "layer_features": 8,
                "mbd_kernels": 4, "mbd_dim": 3, "n_critic": 2},
    "flow": {"stage1_hidden": 16, "stage2_hidden": 32, "stage1_transforms": 2, "stage2_transforms": 2},
}
TRAIN = {"chunk_rows": 128, "shuffle_chunks": 2}


def _run(name: str, data: Path, out: Path, steps: int = 6) -> Path:
    return train(data, name, out, steps=steps, batch_size=64, progress=False,
                 config={"hparams": TINY_HP[name], "train": TRAIN})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_file: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-runs")
    return {name: _run(name, tiny_file, root / name) for name in TINY_HP if name in available_models()}


def _inputs(run: Path, n: int = 16, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    _, _, info = load_run(run)
    rng = np.random.default_rng(seed)
    e = rng.choice([1000.0, 2000.0, 5000.0], n)
    return e, {k: rng.uniform(-5, 5, (n, w)) for k, w in zip(info.cond_names, info.cond_widths, strict=True)}


@pytest.mark.parametrize("name", list(TINY_HP))
def test_noise_path_reproduces_sample(runs: dict[str, Path], name: str) -> None:
    """sample_from_noise(draw_noise(g)) == model.sample(g): the exported function is the model's sampler."""
    model, transform, _ = load_run(runs[name])
    e, conds = _inputs(runs[name])
    c = transform.conditions(torch.as_tensor(e), {k: torch.as_tensor(v) for k, v in conds.items()})
    want = model.sample(c, torch.Generator().manual_seed(3))
    z = draw_noise(model, len(e), torch.Generator().manual_seed(3))
    assert z.shape == (len(e), noise_dim(model))
    with torch.no_grad():
        got = sample_from_noise(model, z, c)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(TINY_HP))
def test_onnx_fp32_equals_torch(runs: dict[str, Path], name: str, tmp_path: Path) -> None:
    if name == "flow":
        with pytest.raises(ExportError, match="does not export"):
            export_onnx(runs[name], tmp_path / "m.onnx")
        pytest.skip("zuko spline flows do not export to ONNX (clear ExportError checked)")
    path = export_onnx(runs[name], tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    _, _, info = load_run(runs[name])
    assert meta["fastshower_version"] == __version__ and meta["run_id"] == info.run_id
    assert meta["model"] == name and meta["geometry"] == "tiny-2x4x4" and meta["precision"] == "fp32"
    assert json.loads(meta["condition_names"]) == ["position"]
    assert meta["steps"] == ("3" if name == "flow-matching" else "1")
    assert [i.name for i in proto.graph.input] == ["noise", "incident_energy_mev", "position"]
    assert [o.name for o in proto.graph.output] == ["showers_mev"]
    assert all(i.doc_string for i in proto.graph.input)

    sampler = load_onnx(path, runs[name])
    run = load_run(runs[name])
    module = SamplerModule(run)
    for n in (1, 37):  # dynamic batch
        e, conds = _inputs(runs[name], n)
        z = draw_noise(run[0], n, torch.Generator().manual_seed(5))
        got = sampler(z, e, conds)
        with torch.no_grad():
            want = module(z, torch.as_tensor(e, dtype=torch.float32).reshape(-1, 1),
                          *[torch.as_tensor(conds[k], dtype=torch.float32) for k in info.cond_names]).numpy()
        assert got.shape == (n, 32) and (got >= 0).all()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(want.max())))


def test_generate_backends_agree(runs: dict[str, Path], tmp_path: Path) -> None:
    """Same seed -> the same showers from the torch and the ONNX backend (float tolerance)."""
    run = runs["flow-matching"]
    a = generate(run, 50, "1:5", out=tmp_path / "torch.h5", batch_size=20, progress=False)
    b = generate(run, 50, "1:5", out=tmp_path / "onnx.h5", batch_size=20, progress=False, backend="onnx")
    with ShowerFile(a) as fa, ShowerFile(b) as fb:
        ba, bb = fa.read(), fb.read()
        assert fb.attrs["backend"] == "onnx-fp32"
    np.testing.assert_array_equal(ba.energies, bb.energies)
    np.testing.assert_allclose(bb.showers, ba.showers, rtol=1e-3, atol=1e-3)


def test_int8_runs_and_stays_close(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["vae"]
    fp32 = load_onnx(export_onnx(run, tmp_path / "fp32.onnx"), run)
    int8_path = export_onnx(run, tmp_path / "int8.onnx", int8=True)
    int8 = load_onnx(int8_path, run)
    assert int8.meta["precision"] == "int8"
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in onnx.load(str(int8_path)).graph.node)
    e, conds = _inputs(run, 200)
    z = draw_noise(load_run(run)[0], 200, torch.Generator().manual_seed(0))
    a, b = fp32(z, e, conds), int8(z, e, conds)
    assert np.isfinite(b).all() and (b >= 0).all()
    ra, rb = a.sum(1) / e, b.sum(1) / e
    assert abs(ra.mean() - rb.mean()) < 0.02 * max(ra.mean(), 1e-3)


def test_metadata_mismatch(runs: dict[str, Path], tmp_path: Path) -> None:
    path = export_onnx(runs["vae"], tmp_path / "vae.onnx")
    with pytest.raises(ExportError, match="different run"):
        load_onnx(path, runs["wgan-gp"])
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key == "fastshower_version":
            p.value = "0.0.0-other"
    onnx.save(proto, str(tmp_path / "old.onnx"))
    with pytest.raises(ExportError, match=r"fastshower 0\.0\.0-other"):
        load_onnx(tmp_path / "old.onnx")
    with pytest.raises(ExportError, match="different run"):
        generate(runs["wgan-gp"], 5, "2", out=tmp_path / "x.h5", progress=False, backend="onnx", onnx_path=path)


def test_bad_inputs(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = runs["vae"]
    sampler = load_onnx(export_onnx(run, tmp_path / "m.onnx"), run)
    with pytest.raises(ExportError, match="batch size"):
        sampler(np.zeros((0, sampler.noise_dim)), np.zeros(0), {"position": np.zeros((0, 2))})
    with pytest.raises(ExportError, match="batch sizes must be >= 1"):
        bench(run, batch_sizes=[0], print_table=False)
    # a run without a finished checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "spec.json", "geometry.json", "meta.json", "transforms.json"):
        (broken / name).write_bytes((run / name).read_bytes())
    with pytest.raises(ExportError, match="no checkpoint"):
        export_onnx(broken, tmp_path / "b.onnx")
    assert cli_main(["export", "--run", str(broken), "--out", str(tmp_path / "b.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastshower: error:") and "\n" not in err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for p in run.rglob("*"):
        if p.is_file():
            (unfinished / p.relative_to(run)).parent.mkdir(parents=True, exist_ok=True)
            (unfinished / p.relative_to(run)).write_bytes(p.read_bytes())
    meta = json.loads((unfinished / "meta.json").read_text())
    (unfinished / "meta.json").write_text(json.dumps({**meta, "status": "running"}))
    with pytest.raises(ExportError, match="not finished"):
        export_onnx(unfinished, tmp_path / "u.onnx")


def test_cli_export_and_bench_schema(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["flow-matching"]
    assert cli_main(["export", "--run", str(run), "--out", str(tmp_path / "q.onnx"), "--int8"]) == 0
    assert load_onnx(tmp_path / "q.onnx", run).meta["precision"] == "int8"
    assert cli_main(["bench", "--run", str(run), "--batch-sizes", "1,10", "--out", str(tmp_path / "b.json")]) == 0
    rep = json.loads((tmp_path / "b.json").read_text())
    assert rep["machine"]["threads"] == 1 and rep["machine"]["device"] == "cpu" and rep["machine"]["cpu_model"]
    assert rep["run"]["model"] == "flow-matching" and rep["run"]["sample_options"] == {"steps": 3,
                                                                                      "method": "midpoint"}
    got = {(r["backend"], r["batch_size"]) for r in rep["results"]}
    assert got == {(b, n) for b in ("torch-fp32", "onnx-fp32", "onnx-int8") for n in (1, 10)}
    for r in rep["results"]:
        assert r["ms_per_shower"] > 0 and r["repeats"] >= 1
        assert r["ms_per_call"] == pytest.approx(r["ms_per_shower"] * r["batch_size"])
    assert rep["geant4"] is None and rep["speedup_vs_geant4"] == {}
    assert set(rep["int8_vs_fp32"]) == {"1", "10"}


@pytest.mark.slow
def test_bench_geant4(runs: dict[str, Path], tmp_path: Path, belle_file: Path) -> None:
    run = _run("vae", belle_file, tmp_path / "belle-vae")
    rep = bench(run, tmp_path / "b.json", batch_sizes=[100], geant4=True, n_geant4=30, n_geant4_startup=5,
                print_table=False)
    assert rep["geant4"]["ms_per_shower"] > 0 and rep["geant4"]["particle"] == "e-"
    assert rep["speedup_vs_geant4"]["onnx-fp32"]["100"] > 0
