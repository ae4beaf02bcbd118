"""torchrun: 2 CPU processes (gloo) train the same weights as one process with the same global
batch, including an epoch's last, odd-sized batch; rank 0 alone writes; sharding arithmetic."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SPECIAL, WORDS, tiny_config, write_mrpc
from transformers import BertModel, BertTokenizerFast

from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.config import TrainConfig
from cgf_bert.store.checkpoint import read_checkpoint
from cgf_bert.train import recipes
from cgf_bert.train.distributed import Dist, per_process_batch, shard

FINETUNING = Path(__file__).resolve().parents[1] / "finetuning"
# float32 weights after 10 AdamW steps. What differs between the runs is only the order in which
# the gradient's per-example terms are summed (within a process, then averaged over the two):
# measured 6e-8 at most. Without the shard weights of the odd last batch the same check
# measured 1.3e-4, so the tolerance separates right from wrong by two orders of magnitude.
ATOL, RTOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory) -> Path:
    """A tiny random BERT without dropout: each process draws its own dropout masks, so only
    without dropout are N processes the same computation as one."""
    path = tmp_path_factory.mktemp("tiny-bert-nodrop")
    (path / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    cfg = tiny_config()
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    return path


def test_two_gloo_processes_train_the_one_process_weights(no_dropout_bert, tmp_path):
    data = write_mrpc(tmp_path / "mrpc", n_train=47)  # batches of 10: four, then one of 7 (3 + 4 rows)
    common = ["--model", no_dropout_bert, "--data-dir", data, "--epochs", 2, "--batch-size", 10, "--lr", 2e-3,
              "--softmax", "cgf", "--coeff", 0.5]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "finetune.py",
           *common, "-o", tmp_path / "ddp.pt", "--results-dir", tmp_path / "ddp"]
    p = subprocess.run(list(map(str, cmd)), cwd=FINETUNING, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.count("best epoch") == 1  # rank 0 reports, rank 1 does not
    (rec_path,) = (tmp_path / "ddp").glob("*.json")  # one record, rank 0's
    ddp = json.loads(rec_path.read_text())
    assert ddp["processes"] == 2 and ddp["config"]["batch_size"] == 10

    cfg = TrainConfig(model=str(no_dropout_bert), data_dir=str(data), epochs=2, batch_size=10, lr=2e-3,
                      approx=Approximations(softmax=softmax_spec("cgf", coeff=0.5)))
    one = recipes.finetune(cfg, out=tmp_path / "one.pt", results_dir=tmp_path / "one")
    assert "processes" not in one
    a, b = read_checkpoint(tmp_path / "ddp.pt"), read_checkpoint(tmp_path / "one.pt")
    assert a[1]["epoch"] == b[1]["epoch"] == ddp["best_epoch"] == one["best_epoch"]
    for k in b[0]:
        torch.testing.assert_close(a[0][k], b[0][k], atol=ATOL, rtol=RTOL, msg=lambda m: f"{k}: {m}")
    query = "encoder.layer.0.attention.self.query.weight"
    moved = (b[0][f"bert.{query}"] - BertModel.from_pretrained(no_dropout_bert).state_dict()[query]).abs().max().item()
    assert moved > 100 * ATOL  # training moved the weights far more than the tolerance
    for e_ddp, e_one in zip(ddp["epochs"], one["epochs"]):  # the logged loss is the global batch's
        assert e_ddp["train"]["loss"] == pytest.approx(e_one["train"]["loss"], rel=1e-5)
        assert e_ddp["dev"] == e_one["dev"]


def test_shards_cover_the_batch_with_weights_that_make_the_batch_mean():
    batch = {"input_ids": torch.arange(7)[:, None], "labels": torch.arange(7)}
    parts = [shard(batch, Dist(rank=r, world=2)) for r in range(2)]
    assert [p[0]["labels"].tolist() for p in parts] == [[0, 1, 2], [3, 4, 5, 6]]
    assert [p[1] for p in parts] == [3 * 2 / 7, 4 * 2 / 7]  # n_r * N / n: the DDP average is the batch mean
    # fewer examples than processes: an empty share runs one row with weight 0
    parts = [shard({"input_ids": torch.arange(3)[:, None]}, Dist(rank=r, world=4)) for r in range(4)]
    assert [len(p[0]["input_ids"]) for p in parts] == [1, 1, 1, 1] and [p[1] for p in parts] == [0.0, 4 / 3, 4 / 3, 4 / 3]
    assert shard(batch, Dist())[0] is batch


def test_global_batch_must_split_evenly():
    assert per_process_batch(16, Dist(world=4)) == 4
    with pytest.raises(CgfBertError, match="--batch-size 16 is the global batch and must divide evenly over the 3 processes"):
        per_process_batch(16, Dist(world=3))
