"""Distillation of a flow-matching run into a one-step generator (tiny runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastshower.cli import main as cli_main
from fastshower.deploy import export_onnx, load_onnx
from fastshower.distillation import DistillError, distill
from fastshower.generation import generate
from fastshower.io import ShowerFile
from fastshower.models import available_models
from fastshower.models.flow import CaloFlow
from fastshower.models.onestep import OneStep
from fastshower.runs import load_run
from fastshower.training import TrainingError, train

TEACHER_HP = {"hidden": 32, "depth": 1, "emb_dim": 16, "steps": 4, "warmup": 5}
TRAIN = {"chunk_rows": 128, "shuffle_chunks": 2}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, tiny_file: Path) -> Path:
    return train(tiny_file, "flow-matching", tmp_path_factory.mktemp("teacher") / "fm", steps=40, batch_size=64,
                 progress=False, config={"hparams": TEACHER_HP, "train": TRAIN})


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> Path:
    return distill(teacher, tmp_path_factory.mktemp("student") / "one", n_pairs=3000, steps=600, batch_size=256,
                   hparams={"hidden": 32, "depth": 1, "emb_dim": 16, "warmup": 20}, seed=3, progress=False)


def test_student_learns_the_teachers_map(teacher: Path, student: Path) -> None:
    """On fresh noise the student reproduces the teacher's ODE output far better than its mean does."""
    t_model, _, t_info = load_run(teacher)
    s_model, _, s_info = load_run(student)
    assert s_info.model_name == "one-step" and s_info.spec == t_info.spec
    g = torch.Generator().manual_seed(11)
    c = torch.randn(500, t_info.spec.cond_dim, generator=g).clamp(-1.5, 1.5)
    z = t_model.draw_noise(500, g)
    with torch.no_grad():
        x_t = t_model.sample_from_noise(z, c)
        x_s = s_model.sample_from_noise(z, c)
    rel = float(((x_s - x_t) ** 2).mean() / x_t.var(dim=0).mean())
    # relative MSE 1 = predicting the mean shower; the identity map (student untrained) gives > 1
    assert rel < 0.3, rel
    log = [json.loads(line) for line in (student / "distill_log.jsonl").read_text().splitlines()]
    assert log[-1]["relative_val_mse"] < log[0]["relative_val_mse"]


def test_student_generates_and_exports(student: Path, tmp_path: Path) -> None:
    out = generate(student, 200, "2", {"position": "0"}, tmp_path / "one.h5", progress=False)
    with ShowerFile(out) as f:
        b = f.read()
    assert b.showers.shape == (200, 32) and np.isfinite(b.showers).all() and (b.showers >= 0).all()
    # one network pass, no ODE: the exported graph agrees with torch on the same noise
    path = export_onnx(student, tmp_path / "one.onnx")
    sampler = load_onnx(path, student)
    model, _, _ = load_run(student)
    z = model.draw_noise(64, torch.Generator().manual_seed(0))
    e = np.full(64, 2000.0)
    ref = sampler(z.numpy(), e, {"position": np.zeros((64, 2))})
    assert ref.shape == (64, 32) and np.isfinite(ref).all()


def test_distill_bad_input(tiny_file: Path, teacher: Path, student: Path, tmp_path: Path) -> None:
    vae = train(tiny_file, "vae", tmp_path / "vae", steps=3, batch_size=32, progress=False)
    with pytest.raises(DistillError, match="flow-matching, flow or layer-fm teacher"):
        distill(vae, tmp_path / "x", n_pairs=200, steps=2, progress=False)
    with pytest.raises(DistillError, match="already holds a run"):
        distill(teacher, student, n_pairs=200, steps=2, progress=False)
    with pytest.raises(DistillError, match="n_pairs"):
        distill(teacher, tmp_path / "y", n_pairs=10, steps=2, progress=False)
    # the one-step model is made, not trained on showers
    assert "one-step" not in available_models() and "one-step" in available_models(include_derived=True)
    with pytest.raises(TrainingError, match=r"fastshower\.distill\(teacher, out\)"):
        train(tiny_file, "one-step", tmp_path / "z", steps=2, progress=False)


def test_distill_needs_the_training_file(tmp_path: Path, tiny_file: Path) -> None:
    import shutil

    data = tmp_path / "moved.h5"
    shutil.copyfile(tiny_file, data)
    run = train(data, "flow-matching", tmp_path / "fm", steps=3, batch_size=32, progress=False,
                config={"hparams": TEACHER_HP, "train": TRAIN})
    data.unlink()
    with pytest.raises(DistillError, match=r"moved\.h5"):
        distill(run, tmp_path / "s", n_pairs=200, steps=2, progress=False)
    assert cli_main(["distill", "--run", str(run), "--out", str(tmp_path / "s2"), "--pairs", "200", "--quiet"]) == 2


def test_flow_teacher_staged(tmp_path: Path, tiny_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A flow teacher distils staged: the student keeps stage 1, so for the same noise its layer energies are
    the teacher's, it regresses only the stage-2 latents (with the skip connection), and its calibrated
    occupancy head hits each voxel about as often as the teacher does."""
    hp = {"stage1_hidden": 16, "stage2_hidden": 32, "stage1_transforms": 2, "stage2_transforms": 2}
    teacher = train(tiny_file, "flow", tmp_path / "flow", steps=30, batch_size=64, progress=False,
                    config={"hparams": hp, "train": TRAIN})
    with pytest.raises(DistillError, match="ode_steps"):
        distill(teacher, tmp_path / "bad", n_pairs=200, steps=2, ode_steps=4, progress=False)
    run = distill(teacher, tmp_path / "one", n_pairs=4000, steps=400, batch_size=256,
                  hparams={"hidden": 32, "depth": 1, "emb_dim": 16, "warmup": 20, "occupancy_knots": 3},
                  progress=False)
    model, _, _ = load_run(run)
    t_model, _, _ = load_run(teacher)
    assert isinstance(model, OneStep) and isinstance(t_model, CaloFlow)
    assert model.stage1 is not None and model.stage1.flow2 is None and model.occupancy
    assert model.noise_dim() == 2 + 32 and model.skip
    meta = json.loads((run / "meta.json").read_text())["distilled"]
    assert meta["hit_rate_error_calibrated"] <= meta["hit_rate_error_uncalibrated"] + 1e-6
    assert meta["hit_rate_error_calibrated"] < 0.05
    c = torch.rand(2000, t_model.spec.cond_dim) * 2 - 1
    z = t_model.draw_noise(2000, torch.Generator().manual_seed(3))
    with torch.no_grad():
        x_s, x_t = model.sample_from_noise(z, c), t_model.sample_from_noise(z, c)
    # the same layer energies wherever the occupancy head leaves a layer any hit (all but a few)
    e_s, e_t = t_model.layer_energies(x_s), t_model.layer_energies(x_t)
    kept = e_s > 0
    assert float(((e_t > 0) & ~kept).float().mean()) < 0.01
    assert torch.allclose(e_s[kept], e_t[kept], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(x_s, x_t, atol=1e-3)
    # occupancy: the student's mean hit rate is the teacher's (calibrated), per voxel within a few per cent
    rate_s, rate_t = (x_s > 0).float().mean(0), (x_t > 0).float().mean(0)
    assert abs(float(rate_s.mean() - rate_t.mean())) < 0.02 and float((rate_s - rate_t).abs().max()) < 0.1
    # only the student's own net was trained: the stage-1 flow is the teacher's, bit for bit
    for k, v in model.stage1.state_dict().items():
        assert torch.equal(v, t_model.state_dict()[k]), k
    log = [json.loads(line) for line in (run / "distill_log.jsonl").read_text().splitlines()]
    assert log[-1]["relative_val_mse"] < 0.8 * log[0]["relative_val_mse"] and log[-1]["relative_val_mse"] < 1.0
    # it exports like any run: ONNX FP32 gives the torch showers for the same noise
    onnx_path = export_onnx(run, tmp_path / "s.onnx")
    sampler = load_onnx(onnx_path, run)
    e = np.full(64, 1000.0, dtype=np.float32)
    noise = model.draw_noise(64, torch.Generator().manual_seed(4)).numpy()
    out_onnx = sampler(noise, e, {"position": np.zeros((64, 2))})
    assert out_onnx.shape == (64, 32) and np.isfinite(out_onnx).all()
    # the command line reports the student's errors against the teacher
    capsys.readouterr()
    assert cli_main(["distill", "--run", str(teacher), "--out", str(tmp_path / "cli"), "--pairs", "500",
                     "--steps", "20", "--hidden", "16", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "held-out relative error" in out and "hit-rate error" in out


def test_layer_fm_teacher_staged(tmp_path: Path, tiny_file: Path) -> None:
    """layer-fm shares flow's stage 1 and stage-2 variables, so it distils staged as a flow does: the student
    holds the teacher's stage-1 flow bit for bit and, for the same noise, the same layer energies."""
    hp = {"stage1_hidden": 16, "stage1_transforms": 2, "hidden": 16, "depth": 1, "heads": 2, "emb_dim": 16,
          "steps": 2, "warmup": 5, "shares": "voxel", "energy_knots": 0}
    teacher = train(tiny_file, "layer-fm", tmp_path / "lfm", steps=20, batch_size=64, progress=False,
                    config={"hparams": hp, "train": TRAIN})
    scaled = train(tiny_file, "layer-fm", tmp_path / "lfm-e", steps=2, batch_size=64, progress=False,
                   config={"hparams": {**hp, "energy_knots": 3}, "train": TRAIN})
    with pytest.raises(DistillError, match="scales them by energy"):  # the student has one scaler for all
        distill(scaled, tmp_path / "no", n_pairs=100, steps=1, progress=False)
    run = distill(teacher, tmp_path / "one", n_pairs=1000, steps=50, batch_size=256,
                  hparams={"hidden": 32, "depth": 1, "emb_dim": 16, "warmup": 5, "occupancy": False},
                  progress=False)
    model, _, _ = load_run(run)
    t_model, _, _ = load_run(teacher)
    assert isinstance(model, OneStep) and model.stage1 is not None and model.stage1.flow2 is None
    for k, v in model.stage1.state_dict().items():
        assert torch.equal(v, t_model.state_dict()[k]), k
    c = torch.rand(500, t_model.spec.cond_dim) * 2 - 1
    z = t_model.draw_noise(500, torch.Generator().manual_seed(3))
    with torch.no_grad():
        e_s = t_model.layer_energies(model.sample_from_noise(z, c))
        e_t = t_model.layer_energies(t_model.sample_from_noise(z, c))
    kept = (e_s > 0) & (e_t > 0)
    assert float(kept.float().mean()) > 0.9
    assert torch.allclose(e_s[kept], e_t[kept], rtol=1e-4, atol=1e-6)
