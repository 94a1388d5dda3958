"""Training: ``fit`` over SVI, the fast path (a replayed loss, one shared Adam), checkpoints, torch.distributed."""
