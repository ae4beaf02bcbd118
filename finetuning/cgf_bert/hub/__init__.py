"""Students that leave the toolkit: export to a transformers folder with a model card (``export``)."""
