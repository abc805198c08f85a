"""`pyro-vae` subcommands: train, evaluate, sample, compare, diagnose, report, grid, encode,
interpolate (and --version). Parses and
validates, calls the library, and turns bad input into one line on stderr with exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
import types
import typing
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import fields
from pathlib import Path

from . import __version__
from .config import HELDOUT_MODES, RESUMABLE, Config, load_config_file
from .data import CLASS_NAMES
from .device import resolve_device
from .errors import InputError, TrainingError
from .evaluation.compare import CompareOptions, compare_estimators
from .evaluation.diagnostics import diagnose, write_report
from .evaluation.evaluate import evaluate_run
from .evaluation.latents import SPLITS, encode_run, interpolate_run
from .evaluation.report import MARKDOWN, report
from .figures import plots
from .models.kind import check_config, model_kind
from .presets import describe_presets, preset_settings
from .registry import load_plugins
from .renames import add_renamed_flag
from .staging import write_all_or_none
from .sweeps.grid import grid_report, run_grid
from .sweeps.grid_ray import SCHEDULERS, run_grid_ray
from .training.run_copy import copy_run
from .training.run_dir import EVAL, check_data_shape, load_model, model_stamp, read_config
from .training.run_lock import run_lock
from .training.tracking import MLflowTracker, log_results, resolve_uri
from .training.train import Interrupted, train
from .training.train_data import prepare_data

HELP = {
    "dataset": "digits (default, embedded), mnist, fashion-mnist, kmnist, a folder of images, "
               "or a .npy/.npz file",
    "data_dir": "where torchvision datasets are looked for and downloaded (default: data)",
    "image_size": "resize image-folder data to SIZE x SIZE (default 28)",
    "channels": "1 (grayscale, default) or 3 (RGB) for image-folder data",
    "train_size": "use only the first N training examples",
    "test_size": "use only the first N test examples",
    "validation_size": "hold N training examples out (seeded split) as a validation set, scored each epoch "
                       "(validation_elbo in metrics.jsonl); binarized once, like the test set",
    "binarize": "none | static (one fixed Bernoulli draw) | dynamic (a fresh draw each epoch); default: "
                "dynamic for the bernoulli likelihood, none for the continuous ones",
    "model": "the model kind: vae (default) | ae (deterministic autoencoder baseline: reconstruction loss "
             "only, no ELBO) | m2 (semi-supervised, --labels N) | classifier (M2's q(y|x) alone, --labels N) "
             "| a kind a --plugin module registers (register_model)",
    "encoder": "network: mlp (default) | gated-mlp (GatedDense hidden layers) | conv",
    "hidden": "hidden layer sizes, e.g. --hidden 300 300 (default 400)",
    "z_dim": "latent dimension (default 20)",
    "prior": "prior p(z): normal (N(0, I), default) | learned (diagonal Gaussian) | mog (mixture of "
             "Gaussians) | vamp (VampPrior) | exemplar (Exemplar VAE: the encoder's means of the training "
             "images, one learned scale)",
    "prior_components": "mixture components K of the mog (default 10) and vamp (default 500) priors",
    "exemplar_subset": "--prior exemplar: exemplars drawn at random for each training step (default: all "
                       "of them; the fashion-mnist-vae-exemplar preset: 25000); tests use all",
    "exemplar_k": "--prior exemplar: of those, keep only each example's K nearest in latent space, their "
                  "union over the batch (retrieval-augmented training; default: keep all)",
    "prior_init": "VampPrior pseudo-inputs start as: noise (uniform on [0, 1], default) | data (random "
                  "training examples) | authors (N(0.05, 0.01^2) elementwise, the authors' default)",
    "guide": "posterior q(z|x): diagonal (Gaussian, default) | fullrank (Gaussian, full covariance) | "
             "lowrank (diagonal + rank --guide-rank) | iaf (inverse autoregressive flow, --flows steps)",
    "guide_rank": "rank R of the lowrank guide's covariance factor, 1 <= R < z_dim (default 1)",
    "flows": "number of IAF steps of the iaf guide (default 2)",
    "likelihood": "likelihood p(x|z): bernoulli (default) | continuous-bernoulli | gaussian (fixed --sigma) "
                  "| gaussian-learned | laplace (fixed --sigma) | laplace-learned",
    "sigma": "fixed scale of the gaussian (standard deviation) and laplace likelihoods (default 0.1)",
    "sigma_mode": "scale of gaussian-learned and laplace-learned: shared (one learned scalar, default) | "
                  "pixel (per pixel, from the decoder)",
    "estimator": "ELBO estimator: mc (Trace_ELBO, default) | analytic (TraceMeanField_ELBO) | iwae "
                 "(importance-weighted bound, K = --particles) | stl (sticking the landing) | iwae-dreg "
                 "(IWAE with doubly reparameterized gradients)",
    "particles": "samples of z per example in the ELBO (default 1)",
    "beta": "KL weight: the latent site is scaled by BETA (poutine.scale), -ELBO_beta = -E_q log p(x|z) "
            "+ BETA KL (default 1: the ELBO)",
    "kl_anneal": "raise the KL weight linearly from 0 to --beta over the first EPOCHS epochs "
                 "(default 0: off)",
    "epochs": "passes over the training set (default 30)",
    "early_stop": "stop after PATIENCE epochs without a better validation ELBO (--model m2 and classifier: "
                  "validation accuracy of q(y|x)) (needs --validation-size); the best model is kept in "
                  "RUN/best.pt and evaluated",
    "time_budget": "stop at the first epoch end past MINUTES of wall time (summed over the run's sessions; "
                   "with --early-stop the best model is still the one evaluated); summary.json says why "
                   "training stopped (default: no budget)",
    "batch_size": "examples per step (default 128)",
    "lr": "Adam learning rate (default 1e-3)",
    "seed": "random seed (default 0)",
    "device": "auto (default: cuda if available) | cpu | cuda",
    "eval_k": "importance samples per example for the final log p(x) in summary.json (default 100)",
    "checkpoint_every": "also checkpoint every M minutes inside an epoch (default 10; 0: epoch ends only)",
    "clip_grad": "clip the gradient norm to this value (default: no clipping)",
    "workers": "read an image-folder dataset batch by batch with N DataLoader worker processes instead of "
               "holding it on the device (default 0: on the device)",
    "cuda_graph": "auto (default: on for pyro-vae's own VAE on one CUDA GPU, else off) | on | off: capture "
                  "the training step as one CUDA graph and replay it (one GPU, one process)",
    "labels": "--model m2 or classifier: N labelled training examples, balanced over the classes and drawn "
              "with --seed; the rest of the training set is unlabelled",
    "classes": "--model m2 or classifier: the number of classes (default: those in the data's labels)",
    "discrete": "--model m2: how the sum over the class y is estimated: enum (summed exactly, parallel "
                "enumeration), score (sampled, score-function gradient with a baseline) or relaxed "
                "(Gumbel-softmax, reparameterized) (default enum)",
    "aux_loss": "--model m2: alpha, the weight of the classifier's log-likelihood of the labels added to the "
                "ELBO (Kingma et al.'s J^alpha; default 0)",
    "aux_loss_scale": "--model m2 with --aux-loss: fixed (default: each labelled example's log q(y|x) weighs "
                      "alpha) | data (it weighs alpha * N / N_labelled, N the training examples: Kingma et "
                      "al.'s code, with alpha = 0.1)",
    "labelled_per_batch": "--model m2: M labelled examples in every batch, drawn from the labelled subset "
                          "(reshuffled each time it runs out), and --batch-size minus M unlabelled ones (an "
                          "epoch is one pass over the unlabelled); the loss weighs them so that it stays an "
                          "unbiased estimate of the full-data objective (default: batches drawn from the "
                          "whole training set)",
    "temperature": "--discrete relaxed: the Gumbel-softmax temperature at the first step (default 1)",
    "temperature_final": "--discrete relaxed: anneal the temperature geometrically to this value at the last "
                         "step (default: constant)",
    "weight_init": "default (PyTorch's) | he (every linear layer's weights ~ N(0, 2/fan_in), biases as "
                   "PyTorch draws them: the VampPrior authors' he_init)",
    "optimizer": "adam (default) | adam-normgrad (the authors' AdamNormGrad: each parameter tensor's "
                 "gradient divided by its 2-norm + 1e-7, then Adam)",
    "heldout": "seeded (default: a --seed permutation picks the validation images; fixed torch seeds "
               "binarize validation and test) | authors (the last N training images are the validation "
               "set; NumPy's seed 777 binarizes validation, then test, as the authors' code; needs "
               "--validation-size)",
    "early_stop_rule": "plain (default: stop after PATIENCE epochs without a better validation ELBO) | "
                       "authors (the count stays 0 during the --kl-anneal epochs and training stops once "
                       "it exceeds PATIENCE, as the authors' code)",
    "encoder_scale": "how the encoder makes q's standard deviation: softplus (softplus(raw) + 1e-4, "
                     "default) | clamped-logvar (exp(hardtanh(raw, -6, 2) / 2): the authors' clamped "
                     "log-variance)",
    "pseudo_inputs": "the VampPrior's pseudo-inputs: free (the parameter itself, default) | hardtanh (the "
                     "parameter through Hardtanh(0, 1), always in [0, 1], as the authors' code)",
    "threads": "torch threads for this run (default 1: on a busy or small CPU more threads only wait for "
               "each other; docs/usage.md has the measurement); may change on resume",
    "condition": "--model cvae or nn-baseline: quadrants:N (N = 1, 2, 3 quadrants of each image given, the "
                 "rest predicted; a cvae run trains the NN baseline first) | class (the label; cvae only)",
    "plugins": "import MODULE first; it registers priors, likelihoods or estimators of your own (repeat for "
               "several; train records them in config.json, so later commands import them again). Or name a "
               "factory directly: --prior MODULE:FACTORY (also --likelihood, --estimator)",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit 2), like every other input error."""

    def error(self, message: str) -> typing.NoReturn:
        raise InputError(f"{message} (see {self.prog} --help)")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field, defaulting to None so we know which ones were given."""
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        if f.name == "plugins":  # --plugin, on every subcommand: _add_plugin_flag
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        union = isinstance(hint, types.UnionType)
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if union else hint
        if typing.get_origin(base) is list:
            parser.add_argument(flag, type=int, nargs="+", default=None, help=HELP[f.name])
        else:
            parser.add_argument(flag, type=base, default=None, metavar=f.name.upper(), help=HELP[f.name])


def _add_mlflow_flag(parser: argparse.ArgumentParser, experiment: str) -> None:
    parser.add_argument("--mlflow", metavar="URI", default=None,
                        help="track in MLflow at this tracking URI (default: $MLFLOW_TRACKING_URI, else "
                        "no tracking): config, every epoch's metrics, summary, figures; the experiment is "
                        f"{experiment}; later evaluate/compare/report results go to the same MLflow run "
                        '(needs pip install -e ".[mlflow]")')


def _add_plugin_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", dest="plugins", action="append", metavar="MODULE", default=None,
                        help=HELP["plugins"])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyro-vae", description="Variational autoencoders as Pyro programs.",
                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"pyro-vae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a VAE and write a run directory", allow_abbrev=False)
    _add_config_flags(train)
    train.add_argument("--preset", help="start from a shipped set of settings (--list-presets); a --config "
                       "file and flags override it")
    train.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    train.add_argument("--config", help="YAML or JSON file with the same keys; flags override it")
    train.add_argument("--out", help="run directory to write (default: runs/<timestamp>)")
    train.add_argument("--resume", metavar="RUN", help="continue the run in RUN (may raise --epochs)")
    train.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to "
                       "RUN/tensorboard/ (needs pip install -e \".[tensorboard]\")")
    _add_mlflow_flag(train, "the run directory's name")

    evaluate = sub.add_parser("evaluate", help="test ELBO, log p(x), KL, active units -> RUN/eval.json")
    evaluate.add_argument("run", help="a run directory written by `pyro-vae train`")
    evaluate.add_argument("--eval-k", type=int, default=5000, help="importance samples per example for log "
                          "p(x) (default 5000)")
    add_renamed_flag(evaluate, "--k", "--eval-k", type=int)
    evaluate.add_argument("--test-size", type=int, default=None, help="evaluate on the first N test examples")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the importance samples (default 0; "
                          "recorded in eval.json)")
    evaluate.add_argument("--device", default="auto", help="auto | cpu | cuda")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.add_argument("--heldout", choices=HELDOUT_MODES, help="score the model on another draw of the "
                          "test set (authors: the authors' NumPy seed 777 draw; seeded: pyro-vae's); needs "
                          "--out, so that RUN's own eval.json keeps describing its own test set")
    evaluate.add_argument("--out", metavar="COPY", help="with --heldout: a new directory, a copy of RUN "
                          "(its model file, metrics.jsonl, summary.json, and config.json with the new "
                          "heldout), evaluated there; compare the two with scripts/draw_shift.py RUN:COPY")

    sample = sub.add_parser("sample", help="samples, reconstructions, traversal, latent map -> PNGs in RUN")
    sample.add_argument("run", help="a run directory written by `pyro-vae train`")
    sample.add_argument("--n", type=int, default=64, help="number of samples from the prior (default 64)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sample.add_argument("--device", default="auto", help="auto | cpu | cuda")
    sample.add_argument("--class", dest="label", type=int, default=None, metavar="K",
                        help="a --condition class run: --n samples of class K -> RUN/samples_class_K.png")
    _add_compare_parser(sub)
    _add_diagnose_parser(sub)
    _add_report_parser(sub)
    _add_grid_parser(sub)
    _add_latent_parsers(sub)
    for command in sub.choices.values():
        _add_plugin_flag(command)
    return parser


def _add_compare_parser(sub) -> None:
    compare = sub.add_parser("compare", help="ELBO estimators side by side: value spread, gradient "
                             "variance and SNR, time -> compare.json, compare.md, PNGs", allow_abbrev=False)
    compare.add_argument("run", nargs="?", help="a run directory written by `pyro-vae train`")
    compare.add_argument("--config", help="compare on a fresh model from this YAML/JSON file, not a run")
    compare.add_argument("--out", help="where to write (default: RUN; required with --config)")
    compare.add_argument("--estimators", nargs="+", metavar="NAME[:K]", default=None,
                         help="estimators to compare, NAME or NAME:K (e.g. mc iwae:50); default: all (for an "
                              "M2 run: enum score relaxed)")
    compare.add_argument("--particles", type=int, nargs="+", default=[1, 5, 50], metavar="K",
                         help="K, the samples of z per example, for each bare NAME (default 1 5 50)")
    add_renamed_flag(compare, "--particles-list", "--particles", type=int, nargs="+")
    compare.add_argument("--repeats", type=int, default=100, help="draws per estimator (default 100)")
    compare.add_argument("--batch-size", type=int, default=64, help="test examples in the batch (default 64)")
    compare.add_argument("--eval-k", type=int, default=1000,
                         help="importance samples per example for the reference log p(x) (default 1000)")
    add_renamed_flag(compare, "--k-ref", "--eval-k", type=int)
    compare.add_argument("--train-epochs", type=int, default=0, metavar="N",
                         help="also train the network from its initialization with each estimator for "
                              "N epochs and report the final log p(x) (default 0: off)")
    compare.add_argument("--pretrain-epochs", type=int, default=0, metavar="N",
                         help="with --config: train the fresh model N epochs before measuring (default 0)")
    compare.add_argument("--temperature", type=float, default=None, metavar="TAU",
                         help="M2 runs: the Gumbel-softmax temperature of the 'relaxed' estimator "
                              "(default: the run's final one, or 0.5 if it did not train relaxed)")
    compare.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    compare.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                         help="auto (default) | cpu | cuda")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults, then the --preset, then the --config file, then the flags given: the config the run
    records."""
    preset = preset_settings(args.preset) if getattr(args, "preset", None) else {}
    values = _settings_file(args.config) if args.config else {}
    return check_config(Config.from_dict({**preset, **values, **_flags_given(args)}))


def _settings_file(path: str) -> dict:
    """The settings of a --config file; refused in one line if a key is not a setting (a grid file's
    base and sweep are named as such)."""
    values = load_config_file(path)
    names = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - names)
    if unknown and set(unknown) <= {"base", "sweep"}:
        raise InputError(f"config file {path} is a grid file ({' and '.join(unknown)}): run it with "
                         f"`pyro-vae grid {path}`, or pass a file of settings")
    if unknown:
        raise InputError(f"config file {path}: unknown setting(s) {', '.join(unknown)}; known settings: "
                         f"{', '.join(sorted(names))}")
    return values


def _flags_given(args: argparse.Namespace) -> dict:
    """The Config settings given as flags (the others are None)."""
    return {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}


def _resume_config(args: argparse.Namespace) -> Config:
    """The run's own config, with only RESUMABLE settings changed by flags."""
    recorded, _ = read_config(Path(args.resume))
    given = _flags_given(args)
    if args.config:
        given = {**_settings_file(args.config), **given}
    if isinstance(given.get("plugins"), list):  # plugins may be added on resume, none is dropped
        given["plugins"] = recorded.plugins + [p for p in given["plugins"] if p not in recorded.plugins]
    changed = sorted(k for k, v in given.items() if k not in RESUMABLE and getattr(recorded, k) != v)
    if changed:
        raise InputError(f"cannot resume {args.resume} with changed setting(s) {', '.join(changed)}; "
                         f"only {', '.join(sorted(RESUMABLE))} may change on resume")
    resumed = {**recorded.to_dict(), **{k: given[k] for k in RESUMABLE & set(given)}}
    return check_config(Config.from_dict(resumed))


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InputError(f"--{name} must be a positive integer, got {value}")


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch on `threads` threads for the command (a run's --threads), the process's count restored
    afterwards: the command line sets threads; the library never does."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cmd_train(args: argparse.Namespace) -> None:
    if args.list_presets:
        print(describe_presets())
        return
    if args.resume and args.preset:
        raise InputError(f"--preset starts a run; --resume {args.resume} continues one with its own recorded "
                         "settings: drop --preset")
    if args.resume and (args.out or args.overwrite):
        flag = "--out" if args.out else "--overwrite"
        raise InputError(f"{flag} applies to a new run; --resume {args.resume} continues that run in its own "
                         f"directory: drop {flag} (copy the directory first to continue a copy)")
    config = _resume_config(args) if args.resume else resolve_config(args)
    uri = resolve_uri(args.mlflow)
    reporters = [MLflowTracker(uri)] if uri else []  # the server checked before anything is written
    with torch_threads(config.threads):  # --threads, recorded in config.json
        if args.resume:
            result = train(config, out=args.resume, resume=True, progress=not args.quiet,
                           tensorboard=args.tensorboard, reporters=reporters)
        else:
            result = train(config, out=args.out, progress=not args.quiet, overwrite=args.overwrite,
                           tensorboard=args.tensorboard, reporters=reporters)
    s = result.summary
    if not s:  # a process of a multi-process run other than rank 0: rank 0 reports
        return
    measured = result.kind.result_line(s)
    print(f"{measured}, {s['epochs']} epochs in {s['train_seconds']:.1f} s on {s['device']}")
    print(f"wrote run directory {result.out}")


def _load_run(run: str, device_name: str, test_size: int | None = None):
    """The config, trained model, its kind and data (as the run saw them) of a run directory."""
    device = resolve_device(device_name)
    config, model = load_model(Path(run), device)
    config = dataclasses.replace(config, test_size=test_size or config.test_size)
    kind = model_kind(config.model)
    data = prepare_data(config, kind)
    check_data_shape(Path(run), data.shape)
    return config, model, kind, data.to(device)


def cmd_evaluate(args: argparse.Namespace) -> None:
    _positive("eval-k", args.eval_k)
    _positive("test-size", args.test_size)
    if (args.heldout is None) != (args.out is None):
        raise InputError("--heldout and --out go together: --heldout MODE --out COPY scores a copy of the "
                         "run on another draw of the test set and leaves RUN's own evaluation as it is")
    run = args.run if args.out is None else copy_run(args.run, args.out, args.heldout)
    if args.out is not None:
        print(f"copied the model to {run} (heldout: {args.heldout})")
    result, config, _ = evaluate_run(run, args.eval_k, args.test_size, args.device,
                                     progress=not args.quiet, seed=args.seed)
    kind = model_kind(config.model)
    print(f"{'metric':<22}{'per example':>18}{'std. error':>12}")
    for name, label in kind.evaluation_rows(args.eval_k):
        if name in result:
            print(f"{label:<22}{result[name]:>18.3f}{result[name + '_se']:>12.3f}")
    for line in kind.evaluation_notes(result, config):
        print(line)
    print(f"wrote {Path(run) / EVAL}")
    log_results(run, result, [Path(run) / EVAL])


def cmd_sample(args: argparse.Namespace) -> None:
    _positive("n", args.n)
    with run_lock(args.run):  # one writer at a time
        _, model, kind, data = _load_run(args.run, args.device)
        kind.refuse("sample", args.run)
        if args.label is None:
            paths = plots.save_figures(model, data, Path(args.run), seed=args.seed, n_samples=args.n)
        else:
            names = CLASS_NAMES.get(data.name)
            picture = kind.class_picture(model, args.label, args.n, args.seed, list(names) if names else None)
            paths = write_all_or_none(args.run, lambda folder: [
                plots.draw_picture(picture, folder / f"samples_class_{args.label}.png")])
    for path in paths:
        print(f"wrote {path}")


def cmd_compare(args: argparse.Namespace) -> None:
    options = CompareOptions(
        particles=args.particles, repeats=args.repeats, batch_size=args.batch_size, eval_k=args.eval_k,
        train_epochs=args.train_epochs, pretrain_epochs=args.pretrain_epochs, seed=args.seed,
        device=args.device, progress=not args.quiet, temperature=args.temperature, estimators=args.estimators,
    )
    target = Path(args.out or args.run or ".")
    with run_lock(target) if (target / "config.json").is_file() else nullcontext():  # writes into a run
        result = compare_estimators(args.run, args.config, args.out, options)
    print((result.out / "compare.md").read_text(), end="")
    for path in result.paths:
        print(f"wrote {path}")
    if args.run:
        log_results(args.run, {}, result.paths)


def _add_diagnose_parser(sub) -> None:
    diag = sub.add_parser("diagnose", help="how good is q(z|x)? log p(x), ELBO gaps, NUTS on z, PSIS k-hat "
                          "-> RUN/diagnose.json, .md, PNGs", allow_abbrev=False)
    diag.add_argument("run", help="a run directory written by `pyro-vae train`")
    diag.add_argument("--n-examples", type=int, default=100,
                      help="test examples, drawn at random (default 100)")
    diag.add_argument("--mcmc-examples", type=int, default=5,
                      help="of those, how many get NUTS on z (default 5; 0: no MCMC)")
    diag.add_argument("--eval-k", type=int, default=5000, help="importance samples per example for log p(x) "
                      "(default 5000)")
    add_renamed_flag(diag, "--k", "--eval-k", type=int)
    diag.add_argument("--svi-steps", type=int, default=500, help="SVI steps fitting each q* (default 500)")
    diag.add_argument("--num-samples", type=int, default=500, help="NUTS draws per chain (default 500)")
    diag.add_argument("--warmup", type=int, default=500, help="NUTS warm-up steps per chain (default 500)")
    diag.add_argument("--chains", type=int, default=2, help="NUTS chains, run one after another (default 2)")
    diag.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    diag.add_argument("--device", default="auto", help="auto | cpu | cuda")
    diag.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_diagnose(args: argparse.Namespace) -> None:
    for name in ("n-examples", "eval-k", "svi-steps", "num-samples", "warmup", "chains"):
        _positive(name, getattr(args, name.replace("-", "_")))
    with run_lock(args.run):  # one writer at a time
        config, model, kind, data = _load_run(args.run, args.device)
        kind.refuse("diagnose", args.run)
        with torch_threads(config.threads):  # the run's --threads (NUTS on a few z gains nothing from more)
            result = diagnose(model, data.test_x, n_examples=args.n_examples,
                              mcmc_examples=args.mcmc_examples, eval_k=args.eval_k, svi_steps=args.svi_steps,
                              num_samples=args.num_samples, warmup=args.warmup, chains=args.chains,
                              seed=args.seed, progress=not args.quiet)
        result.summary["model_checkpoint"] = model_stamp(Path(args.run))
        paths = write_report(result, Path(args.run))
    print((Path(args.run) / "diagnose.md").read_text(), end="")
    for path in paths:
        print(f"wrote {path}")


def _add_report_parser(sub) -> None:
    rep = sub.add_parser("report", help="evaluated runs side by side, paired differences from the first "
                         "-> report.md, .csv, .json, report_curves.png", allow_abbrev=False)
    rep.add_argument("runs", nargs="+", metavar="RUN", help="run directories, each evaluated "
                     "(`pyro-vae evaluate`) on the same test set (see --unevaluated); the first is the "
                     "reference")
    rep.add_argument("--out", default="report", help="where to write (default: report)")
    rep.add_argument("--x", choices=("epochs", "seconds"), default="epochs",
                     help="report_curves.png's x axis: epochs (default), or seconds: training wall time "
                     "summed over epochs, one curve per group of runs that differ only in their seed (their "
                     "mean, with a band over seeds), and each group's final test log p(x); a second panel "
                     "zooms on the last half of the time")
    rep.add_argument("--unevaluated", action="store_true",
                     help="report runs not yet evaluated too (a long run still training): their curves, "
                     "epochs and best epoch so far, without log p(x); the first run must be evaluated")


def cmd_report(args: argparse.Namespace) -> None:
    result = report(args.runs, args.out, args.x, args.unevaluated)
    print((Path(args.out) / MARKDOWN).read_text(), end="")
    for path in result.paths:
        print(f"wrote {path}")
    log_report(result)


def log_report(result) -> None:
    """Each tracked run of a report gets its row's paired differences (report/diff_...) and the report's
    files in its MLflow run."""
    for run, row in zip(result.runs, result.rows, strict=True):
        diffs = {k: v for k, v in row.items() if k.startswith("diff_")}
        log_results(run.path, diffs, result.paths, prefix="report/")


def _add_grid_parser(sub) -> None:
    grid = sub.add_parser("grid", help="train and evaluate every combination of a grid file, then report",
                          allow_abbrev=False)
    grid.add_argument("file", help="YAML/JSON grid: base (settings) and sweep (setting: [values, ...])")
    grid.add_argument("--out", default="grid", help="where the runs go, one OUT/<name> each (default: grid)")
    grid.add_argument("--jobs", type=int, default=None, help="local backend: runs trained at a time, each "
                      "its own process (default 1)")
    grid.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the grid "
                      "file's threads setting, else 1)")
    grid.add_argument("--tensorboard", action="store_true", help="TensorBoard events in each run "
                      "(tensorboard --logdir OUT shows them side by side)")
    grid.add_argument("--eval-k", type=int, default=None, help="importance samples per example for each "
                      "run's log p(x), at the end of training and in its evaluation (default: the grid "
                      "file's eval_k setting, else 100)")
    add_renamed_flag(grid, "--k", "--eval-k", type=int)
    _add_mlflow_flag(grid, "the grid file's name")
    grid.add_argument("--backend", choices=("local", "ray"), default="local", help="local (default): worker "
                      "processes on this machine; ray: each run a Ray Tune trial (needs pip install -e "
                      '".[ray]"; docs/scaling.md)')
    grid.add_argument("--address", default=None, help="ray: the cluster to join, HOST:PORT or auto (default: "
                      "start a local one)")
    grid.add_argument("--cpus-per-run", type=float, default=None, help="ray: CPUs each run asks for "
                      "(default 1)")
    grid.add_argument("--gpus-per-run", type=float, default=None, help="ray: GPUs each run asks for "
                      "(default 0)")
    grid.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="ray: asha stops runs whose "
                      "validation ELBO lags (Ray Tune's ASHA; needs validation_size); default: none")


RAY_ONLY = ("address", "cpus_per_run", "gpus_per_run", "scheduler")


def cmd_grid(args: argparse.Namespace) -> None:
    uri, stopped = resolve_uri(args.mlflow), {}
    if args.backend == "ray":
        if args.jobs is not None:
            raise InputError("--jobs is the local backend's; on Ray the cluster runs as many runs at a time "
                             "as its resources allow (--cpus-per-run, --gpus-per-run)")
        runs, failed, stopped = run_grid_ray(
            args.file, args.out, args.eval_k, args.threads, args.tensorboard, uri, args.address,
            1 if args.cpus_per_run is None else args.cpus_per_run,
            0 if args.gpus_per_run is None else args.gpus_per_run, args.scheduler)
    else:
        given = [name for name in RAY_ONLY if getattr(args, name) is not None]
        if given:
            raise InputError(f"--{given[0].replace('_', '-')} is for --backend ray; the local backend runs "
                             "--jobs worker processes on this machine")
        jobs = 1 if args.jobs is None else args.jobs
        runs, failed = run_grid(args.file, args.out, jobs, args.eval_k, args.threads, args.tensorboard,
                                mlflow=uri)
    if len(failed) + len(stopped) < len(runs):
        try:
            result = grid_report(runs, Path(args.out), failed, stopped)
        except InputError as err:
            print(f"pyro-vae: warning: no report over the grid: {err}", file=sys.stderr)
        else:
            print((result.paths[0].parent / MARKDOWN).read_text(), end="")
            print(f"wrote {result.paths[0].parent}")
            log_report(result)
    if failed:
        raise TrainingError(f"{len(failed)} of {len(runs)} run(s) failed: {', '.join(failed)}; fix the cause "
                            f"and run the grid again (finished runs are skipped)")


# --- latents: `encode` and `interpolate` (the implementations are in latents.py) ----------------------

def _add_latent_parsers(sub) -> None:
    encode = sub.add_parser("encode", help="posterior means and scales of every example -> a .npz file",
                            allow_abbrev=False)
    encode.add_argument("run", help="a run directory written by `pyro-vae train`")
    encode.add_argument("--data", default="test", choices=SPLITS,
                        help="which examples of the run's dataset: test (default) or train")
    encode.add_argument("--out", required=True, help="the .npz file to write: mean and scale (N, z_dim), "
                        "labels (N,) where the data have them, epoch and step of the model")
    encode.add_argument("--no-scales", action="store_true", help="write the means only (an autoencoder "
                        "run has no scales: its guide is a point mass)")
    encode.add_argument("--device", default="auto", help="auto | cpu | cuda")
    interp = sub.add_parser("interpolate", help="decode the line between two examples' posterior means -> "
                            "RUN/interpolate_I_J.png and .npz", allow_abbrev=False)
    interp.add_argument("run", help="a run directory written by `pyro-vae train`")
    interp.add_argument("--from", dest="start", type=int, required=True, metavar="I",
                        help="index of the first example")
    interp.add_argument("--to", dest="end", type=int, required=True, metavar="J",
                        help="index of the second example")
    interp.add_argument("--steps", type=int, default=9, help="pictures along the line, ends included "
                        "(default 9)")
    interp.add_argument("--data", default="test", choices=SPLITS,
                        help="which examples of the run's dataset: test (default) or train")
    interp.add_argument("--device", default="auto", help="auto | cpu | cuda")


def cmd_encode(args: argparse.Namespace) -> None:
    path = encode_run(args.run, args.out, args.data, scales=not args.no_scales, device=args.device)
    print(f"wrote {path}")


def cmd_interpolate(args: argparse.Namespace) -> None:
    for path in interpolate_run(args.run, args.start, args.end, args.steps, args.data, args.device):
        print(f"wrote {path}")


LATENT_COMMANDS = {"encode": cmd_encode, "interpolate": cmd_interpolate}

# --- end of latents ------------------------------------------------------------------------------------


class _Terminated(BaseException):
    """SIGTERM arrived outside the training loop (which checkpoints and raises Interrupted itself)."""


@contextmanager
def _sigterm_as_exception():
    """While a command runs, SIGTERM raises _Terminated, so its clean-up runs (locks released, a run
    directory not yet started removed) and it ends in one line, like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "sample": cmd_sample, "compare": cmd_compare,
            "diagnose": cmd_diagnose, "report": cmd_report, "grid": cmd_grid, **LATENT_COMMANDS}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `pyro-vae`; returns the exit code: 2 for bad input, 1 for a numerical fault,
    128 + signal number when SIGINT (130) or SIGTERM (143) stopped training."""
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_, **__: f"pyro-vae: warning: {message}\n"
    try:
        args = build_parser().parse_args(argv)
        with _sigterm_as_exception():
            load_plugins(args.plugins or [])
            COMMANDS[args.command](args)
    except InputError as err:
        print(f"pyro-vae: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"pyro-vae: {err}", file=sys.stderr)
        return 128 + err.signum
    except TrainingError as err:
        print(f"pyro-vae: training failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyro-vae: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("pyro-vae: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        warnings.formatwarning = formatwarning
    return 0


if __name__ == "__main__":
    sys.exit(main())
