"""Distillation of a flow-matching run into a one-step generator (tiny runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from fastshower.cli import main as cli_main
from fastshower.deploy import export_onnx, load_onnx
from fastshower.distillation import DistillError, distill
from fastshower.generation import generate
from fastshower.geometry import Geometry, PolarSegmentation, ReadoutLayer
from fastshower.io import ShowerFile
from fastshower.models import available_models
from fastshower.models.flow import CaloFlow
from fastshower.models.layer_fm import EnergyScaler, LayerFlowMatching, LayerFMConfig, turn_cells
from fastshower.models.onestep import OneStep, OneStepConfig
from fastshower.runs import load_run
from fastshower.sampling import SamplerModule
from fastshower.training import TrainingError, train
from fastshower.validate.synthetic import write_synthetic

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
    holds the teacher's stage-1 flow bit for bit and, for the same noise, the same layer energies; students
    written before the student held a layer-fm stage 1 load and behave as before."""
    hp = {"stage1_hidden": 16, "stage1_transforms": 2, "hidden": 16, "depth": 1, "heads": 2, "emb_dim": 16,
          "steps": 2, "warmup": 5, "shares": "voxel", "energy_knots": 0}
    teacher = train(tiny_file, "layer-fm", tmp_path / "lfm", steps=20, batch_size=64, progress=False,
                    config={"hparams": hp, "train": TRAIN})
    scaled = train(tiny_file, "layer-fm", tmp_path / "lfm-e", steps=2, batch_size=64, progress=False,
                   config={"hparams": {**hp, "energy_knots": 3}, "train": TRAIN})
    # energy-dependent stage-2 scaling was refused before the student held the teacher's own scaler
    distilled = distill(scaled, tmp_path / "scaled", n_pairs=100, steps=1, progress=False)
    s_scaled = load_run(distilled)[0]
    assert isinstance(s_scaled, OneStep) and isinstance(s_scaled.stage1, LayerFlowMatching)
    assert isinstance(s_scaled.stage1.scale2, EnergyScaler) and s_scaled.stage1.scale2.mean.shape == (3, 32)
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
    # a student saved before layer-fm stage 1s (stage1 = flow keys, no stage1_model) still loads as a flow's
    # stage 1 and gives the same showers: the voxel-share layer-fm's stage-2 variables are flow's
    old_hp = {**{k: v for k, v in model.hparams.items() if k != "stage1_model"},
              "stage1": LayerFMConfig.from_saved(t_model.hparams).stage1_config()}
    old = OneStep(model.spec, OneStepConfig.from_saved(old_hp))
    assert type(old.stage1) is CaloFlow and isinstance(model.stage1, LayerFlowMatching)
    old.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("stage1.scale_e.")})
    with torch.no_grad():
        torch.testing.assert_close(old.sample_from_noise(z, c), model.sample_from_noise(z, c), rtol=0.0, atol=0.0)


# --- layer-fm with ring shares and energy-scaled stage 2 (a tiny polar detector) ---------------------------

POLAR = Geometry(name="polar-3x3x4", description="test", source="tests", energy="10:100",
                 layers=tuple(ReadoutLayer("G4_W", 3.5, "G4_Si", 0.5, 2, PolarSegmentation((0.0, 3.0, 8.0, 20.0), 4))
                              for _ in range(3)))
RING_HP = {"stage1_hidden": 16, "stage1_transforms": 2, "hidden": 16, "depth": 1, "heads": 2, "emb_dim": 16,
           "steps": 3, "warmup": 5, "energy_knots": 3}


@pytest.fixture(scope="module")
def ring_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(teacher, student): a layer-fm on 600 synthetic showers of POLAR (ring shares by "auto", stage 2 scaled
    at 3 energy knots), and its staged one-step student."""
    d = tmp_path_factory.mktemp("ring")
    e = np.exp(np.random.default_rng(0).uniform(np.log(1e4), np.log(1e5), 600))
    data = write_synthetic(d / "polar.h5", POLAR, e, seed=1, zero_suppression=100.0)  # 89 % of cells hit
    teacher = train(data, "layer-fm", d / "lfm", steps=60, batch_size=64, progress=False,
                    config={"hparams": RING_HP, "train": TRAIN})
    student = distill(teacher, d / "one", n_pairs=2000, steps=300, batch_size=256, seed=1, progress=False,
                      hparams={"hidden": 32, "depth": 1, "emb_dim": 16, "warmup": 20, "occupancy_knots": 3})
    return teacher, student


def _ring_inputs(n: int, seed: int, model: OneStep) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return model.draw_noise(n, g), torch.rand(n, 1, generator=g) * 3.4 - 1.7


def test_ring_share_teacher_staged(ring_runs: tuple[Path, Path]) -> None:
    """The student of a ring-share, energy-scaled layer-fm holds the teacher's stage 1 and scalers bit for bit,
    regresses its W = V + L x R stage-2 numbers, and assembles with the teacher's code: each layer's energy is
    stage 1's, each ring's energy is its (renormalised) ring share of that layer."""
    teacher, student = ring_runs
    model, _, _ = load_run(student)
    t_model, _, _ = load_run(teacher)
    assert isinstance(model, OneStep) and isinstance(model.stage1, LayerFlowMatching) and model.occupancy
    stage1 = model.stage1
    assert stage1.rings == (4, 3) and "velocity" not in stage1._modules and model.skip
    assert model.target_width() == 36 + 3 * 3 and model.noise_dim() == 3 + 45 == t_model.noise_dim()
    assert model.occ_cuts.shape == (3, 45) and isinstance(stage1.scale2, EnergyScaler)
    for k, v in stage1.state_dict().items():
        assert torch.equal(v, t_model.state_dict()[k]), k
    log = [json.loads(line) for line in (student / "distill_log.jsonl").read_text().splitlines()]
    assert log[-1]["relative_val_mse"] < 0.8 * log[0]["relative_val_mse"]
    meta = json.loads((student / "meta.json").read_text())["distilled"]
    assert meta["hit_rate_error_calibrated"] <= meta["hit_rate_error_uncalibrated"] + 1e-6
    z, c = _ring_inputs(1000, 5, model)
    with torch.no_grad():
        x = model.sample_from_noise(z, c)
        g1 = stage1.sample_stage1(z[:, :3], c)
        e = stage1.stage1_inverse(stage1.scale1.inverse(g1))  # (B, L) stage 1's layer fractions
        share = stage1._expit(stage1.unstandardise2(model.stage2_latents(z, c, g1), c)).reshape(-1, 3, 15)
    layer = stage1.layer_energies(x)
    kept = layer > 0
    assert float(kept.float().mean()) > 0.95
    torch.testing.assert_close(layer[kept], e[kept], rtol=1e-5, atol=0.0)
    rings = share[:, :, :3] * (share[:, :, :3] >= stage1.config.zero_share)
    rings = rings / rings.sum(2, keepdim=True)
    got = x.reshape(-1, 3, 4, 3).sum(2) / layer.unsqueeze(2)  # each ring's fraction of its layer
    torch.testing.assert_close(got[kept], rings[kept], rtol=1e-4, atol=1e-6)
    # and the radial profile is the teacher's: mean ring fractions per layer within a few per cent
    with torch.no_grad():
        x_t = t_model.sample_from_noise(z, c)
    prof_s = got[kept.all(1)].mean(0)
    prof_t = (x_t.reshape(-1, 3, 4, 3).sum(2) / t_model.layer_energies(x_t).unsqueeze(2).clamp_min(1e-12)).mean(0)
    assert float((prof_s - prof_t).abs().max()) < 0.05, (prof_s, prof_t)
    # occupancy (the data's zero suppression empties 11 % of the cells, outer rings of the last layer most):
    # the calibrated ring and cell hits give each cell about the teacher's hit rate
    rate_s, rate_t = (x > 0).float().mean(0), (x_t > 0).float().mean(0)
    assert float(rate_t.min()) < 0.6 and abs(float(rate_s.mean() - rate_t.mean())) < 0.03
    assert float((rate_s - rate_t).abs().max()) < 0.1


def test_identity_student_is_the_teachers_assembly(ring_runs: tuple[Path, Path]) -> None:
    """With its net's output zeroed and every stage-2 number let through, the student's latents are its noise
    (the skip connection), and its showers are the teacher's assembly of that noise, up to float rounding."""
    teacher, student = ring_runs
    model, _, _ = load_run(student)
    t_model, _, _ = load_run(teacher)
    assert isinstance(model, OneStep) and isinstance(t_model, LayerFlowMatching)
    with torch.no_grad():
        model.body.out.weight.zero_()
        model.body.out.bias.zero_()
        model.occ_cuts.fill_(-1e4)  # logits 0 are above every cut: nothing dropped
        z, c = _ring_inputs(500, 6, model)
        x = model.sample_from_noise(z, c)
        want = t_model.assemble(t_model.sample_stage1(z[:, :3], c), z[:, 3:], c)
    torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-9)
    assert float((want > 0).float().mean()) > 0.5


def test_ring_share_student_exports(ring_runs: tuple[Path, Path], tmp_path: Path) -> None:
    """ONNX FP32 of the ring-share student gives the torch sampler's showers (MeV) for the same noise."""
    _, student = ring_runs
    run = load_run(student)
    sampler = load_onnx(export_onnx(student, tmp_path / "ring.onnx"), student)
    z = run[0].draw_noise(64, torch.Generator().manual_seed(7))
    e = np.exp(np.random.default_rng(7).uniform(np.log(1e4), np.log(1e5), 64))
    got = sampler(z.numpy(), e, {})
    with torch.no_grad():
        want = SamplerModule(run)(z, torch.as_tensor(e, dtype=torch.float32).reshape(-1, 1)).numpy()
    assert got.shape == (64, 36) and (got > 0).any(1).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.max()))


@pytest.mark.parametrize(("layer_knots", "more"), [(0, {}), (3, {}),
                                                   (0, {"mode_rings": 1, "count_copula": True, "hit_map": True,
                                                          "depth_copula": True, "layer_copula": True,
                                                          "coherent_rings": 1, "share_copula": True})])
def test_counting_teacher_with_maps_distils_and_exports(tmp_path: Path, layer_knots: int, more: dict[str, Any]) -> None:
    """A layer-fm that generates hit counts (occupancy="count") with layer and ring maps (maps="all", fitted at the
    end of training; with layer_knots also per layer energy; with mode_rings the inner ring's angular modes, with
    count_copula the counts' dependence on the layer energy, with hit_map a cap on the rings' energy per hit, with
    depth_copula the layers' counts' dependence on each other, with layer_copula the layer energies' dependence and
    with coherent_rings the inner ring's gains on its depth-summed pattern, with share_copula the rings' shares'
    dependence) distils: the student keeps the teacher's stage 1 with its maps, its rings hold the hits its count
    numbers say, and its ONNX export gives the torch sampler's showers."""
    e = np.exp(np.random.default_rng(2).uniform(np.log(1e4), np.log(1e5), 400))
    data = write_synthetic(tmp_path / "polar.h5", POLAR, e, seed=3, zero_suppression=100.0)
    hp = {**RING_HP, "occupancy": "count", "maps": "all", "layer_knots": layer_knots, **more}
    teacher = train(data, "layer-fm", tmp_path / "lfm", steps=20, batch_size=64, progress=False,
                    config={"hparams": hp, "train": TRAIN})
    t_model = load_run(teacher)[0]
    assert isinstance(t_model, LayerFlowMatching) and not torch.equal(t_model.layer_table[..., 0, :],
                                                                     t_model.layer_table[..., 1, :])
    student = distill(teacher, tmp_path / "one", n_pairs=500, steps=40, batch_size=128, seed=1, progress=False,
                      hparams={"hidden": 16, "depth": 1, "emb_dim": 16, "warmup": 5, "occupancy_knots": 3})
    run = load_run(student)
    model = run[0]
    assert isinstance(model, OneStep) and isinstance(model.stage1, LayerFlowMatching)
    assert torch.equal(model.stage1.layer_table, t_model.layer_table)
    assert torch.equal(model.stage1.ring_table, t_model.ring_table)
    if more:  # the modes fitted where the inner ring is fully hit in 40 showers of a knot, else the identity
        assert torch.equal(model.stage1.mode_table, t_model.mode_table)
        assert torch.equal(model.stage1.copula_mix, t_model.copula_mix)
        assert not torch.equal(t_model.copula_mix, torch.eye(4).expand_as(t_model.copula_mix))
        assert torch.equal(model.stage1.hit_cap, t_model.hit_cap)
        assert torch.equal(model.stage1.depth_mix, t_model.depth_mix)
        assert torch.equal(model.stage1.layer_mix, t_model.layer_mix)
        assert not torch.equal(t_model.layer_mix, torch.eye(3).expand_as(t_model.layer_mix))
        assert not torch.equal(t_model.depth_mix[..., 3:], torch.eye(3).expand_as(t_model.depth_mix[..., 3:]))
        assert torch.equal(model.stage1.core_gain, t_model.core_gain) and bool(t_model.core_gain.abs().sum() > 0)
        assert torch.equal(model.stage1.share_mix, t_model.share_mix)
        assert not torch.equal(t_model.share_mix, torch.eye(4).expand_as(t_model.share_mix))
    z, c = _ring_inputs(300, 4, model)
    with torch.no_grad():
        x = model.sample_from_noise(z, c).reshape(-1, 3, 4, 3)
        g1 = model.stage1.sample_stage1(z[:, :3], c)
        e_layers = model.stage1.stage1_inverse(model.stage1.scale1.inverse(g1))
        y = model.stage1.unstandardise2(model.stage2_latents(z, c, g1), c, e_layers).reshape(-1, 3, 3 * 2 + 12)
    n = model.stage1._counts(y[:, :, 3:6])
    layer_alive = (n.amax(2) >= 1).unsqueeze(2)  # a layer counted empty keeps one hit in its largest ring
    counted, n = (x > 0).sum(2).float(), n.clamp(max=4.0)
    alive = layer_alive.expand_as(n)
    # never more hits than counted; fewer only where a kept cell falls below the noise cut (1e-9 E_inc)
    assert bool((counted[alive] <= n[alive]).all()) and float((counted[alive] == n[alive]).float().mean()) > 0.9
    sampler = load_onnx(export_onnx(student, tmp_path / "count.onnx"), student)
    zz = model.draw_noise(32, torch.Generator().manual_seed(7))
    ee = np.exp(np.random.default_rng(7).uniform(np.log(1e4), np.log(1e5), 32))
    with torch.no_grad():
        want = SamplerModule(run)(zz, torch.as_tensor(ee, dtype=torch.float32).reshape(-1, 1)).numpy()
    np.testing.assert_allclose(sampler(zz.numpy(), ee, {}), want, rtol=1e-3, atol=1e-4 * float(want.max()))


@pytest.mark.parametrize("option", [{"fourier_rings": 1}, {"stencil": True}, {"align": True}])
def test_fourier_stencil_or_aligned_teacher_exports_and_distils(tmp_path: Path, option: dict[str, Any]) -> None:
    """A layer-fm whose velocity net sees the inner ring's angular Fourier modes (fourier_rings=1), or each cell's
    grid neighbours (stencil), or that learns aligned showers and turns its samples (align), exports to ONNX with
    the torch sampler's showers, and distils into a student that samples showers of the right size; an aligned
    teacher's student turns its showers by the same noise number as the teacher."""
    e = np.exp(np.random.default_rng(4).uniform(np.log(1e4), np.log(1e5), 300))
    data = write_synthetic(tmp_path / "polar.h5", POLAR, e, seed=5, zero_suppression=100.0)
    teacher = train(data, "layer-fm", tmp_path / "lfm", steps=5, batch_size=64, progress=False,
                    config={"hparams": {**RING_HP, "occupancy": "count", **option}, "train": TRAIN})
    run = load_run(teacher)
    sampler = load_onnx(export_onnx(teacher, tmp_path / "fourier.onnx"), teacher)
    zz = run[0].draw_noise(16, torch.Generator().manual_seed(3))
    ee = np.exp(np.random.default_rng(3).uniform(np.log(1e4), np.log(1e5), 16))
    with torch.no_grad():
        want = SamplerModule(run)(zz, torch.as_tensor(ee, dtype=torch.float32).reshape(-1, 1)).numpy()
    assert (want > 0).any(1).all()
    np.testing.assert_allclose(sampler(zz.numpy(), ee, {}), want, rtol=1e-3, atol=1e-4 * float(want.max()))
    student = distill(teacher, tmp_path / "one", n_pairs=200, steps=5, batch_size=64, seed=1, progress=False,
                      hparams={"hidden": 16, "depth": 1, "emb_dim": 16, "warmup": 2})
    model = load_run(student)[0]
    z, c = _ring_inputs(8, 4, model)
    with torch.no_grad():
        x = model.sample_from_noise(z, c)
        assert x.shape == (8, 36)
        if option.get("align"):
            z[:, 3] = -10.0  # no turn
            base = model.sample_from_noise(z, c)
            z[:, 3] = 10.0  # mirror, then 3 bins on
            last = model.sample_from_noise(z, c)
    if option.get("align"):
        assert model.noise_dim() == 3 + 1 + 36 + 2 * 3 * 3  # layers, the turn, cells, ring shares and counts
        assert torch.equal(last, turn_cells(base, 3, 4, 3, torch.full((8,), 3.0), torch.ones(8)))
