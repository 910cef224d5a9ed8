"""Substitute Geant4 EM tables: formats, physics content, caching, missing-data errors."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

xraylib = pytest.importorskip("xraylib")

from fastshower.montecarlo import g4data  # noqa: E402
from fastshower.montecarlo.g4data import (  # noqa: E402
    Geant4DataError,
    elements_of,
    read_brem_table,
    read_physics_vector,
    resolve_data,
)


@pytest.fixture()
def no_official(monkeypatch, tmp_path):
    """No official Geant4 data anywhere: no GEANT4_DATA_DIR, no G4*DATA, empty HOME."""
    monkeypatch.delenv("GEANT4_DATA_DIR", raising=False)
    for _, var in g4data.OFFICIAL_DATASETS.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_elements_of():
    assert elements_of(["G4_W", "G4_Si"]) == {74, 14}
    assert elements_of(["G4_CESIUM_IODIDE", "G4_Galactic"]) == {53, 55, 1}
    assert elements_of(["G4_Pb", "G4_lAr", "G4_AIR"]) == {82, 18, 6, 7, 8}
    with pytest.raises(Geant4DataError, match="G4_UNOBTAINIUM"):
        elements_of(["G4_UNOBTAINIUM"])


def test_build_is_fast_and_cached(no_official):
    cache = no_official / "cache"
    t0 = time.perf_counter()
    info = resolve_data([74], "substitute", cache_dir=cache)
    dt = time.perf_counter() - t0
    assert dt < 20.0, f"building tables for W took {dt:.1f} s"
    assert info.mode == "substitute" and "substitute" in info.provenance
    root = info.root
    assert root == cache / "g4data-substitute-v1"
    man = json.loads((root / "MANIFEST.json").read_text())
    assert 74 in man["elements"] and man["files"]
    assert (root / "G4ENSDFSTATE3.0" / "ENSDFSTATE.dat").is_file()
    assert (root / "PhotonEvaporation6.1.2").is_dir()
    assert info.env["G4LEDATA"] == str(root / "G4EMLOW8.8")
    # reused as is
    mtime = (root / "MANIFEST.json").stat().st_mtime_ns
    assert resolve_data([74], "substitute", cache_dir=cache).root == root
    assert (root / "MANIFEST.json").stat().st_mtime_ns == mtime
    # a new element extends the tree and keeps the old ones
    resolve_data([14], "substitute", cache_dir=cache)
    man = json.loads((root / "MANIFEST.json").read_text())
    assert {14, 74} <= set(man["elements"])
    # an incomplete tree is rebuilt
    (root / "G4EMLOW8.8" / "brem_SB" / "br74").unlink()
    resolve_data([74], "substitute", cache_dir=cache)
    assert (root / "G4EMLOW8.8" / "brem_SB" / "br74").is_file()
    assert not list(cache.glob(".g4data-substitute-v1-*"))  # no temporary folders left


def test_brem_table_matches_complete_screening(no_official):
    root = resolve_data([74], "substitute", cache_dir=no_official / "c").root
    kappa, log_t, chi = read_brem_table(root / "G4EMLOW8.8" / "brem_SB" / "br74")
    assert chi.shape == (len(log_t), len(kappa)) and np.all(chi >= 0) and np.all(np.diff(log_t) > 0)
    assert math.isclose(math.exp(log_t[-1]), 1e4, rel_tol=1e-6)  # up to 10 GeV
    # complete screening Bethe-Heitler (Tsai): k dsigma/dk = 4 alpha r_e^2 Z^2
    #   [(4/3)(1-y) + y^2] [L_el - f_c + L_inel/Z] + (1-y)(1+1/Z)/9 ... written with C = 16/3 alpha r_e^2
    z = 74
    t = math.exp(log_t[-1])
    me = 0.51099895
    alpha, re = 7.2973525693e-3, 2.8179403262e-13
    lel = math.log(184.15) - math.log(z) / 3
    linel = math.log(1194.0) - 2 * math.log(z) / 3
    a2 = (alpha * z) ** 2
    fc = a2 * (1 / (1 + a2) + 0.20206 - 0.0369 * a2 + 0.0083 * a2**2 - 0.002 * a2**3)
    beta2 = t * (t + 2 * me) / (t + me) ** 2
    for i in np.nonzero((kappa > 0.05) & (kappa < 0.9))[0]:
        y = kappa[i] * t / (t + me)
        k_dsdk = 4 * alpha * re**2 * z**2 * (
            (4 / 3 * (1 - y) + y * y) * (lel - fc + linel / z) + (1 - y) * (1 + 1 / z) / 9
        )
        expected_mb = beta2 / z**2 * k_dsdk / 1e-27
        assert chi[-1, i] == pytest.approx(expected_mb, rel=0.03), kappa[i]
    # radiation length from the table: integral of chi over kappa at 10 GeV gives E/X0 for W
    # (X0(W) = 6.76 g/cm^2 in the PDG tables)
    n_per_g = 0.602214076e24 / 183.84
    srad = n_per_g * z**2 / beta2 * t * np.trapezoid(chi[-1], kappa) * 1e-27  # MeV cm^2/g
    assert t / srad == pytest.approx(6.76, rel=0.04)


def test_photo_and_rayleigh_tables_follow_xraylib(no_official):
    root = resolve_data([74], "substitute", cache_dir=no_official / "c").root
    phot = root / "G4EMLOW8.8" / "epics2017" / "phot"
    conv = xraylib.AtomicWeight(74) / 0.602214076  # cm^2/g -> barn
    e, v = read_physics_vector(phot / "pe-cs-74.dat")  # sigma E^3 above the K edge
    assert e[0] == pytest.approx(xraylib.EdgeEnergy(74, xraylib.K_SHELL) * 1e-3, rel=1e-4)
    sigma_100 = np.interp(0.1, e, v) / 0.1**3
    assert sigma_100 == pytest.approx(xraylib.CS_Photo(74, 100.0) * conv, rel=0.02)
    e, v = read_physics_vector(phot / "pe-le-cs-74.dat")  # below the K edge
    sigma_30 = np.interp(0.03, e, v) / 0.03**3
    assert sigma_30 == pytest.approx(xraylib.CS_Photo(74, 30.0) * conv, rel=0.02)
    hdr = (phot / "pe-high-74.dat").read_text().split()
    n_shells = int(hdr[0])
    assert n_shells > 10 and float(hdr[3]) == pytest.approx(0.069525, rel=1e-3)  # K binding, MeV
    e, v = read_physics_vector(root / "G4EMLOW8.8" / "epics2017" / "rayl" / "re-cs-74.dat")
    sig_mm2 = np.interp(0.1, e, v) / 0.1**2
    assert sig_mm2 / 1e-22 == pytest.approx(xraylib.CS_Rayl(74, 100.0) * conv, rel=0.02)


def test_hadronic_without_official_data_fails_clearly(no_official):
    with pytest.raises(Geant4DataError) as err:
        resolve_data([82, 18], "auto", cache_dir=no_official / "c", hadronic=True)
    msg = str(err.value)
    assert "G4PARTICLEXS" in msg and "GEANT4_DATA_DIR" in msg and "FTFP_BERT" in msg
    with pytest.raises(Geant4DataError, match="G4EMLOW"):
        resolve_data([74], "official", cache_dir=no_official / "c")


def test_official_data_found_when_present(no_official, monkeypatch):
    root = no_official / "g4data"
    (root / "G4EMLOW8.8" / "brem_SB").mkdir(parents=True)
    (root / "G4EMLOW8.8" / "brem_SB" / "br1").write_text("x")
    (root / "G4EMLOW8.8" / "epics2017").mkdir()
    (root / "G4ENSDFSTATE3.0").mkdir()
    (root / "G4ENSDFSTATE3.0" / "ENSDFSTATE.dat").write_text("x")
    (root / "PhotonEvaporation6.1.2").mkdir()
    (root / "PhotonEvaporation6.1.2" / "z1.a2").write_text("x")
    monkeypatch.setenv("GEANT4_DATA_DIR", str(root))
    info = resolve_data([74], "auto", cache_dir=no_official / "c")
    assert info.mode == "official" and info.provenance == "geant4 11.4 official data"
    assert info.env["G4LEDATA"] == str(root / "G4EMLOW8.8")
    with pytest.raises(Geant4DataError, match="G4PARTICLEXS"):
        resolve_data([74], "auto", cache_dir=no_official / "c", hadronic=True)


def test_apply_environment(monkeypatch, no_official):
    info = resolve_data([14], "substitute", cache_dir=no_official / "c")
    for k in info.env:
        monkeypatch.delenv(k, raising=False)
    g4data.apply_environment(info)
    import os

    assert os.environ["GEANT4_DATA_DIR"] == str(info.root)
    assert Path(os.environ["G4LEDATA"]).is_dir()


def test_missing_data_reaches_the_caller_of_simulate_unwrapped(no_official):
    """check_request lets Geant4DataError through: one FastshowerError base, message unchanged."""
    from fastshower.errors import FastshowerError
    from fastshower.montecarlo.run import simulate

    with pytest.raises(Geant4DataError, match="G4EMLOW") as err:
        simulate("belle2-ecl-5x5", "e-", "1", 5, no_official / "x.h5", physics="official", progress=False)
    assert isinstance(err.value, FastshowerError) and isinstance(err.value, RuntimeError)
    assert not (no_official / "x.h5").exists()
