"""File conventions of the par04 geometries: CaloChallenge angular bins and energy scale, old files converted.

The CaloChallenge binning files (``tests/data/binning_dataset_{2,3}.xml``, written here in the official
layout) put angular bin k at [-180 + k w, -180 + (k+1) w) deg with alpha = atan2(y, x), and the challenge's
``XMLHandler`` places cell centres at the radial and angular midpoints, radial bins fastest. Files of
fastshower 0.1 binned alpha from 0 deg and held deposited MeV: ``convert --layout fastshower-0.1`` moves them
onto the current conventions.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest

from fastshower.cli import main
from fastshower.geometry import (
    Geometry,
    PolarSegmentation,
    alpha_permutation,
    convention_difference,
    geometry_from_json,
    get_geometry,
    read_calochallenge_binning,
)
from fastshower.io import (
    ShowerBatch,
    ShowerFile,
    ShowerFileError,
    ShowerWriter,
    convert_conventions,
    merge_files,
    write_showers,
)

DATA = Path(__file__).parent / "data"
SCALE = 1 / 0.033  # CaloChallenge datasets 2 and 3: stored value = silicon MeV / sampling fraction


def _xmlhandler_centres(xml: Path) -> list[np.ndarray]:
    """Cell centres (n_cells, 2) in mm per layer with cells, computed as the CaloChallenge XMLHandler does."""
    out = []
    for particle in ET.parse(xml).getroot():
        for layer in particle:
            edges = np.array([float(v) for v in layer.get("r_edges", "").split(",")])
            if len(edges) < 2:
                continue
            n_alpha = int(layer.get("n_bin_alpha", "1"))
            r_mid = 0.5 * (edges[1:] + edges[:-1])
            a_edges = np.linspace(-math.pi, math.pi, n_alpha + 1)
            a_mid = 0.5 * (a_edges[1:] + a_edges[:-1])
            out.append(np.array([(r * math.cos(a), r * math.sin(a)) for a in a_mid for r in r_mid]))
    return out


def _old_convention(name: str) -> Geometry:
    """The geometry as a fastshower 0.1 file stores it: no alpha_min_deg, energy_scale or threshold keys."""
    d = json.loads(get_geometry(name).to_json())
    for key in ("energy_scale", "voxel_threshold_mev"):
        del d[key]
    for layer in d["layers"]:
        del layer["segmentation"]["alpha_min_deg"]
    return geometry_from_json(d)


def _seg(g: Geometry, i: int) -> PolarSegmentation:
    seg = g.layers[i].segmentation
    assert isinstance(seg, PolarSegmentation)
    return seg


@pytest.mark.parametrize(("ds", "n_r", "n_alpha"), [(2, 9, 16), (3, 18, 50)])
def test_registry_cell_centres_are_the_calochallenge_ones(ds: int, n_r: int, n_alpha: int) -> None:
    xml = DATA / f"binning_dataset_{ds}.xml"
    expected = _xmlhandler_centres(xml)
    registry, read = get_geometry(f"par04-ds{ds}"), read_calochallenge_binning(xml)
    assert len(expected) == registry.n_layers == read.n_layers == 45
    assert registry.n_voxels == read.n_voxels == 45 * n_r * n_alpha
    assert read.particles == ("e-",)
    for i, centres in enumerate(expected):
        assert centres.shape == (n_r * n_alpha, 2)
        np.testing.assert_allclose(_seg(registry, i).cell_centres(), centres, rtol=0, atol=1e-9)
        np.testing.assert_allclose(_seg(read, i).cell_centres(), centres, rtol=0, atol=1e-9)
        assert _seg(read, i).alpha_min_deg == -180.0
    # first cell: innermost ring just above -180 deg; radial bins run fastest
    c = expected[0]
    half = math.pi / n_alpha
    np.testing.assert_allclose(c[0], [-(41.85 / n_r / 2) * math.cos(half), -(41.85 / n_r / 2) * math.sin(half)])
    np.testing.assert_allclose(np.hypot(*c[:n_r].T), (np.arange(n_r) + 0.5) * 41.85 / n_r)


def test_geant4_hit_lands_in_the_cell_nearest_in_angle() -> None:
    seg = _seg(get_geometry("par04-ds2"), 0)
    rng = np.random.default_rng(3)
    r = 41.85 * np.sqrt(rng.uniform(0, 1, 5000))
    phi = rng.uniform(-math.pi, math.pi, 5000)
    x, y = r * np.cos(phi), r * np.sin(phi)
    ia = seg.alpha_bin(x, y)
    ir = np.searchsorted(np.asarray(seg.r_edges), r, side="right") - 1  # as the Geant4 scorer bins radii
    centres = seg.cell_centres()[ia * seg.n_r + ir]
    gap = np.abs(np.angle(np.exp(1j * (np.arctan2(y, x)[:, None] - seg.alpha_centres()[None, :]))))
    np.testing.assert_array_equal(ia, np.argmin(gap, axis=1))
    assert (gap[np.arange(5000), ia] <= math.pi / 16 + 1e-12).all()  # within half a 22.5-deg bin
    np.testing.assert_allclose(np.hypot(*centres.T), 4.65 * (ir + 0.5))
    # a hit 10 mm out, just below the -x axis (alpha = -179.4 deg): bin 0 from -180 deg, bin 8 from 0 deg
    assert int(seg.alpha_bin(np.array(-10.0), np.array(-0.1))) == 0
    assert int(_seg(_old_convention("par04-ds2"), 0).alpha_bin(np.array(-10.0), np.array(-0.1))) == 8
    # just above the +x axis (0.6 deg): bin 8 of 16 from -180 deg
    assert int(seg.alpha_bin(np.array(10.0), np.array(0.1))) == 8


def test_old_files_read_on_the_old_conventions() -> None:
    old, new = _old_convention("par04-ds2"), get_geometry("par04-ds2")
    assert _seg(old, 0).alpha_min_deg == 0.0 and old.energy_scale == 1.0 and old.voxel_threshold_mev == 0.0
    assert convention_difference(old, new) == (
        "alpha bins from 0 vs -180 deg; voxel value per deposited MeV 1 vs 30.3; zero below 0 vs 15.15 keV")
    assert convention_difference(new, new) == ""
    assert convention_difference(new, get_geometry("par04-ds3")) is None
    perm = alpha_permutation(old, new)
    assert sorted(perm.tolist()) == list(range(new.n_voxels))  # a permutation: no cell lost or doubled
    # every voxel keeps its physical position
    np.testing.assert_allclose(np.concatenate([_seg(old, i).cell_centres() for i in range(45)])[perm],
                               np.concatenate([_seg(new, i).cell_centres() for i in range(45)]), atol=1e-9)


@pytest.fixture
def old_file(tmp_path: Path) -> Path:
    """A fastshower 0.1 par04-ds2 file: shower 0 is one 2 MeV voxel (layer 5, alpha bin 3, r bin 4),
    shower 1 holds 4e-4 and 6e-4 MeV (below / above 15.15 keV once scaled), shower 2 is random."""
    old = _old_convention("par04-ds2")
    showers = np.zeros((3, old.n_voxels), np.float32)
    showers[0, old.layer_slice(5).start + 3 * 9 + 4] = 2.0
    showers[1, old.layer_slice(0).start + 12 * 9 + 0] = 4e-4
    showers[1, old.layer_slice(0).start + 12 * 9 + 1] = 6e-4
    showers[2] = np.random.default_rng(0).exponential(0.01, old.n_voxels)
    batch = ShowerBatch(np.array([1e3, 2e3, 5e4]), showers, {"position": np.array([[0.0, 1], [2, 3], [4, 5]])})
    return write_showers(tmp_path / "old.h5", old, batch, "e-", "geant4 11.2 (test)",
                         attrs={"seed": 7, "physics": "FTFP_BERT"})


def test_convert_moves_old_voxels_onto_the_calochallenge_conventions(old_file: Path, tmp_path: Path) -> None:
    old, new = _old_convention("par04-ds2"), get_geometry("par04-ds2")
    out = convert_conventions(old_file, tmp_path / "new.h5", chunk=2)
    with ShowerFile(out, new) as f, ShowerFile(old_file) as src:
        b, a = f.read(), src.read()
        attrs = f.attrs
    # the 2 MeV voxel: alpha bin 3 -> (3 + 16/2) % 16 = 11, same r bin, x 30.30, same point (x, y)
    j = new.layer_slice(5).start + 11 * 9 + 4
    assert np.flatnonzero(b.showers[0]).tolist() == [j]
    assert b.showers[0, j] == pytest.approx(2.0 * SCALE, rel=1e-6)
    np.testing.assert_allclose(_seg(new, 5).cell_centres()[11 * 9 + 4], _seg(old, 5).cell_centres()[3 * 9 + 4],
                               atol=1e-9)
    # 4e-4 MeV x 30.3 = 12.1 keV < 15.15 keV -> 0; 6e-4 MeV -> 18.2 keV, kept, at bin (12 + 8) % 16 = 4
    row0 = new.layer_slice(0).start + 4 * 9
    assert b.showers[1, row0] == 0.0 and b.showers[1, row0 + 1] == pytest.approx(6e-4 * SCALE, rel=1e-6)
    assert np.count_nonzero(b.showers[1]) == 1
    # the random shower: every voxel rolled and scaled, sub-threshold ones zeroed
    want = a.showers[2, alpha_permutation(old, new)] * SCALE
    want[want < 0.01515] = 0
    np.testing.assert_allclose(b.showers[2], want, rtol=1e-6)
    np.testing.assert_array_equal(b.energies, a.energies)
    np.testing.assert_array_equal(b.conditions["position"], a.conditions["position"])
    assert attrs["seed"] == 7 and attrs["physics"] == "FTFP_BERT" and attrs["generator"] == "geant4 11.2 (test)"
    assert attrs["complete"] and json.loads(attrs["converted_from"])["layout"] == "fastshower-0.1"
    assert json.loads(attrs["converted_from"])["path"] == str(old_file.resolve())
    assert "alpha bins from 0 vs -180 deg" in attrs["conversion"]


def test_killed_conversion_leaves_an_incomplete_file(old_file: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    scale = Geometry.to_readout_scale

    def dies_on_second_chunk(self: Geometry, deposited: np.ndarray) -> np.ndarray:
        calls.append(len(deposited))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return scale(self, deposited)

    monkeypatch.setattr(Geometry, "to_readout_scale", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        convert_conventions(old_file, tmp_path / "new.h5", chunk=1)
    with pytest.raises(ShowerFileError, match="incomplete"):
        ShowerFile(tmp_path / "new.h5")
    with ShowerFile(tmp_path / "new.h5", require_complete=False) as f:
        assert f.n == 1 and not f.complete


def test_convert_refuses_what_it_cannot_convert(old_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ShowerFileError, match="already on the current file conventions"):
        convert_conventions(convert_conventions(old_file, tmp_path / "new.h5"), tmp_path / "again.h5")
    d = json.loads(_old_convention("par04-ds2").to_json())
    for layer in d["layers"]:
        layer["segmentation"]["alpha_min_deg"] = 10.0  # 190 deg from -180 = 8.44 bins of 22.5 deg
    odd = write_showers(tmp_path / "odd.h5", geometry_from_json(d), ShowerBatch(np.array([1e3]), np.ones((1, 6480))),
                        "e-", "test")
    with pytest.raises(ShowerFileError, match="not a whole number"):
        convert_conventions(odd, tmp_path / "odd_new.h5")
    assert not (tmp_path / "odd_new.h5").exists()


def test_merge_evaluate_and_open_name_the_convention_and_the_command(old_file: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from fastshower.validate.evaluate import ValidationInputError, evaluate

    new = convert_conventions(old_file, tmp_path / "new.h5")
    fix = f"fastshower convert --layout fastshower-0.1 {old_file} --out NEW.h5"
    with pytest.raises(ShowerFileError, match="alpha bins from -180 vs 0 deg") as merged:
        merge_files([new, old_file], tmp_path / "merged.h5", add_condition=None)
    assert fix in str(merged.value) and "\n" not in str(merged.value)
    with pytest.raises(ValidationInputError, match="alpha bins from 0 vs -180 deg") as evaluated:
        evaluate(old_file, new, tmp_path / "eval", progress=False, report=False)
    assert fix in str(evaluated.value) and "voxel value per deposited MeV 1 vs 30.3" in str(evaluated.value)
    with pytest.raises(ShowerFileError, match="on other file conventions than expected"):
        ShowerFile(old_file, get_geometry("par04-ds2"))
    with pytest.raises(ShowerFileError, match=r"resume=True: .* on other file conventions .*fastshower-0\.1"):
        ShowerWriter(old_file, get_geometry("par04-ds2"), "e-", "geant4", 10, {"position": 2}, resume=True)
    assert main(["merge", str(old_file), str(new), "--out", str(tmp_path / "m.h5"), "--condition", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastshower: error: ") and "\n" not in err and fix in err


def test_cli_convert_and_geometry_summary(old_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.h5"
    assert main(["convert", str(old_file), "--layout", "fastshower-0.1", "--out", str(out)]) == 0
    with h5py.File(out) as f:
        assert f.attrs["complete"] and f["showers"][0].max() == pytest.approx(2.0 * SCALE, rel=1e-6)
    assert main(["convert", str(old_file), "--layout", "fastshower-0.1", "--out", str(out), "--particle", "e+"]) == 2
    assert "--particle" in capsys.readouterr().err
    text = get_geometry("par04-ds2").summary()
    assert "layers 0-44: 2 x (1.4 mm G4_W + 0.3 mm G4_Si)" in text  # 45 identical layers, one line
    assert "16 alpha bins of 22.5 deg from -180 deg (alpha = atan2(y, x))" in text
    assert "x 30.3, zero below 15.15 keV" in text
