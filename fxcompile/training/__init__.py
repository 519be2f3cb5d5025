"""Training loops, checkpoints and data-parallel training of compiled models."""
