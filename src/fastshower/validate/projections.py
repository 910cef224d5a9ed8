"""The 3DGAN papers' projection checks: energy profiles along x, y and z, and the moments of each shower's
x, y and z energy distributions (Khattak et al., Eur. Phys. J. C 82 (2022) 386; Rehm et al.,
arXiv:2103.10142). The papers' other checks are scores of :func:`fastshower.validate.evaluate.evaluate`
already: E_sum / E_p against E_p (``response``), the single-cell spectrum (the ``voxel_energy`` histogram),
SSIM diversity (``ssim``), the birthday-paradox support size (``support_size``) and the multi-peak
fraction (``multi_peak``).

Definitions (cartesian layers sharing one segmentation; the papers' 51 x 51 x 25 grid):

- **profiles**: the mean shower (voxels / E_inc averaged over the sample) summed over the other two axes,
  one value per column (x), row (y) or layer (z), each normalised to unit sum. The *profile separation* is
  the separation power ``S = 1/2 sum_i (p_i - q_i)^2 / (p_i + q_i)`` of the two normalised profiles read
  as histograms of where the energy is deposited (:func:`fastshower.validate.metrics.separation_power`);
  ``max_rel_dev`` is the largest ``|q_i / p_i - 1|`` over the bins that hold at least 1 % of the
  reference's energy (the papers' "few percent" reading of their profile plots).
- **moments**: per shower, the energy-weighted mean (first moment) and RMS (second, central) of the x, y
  and z coordinates of its cells, in mm; computed from the per-layer observables of
  :func:`fastshower.validate.observables.compute_observables` (layer energies, centres and widths, and
  the shower's depth centre and width), which makes them exact without another pass over the voxels:
  ``<x> = sum_l E_l <x>_l / sum_l E_l`` and ``<x^2> = sum_l E_l (w_l^2 + <x>_l^2) / sum_l E_l``.
  Each moment's separation power uses 50 bins between the reference's 0.05 % and 99.95 % quantiles
  (:func:`fastshower.validate.metrics.make_binning`).

The floor (``floor=True`` in :func:`evaluate`): the same scores between the reference's two random halves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fastshower.geometry import CartesianSegmentation, Geometry
from fastshower.validate import metrics as M

__all__ = ["AXES", "MOMENTS", "applies", "axis_profiles", "projection_checks", "shower_moments"]

#: the profile axes: columns, rows, layers
AXES: tuple[str, ...] = ("x", "y", "z")
#: per-shower moments, mm
MOMENTS: tuple[str, ...] = ("x_mean", "x_rms", "y_mean", "y_rms", "z_mean", "z_rms")
#: a profile bin enters ``max_rel_dev`` when it holds at least this fraction of the reference's energy
_MIN_BIN_FRACTION = 0.01


def applies(geometry: Geometry) -> bool:
    """True for calorimeters whose layers are cartesian grids of one shape (the checks' images)."""
    return (geometry.profile is None and geometry.is_uniform
            and isinstance(geometry.layers[0].segmentation, CartesianSegmentation))


def axis_profiles(mean_image: np.ndarray, geometry: Geometry) -> dict[str, np.ndarray]:
    """The (n_x,), (n_y,) and (n_layers,) projections of a mean image (V,), each normalised to unit sum
    (all zeros for an empty image)."""
    seg = geometry.layers[0].segmentation
    assert isinstance(seg, CartesianSegmentation)
    img = np.asarray(mean_image, dtype=np.float64).reshape(geometry.n_layers, seg.ny, seg.nx)
    out = {"x": img.sum(axis=(0, 1)), "y": img.sum(axis=(0, 2)), "z": img.sum(axis=(1, 2))}
    return {k: v / v.sum() if v.sum() > 0 else v for k, v in out.items()}


def shower_moments(obs: np.ndarray, names: Sequence[str], n_layers: int) -> dict[str, np.ndarray]:
    """Per-shower moments :data:`MOMENTS`, each (n,) mm, from observables ``obs`` (n, len(names)) in the
    order ``names`` of :func:`fastshower.validate.observables.observable_names`."""
    col = {n: i for i, n in enumerate(names)}
    e = np.stack([obs[:, col[f"E_layer_{i}"]] for i in range(n_layers)], axis=1)
    tot = e.sum(axis=1)
    safe = np.where(tot > 0, tot, 1.0)
    out: dict[str, np.ndarray] = {}
    for ax in ("x", "y"):
        c = np.stack([obs[:, col[f"{ax}_centre_{i}"]] for i in range(n_layers)], axis=1)
        w = np.stack([obs[:, col[f"{ax}_width_{i}"]] for i in range(n_layers)], axis=1)
        m1 = (e * c).sum(axis=1) / safe
        m2 = (e * (w * w + c * c)).sum(axis=1) / safe
        out[f"{ax}_mean"] = np.where(tot > 0, m1, 0.0)
        out[f"{ax}_rms"] = np.where(tot > 0, np.sqrt(np.clip(m2 - m1 * m1, 0.0, None)), 0.0)
    out["z_mean"], out["z_rms"] = obs[:, col["z_centre"]], obs[:, col["z_width"]]
    return {k: out[k] for k in MOMENTS}


def _profile_scores(p: np.ndarray, q: np.ndarray) -> dict[str, Any]:
    big = p >= _MIN_BIN_FRACTION
    with np.errstate(divide="ignore", invalid="ignore"):
        dev = np.abs(q[big] / p[big] - 1.0)
    return {"separation_power": M.separation_power(p, q), "max_rel_dev": float(dev.max()) if dev.size else None}


def _moment_scores(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in MOMENTS:
        b = M.make_binning(ref[k])
        hr = np.bincount(b.index(ref[k]), minlength=b.n_bins + 2)
        hc = np.bincount(b.index(cand[k]), minlength=b.n_bins + 2)
        out[k] = {"separation_power": M.separation_power(hr, hc), "reference_mean": float(ref[k].mean()),
                  "candidate_mean": float(cand[k].mean()), "reference_std": float(ref[k].std()),
                  "candidate_std": float(cand[k].std())}
    return out


def projection_checks(geometry: Geometry, names: Sequence[str], ref_image: np.ndarray, cand_image: np.ndarray,
                      ref_obs: np.ndarray, cand_obs: np.ndarray,
                      halves: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """The profile and moment scores of a candidate against a reference.

    Args:
        geometry: uniform cartesian calorimeter (:func:`applies`).
        names: the observable names (columns of ``ref_obs`` / ``cand_obs``).
        ref_image, cand_image: mean showers (V,) of voxels / E_inc.
        ref_obs, cand_obs: per-shower observables (n, len(names)) of (a subsample of) each file.
        halves: for the floor, (mean image of half A, mean image of half B, bool (n_ref,) mask of the
            ``ref_obs`` rows in half B).

    Returns:
        ``profiles``: {axis: reference, candidate (normalised profiles), separation_power, max_rel_dev
        [, floor_separation_power, floor_max_rel_dev]}; ``moments``: {name: separation_power, means and
        stds [, floor_separation_power]}; ``max_profile_separation`` and ``max_moment_separation``.
    """
    pr, pc = axis_profiles(ref_image, geometry), axis_profiles(cand_image, geometry)
    mr = shower_moments(ref_obs, names, geometry.n_layers)
    mc = shower_moments(cand_obs, names, geometry.n_layers)
    profiles: dict[str, Any] = {}
    for ax in AXES:
        profiles[ax] = {"reference": pr[ax].tolist(), "candidate": pc[ax].tolist(), **_profile_scores(pr[ax], pc[ax])}
    moments = _moment_scores(mr, mc)
    if halves is not None:
        pa, pb = axis_profiles(halves[0], geometry), axis_profiles(halves[1], geometry)
        for ax in AXES:
            f = _profile_scores(pa[ax], pb[ax])
            profiles[ax]["floor_separation_power"], profiles[ax]["floor_max_rel_dev"] = (f["separation_power"],
                                                                                       f["max_rel_dev"])
        in_b = np.asarray(halves[2], dtype=bool)
        fl = _moment_scores({k: v[~in_b] for k, v in mr.items()}, {k: v[in_b] for k, v in mr.items()})
        for k in MOMENTS:
            moments[k]["floor_separation_power"] = fl[k]["separation_power"]
    return {"profiles": profiles, "moments": moments,
            "max_profile_separation": max(profiles[a]["separation_power"] for a in AXES),
            "max_moment_separation": max(moments[k]["separation_power"] for k in MOMENTS)}
