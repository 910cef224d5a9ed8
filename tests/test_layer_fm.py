"""layer-fm: cost linear in the number of cells, layer energies exactly stage 1's, tokens per layer group."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fastshower.geometry import get_geometry
from fastshower.models import build_model
from fastshower.models.base import ModelSpec, model_cost
from fastshower.models.layer_fm import (
    EnergyScaler,
    LayerFlowMatching,
    LayerFMConfig,
    align_cells,
    angular_basis,
    dipole_angle,
    random_turn,
    stencil,
    turn_cells,
)
from fastshower.models.nets import LayerTransformer
from fastshower.runs import load_run
from fastshower.training import TrainingError, calibrate_run, train
from fastshower.validate.synthetic import write_synthetic

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
    """On the CaloChallenge dataset-3 geometry (40500 cells) the whole default model is smaller than the first
    layer alone of a dense net over the voxels (V x 128 = 5.2 M parameters) and a training step stays about a
    CPU-second."""
    cost = model_cost(build_model("layer-fm", ModelSpec.from_geometry(get_geometry("par04-ds3"))))
    assert cost["parameters"] < 40500 * 128
    # 5e10 FLOPs per step of 256 showers: about a second on one core
    assert cost["flops_per_shower_loss"] < 2e8


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
        x = model.assemble(g1, g2, c)
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


@pytest.mark.parametrize(("head_dim", "full_rank"), [(0, False), (4, True)])
def test_velocity_sees_every_voxel(head_dim: int, full_rank: bool) -> None:
    """Two layers of 40 voxels through tokens 8 wide: with a linear out map the Jacobian d(out)/d(in) has
    rank at most 2 x 8 = 16 of 80 (most directions of the input never reach the output); the voxel head
    passes each voxel's own value through, and the Jacobian is of full rank."""
    torch.manual_seed(0)
    net = LayerTransformer((40, 40), 1, emb_dim=4, dim=8, depth=1, heads=2, head_dim=head_dim)
    f, emb = torch.randn(1, 2, 1), torch.randn(1, 4)
    jac = torch.autograd.functional.jacobian(lambda x: net(x, f, emb), torch.randn(1, 80)).reshape(80, 80)
    rank = int(torch.linalg.matrix_rank(jac))
    assert (rank == 80) if full_rank else (rank <= 16)


def test_runs_saved_before_the_voxel_head_load_without_it() -> None:
    """A saved config written before ``head_dim`` existed had the linear out map; a new config gets the head."""
    saved = {k: v for k, v in LayerFMConfig().to_dict().items() if k != "head_dim"}
    assert LayerFMConfig.from_saved(saved).head_dim == 0
    assert LayerFMConfig.from_dict(saved).head_dim == LayerFMConfig().head_dim > 0


def test_sampling_in_row_blocks_equals_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large batches are sampled in row blocks to bound the voxel head's memory; the showers are the same."""
    torch.manual_seed(0)
    model = build_model("layer-fm", _spec(4, 10), SMALL).eval()
    c = torch.linspace(-1, 1, 20).reshape(-1, 1)
    z = model.draw_noise(20, torch.Generator().manual_seed(2))
    whole = model.sample_from_noise(z, c)
    monkeypatch.setattr(LayerFlowMatching, "block_elements", 3 * 40 * model.config.head_dim)  # 3 rows a block
    assert torch.allclose(model.sample_from_noise(z, c), whole, atol=1e-6)


def _polar_spec(n_layers: int = 3, n_alpha: int = 4, n_r: int = 3) -> ModelSpec:
    cells = n_alpha * n_r
    return ModelSpec(n_voxels=n_layers * cells, layer_sizes=(cells,) * n_layers,
                     layer_shapes=((n_alpha, n_r),) * n_layers, cond_dim=1, extra={"readout": "polar"})


def test_ring_shares_chosen_for_polar_readouts_only() -> None:
    """auto: ring shares on par04 (polar, 16 angular bins x 9 rings), voxel shares on the cartesian ILD ECAL;
    asking for rings on a cartesian readout is refused; runs saved before the option keep voxel shares."""
    par04 = build_model("layer-fm", ModelSpec.from_geometry(get_geometry("par04-ds2")), SMALL)
    ild = build_model("layer-fm", ModelSpec.from_geometry(get_geometry("ild-siw-30")), SMALL)
    assert isinstance(par04, LayerFlowMatching) and isinstance(ild, LayerFlowMatching)
    assert par04.rings == (16, 9) and ild.rings is None
    assert par04.noise_dim() == 45 + 6480 + 45 * 9  # one latent per layer, cell and ring
    with pytest.raises(ValueError, match="polar"):
        build_model("layer-fm", ModelSpec.from_geometry(get_geometry("ild-siw-30")), {**SMALL, "shares": "ring"})
    saved = {k: v for k, v in LayerFMConfig().to_dict().items() if k != "shares"}
    assert LayerFMConfig.from_saved(saved).shares == "voxel"


@pytest.mark.parametrize("cells", ["share", "energy"])
def test_ring_shares_invert_exactly(cells: str) -> None:
    """Showers -> (ring shares, cells: their share of the ring or their log energy) -> showers returns every
    cell above the logit regulariser's resolution (alpha = 1e-6 of its ring) to 1e-4 relative."""
    torch.manual_seed(0)
    model = build_model("layer-fm", _polar_spec(), {**SMALL, "cells": cells})
    assert isinstance(model, LayerFlowMatching)
    x = torch.rand(32, 36) * (torch.rand(32, 36) < 0.6) + 1e-9 * torch.rand(32, 36)
    e = model.layer_energies(x)
    back = model.stage2_inverse(model.stage2_features(x, e), e)
    big = x > 1e-3
    assert torch.allclose(back[big], x[big], rtol=1e-4)
    assert torch.allclose(model.layer_energies(back), e, rtol=1e-5)


@pytest.mark.parametrize("cells", ["share", "energy"])
def test_cell_noise_cannot_move_energy_between_rings(cells: str) -> None:
    """The radial profile is the ring shares alone: any change of the cells' latents leaves every ring's
    energy as it was (with voxel shares a single noisy cell takes energy from the whole layer)."""
    torch.manual_seed(0)
    model = build_model("layer-fm", _polar_spec(), {**SMALL, "cells": cells})
    assert isinstance(model, LayerFlowMatching)
    y, e = torch.randn(8, 3 * 3 * 5), torch.rand(8, 3)
    y2 = y.reshape(8, 3, 15).clone()
    y2[:, :, 3:] += 3 * torch.randn(8, 3, 12)  # cells only; the first 3 numbers of a layer are its rings
    rings = [model.stage2_inverse(v.reshape(8, -1), e).reshape(8, 3, 4, 3).sum(2) for v in (y, y2)]
    assert torch.allclose(rings[0], rings[1], rtol=1e-5)
    assert torch.allclose(rings[0].sum(2), e, rtol=1e-5)


def test_stage2_hits_and_empties_of_rings() -> None:
    """In the W = V + L x R stage-2 space a ring is hit when any of its cells is, and emptying every cell of a
    ring empties the ring, whose energy then goes to the layer's other rings; a mask that would empty every
    ring of a layer empties nothing there: each layer keeps its energy."""
    torch.manual_seed(0)
    model = build_model("layer-fm", _polar_spec(), SMALL)
    assert isinstance(model, LayerFlowMatching) and model.stage2_width == 45
    hit = torch.zeros(2, 36, dtype=torch.bool)
    hit[0, 2 * 3 + 1] = True  # layer 0, angular bin 2, ring 1
    got = model.stage2_hits(hit).reshape(2, 3, 15)
    assert got[0, 0, :3].tolist() == [False, True, False] and int(got.sum()) == 2 and bool(got[0, 0, 3 + 7])
    y, e = torch.randn(2, 45), torch.tensor([[1.0, 0.5, 0.25], [0.3, 0.2, 0.1]])
    empty = torch.zeros(2, 3, 15)
    empty[:, 1, 3:].reshape(2, 4, 3)[:, :, 2] = 1.0  # layer 1: every cell of ring 2
    empty[:, 2, 3 + 4] = 1.0  # layer 2: one cell of ring 1 (angular bin 1)
    empty[1, 0, :3] = 1.0  # shower 1, layer 0: every ring
    out = model.stage2_empty(empty.reshape(2, 45)).reshape(2, 3, 15)
    assert out[:, 1, :3].tolist() == [[0.0, 0.0, 1.0]] * 2 and float(out[1, 0].abs().sum()) == 0.0
    assert float(out.sum() - empty.sum()) == 2.0 - 3.0
    x = model.stage2_inverse(y - 1e4 * out.reshape(2, 45), e)
    assert torch.allclose(model.layer_energies(x), e, rtol=1e-5)
    assert float(x.reshape(2, 3, 4, 3)[:, 1, :, 2].abs().sum()) == 0.0 and float(x[:, 2 * 12 + 4].abs().sum()) == 0.0


def test_energy_scaler_standardises_each_energy() -> None:
    """Features whose mean and spread change with energy come out with mean ~0 and std ~1 at every knot (one
    scaler for all energies would leave the high-energy ones at std 0.1), and the inverse is exact."""
    torch.manual_seed(0)
    c0 = torch.rand(4000) * 4 - 2
    f = (0.3 * c0).unsqueeze(1) + torch.randn(4000, 2) * torch.where(c0 > 0, 0.3, 3.0).unsqueeze(1)
    scaler = EnergyScaler(2, knots=9, min_std=0.01)
    scaler.fit_once(f, c0)
    g = scaler(f, c0)
    for lo, hi in ((-2.0, -1.5), (1.5, 2.0)):
        sel = (c0 > lo) & (c0 < hi)
        assert abs(float(g[sel].mean())) < 0.2 and 0.7 < float(g[sel].std()) < 1.3, (lo, hi)
    assert float(f[c0 > 1.5].std() / f.std()) < 0.2  # what one global std would have had to resolve
    assert torch.allclose(scaler.inverse(g, c0), f, atol=1e-4)


def test_cell_energy_keeps_a_hit_where_it_is_whatever_its_ring_holds() -> None:
    """cells="energy": a single-particle hit (7 MeV of 50 GeV) is the same stage-2 number whether its ring holds
    it alone or 20x more (as a share of the ring it moves by log 20); empty cells come back empty."""
    torch.manual_seed(0)
    by = {k: build_model("layer-fm", _polar_spec(), {**SMALL, "cells": k}) for k in ("share", "energy")}
    x = torch.zeros(2, 3, 4, 3)
    x[:, :, 0, 0] = 0.2  # the core ring
    x[:, 1, 1, 2] = 1.4e-4  # the hit: 7 MeV / 50 GeV in the outer ring of layer 1
    x[1, 1, 3, 2] = 20 * 1.4e-4  # shower 2: the outer ring holds 20x more
    x = x.reshape(2, -1)
    hit = 3 + 1 * 3 + 2  # layer 1's numbers are 3 rings then the 4 x 3 cells (angle-major)
    for cells, model in by.items():
        assert isinstance(model, LayerFlowMatching)
        e = model.layer_energies(x)
        f = model.stage2_features(x, e).reshape(2, 3, 15)[:, 1, hit]
        moved = float(f[1] - f[0])
        assert (abs(moved) < 1e-4) if cells == "energy" else (abs(moved) > 2.5), (cells, moved)
        back = model.stage2_inverse(model.stage2_features(x, e), e)
        assert torch.equal(back == 0, x == 0), cells


def test_cell_map_matches_the_hit_rate_and_spectrum_and_keeps_ring_energies() -> None:
    """After calibrate on showers whose outer cells are hit 30 % of the time with energies uniform in (0, 1) x
    E_inc (the core ring: always), the model at fresh noise hits 30 % +- 5 % of the outer cells (uncalibrated:
    nearly all) with the data's median and 99.5th-percentile hit energy, every ring holds what its share gave
    it and keeps at least one hit, and a checkpoint saved before the map existed loads with the identity map."""
    torch.manual_seed(0)
    model = build_model("layer-fm", _polar_spec(n_layers=3, n_alpha=8, n_r=3), {**SMALL, "cells": "energy"})
    assert isinstance(model, LayerFlowMatching)
    n = 1200
    x = torch.rand(n, 3, 8, 3) * (torch.rand(n, 3, 8, 3) < 0.3)
    x[:, :, :, 0] = torch.rand(n, 3, 8) + 0.5
    x = x.reshape(n, -1)
    c = torch.rand(n, 1) * 3 - 1.5
    model.eval()
    old_state = {k: v.clone() for k, v in model.state_dict().items() if k != "cell_map"}
    stats = model.calibrate(x, c, torch.Generator().manual_seed(1))
    assert stats["hit_fraction_model_before"] > 0.9
    with torch.no_grad():
        g1, g2 = model.sample_latents(model.draw_noise(n, torch.Generator().manual_seed(2)), c)
        mapped = model._cells(model.unstandardise2(g2, c))[..., 1:]
    hit = mapped >= math.log(11 * model.noise)
    assert abs(float(hit.float().mean()) - 0.3) < 0.05
    data = x.reshape(n, 3, 8, 3)[..., 1:]
    assert abs(float(mapped[hit].median()) - float(torch.log(data[data > 0]).median())) < 0.15
    # the top of the spectrum too: the untrained ODE's hottest cells sit 0.47 above the data's 99.5th percentile
    # when the map's last level is at the 96th (slope 1 beyond it), within 0.05 with the cell map's tail levels
    tail = float(mapped[hit].quantile(0.995)) - float(torch.log(data[data > 0]).quantile(0.995))
    assert abs(tail) < 0.05
    with torch.no_grad():
        out = model.assemble(g1, g2, c).reshape(n, 3, 8, 3)
        e = model.stage1_inverse(model.scale1.inverse(g1))
        unmapped = model.stage2_inverse(model.scale2.inverse(g2, c[:, 0]), e)
    assert bool(((out > 0).sum(2) >= 1).all())  # every ring keeps at least its hottest cell
    assert torch.allclose(out.sum(2), unmapped.reshape(n, 3, 8, 3).sum(2), rtol=1e-4, atol=1e-7)
    fresh = build_model("layer-fm", _polar_spec(n_layers=3, n_alpha=8, n_r=3), {**SMALL, "cells": "energy"})
    fresh.load_state_dict(old_state)
    assert isinstance(fresh, LayerFlowMatching)
    with torch.no_grad():
        assert torch.allclose(fresh.unstandardise2(g2, c), model.scale2.inverse(g2, c[:, 0]), atol=1e-4)


def test_training_ends_calibrated_and_old_runs_can_be_calibrated(tmp_path: Path) -> None:
    """A par04-ds2 layer-fm run with cells="energy" is calibrated at the end of training (meta.json: the data's
    and the model's hit fractions, the model's now closer to the data's); calibrate_run repeats it on a finished
    run and saves the map in its checkpoint; a cells="share" run has nothing to calibrate and says so."""
    import numpy as np

    data = write_synthetic(tmp_path / "ds2.h5", get_geometry("par04-ds2"), np.resize([2e3, 8e3, 3e4], 240), seed=1)
    run = train(data, "layer-fm", tmp_path / "run", steps=2, batch_size=32, progress=False,
                config={"hparams": {**SMALL, "hidden": 16, "depth": 1, "head_dim": 2, "cells": "energy"}})
    cal = json.loads((run / "meta.json").read_text())["calibration"]
    assert set(cal) == {"hit_fraction_data", "hit_fraction_model_before", "hit_fraction_model_after"}
    def gap(stats: dict[str, float], when: str) -> float:
        return abs(stats[f"hit_fraction_model_{when}"] - stats["hit_fraction_data"])

    assert gap(cal, "after") < gap(cal, "before")
    stats = calibrate_run(run, n=200)
    model = load_run(run).model
    assert isinstance(model, LayerFlowMatching)
    assert not torch.equal(model.cell_map[:, :, :, 0], model.cell_map[:, :, :, 1])
    assert gap(stats, "after") < gap(stats, "before")
    plain = train(data, "layer-fm", tmp_path / "plain", steps=1, batch_size=32, progress=False,
                  config={"hparams": {**SMALL, "hidden": 16, "depth": 1, "head_dim": 2, "cells": "share"}})
    assert "calibration" not in json.loads((plain / "meta.json").read_text())
    with pytest.raises(TrainingError, match="no post-training calibration"):
        calibrate_run(plain)


@pytest.mark.parametrize("cells", ["share", "energy"])
def test_hit_counts_invert_exactly(cells: str) -> None:
    """occupancy="count": showers -> (ring shares, ring hit counts, cells) -> showers gives back exactly the hit
    cells (the n largest of each ring are its n hits) and their energies."""
    torch.manual_seed(0)
    model = build_model("layer-fm", _polar_spec(), {**SMALL, "cells": cells, "occupancy": "count"})
    assert isinstance(model, LayerFlowMatching) and model.stage2_width == 3 * (3 * 2 + 12)
    x = torch.rand(32, 36) * (torch.rand(32, 36) < 0.5)
    xd = x + 1e-9 * torch.rand(32, 36)  # the dequantisation noise of training
    e = model.layer_energies(xd)
    back = model.stage2_inverse(model.stage2_features(xd, e), e)
    assert torch.equal(back > 0, x > 0)
    assert torch.allclose(back, x, atol=1e-6)


def test_a_ring_keeps_as_many_cells_as_it_counts() -> None:
    """Counts n per ring decide the hits: a ring keeps exactly its n largest cells (all of its energy), a ring
    counted empty has none and its share goes to the layer's other rings, a layer whose rings all count 0 keeps
    one hit in its largest ring; every layer keeps stage 1's energy. An emptied count empties its ring."""
    torch.manual_seed(1)
    model = build_model("layer-fm", _polar_spec(), {**SMALL, "occupancy": "count"})
    assert isinstance(model, LayerFlowMatching)
    n = torch.tensor([[[2.0, 0.0, 4.0], [0.0, 0.0, 0.0], [1.0, 3.0, 1.0]]] * 4)  # (B, L, R)
    y = torch.randn(4, 3, 18)
    y[:, :, 3:6] = torch.log1p(n + torch.rand(4, 3, 3))
    e = torch.rand(4, 3) + 0.1
    x = model.stage2_inverse(y.reshape(4, -1), e).reshape(4, 3, 4, 3)
    hits = (x > 0).sum(2).float()
    ring = y[:, :, :3]
    largest = torch.nn.functional.one_hot(ring.argmax(2), 3).float()
    assert torch.equal(hits[:, 0], n[:, 0]) and torch.equal(hits[:, 2], n[:, 2])
    assert torch.equal(hits[:, 1], largest[:, 1])
    assert torch.allclose(x.sum((2, 3)), e, rtol=1e-5)
    cells = model._cell_values(y[:, :, 6:]).reshape(4, 3, 4, 3)  # the kept cells are the largest of their ring
    kept_min = torch.where(x > 0, cells, torch.inf).amin(2)
    dropped_max = torch.where(x > 0, -torch.inf, cells).amax(2)
    assert bool((kept_min[n > 0] > dropped_max[n > 0]).all())
    empty = torch.zeros(4, 3, 18)
    empty[:, 2, 3 + 1] = 1.0  # layer 2: ring 1's count
    out = model.stage2_empty(empty.reshape(4, -1)).reshape(4, 3, 18)
    assert out[:, 2, :6].tolist() == [[0.0, 1.0, 0.0, 0.0, 1.0, 0.0]] * 4
    with pytest.raises(ValueError, match="ring shares"):
        build_model("layer-fm", _spec(2, 8), {**SMALL, "occupancy": "count"})
    with pytest.raises(ValueError, match="needs occupancy='count'"):
        build_model("layer-fm", _polar_spec(), {**SMALL, "maps": "all"})


def test_maps_step_from_empty_to_hit_at_the_data_s_rate_and_cut_ring_tails() -> None:
    """maps="rings": showers whose last layer is empty 70 % of the time and otherwise holds 1-2 % of E_inc; after
    calibrate, stage 1 at fresh noise gives that layer energy in 30 % +- 5 % of showers, almost none in the gap
    between (1e-6 to 0.5 % of E_inc), and the sampled layer energies are the ones the shapes are assembled with;
    each ring's share of the first layer has the data's median and 99th percentile (the untrained ODE's spread
    far wider); a checkpoint saved without the maps loads with identity maps."""
    torch.manual_seed(0)
    spec = _polar_spec(n_layers=3, n_alpha=4, n_r=3)
    model = build_model("layer-fm", spec, {**SMALL, "maps": "rings"})
    assert isinstance(model, LayerFlowMatching) and model.has_calibration
    n = 1500
    x = torch.rand(n, 3, 4, 3) * 0.05
    x[:, 2] = (torch.rand(n, 4, 3) * 0.01 / 12 + 0.01 / 12) * (torch.rand(n, 1, 1) < 0.3)
    x, c = x.reshape(n, -1), torch.rand(n, 1) * 3 - 1.5
    model.train()
    model.loss(x, c)  # fits the scalers, as the first training step does
    model.eval()
    old_state = {k: v.clone() for k, v in model.state_dict().items() if k not in ("layer_table", "ring_table")}
    stats = model.calibrate(x, c, torch.Generator().manual_seed(1))
    assert abs(stats["layer_hit_fraction_data"] - (2 + 0.3) / 3) < 0.02
    with torch.no_grad():
        z = model.draw_noise(n, torch.Generator().manual_seed(2))
        g1 = model.sample_stage1(z[:, :3], c)
        last = model.stage1_inverse(model.scale1.inverse(g1))[:, 2]
        shower = model.sample_from_noise(z, c).reshape(n, 3, 12)
    assert abs(float((last > 1e-3).float().mean()) - 0.3) < 0.05
    assert float(((last > 1e-6) & (last < 5e-3)).float().mean()) < 0.02
    assert torch.allclose(shower[:, 2].sum(1), last, rtol=1e-3, atol=1e-7)
    fresh = build_model("layer-fm", spec, {**SMALL, "maps": "rings"})
    fresh.load_state_dict(old_state)
    assert isinstance(fresh, LayerFlowMatching)
    assert torch.equal(fresh.layer_table, _identity_tables(fresh.layer_table.shape))
    assert torch.equal(fresh.ring_table, _identity_tables(fresh.ring_table.shape))
    ring = shower[:, 0].reshape(n, 4, 3).sum(1) / shower[:, 0].sum(1, keepdim=True)
    want = x.reshape(n, 3, 4, 3)[:, 0].sum(1) / x.reshape(n, 3, 12)[:, 0].sum(1, keepdim=True)
    for q in (0.5, 0.99):
        got_q, want_q = ring.quantile(q, dim=0), want.quantile(q, dim=0)
        assert float((got_q - want_q).abs().max()) < 0.03, (q, got_q, want_q)



def _scaled(spec: ModelSpec, hp: dict, x: torch.Tensor, c: torch.Tensor) -> LayerFlowMatching:
    """An untrained layer-fm whose scalers are fitted on x (n, V) at c (n, 1), as the first training step fits
    them, in eval mode."""
    model = build_model("layer-fm", spec, hp)
    assert isinstance(model, LayerFlowMatching)
    model.train()
    model.loss(x, c)
    model.eval()
    return model


def _calibrated_draw(spec: ModelSpec, hp: dict, x: torch.Tensor, c: torch.Tensor
                     ) -> tuple[LayerFlowMatching, dict[str, float], torch.Tensor, torch.Tensor]:
    """An untrained layer-fm scaled on x (n, V) at c (n, 1) (:func:`_scaled`), calibrated on them (generator seed
    1), and one draw at c (seed 2): the model, the calibration's statistics, stage 1's g1 (n, L) and the assembled
    showers (n, V)."""
    model = _scaled(spec, hp, x, c)
    stats = model.calibrate(x, c, torch.Generator().manual_seed(1))
    with torch.no_grad():
        g1, g2 = model.sample_latents(model.draw_noise(x.shape[0], torch.Generator().manual_seed(2)), c)
        return model, stats, g1, model.assemble(g1, g2, c)


def _sparse_last_layer(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Showers (n, 3 x 4 x 3) whose last layer holds k = 1..10 hits of 0.1 % of E_inc each (k uniform): its hit
    count is fixed by its energy, as for ~7 MeV particles in a late Si-W layer; conditions (n, 1)."""
    x = torch.rand(n, 3, 4, 3) * 0.05
    k = torch.randint(1, 11, (n,))
    cells = torch.rand(n, 12).argsort(1) < k.unsqueeze(1)  # k distinct cells of the 12
    x[:, 2] = (cells.float() * 1e-3).reshape(n, 4, 3)
    return x.reshape(n, -1), torch.rand(n, 1) * 3 - 1.5


@pytest.mark.parametrize(("layer_knots", "copula"), [(0, False), (5, False), (0, True)])
def test_layer_knots_tie_a_late_layer_s_hit_count_to_its_energy(layer_knots: int, copula: bool) -> None:
    """A late layer whose hit count is fixed by its energy (data: corr(log energy, count) 0.95): after calibrate,
    the untrained model's count follows the sampled layer energy with layer_knots=5 (corr > 0.6; each ring's count
    is drawn within a knot's group, independently of the other rings'), and with count_copula (corr > 0.6: the
    rings' counts jointly with the layer energy, every shower of a knot), not with the ring map per incident energy
    alone (corr < 0.3: the untrained ODE's counts are blind to it); all keep the data's mean count (5.5) within
    0.6; each option is refused without ring maps."""
    torch.manual_seed(0)
    spec = _polar_spec(n_layers=3, n_alpha=4, n_r=3)
    hp = {**SMALL, "occupancy": "count", "maps": "rings", "layer_knots": layer_knots, "count_copula": copula}
    x, c = _sparse_last_layer(3000)
    model = _scaled(spec, hp, x, c)
    stats = model.calibrate(x, c, torch.Generator().manual_seed(1))
    with torch.no_grad():
        shower = model.sample(c, torch.Generator().manual_seed(2)).reshape(-1, 3, 12)[:, 2]
    energy, count = shower.sum(1), (shower > 0).sum(1).float()
    corr = float(torch.corrcoef(torch.stack([energy.clamp_min(1e-9).log(), count]))[0, 1])
    assert (corr > 0.6) if layer_knots or copula else (corr < 0.3), corr
    assert abs(float(count.mean()) - 5.5) < 0.6, float(count.mean())
    if copula:  # the untrained model's counts ignore the layer energy, the data's follow it
        assert stats["copula_energy_count_corr_model"] < 0.2 < 0.5 < stats["copula_energy_count_corr_data"], stats
    for option in ({"layer_knots": 5}, {"count_copula": True}) if layer_knots or copula else ():
        with pytest.raises(ValueError, match=next(iter(option))):
            build_model("layer-fm", spec, {**SMALL, "occupancy": "count", "maps": "layers", **option})


def _identity_tables(shape: torch.Size) -> torch.Tensor:
    return torch.linspace(-30.0, 0.0, shape[-1]).expand(*shape[:-2], 2, shape[-1])


@pytest.mark.parametrize("n", [4, 5, 16])
def test_angular_basis_is_orthonormal_and_diagonalises_a_rotation_invariant_covariance(n: int) -> None:
    """The Fourier basis is orthonormal, and turns any circulant covariance (cells correlated by their angular
    distance only, as in showers with no preferred angle) into a diagonal one: uncorrelated modes."""
    q = angular_basis(n).double()
    assert torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-6)
    d = torch.arange(n)
    dist = torch.minimum((d[:, None] - d[None]) % n, (d[None] - d[:, None]) % n).double()
    cov = torch.exp(-dist / 1.5) + 0.3  # positive, decreasing with angular distance
    modes = q @ cov @ q.t()
    off = modes - torch.diag(torch.diag(modes))
    assert float(off.abs().max()) < 1e-6 * float(modes.abs().max())


def test_fourier_velocity_is_the_same_flow_in_rotated_coordinates() -> None:
    """fourier_rings=2: the net sees the two inner rings' cells as modes and returns cells; the rotation
    round-trips exactly, rings, counts and the outer ring pass untouched, and an inner ring of equal cells is one
    mode (the mean); refused without ring shares or beyond the number of rings."""
    torch.manual_seed(0)
    spec = _polar_spec(n_layers=3, n_alpha=4, n_r=3)
    model = build_model("layer-fm", spec, {**SMALL, "occupancy": "count", "fourier_rings": 2})
    assert isinstance(model, LayerFlowMatching)
    vel = model.velocity
    g = torch.randn(5, model.stage2_width)
    assert torch.allclose(vel.rotate(vel.rotate(g), inverse=True), g, atol=1e-6)
    flat = torch.zeros(1, 3, 2 * 3 + 4 * 3)
    flat[:, :, :6] = torch.randn(1, 3, 6)
    flat[:, :, 6:] = torch.tensor([1.0, 2.0, 3.0]).repeat(4)  # cells (A=4, R=3): ring j holds j+1 in every cell
    modes = vel.rotate(flat.reshape(1, -1)).reshape(1, 3, -1)
    assert torch.allclose(modes[:, :, :6], flat[:, :, :6])
    cells = modes[:, :, 6:].reshape(1, 3, 4, 3)
    assert torch.allclose(cells[:, :, 0, :2], 2.0 * torch.tensor([1.0, 2.0]).expand(1, 3, 2))  # sqrt(4) x value
    assert float(cells[:, :, 1:, :2].abs().max()) < 1e-6
    assert torch.equal(cells[..., 2], torch.full((1, 3, 4), 3.0))  # the outer ring stays in cells
    assert model.sample(torch.zeros(2, 1), torch.Generator().manual_seed(0)).shape == (2, spec.n_voxels)
    for bad, hp in (("_spec", 1), ("polar", 4)):
        with pytest.raises(ValueError, match="fourier_rings"):
            build_model("layer-fm", _spec(3, 8) if bad == "_spec" else spec, {**SMALL, "fourier_rings": hp})


def test_stencil_names_each_cell_s_grid_neighbours() -> None:
    """stencil(L=3, A=4, R=3, counts): a cell's first two neighbours sit one angular bin either side (around the
    circle), the next two one ring in and out (itself at the edge), the last two in the same place of the adjacent
    layers (itself at the edge); a ring number's angular neighbours are itself."""
    n_layers, a, r, per_ring = 3, 4, 3, 2
    nb = stencil(n_layers, a, r, per_ring)
    width = per_ring * r + a * r
    assert nb.shape == (n_layers * width, 6)

    def where(i: int) -> tuple[int, int, int]:  # (layer, angle, ring) of cell number i
        layer, j = divmod(i, width)
        return (layer, *divmod(j - per_ring * r, r))

    for i in range(n_layers * width):
        if i % width < per_ring * r:
            assert nb[i, 0] == nb[i, 1] == i
            continue
        layer, al, ring = where(i)
        got = [where(int(j)) for j in nb[i]]
        assert got[:2] == [(layer, (al - 1) % a, ring), (layer, (al + 1) % a, ring)]
        assert got[2:4] == [(layer, al, max(ring - 1, 0)), (layer, al, min(ring + 1, r - 1))]
        assert got[4:] == [(max(layer - 1, 0), al, ring), (min(layer + 1, n_layers - 1), al, ring)]


def test_a_stencil_head_learns_what_its_neighbour_holds() -> None:
    """A velocity whose target is each cell's angular neighbour's value (x rolled by one bin): the voxel head with
    the stencil fits it (loss < 0.02 of the target's variance after 300 steps), the head without it cannot (> 0.2:
    a token of 8 numbers cannot carry the layer's 8 x 3 independent cell values)."""
    torch.manual_seed(0)
    n_layers, a, r = 3, 8, 3
    sizes = (r * (a + 1),) * n_layers
    nb = stencil(n_layers, a, r, 1)
    losses = []
    for neighbours in (nb, None):
        torch.manual_seed(0)
        net = LayerTransformer(sizes, 1, 8, dim=8, depth=1, heads=2, head_dim=8, neighbours=neighbours)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(300):
            x = torch.randn(128, n_layers, r * (a + 1))
            want = x.clone()
            want[:, :, r:] = torch.roll(x[:, :, r:].reshape(128, n_layers, a, r), 1, dims=2).reshape(128, n_layers, -1)
            loss = ((net(x.reshape(128, -1), torch.zeros(128, n_layers, 1), torch.zeros(128, 8))
                     - want.reshape(128, -1)) ** 2).reshape(128, n_layers, -1)[:, :, r:].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert losses[0] < 0.02 < 0.2 < losses[1], losses
    with pytest.raises(ValueError, match="stencil"):
        build_model("layer-fm", _polar_spec(), {**SMALL, "stencil": True, "head_dim": 0})


def _showers_on_polar(n: int, n_layers: int, a: int, r: int, seed: int) -> torch.Tensor:
    """n sparse random showers (n, L x a x r) whose energy leans to a random angle (a cosine dipole)."""
    g = torch.Generator().manual_seed(seed)
    ang = (torch.arange(a) + 0.5) * (2 * math.pi / a)
    phi = torch.rand(n, 1, generator=g) * 2 * math.pi
    lean = (1.0 + 0.8 * torch.cos(ang - phi)).reshape(n, 1, a, 1)
    x = torch.rand(n, n_layers, a, r, generator=g) * lean * (torch.rand(n, n_layers, a, r, generator=g) < 0.7)
    return x.reshape(n, -1)


def test_align_points_every_dipole_into_bin_zero_and_only_permutes_cells() -> None:
    """After align_cells each shower's angular dipole lies in [0, pi / a) (the first half of bin 0), every ring
    holds the same cell values (a permutation), a one-cell shower lands in bin 0, and the frame does not depend
    on how the shower was turned before (align . turn = align for every element of the dihedral group)."""
    n_layers, a, r = 3, 16, 4
    x = _showers_on_polar(500, n_layers, a, r, seed=0)
    out = align_cells(x, n_layers, a, r)
    phi = dipole_angle(out, n_layers, a, r)
    assert float(phi.max()) <= math.pi / a + 1e-5 and float(phi.min()) >= 0.0
    def per_ring(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, n_layers, a, r).sort(dim=2).values

    assert torch.equal(per_ring(out), per_ring(x))
    one = torch.zeros(1, n_layers, a, r)
    one[0, 1, 11, 2] = 1.0
    assert float(align_cells(one.reshape(1, -1), n_layers, a, r).reshape(n_layers, a, r)[1, 0, 2]) == 1.0
    for shift, mirror in ((5.0, 0.0), (0.0, 1.0), (13.0, 1.0)):
        turned = turn_cells(x, n_layers, a, r, torch.full((500,), shift), torch.full((500,), mirror))
        assert torch.equal(align_cells(turned, n_layers, a, r), out)


def test_random_turn_draws_each_of_the_2a_turns_equally_often() -> None:
    """random_turn from standard-normal numbers: a shower with one hot and one warm cell (which tells a mirror
    from a turn) comes out in each of the 2a possible placements with frequency 1/(2a) (chi-square, 2a - 1
    degrees of freedom, well below its 0.1 % point), each a permutation of the same cells."""
    n_layers, a, r, n = 1, 8, 1, 16000
    x = torch.zeros(n, a)
    x[:, 0], x[:, 1] = 2.0, 1.0
    out = random_turn(x, n_layers, a, r, torch.randn(n, generator=torch.Generator().manual_seed(1)))
    hot, warm = out.argmax(1), (out == 1.0).int().argmax(1)
    placement = hot * 2 + ((warm - hot) % a == 1).long()  # warm after hot: a turn; before it: a mirror
    counts = torch.bincount(placement, minlength=2 * a).double()
    assert int((counts > 0).sum()) == 2 * a
    assert float(((counts - n / (2 * a)) ** 2 / (n / (2 * a))).sum()) < 39.3  # chi2(15) 0.1 % point: 37.7
    assert torch.equal(out.sort(1).values, x.sort(1).values)


def test_aligned_layer_fm_learns_in_one_frame_and_samples_every_turn() -> None:
    """align=True: the loss sees a shower and any turn of it alike (same frame), the noise has one more number
    (between stage 1's and stage 2's) and changing only that number turns the sampled shower; refused on a
    cartesian readout."""
    spec = _polar_spec(n_layers=3, n_alpha=8, n_r=3)
    torch.manual_seed(0)
    model = build_model("layer-fm", spec, {**SMALL, "align": True})
    assert isinstance(model, LayerFlowMatching)
    plain = build_model("layer-fm", spec, SMALL)
    assert model.noise_dim() == plain.noise_dim() + 1
    x, c = _showers_on_polar(64, 3, 8, 3, seed=2), torch.rand(64, 1) * 2 - 1
    turned = turn_cells(x, 3, 8, 3, torch.full((64,), 3.0), torch.ones(64))
    model.train()
    losses = []
    for v in (x, turned):
        torch.manual_seed(5)
        losses.append(float(model.loss(v, c)["loss"].detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    model.eval()
    z = model.draw_noise(64, torch.Generator().manual_seed(3))
    with torch.no_grad():
        z[:, 3] = -10.0  # the first element of the group: no turn
        base = model.sample_from_noise(z, c)
        z[:, 3] = 10.0  # the last: mirror, then 7 bins on
        last = model.sample_from_noise(z, c)
    assert base.sum() > 0
    assert torch.equal(last, turn_cells(base, 3, 8, 3, torch.full((64,), 7.0), torch.ones(64)))
    with pytest.raises(ValueError, match="align=true"):
        build_model("layer-fm", _spec(3, 12), {**SMALL, "shares": "voxel", "align": True})


def _smooth_core(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Showers (n, 2 x 16 x 2) whose inner ring is always fully hit with a smooth angular pattern (cell share
    proportional to exp(cos(angle - phi)), phi uniform, 20 % cell-to-cell noise: its angular power sits at k = 1)
    and whose outer ring has 30 % of its cells hit; conditions (n, 1)."""
    ang = torch.arange(16) * (2 * math.pi / 16)
    phi = torch.rand(n, 1, 1) * 2 * math.pi
    x = torch.rand(n, 2, 16, 2) * 0.01 * (torch.rand(n, 2, 16, 2) < 0.3)
    x[..., 0] = 0.05 * torch.exp(torch.cos(ang - phi) + 0.2 * torch.randn(n, 2, 16))
    return x.reshape(n, -1), torch.rand(n, 1) * 3 - 1.5


def _ring0_power(x: torch.Tensor) -> torch.Tensor:
    """Mean angular power (9,) per frequency k = 0..8 of the inner ring's cell shares of showers (n, 2 x 16 x 2)."""
    cells = x.reshape(-1, 2, 16, 2)[..., 0]
    shares = cells / cells.sum(2, keepdim=True).clamp_min(1e-12)
    return (torch.fft.rfft(shares, dim=2).abs() ** 2).mean(dim=(0, 1))


@pytest.mark.parametrize("mode_rings", [0, 1])
def test_mode_map_gives_the_core_the_data_s_angular_power(mode_rings: int) -> None:
    """Data whose inner ring is a smooth pattern (angular power at k = 1, none at k >= 3): after calibrate with
    mode_rings=1 the untrained model's inner ring has the data's power at k = 1 within 30 % and at k = 3..8 less
    than twice the data's; without the mode map (the cells' map alone, which pools the cells over angle) its
    power stays white: under half the data's at k = 1 and over 5 times it above k = 3. The map moves cells within
    their ring only (every ring's energy as without it); a checkpoint saved before it loads with the identity;
    without counts it is refused."""
    torch.manual_seed(0)
    spec = _polar_spec(n_layers=2, n_alpha=16, n_r=2)
    hp = {**SMALL, "occupancy": "count", "maps": "all", "mode_rings": mode_rings}
    x, c = _smooth_core(2000)
    model = _scaled(spec, hp, x, c)
    old_state = {k: v.clone() for k, v in model.state_dict().items() if k != "mode_table"}
    stats = model.calibrate(x, c, torch.Generator().manual_seed(1))
    with torch.no_grad():
        g1, g2 = model.sample_latents(model.draw_noise(2000, torch.Generator().manual_seed(2)), c)
        shower = model.assemble(g1, g2, c)
    ratio = _ring0_power(shower) / _ring0_power(x)
    if mode_rings:
        # c on [-1.5, 1.5]: no shower is nearest the end knots, which take their neighbours' maps
        assert abs(stats["mode_map_fitted_fraction"] - 0.6) < 1e-6
        assert abs(float(ratio[1]) - 1.0) < 0.3 and float(ratio[3:].max()) < 2.0, ratio
        table = model.mode_table.clone()
        model.mode_table.copy_(torch.tensor([0.0, 0.0, 1.0])[:, None].expand_as(table))
        with torch.no_grad():
            without = model.assemble(g1, g2, c)
        model.mode_table.copy_(table)
        rings = [s.reshape(-1, 2, 16, 2).sum(2) for s in (shower, without)]
        assert torch.allclose(*rings, rtol=1e-4, atol=1e-7)
        fresh = build_model("layer-fm", spec, hp)
        fresh.load_state_dict(old_state)
        assert isinstance(fresh, LayerFlowMatching)
        assert torch.equal(fresh.mode_table[..., 2, :], torch.ones_like(fresh.mode_table[..., 2, :]))
        with pytest.raises(ValueError, match="mode_rings"):
            build_model("layer-fm", spec, {**hp, "occupancy": "none", "maps": "rings"})
    else:
        assert float(ratio[1]) < 0.5 and float(ratio[3:].min()) > 5.0, ratio


@pytest.mark.parametrize(("asked", "used"), [(100, 100), (5000, 240)])
def test_calibration_showers_sets_what_training_calibrates_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             asked: int, used: int) -> None:
    """train's calibration_showers: the calibration at the end of training sees that many training showers, and no
    more than the file's 240 (one pass: the stream cycles, and a repeated shower would count twice in every fitted
    quantile and correlation); 0 is refused."""
    import numpy as np

    from fastshower.errors import ConfigError

    seen: list[int] = []
    original = LayerFlowMatching.calibrate

    def spy(self: LayerFlowMatching, x: torch.Tensor, c: torch.Tensor, generator: torch.Generator | None = None
            ) -> dict[str, float]:
        seen.append(x.shape[0])
        return original(self, x, c, generator)

    monkeypatch.setattr(LayerFlowMatching, "calibrate", spy)
    data = write_synthetic(tmp_path / "ds2.h5", get_geometry("par04-ds2"), np.resize([2e3, 8e3, 3e4], 240), seed=1)
    hp = {**SMALL, "hidden": 16, "depth": 1, "head_dim": 2, "cells": "energy"}
    train(data, "layer-fm", tmp_path / "run", steps=1, batch_size=32, progress=False,
          config={"hparams": hp, "train": {"calibration_showers": asked}})
    assert seen == [used]
    with pytest.raises(ConfigError, match="calibration_showers"):
        train(data, "layer-fm", tmp_path / "bad", steps=1, batch_size=32, progress=False,
              config={"hparams": hp, "train": {"calibration_showers": 0}})


def test_calibration_is_reproducible_from_its_generator() -> None:
    """Two calibrations of the same model on the same showers with generators of the same seed give the same maps to
    the last bit (the data's count numbers are dequantised with random numbers seeded from it), another seed others."""
    x, c = _smooth_core(600)
    hp = {**SMALL, "occupancy": "count", "maps": "all", "mode_rings": 1, "count_copula": True}
    torch.manual_seed(0)
    model = _scaled(_polar_spec(n_layers=2, n_alpha=16, n_r=2), hp, x, c)
    maps = []
    for i, seed in enumerate((1, 1, 2)):
        torch.manual_seed(10 + i)  # the global state differs between calls: only the generator may matter
        model.calibrate(x, c, torch.Generator().manual_seed(seed))
        maps.append([getattr(model, n).clone() for n in ("ring_table", "cell_map", "copula_mix", "mode_table")])
    assert all(torch.equal(a, b) for a, b in zip(maps[0], maps[1], strict=True))
    assert not torch.equal(maps[0][0], maps[2][0])


def _faint_outer_hits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Showers (n, 2 x 8 x 3) whose outer ring holds k = 0, 1 or 2 hits of 0.1 % of E_inc each (a particle of a few
    MeV far from the core: its energy per hit is fixed whatever the count), the inner rings most of the energy;
    conditions (n, 1)."""
    x = torch.rand(n, 2, 8, 3) * 0.05
    x[..., 1] *= 0.2 * (torch.rand(n, 2, 8) < 0.5)
    k = torch.randint(0, 3, (n, 2, 1))
    x[..., 2] = 1e-3 * (torch.rand(n, 2, 8).argsort(2) < k)
    return x.reshape(n, -1), torch.rand(n, 1) * 3 - 1.5


@pytest.mark.parametrize("hit_map", [False, True])
def test_hit_map_gives_far_hits_the_data_s_energy_per_hit(hit_map: bool) -> None:
    """Data whose outer ring holds 1 or 2 hits of 0.1 % of E_inc each: after calibrate with hit_map the untrained
    model's energy per hit there is the data's (median within 25 %, 99th percentile under 2x), while the ring map
    alone, which moves the ring's share and count each to the data's but not together, leaves far hits of 3x and
    more; every layer keeps stage 1's energy; without counts the option is refused."""
    torch.manual_seed(0)
    spec = _polar_spec(n_layers=2, n_alpha=8, n_r=3)
    hp = {**SMALL, "occupancy": "count", "maps": "rings", "hit_map": hit_map}
    x, c = _faint_outer_hits(3000)
    model, stats, g1, shower = _calibrated_draw(spec, hp, x, c)
    shower = shower.reshape(-1, 2, 8, 3)
    outer = shower[..., 2]
    n = (outer > 0).sum(2)
    per_hit = (outer.sum(2) / n.clamp_min(1))[n >= 1]
    q50, q99 = (float(per_hit.quantile(q)) / 1e-3 for q in (0.5, 0.99))
    if hit_map:
        assert stats["hit_cap_fitted_fraction"] > 0.2, stats
        assert abs(q50 - 1.0) < 0.25 and q99 < 2.0, (q50, q99)
    else:
        assert q99 > 3.0, (q50, q99)
    assert torch.allclose(shower.sum(dim=(2, 3)), model.stage1_fractions(g1), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="hit_map"):
        build_model("layer-fm", spec, {**SMALL, "occupancy": "none", "maps": "rings", "hit_map": True})


def _depth_linked_counts(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Showers (n, 3 x 4 x 3): layer 0 fully hit, layers 1 and 2 each k = 1..10 hits (the same k, drawn per shower:
    a shower that is busy deep is busy deeper) whose layer energy 1e-2 x U(0.5, 2) is drawn per layer apart from k,
    so no layer's energy tells its count; conditions (n, 1)."""
    x = torch.rand(n, 3, 4, 3) * 0.05
    k = torch.randint(1, 11, (n, 1, 1))
    for layer in (1, 2):
        cells = (torch.rand(n, 12).argsort(1).reshape(n, 4, 3) < k).float()
        x[:, layer] = cells * 1e-2 * (0.5 + 1.5 * torch.rand(n, 1, 1)) / k
    return x.reshape(n, -1), torch.rand(n, 1) * 3 - 1.5


@pytest.mark.parametrize("depth", [False, True])
def test_depth_copula_links_the_layers_hit_counts(depth: bool) -> None:
    """Two layers with the same hit count (data: correlation 1) and energies that say nothing of it: after calibrate
    with depth_copula the untrained model's counts of the two follow each other (corr > 0.6) with the data's mean
    count (5.5, within 0.8), while the ring map alone leaves them independent (|corr| < 0.2); the layers keep
    stage 1's energies (the copula moves counts of hit rings only); without counts the option is refused in one
    line naming it."""
    torch.manual_seed(0)
    spec = _polar_spec(n_layers=3, n_alpha=4, n_r=3)
    hp = {**SMALL, "occupancy": "count", "maps": "rings", "depth_copula": depth}
    x, c = _depth_linked_counts(3000)
    model, stats, g1, shower = _calibrated_draw(spec, hp, x, c)
    shower = shower.reshape(-1, 3, 12)
    count = (shower[:, 1:] > 0).sum(2).float()
    corr = float(torch.corrcoef(count.T)[0, 1])
    assert (corr > 0.6) if depth else (abs(corr) < 0.2), corr
    assert float((count.mean(0) - 5.5).abs().max()) < 0.8, count.mean(0)
    if depth:  # the untrained model's deep counts ignore each other, the data's go together
        # next-layer pairs: (0, 1), whose counts are unrelated in the data, and (1, 2), the same count
        assert abs(stats["depth_count_corr_model_1"]) < 0.1 < 0.35 < stats["depth_count_corr_data_1"], stats
    # an untrained net can underflow a ring's every cell weight (1 shower in 3000 here): hence the 99.9th percentile
    off = (shower.sum(2) / model.stage1_fractions(g1) - 1.0).abs()
    assert float(off.quantile(0.999)) < 1e-4, float(off.quantile(0.999))
    with pytest.raises(ValueError, match="depth_copula"):
        build_model("layer-fm", spec, {**SMALL, "occupancy": "none", "maps": "rings", "depth_copula": True})


def _linked_layer_energies(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Showers (n, 3 x 4 x 3), every cell hit, whose layers 1 and 2 hold 5 % x exp(+-0.5 g) of E_inc with one g ~ N(0,
    1) per shower (their log energies anti-correlated: one takes what the other does not), layer 0 an independent
    amount; conditions (n, 1)."""
    g = torch.randn(n, 1)
    scale = torch.cat([0.2 * torch.exp(0.3 * torch.randn(n, 1)), 0.05 * torch.exp(0.5 * g), 0.05 * torch.exp(-0.5 * g)],
                      1)
    x = (0.5 + torch.rand(n, 3, 12)) * scale.unsqueeze(2) / 12
    return x.reshape(n, -1), torch.rand(n, 1) * 3 - 1.5


@pytest.mark.parametrize("copula", [False, True])
def test_layer_copula_links_the_layers_energies(copula: bool) -> None:
    """Two layers whose energies go against each other (data: log energies correlated -1): after calibrate with
    layer_copula the untrained model's stage 1 draws them anti-correlated (< -0.7; the copula's shrinkage keeps 0.9
    of the data's), without it as its untrained flow does (-0.35); either way each layer's median energy is the
    data's (5 % of E_inc within 10 %: the layer map after the copula); without a layer map the option is refused in
    one line."""
    torch.manual_seed(0)
    spec = _polar_spec(n_layers=3, n_alpha=4, n_r=3)
    x, c = _linked_layer_energies(3000)
    model = _scaled(spec, {**SMALL, "maps": "layers", "layer_copula": copula}, x, c)
    stats = model.calibrate(x, c, torch.Generator().manual_seed(1))
    with torch.no_grad():
        z1 = model.draw_noise(3000, torch.Generator().manual_seed(2))[:, :3]
        e = model.stage1_fractions(model.sample_stage1(z1, c))
    corr = float(torch.corrcoef(e[:, 1:].log().T)[0, 1])
    assert (corr < -0.7) if copula else (corr > -0.5), corr  # mean adjacent score correlations: (0, 1) and (1, 2)
    assert float((e[:, 1:].median(0).values / 0.05 - 1.0).abs().max()) < 0.1, e[:, 1:].median(0).values
    if copula:
        assert stats["layer_corr_data_1"] < -0.3 < -0.2 < stats["layer_corr_model_1"], stats
    with pytest.raises(ValueError, match="layer_copula"):
        build_model("layer-fm", spec, {**SMALL, "layer_copula": True})


def test_ring_weight_weighs_the_ring_numbers_of_the_loss() -> None:
    """ring_weight=4 on a 3-ring readout with counts: each layer's 6 ring numbers weigh 4 times a cell's in the flow-
    matching loss, the weights averaging 1 (so the loss keeps its scale); 1 weighs all alike; a weight <= 0 is
    refused."""
    spec = _polar_spec(n_layers=2, n_alpha=4, n_r=3)
    model = build_model("layer-fm", spec, {**SMALL, "occupancy": "count", "ring_weight": 4.0})
    assert isinstance(model, LayerFlowMatching)
    w = model.loss_weight.reshape(2, 18)
    assert torch.allclose(w[:, :6] / w[:, 6:7], torch.full((2, 6), 4.0)) and abs(float(w.mean()) - 1.0) < 1e-6
    assert torch.allclose(w[:, 6:], w[0, 6].expand(2, 12))
    plain = build_model("layer-fm", spec, {**SMALL, "occupancy": "count"})
    assert torch.equal(plain.loss_weight, torch.ones(36))
    with pytest.raises(ValueError, match="ring_weight"):
        build_model("layer-fm", spec, {**SMALL, "ring_weight": 0.0})


def _coherent_core(n: int, n_layers: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Showers (n, L x 16 x 2) whose inner ring, fully hit in every layer, follows one smooth pattern per shower
    through the depth (exp(0.3 cos(angle - phi)), phi uniform) times independent 30 % noise per cell and layer, as
    a core off the axis keeps its direction; the outer ring 30 % hit; conditions (n, 1)."""
    ang = torch.arange(16) * (2 * math.pi / 16)
    phi = torch.rand(n, 1, 1) * 2 * math.pi
    x = torch.rand(n, n_layers, 16, 2) * 0.01 * (torch.rand(n, n_layers, 16, 2) < 0.3)
    x[..., 0] = 0.05 * torch.exp(0.3 * torch.cos(ang - phi) + 0.3 * torch.randn(n, n_layers, 16))
    return x.reshape(n, -1), torch.rand(n, 1) * 3 - 1.5


def _summed_power(x: torch.Tensor, n_layers: int = 6) -> torch.Tensor:
    """Mean power (9,) per frequency k = 0..8 of the inner ring's depth-summed pattern (cells over their mean,
    minus 1) of showers (n, L x 16 x 2)."""
    summed = x.reshape(-1, n_layers, 16, 2)[..., 0].sum(1)
    rel = summed / summed.mean(1, keepdim=True).clamp_min(1e-12) - 1.0
    return (torch.fft.rfft(rel, dim=1).abs() ** 2).mean(0)


@pytest.mark.parametrize("coherent", [0, 1])
def test_coherent_rings_give_the_depth_summed_core_the_data_s_angular_power(coherent: int) -> None:
    """Data whose core follows one smooth pattern through the depth: the untrained model's layers are independent,
    so its depth-summed core is white (under a fifth of the data's power at k = 1, above it at k = 6..8). With
    coherent_rings=1 the calibrated model's summed power is the data's within 20 % at every frequency; every ring
    of every layer keeps its energy and its empty cells; a checkpoint saved before the option loads with zero
    gains; without ring maps it is refused."""
    torch.manual_seed(0)
    spec = _polar_spec(n_layers=6, n_alpha=16, n_r=2)
    hp = {**SMALL, "occupancy": "count", "maps": "all", "coherent_rings": coherent}
    x, c = _coherent_core(2000)
    model, stats, g1, shower = _calibrated_draw(spec, hp, x, c)
    ratio = _summed_power(shower)[1:] / _summed_power(x)[1:]
    if not coherent:
        assert float(ratio[0]) < 0.2 and float(ratio[5:].min()) > 1.2, ratio
        return
    assert stats["coherence_fitted_fraction"] == pytest.approx(0.6)  # c on [-1.5, 1.5]: the end knots take theirs
    assert float((ratio - 1.0).abs().max()) < 0.2, ratio
    gain = model.core_gain.clone()
    model.core_gain.zero_()
    with torch.no_grad():
        g2 = model.sample_latents(model.draw_noise(2000, torch.Generator().manual_seed(2)), c)[1]
        without = model.assemble(g1, g2, c)
    model.core_gain.copy_(gain)
    rings = [s.reshape(-1, 6, 16, 2).sum(2) for s in (shower, without)]
    assert torch.allclose(*rings, rtol=1e-4, atol=1e-7)
    assert torch.equal(shower > 0, without > 0)
    fresh = build_model("layer-fm", spec, hp)
    assert isinstance(fresh, LayerFlowMatching)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k != "core_gain"})
    assert torch.equal(fresh.core_gain, torch.zeros_like(fresh.core_gain))
    with pytest.raises(ValueError, match="coherent_rings"):
        build_model("layer-fm", spec, {**hp, "maps": "layers"})


def _radial_profile(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Showers (n, 3 x 4 x 3) whose every layer splits its energy between ring 0 (a share f, uniform in 0.3-0.9) and
    rings 1 and 2 (4 : 1 of the rest): a shower narrow in one layer has its ring 1 and 2 shares low together, as a
    radial profile does; cells within a ring 20 % noisy; conditions (n, 1)."""
    f = 0.3 + 0.6 * torch.rand(n, 3, 1)
    rings = torch.cat([f, 0.8 * (1 - f), 0.2 * (1 - f)], dim=2)  # (n, L, R)
    cells = (1 + 0.2 * torch.rand(n, 3, 4, 3)) * rings.unsqueeze(2) * torch.rand(n, 3, 1, 1)
    return cells.reshape(n, -1), torch.rand(n, 1) * 3 - 1.5


def _ring_rank_corr(x: torch.Tensor, i: int, j: int) -> float:
    """Rank correlation of rings i and j's shares of layer 1 in showers (n, 3 x 4 x 3)."""
    rings = x.reshape(-1, 3, 4, 3)[:, 1].sum(1)
    shares = rings / rings.sum(1, keepdim=True).clamp_min(1e-12)
    ranks = shares.argsort(0).argsort(0).float()
    return float(torch.corrcoef(torch.stack([ranks[:, i], ranks[:, j]]))[0, 1])


@pytest.mark.parametrize("copula", [False, True])
def test_share_copula_gives_the_rings_the_data_s_radial_profile(copula: bool) -> None:
    """Data whose rings 1 and 2 rise and fall together against ring 0 (rank correlations -1 and +1): the untrained
    model's rings 1 and 2, each mapped to the data's marginal by the ring map, do not (their shares' sum to 1 alone
    ties ring 0 to the rest); with share_copula both links come within 0.25 of the data's. Without a ring map it is
    refused."""
    torch.manual_seed(0)
    spec = _polar_spec()
    x, c = _radial_profile(2000)
    _, _, _, shower = _calibrated_draw(spec, {**SMALL, "maps": "rings", "share_copula": copula}, x, c)
    data = (_ring_rank_corr(x, 0, 1), _ring_rank_corr(x, 1, 2))
    model = (_ring_rank_corr(shower, 0, 1), _ring_rank_corr(shower, 1, 2))
    assert data[0] < -0.95 and data[1] > 0.95
    if copula:
        assert abs(model[0] - data[0]) < 0.25 and abs(model[1] - data[1]) < 0.25, (model, data)
        with pytest.raises(ValueError, match="share_copula"):
            build_model("layer-fm", spec, {**SMALL, "maps": "layers", "share_copula": True})
    else:
        assert model[1] < 0.5, (model, data)


def test_an_unfitted_ring_copula_leaves_the_showers_as_they_are() -> None:
    """Before calibrate, share_copula and count_copula are the identity: the same weights and noise give the same
    showers with them as without (their scores, bounded against a far-off net's numbers, stay clear of the bound
    here: logit shares reach -14)."""
    torch.manual_seed(0)
    spec = _polar_spec()
    x, c = _radial_profile(300)
    hp = {**SMALL, "occupancy": "count", "maps": "all"}
    with_them = _scaled(spec, {**hp, "share_copula": True, "count_copula": True}, x, c)
    plain = build_model("layer-fm", spec, hp)
    assert isinstance(plain, LayerFlowMatching)
    plain.load_state_dict({k: v for k, v in with_them.state_dict().items() if not k.startswith(("share_", "copula_"))})
    plain.eval()
    z = with_them.draw_noise(300, torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(with_them.sample_from_noise(z, c), plain.sample_from_noise(z, c), atol=1e-7)
