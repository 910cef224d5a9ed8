"""Air-shower training data: synthetic Gaisser-Hillas profiles and training files with the ground filled.

Units: energies in MeV in files (eV where the name says so), slant depths in g/cm^2, dE/dX in
MeV/(g/cm^2), Ne a number of charged particles, angles in degrees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fastshower.geometry import GROUND_VERTICAL_DEPTH, Geometry, get_geometry
from fastshower.io import ShowerBatch, ShowerFile, ShowerFileError, ShowerWriter, merge_files, primary_ln_a
from fastshower.sampling import below_ground_mask

__all__ = [
    "FILL_DECAY_LENGTH",
    "fill_below_ground",
    "gaisser_hillas_profiles",
    "prepare_training_file",
    "write_synthetic_profiles",
]

# synthetic-profile parameters: <Xmax> at 1e18 eV (g/cm^2) for ln A = 0 and the elongation rate per decade,
# close to the reference's published values (DESIGN.md section 6)
_XMAX_P_18, _XMAX_FE_18, _ELONGATION = 745.0, 645.0, 57.0


def gaisser_hillas_profiles(
    geometry: Geometry,
    energies_mev: np.ndarray,
    zenith_deg: np.ndarray,
    ln_a: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic profiles: Gaisser-Hillas shapes with fluctuations, zero below ground.

    dE/dX(X) = k ((X - X0) / (Xmax - X0))^((Xmax - X0) / lambda) exp((Xmax - X) / lambda) for X > X0,
    normalised to a calorimetric energy of 0.9 E0 above ground; Ne = dE/dX / 2.2 MeV/(g/cm^2)
    times (1 + 2 % noise). <Xmax> is linear in lg E and ln A (elongation 57 g/cm^2 per decade,
    p 745 and Fe 645 g/cm^2 at 1e18 eV); the Xmax fluctuation is an exponential tail (scale 50 g/cm^2
    for p, 12 for Fe, linear in ln A) plus a Gaussian (sigma 35 for p, 10 for Fe), i.e. RMS ~ 61 and
    ~ 16 g/cm^2; lambda ~ N(65, 5) g/cm^2, X0 ~ Xmax - 600 g/cm^2 (spread 40); every bin gets 1 % log-normal noise.
    The bin holding the ground keeps the fraction of the bin above ground, as in the reference.

    Args:
        geometry: profile geometry with channels (dEdX, Ne).
        energies_mev: primary energies (n,), MeV.
        zenith_deg: zenith angles (n,), degrees.
        ln_a: ln of the primaries' mass numbers (n,).
        rng: random numbers.

    Returns:
        profiles (n, 2 B) float32 [dE/dX MeV/(g/cm^2) ..., Ne ...], true Xmax (n,) g/cm^2.
    """
    if geometry.profile is None or len(geometry.profile.channels) != 2:
        raise ValueError(f"geometry {geometry.name!r} is not a two-channel profile geometry")
    ax = geometry.profile
    n = len(energies_mev)
    e = np.asarray(energies_mev, dtype=np.float64).reshape(n)
    lna = np.asarray(ln_a, dtype=np.float64).reshape(n)
    lg = np.log10(e * 1e6) - 18.0
    frac = lna / math.log(56.0)
    mean = _XMAX_P_18 + (_XMAX_FE_18 - _XMAX_P_18) * frac + _ELONGATION * lg
    tail = 50.0 * (1 - frac) + 12.0 * frac  # exponential part of the fluctuation, g/cm^2
    xmax = mean - tail + rng.exponential(1.0, n) * tail + rng.normal(0.0, 10.0 + 25.0 * (1 - frac), n)
    lam = rng.normal(65.0, 5.0, n).clip(40.0, 90.0)
    x0 = xmax - rng.normal(600.0, 40.0, n).clip(300.0, 900.0)
    x = ax.centres()[None, :]  # (1, B)
    t = np.clip((x - x0[:, None]) / (xmax - x0)[:, None], 1e-12, None)
    log_f = ((xmax - x0) / lam)[:, None] * np.log(t) + (xmax[:, None] - x) / lam[:, None]
    f = np.where(x > x0[:, None], np.exp(log_f), 0.0)
    f *= np.exp(rng.normal(0.0, 0.01, f.shape))
    x_ground = GROUND_VERTICAL_DEPTH / np.cos(np.radians(np.asarray(zenith_deg, dtype=np.float64).reshape(n)))
    lo = np.arange(ax.n_bins)[None, :] * ax.dx
    above = np.clip((x_ground[:, None] - lo) / ax.dx, 0.0, 1.0)  # fraction of each bin above ground
    norm = 0.9 * e / (f.sum(axis=1) * ax.dx)  # deposit 0.9 E0 over the full axis
    dedx = f * norm[:, None] * above
    ne = dedx / 2.2 * (1.0 + 0.02 * rng.standard_normal(dedx.shape)).clip(0.5, None)
    return np.concatenate([dedx, ne], axis=1).astype(np.float32), xmax


def write_synthetic_profiles(
    path: str | Path,
    n: int,
    seed: int = 0,
    primaries: Sequence[str] = ("p", "Fe"),
    log10_e_ev: tuple[float, float] = (17.0, 19.0),
    zenith_deg: tuple[float, float] = (0.0, 65.0),
    chunk_rows: int = 8192,
    compression: str | None = "gzip",
    geometry: Geometry | None = None,
    bank_size: int | None = None,
) -> Path:
    """Stream ``n`` synthetic profiles (:func:`gaisser_hillas_profiles`) into a new shower file.

    Energies are log-uniform over ``log10_e_ev``, zenith uniform in cos^2 over ``zenith_deg``
    (as the reference generator draws them), azimuth uniform in [0, 360), the primary drawn uniformly
    from ``primaries``. The file has conditions zenith, azimuth, primary (ln A) and truth xmax,
    like a merged reference file; memory holds one chunk.

    ``bank_size``: when set, ``bank_size`` distinct profiles are drawn once and the file is filled with
    rows drawn at random from that bank (with their conditions): ~20x faster for multi-GB I/O benchmarks,
    at the price of repeated profiles (memory: the bank, ``bank_size`` x 2.6 kB).
    """
    geo = geometry or get_geometry("airshower-profile")
    rng = np.random.default_rng(seed)
    lna_choices = np.array([primary_ln_a(p) for p in primaries])
    c_lo, c_hi = (math.cos(math.radians(z)) ** 2 for z in (zenith_deg[1], zenith_deg[0]))
    attrs = {"seed": seed, "synthetic": "Gaisser-Hillas with fluctuations (fastshower.airshower)",
             "merge_condition": "primary", "merge_condition_values": {p: primary_ln_a(p) for p in primaries},
             "bank_size": bank_size or 0}
    bank: ShowerBatch | None = None
    if bank_size:
        parts = [_draw_synthetic(geo, min(4096, bank_size - a), rng, lna_choices, log10_e_ev, (c_lo, c_hi))
                 for a in range(0, bank_size, 4096)]  # in pieces: the float64 temporaries stay small
        bank = ShowerBatch(np.concatenate([b.energies for b in parts]), np.concatenate([b.showers for b in parts]),
                           {k: np.concatenate([b.conditions[k] for b in parts]) for k in parts[0].conditions},
                           {k: np.concatenate([b.truth[k] for b in parts]) for k in parts[0].truth})
    with ShowerWriter(path, geo, "+".join(primaries), "synthetic Gaisser-Hillas profiles", n,
                      {"zenith": 1, "azimuth": 1, "primary": 1}, attrs, truth={"xmax": 1},
                      compression=compression) as w:
        while w.n_written < n:
            m = min(chunk_rows, n - w.n_written)
            if bank is None:
                w.append(_draw_synthetic(geo, m, rng, lna_choices, log10_e_ev, (c_lo, c_hi)))
            else:
                idx = np.sort(rng.integers(0, len(bank), m))
                w.append(ShowerBatch(bank.energies[idx], bank.showers[idx],
                                     {k: v[idx] for k, v in bank.conditions.items()},
                                     {k: v[idx] for k, v in bank.truth.items()}))
    return Path(path)


def _draw_synthetic(geo: Geometry, m: int, rng: np.random.Generator, lna_choices: np.ndarray,
                    log10_e_ev: tuple[float, float], cos2_range: tuple[float, float]) -> ShowerBatch:
    """``m`` synthetic profiles with conditions zenith, azimuth, primary (ln A) and truth xmax."""
    e = 10.0 ** rng.uniform(*log10_e_ev, m) * 1e-6
    zen = np.degrees(np.arccos(np.sqrt(rng.uniform(*cos2_range, m))))
    lna = lna_choices[rng.integers(0, len(lna_choices), m)]
    prof, xmax = gaisser_hillas_profiles(geo, e, zen, lna, rng)
    return ShowerBatch(e, prof, {"zenith": zen[:, None], "azimuth": rng.uniform(0, 360, (m, 1)),
                                 "primary": lna[:, None]}, {"xmax": xmax[:, None]})

# --- training data ------------------------------------------------------------------------------------------

#: e-folding length of the below-ground continuation used for training files, g/cm^2
FILL_DECAY_LENGTH = 100.0


def fill_below_ground(showers: np.ndarray, geometry: Geometry, zenith_deg: np.ndarray,
                      decay_length: float = FILL_DECAY_LENGTH) -> np.ndarray:
    """Replace the (zero) below-ground bins by a smooth, exponentially falling continuation.

    Why: below ground a profile is exactly zero, and where the ground lies depends on the zenith
    angle, so a slant-depth bin between 1036 and ~2450 g/cm^2 is zero for some showers and large for
    others. After the log transform and per-bin standardisation these bins are bimodal, and a model
    makes spikes there (seen with the WGAN-GP: humps at 1050-1150 g/cm^2 that moved Xmax). Training
    on profiles continued smoothly below ground removes the bimodality; generation then zeroes the
    below-ground bins again (:func:`fastshower.sampling.zero_below_ground`), which inverts this fill
    exactly, since the fill touches only bins that the postprocess zeroes.

    The continuation of bin ``i >= k`` (``k`` = first bin starting at or beyond the ground, see
    :func:`fastshower.sampling.below_ground_mask`) is ``v[k - 2] exp(-(i - k + 2) dx / decay_length)``
    per channel, from the last bin wholly above ground; the bin holding the ground keeps its value.

    Args:
        showers: profiles (n, C x B), channels of the geometry's profile axis.
        geometry: profile geometry.
        zenith_deg: zenith angles (n,) or (n, 1), degrees.
        decay_length: e-folding length of the continuation, g/cm^2.

    Returns:
        A new float32 array (n, C x B).
    """
    if geometry.profile is None:
        raise ValueError(f"geometry {geometry.name!r} has no profile axis")
    ax = geometry.profile
    nb, nc = ax.n_bins, len(ax.channels)
    n = showers.shape[0]
    first = (~below_ground_mask(geometry, torch.as_tensor(np.asarray(zenith_deg, dtype=np.float64)))
             .numpy()[:, :nb]).sum(axis=1)  # (n,) index k of the first bin below ground (nb: none)
    src = np.clip(first - 2, 0, nb - 1)
    s = np.array(showers, dtype=np.float32).reshape(n, nc, nb)
    i = np.arange(nb)
    base = s[np.arange(n), :, src]  # (n, C)
    decay = np.exp(-np.clip(i[None, :] - src[:, None], 0, None) * ax.dx / decay_length)  # (n, B)
    below = i[None, :] >= first[:, None]
    s = np.where(below[:, None, :], base[:, :, None] * decay[:, None, :], s)
    return s.reshape(n, nc * nb).astype(np.float32)


def prepare_training_file(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    fill_ground: bool = True,
    decay_length: float = FILL_DECAY_LENGTH,
    chunk_rows: int = 4096,
    resume: bool = False,
) -> Path:
    """Merge reference files of several primaries into one training file (condition ``primary`` = ln A),
    with the below-ground bins continued smoothly (:func:`fill_below_ground`) when ``fill_ground``;
    ``resume`` finishes an interrupted one (see :func:`fastshower.io.merge_files`).

    Only training files should be filled: scoring compares generated profiles (zeroed below ground)
    with the unfilled reference. The output's ``below_ground_fill`` attribute records the fill.
    """
    with ShowerFile(inputs[0]) as f0:
        geo = f0.geometry
        if geo.profile is None or "zenith" not in f0.condition_names:
            raise ShowerFileError(f"{inputs[0]}: not a profile file with a zenith condition")

    def fill(batch: ShowerBatch) -> ShowerBatch:
        batch.showers = fill_below_ground(batch.showers, geo, batch.conditions["zenith"], decay_length)
        return batch

    note = (f"below-ground bins continued as exp(-dX/{decay_length:g} g/cm^2) from the last full bin above "
            "ground (fastshower.airshower.fill_below_ground); generation zeroes them again"
            if fill_ground else "none")
    return merge_files(inputs, out, add_condition="primary", chunk_rows=chunk_rows,
                       map_batch=fill if fill_ground else None, attrs={"below_ground_fill": note}, resume=resume)

