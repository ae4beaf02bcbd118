"""Tokenized splits and their batches: tokenize once, pad each batch to its longest row."""

from __future__ import annotations

import warnings

import datasets
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader, Sampler
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cgf_bert import CgfBertError

Batch = dict[str, torch.Tensor]



def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}



def load_tokenizer(model_path: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise CgfBertError(f"cannot load a tokenizer from {model_path!r}: {str(e).splitlines()[0]}") from None


def tokenize(ds: DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int = 128) -> DatasetDict:
    """Tokenize sentence pairs once (unpadded; batches are padded to their longest).

    Each row gets its token count as ``length``. The evaluation splits (validation, test)
    are sorted by it, so that their fixed-order batches carry little padding; their rows
    keep ``idx`` (GLUE's ``index`` for test), and metrics do not depend on order.
    """

    def encode(batch):
        enc = tokenizer(batch["sentence1"], batch["sentence2"], truncation=True, max_length=max_length)
        enc["labels"] = batch["label"]
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return enc

    # About a second for all of MRPC, so no progress bar (it would only clutter error output).
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        out = ds.map(encode, batched=True, remove_columns=["sentence1", "sentence2", "label"])
        with warnings.catch_warnings():  # pyarrow's deprecation of an option datasets passes for us
            warnings.simplefilter("ignore", FutureWarning)
            return DatasetDict({k: v.sort(["length", "idx"]) if k != "train" else v for k, v in out.items()})
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


class LengthGroupedSampler(Sampler[list[int]]):
    """Batches of similar length: shuffle, sort within chunks of 50 batches, shuffle batches.

    Every example appears once per epoch and the order depends only on the seed and epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, chunk_batches: int = 50):
        self.lengths, self.batch_size, self.seed, self.chunk = lengths, batch_size, seed, chunk_batches * batch_size
        self.epoch = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        batches = []
        for start in range(0, len(order), self.chunk):
            chunk = sorted(order[start : start + self.chunk], key=lambda i: self.lengths[i], reverse=True)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield batches[b]

    def __len__(self):
        return sum(-(-min(self.chunk, len(self.lengths) - s) // self.batch_size) for s in range(0, len(self.lengths), self.chunk))


def make_loader(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    group_by_length: bool = False,
) -> DataLoader:
    """A DataLoader that pads each batch only to its longest sequence."""
    lengths = ds["length"] if "length" in ds.column_names else [len(x) for x in ds["input_ids"]]
    ds = ds.with_format(columns=[c for c in ("input_ids", "token_type_ids", "attention_mask", "labels", "idx") if c in ds.column_names])

    def collate(rows):
        return tokenizer.pad(rows, return_tensors="pt")

    pin = torch.cuda.is_available()
    if shuffle and group_by_length:
        sampler = LengthGroupedSampler(lengths, batch_size, seed)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=collate, pin_memory=pin)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=collate, pin_memory=pin)


