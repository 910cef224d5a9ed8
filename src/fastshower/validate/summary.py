"""A physics summary of a shower file, for the terminal.

Per incident energy (or energy bin): number of showers, mean visible fraction
E_vis/E_inc, its relative spread (the resolution of the visible energy), and
the mean fraction of the visible energy in each readout layer. Streams the file.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from fastshower.io import ShowerFile

__all__ = ["energy_groups", "physics_summary"]


_UNIT_MEV = {"GeV": 1e3, "eV": 1e-6}


def energy_groups(energies_mev: np.ndarray, max_groups: int = 6, unit: str = "GeV") -> tuple[np.ndarray, list[str]]:
    """Group index per shower, shape (N,), and a label per group (energies in ``unit``: GeV or eV).

    Discrete energy lists keep one group per value; continuous spectra are cut
    into ``max_groups`` log-spaced bins.
    """
    scale = _UNIT_MEV[unit]
    values = np.unique(energies_mev)
    if len(values) <= max_groups:
        return np.searchsorted(values, energies_mev), [f"{v / scale:.3g} {unit}" for v in values]
    edges = np.geomspace(values[0], values[-1] * (1 + 1e-9), max_groups + 1)
    idx = np.clip(np.searchsorted(edges, energies_mev, side="right") - 1, 0, max_groups - 1)
    return idx, [f"{a / scale:.3g}-{b / scale:.3g} {unit}" for a, b in itertools.pairwise(edges)]


def physics_summary(path: str | Path) -> str:
    """A table of response, resolution and layer fractions per energy group."""
    with ShowerFile(path, require_complete=False) as f:
        geo = f.geometry
        if geo.kind != "calorimeter":
            return _profile_summary(f, str(path))
        group, labels = energy_groups(f.energies())
        n_g, n_l = len(labels), geo.n_layers
        count = np.zeros(n_g)
        s1 = np.zeros(n_g)
        s2 = np.zeros(n_g)
        layer_sum = np.zeros((n_g, n_l))
        offset = 0
        for batch in f.iter_chunks(8192):
            g = group[offset: offset + len(batch)]
            offset += len(batch)
            e_layer = np.stack([batch.showers[:, geo.layer_slice(i)].sum(1) for i in range(n_l)], 1)
            vis = e_layer.sum(1)
            frac = vis / batch.energies
            np.add.at(count, g, 1)
            np.add.at(s1, g, frac)
            np.add.at(s2, g, frac**2)
            np.add.at(layer_sum, g, e_layer / np.maximum(vis, 1e-12)[:, None])
    mean = s1 / np.maximum(count, 1)
    rms = np.sqrt(np.maximum(s2 / np.maximum(count, 1) - mean**2, 0))
    show_layers = n_l <= 6
    head = f"{'energy':>18s} {'N':>7s} {'E_vis/E_inc':>12s} {'sigma/mean':>11s}"
    if show_layers:
        head += "  layer fractions"
    lines = [f"physics summary of {path} ({geo.name}):", head]
    for k, label in enumerate(labels):
        row = f"{label:>18s} {int(count[k]):7d} {mean[k]:12.4f} {rms[k] / max(mean[k], 1e-12):10.2%}"
        if show_layers:
            row += "  " + " ".join(f"{v:.3f}" for v in layer_sum[k] / max(count[k], 1))
        lines.append(row)
    return "\n".join(lines)


def _profile_summary(f: ShowerFile, path: str) -> str:
    """Air showers: <Xmax> and its RMS per energy group, from the file's truth/xmax (g/cm^2)."""
    if "xmax" not in f.truth_names:
        return f"{f.n} profiles of {f.geometry.name} in {path} (no truth/xmax to summarise)"
    group, labels = energy_groups(f.energies(), unit="eV")
    xmax = np.concatenate([b.truth["xmax"][:, 0] for b in f.iter_chunks(65536)])
    lines = [f"physics summary of {path} ({f.geometry.name}, {f.particle}):",
             f"{'energy':>24s} {'N':>6s} {'<Xmax>':>8s} {'RMS':>6s}  (g/cm^2, slant depth)"]
    for k, label in enumerate(labels):
        x = xmax[group == k]
        if len(x):
            lines.append(f"{label:>24s} {len(x):6d} {x.mean():8.1f} {x.std():6.1f}")
    return "\n".join(lines)
