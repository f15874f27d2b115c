"""The digits federation's data: a deterministic, non-IID split of scikit-learn's digits."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from edge_agent.data import load_dataset
from fedmq.digits import (
    FEATURES,
    IMAGE_SHAPE,
    LABEL,
    DigitsOptions,
    digits_settings,
    load_digits_arrays,
    prepare_digits,
    site_ids,
    split_digits,
)
from shared.codec import CompressionSettings
from shared.protocol import TaskSpec


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_digits_arrays()[1]


def _all_rows(split) -> np.ndarray:
    return np.concatenate([split.global_test, *(np.concatenate(parts) for parts in split.sites.values())])


def test_split_is_deterministic(labels):
    a, b = split_digits(labels, 10, seed=0), split_digits(labels, 10, seed=0)
    assert list(a.sites) == list(b.sites) == site_ids(10)
    for site in a.sites:
        for x, y in zip(a.sites[site], b.sites[site], strict=True):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.global_test, b.global_test)
    other = split_digits(labels, 10, seed=1)
    assert any(not np.array_equal(a.sites[s][0], other.sites[s][0]) for s in a.sites), "the seed changes nothing"


@pytest.mark.parametrize("num_sites", [10, 4, 3])
def test_split_covers_every_row_exactly_once(labels, num_sites):
    split = split_digits(labels, num_sites)
    rows = _all_rows(split)
    assert rows.size == labels.size == 1797
    np.testing.assert_array_equal(np.sort(rows), np.arange(labels.size))
    for train, test in split.sites.values():
        assert train.size > 0 and test.size > 0


def test_split_is_non_iid_and_keeps_a_stratified_global_test(labels):
    split = split_digits(labels, 10)
    for site in split.sites:
        counts = np.bincount(labels[split.site_rows(site)], minlength=10)
        top3 = np.sort(counts)[-3:].sum()
        assert top3 >= 0.8 * counts.sum(), f"{site}: top-3 classes hold only {top3 / counts.sum():.0%}: {counts}"
        # and not trivially so: each site owns two classes and sees the others a little
        assert np.sort(counts)[-2:].sum() >= 0.8 * counts.sum()
    global_counts = np.bincount(labels[split.global_test], minlength=10)
    assert global_counts.min() >= 30, f"global test set is not stratified: {global_counts}"
    assert abs(split.global_test.size - 0.2 * labels.size) <= 10


def test_prepared_csvs_load_as_8x8_images(tmp_path, labels):
    split = prepare_digits(tmp_path)
    task = TaskSpec(features=FEATURES, label=LABEL, standardize=False, input_shape=IMAGE_SHAPE)
    total = 0
    for site, (train, test) in split.sites.items():
        data = load_dataset(tmp_path / f"{site}_train.csv", tmp_path / f"{site}_test.csv", task)
        assert data.x_train.shape == (train.size, 1, 8, 8) and data.x_test.shape == (test.size, 1, 8, 8)
        assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
        np.testing.assert_array_equal(data.y_train, labels[train])
        np.testing.assert_array_equal(data.y_test, labels[test])
        total += train.size + test.size
    assert total + split.global_test.size == labels.size
    before = (tmp_path / "site03_train.csv").read_bytes()
    prepare_digits(tmp_path)  # same parameters: nothing rewritten, same bytes
    assert (tmp_path / "site03_train.csv").read_bytes() == before


def test_digits_settings_describe_the_cnn_federation(tmp_path):
    compression = CompressionSettings(mode="sparse", topk_fraction=0.01)
    orch, agents = digits_settings("mqtt://127.0.0.1:1", tmp_path, 7, compression, DigitsOptions(sites=4))
    assert orch.architecture == "cnn" and orch.task_input_shape == [1, 8, 8] and orch.num_outputs == 10
    assert orch.standardize is False and orch.rounds == 7 and orch.min_sites == 4
    assert orch.training.loss == "cross_entropy" and orch.training.compression == compression
    assert [a.site_id for a in agents] == site_ids(4)
    assert all(a.data_train.exists() and a.data_test.exists() for a in agents)
