"""The digits federation: scikit-learn's 8x8 handwritten digits split non-IID across sites.

An image task on real images for benchmarks and tests that need more than the Heart
Disease logistic regression: 1,797 8x8 grey-level digits (Alpaydin & Kaynak, UCI; shipped
inside scikit-learn, so ``load_digits`` works offline), a small CNN (``architecture="cnn"``,
about 119k parameters with the default head) and ten hospitals-that-are-not-hospitals that
each see mostly two classes.

The split is deterministic for a given seed:

1. a stratified ``global_test_fraction`` of all rows is held out as a shared global test
   set that no site trains on (``global_test.csv``);
2. every class ``c`` of the remaining pool has two *owner* sites, ``c % n`` and
   ``(c - 1) % n`` (with ten sites, site ``s`` owns classes ``s`` and ``s + 1 mod 10``);
   a ``dominance`` fraction of the class goes to its owners in equal parts, the rest is
   dealt round-robin to the other sites, so each site sees every class a little and two
   classes a lot;
3. each site's rows are shuffled and split into its own train and test CSVs
   (``site_test_fraction``).

Every row lands in exactly one CSV. The pooled accuracy the orchestrator reports is over
the sites' test sets (pooled from each site's counts), i.e. over the non-held-out rows'
test split; ``global_test.csv`` is for scoring a final model offline on a set no site has
seen.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.codec import CompressionSettings
from shared.config import AgentSettings, OrchestratorSettings
from shared.protocol import TrainingConfig

FEDERATION = "digits"
NUM_CLASSES = 10
IMAGE_SHAPE = [1, 8, 8]
FEATURES = [f"p{i}" for i in range(64)]
LABEL = "label"
DEFAULT_HIDDEN = (128, 64)
_PIXEL_MAX = 16.0  # load_digits stores grey levels 0..16


@dataclass(frozen=True)
class DigitsSplit:
    """Row indices into ``load_digits()`` arrays: per site (train, test) and the global test set."""

    sites: dict[str, tuple[np.ndarray, np.ndarray]]
    global_test: np.ndarray

    def site_rows(self, site: str) -> np.ndarray:
        train, test = self.sites[site]
        return np.concatenate([train, test])


@dataclass
class DigitsOptions:
    """Local training and split settings; the defaults are what the benchmark uses."""

    rounds: int = 30
    sites: int = 10
    seed: int = 0
    local_steps: int = 10
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    hidden: tuple[int, ...] = DEFAULT_HIDDEN
    dominance: float = 0.9
    global_test_fraction: float = 0.2
    site_test_fraction: float = 0.2
    round_timeout: float = 300.0
    federation: str = FEDERATION


def site_ids(n: int) -> list[str]:
    return [f"site{i:02d}" for i in range(n)]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(pixels scaled to [0, 1] as float32, shape (1797, 64); labels as int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn is a test/bench extra, not a runtime dependency
        raise RuntimeError("the digits federation needs scikit-learn (pip install 'fedmq[test]' "
                           "or pip install scikit-learn)") from e
    data = load_digits()
    return (data.data / _PIXEL_MAX).astype(np.float32), data.target.astype(np.int64)


def owners_of(label: int, num_sites: int) -> list[int]:
    """The sites that hold most of a class: ``label % n`` and ``(label - 1) % n`` (one site if n == 1)."""
    return sorted({label % num_sites, (label - 1) % num_sites})


def split_digits(labels: np.ndarray, num_sites: int = 10, *, seed: int = 0, dominance: float = 0.9,
                 global_test_fraction: float = 0.2, site_test_fraction: float = 0.2) -> DigitsSplit:
    """Deterministic non-IID split of row indices (see the module docstring)."""
    if num_sites < 1:
        raise ValueError(f"num_sites must be at least 1, got {num_sites}")
    if not 0.0 <= dominance <= 1.0:
        raise ValueError(f"dominance must be in [0, 1], got {dominance}")
    if not 0.0 <= global_test_fraction < 1.0 or not 0.0 < site_test_fraction < 1.0:
        raise ValueError("test fractions must be in [0, 1) (global) and (0, 1) (per site)")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    global_test: list[np.ndarray] = []
    per_site: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n_global = round(global_test_fraction * rows.size)
        global_test.append(rows[:n_global])
        pool = rows[n_global:]
        owners = owners_of(int(label), num_sites)
        others = [s for s in range(num_sites) if s not in owners]
        n_owned = pool.size if not others else round(dominance * pool.size)
        for share, site in zip(np.array_split(pool[:n_owned], len(owners)), owners, strict=True):
            per_site[site].append(share)
        rest = pool[n_owned:]
        if rest.size:
            # Start the deal at a class-dependent site so the leftovers spread evenly across sites.
            start = int(label) % len(others)
            for i, row in enumerate(rest):
                per_site[others[(start + i) % len(others)]].append(np.array([row]))
    sites = {}
    for site, parts in zip(site_ids(num_sites), per_site, strict=True):
        rows = rng.permutation(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
        n_test = max(1, round(site_test_fraction * rows.size)) if rows.size > 1 else 0
        sites[site] = (np.sort(rows[n_test:]), np.sort(rows[:n_test]))
    return DigitsSplit(sites, np.sort(np.concatenate(global_test)))


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*FEATURES, LABEL])
        for pixels, label in zip(x, y, strict=True):
            # k/16 is exact in binary, so repr round-trips; trailing ".0" trimmed for size.
            writer.writerow([*(format(float(v), "g") for v in pixels), int(label)])


def prepare_digits(directory: Path, num_sites: int = 10, *, seed: int = 0, dominance: float = 0.9,
                   global_test_fraction: float = 0.2, site_test_fraction: float = 0.2) -> DigitsSplit:
    """Write ``{site}_train.csv``, ``{site}_test.csv``, ``global_test.csv`` and ``split.json``.

    Rewritten only when the split parameters changed, so repeated calls are cheap.
    """
    directory = Path(directory)
    x, y = load_digits_arrays()
    split = split_digits(y, num_sites, seed=seed, dominance=dominance, global_test_fraction=global_test_fraction,
                         site_test_fraction=site_test_fraction)
    params = {"num_sites": num_sites, "seed": seed, "dominance": dominance,
              "global_test_fraction": global_test_fraction, "site_test_fraction": site_test_fraction,
              "rows": int(y.size)}
    marker = directory / "split.json"
    if marker.exists():
        try:
            if json.loads(marker.read_text()).get("params") == params:
                return split
        except (OSError, ValueError):
            pass
    directory.mkdir(parents=True, exist_ok=True)
    summary = {}
    for site, (train, test) in split.sites.items():
        _write_csv(directory / f"{site}_train.csv", x[train], y[train])
        _write_csv(directory / f"{site}_test.csv", x[test], y[test])
        counts = np.bincount(y[split.site_rows(site)], minlength=NUM_CLASSES)
        summary[site] = {"train": int(train.size), "test": int(test.size), "class_counts": counts.tolist()}
    _write_csv(directory / "global_test.csv", x[split.global_test], y[split.global_test])
    marker.write_text(json.dumps({"params": params, "sites": summary,
                                  "global_test": int(split.global_test.size)}, indent=1))
    return split


def digits_settings(broker_url: str, root: Path, rounds: int | None = None,
                    compression: CompressionSettings | None = None, opts: DigitsOptions | None = None, *,
                    mqtt_version: str = "5", data_dir: Path | None = None,
                    ) -> tuple[OrchestratorSettings, list[AgentSettings]]:
    """The digits federation: an orchestrator (CNN, FedAvg) and one agent per site with its own CSVs.

    Data goes to ``data_dir`` (default ``root / "data"``); state to ``root / "orchestrator"``
    and ``root / {site}``. ``rounds`` overrides ``opts.rounds``; ``compression`` is what
    every round command asks the sites to do with their updates.
    """
    opts = opts or DigitsOptions()
    root = Path(root)
    data_dir = Path(data_dir) if data_dir is not None else root / "data"
    prepare_digits(data_dir, opts.sites, seed=opts.seed, dominance=opts.dominance,
                   global_test_fraction=opts.global_test_fraction, site_test_fraction=opts.site_test_fraction)
    common = {"broker_url": broker_url, "federation": opts.federation, "mqtt_version": mqtt_version}
    training = TrainingConfig(local_steps=opts.local_steps, batch_size=opts.batch_size,
                              learning_rate=opts.learning_rate, momentum=opts.momentum, loss="cross_entropy",
                              seed=opts.seed, compression=compression or CompressionSettings())
    sites = site_ids(opts.sites)
    orchestrator = OrchestratorSettings(
        **common, state_dir=root / "orchestrator", rounds=rounds if rounds is not None else opts.rounds,
        min_sites=len(sites), architecture="cnn", num_outputs=NUM_CLASSES, hidden=list(opts.hidden),
        task_features=FEATURES, task_label=LABEL, task_input_shape=IMAGE_SHAPE, standardize=False,
        training=training, exit_when_done=True, round_timeout=opts.round_timeout)
    agents = [AgentSettings(**common, site_id=site, state_dir=root / site,
                            data_train=data_dir / f"{site}_train.csv", data_test=data_dir / f"{site}_test.csv")
              for site in sites]
    return orchestrator, agents


def global_test_accuracy(model_bytes: bytes, data_dir: Path) -> float:
    """Accuracy of an ONNX model file on ``global_test.csv`` (rows no site trained or tested on)."""
    from edge_agent.data import read_csv
    from edge_agent.trainer import evaluate

    x, y = read_csv(Path(data_dir) / "global_test.csv", FEATURES, LABEL)
    metrics = evaluate(model_bytes, x.reshape(-1, *IMAGE_SHAPE), y, "cross_entropy")
    assert metrics.accuracy is not None
    return metrics.accuracy
