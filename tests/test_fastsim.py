"""Fast simulation inside Geant4 (fastshower.montecarlo.fastsim, fastshower.fastsim_model, simulate --fast-sim).

The placement of a model's cells in space and the checks of a request run without Geant4; the Geant4 runs use
tiny VAE runs (3 steps on toy or synthetic showers) whose showers need not be physical: what is tested is that
the file holds exactly the model's showers where the model replaced a particle, and exactly Geant4's where it
did not.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fastshower.cli import main
from fastshower.geometry import CartesianSegmentation, Geometry, PolarSegmentation, get_geometry
from fastshower.io import ShowerBatch, ShowerFile
from fastshower.montecarlo.backend import SimulationError
from fastshower.montecarlo.fastsim import (
    FastSim,
    FastSimHook,
    cartesian_cells,
    check_fast_sim,
    from_shower_frame,
    readout_layer,
)
from fastshower.montecarlo.geant4 import _par04_frame
from fastshower.montecarlo.incidence import Incidence
from fastshower.montecarlo.run import chunk_seed, simulate
from fastshower.training import train
from toy_showers import tiny_geometry

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # multiprocessing notices

SMALL_VAE = {"hparams": {"latent_dim": 4, "hidden": 32, "depth": 1}, "train": {"chunk_rows": 128}}


def _read(path: Path) -> ShowerBatch:
    with ShowerFile(path) as f:
        return f.read()


def _attrs(path: Path) -> dict[str, object]:
    with ShowerFile(path) as f:
        return dict(f.attrs)


def _fs(geometry: Geometry, conds: dict[str, tuple[list[float], list[float]]] | None = None, **kw: object) -> FastSim:
    """A FastSim built by hand (no run behind it): energies 0.5-2.5 GeV, threshold 1 GeV."""
    conds = conds or {}
    base: dict[str, object] = {
        "run": "/runs/x", "run_id": "x", "model": "vae step 3", "geometry": geometry, "particle": "e-",
        "cond_names": tuple(conds), "cond_widths": tuple(len(v[0]) for v in conds.values()), "cond_ranges": conds,
        "energy_range_mev": (500.0, 2500.0), "threshold_mev": 1000.0}
    return FastSim(**{**base, **kw})  # type: ignore[arg-type]


def _direction(theta_deg: float, phi_deg: float) -> tuple[float, float, float]:
    t, p = math.radians(theta_deg), math.radians(phi_deg)
    return (math.sin(t) * math.cos(p), math.sin(t) * math.sin(p), math.cos(t))


# --- placement, without Geant4 ----------------------------------------------------------------------------


def test_shower_frame_inverts_par04s_frame() -> None:
    rng = np.random.default_rng(0)
    q = rng.normal(size=(50, 3)) * [20.0, 20.0, 80.0]
    for theta, phi in ((0.0, 0.0), (30.0, 0.0), (25.0, 140.0), (70.0, -60.0)):
        u, entry = np.array(_direction(theta, phi)), np.array([3.0, -7.0, -76.5])
        w = from_shower_frame(q, entry, u)
        back = np.stack(_par04_frame(w[:, 0], w[:, 1], w[:, 2], tuple(entry), u), axis=1)
        np.testing.assert_allclose(back, q, atol=1e-9)
    # along +z the frame is a shift
    np.testing.assert_allclose(from_shower_frame(q, np.zeros(3), np.array([0.0, 0.0, 1.0])), q, atol=1e-12)


def _hook(fs: FastSim, shower: np.ndarray) -> FastSimHook:
    """A hook whose 'model' returns ``shower`` (V,) for every particle."""
    hook = FastSimHook(fs, lambda e, c, s: np.tile(shower, (len(e), 1)), fs.geometry)
    hook.begin_run(1, 7)
    return hook


def _cartesian_readout(geo: Geometry, pts: np.ndarray, e: np.ndarray) -> np.ndarray:
    """The cells (V,) the points fall in, as the session scores them (front face at z = 0)."""
    row = np.zeros(geo.n_voxels)
    layer = readout_layer(geo, pts[:, 2])
    for li, lay in enumerate(geo.layers):
        m = layer == li
        assert isinstance(lay.segmentation, CartesianSegmentation)
        cells = cartesian_cells(lay.segmentation, pts[m, 0], pts[m, 1])
        np.add.at(row, geo.layer_offsets[li] + cells[cells >= 0], e[m][cells >= 0])
    return row


def test_cartesian_cells_are_kept_moved_or_turned() -> None:
    """tiny-2x4x4 (10 mm cells, layers 20 mm deep): a run with position and angle generates the detector's own
    cells (kept); a run without position made its shower at the centre (moved to the entry point); a run
    without angle made it at normal incidence (turned along the direction about the entry point)."""
    geo = tiny_geometry()
    shower = np.zeros(geo.n_voxels)
    shower[5], shower[16 + 10] = 3.0, 2.0  # layer 0 row 1 column 1; layer 1 row 2 column 2
    ranges = {"position": ([-5.0, -5.0], [5.0, 5.0]), "angle": ([0.0, 0.0], [40.0, 360.0])}
    hook = _hook(_fs(geo, ranges), shower)
    assert hook.replace(2000.0, 3.0, -2.0, _direction(20.0, 30.0))
    pts, e = hook.end_of_event(0)
    np.testing.assert_allclose(_cartesian_readout(geo, pts, e), shower)
    assert hook.truth[0].tolist() == [1, 2000.0, 0]
    moved = _hook(_fs(geo, {"angle": ranges["angle"]}), shower)  # no position: centred shower moved by +10 mm in x
    moved.replace(2000.0, 10.0, 0.0, (0.0, 0.0, 1.0))
    want = np.zeros(geo.n_voxels)
    want[6], want[16 + 11] = 3.0, 2.0
    np.testing.assert_allclose(_cartesian_readout(geo, *moved.end_of_event(0)), want)
    turned = _hook(_fs(geo, {"position": ranges["position"]}, allow_extrapolation=True), shower)
    turned.replace(2000.0, 0.0, 0.0, _direction(45.0, 0.0))  # layer 1's centre is 30 mm deep: +30 mm in x at 45 deg
    pts, _ = turned.end_of_event(0)
    q = np.array([[5.0, 5.0, 30.0]])  # layer 1 cell (row 2, column 2): its centre, 30 mm deep
    np.testing.assert_allclose(pts[1], from_shower_frame(q, np.zeros(3), np.array(_direction(45.0, 0.0)))[0])
    assert pts[1, 0] > 20.0 and pts[1, 2] < 30.0  # towards +x, less deep


def test_polar_cells_follow_the_particle() -> None:
    """par04-ds2: each cell, placed in the particle's frame at its entry point and binned in that same frame,
    lands in its own cell (the Geant4 session bins in the primary's frame; for the primary that is this)."""
    geo = get_geometry("par04-ds2")
    seg = geo.layers[0].segmentation
    assert isinstance(seg, PolarSegmentation)
    rng = np.random.default_rng(1)
    shower = np.where(rng.random(geo.n_voxels) < 0.2, rng.random(geo.n_voxels), 0.0)
    hook = _hook(_fs(geo), shower * geo.energy_scale)
    entry, u = np.array([5.0, -3.0, -76.5]), np.array(_direction(25.0, 40.0))
    hook.front_z = entry[2]
    hook.replace(2000.0, entry[0], entry[1], tuple(u))
    pts, e = hook.end_of_event(0)
    np.testing.assert_allclose(e, shower[shower > 0])  # deposited MeV: the readout scale divided out
    xr, yr, depth = _par04_frame(pts[:, 0], pts[:, 1], pts[:, 2], tuple(entry), u)
    layer = readout_layer(geo, depth)
    ir = np.searchsorted(np.asarray(seg.r_edges), np.hypot(xr, yr), side="right") - 1
    cells = geo.layer_offsets[1] * layer + seg.alpha_bin(xr, yr) * seg.n_r + ir
    np.testing.assert_array_equal(cells, np.flatnonzero(shower > 0))


def test_particles_outside_the_trained_domain_are_tracked_on() -> None:
    """Angles, entry points and energies outside the trained ones (widened by 1 %) are not replaced but counted
    (truth n_outside); phi wraps; allow_extrapolation replaces them all."""
    geo = tiny_geometry()
    ranges = {"angle": ([0.0, -1.0], [30.0, 1.0]), "position": ([-5.0, -5.0], [5.0, 5.0])}
    hook = _hook(_fs(geo, ranges), np.ones(geo.n_voxels))
    assert hook.replace(2000.0, 0.0, 0.0, _direction(30.2, 0.5))
    assert hook.replace(2000.0, 0.0, 0.0, _direction(10.0, 359.5))  # phi -0.5 deg
    assert not hook.replace(2000.0, 0.0, 0.0, _direction(35.0, 0.0))
    assert not hook.replace(2000.0, 0.0, 0.0, _direction(10.0, 90.0))
    assert not hook.replace(2000.0, 6.0, 0.0, _direction(10.0, 0.0))
    assert not hook.replace(2600.0, 0.0, 0.0, _direction(10.0, 0.0))
    hook.end_of_event(0)
    assert hook.truth[0].tolist() == [2, 4000.0, 4]
    free = _hook(_fs(geo, ranges, allow_extrapolation=True), np.ones(geo.n_voxels))
    assert free.replace(2600.0, 6.0, 0.0, _direction(35.0, 90.0))


# --- requests refused before Geant4 starts -------------------------------------------------------------


@pytest.mark.parametrize(("fs_kw", "incidence", "gun_gev", "match"), [
    ({"geometry": get_geometry("belle2-ecl-5x5")}, {}, 2.0, "trained on geometry 'belle2-ecl-5x5', which differs"),
    ({"particle": "pi+"}, {}, 2.0, "trained on pi\\+ showers"),
    ({"cond_names": ("zenith",), "cond_widths": (1,), "cond_ranges": {"zenith": ([0.0], [60.0])}}, {}, 2.0,
     "conditions on \\['zenith'\\]"),
    ({"threshold_mev": 400.0}, {}, 2.0, "threshold 0.4 GeV lies below run x's training energies \\(0.5-2.5 GeV\\)"),
    ({"batch": "shower"}, {}, 2.0, "--fast-sim-batch must be event or particle"),
    ({}, {}, 3.0, "gun energies up to 3 GeV lie above run x's training energies"),
    ({}, {"angle": "0:20"}, 2.0, "no angle condition but the particles enter at angles \\(--angle\\)"),
    ({}, {"upstream": "G4_Pb:5.6mm"}, 2.0, "particles leave the --upstream slab at angles"),
    ({"cond_names": ("angle",), "cond_widths": (2,), "cond_ranges": {"angle": ([0.0, 0.0], [30.0, 360.0])}},
     {"angle": "10:45"}, 2.0, "--angle 10:45 reaches outside run x's trained polar angles 0-30"),
    ({"cond_names": ("position",), "cond_widths": (2,), "cond_ranges": {"position": ([-5.0, -5.0], [5.0, 5.0])}},
     {"position": "0:20,0"}, 2.0, "entry points reach outside run x's trained positions"),
])
def test_bad_requests_are_refused(fs_kw: dict[str, object], incidence: dict[str, str], gun_gev: float,
                                  match: str) -> None:
    from fastshower.montecarlo.backend import BackendOptions

    geo = tiny_geometry()
    kw = dict(fs_kw)
    fs = _fs(kw.pop("geometry", geo), **kw)  # type: ignore[arg-type]
    inc = Incidence.from_options(geo, BackendOptions(extra=incidence))
    with pytest.raises(SimulationError, match=match):
        check_fast_sim(fs, geo, inc, (1000.0, gun_gev * 1e3), smears=False)


def test_extrapolation_is_allowed_with_warnings() -> None:
    from fastshower.montecarlo.backend import BackendOptions

    geo = tiny_geometry()
    fs = _fs(geo, allow_extrapolation=True)
    inc = Incidence.from_options(geo, BackendOptions(extra={"angle": "0:20", "upstream": "G4_Al:1cm"}))
    warnings = check_fast_sim(fs, geo, inc, (1000.0, 3000.0), smears=False)
    assert len(warnings) == 2 and "above run x's training energies" in warnings[0] and "angle" in warnings[1]
    assert fs.options()["allow_extrapolation"] == "true"


# --- inside Geant4 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def belle_run(belle_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny VAE on toy Belle II showers (0.5-2.5 GeV e-, position condition)."""
    return train(belle_file, "vae", tmp_path_factory.mktemp("fastsim") / "belle", steps=3, batch_size=64,
                 progress=False, config=SMALL_VAE)


def _model_showers(run: Path, path: Path, chunk_size: int, seed: int) -> np.ndarray:
    """The run's own showers for each event of ``path`` (one replaced particle per event, the gun's), with the
    noise the fast simulation draws for it: seeded by (chunk's MC seed, event in the chunk, particle 0)."""
    from fastshower.fastsim_model import fast_sim_model, load_generator

    gen = load_generator(fast_sim_model(run))
    b = _read(path)
    out = []
    for i, e in enumerate(b.energies):
        s = np.random.SeedSequence([chunk_seed(seed, i // chunk_size), i % chunk_size, 0])
        conds = {k: v[i:i + 1] for k, v in b.conditions.items()}
        out.append(gen(e[None], conds, s.generate_state(1, dtype=np.uint64))[0])
    return np.array(out)


def test_fast_sim_deposits_the_models_own_showers(belle_run: Path, tmp_path: Path) -> None:
    """belle2-ecl-5x5, 1 GeV e- (no upstream material): the gun's e- is killed at the front face and the file holds
    the run's own shower for its entry point, per event and per particle, with torch and ONNX Runtime."""
    from fastshower.deploy.export import export_onnx
    from fastshower.fastsim_model import fast_sim_model

    onnx = export_onnx(belle_run, tmp_path / "belle.onnx")
    outs = {}
    for name, kw in (("event", {}), ("particle", {"batch": "particle"}), ("onnx", {"onnx_path": onnx})):
        outs[name] = tmp_path / f"{name}.h5"
        simulate("belle2-ecl-5x5", "e-", "1", 4, outs[name], seed=3, chunk_size=2, progress=False,
                 fast_sim=fast_sim_model(belle_run, "0.8GeV", **kw))  # type: ignore[arg-type]
    b = _read(outs["event"])
    assert b.truth["n_fastsim"].ravel().tolist() == [1, 1, 1, 1]
    np.testing.assert_array_equal(b.truth["e_fastsim"].ravel(), 1000.0)
    assert not b.truth["n_outside"].any()
    want = _model_showers(belle_run, outs["event"], 2, 3)
    np.testing.assert_allclose(b.showers, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(_read(outs["particle"]).showers, b.showers, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(_read(outs["onnx"]).showers, b.showers, rtol=1e-3, atol=1e-2)
    attrs = _attrs(outs["event"])
    assert attrs["option_fast_sim_run_id"] == "belle" and attrs["option_fast_sim_threshold_mev"] == "800"
    assert attrs["option_fast_sim_batch"] == "event" and "fast simulation by run belle" in str(attrs["generator"])
    assert str(_attrs(outs["onnx"])["option_fast_sim_inference"]).startswith("onnx ")


def test_below_threshold_is_full_simulation(belle_run: Path, tmp_path: Path) -> None:
    """A threshold above the beam replaces nothing: n_fastsim 0 and, for the same seed, the very showers of
    full simulation (the world's sensitive detector touches neither the tracking nor the random numbers)."""
    from fastshower.fastsim_model import fast_sim_model

    fast, full = tmp_path / "fast.h5", tmp_path / "full.h5"
    simulate("belle2-ecl-5x5", "e-", "1", 4, fast, seed=5, chunk_size=2, progress=False,
             fast_sim=fast_sim_model(belle_run, "2GeV"))
    simulate("belle2-ecl-5x5", "e-", "1", 4, full, seed=5, chunk_size=2, progress=False)
    a, b = _read(fast), _read(full)
    assert not a.truth["n_fastsim"].any() and not a.truth["e_fastsim"].any()
    np.testing.assert_array_equal(a.showers, b.showers)
    assert a.showers.sum(1).min() > 500.0


def test_upstream_particles_are_replaced_one_by_one(belle_run: Path, tmp_path: Path) -> None:
    """2.5 GeV e- through 1 X0 of lead (a run without angles: allow_extrapolation, noted in the provenance): the
    particles that reach the calorimeter above 0.5 GeV are replaced, those below tracked in full."""
    from fastshower.fastsim_model import fast_sim_model

    out = tmp_path / "up.h5"
    simulate("belle2-ecl-5x5", "e-", "2.5", 6, out, seed=2, progress=False, upstream="G4_Pb:5.6mm",
             fast_sim=fast_sim_model(belle_run, "0.5GeV", allow_extrapolation=True))
    b, attrs = _read(out), _attrs(out)
    n, e = b.truth["n_fastsim"].ravel(), b.truth["e_fastsim"].ravel()
    assert n.min() >= 1 and n.max() >= 2, n  # the gun's e- and at least once a bremsstrahlung photon
    assert np.all(e <= 2500.0) and np.all(e >= 500.0 * n) and e.mean() < 2450.0, e
    assert attrs["option_allow_extrapolation"] == "true"
    assert "WARNING extrapolating: run belle has no angle condition" in str(attrs["physics"])


@pytest.fixture(scope="module")
def par04_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny VAE on synthetic par04-ds2 showers at 1, 2 and 5 GeV, energy the only condition."""
    from fastshower.validate.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("par04fs")
    data = write_synthetic(root / "ds2.h5", get_geometry("par04-ds2"), np.resize([1e3, 2e3, 5e3], 300), seed=3)
    return train(data, "vae", root / "ds2", steps=3, batch_size=64, progress=False, config=SMALL_VAE)


def test_polar_mesh_is_placed_along_the_direction(par04_run: Path, tmp_path: Path) -> None:
    """par04-ds2, 2 GeV e- at 20 degrees entering off centre: the run's shower is placed at the entry point along
    the direction and binned by the readout's mesh, which follows the same direction, so every cell lands in
    its own: the file holds the model's showers (its normal-incidence ones, by allow_extrapolation)."""
    from fastshower.fastsim_model import fast_sim_model

    out = tmp_path / "p.h5"
    simulate("par04-ds2", "e-", "2", 3, out, seed=4, progress=False, angle="20", phi="30", position="12,-5",
             fast_sim=fast_sim_model(par04_run, "1GeV", allow_extrapolation=True))
    b = _read(out)
    assert b.truth["n_fastsim"].ravel().tolist() == [1, 1, 1]
    want = _model_showers(par04_run, out, 100, 4)  # the run takes no angle or position: its conditions are E only
    geo = get_geometry("par04-ds2")
    # the file's values pass the deposited-MeV scale and its threshold again: equal above it
    want = geo.to_readout_scale(want / geo.energy_scale)
    np.testing.assert_allclose(b.showers, want, rtol=1e-5, atol=1e-4)


# --- the command line ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--geometry", "calogan-3layer"], "was trained on geometry 'belle2-ecl-5x5', which differs from the simulated "
                                       "calorimeter 'calogan-3layer'"),
    (["--angle", "0:30"], "has no angle condition but the particles enter at angles (--angle); its normal-incidence "
                          "showers are turned along their directions; pass --allow-extrapolation to run anyway"),
    (["--upstream", "G4_Pb:5.6mm"], "particles leave the --upstream slab at angles"),
    (["--fast-sim-threshold", "200MeV"], "--fast-sim-threshold 0.2 GeV lies below run belle's training energies"),
    (["--upstream", "G4_Nope:5mm", "--allow-extrapolation"], "unknown --upstream material 'G4_Nope'"),
    (["--energy", "5"], "gun energies up to 5 GeV lie above run belle's training energies"),
    (["--fast-sim", "/nonexistent/run"], "no such run folder"),
    (["--fast-sim-onnx", "/nonexistent.onnx"], "no such ONNX file"),
])
def test_cli_refuses_in_one_line_before_geant4(belle_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               args: list[str], message: str) -> None:
    base = {"--geometry": "belle2-ecl-5x5", "--particle": "e-", "--energy": "1", "--n": "2",
            "--out": str(tmp_path / "x.h5"), "--fast-sim": str(belle_run)}
    flags = [a for a in args if a == "--allow-extrapolation"]
    pairs = [a for a in args if a not in flags]
    given = dict(zip(pairs[::2], pairs[1::2], strict=True))
    rc = main(["simulate", *[x for k, v in {**base, **given}.items() for x in (k, v)], *flags, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x.h5").exists()


def test_cli_fast_sim_options_need_fast_sim(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["simulate", "--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "1", "--n", "2",
               "--out", str(tmp_path / "x.h5"), "--fast-sim-threshold", "1GeV", "--quiet"])
    assert rc == 2 and "--fast-sim-threshold need(s) --fast-sim RUN" in capsys.readouterr().err


def test_trained_ranges_are_the_simulated_ones(tmp_path: Path) -> None:
    """A run on a file simulated with --angle 0:30 --position=-10:10,5 was trained for 0-30 degrees and x in
    -10..10 mm, not just the values its few showers happened to span (a gun at 0:30 is then not refused)."""
    from fastshower.fastsim_model import trained_ranges
    from fastshower.runs import load_run

    data = tmp_path / "a.h5"
    simulate("belle2-ecl-5x5", "e-", "0.5:1", 12, data, seed=1, progress=False, angle="0:30", position="-10:10,5")
    run = train(data, "vae", tmp_path / "run", steps=2, batch_size=8, progress=False, config=SMALL_VAE)
    info = load_run(run).info
    seen, trained = info.cond_ranges, trained_ranges(info)
    assert seen["angle"][0][0] > 0.0 and trained["angle"] == ([0.0, 0.0], [30.0, 360.0])
    assert trained["position"] == ([-10.0, 5.0], [10.0, 5.0])
    data.unlink()  # the file gone: the values seen
    assert trained_ranges(info) == {k: (list(a), list(b)) for k, (a, b) in seen.items()}


def test_sampler_options_are_checked_in_the_calling_process(belle_run: Path) -> None:
    from fastshower.fastsim_model import fast_sim_model
    from fastshower.sampling import GenerationError

    with pytest.raises(GenerationError, match="takes no sampling option"):
        fast_sim_model(belle_run, sample_options={"steps": 4})
    with pytest.raises(GenerationError, match="--fast-sim-batch must be event or particle"):
        fast_sim_model(belle_run, batch="shower")
