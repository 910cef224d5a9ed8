"""ONNX export, the ONNX generation backend, INT8, metadata checks and the benchmark schema (tiny runs)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from fastshower import __version__
from fastshower.cli import main as cli_main
from fastshower.deploy import ExportError, bench, export_onnx, format_table, load_onnx
from fastshower.errors import FastshowerError
from fastshower.generation import generate
from fastshower.io import ShowerBatch, ShowerFile, ShowerWriter
from fastshower.models import available_models
from fastshower.runs import RunError, load_run
from fastshower.sampling import GenerationError, SamplerModule, draw_noise, noise_dim, sample_from_noise
from fastshower.training import train

TINY_HP: dict[str, dict[str, Any]] = {
    "flow-matching": {"hidden": 32, "depth": 1, "emb_dim": 16, "steps": 3, "warmup": 5},
    "vae": {"latent_dim": 4, "hidden": 32, "depth": 1, "kl_warmup": 5},
    "wgan-gp": {"hidden": 32, "depth": 2, "latent_dim": 8, "constrainer_hidden": 16,
                "constrainer_warmup": 0, "n_critic": 2},
    "calogan": {"hidden": 32, "depth": 1, "latent_dim": 8, "layer_dim": 8,
                "mbd_kernels": 4, "mbd_dim": 3, "n_critic": 2},
    "flow": {"stage1_hidden": 16, "stage2_hidden": 32, "stage1_transforms": 2, "stage2_transforms": 2},
    "layer-fm": {"stage1_hidden": 16, "stage1_transforms": 2, "hidden": 16, "depth": 1, "heads": 2, "emb_dim": 16,
                 "steps": 2, "warmup": 5},
    # calogan with its layer energies from a flow (the stage-1 flow's inverse in the graph)
    "calogan-likelihood": {"hidden": 32, "depth": 1, "latent_dim": 8, "layer_dim": 8, "mbd_kernels": 4,
                           "mbd_dim": 3, "n_critic": 2, "energies": "likelihood"},
    # calogan with per-cell noise (z wider than latent_dim), gated cells and the generator's weight average
    "calogan-gated": {"hidden": 32, "depth": 1, "latent_dim": 8, "layer_dim": 8, "mbd_kernels": 4, "mbd_dim": 3,
                      "n_critic": 2, "energies": "likelihood", "cell_noise": True, "output_activation": "gated",
                      "ema": 0.9},
}
#: the registered model of each TINY_HP key (a variant's differs from its key)
MODEL_OF = {k: "calogan" if k.startswith("calogan") else k for k in TINY_HP}
TRAIN = {"chunk_rows": 128, "shuffle_chunks": 2}


def _run(name: str, data: Path, out: Path, steps: int = 6) -> Path:
    return train(data, MODEL_OF[name], out, steps=steps, batch_size=64, progress=False,
                 config={"hparams": TINY_HP[name], "train": TRAIN})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_file: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-runs")
    return {name: _run(name, tiny_file, root / name) for name in TINY_HP if MODEL_OF[name] in available_models()}


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
    """Every model (the zuko spline flow included) exports, and ONNX Runtime reproduces torch on the same
    noise and conditions at batch sizes other than the export's (2)."""
    path = export_onnx(runs[name], tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    _, _, info = load_run(runs[name])
    assert meta["fastshower_version"] == __version__ and meta["run_id"] == info.run_id
    assert meta["model"] == MODEL_OF[name] and meta["geometry"] == "tiny-2x4x4" and meta["precision"] == "fp32"
    assert json.loads(meta["condition_names"]) == ["position"]
    assert meta["steps"] == {"flow-matching": "3", "layer-fm": "2"}.get(name, "1")
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


def _constant_weight_matmuls(proto: Any) -> int:
    """FP32 MatMuls of a graph whose weight (input 1) is an initializer or an Identity of one."""
    inits = {i.name for i in proto.graph.initializer}
    aliases = {n.output[0] for n in proto.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    return sum(n.op_type == "MatMul" and (n.input[1] in inits or n.input[1] in aliases) for n in proto.graph.node)


def _repeated_int8_weights(proto: Any) -> int:
    """How many int8 weight matrices (rank 2) of a graph repeat another's bytes (a weight stored twice)."""
    blobs = [onnx.numpy_helper.to_array(i).tobytes() for i in proto.graph.initializer
             if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    return len(blobs) - len(set(blobs))


def test_int8_ode_stores_each_weight_once(tiny_file: Path, tmp_path: Path) -> None:
    """Issue 17: an ODE sampler unrolled over S steps calls every layer S times; its INT8 file stores each
    quantised weight once (it stored S copies: 90 MB against 6 MB FP32 for 32 steps) and so is smaller
    than the FP32 file, and it stays close to FP32."""
    hp = {**TINY_HP["flow-matching"], "hidden": 128, "depth": 2, "steps": 8}
    run = train(tiny_file, "flow-matching", tmp_path / "run", steps=2, batch_size=64, progress=False,
                config={"hparams": hp, "train": TRAIN})
    fp32_path, int8_path = export_onnx(run, tmp_path / "fp32.onnx"), export_onnx(run, tmp_path / "i8.onnx", int8=True)
    proto = onnx.load(str(int8_path))
    n_weights = sum(n.op_type == "Gemm" for n in onnx.load(str(fp32_path)).graph.node) // 8  # Gemms per step
    assert _repeated_int8_weights(proto) == 0
    assert sum(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2 for i in proto.graph.initializer) <= n_weights
    assert int8_path.stat().st_size < fp32_path.stat().st_size, (int8_path.stat().st_size, fp32_path.stat().st_size)
    e, conds = _inputs(run, 200)
    z = draw_noise(load_run(run)[0], 200, torch.Generator().manual_seed(0))
    a, b = load_onnx(fp32_path, run)(z, e, conds), load_onnx(int8_path, run)(z, e, conds)
    ra, rb = a.sum(1) / e, b.sum(1) / e
    assert np.isfinite(b).all() and abs(ra.mean() - rb.mean()) < 0.02 * max(ra.mean(), 1e-3)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_layer_fm_quantises_every_shared_weight(runs: dict[str, Path], mode: str, tmp_path: Path) -> None:
    """torch.onnx reads a weight used once per ODE step through an Identity after its first use; the
    quantiser skipped those MatMuls (layer-fm INT8 was mostly FP32, and larger than FP32). Every MatMul
    with a constant weight is now quantised, each weight once, and the output stays close to FP32."""
    run = runs["layer-fm"]
    fp32_path = export_onnx(run, tmp_path / "fp32.onnx")
    int8_path = export_onnx(run, tmp_path / "i8.onnx", int8=True, int8_mode=mode, calibration=64)
    assert _constant_weight_matmuls(onnx.load(str(fp32_path))) > 0
    proto = onnx.load(str(int8_path))
    if mode == "dynamic":  # static (QDQ) keeps MatMul, reading DequantizeLinear of the int8 weight
        assert _constant_weight_matmuls(proto) == 0
    assert _repeated_int8_weights(proto) == 0
    assert not any(n.op_type == "MatMul" and n.input[1] in {i.name for i in proto.graph.initializer
                                                             if i.data_type == onnx.TensorProto.FLOAT}
                   for n in proto.graph.node)
    e, conds = _inputs(run, 200)
    z = draw_noise(load_run(run)[0], 200, torch.Generator().manual_seed(0))
    a, b = load_onnx(fp32_path, run)(z, e, conds), load_onnx(int8_path, run)(z, e, conds)
    ra, rb = a.sum(1) / e, b.sum(1) / e
    assert np.isfinite(b).all() and abs(ra.mean() - rb.mean()) < 0.02 * max(ra.mean(), 1e-3)


def test_flow_layer_energies_export_with_repeated_layer_index(runs: dict[str, Path], tmp_path: Path) -> None:
    """The cause of the old flow export failure: per-layer sums over repeated layer indices (index_add) came
    out of ONNX Runtime as the last voxel of each layer. The exported sums must equal torch's."""
    import onnxruntime as ort

    model = load_run(runs["flow"])[0]
    x = torch.rand(3, model.spec.n_voxels)

    class LayerSums(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return model.layer_energies(x)

    with warnings.catch_warnings():  # the legacy (TorchScript) exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(LayerSums(), (x,), str(tmp_path / "e.onnx"), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "b"}})
    x5 = torch.rand(5, model.spec.n_voxels)
    got = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x5.numpy()})[0]
    want = torch.stack([x5[:, :16].sum(1), x5[:, 16:].sum(1)], 1).numpy()  # tiny-2x4x4: 2 layers of 16
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _etot_and_occupancy(a: np.ndarray, e: np.ndarray) -> tuple[float, float]:
    """(mean E_tot / E_inc, fraction of non-zero voxels) of showers a (n, V) MeV with energies e (n,) MeV."""
    return float((a.sum(1) / e).mean()), float((a > 0).mean())


@pytest.mark.parametrize("name", ["vae", "flow-matching"])
def test_int8_static_calibrated_and_close(runs: dict[str, Path], name: str, tmp_path: Path) -> None:
    """Static INT8 (QDQ, per-channel weights, calibrated on the training file) keeps the physics: on 300
    showers mean E_tot / E_inc within 2 % of the FP32 graph and the voxel occupancy within 0.02."""
    run = runs[name]
    fp32 = load_onnx(export_onnx(run, tmp_path / "fp32.onnx"), run)
    path = export_onnx(run, tmp_path / "static.onnx", int8=True, int8_mode="static", calibration=128)
    static = load_onnx(path, run)
    info = load_run(run)[2]
    assert static.meta["precision"] == "int8" and static.meta["int8_mode"] == "static"
    assert static.backend == "onnx-int8-static" and fp32.backend == "onnx-fp32"
    cal = json.loads(static.meta["calibration"])
    assert cal["n_showers"] == 128 and cal["method"] == "minmax" and cal["op_types"] == ["MatMul"]
    assert cal["data"] == info.meta["data"]["path"]
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "MatMulInteger" not in ops  # QDQ, not dynamic
    # per-channel weights: a weight's DequantizeLinear carries one scale per output column
    inits = {i.name: i for i in proto.graph.initializer}
    assert any(n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[1]].dims) == 1
               and inits[n.input[1]].dims[0] > 1 for n in proto.graph.node)

    e, conds = _inputs(run, 300, seed=4)
    z = draw_noise(load_run(run)[0], 300, torch.Generator().manual_seed(9))
    a, b = fp32(z, e, conds), static(z, e, conds)
    assert b.shape == (300, 32) and np.isfinite(b).all() and (b >= 0).all()
    (ra, occ_a), (rb, occ_b) = _etot_and_occupancy(a, e), _etot_and_occupancy(b, e)
    assert abs(rb - ra) < 0.02 * ra, (ra, rb)
    assert abs(occ_b - occ_a) < 0.02, (occ_a, occ_b)
    # fixed activation scales: a shower's output does not depend on its batch mates (dynamic INT8's does),
    # and the graph keeps its dynamic batch axis
    alone = static(z[:7], e[:7], {k: v[:7] for k, v in conds.items()})
    np.testing.assert_allclose(alone, b[:7], rtol=1e-6, atol=1e-6 * float(b.max()))


def test_int8_static_needs_the_training_file(runs: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A run whose training file is gone: static INT8 fails before exporting, naming the file; the other
    modes do not need the file."""
    run = tmp_path / "moved-run"
    shutil.copytree(runs["vae"], run)
    meta = json.loads((run / "meta.json").read_text())
    gone = str(tmp_path / "deleted" / "train.h5")
    (run / "meta.json").write_text(json.dumps({**meta, "data": {**meta["data"], "path": gone}}))
    with pytest.raises(ExportError, match=re.escape(gone)):
        export_onnx(run, tmp_path / "s.onnx", int8=True, int8_mode="static")
    assert not (tmp_path / "s.onnx").exists()
    assert cli_main(["export", "--run", str(run), "--out", str(tmp_path / "s.onnx"), "--int8",
                     "--int8-mode", "static"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastshower: error:") and gone in err and "\n" not in err
    assert load_onnx(export_onnx(run, tmp_path / "d.onnx", int8=True), run).meta["int8_mode"] == "dynamic"
    with pytest.raises(ExportError, match="without int8"):
        export_onnx(run, tmp_path / "x.onnx", int8_mode="static")
    with pytest.raises(ExportError, match="calibration method"):
        export_onnx(run, tmp_path / "x.onnx", int8=True, int8_mode="static", calibration_method="entropy")


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
    # precision / INT8 mode: both INT8 modes load, an unknown mode does not
    proto = onnx.load(str(path))
    for key, value in (("precision", "int8"), ("int8_mode", "static")):
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, key: value})
    onnx.save(proto, str(tmp_path / "static.onnx"))
    assert load_onnx(tmp_path / "static.onnx", runs["vae"]).backend == "onnx-int8-static"
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, "int8_mode": "float4"})
    onnx.save(proto, str(tmp_path / "odd.onnx"))
    with pytest.raises(ExportError, match="unknown INT8 mode 'float4'"):
        load_onnx(tmp_path / "odd.onnx")


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
    with pytest.raises(RunError, match="no checkpoint") as raised:  # the run folder's error (fastshower.runs)
        export_onnx(broken, tmp_path / "b.onnx")
    assert isinstance(raised.value, FastshowerError)
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
    with pytest.raises(RunError, match="not finished"):
        export_onnx(unfinished, tmp_path / "u.onnx")
    # sampling options are checked by fastshower.sampling.sample_options, before anything is exported
    with pytest.raises(GenerationError, match="steps must be >= 1"):
        export_onnx(runs["flow-matching"], tmp_path / "s.onnx", steps=0)
    with pytest.raises(GenerationError, match="unknown ODE method"):
        export_onnx(runs["flow-matching"], tmp_path / "s.onnx", method="rk4")
    assert not (tmp_path / "s.onnx").exists()


def test_cli_export_and_bench_schema(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["flow-matching"]
    assert cli_main(["export", "--run", str(run), "--out", str(tmp_path / "q.onnx"), "--int8"]) == 0
    assert load_onnx(tmp_path / "q.onnx", run).meta["precision"] == "int8"
    assert cli_main(["bench", "--run", str(run), "--batch-sizes", "1,10", "--quality-showers", "120",
                     "--out", str(tmp_path / "b.json")]) == 0
    rep = json.loads((tmp_path / "b.json").read_text())
    q = rep["int8_quality"]  # the INT8 change of quality against the run's training file, in the JSON
    assert q["n_showers"] == 120 and set(q["change"]) == {"onnx-int8"} and "E_tot/E_inc" in q["change"]["onnx-int8"][
        "separation_power"]
    assert rep["machine"]["threads"] == 1 and rep["machine"]["device"] == "cpu" and rep["machine"]["cpu_model"]
    assert rep["run"]["model"] == "flow-matching" and rep["run"]["sample_options"] == {"steps": 3,
                                                                                      "method": "midpoint"}
    got = {(r["backend"], r["batch_size"]) for r in rep["results"]}
    assert got == {(b, n) for b in ("torch-fp32", "onnx-fp32", "onnx-int8") for n in (1, 10)}
    for r in rep["results"]:
        assert r["ms_per_shower"] > 0 and r["repeats"] >= 1
        assert r["ms_per_call"] == pytest.approx(r["ms_per_shower"] * r["batch_size"])
    assert rep["geant4"] is None and rep["speedup_vs_geant4"] == {}
    assert set(rep["int8_vs_fp32"]) == {"1", "10"} and rep["int8_static_vs_fp32"] == {}


def test_cli_export_static_and_bench_static(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["flow-matching"]
    assert cli_main(["export", "--run", str(run), "--out", str(tmp_path / "s.onnx"), "--int8", "--int8-mode",
                     "static", "--calibration", "64"]) == 0
    sampler = load_onnx(tmp_path / "s.onnx", run)
    assert sampler.meta["int8_mode"] == "static" and json.loads(sampler.meta["calibration"])["n_showers"] == 64
    e, conds = _inputs(run, 20)
    out = sampler(draw_noise(load_run(run)[0], 20, torch.Generator().manual_seed(0)), e, conds)
    assert out.shape == (20, 32) and np.isfinite(out).all() and (out >= 0).all() and (out.sum(1) > 0).any()
    assert cli_main(["bench", "--run", str(run), "--batch-sizes", "4", "--backends", "onnx-fp32,onnx-int8-static",
                     "--out", str(tmp_path / "b.json")]) == 0
    rep = json.loads((tmp_path / "b.json").read_text())
    assert {r["backend"] for r in rep["results"]} == {"onnx-fp32", "onnx-int8-static"}
    assert set(rep["int8_static_vs_fp32"]) == {"4"} and rep["int8_vs_fp32"] == {}
    with pytest.raises(ExportError, match="unknown backend"):
        bench(run, batch_sizes=[1], backends=["onnx-int4"], print_table=False)


def test_bench_int8_quality(runs: dict[str, Path], tmp_path: Path, belle_file: Path) -> None:
    """bench's INT8 change of quality: FP32 and INT8 showers of the same noise scored against the reference, the
    change of every separation power and AUC in the report and the headline ones in the table; FP32 is exported
    for it when not timed; bad requests refused before any timing; a lost training file skips it, saying so."""
    run = runs["flow-matching"]
    rep = bench(run, batch_sizes=[4], backends=["onnx-int8"], quality_showers=150, print_table=False)
    q = rep["int8_quality"]
    assert set(q["scores"]) == {"onnx-fp32", "onnx-int8"} and q["n_showers"] == 150
    fp, i8, ch = q["scores"]["onnx-fp32"], q["scores"]["onnx-int8"], q["change"]["onnx-int8"]
    assert set(ch["separation_power"]) == set(fp["separation_power"]) and "E_tot/E_inc" in ch["separation_power"]
    for obs, d in ch["separation_power"].items():
        if d is not None:
            assert d == pytest.approx(i8["separation_power"][obs] - fp["separation_power"][obs])
    assert ch["max_abs_separation_power"] == max(abs(d) for d in ch["separation_power"].values() if d is not None)
    assert ch["auc_low"] == pytest.approx(i8["auc_low"] - fp["auc_low"]) and 0 < fp["auc_high"] <= 1
    assert abs(ch["separation_power"]["E_tot/E_inc"]) < 0.2  # INT8 of the same noise: close to FP32
    table = format_table(rep)
    assert "INT8 change of quality" in table and "dS(E_tot/E_inc)" in table and "dAUC low" in table
    assert f"({ch['max_abs_observable']})" in table
    # no INT8 backend or 0 showers: nothing measured
    assert bench(run, batch_sizes=[2], backends=["onnx-fp32"], print_table=False)["int8_quality"] is None
    # refused before anything is exported or timed
    with pytest.raises(ExportError, match="belle2-ecl-5x5"):
        bench(run, batch_sizes=[2], reference=belle_file, print_table=False)
    with pytest.raises(ExportError, match="--quality-showers"):
        bench(run, batch_sizes=[2], quality_showers=-1, print_table=False)
    with pytest.raises(ExportError, match="no such file"):
        bench(run, batch_sizes=[2], reference=tmp_path / "none.h5", print_table=False)
    far = tmp_path / "far.h5"  # a reference made at 50 GeV: the run knows 1-5 GeV
    geo = load_run(run)[2].geometry
    with ShowerWriter(far, geo, "e-", "toy", 4, {"position": 2}, {"energy_spec": "50"}) as w:
        w.append(ShowerBatch(np.full(4, 5e4), np.ones((4, geo.n_voxels)), {"position": np.zeros((4, 2))}))
    with pytest.raises(ExportError, match=r"energies 50 GeV, outside the training range 1-5 GeV .* --reference"):
        bench(run, batch_sizes=[2], reference=far, print_table=False)
    # a run whose training file is gone: skipped, the table says why and names --reference
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    meta = json.loads((moved / "meta.json").read_text())
    (moved / "meta.json").write_text(json.dumps({**meta, "data": {**meta["data"], "path": str(tmp_path / "x.h5")}}))
    rep = bench(moved, batch_sizes=[2], backends=["onnx-int8"], print_table=False)
    assert "--reference" in rep["int8_quality"]["skipped"]
    assert "INT8 change of quality: not measured" in format_table(rep)


@pytest.mark.slow
def test_bench_geant4(runs: dict[str, Path], tmp_path: Path, belle_file: Path) -> None:
    run = _run("vae", belle_file, tmp_path / "belle-vae")
    rep = bench(run, tmp_path / "b.json", batch_sizes=[100], geant4=True, n_geant4=30, n_geant4_startup=5,
                print_table=False)
    assert rep["geant4"]["ms_per_shower"] > 0 and rep["geant4"]["particle"] == "e-"
    assert rep["speedup_vs_geant4"]["onnx-fp32"]["100"] > 0


def test_graphs_agree_tolerates_rare_threshold_flips_only() -> None:
    """A cell at a threshold may come out 0 on one side (a rare flip); a real difference, or flips in more than
    0.1 % of the cells, is a disagreement."""
    from fastshower.deploy.export import graphs_agree

    want = np.full((2, 5000), 400.0)
    want[0, 0] = 0.0447
    got = want.copy()
    assert graphs_agree(got, want)
    got[0, 0] = 0.0
    assert graphs_agree(got, want)
    got[1, :20] = 0.0
    assert not graphs_agree(got, want)
    got = want.copy()
    got[0, 1] = 401.0
    assert not graphs_agree(got, want)
