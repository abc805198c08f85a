"""M2 and the classifier baseline now live in pyro_vae.models.m2 (their kinds: models/m2.py,
models/classifier.py); this module keeps the old import path working."""

from .discrete import DISCRETE, UNLABELLED
from .models.m2 import (
    M2,
    M2_ENCODERS,
    Baseline,
    ClassDecoder,
    ClassEncoder,
    Classifier,
    GumbelSoftmax,
    LabelClassifier,
    build_m2,
)

__all__ = ["DISCRETE", "M2", "M2_ENCODERS", "UNLABELLED", "Baseline", "ClassDecoder", "ClassEncoder",
           "Classifier", "GumbelSoftmax", "LabelClassifier", "build_m2"]
