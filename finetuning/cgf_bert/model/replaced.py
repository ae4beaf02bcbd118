"""The feed-forward GELU, the LayerNorms and the pooler's activation replaced by their specs, in place.

An exact spec leaves the model's own module as it is, so an exact model computes stock
transformers' numbers bit for bit. A replaced one swaps in a module that calls its spec and holds
no parameters or buffers, so state dicts (and so checkpoints) never change shape:
- GELU: ``layer.intermediate.intermediate_act_fn`` becomes an ``Activation``;
- the pooler: ``bert.pooler.activation`` likewise;
- LayerNorm: each layer's two LayerNorms (after attention, after the feed-forward) change class
  to ``ApproxLayerNorm``, the same ``nn.LayerNorm`` with its weights whose forward calls the spec.
  The embedding LayerNorm stays exact: the embedding output is the client's (it is not encrypted).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from cgf_bert.approx.approximations import Approximations
from cgf_bert.approx.counter import OutsideCounter
from cgf_bert.approx.spec import Spec
from cgf_bert.model.attention import apply_softmax, self_attentions


class Activation(nn.Module):
    """An elementwise activation that runs ``spec`` (no parameters, no buffers)."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        self.outside_counter: OutsideCounter | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec(x, counter=self.outside_counter)

    def extra_repr(self) -> str:
        return self.spec.label()


class ApproxLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose forward is its spec's (set by ``apply``; the weights are the module's own)."""

    spec: Spec
    where: str  # 'attention' or 'output': which of its layer's two LayerNorms
    outside_counter: OutsideCounter | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec(x, self.weight, self.bias, self.eps, self.where, counter=self.outside_counter)


def layer_norms(layer: nn.Module) -> dict[str, nn.LayerNorm]:
    """A BERT layer's LayerNorms by where they sit: after self-attention, after the feed-forward."""
    return {"attention": layer.attention.output.LayerNorm, "output": layer.output.LayerNorm}


def _activation(own: nn.Module, spec: Spec) -> nn.Module:
    """The module to use for ``spec`` where the model's own is ``own`` (kept when exact)."""
    base = getattr(own, "own", own)  # the model's own module, kept on a replacement
    if spec.is_exact:
        return base
    act = Activation(spec)
    object.__setattr__(act, "own", base)  # not a submodule: state dicts stay as they were
    return act


def _layer_norm(ln: nn.LayerNorm, spec: Spec, where: str) -> None:
    if spec.is_exact:
        ln.__class__ = nn.LayerNorm
        return
    ln.__class__ = ApproxLayerNorm  # same parameters and state dict; only forward differs
    ln.spec, ln.where = spec, where


def apply(bert: nn.Module, approx: Approximations) -> None:
    """Put every op of ``approx`` into ``bert``, layer by layer (weights unchanged)."""
    layers = bert.encoder.layer
    apply_softmax(bert, approx.softmax)
    for layer, gelu, ln in zip(layers, approx.gelu.per_layer(len(layers)), approx.layernorm.per_layer(len(layers))):
        layer.intermediate.intermediate_act_fn = _activation(layer.intermediate.intermediate_act_fn, gelu)
        for where, norm in layer_norms(layer).items():
            _layer_norm(norm, ln, where)
    if bert.pooler is not None:
        bert.pooler.activation = _activation(bert.pooler.activation, approx.pooler)


def _counted(bert: nn.Module) -> list[nn.Module]:
    """Every module whose spec can count out-of-interval inputs."""
    mods = list(self_attentions(bert))
    for layer in bert.encoder.layer:
        mods += [layer.intermediate.intermediate_act_fn, *layer_norms(layer).values()]
    if bert.pooler is not None:
        mods.append(bert.pooler.activation)
    return mods


@contextmanager
def counting(bert: nn.Module) -> Iterator[OutsideCounter]:
    """A fresh counter of the inputs that polynomial specs see outside their intervals, for the block."""
    counter = OutsideCounter()
    mods = _counted(bert)
    try:
        for m in mods:
            m.outside_counter = counter
        yield counter
    finally:
        for m in mods:
            m.outside_counter = None
