"""Score a checkpoint on MRPC dev (accuracy, F1).

The softmax comes from the checkpoint; --softmax/--coeff override it, e.g. to score an
exact-softmax model with CGF swapped in, without training:

    cd finetuning
    python validate.py                                   # ../checkpoints_teacher/teacher.pt
    python validate.py ../checkpoints/run.pt --softmax cgf --coeff 0.5
"""

import argparse
import json

from cgf_bert.cli import run_main
from cgf_bert.config import TEACHER_PATH
from cgf_bert.records import RESULTS_DIR
from cgf_bert.runs import record_score, score
from cgf_bert.softmax import SOFTMAXES


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=TEACHER_PATH, help="checkpoint to score (default: %(default)s)")
    p.add_argument("--softmax", choices=sorted(SOFTMAXES), help="override the checkpoint's softmax")
    p.add_argument("--coeff", type=float, help="override the CGF coefficient")
    p.add_argument("--data-dir", help="folder of GLUE MRPC TSVs (default: $CGF_BERT_DATA_DIR or ../shared/data/mrpc)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=int, default=128, help="evaluation batch size (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="the record goes to RESULTS_DIR/validate/ (default: %(default)s)")
    args = p.parse_args()
    r = score(args.checkpoint, args.softmax, args.coeff, args.data_dir, args.device, args.batch_size)
    record_score(r, args.results_dir)
    if args.json:
        print(json.dumps(r, indent=1))
        return
    d, t = r["dev"], r["trained"]
    soft = "exact" if r["softmax"] == "exact" else f"cgf c={r['coeff']:g}"
    print(f"{args.checkpoint}: {soft}: dev accuracy {d['accuracy']:.4f}, F1 {d['f1']:.4f}, loss {d['loss']:.4f}")
    if "dev" in t:
        print(f"  recorded at training (epoch {t['epoch']}, {t['softmax']}): accuracy {t['dev']['accuracy']:.4f}, F1 {t['dev']['f1']:.4f}")


if __name__ == "__main__":
    run_main(main)
