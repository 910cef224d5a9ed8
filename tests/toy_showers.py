"""A cheap parametric shower generator for tests and CPU benchmarks (not physics).

Each shower deposits a fluctuating fraction of its energy; per readout layer a
gamma-shaped longitudinal profile decides the share, and the share is spread over
the layer's cartesian cells by ``n_hits`` points drawn from a core + halo radial
profile around the entry point. Finite hit counts give shower-to-shower fluctuations
and sparse outer cells, which is what the models must learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastshower.geometry import CartesianSegmentation, Geometry, ReadoutLayer
from fastshower.io import ShowerBatch, ShowerWriter


def tiny_geometry() -> Geometry:
    """2 layers of 4x4 cartesian cells (32 voxels)."""
    seg = CartesianSegmentation(4, 4, 10.0, 10.0)
    layer = ReadoutLayer("G4_W", 3.5, "G4_Si", 0.5, 5, seg)
    return Geometry(name="tiny-2x4x4", description="test geometry", source="tests", layers=(layer, layer),
                    energy="1:10")


def toy_showers(geometry: Geometry, energies_mev: np.ndarray, positions: np.ndarray | None,
                rng: np.random.Generator, n_hits: int = 150) -> np.ndarray:
    """Showers (n, V) MeV for incident energies (n,) MeV and entry points (n, 2) mm (or None: centre)."""
    n = len(energies_mev)
    pos = np.zeros((n, 2)) if positions is None else positions
    e_gev = energies_mev / 1e3
    deposit = energies_mev * np.clip(rng.normal(0.93, 0.02 + 0.03 / np.sqrt(e_gev)), 0.5, 1.0)
    n_layers = geometry.n_layers
    # longitudinal: shower max deepens with log E; share per layer from a gamma-like profile
    depth = (np.arange(n_layers) + 0.5) / n_layers
    tmax = 0.3 + 0.05 * np.log(e_gev + 1)[:, None] + rng.normal(0, 0.05, (n, 1))
    prof = np.exp(-((depth[None, :] - tmax) ** 2) / 0.08) + 1e-3
    prof /= prof.sum(1, keepdims=True)
    out = np.zeros((n, geometry.n_voxels), dtype=np.float32)
    for li, layer in enumerate(geometry.layers):
        seg = layer.segmentation
        assert isinstance(seg, CartesianSegmentation)
        core = rng.random((n, n_hits)) < 0.8
        sigma = np.where(core, 0.25, 0.9) * max(seg.pitch_x, seg.pitch_y)
        xy = pos[:, None, :] + rng.normal(size=(n, n_hits, 2)) * sigma[..., None]
        ix = np.floor(xy[..., 0] / seg.pitch_x + seg.nx / 2).astype(int)
        iy = np.floor(xy[..., 1] / seg.pitch_y + seg.ny / 2).astype(int)
        inside = (ix >= 0) & (ix < seg.nx) & (iy >= 0) & (iy < seg.ny)
        cell = np.where(inside, iy * seg.nx + ix, seg.n_cells)
        w = (deposit * prof[:, li])[:, None] / n_hits * rng.gamma(4.0, 0.25, (n, n_hits))
        img = np.zeros((n, seg.n_cells + 1))
        np.add.at(img, (np.repeat(np.arange(n), n_hits), cell.ravel()), w.ravel())
        out[:, geometry.layer_slice(li)] = img[:, : seg.n_cells]
    return out


def make_toy_file(path: str | Path, geometry: Geometry, n: int, energies_gev: tuple[float, ...] = (1.0, 2.0, 5.0),
                  seed: int = 0, position: bool = True, n_hits: int = 150) -> Path:
    """Write ``n`` toy showers at the listed energies (equal shares) with an optional position condition."""
    rng = np.random.default_rng(seed)
    e = np.resize(np.asarray(energies_gev, dtype=np.float64) * 1e3, n)
    rng.shuffle(e)
    seg = geometry.layers[0].segmentation
    assert isinstance(seg, CartesianSegmentation)
    pos = rng.uniform(-0.5, 0.5, (n, 2)) * np.array([seg.pitch_x, seg.pitch_y]) if position else None
    showers = toy_showers(geometry, e, pos, rng, n_hits)
    conds = {"position": pos} if pos is not None else {}
    with ShowerWriter(path, geometry, "e-", "toy showers (tests)", n, {k: 2 for k in conds}, {"seed": seed}) as w:
        for a in range(0, n, 4096):
            b = min(a + 4096, n)
            w.append(ShowerBatch(e[a:b], showers[a:b], {k: v[a:b] for k, v in conds.items()}))
    return Path(path)
