"""layer-fm: cost linear in the number of cells, layer energies exactly stage 1's, tokens per layer group."""

from __future__ import annotations

import pytest
import torch

from fastshower.geometry import get_geometry
from fastshower.models import build_model
from fastshower.models.base import ModelSpec, model_cost
from fastshower.models.layer_fm import LayerFlowMatching

SMALL = {"stage1_hidden": 16, "stage1_transforms": 2, "hidden": 32, "depth": 2, "heads": 2, "emb_dim": 16, "steps": 2}


def _spec(n_layers: int, cells: int) -> ModelSpec:
    return ModelSpec(n_voxels=n_layers * cells, layer_sizes=(cells,) * n_layers,
                     layer_shapes=((1, cells),) * n_layers, cond_dim=1)


def test_cost_grows_at_most_linearly_with_cells() -> None:
    """16x more cells per layer: parameters and FLOPs per shower grow by less than 16x (the shared per-layer
    maps grow, the transformer does not)."""
    small, large = (model_cost(build_model("layer-fm", _spec(12, c), SMALL)) for c in (16, 256))
    for key in ("parameters", "flops_per_shower_loss", "flops_per_shower_sample"):
        assert small[key] < large[key] < 16 * small[key], key


def test_real_detectors_stay_small() -> None:
    """On the CaloChallenge dataset-3 geometry (40500 cells) the default model stays a few million parameters
    (a dense net over the voxels would have V x hidden = 5 M in one layer)."""
    cost = model_cost(build_model("layer-fm", ModelSpec.from_geometry(get_geometry("par04-ds3"))))
    assert cost["parameters"] < 3e6
    assert cost["flops_per_shower_loss"] < 1e8


def test_layer_energies_are_stage_one_s() -> None:
    """The shape ODE's output is renormalised per layer: for any noise the sampled layer energies are the
    stage-1 flow's, whatever the (here untrained) velocity net returns."""
    torch.manual_seed(0)
    model = build_model("layer-fm", _spec(6, 20), SMALL)
    assert isinstance(model, LayerFlowMatching)
    model.eval()
    c = torch.linspace(-1, 1, 64).reshape(-1, 1)
    z = model.draw_noise(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        g1, g2 = model.sample_latents(z, c)
        e_stage1 = model.stage1_inverse(model.scale1.inverse(g1))
        x = model.assemble(g1, g2)
    e = model.layer_energies(x)
    big = e_stage1 > 1e-6
    assert bool(big.any())
    assert torch.allclose(e[big], e_stage1[big], rtol=1e-4)
    assert (x >= 0).all()


def test_tokens_per_layer_group() -> None:
    """45 equal layers (par04) are grouped three to a token; layers of different shapes get one token each."""
    par04 = build_model("layer-fm", ModelSpec.from_geometry(get_geometry("par04-ds2")), SMALL)
    calogan = build_model("layer-fm", ModelSpec.from_geometry(get_geometry("calogan-3layer")), SMALL)
    assert isinstance(par04, LayerFlowMatching) and isinstance(calogan, LayerFlowMatching)
    assert par04.velocity.net.n_tokens == 15 and par04.velocity.net.shared
    assert calogan.velocity.net.n_tokens == 3 and not calogan.velocity.net.shared
    with pytest.raises(ValueError, match="divide"):
        build_model("layer-fm", ModelSpec.from_geometry(get_geometry("par04-ds2")), {**SMALL, "group": 4})
