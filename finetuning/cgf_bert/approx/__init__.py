"""The replacement functions for the non-polynomial operations (softmax, GELU, LayerNorm, the pooler activation), their polynomial fits, and the spec values that name them; no transformers, no I/O."""

# Importing the package registers every op's kinds, so a spec of any op resolves wherever specs are used.
from cgf_bert.approx import softmax, activations, layernorm  # noqa: F401,I001  (the softmax first: the order flags and labels list the ops)
