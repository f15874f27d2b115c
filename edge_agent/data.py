"""Data adapters: a hospital's own CSV files, read and checked locally; rows never leave the site.

The round command names the task's features and label; the adapter checks them against the
file's header and says exactly what is missing, so a mismatch between what the federation
expects and what a hospital exported is caught before any training.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.protocol import DataSummary, TaskSpec

MAX_LABEL_CLASSES = 100
"""A label with more distinct values is a regression target: its balance is not summarized."""


class DataError(ValueError):
    """Local data that does not fit the task; the message names the file, row and column.

    ``public`` says the same without local paths or the file's column list: what the site may
    publish on its status topic (``code`` is its monitoring error code, see ``ERROR_CODES``).
    """

    def __init__(self, message: str, public: str, code: str = "data.invalid") -> None:
        super().__init__(message)
        self.public = public
        self.code = code


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


def read_csv(path: Path, features: list[str], label: str, role: str = "training") -> tuple[np.ndarray, np.ndarray]:
    """Features in the task's order and the label, as float32, with a clear error on any bad cell.

    ``role`` ("training", "test") names the file in the error's public text, which has no path.
    """
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty; it needs a header row naming the columns",
                                f"the {role} CSV is empty; it needs a header row naming the columns")
            header = [h.strip() for h in header]
            missing = [c for c in [*features, label] if c not in header]
            if missing:
                raise DataError(f"{path} lacks the columns {missing} that the task needs (it has {header}); "
                                "export them or map the label with FEDMQ_LABEL_COLUMN",
                                f"the {role} CSV lacks the columns {missing} that the task needs; export them or "
                                "map the label with FEDMQ_LABEL_COLUMN")
            cols = [header.index(c) for c in [*features, label]]
            rows = []
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                try:
                    values = [float(row[i]) for i in cols]
                except (ValueError, IndexError):
                    raise DataError(f"{path}:{lineno}: a needed cell is missing or not a number",
                                    f"the {role} CSV, line {lineno}: a needed cell is missing or not a number") \
                        from None
                if not all(math.isfinite(v) for v in values):
                    raise DataError(f"{path}:{lineno}: a needed cell is NaN or infinite",
                                    f"the {role} CSV, line {lineno}: a needed cell is NaN or infinite")
                rows.append(values)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}", f"cannot read the {role} CSV ({e.strerror or 'I/O error'})",
                        "data.unreadable") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path} is not a UTF-8 CSV file ({e}); export it as UTF-8 CSV",
                        f"the {role} CSV is not a UTF-8 CSV file; export it as UTF-8 CSV", "data.unreadable") from None
    if not rows:
        raise DataError(f"{path} has a header but no rows", f"the {role} CSV has a header but no rows")
    arr = np.asarray(rows, dtype=np.float32)
    return arr[:, :-1], arr[:, -1]


def load_dataset(train: Path, test: Path | None, task: TaskSpec, label_column: str | None = None) -> LocalDataset:
    """Read train (and test) CSVs; standardise with the train split's own statistics if the task asks."""
    label = label_column or task.label
    x_train, y_train = read_csv(train, task.features, label)
    x_test, y_test = read_csv(test, task.features, label, "test") if test is not None else (None, None)
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
            problem = f"the task's input shape {list(shape)} does not hold its {len(task.features)} features"
            raise DataError(problem, problem)
        x_train = x_train.reshape(-1, *shape)
        x_test = x_test.reshape(-1, *shape) if x_test is not None else None
    return LocalDataset(x_train, y_train, x_test, y_test)


def summarize(train: Path, test: Path | None, label: str | None) -> DataSummary | None:
    """What a monitor may know of the site's data: row counts, a hash of the column schema, label counts.

    The schema hash covers the training CSV's column names in order, each with the type of its
    first value (number or text), so two sites exporting differently show different hashes.
    Label counts (only when ``label`` is a column and has at most ``MAX_LABEL_CLASSES`` values)
    are counts, never rows. None when the training file cannot be read: the round's load says why.
    """
    try:
        with train.open(newline="") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, None) or []]
            if not header:
                return None
            rows = labels = 0
            first: list[str] | None = None
            counts: Counter[str] = Counter()
            column = header.index(label) if label in header else None
            for row in reader:
                if not row:
                    continue
                rows += 1
                first = first or row
                if column is not None and column < len(row) and len(counts) <= MAX_LABEL_CLASSES:
                    counts[_label_key(row[column])] += 1
                    labels += 1
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    types = [_cell_type(first[i]) if first is not None and i < len(first) else "none" for i in range(len(header))]
    schema = "\n".join(f"{name}:{kind}" for name, kind in zip(header, types))
    return DataSummary(rows_train=rows, rows_test=count_rows(test) if test is not None else None,
                       schema_hash=hashlib.sha256(schema.encode()).hexdigest()[:16],
                       label_counts=dict(counts) if len(counts) <= MAX_LABEL_CLASSES and labels == rows else {})


def _cell_type(cell: str) -> str:
    try:
        float(cell)
    except ValueError:
        return "text"
    return "number"


def _label_key(cell: str) -> str:
    """One key per class however the file writes it ("1", "1.0")."""
    try:
        return f"{float(cell):g}"
    except ValueError:
        return cell.strip()
