"""Incidence angle, entry point and upstream material of the Geant4 gun (fastshower.montecarlo.incidence).

The Geant4 runs are tiny (a few showers, seconds each): their assertions are physical effects far larger
than the fluctuation of a few showers, at fixed seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fastshower import simulate
from fastshower.cli import main
from fastshower.geometry import CartesianSegmentation, PolarSegmentation, get_geometry
from fastshower.io import ShowerBatch, ShowerFile
from fastshower.montecarlo.backend import BackendOptions, SimulationError
from fastshower.montecarlo.calorimeter import Geant4Backend
from fastshower.montecarlo.incidence import Incidence, directions, parse_upstream
from fastshower.montecarlo.run import chunk_plan

SMALL_TOML = 'model = "flow-matching"\n[hparams]\nhidden = 16\ndepth = 1\nemb_dim = 8\nsteps = 2\nwarmup = 2\n'


def _read(path: Path) -> ShowerBatch:
    with ShowerFile(path) as f:
        return f.read()


def _x_centres(path: Path) -> list[float]:
    """Energy-weighted mean x (mm) of each cartesian layer, over all showers of the file."""
    b = _read(path)
    geo = get_geometry("calogan-3layer")
    out = []
    for li, layer in enumerate(geo.layers):
        assert isinstance(layer.segmentation, CartesianSegmentation)
        e = b.showers[:, geo.layer_slice(li)].sum(0)
        out.append(float(e @ layer.segmentation.cell_centres()[:, 0] / e.sum()))
    return out


@pytest.mark.parametrize("args, message", [
    (["--upstream", "G4_Unobtainium:5mm"], "unknown --upstream material 'G4_Unobtainium'"),
    (["--upstream", "G4_Pb"], "bad --upstream 'G4_Pb': expected MATERIAL:THICKNESS"),
    (["--upstream", "G4_Pb:5.6"], "bad --upstream thickness '5.6'"),
    (["--upstream", "G4_Pb:-1mm"], "bad --upstream thickness '-1mm'"),
    (["--angle", "95"], "--angle '95' must lie in [0, 90) degrees"),
    (["--angle", "0:90"], "--angle '0:90' must lie in [0, 90) degrees"),
    (["--angle=-5:10"], "--angle '-5:10' must lie in [0, 90) degrees"),
    (["--angle", "ten"], "cannot read --angle 'ten'"),
    (["--position=-200:0,0"], "--position '-200:0,0' lies outside the front face of belle2-ecl-5x5"),
    (["--position", "1,2,3"], "bad --position '1,2,3'"),
    (["--phi", "0:90"], "--phi needs --angle"),
    (["--zenith", "30"], "--zenith and --azimuth are for air showers"),
])
def test_bad_input_exits_2_with_one_line(args: list[str], message: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.h5"
    rc = main(["simulate", "--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "1", "--n", "2",
               "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and message in err, err
    assert not out.exists()  # refused before any worker (Geant4) started


def test_air_showers_refuse_calorimeter_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["simulate", "--geometry", "airshower-profile", "--particle", "p", "--energy", "1e17eV", "--n", "2",
               "--out", str(tmp_path / "a.h5"), "--quiet", "--angle", "30", "--upstream", "G4_Pb:1mm"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--angle, --upstream: calorimeters only" in err, err


def test_parsing_and_drawing() -> None:
    assert parse_upstream("G4_Pb:5.6mm") == ("G4_Pb", 5.6)
    assert parse_upstream("G4_Al:2cm") == ("G4_Al", 20.0)
    geo = get_geometry("calogan-3layer")
    inc = Incidence.from_options(geo, BackendOptions(extra={"angle": "0:30", "position": "-10:10,5"}))
    drawn = inc.draw(np.random.default_rng(0), 1000)
    a, p = drawn["angle"], drawn["position"]
    assert a.shape == (1000, 2) and p.shape == (1000, 2)
    assert a[:, 0].min() >= 0 and a[:, 0].max() <= 30 and a[:, 0].std() > 5
    assert a[:, 1].min() >= 0 and a[:, 1].max() <= 360 and a[:, 1].std() > 50  # phi defaults to 0:360
    assert np.abs(p[:, 0]).max() <= 10 and p[:, 0].std() > 3 and np.all(p[:, 1] == 5)
    u = directions(np.array([[0.0, 0.0], [30.0, 0.0], [30.0, 90.0]]))
    np.testing.assert_allclose(u, [[0, 0, 1], [0.5, 0, 0.75 ** 0.5], [0, 0.5, 0.75 ** 0.5]], atol=1e-12)


def test_conditions_are_seeded_per_chunk() -> None:
    """The same seed gives the same angles and positions; the crystal array keeps its old position draw first."""
    from fastshower.energy import parse_energy

    geo = get_geometry("belle2-ecl-5x5")
    spec = parse_energy("1:2")
    opts = BackendOptions(extra={"angle": "0:30", "phi": "0:360"})
    e1, c1, s1 = chunk_plan(spec, Geant4Backend, geo, opts, 7, 3, 50)
    e2, c2, s2 = chunk_plan(spec, Geant4Backend, geo, opts, 7, 3, 50)
    _, c3, _ = chunk_plan(spec, Geant4Backend, geo, opts, 8, 3, 50)
    assert Geant4Backend.condition_widths(geo, opts) == {"position": 2, "angle": 2}
    assert s1 == s2 and np.array_equal(e1, e2)
    assert all(np.array_equal(c1[k], c2[k]) for k in ("angle", "position"))
    assert not np.array_equal(c1["angle"], c3["angle"])
    _, plain, _ = chunk_plan(spec, Geant4Backend, geo, BackendOptions(), 7, 3, 50)
    np.testing.assert_array_equal(plain["position"], c1["position"])  # files without angles are unchanged


def test_tilted_shower_moves_along_the_tilt(tmp_path: Path) -> None:
    """calogan-3layer, 5 e- at 10 GeV: at 30 degrees towards +x the centre of energy of each layer moves to +x by
    about tan(30) x its depth (measured: 38, 81, 121 mm; about 0 at normal incidence); cells stay fixed."""
    for angle in ("0", "30"):
        simulate("calogan-3layer", "e-", "10", 5, tmp_path / f"a{angle}.h5", seed=1, progress=False,
                 angle=angle, phi="0")
    b = _read(tmp_path / "a30.h5")
    assert b.conditions["angle"].shape == (5, 2) and np.all(b.conditions["angle"] == [30.0, 0.0])
    assert "position" not in b.conditions  # no entry point asked for: the centre
    straight, tilted = _x_centres(tmp_path / "a0.h5"), _x_centres(tmp_path / "a30.h5")
    assert abs(straight[0]) < 5 and abs(straight[1]) < 10
    assert tilted[0] > 20 and tilted[1] > 60 and tilted[2] > 90
    assert tilted[2] > tilted[1] > tilted[0]


def test_polar_mesh_follows_the_direction(tmp_path: Path) -> None:
    """par04-ds2, 5 e- at 1 GeV, 30 degrees, entering off centre: Par04's mesh is along the momentum from the
    entry point, so the transverse centre of energy stays near the axis (a fixed mesh would see it ~25 mm off)."""
    out = tmp_path / "p.h5"
    simulate("par04-ds2", "e-", "1", 5, out, seed=1, progress=False, angle="30", phi="0", position="20,-10")
    geo = get_geometry("par04-ds2")
    seg = geo.layers[0].segmentation
    assert isinstance(seg, PolarSegmentation)
    b = _read(out)
    assert np.all(b.conditions["position"] == [20.0, -10.0])
    s = b.showers.reshape(5, len(geo.layers), seg.n_alpha, seg.n_r).sum((0, 1))
    a, r = seg.alpha_centres()[:, None], seg.r_centres()[None, :]
    cx, cy = float((s * np.cos(a) * r).sum() / s.sum()), float((s * np.sin(a) * r).sum() / s.sum())
    assert abs(cx) < 3 and abs(cy) < 3, (cx, cy)
    assert b.showers.sum(1).mean() > 0.7e3  # the shower is inside the mesh, not cut off by it


def test_upstream_lead_lowers_the_visible_energy(tmp_path: Path) -> None:
    """belle2-ecl-5x5, 20 e- at 1 GeV: 1 X0 of lead 20 mm upstream absorbs and spreads the shower's start
    (measured with 10 showers: 0.969 -> 0.952 of E_inc, per-shower spread 0.015)."""
    fractions = []
    for upstream in (None, "G4_Pb:5.6mm"):
        out = tmp_path / f"u{upstream is not None}.h5"
        simulate("belle2-ecl-5x5", "e-", "1", 20, out, seed=1, progress=False, upstream=upstream)
        fractions.append(float((_read(out).showers.sum(1) / 1000.0).mean()))
        with ShowerFile(out) as f:
            if upstream:
                assert f.attrs["option_upstream"] == upstream and "upstream 5.6 mm G4_Pb" in f.attrs["physics"]
    assert fractions[1] < fractions[0] - 0.008, fractions


def test_angled_file_trains_and_generates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """simulate --angle writes conditions/angle; a model trains on it and generates at a given angle."""
    data, run, gen, cfg = tmp_path / "a.h5", tmp_path / "run", tmp_path / "g.h5", tmp_path / "small.toml"
    cfg.write_text(SMALL_TOML)
    assert main(["simulate", "--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "0.5:1", "--n", "40",
                 "--out", str(data), "--angle", "0:30", "--quiet", "--seed", "3"]) == 0
    with pytest.raises(SimulationError):  # the Python API refuses what the CLI refuses
        simulate("belle2-ecl-5x5", "e-", "1", 2, tmp_path / "bad.h5", angle="90", progress=False)
    assert main(["train", "--data", str(data), "--out", str(run), "--config", str(cfg), "--steps", "3",
                 "--batch-size", "16", "--quiet"]) == 0
    assert main(["generate", "--run", str(run), "--n", "10", "--energy", "0.7", "--condition", "angle=20,45",
                 "--out", str(gen), "--quiet"]) == 0
    b = _read(gen)
    np.testing.assert_array_equal(b.conditions["angle"], np.tile([20.0, 45.0], (10, 1)))
    assert b.conditions["position"].shape == (10, 2) and np.isfinite(b.showers).all()
    capsys.readouterr()


def test_resume_keeps_the_incidence(tmp_path: Path) -> None:
    """A resumed file continues with its own angles and upstream slab; other ones would mix two set-ups."""
    from fastshower.io import ShowerFileError

    out = tmp_path / "r.h5"
    kw = {"seed": 4, "chunk_size": 2, "progress": False, "angle": "0:30", "upstream": "G4_Al:1cm"}
    simulate("belle2-ecl-5x5", "e-", "1", 2, out, **kw)  # type: ignore[arg-type]
    with pytest.raises(ShowerFileError, match=r"made with angle=0:30, upstream=G4_Al:1cm, not angle=0:60, "):
        simulate("belle2-ecl-5x5", "e-", "1", 4, out, resume=True, **{**kw, "angle": "0:60"})  # type: ignore[arg-type]
    with pytest.raises(ShowerFileError, match=r"made with angle=0:30, upstream=G4_Al:1cm, not no options"):
        simulate("belle2-ecl-5x5", "e-", "1", 4, out, resume=True, seed=4, progress=False)
    simulate("belle2-ecl-5x5", "e-", "1", 4, out, resume=True, **kw)  # type: ignore[arg-type]
    b = _read(out)
    assert b.conditions["angle"].shape == (4, 2) and b.conditions["angle"][:, 0].max() <= 30


def test_grazing_angles_behind_a_slab_run(tmp_path: Path) -> None:
    """Up to 89.9 degrees behind an upstream slab, the world still holds the gun's start (no Geant4 failure)."""
    out = tmp_path / "g.h5"
    simulate("calogan-3layer", "e-", "1", 3, out, seed=2, progress=False, angle="85:89.9", upstream="G4_Fe:1cm",
             position="-100:100,-50:50")
    b = _read(out)
    assert b.conditions["angle"][:, 0].min() >= 85 and b.conditions["angle"][:, 0].max() <= 89.9
    assert np.all(np.abs(b.conditions["position"][:, 0]) <= 100) and np.isfinite(b.showers).all()
    assert (b.showers.sum(1) > 0).all()  # each primary started inside the world and reached the calorimeter
