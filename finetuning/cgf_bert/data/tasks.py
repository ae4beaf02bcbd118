"""Tasks: what a GLUE task's data, labels and metrics are, behind a registry (MRPC today).

A ``Task`` names how its splits are read (a folder of GLUE TSVs, else the hub), its label
names, its metrics and the metric the best epoch is selected on. A run's identity holds its
task and the fingerprint of the data it read, so a record is reused only for the same task on
the same data (``train.sweeps.find_record``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from datasets import DatasetDict

from cgf_bert.data import glue
from cgf_bert.registry import Registry


def classification_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and F1 of the positive class (label 1 = paraphrase), as GLUE reports MRPC."""
    tp = int(((preds == 1) & (labels == 1)).sum())
    fp = int(((preds == 1) & (labels == 0)).sum())
    fn = int(((preds == 0) & (labels == 1)).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"accuracy": float((preds == labels).mean()), "f1": f1}


@dataclass(frozen=True)
class Task:
    """A sentence-pair classification task and everything a run needs to know about its data."""

    name: str
    load: Callable[[str | Path | None], DatasetDict]  # data folder (None: the default) -> train/validation[/test]
    labels: tuple[str, ...]  # label names, index = label id
    metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]]  # (predictions, labels) -> figures
    selection: str  # the figure the best epoch is chosen on (higher is better)
    # The fingerprint of the data every record without one ran on (the loader's migration rule).
    reference_fingerprint: str

    @property
    def num_labels(self) -> int:
        return len(self.labels)


TASKS: Registry[Task] = Registry("task")


def get_task(name: str) -> Task:
    return TASKS.lookup(name)


def fingerprint(ds: DatasetDict) -> str:
    """sha256 (16 hex digits) of every split's rows in order: the same data read from anywhere
    gives the same fingerprint, and a changed row changes it."""
    h = hashlib.sha256()
    for split in sorted(ds):
        h.update(split.encode())
        for row in ds[split].to_list():
            h.update(json.dumps(row, sort_keys=True).encode())
    return h.hexdigest()[:16]


@lru_cache(maxsize=16)
def data_fingerprint(task: str, data_dir: str | None) -> str:
    """The fingerprint of ``task``'s data as a run with ``--data-dir data_dir`` reads it (read once)."""
    return fingerprint(get_task(task).load(data_dir))


# GLUE MRPC as the shared TSVs hold it (train 3,668, dev 408, test 1,725 rows); every committed
# record made before fingerprints ran on these files (data_dir null, the shared folder present).
TASKS["mrpc"] = Task("mrpc", glue.load_mrpc, ("not_equivalent", "equivalent"), classification_metrics, "accuracy",
                     reference_fingerprint="081880c4e86c7ba9")
