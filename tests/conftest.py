"""Shared fixtures: a tiny random BERT saved like a pretrained one, and a tiny MRPC folder."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

WORDS = "the a cat dog sat ran on under mat rug big small red blue house car quickly slowly today it".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
HEADER_LABELED = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
HEADER_TEST = "index\t#1 ID\t#2 ID\t#1 String\t#2 String"


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
