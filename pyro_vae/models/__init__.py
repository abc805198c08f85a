"""Model kinds, one module each: a kind owns all that differs between kinds of model (its settings,
objective, metrics, evaluation, figures, and what compare, diagnose and sample can do with it; see
kind.py). Importing this package registers the built-in kinds: vae, ae, m2, classifier, hvae,
cvae, nn-baseline."""

from . import autoencoder, classifier, cvae, hvae, m2, nn_baseline, vae  # noqa: F401 - each registers its kind
from .kind import MODEL_KINDS, PAIR, ModelKind, kind_of, model_kind, register_model

__all__ = ["MODEL_KINDS", "PAIR", "ModelKind", "kind_of", "model_kind", "register_model"]
