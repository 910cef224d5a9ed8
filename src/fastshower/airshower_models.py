"""Generative models of air-shower longitudinal profiles (geometry ``airshower-profile``).

The pieces that are specific to profiles, around the generic registry/fit loop:

- :data:`PROFILE_CONFIGS`: training configs of the KIT design (a conditional WGAN-GP on
  log energy, zenith, azimuth and the primary, ln A) and of conditional flow matching, for
  :func:`fastshower.train.train`.
- :func:`prepare_training_file`: merge the files of several primaries into one training file
  (:func:`fastshower.io.merge_files`, ``add_condition="primary"``, ln A per input) with the
  below-ground bins continued smoothly (:func:`fill_below_ground`); generation zeroes them again
  (:func:`fastshower.sample.zero_below_ground`), which inverts the fill exactly. Without the fill the
  zenith-dependent ground makes the bins between 1036 and ~2450 g/cm^2 bimodal in model space and
  the WGAN-GP made spikes there (Xmax separation power 0.076, with the fill 0.027, floor 0.024; see
  benchmarks/results/airshower_models*.json).
- :func:`gaisser_hillas_profiles` / :func:`write_synthetic_profiles`: realistic synthetic
  profiles (Gaisser-Hillas shapes with shower-to-shower and bin-to-bin fluctuations, zero
  below ground) for tests and for the large-file streaming benchmark; not a physics reference.
- :func:`mirror_generate`: generate one model profile for every reference profile, with the
  same energy, zenith, azimuth and primary, so that the two files compare bin by bin.
- :func:`xmax_moments` / :func:`compare_xmax_moments`: <Xmax> and RMS(Xmax) per primary and
  energy bin, the quantities composition analyses are built on.
- :func:`physicality`: checks that generated profiles are non-negative, finite and exactly
  zero below ground; :func:`profile_roughness`: bin-to-bin noise of dE/dX.

Units: energies in MeV in files (eV where the name says so), slant depths in g/cm^2, dE/dX in
MeV/(g/cm^2), Ne a number of charged particles, angles in degrees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastshower.geometry import Geometry, get_geometry
from fastshower.io import ShowerBatch, ShowerFile, ShowerFileError, ShowerWriter, merge_files, primary_ln_a
from fastshower.sample import GROUND_VERTICAL_DEPTH, Run, below_ground_mask, load_run, sample_batch
from fastshower.validate.observables import profile_shape

__all__ = [
    "FILL_DECAY_LENGTH",
    "PROFILE_CONFIGS",
    "compare_xmax_moments",
    "fill_below_ground",
    "gaisser_hillas_profiles",
    "mirror_generate",
    "physicality",
    "prepare_training_file",
    "profile_roughness",
    "write_synthetic_profiles",
    "xmax_moments",
]

#: training configs (``fastshower.train.train(config=...)``) for profile models; ``[train] steps`` is
#: set by the caller. The WGAN-GP follows the KIT profile-GAN design (dense generator and critic on the
#: flattened dE/dX + Ne profile, conditioned on log E, zenith, azimuth and ln A).
PROFILE_CONFIGS: dict[str, dict[str, Any]] = {
    "wgan-gp": {
        "model": "wgan-gp",
        "hparams": {"latent_dim": 64, "hidden": 256, "n_hidden": 3, "arch": "dense", "lr": 2e-4,
                    "n_critic": 5, "constrainer_warmup": 500},
        "train": {"batch_size": 128, "log_every": 100, "checkpoint_every": 100000},
    },
    # wider than the 640-value profile: at hidden 256 the residual MLP's bottleneck cannot cancel the
    # per-bin noise the ODE starts from, and profiles came out rough (Xmax separation power 0.55);
    # at 768 x 3 it is 0.058 with the same 240 s budget (benchmarks/results/airshower_models.json)
    "flow-matching": {
        "model": "flow-matching",
        "hparams": {"net": "mlp", "hidden": 768, "depth": 3, "steps": 16, "method": "midpoint",
                    "warmup": 200, "lr": 1e-3},
        "train": {"batch_size": 128, "log_every": 100, "checkpoint_every": 100000},
    },
}

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
    attrs = {"seed": seed, "synthetic": "Gaisser-Hillas with fluctuations (fastshower.airshower_models)",
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
    below-ground bins again (:func:`fastshower.sample.zero_below_ground`), which inverts this fill
    exactly, since the fill touches only bins that the postprocess zeroes.

    The continuation of bin ``i >= k`` (``k`` = first bin starting at or beyond the ground, see
    :func:`fastshower.sample.below_ground_mask`) is ``v[k - 2] exp(-(i - k + 2) dx / decay_length)``
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
) -> Path:
    """Merge reference files of several primaries into one training file (condition ``primary`` = ln A),
    with the below-ground bins continued smoothly (:func:`fill_below_ground`) when ``fill_ground``.

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
            "ground (fastshower.airshower_models.fill_below_ground); generation zeroes them again"
            if fill_ground else "none")
    return merge_files(inputs, out, add_condition="primary", chunk_rows=chunk_rows,
                       map_batch=fill if fill_ground else None, attrs={"below_ground_fill": note})


# --- generation and scoring -------------------------------------------------------------------------------


def mirror_generate(
    run: str | Path | Run,
    reference: str | Path,
    out: str | Path,
    *,
    batch_size: int = 10000,
    seed: int = 0,
    particle: str | None = None,
    sample_options: Mapping[str, Any] | None = None,
) -> Path:
    """Generate one profile per reference profile, with the reference's energy and conditions.

    A run conditioned on ``primary`` (ln A) whose reference file has no such condition (a file of
    one primary) gets ln A of the reference's particle. Values below ground are zero
    (:func:`fastshower.sample.zero_below_ground`). The output's ``particle`` is the reference's
    (or ``particle``), so :func:`fastshower.validate.evaluate.evaluate` accepts the pair.

    Args:
        run: run folder or :func:`fastshower.sample.load_run` tuple.
        reference: reference shower file (its energies (N,) MeV and conditions drive generation).
        out: new output file.
        batch_size: profiles per generation batch.
        seed: seeds the model's noise.
        particle: ``particle`` attribute of the output (default: the reference's).
        sample_options: passed to the model's ``sample`` (e.g. {"steps": 16}).
    """
    model, transform, info = load_run(run) if isinstance(run, (str, Path)) else run
    gen = torch.Generator().manual_seed(seed)
    opts = dict(sample_options or {})
    with ShowerFile(reference) as ref:
        fill: dict[str, float] = {}
        missing = [k for k in info.cond_names if k not in ref.condition_names]
        for k in missing:
            if k != "primary":
                raise ShowerFileError(f"{reference} has no condition {k!r} that run {info.run_id} needs")
            fill[k] = primary_ln_a(ref.particle)
        widths = dict(zip(info.cond_names, info.cond_widths, strict=True))
        attrs = {"seed": seed, "model": info.model_name, "run": str(info.run_dir.resolve()), "run_step": info.step,
                 "mirrors": str(Path(reference).resolve()), "sample_options": opts,
                 "threshold_mev": info.threshold_mev}
        name = f"{info.model_name} run {info.run_id} step {info.step} mirroring {Path(reference).name}"
        with ShowerWriter(out, info.geometry, particle or ref.particle, name, ref.n, widths, attrs) as w:
            for batch in ref.iter_chunks(batch_size, check=False):
                m = len(batch)
                conds = {k: batch.conditions[k] if k in batch.conditions else np.full((m, 1), fill[k])
                         for k in info.cond_names}
                showers = sample_batch(model, transform, batch.energies, conds, gen, info.threshold_mev,
                                       geometry=info.geometry, **opts)
                w.append(ShowerBatch(batch.energies, showers, conds))
    return Path(out)


def _primary_labels(f: ShowerFile, m: int, start: int) -> np.ndarray:
    """Per-row primary label (n,) of a file: from conditions/primary (ln A, rounded), else the file's particle."""
    if "primary" in f.condition_names:
        lna = np.asarray(f._f["conditions"]["primary"][start:start + m], dtype=np.float64).reshape(-1)
        names = {round(primary_ln_a(p), 3): p for p in ("p", "He", "N", "Fe")}
        return np.array([names.get(round(v, 3), f"lnA={v:.3f}") for v in lna])
    return np.full(m, f.particle)


def xmax_moments(
    path: str | Path,
    log10_e_edges: Sequence[float] = (17.0, 17.5, 18.0, 18.5, 19.0),
    chunk_rows: int = 8192,
) -> list[dict[str, Any]]:
    """<Xmax> and RMS(Xmax) per primary and energy bin, Xmax from the dE/dX channel.

    Xmax is :func:`fastshower.validate.observables.profile_shape`'s parabola vertex (the same
    estimator for reference and model). Errors: RMS / sqrt(n) on the mean, RMS / sqrt(2 (n - 1)) on
    the RMS (Gaussian approximation).

    Returns:
        One dict per (primary, bin) with primary, lg_e_lo, lg_e_hi (log10 E/eV), n, mean,
        mean_error, rms, rms_error (g/cm^2); bins with fewer than 2 profiles are left out.
    """
    edges = np.asarray(log10_e_edges, dtype=np.float64)
    values: dict[tuple[str, int], list[np.ndarray]] = {}
    with ShowerFile(path) as f:
        for start in range(0, f.n, chunk_rows):
            b = f.read(start, start + chunk_rows, check=False)
            xmax = profile_shape(b.showers.astype(np.float64), f.geometry)["Xmax"]
            lg = np.log10(b.energies * 1e6)
            eb = np.clip(np.searchsorted(edges, lg, side="right") - 1, 0, len(edges) - 2)
            prim = _primary_labels(f, len(b), start)
            for p in np.unique(prim):
                for j in range(len(edges) - 1):
                    m = (prim == p) & (eb == j)
                    if m.any():
                        values.setdefault((str(p), j), []).append(xmax[m])
    rows = []
    for (p, j), parts in sorted(values.items()):
        x = np.concatenate(parts)
        if len(x) < 2:
            continue
        rms = float(x.std(ddof=1))
        rows.append({"primary": p, "lg_e_lo": float(edges[j]), "lg_e_hi": float(edges[j + 1]), "n": len(x),
                     "mean": float(x.mean()), "mean_error": rms / math.sqrt(len(x)),
                     "rms": rms, "rms_error": rms / math.sqrt(2 * (len(x) - 1))})
    return rows


def compare_xmax_moments(reference: str | Path, candidate: str | Path,
                         log10_e_edges: Sequence[float] = (17.0, 17.5, 18.0, 18.5, 19.0)) -> list[dict[str, Any]]:
    """Reference vs candidate <Xmax> and RMS per primary and energy bin, with differences and pulls.

    Returns:
        One dict per bin present in both: primary, lg_e_lo, lg_e_hi, n_ref, n_model, mean_ref, mean_model,
        d_mean (model - reference, g/cm^2), pull_mean (d_mean / combined error), rms_ref, rms_model,
        d_rms, pull_rms.
    """
    ref = {(r["primary"], r["lg_e_lo"]): r for r in xmax_moments(reference, log10_e_edges)}
    cand = {(r["primary"], r["lg_e_lo"]): r for r in xmax_moments(candidate, log10_e_edges)}
    out = []
    for key in sorted(set(ref) & set(cand)):
        r, c = ref[key], cand[key]
        d_mean, d_rms = c["mean"] - r["mean"], c["rms"] - r["rms"]
        out.append({
            "primary": key[0], "lg_e_lo": r["lg_e_lo"], "lg_e_hi": r["lg_e_hi"], "n_ref": r["n"], "n_model": c["n"],
            "mean_ref": r["mean"], "mean_model": c["mean"], "d_mean": d_mean,
            "pull_mean": d_mean / math.hypot(r["mean_error"], c["mean_error"]),
            "rms_ref": r["rms"], "rms_model": c["rms"], "d_rms": d_rms,
            "pull_rms": d_rms / math.hypot(r["rms_error"], c["rms_error"]),
        })
    return out


def profile_roughness(profiles: np.ndarray, geometry: Geometry, x_range: tuple[float, float] = (200.0, 900.0)) -> float:
    """Bin-to-bin roughness of dE/dX: median over profiles of the median |ln dEdX[i+1] - ln dEdX[i]|.

    Only bins whose centres lie in ``x_range`` (g/cm^2) and pairs where both values are > 0 count. A
    smooth simulated profile gives a few 0.01 (10 g/cm^2 bins); per-bin noise in generated profiles
    shows up as a larger value and breaks the Xmax fit.

    Args:
        profiles: (n, C x B) profiles, channel 0 dE/dX.
        geometry: profile geometry.
        x_range: slant-depth window, g/cm^2.
    """
    if geometry.profile is None:
        raise ValueError(f"geometry {geometry.name!r} has no profile axis")
    x = geometry.profile.centres()
    sel = (x >= x_range[0]) & (x <= x_range[1])
    y = np.asarray(profiles, dtype=np.float64)[:, geometry.layer_slice(0)][:, sel]
    ok = (y[:, 1:] > 0) & (y[:, :-1] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(ok, np.abs(np.diff(np.log(np.where(y > 0, y, 1.0)), axis=1)), np.nan)
    per = np.nanmedian(np.where(ok.any(axis=1, keepdims=True), d, 0.0), axis=1)
    return float(np.nanmedian(per))


def physicality(path: str | Path, chunk_rows: int = 8192) -> dict[str, Any]:
    """Physical-validity counts of a profile file (generated or reference).

    Returns:
        n (profiles), n_nonfinite and n_negative (values), n_nonzero_below_ground (values in bins that
        start at or beyond 1036 g/cm^2 / cos(zenith); needs conditions/zenith, else None),
        max_below_ground (largest such value), all_physical (bool).
    """
    n = n_nonfinite = n_negative = n_below = 0
    max_below = 0.0
    with ShowerFile(path) as f:
        has_zenith = "zenith" in f.condition_names
        for start in range(0, f.n, chunk_rows):
            b = f.read(start, start + chunk_rows, check=False)
            s = b.showers
            n += len(b)
            n_nonfinite += int((~np.isfinite(s)).sum())
            n_negative += int((s < 0).sum())
            if has_zenith:
                mask = below_ground_mask(f.geometry, torch.from_numpy(b.conditions["zenith"])).numpy()
                bad = mask & (s != 0)
                n_below += int(bad.sum())
                if bad.any():
                    max_below = max(max_below, float(np.abs(s[bad]).max()))
    return {"n": n, "n_nonfinite": n_nonfinite, "n_negative": n_negative,
            "n_nonzero_below_ground": n_below if has_zenith else None,
            "max_below_ground": max_below if has_zenith else None,
            "all_physical": n_nonfinite == 0 and n_negative == 0 and (not has_zenith or n_below == 0)}
