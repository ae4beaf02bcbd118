"""cgf-bert: FHE-friendly BERT students with the CGF softmax, fine-tuned and distilled."""

__version__ = "0.1.0"


class CgfBertError(Exception):
    """A user-facing error: scripts print its message on one line and exit non-zero."""
