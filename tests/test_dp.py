"""Client-level DP: clipping bound, noise calibration (central and distributed), adaptive clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.privacy.dp import (
    AdaptiveClipper,
    add_gaussian_noise,
    add_noise_share,
    clip_update,
    global_l2_norm,
    noise_share_std,
    split_noise_multiplier,
    system_rng,
)

_tensors = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
    elements=st.floats(-1e3, 1e3, width=32),
)


@settings(max_examples=100, deadline=None)
@given(
    update=st.dictionaries(st.text(min_size=1, max_size=8), _tensors, min_size=1, max_size=4),
    max_norm=st.floats(1e-3, 1e3),
)
def test_clipped_update_never_exceeds_bound_and_keeps_direction(update, max_norm):
    clipped, original = clip_update(update, max_norm)
    expected_norm = math.sqrt(sum(float(np.sum(t.astype(np.float64) ** 2)) for t in update.values()))
    assert original == pytest.approx(expected_norm, rel=1e-9, abs=1e-12)
    assert global_l2_norm(clipped) <= max_norm * (1 + 1e-5)
    scale = min(1.0, max_norm / original) if original > 0 else 1.0
    assert clipped.keys() == update.keys()
    for name, tensor in update.items():
        assert clipped[name].dtype == np.float32
        np.testing.assert_allclose(clipped[name], tensor * scale, rtol=1e-5, atol=1e-30)


def test_clipping_uses_the_joint_norm_over_all_tensors():
    update = {"a": np.array([3.0], np.float32), "b": np.array([4.0], np.float32)}
    clipped, norm = clip_update(update, 1.0)
    assert norm == pytest.approx(5.0)
    # Per-tensor clipping would give a=1, b=1; joint clipping keeps the 3:4 ratio.
    np.testing.assert_allclose(clipped["a"], [0.6], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [0.8], rtol=1e-6)


def test_update_within_bound_is_unchanged_and_not_aliased():
    update = {"w": np.array([0.1, -0.2], np.float32)}
    clipped, _ = clip_update(update, 10.0)
    np.testing.assert_array_equal(clipped["w"], update["w"])
    clipped["w"][0] = 99.0
    assert update["w"][0] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("update", "max_norm", "error"),
    [
        ({"w": np.array([np.nan], np.float32)}, 1.0, ValueError),
        ({"w": np.array([np.inf], np.float32)}, 1.0, ValueError),
        ({"w": np.array([1, 2], np.int64)}, 1.0, TypeError),
        ({}, 1.0, ValueError),
        ({"w": np.ones(2, np.float32)}, 0.0, ValueError),
        ({"w": np.ones(2, np.float32)}, -1.0, ValueError),
        ({"w": np.ones(2, np.float32)}, math.inf, ValueError),
    ],
)
def test_clip_update_rejects_bad_input(update, max_norm, error):
    with pytest.raises(error):
        clip_update(update, max_norm)


def test_central_noise_std_is_noise_multiplier_times_clip():
    z, clip = 1.1, 0.5
    zeros = {"w": np.zeros((400, 500), np.float32), "b": np.zeros(1000, np.float32)}
    noised = add_gaussian_noise(zeros, z, clip, np.random.default_rng(7))
    samples = np.concatenate([t.ravel() for t in noised.values()]).astype(np.float64)
    assert noised["w"].dtype == np.float32 and noised["w"].shape == (400, 500)
    # 201k samples: the relative standard error of the std estimate is ~0.16 %.
    assert samples.std() == pytest.approx(z * clip, rel=0.01)
    assert abs(samples.mean()) < 5 * z * clip / math.sqrt(samples.size)


def test_noise_is_added_to_the_values_not_substituted():
    update = {"w": np.full(50_000, 3.0, np.float32)}
    noised = add_gaussian_noise(update, 0.5, 1.0, np.random.default_rng(1))
    assert noised["w"].mean() == pytest.approx(3.0, abs=0.02)
    assert noised["w"].std() == pytest.approx(0.5, rel=0.03)


def test_noise_share_std_formula():
    assert noise_share_std(1.2, 0.5, 9) == pytest.approx(1.2 * 0.5 / 3)
    assert noise_share_std(1.0, 1.0, 1) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        noise_share_std(1.0, 1.0, 0)
    with pytest.raises(ValueError):
        noise_share_std(-1.0, 1.0, 3)


def test_distributed_noise_shares_sum_to_the_full_central_std():
    z, clip, sites = 1.3, 0.8, 8
    rng = np.random.default_rng(11)
    shares = [add_noise_share({"w": np.zeros(100_000, np.float32)}, z, clip, sites, rng)["w"] for _ in range(sites)]
    assert shares[0].std() == pytest.approx(z * clip / math.sqrt(sites), rel=0.015)
    total = np.sum(np.stack(shares).astype(np.float64), axis=0)
    assert total.std() == pytest.approx(z * clip, rel=0.015)
    # Shares must be independent: identical shares would sum to std z*C*sqrt(n).
    assert abs(np.corrcoef(shares[0], shares[1])[0, 1]) < 0.02


def test_noise_is_reproducible_from_the_generator_and_requires_one():
    update = {"w": np.zeros(10, np.float32)}
    a = add_gaussian_noise(update, 1.0, 1.0, np.random.default_rng(5))["w"]
    b = add_gaussian_noise(update, 1.0, 1.0, np.random.default_rng(5))["w"]
    c = add_gaussian_noise(update, 1.0, 1.0, np.random.default_rng(6))["w"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(TypeError):
        add_gaussian_noise(update, 1.0, 1.0, np.random)  # the legacy global module is not allowed


def test_system_rng_streams_are_independent():
    a, b = system_rng(), system_rng()
    assert isinstance(a, np.random.Generator)
    assert not np.array_equal(a.integers(0, 2**63, 4), b.integers(0, 2**63, 4))


def test_adaptive_clip_takes_the_exact_geometric_step():
    rng = np.random.default_rng(0)
    clipper = AdaptiveClipper(initial_clip=2.0, target_quantile=0.5, learning_rate=0.2)
    # Every update unclipped -> the bound is too loose -> shrink by exp(-eta * (1 - gamma)).
    assert clipper.update(10, 10, rng) == pytest.approx(2.0 * math.exp(-0.1))
    # None unclipped -> grow by exp(eta * gamma).
    assert clipper.update(0, 10, rng) == pytest.approx(2.0)
    assert clipper.clip_norm == pytest.approx(2.0)


def test_adaptive_clip_stops_at_its_ceiling():
    rng = np.random.default_rng(0)
    clipper = AdaptiveClipper(initial_clip=2.0, target_quantile=0.5, learning_rate=0.2, max_clip=2.1)
    assert clipper.update(0, 10, rng) == pytest.approx(2.1)  # exp(0.1) * 2 = 2.21 would pass the ceiling
    assert clipper.update(0, 10, rng) == pytest.approx(2.1)
    assert clipper.update(10, 10, rng) == pytest.approx(2.1 * math.exp(-0.1))


@pytest.mark.parametrize(("quantile", "true_value"), [(0.5, 1.0), (0.9, math.exp(0.5 * 1.2815516))])
def test_adaptive_clip_tracks_the_target_quantile_despite_count_noise(quantile, true_value):
    """Norms ~ lognormal(0, 0.5): the median is 1, the 90th percentile exp(0.5 * z_0.9)."""
    rng = np.random.default_rng(3)
    sites = 20
    clipper = AdaptiveClipper(0.1, quantile, learning_rate=0.2, count_noise_std=sites / 20)
    history = []
    for _ in range(400):
        norms = np.exp(rng.normal(0.0, 0.5, size=sites))
        clipper.update(float(np.sum(norms <= clipper.clip_norm)), sites, rng)
        history.append(clipper.clip_norm)
    assert np.mean(history[-100:]) == pytest.approx(true_value, rel=0.1)
    assert history[0] < 0.5 * true_value  # it really had to move there


def test_adaptive_clipper_rejects_bad_configuration():
    with pytest.raises(ValueError):
        AdaptiveClipper(0.0)
    with pytest.raises(ValueError):
        AdaptiveClipper(1.0, target_quantile=1.0)
    with pytest.raises(ValueError):
        AdaptiveClipper(1.0, count_noise_std=-1.0)
    with pytest.raises(ValueError):
        AdaptiveClipper(1.0).update(-1, 10, np.random.default_rng())
    with pytest.raises(ValueError):
        AdaptiveClipper(1.0).update(3, 0, np.random.default_rng())


def test_split_noise_multiplier_preserves_the_total_guarantee():
    z, sigma_b = 1.0, 1.0
    z_update = split_noise_multiplier(z, sigma_b)
    assert z_update == pytest.approx(1 / math.sqrt(1 - 0.25))
    # Composition of the two Gaussian queries is a Gaussian with z^-2 = sum of the parts.
    assert z_update**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)
    with pytest.raises(ValueError, match="too small"):
        split_noise_multiplier(2.0, 1.0)
