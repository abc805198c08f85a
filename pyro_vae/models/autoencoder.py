"""The deterministic autoencoder baseline's model kind ("ae"): the AutoEncoder of models/vae.py (a
point-mass guide at the code c(x), a flat p(z)), trained on its reconstruction loss alone. It has no
prior, no KL and no bound on log p(x): its metrics are the reconstruction log-likelihood
log p(x | decoder(c(x))) and the squared error, and compare and diagnose refuse it."""

from __future__ import annotations

from torch import Tensor

from ..errors import InputError
from ..inference.program import Program
from ..inference.scores import active_units, elbo_terms, reconstruction_error
from ..stats import mean_se
from .kind import MODEL_KINDS, refuse_at_defaults
from .vae import VAEKind

# the VAE's settings that the autoencoder has nothing for, at their defaults
VAE_ONLY = {"guide": "diagonal", "prior": "normal", "estimator": "mc", "particles": 1, "beta": 1.0,
            "kl_anneal": 0}


class AutoencoderKind(VAEKind):
    """--model ae: the VAE's networks and likelihood, no prior, no guide family, no ELBO."""

    name = "ae"
    builds = "ae"
    bound = False
    comparison = None
    exemplar_prior = False  # no prior at all
    scales = False  # a point-mass guide: codes, no scales
    sample_title = "decoded N(0, I) noise (an autoencoder has no prior)"

    def check(self, config) -> None:
        super().check(config)
        if config.early_stop is not None:
            raise InputError("--early-stop watches the validation ELBO, and --model ae has no ELBO; "
                             "use it with --model vae")
        refuse_at_defaults(config, VAE_ONLY, lambda wrong: (
            f"--model ae is a deterministic autoencoder: it has no prior, no KL and no ELBO, so "
            f"{', '.join('--' + k.replace('_', '-') for k in wrong)} cannot apply; drop "
            f"{'it' if len(wrong) == 1 else 'them'} or use --model vae"))

    def test_metrics(self, program: Program, data) -> dict[str, float | None]:
        """No ELBO (None), the reconstruction log-likelihood log p(x | decoder(c(x)))."""
        return {**super().test_metrics(program, data), "test_elbo": None}

    def epoch_line(self, row: dict) -> str:
        return f"test reconstruction log p(x|z) {row['test_recon']:.2f} nats"

    def per_example(self, program: Program, x: Tensor, k: int = 5000, elbo_samples: int = 10,
                    progress: bool = False) -> dict[str, Tensor]:
        """"recon" = log p(x | decoder(encoder(x))) and "mse" = ||x - mean of p(x|z)||^2 summed over
        pixels, per example."""
        recon = elbo_terms(program.model, program.guide, x)["recon"]
        return {"recon": recon, "mse": reconstruction_error(program, x)}

    def summarize(self, program: Program, x: Tensor, values: dict[str, Tensor], k: int) -> dict:
        """The reconstruction's means and standard errors; None for the ELBO and log p(x)."""
        result: dict[str, float | int | str | None] = {"model": "ae", "test_elbo": None, "test_elbo_se": None,
                                                        "log_px": None, "log_px_se": None}
        for name in ("recon", "mse"):
            result[name], result[f"{name}_se"] = mean_se(values[name])
        result.update(active_units=active_units(program, x), n_examples=int(x.shape[0]))
        return result

    def evaluation_rows(self, k: int) -> tuple[tuple[str, str], ...]:
        return (("recon", "log p(x | code)"), ("mse", "squared error (sum)"))

    def evaluation_notes(self, result: dict, config) -> list[str]:
        return ["an autoencoder has no ELBO and no estimate of log p(x): compare reconstructions only",
                *super().evaluation_notes(result, config)]

    def result_line(self, summary: dict) -> str:
        return (f"test reconstruction log p(x|z) {summary['recon']:.2f} nats, squared error "
                f"{summary['mse']:.2f}")

    def refusal(self, command: str, what: str) -> str | None:
        if command in ("compare", "compare-config"):
            return f"{what} is an autoencoder (model 'ae'): it has no ELBO to estimate; compare a VAE"
        if command == "diagnose":
            return ("an autoencoder run has no q(z|x) and no p(z|x) to diagnose; diagnose a VAE run "
                    "(--model vae)")
        return None


AE_KIND = MODEL_KINDS.builtin(AutoencoderKind())
