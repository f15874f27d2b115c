"""Aggregation strategies: hand-computed arithmetic, state, validation, robustness."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.strategies import (
    STRATEGIES,
    NotEnoughUpdates,
    Strategy,
    StrategyConfig,
    make_strategy,
)

Update = tuple[str, int, Mapping[str, np.ndarray]]

# Options making every strategy constructible; norm_bounding has no default bound.
OPTIONS: dict[str, dict[str, Any]] = {"norm_bounding": {"max_norm": 1.0}}
SERVER_OPTIMIZERS = ["fedavgm", "fedadam", "fedyogi", "fedadagrad"]


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def build(name: str, **options: Any) -> Strategy:
    return make_strategy(StrategyConfig(name=name, options={**OPTIONS.get(name, {}), **options}))


def run_round(
    strategy: Strategy,
    global_weights: Mapping[str, np.ndarray],
    updates: Sequence[Update],
    aggregated_names: set[str] | None = None,
) -> dict[str, np.ndarray]:
    aggregation = strategy.begin_round(global_weights, aggregated_names=aggregated_names)
    for site, num_samples, update in updates:
        aggregation.add(site, num_samples, update)
    assert aggregation.count == len(updates)
    return aggregation.finish()


def assert_weights(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, Sequence[float]]
) -> None:
    assert set(actual) == set(expected)
    for name, values in expected.items():
        assert actual[name].dtype == np.float32
        np.testing.assert_allclose(actual[name], f32(*values), rtol=1e-6, atol=1e-7)


# --- FedAvg / FedProx -------------------------------------------------------


def test_fedavg_is_the_sample_weighted_mean() -> None:
    global_weights = {"w": f32(1, 2), "b": f32(0.5)}
    updates = [
        ("a", 1, {"w": f32(1, -2), "b": f32(4)}),
        ("b", 3, {"w": f32(-3, 2), "b": f32(0)}),
    ]
    new = run_round(build("fedavg"), global_weights, updates)
    # w: (1*1 + 3*-3)/4 = -2, (1*-2 + 3*2)/4 = 1; b: 4/4 = 1
    assert_weights(new, {"w": [-1, 3], "b": [1.5]})
    np.testing.assert_array_equal(global_weights["w"], f32(1, 2))  # input not mutated


def test_fedavg_accumulates_in_float64() -> None:
    # In float32, 2**24 + 1 rounds back to 2**24 and the 1 is lost; the exact mean is 1/3.
    updates = [("a", 1, {"w": f32(2**24)}), ("b", 1, {"w": f32(1)}), ("c", 1, {"w": f32(-(2**24))})]
    new = run_round(build("fedavg"), {"w": f32(0)}, updates)
    assert new["w"][0] == np.float32(1 / 3)


def test_fedavg_over_many_slices_matches_the_one_expression_mean_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    global_weights = {"w": rng.standard_normal((300, 701)).astype(np.float32),  # > 3 fold slices
                      "s": np.array(0.25, dtype=np.float32)}
    updates = [(f"s{i}", 10 + 7 * i, {name: rng.standard_normal(w.shape).astype(np.float32) * 1e-3
                                      for name, w in global_weights.items()}) for i in range(4)]
    new = run_round(build("fedavg"), global_weights, updates)
    total = sum(n for _, n, _ in updates)
    for name, weight in global_weights.items():
        mean = sum(n * u[name].astype(np.float64) for _, n, u in updates) / total
        assert np.array_equal(new[name], (weight.astype(np.float64) + mean).astype(np.float32)), name


def test_fedavg_peak_memory_is_sums_plus_one_update_plus_the_new_weights() -> None:
    """float64 sums (2x the float32 model) + the new weights (1x): no full-size temporaries."""
    import tracemalloc

    rng = np.random.default_rng(1)
    global_weights = {"a": rng.standard_normal(1_500_000).astype(np.float32),
                      "b": rng.standard_normal((500, 1000)).astype(np.float32)}
    updates = [{name: rng.standard_normal(w.shape).astype(np.float32) for name, w in global_weights.items()}
               for _ in range(3)]
    model_bytes = sum(w.nbytes for w in global_weights.values())
    tracemalloc.start()
    try:
        aggregation = build("fedavg").begin_round(global_weights)
        for i, update in enumerate(updates):
            aggregation.add(f"s{i}", 100 + i, update)
        new = aggregation.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert set(new) == set(global_weights)
    assert peak < 3.2 * model_bytes, f"peak {peak / model_bytes:.2f}x the model"


def test_weighted_average_divides_once_even_if_finish_is_retried() -> None:
    from orchestrator.strategies.base import WeightedAverage

    calls = []

    def flaky_step(delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(float(delta["w"][0]))
        if len(calls) == 1:
            raise RuntimeError("server step failed")
        return delta

    aggregation = WeightedAverage("test", {"w": f32(1)}, ["w"], flaky_step)
    aggregation.add("a", 2, {"w": f32(4)})
    aggregation.add("b", 2, {"w": f32(0)})
    with pytest.raises(RuntimeError, match="server step failed"):
        aggregation.finish()
    assert aggregation.finish()["w"][0] == np.float32(3)
    assert calls == [2.0, 2.0]


def test_fedprox_aggregates_like_fedavg_and_tells_sites_mu() -> None:
    global_weights = {"w": f32(1, 2)}
    updates = [("a", 1, {"w": f32(1, -2)}), ("b", 3, {"w": f32(-3, 2)})]
    prox = build("fedprox", mu=0.1)
    assert prox.training_overrides() == {"proximal_mu": 0.1}
    assert build("fedprox").training_overrides() == {"proximal_mu": 0.01}
    assert build("fedavg").training_overrides() == {}
    assert_weights(run_round(prox, global_weights, updates), {"w": [-1, 3]})


# --- server optimizers -------------------------------------------------------


def test_fedavgm_momentum_over_two_rounds() -> None:
    strategy = build("fedavgm", server_lr=0.5, momentum=0.5)
    # Round 1: v = [2, -4]; new = 0 + 0.5 * v
    first = run_round(strategy, {"w": f32(0, 0)}, [("a", 1, {"w": f32(2, -4)})])
    assert_weights(first, {"w": [1, -2]})
    # Round 2: v = 0.5*[2, -4] + [4, 0] = [5, -2]; new = [1, -2] + 0.5 * v
    second = run_round(strategy, first, [("a", 1, {"w": f32(4, 0)})])
    assert_weights(second, {"w": [3.5, -3]})
    state = strategy.state()
    assert set(state) == {"step", "momentum/w"}
    np.testing.assert_array_equal(state["momentum/w"], [5, -2])
    assert state["step"].shape == () and int(state["step"]) == 2


def test_fedadam_moments_and_weights_over_two_rounds() -> None:
    # tau = 1 so v starts at tau^2 = 1; b2 = 0.5 keeps square roots exact.
    strategy = build("fedadam", server_lr=1.2, beta1=0.5, beta2=0.5, tau=1.0)
    global_weights = {"w": f32(1, 2, 3)}
    # Weighted average delta = [-1, 7, 0].
    first = run_round(
        strategy,
        global_weights,
        [("a", 1, {"w": f32(2, 4, 0)}), ("b", 1, {"w": f32(-4, 10, 0)})],
    )
    # m = 0.5*d = [-0.5, 3.5, 0]; v = 0.5*1 + 0.5*d^2 = [1, 25, 0.5]
    # step = 1.2 * m / (sqrt(v) + 1) = 1.2 * [-0.5/2, 3.5/6, 0] = [-0.3, 0.7, 0]
    assert_weights(first, {"w": [0.7, 2.7, 3]})
    state = strategy.state()
    np.testing.assert_allclose(state["m/w"], [-0.5, 3.5, 0])
    np.testing.assert_allclose(state["v/w"], [1, 25, 0.5])

    second = run_round(strategy, first, [("a", 5, {"w": f32(1, 5, 0)})])
    # m = 0.5*m + 0.5*d = [0.25, 4.25, 0]; v = 0.5*v + 0.5*d^2 = [1, 25, 0.25]
    # step = 1.2 * [0.25/2, 4.25/6, 0] = [0.15, 0.85, 0]
    assert_weights(second, {"w": [0.85, 3.55, 3]})
    state = strategy.state()
    np.testing.assert_allclose(state["m/w"], [0.25, 4.25, 0])
    np.testing.assert_allclose(state["v/w"], [1, 25, 0.25])
    assert int(state["step"]) == 2


def test_fedyogi_second_moment_moves_additively_towards_delta_squared() -> None:
    strategy = build("fedyogi", server_lr=0.3, beta1=0.5, beta2=0.5, tau=0.5)
    # Average delta [2, -12]; v0 = tau^2 = 0.25 < d^2, so v grows: 0.25 + 0.5*d^2 = [2.25, 72.25]
    first = run_round(
        strategy,
        {"w": f32(1, 2)},
        [("a", 1, {"w": f32(4, -12)}), ("b", 1, {"w": f32(0, -12)})],
    )
    # m = [1, -6]; step = 0.3 * [1/(1.5+0.5), -6/(8.5+0.5)] = [0.15, -0.2]
    assert_weights(first, {"w": [1.15, 1.8]})
    np.testing.assert_allclose(strategy.state()["v/w"], [2.25, 72.25])

    second = run_round(strategy, first, [("a", 1, {"w": f32(1, 12)})])
    # v - d^2 = [1.25, -71.75]: coordinate 0 shrinks by 0.5*1, coordinate 1 grows by 0.5*144.
    # (Adam would give 0.5*2.25 + 0.5*1 = 1.625 for coordinate 0.)
    state = strategy.state()
    np.testing.assert_allclose(state["v/w"], [1.75, 144.25])
    np.testing.assert_allclose(state["m/w"], [1, 3])
    # step = 0.3 * [1/(sqrt(1.75)+0.5), 3/(sqrt(144.25)+0.5)]
    #      = 0.3 * [1/1.8228756555, 3/12.5104121049] = [0.1645751311, 0.0719400759]
    assert_weights(second, {"w": [1.3145751311, 1.8719400759]})


def test_fedadagrad_accumulates_squares_without_momentum_by_default() -> None:
    strategy = build("fedadagrad", server_lr=0.5, tau=1.5)
    # v0 = 2.25; d = [2, -0.625]; v = v0 + d^2 = [6.25, 2.640625] = [2.5^2, 1.625^2]
    # beta1 = 0 so m = d; step = 0.5 * [2/(2.5+1.5), -0.625/(1.625+1.5)] = [0.25, -0.1]
    first = run_round(strategy, {"w": f32(1, 1)}, [("a", 1, {"w": f32(2, -0.625)})])
    assert_weights(first, {"w": [1.25, 0.9]})
    # d = [6, 0]: v = [42.25, 2.640625] (never decays); step = 0.5 * [6/(6.5+1.5), 0] = [0.375, 0]
    second = run_round(strategy, first, [("a", 1, {"w": f32(6, 0)})])
    assert_weights(second, {"w": [1.625, 0.9]})
    state = strategy.state()
    np.testing.assert_allclose(state["v/w"], [42.25, 2.640625])
    np.testing.assert_allclose(state["m/w"], [6, 0])


def test_adaptive_defaults_follow_flower() -> None:
    assert build("fedadam").config().options == {
        "server_lr": 0.1,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-9,
    }
    assert build("fedadagrad").config().options == {"server_lr": 0.1, "beta1": 0.0, "tau": 1e-9}


# --- robust rules --------------------------------------------------------------


def test_median_is_unweighted_per_coordinate() -> None:
    updates: list[Update] = [
        ("a", 1, {"w": f32(1, 10)}),
        ("b", 1, {"w": f32(2, -5)}),
        ("c", 1000, {"w": f32(100, 0)}),  # a large sample count buys no influence
    ]
    assert_weights(run_round(build("median"), {"w": f32(1, 1)}, updates), {"w": [3, 1]})
    # Even count: mean of the two middle values: [1, 2, 7, 100] -> 4.5, [-5, 0, 7, 10] -> 3.5
    four = [*updates, ("d", 1, {"w": f32(7, 7)})]
    assert_weights(run_round(build("median"), {"w": f32(0, 0)}, four), {"w": [4.5, 3.5]})


def test_trimmed_mean_drops_both_tails() -> None:
    updates: list[Update] = [
        ("a", 1, {"w": f32(1, -50)}),
        ("b", 9, {"w": f32(2, 0)}),
        ("c", 1, {"w": f32(3, 1)}),
        ("d", 1, {"w": f32(4, 2)}),
        ("e", 1, {"w": f32(100, 3)}),
    ]
    # trim 0.2 of 5 = 1 per end: mean(2, 3, 4) = 3 and mean(0, 1, 2) = 1
    assert_weights(run_round(build("trimmed_mean"), {"w": f32(0, 0)}, updates), {"w": [3, 1]})
    # trim 0.4 of 5 = 2 per end leaves only the median
    strategy = build("trimmed_mean", trim_fraction=0.4)
    assert_weights(run_round(strategy, {"w": f32(0, 0)}, updates), {"w": [3, 1]})


def test_trimmed_mean_refuses_too_few_sites() -> None:
    strategy = build("trimmed_mean", trim_fraction=0.2)
    assert strategy.min_updates == 5
    aggregation = strategy.begin_round({"w": f32(0)})
    for i in range(4):
        aggregation.add(f"s{i}", 1, {"w": f32(i)})
    with pytest.raises(NotEnoughUpdates, match="at least 5 update"):
        aggregation.finish()


@pytest.mark.parametrize(
    ("fraction", "needed"), [(0.0, 1), (0.1, 10), (0.2, 5), (0.25, 4), (0.3, 4), (0.45, 3)]
)
def test_trimmed_mean_min_updates(fraction: float, needed: int) -> None:
    assert build("trimmed_mean", trim_fraction=fraction).min_updates == needed


def test_norm_bounding_clips_each_update_then_weights() -> None:
    strategy = build("norm_bounding", max_norm=5.0)
    global_weights = {"w": f32(0, 0), "b": f32(0)}
    updates: list[Update] = [
        ("a", 1, {"w": f32(0, 3), "b": f32(4)}),  # norm 5: kept
        ("b", 3, {"w": f32(6, 0), "b": f32(8)}),  # norm 10: halved to w [3, 0], b [4]
    ]
    # w = (1*[0, 3] + 3*[3, 0]) / 4 = [2.25, 0.75]; b = (4 + 3*4) / 4 = 4
    assert_weights(run_round(strategy, global_weights, updates), {"w": [2.25, 0.75], "b": [4]})
    # The norm spans only aggregated tensors: without b, site b has norm 6 -> w * 5/6 = [5, 0]
    # w = (1*[0, 3] + 3*[5, 0]) / 4 = [3.75, 0.75]; b stays local
    new = run_round(strategy, global_weights, updates, aggregated_names={"w"})
    assert_weights(new, {"w": [3.75, 0.75], "b": [0]})


# --- FedBN exclusion, state, config ---------------------------------------------


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_excluded_tensors_are_copied_unchanged(name: str) -> None:
    global_weights = {"conv.weight": f32(1, 2), "bn.running_mean": f32(5, 6)}
    updates: list[Update] = [
        (f"s{i}", 1, {"conv.weight": f32(0.1, -0.1), "bn.running_mean": f32(99, 99)})
        for i in range(5)
    ]
    strategy = build(name)
    new = run_round(strategy, global_weights, updates, aggregated_names={"conv.weight"})
    np.testing.assert_array_equal(new["bn.running_mean"], f32(5, 6))
    assert new["bn.running_mean"] is not global_weights["bn.running_mean"]
    assert not np.array_equal(new["conv.weight"], global_weights["conv.weight"])
    assert not any("bn.running_mean" in key for key in strategy.state())
    # Sites may also omit the excluded tensors entirely.
    only_conv = [(site, n, {"conv.weight": u["conv.weight"]}) for site, n, u in updates]
    again = run_round(build(name), global_weights, only_conv, aggregated_names={"conv.weight"})
    np.testing.assert_array_equal(again["conv.weight"], new["conv.weight"])


def random_rounds(seed: int) -> list[list[Update]]:
    rng = np.random.default_rng(seed)

    def update() -> dict[str, np.ndarray]:
        w = rng.normal(size=(2, 3)).astype(np.float32)
        return {"w": w, "b": rng.normal(size=3).astype(np.float32)}

    return [[(f"s{i}", int(rng.integers(1, 50)), update()) for i in range(3)] for _ in range(3)]


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_state_round_trip_through_npz_resumes_identically(name: str, tmp_path: Path) -> None:
    rounds = random_rounds(7)
    start = {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}
    original = build(name)
    weights = run_round(original, start, rounds[0])
    np.savez(tmp_path / "state.npz", **original.state())

    restored = build(name)
    with np.load(tmp_path / "state.npz", allow_pickle=False) as saved:
        restored.load_state({key: saved[key] for key in saved.files})

    # An abandoned round must not change the state.
    abandoned = original.begin_round(weights)
    abandoned.add(*rounds[1][0])

    for updates in rounds[1:]:
        expected = run_round(original, weights, updates)
        actual = run_round(restored, weights, updates)
        for key in expected:
            np.testing.assert_array_equal(actual[key], expected[key])
        weights = expected
    final_a, final_b = original.state(), restored.state()
    assert set(final_a) == set(final_b)
    for key in final_a:
        np.testing.assert_array_equal(final_a[key], final_b[key])
    assert int(final_a["step"]) == 3


def test_state_is_a_copy() -> None:
    strategy = build("fedavgm")
    run_round(strategy, {"w": f32(0)}, [("a", 1, {"w": f32(1)})])
    strategy.state()["momentum/w"][0] = 1000
    np.testing.assert_array_equal(strategy.state()["momentum/w"], [1])


def test_load_state_rejects_foreign_or_inconsistent_state() -> None:
    with pytest.raises(ValueError, match="keeps no server state"):
        build("fedavg").load_state({"step": np.array(1)})
    assert build("median").state() == {}
    adam = build("fedadam")
    with pytest.raises(ValueError, match="unexpected server state entry 'momentum/w'"):
        adam.load_state({"step": np.array(1), "momentum/w": np.zeros(2)})
    with pytest.raises(ValueError, match="lacks the 'step'"):
        adam.load_state({"m/w": np.zeros(2), "v/w": np.zeros(2)})
    with pytest.raises(ValueError, match="different tensors"):
        adam.load_state({"step": np.array(1), "m/w": np.zeros(2)})
    adam.load_state({"step": np.array(1), "m/w": np.zeros(3), "v/w": np.ones(3)})
    with pytest.raises(ValueError, match=r"m/w has shape \(3,\).*\(2,\)"):
        adam.begin_round({"w": f32(0, 0)})
    adam.load_state({})  # resets
    assert int(adam.state()["step"]) == 0 and len(adam.state()) == 1


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_config_round_trips_through_json(name: str) -> None:
    strategy = build(name)
    recorded = StrategyConfig.model_validate_json(strategy.config().model_dump_json())
    assert recorded == strategy.config()
    assert make_strategy(recorded).config() == recorded
    assert type(make_strategy(recorded)) is type(strategy)


# --- validation -----------------------------------------------------------------


def test_unknown_option_lists_accepted_ones() -> None:
    accepted = r"accepted options: \['beta1', 'beta2', 'server_lr', 'tau'\]"
    with pytest.raises(ValueError, match=rf"'momentum'.*{accepted}"):
        build("fedadam", momentum=0.9)
    with pytest.raises(ValueError, match="accepted options: none"):
        build("fedavg", mu=0.1)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fedadam", {"beta1": 1.0}),
        ("fedadam", {"tau": 0.0}),
        ("fedavgm", {"server_lr": -1.0}),
        ("fedprox", {"mu": -0.1}),
        ("trimmed_mean", {"trim_fraction": 0.5}),
        ("norm_bounding", {"max_norm": 0.0}),
        ("norm_bounding", {}),
    ],
)
def test_invalid_option_values(name: str, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=f"invalid options for strategy '{name}'"):
        STRATEGIES[name](options)


def test_unknown_strategy_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown strategy 'fedsgd'.*'fedadam'.*'trimmed_mean'"):
        make_strategy(StrategyConfig(name="fedsgd"))


@pytest.mark.parametrize(
    ("num_samples", "update", "message"),
    [
        (1, {"w": f32(1, 2, 3)}, r"'w' has shape \(3,\), expected \(2,\)"),
        (1, {"w": f32(1, np.nan)}, "NaN or infinite"),
        (1, {"w": f32(1, np.inf)}, "NaN or infinite"),
        (1, {"w": np.array([1, 2])}, "expected floating point"),
        (1, {}, r"missing tensors: \['w'\]"),
        (1, {"w": f32(1, 2), "x": f32(0)}, r"not in the model: \['x'\]"),
        (0, {"w": f32(1, 2)}, "num_samples must be >= 1"),
        (True, {"w": f32(1, 2)}, "num_samples must be an integer"),
    ],
)
def test_add_rejects_bad_updates(
    num_samples: int, update: dict[str, np.ndarray], message: str
) -> None:
    aggregation = build("fedavg").begin_round({"w": f32(0, 0)})
    with pytest.raises(ValueError, match=message):
        aggregation.add("site-a", num_samples, update)
    assert aggregation.count == 0


def test_rejected_update_leaves_round_intact_and_duplicates_are_refused() -> None:
    aggregation = build("fedavg").begin_round({"a": f32(0), "b": f32(0)})
    with pytest.raises(ValueError, match="'b' contains NaN"):
        aggregation.add("s1", 1, {"a": f32(100), "b": f32(np.nan)})  # 'a' must not be folded in
    aggregation.add("s1", 1, {"a": f32(2), "b": f32(4)})
    with pytest.raises(ValueError, match="site 's1' already contributed"):
        aggregation.add("s1", 1, {"a": f32(2), "b": f32(4)})
    assert aggregation.count == 1
    assert_weights(aggregation.finish(), {"a": [2], "b": [4]})
    with pytest.raises(RuntimeError, match="already finished"):
        aggregation.add("s2", 1, {"a": f32(2), "b": f32(4)})
    with pytest.raises(RuntimeError, match="already called"):
        aggregation.finish()


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_finish_without_updates_is_an_error(name: str) -> None:
    with pytest.raises(NotEnoughUpdates, match="got 0"):
        build(name).begin_round({"w": f32(0)}).finish()


def test_begin_round_rejects_bad_aggregated_names() -> None:
    strategy = build("fedavg")
    with pytest.raises(ValueError, match=r"not in the global weights: \['x'\]"):
        strategy.begin_round({"w": f32(0)}, aggregated_names={"w", "x"})
    with pytest.raises(ValueError, match="aggregated_names is empty"):
        strategy.begin_round({"w": f32(0)}, aggregated_names=set())
    with pytest.raises(ValueError, match=r"\['shape'\] are not floating point"):
        strategy.begin_round({"w": f32(0), "shape": np.array([2, 3])})
    strategy.begin_round({"w": f32(0), "shape": np.array([2, 3])}, aggregated_names={"w"})


# --- robustness -------------------------------------------------------------------


@pytest.mark.parametrize("attack", [100.0, -10.0], ids=["scaled_x100", "sign_flipped_x-10"])
@pytest.mark.parametrize("name", ["median", "trimmed_mean", "norm_bounding"])
def test_robust_rules_resist_one_bad_site_where_fedavg_does_not(name: str, attack: float) -> None:
    rng = np.random.default_rng(42)
    global_weights = {"w": rng.normal(size=(4, 5)).astype(np.float32), "b": np.zeros(3, np.float32)}
    target = {"w": rng.normal(size=(4, 5)), "b": rng.normal(size=3)}
    target_norm = float(np.sqrt(sum(np.sum(t**2) for t in target.values())))
    honest = [
        {k: (t + 0.01 * rng.normal(size=t.shape)).astype(np.float32) for k, t in target.items()}
        for _ in range(4)
    ]
    attacker = {k: (attack * t).astype(np.float32) for k, t in target.items()}
    updates: list[Update] = [(f"h{i}", 100, u) for i, u in enumerate(honest)]
    updates.append(("mallory", 100, attacker))
    honest_result = {k: global_weights[k] + np.mean([u[k] for u in honest], axis=0) for k in target}

    def relative_error(new: Mapping[str, np.ndarray]) -> float:
        squared = sum(np.sum((new[k] - honest_result[k]).astype(np.float64) ** 2) for k in target)
        return float(np.sqrt(squared)) / target_norm

    # FedAvg moves by (4t + attack*t)/5: off from t by |attack - 1|/5 >= 2.2 target norms.
    assert relative_error(run_round(build("fedavg"), global_weights, updates)) > 2.0
    # Norm bounding with max_norm 1.2|t| clips the attacker to 1.2|t|, leaving an error of at
    # about (1 + 1.2)/5 = 0.44 target norms; median and trimmed mean ignore it almost entirely.
    options = {"max_norm": 1.2 * target_norm} if name == "norm_bounding" else {}
    tolerance = 0.45 if name == "norm_bounding" else 0.02
    assert relative_error(run_round(build(name, **options), global_weights, updates)) < tolerance


# --- properties ---------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(STRATEGIES)),
    values=st.lists(
        st.tuples(
            st.integers(1, 1000),
            st.lists(st.floats(-100, 100, width=32), min_size=3, max_size=3),
        ),
        min_size=5,
        max_size=8,
    ),
    order=st.randoms(use_true_random=False),
)
def test_result_does_not_depend_on_arrival_order(
    name: str, values: list[tuple[int, list[float]]], order: Any
) -> None:
    updates: list[Update] = [(f"s{i}", n, {"w": f32(*v)}) for i, (n, v) in enumerate(values)]
    shuffled = list(updates)
    order.shuffle(shuffled)
    start = {"w": f32(1, -1, 0)}
    a = run_round(build(name), start, updates)["w"]
    b = run_round(build(name), start, shuffled)["w"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    if name in ("median", "trimmed_mean"):
        stacked = np.stack([u["w"] for _, _, u in updates])
        assert np.all(a >= start["w"] + stacked.min(axis=0) - 1e-4)
        assert np.all(a <= start["w"] + stacked.max(axis=0) + 1e-4)


def test_dp_fedavg_refuses_a_clip_ceiling_below_the_initial_clip() -> None:
    with pytest.raises(ValueError, match="max_clip_norm 0.5 is below the initial clip_norm 1.0"):
        make_strategy(StrategyConfig(name="dp_fedavg", options={"clip_norm": 1.0, "max_clip_norm": 0.5}))
