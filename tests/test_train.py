"""The fit loop, run folders, resume, failure paths, and generation from a run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from fastshower.errors import ConfigError, FastshowerError
from fastshower.generation import generate
from fastshower.geometry import get_geometry
from fastshower.io import ShowerFile
from fastshower.models import available_models
from fastshower.models.flow_matching import FlowMatching
from fastshower.runs import RunError, data_provenance, load_run
from fastshower.sampling import GenerationError, sample_batch
from fastshower.training import TrainingError, train

SMALL = {"hparams": {"hidden": 32, "depth": 1, "emb_dim": 16, "steps": 4, "warmup": 5},
         "train": {"chunk_rows": 128, "shuffle_chunks": 2}}


def _train(data: Path, out: Path, steps: int = 12, **kw: Any) -> Path:
    kw.setdefault("config", SMALL)
    return train(data, "flow-matching", out, steps=steps, batch_size=64, progress=False, log_every=4, **kw)


def test_run_folder(tiny_file: Path, tmp_path: Path) -> None:
    run = _train(tiny_file, tmp_path / "run", checkpoint_every=5)
    for name in ("config.json", "geometry.json", "transforms.json", "spec.json", "meta.json", "train_log.jsonl",
                 "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8, 12] and all(np.isfinite(r["loss"]) for r in log)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["step"] == 12 and meta["fastshower_version"]
    assert meta["data"]["generator"] == "toy showers (tests)" and meta["data"]["n_showers"] == 600
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"] == "flow-matching" and cfg["hparams"]["hidden"] == 32
    assert cfg["train"]["transform"] == ["per_incident", "log", "standardize"]
    assert cfg["train"]["threshold_resolved_mev"] > 0
    with pytest.raises(TrainingError, match="exists and is not empty"):
        _train(tiny_file, run)


def _state(run: Path) -> dict[str, Any]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def test_resume_is_bit_for_bit(tiny_file: Path, tmp_path: Path) -> None:
    whole = _train(tiny_file, tmp_path / "whole", steps=14)

    class Killed(Exception):
        pass

    def kill_at_7(step: int, logs: dict[str, float]) -> None:
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        _train(tiny_file, tmp_path / "split", steps=14, checkpoint_every=7, callback=kill_at_7)
    assert _state(tmp_path / "split")["step"] == 7
    split = train(tiny_file, None, tmp_path / "split", steps=14, resume=True, progress=False)
    a, b = _state(whole), _state(split)
    assert a["step"] == b["step"] == 14
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["data"] == b["data"]
    assert torch.equal(a["optimizers"][0]["state"][0]["exp_avg"], b["optimizers"][0]["state"][0]["exp_avg"])
    la = (whole / "train_log.jsonl").read_text().splitlines()
    lb = (split / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in la] == [json.loads(x)["loss"] for x in lb]


def test_config_errors(tiny_file: Path, tmp_path: Path) -> None:
    with pytest.raises(FastshowerError, match="unknown model 'nope'; available: flow-matching"):
        train(tiny_file, "nope", tmp_path / "a", steps=1, progress=False)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['optimiser'\]"):
        _train(tiny_file, tmp_path / "b", config={"optimiser": {}})
    with pytest.raises(ConfigError, match=r"\[train\]: unknown key\(s\) \['stepz'\]; known: steps, epochs"):
        _train(tiny_file, tmp_path / "c", config={"train": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['hiden'\]; known: .*hidden"):
        _train(tiny_file, tmp_path / "d", config={"hparams": {"hiden": 3}})
    with pytest.raises(ConfigError, match="batch_size must be int, got 'many'"):
        _train(tiny_file, tmp_path / "d2", config={"train": {"batch_size": "many"}})
    with pytest.raises(ConfigError, match="resolved by training itself"):
        _train(tiny_file, tmp_path / "d3", config={"train": {"total_steps": 3}})
    bad = tmp_path / "bad.toml"
    bad.write_text("model = [")
    with pytest.raises(ConfigError, match="invalid TOML"):
        _train(tiny_file, tmp_path / "e", config=bad)
    with pytest.raises(TrainingError, match="no such file"):
        _train(tmp_path / "missing.h5", tmp_path / "f")
    assert not any((tmp_path / d).exists() for d in "bcde")  # refused before anything was written


def test_resume_with_the_same_toml_config(tiny_file: Path, tmp_path: Path) -> None:
    """A config with a tuple-valued setting (wgan-gp's betas, a list in TOML) resumes the run it started."""
    cfg = tmp_path / "wgan.toml"
    cfg.write_text('model = "wgan-gp"\n[hparams]\nhidden = 16\nbetas = [0.5, 0.9]\n[train]\nbatch_size = 16\n')
    run = train(tiny_file, None, tmp_path / "run", config=cfg, steps=2, progress=False)
    train(tiny_file, None, run, config=cfg, steps=3, resume=True, progress=False)
    assert _state(run)["step"] == 3
    cfg.write_text('model = "wgan-gp"\n[hparams]\nhidden = 32\n')
    with pytest.raises(TrainingError, match="the config differs"):
        train(tiny_file, None, run, config=cfg, steps=4, resume=True, progress=False)


def test_toml_config(tiny_file: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "fm.toml"
    cfg.write_text('model = "flow-matching"\n[hparams]\nhidden = 16\ndepth = 1\n[train]\nsteps = 3\nbatch_size = 32\n')
    run = train(tiny_file, None, tmp_path / "run", config=cfg, progress=False)
    assert (run / "config.toml").read_text() == cfg.read_text()
    c = json.loads((run / "config.json").read_text())
    assert c["hparams"]["hidden"] == 16 and c["train"]["batch_size"] == 32 and _state(run)["step"] == 3


def test_corrupt_checkpoint_and_foreign_data(tiny_file: Path, belle_file: Path, tmp_path: Path) -> None:
    run = _train(tiny_file, tmp_path / "run", steps=3)
    with pytest.raises(TrainingError, match=r"holds geometry 'belle2-ecl-5x5' but run .* trained on 'tiny-2x4x4'"):
        train(belle_file, None, run, steps=6, resume=True, progress=False)
    ckpt = run / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(RunError, match="corrupt or unreadable checkpoint"):
        train(tiny_file, None, run, steps=6, resume=True, progress=False)


def test_nan_loss_stops_and_keeps_checkpoint(tiny_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = FlowMatching.loss

    def poisoned(self: FlowMatching, x: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        calls["n"] += self.training  # the run's cost report evaluates the loss once in eval mode first
        out = real(self, x, c)
        return {"loss": out["loss"] * float("nan")} if calls["n"] > 6 else out

    monkeypatch.setattr(FlowMatching, "loss", poisoned)
    with pytest.raises(TrainingError, match=r"loss is nan at step 7; stopped \(last good checkpoint: .* \(step 5\)"):
        _train(tiny_file, tmp_path / "run", steps=20, checkpoint_every=5)
    good = _state(tmp_path / "run")
    assert good["step"] == 5 and all(torch.isfinite(v).all() for v in good["model"].values())


def test_nan_in_data_is_a_training_error(tiny_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "nan.h5"
    bad.write_bytes(tiny_file.read_bytes())
    with h5py.File(bad, "r+") as f:
        f["showers"][10, 3] = np.inf
    with pytest.raises(TrainingError, match="shower 10 has NaN or infinite"):
        _train(bad, tmp_path / "run")


# --- generation -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def belle_run(belle_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(belle_file, tmp_path_factory.mktemp("runs") / "belle", steps=10)


def test_generate(belle_run: Path, tmp_path: Path) -> None:
    out = generate(belle_run, 250, "1.0:2.0", None, tmp_path / "g.h5", batch_size=100, seed=4, progress=False)
    with ShowerFile(out, get_geometry("belle2-ecl-5x5")) as f:
        b = f.read()
        assert f.n == 250 and f.complete and f.particle == "e-"
        assert "flow-matching run belle" in f.generator
        assert f.attrs["run_step"] == 10
    assert (b.energies >= 1000).all() and (b.energies <= 2000).all()
    assert np.isfinite(b.showers).all() and (b.showers >= 0).all()
    # the position condition defaults to the training range: the centre crystal's face
    pos = b.conditions["position"]
    assert (np.abs(pos) <= 30.0).all() and pos.std() > 5
    _, _, info = load_run(belle_run)
    thr = info.threshold_mev
    assert thr > 0 and not ((b.showers > 0) & (b.showers < thr)).any()
    again = generate(belle_run, 250, "1.0:2.0", None, tmp_path / "g2.h5", batch_size=100, seed=4, progress=False)
    other = generate(belle_run, 250, "1.0:2.0", None, tmp_path / "g3.h5", batch_size=100, seed=5, progress=False)
    with ShowerFile(again) as f2, ShowerFile(other) as f3:
        np.testing.assert_array_equal(f2.read().showers, b.showers)
        assert not np.array_equal(f3.read().showers, b.showers)


def test_generate_conditions_and_errors(belle_run: Path, tmp_path: Path) -> None:
    run = load_run(belle_run)
    out = generate(run, 20, "2", {"position": "0,5"}, tmp_path / "g.h5", progress=False,
                   sample_options={"steps": 2})
    with ShowerFile(out) as f:
        np.testing.assert_array_equal(f.read().conditions["position"], np.tile([0.0, 5.0], (20, 1)))
    with pytest.raises(GenerationError, match=r"unknown condition\(s\) \['angle'\]"):
        generate(run, 5, "2", {"angle": "0"}, tmp_path / "x.h5", progress=False)
    with pytest.raises(GenerationError, match="3 fields given for 2 columns"):
        generate(run, 5, "2", {"position": "0,0,0"}, tmp_path / "x.h5", progress=False)
    with pytest.raises(GenerationError, match=r"energy 10 outside the training range 0\.5-2\.5 GeV of run belle; "
                       r"pass extrapolate=True to generate there anyway"):
        generate(run, 5, "10", None, tmp_path / "x.h5", progress=False)
    run = run._replace(info=dataclasses.replace(run.info, options=run.info.options.replace(condition_defaults="none")))
    with pytest.raises(GenerationError, match="condition 'position' is required"):
        generate(run, 5, "2", None, tmp_path / "x.h5", progress=False)


def test_generate_accepts_the_training_files_energy_spec(belle_run: Path, belle_file: Path, tmp_path: Path) -> None:
    """The allowed range is the spec the training file was made with, not the span of its sampled energies."""
    training = tmp_path / "train.h5"
    shutil.copy(belle_file, training)
    with h5py.File(training, "a") as f:
        f.attrs["energy_spec"] = "0.3:3"  # the toy file holds 0.5-2.5 GeV only
    with ShowerFile(training) as f:
        assert data_provenance(f)["energy_spec"] == "0.3:3"  # what train writes into meta.json
    run = tmp_path / "run"
    shutil.copytree(belle_run, run)
    meta = json.loads((run / "meta.json").read_text())
    meta["data"]["path"] = str(training)
    meta["data"].pop("energy_spec", None)  # a run from before meta.json recorded it: read from the file
    (run / "meta.json").write_text(json.dumps(meta))
    generate(run, 5, "0.3:3", None, tmp_path / "a.h5", progress=False, sample_options={"steps": 2})
    with pytest.raises(GenerationError, match=r"training range 0\.3-3 GeV of run run"):
        generate(run, 5, "3.5", None, tmp_path / "b.h5", progress=False)
    meta["data"]["energy_spec"] = "0.2:4"  # recorded in meta.json: that one counts
    (run / "meta.json").write_text(json.dumps(meta))
    generate(run, 5, "3.5", None, tmp_path / "c.h5", progress=False, sample_options={"steps": 2})


def test_sample_batch_in_memory(belle_run: Path) -> None:
    model, transform, info = load_run(belle_run)
    e = np.full(7, 1500.0)
    pos = np.zeros((7, 2))
    a = sample_batch(model, transform, e, {"position": pos}, torch.Generator().manual_seed(0), info.threshold_mev)
    b = sample_batch(model, transform, e, {"position": pos}, torch.Generator().manual_seed(0), info.threshold_mev)
    assert a.shape == (7, 25) and a.dtype == np.float32 and (a >= 0).all() and (a <= 1500).all()
    np.testing.assert_array_equal(a, b)
    with pytest.raises(GenerationError, match="missing condition"):
        sample_batch(model, transform, e, None)


def test_every_model_trains_and_generates(tiny_file: Path, tmp_path: Path) -> None:
    from fastshower.models import available_models

    for name in available_models():
        run = train(tiny_file, name, tmp_path / name, steps=3, batch_size=32, progress=False)
        out = generate(run, 10, "2", None, tmp_path / f"{name}.h5", progress=False)
        with ShowerFile(out) as f:
            assert f.n == 10 and np.isfinite(f.read().showers).all()



DDP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from fastshower.training import train
cfg = {"hparams": {"hidden": 16, "depth": 1, "emb_dim": 8, "warmup": 2}, "train": {"chunk_rows": 64}}
kill = sys.argv[3] == "kill"
def cb(step, logs):
    if kill and step == 3:
        raise SystemExit(3)
train(sys.argv[1], "flow-matching", sys.argv[2], steps=6, batch_size=32, progress=False, config=cfg,
      checkpoint_every=3, resume=sys.argv[3] == "resume", callback=cb)
"""


@pytest.mark.slow
def test_torchrun_two_ranks_resume(tiny_file: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tiny_file)]
    subprocess.run([*torchrun, str(tmp_path / "whole"), "fresh"], check=True, capture_output=True)
    assert subprocess.run([*torchrun, str(tmp_path / "split"), "kill"], capture_output=True).returncode != 0
    subprocess.run([*torchrun, str(tmp_path / "split"), "resume"], check=True, capture_output=True)
    a, b = _state(tmp_path / "whole"), _state(tmp_path / "split")
    assert a["world_size"] == 2 and len(a["rng"]) == 2 and a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_run_folder_of_release_0_1_0_still_loads(tiny_file: Path, tmp_path: Path) -> None:
    """A run whose config.json uses the hyper-parameter names of release 0.1.0 (vae ``latent``, ``mmd``)
    loads with the same weights and generates the same showers; an unknown key is refused in one line."""
    cfg = {"hparams": {"latent_dim": 4, "hidden": 16, "depth": 1, "mmd_weight": 0.5}, "train": {"chunk_rows": 128}}
    run = train(tiny_file, "vae", tmp_path / "new", steps=3, batch_size=32, config=cfg, progress=False)
    old = tmp_path / "old"
    shutil.copytree(run, old)
    config = json.loads((old / "config.json").read_text())
    hp = config["hparams"]
    hp["latent"], hp["mmd"] = hp.pop("latent_dim"), hp.pop("mmd_weight")
    config["train"]["transform"] = list(config["train"]["transform"])  # as 0.1.0 wrote it
    (old / "config.json").write_text(json.dumps(config))
    a, b = load_run(run), load_run(old)
    assert a.info.hparams == b.info.hparams and b.info.hparams["latent_dim"] == 4
    e, pos = np.full(5, 2000.0), {"position": np.zeros((5, 2))}
    np.testing.assert_array_equal(sample_batch(a.model, a.transform, e, pos, torch.Generator().manual_seed(1)),
                                  sample_batch(b.model, b.transform, e, pos, torch.Generator().manual_seed(1)))
    hp["lattent"] = 3
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match=r"unknown key\(s\) \['lattent'\]"):
        load_run(old)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", available_models())
def test_every_model_trains_and_generates_on_cuda(name: str, tiny_file: Path, tmp_path: Path) -> None:
    # every tensor a step, the cost report (meta.json) or sampling makes must live on the model's device
    # (model_cost once built its probe showers on the CPU: a GPU run failed at its first step)
    run = train(tiny_file, name, tmp_path / name, steps=3, batch_size=32, progress=False, device="cuda")
    assert json.loads((run / "meta.json").read_text())["device"].startswith("cuda")
    out = generate(run, 10, "2", None, tmp_path / f"{name}.h5", progress=False, device="cuda")
    with ShowerFile(out) as f:
        assert f.n == 10 and np.isfinite(f.read().showers).all()


@pytest.mark.parametrize("name", ["flow-matching", "layer-fm", "flow"])
def test_bf16_precision_rounds_the_step_and_keeps_float32_weights(name: str, tiny_file: Path, tmp_path: Path) -> None:
    first: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        def cb(step: int, logs: dict[str, float], p: str = precision) -> None:
            first.setdefault(p, logs["loss"])

        run = train(tiny_file, name, tmp_path / precision, steps=2, batch_size=64, progress=False, callback=cb,
                    config={"train": {"precision": precision}})
    # the same seed, data and initial weights: bfloat16 products (8-bit mantissa) move the loss a little, not a lot;
    # `flow` is normalising flows only, which bf16 leaves in float32: the same loss to the last bit
    if name == "flow":
        assert first["bf16"] == first["fp32"]
    else:
        assert 0 < abs(first["bf16"] - first["fp32"]) < 0.05 * abs(first["fp32"])
    model = load_run(run)[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ConfigError, match="precision must be one of 'fp32', 'bf16', got 'fp16'"):
        train(tiny_file, name, tmp_path / "fp16", steps=1, progress=False, config={"train": {"precision": "fp16"}})


def test_bf16_on_a_cpu_without_bf16_units_is_said_once(tiny_file: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """precision="bf16" where /proc/cpuinfo lists no bf16 unit: one warning line naming the fix (emulated bf16 was
    8x slower per step here); none with a listed unit or with fp32."""
    import fastshower.training as training

    avx2, zen4 = tmp_path / "avx2", tmp_path / "zen4"
    avx2.write_text("flags\t\t: fpu sse2 avx avx2 fma\n")
    zen4.write_text("flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16\n")
    assert not training.native_bf16(avx2) and training.native_bf16(zen4)
    assert training.native_bf16(tmp_path / "missing")  # not Linux: nothing claimed
    read = training.native_bf16
    for cpuinfo, precision, said in ((avx2, "bf16", 1), (zen4, "bf16", 0), (avx2, "fp32", 0)):
        monkeypatch.setattr(training, "native_bf16", lambda c=cpuinfo: read(c))
        train(tiny_file, "vae", tmp_path / f"{cpuinfo.name}-{precision}", steps=1, batch_size=32, progress=False,
              config={"train": {"precision": precision}})
        err = capsys.readouterr().err
        assert err.count("without bf16 units") == said, err
