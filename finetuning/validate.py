"""Score a checkpoint on MRPC dev (accuracy, F1).

The replaced operations come from the checkpoint (per layer where it was trained so); --softmax
(--gelu, --layernorm, --pooler) and their parameter flags override them, e.g. to score an
exact-softmax model with CGF swapped in, or a CGF student with the polynomial exp an encrypted
evaluator runs, without training:

    cd finetuning
    python validate.py                                   # ../checkpoints_teacher/teacher.pt
    python validate.py ../checkpoints/run.pt --softmax cgf --coeff 0.5
    python validate.py ../checkpoints/run.pt --softmax cgf_poly --degree 8 --squarings 5
"""

import json

from cgf_bert.cli import ApproxFlags, ArgumentParser, field_type, run_main
from cgf_bert.config import TEACHER_PATH, TrainConfig
from cgf_bert.store.provenance import RESULTS_DIR
from cgf_bert.train.recipes import record_score, score


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", nargs="?", default=TEACHER_PATH, help="checkpoint to score (default: %(default)s)")
    ApproxFlags.add(p, None)  # no --softmax, --gelu, ...: the checkpoint's own
    p.add_argument("--data-dir", help="folder of GLUE MRPC TSVs (default: $CGF_BERT_DATA_DIR or ../shared/data/mrpc)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=field_type(TrainConfig, "eval_batch_size"), default=128, help="evaluation batch size (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="the record goes to RESULTS_DIR/validate/ (default: %(default)s)")
    args = p.parse_args()
    override = ApproxFlags.overrides(args)  # the ops named here; the others as the checkpoint has them
    r = score(args.checkpoint, override, args.data_dir, args.device, args.batch_size)
    record_score(r, args.results_dir)
    if args.json:
        print(json.dumps(r, indent=1))
        return
    d, t = r["dev"], r["trained"]
    print(f"{args.checkpoint}: {r['label']}: dev accuracy {d['accuracy']:.4f}, F1 {d['f1']:.4f}, loss {d['loss']:.4f}")
    if "out_of_range" in r:
        o = r["out_of_range"]
        print(f"  inputs outside their polynomial's interval (every polynomial op): {o['outside']} of {o['entries']} ({o['outside'] / o['entries']:.2e})")
    if "dev" in t:
        print(f"  recorded at training (epoch {t['epoch']}): accuracy {t['dev']['accuracy']:.4f}, F1 {t['dev']['f1']:.4f}")


if __name__ == "__main__":
    run_main(main)
