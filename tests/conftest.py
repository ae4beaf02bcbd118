"""Shared fixtures: a tiny random BERT saved like a pretrained one, and a tiny MRPC folder."""

from __future__ import annotations

import importlib
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

WORDS = "the a cat dog sat ran on under mat rug big small red blue house car quickly slowly today it".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
HEADER_LABELED = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
HEADER_TEST = "index\t#1 ID\t#2 ID\t#1 String\t#2 String"
FINETUNING = Path(__file__).resolve().parents[1] / "finetuning"

# Under pytest-xdist each worker gets its share of the cores, and so do the processes it starts
# (OMP_NUM_THREADS is inherited): two workers of two threads each on two cores spin against each
# other, and a tiny BERT's double backward ran 20 times slower that way (0.7 min against 0.03).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_share)
    torch.set_num_threads(_share)


def tiny_config(vocab_size: int = len(SPECIAL) + len(WORDS)) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
    )


@pytest.fixture(autouse=True, scope="session")
def _checkpoints_in_tmp(tmp_path_factory):
    """Runs without ``-o`` write checkpoints here, not into the repository's checkpoints/."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CGF_BERT_CHECKPOINT_DIR", str(tmp_path_factory.mktemp("checkpoints")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A folder with a random 2-layer BERT and its tokenizer, loadable by ``--model``."""
    path = tmp_path_factory.mktemp("tiny-bert")
    (path / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(tiny_config()).save_pretrained(path)
    return path


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))


def write_mrpc(folder: Path, n_train: int = 48, n_dev: int = 24, n_test: int = 10, seed: int = 0) -> Path:
    """GLUE-format MRPC TSVs (with BOM and an unbalanced quote) where label 1 = same words."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def rows(n, labeled):
        out = []
        for i in range(n):
            s1 = _sentence(rng)
            label = i % 2
            s2 = " ".join(rng.sample(s1.split(), len(s1.split()))) if label else _sentence(rng)
            if i == 1:
                s1 = 'he said "the cat'  # unbalanced quote, as in the real files
            out.append(f"{label if labeled else i}\t{1000 + i}\t{2000 + i}\t{s1}\t{s2}")
        return out

    (folder / "train.tsv").write_text("\ufeff" + "\n".join([HEADER_LABELED, *rows(n_train, True)]) + "\n", encoding="utf-8")
    (folder / "dev.tsv").write_text("\ufeff" + "\n".join([HEADER_LABELED, *rows(n_dev, True)]) + "\n", encoding="utf-8")
    (folder / "test.tsv").write_text("\n".join([HEADER_TEST, *rows(n_test, False)]) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def tiny_mrpc(tmp_path_factory) -> Path:
    return write_mrpc(tmp_path_factory.mktemp("mrpc"))


def run_script(monkeypatch, capsys, target: str, *argv) -> tuple[int, str, str]:
    """A step script (``"validate.py"``) or module (``"experiments.poly_swap"``) run in this
    process as its command line would run it: its ``main`` under ``run_main``, from
    ``finetuning/``, with ``sys.argv`` (and so the recorded command) set. (exit code, stdout, stderr).

    What a subprocess adds (a fresh interpreter, the exit status the shell sees) is tested once
    per script by its end-to-end test; the rest call this and skip the seconds of start-up."""
    from cgf_bert.cli import run_main

    name = target.removesuffix(".py")
    module = importlib.import_module(name)  # finetuning/ is on sys.path (pyproject: pythonpath)
    script = target if target.endswith(".py") else Path(module.__file__).name
    monkeypatch.chdir(FINETUNING)
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    # command_line() reads a module run's name from __main__.__spec__, as ``python -m`` sets it
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None if target.endswith(".py") else module.__spec__)
    capsys.readouterr()  # what ran before is not this script's output
    code = 0
    try:
        run_main(module.main)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
