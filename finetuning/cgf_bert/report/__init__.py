"""Summary tables, paired statistics and plots, built from the records (never from the training stack)."""
