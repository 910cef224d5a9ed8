"""Training configs of the air-shower profile models, for :func:`fastshower.training.train` (``config=``)."""

from __future__ import annotations

from typing import Any

__all__ = ["PROFILE_CONFIGS"]

#: training configs (``fastshower.training.train(config=...)``) for profile models; ``[train] steps`` is
#: set by the caller. The WGAN-GP follows the KIT profile-GAN design (dense generator and critic on the
#: flattened dE/dX + Ne profile, conditioned on log E, zenith, azimuth and ln A).
PROFILE_CONFIGS: dict[str, dict[str, Any]] = {
    "wgan-gp": {
        "model": "wgan-gp",
        "hparams": {"latent_dim": 64, "hidden": 256, "depth": 3, "net": "mlp", "lr": 2e-4,
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
