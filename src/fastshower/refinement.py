"""Classifier-ratio refinement of a trained run (``fastshower refine``, ``generate --refine``).

A model's showers can differ from Geant4's by many shifts each too small to see on its own and together plain to a
classifier: on par04-ds2, a 60-CPU-minute ``layer-fm`` run had every one of its 368 observables' marginals within a
Kolmogorov distance of ~0.02 of Geant4's (beyond the Geant4-vs-Geant4 floor), its high-level classifier AUC was 0.76,
and with each observable's marginal alone moved onto Geant4's (per energy bin, ranks kept) it was 0.51.

Refinement removes such shifts without retraining, by rejection sampling on a learned density ratio (the DCTR idea:
Andreassen & Nachman, Phys. Rev. D 101 (2020) 091901; applied to generative models as DCTRGAN, Diefenbacher et al.,
JINST 15 (2020) P11004):

1. fit (:func:`fit_refiner`): ``showers`` rows of the run's training file (label 1) and as many of the run's own
   showers at the same incident energies and conditions (label 0); features are the high-level observables
   (:func:`fastshower.validate.observables.compute_observables`), each as signed log1p(|x| / median |x|), with
   log10 E_inc and the run's conditions; a two-layer MLP with early stopping on a held-out fifth estimates
   p(data | x, E), so that w = p / (1 - p) estimates p_data(x | E) / p_model(x | E);
2. sample (:meth:`Refiner.refine`): each shower is kept with probability min(1, w / cap) and drawn again at its own
   energy and conditions until kept (at most ``max_rounds`` draws; then the draw with the largest w). The kept
   showers follow p_model x min(w, cap), the data's distribution wherever w <= cap: unweighted showers at the
   requested conditions, at ~cap / E[min(w, cap)] draws each.

The refiner lives in the run folder (``refiner.pt``, ``refiner.json``); ``generate --refine`` uses it with either
sampler (torch or ONNX), as it acts on the showers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fastshower.errors import FastshowerError
from fastshower.geometry import Geometry
from fastshower.io import ShowerFile, ShowerFileError
from fastshower.runs import Run, as_run, atomic_save, write_json
from fastshower.sampling import sample_batch
from fastshower.validate.metrics import fit_early_stopped, mlp_classifier
from fastshower.validate.observables import compute_observables, observable_names

__all__ = ["RefineConfig", "RefineError", "Refiner", "fit_refiner", "load_refiner", "refiner_summary"]

#: the refiner's files in a run folder
REFINER_FILE, REFINER_SUMMARY = "refiner.pt", "refiner.json"
_FORMAT = 1
#: fewest showers of each kind a refiner is fitted on
_MIN_SHOWERS = 20

#: draws(energies (m,) MeV, conditions name -> (m, k)) -> showers (m, V) MeV: one batch of a run's sampler
Draw = Callable[[np.ndarray, Mapping[str, np.ndarray]], np.ndarray]


class RefineError(FastshowerError, ValueError):
    """Bad refinement settings, a run without a refiner, or data the refiner cannot be fitted on."""


@dataclass(frozen=True)
class RefineConfig:
    """How a refiner is fitted and used.

    Attributes:
        showers: data showers used (all of the file if it holds fewer), and as many of the run's own drawn at
            their conditions (the fit's cost is that of generating them).
        hidden: width of the classifier's two hidden layers; lr, weight_decay, batch_size: AdamW's.
        max_epochs, patience: at most this many epochs, stopping after ``patience`` without a better held-out loss.
        validation: held-out fraction (early stopping, the AUC and acceptance reported).
        cap: the largest density ratio honoured: a shower is kept with probability min(1, w / cap). A larger cap
            follows the data further into the model's thin regions, at cap / E[min(w, cap)] draws per shower.
        max_rounds: draws per requested shower before its largest-w draw is taken.
        seed: seeds the subset order, the model's showers, the split and the initialisation.
    """

    showers: int = 5000
    hidden: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 10
    validation: float = 0.2
    cap: float = 3.0
    max_rounds: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if self.showers < _MIN_SHOWERS or self.hidden < 1 or self.batch_size < 1 or self.max_epochs < 1:
            raise RefineError(f"refine: showers must be >= {_MIN_SHOWERS} and hidden, batch_size, max_epochs >= 1 "
                              f"({self})")
        if not 0.05 <= self.validation <= 0.5 or self.cap <= 0 or self.max_rounds < 1:
            raise RefineError(f"refine: validation must be in [0.05, 0.5], cap > 0 and max_rounds >= 1 ({self})")


class Refiner(torch.nn.Module):
    """The density-ratio classifier and its feature transform.

    Buffers: ``scale`` (F,) the median |observable| of the fit's data, ``mu`` and ``sd`` (D,) the standardisation of
    the D = F + 1 + sum(condition widths) features (observables, log10 E_inc, the conditions).
    """

    scale: torch.Tensor
    mu: torch.Tensor
    sd: torch.Tensor

    def __init__(self, geometry: Geometry, cond_names: tuple[str, ...], n_features: int, config: RefineConfig) -> None:
        super().__init__()
        self.geometry, self.cond_names, self.config = geometry, cond_names, config
        self.names = observable_names(geometry)
        self.register_buffer("scale", torch.ones(len(self.names), dtype=torch.float64))
        self.register_buffer("mu", torch.zeros(n_features))
        self.register_buffer("sd", torch.ones(n_features))
        self.net = mlp_classifier(n_features, config.hidden)

    def observables(self, showers: np.ndarray, energies: np.ndarray) -> np.ndarray:
        """Showers (n, V) MeV at incident energies (n,) MeV -> their observables (n, F), float64."""
        obs = compute_observables(showers, energies, self.geometry)
        return np.stack([np.asarray(obs[k], dtype=np.float64) for k in self.names], axis=1)

    def features(self, obs: np.ndarray, energies: np.ndarray, conditions: Mapping[str, np.ndarray]) -> np.ndarray:
        """Observables (n, F), energies (n,) MeV and conditions -> unstandardised features (n, D), float32."""
        scaled = np.sign(obs) * np.log1p(np.abs(obs) / self.scale.numpy())
        conds = [np.asarray(conditions[k], dtype=np.float64).reshape(len(obs), -1) for k in self.cond_names]
        x = np.concatenate([scaled, np.log10(np.asarray(energies, dtype=np.float64)).reshape(-1, 1), *conds], 1)
        return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)

    def logit(self, x: np.ndarray) -> torch.Tensor:
        """Unstandardised features (n, D) -> the classifier's logit log w (n,)."""
        return self.net((torch.from_numpy(x) - self.mu) / self.sd)[:, 0]

    @torch.no_grad()
    def ratio(self, showers: np.ndarray, energies: np.ndarray, conditions: Mapping[str, np.ndarray]) -> np.ndarray:
        """The estimated density ratio w = p_data / p_model (n,) of showers (n, V) MeV at their conditions."""
        x = self.features(self.observables(showers, energies), energies, conditions)
        return np.exp(np.clip(self.logit(x).double().numpy(), -30.0, 30.0))

    def refine(self, draw: Draw, energies: np.ndarray, conditions: Mapping[str, np.ndarray],
               rng: np.random.Generator) -> tuple[np.ndarray, dict[str, int]]:
        """Showers (n, V) from ``draw`` by rejection on the ratio (module docstring, step 2), and counts: "draws"
        (showers generated), "unaccepted" (rows that took their largest-w draw after ``max_rounds``)."""
        cap, n = self.config.cap, len(energies)
        out = draw(energies, conditions)
        best_w = self.ratio(out, energies, conditions)
        todo = np.flatnonzero(rng.uniform(size=n) >= np.minimum(best_w / cap, 1.0))
        draws = n
        for _ in range(self.config.max_rounds - 1):
            if not len(todo):
                break
            c = {k: np.asarray(v)[todo] for k, v in conditions.items()}
            new = draw(energies[todo], c)
            w = self.ratio(new, energies[todo], c)
            draws += len(todo)
            kept = rng.uniform(size=len(todo)) < np.minimum(w / cap, 1.0)
            better = kept | (w > best_w[todo])  # a kept draw replaces; otherwise the largest w so far stays
            out[todo[better]], best_w[todo[better]] = new[better], w[better]
            todo = todo[~kept]
        return out, {"draws": draws, "unaccepted": len(todo)}


def _data_rows(path: str, n: int, refiner: Refiner, chunk: int = 1000
               ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The first ``n`` showers of ``path`` (all, if it holds fewer; read ``chunk`` at a time) -> observables (m, F),
    energies (m,), conditions; memory holds one chunk of showers."""
    obs, e, conds = [], [], []
    try:
        with ShowerFile(path) as f:
            if f.geometry.to_dict() != refiner.geometry.to_dict():
                raise RefineError(f"refine: {path} is on geometry {f.geometry.name!r}, the run on "
                                  f"{refiner.geometry.name!r}")
            n = min(n, f.n)
            if n < _MIN_SHOWERS:
                raise RefineError(f"refine: {path} holds {f.n} showers, fewer than the {_MIN_SHOWERS} a refiner needs")
            for a in range(0, n, chunk):
                b = f.read(a, min(n, a + chunk))
                obs.append(refiner.observables(b.showers, b.energies))
                e.append(np.asarray(b.energies, dtype=np.float64).reshape(-1))
                conds.append({k: np.asarray(b.conditions[k]) for k in refiner.cond_names})
    except (ShowerFileError, OSError) as exc:
        raise RefineError(f"refine: the data file {path!r} cannot be read ({exc})") from None
    except KeyError as exc:
        raise RefineError(f"refine: the data file {path!r} lacks the run's condition {exc}") from None
    return (np.concatenate(obs), np.concatenate(e),
            {k: np.concatenate([c[k] for c in conds]) for k in refiner.cond_names})


def _model_rows(run: Run, refiner: Refiner, e: np.ndarray, conds: Mapping[str, np.ndarray], seed: int,
                chunk: int = 1000) -> np.ndarray:
    """Observables (n, F) of the run's own showers at energies e (n,) MeV and conditions, ``chunk`` at a time."""
    model, transform, info = run
    out = []
    for a in range(0, len(e), chunk):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + a)
        c = {k: v[a:a + chunk] for k, v in conds.items()}
        showers = sample_batch(model, transform, e[a:a + chunk], c, gen, info.threshold_mev, geometry=info.geometry)
        out.append(refiner.observables(showers, e[a:a + chunk]))
    return np.concatenate(out)


def _train(refiner: Refiner, x: np.ndarray, y: np.ndarray, cfg: RefineConfig) -> dict[str, Any]:
    """Fit the classifier on features x (n, D) and labels y (n,) (1: data); returns its held-out figures."""
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(len(x))
    n_val = max(2, int(cfg.validation * len(x)))
    i_val, i_tr = perm[:n_val], perm[n_val:]
    refiner.mu.copy_(torch.from_numpy(x[i_tr].mean(0)))
    refiner.sd.copy_(torch.from_numpy(x[i_tr].std(0) + 1e-6))
    xs = (torch.from_numpy(x) - refiner.mu) / refiner.sd
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the caller's generator alone
        torch.manual_seed(cfg.seed)
        for m in refiner.net:
            if isinstance(m, torch.nn.Linear):
                m.reset_parameters()
    opt = torch.optim.AdamW(refiner.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_epoch = fit_early_stopped(refiner.net, xs, torch.from_numpy(y.astype(np.float32)),
                                         lambda: torch.from_numpy(i_tr[rng.permutation(len(i_tr))]),
                                         torch.from_numpy(i_val), opt, cfg.batch_size, cfg.max_epochs, cfg.patience)
    return _held_out(refiner.eval(), x[i_val], y[i_val], best, best_epoch)


@torch.no_grad()
def _held_out(refiner: Refiner, x: np.ndarray, y: np.ndarray, loss: float, epoch: int) -> dict[str, Any]:
    """The refiner's figures on held-out features x (n, D), labels y: AUC, loss, and on the model's rows the mean
    acceptance min(1, w / cap) and the spread of w."""
    logit = refiner.logit(x).double().numpy()
    w = np.exp(np.clip(logit[y == 0], -30.0, 30.0))
    accept = float(np.minimum(w / refiner.config.cap, 1.0).mean())
    return {"validation_auc": float(roc_auc_score(y, logit)), "validation_loss": loss, "best_epoch": epoch,
            "acceptance": accept, "draws_per_shower": 1.0 / max(accept, 1e-9),
            "ratio_quantiles_10_50_90": [float(q) for q in np.quantile(w, [0.1, 0.5, 0.9])],
            "ratio_above_cap": float((w > refiner.config.cap).mean())}


def fit_refiner(run: str | Path | Run, data: str | Path | None = None, config: RefineConfig | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Fit a run's refiner (module docstring, step 1) and save it in the run folder; returns its summary.

    Args:
        run: a finished run folder (or a loaded run). data: the Geant4 file to learn from (default: the run's
            training file, as its meta.json records it). config: :class:`RefineConfig`. progress: say what it does.

    Raises:
        RefineError: unreadable data, data of another geometry or lacking a condition, fewer than 20 showers.
    """
    cfg = config or RefineConfig()
    loaded = as_run(run, require_finished=True)
    info = loaded.info
    path = str(data) if data is not None else info.training_file
    if not path:
        raise RefineError(f"refine: run {info.run_id} records no training file; pass the data file to learn from")
    t0 = time.process_time()
    refiner = Refiner(info.geometry, tuple(info.cond_names), len(observable_names(info.geometry)) + 1
                      + int(sum(info.cond_widths)), cfg)
    obs_d, e, conds = _data_rows(path, cfg.showers, refiner)
    if progress:
        print(f"refine: {len(e)} showers of {path} read; drawing as many of run {info.run_id}", flush=True)
    obs_m = _model_rows(loaded, refiner, e, conds, cfg.seed)
    scale = np.nanmedian(np.abs(np.concatenate([obs_d, obs_m])), axis=0)
    refiner.scale.copy_(torch.from_numpy(np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)))
    x = np.concatenate([refiner.features(obs_d, e, conds), refiner.features(obs_m, e, conds)])
    y = np.r_[np.ones(len(obs_d)), np.zeros(len(obs_m))]
    summary = {"data": str(Path(path).resolve()), "showers": len(e), "run_step": info.step, "config": asdict(cfg),
               **_train(refiner, x, y, cfg), "cpu_seconds": time.process_time() - t0}
    atomic_save({"format": _FORMAT, "config": asdict(cfg), "cond_names": list(refiner.cond_names),
                 "n_features": x.shape[1], "state": refiner.state_dict()}, info.run_dir / REFINER_FILE)
    write_json(info.run_dir / REFINER_SUMMARY, summary)
    return summary


def load_refiner(run_dir: str | Path, geometry: Geometry, cap: float | None = None) -> Refiner:
    """The refiner saved in ``run_dir`` for showers of ``geometry``, optionally with another ``cap``.

    Raises:
        RefineError: the run has no refiner, or one of an unknown format.
    """
    path = Path(run_dir) / REFINER_FILE
    if not path.is_file():
        raise RefineError(f"run {Path(run_dir).resolve().name} has no refiner; fit one with "
                          f"`fastshower refine --run {run_dir}`")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != _FORMAT:
        raise RefineError(f"{path}: refiner format {saved.get('format')!r}, this fastshower reads {_FORMAT}")
    known = {f.name for f in fields(RefineConfig)}
    cfg = RefineConfig(**{k: v for k, v in saved["config"].items() if k in known})
    if cap is not None:
        cfg = RefineConfig(**{**asdict(cfg), "cap": float(cap)})
    refiner = Refiner(geometry, tuple(saved["cond_names"]), int(saved["n_features"]), cfg)
    refiner.load_state_dict(saved["state"])
    return refiner.eval()


def refiner_summary(run_dir: str | Path) -> dict[str, Any]:
    """The saved refiner's summary (``refiner.json``) of ``run_dir``, or {} when it has none."""
    path = Path(run_dir) / REFINER_SUMMARY
    return json.loads(path.read_text()) if path.is_file() else {}
