"""Data adapters: a hospital's own CSV files, read and checked locally; rows never leave the site.

The round command names the task's features and label; the adapter checks them against the
file's header and says exactly what is missing, so a mismatch between what the federation
expects and what a hospital exported is caught before any training.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.protocol import TaskSpec


class DataError(ValueError):
    """Local data that does not fit the task; the message names the file, row and column."""


@dataclass(frozen=True)
class LocalDataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None

    @property
    def num_train(self) -> int:
        return len(self.y_train)


def count_rows(path: Path) -> int | None:
    """Training rows, announced before any round so a secure sum can be weighted; None if unreadable.

    Counts what ``read_csv`` keeps (every non-empty row after the header), without parsing cells.
    """
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            if next(reader, None) is None:
                return None
            return sum(1 for row in reader if row)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def read_csv(path: Path, features: list[str], label: str) -> tuple[np.ndarray, np.ndarray]:
    """Features in the task's order and the label, as float32, with a clear error on any bad cell."""
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty; it needs a header row naming the columns")
            header = [h.strip() for h in header]
            missing = [c for c in [*features, label] if c not in header]
            if missing:
                raise DataError(f"{path} lacks the columns {missing} that the task needs (it has {header}); "
                                "export them or map the label with FEDMQ_LABEL_COLUMN")
            cols = [header.index(c) for c in [*features, label]]
            rows = []
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                try:
                    values = [float(row[i]) for i in cols]
                except (ValueError, IndexError):
                    raise DataError(f"{path}:{lineno}: a needed cell is missing or not a number") from None
                if not all(math.isfinite(v) for v in values):
                    raise DataError(f"{path}:{lineno}: a needed cell is NaN or infinite")
                rows.append(values)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path} is not a UTF-8 CSV file ({e}); export it as UTF-8 CSV") from None
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    arr = np.asarray(rows, dtype=np.float32)
    return arr[:, :-1], arr[:, -1]


def load_dataset(train: Path, test: Path | None, task: TaskSpec, label_column: str | None = None) -> LocalDataset:
    """Read train (and test) CSVs; standardise with the train split's own statistics if the task asks."""
    label = label_column or task.label
    x_train, y_train = read_csv(train, task.features, label)
    x_test, y_test = read_csv(test, task.features, label) if test is not None else (None, None)
    if task.standardize:
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0
        x_train = (x_train - mean) / std
        if x_test is not None:
            x_test = (x_test - mean) / std
    if task.input_shape:
        shape = tuple(task.input_shape)
        if int(np.prod(shape)) != len(task.features):
            raise DataError(f"the task's input shape {list(shape)} does not hold its {len(task.features)} features")
        x_train = x_train.reshape(-1, *shape)
        x_test = x_test.reshape(-1, *shape) if x_test is not None else None
    return LocalDataset(x_train, y_train, x_test, y_test)
