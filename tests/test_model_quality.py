"""benchmarks/model_quality.py: a new invocation adds its rows to the results JSON, it does not drop the others."""

from __future__ import annotations

from types import ModuleType

from benchmark_scripts import load_benchmark


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
