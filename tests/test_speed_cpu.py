"""benchmarks/speed_cpu.py: the INT8 change of quality (issue 18 item 4) on a tiny trained 3dgan."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from benchmark_scripts import load_benchmark
from fastshower.deploy import export_onnx
from fastshower.training import train

TINY_TRAIN = {"hparams": {"hidden": 8, "critic_hidden": 4, "latent_dim": 8, "depth": 2},
              "train": {"log_every": 1000, "checkpoint_every": 1000}}


def _speed_cpu() -> ModuleType:
    return load_benchmark("speed_cpu")


def test_quality_scores_profiles_and_same_graph_changes_nothing(tiny_file: Path, tmp_path: Path) -> None:
    run = train(tiny_file, "3dgan", tmp_path / "run", steps=4, batch_size=32, progress=False, config=TINY_TRAIN)
    fp32 = export_onnx(run, tmp_path / "fp32.onnx")
    q = _speed_cpu().quality(str(run), {"fp32": fp32, "again": fp32}, tiny_file, 40, 3, tmp_path)
    sp = q["separation_power"]["fp32"]
    # the papers' x/y/z profiles and moments are scored beside every observable, each a separation power
    assert {"profile_x", "profile_y", "profile_z", "x_mean", "z_rms", "E_tot/E_inc"} <= set(sp)
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in sp.values())
    # the same graph, seed, energies and noise: the same showers, so every change is exactly 0
    assert q["int8_minus_fp32"]["again"] == {k: 0.0 for k in sp}
    assert q["n_showers"] == 40 and q["energy_spec_gev"] == "1:5"
