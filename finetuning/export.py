"""Export a checkpoint as a Hugging Face transformers folder: config.json (the base BERT config with
the student's approximations under ``cgf_bert``), model.safetensors, the tokenizer and a model card
(README.md) generated from the run record.

    cd finetuning
    python export.py ../checkpoints/STUDENT.pt ../exported/student

Loading it back (plain transformers; the import registers the ``cgf_bert`` model type, without it
transformers refuses the folder):

    import cgf_bert
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained("../exported/student")

The folder also goes wherever this toolkit takes a checkpoint (``validate.py FOLDER``, ``--teacher``)
or a base model (``--model FOLDER``).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

from cgf_bert import CgfBertError
from cgf_bert.cli import ArgumentParser, note, run_main
from cgf_bert.hub.export import export
from cgf_bert.store.provenance import (
    RESULTS_DIR,
    code_version,
    command_line,
    repo_relative,
)
from cgf_bert.store.records import write_json


def verify(folder, data_dir) -> dict:
    """``cgf_bert.hub.verify`` in a fresh interpreter: the folder as its users load it."""
    cmd = [sys.executable, "-m", "cgf_bert.hub.verify", str(Path(folder).resolve()), *(["--data-dir", str(Path(data_dir).resolve())] if data_dir else [])]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        raise CgfBertError(f"{folder}: loading it in a fresh process failed: {(p.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(lines[-1])


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", metavar="CKPT", help="the checkpoint to export")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (created; must not hold files unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already holds files")
    p.add_argument("--verify", action="store_true",
                   help="then load the folder with plain transformers in a fresh process and score MRPC dev (a minute on two cores)")
    p.add_argument("--data-dir", help="MRPC TSV folder for --verify (default: $CGF_BERT_DATA_DIR or ../shared/data/mrpc)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the run records are (for the model card) (default: %(default)s)")
    args = p.parse_args()
    if args.verify and args.data_dir and not Path(args.data_dir).is_dir():  # OUT_DIR is export's first check, --results-dir the parser's
        raise CgfBertError(f"--data-dir {args.data_dir}: not a folder")
    out = export(args.checkpoint, args.out_dir, args.results_dir, args.overwrite)
    (note if args.verify else print)(f"exported {args.checkpoint} to {out} (config.json, model.safetensors, tokenizer, README.md)")
    if args.verify:
        got = verify(out, args.data_dir)
        recorded = json.loads((out / "config.json").read_text())["cgf_bert"]["checkpoint"].get("dev")  # the checkpoint's, as exported
        same = recorded is not None and abs(got["accuracy"] - recorded["accuracy"]) < 1e-9
        print(f"verified in a fresh process ({got['class']}): dev accuracy {got['accuracy']:.4f}, F1 {got['f1']:.4f} on {got['examples']} examples"
              + ("" if recorded is None else f"; the checkpoint's recorded {recorded['accuracy']:.4f}: " + ("the same" if same else "DIFFERENT")))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        rec = {"command": command_line(), "code_version": code_version(), "checkpoint": repo_relative(args.checkpoint),
               "folder": repo_relative(out), "verified_dev": got, "recorded_dev": recorded, "same_accuracy": same}
        note(f"saved {write_json(Path(args.results_dir) / 'export' / f'export-{stamp}.json', rec)}")
        if recorded is not None and not same:
            raise CgfBertError(f"{out}: the exported model scores {got['accuracy']:.4f} on dev, the checkpoint recorded {recorded['accuracy']:.4f}")


if __name__ == "__main__":
    run_main(main)
