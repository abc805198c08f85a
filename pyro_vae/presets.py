"""Presets: named sets of settings shipped with the package. `pyro-vae train --preset NAME` starts from
them; a --config file and flags override them (preset < config file < flags); `pyro-vae train
--list-presets` prints them.

The protocol presets follow the published setup of the VampPrior paper's code (jmtomczak/vae_vampprior)
as the Exemplar VAE paper (Norouzi et al. 2020; its code, sajadn/Exemplar-VAE, loads Fashion-MNIST)
reports it for dynamically binarized (Fashion-)MNIST: encoder and decoder of two GatedDense layers of
300 units, z of 40, Adam with lr 5e-4, batch 100, KL warm-up over 100 epochs, 50k/10k train/validation
split, training images re-binarized every epoch and validation/test binarized once, early stopping on
the validation ELBO with patience 50, at most 2000 epochs, test log p(x) by importance sampling with
5000 samples; the VampPrior with K = 500 pseudo-inputs.

Two families. `fashion-mnist-vae`, `fashion-mnist-vampprior`, `mnist-vae` and `mnist-vampprior` keep
pyro-vae's own choices where the authors' code differs in detail (and keep doing so: runs made with
them stay reproducible). The `-authors` presets take every difference the authors' code shows:

- weight_init: PyTorch's default (uniform on +-1/sqrt(fan_in)) | he, weights ~ N(0, 2/fan_in) and
  biases PyTorch's;
- optimizer: adam | adam-normgrad, each tensor's gradient divided by (its 2-norm + 1e-7), then Adam;
- heldout: seeded (a --seed permutation picks the validation images, fixed torch seeds binarize
  validation and test) | authors (the last 10,000 training images; np.random.seed(777), then the
  validation draw, then the test draw: another binary test set);
- early_stop_rule: plain (stop after 50 epochs without a better validation ELBO) | authors (the count
  stays 0 during the 100 warm-up epochs; stop once it exceeds 50, i.e. after 51);
- encoder_scale: softplus(raw) + 1e-4 | clamped-logvar, sigma = exp(hardtanh(raw, -6, 2) / 2);
- pseudo_inputs (VampPrior): free parameters | hardtanh, through Hardtanh(0, 1), always in [0, 1];
- prior_init (VampPrior): data, random training images | authors, weights ~ N(0.05, 0.01^2), which
  through the Hardtanh are nearly black images of mean about 0.05 — not grey images through a sigmoid.

(The authors' code starts the pseudo-inputs at N(0.05, 0.01^2) weights through a Hardtanh(0, 1) — the
VampPrior's load_data sets pseudoinputs_mean to 0.05, overriding the -0.05 of experiment.py's flag —
with random training images plus N(0, 0.01^2) noise behind --use_training_data_init.) Differences
that remain in both: their KL weight is epoch/warmup for a whole epoch, ours rises every step
(kl_weight.py); their Adam adds eps before the bias correction (optim.py). docs/results.md ("The
authors' protocol, measured") has what each option changes on the VAE.
The exemplar presets follow the Exemplar VAE code (sajadn/Exemplar-VAE) on top of the same protocol
(exemplar.py says what it computes). The HVAE presets add `--model hvae` (models/hvae.py: z1 and z2 of
40 each; the ConvHVAE with `--encoder conv`), as the Exemplar VAE paper's table reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

PROTOCOL = {
    "encoder": "gated-mlp", "hidden": [300, 300], "z_dim": 40, "likelihood": "bernoulli",
    "estimator": "mc", "lr": 5e-4, "batch_size": 100, "kl_anneal": 100, "validation_size": 10_000,
    "binarize": "dynamic", "early_stop": 50, "epochs": 2000, "eval_k": 5000,
}
VAMPPRIOR = {"prior": "vamp", "prior_components": 500, "prior_init": "data"}
# the authors' code where it differs from pyro-vae's defaults (the table above)
AUTHORS = {"weight_init": "he", "optimizer": "adam-normgrad", "heldout": "authors",
           "early_stop_rule": "authors", "encoder_scale": "clamped-logvar"}
VAMPPRIOR_AUTHORS = {**VAMPPRIOR, "prior_init": "authors", "pseudo_inputs": "hardtanh"}
# the Exemplar VAE's prior: exemplar subsampling with 25,000 of the 50,000 training images per step (the
# authors' code: number_components=25000, approximate_prior=False, leave-one-out on)
EXEMPLAR = {"prior": "exemplar", "exemplar_subset": 25_000}


@dataclass(frozen=True)
class Preset:
    """A named set of settings, and the published test log p(x) (nats) it aims at."""

    settings: dict
    published: str
    source: str = "Exemplar VAE (Norouzi et al. 2020), table of dynamically binarized datasets"


PRESETS = {
    "fashion-mnist-vae": Preset({**PROTOCOL, "dataset": "fashion-mnist", "prior": "normal"},
                                "-228.70 +- 0.15"),
    "fashion-mnist-vampprior": Preset({**PROTOCOL, "dataset": "fashion-mnist", **VAMPPRIOR},
                                      "-227.35 +- 0.05"),
    "fashion-mnist-vae-exemplar": Preset({**PROTOCOL, "dataset": "fashion-mnist", **EXEMPLAR},
                                         "-226.75 +- 0.07"),
    # the hierarchical VAE (models/hvae.py): z1 and z2 of 40, the same protocol; conv: the ConvHVAE
    "fashion-mnist-hvae": Preset({**PROTOCOL, "dataset": "fashion-mnist", "model": "hvae", "prior": "normal"},
                                 "-227.37 +- 0.10"),
    "fashion-mnist-hvae-vampprior": Preset({**PROTOCOL, "dataset": "fashion-mnist", "model": "hvae",
                                            **VAMPPRIOR}, "-226.72 +- 0.08"),
    "fashion-mnist-convhvae-vampprior": Preset({**PROTOCOL, "dataset": "fashion-mnist", "model": "hvae",
                                                "encoder": "conv", **VAMPPRIOR}, "-224.67 +- 0.03"),
    # the exemplar prior on the HVAE's z2 (its top encoder's means), and on the ConvHVAE's
    "fashion-mnist-hvae-exemplar": Preset({**PROTOCOL, "dataset": "fashion-mnist", "model": "hvae",
                                           **EXEMPLAR}, "-226.53 +- 0.09"),
    "fashion-mnist-convhvae-exemplar": Preset({**PROTOCOL, "dataset": "fashion-mnist", "model": "hvae",
                                               "encoder": "conv", **EXEMPLAR}, "-224.63 +- 0.06"),
    "mnist-vae": Preset({**PROTOCOL, "dataset": "mnist", "prior": "normal"}, "-84.45"),
    "mnist-vampprior": Preset({**PROTOCOL, "dataset": "mnist", **VAMPPRIOR}, "-82.43"),
    "fashion-mnist-vae-authors": Preset({**PROTOCOL, **AUTHORS, "dataset": "fashion-mnist",
                                         "prior": "normal"}, "-228.70 +- 0.15"),
    "fashion-mnist-vampprior-authors": Preset({**PROTOCOL, **AUTHORS, "dataset": "fashion-mnist",
                                               **VAMPPRIOR_AUTHORS}, "-227.35 +- 0.05"),
    "mnist-vae-authors": Preset({**PROTOCOL, **AUTHORS, "dataset": "mnist", "prior": "normal"}, "-84.45"),
    "mnist-vampprior-authors": Preset({**PROTOCOL, **AUTHORS, "dataset": "mnist", **VAMPPRIOR_AUTHORS},
                                      "-82.43"),
}


def preset_settings(name: str) -> dict:
    """The settings of preset `name` (a copy: change it freely)."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} "
                         "(pyro-vae train --list-presets shows what each sets)")
    return {k: list(v) if isinstance(v, list) else v for k, v in PRESETS[name].settings.items()}


def describe_presets() -> str:
    """Every preset: its settings as flags and the published number it targets."""
    lines = []
    for name, preset in PRESETS.items():
        flags = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                         for k, v in preset.settings.items())
        lines += [f"{name}:", f"  {flags}",
                  f"  targets test log p(x) {preset.published} nats ({preset.source})"]
    lines.append("Flags and --config files override a preset's settings.")
    return "\n".join(lines)
