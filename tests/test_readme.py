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

README = Path(__file__).resolve().parents[1] / "README.md"

#: README text -> the small size the test runs (showers, steps); every key must occur in the snippet
_SMALL = {
    '"0.5,1,1.5,2.5", 40000,': '"0.5,1,1.5,2.5", 200,',
    '"2.0", 10000, "g4_2GeV.h5"': '"2.0", 100, "g4_2GeV.h5"',
    "steps=5000": "steps=5",
    "fs.generate(run, 10000,": "fs.generate(run, 100,",
}


def _python_snippet() -> str:
    """The README's Python example (the ```python block after "From Python:")."""
    text = README.read_text()
    match = re.search(r"From Python:\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no ```python block after 'From Python:'"
    return match.group(1)


def _small(snippet: str) -> str:
    for big, small in _SMALL.items():
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
