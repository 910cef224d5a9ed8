"""The README's Python example runs as written: as a plain script, without a ``__main__`` guard, in order.

The snippet is read from README.md itself, so the test follows the README; only its sizes are made small
(each replacement must match, so a changed README fails here instead of being skipped).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

#: README text -> the small size the test runs (showers, steps); every key must occur in the snippet
_SMALL = {
    '"0.5,1,1.5,2.5", 40000,': '"0.5,1,1.5,2.5", 200,',
    '"2.0", 10000, "g4_2GeV.h5"': '"2.0", 100, "g4_2GeV.h5"',
    "steps=5000": "steps=5",
    "fs.generate(run, 10000,": "fs.generate(run, 100,",
}


def _python_snippet() -> str:
    """The README's Python example (the first ```python block after "From Python")."""
    text = README.read_text()
    match = re.search(r"From Python.*?```python\n(.*?)```", text, re.S)
    assert match, "README.md has no ```python block after 'From Python'"
    return match.group(1)


#: the same for the README's command-line chain (the ```bash block after "Every step is a CLI sub-command")
_SMALL_CLI = {
    "--energy 0.5,1,1.5,2.5 --n 40000": "--energy 0.5,1,1.5,2.5 --n 200",
    "--steps 5000": "--steps 5",
    "--n 10000 --energy 2.0 --out gen.h5": "--n 100 --energy 2.0 --out gen.h5",
    "--showers 5000": "--showers 100",
    "--n 10000 --energy 2.0 --out gen_refined.h5": "--n 100 --energy 2.0 --out gen_refined.h5",
    "--energy 2.0 --n 10000": "--energy 2.0 --n 100",
    "--out runs/fm1": "--out runs/fm1 --pairs 200 --steps 5",
    "--geant4 --out bench.json": "--geant4 --geant4-showers 4 --batch-sizes 1,100 --out bench.json",
}


def _cli_chain() -> str:
    """The README's command-line example of the whole chain."""
    match = re.search(r"Every step is a CLI sub-command.*?```bash\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md has no ```bash block after 'Every step is a CLI sub-command'"
    return match.group(1)


def _small(snippet: str, sizes: dict[str, str] = _SMALL) -> str:
    for big, small in sizes.items():
        assert big in snippet, f"README snippet changed: {big!r} not found; update _SMALL"
        snippet = snippet.replace(big, small)
    return snippet


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_readme_python_snippet_runs_as_a_script(tmp_path: Path) -> None:
    snippet = _python_snippet()
    assert "__main__" not in snippet  # the point: no guard
    (tmp_path / "api.py").write_text(_small(snippet))
    proc = _run(["api.py"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bootstrapping" not in proc.stderr and "Traceback" not in proc.stderr
    for name in ("belle.h5", "g4_2GeV.h5", "gen.h5"):
        with h5py.File(tmp_path / name, "r") as f:
            assert f.attrs["complete"], name
    assert (tmp_path / "report" / "report.html").is_file()


def test_unguarded_module_run_with_python_m_does_not_rerun_in_workers(tmp_path: Path) -> None:
    """``python -m mod`` makes spawned children import ``mod`` by name: it must not run in the workers either."""
    (tmp_path / "unguarded.py").write_text(
        "import fastshower as fs\n"
        "print('script ran')\n"
        'fs.simulate("belle2-ecl-5x5", "e-", "1", 20, "m.h5", jobs=2, seed=1, chunk_size=10, progress=False)\n'
    )
    proc = _run(["-m", "unguarded"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("script ran") == 1, proc.stdout  # once: in the parent only
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert f["showers"].shape[0] == 20


@pytest.mark.slow
def test_readme_cli_chain_runs_in_order(tmp_path: Path) -> None:
    """Each command of the README's chain, at small sizes, in order in a new folder (Geant4, INT8 export)."""
    script = "set -e\n" + _small(_cli_chain(), _SMALL_CLI)
    bin_dir = Path(sys.executable).parent  # the fastshower command beside this interpreter
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    for name in ("belle.h5", "gen.h5", "gen_refined.h5", "runs/fm/refiner.pt", "g4_2GeV.h5", "fm.onnx",
                 "fm_int8.onnx", "bench.json", "report/report.html", "runs/fm1/meta.json"):
        assert (tmp_path / name).is_file(), name
