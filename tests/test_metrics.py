"""Known-answer tests of fastshower.validate.metrics."""

from __future__ import annotations

import numpy as np
import pytest

from fastshower.validate import metrics as M


def test_separation_power_limits() -> None:
    assert M.separation_power([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0)
    assert M.separation_power([1, 0], [0, 5]) == pytest.approx(1.0)


def test_streaming_histogram_equals_one_shot() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(size=10_001)
    b = M.make_binning(v[:500])
    one = M.HistogramAccumulator(b)
    one.update(v)
    parts = [M.HistogramAccumulator(b) for _ in range(3)]
    for i, chunk in enumerate(np.array_split(v, 7)):
        parts[i % 3].update(chunk)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert np.array_equal(merged.compute(), one.compute())
    assert merged.total == v.size
    merged.reset()
    assert merged.total == 0


def test_frechet_two_gaussians_analytic() -> None:
    mu = np.array([1.0, -2.0])
    s2 = np.array([4.0, 0.25])
    expected = mu @ mu + np.sum(1 + s2 - 2 * np.sqrt(s2))
    assert M.frechet_distance(np.zeros(2), np.eye(2), mu, np.diag(s2)) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 2))
    y = rng.normal(size=(20000, 2)) * np.sqrt(s2) + mu
    r = M.fpd(x, y, min_samples=5000, max_samples=20000, num_batches=3, num_points=4, normalise=False, scale=1.0)
    assert r.value == pytest.approx(expected, rel=0.02)


def test_kpd_identical_is_zero() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4000, 5)), rng.normal(size=(4000, 5))
    r = M.kpd(x, y, num_batches=5, batch_size=1000)
    assert abs(r.value) < 3 * r.error + 0.5
    assert M.kpd(x, y + 0.5, num_batches=5, batch_size=1000).value > 10


def test_classifier_separates_and_not() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3000, 4)), rng.normal(size=(3000, 4))
    same = M.classifier_score(a, b, seed=1)
    assert abs(same.auc - 0.5) < 0.05 and same.jsd < 0.05
    diff = M.classifier_score(a, b + 1.5, seed=1)
    assert diff.auc > 0.85 and diff.jsd > 0.3


def test_ssim_identical_and_support_size() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((3, 6, 6))
    assert np.allclose(M.ssim(img, img), 1.0)
    assert (M.ssim(img, rng.random((3, 6, 6))) < 0.9).all()
    # a sampler with 400 equally likely outcomes: E[T^2]/2 = 400
    x = rng.integers(0, 400, 2000)[:, None].astype(float)
    s = M.birthday_support_size(x, 0.5, n_orderings=400)
    assert 300 < s.support < 520 and s.censored == 0


def test_resolution_fit_recovers_terms() -> None:
    e = np.array([0.5, 1.0, 2.0, 5.0, 10.0])
    r = np.sqrt(0.02**2 / e + 0.01**2)
    f = M.fit_resolution(e, r, r * 0.01)
    assert f.a == pytest.approx(0.02, rel=1e-3) and f.b == pytest.approx(0.01, rel=1e-3)
    assert M.binomial_fraction(1, 4) == pytest.approx((0.25, np.sqrt(0.25 * 0.75 / 4)))
