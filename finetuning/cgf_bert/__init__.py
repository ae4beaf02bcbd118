"""cgf-bert: FHE-friendly BERT students with the CGF softmax, fine-tuned and distilled."""

__version__ = "0.1.0"


class CgfBertError(Exception):
    """A user-facing error: scripts print its message on one line and exit non-zero."""


# transformers learns the exported students' model type (cgf_bert.model.hf) as soon as the package is imported
from cgf_bert.model import hf as _hf  # noqa: E402, F401
