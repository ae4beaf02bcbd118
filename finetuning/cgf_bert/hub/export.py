"""A checkpoint as a transformers folder: config.json, model.safetensors, the tokenizer, a model card.

The folder loads with plain transformers once ``cgf_bert`` is imported (``cgf_bert.model.hf``)::

    import cgf_bert
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(folder)

and this toolkit reads it wherever it reads a checkpoint (``validate.py FOLDER``, ``--teacher``,
``encrypted_inference``) or a base model (``--model FOLDER``). config.json keeps the student's
approximations and its checkpoint metadata under ``cgf_bert``; the model card (README.md) is
generated from the run record: task, recipe, seed, dev figures with the paired difference to the
exact fine-tune of the same seed where one is recorded, the replaced ops, the code version and the
base model's licence.

The folder is written beside its target and renamed into place: a failure leaves nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import EXACT, Approximations
from cgf_bert.data.loader import load_tokenizer
from cgf_bert.model.bert import resolve_model
from cgf_bert.model.hf import CgfBertConfig, CgfBertForSequenceClassification
from cgf_bert.report.tables import training_records
from cgf_bert.store.atomic import check_writable
from cgf_bert.store.checkpoint import model_from_checkpoint, read_checkpoint
from cgf_bert.store.names import Variant
from cgf_bert.store.provenance import REPO_ROOT, RESULTS_DIR
from cgf_bert.store.records import load_records

OPS = {"softmax": "attention softmax", "gelu": "feed-forward activation (GELU)", "layernorm": "LayerNorm", "pooler": "pooler activation (tanh)"}


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds an exported student (its config.json says model_type cgf_bert)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "cgf_bert"
    except (OSError, ValueError, AttributeError):
        return False


def check_target(out_dir: str | Path, overwrite: bool = False, ckpt: str | Path | None = None) -> Path:
    """Refuse, before any work, a folder that cannot be written, or one that already holds files,
    unless ``overwrite`` and it is itself an earlier export (never a folder of other files, the
    working folder or one holding the checkpoint)."""
    out = Path(out_dir)
    check_writable({}, {"OUT_DIR": out, "OUT_DIR's parent": out.resolve().parent})
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CgfBertError(f"OUT_DIR {out}: exists and is not empty (--overwrite replaces an earlier export)")
        inside = [p for p in (Path.cwd(), Path(ckpt) if ckpt else None) if p is not None and p.resolve().is_relative_to(out.resolve())]
        if not is_export(out) or inside:
            raise CgfBertError(f"OUT_DIR {out}: --overwrite replaces only an earlier export, and this folder "
                               + (f"holds {inside[0]}" if inside else "is not one (no cgf_bert config.json)"))
    return out


def run_record(ckpt: str | Path, runs: list[dict]) -> dict | None:
    """The newest of the training records ``runs`` of checkpoint ``ckpt``: the one naming this file (records
    name it relative to the repository), else one naming a file of the same name (a checkpoint moved
    or copied; run names are unique)."""
    target = Path(ckpt).resolve()
    runs = [r for r in runs if r.get("checkpoint")]
    for same in (lambda c: Path(REPO_ROOT, c).resolve() == target, lambda c: Path(c).name == target.name):
        found = [r for r in runs if same(r["checkpoint"])]
        if found:
            return max(found, key=lambda r: r["started"])
    return None


SAME_RECIPE = ("model", "task", "epochs", "lr", "batch_size", "max_length", "precision", "limit", "freeze_embeddings")


def exact_of_seed(rec: dict, runs: list[dict]) -> dict | None:
    """The newest exact fine-tune among the training records ``runs`` of the record's seed on the same
    recipe (model, task, epochs, precision, data limit...): the pair whose difference the card may state."""
    def exact(r: dict) -> bool:
        v = Variant.of_record(r)
        return v.approx == EXACT and v.method is None

    same = [r for r in runs if r.get("seed") == rec.get("seed") and all(r["config"].get(k) == rec["config"].get(k) for k in SAME_RECIPE)
            and exact(r)]
    return max(same, key=lambda r: r["started"]) if same else None


def base_licence(model: str) -> str:
    """The base model's licence, from its own model card's front matter ('unknown' if it names none)."""
    card = Path(resolve_model(model)) / "README.md"
    if card.is_file():
        m = re.search(r"^license:\s*(\S+)", card.read_text(errors="replace").split("\n---", 1)[0], re.M)
        if m:
            return m.group(1)
    return "unknown (see the base model)"


def model_card(meta: dict, approx: Approximations, rec: dict | None, exact: dict | None) -> str:
    """The README.md of an exported folder: what the student is, how it was trained, what it scores
    (the checkpoint's own dev figures; the record only where its best epoch is the checkpoint's)."""
    dev = meta.get("dev") or {}
    lines = ["---", f"license: {base_licence(meta['model'])}", "library_name: transformers", "tags:", "- cgf-bert",
             "- fhe-friendly", "- text-classification", "datasets:", "- glue", "metrics:", "- accuracy", "- f1", "---", "",
             f"# {approx.label()} student of {meta['model']} on MRPC", "",
             "A BERT sequence-pair classifier (MRPC: paraphrase or not) whose operations are replaced by FHE-friendly",
             "approximations, trained with the cgf-bert toolkit. It loads with plain transformers after `import cgf_bert`",
             "(which registers the `cgf_bert` model type and attention implementation); without that import transformers",
             "refuses the folder rather than run it as an exact-softmax BERT.", "",
             "```python", "import cgf_bert  # registers the model type", "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
             "model = AutoModelForSequenceClassification.from_pretrained(FOLDER)", "tokenizer = AutoTokenizer.from_pretrained(FOLDER)", "```", "",
             "## Operations", "", "| op | as trained |", "|---|---|"]
    lines += [f"| {OPS[op]} | {spec.label()} |" for op, spec in approx.specs().items()]
    lines += ["", "## Training", "",
              f"- task: {(rec or {}).get('config', {}).get('task', 'mrpc')}; base model: `{meta['model']}`; seed {meta.get('seed')}",
              f"- script: {meta.get('script')}" + (f"; command: `{rec['command']}`" if rec else "")]
    distill = meta.get("distill")
    if distill:
        terms = ", ".join(f"{t['loss']}={t['weight']}" for t in distill["terms"])
        lines.append(f"- distillation from `{distill.get('teacher')}` ({distill.get('init')} init): {terms}")
    lines.append(f"- code version: {meta.get('code_version')}" + (f"; run record `results/{rec['name']}.json`" if rec else ""))
    limit = (rec or {}).get("config", {}).get("limit")
    lines += ["", "## Results (MRPC dev" + (f", the first {limit} examples" if limit else "") + ")", ""]
    if dev:
        lines.append(f"- accuracy {100 * dev['accuracy']:.2f}, F1 {100 * dev['f1']:.2f}" + (f" (epoch {rec['best_epoch']})" if rec else ""))
    if exact is not None:
        diff = 100 * (dev["accuracy"] - exact["best"]["accuracy"])
        lines.append(f"- the exact fine-tune of the same seed: accuracy {100 * exact['best']['accuracy']:.2f} "
                     f"(`results/{exact['name']}.json`); paired difference {diff:+.2f} points")
    else:
        lines.append("- no exact fine-tune of the same seed is recorded: no paired difference")
    lines += ["", "One seed on 408 examples moves by 1-2 points between runs; compare students as paired means over seeds.", ""]
    return "\n".join(lines)


def export(ckpt: str | Path, out_dir: str | Path, results_dir: str | Path = RESULTS_DIR, overwrite: bool = False) -> Path:
    """Write the transformers folder of checkpoint ``ckpt`` to ``out_dir`` (see the module doc)."""
    out = check_target(out_dir, overwrite, ckpt)
    state_dict, meta = read_checkpoint(ckpt)
    model = model_from_checkpoint(state_dict, meta, ckpt)  # the weights checked against the model they came from
    approx = meta["approx"]
    base = model.bert.config.to_dict()
    for key in ("model_type", "architectures", "_name_or_path", "transformers_version", "_attn_implementation_autoset"):
        base.pop(key, None)
    card_meta = {k: v for k, v in meta.items() if k != "approx"}
    config = CgfBertConfig(**base, num_labels=2, cgf_bert={"approx": approx.to_json(), "checkpoint": card_meta},
                           architectures=[CgfBertForSequenceClassification.__name__])
    hf = CgfBertForSequenceClassification(config)
    hf.load_state_dict(model.state_dict(), strict=True)
    runs = training_records(load_records(results_dir))  # read once: the run's record and its exact pair
    rec = run_record(ckpt, runs)
    if rec is not None and (rec.get("best") != meta.get("dev") or rec.get("seed") != meta.get("seed")):
        rec = None  # a record of another run (a copied file of the same name): its figures are not this checkpoint's
    card = model_card(meta, approx, rec, exact_of_seed(rec, runs) if rec else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        hf.save_pretrained(tmp)
        load_tokenizer(resolve_model(meta["model"])).save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
