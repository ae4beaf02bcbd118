"""Training: configs in use, the one fit loop, train steps, distillation terms, the teacher and its cache, resume, torchrun, precision, recipes."""
