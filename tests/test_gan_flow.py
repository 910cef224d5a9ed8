"""Protocol tests of the adversarial models (wgan-gp, calogan) and the two-stage flow (flow).

Tiny networks on a 2-layer 3x3 + 2x2 geometry and on belle2-ecl-5x5 with a
(log E, x, y) condition; CPU only, a few seconds in all.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fastshower.errors import ConfigError
from fastshower.geometry import CartesianSegmentation, Geometry, ReadoutLayer, get_geometry
from fastshower.models import get_model_class
from fastshower.models.base import ModelSpec, ShowerModel
from fastshower.models.calogan import CaloGAN, CaloGANConfig, MinibatchDiscrimination
from fastshower.models.calogan import shower_features as calogan_features
from fastshower.models.flow import CaloFlow, FlowConfig
from fastshower.models.wgan import WGANGP, AdversarialConfig, WGANConfig, position_columns, shower_features

TINY_HP: dict[str, dict[str, Any]] = {
    "wgan-gp": {"hidden": 32, "depth": 2, "latent_dim": 8, "constrainer_hidden": 16,
                "constrainer_warmup": 0, "n_critic": 2},
    "calogan": {"hidden": 32, "depth": 1, "latent_dim": 8, "layer_dim": 8,
                "mbd_kernels": 4, "mbd_dim": 3, "n_critic": 2},
    "flow": {"stage1_hidden": 16, "stage2_hidden": 32, "stage1_transforms": 2, "stage2_transforms": 2},
}
MODELS = list(TINY_HP)


def _layer(nx: int, ny: int) -> ReadoutLayer:
    return ReadoutLayer("G4_W", 3.5, "G4_Si", 0.5, 1, CartesianSegmentation(nx, ny, 5.0, 5.0))


def _spec(geo: Geometry, cond_names: tuple[str, ...]) -> ModelSpec:
    return ModelSpec(
        n_voxels=geo.n_voxels,
        layer_sizes=geo.layer_sizes,
        layer_shapes=tuple(geo.layer_shape(i) for i in range(geo.n_layers)),
        cond_dim=len(cond_names),
        cond_names=cond_names,
    )


TINY = Geometry(name="tiny2", description="3x3 + 2x2", source="test", layers=(_layer(3, 3), _layer(2, 2)))
SPECS = {
    "tiny2": _spec(TINY, ("log_energy",)),
    "belle2": _spec(get_geometry("belle2-ecl-5x5"), ("log_energy", "position_x", "position_y")),
}


def _data(model: ShowerModel, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """A learnable synthetic batch in the model's space: (x (n, V), c (n, C)).

    Showers are a fixed per-voxel profile whose scale follows condition column 0 and
    whose weight shifts with the position columns. For the per-incident models x is
    the fraction of E_inc (>= 0, sums to ~0.9, with exact zeros); for wgan-gp it is an
    unbounded standardised-log-like vector.
    """
    g = torch.Generator().manual_seed(seed)
    spec = model.spec
    c = torch.randn(n, spec.cond_dim, generator=g)
    profile = torch.softmax(torch.linspace(2.0, -2.0, spec.n_voxels), 0)
    v = torch.linspace(0.0, 3.0, spec.n_voxels)
    # each position column moves the shower along its own voxel pattern, so both are identifiable
    shift = sum((c[:, k : k + 1] * torch.sin(k * v + k) for k in range(1, spec.cond_dim)), torch.zeros(n, 1))
    if model.default_transform == ("per_incident",):
        w = profile * torch.exp(0.3 * shift) * (1 + 0.1 * torch.rand(n, spec.n_voxels, generator=g))
        x = 0.9 * w / w.sum(1, keepdim=True) * (1 + 0.05 * c[:, :1])
        return torch.where(x < 0.01, torch.zeros_like(x), x), c
    x = c[:, :1] + shift + 0.1 * torch.randn(n, spec.n_voxels, generator=g)
    return x, c


def _build(name: str, spec_key: str, seed: int = 0, **extra: Any) -> ShowerModel:
    torch.manual_seed(seed)
    return get_model_class(name)(SPECS[spec_key], TINY_HP[name], **extra)


def _step(model: ShowerModel, opts: list[torch.optim.Optimizer], step: int, seed: int) -> dict[str, float]:
    x, c = _data(model, 32, seed)
    return model.training_step(x, c, opts, step)


@pytest.mark.parametrize("spec_key", list(SPECS))
@pytest.mark.parametrize("name", MODELS)
def test_sample_shape_seed_and_state_dict(name: str, spec_key: str) -> None:
    model = _build(name, spec_key)
    opts = model.configure_optimizers()
    for s in range(2):  # also fits the flow's scalers, so that buffers are part of the round trip
        _step(model, opts, s, seed=s)
    model.eval()
    c = torch.randn(7, model.spec.cond_dim)
    a = model.sample(c, torch.Generator().manual_seed(3))
    assert a.shape == (7, model.spec.n_voxels)
    assert torch.isfinite(a).all()
    assert torch.equal(a, model.sample(c, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, model.sample(c, torch.Generator().manual_seed(4)))
    if model.default_transform == ("per_incident",):
        assert (a >= 0).all()

    other = _build(name, spec_key, seed=1)
    other.load_state_dict(model.state_dict())
    other.eval()
    assert torch.equal(a, other.sample(c, torch.Generator().manual_seed(3)))


def _assert_all_grads(module: torch.nn.Module, what: str) -> None:
    for pname, p in module.named_parameters():
        assert p.grad is not None, f"{what}: no gradient for {pname}"
        assert p.grad.abs().sum() > 0, f"{what}: zero gradient for {pname}"


@pytest.mark.parametrize("spec_key", list(SPECS))
@pytest.mark.parametrize("name", ["wgan-gp", "calogan"])
def test_gan_gradients_reach_every_network(name: str, spec_key: str) -> None:
    model = _build(name, spec_key)
    assert isinstance(model, WGANGP | CaloGAN)
    opts = model.configure_optimizers()
    n_critic = model.config.n_critic
    assert [model.is_generator_step(s) for s in range(2 * n_critic)] == [
        (s + 1) % n_critic == 0 for s in range(2 * n_critic)
    ]
    logs = _step(model, opts, n_critic - 1, seed=0)  # a critic + constrainer + generator step
    assert "loss_generator" in logs and "gp" in logs
    assert all(v == v for v in logs.values())  # no NaN
    _assert_all_grads(model.generator, "generator")
    _assert_all_grads(model.critic, "critic")
    if isinstance(model, WGANGP):
        assert model.energy_constrainer is not None
        _assert_all_grads(model.energy_constrainer, "energy constrainer")
        if spec_key == "belle2":
            assert model.position_constrainer is not None and len(opts) == 3
            _assert_all_grads(model.position_constrainer, "position constrainer")
        else:
            assert model.position_constrainer is None


@pytest.mark.parametrize("spec_key", list(SPECS))
def test_flow_gradients_reach_every_parameter(spec_key: str) -> None:
    model = _build("flow", spec_key)
    x, c = _data(model, 32, 0)
    model.loss(x, c)["loss"].backward()
    _assert_all_grads(model, "flow")


def test_wgan_constrainers_learn() -> None:
    model = _build("wgan-gp", "belle2", constrainer_lr=3e-3)
    assert isinstance(model, WGANGP)
    assert model.pos_cols == [1, 2]
    opts = model.configure_optimizers()
    x_eval, c_eval = _data(model, 256, 99)
    with torch.no_grad():
        before = model.constrainer_errors(x_eval, c_eval)
    for s in range(40):
        _step(model, opts, s, seed=s)
    with torch.no_grad():
        after = model.constrainer_errors(x_eval, c_eval)
    for key in ("energy_constraint", "position_constraint"):
        assert after[key] < 0.5 * before[key], (key, before[key], after[key])


def test_calogan_critic_separates_real_from_untrained_generator() -> None:
    # n_critic larger than the number of steps: the generator stays fixed, the critic learns
    model = _build("calogan", "tiny2", n_critic=1000, lr=1e-3)
    assert isinstance(model, CaloGAN)
    opts = model.configure_optimizers()
    x_eval, c_eval = _data(model, 128, 99)
    model.fit_to_data(x_eval)  # what the first training step does: the generator starts at the mean shower
    torch.manual_seed(0)
    with torch.no_grad():
        w0 = float(model.loss(x_eval, c_eval)["wasserstein"])
    for s in range(60):
        _step(model, opts, s, seed=s)
    torch.manual_seed(0)
    with torch.no_grad():
        w1 = float(model.loss(x_eval, c_eval)["wasserstein"])
    assert w1 > w0 + 0.1 and w1 > 0, (w0, w1)


def test_flow_nll_decreases() -> None:
    model = _build("flow", "belle2", lr=2e-3)
    opts = model.configure_optimizers()
    x_eval, c_eval = _data(model, 256, 99)
    torch.manual_seed(0)
    before = float(model.loss(x_eval, c_eval)["loss"].detach())  # in training mode: fits the scalers
    for s in range(30):
        _step(model, opts, s, seed=s)
    torch.manual_seed(0)
    with torch.no_grad():
        after = model.loss(x_eval, c_eval)
    assert float(after["loss"]) < before - 5.0, (before, float(after["loss"]))
    assert set(after) == {"loss", "nll_stage1", "nll_stage2"}


def test_flow_decomposition_round_trip() -> None:
    model = _build("flow", "tiny2")
    assert isinstance(model, CaloFlow)
    x = torch.rand(5, 13) * 0.05 + 1e-4
    e = model.layer_energies(x)
    assert torch.allclose(e, torch.stack([x[:, :9].sum(1), x[:, 9:].sum(1)], 1))
    assert torch.allclose(model.stage1_inverse(model.stage1_features(e)), e, rtol=1e-4)
    assert torch.allclose(model.stage2_inverse(model.stage2_features(x, e), e), x, rtol=1e-3, atol=1e-7)


def test_calogan_energy_term_and_mbd() -> None:
    model = _build("calogan", "tiny2")
    assert isinstance(model, CaloGAN)
    x = torch.zeros(2, 13)
    x[0, 0], x[1, :] = 1.5, 0.05
    assert torch.allclose(model.energy_excess(x), torch.tensor([0.5, 0.0]))
    mbd = MinibatchDiscrimination(4, 3, 2)
    f = torch.randn(5, 4)
    o = mbd(f)
    assert o.shape == (5, 3) and (o >= 0).all()
    dup = mbd(torch.cat([f[:1], f[:1]]))  # two identical samples: each sees the other with weight 1
    assert torch.allclose(dup, torch.ones_like(dup))


def test_calogan_energies_first_generator_conserves_energy_and_sets_layer_energies() -> None:
    """``output_param="energies"``: every layer holds exactly the energy the energy network drew, and
    E_tot / E_inc = cap (1 - leak) <= cap for any latent (no penalty needed)."""
    model = _build("calogan", "tiny2", energy_cap=1.0)
    assert isinstance(model, CaloGAN) and model.config.output_param == "energies" and model.config.attention
    gen = model.generator
    z, c = torch.randn(64, 8) * 3, torch.randn(64, 1)
    with torch.no_grad():
        x = gen(z, c)
        e_l, leak = gen.energies(z, c)
    assert (x >= 0).all() and (x.sum(1) <= 1.0 + 1e-6).all()
    torch.testing.assert_close(torch.stack([x[:, :9].sum(1), x[:, 9:].sum(1)], 1), e_l, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.sum(1), 1.0 - leak, rtol=1e-5, atol=1e-7)
    assert float(model.energy_excess(x).max()) == 0.0
    # started from real showers: the leak is bounded to leak0 e^(+-leak_range), leak0 their geometric mean
    real, _ = _data(model, 64, 3)
    model.fit_to_data(real)
    leak0 = float(torch.exp(torch.log(1 - real.sum(1)).mean()))
    assert math.isclose(float(torch.exp(gen.log_leak0)), leak0, rel_tol=1e-5)
    with torch.no_grad():
        _, leak = gen.energies(z * 100, c)
    r = model.config.leak_range
    assert float(leak.min()) >= leak0 * math.exp(-r) * (1 - 1e-5) and float(leak.max()) <= leak0 * math.exp(r) * 1.00001
    _step(model, model.configure_optimizers(), 1, seed=0)  # a generator step: attention and energy net train
    _assert_all_grads(model.generator, "energies-first generator with attention")


def _split_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """tiny2 showers (n, 13) whose layer-0 share is 5 % for half of them and 40 % for the other half, at a
    total of 0.9 E_inc: a broad, two-valued energy split (as a photon's conversion depth gives)."""
    g = torch.Generator().manual_seed(seed)
    f0 = torch.where(torch.rand(n, generator=g) < 0.5, 0.05, 0.40) * (1 + 0.05 * torch.randn(n, generator=g))
    shape0, shape1 = torch.softmax(torch.randn(n, 9, generator=g), 1), torch.softmax(torch.randn(n, 4, generator=g), 1)
    x = 0.9 * torch.cat([f0[:, None] * shape0, (1 - f0)[:, None] * shape1], 1)
    return x, torch.zeros(n, 1)


def test_calogan_likelihood_energies_learn_a_two_valued_split_and_set_every_layer() -> None:
    """``energies="likelihood"``: the energy flow, trained by likelihood alone (auxiliary updates), draws the
    two-valued layer-0 share of the data in the right proportion, every generated layer holds exactly the
    energy the flow drew for it, and in a training step the generated showers take the real batch's energies
    while the gradients reach the generator."""
    torch.manual_seed(0)
    model = CaloGAN(SPECS["tiny2"], {**TINY_HP["calogan"], "energies": "likelihood"})
    assert model.generator.energy_net is None and model.energy_flow is not None
    opts = model.configure_optimizers()
    assert len(opts) == 3  # generator, critic, energy flow
    with torch.no_grad():
        nll0 = float(model.energy_nll(*_split_data(512, 99)))
    for step in range(300):
        model.auxiliary_step(*_split_data(256, step), opts[2:], step)
    model.eval()
    with torch.no_grad():
        assert float(model.energy_nll(*_split_data(512, 99))) < nll0 - 2.0
    z, c = torch.randn(2000, 8, generator=torch.Generator().manual_seed(5)), torch.zeros(2000, 1)
    with torch.no_grad():
        x = model.generate(z, c)
        flow = model.energy_flow
        e_l = model.undequantise(flow.stage1_inverse(flow.scale1.inverse(flow.sample_stage1(z[:, :2], c))))
    torch.testing.assert_close(torch.stack([x[:, :9].sum(1), x[:, 9:].sum(1)], 1), e_l, rtol=1e-5, atol=1e-6)
    share0 = x[:, :9].sum(1) / x.sum(1)
    assert abs(float((share0 > 0.2).float().mean()) - 0.5) < 0.08  # both modes, in proportion
    assert abs(float(x.sum(1).median()) - 0.9) < 0.03
    model.train()
    seen: list[Tensor] = []
    hook = model.generator.register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    real, c = _split_data(32, 7)
    model.training_step(real, c, opts, 1)  # a critic and a generator step
    hook.remove()
    _assert_all_grads(model.generator, "generator under likelihood energies")
    # inside a step the generated showers carry the real batch's layer energies: the critic sees shapes only
    assert len(seen) == 2
    for out in seen:
        torch.testing.assert_close(out[:, :9].sum(1), real[:, :9].sum(1), rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # outside a step: the flow's draw again
        assert not torch.allclose(model.sample(c)[:, :9].sum(1), real[:, :9].sum(1), rtol=1e-3)
    with pytest.raises(ValueError, match="output_param='energies'"):
        CaloGAN(SPECS["tiny2"], {**TINY_HP["calogan"], "energies": "likelihood", "output_param": "direct"})


def test_calogan_cell_noise_draws_each_cells_hit_independently() -> None:
    """``cell_noise``: z carries one Gaussian per cell after the latent; a cell whose pre-activation is 0 with
    gain softplus(0) = log 2 is hit (ReLU > 0) in half the showers, independently of its neighbours, for one
    and the same latent; with the gains driven to 0 the noise has no effect."""
    torch.manual_seed(0)
    model = CaloGAN(SPECS["tiny2"], {**TINY_HP["calogan"], "cell_noise": True})
    assert model.latent_dim == 8 + 13 and model.draw_noise(5).shape == (5, 21)
    gen = model.generator
    with torch.no_grad():
        for net in gen.layers:
            out = net[-1]
            out.weight.zero_()
            out.bias.zero_()  # pre-activations 0, attention 1/2, gains softplus(0)
    z = torch.randn(4000, 21, generator=torch.Generator().manual_seed(1))
    z[:, :8] = torch.randn(1, 8)  # one latent, many per-cell noises
    c = torch.zeros(4000, 1)
    with torch.no_grad():
        hit = (model.generate(z, c)[:, :9] > 0).float()  # layer 0: no attention, each cell its own ReLU
    assert abs(float(hit.mean()) - 0.5) < 0.02
    corr = torch.corrcoef(hit.T)
    assert float((corr - torch.eye(9)).abs().max()) < 0.08  # cell by cell independent
    with torch.no_grad():
        for net, size in zip(gen.layers, gen.layer_sizes, strict=True):
            net[-1].bias[:size] = 1.0  # pre-activations 1, a cell at 0 would flip on the sign of any noise
            net[-1].bias[-size:] = -60.0  # gains softplus(-60) ~ 1e-26
        z2 = z.clone()
        z2[:, 8:] = torch.randn(4000, 13)
        torch.testing.assert_close(model.generate(z, c), model.generate(z2, c))
    fresh = CaloGAN(SPECS["tiny2"], {**TINY_HP["calogan"], "cell_noise": True})
    _step(fresh, fresh.configure_optimizers(), 1, seed=0)
    _assert_all_grads(fresh.generator, "generator with cell noise")


def test_calogan_gated_cells_start_at_each_cells_hit_rate_and_attention_keeps_the_gates() -> None:
    """``output_activation="gated"`` with ``cell_noise``: started from real showers (output weights 0), every cell
    is hit as often as in them (cell 0 of each layer never, cell 1 in 20 %, the rest always), whatever the
    attention from the previous layer adds; the mean share of a cell when hit follows its mean log share."""
    g = torch.Generator().manual_seed(0)
    n = 4000
    x = 0.1 * torch.rand(n, 13, generator=g) + 0.01
    x[:, 0] = x[:, 9] = 0.0
    rare = torch.rand(n, 2, generator=g) < 0.2
    x[:, 1], x[:, 10] = x[:, 1] * rare[:, 0], x[:, 10] * rare[:, 1]
    x[:, 4] = 0.4  # the layer-0 core: half its energy
    torch.manual_seed(0)
    model = CaloGAN(SPECS["tiny2"], {**TINY_HP["calogan"], "cell_noise": True, "output_activation": "gated",
                                     "energies": "likelihood"})
    model.fit_to_data(x)
    for net in model.generator.layers:
        with torch.no_grad():
            net[-1].weight.zero_()
    with torch.no_grad():
        fake = model.generate(model.draw_noise(n, torch.Generator().manual_seed(1)), torch.zeros(n, 1))
    rate_real, rate_fake = (x > 0).float().mean(0), (fake > 0).float().mean(0)
    assert float(rate_fake[0]) < 0.01 and float(rate_fake[9]) < 0.01
    torch.testing.assert_close(rate_fake, rate_real, atol=0.03, rtol=0)
    share = fake[:, :9] / fake[:, :9].sum(1, keepdim=True)
    assert float(share[:, 4].median()) > 3 * float(share[:, [2, 3, 5, 6]].median())  # the core stays the core
    with pytest.raises(ValueError, match="gated"):
        CaloGAN(SPECS["tiny2"], {**TINY_HP["calogan"], "output_activation": "gated", "output_param": "direct"})


def test_calogan_likelihood_energies_leave_empty_layers_empty() -> None:
    """The energy flow learns dequantised layers (each of a layer's n cells + U(0, noise)): a drawn layer at
    the empty layers' mean n noise / 2, or within four standard deviations of it, is empty; a full layer loses
    exactly that mean."""
    model = CaloGAN(SPECS["tiny2"], {**TINY_HP["calogan"], "energies": "likelihood"})
    assert model.energy_flow is not None
    noise = model.energy_flow.noise
    empty = torch.tensor([9 * noise / 2, 4 * noise / 2])  # tiny2: 9 and 4 cells
    sd = torch.sqrt(torch.tensor([9.0, 4.0]) / 12) * noise
    e_l = torch.stack([empty, empty + 3.9 * sd, empty + 4.1 * sd, torch.tensor([0.3, 0.6])])
    out = model.undequantise(e_l)
    assert (out[:2] == 0).all() and (out[2] > 0).all()
    torch.testing.assert_close(out[3], torch.tensor([0.3, 0.6]) - empty)
    # the dequantised layers of real showers with an empty second layer: at least 99.99 % come out empty
    x = torch.zeros(20000, 13)
    x[:, :9] = 0.1
    g = model.energy_flow.layer_energies(model.energy_flow.dequantise(x))
    assert float((model.undequantise(g)[:, 1] == 0).float().mean()) > 0.9999


@pytest.mark.parametrize("name", ["calogan", "wgan-gp"])
def test_generator_weight_average_draws_the_samples(name: str) -> None:
    """``ema``: after each generator update the average moves to ``d avg + (1 - d) live`` (d warm-started
    as min(ema, (1 + k) / (10 + k)) at generator update k); samples (and the export's sample_from_noise) come
    from the average, training steps from the live generator; the average is saved with the run."""
    spec = "tiny2" if name == "calogan" else "belle2"
    model = _build(name, spec, ema=0.9)
    assert model.generator_average is not None and _build(name, spec).generator_average is None
    opts = model.configure_optimizers()
    n_critic = model.config.n_critic
    for step in range(4 * n_critic):
        before = [p.detach().clone() for p in model.generator_average.parameters()]
        _step(model, opts, step, seed=step)
        if model.is_generator_step(step):
            k = step // n_critic
            d = min(0.9, (1 + k) / (10 + k))
            for a, b, live in zip(model.generator_average.parameters(), before, model.generator.parameters(),
                                  strict=True):
                torch.testing.assert_close(a, d * b + (1 - d) * live.detach())
    _, c = _data(model, 16, 0)
    z = model.draw_noise(16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        live, averaged = model.generate(z, c), model.sample_from_noise(z, c)
        with model.averaged():
            torch.testing.assert_close(averaged, model.generate(z, c))
    assert not torch.allclose(live, averaged)
    assert model.generator is not model.generator_average  # restored after sampling
    assert any(k.startswith("generator_average.") for k in model.state_dict())


def test_calogan_critic_features_are_the_papers_observables() -> None:
    """Leak, layer shares, sparsity and lateral centre/width per layer, on hand-made showers."""
    shapes = ((3, 3), (2, 2))
    x = torch.zeros(2, 13)
    x[0, 4], x[0, 9] = 0.6, 0.39  # one centre cell in layer 0, one corner cell in layer 1: E_tot 0.99
    x[1, :9], x[1, 9:] = 0.05, 0.1375  # uniform layers: E_tot 0.45 + 0.55 = 1.0
    f = calogan_features(x, shapes, energy_cap=1.0, occupancy_eps=1e-9, leak_floor=1e-5)
    assert f.shape == (2, 2 + 6 * 2)
    assert math.isclose(float(f[0, 0]), math.log(0.01), rel_tol=1e-4)  # leak 1 %
    assert math.isclose(float(f[1, 0]), math.log(1e-5), rel_tol=1e-4)  # no leak: the floor
    lay0, lay1 = f[:, 2:8], f[:, 8:14]  # log share, occupancy, row centre, row width, column centre, width
    assert math.isclose(float(lay0[0, 0]), math.log(0.6 / 0.99), rel_tol=1e-4)
    assert math.isclose(float(lay0[0, 1]), 1 / 9, rel_tol=1e-4) and math.isclose(float(lay1[1, 1]), 1.0, rel_tol=1e-4)
    torch.testing.assert_close(lay0[0, 2:], torch.tensor([0.5, 1e-4, 0.5, 1e-4]), atol=2e-4, rtol=0)  # a point
    torch.testing.assert_close(lay1[0, 2:], torch.tensor([0.25, 1e-4, 0.25, 1e-4]), atol=2e-4, rtol=0)
    # uniform 3 rows at (i + 0.5) / 3: centre 1/2, width sqrt(2/27)
    assert math.isclose(float(lay0[1, 3]), math.sqrt(2 / 27), rel_tol=1e-3)


def test_calogan_runs_saved_before_the_paper_design_load_as_they_were() -> None:
    old = {"output_param": "factorised", "x_scale": 1e-3, "n_hidden": 1}
    cfg = CaloGANConfig.from_saved(old)
    assert (cfg.attention, cfg.critic_features, cfg.output_param) == (False, False, "factorised")
    assert CaloGANConfig().output_param == "energies" and CaloGANConfig().critic_features


def _fractions(n: int, seed: int, spec: ModelSpec) -> tuple[Tensor, Tensor]:
    """Showers as fractions of E_inc (>= 0, sums ~0.95, empty corners) whose centre follows the position columns."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, spec.cond_dim, generator=g)
    v = torch.arange(spec.n_voxels, dtype=torch.float32)
    logits = -0.5 * (v - spec.n_voxels / 2 - c[:, 1:2] if spec.cond_dim > 1 else v - spec.n_voxels / 2) ** 2
    x = torch.softmax(logits + 0.2 * torch.randn(n, spec.n_voxels, generator=g), 1) * (0.95 + 0.01 * c[:, :1])
    return torch.where(x < 1e-4, torch.zeros_like(x), x), c


def test_fraction_output_with_conv_critic_and_features() -> None:
    """The Belle II design: energy x shape generator, conv critic/constrainers, observables beside the cells."""
    spec = SPECS["belle2"]
    torch.manual_seed(0)
    model = WGANGP(spec, TINY_HP["wgan-gp"], output="fraction", net="conv", conv_channels=4)
    assert model.net_kind == "conv" and model.n_features == 4  # E_tot, E_max share, E1/E9, E9/E25
    assert not bool(model.scaler_ready)
    opts = model.configure_optimizers()
    for step in range(2):
        x, c = _fractions(32, step, spec)
        logs = model.training_step(x, c, opts, step)
        assert all(math.isfinite(v) for v in logs.values())
    assert bool(model.scaler_ready)
    x, c = _fractions(64, 5, spec)
    h = model.critic_input(x)
    assert h.shape == (64, 2 * spec.n_voxels + 4) and torch.isfinite(h).all()  # log cells, cells, features
    for name in ("generator", "critic", "energy_constrainer", "position_constrainer"):
        _assert_all_grads(getattr(model, name), name)
    model.eval()
    y = model.sample(c, torch.Generator().manual_seed(1))
    assert (y >= 0).all() and (y.sum(1) < 1).all() and (y.sum(1) > 0).all()
    other = WGANGP(spec, TINY_HP["wgan-gp"], output="fraction", net="conv", conv_channels=4)
    other.load_state_dict(model.state_dict())  # the fitted scaler travels with the weights
    assert torch.equal(other.critic_input(x), h) and bool(other.scaler_ready)


def test_shower_features_are_the_evaluation_observables() -> None:
    from fastshower.validate.observables import e1_e9_e25

    spec, geo = SPECS["belle2"], get_geometry("belle2-ecl-5x5")
    x, _ = _fractions(50, 3, spec)
    x = x * torch.rand(50, 25, generator=torch.Generator().manual_seed(4))  # off-centre maxima too
    f = shower_features(x, spec)
    e19, e925 = e1_e9_e25(x.double(), geo)
    assert torch.allclose(f[:, 0], torch.log(x.sum(1) + 1e-6))
    assert torch.allclose(f[:, 1], torch.log(x.max(1).values / x.sum(1)), atol=1e-5)
    assert torch.allclose(f[:, 2].double(), e19, atol=1e-5) and torch.allclose(f[:, 3].double(), e925, atol=1e-5)
    two = shower_features(torch.tensor([[0.1] * 9 + [0.05] * 4]), SPECS["tiny2"])  # layer shares for 2 layers
    assert torch.allclose(two[0, 2:].exp(), torch.tensor([0.9 / 1.1, 0.2 / 1.1]), atol=1e-5)


def test_fraction_output_refuses_other_spaces_and_geometries() -> None:
    spec = SPECS["belle2"]
    model = WGANGP(spec, TINY_HP["wgan-gp"], output="fraction")
    assert model.net_kind == "mlp" and model.n_features == 4
    x, c = _data(model, 16, seed=0)  # a standardised-log batch: negative values
    with pytest.raises(ValueError, match=r"fractions of E_inc \(train with transform"):
        model.training_step(x, c, model.configure_optimizers(), 0)
    with pytest.raises(ValueError, match="one-layer image"):
        WGANGP(SPECS["tiny2"], net="conv")
    with pytest.raises(ValueError, match="not 'layers'"):
        WGANGP(spec, output="fraction", net="layers")
    with pytest.raises(ConfigError, match="log_eps must be > 0"):
        WGANGP(spec, output="fraction", log_eps=0.0)
    # the default is the model of earlier releases: free output, no scaler, MLP critic
    plain = WGANGP(spec, TINY_HP["wgan-gp"])
    assert plain.config.output == "free" and plain.n_features == 0 and "h_shift" not in plain.state_dict()
    assert torch.equal(plain.critic_input(x), x)


def test_one_layer_calogan_and_layerwise_wgan() -> None:
    one = _build("calogan", "belle2")
    assert isinstance(one, CaloGAN) and len(one.generator.layers) == 1
    spec = _spec(Geometry(name="u2", description="", source="t", layers=(_layer(3, 3), _layer(3, 3))), ("log_energy",))
    torch.manual_seed(0)
    model = WGANGP(spec, TINY_HP["wgan-gp"], net="layers")
    assert model.net_kind == "layers"
    opts = model.configure_optimizers()
    _step(model, opts, 1, seed=0)
    _assert_all_grads(model.generator, "layerwise generator")
    _assert_all_grads(model.critic, "layerwise critic")
    with pytest.raises(ValueError, match="equal-sized"):
        WGANGP(SPECS["tiny2"], net="layers")
    bce = _build("calogan", "tiny2", loss="bce", n_critic=1)  # the paper's original GAN loss
    logs = _step(bce, bce.configure_optimizers(), 0, seed=0)
    assert "gp" not in logs and "loss_generator" in logs
    _assert_all_grads(bce.generator, "bce generator")


@pytest.mark.parametrize("name", ["wgan-gp", "calogan"])
def test_bce_loss_is_the_cross_entropy(name: str) -> None:
    """loss="bce": discriminator BCE with real = 1 and fake = 0, non-saturating generator BCE(fake, 1)."""
    model = _build(name, "belle2", loss="bce")
    assert isinstance(model, WGANGP | CaloGAN)
    d_real = torch.tensor([2.0, -0.5, 0.0, 7.5, -3.0])
    d_fake = torch.tensor([-1.0, 0.3, -6.0, 1.5, 0.0])
    d_loss, g_loss = model._adversarial_losses(d_real, d_fake)
    assert d_loss is not None
    want_d = (F.binary_cross_entropy_with_logits(torch.cat([d_real, d_fake]),
                                                 torch.cat([torch.ones(5), torch.zeros(5)])) * 2)
    assert torch.allclose(d_loss, want_d, atol=1e-6)
    assert torch.allclose(g_loss, F.binary_cross_entropy_with_logits(d_fake, torch.ones(5)), atol=1e-6)
    # by hand: -log sigmoid(r) - log(1 - sigmoid(f)), and the non-saturating -log sigmoid(f)
    p_r, p_f = torch.sigmoid(d_real), torch.sigmoid(d_fake)
    assert torch.allclose(d_loss, -(torch.log(p_r).mean() + torch.log1p(-p_f).mean()), atol=1e-5)
    assert torch.allclose(g_loss, -torch.log(p_f).mean(), atol=1e-6)
    wgan = _build(name, "belle2")
    w_d, w_g = wgan._adversarial_losses(d_real, d_fake)
    assert w_d is not None and torch.allclose(w_d, d_fake.mean() - d_real.mean())
    assert torch.allclose(w_g, -d_fake.mean())


@pytest.mark.parametrize("loss", ["wgan-gp", "bce"])
@pytest.mark.parametrize("name", ["wgan-gp", "calogan"])
def test_both_losses_train_without_nan(name: str, loss: str) -> None:
    model = _build(name, "belle2", loss=loss, n_critic=1)
    opts = model.configure_optimizers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(3):
        logs = _step(model, opts, step, seed=step)
        assert all(math.isfinite(v) for v in logs.values()), logs
        assert "loss_generator" in logs and ("gp" in logs) == (loss == "wgan-gp")
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    for net in ("generator", "critic"):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(net + ".")), net
    x, c = _data(model, 16, seed=9)
    assert all(torch.isfinite(v).all() for v in model.loss(x, c).values())
    assert torch.isfinite(model.sample(c)).all()


def test_hparam_and_size_errors() -> None:
    with pytest.raises(ConfigError, match=r"model 'wgan-gp': unknown key\(s\) \['not_a_knob'\]; known: .*n_critic"):
        _build("wgan-gp", "tiny2", not_a_knob=1)
    with pytest.raises(ConfigError, match="loss must be one of 'wgan-gp', 'bce'"):
        _build("calogan", "tiny2", loss="hinge")
    with pytest.raises(ConfigError, match="n_critic must be >= 1"):
        _build("wgan-gp", "tiny2", n_critic=0)
    with pytest.raises(ConfigError, match="betas must be two numbers"):
        _build("wgan-gp", "tiny2", betas=[0.5])
    with pytest.raises(ValueError, match="supports up to 1000 voxels"):
        CaloFlow(_spec(get_geometry("par04-ds2"), ("log_energy",)))
    grouped = ModelSpec(25, (25,), ((5, 5),), 3, ("log_energy", "position"), cond_widths=(1, 2))
    assert position_columns(grouped) == [1, 2]
    assert position_columns(ModelSpec(25, (25,), ((5, 5),), 3, ("log_energy", "position"))) == [1, 2]
    assert position_columns(SPECS["tiny2"]) == []


def test_adversarial_configs_share_the_schedule() -> None:
    for cls in (WGANConfig, CaloGANConfig):
        assert issubclass(cls, AdversarialConfig)
        cfg = cls()
        assert (cfg.betas, cfg.gp_weight, cfg.drift, cfg.loss) == ((0.5, 0.9), 10.0, 1e-3, "wgan-gp")
    assert (WGANConfig().lr, WGANConfig().n_critic) == (1e-4, 5)
    assert (CaloGANConfig().lr, CaloGANConfig().n_critic) == (3e-4, 2)  # measured faster on calogan-3layer
    assert (WGANConfig().depth, CaloGANConfig().depth) == (3, 2)


def test_configs_of_the_previous_release_still_load() -> None:
    """The "hparams" of a run folder written before the configs were typed: old names and values."""
    old_wgan = {"latent_dim": 8, "hidden": 32, "n_hidden": 1, "arch": "dense", "dense_max_voxels": 2000,
                "layer_code": 16, "betas": [0.5, 0.9], "grad_clip": None}
    new_wgan = {"latent_dim": 8, "hidden": 32, "depth": 1, "net": "mlp", "mlp_max_voxels": 2000, "layer_dim": 16}
    assert WGANConfig.from_dict(old_wgan) == WGANConfig.from_dict(new_wgan)
    assert WGANConfig.from_dict({"arch": "layerwise"}).net == "layers"
    old_calogan = {"n_hidden": 1, "layer_features": 8, "gan_loss": "bce"}
    assert CaloGANConfig.from_dict(old_calogan) == CaloGANConfig(depth=1, layer_dim=8, loss="bce")
    assert WGANConfig.from_saved({"gan_loss": "wgan-gp"}).loss == "wgan-gp"
    model = _build("wgan-gp", "tiny2")
    old = get_model_class("wgan-gp")(SPECS["tiny2"], {**old_wgan, "constrainer_hidden": 16})
    assert old.config == model.config.replace(depth=1, layer_dim=16, net="mlp", n_critic=5, constrainer_warmup=1000)
    assert old.net_kind == "mlp"


def test_flow_takes_a_dict_of_its_keys() -> None:
    spec = SPECS["tiny2"]
    flow = CaloFlow(spec, with_stage2=False, **TINY_HP["flow"])
    assert flow.flow2 is None and flow.config == FlowConfig.from_dict(TINY_HP["flow"])
    assert CaloFlow(spec, FlowConfig(stage2_passes=None), max_voxels=20).config.stage2_passes is None
    with pytest.raises(ConfigError, match="stage2_passes must be int or NoneType"):
        CaloFlow(spec, stage2_passes="two")


def test_flow_stage1_round_trip_keeps_the_deep_tail_in_float32() -> None:
    """Layer fractions falling by 0.63 per layer over 45 layers (the last at 1.5e-9 of the total, as a deep
    par04-ds2 layer) survive stage1_features -> stage1_inverse in float32 to 1e-4 relative in every layer:
    the running remainder is summed from the back and carried as a product, never as total minus a cumsum
    (which cancelled to float32 noise there, so that torch and ONNX drew different showers from one noise)."""
    spec = ModelSpec(n_voxels=90, layer_sizes=(2,) * 45, layer_shapes=((1, 2),) * 45, cond_dim=1,
                     cond_names=("log_energy",))
    flow = CaloFlow(spec, TINY_HP["flow"], with_stage2=False)
    e = (0.63 ** torch.arange(45.0)).repeat(3, 1) * torch.tensor([[0.3], [0.9], [1.0]])
    back = flow.stage1_inverse(flow.stage1_features(e))
    assert float(e[0, -1] / e[0].sum()) < 2e-9
    torch.testing.assert_close(back, e, rtol=1e-4, atol=0.0)
