"""pyro-vae: variational autoencoders written as Pyro programs.

The model p(z) p(x|z) and the guide q(z|x) are Pyro functions; priors, likelihoods and ELBO
estimators and guide families are registry entries, swapped by name or passed as objects;
register_prior, register_likelihood, register_estimator and register_guide add your own, and
register_model a model kind of your own (models/kind.py).
"""

from .errors import InputError, exit_if_command_interrupted

try:  # torch and Pyro take seconds to import: Ctrl-C then ends `pyro-vae` in one line, as it does later
    from .config import Config
    from .data import Dataset, load_dataset
    from .evaluation.evaluate import elbo_terms, evaluate, evaluate_run, iwae_log_px
    from .inference.estimators import log_weights, make_estimator, register_estimator
    from .models import ModelKind, register_model
    from .models.guides import register_guide
    from .models.likelihoods import register_likelihood
    from .models.priors import register_prior
    from .models.vae import VAE, build_vae
    from .training.train import RunResult, train
except KeyboardInterrupt:
    exit_if_command_interrupted()
    raise

__all__ = [
    "VAE", "Config", "Dataset", "InputError", "ModelKind", "RunResult", "build_vae", "elbo_terms", "evaluate",
    "evaluate_run", "iwae_log_px", "load_dataset", "log_weights", "make_estimator", "register_estimator",
    "register_guide", "register_likelihood", "register_model", "register_prior", "train",
]
__version__ = "0.1.0"
