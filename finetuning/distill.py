"""Knowledge distillation from an exact-softmax teacher into a student with another softmax (CGF by default).

Loss = (1 - alpha) CE + alpha T^2 KL(teacher_T || student_T) + beta * hidden-state MSE
(embedding output and every layer, valid tokens only), plus any --loss NAME=WEIGHT terms.
The teacher is ../checkpoints_teacher/teacher.pt; when absent it is fine-tuned once and cached there.

    cd finetuning
    python distill.py --coeff 0.5 --beta 10 --seeds 42 7 123 1234 2026
    python distill.py --beta 0 --init teacher
    python distill.py --coeff 0.5 --beta 10 --seeds 42 7 123 1234 2026 --resume   # after a kill: finished seeds are reused
    torchrun --nproc-per-node 2 distill.py --beta 10                              # 2 processes, global batch 16
    python distill.py --softmax cgf_poly --degree 8 --squarings 5
"""

from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.softmax import softmax_spec
from cgf_bert.cli import ArgumentParser, add_config_args, config_from_args, field_type, run_main
from cgf_bert.config import TEACHER_PATH, DistillConfig, TrainConfig
from cgf_bert.report.stats import fmt_pm
from cgf_bert.store.names import variant_label
from cgf_bert.store.provenance import RESULTS_DIR
from cgf_bert.train.distributed import is_main
from cgf_bert.train.recipes import distill_seeds


def main():
    p = ArgumentParser(description=__doc__)
    add_config_args(p, TrainConfig, skip=("seed",), approx=Approximations(softmax=softmax_spec("cgf")))
    add_config_args(p, DistillConfig)
    p.add_argument("--seeds", type=field_type(TrainConfig, "seed"), nargs="+", default=[42], help="one student per seed (default: %(default)s)")
    p.add_argument("--teacher", default=TEACHER_PATH, help="exact-softmax teacher checkpoint (default: %(default)s)")
    p.add_argument("-o", "--out", help="student checkpoint path (one seed only; default: ../checkpoints/<run name>.pt)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="where run records go (default: %(default)s)")
    p.add_argument("--resume", nargs="?", const=True, metavar="STATE",
                   help="continue this run after its last finished epoch, from the state it saved (this command's, "
                        "or the state file STATE); a finished run's record is reused, a run with no saved state starts afresh")
    args = p.parse_args()
    if args.out and len(args.seeds) > 1:
        p.error("-o names one checkpoint; with several --seeds leave it out")
    if isinstance(args.resume, str) and len(args.seeds) > 1:
        p.error("--resume STATE names one run's state; with several --seeds give --resume alone")
    dcfg = config_from_args(DistillConfig, args)
    base = config_from_args(TrainConfig, args, seed=args.seeds[0])
    say = print if is_main() else lambda *a, **kw: None  # under torchrun, rank 0 reports
    records = []
    for rec in distill_seeds(base, dcfg, args.seeds, args.teacher, out=args.out, results_dir=args.results_dir, resume=args.resume):
        records.append(rec)
        seed = rec["seed"]
        b = rec["best"]
        say(f"seed {seed}: best epoch {rec['best_epoch']}: dev accuracy {b['accuracy']:.4f}, F1 {b['f1']:.4f} "
              f"({rec['wall_seconds'] / 60:.1f} min) -> {rec['checkpoint']}", flush=True)
    acc = [r["best"]["accuracy"] for r in records]
    f1 = [r["best"]["f1"] for r in records]
    say(f"{variant_label(base, dcfg)} over {len(records)} seed(s): "
          f"dev accuracy {fmt_pm(acc)}, F1 {fmt_pm(f1)} (points, mean ± std)")


if __name__ == "__main__":
    run_main(main)
