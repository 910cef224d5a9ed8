"""Per-shower observables as pure array functions (numpy in -> numpy out, torch in -> torch out).

Every function is written once in torch; a numpy input is viewed as a float64 tensor and the
result handed back as a numpy array, so the same code serves evaluation (numpy, streamed from
HDF5) and training-time monitoring (torch, on any device, differentiable where it makes sense).

Conventions (see :mod:`fastshower.geometry` for the voxel order):

- ``showers``: deposited energy per voxel, shape (n, V), MeV.
- ``energies``: incident energies, shape (n,), MeV.
- cell positions are the geometry's cell centres, (x, y) in mm, ``r = hypot(x, y)``; polar
  layers are centred on the incident particle, cartesian ones on the beam axis.
- an empty layer (no energy) gets centre 0 and width 0, so it stays a finite value that both
  samples share.

Definitions follow the CaloChallenge 2022 evaluation (arXiv:2410.21611) where it has one
(layer energies, centres of energy and widths, sparsity, voxel spectrum) and the usual
crystal-calorimeter shower-shape variables (E1/E9, E9/E25) otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from fastshower.geometry import CartesianSegmentation, Geometry, PolarSegmentation

__all__ = [
    "Array",
    "centre_of_energy",
    "challenge_high_level",
    "compute_observables",
    "e1_e9_e25",
    "energy_ratio",
    "layer_energies",
    "layer_r_moments",
    "layer_sparsity",
    "longitudinal_moments",
    "max_cell",
    "n_hits",
    "n_peaks",
    "observable_names",
    "pooled_size",
    "pooled_voxels",
    "profile_shape",
    "radial_edges",
    "radial_profile",
    "sparsity",
    "total_energy",
    "voxel_spectrum",
]

Array = TypeVar("Array", np.ndarray, torch.Tensor)


# --- array plumbing ---------------------------------------------------------------------


def _t(x: Any, like: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """(tensor, was_numpy). Numpy/scalars become float64 tensors (on ``like``'s device)."""
    if isinstance(x, torch.Tensor):
        return x, False
    t = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if like is not None:
        t = t.to(device=like.device, dtype=like.dtype)
    return t, True


def _out(t: torch.Tensor, to_numpy: bool) -> Any:
    return t.detach().cpu().numpy() if to_numpy else t


@lru_cache(maxsize=32)
def _voxel_tables(geometry: Geometry) -> dict[str, np.ndarray]:
    """Per-voxel lookup tables of a calorimeter geometry (cached per geometry).

    Returns:
        layer: layer index, shape (V,); x, y, r: cell centre, shape (V,), mm;
        z: layer depth centre, shape (V,), mm; moments: shape (V, 7), the columns
        :data:`_MOMENTS` (1, x, y, x^2, y^2, r, r^2) in mm powers.
    """
    if geometry.profile is not None:
        raise ValueError(f"geometry {geometry.name!r} is an air-shower profile: use profile_shape()")
    xs, ys, layer = [], [], []
    for i, la in enumerate(geometry.layers):
        c = la.segmentation.cell_centres()
        xs.append(c[:, 0])
        ys.append(c[:, 1])
        layer.append(np.full(la.n_cells, i))
    x, y, lay = np.concatenate(xs), np.concatenate(ys), np.concatenate(layer)
    z = geometry.layer_z_centres()[lay]
    r = np.hypot(x, y)
    moments = np.stack([np.ones_like(x), x, y, x * x, y * y, r, r * r], axis=1)
    return {"layer": lay, "x": x, "y": y, "r": r, "z": z, "moments": moments}


def _table(geometry: Geometry, key: str, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(_voxel_tables(geometry)[key], dtype=like.dtype, device=like.device)


def _layer_sum(x: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Sum of per-voxel values ``x`` (n, V) over each layer's voxels, shape (n, L).

    Same result as ``x @ onehot`` but O(n V) instead of O(n V L): at 45 layers x 40 500 voxels
    (CaloChallenge dataset 3) the one-hot product costs 45 times the work of reading the showers.
    """
    if geometry.is_uniform:
        return x.reshape(x.shape[0], geometry.n_layers, -1).sum(dim=2)
    return torch.stack([x[:, geometry.layer_slice(i)].sum(dim=1) for i in range(geometry.n_layers)], dim=1)


#: columns of the per-voxel moment table of :func:`_layer_moments`
_MOMENTS = ("1", "x", "y", "x2", "y2", "r", "r2")


def _layer_moments(s: torch.Tensor, geometry: Geometry, cols: tuple[str, ...]) -> torch.Tensor:
    """Energy-weighted sums over each layer's cells, sum_cells s f, of the cell functions ``cols``
    (names of :data:`_MOMENTS`), shape (n, L, len(cols)), for showers ``s`` (n, V) MeV.

    One matrix product per layer (one for the whole detector when the layers share a
    segmentation) reads the showers once; the elementwise form s x, s x^2, ... made two
    full-size temporaries per moment, half of the observables' time at 65 025 cells.
    """
    t = _table(geometry, "moments", s)[:, [_MOMENTS.index(c) for c in cols]]
    if geometry.is_uniform:
        cells = geometry.layer_sizes[0]
        return s.reshape(s.shape[0], geometry.n_layers, cells) @ t[:cells]
    slices = [geometry.layer_slice(i) for i in range(geometry.n_layers)]
    return torch.stack([s[:, sl] @ t[sl] for sl in slices], dim=1)


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b with 0 where b == 0."""
    ok = b > 0
    return torch.where(ok, a / torch.where(ok, b, torch.ones_like(b)), torch.zeros_like(a))


# --- energies ------------------------------------------------------------------------------


def total_energy(showers: Array) -> Array:
    """Total visible energy, shape (n,), MeV, of ``showers`` (n, V) MeV."""
    s, np_in = _t(showers)
    return _out(s.sum(dim=1), np_in)


def energy_ratio(showers: Array, energies: Array) -> Array:
    """E_vis / E_inc, shape (n,), dimensionless; ``showers`` (n, V) MeV, ``energies`` (n,) MeV."""
    s, np_in = _t(showers)
    e, _ = _t(energies, like=s)
    return _out(s.sum(dim=1) / e.reshape(-1), np_in)


def layer_energies(showers: Array, geometry: Geometry) -> Array:
    """Energy per readout layer (the longitudinal profile), shape (n, L), MeV."""
    s, np_in = _t(showers)
    return _out(_layer_sum(s, geometry), np_in)


def max_cell(showers: Array) -> Array:
    """Largest single-voxel energy, shape (n,), MeV."""
    s, np_in = _t(showers)
    return _out(s.max(dim=1).values, np_in)


# --- lateral shape per layer -----------------------------------------------------------------


def centre_of_energy(showers: Array, geometry: Geometry) -> tuple[Array, Array]:
    """Energy-weighted centre and width (RMS) of each layer, in x and y.

    For polar layers x, y come from the cell centres (r cos alpha, r sin alpha), as in the
    CaloChallenge's ``center of energy in x/y``.

    Args:
        showers: (n, V) MeV.
        geometry: a calorimeter geometry with L layers.

    Returns:
        centre: shape (n, L, 2), (x, y) in mm; width: shape (n, L, 2), mm,
        ``sqrt(<x^2> - <x>^2)``. Empty layers give 0.
    """
    s, np_in = _t(showers)
    sums = _layer_moments(s, geometry, ("1", "x", "y", "x2", "y2"))
    e_l = sums[..., :1]
    m1 = _safe_div(sums[..., 1:3], e_l.expand(-1, -1, 2))
    m2 = _safe_div(sums[..., 3:5], e_l.expand(-1, -1, 2))
    return _out(m1, np_in), _out(torch.sqrt(torch.clamp(m2 - m1 * m1, min=0.0)), np_in)


def layer_r_moments(showers: Array, geometry: Geometry) -> tuple[Array, Array]:
    """Energy-weighted mean radius and radial RMS of each layer.

    ``r`` is the distance of each cell centre from the layer's axis (the incident particle for
    polar layers, the beam axis for cartesian ones).

    Returns:
        r_mean: shape (n, L), mm; r_width: shape (n, L), mm, ``sqrt(<r^2> - <r>^2)``.
        Empty layers give 0.
    """
    s, np_in = _t(showers)
    sums = _layer_moments(s, geometry, ("1", "r", "r2"))
    m1 = _safe_div(sums[..., 1], sums[..., 0])
    m2 = _safe_div(sums[..., 2], sums[..., 0])
    return _out(m1, np_in), _out(torch.sqrt(torch.clamp(m2 - m1 * m1, min=0.0)), np_in)


# --- occupancy -----------------------------------------------------------------------------------


def _threshold(threshold: float | Array, like: torch.Tensor) -> torch.Tensor:
    th, _ = _t(threshold, like=like)
    return th.reshape(-1, 1) if th.ndim >= 1 else th


def sparsity(showers: Array, threshold: float | Array = 0.0) -> Array:
    """Fraction of voxels at or below ``threshold`` (MeV, scalar or shape (n,)), shape (n,), in [0, 1]."""
    s, np_in = _t(showers)
    # counted on booleans: a float copy of the mask costs as much memory as the showers
    return _out((s <= _threshold(threshold, s)).sum(dim=1).to(s.dtype) / s.shape[1], np_in)


def layer_sparsity(showers: Array, geometry: Geometry, threshold: float | Array = 0.0) -> Array:
    """Fraction of each layer's voxels at or below ``threshold`` (MeV), shape (n, L)."""
    s, np_in = _t(showers)
    below = _layer_sum(s <= _threshold(threshold, s), geometry).to(s.dtype)
    sizes = torch.as_tensor(geometry.layer_sizes, dtype=s.dtype, device=s.device)
    return _out(below / sizes, np_in)


def n_hits(showers: Array, threshold: float | Array = 0.0) -> Array:
    """Number of voxels above ``threshold`` (MeV), shape (n,), float (integer-valued)."""
    s, np_in = _t(showers)
    return _out((s > _threshold(threshold, s)).sum(dim=1).to(s.dtype), np_in)


def voxel_spectrum(showers: Array, threshold: float = 0.0) -> Array:
    """Energies of all voxels above ``threshold``, flattened, shape (m,), MeV (m <= n V).

    The voxel energy spectrum is a distribution over voxels, not showers.
    """
    s, np_in = _t(showers)
    return _out(s[s > threshold], np_in)


# --- pooled voxels ---------------------------------------------------------------------------------


def pooled_size(geometry: Geometry, k: int) -> int:
    """Number of pooled cells :func:`pooled_voxels` gives with blocks of ``k`` x ``k`` cells."""
    return sum(math.ceil(h / k) * math.ceil(w / k) for h, w in (geometry.layer_shape(i)
                                                                for i in range(geometry.n_layers)))


def pooled_voxels(showers: Array, geometry: Geometry, k: int) -> Array:
    """Energy summed over blocks of ``k`` x ``k`` neighbouring cells within each layer.

    A layer image (rows, columns) is (y, x) for cartesian layers and (angular, radial) bins for
    polar ones; blocks start at the first row and column, and the last block of a row or column
    holds the remainder (``rows % k`` cells). Summing keeps each layer's energy, so the pooled
    shower has the same total and layer profile as the original.

    Args:
        showers: (n, V) MeV. k: block side in cells (1 returns ``showers`` unchanged).

    Returns:
        shape (n, P), MeV, P = :func:`pooled_size`; layer by layer, block rows slow, block columns fast.
    """
    s, np_in = _t(showers)
    if k == 1:
        return _out(s, np_in)
    parts = []
    for i in range(geometry.n_layers):
        h, w = geometry.layer_shape(i)
        img = s[:, geometry.layer_slice(i)].reshape(-1, h, w)
        img = F.pad(img, (0, (-w) % k, 0, (-h) % k))
        hb, wb = img.shape[1] // k, img.shape[2] // k
        parts.append(img.reshape(-1, hb, k, wb, k).sum(dim=(2, 4)).reshape(s.shape[0], hb * wb))
    return _out(torch.cat(parts, dim=1), np_in)


# --- crystal arrays ----------------------------------------------------------------------------------


def e1_e9_e25(showers: Array, geometry: Geometry, layer: int = 0) -> tuple[Array, Array]:
    """E1/E9 and E9/E25 of a cartesian layer (crystal arrays such as ``belle2-ecl-5x5``).

    E1 is the most energetic cell, E9 the 3x3 and E25 the 5x5 block centred on it (cells outside
    the array count zero, so for a 5x5 array with the maximum in the centre E25 is the total).

    Returns:
        e1_e9: shape (n,); e9_e25: shape (n,); dimensionless, 0 for empty showers.
    """
    seg = geometry.layers[layer].segmentation
    if not isinstance(seg, CartesianSegmentation):
        raise ValueError(f"E1/E9 needs a cartesian layer; layer {layer} of {geometry.name!r} is polar")
    s, np_in = _t(showers)
    img = s[:, geometry.layer_slice(layer)].reshape(-1, 1, seg.ny, seg.nx)
    e9 = F.avg_pool2d(img, 3, stride=1, padding=1, count_include_pad=True, divisor_override=1)
    e25 = F.avg_pool2d(img, 5, stride=1, padding=2, count_include_pad=True, divisor_override=1)
    flat = img.reshape(img.shape[0], -1)
    idx = flat.argmax(dim=1, keepdim=True)
    e1 = flat.gather(1, idx)[:, 0]
    e9m = e9.reshape(img.shape[0], -1).gather(1, idx)[:, 0]
    e25m = e25.reshape(img.shape[0], -1).gather(1, idx)[:, 0]
    return _out(_safe_div(e1, e9m), np_in), _out(_safe_div(e9m, e25m), np_in)


# --- longitudinal and radial profiles -----------------------------------------------------------------


def longitudinal_moments(showers: Array, geometry: Geometry) -> tuple[Array, Array]:
    """Longitudinal centre of gravity and RMS depth from the front face.

    Returns:
        z_mean: shape (n,), mm, ``sum_l E_l z_l / sum_l E_l`` with z_l = layer_z_centres();
        z_width: shape (n,), mm. Empty showers give 0.
    """
    s, np_in = _t(showers)
    e_l = _layer_sum(s, geometry)
    z = torch.as_tensor(geometry.layer_z_centres(), dtype=s.dtype, device=s.device)
    tot = e_l.sum(dim=1)
    m1 = _safe_div(e_l @ z, tot)
    m2 = _safe_div(e_l @ (z * z), tot)
    return _out(m1, np_in), _out(torch.sqrt(torch.clamp(m2 - m1 * m1, min=0.0)), np_in)


def radial_edges(geometry: Geometry) -> np.ndarray:
    """Default radial bin edges of :func:`radial_profile`, shape (k + 1,), mm.

    Polar geometries: the union of the layers' r edges. Cartesian: edges at 0 and
    (i + 1/2) x the smallest pitch, up to past the farthest cell centre, so that the centre
    cell, the first ring of cells, ... fall into consecutive bins.
    """
    segs = [la.segmentation for la in geometry.layers]
    if all(isinstance(sg, PolarSegmentation) for sg in segs):
        return np.unique(np.concatenate([np.asarray(sg.r_edges) for sg in segs if isinstance(sg, PolarSegmentation)]))
    pitch = min(min(sg.pitch_x, sg.pitch_y) if isinstance(sg, CartesianSegmentation) else sg.r_edges[1] for sg in segs)
    rmax = float(_voxel_tables(geometry)["r"].max())
    k = math.floor(rmax / pitch + 0.5) + 1
    return np.concatenate([[0.0], (np.arange(k) + 0.5) * pitch])


def radial_profile(showers: Array, geometry: Geometry, edges: np.ndarray | None = None) -> Array:
    """Energy in radial bins of the cell-centre radius, summed over layers.

    Args:
        showers: (n, V) MeV.
        edges: radial bin edges, shape (k + 1,), mm (default :func:`radial_edges`); cells beyond
            the last edge are not counted.

    Returns:
        shape (n, k), MeV.
    """
    s, np_in = _t(showers)
    e = radial_edges(geometry) if edges is None else np.asarray(edges, dtype=np.float64)
    r = _voxel_tables(geometry)["r"]
    b = np.searchsorted(e, r, side="right") - 1
    m = np.zeros((r.size, e.size - 1))
    ok = (b >= 0) & (b < e.size - 1)
    m[np.nonzero(ok)[0], b[ok]] = 1.0
    return _out(s @ torch.as_tensor(m, dtype=s.dtype, device=s.device), np_in)


# --- peaks ------------------------------------------------------------------------------------------------


def _local_max(img: torch.Tensor, circular_rows: bool) -> torch.Tensor:
    """Mask of cells >= all 8 neighbours; img (n, h, w); rows wrap around when circular_rows."""
    x = img.unsqueeze(1)
    if circular_rows and img.shape[1] > 2:
        x = torch.cat([x[:, :, -1:], x, x[:, :, :1]], dim=2)
        x = F.pad(x, (1, 1, 0, 0), value=-math.inf)
    else:
        x = F.pad(x, (1, 1, 1, 1), value=-math.inf)
    return img >= F.max_pool2d(x, 3, stride=1)[:, 0]


def _peaks_in(img: torch.Tensor, circular: bool, th: torch.Tensor) -> torch.Tensor:
    return ((img > th.reshape(-1, 1, 1)) & _local_max(img, circular)).sum(dim=(1, 2))


def n_peaks(showers: Array, geometry: Geometry, threshold: float | Array = 0.0) -> Array:
    """Number of local maxima above ``threshold`` (MeV, scalar or shape (n,)), shape (n,).

    A peak is a cell strictly above the threshold and at least as large as its 8 neighbours
    (angular bins wrap around in polar layers). When all layers share one segmentation the
    peaks are counted in the depth-summed image (two separated clusters = 2 however many layers
    they cross); otherwise the result is the largest count found in any single layer.
    """
    s, np_in = _t(showers)
    th = _threshold(threshold, s).reshape(-1)
    th = th.expand(s.shape[0]) if th.numel() == 1 else th
    if geometry.is_uniform:
        seg = geometry.layers[0].segmentation
        img = s.reshape(s.shape[0], geometry.n_layers, *seg.shape).sum(dim=1)
        out = _peaks_in(img, isinstance(seg, PolarSegmentation), th)
    else:
        counts = []
        for i, la in enumerate(geometry.layers):
            img = s[:, geometry.layer_slice(i)].reshape(s.shape[0], *la.segmentation.shape)
            counts.append(_peaks_in(img, isinstance(la.segmentation, PolarSegmentation), th))
        out = torch.stack(counts, dim=1).max(dim=1).values
    return _out(out.to(s.dtype), np_in)


# --- air-shower profiles ------------------------------------------------------------------------------------


def profile_shape(profiles: Array, geometry: Geometry, channel: int = 0, half_window: int = 5) -> dict[str, Array]:
    """Xmax, dE/dX_max and width of longitudinal air-shower profiles.

    Xmax is the vertex of a least-squares parabola through the ``2 half_window + 1`` bins
    around the largest bin (window shifted to stay inside the axis); if the fit is not concave
    or its vertex leaves the window, the centre of the largest bin is used.

    Args:
        profiles: (n, C x B) flattened channels of the ``geometry.profile`` axis (B bins each);
            channel 0 is dE/dX in MeV/(g/cm^2).
        channel: which channel to analyse.

    Returns:
        ``Xmax`` (n,) g/cm^2; ``dEdX_max`` (n,) in the channel's unit (parabola value at Xmax);
        ``X_width`` (n,) g/cm^2, the profile-weighted RMS slant depth; ``X_mean`` (n,) g/cm^2.
    """
    if geometry.profile is None:
        raise ValueError(f"geometry {geometry.name!r} has no profile axis")
    ax = geometry.profile
    p, np_in = _t(profiles)
    y = p[:, geometry.layer_slice(channel)]
    b = y.shape[1]
    x = torch.as_tensor(ax.centres(), dtype=y.dtype, device=y.device)
    w = min(2 * half_window + 1, b)
    imax = y.argmax(dim=1)
    start = torch.clamp(imax - w // 2, 0, b - w)
    idx = start.unsqueeze(1) + torch.arange(w, device=y.device)
    win = y.gather(1, idx)
    t = torch.arange(w, dtype=y.dtype, device=y.device) - (w - 1) / 2
    design = torch.stack([torch.ones_like(t), t, t * t], dim=1)  # (w, 3)
    coef = win @ torch.linalg.pinv(design).T  # (n, 3): c0 + c1 t + c2 t^2
    c0, c1, c2 = coef.unbind(dim=1)
    concave = c2 < 0
    tv = torch.where(concave, -c1 / (2 * torch.where(concave, c2, -torch.ones_like(c2))), torch.zeros_like(c2))
    ok = concave & (tv.abs() <= (w - 1) / 2)
    centre = start.to(y.dtype) + (w - 1) / 2
    t_best = torch.where(ok, tv, imax.to(y.dtype) - centre)
    xmax = (centre + t_best + 0.5) * ax.dx
    ymax = torch.where(ok, c0 + c1 * tv + c2 * tv * tv, y.max(dim=1).values)
    tot = y.sum(dim=1)
    m1 = _safe_div(y @ x, tot)
    m2 = _safe_div(y @ (x * x), tot)
    width = torch.sqrt(torch.clamp(m2 - m1 * m1, min=0.0))
    return {k: _out(v, np_in) for k, v in {"Xmax": xmax, "dEdX_max": ymax, "X_width": width, "X_mean": m1}.items()}


# --- everything at once --------------------------------------------------------------------------------------


def observable_names(geometry: Geometry) -> list[str]:
    """Names of the scalar observables :func:`compute_observables` returns, in order."""
    if geometry.profile is not None:
        return ["E_tot", "E_tot/E_inc", "Xmax", "dEdX_max", "X_width", "X_mean"]
    names = ["E_tot/E_inc", "E_tot", "max_cell", "sparsity", "n_hits", "n_peaks"]
    if geometry.n_layers > 1:  # one layer: the depth centre is that layer's and the width 0, for every shower
        names += ["z_centre", "z_width"]
    if _is_crystal_array(geometry):
        names += ["E1/E9", "E9/E25"]
    for i, la in enumerate(geometry.layers):
        if geometry.n_layers > 1:
            names.append(f"E_layer_{i}")
        if _has_xy(la.segmentation):
            names += [f"x_centre_{i}", f"y_centre_{i}", f"x_width_{i}", f"y_width_{i}"]
        names += [f"r_centre_{i}", f"r_width_{i}"]
        if geometry.n_layers > 1:
            names.append(f"sparsity_{i}")
    return names


def challenge_high_level(high: np.ndarray, names: Sequence[str], log10_e_inc: np.ndarray) -> np.ndarray | None:
    """The CaloChallenge's high-level classifier input from fastshower's observables, or None where the
    detector has no per-layer x/y centres (one layer, or no angular bins).

    Args:
        high: (m, n_obs) observables in the order ``names`` (:func:`observable_names`), MeV and mm.
        log10_e_inc: (m,) log10(E_inc / MeV).

    Returns (m, 1 + 5 L): log10(E_inc), log10(E_layer + 1e-8), then x centres, y centres, x widths and
    y widths (mm / 100) of every layer: the features and scalings of ``prepare_high_data_for_classifier``
    in the challenge's evaluation script (its eta and phi are this x and y). fastshower's own high-level
    classifier sees every observable (also sparsity, hottest cell, hits, radial moments): a stricter test.
    """
    col = {n: i for i, n in enumerate(names)}
    n_layers = sum(1 for n in names if n.startswith("E_layer_"))
    if n_layers < 2 or any(f"x_centre_{i}" not in col for i in range(n_layers)):
        return None

    def take(key: str) -> np.ndarray:  # (m, L)
        return high[:, [col[f"{key}_{i}"] for i in range(n_layers)]]

    parts = [log10_e_inc.reshape(-1, 1), np.log10(np.clip(take("E_layer"), 0.0, None) + 1e-8)]
    parts += [take(k) / 1e2 for k in ("x_centre", "y_centre", "x_width", "y_width")]
    return np.concatenate(parts, axis=1).astype(np.float64)


def _is_crystal_array(geometry: Geometry) -> bool:
    if geometry.n_layers != 1 or not isinstance(geometry.layers[0].segmentation, CartesianSegmentation):
        return False
    seg = geometry.layers[0].segmentation
    return seg.nx >= 3 and seg.ny >= 3


def _has_xy(seg: CartesianSegmentation | PolarSegmentation) -> bool:
    return isinstance(seg, CartesianSegmentation) or seg.n_alpha > 1


def compute_observables(
    showers: Array,
    energies: Array,
    geometry: Geometry,
    threshold: float = 0.0,
    peak_fraction: float = 0.02,
) -> dict[str, Array]:
    """All scalar per-shower observables, name -> shape (n,) (names: :func:`observable_names`).

    Args:
        showers: (n, V) MeV. energies: (n,) MeV.
        threshold: cell threshold for sparsity and hits, MeV.
        peak_fraction: a peak must exceed this fraction of the shower's visible energy.

    Units: energies MeV, positions and widths mm, ratios/fractions dimensionless, counts as
    floats; air-shower quantities in g/cm^2 and the profile's unit.
    """
    s, np_in = _t(showers)
    e, _ = _t(energies, like=s)
    e = e.reshape(-1)
    out: dict[str, torch.Tensor] = {}
    tot = s.sum(dim=1)
    out["E_tot"] = tot
    out["E_tot/E_inc"] = tot / e
    if geometry.profile is not None:
        prof = profile_shape(s, geometry)
        out.update(prof)
        return {k: _out(out[k], np_in) for k in observable_names(geometry)}
    out["max_cell"] = s.max(dim=1).values
    out["sparsity"] = sparsity(s, threshold)
    out["n_hits"] = n_hits(s, threshold)
    out["n_peaks"] = n_peaks(s, geometry, torch.clamp(peak_fraction * tot, min=threshold))
    if geometry.n_layers > 1:
        out["z_centre"], out["z_width"] = longitudinal_moments(s, geometry)
    if _is_crystal_array(geometry):
        out["E1/E9"], out["E9/E25"] = e1_e9_e25(s, geometry)
    e_l = layer_energies(s, geometry)
    c, w = centre_of_energy(s, geometry)
    rm, rw = layer_r_moments(s, geometry)
    sp = layer_sparsity(s, geometry, threshold)
    for i in range(geometry.n_layers):
        out[f"E_layer_{i}"] = e_l[:, i]
        out[f"x_centre_{i}"], out[f"y_centre_{i}"] = c[:, i, 0], c[:, i, 1]
        out[f"x_width_{i}"], out[f"y_width_{i}"] = w[:, i, 0], w[:, i, 1]
        out[f"r_centre_{i}"], out[f"r_width_{i}"] = rm[:, i], rw[:, i]
        out[f"sparsity_{i}"] = sp[:, i]
    return {k: _out(out[k], np_in) for k in observable_names(geometry)}
