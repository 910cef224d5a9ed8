"""Generation against a reference: one model profile for every reference profile, with the same conditions."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastshower.io import ShowerBatch, ShowerFile, ShowerFileError, ShowerWriter, primary_ln_a
from fastshower.runs import Run, as_run
from fastshower.sampling import sample_batch

__all__ = ["mirror_generate"]


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
    (:func:`fastshower.sampling.zero_below_ground`). The output's ``particle`` is the reference's
    (or ``particle``), so :func:`fastshower.validate.evaluate.evaluate` accepts the pair.

    Args:
        run: run folder or :func:`fastshower.runs.Run`.
        reference: reference shower file (its energies (N,) MeV and conditions drive generation).
        out: new output file.
        batch_size: profiles per generation batch.
        seed: seeds the model's noise.
        particle: ``particle`` attribute of the output (default: the reference's).
        sample_options: passed to the model's ``sample`` (e.g. {"steps": 16}).
    """
    model, transform, info = as_run(run)
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

