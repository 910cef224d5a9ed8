"""Tests of the CONEX-like air-shower generator (fastshower.montecarlo.airshower).

The fast tests run at 1e15 eV (sub-shower tables up to 1e4 GeV, built once into the user's
cache, ~15 s the first time). The statistical validation against published CONEX Xmax
moments is marked slow (``pytest -m slow tests/test_airshower.py``).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

pytest.importorskip("chromo")

from fastshower.geometry import get_geometry
from fastshower.montecarlo import airshower as air
from fastshower.montecarlo.airshower import (
    ATMOSPHERE,
    AirShowerBackend,
    fit_xmax,
    greisen_ne,
    xmax_acceptance,
)
from fastshower.montecarlo.backend import BackendOptions, SimulationError

GEO = get_geometry("airshower-profile")
NB = 320


def _backend(particle: str = "p", **extra: object) -> AirShowerBackend:
    return AirShowerBackend(GEO, particle, BackendOptions(extra=dict(extra)))


def _run(particle: str, e_ev: float, n: int, zenith: float = 0.0, seed: int = 1):
    b = _backend(particle)
    cond = {"zenith": np.full((n, 1), zenith), "azimuth": np.zeros((n, 1))}
    return b.run(np.full(n, e_ev * 1e-6), cond, seed=seed)


# --- building blocks ----------------------------------------------------------------------------


def test_atmosphere_linsley_us_standard() -> None:
    assert ATMOSPHERE.depth(0.0) == pytest.approx(1036.1, abs=0.1)
    assert ATMOSPHERE.depth(1.0e6) == pytest.approx(271.0, abs=3.0)  # 10 km
    assert ATMOSPHERE.depth(1.2e7) == 0.0
    h = np.array([0.0, 2e5, 5e5, 1.5e6, 5e6, 1.05e7])
    np.testing.assert_allclose(ATMOSPHERE.height(ATMOSPHERE.depth(h)), h, atol=1.0)


def test_greisen_profile_and_em_normalisation() -> None:
    e = 1e6  # GeV
    t = np.linspace(0.1, 60, 6000)
    ne = greisen_ne(t, e)
    beta0 = math.log(e / air.EC_AIR)
    assert t[np.argmax(ne)] == pytest.approx(beta0, rel=0.05)  # age s = 1 at t = beta0
    energies, prof = air._em_tables(NB, 10.0)
    np.testing.assert_allclose(prof[:, 0].sum(axis=1), energies, rtol=1e-9)  # each row deposits its energy


def test_fit_xmax_recovers_gaisser_hillas() -> None:
    x = (np.arange(NB) + 0.5) * 10.0
    x0, xmax, lam = 0.0, 735.0, 60.0
    w = (xmax - x0) / lam
    gh = np.where(x > x0, ((x - x0) / (xmax - x0)) ** w * np.exp((xmax - x) / lam), 0.0) * 1e6
    xm, dm = fit_xmax(gh, 10.0)
    assert xm == pytest.approx(xmax, abs=3.0)
    assert dm == pytest.approx(1e6, rel=0.02)


def test_nucleus_event_conserves_energy() -> None:
    sib = air._Sibyll.get()
    sib.seed(np.random.default_rng(3))
    e_n = 1e6  # GeV per nucleon
    for _ in range(5):
        _cls, e, amass = sib.nucleus_event(56, 14, e_n)
        # lab energies: projectile + wounded target nucleons at rest (at most 14 x m_N)
        excess = e.sum() - 56 * e_n
        assert -1e-6 * 56 * e_n < excess < 14 * air.M_NUCLEON + 1e-6 * 56 * e_n
        assert np.all(amass >= 1)


# --- requests and conditions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("particle", "e_range", "extra", "match"),
    [
        ("pi+", (1e12, 1e12), {}, "unknown air-shower primary"),
        ("p", (1e8, 1e8), {}, "outside the supported range"),
        ("Fe", (1e12, 1e16), {}, "outside the supported range"),
        ("p", (1e12, 1e12), {"zenith": "0:90"}, "zenith"),
        ("p", (1e12, 1e12), {"zenith": "abc"}, "zenith"),
        ("p", (1e12, 1e12), {"azimuth": "10:5"}, "azimuth"),
    ],
)
def test_check_request_errors(particle: str, e_range: tuple[float, float], extra: dict, match: str) -> None:
    with pytest.raises(SimulationError, match=match) as info:
        AirShowerBackend.check_request(GEO, particle, BackendOptions(extra=extra), e_range)
    assert "\n" not in str(info.value)


def test_check_request_rejects_calorimeter_geometry() -> None:
    with pytest.raises(SimulationError, match="profile geometry"):
        AirShowerBackend.check_request(get_geometry("par04-ds2"), "p", BackendOptions(), (1e12, 1e12))


def test_draw_conditions_uniform_in_cos2() -> None:
    opts = BackendOptions(extra={"zenith": "0:60", "azimuth": "0:360"})
    c = AirShowerBackend.draw_conditions(GEO, opts, np.random.default_rng(0), 20000)
    zen, azi = c["zenith"], c["azimuth"]
    assert zen.shape == (20000, 1) and azi.shape == (20000, 1)
    assert zen.min() >= 0 and zen.max() <= 60 and azi.min() >= 0 and azi.max() <= 360
    cos2 = np.cos(np.radians(zen)) ** 2
    assert cos2.mean() == pytest.approx((1 + 0.25) / 2, abs=0.01)
    assert AirShowerBackend.condition_widths(GEO, opts) == {"zenith": 1, "azimuth": 1}
    assert AirShowerBackend.truth_widths(GEO, opts)["xmax"] == 1


# --- showers ------------------------------------------------------------------------------------


def test_showers_shapes_determinism_and_ground() -> None:
    b = _backend("p")
    e = np.full(3, 1e9)  # 1e15 eV in MeV
    cond = {"zenith": np.array([[0.0], [30.0], [60.0]]), "azimuth": np.zeros((3, 1))}
    a1 = b.run(e, cond, seed=7)
    a2 = b.run(e, cond, seed=7)
    a3 = b.run(e, cond, seed=8)
    assert a1.showers.shape == (3, 2 * NB)
    np.testing.assert_array_equal(a1.showers, a2.showers)
    np.testing.assert_array_equal(a1.truth["xmax"], a2.truth["xmax"])
    assert not np.array_equal(a1.showers, a3.showers)
    assert np.all(a1.showers >= 0) and np.all(np.isfinite(a1.showers))
    for i, z in enumerate((0.0, 30.0, 60.0)):
        ground_bin = math.ceil(1036.0 / math.cos(math.radians(z)) / 10.0)
        assert np.all(a1.showers[i, ground_bin:NB] == 0)  # dE/dX below ground
        assert np.all(a1.showers[i, NB + ground_bin:] == 0)  # N_e below ground
        assert a1.showers[i, ground_bin - 5] > 0
    assert set(a1.truth) == {"xmax", "dEdX_max"}
    x = a1.truth["xmax"][:, 0]
    assert np.all((x > 300) & (x < 900))  # 1e15 eV protons: <Xmax> ~ 570 g/cm^2


def test_iron_shallower_than_proton_and_energy_deposit() -> None:
    p = _run("p", 1e15, 6, zenith=60.0, seed=11)
    fe = _run("Fe", 1e15, 6, zenith=60.0, seed=12)
    assert fe.truth["xmax"].mean() < p.truth["xmax"].mean() - 40
    for batch in (p, fe):
        cal = batch.showers[:, :NB].sum(axis=1) * 10.0 / 1e9
        # calorimetric fraction at 1e15 eV: measured ~0.7 (p) and ~0.58 (Fe); low-energy hadrons
        # lose more than in full simulations (no muon/hadron ionisation, simple model below 60 GeV)
        assert np.all((cal > 0.5) & (cal < 0.95))
        ne_max = batch.showers[:, NB:].max(axis=1)
        assert np.all((ne_max > 2e5) & (ne_max < 2e6))  # ~ E/(1.5 GeV) charged particles


def test_table_cache_rebuilt_when_corrupt(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FASTSHOWER_CACHE", str(tmp_path))
    tab = air.load_or_build_tables(3.0)
    path = air.table_dir() / f"tables-nb{NB}-dx10.npz"
    assert path.is_file() and tab.n_built >= 5
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp.npz")] == []
    path.write_bytes(b"not a table")
    assert air._load_tables(path, NB) is None
    tab2 = air.load_or_build_tables(3.0)
    np.testing.assert_array_equal(tab.prof[:, : tab.n_built], tab2.prof[:, : tab2.n_built])  # deterministic
    assert air._load_tables(path, NB) is not None
    assert os.environ["FASTSHOWER_CACHE"] == str(tmp_path)
    # how each was got, for the file's worker_tables: built, read, extended; equal content, equal hash
    assert (tab.source, tab2.source, air.load_or_build_tables(3.0).source) == ("built", "built", "cache")
    assert tab.describe(NB, 10.0) == tab2.describe(NB, 10.0) == {**tab.describe(NB, 10.0), "source": "built"}
    more = air.load_or_build_tables(30.0)
    assert more.source == "extended" and more.n_built > tab.n_built
    d = more.describe(NB, 10.0)
    assert d["version"] == f"airshower-tables-v{air.TABLE_VERSION}" and d["grid"] == f"nb{NB}-dx10"
    assert d["n_energies"] == more.n_built and d["e_max_gev"] >= 30.0
    assert d["sha256"] != tab.describe(NB, 10.0)["sha256"]


# --- statistical validation (slow) --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("primary", ["p", "Fe"])
def test_xmax_moments_and_elongation_rate(primary: str) -> None:
    n = 300
    means = []
    for lg in (17, 18, 19):
        x = _run(primary, 10.0**lg, n, seed=100 + lg).truth["xmax"][:, 0]
        (m_lo, m_hi), (r_lo, r_hi) = xmax_acceptance(primary, lg)
        # the window of the published models, widened by 2 statistical sigma of this sample
        m_err, r_err = 2 * x.std() / math.sqrt(n), 2 * x.std() / math.sqrt(2 * n)
        msg = f"{primary} 1e{lg}: <Xmax> {x.mean():.1f} not in [{m_lo}, {m_hi}]"
        assert m_lo - m_err <= x.mean() <= m_hi + m_err, msg
        assert r_lo - r_err <= x.std() <= r_hi + r_err, f"{primary} 1e{lg}: RMS {x.std():.1f} not in [{r_lo}, {r_hi}]"
        means.append(x.mean())
    slope = np.polyfit([17, 18, 19], means, 1)[0]
    assert 50.0 <= slope <= 65.0, f"elongation rate {slope:.1f} g/cm^2 per decade"


@pytest.mark.slow
def test_zenith_dependence_and_calorimetric_energy() -> None:
    n = 150
    vert = _run("p", 1e18, n, zenith=0.0, seed=21)
    incl = _run("p", 1e18, n, zenith=60.0, seed=22)
    xv, xi = vert.truth["xmax"][:, 0], incl.truth["xmax"][:, 0]
    # development in g/cm^2: the slant Xmax barely moves, so the maximum rises in the atmosphere
    assert abs(xi.mean() - xv.mean()) < 15.0 + 3 * math.hypot(xv.std(), xi.std()) / math.sqrt(n)
    # vertical depth of the inclined maximum = X cos(60 deg): about 4 km higher than the vertical one
    assert ATMOSPHERE.height(xi.mean() * 0.5) - ATMOSPHERE.height(xv.mean()) > 3.0e5
    cal = incl.showers[:, :NB].sum(axis=1) * 10.0 / 1e12
    assert 0.85 <= cal.mean() <= 0.92
