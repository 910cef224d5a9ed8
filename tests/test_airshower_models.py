"""Air-shower profile models: merging primaries, ground-aware postprocessing, physicality, Xmax moments.

Fast: synthetic Gaisser-Hillas profiles (fastshower.airshower) and tiny networks trained for a
few steps; no SIBYLL needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fastshower.airshower import (
    compare_xmax_moments,
    fill_below_ground,
    gaisser_hillas_profiles,
    mirror_generate,
    physicality,
    prepare_training_file,
    profile_roughness,
    write_synthetic_profiles,
    xmax_moments,
)
from fastshower.generation import generate
from fastshower.geometry import get_geometry
from fastshower.io import ShowerBatch, ShowerFile, ShowerFileError, merge_files, primary_ln_a, write_showers
from fastshower.sampling import below_ground_mask, zero_below_ground
from fastshower.training import train
from fastshower.validate.observables import profile_shape

GEO = get_geometry("airshower-profile")
NB = GEO.profile.n_bins if GEO.profile else 0


def _primary_file(path: Path, particle: str, n: int, seed: int) -> Path:
    """A one-primary file shaped like the generator's: conditions zenith, azimuth; truth xmax."""
    rng = np.random.default_rng(seed)
    e = 10 ** rng.uniform(17, 19, n) * 1e-6
    zen = rng.uniform(0, 65, n)
    prof, xmax = gaisser_hillas_profiles(GEO, e, zen, np.full(n, primary_ln_a(particle)), rng)
    batch = ShowerBatch(e, prof, {"zenith": zen[:, None], "azimuth": rng.uniform(0, 360, (n, 1))},
                        {"xmax": xmax[:, None]})
    return write_showers(path, GEO, batch, particle, "synthetic test profiles", attrs={"seed": seed})


@pytest.fixture(scope="module")
def primaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("air")
    return {"p": _primary_file(d / "p.h5", "p", 300, 1), "Fe": _primary_file(d / "fe.h5", "Fe", 200, 2)}


@pytest.fixture(scope="module")
def merged(primaries: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("air") / "merged.h5"
    return merge_files([primaries["p"], primaries["Fe"]], out, add_condition="primary", chunk_rows=100)


def test_primary_ln_a() -> None:
    assert primary_ln_a("p") == 0.0
    assert primary_ln_a("Fe") == pytest.approx(math.log(56))
    assert primary_ln_a("He") == pytest.approx(math.log(4))
    assert primary_ln_a("1000070140") == pytest.approx(math.log(14))
    with pytest.raises(ShowerFileError):
        primary_ln_a("e-")


def test_merge_keeps_rows_conditions_and_provenance(primaries: dict[str, Path], merged: Path) -> None:
    with ShowerFile(merged) as m, ShowerFile(primaries["p"]) as fp, ShowerFile(primaries["Fe"]) as ff:
        assert m.n == fp.n + ff.n == 500
        assert m.complete and m.particle == "p+Fe"
        assert m.condition_names == ["azimuth", "primary", "zenith"] and m.truth_names == ["xmax"]
        all_m = m.read()
        lna = all_m.conditions["primary"][:, 0]
        # every input row is there, once, with its conditions, truth and the input's ln A
        for f, value in ((fp, 0.0), (ff, math.log(56))):
            src = f.read()
            sel = np.isclose(lna, value)
            assert sel.sum() == f.n
            order = np.argsort(all_m.energies[sel])
            src_order = np.argsort(src.energies)
            np.testing.assert_array_equal(all_m.showers[sel][order], src.showers[src_order])
            np.testing.assert_array_equal(all_m.conditions["zenith"][sel][order], src.conditions["zenith"][src_order])
            np.testing.assert_array_equal(all_m.truth["xmax"][sel][order], src.truth["xmax"][src_order])
        # interleaved: the first block already holds both primaries in proportion
        assert 0 < np.isclose(lna[:100], 0.0).sum() < 100
        prov = json.loads(m.attrs["merged_from"])
        assert [p["particle"] for p in prov] == ["p", "Fe"]
        assert [p["n_showers"] for p in prov] == [300, 200]
        assert prov[0]["seed"] == 1 and prov[1]["primary"] == pytest.approx(math.log(56))
        assert Path(prov[0]["path"]) == primaries["p"].resolve()
        assert m.attrs["merge_condition"] == "primary"


def test_merge_concatenate_and_explicit_values(primaries: dict[str, Path], tmp_path: Path) -> None:
    out = merge_files([primaries["p"], primaries["Fe"]], tmp_path / "c.h5", add_condition="mass",
                      condition_values={"p": 1.0, str(primaries["Fe"]): 56.0}, interleave=False, chunk_rows=128)
    with ShowerFile(out) as m:
        mass = m.read().conditions["mass"][:, 0]
    np.testing.assert_array_equal(mass, [1.0] * 300 + [56.0] * 200)


def test_merge_rejects_mismatches(primaries: dict[str, Path], merged: Path, tmp_path: Path) -> None:
    with pytest.raises(ShowerFileError, match="conditions"):
        merge_files([primaries["p"], merged], tmp_path / "x.h5")
    with pytest.raises(ShowerFileError, match="already have"):
        merge_files([merged], tmp_path / "y.h5", add_condition="primary")
    with pytest.raises(ShowerFileError, match="no value"):
        merge_files([primaries["p"]], tmp_path / "z.h5", add_condition="other")
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y.h5").exists()


def test_below_ground_mask_and_zeroing() -> None:
    zen = torch.tensor([0.0, 60.0])
    mask = below_ground_mask(GEO, zen)
    assert mask.shape == (2, 2 * NB)
    # 1036 g/cm^2: bin 103 (1030-1040) holds the ground and is kept; bins from 104 on are below
    assert not mask[0, 103] and mask[0, 104] and mask[0, NB + 104] and not mask[0, NB + 103]
    # 60 deg: 2072 g/cm^2 -> first bin below ground starts at 2080
    assert not mask[1, 207] and mask[1, 208]
    s = torch.rand(2, 2 * NB) + 0.1
    z = zero_below_ground(s, GEO, zen)
    assert (z[mask] == 0).all() and torch.equal(z[~mask], s[~mask])


def test_gaisser_hillas_profiles_are_physical_and_fit_xmax() -> None:
    rng = np.random.default_rng(3)
    n = 400
    zen = rng.uniform(0, 65, n)
    prof, xmax = gaisser_hillas_profiles(GEO, np.full(n, 1e12), zen, np.zeros(n), rng)
    assert prof.shape == (n, 2 * NB) and (prof >= 0).all() and np.isfinite(prof).all()
    mask = below_ground_mask(GEO, torch.from_numpy(zen)).numpy()
    assert (prof[mask] == 0).all()
    fit = profile_shape(prof.astype(np.float64), GEO)["Xmax"]
    seen = xmax < 1036 / np.cos(np.radians(zen)) - 100  # maximum well above ground
    assert np.median(np.abs(fit[seen] - xmax[seen])) < 5.0


def test_xmax_moments_separate_primaries(tmp_path: Path) -> None:
    path = write_synthetic_profiles(tmp_path / "s.h5", 2000, seed=4, chunk_rows=700, bank_size=1000)
    rows = {(r["primary"], r["lg_e_lo"]): r for r in xmax_moments(path, (17, 18, 19))}
    assert set(rows) == {("p", 17.0), ("p", 18.0), ("Fe", 17.0), ("Fe", 18.0)}
    for lo in (17.0, 18.0):
        assert rows[("p", lo)]["mean"] - rows[("Fe", lo)]["mean"] > 60
        assert rows[("p", lo)]["rms"] > 2 * rows[("Fe", lo)]["rms"]
    assert rows[("p", 18.0)]["mean"] > rows[("p", 17.0)]["mean"]
    same = compare_xmax_moments(path, path, (17, 18, 19))
    assert all(r["d_mean"] == 0 and r["d_rms"] == 0 for r in same)


@pytest.mark.parametrize("model,hparams", [
    ("wgan-gp", {"latent_dim": 8, "hidden": 32, "depth": 1, "net": "mlp", "constrainer_hidden": 16,
                 "constrainer_warmup": 2}),
    ("flow-matching", {"net": "mlp", "hidden": 32, "depth": 1, "emb_dim": 16, "steps": 2, "warmup": 2}),
])
def test_trained_models_generate_physical_profiles(model: str, hparams: dict, merged: Path,
                                                   primaries: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    run = train(merged, out=tmp_path / "run", progress=False,
                config={"model": model, "hparams": hparams, "train": {"steps": 6, "batch_size": 64}})
    spec = json.loads((run / "spec.json").read_text())
    assert spec["cond_names"] == ["log_energy", "azimuth", "primary", "zenith"]
    # one model profile per reference profile, same conditions; a one-primary reference gets its ln A
    out = mirror_generate(run, primaries["Fe"], tmp_path / "fe_gen.h5", batch_size=128)
    phys = physicality(out)
    assert phys["all_physical"] and phys["n"] == 200 and phys["n_nonzero_below_ground"] == 0
    with ShowerFile(out) as f, ShowerFile(primaries["Fe"]) as ref:
        b, r = f.read(), ref.read()
        assert f.particle == "Fe"
        np.testing.assert_array_equal(b.energies, r.energies)
        np.testing.assert_array_equal(b.conditions["zenith"], r.conditions["zenith"])
        assert np.allclose(b.conditions["primary"], math.log(56))
        assert (b.showers >= 0).all()
    # the generic generate() path applies the same ground cut
    gen = generate(run, 50, "1e17eV:1e19eV:log", {"zenith": "40:65", "primary": "0"}, tmp_path / "g.h5",
                   batch_size=32, progress=False, extrapolate=True)
    assert physicality(gen)["all_physical"]
    with h5py.File(gen) as f:
        zen = f["conditions/zenith"][:, 0]
        s = f["showers"][:]
    first_below = np.ceil(1036 / np.cos(np.radians(zen)) / 10).astype(int)
    for i in range(len(zen)):
        assert (s[i, first_below[i]:NB] == 0).all() and (s[i, NB + first_below[i]:] == 0).all()


def test_fill_below_ground_is_undone_by_the_postprocess(primaries: dict[str, Path], tmp_path: Path) -> None:
    with ShowerFile(primaries["p"]) as f:
        b = f.read()
    zen = b.conditions["zenith"]
    filled = fill_below_ground(b.showers, GEO, zen)
    mask = below_ground_mask(GEO, torch.from_numpy(zen)).numpy()
    assert (filled[mask] > 0).mean() > 0.99  # continued below ground (the bimodal zeros are gone)
    np.testing.assert_array_equal(filled[~mask], b.showers[~mask])  # above ground untouched
    back = zero_below_ground(torch.from_numpy(filled), GEO, torch.from_numpy(zen)).numpy()
    np.testing.assert_array_equal(back, b.showers)  # the generation postprocess inverts the fill exactly
    out = prepare_training_file([primaries["p"], primaries["Fe"]], tmp_path / "t.h5")
    with ShowerFile(out) as m:
        assert m.n == 500 and "primary" in m.condition_names and "exp(-dX/100" in m.attrs["below_ground_fill"]
        mb = m.read()
    back = zero_below_ground(torch.from_numpy(mb.showers), GEO, torch.from_numpy(mb.conditions["zenith"])).numpy()
    assert physicality(primaries["p"])["all_physical"] and (back >= 0).all()


def test_profile_roughness_flags_noisy_profiles() -> None:
    rng = np.random.default_rng(5)
    n = 200
    prof, _ = gaisser_hillas_profiles(GEO, np.full(n, 1e12), np.zeros(n), np.zeros(n), rng)
    smooth = profile_roughness(prof, GEO)
    noisy = prof * np.exp(rng.normal(0, 0.5, prof.shape)).astype(np.float32)
    assert smooth < 0.1 < profile_roughness(noisy, GEO)


def test_onnx_generation_applies_the_ground_cut(merged: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    run = train(merged, out=tmp_path / "run", progress=False,
                config={"model": "wgan-gp", "train": {"steps": 3, "batch_size": 64},
                        "hparams": {"latent_dim": 8, "hidden": 32, "depth": 1, "net": "mlp",
                                    "constrainer_hidden": 16}})
    out = generate(run, 40, "1e17eV:1e19eV:log", {"zenith": "0:20"}, tmp_path / "o.h5", batch_size=20,
                   progress=False, extrapolate=True, backend="onnx")
    assert physicality(out)["all_physical"]
