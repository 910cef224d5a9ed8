"""The 3DGAN ("3dgan"): grid plan, shapes, the power transform, training, resume, ONNX export, conditioning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fastshower.deploy import export_onnx, load_onnx
from fastshower.generation import generate
from fastshower.geometry import get_geometry
from fastshower.io import ShowerFile
from fastshower.models import ModelSpec, build_model
from fastshower.models.base import model_cost
from fastshower.models.gan3d import GAN3D, PowerTransform, upsampling_plan
from fastshower.runs import load_run
from fastshower.sampling import SamplerModule, draw_noise
from fastshower.training import train

SIW = ModelSpec.from_geometry(get_geometry("siw-51x51x25"))
SMALL = {"hidden": 8, "critic_hidden": 4, "latent_dim": 8}
TINY_TRAIN = {"hparams": {"hidden": 8, "critic_hidden": 4, "latent_dim": 8, "depth": 2},
              "train": {"chunk_rows": 128, "shuffle_chunks": 2}}


def _sparse_showers(n: int, v: int, seed: int = 0) -> torch.Tensor:
    """Model-space showers like Geant4's: mostly exact zeros, a few cells at 1e-6..1e-2 of E_inc."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, v, generator=g) ** 12 * 1e-2
    return torch.where(torch.rand(n, v, generator=g) < 0.9, torch.zeros_like(x), x)


def test_upsampling_plan_lands_on_the_calorimeter_grid() -> None:
    start, sizes = upsampling_plan((25, 51, 51), 3)
    assert start == (4, 7, 7) and sizes == [(7, 13, 13), (13, 26, 26), (25, 51, 51)]
    for grid in [(2, 4, 4), (1, 5, 5), (30, 30, 30), (45, 16, 9)]:
        start, sizes = upsampling_plan(grid, 3)
        cur = start
        for size in sizes:  # kernel 4, stride 2, padding 1: n -> 2n, then cropped
            assert all(n <= 2 * m for n, m in zip(size, cur, strict=True))
            cur = size
        assert sizes[-1] == grid
        model = build_model("3dgan", ModelSpec.from_geometry(_cartesian(grid)), SMALL)
        assert model.generate_power(torch.randn(2, 8), torch.randn(2, 1)).shape == (2, 1, *grid)


def _cartesian(grid: tuple[int, int, int]) -> Any:
    from fastshower.geometry import CartesianSegmentation, Geometry, ReadoutLayer

    layer = ReadoutLayer("G4_W", 3.5, "G4_Si", 0.5, 1, CartesianSegmentation(grid[2], grid[1], 5.0, 5.0))
    return Geometry(name="grid", description="test", source="tests", layers=(layer,) * grid[0], energy="1:10")


def test_no_checkerboard_at_initialisation() -> None:
    """Kernel-4 up-sampling: an untrained generator's mean output varies smoothly from layer to layer (kernel 3
    made every other layer ~50x brighter after 400 training steps)."""
    torch.manual_seed(0)
    model = build_model("3dgan", SIW, SMALL).train()
    with torch.no_grad():
        y = model.generate_power(torch.randn(16, 8), torch.zeros(16, 1))
    z = y.mean(dim=(0, 1, 3, 4))[1:-1]
    assert float((z[1:] / z[:-1]).max()) < 2.0 and float((z[:-1] / z[1:]).max()) < 2.0


def test_shapes_on_the_3dgan_calorimeter() -> None:
    torch.manual_seed(0)
    model = build_model("3dgan", SIW, SMALL)
    assert isinstance(model, GAN3D) and model.grid == (25, 51, 51)
    x, c = _sparse_showers(3, SIW.n_voxels), torch.randn(3, 1)
    losses = model.loss(x, c)
    assert set(losses) >= {"loss", "generator", "ecal_mape"} and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    s = model.sample(c, torch.Generator().manual_seed(1))
    assert s.shape == (3, 65025) and s.dtype == torch.float32
    logit, aux = model.discriminator(model.to_power(x))
    assert logit.shape == (3,) and aux.shape == (3, 1)


def test_default_size_fits_a_cpu() -> None:
    """The default networks: < 1 M parameters, < 0.1 GFLOP per generated shower on siw-51x51x25."""
    cost = model_cost(build_model("3dgan", SIW))
    assert cost["parameters"] < 1e6
    assert cost["flops_per_shower_sample"] < 1e8


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_power_transform_inverts(dtype: torch.dtype, rtol: float) -> None:
    t = PowerTransform(0.85, 1e-3)
    x = torch.cat([torch.zeros(10, dtype=dtype), torch.logspace(-12, 0, 500, dtype=dtype)])
    y = t(x)
    assert (y >= 0).all() and y[0] == 0
    torch.testing.assert_close(t.inverse(y), x, rtol=rtol, atol=0)
    torch.testing.assert_close(y, (x / 1e-3) ** 0.85, rtol=rtol, atol=0)
    # negative inputs (none in Geant4 files) are clamped, never NaN
    assert torch.equal(t(torch.tensor([-1.0])), torch.tensor([0.0]))


def test_generator_output_is_non_negative_with_exact_zeros() -> None:
    torch.manual_seed(0)
    model = build_model("3dgan", SIW, SMALL).eval()
    s = model.sample(torch.randn(4, 1) * 3, torch.Generator().manual_seed(2))
    assert (s >= 0).all() and (s == 0).any()


def test_training_steps_stay_finite() -> None:
    torch.manual_seed(0)
    model = build_model("3dgan", SIW, SMALL)
    opts = model.configure_optimizers()
    model.train()
    for step in range(4):
        logs = model.training_step(_sparse_showers(4, SIW.n_voxels, seed=step), torch.randn(4, 1), opts, step)
        assert all(np.isfinite(v) for v in logs.values()), logs
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert {"loss", "loss_generator", "ecal_mape", "aux_real"} <= set(logs)


def test_loss_weights_default_to_the_papers() -> None:
    cfg = build_model("3dgan", SIW, SMALL).config
    assert (cfg.adv_weight, cfg.aux_weight, cfg.ecal_weight) == (3.0, 0.1, 0.1)
    assert (cfg.power, cfg.label_flip, cfg.generator_steps, cfg.optimizer, cfg.lr) == (0.85, 0.05, 2, "rmsprop",
                                                                                      1e-3)


def test_resume_continues_bit_for_bit(tiny_file: Path, tmp_path: Path) -> None:
    whole = train(tiny_file, "3dgan", tmp_path / "whole", steps=4, batch_size=32, progress=False,
                  config=TINY_TRAIN)
    train(tiny_file, "3dgan", tmp_path / "split", steps=2, batch_size=32, progress=False, config=TINY_TRAIN)
    split = train(tiny_file, "3dgan", tmp_path / "split", steps=4, batch_size=32, progress=False,
                  config=TINY_TRAIN, resume=True)
    a, b = load_run(whole)[0].state_dict(), load_run(split)[0].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_file: Path) -> Path:
    return train(tiny_file, "3dgan", tmp_path_factory.mktemp("gan3d") / "run", steps=6, batch_size=32,
                 progress=False, config=TINY_TRAIN)


def test_onnx_export_matches_torch_for_the_same_noise(tiny_run: Path, tmp_path: Path) -> None:
    path = export_onnx(tiny_run, tmp_path / "g.onnx")
    run = load_run(tiny_run)
    sampler, module = load_onnx(path, tiny_run), SamplerModule(run)
    n = 23
    rng = np.random.default_rng(0)
    e = rng.choice([1000.0, 2000.0, 5000.0], n)
    pos = rng.uniform(-5, 5, (n, 2))
    z = draw_noise(run[0], n, torch.Generator().manual_seed(4))
    got = sampler(z, e, {"position": pos})
    with torch.no_grad():
        want = module(z, torch.as_tensor(e, dtype=torch.float32).reshape(-1, 1),
                      torch.as_tensor(pos, dtype=torch.float32)).numpy()
    assert got.shape == (n, 32) and (got >= 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(want.max())))


def test_energy_conditioning_orders_total_energy(belle_file: Path, tmp_path: Path) -> None:
    """After a few steps on toy showers, the mean generated E_tot grows with the incident energy."""
    run = train(belle_file, "3dgan", tmp_path / "run", steps=20, batch_size=32, progress=False,
                config={"hparams": {"hidden": 8, "critic_hidden": 4, "latent_dim": 8, "depth": 1},
                        "train": {"chunk_rows": 100}})
    means = []
    for e in ("0.5", "1.5", "2.5"):
        out = generate(run, 200, e, {"position": "0,0"}, tmp_path / f"g{e}.h5", progress=False, seed=1)
        with ShowerFile(out) as f:
            means.append(float(f.read().showers.sum(1).mean()))
    assert means[0] < means[1] < means[2], means


def test_switched_off_cells_keep_a_gradient_in_training_only() -> None:
    torch.manual_seed(0)
    model = build_model("3dgan", SIW, SMALL)
    gen = model.generator
    with torch.no_grad():
        gen.voxel_bias.fill_(-100.0)  # every cell off
    z, c = torch.randn(2, 8), torch.zeros(2, 1)
    gen.train()
    y = gen(z, c)
    assert torch.equal(y, torch.zeros_like(y))  # the output is still the ReLU's
    y.sum().backward()
    assert gen.voxel_bias.grad is not None and float(gen.voxel_bias.grad.abs().min()) > 0
    gen.zero_grad()
    model.eval()
    torch.testing.assert_close(gen(z, c), torch.zeros_like(y), rtol=0, atol=0)
    plain = build_model("3dgan", SIW, {**SMALL, "dead_slope": 0.0}).generator
    with torch.no_grad():
        plain.voxel_bias.fill_(-100.0)
    plain(z, c).sum().backward()
    assert float(plain.voxel_bias.grad.abs().max()) == 0
