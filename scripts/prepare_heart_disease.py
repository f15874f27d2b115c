"""Rebuild the per-hospital Heart Disease CSVs shipped in fedmq/data/heart_disease/.

Follows FLamby's Fed-Heart-Disease preprocessing (see the README beside the data) so our
figures compare with the published benchmark: drop slope/ca/thal, drop rows with missing
values, binarise the label, one-hot cp and restecg (first level dropped), stratified 66/34
split with random_state 43 per hospital
(unstratified where a class has one member). Standardisation is NOT baked in: each agent
standardises with its own hospital's train statistics (data adapter setting).
Run: python scripts/prepare_heart_disease.py
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

DATA = Path(__file__).resolve().parent.parent / "fedmq" / "data" / "heart_disease"
SITES = {"cleveland": "cleveland", "hungary": "hungarian", "switzerland": "switzerland", "va": "va"}
COLUMNS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak",
           "slope", "ca", "thal", "num"]
NUMERIC = ["age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak"]
ONE_HOT = {"cp": [2, 3, 4], "restecg": [1, 2]}  # level 1 of cp and level 0 of restecg dropped
FEATURES = NUMERIC + [f"{c}_{v}" for c, levels in ONE_HOT.items() for v in levels]


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = []
    for raw in csv.reader(path.read_text().splitlines()):
        rec = dict(zip(COLUMNS, raw, strict=True))
        del rec["slope"], rec["ca"], rec["thal"]
        if "?" in rec.values():
            continue
        vals = {k: float(v) for k, v in rec.items()}
        feats = [vals[c] for c in NUMERIC]
        feats += [1.0 if vals[c] == v else 0.0 for c, levels in ONE_HOT.items() for v in levels]
        rows.append((feats, 1 if vals["num"] > 0 else 0))
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


def write(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FEATURES + ["label"])
        for feats, label in zip(x, y):
            w.writerow([f"{v:g}" for v in feats] + [int(label)])


def main() -> None:
    for site, stem in SITES.items():
        x, y = load(DATA / "raw" / f"processed.{stem}.data")
        # Zurich/Basel has a single negative case: stratification is impossible there.
        stratify = y if np.bincount(y).min() >= 2 else None
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.34, random_state=43, stratify=stratify)
        write(DATA / f"{site}_train.csv", x_tr, y_tr)
        write(DATA / f"{site}_test.csv", x_te, y_te)
        print(f"{site}: {len(y)} rows -> train {len(y_tr)} / test {len(y_te)}")


if __name__ == "__main__":
    main()
