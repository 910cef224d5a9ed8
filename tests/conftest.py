"""Shared fixtures: tiny shower files written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastshower.geometry import Geometry, get_geometry
from toy_showers import make_toy_file, tiny_geometry

# One intra-op thread: the test machines are small and shared, and torch's thread pool
# spinning against other processes makes tiny models ~10x slower than single-threaded.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_geo() -> Geometry:
    return tiny_geometry()


@pytest.fixture(scope="session")
def tiny_file(tmp_path_factory: pytest.TempPathFactory, tiny_geo: Geometry) -> Path:
    """600 toy showers on a 2-layer 4x4 geometry, energies 1/2/5 GeV, with a position condition."""
    return make_toy_file(tmp_path_factory.mktemp("data") / "tiny.h5", tiny_geo, 600, seed=1)


@pytest.fixture(scope="session")
def belle_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 toy showers on belle2-ecl-5x5 at 0.5/1/1.5/2.5 GeV with a position condition."""
    geo = get_geometry("belle2-ecl-5x5")
    return make_toy_file(tmp_path_factory.mktemp("data") / "belle.h5", geo, 400, (0.5, 1.0, 1.5, 2.5), seed=2)
