"""Geant4 data sets: find the official ones, or build substitute EM tables.

geant4-pybind ships Geant4 11.4 without its data sets (about 2 GB from cern.ch,
which no package registry carries). When they are installed (``GEANT4_DATA_DIR``
or the ``G4*DATA`` variables, or geant4-pybind's own download in
``~/.geant4_pybind``) they are used as they are. Otherwise electromagnetic showers
can still be simulated with *substitute* tables computed here for the elements
of the geometry:

* ``G4EMLOW/brem_SB/br<Z>``: the Seltzer-Berger scaled bremsstrahlung cross
  section chi(kappa, T) = (beta^2/Z^2) k dsigma/dk in mb, computed from the
  screened Bethe-Heitler cross section with Tsai's Thomas-Fermi screening
  functions and the Davies-Bethe-Maximon Coulomb correction (the same formula
  that Geant4's G4eBremsstrahlungRelModel uses above 1 GeV), Dirac-Fock radiation
  logarithms for Z < 5.
* ``G4EMLOW/epics2017/phot/pe-*.dat``: photo-effect total and per-shell cross
  sections from xraylib (``CS_Photo``, ``CS_Photo_Partial``, ``EdgeEnergy``),
  in the file layout that G4LivermorePhotoElectricModel reads.
* ``G4EMLOW/epics2017/rayl/re-cs-Z.dat``: Rayleigh cross sections from xraylib
  ``CS_Rayl`` (the angular distribution is Geant4's built-in parameterisation).
* an empty ``G4ENSDFSTATE/ENSDFSTATE.dat`` and an empty ``PhotonEvaporation``.

Every file begins with nothing but numbers (Geant4 reads them with ``>>``); the
provenance is in ``MANIFEST.json`` next to them and in :attr:`G4DataInfo.provenance`.

:func:`apply_environment` must run before ``import geant4_pybind``: that import
starts a downloader unless ``GEANT4_DATA_DIR`` is set.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fastshower.errors import FastshowerError

__all__ = [
    "OFFICIAL_DATASETS",
    "SUBSTITUTE_PROVENANCE",
    "G4DataInfo",
    "Geant4DataError",
    "apply_environment",
    "build_substitute",
    "describe_tables",
    "elements_of",
    "manifest_hash",
    "read_brem_table",
    "read_physics_vector",
    "resolve_data",
    "tsai_brem_dcs",
]

# Geant4 11.4 data sets (name, version, environment variable), as geant4-pybind 0.1.3 lists them.
OFFICIAL_DATASETS: dict[str, tuple[str, str]] = {
    "G4NDL": ("4.7.1", "G4NEUTRONHPDATA"),
    "G4EMLOW": ("8.8", "G4LEDATA"),
    "PhotonEvaporation": ("6.1.2", "G4LEVELGAMMADATA"),
    "RadioactiveDecay": ("6.1.2", "G4RADIOACTIVEDATA"),
    "G4PARTICLEXS": ("4.2", "G4PARTICLEXSDATA"),
    "G4PII": ("1.3", "G4PIIDATA"),
    "RealSurface": ("2.2", "G4REALSURFACEDATA"),
    "G4SAIDDATA": ("2.0", "G4SAIDXSDATA"),
    "G4ABLA": ("3.3", "G4ABLADATA"),
    "G4INCL": ("1.3", "G4INCLDATA"),
    "G4ENSDFSTATE": ("3.0", "G4ENSDFSTATEDATA"),
    "G4CHANNELING": ("2.0", "G4CHANNELINGDATA"),
}
# What each kind of physics list opens.
EM_DATASETS = ("G4EMLOW", "G4ENSDFSTATE", "PhotonEvaporation")
HADRONIC_DATASETS = ("G4EMLOW", "G4ENSDFSTATE", "PhotonEvaporation", "G4PARTICLEXS", "G4SAIDDATA")

SUBSTITUTE_VERSION = "g4data-substitute-v1"
SUBSTITUTE_PROVENANCE = (
    "geant4 11.4 substitute EM tables (fastshower g4data-substitute-v1): bremsstrahlung below 1 GeV "
    "from the Tsai screened Bethe-Heitler cross section instead of Seltzer-Berger's tables "
    "(approximate below ~10 MeV electron energy), photo-effect and Rayleigh cross sections from "
    "xraylib instead of EPICS2017 (extrapolated above 1 MeV / 0.8 MeV), no fluorescence or "
    "nuclear de-excitation data"
)
OFFICIAL_PROVENANCE = "geant4 11.4 official data"

_FORMAT_REVISION = 1  # bump when the files written here change


class Geant4DataError(FastshowerError, RuntimeError):
    """Geant4 data sets needed for a simulation are missing or unusable."""


@dataclass(frozen=True)
class G4DataInfo:
    """Where Geant4 finds its data, and what that data is.

    Attributes:
        mode: ``"official"`` (Geant4's own data sets) or ``"substitute"`` (tables built here).
        root: folder used as ``GEANT4_DATA_DIR``.
        env: every ``G4*DATA`` variable to set (plus ``GEANT4_DATA_DIR``).
        provenance: one line saying where the physics tables come from.
        elements: atomic numbers the substitute tables cover (empty for official data).
    """

    mode: Literal["official", "substitute"]
    root: Path
    env: dict[str, str]
    provenance: str
    elements: tuple[int, ...] = field(default=())


# --- materials -> elements --------------------------------------------------------------

_MATERIAL_ELEMENTS: dict[str, tuple[int, ...]] = {
    "G4_Galactic": (1,),
    "G4_AIR": (6, 7, 8, 18),
    "G4_WATER": (1, 8),
    "G4_W": (74,),
    "G4_Si": (14,),
    "G4_Pb": (82,),
    "G4_lAr": (18,),
    "G4_Ar": (18,),
    "G4_Fe": (26,),
    "G4_Cu": (29,),
    "G4_Al": (13,),
    "G4_C": (6,),
    "G4_Be": (4,),
    "G4_Ta": (73,),
    "G4_U": (92,),
    "G4_Au": (79,),
    "G4_Ag": (47,),
    "G4_Ge": (32,),
    "G4_Sn": (50,),
    "G4_Ni": (28,),
    "G4_Ti": (22,),
    "G4_Mg": (12,),
    "G4_H": (1,),
    "G4_He": (2,),
    "G4_lH2": (1,),
    "G4_N": (7,),
    "G4_O": (8,),
    "G4_Kr": (36,),
    "G4_Xe": (54,),
    "G4_lKr": (36,),
    "G4_lXe": (54,),
    "G4_CESIUM_IODIDE": (53, 55),
    "G4_SODIUM_IODIDE": (11, 53),
    "G4_BGO": (8, 32, 83),
    "G4_PbWO4": (8, 74, 82),
    "G4_LITHIUM_FLUORIDE": (3, 9),
    "G4_BARIUM_FLUORIDE": (9, 56),
    "G4_CESIUM_FLUORIDE": (9, 55),
    "G4_CALCIUM_FLUORIDE": (9, 20),
    "G4_PLASTIC_SC_VINYLTOLUENE": (1, 6),
    "G4_POLYSTYRENE": (1, 6),
    "G4_POLYETHYLENE": (1, 6),
    "G4_KAPTON": (1, 6, 7, 8),
    "G4_MYLAR": (1, 6, 8),
    "G4_SILICON_DIOXIDE": (8, 14),
    "G4_GLASS_PLATE": (8, 11, 14, 20),
}


def elements_of(materials: Iterable[str]) -> set[int]:
    """Atomic numbers of the Geant4 NIST materials given (plus the world's ``G4_Galactic``).

    Raises:
        Geant4DataError: for a material not in the built-in table.
    """
    zs: set[int] = set()
    for m in materials:
        if m is None:
            continue
        if m not in _MATERIAL_ELEMENTS:
            known = ", ".join(sorted(_MATERIAL_ELEMENTS))
            raise Geant4DataError(
                f"material {m!r} is not in fastshower's element table; known: {known}. "
                "Add it to fastshower.montecarlo.g4data._MATERIAL_ELEMENTS or use official Geant4 data."
            )
        zs.update(_MATERIAL_ELEMENTS[m])
    return zs


# --- official data ------------------------------------------------------------------------


def _official_env(root: Path) -> dict[str, str]:
    env = {"GEANT4_DATA_DIR": str(root)}
    for name, (version, var) in OFFICIAL_DATASETS.items():
        env[var] = str(root / f"{name}{version}")
    return env


def _looks_complete(name: str, path: Path) -> bool:
    if not path.is_dir():
        return False
    if name == "G4EMLOW":
        return (path / "brem_SB" / "br1").is_file() and (path / "epics2017").is_dir()
    if name == "G4ENSDFSTATE":
        f = path / "ENSDFSTATE.dat"
        return f.is_file() and f.stat().st_size > 0
    if name == "PhotonEvaporation":
        return any(path.iterdir())
    return any(path.iterdir())


def _find_official(needed: Iterable[str]) -> tuple[Path | None, dict[str, str], list[str]]:
    """Look for official data sets: explicit variables, GEANT4_DATA_DIR, ~/.geant4_pybind.

    Returns (root, env, missing names); root is None when nothing usable was found.
    """
    needed = list(needed)
    candidates: list[Path] = []
    if os.environ.get("GEANT4_DATA_DIR"):
        candidates.append(Path(os.environ["GEANT4_DATA_DIR"]))
    candidates.append(Path.home() / ".geant4_pybind")
    best: tuple[Path | None, dict[str, str], list[str]] = (None, {}, needed)
    for root in candidates:
        if _is_substitute(root):
            continue
        env = _official_env(root)
        # explicit per-set variables win over the folder layout
        for name in OFFICIAL_DATASETS:
            var = OFFICIAL_DATASETS[name][1]
            if os.environ.get(var):
                env[var] = os.environ[var]
        missing = [n for n in needed if not _looks_complete(n, Path(env[OFFICIAL_DATASETS[n][1]]))]
        if not missing:
            return root, env, []
        if len(missing) < len(best[2]):
            best = (root, env, missing)
    # only explicit variables, no folder
    if all(os.environ.get(OFFICIAL_DATASETS[n][1]) for n in needed):
        env = {OFFICIAL_DATASETS[n][1]: os.environ[OFFICIAL_DATASETS[n][1]] for n in OFFICIAL_DATASETS
               if os.environ.get(OFFICIAL_DATASETS[n][1])}
        missing = [n for n in needed if not _looks_complete(n, Path(env[OFFICIAL_DATASETS[n][1]]))]
        if not missing:
            root = Path(env[OFFICIAL_DATASETS["G4EMLOW"][1]]).parent
            env["GEANT4_DATA_DIR"] = str(root)
            return root, env, []
    return best


def _is_substitute(root: Path) -> bool:
    return (root / "MANIFEST.json").is_file() and SUBSTITUTE_VERSION in str(root)


def _missing_message(missing: Iterable[str], why: str) -> str:
    sets = ", ".join(f"{n}{OFFICIAL_DATASETS[n][0]} (${OFFICIAL_DATASETS[n][1]})" for n in missing)
    return (
        f"{why}: missing Geant4 11.4 data sets {sets}. Download them from "
        "https://cern.ch/geant4-data/datasets (or let geant4-pybind fetch them into ~/.geant4_pybind) "
        "and set GEANT4_DATA_DIR to the folder holding them, or set each variable named above."
    )


# --- resolve ------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get("FASTSHOWER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fastshower"


def resolve_data(
    elements: Iterable[int],
    mode: Literal["auto", "official", "substitute"] = "auto",
    cache_dir: Path | None = None,
    hadronic: bool = False,
) -> G4DataInfo:
    """Decide which Geant4 data to use, building substitute tables if needed.

    Args:
        elements: atomic numbers of every element in the geometry (see :func:`elements_of`).
        mode: ``"official"`` requires Geant4's data sets; ``"substitute"`` always uses the
            tables built here; ``"auto"`` takes the official ones when present.
        cache_dir: where substitute tables go (default ``$FASTSHOWER_CACHE`` or
            ``~/.cache/fastshower``); they are built once and reused.
        hadronic: the physics list is hadronic (FTFP_BERT), which only runs on official data.

    Raises:
        Geant4DataError: official data needed but missing, or an unknown mode.
    """
    if mode not in ("auto", "official", "substitute"):
        raise Geant4DataError(f"unknown Geant4 data mode {mode!r}; use auto, official or substitute")
    zs = sorted({int(z) for z in elements})
    needed = HADRONIC_DATASETS if hadronic else EM_DATASETS
    if mode in ("auto", "official") or hadronic:
        root, env, missing = _find_official(needed)
        if not missing and root is not None:
            return G4DataInfo("official", root, env, OFFICIAL_PROVENANCE)
        if hadronic:
            raise Geant4DataError(
                _missing_message(missing, "hadronic showers (FTFP_BERT) need Geant4's official data")
            )
        if mode == "official":
            raise Geant4DataError(_missing_message(missing, "official Geant4 data requested"))
    if any(z < 1 or z > 98 for z in zs):
        raise Geant4DataError(f"substitute tables cover Z = 1..98, asked for {zs}")
    root = build_substitute(zs, cache_dir)
    env = _official_env(root)
    return G4DataInfo("substitute", root, env, SUBSTITUTE_PROVENANCE, tuple(zs))


def manifest_hash(root: Path) -> str | None:
    """First 16 hex digits of the sha256 of a substitute tree's MANIFEST.json (it lists the version, elements
    and files, so it names one build); None where there is none."""
    try:
        return hashlib.sha256((root / "MANIFEST.json").read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def describe_tables(info: G4DataInfo, hash_before: str | None) -> dict[str, Any]:
    """The data ``info`` for a worker's provenance: version, "built" or read from "cache" (the manifest's hash
    ``hash_before`` resolving changed or not), content hash; official data is Geant4's own, not built here."""
    if info.mode == "official":
        return {"table": "g4data", "version": "official", "source": "official", "root": str(info.root)}
    digest = manifest_hash(info.root)
    return {"table": "g4data", "version": SUBSTITUTE_VERSION, "source": "cache" if digest == hash_before else "built",
            "sha256": digest, "elements": list(info.elements)}


def apply_environment(info: G4DataInfo) -> None:
    """Set ``GEANT4_DATA_DIR`` and the ``G4*DATA`` variables. Call before importing geant4_pybind."""
    for key, value in info.env.items():
        os.environ[key] = value


# --- substitute tables: cache handling -------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _manifest_ok(root: Path, zs: Iterable[int]) -> bool:
    try:
        man = json.loads((root / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        return False
    if man.get("version") != SUBSTITUTE_VERSION or man.get("format_revision") != _FORMAT_REVISION:
        return False
    have = {int(z) for z in man.get("elements", [])}
    if not set(zs) <= have:
        return False
    for rel in man.get("files", []):
        if not (root / rel).is_file():
            return False
    return True


def build_substitute(elements: Iterable[int], cache_dir: Path | None = None) -> Path:
    """Build (or reuse) substitute EM tables covering ``elements``; return the data root.

    The root is ``<cache_dir>/g4data-substitute-v1``. A build writes a complete new tree in a
    temporary folder and renames it into place under a file lock, so concurrent workers never
    see a half-written tree; a corrupt or incomplete tree (manifest missing or listing
    absent files) is rebuilt. Elements already present are kept.
    """
    zs = sorted({int(z) for z in elements} | {1})
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = base / SUBSTITUTE_VERSION
    if _manifest_ok(root, zs):
        return root
    with _file_lock(base / f".{SUBSTITUTE_VERSION}.lock"):
        if _manifest_ok(root, zs):
            return root
        have: set[int] = set()
        try:
            man = json.loads((root / "MANIFEST.json").read_text())
            if man.get("version") == SUBSTITUTE_VERSION and man.get("format_revision") == _FORMAT_REVISION:
                have = {int(z) for z in man.get("elements", [])}
        except (OSError, ValueError):
            have = set()
        all_z = sorted(set(zs) | have)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SUBSTITUTE_VERSION}-", dir=base))
        try:
            t0 = time.perf_counter()
            files = _write_tree(tmp, all_z)
            manifest = {
                "version": SUBSTITUTE_VERSION,
                "format_revision": _FORMAT_REVISION,
                "geant4": "11.4",
                "elements": all_z,
                "provenance": SUBSTITUTE_PROVENANCE,
                "build_seconds": round(time.perf_counter() - t0, 3),
                "files": files,
            }
            (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
            old = None
            if root.exists():
                old = base / f".{SUBSTITUTE_VERSION}-old-{os.getpid()}-{time.time_ns()}"
                os.rename(root, old)
            os.rename(tmp, root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root


def _write_tree(root: Path, zs: list[int]) -> list[str]:
    emlow = root / f"G4EMLOW{OFFICIAL_DATASETS['G4EMLOW'][0]}"
    files: list[str] = []
    for sub in ("brem_SB", "epics2017/phot", "epics2017/rayl"):
        (emlow / sub).mkdir(parents=True, exist_ok=True)
    ensdf = root / f"G4ENSDFSTATE{OFFICIAL_DATASETS['G4ENSDFSTATE'][0]}"
    ensdf.mkdir(parents=True, exist_ok=True)
    (ensdf / "ENSDFSTATE.dat").write_text("")
    (root / f"PhotonEvaporation{OFFICIAL_DATASETS['PhotonEvaporation'][0]}").mkdir(parents=True, exist_ok=True)
    for z in zs:
        files += [str(p.relative_to(root)) for p in _write_brem(emlow, z)]
        files += [str(p.relative_to(root)) for p in _write_photo(emlow, z)]
        files += [str(p.relative_to(root)) for p in _write_rayleigh(emlow, z)]
    return files


# --- bremsstrahlung ---------------------------------------------------------------------------

_ALPHA = 7.2973525693e-3
_RE_CM = 2.8179403262e-13
_ME = 0.51099895  # MeV
_BREM_C_MB = 16.0 / 3.0 * _ALPHA * _RE_CM**2 / 1e-27  # 16/3 alpha r_e^2 in mb
# radiation logarithms from Dirac-Fock atoms for Z < 5 (as in Geant4's relativistic model)
_FEL_LOW = (0.0, 5.3104, 4.7935, 4.7402, 4.7112)
_FINEL_LOW = (0.0, 5.9173, 5.6125, 5.5377, 5.4728)

# grid: kappa = k/T and ln(T/MeV) from 1 keV to 10 GeV (8 points per decade)
BREM_KAPPA = np.array(
    [1e-12, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6,
     0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0]
)
BREM_LOGT = np.log(np.logspace(-3, 4, 57))


def coulomb_correction(z: float) -> float:
    """Davies-Bethe-Maximon Coulomb correction f_c(Z)."""
    a2 = (_ALPHA * z) ** 2
    return a2 * (1.0 / (1.0 + a2) + 0.20206 - 0.0369 * a2 + 0.0083 * a2**2 - 0.002 * a2**3)


def tsai_brem_dcs(z: int, k: np.ndarray, t: np.ndarray) -> np.ndarray:
    """k dsigma/dk / (16/3 alpha r_e^2 Z^2) for an electron of kinetic energy t (MeV) emitting k (MeV).

    The screened Bethe-Heitler cross section with Tsai's fits to the Thomas-Fermi
    screening functions (Rev. Mod. Phys. 46 (1974) 815, Eqs. 3.38-3.41) and the
    Coulomb correction; complete screening with Dirac-Fock logarithms for Z < 5.
    No LPM or dielectric suppression (Geant4 applies the latter itself).
    """
    k = np.asarray(k, dtype=float)
    t = np.asarray(t, dtype=float)
    et = t + _ME
    y = k / et
    onemy = 1.0 - y
    dum0 = onemy + 0.75 * y * y
    fc = coulomb_correction(z)
    logz = math.log(z)
    if z < 5:
        fel, finel = _FEL_LOW[z], _FINEL_LOW[z]
        f = dum0 * ((fel - fc) + finel / z) + onemy * (1.0 + 1.0 / z) / 12.0
    else:
        eprime = np.maximum(et - k, 1e-300)
        dum1 = y / eprime
        gam = dum1 * 100.0 * _ME / z ** (1.0 / 3.0)
        eps = dum1 * 100.0 * _ME / z ** (2.0 / 3.0)
        phi1 = 16.863 - 2.0 * np.log(1.0 + 0.311877 * gam**2) + 2.4 * np.exp(-0.9 * gam) + 1.6 * np.exp(-1.5 * gam)
        phi1m2 = 2.0 / (3.0 + 19.5 * gam + 18.0 * gam**2)
        psi1 = 24.34 - 2.0 * np.log(1.0 + 13.111641 * eps**2) + 2.8 * np.exp(-8.0 * eps) + 1.2 * np.exp(-29.2 * eps)
        psi1m2 = 2.0 / (3.0 + 120.0 * eps + 1200.0 * eps**2)
        fz = logz / 3.0 + fc
        f = dum0 * ((0.25 * phi1 - fz) + (0.25 * psi1 - 2.0 * logz / 3.0) / z) + 0.125 * onemy * (phi1m2 + psi1m2 / z)
    return np.maximum(f, 0.0)


def brem_chi_table(z: int) -> np.ndarray:
    """Scaled cross section chi(kappa, T) = (beta^2/Z^2) k dsigma/dk in mb, shape (n_T, n_kappa).

    Where the ultra-relativistic formula falls below a floor at low energies (it goes
    negative near the tip for T of a few MeV and below), the value is held at 5 % of
    the same T's soft-photon value so that the table stays positive and monotone in shape.
    """
    t = np.exp(BREM_LOGT)[:, None]
    kappa = BREM_KAPPA[None, :]
    f = tsai_brem_dcs(z, kappa * t, np.broadcast_to(t, (len(BREM_LOGT), len(BREM_KAPPA))))
    floor = 0.05 * f[:, :1]
    f = np.maximum(f, floor)
    beta2 = t * (t + 2 * _ME) / (t + _ME) ** 2
    return beta2 * _BREM_C_MB * f


def _write_brem(emlow: Path, z: int) -> list[Path]:
    chi = brem_chi_table(z)
    path = emlow / "brem_SB" / f"br{z}"
    lines = [f"2 {len(BREM_KAPPA)} {len(BREM_LOGT)}"]
    lines.append(" ".join(f"{x:.10g}" for x in BREM_KAPPA))
    lines.append(" ".join(f"{y:.10g}" for y in BREM_LOGT))
    for row in chi:
        lines.append(" ".join(f"{v:.8g}" for v in row))
    path.write_text("\n".join(lines) + "\n")
    return [path]


def read_brem_table(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse a ``brem_SB/br<Z>`` file as G4Physics2DVector::Retrieve does: (kappa, lnT, chi[nT, nk])."""
    tok = Path(path).read_text().split()
    _, nx, ny = int(tok[0]), int(tok[1]), int(tok[2])
    vals = np.array(tok[3:], dtype=float)
    if vals.size != nx + ny + nx * ny:
        raise ValueError(f"{path}: expected {nx + ny + nx * ny} numbers, found {vals.size}")
    return vals[:nx], vals[nx : nx + ny], vals[nx + ny :].reshape(ny, nx)


# --- photo-effect and Rayleigh (xraylib) -----------------------------------------------------

_PHOTO_TOP_MEV = 5.0  # tables end here; above, sigma = a1/E (Geant4's parameterisation)
_XRL_MIN_KEV = 0.1


def _xrl():
    try:
        import xraylib
    except ImportError as exc:  # pragma: no cover - dependency
        raise Geant4DataError(
            "building substitute Geant4 EM tables needs the 'xraylib' package (pip install xraylib), "
            "or set GEANT4_DATA_DIR to Geant4's official data sets"
        ) from exc
    return xraylib


def _barn_per_cm2g(z: int) -> float:
    x = _xrl()
    return x.AtomicWeight(z) / 0.602214076  # cm^2/g -> barn/atom (1e-24 * N_A)


_XRL_MAX_CACHE: dict[tuple[str, int], float] = {}


def _xrl_max_kev(name: str, z: int) -> float:
    """Highest energy (keV) where xraylib's ``name`` answers for Z (its tables end near 0.8-1 MeV)."""
    key = (name, z)
    if key not in _XRL_MAX_CACHE:
        fn = getattr(_xrl(), name)
        lo, hi = 50.0, 2000.0
        for _ in range(30):
            mid = math.sqrt(lo * hi)
            try:
                fn(z, mid)
                lo = mid
            except ValueError:
                hi = mid
        _XRL_MAX_CACHE[key] = 0.999 * lo
    return _XRL_MAX_CACHE[key]


def _photo_total_barn(z: int, e_mev: np.ndarray) -> np.ndarray:
    """Total photo-effect cross section, barn/atom; power law extrapolation above xraylib's range."""
    x = _xrl()
    conv = _barn_per_cm2g(z)
    e_kev = np.asarray(e_mev, dtype=float) * 1e3
    out = np.empty_like(e_kev)
    e2 = _xrl_max_kev("CS_Photo", z)
    e1 = 0.5 * e2
    s1, s2 = x.CS_Photo(z, e1), x.CS_Photo(z, e2)
    slope = math.log(s2 / s1) / math.log(e2 / e1)
    for i, e in enumerate(e_kev):
        if e > e2:
            out[i] = s2 * (e / e2) ** slope
        else:
            out[i] = x.CS_Photo(z, max(e, _XRL_MIN_KEV))
    return out * conv


def _shells(z: int) -> list[tuple[int, float]]:
    """(shell index, binding energy in MeV) of the shells xraylib gives partial cross sections for."""
    x = _xrl()
    out: list[tuple[int, float]] = []
    for s in range(0, 31):
        try:
            edge = x.EdgeEnergy(z, s)
        except ValueError:
            continue
        if edge <= 0:
            continue
        try:
            val = x.CS_Photo_Partial(z, s, min(max(edge * 1.5, _XRL_MIN_KEV * 1.01), _xrl_max_kev("CS_Photo", z)))
        except ValueError:
            val = 0.0
        if val > 0 or not out:
            out.append((s, edge * 1e-3))
    if not out:  # hydrogen-like fallback: one shell at the ionisation energy
        out.append((0, 13.6e-6 * z * z))
    return out


def _partial_barn(z: int, shell: int, e_mev: np.ndarray, binding: float) -> np.ndarray:
    """Partial photo-effect cross section of one shell, barn/atom.

    Above the range of xraylib's partial tables the shell keeps its last share of the total.
    """
    x = _xrl()
    conv = _barn_per_cm2g(z)
    e_kev = np.asarray(e_mev, dtype=float) * 1e3
    out = np.zeros(len(e_kev))
    lo, hi = max(binding * 1e3 * 1.001, _XRL_MIN_KEV), 2000.0
    for _ in range(30):  # highest energy where xraylib answers for this shell
        mid = math.sqrt(lo * hi)
        try:
            x.CS_Photo_Partial(z, shell, mid)
            lo = mid
        except ValueError:
            hi = mid
    e_last = 0.999 * lo
    try:
        share_last = x.CS_Photo_Partial(z, shell, e_last) / x.CS_Photo(z, min(e_last, _xrl_max_kev("CS_Photo", z)))
    except ValueError:
        share_last = 0.0
    above = e_kev > e_last
    if above.any():
        out[above] = share_last * _photo_total_barn(z, e_kev[above] * 1e-3) / conv
    for i in np.nonzero(~above & (e_kev >= binding * 1e3))[0]:
        try:
            out[i] = x.CS_Photo_Partial(z, shell, max(e_kev[i], _XRL_MIN_KEV))
        except ValueError:
            out[i] = 0.0
    return out * conv


def _log_grid(lo: float, hi: float, per_decade: int = 40) -> np.ndarray:
    n = max(3, math.ceil(math.log10(hi / lo) * per_decade) + 1)
    return np.logspace(math.log10(lo), math.log10(hi), n)


def _vector_text(e: np.ndarray, v: np.ndarray) -> str:
    """G4PhysicsVector ascii layout: 'emin emax n' / 'n' / n lines 'e v'."""
    lines = [f"{e[0]:.10g} {e[-1]:.10g} {len(e)}", f"{len(e)}"]
    lines += [f"{a:.10g} {b:.10g}" for a, b in zip(e, v, strict=True)]
    return "\n".join(lines) + "\n"


def read_physics_vector(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse a G4PhysicsVector ascii file (as G4PhysicsVector::Retrieve(ascii=true) does)."""
    tok = Path(path).read_text().split()
    n = int(tok[2])
    if int(tok[3]) != n:
        raise ValueError(f"{path}: inconsistent vector length")
    vals = np.array(tok[4 : 4 + 2 * n], dtype=float).reshape(n, 2)
    return vals[:, 0], vals[:, 1]


def _write_photo(emlow: Path, z: int) -> list[Path]:
    """Photo-effect tables of element ``z`` from xraylib; returns the files written.

    In ``epics2017/phot``, in the layout G4LivermorePhotoElectricModel reads: totals, per-shell cross
    sections and the parameterisation above ``_PHOTO_TOP_MEV``.
    """
    d = emlow / "epics2017" / "phot"
    shells = _shells(z)
    top = _PHOTO_TOP_MEV
    written = _write_photo_totals(d, z, shells, top)
    grids, all_e, part_on_all = _photo_shell_partials(z, shells, top)
    if len(shells) > 1:
        written.append(_write_photo_shells(d, z, grids, all_e, part_on_all))
    written += _write_photo_high(d, z, shells, all_e, part_on_all, top)
    return written


def _write_photo_totals(d: Path, z: int, shells: list[tuple[int, float]], top: float) -> list[Path]:
    """Total cross section times E^3 (barn MeV^3) vs E (MeV): ``pe-cs-Z`` and ``pe-le-cs-Z``; returns the files.

    ``pe-cs-Z`` runs from the K edge to ``top``; ``pe-le-cs-Z`` (atoms with more than one shell) from the
    lowest edge up to the K edge, with points on both sides of every edge in between.
    """
    n = len(shells)
    e_k = shells[0][1]
    e_min = max(min(b for _, b in shells), _XRL_MIN_KEV * 1e-3)
    written: list[Path] = []
    e_hi = _log_grid(e_k, top, 60)
    p = d / f"pe-cs-{z}.dat"
    p.write_text(_vector_text(e_hi, _photo_total_barn(z, e_hi) * e_hi**3))
    written.append(p)
    if n > 1 and e_min < e_k:
        grid = list(_log_grid(e_min, e_k, 60)[:-1])
        for _, b in shells[1:]:
            if e_min < b < e_k:
                grid += [b * (1 - 1e-5), b * (1 + 1e-5)]
        grid.append(e_k * (1 - 1e-6))
        e_lo = np.unique(np.array(grid))
        p = d / f"pe-le-cs-{z}.dat"
        p.write_text(_vector_text(e_lo, _photo_total_barn(z, e_lo) * e_lo**3))
        written.append(p)
    return written


def _photo_shell_partials(z: int, shells: list[tuple[int, float]],
                          top: float) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Per-shell photo-effect cross sections that add up to the total, barn/atom.

    Returns (per shell: its energy grid from its edge to ``top``, MeV; the union of those grids (m,) MeV;
    the shells' cross sections on the union, (n_shells, m)). Whatever xraylib's partials leave of the
    total goes to the last shell.
    """
    n = len(shells)
    grids = []
    for _s, b in shells:
        g = _log_grid(b * (1 + 1e-6), top, 40)
        inner = [bb for _, bb in shells if b < bb < top]
        extra = [bb * (1 + 1e-5) for bb in inner] + [bb * (1 - 1e-5) for bb in inner]
        g = np.unique(np.concatenate([[b], g, extra]))
        grids.append(g)
    all_e = np.unique(np.concatenate(grids))
    total = _photo_total_barn(z, all_e)
    part_on_all = np.array([_partial_barn(z, s, all_e, b) for s, b in shells])
    if n == 1:
        part_on_all[0] = np.where(all_e >= shells[0][1], total, 0.0)
    else:
        # share the total among the shells in proportion to xraylib's partials (they do not
        # cover the outermost shells, and drift from the total for light elements at high E)
        psum = part_on_all.sum(axis=0)
        ok = psum > 0
        part_on_all[:, ok] *= total[ok] / psum[ok]
        part_on_all[-1, ~ok] = np.where(all_e[~ok] >= shells[-1][1], total[~ok], 0.0)
    return grids, all_e, part_on_all


def _write_photo_shells(d: Path, z: int, grids: list[np.ndarray], all_e: np.ndarray, part_on_all: np.ndarray) -> Path:
    """Write ``pe-ss-cs-Z``: each shell's cross section (barn) on its own grid (MeV); returns the file.

    ``grids``, ``all_e``, ``part_on_all``: as :func:`_photo_shell_partials` returns them.
    """
    lines = []
    for i, g in enumerate(grids):
        v = np.interp(g, all_e, part_on_all[i])
        lines.append(f"{g[0]:.10g} {g[-1]:.10g} {len(g)} {i}")
        lines += [f"{a:.10g} {c:.10g}" for a, c in zip(g, v, strict=True)]
    p = d / f"pe-ss-cs-{z}.dat"
    p.write_text("\n".join(lines) + "\n")
    return p


def _write_photo_high(d: Path, z: int, shells: list[tuple[int, float]], all_e: np.ndarray,
                      part_on_all: np.ndarray, top: float) -> list[Path]:
    """Write ``pe-high-Z`` and ``pe-low-Z``, the parameterisation above ``top`` MeV; returns the files.

    Per shell: binding energy (MeV) and a1 with sigma = a1/E (barn MeV), cumulative over the shells and
    continuous at ``top`` (the last shell's cumulative value is the total there).
    """
    n = len(shells)
    sig_top = [float(np.interp(top, all_e, part_on_all[i])) for i in range(n)]
    cum = np.cumsum(sig_top)
    cum[-1] = float(_photo_total_barn(z, np.array([top]))[0])
    rows = [f"{n} {n} {top:.10g}"]
    for i, (_s, b) in enumerate(shells):
        rows.append(f"{b:.10g} {cum[i] * top:.10g} 0 0 0 0 0")
    text = "\n".join(rows) + "\n"
    written = []
    for name in (f"pe-high-{z}.dat", f"pe-low-{z}.dat"):
        p = d / name
        p.write_text(text)
        written.append(p)
    return written


def _write_rayleigh(emlow: Path, z: int) -> list[Path]:
    x = _xrl()
    conv_mm2 = _barn_per_cm2g(z) * 1e-22  # barn -> mm^2 (Geant4 internal units)
    e_kev = _log_grid(_XRL_MIN_KEV, _xrl_max_kev("CS_Rayl", z), 40)
    sig = np.array([x.CS_Rayl(z, e) for e in e_kev]) * conv_mm2
    e_mev = e_kev * 1e-3
    p = emlow / "epics2017" / "rayl" / f"re-cs-{z}.dat"
    p.write_text(_vector_text(e_mev, sig * e_mev**2))
    return [p]
