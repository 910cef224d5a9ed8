"""The one base of every error that means bad input rather than a bug.

Every user-facing error class of fastshower derives from :class:`FastshowerError`, so a
caller catches one class, and the CLI (:mod:`fastshower.cli`) turns any of them into one
line ``fastshower: error: ...`` and exit status 2 in one place. The subclasses keep the
builtin base they had (``ValueError`` for bad values, ``RuntimeError`` for a Monte Carlo
that failed), so ``except ValueError`` in user code still works.

Messages name the Python argument (``resume=True``), not a CLI flag: the CLI maps its flags
to those arguments one-to-one and prints ``name=True`` as its flag ``--name``, so the same
message reads right from both.
"""

from __future__ import annotations

__all__ = ["ConfigError", "FastshowerError"]


class FastshowerError(Exception):
    """Base of every error fastshower raises for input it cannot use."""


class ConfigError(FastshowerError, ValueError):
    """A configuration (model or training settings) with unknown keys or values of the wrong kind."""
