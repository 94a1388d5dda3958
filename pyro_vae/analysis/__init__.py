"""What a trained pair says: IS log-likelihood, importance diagnostics, inference gaps, latent statistics,
generation from the prior, gradient signal-to-noise."""
