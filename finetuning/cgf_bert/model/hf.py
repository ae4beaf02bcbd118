"""A student as a plain transformers model: ``AutoModelForSequenceClassification.from_pretrained(folder)``.

An exported folder (``cgf_bert.store.export``) has ``model_type: "cgf_bert"`` in its config.json and
the student's approximations under the ``cgf_bert`` key. ``import cgf_bert`` registers the config
and the model class below with transformers' Auto classes, so loading restores every per-layer
choice and runs attention through this package's implementation. Without the import transformers
does not know the model type and refuses the folder: a student never loads silently as an
exact-softmax BERT under its name.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

from cgf_bert.approx.approximations import EXACT, Approximations
from cgf_bert.model import replaced
from cgf_bert.model.attention import ATTN_IMPLEMENTATION

MODEL_TYPE = "cgf_bert"


class CgfBertConfig(BertConfig):
    """A BertConfig with the student's ops: ``cgf_bert = {"approx": Approximations.to_json(), ...}``."""

    model_type = MODEL_TYPE

    def __init__(self, cgf_bert: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.cgf_bert = dict(cgf_bert or {"approx": EXACT.to_json()})

    @property
    def approx(self) -> Approximations:
        return Approximations.from_json(self.cgf_bert["approx"])


class CgfBertForSequenceClassification(BertForSequenceClassification):
    """transformers' BertForSequenceClassification (the same parameter names as ``BertMRPC``) whose
    layers run the config's approximations, attention through the ``cgf_bert`` implementation."""

    config_class = CgfBertConfig

    def __init__(self, config: CgfBertConfig):
        super().__init__(config)
        # whatever implementation transformers picked when loading, the specs live in ours
        self.config._attn_implementation = ATTN_IMPLEMENTATION
        replaced.apply(self.bert, config.approx)


AutoConfig.register(MODEL_TYPE, CgfBertConfig)
AutoModelForSequenceClassification.register(CgfBertConfig, CgfBertForSequenceClassification)
