"""PNG plots: a run's curves, reconstructions and samples (``run``); diagnostics of its latents (``latent``)."""
