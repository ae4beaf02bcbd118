"""BERT with the replaced operations plugged in: the attention hook, the classifier wrapper, the encoder as explicit steps, layer taps."""
