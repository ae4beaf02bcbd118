"""Score an exported folder the way its users will load it: plain transformers (after ``import
cgf_bert``), the folder's own tokenizer, MRPC dev read from the GLUE TSVs. Run in a fresh process
by ``export.py --verify`` so that nothing of the exporting process (its model, its registries) helps:

    python -m cgf_bert.hub.verify FOLDER [--data-dir DIR]   # prints {"accuracy": ..., "f1": ..., "examples": ...}
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import cgf_bert  # noqa: F401  registers the cgf_bert model type
from cgf_bert.data.tasks import classification_metrics, get_task


def score(folder: str, data_dir: str | None = None, batch_size: int = 64, max_length: int = 128) -> dict:
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    dev = get_task("mrpc").load(data_dir)["validation"]
    preds = []
    for i in range(0, len(dev), batch_size):
        rows = dev[i:i + batch_size]
        batch = tok(rows["sentence1"], rows["sentence2"], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            preds.append(model(**batch).logits.argmax(-1).numpy())
    metrics = classification_metrics(np.concatenate(preds), np.asarray(dev["label"]))
    return {**metrics, "examples": len(dev), "class": type(model).__name__}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--data-dir")
    args = p.parse_args()
    print(json.dumps(score(args.folder, args.data_dir)))


if __name__ == "__main__":
    main()
