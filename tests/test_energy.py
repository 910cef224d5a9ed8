"""Energy specs: parsing, units, distributions, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from fastshower.energy import EnergySpecError, parse_energy


def test_units_and_default_gev() -> None:
    assert parse_energy("2.0").values == (2000.0,)
    assert parse_energy("500MeV").values == (500.0,)
    assert parse_energy("1e18eV").values == pytest.approx((1e12,))
    assert parse_energy("1TeV").values == (1e6,)


def test_list_gives_equal_shares() -> None:
    spec = parse_energy("0.5,1,1.5,2.5")
    e = spec.sample(np.random.default_rng(0), 400)
    values, counts = np.unique(e, return_counts=True)
    np.testing.assert_allclose(values, [500, 1000, 1500, 2500])
    assert set(counts) == {100}


def test_log_uniform_is_flat_in_log() -> None:
    e = parse_energy("1:100:log").sample(np.random.default_rng(0), 20000)
    assert e.min() >= 1000 and e.max() <= 100000
    # half of a log-uniform sample lies below the geometric mean (10 GeV)
    assert np.mean(e < 10000) == pytest.approx(0.5, abs=0.02)
    lin = parse_energy("1:100").sample(np.random.default_rng(0), 20000)
    assert np.mean(lin < 50500) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("text", ["", "abc", "-1", "0", "5:1", "1:2:3:4", "1:2:cubic", "3 furlongs", "nan"])
def test_bad_specs_are_clear_errors(text: str) -> None:
    with pytest.raises(EnergySpecError):
        parse_energy(text)


def test_range_check_names_the_range() -> None:
    with pytest.raises(EnergySpecError, match="outside the range"):
        parse_energy("1:100000").check_range(1.0, 1e7, "Geant4")
