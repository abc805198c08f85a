"""Inference: the ELBO estimators (Pyro ELBO subclasses: mc, analytic; iwae, stl, dreg; enum, score, relaxed),
the Program contract they read, per-example scores, the KL weight and the fast training step."""
