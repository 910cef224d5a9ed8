"""benchmarks/model_quality.py: a new invocation adds its rows to the results JSON, it does not drop the others; the
training budget holds the end-of-training calibration."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benchmark_scripts import load_benchmark
from fastshower.io import ShowerFile


def _model_quality() -> ModuleType:
    return load_benchmark("model_quality")


def test_merge_keeps_other_rows_and_replaces_the_same_key() -> None:
    merge = _model_quality().merge_results
    old = {"detector": "belle2-ecl-5x5", "protocol": {"minutes_per_model": 25.0},
           "floor": {"a": {"auc_low": 0.5}},
           "models": {"kit": {"steps": 1}, "5min/kit": {"steps": 2}, "other": {"steps": 3}}}
    new = {"detector": "belle2-ecl-5x5", "protocol": {"minutes_per_model": 45.0}, "floor": {"b": {"auc_low": 0.49}},
           "models": {"45min/kit": {"steps": 4}, "other": {"steps": 5}}}
    m = merge(old, new)
    # a second budget under its own key (--key-prefix) sits beside the first; the same key is replaced
    assert m["models"] == {"kit": {"steps": 1}, "5min/kit": {"steps": 2}, "other": {"steps": 5},
                           "45min/kit": {"steps": 4}}
    assert m["floor"] == {"a": {"auc_low": 0.5}, "b": {"auc_low": 0.49}}
    assert m["protocol"] == {"minutes_per_model": 45.0}
    assert old["models"]["other"] == {"steps": 3}  # inputs untouched
    # another detector's file is not mixed in
    assert merge({**old, "detector": "calogan-3layer"}, new) == new


def test_probe_times_a_capped_calibration_apart_and_the_budget_holds_the_full_one(
        tiny_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe calibrates on at most _PROBE_CALIBRATION showers, timed after its last step; the cost per shower
    it gives, times the run's calibration showers (capped at the file), is what the budget must hold back."""
    mq = _model_quality()
    seen: dict[str, Any] = {}
    now = [0.0]
    calibrates = True

    def fake_train(data: Path, model: str, out: Path, steps: int, callback: Any, config: Any, **_: Any) -> None:
        seen["config"] = config
        now[0] += 7.0  # set-up: transform fit, model build
        for step in range(1, steps + 1):
            now[0] += 2.0
            callback(step, {})
        now[0] += 100.0  # the end-of-training calibration
        out.mkdir(parents=True)
        (out / "meta.json").write_text(json.dumps({"calibration": {"n": 250}} if calibrates else {}))

    config = {"hparams": {"maps": "all"}, "train": {"calibration_showers": 5250}}
    monkeypatch.setattr(mq, "train", fake_train)
    per_step, setup, per_shower, refine = mq._probe(tiny_file, "layer-fm", tmp_path / "run", None, 0, 30,
                                                    lambda: now[0], config, "cpu")
    n_cal = mq._PROBE_CALIBRATION
    assert seen["config"]["train"]["calibration_showers"] == n_cal
    assert config["train"]["calibration_showers"] == 5250  # the caller's config is left as it was
    assert (per_step, setup, per_shower, refine) == (2.0, 7.0, 100.0 / n_cal, 0.0)

    def fake_refiner(run: Path, data: Path, cfg: Any, progress: bool) -> dict[str, Any]:
        seen["refine"] = cfg
        now[0] += 40.0
        return {}

    monkeypatch.setattr(mq, "fit_refiner", fake_refiner)  # a refiner is timed on as many showers, after the rest
    timed = mq._probe(tiny_file, "layer-fm", tmp_path / "run", None, 0, 30, lambda: now[0], config, "cpu",
                      {"showers": 5000, "cap": 2.0})
    assert timed == (2.0, 7.0, 100.0 / n_cal, 40.0 / n_cal)
    assert (seen["refine"].showers, seen["refine"].cap) == (n_cal, 2.0)
    assert mq._refine_showers({"showers": 5000}) == 5000 and mq._refine_showers(None) == 0
    with ShowerFile(tiny_file) as f:
        n = f.n
    assert mq._calibration_showers(tiny_file, config) == min(5250, n)
    assert mq._calibration_showers(tiny_file, {"train": {"calibration_showers": 3}}) == 3
    assert not (tmp_path / "run-probe").exists()
    calibrates = False  # a model without a calibration: nothing held back for it
    assert mq._probe(tiny_file, "flow", tmp_path / "run", None, 0, 30, lambda: now[0], None, "cpu")[2] == 0.0
