"""Round cohort selection: deterministic, sized by fraction/count/minimum, clear failures."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.sampling import NotEnoughSites, select_sites

SITES = [f"hospital-{i:02d}" for i in range(10)]


def test_same_inputs_give_same_cohort_regardless_of_order_and_duplicates() -> None:
    first = select_sites(SITES, fraction=0.3, seed=5, round_number=2)
    again = select_sites([*reversed(SITES), SITES[0]], fraction=0.3, seed=5, round_number=2)
    assert first == again
    assert first == sorted(first) and len(set(first)) == 3 and set(first) <= set(SITES)


def test_cohort_changes_with_round_and_seed() -> None:
    by_round = {tuple(select_sites(SITES, count=3, seed=5, round_number=r)) for r in range(20)}
    by_seed = {tuple(select_sites(SITES, count=3, seed=s, round_number=1)) for s in range(20)}
    assert len(by_round) > 5 and len(by_seed) > 5


def test_all_online_sites_without_fraction_or_count() -> None:
    assert select_sites(["b", "a", "c"], seed=0, round_number=0) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("kwargs", "size"),
    [
        ({"fraction": 0.3}, 3),
        ({"fraction": 0.7}, 7),  # 0.7 * 10 = 7.000000000000001 must not round up to 8
        ({"fraction": 0.25}, 3),  # ceil(2.5)
        ({"fraction": 1.0}, 10),
        ({"fraction": 0.1, "minimum": 4}, 4),
        ({"count": 4}, 4),
        ({"count": 25}, 10),  # capped at the online sites
        ({"count": 2, "minimum": 5}, 5),
    ],
)
def test_cohort_size(kwargs: dict[str, float], size: int) -> None:
    assert len(select_sites(SITES, seed=1, round_number=3, **kwargs)) == size


def test_not_enough_sites_says_how_many() -> None:
    with pytest.raises(NotEnoughSites, match="2 site\\(s\\) online, but at least 5 needed") as info:
        select_sites(["a", "b", "a"], count=5, minimum=5, seed=0, round_number=1)
    assert (info.value.online, info.value.needed) == (2, 5)
    with pytest.raises(NotEnoughSites):
        select_sites([], seed=0, round_number=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fraction": 0.5, "count": 2},
        {"fraction": 0.0},
        {"fraction": 1.5},
        {"count": 0},
        {"minimum": 0},
        {"seed": -1},
    ],
)
def test_invalid_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        select_sites(SITES, **{"seed": 0, "round_number": 0, **kwargs})  # type: ignore[arg-type]


@given(
    online=st.sets(st.text(min_size=1, max_size=5), min_size=1, max_size=30),
    fraction=st.floats(0.01, 1.0),
    minimum=st.integers(1, 5),
    seed=st.integers(0, 2**32),
    round_number=st.integers(0, 10_000),
)
def test_fraction_cohort_properties(
    online: set[str], fraction: float, minimum: int, seed: int, round_number: int
) -> None:
    def select(sites: list[str]) -> list[str]:
        return select_sites(
            sites, fraction=fraction, minimum=minimum, seed=seed, round_number=round_number
        )

    if len(online) < minimum:
        with pytest.raises(NotEnoughSites):
            select(sorted(online))
        return
    chosen = select(sorted(online))
    assert chosen == sorted(set(chosen)) and set(chosen) <= online
    assert len(chosen) >= minimum and len(chosen) >= fraction * len(online) - 1e-6
    assert chosen == select(sorted(online, reverse=True))
