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

from cgf_bert.cli import ArgumentParser, run_main
from cgf_bert.hub.export import check_target, export
from cgf_bert.store.provenance import RESULTS_DIR


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", metavar="CKPT", help="the checkpoint to export")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (created; must not hold files unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already holds files")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the run records are (for the model card) (default: %(default)s)")
    args = p.parse_args()
    check_target(args.out_dir, args.overwrite)  # before the model loads
    out = export(args.checkpoint, args.out_dir, args.results_dir, args.overwrite)
    print(f"exported {args.checkpoint} to {out} (config.json, model.safetensors, tokenizer, README.md)")


if __name__ == "__main__":
    run_main(main)
