"""CONEX-like hybrid air-shower generator on SIBYLL-2.3d (via ``chromo``).

The longitudinal profile of an extensive air shower is built the way CONEX does it
(Bergmann et al., Astropart. Phys. 26 (2007) 420, astro-ph/0606564): the high-energy
part of the hadronic cascade is followed by explicit Monte Carlo, everything below an
energy threshold is replaced by pre-computed mean sub-showers.

Physics content
---------------
* **Explicit cascade** of every hadron and nucleus above ``E_thr = min(f_thr E0,
  0.5 E0/A)`` (so that every nucleon of a primary nucleus interacts explicitly).
  Interaction depths are drawn from SIBYLL-2.3d's hadron-air production cross sections
  (``sib_sigma_hair``; nucleus-air from SIBYLL's Glauber ``sigma_nuc_nuc``), with
  ``lambda = <m_air>/sigma = 24145 g/cm^2 / sigma[mb]`` for air of mean mass 14.54 u.
  Charged pions and kaons and K0L decay in competition with interactions: the decay path
  length is exponential with mean ``gamma c tau`` in *length*, converted to slant depth
  through the atmosphere, i.e. ``lambda_dec = (E/m) c tau rho(h)`` locally. Targets are
  nitrogen (78.8 %) and oxygen (21.2 %, argon folded in: SIBYLL has no argon). Hadron-air
  events come from ``sibyll`` + ``decsib`` (final state in ``S_PLIST``); nucleus-air events
  from ``sibnuc``, whose own record ``S_PLNUC`` holds all wounded-nucleon sub-collisions and
  the spectator fragments (code 1000 + A) and therefore conserves energy (chromo's
  high-level nuclear event keeps a single NN sub-collision). Fragments A >= 2 are
  propagated as nuclei, free spectators as nucleons. SIBYLL is called with p, pi+, K+ or
  K0L as beam for the four table species (neutrons, antinucleons and hyperons as protons,
  negative mesons as positive ones); K0S decays at once. All secondaries move along the
  shower axis (one-dimensional cascade); lab energies come from the boost of the
  nucleon-nucleon centre-of-mass frame.
* **Electromagnetic sub-showers** (gamma, e+-, pi0 and eta decay photons) follow
  Greisen's approximation-B profile (K. Greisen, Prog. Cosmic Ray Phys. 3 (1956) 1)
  ``N_e(t) = 0.31/sqrt(beta0) exp[t (1 - 1.5 ln s)]``, ``s = 3t/(t + 2 beta0)``,
  ``beta0 = ln(E/E_c)``, ``t = X/X0`` with ``X0 = 36.62 g/cm^2`` and ``E_c = 87.92 MeV``. The
  energy deposit has the same shape, normalised so that a sub-shower deposits its whole
  energy within 3200 g/cm^2 of its start (i.e. an effective dE/dX per particle of
  ``E / integral N_e dX`` = 2.49-2.51 MeV/(g/cm^2) from 1 TeV to 1e21 eV); what falls
  below ground is lost.
  EM particles below 1 GeV use the 1 GeV shape scaled by energy.
* **Hadrons below threshold** become tabulated mean sub-showers (dE/dX and N_e versus
  depth after the start) for four species (nucleons incl. hyperons and antinucleons,
  charged pions, charged kaons, K0L), 8 energy bins per decade from 1 GeV, and six
  starting vertical depths (the decay/interaction competition depends on air density;
  inclined showers use the entry of the local vertical depth), 24 showers per entry.
  Tables are built once, recursively upward in energy, with the same Monte Carlo: a
  table entry at energy E_k follows explicitly every particle above E_{k-1} and uses the
  already built lower entries for the rest (interpolated log-linearly in energy and in
  starting depth, scaled by energy so that energy is conserved). Below 60 GeV (SIBYLL
  needs sqrt(s) > 10 GeV) a simple documented model replaces SIBYLL: inelasticity 1/2,
  of the produced energy 1/3 goes to pi0 (EM), 2/3 to charged pions; below 1 GeV
  mesons decay (invisible) and nucleons deposit their kinetic energy locally. Kaon decays
  use their main channels with equal energy shares among the products.
* **Atmosphere**: US standard atmosphere in Linsley's 5-layer parametrisation (as used by
  CORSIKA, D. Heck et al., FZKA 6019 (1998)); flat Earth, slant depth
  ``X = X_vertical / cos(zenith)``, ground at ``1036 g/cm^2 / cos(zenith)`` (sea level).
* **Invisible energy**: muons and neutrinos carry energy away (no muon ionisation, no
  hadron ionisation above 1 GeV); the deposit therefore integrates to the calorimetric
  energy: 0.89 E0 for 1e18 eV protons (60 deg, no ground leakage), ~0.7 (p) and ~0.6 (Fe)
  at 1e15 eV, where low-energy hadrons lose somewhat more than in full simulations.
* **Xmax**: fit of a parabola to ln(dE/dX) within +-100 g/cm^2 of the highest bin.

Tables are cached on disk in ``$FASTSHOWER_CACHE`` or ``~/.cache/fastshower`` under
``airshower-tables-v1`` and rebuilt (atomically, under a file lock) when missing,
corrupt, of another version, or not reaching a requested energy.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastshower.geometry import GROUND_VERTICAL_DEPTH, Geometry
from fastshower.io import ShowerBatch
from fastshower.montecarlo.backend import BackendOptions, SimulationBackend, SimulationError
from fastshower.montecarlo.incidence import OPTIONS

__all__ = [
    "PUBLISHED_XMAX",
    "AirShowerBackend",
    "Atmosphere",
    "HybridCascade",
    "fit_xmax",
    "greisen_ne",
    "parse_angle_spec",
    "table_dir",
    "xmax_acceptance",
]

# --- constants -----------------------------------------------------------------------------------

TABLE_VERSION = 1
X0_AIR = 36.62  # radiation length of air, g/cm^2
EC_AIR = 0.08792  # critical energy of air (Greisen), GeV
LAMBDA_MB = 24145.0  # <m_air> / 1 mb = 14.54 u / 1e-27 cm^2, g/cm^2
M_NUCLEON = 0.93827  # GeV
F_NITROGEN = 0.788  # nitrogen share of air targets (argon folded into oxygen)
E_SIBYLL_MIN = 60.0  # GeV, lab: below, SIBYLL (sqrt(s) >= 10 GeV) is replaced by the toy model
E_STOP = 1.0  # GeV: hadrons below decay (mesons) or stop (nucleons)
E_MIN_PRIMARY_EV, E_MAX_PRIMARY_EV = 1e15, 1e21

PRIMARIES: dict[str, tuple[int, int]] = {"p": (2212, 1), "He": (1000020040, 4), "N": (1000070140, 14),
                                         "Fe": (1000260560, 56)}

# table species: index -> (name, mass GeV, c tau cm (0 = stable), SIBYLL cross-section id, SIBYLL beam id)
NUCLEON, PION, KAON, K0L = 0, 1, 2, 3
_SPECIES: tuple[tuple[str, float, float, int, int], ...] = (
    ("nucleon", 0.93827, 0.0, 1, 13),
    ("pion", 0.13957, 780.45, 2, 7),
    ("kaon", 0.49368, 371.2, 3, 9),
    ("K0L", 0.49761, 1534.0, 3, 11),
)
# classes of final-state particles
_EM, _INVISIBLE = -1, -2
# decay channels (branching ratio, products sharing energy equally); products are
# species indices, _EM or _INVISIBLE (PDG 2024 branching ratios, small channels merged)
_DECAYS: dict[int, tuple[tuple[float, tuple[int, ...]], ...]] = {
    PION: ((1.0, (_INVISIBLE, _INVISIBLE)),),
    KAON: (
        (0.6356, (_INVISIBLE, _INVISIBLE)),
        (0.2067, (PION, _EM)),
        (0.0559, (PION, PION, PION)),
        (0.0507, (_EM, _EM, _INVISIBLE)),
        (0.0335, (_EM, _INVISIBLE, _INVISIBLE)),
        (0.0176, (PION, _EM, _EM)),
    ),
    K0L: (
        (0.4055, (PION, _EM, _INVISIBLE)),
        (0.2704, (PION, _INVISIBLE, _INVISIBLE)),
        (0.1952, (_EM, _EM, _EM)),
        (0.1289, (PION, PION, _EM)),
    ),
}

# table grid
E_TAB_MIN = 1.0  # GeV, first table energy
E_TAB_MAX = 1e10  # GeV, last table energy (f_thr 0.01 at 1e21 eV)
N_PER_DECADE = 8
NODES_XV = np.array([3.0, 20.0, 80.0, 250.0, 550.0, 1000.0])  # starting vertical depths, g/cm^2
N_EM_ROWS = 12 * N_PER_DECADE + 1  # 1 GeV .. 1e12 GeV
SAMPLES_PER_ENTRY = 24


#: <Xmax> and RMS(Xmax), g/cm^2, of published parametrisations of CONEX simulations (Auger,
#: JCAP 02 (2013) 026 and ICRC 2015), keyed by (primary, log10(E/eV)) then model.
PUBLISHED_XMAX: dict[tuple[str, int], dict[str, tuple[float, float]]] = {
    ("p", 17): {"EPOS-LHC": (695, 66), "Sibyll 2.1": (680, 64), "QGSJetII-04": (682, 66)},
    ("p", 18): {"EPOS-LHC": (751, 61), "Sibyll 2.1": (737, 58), "QGSJetII-04": (736, 64)},
    ("p", 19): {"EPOS-LHC": (806, 57), "Sibyll 2.1": (795, 53), "QGSJetII-04": (790, 61)},
    ("Fe", 17): {"EPOS-LHC": (592, 21), "Sibyll 2.1": (579, 28), "QGSJetII-04": (583, 25)},
    ("Fe", 18): {"EPOS-LHC": (651, 19), "Sibyll 2.1": (637, 24), "QGSJetII-04": (639, 24)},
    ("Fe", 19): {"EPOS-LHC": (710, 18), "Sibyll 2.1": (694, 21), "QGSJetII-04": (694, 24)},
}


def xmax_acceptance(primary: str, log10_e: int, mean_tol: float = 10.0, rms_tol: float = 0.25
                    ) -> tuple[tuple[float, float], tuple[float, float]]:
    """Accepted (low, high) for <Xmax> and RMS(Xmax), g/cm^2: the published range widened by
    ``mean_tol`` g/cm^2 (mean) and by ``rms_tol`` relative (RMS)."""
    vals = PUBLISHED_XMAX[(primary, log10_e)].values()
    means = [v[0] for v in vals]
    rms = [v[1] for v in vals]
    return ((min(means) - mean_tol, max(means) + mean_tol), ((1 - rms_tol) * min(rms), (1 + rms_tol) * max(rms)))


def table_dir() -> Path:
    """Directory of the sub-shower table cache (``$FASTSHOWER_CACHE`` or ``~/.cache/fastshower``)."""
    base = os.environ.get("FASTSHOWER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastshower")
    return Path(base) / f"airshower-tables-v{TABLE_VERSION}"


# --- atmosphere ---------------------------------------------------------------------------------


class Atmosphere:
    """US standard atmosphere, Linsley's 5-layer parametrisation (CORSIKA's default).

    ``T(h) = a_i + b_i exp(-h/c_i)`` in layers 1-4 and ``T(h) = a_5 - b_5 h/c_5`` in layer 5,
    T in g/cm^2 (vertical depth), h in cm above sea level. Below sea level layer 1 is
    extrapolated (used only by the sub-shower tables).
    """

    H = np.array([0.0, 4.0e5, 1.0e6, 4.0e6, 1.0e7, 1.128e7])  # layer bottoms and top, cm
    A = np.array([-186.555305, -94.919, 0.61289, 0.0, 0.01128292])
    B = np.array([1222.6562, 1144.9069, 1305.5948, 540.1778, 1.0])
    C = np.array([994186.38, 878153.55, 636143.04, 772170.16, 1.0e9])

    def __init__(self) -> None:
        self.t_bounds = np.array([self.depth(h) for h in self.H[:5]])  # depth at each layer bottom

    def depth(self, h: float | np.ndarray) -> Any:
        """Vertical depth T(h), g/cm^2, at height h (cm)."""
        h = np.clip(np.asarray(h, dtype=float), -3.0e6, None)  # extrapolation below sea level (tables only)
        i = np.clip(np.searchsorted(self.H, h, side="right") - 1, 0, 4)
        t = np.where(i < 4, self.A[i] + self.B[i] * np.exp(-h / self.C[i]), self.A[i] - self.B[i] * h / self.C[i])
        return np.maximum(t, 0.0)

    def height(self, t: float | np.ndarray) -> Any:
        """Height (cm) at vertical depth t (g/cm^2); above the top of the atmosphere for t <= 0."""
        t = np.asarray(t, dtype=float)
        i = np.clip(np.searchsorted(-self.t_bounds, -t, side="right") - 1, 0, 4)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = np.where(i < 4, -self.C[i] * np.log(np.maximum(t - self.A[i], 1e-300) / self.B[i]),
                         (self.A[i] - t) * self.C[i] / self.B[i])
        return np.minimum(h, self.H[-1])


ATMOSPHERE = Atmosphere()


# --- Greisen electromagnetic profiles -----------------------------------------------------------


def greisen_ne(t: np.ndarray, energy_gev: float) -> np.ndarray:
    """Greisen's number of electrons at depth t (radiation lengths) for a photon of energy E (GeV)."""
    beta0 = math.log(max(energy_gev, 1.0) / EC_AIR)
    t = np.asarray(t, dtype=float)
    out = np.zeros_like(t)
    ok = t > 0
    s = 3 * t[ok] / (t[ok] + 2 * beta0)
    out[ok] = 0.31 / math.sqrt(beta0) * np.exp(t[ok] * (1 - 1.5 * np.log(s)))
    return out


def _em_tables(nb: int, dx: float) -> tuple[np.ndarray, np.ndarray]:
    """EM rows: energies (N_EM_ROWS,) GeV and profiles (N_EM_ROWS, 2, nb): deposit (GeV per bin) and N_e.

    Offsets are from a start at a bin's lower edge; the shape is integrated on a 1 g/cm^2
    sub-grid and normalised so that each row deposits its energy within ``nb`` bins.
    """
    energies = E_TAB_MIN * 10 ** (np.arange(N_EM_ROWS) / N_PER_DECADE)
    sub = 10
    xs = (np.arange(nb * sub) + 0.5) * dx / sub
    prof = np.zeros((N_EM_ROWS, 2, nb))
    for k, e in enumerate(energies):
        ne = greisen_ne(xs / X0_AIR, e)
        per_bin = ne.reshape(nb, sub).mean(axis=1)
        prof[k, 0] = e * per_bin / per_bin.sum()
        prof[k, 1] = per_bin
    return energies, prof


# --- result of a shower -------------------------------------------------------------------------


def fit_xmax(dedx: np.ndarray, dx: float, n_valid: int | None = None, half_window: float = 100.0
             ) -> tuple[float, float]:
    """Xmax (g/cm^2) and dE/dX at Xmax from a parabola fitted to ln(dE/dX) around the highest bin.

    Args:
        dedx: profile (n_bins,), any positive unit; bins are ``dx`` wide and start at 0.
        dx: bin width, g/cm^2.
        n_valid: bins above ground (the rest is ignored).
        half_window: half width of the fitted range, g/cm^2.
    """
    n = len(dedx) if n_valid is None else max(1, min(n_valid, len(dedx)))
    y = dedx[:n]
    if not np.any(y > 0):
        return float("nan"), 0.0
    i = int(np.argmax(y))
    w = max(2, round(half_window / dx))
    lo, hi = max(0, i - w), min(n, i + w + 1)
    sel = np.arange(lo, hi)
    sel = sel[y[sel] > 0]
    x = (sel + 0.5) * dx
    if len(sel) >= 3:
        c2, c1, c0 = np.polyfit(x - x.mean(), np.log(y[sel]), 2)
        if c2 < 0:
            xm = -c1 / (2 * c2)
            if abs(xm) <= half_window * 1.5:
                return float(xm + x.mean()), float(np.exp(c0 - c1 * c1 / (4 * c2)))
    return float((i + 0.5) * dx), float(y[i])


# --- SIBYLL via chromo --------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence Fortran writes to file descriptor 1 (SIBYLL's banner)."""
    try:
        fd = os.dup(1)
    except OSError:  # no stdout at all
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            try:
                yield
            finally:
                os.dup2(fd, 1)
    finally:
        os.close(fd)


class _Sibyll:
    """Process-wide SIBYLL-2.3d (chromo) accessed through its low-level calls."""

    _instance: _Sibyll | None = None

    def __init__(self) -> None:
        try:
            from chromo.kinematics import FixedTarget
            from chromo.models import Sibyll23d
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise SimulationError(f"air showers need chromo with SIBYLL-2.3d (pip install chromo): {exc}") from exc
        with _quiet_stdout():
            self.model = Sibyll23d(FixedTarget(1e9, "p", (14, 7)), seed=1)
        self.model.set_stable(310, False)  # K0S decays at once (documented approximation)
        self.lib = self.model._lib
        self._rng: np.random.Generator | None = None
        # SIBYLL code -> particle class
        lut = np.full(100, PION, dtype=np.int64)
        for code in range(1, 100):
            pdg = abs(int(self.lib.isib_pid2pdg(code)))
            if pdg in (22, 11, 111, 221):
                lut[code] = _EM
            elif pdg in (12, 13, 14, 15, 16):
                lut[code] = _INVISIBLE
            elif pdg == 321:
                lut[code] = KAON
            elif pdg == 130:
                lut[code] = K0L
            elif 1000 < pdg < 10000 or pdg > 100000:
                lut[code] = NUCLEON
        self.lut = lut
        # masses of SIBYLL codes (GeV), for kinetic-energy bookkeeping
        self.mass = np.asarray(self.lib.s_mass1.am[:100], dtype=float).copy()

    @classmethod
    def get(cls) -> _Sibyll:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def seed(self, rng: np.random.Generator) -> None:
        """Make SIBYLL draw from ``rng``'s bit generator (kept alive here)."""
        self._rng = rng
        self.lib.npy.bitgen = rng.bit_generator.ctypes.bit_generator.value
        self.lib.npy.gen_id = self.model._get_bitgen_id(rng.bit_generator)

    def sigma_hadron_air(self, species: int, e_lab: float) -> float:
        """Production cross section hadron-air, mb."""
        ecm = math.sqrt(2 * M_NUCLEON * e_lab + _SPECIES[species][1] ** 2 + M_NUCLEON**2)
        return float(self.lib.sib_sigma_hair(_SPECIES[species][3], max(ecm, 10.0))[0])

    def hadron_event(self, beam: int, target_a: int, e_lab: float) -> tuple[np.ndarray, np.ndarray]:
        """One hadron-air (target nucleus ``target_a``) event: classes and lab energies (GeV) of final particles."""
        m = self.mass[abs(beam)]
        ecm = math.sqrt(2 * M_NUCLEON * e_lab + m * m + M_NUCLEON**2)
        self.lib.sibyll(beam, target_a, ecm)
        self.lib.decsib()
        pl = self.lib.s_plist
        n = int(pl.np)
        ll = pl.llist[:n]
        fin = np.abs(ll) < 10000
        p = pl.p[:n][fin]
        codes = np.abs(ll[fin])
        gamma = (e_lab + M_NUCLEON) / ecm
        betagamma = math.sqrt(max(e_lab * e_lab - m * m, 0.0)) / ecm
        e = gamma * p[:, 3] + betagamma * p[:, 2]
        return self.lut[codes], e

    def nucleus_event(self, a: int, target_a: int, e_per_nucleon: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One nucleus-air event from SIBYLL's own record S_PLNUC.

        Returns classes, lab energies (GeV) and mass numbers of final particles (A > 1 for
        spectator fragments, which keep the projectile's energy per nucleon).
        """
        ecm = math.sqrt(2 * M_NUCLEON * e_per_nucleon + 2 * M_NUCLEON**2)
        self.lib.sibnuc(a, target_a, ecm)
        pn = self.lib.s_plnuc
        n = int(pn.npa)
        ll = np.asarray(pn.lla[:n])
        fin = np.abs(ll) < 10000
        pa = pn.pa[:, :n][:, fin]
        codes = np.abs(ll[fin])
        frag = codes > 1000
        gamma = (e_per_nucleon + M_NUCLEON) / ecm
        betagamma = math.sqrt(max(e_per_nucleon**2 - M_NUCLEON**2, 0.0)) / ecm
        e = gamma * pa[3] + betagamma * pa[2]
        amass = np.ones(len(codes), dtype=np.int64)
        amass[frag] = codes[frag] - 1000
        e[frag] = amass[frag] * e_per_nucleon
        cls = np.where(frag, NUCLEON, self.lut[np.where(frag, 0, codes)])
        return cls, e, amass

    def sigma_nucleus_air_grid(self, a_values: np.ndarray, ecm: np.ndarray, trials: int = 400) -> np.ndarray:
        """Nucleus-air production cross sections (mb), shape (len(a_values), len(ecm)), N/O mixed."""
        out = np.zeros((len(a_values), len(ecm)))
        for i, a in enumerate(a_values):
            for j, s in enumerate(ecm):
                val = 0.0
                for frac, ta in ((F_NITROGEN, 14), (1 - F_NITROGEN, 16)):
                    self.lib.sigma_nuc_nuc(int(a), ta, float(s), trials)
                    val += frac * float(self.lib.nucnucsig.sigprod)
                out[i, j] = val
        return out


# --- the hybrid cascade -------------------------------------------------------------------------


@dataclass
class _Tables:
    """Mean sub-shower tables.

    Attributes:
        energies: table energies (n_e,), GeV.
        prof: (4, n_e, n_nodes, 2, nb): deposit (GeV per bin) and N_e per bin, after a start at a bin edge.
        n_built: energies built so far (entries ``[:n_built]`` are valid).
        sig_a: mass numbers of the nucleus cross-section grid.
        sig_ecm: sqrt(s) per nucleon grid, GeV.
        sig: nucleus-air production cross sections, mb, (len(sig_a), len(sig_ecm)).
        source: how this process got them: "cache" (read), "built" (from nothing) or "extended" (a cached
            table built further up in energy), for the file's ``worker_tables`` provenance.
    """

    energies: np.ndarray
    prof: np.ndarray
    n_built: int
    sig_a: np.ndarray
    sig_ecm: np.ndarray
    sig: np.ndarray
    source: str = "cache"

    def describe(self, nb: int, dx: float) -> dict[str, Any]:
        """The tables for a worker's provenance: version, grid, how they were got, reach and a content hash of
        the valid entries (built deterministically: equal hashes on every worker mean equal tables)."""
        import hashlib

        digest = hashlib.sha256()
        for array in (self.energies[:self.n_built], self.prof[:, :self.n_built], self.sig_a, self.sig_ecm, self.sig):
            digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
        return {"table": "airshower-subshower", "version": f"airshower-tables-v{TABLE_VERSION}",
                "grid": f"nb{nb}-dx{dx:g}", "source": self.source, "n_energies": self.n_built,
                "e_max_gev": float(self.energies[self.n_built - 1]), "sha256": digest.hexdigest()[:16]}


class HybridCascade:
    """Explicit cascade + tabulated sub-showers on a slant-depth grid.

    Args:
        nb: profile bins; dx: bin width, g/cm^2.
        tables: sub-shower tables.
        em: (energies, profiles) of the EM rows.
    """

    def __init__(self, nb: int, dx: float, tables: _Tables, em: tuple[np.ndarray, np.ndarray]) -> None:
        self.nb, self.dx = nb, dx
        self.tab = tables
        self.sib = _Sibyll.get()
        self.em_energies, em_prof = em
        self.n_nodes = len(NODES_XV)
        self.lognodes = np.log(NODES_XV)
        self.nfft = 2 * nb
        self.em_fft = np.fft.rfft(em_prof.astype(np.float32), self.nfft, axis=-1)  # (rows, 2, nb + 1)
        self._had_fft: np.ndarray | None = None
        self._had_fft_built = -1

    # -- accumulators --
    def _reset(self) -> None:
        self.em_e: list[np.ndarray] = []
        self.em_x: list[np.ndarray] = []
        self.had_s: list[np.ndarray] = []
        self.had_e: list[np.ndarray] = []
        self.had_x: list[np.ndarray] = []
        self.had_xv: list[np.ndarray] = []
        self.local = np.zeros(self.nb)

    def _xbins(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Cloud-in-cell over start bins: (bin0, w0, bin1, w1); starts beyond the grid get zero weight."""
        u = x / self.dx
        i0 = np.floor(u).astype(np.int64)
        f = u - i0
        i1 = i0 + 1
        w0 = np.where((i0 < 0) | (i0 >= self.nb), 0.0, 1 - f)
        w1 = np.where((i1 < 0) | (i1 >= self.nb), 0.0, f)
        top = self.nb - 1
        return np.minimum(np.maximum(i0, 0), top), w0, np.minimum(np.maximum(i1, 0), top), w1

    @staticmethod
    def _ebins(e: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Log-linear interpolation over energy rows with energy scaling: (row0, w0, row1, w1).

        Energies beyond the first/last row use that row scaled by E/E_row (energy conservation).
        """
        u = np.log10(np.maximum(e, 1e-30) / E_TAB_MIN) * N_PER_DECADE
        u = np.minimum(np.maximum(u, 0.0), n_rows - 1.0)
        k0 = np.minimum(np.floor(u).astype(np.int64), max(n_rows - 2, 0))
        f = np.minimum(np.maximum(u - k0, 0.0), 1.0)
        k1 = np.minimum(k0 + 1, n_rows - 1)
        e0 = E_TAB_MIN * 10.0 ** (k0 / N_PER_DECADE)
        e1 = E_TAB_MIN * 10.0 ** (k1 / N_PER_DECADE)
        return k0, (1 - f) * e / e0, k1, f * e / e1

    def add_em(self, e: np.ndarray, x: np.ndarray) -> None:
        """EM particles of energies e (GeV) starting at slant depths x (g/cm^2)."""
        self.em_e.append(e)
        self.em_x.append(x)

    def add_hadrons(self, species: np.ndarray, e: np.ndarray, x: np.ndarray, xv: np.ndarray) -> None:
        """Sub-threshold hadrons (table species, GeV, slant depth, vertical depth) -> tables."""
        self.had_s.append(species)
        self.had_e.append(e)
        self.had_x.append(x)
        self.had_xv.append(xv)

    def _em_hist(self) -> tuple[np.ndarray, np.ndarray]:
        """Occupied EM rows and their start-depth histograms (rows, nb)."""
        e, x = np.concatenate(self.em_e), np.concatenate(self.em_x)
        k0, a0, k1, a1 = self._ebins(e, N_EM_ROWS)
        i0, b0, i1, b1 = self._xbins(x)
        nb = self.nb
        idx = np.concatenate([k0 * nb + i0, k0 * nb + i1, k1 * nb + i0, k1 * nb + i1])
        w = np.concatenate([a0 * b0, a0 * b1, a1 * b0, a1 * b1])
        return self._rows(idx, w, N_EM_ROWS)

    def _had_hist(self) -> tuple[np.ndarray, np.ndarray]:
        """Occupied hadron-table rows (species, energy, node) and their start-depth histograms (rows, nb)."""
        species, e = np.concatenate(self.had_s), np.concatenate(self.had_e)
        x, xv = np.concatenate(self.had_x), np.concatenate(self.had_xv)
        ne, nb, nn = len(self.tab.energies), self.nb, self.n_nodes
        k0, a0, k1, a1 = self._ebins(e, self.tab.n_built)
        i0, b0, i1, b1 = self._xbins(x)
        v = np.interp(np.log(np.maximum(xv, 1e-3)), self.lognodes, np.arange(nn, dtype=float))
        n0 = np.minimum(np.floor(v).astype(np.int64), nn - 2)
        g1 = v - n0
        g0 = 1 - g1
        idx_parts, w_parts = [], []
        for k, a in ((k0, a0), (k1, a1)):
            for n, g in ((n0, g0), (n0 + 1, g1)):
                row = (species * ne + k) * nn + n
                for i, b in ((i0, b0), (i1, b1)):
                    idx_parts.append(row * nb + i)
                    w_parts.append(a * g * b)
        return self._rows(np.concatenate(idx_parts), np.concatenate(w_parts), 4 * ne * nn)

    def _rows(self, idx: np.ndarray, w: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        h = np.bincount(idx, w, minlength=n_rows * self.nb).reshape(n_rows, self.nb)
        rows = np.flatnonzero(h.any(axis=1))
        return rows, h[rows]

    def _profile(self) -> np.ndarray:
        """Convolve the accumulated starts with the tables: (2, nb) deposit (GeV per bin) and N_e.

        The convolution runs in Fourier space (single precision) over the occupied table rows.
        """
        nb, nfft = self.nb, self.nfft
        spec = np.zeros((2, nfft // 2 + 1), dtype=np.complex64)
        if self.em_e:
            rows, h = self._em_hist()
            spec += np.einsum("rf,rcf->cf", np.fft.rfft(h.astype(np.float32), nfft, axis=-1), self.em_fft[rows])
        if self.had_e:
            rows, h = self._had_hist()
            if self._had_fft is None or self._had_fft_built != self.tab.n_built:
                prof = self.tab.prof.reshape(-1, 2, nb).astype(np.float32)
                self._had_fft = np.fft.rfft(prof, nfft, axis=-1)
                self._had_fft_built = self.tab.n_built
            spec += np.einsum("rf,rcf->cf", np.fft.rfft(h.astype(np.float32), nfft, axis=-1), self._had_fft[rows])
        out = np.fft.irfft(spec, nfft, axis=-1)[:, :nb].astype(np.float64)
        out[0] += self.local
        return np.maximum(out, 0.0)

    # -- propagation --
    def run(self, rng: np.random.Generator, a: int, species: int, e0: float, e_thr: float, cos_z: float,
            xv_start: float, x_end: float, reset: bool = True, finish: bool = True) -> np.ndarray | None:
        """One shower: (2, nb) profile, deposit in GeV per bin and N_e, versus slant depth after the start.

        Args:
            rng: random numbers (SIBYLL must already draw from the same generator).
            a: mass number (1 for a hadron of table species ``species``).
            e0: total energy, GeV. e_thr: explicit-cascade threshold, GeV.
            cos_z: cosine of the zenith angle. xv_start: vertical depth of the start, g/cm^2.
            x_end: slant depth (after the start) of the ground; particles stop there.
            reset, finish: start from empty accumulators / return the profile (False: accumulate
                several showers and call :meth:`_profile` once).
        """
        if reset:
            self._reset()
        sib = self.sib
        # explicit stack: (A, species, energy GeV, slant depth after start)
        stack: list[tuple[int, int, float, float]] = [(a, species, e0, 0.0)]
        while stack:
            a_i, s_i, e_i, x_i = stack.pop()
            xv_i = xv_start + x_i * cos_z
            if a_i > 1:
                sigma = self._sigma_nucleus(a_i, e_i / a_i)
            else:
                sigma = sib.sigma_hadron_air(s_i, e_i) if e_i >= E_SIBYLL_MIN else self._sigma_low(s_i)
            x_int = x_i + rng.exponential(LAMBDA_MB / sigma)
            ctau = _SPECIES[s_i][2] if a_i == 1 else 0.0
            if ctau > 0:
                length = rng.exponential(e_i / _SPECIES[s_i][1] * ctau)
                h_dec = ATMOSPHERE.height(xv_i) - length * cos_z
                x_dec = (float(ATMOSPHERE.depth(h_dec)) - xv_start) / cos_z
                if x_dec < x_int:
                    if x_dec < x_end:
                        self._decay(rng, s_i, e_i, x_dec, xv_start, cos_z, e_thr, stack)
                    continue
            if x_int >= x_end:
                continue
            target = 14 if rng.random() < F_NITROGEN else 16
            if a_i > 1:
                cls, e, amass = sib.nucleus_event(a_i, target, e_i / a_i)
            elif e_i >= E_SIBYLL_MIN:
                cls, e = sib.hadron_event(_SPECIES[s_i][4], target, e_i)
                amass = np.ones(len(cls), dtype=np.int64)
            else:
                cls, e = self._toy_event(s_i, e_i)
                amass = np.ones(len(cls), dtype=np.int64)
            self._secondaries(cls, e, amass, x_int, xv_start, cos_z, e_thr, stack)
        return self._profile() if finish else None

    def _sigma_nucleus(self, a: int, e_per_nucleon: float) -> float:
        ecm = math.sqrt(2 * M_NUCLEON * e_per_nucleon + 2 * M_NUCLEON**2)
        t = self.tab
        row = np.array([np.interp(np.log(ecm), np.log(t.sig_ecm), t.sig[i]) for i in range(len(t.sig_a))])
        return float(np.interp(math.log(a), np.log(t.sig_a), row))

    @staticmethod
    def _sigma_low(species: int) -> float:
        """Production cross section below 60 GeV (toy model), mb: roughly constant there."""
        return (250.0, 200.0, 170.0, 170.0)[species]

    @staticmethod
    def _toy_event(species: int, e: float) -> tuple[np.ndarray, np.ndarray]:
        """Interaction below 60 GeV: leading particle keeps 1/2; 1/3 of the rest to pi0, 2/3 to charged pions."""
        n_pi = max(1, round(0.5 * math.log(max(e, 1.0)) + 1))
        produced = 0.5 * e
        cls = [species, _EM] + [PION] * n_pi
        en = [0.5 * e, produced / 3] + [2 * produced / 3 / n_pi] * n_pi
        return np.array(cls, dtype=np.int64), np.array(en)

    def _decay(self, rng: np.random.Generator, s: int, e: float, x: float, xv_start: float, cos_z: float,
               e_thr: float, stack: list[tuple[int, int, float, float]]) -> None:
        """Decay of a pion or kaon at slant depth x: a channel by branching ratio, equal energy shares."""
        channels = _DECAYS[s]
        cum = np.cumsum([c[0] for c in channels])
        prods = channels[min(int(np.searchsorted(cum, rng.random() * cum[-1])), len(channels) - 1)][1]
        share = e / len(prods)
        cls = np.array(prods, dtype=np.int64)
        self._secondaries(cls, np.full(len(prods), share), np.ones(len(prods), dtype=np.int64), x, xv_start, cos_z,
                          e_thr, stack)

    def _secondaries(self, cls: np.ndarray, e: np.ndarray, amass: np.ndarray, x: float, xv_start: float,
                     cos_z: float, e_thr: float, stack: list[tuple[int, int, float, float]]) -> None:
        em = cls == _EM
        if em.any():
            self.add_em(e[em], np.full(int(em.sum()), x))
        had = cls >= 0
        if not had.any():
            return
        c, eh, ah = cls[had], e[had], amass[had]
        explicit = (eh >= e_thr) | (ah > 1)
        for j in np.flatnonzero(explicit):
            stack.append((int(ah[j]), int(c[j]), float(eh[j]), x))
        low = ~explicit
        if not low.any():
            return
        c, eh = c[low], eh[low]
        stop = eh < E_STOP
        if stop.any():  # nucleons deposit their kinetic energy locally; mesons decay (invisible)
            kin = np.where(c[stop] == NUCLEON, np.maximum(eh[stop] - M_NUCLEON, 0.0), 0.0)
            i0, b0, i1, b1 = self._xbins(np.full(kin.size, x))
            self.local += np.bincount(i0, kin * b0, minlength=self.nb) + np.bincount(i1, kin * b1, minlength=self.nb)
        go = ~stop
        if go.any():
            n = int(go.sum())
            self.add_hadrons(c[go], eh[go], np.full(n, x), np.full(n, xv_start + x * cos_z))


# --- table building -----------------------------------------------------------------------------


def _sigma_grid_axes() -> tuple[np.ndarray, np.ndarray]:
    a_values = np.array([2, 3, 4, 6, 9, 12, 14, 16, 20, 24, 28, 34, 40, 48, 56])
    ecm = np.logspace(1.0, 6.0, 11)
    return a_values, ecm


def _n_energies(e_max: float) -> int:
    """Table energies needed so that the top one reaches ``e_max`` GeV."""
    return math.ceil(math.log10(max(e_max, E_TAB_MIN * 10) / E_TAB_MIN) * N_PER_DECADE) + 1


def _extend_tables(tab: _Tables, n_target: int, nb: int, dx: float, em: tuple[np.ndarray, np.ndarray]) -> None:
    """Build table entries ``tab.n_built .. n_target - 1`` (recursively upward in energy)."""
    sib = _Sibyll.get()
    casc = HybridCascade(nb, dx, tab, em)
    for k in range(tab.n_built, n_target):
        rng = np.random.default_rng([TABLE_VERSION, k])
        sib.seed(rng)
        e_k = float(tab.energies[k])
        for s in range(4):
            for n, xv in enumerate(NODES_XV):
                if k == 0:
                    tab.prof[s, k, n] = _first_entry(casc, s, e_k)
                    continue
                casc._reset()
                for _ in range(SAMPLES_PER_ENTRY):
                    casc.run(rng, 1, s, e_k, float(tab.energies[k - 1]), 1.0, float(xv), nb * dx,
                             reset=False, finish=False)
                tab.prof[s, k, n] = casc._profile() / SAMPLES_PER_ENTRY
        tab.n_built = k + 1
        casc._had_fft = None


def _first_entry(casc: HybridCascade, s: int, e: float) -> np.ndarray:
    """Lowest table energy (1 GeV): mesons decay (invisible); nucleons lose their kinetic energy
    exponentially over one interaction length (ionisation and soft interactions)."""
    out = np.zeros((2, casc.nb))
    if s == NUCLEON:
        lam = LAMBDA_MB / casc._sigma_low(s)
        xs = (np.arange(casc.nb) + 0.5) * casc.dx
        w = np.exp(-xs / lam)
        out[0] = (e - M_NUCLEON) * w / w.sum()
    return out


def _save_tables(tab: _Tables, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, version=np.array(TABLE_VERSION), energies=tab.energies, prof=tab.prof,
                 n_built=np.array(tab.n_built), sig_a=tab.sig_a, sig_ecm=tab.sig_ecm, sig=tab.sig,
                 nodes=NODES_XV, samples=np.array(SAMPLES_PER_ENTRY))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_tables(path: Path, nb: int) -> _Tables | None:
    """Read a cached table; None when missing, corrupt or of another version/grid."""
    try:
        with np.load(path) as z:
            if int(z["version"]) != TABLE_VERSION or int(z["samples"]) != SAMPLES_PER_ENTRY:
                return None
            if not np.array_equal(z["nodes"], NODES_XV) or z["prof"].shape[-1] != nb:
                return None
            tab = _Tables(z["energies"].copy(), z["prof"].copy(), int(z["n_built"]), z["sig_a"].copy(),
                          z["sig_ecm"].copy(), z["sig"].copy())
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return None
    if not (np.isfinite(tab.prof).all() and np.isfinite(tab.sig).all()) or tab.n_built < 2:
        return None
    return tab


def load_or_build_tables(e_max_gev: float, nb: int = 320, dx: float = 10.0,
                         em: tuple[np.ndarray, np.ndarray] | None = None) -> _Tables:
    """Sub-shower tables reaching at least ``e_max_gev``, from the cache or built (and cached)."""
    em = em if em is not None else _em_tables(nb, dx)
    path = table_dir() / f"tables-nb{nb}-dx{dx:g}.npz"
    n_need = _n_energies(e_max_gev)
    tab = _load_tables(path, nb)
    if tab is not None and tab.n_built >= n_need:
        return tab
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same table
        tab = _load_tables(path, nb)
        if tab is not None and tab.n_built >= n_need:
            return tab
        n_total = _n_energies(E_TAB_MAX)
        source = "extended" if tab is not None and len(tab.energies) == n_total else "built"
        if tab is None or len(tab.energies) != n_total:
            sib = _Sibyll.get()
            sib.seed(np.random.default_rng([TABLE_VERSION, 999]))
            a_vals, ecm = _sigma_grid_axes()
            energies = E_TAB_MIN * 10 ** (np.arange(n_total) / N_PER_DECADE)
            tab = _Tables(energies, np.zeros((4, n_total, len(NODES_XV), 2, nb)), 0, a_vals.astype(float), ecm,
                          sib.sigma_nucleus_air_grid(a_vals, ecm))
        _extend_tables(tab, min(n_need, n_total), nb, dx, em)
        _save_tables(tab, path)
        tab.source = source
        return tab


# --- the backend --------------------------------------------------------------------------------


def parse_angle_spec(text: str | float | int, name: str, low: float, high: float) -> tuple[float, float]:
    """``"a:b"`` or ``"a"`` (degrees) -> (a, b), checked against [low, high]."""
    try:
        parts = [float(p) for p in str(text).split(":")]
    except ValueError as exc:
        raise SimulationError(f"cannot read {name} spec {text!r}: expected DEG or LOW:HIGH in degrees") from exc
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(math.isfinite(p) for p in parts) or parts[0] > parts[1]:
        raise SimulationError(f"bad {name} spec {text!r}: expected DEG or LOW:HIGH in degrees with LOW <= HIGH")
    if parts[0] < low or parts[1] > high:
        raise SimulationError(f"{name} {text!r} outside the supported range [{low:g}, {high:g}] degrees")
    return parts[0], parts[1]


class AirShowerBackend(SimulationBackend):
    """CONEX-like hybrid air showers on SIBYLL-2.3d (see the module docstring for the physics).

    Options (``options.extra``):
        zenith: ``"DEG"`` or ``"LOW:HIGH"`` in degrees (default ``"0"``); a range is drawn
            uniformly in cos^2(zenith), i.e. isotropic flux through a flat horizontal surface
            (dN/dcos = 2 cos), as for a ground array. Must stay below 90 (< 89 accepted).
        azimuth: ``"LOW:HIGH"`` in degrees (default ``"0:360"``), uniform; it does not change a
            profile over a flat Earth and is stored for downstream use.
        f_thr: explicit-cascade threshold as a fraction of E0 (default 0.01).
    """

    generator = "fastshower CONEX-like hybrid (chromo SIBYLL-2.3d)"
    physics = ("SIBYLL-2.3d explicit hadronic cascade above f_thr*E0, tabulated mean sub-showers below, "
               "Greisen EM sub-showers (X0=36.62 g/cm2, Ec=87.92 MeV), US-standard (Linsley) atmosphere, "
               "flat Earth, ground at 1036 g/cm2 vertical")

    def __init__(self, geometry: Geometry, particle: str, options: BackendOptions) -> None:
        super().__init__(geometry, particle, options)
        self.check_request(geometry, particle, options, (E_MIN_PRIMARY_EV * 1e-6, E_MIN_PRIMARY_EV * 1e-6))
        assert geometry.profile is not None
        self.nb = geometry.profile.n_bins
        self.dx = geometry.profile.dx
        self.f_thr = float(options.extra.get("f_thr", 0.01))
        self.a = PRIMARIES[particle][1]
        self.em = _em_tables(self.nb, self.dx)
        self._tables: _Tables | None = None
        self._cascade: HybridCascade | None = None
        self._table_log: list[dict[str, Any]] = []  # what :meth:`tables` reports

    # -- requests --
    @classmethod
    def check_request(cls, geometry: Geometry, particle: str, options: BackendOptions,
                      energy_range_mev: tuple[float, float]) -> None:
        if geometry.profile is None or tuple(geometry.profile.channels) != ("dEdX", "Ne"):
            raise SimulationError(
                f"air showers need a profile geometry with channels (dEdX, Ne), not {geometry.name!r}")
        if particle not in PRIMARIES:
            raise SimulationError(f"unknown air-shower primary {particle!r}; choose one of: {', '.join(PRIMARIES)}")
        lo, hi = (float(v) * 1e6 for v in energy_range_mev)
        if not (E_MIN_PRIMARY_EV * 0.999 <= lo <= hi <= E_MAX_PRIMARY_EV * 1.001):
            raise SimulationError(f"air-shower energies {lo:.3g}-{hi:.3g} eV outside the supported range "
                                  f"{E_MIN_PRIMARY_EV:.0e}-{E_MAX_PRIMARY_EV:.0e} eV")
        cls._angles(options)
        asked = [f"--{k}" for k in OPTIONS if options.extra.get(k) is not None]
        if asked:
            raise SimulationError(f"{', '.join(asked)}: calorimeters only; air showers take --zenith and --azimuth")
        f_thr = float(options.extra.get("f_thr", 0.01))
        if not 1e-4 <= f_thr <= 0.1:
            raise SimulationError(f"f_thr {f_thr!r} outside [1e-4, 0.1]")

    @staticmethod
    def _angles(options: BackendOptions) -> tuple[tuple[float, float], tuple[float, float]]:
        zen = parse_angle_spec(options.extra.get("zenith", "0"), "zenith", 0.0, 89.0)
        azi = parse_angle_spec(options.extra.get("azimuth", "0:360"), "azimuth", 0.0, 360.0)
        return zen, azi

    @classmethod
    def condition_widths(cls, geometry: Geometry, options: BackendOptions) -> dict[str, int]:
        return {"zenith": 1, "azimuth": 1}

    @classmethod
    def truth_widths(cls, geometry: Geometry, options: BackendOptions) -> dict[str, int]:
        return {"xmax": 1, "dEdX_max": 1}

    @classmethod
    def draw_conditions(cls, geometry: Geometry, options: BackendOptions, rng: np.random.Generator,
                        n: int) -> dict[str, np.ndarray]:
        """Zenith (deg) uniform in cos^2 over the spec's range, azimuth (deg) uniform."""
        (z0, z1), (a0, a1) = cls._angles(options)
        c2 = rng.uniform(math.cos(math.radians(z1)) ** 2, math.cos(math.radians(z0)) ** 2, n)
        zen = np.degrees(np.arccos(np.sqrt(c2))) if z1 > z0 else np.full(n, z0)
        azi = rng.uniform(a0, a1, n) if a1 > a0 else np.full(n, a0)
        return {"zenith": zen.reshape(n, 1), "azimuth": azi.reshape(n, 1)}

    # -- simulation --
    def _threshold_gev(self, e0_gev: float) -> float:
        """Explicit-cascade threshold, GeV: f_thr E0, at most half the energy per nucleon and the table top."""
        return min(self.f_thr * e0_gev, 0.5 * e0_gev / self.a, E_TAB_MAX)

    def _ensure_tables(self, e_thr_max_gev: float) -> HybridCascade:
        if self._tables is None or self._tables.n_built < _n_energies(e_thr_max_gev):
            self._tables = load_or_build_tables(e_thr_max_gev, self.nb, self.dx, self.em)
            self._cascade = HybridCascade(self.nb, self.dx, self._tables, self.em)
            entry = self._tables.describe(self.nb, self.dx)
            if entry not in self._table_log:
                self._table_log.append(entry)
        assert self._cascade is not None
        return self._cascade

    def tables(self) -> list[dict[str, Any]]:
        """The sub-shower tables this worker read from its cache, built or extended, one entry each time it
        got them (a later chunk of higher energy may extend them); see :meth:`_Tables.describe`."""
        return list(self._table_log)

    def simulate_one(self, rng: np.random.Generator, e0_mev: float, zenith_deg: float) -> tuple[np.ndarray, float,
                                                                                                 float]:
        """One shower: (2 * nb,) vector [dEdX MeV/(g/cm^2)..., N_e...], Xmax (g/cm^2), dEdX at Xmax."""
        e0 = e0_mev * 1e-3
        e_thr = self._threshold_gev(e0)
        casc = self._ensure_tables(e_thr)
        cos_z = math.cos(math.radians(zenith_deg))
        x_ground = GROUND_VERTICAL_DEPTH / cos_z
        prof = casc.run(rng, self.a, NUCLEON, e0, e_thr, cos_z, 0.0, x_ground)
        assert prof is not None
        n_valid = int(min(self.nb, math.ceil(x_ground / self.dx)))
        dedx = prof[0] * 1e3 / self.dx  # GeV per bin -> MeV per g/cm^2
        ne = prof[1].copy()
        # the bin holding the ground keeps the fraction above ground
        frac = x_ground / self.dx - (n_valid - 1)
        if n_valid <= self.nb:
            dedx[n_valid - 1] *= min(frac, 1.0)
            ne[n_valid - 1] *= min(frac, 1.0)
        dedx[n_valid:] = 0.0
        ne[n_valid:] = 0.0
        xmax, dmax = fit_xmax(dedx, self.dx, n_valid - 1 if frac < 1 else n_valid)
        return np.concatenate([dedx, ne]), xmax, dmax

    def run(self, energies_mev: np.ndarray, conditions: dict[str, np.ndarray], seed: int) -> ShowerBatch:
        energies = np.asarray(energies_mev, dtype=float).reshape(-1)
        n = energies.size
        self.check_request(self.geometry, self.particle, self.options,
                           (float(energies.min()), float(energies.max())) if n else (1e9, 1e9))
        zen = np.asarray(conditions.get("zenith", np.zeros((n, 1))), dtype=float).reshape(n)
        azi = np.asarray(conditions.get("azimuth", np.zeros((n, 1))), dtype=float).reshape(n)
        if n and (zen.min() < 0 or zen.max() >= 89.0 + 1e-9):
            raise SimulationError(f"zenith angles must lie in [0, 89] degrees, got {zen.min():g}-{zen.max():g}")
        if n:
            self._ensure_tables(max(self._threshold_gev(e * 1e-3) for e in energies))
        rng = np.random.default_rng(seed)
        _Sibyll.get().seed(rng)
        showers = np.zeros((n, 2 * self.nb), dtype=np.float32)
        xmax = np.zeros((n, 1))
        dmax = np.zeros((n, 1))
        for i in range(n):
            vec, xmax[i, 0], dmax[i, 0] = self.simulate_one(rng, float(energies[i]), float(zen[i]))
            showers[i] = vec
            self.shower_done()
        return ShowerBatch(energies=energies.copy(), showers=showers,
                           conditions={"zenith": zen.reshape(n, 1), "azimuth": azi.reshape(n, 1)},
                           truth={"xmax": xmax, "dEdX_max": dmax})
