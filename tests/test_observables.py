"""Analytic tests of fastshower.validate.observables (numpy and torch give the same answers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastshower.geometry import (
    CartesianSegmentation,
    Geometry,
    PolarSegmentation,
    ProfileAxis,
    ReadoutLayer,
    get_geometry,
)
from fastshower.validate import observables as O

CART = Geometry(
    name="test-cart", description="", source="",
    layers=tuple(ReadoutLayer(None, 0.0, "G4_Si", 10.0, 1, CartesianSegmentation(4, 3, 10.0, 20.0)) for _ in range(3)),
)
POLAR = Geometry(
    name="test-polar", description="", source="",
    layers=tuple(
        ReadoutLayer(None, 0.0, "G4_Si", 5.0, 1, PolarSegmentation((0.0, 2.0, 4.0, 8.0), 4)) for _ in range(2)
    ),
)


def test_single_cell_centre_and_width() -> None:
    s = np.zeros((1, CART.n_voxels))
    cell = 12 + 7  # layer 1, row 1, column 3
    s[0, cell] = 5.0
    c, w = O.centre_of_energy(s, CART)
    xy = CART.layers[1].segmentation.cell_centres()[7]
    assert np.allclose(c[0, 1], xy)
    assert np.allclose(w, 0.0)
    assert np.allclose(c[0, 0], 0.0)  # empty layer
    assert np.allclose(O.layer_energies(s, CART), [[0, 5, 0]])
    z, zw = O.longitudinal_moments(s, CART)
    assert z[0] == pytest.approx(15.0) and zw[0] == pytest.approx(0.0)
    assert O.n_peaks(s, CART, 0.0)[0] == 1


def test_uniform_layer_width_analytic() -> None:
    s = np.zeros((1, CART.n_voxels))
    s[0, :12] = 1.0
    c, w = O.centre_of_energy(s, CART)
    # x in {-15,-5,5,15}: var = 125; y in {-20,0,20}: var = 800/3
    assert np.allclose(c[0, 0], 0.0)
    assert w[0, 0, 0] == pytest.approx(np.sqrt(125.0))
    assert w[0, 0, 1] == pytest.approx(np.sqrt(800 / 3))
    assert O.sparsity(s, 0.0)[0] == pytest.approx(2 / 3)
    assert O.n_hits(s)[0] == 12


def test_torch_matches_numpy_and_polar_r() -> None:
    rng = np.random.default_rng(0)
    s = rng.gamma(1.0, 1.0, (5, POLAR.n_voxels))
    e = np.full(5, 100.0)
    on = O.compute_observables(s, e, POLAR)
    ot = O.compute_observables(torch.from_numpy(s), torch.from_numpy(e), POLAR)
    for k in on:
        assert isinstance(ot[k], torch.Tensor)
        assert np.allclose(on[k], ot[k].numpy()), k
    one = np.zeros((1, POLAR.n_voxels))
    one[0, 2] = 1.0  # layer 0, first angular bin, outer ring r = 6
    rm, rw = O.layer_r_moments(one, POLAR)
    assert rm[0, 0] == pytest.approx(6.0) and rw[0, 0] == 0.0
    assert np.allclose(O.radial_profile(one, POLAR), [[0, 0, 1]])


def test_e1_e9_e25_and_peaks() -> None:
    g = get_geometry("belle2-ecl-5x5")
    img = np.zeros((5, 5))
    img[2, 2], img[2, 3], img[0, 0] = 10.0, 5.0, 1.0
    s = img.reshape(1, -1)
    e19, e925 = O.e1_e9_e25(s, g)
    assert e19[0] == pytest.approx(10 / 15) and e925[0] == pytest.approx(15 / 16)
    assert O.n_peaks(s, g, 0.5)[0] == 2
    assert O.n_peaks(s, g, 2.0)[0] == 1
    assert O.max_cell(s)[0] == 10.0
    assert O.energy_ratio(s, np.array([32.0]))[0] == pytest.approx(0.5)
    assert np.allclose(np.sort(O.voxel_spectrum(s)), [1, 5, 10])


def test_airshower_profile_gaussian() -> None:
    g = Geometry(name="prof", description="", source="", profile=ProfileAxis(3200.0, 10.0, ("dEdX",)))
    x = g.profile.centres()
    xmax = np.array([700.0, 853.0])
    prof = 1e3 * np.exp(-0.5 * ((x[None] - xmax[:, None]) / 150.0) ** 2)
    out = O.profile_shape(prof, g)
    assert np.allclose(out["Xmax"], xmax, atol=1.0)
    assert np.allclose(out["dEdX_max"], 1e3, rtol=2e-3)
    assert np.allclose(out["X_width"], 150.0, rtol=1e-3)
