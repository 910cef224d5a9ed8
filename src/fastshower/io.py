"""HDF5 shower files in the CaloChallenge format, with fastshower's provenance.

Layout (readable by the CaloChallenge tools, which only look at the first two keys):

- ``incident_energies``: float (N, 1), MeV
- ``showers``: float32 (N, n_voxels), MeV, in the geometry's voxel order
- ``conditions/<name>``: float (N, k) labels a model is conditioned on (``position`` in mm, angles, ...)
- ``truth/<name>``: float (N, k) per-shower Monte Carlo truth that is not a condition (air-shower Xmax, ...)
- file attributes: ``geometry`` (JSON), ``particle``, ``pdg``, ``physics``, ``generator``,
  ``seed``, ``fastshower_version``, ``created``, ``n_target`` and ``complete``.

Writers commit every chunk as a small file in ``<file>.parts/`` and replace ``<file>`` (through a rename)
by an index of virtual datasets over the parts, so a writer killed at any moment, or stopped by a full
disk, leaves a file that opens with plain ``h5py.File(path, "r")`` and holds every committed chunk.
``complete`` stays False until the writer reaches its target and rewrites the file as one plain file;
``resume=True`` tops an unfinished file up. An OS lock on ``<file>.lock`` refuses a second writer.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import io
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from fastshower._version import __version__
from fastshower.errors import FastshowerError
from fastshower.geometry import (
    Geometry,
    GeometryError,
    alpha_permutation,
    convention_difference,
    geometry_from_json,
    list_geometries,
)

__all__ = [
    "LEGACY_LAYOUT",
    "ShowerBatch",
    "ShowerFile",
    "ShowerFileError",
    "ShowerWriter",
    "WriteLock",
    "check_values",
    "convention_clash",
    "convert_3dgan",
    "convert_calogan",
    "convert_conventions",
    "merge_files",
    "primary_ln_a",
    "write_showers",
]

PDG = {"e-": 11, "e+": -11, "gamma": 22, "pi+": 211, "pi-": -211, "p": 2212, "He": 1000020040,
       "N": 1000070140, "Fe": 1000260560}
_TARGET_CHUNK_BYTES = 2 << 20  # HDF5 chunk of ~2 MiB: good gzip ratio, cheap partial reads
_PARTS = ".parts"  # an unfinished file's chunks live in <file>.parts/ beside it
#: parts of one level merged into one of the next (see ShowerWriter._compact): a file of C chunks has at most
#: about 16 log16(C) parts, so rewriting its index stays cheap (~0.07 ms per part)
_FANOUT = 16
_NEVER_MERGED = 1 << 30  # the level of an adopted plain file: it is not copied again


class ShowerFileError(FastshowerError, ValueError):
    """A shower file that is missing, corrupt, truncated, foreign or inconsistent."""


@dataclass
class ShowerBatch:
    """A block of showers.

    Attributes:
        energies: incident energies, shape (n,), MeV.
        showers: deposited energy per voxel, shape (n, n_voxels), MeV.
        conditions: extra labels, name -> array of shape (n, k).
        truth: Monte Carlo truth that is not a condition, name -> array of shape (n, k).
    """

    energies: np.ndarray
    showers: np.ndarray
    conditions: dict[str, np.ndarray] = field(default_factory=dict)
    truth: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.energies.shape[0])


def check_values(batch: ShowerBatch, where: str, offset: int = 0) -> None:
    """Raise :class:`ShowerFileError` on NaN/inf or negative energies, naming the first bad shower."""
    e, s = batch.energies, batch.showers
    bad_e = ~np.isfinite(e) | (e <= 0)
    if bad_e.any():
        i = int(np.argmax(bad_e))
        raise ShowerFileError(f"{where}: incident energy of shower {offset + i} is {e[i]!r} (must be finite and > 0)")
    finite = np.isfinite(s)
    if not finite.all():
        i = int(np.argmax(~finite.all(axis=1)))
        raise ShowerFileError(f"{where}: shower {offset + i} has NaN or infinite voxel energies")
    neg = s < 0
    if neg.any():
        i = int(np.argmax(neg.any(axis=1)))
        raise ShowerFileError(f"{where}: shower {offset + i} has negative voxel energies (min {s[i].min():.3g} MeV)")
    for name, c in batch.conditions.items():
        if not np.isfinite(c).all():
            raise ShowerFileError(f"{where}: condition {name!r} has NaN or infinite values")


def _chunk_rows(n_voxels: int) -> int:
    return int(np.clip(_TARGET_CHUNK_BYTES // (4 * max(n_voxels, 1)), 1, 1024))


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --- the writer's lock ------------------------------------------------------------------


def _os_cause(exc: BaseException) -> str:
    """The operating system's reason in a few words ("No space left on device"), also out of h5py's long messages."""
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    text = str(exc)
    found = re.search(r"error message = '([^']+)'", text)
    if found:
        return found.group(1)
    return text.splitlines()[0] if text else type(exc).__name__


def _command_line() -> str:
    """This process's command, shortened, for the lock file (``fastshower simulate --geometry ...``)."""
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    if argv[0] in ("__main__.py", "-c", "-m"):
        argv[0] = "fastshower" if argv[0] == "__main__.py" else "python"
    return " ".join(argv)[:200]


class WriteLock:
    """An exclusive OS lock (``flock``) on ``<file>.lock``, held for a writer's whole life.

    A second writer of the same file (another run, or ``resume=True`` while the first still runs) is refused
    with the holder's process id and command. The kernel drops the lock when its holder dies, so a killed
    writer never blocks the resume of its file; readers never take it.

    Args:
        target: the file to be written; the lock is ``<target>.lock`` beside it.
    """

    def __init__(self, target: str | Path) -> None:
        self.target = Path(target)
        self.path = self.target.with_name(self.target.name + ".lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> WriteLock:
        """Take the lock without waiting (a no-op when held); :class:`ShowerFileError` naming the holder or the OS's
        reason (a read-only or full disk)."""
        if self._fd is not None:
            return self
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            fd = self._lock_current_file()
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {_command_line()}\n".encode())
        except OSError as exc:
            raise ShowerFileError(f"{self.target}: cannot write there ({_os_cause(exc)})") from None
        self._fd = fd
        return self

    def _lock_current_file(self) -> int:
        """A locked descriptor of the lock file now at ``self.path``.

        The holder removes the file when it is done; a locker that opened it just before then holds a lock on a
        removed file, which would let a third process lock a new one. So after locking, check that the file is
        still the one at the path, and start again if not.
        """
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                os.close(fd)
                pid, _, command = holder.partition(" ")
                who = f"process {pid} ({command})" if pid else "another process"
                raise ShowerFileError(f"{self.target} is being written by {who}; wait until it ends, "
                                      "or choose another output") from None
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                return fd
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file, then drop the lock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WriteLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- the writer ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """Rows ``start:start + n`` of an unfinished file, stored in ``file`` (relative to the file's folder)."""

    file: str
    start: int
    n: int


def _parts_dir(path: Path) -> Path:
    """Where an unfinished file keeps its parts: ``<file>.parts`` beside it."""
    return path.with_name(path.name + _PARTS)


class _GuardedFile(io.RawIOBase):
    """A file HDF5 writes through (h5py's file-object driver) that keeps the first OS error to itself.

    HDF5 2.0 crashes the process (segmentation fault) some time after a failed write (a full disk): it
    must never see one. So a failed write is recorded and reported as done, later writes are dropped, and
    the caller raises :attr:`error` once HDF5 has closed the file, then removes the garbage.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._fh = open(path, "w+b")  # closed in close()
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._fh.seek(pos, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def readinto(self, buffer: Any) -> int:
        return self._fh.readinto(buffer)

    def _guard(self, action: Callable[[], Any], done: Any) -> Any:
        if self.error is None:
            try:
                return action()
            except OSError as exc:
                self.error = exc
        return done

    def write(self, data: Any) -> int:
        return int(self._guard(lambda: self._fh.write(data), len(memoryview(data))))

    def truncate(self, size: int | None = None) -> int:
        return int(self._guard(lambda: self._fh.truncate(size), size or 0))

    def flush(self) -> None:
        self._guard(self._sync, None)

    def _sync(self) -> None:
        if self._fh.closed:
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()
        super().close()


def _atomic_h5(path: Path, fill: Callable[[h5py.File], None], in_memory: bool = True) -> None:
    """Write a new HDF5 file at ``path`` by ``fill`` through ``<path>.tmp`` and a rename.

    Readers and a crash at any moment see the old file or the new one, never a half-written one. A write
    error (full disk, quota, I/O error) removes the temporary file and raises it as an ``OSError``; HDF5
    never sees it (HDF5 2.0 crashes the process some time after a failed write). ``in_memory`` builds the
    file in memory and writes its bytes (parts and indexes: small); otherwise HDF5 writes through a
    :class:`_GuardedFile`.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        if in_memory:
            buffer = io.BytesIO()
            with h5py.File(buffer, "w") as f:
                fill(f)
            with open(tmp, "wb") as fh:
                fh.write(buffer.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())  # the data is on disk before the rename publishes it
        else:
            _fill_guarded(tmp, fill)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _fill_guarded(tmp: Path, fill: Callable[[h5py.File], None]) -> None:
    """Write ``tmp`` by ``fill`` through a :class:`_GuardedFile`; raise its first OS error after HDF5 is done."""
    sink = _GuardedFile(tmp)
    try:
        with h5py.File(sink, "w") as f:
            fill(f)
    finally:
        sink.close()  # flushes and fsyncs
    if sink.error is not None:
        raise sink.error


def _set_attrs(f: h5py.File, attrs: Mapping[str, Any]) -> None:
    for key, val in attrs.items():
        plain = isinstance(val, (str, int, float, bool, np.generic, np.ndarray))  # a resumed file's own: np.bool_
        f.attrs[key] = val if plain else json.dumps(val)


def _index_parts(f: h5py.File) -> list[_Part] | None:
    """The parts an unfinished file maps (from its virtual ``incident_energies``), or None for a plain file."""
    ds = f["incident_energies"]
    if not ds.is_virtual:
        return None
    parts = []
    for m in ds.virtual_sources():
        (a, _), (b, _) = m.vspace.get_select_bounds()
        parts.append(_Part(str(m.file_name), int(a), int(b) - int(a) + 1))
    return sorted(parts, key=lambda p: p.start)


def _level(part: _Part) -> int:
    """Merge level of a part, from its name ``rows-<start>-L<level>.h5`` (an adopted plain file: never merged)."""
    found = re.search(r"-L(\d+)\.h5$", part.file)
    return int(found.group(1)) if found else _NEVER_MERGED


def _cut_parts(parts: Sequence[_Part], n: int) -> list[_Part]:
    """The parts holding rows ``0:n`` (the last one shortened)."""
    return [_Part(p.file, p.start, min(p.n, n - p.start)) for p in parts if p.start < n]


class ShowerWriter:
    """Append showers to a new or resumed file, chunk by chunk, so that a crash at any moment loses at most
    the chunk in flight.

    Each :meth:`append` writes its chunk as a small file in ``<file>.parts/`` and then replaces ``<file>`` by
    a new index whose datasets are HDF5 virtual datasets over all parts; both through a temporary file and
    a rename. So ``<file>`` always opens with plain ``h5py.File(path, "r")`` and holds every committed chunk,
    marked ``complete=False``. Closing after ``n_written >= n_target`` rewrites it as one plain file (gzip as
    asked), marks it complete and removes the parts. An OS lock (:class:`WriteLock`) refuses a second writer.

    Use as a context manager; leaving the block normally after reaching the target completes the file, any
    other exit leaves it resumable with ``resume=True``.

    Args:
        path: output file.
        geometry: detector the showers belong to.
        particle: particle name (e-, gamma, p, Fe, ...).
        generator: what made the showers ("geant4 11.4 official data", a model + run id, ...).
        n_target: showers the file is meant to hold.
        conditions: names and widths of the per-shower conditions, e.g. {"position": 2}.
        attrs: more provenance (seed, physics, cut, ...), JSON-serialisable values.
        resume: reopen an existing incomplete file and append (its attributes are kept).
        truth: names and widths of per-shower truth values, e.g. {"xmax": 1}.
        compression: HDF5 filter of the ``showers`` dataset: ``"gzip"`` (default, level 4 with byte shuffle)
            or None (raw chunks: larger, but read without decompression).
        lock: a :class:`WriteLock` of ``path`` the caller already holds (and releases); default: take one.

    Raises:
        ShowerFileError: the file exists (without ``resume``), is being written by another process, does not
            match (with ``resume``), or cannot be written (read-only or full disk; the message names the cause).
    """

    def __init__(
        self,
        path: str | Path,
        geometry: Geometry,
        particle: str,
        generator: str,
        n_target: int,
        conditions: Mapping[str, int] | None = None,
        attrs: Mapping[str, Any] | None = None,
        resume: bool = False,
        truth: Mapping[str, int] | None = None,
        compression: str | None = "gzip",
        lock: WriteLock | None = None,
    ) -> None:
        if compression not in ("gzip", None):
            raise ShowerFileError(f"compression must be 'gzip' or None, got {compression!r}")
        self.compression = compression
        self.path = Path(path)
        self.geometry = geometry
        self.n_target = int(n_target)
        self.conditions = dict(conditions or {})
        self.truth = dict(truth or {})
        self._owns_lock = lock is None
        self._lock = (lock or WriteLock(self.path)).acquire()
        self._open, self._failed = True, False
        try:
            if resume:
                self._attrs, self._parts = self._reopen(particle)
            else:
                self._attrs, self._parts = self._start(particle, generator, attrs or {}), []
            self._commit_index()
        except OSError as exc:
            self._release()
            raise ShowerFileError(f"{self.path}: cannot write there ({_os_cause(exc)})") from None
        except BaseException:
            self._release()
            raise
        self.n_written = sum(p.n for p in self._parts)

    @property
    def attrs(self) -> dict[str, Any]:
        """The file's attributes (a resumed file's own: its seed, generator, ...)."""
        return dict(self._attrs)

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Add or replace provenance attributes (JSON-serialisable); written with the next chunk or the completed
        file, since every commit rewrites the index with all attributes."""
        self._attrs.update(attrs)

    # -- opening --------------------------------------------------------------
    def _start(self, particle: str, generator: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """The attributes of a new file (after removing the parts of an earlier writer of a deleted file)."""
        if self.path.exists():
            raise ShowerFileError(f"{self.path} exists; choose another path, or top it up with resume=True where "
                                  "the command offers it")
        shutil.rmtree(_parts_dir(self.path), ignore_errors=True)
        meta = {
            "geometry": self.geometry.to_json(),
            "particle": particle,
            "pdg": PDG.get(particle, 0),
            "generator": generator,
            "fastshower_version": __version__,
            "created": _now(),
            "n_target": self.n_target,
            "complete": False,
        }
        return {**meta, **attrs}

    def _reopen(self, particle: str) -> tuple[dict[str, Any], list[_Part]]:
        """Attributes and parts of the file to top up: its rows up to the first never-written one (an
        old writer's zeros), a plain file becoming the first part; stray parts of a killed writer removed."""
        if not self.path.exists():
            raise ShowerFileError(f"resume=True: {self.path} does not exist")
        _recover_legacy_writer(self.path)
        with ShowerFile(self.path, require_complete=False) as reader:
            self._check_resumable(reader, particle)
            n = reader.first_blank()
            attrs = dict(reader._f.attrs)
            parts = _index_parts(reader._f)
            flat = [k for k, d in reader.datasets().items() if d.ndim != 2]
        if flat:
            raise ShowerFileError(f"resume=True: {self.path} has 1-D datasets {flat}; it cannot be topped up")
        parts = _cut_parts(parts, n) if parts is not None else self._adopt(n)
        keep = {Path(p.file).name for p in parts}
        for stray in _parts_dir(self.path).glob("*"):
            if stray.name not in keep:
                stray.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.path.with_name(self.path.name + ".tmp").unlink()
        attrs.pop("finished", None)
        return {**attrs, "complete": False, "n_target": self.n_target, "resumed": _now()}, parts

    def _adopt(self, n: int) -> list[_Part]:
        """A plain file's first ``n`` rows as the first part: a hard link to it (a copy where links fail)."""
        if n == 0:
            return []
        base = _parts_dir(self.path) / "base.h5"
        base.parent.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            base.unlink()
        try:
            os.link(self.path, base)
        except OSError:
            shutil.copyfile(self.path, base)
        return [_Part(f"{base.parent.name}/{base.name}", 0, n)]

    def _check_resumable(self, reader: ShowerFile, particle: str) -> None:
        """Raise unless ``reader`` (the file to top up) holds this writer's geometry, particle and conditions."""
        if reader.geometry.to_dict() != self.geometry.to_dict():
            if diff := convention_difference(reader.geometry, self.geometry):
                raise ShowerFileError(
                    f"resume=True: {self.path} holds geometry {reader.geometry.name!r} on other file conventions "
                    f"(file first: {diff}); rewrite it with {_convert_hint(self.path)} and resume the new file"
                )
            raise ShowerFileError(
                f"resume=True: {self.path} holds geometry {reader.geometry.name!r}, not {self.geometry.name!r}"
            )
        if reader.particle != particle:
            raise ShowerFileError(f"resume=True: {self.path} holds {reader.particle} showers, not {particle}")
        if reader.condition_widths() != self.conditions or reader.truth_widths() != self.truth:
            raise ShowerFileError(
                f"resume=True: {self.path} has conditions {reader.condition_widths()} and truth "
                f"{reader.truth_widths()}, expected {self.conditions} and {self.truth}"
            )

    # -- layout ---------------------------------------------------------------
    def _columns(self) -> dict[str, tuple[int, str]]:
        """Every dataset: key -> (width, dtype); energies (N, 1) f8, showers (N, voxels) f4, the rest (N, k) f8."""
        cols = {"incident_energies": (1, "f8"), "showers": (self.geometry.n_voxels, "f4")}
        for group, widths in (("conditions", self.conditions), ("truth", self.truth)):
            cols.update({f"{group}/{k}": (int(w), "f8") for k, w in widths.items()})
        return cols

    def _storage(self, key: str, n: int) -> dict[str, Any]:
        """Chunking (about 2 MiB of showers, 1024 rows of the rest) and the filter of dataset ``key``."""
        width = self._columns()[key][0]
        rows = _chunk_rows(self.geometry.n_voxels) if key == "showers" else max(_chunk_rows(self.geometry.n_voxels),
                                                                                  1024)
        packed = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        return {"chunks": (max(1, min(rows, n)), width), **(packed if key == "showers" and self.compression else {})}

    def _arrays(self, batch: ShowerBatch) -> dict[str, np.ndarray]:
        """``batch`` as the file's datasets (key -> (n, width) array), checked against the declared layout."""
        n = len(batch)
        if set(batch.conditions) != set(self.conditions) or set(batch.truth) != set(self.truth):
            raise ShowerFileError(
                f"conditions/truth {sorted(batch.conditions)}/{sorted(batch.truth)} != declared "
                f"{sorted(self.conditions)}/{sorted(self.truth)}"
            )
        arrays: dict[str, np.ndarray] = {
            "incident_energies": np.asarray(batch.energies, dtype=np.float64).reshape(n, 1),
            "showers": np.asarray(batch.showers, dtype=np.float32),
        }
        for group, values in (("conditions", batch.conditions), ("truth", batch.truth)):
            arrays.update({f"{group}/{k}": np.asarray(v, dtype=np.float64).reshape(n, -1) for k, v in values.items()})
        for key, (width, _) in self._columns().items():
            if arrays[key].shape != (n, width):
                what = f"geometry {self.geometry.name!r}" if key == "showers" else "the declared width"
                raise ShowerFileError(f"{key} of shape {arrays[key].shape} do not fit {what} ({width} columns)")
        return arrays

    # -- writing --------------------------------------------------------------
    def _write_part(self, arrays: Mapping[str, np.ndarray], start: int) -> _Part:
        """Store one chunk as ``<file>.parts/rows-<start>-L0.h5`` (written whole, then renamed into place)."""
        n = int(arrays["showers"].shape[0])
        folder = _parts_dir(self.path)
        folder.mkdir(exist_ok=True)

        def fill(f: h5py.File) -> None:
            for key, data in arrays.items():
                f.create_dataset(key, data=data, **self._storage(key, n))

        name = f"rows-{start:012d}-L0.h5"
        _atomic_h5(folder / name, fill)
        return _Part(f"{folder.name}/{name}", start, n)

    def _commit_index(self) -> None:
        """Replace the file by an index of the parts (virtual datasets, fill NaN) with the attributes."""
        total = sum(p.n for p in self._parts)

        def fill(f: h5py.File) -> None:
            f.create_group("conditions")
            f.create_group("truth")
            for key, (width, dtype) in self._columns().items():
                if not self._parts:
                    f.create_dataset(key, (0, width), maxshape=(None, width), dtype=dtype)
                    continue
                layout = h5py.VirtualLayout((total, width), dtype)
                for p in self._parts:
                    layout[p.start:p.start + p.n] = h5py.VirtualSource(p.file, key, shape=(p.n, width))
                f.create_virtual_dataset(key, layout, fillvalue=np.nan)
            _set_attrs(f, self._attrs)

        _atomic_h5(self.path, fill)

    def append(self, batch: ShowerBatch) -> None:
        """Write one chunk and commit it to the file. Shapes: see :class:`ShowerBatch`.

        Raises :class:`ShowerFileError` for a batch that does not fit, and on a write error (full disk, quota,
        I/O error) naming the file and the cause; the file then holds every chunk before this one, and
        the writer takes no more.
        """
        arrays = self._arrays(batch)
        if not self._open or self._failed:
            raise ShowerFileError(f"{self.path}: the writer is closed" if not self._open else
                                  f"{self.path}: an earlier chunk failed to be written; resume the file instead")
        check_values(batch, str(self.path), self.n_written)
        a, n = self.n_written, len(batch)
        if n == 0:
            return
        try:
            self._parts.append(self._write_part(arrays, a))
            try:
                self._commit_index()
            except BaseException:
                self._parts.pop()
                raise
        except (OSError, RuntimeError) as exc:  # h5py raises either for a failed write or close
            self._failed = True
            raise ShowerFileError(f"{self.path}: cannot write showers {a}-{a + n - 1} ({_os_cause(exc)}); the "
                                  f"file keeps the {a} before them: make room and continue with resume=True") from None
        self.n_written = a + n
        try:
            self._compact()
        except (OSError, RuntimeError) as exc:
            self._failed = True
            raise ShowerFileError(f"{self.path}: cannot merge its parts ({_os_cause(exc)}); the file keeps all "
                                  f"{self.n_written} showers written: make room, continue with resume=True") from None

    def _compact(self) -> None:
        """Merge the last ``_FANOUT`` parts into one part of the next level while they are all of one level.

        An index rewrite costs time in proportion to the parts; merging keeps them to about 16 per level
        (under 80 for 10^6 chunks) and copies each shower once per level. The merged part is written and
        committed before the old ones are removed, so a crash at any moment loses nothing.
        """
        while len(self._parts) >= _FANOUT:
            tail = self._parts[-_FANOUT:]
            level = _level(tail[0])
            if level == _NEVER_MERGED or any(_level(p) != level for p in tail):
                return
            self._parts[-_FANOUT:] = [self._merge_parts(tail, level + 1)]
            try:
                self._commit_index()
            except BaseException:
                self._parts[-1:] = tail
                raise
            for p in tail:
                (self.path.parent / p.file).unlink(missing_ok=True)

    def _merge_parts(self, parts: Sequence[_Part], level: int) -> _Part:
        """Copy consecutive ``parts`` into one part file of ``level``, about 64 MiB at a time."""
        folder = _parts_dir(self.path)
        name = f"rows-{parts[0].start:012d}-L{level}.h5"
        n = sum(p.n for p in parts)
        block = max(1, (64 << 20) // (4 * max(self.geometry.n_voxels, 1)))

        def fill(f: h5py.File) -> None:
            out = {key: f.create_dataset(key, (n, width), dtype=dtype, **self._storage(key, n))
                   for key, (width, dtype) in self._columns().items()}
            for p in parts:
                with h5py.File(self.path.parent / p.file, "r") as src:
                    for key, ds in out.items():
                        for a in range(0, p.n, block):
                            b = min(a + block, p.n)
                            ds[p.start - parts[0].start + a:p.start - parts[0].start + b] = src[key][a:b]

        _atomic_h5(folder / name, fill, in_memory=n * self.geometry.n_voxels < (16 << 20))
        return _Part(f"{folder.name}/{name}", parts[0].start, n)

    def _consolidate(self) -> None:
        """Rewrite the file as plain datasets holding every part, marked complete, then remove the parts."""
        n = self.n_written
        block = max(1, (64 << 20) // (4 * max(self.geometry.n_voxels, 1)))

        def fill(f: h5py.File) -> None:
            with h5py.File(self.path, "r") as src:
                for key, (width, dtype) in self._columns().items():
                    ds = f.create_dataset(key, (n, width), maxshape=(None, width), dtype=dtype,
                                          **self._storage(key, max(n, 1024)))
                    for a in range(0, n, block):
                        ds[a:a + block] = src[key][a:a + block]
            _set_attrs(f, {**self._attrs, "complete": True, "finished": _now()})

        try:
            self._check_room()
            _atomic_h5(self.path, fill, in_memory=False)
        except (OSError, RuntimeError) as exc:
            raise ShowerFileError(f"{self.path}: cannot finish the file ({_os_cause(exc)}); it holds all {n} "
                                  "showers but stays incomplete: make room and finish it with resume=True") from None
        shutil.rmtree(_parts_dir(self.path), ignore_errors=True)

    def _check_room(self) -> None:
        """Raise ``OSError(ENOSPC)`` unless the disk has room for the plain file (estimated as the parts' size
        plus 10 %) before rewriting; the rewrite still handles a full disk (quota, another writer) itself."""
        need = 1.1 * sum((self.path.parent / p.file).stat().st_size for p in self._parts)
        if shutil.disk_usage(self.path.parent).free < need:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (about {need / 2**20:.0f} MiB needed)")

    def close(self, complete: bool | None = None) -> None:
        """Release the file; make it one plain file marked complete when ``complete`` (default: the target was
        reached and no write failed), otherwise it stays an incomplete index of its parts."""
        if not self._open:
            return
        self._open = False
        try:
            done = self.n_written >= self.n_target if complete is None else complete
            if done and not self._failed:
                self._consolidate()
        finally:
            self._release()

    def _release(self) -> None:
        if self._owns_lock:
            self._lock.release()

    def __enter__(self) -> ShowerWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(complete=None if exc_type is None else False)


def write_showers(
    path: str | Path,
    geometry: Geometry,
    batch: ShowerBatch,
    particle: str,
    generator: str,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a whole in-memory sample to a new complete file."""
    def widths(d: Mapping[str, np.ndarray]) -> dict[str, int]:
        return {k: int(np.asarray(v).reshape(len(batch), -1).shape[1]) for k, v in d.items()}

    with ShowerWriter(path, geometry, particle, generator, len(batch), widths(batch.conditions), attrs,
                      truth=widths(batch.truth)) as w:
        w.append(batch)
    return Path(path)


def _open_read(path: Path) -> h5py.File:
    """Open for reading: plainly, or as an SWMR reader (a file an SWMR writer of earlier versions left open)."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if _WRITER_FLAG not in str(exc) and _LOCKED not in str(exc):
            raise ShowerFileError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {exc}") from None
    try:
        return h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as exc:
        raise ShowerFileError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {exc}") from None


#: HDF5's message for a file whose (SWMR) writer is still open or was killed before closing it
_WRITER_FLAG = "already open for write"
#: HDF5 (file locking) for a file another program is writing now
_LOCKED = "unable to lock file"


def _recover_legacy_writer(path: Path) -> None:
    """Make a file whose SWMR writer (earlier versions) was killed openable again; leave other files alone.

    HDF5 refuses to open such a file plainly (its consistency flags are still set; ``h5clear`` would reset
    them, h5py cannot), but an SWMR reader sees every flushed chunk: copy those into a fresh file and swap
    it in atomically.
    """
    try:
        h5py.File(path, "r").close()
        return
    except OSError as exc:
        if _WRITER_FLAG not in str(exc):
            return  # not this case: ShowerFile reports what is wrong
    tmp = path.with_name(path.name + ".recover")
    with h5py.File(path, "r", libver="latest", swmr=True) as src, h5py.File(tmp, "w") as dst:
        for key, val in src.attrs.items():
            dst.attrs[key] = val
        for key in src:
            src.copy(src[key], dst, name=key)
    os.replace(tmp, path)


def _infer_geometry(n_voxels: int, path: Path) -> Geometry:
    matches = [g for g in list_geometries() if g.n_voxels == n_voxels]
    if len(matches) == 1:
        return matches[0]
    raise ShowerFileError(
        f"{path}: no 'geometry' attribute and {n_voxels} voxels match "
        f"{'no' if not matches else 'several'} built-in geometries; "
        "pass geometry= (or binning_xml=, a CaloChallenge binning XML)"
    )


def _tables_summary(worker_tables: Any) -> str:
    """One line of a file's ``worker_tables`` (JSON: per worker, the tables it read or built): how many workers
    used each table version, read from the cache / built, and its content hash."""
    try:
        entries = json.loads(worker_tables) if isinstance(worker_tables, (str, bytes)) else list(worker_tables)
        uses: dict[str, set[str]] = {}
        for entry in entries:
            for t in entry.get("tables", []):
                what = f"{t.get('version', '?')} {t.get('source', '?')}" + (f" sha256 {t['sha256']}" if t.get(
                    "sha256") else "")
                uses.setdefault(what, set()).add(str(entry.get("worker")))
    except (ValueError, TypeError, AttributeError):
        return "unreadable worker_tables attribute"
    workers = {str(e.get("worker")) for e in entries}
    parts = [f"{what} ({len(w)} worker{'s' if len(w) > 1 else ''})" for what, w in sorted(uses.items())]
    return f"{len(workers)} worker(s): " + ("; ".join(parts) or "none reported") + " (attribute worker_tables)"


class ShowerFile:
    """Validated, streaming read access to a shower file.

    Opening checks the keys, shapes and the geometry (against ``geometry`` when
    given); voxel values are checked chunk by chunk as they are read.

    Args:
        path: the file.
        geometry: expected geometry; required for foreign files without a ``geometry`` attribute
            unless the voxel count matches exactly one built-in.
        require_complete: refuse a file whose writer was interrupted.
    """

    def __init__(self, path: str | Path, geometry: Geometry | None = None, require_complete: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ShowerFileError(f"{self.path}: no such file")
        if self.path.is_dir():  # HDF5 would call it a failed read, which reads as a truncated file
            raise ShowerFileError(f"{self.path}: is a directory, not a shower file")
        self._f = _open_read(self.path)
        try:
            self._validate_layout(geometry, require_complete)
        except Exception:
            self._f.close()
            raise

    def _validate_layout(self, geometry: Geometry | None, require_complete: bool) -> None:
        f = self._f
        for key in ("incident_energies", "showers"):
            if key not in f:
                raise ShowerFileError(
                    f"{self.path}: missing dataset {key!r} (keys: {sorted(f.keys())}); not a CaloChallenge-format "
                    "shower file (CaloGAN or 3DGAN files: use `fastshower convert`)"
                )
        s, e = f["showers"], f["incident_energies"]
        if s.ndim != 2 or e.ndim not in (1, 2):
            raise ShowerFileError(f"{self.path}: 'showers' must be 2-D (N, voxels), got shape {s.shape}")
        stored = self.attrs.get("geometry")
        if stored is not None:
            try:
                file_geo = geometry_from_json(stored)
            except GeometryError as exc:
                raise ShowerFileError(f"{self.path}: {exc}") from exc
            if geometry is not None and file_geo.to_dict() != geometry.to_dict():
                if diff := convention_difference(file_geo, geometry):
                    raise ShowerFileError(f"{self.path}: holds geometry {file_geo.name!r} on other file conventions "
                                          f"than expected ({diff}); rewrite it with {_convert_hint(self.path)}")
                raise ShowerFileError(
                    f"{self.path}: holds geometry {file_geo.name!r}, expected {geometry.name!r}"
                )
            self.geometry = file_geo
        else:
            self.geometry = geometry or _infer_geometry(int(s.shape[1]), self.path)
        if s.shape[1] != self.geometry.n_voxels:
            raise ShowerFileError(
                f"{self.path}: showers have {s.shape[1]} voxels but geometry {self.geometry.name!r} has "
                f"{self.geometry.n_voxels}"
            )
        lengths = [s.shape[0], e.shape[0]] + [d.shape[0] for d in (*self._conditions().values(),
                                                                   *self._group("truth").values())]
        self.n = int(min(lengths))
        self._check_parts()
        self.complete = bool(self.attrs.get("complete", True))  # foreign files carry no flag: take them as whole
        if require_complete and not self.complete:
            raise ShowerFileError(
                f"{self.path}: incomplete ({self.n} of {self.attrs.get('n_target', '?')} showers; the writer was "
                "interrupted); finish it with resume=True in the simulate or generate that wrote it (Python: "
                "ShowerFile(path, require_complete=False) reads what it holds)"
            )
        if self.n == 0 and require_complete:
            raise ShowerFileError(f"{self.path}: holds no showers")

    def _check_parts(self) -> None:
        """Raise when an unfinished file's parts (see :class:`ShowerWriter`) are not all beside it."""
        parts = _index_parts(self._f)
        if not parts:
            return
        missing = [p.file for p in parts if not (self.path.parent / p.file).is_file()]
        if missing:
            raise ShowerFileError(
                f"{self.path}: damaged: {len(missing)} of the {len(parts)} parts this unfinished file is made of "
                f"are missing (first: {missing[0]}); copy or move {_parts_dir(self.path).name}/ with the file"
            )

    def first_blank(self) -> int:
        """Rows before the first one with a zero or non-finite incident energy: a row never written (a full
        disk under an old writer left zeros); ``n`` when there is none."""
        e = self.energies()
        blank = ~np.isfinite(e) | (e == 0)
        return int(np.argmax(blank)) if blank.any() else self.n

    def datasets(self) -> dict[str, h5py.Dataset]:
        """Every per-shower dataset: key ("showers", "conditions/position", ...) -> dataset."""
        out = {k: self._f[k] for k in ("incident_energies", "showers")}
        for group in ("conditions", "truth"):
            out.update({f"{group}/{k}": d for k, d in self._group(group).items()})
        return out

    # -- metadata ----------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self._f.attrs.items()}

    @property
    def particle(self) -> str:
        return str(self.attrs.get("particle", "unknown"))

    @property
    def generator(self) -> str:
        return str(self.attrs.get("generator", "unknown"))

    def _group(self, name: str) -> dict[str, h5py.Dataset]:
        grp = self._f.get(name)
        return {k: grp[k] for k in grp} if isinstance(grp, h5py.Group) else {}

    def _conditions(self) -> dict[str, h5py.Dataset]:
        return self._group("conditions")

    @property
    def truth_names(self) -> list[str]:
        return sorted(self._group("truth"))

    @property
    def condition_names(self) -> list[str]:
        return sorted(self._conditions())

    def condition_widths(self) -> dict[str, int]:
        return {k: int(d.shape[1]) if d.ndim == 2 else 1 for k, d in self._conditions().items()}

    def truth_widths(self) -> dict[str, int]:
        return {k: int(d.shape[1]) if d.ndim == 2 else 1 for k, d in self._group("truth").items()}

    def energies(self) -> np.ndarray:
        """All incident energies, shape (N,), MeV (small: always read whole)."""
        return np.asarray(self._f["incident_energies"][: self.n], dtype=np.float64).reshape(-1)

    def condition(self, name: str) -> np.ndarray:
        """All values of ``conditions/<name>``, shape (N, width), float64 (small: read whole)."""
        conds = self._conditions()
        if name not in conds:
            raise ShowerFileError(f"{self.path}: no conditions/{name} (has: {', '.join(sorted(conds)) or 'none'})")
        return np.asarray(conds[name][: self.n], dtype=np.float64).reshape(self.n, -1)

    # -- data ----------------------------------------------------------------------
    def read(self, start: int = 0, stop: int | None = None, check: bool = True) -> ShowerBatch:
        """Showers ``start:stop`` as a :class:`ShowerBatch` (float32 showers, float64 energies)."""
        stop = self.n if stop is None else min(stop, self.n)
        start = max(0, min(start, stop))
        batch = ShowerBatch(
            energies=np.asarray(self._f["incident_energies"][start:stop], dtype=np.float64).reshape(-1),
            showers=np.asarray(self._f["showers"][start:stop], dtype=np.float32),
            conditions={
                k: np.asarray(d[start:stop], dtype=np.float64).reshape(stop - start, -1)
                for k, d in self._conditions().items()
            },
            truth={
                k: np.asarray(d[start:stop], dtype=np.float64).reshape(stop - start, -1)
                for k, d in self._group("truth").items()
            },
        )
        if check:
            check_values(batch, str(self.path), start)
        return batch

    def iter_chunks(self, chunk_size: int = 4096, start: int = 0, stop: int | None = None,
                    check: bool = True) -> Iterator[ShowerBatch]:
        """Stream ``start:stop`` in blocks of ``chunk_size`` showers; memory stays bounded."""
        stop = self.n if stop is None else min(stop, self.n)
        for a in range(start, stop, chunk_size):
            yield self.read(a, min(a + chunk_size, stop), check=check)

    def check(self, chunk_size: int = 4096) -> None:
        """Stream the whole file and raise on the first NaN or negative energy."""
        for _ in self.iter_chunks(chunk_size):
            pass

    def describe(self) -> str:
        """Human summary for ``fastshower info``."""
        a = self.attrs
        e = self.energies()
        lines = [
            f"file:       {self.path}",
            f"geometry:   {self.geometry.name} ({self.geometry.n_voxels} voxels)",
            f"particle:   {self.particle} (PDG {a.get('pdg', '?')})",
            f"showers:    {self.n}" + ("" if self.complete else f" of {a.get('n_target', '?')} (INCOMPLETE)"),
        ]
        blank = int((~np.isfinite(e) | (e == 0)).sum())
        if blank:
            lines.append(f"DAMAGED:    {blank} of the {self.n} showers were never written (zero incident energy, from "
                         f"row {self.first_blank()}); resume=True cuts the file back to that row and redoes the rest")
        if self.n:
            lines.append(
                f"energies:   {e.min() / 1e3:.4g} - {e.max() / 1e3:.4g} GeV (mean {e.mean() / 1e3:.4g} GeV, "
                f"{len(np.unique(e))} distinct)"
            )
        if self.condition_names:
            lines.append(f"conditions: {', '.join(f'{k} ({w})' for k, w in self.condition_widths().items())}")
        for key in ("generator", "physics", "seed", "cut_mm", "fastshower_version", "created", "finished"):
            if key in a:
                lines.append(f"{key + ':':11s} {a[key]}")
        if "worker_tables" in a:
            lines.append(f"tables:     {_tables_summary(a['worker_tables'])}")
        return "\n".join(lines)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> ShowerFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- converters ------------------------------------------------------------------


def _open_foreign(path: Path, keys: tuple[str, ...]) -> h5py.File:
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ShowerFileError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {exc}") from None
    missing = [k for k in keys if k not in f]
    if missing:
        f.close()
        raise ShowerFileError(f"{path}: missing {missing} (keys: {sorted(f.keys())})")
    return f


def convert_calogan(src: str | Path, dst: str | Path, particle: str = "e+", chunk: int = 10000) -> Path:
    """CaloGAN layout (``energy`` GeV, ``layer_0`` (N,3,96), ``layer_1`` (N,12,12), ``layer_2`` (N,12,6) MeV)
    -> calogan-3layer file. Layer images are flattened row-major (eta rows, phi columns)."""
    from fastshower.geometry import get_geometry

    src = Path(src)
    geo = get_geometry("calogan-3layer")
    f = _open_foreign(src, ("energy", "layer_0", "layer_1", "layer_2"))
    with f:
        n = int(f["energy"].shape[0])
        shapes = [tuple(f[f"layer_{i}"].shape[1:]) for i in range(3)]
        expected = [geo.layer_shape(i) for i in range(3)]
        if shapes != expected:
            raise ShowerFileError(f"{src}: CaloGAN layer shapes {shapes} != {expected}")
        with ShowerWriter(dst, geo, particle, f"converted from CaloGAN file {src.name}", n) as w:
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                showers = np.concatenate([np.asarray(f[f"layer_{i}"][a:b]).reshape(b - a, -1) for i in range(3)], 1)
                w.append(ShowerBatch(np.asarray(f["energy"][a:b]).reshape(-1) * 1e3, showers))
    return Path(dst)


def convert_3dgan(src: str | Path, dst: str | Path, particle: str = "e-", unit_mev: float = 1e3,
                  chunk: int = 2000) -> Path:
    """3DGAN layout (``ECAL`` (N,51,51,25) as (x, y, layer), ``energy`` GeV) -> siw-51x51x25 file.

    ``unit_mev`` is the unit of the ECAL cells in MeV (1e3: GeV, as in the 3DGAN files).
    """
    from fastshower.geometry import get_geometry

    src = Path(src)
    geo = get_geometry("siw-51x51x25")
    f = _open_foreign(src, ("ECAL", "energy"))
    with f:
        n = int(f["ECAL"].shape[0])
        if tuple(f["ECAL"].shape[1:]) != (51, 51, 25):
            raise ShowerFileError(f"{src}: ECAL shape {f['ECAL'].shape[1:]} != (51, 51, 25)")
        with ShowerWriter(dst, geo, particle, f"converted from 3DGAN file {src.name}", n) as w:
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                ecal = np.asarray(f["ECAL"][a:b], dtype=np.float32) * unit_mev
                # (n, x, y, z) -> (n, z, y, x): layers slowest, columns (x) fastest
                showers = np.ascontiguousarray(ecal.transpose(0, 3, 2, 1)).reshape(b - a, -1)
                w.append(ShowerBatch(np.asarray(f["energy"][a:b]).reshape(-1) * 1e3, np.clip(showers, 0, None)))
    return Path(dst)


# --- file conventions ----------------------------------------------------------------

#: ``fastshower convert --layout`` of files written by fastshower 0.1, whose par04 geometries bin alpha from
#: 0 deg and store deposited MeV without threshold (see :func:`convert_conventions`)
LEGACY_LAYOUT = "fastshower-0.1"

#: attributes a :class:`ShowerWriter` sets itself; a converted file gets its own
_WRITER_ATTRS = frozenset({"geometry", "particle", "pdg", "generator", "fastshower_version", "created",
                           "n_target", "complete", "finished", "resumed"})


def _convert_hint(path: str | Path) -> str:
    return f"`fastshower convert --layout {LEGACY_LAYOUT} {path} --out NEW.h5`"


def _builtin_twin(geometry: Geometry) -> Geometry | None:
    """The built-in geometry of the same name, or None."""
    return next((g for g in list_geometries() if g.name == geometry.name), None)


def convention_clash(a: ShowerFile, b: ShowerFile) -> str | None:
    """One line when ``a`` and ``b`` hold one detector on different file conventions, else None.

    It names what differs (``a``'s value first, see :func:`fastshower.geometry.convention_difference`)
    and the command that rewrites the file that is not on the built-in geometry's conventions.
    """
    diff = convention_difference(a.geometry, b.geometry)
    if not diff:
        return None
    twin = _builtin_twin(a.geometry)
    old = b if twin is not None and twin.to_dict() == a.geometry.to_dict() else a
    return (f"{a.path} and {b.path} hold geometry {a.geometry.name!r} on different file conventions ({diff}); "
            f"rewrite {old.path} with {_convert_hint(old.path)}")


def _convention_target(f: ShowerFile) -> tuple[Geometry, str]:
    """The built-in geometry ``f``'s showers are to be moved onto, and what differs (file's value first)."""
    twin = _builtin_twin(f.geometry)
    if twin is None:
        raise ShowerFileError(f"{f.path}: geometry {f.geometry.name!r} is not a built-in one; "
                              "only files of built-in detectors can be moved onto their current conventions")
    diff = convention_difference(f.geometry, twin)
    if diff is None:
        raise ShowerFileError(f"{f.path}: geometry {f.geometry.name!r} differs from the built-in one in its "
                              "detector or binning, not only in file conventions; it cannot be converted")
    if not diff:
        raise ShowerFileError(f"{f.path}: already on the current file conventions of {twin.name!r}; "
                              "nothing to convert")
    return twin, diff


def convert_conventions(src: str | Path, dst: str | Path, chunk: int | None = None) -> Path:
    """Rewrite a file of a built-in detector on that detector's current file conventions (``--layout fastshower-0.1``).

    Files of fastshower 0.1 on par04-ds2/ds3 bin alpha from 0 deg and hold deposited MeV without a
    threshold. In every polar layer the angular bins are rolled by (old start - new start) / bin width
    (8 of 16 bins for par04-ds2: bin k becomes bin (k + 8) mod 16, the same angles), so each cell keeps
    its position (x, y) in mm; values are multiplied by new ``energy_scale`` / old (1/0.033 = 30.30 for
    par04), then voxels below the new threshold (15.15 keV) become 0. Incident energies, conditions,
    truth and attributes are kept; ``converted_from`` records the source (path, geometry JSON, version,
    times) and ``conversion`` what was done. Written ``chunk`` showers at a time (default: ~64 MiB)
    through :class:`ShowerWriter`, so a killed conversion leaves a file marked incomplete.

    Raises :class:`ShowerFileError` when ``src`` is not a complete file of a built-in detector on other
    conventions, or the angular bins cannot be moved by whole bins.
    """
    src = Path(src)
    with ShowerFile(src) as f:
        new, diff = _convention_target(f)
        old = f.geometry
        try:
            perm = alpha_permutation(old, new)
        except GeometryError as exc:
            raise ShowerFileError(f"{src}: {exc}") from None
        rows = chunk or max(1, (64 << 20) // (4 * old.n_voxels))
        factor = new.energy_scale / old.energy_scale
        a = f.attrs
        attrs = {k: (v.item() if isinstance(v, np.generic) else v.tolist() if isinstance(v, np.ndarray) else v)
                 for k, v in a.items() if k not in _WRITER_ATTRS}
        attrs["converted_from"] = {"path": str(src.resolve()), "layout": LEGACY_LAYOUT, "geometry": a["geometry"],
                                   **{k: str(a[k]) for k in ("fastshower_version", "created", "finished") if k in a}}
        attrs["conversion"] = (f"file conventions of {new.name!r} ({diff}): angular bins rolled onto the new start, "
                               f"values x {factor:.6g}, then zero below {new.voxel_threshold_mev * 1e3:g} keV")
        with ShowerWriter(dst, new, f.particle, f.generator, f.n, f.condition_widths(), attrs,
                          truth=f.truth_widths()) as w:
            for batch in f.iter_chunks(rows):
                deposited = batch.showers[:, perm] / np.float32(old.energy_scale)
                w.append(ShowerBatch(batch.energies, new.to_readout_scale(deposited), batch.conditions, batch.truth))
    return Path(dst)


# --- merging -----------------------------------------------------------------------

_MASS_NUMBER = {"p": 1, "n": 1, "He": 4, "C": 12, "N": 14, "O": 16, "Si": 28, "Fe": 56}


def primary_ln_a(particle: str) -> float:
    """ln(A) of a cosmic-ray primary (p -> 0, He -> 1.386, N -> 2.639, Fe -> 4.025).

    ``particle`` is a name of :data:`PDG` / the air-shower generator, or a nucleus PDG code
    ``100ZZZAAAI`` written as a string. Raises :class:`ShowerFileError` for anything else.
    """
    if particle in _MASS_NUMBER:
        return float(np.log(_MASS_NUMBER[particle]))
    code = PDG.get(particle)
    if code is None and particle.lstrip("-").isdigit():
        code = int(particle)
    if code is not None and abs(code) > 1_000_000_000:
        return float(np.log((abs(code) // 10) % 1000))
    raise ShowerFileError(f"no mass number known for primary {particle!r}; pass condition_values explicitly")


def merge_files(
    inputs: Sequence[str | Path], out: str | Path, *, add_condition: str | None = "primary",
    condition_values: Mapping[str, float] | None = None, particle: str | None = None, chunk_rows: int = 4096,
    interleave: bool = True, compression: str | None = "gzip",
    map_batch: Callable[[ShowerBatch], ShowerBatch] | None = None, attrs: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> Path:
    """Merge complete shower files of one geometry into a new file, streaming (memory ~ one block).

    Every input must have the same geometry, the same conditions (names and widths) and the same
    truth names. With ``add_condition`` the output gains ``conditions/<add_condition>`` (width 1),
    constant per input: ``condition_values[path]`` or ``condition_values[particle]`` when given,
    otherwise, for ``add_condition == "primary"``, ln(A) of the input's particle
    (:func:`primary_ln_a`: p 0, He 1.386, N 2.639, Fe 4.025); ln(A) is the variable in which the
    shower maximum is linear (superposition model), so a model conditioned on it can be asked for
    intermediate masses.

    Provenance: the output's ``merged_from`` attribute is a JSON list with, per input, its path,
    particle, PDG code, number of showers, generator, physics, seed, creation/finish times and its
    condition value; ``merge_condition`` names the added condition and ``merge_condition_values``
    maps each particle to its value.

    Args:
        inputs: two or more (or one) shower files, see :class:`ShowerFile`.
        out: new output file (must not exist).
        add_condition: name of the per-input condition to add, or None to add nothing.
        condition_values: value per input path (as given) or per particle name.
        particle: the output's ``particle`` attribute (default: the inputs' particles joined by "+").
        chunk_rows: showers per written block.
        interleave: write blocks from all inputs in turn, each block's size proportional to its
            input's size, so that any stretch of the output holds every input in proportion (training
            shuffles within groups of chunks, so a concatenation would give batches of a single
            primary on large files); False concatenates the inputs in order.
        compression: "gzip" or None (see :class:`ShowerWriter`).
        map_batch: optional function applied to every block before it is written (after the added
            condition is set), e.g. a preprocessing that must see the conditions; it must keep the
            number of rows, the voxel count and the condition/truth names.
        attrs: more provenance for the output (JSON-serialisable values), e.g. what ``map_batch`` did.
        resume: finish an interrupted merge into ``out`` (same inputs and options): the blocks it holds are
            skipped, so the result equals an uninterrupted merge.

    Returns:
        The output path.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ShowerFileError("merge_files: no input files")
    files: list[ShowerFile] = []
    try:
        for p in paths:
            files.append(ShowerFile(p))
        widths = _check_mergeable(files)
        values = _merge_values(paths, files, add_condition, condition_values, widths)
        out_attrs = _merge_provenance(files, add_condition, values, condition_values, interleave, attrs)
        with _merged_writer(out, files, particle, add_condition, out_attrs, compression, resume) as w:
            _write_merged(w, files, add_condition, values, chunk_rows, interleave, map_batch)
    finally:
        for f in files:
            f.close()
    return Path(out)


def _check_mergeable(files: Sequence[ShowerFile]) -> dict[str, int]:
    """Condition widths of the inputs, which must all share the first one's geometry, conditions and truth.

    Raises :class:`ShowerFileError` naming the first input that differs.
    """
    first = files[0]
    geo, widths, truth = first.geometry, first.condition_widths(), first.truth_names
    for f in files[1:]:
        if clash := convention_clash(first, f):
            raise ShowerFileError(f"merge_files: {clash}")
        if f.geometry.to_dict() != geo.to_dict():
            raise ShowerFileError(f"merge_files: {f.path} holds geometry {f.geometry.name!r}, "
                                  f"{first.path} holds {geo.name!r}")
        if f.condition_widths() != widths or f.truth_names != truth:
            raise ShowerFileError(
                f"merge_files: {f.path} has conditions {f.condition_widths()} / truth {f.truth_names}, "
                f"{first.path} has {widths} / {truth}"
            )
    return widths


def _merge_values(paths: Sequence[Path], files: Sequence[ShowerFile], add_condition: str | None,
                  condition_values: Mapping[str, float] | None, widths: Mapping[str, int]) -> list[float]:
    """Value of the added condition per input, in input order (empty without ``add_condition``).

    Looked up by path as given, then by particle, else ln(A) for ``"primary"`` (see :func:`merge_files`).
    """
    if add_condition is not None and add_condition in widths:
        raise ShowerFileError(f"merge_files: the inputs already have a condition {add_condition!r}")
    values: list[float] = []
    if add_condition is None:
        return values
    given = dict(condition_values or {})
    for p, f in zip(paths, files, strict=True):
        if str(p) in given:
            values.append(float(given[str(p)]))
        elif f.particle in given:
            values.append(float(given[f.particle]))
        elif add_condition == "primary":
            values.append(primary_ln_a(f.particle))
        else:
            raise ShowerFileError(f"merge_files: no value of condition {add_condition!r} for {p} "
                                  f"(particle {f.particle}); pass condition_values")
    return values


def _merge_provenance(files: Sequence[ShowerFile], add_condition: str | None, values: Sequence[float],
                      condition_values: Mapping[str, float] | None, interleave: bool,
                      attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The merged file's attributes: ``merged_from`` (one entry per input), ``merge_condition``, ... and ``attrs``."""
    keep = ("generator", "physics", "seed", "created", "finished", "fastshower_version")
    provenance = []
    for i, f in enumerate(files):
        a = f.attrs
        entry: dict[str, Any] = {"path": str(f.path.resolve()), "particle": f.particle, "n_showers": f.n,
                                 **{k: (a[k].item() if isinstance(a[k], np.generic) else a[k])
                                    for k in keep if k in a}}
        entry["pdg"] = int(a.get("pdg", PDG.get(f.particle, 0)))
        if add_condition is not None:
            entry[add_condition] = values[i]
        provenance.append(entry)
    out_attrs: dict[str, Any] = {"merged_from": provenance, "merge_condition": add_condition or "",
                                 "merge_interleaved": bool(interleave), **dict(attrs or {})}
    if add_condition is not None:
        out_attrs["merge_condition_values"] = {f.particle: v for f, v in zip(files, values, strict=True)}
        if add_condition == "primary" and condition_values is None:
            out_attrs["merge_condition_encoding"] = "ln(A) of the primary's mass number"
    return out_attrs


def _merged_writer(out: str | Path, files: Sequence[ShowerFile], particle: str | None, add_condition: str | None,
                   out_attrs: Mapping[str, Any], compression: str | None, resume: bool) -> ShowerWriter:
    """A new file for all inputs' showers: their conditions (plus the added one, width 1) and truth; with
    ``resume``, the interrupted merge of the same inputs into ``out``."""
    if Path(out).exists() and not resume:
        raise ShowerFileError(f"{out} exists; use resume=True to finish an interrupted merge, or choose another out")
    first = files[0]
    out_particle = particle or "+".join(dict.fromkeys(f.particle for f in files))
    truth_widths = {k: int(d.shape[1]) if d.ndim == 2 else 1 for k, d in first._group("truth").items()}
    cond_widths = dict(first.condition_widths())
    if add_condition is not None:
        cond_widths[add_condition] = 1
    total = int(sum(f.n for f in files))
    generator = f"merge of {len(files)} files ({', '.join(f'{f.particle}: {f.n}' for f in files)})"
    w = ShowerWriter(out, first.geometry, out_particle, generator, total, cond_widths, out_attrs,
                     truth=truth_widths, compression=compression, resume=resume)
    if resume and w.attrs.get("merged_from") != json.dumps(out_attrs["merged_from"]):
        w.close(complete=False)
        raise ShowerFileError(f"resume=True: {out} is a merge of other inputs; choose another out")
    return w


def _write_merged(w: ShowerWriter, files: Sequence[ShowerFile], add_condition: str | None, values: Sequence[float],
                  chunk_rows: int, interleave: bool, map_batch: Callable[[ShowerBatch], ShowerBatch] | None) -> None:
    """Copy the inputs into ``w`` in blocks of at most ``chunk_rows`` showers.

    With ``interleave`` the inputs take turns, each block's size in proportion to its input's size; without,
    each input is copied whole, in order. The added condition (width 1) is set before ``map_batch``. The
    first blocks, as many as ``w`` already holds (a resumed merge), are skipped unread.
    """
    sizes = [f.n for f in files]
    total = int(sum(sizes))
    pos = [0] * len(files)
    skip = w.n_written
    while any(pos[i] < sizes[i] for i in range(len(files))):
        for i, f in enumerate(files):
            if pos[i] >= sizes[i]:
                continue
            take = max(1, round(chunk_rows * sizes[i] / total)) if interleave else chunk_rows
            stop = min(pos[i] + take, sizes[i])
            if skip > 0:  # this block is in the file already
                skip -= stop - pos[i]
            else:
                batch = f.read(pos[i], stop)
                if add_condition is not None:
                    batch.conditions[add_condition] = np.full((len(batch), 1), values[i])
                w.append(map_batch(batch) if map_batch is not None else batch)
            pos[i] = stop
            if not interleave:
                break
