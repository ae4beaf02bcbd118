"""What would an encrypted evaluator of these checkpoints have to cover? Per layer and head on
MRPC dev: the CGF exp argument's range and share outside the polynomial exp's interval, how far
CGF row sums stray from 1, the GELU inputs and LayerNorm variances, and the attention KL to the
exact teacher. One JSON record, PNG plots beside it, a table per checkpoint.

    cd finetuning
    python -m experiments.attention_analysis STUDENT.pt --teacher ../checkpoints_teacher/teacher.pt
    python -m experiments.attention_analysis ../checkpoints_teacher/teacher.pt --as-softmax cgf:coeff=0.5 \\
        --interval -32 32 --interval -16 16 --interval -8 8
"""

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cgf_bert import CgfBertError
from cgf_bert.analysis.ranges import (
    DEFAULT_INTERVALS,
    PERCENTILES,
    analyse,
    attention_maps,
    format_table,
    kl_matrix,
    strict_json,
)
from cgf_bert.analysis.range_plots import plot_kl, plot_maps, plot_ranges
from cgf_bert.approx.softmax import VARIANCE_COEFF, parse_softmax
from cgf_bert.approx.spec import Spec
from cgf_bert.cli import ArgumentParser, Interval, field_type, number, run_main
from cgf_bert.config import TEACHER_PATH, TrainConfig
from cgf_bert.data.loader import make_loader
from cgf_bert.model.bert import BertMRPC
from cgf_bert.store.checkpoint import model_from_checkpoint, read_checkpoint
from cgf_bert.store.provenance import RESULTS_DIR, code_version, command_line, machine, repo_relative, uncommitted_files
from cgf_bert.store.records import write_json
from cgf_bert.train.engine import resolve_device
from cgf_bert.train.run import prepare_data
from cgf_bert.train.teacher import check_teacher

OUT_DIR = RESULTS_DIR / "analysis"  # records and plots of this module
BATCH_SIZE = 32  # dev batches; the (B, 12, T, T) float64 row-sum temporaries stay small at 32


def _spec(text: str) -> Spec:
    try:
        return parse_softmax(text)
    except CgfBertError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints to analyse (each against the teacher)")
    p.add_argument("--teacher", default=TEACHER_PATH, help="exact-softmax teacher of the same base model (default: %(default)s)")
    p.add_argument("--as-softmax", type=_spec, metavar="SPEC",
                   help="score every CKPT under this softmax instead of its own, e.g. cgf:coeff=0.5 (default: the checkpoint's)")
    p.add_argument("--coeff", type=number(float, "coeff", min=0.0), default=VARIANCE_COEFF,
                   help="c of the CGF argument shown for layers that run no CGF (the exact teacher's, say) (default: %(default)s)")
    p.add_argument("--interval", type=number(float, "interval"), action=Interval, metavar=("LO", "HI"),
                   help="exp-argument interval whose outside share is counted; repeatable, the first is drawn and tabled "
                        f"(default: {' '.join(f'{x:g}' for x in DEFAULT_INTERVALS[0])})")
    p.add_argument("--examples", type=number(int, "examples", min=1), help="use only the first N dev examples (default: all 408)")
    p.add_argument("--batch-size", type=field_type(TrainConfig, "eval_batch_size"), default=BATCH_SIZE, help="dev batch size (default: %(default)s)")
    p.add_argument("--max-length", type=field_type(TrainConfig, "max_length"), default=TrainConfig.max_length,
                   help="maximum tokens per pair, as in training (default: %(default)s)")
    p.add_argument("--data-dir", help="folder of GLUE MRPC TSVs (default: $CGF_BERT_DATA_DIR, ../shared/data/mrpc, then the hub)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--map-layer", type=number(int, "map-layer"), default=-1,
                   help="layer of the attention-map plot; negative counts from the end (default: %(default)s)")
    p.add_argument("--map-example", type=number(int, "map-example", min=0), default=0,
                   help="dev example (GLUE idx) of the attention-map plot (default: %(default)s)")
    p.add_argument("--out-dir", default=str(OUT_DIR), help="where the JSON record and the PNGs go (default: %(default)s)")
    args = p.parse_args(argv)
    args.interval = [tuple(iv) for iv in args.interval or DEFAULT_INTERVALS]
    return args


def read_all(args) -> tuple[dict, list[tuple[str, dict, dict]]]:
    """The teacher's checkpoint and every CKPT's, read and checked before any long work."""
    tstate, tmeta = read_checkpoint(args.teacher)
    check_teacher(tmeta, args.teacher, tmeta["model"])
    students = []
    for path in args.checkpoints:
        state, meta = read_checkpoint(path)
        if meta["model"] != tmeta["model"]:
            raise CgfBertError(f"{path} was fine-tuned from {meta['model']!r}, the teacher {args.teacher} from "
                               f"{tmeta['model']!r}: attention maps compare only on the same base model")
        students.append((path, state, meta))
    return {"state": tstate, "meta": tmeta}, students


def map_example(data, idx: int) -> int:
    """The row of dev example ``idx`` (GLUE's index) in the loaded, length-sorted dev split."""
    ids = data["validation"]["idx"]
    if idx not in ids:
        raise CgfBertError(f"--map-example {idx} is not among the {len(ids)} dev examples loaded")
    return ids.index(idx)


@dataclass(frozen=True)
class Plotting:
    """What every checkpoint's plots share: the teacher, its analysis, the example mapped, where PNGs go."""

    teacher: BertMRPC
    tresult: dict
    example: dict[str, torch.Tensor]  # a one-example batch
    tokens: list[str]
    interval: tuple[float, float]
    layer: int  # of the attention maps, from 0
    example_idx: int
    stem: str  # path prefix of the PNGs
    teacher_path: str = ""  # the teacher's checkpoint, to name its series


def figures(k: int, path: str, student: BertMRPC, result: dict, pl: Plotting) -> dict:
    """The three PNGs of checkpoint ``k``; the maps show the head of ``pl.layer`` with the largest mean KL."""
    name, label = Path(path).name, result["label"]
    same = Path(path).resolve() == Path(pl.teacher_path).resolve()
    ranges = plot_ranges(pl.tresult, result, pl.interval, f"{pl.stem}-{k}-ranges.png", f"{name}: CGF exp argument per layer",
                         names=(f"teacher {Path(pl.teacher_path).name}", f"{name}" + (" (the teacher itself)" if same else "")))
    heat = plot_kl(result, f"{pl.stem}-{k}-kl.png", f"{name} ({label}): KL(teacher || student) per row")
    kl = kl_matrix(result)[pl.layer]  # (H,)
    head = int(np.argmax(np.where(np.isnan(kl), -np.inf, kl)))  # inf (a zero student probability) counts as largest
    t_map, s_map = (attention_maps(m, pl.example, pl.layer)[head] for m in (pl.teacher, student))  # (T, T) each
    sums = s_map.sum(-1)  # (T,) CGF rows need not sum to 1
    maps = plot_maps(t_map, s_map, pl.tokens, f"{pl.stem}-{k}-maps.png", (
        f"teacher (exact), layer {pl.layer} head {head}, dev idx {pl.example_idx}",
        f"{label}: row sums {sums.min():.3g}..{sums.max():.3g}; this head's mean KL on dev {kl[head]:.3g}"))
    return {"ranges": repo_relative(ranges), "kl_heatmap": repo_relative(heat), "attention_maps": repo_relative(maps),
            "map": {"layer": pl.layer, "head": head, "example_idx": pl.example_idx,
                    "why_this_head": "the head of this layer with the largest mean KL to the teacher on dev"}}


def map_layer(layer: int, num_layers: int) -> int:
    if not -num_layers <= layer < num_layers:
        raise CgfBertError(f"--map-layer {layer}: the model has {num_layers} layers (0..{num_layers - 1}, or negative from the end)")
    return layer % num_layers


def load_dev(args, model: str):
    """The tokenizer, the dev loader, and the one-example batch of ``--map-example``."""
    tokenizer, data = prepare_data(model, args.data_dir, args.max_length, limit=args.examples)
    loader = make_loader(data["validation"], tokenizer, args.batch_size)
    example = next(iter(make_loader(data["validation"].select([map_example(data, args.map_example)]), tokenizer, 1)))
    return tokenizer, loader, example


def score(k: int, path: str, state: dict, meta: dict, args, loader, device, pl: Plotting) -> dict:
    """Checkpoint ``k`` analysed against the teacher, its table printed and its plots drawn: its record entry."""
    model = model_from_checkpoint(state, meta, path, None if args.as_softmax is None else meta["approx"].replace(softmax=args.as_softmax))
    result = analyse(model, loader, device, args.coeff, args.interval, teacher=pl.teacher, desc=Path(path).name)
    print(f"\n{path} ({result['label']}):\n{format_table(result)}")
    return {"checkpoint": repo_relative(path), "checkpoint_softmax": meta["approx"].softmax.to_json(),
            "scored_as": None if args.as_softmax is None else args.as_softmax.to_json(), "analysis": result,
            "figures": figures(k, path, model, result, pl)}


def main():
    args = parse_args()
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S"), time.time()
    device = resolve_device(args.device)
    tck, students = read_all(args)
    tokenizer, loader, example = load_dev(args, tck["meta"]["model"])
    teacher = model_from_checkpoint(tck["state"], tck["meta"], args.teacher)
    layer = map_layer(args.map_layer, teacher.bert.config.num_hidden_layers)
    tresult = analyse(teacher, loader, device, args.coeff, args.interval, desc="teacher")
    print(f"teacher {args.teacher} ({tresult['label']}; CGF argument at c={args.coeff:g}), "
          f"{tresult['examples']} dev examples, {tresult['tokens']} tokens:\n{format_table(tresult)}")
    stem = str(Path(args.out_dir) / f"attention_analysis-{time.strftime('%Y%m%d-%H%M%S')}")
    pl = Plotting(teacher, tresult, example, tokenizer.convert_ids_to_tokens(example["input_ids"][0].tolist()),
                  args.interval[0], layer, args.map_example, stem, args.teacher)
    entries = [score(k, path, state, meta, args, loader, device, pl) for k, (path, state, meta) in enumerate(students)]
    record = {
        "command": command_line(), "code_version": code_version(), "uncommitted_files": uncommitted_files(),
        "started": started, "wall_seconds": round(time.time() - t0, 1), "device": machine(device),
        "data": {"split": "validation", "examples": tresult["examples"], "tokens": tresult["tokens"], "max_length": args.max_length},
        "coeff": args.coeff, "intervals": [list(iv) for iv in args.interval], "percentiles": list(PERCENTILES),
        "teacher": {"checkpoint": repo_relative(args.teacher), "model": tck["meta"]["model"], "analysis": tresult},
        "checkpoints": entries,
    }
    record, notes = strict_json(record)
    record["non_finite"] = notes  # every null above that stands for inf or nan, with its reason
    print(f"\n{record['wall_seconds']:.0f} s; saved {write_json(stem + '.json', record)} and {3 * len(entries)} PNGs beside it")


if __name__ == "__main__":
    run_main(main)
