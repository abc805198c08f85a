"""Evaluation of a trained model or run: test ELBO, log p(x), accuracy (evaluate); estimator comparison
(compare); inference diagnostics (diagnostics/); latents (encode, interpolate); runs side by side (report)."""
