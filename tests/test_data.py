"""MRPC reading: GLUE pitfalls, clear errors naming file and line, batching."""

import pytest
import torch
from conftest import HEADER_LABELED

from cgf_bert import CgfBertError
from cgf_bert.data.glue import FEATURES, default_data_dir, load_mrpc, read_mrpc_tsv
from cgf_bert.data.loader import LengthGroupedSampler, load_tokenizer, make_loader, tokenize


def test_fixture_folder_loads_with_glue_schema(tiny_mrpc):
    ds = load_mrpc(tiny_mrpc)
    assert {k: len(v) for k, v in ds.items()} == {"train": 48, "validation": 24, "test": 10}
    assert ds["train"].features == FEATURES
    assert ds["train"][1]["sentence1"] == 'he said "the cat'  # unbalanced quote kept verbatim
    assert ds["train"][0]["sentence1"][0] != "\ufeff"  # BOM stripped
    assert ds["test"]["label"] == [-1] * 10 and ds["test"]["idx"] == list(range(10))


def _write(tmp_path, body):
    p = tmp_path / "train.tsv"
    p.write_text(HEADER_LABELED + "\n" + body, encoding="utf-8")
    return p


def test_wrong_field_count_names_file_and_line(tmp_path):
    p = _write(tmp_path, "1\t1\t2\ta\tb\n0\t1\t2\tonly four\n")
    with pytest.raises(CgfBertError, match=r"train\.tsv:3: expected 5 tab-separated fields, got 4"):
        read_mrpc_tsv(p)


def test_bad_label_names_file_and_line(tmp_path):
    p = _write(tmp_path, "yes\t1\t2\ta\tb\n")
    with pytest.raises(CgfBertError, match=r"train\.tsv:2: label must be 0 or 1"):
        read_mrpc_tsv(p)


def test_header_only_file(tmp_path):
    with pytest.raises(CgfBertError, match="no data rows"):
        read_mrpc_tsv(_write(tmp_path, ""))


def test_binary_file(tmp_path):
    p = tmp_path / "train.tsv"
    p.write_bytes(b"\xff\xfe\x00garbage\x9c" * 10)
    with pytest.raises(CgfBertError, match="train.tsv"):
        read_mrpc_tsv(p)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(CgfBertError, match="lacks train.tsv, dev.tsv"):
        load_mrpc(tmp_path)
    with pytest.raises(CgfBertError, match="not found"):
        load_mrpc(tmp_path / "absent")


def test_real_mrpc_files_have_glue_sizes():
    """The shared GLUE TSVs (what CI and the experiments use) read with the expected sizes."""
    folder = default_data_dir()
    assert folder is not None, "no MRPC folder: set CGF_BERT_DATA_DIR to the GLUE MRPC TSVs"
    ds = load_mrpc(folder)
    assert {k: len(v) for k, v in ds.items()} == {"train": 3668, "validation": 408, "test": 1725}
    assert round(sum(ds["validation"]["label"]) / 408, 3) == 0.684
    assert ds["test"]["idx"] == list(range(1725))


def test_real_mrpc_token_lengths():
    """summary.md's length facts: with the embedded model's tokenizer no pair exceeds 104
    tokens (so max_length 128 truncates nothing) and training pairs average about 53 tokens."""
    from cgf_bert.model.bert import resolve_model

    ds = tokenize(load_mrpc(default_data_dir()), load_tokenizer(resolve_model("minilm-l6")))
    lengths = [n for split in ds.values() for n in split["length"]]
    assert max(lengths) == 104 and max(ds["train"]["length"]) == 103
    assert 52 < sum(ds["train"]["length"]) / len(ds["train"]) < 54


def test_batches_are_padded_to_their_longest(tiny_bert, tiny_mrpc):
    tok = load_tokenizer(str(tiny_bert))
    ds = tokenize(load_mrpc(tiny_mrpc), tok, max_length=16)
    lengths = [len(x) for x in ds["train"]["input_ids"]]
    assert max(lengths) <= 16
    batch = next(iter(make_loader(ds["train"], tok, batch_size=8)))
    assert batch["input_ids"].shape == (8, max(lengths[:8]))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels", "idx"}
    assert (batch["attention_mask"].sum(1) == torch.tensor(lengths[:8])).all()


def test_eval_splits_are_sorted_by_length_and_keep_their_rows(tiny_bert, tiny_mrpc):
    tok = load_tokenizer(str(tiny_bert))
    raw = load_mrpc(tiny_mrpc)
    ds = tokenize(raw, tok)
    assert ds["train"]["idx"] == raw["train"]["idx"]  # training order is the sampler's business
    for split in ("validation", "test"):
        lengths = ds[split]["length"]
        assert lengths == sorted(lengths) and sorted(ds[split]["idx"]) == sorted(raw[split]["idx"])
        by_idx = {i: (x, y) for i, x, y in zip(raw[split]["idx"], raw[split]["sentence1"], raw[split]["label"])}
        for i, ids, y in zip(ds[split]["idx"], ds[split]["input_ids"], ds[split]["labels"]):
            assert by_idx[i][1] == y and ids == tok(by_idx[i][0], raw[split]["sentence2"][raw[split]["idx"].index(i)])["input_ids"]


def test_length_grouped_sampler_is_a_seeded_permutation():
    lengths = [int(x) for x in torch.randint(5, 120, (1000,), generator=torch.Generator().manual_seed(0))]
    s = LengthGroupedSampler(lengths, batch_size=16, seed=3)
    e1, e2 = list(s), list(s)
    for epoch in (e1, e2):
        assert sorted(i for b in epoch for i in b) == list(range(1000))  # every example once
        assert len(epoch) == len(s)
    assert e1 != e2  # reshuffled each epoch
    assert list(LengthGroupedSampler(lengths, 16, seed=3)) == e1  # same seed, same order
    pad = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in e1)
    rand = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    rand_pad = sum(16 * max(lengths[i] for i in rand[k : k + 16]) - sum(lengths[i] for i in rand[k : k + 16]) for k in range(0, 992, 16))
    assert pad < 0.2 * rand_pad
