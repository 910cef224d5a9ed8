"""Every registered model against the protocol of fastshower.models.base.

Models written later (GANs, normalising flows) are covered automatically once they
register. Adversarial models (several optimizers, or a class attribute ``adversarial =
True``) are exempt from the "loss decreases" check (a critic's loss need not fall).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from fastshower.errors import ConfigError, FastshowerError
from fastshower.geometry import get_geometry
from fastshower.models import (
    DEFAULT_MODEL,
    ModelConfig,
    ModelSpec,
    UnknownModelError,
    available_models,
    build_model,
    get_config_class,
    get_model_class,
    register,
)
from fastshower.models.base import ShowerModel
from fastshower.models.flow_matching import FlowMatching, FlowMatchingConfig, odeint
from fastshower.models.vae import VAEConfig
from toy_showers import tiny_geometry

MODELS = available_models()
ALL_MODELS = available_models(include_derived=True)


def _specs() -> dict[str, ModelSpec]:
    return {
        "tiny": ModelSpec.from_geometry(tiny_geometry(), ("log_energy", "position"), (1, 2)),
        "belle": ModelSpec.from_geometry(get_geometry("belle2-ecl-5x5")),
    }


SPECS = _specs()


def _batch(spec: ModelSpec, n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, spec.cond_dim, generator=g)
    # a learnable dependence of x on c, so that training has something to lower
    x = torch.randn(n, spec.n_voxels, generator=g) * 0.3 + c[:, :1]
    return x, c


def test_registry() -> None:
    assert MODELS[0] == DEFAULT_MODEL
    assert {"flow-matching", "vae"} <= set(MODELS)
    assert get_model_class("flow-matching") is FlowMatching
    with pytest.raises(UnknownModelError, match="unknown model 'nope'; available: flow-matching"):
        get_model_class("nope")
    assert issubclass(UnknownModelError, FastshowerError) and issubclass(UnknownModelError, ValueError)
    assert get_config_class("flow-matching") is FlowMatchingConfig
    with pytest.raises(UnknownModelError):
        get_config_class("nope")

    class Clash(ShowerModel):
        name = "flow-matching"

    with pytest.raises(ValueError, match="taken"):
        register(Clash)


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_determinism(name: str, spec_name: str) -> None:
    spec = SPECS[spec_name]
    torch.manual_seed(0)
    model = build_model(name, spec)
    x, c = _batch(spec)
    losses = model.loss(x, c)
    assert "loss" in losses and losses["loss"].ndim == 0 and torch.isfinite(losses["loss"])
    model.eval()
    s1 = model.sample(c, torch.Generator().manual_seed(7))
    s2 = model.sample(c, torch.Generator().manual_seed(7))
    s3 = model.sample(c, torch.Generator().manual_seed(8))
    assert s1.shape == (32, spec.n_voxels) and torch.isfinite(s1).all()
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
    assert not torch.equal(s1, s3)


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_is_trained(name: str) -> None:
    spec = SPECS["tiny"]
    torch.manual_seed(0)
    model = build_model(name, spec)
    before = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    assert before, "model has no trainable parameters"
    opts = model.configure_optimizers()
    model.train()
    for step in range(8):  # several steps: adversarial schedules may update the generator every k-th step
        x, c = _batch(spec, seed=step)
        model.training_step(x, c, opts, step)
    frozen = [k for k, p in model.named_parameters() if p.requires_grad and torch.equal(p.detach(), before[k])]
    # a critic's scalar output bias cancels in Wasserstein losses (E[D(real)] - E[D(fake)]): zero gradient by design
    frozen = [k for k in frozen if not (k.endswith("bias") and before[k].numel() == 1)]
    assert not frozen, f"parameters never updated (no gradient reaches them): {frozen}"


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name: str) -> None:
    spec = SPECS["tiny"]
    torch.manual_seed(0)
    model = build_model(name, spec)
    opts = model.configure_optimizers()
    for step in range(3):
        model.training_step(*_batch(spec, seed=step), opts, step)
    clone = build_model(name, ModelSpec.from_dict(copy.deepcopy(spec.to_dict())), model.config)
    assert clone.config == model.config
    assert build_model(name, spec, json.loads(json.dumps(model.hparams))).config == model.config
    clone.load_state_dict(model.state_dict())
    model.eval()
    clone.eval()
    c = _batch(spec)[1]
    torch.testing.assert_close(model.sample(c, torch.Generator().manual_seed(1)),
                               clone.sample(c, torch.Generator().manual_seed(1)), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_training_lowers_loss(name: str) -> None:
    spec = SPECS["belle"]
    torch.manual_seed(0)
    model = build_model(name, spec)
    # several optimizers = an adversarial game (GAN): its losses need not fall monotonically
    if getattr(type(model), "adversarial", len(model.configure_optimizers()) > 1):
        pytest.skip("adversarial losses need not decrease")
    x, c = _batch(spec, n=256)

    def held_out_loss() -> float:
        torch.manual_seed(123)  # same noise draws before and after training
        with torch.no_grad():
            return float(model.loss(x, c)["loss"])

    l0 = held_out_loss()
    opts = model.configure_optimizers()
    model.train()
    for step in range(60):
        model.training_step(*_batch(spec, n=128, seed=100 + step), opts, step)
    assert held_out_loss() < 0.9 * l0


def test_flow_matching_options() -> None:
    spec = SPECS["tiny"]
    torch.manual_seed(0)
    model = FlowMatching(spec, hidden=32, depth=1, steps=4).eval()
    c = _batch(spec, 8)[1]
    base = model.sample(c, torch.Generator().manual_seed(0))
    more = model.sample(c, torch.Generator().manual_seed(0), steps=9)
    assert not torch.equal(base, more)  # the sampling step count is honoured
    for method in ("euler", "midpoint", "heun"):
        assert torch.isfinite(model.sample(c, torch.Generator().manual_seed(0), method=method)).all()
    with pytest.raises(ValueError, match="unknown ODE method"):
        model.sample(c, method="rk9")
    with pytest.raises(ValueError, match="t_dist"):
        FlowMatching(spec, t_dist="beta")
    with pytest.raises(ConfigError, match="model 'flow-matching': method must be one of 'euler', 'midpoint', 'heun'"):
        FlowMatching(spec, method="rk9")


def test_ode_solvers_integrate_exactly_linear_field() -> None:
    x0 = torch.zeros(3, 2)
    for method in ("euler", "midpoint", "heun"):
        x1 = odeint(lambda x, t: torch.ones_like(x) * 2.0, x0, 5, method)
        torch.testing.assert_close(x1, torch.full((3, 2), 2.0))
    # dx/dt = t: exact x(1) = 1/2; midpoint and Heun are exact for a linear-in-t field
    for method in ("midpoint", "heun"):
        x1 = odeint(lambda x, t: t.expand_as(x), x0, 3, method)
        torch.testing.assert_close(x1, torch.full((3, 2), 0.5))


def test_per_layer_network_for_large_detectors() -> None:
    spec = ModelSpec.from_geometry(get_geometry("par04-ds2"))  # 6480 voxels: net="auto" picks per-layer tokens
    torch.manual_seed(0)
    model = FlowMatching(spec, layer_dim=16, depth=1, heads=2, steps=2)
    assert type(model.net.body).__name__ == "LayerTokenNet"
    x, c = _batch(spec, n=4)
    model.loss(x, c)["loss"].backward()
    assert all(p.grad is not None for p in model.net.parameters())
    assert model.eval().sample(c).shape == (4, 6480)


# --- typed configs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_config_class_and_defaults(name: str) -> None:
    cls = get_model_class(name)
    assert issubclass(cls.config_class, ModelConfig) and get_config_class(name) is cls.config_class
    default = cls.default_config()
    assert isinstance(default, cls.config_class) and default == cls.config_class.from_dict({})
    assert list(default.to_dict()) == cls.config_class.keys()
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_unknown_key_lists_the_known_ones(name: str) -> None:
    keys = get_config_class(name).keys()
    with pytest.raises(ConfigError) as info:
        build_model(name, SPECS["tiny"], {"widht": 3})
    msg = str(info.value)
    assert f"model {name!r}" in msg and "['widht']" in msg
    assert f"known: {', '.join(keys)}" in msg


@pytest.mark.parametrize("name", ALL_MODELS)
def test_config_round_trips_through_json(name: str) -> None:
    cls = get_config_class(name)
    cfg = cls().replace(lr=3e-4)
    if "stage1" in cls.keys():  # a nested dict: the flow teacher's config
        cfg = cfg.replace(stage1=get_config_class("flow")(stage1_hidden=16).to_dict())
    back = cls.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and type(back) is cls
    if "betas" in cls.keys():  # a tuple field: a list in JSON, a tuple again when read back
        assert isinstance(back.betas, tuple) and back.betas == (0.5, 0.9)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name,old,new", [
    ("vae", {"latent": 8}, {"latent_dim": 8}),
    ("vae", {"mmd": 0.5}, {"mmd_weight": 0.5}),
    ("wgan-gp", {"n_hidden": 1}, {"depth": 1}),
    ("wgan-gp", {"arch": "dense", "layer_code": 8, "dense_max_voxels": 10}, {"net": "mlp", "layer_dim": 8,
                                                                             "mlp_max_voxels": 10}),
    ("calogan", {"n_hidden": 1, "layer_features": 8}, {"depth": 1, "layer_dim": 8}),
    ("flow-matching", {"token_dim": 16}, {"layer_dim": 16}),
])
def test_old_names_build_the_same_config(name: str, old: dict, new: dict) -> None:
    spec = SPECS["tiny"]
    assert build_model(name, spec, old).config == build_model(name, spec, new).config
    assert get_config_class(name).from_dict(old) == get_config_class(name).from_dict(new)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_wrong_typed_value_names_the_key(name: str) -> None:
    key = "hidden" if "hidden" in get_config_class(name).keys() else "stage2_hidden"
    with pytest.raises(ConfigError, match=f"model {name!r}: {key} must be int, got 'abc'"):
        build_model(name, SPECS["tiny"], {key: "abc"})
    with pytest.raises(ConfigError, match="lr must be float"):
        build_model(name, SPECS["tiny"], {"lr": True})


def test_config_object_and_overrides() -> None:
    spec = SPECS["tiny"]
    cfg = VAEConfig(latent_dim=4, hidden=16, depth=1)
    model = get_model_class("vae")(spec, cfg, beta=0.5)
    assert model.config == cfg.replace(beta=0.5)
    assert model.hparams == model.config.to_dict() and model.hparams["latent_dim"] == 4
    assert model.noise_dim() == 4 + spec.n_voxels
    with pytest.raises(ConfigError, match="model 'flow-matching' takes a FlowMatchingConfig, got a VAEConfig"):
        build_model("flow-matching", spec, cfg)
