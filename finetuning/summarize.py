"""Rebuild the tables in summary.md, and the paired-difference plot, from the run records in results/.

    cd finetuning && python summarize.py
"""

from cgf_bert.cli import ArgumentParser, run_main
from cgf_bert.report.summary import rebuild
from cgf_bert.store.provenance import REPO_ROOT, RESULTS_DIR


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--summary", default=str(REPO_ROOT / "summary.md"), help="markdown file with table markers (default: %(default)s)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="run records (default: %(default)s)")
    args = p.parse_args()
    n, png = rebuild(args.summary, args.results_dir)
    print(f"rebuilt the tables in {args.summary} from {n} run records")
    print(f"plot: {png}" if png else "no plot yet: no CGF row shares a seed with the exact row")


if __name__ == "__main__":
    run_main(main)
