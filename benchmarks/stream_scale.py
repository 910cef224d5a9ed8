"""Stream a profile file larger than half the machine's memory through the training data pipeline.

The KIT air-shower GAN study trained on 1.6 million CONEX profiles (60 GB) read by memory mapping.
This benchmark checks that fastshower's pipeline (fastshower.data: fit_shower_transform,
ShowerDataset, BatchStream, then model.training_step) reads such a file with bounded memory:

1. write a synthetic ``airshower-profile`` file (Gaisser-Hillas profiles with fluctuations,
   :func:`fastshower.airshower.write_synthetic_profiles`, rows drawn from a bank of 65536
   distinct profiles, raw/uncompressed chunks like a memory-mapped library) of at least
   ``--gb`` GB on disk (default 13.5, more than half of a 24 GiB machine);
2. drop the file's pages from the page cache (``posix_fadvise(DONTNEED)``) so reads come from disk;
3. fit the run's preprocessing on it by streaming (``fit_shower_transform``: two passes);
4. stream one full epoch of shuffled, transformed batches (``BatchStream``, batch 1024);
5. run a few WGAN-GP training steps on streamed batches (the generic fit loop's inner call);
6. record peak RSS (VmHWM) after each phase and throughput in profiles/s; delete the file.

Run: ``nice .venv/bin/python benchmarks/stream_scale.py [--gb 13.5] [--dir /tmp]``
Writes benchmarks/results/stream_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from fastshower.airshower import write_synthetic_profiles
from fastshower.data import BatchStream, ShowerDataset, fit_shower_transform
from fastshower.io import ShowerFile
from fastshower.models import build_model
from fastshower.models.base import ModelSpec

RESULTS = Path(__file__).parent / "results" / "stream_scale.json"
BYTES_PER_ROW = 640 * 4 + 6 * 8  # showers float32 + energy, zenith, azimuth, primary, xmax (float64)


def _status_kib(key: str) -> int:
    """A /proc/self/status memory field (VmHWM: peak RSS, VmRSS: current RSS), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def _mem() -> dict[str, float]:
    return {"peak_rss_gib": _status_kib("VmHWM") / 2**20, "rss_gib": _status_kib("VmRSS") / 2**20,
            "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _drop_cache(path: Path) -> None:
    """Evict the file's pages from the page cache (clean pages only; no effect on other files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _meminfo_gib(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=13.5, help="file size on disk, GB (1e9 bytes)")
    ap.add_argument("--dir", default="/tmp", help="where to write the file (deleted at the end)")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--keep", action="store_true", help="keep the file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out_dir = Path(args.dir)
    free = shutil.disk_usage(out_dir).free
    if free < args.gb * 1e9 * 1.2:
        raise SystemExit(f"{out_dir}: {free / 1e9:.1f} GB free, need {args.gb * 1.2:.1f}")
    path = out_dir / "fastshower_stream_scale.h5"
    if path.exists():
        path.unlink()
    n = int(args.gb * 1e9 / BYTES_PER_ROW) + 1
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "mem_total_gib": _meminfo_gib("MemTotal"), "torch_threads": 1,
                    "note": "2 shared CPU cores, nice'd; other jobs ran at the same time"},
        "file": {"path": str(path), "n_profiles": n, "compression": None, "bank_size": 65536,
                 "content": "synthetic Gaisser-Hillas dEdX+Ne profiles (640 float32), conditions zenith, "
                            "azimuth, primary (ln A); rows drawn from a bank of 65536 distinct profiles"},
        "phases": {},
    }
    t0 = time.perf_counter()
    try:
        write_synthetic_profiles(path, n, seed=7, compression=None, chunk_rows=16384, bank_size=65536)
        dt = time.perf_counter() - t0
        size = path.stat().st_size
        result["file"].update({"bytes_on_disk": size, "gb_on_disk": size / 1e9, "gib_on_disk": size / 2**30,
                               "showers_bytes_uncompressed": n * 640 * 4,
                               "larger_than_half_memory": size > _meminfo_gib("MemTotal") * 2**30 / 2})
        result["phases"]["write"] = {"seconds": dt, "profiles_per_s": n / dt, "mb_per_s": size / 1e6 / dt, **_mem()}
        print("write", result["phases"]["write"], flush=True)

        _drop_cache(path)
        t = time.perf_counter()
        tr = fit_shower_transform(path, ("per_incident", "log", "standardize"), "all")
        dt = time.perf_counter() - t
        result["phases"]["fit_transform"] = {"seconds": dt, "passes": 2, "profiles_per_s": 2 * n / dt, **_mem()}
        print("fit", result["phases"]["fit_transform"], flush=True)

        _drop_cache(path)
        ds = ShowerDataset(path, tr)
        stream = BatchStream(ds, args.batch, seed=0)
        per_epoch = stream.batches_per_epoch()
        t = time.perf_counter()
        rows = 0
        it = iter(stream)
        for _ in range(per_epoch):
            x, c = next(it)
            rows += x.shape[0]
        dt = time.perf_counter() - t
        result["phases"]["stream_epoch"] = {
            "seconds": dt, "profiles": rows, "batches": per_epoch, "batch_size": args.batch,
            "chunk_rows": ds.chunk_rows, "shuffle_chunks": stream.shuffle_chunks,
            "profiles_per_s": rows / dt, "mb_per_s": rows * 640 * 4 / 1e6 / dt, **_mem()}
        print("epoch", result["phases"]["stream_epoch"], flush=True)

        spec = ModelSpec.from_geometry(ds.geometry, tr.cond.all_names, tr.cond.all_widths)
        model = build_model("wgan-gp", spec, {"net": "mlp", "constrainer_warmup": 0})
        opts = model.configure_optimizers()
        t = time.perf_counter()
        for step in range(args.train_steps):
            x, c = next(it)
            logs = model.training_step(x, c, opts, step)
        dt = time.perf_counter() - t
        result["phases"]["train_steps"] = {"model": "wgan-gp (dense, defaults)", "steps": args.train_steps,
                                           "batch_size": args.batch, "seconds": dt,
                                           "ms_per_step": 1e3 * dt / args.train_steps,
                                           "last_loss": logs.get("loss"), **_mem()}
        print("train", result["phases"]["train_steps"], flush=True)
        ds.close()
        with ShowerFile(path) as f:
            result["file"]["n_check"] = f.n
    finally:
        if not args.keep and path.exists():
            path.unlink()
            result["file"]["deleted"] = True
    result["peak_rss_gib"] = _mem()["peak_rss_gib"]
    result["peak_rss_fraction_of_file"] = result["peak_rss_gib"] * 2**30 / result["file"].get("bytes_on_disk", 1)
    result["total_seconds"] = time.perf_counter() - t0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
