"""CE fine-tuning of BERT on MRPC with the exact or the CGF softmax (reference recipe by default).

    cd finetuning
    python finetune.py --softmax exact -o ../checkpoints_teacher/teacher.pt   # the teacher
    python finetune.py --softmax cgf --coeff 0.65 --seed 7                    # CGF baseline
    python finetune.py --softmax cgf --coeff 0.65 --seed 7 --resume           # the same run, after a kill
    torchrun --nproc-per-node 2 finetune.py --softmax cgf --coeff 0.65         # 2 processes, global batch 16
"""

from cgf_bert.cli import ArgumentParser, add_config_args, config_from_args, run_main
from cgf_bert.config import TrainConfig
from cgf_bert.store.provenance import RESULTS_DIR
from cgf_bert.train.distributed import is_main
from cgf_bert.train.recipes import finetune


def main():
    p = ArgumentParser(description=__doc__)
    add_config_args(p, TrainConfig)
    p.add_argument("-o", "--out", help="checkpoint path (default: ../checkpoints/<run name>.pt)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the run record goes (default: %(default)s)")
    p.add_argument("--resume", nargs="?", const=True, metavar="STATE",
                   help="continue this run after its last finished epoch, from the state it saved (this command's, "
                        "or the state file STATE); a finished run's record is reused, a run with no saved state starts afresh")
    args = p.parse_args()
    cfg = config_from_args(TrainConfig, args)
    rec = finetune(cfg, out=args.out, results_dir=args.results_dir, resume=args.resume)
    if not is_main():  # under torchrun, rank 0 reports
        return
    b = rec["best"]
    print(f"best epoch {rec['best_epoch']}: dev accuracy {b['accuracy']:.4f}, F1 {b['f1']:.4f} "
          f"({rec['wall_seconds'] / 60:.1f} min) -> {rec['checkpoint']}")


if __name__ == "__main__":
    run_main(main)
