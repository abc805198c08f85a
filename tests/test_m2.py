"""The semi-supervised M2 (m2.py, discrete.py): the enumerated ELBO is the bound with y summed out by
hand; the score-function estimator is unbiased (value and gradient); the relaxed one is a surrogate (it
can exceed log p(x)) that tends to the enumerated bound as the temperature falls; the labelled subset
is balanced, seeded and drawn from the training set; M2 and the classifier beat chance on digits; bad
inputs are refused; a resumed run is bit-identical; Pyro's own SVI trains the model. Statistical checks
use fixed seeds and tolerances of a few standard errors of the quantity compared."""

import importlib
import json
import math
import warnings
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pyro
import pytest
import torch
from torch.nn import functional as F

from pyro_vae.cli import main
from pyro_vae.config import Config
from pyro_vae.data import Dataset, load_dataset
from pyro_vae.errors import InputError
from pyro_vae.evaluation.compare_discrete import bound_draw
from pyro_vae.inference.discrete import (
    ScoreFunction_ELBO,
    choose_labelled,
    make_discrete_estimator,
    mask_labels,
)
from pyro_vae.models import model_kind
from pyro_vae.models.kind import check_config
from pyro_vae.models.m2 import UNLABELLED, build_m2
from pyro_vae.models.nets import MIN_SCALE
from pyro_vae.training.early_stopping import EarlyStopping
from pyro_vae.training.labelled_batches import LabelledBatches
from pyro_vae.training.train import Trainer, train
from pyro_vae.training.train_data import prepare_data

# the module (pyro_vae.train is the function)
train_module = importlib.import_module("pyro_vae.training.train")

C, Z, X_SHAPE = 3, 2, (1, 4, 4)


def _tiny(discrete="enum", aux_loss=0.0, seed=0, temperature=1.0):
    """A tiny M2 in training mode (3 classes, 4x4 images, z in R^2)."""
    torch.manual_seed(seed)
    m2 = build_m2(X_SHAPE, C, hidden=[8], z_dim=Z, discrete=discrete, aux_loss=aux_loss,
                  temperature=temperature)
    return m2.train()


def _batch(n=6, seed=1):
    """n binary 4x4 images, labels alternating labelled (class i % C) and UNLABELLED."""
    g = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(torch.rand(n, *X_SHAPE, generator=g), generator=g)
    y = torch.tensor([i % C if i % 2 else UNLABELLED for i in range(n)])
    return x, y


def _recording(m2, seen):
    """m2's guide, keeping the z it returns (under enumeration: one draw per class, shape (C, N, Z))."""
    def guide(x, y=None):
        z = m2.guide(x, y)
        seen.append(z)
        return z
    return guide


def _bound_at(m2, x, c, z):
    """log p(x|c,z) + log p(c) + log p(z) - log q(z|x,c) for one image x (C, H, W), class c and code z,
    written out with torch distributions (Bernoulli logits, N(0, I), uniform p(y))."""
    onehot = F.one_hot(torch.tensor(c), C).float()
    logits = m2.decoder(z.unsqueeze(0), onehot.unsqueeze(0))[0]
    loc, scale = m2.encoder(x.unsqueeze(0), onehot.unsqueeze(0))
    return (torch.distributions.Bernoulli(logits=logits).log_prob(x).sum() - math.log(C)
            + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
            - torch.distributions.Normal(loc[0], scale[0]).log_prob(z).sum())


def test_the_enumerated_elbo_is_y_summed_out_by_hand():
    """With the z draws the guide made (one per class under enumeration), -loss equals
    sum over labelled n of L(x_n, y_n) + sum over unlabelled n of sum_y q(y|x_n) L(x_n, y) + H(q(y|x_n)),
    each L at the draw of z for its class."""
    m2 = _tiny()
    x, y = _batch()
    seen = []
    loss = make_discrete_estimator("enum").differentiable_loss(m2.model, _recording(m2, seen), x, y)
    (z,) = seen
    assert z.shape == (C, len(x), Z)
    expected = torch.zeros(())
    for n in range(len(x)):
        if y[n] != UNLABELLED:
            expected = expected + _bound_at(m2, x[n], int(y[n]), z[int(y[n]), n])
            continue
        q = F.softmax(m2.classifier(x[n:n + 1])[0], -1)
        expected = expected + sum(q[c] * _bound_at(m2, x[n], c, z[c, n]) for c in range(C))
        expected = expected - (q * q.log()).sum()
    torch.testing.assert_close(loss, -expected, rtol=1e-5, atol=1e-4)


def test_without_labels_every_example_sums_y_out():
    m2 = _tiny(seed=3)
    x, _ = _batch(seed=4)
    seen = []
    loss = make_discrete_estimator("enum").differentiable_loss(m2.model, _recording(m2, seen), x, None)
    (z,) = seen
    expected = torch.zeros(())
    for n in range(len(x)):
        q = F.softmax(m2.classifier(x[n:n + 1])[0], -1)
        expected = expected + sum(q[c] * _bound_at(m2, x[n], c, z[c, n]) for c in range(C))
        expected = expected - (q * q.log()).sum()
    torch.testing.assert_close(loss, -expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("discrete", ["enum", "score"])
def test_labelled_examples_give_the_classifier_no_gradient_without_the_aux_loss(discrete):
    """L(x, y) does not involve q(y|x): a batch of labelled examples leaves the classifier's gradient at
    zero (the masked site's score function once weighted L by q(y|x) over C draws of z, and under
    'score' multiplied it, a noise term in the classifier's gradient); unlabelled ones move it."""
    m2 = _tiny(discrete)
    x, _ = _batch()
    elbo = make_discrete_estimator(discrete)
    params = list(m2.classifier.parameters())
    labelled = torch.arange(len(x)) % C
    grads = torch.autograd.grad(elbo.differentiable_loss(m2.model, m2.guide, x, labelled), params,
                                allow_unused=True)
    assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in grads)
    unlabelled = torch.full((len(x),), UNLABELLED)
    grads = torch.autograd.grad(elbo.differentiable_loss(m2.model, m2.guide, x, unlabelled), params)
    assert all(g.abs().sum() > 0 for g in grads)


def test_the_aux_loss_adds_alpha_times_the_labels_log_likelihood_under_the_classifier():
    """At the same seed (the same z), loss(alpha) - loss(0) = -alpha * sum_labelled log q(y_n|x_n)."""
    alpha = 50.0
    m2 = _tiny()
    x, y = _batch()
    losses = []
    for a in (0.0, alpha):
        m2.aux_loss = a
        torch.manual_seed(7)
        losses.append(make_discrete_estimator("enum").differentiable_loss(m2.model, m2.guide, x, y))
    labelled = y != UNLABELLED
    log_q = F.log_softmax(m2.classifier(x), -1)[labelled, y[labelled]]
    torch.testing.assert_close(losses[1] - losses[0], -alpha * log_q.sum(), rtol=1e-5, atol=1e-3)
    assert float(-alpha * log_q.sum().detach()) > 1  # the term compared is not negligible


def _draws(m2, discrete, x, y, seed, copies=400, calls=50, params=(), temperature=1.0):
    """`calls` independent estimates of the loss per copy of the batch (x, y) repeated `copies` times (each
    copy its own draws of y and z), and of its gradient w.r.t. `params` (flattened): tensors (calls,)
    and (calls, P)."""
    m2.discrete, m2.temperature = discrete, temperature
    elbo = make_discrete_estimator(discrete)
    xr, yr = x.repeat(copies, 1, 1, 1), y.repeat(copies)
    torch.manual_seed(seed)
    values, grads = [], []
    for _ in range(calls):
        loss = elbo.differentiable_loss(m2.model, m2.guide, xr, yr) / copies
        if params:
            g = torch.autograd.grad(loss, params, allow_unused=True)
            grads.append(torch.cat([(torch.zeros_like(p) if d is None else d).flatten()
                                    for d, p in zip(g, params, strict=True)]))
        values.append(loss.detach())
    return torch.stack(values), torch.stack(grads) if grads else None


def _z_scores(a, b):
    """(mean(a) - mean(b)) / s.e. of the difference, per coordinate, and that s.e."""
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    return (a.mean(0) - b.mean(0)) / se, se


def test_the_score_function_estimator_is_unbiased_for_the_value_and_the_classifier_gradient():
    """Averaged over many draws, ScoreFunction_ELBO's loss and its gradient w.r.t. q(y|x)'s parameters
    equal the enumerated ones within 4 standard errors (4.5 for the largest of ~50 coordinates); the
    gradient compared is not zero (its enumerated mean is many standard errors from it), and the same
    comparison flags the gradient without the score-function term (checked alongside)."""
    m2 = _tiny("score")
    x, y = _batch()
    params = list(m2.classifier.parameters())
    score_values, score_grads = _draws(m2, "score", x, y, seed=1, params=params)
    enum_values, enum_grads = _draws(m2, "enum", x, y, seed=2, params=params)
    z, _ = _z_scores(score_values, enum_values)
    assert abs(float(z)) < 4, float(z)
    z, se = _z_scores(score_grads, enum_grads)
    moving = se > 0  # coordinates of zero pixels and dead units have no gradient in either
    assert int(moving.sum()) >= 20
    assert float(z[moving].abs().max()) < 4.5, z[moving]
    signal = enum_grads.mean(0).abs() / (enum_grads.var(0) / len(enum_grads)).sqrt()
    assert float(signal[moving].max()) > 10

    class PathwiseOnly(ScoreFunction_ELBO):  # -ELBO's own gradient: no score-function term, biased
        def differentiable_loss(self, model, guide, *args, **kwargs):
            return -self._loss_and_surrogate_loss(model, guide, args, kwargs)[0]

    m2.discrete = "score"
    xr, yr = x.repeat(400, 1, 1, 1), y.repeat(400)
    torch.manual_seed(3)
    biased = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        PathwiseOnly().differentiable_loss(m2.model, m2.guide, xr, yr) / 400, params[-2:])])
        for _ in range(50)])
    n_last = sum(p.numel() for p in params[-2:])
    z, se = _z_scores(biased, enum_grads[:, -n_last:])
    assert float(z[se > 0].abs().max()) > 10


def test_the_relaxed_surrogate_tends_to_the_enumerated_bound_as_the_temperature_falls():
    """On a model whose decoder depends strongly on y (its weights on y scaled up 10x), the mean relaxed
    loss is far from the enumerated loss at temperature 1, closer at 0.3, and within 4 standard errors of
    it at 0.01 (each step by more than 4 standard errors of both biases, summed)."""
    m2 = _tiny("relaxed")
    with torch.no_grad():
        m2.decoder.net[0].weight[:, Z:] *= 10
    x, y = _batch()
    enum_values, _ = _draws(m2, "enum", x, y, seed=1, copies=200, calls=20)
    bias, se = {}, {}
    for tau in (1.0, 0.3, 0.01):
        relaxed_values, _ = _draws(m2, "relaxed", x, y, seed=2, copies=200, calls=20, temperature=tau)
        z, se[tau] = _z_scores(relaxed_values, enum_values)
        bias[tau] = abs(float(z * se[tau]))
    assert bias[0.01] < 4 * float(se[0.01]), (bias, se)
    for hot, cold in ((1.0, 0.3), (0.3, 0.01)):
        assert bias[hot] - bias[cold] > 4 * float(se[hot] + se[cold]), (hot, bias, se)


def test_the_relaxed_surrogate_is_no_bound_it_exceeds_log_px():
    """'relaxed' scores the soft y with the categorical log-mass sum_k y_k log pi_k, no density of y, so its
    y-term E_q[log p(y) - log q(y|x)] is not minus a KL and can be positive. Here the decoder ignores y
    and z (its first layer's weights zero) and q(z|x,y) is the prior N(0, I): under M2 and under the
    relaxed model alike (whose y is Concrete-distributed, a proper density) log p(x) is exactly the
    decoder's likelihood of x, while at tau = 3 with a peaked q(y|x) (logits (3, 0, 0)) the surrogate's
    mean exceeds it by more than 5 standard errors (paired per draw: log p(x) is exact): it is a bound
    on neither model."""
    m2 = _tiny("relaxed", temperature=3.0)
    with torch.no_grad():
        m2.decoder.net[0].weight.zero_()
        last = m2.encoder.net[-1]
        last.weight.zero_()
        last.bias[:Z] = 0.0  # loc 0, scale softplus(raw) + MIN_SCALE = 1
        last.bias[Z:] = math.log(math.expm1(1.0 - MIN_SCALE))
        m2.classifier.net[-1].weight.zero_()
        m2.classifier.net[-1].bias.copy_(torch.tensor([3.0, 0.0, 0.0]))
    x, _ = _batch()
    with torch.no_grad():
        log_px = m2.likelihood(m2.decoder(torch.zeros(len(x), Z), torch.zeros(len(x), C))).log_prob(x)
        pyro.set_rng_seed(4)
        draws = torch.stack([bound_draw(m2.model, m2.guide, x) for _ in range(200)])  # (draws, examples)
    excess = (draws - log_px).flatten()
    se = excess.std() / math.sqrt(excess.numel())
    assert float(excess.mean()) > 5 * float(se), (float(excess.mean()), float(se))


# -- the labelled subset ------------------------------------------------------------------------------


def test_the_labelled_subset_is_balanced_over_the_classes_and_fixed_by_the_seed():
    """n // C examples of each class, the remainder (one more each) to the first classes; the same seed
    picks the same examples, another seed others; indices into the labels given, without repeats."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(4, (400,), generator=g)
    chosen = choose_labelled(labels, 14, seed=5)
    assert chosen.unique().numel() == 14 and 0 <= int(chosen.min()) and int(chosen.max()) < 400
    assert labels[chosen].bincount(minlength=4).tolist() == [4, 4, 3, 3]
    assert torch.equal(choose_labelled(labels, 14, seed=5), chosen)
    assert not torch.equal(choose_labelled(labels, 14, seed=6), chosen)
    assert labels[choose_labelled(labels, 40, seed=1)].bincount().tolist() == [10] * 4
    with pytest.raises(InputError, match="more labelled examples than the 400"):
        choose_labelled(labels, 401, seed=0)
    with pytest.raises(InputError, match="cannot cover the 4 classes"):
        choose_labelled(labels, 3, seed=0)
    rare = torch.tensor([0] * 10 + [1] * 2)
    with pytest.raises(InputError, match="needs 3 examples of class 1"):
        choose_labelled(rare, 6, seed=0)


def _tagged(n=60, classes=3):
    """A dataset whose image i holds the value i everywhere (so rows can be traced), label i % classes."""
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    y = torch.arange(n) % classes
    return Dataset("tags", x, x[:9] + 1000, y, y[:9].flip(0))


def label_training_set(data, model, n, seed):
    """The training set a labelled kind trains on (ModelKind.training_data) with n labels drawn with seed."""
    return model_kind(model).training_data(SimpleNamespace(labels=n, seed=seed), data)


def test_m2_keeps_every_training_example_and_hides_all_labels_but_the_chosen():
    data = _tagged()
    m2 = label_training_set(data, "m2", 12, seed=3)
    chosen = choose_labelled(data.train_y, 12, seed=3)
    assert torch.equal(m2.train_x, data.train_x)
    assert torch.equal((m2.train_y != UNLABELLED).nonzero().squeeze(-1), chosen)
    assert torch.equal(m2.train_y[chosen], data.train_y[chosen])
    assert torch.equal(m2.test_y, data.test_y) and torch.equal(m2.test_x, data.test_x)  # untouched
    classifier = label_training_set(data, "classifier", 12, seed=3)
    assert torch.equal(classifier.train_x, data.train_x[chosen])  # exactly the labelled examples
    assert torch.equal(classifier.train_y, data.train_y[chosen])
    assert torch.equal(classifier.test_y, data.test_y)


def test_with_a_validation_split_the_labels_are_drawn_from_what_is_left_to_train_on():
    """Through prepare_data on digits (every training image distinct): the labelled examples are training
    rows, none of them in the validation set; the test labels are those of the dataset."""
    config = Config.from_dict({"model": "m2", "labels": 50, "validation_size": 300, "binarize": "none"})
    data = prepare_data(config)
    full = load_dataset("digits")
    assert data.train_x.shape[0] == full.train_x.shape[0] - 300 and data.val_x.shape[0] == 300
    labelled = data.train_x[data.train_y != UNLABELLED].flatten(1)
    assert labelled.shape[0] == 50
    assert not (labelled[:, None, :] == data.val_x.flatten(1)[None]).all(-1).any()
    assert torch.equal(data.test_y, full.test_y)
    rows = (full.train_x.flatten(1)[None] == labelled[:, None]).all(-1).float().argmax(-1)
    assert torch.equal(full.train_y[rows], data.train_y[data.train_y != UNLABELLED])  # their own labels
    assert full.train_y[rows].bincount().tolist() == [5] * 10


# -- training runs -------------------------------------------------------------------------------------

RUN = {"hidden": [64], "batch_size": 64, "lr": 3e-3, "epochs": 5}


@pytest.mark.parametrize("model, extra", [("m2", {"aux_loss": 50.0, "z_dim": 8, "eval_k": 5}),
                                          ("classifier", {})])
def test_test_accuracy_beats_chance_on_digits_after_a_short_run(model, extra, tmp_path):
    """With 100 labels (10 a class), 5 epochs: test accuracy above chance (0.1) by more than 5 of its
    standard errors; every epoch's row records it, and the summary the number of labels used."""
    config = Config.from_dict({"model": model, "labels": 100, **RUN, **extra})
    result = train(config, tmp_path / model, progress=False)
    summary = result.summary
    assert summary["labels"] == 100
    assert summary["test_accuracy"] > 0.1 + 5 * summary["test_accuracy_se"], summary
    assert summary["test_accuracy"] == result.metrics[-1]["test_accuracy"]
    assert summary["n_train"] == (100 if model == "classifier" else load_dataset("digits").train_x.shape[0])


@pytest.mark.parametrize("args, message", [
    (["--model", "m2", "--labels", "100000"], "asks for more labelled examples than the 1438 training"),
    (["--model", "m2", "--labels", "5"], "cannot cover the 10 classes"),
    (["--model", "m2", "--labels", "1300"], "needs 130 examples of class 2, and the training set has 126"),
    (["--model", "m2", "--labels", "10", "--dataset", "UNLABELLED"], "needs class labels"),
    (["--model", "classifier", "--labels", "10", "--dataset", "UNLABELLED"], "needs class labels"),
    (["--discrete", "score"], "has no discrete latent"),
    (["--model", "classifier", "--labels", "100", "--aux-loss", "1"], "has no discrete latent"),
    (["--model", "m2"], "say how many with --labels N"),
    (["--labels", "100"], "--labels and --classes apply to --model m2 or classifier"),
    (["--model", "m2", "--labels", "100", "--temperature", "0.5"], "--discrete enum does not relax y"),
    (["--model", "m2", "--labels", "100", "--discrete", "score", "--temperature-final", "0.3"],
     "--discrete score does not relax y"),
    (["--model", "m2", "--labels", "100", "--estimator", "iwae"], "do(es) not apply to --model m2"),
    (["--model", "m2", "--labels", "100", "--prior", "vamp"], "--prior vamp builds p(z) from q(z|x)"),
    (["--model", "m2", "--labels", "100", "--encoder", "conv"], "builds MLP networks"),
    (["--model", "m2", "--labels", "100", "--aux-loss", "-1"], "--aux-loss must be a weight >= 0"),
    (["--model", "m2", "--labels", "100", "--discrete", "exact"], "unknown discrete 'exact'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_semi_supervised_inputs_exit_2_with_one_line(args, message, tmp_path, capsys):
    images = tmp_path / "unlabelled.npy"
    np.save(images, np.random.default_rng(0).random((30, 8, 8), dtype=np.float32))
    argv = ["train", *[str(images) if a == "UNLABELLED" else a for a in args], "--out", str(tmp_path / "run"),
            "--epochs", "1", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "run").exists()


def test_the_input_errors_are_input_errors_from_python():
    with pytest.raises(InputError, match="asks for more labelled examples"):
        prepare_data(Config.from_dict({"model": "m2", "labels": 100000}))
    with pytest.raises(InputError, match="has no discrete latent"):
        check_config(Config.from_dict({"discrete": "relaxed"}))
    with pytest.raises(InputError, match="builds MLP networks"):
        build_m2(X_SHAPE, C, encoder="conv")
    with pytest.raises(InputError, match="--prior vamp"):
        build_m2(X_SHAPE, C, prior="vamp")


# -- resume ---------------------------------------------------------------------------------------------

SMALL_RUN = ["--model", "m2", "--labels", "30", "--train-size", "200", "--test-size", "60", "--hidden", "16",
             "--z-dim", "2", "--batch-size", "32", "--eval-k", "5", "--quiet"]


def _run_state(run):
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds")  # wall time differs; nothing else may
    return ckpt["model"], rows, json.loads((run / "summary.json").read_text())


def _assert_same_run(a, b):
    model_a, rows_a, summary_a = _run_state(a)
    model_b, rows_b, summary_b = _run_state(b)
    assert rows_a == rows_b
    assert model_a.keys() == model_b.keys() and all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    for key in ("test_accuracy", "log_px", "steps", "labels"):
        assert summary_a[key] == summary_b[key], key


def test_an_m2_run_resumed_after_two_epochs_is_bit_identical_to_a_straight_one(tmp_path):
    assert main(["train", "--epochs", "3", "--aux-loss", "10", "--out", str(tmp_path / "straight"),
                 *SMALL_RUN]) == 0
    assert main(["train", "--epochs", "2", "--aux-loss", "10", "--out", str(tmp_path / "run"),
                 *SMALL_RUN]) == 0
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "3", "--quiet"]) == 0
    _assert_same_run(tmp_path / "straight", tmp_path / "run")
    assert len(_run_state(tmp_path / "run")[1]) == 3


@pytest.mark.parametrize("discrete, epoch_steps", [
    (["--discrete", "relaxed", "--temperature-final", "0.2"], 7),  # ceil(200 / 32) steps an epoch
    (["--discrete", "score"], 7),
    # 8 labelled in each batch of 32: ceil(170 unlabelled / 24) steps an epoch
    (["--labelled-per-batch", "8", "--aux-loss", "0.1", "--aux-loss-scale", "data"], 8),
], ids=["relaxed-annealed", "score", "labelled-per-batch"])
def test_an_m2_run_resumed_from_a_mid_epoch_checkpoint_is_bit_identical(discrete, epoch_steps, tmp_path,
                                                                       monkeypatch, crash_copy):
    """A checkpoint 3 steps into epoch 2 (kept as a crashed run would leave it) resumes to the run that
    never stopped: the annealed temperature, the score estimator's baseline, the labelled batches and the
    data-scaled alpha continue as they were."""
    args = ["--epochs", "2", *discrete, *SMALL_RUN]
    assert main(["train", *args, "--out", str(tmp_path / "straight")]) == 0
    saved = crash_copy(tmp_path / "crashed", epoch=2, batch=3)
    assert main(["train", *args, "--checkpoint-every", "1e-6", "--out", str(tmp_path / "run")]) == 0
    monkeypatch.undo()
    assert saved == [epoch_steps + 3]  # epoch 1, then 3 steps into epoch 2
    assert main(["train", "--resume", str(tmp_path / "crashed"), "--quiet"]) == 0
    _assert_same_run(tmp_path / "straight", tmp_path / "crashed")
    rows = _run_state(tmp_path / "crashed")[1]
    if "relaxed" in discrete:
        assert rows[0]["temperature"] > rows[1]["temperature"] == pytest.approx(0.2)


# -- Pyro's own SVI -------------------------------------------------------------------------------------


@pytest.mark.parametrize("aux_loss", [0.0, 10.0])
def test_pyro_svi_with_trace_enum_elbo_trains_m2_on_digits(aux_loss):
    """SVI(m2.model, m2.guide, pyro.optim.Adam, TraceEnum_ELBO(max_plate_nesting=1)) on digits with 100
    labels (the rest UNLABELLED), every warning an error: the mean loss of the last 5 steps is below that
    of the first 5 by more than 4 standard errors of the difference, every parameter moved, and the
    param store holds exactly the module's tensors."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data = load_dataset("digits")
    x = torch.bernoulli(data.train_x, generator=torch.Generator().manual_seed(0))
    y = mask_labels(data.train_y, choose_labelled(data.train_y, 100, seed=0))
    m2 = build_m2(x.shape[1:], 10, hidden=[64], z_dim=8, aux_loss=aux_loss).train()
    before = {n: p.detach().clone() for n, p in m2.named_parameters()}
    svi = pyro.infer.SVI(m2.model, m2.guide, pyro.optim.Adam({"lr": 1e-2}),
                         pyro.infer.TraceEnum_ELBO(max_plate_nesting=1))
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = []
        for _ in range(30):
            idx = torch.randint(len(x), (128,), generator=gen)
            losses.append(svi.step(x[idx], y[idx]) / len(idx))
    losses = torch.tensor(losses, dtype=torch.float64)
    first, last = losses[:5], losses[-5:]
    se = math.sqrt(float(first.var() + last.var()) / 5)
    assert float(first.mean() - last.mean()) > 4 * se, (first, last)
    moved = {n for n, p in m2.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == set(before), set(before) - moved
    stored = {id(v) for v in pyro.get_param_store().values()}
    assert stored == {id(p) for p in m2.parameters()}


def test_m2_figures_vary_z_with_the_class_fixed_and_map_z_alone(tmp_path):
    """M2 has a continuous z and a discrete y: the traversal varies z's coordinates with y at its most
    likely class (no warning), the latent map shows E_q[z|x] without the class index, and
    class_samples.png has one row per class."""
    import warnings

    from pyro_vae.figures.plots import save_figures
    from pyro_vae.inference.program import Program

    m2 = build_m2((1, 8, 8), 10, hidden=[16], z_dim=3).eval()
    x = torch.rand(40, 1, 8, 8).bernoulli()
    program = Program.of(m2)
    assert program.continuous_sites(x) == ("z",)
    assert program.posterior_means(x).shape == (40, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = save_figures(m2, x, tmp_path, n_samples=9)
    assert sorted(p.name for p in paths) == ["class_samples.png", "latent_map.png", "reconstructions.png",
                                             "samples.png", "traversal.png"]
    images = m2.class_samples(torch.zeros(4, 3))
    assert images.shape == (10, 4, 1, 8, 8)
    assert not torch.allclose(images[0], images[1])  # the decoder sees the class: rows differ
    assert torch.allclose(images[:, 0], images[:, 1])  # the same z in every column here: columns agree


@pytest.mark.parametrize("source", ["mnist-idx", "image-folder"])
def test_m2_reads_its_labels_from_mnist_files_and_from_class_folders(source, tmp_path):
    """`--model m2 --labels N` on MNIST's IDX files (as torchvision's download leaves them) and on a
    folder of images in one subfolder per class: the labelled subset is balanced over the classes
    the files name, and the test accuracy is measured against the files' test labels."""
    import numpy as np
    from PIL import Image

    from tests.test_data import write_idx_set

    if source == "mnist-idx":
        arrays = write_idx_set(tmp_path / "data" / "mnist", gz=True, seed=0, n_train=60, n_test=20)
        dataset = ["--dataset", "mnist", "--data-dir", str(tmp_path / "data")]
        classes = len(np.unique(np.concatenate([arrays["train"][1], arrays["test"][1]])))
        n_test, labels = 20, len(np.unique(arrays["train"][1]))  # one per class the training files name
    else:
        rng = np.random.default_rng(0)
        for split, n in (("train", 12), ("test", 4)):
            for c in ("cat", "dog", "eel"):
                folder = tmp_path / "images" / split / c
                folder.mkdir(parents=True)
                for i in range(n):
                    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
        dataset = ["--dataset", str(tmp_path / "images"), "--image-size", "8"]
        classes, n_test, labels = 3, 12, 6
    out = tmp_path / "run"
    assert main(["train", *dataset, "--model", "m2", "--labels", str(labels), "--epochs", "1",
                 "--hidden", "8", "--z-dim", "2", "--eval-k", "2", "--quiet", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == labels and summary["n_examples"] == n_test
    assert config["classes"] >= classes and 0.0 <= summary["test_accuracy"] <= 1.0


def test_curves_of_a_labelled_run_add_the_accuracy_per_epoch():
    from pyro_vae.figures.plots import run_curves_figure

    rows = [{"epoch": e, "train_loss": 30.0 - e, "test_elbo": -31.0 + e, "test_accuracy": 0.1 * e}
            for e in (1, 2, 3)]
    left, right = run_curves_figure({"": rows}).axes  # what plot_curves(rows, path) writes
    assert list(right.lines[0].get_ydata()) == pytest.approx([0.1, 0.2, 0.3])
    assert [line.get_label() for line in left.lines] == ["-train loss", "test ELBO"]


# -- a fair budget: labelled examples in every batch, Kingma's alpha, early stopping on accuracy --------

def _labels(n=50, labelled=(0, 3, 4, 9, 17, 30, 41)):
    """n labels, UNLABELLED but at the indices `labelled` (class = index % C)."""
    y = torch.full((n,), UNLABELLED)
    y[list(labelled)] = torch.tensor(labelled) % C
    return y


def test_labelled_batches_put_m_labelled_examples_first_and_pass_once_over_the_unlabelled():
    """Batch size 10, M = 3, 7 labelled of 50: ceil(43 / 7) = 7 batches an epoch, each the next 3 of
    reshuffled passes over the labelled (each label 3 times in 21 places) and its share of one
    permutation of the unlabelled; another epoch draws another order."""
    y = _labels()
    batches = LabelledBatches(y, batch_size=10, per_batch=3)
    order = batches.epoch(torch.Generator().manual_seed(0))
    assert batches.n_batches == len(order) == 7 and batches.examples_per_epoch == 7 * 3 + 43
    assert all((y[idx[:3]] != UNLABELLED).all() and (y[idx[3:]] == UNLABELLED).all() for idx in order)
    assert [len(idx) for idx in order] == [10] * 6 + [3 + 43 - 6 * 7]
    unlabelled = torch.cat([idx[3:] for idx in order])
    assert torch.equal(unlabelled.sort().values, (y == UNLABELLED).nonzero().squeeze(-1))  # each once
    labelled = torch.cat([idx[:3] for idx in order])
    assert labelled.bincount(minlength=50)[y != UNLABELLED].tolist() == [3] * 7
    again = batches.epoch(torch.Generator().manual_seed(1))
    assert not all(torch.equal(a, b) for a, b in zip(order, again, strict=True))


def test_the_weighted_batch_loss_is_an_unbiased_estimate_of_the_full_data_loss():
    """With a fixed loss per example (labelled ones far larger, as alpha makes them): the mean over 400
    epochs of the batches' LabelledBatches.loss equals the full-data loss per example within 4 standard
    errors (epochs are independent draws); the batches' plain mean (sum / batch size) is far from it."""
    y = _labels()
    per_example = torch.where(y != UNLABELLED, 100.0, 1.0).double() + torch.arange(50) / 10
    batches = LabelledBatches(y, batch_size=10, per_batch=3)
    summed = lambda idx, labels: per_example[idx].sum()  # noqa: E731 - `x` is the indices here
    generator = torch.Generator().manual_seed(0)
    weighted, plain = [], []
    for _ in range(400):
        order = batches.epoch(generator)
        weighted.append(torch.stack([batches.loss(summed, idx, (y[idx],)) for idx in order]).mean())
        plain.append(torch.stack([per_example[idx].mean() for idx in order]).mean())
    weighted, plain = torch.stack(weighted), torch.stack(plain)
    full = per_example.mean()
    se = weighted.std() / math.sqrt(len(weighted))
    assert abs(weighted.mean() - full) < 4 * se
    assert abs(plain.mean() - full) > 50 * se


def _fair_config(**extra):
    return Config.from_dict({"model": "m2", "labels": 20, "hidden": [16], "z_dim": 2, "batch_size": 64,
                             "epochs": 1, "eval_k": 2, **extra})


def test_the_training_loss_with_labelled_batches_estimates_the_full_data_loss(tmp_path):
    """Through the trainer's own batches and loss (M2 on digits, alpha = 20, enumeration, parameters as
    initialized): the mean loss over 3 epochs of batches of 8 labelled + 56 unlabelled equals the
    full-data -J^alpha per example (one draw of z per example, 10 draws) within 4 standard errors of the
    difference; the unweighted mean of the same batches does not."""
    trainer = Trainer(_fair_config(aux_loss=20.0, labelled_per_batch=8), tmp_path / "run", progress=False)
    trainer.model.train_mode(True)
    loss, x_all, y_all = trainer.loss, trainer.data.train_x.bernoulli(), trainer.loss.labels
    program, generator = trainer.model.program, torch.Generator().manual_seed(0)
    summed = lambda x, y: loss.elbo.differentiable_loss(program.model, program.guide, x, y).detach()  # noqa: E731
    batch, plain = [], []
    for _ in range(3):
        _, order = trainer.batches.epoch(generator)
        for idx in order:
            args = loss.arguments(idx, x_all[idx], 0)
            batch.append(loss(x_all[idx], args.weight, args.per, *args.inputs).detach())
            plain.append(summed(x_all[idx], *args.inputs) / len(idx))
    full = torch.stack([summed(x_all, y_all) for _ in range(10)]) / len(x_all)
    batch, plain = torch.stack(batch).double(), torch.stack(plain).double()
    se = math.sqrt(batch.var() / len(batch) + full.double().var() / len(full))
    assert abs(batch.mean() - full.mean()) < 4 * se
    assert abs(plain.mean() - full.mean()) > 10 * se
    trainer.run()


@pytest.mark.parametrize("scale, weight", [("fixed", lambda alpha, n, n_l: alpha),
                                           ("data", lambda alpha, n, n_l: alpha * n / n_l)])
def test_the_auxiliary_weight_is_alpha_or_alpha_times_n_over_the_labels_in_every_session(scale, weight,
                                                                                        tmp_path):
    """--aux-loss-scale data: each labelled log q(y|x) weighs alpha * N / N_labelled (N the training
    examples after the validation split), also in a resumed session; config.json keeps alpha itself."""
    config = _fair_config(aux_loss=0.1, aux_loss_scale=scale, train_size=400, validation_size=100)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    n = 400 - 100
    assert trainer.model.pair.aux_loss == pytest.approx(weight(0.1, n, 20))
    trainer.run()
    del trainer  # one live M2 at a time in Pyro's param store
    resumed = Trainer(replace(config, epochs=2), tmp_path / "run", resume=True, progress=False)
    assert resumed.model.pair.aux_loss == pytest.approx(weight(0.1, n, 20))
    resumed.run()
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (recorded["aux_loss"], recorded["aux_loss_scale"]) == (0.1, scale)


@pytest.mark.parametrize("model, extra", [("classifier", {}), ("m2", {"labelled_per_batch": 8})])
def test_early_stopping_of_a_labelled_kind_watches_the_validation_accuracy(model, extra, tmp_path):
    """M2 and the classifier stop on the accuracy of q(y|x) on the labelled validation images: best.pt is
    the first epoch of the highest validation accuracy, training stops `patience` epochs after it, and the
    summary reports that accuracy."""
    settings = {"model": model, "labels": 20, "hidden": [16], "batch_size": 64, "epochs": 30, "lr": 3e-3,
                "train_size": 800, "validation_size": 300, "early_stop": 2, **extra}
    if model == "m2":
        settings.update(z_dim=2, eval_k=2)
    result = train(Config.from_dict(settings), tmp_path / "run", progress=False)
    rows = result.metrics
    accuracy = [row["validation_accuracy"] for row in rows]
    best = accuracy.index(max(accuracy))
    assert result.summary["best_epoch"] == rows[best]["epoch"] == rows[-1]["best_epoch"]
    assert result.summary["best_validation_accuracy"] == max(accuracy)
    assert result.summary["stop_reason"] == "early_stop" and len(rows) == best + 1 + 2
    assert ("best_validation_elbo" in result.summary) == (model == "m2")


def test_a_resumed_early_stopping_count_keeps_the_measure_it_was_counting():
    """A checkpoint's count from before the measure was recorded ("best_validation_elbo") goes on
    watching the validation ELBO, whatever the kind watches now."""
    early = EarlyStopping(3, {"best_epoch": 2, "best_validation_elbo": -40.0, "epochs_since_best": 1},
                          metric="validation_accuracy")
    assert early.metric == "validation_elbo"
    assert early.update(3, -39.0) and early.record()["early_stop"]["best_validation_elbo"] == -39.0
    fresh = EarlyStopping(3, metric="validation_accuracy")
    assert fresh.update(1, 0.5) and fresh.record()["early_stop"] == {
        "best_epoch": 1, "best_validation_accuracy": 0.5, "epochs_since_best": 0}


@pytest.mark.parametrize("args, message", [
    (["--model", "m2", "--labels", "100", "--labelled-per-batch", "128"], "leaves no room for unlabelled"),
    (["--labelled-per-batch", "10"], "--model vae has no discrete latent"),
    (["--model", "classifier", "--labels", "100", "--labelled-per-batch", "10"], "has no discrete latent"),
    (["--model", "m2", "--labels", "100", "--labelled-per-batch", "0"], "must be a positive integer"),
    (["--model", "m2", "--labels", "100", "--aux-loss-scale", "data"], "--aux-loss is 0"),
    (["--model", "m2", "--labels", "100", "--aux-loss", "1", "--aux-loss-scale", "n"],
     "unknown aux_loss_scale 'n'"),
    (["--model", "m2", "--labels", "20", "--dataset", "TWO_A_CLASS", "--labelled-per-batch", "10"],
     "hold no unlabelled one"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_fair_budget_inputs_exit_2_with_one_line(args, message, tmp_path, capsys):
    """TWO_A_CLASS: 20 training images, 2 of each of 10 classes (20 labels leave none unlabelled)."""
    images = tmp_path / "two_a_class.npz"
    y = np.arange(20) % 10
    np.savez(images, x_train=np.random.default_rng(0).random((20, 8, 8), dtype=np.float32), y_train=y,
             x_test=np.zeros((10, 8, 8), np.float32), y_test=y[:10])
    args = [str(images) if a == "TWO_A_CLASS" else a for a in args]
    assert main(["train", *args, "--out", str(tmp_path / "run"), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "run").exists()
