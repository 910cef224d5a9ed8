"""Synthetic EM-like showers for tests, examples and smoke runs of the validation suite.

Not physics: a parametric toy with the features the validation must see. Per shower:

- visible energy E_vis = E_inc x R with R ~ Normal(``response``, sigma/E) and
  sigma/E = a/sqrt(E/GeV) (+) b (defaults a = 1.7 %, b = 1 %: about 2 % at 1 GeV, like CsI(Tl));
- longitudinal: a Gamma-shaped profile in depth (shower maximum ln(E/Ec) - 0.5 radiation
  lengths, one "radiation length" = 1/20 of the calorimeter depth), integrated over layers;
- lateral: per layer, a core + halo double Gaussian around an entry point smeared uniformly
  over +-``spot`` mm (the centre crystal for Belle II), widening with depth; cartesian cells
  integrate it exactly (erf), polar cells take density x area;
- cell fluctuations: Gamma noise of ``cell_noise`` relative width, cells below
  ``zero_suppression`` MeV set to 0;
- with probability ``p_second``, a second cluster (10-40 % of the energy) at a random place.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import special, stats

from fastshower.geometry import CartesianSegmentation, Geometry
from fastshower.io import ShowerBatch, write_showers

__all__ = ["synthetic_showers", "write_synthetic"]


def _cart_fractions(seg: CartesianSegmentation, x0: np.ndarray, y0: np.ndarray, sigma: float) -> np.ndarray:
    """Fraction of a 2-D Gaussian (centre (n,), width sigma mm) in each cell, shape (n, n_cells)."""
    ex = (np.arange(seg.nx + 1) - 0.5 * seg.nx) * seg.pitch_x
    ey = (np.arange(seg.ny + 1) - 0.5 * seg.ny) * seg.pitch_y
    cx = np.diff(special.ndtr((ex[None, :] - x0[:, None]) / sigma), axis=1)  # (n, nx)
    cy = np.diff(special.ndtr((ey[None, :] - y0[:, None]) / sigma), axis=1)  # (n, ny)
    return (cy[:, :, None] * cx[:, None, :]).reshape(len(x0), -1)  # rows (y) slow, columns fast


def _lateral(geometry: Geometry, layer: int, x0: np.ndarray, y0: np.ndarray, core: float,
             halo: float, f_core: float) -> np.ndarray:
    """Fraction (n, n_cells) of a core + halo Gaussian (widths ``core``, ``halo`` mm, core share ``f_core``)
    centred at (``x0``, ``y0``) (n,) mm in each cell of ``layer``: exact for cartesian cells, density x
    area for polar ones."""
    seg = geometry.layers[layer].segmentation
    if isinstance(seg, CartesianSegmentation):
        f = f_core * _cart_fractions(seg, x0, y0, core) + (1 - f_core) * _cart_fractions(seg, x0, y0, halo)
    else:
        c = seg.cell_centres()
        area = seg.cell_areas()
        d2 = (c[None, :, 0] - x0[:, None]) ** 2 + (c[None, :, 1] - y0[:, None]) ** 2
        dens = (f_core / (2 * math.pi * core**2) * np.exp(-0.5 * d2 / core**2)
                + (1 - f_core) / (2 * math.pi * halo**2) * np.exp(-0.5 * d2 / halo**2))
        f = dens * area[None, :]
    return f


def _entry_pitch(geometry: Geometry) -> float:
    """Cell size of the first layer, mm: the smaller cartesian pitch, or the diameter of the centre polar ring."""
    seg0 = geometry.layers[0].segmentation
    return min(seg0.pitch_x, seg0.pitch_y) if isinstance(seg0, CartesianSegmentation) else seg0.r_edges[1] * 2


def _radiation_length_mm(geometry: Geometry) -> float:
    """The toy's "radiation length": 1/20 of the calorimeter depth, mm (1 mm for a zero depth)."""
    depth = geometry.depth
    return depth / 20 if depth > 0 else 1.0


def _visible_energy(e: np.ndarray, rng: np.random.Generator, response: float, a: float, b: float,
                    scale: float) -> np.ndarray:
    """E_vis (n,) MeV = ``e`` (n,) MeV x R x ``scale``, R ~ Normal(response, a/sqrt(E/GeV) (+) b), R >= 0.05."""
    sig = np.sqrt(a**2 / (e / 1e3) + b**2)
    return e * np.clip(rng.normal(response, sig), 0.05, None) * scale


def _longitudinal_fractions(geometry: Geometry, e: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Share of each shower's energy per layer, shape (n, n_layers), rows summing to 1.

    A Gamma profile in depth (in radiation lengths) with its maximum at ln(E / 20 MeV) - 0.5
    (at least 0.5), smeared by 8 % per shower, integrated over each layer's thickness.
    """
    thickness = [la.thickness for la in geometry.layers]
    edges = np.concatenate([[0.0], np.cumsum(thickness)]) / _radiation_length_mm(geometry)
    tmax = np.clip(np.log(e / 20.0) - 0.5, 0.5, None) * rng.normal(1.0, 0.08, len(e))
    shape_b = 0.5
    shape_a = tmax * shape_b + 1
    cdf = stats.gamma.cdf(edges[None, :], shape_a[:, None], scale=1 / shape_b)
    long_f = np.diff(cdf, axis=1)
    long_f /= np.clip(long_f.sum(1, keepdims=True), 1e-12, None)
    return long_f


def _cluster(geometry: Geometry, x0: np.ndarray, y0: np.ndarray, long_f: np.ndarray, moliere: float) -> np.ndarray:
    """Energy fractions (n, V) of clusters entering at (``x0``, ``y0``) (n,) mm with layer shares ``long_f``
    (n, n_layers): per layer a core + halo (3.5 x wider, 15 %) Gaussian whose core widens with depth."""
    zc = geometry.layer_z_centres() / _radiation_length_mm(geometry)
    out = np.empty((len(x0), geometry.n_voxels))
    for i in range(geometry.n_layers):
        core = moliere * (0.6 + 0.15 * zc[i])
        lat = _lateral(geometry, i, x0, y0, core, 3.5 * core, 0.85)
        out[:, geometry.layer_slice(i)] = lat * long_f[:, i : i + 1]
    return out


def _add_second_clusters(out: np.ndarray, geometry: Geometry, x0: np.ndarray, y0: np.ndarray, long_f: np.ndarray,
                         moliere: float, pitch: float, p_second: float, rng: np.random.Generator) -> None:
    """With probability ``p_second`` per shower, move 10-40 % of the fractions ``out`` (n, V) into a
    second cluster 1.5-2.5 cell pitches (``pitch`` mm) away in a random direction (in place)."""
    second = rng.random(len(x0)) < p_second
    if not second.any():
        return
    k = int(second.sum())
    ang = rng.uniform(0, 2 * math.pi, k)
    dist = rng.uniform(1.5, 2.5, k) * pitch
    frac = rng.uniform(0.1, 0.4, k)
    sec = _cluster(geometry, x0[second] + dist * np.cos(ang), y0[second] + dist * np.sin(ang), long_f[second],
                   moliere)
    out[second] = (1 - frac[:, None]) * out[second] + frac[:, None] * sec


def _cells_with_noise(out: np.ndarray, evis: np.ndarray, cell_noise: float, zero_suppression: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Cell energies (n, V) float32 MeV: fractions ``out`` with Gamma noise of relative width ``cell_noise``,
    scaled to the visible energies ``evis`` (n,) MeV, cells below ``zero_suppression`` MeV set to 0."""
    k_gamma = 1.0 / cell_noise**2
    out *= rng.gamma(k_gamma, 1.0 / k_gamma, out.shape)
    out *= (evis / np.clip(out.sum(1), 1e-12, None))[:, None]
    out[out < zero_suppression] = 0.0
    return out.astype(np.float32)


def synthetic_showers(
    geometry: Geometry,
    energies: np.ndarray,
    rng: np.random.Generator,
    scale: float = 1.0,
    response: float = 0.95,
    a: float = 0.017,
    b: float = 0.01,
    spot: float | None = None,
    moliere: float | None = None,
    cell_noise: float = 0.1,
    zero_suppression: float = 0.5,
    p_second: float = 0.03,
) -> np.ndarray:
    """Toy showers, shape (n, V), MeV, for the incident ``energies`` (n,) MeV.

    Args:
        scale: multiplies every cell (a mis-calibrated candidate: 1.05).
        spot: half-width of the entry-point smearing, mm (default half the centre cell pitch).
        moliere: core width in mm (default: a quarter of the smallest cell's pitch x 2, >= 3 mm).
        Others: see the module docstring.
    """
    if geometry.profile is not None:
        raise ValueError("synthetic_showers makes calorimeter showers; geometry has a profile axis")
    e = np.asarray(energies, dtype=np.float64).reshape(-1)
    n = len(e)
    pitch = _entry_pitch(geometry)
    spot = 0.5 * pitch if spot is None else spot
    moliere = max(3.0, 0.4 * pitch) if moliere is None else moliere
    evis = _visible_energy(e, rng, response, a, b, scale)
    x0 = rng.uniform(-spot, spot, n)
    y0 = rng.uniform(-spot, spot, n)
    long_f = _longitudinal_fractions(geometry, e, rng)
    out = _cluster(geometry, x0, y0, long_f, moliere)
    _add_second_clusters(out, geometry, x0, y0, long_f, moliere, pitch, p_second, rng)
    return _cells_with_noise(out, evis, cell_noise, zero_suppression, rng)


def write_synthetic(path: str | Path, geometry: Geometry, energies: np.ndarray, seed: int, particle: str = "e-",
                    **kwargs: float) -> Path:
    """Write :func:`synthetic_showers` for ``energies`` (n,) MeV to a new shower file."""
    rng = np.random.default_rng(seed)
    e = np.asarray(energies, dtype=np.float64)
    showers = synthetic_showers(geometry, e, rng, **kwargs)
    return write_showers(path, geometry, ShowerBatch(e, showers), particle, f"synthetic (seed {seed})",
                         attrs={"seed": seed})
