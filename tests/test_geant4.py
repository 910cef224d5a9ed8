"""Geant4 backend: showers in the built-in detectors (each case in its own process).

Geant4 can be initialised once per process and aborts its process on a fatal error, so
every case runs ``python -c`` in a subprocess that writes its arrays to an .npz file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fastshower.geometry import get_geometry

# never import geant4_pybind here: its import starts a data downloader unless GEANT4_DATA_DIR is set
if importlib.util.find_spec("geant4_pybind") is None or importlib.util.find_spec("xraylib") is None:
    pytest.skip("geant4_pybind and xraylib are needed", allow_module_level=True)

_WORKER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from fastshower.geometry import get_geometry
    from fastshower.montecarlo.geant4 import Geant4Session
    args = json.loads(sys.argv[1])
    geo = get_geometry(args["geometry"])
    s = Geant4Session(geo, args["particle"])
    out = {}
    rng = np.random.default_rng(0)
    for i, job in enumerate(args["runs"]):
        n = job["n"]
        e = np.full(n, job["energy"])
        pos = np.asarray(job.get("pos", [0.0, 0.0]), dtype=float)[None, :].repeat(n, 0)
        t = time.perf_counter()
        out[f"run{i}"] = s.run(e, pos, job["seed"])
        out[f"sec{i}"] = np.array(time.perf_counter() - t)
    if args.get("xs"):
        import geant4_pybind as g4
        calc = g4.G4EmCalculator()
        for mat, e_mev in args["xs"]:
            out[f"phot_{mat}_{e_mev}"] = np.array(
                calc.ComputeCrossSectionPerVolume(e_mev, "gamma", "phot", mat))
        del calc  # an EM calculator alive at interpreter exit corrupts Geant4's teardown
    np.savez(args["out"], **out)
    """
)


def run_geant4(tmp_path: Path, geometry: str, particle: str, runs: list[dict], xs=None, timeout=600):
    out = tmp_path / f"{geometry}.npz"
    args = {"geometry": geometry, "particle": particle, "runs": runs, "out": str(out), "xs": xs or []}
    env = dict(os.environ)
    env.setdefault("FASTSHOWER_CACHE", str(Path(os.environ.get("FASTSHOWER_TEST_CACHE", tmp_path)) / "cache"))
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, json.dumps(args)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One substitute-table cache for the whole module (tables are built once)."""
    d = tmp_path_factory.mktemp("g4cache")
    old = os.environ.get("FASTSHOWER_TEST_CACHE")
    os.environ["FASTSHOWER_TEST_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("FASTSHOWER_TEST_CACHE", None)
    else:
        os.environ["FASTSHOWER_TEST_CACHE"] = old


def test_belle2_single_electron_and_reproducibility(tmp_path, shared_cache):
    from fastshower.geometry import get_geometry

    geo = get_geometry("belle2-ecl-5x5")
    r = run_geant4(
        tmp_path, "belle2-ecl-5x5", "e-",
        [{"n": 4, "energy": 1000.0, "seed": 7}, {"n": 2, "energy": 1000.0, "seed": 8},
         {"n": 4, "energy": 1000.0, "seed": 7}],
        xs=[["G4_CESIUM_IODIDE", 0.1]],
    )
    a, b, c = r["run0"], r["run1"], r["run2"]
    assert a.dtype == np.float32 and a.shape == (4, geo.n_voxels)
    tot = a.sum(1)
    assert np.all((tot > 800.0) & (tot < 1000.0)), tot
    assert np.all(a[:, 12] > 0.6 * tot)  # centre crystal (row 2, column 2)
    # the same seed gives the same showers, whatever ran before in the process
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a[:2], b)
    # Geant4 reads the photo-effect cross section that was written (CsI at 100 keV vs xraylib)
    import xraylib

    mu_xrl = 4.51 * (xraylib.CS_Photo(53, 100.0) * 126.904 + xraylib.CS_Photo(55, 100.0) * 132.905) / (
        126.904 + 132.905)  # 1/cm
    assert r["phot_G4_CESIUM_IODIDE_0.1"] * 10 == pytest.approx(mu_xrl, rel=0.03)


def test_tungsten_photo_effect_read_back_and_polar_binning(tmp_path, shared_cache):
    from fastshower.geometry import get_geometry

    geo = get_geometry("par04-ds2")
    r = run_geant4(
        tmp_path, "par04-ds2", "e-",
        [{"n": 3, "energy": 1000.0, "seed": 3, "pos": [12.0, -5.0]}],
        xs=[["G4_W", 0.1]],
    )
    import xraylib

    mu_w = 19.3 * xraylib.CS_Photo(74, 100.0)
    assert r["phot_G4_W_0.1"] * 10 == pytest.approx(mu_w, rel=0.03)
    out = r["run0"]
    assert out.shape == (3, geo.n_voxels)
    seg = geo.layers[0].segmentation
    per_r = out.reshape(3, geo.n_layers, seg.n_alpha, seg.n_r).sum(axis=(0, 1, 2))
    frac = per_r / per_r.sum()
    # cells are centred on the entry point (12, -5): a pencil shower sits in the first bins
    assert frac[:2].sum() > 0.6 and frac[0] > frac[-1], frac
    si_fraction = out.sum() / 3 / 1000.0
    assert 0.01 < si_fraction < 0.06
    # alpha bins share the energy roughly evenly (no preferred direction)
    per_a = out.reshape(3, geo.n_layers, seg.n_alpha, seg.n_r).sum(axis=(0, 1, 3))
    assert per_a.min() > 0.2 * per_a.mean()


def test_calogan_layer_fractions(tmp_path, shared_cache):
    from fastshower.geometry import get_geometry

    geo = get_geometry("calogan-3layer")
    r = run_geant4(tmp_path, "calogan-3layer", "e+", [{"n": 3, "energy": 10000.0, "seed": 1}])
    out = r["run0"]
    tot = out.sum(1)
    assert np.all(tot > 0.95 * 10000.0)  # absorber + active scored: total ~ E
    f = np.array([out[:, geo.layer_slice(i)].sum() for i in range(3)]) / tot.sum()
    assert 0.1 < f[0] < 0.5 and f[1] > 0.5 and f[2] < 0.05, f


@pytest.mark.slow
def test_ild_sampling_fraction_flat(tmp_path, shared_cache):
    r = run_geant4(
        tmp_path, "ild-siw-30", "gamma",
        [{"n": 20, "energy": 10000.0, "seed": 1}, {"n": 8, "energy": 50000.0, "seed": 2}],
    )
    f10 = r["run0"].sum(1).mean() / 10000.0
    f50 = r["run1"].sum(1).mean() / 50000.0
    assert 0.005 < f10 < 0.03 and 0.005 < f50 < 0.03, (f10, f50)
    # The raw Si fraction falls ~10 % from 10 to 50 GeV: deeper showers reach layers 21-30, which have twice
    # the tungsten per Si layer. Weighting each layer by its tungsten thickness (ILD's own calibration) makes
    # the response of a sampling calorimeter flat: that is the physics fact to check.
    geo = get_geometry("ild-siw-30")
    weights = np.repeat([layer.absorber_thickness / 2.1 for layer in geo.layers], geo.layer_sizes)
    w10 = (r["run0"] @ weights).mean() / 10000.0
    w50 = (r["run1"] @ weights).mean() / 50000.0
    assert abs(w50 / w10 - 1) < 0.10, (w10, w50, f10, f50)


@pytest.mark.slow
def test_belle2_containment_many_events(tmp_path, shared_cache):
    r = run_geant4(tmp_path, "belle2-ecl-5x5", "e-", [{"n": 100, "energy": 1000.0, "seed": 11}])
    frac = r["run0"].sum(1).mean() / 1000.0
    assert 0.85 < frac < 1.0, frac


def test_pions_need_official_data(monkeypatch, tmp_path):
    from fastshower.geometry import get_geometry
    from fastshower.montecarlo import g4data
    from fastshower.montecarlo.g4data import Geant4DataError
    from fastshower.montecarlo.geant4 import Geant4Session

    monkeypatch.delenv("GEANT4_DATA_DIR", raising=False)
    for _, var in g4data.OFFICIAL_DATASETS.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(Geant4DataError, match="G4PARTICLEXS"):
        Geant4Session(get_geometry("calogan-3layer"), "pi+")
