"""``export --layout par04``: Geant4 Par04's inference contract (batch 1, one input, cell energies / E in
Par04's mesh order), checked against the run's own sampler and against Par04's cell positions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fastshower.cli import main as cli_main
from fastshower.deploy import ExportError, export_onnx, load_onnx
from fastshower.deploy.par04 import par04_input, par04_permutation
from fastshower.geometry import Geometry, PolarSegmentation, geometry_from_json, get_geometry
from fastshower.runs import load_run
from fastshower.sampling import SamplerModule, draw_noise
from fastshower.training import train
from fastshower.validate.synthetic import write_synthetic


@pytest.fixture(scope="module")
def par04_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny VAE run on par04-ds2 (synthetic showers at 1, 2 and 5 GeV, energy the only condition)."""
    root = tmp_path_factory.mktemp("par04")
    data = write_synthetic(root / "ds2.h5", get_geometry("par04-ds2"), np.resize([1e3, 2e3, 5e3], 300), seed=3)
    return train(data, "vae", root / "run", steps=3, batch_size=64, progress=False,
                 config={"hparams": {"latent_dim": 4, "hidden": 32, "depth": 1, "kl_warmup": 5},
                         "train": {"chunk_rows": 128, "shuffle_chunks": 2}})


def test_par04_graph_reproduces_the_run_at_batch_1(par04_run: Path, tmp_path: Path) -> None:
    """ONNX Runtime at batch 1 on Par04's input vector gives the run's own showers for the same noise,
    permuted to Par04's mesh order and divided by E; the shapes are fixed at batch 1."""
    path = export_onnx(par04_run, tmp_path / "par04.onnx", layout="par04")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    run = load_run(par04_run)
    meta = sess.get_modelmeta().custom_metadata_map
    mesh = json.loads(meta["par04_mesh"])
    assert meta["layout"] == "par04" and (mesh["n_r"], mesh["n_phi"], mesh["n_z"]) == (9, 16, 45)
    assert mesh["dz_mm"] == pytest.approx(3.4) and mesh["dr_mm"] == pytest.approx(4.65)
    assert inp.shape == [1, mesh["latent"] + 4] and out.shape == [1, 6480]
    sampler, perm = SamplerModule(run), par04_permutation(run.info.geometry)
    for seed, e_mev in ((1, 1500.0), (2, 4000.0)):
        z = draw_noise(run.model, 1, torch.Generator().manual_seed(seed))
        got = sess.run(None, {inp.name: par04_input(z.numpy(), e_mev)})[0]
        with torch.no_grad():
            want = sampler(z, torch.tensor([[e_mev]]))[:, perm].numpy() / e_mev
        assert got.sum() > 0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.max()))
    with pytest.raises(ExportError, match="par04-layout"):
        load_onnx(path, par04_run)


def _par04_cells(seg: PolarSegmentation, n_z: int) -> tuple[np.ndarray, np.ndarray]:
    """Par04InferenceSetup::GetPositions' cells in its order (r slowest, phi, z fastest): layer (N,) and
    transverse centre (N, 2) mm, at normal incidence."""
    n_r, n_phi = seg.n_r, seg.n_alpha
    dr = seg.r_edges[1] - seg.r_edges[0]
    ir, iphi, iz = np.meshgrid(np.arange(n_r), np.arange(n_phi), np.arange(n_z), indexing="ij")
    phi = (iphi.ravel() + 0.5) * 2 * math.pi / n_phi - math.pi
    rho = (ir.ravel() + 0.5) * dr
    return iz.ravel(), np.stack([rho * np.cos(phi), rho * np.sin(phi)], axis=1)


def _alpha_from_zero(name: str) -> Geometry:
    """The geometry as fastshower 0.1 files record it: alpha bins from 0 degrees."""
    d = json.loads(get_geometry(name).to_json())
    for layer in d["layers"]:
        layer["segmentation"]["alpha_min_deg"] = 0.0
    return geometry_from_json(d)


@pytest.mark.parametrize("name", ["par04-ds2", "par04-ds3"])
@pytest.mark.parametrize("old_alpha", [False, True])
def test_par04_permutation_puts_each_cell_where_par04_does(name: str, old_alpha: bool) -> None:
    """perm[p] is the fastshower voxel in the layer and at the (x, y) centre of Par04's cell p, for files
    binning alpha from -180 degrees and (rotated) from 0."""
    geo = _alpha_from_zero(name) if old_alpha else get_geometry(name)
    seg = geo.layers[0].segmentation
    assert isinstance(seg, PolarSegmentation)
    perm = par04_permutation(geo)
    assert sorted(perm.tolist()) == list(range(geo.n_voxels))
    layer, centre = _par04_cells(seg, geo.n_layers)
    n_cells = seg.n_cells
    np.testing.assert_array_equal(perm // n_cells, layer)
    np.testing.assert_allclose(seg.cell_centres()[perm % n_cells], centre, atol=1e-6)


def test_par04_layout_refuses_other_geometries(tmp_path: Path, tiny_file: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A run on another geometry: one line, exit 2, nothing written."""
    run = train(tiny_file, "vae", tmp_path / "run", steps=2, batch_size=64, progress=False,
                config={"hparams": {"latent_dim": 4, "hidden": 16, "depth": 1, "kl_warmup": 5},
                        "train": {"chunk_rows": 128, "shuffle_chunks": 2}})
    out = tmp_path / "m.onnx"
    assert cli_main(["export", "--run", str(run), "--out", str(out), "--layout", "par04"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "par04-ds2 or par04-ds3" in err and "tiny-2x4x4" in err
    assert not out.exists()
    with pytest.raises(ExportError, match="FP32 only"):
        export_onnx(run, out, layout="par04", int8=True)
