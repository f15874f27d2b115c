"""The CSV adapter: the shipped Heart Disease splits, standardisation, and clear errors for bad files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import fedmq
from edge_agent.data import DataError, load_dataset, read_csv
from shared.protocol import TaskSpec

HEART = Path(fedmq.__file__).parent / "data" / "heart_disease"
FEATURES = ["age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak", "cp_2", "cp_3", "cp_4",
            "restecg_1", "restecg_2"]
TASK = TaskSpec(features=FEATURES, label="label")
# README: 66/34 split per hospital
ROWS = {"cleveland": (199, 104), "hungary": (172, 89), "switzerland": (30, 16), "va": (85, 45)}


def _raw(path: Path) -> np.ndarray:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return np.asarray([[float(r[c]) for c in FEATURES] for r in rows], dtype=np.float64)


@pytest.mark.parametrize("site", sorted(ROWS))
def test_shipped_heart_disease_split(site: str) -> None:
    train, test = HEART / f"{site}_train.csv", HEART / f"{site}_test.csv"
    data = load_dataset(train, test, TASK)
    assert data.x_train.shape == (ROWS[site][0], 13)
    assert data.x_test is not None and data.y_test is not None
    assert data.x_test.shape == (ROWS[site][1], 13)
    assert data.num_train == ROWS[site][0]
    assert data.x_train.dtype == np.float32
    assert set(np.unique(data.y_train)) <= {0.0, 1.0}
    # standardised with the train split's statistics: mean 0, std 1 (a constant column stays all zero)
    raw_train = _raw(train)
    constant = raw_train.std(axis=0) == 0
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.std(axis=0)[~constant], 1.0, atol=1e-4)
    np.testing.assert_allclose(data.x_train[:, constant], 0.0)
    # ... and the test split is transformed with the same (train) statistics, not its own
    std = raw_train.std(axis=0)
    std[constant] = 1.0
    expected_test = (_raw(test) - raw_train.mean(axis=0)) / std
    np.testing.assert_allclose(data.x_test, expected_test, rtol=1e-4, atol=1e-4)


def test_switzerland_has_a_constant_column_that_does_not_become_nan() -> None:
    data = load_dataset(HEART / "switzerland_train.csv", None, TASK)
    chol = FEATURES.index("chol")
    assert _raw(HEART / "switzerland_train.csv")[:, chol].std() == 0  # every cholesterol recorded as 0
    assert np.isfinite(data.x_train).all()
    np.testing.assert_array_equal(data.x_train[:, chol], 0.0)
    assert data.x_test is None and data.y_test is None


def test_no_standardisation_keeps_raw_values() -> None:
    task = TaskSpec(features=["age", "chol"], label="label", standardize=False)
    data = load_dataset(HEART / "cleveland_train.csv", None, task)
    np.testing.assert_allclose(data.x_train, _raw(HEART / "cleveland_train.csv")[:, [0, 3]])


def _csv(tmp_path: Path, text: str | bytes, name: str = "site.csv") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


SMALL = TaskSpec(features=["a", "b"], label="label", standardize=False)


def test_features_follow_the_task_order_not_the_file_order(tmp_path: Path) -> None:
    path = _csv(tmp_path, "label,b,extra,a\n1,2,x,3\n0,5,y,6\n")
    x, y = read_csv(path, ["a", "b"], "label")
    np.testing.assert_array_equal(x, [[3, 2], [6, 5]])
    np.testing.assert_array_equal(y, [1, 0])


def test_header_whitespace_and_blank_lines_tolerated(tmp_path: Path) -> None:
    path = _csv(tmp_path, " a , b ,label\n1,2,0\n\n3,4,1\n")
    x, y = read_csv(path, ["a", "b"], "label")
    assert x.shape == (2, 2) and list(y) == [0, 1]


def test_missing_columns_are_listed(tmp_path: Path) -> None:
    path = _csv(tmp_path, "a,target\n1,0\n")
    with pytest.raises(DataError) as info:
        load_dataset(path, None, SMALL)
    message = str(info.value)
    assert "lacks the columns ['b', 'label']" in message
    assert str(path) in message and "FEDMQ_LABEL_COLUMN" in message


def test_non_numeric_cell_names_file_and_line(tmp_path: Path) -> None:
    path = _csv(tmp_path, "a,b,label\n1,2,0\n3,four,1\n")
    with pytest.raises(DataError, match=rf"{path}:3: a needed cell is missing or not a number"):
        load_dataset(path, None, SMALL)


def test_short_row_names_file_and_line(tmp_path: Path) -> None:
    path = _csv(tmp_path, "a,b,label\n1,2,0\n1,2,0\n5\n")
    with pytest.raises(DataError, match=rf"{path}:4:"):
        load_dataset(path, None, SMALL)


@pytest.mark.parametrize("cell", ["nan", "NaN", "inf", "-inf"])
def test_nan_or_infinite_cell(tmp_path: Path, cell: str) -> None:
    path = _csv(tmp_path, f"a,b,label\n1,{cell},0\n")
    with pytest.raises(DataError, match=rf"{path}:2: a needed cell is NaN or infinite"):
        load_dataset(path, None, SMALL)


def test_bad_cell_in_an_unused_column_is_fine(tmp_path: Path) -> None:
    path = _csv(tmp_path, "a,b,notes,label\n1,2,n/a,0\n")
    x, _ = read_csv(path, ["a", "b"], "label")
    assert x.shape == (1, 2)


def test_empty_file(tmp_path: Path) -> None:
    path = _csv(tmp_path, "")
    with pytest.raises(DataError, match=rf"{path} is empty; it needs a header row"):
        load_dataset(path, None, SMALL)


def test_header_only(tmp_path: Path) -> None:
    path = _csv(tmp_path, "a,b,label\n")
    with pytest.raises(DataError, match=rf"{path} has a header but no rows"):
        load_dataset(path, None, SMALL)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot read .*absent.csv"):
        load_dataset(tmp_path / "absent.csv", None, SMALL)


def test_bad_test_file_is_reported_too(tmp_path: Path) -> None:
    train = _csv(tmp_path, "a,b,label\n1,2,0\n", "train.csv")
    test = _csv(tmp_path, "a,label\n1,0\n", "test.csv")
    with pytest.raises(DataError, match=r"test.csv lacks the columns \['b'\]"):
        load_dataset(train, test, SMALL)


def test_non_utf8_file_is_a_data_error(tmp_path: Path) -> None:
    path = _csv(tmp_path, "a,b,label,note\n1,2,0,Z\xfcrich\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{path} is not a UTF-8 CSV file"):
        load_dataset(path, None, SMALL)


def test_label_column_mapping(tmp_path: Path) -> None:
    path = _csv(tmp_path, "a,b,diagnosis\n1,2,1\n3,4,0\n")
    with pytest.raises(DataError, match=r"lacks the columns \['label'\]"):
        load_dataset(path, None, SMALL)
    data = load_dataset(path, None, SMALL, label_column="diagnosis")
    np.testing.assert_array_equal(data.y_train, [1, 0])
    np.testing.assert_array_equal(data.x_train, [[1, 2], [3, 4]])
