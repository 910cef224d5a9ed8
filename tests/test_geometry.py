"""Detector descriptions: dimensions against their sources, voxel order, serialisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fastshower.geometry import (
    CartesianSegmentation,
    GeometryError,
    PolarSegmentation,
    geometry_from_json,
    get_geometry,
    list_geometries,
    read_calochallenge_binning,
)

# Voxel counts and depths from the sources cited in each geometry.
EXPECTED = {
    "belle2-ecl-5x5": (25, 300.0),
    "calogan-3layer": (504, 480.0),
    "ild-siw-30": (27000, 20 * 2.6 + 10 * 4.7),
    "par04-ds2": (6480, 90 * 1.7),
    "par04-ds3": (40500, 90 * 1.7),
    "siw-51x51x25": (65025, 17 * 2.9 + 8 * 5.3),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_sizes_match_sources(name: str) -> None:
    g = get_geometry(name)
    voxels, depth = EXPECTED[name]
    assert g.n_voxels == voxels
    assert g.depth == pytest.approx(depth)
    assert g.layer_offsets[-1] == g.n_voxels
    assert "arXiv" in g.source or "Geant4" in g.source


def test_calogan_layer_shapes_match_published_arrays() -> None:
    g = get_geometry("calogan-3layer")
    assert [g.layer_shape(i) for i in range(3)] == [(3, 96), (12, 12), (12, 6)]
    # every layer covers the same 480 x 480 mm face
    for layer in g.layers:
        seg = layer.segmentation
        assert isinstance(seg, CartesianSegmentation)
        assert seg.nx * seg.pitch_x == pytest.approx(480.0)
        assert seg.ny * seg.pitch_y == pytest.approx(480.0)


def test_cartesian_voxel_order_columns_fastest() -> None:
    seg = CartesianSegmentation(nx=3, ny=2, pitch_x=10.0, pitch_y=20.0)
    c = seg.cell_centres()
    np.testing.assert_allclose(c[:3, 0], [-10, 0, 10])  # first row: x increases
    np.testing.assert_allclose(c[:3, 1], [-10, -10, -10])
    np.testing.assert_allclose(c[3:, 1], [10, 10, 10])
    assert seg.cell_areas().sum() == pytest.approx(30 * 40)


def test_polar_voxel_order_radial_fastest_and_areas() -> None:
    seg = PolarSegmentation(r_edges=(0.0, 1.0, 2.0), n_alpha=4)
    c = seg.cell_centres()
    r = np.hypot(c[:, 0], c[:, 1])
    np.testing.assert_allclose(r, [0.5, 1.5] * 4)
    assert seg.cell_areas().sum() == pytest.approx(np.pi * 4.0)


def test_json_round_trip_for_every_builtin() -> None:
    for g in list_geometries():
        back = geometry_from_json(g.to_json())
        assert back.to_dict() == g.to_dict()
        assert back.n_voxels == g.n_voxels


def test_unknown_geometry_names_choices() -> None:
    with pytest.raises(GeometryError, match="belle2-ecl-5x5"):
        get_geometry("no-such-detector")


def test_read_calochallenge_binning(tmp_path: Path) -> None:
    edges = ",".join(f"{4.65 * i:g}" for i in range(10))
    layers = "\n".join(f'  <Layer id="{i}" r_edges="{edges}" n_bin_alpha="16"/>' for i in range(45))
    xml = tmp_path / "binning_dataset_2.xml"
    xml.write_text(f'<Bins>\n <Bin pid="11" name="electron">\n{layers}\n </Bin>\n</Bins>\n')
    g = read_calochallenge_binning(xml)
    assert g.n_voxels == get_geometry("par04-ds2").n_voxels == 6480
    seg = g.layers[0].segmentation
    assert isinstance(seg, PolarSegmentation) and seg.n_alpha == 16 and seg.r_edges[-1] == pytest.approx(41.85)


def test_broken_binning_xml_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<Bins><Bin>")
    with pytest.raises(GeometryError, match=r"bad\.xml"):
        read_calochallenge_binning(bad)
