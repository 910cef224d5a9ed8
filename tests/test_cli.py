"""The command line: every verb's help, the chain on a tiny file, one line and status 2 for bad input, the demo."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import fastshower.demo
from fastshower.cli import MODEL_NAMES, build_parser, main
from fastshower.config import default_threads
from fastshower.demo import DemoSettings, run_demo
from fastshower.io import ShowerFile
from fastshower.models import available_models

VERBS = ("geometries", "info", "convert", "merge", "simulate", "train", "distill", "generate", "refine", "evaluate",
         "demo", "export", "bench")
SMALL_TOML = 'model = "flow-matching"\n[hparams]\nhidden = 16\ndepth = 1\nemb_dim = 8\nsteps = 2\nwarmup = 2\n'


def _verbs() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return list(sub.choices)  # type: ignore[attr-defined]


def test_verbs_and_model_names() -> None:
    assert tuple(_verbs()) == VERBS
    assert MODEL_NAMES == tuple(available_models())  # the CLI's list is the registry's


@pytest.mark.parametrize("verb", VERBS)
def test_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fastshower {verb}")
    flat = " ".join(out.split())  # help wraps long lines
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[verb]  # type: ignore[attr-defined]
    for action in sub._actions:  # every option is documented, and its default shown where it has one
        if action.option_strings and action.dest != "help":
            assert action.help, f"{verb} {action.option_strings[0]} has no help"
            if action.default is not None and action.default is not False:  # identity: a default 0 is shown
                assert f"default: {action.default}" in flat.replace("- ", "-"), (verb, action.dest)
            elif not (action.required or isinstance(action, argparse._StoreTrueAction)):
                assert "default" in action.help, f"{verb} {action.option_strings[0]}: help does not say its default"


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastshower: error:") and "\n" not in err, err
    return err


def test_chain_on_a_tiny_file(belle_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL_TOML)
    run, gen, report = tmp_path / "run", tmp_path / "gen.h5", tmp_path / "report"
    assert main(["geometries"]) == 0 and "belle2-ecl-5x5" in capsys.readouterr().out
    assert main(["info", str(belle_file)]) == 0 and "belle2-ecl-5x5" in capsys.readouterr().out
    assert main(["train", "--data", str(belle_file), "--out", str(run), "--config", str(cfg), "--steps", "3",
                 "--batch-size", "32", "--quiet"]) == 0
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["torch_threads"] == default_threads()
    assert f"trained with {default_threads()} torch thread(s)" in capsys.readouterr().out
    assert main(["generate", "--run", str(run), "--n", "60", "--energy", "1", "--condition", "position=0,0",
                 "--out", str(gen), "--quiet"]) == 0
    assert main(["generate", "--run", str(run), "--n", "5", "--energy", "10", "--out", str(tmp_path / "x.h5")]) == 2
    assert _one_error_line(capsys).endswith("energy 10 outside the training range 0.5-2.5 GeV of run run; pass "
                                             "--extrapolate to generate there anyway")
    with ShowerFile(gen) as f:
        b = f.read()
        assert f.n == 60 and np.allclose(b.energies, 1000.0) and np.all(b.conditions["position"] == 0)
        assert np.all((b.showers >= 0) & (b.showers <= 1000.0))  # post-processing: every cell in [0, E_inc]
    assert main(["evaluate", "--reference", str(belle_file), "--candidate", str(gen), "--out", str(report),
                 "--metrics", "separation_power", "--quiet"]) == 0
    assert "separation_power" in json.loads((report / "metrics.json").read_text())
    printed = capsys.readouterr().out  # a short score / value / floor table, not the JSON
    assert f"open {report / 'report.html'}" in printed and "{" not in printed and len(printed.splitlines()) < 20
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "m.onnx")]) == 0
    assert f"export: tracing the sampler of {run} to ONNX, FP32" in capsys.readouterr().out
    assert main(["bench", "--run", str(run), "--batch-sizes", "2", "--backends", "onnx-fp32", "--geant4",
                 "--geant4-showers", "4", "--out", str(tmp_path / "b.json")]) == 0
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["results"] and bench["geant4"]["n_showers"] == 4 and bench["geant4"]["n_startup_showers"] == 2
    printed = capsys.readouterr()
    assert "bench: timing onnx-fp32 at batch 2" in printed.err and "bench: timing Geant4: 2 then 4" in printed.err
    assert "x G4 BACKEND: Geant4 ms/shower / BACKEND ms/shower" in printed.out  # the table's legend
    assert main(["bench", "--run", str(run), "--geant4", "--geant4-showers", "1",
                 "--out", str(tmp_path / "c.json")]) == 2
    assert "--geant4-showers) must be >= 2, got 1" in _one_error_line(capsys)
    assert main(["merge", str(gen), str(gen), "--condition", "", "--out", str(tmp_path / "m.h5")]) == 0
    with ShowerFile(tmp_path / "m.h5") as f:
        assert f.n == 120


@pytest.mark.parametrize("argv", [
    ["info", "{tmp}/missing.h5"],
    ["geometries", "no-such-detector"],
    ["simulate", "--geometry", "no-such-detector", "--particle", "e-", "--energy", "1", "--n", "1",
     "--out", "{tmp}/s.h5"],
    ["simulate", "--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "one", "--n", "1",
     "--out", "{tmp}/s.h5"],
    ["convert", "{tmp}/missing.h5", "--layout", "calogan", "--out", "{tmp}/c.h5"],
    ["merge", "{tmp}/missing.h5", "--out", "{tmp}/m.h5"],
    ["train", "--data", "{tmp}/missing.h5", "--out", "{tmp}/run"],
    ["train", "--data", "{tmp}/missing.h5", "--model", "nope", "--out", "{tmp}/run"],
    ["distill", "--run", "{tmp}/no-run", "--out", "{tmp}/s", "--quiet"],
    ["generate", "--run", "{tmp}/no-run", "--n", "5", "--energy", "1", "--out", "{tmp}/g.h5"],
    ["evaluate", "--reference", "{tmp}/missing.h5", "--candidate", "{tmp}/missing.h5", "--out", "{tmp}/r"],
    ["evaluate", "--reference", "{tmp}/missing.h5", "--candidate", "{tmp}/missing.h5", "--out", "{tmp}/r",
     "--metrics", "bogus"],
    ["export", "--run", "{tmp}/no-run", "--out", "{tmp}/m.onnx"],
    ["bench", "--run", "{tmp}/no-run", "--out", "{tmp}/b.json"],
])
def test_bad_input_is_one_line_and_status_2(argv: list[str], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    _one_error_line(capsys)


def test_bad_option_values_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["bench", "--run", "r", "--out", "o", "--batch-sizes", "abc"],
                 ["generate", "--run", "r", "--n", "1", "--energy", "1", "--out", "o", "--condition", "position"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "error: argument" in capsys.readouterr().err


def test_existing_output_is_refused(belle_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "taken.h5"
    target.write_bytes(belle_file.read_bytes())
    assert main(["simulate", "--geometry", "belle2-ecl-5x5", "--particle", "e-", "--energy", "1", "--n", "5",
                 "--out", str(target), "--quiet"]) == 2
    assert "use --resume to top it up" in _one_error_line(capsys)
    assert target.read_bytes() == belle_file.read_bytes()  # nothing was written over it


def test_demo_quick_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny demo end to end with Geant4; run again, it keeps what is complete and gives the same scores."""
    tiny = DemoSettings(n_train=120, n_test=60, steps=20, batch_size=32)
    first = run_demo(tmp_path, seed=3, jobs=1, settings=tiny)
    for name in ("training_energies", "held_out_2GeV"):
        assert Path(first["reports"][name]).is_file()
        floor = first["scores"][name]["geant4_floor"]["low_level_auc"]
        assert floor is not None and 0.2 < floor < 0.8  # Geant4 against itself: no separation
    printed = capsys.readouterr().out
    assert "fastshower demo" in printed and "good: a model row close to its geant4_floor row" in printed
    assert f"open {first['reports']['held_out_2GeV']}" in printed
    second = run_demo(tmp_path, seed=3, jobs=1, settings=tiny)
    assert "is complete: kept" in capsys.readouterr().err
    assert second["scores"] == first["scores"]


def test_messages_name_flags_that_exist(belle_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path)]) == 2
    assert _one_error_line(capsys).endswith(f"{tmp_path}: is a directory, not a shower file")
    partial = tmp_path / "partial.h5"
    shutil.copy(belle_file, partial)
    with h5py.File(partial, "a") as f:
        f.attrs["complete"] = False
    assert main(["evaluate", "--reference", str(belle_file), "--candidate", str(partial), "--out",
                 str(tmp_path / "r")]) == 2
    line = _one_error_line(capsys)
    assert "finish it with --resume in the simulate or generate that wrote it" in line and "resume=" not in line


def test_interrupted_demo_says_how_to_continue(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The demo has no --resume: it continues when run again, and says so (simulate's message would not)."""
    def interrupted(**kwargs: object) -> None:
        raise KeyboardInterrupt("interrupted; 5 of 10 showers are kept in x.h5; continue with resume=True")

    monkeypatch.setattr(fastshower.demo, "run_demo", interrupted)
    assert main(["demo", "--quick"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("fastshower: interrupted; 5 of 10 showers are kept in x.h5; run the same fastshower demo command "
                   "again to continue where it stopped")


def test_help_imports_nothing_heavy() -> None:
    """`fastshower X --help` stays well under a second: no torch, HDF5, Geant4, ONNX, plotting or numpy import."""
    import subprocess
    import sys

    heavy = ("torch", "h5py", "geant4_pybind", "chromo", "matplotlib", "sklearn", "onnx", "onnxruntime", "numpy")
    code = ("import sys\nfrom fastshower.cli import main\n"
            f"for verb in {VERBS!r}:\n"
            "    try:\n        main([verb, '--help'])\n    except SystemExit:\n        pass\n"
            f"print([m for m in {heavy!r} if m in sys.modules], file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.strip() == "[]", proc.stderr
