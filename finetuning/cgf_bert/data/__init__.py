"""Task data: GLUE TSVs behind a task registry (columns, labels, metrics), tokenized and batched."""
