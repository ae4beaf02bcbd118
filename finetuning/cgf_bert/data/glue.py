"""MRPC as a ``datasets.DatasetDict`` with the glue/mrpc schema, tokenized and batched."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from cgf_bert import CgfBertError

log = logging.getLogger(__name__)

DATA_ENV = "CGF_BERT_DATA_DIR"  # environment variable naming a folder of MRPC TSVs
SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
FEATURES = Features(
    {
        "sentence1": Value("string"),
        "sentence2": Value("string"),
        "label": ClassLabel(names=["not_equivalent", "equivalent"]),
        "idx": Value("int32"),
    }
)
# Where the repository sits beside the shared data (as on the developers' machines and CI).
_SHARED_MRPC = Path(__file__).resolve().parents[4] / "shared" / "data" / "mrpc"


def read_mrpc_tsv(path: str | Path, labeled: bool = True) -> dict[str, list]:
    """Read one GLUE MRPC TSV into columns; a malformed row is an error naming file and line.

    The files start with a byte-order mark and contain unbalanced quotes, hence
    ``utf-8-sig`` and no quote handling. Unlabeled (test) rows get label -1 and keep
    GLUE's ``index`` as ``idx``. Every line after the header is a row: a blank or short
    line is an error, never skipped. Lines end at ``\\n``, ``\\r\\n`` or ``\\r``, as an editor counts them.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()  # under 1 MB; decoding it whole lets a bad byte be placed on its line
    except OSError as e:
        raise CgfBertError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1
        raise CgfBertError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    cols: dict[str, list] = {"sentence1": [], "sentence2": [], "label": [], "idx": []}
    try:
        header = next(rows, None)
        if header is None or len(header) != 5:
            raise CgfBertError(f"{path}:1: expected a 5-column GLUE MRPC header, got {header!r}")
        for row in rows:
            _append_row(cols, row, labeled, f"{path}:{rows.line_num}")
    except csv.Error as e:  # a field over csv's size limit
        raise CgfBertError(f"{path}:{max(rows.line_num, 1)}: {e}") from None
    if not cols["idx"]:
        raise CgfBertError(f"{path}: no data rows")
    return cols


def _append_row(cols: dict[str, list], row: list[str], labeled: bool, where: str) -> None:
    """One row's fields into ``cols``; ``where`` is 'file:line' for the error."""
    if len(row) != 5:
        raise CgfBertError(f"{where}: expected 5 tab-separated fields, got {len(row)}")
    first = row[0].strip()
    if labeled and first not in ("0", "1"):
        raise CgfBertError(f"{where}: label must be 0 or 1, got {first!r}")
    # isdigit() alone takes '²' and other digits int() refuses; idx is an int32 column
    if not labeled and not (first.isascii() and first.isdigit() and int(first) < 2**31):
        raise CgfBertError(f"{where}: index must be an integer from 0 to 2^31 - 1, got {first!r}")
    cols["sentence1"].append(row[3])
    cols["sentence2"].append(row[4])
    cols["label"].append(int(first) if labeled else -1)
    cols["idx"].append(len(cols["idx"]) if labeled else int(first))


def default_data_dir() -> Path | None:
    """$CGF_BERT_DATA_DIR, else the shared MRPC folder beside the repository, else None (hub)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return _SHARED_MRPC if _SHARED_MRPC.is_dir() else None


def load_mrpc(data_dir: str | Path | None = None) -> DatasetDict:
    """MRPC train/validation/test from a folder of GLUE TSVs, or from the hub if no folder."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if data_dir is None:
        return _load_from_hub()
    if not data_dir.is_dir():
        raise CgfBertError(f"MRPC data folder not found: {data_dir}")
    missing = [n for n in ("train.tsv", "dev.tsv") if not (data_dir / n).is_file()]
    if missing:
        raise CgfBertError(f"MRPC data folder {data_dir} lacks {', '.join(missing)}")
    splits = {}
    for split, name in SPLIT_FILES.items():
        if (data_dir / name).is_file():
            splits[split] = Dataset.from_dict(read_mrpc_tsv(data_dir / name, labeled=split != "test"), features=FEATURES)
    return DatasetDict(splits)


def _load_from_hub() -> DatasetDict:
    from datasets import load_dataset

    try:
        return load_dataset("nyu-mll/glue", "mrpc")
    except Exception as e:
        raise CgfBertError(
            f"no MRPC folder given and the hub is unreachable ({type(e).__name__}); "
            f"pass --data-dir or set ${DATA_ENV}"
        ) from None








