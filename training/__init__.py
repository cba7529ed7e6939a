"""Training: datasets, the training loop, evaluation, and the fpn-train / fpn-eval CLIs."""
