"""Energy specifications: ``2.0``, ``0.5,1,1.5,2.5``, ``1:100``, ``1:100:log``, ``500MeV``.

A spec is parsed once into an :class:`EnergySpec` that draws incident energies
(MeV) from a numpy Generator. The default unit is GeV; a suffix (eV, keV, MeV,
GeV, TeV, PeV, EeV) overrides it per number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fastshower.errors import FastshowerError

__all__ = ["EnergySpec", "EnergySpecError", "parse_energy", "parse_energy_value"]

_UNITS_MEV = {
    "ev": 1e-6,
    "kev": 1e-3,
    "mev": 1.0,
    "gev": 1e3,
    "tev": 1e6,
    "pev": 1e9,
    "eev": 1e12,
}
_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([a-zA-Z]*)\s*$")


class EnergySpecError(FastshowerError, ValueError):
    """An energy spec that does not parse or is physically impossible."""


def parse_energy_value(text: str, default_unit: str = "GeV") -> float:
    """One energy with an optional unit suffix, in MeV (``"500MeV"`` -> 500.0, ``"2"`` -> 2000.0)."""
    m = _NUMBER.match(text)
    if not m:
        raise EnergySpecError(f"cannot read energy {text!r}: expected a number with an optional unit like 500MeV")
    unit = (m.group(2) or default_unit).lower()
    if unit not in _UNITS_MEV:
        raise EnergySpecError(
            f"unknown energy unit {m.group(2)!r} in {text!r}; use one of eV, keV, MeV, GeV, TeV, PeV, EeV"
        )
    value = float(m.group(1)) * _UNITS_MEV[unit]
    if not np.isfinite(value) or value <= 0:
        raise EnergySpecError(f"energy must be positive and finite, got {text!r}")
    return value


@dataclass(frozen=True)
class EnergySpec:
    """A distribution of incident energies.

    Attributes:
        kind: "fixed", "list" (equal shares), "uniform" or "log" (log-uniform).
        values: energies in MeV (one for fixed, the list, or (low, high)).
        text: the spec as written.
    """

    kind: Literal["fixed", "list", "uniform", "log"]
    values: tuple[float, ...]
    text: str

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` energies, shape (n,), MeV.

        Lists are filled in equal shares (then shuffled), so a list of four energies
        and n = 40 gives exactly ten of each.
        """
        if self.kind == "fixed":
            return np.full(n, self.values[0])
        if self.kind == "list":
            v = np.asarray(self.values)
            out = np.resize(v, n)  # cycles through the list: equal shares
            rng.shuffle(out)
            return out
        lo, hi = self.values
        if self.kind == "uniform":
            return rng.uniform(lo, hi, n)
        return np.exp(rng.uniform(np.log(lo), np.log(hi), n))

    def check_range(self, low_mev: float, high_mev: float, what: str) -> None:
        """Raise :class:`EnergySpecError` when the spec leaves [low, high] MeV."""
        if self.low < low_mev * (1 - 1e-9) or self.high > high_mev * (1 + 1e-9):
            raise EnergySpecError(
                f"energy {self.text!r} is outside the range {what} supports "
                f"({_fmt(low_mev)} to {_fmt(high_mev)})"
            )


def _fmt(mev: float) -> str:
    for unit, scale in (("EeV", 1e12), ("PeV", 1e9), ("TeV", 1e6), ("GeV", 1e3), ("MeV", 1.0), ("keV", 1e-3)):
        if mev >= scale:
            return f"{mev / scale:g} {unit}"
    return f"{mev * 1e6:g} eV"


def parse_energy(text: str, default_unit: str = "GeV") -> EnergySpec:
    """Parse an energy spec (see the module docstring); raises :class:`EnergySpecError`."""
    if not isinstance(text, str) or not text.strip():
        raise EnergySpecError("empty energy spec")
    t = text.strip()
    if ":" in t:
        parts = [p.strip() for p in t.split(":")]
        mode = "uniform"
        if len(parts) == 3:
            if parts[2].lower() not in ("log", "lin", "uniform"):
                raise EnergySpecError(f"energy range {text!r}: third field must be 'log' or 'lin'")
            mode = "log" if parts[2].lower() == "log" else "uniform"
            parts = parts[:2]
        if len(parts) != 2:
            raise EnergySpecError(f"energy range {text!r}: expected LOW:HIGH or LOW:HIGH:log")
        lo, hi = (parse_energy_value(p, default_unit) for p in parts)
        if not lo < hi:
            raise EnergySpecError(f"energy range {text!r}: low must be below high")
        return EnergySpec("log" if mode == "log" else "uniform", (lo, hi), t)
    if "," in t:
        vals = tuple(parse_energy_value(p, default_unit) for p in t.split(",") if p.strip())
        if not vals:
            raise EnergySpecError(f"empty energy list {text!r}")
        return EnergySpec("list", vals, t)
    return EnergySpec("fixed", (parse_energy_value(t, default_unit),), t)
